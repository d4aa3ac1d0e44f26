//! Measurements: what one run of one system on one workload yields, and the
//! closed-loop driver that produces it for the Rust systems.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::workloads::{Call, Op};

/// Upper bound on operations per worker, so every loop is bounded in count
/// as well as in time.
pub const MAX_OPS_PER_WORKER: u64 = 50_000_000;

/// The figures of one repetition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Operations (transactions, queries, atomics) or rows completed.
    pub ops: u64,
    /// Length of the measured window in seconds.
    pub secs: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Peak resident set of the process that did the work, in KiB.
    pub peak_rss_kb: Option<u64>,
    /// Client→server round trips per operation (through the delay proxy).
    pub round_trips: Option<f64>,
}

impl Sample {
    /// Operations (or rows) per second.
    pub fn throughput(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// How long a closed-loop run lasts: `warmup` (not counted), then `duration`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// The wall-clock span of the counted operations: from the start of the
/// first to the end of the last (the proxy counts round trips within it).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from: SystemTime,
    pub to: SystemTime,
}

/// Latencies in microseconds, reduced to percentiles.
pub fn percentiles(mut latencies_us: Vec<u32>) -> (Option<f64>, Option<f64>) {
    if latencies_us.is_empty() {
        return (None, None);
    }
    latencies_us.sort_unstable();
    let n = latencies_us.len();
    let at = |q: usize| f64::from(latencies_us[(n * q / 100).min(n - 1)]);
    (Some(at(50)), Some(at(99)))
}

/// A client of one system as one worker task holds it: its own connection,
/// or a handle on a shared pool.
pub trait Session: Send + 'static {
    /// Performs one operation.
    fn call(&mut self, call: Call) -> impl Future<Output = Result<()>> + Send;
}

/// Runs `op` back to back on every session concurrently (one task each) for
/// `timing`; operations that start during the warmup are not counted.
///
/// The sessions are opened by the caller beforehand, so connection set-up
/// is never part of the window.
pub async fn closed_loop<S: Session>(
    sessions: Vec<S>,
    timing: Timing,
    op: Op,
) -> Result<(Sample, Option<Window>)> {
    let start = Instant::now();
    let measure_from = start + timing.warmup;
    let end = measure_from + timing.duration;

    let mut tasks = JoinSet::new();
    for mut session in sessions {
        tasks.spawn(async move {
            let mut rng = SmallRng::from_os_rng();
            let mut latencies = Vec::new();
            let mut span: Option<Window> = None;
            for _ in 0..MAX_OPS_PER_WORKER {
                let call = op.draw(&mut rng);
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let wall_began = SystemTime::now();
                session.call(call).await?;
                if began >= measure_from {
                    latencies.push(began.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    let from = span.map_or(wall_began, |s| s.from);
                    span = Some(Window {
                        from,
                        to: SystemTime::now(),
                    });
                }
            }
            Ok::<_, anyhow::Error>((session, latencies, span))
        });
    }

    let mut all = Vec::new();
    let mut sessions = Vec::new();
    let mut window: Option<Window> = None;
    while let Some(joined) = tasks.join_next().await {
        let (session, latencies, span) = joined.context("worker task panicked")??;
        all.extend(latencies);
        sessions.push(session);
        window = match (window, span) {
            (Some(w), Some(s)) => Some(Window {
                from: w.from.min(s.from),
                to: w.to.max(s.to),
            }),
            (w, s) => w.or(s),
        };
    }
    let secs = (Instant::now() - measure_from).as_secs_f64();
    drop(sessions);

    let ops = all.len() as u64;
    let (p50_us, p99_us) = percentiles(all);
    let sample = Sample {
        ops,
        secs,
        p50_us,
        p99_us,
        ..Sample::default()
    };
    Ok((sample, window))
}

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
