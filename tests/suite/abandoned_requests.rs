//! A storm of abandoned requests (issue 8): callers whose deadlines (0–5 ms) drop their
//! queries mid-flight, on a pool as small as the number of callers. Each abandoned
//! request is cancelled on the server and its connection cleaned before reuse, which
//! holds the pool slot for a cancel round trip; nothing may be lost, leaked or left
//! open, and the pool must serve at full size afterwards.
//!
//! The cleanup keeps the caller's slot until the server has acted on the cancel. A
//! detached cleanup (slot released at once, cleanup in the background with a
//! replacement connection) was measured against it on this machine, 2,000 operations
//! each: completed SELECT 1 1,964–1,978 (kept) against 1,147–1,899 (detached);
//! `pg_sleep(0.002)` 1,051–1,098 against 0–12; transactions 1,715–1,748 against 48–274.
//! Releasing sooner only let new work pile onto connections still busy being cleaned,
//! so the cleanup stays on the caller's slot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgengine::prelude::*;

/// What the callers saw.
#[derive(Default)]
struct Outcomes {
    /// Inserts that returned `Ok`.
    saved: HashSet<i32>,
    /// Inserts dropped by their deadline (applied or not: the cancel may come late).
    abandoned: HashSet<i32>,
    /// Inserts that returned an error.
    failed: HashSet<i32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_abandoned_requests_loses_nothing_and_leaks_nothing() {
    let (db, engine) = crate::common::engine_with(4).await;
    engine
        .run_ddl("CREATE TABLE storm (id int PRIMARY KEY)")
        .await
        .unwrap();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let started = Instant::now();
    let callers = (0..4).map(|caller| {
        let (engine, outcomes) = (engine.clone(), outcomes.clone());
        tokio::spawn(async move {
            for n in 0..500 {
                let id = caller * 1_000 + n;
                let deadline = Duration::from_micros(((id * 7_919) % 6_000) as u64);
                let insert = engine.execute(sql!("INSERT INTO storm VALUES ({})", id));
                let result = tokio::time::timeout(deadline, insert).await;
                let mut outcomes = outcomes.lock().unwrap();
                match result {
                    Ok(Ok(_)) => outcomes.saved.insert(id),
                    Ok(Err(_)) => outcomes.failed.insert(id),
                    Err(_) => outcomes.abandoned.insert(id),
                };
            }
        })
    });
    for caller in futures::future::join_all(callers).await {
        caller.unwrap();
    }
    let elapsed = started.elapsed();

    let present: HashSet<i32> = engine
        .fetch("SELECT id FROM storm")
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let lost = outcomes.saved.difference(&present).count();
    let phantom = outcomes.failed.intersection(&present).count();
    let abandoned_applied = outcomes.abandoned.intersection(&present).count();
    eprintln!(
        "2,000 operations in {elapsed:?}: {} saved, {} abandoned ({abandoned_applied} of them \
         applied all the same), {} failed; lost {lost}, phantom {phantom}; pool {:?}",
        outcomes.saved.len(),
        outcomes.abandoned.len(),
        outcomes.failed.len(),
        engine.pool_status(),
    );
    assert_eq!(lost, 0, "an insert that returned Ok is missing");
    assert_eq!(phantom, 0, "an insert that failed is present");
    assert_eq!(
        outcomes.saved.len() + outcomes.abandoned.len() + outcomes.failed.len(),
        2_000
    );

    // Nothing left open, and the pool serves at full size: four callers at once, each
    // on a connection of its own.
    crate::common::assert_sessions_clean(&db).await;
    let pids = futures::future::join_all((0..4).map(|_| {
        engine.transaction().run(async |tx| {
            let pid = crate::common::backend_pid(tx).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, pgengine::Error>(pid)
        })
    }))
    .await;
    let pids: HashSet<i32> = pids.into_iter().map(Result::unwrap).collect();
    assert_eq!(pids.len(), 4);
}

/// How long an abandoned request keeps its pool slot: the time from the drop until the
/// slot serves the next caller (a cancel round trip and the clean-up), measured on a
/// pool of one. Printed for the note; asserted only to come back.
#[tokio::test]
async fn an_abandoned_request_gives_its_slot_back_once_cleaned() {
    let (_db, engine) = crate::common::engine_with(1).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let abandoned = tokio::time::timeout(
            Duration::from_millis(5),
            engine.execute("SELECT pg_sleep(1)"),
        )
        .await;
        assert!(abandoned.is_err());
        let dropped = Instant::now();
        let value: i32 = engine.fetch_one("SELECT 7").await.unwrap().get(0);
        assert_eq!(value, 7);
        held.push(dropped.elapsed());
    }
    held.sort();
    eprintln!(
        "slot held after an abandoned request: median {:?}, max {:?}",
        held[held.len() / 2],
        held[held.len() - 1]
    );
}
