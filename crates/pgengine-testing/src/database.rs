//! `TestDatabase`: a fresh database per test.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::cluster::random_token;
use crate::{Error, ErrorKind, TestServer, server};

/// Prefix of every database created by [`TestDatabase`].
///
/// ```
/// assert_eq!(pgengine_testing::DATABASE_PREFIX, "pgengine_test_");
/// ```
pub const DATABASE_PREFIX: &str = "pgengine_test_";

/// How long creating or dropping a database may take before we give up.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh, empty database (`CREATE DATABASE … TEMPLATE template0`) for one test,
/// dropped (`DROP DATABASE … WITH (FORCE)`, which also ends open connections to it)
/// when this value is dropped — also when the test fails or panics.
///
/// Names are unique per process and across processes:
/// `pgengine_test_<pid>_<counter>_<random>`. Thread-safe: tests may create databases
/// concurrently.
///
/// ```no_run
/// use pgengine_testing::TestDatabase;
///
/// #[tokio::test]
/// async fn my_test() -> Result<(), Box<dyn std::error::Error>> {
///     let db = TestDatabase::new().await?;
///     let client = db.connect().await?;
///     client.batch_execute("CREATE TABLE t (id int)").await?;
///     // or hand db.url() to the code under test
///     Ok(())
/// }
/// ```
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

impl TestDatabase {
    /// Creates a fresh database on the shared [`server()`] (an ephemeral cluster, or
    /// `DATABASE_URL`).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), pgengine_testing::Error> {
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// assert!(db.name().starts_with("pgengine_test_"));
    /// # Ok(()) }
    /// ```
    pub async fn new() -> Result<TestDatabase, Error> {
        Self::new_on(server()?).await
    }

    /// Creates a fresh database on `server`. The server must outlive the database for
    /// the drop to succeed.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), pgengine_testing::Error> {
    /// use pgengine_testing::{EphemeralCluster, TestDatabase, TestServer};
    /// let server = TestServer::from_cluster(
    ///     EphemeralCluster::builder().setting("shared_buffers", "256MB").start()?,
    /// );
    /// let db = TestDatabase::new_on(&server).await?;
    /// # Ok(()) }
    /// ```
    pub async fn new_on(server: &TestServer) -> Result<TestDatabase, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{DATABASE_PREFIX}{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            &random_token()[..6]
        );
        let sql = format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(&name));
        admin_execute(server.admin_url(), &sql)
            .await
            .map_err(|e| e.prefix(format!("could not create test database {name}")))?;
        Ok(TestDatabase {
            url: server.url_for(&name),
            admin_url: server.admin_url().to_string(),
            name,
        })
    }

    /// The database's name.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), pgengine_testing::Error> {
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// println!("{}", db.name());
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection string for the database (same user and host as the server's admin URL).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), pgengine_testing::Error> {
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// let config: tokio_postgres::Config = db.url().parse().unwrap();
    /// # Ok(()) }
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens a plain `tokio_postgres` connection (no TLS) to the database; its
    /// connection task is spawned with `tokio::spawn`, so call this inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// let client = db.connect().await?;
    /// let row = client.query_one("SELECT current_database()", &[]).await?;
    /// assert_eq!(row.get::<_, String>(0), db.name());
    /// # Ok(()) }
    /// ```
    /// A pgengine engine builder for the database, with the engine's defaults; add
    /// settings, then `build()`.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// let engine = db.engine_builder().max_connections(2).build().await?;
    /// # Ok(()) }
    /// ```
    pub fn engine_builder(&self) -> pgengine::EngineBuilder {
        pgengine::PostgresEngine::builder().url(&self.url)
    }

    /// A pgengine engine on the database, with the engine's defaults.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use pgengine::prelude::*;
    /// let db = pgengine_testing::TestDatabase::new().await?;
    /// let engine = db.engine().await?;
    /// engine.run_ddl("CREATE TABLE band (name text)").await?;
    /// # Ok(()) }
    /// ```
    pub async fn engine(&self) -> Result<pgengine::PostgresEngine, Error> {
        self.engine_builder().build().await.map_err(|e| {
            Error::new(
                ErrorKind::Database,
                format!("could not build an engine: {e}"),
            )
        })
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| Error::db(format!("could not connect to {}", self.url), e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop is sync and may run inside a runtime (of either flavor) or during a panic:
        // do the async work on a fresh thread with its own runtime, and wait for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name("pgengine-testing-dropdb".into())
            .spawn(move || -> Result<(), Error> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("could not build a tokio runtime", e))?;
                rt.block_on(drop_database(&admin_url, &name))
            });
        let outcome = match spawned {
            Ok(handle) => match handle.join() {
                Ok(result) => result,
                Err(_) => Err(Error::new(ErrorKind::Database, "the drop thread panicked")),
            },
            Err(e) => Err(Error::io("could not spawn a thread", e)),
        };
        if let Err(e) = outcome {
            eprintln!(
                "pgengine-testing: could not drop test database {}: {e}",
                self.name
            );
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), Error> {
    let ident = quote_ident(name);
    match admin_execute(
        admin_url,
        &format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"),
    )
    .await
    {
        Err(e) if e.is_syntax_error => {
            // PostgreSQL < 13 has no WITH (FORCE): end the sessions, then drop.
            let sql = format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid(); \
                 DROP DATABASE IF EXISTS {ident}",
                name.replace('\'', "''")
            );
            admin_execute(admin_url, &sql).await.map_err(|e| e.error)
        }
        other => other.map_err(|e| e.error),
    }
}

struct AdminError {
    error: Error,
    is_syntax_error: bool,
}

impl AdminError {
    fn prefix(self, context: String) -> Error {
        Error::new(self.error.kind(), format!("{context}: {}", self.error))
    }
}

/// Runs `sql` on a short-lived connection to `admin_url`, driving the connection in
/// place (no `tokio::spawn`, so it works on any tokio runtime).
async fn admin_execute(admin_url: &str, sql: &str) -> Result<(), AdminError> {
    let fail = |message: String, e: tokio_postgres::Error| AdminError {
        is_syntax_error: e.code() == Some(&SqlState::SYNTAX_ERROR),
        error: Error::db(message, e),
    };
    let work = async {
        let (client, connection) = tokio_postgres::connect(admin_url, NoTls)
            .await
            .map_err(|e| fail(format!("could not connect to {admin_url}"), e))?;
        let query = client.batch_execute(sql);
        tokio::pin!(connection);
        tokio::select! {
            result = query => result.map_err(|e| fail(format!("`{sql}` failed"), e)),
            result = &mut connection => Err(match result {
                Err(e) => fail(format!("connection to {admin_url} failed"), e),
                Ok(()) => AdminError {
                    is_syntax_error: false,
                    error: Error::new(ErrorKind::Database, format!("connection to {admin_url} closed")),
                },
            }),
        }
    };
    match tokio::time::timeout(ADMIN_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => Err(AdminError {
            is_syntax_error: false,
            error: Error::new(
                ErrorKind::Database,
                format!("`{sql}` timed out after {ADMIN_TIMEOUT:?}"),
            ),
        }),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
