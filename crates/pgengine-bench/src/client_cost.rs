//! `client-cost`: point selects run one at a time in this process, so that a tool such as
//! `valgrind --tool=callgrind` can count the client's instructions per query: a figure
//! that, unlike a rate on a shared machine, is the same from run to run.
//!
//! ```sh
//! for n in 1000 3000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!     target/release/pgengine-bench client-cost --system pgengine --url "$URL" --queries $n
//! done   # instructions per query = (Ir of 3000 − Ir of 1000) / 2000
//! ```
//!
//! The server at the URL needs the benchmark's tables: `pgbench -i`, and
//! `CREATE TABLE bench_atomic (a int NOT NULL, b text NOT NULL)`.

use anyhow::{Result, bail};

use crate::measure::Session;
use crate::systems::System;
use crate::systems::deadpool::{self, DeadpoolSession};
use crate::systems::tokio_pg::TokioPgSession;
use crate::workloads::Call;

/// Runs `queries` point selects through `system`, one after another.
pub async fn run(system: System, url: &str, queries: u32) -> Result<()> {
    match system {
        System::TokioPostgres => repeat(TokioPgSession::open(url).await?, queries).await,
        System::Deadpool => repeat(DeadpoolSession(deadpool::pool(url, 1).await?), queries).await,
        #[cfg(feature = "pgengine")]
        System::Pgengine => {
            use crate::systems::pgengine::{PgengineSession, engine};
            repeat(PgengineSession(engine(url, 1).await?), queries).await
        }
        other => bail!(
            "client-cost measures Rust clients in-process, not {}",
            other.name()
        ),
    }
}

async fn repeat(mut session: impl Session, queries: u32) -> Result<()> {
    for i in 0..queries {
        let aid = (i % 100_000) as i32 + 1;
        session.call(Call::PointSelect { aid }).await?;
    }
    Ok(())
}
