//! The guarded way down to the driver: the client of the runner's connection, lent to
//! user code, with the engine still keeping the connection's state.
//!
//! What the engine cannot see, it assumes: the schema may have changed (the statement
//! caches are renewed), and a pooled connection may have been left inside a
//! transaction (it is checked, and rolled back before reuse). Dropped half-way, the
//! lent code's request is cancelled before the connection is reused, as any request's.

use futures::future::BoxFuture;
use tokio_postgres::Client;

use super::{Lent, Runner};
use crate::error::{Error, Result};

/// `t` inside a transaction block: `now()` is the transaction's start, earlier than
/// this statement's (sent alone over the simple protocol, a statement outside a block
/// starts its own transaction at the same instant); an aborted transaction answers
/// with an error instead.
const IN_TRANSACTION_BLOCK: &str = "SELECT now() <> statement_timestamp()";

impl Runner {
    /// Runs `f` with the driver's client of the runner's own pooled connection.
    pub(crate) async fn with_client_mut<T, E, F>(mut self, f: F) -> std::result::Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut Client) -> BoxFuture<'c, std::result::Result<T, E>>,
        E: From<Error>,
    {
        let Lent::Pooled(connection) = &mut self.connection else {
            return Err(Error::transaction(
                "with_client on the engine inside its ambient transaction would run outside \
                 that transaction: use the transaction's own with_client",
            )
            .into());
        };
        // Open while `f` runs: dropped half-way, its request is cancelled.
        connection.set_request_open(true);
        let output = f(connection.client_mut()).await;
        connection.set_request_open(false);
        let connection = self.connection();
        connection.schema_may_have_changed();
        let left_open = match connection
            .client()
            .query_one(IN_TRANSACTION_BLOCK, &[])
            .await
        {
            Ok(row) => row.get::<_, bool>(0),
            Err(error) => {
                let failed: Result<()> = Err(Error::from(error));
                connection.note(&failed);
                // An aborted transaction refuses the probe; a failed connection is
                // discarded anyway.
                failed
                    .as_ref()
                    .is_err_and(|error| !error.is_connection_failure())
            }
        };
        if left_open {
            tracing::warn!(target: "pgengine::pool", "with_client left a transaction open: it is rolled back");
            connection.set_in_transaction(true);
        }
        output
    }

    /// Runs `f` with the driver's client of the runner's transaction, holding the
    /// transaction's turn: its other requests wait until `f` is done.
    pub(crate) async fn with_client<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: for<'c> FnOnce(&'c Client) -> BoxFuture<'c, std::result::Result<T, E>>,
        E: From<Error>,
    {
        let _permit = self.admit().await?;
        let _turn = self.turn().await;
        let connection = self.connection();
        connection.set_request_open(true);
        let output = f(connection.client()).await;
        connection.set_request_open(false);
        connection.schema_may_have_changed();
        output
    }
}
