//! Sending many statements on one connection, in one transaction.
//!
//! When every statement can be bound at once (cached, without parameters, or unnamed),
//! the whole bundle is one request that ends in one `Sync` (`Client::pipeline`, the
//! driver patch): the server runs the statements back to back and answers once.
//! Otherwise each statement is its own request, still sent back to back: tokio-postgres
//! sends a request when its future is first polled and answers requests in order, so
//! polling every request once, in order, before waiting for any answer puts them all on
//! the wire together, and the round trips do not grow with the statement count.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{PipelineStatement, Row, Statement};

use super::Runner;
use crate::context::Finish;
use crate::error::{Error, Result};
use crate::pool::Connection;
use crate::query::CompiledQuery;
use crate::query_log::Watch;
use crate::statements::typed;

/// The parameters of a statement that has none.
const NO_PARAMS: &[&(dyn ToSql + Sync)] = &[];

type Request<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the caller wants back from each statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Rows affected by each statement.
    Counts,
    /// The rows of the last statement.
    RowsOfLast,
}

/// The answer to one statement.
pub(crate) enum Outcome {
    Count(u64),
    Rows(Vec<Row>),
}

impl Outcome {
    /// The rows it affected (or returned).
    pub(crate) fn count(&self) -> u64 {
        match self {
            Outcome::Count(n) => *n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }
}

/// Runs `statements` in order in one transaction: the runner's transaction when it has
/// one, else its own (`BEGIN` … `COMMIT`, pipelined with the statements). The first
/// failing statement is the error, with its index and SQL; a failure rolls back all.
///
/// When every statement can then be bound at once, the bundle is one pipeline with one
/// `Sync` ([`run_synced`]); else each statement is its own request, back to back:
/// a statement with parameters needs its prepared form (statement cache, once per
/// connection) before it can be sent. A statement may depend on what an earlier one
/// does (`CREATE TABLE t` then `INSERT INTO t …`), so a statement is only prepared
/// after the ones before it were sent: a cache miss sends its `Parse` behind them and
/// waits for that one answer. Outside a transaction the texts are first prepared all
/// together, up front (where a failure aborts nothing), so that normally the misses
/// cost one round trip in all; inside a transaction a failed `Parse` would abort it,
/// so there each new text is prepared at its turn. With no statement cache
/// (capacity 0), each statement is an unnamed one, sent whole at its turn.
pub(crate) async fn run(
    runner: &Runner,
    statements: &[CompiledQuery<'_>],
    want: Want,
) -> Result<Vec<Outcome>> {
    let own_transaction = runner.transaction().is_none();
    let changes_schema = statements
        .iter()
        .any(|statement| crate::schema_change::statement_changes_schema(statement.sql()));
    // Statements prepared ahead of a schema change in the bundle could be stale by
    // their turn: then each is prepared at its turn.
    if own_transaction && !changes_schema {
        prepare_ahead(runner, statements).await;
    }
    // In a transaction, the bundle is one request: admitted, and sent in one turn.
    let _permit = runner.admit().await?;
    let _turn = runner.turn().await;
    let connection = runner.connection();
    let result = match bindable(connection, statements, changes_schema) {
        Some(bound) => {
            let request = run_synced(runner, &bound, want, own_transaction);
            connection.guarded(request).await
        }
        None => {
            let request = run_in_order(runner, statements, want, own_transaction);
            connection.guarded(request).await
        }
    };
    if changes_schema && result.is_ok() {
        for statement in statements {
            connection.ran_statement(statement.sql());
        }
    }
    runner.noted(result)
}

/// A statement ready to be bound without asking the server anything.
struct Bound<'q> {
    sql: &'q str,
    params: &'q [&'q (dyn ToSql + Sync)],
    form: Form<'q>,
}

/// How a [`Bound`] statement is sent.
enum Form<'q> {
    /// From the statement cache.
    Prepared(Statement),
    /// Parsed at its turn (without parameters, or with no statement cache), with the
    /// types its parameters are declared as.
    Unnamed(Vec<(&'q (dyn ToSql + Sync), Type)>),
}

impl<'q> Bound<'q> {
    /// `sql` with `params`, bound as `statement`, or unnamed when there is none.
    fn new(
        sql: &'q str,
        params: &'q [&'q (dyn ToSql + Sync)],
        statement: Option<&Statement>,
    ) -> Result<Self> {
        let form = match statement {
            Some(statement) => Form::Prepared(statement.clone()),
            None => Form::Unnamed(typed(params)?),
        };
        Ok(Self { sql, params, form })
    }

    fn as_pipeline(&self) -> PipelineStatement<'_> {
        match &self.form {
            Form::Prepared(statement) => PipelineStatement::Prepared(statement, self.params),
            Form::Unnamed(typed) => PipelineStatement::Unnamed(self.sql, typed),
        }
    }
}

