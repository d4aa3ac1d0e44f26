//! The connection pool (deadpool-postgres) and the hygiene of each pooled connection.
//!
//! A [`Connection`] knows whether it is inside a transaction, whether a request on it
//! was abandoned (its future dropped before the answer came), and whether it is broken
//! (a request met a connection failure, or the server ended the session with `FATAL`).
//! When it goes back, a clean connection returns to the pool as is; a broken one is
//! discarded, never handed out again; one left inside a transaction is rolled back
//! first; one with an abandoned request has that request cancelled first. Where any of
//! that fails, the connection is discarded. The pool slot stays taken until that is
//! done, so the next user never sees a dirty session.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;

use deadpool_postgres::{PoolError, Runtime, Status, TimeoutType, Timeouts};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, RowStream, Statement};

use crate::cancel::Canceller;
use crate::config::EngineSettings;
use crate::connect::{Hook, Object, Pool, ServerConnector, Session};
use crate::counters::{Counter, Counters};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle;
use crate::statements::{DEFAULT_STATEMENT_CACHE_CAPACITY, StatementCache};

/// The pool of one engine, and what its connections share.
pub(crate) struct ConnectionPool {
    pool: Pool,
    shared: Arc<PoolShared>,
}

/// What every connection of a pool shares (one reference per connection taken).
struct PoolShared {
    /// How to cancel a request on a connection of the pool.
    canceller: Canceller,
    counters: Arc<Counters>,
    statement_cache_capacity: usize,
    /// Bumped whenever the schema may have changed: the statements of every connection
    /// of the pool are then prepared again at their next use.
    schema_epoch: AtomicU64,
}

impl PoolShared {
    /// Every statement cache of the pool is renewed: each statement is prepared afresh
    /// at its next use.
    fn forget_statements(&self) {
        self.schema_epoch.fetch_add(1, Ordering::AcqRel);
    }
}

impl ConnectionPool {
    /// Creates the pool, `name`d in its metrics; no connection is opened yet.
    pub(crate) fn new(
        pg: tokio_postgres::Config,
        settings: &EngineSettings,
        name: String,
    ) -> Result<Self> {
        let canceller = Canceller::new(
            &pg,
            settings.connect_timeout,
            settings.tls.connector.clone(),
        );
        let counters = Arc::new(Counters::new(name));
        let life = Arc::new(settings.lifecycle.clone());
        let manager = ServerConnector::new(
            pg,
            settings.tls.clone(),
            settings.server_role,
            &settings.hosts_in_order,
            life.clone(),
            counters.clone(),
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections)
            .wait_timeout(settings.pool_wait_timeout)
            .create_timeout(Some(settings.connect_timeout))
            .runtime(Runtime::Tokio1)
            .post_create(Hook::async_fn(lifecycle::post_create(
                life.clone(),
                counters.clone(),
            )))
            .build()
            .map_err(|e| Error::new(ErrorKind::Config, format!("cannot build the pool: {e}")))?;
        if let Some(period) = maintenance_period(&life)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(lifecycle::maintain(
                pool.weak(),
                life,
                counters.clone(),
                period,
            ));
        }
        Ok(Self {
            pool,
            shared: Arc::new(PoolShared {
                canceller,
                counters,
                statement_cache_capacity: settings
                    .statement_cache_capacity
                    .unwrap_or(DEFAULT_STATEMENT_CACHE_CAPACITY),
                schema_epoch: AtomicU64::new(0),
            }),
        })
    }

    /// The schema may have changed where the engine cannot see it: every statement
    /// cache of the pool is renewed.
    pub(crate) fn forget_statements(&self) {
        self.shared.forget_statements();
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
            // Boxed: the usual path's future stays small (it is moved whole up the
            // caller's futures).
            Err(PoolError::Timeout(TimeoutType::Wait)) => Box::pin(self.wait()).await?,
            taken => taken?,
        };
        Ok(self.wrap(object))
    }

    /// Waits for a connection (every one is busy), at most the pool's wait timeout.
    async fn wait(&self) -> std::result::Result<Object, PoolError> {
        let started = std::time::Instant::now();
        let waited = self.pool.get().await;
        let timed_out = matches!(waited, Err(PoolError::Timeout(TimeoutType::Wait)));
        self.shared.counters.waited(started.elapsed(), timed_out);
        waited
    }

    /// Takes an idle connection or opens a new one, without waiting for a busy one: a
    /// [`PoolTimeout`](ErrorKind::PoolTimeout) error when every connection is in use.
    pub(crate) async fn get_free(&self) -> Result<Connection> {
        let at_once = Timeouts {
            wait: Some(Duration::ZERO),
            ..self.pool.timeouts()
        };
        let object = self.pool.timeout_get(&at_once).await?;
        Ok(self.wrap(object))
    }

    fn wrap(&self, object: Object) -> Connection {
        self.shared.counters.moved(1.0, || Some(self.pool.status()));
        Connection {
            object: Some(object),
            shared: self.shared.clone(),
            in_transaction: AtomicBool::new(false),
            schema_changed_in_transaction: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        }
    }

    /// Connections open, idle, waited for.
    pub(crate) fn status(&self) -> Status {
        self.pool.status()
    }

    /// The pool's counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.shared.counters
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
    shared: Arc<PoolShared>,
    in_transaction: AtomicBool,
    /// A statement of the open transaction may have changed the schema: the pool's
    /// statement caches are renewed again when it ends (its change is visible then).
    schema_changed_in_transaction: AtomicBool,
    unfinished: AtomicBool,
    broken: AtomicBool,
}

