//! Multiplexing (`EngineBuilder::multiplex`): statements of many callers share a few
//! connections, pipelined. Every result and error reaches its own caller; session
//! state never crosses callers; an abandoned request is never cancelled on a shared
//! connection, and delays no one else; a slow statement delays at most the requests
//! queued behind it before it was seen to stall; a killed shared backend fails only its
//! requests in flight.

use crate::common::{self, count};

use std::time::{Duration, Instant};

use futures::future::join_all;
use pgengine::prelude::*;
use pgengine::{EngineBuilder, ErrorKind, SessionReset};
use pgengine_testing::TestDatabase;

/// An engine on a fresh database whose statements share `shared` connections.
async fn multiplexed(
    shared: usize,
    tune: impl FnOnce(EngineBuilder) -> EngineBuilder,
) -> (TestDatabase, PostgresEngine) {
    let db = TestDatabase::new().await.expect("test database");
    let builder = common::builder(&db).max_connections(8).multiplex(shared);
    let engine = tune(builder).build().await.expect("engine");
    (db, engine)
}

/// Waits (at most 5 s) until no shared connection has a request in flight.
async fn drained(engine: &PostgresEngine) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.pool_status().shared_in_flight > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        engine.pool_status().shared_in_flight,
        0,
        "requests left in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_callers_get_their_own_results_and_errors() {
    let (db, engine) = multiplexed(2, |b| b).await;
    engine
        .run_ddl("CREATE TABLE hits (task int, n int)")
        .await
        .unwrap();
    let callers = (0..64).map(|task: i32| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for n in 0..40 {
                if n % 5 == 4 {
                    let error = engine
                        .fetch(sql!("SELECT {}::int / ({}::int - {}::int)", n, task, task))
                        .await
                        .unwrap_err();
                    assert_eq!(error.code(), Some("22012"), "{error}");
                    failures += 1;
                } else if n % 2 == 0 {
                    let row = engine
                        .fetch_one(sql!("SELECT {}::int * 1000 + {}::int", task, n))
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), task * 1000 + n);
                } else {
                    let inserted = engine
                        .execute(sql!("INSERT INTO hits VALUES ({}, {})", task, n))
                        .await
                        .unwrap();
                    assert_eq!(inserted, 1);
                }
            }
            failures
        })
    });
    let failures: i32 = join_all(callers)
        .await
        .into_iter()
        .map(|caller| caller.unwrap())
        .sum();
    assert_eq!(failures, 64 * 8, "each caller saw exactly its own errors");
    let per_task = (0..40).filter(|n| n % 5 != 4 && n % 2 == 1).count() as i64;
    assert_eq!(count(&engine, "hits").await, 64 * per_task);
    let uneven: i64 = engine
        .fetch_one(
            "SELECT count(*) FROM (SELECT task FROM hits GROUP BY task HAVING count(*) <> 16) t",
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(per_task, 16);
    assert_eq!(uneven, 0, "every caller's inserts landed, once");
    let status = engine.pool_status();
    assert_eq!(status.shared, 2);
    assert!(status.multiplexed > 0, "{status:?}");
    assert!(status.size <= 8, "{status:?}");
    drained(&engine).await;
    common::assert_sessions_clean(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_never_reaches_another_callers_session() {
    let (_db, engine) = multiplexed(2, |b| b.session_reset(SessionReset::DiscardAll)).await;
    engine.start_connection_pool().await.unwrap();
    assert_eq!(
        engine.pool_status().shared,
        2,
        "the shared connections are open"
    );
    let default = common::show(&engine, "work_mem").await;
    let setters = (0..8).map(|_| {
        let engine = engine.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                engine.execute("SET work_mem = '1234kB'").await.unwrap();
                engine
                    .fetch("SELECT set_config('work_mem', '1234kB', false)")
                    .await
                    .unwrap();
            }
        })
    });
    let readers = (0..8).map(|_| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..30 {
                let row = engine
                    .fetch_one("SELECT current_setting('work_mem')")
                    .await
                    .unwrap();
                seen.push(row.get::<_, String>(0));
                seen.push(common::show(&engine, "work_mem").await);
            }
            seen
        })
    });
    let (setters, readers) = tokio::join!(join_all(setters), join_all(readers));
    setters.into_iter().for_each(|setter| setter.unwrap());
    for seen in readers {
        let seen = seen.unwrap();
        assert!(seen.iter().all(|value| *value == default), "{seen:?}");
    }
    assert!(engine.pool_status().multiplexed > 0);
}

