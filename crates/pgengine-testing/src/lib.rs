//! Real PostgreSQL for tests: an ephemeral cluster started from the installed server
//! binaries, and a fresh database per test.
//!
//! - [`TestDatabase::new`] creates an empty database on the per-process [`server()`]
//!   and drops it when the value is dropped. Tests run in parallel, each on its own
//!   database, sharing one server.
//! - [`server()`] uses `DATABASE_URL` when it is set; otherwise it starts one
//!   [`EphemeralCluster`] per test process (found via `PG_BIN`, `pg_config --bindir`,
//!   `initdb` on `PATH`, or `/usr/lib/postgresql/*/bin`; see [`find_bin_dir`]).
//! - [`EphemeralCluster`] can also be started and owned directly (e.g. by a benchmark),
//!   with extra server settings, TLS ([`TestCertificates`]) and its own `pg_hba.conf`.
//! - [`EphemeralCluster::standby`] starts a hot standby streaming from a cluster
//!   (`pg_basebackup -R`), and [`EphemeralCluster::promote`] makes it a primary: real
//!   replication and failover for tests.
//! - [`test_engine`] gives a fresh database with migrations applied and a pgengine
//!   engine on it ([`migrations_in`] reads them from a directory).
//! - [`doctest`] runs a documentation example against a fresh database.
//!
//! Nothing is left behind: temp dirs (`$TMPDIR/pgengine-test-*`) and servers are removed
//! on drop, at process exit (an `atexit` hook for the shared cluster), and by a reaper
//! process if the test process is killed.
//!
//! ```no_run
//! use pgengine_testing::TestDatabase;
//!
//! #[tokio::test]
//! async fn creates_a_table() -> Result<(), Box<dyn std::error::Error>> {
//!     let db = TestDatabase::new().await?;
//!     let client = db.connect().await?;
//!     client.batch_execute("CREATE TABLE t (id int)").await?;
//!     Ok(())
//! } // the database is dropped here
//! ```

mod bin_dir;
mod certs;
mod cluster;
mod database;
mod doctest;
mod error;
mod netns;
mod pgbouncer;
mod server;
mod test_engine;

pub use bin_dir::find_bin_dir;
pub use certs::TestCertificates;
pub use cluster::{EphemeralCluster, EphemeralClusterBuilder, TEMP_DIR_PREFIX};
pub use database::{DATABASE_PREFIX, TestDatabase};
pub use doctest::doctest;
pub use error::{Error, ErrorKind};
pub use netns::Blackhole;
pub use pgbouncer::PgBouncer;
pub use server::{TestServer, server};
pub use test_engine::{migrations_in, test_engine};
