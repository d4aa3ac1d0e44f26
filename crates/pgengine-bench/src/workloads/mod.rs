//! The workloads: what each system is asked to do, and with which arguments.

use rand::Rng;
use serde::Serialize;

/// A benchmarked workload. Every system that can express it does the same work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Primary-key lookup on `pgbench_accounts`, one client.
    PointSelect1,
    /// Primary-key lookup on `pgbench_accounts`, 32 concurrent clients.
    PointSelect32,
    /// Primary-key lookup on `pgbench_accounts`, 128 concurrent clients.
    PointSelect128,
    /// Reads at c=32: three point selects to one range read of 100 rows.
    MixedReads32,
    /// pgbench's default TPC-B-like transaction, 16 concurrent clients.
    Tpcb,
    /// 100 inserts in one transaction, one after another.
    Atomic,
    /// The same atomic through a proxy adding 1 ms each way.
    AtomicProxy,
    /// Loading rows with a binary `COPY … FROM STDIN`.
    CopyIn,
    /// Streaming the whole `bench_stream` table in batches.
    Stream,
    /// Streaming the big table (`--big`), to show memory stays flat.
    StreamBig,
    /// `BEGIN; COMMIT;`, 16 concurrent clients.
    EmptyTx,
    /// Point selects at c=32 on the primary alone, and read through the engine's
    /// replica routing with a hot standby.
    ReplicaReads,
    /// Inserting rows in batches of [`BULK_ROWS`] (one transaction each), one client.
    BulkInsert1,
    /// The same with 10 concurrent clients.
    BulkInsert10,
    /// [`Tpcb`](Workload::Tpcb) on a durable server (fsync, synchronous_commit on).
    DurableTpcb,
    /// [`Atomic`](Workload::Atomic) on a durable server.
    DurableAtomic,
    /// [`BulkInsert10`](Workload::BulkInsert10) on a durable server.
    DurableBulkInsert10,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 17] = [
        Workload::PointSelect1,
        Workload::PointSelect32,
        Workload::PointSelect128,
        Workload::MixedReads32,
        Workload::Tpcb,
        Workload::Atomic,
        Workload::AtomicProxy,
        Workload::BulkInsert1,
        Workload::BulkInsert10,
        Workload::CopyIn,
        Workload::Stream,
        Workload::StreamBig,
        Workload::EmptyTx,
        Workload::ReplicaReads,
        Workload::DurableTpcb,
        Workload::DurableAtomic,
        Workload::DurableBulkInsert10,
    ];

    /// The workload a durable one repeats on the durable server (itself otherwise).
    pub fn base(self) -> Workload {
        match self {
            Workload::DurableTpcb => Workload::Tpcb,
            Workload::DurableAtomic => Workload::Atomic,
            Workload::DurableBulkInsert10 => Workload::BulkInsert10,
            other => other,
        }
    }

    /// Whether the workload runs on the durable server.
    pub fn durable(self) -> bool {
        self.base() != self
    }

    /// Whether each operation inserts [`BULK_ROWS`] rows (its throughput is in rows).
    pub fn is_bulk(self) -> bool {
        matches!(self.base(), Workload::BulkInsert1 | Workload::BulkInsert10)
    }

    /// Short machine-friendly name (JSON, chart, Piccolo script).
    pub fn id(self) -> &'static str {
        match self {
            Workload::PointSelect1 => "point_select_c1",
            Workload::PointSelect32 => "point_select_c32",
            Workload::PointSelect128 => "point_select_c128",
            Workload::MixedReads32 => "mixed_reads_c32",
            Workload::Tpcb => "tpcb_c16",
            Workload::Atomic => "atomic_100",
            Workload::AtomicProxy => "atomic_100_proxy",
            Workload::CopyIn => "copy_in",
            Workload::Stream => "stream",
            Workload::StreamBig => "stream_big",
            Workload::EmptyTx => "empty_tx_c16",
            Workload::ReplicaReads => "replica_reads_c32",
            Workload::BulkInsert1 => "bulk_insert_c1",
            Workload::BulkInsert10 => "bulk_insert_c10",
            Workload::DurableTpcb => "durable_tpcb_c16",
            Workload::DurableAtomic => "durable_atomic_100",
            Workload::DurableBulkInsert10 => "durable_bulk_insert_c10",
        }
    }

    /// Human title for the report.
    pub fn title(self) -> &'static str {
        match self {
            Workload::PointSelect1 => "1. point select, c=1",
            Workload::PointSelect32 => "1. point select, c=32",
            Workload::PointSelect128 => "1. point select, c=128",
            Workload::MixedReads32 => {
                "1. mixed reads, c=32 (3 point selects : 1 range of 100 rows)"
            }
            Workload::Tpcb => "2. TPC-B-like transaction, c=16",
            Workload::Atomic => "3. atomic of 100 inserts",
            Workload::AtomicProxy => "3. atomic of 100 inserts, +1 ms each way",
            Workload::CopyIn => "3. COPY in (binary)",
            Workload::Stream => "4. batch streaming",
            Workload::StreamBig => "4. batch streaming, big table",
            Workload::EmptyTx => "5. empty transaction, c=16",
            Workload::ReplicaReads => "6. point select, c=32, with a read replica",
            Workload::BulkInsert1 => "3. bulk insert, 1,000-row batches, c=1",
            Workload::BulkInsert10 => "3. bulk insert, 1,000-row batches, c=10",
            Workload::DurableTpcb => "7. durable server: TPC-B-like transaction, c=16",
            Workload::DurableAtomic => "7. durable server: atomic of 100 inserts",
            Workload::DurableBulkInsert10 => "7. durable server: bulk insert, c=10",
        }
    }

    /// Concurrent clients.
    pub fn concurrency(self) -> usize {
        match self.base() {
            Workload::BulkInsert10 => 10,
            Workload::PointSelect128 => 128,
            Workload::PointSelect32 | Workload::MixedReads32 | Workload::ReplicaReads => 32,
            Workload::Tpcb | Workload::EmptyTx => 16,
            _ => 1,
        }
    }

    /// What one unit of throughput is.
    pub fn unit(self) -> &'static str {
        match self.base() {
            Workload::PointSelect1
            | Workload::PointSelect32
            | Workload::PointSelect128
            | Workload::MixedReads32
            | Workload::ReplicaReads => "queries/s",
            Workload::Tpcb | Workload::EmptyTx => "tx/s",
            Workload::Atomic | Workload::AtomicProxy => "atomics/s",
            Workload::Stream
            | Workload::StreamBig
            | Workload::CopyIn
            | Workload::BulkInsert1
            | Workload::BulkInsert10 => "rows/s",
            durable => durable.base().unit(),
        }
    }

    /// Whether the workload streams a table (measured in a child process).
    pub fn is_stream(self) -> bool {
        matches!(self, Workload::Stream | Workload::StreamBig)
    }

    /// The operation of a closed-loop workload (`None` for streaming).
    pub fn op(self, accounts: i32) -> Option<Op> {
        match self.base() {
            Workload::PointSelect1
            | Workload::PointSelect32
            | Workload::PointSelect128
            | Workload::ReplicaReads => Some(Op::PointSelect { accounts }),
            Workload::MixedReads32 => Some(Op::MixedReads { accounts }),
            Workload::Tpcb => Some(Op::Tpcb { accounts }),
            Workload::Atomic | Workload::AtomicProxy => Some(Op::Atomic),
            Workload::EmptyTx => Some(Op::EmptyTx),
            Workload::BulkInsert1 | Workload::BulkInsert10 => Some(Op::BulkInsert),
            Workload::Stream | Workload::StreamBig | Workload::CopyIn => None,
            durable => durable.base().op(accounts),
        }
    }
}

