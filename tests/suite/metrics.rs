//! Pool metrics through the `metrics` facade (feature `metrics`), read back with
//! metrics-util's debugging recorder: connections created and closed by reason,
//! waits and timeouts, the wait histogram, connections in use.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pgengine::ErrorKind;
use pgengine::prelude::*;

/// The recorder of the whole test binary, installed once.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("no other recorder");
        snapshotter
    })
}

/// The metrics of one pool, accumulated over snapshots (the debugging recorder resets
/// what it reports: counters and increment-style gauges are added up here).
#[derive(Default)]
struct Seen {
    pool: String,
    values: std::collections::HashMap<String, f64>,
    histograms: std::collections::HashMap<String, Vec<f64>>,
}

impl Seen {
    fn refresh(&mut self) {
        for (key, _, _, value) in snapshotter().snapshot().into_vec() {
            let key = key.key();
            if !key
                .labels()
                .any(|l| l.key() == "pool" && l.value() == self.pool)
            {
                continue;
            }
            let mut name = key.name().to_owned();
            for label in key.labels().filter(|l| l.key() != "pool") {
                name.push_str(&format!("{{{}={}}}", label.key(), label.value()));
            }
            match value {
                DebugValue::Counter(n) => *self.values.entry(name).or_default() += n as f64,
                DebugValue::Gauge(n) => *self.values.entry(name).or_default() += n.into_inner(),
                DebugValue::Histogram(xs) => self
                    .histograms
                    .entry(name)
                    .or_default()
                    .extend(xs.into_iter().map(|x| x.into_inner())),
            }
        }
    }

    fn get(&mut self, name: &str) -> f64 {
        self.refresh();
        self.values.get(name).copied().unwrap_or_default()
    }
}

#[tokio::test]
async fn the_pool_reports_through_the_metrics_facade() {
    snapshotter();
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let engine = crate::common::builder(&db)
        .max_connections(1)
        .pool_wait_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let pool = format!(
        "{}:{}/{}",
        match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
        },
        config.get_ports().first().copied().unwrap_or(5432),
        db.name()
    );
    let mut seen = Seen {
        pool,
        ..Seen::default()
    };

    engine.execute("SELECT 1").await.unwrap();
    assert_eq!(seen.get("pgengine_pool_connections_created_total"), 1.0);

    // The one connection held: a take waits, then gives up.
    let tx = engine.begin().await.unwrap();
    assert_eq!(seen.get("pgengine_pool_connections_in_use"), 1.0);
    let refused = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute("SELECT 1").await }
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::PoolTimeout);
    assert_eq!(seen.get("pgengine_pool_waits_total"), 1.0);
    assert_eq!(seen.get("pgengine_pool_timeouts_total"), 1.0);
    seen.refresh();
    let waits = &seen.histograms["pgengine_pool_wait_seconds"];
    assert!(waits.len() == 1 && waits[0] >= 0.09, "{waits:?}");

    // The server ends the session: the connection is closed as broken.
    let pid = crate::common::backend_pid(&tx).await;
    let observer = db.connect().await.unwrap();
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(tx.execute("SELECT 1").await.is_err());
    drop(tx);
    assert_eq!(
        seen.get("pgengine_pool_connections_closed_total{reason=broken}"),
        1.0
    );
    assert_eq!(seen.get("pgengine_pool_connections_in_use"), 0.0);
    engine.execute("SELECT 1").await.unwrap();
    assert_eq!(seen.get("pgengine_pool_connections_created_total"), 2.0);
}
