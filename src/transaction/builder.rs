//! [`TransactionBuilder`]: describes a transaction (nesting policy, isolation, read-only,
//! deferrable, statement timeout, retry), then begins it or runs a closure in it.

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::ambient;
use super::handle::PostgresTransaction;
use super::state::TxShared;
use crate::context::{EngineContext, Finish};
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::telemetry;

/// What a transaction started inside another one (on the same task, same engine) does.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// engine.transaction().run(async |_outer| {
///     // Fails alone, keeps the outer transaction going:
///     let inner = engine.transaction().nested(Nested::Savepoint).run(async |tx| {
///         tx.execute("INSERT INTO band (name) VALUES ('dup')").await
///     }).await;
///     Ok::<_, pgengine::Error>(())
/// }).await?;
/// # Ok(()) });
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
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// let tx = engine.transaction().isolation(pgengine::IsolationLevel::RepeatableRead).begin().await?;
/// # Ok(()) });
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
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let total: i64 = engine
///     .transaction()
///     .isolation(IsolationLevel::Serializable)
///     .read_only(true)
///     .retry(RetryPolicy::new(5))
///     .run(async |tx| Ok::<_, pgengine::Error>(tx.fetch_one("SELECT sum(balance)::bigint FROM account").await?.get(0)))
///     .await?;
/// # Ok(()) });
/// ```
///
/// Its type says how often [`run`](Self::run)'s closure may run: once
/// ([`RunOnce`], the default: any async closure), or again after a conflict
/// ([`RunRetried`], after [`retry`](Self::retry): a closure that can be cloned for
/// each attempt).
#[derive(Clone)]
#[must_use = "a transaction builder does nothing until `run` or `begin`"]
pub struct TransactionBuilder<Attempts = RunOnce> {
    context: Arc<EngineContext>,
    nested: Nested,
    isolation: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
    statement_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    attempts: PhantomData<fn() -> Attempts>,
}

/// A [`TransactionBuilder`] without a retry policy: `run` calls its closure once, so
/// the closure may be any `AsyncFnOnce` (borrowing, mutating or moving what it uses).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// let builder: pgengine::TransactionBuilder<pgengine::RunOnce> = engine.transaction();
/// # let _ = builder;
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RunOnce;

/// A [`TransactionBuilder`] with a retry policy: `run` may call its closure again,
/// each attempt on a clone of it, so the closure must be `Clone` (closures that borrow
/// or clone what they use are; one that captures a `&mut` is not: count attempts with a
/// `Cell` or an atomic).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// let builder: pgengine::TransactionBuilder<pgengine::RunRetried> =
///     engine.transaction().retry(pgengine::RetryPolicy::new(3));
/// # let _ = builder;
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RunRetried;

impl TransactionBuilder {
    /// A transaction on the engine of `context`, with the default options.
    pub(crate) fn new(context: Arc<EngineContext>) -> Self {
        Self {
            context,
            nested: Nested::default(),
            isolation: None,
            read_only: None,
            deferrable: None,
            statement_timeout: None,
            retry: None,
            attempts: PhantomData,
        }
    }

    /// Run the closure again after a serialization failure or a deadlock (closure form
    /// only); see [`RetryPolicy`]. Each attempt runs a clone of the closure
    /// ([`RunRetried`]).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine.transaction()
    ///     .isolation(IsolationLevel::Serializable)
    ///     .retry(RetryPolicy::new(5))   // the body runs again after 40001 / 40P01
    ///     .run(async |tx| tx.execute("UPDATE account SET balance = balance + 1 WHERE id = 1").await)
    ///     .await?;
    /// # Ok(()) });
    /// ```
    pub fn retry(self, policy: RetryPolicy) -> TransactionBuilder<RunRetried> {
        TransactionBuilder {
            context: self.context,
            nested: self.nested,
            isolation: self.isolation,
            read_only: self.read_only,
            deferrable: self.deferrable,
            statement_timeout: self.statement_timeout,
            retry: Some(policy),
            attempts: PhantomData,
        }
    }
}

impl<Attempts> TransactionBuilder<Attempts> {
    /// The seed's switch: `true` joins an outer transaction ([`Nested::Join`]), `false`
    /// makes nesting an error ([`Nested::Forbid`]).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine.transaction().run(async |_outer| {
    ///     let refused = engine.transaction().allow_nested(false).begin().await;
    ///     assert_eq!(refused.unwrap_err().kind(), pgengine::ErrorKind::Transaction);
    ///     Ok::<_, pgengine::Error>(())
    /// }).await?;
    /// # Ok(()) });
    /// ```
    pub fn allow_nested(mut self, allow: bool) -> Self {
        self.nested = if allow { Nested::Join } else { Nested::Forbid };
        self
    }

