//! Every libpq parameter pgengine supports, given in a URL, reaches the server session
//! (`SHOW`, `pg_stat_activity`, `pg_stat_ssl`) or the socket (its TCP options, read
//! back with `getsockopt`); what the builder sets replaces only that.

use crate::common::{self, show};

use std::os::fd::RawFd;
use std::time::Duration;

use pgengine::PostgresEngine;
use pgengine::prelude::*;
use pgengine_testing::TestDatabase;

/// `url` with `params` added to its query.
fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// The server's TCP port, when the test server is reached over TCP on this machine.
fn local_tcp_port(db: &TestDatabase) -> Option<u16> {
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let local = matches!(
        config.get_hosts(),
        [tokio_postgres::config::Host::Tcp(host)] if host == "127.0.0.1" || host == "localhost"
    );
    local.then(|| config.get_ports().first().copied().unwrap_or(5432))
}

/// The TCP options of this process's socket whose local port is `port`.
#[derive(Debug, PartialEq)]
struct TcpOptions {
    keepalive: bool,
    idle_s: i32,
    interval_s: i32,
    count: i32,
    user_timeout_ms: i32,
}

fn tcp_options(local_port: u16) -> TcpOptions {
    let fd = socket_with_local_port(local_port).expect("the engine's socket");
    let get = |level, name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for a c_int; reading an option changes nothing.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        assert_eq!(rc, 0, "getsockopt");
        value
    };
    TcpOptions {
        keepalive: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        idle_s: get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        interval_s: get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        count: get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        user_timeout_ms: get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    }
}

/// The file descriptor of this process's TCP socket bound to local port `port`.
fn socket_with_local_port(port: u16) -> Option<RawFd> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()? {
        let Ok(fd) = entry.ok()?.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: an all-zero sockaddr_storage is valid; getsockname writes at most `len`.
        let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: as above; a descriptor that is not a socket makes it fail.
        if unsafe { libc::getsockname(fd, (&raw mut address).cast(), &raw mut len) } != 0 {
            continue;
        }
        let local = match i32::from(address.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says this is a sockaddr_in.
                let v4: libc::sockaddr_in = unsafe { std::mem::transmute_copy(&address) };
                u16::from_be(v4.sin_port)
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this is a sockaddr_in6.
                let v6: libc::sockaddr_in6 = unsafe { std::mem::transmute_copy(&address) };
                u16::from_be(v6.sin6_port)
            }
            _ => continue,
        };
        if local == port {
            return Some(fd);
        }
    }
    None
}

/// The client port of the engine's session, as the server sees it.
async fn client_port(engine: &PostgresEngine) -> u16 {
    let port: i32 = engine
        .fetch_one("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    u16::try_from(port).unwrap()
}

#[tokio::test]
async fn every_parameter_in_a_url_reaches_the_session_or_the_socket() {
    let db = TestDatabase::new().await.unwrap();
    let url = with_params(
        db.url(),
        "application_name=params-test\
         &options=-c%20search_path%3Dparams_schema%20-c%20statement_timeout%3D4321\
         &sslmode=disable&sslnegotiation=postgres&gssencmode=disable\
         &connect_timeout=7&target_session_attrs=read-write&load_balance_hosts=random\
         &channel_binding=disable\
         &keepalives=1&keepalives_idle=41&keepalives_interval=7&keepalives_count=4\
         &tcp_user_timeout=12345",
    );
    let engine = PostgresEngine::builder()
        .url(&url)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    assert_eq!(show(&engine, "application_name").await, "params-test");
    assert_eq!(show(&engine, "search_path").await, "params_schema");
    assert_eq!(show(&engine, "statement_timeout").await, "4321ms");
    let names: (String, String) = {
        let row = engine
            .fetch_one("SELECT current_database()::text, current_user::text")
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(names.0, db.name());
    let ssl: Option<bool> = engine
        .fetch_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(ssl, Some(false));
    if local_tcp_port(&db).is_some() {
        let options = tcp_options(client_port(&engine).await);
        assert_eq!(
            options,
            TcpOptions {
                keepalive: true,
                idle_s: 41,
                interval_s: 7,
                count: 4,
                user_timeout_ms: 12345,
            }
        );
    }
    engine.close_connection_pool().await;
}

#[tokio::test]
async fn keepalive_defaults_and_builder_settings_reach_the_socket() {
    let db = TestDatabase::new().await.unwrap();
    if local_tcp_port(&db).is_none() {
        return; // DATABASE_URL names a server elsewhere or a unix socket: no TCP socket here
    }
    let engine = common::builder(&db)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    let defaults = tcp_options(client_port(&engine).await);
    assert_eq!(
        defaults,
        TcpOptions {
            keepalive: true,
            idle_s: 30,
            interval_s: 10,
            count: 3,
            user_timeout_ms: 30_000,
        }
    );
    engine.close_connection_pool().await;
    let engine = common::builder(&db)
        .url(with_params(
            db.url(),
            "keepalives_idle=99&tcp_user_timeout=5000",
        ))
        .max_connections(1)
        .keepalives_idle(Duration::from_secs(55))
        .keepalives_interval(Duration::from_secs(3))
        .keepalives_count(9)
        .build()
        .await
        .unwrap();
    let options = tcp_options(client_port(&engine).await);
    assert_eq!(
        options,
        TcpOptions {
            keepalive: true,
            idle_s: 55,            // the builder's, over the URL's
            interval_s: 3,         // the builder's
            count: 9,              // the builder's
            user_timeout_ms: 5000, // the URL's, kept
        }
    );
    engine.close_connection_pool().await;
}

#[tokio::test]
async fn builder_settings_replace_only_what_they_set() {
    let db = TestDatabase::new().await.unwrap();
    let url = with_params(
        db.url(),
        "application_name=from-url&options=-c%20search_path%3Dfrom_url&sslmode=disable",
    );
    let engine = PostgresEngine::builder()
        .url(url)
        .application_name("from-builder")
        .max_connections(1)
        .build()
        .await
        .unwrap();
    assert_eq!(show(&engine, "application_name").await, "from-builder");
    assert_eq!(show(&engine, "search_path").await, "from_url");
    engine.close_connection_pool().await;
}

#[tokio::test]
async fn hostaddr_is_used_instead_of_resolving_the_host_name() {
    let db = TestDatabase::new().await.unwrap();
    let Some(port) = local_tcp_port(&db) else {
        return;
    };
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let user = config.get_user().unwrap();
    // `.invalid` never resolves (RFC 2606): only hostaddr can reach the server.
    let conninfo = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={port} user={user} dbname={}",
        db.name()
    );
    let engine = PostgresEngine::builder()
        .url(&conninfo)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    let address: String = engine
        .fetch_one("SELECT host(client_addr) FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(address, "127.0.0.1");
    engine.close_connection_pool().await;
    // The same through the builder, over a URL that names an unresolvable host.
    let engine = PostgresEngine::builder()
        .url(format!("postgres://{user}@db.invalid:{port}/{}", db.name()))
        .hostaddr("127.0.0.1".parse().unwrap())
        .max_connections(1)
        .build()
        .await
        .unwrap();
    engine.fetch_one("SELECT 1").await.unwrap();
    engine.close_connection_pool().await;
    // Without hostaddr, the name does not resolve.
    let err = PostgresEngine::builder()
        .url(format!("postgres://{user}@db.invalid:{port}/{}", db.name()))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), pgengine::ErrorKind::Connect, "{err}");
}
