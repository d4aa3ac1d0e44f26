//! Transactions: [`TransactionBuilder`], [`PostgresTransaction`], the nesting policy and
//! ambient propagation.
//!
//! Inside [`TransactionBuilder::run`], the transaction is *ambient*: every query issued
//! through the same engine on the same task runs on the transaction's connection (a
//! tokio task-local). A task started with `tokio::spawn` does not inherit it; pass the
//! transaction handle to such a task instead.

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;

use crate::engine::PostgresEngine;
use crate::error::{DatabaseError, Error, ErrorKind, Result};
use crate::executor::{Executor, Lease, sealed};
use crate::pool::Connection;
use crate::retry::RetryPolicy;
use crate::savepoint::{Savepoint, quote_identifier};

/// What a transaction started inside another one (on the same task, same engine) does.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::prelude::*;
/// engine.transaction().run(async |_outer| {
///     // Fails alone, keeps the outer transaction going:
///     let inner = engine.transaction().nested(Nested::Savepoint).run(async |tx| {
///         tx.execute("INSERT INTO band (name) VALUES ('dup')").await
///     }).await;
///     Ok::<_, pgengine::Error>(())
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Nested {
    /// The inner transaction is the outer one: its queries are part of it, and the
    /// outer one commits or rolls back everything (the default).
    #[default]
    Join,
    /// The inner transaction is a savepoint: an inner error rolls back to it and
    /// releases it, and the outer transaction goes on.
    Savepoint,
    /// Starting a transaction inside another is an [`ErrorKind::Transaction`] error.
    Forbid,
}

/// The isolation level of a transaction, sent in its `BEGIN`.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// let tx = engine.transaction().isolation(pgengine::IsolationLevel::RepeatableRead).begin().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationLevel {
    /// `READ COMMITTED`, PostgreSQL's default.
    ReadCommitted,
    /// `REPEATABLE READ`.
    RepeatableRead,
    /// `SERIALIZABLE`; pair it with a [`RetryPolicy`].
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// Describes a transaction, then [`run`](Self::run)s a closure in it or
/// [`begin`](Self::begin)s it. Made by [`PostgresEngine::transaction`].
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::prelude::*;
/// let total: i64 = engine
///     .transaction()
///     .isolation(IsolationLevel::Serializable)
///     .read_only(true)
///     .retry(RetryPolicy::new(5))
///     .run(async |tx| Ok::<_, pgengine::Error>(tx.fetch_one("SELECT sum(balance)::bigint FROM account").await?.get(0)))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a transaction builder does nothing until `run` or `begin`"]
pub struct TransactionBuilder {
    engine: PostgresEngine,
    nested: Nested,
    isolation: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
    statement_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
}

impl TransactionBuilder {
    pub(crate) fn new(engine: PostgresEngine) -> Self {
        Self {
            engine,
            nested: Nested::default(),
            isolation: None,
            read_only: None,
            deferrable: None,
            statement_timeout: None,
            retry: None,
        }
    }

    /// The seed's switch: `true` joins an outer transaction ([`Nested::Join`]), `false`
    /// makes nesting an error ([`Nested::Forbid`]).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// let builder = engine.transaction().allow_nested(false);
    /// # }
    /// ```
    pub fn allow_nested(mut self, allow: bool) -> Self {
        self.nested = if allow { Nested::Join } else { Nested::Forbid };
        self
    }

    /// The nesting policy in full; see [`Nested`].
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// let builder = engine.transaction().nested(pgengine::Nested::Savepoint);
    /// # }
    /// ```
    pub fn nested(mut self, nested: Nested) -> Self {
        self.nested = nested;
        self
    }

