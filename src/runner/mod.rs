//! The runner: sends statements on one connection — alone, pipelined in a bundle, or
//! as a portal read over time — and records how each request ended.
//!
//! A [`Runner`] is lent for one operation: a pooled connection, or the connection of a
//! transaction. Every request goes through one of its methods, and each of those passes
//! its result through the connection's and the transaction's state before handing it
//! back: a failure cannot reach the caller without marking a failed connection broken
//! and the transaction aborted (so a later `COMMIT` is refused). That recording step is
//! private to this module and its children; nothing else can send without it.

mod client;
mod copy;
mod pipeline;

use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::MutexGuard;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, RowStream, Statement};
use tracing::Span;

use crate::context::EngineContext;
use crate::error::{Error, Result};
use crate::multiplex::Ticket;
use crate::pool::Connection;
use crate::query::{CompiledQuery, OneOrMany, QueryString};
use crate::telemetry;
use crate::transaction::state::{RequestPermit, TxShared};

use pipeline::{Outcome, Want};

/// Compiles every statement before anything is sent.
pub(crate) fn compile_all(statements: &[QueryString]) -> Result<OneOrMany<CompiledQuery<'_>>> {
    match statements {
        [] => Err(Error::invalid_input("the query has no statement")),
        [one] => Ok(OneOrMany::One(one.compile()?)),
        many => Ok(OneOrMany::Many(
            many.iter()
                .map(QueryString::compile)
                .collect::<Result<_>>()?,
        )),
    }
}

/// Sends `request` (polls it once) while holding a transaction's `turn`, so that it
/// reaches the server behind the requests polled before it, then lets the next request
/// send and waits for the answer. Without a turn, just runs it. (The request is pinned
/// by the caller: it lives once, in the caller's future, not again in this one.)
///
/// A first poll that is pending has registered the request's wake-up: the turn is
/// given up and the task yields, rather than polling the request again at once (which
/// would only find it pending once more: a wasted poll per statement).
async fn sent_in_turn<F: Future>(
    mut turn: Option<MutexGuard<'_, ()>>,
    mut request: std::pin::Pin<&mut F>,
) -> F::Output {
    std::future::poll_fn(move |cx| {
        let polled = request.as_mut().poll(cx);
        drop(turn.take());
        polled
    })
    .await
}

/// Runs statements on one connection for one operation: a pooled connection, or the
/// connection of a transaction (whose failures it records).
pub struct Runner {
    context: Arc<EngineContext>,
    connection: Lent,
    transaction: Option<Arc<TxShared>>,
    /// The span its requests' spans are children of, when not the transaction's (a
    /// batch's; boxed: a runner is moved whole on every query's path).
    span: Option<Box<Span>>,
}

// A runner lives on the stack for one operation; boxing the pooled connection would
// only add an allocation per query.
#[allow(clippy::large_enum_variant)]
enum Lent {
    Pooled(Connection),
    /// A transaction's connection.
    Shared(Arc<Connection>),
    /// A place in the queue of a connection shared with other callers (multiplexing).
    Multiplexed(Ticket),
}

/// What a statement is run for: its rows, its first row, or the count of rows it
/// affected.
pub(crate) trait Answer: Sized + Send {
    /// What a pipeline of several statements keeps of their outcomes.
    const WANT: Want;

    /// The answer of several statements run in one pipeline.
    fn of_outcomes(outcomes: Vec<Outcome>) -> Result<Self>;

    /// Runs a prepared statement.
    fn prepared<'a>(
        client: &'a Client,
        statement: &'a Statement,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Self>> + Send + 'a;

    /// Runs an unnamed statement (parsed, bound and run in one request).
    fn unnamed<'a>(
        connection: &'a Connection,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Self>> + Send + 'a;

    /// The rows it returned or counted, for the query log.
    fn row_count(&self) -> usize;
}

impl Answer for Vec<Row> {
    const WANT: Want = Want::RowsOfLast;

    fn of_outcomes(outcomes: Vec<Outcome>) -> Result<Self> {
        match outcomes.into_iter().last() {
            Some(Outcome::Rows(rows)) => Ok(rows),
            _ => Ok(Vec::new()),
        }
    }

    async fn prepared(
        client: &Client,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        Ok(client.query(statement, params).await?)
    }

    async fn unnamed(
        connection: &Connection,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        connection.query_rows(sql, params).await
    }

    fn row_count(&self) -> usize {
        self.len()
    }
}

