//! The error type of this crate.

use std::fmt;
use std::sync::Arc;

/// What went wrong, broadly. See [`Error::kind`].
///
/// ```
/// use pgengine_testing::{Error, ErrorKind};
/// let err = Error::new(ErrorKind::Startup, "server did not start");
/// assert_eq!(err.kind(), ErrorKind::Startup);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) were found.
    BinariesNotFound,
    /// A filesystem or process-spawning operation failed.
    Io,
    /// `initdb` or `pg_ctl start` failed (the message includes their output / log tail).
    Startup,
    /// A SQL command against the server failed (connect, `CREATE DATABASE`, ...).
    Database,
    /// The environment is not usable as is (e.g. running as root without a `postgres` user).
    Config,
}

/// The error of every fallible operation in this crate.
///
/// It is cheap to clone (the per-process [`server()`](crate::server) hands the same
/// startup error to every test), and its `Display` output says what to do about it.
///
/// ```
/// use pgengine_testing::{Error, ErrorKind};
/// let err = Error::new(ErrorKind::Config, "no postgres user");
/// assert!(err.to_string().contains("no postgres user"));
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// Creates an error of `kind` with a human-readable `message`.
    ///
    /// ```
    /// let err = pgengine_testing::Error::new(pgengine_testing::ErrorKind::Io, "disk full");
    /// assert_eq!(err.to_string(), "disk full");
    /// ```
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Io, message, source)
    }

    pub(crate) fn db(message: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Error::with_source(ErrorKind::Database, message, source)
    }

    /// The broad category of this error.
    ///
    /// ```
    /// use pgengine_testing::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::Io, "x").kind(), ErrorKind::Io);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug is what `unwrap()`/`?` in a test prints: make it as readable as Display.
        write!(f, "{:?}: {self}", self.kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        // Print the whole chain: e.g. tokio_postgres::Error's Display says only "db
        // error"; the server's message is in its source.
        let mut next: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
