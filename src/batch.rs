//! [`AsyncBatch`]: a large result streamed `batch_size` rows at a time through a
//! server-side cursor.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use tokio_postgres::Row;

use crate::engine::PostgresEngine;
use crate::error::{Error, Result};
use crate::executor::{Executor, Lease, compile_all};
use crate::pipeline::send_in_order;
use crate::query::Query;
use crate::transaction::PostgresTransaction;

/// The largest `batch_size`: far more rows than fit in memory at once, and safe to add
/// the one row read ahead to.
const MAX_BATCH_SIZE: usize = i32::MAX as usize;

/// The cursor name of a batch in its own transaction (one cursor per connection then).
const OWN_CURSOR: &str = "pgengine_batch";

/// The rows of a query, at most `batch_size` at a time, from a server-side cursor.
///
/// Inside an ambient transaction it runs in that transaction (and sees its uncommitted
/// rows), leaving it open. Otherwise it takes a pooled connection and its own
/// transaction, which ends as soon as the last rows arrive, or when the batch is
/// dropped; either way the connection goes back clean; there, the next batch is fetched
/// while the caller handles the current one. Memory holds at most two batches (plus one
/// row read ahead, which tells the end without an extra empty fetch), whatever the size
/// of the result.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use futures::TryStreamExt;
/// let mut batch = engine.batch(pgengine::sql!("SELECT * FROM band WHERE popularity > {}", 10), 500).await?;
/// while let Some(rows) = batch.next().await? {
///     for row in rows { let _name: String = row.get("name"); }
/// }
/// // Or as a `Stream`:
/// let batches: Vec<Vec<pgengine::Row>> = engine.batch("SELECT 1", 10).await?.try_collect().await?;
/// # Ok(()) }
/// ```
pub struct AsyncBatch {
    cursor: Option<Box<Cursor>>,
    in_flight: Option<Pin<Box<dyn Future<Output = Step> + Send>>>,
}

type Step = (Box<Cursor>, Result<Option<Vec<Row>>>);
type Fetch = Pin<Box<dyn Future<Output = Result<Vec<Row>>> + Send>>;

struct Cursor {
    lease: Lease,
    name: String,
    batch_size: usize,
    /// Rows read but not yet handed out: at most `batch_size + 1`.
    buffer: Vec<Row>,
    /// A `FETCH` already sent (in the batch's own transaction only), with the number of
    /// rows it asked for: the server reads the next rows while the caller handles the
    /// current batch.
    ahead: Option<(usize, Fetch)>,
    /// The server has sent the last row.
    server_done: bool,
    /// The cursor (and own transaction) is closed.
    closed: bool,
}

impl AsyncBatch {
    pub(crate) async fn open(
        engine: &PostgresEngine,
        query: impl Query,
        batch_size: usize,
    ) -> Result<Self> {
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(Error::invalid_input(format!(
                "batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"
            )));
        }
        let statements = query.into_querystrings();
        if statements.len() != 1 {
            return Err(Error::invalid_input(format!(
                "a batch streams exactly one statement, the query has {}",
                statements.len()
            )));
        }
        let compiled = compile_all(&statements)?;
        let statement = &compiled[0];
        let lease = engine.lease().await?;
        let name = match lease.transaction() {
            Some(tx) => PostgresTransaction::joined(tx.clone()).next_cursor_name(),
            None => OWN_CURSOR.to_owned(),
        };
        let declare = format!("DECLARE {name} NO SCROLL CURSOR FOR {}", statement.sql());
        let first_fetch = format!("FETCH FORWARD {} FROM {name}", batch_size + 1);

