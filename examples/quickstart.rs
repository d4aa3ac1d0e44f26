//! A tour of pgengine: queries, a closure transaction, a savepoint, an atomic bundle and
//! a batched read.
//!
//! ```text
//! cargo run --example quickstart                                    # starts a throwaway server
//! DATABASE_URL=postgres://user@host/db cargo run --example quickstart  # uses yours
//! ```
//!
//! Without `DATABASE_URL` it starts an ephemeral PostgreSQL cluster from the installed
//! server binaries (see `pgengine-testing`) and removes it at the end. With one, it works
//! in a schema of its own, dropped at the end.

use std::process::ExitCode;

use pgengine::prelude::*;
use pgengine_testing::EphemeralCluster;

fn main() -> ExitCode {
    // The cluster lives in `main`, so that it is stopped when `main` returns, whatever
    // happened in the async part.
    let (_cluster, url) = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            println!("Using the server of DATABASE_URL.");
            (None, url)
        }
        Err(_) => {
            println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster…");
            match EphemeralCluster::start() {
                Ok(cluster) => {
                    println!("  started on port {}", cluster.port());
                    let url = cluster.url();
                    (Some(cluster), url)
                }
                Err(e) => {
                    eprintln!("could not start a cluster ({e}); set DATABASE_URL instead");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(tour(&url));
    drop(runtime); // closes the engine's connections before the cluster stops
    match result {
        Ok(()) => {
            println!("Done.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, runs the tour in a schema of its own, and drops the schema again.
async fn tour(url: &str) -> pgengine::Result<()> {
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(4)
        .application_name("pgengine-quickstart")
        .build()
        .await?;
    println!(
        "Connected to PostgreSQL {} (a pool of up to {} connections).",
        engine.get_version().await?,
        engine.pool_status().max_size
    );
    let schema = format!("pgengine_quickstart_{}", std::process::id());
    engine.run_ddl(&format!("CREATE SCHEMA {schema}")).await?;
    let result = steps(&engine, &format!("{schema}.band")).await;
    engine
        .run_ddl(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    println!("Dropped schema {schema}.");
    engine.close_connection_pool().await;
    result
}

async fn steps(engine: &PostgresEngine, band: &str) -> pgengine::Result<()> {
    // 1. Plain queries. Values go as parameters ({} becomes $1, $2, …), never into the SQL.
    engine
        .run_ddl(&format!(
            "CREATE TABLE {band} (name text PRIMARY KEY, popularity int NOT NULL)"
        ))
        .await?;
    println!("\n1. Created table {band}.");
    let inserted = engine
        .execute(sql!(
            format!("INSERT INTO {band} VALUES ({{}}, {{}}), ({{}}, {{}})"),
            "Pythonistas",
            1000,
            "Rustaceans",
            2000
        ))
        .await?;
    println!("   Inserted {inserted} rows.");
    let rows = engine
        .fetch(sql!(
            format!("SELECT name, popularity FROM {band} WHERE popularity > {{}} ORDER BY name"),
            500
        ))
        .await?;
    for row in &rows {
        let (name, popularity): (&str, i32) = (row.get(0), row.get(1));
        println!("   read: {name} ({popularity})");
    }

    // 2. A closure transaction: committed when the closure returns Ok, rolled back on Err.
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(sql!(
                format!("UPDATE {band} SET popularity = popularity + {{}} WHERE name = {{}}"),
                500,
                "Pythonistas"
            ))
            .await?;
            tx.execute(sql!(
                format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
                "Gophers",
                800
            ))
            .await?;
            Ok::<_, pgengine::Error>(())
        })
        .await?;
    println!("\n2. Transaction committed: Pythonistas +500, Gophers added.");
    let failed: pgengine::Result<()> = engine
        .transaction()
        .run(async |tx| {
            tx.execute(format!("DELETE FROM {band}")).await?;
            Err(pgengine::Error::invalid_input("changed my mind"))
        })
        .await;
    let count: i64 = engine
        .fetch_one(format!("SELECT count(*) FROM {band}"))
        .await?
        .get(0);
    println!(
        "   A transaction that returned Err ({}) was rolled back: still {count} bands.",
        failed.unwrap_err()
    );

    // 3. A savepoint: undo part of a transaction and keep the rest.
    let tx = engine.begin().await?;
    tx.execute(sql!(
        format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
        "Crabs",
        300
    ))
    .await?;
    let savepoint = tx.savepoint(Some("before_duplicate")).await?;
    let duplicate = tx
        .execute(sql!(
            format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
            "Crabs",
            1
        ))
        .await
        .unwrap_err();
    savepoint.rollback_to().await?;
    tx.commit().await?;
    println!(
        "\n3. Savepoint `{}`: the duplicate insert failed ({}), was rolled back to the \
         savepoint, and Crabs was committed.",
        savepoint.name(),
        duplicate.code().unwrap_or("?")
    );

    // 4. An atomic: many statements, one transaction, sent together (a few round trips).
    let mut atomic = engine.atomic();
    atomic.add(format!("CREATE INDEX ON {band} (popularity)"));
    atomic.add_all((1..=100).map(|i| {
        sql!(
            format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
            format!("Band #{i}"),
            i
        )
    }));
    let statements = atomic.len();
    atomic.run().await?;
    println!("\n4. Atomic: ran {statements} statements in one transaction.");
    let mut failing = engine.atomic();
    failing.add(sql!(
        format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
        "Band #101",
        101
    ));
    failing.add(sql!(
        format!("INSERT INTO {band} VALUES ({{}}, {{}})"),
        "Band #1",
        1
    ));
    let err = failing.run().await.unwrap_err();
    let statement = err.statement().map_or(0, |s| s.index);
    println!(
        "   An atomic whose statement #{statement} failed ({}) saved nothing: Band #101 exists? {}",
        err.code().unwrap_or("?"),
        engine
            .fetch_optional(sql!(
                format!("SELECT 1 FROM {band} WHERE name = {{}}"),
                "Band #101"
            ))
            .await?
            .is_some()
    );

    // 5. A batch: a large result, a few rows at a time, through a server-side cursor.
    let mut batch = engine
        .batch(
            sql!(
                format!("SELECT name FROM {band} WHERE popularity <= {{}} ORDER BY popularity"),
                1000
            ),
            25,
        )
        .await?;
    println!("\n5. Batch: reading bands with popularity <= 1000, 25 at a time:");
    let mut total = 0;
    while let Some(rows) = batch.next().await? {
        total += rows.len();
        let first: &str = rows[0].get(0);
        let last: &str = rows[rows.len() - 1].get(0);
        println!("   a batch of {:>2} rows: {first} … {last}", rows.len());
    }
    println!("   {total} rows in all.");
    Ok(())
}
