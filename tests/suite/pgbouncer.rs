//! Through a real pgbouncer in transaction mode (server pool of 5), with
//! `statement_cache_capacity=0`: every feature works, nothing leans on a named prepared
//! statement, and totals are exact under 50 concurrent tasks.

use crate::common;

use pgengine::prelude::*;
use pgengine::{Error, PostgresEngine};
use pgengine_testing::{PgBouncer, TestDatabase};

/// A fresh database, a pgbouncer in front of it, and an engine through the pooler.
async fn through_pgbouncer(max_connections: usize) -> (TestDatabase, PgBouncer, PostgresEngine) {
    let db = TestDatabase::new().await.expect("test database");
    let bouncer = PgBouncer::in_front_of(db.url(), 5).expect("pgbouncer");
    let url = format!("{}?statement_cache_capacity=0", bouncer.url_for(db.name()));
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(max_connections)
        .build()
        .await
        .expect("engine through pgbouncer");
    engine
        .run_ddl("CREATE TABLE account (id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL)")
        .await
        .expect("table");
    (db, bouncer, engine)
}

async fn total(engine: &PostgresEngine) -> i64 {
    engine
        .fetch_one("SELECT coalesce(sum(balance), 0)::bigint FROM account")
        .await
        .expect("total")
        .get(0)
}

