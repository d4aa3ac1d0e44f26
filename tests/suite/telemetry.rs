//! Spans shaped as OpenTelemetry database client spans: per query, per transaction
//! attempt, per batch, with the semantic-convention fields, nested as the work is.

use std::time::Duration;

use crate::common::{self, SpanRecord, capture_spans};

use pgengine::prelude::*;
use pgengine::{Error, RetryPolicy, sql};
use pgengine_testing::TestDatabase;

/// The spans named `name`, in the order they opened.
fn named<'a>(spans: &'a [SpanRecord], name: &str) -> Vec<(usize, &'a SpanRecord)> {
    spans
        .iter()
        .enumerate()
        .filter(|(_, span)| span.name == name)
        .collect()
}

fn port_of(db: &TestDatabase) -> String {
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string()
}

#[tokio::test]
async fn a_query_span_has_the_database_fields_and_no_argument_value() {
    let (db, engine) = common::engine().await;
    let (spans, _guard) = capture_spans();
    let value: i32 = engine
        .fetch_one(sql!("SELECT {}::int + 1", 424_242))
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, 424_243);
    let spans = spans.lock().unwrap().clone();
    let queries = named(&spans, "query");
    let (_, query) = queries
        .iter()
        .find(|(_, span)| span.field("db.query.text") == Some("SELECT $1::int + 1"))
        .expect("a span for the query");
    assert_eq!(query.target, "pgengine::query");
    assert_eq!(query.field("db.system.name"), Some("postgresql"));
    assert_eq!(query.field("db.namespace"), Some(db.name()));
    assert_eq!(query.field("db.operation.name"), Some("SELECT"));
    assert_eq!(query.field("otel.name"), Some("SELECT"));
    assert_eq!(query.field("otel.kind"), Some("client"));
    assert!(query.field("server.address").is_some_and(|a| !a.is_empty()));
    assert_eq!(query.field("server.port"), Some(port_of(&db).as_str()));
    assert_eq!(query.field("error.type"), None);
    assert!(query.closed);
    let everything = format!("{spans:?}");
    assert!(
        !everything.contains("424242"),
        "an argument value in a span"
    );
}

#[tokio::test]
async fn a_failed_query_span_carries_the_sqlstate() {
    let (_db, engine) = common::engine().await;
    common::create_band(&engine).await;
    engine
        .execute(common::insert_band("Pythonistas"))
        .await
        .unwrap();
    let (spans, _guard) = capture_spans();
    let error = engine
        .execute("INSERT INTO band (name) SELECT name FROM band")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("23505"));
    let spans = spans.lock().unwrap().clone();
    let (_, insert) = named(&spans, "query")
        .into_iter()
        .find(|(_, span)| span.field("db.operation.name") == Some("INSERT"))
        .expect("a span for the insert");
    assert_eq!(insert.field("db.response.status_code"), Some("23505"));
    assert_eq!(insert.field("error.type"), Some("23505"));
    assert_eq!(insert.field("otel.status_code"), Some("ERROR"));
}

/// Both forms: the closure's queries (BEGIN and COMMIT included) and a guard's queries
/// are children of the transaction's span, which says how it ended.
#[tokio::test]
async fn a_transaction_span_holds_its_queries_and_outcome() {
    let (_db, engine) = common::engine().await;
    common::create_band(&engine).await;
    let (spans, _guard) = capture_spans();
    engine
        .transaction()
        .run(async |tx| tx.execute(common::insert_band("Rustaceans")).await)
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    tx.execute(common::insert_band("C-Sharps")).await.unwrap();
    tx.rollback().await.unwrap();
    drop(tx);

    let spans = spans.lock().unwrap().clone();
    let transactions = named(&spans, "transaction");
    assert_eq!(transactions.len(), 2, "{spans:#?}");
    let outcomes: Vec<_> = transactions
        .iter()
        .map(|(_, span)| span.field("db.transaction.outcome"))
        .collect();
    assert_eq!(outcomes, [Some("commit"), Some("rollback")]);
    for (index, transaction) in &transactions {
        assert_eq!(transaction.target, "pgengine::transaction");
        assert_eq!(transaction.field("pgengine.attempt"), Some("1"));
        assert!(transaction.closed);
        let children: Vec<_> = spans
            .iter()
            .filter(|span| span.parent == Some(*index))
            .filter_map(|span| span.field("db.operation.name"))
            .collect();
        let expected = if *index == transactions[0].0 {
            ["BEGIN", "INSERT", "COMMIT"]
        } else {
            ["BEGIN", "INSERT", "ROLLBACK"]
        };
        assert_eq!(children, expected, "{spans:#?}");
    }
}

