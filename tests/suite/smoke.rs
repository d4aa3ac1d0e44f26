use crate::common;

use pgengine::prelude::*;

#[tokio::test]
async fn fetch_execute_and_transaction_round_trip() {
    let (db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY, popularity int)")
        .await
        .unwrap();
    let n = engine
        .execute(sql!(
            "INSERT INTO band VALUES ({}, {})",
            "Pythonistas",
            1000
        ))
        .await
        .unwrap();
    assert_eq!(n, 1);
    engine
        .transaction()
        .run(async |tx| {
            tx.execute(sql!("INSERT INTO band VALUES ({}, {})", "Rustaceans", 2000))
                .await?;
            Ok::<_, pgengine::Error>(())
        })
        .await
        .unwrap();
    let rows = engine
        .fetch(sql!(
            "SELECT name FROM band WHERE popularity > {} ORDER BY name",
            10
        ))
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["Pythonistas", "Rustaceans"]);
    common::assert_sessions_clean(&db).await;
}
