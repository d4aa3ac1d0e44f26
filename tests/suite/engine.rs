//! The engine against a real server: queries, errors, pool behaviour, version,
//! extensions and query logging.
use crate::common::{self, capture_events};

use std::time::{Duration, Instant};

use pgengine::prelude::*;
use pgengine::{ErrorKind, ServerVersion};
use pgengine_testing::TestDatabase;

/// Each query method does what it says, on a real table.
#[tokio::test]
async fn query_methods_return_rows_counts_and_errors() {
    let (_db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY, popularity int); CREATE INDEX ON band (popularity)")
        .await
        .unwrap();
    let inserted = engine
        .execute(sql!(
            "INSERT INTO band VALUES ({}, {}), ({}, {})",
            "Pythonistas",
            1000,
            "Rustaceans",
            2000
        ))
        .await
        .unwrap();
    assert_eq!(inserted, 2);

    let rows = engine
        .fetch("SELECT name, popularity FROM band ORDER BY popularity")
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].get::<_, &str>("name"), "Rustaceans");
    assert_eq!(rows[1].get::<_, i32>(1), 2000);

    let one = engine
        .fetch_one(sql!(
            "SELECT popularity FROM band WHERE name = {}",
            "Pythonistas"
        ))
        .await
        .unwrap();
    assert_eq!(one.get::<_, i32>(0), 1000);

    let none = engine
        .fetch_one(sql!("SELECT 1 FROM band WHERE name = {}", "nobody"))
        .await
        .unwrap_err();
    assert_eq!(none.kind(), ErrorKind::RowNotFound);
    assert!(none.to_string().contains("none"), "{none}");
    let many = engine.fetch_one("SELECT name FROM band").await.unwrap_err();
    assert_eq!(many.kind(), ErrorKind::TooManyRows);

    assert!(
        engine
            .fetch_optional(sql!("SELECT 1 FROM band WHERE name = {}", "nobody"))
            .await
            .unwrap()
            .is_none()
    );
    let found = engine
        .fetch_optional(sql!(
            "SELECT popularity FROM band WHERE name = {}",
            "Rustaceans"
        ))
        .await
        .unwrap()
        .expect("a row");
    assert_eq!(found.get::<_, i32>(0), 2000);

    let updated = engine
        .execute(sql!("UPDATE band SET popularity = popularity + {}", 1))
        .await
        .unwrap();
    assert_eq!(updated, 2);

    let via_querystring = engine
        .run_querystring(sql!(
            "SELECT count(*) FROM band WHERE popularity > {}",
            1500
        ))
        .await
        .unwrap();
    assert_eq!(via_querystring[0].get::<_, i64>(0), 1);
}

/// A query of several statements runs them in order, all or nothing.
#[tokio::test]
async fn multi_statement_query_is_all_or_nothing() {
    let (_db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let rows = engine
        .fetch(vec![
            sql!("INSERT INTO t VALUES ({})", 1),
            sql!("INSERT INTO t VALUES ({})", 2),
            QueryString::raw("SELECT count(*) FROM t"),
        ])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 2);

    let err = engine
        .execute(vec![
            sql!("INSERT INTO t VALUES ({})", 3),
            sql!("INSERT INTO t VALUES ({})", 1),
        ])
        .await
        .unwrap_err();
    assert!(err.is_unique_violation(), "{err}");
    assert_eq!(err.statement().map(|s| s.index), Some(1));
    let count: i64 = engine
        .fetch_one("SELECT count(*) FROM t")
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count, 2,
        "the first insert of the failed query was rolled back"
    );
}

/// Invalid SQL is a database error with SQLSTATE 42601 and the position of the fault.
#[tokio::test]
async fn invalid_sql_is_a_syntax_error_with_position() {
    let (_db, engine) = common::engine().await;
    let err = engine.fetch("SELECT * FROMM nowhere").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Database);
    assert_eq!(err.code(), Some("42601"));
    let db = err.database_error().unwrap();
    assert_eq!(db.position, Some(10)); // at "FROMM"
    assert!(err.to_string().contains("42601"), "{err}");
    // The connection is still good.
    assert_eq!(
        engine.fetch_one("SELECT 1").await.unwrap().get::<_, i32>(0),
        1
    );
}

