//! Runs every workload for every system in one process against one server,
//! interleaved: each repetition visits every system before the next starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::data::{self, STREAM_BIG_TABLE, STREAM_TABLE};
use crate::measure::{Sample, Session, Timing, Window, closed_loop};
use crate::proxy::DelayProxy;
use crate::systems::deadpool::{self, DeadpoolSession};
use crate::systems::piccolo::{Piccolo, PiccoloEngine};
use crate::systems::sqlx::{self as sqlx_sys, SqlxSession};
use crate::systems::tokio_pg::TokioPgSession;
use crate::systems::{System, pgbench, stream};
use crate::workloads::{BULK_ROWS, Workload};

/// Latency the proxy adds in each direction.
pub const PROXY_DELAY: Duration = Duration::from_millis(1);

/// Sizes and durations of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    /// pgbench scale: 100 000 accounts per unit.
    pub scale: u32,
    pub stream_rows: u64,
    /// Rows of each COPY in.
    pub copy_rows: u64,
    /// Rows of the big streaming table, when `--big` is given.
    pub big_rows: Option<u64>,
    pub timing: Timing,
    /// Timing of the proxied atomic (slow systems need longer to do a few).
    pub proxy_timing: Timing,
    pub reps: usize,
    pub systems: Vec<System>,
    pub workloads: Vec<Workload>,
}

impl Plan {
    pub fn accounts(&self) -> i32 {
        (self.scale * 100_000) as i32
    }

    fn stream_table(&self, workload: Workload) -> (&'static str, u64) {
        match workload {
            Workload::StreamBig => (STREAM_BIG_TABLE, self.big_rows.unwrap_or_default()),
            _ => (STREAM_TABLE, self.stream_rows),
        }
    }
}

/// All repetitions of one system on one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub workload: Workload,
    pub system: System,
    pub samples: Vec<Sample>,
    /// Why the system did not run (not built, Python missing, …).
    pub skipped: Option<String>,
    /// The error that stopped its measurements.
    pub error: Option<String>,
}

/// Everything a measurement needs.
pub struct Runner {
    pub plan: Plan,
    pub url: String,
    pub bin_dir: PathBuf,
    pub scratch: PathBuf,
    pub piccolo: Result<Piccolo, String>,
    /// A hot standby of the server, or why there is none.
    pub replica: Result<String, String>,
    /// The durable server's URL, for the durable workloads.
    pub durable: Result<String, String>,
    proxy: DelayProxy,
    proxy_url: String,
}

impl Runner {
    pub async fn new(
        plan: Plan,
        url: String,
        bin_dir: PathBuf,
        scratch: PathBuf,
        piccolo: Result<Piccolo, String>,
        replica: Result<String, String>,
    ) -> Result<Self> {
        let proxy = DelayProxy::start(server_addr(&url)?, PROXY_DELAY).await?;
        let proxy_url = with_addr(&url, proxy.addr())?;
        Ok(Self {
            plan,
            url,
            bin_dir,
            scratch,
            piccolo,
            replica,
            durable: Err("not started yet".into()),
            proxy,
            proxy_url,
        })
    }

