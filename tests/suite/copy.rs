//! COPY FROM STDIN: CSV and text from a reader, typed rows in binary; on the engine, in
//! a transaction and in an ambient one; a bad row, a short row, and a COPY dropped
//! half-way leave nothing behind.

use std::time::Duration;

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
