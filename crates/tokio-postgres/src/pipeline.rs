//! Pipelines: many statements sent as one request that ends in a single `Sync`.
//!
//! (pgengine's patch of tokio-postgres 0.7.18; see `PATCHES.md`.) Every other request
//! of the driver ends in its own `Sync`, which makes the server answer and flush each
//! statement. A pipeline sends `Bind`/`Execute` for every statement and one `Sync` at
//! the end, as libpq's pipeline mode does with one `PQpipelineSync`: the server runs
//! the statements back to back and flushes once. When a statement fails, the server
//! skips everything after it up to the `Sync`, so nothing after the failure runs, and
//! the error carries the index of the statement that failed.
//!
//! Without an explicit `BEGIN` the statements form one implicit transaction (committed
//! at the `Sync`, or rolled back as a whole when one fails); with `BEGIN` as the first
//! statement, the transaction stays open unless a `COMMIT` is in the pipeline too.

use crate::client::InnerClient;
use crate::codec::FrontendMessage;
use crate::connection::RequestMessages;
use crate::prepare::get_type;
use crate::query::{encode_bind, encode_bind_raw, extract_row_affected};
use crate::types::{ToSql, Type};
use crate::{Column, Error, Row, Statement};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, Message, RowDescriptionBody};
use postgres_protocol::message::frontend;
use std::fmt;
use std::sync::Arc;

