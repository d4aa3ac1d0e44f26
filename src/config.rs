//! Engine configuration: [`EngineBuilder`], from a URL, parts, or `DATABASE_URL`. No I/O.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use tokio_postgres::config::ChannelBinding;

use crate::connect::ServerRole;
use crate::conninfo;
use crate::error::{Error, ErrorKind, Result};
use crate::tls::{RootCert, SslMode, Tls, TlsSettings};

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
    network: NetworkSettings,
    /// Named nodes: name and URL, in the order given.
    pub(crate) nodes: Vec<(String, String)>,
    /// Read replicas' URLs.
    pub(crate) replicas: Vec<String>,
}

/// Connection settings given on the builder that the driver's `Config` cannot tell
/// apart from its defaults; each replaces the URL's when set.
#[derive(Clone, Debug, Default)]
struct NetworkSettings {
    tls: TlsSettings,
    hostaddrs: Vec<IpAddr>,
    channel_binding: Option<ChannelBinding>,
    keepalive: Keepalive,
}

/// TCP keepalive and `tcp_user_timeout`, as libpq names them; `None` is "not given".
#[derive(Clone, Debug, Default, PartialEq)]
struct Keepalive {
    keepalives: Option<bool>,
    idle: Option<Duration>,
    interval: Option<Duration>,
    count: Option<u32>,
    tcp_user_timeout: Option<Duration>,
}

impl Keepalive {
    /// The defaults: probes after 30 s idle, every 10 s, 3 unanswered ones close the
    /// connection; data unacknowledged for 30 s closes it too. A peer that vanishes
    /// silently is noticed within about a minute.
    const IDLE: Duration = Duration::from_secs(30);
    const INTERVAL: Duration = Duration::from_secs(10);
    const COUNT: u32 = 3;
    const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

    fn overridden_by(self, over: &Keepalive) -> Self {
        Self {
            keepalives: over.keepalives.or(self.keepalives),
            idle: over.idle.or(self.idle),
            interval: over.interval.or(self.interval),
            count: over.count.or(self.count),
            tcp_user_timeout: over.tcp_user_timeout.or(self.tcp_user_timeout),
        }
    }

    /// Sets these (or the defaults) on `pg`.
    fn apply(&self, pg: &mut tokio_postgres::Config) {
        pg.keepalives(self.keepalives.unwrap_or(true));
        pg.keepalives_idle(self.idle.unwrap_or(Self::IDLE));
        pg.keepalives_interval(self.interval.unwrap_or(Self::INTERVAL));
        pg.keepalives_retries(self.count.unwrap_or(Self::COUNT));
        pg.tcp_user_timeout(self.tcp_user_timeout.unwrap_or(Self::TCP_USER_TIMEOUT));
    }
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
    /// How connections use TLS.
    pub tls: Tls,
    /// How read-only work picks a read replica.
    pub replica_policy: ReplicaPolicy,
    /// Replicas lagging further behind are skipped.
    pub max_replica_lag: Option<Duration>,
    /// The kind of server every connection must reach, checked by the engine.
    pub server_role: ServerRole,
    /// With several hosts or a [`ServerRole`] other than `Any`: one configuration per
    /// host, in order.
    pub hosts_in_order: Vec<tokio_postgres::Config>,
    /// Shared connections for autocommit statements (none by default).
    pub multiplex: MultiplexSettings,
}

/// How autocommit statements share connections ([`EngineBuilder::multiplex`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MultiplexSettings {
    /// The shared connections, taken from the pool's `max_connections`; `0`: none,
    /// every statement takes a connection of its own.
    pub connections: usize,
    /// The most requests sent and not yet answered on one shared connection.
    pub max_in_flight: usize,
    /// A connection whose oldest unanswered request has run this long is stalled: it
    /// takes no new request until that one is answered.
    pub stall_after: Duration,
}

impl Default for MultiplexSettings {
    /// Off; once on, 32 requests in flight per connection, stalled after 10 ms.
    fn default() -> Self {
        Self {
            connections: 0,
            max_in_flight: 32,
            stall_after: Duration::from_millis(10),
        }
    }
}