/// No "prepared statement … does not exist / already exists" (26000, 42P05).
fn assert_no_statement_clash(result: &Result<impl std::fmt::Debug, Error>) {
    if let Err(error) = result {
        assert!(
            !matches!(error.code(), Some("26000") | Some("42P05")),
            "a named prepared statement leaked through the pooler: {error}"
        );
        panic!("unexpected error: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameterized_queries_of_every_shape() {
    let (_db, _bouncer, engine) = through_pgbouncer(8).await;
    for id in 0..20 {
        let inserted = engine
            .execute(sql!(
                "INSERT INTO account VALUES ({}, {}, {})",
                id,
                format!("owner-{id}"),
                100_i64
            ))
            .await;
        assert_no_statement_clash(&inserted);
    }
    let row = engine
        .fetch_one(sql!(
            "SELECT owner, balance FROM account WHERE id = {} AND owner = {}",
            7,
            "owner-7"
        ))
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "owner-7");
    assert_eq!(row.get::<_, i64>(1), 100);
    let ids: Vec<i32> = engine
        .fetch(sql!(
            "SELECT id FROM account WHERE id = ANY({}) ORDER BY id",
            vec![3_i32, 5, 8]
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [3, 5, 8]);
    let none = engine
        .fetch_optional(sql!("SELECT id FROM account WHERE owner = {}", "nobody"))
        .await
        .unwrap();
    assert!(none.is_none());
    // Several statements, pipelined in one transaction.
    let updated = engine
        .execute(vec![
            sql!(
                "UPDATE account SET balance = balance - {} WHERE id = {}",
                10_i64,
                1
            ),
            sql!(
                "UPDATE account SET balance = balance + {} WHERE id = {}",
                10_i64,
                2
            ),
        ])
        .await;
    assert_no_statement_clash(&updated);
    assert_eq!(updated.unwrap(), 2);
    assert_eq!(total(&engine).await, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_transaction_forms_and_savepoints() {
    let (_db, _bouncer, engine) = through_pgbouncer(8).await;
    // The closure form.
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(sql!(
                "INSERT INTO account VALUES ({}, {}, {})",
                1,
                "a",
                50_i64
            ))
            .await?;
            tx.execute(sql!(
                "INSERT INTO account VALUES ({}, {}, {})",
                2,
                "b",
                50_i64
            ))
            .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    // The explicit form, with a savepoint rolled back and one released.
    let tx = engine.begin().await.unwrap();
    tx.execute(sql!(
        "UPDATE account SET balance = balance + {} WHERE id = {}",
        25_i64,
        1
    ))
    .await
    .unwrap();
    let undone = tx.savepoint(Some("undone")).await.unwrap();
    tx.execute(sql!(
        "INSERT INTO account VALUES ({}, {}, {})",
        3,
        "c",
        1000_i64
    ))
    .await
    .unwrap();
    undone.rollback_to().await.unwrap();
    let kept = tx.savepoint(Some("kept")).await.unwrap();
    tx.execute(sql!(
        "INSERT INTO account VALUES ({}, {}, {})",
        4,
        "d",
        5_i64
    ))
    .await
    .unwrap();
    kept.release().await.unwrap();
    tx.commit().await.unwrap();
    // An explicit transaction rolled back leaves nothing.
    let tx = engine.begin().await.unwrap();
    tx.execute(sql!(
        "INSERT INTO account VALUES ({}, {}, {})",
        5,
        "e",
        7_i64
    ))
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(total(&engine).await, 50 + 50 + 25 + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_bundles_commit_or_roll_back_whole() {
    let (_db, _bouncer, engine) = through_pgbouncer(8).await;
    let mut atomic = engine.atomic();
    for id in 0..10 {
        atomic.add(sql!(
            "INSERT INTO account VALUES ({}, {}, {})",
            id,
            "x",
            10_i64
        ));
    }
    atomic.run().await.unwrap();
    let mut failing = engine.atomic();
    failing
        .add(sql!(
            "INSERT INTO account VALUES ({}, {}, {})",
            100,
            "y",
            1_i64
        ))
        .add(sql!(
            "INSERT INTO account VALUES ({}, {}, {})",
            0,
            "duplicate",
            1_i64
        ));
    let error = failing.run().await.unwrap_err();
    assert_eq!(error.code(), Some("23505"), "{error}");
    // Inside a transaction, the bundle joins it.
    engine
        .transaction()
        .run(async |_tx| {
            let mut inner = engine.atomic();
            inner.add(sql!(
                "UPDATE account SET balance = balance + {} WHERE id = {}",
                1_i64,
                0
            ));
            inner.run().await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(total(&engine).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_and_out_of_a_transaction() {
    let (_db, _bouncer, engine) = through_pgbouncer(8).await;
    let mut atomic = engine.atomic();
    for id in 0..250 {
        atomic.add(sql!(
            "INSERT INTO account VALUES ({}, {}, {})",
            id,
            "x",
            2_i64
        ));
    }
    atomic.run().await.unwrap();
    let mut batch = engine
        .batch(
            sql!(
                "SELECT balance FROM account WHERE balance = {} ORDER BY id",
                2_i64
            ),
            40,
        )
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(rows) = batch.next().await.unwrap() {
        assert!(rows.len() <= 40);
        seen += rows.len();
    }
    assert_eq!(seen, 250);
    let tx = engine.begin().await.unwrap();
    tx.execute(sql!(
        "INSERT INTO account VALUES ({}, {}, {})",
        1000,
        "new",
        2_i64
    ))
    .await
    .unwrap();
    let mut batch = tx
        .batch(sql!("SELECT id FROM account WHERE balance = {}", 2_i64), 64)
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(rows) = batch.next().await.unwrap() {
        seen += rows.len();
    }
    assert_eq!(seen, 251, "the batch sees the transaction's own row");
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tasks_over_a_pooler_pool_of_five() {
    let (_db, _bouncer, engine) = through_pgbouncer(20).await;
    let mut atomic = engine.atomic();
    for id in 0..10 {
        atomic.add(sql!(
            "INSERT INTO account VALUES ({}, {}, {})",
            id,
            "x",
            0_i64
        ));
    }
    atomic.run().await.unwrap();
    let tasks: Vec<_> = (0..50_i64)
        .map(|task| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for round in 0..10_i64 {
                    let id = ((task + round) % 10) as i32;
                    let result = if round % 2 == 0 {
                        engine
                            .execute(sql!(
                                "UPDATE account SET balance = balance + {} WHERE id = {}",
                                1_i64,
                                id
                            ))
                            .await
                    } else {
                        engine
                            .transaction()
                            .run(async move |tx| {
                                tx.execute(sql!(
                                    "UPDATE account SET balance = balance + {} WHERE id = {}",
                                    1_i64,
                                    id
                                ))
                                .await
                            })
                            .await
                    };
                    assert_no_statement_clash(&result);
                    assert_eq!(result.unwrap(), 1);
                    let read = engine
                        .fetch_one(sql!("SELECT balance FROM account WHERE id = {}", id))
                        .await;
                    assert_no_statement_clash(&read);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(total(&engine).await, 500);
}

#[tokio::test]
async fn statement_cache_capacity_in_the_url_is_checked() {
    let error = PostgresEngine::builder()
        .url("postgres://postgres@127.0.0.1:1/x?statement_cache_capacity=lots")
        .build()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), pgengine::ErrorKind::Config);
    assert!(
        error.to_string().contains("statement_cache_capacity"),
        "{error}"
    );
}

/// The named statements the engine's one connection holds on the server.
async fn prepared_on_server(engine: &PostgresEngine) -> i64 {
    engine
        .fetch_one(sql!(
            "SELECT count(*) FROM pg_prepared_statements WHERE name <> {}",
            ""
        ))
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_statement_cache_is_bounded() {
    let db = TestDatabase::new().await.expect("test database");
    let engine = common::builder(&db)
        .max_connections(1)
        .statement_cache_capacity(3)
        .build()
        .await
        .unwrap();
    for n in 0..20_i32 {
        let text = format!("SELECT {{}}::int + {n}");
        let row = engine
            .fetch_one(QueryString::new(text).arg(n))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 2 * n);
    }
    // Evicted statements are closed on the server, too.
    assert!(prepared_on_server(&engine).await <= 3);
}

#[tokio::test]
async fn capacity_zero_prepares_nothing() {
    let db = TestDatabase::new().await.expect("test database");
    let engine = common::builder(&db)
        .max_connections(1)
        .statement_cache_capacity(0)
        .build()
        .await
        .unwrap();
    engine
        .execute(sql!("SELECT {}::text, {}::bigint", "a", 1_i64))
        .await
        .unwrap();
    assert_eq!(prepared_on_server(&engine).await, 0);
}

#[tokio::test]
async fn statement_cache_capacity_in_the_url_is_applied_and_removed() {
    let db = TestDatabase::new().await.expect("test database");
    let separator = if db.url().contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{separator}statement_cache_capacity=0&application_name=kept",
        db.url()
    );
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    engine.execute(sql!("SELECT {}::int", 1)).await.unwrap();
    assert_eq!(prepared_on_server(&engine).await, 0);
    let name: String = engine
        .fetch_one("SHOW application_name")
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "kept", "the URL's other parameters are kept");
}
