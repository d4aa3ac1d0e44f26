//! Raw tokio-postgres: one client per task with statements prepared up front.
//! The overhead floor every other Rust system is measured against.

use anyhow::Result;
use futures::future::try_join_all;
use tokio_postgres::{Client, NoTls, Statement};

use crate::measure::Session;
use crate::workloads::{ATOMIC_INSERTS, BULK_ROWS, Call, RANGE_ROWS, sql};

/// Opens a connection and drives it on its own task.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("tokio-postgres connection error: {e}");
        }
    });
    Ok(client)
}

/// One connection and its prepared statements.
pub struct TokioPgSession {
    client: Client,
    point_select: Statement,
    range_read: Statement,
    tpcb: [Statement; 5],
    insert: Statement,
    bulk_insert: Statement,
}

impl TokioPgSession {
    pub async fn open(url: &str) -> Result<Self> {
        let client = connect(url).await?;
        let point_select = client.prepare(sql::POINT_SELECT).await?;
        let range_read = client.prepare(sql::RANGE_READ).await?;
        let tpcb = [
            client.prepare(sql::TPCB_ACCOUNT).await?,
            client.prepare(sql::TPCB_SELECT).await?,
            client.prepare(sql::TPCB_TELLER).await?,
            client.prepare(sql::TPCB_BRANCH).await?,
            client.prepare(sql::TPCB_HISTORY).await?,
        ];
        let insert = client.prepare(sql::ATOMIC_INSERT).await?;
        let bulk_insert = client.prepare(sql::BULK_INSERT).await?;
        Ok(Self {
            client,
            point_select,
            range_read,
            tpcb,
            insert,
            bulk_insert,
        })
    }
}

impl Session for TokioPgSession {
    async fn call(&mut self, call: Call) -> Result<()> {
        match call {
            Call::PointSelect { aid } => {
                let row = self.client.query_one(&self.point_select, &[&aid]).await?;
                let _: i32 = row.try_get(0)?;
            }
            Call::RangeRead { from } => {
                let rows = self.client.query(&self.range_read, &[&from]).await?;
                anyhow::ensure!(
                    rows.len() == RANGE_ROWS as usize,
                    "a range of {}",
                    rows.len()
                );
            }
            Call::Tpcb(t) => {
                let [account, select, teller, branch, history] = &self.tpcb;
                let tx = self.client.transaction().await?;
                tx.execute(account, &[&t.delta, &t.aid]).await?;
                let _: i32 = tx.query_one(select, &[&t.aid]).await?.try_get(0)?;
                tx.execute(teller, &[&t.delta, &t.tid]).await?;
                tx.execute(branch, &[&t.delta, &t.bid]).await?;
                tx.execute(history, &[&t.tid, &t.bid, &t.aid, &t.delta])
                    .await?;
                tx.commit().await?;
            }
            Call::Atomic => {
                // Hand-pipelined: all inserts are in flight at once.
                let tx = self.client.transaction().await?;
                let insert = &self.insert;
                let tx_ref = &tx;
                try_join_all(
                    (0..ATOMIC_INSERTS)
                        .map(|i| async move { tx_ref.execute(insert, &[&i, &"x"]).await }),
                )
                .await?;
                tx.commit().await?;
            }
            Call::EmptyTx => self.client.transaction().await?.commit().await?,
            Call::BulkInsert => {
                // Hand-pipelined as the atomic: the released driver's way (a Sync each).
                let tx = self.client.transaction().await?;
                let (insert, tx_ref) = (&self.bulk_insert, &tx);
                try_join_all(
                    (0..BULK_ROWS)
                        .map(|i| async move { tx_ref.execute(insert, &[&i, &"x"]).await }),
                )
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// Loads `rows` into `bench_copy` with the driver's `BinaryCopyInWriter`; returns the
/// rows copied and the time the COPY took (connecting not counted).
pub async fn copy_in(url: &str, rows: &[(i32, String)]) -> Result<(u64, std::time::Duration)> {
    use futures::pin_mut;
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let client = connect(url).await?;
    let started = std::time::Instant::now();
    let sink = client
        .copy_in("COPY bench_copy (a, b) FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
    pin_mut!(writer);
    for (a, b) in rows {
        writer.as_mut().write(&[a, b]).await?;
    }
    let copied = writer.finish().await?;
    Ok((copied, started.elapsed()))
}