/// How read-only work picks among the read replicas
/// ([`EngineBuilder::read_replica`]).
///
/// ```
/// let builder = pgengine::EngineBuilder::new().replica_policy(pgengine::ReplicaPolicy::LeastBusy);
/// # let _ = builder;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplicaPolicy {
    /// Each in turn (the default).
    #[default]
    RoundRobin,
    /// The one with the fewest connections in use.
    LeastBusy,
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
            tls: Tls::plain(),
            replica_policy: ReplicaPolicy::RoundRobin,
            max_replica_lag: None,
            server_role: ServerRole::Any,
            hosts_in_order: Vec::new(),
            multiplex: MultiplexSettings::default(),
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
            network: NetworkSettings::default(),
            nodes: Vec::new(),
            replicas: Vec::new(),
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

    /// How long opening one connection may take (default 10 s, or the URL's
    /// `connect_timeout`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().connect_timeout(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.pg.connect_timeout(timeout);
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

    /// The server's IP address, used instead of resolving the host name (libpq's
    /// `hostaddr`); the host name is still the one TLS checks. Call once per host.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .host("db.internal")
    ///     .hostaddr("10.0.0.7".parse().unwrap());
    /// # let _ = builder;
    /// ```
    pub fn hostaddr(mut self, address: IpAddr) -> Self {
        self.network.hostaddrs.push(address);
        self
    }

    /// How much TLS to use, as libpq's `sslmode` (default [`SslMode::Prefer`]).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().ssl_mode(pgengine::SslMode::VerifyFull);
    /// # let _ = builder;
    /// ```
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.network.tls.mode = Some(mode);
        self
    }

    /// The CA certificates (a PEM file) that the server's certificate must chain to, as
    /// libpq's `sslrootcert`; `"system"` means the platform's trusted roots (and then
    /// `sslmode` must be `verify-full`, its default with `system`).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .ssl_mode(pgengine::SslMode::VerifyFull)
    ///     .ssl_root_cert("/etc/ssl/db-ca.pem");
    /// # let _ = builder;
    /// ```
    pub fn ssl_root_cert(mut self, file: impl AsRef<str>) -> Self {
        self.network.tls.root_cert = Some(RootCert::parse(file.as_ref()));
        self
    }

    /// A client certificate and its private key (PEM files), as libpq's `sslcert` and
    /// `sslkey`; the key must not be readable by group or others.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .ssl_client_cert("/etc/app/client.crt", "/etc/app/client.key");
    /// # let _ = builder;
    /// ```
    pub fn ssl_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.network.tls.cert = Some(cert.into());
        self.network.tls.key = Some(key.into());
        self
    }

    /// SCRAM channel binding, as libpq's `channel_binding` (default `Prefer`);
    /// `Require` refuses a server that does not bind the authentication to the TLS
    /// session.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .channel_binding(pgengine::config::ChannelBinding::Require);
    /// # let _ = builder;
    /// ```
    pub fn channel_binding(mut self, binding: ChannelBinding) -> Self {
        self.network.channel_binding = Some(binding);
        self
    }

    /// Whether TCP keepalive probes are sent (libpq's `keepalives`, default on).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().keepalives(false);
    /// # let _ = builder;
    /// ```
    pub fn keepalives(mut self, on: bool) -> Self {
        self.network.keepalive.keepalives = Some(on);
        self
    }

    /// Idle time before the first keepalive probe (libpq's `keepalives_idle`, default
    /// 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().keepalives_idle(Duration::from_secs(60));
    /// # let _ = builder;
    /// ```
    pub fn keepalives_idle(mut self, idle: Duration) -> Self {
        self.network.keepalive.idle = Some(idle);
        self
    }

    /// Time between keepalive probes (libpq's `keepalives_interval`, default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().keepalives_interval(Duration::from_secs(5));
    /// # let _ = builder;
    /// ```
    pub fn keepalives_interval(mut self, interval: Duration) -> Self {
        self.network.keepalive.interval = Some(interval);
        self
    }

    /// Unanswered probes before the connection is considered dead (libpq's
    /// `keepalives_count`, default 3).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().keepalives_count(5);
    /// # let _ = builder;
    /// ```
    pub fn keepalives_count(mut self, count: u32) -> Self {
        self.network.keepalive.count = Some(count);
        self
    }

    /// How long sent data may stay unacknowledged before the connection is closed
    /// (libpq's `tcp_user_timeout`, in milliseconds there; default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().tcp_user_timeout(Duration::from_secs(20));
    /// # let _ = builder;
    /// ```
    pub fn tcp_user_timeout(mut self, timeout: Duration) -> Self {
        self.network.keepalive.tcp_user_timeout = Some(timeout);
        self
    }

    /// A named node, as Piccolo's `extra_nodes`: another server (a read replica, say)
    /// reached through [`PostgresEngine::node`] with the same API. Each node has its own
    /// pool and takes this builder's settings (pool size, timeouts, TLS, logging, …),
    /// with `url` giving its connection; its extensions are not created (a replica
    /// gets them from its primary). Closing the engine's pool closes its nodes'.
    /// Repeatable; a name given twice keeps the last URL.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .url("postgres://app@primary.internal/app")
    ///     .extra_node("read_1", "postgres://app@replica-1.internal/app");
    /// # let _ = builder;
    /// ```
    pub fn extra_node(mut self, name: &str, url: &str) -> Self {
        self.nodes.retain(|(known, _)| known != name);
        self.nodes.push((name.to_owned(), url.to_owned()));
        self
    }

    /// A read replica: read-only transactions (`transaction().read_only(true)`, outside
    /// any other transaction) and [`PostgresEngine::replica`] run on one of them, picked
    /// by the [`replica_policy`](Self::replica_policy); when none is fit (down, or
    /// lagging beyond [`max_replica_lag`](Self::max_replica_lag)) they run on the
    /// primary, without an error. Everything else stays on the primary. Each replica
    /// has its own pool and takes this builder's settings, as a named node does.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new()
    ///     .url("postgres://app@primary.internal/app")
    ///     .read_replica("postgres://app@replica-1.internal/app")
    ///     .read_replica("postgres://app@replica-2.internal/app");
    /// # let _ = builder;
    /// ```
    pub fn read_replica(mut self, url: &str) -> Self {
        self.replicas.push(url.to_owned());
        self
    }

    /// How read-only work picks a read replica (default: round-robin).
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().replica_policy(pgengine::ReplicaPolicy::LeastBusy);
    /// # let _ = builder;
    /// ```
    pub fn replica_policy(mut self, policy: ReplicaPolicy) -> Self {
        self.settings.replica_policy = policy;
        self
    }

    /// Skips a read replica whose replay lags further behind than `lag` (the age of
    /// the last transaction it replayed, when it has not replayed all it received;
    /// measured at most once a second). Default: no bound.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().max_replica_lag(std::time::Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn max_replica_lag(mut self, lag: Duration) -> Self {
        self.settings.max_replica_lag = Some(lag);
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

    /// The driver configuration and the engine settings: the URL's configuration with
    /// what the builder set applied over it.
    pub(crate) fn into_parts(self) -> Result<(tokio_postgres::Config, EngineSettings)> {
        let builder = self.clone();
        let (pg, mut settings) = self.into_parts_as_given()?;
        if settings.server_role != ServerRole::Any || pg.get_hosts().len() > 1 {
            settings.hosts_in_order = builder.one_per_host(&pg)?;
        }
        Ok((pg, settings))
    }

    /// The configuration of each host of `pg` alone, in order: this builder with its
    /// hosts replaced by that one.
    fn one_per_host(&self, pg: &tokio_postgres::Config) -> Result<Vec<tokio_postgres::Config>> {
        let (hosts, ports, addresses) = (pg.get_hosts(), pg.get_ports(), pg.get_hostaddrs());
        (0..hosts.len())
            .map(|i| {
                let mut one = self.clone();
                let mut parts = tokio_postgres::Config::new();
                match &hosts[i] {
                    tokio_postgres::config::Host::Tcp(name) => parts.host(name),
                    tokio_postgres::config::Host::Unix(path) => parts.host_path(path),
                };
                // libpq: one port for all hosts, or one per host.
                if let Some(port) = ports.get(i).or(ports.first()) {
                    parts.port(*port);
                }
                if let Some(user) = self.pg.get_user() {
                    parts.user(user);
                }
                if let Some(password) = self.pg.get_password() {
                    parts.password(password);
                }
                if let Some(dbname) = self.pg.get_dbname() {
                    parts.dbname(dbname);
                }
                if let Some(name) = self.pg.get_application_name() {
                    parts.application_name(name);
                }
                if let Some(timeout) = self.pg.get_connect_timeout() {
                    parts.connect_timeout(*timeout);
                }
                one.pg = parts;
                one.network.hostaddrs = addresses.get(i).copied().into_iter().collect();
                Ok(one.into_parts_as_given()?.0)
            })
            .collect()
    }

    /// [`into_parts`](Self::into_parts) without the configurations per host.
    fn into_parts_as_given(mut self) -> Result<(tokio_postgres::Config, EngineSettings)> {
        self.take_url_engine_params()?;
        if self.settings.max_connections == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "max_connections must be at least 1",
            ));
        }
        let multiplex = &self.settings.multiplex;
        if multiplex.connections > 0 && multiplex.connections >= self.settings.max_connections {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "multiplex({}) takes its shared connections from max_connections ({}), \
                     which must be larger: transactions and batches need connections of \
                     their own",
                    multiplex.connections, self.settings.max_connections
                ),
            ));
        }
        let parts = &self.pg;
        let network = &self.network;
        let replace_hosts = !parts.get_hosts().is_empty()
            || !parts.get_ports().is_empty()
            || !network.hostaddrs.is_empty();
        let url = match &self.url {
            Some(url) => UrlSettings::parse(url, replace_hosts)?,
            None => UrlSettings::default(),
        };
        let mut pg = url.driver;
        if replace_hosts {
            set_hosts(&mut pg, parts, &url.hosts, &network.hostaddrs);
        }
        if let Some(user) = parts.get_user() {
            pg.user(user);
        }
        if let Some(password) = parts.get_password() {
            pg.password(password);
        }
        if let Some(dbname) = parts.get_dbname() {
            pg.dbname(dbname);
        }
        if let Some(name) = parts.get_application_name() {
            pg.application_name(name);
        }
        if let Some(binding) = network.channel_binding {
            pg.channel_binding(binding);
        }
        if pg.get_hosts().is_empty() {
            // TLS needs a host name: with only `hostaddr`, the address is the name, as in libpq.
            let addresses: Vec<String> = pg.get_hostaddrs().iter().map(IpAddr::to_string).collect();
            for address in addresses {
                pg.host(address);
            }
        }
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user("postgres");
        }
        if pg.get_application_name().is_none() {
            pg.application_name("pgengine");
        }
        if pg.get_password().is_none()
            && let Some(password) = password_from_file(&pg, url.passfile.as_deref())
        {
            pg.password(password);
        }
        let connect_timeout = parts
            .get_connect_timeout()
            .or(pg.get_connect_timeout())
            .copied()
            .unwrap_or(self.settings.connect_timeout);
        pg.connect_timeout(connect_timeout);
        self.settings.connect_timeout = connect_timeout;
        url.keepalive
            .overridden_by(&network.keepalive)
            .apply(&mut pg);
        let tls = Tls::resolve(&url.tls.overridden_by(&network.tls), pg.get_hosts())?;
        pg.ssl_mode(tls.mode);
        refuse_what_cannot_be_honoured(&pg, &tls)?;
        self.settings.tls = tls;
        match url.session_attrs {
            Some(SessionAttrs::Driver(attrs)) => {
                pg.target_session_attrs(attrs);
            }
            Some(SessionAttrs::Role(role)) => self.settings.server_role = role,
            None => {}
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

    /// Runs statements outside transactions on `connections` shared connections,
    /// pipelined back to back with other callers' statements, instead of taking a
    /// connection each (`0`, the default, turns it off). On a server with few cores
    /// this serves many concurrent callers with a handful of backends.
    ///
    /// Only a single statement that cannot touch the session's own state is shared:
    /// one starting with `SELECT`, `WITH`, `VALUES`, `TABLE`, `INSERT`, `UPDATE` or
    /// `DELETE`, without `;`, and naming none of the functions and objects that read or
    /// change a session (`set_config`, `pg_settings`, advisory locks, `pg_temp`,
    /// `currval`, `lastval`, `setseed`, `pg_prepared_statements`, `pg_backend_pid`,
    /// `dblink`, `U&` escapes, `SELECT … INTO`). Transactions, batches, COPY and `run_ddl` keep
    /// a connection of their own, as does everything when the shared connections are
    /// full or stalled (see [`multiplex_max_in_flight`](Self::multiplex_max_in_flight) and
    /// [`multiplex_stall_after`](Self::multiplex_stall_after)).
    /// [`PostgresEngine::exclusive`](crate::PostgresEngine::exclusive) gives a
    /// connection of its own to a query the engine cannot judge, such as a call of your
    /// function that sets a session variable.
    ///
    /// A shared request whose future is dropped is not cancelled (a cancel request would
    /// stop whatever the backend runs then, maybe another caller's statement): it runs
    /// to its end, and its answer is dropped. The shared connections count against
    /// [`max_connections`](Self::max_connections), which must be larger.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().max_connections(32).multiplex(4);
    /// # let _ = builder;
    /// ```
    pub fn multiplex(mut self, connections: usize) -> Self {
        self.settings.multiplex.connections = connections;
        self
    }

    /// With [`multiplex`](Self::multiplex): the most requests sent and not yet
    /// answered on one shared connection (default 32). A request finding every shared
    /// connection full takes a connection of its own.
    ///
    /// ```
    /// let builder = pgengine::EngineBuilder::new().multiplex(4).multiplex_max_in_flight(8);
    /// # let _ = builder;
    /// ```
    pub fn multiplex_max_in_flight(mut self, max: usize) -> Self {
        self.settings.multiplex.max_in_flight = max.max(1);
        self
    }

    /// With [`multiplex`](Self::multiplex): how long the oldest unanswered request of a
    /// shared connection may run before the connection counts as stalled (default
    /// 10 ms). A stalled connection takes no new request until that one is answered, so
    /// a slow statement delays only the requests queued behind it before then — at most
    /// `max_in_flight - 1` of them.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgengine::EngineBuilder::new().multiplex(4).multiplex_stall_after(Duration::from_millis(5));
    /// # let _ = builder;
    /// ```
    pub fn multiplex_stall_after(mut self, after: Duration) -> Self {
        self.settings.multiplex.stall_after = after;
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

/// libpq's environment variables and the parameters they stand for.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGDATABASE", "dbname"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLNEGOTIATION", "sslnegotiation"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGAPPNAME", "application_name"),
    ("PGOPTIONS", "options"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// A `key=value` connection string from libpq's environment variables (`PGHOST`,
/// `PGPORT`, `PGUSER`, …), or `None` when none is set.
pub(crate) fn from_environment() -> Option<String> {
    let pairs: Vec<String> = ENVIRONMENT
        .iter()
        .filter_map(|(variable, key)| {
            let value = std::env::var(variable).ok().filter(|v| !v.is_empty())?;
            Some(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ))
        })
        .collect();
    (!pairs.is_empty()).then(|| pairs.join(" "))
}

/// The libpq parameters the driver does not parse (or parses differently); pgengine
/// reads them itself.
const OWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "gssencmode",
    "passfile",
    "target_session_attrs",
];

/// What a URL says: the driver's configuration of everything it parses, and the rest.
#[derive(Default)]
struct UrlSettings {
    driver: tokio_postgres::Config,
    /// The URL's hosts, ports and addresses (when the driver configuration has them
    /// removed, to be replaced).
    hosts: tokio_postgres::Config,
    tls: TlsSettings,
    keepalive: Keepalive,
    passfile: Option<PathBuf>,
    session_attrs: Option<SessionAttrs>,
}

/// libpq's `target_session_attrs`: what kind of server a session must reach. The
/// driver checks `any`, `read-write` and `read-only` itself; the engine checks the
/// others ([`ServerRole`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionAttrs {
    Driver(tokio_postgres::config::TargetSessionAttrs),
    Role(ServerRole),
}

