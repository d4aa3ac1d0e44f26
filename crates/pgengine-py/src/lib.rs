//! pgengine for Python: the native half of the `pgengine-piccolo` package.
//!
//! The Python module `pgengine_piccolo._native` exposes pgengine's engine, transactions,
//! savepoints and batches as classes whose methods return asyncio awaitables (tokio
//! futures bridged by `pyo3-async-runtimes`; the GIL is not held while they wait). The
//! Python package `pgengine_piccolo` builds Piccolo's engine API on top of it.
//!
//! ```python
//! from pgengine_piccolo import _native
//! engine = await _native.Engine.connect("postgres://postgres@localhost/app", None)
//! rows = await engine.fetch("SELECT $1::int AS one", [1])   # [{'one': 1}]
//! ```

mod bridge;
mod errors;
mod handles;
mod numeric;
mod params;
mod rows;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The module `pgengine_piccolo._native`.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<handles::Engine>()?;
    module.add_class::<handles::Transaction>()?;
    module.add_class::<handles::Savepoint>()?;
    module.add_class::<handles::Batch>()?;
    let at_exit = wrap_pyfunction!(bridge::at_exit, module)?;
    module.add_function(at_exit.clone())?;
    module
        .py()
        .import("atexit")?
        .call_method1("register", (at_exit,))?;
    Ok(())
}

/// Python's `decimal.Decimal`, imported once.
fn decimal_class(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    Ok(CLASS.import(py, "decimal", "Decimal")?.clone())
}

/// Python's `uuid.UUID`, imported once.
fn uuid_class(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    Ok(CLASS.import(py, "uuid", "UUID")?.clone())
}
