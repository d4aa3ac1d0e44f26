//! Transactions under concurrency and misuse, against a real PostgreSQL: finishing
//! waits for the transaction's own queries, statements keep their order, nested
//! savepoint scopes never undo each other's work, swallowed errors and failed manual
//! commits are never reported as success. One test per bug of issue 16, plus the
//! concurrent cases that already held.

use crate::common::{self, band_names, create_band, insert_band};

use std::time::Duration;

use pgengine::prelude::*;
use pgengine::{Error, ErrorKind};

#[tokio::test]
async fn commit_waits_for_a_failing_query_in_flight_and_is_refused() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    // The statement is cached, so its Bind/Execute go out at once.
    engine.execute(insert_band("warm")).await.unwrap();

    let tx = engine.begin().await.unwrap();
    tx.execute(insert_band("one")).await.unwrap();
    let (duplicate, commit) = tokio::join!(tx.execute(insert_band("one")), tx.commit());
    assert!(duplicate.unwrap_err().is_unique_violation());
    let commit = commit.unwrap_err();
    assert_eq!(commit.kind(), ErrorKind::Transaction, "{commit}");
    assert_eq!(
        band_names(&engine).await,
        ["warm"],
        "nothing of the aborted transaction"
    );
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn rollback_waits_for_a_query_in_flight_which_is_then_rolled_back() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    engine.execute(insert_band("warm")).await.unwrap();

    let tx = engine.begin().await.unwrap();
    let (insert, rollback) = tokio::join!(tx.execute(insert_band("six")), tx.rollback());
    assert_eq!(insert.unwrap(), 1);
    rollback.unwrap();
    assert_eq!(
        band_names(&engine).await,
        ["warm"],
        "row six is rolled back"
    );
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_statement_not_yet_prepared_is_not_overtaken_by_the_commit() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    // Never run before: its Parse round trip comes first, and the COMMIT polled after
    // it must still reach the server after its Execute.
    let fresh = sql!(
        "INSERT INTO band (name) SELECT {} WHERE true",
        "prepared late".to_owned()
    );
    let (insert, commit) = tokio::join!(tx.execute(fresh), tx.commit());
    assert_eq!(insert.unwrap(), 1);
    commit.unwrap();
    assert_eq!(band_names(&engine).await, ["prepared late"]);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn no_query_is_admitted_once_commit_began() {
    let (_db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    let (commit, late) = tokio::join!(tx.commit(), tx.execute(insert_band("late")));
    commit.unwrap();
    let late = late.unwrap_err();
    assert_eq!(late.kind(), ErrorKind::Transaction, "{late}");
    assert_eq!(band_names(&engine).await, Vec::<String>::new());
}

#[tokio::test]
async fn closure_form_with_a_joined_failing_commit_returns_the_error() {
    let (_db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    engine.execute(insert_band("warm")).await.unwrap();
    let result = engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("one")).await?;
            let (duplicate, commit) = tokio::join!(tx.execute(insert_band("one")), tx.commit());
            let _ = duplicate; // swallowed
            let _ = commit; // swallowed too
            Ok::<_, Error>(())
        })
        .await;
    assert!(result.is_err(), "a failed commit is never reported as Ok");
    assert_eq!(band_names(&engine).await, ["warm"]);
}