/// Wrong argument count and unique violations are reported clearly, before/after sending.
#[tokio::test]
async fn wrong_argument_count_is_invalid_input_and_unique_violation_is_detected() {
    let (_db, engine) = common::engine().await;
    // (`sql!` with a literal template refuses this at compile time.)
    let err = engine
        .fetch(QueryString::new("SELECT {}, {}").arg(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("2 placeholders but 1 argument"),
        "{err}"
    );

    engine
        .run_ddl("CREATE TABLE u (id int PRIMARY KEY)")
        .await
        .unwrap();
    engine
        .execute(sql!("INSERT INTO u VALUES ({})", 1))
        .await
        .unwrap();
    let dup = engine
        .execute(sql!("INSERT INTO u VALUES ({})", 1))
        .await
        .unwrap_err();
    assert!(dup.is_unique_violation());
    assert_eq!(
        dup.database_error().unwrap().constraint.as_deref(),
        Some("u_pkey")
    );
    assert!(!dup.is_serialization_failure() && !dup.is_deadlock());
}

/// 500 concurrent queries on a pool of 4 all succeed: they queue for connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_queries_share_a_small_pool() {
    let (_db, engine) = common::engine_with(4).await;
    let queries = (0..500).map(|i| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let row = engine.fetch_one(sql!("SELECT {}::int * 2", i)).await?;
            Ok::<_, pgengine::Error>(row.get::<_, i32>(0) == i * 2)
        })
    });
    let results = futures::future::join_all(queries).await;
    assert!(results.into_iter().all(|r| r.unwrap().unwrap()));
    assert!(engine.pool_status().size <= 4);
}

/// With every connection taken, a query waits at most the pool wait timeout, then fails.
#[tokio::test]
async fn exhausted_pool_times_out_instead_of_hanging() {
    let db = TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .pool_wait_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let holder = engine.begin().await.unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::spawn({
            let engine = engine.clone();
            async move { engine.fetch("SELECT 1").await }
        })
        .await
        .unwrap()
    })
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    holder.rollback().await.unwrap();
    assert_eq!(
        engine.fetch_one("SELECT 1").await.unwrap().get::<_, i32>(0),
        1
    );
}

/// A port where nothing listens is a connect error, at once.
#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = PostgresEngine::connect(&format!("postgres://postgres@127.0.0.1:{port}/x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
}

/// A server that accepts but never answers is a connect error within the connect timeout.
#[tokio::test]
async fn silent_server_is_a_connect_error_within_the_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // never answer
        }
    });
    let started = Instant::now();
    let err = PostgresEngine::builder()
        .url(format!("postgres://postgres@127.0.0.1:{port}/x"))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    silent.abort();
}

