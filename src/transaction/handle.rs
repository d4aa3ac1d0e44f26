//! [`PostgresTransaction`]: a handle on a transaction — the outermost one, one joined
//! from inside it, or a nested transaction kept as a savepoint.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::state::{Phase, TxShared};
use crate::context::Finish;
use crate::error::{Error, Result};
use crate::executor::{Executor, sealed};
use crate::runner::Runner;
use crate::savepoint::Savepoint;

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
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let tx = engine.begin().await?;
/// let (a, b) = tokio::join!(tx.fetch("SELECT 1"), tx.fetch("SELECT 2")); // pipelined
/// tx.commit().await?;
/// # Ok(()) });
/// ```
pub struct PostgresTransaction {
    shared: Arc<TxShared>,
    role: Role,
}

/// Which part of the transaction a handle stands for.
enum Role {
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

impl PostgresTransaction {
    /// The handle that owns a transaction just begun.
    pub(crate) fn outermost(shared: Arc<TxShared>) -> Self {
        Self {
            shared,
            role: Role::Outermost,
        }
    }

    /// A handle on a transaction owned elsewhere.
    pub(crate) fn joined(shared: Arc<TxShared>) -> Self {
        Self {
            shared,
            role: Role::Joined,
        }
    }

    /// A nested transaction kept as the savepoint `name` (of sequence `sequence`),
    /// holding its scope's `turn` for nested transactions until it is finished.
    pub(crate) fn nested_savepoint(
        shared: Arc<TxShared>,
        name: String,
        sequence: u64,
        turn: OwnedMutexGuard<()>,
    ) -> Self {
        Self {
            shared,
            role: Role::Savepoint {
                name,
                sequence,
                finished: AtomicBool::new(false),
                turn: Mutex::new(Some(turn)),
            },
        }
    }

    /// The state this handle shares with the transaction's other handles.
    pub(crate) fn shared(&self) -> &Arc<TxShared> {
        &self.shared
    }

    /// Whether this handle stands for a nested transaction kept as a savepoint.
    pub(crate) fn is_nested_savepoint(&self) -> bool {
        matches!(self.role, Role::Savepoint { .. })
    }

    /// Runs `f` with the driver's [`Client`](tokio_postgres::Client) of this
    /// transaction's connection, its other requests waiting until `f` is done: the way
    /// down for code written for tokio-postgres (code generated for its
    /// `GenericClient`, say). The client is shared, so it cannot begin a transaction of
    /// its own; `f` must not end this one. The statement caches are renewed afterwards
    /// (`f` may have changed the schema).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// let tx = engine.begin().await?;
    /// tx.with_client(|client| Box::pin(async move {
    ///     client.execute("INSERT INTO band (name, popularity) VALUES ($1, $2)", &[&"Gophers", &3000]).await?;
    ///     Ok::<_, pgengine::Error>(())
    /// }))
    /// .await?;
    /// tx.commit().await?;
    /// # Ok(()) });
    /// ```
    pub async fn with_client<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: for<'c> FnOnce(
            &'c tokio_postgres::Client,
        ) -> futures::future::BoxFuture<'c, std::result::Result<T, E>>,
        E: From<Error>,
    {
        sealed::Sealed::runner(self).await?.with_client(f).await
    }

    /// Commits. Fails, rolling back, when PostgreSQL already aborted the transaction
    /// (a statement failed): nothing is saved then, and the error says so. When the
    /// connection fails while the `COMMIT` is in flight, the error is
    /// [`ErrorKind::CommitOutcomeUnknown`]: it may or may not have committed. On a
    /// nested savepoint handle, releases the savepoint (rolling back to it first if
    /// its work met an error); on a joined handle, commits the outer transaction (as
    /// the seed does).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// tx.commit().await?;
    /// # Ok(()) });
    /// ```
    pub async fn commit(&self) -> Result<()> {
        self.end(Finish::Commit).await
    }

    /// Rolls back. On a nested savepoint handle, rolls back to the savepoint and
    /// releases it; on a joined handle, rolls back the outer transaction.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// tx.rollback().await?;
    /// # Ok(()) });
    /// ```
    pub async fn rollback(&self) -> Result<()> {
        self.end(Finish::Rollback).await
    }

