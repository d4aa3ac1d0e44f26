//! Read routing: which read replica takes the next read-only work.
//!
//! Candidates are tried in the order the [`ReplicaPolicy`] gives. A replica whose pool
//! cannot give a connection is skipped for a while; with a lag bound, one whose replay
//! lags further behind than the bound is skipped too (its lag is measured at most once
//! a second). When every replica is skipped, the caller falls back to the primary.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::ReplicaPolicy;
use crate::error::{Error, Result};
use crate::pool::{Connection, ConnectionPool};

/// How long a replica that failed to give a connection is left out.
const UNHEALTHY_FOR: Duration = Duration::from_secs(1);

/// How long a measured lag is trusted.
const LAG_VALID_FOR: Duration = Duration::from_secs(1);

/// The replay lag of the replica the query runs on, in seconds: zero when it has
/// replayed all it received, else the age of the last transaction it replayed (a day
/// when it has replayed none since it started: unknown, so too far behind).
const LAG_SQL: &str = "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() \
     THEN 0 ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 86400) \
     END::float8";

/// The routing of read-only work over an engine's replicas.
pub(crate) struct ReadRouting {
    policy: ReplicaPolicy,
    max_lag: Option<Duration>,
    next: AtomicUsize,
    health: Mutex<Vec<Health>>,
}

#[derive(Clone, Copy, Default)]
struct Health {
    unhealthy_until: Option<Instant>,
    lag: Option<(Instant, Duration)>,
}

impl ReadRouting {
    /// Routing over `replicas` replicas.
    pub(crate) fn new(policy: ReplicaPolicy, max_lag: Option<Duration>, replicas: usize) -> Self {
        Self {
            policy,
            max_lag,
            next: AtomicUsize::new(0),
            health: Mutex::new(vec![Health::default(); replicas]),
        }
    }

    /// The index of the replica to use and a connection to it, or `None` when no
    /// replica is fit (down, or lagging beyond the bound).
    pub(crate) async fn pick(&self, pools: &[&ConnectionPool]) -> Option<(usize, Connection)> {
        for index in self.order(pools) {
            if self
                .health(index)
                .unhealthy_until
                .is_some_and(|until| Instant::now() < until)
            {
                continue;
            }
            let connection = match pools[index].get().await {
                Ok(connection) => connection,
                Err(_) => {
                    self.update(index, |health| {
                        health.unhealthy_until = Some(Instant::now() + UNHEALTHY_FOR)
                    });
                    continue;
                }
            };
            if self.lags_too_far(index, &connection).await {
                continue;
            }
            return Some((index, connection));
        }
        None
    }

    /// The replicas in the order to try them.
    fn order(&self, pools: &[&ConnectionPool]) -> Vec<usize> {
        let count = pools.len();
        match self.policy {
            ReplicaPolicy::RoundRobin => {
                let first = self.next.fetch_add(1, Ordering::Relaxed);
                (0..count).map(|i| (first + i) % count).collect()
            }
            ReplicaPolicy::LeastBusy => {
                let mut order: Vec<usize> = (0..count).collect();
                order.sort_by_key(|&i| {
                    let status = pools[i].status();
                    status.size.saturating_sub(status.available)
                });
                order
            }
        }
    }

    /// Whether the replica lags further behind than the bound (measured on
    /// `connection` when the last measure is over a second old).
    async fn lags_too_far(&self, index: usize, connection: &Connection) -> bool {
        let Some(max_lag) = self.max_lag else {
            return false;
        };
        let lag = match self.health(index).lag {
            Some((at, lag)) if at.elapsed() < LAG_VALID_FOR => lag,
            _ => match measure_lag(connection).await {
                Ok(lag) => {
                    self.update(index, |health| health.lag = Some((Instant::now(), lag)));
                    lag
                }
                Err(_) => return true,
            },
        };
        lag > max_lag
    }

    fn health(&self, index: usize) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner())[index]
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut Health)) {
        change(&mut self.health.lock().unwrap_or_else(|p| p.into_inner())[index]);
    }
}

async fn measure_lag(connection: &Connection) -> Result<Duration> {
    let row = connection
        .guarded(async {
            connection
                .client()
                .query_one(LAG_SQL, &[])
                .await
                .map_err(Error::from)
        })
        .await?;
    let seconds: f64 = row.get(0);
    Ok(Duration::from_secs_f64(seconds.max(0.0)))
}
