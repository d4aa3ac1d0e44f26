//! deadpool-postgres: a pool of tokio-postgres clients, `prepare_cached` per
//! connection, written as typical application code.

use anyhow::Result;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::measure::Session;
use crate::workloads::{ATOMIC_INSERTS, Call, RANGE_ROWS, sql};

/// Builds a pool of `size` connections and opens them all.
pub async fn pool(url: &str, size: usize) -> Result<Pool> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(size).build()?;
    let mut held = Vec::with_capacity(size);
    for _ in 0..size {
        held.push(pool.get().await?);
    }
    Ok(pool)
}

/// A handle on the shared pool.
pub struct DeadpoolSession(pub Pool);

impl Session for DeadpoolSession {
    async fn call(&mut self, call: Call) -> Result<()> {
        let mut client = self.0.get().await?;
        match call {
            Call::PointSelect { aid } => {
                let stmt = client.prepare_cached(sql::POINT_SELECT).await?;
                let _: i32 = client.query_one(&stmt, &[&aid]).await?.try_get(0)?;
            }
            Call::RangeRead { from } => {
                let stmt = client.prepare_cached(sql::RANGE_READ).await?;
                let rows = client.query(&stmt, &[&from]).await?;
                anyhow::ensure!(
                    rows.len() == RANGE_ROWS as usize,
                    "a range of {}",
                    rows.len()
                );
            }
            Call::Tpcb(t) => {
                let tx = client.transaction().await?;
                let stmt = tx.prepare_cached(sql::TPCB_ACCOUNT).await?;
                tx.execute(&stmt, &[&t.delta, &t.aid]).await?;
                let stmt = tx.prepare_cached(sql::TPCB_SELECT).await?;
                let _: i32 = tx.query_one(&stmt, &[&t.aid]).await?.try_get(0)?;
                let stmt = tx.prepare_cached(sql::TPCB_TELLER).await?;
                tx.execute(&stmt, &[&t.delta, &t.tid]).await?;
                let stmt = tx.prepare_cached(sql::TPCB_BRANCH).await?;
                tx.execute(&stmt, &[&t.delta, &t.bid]).await?;
                let stmt = tx.prepare_cached(sql::TPCB_HISTORY).await?;
                tx.execute(&stmt, &[&t.tid, &t.bid, &t.aid, &t.delta])
                    .await?;
                tx.commit().await?;
            }
            Call::Atomic => {
                let tx = client.transaction().await?;
                let stmt = tx.prepare_cached(sql::ATOMIC_INSERT).await?;
                for i in 0..ATOMIC_INSERTS {
                    tx.execute(&stmt, &[&i, &"x"]).await?;
                }
                tx.commit().await?;
            }
            Call::EmptyTx => client.transaction().await?.commit().await?,
            Call::BulkInsert => anyhow::bail!("deadpool-postgres is not measured on bulk inserts"),
        }
        Ok(())
    }
}
