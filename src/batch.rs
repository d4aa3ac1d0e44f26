//! [`AsyncBatch`]: a large result read `batch_size` rows at a time, with memory bounded
//! by the batch size rather than the result size.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use tokio_postgres::{Row, RowStream};

use tracing::{Instrument, Span};

use crate::error::{Error, Result};
use crate::from_row::FromRow;
use crate::query::{CompiledQuery, Query};
use crate::runner::Runner;
use crate::telemetry;

/// The largest `batch_size` (a larger one is an `InvalidInput` error): far more rows than
/// fit in memory at once, and the most one `FETCH` returns.
const MAX_BATCH_SIZE: usize = i32::MAX as usize;

/// The most rows a batch reserves room for up front; a larger batch grows as its rows come.
const RESERVED_ROWS: usize = 1024;

/// The rows of a query, at most `batch_size` at a time.
///
/// - Inside a transaction (`tx.batch(…)`, or `engine.batch(…)` in an ambient one) it
///   declares a server-side cursor in that transaction (so it sees the transaction's
///   uncommitted rows) and `FETCH`es one batch at a time; the transaction stays open,
///   free for other queries between batches. The cursor is closed after the last row;
///   one dropped before that stays open until the transaction ends.
/// - Otherwise it takes a pooled connection and runs the statement in a transaction of
///   its own (the statement's implicit one), reading its portal as the rows arrive: TCP
///   flow control holds the server back while the caller is busy, so memory stays
///   bounded with no round trip per batch. The transaction ends with the last row, and
///   a batch dropped before that has its statement cancelled; either way the connection
///   goes back clean.
///
/// One row is read ahead, which tells the end without an extra empty fetch.
///
/// Inside a transaction the statement must be one a cursor can run (a `SELECT` or
/// `VALUES`): `INSERT … RETURNING` there is the server's error (`42601`), which aborts
/// the transaction; run it with `fetch` instead.
///
/// `batch_size` is 1 to `i32::MAX` (the most rows one `FETCH` returns); 0, or more
/// than that, is an [`InvalidInput`](crate::ErrorKind::InvalidInput) error. Room for
/// at most 1,024 rows is reserved up front, so a huge `batch_size` costs memory only for
/// the rows that actually come.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::TryStreamExt;
/// use pgengine::prelude::*;
/// let mut batch = engine.batch(pgengine::sql!("SELECT * FROM band WHERE popularity > {}", 10), 500).await?;
/// while let Some(rows) = batch.next().await? {
///     for row in rows { let _name: String = row.get("name"); }
/// }
/// // Or as a `Stream`:
/// let batches: Vec<Vec<pgengine::Row>> = engine.batch("SELECT 1", 10).await?.try_collect().await?;
/// # Ok(()) });
/// ```
pub struct AsyncBatch {
    source: Option<Box<Source>>,
    in_flight: Option<Pin<Box<dyn Future<Output = Step> + Send>>>,
}

type Step = (Box<Source>, Result<Option<Vec<Row>>>);

/// Where the rows come from, and the row read ahead.
struct Source {
    runner: Runner,
    rows: Rows,
    batch_size: usize,
    read_ahead: Option<Row>,
    finished: bool,
    /// Rows handed out so far.
    returned: u64,
    /// The batch's span, closed when the source is dropped.
    span: Span,
}

enum Rows {
    /// The statement's own portal, read as its rows arrive.
    Streamed(Pin<Box<RowStream>>),
    /// A cursor in the caller's transaction, read with `FETCH`.
    Cursor { name: String },
}

