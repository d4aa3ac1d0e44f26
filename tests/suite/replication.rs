//! Beyond one server, on real streaming replication (a primary and a hot standby that
//! the harness starts): named nodes, multi-host connection strings with
//! `target_session_attrs`, and failover by promotion with the same engine.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgengine::prelude::*;
use pgengine::{ErrorKind, PostgresEngine};
use pgengine_testing::EphemeralCluster;

/// A primary and a hot standby streaming from it (started off the runtime's threads).
async fn primary_and_standby(synchronous: bool) -> (EphemeralCluster, EphemeralCluster) {
    tokio::task::spawn_blocking(move || {
        let mut primary = EphemeralCluster::builder();
        if synchronous {
            primary = primary
                .setting("synchronous_commit", "on")
                .setting("synchronous_standby_names", "*");
        }
        let primary = primary.start().expect("primary");
        let standby = primary.standby().expect("standby");
        (primary, standby)
    })
    .await
    .unwrap()
}

async fn engine_on(url: &str) -> PostgresEngine {
    PostgresEngine::builder()
        .url(url)
        .max_connections(8)
        .build()
        .await
        .expect("engine")
}

async fn in_recovery(executor: &impl Executor) -> bool {
    executor
        .fetch_one("SELECT pg_is_in_recovery()")
        .await
        .expect("pg_is_in_recovery")
        .get(0)
}

/// Waits (at most 10 s) until `executor` sees `n` rows in `band` (which it may not see
/// at all yet).
async fn wait_for_rows(executor: &impl Executor, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = async || match executor.fetch_one("SELECT count(*) FROM band").await {
        Ok(row) => row.get::<_, i64>(0),
        Err(_) => -1,
    };
    while rows().await != n {
        assert!(
            Instant::now() < deadline,
            "the standby never replayed {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 10 s) until the standby that `executor` reaches has replayed all the WAL
/// it received: its replay lag is zero.
async fn wait_caught_up(executor: &impl Executor) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let sql = "SELECT coalesce(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), false)";
    while !executor.fetch_one(sql).await.unwrap().get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A named node runs queries, batches, atomics and read-only transactions on the
/// standby, which sees the primary's rows and refuses writes (25006); an unknown name is
/// `None`; closing the engine's pool closes the node's.
#[tokio::test]
async fn a_named_node_runs_everything_on_its_server() {
    let (primary, standby) = primary_and_standby(false).await;
    let engine = PostgresEngine::builder()
        .url(primary.url())
        .max_connections(4)
        .extra_node("replica", &standby.url())
        .build()
        .await
        .unwrap();
    assert!(engine.node("nope").is_none());
    let replica = engine.node("replica").expect("the configured node");
    assert!(!in_recovery(&engine).await);
    assert!(in_recovery(&replica).await);

    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY)")
        .await
        .unwrap();
    let mut atomic = engine.atomic();
    atomic.add_all((0..30).map(|i| sql!("INSERT INTO band VALUES ({})", format!("band {i}"))));
    atomic.run().await.unwrap();
    wait_for_rows(&replica, 30).await;

    let mut batch = replica.batch("SELECT name FROM band", 7).await.unwrap();
    let mut seen = 0;
    while let Some(rows) = batch.next().await.unwrap() {
        seen += rows.len();
    }
    assert_eq!(seen, 30);
    let read = replica
        .transaction()
        .read_only(true)
        .run(async |tx| {
            let recovering = in_recovery(tx).await;
            Ok::<_, pgengine::Error>((recovering, crate::common::count(tx, "band").await))
        })
        .await
        .unwrap();
    assert_eq!(read, (true, 30));

    let refused = replica
        .execute("INSERT INTO band VALUES ('written to a standby')")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("25006"), "{refused}");
    let mut atomic = replica.atomic();
    atomic.add("INSERT INTO band VALUES ('x')");
    assert_eq!(atomic.run().await.unwrap_err().code(), Some("25006"));

    // Inside an ambient transaction of the engine, the node's queries stay on the node.
    engine
        .transaction()
        .run(async |tx| {
            tx.execute("INSERT INTO band VALUES ('uncommitted')")
                .await?;
            assert!(in_recovery(&replica).await);
            assert_eq!(crate::common::count(&replica, "band").await, 30);
            Ok::<_, pgengine::Error>(())
        })
        .await
        .unwrap();

    engine.close_connection_pool().await;
    let closed = replica.fetch("SELECT 1").await.unwrap_err();
    assert_eq!(closed.kind(), ErrorKind::Closed, "{closed}");
}

/// With both servers in one URL, `target_session_attrs` picks the server as libpq does:
/// `read-write` finds the primary listed second (200 concurrent inserts all land
/// there), `read-only` the standby, and `primary`, `standby`, `prefer-standby` (which
/// the engine checks itself) the kind they name; none fitting is an error naming the
/// setting, never a connection to the wrong kind of server.
#[tokio::test]
async fn target_session_attrs_picks_the_server() {
    let (primary, standby) = primary_and_standby(false).await;
    let url = |attrs: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs={attrs}",
            standby.port(),
            primary.port()
        )
    };
    let writer = engine_on(&url("read-write")).await;
    assert!(!in_recovery(&writer).await);
    writer
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY)")
        .await
        .unwrap();
    let inserts = (0..200).map(|i| {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .execute(sql!("INSERT INTO band VALUES ({})", format!("band {i}")))
                .await
        })
    });
    for insert in futures::future::join_all(inserts).await {
        assert_eq!(insert.unwrap().unwrap(), 1);
    }
    let on_primary = engine_on(&primary.url()).await;
    assert_eq!(crate::common::count(&on_primary, "band").await, 200);

    let reader = engine_on(&url("read-only")).await;
    assert!(in_recovery(&reader).await);
    wait_for_rows(&reader, 200).await;

    // The kinds of server the engine checks itself, as libpq does.
    for (attrs, standby_wanted) in [
        ("primary", false),
        ("standby", true),
        ("prefer-standby", true),
    ] {
        let engine = engine_on(&url(attrs)).await;
        for _ in 0..8 {
            assert_eq!(in_recovery(&engine).await, standby_wanted, "{attrs}");
        }
    }
    let primary_only = |attrs: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?target_session_attrs={attrs}",
            primary.port()
        )
    };
    assert!(!in_recovery(&engine_on(&primary_only("prefer-standby")).await).await);
    let err = PostgresEngine::builder()
        .url(primary_only("standby"))
        .build()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("target_session_attrs=standby"),
        "{err}"
    );
    let err = PostgresEngine::builder()
        .url(url("replica"))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("target_session_attrs"), "{err}");
}

