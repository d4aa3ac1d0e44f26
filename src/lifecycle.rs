//! The life of pooled connections: the after-connect hook, the session reset policy,
//! the checks before reuse (age, health), the idle reaper that keeps
//! `min_connections` warm, and the pool's counters.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, RecycleError};
use deadpool_postgres::{ClientWrapper, HookError, Metrics};

use crate::counters::{Counter, Counters};

/// What is reset on a pooled connection before it is handed out again.
///
/// By default ([`SessionReset::None`]) only what pgengine itself must undo is undone:
/// an open transaction is rolled back and an abandoned request cancelled. A `SET`, a
/// temporary table, an advisory lock, a `LISTEN` or a `SET ROLE` a user left stays on the
/// session for its next user. [`SessionReset::DiscardAll`] resets all of that, as
/// `DISCARD ALL` does, but keeps the connection's prepared statements (the statement
/// cache) and runs the after-connect hook again, so its settings hold.
///
/// ```
/// let builder = pgengine::EngineBuilder::new().session_reset(pgengine::SessionReset::DiscardAll);
/// # let _ = builder;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionReset {
    /// Keep the session as the last user left it (only a transaction is rolled back).
    #[default]
    None,
    /// Before each reuse: close cursors, `SET SESSION AUTHORIZATION DEFAULT`, `RESET
    /// ALL`, `UNLISTEN *`, release advisory locks, drop temporary tables, discard cached
    /// plans and sequence state (`DISCARD ALL` but `DEALLOCATE ALL`).
    DiscardAll,
}

/// What [`SessionReset::DiscardAll`] sends: `DISCARD ALL` without `DEALLOCATE ALL`.
const DISCARD_ALL_BUT_STATEMENTS: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; \
     RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; \
     DISCARD SEQUENCES";

/// The future an after-connect function returns.
pub type AfterConnectFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(), tokio_postgres::Error>> + Send + 'a>>;

type AfterConnectFn =
    dyn for<'a> Fn(&'a tokio_postgres::Client) -> AfterConnectFuture<'a> + Send + Sync;

/// What runs on each new connection before its first use.
#[derive(Clone)]
pub(crate) enum AfterConnect {
    Sql(String),
    Fn(Arc<AfterConnectFn>),
}

impl fmt::Debug for AfterConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AfterConnect::Sql(sql) => f.debug_tuple("Sql").field(sql).finish(),
            AfterConnect::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

impl AfterConnect {
    /// Creates it from a function.
    pub(crate) fn function<F>(f: F) -> Self
    where
        F: for<'a> Fn(&'a tokio_postgres::Client) -> AfterConnectFuture<'a> + Send + Sync + 'static,
    {
        AfterConnect::Fn(Arc::new(f))
    }

    async fn run(&self, client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        match self {
            AfterConnect::Sql(sql) => client.batch_execute(sql).await,
            AfterConnect::Fn(f) => f(client).await,
        }
    }
}

/// The lifecycle settings of a pool.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    pub max_lifetime: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub min_connections: usize,
    pub health_check_after: Option<Duration>,
    pub after_connect: Option<AfterConnect>,
    pub session_reset: SessionReset,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            max_lifetime: None,
            idle_timeout: None,
            min_connections: 0,
            health_check_after: Some(Duration::from_secs(60)),
            after_connect: None,
            session_reset: SessionReset::None,
        }
    }
}

type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;

/// The `post_create` hook: counts the connection and runs the after-connect hook.
/// (Generic over the pool's session type, which lives in [`connect`](crate::connect):
/// that module uses this one.)
pub(crate) fn post_create<S>(
    lifecycle: Arc<Lifecycle>,
    counters: Arc<Counters>,
) -> impl for<'a> Fn(&'a mut S, &'a Metrics) -> HookFuture<'a> + Send + Sync + 'static
where
    S: Deref<Target = ClientWrapper> + Send + Sync,
{
    move |client, _metrics| {
        let lifecycle = lifecycle.clone();
        let counters = counters.clone();
        Box::pin(async move {
            if let Some(hook) = &lifecycle.after_connect
                && let Err(error) = hook.run(client).await
            {
                let reason = match error.as_db_error() {
                    Some(db) => db.to_string(),
                    None => error.to_string(),
                };
                return Err(HookError::message(format!(
                    "the after-connect hook failed: {reason}"
                )));
            }
            counters.add(Counter::Created, 1);
            Ok(())
        })
    }
}

