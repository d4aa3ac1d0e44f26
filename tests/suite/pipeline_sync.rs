//! Pipelines that end in one `Sync`: the driver patch's `Client::pipeline` (results in
//! order, the failing statement's index, nothing applied after it, one implicit
//! transaction, unnamed statements that use what earlier ones created), and
//! `execute_many` on top of it (every row or none, the failing row named).

use crate::common;

use pgengine::prelude::*;
use pgengine::types::{ToSql, Type};
use pgengine::{Error, ErrorKind, PostgresEngine};
use tokio_postgres::PipelineStatement;

/// `item (id int PRIMARY KEY, label text NOT NULL)`.
async fn create_item(engine: &PostgresEngine) {
    engine
        .run_ddl("CREATE TABLE item (id int PRIMARY KEY, label text NOT NULL)")
        .await
        .expect("CREATE TABLE item");
}

const INSERT_ITEM: &str = "INSERT INTO item (id, label) VALUES ($1, $2)";

/// Rows `(id, "item {id}")` for `ids`, as owned values.
fn items(ids: impl IntoIterator<Item = i32>) -> Vec<(i32, String)> {
    ids.into_iter()
        .map(|id| (id, format!("item {id}")))
        .collect()
}

/// The parameters of each of `items`, as `execute_many` takes them.
fn params(items: &[(i32, String)]) -> Vec<[&(dyn ToSql + Sync); 2]> {
    items
        .iter()
        .map(|(id, label)| [id as &(dyn ToSql + Sync), label as _])
        .collect()
}

#[tokio::test]
async fn the_driver_answers_each_statement_in_order_and_types_custom_columns() {
    let (_db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TYPE mood AS ENUM ('happy', 'sad')")
        .await
        .unwrap();
    let results = engine
        .with_client(|client| {
            Box::pin(async move {
                let answer: (&(dyn ToSql + Sync), Type) = (&41i32, Type::INT4);
                let results = client
                    .pipeline(&[
                        // Each unnamed statement is parsed at its turn: the table exists
                        // by the time the INSERT and the SELECT are parsed.
                        PipelineStatement::Unnamed("CREATE TABLE feeling (id int, m mood)", &[]),
                        PipelineStatement::Unnamed(
                            "INSERT INTO feeling SELECT g, 'happy' FROM generate_series(1, 5000) g",
                            &[],
                        ),
                        // 5,000 rows of a type the driver must look up on the server.
                        PipelineStatement::Unnamed("SELECT id, m FROM feeling ORDER BY id", &[]),
                        PipelineStatement::Unnamed("SELECT $1 + 1", &[answer]),
                    ])
                    .await
                    .map_err(|failure| Error::from(failure.into_error()))?;
                Ok::<_, Error>(results)
            })
        })
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0].rows().is_empty());
    assert_eq!(results[1].rows_affected(), 5000);
    let feelings = results[2].rows();
    assert_eq!(feelings.len(), 5000);
    assert_eq!(feelings[4999].get::<_, i32>(0), 5000);
    assert_eq!(feelings[0].columns()[1].type_().name(), "mood");
    assert_eq!(results[3].rows()[0].get::<_, i32>(0), 42);
}

#[tokio::test]
async fn the_driver_names_the_failing_statement_and_applies_nothing_of_the_implicit_transaction() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let (index, code, after) = engine
        .with_client(|client| {
            Box::pin(async move {
                let insert = client.prepare(INSERT_ITEM).await?;
                let (one, two, three) = (1i32, 2i32, 3i32);
                let label = "x".to_owned();
                let failure = client
                    .pipeline(&[
                        PipelineStatement::Prepared(&insert, &[&one, &label]),
                        PipelineStatement::Prepared(&insert, &[&two, &label]),
                        PipelineStatement::Prepared(&insert, &[&one, &label]), // duplicate
                        PipelineStatement::Prepared(&insert, &[&three, &label]),
                    ])
                    .await
                    .expect_err("a duplicate key");
                let code = failure.error().code().map(|code| code.code().to_owned());
                // The client is in step again: the next pipeline answers.
                let after = client
                    .pipeline(&[PipelineStatement::Unnamed("SELECT count(*) FROM item", &[])])
                    .await
                    .map_err(|failure| Error::from(failure.into_error()))?;
                let count: i64 = after[0].rows()[0].get(0);
                Ok::<_, Error>((failure.index(), code, count))
            })
        })
        .await
        .unwrap();
    assert_eq!(index, Some(2));
    assert_eq!(code.as_deref(), Some("23505"));
    // Without BEGIN the statements up to the Sync are one implicit transaction: the
    // two inserts before the failure are rolled back, the one after never ran.
    assert_eq!(after, 0);
}

