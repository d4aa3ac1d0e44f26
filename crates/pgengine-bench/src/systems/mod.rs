//! The systems under comparison, each doing the same work its own idiomatic way.

use serde::Serialize;

use crate::workloads::Workload;

pub mod deadpool;
pub mod pgbench;
#[cfg(feature = "pgengine")]
pub mod pgengine;
pub mod piccolo;
pub mod sqlx;
pub mod stream;
pub mod tokio_pg;

/// A benchmarked system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// pgengine, through its public API only.
    Pgengine,
    /// pgengine with multiplexing: autocommit reads share a few connections.
    PgengineMultiplexed,
    /// Raw tokio-postgres: one client per task, prepared statements (overhead floor).
    TokioPostgres,
    /// deadpool-postgres with `prepare_cached`.
    Deadpool,
    /// sqlx `PgPool`.
    Sqlx,
    /// Piccolo ORM's `PostgresEngine` on asyncpg (Python).
    Piccolo,
    /// Piccolo ORM on pgengine-piccolo's `PgenginePostgresEngine`, the same code.
    PiccoloPgengine,
    /// asyncpg's own `executemany` (Python), for bulk inserts.
    Asyncpg,
    /// pgbench (C, libpq): the practical ceiling.
    Pgbench,
    /// `COPY … TO STDOUT (FORMAT binary)` through tokio-postgres: the streaming ceiling.
    Copy,
    /// pgengine reading through `engine.replica()`, with a hot standby as its read
    /// replica.
    PgengineReplica,
    /// pgengine reading through `engine.replica()`, with the primary and the standby
    /// as read replicas, round-robin.
    PgengineBoth,
}

impl System {
    /// Every system, in report order (pgengine first: the others are compared to it).
    pub const ALL: [System; 12] = [
        System::Pgengine,
        System::PgengineMultiplexed,
        System::TokioPostgres,
        System::Deadpool,
        System::Sqlx,
        System::Piccolo,
        System::PiccoloPgengine,
        System::Asyncpg,
        System::Pgbench,
        System::Copy,
        System::PgengineReplica,
        System::PgengineBoth,
    ];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            System::Pgengine => "pgengine",
            System::PgengineMultiplexed => "pgengine, multiplexed",
            System::TokioPostgres => "tokio-postgres",
            System::Deadpool => "deadpool-postgres",
            System::Sqlx => "sqlx",
            System::Piccolo => "piccolo (asyncpg)",
            System::PiccoloPgengine => "piccolo (pgengine)",
            System::Asyncpg => "asyncpg executemany",
            System::Pgbench => "pgbench",
            System::Copy => "COPY binary",
            System::PgengineReplica => "pgengine, reads on the replica",
            System::PgengineBoth => "pgengine, reads on primary + replica",
        }
    }

    /// The system's name on the command line.
    pub fn arg(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// Whether the system can express the workload at all.
    pub fn supports(self, workload: Workload) -> bool {
        let workload = workload.base();
        if workload.is_bulk() {
            return matches!(
                self,
                System::Pgengine | System::TokioPostgres | System::Asyncpg | System::Pgbench
            );
        }
        if workload == Workload::CopyIn {
            return matches!(self, System::Pgengine | System::TokioPostgres);
        }
        if workload == Workload::ReplicaReads {
            return matches!(
                self,
                System::Pgengine | System::PgengineReplica | System::PgengineBoth
            );
        }
        let reads = matches!(
            workload,
            Workload::PointSelect1
                | Workload::PointSelect32
                | Workload::PointSelect128
                | Workload::MixedReads32
        );
        match self {
            System::PgengineReplica | System::PgengineBoth | System::Asyncpg => false,
            System::PgengineMultiplexed => reads,
            System::Pgbench => {
                reads
                    || matches!(
                        workload,
                        Workload::Tpcb | Workload::EmptyTx | Workload::Atomic
                    )
            }
            System::Copy => workload.is_stream(),
            // Python streams ten million rows too slowly for a run of minutes; the
            // multiplexing workloads compare Rust pools with pgbench.
            System::Piccolo | System::PiccoloPgengine | System::Sqlx => !matches!(
                workload,
                Workload::StreamBig | Workload::PointSelect128 | Workload::MixedReads32
            ),
            _ => true,
        }
    }
}
