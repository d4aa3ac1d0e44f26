//! COPY FROM STDIN: CSV and text from a reader, typed rows in binary; on the engine, in
//! a transaction and in an ambient one; a bad row, a short row, and a COPY dropped
//! half-way leave nothing behind. COPY TO STDOUT: bytes and typed rows, in a
//! transaction, a failing one, and one dropped half-way.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use pgengine::ErrorKind;
use pgengine::prelude::*;
use pgengine::types::{ToSql, Type};
use tokio::io::AsyncWriteExt;

async fn engine_with_band(
    pool: usize,
) -> (pgengine_testing::TestDatabase, pgengine::PostgresEngine) {
    let (db, engine) = crate::common::engine_with(pool).await;
    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY, popularity int)")
        .await
        .unwrap();
    (db, engine)
}

#[tokio::test]
async fn csv_text_and_binary_rows_are_copied() {
    let (_db, engine) = engine_with_band(2).await;
    let csv = "a,1\nb,2\n\"c, with a comma\",3\n".as_bytes();
    let copied = engine
        .copy_in("COPY band FROM STDIN (FORMAT csv)", csv)
        .await
        .unwrap();
    assert_eq!(copied, 3);
    let text = "d\t4\ne\t\\N\n".as_bytes();
    assert_eq!(
        engine.copy_in("COPY band FROM STDIN", text).await.unwrap(),
        2
    );

    let values: Vec<(String, i32)> = (0..10_000).map(|i| (format!("band {i}"), i)).collect();
    let rows: Vec<[&(dyn ToSql + Sync); 2]> =
        values.iter().map(|(name, n)| [name as _, n as _]).collect();
    let copied = engine
        .copy_in_rows(
            "COPY band FROM STDIN (FORMAT binary)",
            &[Type::TEXT, Type::INT4],
            rows.iter().map(|row| &row[..]),
        )
        .await
        .unwrap();
    assert_eq!(copied, 10_000);
    assert_eq!(crate::common::count(&engine, "band").await, 10_005);
    let popularity: Option<i32> = engine
        .fetch_one("SELECT popularity FROM band WHERE name = 'band 9999'")
        .await
        .unwrap()
        .get(0);
    assert_eq!(popularity, Some(9_999));
}