/// What the writers saw during a failover.
#[derive(Default)]
struct Tally {
    acknowledged: HashSet<i32>,
    /// Failed with the connection lost mid-statement: an autocommit write may have been
    /// applied all the same (the server had committed when the connection died).
    failed: HashSet<i32>,
    outcome_unknown: usize,
    first_success_after_promotion: Option<Instant>,
}

/// Failover with synchronous replication: 8 writers insert unique ids through one
/// engine on `primary,standby?target_session_attrs=read-write`; the primary is stopped
/// immediately and the standby promoted; the same engine writes again within 10 s of the
/// promotion, and every acknowledged id is on the new primary (none lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_engine_writes_again_after_a_failover() {
    let (primary, standby) = primary_and_standby(true).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        primary.port(),
        standby.port()
    );
    let engine = PostgresEngine::builder()
        .url(&url)
        .max_connections(8)
        .pool_wait_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    engine
        .run_ddl("CREATE TABLE written (id int PRIMARY KEY)")
        .await
        .unwrap();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let promoted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(40);
    let writers = (0..8).map(|writer| {
        let (engine, tally, promoted_at) = (engine.clone(), tally.clone(), promoted_at.clone());
        tokio::spawn(async move {
            for n in 0.. {
                let id = writer * 1_000_000 + n;
                let result = engine
                    .execute(sql!("INSERT INTO written VALUES ({})", id))
                    .await;
                let promoted = promoted_at.lock().unwrap().is_some();
                let done = {
                    let mut tally = tally.lock().unwrap();
                    match result {
                        Ok(_) => {
                            tally.acknowledged.insert(id);
                            if promoted {
                                tally
                                    .first_success_after_promotion
                                    .get_or_insert_with(Instant::now);
                            }
                            // A few writes on the new primary, then stop.
                            promoted && n % 20 == 0
                        }
                        Err(error) if error.is_outcome_unknown() => {
                            tally.outcome_unknown += 1;
                            false
                        }
                        Err(_) => {
                            tally.failed.insert(id);
                            false
                        }
                    }
                };
                if done {
                    return;
                }
                if Instant::now() > deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    let writers: Vec<_> = writers.collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    tokio::task::block_in_place(|| primary.pause()).unwrap();
    tokio::task::block_in_place(|| standby.promote()).unwrap();
    *promoted_at.lock().unwrap() = Some(Instant::now());
    let all_done = futures::future::join_all(writers);
    for writer in tokio::time::timeout(Duration::from_secs(60), all_done)
        .await
        .expect("the writers finish within 60 s")
    {
        writer.unwrap();
    }

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let promoted = promoted_at.lock().unwrap().unwrap();
    let first = tally
        .first_success_after_promotion
        .expect("a write succeeded after the promotion");
    let recovery = first.saturating_duration_since(promoted);
    assert!(recovery < Duration::from_secs(10), "took {recovery:?}");
    let new_primary = engine_on(&standby.url()).await;
    let present: HashSet<i32> = new_primary
        .fetch("SELECT id FROM written")
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost = tally.acknowledged.difference(&present).count();
    let failed_but_applied = tally.failed.intersection(&present).count();
    eprintln!(
        "failover: {} acknowledged, {} failed ({} of them applied all the same), {} outcome \
         unknown, {} lost; promotion {:?} after the stop, first write {:?} after the promotion",
        tally.acknowledged.len(),
        tally.failed.len(),
        failed_but_applied,
        tally.outcome_unknown,
        lost,
        promoted - stopped,
        recovery
    );
    assert_eq!(lost, 0, "acknowledged writes missing on the new primary");
}

/// Read routing: read-only transactions and `replica()` run on the replica, everything
/// else on the primary, and a read inside a read-write transaction stays in it; with
/// replay paused beyond the lag bound, reads go to the primary until the replica has
/// caught up; with the replica stopped they fall back to the primary without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_work_goes_to_a_fit_replica_else_the_primary() {
    let (primary, standby) = primary_and_standby(false).await;
    let engine = PostgresEngine::builder()
        .url(primary.url())
        .max_connections(4)
        .read_replica(&standby.url())
        .max_replica_lag(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let read_only_on_replica = async || {
        engine
            .transaction()
            .read_only(true)
            .run(async |tx| Ok::<_, pgengine::Error>(in_recovery(tx).await))
            .await
            .unwrap()
    };
    // (A standby still replaying what it received, as just after it started, lags.)
    let on_standby = engine_on(&standby.url()).await;
    wait_caught_up(&on_standby).await;
    assert!(read_only_on_replica().await);
    assert!(in_recovery(&engine.replica().await).await);
    assert!(!in_recovery(&engine).await);
    let read_write = engine
        .transaction()
        .run(async |tx| Ok::<_, pgengine::Error>(in_recovery(tx).await))
        .await
        .unwrap();
    assert!(!read_write);
    let joined = engine
        .transaction()
        .run(async |_outer| {
            engine
                .transaction()
                .read_only(true)
                .run(async |tx| Ok::<_, pgengine::Error>(in_recovery(tx).await))
                .await
        })
        .await
        .unwrap();
    assert!(
        !joined,
        "a read inside a read-write transaction stays in it"
    );

    // Replay paused while the primary writes: the replica lags, reads go to the primary.
    on_standby
        .fetch("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    engine
        .run_ddl("CREATE TABLE band (name text)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine
        .execute("INSERT INTO band VALUES ('late')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !read_only_on_replica().await,
        "a lagging replica is skipped"
    );
    on_standby
        .fetch("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    wait_for_rows(&on_standby, 1).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    wait_caught_up(&on_standby).await;
    assert!(
        read_only_on_replica().await,
        "a replica that caught up is used again"
    );

    // The replica stopped: reads fall back to the primary, without an error.
    tokio::task::block_in_place(|| standby.pause()).unwrap();
    assert!(!read_only_on_replica().await);
    assert!(!in_recovery(&engine.replica().await).await);
}

/// With two hosts, an abandoned query is cancelled on the server its session reached
/// (the standby, listed second): it is gone from that server within 2 s, and the next
/// query runs on the same session (same backend pid). Each `target_session_attrs` path is tried: the
/// driver's (`read-only`) and the engine's (`standby`).
#[tokio::test]
async fn with_two_hosts_an_abandoned_query_is_cancelled_on_its_server() {
    let (primary, standby) = primary_and_standby(false).await;
    let observer = engine_on(&standby.url()).await;
    for attrs in ["read-only", "standby"] {
        let url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs={attrs}",
            primary.port(),
            standby.port()
        );
        let engine = PostgresEngine::builder()
            .url(&url)
            .max_connections(1)
            .build()
            .await
            .unwrap();
        let pid = crate::common::backend_pid(&engine).await;
        assert!(pid > 0);
        let abandoned = tokio::time::timeout(
            Duration::from_millis(300),
            engine.execute("SELECT pg_sleep(30)"),
        )
        .await;
        assert!(abandoned.is_err(), "pg_sleep(30) finished");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let sleeping: i64 = observer
                .fetch_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
                .await
                .unwrap()
                .get(0);
            if sleeping == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{attrs}: the sleep still runs after 2 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The engine knows which host the session reached: it waited for the server's
        // confirmation of the cancel there, and reuses the session.
        assert_eq!(crate::common::backend_pid(&engine).await, pid, "{attrs}");
        assert!(in_recovery(&engine).await);
    }
}

/// `load_balance_hosts=random` spreads new connections over the hosts, as libpq does.
#[tokio::test]
async fn load_balance_hosts_spreads_connections() {
    let (primary, standby) = primary_and_standby(false).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?load_balance_hosts=random",
        primary.port(),
        standby.port()
    );
    let engine = PostgresEngine::builder()
        .url(&url)
        .max_connections(16)
        .build()
        .await
        .unwrap();
    engine.start_connection_pool().await.unwrap();
    let sessions = (0..16).map(|_| {
        let engine = engine.clone();
        async move {
            engine
                .transaction()
                .run(async |tx| {
                    let standby = in_recovery(tx).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, pgengine::Error>(standby)
                })
                .await
                .unwrap()
        }
    });
    let kinds: HashSet<bool> = futures::future::join_all(sessions)
        .await
        .into_iter()
        .collect();
    assert_eq!(kinds.len(), 2, "16 connections all reached one host");
}