/// One statement of a pipeline.
pub enum PipelineStatement<'a> {
    /// A statement prepared on this client, with its parameters.
    Prepared(&'a Statement, &'a [&'a (dyn ToSql + Sync)]),
    /// SQL parsed in the pipeline as the unnamed statement, with each parameter and the
    /// type it is declared as. It is parsed only when its turn comes, so it may use what
    /// an earlier statement of the pipeline created.
    Unnamed(&'a str, &'a [(&'a (dyn ToSql + Sync), Type)]),
}

/// What one statement of a pipeline returned.
pub struct PipelineResult {
    rows: Vec<Row>,
    rows_affected: u64,
}

impl fmt::Debug for PipelineResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineResult")
            .field("rows", &self.rows.len())
            .field("rows_affected", &self.rows_affected)
            .finish()
    }
}

impl PipelineResult {
    /// The rows the statement returned.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The rows the statement returned, owned.
    pub fn into_rows(self) -> Vec<Row> {
        self.rows
    }

    /// The rows the statement affected (its command tag's count; 0 when it has none).
    pub fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

/// Why a pipeline failed, and at which statement.
#[derive(Debug)]
pub struct PipelineError {
    index: Option<usize>,
    error: Error,
}

impl PipelineError {
    /// The index of the statement that failed; `None` when the pipeline failed as a
    /// whole (the connection closed, an unexpected message).
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// The error.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The error, owned.
    pub fn into_error(self) -> Error {
        self.error
    }

    fn whole(error: Error) -> Self {
        PipelineError { index: None, error }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(index) => write!(f, "statement {index} of the pipeline: {}", self.error),
            None => write!(f, "pipeline: {}", self.error),
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

pub(crate) async fn run(
    client: &Arc<InnerClient>,
    statements: &[PipelineStatement<'_>],
) -> Result<Vec<PipelineResult>, PipelineError> {
    let buf = client.with_buf(|buf| {
        for (index, statement) in statements.iter().enumerate() {
            encode(statement, buf).map_err(|error| PipelineError {
                index: Some(index),
                error,
            })?;
        }
        frontend::sync(buf);
        Ok(buf.split().freeze())
    })?;
    let mut responses = client
        .send(RequestMessages::Single(FrontendMessage::Raw(buf)))
        .map_err(PipelineError::whole)?;

    let mut results = Vec::with_capacity(statements.len());
    // Rows of unnamed statements wait for the end of the pipeline to be typed: looking
    // a type up on the server is a request of its own, answered only after this one.
    let mut untyped: Vec<Untyped> = Vec::new();
    let mut described: Option<RowDescriptionBody> = None;
    let mut rows = Vec::new();
    let mut bodies = Vec::new();
    loop {
        let message = match responses.next().await {
            Ok(message) => message,
            Err(error) if error.as_db_error().is_some() => {
                let index = results.len();
                // The server skips to the Sync: only its ReadyForQuery is left, unless
                // the session ended (then the statement's error says why).
                while let Ok(message) = responses.next().await {
                    if let Message::ReadyForQuery(_) = message {
                        break;
                    }
                }
                return Err(PipelineError {
                    index: Some(index),
                    error,
                });
            }
            Err(error) => return Err(PipelineError::whole(error)),
        };
        match message {
            Message::ParseComplete | Message::BindComplete | Message::NoData => {}
            Message::RowDescription(body) => described = Some(body),
            Message::DataRow(body) => match statements.get(results.len()) {
                Some(PipelineStatement::Prepared(statement, _)) => {
                    rows.push(Row::new((*statement).clone(), body).map_err(PipelineError::whole)?)
                }
                Some(PipelineStatement::Unnamed(..)) if described.is_some() => bodies.push(body),
                _ => return Err(PipelineError::whole(Error::unexpected_message())),
            },
            Message::CommandComplete(body) => {
                let rows_affected = extract_row_affected(&body).map_err(PipelineError::whole)?;
                finish(&mut results, &mut untyped, &mut described, &mut rows, &mut bodies, rows_affected);
            }
            Message::EmptyQueryResponse => {
                finish(&mut results, &mut untyped, &mut described, &mut rows, &mut bodies, 0);
            }
            Message::ReadyForQuery(_) if results.len() == statements.len() => break,
            _ => return Err(PipelineError::whole(Error::unexpected_message())),
        }
    }
    for Untyped {
        index,
        description,
        bodies,
    } in untyped
    {
        let statement = Statement::unnamed(vec![], columns(client, &description).await?);
        results[index].rows = bodies
            .into_iter()
            .map(|body| Row::new(statement.clone(), body))
            .collect::<Result<_, _>>()
            .map_err(PipelineError::whole)?;
    }
    Ok(results)
}

/// The rows of an unnamed statement, before their columns are typed.
struct Untyped {
    index: usize,
    description: RowDescriptionBody,
    bodies: Vec<DataRowBody>,
}

/// Ends the answer of the statement whose rows were arriving.
fn finish(
    results: &mut Vec<PipelineResult>,
    untyped: &mut Vec<Untyped>,
    described: &mut Option<RowDescriptionBody>,
    rows: &mut Vec<Row>,
    bodies: &mut Vec<DataRowBody>,
    rows_affected: u64,
) {
    if let Some(description) = described.take() {
        untyped.push(Untyped {
            index: results.len(),
            description,
            bodies: std::mem::take(bodies),
        });
    }
    results.push(PipelineResult {
        rows: std::mem::take(rows),
        rows_affected,
    });
}

/// The columns a `RowDescription` describes, with their types.
async fn columns(
    client: &Arc<InnerClient>,
    description: &RowDescriptionBody,
) -> Result<Vec<Column>, PipelineError> {
    let mut columns = Vec::new();
    let mut fields = description.fields();
    while let Some(field) = fields
        .next()
        .map_err(|e| PipelineError::whole(Error::parse(e)))?
    {
        let r#type = get_type(client, field.type_oid())
            .await
            .map_err(PipelineError::whole)?;
        columns.push(Column {
            name: field.name().to_string(),
            table_oid: Some(field.table_oid()).filter(|n| *n != 0),
            column_id: Some(field.column_id()).filter(|n| *n != 0),
            type_modifier: field.type_modifier(),
            r#type,
        });
    }
    Ok(columns)
}

/// `Bind` and `Execute` of a prepared statement; `Parse`, `Bind`, `Describe` and
/// `Execute` of an unnamed one.
fn encode(statement: &PipelineStatement<'_>, buf: &mut bytes::BytesMut) -> Result<(), Error> {
    match statement {
        PipelineStatement::Prepared(statement, params) => {
            encode_bind(statement, params.iter().copied(), "", buf)?;
        }
        PipelineStatement::Unnamed(sql, params) => {
            let oids = params.iter().map(|(_, ty)| ty.oid());
            frontend::parse("", sql, oids, buf).map_err(Error::encode)?;
            encode_bind_raw("", params.iter().map(|(param, ty)| (*param, ty.clone())), "", buf)?;
            frontend::describe(b'P', "", buf).map_err(Error::encode)?;
        }
    }
    frontend::execute("", 0, buf).map_err(Error::encode)
}
