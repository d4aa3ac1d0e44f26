//! pgbench (C, libpq, `-M prepared`): the practical ceiling where a workload
//! is expressible as a pgbench script.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::measure::{Sample, Timing, percentiles};
use crate::workloads::{ATOMIC_INSERTS, BULK_ROWS, Workload, sql};

/// Runs `workload` with pgbench; transactions that complete during the first
/// `timing.warmup` (after the first completion) are not counted.
pub async fn run(
    bin_dir: &Path,
    url: &str,
    workload: Workload,
    timing: Timing,
    scratch: &Path,
) -> Result<Sample> {
    let logs = scratch.join(format!("pgbench-{}", workload.id()));
    if logs.exists() {
        std::fs::remove_dir_all(&logs)?;
    }
    std::fs::create_dir_all(&logs)?;
    let clients = workload.concurrency();
    let total = timing.warmup + timing.duration;

    let mut command = Command::new(bin_dir.join("pgbench"));
    command
        .args(["--no-vacuum", "--protocol=prepared", "--log"])
        .arg(format!("--log-prefix={}", logs.join("log").display()))
        .arg(format!("--client={clients}"))
        .arg(format!("--jobs={}", clients.min(2)))
        .arg(format!("--time={}", total.as_secs().max(1)));
    match workload.base() {
        Workload::PointSelect1 | Workload::PointSelect32 | Workload::PointSelect128 => {
            command.arg("--select-only");
        }
        Workload::MixedReads32 => {
            // pgbench's own select-only script, and a range read, weighted 3 : 1.
            let range = logs.join("range.sql");
            std::fs::write(
                &range,
                "\\set from random(1, 100000 * :scale - 99)\n\
                 SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN :from AND :from + 99;\n",
            )?;
            command
                .arg("--builtin=select-only@3")
                .arg(format!("--file={}@1", range.display()));
        }
        Workload::Tpcb => {}
        Workload::EmptyTx => {
            let script = logs.join("empty_tx.sql");
            std::fs::write(&script, "BEGIN;\nCOMMIT;\n")?;
            command.arg(format!("--file={}", script.display()));
        }
        Workload::Atomic => {
            let script = logs.join("atomic.sql");
            std::fs::write(&script, pipeline_script(sql::ATOMIC_INSERT, ATOMIC_INSERTS))?;
            command.arg(format!("--file={}", script.display()));
        }
        Workload::BulkInsert1 | Workload::BulkInsert10 => {
            let script = logs.join("bulk.sql");
            std::fs::write(&script, pipeline_script(sql::BULK_INSERT, BULK_ROWS))?;
            command.arg(format!("--file={}", script.display()));
        }
        other => bail!("pgbench cannot express {}", other.title()),
    }
    let output = command
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("could not run pgbench")?;
    if !output.status.success() {
        bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut sample = from_logs(&logs, timing)?;
    if clients > 2 {
        // With more clients than threads pgbench starts a transaction's clock
        // only when its thread gets to the client, so latencies are not
        // comparable with the other systems'; the throughput is.
        (sample.p50_us, sample.p99_us) = (None, None);
    }
    Ok(sample)
}

/// A pgbench script that sends `BEGIN`, `count` × `insert` (with `$1, $2` as `1, 'x'`)
/// and `COMMIT` in pipeline mode: one `Sync` for the whole transaction,
/// libpq's `PQpipelineSync`. The ceiling for an atomic bundle or a bulk insert.
fn pipeline_script(insert: &str, count: i32) -> String {
    let statement = insert.replace("$1", "1").replace("$2", "'x'");
    let mut script = String::from("\\startpipeline\nBEGIN;\n");
    for _ in 0..count {
        script.push_str(&statement);
        script.push_str(";\n");
    }
    script.push_str("COMMIT;\n\\endpipeline\n");
    script
}

/// Reads pgbench's per-transaction logs: `client tx latency_us script epoch_s epoch_us`.
fn from_logs(dir: &Path, timing: Timing) -> Result<Sample> {
    let mut done: Vec<(u64, u32)> = Vec::new(); // (completion µs since epoch, latency µs)
    for file in log_files(dir)? {
        for line in std::fs::read_to_string(&file)?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let latency: u32 = f[2].parse()?;
            let at = f[4].parse::<u64>()? * 1_000_000 + f[5].parse::<u64>()?;
            done.push((at, latency));
        }
    }
    let first = done
        .iter()
        .map(|d| d.0)
        .min()
        .context("pgbench logged no transaction")?;
    let last = done.iter().map(|d| d.0).max().unwrap_or(first);
    let from = first + timing.warmup.as_micros() as u64;
    let latencies: Vec<u32> = done.iter().filter(|d| d.0 > from).map(|d| d.1).collect();
    let ops = latencies.len() as u64;
    let (p50_us, p99_us) = percentiles(latencies);
    Ok(Sample {
        ops,
        secs: last.saturating_sub(from) as f64 / 1e6,
        p50_us,
        p99_us,
        ..Sample::default()
    })
}

fn log_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("log."));
        if is_log {
            files.push(path);
        }
    }
    Ok(files)
}