impl Connection {
    /// The driver's client with its statement cache.
    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.session()
    }

    /// The pooled session.
    fn session(&self) -> &Session {
        self.object
            .as_deref()
            .expect("a connection holds its object until dropped")
    }

    /// The driver's client, for code that needs it exclusively (see
    /// [`Runner::with_client_mut`](crate::runner::Runner)).
    pub(crate) fn client_mut(&mut self) -> &mut tokio_postgres::Client {
        self.object
            .as_mut()
            .expect("a connection holds its object until dropped")
    }

    /// How long ago the connection was opened.
    pub(crate) fn age(&self) -> Duration {
        self.object
            .as_ref()
            .map_or(Duration::ZERO, |object| Object::metrics(object).age())
    }

    /// The statement cache of this connection.
    fn statements(&self) -> StatementCache<'_> {
        StatementCache::new(
            self.shared.statement_cache_capacity,
            self.session().statements(),
            &self.shared.schema_epoch,
        )
    }

    /// Whether statements are prepared and cached (else sent unnamed).
    pub(crate) fn caches_statements(&self) -> bool {
        self.statements().caches_statements()
    }

    /// `sql` prepared on this connection (statement cache).
    pub(crate) async fn statement(
        &self,
        sql: &str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        self.statements().statement(self.client(), sql).await
    }

    /// `sql` prepared on this connection if its statement cache has it (nothing sent).
    pub(crate) fn cached_statement(&self, sql: &str) -> Option<Statement> {
        self.statements().cached(sql)
    }

    /// Drops `sql` from the statement cache.
    pub(crate) fn forget_statement(&self, sql: &str) {
        self.statements().forget(sql);
    }

    /// Empties this connection's statement cache: the server no longer has its
    /// statements (deallocated where the engine could not see it).
    pub(crate) fn forget_all_statements(&self) {
        self.statements().forget_all();
    }

    /// Runs `sql` with its rows (see [`StatementCache`]).
    pub(crate) async fn query_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.statements()
            .query_rows(self.client(), sql, params)
            .await
    }

    /// Runs `sql`, counting the rows it affected (see [`StatementCache`]).
    pub(crate) async fn execute_count(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.statements()
            .execute_count(self.client(), sql, params)
            .await
    }

    /// Starts `sql`, its rows read as they come (see [`StatementCache`]).
    pub(crate) async fn query_stream(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream> {
        self.statements()
            .query_stream(self.client(), sql, params)
            .await
    }

    /// Records whether a transaction is open on this connection.
    pub(crate) fn set_in_transaction(&self, open: bool) {
        self.in_transaction.store(open, Ordering::Release);
        if !open
            && self
                .schema_changed_in_transaction
                .swap(false, Ordering::AcqRel)
        {
            self.shared.forget_statements();
        }
    }

    /// Records that `sql`, just run on this connection, may have changed the schema
    /// (see [`schema_change`](crate::schema_change)): every statement cache of the pool
    /// is renewed now, and again when the open transaction ends.
    pub(crate) fn ran_statement(&self, sql: &str) {
        if crate::schema_change::statement_changes_schema(sql) {
            self.schema_may_have_changed();
        }
    }

    /// [`ran_statement`](Self::ran_statement) for `sql` of several statements (simple
    /// protocol).
    pub(crate) fn ran_statements(&self, sql: &str) {
        if crate::schema_change::changes_schema(sql) {
            self.schema_may_have_changed();
        }
    }

    /// The schema may have changed where the engine could not see it: every statement
    /// cache of the pool is renewed now, and again when the open transaction ends.
    pub(crate) fn schema_may_have_changed(&self) {
        self.shared.forget_statements();
        if self.in_transaction.load(Ordering::Acquire) {
            self.schema_changed_in_transaction
                .store(true, Ordering::Release);
        }
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
    /// not be used again. (Boxed: a cancel opens a connection of its own, kilobytes of
    /// state that every transaction's end, which may need it, would otherwise carry.)
    pub(crate) fn cancel_unfinished_request(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        let object = self
            .object
            .as_ref()
            .expect("a connection holds its object until dropped");
        Box::pin(async move {
            (self.shared.canceller)
                .cancel(&object.cancel_token(), object.server())
                .await
        })
    }

    /// Marks a request as started on this connection: if the returned guard is dropped
    /// before [`answered`](RequestGuard::answered) (the request's future was dropped), the
    /// request is cancelled before the connection is reused.
    pub(crate) fn request(&self) -> RequestGuard<'_> {
        RequestGuard {
            connection: self,
            finished: false,
        }
    }

    /// Runs `request` under a [`RequestGuard`]. (A combinator, not an `async fn`: the
    /// request's future is held once, not copied into a second slot.) The guard starts
    /// here: await the result at once, as every caller does; dropped unpolled, it would
    /// mark the connection as having an abandoned request.
    pub(crate) fn guarded<T>(
        &self,
        request: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        let guard = self.request();
        request.map(move |output| {
            guard.answered(&output);
            output
        })
    }

    /// Records the outcome of a request: after a connection failure (or a session the
    /// server ended), the connection is broken and will be discarded.
    pub(crate) fn note<T>(&self, result: &Result<T>) {
        if result.as_ref().is_err_and(Error::is_connection_failure) {
            self.broken.store(true, Ordering::Release);
        }
    }

    /// Marks the connection broken: it is discarded when dropped.
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// Whether a request met a connection failure: nothing more should be sent.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire) || self.client().is_closed()
    }
}

