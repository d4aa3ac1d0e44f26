//! The connection pool (deadpool-postgres) and the hygiene of each pooled connection.
//!
//! A [`Connection`] knows whether it is inside a transaction and whether a request on it
//! was abandoned (its future dropped before the answer came). When it goes back, a clean
//! connection returns to the pool as is; one left inside a transaction is rolled back
//! first; one with an abandoned request has that request cancelled and is discarded. The
//! pool slot stays taken until that is done, so the next user never sees a dirty session.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::EngineSettings;
use crate::error::{Error, ErrorKind, Result};

/// Creates the pool; no connection is opened yet.
pub(crate) fn create_pool(pg: tokio_postgres::Config, settings: &EngineSettings) -> Result<Pool> {
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.max_connections)
        .wait_timeout(settings.pool_wait_timeout)
        .create_timeout(Some(settings.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::new(ErrorKind::Config, format!("cannot build the pool: {e}")))
}

/// A connection taken from the pool, returned clean when dropped.
pub(crate) struct Connection {
    object: Option<Object>,
    in_transaction: AtomicBool,
    interrupted: AtomicBool,
}

impl Connection {
    /// Takes a connection from the pool, waiting at most the pool's wait timeout.
    pub(crate) async fn get(pool: &Pool) -> Result<Self> {
        let object = pool.get().await?;
        Ok(Self {
            object: Some(object),
            in_transaction: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
        })
    }

    /// The driver's client with its statement cache.
    pub(crate) fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.object
            .as_ref()
            .expect("a connection holds its object until dropped")
    }

    /// Records whether a transaction is open on this connection.
    pub(crate) fn set_in_transaction(&self, open: bool) {
        self.in_transaction.store(open, Ordering::Release);
    }

    /// Runs a request on this connection; if the returned future is dropped before the
    /// request finishes, the connection is marked so that it is not reused.
    pub(crate) async fn guarded<F: Future>(&self, request: F) -> F::Output {
        let guard = AbandonGuard {
            interrupted: &self.interrupted,
            finished: false,
        };
        let output = request.await;
        guard.finish();
        output
    }
}

/// Marks the connection interrupted unless the request it guards finished.
struct AbandonGuard<'a> {
    interrupted: &'a AtomicBool,
    finished: bool,
}

impl AbandonGuard<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.interrupted.store(true, Ordering::Release);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        let interrupted = self.interrupted.load(Ordering::Acquire);
        let in_transaction = self.in_transaction.load(Ordering::Acquire);
        if object.is_closed() {
            drop(Object::take(object));
            return;
        }
        if !interrupted && !in_transaction {
            return; // clean: `object` goes back to the pool here
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(restore(object, interrupted));
            }
            // No runtime to roll back on: closing the session makes the server roll back.
            Err(_) => drop(Object::take(object)),
        }
    }
}

/// Makes a dirty connection safe: cancel and discard it after an abandoned request,
/// else roll back its transaction and return it to the pool.
async fn restore(object: Object, interrupted: bool) {
    if interrupted {
        let _ = object.cancel_token().cancel_query(NoTls).await;
        drop(Object::take(object));
        return;
    }
    match object.batch_execute("ROLLBACK").await {
        Ok(()) => drop(object),
        Err(e) => {
            tracing::warn!(target: "pgengine::pool", error = %e, "discarding a connection that could not be rolled back");
            drop(Object::take(object));
        }
    }
}
