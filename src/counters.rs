//! The counters of one pool, cumulated since the engine was built (see
//! [`PoolStatus`](crate::PoolStatus)); with the `metrics` feature, the same through the
//! [`metrics`](https://docs.rs/metrics) facade, for whatever exporter the application
//! installs (Prometheus, OpenTelemetry, …).
//!
//! Metrics, each labelled `pool` (`host:port/database`, with `/sync` for the pool of
//! blocking callers):
//! - `pgengine_pool_connections_created_total`, counter;
//! - `pgengine_pool_connections_closed_total`, counter, labelled `reason`
//!   (`max_lifetime`, `idle`, `unhealthy`, `broken`);
//! - `pgengine_pool_waits_total` (takes that had to wait for a connection) and
//!   `pgengine_pool_timeouts_total` (takes that gave up), counters;
//! - `pgengine_pool_wait_seconds`, histogram of those waits;
//! - `pgengine_pool_multiplexed_total` (statements run on a shared connection) and
//!   `pgengine_pool_multiplex_overflows_total` (shareable statements that took a
//!   connection of their own, the shared ones being full or stalled), counters;
//! - `pgengine_pool_connections_in_use`, gauge;
//! - `pgengine_pool_connections_open`, `pgengine_pool_connections_idle` and
//!   `pgengine_pool_waiters`, gauges, as of the latest checkout or return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One counter of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Waits,
    WaitMicros,
    Timeouts,
    Created,
    ClosedMaxLifetime,
    ClosedIdle,
    ClosedUnhealthy,
    ClosedBroken,
    Multiplexed,
    MultiplexOverflows,
}

/// The counters of one pool.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    values: [AtomicU64; 10],
    /// The `pool` label of its metrics.
    #[cfg(feature = "metrics")]
    pool: metrics::SharedString,
}

impl Counters {
    /// The counters of the pool named `pool` in its metrics.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(pool: String) -> Self {
        Self {
            values: Default::default(),
            #[cfg(feature = "metrics")]
            pool: pool.into(),
        }
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.values[counter as usize].fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.emit(counter, n);
    }

    /// The value of `counter`.
    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize].load(Ordering::Relaxed)
    }

    /// A take waited `waited` for a connection, and gave up if `timed_out`.
    pub(crate) fn waited(&self, waited: Duration, timed_out: bool) {
        self.add(Counter::Waits, 1);
        self.add(Counter::WaitMicros, waited.as_micros() as u64);
        if timed_out {
            self.add(Counter::Timeouts, 1);
        }
        #[cfg(feature = "metrics")]
        metrics::histogram!("pgengine_pool_wait_seconds", "pool" => self.pool.clone())
            .record(waited.as_secs_f64());
    }

    /// A connection was taken (`1`) or given back (`-1`), leaving the pool as `status`
    /// says (asked only when metrics are on; `None` once the pool is gone).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn moved(
        &self,
        in_use: f64,
        status: impl FnOnce() -> Option<deadpool_postgres::Status>,
    ) {
        #[cfg(feature = "metrics")]
        {
            let pool = &self.pool;
            metrics::gauge!("pgengine_pool_connections_in_use", "pool" => pool.clone())
                .increment(in_use);
            let Some(status) = status() else { return };
            metrics::gauge!("pgengine_pool_connections_open", "pool" => pool.clone())
                .set(status.size as f64);
            metrics::gauge!("pgengine_pool_connections_idle", "pool" => pool.clone())
                .set(status.available as f64);
            metrics::gauge!("pgengine_pool_waiters", "pool" => pool.clone())
                .set(status.waiting as f64);
        }
    }

    #[cfg(feature = "metrics")]
    fn emit(&self, counter: Counter, n: u64) {
        let pool = self.pool.clone();
        let closed = |reason: &'static str| {
            metrics::counter!("pgengine_pool_connections_closed_total", "pool" => pool.clone(), "reason" => reason)
                .increment(n);
        };
        match counter {
            Counter::Created => {
                metrics::counter!("pgengine_pool_connections_created_total", "pool" => pool.clone())
                    .increment(n);
            }
            Counter::ClosedMaxLifetime => closed("max_lifetime"),
            Counter::ClosedIdle => closed("idle"),
            Counter::ClosedUnhealthy => closed("unhealthy"),
            Counter::ClosedBroken => closed("broken"),
            Counter::Waits => {
                metrics::counter!("pgengine_pool_waits_total", "pool" => pool.clone()).increment(n);
            }
            Counter::Timeouts => {
                metrics::counter!("pgengine_pool_timeouts_total", "pool" => pool.clone())
                    .increment(n);
            }
            Counter::Multiplexed => {
                metrics::counter!("pgengine_pool_multiplexed_total", "pool" => pool.clone())
                    .increment(n);
            }
            Counter::MultiplexOverflows => {
                metrics::counter!("pgengine_pool_multiplex_overflows_total", "pool" => pool.clone())
                    .increment(n);
            }
            Counter::WaitMicros => {} // the wait histogram has it
        }
    }
}
