//! Prepared statements after the schema changes: every pooled connection's cached
//! statements are renewed after DDL run through the engine (alone, in a transaction, in
//! an atomic), so a statement prepared before never fails after, even inside a
//! transaction where a stale plan would abort it; after DDL run elsewhere,
//! `clear_statement_cache` does the same.

use pgengine::PostgresEngine;
use pgengine::prelude::*;

/// Both connections of a pool of two prepare `sql` (two transactions at once).
async fn prepare_on_both(engine: &PostgresEngine, sql: &'static str) {
    let (a, b) = tokio::join!(engine.begin(), engine.begin());
    let (a, b) = (a.unwrap(), b.unwrap());
    a.fetch(sql).await.unwrap();
    b.fetch(sql).await.unwrap();
    a.commit().await.unwrap();
    b.commit().await.unwrap();
}

/// `sql` inside a transaction on both connections: its column count on each.
async fn columns_on_both(engine: &PostgresEngine, sql: &'static str) -> Vec<usize> {
    let (a, b) = tokio::join!(engine.begin(), engine.begin());
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut columns = Vec::new();
    for tx in [&a, &b] {
        let rows = tx
            .fetch(sql)
            .await
            .expect("a statement prepared before the change");
        columns.push(rows[0].columns().len());
    }
    a.commit().await.unwrap();
    b.commit().await.unwrap();
    columns
}

async fn engine_with_band() -> (pgengine_testing::TestDatabase, PostgresEngine) {
    let (db, engine) = crate::common::engine_with(2).await;
    engine
        .run_ddl("CREATE TABLE band (name text); INSERT INTO band VALUES ('a')")
        .await
        .unwrap();
    prepare_on_both(&engine, "SELECT * FROM band").await;
    (db, engine)
}

#[tokio::test]
async fn a_column_added_through_the_engine_is_seen_on_every_connection() {
    let (_db, engine) = engine_with_band().await;
    engine
        .run_ddl("ALTER TABLE band ADD COLUMN popularity int DEFAULT 7")
        .await
        .unwrap();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [2, 2]);
}

#[tokio::test]
async fn a_table_dropped_and_made_again_is_read_on_every_connection() {
    let (_db, engine) = engine_with_band().await;
    engine.execute("DROP TABLE band").await.unwrap();
    engine
        .run_ddl("CREATE TABLE band (id int, name text, since date); INSERT INTO band VALUES (1, 'b', now())")
        .await
        .unwrap();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [3, 3]);
}

#[tokio::test]
async fn ddl_in_a_committed_transaction_or_an_atomic_renews_the_caches() {
    let (_db, engine) = engine_with_band().await;
    engine
        .transaction()
        .run(async |tx| tx.execute("ALTER TABLE band ADD COLUMN a int").await)
        .await
        .unwrap();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [2, 2]);
    let mut atomic = engine.atomic();
    atomic
        .add("ALTER TABLE band ADD COLUMN b int")
        .add("INSERT INTO band (name, b) VALUES ('c', 1)");
    atomic.run().await.unwrap();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [3, 3]);
}

#[tokio::test]
async fn ddl_rolled_back_leaves_every_connection_working() {
    let (_db, engine) = engine_with_band().await;
    let tx = engine.begin().await.unwrap();
    tx.execute("ALTER TABLE band ADD COLUMN gone int")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [1, 1]);
}

/// DDL run by another client is not seen by the engine: inside a transaction a stale
/// statement then fails (and aborts it); after `clear_statement_cache` it does not.
#[tokio::test]
async fn ddl_run_elsewhere_needs_clear_statement_cache() {
    let (db, engine) = engine_with_band().await;
    let elsewhere = db.connect().await.unwrap();
    elsewhere
        .batch_execute("ALTER TABLE band ADD COLUMN elsewhere int")
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    let stale = tx.fetch("SELECT * FROM band").await.unwrap_err();
    assert_eq!(stale.code(), Some("0A000"), "{stale}");
    tx.rollback().await.unwrap();

    elsewhere
        .batch_execute("ALTER TABLE band ADD COLUMN again int")
        .await
        .unwrap();
    engine.clear_statement_cache();
    assert_eq!(columns_on_both(&engine, "SELECT * FROM band").await, [3, 3]);
}

