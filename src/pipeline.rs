//! Sending many statements back to back on one connection, in one transaction.
//!
//! tokio-postgres sends a request when its future is first polled and answers requests
//! in order, so polling every request once, in order, before waiting for any answer puts
//! them all on the wire together: the round trips do not grow with the statement count.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};
use crate::executor::Lease;
use crate::query::CompiledQuery;

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
    pub(crate) fn count(&self) -> u64 {
        match self {
            Outcome::Count(n) => *n,
            Outcome::Rows(rows) => rows.len() as u64,
        }
    }
}

/// Runs `statements` in order in one transaction: the lease's transaction when it has
/// one, else its own (`BEGIN` … `COMMIT`, pipelined with the statements). The first
/// failing statement is the error, with its index and SQL; a failure rolls back all.
pub(crate) async fn run(
    lease: &Lease,
    statements: &[CompiledQuery<'_>],
    want: Want,
) -> Result<Vec<Outcome>> {
    let connection = lease.connection();
    let client = connection.client();

    // Statements with parameters are prepared first (statement cache; the misses are
    // pipelined together), so that the executions below need no extra round trip.
    let prepares = statements.iter().map(|statement| async move {
        if statement.params().is_empty() {
            return Ok(None);
        }
        client.prepare_cached(statement.sql()).await.map(Some)
    });
    let prepared = connection
        .guarded(futures::future::join_all(prepares))
        .await
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.map_err(|e| Error::from(e).with_statement(index, statements[index].sql()))
        })
        .collect::<Result<Vec<_>>>();
    let prepared = lease.noted(prepared)?;

    let own_transaction = lease.transaction().is_none();
    let last = statements.len() - 1;
    let mut requests: Vec<Request<'_, Result<Outcome>>> = Vec::with_capacity(statements.len() + 2);
    if own_transaction {
        connection.set_in_transaction(true);
        requests.push(Box::pin(simple(lease, "BEGIN")));
    }
    for (index, (statement, prepared)) in statements.iter().zip(&prepared).enumerate() {
        let rows_wanted = want == Want::RowsOfLast && index == last;
        let params = statement.params();
        let sql = statement.sql();
        let request: Request<'_, Result<Outcome>> = match (prepared, rows_wanted) {
            (Some(prepared), true) => Box::pin(observed(lease, sql, params, async move {
                client.query(prepared, params).await.map(Outcome::Rows)
            })),
            (Some(prepared), false) => Box::pin(observed(lease, sql, params, async move {
                client.execute(prepared, params).await.map(Outcome::Count)
            })),
            (None, true) => Box::pin(observed(lease, sql, params, async move {
                client.query_typed(sql, &[]).await.map(Outcome::Rows)
            })),
            (None, false) => Box::pin(observed(lease, sql, params, async move {
                let messages = client.simple_query(sql).await?;
                Ok(Outcome::Count(affected(&messages)))
            })),
        };
        requests.push(request);
    }
    if own_transaction {
        requests.push(Box::pin(simple(lease, "COMMIT")));
    }

    let mut answers = connection.guarded(send_in_order(requests)).await;
    if own_transaction {
        let commit = answers.pop().expect("COMMIT was sent");
        let begin = answers.remove(0);
        // A COMMIT that the server answered ended the transaction, a failed one too.
        // (BEGIN cannot fail on a healthy idle session; on a broken one nothing runs.)
        let server_answered = match &commit {
            Ok(_) => true,
            Err(error) => error.database_error().is_some(),
        };
        if server_answered {
            connection.set_in_transaction(false);
        }
        begin?;
        let first_failure = answers
            .iter()
            .position(Result::is_err)
            .map(|index| (index, answers.swap_remove(index)));
        if let Some((index, Err(error))) = first_failure {
            return Err(error.with_statement(index, statements[index].sql()));
        }
        commit?;
    }
    let mut outcomes = Vec::with_capacity(answers.len());
    for (index, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => {
                let error = error.with_statement(index, statements[index].sql());
                return lease.noted(Err(error));
            }
        }
    }
    Ok(outcomes)
}

/// Rows affected, summed over a simple query's statements.
fn affected(messages: &[tokio_postgres::SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .map(|message| match message {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => *n,
            _ => 0,
        })
        .sum()
}

async fn simple(lease: &Lease, sql: &'static str) -> Result<Outcome> {
    observed(lease, sql, &[], async move {
        lease.connection().client().batch_execute(sql).await?;
        Ok(Outcome::Count(0))
    })
    .await
}

async fn observed(
    lease: &Lease,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    request: impl Future<Output = std::result::Result<Outcome, tokio_postgres::Error>>,
) -> Result<Outcome> {
    let request = async { request.await.map_err(Error::from) };
    lease
        .engine()
        .observe(sql, params, request, |outcome| {
            Some(outcome.count() as usize)
        })
        .await
}

/// Polls each request once, in order, so that they are sent in that order without
/// waiting for each other; then waits for every answer. Answers come back in order.
pub(crate) async fn send_in_order<'a, T: 'a>(requests: Vec<Request<'a, T>>) -> Vec<T> {
    let mut answers: Vec<Option<T>> = std::iter::repeat_with(|| None)
        .take(requests.len())
        .collect();
    let mut waiting = FuturesUnordered::new();
    {
        // Held as `&mut` so that the closure needs `Send`, not `Sync`, of the requests.
        let (answers, waiting) = (&mut answers, &mut waiting);
        let mut requests = requests.into_iter().enumerate();
        futures::future::poll_fn(move |cx| {
            for (index, mut request) in requests.by_ref() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(answer) => answers[index] = Some(answer),
                    Poll::Pending => waiting.push(async move { (index, request.await) }),
                }
            }
            Poll::Ready(())
        })
        .await;
    }
    while let Some((index, answer)) = waiting.next().await {
        answers[index] = Some(answer);
    }
    answers
        .into_iter()
        .map(|answer| answer.expect("every request answered"))
        .collect()
}
