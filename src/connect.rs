//! Opening a connection: through the driver, with TLS as configured, on a server of
//! the kind `target_session_attrs` asks for.
//!
//! The driver checks `any`, `read-write` and `read-only` itself. For libpq's `primary`,
//! `standby` and `prefer-standby`, the engine tries the hosts in order, one at a time,
//! and keeps the first session whose `pg_is_in_recovery()` fits (for `prefer-standby`:
//! a standby, else the first server that answered).

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config};

use crate::config::{EngineSettings, ServerRole};
use crate::tls::Tls;

/// Opens the pool's connections.
pub(crate) struct ServerConnector {
    tls: Tls,
    role: ServerRole,
    /// With a role: one configuration per host, in the order to try them.
    hosts: Vec<Config>,
}

type Session = (Client, JoinHandle<()>);

impl ServerConnector {
    /// The connector for an engine's settings.
    pub(crate) fn new(settings: &EngineSettings) -> Self {
        Self {
            tls: settings.tls.clone(),
            role: settings.server_role,
            hosts: settings.hosts_in_order.clone(),
        }
    }

    /// The first host's session that fits the role.
    async fn connect_by_role(&self) -> Result<Session, tokio_postgres::Error> {
        let mut last_error = None;
        let mut fallback: Option<Session> = None;
        for host in &self.hosts {
            let session = match deadpool_postgres::Connect::connect(&self.tls, host).await {
                Ok(session) => session,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            let standby: bool = match session.0.query_one("SELECT pg_is_in_recovery()", &[]).await {
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
                _ => last_error = Some(refuse(&session.0, self.role).await),
            }
        }
        match (fallback, last_error) {
            (Some(session), _) => Ok(session),
            (None, Some(error)) => Err(error),
            // Only without hosts, which `connect` never lets through.
            (None, None) => deadpool_postgres::Connect::connect(&self.tls, &Config::new()).await,
        }
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

impl deadpool_postgres::Connect for ServerConnector {
    fn connect(&self, pg: &Config) -> BoxFuture<'_, Result<Session, tokio_postgres::Error>> {
        if self.role == ServerRole::Any || self.hosts.is_empty() {
            return deadpool_postgres::Connect::connect(&self.tls, pg);
        }
        Box::pin(self.connect_by_role())
    }
}
