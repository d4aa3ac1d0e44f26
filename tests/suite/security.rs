//! Security findings (issue 17) against a real server: no secret in any output, hostile
//! input fails cleanly, one statement means one statement. One test per finding.

use crate::common::{self, Event, capture_events};

use std::sync::Mutex;

use pgengine::prelude::*;
use pgengine::{ErrorKind, PostgresEngine, QueryString};
use pgengine_testing::TestDatabase;

/// The connection-string forms the driver accepts, each with the password `s3cret`
/// (or `s3 cret`), as the issue lists them.
const CONNECTION_STRINGS: &[&str] = &[
    "postgres://app:s3cret@localhost/app",
    "postgresql://app:s3cret@localhost:5433/app?application_name=x",
    "postgres://app:s3%63ret@localhost/app",
    "host=localhost password=s3cret user=app",
    "host=localhost password = s3cret user=app",
    "host=localhost\tpassword\t=\ts3cret\tuser=app",
    "host=localhost\npassword=s3cret\nuser=app",
    "host=localhost password='s3 cret' user=app",
    "host=localhost password=s3\\ cret user=app",
    "host=localhost password='s3\\'cret' user=app",
    "postgres://app@localhost/app?password=s3cret",
    "postgres://app@localhost/app?pass%77ord=s3cret",
    "postgres://app@localhost/app?%70assword=s3cret&dbname=app",
    "postgres://app:first-s3cret@localhost/app?password=s3cret",
    "postgres://app@localhost/app?password=s3cret@x",
    "postgres://app@localhost/app?sslmode=disable&password=s3cret",
];

/// Finding 2: `Debug` of a builder shows whether a password is set, never the password,
/// for every connection-string form; a string the driver refuses is not shown at all.
#[test]
fn builder_debug_never_shows_the_password() {
    let secrets = ["s3cret", "s3 cret", "s3%63ret", "s3\\ cret", "s3\\'cret"];
    for url in CONNECTION_STRINGS {
        assert!(
            url.parse::<tokio_postgres::Config>().is_ok(),
            "the driver accepts {url:?}"
        );
        let shown = format!("{:?}", PostgresEngine::builder().url(*url));
        for secret in secrets {
            assert!(!shown.contains(secret), "{url:?} shows {shown}");
        }
        assert!(
            shown.contains("password: Some(_)"),
            "{url:?} shows whether a password is set: {shown}"
        );
    }

    let parts = PostgresEngine::builder()
        .url("postgres://app@localhost/app")
        .password("s3cret");
    let shown = format!("{parts:?}");
    assert!(
        !shown.contains("s3cret") && shown.contains("password: Some(_)"),
        "{shown}"
    );

    for refused in [
        "postgres://app:s3cret@localhost:notaport/app",
        "host=localhost password='s3cret",
    ] {
        let shown = format!("{:?}", PostgresEngine::builder().url(refused));
        assert!(!shown.contains("s3cret"), "{refused:?} shows {shown}");
    }
}

/// Finding 2, the built engine: its `Debug` and the error of a failed build show no
/// password either.
#[tokio::test]
async fn engine_debug_and_connect_errors_never_show_the_password() {
    let (db, engine) = common::engine_with(1).await;
    assert!(!format!("{engine:?}").contains("s3cret"));
    let err = common::builder(&db)
        .url("postgres://nobody:s3cret@127.0.0.1:1/app?password=s3cret")
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
}

/// The text of every `pgengine::query` event whose query failed.
fn failed_query_events(events: &Mutex<Vec<Event>>) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.target == "pgengine::query" && e.text.contains(" error="))
        .map(|e| e.text.clone())
        .collect()
}

