//! Transactions against a real PostgreSQL: commit/rollback, savepoints, nesting, ambient
//! propagation, connection hygiene on every exit path (error, panic, cancellation, failed
//! BEGIN/COMMIT), options, retry of serialization failures, concurrency and the pool.

use crate::common::{self, band_names, cancel_at_pending, create_band, insert_band, table_exists};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgengine::prelude::*;
use pgengine::{Error, ErrorKind};
use pgengine_testing::TestDatabase;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Seed scenarios (Piccolo)
// ---------------------------------------------------------------------------------------

/// A failing statement rolls back the DDL before it: neither table exists.
#[tokio::test]
async fn failing_statement_rolls_back_created_tables() {
    let (db, engine) = common::engine().await;
    let result = engine
        .transaction()
        .run(async |tx| {
            tx.run_ddl("CREATE TABLE manager (name text)").await?;
            tx.run_ddl("CREATE TABLE band (name text)").await?;
            tx.run_ddl("CREATE TABLE manager (name text)").await?; // already exists
            Ok::<_, Error>(())
        })
        .await;
    let error = result.unwrap_err();
    assert_eq!(error.code(), Some("42P07"), "{error}");
    assert!(!table_exists(&engine, "manager").await);
    assert!(!table_exists(&engine, "band").await);
    common::assert_sessions_clean(&db).await;
}

