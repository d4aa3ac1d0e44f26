//! Tokio futures as asyncio awaitables, and a safe exit.
//!
//! [`future_into_py`] runs a future on the tokio runtime of `pyo3-async-runtimes`
//! without the GIL. Its result goes to the loop through an [`Inbox`]: posted by the
//! tokio thread without the GIL, with a byte written to a socket the loop watches
//! (`add_reader`), and made into Python values on the loop's own thread. A tokio thread
//! never waits for the GIL (which the loop holds while it runs Python, handing it over
//! only every few milliseconds), and never touches Python while the interpreter exits.
//! Cancelling the asyncio future drops the Rust future.
//!
//! The one other way in, building a Python exception for an error, goes through
//! [`attach`], which an `atexit` hook ([`at_exit`]) closes: it waits (GIL released) for
//! the threads inside Python to leave, and keeps them out from then on. A thread taking
//! the GIL back once finalization has begun is ended by CPython with `pthread_exit`,
//! whose unwinding through the interpreter's and Rust's frames can abort the process.

use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
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
    let inbox = Mailbox::of(&event_loop)?;
    let awaitable = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
    let (cancel, cancelled) = oneshot::channel();
    awaitable.call_method1(
        pyo3::intern!(py, "add_done_callback"),
        (OnCancel(Mutex::new(Some(cancel))),),
    )?;
    let target = awaitable.clone().unbind();
    pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        let outcome: Outcome = tokio::select! {
            biased;
            // Posted all the same, so that the future is released on the loop's thread.
            Ok(()) = cancelled => Box::new(|_| Ok(None)),
            result = future => {
                Box::new(move |py| result.and_then(|value| value.into_py_any(py)).map(Some))
            }
        };
        inbox.post(target, outcome);
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

/// What a finished future turns into, made on the loop's thread: its value (`None`
/// when it was cancelled: nothing to set) or its exception.
type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Option<Py<PyAny>>> + Send>;

/// Results on their way to one asyncio loop. A tokio thread posts a result and, unless
/// a wake-up is pending already, writes one byte to a socket the loop reads
/// (`add_reader`); the loop then settles every posted future. No tokio thread takes the
/// GIL, so none waits for the loop to let go of it.
struct Inbox {
    posted: Mutex<Vec<(Py<PyAny>, Outcome)>>,
    /// A byte is on its way: later posts need not write another.
    signalled: AtomicBool,
    wake: UnixStream,
    woken: UnixStream,
}

impl Inbox {
    /// Posts the `outcome` of the asyncio future `target`, waking the loop if needed.
    fn post(&self, target: Py<PyAny>, outcome: Outcome) {
        self.posted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((target, outcome));
        if !self.signalled.swap(true, Ordering::AcqRel) {
            // Nonblocking: a full socket already holds a wake-up.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

/// The loop's side of an [`Inbox`]: the callback `add_reader` calls.
#[pyclass(frozen)]
struct Mailbox(Arc<Inbox>);

impl Mailbox {
    /// The inbox of `event_loop`, made and registered with it on first use.
    fn of(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Inbox>> {
        static BY_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let py = event_loop.py();
        let by_loop = BY_LOOP
            .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
                Ok(py
                    .import("weakref")?
                    .getattr("WeakKeyDictionary")?
                    .call0()?
                    .unbind())
            })?
            .bind(py);
        if let Ok(mailbox) = by_loop
            .call_method1("get", (event_loop,))?
            .cast::<Mailbox>()
        {
            return Ok(mailbox.get().0.clone());
        }
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        let fd = woken.as_raw_fd();
        let inbox = Arc::new(Inbox {
            posted: Mutex::default(),
            signalled: AtomicBool::new(false),
            wake,
            woken,
        });
        let mailbox = Bound::new(py, Mailbox(inbox.clone()))?;
        event_loop.call_method1(pyo3::intern!(py, "add_reader"), (fd, &mailbox))?;
        by_loop.set_item(event_loop, mailbox)?;
        Ok(inbox)
    }
}

#[pymethods]
impl Mailbox {
    /// Settles every posted future (on the loop's thread).
    fn __call__(&self, py: Python<'_>) {
        let inbox = &self.0;
        let mut drained = [0u8; 64];
        while matches!((&inbox.woken).read(&mut drained), Ok(n) if n > 0) {}
        // Cleared before taking the posts: a post after the take writes a new byte.
        inbox.signalled.store(false, Ordering::Release);
        let posted =
            std::mem::take(&mut *inbox.posted.lock().unwrap_or_else(PoisonError::into_inner));
        for (target, outcome) in posted {
            let _ = settle(target.bind(py), outcome(py));
        }
    }
}

/// Sets the asyncio future's result or exception, unless it is done (cancelled).
fn settle(target: &Bound<'_, PyAny>, outcome: PyResult<Option<Py<PyAny>>>) -> PyResult<()> {
    let py = target.py();
    if target
        .call_method0(pyo3::intern!(py, "done"))?
        .is_truthy()?
    {
        return Ok(());
    }
    match outcome {
        Ok(Some(value)) => target.call_method1(pyo3::intern!(py, "set_result"), (value,))?,
        Ok(None) => return Ok(()),
        Err(error) => {
            target.call_method1(pyo3::intern!(py, "set_exception"), (error.into_value(py),))?
        }
    };
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