impl AsyncBatch {
    /// Opens the batch on the connection `runner` gives (checked first, so that bad
    /// input takes no connection).
    pub(crate) async fn open(
        runner: impl Future<Output = Result<Runner>>,
        query: impl Query,
        batch_size: usize,
    ) -> Result<Self> {
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(Error::invalid_input(format!(
                "batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"
            )));
        }
        let statements = query.into_statements();
        let [statement] = &*statements else {
            return Err(Error::invalid_input(format!(
                "a batch streams exactly one statement, the query has {}",
                statements.len()
            )));
        };
        let statement = statement.compile()?;
        let mut runner = runner.await?;
        let span =
            runner
                .context()
                .log
                .telemetry()
                .batch_span(statement.sql(), batch_size, runner.span());
        runner.set_span(span.clone());
        let opened = async {
            match runner.transaction() {
                Some(tx) => {
                    let name = tx.next_cursor_name();
                    declare_cursor(&runner, &name, &statement).await?;
                    Ok(Rows::Cursor { name })
                }
                None => Ok(Rows::Streamed(Box::pin(
                    runner.open_portal(&statement).await?,
                ))),
            }
        };
        let rows = match opened.instrument(span.clone()).await {
            Ok(rows) => rows,
            Err(error) => {
                telemetry::record_error(&span, &error);
                return Err(error);
            }
        };
        Ok(Self {
            source: Some(Box::new(Source {
                runner,
                rows,
                batch_size,
                read_ahead: None,
                finished: false,
                returned: 0,
                span,
            })),
            in_flight: None,
        })
    }

    /// The next batch: `Ok(Some(rows))` with 1 to `batch_size` rows, `Ok(None)` when all
    /// rows were returned. An error of the query (even mid-stream) is returned here.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # use pgengine::prelude::*;
    /// # let mut batch = engine.batch("SELECT * FROM big_table", 1000).await?;
    /// while let Some(rows) = batch.next().await? {
    ///     println!("{} rows", rows.len());
    /// }
    /// # Ok(()) });
    /// ```
    pub async fn next(&mut self) -> Result<Option<Vec<Row>>> {
        futures::future::poll_fn(|cx| self.poll_batch(cx)).await
    }

    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<Row>>>> {
        if self.in_flight.is_none() {
            let Some(mut source) = self.source.take() else {
                return Poll::Ready(Ok(None));
            };
            self.in_flight = Some(Box::pin(async move {
                let span = source.span.clone();
                let batch = source.next_batch().instrument(span).await;
                (source, batch)
            }));
        }
        let in_flight = self.in_flight.as_mut().expect("a step is in flight");
        let (source, batch) = ready!(in_flight.as_mut().poll(cx));
        self.in_flight = None;
        if !source.finished {
            self.source = Some(source); // a finished source gives its connection back here
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

/// An [`AsyncBatch`] whose rows are made into `T` ([`FromRow`]), batch by batch: from
/// [`Executor::batch_as`](crate::Executor::batch_as). A row that cannot be made into
/// `T` is an error naming the column.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let mut batch = engine.batch_as::<(i32, String), _>("SELECT id, payload FROM big_table", 1000).await?;
/// while let Some(rows) = batch.next().await? {
///     for (id, payload) in rows { let _ = (id, payload); }
/// }
/// # Ok(()) });
/// ```
pub struct TypedBatch<T> {
    batch: AsyncBatch,
    rows: PhantomData<fn() -> T>,
}

impl<T: FromRow> TypedBatch<T> {
    pub(crate) fn new(batch: AsyncBatch) -> Self {
        Self {
            batch,
            rows: PhantomData,
        }
    }

    /// The next batch of at most `batch_size` values, or `None` when all were read.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let mut batch = engine.batch_as::<(String,), _>("SELECT name FROM band", 10).await?;
    /// let first: Option<Vec<(String,)>> = batch.next().await?;
    /// # Ok(()) });
    /// ```
    pub async fn next(&mut self) -> Result<Option<Vec<T>>> {
        futures::future::poll_fn(|cx| self.poll_typed(cx)).await
    }

    fn poll_typed(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<T>>>> {
        let rows = ready!(self.batch.poll_batch(cx))?;
        Poll::Ready(
            rows.map(|rows| rows.iter().map(T::from_row).collect())
                .transpose(),
        )
    }
}

impl<T: FromRow> Stream for TypedBatch<T> {
    type Item = Result<Vec<T>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_typed(cx).map(Result::transpose)
    }
}

impl<T> std::fmt::Debug for TypedBatch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TypedBatch").field(&self.batch).finish()
    }
}

impl std::fmt::Debug for AsyncBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncBatch")
            .field("open", &(self.source.is_some() || self.in_flight.is_some()))
            .finish()
    }
}

/// Declares the cursor `name` for `statement` in the runner's transaction, over the
/// extended protocol even without parameters: it runs exactly one statement, so a
/// second one stacked behind a `;` is refused by the server, never run.
async fn declare_cursor(runner: &Runner, name: &str, statement: &CompiledQuery<'_>) -> Result<()> {
    let declare = format!("DECLARE {name} NO SCROLL CURSOR FOR {}", statement.sql());
    if statement.params().is_empty() {
        runner.unprepared(&declare).await.map(drop)
    } else {
        runner
            .execute_one(&declare, statement.params())
            .await
            .map(drop)
    }
}

impl Source {
    /// Up to `batch_size` rows, reading one more ahead to learn whether they are the last.
    async fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        if self.finished {
            return Ok(None);
        }
        let mut batch = Vec::with_capacity(self.batch_size.min(RESERVED_ROWS) + 1);
        batch.extend(self.read_ahead.take());
        let wanted = self.batch_size + 1 - batch.len();
        let ended = match self.read(wanted, &mut batch).await {
            Ok(ended) => ended,
            Err(error) => {
                self.finished = true;
                telemetry::record_error(&self.span, &error);
                return Err(error);
            }
        };
        if batch.len() > self.batch_size {
            self.read_ahead = batch.pop();
        }
        self.returned += batch.len() as u64;
        if ended {
            self.span.record("db.response.returned_rows", self.returned);
            if let Err(error) = self.close().await {
                telemetry::record_error(&self.span, &error);
                return Err(error);
            }
        }
        Ok((!batch.is_empty()).then_some(batch))
    }

    /// Reads up to `wanted` rows into `batch`; true when the result has no more rows.
    async fn read(&mut self, wanted: usize, batch: &mut Vec<Row>) -> Result<bool> {
        match &mut self.rows {
            Rows::Streamed(portal) => self.runner.read_portal(portal, wanted, batch).await,
            Rows::Cursor { name } => {
                // FETCH takes a 32-bit count: at the largest batch size the row read
                // ahead does not fit, and the end shows as an empty fetch instead.
                let count = wanted.min(MAX_BATCH_SIZE);
                let rows = self
                    .runner
                    .unprepared(&format!("FETCH FORWARD {count} FROM {name}"))
                    .await?;
                let ended = rows.len() < count;
                batch.extend(rows);
                Ok(ended)
            }
        }
    }

    /// Ends the read: the streamed statement is complete (its connection is idle again),
    /// or the cursor is closed in the caller's transaction.
    async fn close(&mut self) -> Result<()> {
        self.finished = true;
        match &self.rows {
            Rows::Streamed(_) => Ok(()),
            Rows::Cursor { name } => self.runner.simple(&format!("CLOSE {name}")).await,
        }
    }
}
