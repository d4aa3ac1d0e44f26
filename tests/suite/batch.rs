//! `AsyncBatch` against a real server: exact batching, parameters, ambient
//! transactions, connection hygiene on drop / exhaustion / error, and input checks.

use crate::common::{self, backend_pid};

use std::time::Duration;

use futures::TryStreamExt;
use pgengine::prelude::*;
use pgengine::{AsyncBatch, Error, ErrorKind};

/// Every batch until `None`, asserting each holds 1 to `batch_size` rows.
async fn drain(batch: &mut AsyncBatch, batch_size: usize) -> Vec<Vec<i32>> {
    let mut batches = Vec::new();
    while let Some(rows) = batch.next().await.unwrap() {
        assert!(
            (1..=batch_size).contains(&rows.len()),
            "a batch of {} rows (batch_size {batch_size})",
            rows.len()
        );
        batches.push(rows.iter().map(|row| row.get(0)).collect());
    }
    batches
}

fn series(n: i32) -> String {
    format!("SELECT g FROM generate_series(1, {n}) g")
}

/// Batches of `size` over 1..=n, in order.
fn expected(n: i32, size: usize) -> Vec<Vec<i32>> {
    (1..=n)
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[i32]>::to_vec)
        .collect()
}

/// Our sessions' open cursors, seen from a query on the engine (a pool of 1: the same
/// connection the batch used).
async fn open_cursors(engine: &PostgresEngine) -> i64 {
    engine
        .fetch_one("SELECT count(*) FROM pg_cursors WHERE name <> ''")
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn exact_batches_in_order_then_none() {
    let (db, engine) = common::engine().await;

    let mut batch = engine.batch(series(1000), 10).await.unwrap();
    let batches = drain(&mut batch, 10).await;
    assert_eq!(batches.len(), 100);
    assert!(batches.iter().all(|b| b.len() == 10));
    assert_eq!(batches, expected(1000, 10));
    assert!(batch.next().await.unwrap().is_none(), "None again");

    let mut batch = engine.batch(series(1001), 10).await.unwrap();
    let batches = drain(&mut batch, 10).await;
    assert_eq!(batches.len(), 101);
    assert_eq!(batches[100], [1001]);
    assert_eq!(batches, expected(1001, 10));

    let mut batch = engine.batch(series(0), 10).await.unwrap();
    assert!(
        batch.next().await.unwrap().is_none(),
        "no rows: None at once"
    );
    assert!(batch.next().await.unwrap().is_none());

    // One row, a batch exactly the size of the result, a batch bigger than it.
    for (n, size) in [(1, 10), (10, 10), (7, 100), (11, 10)] {
        let mut batch = engine.batch(series(n), size).await.unwrap();
        assert_eq!(
            drain(&mut batch, size).await,
            expected(n, size),
            "{n} rows by {size}"
        );
    }
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn as_a_stream() {
    let (db, engine) = common::engine().await;
    let batches: Vec<Vec<Row>> = engine
        .batch(series(1001), 10)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let values: Vec<Vec<i32>> = batches
        .iter()
        .map(|rows| rows.iter().map(|row| row.get(0)).collect())
        .collect();
    assert_eq!(values, expected(1001, 10));

    let none: Vec<Vec<Row>> = engine
        .batch(series(0), 10)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn parameters() {
    let (db, engine) = common::engine().await;
    let query = sql!(
        "SELECT g FROM generate_series(1, {}) g WHERE g % {} = 0 ORDER BY g",
        100,
        7
    );
    let mut batch = engine.batch(query, 5).await.unwrap();
    let values: Vec<i32> = drain(&mut batch, 5).await.concat();
    assert_eq!(values, (7..=100).step_by(7).collect::<Vec<_>>());

    // Twice on the same connection (the prepared DECLARE is reused), text parameters.
    for _ in 0..2 {
        let query = sql!("SELECT {} || g::text FROM generate_series(1, 3) g", "n");
        let rows: Vec<Vec<Row>> = engine
            .batch(query, 2)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let labels: Vec<String> = rows.concat().iter().map(|r| r.get(0)).collect();
        assert_eq!(labels, ["n1", "n2", "n3"]);
    }
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_query_that_writes_works_outside_a_transaction_too() {
    // As `fetch` of the same query does: the batch's own transaction is not read-only.
    let (db, engine) = common::engine().await;
    engine.run_ddl("CREATE SEQUENCE s").await.unwrap();
    let rows: Vec<Vec<Row>> = engine
        .batch("SELECT nextval('s') FROM generate_series(1, 5)", 2)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let values: Vec<i64> = rows.concat().iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [1, 2, 3, 4, 5]);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn inside_a_transaction_sees_its_rows_and_leaves_it_open() {
    let (db, engine) = common::engine().await;
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();
    engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO t SELECT generate_series(1, 25)")
                .await?;
            let mut batch = engine.batch("SELECT id FROM t ORDER BY id", 10).await?;
            let batches = drain(&mut batch, 10).await;
            assert_eq!(batches, expected(25, 10), "the uncommitted rows");

            // Two cursors at once in one transaction, one with parameters.
            let mut evens = engine
                .batch(sql!("SELECT id FROM t WHERE id % {} = 0 ORDER BY id", 2), 4)
                .await?;
            let mut odds = engine
                .batch("SELECT id FROM t WHERE id % 2 = 1 ORDER BY id", 4)
                .await?;
            let (mut e, mut o) = (Vec::new(), Vec::new());
            loop {
                let (a, b) = (evens.next().await?, odds.next().await?);
                if a.is_none() && b.is_none() {
                    break;
                }
                e.extend(a.unwrap_or_default().iter().map(|r| r.get::<_, i32>(0)));
                o.extend(b.unwrap_or_default().iter().map(|r| r.get::<_, i32>(0)));
            }
            assert_eq!(e, (2..=25).step_by(2).collect::<Vec<_>>());
            assert_eq!(o, (1..=25).step_by(2).collect::<Vec<_>>());

            // Still open and usable.
            assert!(tx.is_active());
            tx.execute("INSERT INTO t VALUES (100)").await?;
            let n: i64 = tx.fetch_one("SELECT count(*) FROM t").await?.get(0);
            assert_eq!(n, 26);
            let cursors: i64 = tx
                .fetch_one("SELECT count(*) FROM pg_cursors WHERE name <> ''")
                .await?
                .get(0);
            assert_eq!(cursors, 0, "the exhausted cursors are closed");
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let n = common::count(&engine, "t").await;
    assert_eq!(n, 26, "committed");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn dropped_early_leaves_the_connection_clean() {
    let (db, engine) = common::engine_with(1).await;
    let pid = backend_pid(&engine).await;
    // Far more rows than the socket buffers hold: the statement is still running.
    let mut batch = engine.batch(series(10_000_000), 10).await.unwrap();
    assert_eq!(batch.next().await.unwrap().unwrap().len(), 10);
    assert!(
        common::session_states(&db)
            .await
            .iter()
            .any(|s| s == "active"),
        "the open batch's statement is running"
    );
    drop(batch); // cancels the statement

    let states = common::settled_session_states(&db).await;
    assert!(states.iter().all(|s| s == "idle"), "{states:?}");
    // The only connection is reused (not discarded), without a cursor or transaction.
    assert_eq!(backend_pid(&engine).await, pid);
    assert_eq!(open_cursors(&engine).await, 0);
    let err = engine.run_ddl("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(err.code(), Some("25P01"), "not in a transaction: {err}");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn exhausted_gives_the_connection_back_while_still_alive() {
    let (db, engine) = common::engine_with(1).await;
    for (n, size) in [(1000, 10), (1001, 10), (0, 10), (5, 10)] {
        let mut batch = engine.batch(series(n), size).await.unwrap();
        // Every row, but not the final `None`: the last batch ends the cursor already.
        let batches = expected(n, size).len();
        for _ in 0..batches {
            batch.next().await.unwrap().unwrap();
        }
        if batches == 0 {
            assert!(batch.next().await.unwrap().is_none());
        }
        // The batch is alive, and the only connection is free.
        let n: i64 = tokio::time::timeout(
            Duration::from_secs(5),
            engine.fetch_one("SELECT count(*) FROM pg_cursors WHERE name <> ''"),
        )
        .await
        .expect("the connection did not come back")
        .unwrap()
        .get(0);
        assert_eq!(n, 0);
        assert!(batch.next().await.unwrap().is_none());
        drop(batch);
    }
    common::assert_sessions_clean(&db).await;
}

const DIVISION_BY_ZERO_AT_5000: &str = "SELECT 1/(5000-g) FROM generate_series(1,10000) g";

#[tokio::test]
async fn an_error_mid_stream_is_returned() {
    let (db, engine) = common::engine_with(1).await;
    let pid = backend_pid(&engine).await;
    let mut batch = engine.batch(DIVISION_BY_ZERO_AT_5000, 100).await.unwrap();
    let mut rows = 0;
    let err = loop {
        match batch.next().await {
            Ok(Some(batch)) => {
                assert!(batch.len() <= 100);
                rows += batch.len();
            }
            Ok(None) => panic!("ended without the error after {rows} rows"),
            Err(err) => break err,
        }
    };
    assert_eq!(err.code(), Some("22012"), "{err}");
    assert!((1000..5000).contains(&rows), "{rows} rows before the error");
    assert!(
        batch.next().await.unwrap().is_none(),
        "ended after the error"
    );
    drop(batch);

    common::assert_sessions_clean(&db).await;
    assert_eq!(backend_pid(&engine).await, pid, "the connection was kept");
    assert_eq!(open_cursors(&engine).await, 0);

    // Through the stream: the error is the stream's last item.
    let result: pgengine::Result<Vec<Vec<Row>>> = engine
        .batch(DIVISION_BY_ZERO_AT_5000, 100)
        .await
        .unwrap()
        .try_collect()
        .await;
    assert_eq!(result.unwrap_err().code(), Some("22012"));

    // An error in the first rows: from `batch()` itself or the first `next()`.
    let first = match engine
        .batch("SELECT 1/0 FROM generate_series(1, 3)", 10)
        .await
    {
        Err(err) => err,
        Ok(mut batch) => batch.next().await.unwrap_err(),
    };
    assert_eq!(first.code(), Some("22012"));
    common::assert_sessions_clean(&db).await;
}

/// `tx.batch` on a transaction handle (the guard form, with no ambient scope) reads a
/// cursor of that transaction: it sees the uncommitted rows, a batch dropped half-read
/// leaves the transaction usable, and the commit keeps what the transaction wrote.
/// `engine.batch` on the same task meanwhile is outside the transaction.
#[tokio::test]
async fn batch_of_a_transaction_handle_reads_in_that_transaction() {
    let (db, engine) = common::engine().await;
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO t SELECT generate_series(1, 25)")
        .await
        .unwrap();

    let mut batch = tx.batch("SELECT id FROM t ORDER BY id", 10).await.unwrap();
    assert_eq!(drain(&mut batch, 10).await, expected(25, 10));

    let outside = engine.batch("SELECT id FROM t", 10).await.unwrap();
    let outside: Vec<Vec<Row>> = outside.try_collect().await.unwrap();
    assert!(
        outside.is_empty(),
        "another session sees no uncommitted row"
    );

    let mut half_read = tx
        .batch(sql!("SELECT id FROM t WHERE id > {} ORDER BY id", 5), 3)
        .await
        .unwrap();
    let first: Vec<i32> = half_read
        .next()
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(first, [6, 7, 8]);
    drop(half_read);

    tx.execute("INSERT INTO t VALUES (100)").await.unwrap();
    tx.commit().await.unwrap();
    let n = common::count(&engine, "t").await;
    assert_eq!(n, 26);
    common::assert_sessions_clean(&db).await;
}

/// A batch of a transaction handle that fails mid-stream aborts that transaction: its
/// commit is an error and nothing is saved.
#[tokio::test]
async fn an_error_in_a_transaction_handle_batch_fails_its_commit() {
    let (db, engine) = common::engine().await;
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)").await.unwrap();
    let batches: Result<Vec<Vec<Row>>, Error> = tx
        .batch(DIVISION_BY_ZERO_AT_5000, 100)
        .await
        .unwrap()
        .try_collect()
        .await;
    assert_eq!(batches.unwrap_err().code(), Some("22012"));
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transaction, "{err}");
    let n = common::count(&engine, "t").await;
    assert_eq!(n, 0, "nothing was saved");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn an_error_mid_stream_aborts_the_transaction() {
    let (db, engine) = common::engine().await;
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();
    let result = engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO t VALUES (1)").await?;
            let mut batch = engine.batch(DIVISION_BY_ZERO_AT_5000, 100).await?;
            let err = loop {
                match batch.next().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("no error"),
                    Err(err) => break err,
                }
            };
            assert_eq!(err.code(), Some("22012"));
            Ok::<_, Error>(()) // swallowed: the commit must fail anyway
        })
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transaction, "{err}");
    let n = common::count(&engine, "t").await;
    assert_eq!(n, 0, "nothing was saved");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn on_a_pool_of_one() {
    let (db, engine) = common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 95) g")
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let mut batch = engine
            .batch(sql!("SELECT id FROM t WHERE id > {} ORDER BY id", 0), 10)
            .await?;
        let batches = drain(&mut batch, 10).await;
        engine.fetch_one("SELECT 1").await?;
        Ok::<_, Error>(batches)
    })
    .await
    .expect("deadlocked");
    assert_eq!(result.unwrap(), expected(95, 10));

    // A transaction's batch uses the transaction's connection, not a second one.
    tokio::time::timeout(
        Duration::from_secs(10),
        engine.transaction().run(async |_tx| {
            let rows: Vec<Vec<Row>> = engine
                .batch("SELECT id FROM t", 10)
                .await?
                .try_collect()
                .await?;
            assert_eq!(rows.concat().len(), 95);
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect("deadlocked")
    .unwrap();
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn invalid_input() {
    let (db, engine) = common::engine_with(1).await;
    let two = vec![QueryString::raw("SELECT 1"), QueryString::raw("SELECT 2")];
    let err = engine.batch(two, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let err = engine.batch("SELECT 1", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = engine.batch("SELECT 1", usize::MAX).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    let err = engine
        .batch(QueryString::new("SELECT {}, {}").arg(1), 10)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    // A query the server refuses: its error, and the connection is fine.
    let err = engine.batch("SELEC 1", 10).await.unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    assert_eq!(open_cursors(&engine).await, 0);
    common::assert_sessions_clean(&db).await;
}