impl UrlSettings {
    fn parse(url: &str, without_hosts: bool) -> Result<Self> {
        let split = conninfo::split(url, OWN_PARAMETERS, false)?;
        let driver_parse = |text: &str| {
            tokio_postgres::Config::from_str(text).map_err(|e| {
                let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
                Error::new(
                    ErrorKind::Config,
                    format!("invalid database URL: {e}{}", cause.unwrap_or_default()),
                )
            })
        };
        let hosts = driver_parse(&split.driver)?;
        let driver = if without_hosts {
            driver_parse(&conninfo::split(url, OWN_PARAMETERS, true)?.driver)?
        } else {
            hosts.clone()
        };
        let mut settings = Self {
            driver,
            hosts,
            ..Self::default()
        };
        for (key, value) in &split.taken {
            settings.take(key, value)?;
        }
        Ok(settings)
    }

    /// Reads one of [`OWN_PARAMETERS`].
    fn take(&mut self, key: &str, value: &str) -> Result<()> {
        let invalid = |expected: &str| {
            Error::new(
                ErrorKind::Config,
                format!("invalid {key} value {value:?} (expected {expected})"),
            )
        };
        // libpq reads numbers leniently; a value of 0 (or less) means the system default.
        let seconds = |value: &str| -> Result<Option<Duration>> {
            let n: i64 = value
                .trim()
                .parse()
                .map_err(|_| invalid("a number of seconds"))?;
            Ok((n > 0).then(|| Duration::from_secs(n as u64)))
        };
        match key {
            "sslmode" => self.tls.mode = Some(value.parse()?),
            "sslrootcert" => self.tls.root_cert = Some(RootCert::parse(value)),
            "sslcert" => self.tls.cert = Some(PathBuf::from(value)),
            "sslkey" => self.tls.key = Some(PathBuf::from(value)),
            "keepalives" => {
                let n: i64 = value.trim().parse().map_err(|_| invalid("0 or 1"))?;
                self.keepalive.keepalives = Some(n != 0);
            }
            "keepalives_idle" => self.keepalive.idle = seconds(value)?,
            "keepalives_interval" => self.keepalive.interval = seconds(value)?,
            "keepalives_count" => {
                let n: i64 = value.trim().parse().map_err(|_| invalid("a count"))?;
                self.keepalive.count = u32::try_from(n).ok().filter(|n| *n > 0);
            }
            "tcp_user_timeout" => {
                let n: i64 = value.trim().parse().map_err(|_| invalid("milliseconds"))?;
                self.keepalive.tcp_user_timeout = (n > 0).then(|| Duration::from_millis(n as u64));
            }
            "passfile" => self.passfile = Some(PathBuf::from(value)),
            "target_session_attrs" => {
                use tokio_postgres::config::TargetSessionAttrs as Driver;
                self.session_attrs = Some(match value {
                    "any" => SessionAttrs::Driver(Driver::Any),
                    "read-write" => SessionAttrs::Driver(Driver::ReadWrite),
                    "read-only" => SessionAttrs::Driver(Driver::ReadOnly),
                    "primary" => SessionAttrs::Role(ServerRole::Primary),
                    "standby" => SessionAttrs::Role(ServerRole::Standby),
                    "prefer-standby" => SessionAttrs::Role(ServerRole::PreferStandby),
                    _ => {
                        return Err(invalid(
                            "any, read-write, read-only, primary, standby or prefer-standby",
                        ));
                    }
                });
            }
            "gssencmode" => match value {
                // Without GSSAPI support, libpq treats `prefer` as `disable`.
                "disable" | "prefer" => {}
                "require" => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "gssencmode=require: GSSAPI encryption is not supported",
                    ));
                }
                _ => return Err(invalid("disable, prefer or require")),
            },
            _ => unreachable!("only OWN_PARAMETERS are taken"),
        }
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