    /// The isolation level (only for an outermost transaction).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// let builder = engine.transaction().isolation(pgengine::IsolationLevel::Serializable);
    /// # }
    /// ```
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// `READ ONLY` (true) or `READ WRITE` (false) (only for an outermost transaction).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// let builder = engine.transaction().read_only(true);
    /// # }
    /// ```
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// `DEFERRABLE` (true) or `NOT DEFERRABLE` (false); matters for serializable
    /// read-only transactions (only for an outermost transaction).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// use pgengine::IsolationLevel;
    /// let builder = engine.transaction().isolation(IsolationLevel::Serializable).read_only(true).deferrable(true);
    /// # }
    /// ```
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = Some(deferrable);
        self
    }

    /// The longest any one statement of the transaction may run: the server cancels a
    /// statement past it (SQLSTATE 57014), which aborts the transaction. Sent with the
    /// `BEGIN` (`SET LOCAL statement_timeout`, no extra round trip); it ends with the
    /// transaction. Set to the millisecond, at least 1 ms. Only for an outermost
    /// transaction; a nested one runs under the outer one's.
    ///
    /// To bound a whole closure-form transaction, wrap it in `tokio::time::timeout`:
    /// dropped at the deadline, it is rolled back before its connection is reused (only
    /// a deadline that falls while the `COMMIT` is in flight leaves the outcome unknown).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// use std::time::Duration;
    /// let builder = engine.transaction().statement_timeout(Duration::from_secs(5));
    /// # }
    /// ```
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Run the closure again after a serialization failure or a deadlock (closure form
    /// only); see [`RetryPolicy`].
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) {
    /// let builder = engine.transaction().retry(pgengine::RetryPolicy::new(5));
    /// # }
    /// ```
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Begins the transaction and returns its guard. Call [`commit`](PostgresTransaction::commit)
    /// or [`rollback`](PostgresTransaction::rollback); a guard dropped without either is
    /// rolled back before its connection serves anyone else.
    ///
    /// Inside an ambient transaction the nesting policy applies: `Join` returns a handle
    /// on the outer transaction, `Savepoint` one on a new savepoint (whose `commit`
    /// releases it), `Forbid` an error.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let tx = engine.transaction().read_only(true).begin().await?;
    /// let rows = tx.fetch("SELECT * FROM band").await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(self) -> Result<PostgresTransaction> {
        match ambient::current(self.engine.shared.id) {
            Some(outer) => self.enter_nested(outer).await,
            None => self.begin_outermost().await,
        }
    }

    /// Runs `body` in the transaction: commits when it returns `Ok`, rolls back when it
    /// returns `Err` or panics (the panic then continues). Queries through the engine
    /// inside `body`, on this task, run in the transaction too.
    ///
    /// With a [`retry`](Self::retry) policy, `body` runs again after a serialization
    /// failure or a deadlock (met by a query or by the `COMMIT`); when the attempts run
    /// out, the error is that database error with [`Error::attempts`] set.
    ///
    /// The returned future is `Send` when the closure's is. To `tokio::spawn` it, make
    /// the closure own what it uses (`async move |tx| …` over clones): with a closure
    /// that borrows from its surroundings, today's compiler cannot prove the spawned
    /// future `Send` ("implementation of `Send` is not general enough",
    /// rust-lang/rust#139475).
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// use pgengine::prelude::*;
    /// let id: i32 = engine.transaction().run(async |tx| {
    ///     let row = tx.fetch_one(sql!("INSERT INTO band (name) VALUES ({}) RETURNING id", "Rustaceans")).await?;
    ///     tx.execute(sql!("INSERT INTO concert (band_id) VALUES ({})", row.get::<_, i32>(0))).await?;
    ///     Ok::<_, pgengine::Error>(row.get(0))
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<T, E, F>(self, mut body: F) -> std::result::Result<T, E>
    where
        F: AsyncFnMut(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        if let Some(outer) = ambient::current(self.engine.shared.id) {
            return self.run_nested(outer, body).await;
        }
        let engine_id = self.engine.shared.id;
        let mut attempt = 1;
        loop {
            let tx = self.begin_outermost().await?;
            // Boxed: the body's future is large, and this one would copy it whole at
            // each move; a box is moved as a pointer.
            let body = Box::pin(AssertUnwindSafe(body(&tx)).catch_unwind());
            let outcome = ambient::scope(engine_id, tx.shared.clone(), body).await;
            let retryable = match outcome {
                Err(panic) => {
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    std::panic::resume_unwind(panic)
                }
                Ok(Ok(value)) => {
                    // A serialization failure or deadlock that the body swallowed still
                    // aborted the transaction (its COMMIT then fails): retry for it too.
                    let cause = tx.shared.lock().retryable.clone();
                    match (tx.finish_if_active(Finish::Commit).await, cause) {
                        (Ok(()), _) => return Ok(value),
                        (Err(error), _) if error.is_retryable() && self.retry.is_some() => error,
                        (Err(_), Some(cause)) if self.retry.is_some() => {
                            Error::from_database(cause)
                        }
                        (Err(error), _) => return Err(error.into()),
                    }
                }
                Ok(Err(error)) => {
                    let cause = tx.shared.lock().retryable.clone();
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    match (cause, self.retry) {
                        (Some(cause), Some(_)) => Error::from_database(cause),
                        _ => return Err(error),
                    }
                }
            };
            let policy = self.retry.expect("only retried with a policy");
            if attempt >= policy.max_attempts() {
                return Err(retryable.with_attempts(attempt).into());
            }
            tracing::debug!(target: "pgengine", attempt, error = %retryable, "retrying the transaction");
            tokio::time::sleep(policy.backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn run_nested<T, E, F>(
        self,
        outer: Arc<TxShared>,
        mut body: F,
    ) -> std::result::Result<T, E>
    where
        F: AsyncFnMut(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let tx = self.enter_nested(outer).await?;
        if !matches!(tx.scope, Scope::Savepoint { .. }) {
            return body(&tx).await;
        }
        match AssertUnwindSafe(body(&tx)).catch_unwind().await {
            Ok(Ok(value)) => {
                tx.finish_if_active(Finish::Commit).await?;
                Ok(value)
            }
            Ok(Err(error)) => {
                tx.finish_if_active(Finish::Rollback).await?;
                Err(error)
            }
            Err(panic) => {
                let _ = tx.finish_if_active(Finish::Rollback).await;
                std::panic::resume_unwind(panic)
            }
        }
    }

    async fn enter_nested(&self, outer: Arc<TxShared>) -> Result<PostgresTransaction> {
        match self.nested {
            Nested::Join => Ok(PostgresTransaction::joined(outer)),
            Nested::Forbid => Err(Error::transaction(
                "a transaction of this engine is already running on this task, and this one \
                 forbids nesting (allow_nested(false) / Nested::Forbid)",
            )),
            Nested::Savepoint => {
                let savepoint = PostgresTransaction::joined(outer.clone())
                    .savepoint(None)
                    .await?;
                Ok(PostgresTransaction {
                    shared: outer,
                    scope: Scope::Savepoint {
                        name: savepoint.name().to_owned(),
                        finished: AtomicBool::new(false),
                    },
                })
            }
        }
    }

    async fn begin_outermost(&self) -> Result<PostgresTransaction> {
        let engine = &self.engine.shared;
        let connection = engine.pool.get().await?;
        // Marked first: if BEGIN fails or is abandoned, the connection is rolled back.
        connection.set_in_transaction(true);
        engine.simple(&connection, &self.begin_sql()).await?;
        Ok(PostgresTransaction {
            shared: Arc::new(TxShared {
                engine: self.engine.clone(),
                state: Mutex::new(TxState {
                    connection: Some(Arc::new(connection)),
                    phase: Phase::Active,
                    aborted_by: None,
                    retryable: None,
                }),
                savepoint_ids: AtomicU32::new(0),
                cursor_ids: AtomicU32::new(0),
            }),
            scope: Scope::Outermost,
        })
    }

    /// `BEGIN` with the options, in one statement.
    fn begin_sql(&self) -> Cow<'static, str> {
        let mut modes = Vec::new();
        if let Some(level) = self.isolation {
            modes.push(format!("ISOLATION LEVEL {}", level.sql()));
        }
        match self.read_only {
            Some(true) => modes.push("READ ONLY".into()),
            Some(false) => modes.push("READ WRITE".into()),
            None => {}
        }
        match self.deferrable {
            Some(true) => modes.push("DEFERRABLE".into()),
            Some(false) => modes.push("NOT DEFERRABLE".into()),
            None => {}
        }
        let begin = if modes.is_empty() {
            Cow::Borrowed("BEGIN")
        } else {
            Cow::Owned(format!("BEGIN {}", modes.join(", ")))
        };
        match self.statement_timeout {
            None => begin,
            Some(timeout) => {
                // PostgreSQL takes whole milliseconds up to i32::MAX; 0 would mean none.
                let millis = timeout
                    .as_nanos()
                    .div_ceil(1_000_000)
                    .clamp(1, i32::MAX as u128);
                Cow::Owned(format!("{begin}; SET LOCAL statement_timeout = {millis}"))
            }
        }
    }
}

/// A transaction: run queries on it ([`Executor`]), make savepoints, commit or roll back.
///
/// The outermost handle (from [`begin`](TransactionBuilder::begin) or given to a
/// [`run`](TransactionBuilder::run) closure) owns the transaction: dropped while still
/// open, the transaction is rolled back before its connection serves anyone else. After
/// `commit` or `rollback`, every query on it is an [`ErrorKind::Transaction`] error.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::prelude::*;
/// let tx = engine.begin().await?;
/// let (a, b) = tokio::join!(tx.fetch("SELECT 1"), tx.fetch("SELECT 2")); // pipelined
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct PostgresTransaction {
    shared: Arc<TxShared>,
    scope: Scope,
}

/// Which part of the transaction a handle stands for.
enum Scope {
    /// The transaction itself; dropping it open rolls it back.
    Outermost,
    /// A handle on a transaction owned elsewhere (joined nesting, `current_transaction`).
    Joined,
    /// A nested transaction kept as a savepoint.
    Savepoint { name: String, finished: AtomicBool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Commit,
    Rollback,
}

impl PostgresTransaction {
    pub(crate) fn joined(shared: Arc<TxShared>) -> Self {
        Self {
            shared,
            scope: Scope::Joined,
        }
    }

    /// Commits. Fails, rolling back, when PostgreSQL already aborted the transaction
    /// (a statement failed): nothing is saved then, and the error says so. On a nested
    /// savepoint handle, releases the savepoint; on a joined handle, commits the
    /// outer transaction (as the seed does).
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn commit(&self) -> Result<()> {
        self.finish(Finish::Commit).await
    }

    /// Rolls back. On a nested savepoint handle, rolls back to the savepoint and
    /// releases it; on a joined handle, rolls back the outer transaction.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// tx.rollback().await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback(&self) -> Result<()> {
        self.finish(Finish::Rollback).await
    }

    /// Whether the transaction is still open (neither committed nor rolled back).
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// tx.commit().await?;
    /// assert!(!tx.is_active());
    /// # Ok(()) }
    /// ```
    pub fn is_active(&self) -> bool {
        let scope_open = match &self.scope {
            Scope::Savepoint { finished, .. } => !finished.load(Ordering::Acquire),
            _ => true,
        };
        scope_open && self.shared.lock().phase == Phase::Active
    }

    /// Makes a savepoint: named (validated and quoted; anything unsafe is an
    /// [`ErrorKind::InvalidInput`] error and nothing is sent) or, with `None`, numbered
    /// `savepoint_1`, `savepoint_2`, … per transaction.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// let first = tx.savepoint(None).await?;
    /// assert_eq!(first.name(), "savepoint_1");
    /// assert!(tx.savepoint(Some("x\"; DROP TABLE band; --")).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn savepoint(&self, name: Option<&str>) -> Result<Savepoint> {
        let name = match name {
            Some(name) => name.to_owned(),
            None => format!(
                "savepoint_{}",
                self.shared.savepoint_ids.fetch_add(1, Ordering::Relaxed) + 1
            ),
        };
        let quoted = quote_identifier(&name)?;
        self.lease()
            .await?
            .simple(&format!("SAVEPOINT {quoted}"))
            .await?;
        Ok(Savepoint::new(Self::joined(self.shared.clone()), name))
    }

    /// Rolls back to the named savepoint: undoes what was done since, and makes an
    /// aborted transaction usable again.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// tx.savepoint(Some("before_import")).await?;
    /// tx.rollback_to("before_import").await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback_to(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.lease()
            .await?
            .simple(&format!("ROLLBACK TO SAVEPOINT {quoted}"))
            .await?;
        let mut state = self.shared.lock();
        state.aborted_by = None;
        state.retryable = None;
        Ok(())
    }

    pub(crate) async fn release_savepoint(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.lease()
            .await?
            .simple(&format!("RELEASE SAVEPOINT {quoted}"))
            .await
    }

    async fn finish(&self, finish: Finish) -> Result<()> {
        match &self.scope {
            Scope::Outermost | Scope::Joined => self.shared.finish(finish).await,
            Scope::Savepoint { name, finished } => {
                if finished.swap(true, Ordering::AcqRel) {
                    return Err(Error::transaction(format!(
                        "the nested transaction (savepoint {name}) is already finished"
                    )));
                }
                // This scope is finished from here on, so its own `lease` refuses: the
                // closing statements go through a handle on the whole transaction.
                let transaction = Self::joined(self.shared.clone());
                if finish == Finish::Rollback {
                    transaction.rollback_to(name).await?;
                }
                transaction.release_savepoint(name).await
            }
        }
    }

    /// Finishes unless the body already did (manually committed or rolled back).
    async fn finish_if_active(&self, finish: Finish) -> Result<()> {
        if self.is_active() {
            self.finish(finish).await
        } else {
            Ok(())
        }
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        match &self.scope {
            Scope::Outermost => self.shared.abandon(),
            Scope::Savepoint { name, finished } if !finished.load(Ordering::Acquire) => {
                // Nothing can be sent from here; make sure the outer transaction cannot
                // commit work this nested one left half done.
                let mut state = self.shared.lock();
                if state.phase == Phase::Active {
                    state.aborted_by.get_or_insert_with(|| {
                        format!("the nested transaction (savepoint {name}) was dropped without commit or rollback")
                    });
                }
            }
            _ => {}
        }
    }
}

