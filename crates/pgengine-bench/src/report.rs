//! The report: medians per system and workload, the markdown table, the
//! targets, BENCHMARKS.md and the JSON results.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::Sample;
use crate::runner::{Outcome, Plan};
use crate::server::ServerInfo;
use crate::systems::System;
use crate::workloads::Workload;

/// Everything a run produced; serialized as `results.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub server: ServerInfo,
    pub plan: Plan,
    pub results: Vec<Summary>,
    pub targets: Vec<Target>,
}

/// The machine the run happened on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu: String,
    pub kernel: String,
}

/// Medians of one system on one workload.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub workload: Workload,
    pub system: System,
    /// Why there are no figures (skipped or failed).
    pub note: Option<String>,
    pub throughput: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub peak_rss_kb: Option<f64>,
    pub round_trips: Option<f64>,
    /// This system's throughput divided by pgengine's.
    pub vs_pgengine: Option<f64>,
    pub samples: Vec<Sample>,
}

/// One stated goal and whether this run met it.
#[derive(Debug, Serialize)]
pub struct Target {
    pub goal: String,
    pub measured: Option<f64>,
    pub met: Option<bool>,
}

impl Report {
    pub fn new(plan: Plan, server: ServerInfo, command: String, outcomes: Vec<Outcome>) -> Self {
        let mut results: Vec<Summary> = outcomes.into_iter().map(summarize).collect();
        let pgengine: Vec<(Workload, f64)> = results
            .iter()
            .filter(|s| s.system == System::Pgengine)
            .filter_map(|s| Some((s.workload, s.throughput?)))
            .collect();
        for summary in &mut results {
            let base = pgengine
                .iter()
                .find(|(w, _)| *w == summary.workload)
                .map(|(_, t)| *t);
            summary.vs_pgengine = summary.throughput.zip(base).map(|(t, b)| t / b);
        }
        let mut report = Self {
            command,
            machine: Machine::this(),
            server,
            plan,
            results,
            targets: Vec::new(),
        };
        report.targets = report.evaluate_targets();
        report
    }

    fn get(&self, workload: Workload, system: System) -> Option<&Summary> {
        self.results
            .iter()
            .find(|s| s.workload == workload && s.system == system)
    }

    fn throughput(&self, workload: Workload, system: System) -> Option<f64> {
        self.get(workload, system)?.throughput
    }

    /// Piccolo on pgengine's throughput divided by Piccolo on asyncpg's.
    fn python_ratio(&self, workload: Workload) -> Option<f64> {
        Some(
            self.throughput(workload, System::PiccoloPgengine)?
                / self.throughput(workload, System::Piccolo)?,
        )
    }

    /// pgengine's throughput divided by `peer`'s.
    fn ratio(&self, workload: Workload, peer: System) -> Option<f64> {
        self.ratio_of(workload, System::Pgengine, peer)
    }

    /// `system`'s throughput divided by `peer`'s.
    fn ratio_of(&self, workload: Workload, system: System, peer: System) -> Option<f64> {
        Some(self.throughput(workload, system)? / self.throughput(workload, peer)?)
    }