/// Without the failing statement, both tables are committed.
#[tokio::test]
async fn tables_created_in_transaction_exist_after_commit() {
    let (db, engine) = common::engine().await;
    engine
        .transaction()
        .run(async |tx| {
            tx.run_ddl("CREATE TABLE manager (name text)").await?;
            tx.run_ddl("CREATE TABLE band (name text)").await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert!(table_exists(&engine, "manager").await);
    assert!(table_exists(&engine, "band").await);
    common::assert_sessions_clean(&db).await;
}

/// `commit()` inside the closure commits; leaving the closure afterwards is no error.
#[tokio::test]
async fn manual_commit_inside_closure() {
    let (db, engine) = common::engine().await;
    engine
        .transaction()
        .run(async |tx| {
            tx.run_ddl("CREATE TABLE manager (name text)").await?;
            tx.run_ddl("CREATE TABLE band (name text)").await?;
            tx.commit().await?;
            assert!(!tx.is_active());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert!(table_exists(&engine, "manager").await);
    assert!(table_exists(&engine, "band").await);
    common::assert_sessions_clean(&db).await;
}

/// `rollback()` inside the closure rolls back; leaving the closure with `Ok` is no error.
#[tokio::test]
async fn manual_rollback_inside_closure() {
    let (db, engine) = common::engine().await;
    engine
        .transaction()
        .run(async |tx| {
            tx.run_ddl("CREATE TABLE manager (name text)").await?;
            tx.run_ddl("CREATE TABLE band (name text)").await?;
            tx.rollback().await?;
            assert!(!tx.is_active());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert!(!table_exists(&engine, "manager").await);
    assert!(!table_exists(&engine, "band").await);
    common::assert_sessions_clean(&db).await;
}

/// All queries of a transaction run in one server transaction; the next one is another.
#[tokio::test]
async fn txid_is_stable_within_and_differs_between_transactions() {
    let (_db, engine) = common::engine().await;
    let txid = async |tx: &PostgresTransaction| -> Result<i64, Error> {
        Ok(tx.fetch_one("SELECT txid_current()").await?.get(0))
    };
    let (a, b) = engine
        .transaction()
        .run(async |tx| Ok::<_, Error>((txid(tx).await?, txid(tx).await?)))
        .await
        .unwrap();
    assert_eq!(a, b);
    // Ambient queries through the engine are in the same transaction too.
    let (c, d) = engine
        .transaction()
        .run(async |tx| {
            let ambient: i64 = engine.fetch_one("SELECT txid_current()").await?.get(0);
            Ok::<_, Error>((txid(tx).await?, ambient))
        })
        .await
        .unwrap();
    assert_eq!(c, d);
    assert_ne!(a, c);
}

/// `transaction_exists()` / `current_transaction()` tell whether the task is inside a
/// transaction of this engine; not in a spawned task, not for another engine.
#[tokio::test]
async fn transaction_exists_only_inside() {
    let (db, engine) = common::engine().await;
    let other = common::builder(&db).build().await.unwrap();
    assert!(!engine.transaction_exists());
    assert!(engine.current_transaction().is_none());
    engine
        .transaction()
        .run(async |_tx| {
            assert!(engine.transaction_exists());
            let current = engine.current_transaction().expect("current transaction");
            assert!(current.is_active());
            assert!(!other.transaction_exists());
            let spawned = engine.clone();
            let in_spawned = tokio::spawn(async move { spawned.transaction_exists() })
                .await
                .unwrap();
            assert!(
                !in_spawned,
                "a spawned task does not inherit the transaction"
            );
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert!(!engine.transaction_exists());
    assert!(engine.current_transaction().is_none());
}

/// Transactions of two engines open at once on one task: each engine's queries run in
/// its own transaction (each sees its own uncommitted row, not the other's), and each
/// is ambient only inside its own closure; both commit.
#[tokio::test]
async fn transactions_of_two_engines_nest_on_one_task() {
    let (db, engine) = common::engine().await;
    let other = common::builder(&db).build().await.unwrap();
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |_outer| {
            engine.execute(insert_band("outer")).await?;
            other
                .transaction()
                .run(async |_inner| {
                    other.execute(insert_band("inner")).await?;
                    assert!(engine.transaction_exists() && other.transaction_exists());
                    assert_eq!(band_names(&engine).await, ["outer"]);
                    assert_eq!(band_names(&other).await, ["inner"]);
                    Ok::<_, Error>(())
                })
                .await?;
            assert!(!other.transaction_exists());
            assert!(engine.transaction_exists());
            // The inner one committed: a READ COMMITTED statement sees its row now.
            assert_eq!(band_names(&engine).await, ["inner", "outer"]);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["inner", "outer"]);
    common::assert_sessions_clean(&db).await;
}

/// Rolling back to an unnamed savepoint undoes only what came after it.
#[tokio::test]
async fn rollback_to_unnamed_savepoint() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("A")).await?;
            let savepoint = tx.savepoint(None).await?;
            assert_eq!(savepoint.name(), "savepoint_1");
            tx.execute(insert_band("B")).await?;
            savepoint.rollback_to().await?;
            assert_eq!(tx.savepoint(None).await?.name(), "savepoint_2");
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["A"]);
    common::assert_sessions_clean(&db).await;
}

/// Rolling back to a named savepoint by name undoes only what came after it, and
/// makes a transaction aborted by a failed statement usable again.
#[tokio::test]
async fn rollback_to_named_savepoint() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("A")).await?;
            let savepoint = tx.savepoint(Some("my_savepoint")).await?;
            assert_eq!(savepoint.name(), "my_savepoint");
            tx.execute(insert_band("B")).await?;
            tx.rollback_to("my_savepoint").await?;
            // Again, after an error that aborted the transaction.
            assert!(
                tx.execute(insert_band("A"))
                    .await
                    .unwrap_err()
                    .is_unique_violation()
            );
            tx.rollback_to("my_savepoint").await?;
            tx.execute(insert_band("C")).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["A", "C"]);
    common::assert_sessions_clean(&db).await;
}

/// Unsafe savepoint names are `InvalidInput` before anything is sent: the table they
/// try to drop is still there and the transaction is still usable (not aborted).
#[tokio::test]
async fn unsafe_savepoint_names_are_refused_before_sending() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine.run_ddl("CREATE TABLE x (id int)").await.unwrap();
    let long = "a".repeat(64);
    let names = [
        "a; DROP TABLE x",
        "x\"; DROP TABLE x; --",
        "it's",
        "\"quoted\"",
        "",
        " ",
        "1abc",
        long.as_str(),
    ];
    let tx = engine.begin().await.unwrap();
    tx.execute(insert_band("before")).await.unwrap();
    for name in names {
        let error = tx.savepoint(Some(name)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{name:?}: {error}");
        let error = tx.rollback_to(name).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{name:?}: {error}");
    }
    // 63 bytes is the longest name PostgreSQL keeps whole: accepted.
    let longest = "a".repeat(63);
    tx.savepoint(Some(&longest)).await.unwrap();
    tx.execute(insert_band("after")).await.unwrap();
    tx.rollback_to(&longest).await.unwrap();
    tx.commit().await.unwrap();
    assert!(table_exists(&engine, "x").await);
    assert_eq!(band_names(&engine).await, ["before"]);
    common::assert_sessions_clean(&db).await;
}

/// `allow_nested(false)` inside a transaction is an `ErrorKind::Transaction` error, and
/// the outer transaction goes on.
#[tokio::test]
async fn nested_forbidden_is_a_transaction_error() {
    let (_db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            let nested = engine
                .transaction()
                .allow_nested(false)
                .run(async |_inner| Ok::<_, Error>(()))
                .await;
            assert_eq!(nested.unwrap_err().kind(), ErrorKind::Transaction);
            let nested = engine.transaction().nested(Nested::Forbid).begin().await;
            assert_eq!(nested.unwrap_err().kind(), ErrorKind::Transaction);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["outer"]);
}

/// A nested transaction joins by default: it sees the outer rows, and rolling back
/// through its handle rolls back the whole transaction.
#[tokio::test]
async fn nested_join_sees_outer_rows_and_rolls_back_everything() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            engine
                .transaction()
                .run(async |inner| {
                    assert_eq!(band_names(inner).await, ["outer"]);
                    inner.execute(insert_band("inner")).await?;
                    inner.rollback().await?;
                    Ok::<_, Error>(())
                })
                .await?;
            assert!(!tx.is_active());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

// ---------------------------------------------------------------------------------------
// Nested savepoints, aborted transactions, finished transactions, ambient propagation
// ---------------------------------------------------------------------------------------

/// `Nested::Savepoint`: an inner `Err` drops the inner work and keeps the outer's.
#[tokio::test]
async fn nested_savepoint_error_keeps_outer_work() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            let inner = engine
                .transaction()
                .nested(Nested::Savepoint)
                .run(async |inner| {
                    inner.execute(insert_band("inner")).await?;
                    inner.execute(insert_band("outer")).await?; // unique violation
                    Ok::<_, Error>(())
                })
                .await;
            assert!(inner.unwrap_err().is_unique_violation());
            // The outer transaction is usable again and goes on.
            tx.execute(insert_band("outer 2")).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["outer", "outer 2"]);
    common::assert_sessions_clean(&db).await;
}

/// `Nested::Savepoint`: an inner `Ok` keeps both the inner and the outer work.
#[tokio::test]
async fn nested_savepoint_ok_keeps_both() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            engine
                .transaction()
                .nested(Nested::Savepoint)
                .run(async |inner| {
                    inner.execute(insert_band("inner")).await?;
                    Ok::<_, Error>(())
                })
                .await?;
            assert!(tx.is_active());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["inner", "outer"]);
    common::assert_sessions_clean(&db).await;
}

/// COMMIT of a transaction a failed statement aborted is an error saying nothing was
/// saved (guard form), and nothing is.
#[tokio::test]
async fn commit_of_aborted_guard_transaction_is_an_error() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    tx.execute(insert_band("A")).await.unwrap();
    let _ignored = tx.execute("SELECT 1 / 0").await.unwrap_err();
    let error = tx.commit().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transaction);
    assert!(error.to_string().contains("nothing was saved"), "{error}");
    assert!(!tx.is_active());
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

