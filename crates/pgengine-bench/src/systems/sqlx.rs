//! sqlx `PgPool`: statements are prepared and cached per connection by sqlx.

use anyhow::Result;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};

use crate::measure::Session;
use crate::workloads::{ATOMIC_INSERTS, Call, sql};

/// Builds a pool of `size` connections and opens them all.
pub async fn pool(url: &str, size: usize) -> Result<PgPool> {
    let size = u32::try_from(size)?;
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .connect(url)
        .await?)
}

/// A handle on the shared pool.
pub struct SqlxSession(pub PgPool);

impl Session for SqlxSession {
    async fn call(&mut self, call: Call) -> Result<()> {
        let pool = &self.0;
        match call {
            Call::PointSelect { aid } => {
                let row = sqlx::query::<Postgres>(sql::POINT_SELECT)
                    .bind(aid)
                    .fetch_one(pool)
                    .await?;
                let _: i32 = row.try_get(0)?;
            }
            Call::RangeRead { .. } => anyhow::bail!("sqlx is not measured on mixed reads"),
            Call::Tpcb(t) => {
                let mut tx = pool.begin().await?;
                sqlx::query(sql::TPCB_ACCOUNT)
                    .bind(t.delta)
                    .bind(t.aid)
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(sql::TPCB_SELECT)
                    .bind(t.aid)
                    .fetch_one(&mut *tx)
                    .await?;
                let _: i32 = row.try_get(0)?;
                sqlx::query(sql::TPCB_TELLER)
                    .bind(t.delta)
                    .bind(t.tid)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::TPCB_BRANCH)
                    .bind(t.delta)
                    .bind(t.bid)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::TPCB_HISTORY)
                    .bind(t.tid)
                    .bind(t.bid)
                    .bind(t.aid)
                    .bind(t.delta)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Call::Atomic => {
                let mut tx = pool.begin().await?;
                for i in 0..ATOMIC_INSERTS {
                    sqlx::query(sql::ATOMIC_INSERT)
                        .bind(i)
                        .bind("x")
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Call::EmptyTx => pool.begin().await?.commit().await?,
            Call::BulkInsert => anyhow::bail!("sqlx is not measured on bulk inserts"),
        }
        Ok(())
    }
}
