//! `pgengine_testing::test_engine` and `migrations_in`: what users get for their own tests.

use pgengine::prelude::*;

/// Migrations run in order on a fresh database, and the engine sees their result.
#[tokio::test]
async fn test_engine_applies_migrations_in_order() {
    let (db, engine) = pgengine_testing::test_engine(&[
        "CREATE TABLE band (name text PRIMARY KEY)",
        "INSERT INTO band VALUES ('Pythonistas'); INSERT INTO band VALUES ('Rustaceans')",
    ])
    .await
    .unwrap();
    assert_eq!(crate::common::count(&engine, "band").await, 2);
    let database: String = engine
        .fetch_one("SELECT current_database()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(database, db.name());
}

/// A failing migration is an error that names it.
#[tokio::test]
async fn a_failing_migration_is_named() {
    let err = pgengine_testing::test_engine(&["CREATE TABLE a (id int)", "CREATE TABLE ("])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("migration 2"), "{err}");
}

/// `migrations_in` reads a directory's `*.sql` files in file-name order, nothing else.
#[tokio::test]
async fn migrations_are_read_in_file_name_order() {
    let dir = std::env::temp_dir().join(format!("pgengine-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("V2__rows.sql"), "INSERT INTO band VALUES ('x')").unwrap();
    std::fs::write(dir.join("V1__init.sql"), "CREATE TABLE band (name text)").unwrap();
    std::fs::write(dir.join("README.md"), "not a migration").unwrap();
    let migrations = pgengine_testing::migrations_in(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(migrations.len(), 2);
    let migrations: Vec<&str> = migrations.iter().map(String::as_str).collect();
    let (_db, engine) = pgengine_testing::test_engine(&migrations).await.unwrap();
    assert_eq!(crate::common::count(&engine, "band").await, 1);
}
