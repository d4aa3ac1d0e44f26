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
use tokio::sync::{OwnedMutexGuard, RwLock, RwLockReadGuard};

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
    /// transaction. Rounded up to the millisecond; `Duration::ZERO` means no timeout
    /// (as 0 does in PostgreSQL), even where the server sets one. Only for an outermost
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
        match ambient::current_scope(self.engine.shared.id) {
            Some(outer) => self.enter_nested(outer, Wait::Refuse).await,
            None => self.begin_outermost().await,
        }
    }

    /// Runs `body` in the transaction: commits when it returns `Ok`, rolls back when it
    /// returns `Err` or panics (the panic then continues). Queries through the engine
    /// inside `body`, on this task, run in the transaction too.
    ///
    /// With a [`retry`](Self::retry) policy, `body` runs again after a serialization
    /// failure or a deadlock (met by a query, by the implicit `COMMIT` or by a
    /// `tx.commit()` inside the body); when the attempts run out, the error is that
    /// database error with [`Error::attempts`] set. A commit whose outcome is unknown
    /// ([`ErrorKind::CommitOutcomeUnknown`]) is never retried.
    ///
    /// The body may finish the transaction itself: after `tx.commit()` or
    /// `tx.rollback()`, queries on it are errors, and `run` returns the body's value —
    /// unless that commit failed, which `run` then reports even if the body swallowed it.
    ///
    /// Nested (inside another transaction's body, on the same task), the
    /// [`nested`](Self::nested) policy applies. Nested [`Nested::Savepoint`]
    /// transactions of one scope run one at a time, in the order they were started (a
    /// second one waits for the first): PostgreSQL's savepoints form a stack, and
    /// siblings interleaved on it could undo each other's work. A nested savepoint
    /// transaction whose body met a database error is rolled back to its savepoint even
    /// when the body swallowed the error, and `run` then returns an
    /// [`ErrorKind::Transaction`] error; the outer transaction goes on.
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
        if let Some(outer) = ambient::current_scope(self.engine.shared.id) {
            return Box::pin(self.run_nested(outer, body)).await;
        }
        let engine_id = self.engine.shared.id;
        let mut attempt = 1;
        loop {
            let tx = self.begin_outermost().await?;
            // Boxed: the body's future is large, and this one would copy it whole at
            // each move; a box is moved as a pointer.
            let body = Box::pin(AssertUnwindSafe(body(&tx)).catch_unwind());
            let scope = ambient::Scope::new(tx.shared.clone());
            let outcome = ambient::scope(engine_id, scope, body).await;
            let retryable = match outcome {
                Err(panic) => {
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    std::panic::resume_unwind(panic)
                }
                Ok(Ok(value)) => match tx.finish_if_active(Finish::Commit).await {
                    Ok(()) => match tx.shared.failed_commit() {
                        // The body committed itself, and that commit failed.
                        Some(error) => error,
                        None => return Ok(value),
                    },
                    Err(error) => error,
                },
                Ok(Err(error)) => {
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    match tx.shared.retryable_cause() {
                        Some(cause) if self.retry.is_some() => Error::from_database(cause),
                        _ => return Err(error),
                    }
                }
            };
            // A serialization failure or deadlock that the body swallowed still aborted
            // the transaction: retry for it too.
            let retryable = match (retryable, tx.shared.retryable_cause()) {
                (error, _) if error.is_outcome_unknown() || self.retry.is_none() => {
                    return Err(error.into());
                }
                (error, _) if error.is_retryable() => error,
                (_, Some(cause)) => Error::from_database(cause),
                (error, None) => return Err(error.into()),
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
        outer: ambient::Scope,
        mut body: F,
    ) -> std::result::Result<T, E>
    where
        F: AsyncFnMut(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let tx = self.enter_nested(outer, Wait::Queue).await?;
        if !matches!(tx.scope, Scope::Savepoint { .. }) {
            return body(&tx).await;
        }
        // The nested scope is ambient for the body: transactions nested in it queue on
        // it, not on the outer scope (which this one holds).
        let scope = ambient::Scope::new(tx.shared.clone());
        let body = Box::pin(AssertUnwindSafe(body(&tx)).catch_unwind());
        match ambient::scope(self.engine.shared.id, scope, body).await {
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

    async fn enter_nested(&self, outer: ambient::Scope, wait: Wait) -> Result<PostgresTransaction> {
        match self.nested {
            Nested::Join => Ok(PostgresTransaction::joined(outer.transaction)),
            Nested::Forbid => Err(Error::transaction(
                "a transaction of this engine is already running on this task, and this one \
                 forbids nesting (allow_nested(false) / Nested::Forbid)",
            )),
            Nested::Savepoint => {
                let turn = match wait {
                    Wait::Queue => outer.nested_turn.lock_owned().await,
                    Wait::Refuse => outer.nested_turn.try_lock_owned().map_err(|_| {
                        Error::transaction(
                            "another nested transaction of this scope is still open: finish it \
                             first (nested savepoint transactions of one scope run one at a time)",
                        )
                    })?,
                };
                let savepoint = PostgresTransaction::joined(outer.transaction.clone())
                    .savepoint(None)
                    .await?;
                let name = savepoint.name().to_owned();
                let sequence = outer.transaction.savepoint_sequence(&name);
                Ok(PostgresTransaction {
                    shared: outer.transaction,
                    scope: Scope::Savepoint {
                        name,
                        sequence,
                        finished: AtomicBool::new(false),
                        turn: Mutex::new(Some(turn)),
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
            shared: Arc::new(TxShared::new(self.engine.clone(), connection)),
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
                // PostgreSQL takes whole milliseconds up to i32::MAX; 0 means none.
                let millis = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128);
                Cow::Owned(format!("{begin}; SET LOCAL statement_timeout = {millis}"))
            }
        }
    }
}

/// Whether entering a nested savepoint transaction waits for an open sibling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The closure form: queue behind the sibling.
    Queue,
    /// The guard form: a sibling open on the same scope is an error (waiting for it
    /// could wait forever on this very task).
    Refuse,
}

/// A transaction: run queries on it ([`Executor`]), make savepoints, commit or roll back.
///
/// The outermost handle (from [`begin`](TransactionBuilder::begin) or given to a
/// [`run`](TransactionBuilder::run) closure) owns the transaction: dropped while still
/// open, the transaction is rolled back before its connection serves anyone else. After
/// `commit` or `rollback`, every query on it is an [`ErrorKind::Transaction`] error.
///
/// Queries of one transaction may run concurrently (`tokio::join!`): they reach the
/// server in the order their futures were first polled, pipelined on its connection.
/// Finishing — `commit`, `rollback`, a savepoint's `release` or `rollback_to` — waits
/// for the queries still in flight, and from the moment `commit` or `rollback` is first
/// polled no new query is accepted.
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
    /// A nested transaction kept as a savepoint; it holds its scope's turn for nested
    /// transactions until finished or dropped.
    Savepoint {
        name: String,
        sequence: u64,
        finished: AtomicBool,
        turn: Mutex<Option<OwnedMutexGuard<()>>>,
    },
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
    /// (a statement failed): nothing is saved then, and the error says so. When the
    /// connection fails while the `COMMIT` is in flight, the error is
    /// [`ErrorKind::CommitOutcomeUnknown`]: it may or may not have committed. On a
    /// nested savepoint handle, releases the savepoint (rolling back to it first if
    /// its work met an error); on a joined handle, commits the outer transaction (as
    /// the seed does).
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

    /// Whether the transaction is still open (neither committed nor rolled back, nor
    /// being so).
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
        let lease = self.lease().await?;
        lease.simple(&format!("SAVEPOINT {quoted}")).await?;
        self.shared.lock().savepoint_made(&name);
        Ok(Savepoint::new(Self::joined(self.shared.clone()), name))
    }

    /// Rolls back to the named savepoint: undoes what was done since, and makes an
    /// aborted transaction usable again. It waits for the transaction's queries still
    /// in flight. An abort left by a nested transaction that was dropped half-way is
    /// only cleared by rolling back to a savepoint made before its work.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// tx.savepoint(Some("before_import")).await?;
    /// tx.rollback_to("before_import").await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback_to(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.check_scope_open()?;
        self.shared
            .run_exclusive(&format!("ROLLBACK TO SAVEPOINT {quoted}"))
            .await?;
        self.shared.lock().rolled_back_to(name);
        Ok(())
    }

    /// Releases the named savepoint, once the queries in flight are answered.
    pub(crate) async fn release_savepoint(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.check_scope_open()?;
        self.shared
            .run_exclusive(&format!("RELEASE SAVEPOINT {quoted}"))
            .await?;
        self.shared.lock().released(name);
        Ok(())
    }

    fn check_scope_open(&self) -> Result<()> {
        match &self.scope {
            Scope::Savepoint { name, finished, .. } if finished.load(Ordering::Acquire) => {
                Err(Error::transaction(format!(
                    "the nested transaction (savepoint {name}) is finished"
                )))
            }
            _ => Ok(()),
        }
    }

    async fn finish(&self, finish: Finish) -> Result<()> {
        match &self.scope {
            Scope::Outermost | Scope::Joined => self.shared.finish(finish).await,
            Scope::Savepoint {
                name,
                finished,
                turn,
                ..
            } => {
                if finished.swap(true, Ordering::AcqRel) {
                    return Err(Error::transaction(format!(
                        "the nested transaction (savepoint {name}) is already finished"
                    )));
                }
                // The next nested transaction of the outer scope may start once this
                // one's savepoint is gone.
                let _turn = turn
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                // This scope is finished from here on, so its own `lease` refuses: the
                // closing statements go through a handle on the whole transaction.
                let transaction = Self::joined(self.shared.clone());
                let failure = self.shared.abort_cause();
                if finish == Finish::Rollback || failure.is_some() {
                    transaction.rollback_to(name).await?;
                }
                transaction.release_savepoint(name).await?;
                match (finish, failure) {
                    (Finish::Commit, Some(cause)) => Err(Error::transaction(format!(
                        "the nested transaction (savepoint {name}) met an error, so it was \
                         rolled back to its savepoint and its work was not kept; the outer \
                         transaction goes on (error: {cause})"
                    ))),
                    _ => Ok(()),
                }
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
            Scope::Savepoint {
                name,
                sequence,
                finished,
                ..
            } if !finished.load(Ordering::Acquire) => {
                // Nothing can be sent from here; make sure the outer transaction cannot
                // commit work this nested one left half done, until it is rolled back
                // to this savepoint or an earlier one.
                self.shared.lock().mark_aborted(
                    format!(
                        "the nested transaction (savepoint {name}) was dropped without commit \
                         or rollback"
                    ),
                    *sequence,
                );
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
        self.check_scope_open()?;
        self.shared.lease()
    }
}

/// The state every handle of one transaction shares.
pub(crate) struct TxShared {
    engine: PostgresEngine,
    state: Mutex<TxState>,
    /// Each request in flight holds it shared; finishing holds it exclusively, so it
    /// waits for them, and requests that come later wait for it.
    gate: RwLock<()>,
    /// Held while a request is being sent, so that requests reach the server in the
    /// order they were first polled.
    turn: tokio::sync::Mutex<()>,
    savepoint_ids: AtomicU32,
    cursor_ids: AtomicU32,
}

struct TxState {
    /// Taken out when the transaction finishes; the connection goes back to the pool
    /// once the last request still using it is done.
    connection: Option<Arc<Connection>>,
    phase: Phase,
    /// Why the transaction can only roll back, if it can: each with the latest
    /// savepoint (by sequence) that a `ROLLBACK TO` may target to clear it.
    aborted: Vec<(String, u64)>,
    /// The serialization failure or deadlock that aborted it, for retrying.
    retryable: Option<DatabaseError>,
    /// A `commit()` that failed, as said to its caller.
    failed_commit: Option<String>,
    /// The savepoints PostgreSQL has open, oldest first, with their sequence numbers.
    savepoints: Vec<(String, u64)>,
    next_sequence: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    /// `commit` or `rollback` began: no request is admitted any more.
    Finishing(Finish),
    Committed,
    RolledBack,
}

/// Permits one request of a transaction: held until its answer came.
pub(crate) type RequestPermit<'a> = RwLockReadGuard<'a, ()>;

impl TxShared {
    fn new(engine: PostgresEngine, connection: Connection) -> Self {
        Self {
            engine,
            state: Mutex::new(TxState {
                connection: Some(Arc::new(connection)),
                phase: Phase::Active,
                aborted: Vec::new(),
                retryable: None,
                failed_commit: None,
                savepoints: Vec::new(),
                next_sequence: 0,
            }),
            gate: RwLock::new(()),
            turn: tokio::sync::Mutex::new(()),
            savepoint_ids: AtomicU32::new(0),
            cursor_ids: AtomicU32::new(0),
        }
    }

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

    /// Admits one request: waits while the transaction is being finished by someone
    /// else, and refuses once it is finishing or finished.
    pub(crate) async fn admit(&self) -> Result<RequestPermit<'_>> {
        let permit = self.gate.read().await;
        match self.lock().phase {
            Phase::Active => Ok(permit),
            phase => Err(finished_error(phase)),
        }
    }

    /// The turn to send a request; see [`TxShared::turn`].
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    /// A fresh cursor name, unique within this transaction.
    pub(crate) fn next_cursor_name(&self) -> String {
        let id = self.cursor_ids.fetch_add(1, Ordering::Relaxed) + 1;
        format!("pgengine_cursor_{id}")
    }

    /// Records a failure met inside the transaction: PostgreSQL has aborted it.
    pub(crate) fn note_failure(&self, error: &Error) {
        if error.database_error().is_none() && !error.is_connection_failure() {
            return; // refused before anything reached the server
        }
        let mut state = self.lock();
        state.mark_aborted(error.to_string(), u64::MAX);
        if let Some(db) = error.database_error().filter(|db| db.is_retryable()) {
            state.retryable.get_or_insert_with(|| db.clone());
        }
    }

    /// Why the transaction can only roll back, if it can.
    fn abort_cause(&self) -> Option<String> {
        self.lock().aborted.first().map(|(cause, _)| cause.clone())
    }

    /// The serialization failure or deadlock that aborted the transaction, if one did.
    fn retryable_cause(&self) -> Option<DatabaseError> {
        self.lock().retryable.clone()
    }

    /// The failure of a `commit()` the body made itself, if it failed.
    fn failed_commit(&self) -> Option<Error> {
        let state = self.lock();
        let message = state.failed_commit.as_ref()?;
        Some(match &state.retryable {
            Some(db) => Error::from_database(db.clone()),
            None => Error::transaction(format!(
                "the transaction's commit failed (the body went on and returned Ok): {message}"
            )),
        })
    }

    /// The sequence number of the latest savepoint named `name`.
    fn savepoint_sequence(&self, name: &str) -> u64 {
        let state = self.lock();
        state
            .savepoints
            .iter()
            .rev()
            .find(|(open, _)| open == name)
            .map_or(u64::MAX, |(_, sequence)| *sequence)
    }

    /// Runs a statement that ends part of the transaction (`RELEASE` or `ROLLBACK TO`
    /// a savepoint) once the requests in flight are answered.
    async fn run_exclusive(&self, sql: &str) -> Result<()> {
        let _exclusive = self.gate.write().await;
        let connection = {
            let state = self.lock();
            match (&state.connection, state.phase) {
                (Some(connection), Phase::Active) => connection.clone(),
                (_, phase) => return Err(finished_error(phase)),
            }
        };
        let result = self.engine.shared.simple(&connection, sql).await;
        if let Err(error) = &result {
            self.note_failure(error);
        }
        result
    }

    /// Commits or rolls back once the requests in flight are answered (none is
    /// admitted from the start), then lets the connection go back to the pool.
    async fn finish(&self, finish: Finish) -> Result<()> {
        {
            let mut state = self.lock();
            if state.phase != Phase::Active {
                return Err(finished_error(state.phase));
            }
            state.phase = Phase::Finishing(finish);
        }
        let _exclusive = self.gate.write().await;
        let (connection, aborted_by) = {
            let mut state = self.lock();
            let connection = state
                .connection
                .take()
                .expect("an active transaction has its connection");
            let abandoned = connection.has_unfinished_request().then(|| {
                "a request of the transaction was abandoned (its future dropped) before its \
                 answer came, so its outcome is unknown"
                    .to_owned()
            });
            let cause = state.aborted.first().map(|(cause, _)| cause.clone());
            (connection, cause.or(abandoned))
        };
        let result = self.end(&connection, finish, aborted_by).await;
        let mut state = self.lock();
        state.phase = match (finish, &result) {
            (Finish::Commit, Ok(())) => Phase::Committed,
            _ => Phase::RolledBack,
        };
        if let (Finish::Commit, Err(error)) = (finish, &result) {
            state.failed_commit = Some(error.to_string());
            if let Some(db) = error.database_error().filter(|db| db.is_retryable()) {
                state.retryable.get_or_insert_with(|| db.clone());
            }
        }
        result
    }

    /// Sends the end of the transaction on its connection.
    async fn end(
        &self,
        connection: &Connection,
        finish: Finish,
        aborted_by: Option<String>,
    ) -> Result<()> {
        let refused = |cause: String| {
            Error::transaction(format!(
                "cannot commit: an earlier error aborted the transaction, so it was rolled back \
                 and nothing was saved (first error: {cause})"
            ))
        };
        // An abandoned request may still be running: cancel it first, or the ROLLBACK
        // would wait behind it. Where that cannot be done for sure, nothing more is sent:
        // the connection is discarded when dropped, which ends the transaction.
        if connection.has_unfinished_request() {
            if !connection.cancel_unfinished_request().await {
                return match finish {
                    Finish::Commit => Err(refused(aborted_by.unwrap_or_default())),
                    Finish::Rollback => Ok(()),
                };
            }
            // Answers come in order: once the ROLLBACK is answered, whatever was
            // abandoned before has ended.
            connection.set_request_open(false);
        }
        if connection.is_broken() {
            // Nothing was committed: the server rolls back a session that ends.
            return match finish {
                Finish::Commit => Err(Error::new(
                    ErrorKind::Connection,
                    "cannot commit: the transaction's connection failed before COMMIT was sent, \
                     so the server rolled it back and nothing was saved",
                )),
                Finish::Rollback => Ok(()),
            };
        }
        let engine = &self.engine.shared;
        match (finish, aborted_by) {
            (Finish::Commit, None) => {
                let committed = engine.commit(connection).await;
                if let Err(error) = &committed {
                    if error.code() == Some(IN_FAILED_TRANSACTION) {
                        return Err(refused(error.to_string()));
                    }
                }
                committed
            }
            (Finish::Commit, Some(cause)) => {
                let _ = engine.rollback(connection).await;
                Err(refused(cause))
            }
            (Finish::Rollback, _) => match engine.rollback(connection).await {
                // A session that failed is rolled back by the server.
                Err(error) if error.is_connection_failure() => Ok(()),
                other => other,
            },
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

/// SQLSTATE `25P02`: a statement sent in a transaction that an error aborted.
pub(crate) const IN_FAILED_TRANSACTION: &str = "25P02";

impl TxState {
    /// Records why the transaction can only roll back; a `ROLLBACK TO` a savepoint of
    /// sequence `clearable_up_to` or earlier clears it.
    fn mark_aborted(&mut self, cause: String, clearable_up_to: u64) {
        if self.phase == Phase::Active {
            self.aborted.push((cause, clearable_up_to));
        }
    }

    fn savepoint_made(&mut self, name: &str) {
        self.next_sequence += 1;
        self.savepoints.push((name.to_owned(), self.next_sequence));
    }

    /// `ROLLBACK TO name` succeeded: the savepoints made after it are gone, and the
    /// aborts it undoes are cleared.
    fn rolled_back_to(&mut self, name: &str) {
        let Some(index) = self.savepoints.iter().rposition(|(open, _)| open == name) else {
            return;
        };
        let sequence = self.savepoints[index].1;
        self.savepoints.truncate(index + 1);
        self.aborted
            .retain(|(_, clearable_up_to)| sequence > *clearable_up_to);
        if self.aborted.is_empty() {
            self.retryable = None;
        }
    }

    /// `RELEASE name` succeeded: it and the savepoints made after it are gone.
    fn released(&mut self, name: &str) {
        if let Some(index) = self.savepoints.iter().rposition(|(open, _)| open == name) {
            self.savepoints.truncate(index);
        }
    }
}

fn finished_error(phase: Phase) -> Error {
    let what = match phase {
        Phase::Committed => "already committed",
        Phase::Finishing(Finish::Commit) => "being committed",
        Phase::Finishing(Finish::Rollback) => "being rolled back",
        _ => "already rolled back",
    };
    Error::transaction(format!(
        "the transaction is {what}; start a new one to run more queries"
    ))
}

/// The transactions ambient on the current task, one per engine.
pub(crate) mod ambient {
    use std::future::Future;
    use std::sync::Arc;

    use super::TxShared;

    /// The innermost transaction scope of one engine on this task: the transaction,
    /// and the turn its nested savepoint transactions take one at a time.
    #[derive(Clone)]
    pub(crate) struct Scope {
        pub(crate) transaction: Arc<TxShared>,
        pub(crate) nested_turn: Arc<tokio::sync::Mutex<()>>,
    }

    impl Scope {
        pub(crate) fn new(transaction: Arc<TxShared>) -> Self {
            Self {
                transaction,
                nested_turn: Arc::default(),
            }
        }
    }

    tokio::task_local! {
        static AMBIENT: Vec<(u64, Scope)>;
    }

    /// The innermost scope of the engine `engine_id` on this task, if any.
    pub(crate) fn current_scope(engine_id: u64) -> Option<Scope> {
        AMBIENT
            .try_with(|ambient| {
                ambient
                    .iter()
                    .find(|(id, _)| *id == engine_id)
                    .map(|(_, scope)| scope.clone())
            })
            .ok()
            .flatten()
    }

    /// The ambient transaction of the engine `engine_id` on this task, if any.
    pub(crate) fn current(engine_id: u64) -> Option<Arc<TxShared>> {
        current_scope(engine_id).map(|scope| scope.transaction)
    }

    /// Runs `future` with `scope` as the innermost scope of engine `engine_id`.
    pub(crate) fn scope<F: Future>(
        engine_id: u64,
        scope: Scope,
        future: F,
    ) -> impl Future<Output = F::Output> {
        let mut ambient = AMBIENT.try_with(Vec::clone).unwrap_or_default();
        ambient.retain(|(id, _)| *id != engine_id);
        ambient.push((engine_id, scope));
        AMBIENT.scope(ambient, future)
    }
}
