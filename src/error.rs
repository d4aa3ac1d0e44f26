//! One error type for everything the engine does, with the server's details kept.

use std::fmt;

use tokio_postgres::error::{DbError, SqlState};

/// A `Result` whose error is [`Error`].
///
/// ```
/// fn parse(n: &str) -> pgengine::Result<i32> {
///     n.parse().map_err(|_| pgengine::Error::invalid_input(format!("not a number: {n}")))
/// }
/// assert!(parse("x").is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is.
///
/// ```
/// let err = pgengine::Error::invalid_input("bad");
/// assert_eq!(err.kind(), pgengine::ErrorKind::InvalidInput);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration (URL, builder, environment) is not usable.
    Config,
    /// A connection to the server could not be made (refused, timed out, bad credentials).
    Connect,
    /// No pooled connection became free within the pool's wait timeout.
    PoolTimeout,
    /// The connection pool was closed with `close_connection_pool`.
    Closed,
    /// The server answered with an error; see [`Error::database_error`].
    Database,
    /// An established connection broke: the socket failed or closed, or the server
    /// ended the session (severity `FATAL`/`PANIC`, SQLSTATE class `08`, `57P01`–`57P03`;
    /// [`Error::database_error`] then has the server's message). The connection is
    /// discarded, never handed out again.
    Connection,
    /// The connection failed while a `COMMIT` was in flight: the transaction may or
    /// may not have committed, and retrying could apply its work twice. Check on the
    /// server (for instance with an idempotency key written by the transaction) before
    /// running it again; a [`RetryPolicy`](crate::RetryPolicy) never re-runs it.
    CommitOutcomeUnknown,
    /// The driver refused a value or a row (conversion to or from SQL types).
    Driver,
    /// The caller's input is wrong: placeholder and argument counts, identifiers, options.
    InvalidInput,
    /// The transaction is not in a state that allows this (finished, aborted, nesting forbidden).
    Transaction,
    /// `fetch_one` found no row.
    RowNotFound,
    /// `fetch_one` or `fetch_optional` found more than one row.
    TooManyRows,
}

/// The server's own description of a failure: SQLSTATE, message and the details around it.
///
/// ```
/// # async fn demo(engine: pgengine::PostgresEngine) {
/// use pgengine::prelude::*;
/// let err = engine.fetch("SELEC 1").await.unwrap_err();
/// let db = err.database_error().unwrap();
/// assert_eq!(db.code, "42601");
/// assert!(db.position.is_some());
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatabaseError {
    /// The SQLSTATE code, e.g. `"23505"`.
    pub code: String,
    /// The severity, e.g. `"ERROR"`.
    pub severity: String,
    /// The primary message.
    pub message: String,
    /// An optional secondary message with more detail.
    pub detail: Option<String>,
    /// An optional suggestion what to do about it.
    pub hint: Option<String>,
    /// The 1-based character position in the statement where the error was found.
    pub position: Option<u32>,
    /// The schema of the object involved, if any.
    pub schema: Option<String>,
    /// The table involved, if any.
    pub table: Option<String>,
    /// The column involved, if any.
    pub column: Option<String>,
    /// The constraint that was violated, if any.
    pub constraint: Option<String>,
}

impl DatabaseError {
    fn from_db(db: &DbError) -> Self {
        use tokio_postgres::error::ErrorPosition;
        Self {
            code: db.code().code().to_owned(),
            severity: db.severity().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
            position: match db.position() {
                Some(ErrorPosition::Original(p)) => Some(*p),
                Some(ErrorPosition::Internal { position, .. }) => Some(*position),
                None => None,
            },
            schema: db.schema().map(str::to_owned),
            table: db.table().map(str::to_owned),
            column: db.column().map(str::to_owned),
            constraint: db.constraint().map(str::to_owned),
        }
    }

    /// True for SQLSTATE `40001` (serialization failure) and `40P01` (deadlock): the
    /// transaction can succeed when run again.
    ///
    /// ```
    /// # fn demo(db: &pgengine::DatabaseError) { if db.is_retryable() { /* run it again */ } }
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.code == SqlState::T_R_SERIALIZATION_FAILURE.code()
            || self.code == SqlState::T_R_DEADLOCK_DETECTED.code()
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        if let Some(position) = self.position {
            write!(f, " (at character {position})")?;
        }
        Ok(())
    }
}

/// The failing statement of a bundle: its index in the bundle and its SQL.
///
/// ```
/// # fn demo(err: &pgengine::Error) {
/// if let Some(failed) = err.statement() {
///     eprintln!("statement #{} failed: {}", failed.index, failed.sql);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailedStatement {
    /// 0-based position of the statement among those that were sent.
    pub index: usize,
    /// The SQL of the statement, as sent.
    pub sql: String,
}