/// A retried transaction has a span per attempt, numbered, each with its outcome.
#[tokio::test]
async fn each_attempt_of_a_retried_transaction_has_its_span() {
    let (_db, engine) = common::engine().await;
    let (spans, _guard) = capture_spans();
    let attempts = std::cell::Cell::new(0);
    engine
        .transaction()
        .retry(RetryPolicy::new(3).initial_backoff(Duration::from_millis(1)))
        .run(async |tx| {
            attempts.set(attempts.get() + 1);
            if attempts.get() == 1 {
                tx.execute(
                    "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001', \
                     MESSAGE = 'serialization'; END $$",
                )
                .await?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(attempts.get(), 2);
    let spans = spans.lock().unwrap().clone();
    let transactions: Vec<_> = named(&spans, "transaction")
        .into_iter()
        .map(|(_, span)| {
            (
                span.field("pgengine.attempt").unwrap_or_default(),
                span.field("db.transaction.outcome").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(transactions, [("1", "rollback"), ("2", "commit")]);
    let failed = named(&spans, "query")
        .into_iter()
        .find(|(_, span)| span.field("db.operation.name") == Some("DO"))
        .expect("the failing statement's span");
    assert_eq!(failed.1.field("error.type"), Some("40001"));
}

/// A batch has one span for all its rows; inside a transaction its cursor's
/// statements are its children.
#[tokio::test]
async fn a_batch_span_counts_its_rows() {
    let (_db, engine) = common::engine().await;
    let (spans, _guard) = capture_spans();
    let sql = "SELECT g FROM generate_series(1, 25) g";
    let mut batch = engine.batch(sql, 10).await.unwrap();
    let mut rows = 0;
    while let Some(next) = batch.next().await.unwrap() {
        rows += next.len();
    }
    assert_eq!(rows, 25);
    drop(batch);
    engine
        .transaction()
        .run(async |tx| {
            let mut batch = tx.batch(sql, 10).await?;
            while batch.next().await?.is_some() {}
            Ok::<_, Error>(())
        })
        .await
        .unwrap();

    let spans = spans.lock().unwrap().clone();
    let batches = named(&spans, "batch");
    assert_eq!(batches.len(), 2, "{spans:#?}");
    for (_, batch) in &batches {
        assert_eq!(batch.target, "pgengine::batch");
        assert_eq!(batch.field("db.query.text"), Some(sql));
        assert_eq!(batch.field("db.response.returned_rows"), Some("25"));
        assert_eq!(batch.field("pgengine.batch_size"), Some("10"));
        assert!(batch.closed);
    }
    let (in_tx, in_tx_batch) = batches[1];
    assert_eq!(
        spans[in_tx_batch.parent.expect("a parent")].name,
        "transaction"
    );
    let fetches = spans
        .iter()
        .filter(|span| span.parent == Some(in_tx))
        .filter_map(|span| span.field("db.operation.name"))
        .collect::<Vec<_>>();
    assert_eq!(
        fetches,
        ["DECLARE", "FETCH", "FETCH", "FETCH", "CLOSE"],
        "{spans:#?}"
    );
}
