//! [`EngineContext`]: what every clone of an engine shares (its pools, settings and
//! query log), and the one way a transaction ends on a connection.
//!
//! It sits below the runner and the transactions, which reach the pool and the log
//! through it; the [`PostgresEngine`](crate::PostgresEngine) facade on top only wraps
//! it in an `Arc`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::EngineSettings;
use crate::error::{Error, Result};
use crate::multiplex::Multiplexer;
use crate::pool::{Connection, ConnectionPool};
use crate::query_log::QueryLog;
use crate::routing::ReadRouting;
use crate::telemetry::Telemetry;

/// What every clone of an engine shares.
pub(crate) struct EngineContext {
    /// Tells engines apart in a task's ambient transactions.
    pub(crate) id: u64,
    pub(crate) pool: ConnectionPool,
    /// The connections of `pool` that statements outside transactions share (none
    /// unless multiplexing is on).
    pub(crate) multiplexer: Multiplexer,
    /// Connections for `run_sync`, opened and driven on pgengine's own runtime, so that
    /// a blocked caller's runtime never stalls them. Empty until first used.
    pub(crate) sync_pool: ConnectionPool,
    pub(crate) settings: EngineSettings,
    /// The driver's configuration, for connections outside the pools (a listener's).
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) log: QueryLog,
    /// The engine's named nodes (none for a node itself).
    pub(crate) nodes: BTreeMap<String, Arc<EngineContext>>,
    /// The engine's read replicas (none for a node or a replica itself).
    pub(crate) replicas: Vec<Arc<EngineContext>>,
    pub(crate) routing: ReadRouting,
}

static ENGINE_IDS: AtomicU64 = AtomicU64::new(1);

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Commit,
    Rollback,
}

impl Finish {
    /// The statement that ends a transaction this way.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Finish::Commit => "COMMIT",
            Finish::Rollback => "ROLLBACK",
        }
    }
}

impl EngineContext {
    /// The pools (no connection opened yet) and the log.
    pub(crate) fn new(pg: tokio_postgres::Config, settings: EngineSettings) -> Result<Self> {
        let name = crate::pool::pool_name(&pg);
        let pool = ConnectionPool::new(pg.clone(), &settings, name.clone())?;
        // The pool of blocking callers opens connections only on demand.
        let mut sync_settings = settings.clone();
        sync_settings.lifecycle.min_connections = 0;
        let sync_pool = ConnectionPool::new(pg.clone(), &sync_settings, format!("{name}/sync"))?;
        Ok(Self {
            id: ENGINE_IDS.fetch_add(1, Ordering::Relaxed),
            pool,
            multiplexer: Multiplexer::new(&settings.multiplex, &settings.lifecycle),
            sync_pool,
            log: QueryLog::new(&settings, Telemetry::new(&pg)),
            routing: ReadRouting::new(settings.replica_policy, settings.max_replica_lag, 0),
            settings,
            pg,
            nodes: BTreeMap::new(),
            replicas: Vec::new(),
        })
    }

    /// Takes on the named nodes and the read replicas of this engine.
    pub(crate) fn with_others(
        mut self,
        nodes: BTreeMap<String, Arc<EngineContext>>,
        replicas: Vec<Arc<EngineContext>>,
    ) -> Self {
        self.nodes = nodes;
        self.routing = ReadRouting::new(
            self.settings.replica_policy,
            self.settings.max_replica_lag,
            replicas.len(),
        );
        self.replicas = replicas;
        self
    }

    /// Where read-only work runs: a fit read replica and a connection to it, or `None`
    /// (no replica, or none fit: the caller uses this engine's own pool).
    pub(crate) async fn replica_for_reads(&self) -> Option<(Arc<EngineContext>, Connection)> {
        if self.replicas.is_empty() {
            return None;
        }
        // Boxed: routing is rare, and its state (checkouts, a lag query) would make the
        // future of every read-only begin larger.
        Box::pin(self.pick_replica()).await
    }

    /// A fit read replica of the engine's (it has some) and a connection to it.
    async fn pick_replica(&self) -> Option<(Arc<EngineContext>, Connection)> {
        let pools: Vec<&ConnectionPool> = self.replicas.iter().map(|r| &r.pool).collect();
        let (index, connection) = self.routing.pick(&pools).await?;
        Some((self.replicas[index].clone(), connection))
    }

    /// Runs SQL over the simple protocol on `connection`, guarded and logged. Its
    /// failure is recorded on the connection; a caller in a transaction records it there.
    pub(crate) async fn run_simple(&self, connection: &Connection, sql: &str) -> Result<()> {
        let request = connection.guarded(async {
            connection
                .client()
                .batch_execute(sql)
                .await
                .map_err(Error::from)
        });
        let result = self.log.observe(sql, &[], None, request, |_| None).await;
        if result.is_ok() {
            connection.ran_statements(sql);
        }
        result
    }

    /// Ends the transaction open on `connection`; see [`settle_end`](Self::settle_end).
    pub(crate) async fn end_transaction(
        &self,
        connection: &Connection,
        finish: Finish,
    ) -> Result<()> {
        let answer = match finish {
            Finish::Commit => self.run_commit(connection).await,
            Finish::Rollback => self.run_simple(connection, finish.sql()).await,
        };
        self.settle_end(connection, finish, answer).await
    }

    /// Sends `COMMIT` and reads its command tag: a transaction that an error aborted
    /// answers `ROLLBACK`, without an error, and that is an error here (SQLSTATE
    /// `25P02`'s meaning: nothing was saved).
    async fn run_commit(&self, connection: &Connection) -> Result<()> {
        let sql = Finish::Commit.sql();
        let request = connection.guarded(async {
            let tag = connection.client().batch_execute_tag(sql).await?;
            match tag.as_deref() {
                Some("COMMIT") => Ok(()),
                tag => Err(Error::transaction(format!(
                    "cannot commit: an earlier error aborted the transaction, so the server \
                     rolled it back and nothing was saved (COMMIT answered {})",
                    tag.unwrap_or("nothing")
                ))),
            }
        });
        self.log.observe(sql, &[], None, request, |_| None).await
    }

    /// What the answer to a transaction's end means, for every path that ends one (a
    /// transaction's `commit` and `rollback`, an atomic's pipelined end).
    ///
    /// Any answer ends the transaction: a success leaves the connection idle; a refused
    /// `COMMIT` (an aborted transaction, a deferred constraint, a serialization failure)
    /// is followed by a `ROLLBACK` for whatever is left. No answer — the connection
    /// failed — means the server rolls back when the session ends, except that a
    /// `COMMIT` in flight may have been applied first: that is
    /// [`CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown).
    pub(crate) async fn settle_end(
        &self,
        connection: &Connection,
        finish: Finish,
        answer: Result<()>,
    ) -> Result<()> {
        match answer {
            Ok(()) => {
                connection.set_in_transaction(false);
                Ok(())
            }
            Err(error) if error.is_connection_failure() => match finish {
                Finish::Commit => Err(error.during_commit()),
                Finish::Rollback => Err(error),
            },
            Err(error) => {
                // Boxed: a refused COMMIT is rare, and this request would make every
                // transaction's end future larger.
                if finish == Finish::Commit
                    && Box::pin(self.run_simple(connection, Finish::Rollback.sql()))
                        .await
                        .is_ok()
                {
                    connection.set_in_transaction(false);
                }
                Err(error)
            }
        }
    }
}
