//! Engine configuration: [`EngineBuilder`], from a URL, parts, or `DATABASE_URL`. No I/O.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::engine::PostgresEngine;
use crate::error::{Error, ErrorKind, Result};

/// Builds a [`PostgresEngine`]: where the server is, how big the pool is, what to log.
///
/// ```no_run
/// # async fn demo() -> pgengine::Result<()> {
/// use std::time::Duration;
/// let engine = pgengine::PostgresEngine::builder()
///     .url("postgres://postgres@localhost/app")
///     .max_connections(16)
///     .pool_wait_timeout(Duration::from_secs(5))
///     .application_name("billing")
///     .extensions(["uuid-ossp"])
///     .log_queries(true)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EngineBuilder {
    url: Option<String>,
    pg: tokio_postgres::Config,
    pub(crate) settings: EngineSettings,
}

/// What the engine needs after it is built (everything but the connection parameters).
#[derive(Clone, Debug)]
pub(crate) struct EngineSettings {
    pub max_connections: usize,
    pub pool_wait_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub extensions: Vec<String>,
    pub log_queries: bool,
    pub log_responses: bool,
    pub log_arguments: bool,
    pub slow_query_threshold: Option<Duration>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            pool_wait_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(10),
            extensions: Vec::new(),
            log_queries: false,
            log_responses: false,
            log_arguments: false,
            slow_query_threshold: None,
        }
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineBuilder {
    /// A builder with the defaults: `localhost`, user `postgres`, a pool of 10, a 30 s pool
    /// wait timeout, a 10 s connect timeout, `application_name` `pgengine`, no logging.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().host("db.internal").port(5433);
    /// # let _ = builder;
    /// ```
    pub fn new() -> Self {
        Self {
            url: None,
            pg: tokio_postgres::Config::new(),
            settings: EngineSettings::default(),
        }
    }

    /// The server as a URL (`postgres://user:password@host:port/dbname?options`) or a
    /// `key=value` connection string. Parts set afterwards override the URL's.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().url("postgres://app@localhost/app");
    /// # let _ = builder;
    /// ```
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The server's host name, IP address, or unix socket directory.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().host("127.0.0.1");
    /// # let _ = builder;
    /// ```
    pub fn host(mut self, host: &str) -> Self {
        self.pg.host(host);
        self
    }

    /// The server's port (default 5432).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().port(5433);
    /// # let _ = builder;
    /// ```
    pub fn port(mut self, port: u16) -> Self {
        self.pg.port(port);
        self
    }

    /// The user to connect as (default `postgres`).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().user("app");
    /// # let _ = builder;
    /// ```
    pub fn user(mut self, user: &str) -> Self {
        self.pg.user(user);
        self
    }

    /// The password; never shown by `Debug`.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().password("s3cret");
    /// assert!(!format!("{builder:?}").contains("s3cret"));
    /// ```
    pub fn password(mut self, password: impl AsRef<[u8]>) -> Self {
        self.pg.password(password);
        self
    }

    /// The database name (default: the user name).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().dbname("app");
    /// # let _ = builder;
    /// ```
    pub fn dbname(mut self, dbname: &str) -> Self {
        self.pg.dbname(dbname);
        self
    }

    /// The most connections the pool holds at once (default 10).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().max_connections(32);
    /// # let _ = builder;
    /// ```
    pub fn max_connections(mut self, max: usize) -> Self {
        self.settings.max_connections = max;
        self
    }

    /// How long a query waits for a free pooled connection before failing with
    /// [`ErrorKind::PoolTimeout`] (default 30 s; `None` waits forever).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().pool_wait_timeout(Duration::from_millis(500));
    /// # let _ = builder;
    /// ```
    pub fn pool_wait_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.settings.pool_wait_timeout = timeout.into();
        self
    }

    /// How long opening one connection may take (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().connect_timeout(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// The `application_name` the server shows in `pg_stat_activity` (default `pgengine`).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().application_name("billing");
    /// # let _ = builder;
    /// ```
    pub fn application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }

    /// Extensions that [`prep_database`](PostgresEngine::prep_database) creates when
    /// missing; `build` runs it.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().extensions(["uuid-ossp", "pg_trgm"]);
    /// # let _ = builder;
    /// ```
    pub fn extensions<I, S>(mut self, extensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.settings.extensions = extensions.into_iter().map(Into::into).collect();
        self
    }

    /// Emit a `tracing` event (target `pgengine::query`, level `INFO`) for every query:
    /// query id, SQL, argument count, duration and, for a failed one, its error (see
    /// [`log_arguments`](Self::log_arguments)).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().log_queries(true);
    /// # let _ = builder;
    /// ```
    pub fn log_queries(mut self, on: bool) -> Self {
        self.settings.log_queries = on;
        self
    }

    /// Emit a `tracing` event (target `pgengine::query`, level `DEBUG`) for every response:
    /// query id, row count and duration.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().log_responses(true);
    /// # let _ = builder;
    /// ```
    pub fn log_responses(mut self, on: bool) -> Self {
        self.settings.log_responses = on;
        self
    }

    /// Include argument values (their `Debug` form) in query events, and a failed
    /// query's whole server error. Off by default: arguments often hold personal data or
    /// secrets, and the server's message can quote them (`Key (email)=(alice@…) already
    /// exists`), so a failed query's event then shows only the error's SQLSTATE and the
    /// schema, table, column and constraint it names.
    ///
    /// The driver, tokio-postgres, logs each statement's parameter values itself, at
    /// `DEBUG` through the `log` crate (target `tokio_postgres`), whatever this says.
    /// Keep that target at `INFO` or above wherever logs leave the process, e.g.
    /// `RUST_LOG=debug,tokio_postgres=info` with `env_logger`, or the same directives in
    /// `tracing_subscriber::EnvFilter` (which sees `log` records through `tracing-log`).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().log_queries(true).log_arguments(true);
    /// # let _ = builder;
    /// ```
    pub fn log_arguments(mut self, on: bool) -> Self {
        self.settings.log_arguments = on;
        self
    }

    /// Log queries slower than this at `WARN` (target `pgengine::query`), whatever
    /// `log_queries` says.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().slow_query_threshold(Duration::from_millis(200));
    /// # let _ = builder;
    /// ```
    pub fn slow_query_threshold(mut self, threshold: Duration) -> Self {
        self.settings.slow_query_threshold = Some(threshold);
        self
    }

    /// Builds the engine: creates the pool, opens one connection to check the server
    /// version (a server older than PostgreSQL 12 is a `WARN`, not a failure), and creates
    /// the configured extensions.
    ///
    /// ```no_run
    /// # async fn demo() -> pgengine::Result<()> {
    /// let engine = pgengine::EngineBuilder::new().url("postgres://postgres@localhost/app").build().await?;
    /// # Ok(()) }
    /// ```
    pub async fn build(self) -> Result<PostgresEngine> {
        let (pg, settings) = self.into_parts()?;
        PostgresEngine::open(pg, settings).await
    }

    /// The driver configuration and the engine settings, with the URL applied under the parts.
    pub(crate) fn into_parts(self) -> Result<(tokio_postgres::Config, EngineSettings)> {
        let from_url = match &self.url {
            Some(url) => tokio_postgres::Config::from_str(url)
                .map_err(|e| Error::new(ErrorKind::Config, format!("invalid database URL: {e}")))?,
            None => tokio_postgres::Config::new(),
        };
        let mut pg = combine(&from_url, &self.pg);
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user("postgres");
        }
        if pg.get_application_name().is_none() {
            pg.application_name("pgengine");
        }
        pg.connect_timeout(self.settings.connect_timeout);
        if self.settings.max_connections == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "max_connections must be at least 1",
            ));
        }
        Ok((pg, self.settings))
    }
}

