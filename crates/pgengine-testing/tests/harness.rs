//! Tests of the harness against a real server (the shared ephemeral cluster, or
//! DATABASE_URL), plus process-level cleanup tests that re-run this test binary as a
//! child process (see `child_entry`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgengine_testing::{EphemeralCluster, TestDatabase, TestServer, find_bin_dir, server};

const CHILD_ENV: &str = "PGENGINE_TESTING_CHILD";

async fn database_exists(name: &str) -> bool {
    let admin = server().unwrap().admin_url().to_string();
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn two_databases_are_distinct_and_isolated() {
    let a = TestDatabase::new().await.unwrap();
    let b = TestDatabase::new().await.unwrap();
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());

    let ca = a.connect().await.unwrap();
    let cb = b.connect().await.unwrap();
    ca.batch_execute("CREATE TABLE only_in_a (id int); INSERT INTO only_in_a VALUES (1)")
        .await
        .unwrap();
    let in_a: i64 = ca
        .query_one("SELECT count(*) FROM only_in_a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_a, 1);
    let err = cb
        .query_one("SELECT count(*) FROM only_in_a", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    let db: String = cb
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, b.name());
}

#[tokio::test]
async fn dropped_database_is_gone_even_with_open_connections() {
    let db = TestDatabase::new().await.unwrap();
    let name = db.name().to_string();
    assert!(database_exists(&name).await);
    let client = db.connect().await.unwrap(); // still open during the drop: FORCE ends it
    drop(db);
    assert!(!database_exists(&name).await);
    assert!(client.simple_query("SELECT 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_works_on_a_multi_thread_runtime_and_in_parallel() {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async {
            let db = TestDatabase::new().await.unwrap();
            let name = db.name().to_string();
            db.connect()
                .await
                .unwrap()
                .batch_execute("CREATE TABLE t ()")
                .await
                .unwrap();
            drop(db);
            name
        }));
    }
    for t in tasks {
        let name = t.await.unwrap();
        assert!(!database_exists(&name).await);
    }
}

#[tokio::test]
async fn database_is_dropped_when_the_test_panics() {
    let name = tokio::spawn(async {
        let db = TestDatabase::new().await.unwrap();
        let name = db.name().to_string();
        let task = tokio::spawn(async move {
            let _db = db;
            panic!("test failure inside a task");
        });
        assert!(task.await.unwrap_err().is_panic());
        name
    })
    .await
    .unwrap();
    assert!(!database_exists(&name).await);
}

fn is_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn wait_gone(pid: u32, dir: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while (is_alive(pid) || dir.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_alive(pid), "postmaster {pid} still running");
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[tokio::test]
async fn owned_cluster_applies_settings_and_cleans_up_on_drop() {
    let cluster = EphemeralCluster::builder()
        .setting("shared_buffers", "16MB")
        .setting("max_connections", "42")
        .start()
        .unwrap();
    let dir = cluster.temp_dir().to_path_buf();
    assert!(
        dir.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(pgengine_testing::TEMP_DIR_PREFIX)
    );
    assert!(cluster.data_dir().starts_with(&dir));
    let pid = cluster.postmaster_pid().unwrap();
    assert!(is_alive(pid));
    assert_eq!(
        cluster.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
    );

    let server = TestServer::from_cluster(cluster);
    {
        let db = TestDatabase::new_on(&server).await.unwrap();
        let client = db.connect().await.unwrap();
        for (name, want) in [
            ("shared_buffers", "16MB"),
            ("max_connections", "42"),
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("server_encoding", "UTF8"),
        ] {
            let got: String = client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(got, want, "{name}");
        }
    }
    drop(server);
    // Drop is synchronous: everything is gone right away.
    assert!(!is_alive(pid), "postmaster {pid} survived the drop");
    assert!(!dir.exists(), "{} survived the drop", dir.display());
}

#[test]
fn managed_settings_are_rejected() {
    let err = EphemeralCluster::builder()
        .setting("port", "1")
        .start()
        .unwrap_err();
    assert_eq!(err.kind(), pgengine_testing::ErrorKind::Config);
}

#[test]
fn bad_pg_bin_is_a_clear_error() {
    let err = EphemeralCluster::builder()
        .bin_dir("/nonexistent/pg/bin")
        .start()
        .unwrap_err();
    assert!(err.to_string().contains("initdb"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Process-level tests: run this test binary again as a child with CHILD_ENV set.

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    match mode.as_str() {
        "print-bin-dir" => match find_bin_dir() {
            Ok(dir) => println!("BIN_DIR={}", dir.display()),
            Err(e) => println!("BIN_ERR={e}"),
        },
        "sigkill" | "panic" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let db = rt.block_on(TestDatabase::new()).unwrap();
            let cluster = server().unwrap().cluster().expect("an ephemeral cluster");
            println!(
                "CLUSTER pid={} dir={}",
                cluster.postmaster_pid().unwrap(),
                cluster.temp_dir().display()
            );
            use std::io::Write;
            std::io::stdout().flush().unwrap();
            if mode == "sigkill" {
                // SAFETY: plain kill(2) of ourselves.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL");
            }
            let _keep = db;
            panic!("deliberate failure in a child test");
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn run_child(mode: &str, envs: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .or_else(|| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    })
}

#[test]
fn pg_bin_is_honoured() {
    let real = find_bin_dir().expect("server binaries installed");
    // A PG_BIN made of symlinks to the real binaries: found as is.
    let fake = std::env::temp_dir().join(format!("pgengine-unit-pgbin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fake);
    std::fs::create_dir_all(&fake).unwrap();
    for p in ["initdb", "pg_ctl", "postgres"] {
        std::os::unix::fs::symlink(real.join(p), fake.join(p)).unwrap();
    }
    let (status, out) = run_child("print-bin-dir", &[("PG_BIN", fake.to_str().unwrap())]);
    assert!(status.success(), "{out}");
    assert_eq!(
        field(&out, "BIN_DIR").map(PathBuf::from),
        Some(fake.clone()),
        "{out}"
    );

    // A PG_BIN without the binaries is an error, not silently skipped.
    let (status, out) = run_child("print-bin-dir", &[("PG_BIN", "/nonexistent/bin")]);
    assert!(status.success(), "{out}");
    let err = field(&out, "BIN_ERR").unwrap_or_else(|| panic!("{out}"));
    assert!(err.contains("PG_BIN=/nonexistent/bin"), "{out}");
    std::fs::remove_dir_all(&fake).unwrap();
}

fn cluster_of(out: &str) -> (u32, PathBuf) {
    let line = out
        .lines()
        .find_map(|l| l.find("CLUSTER ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("child printed no cluster: {out}"));
    let pid = field(line, "pid").unwrap().parse().unwrap();
    let dir = PathBuf::from(field(line, "dir").unwrap());
    (pid, dir)
}

#[test]
fn panicking_test_process_leaves_nothing_behind() {
    let (status, out) = run_child("panic", &[]);
    assert_eq!(status.code(), Some(101), "child should fail: {out}");
    let (pid, dir) = cluster_of(&out);
    // The atexit hook ran synchronously before the child exited; allow a moment for
    // the postmaster's own exit to be observed.
    wait_gone(pid, &dir, Duration::from_secs(5));
}

#[test]
fn killed_test_process_leaves_nothing_behind() {
    let (status, out) = run_child("sigkill", &[]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "child should be killed: {out}");
    let (pid, dir) = cluster_of(&out);
    // Only the reaper can clean up after SIGKILL.
    wait_gone(pid, &dir, Duration::from_secs(15));
}