/// Marks the connection as having an unfinished request unless the request it guards
/// finished.
pub(crate) struct RequestGuard<'a> {
    connection: &'a Connection,
    finished: bool,
}

impl RequestGuard<'_> {
    /// The request got its answer.
    pub(crate) fn answered<T>(mut self, result: &Result<T>) {
        self.finished = true;
        self.connection.note(result);
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.connection.unfinished.store(true, Ordering::Release);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        self.shared
            .counters
            .moved(-1.0, || Object::pool(&object).map(|pool| pool.status()));
        let unfinished = self.unfinished.load(Ordering::Acquire);
        let in_transaction = self.in_transaction.load(Ordering::Acquire);
        if self.broken.load(Ordering::Acquire) || object.is_closed() {
            tracing::debug!(target: "pgengine::pool", "discarding a broken connection");
            self.shared.counters.add(Counter::ClosedBroken, 1);
            drop(Object::take(object));
            return;
        }
        if !unfinished && !in_transaction {
            return; // clean: `object` goes back to the pool here
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(restore(object, unfinished, self.shared.clone()));
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
async fn restore(object: Object, unfinished: bool, shared: Arc<PoolShared>) {
    let counters = &shared.counters;
    if unfinished
        && !shared
            .canceller
            .cancel(&object.cancel_token(), object.server())
            .await
    {
        tracing::debug!(target: "pgengine::pool", "discarding a connection whose request could not be cancelled for sure");
        counters.add(Counter::ClosedBroken, 1);
        drop(Object::take(object));
        return;
    }
    match object.batch_execute("ROLLBACK").await {
        Ok(()) => drop(object),
        Err(e) => {
            tracing::debug!(target: "pgengine::pool", error = %e, "discarding a connection that could not be rolled back");
            counters.add(Counter::ClosedBroken, 1);
            drop(Object::take(object));
        }
    }
}

/// The name of the pool of an engine connecting with `pg`, in metrics:
/// `host:port/database` (its first host).
pub(crate) fn pool_name(pg: &tokio_postgres::Config) -> String {
    let host = match (pg.get_hosts().first(), pg.get_hostaddrs().first()) {
        (Some(tokio_postgres::config::Host::Tcp(name)), _) => name.clone(),
        (_, Some(ip)) => ip.to_string(),
        #[cfg(unix)]
        (Some(tokio_postgres::config::Host::Unix(dir)), None) => dir.display().to_string(),
        (None, None) => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let database = pg.get_dbname().or(pg.get_user()).unwrap_or_default();
    format!("{host}:{port}/{database}")
}

/// How often idle connections are checked: often enough for the shortest of
/// `idle_timeout` and `max_lifetime`; `None` when there is nothing to maintain.
fn maintenance_period(life: &lifecycle::Lifecycle) -> Option<Duration> {
    let shortest = [life.idle_timeout, life.max_lifetime]
        .into_iter()
        .flatten()
        .min();
    match shortest {
        Some(bound) => Some((bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(30))),
        None if life.min_connections > 0 => Some(Duration::from_secs(1)),
        None => None,
    }
}