impl Answer for u64 {
    const WANT: Want = Want::Counts;

    fn of_outcomes(outcomes: Vec<Outcome>) -> Result<Self> {
        Ok(outcomes.iter().map(Outcome::count).sum())
    }

    async fn prepared(
        client: &Client,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        Ok(client.execute(statement, params).await?)
    }

    async fn unnamed(
        connection: &Connection,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        connection.execute_count(sql, params).await
    }

    fn row_count(&self) -> usize {
        *self as usize
    }
}

/// The first row a statement returned, and how many it returned: what `fetch_one` and
/// `fetch_optional` need, read without collecting the rows (the others are counted,
/// then dropped).
pub(crate) struct FirstRow {
    pub(crate) row: Option<Row>,
    pub(crate) count: usize,
}

impl FirstRow {
    fn of(mut rows: Vec<Row>) -> Self {
        let count = rows.len();
        rows.truncate(1);
        Self {
            row: rows.pop(),
            count,
        }
    }
}

impl Answer for FirstRow {
    const WANT: Want = Want::RowsOfLast;

    fn of_outcomes(outcomes: Vec<Outcome>) -> Result<Self> {
        Vec::<Row>::of_outcomes(outcomes).map(Self::of)
    }

    async fn prepared(
        client: &Client,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        let rows = client.query_raw(statement, params.iter().copied()).await?;
        let mut rows = std::pin::pin!(rows);
        let mut first = Self {
            row: None,
            count: 0,
        };
        while let Some(row) = rows.next().await.transpose()? {
            if first.row.is_none() {
                first.row = Some(row);
            }
            first.count += 1;
        }
        Ok(first)
    }

    async fn unnamed(
        connection: &Connection,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Self> {
        connection.query_rows(sql, params).await.map(Self::of)
    }

    fn row_count(&self) -> usize {
        self.count
    }
}

impl Runner {
    /// A runner on a connection taken from a pool of `context`.
    pub(crate) fn pooled(context: Arc<EngineContext>, connection: Connection) -> Self {
        Self {
            context,
            connection: Lent::Pooled(connection),
            transaction: None,
            span: None,
        }
    }

    /// A runner for one statement on a shared connection (see
    /// [`multiplex`](crate::multiplex)).
    pub(crate) fn multiplexed(context: Arc<EngineContext>, ticket: Ticket) -> Self {
        Self {
            context,
            connection: Lent::Multiplexed(ticket),
            transaction: None,
            span: None,
        }
    }

    /// A runner on the connection of `transaction`, unless it is finished.
    pub(crate) fn in_transaction(transaction: &Arc<TxShared>) -> Result<Self> {
        Ok(Self {
            context: transaction.context().clone(),
            connection: Lent::Shared(transaction.active_connection()?),
            transaction: Some(transaction.clone()),
            span: None,
        })
    }

    /// A runner for `run_sync`: on the pool that pgengine's own runtime drives.
    pub(crate) async fn for_blocking(context: Arc<EngineContext>) -> Result<Self> {
        let connection = context.sync_pool.get().await?;
        Ok(Self::pooled(context, connection))
    }

    pub(crate) fn connection(&self) -> &Connection {
        match &self.connection {
            Lent::Pooled(connection) => connection,
            Lent::Shared(connection) => connection,
            Lent::Multiplexed(ticket) => ticket.connection(),
        }
    }

    pub(crate) fn context(&self) -> &EngineContext {
        &self.context
    }

    /// Makes `span` the parent of the spans of the runner's requests.
    pub(crate) fn set_span(&mut self, span: Span) {
        self.span = Some(Box::new(span));
    }

    /// The parent of the spans of the runner's requests: its own, else its
    /// transaction's, else (`None`) the current span.
    pub(crate) fn span(&self) -> Option<&Span> {
        self.span
            .as_deref()
            .or_else(|| self.transaction.as_ref().map(|tx| tx.span()))
    }

    /// The transaction this runner runs in, if any.
    pub(crate) fn transaction(&self) -> Option<&Arc<TxShared>> {
        self.transaction.as_ref()
    }

    /// Records a failure on the connection (broken, when it failed) and on the
    /// transaction, which PostgreSQL has now aborted. Every result of a request passes
    /// through here.
    fn noted<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(error) = &result {
            self.connection().note(&result);
            if let Some(transaction) = &self.transaction {
                transaction.note_failure(error);
            }
        }
        result
    }

