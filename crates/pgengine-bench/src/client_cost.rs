//! `client-cost`: one workload's calls (point selects by default) run one at a time in
//! this process, so that a tool such as `valgrind --tool=callgrind` can count the
//! client's instructions per call: a figure that, unlike a rate on a shared machine, is
//! the same from run to run. It runs on a one-thread runtime (see `main`): with worker
//! threads, which of them ran the caller and the connection's task, and how often each
//! slept and woke, changed from run to run, and the count with it (by up to ~1,000
//! instructions per point select); on one thread it repeats to the instruction.
//!
//! ```sh
//! for n in 1000 3000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!     target/release/pgengine-bench client-cost --system pgengine --workload tpcb \
//!     --url "$URL" --queries $n
//! done   # instructions per call = (Ir of 3000 − Ir of 1000) / 2000
//! ```
//!
//! pgengine without named prepared statements (as behind pgbouncer in transaction
//! mode) is measured by adding `?statement_cache_capacity=0` to the URL. On a server
//! that offers TLS, add `sslmode=disable` too: pgengine's default `sslmode=prefer` (as
//! libpq's) would encrypt while the other clients here connect without TLS.
//!
//! The server at the URL needs the benchmark's tables: `pgbench -i`, and `bench_atomic`
//! and `bench_bulk`, each `(a int NOT NULL, b text NOT NULL)` (tokio-postgres's session
//! prepares its statements on both when it opens).

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::measure::Session;
use crate::systems::System;
use crate::systems::deadpool::{self, DeadpoolSession};
use crate::systems::tokio_pg::TokioPgSession;
use crate::workloads::{Op, Workload};

/// The keys drawn from: the first 100,000 accounts.
const ACCOUNTS: i32 = 100_000;

/// Runs `calls` calls of `workload` through `system`, one after another.
pub async fn run(system: System, workload: Workload, url: &str, calls: u32) -> Result<()> {
    let op = workload
        .op(ACCOUNTS)
        .with_context(|| format!("{workload:?} is not a closed-loop workload"))?;
    match system {
        System::TokioPostgres => repeat(TokioPgSession::open(url).await?, op, calls).await,
        System::Deadpool => repeat(DeadpoolSession(deadpool::pool(url, 1).await?), op, calls).await,
        #[cfg(feature = "pgengine")]
        System::Pgengine => {
            use crate::systems::pgengine::{PgengineSession, engine};
            repeat(PgengineSession(engine(url, 1).await?), op, calls).await
        }
        #[cfg(feature = "pgengine")]
        System::PgengineMultiplexed => {
            use crate::systems::pgengine::{PgengineSession, multiplexed_engine};
            repeat(
                PgengineSession(multiplexed_engine(url, 1).await?),
                op,
                calls,
            )
            .await
        }
        other => bail!(
            "client-cost measures Rust clients in-process, not {}",
            other.name()
        ),
    }
}

async fn repeat(mut session: impl Session, op: Op, calls: u32) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..calls {
        session.call(op.draw(&mut rng)).await?;
    }
    Ok(())
}
