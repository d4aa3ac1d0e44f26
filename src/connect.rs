//! Opening a connection: through the driver, with TLS as configured, on a server of
//! the kind `target_session_attrs` asks for, remembering which server it reached.
//!
//! With one host, the driver connects. With several, the engine tries them itself, one
//! at a time (in a random order with `load_balance_hosts=random`, as libpq does), so
//! that each [`Session`] knows its server: an abandoned request is then cancelled there
//! (see [`Canceller`](crate::cancel::Canceller)). The driver checks `any`, `read-write`
//! and `read-only` on each host; for libpq's `primary`, `standby` and `prefer-standby`
//! the engine keeps the first session whose `pg_is_in_recovery()` fits (for
//! `prefer-standby`: a standby, else the first server that answered).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::{ClientWrapper, Connect};
use rand::seq::SliceRandom;
use tokio_postgres::config::LoadBalanceHosts;
use tokio_postgres::{Client, Config};

use crate::cancel::ServerAddress;
use crate::counters::Counters;
use crate::lifecycle::{self, Lifecycle};
use crate::statements::Recency;
use crate::tls::Tls;

/// The engine's pool of sessions.
pub(crate) type Pool = managed::Pool<ServerConnector>;
/// A session taken from the [`Pool`].
pub(crate) type Object = managed::Object<ServerConnector>;
/// A hook run on the pool's sessions.
pub(crate) type Hook = managed::Hook<ServerConnector>;

/// The kind of server each connection must reach, beyond what the driver checks
/// (libpq's `target_session_attrs=primary | standby | prefer-standby`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ServerRole {
    /// Whichever server answers first (or what the driver checks).
    #[default]
    Any,
    /// Not in hot standby.
    Primary,
    /// In hot standby.
    Standby,
    /// A standby if one answers, else any server.
    PreferStandby,
}

impl ServerRole {
    /// The libpq name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Primary => "primary",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }
}

/// One pooled session: the driver's client, the statements prepared on it (the
/// engine's statement cache) and the server it reached.
///
/// Boxed once, when the session opens: the pool moves a session on every checkout and
/// return, and a pointer is moved in registers where the driver's client (160 bytes)
/// would be copied through memory each time.
pub(crate) struct Session(Box<SessionParts>);

struct SessionParts {
    client: ClientWrapper,
    /// Shared with the connector.
    server: Option<Arc<ServerAddress>>,
    /// Lives as long as the session (its statements are closed with it).
    statements: Recency,
    /// When the pool last handed the session out (or opened it).
    handed_out_at: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.0.client)
            .field("server", &self.0.server)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session on `client`, reaching `server`, with no statement prepared.
    fn new(client: ClientWrapper, server: Option<Arc<ServerAddress>>) -> Self {
        Self(Box::new(SessionParts {
            client,
            server,
            statements: Recency::default(),
            handed_out_at: Instant::now(),
        }))
    }

    /// Records that the pool hands the session out again, and returns how long it was
    /// idle: since it was last handed out, or opened.
    fn handed_out_again(&mut self) -> Duration {
        let now = Instant::now();
        let before = std::mem::replace(&mut self.0.handed_out_at, now);
        now.saturating_duration_since(before)
    }

    /// The statements prepared on this session (see
    /// [`StatementCache`](crate::statements::StatementCache)).
    pub(crate) fn statements(&self) -> &Recency {
        &self.0.statements
    }

    /// Where this session's server takes cancel requests; `None` when it is not known
    /// (a host name's or `hostaddr`'s address list the driver chose from).
    pub(crate) fn server(&self) -> Option<&ServerAddress> {
        self.0.server.as_deref()
    }
}

impl Deref for Session {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.0.client
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.0.client
    }
}

/// Opens the pool's sessions, and checks an idle one before it is reused.
pub(crate) struct ServerConnector {
    tls: Tls,
    role: ServerRole,
    /// The whole configuration, for one host.
    pg: Config,
    /// Where that one host takes cancel requests.
    server: Option<Arc<ServerAddress>>,
    /// With several hosts: one configuration per host, in the order given.
    hosts: Vec<(Config, Option<Arc<ServerAddress>>)>,
    shuffle: bool,
    /// The checks before an idle session is reused (see [`lifecycle::recycle`]).
    lifecycle: Arc<Lifecycle>,
    /// The pool's counters, which count the sessions those checks close.
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ServerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConnector")
            .field("role", &self.role)
            .field("hosts", &self.hosts.len())
            .finish_non_exhaustive()
    }
}

