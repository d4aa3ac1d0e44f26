//! TLS as libpq does it, against real servers started here (whatever DATABASE_URL
//! says): a TLS-only server (`hostssl` in pg_hba, a CA and server certificate made at
//! test time for `localhost`) and a server without TLS.
//!
//! Each `sslmode` connects or fails as libpq does; `verify-full` checks the CA and the
//! host name, `verify-ca` only the CA; client certificates, passwords and channel
//! binding; an abandoned query over TLS is cancelled and its connection reused; the
//! password file; unix-socket hosts.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use pgengine::prelude::*;
use pgengine::{ErrorKind, SslMode};
use pgengine_testing::{EphemeralCluster, TestCertificates};

/// A server and the files a client needs for it.
struct Server {
    cluster: EphemeralCluster,
    /// The CA that signed the server certificate.
    ca: PathBuf,
    /// Another CA, which did not.
    other_ca: PathBuf,
    /// A client certificate and key for the role `cert_user`.
    client_cert: PathBuf,
    client_key: PathBuf,
}

const PASSWORD: &str = "s3cret pass";

impl Server {
    /// `postgres://USER@HOST:PORT/postgres?QUERY`.
    fn url(&self, user: &str, host: &str, query: &str) -> String {
        format!(
            "postgres://{user}@{host}:{}/postgres?{query}",
            self.cluster.port()
        )
    }
}

/// Starts a cluster (TLS-only when `tls`), with roles `scram_user` (password
/// [`PASSWORD`]) and `cert_user`, and writes the client's files into its temp dir.
fn start(tls: bool) -> Server {
    let certs = TestCertificates::generate(&["localhost"]).expect("certificates");
    let other = TestCertificates::generate(&["localhost"]).expect("certificates");
    let builder = EphemeralCluster::builder();
    let cluster = if tls {
        builder
            .tls(&certs)
            .hba([
                "hostssl all scram_user 127.0.0.1/32 scram-sha-256",
                "hostssl all cert_user 127.0.0.1/32 cert",
                "hostssl all all 127.0.0.1/32 trust",
            ])
            .start()
    } else {
        builder
            .hba([
                "host all scram_user 127.0.0.1/32 scram-sha-256",
                "host all all 127.0.0.1/32 trust",
            ])
            .start()
    }
    .expect("cluster");
    let dir = cluster.temp_dir().to_path_buf();
    let write = |name: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    };
    let (cert, key) = certs.client("cert_user").expect("client certificate");
    let server = Server {
        ca: write("ca.pem", certs.ca_pem(), 0o644),
        other_ca: write("other-ca.pem", other.ca_pem(), 0o644),
        client_cert: write("client.crt", &cert, 0o644),
        client_key: write("client.key", &key, 0o600),
        cluster,
    };
    let admin = format!(
        "host={} port={} user=postgres dbname=postgres",
        server.cluster.socket_dir().display(),
        server.cluster.port()
    );
    // A runtime of its own: this runs inside the tests' runtimes.
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("admin connection");
            tokio::spawn(connection);
            client
                .batch_execute(&format!(
                    "SET password_encryption = 'scram-sha-256';
                     CREATE ROLE scram_user LOGIN PASSWORD '{PASSWORD}';
                     CREATE ROLE cert_user LOGIN;"
                ))
                .await
                .expect("roles");
        })
    })
    .join()
    .unwrap();
    server
}

/// The TLS-only server, shared by this file's tests (stopped at exit by its reaper).
fn tls_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start(true))
}

/// The server without TLS.
fn plain_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start(false))
}

async fn connect(url: &str) -> pgengine::Result<PostgresEngine> {
    PostgresEngine::builder()
        .url(url)
        .max_connections(1)
        .connect_timeout(Duration::from_secs(20))
        .build()
        .await
}

/// Whether the engine's session is encrypted, as the server sees it.
async fn uses_tls(engine: &PostgresEngine) -> bool {
    engine
        .fetch_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap()
        .get(0)
}

/// The error of connecting to `url`, which must fail.
async fn failure(url: &str) -> pgengine::Error {
    match connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn each_sslmode_against_a_tls_only_server() {
    let server = tls_server();
    let ca = server.ca.display();
    let err = failure(&server.url("postgres", "localhost", "sslmode=disable")).await;
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}"); // refused by pg_hba
    assert!(err.to_string().contains("no encryption"), "{err}");
    for query in [
        "sslmode=allow".to_owned(),
        "sslmode=prefer".to_owned(),
        String::new(), // prefer is the default
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let engine = connect(&server.url("postgres", "localhost", &query))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(uses_tls(&engine).await, "{query} connected without TLS");
        engine.close_connection_pool().await;
    }
}