impl std::fmt::Debug for PostgresTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = match &self.scope {
            Scope::Outermost => "outermost",
            Scope::Joined => "joined",
            Scope::Savepoint { .. } => "savepoint",
        };
        f.debug_struct("PostgresTransaction")
            .field("scope", &scope)
            .field("phase", &self.shared.lock().phase)
            .finish()
    }
}

impl sealed::Sealed for PostgresTransaction {}

impl Executor for PostgresTransaction {
    async fn lease(&self) -> Result<Lease> {
        if let Scope::Savepoint { name, finished } = &self.scope {
            if finished.load(Ordering::Acquire) {
                return Err(Error::transaction(format!(
                    "the nested transaction (savepoint {name}) is finished"
                )));
            }
        }
        self.shared.lease()
    }
}

/// The state every handle of one transaction shares.
pub(crate) struct TxShared {
    engine: PostgresEngine,
    state: Mutex<TxState>,
    savepoint_ids: AtomicU32,
    cursor_ids: AtomicU32,
}

struct TxState {
    /// Taken out when the transaction finishes; the connection goes back to the pool
    /// once the last request still using it is done.
    connection: Option<Arc<Connection>>,
    phase: Phase,
    /// Why PostgreSQL aborted the transaction, if it did: it can then only roll back.
    aborted_by: Option<String>,
    /// The serialization failure or deadlock that aborted it, for retrying.
    retryable: Option<DatabaseError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    Committed,
    RolledBack,
}

