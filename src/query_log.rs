//! The query log (target `pgengine::query`): what each request sent, how long it took,
//! how it ended; slow queries; the rule that keeps argument values out of it unless
//! asked for; and each request's span (see [`telemetry`](crate::telemetry)).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio_postgres::types::ToSql;
use tracing::Span;

use crate::config::EngineSettings;
use crate::error::{Error, Result};
use crate::telemetry::{self, Telemetry};

/// What an engine logs about its requests, and the numbering of its queries.
pub(crate) struct QueryLog {
    log_queries: bool,
    log_responses: bool,
    log_arguments: bool,
    slow_query_threshold: Option<Duration>,
    /// Whether anything above logs a request (one check on every request's path).
    logs: bool,
    query_ids: AtomicU64,
    telemetry: Telemetry,
}

impl QueryLog {
    /// The log as the engine's settings ask for it, with spans that say `telemetry`'s
    /// server.
    pub(crate) fn new(settings: &EngineSettings, telemetry: Telemetry) -> Self {
        Self {
            telemetry,
            log_queries: settings.log_queries,
            log_responses: settings.log_responses,
            log_arguments: settings.log_arguments,
            slow_query_threshold: settings.slow_query_threshold,
            logs: settings.log_queries
                || settings.log_responses
                || settings.slow_query_threshold.is_some(),
            query_ids: AtomicU64::new(1),
        }
    }

    /// The engine's span fields.
    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Starts watching one request, its span a child of `parent` (else of the current
    /// span), or `None` when nothing is logged and no span wanted (the common case costs
    /// two checks).
    pub(crate) fn watch<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
        parent: Option<&Span>,
    ) -> Option<Watch<'a>> {
        let logs = self.logs;
        if !logs && !tracing::dispatcher::has_been_set() {
            return None; // no log, and no subscriber for a span: no work at all
        }
        let span = self.telemetry.query_span(sql, parent);
        let watched = logs || !span.is_disabled();
        watched.then(|| Watch {
            log: self,
            sql,
            params,
            query_id: self.query_ids.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            span,
        })
    }

    /// Runs one request and reports it as [`watch`](Self::watch) says. The request is
    /// polled as soon as this future is, so pipelined order is kept.
    pub(crate) fn observe<'a, T>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
        parent: Option<&Span>,
        request: impl Future<Output = Result<T>>,
        row_count: impl Fn(&T) -> Option<usize>,
    ) -> impl Future<Output = Result<T>> {
        // A combinator, not an `async fn`: the request's future is held once. The watch
        // (its clock and span) starts here: callers await the result at once.
        let watch = self.watch(sql, params, parent);
        request.map(move |result| {
            if let Some(watch) = watch {
                watch.report(result.as_ref(), row_count);
            }
            result
        })
    }
}

/// One request watched for the query log: the query event (`INFO`), the response event
/// (`DEBUG`) and the slow-query warning (`WARN`).
pub(crate) struct Watch<'a> {
    log: &'a QueryLog,
    sql: &'a str,
    params: &'a [&'a (dyn ToSql + Sync)],
    query_id: u64,
    started: Instant,
    /// Closed when the watch is dropped (the request answered or abandoned).
    span: Span,
}

impl Watch<'_> {
    /// Reports the finished request.
    pub(crate) fn report<T>(
        self,
        result: std::result::Result<&T, &Error>,
        row_count: impl Fn(&T) -> Option<usize>,
    ) {
        let Self {
            log,
            sql,
            params,
            query_id,
            started,
            span,
        } = self;
        let elapsed = started.elapsed();
        let duration_us = elapsed.as_micros() as u64;
        if let Err(error) = result {
            telemetry::record_error(&span, error);
        }
        let error = result
            .err()
            .map(|error| logged_error(error, log.log_arguments));
        if log.log_queries {
            if log.log_arguments {
                tracing::info!(target: "pgengine::query", query_id, sql, args = params.len(), arguments = ?params, duration_us, error, "query");
            } else {
                tracing::info!(target: "pgengine::query", query_id, sql, args = params.len(), duration_us, error, "query");
            }
        }
        if log.log_responses {
            let rows = result.ok().and_then(row_count);
            tracing::debug!(target: "pgengine::query", query_id, rows, duration_us, "response");
        }
        if let Some(threshold) = log.slow_query_threshold
            && elapsed >= threshold
        {
            tracing::warn!(target: "pgengine::query", query_id, sql, args = params.len(), duration_us, threshold_us = threshold.as_micros() as u64, "slow query");
        }
    }
}

/// An error as the query log shows it. The server's message, detail and hint can quote
/// argument values (`Key (email)=(alice@example.com) already exists`), so without
/// `log_arguments` a server error shows as its SQLSTATE and the objects it names
/// (schema, table, column, constraint) only; other errors are the engine's or the
/// driver's own words and show whole.
fn logged_error(error: &Error, log_arguments: bool) -> String {
    let Some(db) = error.database_error().filter(|_| !log_arguments) else {
        return error.to_string();
    };
    let mut text = format!("database error: {} {}", db.severity, db.code);
    let named = [
        ("schema", &db.schema),
        ("table", &db.table),
        ("column", &db.column),
        ("constraint", &db.constraint),
    ];
    for (what, name) in named {
        if let Some(name) = name {
            text.push_str(&format!(", {what} {name}"));
        }
    }
    if let Some(statement) = error.statement() {
        text.push_str(&format!(
            " [statement #{}: {}]",
            statement.index, statement.sql
        ));
    }
    text
}