/// Every failure of the engine: a [`kind`](Error::kind), a message, and the server's
/// [`DatabaseError`] when the server reported one.
///
/// ```
/// # async fn demo(engine: pgengine::PostgresEngine) {
/// use pgengine::prelude::*;
/// match engine.execute("INSERT INTO band (name) VALUES ('Pythonistas')").await {
///     Err(e) if e.is_unique_violation() => println!("already there"),
///     Err(e) => eprintln!("failed: {e}"),
///     Ok(n) => println!("{n} row inserted"),
/// }
/// # }
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    database: Option<DatabaseError>,
    statement: Option<FailedStatement>,
    attempts: Option<u32>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            kind,
            message: message.into(),
            database: None,
            statement: None,
            attempts: None,
            source: None,
        }))
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// An [`ErrorKind::InvalidInput`] error with this message.
    ///
    /// ```
    /// let err = pgengine::Error::invalid_input("savepoint name is empty");
    /// assert_eq!(err.to_string(), "invalid input: savepoint name is empty");
    /// ```
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// An [`ErrorKind::Transaction`] error with this message.
    ///
    /// ```
    /// let err = pgengine::Error::transaction("nested transactions are forbidden");
    /// assert_eq!(err.kind(), pgengine::ErrorKind::Transaction);
    /// ```
    pub fn transaction(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transaction, message)
    }

    pub(crate) fn from_database(database: DatabaseError) -> Self {
        let mut err = Self::new(ErrorKind::Database, String::new());
        err.0.database = Some(database);
        err
    }

    pub(crate) fn with_statement(mut self, index: usize, sql: &str) -> Self {
        self.0.statement = Some(FailedStatement {
            index,
            sql: sql.to_owned(),
        });
        self
    }

    /// Prefixes the message with where the error happened (e.g. `node read_1`).
    pub(crate) fn context(mut self, place: impl std::fmt::Display) -> Self {
        self.0.message = format!("{place}: {}", self.0.message);
        self
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.0.attempts = Some(attempts);
        self
    }

    /// What kind of failure this is.
    ///
    /// ```
    /// assert_eq!(pgengine::Error::invalid_input("x").kind(), pgengine::ErrorKind::InvalidInput);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The server's error, when the server reported one.
    ///
    /// ```
    /// assert!(pgengine::Error::invalid_input("x").database_error().is_none());
    /// ```
    pub fn database_error(&self) -> Option<&DatabaseError> {
        self.0.database.as_ref()
    }

    /// The SQLSTATE code of the server's error, e.g. `Some("23505")`.
    ///
    /// ```
    /// assert_eq!(pgengine::Error::invalid_input("x").code(), None);
    /// ```
    pub fn code(&self) -> Option<&str> {
        self.0.database.as_ref().map(|db| db.code.as_str())
    }

    /// Which statement of a bundle (an [`Atomic`](crate::Atomic) or a multi-statement query) failed.
    ///
    /// ```
    /// assert!(pgengine::Error::invalid_input("x").statement().is_none());
    /// ```
    pub fn statement(&self) -> Option<&FailedStatement> {
        self.0.statement.as_ref()
    }

    /// How many times a retried transaction was attempted before giving up with this error.
    ///
    /// ```
    /// assert_eq!(pgengine::Error::invalid_input("x").attempts(), None);
    /// ```
    pub fn attempts(&self) -> Option<u32> {
        self.0.attempts
    }

    /// SQLSTATE `23505`: a unique constraint was violated.
    ///
    /// ```
    /// assert!(!pgengine::Error::invalid_input("x").is_unique_violation());
    /// ```
    pub fn is_unique_violation(&self) -> bool {
        self.code() == Some(SqlState::UNIQUE_VIOLATION.code())
    }

    /// SQLSTATE `40001`: the transaction could not be serialized; run it again.
    ///
    /// ```
    /// assert!(!pgengine::Error::invalid_input("x").is_serialization_failure());
    /// ```
    pub fn is_serialization_failure(&self) -> bool {
        self.code() == Some(SqlState::T_R_SERIALIZATION_FAILURE.code())
    }

    /// SQLSTATE `40P01`: the server broke a deadlock by failing this transaction.
    ///
    /// ```
    /// assert!(!pgengine::Error::invalid_input("x").is_deadlock());
    /// ```
    pub fn is_deadlock(&self) -> bool {
        self.code() == Some(SqlState::T_R_DEADLOCK_DETECTED.code())
    }

    /// A serialization failure or a deadlock: the transaction can succeed when run again.
    ///
    /// ```
    /// assert!(!pgengine::Error::invalid_input("x").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.0
            .database
            .as_ref()
            .is_some_and(DatabaseError::is_retryable)
    }

    /// The connection failed while a `COMMIT` was in flight: see
    /// [`ErrorKind::CommitOutcomeUnknown`].
    ///
    /// ```
    /// assert!(!pgengine::Error::invalid_input("x").is_outcome_unknown());
    /// ```
    pub fn is_outcome_unknown(&self) -> bool {
        self.0.kind == ErrorKind::CommitOutcomeUnknown
    }

    /// Whether the connection this error came from is unusable: it failed, or the
    /// server ended the session. Such a connection is discarded.
    pub(crate) fn is_connection_failure(&self) -> bool {
        matches!(
            self.0.kind,
            ErrorKind::Connection | ErrorKind::CommitOutcomeUnknown
        )
    }

    /// Turns a connection failure met while a `COMMIT` was in flight into
    /// [`ErrorKind::CommitOutcomeUnknown`]; other errors are kept.
    pub(crate) fn during_commit(mut self) -> Self {
        if self.0.kind == ErrorKind::Connection {
            self.0.kind = ErrorKind::CommitOutcomeUnknown;
            self.0.message = format!(
                "the connection failed while COMMIT was in flight, so whether the transaction \
                 committed is unknown; check on the server before running it again ({})",
                match &self.0.database {
                    Some(db) => db.to_string(),
                    None => std::mem::take(&mut self.0.message),
                }
            );
        }
        self
    }

    /// Classifies a driver error met while connecting: always [`ErrorKind::Connect`],
    /// with the server's error (bad password, unknown database) kept.
    pub(crate) fn connect(err: tokio_postgres::Error) -> Self {
        let mut error = Self::from(err);
        if error.0.database.is_none() {
            error.0.message = "could not connect to the server".into();
        }
        error.0.kind = ErrorKind::Connect;
        error
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        if let Some(db) = err.as_db_error() {
            let mut error = Self::from_database(DatabaseError::from_db(db));
            if ends_the_session(db) {
                error.0.kind = ErrorKind::Connection;
            }
            error.0.source = Some(Box::new(err));
            return error;
        }
        let broken = err.is_closed()
            || std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
        let kind = if broken {
            ErrorKind::Connection
        } else {
            ErrorKind::Driver
        };
        Self::new(kind, err.to_string()).with_source(err)
    }
}