impl TxShared {
    fn lock(&self) -> MutexGuard<'_, TxState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection for the next request, unless the transaction is finished.
    pub(crate) fn lease(self: &Arc<Self>) -> Result<Lease> {
        let state = self.lock();
        match (&state.connection, state.phase) {
            (Some(connection), Phase::Active) => Ok(Lease::in_transaction(
                self.engine.shared.clone(),
                connection.clone(),
                self.clone(),
            )),
            (_, phase) => Err(finished_error(phase)),
        }
    }

    /// A fresh cursor name, unique within this transaction.
    pub(crate) fn next_cursor_name(&self) -> String {
        let id = self.cursor_ids.fetch_add(1, Ordering::Relaxed) + 1;
        format!("pgengine_cursor_{id}")
    }

    /// Records a failure met inside the transaction: PostgreSQL has aborted it.
    pub(crate) fn note_failure(&self, error: &Error) {
        if !matches!(error.kind(), ErrorKind::Database | ErrorKind::Connection) {
            return; // refused before anything reached the server
        }
        let mut state = self.lock();
        state.aborted_by.get_or_insert_with(|| error.to_string());
        if let Some(db) = error.database_error().filter(|db| db.is_retryable()) {
            state.retryable.get_or_insert_with(|| db.clone());
        }
    }

