//! A server that vanishes without closing its sockets (a host or network that dies: no
//! FIN, no RST) is detected within the bound that TCP keepalive and `tcp_user_timeout`
//! set, at every phase: a query in flight, a COMMIT in flight, a pool checkout and a new
//! connection. The path is cut for real: the server runs in a network namespace
//! reached over a veth pair whose neighbours are pointed at a MAC address no one has.

use std::time::{Duration, Instant};

use pgengine::prelude::*;
use pgengine::{ErrorKind, PostgresEngine};
use pgengine_testing::{Blackhole, EphemeralCluster};

/// The settings under test: a silent peer is given up on after 2 s of unacknowledged
/// data or keepalive probes (probes from 1 s of silence on).
const DETECTION: &str = "keepalives_idle=1&keepalives_interval=1&keepalives_count=1&tcp_user_timeout=2000&connect_timeout=2";

/// What the tests allow for detection: the 2 s above, plus one keepalive period and
/// scheduling slack on a loaded machine.
const BOUND: Duration = Duration::from_secs(6);

/// A path that can be cut and a server behind it, or `None` where the machine cannot
/// make network namespaces (not root, no iproute2) — which fails under CI.
fn server_behind_a_blackhole() -> Option<(Blackhole, EphemeralCluster)> {
    let path = match Blackhole::new() {
        Ok(path) => path,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no network namespace on this machine ({e})");
            return None;
        }
        Err(e) => panic!("a network namespace is needed under CI: {e}"),
    };
    let cluster = EphemeralCluster::builder()
        .network_namespace(path.namespace())
        .listen_on(path.server_address())
        .hba(["host all all 0.0.0.0/0 trust"])
        .start()
        .expect("a server in the namespace");
    Some((path, cluster))
}

async fn engine_on(cluster: &EphemeralCluster) -> PostgresEngine {
    PostgresEngine::builder()
        .url(format!("{}?{DETECTION}", cluster.url()))
        .max_connections(1)
        .pool_wait_timeout(Duration::from_secs(20))
        .build()
        .await
        .expect("engine")
}

/// After `restore`, new work succeeds at once, on a new backend.
async fn works_again(engine: &PostgresEngine, old_pid: i32) {
    let started = Instant::now();
    let pid = crate::common::backend_pid(engine).await;
    assert_ne!(pid, old_pid, "the broken connection was handed out again");
    eprintln!("new work after the restore took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_query_in_flight_fails_within_the_bound() {
    let Some((path, cluster)) = server_behind_a_blackhole() else {
        return;
    };
    let engine = engine_on(&cluster).await;
    let pid = crate::common::backend_pid(&engine).await;
    let query = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute("SELECT pg_sleep(30)").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    path.cut().unwrap();
    let cut = Instant::now();
    let err = query.await.unwrap().unwrap_err();
    let took = cut.elapsed();
    eprintln!("query in flight: {:?} after the cut: {err}", took);
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(took < BOUND, "took {took:?}");
    path.restore().unwrap();
    works_again(&engine, pid).await;
}

#[tokio::test]
async fn a_commit_in_flight_is_outcome_unknown_within_the_bound() {
    let Some((path, cluster)) = server_behind_a_blackhole() else {
        return;
    };
    let engine = engine_on(&cluster).await;
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();
    let tx = engine.begin().await.unwrap();
    let pid = crate::common::backend_pid(&tx).await;
    tx.execute("INSERT INTO t VALUES (1)").await.unwrap();
    path.cut().unwrap();
    let cut = Instant::now();
    let err = tx.commit().await.unwrap_err();
    let took = cut.elapsed();
    eprintln!("COMMIT in flight: {:?} after the cut: {err}", took);
    assert_eq!(err.kind(), ErrorKind::CommitOutcomeUnknown, "{err}");
    assert!(err.is_outcome_unknown());
    assert!(took < BOUND, "took {took:?}");
    path.restore().unwrap();
    works_again(&engine, pid).await;
    // The server never got the COMMIT: the row is not there.
    assert_eq!(crate::common::count(&engine, "t").await, 0);
}

#[tokio::test]
async fn a_checkout_and_a_new_connection_fail_within_the_bound() {
    let Some((path, cluster)) = server_behind_a_blackhole() else {
        return;
    };
    let engine = engine_on(&cluster).await;
    let pid = crate::common::backend_pid(&engine).await;
    path.cut().unwrap();
    // The idle pooled connection is taken, and its first request meets the silence.
    let cut = Instant::now();
    let err = engine.fetch_one("SELECT 1").await.unwrap_err();
    let took = cut.elapsed();
    eprintln!(
        "checkout of an idle connection: {:?} after the cut: {err}",
        took
    );
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(took < BOUND, "took {took:?}");
    // No connection left: a new one is opened, and times out connecting.
    let started = Instant::now();
    let err = engine.fetch_one("SELECT 1").await.unwrap_err();
    let took = started.elapsed();
    eprintln!("new connection: {:?}: {err}", took);
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(took < BOUND, "took {took:?}");
    path.restore().unwrap();
    works_again(&engine, pid).await;
}
