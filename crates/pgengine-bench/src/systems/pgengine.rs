//! pgengine, through its public API only.

use std::sync::Arc;

use anyhow::Result;
use pgengine::types::ToSql;
use pgengine::{Executor, PostgresEngine, sql};

use crate::measure::Session;
use crate::workloads::{ATOMIC_INSERTS, BATCH_SIZE, BULK_ROWS, Call, RANGE_ROWS, sql};

/// Builds an engine with a pool of `size` connections and starts the pool.
pub async fn engine(url: &str, size: usize) -> Result<Arc<PostgresEngine>> {
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(size)
        .build()
        .await?;
    engine.start_connection_pool().await?;
    Ok(Arc::new(engine))
}

/// Shared connections of the multiplexed engine: twice the server's two cores.
pub const SHARED_CONNECTIONS: usize = 4;

/// An engine whose autocommit statements share [`SHARED_CONNECTIONS`] connections,
/// with room for `size` callers beyond them.
pub async fn multiplexed_engine(url: &str, size: usize) -> Result<Arc<PostgresEngine>> {
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(size + SHARED_CONNECTIONS)
        .multiplex(SHARED_CONNECTIONS)
        .build()
        .await?;
    engine.start_connection_pool().await?;
    Ok(Arc::new(engine))
}

/// An engine with a pool of `size` connections on `url`, and `replicas` as its read
/// replicas (a pool of `size` each), every pool started.
pub async fn engine_with_replicas(
    url: &str,
    replicas: &[&str],
    size: usize,
) -> Result<Arc<PostgresEngine>> {
    let engine = replicas
        .iter()
        .fold(PostgresEngine::builder().url(url), |builder, replica| {
            builder.read_replica(replica)
        })
        .max_connections(size)
        .build()
        .await?;
    engine.start_connection_pool().await?;
    Ok(Arc::new(engine))
}

/// A handle on the shared engine whose point selects go through `engine.replica()`.
pub struct ReplicaReader(pub Arc<PostgresEngine>);

impl Session for ReplicaReader {
    async fn call(&mut self, call: Call) -> Result<()> {
        let Call::PointSelect { aid } = call else {
            anyhow::bail!("reads on a replica are point selects only");
        };
        let row = self
            .0
            .replica()
            .await
            .fetch_one(sql!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
                aid
            ))
            .await?;
        let _: i32 = row.try_get(0)?;
        Ok(())
    }
}

/// A handle on the shared engine.
pub struct PgengineSession(pub Arc<PostgresEngine>);

impl Session for PgengineSession {
    async fn call(&mut self, call: Call) -> Result<()> {
        let engine = &self.0;
        match call {
            Call::PointSelect { aid } => {
                let row = engine
                    .fetch_one(sql!(
                        "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
                        aid
                    ))
                    .await?;
                let _: i32 = row.try_get(0)?;
            }
            Call::RangeRead { from } => {
                let rows = engine
                    .fetch(sql!(
                        "SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN {} AND {} + 99",
                        from,
                        from
                    ))
                    .await?;
                anyhow::ensure!(
                    rows.len() == RANGE_ROWS as usize,
                    "a range of {}",
                    rows.len()
                );
            }
            Call::Tpcb(t) => {
                engine
                    .transaction()
                    .run(async move |tx| {
                        tx.execute(sql!(
                            "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {}",
                            t.delta,
                            t.aid
                        ))
                        .await?;
                        let row = tx
                            .fetch_one(sql!(
                                "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
                                t.aid
                            ))
                            .await?;
                        let _: i32 = row.get(0);
                        tx.execute(sql!(
                            "UPDATE pgbench_tellers SET tbalance = tbalance + {} WHERE tid = {}",
                            t.delta,
                            t.tid
                        ))
                        .await?;
                        tx.execute(sql!(
                            "UPDATE pgbench_branches SET bbalance = bbalance + {} WHERE bid = {}",
                            t.delta,
                            t.bid
                        ))
                        .await?;
                        tx.execute(sql!(
                            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
                             VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP)",
                            t.tid,
                            t.bid,
                            t.aid,
                            t.delta
                        ))
                        .await?;
                        Ok::<_, pgengine::Error>(())
                    })
                    .await?;
            }
            Call::Atomic => {
                let mut atomic = engine.atomic();
                for i in 0..ATOMIC_INSERTS {
                    atomic.add(sql!(
                        "INSERT INTO bench_atomic (a, b) VALUES ({}, {})",
                        i,
                        "x"
                    ));
                }
                atomic.run().await?;
            }
            Call::EmptyTx => engine.begin().await?.commit().await?,
            Call::BulkInsert => {
                let values: Vec<i32> = (0..BULK_ROWS).collect();
                let rows = values.iter().map(|i| [i as &(dyn ToSql + Sync), &"x"]);
                let inserted = engine.execute_many(sql::BULK_INSERT, rows).await?;
                anyhow::ensure!(inserted == BULK_ROWS as u64, "inserted {inserted}");
            }
        }
        Ok(())
    }
}

/// Streams `query` with `engine.batch`, handing each batch to `consume`.
pub async fn stream(
    url: &str,
    query: &str,
    mut consume: impl FnMut(&[tokio_postgres::Row]),
) -> Result<()> {
    let engine = engine(url, 1).await?;
    let mut batch = engine.batch(query.to_owned(), BATCH_SIZE).await?;
    while let Some(rows) = batch.next().await? {
        consume(&rows);
    }
    drop(batch);
    engine.close_connection_pool().await;
    Ok(())
}

/// Loads `rows` into `bench_copy` with a binary COPY on a fresh engine; returns the rows
/// copied and the time the COPY took (the engine's start not counted).
pub async fn copy_in(url: &str, rows: &[(i32, String)]) -> Result<(u64, std::time::Duration)> {
    use pgengine::types::{ToSql, Type};
    let engine = engine(url, 1).await?;
    let started = std::time::Instant::now();
    let copied = engine
        .copy_in_rows(
            "COPY bench_copy (a, b) FROM STDIN (FORMAT binary)",
            &[Type::INT4, Type::TEXT],
            rows.iter().map(|(a, b)| [a as &(dyn ToSql + Sync), b as _]),
        )
        .await?;
    let took = started.elapsed();
    engine.close_connection_pool().await;
    Ok((copied, took))
}
