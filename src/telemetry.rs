//! Tracing spans shaped as OpenTelemetry database client spans: one per query, per
//! transaction (one per attempt) and per batch.
//!
//! Their fields follow OpenTelemetry's database semantic conventions, so that
//! `tracing-opentelemetry` exports them as proper database spans: `db.system.name`
//! (`postgresql`), `db.namespace` (the database), `db.operation.name` (the statement's
//! first keyword), `db.query.text` (the SQL with `$n` placeholders: argument values are
//! never in it), `server.address`, `server.port`, and on failure
//! `db.response.status_code` (the SQLSTATE), `error.type` (the SQLSTATE, or the
//! engine's [`ErrorKind`] for other errors) and `otel.status_code = "ERROR"`.
//! `otel.name` and `otel.kind = "client"` name and type the exported span.
//!
//! Spans are at `INFO`: query spans under target `pgengine::query`, transaction spans
//! under `pgengine::transaction`, batch spans under `pgengine::batch`. When no
//! subscriber wants them, creating one costs a check of the callsite's interest; with
//! no `tracing` subscriber at all, none is made (not even for `tracing`'s `log`
//! fallback, which would otherwise format every span's fields).

use futures::future::Either;
use tokio_postgres::config::Host;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::{Error, ErrorKind};

/// What every span of one engine says about its server.
#[derive(Debug, Clone, Default)]
pub(crate) struct Telemetry {
    namespace: String,
    address: String,
    port: u16,
}

impl Telemetry {
    /// The server fields of an engine connecting with `pg` (its first host).
    pub(crate) fn new(pg: &tokio_postgres::Config) -> Self {
        let address = match (pg.get_hostaddrs().first(), pg.get_hosts().first()) {
            (_, Some(Host::Tcp(name))) => name.clone(),
            (Some(ip), _) => ip.to_string(),
            #[cfg(unix)]
            (None, Some(Host::Unix(dir))) => dir.display().to_string(),
            (None, None) => "localhost".to_owned(),
        };
        Self {
            namespace: pg
                .get_dbname()
                .or(pg.get_user())
                .unwrap_or_default()
                .to_owned(),
            address,
            port: pg.get_ports().first().copied().unwrap_or(5432),
        }
    }

    /// The span of one query, a child of `parent` (the transaction's or batch's span)
    /// or else of the current span.
    pub(crate) fn query_span(&self, sql: &str, parent: Option<&Span>) -> Span {
        if !tracing::dispatcher::has_been_set() {
            return Span::none();
        }
        // Field values are computed only when a subscriber wants the span.
        child_span(parent, |parent| {
            tracing::info_span!(
                target: "pgengine::query",
                parent: parent,
                "query",
                otel.name = span_name(operation_name(sql)),
                otel.kind = "client",
                otel.status_code = Empty,
                db.system.name = "postgresql",
                db.namespace = %self.namespace,
                db.operation.name = operation_name(sql),
                db.query.text = sql,
                server.address = %self.address,
                server.port = self.port,
                db.response.status_code = Empty,
                error.type = Empty,
            )
        })
    }

    /// The span of one transaction on the server (one attempt of a retried one), a
    /// child of the current span; `db.transaction.outcome` says how it ended.
    pub(crate) fn transaction_span(&self, attempt: u32) -> Span {
        if !tracing::dispatcher::has_been_set() {
            return Span::none();
        }
        tracing::info_span!(
            target: "pgengine::transaction",
            "transaction",
            otel.name = "transaction",
            otel.kind = "client",
            otel.status_code = Empty,
            db.system.name = "postgresql",
            db.namespace = %self.namespace,
            server.address = %self.address,
            server.port = self.port,
            pgengine.attempt = attempt,
            db.transaction.outcome = Empty,
            db.response.status_code = Empty,
            error.type = Empty,
        )
    }

    /// The span of one batch, from its first row to its last; `db.response.returned_rows`
    /// counts what it streamed.
    pub(crate) fn batch_span(&self, sql: &str, batch_size: usize, parent: Option<&Span>) -> Span {
        if !tracing::dispatcher::has_been_set() {
            return Span::none();
        }
        child_span(parent, |parent| {
            tracing::info_span!(
                target: "pgengine::batch",
                parent: parent,
                "batch",
                otel.name = "batch",
                otel.kind = "client",
                otel.status_code = Empty,
                db.system.name = "postgresql",
                db.namespace = %self.namespace,
                db.operation.name = operation_name(sql),
                db.query.text = sql,
                server.address = %self.address,
                server.port = self.port,
                pgengine.batch_size = batch_size,
                db.response.returned_rows = Empty,
                db.response.status_code = Empty,
                error.type = Empty,
            )
        })
    }
}

/// The span `make` makes as a child of `parent`, else of the current span. A `parent`
/// made by no subscriber (disabled, or made under `tracing`'s no-op subscriber, which a
/// thread may hold as its default while another subscriber is the global one) makes a
/// root span: its id means nothing to the subscriber that makes the child, which would
/// panic looking it up.
fn child_span(parent: Option<&Span>, make: impl FnOnce(Option<tracing::Id>) -> Span) -> Span {
    let parent = match parent {
        None => Span::current().id(),
        Some(parent) => parent
            .with_subscriber(|(id, dispatch)| {
                (!dispatch.is::<tracing::subscriber::NoSubscriber>()).then(|| id.clone())
            })
            .flatten(),
    };
    make(parent)
}

