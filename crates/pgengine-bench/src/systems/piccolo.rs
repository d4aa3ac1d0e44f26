//! Piccolo ORM, run as a Python script (`python/piccolo_bench.py`) in a virtualenv the
//! runner creates: its `PostgresEngine` on asyncpg, and pgengine-piccolo's
//! `PgenginePostgresEngine` (built in release into the same virtualenv) running the
//! same code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::process::Command;

use crate::measure::{Sample, Timing, Window};
use crate::workloads::{ATOMIC_INSERTS, BATCH_SIZE, BULK_ROWS, Workload};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/piccolo_bench.py");
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/requirements.txt");

/// The pgengine-piccolo package, built into the virtualenv.
const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pgengine-py");
/// The maturin that builds it (as `.ci/run` pins it).
const MATURIN: &str = "maturin==1.9.6";

/// Which engine Piccolo runs on (or asyncpg alone, for its `executemany`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiccoloEngine {
    Asyncpg,
    Pgengine,
    /// A plain asyncpg pool, no Piccolo: `Connection.executemany`.
    AsyncpgExecutemany,
}

/// A ready virtualenv with Piccolo and asyncpg installed, and pgengine-piccolo when it
/// could be built.
pub struct Piccolo {
    python: PathBuf,
    /// Why Piccolo on pgengine cannot run, if it cannot.
    pub pgengine: Result<(), String>,
}

impl Piccolo {
    /// Finds the virtualenv under `dir`, creating it and installing the pinned
    /// requirements when `install` is set. `Err` carries the reason to skip.
    pub async fn prepare(dir: &Path, install: bool) -> Result<Self> {
        let python = dir.join("bin/python");
        let marker = dir.join(".requirements-installed");
        let wanted = std::fs::read_to_string(REQUIREMENTS)?;
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
            let pgengine = Self::build_pgengine(dir, &python, install).await;
            return Ok(Self { python, pgengine });
        }
        if !install {
            bail!(
                "no virtualenv at {} (quick mode installs nothing; run once without --quick)",
                dir.display()
            );
        }
        eprintln!("setting up the Piccolo virtualenv in {} …", dir.display());
        run_quietly(Command::new("python3").arg("-m").arg("venv").arg(dir))
            .await
            .context("python3 -m venv failed (is python3 installed?)")?;
        run_quietly(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(REQUIREMENTS),
        )
        .await
        .context("pip install of the pinned requirements failed")?;
        std::fs::write(&marker, wanted)?;
        let pgengine = Self::build_pgengine(dir, &python, install).await;
        Ok(Self { python, pgengine })
    }

    /// Builds pgengine-piccolo (release) into the virtualenv when `install` is set;
    /// then checks that it imports.
    async fn build_pgengine(dir: &Path, python: &Path, install: bool) -> Result<(), String> {
        if install {
            eprintln!(
                "building pgengine-piccolo (release) into {} …",
                dir.display()
            );
            let built = async {
                run_quietly(Command::new(python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    MATURIN,
                ]))
                .await?;
                run_quietly(
                    Command::new(dir.join("bin/maturin"))
                        .args(["develop", "--release", "--quiet"])
                        .current_dir(PACKAGE)
                        .env("VIRTUAL_ENV", dir),
                )
                .await
            };
            built
                .await
                .map_err(|e| format!("could not build pgengine-piccolo: {e:#}"))?;
        }
        run_quietly(Command::new(python).args(["-c", "import pgengine_piccolo"]))
            .await
            .map_err(|_| {
                "pgengine-piccolo is not built in the virtualenv (run once without --quick)"
                    .to_owned()
            })
    }

    /// Runs a closed-loop workload; returns the sample and its wall-clock window.
    pub async fn closed_loop(
        &self,
        engine: PiccoloEngine,
        url: &str,
        workload: Workload,
        accounts: i32,
        timing: Timing,
    ) -> Result<(Sample, Window)> {
        let name = match workload.base() {
            Workload::PointSelect1 | Workload::PointSelect32 => "point_select",
            Workload::Tpcb => "tpcb",
            Workload::Atomic | Workload::AtomicProxy => "atomic",
            Workload::EmptyTx => "empty_tx",
            Workload::BulkInsert1 | Workload::BulkInsert10 => "bulk_insert",
            _ => bail!("not a workload Piccolo runs here"),
        };
        let out: Output = self
            .run(&[
                "--url".into(),
                url.into(),
                "--workload".into(),
                name.into(),
                "--concurrency".into(),
                workload.concurrency().to_string(),
                "--duration".into(),
                timing.duration.as_secs_f64().to_string(),
                "--warmup".into(),
                timing.warmup.as_secs_f64().to_string(),
                "--accounts".into(),
                accounts.to_string(),
                "--atomic-size".into(),
                ATOMIC_INSERTS.to_string(),
                "--bulk-rows".into(),
                BULK_ROWS.to_string(),
                "--engine".into(),
                engine.arg().into(),
            ])
            .await?;
        let at = |secs: f64| UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0));
        let window = Window {
            from: at(out.window_start_unix.unwrap_or_default()),
            to: at(out.window_end_unix.unwrap_or_default()),
        };
        let sample = Sample {
            ops: out.ops.unwrap_or_default(),
            secs: out.secs,
            p50_us: out.p50_us,
            p99_us: out.p99_us,
            ..Sample::default()
        };
        Ok((sample, window))
    }

    /// Streams `table` with `engine.batch`.
    pub async fn stream(&self, engine: PiccoloEngine, url: &str, table: &str) -> Result<Sample> {
        let out: Output = self
            .run(&[
                "--url".into(),
                url.into(),
                "--workload".into(),
                "batch".into(),
                "--table".into(),
                table.into(),
                "--batch-size".into(),
                BATCH_SIZE.to_string(),
                "--engine".into(),
                engine.arg().into(),
            ])
            .await?;
        Ok(Sample {
            ops: out.rows.unwrap_or_default(),
            secs: out.secs,
            peak_rss_kb: out.peak_rss_kb,
            ..Sample::default()
        })
    }

    async fn run(&self, args: &[String]) -> Result<Output> {
        let output = Command::new(&self.python)
            .arg(SCRIPT)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            bail!(
                "piccolo script failed ({}): {}",
                output.status,
                last_lines(&stderr, 3)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .last()
            .context("piccolo script printed nothing")?;
        Ok(serde_json::from_str(line)?)
    }
}

impl PiccoloEngine {
    fn arg(self) -> &'static str {
        match self {
            PiccoloEngine::Asyncpg => "asyncpg",
            PiccoloEngine::Pgengine => "pgengine",
            PiccoloEngine::AsyncpgExecutemany => "asyncpg-executemany",
        }
    }
}

/// The script's JSON line.
#[derive(Debug, Deserialize)]
struct Output {
    ops: Option<u64>,
    rows: Option<u64>,
    secs: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    peak_rss_kb: Option<u64>,
    window_start_unix: Option<f64>,
    window_end_unix: Option<f64>,
}

async fn run_quietly(command: &mut Command) -> Result<()> {
    let output = command.stdin(Stdio::null()).output().await?;
    if !output.status.success() {
        bail!(
            "{}",
            last_lines(&String::from_utf8_lossy(&output.stderr), 3)
        );
    }
    Ok(())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
