//! Running documentation examples against a real database.

use std::time::Duration;

use pgengine::{Executor, PostgresEngine};

use crate::TestDatabase;

/// The tables the examples of pgengine's documentation use, with a few rows.
const EXAMPLE_TABLES: &str = "
    CREATE TABLE band (
        id serial PRIMARY KEY,
        name text UNIQUE NOT NULL,
        popularity int NOT NULL DEFAULT 0
    );
    INSERT INTO band (name, popularity) VALUES ('Pythonistas', 1000), ('Rustaceans', 2000);
    CREATE TABLE concert (id serial PRIMARY KEY, band_id int REFERENCES band, day int);
    CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL);
    INSERT INTO account VALUES (1, 100), (2, 100);
    CREATE TABLE big_table AS SELECT n AS id, md5(n::text) AS payload
        FROM generate_series(1, 2500) AS n;
";

/// Runs a documentation example: `body` gets an engine (a pool of 4) on a fresh
/// database holding the examples' tables — `band (id, name, popularity)` with the rows
/// Pythonistas (1000) and Rustaceans (2000), `concert (id, band_id, day)`,
/// `account (id, balance)` with accounts 1 and 2 at 100, and `big_table` of 2,500 rows.
/// The example fails (panics) when `body` returns an error; the database is dropped
/// afterwards.
///
/// In a doc comment, the first and last lines are hidden:
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let count: i64 = engine.fetch_one("SELECT count(*) FROM band").await?.get(0);
/// assert_eq!(count, 2);
/// # Ok(()) });
/// ```
pub fn doctest(body: impl AsyncFnOnce(PostgresEngine) -> pgengine::Result<()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the example");
    runtime.block_on(async {
        let db = TestDatabase::new().await.expect("a test database");
        let engine = PostgresEngine::builder()
            .url(db.url())
            .max_connections(4)
            .pool_wait_timeout(Duration::from_secs(20))
            .build()
            .await
            .expect("an engine on the test database");
        engine
            .run_ddl(EXAMPLE_TABLES)
            .await
            .expect("the examples' tables");
        if let Err(error) = body(engine.clone()).await {
            panic!("the example failed: {error}");
        }
        engine.close_connection_pool().await;
    });
}
