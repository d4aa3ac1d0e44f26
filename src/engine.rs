//! [`PostgresEngine`]: the entry point. Owns the pool and routes every query to the
//! ambient transaction's connection when there is one, else to a pooled connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::atomic::Atomic;
use crate::config::{EngineBuilder, EngineSettings};
use crate::context::EngineContext;
use crate::counters::Counter;
use crate::error::{Error, ErrorKind, Result};
use crate::executor::{Executor, sealed};
use crate::identifier::quote_identifier;
use crate::listener::{self, Listener};
use crate::multiplex::SharedConnectionStatus;
use crate::query::CompiledQuery;
use crate::runner::Runner;
use crate::transaction::{PostgresTransaction, TransactionBuilder, ambient};
use crate::version::ServerVersion;

/// An async PostgreSQL engine: a connection pool plus transactions, savepoints, atomic
/// bundles and batched streaming. Cheap to clone; clones share the pool.
///
/// ```no_run
/// # async fn demo() -> pgengine::Result<()> {
/// use pgengine::prelude::*;
/// let engine = PostgresEngine::connect("postgres://postgres@localhost/app").await?;
/// engine.run_ddl("CREATE TABLE IF NOT EXISTS band (name text PRIMARY KEY, popularity int)").await?;
/// engine.execute(sql!("INSERT INTO band VALUES ({}, {})", "Pythonistas", 1000)).await?;
/// let rows = engine.fetch(sql!("SELECT name FROM band WHERE popularity > {}", 100)).await?;
/// let name: &str = rows[0].get(0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresEngine {
    context: Arc<EngineContext>,
    /// Statements through this handle never share a connection (see
    /// [`exclusive`](Self::exclusive)).
    exclusive: bool,
}

