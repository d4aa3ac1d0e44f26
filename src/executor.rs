//! The query methods that the engine and a transaction share: the [`Executor`] trait.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::MutexGuard;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::batch::AsyncBatch;
use crate::engine::EngineShared;
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, Outcome, Want};
use crate::pool::Connection;
use crate::query::{CompiledQuery, OneOrMany, Query, QueryString};
use crate::transaction::{RequestPermit, TxShared};

pub(crate) mod sealed {
    /// Only the engine and transactions run queries.
    pub trait Sealed {}
}

/// Runs queries: implemented by [`PostgresEngine`](crate::PostgresEngine) (inside the
/// ambient transaction when there is one, else on a pooled connection) and by
/// [`PostgresTransaction`](crate::PostgresTransaction) (on its connection).
///
/// A query of several statements runs them all, in order, in one transaction (the
/// current one, or its own), pipelined.
///
/// ```no_run
/// use pgengine::prelude::*;
/// // Works with the engine and inside a transaction alike.
/// async fn count_bands(db: &impl Executor) -> pgengine::Result<i64> {
///     Ok(db.fetch_one("SELECT count(*) FROM band").await?.get(0))
/// }
/// ```
pub trait Executor: sealed::Sealed + Sync {
    /// The connection the next query runs on.
    #[doc(hidden)]
    fn lease(&self) -> impl Future<Output = Result<Lease>> + Send;

    /// Runs the query and returns its rows (of its last statement, for several).
    ///
    /// Every row is held in memory at once: `fetch` puts no bound on the result's size,
    /// and a million rows of 200 bytes take some 300 MiB. For a result that can be
    /// large, [`batch`](Executor::batch) streams it in memory bounded by its batch size.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// for row in engine.fetch(sql!("SELECT name FROM band WHERE popularity > {}", 100)).await? {
    ///     let name: String = row.get("name");
    /// }
    /// # Ok(()) }
    /// ```
    fn fetch<Q: Query>(&self, query: Q) -> impl Future<Output = Result<Vec<Row>>> + Send {
        async move {
            let statements = query.into_statements();
            let compiled = compile_all(&statements)?;
            let lease = self.lease().await?;
            lease.fetch(&compiled).await
        }
    }

    /// Runs the query and returns its only row; no row is [`ErrorKind::RowNotFound`],
    /// several are [`ErrorKind::TooManyRows`].
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let count: i64 = engine.fetch_one("SELECT count(*) FROM band").await?.get(0);
    /// # Ok(()) }
    /// ```
    fn fetch_one<Q: Query>(&self, query: Q) -> impl Future<Output = Result<Row>> + Send {
        async move {
            let mut rows = self.fetch(query).await?;
            match rows.len() {
                1 => Ok(rows.pop().expect("one row")),
                0 => Err(Error::new(
                    ErrorKind::RowNotFound,
                    "fetch_one expected exactly one row, the query returned none",
                )),
                n => Err(Error::new(
                    ErrorKind::TooManyRows,
                    format!("fetch_one expected exactly one row, the query returned {n}"),
                )),
            }
        }
    }

    /// Runs the query and returns its row, or `None` when there is none; several rows
    /// are [`ErrorKind::TooManyRows`].
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let band = engine.fetch_optional(sql!("SELECT * FROM band WHERE name = {}", "Rustaceans")).await?;
    /// # Ok(()) }
    /// ```
    fn fetch_optional<Q: Query>(
        &self,
        query: Q,
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        async move {
            let mut rows = self.fetch(query).await?;
            match rows.len() {
                0 | 1 => Ok(rows.pop()),
                n => Err(Error::new(
                    ErrorKind::TooManyRows,
                    format!("fetch_optional expected at most one row, the query returned {n}"),
                )),
            }
        }
    }

    /// Runs the query and returns the number of rows it affected (summed over its
    /// statements).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let n = engine.execute(sql!("UPDATE band SET popularity = {} WHERE name = {}", 0, "Pythonistas")).await?;
    /// # Ok(()) }
    /// ```
    fn execute<Q: Query>(&self, query: Q) -> impl Future<Output = Result<u64>> + Send {
        async move {
            let statements = query.into_statements();
            let compiled = compile_all(&statements)?;
            let lease = self.lease().await?;
            lease.execute(&compiled).await
        }
    }

    /// Runs DDL: one statement or several separated by `;`, sent as written over the
    /// simple protocol. Several statements outside a transaction run as one implicit
    /// transaction (all or nothing).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// engine.run_ddl("CREATE TABLE band (name text); CREATE INDEX ON band (name)").await?;
    /// # Ok(()) }
    /// ```
    fn run_ddl(&self, ddl: &str) -> impl Future<Output = Result<()>> + Send {
        async move {
            let lease = self.lease().await?;
            lease.simple(ddl).await
        }
    }