/// The connection settings of `parts` where it sets them, else those of `url`.
///
/// Built afresh because the driver's setters append hosts and ports rather than replace them.
fn combine(url: &tokio_postgres::Config, parts: &tokio_postgres::Config) -> tokio_postgres::Config {
    use tokio_postgres::config::Host;
    let hosts_from = if parts.get_hosts().is_empty() {
        url
    } else {
        parts
    };
    let ports_from = if parts.get_ports().is_empty() {
        url
    } else {
        parts
    };
    let mut pg = tokio_postgres::Config::new();
    for host in hosts_from.get_hosts() {
        match host {
            Host::Tcp(name) => pg.host(name),
            Host::Unix(path) => pg.host_path(path),
        };
    }
    for port in ports_from.get_ports() {
        pg.port(*port);
    }
    if let Some(user) = parts.get_user().or(url.get_user()) {
        pg.user(user);
    }
    if let Some(password) = parts.get_password().or(url.get_password()) {
        pg.password(password);
    }
    if let Some(dbname) = parts.get_dbname().or(url.get_dbname()) {
        pg.dbname(dbname);
    }
    if let Some(options) = url.get_options() {
        pg.options(options);
    }
    if let Some(name) = parts.get_application_name().or(url.get_application_name()) {
        pg.application_name(name);
    }
    pg.target_session_attrs(url.get_target_session_attrs());
    pg
}

/// The configuration as parsed, never the URL text: the driver's parsed form, whose
/// `Debug` shows whether a password is set (`password: Some(_)`) and never its value,
/// however the connection string spells it.
impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("EngineBuilder");
        match self.url.as_deref().map(tokio_postgres::Config::from_str) {
            Some(Ok(url)) => d.field("config", &combine(&url, &self.pg)),
            Some(Err(_)) => d
                .field("url", &"<not valid, not shown>")
                .field("config", &self.pg),
            None => d.field("config", &self.pg),
        };
        d.field("settings", &self.settings).finish()
    }
}
