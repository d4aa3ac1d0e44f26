//! Shared helpers for the integration tests: a fresh database and an engine on it.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use pgengine::{EngineBuilder, Executor, PostgresEngine};
use pgengine_testing::TestDatabase;

/// A fresh database, and an engine on it with `max_connections` connections.
pub async fn engine_with(max_connections: usize) -> (TestDatabase, PostgresEngine) {
    let db = TestDatabase::new().await.expect("test database");
    let engine = builder(&db)
        .max_connections(max_connections)
        .build()
        .await
        .expect("engine");
    (db, engine)
}

/// A fresh database and an engine with a pool of 8.
pub async fn engine() -> (TestDatabase, PostgresEngine) {
    engine_with(8).await
}

/// A builder for the database, with a unique application_name.
pub fn builder(db: &TestDatabase) -> EngineBuilder {
    PostgresEngine::builder()
        .url(db.url())
        .application_name(&application_name(db))
        .pool_wait_timeout(Duration::from_secs(20))
}

/// The application_name the test engines of `db` use (to find them in pg_stat_activity).
pub fn application_name(db: &TestDatabase) -> String {
    format!("pgengine-test-{}", db.name())
}

/// The states of the server sessions of our engines on `db` (an observer connection
/// of its own, outside the engine's pool), e.g. `["idle", "idle in transaction"]`.
pub async fn session_states(db: &TestDatabase) -> Vec<String> {
    let observer = db.connect().await.expect("observer connection");
    observer
        .query(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&application_name(db)],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits (at most 5 s) until no session of ours is inside a transaction, and returns
/// the states seen last.
pub async fn settled_session_states(db: &TestDatabase) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let states = session_states(db).await;
        let dirty = states
            .iter()
            .any(|s| s.contains("transaction") || s == "active");
        if !dirty || tokio::time::Instant::now() > deadline {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that none of our sessions is inside a transaction or busy.
pub async fn assert_sessions_clean(db: &TestDatabase) {
    let states = settled_session_states(db).await;
    assert!(
        states.iter().all(|s| s == "idle"),
        "sessions not clean: {states:?}"
    );
}

/// The number of rows of `table` (trusted, literal table name), counted through
/// `executor` (so inside its transaction, for a transaction).
pub async fn count(executor: &impl Executor, table: &str) -> i64 {
    executor
        .fetch_one(format!("SELECT count(*) FROM {table}"))
        .await
        .expect("count")
        .get(0)
}
