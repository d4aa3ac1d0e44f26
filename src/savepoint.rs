//! [`Savepoint`]: a point inside a transaction to roll back to, and safe identifiers.

use crate::error::{Error, Result};
use crate::transaction::PostgresTransaction;

/// The longest identifier PostgreSQL keeps whole (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// A savepoint of a transaction: roll back to it, or release it.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use pgengine::prelude::*;
/// let tx = engine.begin().await?;
/// tx.execute("INSERT INTO band (name) VALUES ('A')").await?;
/// let savepoint = tx.savepoint(None).await?;          // savepoint_1
/// tx.execute("INSERT INTO band (name) VALUES ('B')").await?;
/// savepoint.rollback_to().await?;                      // B is gone, A stays
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Savepoint {
    transaction: PostgresTransaction,
    name: String,
}

impl Savepoint {
    pub(crate) fn new(transaction: PostgresTransaction, name: String) -> Self {
        Self { transaction, name }
    }

    /// The savepoint's name, e.g. `savepoint_1`.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgengine::PostgresTransaction) -> pgengine::Result<()> {
    /// assert_eq!(tx.savepoint(Some("before_import")).await?.name(), "before_import");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Undoes everything done in the transaction since the savepoint; the savepoint
    /// stays, so this can be done again.
    ///
    /// ```no_run
    /// # async fn demo(savepoint: pgengine::Savepoint) -> pgengine::Result<()> {
    /// savepoint.rollback_to().await?;
    /// # Ok(()) }
    /// ```
    pub async fn rollback_to(&self) -> Result<()> {
        self.transaction.rollback_to(&self.name).await
    }

    /// Forgets the savepoint, keeping what was done since.
    ///
    /// ```no_run
    /// # async fn demo(savepoint: pgengine::Savepoint) -> pgengine::Result<()> {
    /// savepoint.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn release(self) -> Result<()> {
        self.transaction.release_savepoint(&self.name).await
    }
}

/// Checks a user-given name (savepoint, extension) and returns it double-quoted.
///
/// Accepted: 1 to 63 bytes of letters, digits, `_` and `-`, not starting with a digit or `-`.
/// Anything else (quotes, spaces, `;`, empty, too long) is an
/// [`InvalidInput`](crate::ErrorKind::InvalidInput) error, so nothing unsafe is sent.
///
/// ```
/// use pgengine::savepoint::quote_identifier;
/// assert_eq!(quote_identifier("before_import").unwrap(), "\"before_import\"");
/// assert!(quote_identifier("a; DROP TABLE x").is_err());
/// assert!(quote_identifier("").is_err());
/// ```
pub fn quote_identifier(name: &str) -> Result<String> {
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let all_safe = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !starts_well || !all_safe || name.len() > MAX_IDENTIFIER_BYTES {
        return Err(Error::invalid_input(format!(
            "{name:?} is not an accepted identifier: use 1 to {MAX_IDENTIFIER_BYTES} letters, \
             digits, '_' or '-', starting with a letter or '_'"
        )));
    }
    Ok(format!("\"{name}\""))
}