/// A `Config` error for settings no connection can meet, rather than a failure (or a
/// weaker connection) later.
fn refuse_what_cannot_be_honoured(pg: &tokio_postgres::Config, tls: &Tls) -> Result<()> {
    use tokio_postgres::config::{SslMode as DriverSslMode, SslNegotiation};
    let refuse = |message: &str| Err(Error::new(ErrorKind::Config, message));
    let (hosts, addresses) = (pg.get_hosts().len(), pg.get_hostaddrs().len());
    if addresses > 0 && hosts != addresses {
        return refuse("hostaddr must give one address per host");
    }
    let ports = pg.get_ports().len();
    if ports > 1 && ports != hosts {
        return refuse("port must give one port, or one per host");
    }
    let may_use_tls = tls.mode != DriverSslMode::Disable || tls.retry_with_tls;
    if pg.get_channel_binding() == ChannelBinding::Require && !may_use_tls {
        return refuse(
            "channel_binding=require needs TLS, which sslmode (or a unix socket) rules out",
        );
    }
    if pg.get_ssl_negotiation() == SslNegotiation::Direct && tls.mode != DriverSslMode::Require {
        return refuse("sslnegotiation=direct needs sslmode=require, verify-ca or verify-full");
    }
    Ok(())
}

/// The password file's password for the first host of `pg` (libpq's `passfile`, else
/// `PGPASSFILE`, else `~/.pgpass`).
fn password_from_file(
    pg: &tokio_postgres::Config,
    file: Option<&std::path::Path>,
) -> Option<String> {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first()? {
        Host::Tcp(name) => name.clone(),
        // libpq matches its default socket directory as `localhost`.
        Host::Unix(dir)
            if ["/var/run/postgresql", "/run/postgresql", "/tmp"]
                .iter()
                .any(|d| dir == std::path::Path::new(d)) =>
        {
            "localhost".to_owned()
        }
        Host::Unix(dir) => dir.display().to_string(),
    };
    let user = pg.get_user()?;
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    crate::passfile::lookup(file, &host, port, pg.get_dbname().unwrap_or(user), user)
}

