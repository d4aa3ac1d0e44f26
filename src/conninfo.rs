//! Connection strings as libpq reads them: the parameters tokio-postgres does not know
//! (or reads differently) are taken out here, and the driver parses the rest.
//!
//! Both forms are handled: a URL (`postgres://…?key=value&…`, keys and values
//! percent-encoded) and `key=value` pairs (values optionally single-quoted, `\` escapes).

use crate::error::{Error, ErrorKind, Result};

/// A connection string split in two: the text the driver parses, and the parameters
/// taken out of it, in order of appearance.
#[derive(Debug, Default)]
pub(crate) struct Split {
    /// The connection string without the taken parameters, for tokio-postgres.
    pub driver: String,
    /// The taken parameters, decoded.
    pub taken: Vec<(String, String)>,
}

/// Splits `conninfo`, taking out the parameters whose name is in `take`; with
/// `drop_hosts`, the host list (`host`, `hostaddr`, `port`, and a URL's host part) is
/// dropped too.
pub(crate) fn split(conninfo: &str, take: &[&str], drop_hosts: bool) -> Result<Split> {
    let hosts = ["host", "hostaddr", "port"];
    let dropped = |key: &str| drop_hosts && hosts.contains(&key);
    let mut split = Split::default();
    if let Some((scheme, rest)) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| conninfo.strip_prefix(scheme).map(|rest| (*scheme, rest)))
    {
        let (base, query) = match rest.find('?') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let base = if drop_hosts {
            without_url_hosts(base)
        } else {
            base.to_owned()
        };
        let mut kept = Vec::new();
        for part in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let Some((key, value)) = part.split_once('=') else {
                return Err(invalid("unterminated parameter in the URL's query"));
            };
            let key = percent_decode(key)?;
            if take.contains(&key.as_str()) {
                split.taken.push((key, percent_decode(value)?));
            } else if !dropped(&key) {
                kept.push(part);
            }
        }
        split.driver = format!("{scheme}{base}");
        if !kept.is_empty() {
            split.driver.push('?');
            split.driver.push_str(&kept.join("&"));
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_values(conninfo)? {
            if take.contains(&key.as_str()) {
                split.taken.push((key, value));
            } else if !dropped(&key) {
                kept.push(format!(
                    "{key}='{}'",
                    value.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        split.driver = kept.join(" ");
    }
    Ok(split)
}

/// `user:password@hosts/dbname` without its hosts: `user:password@/dbname`.
fn without_url_hosts(base: &str) -> String {
    let end = base.find('/').unwrap_or(base.len());
    let (authority, path) = base.split_at(end);
    match authority.rfind('@') {
        Some(at) => format!("{}{path}", &authority[..=at]),
        None => path.to_owned(),
    }
}

/// The pairs of a `key=value` connection string, as libpq reads them.
fn key_values(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err(invalid("a parameter without a name"));
            }
            return Ok(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(invalid("a parameter name without `=`"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(invalid("an unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Decodes `%XX` escapes (UTF-8).
fn percent_decode(text: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid("a percent-encoded value is not UTF-8"))
}

fn invalid(what: &str) -> Error {
    Error::new(ErrorKind::Config, format!("invalid database URL: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAKE: &[&str] = &["sslmode", "sslrootcert"];

    #[test]
    fn a_url_keeps_what_it_does_not_take() {
        let s = split(
            "postgres://u:p@h1:5,h2/db?sslmode=verify-full&application_name=a&sslrootcert=%2Ftmp%2Fca.pem",
            TAKE,
            false,
        )
        .unwrap();
        assert_eq!(s.driver, "postgres://u:p@h1:5,h2/db?application_name=a");
        assert_eq!(
            s.taken,
            [
                ("sslmode".into(), "verify-full".into()),
                ("sslrootcert".into(), "/tmp/ca.pem".into())
            ]
        );
    }

    #[test]
    fn percent_encoded_names_are_taken() {
        let s = split("postgres://h/db?ssl%6Dode=require", TAKE, false).unwrap();
        assert_eq!(s.driver, "postgres://h/db");
        assert_eq!(s.taken, [("sslmode".into(), "require".into())]);
    }

    #[test]
    fn hosts_are_dropped_on_request() {
        let s = split(
            "postgresql://u@h:1/db?hostaddr=1.2.3.4&port=7&x=y",
            TAKE,
            true,
        )
        .unwrap();
        assert_eq!(s.driver, "postgresql://u@/db?x=y");
        let s = split("postgres://h", TAKE, true).unwrap();
        assert_eq!(s.driver, "postgres://");
    }

    #[test]
    fn key_values_are_requoted() {
        let s = split(
            r"host=h sslmode = 'verify-ca' password='a \' b' options=-c\ x=1",
            TAKE,
            true,
        )
        .unwrap();
        assert_eq!(s.driver, r"password='a \' b' options='-c x=1'");
        assert_eq!(s.taken, [("sslmode".into(), "verify-ca".into())]);
        let config: tokio_postgres::Config = s.driver.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a ' b"[..]));
        assert_eq!(config.get_options(), Some("-c x=1"));
    }

    #[test]
    fn malformed_strings_are_config_errors() {
        for bad in ["host=h password='x", "host", "postgres://h/db?novalue"] {
            let err = split(bad, TAKE, false).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
        }
    }
}