/// After close_connection_pool, queries fail with `Closed`; close waits for connections in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_pool_refuses_queries_and_waits_for_borrowed_connections() {
    let (db, engine) = common::engine().await;
    engine.start_connection_pool().await.unwrap();
    engine.start_connection_pool().await.unwrap(); // twice is harmless
    assert_eq!(engine.pool_status().size, 8);
    let states = common::session_states(&db).await;
    assert_eq!(states.len(), 8, "{states:?}");

    let tx = engine.begin().await.unwrap();
    let closing = tokio::spawn({
        let engine = engine.clone();
        async move { engine.close_connection_pool().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !closing.is_finished(),
        "close waits for the borrowed connection"
    );
    let err = engine.fetch("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .expect("close finishes once the connection is back")
        .unwrap();
    assert_eq!(engine.pool_status().size, 0);
    engine.close_connection_pool().await; // twice is harmless
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::session_states(&db).await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(common::session_states(&db).await.is_empty());
}

/// The server version is parsed, and the known formats parse.
#[tokio::test]
async fn server_version_is_parsed() {
    let (_db, engine) = common::engine().await;
    let version = engine.get_version().await.unwrap();
    let reported: String = engine
        .fetch_one("SHOW server_version")
        .await
        .unwrap()
        .get(0);
    assert!(reported.starts_with(&format!("{}.{}", version.major, version.minor)));
    assert!(version >= ServerVersion::MINIMUM_SUPPORTED);

    let cases = [
        ("16.10", (16, 10)),
        ("18beta1", (18, 0)),
        ("12.4 (Ubuntu 12.4-0ubuntu0.20.04.1)", (12, 4)),
        ("9.6.24", (9, 6)),
        ("15devel", (15, 0)),
    ];
    for (text, (major, minor)) in cases {
        assert_eq!(
            text.parse::<ServerVersion>().unwrap(),
            ServerVersion { major, minor },
            "{text}"
        );
    }
    for bad in ["", "beta", "x16"] {
        assert_eq!(
            bad.parse::<ServerVersion>().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}

/// Configured extensions are created; a missing privilege is a warning; other errors fail.
#[tokio::test]
async fn extensions_are_created_or_warned_about() {
    let db = TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .extensions(["pg_trgm"])
        .build()
        .await
        .unwrap();
    let installed: i64 = engine
        .fetch_one("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'")
        .await
        .unwrap()
        .get(0);
    assert_eq!(installed, 1);

    let missing = common::builder(&db)
        .extensions(["no_such_extension"])
        .build()
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Database, "{missing}");

    // A role without the privilege: a warning, and the engine still builds.
    let role = format!("{}_plain", db.name());
    engine
        .run_ddl(&format!(
            "CREATE ROLE {role} LOGIN; GRANT ALL ON DATABASE {} TO {role}",
            db.name()
        ))
        .await
        .unwrap();
    let (events, _guard) = capture_events();
    let plain = common::builder(&db)
        .user(&role)
        .extensions(["pg_buffercache"])
        .build()
        .await
        .expect("no privilege is not an error");
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.level == tracing::Level::WARN && e.text.contains("pg_buffercache")),
        "a warning names the extension"
    );
    plain.close_connection_pool().await;
    engine.close_connection_pool().await;
    let cleanup = db.connect().await.unwrap();
    cleanup
        .batch_execute(&format!(
            "REVOKE ALL ON DATABASE {} FROM {role}; DROP ROLE {role}",
            db.name()
        ))
        .await
        .unwrap();
}

/// `log_queries` emits one event per query with id, SQL, argument count and duration,
/// and never the argument values unless asked.
#[tokio::test]
async fn log_queries_emits_one_event_per_query() {
    let db = TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .log_queries(true)
        .build()
        .await
        .unwrap();
    let (events, _guard) = capture_events();
    for i in 0..3 {
        engine
            .fetch(sql!("SELECT {}::text AS secret", format!("hunter{i}")))
            .await
            .unwrap();
    }
    let events = events.lock().unwrap();
    let queries: Vec<_> = events
        .iter()
        .filter(|e| e.target == "pgengine::query" && e.text.contains("message=query"))
        .collect();
    assert_eq!(queries.len(), 3, "{events:?}");
    for event in &queries {
        assert!(
            event.text.contains("sql=SELECT $1::text AS secret"),
            "{}",
            event.text
        );
        assert!(event.text.contains("args=1"), "{}", event.text);
        assert!(event.text.contains("duration_us="), "{}", event.text);
        assert!(event.text.contains("query_id="), "{}", event.text);
        assert!(
            !event.text.contains("hunter"),
            "argument values stay out: {}",
            event.text
        );
    }
}

/// The slow-query threshold logs at WARN even without log_queries.
#[tokio::test]
async fn slow_queries_are_warned_about() {
    let db = TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .slow_query_threshold(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let (events, _guard) = capture_events();
    engine.fetch("SELECT 1").await.unwrap();
    engine.fetch("SELECT pg_sleep(0.6)").await.unwrap();
    let events = events.lock().unwrap();
    let slow: Vec<_> = events
        .iter()
        .filter(|e| e.level == tracing::Level::WARN && e.text.contains("slow query"))
        .collect();
    assert_eq!(slow.len(), 1, "{events:?}");
    assert!(slow[0].text.contains("pg_sleep"));
}

/// `Debug` of a builder or an engine never shows the password.
#[tokio::test]
async fn debug_output_hides_the_password() {
    let builder = PostgresEngine::builder()
        .url("postgres://app:hunter2@localhost:5432/app")
        .password("s3cret-part");
    let shown = format!("{builder:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret-part"),
        "{shown}"
    );
    let (_db, engine) = common::engine().await;
    assert!(!format!("{engine:?}").contains("password: Some(\""));
}

/// A bad URL is a configuration error.
#[tokio::test]
async fn bad_url_is_a_config_error() {
    let err = PostgresEngine::connect("postgres://[::1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A cached prepared statement whose table changed shape is prepared again, not an error.
#[tokio::test]
async fn cached_statement_survives_a_table_change() {
    let (_db, engine) = common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE s (a int); INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    assert_eq!(engine.fetch("SELECT * FROM s").await.unwrap()[0].len(), 1);
    engine
        .run_ddl("ALTER TABLE s ADD COLUMN b int DEFAULT 2")
        .await
        .unwrap();
    let rows = engine.fetch("SELECT * FROM s").await.unwrap();
    assert_eq!(rows[0].len(), 2);
    assert_eq!(rows[0].get::<_, i32>("b"), 2);
}

/// A query abandoned mid-flight (its future dropped) is cancelled on the server, and the
/// connection is reused clean: the next query neither waits for it nor is disturbed.
#[tokio::test]
async fn abandoned_query_is_cancelled_and_the_connection_reused() {
    let (db, engine) = common::engine_with(1).await;
    let pid: i32 = engine
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        engine.fetch("SELECT pg_sleep(30)"),
    )
    .await;
    assert!(abandoned.is_err(), "the query was still running");
    let started = Instant::now();
    let again: i32 = engine
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(again, pid, "the same connection, reused");
    common::assert_sessions_clean(&db).await;
}

/// The cancel of an abandoned query never lands on a later one: the connection is
/// reused only once the server has acted on the cancel. Abandoned at every moment
/// around its natural end (before it is sent, while it runs, as it finishes), the
/// next query on the same connection, long enough for a late cancel to hit it, runs
/// undisturbed each time, and it is the same session all along.
async fn abandon_around_the_end_and_reuse(engine: &PostgresEngine, rounds: u64) {
    let pid = "SELECT pg_backend_pid() FROM pg_sleep(0.01)";
    let first: i32 = engine.fetch_one(pid).await.unwrap().get(0);
    for round in 0..rounds {
        let patience = Duration::from_micros(round % 50 * 100);
        let _ = tokio::time::timeout(patience, engine.execute("SELECT pg_sleep(0.002)")).await;
        let next = engine.fetch_one(pid).await;
        let next: i32 = next
            .unwrap_or_else(|e| panic!("round {round} ({patience:?}): {e}"))
            .get(0);
        assert_eq!(next, first, "round {round}: the connection was replaced");
    }
}

/// See [`abandon_around_the_end_and_reuse`]; over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_never_hits_the_next_query() {
    let (db, engine) = common::engine_with(1).await;
    abandon_around_the_end_and_reuse(&engine, 150).await;
    common::assert_sessions_clean(&db).await;
}

/// See [`abandon_around_the_end_and_reuse`]; over the server's unix socket (the
/// harness's own cluster only: a `DATABASE_URL` server's socket is not known).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_never_hits_the_next_query_over_a_unix_socket() {
    let server = pgengine_testing::server().unwrap();
    let Some(cluster) = server.cluster() else {
        eprintln!("DATABASE_URL is set: no unix socket known, nothing to check");
        return;
    };
    let db = TestDatabase::new().await.unwrap();
    let url = format!(
        "host={} port={} user=postgres dbname={}",
        cluster.socket_dir().display(),
        cluster.port(),
        db.name(),
    );
    let engine = PostgresEngine::builder()
        .url(&url)
        .application_name(&common::application_name(&db))
        .max_connections(1)
        .build()
        .await
        .unwrap();
    abandon_around_the_end_and_reuse(&engine, 50).await;
    common::assert_sessions_clean(&db).await;
}