/// Sets the host list: the builder's hosts, ports and addresses where it gave them,
/// else the URL's.
fn set_hosts(
    pg: &mut tokio_postgres::Config,
    parts: &tokio_postgres::Config,
    url: &tokio_postgres::Config,
    hostaddrs: &[IpAddr],
) {
    use tokio_postgres::config::Host;
    let hosts = if parts.get_hosts().is_empty() {
        url
    } else {
        parts
    };
    for host in hosts.get_hosts() {
        match host {
            Host::Tcp(name) => pg.host(name),
            Host::Unix(path) => pg.host_path(path),
        };
    }
    let ports = if parts.get_ports().is_empty() {
        url
    } else {
        parts
    };
    for port in ports.get_ports() {
        pg.port(*port);
    }
    let addresses = if hostaddrs.is_empty() {
        url.get_hostaddrs()
    } else {
        hostaddrs
    };
    for address in addresses {
        pg.hostaddr(*address);
    }
}

/// The configuration as parsed, never the URL text: the driver's parsed form, whose
/// `Debug` shows whether a password is set (`password: Some(_)`) and never its value,
/// however the connection string spells it.
impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("EngineBuilder");
        match self.clone().into_parts() {
            Ok((config, _)) => d.field("config", &config),
            Err(_) => d
                .field("url", &"<not valid, not shown>")
                .field("config", &self.pg),
        };
        let nodes: Vec<&str> = self.nodes.iter().map(|(name, _)| name.as_str()).collect();
        d.field("settings", &self.settings)
            .field("nodes", &nodes)
            .field("read_replicas", &self.replicas.len())
            .finish()
    }
}
