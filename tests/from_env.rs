//! `PostgresEngine::from_env` reads `DATABASE_URL`. Alone in its test binary, because it
//! changes the process environment.

use pgengine::ErrorKind;
use pgengine::prelude::*;
use pgengine_testing::TestDatabase;

#[tokio::test]
async fn from_env_uses_database_url_and_explains_when_missing() {
    let db = TestDatabase::new().await.unwrap();
    let saved = std::env::var("DATABASE_URL").ok();

    // SAFETY: this is the only test in this binary, so no other thread reads the
    // environment concurrently.
    unsafe { std::env::remove_var("DATABASE_URL") };
    let err = PostgresEngine::from_env().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");

    // SAFETY: as above.
    unsafe { std::env::set_var("DATABASE_URL", db.url()) };
    let engine = PostgresEngine::from_env().await.unwrap();
    let name: String = engine
        .fetch_one("SELECT current_database()::text")
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, db.name());
    engine.close_connection_pool().await;

    // SAFETY: as above.
    unsafe {
        match saved {
            Some(url) => std::env::set_var("DATABASE_URL", url),
            None => std::env::remove_var("DATABASE_URL"),
        }
    }
}