    /// The nesting policy in full; see [`Nested`].
    ///
    /// Nested [`Nested::Savepoint`] transactions are polled one inside another, so their
    /// frames add up on the task's stack: pgengine keeps only pointers there (each
    /// level's futures are boxed), and the body's own futures add theirs. Tested: 40
    /// levels deep on a 2 MiB thread (tokio's default worker stack) in a debug build,
    /// about 40 KB of stack per level; release builds take less. For deeper nesting, give
    /// the runtime's threads a larger stack (`thread_stack_size`).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine.transaction().run(async |tx| {
    ///     let inner = engine.transaction().nested(Nested::Savepoint).run(async |tx| {
    ///         tx.execute("INSERT INTO band (name) VALUES ('Rustaceans')").await  // a duplicate
    ///     }).await;
    ///     assert!(inner.is_err());                         // rolled back to its savepoint
    ///     tx.execute("INSERT INTO band (name) VALUES ('Gophers')").await  // the outer goes on
    /// }).await?;
    /// # Ok(()) });
    /// ```
    pub fn nested(mut self, nested: Nested) -> Self {
        self.nested = nested;
        self
    }

    /// The isolation level (only for an outermost transaction).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let tx = engine.transaction().isolation(IsolationLevel::Serializable).begin().await?;
    /// let level: String = tx.fetch_one("SHOW transaction_isolation").await?.get(0);
    /// assert_eq!(level, "serializable");
    /// tx.commit().await?;
    /// # Ok(()) });
    /// ```
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// `READ ONLY` (true) or `READ WRITE` (false) (only for an outermost transaction).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let tx = engine.transaction().read_only(true).begin().await?;
    /// assert!(tx.execute("DELETE FROM band").await.is_err());   // refused by the server
    /// tx.rollback().await?;
    /// # Ok(()) });
    /// ```
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// `DEFERRABLE` (true) or `NOT DEFERRABLE` (false); matters for serializable
    /// read-only transactions (only for an outermost transaction).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::IsolationLevel;
    /// use pgengine::prelude::*;
    /// let report = engine.transaction().isolation(IsolationLevel::Serializable).read_only(true).deferrable(true);
    /// let total: i64 = report
    ///     .run(async |tx| Ok::<_, pgengine::Error>(tx.fetch_one("SELECT sum(balance) FROM account").await?.get(0)))
    ///     .await?;
    /// assert_eq!(total, 200);
    /// # Ok(()) });
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
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use std::time::Duration;
    /// use pgengine::prelude::*;
    /// let tx = engine.transaction().statement_timeout(Duration::from_millis(100)).begin().await?;
    /// let slow = tx.execute("SELECT pg_sleep(5)").await.unwrap_err();
    /// assert_eq!(slow.database_error().unwrap().code, "57014");   // query_canceled
    /// tx.rollback().await?;
    /// # Ok(()) });
    /// ```
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
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
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let tx = engine.transaction().read_only(true).begin().await?;
    /// let rows = tx.fetch("SELECT * FROM band").await?;
    /// tx.commit().await?;
    /// # Ok(()) });
    /// ```
    pub async fn begin(self) -> Result<PostgresTransaction> {
        match ambient::current_scope(self.context.id) {
            Some(outer) => self.enter_nested(outer, Wait::Refuse).await,
            None => self.begin_outermost(1).await,
        }
    }
}