/// With several hosts configured, each session knows the host it reached: the cancel
/// of an abandoned query is confirmed there, and its connection is reused, as with one
/// host.
#[tokio::test]
async fn with_several_hosts_an_abandoned_query_is_cancelled_and_its_connection_reused() {
    let db = TestDatabase::new().await.unwrap();
    let url: tokio_postgres::Config = db.url().parse().unwrap();
    let host = match &url.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(name) => name.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let port = url.get_ports().first().copied().unwrap_or(5432);
    let engine = common::builder(&db)
        .host(&host)
        .host(&host)
        .port(port)
        .port(port)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    let pid = "SELECT pg_backend_pid()";
    let first: i32 = engine.fetch_one(pid).await.unwrap().get(0);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        engine.execute("SELECT pg_sleep(60)"),
    )
    .await;
    assert!(abandoned.is_err(), "the query was still running");
    let started = Instant::now();
    let next: i32 = engine.fetch_one(pid).await.unwrap().get(0);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(next, first, "the connection was replaced");

    let observer = db.connect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sleeping: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&first],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned query still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::assert_sessions_clean(&db).await;
}

/// `log_responses` reports each answer's row count at DEBUG.
#[tokio::test]
async fn log_responses_reports_row_counts() {
    let db = TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .log_responses(true)
        .build()
        .await
        .unwrap();
    let (events, _guard) = capture_events();
    engine.fetch("SELECT generate_series(1, 3)").await.unwrap();
    let events = events.lock().unwrap();
    let responses: Vec<_> = events
        .iter()
        .filter(|e| e.level == tracing::Level::DEBUG && e.text.contains("message=response"))
        .collect();
    assert_eq!(responses.len(), 1, "{events:?}");
    assert!(
        responses[0].text.contains("rows=3"),
        "{}",
        responses[0].text
    );
}

