//! LISTEN / NOTIFY: [`Listener`], a stream of notifications on a connection of its own.
//!
//! The connection lives outside the pool, in a task that sends the `LISTEN`s and reads
//! what the server pushes. When the connection dies, the task reconnects with backoff
//! (100 ms, doubling up to 10 s), listens again, and yields
//! [`ListenEvent::Reconnected`]: PostgreSQL does not keep notifications for a session
//! that is gone, so some may have been missed meanwhile. Dropping the listener ends the
//! task and closes its connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::context::EngineContext;
use crate::error::{Error, ErrorKind, Result};
use crate::identifier::quote_identifier;

/// The first wait before reconnecting, and the longest.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// How many events may wait unread before the listener stops reading the server.
const BUFFERED_EVENTS: usize = 1024;

/// A notification: the channel, its payload and the server process that sent it.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::StreamExt;
/// use pgengine::prelude::*;
/// let mut listener = engine.listen(["band_changes"]).await?;
/// engine.execute("NOTIFY band_changes, 'Rustaceans'").await?;
/// if let Some(Ok(pgengine::ListenEvent::Notification(n))) = listener.next().await {
///     assert_eq!((n.channel.as_str(), n.payload.as_str()), ("band_changes", "Rustaceans"));
/// }
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// Its payload (empty when none was given).
    pub payload: String,
    /// The server process id of the session that sent it.
    pub process_id: i32,
}

/// What a [`Listener`] yields.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::StreamExt;
/// use pgengine::ListenEvent;
/// let mut listener = engine.listen(["jobs"]).await?;
/// # use pgengine::prelude::*;
/// # engine.execute("NOTIFY jobs").await?;
/// match listener.next().await {
///     Some(Ok(ListenEvent::Notification(n))) => println!("{}: {}", n.channel, n.payload),
///     Some(Ok(ListenEvent::Reconnected)) => println!("resynchronise: some may be missed"),
///     Some(Err(e)) => eprintln!("{e}"),
///     None => {}
/// }
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent {
    /// A notification on one of the channels.
    Notification(Notification),
    /// The connection was lost and made again, listening again: notifications sent
    /// meanwhile were not received.
    Reconnected,
}

/// Notifications of some channels, as a [`Stream`], on a connection of its own; see
/// [`PostgresEngine::listen`](crate::PostgresEngine::listen). Dropping it closes the
/// connection.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::StreamExt;
/// let listener = engine.listen(["a", "b"]).await?;
/// drop(listener); // the connection is closed
/// # Ok(()) });
/// ```
#[derive(Debug)]
pub struct Listener {
    events: mpsc::Receiver<Result<ListenEvent>>,
}

impl Stream for Listener {
    type Item = Result<ListenEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

/// Starts listening: connects and sends the `LISTEN`s (an error here is returned),
/// then leaves the connection to a task.
pub(crate) async fn listen(context: Arc<EngineContext>, channels: Vec<String>) -> Result<Listener> {
    if channels.is_empty() {
        return Err(Error::invalid_input("listen needs at least one channel"));
    }
    let listens = channels
        .iter()
        .map(|channel| Ok(format!("LISTEN {};", quote_identifier(channel)?)))
        .collect::<Result<String>>()?;
    let (sender, events) = mpsc::channel(BUFFERED_EVENTS);
    let session = Session::open(&context, &listens, sender.clone(), false).await?;
    tokio::spawn(keep_listening(context, listens, sender, session));
    Ok(Listener { events })
}

/// One listening connection: its client, and the task reading its messages, which
/// ends when the connection does.
struct Session {
    _client: tokio_postgres::Client,
    reader: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Connects, listens, and (after a reconnection) reports
    /// [`ListenEvent::Reconnected`] before any notification of the new session.
    async fn open(
        context: &EngineContext,
        listens: &str,
        sender: mpsc::Sender<Result<ListenEvent>>,
        reconnected: bool,
    ) -> Result<Session> {
        let tls = &context.settings.tls;
        let (client, mut connection) = match context.pg.connect(tls.connector.clone()).await {
            Err(_) if tls.retry_with_tls => {
                let mut pg = context.pg.clone();
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                pg.connect(tls.connector.clone()).await
            }
            connected => connected,
        }
        .map_err(Error::connect)?;
        // The reader drives the connection from the start (the LISTENs need it), but
        // holds notifications back until the session is announced.
        let (announced, gate) = tokio::sync::oneshot::channel::<()>();
        let forward = sender.clone();
        let reader = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
            let mut gate = gate;
            let mut open = false;
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut gate, if !open => {
                        open = true;
                        for event in held.drain(..) {
                            if forward.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    message = futures::StreamExt::next(&mut messages) => {
                        let event = match message {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                ListenEvent::Notification(Notification {
                                    channel: n.channel().to_owned(),
                                    payload: n.payload().to_owned(),
                                    process_id: n.process_id(),
                                })
                            }
                            Some(Ok(_)) => continue,
                            None | Some(Err(_)) => return, // the connection ended
                        };
                        if !open {
                            held.push(event);
                        } else if forward.send(Ok(event)).await.is_err() {
                            return; // the listener was dropped
                        }
                    }
                }
            }
        });
        client.batch_execute(listens).await.map_err(Error::from)?;
        if reconnected && sender.send(Ok(ListenEvent::Reconnected)).await.is_err() {
            return Err(Error::new(ErrorKind::Closed, "the listener was dropped"));
        }
        let _ = announced.send(());
        Ok(Session {
            _client: client,
            reader,
        })
    }
}

/// Keeps a listening session open until the listener is dropped: when the connection
/// ends, makes it again (with backoff) and reports [`ListenEvent::Reconnected`].
async fn keep_listening(
    context: Arc<EngineContext>,
    listens: String,
    sender: mpsc::Sender<Result<ListenEvent>>,
    mut session: Session,
) {
    loop {
        tokio::select! {
            _ = sender.closed() => return,   // dropping the session closes the connection
            _ = &mut session.reader => {}
        }
        let mut wait = BACKOFF.0;
        session = loop {
            tokio::select! {
                _ = sender.closed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match Session::open(&context, &listens, sender.clone(), true).await {
                Ok(session) => break session,
                Err(error) => {
                    tracing::debug!(target: "pgengine::listen", %error, "reconnecting the listener failed");
                    wait = (wait * 2).min(BACKOFF.1);
                }
            }
        };
    }
}