impl TransactionBuilder<RunOnce> {
    /// Runs `body` in the transaction: commits when it returns `Ok`, rolls back when it
    /// returns `Err` or panics (the panic then continues). Queries through the engine
    /// inside `body`, on this task, run in the transaction too.
    ///
    /// Without a retry policy `body` runs once; with one (after
    /// [`retry`](TransactionBuilder::retry)), see
    /// [`TransactionBuilder<RunRetried>::run`](TransactionBuilder::<RunRetried>::run).
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
    /// The returned future is `Send` when the closure's is, so `run` works in spawned
    /// tasks (axum and tonic handlers) with a closure that borrows the handler's locals.
    /// (The closure is an `AsyncFnOnce`, called once per attempt: with an `AsyncFnMut`,
    /// whose future borrows the closure, today's compiler cannot prove such a future
    /// `Send`, rust-lang/rust#139475.)
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let id: i32 = engine.transaction().run(async |tx| {
    ///     let row = tx.fetch_one(sql!("INSERT INTO band (name) VALUES ({}) RETURNING id", "Crustaceans")).await?;
    ///     tx.execute(sql!("INSERT INTO concert (band_id) VALUES ({})", row.get::<_, i32>(0))).await?;
    ///     Ok::<_, pgengine::Error>(row.get(0))
    /// }).await?;
    /// # Ok(()) });
    /// ```
    pub async fn run<T, E, F>(self, body: F) -> std::result::Result<T, E>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let mut body = Some(body);
        self.run_attempts(move || body.take().expect("without a retry policy, one attempt"))
            .await
    }
}

impl TransactionBuilder<RunRetried> {
    /// Runs `body` in the transaction, as
    /// [`TransactionBuilder<RunOnce>::run`](TransactionBuilder::<RunOnce>::run) does, and
    /// runs it again (a clone of it) after a serialization failure or a deadlock (met by a
    /// query, by the implicit `COMMIT` or by a `tx.commit()` inside the body); when the
    /// attempts run out, the error is that database error with [`Error::attempts`] set. A
    /// commit whose outcome is unknown ([`ErrorKind::CommitOutcomeUnknown`]) is never
    /// retried. Nested in another transaction, it is never retried either (the outer
    /// transaction is).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let (from, to, amount) = (1, 2, 10);
    /// engine
    ///     .transaction()
    ///     .isolation(IsolationLevel::Serializable)
    ///     .retry(RetryPolicy::new(5))
    ///     .run(async |tx| {
    ///         tx.execute(sql!("UPDATE account SET balance = balance - {} WHERE id = {}", amount, from)).await?;
    ///         tx.execute(sql!("UPDATE account SET balance = balance + {} WHERE id = {}", amount, to)).await
    ///     })
    ///     .await?;
    /// # Ok(()) });
    /// ```
    pub async fn run<T, E, F>(self, body: F) -> std::result::Result<T, E>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E> + Clone,
        E: From<Error>,
    {
        self.run_attempts(move || body.clone()).await
    }
}

impl<Attempts> TransactionBuilder<Attempts> {
    /// Runs a body from `next_body` in the transaction, and another after each
    /// retryable failure while the policy allows.
    async fn run_attempts<T, E, F>(self, next_body: impl FnMut() -> F) -> std::result::Result<T, E>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        // Each path boxed on its own: a nested transaction's frame holds only a pointer,
        // so nesting deep costs little stack per level.
        match ambient::current_scope(self.context.id) {
            Some(outer) => self.run_nested(outer, next_body).await,
            None => self.run_outermost(next_body).await,
        }
    }