/// Same in the closure form: the closure swallows the error and returns `Ok`, and
/// `run` returns an error all the same.
#[tokio::test]
async fn commit_of_aborted_closure_transaction_is_an_error() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    let result = engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("A")).await?;
            let _ignored = tx.execute(insert_band("A")).await; // unique violation
            Ok::<_, Error>("looks fine")
        })
        .await;
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transaction);
    assert!(error.to_string().contains("nothing was saved"), "{error}");
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

/// After `commit()` / `rollback()` inside the closure, queries on the handle and
/// ambient queries through the engine are `Transaction` errors, never autocommitted.
#[tokio::test]
async fn queries_after_finishing_inside_closure_fail() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    for commit in [true, false] {
        engine
            .transaction()
            .run(async |tx| {
                if commit {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                let error = tx.execute(insert_band("via handle")).await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                let error = tx.fetch("SELECT 1").await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                let error = engine.execute(insert_band("ambient")).await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                let error = engine.fetch("SELECT 1").await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                let error = tx.savepoint(None).await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                let error = tx.commit().await.unwrap_err();
                assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
    }
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

/// Inside `run`, `engine.execute` runs in the transaction: rolled back with it when the
/// closure returns `Err`; another engine on the same database is not in it.
#[tokio::test]
async fn ambient_queries_run_in_the_transaction() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    let other = common::builder(&db).build().await.unwrap();
    let result = engine
        .transaction()
        .run(async |_tx| {
            engine.execute(insert_band("ambient")).await?;
            assert_eq!(
                common::count(&engine, "band").await,
                1,
                "the engine sees its own row"
            );
            assert_eq!(
                common::count(&other, "band").await,
                0,
                "another engine does not"
            );
            Err::<(), _>(Error::invalid_input("deliberate"))
        })
        .await;
    assert_eq!(result.unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(common::count(&engine, "band").await, 0);
    assert_eq!(common::count(&other, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

// ---------------------------------------------------------------------------------------
// Connection hygiene: cancellation, drop, panic, failed COMMIT / BEGIN
// ---------------------------------------------------------------------------------------

/// `item (k int, part text)`: one `k` per attempt of a cancellation test.
async fn create_item(engine: &PostgresEngine) {
    engine
        .run_ddl("CREATE TABLE item (k int NOT NULL, part text NOT NULL)")
        .await
        .unwrap();
}

/// Rows stored for attempt `k`.
async fn items_of(engine: &PostgresEngine, k: i32) -> i64 {
    engine
        .fetch_one(sql!("SELECT count(*) FROM item WHERE k = {}", k))
        .await
        .unwrap()
        .get(0)
}

/// After a cancellation: no session of ours is left in a transaction, the cancelled
/// transaction committed all or nothing (all only if it was cancelled while its COMMIT
/// was in flight), and the next transaction (on the same single pool slot) is a fresh
/// one: it sees a row committed meanwhile by another session, and no leftovers.
async fn check_after_cancel(
    db: &TestDatabase,
    engine: &PostgresEngine,
    observer: &tokio_postgres::Client,
    k: i32,
    committing: bool,
) {
    let states = common::settled_session_states(db).await;
    assert!(
        states.iter().all(|s| s == "idle"),
        "k={k}: sessions not clean: {states:?}"
    );
    let stored = items_of(engine, k).await;
    assert!(
        stored == 0 || (stored == 2 && committing),
        "k={k}: {stored} rows of the cancelled transaction were stored (committing: {committing})"
    );
    observer
        .execute("INSERT INTO item VALUES (-1, 'marker')", &[])
        .await
        .unwrap();
    let (markers, ours) = engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .run(async |tx| {
            let markers: i64 = tx
                .fetch_one("SELECT count(*) FROM item WHERE k = -1")
                .await?
                .get(0);
            let ours: i64 = tx
                .fetch_one(sql!("SELECT count(*) FROM item WHERE k = {}", k))
                .await?
                .get(0);
            Ok::<_, Error>((markers, ours))
        })
        .await
        .unwrap();
    observer
        .execute("DELETE FROM item WHERE k = -1", &[])
        .await
        .unwrap();
    assert_eq!(
        markers, 1,
        "k={k}: the next transaction saw a stale snapshot"
    );
    assert_eq!(ours, stored, "k={k}: the next transaction saw leftovers");
}

/// Runs the transaction `body(k, stage)` for k = 0, 1, 2, …, dropping its future at its
/// k-th await point, until one run completes; after each cancelled run, checks that the
/// connection is clean and nothing half-done was stored. Returns the stages (as the body
/// records them in `stage`) at which runs were cancelled.
///
/// Statement texts carry `k` literally: each run prepares them afresh, so every run has
/// the same await points (none skipped by the statement cache).
async fn cancel_at_every_await_point<F, Fut>(
    db: &TestDatabase,
    engine: &PostgresEngine,
    body: F,
) -> std::collections::BTreeSet<usize>
where
    F: Fn(i32, Arc<AtomicUsize>) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    create_item(engine).await;
    let observer = db.connect().await.unwrap();
    let stage = Arc::new(AtomicUsize::new(0));
    let mut cancelled_at = std::collections::BTreeSet::new();
    for k in 0..60 {
        stage.store(0, Ordering::SeqCst);
        let outcome = cancel_at_pending(body(k, stage.clone()), k as usize).await;
        let reached = stage.load(Ordering::SeqCst);
        if let Some(result) = outcome {
            result.unwrap();
            assert_eq!(items_of(engine, k).await, 2);
            return cancelled_at;
        }
        cancelled_at.insert(reached);
        check_after_cancel(db, engine, &observer, k, reached == 5).await;
    }
    panic!("the transaction never completed");
}

/// A guard transaction (begin, insert, select, insert, commit) whose future is dropped
/// at each await point in turn leaves no session in a transaction, commits nothing
/// (or, cancelled during COMMIT, everything), and the next transaction works.
#[tokio::test]
async fn guard_transaction_cancelled_at_every_await_point() {
    let (db, engine) = common::engine_with(1).await;
    let engine = &engine;
    let cancelled_at = cancel_at_every_await_point(&db, engine, |k, stage| async move {
        stage.store(1, Ordering::SeqCst);
        let tx = engine
            .transaction()
            .isolation(IsolationLevel::RepeatableRead)
            .begin()
            .await?;
        stage.store(2, Ordering::SeqCst);
        tx.execute(format!("INSERT INTO item VALUES ({k}, 'a')"))
            .await?;
        stage.store(3, Ordering::SeqCst);
        let seen: i64 = tx
            .fetch_one(format!("SELECT count(*) FROM item WHERE k = {k}"))
            .await?
            .get(0);
        assert_eq!(seen, 1);
        stage.store(4, Ordering::SeqCst);
        tx.execute(format!("INSERT INTO item VALUES ({k}, 'b')"))
            .await?;
        stage.store(5, Ordering::SeqCst);
        tx.commit().await
    })
    .await;
    // Cancelled at least once in BEGIN (1), each query (2-4) and COMMIT (5).
    assert_eq!(Vec::from_iter(cancelled_at), [1, 2, 3, 4, 5]);
}

/// The same for the closure form, with ambient queries: cancelled at each await point
/// (BEGIN, the body's queries, COMMIT).
#[tokio::test]
async fn closure_transaction_cancelled_at_every_await_point() {
    let (db, engine) = common::engine_with(1).await;
    let engine = &engine;
    let cancelled_at = cancel_at_every_await_point(&db, engine, |k, stage| {
        engine
            .transaction()
            .isolation(IsolationLevel::RepeatableRead)
            .run(async move |tx| {
                stage.store(2, Ordering::SeqCst);
                tx.execute(format!("INSERT INTO item VALUES ({k}, 'a')"))
                    .await?;
                stage.store(3, Ordering::SeqCst);
                let seen: i64 = engine
                    .fetch_one(format!("SELECT count(*) FROM item WHERE k = {k}"))
                    .await?
                    .get(0);
                assert_eq!(seen, 1);
                stage.store(4, Ordering::SeqCst);
                engine
                    .execute(format!("INSERT INTO item VALUES ({k}, 'b')"))
                    .await?;
                stage.store(5, Ordering::SeqCst); // COMMIT follows
                Ok::<_, Error>(())
            })
    })
    .await;
    // Cancelled at least once in BEGIN (0), each query (2-4) and COMMIT (5).
    assert_eq!(Vec::from_iter(cancelled_at), [0, 2, 3, 4, 5]);
}

/// A guard dropped without commit or rollback is rolled back before its connection
/// serves anyone else.
#[tokio::test]
async fn dropped_guard_is_rolled_back() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let tx = engine.begin().await.unwrap();
    tx.execute(insert_band("dropped")).await.unwrap();
    drop(tx);
    // The single connection is the one the guard had.
    assert_eq!(common::count(&engine, "band").await, 0);
    engine
        .transaction()
        .run(async |tx| tx.execute(insert_band("next")).await)
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["next"]);
    common::assert_sessions_clean(&db).await;
}

/// A panic inside the closure rolls back; the sessions are clean and the pool usable.
#[tokio::test]
async fn panic_inside_closure_rolls_back() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let task_engine = engine.clone();
    let joined = tokio::spawn(async move {
        task_engine
            .transaction()
            .run(async |tx| {
                tx.execute(insert_band("panicked")).await?;
                if tx.is_active() {
                    panic!("deliberate panic inside a transaction");
                }
                Ok::<_, Error>(())
            })
            .await
    })
    .await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
    engine
        .transaction()
        .run(async |tx| tx.execute(insert_band("after")).await)
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["after"]);
}

/// A COMMIT that fails (a deferred unique constraint) returns the database error, saves
/// nothing, and the connection goes back clean (a pool of one keeps working).
#[tokio::test]
async fn failed_commit_returns_the_database_error() {
    let (db, engine) = common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE u (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    // Guard form.
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO u VALUES (1)").await.unwrap();
    tx.execute("INSERT INTO u VALUES (1)").await.unwrap(); // checked at COMMIT
    let error = tx.commit().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Database, "{error}");
    assert_eq!(error.code(), Some("23505"), "{error}");
    assert!(!tx.is_active());
    drop(tx);
    assert_eq!(common::count(&engine, "u").await, 0);
    common::assert_sessions_clean(&db).await;
    // Closure form.
    let error = engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO u VALUES (2), (2)").await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("23505"), "{error}");
    assert!(!engine.transaction_exists());
    assert_eq!(common::count(&engine, "u").await, 0);
    engine.execute("INSERT INTO u VALUES (3)").await.unwrap();
    assert_eq!(common::count(&engine, "u").await, 1);
    common::assert_sessions_clean(&db).await;
}

/// BEGIN on a pooled connection whose server session was terminated: an error or a
/// fresh connection, never a leak, and the next transaction works.
#[tokio::test]
async fn begin_on_terminated_session_does_not_leak() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let observer = db.connect().await.unwrap();
    let mut paths = Vec::new();
    for round in 0..4 {
        let pid: i32 = engine
            .fetch_one("SELECT pg_backend_pid()")
            .await
            .unwrap()
            .get(0);
        let terminated: bool = observer
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(terminated);
        // Odd rounds begin at once (the BEGIN likely meets the dying session), even
        // rounds once the server has closed it (the pool likely notices first).
        if round % 2 == 0 {
            while observer
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_some()
            {
                tokio::task::yield_now().await;
            }
        }
        match engine.begin().await {
            Ok(tx) => {
                // A fresh connection: a new session.
                let new_pid: i32 = tx
                    .fetch_one("SELECT pg_backend_pid()")
                    .await
                    .unwrap()
                    .get(0);
                assert_ne!(new_pid, pid);
                tx.commit().await.unwrap();
                paths.push("fresh connection");
            }
            Err(error) => {
                assert!(
                    matches!(error.kind(), ErrorKind::Connection | ErrorKind::Database),
                    "round {round}: {error}"
                );
                paths.push("BEGIN failed");
            }
        }
        assert!(!engine.transaction_exists());
        engine
            .transaction()
            .run(async |tx| tx.execute(insert_band(&format!("round {round}"))).await)
            .await
            .unwrap();
        assert!(engine.pool_status().size <= 1);
    }
    eprintln!("BEGIN after termination: {paths:?}");
    assert_eq!(common::count(&engine, "band").await, 4);
    common::assert_sessions_clean(&db).await;
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// Isolation level, read-only and deferrable are in effect inside the transaction.
/// `statement_timeout` holds for the transaction's statements (both forms): one past it
/// is cancelled by the server with 57014, which aborts the transaction, so its commit
/// fails and nothing is saved; the setting ends with the transaction (the same
/// connection, next, has the server's default again).
#[tokio::test]
async fn statement_timeout_cancels_a_slow_statement_and_ends_with_the_transaction() {
    let (db, engine) = common::engine_with(1).await;
    create_band(&engine).await;
    let default: String = engine
        .fetch_one("SHOW statement_timeout")
        .await
        .unwrap()
        .get(0);

    let result = engine
        .transaction()
        .statement_timeout(Duration::from_millis(400))
        .run(async |tx| {
            let shown: String = tx.fetch_one("SHOW statement_timeout").await?.get(0);
            assert_eq!(shown, "400ms");
            tx.execute(insert_band("saved?")).await?;
            tx.execute("SELECT pg_sleep(0.01)").await?; // within the limit
            tx.execute("SELECT pg_sleep(5)").await?;
            Ok::<_, Error>(())
        })
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some("57014"), "{err}");
    assert_eq!(common::count(&engine, "band").await, 0);

    let tx = engine
        .transaction()
        .statement_timeout(Duration::from_micros(200_001)) // whole milliseconds, rounded up
        .begin()
        .await
        .unwrap();
    let shown: String = tx.fetch_one("SHOW statement_timeout").await.unwrap().get(0);
    assert_eq!(shown, "201ms");
    let err = tx.execute("SELECT pg_sleep(1)").await.unwrap_err();
    assert_eq!(err.code(), Some("57014"), "{err}");
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transaction, "{err}");

    let after: String = engine
        .fetch_one("SHOW statement_timeout")
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, default);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn options_are_in_effect() {
    let (_db, engine) = common::engine().await;
    let show = async |tx: &PostgresTransaction| -> Result<[String; 3], Error> {
        let mut values = [String::new(), String::new(), String::new()];
        for (value, setting) in values.iter_mut().zip([
            "transaction_isolation",
            "transaction_read_only",
            "transaction_deferrable",
        ]) {
            *value = tx.fetch_one(format!("SHOW {setting}")).await?.get(0);
        }
        Ok(values)
    };
    let cases = [
        (
            IsolationLevel::Serializable,
            true,
            true,
            ["serializable", "on", "on"],
        ),
        (
            IsolationLevel::RepeatableRead,
            false,
            false,
            ["repeatable read", "off", "off"],
        ),
        (
            IsolationLevel::ReadCommitted,
            true,
            false,
            ["read committed", "on", "off"],
        ),
    ];
    for (level, read_only, deferrable, expected) in cases {
        let seen = engine
            .transaction()
            .isolation(level)
            .read_only(read_only)
            .deferrable(deferrable)
            .run(async |tx| show(tx).await)
            .await
            .unwrap();
        assert_eq!(seen, expected, "{level:?} read_only={read_only}");
        // Guard form too.
        let tx = engine
            .transaction()
            .isolation(level)
            .read_only(read_only)
            .deferrable(deferrable)
            .begin()
            .await
            .unwrap();
        assert_eq!(show(&tx).await.unwrap(), expected);
        tx.commit().await.unwrap();
    }
    // The options do not outlive the transaction.
    let after = engine
        .fetch_one("SHOW transaction_isolation")
        .await
        .unwrap();
    assert_eq!(after.get::<_, String>(0), "read committed");
}

