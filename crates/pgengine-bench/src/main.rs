//! pgengine-bench: pgengine side by side with its peers, in one run against
//! one server, interleaved. See `--help` and BENCHMARKS.md at the repository root.

mod chart;
mod client_cost;
mod data;
mod measure;
mod proxy;
mod report;
mod runner;
mod server;
mod systems;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::data::{STREAM_BIG_TABLE, STREAM_TABLE};
use crate::measure::Timing;
use crate::runner::{Plan, Runner};
use crate::server::Server;
use crate::systems::System;
use crate::systems::piccolo::Piccolo;
use crate::workloads::Workload;

/// Benchmarks pgengine against tokio-postgres, deadpool-postgres, sqlx,
/// Piccolo (asyncpg) and pgbench on one PostgreSQL server
/// (`DATABASE_URL`, or an ephemeral cluster).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Tiny sizes and durations: everything in seconds (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Also stream a 10M-row table, to show memory stays flat.
    #[arg(long)]
    big: bool,
    /// Measured seconds per repetition (default 2, quick 0.3).
    #[arg(long)]
    duration: Option<f64>,
    /// Repetitions per system and workload; the median is reported
    /// (default 3, quick 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Only these systems (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Vec<System>,
    /// Only these workloads (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Output directory for results.json, chart.png and the Piccolo virtualenv.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write BENCHMARKS.md (default: the repository root's, or OUT's in quick mode).
    #[arg(long)]
    markdown: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs one workload's calls one at a time, to count the client's instructions per
    /// call under `valgrind --tool=callgrind` (see src/client_cost.rs).
    ClientCost {
        #[arg(long, value_enum)]
        system: System,
        /// A closed-loop workload (point-select1, tpcb, atomic, empty-tx).
        #[arg(long, value_enum, default_value = "point-select1")]
        workload: Workload,
        /// A server with pgbench's tables.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        queries: u32,
    },
    /// Streams one table in this process and prints a JSON report (internal).
    #[command(hide = true)]
    StreamChild {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long)]
        url: String,
        #[arg(long)]
        table: String,
        #[arg(long)]
        rows: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // `client-cost` runs on one thread: its caller and the connection tasks it wakes
    // share that thread, so the count does not depend on which thread ran what (on
    // several, it swung by ~1,000 instructions per call from run to run).
    let runtime = match cli.command {
        Some(Command::ClientCost { .. }) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(dispatch(cli))
}