        let connection = lease.connection();
        let client = connection.client();
        let own_transaction = lease.transaction().is_none();
        let prepared = if statement.params().is_empty() {
            None
        } else {
            let prepare = connection.guarded(client.prepare_cached(&declare));
            Some(lease.noted(prepare.await.map_err(Error::from))?)
        };
        if own_transaction {
            connection.set_in_transaction(true);
        }
        // BEGIN, DECLARE and the first FETCH go out together.
        type Answer = Result<Option<Vec<Row>>>;
        let mut requests: Vec<Pin<Box<dyn Future<Output = Answer> + Send + '_>>> = Vec::new();
        if own_transaction {
            // Not READ ONLY: the query may call functions that write (`nextval`, …),
            // as the same query through `fetch` may.
            requests.push(Box::pin(async {
                lease.simple("BEGIN").await.map(|()| None)
            }));
        }
        requests.push(match &prepared {
            Some(prepared) => Box::pin(async {
                let execute = client.execute(prepared, statement.params());
                lease
                    .noted(connection.guarded(execute).await.map_err(Error::from))
                    .map(|_| None)
            }),
            None => Box::pin(async { lease.simple(&declare).await.map(|()| None) }),
        });
        requests.push(Box::pin(async {
            lease.fetch_cursor(&first_fetch).await.map(Some)
        }));
        let mut answers = send_in_order(requests).await;
        let first_rows = answers.pop().expect("FETCH was sent");
        for answer in answers {
            answer?;
        }
        let buffer = first_rows?.unwrap_or_default();
        let server_done = buffer.len() <= batch_size;
        Ok(Self {
            cursor: Some(Box::new(Cursor {
                lease: lease.into_shared(),
                name,
                batch_size,
                buffer,
                ahead: None,
                server_done,
                closed: false,
            })),
            in_flight: None,
        })
    }

    /// The next batch: `Ok(Some(rows))` with 1 to `batch_size` rows, `Ok(None)` when all
    /// rows were returned. An error of the query (even mid-stream) is returned here.
    ///
    /// ```no_run
    /// # async fn demo(mut batch: pgengine::AsyncBatch) -> pgengine::Result<()> {
    /// while let Some(rows) = batch.next().await? {
    ///     println!("{} rows", rows.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next(&mut self) -> Result<Option<Vec<Row>>> {
        futures::future::poll_fn(|cx| self.poll_batch(cx)).await
    }

    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<Row>>>> {
        if self.in_flight.is_none() {
            let Some(mut cursor) = self.cursor.take() else {
                return Poll::Ready(Ok(None));
            };
            self.in_flight = Some(Box::pin(async move {
                let batch = cursor.next_batch().await;
                (cursor, batch)
            }));
        }
        let in_flight = self.in_flight.as_mut().expect("a step is in flight");
        let (cursor, batch) = ready!(in_flight.as_mut().poll(cx));
        self.in_flight = None;
        if !cursor.closed {
            self.cursor = Some(cursor);
        }
        Poll::Ready(batch)
    }
}

impl Stream for AsyncBatch {
    type Item = Result<Vec<Row>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx).map(Result::transpose)
    }
}

impl std::fmt::Debug for AsyncBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncBatch")
            .field("open", &(self.cursor.is_some() || self.in_flight.is_some()))
            .finish()
    }
}

impl Cursor {
    async fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        if self.closed {
            return Ok(None);
        }
        if self.buffer.len() <= self.batch_size && !self.server_done {
            let (wanted, fetch) = match self.ahead.take() {
                Some(ahead) => ahead,
                None => self.send_fetch().await,
            };
            match fetch.await {
                Ok(rows) => {
                    self.server_done = rows.len() < wanted;
                    self.buffer.extend(rows);
                }
                Err(error) => {
                    // The query's error is the one to report; a failed rollback leaves
                    // the connection marked, and it is rolled back or discarded on drop.
                    let _ = self.close(false).await;
                    return Err(error);
                }
            }
        }
        if self.buffer.is_empty() {
            self.close(true).await?;
            return Ok(None);
        }
        let rest = if self.buffer.len() > self.batch_size {
            self.buffer.split_off(self.batch_size)
        } else {
            Vec::new()
        };
        let batch = std::mem::replace(&mut self.buffer, rest);
        if !self.server_done {
            // Fetch ahead only in the batch's own transaction: in the caller's, a fetch
            // ahead that failed after the batch was dropped would abort the caller's
            // transaction without anyone seeing the error.
            if self.lease.transaction().is_none() {
                self.ahead = Some(self.send_fetch().await);
            }
        } else if self.buffer.is_empty() {
            self.close(true).await?;
        }
        Ok(Some(batch))
    }

    /// Sends the `FETCH` for the rest of the next batch (and the row read ahead); its
    /// answer is awaited later. Holds at most one batch more in memory.
    ///
    /// (`&mut self` keeps the cursor's future `Send` without asking `Sync` of it.)
    async fn send_fetch(&mut self) -> (usize, Fetch) {
        let wanted = self.batch_size + 1 - self.buffer.len();
        let lease = self.lease.share().expect("a batch holds a shared lease");
        let sql = format!("FETCH FORWARD {wanted} FROM {}", self.name);
        let mut fetch: Fetch = Box::pin(async move { lease.fetch_cursor(&sql).await });
        // The first poll puts the request on the wire.
        if let Poll::Ready(answer) = futures::poll!(fetch.as_mut()) {
            fetch = Box::pin(std::future::ready(answer));
        }
        (wanted, fetch)
    }

    /// Closes the cursor: commits (or, after an error, rolls back) its own transaction,
    /// or closes the cursor inside the ambient one.
    async fn close(&mut self, succeeded: bool) -> Result<()> {
        self.closed = true;
        match self.lease.transaction() {
            Some(tx) if PostgresTransaction::joined(tx.clone()).is_active() && succeeded => {
                self.lease.simple(&format!("CLOSE {}", self.name)).await
            }
            Some(_) => Ok(()),
            None => {
                let end = if succeeded { "COMMIT" } else { "ROLLBACK" };
                self.lease.simple(end).await?;
                self.lease.connection().set_in_transaction(false);
                Ok(())
            }
        }
    }
}