/// A write in a read-only transaction fails with SQLSTATE 25006.
#[tokio::test]
async fn write_in_read_only_transaction_fails() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    let error = engine
        .transaction()
        .read_only(true)
        .run(async |tx| tx.execute(insert_band("nope")).await)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("25006"), "{error}");
    assert_eq!(common::count(&engine, "band").await, 0);
    common::assert_sessions_clean(&db).await;
}

// ---------------------------------------------------------------------------------------
// Retry
// ---------------------------------------------------------------------------------------

const ACCOUNTS: i32 = 10;
const INITIAL_BALANCE: i32 = 1000;
const TASKS: usize = 32;
const TRANSFERS_PER_TASK: usize = 200;

/// Concurrent random transfers under SERIALIZABLE with retry: money is neither made
/// nor lost, no balance goes negative, and every transfer is applied (one ledger row),
/// refused (not enough money) or reported as failed — the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_transfers_under_serializable_with_retry() {
    let db = TestDatabase::new().await.unwrap();
    // Opposite transfers deadlock; PostgreSQL detects that after `deadlock_timeout`
    // (1 s by default): make it short, so the deadlocks are retried quickly.
    db.connect()
        .await
        .unwrap()
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET deadlock_timeout = '20ms'",
            db.name()
        ))
        .await
        .unwrap();
    let engine = common::builder(&db)
        .max_connections(10)
        .build()
        .await
        .unwrap();
    engine
        .run_ddl(
            "CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0));
             CREATE TABLE ledger (id serial PRIMARY KEY, source int NOT NULL, target int NOT NULL, amount int NOT NULL)",
        )
        .await
        .unwrap();
    engine
        .execute(sql!(
            "INSERT INTO account SELECT g, {} FROM generate_series(1, {}) g",
            INITIAL_BALANCE,
            ACCOUNTS
        ))
        .await
        .unwrap();

    let started = Instant::now();
    let tasks = (0..TASKS).map(|task| {
        let engine = engine.clone();
        tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(task as u64);
            let (mut applied, mut refused, mut failed) = (0usize, 0usize, 0usize);
            for _ in 0..TRANSFERS_PER_TASK {
                let source = rng.random_range(1..=ACCOUNTS);
                let target = (source + rng.random_range(0..ACCOUNTS - 1)) % ACCOUNTS + 1;
                let amount: i32 = rng.random_range(1..=300);
                let result = engine
                    .transaction()
                    .isolation(IsolationLevel::Serializable)
                    .retry(
                        RetryPolicy::new(10)
                            .initial_backoff(Duration::from_millis(2))
                            .max_backoff(Duration::from_millis(50)),
                    )
                    // `async move`: a closure borrowing from its surroundings makes the
                    // spawned future not provably `Send` (rust-lang/rust#139475).
                    .run(async move |tx| {
                        let balance: i32 = tx
                            .fetch_one(sql!("SELECT balance FROM account WHERE id = {}", source))
                            .await?
                            .get(0);
                        if balance < amount {
                            return Ok(false);
                        }
                        tx.execute(sql!(
                            "UPDATE account SET balance = balance - {} WHERE id = {}",
                            amount,
                            source
                        ))
                        .await?;
                        tx.execute(sql!(
                            "UPDATE account SET balance = balance + {} WHERE id = {}",
                            amount,
                            target
                        ))
                        .await?;
                        tx.execute(sql!(
                            "INSERT INTO ledger (source, target, amount) VALUES ({}, {}, {})",
                            source,
                            target,
                            amount
                        ))
                        .await?;
                        Ok::<_, Error>(true)
                    })
                    .await;
                match result {
                    Ok(true) => applied += 1,
                    Ok(false) => refused += 1,
                    Err(error) => {
                        assert!(error.is_retryable(), "unexpected failure: {error}");
                        assert_eq!(error.attempts(), Some(10));
                        failed += 1;
                    }
                }
            }
            (applied, refused, failed)
        })
    });
    let results = futures::future::join_all(tasks).await;
    let (mut applied, mut refused, mut failed) = (0, 0, 0);
    for result in results {
        let (a, r, f) = result.unwrap();
        applied += a;
        refused += r;
        failed += f;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "bank: {applied} applied, {refused} refused, {failed} failed after retries, in {elapsed:?}"
    );

    assert_eq!(applied + refused + failed, TASKS * TRANSFERS_PER_TASK);
    assert!(applied > 0);
    assert_eq!(common::count(&engine, "ledger").await as usize, applied);
    let row = engine
        .fetch_one("SELECT sum(balance)::int, min(balance) FROM account")
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), ACCOUNTS * INITIAL_BALANCE);
    assert!(row.get::<_, i32>(1) >= 0);
    // The ledger explains every balance.
    let mismatched: i64 = engine
        .fetch_one(sql!(
            "SELECT count(*) FROM account a WHERE a.balance <> {}::int
               + coalesce((SELECT sum(amount) FROM ledger WHERE target = a.id), 0)
               - coalesce((SELECT sum(amount) FROM ledger WHERE source = a.id), 0)",
            INITIAL_BALANCE
        ))
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
    common::assert_sessions_clean(&db).await;
}

