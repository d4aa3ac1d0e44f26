//! The server's version, parsed from `server_version`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A PostgreSQL server version: major and minor number.
///
/// ```
/// use pgengine::ServerVersion;
/// let v: ServerVersion = "12.4 (Ubuntu 12.4-0ubuntu0.20.04.1)".parse().unwrap();
/// assert_eq!((v.major, v.minor), (12, 4));
/// assert_eq!("16.10".parse::<ServerVersion>().unwrap().to_string(), "16.10");
/// assert_eq!("18beta1".parse::<ServerVersion>().unwrap(), ServerVersion { major: 18, minor: 0 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerVersion {
    /// The major version, e.g. `16`.
    pub major: u32,
    /// The minor version, e.g. `10` in `16.10`; `0` for a pre-release such as `18beta1`.
    pub minor: u32,
}

impl ServerVersion {
    /// The oldest server pgengine supports; older ones get a warning at start-up.
    ///
    /// ```
    /// assert!(pgengine::ServerVersion { major: 11, minor: 9 } < pgengine::ServerVersion::MINIMUM_SUPPORTED);
    /// ```
    pub const MINIMUM_SUPPORTED: ServerVersion = ServerVersion {
        major: 12,
        minor: 0,
    };
}

impl FromStr for ServerVersion {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = || Error::invalid_input(format!("not a PostgreSQL version: {text:?}"));
        let leading_digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let text = text.trim();
        let end = leading_digits(text);
        let major = text[..end].parse().map_err(|_| invalid())?;
        let minor = match text[end..].strip_prefix('.') {
            Some(rest) => rest[..leading_digits(rest)]
                .parse()
                .map_err(|_| invalid())?,
            None => 0,
        };
        Ok(Self { major, minor })
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}
