//! Fault injection against a real PostgreSQL: backends terminated at every phase, a
//! storm of terminations under concurrent writers, a server stopped and restarted under
//! load. What must hold: a connection that failed is never handed out again, every
//! transaction that returned `Ok` is saved, none that failed definitely is, and a
//! commit whose outcome cannot be known says so.

use crate::common::{self, backend_pid};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgengine::prelude::*;
use pgengine::{Error, ErrorKind};
use pgengine_testing::{EphemeralCluster, TestDatabase};

/// Waits (at most 30 s) until session `pid` runs a statement (state `active`).
async fn wait_until_active(observer: &tokio_postgres::Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = observer
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&pid],
            )
            .await
            .unwrap();
        if row.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session {pid} never became active"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Terminates session `pid` and waits (at most 30 s) until it is gone, then lets the
/// client read the server's goodbye.
async fn terminate(observer: &tokio_postgres::Client, pid: i32) {
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while observer
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "session {pid} was not terminated"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that the next query on the pool of one succeeds at once, on a new session.
async fn next_query_runs_on_a_new_session(engine: &PostgresEngine, old_pid: i32) {
    let pid = backend_pid(engine).await;
    assert_ne!(pid, old_pid, "the failed session was handed out again");
}

async fn observer(db: &TestDatabase) -> tokio_postgres::Client {
    db.connect().await.expect("observer connection")
}

#[tokio::test]
async fn a_session_killed_while_idle_in_the_pool_is_replaced() {
    let (db, engine) = common::engine_with(1).await;
    let observer = observer(&db).await;
    let pid = backend_pid(&engine).await;
    terminate(&observer, pid).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    next_query_runs_on_a_new_session(&engine, pid).await;
}

#[tokio::test]
async fn a_session_killed_mid_query_is_a_connection_error_and_is_discarded() {
    let (db, engine) = common::engine_with(1).await;
    let observer = observer(&db).await;
    let pid = backend_pid(&engine).await;
    let (query, ()) = tokio::join!(engine.fetch("SELECT pg_sleep(60)"), async {
        wait_until_active(&observer, pid).await;
        terminate(&observer, pid).await;
    });
    let error = query.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert_eq!(error.code(), Some("57P01"), "the server's FATAL is kept");
    // No wait here: the FATAL alone marks the connection broken.
    next_query_runs_on_a_new_session(&engine, pid).await;
}

/// `item (id)` whose deferred constraint trigger sleeps `seconds` at COMMIT.
async fn create_slow_commit_table(engine: &PostgresEngine, seconds: u32) {
    engine
        .run_ddl(&format!(
            "CREATE TABLE item (id int PRIMARY KEY);
             CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON item
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check()"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_session_killed_while_commit_is_in_flight_is_outcome_unknown() {
    let (db, engine) = common::engine_with(1).await;
    create_slow_commit_table(&engine, 60).await;
    let observer = observer(&db).await;
    let tx = engine.begin().await.unwrap();
    let pid = backend_pid(&tx).await;
    tx.execute("INSERT INTO item VALUES (1)").await.unwrap();
    let (commit, ()) = tokio::join!(tx.commit(), async {
        wait_until_active(&observer, pid).await;
        terminate(&observer, pid).await;
    });
    let error = commit.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CommitOutcomeUnknown, "{error}");
    assert!(error.is_outcome_unknown());
    next_query_runs_on_a_new_session(&engine, pid).await;
    // Checked on the server: the COMMIT was interrupted in its trigger.
    assert_eq!(common::count(&engine, "item").await, 0);
}

#[tokio::test]
async fn a_session_killed_before_commit_is_sent_is_a_definite_failure() {
    let (db, engine) = common::engine_with(1).await;
    engine.run_ddl("CREATE TABLE item (id int)").await.unwrap();
    let observer = observer(&db).await;
    let tx = engine.begin().await.unwrap();
    let pid = backend_pid(&tx).await;
    tx.execute("INSERT INTO item VALUES (1)").await.unwrap();
    terminate(&observer, pid).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the client reads the goodbye
    let error = tx.commit().await.unwrap_err();
    assert!(!error.is_outcome_unknown(), "{error}");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    next_query_runs_on_a_new_session(&engine, pid).await;
    assert_eq!(common::count(&engine, "item").await, 0);
}

#[tokio::test]
async fn a_session_killed_mid_atomic_is_discarded() {
    let (db, engine) = common::engine_with(1).await;
    engine.run_ddl("CREATE TABLE item (id int)").await.unwrap();
    let observer = observer(&db).await;
    let pid = backend_pid(&engine).await;
    let mut atomic = engine.atomic();
    atomic
        .add("INSERT INTO item VALUES (1)")
        .add("SELECT pg_sleep(60)")
        .add("INSERT INTO item VALUES (2)");
    let (run, ()) = tokio::join!(atomic.run(), async {
        wait_until_active(&observer, pid).await;
        terminate(&observer, pid).await;
    });
    let error = run.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    next_query_runs_on_a_new_session(&engine, pid).await;
    assert_eq!(common::count(&engine, "item").await, 0);
}

const SLOW_ROWS: &str = "SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g";

#[tokio::test]
async fn a_session_killed_mid_batch_is_discarded() {
    let (db, engine) = common::engine_with(1).await;
    let observer = observer(&db).await;
    let pid = backend_pid(&engine).await;
    let mut batch = engine.batch(SLOW_ROWS, 10).await.unwrap();
    assert_eq!(batch.next().await.unwrap().unwrap().len(), 10);
    terminate(&observer, pid).await;
    let error = loop {
        match batch.next().await {
            Ok(Some(_)) => continue, // rows read ahead before the kill
            Ok(None) => panic!("the batch ended although its session was killed"),
            Err(error) => break error,
        }
    };
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    drop(batch);
    next_query_runs_on_a_new_session(&engine, pid).await;
}

#[tokio::test]
async fn a_session_killed_mid_cursor_batch_in_a_transaction_is_discarded() {
    let (db, engine) = common::engine_with(1).await;
    let observer = observer(&db).await;
    let tx = engine.begin().await.unwrap();
    let pid = backend_pid(&tx).await;
    let mut batch = tx.batch(SLOW_ROWS, 10).await.unwrap();
    assert_eq!(batch.next().await.unwrap().unwrap().len(), 10);
    let (next, ()) = tokio::join!(batch.next(), async {
        wait_until_active(&observer, pid).await;
        terminate(&observer, pid).await;
    });
    assert_eq!(next.unwrap_err().kind(), ErrorKind::Connection);
    drop(batch);
    let commit = tx.commit().await.unwrap_err();
    assert!(!commit.is_outcome_unknown(), "{commit}");
    next_query_runs_on_a_new_session(&engine, pid).await;
}

#[tokio::test]
async fn seventy_thousand_parameters_are_refused_before_sending() {
    let (_db, engine) = common::engine_with(1).await;
    let template = vec!["{}"; 70_000].join(", ");
    let query = (0..70_000).fold(
        QueryString::new(format!("SELECT {template}")),
        |query, i| query.arg(i),
    );
    let tx = engine.begin().await.unwrap();
    let error = tx.fetch(query).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    let message = error.to_string();
    assert!(
        message.contains("65535") && message.contains("70000"),
        "{message}"
    );
    // Nothing reached the server: the transaction goes on and commits.
    tx.fetch_one("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_zero_statement_timeout_means_none() {
    let (_db, engine) = common::engine_with(1).await;
    let setting: String = engine
        .transaction()
        .statement_timeout(Duration::ZERO)
        .run(async |tx| {
            tx.execute("SELECT pg_sleep(0.05)").await?;
            Ok::<_, Error>(tx.fetch_one("SHOW statement_timeout").await?.get(0))
        })
        .await
        .unwrap();
    assert_eq!(setting, "0");
}

/// What happened to one transaction of the storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Committed,
    Failed,
    Unknown,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_lost_or_phantom_while_every_session_is_killed_repeatedly() {
    const WRITERS: i32 = 16;
    let (db, engine) = common::engine_with(WRITERS as usize).await;
    engine
        .run_ddl("CREATE TABLE ledger (id int PRIMARY KEY, twin int NOT NULL)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let engine = engine.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut fates = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = writer * 1_000_000 + n;
                    n += 1;
                    let result = engine
                        .transaction()
                        .run(async move |tx| {
                            tx.execute(sql!("INSERT INTO ledger VALUES ({}, {})", id, id))
                                .await?;
                            tx.execute(sql!("UPDATE ledger SET twin = -id WHERE id = {}", id))
                                .await?;
                            Ok::<_, Error>(())
                        })
                        .await;
                    let fate = match result {
                        Ok(()) => Fate::Committed,
                        Err(e) if e.is_outcome_unknown() => Fate::Unknown,
                        Err(_) => Fate::Failed,
                    };
                    fates.push((id, fate));
                }
                fates
            })
        })
        .collect();

    let killer = db.connect().await.unwrap();
    let name = common::application_name(&db);
    let mut kills = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let row = killer
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await
            .unwrap();
        kills += row.get::<_, i64>(0);
    }
    stop.store(true, Ordering::Relaxed);
    let mut fates = Vec::new();
    for writer in writers {
        fates.extend(writer.await.unwrap());
    }

    let saved: HashSet<i32> = engine
        .fetch("SELECT id FROM ledger WHERE twin = -id")
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let half_done: i64 = engine
        .fetch_one("SELECT count(*) FROM ledger WHERE twin <> -id")
        .await
        .unwrap()
        .get(0);
    let lost: Vec<_> = fates
        .iter()
        .filter(|(id, fate)| *fate == Fate::Committed && !saved.contains(id))
        .collect();
    let phantom: Vec<_> = fates
        .iter()
        .filter(|(id, fate)| *fate == Fate::Failed && saved.contains(id))
        .collect();
    let count = |wanted: Fate| fates.iter().filter(|(_, fate)| *fate == wanted).count();
    eprintln!(
        "storm: {} transactions, {} committed, {} failed, {} outcome unknown, {kills} sessions killed",
        fates.len(),
        count(Fate::Committed),
        count(Fate::Failed),
        count(Fate::Unknown)
    );
    assert!(lost.is_empty(), "committed but not saved: {lost:?}");
    assert!(phantom.is_empty(), "failed but saved: {phantom:?}");
    assert_eq!(half_done, 0, "a transaction was saved half done");
    assert!(kills > 0 && count(Fate::Committed) > 0);
    let states = common::settled_session_states(&db).await;
    assert!(
        states.iter().all(|s| !s.contains("transaction")),
        "a session was left in a transaction: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_recovers_when_the_server_is_stopped_and_restarted_under_load() {
    // A cluster of its own: stopping it touches no other test.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(EphemeralCluster::start)
            .await
            .unwrap()
            .unwrap(),
    );
    let engine = PostgresEngine::builder()
        .url(cluster.url())
        .max_connections(4)
        .connect_timeout(Duration::from_secs(5))
        .pool_wait_timeout(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    engine.start_connection_pool().await.unwrap();
    for _ in 0..20 {
        engine.fetch_one("SELECT 1").await.unwrap();
    }

    let paused = cluster.clone();
    tokio::task::spawn_blocking(move || paused.pause())
        .await
        .unwrap()
        .unwrap();
    // While it is down, queries fail (they do not hang) with a connection error.
    for _ in 0..8 {
        let started = Instant::now();
        let error = engine.fetch_one("SELECT 1").await.unwrap_err();
        assert!(
            matches!(error.kind(), ErrorKind::Connect | ErrorKind::Connection),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "a query hung");
    }

    let resumed = cluster.clone();
    tokio::task::spawn_blocking(move || resumed.resume())
        .await
        .unwrap()
        .unwrap();
    let restarted = Instant::now();
    loop {
        match engine.fetch_one("SELECT 1").await {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    restarted.elapsed() < Duration::from_secs(60),
                    "never recovered: {error}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    eprintln!("recovered {:?} after the restart", restarted.elapsed());
    // Every connection of the pool works again: none of the dead ones is handed out.
    let queries = (0..40).map(|_| engine.fetch_one("SELECT 1"));
    for result in futures::future::join_all(queries).await {
        result.unwrap();
    }
    engine.close_connection_pool().await;
}