#[tokio::test]
async fn each_sslmode_against_a_server_without_tls() {
    let server = plain_server();
    for query in ["sslmode=disable", "sslmode=allow", "sslmode=prefer"] {
        let engine = connect(&server.url("postgres", "localhost", query))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(!uses_tls(&engine).await, "{query}");
        engine.close_connection_pool().await;
    }
    let ca = server.ca.display();
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let err = failure(&server.url("postgres", "localhost", &query)).await;
        assert_eq!(err.kind(), ErrorKind::Connect, "{query}: {err}");
        assert!(err.to_string().contains("TLS"), "{query}: {err}");
    }
}

#[tokio::test]
async fn verify_full_checks_the_ca_and_the_host_name_verify_ca_only_the_ca() {
    let server = tls_server();
    let (ca, other_ca) = (server.ca.display(), server.other_ca.display());
    // The certificate names `localhost`, not 127.0.0.1.
    let err = failure(&server.url(
        "postgres",
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    let engine = connect(&server.url(
        "postgres",
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    assert!(uses_tls(&engine).await);
    engine.close_connection_pool().await;
    // A CA that did not sign the server's certificate: refused whenever it is used,
    // also by `require` (which, given a root certificate, checks the chain as libpq).
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = failure(&server.url(
            "postgres",
            "localhost",
            &format!("sslmode={mode}&sslrootcert={other_ca}"),
        ))
        .await;
        assert_eq!(err.kind(), ErrorKind::Connect, "{mode}: {err}");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{mode}: {err}"
        );
    }
}

#[tokio::test]
async fn bad_tls_settings_are_config_errors_naming_the_parameter() {
    let server = tls_server();
    let key_open_to_all = server.cluster.temp_dir().join("open.key");
    std::fs::copy(&server.client_key, &key_open_to_all).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_open_to_all, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let cert = server.client_cert.display();
    let cases = [
        ("sslmode=verify".to_owned(), "sslmode"),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".to_owned(),
            "sslrootcert",
        ),
        (
            "sslmode=require&sslrootcert=system".to_owned(),
            "sslrootcert=system",
        ),
        (
            format!(
                "sslcert=/nonexistent/client.crt&sslkey={}",
                server.client_key.display()
            ),
            "sslcert",
        ),
        (
            format!("sslcert={cert}&sslkey={}", key_open_to_all.display()),
            "sslkey",
        ),
        (
            format!("sslcert={cert}&sslkey=/nonexistent/k.key"),
            "sslkey",
        ),
        ("keepalives_count=many".to_owned(), "keepalives_count"),
        ("tcp_user_timeout=soon".to_owned(), "tcp_user_timeout"),
        ("channel_binding=always".to_owned(), "channel_binding"),
        // Settings no connection can meet.
        (
            "channel_binding=require&sslmode=disable".to_owned(),
            "channel_binding",
        ),
        ("sslnegotiation=direct".to_owned(), "sslnegotiation"),
        ("hostaddr=127.0.0.1,127.0.0.2".to_owned(), "hostaddr"),
        ("gssencmode=require".to_owned(), "gssencmode"),
    ];
    for (query, parameter) in cases {
        let err = failure(&server.url("postgres", "localhost", &query)).await;
        assert_eq!(err.kind(), ErrorKind::Config, "{query}: {err}");
        assert!(err.to_string().contains(parameter), "{query}: {err}");
    }
    // The same through the builder.
    let err = PostgresEngine::builder()
        .url(server.url("postgres", "localhost", ""))
        .ssl_mode(SslMode::VerifyFull)
        .ssl_root_cert("/nonexistent/ca.pem")
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

#[tokio::test]
async fn client_certificates_authenticate() {
    let server = tls_server();
    let query = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        server.ca.display(),
        server.client_cert.display(),
        server.client_key.display()
    );
    let engine = connect(&server.url("cert_user", "localhost", &query))
        .await
        .unwrap();
    let user: String = engine
        .fetch_one("SELECT current_user::text")
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "cert_user");
    engine.close_connection_pool().await;
    // The builder says the same.
    let engine = PostgresEngine::builder()
        .url(server.url("cert_user", "localhost", ""))
        .ssl_mode(SslMode::VerifyFull)
        .ssl_root_cert(server.ca.to_str().unwrap())
        .ssl_client_cert(&server.client_cert, &server.client_key)
        .build()
        .await
        .unwrap();
    assert!(uses_tls(&engine).await);
    engine.close_connection_pool().await;
    // Without a certificate, `cert` authentication fails.
    let err = failure(&server.url("cert_user", "localhost", "sslmode=require")).await;
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn passwords_and_channel_binding() {
    let tls = tls_server();
    let plain = plain_server();
    let password = "s3cret%20pass";
    let with_password = |server: &Server, password: &str, query: &str| {
        server.url(&format!("scram_user:{password}"), "localhost", query)
    };
    // SCRAM over TLS binds to the channel: `require` is honoured and met.
    let engine = connect(&with_password(tls, password, "channel_binding=require"))
        .await
        .unwrap();
    assert!(uses_tls(&engine).await);
    engine.close_connection_pool().await;
    let engine = PostgresEngine::builder()
        .url(with_password(tls, password, ""))
        .channel_binding(pgengine::config::ChannelBinding::Require)
        .build()
        .await
        .unwrap();
    engine.close_connection_pool().await;
    // A wrong password.
    let err = failure(&with_password(tls, "wrong", "")).await;
    assert_eq!(err.code(), Some("28P01"), "{err}");
    // Without TLS there is no channel to bind to: `require` refuses to connect.
    let err = failure(&with_password(plain, password, "channel_binding=require")).await;
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    let engine = connect(&with_password(plain, password, "channel_binding=prefer"))
        .await
        .unwrap();
    assert!(!uses_tls(&engine).await);
    engine.close_connection_pool().await;
    // Nor does a server that asks for no password at all (as libpq).
    let err = failure(&tls.url("postgres", "localhost", "channel_binding=require")).await;
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
}

/// Abandons a `pg_sleep(60)` on `url`'s pool of 1 and checks that the next query runs
/// on the same backend (the cancel was acknowledged), over TLS.
async fn abandon_and_reuse(url: &str) {
    let engine = connect(url).await.unwrap();
    let pid: i32 = engine
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        engine.execute("SELECT pg_sleep(60)"),
    )
    .await;
    assert!(abandoned.is_err(), "pg_sleep(60) finished");
    let row = tokio::time::timeout(
        Duration::from_secs(30),
        engine.fetch_one(
            "SELECT pg_backend_pid(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ),
    )
    .await
    .expect("the abandoned query was not cancelled within 30 s")
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the connection was not reused");
    assert!(row.get::<_, bool>(1));
    engine.close_connection_pool().await;
}

#[tokio::test]
async fn an_abandoned_query_over_tls_is_cancelled_and_its_connection_reused() {
    let server = tls_server();
    let query = format!("sslmode=verify-full&sslrootcert={}", server.ca.display());
    abandon_and_reuse(&server.url("postgres", "localhost", &query)).await;
}

#[tokio::test]
async fn with_several_hosts_a_tls_session_is_cancelled_at_its_own_address() {
    // The driver knows which host and address the session is on; a cancel sent there
    // is acknowledged, so the connection is kept.
    let server = tls_server();
    let port = server.cluster.port();
    let url = format!(
        "postgres://postgres@localhost:{port},127.0.0.1:{port}/postgres?sslmode=verify-ca&sslrootcert={}",
        server.ca.display()
    );
    abandon_and_reuse(&url).await;
}

#[tokio::test]
async fn the_password_file_gives_the_password_as_libpq_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    let server = plain_server();
    let port = server.cluster.port();
    let file = server.cluster.temp_dir().join("pgpass");
    // Comments, non-matching lines, `*` and an escaped `\:` as libpq reads them; the
    // password is only on the matching line.
    let escaped = PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    std::fs::write(
        &file,
        format!(
            "# a comment\n\
             otherhost:{port}:*:scram_user:wrong\n\
             localhost:{port}:otherdb:scram_user:wrong\n\
             localhost:{port}:*:scram_user:{escaped}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = server.url(
        "scram_user",
        "localhost",
        &format!("passfile={}", file.display()),
    );
    let engine = connect(&url).await.unwrap();
    let user: String = engine
        .fetch_one("SELECT current_user::text")
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "scram_user");
    engine.close_connection_pool().await;
    // A file that others can read is ignored, as libpq does: no password to send.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = failure(&url).await;
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("password"), "{err}");
}

#[tokio::test]
async fn unix_socket_hosts_connect_without_tls_whatever_the_sslmode() {
    // PostgreSQL has no TLS over unix sockets; libpq ignores sslmode there.
    let server = tls_server();
    for mode in ["disable", "prefer", "require"] {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres sslmode={mode}",
            server.cluster.socket_dir().display(),
            server.cluster.port()
        );
        let engine = connect(&conninfo)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let over_socket: bool = engine
            .fetch_one("SELECT inet_client_addr() IS NULL")
            .await
            .unwrap()
            .get(0);
        assert!(over_socket, "{mode}");
        assert!(!uses_tls(&engine).await, "{mode}");
        engine.close_connection_pool().await;
    }
}