    /// Commits or rolls back, then lets the connection go back to the pool.
    async fn finish(&self, finish: Finish) -> Result<()> {
        let (connection, aborted_by) = {
            let mut state = self.lock();
            if state.phase != Phase::Active {
                return Err(finished_error(state.phase));
            }
            state.phase = Phase::RolledBack;
            let connection = state
                .connection
                .take()
                .expect("an active transaction has its connection");
            let abandoned = connection.has_unfinished_request().then(|| {
                "a request of the transaction was abandoned (its future dropped) before its \
                 answer came, so its outcome is unknown"
                    .to_owned()
            });
            (connection, state.aborted_by.clone().or(abandoned))
        };
        let sql = match (finish, &aborted_by) {
            (Finish::Commit, None) => "COMMIT",
            _ => "ROLLBACK",
        };
        // An abandoned request may still be running: cancel it first, or the ROLLBACK
        // would wait behind it. Where that cannot be done for sure, nothing more is sent:
        // the connection is discarded when dropped, which ends the transaction.
        let abandoned = connection.has_unfinished_request();
        if abandoned && !connection.cancel_unfinished_request().await {
            return match finish {
                Finish::Commit => Err(Error::transaction(format!(
                    "cannot commit: {}; the transaction is rolled back",
                    aborted_by.unwrap_or_default()
                ))),
                Finish::Rollback => Ok(()),
            };
        }
        let result = self.engine.shared.simple(&connection, sql).await;
        if abandoned && result.is_ok() {
            // Answers come in order: whatever was abandoned before has ended.
            connection.set_request_open(false);
        }
        // The server ends the transaction on any answer to COMMIT or ROLLBACK, even an error.
        if result.is_ok() || result.as_ref().is_err_and(|e| e.database_error().is_some()) {
            connection.set_in_transaction(false);
        }
        if sql == "COMMIT" && result.is_ok() {
            self.lock().phase = Phase::Committed;
        }
        match (finish, aborted_by) {
            (Finish::Commit, Some(cause)) => Err(Error::transaction(format!(
                "cannot commit: an earlier error aborted the transaction, so it was rolled back \
                 and nothing was saved (first error: {cause})"
            ))),
            _ => result,
        }
    }