    /// The markdown results table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| workload | system | throughput (median) | p50 | p99 | peak RSS | round trips | × pgengine |\n\
             |---|---|--:|--:|--:|--:|--:|--:|\n",
        );
        for s in &self.results {
            let throughput = match (&s.note, s.throughput) {
                (Some(note), _) => note.clone(),
                (None, Some(t)) => format!("{} {}", thousands(t), s.workload.unit()),
                (None, None) => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s.workload.title(),
                s.system.name(),
                throughput,
                opt(s.p50_us, latency),
                opt(s.p99_us, latency),
                opt(s.peak_rss_kb, |kb| format!("{:.1} MiB", kb / 1024.0)),
                opt(s.round_trips, |r| format!("{r:.1}")),
                opt(s.vs_pgengine, |r| format!("{r:.2}×")),
            );
        }
        out
    }

    fn evaluate_targets(&self) -> Vec<Target> {
        use System::*;
        use Workload::*;
        let at_least = |goal: &str, measured: Option<f64>, min: f64| Target {
            goal: goal.into(),
            measured,
            met: measured.map(|m| m >= min),
        };
        let rss = |w| self.get(w, Pgengine).and_then(|s| s.peak_rss_kb);
        let rss_growth = rss(StreamBig)
            .zip(rss(Stream))
            .map(|(big, small)| big / small - 1.0);
        let worst_vs_sqlx = self
            .plan
            .workloads
            .iter()
            .filter_map(|w| self.ratio(*w, Sqlx))
            .reduce(f64::min);
        let trips = self.get(AtomicProxy, Pgengine).and_then(|s| s.round_trips);
        let worst_python = self
            .plan
            .workloads
            .iter()
            .filter_map(|w| self.python_ratio(*w))
            .reduce(f64::min);
        vec![
            at_least(
                "point select c=1: pgengine ≥ 0.97× deadpool-postgres",
                self.ratio(PointSelect1, Deadpool),
                0.97,
            ),
            at_least(
                "point select c=1: pgengine ≥ 0.95× tokio-postgres",
                self.ratio(PointSelect1, TokioPostgres),
                0.95,
            ),
            at_least(
                "point select c=32: pgengine ≥ 0.97× deadpool-postgres",
                self.ratio(PointSelect32, Deadpool),
                0.97,
            ),
            at_least(
                "point select c=32: pgengine ≥ 0.95× tokio-postgres",
                self.ratio(PointSelect32, TokioPostgres),
                0.95,
            ),
            at_least(
                "point select c=32: pgengine ≥ 0.9× pgbench",
                self.ratio(PointSelect32, Pgbench),
                0.9,
            ),
            at_least(
                "point select c=32: pgengine multiplexed ≥ 1.5× pgbench",
                self.ratio_of(PointSelect32, PgengineMultiplexed, Pgbench),
                1.5,
            ),
            at_least(
                "point select c=128: pgengine multiplexed ≥ 1.5× pgbench",
                self.ratio_of(PointSelect128, PgengineMultiplexed, Pgbench),
                1.5,
            ),
            at_least(
                "TPC-B c=16: pgengine ≥ 0.9× pgbench",
                self.ratio(Tpcb, Pgbench),
                0.9,
            ),
            at_least(
                "atomic: pgengine ≥ 20× Piccolo",
                self.ratio(Atomic, Piccolo),
                20.0,
            ),
            at_least(
                "atomic: pgengine ≥ 0.8× pgbench pipeline mode",
                self.ratio(Atomic, Pgbench),
                0.8,
            ),
            at_least(
                "durable atomic: pgengine ≥ 0.8× pgbench pipeline mode",
                self.ratio(DurableAtomic, Pgbench),
                0.8,
            ),
            at_least(
                "bulk insert c=1: pgengine ≥ 1.0× asyncpg executemany",
                self.ratio(BulkInsert1, Asyncpg),
                1.0,
            ),
            at_least(
                "bulk insert c=10: pgengine ≥ 1.0× asyncpg executemany",
                self.ratio(BulkInsert10, Asyncpg),
                1.0,
            ),
            at_least(
                "COPY in: pgengine ≥ 0.9× tokio-postgres binary COPY",
                self.ratio(CopyIn, TokioPostgres),
                0.9,
            ),
            Target {
                goal: "atomic through the proxy: pgengine ≤ 4 round trips".into(),
                measured: trips,
                met: trips.map(|t| t <= 4.0),
            },
            at_least(
                "batch: pgengine ≥ 2× Piccolo rows/s",
                self.ratio(Stream, Piccolo),
                2.0,
            ),
            at_least(
                "batch: pgengine ≥ 0.85× COPY binary",
                self.ratio(Stream, Copy),
                0.85,
            ),
            Target {
                goal: "batch: pgengine peak RSS at the big table within 10% of 1M rows (growth)"
                    .into(),
                measured: rss_growth,
                met: rss_growth.map(|g| g <= 0.10),
            },
            at_least(
                "every workload: pgengine ≥ 1.0× sqlx (worst ratio)",
                worst_vs_sqlx,
                1.0,
            ),
            at_least(
                "every workload: Piccolo on pgengine ≥ 1.0× Piccolo on asyncpg (worst ratio)",
                worst_python,
                1.0,
            ),
            at_least(
                "atomic: Piccolo on pgengine ≥ 3× Piccolo on asyncpg",
                self.python_ratio(Atomic),
                3.0,
            ),
        ]
    }

    /// The targets as a markdown list.
    pub fn targets_section(&self) -> String {
        let mut out = String::new();
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "**met**",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(
                out,
                "- {}: {} ({verdict})",
                t.goal,
                opt(t.measured, |m| format!("{m:.2}"))
            );
        }
        out
    }

    /// BENCHMARKS.md: command, machine, server, the chart (its file name, when drawn),
    /// table, targets, explanations.
    pub fn benchmarks_md(&self, chart: Option<&str>) -> String {
        let m = &self.machine;
        let p = &self.plan;
        let mut out = String::from(
            "# pgengine benchmarks\n\n\
             <!-- Generated by crates/pgengine-bench. Do not edit: rerun the command below. -->\n\n",
        );
        let _ = write!(
            out,
            "## How this was measured\n\n```sh\n{}\n```\n\n\
             One server, every system in the same run, interleaved: each repetition runs every \
             system once (in rotated order) before the next repetition starts. Figures are medians \
             of {} repetitions of {:.1} s (after {:.1} s of warm-up). Streaming runs in a child \
             process per measurement so each peak RSS is that system's alone.\n\n\
             - Machine: {} cores ({}), {:.1} GiB memory, Linux {}\n\
             - PostgreSQL {} ({})\n\
             - Server settings: {}\n\
             - Data: pgbench scale {} ({} accounts); streamed table of {} rows{}\n\n",
            self.command,
            p.reps,
            p.timing.duration.as_secs_f64(),
            p.timing.warmup.as_secs_f64(),
            m.cores,
            m.cpu,
            m.memory_gib,
            m.kernel,
            self.server.version,
            self.server.origin,
            self.server
                .settings
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            p.scale,
            thousands(f64::from(p.accounts())),
            thousands(p.stream_rows as f64),
            p.big_rows
                .map(|r| format!(" and a big one of {} rows", thousands(r as f64)))
                .unwrap_or_default(),
        );
        if p.quick {
            out.push_str("**Quick mode**: tiny sizes and durations; the figures only show the harness works.\n\n");
        }
        if let Some(chart) = chart {
            let _ = write!(
                out,
                "![Throughput of every system, per workload]({chart})\n\n"
            );
        }
        let _ = write!(
            out,
            "## Results\n\n{}\n`× pgengine` is the system's throughput divided by pgengine's.\n\n\
             ## Targets\n\nRatios are pgengine's throughput over the peer's.\n\n{}\n\
             ## Why the numbers are what they are\n\n",
            self.table(),
            self.targets_section()
        );
        for w in &p.workloads {
            let _ = write!(out, "### {}\n\n{}\n\n", w.title(), self.explain(*w));
        }
        out
    }

    /// The paragraph for one workload: fixed reasoning plus this run's figures.
    fn explain(&self, w: Workload) -> String {
        let figures = self.figures(w);
        let text = match w {
            Workload::PointSelect1 => {
                "One client, one query at a time: each lookup is a full round trip over loopback, \
                 so latency is the server's execute of a prepared statement plus the client's own \
                 per-query work and two wake-ups. All Rust systems use prepared statements \
                 (pgengine and deadpool cache them per connection; sqlx does too), so the gaps \
                 between them are per-query client overhead: pool checkout, cache lookup, \
                 row decoding: pgengine spends about 14,500 client instructions per query, \
                 deadpool 14,500 and tokio-postgres, with no pool, 12,150 (callgrind, \
                 `client-cost --workload point-select1`, on one thread). Piccolo pays the \
                 Python interpreter and asyncpg's Record → dict conversion on every query."
            }
            Workload::PointSelect32 => {
                "32 clients on 2 cores: the 32 server backends and the client share the same \
                 two CPUs, so throughput is CPU-bound and every microsecond of client CPU per \
                 query is taken from the server. pgbench (C, libpq, two threads) spends the \
                 least; a Rust client on tokio close to it; Piccolo is limited by one Python \
                 thread. Latency percentiles mostly show run-queue waits, not the query. \
                 pgbench's latencies are left out wherever it runs more clients than threads: it \
                 starts a transaction's clock only when its thread gets to that client. \
                 `pgengine, multiplexed` (`.multiplex(4)`) sends the 32 callers' statements on \
                 4 shared connections: 4 backends instead of 32 (see workload 1 at c=128 for \
                 why that frees the CPU); its lower p50 is the same effect, the backends are \
                 not waiting in the run queue. Here the client's own CPU per query becomes the \
                 limit: at this rate it takes about one of the two cores. tokio-postgres runs \
                 here with a connection of its own per caller and no pool: pgengine and \
                 deadpool check a connection out of a pool and back for every query (their \
                 client instructions per query are level, about 2,300 above tokio-postgres's, \
                 workload 1), which on 2 shared cores is a few percent of the server's CPU. \
                 Repetitions at this concurrency swing by ±10%."
            }
            Workload::PointSelect128 => {
                "Workload 1 with 128 clients. With a connection per caller (pgengine, deadpool, \
                 tokio-postgres, pgbench) that is 128 server backends on 2 cores: every query \
                 is a wake-up of a backend process, a context switch in and out, and the \
                 scheduler's run queue is 128 deep. Multiplexed, pgengine sends the callers' \
                 statements back to back on 4 shared connections (up to 32 in flight on each, \
                 the default; callers beyond that take connections of their own): each backend wakes once \
                 for a whole burst of queries, reads them from one socket buffer and writes \
                 the answers back in one, so the server spends its CPU on queries rather than \
                 on switching. The price is latency: a query waits behind the ones queued \
                 before it on its connection, which the p99 shows. On a server with many \
                 cores the backends of a connection-per-caller pool no longer fight over two \
                 CPUs, so their rate grows with the cores until locks and memory bandwidth \
                 bound it, and multiplexing's lead over them narrows; what it keeps is the \
                 cost per query of a wake-up and a context switch on each side, and far fewer \
                 backends (memory, `max_connections`) for the same load. To use many cores, \
                 raise the shared connections with them: one connection is served by one \
                 backend, on one core."
            }
            Workload::MixedReads32 => {
                "Reads as a service makes them, at c=32: three point selects to one read of a \
                 100-row range, at random (pgbench: its select-only script and a range script \
                 weighted 3 : 1). The range reads take longer than the point selects and carry \
                 more bytes, so multiplexed point selects sometimes queue behind one; the \
                 stall bound (10 ms) is far above a range read's time, so all stay shared."
            }
            Workload::Tpcb => {
                "pgbench's TPC-B-like script: BEGIN, three UPDATEs, a SELECT and an INSERT, \
                 COMMIT; every system sends them one after another (each depends on the \
                 transaction being open), so each transaction costs 7 round trips. At c=16 \
                 the UPDATEs of the 10 `pgbench_branches` rows at scale 10 contend on row locks, \
                 which serializes part of the work and narrows the differences between clients. \
                 The Rust clients' own work per transaction differs (count it with the \
                 `client-cost` subcommand under callgrind, on one thread): pgengine spends \
                 about 90,600 instructions per transaction where tokio-postgres spends 75,000 \
                 and deadpool 80,700 — its transaction state (the admission and turn that \
                 keep concurrent requests of one transaction in order), the ambient scope, the \
                 boxed body that keeps nested transactions' frames small, and the statement \
                 cache — and on 2 shared cores each microsecond the client spends is one the \
                 server does not get, while a slower client also holds the branch row \
                 locks longer: that is pgengine's gap here. pgbench's lead is client CPU too: \
                 libpq spends fewer than tokio's wake-ups. Single runs on this machine swing by \
                 10–25%."
            }
            Workload::Atomic => {
                "100 INSERTs in one transaction, one atomic after another. Code that awaits \
                 each statement pays BEGIN + 100 + COMMIT = 102 round trips (deadpool and sqlx \
                 as typically written, Piccolo's `Atomic`); pgengine's `Atomic` and the \
                 hand-pipelined tokio-postgres floor send the inserts back to back without \
                 waiting, so the server works through them while the client keeps writing. On \
                 loopback a round trip costs tens of microseconds, so the difference here is \
                 mostly wake-ups and per-statement client work. What remains is the server's \
                 own cost per statement (tokio-postgres ends every statement with a Sync, which \
                 makes the server answer and flush each one) — unless the statements end in \
                 one Sync: pgengine's `Atomic` sends BEGIN, the inserts and COMMIT as one \
                 pipeline with one Sync (its patch of tokio-postgres, `Client::pipeline`), as \
                 pgbench's pipeline mode does, so it runs level with pgbench and ahead of the \
                 hand-pipelined released driver, whose every statement is answered and \
                 flushed on its own."
            }
            Workload::BulkInsert1 | Workload::BulkInsert10 => {
                "Batches of 1,000 rows `(int, 'x')` inserted into `bench_bulk`, each batch \
                 in one transaction, one batch after another per client. pgengine's \
                 `execute_many` prepares the INSERT once per connection and sends BEGIN, a \
                 Bind/Execute per row and COMMIT as one pipeline that ends in one Sync: the \
                 server runs the rows back to back and answers once. asyncpg's `executemany` \
                 does the same (one Sync per call; it is atomic since asyncpg 0.22). pgbench \
                 in pipeline mode (`\\startpipeline` … `\\endpipeline`, libpq's \
                 `PQpipelineSync`) sends the same messages, but its script interpreter steps \
                 through each of the 1,000 INSERTs as a command of its own, which costs it \
                 more client CPU per row than the Rust client spends: here it is a reference, \
                 not a ceiling. tokio-postgres as released has no \
                 pipeline with one Sync: its hand-pipelined inserts make the server answer \
                 and flush each statement on its own, which is what pgengine's driver patch \
                 (`crates/tokio-postgres/PATCHES.md`) removes. The server's own cost per \
                 row (parse-free execute, heap insert, WAL record) is the floor all share."
            }
            Workload::DurableTpcb | Workload::DurableAtomic | Workload::DurableBulkInsert10 => {
                "The same workload on a second cluster with PostgreSQL's durable defaults \
                 (`fsync`, `synchronous_commit` and `full_page_writes` on), started for these \
                 workloads alone: every COMMIT waits for its WAL to reach the disk. The \
                 disk's flush time is now part of every transaction, the same for every \
                 client, so ratios move towards 1 wherever a client sends each transaction \
                 as one request; a client that pays a round trip per statement still pays \
                 them on top. On this machine's disk a flush costs a fraction of a \
                 millisecond: on slower disks the flush dominates even more."
            }
            Workload::CopyIn => {
                "Rows loaded with `COPY bench_copy (a, b) FROM STDIN (FORMAT binary)`, an int \
                 and a short text each, into an emptied table, one COPY per repetition: \
                 pgengine's `copy_in_rows` against tokio-postgres's `BinaryCopyInWriter`, \
                 which pgengine uses underneath. The rows are made before the clock starts; \
                 the figure is the COPY alone, from its start to the server's row count."
            }
            Workload::AtomicProxy => {
                "The same atomic through an in-process TCP proxy that delivers every chunk at \
                 least 1 ms late in each direction (tokio's millisecond timer rounds up, so a \
                 round trip costs about 2–4 ms). Round trips now dominate: time per atomic ≈ \
                 round trips × delay. The proxy counts them directly — a client write that follows \
                 data from the server is one round trip — over the measured atomics only."
            }
            Workload::Stream | Workload::StreamBig => {
                "The whole table (int, text, timestamptz, numeric) streamed and decoded, \
                 1 000 rows at a time where the API has a batch size: pgengine's `batch` \
                 (outside a transaction it reads the statement's portal as rows arrive, with \
                 socket back-pressure, and cuts batches client-side: no round trip per batch), \
                 tokio-postgres via a portal with a row limit, deadpool via DECLARE/FETCH \
                 (one round trip per batch each), \
                 Piccolo via asyncpg's cursor (rows become dicts, numerics `Decimal`s); sqlx's \
                 `fetch` streams one query row by row with socket back-pressure. `COPY … (FORMAT \
                 binary)` is the ceiling: no per-row protocol messages, nothing decoded. Peak RSS \
                 is the child process's VmHWM; bounded streaming keeps it flat whatever the \
                 table size."
            }
            Workload::EmptyTx => {
                "BEGIN; COMMIT; at c=16. The server assigns no transaction id and writes no WAL, \
                 so this is pure client and protocol overhead: two round trips per transaction, \
                 pool checkout and connection-state bookkeeping. pgbench's lead is client CPU, as \
                 in workload 2. pgengine's transaction costs about 22,700 client instructions \
                 against deadpool's 20,400 (callgrind, `client-cost --workload empty-tx`): its \
                 transaction state and the COMMIT whose tag is read (an aborted transaction \
                 answers ROLLBACK; it goes over the simple protocol, as deadpool's does), which \
                 on 2 shared cores is most of its gap here; single runs swing by 10–25%."
            }
            Workload::ReplicaReads => {
                "Workload 1's point selects at c=32, three ways: pgengine on the primary \
                 alone; through `engine.replica()` with a hot standby (a `pg_basebackup` of the \
                 loaded primary, streaming) as its read replica; and with the primary and the \
                 standby both listed as read replicas, taken in turn. Every call picks its \
                 server: `engine.replica()` takes a connection from the chosen replica's pool \
                 to be sure it answers, then the query takes one again (the same, now idle). \
                 Here the primary, the standby and the client share the same 2 cores and the \
                 workload is CPU-bound, so a second server adds backends but no CPU: routing \
                 cannot raise throughput, and the rows show what the routing itself costs. \
                 On separate hosts each server has cores of its own: reads spread over primary \
                 + replica would approach twice the primary's rate (until the client's cores \
                 are the limit), and reads sent only to the replica leave the primary's CPU \
                 to the writes."
            }
        };
        if figures.is_empty() {
            text.into()
        } else {
            format!("{text}\n\nThis run: {figures}.")
        }
    }

    /// "pgengine 1,234 queries/s; tokio-postgres 1,300 queries/s (1.05×); …"
    fn figures(&self, w: Workload) -> String {
        self.results
            .iter()
            .filter(|s| s.workload == w)
            .filter_map(|s| {
                let t = s.throughput?;
                let mut f = format!("{} {} {}", s.system.name(), thousands(t), w.unit());
                if let Some(r) = s.round_trips {
                    let _ = write!(f, ", {r:.1} round trips");
                }
                if let Some(kb) = s.peak_rss_kb {
                    let _ = write!(f, ", {:.1} MiB peak", kb / 1024.0);
                }
                if let Some(r) = s.vs_pgengine.filter(|_| s.system != System::Pgengine) {
                    let _ = write!(f, " ({r:.2}× pgengine)");
                }
                Some(f)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Medians of an outcome's samples.
fn summarize(o: Outcome) -> Summary {
    let median_of = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let mut v: Vec<f64> = o.samples.iter().filter_map(f).collect();
        median(&mut v)
    };
    let throughput = median_of(&|s| Some(s.throughput()));
    let p50_us = median_of(&|s| s.p50_us);
    let p99_us = median_of(&|s| s.p99_us);
    let peak_rss_kb = median_of(&|s| s.peak_rss_kb.map(|kb| kb as f64));
    let round_trips = median_of(&|s| s.round_trips);
    let note = o
        .skipped
        .map(|s| format!("skipped: {s}"))
        .or(o.error.map(|e| format!("failed: {e}")));
    Summary {
        workload: o.workload,
        system: o.system,
        note,
        throughput,
        p50_us,
        p99_us,
        peak_rss_kb,
        round_trips,
        vs_pgengine: None,
        samples: o.samples,
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn opt(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map(format).unwrap_or_else(|| "–".into())
}

fn latency(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// 1234567.8 → "1,234,568".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

impl Machine {
    /// Cores, memory, CPU model and kernel of this machine.
    fn this() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let mem_kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: mem_kb / 1024.0 / 1024.0,
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        }
    }
}
