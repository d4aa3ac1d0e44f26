//! The Python classes: [`Engine`], [`Transaction`], [`Savepoint`] and [`Batch`]. Each
//! method reads its Python arguments with the GIL, then returns an asyncio awaitable that
//! runs pgengine's future on tokio without the GIL. Cancelling the asyncio task drops the
//! future, and pgengine cancels the query and cleans its connection.

use std::sync::Arc;

use pgengine::AsyncBatch;
use pgengine::prelude::*;
use pyo3::prelude::*;
use tokio::sync::Mutex;

use crate::bridge::future_into_py;
use crate::errors::to_py;
use crate::params::from_sequence;
use crate::rows::Rows;

/// One `$n` statement and its parameters, read from Python.
fn statement(sql: String, args: &Bound<'_, PyAny>) -> PyResult<QueryString> {
    Ok(QueryString::positional(sql, from_sequence(args)?))
}

/// Several `(sql, args)` pairs, for a pipelined bundle.
fn statements(pairs: &Bound<'_, PyAny>) -> PyResult<Vec<QueryString>> {
    pairs
        .try_iter()?
        .map(|pair| {
            let (sql, args): (String, Bound<'_, PyAny>) = pair?.extract()?;
            statement(sql, &args)
        })
        .collect()
}

/// A pgengine engine: a pool of connections to one server.
///
/// ```python
/// engine = await Engine.connect(url="postgres://postgres@localhost/app", max_connections=16)
/// await engine.fetch("SELECT $1::int AS n", [1])   # [{'n': 1}]
/// ```
#[pyclass(module = "pgengine_piccolo._native", frozen)]
pub struct Engine {
    inner: PostgresEngine,
}

#[pymethods]
impl Engine {
    /// Builds an engine from a libpq URL or `key=value` string and/or its parts (the
    /// parts win); nothing is opened yet. Unset: host `localhost`, user `postgres`.
    #[staticmethod]
    #[pyo3(signature = (url=None, host=None, port=None, user=None, password=None, database=None, max_connections=None))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn connect(
        py: Python<'_>,
        url: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        user: Option<String>,
        password: Option<String>,
        database: Option<String>,
        max_connections: Option<usize>,
    ) -> PyResult<Bound<'_, PyAny>> {
        let mut builder = PostgresEngine::builder().application_name("pgengine-piccolo");
        if let Some(url) = url {
            builder = builder.url(url);
        }
        if let Some(host) = &host {
            builder = builder.host(host);
        }
        if let Some(port) = port {
            builder = builder.port(port);
        }
        if let Some(user) = &user {
            builder = builder.user(user);
        }
        if let Some(password) = password {
            builder = builder.password(password);
        }
        if let Some(database) = &database {
            builder = builder.dbname(database);
        }
        if let Some(max) = max_connections {
            builder = builder.max_connections(max);
        }
        future_into_py(py, async move {
            let inner = builder.build().await.map_err(to_py)?;
            Ok(Engine { inner })
        })
    }

    /// Runs one statement with `$n` parameters; returns its rows as dicts.
    fn fetch<'py>(
        &self,
        py: Python<'py>,
        sql: String,
        args: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = statement(sql, args)?;
        let engine = self.inner.clone();
        future_into_py(py, async move {
            Ok(Rows(engine.fetch(query).await.map_err(to_py)?))
        })
    }

    /// Runs `(sql, args)` pairs in one transaction, pipelined (Piccolo's atomic).
    fn execute_many<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let queries = statements(pairs)?;
        let engine = self.inner.clone();
        future_into_py(py, async move {
            if !queries.is_empty() {
                engine.execute(queries).await.map_err(to_py)?;
            }
            Ok(())
        })
    }

    /// Runs DDL (one or several statements, no parameters) over the simple protocol.
    fn run_ddl<'py>(&self, py: Python<'py>, ddl: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        future_into_py(py, async move { engine.run_ddl(&ddl).await.map_err(to_py) })
    }

    /// Begins a transaction on a pooled connection.
    fn begin<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        future_into_py(py, async move {
            let inner = engine.begin().await.map_err(to_py)?;
            Ok(Transaction {
                inner: Arc::new(inner),
            })
        })
    }

    /// Streams a statement's rows `batch_size` at a time on a pooled connection.
    fn batch<'py>(
        &self,
        py: Python<'py>,
        sql: String,
        args: &Bound<'py, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = statement(sql, args)?;
        let engine = self.inner.clone();
        future_into_py(py, async move {
            let inner = engine.batch(query, batch_size).await.map_err(to_py)?;
            Ok(Batch::new(inner))
        })
    }

    /// Opens every connection of the pool now.
    fn start_connection_pool<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        future_into_py(py, async move {
            engine.start_connection_pool().await.map_err(to_py)
        })
    }

    /// Waits for connections in use to come back and closes them all (final).
    fn close_connection_pool<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        future_into_py(py, async move {
            engine.close_connection_pool().await;
            Ok(())
        })
    }

    /// `(size, available)`: connections open, and those idle in the pool.
    fn pool_status(&self) -> (usize, usize) {
        let status = self.inner.pool_status();
        (status.size, status.available)
    }
}