/// Finding 3: with `log_arguments(false)` a failed query's event names the SQLSTATE,
/// table and constraint, but not the server's message or detail, which quote the values
/// (`Key (email)=(alice@…) already exists`, `value "4111…" is out of range`). With
/// `log_arguments(true)` the whole error is logged, as asked.
#[tokio::test]
async fn failed_query_log_leaves_values_out_without_log_arguments() {
    let db = TestDatabase::new().await.unwrap();
    for log_arguments in [false, true] {
        let engine = common::builder(&db)
            .log_queries(true)
            .log_arguments(log_arguments)
            .build()
            .await
            .unwrap();
        engine
            .run_ddl(
                "DROP TABLE IF EXISTS member; \
                 CREATE TABLE member (email text CONSTRAINT member_email_key UNIQUE, card int)",
            )
            .await
            .unwrap();
        let (events, guard) = capture_events();
        let insert = || {
            sql!(
                "INSERT INTO member (email) VALUES ({})",
                "alice@example.com"
            )
        };
        engine.execute(insert()).await.unwrap();
        let err = engine.execute(insert()).await.unwrap_err();
        assert!(err.is_unique_violation(), "{err}");
        let err = engine
            .execute(sql!(
                "INSERT INTO member (card) VALUES ({}::text::int)",
                "4111111111111111"
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("22003"), "{err}");
        // In a pipelined bundle too.
        let mut atomic = engine.atomic();
        atomic.add("SELECT 1").add(insert());
        assert!(atomic.run().await.unwrap_err().is_unique_violation());
        drop(guard);

        // The bundle's own COMMIT, refused after its failed statement, is logged too
        // (25P02, no value in it): only the three failing inserts are counted.
        let failed: Vec<_> = failed_query_events(&events)
            .into_iter()
            .filter(|text| !text.contains("COMMIT"))
            .collect();
        assert_eq!(failed.len(), 3, "{failed:#?}");
        for text in &failed {
            let shows_values = text.contains("alice") || text.contains("4111");
            assert_eq!(shows_values, log_arguments, "{text}");
        }
        if !log_arguments {
            assert!(failed[0].contains("23505"), "{}", failed[0]);
            assert!(failed[0].contains("table member"), "{}", failed[0]);
            assert!(failed[0].contains("member_email_key"), "{}", failed[0]);
            assert!(failed[1].contains("22003"), "{}", failed[1]);
            assert!(failed[2].contains("23505"), "{}", failed[2]);
        }
        engine.close_connection_pool().await;
    }
}

/// Whether the table `victim` still exists.
async fn victim_exists(engine: &PostgresEngine) -> bool {
    engine
        .fetch_one("SELECT to_regclass('victim') IS NOT NULL")
        .await
        .unwrap()
        .get(0)
}

/// Finding 4: where one statement is meant, a second one stacked behind a `;` is
/// refused by the server and never runs: a batch in a transaction (a cursor), in the
/// ambient one, out of one, `fetch`, `execute`, and pipelined bundles of parameterless
/// statements.
#[tokio::test]
async fn one_statement_never_runs_a_stacked_second() {
    let (db, engine) = common::engine_with(2).await;
    engine
        .run_ddl("CREATE TABLE victim (id int)")
        .await
        .unwrap();
    const STACKED: &str = "SELECT 1; DROP TABLE victim";

    let tx = engine.begin().await.unwrap();
    let err = tx.batch(STACKED, 10).await.unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    tx.rollback().await.unwrap();
    assert!(victim_exists(&engine).await, "tx.batch dropped the table");

    let err = engine
        .transaction()
        .run(async |_tx| engine.batch(STACKED, 10).await.map(drop))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    assert!(
        victim_exists(&engine).await,
        "an ambient batch dropped the table"
    );

    let err = engine.batch(STACKED, 10).await.unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    let err = engine.fetch(STACKED).await.unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    let err = engine.execute(STACKED).await.unwrap_err();
    assert_eq!(err.code(), Some("42601"), "{err}");
    assert!(victim_exists(&engine).await);

    // Bundles: the stacked text first (its count wanted) and last (its rows wanted).
    for bundle in [vec![STACKED, "SELECT 2"], vec!["SELECT 2", STACKED]] {
        let mut atomic = engine.atomic();
        atomic.add_all(bundle.clone());
        let err = atomic.run().await.unwrap_err();
        assert_eq!(err.code(), Some("42601"), "{bundle:?}: {err}");
        let err = engine
            .execute(
                bundle
                    .iter()
                    .map(|s| QueryString::raw(*s))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("42601"), "{bundle:?}: {err}");
        assert!(victim_exists(&engine).await, "{bundle:?} dropped the table");
    }

    // A bundle of parameterless single statements still counts rows as before.
    let mut atomic = engine.atomic();
    atomic
        .add("INSERT INTO victim VALUES (1), (2)")
        .add("UPDATE victim SET id = id + 1")
        .add("SELECT 1");
    atomic.run().await.unwrap();
    let counted = engine
        .execute(vec![
            QueryString::raw("INSERT INTO victim VALUES (3)"),
            QueryString::raw("DELETE FROM victim"),
        ])
        .await
        .unwrap();
    assert_eq!(counted, 1 + 3);
    common::assert_sessions_clean(&db).await;
}

/// Runs the ignored test `name` of this file in a child process limited to 2 GiB of
/// address space, with `url` as its database: a crash there (an allocation failure, a
/// stack overflow) fails the calling test without taking this test run down.
async fn run_in_child(name: &str, url: Option<&str>) {
    let exe = std::env::current_exe().unwrap();
    let mut child = tokio::process::Command::new("sh");
    child
        .arg("-c")
        .arg(r#"ulimit -v 2097152 && exec "$0" --exact "$1" --ignored"#)
        .arg(exe)
        .arg(format!("security::{name}"));
    if let Some(url) = url {
        child.env(CHILD_URL, url);
    }
    let output = child.output().await.unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{name} failed: {report}");
    assert!(report.contains("1 passed"), "{name} did not run: {report}");
}

/// The database URL that [`run_in_child`] gives a child process.
const CHILD_URL: &str = "PGENGINE_SECURITY_CHILD_URL";

/// An engine on the database of the parent test in a child process (or, when the test
/// is run by itself with `--ignored`, on a fresh database, returned to keep it alive).
async fn child_engine() -> (Option<TestDatabase>, PostgresEngine) {
    let (db, url) = match std::env::var(CHILD_URL) {
        Ok(url) => (None, url),
        Err(_) => {
            let db = TestDatabase::new().await.unwrap();
            let url = db.url().to_owned();
            (Some(db), url)
        }
    };
    let engine = PostgresEngine::builder()
        .url(url)
        .max_connections(2)
        .build()
        .await
        .unwrap();
    (db, engine)
}

/// Finding 5: the largest `batch_size` neither reserves memory for that many rows (the
/// bug: 154 GB up front, which aborted the process) nor overflows `FETCH`'s count, out
/// of a transaction (streamed) and in one (a cursor); one more is refused, as is
/// `usize::MAX`. In a child process with 2 GiB of address space.
#[tokio::test]
async fn huge_batch_size_is_bounded() {
    let db = TestDatabase::new().await.unwrap();
    run_in_child("huge_batch_size_child", Some(db.url())).await;
}

/// Runs in the child process of [`huge_batch_size_is_bounded`].
#[tokio::test]
#[ignore = "run by huge_batch_size_is_bounded, in a child process"]
async fn huge_batch_size_child() {
    let (_db, engine) = child_engine().await;
    let largest = i32::MAX as usize;
    let query = "SELECT g FROM generate_series(1, 5000) g";
    let all = |rows: Vec<pgengine::Row>| rows.iter().map(|r| r.get(0)).collect::<Vec<i32>>();
    let expected: Vec<i32> = (1..=5000).collect();

    let mut batch = engine.batch(query, largest).await.unwrap();
    assert_eq!(all(batch.next().await.unwrap().unwrap()), expected);
    assert!(batch.next().await.unwrap().is_none());

    let tx = engine.begin().await.unwrap();
    let mut batch = tx.batch(query, largest).await.unwrap();
    assert_eq!(all(batch.next().await.unwrap().unwrap()), expected);
    assert!(batch.next().await.unwrap().is_none());
    tx.commit().await.unwrap();

    for refused in [largest + 1, usize::MAX, 0] {
        let err = engine.batch(query, refused).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{refused}: {err}");
        let tx = engine.begin().await.unwrap();
        let err = tx.batch(query, refused).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{refused}: {err}");
        tx.commit().await.unwrap();
    }
}

/// `SELECT (…(SELECT $1::int)…)`, `depth` levels of nested queries around one parameter.
fn nested(depth: usize) -> QueryString {
    let mut query = sql!("SELECT {}::int", 1);
    for _ in 0..depth {
        query = QueryString::new("SELECT ({})").arg(query);
    }
    query
}

/// Finding 6 (queries): a `QueryString` nested 5,000, 10,000 and 100,000 deep (the
/// depth the docs state) compiles and drops on a 2 MiB thread; an error deep inside is
/// still a clean `InvalidInput`. In a child process.
#[tokio::test]
async fn deeply_nested_queries_compile_and_drop_on_a_small_stack() {
    run_in_child("deep_nesting_child", None).await;
}

/// Runs in the child process of [`deeply_nested_queries_compile_and_drop_on_a_small_stack`].
#[test]
#[ignore = "run by deeply_nested_queries_compile_and_drop_on_a_small_stack, in a child process"]
fn deep_nesting_child() {
    let on_small_stack = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(|| {
            for depth in [5_000, 10_000, 100_000] {
                let query = nested(depth);
                let compiled = query.compile().unwrap();
                assert_eq!(compiled.params().len(), 1);
                assert_eq!(compiled.sql().matches("SELECT (").count(), depth);
                assert!(
                    compiled
                        .sql()
                        .ends_with(&format!("$1::int{}", ")".repeat(depth)))
                );
                drop(compiled);
                drop(query);
            }
            let mut broken = QueryString::new("SELECT {}, {}").arg(1);
            for _ in 0..100_000 {
                broken = QueryString::new("SELECT ({})").arg(broken);
            }
            let err = broken.compile().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(
                err.to_string().contains("2 placeholders but 1 argument"),
                "{err}"
            );
        })
        .unwrap();
    on_small_stack.join().expect("no stack overflow");
}

/// Finding 6 (queries), against the server: a nested query runs; one nested deeper than
/// the server's parser takes is the server's error, and the engine goes on. In a child
/// process.
#[tokio::test]
async fn deeply_nested_queries_run_or_fail_cleanly() {
    let db = TestDatabase::new().await.unwrap();
    run_in_child("deep_nesting_on_the_server_child", Some(db.url())).await;
}

/// Runs in the child process of [`deeply_nested_queries_run_or_fail_cleanly`].
#[tokio::test]
#[ignore = "run by deeply_nested_queries_run_or_fail_cleanly, in a child process"]
async fn deep_nesting_on_the_server_child() {
    let (_db, engine) = child_engine().await;
    let value: i32 = engine.fetch_one(nested(100)).await.unwrap().get(0);
    assert_eq!(value, 1);
    let err = engine.fetch_one(nested(100_000)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Database, "{err}");
    let value: i32 = engine.fetch_one("SELECT 2").await.unwrap().get(0);
    assert_eq!(value, 2);
}

/// The depths of nested savepoint transactions that the docs promise on a 2 MiB thread
/// in a debug build (see `TransactionBuilder::nested`).
const SAVEPOINT_DEPTHS: [usize; 2] = [10, 40];

/// Finding 6 (transactions): `Nested::Savepoint` transactions nested 40 levels deep run
/// on a 2 MiB thread in a debug build (the bug: about 100 KB of stack per level, an
/// overflow before 20; now about 40 KB, most of it the test body's own futures); every
/// level's row is kept, and a failure at the deepest level rolls back only that level.
/// In a child process, so an overflow cannot take the run down.
#[tokio::test]
async fn deeply_nested_savepoint_transactions_fit_a_small_stack() {
    let db = TestDatabase::new().await.unwrap();
    run_in_child("deep_savepoints_child", Some(db.url())).await;
}

/// Nests savepoint transactions from `level` to `depth`, each inserting its level; the
/// deepest one fails when `fail_deepest`. (Recursion in async code is boxed by the
/// caller, as always in Rust.)
fn nest(
    engine: PostgresEngine,
    level: usize,
    depth: usize,
    fail_deepest: bool,
) -> futures::future::LocalBoxFuture<'static, pgengine::Result<()>> {
    Box::pin(async move {
        let inner = engine.clone();
        let result = engine
            .transaction()
            .nested(pgengine::Nested::Savepoint)
            .run(async |tx| {
                let level = level as i32;
                tx.execute(pgengine::sql!("INSERT INTO level VALUES ({})", level))
                    .await?;
                if level as usize == depth {
                    if fail_deepest {
                        tx.execute("SELECT 1 / 0").await?;
                    }
                    return Ok(());
                }
                nest(inner.clone(), level as usize + 1, depth, fail_deepest).await
            })
            .await;
        // Only the deepest level fails; every other level swallows nothing.
        match (level == depth, fail_deepest) {
            (true, true) => {
                assert!(result.is_err(), "the deepest level fails");
                Ok(())
            }
            _ => result,
        }
    })
}

/// Runs in the child process of [`deeply_nested_savepoint_transactions_fit_a_small_stack`].
#[test]
#[ignore = "run by deeply_nested_savepoint_transactions_fit_a_small_stack, in a child process"]
fn deep_savepoints_child() {
    let on_small_stack = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (_db, engine) = child_engine().await;
                engine
                    .run_ddl("CREATE TABLE level (n int PRIMARY KEY)")
                    .await
                    .unwrap();
                for depth in SAVEPOINT_DEPTHS {
                    for fail_deepest in [false, true] {
                        engine.execute("DELETE FROM level").await.unwrap();
                        let outer = engine.clone();
                        engine
                            .transaction()
                            .run(async |_tx| nest(outer.clone(), 1, depth, fail_deepest).await)
                            .await
                            .unwrap();
                        let kept: i64 = engine
                            .fetch_one("SELECT count(*) FROM level")
                            .await
                            .unwrap()
                            .get(0);
                        let expected = if fail_deepest { depth - 1 } else { depth };
                        assert_eq!(
                            kept as usize, expected,
                            "depth {depth}, fail {fail_deepest}"
                        );
                    }
                }
            });
        })
        .unwrap();
    on_small_stack.join().expect("no stack overflow");
}