    /// Runs `body` in a transaction of its own, retried under the policy (made out of
    /// line and boxed, as [`run_nested`](Self::run_nested) explains).
    #[inline(never)]
    fn run_outermost<T, E, F>(
        self,
        next_body: impl FnMut() -> F,
    ) -> Pin<Box<impl Future<Output = std::result::Result<T, E>>>>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        Box::pin(self.run_outermost_inner(next_body))
    }

    async fn run_outermost_inner<T, E, F>(
        self,
        mut next_body: impl FnMut() -> F,
    ) -> std::result::Result<T, E>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let engine_id = self.context.id;
        let mut attempt = 1;
        loop {
            // Boxed: the pool's checkout is most of this future, needed only until BEGIN is
            // answered (each box of these futures stays small enough for the allocator's
            // per-thread cache).
            let tx = Box::pin(self.begin_outermost(attempt)).await?;
            // Boxed: the body's future is large, and this one would copy it whole at
            // each move; a box is moved as a pointer.
            let body = start_body(next_body(), &tx);
            let scope = ambient::Scope::new(tx.shared().clone());
            let scoped = ambient::scope(engine_id, scope, body);
            let outcome = telemetry::in_span(tx.shared().span(), scoped).await;
            let retryable = match outcome {
                Err(panic) => {
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    std::panic::resume_unwind(panic)
                }
                Ok(Ok(value)) => match tx.finish_if_active(Finish::Commit).await {
                    Ok(()) => match tx.shared().failed_commit() {
                        // The body committed itself, and that commit failed.
                        Some(error) => error,
                        None => return Ok(value),
                    },
                    Err(error) => error,
                },
                Ok(Err(error)) => {
                    let _ = tx.finish_if_active(Finish::Rollback).await;
                    match tx.shared().retryable_cause() {
                        Some(cause) if self.retry.is_some() => Error::from_database(cause),
                        _ => return Err(error),
                    }
                }
            };
            // A serialization failure or deadlock that the body swallowed still aborted
            // the transaction: retry for it too.
            let retryable = match (retryable, tx.shared().retryable_cause()) {
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

    /// Runs `body` nested in the transaction of `outer`, under the nesting policy.
    ///
    /// Every future this awaits is made out of line and boxed, so that a level of
    /// nesting keeps only pointers on the stack (the bodies of nested transactions are
    /// polled one inside another: their frames add up).
    #[inline(never)]
    fn run_nested<T, E, F>(
        self,
        outer: ambient::Scope,
        next_body: impl FnMut() -> F,
    ) -> Pin<Box<impl Future<Output = std::result::Result<T, E>>>>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        Box::pin(self.run_nested_inner(outer, next_body))
    }

    async fn run_nested_inner<T, E, F>(
        self,
        outer: ambient::Scope,
        mut next_body: impl FnMut() -> F,
    ) -> std::result::Result<T, E>
    where
        F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let tx = self.enter_nested(outer, Wait::Queue).await?;
        let body = next_body();
        if !tx.is_nested_savepoint() {
            return body(&tx).await;
        }
        // The nested scope is ambient for the body: transactions nested in it queue on
        // it, not on the outer scope (which this one holds).
        let scope = ambient::Scope::new(tx.shared().clone());
        let body = start_body(body, &tx);
        match ambient::scope(self.context.id, scope, body).await {
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

    /// Enters a transaction nested in `outer`'s (made out of line and boxed, as
    /// [`run_nested`](Self::run_nested) explains).
    #[inline(never)]
    fn enter_nested(
        &self,
        outer: ambient::Scope,
        wait: Wait,
    ) -> Pin<Box<impl Future<Output = Result<PostgresTransaction>> + Send + '_>> {
        Box::pin(self.enter_nested_inner(outer, wait))
    }

    async fn enter_nested_inner(
        &self,
        outer: ambient::Scope,
        wait: Wait,
    ) -> Result<PostgresTransaction> {
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
                Ok(PostgresTransaction::nested_savepoint(
                    outer.transaction,
                    name,
                    sequence,
                    turn,
                ))
            }
        }
    }

    /// Begins a transaction (the `attempt`th of a retried one) on a connection of its
    /// own.
    async fn begin_outermost(&self, attempt: u32) -> Result<PostgresTransaction> {
        // Read-only work goes to a read replica when one is fit.
        let routed = match self.read_only {
            Some(true) => self.context.replica_for_reads().await,
            _ => None,
        };
        let (context, connection) = match routed {
            Some((replica, connection)) => (replica, connection),
            None => (self.context.clone(), self.context.pool.get().await?),
        };
        let context = &context;
        let span = context.log.telemetry().transaction_span(attempt);
        // Marked first: if BEGIN fails or is abandoned, the connection is rolled back.
        connection.set_in_transaction(true);
        let begun =
            telemetry::in_span(&span, context.run_simple(&connection, &self.begin_sql())).await;
        if let Err(error) = &begun {
            span.record("db.transaction.outcome", "rollback");
            telemetry::record_error(&span, error);
        }
        begun?;
        Ok(PostgresTransaction::outermost(Arc::new(TxShared::new(
            context.clone(),
            connection,
            span,
        ))))
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

impl<Attempts> std::fmt::Debug for TransactionBuilder<Attempts> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionBuilder")
            .field("engine", &self.context.id)
            .field("nested", &self.nested)
            .field("isolation", &self.isolation)
            .field("read_only", &self.read_only)
            .field("deferrable", &self.deferrable)
            .field("statement_timeout", &self.statement_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Starts the closure's body for `tx`, catching its panics: made out of line and boxed,
/// so that the body's future (as large as the closure makes it) never sits in the
/// frame of the code that awaits it — nested transactions' frames add up.
#[inline(never)]
fn start_body<'a, T, E, F>(
    body: F,
    tx: &'a PostgresTransaction,
) -> Pin<Box<impl Future<Output = std::thread::Result<std::result::Result<T, E>>> + 'a>>
where
    F: AsyncFnOnce(&PostgresTransaction) -> std::result::Result<T, E> + 'a,
{
    Box::pin(AssertUnwindSafe(body(tx)).catch_unwind())
}
