//! The connection pool (deadpool-postgres) and the hygiene of each pooled connection.
//!
//! A [`Connection`] knows whether it is inside a transaction and whether a request on it
//! was abandoned (its future dropped before the answer came). When it goes back, a clean
//! connection returns to the pool as is; one left inside a transaction is rolled back
//! first; one with an abandoned request has that request cancelled first. Where any of
//! that fails, the connection is discarded. The pool slot stays taken until that is
//! done, so the next user never sees a dirty session.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Status, TimeoutType,
    Timeouts,
};

use crate::cancel::Canceller;
use crate::config::EngineSettings;
use crate::error::{Error, ErrorKind, Result};

/// The pool of one engine, and how to cancel a request on its connections.
pub(crate) struct ConnectionPool {
    pool: Pool,
    canceller: Arc<Canceller>,
}

impl ConnectionPool {
    /// Creates the pool; no connection is opened yet.
    pub(crate) fn new(pg: tokio_postgres::Config, settings: &EngineSettings) -> Result<Self> {
        let canceller = Arc::new(Canceller::new(
            &pg,
            settings.connect_timeout,
            settings.tls.connector.clone(),
        ));
        let manager = Manager::from_connect(
            pg,
            settings.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections)
            .wait_timeout(settings.pool_wait_timeout)
            .create_timeout(Some(settings.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::new(ErrorKind::Config, format!("cannot build the pool: {e}")))?;
        Ok(Self { pool, canceller })
    }

    /// Takes a connection, waiting at most the pool's wait timeout.
    pub(crate) async fn get(&self) -> Result<Connection> {
        let pool = &self.pool;
        // A free connection is taken without arming the wait timer; only a real wait
        // (all connections busy) is timed.
        let at_once = Timeouts {
            wait: Some(Duration::ZERO),
            ..pool.timeouts()
        };
        let object = match pool.timeout_get(&at_once).await {
            Err(PoolError::Timeout(TimeoutType::Wait)) => pool.get().await?,
            taken => taken?,
        };
        Ok(Connection {
            object: Some(object),
            canceller: self.canceller.clone(),
            in_transaction: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),
        })
    }

    /// Connections open, idle, waited for.
    pub(crate) fn status(&self) -> Status {
        self.pool.status()
    }

    /// Refuses new connections and closes the idle ones; those in use close as they
    /// come back.
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}

/// A connection taken from the pool, returned clean when dropped.
pub(crate) struct Connection {
    object: Option<Object>,
    canceller: Arc<Canceller>,
    in_transaction: AtomicBool,
    unfinished: AtomicBool,
}

impl Connection {
    /// The driver's client with its statement cache.
    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.object
            .as_ref()
            .expect("a connection holds its object until dropped")
    }

    /// Records whether a transaction is open on this connection.
    pub(crate) fn set_in_transaction(&self, open: bool) {
        self.in_transaction.store(open, Ordering::Release);
    }

    /// Records that a request whose answer is read over time (a streamed result) is
    /// open (`true`) or finished (`false`); dropped while open, it is cancelled.
    pub(crate) fn set_request_open(&self, open: bool) {
        self.unfinished.store(open, Ordering::Release);
    }

    /// Whether a request was abandoned (or a streamed one left open): its outcome is
    /// unknown.
    pub(crate) fn has_unfinished_request(&self) -> bool {
        self.unfinished.load(Ordering::Acquire)
    }

    /// Cancels the abandoned request and returns `true` once the server has acted on
    /// it (see [`Canceller`]); `false` when that cannot be known, and the connection must
    /// not be used again.
    pub(crate) async fn cancel_unfinished_request(&self) -> bool {
        self.canceller.cancel(&self.client().cancel_token()).await
    }

    /// Marks a request as started on this connection: if the returned guard is dropped
    /// before [`finish`](RequestGuard::finish) (the request's future was dropped), the
    /// request is cancelled before the connection is reused.
    pub(crate) fn request(&self) -> RequestGuard<'_> {
        RequestGuard {
            unfinished: &self.unfinished,
            finished: false,
        }
    }

    /// Runs `request` under a [`RequestGuard`].
    pub(crate) async fn guarded<F: Future>(&self, request: F) -> F::Output {
        let guard = self.request();
        let output = request.await;
        guard.finish();
        output
    }
}

/// Marks the connection as having an unfinished request unless the request it guards
/// finished.
pub(crate) struct RequestGuard<'a> {
    unfinished: &'a AtomicBool,
    finished: bool,
}

impl RequestGuard<'_> {
    /// The request got its answer.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.unfinished.store(true, Ordering::Release);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        let unfinished = self.unfinished.load(Ordering::Acquire);
        let in_transaction = self.in_transaction.load(Ordering::Acquire);
        if object.is_closed() {
            drop(Object::take(object));
            return;
        }
        if !unfinished && !in_transaction {
            return; // clean: `object` goes back to the pool here
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(restore(object, unfinished, self.canceller.clone()));
            }
            // No runtime to roll back on: closing the session makes the server roll back.
            Err(_) => drop(Object::take(object)),
        }
    }
}

/// Makes a dirty connection safe before it is reused: cancels an unfinished request,
/// then rolls back whatever transaction is open; a connection where that fails is
/// discarded (closing it makes the server roll back).
///
/// The `ROLLBACK` is sent only once the server has signalled the session (see
/// [`Canceller`]), so the cancel cannot reach it or any later request.
async fn restore(object: Object, unfinished: bool, canceller: Arc<Canceller>) {
    if unfinished && !canceller.cancel(&object.cancel_token()).await {
        tracing::debug!(target: "pgengine::pool", "discarding a connection whose request could not be cancelled for sure");
        drop(Object::take(object));
        return;
    }
    match object.batch_execute("ROLLBACK").await {
        Ok(()) => drop(object),
        Err(e) => {
            tracing::debug!(target: "pgengine::pool", error = %e, "discarding a connection that could not be rolled back");
            drop(Object::take(object));
        }
    }
}