#[tokio::test]
async fn session_statements_and_transactions_never_share_a_connection() {
    let (_db, engine) = multiplexed(1, |b| b).await;
    let multiplexed = || engine.pool_status().multiplexed;
    engine.fetch("SELECT 1").await.unwrap();
    let before = multiplexed();
    engine.fetch("SELECT 2").await.unwrap();
    assert_eq!(multiplexed(), before + 1, "a plain SELECT shares");

    let before = multiplexed();
    engine.execute("SET work_mem = '2MB'").await.unwrap();
    engine.fetch("SELECT pg_advisory_lock(7)").await.unwrap();
    engine.fetch("SELECT pg_advisory_unlock(7)").await.unwrap();
    engine
        .run_ddl("CREATE TEMP TABLE scratch (id int)")
        .await
        .unwrap();
    engine.exclusive().fetch("SELECT 3").await.unwrap();
    engine
        .transaction()
        .run(async |tx| {
            tx.fetch("SELECT 4").await?;
            engine.fetch("SELECT 5").await?; // the ambient transaction's connection
            Ok::<_, pgengine::Error>(())
        })
        .await
        .unwrap();
    let mut batch = engine
        .batch("SELECT generate_series(1, 10)", 3)
        .await
        .unwrap();
    while batch.next().await.unwrap().is_some() {}
    assert_eq!(multiplexed(), before, "none of these shared a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_in_a_storm_of_timeouts_never_cancel_anyone_else() {
    let (db, engine) = multiplexed(2, |b| b.max_connections(12)).await;
    let until = Instant::now() + Duration::from_millis(1500);
    let abandoners = (0..24).map(|_| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut abandoned = 0;
            while Instant::now() < until {
                let slow = engine.fetch("SELECT pg_sleep(0.02)");
                if tokio::time::timeout(Duration::from_millis(3), slow)
                    .await
                    .is_err()
                {
                    abandoned += 1;
                }
            }
            abandoned
        })
    });
    let victims = (0..16).map(|task: i32| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while Instant::now() < until {
                let row = engine
                    .fetch_one(sql!("SELECT {}::int, pg_sleep(0.001)", task))
                    .await
                    .unwrap_or_else(|error| panic!("a victim saw {error} ({:?})", error.code()));
                assert_eq!(row.get::<_, i32>(0), task);
                answered += 1;
            }
            answered
        })
    });
    let (abandoners, victims) = tokio::join!(join_all(abandoners), join_all(victims));
    let abandoned: i32 = abandoners.into_iter().map(|a| a.unwrap()).sum();
    let answered: i32 = victims.into_iter().map(|v| v.unwrap()).sum();
    assert!(
        abandoned > 0 && answered > 0,
        "{abandoned} abandoned, {answered} answered"
    );
    drained(&engine).await;
    engine.fetch_one("SELECT 1").await.unwrap();
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn an_abandoned_shared_request_runs_to_its_end() {
    let (_db, engine) = multiplexed(1, |b| b.multiplex_stall_after(Duration::from_secs(10))).await;
    engine
        .run_ddl("CREATE TABLE landed (id int)")
        .await
        .unwrap();
    let insert = engine.execute("INSERT INTO landed SELECT 1 FROM pg_sleep(0.3)");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), insert)
            .await
            .is_err()
    );
    assert!(engine.pool_status().shared_in_flight > 0, "it still runs");
    drained(&engine).await;
    assert_eq!(
        count(&engine, "landed").await,
        1,
        "not cancelled: it landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_statement_delays_at_most_the_requests_queued_before_it_stalled() {
    let (_db, engine) = multiplexed(1, |b| {
        b.multiplex_max_in_flight(4)
            .multiplex_stall_after(Duration::from_millis(10))
    })
    .await;
    engine.fetch("SELECT 1").await.unwrap();
    let slow = tokio::spawn({
        let engine = engine.clone();
        async move { engine.fetch("SELECT pg_sleep(1.5)").await }
    });
    // Queued at once behind the slow statement, before it is seen to stall.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let early = tokio::spawn({
        let engine = engine.clone();
        async move { fast_callers(&engine, 20).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.pool_status().shared_stalled, 1);
    // Once it stalls, no one waits for it.
    let late = fast_callers(&engine, 20).await;
    assert!(
        late.iter().all(|t| *t < Duration::from_secs(1)),
        "a caller waited for the stalled statement: {late:?}"
    );
    let early = early.await.unwrap();
    let delayed = early
        .iter()
        .filter(|t| **t > Duration::from_secs(1))
        .count();
    assert!(
        delayed <= 3,
        "{delayed} delayed, more than max_in_flight - 1: {early:?}"
    );
    slow.await.unwrap().unwrap();
    assert_eq!(engine.pool_status().shared_stalled, 0);
}

