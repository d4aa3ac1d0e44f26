//! `PostgresEngine::from_env` reads `DATABASE_URL`, else libpq's environment variables.
//! Alone in its test binary, because it changes the process environment.

use pgengine::ErrorKind;
use pgengine::prelude::*;
use pgengine_testing::TestDatabase;

/// libpq's variables this test sets (and clears).
const PG_VARIABLES: &[&str] = &[
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGAPPNAME",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
];

#[tokio::test]
async fn from_env_uses_database_url_else_libpq_variables_and_explains_when_missing() {
    let db = TestDatabase::new().await.unwrap();
    let saved: Vec<(&str, Option<String>)> = ["DATABASE_URL"]
        .iter()
        .chain(PG_VARIABLES)
        .map(|name| (*name, std::env::var(name).ok()))
        .collect();

    // SAFETY (every set_var/remove_var here): this is the only test in this binary, so
    // no other thread reads the environment concurrently.
    unsafe {
        for (name, _) in &saved {
            std::env::remove_var(name);
        }
    }
    let err = PostgresEngine::from_env().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    assert!(err.to_string().contains("PGHOST"), "{err}");

    unsafe { std::env::set_var("DATABASE_URL", db.url()) };
    let engine = PostgresEngine::from_env().await.unwrap();
    let name: String = engine
        .fetch_one("SELECT current_database()::text")
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, db.name());
    engine.close_connection_pool().await;

    // Without DATABASE_URL, libpq's variables.
    unsafe { std::env::remove_var("DATABASE_URL") };
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(name) => name.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    unsafe {
        std::env::set_var("PGHOST", host);
        std::env::set_var("PGPORT", config.get_ports()[0].to_string());
        std::env::set_var("PGUSER", config.get_user().unwrap());
        if let Some(password) = config.get_password() {
            std::env::set_var("PGPASSWORD", String::from_utf8_lossy(password).as_ref());
        }
        std::env::set_var("PGDATABASE", db.name());
        std::env::set_var("PGAPPNAME", "from-env test");
        std::env::set_var("PGOPTIONS", "-c search_path=env_schema");
        std::env::set_var("PGSSLMODE", "disable");
        std::env::set_var("PGCONNECT_TIMEOUT", "15");
    }
    let engine = PostgresEngine::from_env().await.unwrap();
    let row = engine
        .fetch_one(
            "SELECT current_database()::text, current_setting('application_name'), \
             current_setting('search_path'), \
             (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.name());
    assert_eq!(row.get::<_, String>(1), "from-env test");
    assert_eq!(row.get::<_, String>(2), "env_schema");
    assert!(!row.get::<_, bool>(3));
    engine.close_connection_pool().await;

    unsafe {
        for (name, value) in saved {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
}