/// Every statement of the bundle ready to be bound, or `None` when one needs the
/// server first: a text not in the statement cache, or a cached one that a schema
/// change earlier in the bundle could make stale (each is then prepared at its turn).
fn bindable<'q>(
    connection: &Connection,
    statements: &'q [CompiledQuery<'q>],
    changes_schema: bool,
) -> Option<Vec<Bound<'q>>> {
    statements
        .iter()
        .map(|statement| {
            let (sql, params) = (statement.sql(), statement.params());
            let prepared = if params.is_empty() || !connection.caches_statements() {
                None
            } else if changes_schema {
                return None;
            } else {
                Some(connection.cached_statement(sql)?)
            };
            Bound::new(sql, params, prepared.as_ref()).ok()
        })
        .collect()
}

/// Runs `sql` once for each of `rows` (its parameters), in one transaction (the
/// runner's, or its own), as one pipeline with one `Sync`: one statement prepared, a
/// `Bind`/`Execute` per row. Returns the rows affected, summed. A failure names the
/// row (as the failing statement's index) and applies none.
pub(crate) async fn run_many<'a>(
    runner: &Runner,
    sql: &str,
    rows: &[impl AsRef<[&'a (dyn ToSql + Sync)]> + Sync],
) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let own_transaction = runner.transaction().is_none();
    let _permit = runner.admit().await?;
    let _turn = runner.turn().await;
    let connection = runner.connection();
    let mut retried = false;
    let result = loop {
        let request = async {
            let prepared = match connection.caches_statements() {
                true => Some(connection.statement(sql).await?),
                false => None,
            };
            let bound = rows
                .iter()
                .enumerate()
                .map(|(index, params)| {
                    let params = params.as_ref();
                    if let Some(expected) = prepared.as_ref().map(|p| p.params().len())
                        && params.len() != expected
                    {
                        return Err(Error::invalid_input(format!(
                            "row {index} has {} values, the statement takes {expected}",
                            params.len()
                        )));
                    }
                    Bound::new(sql, params, prepared.as_ref())
                        .map_err(|error| error.with_statement(index, sql))
                })
                .collect::<Result<Vec<_>>>()?;
            run_synced(runner, &bound, Want::Counts, own_transaction).await
        };
        match connection.guarded(request).await {
            Err(error) if runner.retry_stale(sql, &error, &mut retried) => {}
            result => break result,
        }
    };
    if result.is_ok() {
        connection.ran_statement(sql);
    }
    runner
        .noted(result)
        .map(|outcomes| outcomes.iter().map(Outcome::count).sum())
}