    /// The owner went away with the transaction open: release the connection, which
    /// rolls back before anyone else can use it.
    fn abandon(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Active {
            state.phase = Phase::RolledBack;
            state.connection = None;
        }
    }
}

fn finished_error(phase: Phase) -> Error {
    let what = match phase {
        Phase::Committed => "committed",
        _ => "rolled back",
    };
    Error::transaction(format!(
        "the transaction is already {what}; start a new one to run more queries"
    ))
}

/// The transactions ambient on the current task, one per engine.
pub(crate) mod ambient {
    use std::future::Future;
    use std::sync::Arc;

    use super::TxShared;

    tokio::task_local! {
        static AMBIENT: Vec<(u64, Arc<TxShared>)>;
    }

    /// The ambient transaction of the engine `engine_id` on this task, if any.
    pub(crate) fn current(engine_id: u64) -> Option<Arc<TxShared>> {
        AMBIENT
            .try_with(|ambient| {
                ambient
                    .iter()
                    .find(|(id, _)| *id == engine_id)
                    .map(|(_, tx)| tx.clone())
            })
            .ok()
            .flatten()
    }

    /// Runs `future` with `tx` as the ambient transaction of engine `engine_id`.
    pub(crate) fn scope<F: Future>(
        engine_id: u64,
        tx: Arc<TxShared>,
        future: F,
    ) -> impl Future<Output = F::Output> {
        let mut ambient = AMBIENT.try_with(Vec::clone).unwrap_or_default();
        ambient.retain(|(id, _)| *id != engine_id);
        ambient.push((engine_id, tx));
        AMBIENT.scope(ambient, future)
    }
}
