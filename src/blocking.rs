//! Running async work from synchronous code (`run_sync`).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::error::{Error, Result};

/// Blocks the current thread on `future`; see [`Atomic::run_sync`](crate::Atomic::run_sync).
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output> {
    match Handle::try_current() {
        Err(_) => Ok(own_runtime()?.block_on(future)),
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            Ok(tokio::task::block_in_place(|| handle.block_on(future)))
        }
        Ok(_) => Err(Error::invalid_input(
            "run_sync cannot block a current-thread tokio runtime (the connections it needs \
             run on that thread); use `.await` there, or a multi-thread runtime",
        )),
    }
}

/// pgengine's own runtime for synchronous callers: one worker, which also drives the
/// connections opened from it between calls.
fn own_runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pgengine-sync")
        .enable_all()
        .build()
        .map_err(|e| Error::invalid_input(format!("cannot start a runtime for run_sync: {e}")))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}