    /// Whether the transaction is still open (neither committed nor rolled back, nor
    /// being so).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// tx.commit().await?;
    /// assert!(!tx.is_active());
    /// # Ok(()) });
    /// ```
    pub fn is_active(&self) -> bool {
        let scope_open = match &self.role {
            Role::Savepoint { finished, .. } => !finished.load(Ordering::Acquire),
            _ => true,
        };
        scope_open && self.shared.phase() == Phase::Active
    }

    /// Makes a savepoint: named (validated and quoted; anything unsafe is an
    /// [`ErrorKind::InvalidInput`] error and nothing is sent) or, with `None`, numbered
    /// `savepoint_1`, `savepoint_2`, … per transaction.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// let first = tx.savepoint(None).await?;
    /// assert_eq!(first.name(), "savepoint_1");
    /// assert!(tx.savepoint(Some("x\"; DROP TABLE band; --")).await.is_err());
    /// # Ok(()) });
    /// ```
    pub async fn savepoint(&self, name: Option<&str>) -> Result<Savepoint> {
        let name = match name {
            Some(name) => name.to_owned(),
            None => self.shared.next_savepoint_name(),
        };
        let quoted = crate::identifier::quote_identifier(&name)?;
        self.check_scope_open()?;
        Runner::in_transaction(&self.shared)?
            .simple(&format!("SAVEPOINT {quoted}"))
            .await?;
        self.shared.savepoint_made(&name);
        Ok(Savepoint::new(self.shared.clone(), name))
    }

    /// Rolls back to the named savepoint: undoes what was done since, and makes an
    /// aborted transaction usable again. It waits for the transaction's queries still
    /// in flight. An abort left by a nested transaction that was dropped half-way is
    /// only cleared by rolling back to a savepoint made before its work.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// tx.savepoint(Some("before_import")).await?;
    /// tx.rollback_to("before_import").await?;
    /// # Ok(()) });
    /// ```
    pub async fn rollback_to(&self, name: &str) -> Result<()> {
        self.check_scope_open()?;
        self.shared.rollback_to(name).await
    }

    fn check_scope_open(&self) -> Result<()> {
        match &self.role {
            Role::Savepoint { name, finished, .. } if finished.load(Ordering::Acquire) => {
                Err(Error::transaction(format!(
                    "the nested transaction (savepoint {name}) is finished"
                )))
            }
            _ => Ok(()),
        }
    }

    async fn end(&self, finish: Finish) -> Result<()> {
        match &self.role {
            Role::Outermost | Role::Joined => self.shared.end(finish).await,
            Role::Savepoint {
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
                // This scope is finished from here on, so its own queries are refused:
                // the closing statements go to the whole transaction.
                let failure = self.shared.abort_cause();
                if finish == Finish::Rollback || failure.is_some() {
                    self.shared.rollback_to(name).await?;
                }
                self.shared.release(name).await?;
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
    ///
    /// The future is made out of line and boxed: the closure form awaits it once per
    /// level of nesting, so only a pointer stays in each level's stack frame.
    #[inline(never)]
    pub(crate) fn finish_if_active(
        &self,
        finish: Finish,
    ) -> Pin<Box<impl Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            if self.is_active() {
                self.end(finish).await
            } else {
                Ok(())
            }
        })
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        match &self.role {
            Role::Outermost => self.shared.abandon(),
            Role::Savepoint {
                name,
                sequence,
                finished,
                ..
            } if !finished.load(Ordering::Acquire) => {
                // Nothing can be sent from here; make sure the outer transaction cannot
                // commit work this nested one left half done, until it is rolled back
                // to this savepoint or an earlier one.
                self.shared.mark_aborted(
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
        let scope = match &self.role {
            Role::Outermost => "outermost",
            Role::Joined => "joined",
            Role::Savepoint { .. } => "savepoint",
        };
        f.debug_struct("PostgresTransaction")
            .field("scope", &scope)
            .field("phase", &self.shared.phase())
            .finish()
    }
}

impl sealed::Sealed for PostgresTransaction {
    async fn runner(&self) -> Result<Runner> {
        self.check_scope_open()?;
        Runner::in_transaction(&self.shared)
    }
}

impl Executor for PostgresTransaction {}