/// Rows made on the fly from an iterator (arrays of borrowed values, nothing collected
/// first), in a spawned task as a service's handler runs.
#[tokio::test]
async fn copy_in_rows_takes_rows_made_on_the_fly_in_a_spawned_task() {
    let (_db, engine) = engine_with_band(1).await;
    let copied = tokio::spawn({
        let engine = engine.clone();
        async move {
            let bands: Vec<(String, i32)> = (0..1_000).map(|i| (format!("band {i}"), i)).collect();
            engine
                .copy_in_rows(
                    "COPY band FROM STDIN (FORMAT binary)",
                    &[Type::TEXT, Type::INT4],
                    bands
                        .iter()
                        .map(|(name, n)| [name as &(dyn ToSql + Sync), n]),
                )
                .await
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(copied, 1_000);
    let (count, sum): (i64, i64) = engine
        .fetch_one_as("SELECT count(*), sum(popularity) FROM band")
        .await
        .unwrap();
    assert_eq!((count, sum), (1_000, 499_500));
}

#[tokio::test]
async fn copy_joins_the_transaction_explicit_or_ambient() {
    let (_db, engine) = engine_with_band(2).await;
    let tx = engine.begin().await.unwrap();
    tx.copy_in("COPY band FROM STDIN (FORMAT csv)", "a,1\n".as_bytes())
        .await
        .unwrap();
    assert_eq!(crate::common::count(&tx, "band").await, 1);
    assert_eq!(
        crate::common::count(&engine, "band").await,
        0,
        "not committed yet"
    );
    tx.rollback().await.unwrap();
    assert_eq!(crate::common::count(&engine, "band").await, 0);

    let result = engine
        .transaction()
        .run(async |_tx| {
            engine
                .copy_in("COPY band FROM STDIN (FORMAT csv)", "b,2\n".as_bytes())
                .await?;
            Err::<(), _>(pgengine::Error::invalid_input("changed my mind"))
        })
        .await;
    assert!(result.is_err());
    assert_eq!(
        crate::common::count(&engine, "band").await,
        0,
        "rolled back with it"
    );
}

#[tokio::test]
async fn a_bad_row_copies_nothing_and_aborts_the_transaction() {
    let (db, engine) = engine_with_band(1).await;
    let err = engine
        .copy_in(
            "COPY band FROM STDIN (FORMAT csv)",
            "a,1\nb,not a number\n".as_bytes(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("22P02"), "{err}");
    assert_eq!(crate::common::count(&engine, "band").await, 0);

    let short: [&(dyn ToSql + Sync); 1] = [&"only a name"];
    let err = engine
        .copy_in_rows(
            "COPY band FROM STDIN (FORMAT binary)",
            &[Type::TEXT, Type::INT4],
            [&short[..]],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(crate::common::count(&engine, "band").await, 0);

    let tx = engine.begin().await.unwrap();
    tx.copy_in("COPY band FROM STDIN (FORMAT csv)", "c,x\n".as_bytes())
        .await
        .unwrap_err();
    assert!(
        tx.commit().await.is_err(),
        "a transaction whose COPY failed committed"
    );
    assert_eq!(crate::common::count(&engine, "band").await, 0);
    crate::common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_copy_dropped_half_way_leaves_nothing_behind() {
    let (db, engine) = engine_with_band(1).await;
    // Outside a transaction: the connection is cleaned and serves the next query.
    let (mut writer, reader) = tokio::io::duplex(1024);
    writer.write_all(b"a,1\nb,2\n").await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        engine.copy_in("COPY band FROM STDIN (FORMAT csv)", reader),
    )
    .await;
    assert!(dropped.is_err(), "the COPY finished without its data");
    assert_eq!(crate::common::count(&engine, "band").await, 0);

    // Inside one: the transaction cannot commit.
    let tx = engine.begin().await.unwrap();
    let (mut writer, reader) = tokio::io::duplex(1024);
    writer.write_all(b"c,3\n").await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        tx.copy_in("COPY band FROM STDIN (FORMAT csv)", reader),
    )
    .await;
    assert!(dropped.is_err());
    assert!(
        tx.commit().await.is_err(),
        "committed after an abandoned COPY"
    );
    drop(writer);
    assert_eq!(crate::common::count(&engine, "band").await, 0);
    crate::common::assert_sessions_clean(&db).await;
}

/// `copy_out` streams the data as sent; `copy_out_rows` decodes the binary format;
/// both give the connection back once read to the end.
#[tokio::test]
async fn copy_out_streams_bytes_and_rows() {
    let (db, engine) = engine_with_band(1).await;
    engine
        .execute("INSERT INTO band SELECT 'band ' || g, g FROM generate_series(1, 50000) g")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = engine
        .copy_out(
            "COPY (SELECT name, popularity FROM band ORDER BY popularity) TO STDOUT (FORMAT csv)",
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let csv = String::from_utf8(chunks.concat()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 50_000);
    assert_eq!((lines[0], lines[49_999]), ("band 1,1", "band 50000,50000"));

    let rows: Vec<pgengine::BinaryCopyOutRow> = engine
        .copy_out_rows(
            "COPY (SELECT name, popularity FROM band ORDER BY popularity) TO STDOUT (FORMAT binary)",
            &[Type::TEXT, Type::INT4],
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 50_000);
    assert_eq!(
        (rows[9].get::<&str>(0), rows[9].get::<i32>(1)),
        ("band 10", 10)
    );
    // The one connection is back in the pool.
    assert_eq!(crate::common::count(&engine, "band").await, 50_000);
    crate::common::assert_sessions_clean(&db).await;
}

/// In a transaction it sees the transaction's rows; a failing COPY is an error that
/// aborts the transaction; a COPY dropped half-way is cancelled, outside a transaction
/// (the connection serves the next query at once) and inside one (it cannot commit).
#[tokio::test]
async fn copy_out_in_transactions_failing_and_dropped() {
    let (db, engine) = engine_with_band(1).await;
    let tx = engine.begin().await.unwrap();
    tx.execute("INSERT INTO band VALUES ('uncommitted', 1)")
        .await
        .unwrap();
    let data: Vec<bytes::Bytes> = tx
        .copy_out("COPY band (name) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(data.concat(), b"uncommitted\n");
    let failing = tx
        .copy_out("COPY (SELECT 1 / (g - 3) FROM generate_series(1, 5) g) TO STDOUT")
        .await;
    let error = match failing {
        Ok(copy) => copy.try_collect::<Vec<_>>().await.unwrap_err(),
        Err(error) => error,
    };
    assert_eq!(error.code(), Some("22012"), "{error}");
    assert!(tx.commit().await.is_err(), "committed after a failed COPY");
    drop(tx);

    let endless =
        "COPY (SELECT a FROM generate_series(1, 10000) a, generate_series(1, 10000) b) TO STDOUT";
    let mut copy = engine.copy_out(endless).await.unwrap();
    assert!(copy.next().await.unwrap().is_ok());
    drop(copy);
    let started = Instant::now();
    assert_eq!(crate::common::count(&engine, "band").await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let tx = engine.begin().await.unwrap();
    let mut copy = tx.copy_out(endless).await.unwrap();
    assert!(copy.next().await.unwrap().is_ok());
    drop(copy);
    assert!(
        tx.commit().await.is_err(),
        "committed after an abandoned COPY"
    );
    drop(tx);
    crate::common::assert_sessions_clean(&db).await;
}

/// Through the engine inside the ambient transaction, `copy_out` runs in that
/// transaction: it sees the transaction's rows.
#[tokio::test]
async fn copy_out_joins_the_ambient_transaction() {
    let (db, engine) = engine_with_band(1).await;
    let seen = engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO band VALUES ('ambient', 1)").await?;
            let data: Vec<bytes::Bytes> = engine
                .copy_out("COPY band (name) TO STDOUT")
                .await?
                .try_collect()
                .await?;
            Err::<Vec<u8>, _>(pgengine::Error::invalid_input(
                String::from_utf8_lossy(&data.concat()).into_owned(),
            ))
        })
        .await
        .unwrap_err();
    assert!(seen.to_string().contains("ambient"), "{seen}");
    assert_eq!(
        crate::common::count(&engine, "band").await,
        0,
        "rolled back"
    );
    crate::common::assert_sessions_clean(&db).await;
}