#[tokio::test]
async fn concurrent_nested_savepoint_transactions_keep_each_others_work() {
    let (db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            let failing = engine
                .transaction()
                .nested(Nested::Savepoint)
                .run(async |inner| {
                    inner.execute(insert_band("a")).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err::<(), _>(Error::invalid_input("A fails"))
                });
            let succeeding = engine
                .transaction()
                .nested(Nested::Savepoint)
                .run(async |inner| {
                    inner.execute(insert_band("b")).await?;
                    Ok::<_, Error>(())
                });
            let (a, b) = tokio::join!(failing, succeeding);
            assert!(a.is_err());
            b.unwrap();
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["b", "outer"]);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_guard_form_sibling_is_refused_while_another_nested_transaction_is_open() {
    let (_db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |_tx| {
            let first = engine
                .transaction()
                .nested(Nested::Savepoint)
                .begin()
                .await?;
            let second = engine.transaction().nested(Nested::Savepoint).begin().await;
            assert_eq!(second.unwrap_err().kind(), ErrorKind::Transaction);
            first.commit().await?;
            let third = engine
                .transaction()
                .nested(Nested::Savepoint)
                .begin()
                .await?;
            third.commit().await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dropped_nested_transaction_is_not_cleared_by_a_later_savepoint() {
    let (db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    let result = engine
        .transaction()
        .run(async |tx| {
            let dropped = tokio::time::timeout(
                Duration::from_millis(200),
                engine
                    .transaction()
                    .nested(Nested::Savepoint)
                    .run(async |inner| {
                        inner.execute(insert_band("half done")).await?;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        Ok::<_, Error>(())
                    }),
            )
            .await;
            assert!(
                dropped.is_err(),
                "the nested transaction was dropped mid-way"
            );
            // A savepoint made after the dropped work does not undo it.
            tx.savepoint(Some("later")).await?.rollback_to().await?;
            Ok::<_, Error>(())
        })
        .await;
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
    assert_eq!(band_names(&engine).await, Vec::<String>::new());
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn rolling_back_to_a_savepoint_before_the_dropped_work_clears_it() {
    let (_db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            let before = tx.savepoint(Some("before")).await?;
            let dropped = tokio::time::timeout(
                Duration::from_millis(200),
                engine
                    .transaction()
                    .nested(Nested::Savepoint)
                    .run(async |inner| {
                        inner.execute(insert_band("half done")).await?;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        Ok::<_, Error>(())
                    }),
            )
            .await;
            assert!(dropped.is_err());
            before.rollback_to().await?;
            tx.execute(insert_band("after")).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["after"]);
}

#[tokio::test]
async fn a_nested_transaction_that_swallowed_an_error_is_rolled_back_and_says_so() {
    let (db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("1")).await?;
            let nested = engine
                .transaction()
                .nested(Nested::Savepoint)
                .run(async |inner| {
                    inner.execute(insert_band("2")).await?;
                    let duplicate = inner.execute(insert_band("1")).await;
                    assert!(duplicate.unwrap_err().is_unique_violation());
                    Ok::<_, Error>(()) // the error is swallowed
                })
                .await;
            assert_eq!(nested.unwrap_err().kind(), ErrorKind::Transaction);
            tx.execute(insert_band("3")).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["1", "3"]);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_serialization_failure_met_by_an_explicit_commit_is_retried() {
    let (_db, engine) = common::engine_with(4).await;
    engine
        .run_ddl(
            "CREATE TABLE doctor (name text PRIMARY KEY, on_call bool);
             INSERT INTO doctor VALUES ('alice', true), ('bob', true)",
        )
        .await
        .unwrap();
    let attempts = std::sync::atomic::AtomicU32::new(0);
    // Write skew: each transaction reads both rows, then takes one doctor off call.
    let go_off_call = |name: &'static str, barrier: std::sync::Arc<tokio::sync::Barrier>| {
        let engine = engine.clone();
        let attempts = &attempts;
        async move {
            engine
                .transaction()
                .isolation(IsolationLevel::Serializable)
                .retry(RetryPolicy::new(10))
                .run(async |tx| {
                    let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let on_call: i64 = tx
                        .fetch_one("SELECT count(*) FROM doctor WHERE on_call")
                        .await?
                        .get(0);
                    if attempt < 2 {
                        barrier.wait().await; // both have read before either writes
                    }
                    if on_call >= 2 {
                        tx.execute(sql!(
                            "UPDATE doctor SET on_call = false WHERE name = {}",
                            name
                        ))
                        .await?;
                    }
                    tx.commit().await?;
                    Ok::<_, Error>(())
                })
                .await
        }
    };
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let (a, b) = tokio::join!(
        go_off_call("alice", barrier.clone()),
        go_off_call("bob", barrier)
    );
    a.unwrap();
    b.unwrap();
    assert!(
        attempts.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "one was retried"
    );
    let on_call: i64 = engine
        .fetch_one("SELECT count(*) FROM doctor WHERE on_call")
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_call, 1, "the invariant holds: one doctor stays on call");
}

#[tokio::test]
async fn a_body_that_swallows_a_failed_manual_commit_does_not_return_ok() {
    let (_db, engine) = common::engine_with(2).await;
    create_band(&engine).await;
    engine
        .run_ddl("CREATE TABLE deferred_check (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    let result = engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO deferred_check VALUES (1), (1)")
                .await?;
            let commit = tx.commit().await;
            assert!(commit.unwrap_err().is_unique_violation());
            Ok::<_, Error>(())
        })
        .await;
    assert!(result.is_err(), "run must report the failed commit");
}

#[tokio::test]
async fn start_connection_pool_does_not_wait_for_connections_in_use() {
    let (db, _engine) = common::engine_with(1).await;
    let engine = common::builder(&db)
        .max_connections(3)
        .pool_wait_timeout(Duration::from_secs(120))
        .build()
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    let started = tokio::time::timeout(Duration::from_secs(60), engine.start_connection_pool())
        .await
        .expect("start_connection_pool waited for the connection in use");
    started.unwrap();
    assert_eq!(engine.pool_status().size, 3);
    tx.rollback().await.unwrap();
    engine.start_connection_pool().await.unwrap(); // again: harmless
}

#[tokio::test]
async fn commit_and_rollback_joined_say_what_happened() {
    let (_db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    tx.execute(insert_band("kept")).await.unwrap();
    let (commit, rollback) = tokio::join!(tx.commit(), tx.rollback());
    commit.unwrap();
    let rollback = rollback.unwrap_err().to_string();
    assert!(rollback.contains("commit"), "{rollback}");
    assert_eq!(band_names(&engine).await, ["kept"]);
}

#[tokio::test]
async fn joined_queries_savepoints_and_cursor_reads_interleave_correctly() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    let inserts = (0..20).map(|i| tx.execute(insert_band(&format!("band {i:02}"))));
    let (results, savepoint) = tokio::join!(
        futures::future::join_all(inserts),
        tx.savepoint(Some("mid"))
    );
    assert!(results.iter().all(Result::is_ok));
    let savepoint = savepoint.unwrap();
    let mut batch = tx
        .batch("SELECT name FROM band ORDER BY name", 7)
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(rows) = batch.next().await.unwrap() {
        let (count, _) = tokio::join!(
            tx.fetch_one("SELECT count(*) FROM band"),
            tx.execute(insert_band(&format!("extra {seen}")))
        );
        assert!(count.unwrap().get::<_, i64>(0) >= 20);
        seen += rows.len();
    }
    assert_eq!(seen, 20, "the cursor sees the rows as of its declaration");
    savepoint.rollback_to().await.unwrap();
    tx.commit().await.unwrap();
    // The 20 inserts were polled before the SAVEPOINT, so they reached the server first.
    assert_eq!(band_names(&engine).await.len(), 20);
    common::assert_sessions_clean(&db).await;
}