/// `acct (id int PRIMARY KEY, v int)` with one row, id 1, v 0.
async fn create_acct(engine: &PostgresEngine) {
    engine
        .run_ddl("CREATE TABLE acct (id int PRIMARY KEY, v int NOT NULL); INSERT INTO acct VALUES (1, 0)")
        .await
        .unwrap();
}

/// A REPEATABLE READ update of a row another session changed after the snapshot: a
/// serialization failure (40001), every time `interfere` is true.
async fn conflicting_update(
    tx: &PostgresTransaction,
    observer: &tokio_postgres::Client,
    interfere: bool,
) -> Result<(), Error> {
    tx.fetch_one("SELECT v FROM acct WHERE id = 1").await?; // takes the snapshot
    if interfere {
        observer
            .execute("UPDATE acct SET v = v + 100 WHERE id = 1", &[])
            .await
            .unwrap();
    }
    tx.execute("UPDATE acct SET v = v + 1 WHERE id = 1").await?;
    Ok(())
}

/// A retried serialization failure succeeds on a later attempt; when the attempts run
/// out, the error is the serialization failure with `attempts()` = the maximum.
#[tokio::test]
async fn retry_until_success_or_attempts_run_out() {
    let (db, engine) = common::engine().await;
    create_acct(&engine).await;
    let observer = db.connect().await.unwrap();
    let policy = RetryPolicy::new(3).initial_backoff(Duration::from_millis(1));

    // Interference on the first attempt only: the second succeeds.
    let runs = AtomicUsize::new(0);
    engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .retry(policy)
        .run(async |tx| {
            let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
            conflicting_update(tx, &observer, first).await
        })
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let v: i32 = engine.fetch_one("SELECT v FROM acct").await.unwrap().get(0);
    assert_eq!(v, 101);

    // Interference every time: the attempts run out.
    let runs = AtomicUsize::new(0);
    let error = engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .retry(policy)
        .run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            conflicting_update(tx, &observer, true).await
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert!(error.is_serialization_failure(), "{error}");
    assert_eq!(error.attempts(), Some(3), "{error}");
    let v: i32 = engine.fetch_one("SELECT v FROM acct").await.unwrap().get(0);
    assert_eq!(v, 401, "only the interfering updates were committed");

    // Without a policy: no retry, no attempts count.
    let runs = AtomicUsize::new(0);
    let error = engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            conflicting_update(tx, &observer, true).await
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(error.is_serialization_failure(), "{error}");
    assert_eq!(error.attempts(), None);
    common::assert_sessions_clean(&db).await;
}