    /// Streams the rows of `query`, at most `batch_size` at a time, in bounded memory;
    /// see [`AsyncBatch`]. Inside a transaction (this one, or the ambient one of the
    /// engine) it reads a cursor of that transaction and sees its uncommitted rows.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let mut batch = engine.batch("SELECT * FROM big_table", 1000).await?;
    /// while let Some(rows) = batch.next().await? {
    ///     println!("{} rows", rows.len());
    /// }
    /// let tx = engine.begin().await?;
    /// let mut batch = tx.batch("SELECT * FROM big_table", 1000).await?;
    /// # Ok(()) }
    /// ```
    fn batch<Q: Query>(
        &self,
        query: Q,
        batch_size: usize,
    ) -> impl Future<Output = Result<AsyncBatch>> + Send {
        AsyncBatch::open(self, query, batch_size)
    }

    /// Runs one [`QueryString`] and returns its rows: the seed's name for
    /// [`fetch`](Executor::fetch).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let rows = engine.run_querystring(sql!("SELECT {}::int", 1)).await?;
    /// # Ok(()) }
    /// ```
    fn run_querystring(
        &self,
        querystring: QueryString,
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        self.fetch(querystring)
    }
}

/// Compiles every statement before anything is sent.
pub(crate) fn compile_all(statements: &[QueryString]) -> Result<OneOrMany<CompiledQuery<'_>>> {
    match statements {
        [] => Err(Error::invalid_input("the query has no statement")),
        [one] => Ok(OneOrMany::One(compile(one)?)),
        many => Ok(OneOrMany::Many(
            many.iter().map(compile).collect::<Result<_>>()?,
        )),
    }
}

/// The most parameters one statement can carry: the protocol counts them in 16 bits.
pub const MAX_PARAMETERS: usize = u16::MAX as usize;

/// Compiles one statement, refusing more parameters than the protocol carries.
pub(crate) fn compile(statement: &QueryString) -> Result<CompiledQuery<'_>> {
    let compiled = statement.compile()?;
    let count = compiled.params().len();
    if count > MAX_PARAMETERS {
        return Err(Error::invalid_input(format!(
            "a statement takes at most {MAX_PARAMETERS} parameters (the protocol's limit), \
             this one has {count}; split it, or pass an array parameter"
        )));
    }
    Ok(compiled)
}

/// Sends `request` (polls it once) while holding a transaction's `turn`, so that it
/// reaches the server behind the requests polled before it, then lets the next request
/// send and waits for the answer. Without a turn, just runs it.
async fn sent_in_turn<F: Future>(turn: Option<MutexGuard<'_, ()>>, request: F) -> F::Output {
    let Some(turn) = turn else {
        return request.await;
    };
    let mut request = std::pin::pin!(request);
    if let Poll::Ready(output) = futures::poll!(request.as_mut()) {
        return output;
    }
    drop(turn);
    request.await
}

/// A connection lent for one operation: a pooled one, or the connection of a
/// transaction (whose failures it records).
pub struct Lease {
    engine: Arc<EngineShared>,
    connection: Leased,
    transaction: Option<Arc<TxShared>>,
}

// A lease lives on the stack for one operation; boxing the pooled connection would only
// add an allocation per query.
#[allow(clippy::large_enum_variant)]
enum Leased {
    Pooled(Connection),
    Shared(Arc<Connection>),
}

impl Lease {
    pub(crate) fn pooled(engine: Arc<EngineShared>, connection: Connection) -> Self {
        Self {
            engine,
            connection: Leased::Pooled(connection),
            transaction: None,
        }
    }

    pub(crate) fn in_transaction(
        engine: Arc<EngineShared>,
        connection: Arc<Connection>,
        transaction: Arc<TxShared>,
    ) -> Self {
        Self {
            engine,
            connection: Leased::Shared(connection),
            transaction: Some(transaction),
        }
    }

    pub(crate) fn connection(&self) -> &Connection {
        match &self.connection {
            Leased::Pooled(connection) => connection,
            Leased::Shared(connection) => connection,
        }
    }

    pub(crate) fn engine(&self) -> &EngineShared {
        &self.engine
    }

    /// The transaction this lease runs in, if any.
    pub(crate) fn transaction(&self) -> Option<&Arc<TxShared>> {
        self.transaction.as_ref()
    }

