//! The state of one transaction, shared by all its handles: its connection, its phase
//! (active, finishing, committed, rolled back), why it was aborted, its savepoints; and
//! the gate and turn that order its concurrent requests.
//!
//! State changes only through [`TxShared`]'s methods. The session-level state of the
//! connection under it (in a transaction, a request open, broken) is the
//! [`Connection`]'s own; the end of the transaction goes through
//! [`EngineContext::end_transaction`], the one function every path uses.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{RwLock, RwLockReadGuard};
use tracing::Span;

use crate::context::{EngineContext, Finish};
use crate::error::{DatabaseError, Error, ErrorKind, Result};
use crate::identifier::quote_identifier;
use crate::pool::Connection;
use crate::telemetry;

/// The state every handle of one transaction shares.
pub(crate) struct TxShared {
    context: Arc<EngineContext>,
    state: Mutex<TxState>,
    /// Each request in flight holds it shared; finishing holds it exclusively, so it
    /// waits for them, and requests that come later wait for it.
    gate: RwLock<()>,
    /// Held while a request is being sent, so that requests reach the server in the
    /// order they were first polled.
    turn: tokio::sync::Mutex<()>,
    savepoint_ids: AtomicU32,
    cursor_ids: AtomicU32,
    /// The transaction's span (see [`telemetry`](crate::telemetry)), closed when the
    /// last handle goes.
    span: Span,
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
pub(crate) enum Phase {
    Active,
    /// `commit` or `rollback` began: no request is admitted any more.
    Finishing(Finish),
    Committed,
    RolledBack,
}

/// Permits one request of a transaction: held until its answer came.
pub(crate) type RequestPermit<'a> = RwLockReadGuard<'a, ()>;

impl TxShared {
    /// The state of a transaction just begun on `connection`, traced by `span`.
    pub(crate) fn new(context: Arc<EngineContext>, connection: Connection, span: Span) -> Self {
        Self {
            span,
            context,
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

    /// The engine this transaction runs on.
    pub(crate) fn context(&self) -> &Arc<EngineContext> {
        &self.context
    }

    /// The connection for the next request, unless the transaction is finished.
    pub(crate) fn active_connection(&self) -> Result<Arc<Connection>> {
        let state = self.lock();
        match (&state.connection, state.phase) {
            (Some(connection), Phase::Active) => Ok(connection.clone()),
            (_, phase) => Err(finished_error(phase)),
        }
    }

    /// The transaction's span: its requests' spans are its children.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Where the transaction is in its life.
    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// A fresh savepoint name, `savepoint_1`, `savepoint_2`, … within this transaction.
    pub(crate) fn next_savepoint_name(&self) -> String {
        let id = self.savepoint_ids.fetch_add(1, Ordering::Relaxed) + 1;
        format!("savepoint_{id}")
    }

    /// Admits one request: waits while the transaction is being finished by someone
    /// else, and refuses once it is finishing or finished.
    pub(crate) async fn admit(&self) -> Result<RequestPermit<'_>> {
        // Taken at once when free (the usual case); a waiting writer holds the permits,
        // so this never overtakes it.
        let permit = match self.gate.try_read() {
            Ok(permit) => permit,
            Err(_) => self.gate.read().await,
        };
        match self.lock().phase {
            Phase::Active => Ok(permit),
            phase => Err(finished_error(phase)),
        }
    }

    /// The turn to send a request: requests of the transaction reach the server in the
    /// order they took it (the runner holds it until its request is on the wire).
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        // Taken at once when free; a released turn goes straight to its next waiter, so
        // this never overtakes one.
        match self.turn.try_lock() {
            Ok(turn) => turn,
            Err(_) => self.turn.lock().await,
        }
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
    pub(crate) fn abort_cause(&self) -> Option<String> {
        self.lock().aborted.first().map(|(cause, _)| cause.clone())
    }

    /// The serialization failure or deadlock that aborted the transaction, if one did.
    pub(crate) fn retryable_cause(&self) -> Option<DatabaseError> {
        self.lock().retryable.clone()
    }

    /// The failure of a `commit()` the body made itself, if it failed.
    pub(crate) fn failed_commit(&self) -> Option<Error> {
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
    pub(crate) fn savepoint_sequence(&self, name: &str) -> u64 {
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
        let result =
            telemetry::in_span(&self.span, self.context.run_simple(&connection, sql)).await;
        if let Err(error) = &result {
            self.note_failure(error);
        }
        result
    }

    /// Commits or rolls back once the requests in flight are answered (none is
    /// admitted from the start), then lets the connection go back to the pool.
    pub(crate) async fn end(&self, finish: Finish) -> Result<()> {
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
        let result =
            telemetry::in_span(&self.span, self.send_end(&connection, finish, aborted_by)).await;
        let outcome = match (finish, &result) {
            (Finish::Commit, Ok(())) => "commit",
            (Finish::Commit, Err(error)) if error.is_outcome_unknown() => "unknown",
            _ => "rollback",
        };
        self.span.record("db.transaction.outcome", outcome);
        if let Err(error) = &result {
            telemetry::record_error(&self.span, error);
        }
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
    async fn send_end(
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
        let context = &self.context;
        match (finish, aborted_by) {
            // An abort the engine did not see makes the server answer ROLLBACK, which
            // `end_transaction` refuses.
            (Finish::Commit, None) => context.end_transaction(connection, Finish::Commit).await,
            (Finish::Commit, Some(cause)) => {
                let _ = context.end_transaction(connection, Finish::Rollback).await;
                Err(refused(cause))
            }
            (Finish::Rollback, _) => {
                match context.end_transaction(connection, Finish::Rollback).await {
                    // A session that failed is rolled back by the server.
                    Err(error) if error.is_connection_failure() => Ok(()),
                    other => other,
                }
            }
        }
    }

    /// Records that the savepoint `name` was made.
    pub(crate) fn savepoint_made(&self, name: &str) {
        self.lock().savepoint_made(name);
    }

    /// Rolls back to the savepoint `name` once the requests in flight are answered:
    /// undoes what was done since, and clears the aborts that this undoes.
    pub(crate) async fn rollback_to(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.run_exclusive(&format!("ROLLBACK TO SAVEPOINT {quoted}"))
            .await?;
        self.lock().rolled_back_to(name);
        Ok(())
    }

    /// Releases the savepoint `name` once the requests in flight are answered.
    pub(crate) async fn release(&self, name: &str) -> Result<()> {
        let quoted = quote_identifier(name)?;
        self.run_exclusive(&format!("RELEASE SAVEPOINT {quoted}"))
            .await?;
        self.lock().released(name);
        Ok(())
    }

    /// Records that a nested transaction was left half done: until the transaction
    /// is rolled back to the savepoint of sequence `clearable_up_to` or an earlier
    /// one, it can only roll back.
    pub(crate) fn mark_aborted(&self, cause: String, clearable_up_to: u64) {
        self.lock().mark_aborted(cause, clearable_up_to);
    }

    /// The owner went away with the transaction open: release the connection, which
    /// rolls back before anyone else can use it.
    pub(crate) fn abandon(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Active {
            self.span.record("db.transaction.outcome", "rollback");
            state.phase = Phase::RolledBack;
            state.connection = None;
        }
    }
}

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
