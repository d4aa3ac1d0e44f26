//! A small web service on pgengine and axum: a health check, accounts, a transfer in a
//! serializable transaction retried on conflict, a listing streamed from a batch, and
//! a long-poll endpoint woken by NOTIFY.
//!
//! ```sh
//! cargo run --example web_service   # a throwaway cluster, or DATABASE_URL
//! curl localhost:3000/health
//! ```
//!
//! Every handler runs in a spawned, `Send` task, as axum runs them; the transaction
//! closure in `transfer` borrows the handler's request, as handler code naturally does.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use pgengine::prelude::*;
use pgengine::{ErrorKind, ListenEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What every handler shares: the engine (a cheap clone) and the transfer events.
#[derive(Clone)]
pub struct AppState {
    engine: PostgresEngine,
    events: broadcast::Sender<String>,
}

/// An account, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    pub id: i32,
    pub owner: String,
    pub balance: i64,
}

/// A transfer request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Transfer {
    pub from: i32,
    pub to: i32,
    pub amount: i64,
}

/// The service's routes, on `engine` (whose `account` table exists; see [`migrate`]).
/// A task listening for transfer events runs as long as the runtime does.
pub async fn app(engine: PostgresEngine) -> pgengine::Result<Router> {
    let (events, _) = broadcast::channel(256);
    let mut listener = engine.listen(["transfers"]).await?;
    let sender = events.clone();
    tokio::spawn(async move {
        while let Some(event) = listener.next().await {
            if let Ok(ListenEvent::Notification(notification)) = event {
                let _ = sender.send(notification.payload);
            }
        }
    });
    Ok(Router::new()
        .route("/health", get(health))
        .route("/accounts", post(open_account).get(list_accounts))
        .route("/transfer", post(transfer))
        .route("/transfers/next", get(next_transfer))
        .with_state(AppState { engine, events }))
}

/// Creates the service's table.
pub async fn migrate(engine: &PostgresEngine) -> pgengine::Result<()> {
    engine
        .run_ddl(
            "CREATE TABLE IF NOT EXISTS account (\
               id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL CHECK (balance >= 0))",
        )
        .await
}

/// `200 ok` when the database answers, `503` when it does not.
async fn health(State(state): State<AppState>) -> Response {
    match state.engine.fetch_one("SELECT 1").await {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

async fn open_account(
    State(state): State<AppState>,
    Json(account): Json<Account>,
) -> Result<StatusCode, ApiError> {
    state
        .engine
        .execute(sql!(
            "INSERT INTO account (id, owner, balance) VALUES ({}, {}, {})",
            account.id,
            account.owner,
            account.balance
        ))
        .await?;
    Ok(StatusCode::CREATED)
}

/// Moves `amount` between two accounts in a serializable transaction, run again on a
/// serialization failure; tells the long-poll endpoint once committed (a `NOTIFY` is
/// delivered at commit, never for a rolled-back attempt).
async fn transfer(
    State(state): State<AppState>,
    Json(request): Json<Transfer>,
) -> Result<Json<Transfer>, ApiError> {
    // The closure borrows `request`; with a retry policy it is cloned for each attempt
    // (a closure of borrows is `Clone`).
    state
        .engine
        .transaction()
        .isolation(IsolationLevel::Serializable)
        .retry(RetryPolicy::new(10).initial_backoff(Duration::from_millis(2)))
        .run(async |tx| {
            let Transfer { from, to, amount } = request;
            let taken = tx
                .execute(sql!(
                    "UPDATE account SET balance = balance - {} WHERE id = {} AND balance >= {}",
                    amount,
                    from,
                    amount
                ))
                .await?;
            let given = tx
                .execute(sql!(
                    "UPDATE account SET balance = balance + {} WHERE id = {}",
                    amount,
                    to
                ))
                .await?;
            if taken != 1 || given != 1 {
                return Err(ApiError::Conflict(
                    "no such account, or not enough money".into(),
                ));
            }
            let event = serde_json::json!({ "from": from, "to": to, "amount": amount });
            tx.execute(sql!("SELECT pg_notify('transfers', {})", event.to_string()))
                .await?;
            Ok(())
        })
        .await?;
    Ok(Json(request))
}

/// Every account, as JSON lines streamed from a batch of 100 rows at a time: memory
/// stays bounded whatever the table's size.
async fn list_accounts(State(state): State<AppState>) -> Result<Response, ApiError> {
    let batches = state
        .engine
        .batch("SELECT id, owner, balance FROM account ORDER BY id", 100)
        .await?;
    let lines = batches.map_ok(|rows| {
        let mut text = String::new();
        for row in rows {
            let account = Account {
                id: row.get(0),
                owner: row.get(1),
                balance: row.get(2),
            };
            text.push_str(&serde_json::to_string(&account).expect("an account serializes"));
            text.push('\n');
        }
        Bytes::from(text)
    });
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("a valid response"))
}

#[derive(Deserialize)]
struct Wait {
    /// Milliseconds to wait for a transfer (default 5000).
    timeout_ms: Option<u64>,
}

/// The next committed transfer, as its NOTIFY payload; `204` when none comes in time.
async fn next_transfer(State(state): State<AppState>, Query(wait): Query<Wait>) -> Response {
    let mut events = state.events.subscribe();
    let timeout = Duration::from_millis(wait.timeout_ms.unwrap_or(5000));
    match tokio::time::timeout(timeout, events.recv()).await {
        Ok(Ok(payload)) => ([("content-type", "application/json")], payload).into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

/// How the API answers a failure.
#[derive(Debug)]
pub enum ApiError {
    /// The request cannot be done as asked (`409`).
    Conflict(String),
    /// The database said no (`400` for bad input, `503` when it cannot be reached, else
    /// `500`).
    Database(pgengine::Error),
}

impl From<pgengine::Error> for ApiError {
    fn from(error: pgengine::Error) -> Self {
        ApiError::Database(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Conflict(why) => (StatusCode::CONFLICT, why).into_response(),
            ApiError::Database(error) => {
                let status = match error.kind() {
                    ErrorKind::Database if error.code().is_some_and(|c| c.starts_with("23")) => {
                        StatusCode::CONFLICT
                    }
                    ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
                    ErrorKind::Connect | ErrorKind::Connection | ErrorKind::PoolTimeout => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, error.to_string()).into_response()
            }
        }
    }
}

#[allow(dead_code)] // when included by the tests, which start the service themselves
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_cluster, engine) = match std::env::var("DATABASE_URL") {
        Ok(url) => (None, PostgresEngine::connect(&url).await?),
        Err(_) => {
            let cluster = pgengine_testing::EphemeralCluster::start()?;
            let engine = PostgresEngine::connect(&cluster.url()).await?;
            (Some(cluster), engine)
        }
    };
    migrate(&engine).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(engine).await?)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
