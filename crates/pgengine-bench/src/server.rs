//! The one PostgreSQL server of a run: `DATABASE_URL` when set, else an
//! ephemeral cluster from `pgengine-testing` with benchmark settings.

use std::path::PathBuf;

use anyhow::{Context, Result};
use pgengine_testing::{EphemeralCluster, find_bin_dir};
use serde::Serialize;

use crate::systems::tokio_pg;

/// Server settings of the ephemeral cluster (on top of pgengine-testing's
/// defaults, which turn durability off: the benchmark measures clients).
const SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "256MB"),
    ("max_connections", "200"),
    ("work_mem", "16MB"),
];

/// What makes the durable server durable: every commit waits for its WAL flush, as
/// PostgreSQL's defaults have it.
pub const DURABLE: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
];

/// Settings reported in BENCHMARKS.md.
const REPORTED: &[&str] = &[
    "max_connections",
    "shared_buffers",
    "work_mem",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
];

/// A running server and where its binaries are.
pub struct Server {
    pub url: String,
    pub bin_dir: PathBuf,
    /// Where the server came from, for the report.
    pub origin: String,
    /// The ephemeral cluster, stopped when the server is dropped.
    cluster: Option<EphemeralCluster>,
    /// A hot standby of `cluster`, when a workload reads from one.
    _replica: Option<EphemeralCluster>,
}

impl Server {
    /// Uses `DATABASE_URL` if set, else starts an ephemeral cluster.
    pub async fn start() -> Result<Self> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let bin_dir = find_bin_dir().context("PostgreSQL binaries (for pgbench) not found")?;
            return Ok(Self {
                url,
                bin_dir,
                origin: "DATABASE_URL".into(),
                cluster: None,
                _replica: None,
            });
        }
        let cluster = tokio::task::spawn_blocking(|| {
            SETTINGS
                .iter()
                .fold(EphemeralCluster::builder(), |b, (k, v)| b.setting(*k, *v))
                .start()
        })
        .await?
        .context("could not start an ephemeral PostgreSQL cluster")?;
        Ok(Self {
            url: cluster.url(),
            bin_dir: cluster.bin_dir().to_path_buf(),
            origin: "ephemeral cluster (pgengine-testing)".into(),
            cluster: Some(cluster),
            _replica: None,
        })
    }

    /// Starts a hot standby of the ephemeral cluster (a base backup of what it holds
    /// now, streaming) and returns its URL; an error saying why there is none with
    /// `DATABASE_URL`.
    pub async fn start_replica(&mut self) -> Result<String, String> {
        let Some(primary) = self.cluster.take() else {
            return Err("no replica of a DATABASE_URL server".into());
        };
        let (primary, standby) = tokio::task::spawn_blocking(move || {
            let standby = primary.standby();
            (primary, standby)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.cluster = Some(primary);
        let standby = standby.map_err(|e| format!("could not start a standby: {e}"))?;
        let url = standby.url();
        self._replica = Some(standby);
        Ok(url)
    }

    /// Starts a second ephemeral cluster, durable ([`DURABLE`]), for the durable
    /// workloads; it is stopped when the returned cluster is dropped.
    pub async fn start_durable() -> Result<EphemeralCluster> {
        tokio::task::spawn_blocking(|| {
            SETTINGS
                .iter()
                .chain(DURABLE)
                .fold(EphemeralCluster::builder(), |b, (k, v)| b.setting(*k, *v))
                .start()
        })
        .await?
        .context("could not start a durable ephemeral PostgreSQL cluster")
    }

    /// The server's version and the settings that matter for the figures.
    pub async fn describe(&self) -> Result<ServerInfo> {
        let client = tokio_pg::connect(&self.url).await?;
        let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        let mut settings = Vec::new();
        for name in REPORTED {
            let value: String = client.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
            settings.push((name.to_string(), value));
        }
        Ok(ServerInfo {
            version,
            origin: self.origin.clone(),
            settings,
        })
    }
}

/// What the report says about the server.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub version: String,
    pub origin: String,
    pub settings: Vec<(String, String)>,
}
