//! `test_engine`: a fresh database with migrations applied, and an engine on it.

use std::path::Path;

use pgengine::{Executor, PostgresEngine};

use crate::{Error, ErrorKind, TestDatabase};

/// A fresh database with `migrations` applied in order (each an SQL script, run as
/// DDL: several statements at once), and an engine on it. The database is dropped with
/// the returned [`TestDatabase`]: keep it alive as long as the engine is used.
///
/// A plain function rather than an attribute macro in the spirit of `#[sqlx::test]`:
/// it composes with any test attribute (`#[tokio::test]`, its flavors, proptest) and
/// shows in the test what is set up, for one line more.
///
/// ```no_run
/// use pgengine::prelude::*;
///
/// #[tokio::test]
/// async fn counts_bands() -> Result<(), Box<dyn std::error::Error>> {
///     let (_db, engine) = pgengine_testing::test_engine(&[
///         "CREATE TABLE band (name text PRIMARY KEY)",
///         "INSERT INTO band VALUES ('Pythonistas'), ('Rustaceans')",
///     ])
///     .await?;
///     let n: i64 = engine.fetch_one("SELECT count(*) FROM band").await?.get(0);
///     assert_eq!(n, 2);
///     Ok(())
/// }
/// ```
pub async fn test_engine(migrations: &[&str]) -> Result<(TestDatabase, PostgresEngine), Error> {
    let db = TestDatabase::new().await?;
    let engine = db.engine().await?;
    for (index, migration) in migrations.iter().enumerate() {
        engine.run_ddl(migration).await.map_err(|e| {
            Error::new(
                ErrorKind::Database,
                format!("migration {} failed: {e}", index + 1),
            )
        })?;
    }
    Ok((db, engine))
}

/// The `*.sql` files of `dir`, in file-name order (`V1__init.sql`, `V2__…`, as
/// refinery and sqlx name them), to pass to [`test_engine`].
///
/// ```no_run
/// # async fn f() -> Result<(), pgengine_testing::Error> {
/// let migrations = pgengine_testing::migrations_in("migrations")?;
/// let migrations: Vec<&str> = migrations.iter().map(String::as_str).collect();
/// let (_db, engine) = pgengine_testing::test_engine(&migrations).await?;
/// # Ok(()) }
/// ```
pub fn migrations_in(dir: impl AsRef<Path>) -> Result<Vec<String>, Error> {
    let dir = dir.as_ref();
    let unreadable = |e| Error::io(format!("could not read {}", dir.display()), e);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("could not read {}", path.display()), e))
        })
        .collect()
}