    /// Records a failure on the connection (broken, when it failed) and on the
    /// transaction, which PostgreSQL has now aborted.
    pub(crate) fn noted<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(error) = &result {
            self.connection().note(&result);
            if let Some(transaction) = &self.transaction {
                transaction.note_failure(error);
            }
        }
        result
    }

    /// Admits one request of the lease's transaction (see [`TxShared::admit`]); outside
    /// a transaction there is nothing to wait for.
    pub(crate) async fn admit(&self) -> Result<Option<RequestPermit<'_>>> {
        match &self.transaction {
            Some(transaction) => transaction.admit().await.map(Some),
            None => Ok(None),
        }
    }

    /// The turn to send a request in the lease's transaction, if it has one.
    pub(crate) async fn turn(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.transaction {
            Some(transaction) => Some(transaction.turn().await),
            None => None,
        }
    }

    async fn fetch(&self, statements: &[CompiledQuery<'_>]) -> Result<Vec<Row>> {
        if let [statement] = statements {
            return self.query(statement.sql(), statement.params()).await;
        }
        let outcomes = pipeline::run(self, statements, Want::RowsOfLast).await?;
        match outcomes.into_iter().last() {
            Some(Outcome::Rows(rows)) => Ok(rows),
            _ => Ok(Vec::new()),
        }
    }

    async fn execute(&self, statements: &[CompiledQuery<'_>]) -> Result<u64> {
        if let [statement] = statements {
            return self.execute_sql(statement.sql(), statement.params()).await;
        }
        let outcomes = pipeline::run(self, statements, Want::Counts).await?;
        Ok(outcomes.iter().map(Outcome::count).sum())
    }

    /// Runs SQL over the simple protocol.
    pub(crate) async fn simple(&self, sql: &str) -> Result<()> {
        let _permit = self.admit().await?;
        let turn = self.turn().await;
        let result = sent_in_turn(turn, self.engine.simple(self.connection(), sql)).await;
        self.noted(result)
    }

    /// One statement with its rows, prepared once per connection (statement cache).
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let result = self
            .prepared(sql, params, true)
            .await
            .map(Outcome::into_rows);
        self.noted(result)
    }

    /// One statement, counting the rows it affected.
    pub(crate) async fn execute_sql(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let result = self.prepared(sql, params, false).await.map(|o| o.count());
        self.noted(result)
    }

    /// [`run_prepared`](Self::run_prepared), guarded and watched. (The hot path: no
    /// request future is moved through wrappers, which would copy it whole each time.)
    async fn prepared(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want_rows: bool,
    ) -> Result<Outcome> {
        let _permit = self.admit().await?;
        let watch = self.engine.watch(sql, params);
        let request = self.connection().request();
        let result = self.run_prepared(sql, params, want_rows).await;
        request.finish(&result);
        if let Some(watch) = watch {
            watch.report(&result, |outcome| Some(outcome.count() as usize));
        }
        result
    }

    /// Runs `sql` as a statement prepared once per connection (statement cache),
    /// returning its rows or the count of rows it affected.
    ///
    /// When the server has invalidated a cached statement (a table it reads changed
    /// shape: SQLSTATE 0A000), it is dropped from the cache; outside a transaction the
    /// statement is then prepared and run once more, inside one the error stands (the
    /// transaction is aborted) and the next use prepares it afresh.
    async fn run_prepared(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want_rows: bool,
    ) -> Result<Outcome> {
        let connection = self.connection();
        let client = connection.client();
        let mut retried = false;
        loop {
            // Inside a transaction, a statement not yet prepared is prepared and sent in
            // one turn, so no later request overtakes it.
            let turn = self.turn().await;
            let prepared = if connection.caches_statements() {
                Some(connection.statement(sql).await?)
            } else {
                None
            };
            let request = async {
                match (&prepared, want_rows) {
                    (Some(statement), true) => client
                        .query(statement, params)
                        .await
                        .map(Outcome::Rows)
                        .map_err(Error::from),
                    (Some(statement), false) => client
                        .execute(statement, params)
                        .await
                        .map(Outcome::Count)
                        .map_err(Error::from),
                    // An unnamed statement: parsed, bound and run in one request.
                    (None, true) => connection.query_rows(sql, params).await.map(Outcome::Rows),
                    (None, false) => connection
                        .execute_count(sql, params)
                        .await
                        .map(Outcome::Count),
                }
            };
            match sent_in_turn(turn, request).await {
                Err(error) if self.retry_stale(sql, &error, &mut retried) => {}
                answer => return answer,
            }
        }
    }

    /// After a prepared statement failed: whether to prepare `sql` afresh and run it
    /// once more, because the cached statement outlived its table's shape (SQLSTATE
    /// 0A000, "cached plan must not change result type"). Such a statement is dropped
    /// from the cache either way; it is run again only once, and never inside a
    /// transaction (which the error aborted).
    pub(crate) fn retry_stale(&self, sql: &str, error: &Error, retried: &mut bool) -> bool {
        let stale = error.database_error().is_some_and(|db| {
            db.code == tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED.code()
                && db.message.contains("cached plan")
        });
        if !stale {
            return false;
        }
        self.connection().forget_statement(sql);
        let again = !*retried && self.transaction.is_none();
        *retried = true;
        again
    }

    /// One statement without parameters (a cursor's `DECLARE` or `FETCH`) over the
    /// extended protocol, which runs exactly one statement; not prepared (one round
    /// trip, nothing cached).
    pub(crate) async fn unprepared(&self, sql: &str) -> Result<Vec<Row>> {
        let _permit = self.admit().await?;
        let connection = self.connection();
        let request = connection.guarded(async {
            connection
                .client()
                .query_typed(sql, &[])
                .await
                .map_err(Error::from)
        });
        let observed = self
            .engine
            .observe(sql, &[], request, |rows| Some(rows.len()));
        let result = sent_in_turn(self.turn().await, observed).await;
        self.noted(result)
    }
}