#[tokio::test]
async fn a_failing_atomic_names_its_statement_and_applies_nothing() {
    let (db, engine) = common::engine().await;
    create_item(&engine).await;
    let statement = |id: i32| sql!("INSERT INTO item (id, label) VALUES ({}, {})", id, "x");
    // The statement is cached after a first run: the bundle goes out as one pipeline.
    engine.execute(statement(0)).await.unwrap();
    let mut atomic = engine.atomic();
    atomic.add_all([statement(1), statement(2), statement(1), statement(3)]);
    let error = atomic.run().await.expect_err("a duplicate key");
    let failed = error.statement().expect("the failing statement is named");
    assert_eq!(failed.index, 2, "{error}");
    assert_eq!(error.code(), Some("23505"));
    assert_eq!(common::count(&engine, "item").await, 1);
    common::assert_sessions_clean(&db).await;

    // Inside a transaction, the failure aborts it: it cannot commit.
    let tx = engine.begin().await.unwrap();
    tx.execute(statement(4)).await.unwrap();
    let error = tx
        .execute(vec![statement(5), statement(0), statement(6)])
        .await
        .expect_err("a duplicate key");
    assert_eq!(error.statement().map(|failed| failed.index), Some(1));
    assert!(tx.commit().await.is_err(), "an aborted transaction commits");
    assert_eq!(common::count(&engine, "item").await, 1);
}

#[tokio::test]
async fn fetch_of_several_statements_returns_the_rows_of_the_last_in_one_transaction() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let insert = |id: i32| sql!("INSERT INTO item (id, label) VALUES ({}, {})", id, "x");
    engine.execute(insert(0)).await.unwrap();
    let rows = engine
        .fetch(vec![
            insert(1),
            insert(2),
            sql!("SELECT id FROM item WHERE id > {} ORDER BY id", 0),
        ])
        .await
        .unwrap();
    let ids: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test]
async fn execute_many_inserts_every_row() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let rows = items(1..=1000);
    let params = params(&rows);
    let inserted = engine
        .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
        .await
        .unwrap();
    assert_eq!(inserted, 1000);
    let (count, sum): (i64, i64) = engine
        .fetch_one_as("SELECT count(*), sum(id) FROM item")
        .await
        .unwrap();
    assert_eq!((count, sum), (1000, 500_500));
    let nothing: Vec<[&(dyn ToSql + Sync); 2]> = Vec::new();
    let none = engine
        .execute_many(INSERT_ITEM, nothing.iter().map(|row| &row[..]))
        .await
        .unwrap();
    assert_eq!(none, 0);
}

/// Rows made on the fly (arrays of borrowed values, nothing collected first), in a
/// spawned task as a service's handler runs.
#[tokio::test]
async fn execute_many_takes_rows_made_on_the_fly_in_a_spawned_task() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let rows = items(1..=100);
    let inserted = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .execute_many(
                    INSERT_ITEM,
                    rows.iter()
                        .map(|(id, label)| [id as &(dyn ToSql + Sync), label]),
                )
                .await
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(inserted, 100);
    let (count, sum): (i64, i64) = engine
        .fetch_one_as("SELECT count(*), sum(id) FROM item")
        .await
        .unwrap();
    assert_eq!((count, sum), (100, 5050));
}

#[tokio::test]
async fn execute_many_names_the_failing_row_and_applies_none() {
    let (db, engine) = common::engine().await;
    create_item(&engine).await;
    let mut rows = items(1..=1000);
    rows[500].0 = 7; // a duplicate of row 6
    let params = params(&rows);
    let error = engine
        .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
        .await
        .expect_err("a duplicate key");
    let failed = error.statement().expect("the failing row is named");
    assert_eq!(failed.index, 500, "{error}");
    assert_eq!(failed.sql, INSERT_ITEM);
    assert_eq!(error.code(), Some("23505"));
    assert_eq!(common::count(&engine, "item").await, 0);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn execute_many_refuses_a_row_of_the_wrong_length_before_sending() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let (one, two, label) = (1i32, 2i32, "x".to_owned());
    let rows: [&[&(dyn ToSql + Sync)]; 2] = [&[&one, &label], &[&two]];
    let error = engine
        .execute_many(INSERT_ITEM, rows)
        .await
        .expect_err("a short row");
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("row 1 has 1 values"), "{error}");
    assert_eq!(common::count(&engine, "item").await, 0);
}