/// An open transaction on one connection; rolled back if dropped unfinished.
///
/// ```python
/// tx = await engine.begin()
/// await tx.fetch("INSERT INTO band VALUES ($1)", ["x"])
/// await tx.commit()
/// ```
#[pyclass(module = "pgengine_piccolo._native", frozen)]
pub struct Transaction {
    inner: Arc<PostgresTransaction>,
}

#[pymethods]
impl Transaction {
    /// Runs one statement with `$n` parameters in the transaction.
    fn fetch<'py>(
        &self,
        py: Python<'py>,
        sql: String,
        args: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = statement(sql, args)?;
        let tx = self.inner.clone();
        future_into_py(py, async move {
            Ok(Rows(tx.fetch(query).await.map_err(to_py)?))
        })
    }

    /// Runs `(sql, args)` pairs in the transaction, pipelined.
    fn execute_many<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let queries = statements(pairs)?;
        let tx = self.inner.clone();
        future_into_py(py, async move {
            if !queries.is_empty() {
                tx.execute(queries).await.map_err(to_py)?;
            }
            Ok(())
        })
    }

    /// Runs DDL in the transaction.
    fn run_ddl<'py>(&self, py: Python<'py>, ddl: String) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.inner.clone();
        future_into_py(py, async move { tx.run_ddl(&ddl).await.map_err(to_py) })
    }

    /// Streams a statement's rows through a cursor of this transaction.
    fn batch<'py>(
        &self,
        py: Python<'py>,
        sql: String,
        args: &Bound<'py, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = statement(sql, args)?;
        let tx = self.inner.clone();
        future_into_py(py, async move {
            let inner = tx.batch(query, batch_size).await.map_err(to_py)?;
            Ok(Batch::new(inner))
        })
    }

    /// Commits; an aborted transaction is an error (rolled back), never a silent rollback.
    fn commit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.inner.clone();
        future_into_py(py, async move { tx.commit().await.map_err(to_py) })
    }

    /// Rolls back.
    fn rollback<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.inner.clone();
        future_into_py(py, async move { tx.rollback().await.map_err(to_py) })
    }

    /// Makes a savepoint, named (validated and quoted) or numbered when `name` is None.
    #[pyo3(signature = (name=None))]
    fn savepoint<'py>(&self, py: Python<'py>, name: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.inner.clone();
        future_into_py(py, async move {
            let inner = tx.savepoint(name.as_deref()).await.map_err(to_py)?;
            Ok(Savepoint {
                name: inner.name().to_owned(),
                inner: Arc::new(Mutex::new(Some(inner))),
            })
        })
    }

    /// Rolls back to the named savepoint.
    fn rollback_to<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.inner.clone();
        future_into_py(
            py,
            async move { tx.rollback_to(&name).await.map_err(to_py) },
        )
    }

    /// Whether it is still open.
    fn is_active(&self) -> bool {
        self.inner.is_active()
    }
}

/// A savepoint of a transaction.
///
/// ```python
/// sp = await tx.savepoint("before")
/// await sp.rollback_to()
/// ```
#[pyclass(module = "pgengine_piccolo._native", frozen)]
pub struct Savepoint {
    inner: Arc<Mutex<Option<pgengine::Savepoint>>>,
    #[pyo3(get)]
    name: String,
}

#[pymethods]
impl Savepoint {
    /// Undoes what was done since the savepoint; it stays.
    fn rollback_to<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        let name = self.name.clone();
        future_into_py(py, async move {
            match &*inner.lock().await {
                Some(savepoint) => savepoint.rollback_to().await.map_err(to_py),
                None => Err(released(&name)),
            }
        })
    }

    /// Forgets the savepoint, keeping what was done since.
    fn release<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        let name = self.name.clone();
        future_into_py(py, async move {
            match inner.lock().await.take() {
                Some(savepoint) => savepoint.release().await.map_err(to_py),
                None => Err(released(&name)),
            }
        })
    }
}

fn released(name: &str) -> PyErr {
    to_py(pgengine::Error::transaction(format!(
        "savepoint {name} was already released"
    )))
}

/// Rows of a statement, `batch_size` at a time; `next()` gives None at the end.
///
/// ```python
/// batch = await engine.batch("SELECT * FROM band", [], 100)
/// while (rows := await batch.next()) is not None: ...
/// ```
#[pyclass(module = "pgengine_piccolo._native", frozen)]
pub struct Batch {
    inner: Arc<Mutex<Option<AsyncBatch>>>,
}

impl Batch {
    fn new(inner: AsyncBatch) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Some(inner))),
        }
    }
}

#[pymethods]
impl Batch {
    /// The next rows (1 to `batch_size`), or None when all were read.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        future_into_py(py, async move {
            let mut guard = inner.lock().await;
            let Some(batch) = guard.as_mut() else {
                return Ok(None);
            };
            match batch.next().await.map_err(to_py)? {
                Some(rows) => Ok(Some(Rows(rows))),
                None => {
                    *guard = None;
                    Ok(None)
                }
            }
        })
    }

    /// Stops reading: the cursor or statement is closed and the connection goes back.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        future_into_py(py, async move {
            inner.lock().await.take();
            Ok(())
        })
    }
}
