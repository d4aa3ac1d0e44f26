//! Identifiers a user names (savepoints, extensions, cursors' channels): checked, then
//! double-quoted, so that nothing unsafe is ever spliced into SQL.

use crate::error::{Error, Result};

/// The longest identifier PostgreSQL keeps whole (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER_BYTES: usize = 63;

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
