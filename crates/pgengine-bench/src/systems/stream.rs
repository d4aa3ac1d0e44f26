//! Batch streaming of a large table, run in a child process per measurement
//! so each system's peak RSS is its own.
//!
//! The parent re-executes this binary with the hidden `stream-child`
//! subcommand; the child streams, decodes every row, and prints one JSON line.

use std::hint::black_box;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio_postgres::types::{FromSql, Type};

use crate::measure::{Sample, peak_rss_kb};
use crate::systems::{System, deadpool, sqlx as sqlx_sys, tokio_pg};
use crate::workloads::{BATCH_SIZE, sql};

/// What the child reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamReport {
    pub rows: u64,
    pub secs: f64,
    pub peak_rss_kb: Option<u64>,
}

/// Parent side: streams `table` with `system` in a child process.
pub async fn measure_in_child(system: System, url: &str, table: &str, rows: u64) -> Result<Sample> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args(["stream-child", "--url", url, "--table", table])
        .args(["--system", &system.arg(), "--rows", &rows.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "stream child failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .context("stream child printed nothing")?;
    let report: StreamReport = serde_json::from_str(line)?;
    if report.rows != rows {
        bail!("streamed {} rows, expected {rows}", report.rows);
    }
    Ok(Sample {
        ops: report.rows,
        secs: report.secs,
        peak_rss_kb: report.peak_rss_kb,
        ..Sample::default()
    })
}

/// Child side: streams the table and reports rows, seconds and VmHWM.
pub async fn run_child(system: System, url: &str, table: &str, rows: u64) -> Result<StreamReport> {
    let query = sql::stream(table);
    let mut digest = Digest::default();
    let began = Instant::now();
    match system {
        System::TokioPostgres => {
            let mut client = tokio_pg::connect(url).await?;
            let tx = client.transaction().await?;
            let portal = tx.bind(query.as_str(), &[]).await?;
            loop {
                let batch = tx.query_portal(&portal, BATCH_SIZE as i32).await?;
                digest.pg_rows(&batch)?;
                if batch.len() < BATCH_SIZE {
                    break;
                }
            }
            tx.commit().await?;
        }
        System::Deadpool => {
            let pool = deadpool::pool(url, 1).await?;
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "DECLARE bench_cursor NO SCROLL CURSOR FOR {query}"
            ))
            .await?;
            let fetch = tx
                .prepare_cached(&format!("FETCH {BATCH_SIZE} FROM bench_cursor"))
                .await?;
            loop {
                let batch = tx.query(&fetch, &[]).await?;
                digest.pg_rows(&batch)?;
                if batch.len() < BATCH_SIZE {
                    break;
                }
            }
            tx.commit().await?;
        }
        System::Sqlx => {
            let pool = sqlx_sys::pool(url, 1).await?;
            let mut stream = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&pool);
            while let Some(row) = stream.try_next().await? {
                digest.sqlx_row(&row)?;
            }
        }
        System::Copy => {
            let client = tokio_pg::connect(url).await?;
            let copy =
                format!("COPY {table} (id, label, created, amount) TO STDOUT (FORMAT binary)");
            let stream = client.copy_out(copy.as_str()).await?;
            futures::pin_mut!(stream);
            while let Some(chunk) = stream.try_next().await? {
                digest.sum = digest.sum.wrapping_add(black_box(chunk.len() as u64));
            }
            // COPY yields bytes, not rows: the row count is the table's.
            digest.rows = rows;
        }
        #[cfg(feature = "pgengine")]
        System::Pgengine => {
            let mut result = Ok(());
            crate::systems::pgengine::stream(url, &query, |batch| {
                if result.is_ok() {
                    result = digest.pg_rows(batch);
                }
            })
            .await?;
            result?;
        }
        other => bail!("{} does not stream in a child process", other.name()),
    }
    let secs = began.elapsed().as_secs_f64();
    black_box(digest.sum);
    Ok(StreamReport {
        rows: digest.rows,
        secs,
        peak_rss_kb: peak_rss_kb(),
    })
}

/// Decodes every column of every row, so no system skips the work.
#[derive(Default)]
struct Digest {
    rows: u64,
    sum: u64,
}

impl Digest {
    fn add(&mut self, id: i32, label: &str, created: DateTime<Utc>, amount: &[u8]) {
        self.rows += 1;
        let mixed = (id as u64)
            ^ label.len() as u64
            ^ created.timestamp_micros() as u64
            ^ amount.len() as u64;
        self.sum = self.sum.wrapping_add(black_box(mixed));
    }

    fn pg_rows(&mut self, rows: &[tokio_postgres::Row]) -> Result<()> {
        for row in rows {
            let amount: RawValue = row.try_get(3)?;
            self.add(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, amount.0);
        }
        Ok(())
    }

    fn sqlx_row(&mut self, row: &sqlx::postgres::PgRow) -> Result<()> {
        let amount = row.try_get_raw(3)?;
        let amount = amount.as_bytes().map_err(|e| anyhow::anyhow!(e))?;
        self.add(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, amount);
        Ok(())
    }
}

/// A column's wire bytes, undecoded (for `numeric`, which the drivers need
/// extra crates to decode).
struct RawValue<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}