/// Inserts per atomic.
pub const ATOMIC_INSERTS: i32 = 100;
/// Rows per bulk-insert batch.
pub const BULK_ROWS: i32 = 1000;
/// Rows of a range read.
pub const RANGE_ROWS: i32 = 100;
/// Rows per batch when streaming.
pub const BATCH_SIZE: usize = 1000;

/// The operation a closed-loop workload repeats.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    PointSelect {
        accounts: i32,
    },
    /// Three point selects to one range read, at random.
    MixedReads {
        accounts: i32,
    },
    Tpcb {
        accounts: i32,
    },
    Atomic,
    EmptyTx,
    BulkInsert,
}

impl Op {
    /// Draws the random arguments of one call, as pgbench does.
    pub fn draw(self, rng: &mut impl Rng) -> Call {
        match self {
            Op::PointSelect { accounts } => Call::PointSelect {
                aid: rng.random_range(1..=accounts),
            },
            Op::MixedReads { accounts } if rng.random_range(0..4) == 0 => Call::RangeRead {
                from: rng.random_range(1..=accounts - RANGE_ROWS + 1),
            },
            Op::MixedReads { accounts } => Call::PointSelect {
                aid: rng.random_range(1..=accounts),
            },
            Op::Tpcb { accounts } => {
                let scale = (accounts / 100_000).max(1);
                Call::Tpcb(Tpcb {
                    aid: rng.random_range(1..=accounts),
                    bid: rng.random_range(1..=scale),
                    tid: rng.random_range(1..=10 * scale),
                    delta: rng.random_range(-5000..=5000),
                })
            }
            Op::Atomic => Call::Atomic,
            Op::EmptyTx => Call::EmptyTx,
            Op::BulkInsert => Call::BulkInsert,
        }
    }
}

/// One operation with its arguments.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    PointSelect {
        aid: i32,
    },
    /// [`RANGE_ROWS`] accounts from `from` on.
    RangeRead {
        from: i32,
    },
    Tpcb(Tpcb),
    Atomic,
    EmptyTx,
    /// [`BULK_ROWS`] rows `(i, 'x')` into `bench_bulk`, in one transaction.
    BulkInsert,
}

/// Arguments of one TPC-B-like transaction.
#[derive(Debug, Clone, Copy)]
pub struct Tpcb {
    pub aid: i32,
    pub bid: i32,
    pub tid: i32,
    pub delta: i32,
}

/// The SQL every system runs (pgbench's own statements where it has them).
pub mod sql {
    pub const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    pub const RANGE_READ: &str =
        "SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN $1 AND $1 + 99";
    pub const TPCB_ACCOUNT: &str =
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
    pub const TPCB_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    pub const TPCB_TELLER: &str =
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2";
    pub const TPCB_BRANCH: &str =
        "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2";
    pub const TPCB_HISTORY: &str = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
         VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)";
    pub const ATOMIC_INSERT: &str = "INSERT INTO bench_atomic (a, b) VALUES ($1, $2)";
    pub const BULK_INSERT: &str = "INSERT INTO bench_bulk (a, b) VALUES ($1, $2)";
    /// The streamed query; `{table}` is the table name.
    pub fn stream(table: &str) -> String {
        format!("SELECT id, label, created, amount FROM {table}")
    }
}
