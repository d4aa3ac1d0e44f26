//! The data every system reads and writes: pgbench's tables, an insert
//! target for atomics, and tables to stream. Reused when already loaded.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::systems::tokio_pg;

/// The table streamed by workload 4.
pub const STREAM_TABLE: &str = "bench_stream";
/// The big streamed table (`--big`).
pub const STREAM_BIG_TABLE: &str = "bench_stream_big";

/// Loads pgbench's tables at `scale` (100 000 accounts per unit) and the
/// streaming tables, skipping what is already there.
pub async fn load(
    url: &str,
    bin_dir: &Path,
    scale: u32,
    stream_rows: &[(&str, u64)],
) -> Result<()> {
    let client = tokio_pg::connect(url).await?;
    let accounts = i64::from(scale) * 100_000;
    if count(&client, "pgbench_accounts").await? != Some(accounts) {
        eprintln!("loading pgbench tables, scale {scale} ({accounts} accounts) …");
        let output = Command::new(bin_dir.join("pgbench"))
            .args(["--initialize", "--quiet", &format!("--scale={scale}"), url])
            .stdin(Stdio::null())
            .output()
            .await
            .context("could not run pgbench --initialize")?;
        if !output.status.success() {
            bail!(
                "pgbench --initialize failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_atomic (a int NOT NULL, b text NOT NULL);
             CREATE TABLE IF NOT EXISTS bench_bulk (a int NOT NULL, b text NOT NULL);
             CREATE TABLE IF NOT EXISTS bench_copy (a int NOT NULL, b text NOT NULL)",
        )
        .await?;
    for &(table, rows) in stream_rows {
        if count(&client, table).await? == Some(rows as i64) {
            continue;
        }
        eprintln!("loading {table} ({rows} rows) …");
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table};
                 CREATE TABLE {table} (id int NOT NULL, label text NOT NULL,
                                       created timestamptz NOT NULL, amount numeric(14, 2) NOT NULL);
                 INSERT INTO {table}
                   SELECT g, 'row number ' || g, timestamptz '2024-01-01' + g * interval '1 second',
                          (g % 100000) * 1.37
                   FROM generate_series(1, {rows}) AS g;"
            ))
            .await?;
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    Ok(())
}

/// Empties the insert targets of the atomic and bulk workloads between measurements.
pub async fn reset_inserts(url: &str) -> Result<()> {
    tokio_pg::connect(url)
        .await?
        .batch_execute("TRUNCATE bench_atomic, bench_bulk")
        .await?;
    Ok(())
}

/// Empties the COPY workload's target between measurements.
pub async fn reset_copy(url: &str) -> Result<()> {
    tokio_pg::connect(url)
        .await?
        .batch_execute("TRUNCATE bench_copy")
        .await?;
    Ok(())
}

/// Row count of `table`, `None` when it does not exist.
async fn count(client: &tokio_postgres::Client, table: &str) -> Result<Option<i64>> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    Ok(Some(n))
}