/// Runs the command `cli` names, or the benchmark proper.
async fn dispatch(cli: Cli) -> Result<()> {
    match &cli.command {
        Some(Command::StreamChild {
            system,
            url,
            table,
            rows,
        }) => {
            let report = systems::stream::run_child(*system, url, table, *rows).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Some(Command::ClientCost {
            system,
            workload,
            url,
            queries,
        }) => client_cost::run(*system, *workload, url, *queries).await,
        None => run(cli).await,
    }
}

/// The benchmark proper.
async fn run(cli: Cli) -> Result<()> {
    let plan = plan(&cli);
    let out = cli.out.clone().unwrap_or_else(default_out_dir);
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let markdown = cli.markdown.clone().unwrap_or_else(|| {
        if cli.quick {
            out.join("BENCHMARKS.md")
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md")
        }
    });

    let mut server = Server::start().await?;
    let info = server.describe().await?;
    eprintln!("server: PostgreSQL {} ({})", info.version, info.origin);
    let mut streams = vec![(STREAM_TABLE, plan.stream_rows)];
    if let Some(rows) = plan.big_rows {
        streams.push((STREAM_BIG_TABLE, rows));
    }
    data::load(&server.url, &server.bin_dir, plan.scale, &streams).await?;

    let piccolo = if plan.systems.iter().any(|system| {
        matches!(
            system,
            System::Piccolo | System::PiccoloPgengine | System::Asyncpg
        )
    }) {
        Piccolo::prepare(&out.join("venv"), !cli.quick)
            .await
            .map_err(|e| format!("{e:#}"))
    } else {
        Err("not selected".into())
    };
    if let Err(reason) = &piccolo {
        eprintln!("piccolo skipped: {reason}");
    }

    let mut runner = Runner::new(
        plan.clone(),
        server.url.clone(),
        server.bin_dir.clone(),
        out.clone(),
        piccolo,
        Err("not started yet".into()),
    )
    .await?;
    let mut outcomes = runner
        .run(|w| w != Workload::ReplicaReads && !w.durable())
        .await;
    // The standby runs only for the workload that reads from it: streaming the other
    // workloads' writes to it would take CPU from them.
    if plan.workloads.contains(&Workload::ReplicaReads) {
        runner.replica = server.start_replica().await;
        if let Err(reason) = &runner.replica {
            eprintln!("replica skipped: {reason}");
        }
        outcomes.extend(runner.run(|w| w == Workload::ReplicaReads).await);
    }
    // The durable workloads run on a second cluster of their own, started last so
    // that its WAL flushes do not share the disk with the other workloads.
    let mut durable = None;
    if plan.workloads.iter().any(|w| w.durable()) {
        runner.durable = match Server::start_durable().await {
            Ok(cluster) => {
                let url = cluster.url();
                data::load(&url, &server.bin_dir, plan.scale, &[]).await?;
                durable = Some(cluster);
                Ok(url)
            }
            Err(error) => Err(format!("{error:#}")),
        };
        if let Err(reason) = &runner.durable {
            eprintln!("durable server skipped: {reason}");
        }
        outcomes.extend(runner.run(|w| w.durable()).await);
    }
    drop(durable);

    let report = report::Report::new(plan, info, command_line(), outcomes);
    println!("{}", report.table());
    println!("{}", report.targets_section());
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    // The chart goes next to the markdown, which shows it (`BENCHMARKS.png`).
    let chart_path = markdown.with_extension("png");
    let chart = match chart::draw(&report, &chart_path) {
        Ok(()) => {
            eprintln!("wrote {}", chart_path.display());
            chart_path.file_name().and_then(|name| name.to_str())
        }
        Err(e) => {
            eprintln!("no chart: {e:#}");
            None
        }
    };
    std::fs::write(&markdown, report.benchmarks_md(chart))?;
    eprintln!(
        "wrote {} and {}",
        out.join("results.json").display(),
        markdown.display()
    );
    Ok(())
}

/// Sizes and durations from the flags.
fn plan(cli: &Cli) -> Plan {
    let secs = |s: f64| Duration::from_secs_f64(s);
    let duration = cli.duration.unwrap_or(if cli.quick { 0.3 } else { 2.0 });
    let warmup = if cli.quick { 0.1 } else { 0.5 };
    let systems = if cli.systems.is_empty() {
        System::ALL.to_vec()
    } else {
        cli.systems.clone()
    };
    let workloads = Workload::ALL
        .into_iter()
        .filter(|w| cli.workloads.is_empty() || cli.workloads.contains(w))
        .filter(|w| *w != Workload::StreamBig || (cli.big && !cli.quick))
        .collect();
    Plan {
        quick: cli.quick,
        scale: if cli.quick { 1 } else { 10 },
        stream_rows: if cli.quick { 20_000 } else { 1_000_000 },
        copy_rows: if cli.quick { 20_000 } else { 1_000_000 },
        big_rows: (cli.big && !cli.quick).then_some(10_000_000),
        timing: Timing {
            warmup: secs(warmup),
            duration: secs(duration),
        },
        proxy_timing: Timing {
            warmup: secs(warmup * 2.0),
            duration: secs(duration * 2.0),
        },
        reps: cli.reps.unwrap_or(if cli.quick { 1 } else { 3 }).max(1),
        systems,
        workloads,
    }
}

/// `target/bench` of the workspace (or of `CARGO_TARGET_DIR`).
fn default_out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("bench")
}

/// How this run was invoked, as a cargo command.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut command = "cargo run --release -p pgengine-bench".to_string();
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    command
}
