//! pgengine's integration tests against real PostgreSQL, one module per concept, in one
//! test binary (one build, one shared ephemeral cluster). Shared helpers live in
//! `tests/common`. (`tests/from_env.rs` is a binary of its own: it sets environment
//! variables, which no other test may see.)

#[path = "../common/mod.rs"]
mod common;

mod abandoned_requests;
mod atomic;
mod batch;
mod blackhole;
mod concurrency;
mod connection_params;
mod copy;
mod engine;
mod escape_hatch;
mod faults;
mod listen;
#[cfg(feature = "metrics")]
mod metrics;
mod multiplex;
mod pgbouncer;
mod pipeline_sync;
mod pool_lifecycle;
mod query;
mod replication;
mod security;
mod smoke;
mod statement_cache;
mod telemetry;
mod test_support;
mod tls;
mod transactions;
mod typed_rows;
mod types;
mod web_service;