/// The checks before an idle connection is handed out again (run by the pool's
/// manager, [`ServerConnector`](crate::connect::ServerConnector), when it recycles
/// one): a connection older than `max_lifetime` is closed (an error); one not taken for
/// longer than `health_check_after` must answer an empty query first, and the session
/// reset runs: those are the returned request, to be awaited (an error closes the
/// connection, its reason counted). Usually there is none, and nothing is allocated:
/// the request is boxed, so that the pool's future stays small.
pub(crate) fn recycle<'a>(
    client: &'a tokio_postgres::Client,
    metrics: &Metrics,
    idle: Duration,
    lifecycle: &'a Lifecycle,
    counters: &'a Counters,
) -> Result<Option<RecycleCheck<'a>>, RecycleError<tokio_postgres::Error>> {
    if lifecycle
        .max_lifetime
        .is_some_and(|max| metrics.age() >= max)
    {
        counters.add(Counter::ClosedMaxLifetime, 1);
        return Err(RecycleError::message("the connection reached max_lifetime"));
    }
    let reset = lifecycle.session_reset == SessionReset::DiscardAll;
    let check = lifecycle
        .health_check_after
        .is_some_and(|after| idle >= after);
    if !reset && !check {
        return Ok(None);
    }
    Ok(Some(Box::pin(async move {
        let result = match reset {
            true => reset_session(client, lifecycle).await,
            false => client.simple_query("").await.map(drop),
        };
        result.map_err(|error| {
            counters.add(Counter::ClosedUnhealthy, 1);
            RecycleError::Backend(error)
        })
    })))
}

/// The request [`recycle`] asks for before a connection is reused.
pub(crate) type RecycleCheck<'a> =
    Pin<Box<dyn Future<Output = Result<(), RecycleError<tokio_postgres::Error>>> + Send + 'a>>;

/// Resets the session on `client` as [`SessionReset::DiscardAll`] does, then runs the
/// after-connect hook again, so that its settings hold.
pub(crate) async fn reset_session(
    client: &tokio_postgres::Client,
    lifecycle: &Lifecycle,
) -> Result<(), tokio_postgres::Error> {
    let mut sql = DISCARD_ALL_BUT_STATEMENTS.to_owned();
    if let Some(AfterConnect::Sql(after)) = &lifecycle.after_connect {
        sql = format!("{sql}; {after}");
    }
    client.batch_execute(&sql).await?;
    match &lifecycle.after_connect {
        Some(hook @ AfterConnect::Fn(_)) => hook.run(client).await,
        _ => Ok(()),
    }
}

/// Every `period` while the pool lives: closes idle connections that are closed
/// already (the server ended them), or unused for longer than
/// `idle_timeout` or older than `max_lifetime` (never going below `min_connections`),
/// then opens connections up to `min_connections`.
pub(crate) async fn maintain<M>(
    pool: managed::WeakPool<M>,
    lifecycle: Arc<Lifecycle>,
    counters: Arc<Counters>,
    period: Duration,
) where
    M: managed::Manager,
    M::Type: Deref<Target = ClientWrapper>,
    M::Error: fmt::Display,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.is_closed() {
            return;
        }
        let mut removable = pool.status().size.saturating_sub(lifecycle.min_connections);
        let (mut idle, mut old) = (0, 0);
        let mut broken = 0;
        pool.retain(|client, metrics| {
            if client.is_closed() {
                broken += 1;
                removable = removable.saturating_sub(1);
                return false;
            }
            let expired_idle = lifecycle
                .idle_timeout
                .is_some_and(|timeout| metrics.last_used() >= timeout);
            let expired_age = lifecycle
                .max_lifetime
                .is_some_and(|max| metrics.age() >= max);
            // Too old is closed even below min_connections (it is replaced below).
            if expired_age {
                old += 1;
                removable = removable.saturating_sub(1);
                return false;
            }
            if expired_idle && removable > 0 {
                idle += 1;
                removable -= 1;
                return false;
            }
            true
        });
        counters.add(Counter::ClosedBroken, broken);
        counters.add(Counter::ClosedIdle, idle);
        counters.add(Counter::ClosedMaxLifetime, old);
        let status = pool.status();
        let missing = lifecycle.min_connections.saturating_sub(status.size);
        if missing > 0 {
            // Held together, the idle connections are taken and the missing ones opened.
            let takes = missing + status.available;
            let timeouts = deadpool_postgres::Timeouts {
                wait: Some(Duration::ZERO),
                ..pool.timeouts()
            };
            let opened =
                futures::future::join_all((0..takes).map(|_| pool.timeout_get(&timeouts))).await;
            if let Some(Err(error)) = opened.iter().find(|o| o.is_err()) {
                tracing::debug!(target: "pgengine::pool", %error, "could not open a connection to keep min_connections");
            }
        }
    }
}
