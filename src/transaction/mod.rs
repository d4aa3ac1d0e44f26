//! Transactions: [`TransactionBuilder`] (the options, `begin` and `run`),
//! [`PostgresTransaction`] (the handle), the nesting policy ([`Nested`]) and the
//! ambient scope that routes an engine's queries into the task's transaction.
//!
//! - `state`: [`TxShared`](state::TxShared), the one owner of a transaction's state
//!   (phase, aborts, savepoints) and of the order of its concurrent requests;
//! - `handle`: what a caller holds, outermost, joined or nested as a savepoint;
//! - `builder`: the options, beginning, running a closure with commit, rollback and
//!   retry, and the nesting policy;
//! - `ambient`: the task-local scopes.

pub(crate) mod ambient;
mod builder;
mod handle;
pub(crate) mod state;

pub use builder::{IsolationLevel, Nested, RunOnce, RunRetried, TransactionBuilder};
pub use handle::PostgresTransaction;
