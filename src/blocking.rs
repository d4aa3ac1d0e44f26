//! Running async work from synchronous code (`run_sync`).
//!
//! The work runs on pgengine's own runtime, on connections opened there (the engine's
//! `sync_pool`): a caller's runtime, blocked meanwhile or not running at all, drives
//! none of them, so nothing waits on it.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::error::{Error, Result};

/// Blocks the current thread until `future` is done on pgengine's runtime.
///
/// Called on a thread that runs a tokio runtime, it waits from a helper thread (tokio
/// forbids starting a runtime inside another); on a multi-thread runtime's worker it
/// first hands the worker's other tasks to the rest of the runtime (`block_in_place`).
pub(crate) fn block_on<F>(future: F) -> Result<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let runtime = own_runtime()?;
    let Ok(caller) = Handle::try_current() else {
        return Ok(runtime.block_on(future));
    };
    let wait = || {
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(future))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    };
    Ok(match caller.runtime_flavor() {
        RuntimeFlavor::MultiThread => tokio::task::block_in_place(wait),
        _ => wait(),
    })
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
