//! [`Atomic`]: collect queries, then run them all in one transaction, pipelined.

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::blocking;
use crate::context::EngineContext;
use crate::error::Result;
use crate::query::{Query, QueryString};
use crate::runner::{Runner, compile_all};
use crate::transaction::ambient;

/// Queries collected to run all together in one transaction: all are saved or none.
///
/// The statements are sent back to back without waiting for each other's answers, so a
/// bundle costs a few round trips whatever its size. (A parameterized text the
/// connection has not prepared yet is prepared once; a statement may use what an
/// earlier one in the bundle creates.) Inside an ambient transaction the
/// bundle joins it (and rolls back with it). The list is emptied by every run, whether
/// it succeeds or fails. A failing statement rolls back the bundle; the error names it
/// ([`Error::statement`](crate::Error::statement)).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::sql;
/// let mut atomic = engine.atomic();
/// atomic.add("CREATE TABLE fan (name text, favourite text)");
/// for (name, favourite) in [("Ada", "Pythonistas"), ("Grace", "Rustaceans")] {
///     atomic.add(sql!("INSERT INTO fan VALUES ({}, {})", name, favourite));
/// }
/// atomic.run().await?;      // or `atomic.await?`, or `atomic.run_sync()?` from sync code
/// # Ok(()) });
/// ```
#[must_use = "an atomic does nothing until it is run or awaited"]
pub struct Atomic {
    context: Arc<EngineContext>,
    queries: Vec<QueryString>,
}

impl Atomic {
    /// An empty atomic on the engine of `context`.
    pub(crate) fn new(context: Arc<EngineContext>) -> Self {
        Self {
            context,
            queries: Vec::new(),
        }
    }

    /// Adds a query (all its statements).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let mut atomic = engine.atomic();
    /// atomic.add("DELETE FROM band").add(pgengine::sql!("INSERT INTO band (name) VALUES ({})", "x"));
    /// assert_eq!(atomic.len(), 2);
    /// # Ok(()) });
    /// ```
    pub fn add(&mut self, query: impl Query) -> &mut Self {
        self.queries.extend(query.into_querystrings());
        self
    }

    /// Adds several queries at once.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let mut atomic = engine.atomic();
    /// atomic.add_all((0..3).map(|i| pgengine::sql!("INSERT INTO t VALUES ({})", i)));
    /// assert_eq!(atomic.len(), 3);
    /// # Ok(()) });
    /// ```
    pub fn add_all<Q: Query>(&mut self, queries: impl IntoIterator<Item = Q>) -> &mut Self {
        for query in queries {
            self.add(query);
        }
        self
    }

    /// How many statements are waiting to run.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// assert_eq!(engine.atomic().len(), 0);
    /// # Ok(()) });
    /// ```
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// Whether no statement is waiting to run.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// assert!(engine.atomic().is_empty());
    /// # Ok(()) });
    /// ```
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Runs every added statement in one transaction and empties the list.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let mut atomic = engine.atomic();
    /// # atomic.add("DELETE FROM concert");
    /// atomic.run().await?;
    /// assert!(atomic.is_empty());
    /// # Ok(()) });
    /// ```
    pub async fn run(&mut self) -> Result<()> {
        let queries = std::mem::take(&mut self.queries);
        run_all(queries, ambient::runner(&self.context)).await
    }

    /// Runs it from synchronous code, blocking the thread until done; the list is
    /// emptied as by [`run`](Self::run).
    ///
    /// It works from any thread: plain synchronous code, or one inside a tokio runtime
    /// of either flavour. The cost: it runs on a one-thread runtime of pgengine's own,
    /// on connections opened and kept there (a second pool, with the same settings,
    /// opened on first use), so it never joins an ambient transaction (called inside
    /// one, it runs beside it and waits on any row lock that transaction holds: do not
    /// touch the same rows, or it waits forever); called inside a
    /// runtime it also waits from a helper thread, and blocks the calling worker
    /// meanwhile (on a multi-thread runtime, after handing its other tasks away). In
    /// async code, prefer `.await`.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// fn migrate(engine: &pgengine::PostgresEngine) -> pgengine::Result<()> {
    ///     let mut atomic = engine.atomic();
    ///     atomic.add("CREATE TABLE a (id int)").add("CREATE TABLE b (id int)");
    ///     atomic.run_sync()
    /// }
    /// // From synchronous code (here a blocking thread of the runtime):
    /// tokio::task::spawn_blocking(move || migrate(&engine)).await.unwrap()?;
    /// # Ok(()) });
    /// ```
    pub fn run_sync(&mut self) -> Result<()> {
        let queries = std::mem::take(&mut self.queries);
        let context = self.context.clone();
        blocking::block_on(run_all(queries, Runner::for_blocking(context)))?
    }
}

/// Runs `queries` in one transaction on the connection `runner` gives.
async fn run_all(
    queries: Vec<QueryString>,
    runner: impl Future<Output = Result<Runner>>,
) -> Result<()> {
    if queries.is_empty() {
        return Ok(());
    }
    let compiled = compile_all(&queries)?;
    runner.await?.bundle(&compiled).await
}

impl IntoFuture for Atomic {
    type Output = Result<()>;
    type IntoFuture = BoxFuture<'static, Result<()>>;

    /// `atomic.await` runs it.
    fn into_future(mut self) -> Self::IntoFuture {
        Box::pin(async move { self.run().await })
    }
}

impl std::fmt::Debug for Atomic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Atomic")
            .field("queries", &self.queries)
            .finish()
    }
}
