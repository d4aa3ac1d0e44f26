//! `TestServer` and the per-process shared [`server()`].

use std::sync::OnceLock;

use crate::{EphemeralCluster, Error};

/// A PostgreSQL server to create test databases on: either an external server named
/// by a URL (`DATABASE_URL`) or an [`EphemeralCluster`] it owns.
///
/// Usually obtained from [`server()`]; build one yourself with
/// [`TestServer::from_url`] or [`TestServer::from_cluster`].
///
/// ```no_run
/// let server = pgengine_testing::server()?;
/// println!("admin: {}, app: {}", server.admin_url(), server.url_for("app"));
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
#[derive(Debug)]
pub struct TestServer {
    admin_url: String,
    cluster: Option<EphemeralCluster>,
}

impl TestServer {
    /// Wraps an existing server. `url` must name a role allowed to create and drop
    /// databases, and a database to connect to for that (e.g. `postgres`); both URL
    /// (`postgres://…`) and key/value (`host=… user=…`) forms are accepted.
    ///
    /// ```
    /// let server = pgengine_testing::TestServer::from_url("postgres://me@db.local:5433/postgres?sslmode=disable");
    /// assert_eq!(server.url_for("t1"), "postgres://me@db.local:5433/t1?sslmode=disable");
    /// ```
    pub fn from_url(url: impl Into<String>) -> TestServer {
        TestServer {
            admin_url: url.into(),
            cluster: None,
        }
    }

    /// Wraps an owned [`EphemeralCluster`]; dropping the server stops the cluster.
    ///
    /// ```no_run
    /// use pgengine_testing::{EphemeralCluster, TestServer};
    /// let server = TestServer::from_cluster(EphemeralCluster::start()?);
    /// assert!(server.cluster().is_some());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn from_cluster(cluster: EphemeralCluster) -> TestServer {
        TestServer {
            admin_url: cluster.url(),
            cluster: Some(cluster),
        }
    }

    /// URL of the administrative database (where `CREATE DATABASE` is issued).
    ///
    /// ```
    /// let server = pgengine_testing::TestServer::from_url("postgres://postgres@localhost/postgres");
    /// assert_eq!(server.admin_url(), "postgres://postgres@localhost/postgres");
    /// ```
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The admin URL with its database replaced by `dbname`.
    ///
    /// ```
    /// let server = pgengine_testing::TestServer::from_url("host=/tmp user=postgres");
    /// assert_eq!(server.url_for("t1"), "host=/tmp user=postgres dbname='t1'");
    /// ```
    pub fn url_for(&self, dbname: &str) -> String {
        replace_dbname(&self.admin_url, dbname)
    }

    /// The ephemeral cluster behind this server, `None` for an external server.
    ///
    /// ```
    /// let server = pgengine_testing::TestServer::from_url("postgres://localhost/postgres");
    /// assert!(server.cluster().is_none());
    /// ```
    pub fn cluster(&self) -> Option<&EphemeralCluster> {
        self.cluster.as_ref()
    }
}

static SERVER: OnceLock<Result<TestServer, Error>> = OnceLock::new();

/// The server shared by all tests of this process, started on first use.
///
/// If `DATABASE_URL` is set (and non-empty) it names the server to use and no cluster
/// is started. Otherwise an [`EphemeralCluster`] with the default settings is started
/// once per process; it is stopped and its temp dir removed when the process exits
/// (an `atexit` hook), and by a reaper process if the process is killed.
///
/// Blocks while the cluster starts (a second or two). A startup failure is returned to
/// every caller.
///
/// ```no_run
/// let server = pgengine_testing::server()?;
/// let url = server.url_for("postgres");
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
pub fn server() -> Result<&'static TestServer, Error> {
    SERVER
        .get_or_init(|| {
            if let Some(url) = std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| !u.trim().is_empty())
            {
                return Ok(TestServer::from_url(url));
            }
            let cluster = EphemeralCluster::start()?;
            // Statics are never dropped: stop the cluster from an atexit hook, which
            // runs on normal exit and on std::process::exit (how the test harness ends).
            // SAFETY: registering a plain extern "C" fn.
            unsafe { libc::atexit(stop_shared_cluster) };
            Ok(TestServer::from_cluster(cluster))
        })
        .as_ref()
        .map_err(Clone::clone)
}

extern "C" fn stop_shared_cluster() {
    // Never unwind across the FFI boundary.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(server)) = SERVER.get()
            && let Some(cluster) = server.cluster()
            && let Err(e) = cluster.shutdown()
        {
            eprintln!("pgengine-testing: stopping the shared cluster failed: {e}");
        }
    });
}

/// Replaces (or adds) the database of a connection string, URL or key/value form.
pub(crate) fn replace_dbname(conn: &str, dbname: &str) -> String {
    let trimmed = conn.trim();
    let Some(scheme_end) = ["postgres://", "postgresql://"]
        .iter()
        .find(|s| trimmed.starts_with(*s))
        .map(|s| s.len())
    else {
        let quoted = dbname.replace('\\', "\\\\").replace('\'', "\\'");
        return format!("{trimmed} dbname='{quoted}'");
    };
    let rest = &trimmed[scheme_end..];
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let authority = match before_query.find('/') {
        Some(i) => &before_query[..i],
        None => before_query,
    };
    format!(
        "{}{authority}/{}{query}",
        &trimmed[..scheme_end],
        percent_encode(dbname)
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_dbname_in_urls() {
        let cases = [
            ("postgres://u@h/db", "postgres://u@h/x"),
            ("postgres://u@h", "postgres://u@h/x"),
            (
                "postgresql://u:p@h:1/db?sslmode=disable",
                "postgresql://u:p@h:1/x?sslmode=disable",
            ),
            (
                "postgres://u@h?application_name=a",
                "postgres://u@h/x?application_name=a",
            ),
            ("postgres://h1:1,h2:2/db", "postgres://h1:1,h2:2/x"),
            (
                "host=/tmp user=u dbname=db",
                "host=/tmp user=u dbname=db dbname='x'",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(replace_dbname(url, "x"), want, "{url}");
        }
        assert_eq!(
            replace_dbname("postgres://h/", "a b/é"),
            "postgres://h/a%20b%2F%C3%A9"
        );
    }

    #[test]
    fn urls_parse_with_tokio_postgres() {
        let cfg: tokio_postgres::Config =
            replace_dbname("postgres://u@h:5/db?sslmode=disable", "a b")
                .parse()
                .unwrap();
        assert_eq!(cfg.get_dbname(), Some("a b"));
        let cfg: tokio_postgres::Config = replace_dbname("host=h user=u dbname=db", "it's")
            .parse()
            .unwrap();
        assert_eq!(cfg.get_dbname(), Some("it's"));
    }
}
