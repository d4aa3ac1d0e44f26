//! [`Savepoint`]: a point inside a transaction to roll back to, and safe identifiers.

use std::sync::Arc;

use crate::error::Result;
use crate::transaction::state::TxShared;

pub use crate::identifier::quote_identifier;

/// A savepoint of a transaction: roll back to it, or release it.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let tx = engine.begin().await?;
/// tx.execute("INSERT INTO band (name) VALUES ('A')").await?;
/// let savepoint = tx.savepoint(None).await?;          // savepoint_1
/// tx.execute("INSERT INTO band (name) VALUES ('B')").await?;
/// savepoint.rollback_to().await?;                      // B is gone, A stays
/// tx.commit().await?;
/// # Ok(()) });
/// ```
pub struct Savepoint {
    transaction: Arc<TxShared>,
    name: String,
}

impl Savepoint {
    /// The savepoint `name`, just made in `transaction`.
    pub(crate) fn new(transaction: Arc<TxShared>, name: String) -> Self {
        Self { transaction, name }
    }

    /// The savepoint's name, e.g. `savepoint_1`.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// assert_eq!(tx.savepoint(Some("before_import")).await?.name(), "before_import");
    /// # Ok(()) });
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Undoes everything done in the transaction since the savepoint; the savepoint
    /// stays, so this can be done again.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// # let savepoint = tx.savepoint(None).await?;
    /// savepoint.rollback_to().await?;
    /// # Ok(()) });
    /// ```
    pub async fn rollback_to(&self) -> Result<()> {
        self.transaction.rollback_to(&self.name).await
    }

    /// Forgets the savepoint, keeping what was done since.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// # let tx = engine.begin().await?;
    /// # let savepoint = tx.savepoint(None).await?;
    /// savepoint.release().await?;
    /// # Ok(()) });
    /// ```
    pub async fn release(self) -> Result<()> {
        self.transaction.release(&self.name).await
    }
}

impl std::fmt::Debug for Savepoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Savepoint")
            .field("name", &self.name)
            .field("transaction", &self.transaction.phase())
            .finish()
    }
}