/// Write skew under SERIALIZABLE (each transaction reads what the other writes): the
/// serialization failure comes when the second one commits, and the retry runs the
/// closure again, which then succeeds.
#[tokio::test]
async fn serialization_failure_at_commit_is_retried() {
    let (db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE dots (color text NOT NULL)")
        .await
        .unwrap();
    let observer = db.connect().await.unwrap();
    let runs = AtomicUsize::new(0);
    let body_errors = AtomicUsize::new(0);
    engine
        .transaction()
        .isolation(IsolationLevel::Serializable)
        .retry(RetryPolicy::new(3).initial_backoff(Duration::from_millis(1)))
        .run(async |tx| {
            let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
            if first {
                observer
                    .batch_execute(
                        "BEGIN ISOLATION LEVEL SERIALIZABLE; \
                         SELECT count(*) FROM dots WHERE color = 'black'",
                    )
                    .await
                    .unwrap();
            }
            tx.fetch_one("SELECT count(*) FROM dots WHERE color = 'white'")
                .await?;
            if first {
                observer
                    .batch_execute("INSERT INTO dots VALUES ('white')")
                    .await
                    .unwrap();
            }
            let inserted = tx.execute("INSERT INTO dots VALUES ('black')").await;
            if inserted.is_err() {
                body_errors.fetch_add(1, Ordering::SeqCst);
            }
            inserted?;
            if first {
                // The other transaction commits first: ours can no longer.
                observer.batch_execute("COMMIT").await.unwrap();
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        body_errors.load(Ordering::SeqCst),
        0,
        "the failure was expected at COMMIT, not in the body"
    );
    let colors: Vec<String> = engine
        .fetch("SELECT color FROM dots ORDER BY color")
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(colors, ["black", "white"]);
    common::assert_sessions_clean(&db).await;
}

/// An error that is not a serialization failure or a deadlock is not retried.
#[tokio::test]
async fn non_retryable_error_is_not_retried() {
    let (db, engine) = common::engine().await;
    let runs = AtomicUsize::new(0);
    let error = engine
        .transaction()
        .isolation(IsolationLevel::Serializable)
        .retry(RetryPolicy::new(5).initial_backoff(Duration::from_millis(1)))
        .run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            tx.execute("SELECT 1 / 0").await
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(error.code(), Some("22012"), "{error}");
    assert_eq!(error.attempts(), None);
    // Nor is an error of the closure's own making.
    let runs = AtomicUsize::new(0);
    let error = engine
        .transaction()
        .retry(RetryPolicy::new(5))
        .run(async |_tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Error::invalid_input("mine"))
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    common::assert_sessions_clean(&db).await;
}

/// A serialization failure the closure swallows (returning `Ok`) still aborted the
/// transaction: with a retry policy the closure runs again (the failure was met by a
/// query), without one `run` is an error; never `Ok` for lost work.
#[tokio::test]
async fn swallowed_serialization_failure_is_retried() {
    let (db, engine) = common::engine().await;
    create_acct(&engine).await;
    let observer = db.connect().await.unwrap();
    let runs = AtomicUsize::new(0);
    engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .retry(RetryPolicy::new(3).initial_backoff(Duration::from_millis(1)))
        .run(async |tx| {
            let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
            let _swallowed = conflicting_update(tx, &observer, first).await;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let v: i32 = engine.fetch_one("SELECT v FROM acct").await.unwrap().get(0);
    assert_eq!(v, 101);

    let error = engine
        .transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .run(async |tx| {
            let _swallowed = conflicting_update(tx, &observer, true).await;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
    let v: i32 = engine.fetch_one("SELECT v FROM acct").await.unwrap().get(0);
    assert_eq!(v, 201);
    common::assert_sessions_clean(&db).await;
}

/// `Nested::Savepoint` in the guard form: `commit` releases the savepoint (keeping its
/// work), `rollback` undoes it, and a nested guard dropped unfinished makes the outer
/// COMMIT fail rather than save half-done work.
#[tokio::test]
async fn nested_savepoint_guards() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("outer")).await?;
            let kept = engine
                .transaction()
                .nested(Nested::Savepoint)
                .begin()
                .await?;
            kept.execute(insert_band("kept")).await?;
            kept.commit().await?;
            assert!(!kept.is_active());
            assert_eq!(
                kept.execute("SELECT 1").await.unwrap_err().kind(),
                ErrorKind::Transaction
            );
            let undone = engine
                .transaction()
                .nested(Nested::Savepoint)
                .begin()
                .await?;
            undone.execute(insert_band("undone")).await?;
            undone.rollback().await?;
            assert!(tx.is_active());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(band_names(&engine).await, ["kept", "outer"]);

    let error = engine
        .transaction()
        .run(async |tx| {
            tx.execute(insert_band("lost")).await?;
            let dropped = engine
                .transaction()
                .nested(Nested::Savepoint)
                .begin()
                .await?;
            dropped.execute(insert_band("half done")).await?;
            drop(dropped);
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transaction, "{error}");
    assert_eq!(band_names(&engine).await, ["kept", "outer"]);
    common::assert_sessions_clean(&db).await;
}

// ---------------------------------------------------------------------------------------
// Concurrency and the pool
// ---------------------------------------------------------------------------------------

/// Ten concurrent queries on one transaction all succeed, with the right values, all in
/// the same server transaction.
#[tokio::test]
async fn concurrent_queries_in_one_transaction() {
    let (db, engine) = common::engine().await;
    let tx = engine.begin().await.unwrap();
    let txid: i64 = tx.fetch_one("SELECT txid_current()").await.unwrap().get(0);
    let q = |i: i32| tx.fetch_one(sql!("SELECT {}::int * 2, txid_current()", i));
    let results = tokio::join!(q(0), q(1), q(2), q(3), q(4), q(5), q(6), q(7), q(8), q(9));
    let rows = [
        results.0, results.1, results.2, results.3, results.4, results.5, results.6, results.7,
        results.8, results.9,
    ];
    for (i, row) in rows.into_iter().enumerate() {
        let row = row.unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32 * 2);
        assert_eq!(row.get::<_, i64>(1), txid);
    }
    tx.commit().await.unwrap();
    common::assert_sessions_clean(&db).await;
}

/// A future running `engine.transaction().run(..)` is `Send`: it can be spawned, and it
/// works there (ambient queries and a nested savepoint included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_future_can_be_spawned() {
    let (db, engine) = common::engine().await;
    create_band(&engine).await;
    let task_engine = engine.clone();
    let handle = tokio::spawn(async move {
        // The closure owns what it uses (`async move`): a closure borrowing from its
        // surroundings makes the spawned future not provably `Send`, a compiler
        // limitation (rust-lang/rust#139475), not the engine's.
        let engine = task_engine.clone();
        task_engine
            .transaction()
            .run(async move |tx| {
                tx.execute(insert_band("spawned")).await?;
                engine
                    .transaction()
                    .nested(Nested::Savepoint)
                    .run(async |inner| inner.execute(insert_band("nested")).await)
                    .await?;
                Ok::<_, Error>(common::count(&engine, "band").await)
            })
            .await
    });
    assert_eq!(handle.await.unwrap().unwrap(), 2);
    assert_eq!(band_names(&engine).await, ["nested", "spawned"]);
    common::assert_sessions_clean(&db).await;
}

/// With the pool exhausted by an open transaction, `begin()` (and a query outside the
/// transaction) fail with `PoolTimeout` after the configured wait; queries of the
/// transaction itself need no second connection; afterwards all works again.
#[tokio::test]
async fn pool_exhaustion_inside_transactions_times_out() {
    let db = TestDatabase::new().await.unwrap();
    let wait = Duration::from_millis(300);
    let engine = common::builder(&db)
        .max_connections(1)
        .pool_wait_timeout(wait)
        .build()
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();

    let started = Instant::now();
    let error = engine.begin().await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::PoolTimeout, "{error}");
    assert!(
        elapsed >= wait - Duration::from_millis(50) && elapsed < wait + Duration::from_secs(10),
        "{elapsed:?}"
    );
    let error = engine.fetch("SELECT 1").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PoolTimeout, "{error}");
    tx.fetch("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();

    // The closure form's ambient queries use its own connection.
    engine
        .transaction()
        .run(async |_tx| {
            engine.fetch("SELECT 1").await?;
            let error = engine.begin().await;
            assert!(error.is_ok(), "nested begin joins the ambient transaction");
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    engine.fetch("SELECT 1").await.unwrap();
    common::assert_sessions_clean(&db).await;
}

/// Finishing a transaction whose abandoned query is still running does not wait for
/// that query: it is cancelled first, so `commit` (refused) and `rollback` answer at
/// once, and the connection is reused clean (the same session, on a pool of one).
#[tokio::test]
async fn finishing_does_not_wait_for_an_abandoned_query() {
    let (db, engine) = common::engine_with(1).await;
    create_item(&engine).await;
    let pid = async || -> i32 {
        engine
            .fetch_one("SELECT pg_backend_pid()")
            .await
            .unwrap()
            .get(0)
    };
    let first = pid().await;
    for finish in ["commit", "rollback"] {
        let tx = engine.begin().await.unwrap();
        tx.execute("INSERT INTO item VALUES (3, 'abandoned')")
            .await
            .unwrap();
        let abandoned = tokio::time::timeout(
            Duration::from_millis(100),
            tx.execute("SELECT pg_sleep(60)"),
        )
        .await;
        assert!(abandoned.is_err(), "the query was still running");
        let started = Instant::now();
        match finish {
            "commit" => {
                let err = tx.commit().await.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Transaction, "{err}");
            }
            _ => tx.rollback().await.unwrap(),
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(20), "{finish} took {took:?}");
        assert_eq!(pid().await, first, "{finish}: the connection was replaced");
        assert_eq!(items_of(&engine, 3).await, 0);
    }
    common::assert_sessions_clean(&db).await;
}

/// A query of a transaction abandoned mid-flight (its future dropped by a timeout) has
/// an unknown outcome: committing afterwards is refused and rolls back, never a silent
/// commit of a write the caller gave up on.
#[tokio::test]
async fn commit_after_an_abandoned_query_is_refused() {
    let (db, engine) = common::engine_with(1).await;
    create_item(&engine).await;
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO item VALUES (1, 'kept?')")
        .await
        .unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        tx.execute("INSERT INTO item SELECT 2, 'slow' FROM pg_sleep(0.3)"),
    )
    .await;
    assert!(abandoned.is_err(), "the insert was still running");
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transaction, "{err}");
    assert!(err.to_string().contains("abandoned"), "{err}");
    assert_eq!(items_of(&engine, 1).await + items_of(&engine, 2).await, 0);
    common::assert_sessions_clean(&db).await;
}
