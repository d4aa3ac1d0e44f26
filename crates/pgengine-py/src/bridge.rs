//! Tokio futures as asyncio awaitables, and a safe exit.
//!
//! [`future_into_py`] runs a future on the tokio runtime of `pyo3-async-runtimes`
//! without the GIL, and hands its result to the asyncio loop from a blocking thread.
//! Cancelling the asyncio future drops the Rust future.
//!
//! Every time a tokio thread takes the GIL, it goes through [`attach`], which knows
//! when the interpreter exits: an `atexit` hook ([`at_exit`]) waits (GIL released) for
//! the threads inside Python to leave, and from then on no thread enters it. Without
//! that, a thread that releases the GIL inside Python (the loop's self-pipe write of
//! `call_soon_threadsafe`) and takes it back once finalization has begun is ended by
//! CPython with `pthread_exit`, whose unwinding through Rust frames aborts the process.

use std::future::Future;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use pyo3::IntoPyObjectExt;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use tokio::sync::oneshot;

/// The longest the exit waits for threads inside Python to leave.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Threads of ours inside Python, and whether the interpreter is exiting.
struct Presence {
    inside: usize,
    exiting: bool,
}

static PRESENCE: Mutex<Presence> = Mutex::new(Presence {
    inside: 0,
    exiting: false,
});
static LEFT: Condvar = Condvar::new();

/// Leaves Python: counted out when dropped.
struct Inside;

impl Drop for Inside {
    fn drop(&mut self) {
        let mut presence = PRESENCE.lock().unwrap_or_else(PoisonError::into_inner);
        presence.inside -= 1;
        LEFT.notify_all();
    }
}

/// Runs `f` with the GIL from a thread of ours; `None` once the interpreter exits.
///
/// ```ignore
/// let message = bridge::attach(|py| build(py, &error));
/// ```
pub fn attach<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    {
        let mut presence = PRESENCE.lock().unwrap_or_else(PoisonError::into_inner);
        if presence.exiting {
            return None;
        }
        presence.inside += 1;
    }
    let _inside = Inside;
    Some(Python::attach(f))
}

/// The `atexit` hook: waits, with the GIL released, until no thread of ours is inside
/// Python (at most [`EXIT_WAIT`]), and keeps them out from then on.
///
/// ```python
/// import atexit; atexit.register(_native._at_exit)   # done when the module loads
/// ```
#[pyfunction]
#[pyo3(name = "_at_exit")]
pub fn at_exit(py: Python<'_>) {
    py.detach(|| {
        let mut presence = PRESENCE.lock().unwrap_or_else(PoisonError::into_inner);
        presence.exiting = true;
        let _ = LEFT.wait_timeout_while(presence, EXIT_WAIT, |p| p.inside > 0);
    });
}

/// Runs `future` on tokio and returns an asyncio future of its result, on the running
/// loop. Cancelling the asyncio future drops `future`.
///
/// ```ignore
/// bridge::future_into_py(py, async move { engine.fetch(query).await.map_err(to_py) })
/// ```
pub fn future_into_py<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = running_loop(py)?;
    let awaitable = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
    let (cancel, cancelled) = oneshot::channel();
    awaitable.call_method1(
        pyo3::intern!(py, "add_done_callback"),
        (OnCancel(Mutex::new(Some(cancel))),),
    )?;
    let target = (event_loop.unbind(), awaitable.clone().unbind());
    pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        let result = tokio::select! {
            biased;
            Ok(()) = cancelled => return,
            result = future => result,
        };
        // The GIL is taken on a blocking thread, never on a worker of the runtime.
        tokio::task::spawn_blocking(move || attach(|py| deliver(py, target, result)));
    });
    Ok(awaitable)
}

/// The running asyncio loop (`asyncio.get_running_loop()`).
fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .import(py, "asyncio", "get_running_loop")?
        .call0()
}

/// Schedules the result's delivery on the loop; a closed loop (nobody awaits it any
/// more) is ignored.
fn deliver<T>(py: Python<'_>, (event_loop, awaitable): (Py<PyAny>, Py<PyAny>), result: PyResult<T>)
where
    T: for<'a> IntoPyObject<'a>,
{
    let (ok, value) = match result.and_then(|value| value.into_py_any(py)) {
        Ok(value) => (true, value),
        Err(error) => (false, error.into_value(py).into_any()),
    };
    let resolve = match wrap_pyfunction!(resolve, py) {
        Ok(resolve) => resolve,
        Err(_) => return,
    };
    let _ = event_loop.call_method1(
        py,
        pyo3::intern!(py, "call_soon_threadsafe"),
        (resolve, awaitable, ok, value),
    );
}

/// On the loop: sets the future's result or exception, unless it is done (cancelled).
#[pyfunction]
fn resolve(awaitable: &Bound<'_, PyAny>, ok: bool, value: Bound<'_, PyAny>) -> PyResult<()> {
    let py = awaitable.py();
    if awaitable
        .call_method0(pyo3::intern!(py, "done"))?
        .is_truthy()?
    {
        return Ok(());
    }
    let method = match ok {
        true => pyo3::intern!(py, "set_result"),
        false => pyo3::intern!(py, "set_exception"),
    };
    awaitable.call_method1(method, (value,))?;
    Ok(())
}

/// The asyncio future's done callback: if it was cancelled, the Rust future is dropped.
#[pyclass(frozen)]
struct OnCancel(Mutex<Option<oneshot::Sender<()>>>);

#[pymethods]
impl OnCancel {
    fn __call__(&self, awaitable: &Bound<'_, PyAny>) -> PyResult<()> {
        let cancelled = awaitable
            .call_method0(pyo3::intern!(awaitable.py(), "cancelled"))?
            .is_truthy()?;
        let sender = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let (true, Some(sender)) = (cancelled, sender) {
            let _ = sender.send(());
        }
        Ok(())
    }
}
