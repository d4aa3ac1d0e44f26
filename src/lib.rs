//! # pgengine
//!
//! An async PostgreSQL engine: the layer between your code (or your ORM) and the wire
//! driver, [`tokio-postgres`](tokio_postgres). It owns the connection pool and gives
//! transactions that never leak, nested transactions with a policy, savepoints,
//! *atomic* bundles of queries sent in a few round trips, and batched streaming of
//! large results in bounded memory.
//!
//! ```
//! use pgengine::prelude::*;
//!
//! # pgengine_testing::doctest(async |engine| {
//! # /*
//! let engine = PostgresEngine::connect("postgres://postgres@localhost/app").await?;
//! # */
//! engine.run_ddl("CREATE TABLE IF NOT EXISTS band (name text PRIMARY KEY, popularity int)").await?;
//!
//! engine.transaction().run(async |tx| {
//!     tx.execute(sql!("INSERT INTO band (name, popularity) VALUES ({}, {})", "Gophers", 3000)).await?;
//!     tx.execute(sql!("INSERT INTO band (name, popularity) VALUES ({}, {})", "Crabs", 500)).await?;
//!     Ok::<_, pgengine::Error>(())
//! }).await?;
//!
//! let popular = engine.fetch(sql!("SELECT name FROM band WHERE popularity > {}", 2500)).await?;
//! assert_eq!(popular[0].get::<_, &str>(0), "Gophers");
//! # Ok(()) });
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
// Without TLS the connector is `NoTls`, which is `Copy`; the code clones it as it does rustls'.
#![cfg_attr(not(feature = "tls"), allow(clippy::clone_on_copy))]

// Layers, from the bottom; a module uses only those above it in this list (see
// ARCHITECTURE.md).
// 1. Values, no I/O: errors, queries, identifiers, settings.
mod blocking;
pub mod config;
mod conninfo;
mod counters;
mod error;
mod from_row;
mod identifier;
mod lifecycle;
mod passfile;
pub mod query;
mod retry;
mod schema_change;
mod statements;
mod telemetry;
mod tls;
mod version;
// 2. Connections: the pooled connection and its hygiene, cancel.
mod cancel;
mod connect;
mod multiplex;
mod pool;
mod routing;
// 3. The engine's shared context; a transaction's state; the runner that sends
//    statements (alone, pipelined, as portals) and records how they ended.
mod context;
mod query_log;
mod runner;
mod transaction;
// 4. What callers hold: batches, the query methods, transactions, savepoints, atomics.
mod atomic;
mod batch;
mod copy_out;
mod executor;
mod listener;
pub mod savepoint;
// 5. The facade.
mod engine;

pub use atomic::Atomic;
pub use batch::{AsyncBatch, TypedBatch};
pub use config::{EngineBuilder, ReplicaPolicy};
pub use copy_out::{CopyOut, CopyOutRows};
pub use engine::{PoolStatus, PostgresEngine};
pub use error::{DatabaseError, Error, ErrorKind, FailedStatement, Result};
pub use executor::Executor;
pub use from_row::{FromRow, column};
pub use lifecycle::{AfterConnectFuture, SessionReset};
pub use listener::{ListenEvent, Listener, Notification};
pub use multiplex::SharedConnectionStatus;
/// Derives [`FromRow`] for a struct: each field from the column of its name
/// (`#[pgengine(rename = "column")]` for another, `#[pgengine(flatten)]` for a field
/// made from the same row), a tuple struct's fields in order; see [`FromRow`].
#[cfg(feature = "derive")]
pub use pgengine_derive::FromRow;
pub use query::{Query, QueryString};
pub use retry::RetryPolicy;
pub use savepoint::Savepoint;
pub use tls::SslMode;
pub use tokio_postgres::Row;
pub use tokio_postgres::binary_copy::BinaryCopyOutRow;
pub use tokio_postgres::types;
pub use transaction::{
    IsolationLevel, Nested, PostgresTransaction, RunOnce, RunRetried, TransactionBuilder,
};
pub use version::ServerVersion;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Everything for everyday use: `use pgengine::prelude::*;`.
///
/// ```
/// use pgengine::prelude::*;
/// let query = sql!("SELECT {}::int", 1);
/// # let _ = query;
/// ```
pub mod prelude {
    pub use crate::{
        Executor, IsolationLevel, Nested, PostgresEngine, PostgresTransaction, Query, QueryString,
        RetryPolicy, Row, sql,
    };
}
