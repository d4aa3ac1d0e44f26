//! Pool lifecycle against a real server: max_lifetime, idle_timeout down to
//! min_connections, min_connections kept warm, the after-connect hook (SQL and
//! function), the session reset policy, the health check, and the pool counters.
//! Every wait polls for the expected state with a generous deadline.

use crate::common::{self, backend_pid, show};

use std::time::Duration;

use pgengine::prelude::*;
use pgengine::{ErrorKind, SessionReset};
use tokio::time::Instant;

/// Generous: the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it holds, panicking with `what` after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_older_than_max_lifetime_is_replaced() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .max_lifetime(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let first = backend_pid(&engine).await;
    eventually("a new session replaces the old one", || async {
        backend_pid(&engine).await != first
    })
    .await;
    assert!(engine.pool_status().closed_max_lifetime >= 1);
    assert!(engine.pool_status().created >= 2);
}

#[tokio::test]
async fn idle_connections_close_after_idle_timeout_down_to_min_connections() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(4)
        .min_connections(1)
        .idle_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    engine.start_connection_pool().await.unwrap();
    eventually("the idle connections close, one stays", || async {
        engine.pool_status().size == 1
    })
    .await;
    eventually("the server sees one session of ours", || async {
        common::session_states(&db).await.len() == 1
    })
    .await;
    assert!(engine.pool_status().closed_idle >= 1);
    // The one kept warm still works.
    assert_eq!(
        engine.fetch_one("SELECT 1").await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn min_connections_are_opened_and_kept_warm() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(5)
        .min_connections(3)
        .build()
        .await
        .unwrap();
    eventually("three connections open", || async {
        engine.pool_status().size >= 3
    })
    .await;
    // A connection killed on the server is replaced.
    let observer = db.connect().await.unwrap();
    observer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&common::application_name(&db)],
        )
        .await
        .unwrap();
    // (A query may still meet a killed session before the pool has noticed.)
    eventually("three working connections open again", || async {
        let works = engine.fetch_one("SELECT 1").await.is_ok();
        let sessions = common::session_states(&db).await.len();
        works && engine.pool_status().size >= 3 && sessions >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_after_connect_sql_runs_once_per_connection() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    db.connect()
        .await
        .unwrap()
        .batch_execute("CREATE SCHEMA app; CREATE TABLE public.hook_runs (pid int)")
        .await
        .unwrap();
    let engine = common::builder(&db)
        .max_connections(3)
        .after_connect_sql(
            "SET search_path TO app, public; INSERT INTO public.hook_runs VALUES (pg_backend_pid())",
        )
        .build()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { show(&engine, "search_path").await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), "app, public");
    }
    let row = engine
        .fetch_one("SELECT count(*), count(DISTINCT pid) FROM public.hook_runs")
        .await
        .unwrap();
    let (runs, sessions): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(runs, sessions, "once per connection");
    assert_eq!(runs as u64, engine.pool_status().created);
}

#[tokio::test]
async fn the_after_connect_function_runs_on_new_connections() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(2)
        .after_connect(|client| {
            Box::pin(async move { client.batch_execute("SET timezone TO 'Asia/Tokyo'").await })
        })
        .build()
        .await
        .unwrap();
    assert_eq!(show(&engine, "timezone").await, "Asia/Tokyo");
    // A failing hook fails the connection with the server's error.
    let failing = common::builder(&db)
        .after_connect_sql("SET no_such_setting TO 1")
        .build()
        .await
        .unwrap_err();
    assert!(failing.to_string().contains("no_such_setting"), "{failing}");
}

#[tokio::test]
async fn by_default_a_session_keeps_what_its_last_user_set() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    engine.run_ddl("SET work_mem = '7MB'").await.unwrap();
    assert_eq!(show(&engine, "work_mem").await, "7MB");
}

#[tokio::test]
async fn discard_all_leaves_no_session_state_behind_but_keeps_the_hook() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .session_reset(SessionReset::DiscardAll)
        .after_connect_sql("SET timezone TO 'Asia/Tokyo'")
        .build()
        .await
        .unwrap();
    let pid = backend_pid(&engine).await;
    engine
        .run_ddl("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (id int); LISTEN news")
        .await
        .unwrap();
    engine
        .fetch_one("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    // The same session, reset.
    assert_eq!(backend_pid(&engine).await, pid);
    assert_ne!(show(&engine, "work_mem").await, "7MB");
    assert_eq!(show(&engine, "timezone").await, "Asia/Tokyo");
    let temp: i64 = engine
        .fetch_one("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'")
        .await
        .unwrap()
        .get(0);
    assert_eq!(temp, 0);
    let listening: i64 = engine
        .fetch_one("SELECT count(*) FROM pg_listening_channels()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 0);
    let locks: i64 = engine
        .fetch_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0);
    // Prepared statements survive the reset.
    for n in 0..3_i32 {
        let row = engine.fetch_one(sql!("SELECT {}::int", n)).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), n);
    }
}

#[tokio::test]
async fn a_dead_idle_connection_is_not_handed_out() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .health_check_after(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let first = backend_pid(&engine).await;
    let observer = db.connect().await.unwrap();
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    eventually("the killed session is gone", || async {
        common::session_states(&db).await.is_empty()
    })
    .await;
    assert_ne!(backend_pid(&engine).await, first);
    let status = engine.pool_status();
    assert!(
        status.closed_unhealthy + status.closed_broken >= 1,
        "{status:?}"
    );
}

/// What the server last ran on the engine's one pooled connection when the pool hands
/// it out again after `idle`, before anything else is sent on it.
async fn last_query_after_idle(
    db: &pgengine_testing::TestDatabase,
    engine: &PostgresEngine,
    idle: Duration,
) -> String {
    let observer = db.connect().await.unwrap();
    let pid = backend_pid(engine).await;
    tokio::time::sleep(idle).await;
    engine
        .with_client(|_client| {
            Box::pin(async move {
                let row = observer
                    .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
                    .await
                    .map_err(pgengine::Error::from)?;
                Ok::<_, pgengine::Error>(row.get(0))
            })
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_connection_idle_past_health_check_after_is_checked_before_reuse() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .health_check_after(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // Idle past the bound: an empty query went out before the hand-out.
    let idle = Duration::from_millis(600);
    assert_eq!(last_query_after_idle(&db, &engine, idle).await, "");
    // Not idle long enough: handed out as it was left.
    assert_eq!(
        last_query_after_idle(&db, &engine, Duration::ZERO).await,
        "SELECT pg_backend_pid()"
    );
    // The default bound is 60 s.
    let default = common::builder(&db)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    assert_eq!(
        last_query_after_idle(&db, &default, idle).await,
        "SELECT pg_backend_pid()"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_counts_waits_and_timeouts() {
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = common::builder(&db)
        .max_connections(1)
        .pool_wait_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let tx = engine.begin().await.unwrap();
    let other = engine.clone();
    let waited = tokio::spawn(async move { other.fetch_one("SELECT 1").await.map(drop) })
        .await
        .unwrap();
    assert_eq!(waited.unwrap_err().kind(), ErrorKind::PoolTimeout);
    tx.rollback().await.unwrap();
    let status = engine.pool_status();
    assert!(status.waits >= 1, "{status:?}");
    assert!(status.timeouts >= 1, "{status:?}");
    assert!(status.wait_time > Duration::ZERO, "{status:?}");
    assert!(status.created >= 1, "{status:?}");
}