/// Statements deallocated unseen on one connection are prepared afresh there alone: the
/// other connections keep theirs (the same server-side statements, not re-prepared).
#[tokio::test]
async fn statements_deallocated_unseen_are_renewed_on_their_connection_alone() {
    let (_db, engine) = crate::common::engine_with(2).await;
    let prepared = "SELECT name FROM pg_prepared_statements ORDER BY name";
    let names = async |tx: &pgengine::PostgresTransaction| -> Vec<String> {
        let two: i32 = tx.fetch_one("SELECT 1 + 1").await.unwrap().get(0);
        assert_eq!(two, 2);
        let rows = tx.fetch(prepared).await.unwrap();
        rows.iter().map(|row| row.get(0)).collect()
    };
    // One connection held by a transaction, the other used by the engine meanwhile.
    let held = engine.begin().await.unwrap();
    let before = names(&held).await;
    assert!(before.len() >= 2, "{before:?}");
    let two = async || -> i32 { engine.fetch_one("SELECT 1 + 1").await.unwrap().get(0) };
    assert_eq!(two().await, 2);
    engine
        .execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .unwrap();
    assert_eq!(two().await, 2, "prepared afresh on the other connection");
    assert_eq!(
        names(&held).await,
        before,
        "the held connection's statements stand"
    );
    held.commit().await.unwrap();
}

/// A bundle sent as one pipeline whose cached statement went stale (DDL run
/// elsewhere) fails once, naming it, and drops it from the cache: the next bundle
/// prepares it afresh and succeeds.
#[tokio::test]
async fn a_stale_statement_in_a_bundle_fails_once_then_is_prepared_afresh() {
    let (db, engine) = crate::common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE band (name text); INSERT INTO band VALUES ('a')")
        .await
        .unwrap();
    let bundle = || {
        vec![
            sql!("INSERT INTO band VALUES ({})", "b"),
            sql!("SELECT * FROM band WHERE name <> {}", "z"),
        ]
    };
    assert_eq!(engine.fetch(bundle()).await.unwrap().len(), 2);
    let elsewhere = db.connect().await.unwrap();
    elsewhere
        .batch_execute("ALTER TABLE band ADD COLUMN elsewhere int")
        .await
        .unwrap();
    let stale = engine.fetch(bundle()).await.unwrap_err();
    assert_eq!(stale.code(), Some("0A000"), "{stale}");
    assert_eq!(stale.statement().map(|failed| failed.index), Some(1));
    let rows = engine.fetch(bundle()).await.unwrap();
    assert_eq!((rows.len(), rows[0].columns().len()), (3, 2));
}

/// The connection's statements deallocated where the engine could not see it
/// (`DEALLOCATE ALL` run by a function): outside a transaction the query is prepared
/// afresh and runs; inside one the error stands (the server aborted the transaction,
/// whose commit is refused) and the next transaction prepares afresh.
#[tokio::test]
async fn statements_deallocated_unseen_are_prepared_afresh() {
    let (_db, engine) = crate::common::engine_with(1).await;
    let deallocate = "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$";
    let two =
        async || -> pgengine::Result<i32> { Ok(engine.fetch_one("SELECT 1 + 1").await?.get(0)) };
    assert_eq!(two().await.unwrap(), 2);
    engine.execute(deallocate).await.unwrap();
    assert_eq!(two().await.unwrap(), 2, "prepared afresh and run again");

    engine.execute(deallocate).await.unwrap();
    let tx = engine.begin().await.unwrap();
    let gone = tx.fetch_one("SELECT 1 + 1").await.unwrap_err();
    assert_eq!(gone.code(), Some("26000"), "{gone}");
    assert_eq!(
        tx.commit().await.unwrap_err().kind(),
        pgengine::ErrorKind::Transaction
    );
    let tx = engine.begin().await.unwrap();
    let again: i32 = tx.fetch_one("SELECT 1 + 1").await.unwrap().get(0);
    assert_eq!(again, 2);
    tx.commit().await.unwrap();
}

/// A bundle sent as one pipeline whose cached statements were deallocated unseen fails
/// once, naming the first, and applies nothing; the connection's cache is emptied, so the
/// next bundle prepares afresh and succeeds.
#[tokio::test]
async fn a_bundle_whose_statements_were_deallocated_unseen_fails_once() {
    let (_db, engine) = crate::common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE band (name text)")
        .await
        .unwrap();
    let bundle = |name: &'static str| {
        vec![
            sql!("INSERT INTO band VALUES ({})", name),
            sql!("SELECT * FROM band WHERE name <> {}", "z"),
        ]
    };
    assert_eq!(engine.fetch(bundle("a")).await.unwrap().len(), 1);
    engine
        .execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .unwrap();
    let gone = engine.fetch(bundle("b")).await.unwrap_err();
    assert_eq!(gone.code(), Some("26000"), "{gone}");
    assert_eq!(gone.statement().map(|failed| failed.index), Some(0));
    assert_eq!(crate::common::band_names(&engine).await, ["a"]);
    assert_eq!(engine.fetch(bundle("c")).await.unwrap().len(), 2);
}