/// Whether the server ended the session with this error: severity `FATAL` or `PANIC`,
/// SQLSTATE class `08` (connection exception), or `57P01`–`57P03` (admin shutdown,
/// crash shutdown, cannot connect now).
fn ends_the_session(db: &DbError) -> bool {
    let code = db.code().code();
    matches!(db.severity(), "FATAL" | "PANIC")
        || code.starts_with("08")
        || matches!(code, "57P01" | "57P02" | "57P03")
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match err {
            PoolError::Timeout(TimeoutType::Wait) => Self::new(
                ErrorKind::PoolTimeout,
                "no pooled connection became free within the pool's wait timeout",
            ),
            PoolError::Timeout(TimeoutType::Create) => Self::new(
                ErrorKind::Connect,
                "connecting to the server took longer than the connect timeout",
            ),
            PoolError::Timeout(TimeoutType::Recycle) => Self::new(
                ErrorKind::Connection,
                "checking a pooled connection took longer than allowed",
            ),
            PoolError::Closed => Self::new(
                ErrorKind::Closed,
                "the connection pool is closed (close_connection_pool was called)",
            ),
            PoolError::Backend(e) => Self::connect(e),
            other => Self::new(ErrorKind::Connect, other.to_string()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.0;
        match inner.kind {
            ErrorKind::Config => write!(f, "configuration error: {}", inner.message)?,
            ErrorKind::Connect => match &inner.database {
                Some(db) => write!(f, "connect error: {db}")?,
                None => write!(f, "connect error: {}", inner.message)?,
            },
            ErrorKind::PoolTimeout => write!(f, "pool timeout: {}", inner.message)?,
            ErrorKind::Closed => write!(f, "closed: {}", inner.message)?,
            ErrorKind::Database => match &inner.database {
                Some(db) => write!(f, "database error: {db}")?,
                None => write!(f, "database error: {}", inner.message)?,
            },
            ErrorKind::Connection => match &inner.database {
                Some(db) => write!(f, "connection error: {db}")?,
                None => write!(f, "connection error: {}", inner.message)?,
            },
            ErrorKind::CommitOutcomeUnknown => {
                write!(f, "commit outcome unknown: {}", inner.message)?
            }
            ErrorKind::Driver => write!(f, "driver error: {}", inner.message)?,
            ErrorKind::InvalidInput => write!(f, "invalid input: {}", inner.message)?,
            ErrorKind::Transaction => write!(f, "transaction error: {}", inner.message)?,
            ErrorKind::RowNotFound => write!(f, "row not found: {}", inner.message)?,
            ErrorKind::TooManyRows => write!(f, "too many rows: {}", inner.message)?,
        }
        if let Some(statement) = &inner.statement {
            write!(f, " [statement #{}: {}]", statement.index, statement.sql)?;
        }
        if let Some(attempts) = inner.attempts {
            write!(f, " [after {attempts} attempts]")?;
        }
        if let (ErrorKind::Connect, Some(source), None) =
            (inner.kind, &inner.source, &inner.database)
        {
            // The whole chain: a TLS failure says why only in its innermost cause.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
            while let Some(error) = cause {
                write!(f, ": {error}")?;
                cause = error.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.0;
        let mut d = f.debug_struct("Error");
        d.field("kind", &inner.kind);
        if !inner.message.is_empty() {
            d.field("message", &inner.message);
        }
        if let Some(db) = &inner.database {
            d.field("database", db);
        }
        if let Some(statement) = &inner.statement {
            d.field("statement", statement);
        }
        if let Some(attempts) = inner.attempts {
            d.field("attempts", &attempts);
        }
        if let Some(source) = &inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}
