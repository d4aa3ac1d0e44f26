//! pgengine errors as the Python exceptions Piccolo's users catch: a database error is
//! the asyncpg class for its SQLSTATE (`UniqueViolationError`, …, built by asyncpg's own
//! `PostgresError.new`), with its fields (`sqlstate`, `detail`, `constraint_name`, …).
//! Never `RuntimeError` (Piccolo's `run_sync` treats it specially).

use pgengine::{Error, ErrorKind};
use pyo3::exceptions::{PyConnectionError, PyConnectionRefusedError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The Python exception for a pgengine error.
///
/// ```ignore
/// engine.fetch(query).await.map_err(errors::to_py)?
/// ```
pub fn to_py(error: Error) -> PyErr {
    let built = crate::bridge::attach(|py| match build(py, &error) {
        Ok(err) => err,
        Err(import_failed) => import_failed,
    });
    // The interpreter is exiting: no one will see it, but it must not need Python.
    built.unwrap_or_else(|| PyConnectionError::new_err(with_causes(&error)))
}

fn build(py: Python<'_>, error: &Error) -> PyResult<PyErr> {
    let message = with_causes(error);
    if let Some(db) = error.database_error() {
        let fields = PyDict::new(py);
        fields.set_item("C", &db.code)?;
        fields.set_item("S", &db.severity)?;
        fields.set_item("M", &db.message)?;
        let optional = [
            ("D", &db.detail),
            ("H", &db.hint),
            ("s", &db.schema),
            ("t", &db.table),
            ("c", &db.column),
            ("n", &db.constraint),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                fields.set_item(key, value)?;
            }
        }
        if let Some(position) = db.position {
            fields.set_item("P", position.to_string())?;
        }
        let postgres_error = py.import("asyncpg.exceptions")?.getattr("PostgresError")?;
        let exception = postgres_error.call_method1("new", (fields,))?;
        return Ok(PyErr::from_value(exception));
    }
    let asyncpg = |name: &str| -> PyResult<PyErr> {
        let class = py.import("asyncpg.exceptions")?.getattr(name)?;
        Ok(PyErr::from_value(class.call1((message.clone(),))?))
    };
    Ok(match error.kind() {
        ErrorKind::Connect if refused(error) => PyConnectionRefusedError::new_err(message),
        ErrorKind::Connect => PyConnectionError::new_err(message),
        ErrorKind::PoolTimeout => PyTimeoutError::new_err(message),
        ErrorKind::Config | ErrorKind::InvalidInput => PyValueError::new_err(message),
        ErrorKind::Connection => asyncpg("ConnectionDoesNotExistError")?,
        ErrorKind::Driver => asyncpg("DataError")?,
        ErrorKind::Transaction => {
            let class = py
                .import("piccolo.engine.exceptions")?
                .getattr("TransactionError")?;
            PyErr::from_value(class.call1((message,))?)
        }
        _ => asyncpg("InterfaceError")?,
    })
}

/// Whether the connection was refused (nothing listening), as asyncpg's
/// `ConnectionRefusedError`, which Piccolo's `get_version` expects.
fn refused(error: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = current.source();
    }
    false
}

/// The error's message followed by each cause not already in it (the driver's error for
/// a parameter says which value did not fit only in its cause).
fn with_causes(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