impl ServerConnector {
    /// The connector for `pg`, over `tls`, to a server of `role`; `hosts` are `pg`'s
    /// hosts each alone (empty with one host and no role to check). An idle session is
    /// checked as `lifecycle` says before it is reused, and one closed is counted in
    /// `counters`.
    pub(crate) fn new(
        pg: Config,
        tls: Tls,
        role: ServerRole,
        hosts: &[Config],
        lifecycle: Arc<Lifecycle>,
        counters: Arc<Counters>,
    ) -> Self {
        let hosts = hosts
            .iter()
            .map(|host| (host.clone(), ServerAddress::of(host).map(Arc::new)))
            .collect();
        Self {
            tls,
            role,
            shuffle: pg.get_load_balance_hosts() == LoadBalanceHosts::Random,
            server: ServerAddress::of(&pg).map(Arc::new),
            pg,
            hosts,
            lifecycle,
            counters,
        }
    }

    /// The first host's session that fits the role.
    async fn connect_host_by_host(&self) -> Result<Session, tokio_postgres::Error> {
        let mut order: Vec<_> = self.hosts.iter().collect();
        if self.shuffle {
            order.shuffle(&mut rand::rng());
        }
        let mut last_error = None;
        let mut fallback: Option<Session> = None;
        for (host, server) in order {
            let session = match self.tls.connect(host).await {
                Ok((client, task)) => {
                    Session::new(ClientWrapper::new(client, task), server.clone())
                }
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            if self.role == ServerRole::Any {
                return Ok(session);
            }
            let standby: bool = match session.query_one("SELECT pg_is_in_recovery()", &[]).await {
                Ok(row) => row.get(0),
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            match (self.role, standby) {
                (ServerRole::Primary, false) | (ServerRole::Standby, true) => return Ok(session),
                (ServerRole::PreferStandby, true) => return Ok(session),
                (ServerRole::PreferStandby, false) if fallback.is_none() => {
                    fallback = Some(session);
                }
                _ => last_error = Some(refuse(&session, self.role).await),
            }
        }
        match (fallback, last_error) {
            (Some(session), _) => Ok(session),
            (None, Some(error)) => Err(error),
            // Only without hosts, which `connect` never lets through.
            (None, None) => self.connect_one().await,
        }
    }

    /// A session on the configuration's one server.
    async fn connect_one(&self) -> Result<Session, tokio_postgres::Error> {
        let (client, task) = self.tls.connect(&self.pg).await?;
        Ok(Session::new(
            ClientWrapper::new(client, task),
            self.server.clone(),
        ))
    }
}

/// The driver's errors cannot be made outside it: the server makes this one, an
/// `08001` ("unable to establish connection") that names the setting.
async fn refuse(client: &Client, role: ServerRole) -> tokio_postgres::Error {
    let sql = format!(
        "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '08001', MESSAGE = \
         'no server of the kind target_session_attrs={} asks for'; END $$",
        role.name()
    );
    match client.batch_execute(&sql).await {
        Err(error) => error,
        // The block always raises; were it not to, a count mismatch is the driver's own.
        Ok(()) => match client.query_one("SELECT 1 WHERE false", &[]).await {
            Err(error) => error,
            Ok(_) => unreachable!("no row can come back"),
        },
    }
}

impl managed::Manager for ServerConnector {
    type Type = Session;
    type Error = tokio_postgres::Error;

    /// Opens a session. (Boxed: the pool's checkout future holds this one inline, and
    /// a connection attempt's state is kilobytes that every query's future would carry.)
    async fn create(&self) -> Result<Session, tokio_postgres::Error> {
        if self.hosts.is_empty() {
            Box::pin(self.connect_one()).await
        } else {
            Box::pin(self.connect_host_by_host()).await
        }
    }

    /// Before an idle session is reused: the engine's checks (age, health, session
    /// reset: see [`lifecycle::recycle`]), then a session the server closed is not
    /// reused. (Run here rather than in a `pre_recycle` hook: no boxed future and no
    /// clones per checkout, unless a check has a request to send.)
    async fn recycle(
        &self,
        session: &mut Session,
        metrics: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        let idle = session.handed_out_again();
        if let Some(check) =
            lifecycle::recycle(session, metrics, idle, &self.lifecycle, &self.counters)?
        {
            check.await?;
        }
        if session.is_closed() {
            return Err(RecycleError::message("the server closed the connection"));
        }
        Ok(())
    }
}