/// A session killed under the engine: at worst that query fails with a clear error;
/// the dead connection is replaced and the next query works.
#[tokio::test]
async fn killed_session_is_replaced() {
    let (db, engine) = common::engine_with(1).await;
    let pid: i32 = engine
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let observer = db.connect().await.unwrap();
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // pg_terminate_backend only signals; wait until the session is really gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while observer
        .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .len()
        == 1
    {
        assert!(Instant::now() < deadline, "the session did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match engine.fetch("SELECT 1").await {
        Ok(_) => {}
        Err(e) => assert!(
            e.kind() == ErrorKind::Connection || e.code() == Some("57P01"),
            "{e}"
        ),
    }
    let again: i32 = engine
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_ne!(again, pid, "a new session");
}

/// The whole server gone: queries fail fast with a connection or connect error, no hang.
#[tokio::test]
async fn server_gone_is_an_error_not_a_hang() {
    let cluster = pgengine_testing::EphemeralCluster::start().unwrap();
    let engine = PostgresEngine::builder()
        .url(cluster.url())
        .max_connections(2)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    engine.start_connection_pool().await.unwrap();
    cluster.stop().unwrap();
    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(10), engine.fetch("SELECT 1"))
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Connection | ErrorKind::Connect)
                || err.code() == Some("57P01"),
            "{err}"
        );
    }
}
