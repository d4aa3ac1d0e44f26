//! LISTEN / NOTIFY: notifications from other sessions arrive in order with their
//! payloads; a listener whose backend is terminated reconnects, says so, and receives
//! later notifications; dropping it closes its connection; hostile channel names are
//! refused before anything is sent.

use std::time::{Duration, Instant};

use futures::StreamExt;
use pgengine::prelude::*;
use pgengine::{ErrorKind, ListenEvent, Listener, PostgresEngine};

/// The next event, within 10 s.
async fn next_event(listener: &mut Listener) -> ListenEvent {
    tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on")
        .expect("no error")
}

/// The payload of the next event, which must be a notification on `channel`.
async fn next_payload(listener: &mut Listener, channel: &str) -> String {
    match next_event(listener).await {
        ListenEvent::Notification(n) => {
            assert_eq!(n.channel, channel);
            n.payload
        }
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// The server pid of the listener's session (the one session listening on `channel`).
async fn listener_pid(engine: &PostgresEngine, channel: &str) -> Option<i32> {
    engine
        .fetch_optional(sql!(
            "SELECT pid FROM pg_stat_activity WHERE query = {} AND pid <> pg_backend_pid()",
            format!("LISTEN \"{channel}\";")
        ))
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn notifications_arrive_in_order_with_their_payloads() {
    let (_db, engine) = crate::common::engine().await;
    let mut listener = engine.listen(["band_changes", "other"]).await.unwrap();
    for i in 0..50 {
        engine
            .execute(sql!(
                "SELECT pg_notify('band_changes', {})",
                format!("change {i}")
            ))
            .await
            .unwrap();
    }
    engine.execute("NOTIFY other").await.unwrap();
    for i in 0..50 {
        assert_eq!(
            next_payload(&mut listener, "band_changes").await,
            format!("change {i}")
        );
    }
    assert_eq!(next_payload(&mut listener, "other").await, "");
    // A notification sent inside a transaction arrives only once it commits.
    let tx = engine.begin().await.unwrap();
    tx.execute("NOTIFY other, 'committed'").await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(200), listener.next()).await;
    assert!(early.is_err(), "a notification arrived before its COMMIT");
    tx.commit().await.unwrap();
    assert_eq!(next_payload(&mut listener, "other").await, "committed");
}

#[tokio::test]
async fn a_terminated_listener_reconnects_and_says_so() {
    let (_db, engine) = crate::common::engine().await;
    let mut listener = engine.listen(["jobs"]).await.unwrap();
    engine.execute("NOTIFY jobs, 'before'").await.unwrap();
    assert_eq!(next_payload(&mut listener, "jobs").await, "before");
    let pid = listener_pid(&engine, "jobs")
        .await
        .expect("the listener's session");
    engine
        .execute(sql!("SELECT pg_terminate_backend({})", pid))
        .await
        .unwrap();
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    let new_pid = listener_pid(&engine, "jobs")
        .await
        .expect("listening again");
    assert_ne!(new_pid, pid);
    engine.execute("NOTIFY jobs, 'after'").await.unwrap();
    assert_eq!(next_payload(&mut listener, "jobs").await, "after");
}

#[tokio::test]
async fn dropping_the_listener_closes_its_connection() {
    let (_db, engine) = crate::common::engine().await;
    let listener = engine.listen(["dropped"]).await.unwrap();
    assert!(listener_pid(&engine, "dropped").await.is_some());
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener_pid(&engine, "dropped").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the listener's session is still there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hostile_or_missing_channel_names_are_refused() {
    let (_db, engine) = crate::common::engine().await;
    for channel in ["x\"; DROP TABLE band; --", "", "a\0b"] {
        let err = engine.listen([channel]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{channel:?}: {err}");
    }
    let err = engine.listen(Vec::<String>::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}