impl PostgresEngine {
    /// A builder for every setting; see [`EngineBuilder`].
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let engine = pgengine::PostgresEngine::builder()
    ///     .url("postgres://postgres@localhost/app")
    ///     .max_connections(4)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    /// An engine for the server at `url`, with default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let engine = pgengine::PostgresEngine::connect("postgres://postgres@localhost/app").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        EngineBuilder::new().url(url).build().await
    }

    /// An engine for the server named by the `DATABASE_URL` environment variable, else
    /// by libpq's variables (`PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
    /// `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`,
    /// `PGCHANNELBINDING`, `PGAPPNAME`, `PGOPTIONS`, `PGCONNECT_TIMEOUT`,
    /// `PGTARGETSESSIONATTRS`, `PGLOADBALANCEHOSTS`, …), with default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let engine = pgengine::PostgresEngine::from_env().await?;
    /// # Ok(()) }
    /// ```
    pub async fn from_env() -> Result<Self> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .or_else(crate::config::from_environment)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "neither DATABASE_URL (e.g. postgres://user@host/dbname) nor any of libpq's \
                     variables (PGHOST, PGUSER, PGDATABASE, ...) is set",
                )
            })?;
        Self::connect(&url).await
    }

    /// Creates the pool, checks the server version and prepares the database.
    async fn open(
        pg: tokio_postgres::Config,
        settings: EngineSettings,
        nodes: BTreeMap<String, Arc<EngineContext>>,
        replicas: Vec<Arc<EngineContext>>,
    ) -> Result<Self> {
        let context = EngineContext::new(pg, settings)?.with_others(nodes, replicas);
        let engine = Self {
            context: Arc::new(context),
            exclusive: false,
        };
        let version = engine.get_version().await?;
        if version < ServerVersion::MINIMUM_SUPPORTED {
            tracing::warn!(
                target: "pgengine",
                %version,
                minimum = %ServerVersion::MINIMUM_SUPPORTED,
                "the server is older than the oldest version pgengine supports"
            );
        }
        engine.prep_database().await?;
        Ok(engine)
    }

    /// The named node `name` (see [`EngineBuilder::extra_node`]): an engine handle whose
    /// queries, transactions, atomics and batches run on that node's pool; `None` for a
    /// name not configured. A transaction of the engine and one of its node are two
    /// transactions, on two servers: a query through the node never joins the engine's
    /// ambient transaction.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// assert!(engine.node("read_1").is_none());
    /// # Ok(()) });
    /// ```
    pub fn node(&self, name: &str) -> Option<PostgresEngine> {
        let context = self.context.nodes.get(name)?;
        Some(PostgresEngine {
            context: context.clone(),
            exclusive: self.exclusive,
        })
    }

    /// A handle for read-only work on a read replica (see
    /// [`EngineBuilder::read_replica`]), picked by the engine's policy; the engine
    /// itself when it has no replica or none is fit (down, or lagging beyond the bound).
    /// Writes through it fail on a replica (SQLSTATE 25006).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let reader = engine.replica().await;   // here: no replica, so the engine itself
    /// let bands: i64 = reader.fetch_one("SELECT count(*) FROM band").await?.get(0);
    /// # Ok(()) });
    /// ```
    pub async fn replica(&self) -> PostgresEngine {
        let context = match self.context.replica_for_reads().await {
            Some((replica, _connection)) => replica,
            None => self.context.clone(),
        };
        PostgresEngine {
            context,
            exclusive: self.exclusive,
        }
    }

    /// A handle on the same engine whose statements each take a connection of their
    /// own, never one shared with other callers (see [`EngineBuilder::multiplex`]): for
    /// long statements, which would hold up the statements queued behind them, and for
    /// what the engine cannot judge, such as a call of your own function that changes
    /// a session setting. Without multiplexing, it changes nothing.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let report = engine.exclusive().fetch("SELECT count(*) FROM band").await?;
    /// # Ok(()) });
    /// ```
    pub fn exclusive(&self) -> PostgresEngine {
        PostgresEngine {
            context: self.context.clone(),
            exclusive: true,
        }
    }

    /// Renews every prepared statement of the engine's connections at its next use:
    /// call it after the schema was changed by someone else (a migration run by another
    /// process, say). Changes made through the engine renew them by themselves.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// // … another service ran ALTER TABLE band …
    /// engine.clear_statement_cache();
    /// # Ok(()) });
    /// ```
    pub fn clear_statement_cache(&self) {
        let contexts = std::iter::once(&self.context)
            .chain(self.context.nodes.values())
            .chain(&self.context.replicas);
        for context in contexts {
            context.pool.forget_statements();
            context.sync_pool.forget_statements();
        }
    }

    /// Listens on `channels` (`LISTEN`, names validated and quoted): a [`Listener`]
    /// stream of their notifications, on a connection of its own outside the pool. It
    /// reconnects by itself when that connection dies, and then yields
    /// [`ListenEvent::Reconnected`](crate::ListenEvent::Reconnected), since notifications
    /// sent meanwhile are lost. Dropping it closes the connection.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use futures::StreamExt;
    /// use pgengine::prelude::*;
    /// let mut listener = engine.listen(["band_changes"]).await?;
    /// engine.execute("NOTIFY band_changes, 'added'").await?;
    /// let event = listener.next().await.expect("the stream goes on")?;
    /// assert!(matches!(event, pgengine::ListenEvent::Notification(n) if n.payload == "added"));
    /// # Ok(()) });
    /// ```
    pub async fn listen<I, S>(&self, channels: I) -> Result<Listener>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let channels = channels.into_iter().map(Into::into).collect();
        listener::listen(self.context.clone(), channels).await
    }

    /// Opens every connection of the pool up front, so that no query pays for a
    /// handshake: the shared connections first (with multiplexing), then the others.
    /// Only the missing ones are opened, and connections in use are not waited for:
    /// calling it again, or while queries run, is harmless.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// engine.start_connection_pool().await?;
    /// assert_eq!(engine.pool_status().size, engine.pool_status().max_size);
    /// # Ok(()) });
    /// ```
    pub async fn start_connection_pool(&self) -> Result<()> {
        self.context
            .multiplexer
            .open_all(&self.context.pool)
            .await?;
        // Holding every idle connection and as many new ones as are missing makes the
        // pool open the missing ones; none of these takes waits for a busy connection.
        let pool = &self.context.pool;
        let status = pool.status();
        let free = status.available + status.max_size.saturating_sub(status.size);
        let held = futures::future::join_all((0..free).map(|_| pool.get_free())).await;
        let mut first_error = None;
        for taken in held {
            if let Err(error) = taken {
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) if error.kind() != ErrorKind::PoolTimeout => Err(error),
            _ => Ok(()),
        }
    }

    /// Closes the pool: new queries fail at once with [`ErrorKind::Closed`], and idle
    /// connections are closed. Connections in use are not interrupted: a transaction
    /// open now may still commit, and its connection is closed when it comes back. This
    /// waits for them to come back at most the pool's wait timeout (30 s by default),
    /// so a caller that holds a transaction itself does not wait forever. Closing is
    /// final: build a new engine to connect again. Calling it twice is harmless.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine.close_connection_pool().await;
    /// assert_eq!(engine.fetch("SELECT 1").await.unwrap_err().kind(), pgengine::ErrorKind::Closed);
    /// # Ok(()) });
    /// ```
    pub async fn close_connection_pool(&self) {
        let contexts: Vec<_> = std::iter::once(&self.context)
            .chain(self.context.nodes.values())
            .chain(&self.context.replicas)
            .collect();
        for context in &contexts {
            context.multiplexer.close();
        }
        let pools: Vec<_> = contexts
            .iter()
            .flat_map(|context| [&context.pool, &context.sync_pool])
            .collect();
        for pool in &pools {
            pool.close();
        }
        let bound = self
            .context
            .settings
            .pool_wait_timeout
            .unwrap_or(Duration::from_secs(30));
        let deadline = Instant::now() + bound;
        while pools.iter().any(|pool| pool.status().size > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The pool's size now: connections open, idle, and the most it holds.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let status = engine.pool_status();
    /// println!("{} of {} connections open, {} idle", status.size, status.max_size, status.available);
    /// # Ok(()) });
    /// ```
    pub fn pool_status(&self) -> PoolStatus {
        let status = self.context.pool.status();
        let counters = self.context.pool.counters();
        let count = |counter| counters.get(counter);
        let shared = self.context.multiplexer.status();
        PoolStatus {
            shared: shared.len(),
            shared_in_flight: shared.iter().map(|s| s.in_flight).sum(),
            shared_stalled: shared.iter().filter(|s| s.stalled).count(),
            multiplexed: count(Counter::Multiplexed),
            multiplex_overflows: count(Counter::MultiplexOverflows),
            max_size: status.max_size,
            size: status.size,
            available: status.available,
            waiting: status.waiting,
            waits: count(Counter::Waits),
            wait_time: Duration::from_micros(count(Counter::WaitMicros)),
            timeouts: count(Counter::Timeouts),
            created: count(Counter::Created),
            closed_max_lifetime: count(Counter::ClosedMaxLifetime),
            closed_idle: count(Counter::ClosedIdle),
            closed_unhealthy: count(Counter::ClosedUnhealthy),
            closed_broken: count(Counter::ClosedBroken),
        }
    }

    /// What each shared connection is doing (see [`EngineBuilder::multiplex`]): its
    /// requests in flight, and whether it is stalled. Empty without multiplexing.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let queued: usize = engine.shared_connections().iter().map(|s| s.in_flight).sum();
    /// # Ok(()) });
    /// ```
    pub fn shared_connections(&self) -> Vec<SharedConnectionStatus> {
        self.context.multiplexer.status()
    }

    /// The server's version, e.g. `16.10`.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let version = engine.get_version().await?;
    /// assert!(version.major >= 12);
    /// # Ok(()) });
    /// ```
    pub async fn get_version(&self) -> Result<ServerVersion> {
        let row = self.fetch_one("SHOW server_version").await?;
        row.try_get::<_, String>(0).map_err(Error::from)?.parse()
    }

    /// Runs `f` with the driver's [`Client`](tokio_postgres::Client) on a pooled
    /// connection: the way down for what the engine does not cover, such as refinery's
    /// migrations or code generated for tokio-postgres. The engine keeps the
    /// connection's hygiene: the statement caches are renewed afterwards (`f` may have
    /// changed the schema), a transaction `f` left open is rolled back before the
    /// connection is reused, and dropped half-way, `f`'s request is cancelled.
    ///
    /// Inside the engine's ambient transaction it is a
    /// [`Transaction`](ErrorKind::Transaction) error (`f` would run outside that
    /// transaction): use [`PostgresTransaction::with_client`] there.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let names = engine
    ///     .with_client(|client| Box::pin(async move {
    ///         let rows = client.query("SELECT name FROM band ORDER BY name", &[]).await?;
    ///         Ok::<_, pgengine::Error>(rows.iter().map(|row| row.get(0)).collect::<Vec<String>>())
    ///     }))
    ///     .await?;
    /// assert_eq!(names, ["Pythonistas", "Rustaceans"]);
    /// # Ok(()) });
    /// ```
    ///
    /// refinery's migrations take the client as it is:
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// type BoxError = Box<dyn std::error::Error + Send + Sync>;
    /// // Or `refinery::embed_migrations!("migrations")` and `migrations::runner()`.
    /// let migrations = [refinery::Migration::unapplied("V1__venue", "CREATE TABLE venue (name text)").unwrap()];
    /// let report = engine
    ///     .with_client(|client| Box::pin(async move {
    ///         Ok::<_, BoxError>(refinery::Runner::new(&migrations).run_async(client).await?)
    ///     }))
    ///     .await
    ///     .expect("migrations");
    /// assert_eq!(report.applied_migrations().len(), 1);
    /// engine.execute("INSERT INTO venue (name) VALUES ('Hall')").await?;
    /// # Ok(()) });
    /// ```
    pub async fn with_client<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: for<'c> FnOnce(
            &'c mut tokio_postgres::Client,
        ) -> futures::future::BoxFuture<'c, std::result::Result<T, E>>,
        E: From<Error>,
    {
        sealed::Sealed::runner(self).await?.with_client_mut(f).await
    }

    /// Creates each configured extension that is missing (`CREATE EXTENSION IF NOT
    /// EXISTS`). Lacking the privilege to do so is a `WARN`, not an error.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// engine.prep_database().await?;
    /// # Ok(()) });
    /// ```
    pub async fn prep_database(&self) -> Result<()> {
        for extension in &self.context.settings.extensions {
            let ddl = format!(
                "CREATE EXTENSION IF NOT EXISTS {}",
                quote_identifier(extension)?
            );
            match self.run_ddl(&ddl).await {
                Ok(()) => {}
                Err(e) if e.code() == Some("42501") => tracing::warn!(
                    target: "pgengine",
                    extension = %extension,
                    error = %e,
                    "no privilege to create the extension; create it as a superuser"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Starts describing a transaction: nesting policy, isolation, read-only,
    /// deferrable, retry; then [`run`](TransactionBuilder::run) or
    /// [`begin`](TransactionBuilder::begin) it.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine
    ///     .transaction()
    ///     .isolation(IsolationLevel::Serializable)
    ///     .run(async |tx| {
    ///         tx.execute("UPDATE account SET balance = balance - 10 WHERE id = 1").await?;
    ///         tx.execute("UPDATE account SET balance = balance + 10 WHERE id = 2").await?;
    ///         Ok::<_, pgengine::Error>(())
    ///     })
    ///     .await?;
    /// # Ok(()) });
    /// ```
    pub fn transaction(&self) -> TransactionBuilder {
        TransactionBuilder::new(self.context.clone())
    }

    /// Begins a transaction with the default options: `engine.transaction().begin()`.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let tx = engine.begin().await?;
    /// tx.execute("DELETE FROM band").await?;
    /// tx.commit().await?;
    /// # Ok(()) });
    /// ```
    pub async fn begin(&self) -> Result<PostgresTransaction> {
        self.transaction().begin().await
    }

    /// The transaction this task is running inside (through this engine), if any.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// assert!(engine.current_transaction().is_none());
    /// engine.transaction().run(async |_tx| {
    ///     assert!(engine.current_transaction().is_some());
    ///     Ok::<_, pgengine::Error>(())
    /// }).await?;
    /// # Ok(()) });
    /// ```
    pub fn current_transaction(&self) -> Option<PostgresTransaction> {
        ambient::current(self.context.id).map(PostgresTransaction::joined)
    }

    /// Whether this task is running inside a transaction of this engine.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// assert!(!engine.transaction_exists());
    /// # Ok(()) });
    /// ```
    pub fn transaction_exists(&self) -> bool {
        ambient::current(self.context.id).is_some()
    }

    /// An empty [`Atomic`]: add queries, then run them all in one transaction.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let mut atomic = engine.atomic();
    /// atomic.add("CREATE TABLE a (id int)").add("CREATE TABLE b (id int)");
    /// atomic.run().await?;
    /// # Ok(()) });
    /// ```
    pub fn atomic(&self) -> Atomic {
        Atomic::new(self.context.clone())
    }
}

impl std::fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("id", &self.context.id)
            .field("pool", &self.pool_status())
            .field("settings", &self.context.settings)
            .finish()
    }
}

/// A snapshot of the pool: see [`PostgresEngine::pool_status`].
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// let pgengine::PoolStatus { size, available, .. } = engine.pool_status();
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The most connections the pool holds.
    pub max_size: usize,
    /// Connections open now (idle or in use).
    pub size: usize,
    /// Idle connections ready to use.
    pub available: usize,
    /// Tasks waiting for a connection.
    pub waiting: usize,
    /// Takes that had to wait for a connection (all were busy), since the engine was built.
    pub waits: u64,
    /// The time those takes waited, in all.
    pub wait_time: Duration,
    /// Takes that gave up after the pool's wait timeout.
    pub timeouts: u64,
    /// Connections opened.
    pub created: u64,
    /// Connections closed because they reached `max_lifetime`.
    pub closed_max_lifetime: u64,
    /// Connections closed after `idle_timeout` unused.
    pub closed_idle: u64,
    /// Connections closed because the health check or the session reset failed.
    pub closed_unhealthy: u64,
    /// Connections closed because they broke (a connection failure, or an abandoned
    /// request or transaction that could not be undone for sure).
    pub closed_broken: u64,
    /// Shared connections open (see [`EngineBuilder::multiplex`]); they count in `size`.
    pub shared: usize,
    /// Requests in flight on the shared connections, in all.
    pub shared_in_flight: usize,
    /// Shared connections stalled now (their oldest request runs past
    /// `multiplex_stall_after`).
    pub shared_stalled: usize,
    /// Statements run on a shared connection.
    pub multiplexed: u64,
    /// Statements that could have shared a connection but took one of their own, the
    /// shared ones being full or stalled.
    pub multiplex_overflows: u64,
}

impl sealed::Sealed for PostgresEngine {
    async fn runner(&self) -> Result<Runner> {
        ambient::runner(&self.context).await
    }

    fn runner_for(
        &self,
        statements: &[CompiledQuery<'_>],
    ) -> impl Future<Output = Result<Runner>> + Send {
        // The ambient module's future itself, not one wrapping it: every query waits on it.
        let shareable = match statements {
            [one] if !self.exclusive => Some(one.sql()),
            _ => None,
        };
        ambient::runner_for_statement(&self.context, shareable)
    }
}

impl Executor for PostgresEngine {}

impl EngineBuilder {
    /// Builds the engine: creates the pool, opens one connection to check the server
    /// version (a server older than PostgreSQL 12 is a `WARN`, not a failure), and creates
    /// the configured extensions.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let engine = pgengine::EngineBuilder::new().url("postgres://postgres@localhost/app").build().await?;
    /// # Ok(()) }
    /// ```
    pub async fn build(mut self) -> Result<PostgresEngine> {
        let nodes_and_replicas = (
            std::mem::take(&mut self.nodes),
            std::mem::take(&mut self.replicas),
        );
        let mut nodes = BTreeMap::new();
        for (name, url) in nodes_and_replicas.0 {
            let node = self.open_other(&url, &format!("node {name}")).await?;
            nodes.insert(name, node);
        }
        let mut replicas = Vec::new();
        for (index, url) in nodes_and_replicas.1.iter().enumerate() {
            replicas.push(
                self.open_other(url, &format!("read replica {}", index + 1))
                    .await?,
            );
        }
        let (pg, settings) = self.into_parts()?;
        PostgresEngine::open(pg, settings, nodes, replicas).await
    }

    /// Opens another server of the engine (a node, a read replica) with this builder's
    /// settings and `url`; its extensions come from its primary, not from us.
    async fn open_other(&self, url: &str, what: &str) -> Result<Arc<EngineContext>> {
        let mut other = self.clone().url(url);
        other.settings.extensions.clear();
        let (pg, settings) = other.into_parts()?;
        let engine = PostgresEngine::open(pg, settings, BTreeMap::new(), Vec::new())
            .await
            .map_err(|error| error.context(what))?;
        Ok(engine.context)
    }
}