    /// Runs the plan, printing a line per measurement to stderr.
    /// Runs the plan's workloads that `selected` keeps.
    pub async fn run(&self, selected: impl Fn(Workload) -> bool) -> Vec<Outcome> {
        let mut all = Vec::new();
        for &workload in self.plan.workloads.iter().filter(|w| selected(**w)) {
            let mut outcomes: Vec<Outcome> = self
                .plan
                .systems
                .iter()
                .filter(|s| s.supports(workload))
                .map(|&system| Outcome {
                    workload,
                    system,
                    samples: Vec::new(),
                    skipped: self
                        .skip_reason(system)
                        .or_else(|| match workload.durable() {
                            true => self.durable.as_ref().err().cloned(),
                            false => None,
                        }),
                    error: None,
                })
                .collect();
            let n = outcomes.len();
            for rep in 0..self.plan.reps {
                // Rotate the starting system so none always runs first.
                for k in 0..n {
                    let outcome = &mut outcomes[(k + rep) % n];
                    if outcome.skipped.is_some() || outcome.error.is_some() {
                        continue;
                    }
                    match self.measure(workload, outcome.system).await {
                        Ok(sample) => {
                            eprintln!(
                                "{:<28} {:<18} rep {}: {:>12.1} {}",
                                workload.id(),
                                outcome.system.name(),
                                rep + 1,
                                sample.throughput(),
                                workload.unit()
                            );
                            outcome.samples.push(sample);
                        }
                        Err(e) => {
                            eprintln!(
                                "{:<28} {:<18} failed: {e:#}",
                                workload.id(),
                                outcome.system.name()
                            );
                            outcome.error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            all.extend(outcomes);
        }
        all
    }

    fn skip_reason(&self, system: System) -> Option<String> {
        match system {
            System::Pgengine | System::PgengineMultiplexed if !cfg!(feature = "pgengine") => {
                Some("built without the `pgengine` feature".into())
            }
            System::Piccolo | System::Asyncpg => self.piccolo.as_ref().err().cloned(),
            System::PiccoloPgengine => match &self.piccolo {
                Err(reason) => Some(reason.clone()),
                Ok(piccolo) => piccolo.pgengine.clone().err(),
            },
            System::PgengineReplica | System::PgengineBoth => self.replica.as_ref().err().cloned(),
            _ => None,
        }
    }

    /// One repetition of `system` on `workload`.
    async fn measure(&self, workload: Workload, system: System) -> Result<Sample> {
        if workload.is_stream() {
            let (table, rows) = self.plan.stream_table(workload);
            return match system {
                System::Piccolo => {
                    let engine = PiccoloEngine::Asyncpg;
                    self.piccolo()?.stream(engine, &self.url, table).await
                }
                System::PiccoloPgengine => {
                    let engine = PiccoloEngine::Pgengine;
                    self.piccolo()?.stream(engine, &self.url, table).await
                }
                _ => stream::measure_in_child(system, &self.url, table, rows).await,
            };
        }
        if workload == Workload::CopyIn {
            return self.copy_in(system).await;
        }
        let proxied = workload == Workload::AtomicProxy;
        let server = match workload.durable() {
            true => self
                .durable
                .as_deref()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            false => self.url.as_str(),
        };
        let (url, timing) = if proxied {
            (self.proxy_url.as_str(), self.plan.proxy_timing)
        } else {
            (server, self.plan.timing)
        };
        if matches!(workload.base(), Workload::Atomic | Workload::AtomicProxy) || workload.is_bulk()
        {
            data::reset_inserts(server).await?;
        }
        let (mut sample, window) = self.closed_loop(system, workload, url, timing).await?;
        if workload.is_bulk() {
            sample.ops *= BULK_ROWS as u64; // each operation inserts a batch
        }
        if proxied && sample.ops > 0 {
            let window = window.context("no measured window")?;
            let trips = self.proxy.round_trips_between(window.from, window.to);
            sample.round_trips = Some(trips as f64 / sample.ops as f64);
        }
        Ok(sample)
    }

    async fn closed_loop(
        &self,
        system: System,
        workload: Workload,
        url: &str,
        timing: Timing,
    ) -> Result<(Sample, Option<Window>)> {
        let op = workload
            .op(self.plan.accounts())
            .context("not a closed-loop workload")?;
        let clients = workload.concurrency();
        let measured = match system {
            System::TokioPostgres => {
                let mut sessions = Vec::with_capacity(clients);
                for _ in 0..clients {
                    sessions.push(TokioPgSession::open(url).await?);
                }
                closed_loop(sessions, timing, op).await?
            }
            System::Deadpool => {
                let pool = deadpool::pool(url, clients).await?;
                let result = closed_loop(
                    handles(clients, || DeadpoolSession(pool.clone())),
                    timing,
                    op,
                )
                .await;
                pool.close();
                result?
            }
            System::Sqlx => {
                let pool = sqlx_sys::pool(url, clients).await?;
                let result =
                    closed_loop(handles(clients, || SqlxSession(pool.clone())), timing, op).await;
                pool.close().await;
                result?
            }
            #[cfg(feature = "pgengine")]
            System::Pgengine | System::PgengineMultiplexed => {
                use crate::systems::pgengine::{PgengineSession, engine, multiplexed_engine};
                let engine = match system {
                    System::PgengineMultiplexed => multiplexed_engine(url, clients).await?,
                    _ => engine(url, clients).await?,
                };
                let result = closed_loop(
                    handles(clients, || PgengineSession(engine.clone())),
                    timing,
                    op,
                )
                .await;
                engine.close_connection_pool().await;
                result?
            }
            #[cfg(feature = "pgengine")]
            System::PgengineReplica | System::PgengineBoth => {
                use crate::systems::pgengine::{ReplicaReader, engine_with_replicas};
                let standby = self
                    .replica
                    .as_deref()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let replicas = match system {
                    System::PgengineReplica => vec![standby],
                    _ => vec![url, standby],
                };
                let engine = engine_with_replicas(url, &replicas, clients).await?;
                let result = closed_loop(
                    handles(clients, || ReplicaReader(engine.clone())),
                    timing,
                    op,
                )
                .await;
                engine.close_connection_pool().await;
                result?
            }
            System::Piccolo | System::PiccoloPgengine | System::Asyncpg => {
                let engine = match system {
                    System::Piccolo => PiccoloEngine::Asyncpg,
                    System::Asyncpg => PiccoloEngine::AsyncpgExecutemany,
                    _ => PiccoloEngine::Pgengine,
                };
                let accounts = self.plan.accounts();
                let (sample, window) = self
                    .piccolo()?
                    .closed_loop(engine, url, workload, accounts, timing)
                    .await?;
                (sample, Some(window))
            }
            System::Pgbench => {
                let sample =
                    pgbench::run(&self.bin_dir, url, workload, timing, &self.scratch).await?;
                return Ok((sample, None));
            }
            other => bail!("{} cannot run {}", other.name(), workload.title()),
        };
        Ok(measured)
    }

    /// One COPY of the plan's rows into an empty table.
    async fn copy_in(&self, system: System) -> Result<Sample> {
        data::reset_copy(&self.url).await?;
        let rows: Vec<(i32, String)> = (0..self.plan.copy_rows as i32)
            .map(|i| (i, format!("row number {i}")))
            .collect();
        let (copied, took) = match system {
            #[cfg(feature = "pgengine")]
            System::Pgengine => crate::systems::pgengine::copy_in(&self.url, &rows).await?,
            System::TokioPostgres => crate::systems::tokio_pg::copy_in(&self.url, &rows).await?,
            other => bail!("{} cannot run {}", other.name(), Workload::CopyIn.title()),
        };
        if copied != self.plan.copy_rows {
            bail!("copied {copied} rows of {}", self.plan.copy_rows);
        }
        Ok(Sample {
            ops: copied,
            secs: took.as_secs_f64(),
            ..Sample::default()
        })
    }

    fn piccolo(&self) -> Result<&Piccolo> {
        self.piccolo.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// `n` handles on one shared pool.
fn handles<S: Session>(n: usize, make: impl Fn() -> S) -> Vec<S> {
    (0..n).map(|_| make()).collect()
}

/// The server's TCP address, from its URL.
fn server_addr(url: &str) -> Result<SocketAddr> {
    let config: tokio_postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => bail!("the delay proxy needs a TCP host in the URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port)
        .to_socket_addrs()?
        .next()
        .context("server host does not resolve")
}

/// `url` with its host and port replaced by `addr`.
fn with_addr(url: &str, addr: SocketAddr) -> Result<String> {
    let scheme_end = url.find("://").context("not a URL")? + 3;
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let host_start = url[scheme_end..authority_end]
        .rfind('@')
        .map_or(scheme_end, |i| scheme_end + i + 1);
    Ok(format!(
        "{}{addr}{}",
        &url[..host_start],
        &url[authority_end..]
    ))
}