#[tokio::test]
async fn execute_many_runs_in_the_transaction_it_is_given() {
    let (_db, engine) = common::engine().await;
    create_item(&engine).await;
    let rows = items(1..=3);
    let params = params(&rows);

    let tx = engine.begin().await.unwrap();
    let inserted = tx
        .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
        .await
        .unwrap();
    assert_eq!(inserted, 3);
    assert_eq!(common::count(&tx, "item").await, 3);
    tx.rollback().await.unwrap();
    assert_eq!(common::count(&engine, "item").await, 0);

    // The engine's ambient transaction: rolled back with it.
    let result = engine
        .transaction()
        .run(async |_tx| {
            engine
                .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
                .await?;
            assert_eq!(common::count(&engine, "item").await, 3);
            Err::<(), _>(Error::invalid_input("changed my mind"))
        })
        .await;
    assert!(result.is_err());
    assert_eq!(common::count(&engine, "item").await, 0);
}

#[tokio::test]
async fn execute_many_without_a_statement_cache_sends_unnamed_statements() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .statement_cache_capacity(0)
        .build()
        .await
        .unwrap();
    create_item(&engine).await;
    let rows = items(1..=100);
    let params = params(&rows);
    let inserted = engine
        .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
        .await
        .unwrap();
    assert_eq!(inserted, 100);
    let error = engine
        .execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]))
        .await
        .expect_err("duplicate keys");
    assert_eq!(error.statement().map(|failed| failed.index), Some(0));
    let prepared: i64 = engine
        .fetch_one("SELECT count(*) FROM pg_prepared_statements")
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 0, "nothing prepared by name");
    assert_eq!(common::count(&engine, "item").await, 100);
}

#[tokio::test]
async fn a_dropped_execute_many_applies_every_row_or_none() {
    let (db, engine) = common::engine_with(1).await;
    create_item(&engine).await;
    let (mut total, mut dropped) = (0, 0);
    for pendings in 0..6 {
        let first = total as i32 + 1;
        let rows = items(first..first + 20_000);
        let params = params(&rows);
        let request = engine.execute_many(INSERT_ITEM, params.iter().map(|row| &row[..]));
        let outcome = common::cancel_at_pending(request, pendings).await;
        let count = common::count(&engine, "item").await;
        match outcome {
            Some(result) => {
                assert_eq!(result.unwrap(), 20_000);
                assert_eq!(count, total + 20_000);
            }
            None => {
                dropped += 1;
                assert!(
                    count == total || count == total + 20_000,
                    "dropped at pending {pendings}: {count} rows, {total} before"
                );
            }
        }
        total = count;
    }
    assert!(dropped > 0, "no request was dropped before its answer");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn the_driver_reads_a_simple_batchs_last_command_tag() {
    let (_db, engine) = common::engine().await;
    let tags = engine
        .with_client(|client| {
            Box::pin(async move {
                let mut tags = Vec::new();
                for batch in [
                    "BEGIN; CREATE TEMP TABLE tagged (id int); COMMIT",
                    "BEGIN; SELECT 1/0",
                    "COMMIT", // of the transaction the error aborted
                    "SELECT 1; INSERT INTO tagged VALUES (1), (2)",
                    "",
                ] {
                    tags.push(client.batch_execute_tag(batch).await.map_err(|error| {
                        error.as_db_error().map(|db| db.code().code().to_owned())
                    }));
                }
                Ok::<_, pgengine::Error>(tags)
            })
        })
        .await
        .unwrap();
    assert_eq!(tags[0], Ok(Some("COMMIT".to_owned())));
    assert_eq!(tags[1], Err(Some("22012".to_owned())), "division by zero");
    assert_eq!(tags[2], Ok(Some("ROLLBACK".to_owned())));
    assert_eq!(tags[3], Ok(Some("INSERT 0 2".to_owned())));
    assert_eq!(tags[4], Ok(None));
}
