//! The driver's optional SQL types, forwarded as pgengine features (`with-chrono-0_4`,
//! `with-uuid-1`, `with-serde_json-1`, …): values go in as parameters and come back
//! typed. Run with `cargo test -p pgengine --all-features --test suite types`.

use pgengine::prelude::*;

#[cfg(feature = "with-chrono-0_4")]
#[tokio::test]
async fn chrono_dates_and_times() {
    let (_db, engine) = crate::common::engine().await;
    let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
    let (back, next): (chrono::NaiveDate, chrono::NaiveDate) = engine
        .fetch_one_as(sql!("SELECT {}::date, {}::date + 1", day, day))
        .await
        .unwrap();
    assert_eq!((back, next), (day, day.succ_opt().unwrap()));
}

#[cfg(feature = "with-uuid-1")]
#[tokio::test]
async fn uuids() {
    let (_db, engine) = crate::common::engine().await;
    let id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
    let (back,): (uuid::Uuid,) = engine
        .fetch_one_as(sql!("SELECT {}::uuid", id))
        .await
        .unwrap();
    assert_eq!(back, id);
}

#[cfg(feature = "with-serde_json-1")]
#[tokio::test]
async fn json_values() {
    let (_db, engine) = crate::common::engine().await;
    let value = serde_json::json!({"band": "Rustaceans", "popularity": 2000});
    let (back, name): (serde_json::Value, String) = engine
        .fetch_one_as(sql!(
            "SELECT {}::jsonb, {}::jsonb ->> 'band'",
            value.clone(),
            value
        ))
        .await
        .unwrap();
    assert_eq!(
        (back, name.as_str()),
        (
            serde_json::json!({"band": "Rustaceans", "popularity": 2000}),
            "Rustaceans"
        )
    );
}

/// Without any type feature, this module only checks that it compiles.
#[tokio::test]
async fn plain_types_need_no_feature() {
    let (_db, engine) = crate::common::engine().await;
    let (text, number, flag): (String, f64, bool) = engine
        .fetch_one_as("SELECT 'x', 1.5::float8, true")
        .await
        .unwrap();
    assert_eq!((text.as_str(), number, flag), ("x", 1.5, true));
}
