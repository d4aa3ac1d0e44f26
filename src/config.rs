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
    /// Set by the builder or the URL; else [`DEFAULT_STATEMENT_CACHE_CAPACITY`].
    pub statement_cache_capacity: Option<usize>,
    pub lifecycle: crate::lifecycle::Lifecycle,
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
            statement_cache_capacity: None,
            lifecycle: crate::lifecycle::Lifecycle::default(),
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
    pub(crate) fn into_parts(mut self) -> Result<(tokio_postgres::Config, EngineSettings)> {
        self.take_url_engine_params()?;
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

// Statement cache (pgbouncer in transaction mode).
impl EngineBuilder {
    /// How many prepared statements each connection keeps (least recently used evicted;
    /// default 512). `0` prepares none: every statement is sent unnamed, parsed, bound
    /// and run in one round trip, as a pooler in transaction mode (pgbouncer) needs.
    /// The URL can say the same (`?statement_cache_capacity=0`); this setting wins.
    /// Unnamed, a parameter's type is declared from its Rust value (`i32` as `int4`,
    /// `String` as `text`, …) and the server casts it where the statement needs another.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .url("postgres://app@pgbouncer:6432/app")
    ///     .statement_cache_capacity(0);
    /// # let _ = builder;
    /// ```
    pub fn statement_cache_capacity(mut self, capacity: usize) -> Self {
        self.settings.statement_cache_capacity = Some(capacity);
        self
    }

    /// Removes the engine's own parameters (`statement_cache_capacity`) from the URL,
    /// which the driver would refuse, and applies them unless the builder set them.
    fn take_url_engine_params(&mut self) -> Result<()> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        let (url, capacity) = take_url_param(url, STATEMENT_CACHE_CAPACITY);
        let Some(capacity) = capacity else {
            return Ok(());
        };
        let capacity = capacity.parse::<usize>().map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "invalid {STATEMENT_CACHE_CAPACITY} in the database URL: {capacity:?} \
                     (a number of statements, 0 for none)"
                ),
            )
        })?;
        self.url = Some(url);
        self.settings
            .statement_cache_capacity
            .get_or_insert(capacity);
        Ok(())
    }
}

// Pool lifecycle.
impl EngineBuilder {
    /// Closes a connection once it is this old (when it is next idle) and opens a fresh
    /// one as needed. Default: none.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().max_lifetime(std::time::Duration::from_secs(1800));
    /// # let _ = builder;
    /// ```
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.settings.lifecycle.max_lifetime = Some(lifetime);
        self
    }

    /// Closes a connection not taken for this long, keeping
    /// [`min_connections`](Self::min_connections) open. Default: none.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().idle_timeout(std::time::Duration::from_secs(600));
    /// # let _ = builder;
    /// ```
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.lifecycle.idle_timeout = Some(timeout);
        self
    }

    /// Keeps at least this many connections open (opened in the background, and again
    /// after any is closed). Default: 0.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().min_connections(2);
    /// # let _ = builder;
    /// ```
    pub fn min_connections(mut self, min: usize) -> Self {
        self.settings.lifecycle.min_connections = min;
        self
    }

    /// Before handing out a connection not taken for longer than `after`, checks that
    /// it answers (an empty query); one that does not is closed and another is taken.
    /// Default: 60 s; `None` never checks.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().health_check_after(std::time::Duration::from_secs(30));
    /// # let _ = builder;
    /// ```
    pub fn health_check_after(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.settings.lifecycle.health_check_after = after.into();
        self
    }

    /// SQL run on each new connection before its first use (e.g.
    /// `SET search_path TO app`); several statements may be separated by `;`.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().after_connect_sql("SET timezone TO 'UTC'");
    /// # let _ = builder;
    /// ```
    pub fn after_connect_sql(mut self, sql: impl Into<String>) -> Self {
        self.settings.lifecycle.after_connect =
            Some(crate::lifecycle::AfterConnect::Sql(sql.into()));
        self
    }

    /// An async function run on each new connection before its first use; an error
    /// fails the connection.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().after_connect(|client| {
    ///     Box::pin(async move { client.batch_execute("SET ROLE app_user").await })
    /// });
    /// # let _ = builder;
    /// ```
    pub fn after_connect<F>(mut self, hook: F) -> Self
    where
        F: for<'a> Fn(&'a tokio_postgres::Client) -> crate::lifecycle::AfterConnectFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.settings.lifecycle.after_connect =
            Some(crate::lifecycle::AfterConnect::function(hook));
        self
    }

    /// What is reset on a connection before it is reused; see [`SessionReset`]
    /// (default: only an open transaction is rolled back).
    ///
    /// [`SessionReset`]: crate::SessionReset
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().session_reset(pgengine::SessionReset::DiscardAll);
    /// # let _ = builder;
    /// ```
    pub fn session_reset(mut self, reset: crate::lifecycle::SessionReset) -> Self {
        self.settings.lifecycle.session_reset = reset;
        self
    }
}

const STATEMENT_CACHE_CAPACITY: &str = "statement_cache_capacity";

/// `url` without its parameter `name` (URL query `?name=v`, or `name=v` in a
/// `key=value` string), and the parameter's value.
fn take_url_param(url: &str, name: &str) -> (String, Option<String>) {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if is_url {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None);
        };
        let mut value = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| match pair.split_once('=') {
                Some((key, v)) if key == name => {
                    value = Some(v.to_owned());
                    false
                }
                _ => true,
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (url, value)
    } else {
        let mut value = None;
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|pair| match pair.split_once('=') {
                Some((key, v)) if key.trim() == name => {
                    value = Some(v.trim().to_owned());
                    false
                }
                _ => true,
            })
            .collect();
        (kept.join(" "), value)
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