/// Sends the whole bundle as one pipeline ending in one `Sync` (with `BEGIN` and
/// `COMMIT` around it for its own transaction): the server runs the statements back
/// to back and answers once. At the first failure it skips the rest, up to the `Sync`.
async fn run_synced(
    runner: &Runner,
    bound: &[Bound<'_>],
    want: Want,
    own_transaction: bool,
) -> Result<Vec<Outcome>> {
    let connection = runner.connection();
    let bracket = usize::from(own_transaction);
    let log = &runner.context().log;
    let mut sent = Vec::with_capacity(bound.len() + 2 * bracket);
    // The statements the query log watches, by their place in `sent`: none (and nothing
    // allocated) when nothing is logged.
    let mut watched: Vec<(usize, Watch<'_>)> = Vec::new();
    let mut send = |statement, sql, params| {
        if let Some(watch) = log.watch(sql, params, runner.span()) {
            watched.push((sent.len(), watch));
        }
        sent.push(statement);
    };
    if own_transaction {
        connection.set_in_transaction(true);
        send(PipelineStatement::Unnamed("BEGIN", &[]), "BEGIN", NO_PARAMS);
    }
    for statement in bound {
        send(statement.as_pipeline(), statement.sql, statement.params);
    }
    if own_transaction {
        send(
            PipelineStatement::Unnamed("COMMIT", &[]),
            "COMMIT",
            NO_PARAMS,
        );
    }
    let answer = connection.client().pipeline(&sent).await;
    let results = match answer {
        Ok(results) => results,
        Err(failure) => {
            let index = failure.index();
            let error = Error::from(failure.into_error());
            // Which statement failed: one of the bundle's, or the `COMMIT` (or the
            // connection, before any answer told).
            let statement = index
                .and_then(|index| index.checked_sub(bracket))
                .filter(|index| *index < bound.len());
            let error = match statement {
                Some(index) => {
                    runner.forget_if_stale(bound[index].sql, &error);
                    error.with_statement(index, bound[index].sql)
                }
                None => error,
            };
            if let Some(at) = watched.iter().position(|(at, _)| Some(*at) == index) {
                watched
                    .swap_remove(at)
                    .1
                    .report::<()>(Err(&error), |_| None);
            }
            if !own_transaction {
                return Err(error);
            }
            let commit_sent_or_unknown = index.is_none_or(|index| index > bound.len());
            if error.is_connection_failure() && !commit_sent_or_unknown {
                return Err(error); // the transaction died with the connection
            }
            return runner
                .context()
                .settle_end(connection, Finish::Commit, Err(error))
                .await
                .map(|()| Vec::new());
        }
    };
    if own_transaction {
        connection.set_in_transaction(false);
    }
    let last = bound.len() - 1;
    let mut outcomes = Vec::with_capacity(bound.len());
    let mut watched = watched.into_iter().peekable();
    for (index, result) in results.into_iter().enumerate() {
        let count = result.rows_affected();
        if let Some((_, watch)) = watched.next_if(|(at, _)| *at == index) {
            let row_count = match result.rows() {
                [] => count as usize,
                rows => rows.len(),
            };
            watch.report(Ok(&()), |_| Some(row_count));
        }
        let Some(index) = index.checked_sub(bracket).filter(|index| *index <= last) else {
            continue; // BEGIN, COMMIT
        };
        outcomes.push(if want == Want::RowsOfLast && index == last {
            Outcome::Rows(result.into_rows())
        } else {
            Outcome::Count(count)
        });
    }
    Ok(outcomes)
}

/// Prepares each distinct parameterized text, pipelined; failures are left for the
/// statement's turn (it may need what an earlier statement creates).
async fn prepare_ahead(runner: &Runner, statements: &[CompiledQuery<'_>]) {
    let connection = runner.connection();
    if !connection.caches_statements() {
        return; // unnamed statements: nothing to prepare
    }
    let mut texts: Vec<&str> = statements
        .iter()
        .filter(|statement| !statement.params().is_empty())
        .map(CompiledQuery::sql)
        .collect();
    texts.sort_unstable();
    texts.dedup();
    let prepares = texts.into_iter().map(|sql| connection.statement(sql));
    let prepared = connection.guarded(async { Ok(futures::future::join_all(prepares).await) });
    let _ = prepared.await;
}

async fn run_in_order(
    runner: &Runner,
    statements: &[CompiledQuery<'_>],
    want: Want,
    own_transaction: bool,
) -> Result<Vec<Outcome>> {
    let connection = runner.connection();
    let client = connection.client();
    let mut pipe = Pipe::with_capacity(statements.len() + 2);
    if own_transaction {
        connection.set_in_transaction(true);
        pipe.send(Box::pin(bracket(runner, "BEGIN"))).await;
    }
    let last = statements.len() - 1;
    let mut failed_prepare = None;
    for (index, statement) in statements.iter().enumerate() {
        let rows_wanted = want == Want::RowsOfLast && index == last;
        let params = statement.params();
        let sql = statement.sql();
        let request: Request<'_, Result<Outcome>> = if params.is_empty() {
            if rows_wanted {
                Box::pin(observed(runner, sql, params, async move {
                    client.query_typed(sql, &[]).await.map(Outcome::Rows)
                }))
            } else {
                // The extended protocol, unprepared: exactly one statement runs (a
                // second one stacked behind a `;` is refused by the server).
                Box::pin(observed(runner, sql, params, async move {
                    let rows = client.query_typed_raw(sql, no_params()).await?;
                    let mut rows = std::pin::pin!(rows);
                    while rows.try_next().await?.is_some() {}
                    Ok::<_, tokio_postgres::Error>(Outcome::Count(
                        rows.rows_affected().unwrap_or(0),
                    ))
                }))
            }
        } else if !connection.caches_statements() {
            // An unnamed statement: parsed, bound and run in one request.
            if rows_wanted {
                Box::pin(observed(runner, sql, params, async move {
                    connection.query_rows(sql, params).await.map(Outcome::Rows)
                }))
            } else {
                Box::pin(observed(runner, sql, params, async move {
                    connection
                        .execute_count(sql, params)
                        .await
                        .map(Outcome::Count)
                }))
            }
        } else {
            // A cache hit is ready at once; a miss is sent behind the statements before
            // it, so that it sees what they did.
            let prepared = match pipe.wait_for(connection.statement(sql)).await {
                Ok(prepared) => prepared,
                Err(error) => {
                    failed_prepare = Some((index, Error::from(error)));
                    break;
                }
            };
            if rows_wanted {
                Box::pin(observed(runner, sql, params, async move {
                    client.query(&prepared, params).await.map(Outcome::Rows)
                }))
            } else {
                Box::pin(observed(runner, sql, params, async move {
                    client.execute(&prepared, params).await.map(Outcome::Count)
                }))
            }
        };
        pipe.send(request).await;
        if pipe.any_failed() {
            break; // the transaction is aborted: sending more is wasted
        }
    }
    let failed = failed_prepare.is_some() || pipe.any_failed();
    if own_transaction {
        let end = if failed {
            Finish::Rollback
        } else {
            Finish::Commit
        };
        pipe.send(Box::pin(bracket(runner, end.sql()))).await;
    }

    let mut answers = pipe.all_answers().await;
    let mut end = None;
    if own_transaction {
        let finish = if failed {
            Finish::Rollback
        } else {
            Finish::Commit
        };
        let answer = answers
            .pop()
            .expect("COMMIT or ROLLBACK was sent")
            .map(drop);
        end = Some(
            runner
                .context()
                .settle_end(connection, finish, answer)
                .await,
        );
        answers.remove(0)?; // BEGIN
    }
    // `answers[i]` is statement `i`'s: the first failure is the error to report.
    let mut outcomes = Vec::with_capacity(answers.len());
    for (index, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => return Err(error.with_statement(index, statements[index].sql())),
        }
    }
    if let Some((index, error)) = failed_prepare {
        return Err(error.with_statement(index, statements[index].sql()));
    }
    if let Some(end) = end {
        end?; // a COMMIT can fail too (deferred constraints, serialization)
    }
    Ok(outcomes)
}

/// Requests on one connection, each sent (polled once) as it is added, so that they go
/// out in order without waiting for each other; their answers are collected as they come.
struct Pipe<'a, T> {
    answers: Vec<Option<T>>,
    waiting: FuturesUnordered<BoxFuture<'a, (usize, T)>>,
}

impl<'a, T: Send + 'a> Pipe<'a, T> {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            answers: Vec::with_capacity(capacity),
            waiting: FuturesUnordered::new(),
        }
    }

    /// Sends `request` behind every request sent before it.
    async fn send(&mut self, mut request: Request<'a, T>) {
        let index = self.answers.len();
        self.answers.push(None);
        match futures::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await {
            Poll::Ready(answer) => self.answers[index] = Some(answer),
            Poll::Pending => self
                .waiting
                .push(Box::pin(async move { (index, request.await) })),
        }
    }

    /// Runs `future` (sending what it sends behind everything sent so far), collecting
    /// the answers of the requests in flight meanwhile: the driver only reads on while
    /// earlier answers are taken.
    async fn wait_for<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        futures::future::poll_fn(|cx| {
            let output = future.as_mut().poll(cx);
            while let Poll::Ready(Some((index, answer))) = self.waiting.poll_next_unpin(cx) {
                self.answers[index] = Some(answer);
            }
            output
        })
        .await
    }

    /// Every answer, in the order the requests were sent.
    async fn all_answers(mut self) -> Vec<T> {
        while let Some((index, answer)) = self.waiting.next().await {
            self.answers[index] = Some(answer);
        }
        self.answers
            .into_iter()
            .map(|answer| answer.expect("every request answered"))
            .collect()
    }
}

impl<O> Pipe<'_, Result<O>> {
    /// Whether an answer that came already is an error.
    fn any_failed(&self) -> bool {
        self.answers
            .iter()
            .any(|answer| matches!(answer, Some(Err(_))))
    }
}

/// The parameters of a statement that has none, for `query_typed_raw`.
fn no_params() -> std::iter::Empty<(&'static (dyn ToSql + Sync), Type)> {
    std::iter::empty()
}

/// `BEGIN`, `COMMIT` or `ROLLBACK` around a bundle, over the simple protocol.
async fn bracket(runner: &Runner, sql: &'static str) -> Result<Outcome> {
    observed(runner, sql, &[], async move {
        runner.connection().client().batch_execute(sql).await?;
        Ok::<_, tokio_postgres::Error>(Outcome::Count(0))
    })
    .await
}

async fn observed<E>(
    runner: &Runner,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    request: impl Future<Output = std::result::Result<Outcome, E>>,
) -> Result<Outcome>
where
    Error: From<E>,
{
    let request = async { request.await.map_err(Error::from) };
    runner
        .context()
        .log
        .observe(sql, params, runner.span(), request, |outcome| {
            Some(outcome.count() as usize)
        })
        .await
}