/// `future`, entered in `span` at each of its polls when the span is enabled; as it is
/// when not (entering and leaving a disabled span still cost a call each, at every
/// poll).
pub(crate) fn in_span<F: Future>(span: &Span, future: F) -> impl Future<Output = F::Output> {
    match span.is_disabled() {
        true => Either::Left(future),
        false => Either::Right(future.instrument(span.clone())),
    }
}

/// Records `error` on `span`: its SQLSTATE (a database error) or the engine's kind of
/// error, and the error status.
pub(crate) fn record_error(span: &Span, error: &Error) {
    if span.is_disabled() {
        return;
    }
    span.record("otel.status_code", "ERROR");
    match error.code() {
        Some(code) => {
            span.record("db.response.status_code", code);
            span.record("error.type", code);
        }
        None => {
            span.record("error.type", kind_name(error.kind()));
        }
    }
}

/// The name `error.type` gives an error of `kind` without a SQLSTATE.
fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Config => "config",
        ErrorKind::Connect => "connect",
        ErrorKind::PoolTimeout => "pool_timeout",
        ErrorKind::Closed => "closed",
        ErrorKind::Database => "database",
        ErrorKind::Connection => "connection",
        ErrorKind::CommitOutcomeUnknown => "commit_outcome_unknown",
        ErrorKind::Driver => "driver",
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::Transaction => "transaction",
        ErrorKind::RowNotFound => "row_not_found",
        ErrorKind::TooManyRows => "too_many_rows",
    }
}

/// The name of a query's span: its operation, or `postgresql` when it has none (as
/// OpenTelemetry's conventions name a span without one).
fn span_name(operation: &'static str) -> &'static str {
    if operation.is_empty() {
        "postgresql"
    } else {
        operation
    }
}

/// The statement's first keyword, upper-cased as OpenTelemetry shows it (`SELECT`,
/// `INSERT`, `WITH`, …), skipping leading blanks and comments; `""` when there is none.
pub(crate) fn operation_name(sql: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "WITH",
        "VALUES",
        "TABLE",
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "DECLARE",
        "FETCH",
        "CLOSE",
        "MOVE",
        "COPY",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "GRANT",
        "REVOKE",
        "COMMENT",
        "SET",
        "RESET",
        "SHOW",
        "LISTEN",
        "UNLISTEN",
        "NOTIFY",
        "LOCK",
        "ANALYZE",
        "VACUUM",
        "EXPLAIN",
        "CALL",
        "DO",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "DISCARD",
        "REFRESH",
        "REINDEX",
        "CLUSTER",
        "CHECKPOINT",
        "LOAD",
        "IMPORT",
        "SECURITY",
        "ABORT",
    ];
    let word = crate::schema_change::first_word(sql);
    KNOWN
        .iter()
        .find(|known| known.eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A span made by the no-op subscriber (as a thread that holds it as its default
    /// makes them while a global subscriber makes callsites "always" interested) has
    /// an id the registry does not know: a child of it is a root span, not a panic.
    #[test]
    fn a_parent_made_by_no_subscriber_makes_a_root_span() {
        use tracing::subscriber::NoSubscriber;
        use tracing_subscriber::registry::{LookupSpan, SpanData};
        let registry = tracing_subscriber::registry();
        let dispatch = tracing::Dispatch::new(registry);
        tracing::dispatcher::with_default(&dispatch, || {
            let real = tracing::info_span!("real");
            let metadata = real.metadata().expect("the registry wants every span");
            let no_op = tracing::Dispatch::new(NoSubscriber::default());
            let dead = tracing::dispatcher::with_default(&no_op, || {
                Span::new(metadata, &metadata.fields().value_set(&[]))
            });
            assert!(dead.id().is_some(), "the no-op subscriber gives an id too");

            let orphan = child_span(
                Some(&dead),
                |parent| tracing::info_span!(parent: parent, "child"),
            );
            let child = child_span(
                Some(&real),
                |parent| tracing::info_span!(parent: parent, "child"),
            );
            let registry = dispatch
                .downcast_ref::<tracing_subscriber::Registry>()
                .expect("a registry");
            let parent_of = |span: &Span| {
                let data = registry.span_data(&span.id().expect("an id"))?;
                SpanData::parent(&data).cloned()
            };
            assert_eq!(parent_of(&orphan), None);
            assert_eq!(parent_of(&child), real.id());
        });
    }

    #[test]
    fn the_operation_is_the_first_keyword() {
        assert_eq!(operation_name("select 1"), "SELECT");
        assert_eq!(
            operation_name("  -- note\n/* c */ INSERT INTO t VALUES (1)"),
            "INSERT"
        );
        assert_eq!(
            operation_name("WITH x AS (SELECT 1) SELECT * FROM x"),
            "WITH"
        );
        assert_eq!(operation_name("(SELECT 1)"), "");
        assert_eq!(operation_name(""), "");
        assert_eq!(operation_name("frobnicate"), "");
    }

    #[test]
    fn the_server_fields_come_from_the_first_host() {
        let telemetry = Telemetry::new(&"postgres://u@db1:6543,db2/app".parse().unwrap());
        assert_eq!(
            (
                telemetry.namespace.as_str(),
                telemetry.address.as_str(),
                telemetry.port
            ),
            ("app", "db1", 6543)
        );
    }
}