    /// Admits one request of the runner's transaction (see [`TxShared::admit`]);
    /// outside a transaction there is nothing to wait for.
    async fn admit(&self) -> Result<Option<RequestPermit<'_>>> {
        match &self.transaction {
            Some(transaction) => transaction.admit().await.map(Some),
            None => Ok(None),
        }
    }

    /// The turn to send a request in the runner's transaction, if it has one.
    async fn turn(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.transaction {
            Some(transaction) => Some(transaction.turn().await),
            None => None,
        }
    }

    /// Runs several statements in one transaction (the runner's, or their own),
    /// pipelined, for the answer `A` of the last one (a count: of them all). Boxed: a
    /// single statement's future ([`prepared`](Self::prepared)), the usual one, stays
    /// small.
    pub(crate) fn pipelined<'a, A: Answer>(
        &'a self,
        statements: &'a [CompiledQuery<'_>],
    ) -> BoxFuture<'a, Result<A>> {
        Box::pin(async move { A::of_outcomes(pipeline::run(self, statements, A::WANT).await?) })
    }

    /// Runs the statements, however many, in one transaction (the runner's, or their
    /// own), pipelined: an atomic bundle.
    pub(crate) async fn bundle(&self, statements: &[CompiledQuery<'_>]) -> Result<()> {
        pipeline::run(self, statements, Want::Counts)
            .await
            .map(drop)
    }

    /// Runs `sql` once for each of `rows`, in one transaction, as one pipeline (see
    /// [`Executor::execute_many`](crate::Executor::execute_many)).
    pub(crate) async fn execute_many<'a>(
        &self,
        sql: &str,
        rows: &[impl AsRef<[&'a (dyn ToSql + Sync)]> + Sync],
    ) -> Result<u64> {
        pipeline::run_many(self, sql, rows).await
    }

    /// Runs SQL over the simple protocol.
    pub(crate) async fn simple(&self, sql: &str) -> Result<()> {
        let _permit = self.admit().await?;
        let turn = self.turn().await;
        let untraced = Span::none();
        let span = self.span().unwrap_or(&untraced);
        let request = std::pin::pin!(telemetry::in_span(
            span,
            self.context.run_simple(self.connection(), sql)
        ));
        let result = sent_in_turn(turn, request).await;
        self.noted(result)
    }

    /// One statement with parameters, counting the rows it affected.
    pub(crate) async fn execute_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.prepared(sql, params).await
    }

    /// One statement, prepared once per connection (statement cache), guarded, logged
    /// and noted. (The hot path: one state machine, and no request future is moved
    /// through wrappers, which would copy it whole each time.)
    ///
    /// When the server has invalidated a cached statement (a table it reads changed
    /// shape: SQLSTATE 0A000) or no longer has it (26000), it is dropped from the cache;
    /// outside a transaction the statement is then prepared and run once more, inside
    /// one the error stands (the transaction is aborted) and the next use prepares it
    /// afresh.
    pub(crate) async fn prepared<A: Answer>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<A> {
        // (Inline, not `admit`: no nested future on the hot path outside a transaction.
        // The permit is released after the result is noted, so a commit waiting for it
        // sees the failure.)
        let _permit = match &self.transaction {
            Some(transaction) => match transaction.admit().await {
                Ok(permit) => Some(permit),
                Err(error) => return self.noted(Err(error)),
            },
            None => None,
        };
        let watch = self.context.log.watch(sql, params, self.span());
        let connection = self.connection();
        let guard = connection.request();
        let mut retried = false;
        let result = loop {
            // Inside a transaction, a statement not yet prepared is prepared and sent in
            // one turn, so no later request overtakes it.
            // (The turn is held across the prepare round trip; `sent_in_turn` gives it
            // up once the request itself is on the wire.)
            let turn = match &self.transaction {
                Some(transaction) => Some(transaction.turn().await),
                None => None,
            };
            let statement = match connection.caches_statements() {
                true => Some(connection.statement(sql).await),
                false => None,
            };
            let request = std::pin::pin!(async {
                match statement {
                    Some(statement) => A::prepared(connection.client(), &statement?, params).await,
                    None => A::unnamed(connection, sql, params).await,
                }
            });
            let answer = match turn {
                // Outside a transaction, awaited here: no `sent_in_turn` future between.
                None => request.await,
                turn => sent_in_turn(turn, request).await,
            };
            match answer {
                Err(error) if self.retry_stale(sql, &error, &mut retried) => {}
                answer => break answer,
            }
        };
        guard.answered(&result);
        if let Lent::Multiplexed(ticket) = &self.connection {
            ticket.answered();
        }
        if result.is_ok() {
            connection.ran_statement(sql);
        }
        if let Some(watch) = watch {
            watch.report(result.as_ref(), |answer| Some(answer.row_count()));
        }
        self.noted(result)
    }

    /// After a prepared statement failed: whether to prepare `sql` afresh and run it
    /// once more, because the cached statement is stale (see
    /// [`forget_if_stale`](Self::forget_if_stale)). It is run again only once, and never
    /// inside a transaction (which the error aborted).
    fn retry_stale(&self, sql: &str, error: &Error, retried: &mut bool) -> bool {
        if !self.forget_if_stale(sql, error) {
            return false;
        }
        let again = !*retried && self.transaction.is_none();
        *retried = true;
        again
    }

    /// Drops what `error` says is stale from the statement cache; whether it did. A
    /// statement that outlived its table's shape (SQLSTATE 0A000, "cached plan must not
    /// change result type") is dropped alone; a statement the server no longer has
    /// (26000: deallocated where the engine could not see, such as `DEALLOCATE ALL` run
    /// by a function) means any of the connection's may be gone, so its cache is
    /// emptied (the other connections' statements stand: a session deallocates only its
    /// own).
    fn forget_if_stale(&self, sql: &str, error: &Error) -> bool {
        use tokio_postgres::error::SqlState;
        let Some(db) = error.database_error() else {
            return false;
        };
        let connection = self.connection();
        if db.code == SqlState::FEATURE_NOT_SUPPORTED.code() && db.message.contains("cached plan") {
            connection.forget_statement(sql);
            true
        } else if db.code == SqlState::INVALID_SQL_STATEMENT_NAME.code()
            && connection.caches_statements()
        {
            connection.forget_all_statements();
            true
        } else {
            false
        }
    }

    /// One statement without parameters (a cursor's `DECLARE` or `FETCH`) over the
    /// extended protocol, which runs exactly one statement; not prepared (one round
    /// trip, nothing cached).
    pub(crate) async fn unprepared(&self, sql: &str) -> Result<Vec<Row>> {
        let result = async {
            let _permit = self.admit().await?;
            let turn = self.turn().await;
            let connection = self.connection();
            let request = connection.guarded(async {
                connection
                    .client()
                    .query_typed(sql, &[])
                    .await
                    .map_err(Error::from)
            });
            let observed = self
                .context
                .log
                .observe(sql, &[], self.span(), request, |rows| Some(rows.len()));
            sent_in_turn(turn, std::pin::pin!(observed)).await
        }
        .await;
        self.noted(result)
    }

    /// Starts `statement` as a portal on the runner's pooled connection; its rows are
    /// read later with [`read_portal`](Self::read_portal). Until the last row is read,
    /// the request stays open: dropped before that, it is cancelled.
    pub(crate) async fn open_portal(&self, statement: &CompiledQuery<'_>) -> Result<RowStream> {
        let connection = self.connection();
        let start = async {
            let mut retried = false;
            loop {
                match connection
                    .query_stream(statement.sql(), statement.params())
                    .await
                {
                    Err(error) if self.retry_stale(statement.sql(), &error, &mut retried) => {}
                    started => return started,
                }
            }
        };
        let stream = self.noted(connection.guarded(start).await)?;
        connection.set_request_open(true);
        Ok(stream)
    }

    /// Reads up to `wanted` rows of a portal into `batch`; true when it has no more
    /// rows (the request is then finished). An error of the statement ends it too; after
    /// any other failure the request is left open, to be cancelled when dropped.
    pub(crate) async fn read_portal(
        &self,
        portal: &mut std::pin::Pin<Box<RowStream>>,
        wanted: usize,
        batch: &mut Vec<Row>,
    ) -> Result<bool> {
        let before = batch.len();
        let read = async {
            while batch.len() - before < wanted {
                match portal.next().await {
                    Some(row) => batch.push(row?),
                    None => return Ok(true),
                }
            }
            Ok(false)
        };
        let result: Result<bool> = read.await;
        match &result {
            Ok(true) => self.connection().set_request_open(false),
            Err(error) if error.database_error().is_some() => {
                // The server ended the statement it reported an error for.
                self.connection().set_request_open(false);
            }
            _ => {}
        }
        self.noted(result)
    }
}
