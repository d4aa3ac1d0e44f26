//! The guarded way down to the driver: `with_client` on the engine and in a
//! transaction, with the engine's hygiene kept around what it cannot see.

use std::time::{Duration, Instant};

use crate::common;

use pgengine::prelude::*;
use pgengine::{Error, ErrorKind};

#[tokio::test]
async fn the_engine_lends_a_client_of_the_pool() {
    let (_db, engine) = common::engine_with(1).await;
    common::create_band(&engine).await;
    let pid = common::backend_pid(&engine).await;
    let (inserted, client_pid) = engine
        .with_client(|client| {
            Box::pin(async move {
                let inserted = client
                    .execute("INSERT INTO band (name) VALUES ($1), ($2)", &[&"a", &"b"])
                    .await?;
                let pid: i32 = client
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await?
                    .get(0);
                Ok::<_, Error>((inserted, pid))
            })
        })
        .await
        .unwrap();
    assert_eq!((inserted, client_pid), (2, pid));
    assert_eq!(common::band_names(&engine).await, ["a", "b"]);
}

/// A transaction left open (or aborted) through the client is rolled back before the
/// connection is reused: nothing of it is committed, and the next user is outside it.
#[tokio::test]
async fn a_transaction_left_open_through_the_client_is_rolled_back() {
    let (db, engine) = common::engine_with(1).await;
    common::create_band(&engine).await;
    for leftover in [
        "BEGIN; INSERT INTO band VALUES ('open')",
        "BEGIN; INSERT INTO band VALUES ('aborted'); SELECT 1/0",
    ] {
        let _ = engine
            .with_client(|client| {
                Box::pin(async move { Ok::<_, Error>(client.batch_execute(leftover).await) })
            })
            .await
            .unwrap();
        assert!(!engine.transaction_exists());
        // The same (only) connection: outside any transaction, and nothing was kept.
        // In a fresh transaction, no transaction id is assigned yet.
        let fresh: bool = engine
            .fetch_one("SELECT pg_current_xact_id_if_assigned() IS NULL")
            .await
            .unwrap()
            .get(0);
        assert!(
            fresh,
            "{leftover}: the next user is inside the leftover transaction"
        );
        assert_eq!(common::count(&engine, "band").await, 0, "{leftover}");
    }
    common::assert_sessions_clean(&db).await;
}

/// Dropped while its statement runs, the lent code's request is cancelled before the
/// connection is reused.
#[tokio::test]
async fn the_client_dropped_half_way_is_cancelled() {
    let (db, engine) = common::engine_with(1).await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        engine.with_client(|client| {
            Box::pin(
                async move { Ok::<_, Error>(client.batch_execute("SELECT pg_sleep(30)").await) },
            )
        }),
    )
    .await;
    assert!(abandoned.is_err(), "the sleep finished");
    let started = Instant::now();
    let one: i32 = engine.fetch_one("SELECT 1").await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    common::assert_sessions_clean(&db).await;
}

/// Inside the ambient transaction the engine refuses (the client would run outside
/// it); the transaction's own `with_client` runs in it.
#[tokio::test]
async fn in_a_transaction_the_client_is_the_transactions() {
    let (_db, engine) = common::engine().await;
    common::create_band(&engine).await;
    let result = engine
        .transaction()
        .run(async |tx| {
            let refused = engine
                .with_client(|_client| Box::pin(async move { Ok::<_, Error>(()) }))
                .await
                .unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::Transaction, "{refused}");
            tx.with_client(|client| {
                Box::pin(async move {
                    client
                        .execute("INSERT INTO band VALUES ('inside')", &[])
                        .await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
            assert_eq!(common::band_names(tx).await, ["inside"]);
            Err::<(), _>(Error::invalid_input("roll it back"))
        })
        .await;
    assert!(result.is_err());
    assert_eq!(
        common::count(&engine, "band").await,
        0,
        "rolled back with the transaction"
    );
}

/// A schema change made through the client renews the statement caches: the engine's
/// next prepared statement sees the new shape, even inside a transaction (where a
/// stale statement could not be retried).
#[tokio::test]
async fn a_schema_change_through_the_client_renews_the_statement_caches() {
    let (_db, engine) = common::engine_with(1).await;
    common::create_band(&engine).await;
    engine.execute(common::insert_band("a")).await.unwrap();
    assert_eq!(
        engine.fetch_one("SELECT * FROM band").await.unwrap().len(),
        1
    );
    engine
        .with_client(|client| {
            Box::pin(async move {
                client
                    .batch_execute("ALTER TABLE band ADD COLUMN popularity int")
                    .await?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
    let columns = engine
        .transaction()
        .run(async |tx| Ok::<_, Error>(tx.fetch_one("SELECT * FROM band").await?.len()))
        .await
        .unwrap();
    assert_eq!(columns, 2);
}

/// An error the engine never saw (a statement run through the lent client, its error
/// swallowed) still aborted the transaction: the server answers its `COMMIT` with
/// `ROLLBACK`, and that is an error, not a commit that saved nothing silently.
#[tokio::test]
async fn a_commit_after_an_error_the_engine_did_not_see_is_refused() {
    let (db, engine) = common::engine().await;
    common::create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    tx.execute(common::insert_band("kept?")).await.unwrap();
    tx.with_client(|client| {
        Box::pin(async move {
            let swallowed = client.execute("SELECT 1 / 0", &[]).await;
            assert!(swallowed.is_err());
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    let refused = tx.commit().await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Transaction, "{refused}");
    assert!(
        refused.to_string().contains("nothing was saved"),
        "{refused}"
    );
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}