/// Runs `n` fast statements at once and returns how long each took.
async fn fast_callers(engine: &PostgresEngine, n: i32) -> Vec<Duration> {
    let callers = (0..n).map(|i| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let row = engine.fetch_one(sql!("SELECT {}::int", i)).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i);
            started.elapsed()
        })
    });
    join_all(callers)
        .await
        .into_iter()
        .map(|t| t.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shared_backend_fails_only_its_requests_in_flight() {
    let (db, engine) = multiplexed(1, |b| b.multiplex_stall_after(Duration::from_secs(30))).await;
    engine.fetch("SELECT 1").await.unwrap();
    let tx = engine.begin().await.unwrap();
    tx.fetch("SELECT 1").await.unwrap();
    let spawn = |sql: String| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.fetch(sql).await })
    };
    let mut in_flight = vec![spawn("SELECT pg_sleep(5)".to_owned())];
    let observer = db.connect().await.unwrap();
    let pid: i32 = loop {
        let rows = observer
            .query(
                "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            break row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Queued behind it on the same connection.
    in_flight.extend((1..6).map(|i| spawn(format!("SELECT {i}"))));
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.pool_status().shared_in_flight < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.pool_status().shared_in_flight, 6);
    let killed: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    for request in in_flight {
        let error = request.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    }
    // The transaction on its own connection is untouched, and the engine recovers.
    tx.execute("SELECT 2").await.unwrap();
    tx.commit().await.unwrap();
    let row = engine.fetch_one("SELECT 40 + 2").await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let status = engine.pool_status();
    assert_eq!(status.shared, 1, "{status:?}");
    assert!(status.closed_broken >= 1, "{status:?}");
}

#[tokio::test]
async fn a_schema_change_renews_the_shared_connections_statements() {
    let (_db, engine) = multiplexed(1, |b| b).await;
    engine.run_ddl("CREATE TABLE shape (a int)").await.unwrap();
    engine
        .execute("INSERT INTO shape VALUES (1)")
        .await
        .unwrap();
    assert_eq!(
        engine.fetch_one("SELECT * FROM shape").await.unwrap().len(),
        1
    );
    engine
        .run_ddl("ALTER TABLE shape ADD COLUMN b int")
        .await
        .unwrap();
    assert_eq!(
        engine.fetch_one("SELECT * FROM shape").await.unwrap().len(),
        2
    );
}

#[tokio::test]
async fn closing_the_pool_closes_the_shared_connections() {
    let (_db, engine) = multiplexed(2, |b| b).await;
    engine.fetch("SELECT 1").await.unwrap();
    assert!(engine.pool_status().shared >= 1);
    engine.close_connection_pool().await;
    let status = engine.pool_status();
    assert_eq!((status.shared, status.size), (0, 0), "{status:?}");
    let error = engine.fetch("SELECT 1").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Closed, "{error}");
}

#[tokio::test]
async fn the_shared_connections_must_leave_room_in_the_pool() {
    let db = TestDatabase::new().await.unwrap();
    let error = common::builder(&db)
        .max_connections(4)
        .multiplex(4)
        .build()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("max_connections"), "{error}");
}

#[tokio::test]
async fn a_shared_connection_past_max_lifetime_is_replaced() {
    let (_db, engine) = multiplexed(1, |b| b.max_lifetime(Duration::from_millis(300))).await;
    engine.fetch("SELECT 1").await.unwrap();
    let created = engine.pool_status().created;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let row = engine.fetch_one("SELECT 2").await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let status = engine.pool_status();
    assert_eq!(status.shared, 1, "{status:?}");
    assert!(
        status.created > created,
        "a new connection replaced it: {status:?}"
    );
}

/// A statement's future dropped at each await of opening a shared connection (taking
/// it, resetting its session, running the after-connect hook again): no session is
/// ever left without the hook's setting, for a later user of the pool or the slot.
#[tokio::test]
async fn a_future_dropped_while_a_shared_connection_opens_leaves_no_half_reset_session() {
    for pendings in 0..8 {
        let (_db, engine) = multiplexed(1, |b| {
            b.after_connect(|client| {
                Box::pin(async move { client.batch_execute("SET work_mem = '3MB'").await })
            })
        })
        .await;
        common::cancel_at_pending(engine.fetch("SELECT 1"), pendings).await;
        // The pool's connections first (the one dropped half-way is among them), then
        // the shared one.
        let own =
            futures::future::join_all((0..8).map(|_| common::show(&engine, "work_mem"))).await;
        assert!(
            own.iter().all(|w| w == "3MB"),
            "dropped at await {pendings}: {own:?}"
        );
        engine.start_connection_pool().await.unwrap();
        let shared: String = engine
            .fetch_one("SELECT current_setting('work_mem')")
            .await
            .unwrap()
            .get(0);
        assert_eq!(shared, "3MB", "dropped at await {pendings}");
    }
}
