//! `Atomic` against a real server: all or nothing, joined ambient transactions, the
//! error naming the failing statement, `run_sync` from every kind of caller, and
//! pipelining (round trips that do not grow with the statement count).

use crate::common::{self, table_exists};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgengine::prelude::*;
use pgengine::{Atomic, Error, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A statement the server refuses with a syntax error (42601).
const MALFORMED: &str = "CREATE TABLE (";

/// Two `CREATE TABLE`s, then (when `malformed`) a statement that fails.
fn ddl(engine: &PostgresEngine, malformed: bool) -> Atomic {
    let mut atomic = engine.atomic();
    atomic
        .add("CREATE TABLE first_table (id int)")
        .add("CREATE TABLE second_table (id int)");
    if malformed {
        atomic.add(MALFORMED);
    }
    assert_eq!(atomic.len(), if malformed { 3 } else { 2 });
    atomic
}

fn assert_names_malformed(err: &Error) {
    let failed = err
        .statement()
        .unwrap_or_else(|| panic!("the error names no statement: {err}"));
    assert_eq!(failed.index, 2, "{err}");
    assert_eq!(failed.sql, MALFORMED);
    assert_eq!(err.code(), Some("42601"), "{err}");
    assert!(err.database_error().is_some());
}

#[derive(Clone, Copy, Debug)]
enum How {
    Run,
    IntoFuture,
    /// `run_sync` from a multi-thread runtime's worker.
    RunSync,
}

async fn run(mut atomic: Atomic, how: How) -> pgengine::Result<()> {
    let result = match how {
        How::Run => atomic.run().await,
        How::IntoFuture => return atomic.await,
        How::RunSync => atomic.run_sync(),
    };
    assert!(atomic.is_empty(), "the list is emptied by a run ({how:?})");
    result
}

/// A malformed third statement: an error naming it, and neither table exists; without
/// it, both exist.
async fn ddl_all_or_nothing(engine: &PostgresEngine, how: How) {
    let err = run(ddl(engine, true), how).await.unwrap_err();
    assert_names_malformed(&err);
    assert!(!table_exists(engine, "first_table").await, "{how:?}");
    assert!(!table_exists(engine, "second_table").await, "{how:?}");

    run(ddl(engine, false), how).await.unwrap();
    assert!(table_exists(engine, "first_table").await, "{how:?}");
    assert!(table_exists(engine, "second_table").await, "{how:?}");
    engine
        .run_ddl("DROP TABLE first_table, second_table")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_is_all_or_nothing_every_way_of_running() {
    let (db, engine) = common::engine().await;
    for how in [How::Run, How::IntoFuture, How::RunSync] {
        ddl_all_or_nothing(&engine, how).await;
    }
    common::assert_sessions_clean(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_is_all_or_nothing_with_the_pool_started() {
    let (db, engine) = common::engine_with(3).await;
    engine.start_connection_pool().await.unwrap();
    assert_eq!(engine.pool_status().size, 3);
    for how in [How::Run, How::IntoFuture, How::RunSync] {
        ddl_all_or_nothing(&engine, how).await;
    }
    assert_eq!(engine.pool_status().size, 3, "no connection was discarded");
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn joins_the_ambient_transaction() {
    let (db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY)")
        .await
        .unwrap();
    let observer = db.connect().await.unwrap();

    // The closure fails after the atomic ran: the atomic's rows go with the transaction.
    let result: pgengine::Result<()> = engine
        .transaction()
        .run(async |tx| {
            let mut atomic = engine.atomic();
            atomic
                .add(sql!("INSERT INTO band VALUES ({})", "Pythonistas"))
                .add(sql!("INSERT INTO band VALUES ({})", "Rustaceans"));
            atomic.run().await?;
            // Visible in the transaction, not outside it: it did not commit on its own.
            assert_eq!(common::count(tx, "band").await, 2);
            let outside: i64 = observer
                .query_one("SELECT count(*) FROM band", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(outside, 0);
            Err(Error::invalid_input("changed my mind"))
        })
        .await;
    assert_eq!(result.unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(common::count(&engine, "band").await, 0);

    // The closure succeeds: committed with the transaction.
    engine
        .transaction()
        .run(async |_tx| {
            let mut atomic = engine.atomic();
            atomic.add(sql!("INSERT INTO band VALUES ({})", "Pythonistas"));
            atomic.add(sql!("INSERT INTO band VALUES ({})", "Rustaceans"));
            atomic.await
        })
        .await
        .unwrap();
    assert_eq!(common::count(&engine, "band").await, 2);

    // A failing atomic aborts the ambient transaction: its commit is an error.
    let result: pgengine::Result<()> = engine
        .transaction()
        .run(async |tx| {
            tx.execute(sql!("INSERT INTO band VALUES ({})", "Crabs"))
                .await?;
            let mut atomic = engine.atomic();
            atomic.add(sql!("INSERT INTO band VALUES ({})", "Pythonistas")); // duplicate
            let err = atomic.run().await.unwrap_err();
            assert!(err.is_unique_violation(), "{err}");
            assert_eq!(err.statement().map(|s| s.index), Some(0));
            Ok(()) // ignore the error: the commit must still fail
        })
        .await;
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Transaction);
    assert_eq!(
        common::count(&engine, "band").await,
        2,
        "Crabs was not saved"
    );
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_thousand_parameterized_inserts_commit_together() {
    let (db, engine) = common::engine().await;
    engine
        .run_ddl("CREATE TABLE t (id int PRIMARY KEY, label text)")
        .await
        .unwrap();
    let mut atomic = engine.atomic();
    atomic.add_all((0..1000).map(|i| sql!("INSERT INTO t VALUES ({}, {})", i, format!("row {i}"))));
    assert_eq!(atomic.len(), 1000);
    atomic.run().await.unwrap();
    assert!(atomic.is_empty());
    assert_eq!(common::count(&engine, "t").await, 1000);
    let row = engine
        .fetch_one("SELECT label FROM t WHERE id = 999")
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "row 999");

    // Running the emptied atomic again does nothing.
    atomic.run().await.unwrap();
    assert_eq!(common::count(&engine, "t").await, 1000);
    common::assert_sessions_clean(&db).await;
}

#[tokio::test]
async fn a_failure_in_the_middle_stores_nothing_and_names_the_statement() {
    let (db, engine) = common::engine_with(1).await;
    engine
        .run_ddl("CREATE TABLE t (id int PRIMARY KEY, label text)")
        .await
        .unwrap();
    let mut atomic = engine.atomic();
    for i in 0..1000 {
        // #500 repeats #0's key.
        let id = if i == 500 { 0 } else { i };
        atomic.add(sql!(
            "INSERT INTO t VALUES ({}, {})",
            id,
            format!("row {i}")
        ));
    }
    let err = atomic.run().await.unwrap_err();
    assert!(atomic.is_empty(), "emptied on error too");
    assert!(err.is_unique_violation(), "{err}");
    let failed = err.statement().expect("the failing statement");
    assert_eq!(failed.index, 500);
    assert_eq!(failed.sql, "INSERT INTO t VALUES ($1, $2)");
    assert_eq!(common::count(&engine, "t").await, 0);
    common::assert_sessions_clean(&db).await;
    // The (only) connection is fine: usable, and outside any transaction (where a
    // SAVEPOINT is refused: 25P01).
    assert_eq!(common::count(&engine, "t").await, 0);
    let err = engine.run_ddl("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(err.code(), Some("25P01"), "{err}");
}

#[tokio::test]
async fn statements_see_the_effects_of_earlier_ones() {
    // The parameterized INSERTs depend on the CREATE TABLE and the ALTER before them.
    let (db, engine) = common::engine().await;
    let mut atomic = engine.atomic();
    atomic.add("CREATE TABLE band (name text, popularity int)");
    for (name, popularity) in [("Pythonistas", 1000), ("Rustaceans", 2000)] {
        atomic.add(sql!("INSERT INTO band VALUES ({}, {})", name, popularity));
    }
    atomic.add("ALTER TABLE band ADD COLUMN genre text");
    atomic.add(sql!(
        "INSERT INTO band VALUES ({}, {}, {})",
        "Gophers",
        500,
        "jazz"
    ));
    atomic.add(sql!(
        "UPDATE band SET genre = {} WHERE genre IS NULL",
        "rock"
    ));
    atomic.run().await.unwrap();
    let rows = engine
        .fetch("SELECT name, genre FROM band ORDER BY popularity")
        .await
        .unwrap();
    let bands: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        bands,
        [
            ("Gophers".into(), "jazz".into()),
            ("Pythonistas".into(), "rock".into()),
            ("Rustaceans".into(), "rock".into()),
        ]
    );

    // A parameterized statement that is wrong on its own still fails, named, and
    // rolls back everything before it.
    let mut atomic = engine.atomic();
    atomic.add("CREATE TABLE other (id int)");
    atomic.add(sql!("INSERT INTO other VALUES ({})", 1));
    atomic.add(sql!("INSERT INTO missing VALUES ({})", 1));
    let err = atomic.run().await.unwrap_err();
    assert_eq!(err.code(), Some("42P01"), "{err}");
    assert_eq!(err.statement().map(|s| s.index), Some(2));
    assert!(!table_exists(&engine, "other").await);

    // The same inside an ambient transaction, where each new text is prepared at its turn.
    engine
        .transaction()
        .run(async |tx| {
            let mut atomic = engine.atomic();
            atomic.add("CREATE TABLE other (id int, label text)");
            atomic.add_all((0..10).map(|i| sql!("INSERT INTO other VALUES ({}, {})", i, "x")));
            atomic.add(sql!("UPDATE other SET label = {} WHERE id >= {}", "y", 5));
            atomic.run().await?;
            let updated = tx
                .fetch_one("SELECT count(*) FROM other WHERE label = 'y'")
                .await?;
            assert_eq!(updated.get::<_, i64>(0), 5);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(common::count(&engine, "other").await, 10);
    common::assert_sessions_clean(&db).await;
}

/// `run_sync` from plain synchronous code: no runtime on the calling thread.
#[test]
fn run_sync_without_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db, engine) = runtime.block_on(common::engine());

    let mut atomic = ddl(&engine, true);
    let err = atomic.run_sync().unwrap_err();
    assert_names_malformed(&err);
    assert!(atomic.is_empty());
    assert!(!runtime.block_on(table_exists(&engine, "first_table")));

    let mut atomic = ddl(&engine, false);
    atomic.add(sql!("INSERT INTO first_table VALUES ({})", 1));
    atomic.run_sync().unwrap();
    assert!(runtime.block_on(table_exists(&engine, "first_table")));
    assert!(runtime.block_on(table_exists(&engine, "second_table")));
    assert_eq!(runtime.block_on(common::count(&engine, "first_table")), 1);
    runtime.block_on(common::assert_sessions_clean(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_sync_inside_a_multi_thread_runtime() {
    let (db, engine) = common::engine().await;
    let mut atomic = ddl(&engine, false);
    atomic.run_sync().unwrap();
    assert!(atomic.is_empty());
    assert!(table_exists(&engine, "first_table").await);
    assert!(table_exists(&engine, "second_table").await);
    common::assert_sessions_clean(&db).await;
}

/// `run_sync` on a current-thread runtime's own thread: it works, without deadlocking
/// on the connections that runtime drives.
#[tokio::test]
async fn run_sync_on_a_current_thread_runtime() {
    let (db, engine) = common::engine().await;
    let mut atomic = ddl(&engine, false);
    atomic.run_sync().unwrap();
    assert!(atomic.is_empty());
    assert!(table_exists(&engine, "first_table").await);
    assert!(table_exists(&engine, "second_table").await);
    common::assert_sessions_clean(&db).await;
}

/// `run_sync` while the runtime that opened the engine's connections sits idle (a
/// current-thread runtime between `block_on` calls): it still completes.
#[test]
fn run_sync_while_the_engine_runtime_is_idle() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (db, engine) = runtime.block_on(common::engine());
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn({
        let engine = engine.clone();
        move || {
            let mut atomic = ddl(&engine, false);
            done.send(atomic.run_sync()).unwrap();
        }
    });
    let result = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("run_sync finished instead of hanging");
    result.unwrap();
    worker.join().unwrap();
    assert!(runtime.block_on(table_exists(&engine, "second_table")));
    runtime.block_on(common::assert_sessions_clean(&db));
}

#[tokio::test]
async fn an_empty_atomic_sends_nothing() {
    let (_db, engine) = common::engine().await;
    // With the pool closed, anything that needs a connection fails with `Closed`.
    engine.close_connection_pool().await;
    let mut atomic = engine.atomic();
    assert!(atomic.is_empty());
    atomic.run().await.unwrap();
    engine.atomic().await.unwrap();
    assert_eq!(
        engine.fetch("SELECT 1").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

/// A TCP proxy (127.0.0.1 only) in front of the server that delivers every
/// server→client chunk `delay` after it arrived, and counts client→server chunks and
/// the server's `ReadyForQuery` messages (one per `Sync` or simple query answered).
struct SlowProxy {
    port: u16,
    client_chunks: Arc<AtomicUsize>,
    ready_for_query: Arc<AtomicUsize>,
}

/// Counts the `ReadyForQuery` messages of a server→client byte stream, read in chunks.
#[derive(Default)]
struct MessageCounter {
    pending: Vec<u8>,
    started: bool,
}

impl MessageCounter {
    /// The `ReadyForQuery` messages completed by `chunk`.
    fn ready_for_query_in(&mut self, chunk: &[u8]) -> usize {
        self.pending.extend_from_slice(chunk);
        if !self.started && !self.pending.is_empty() {
            self.started = true;
            if matches!(self.pending[0], b'N' | b'S') {
                self.pending.remove(0); // the one-byte answer to an SSLRequest
            }
        }
        let mut ready = 0;
        while self.pending.len() >= 5 {
            let length = u32::from_be_bytes(self.pending[1..5].try_into().unwrap()) as usize;
            if self.pending.len() < 1 + length {
                break;
            }
            ready += usize::from(self.pending[0] == b'Z');
            self.pending.drain(..1 + length);
        }
        ready
    }
}

impl SlowProxy {
    async fn start(upstream: String, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let client_chunks = Arc::new(AtomicUsize::new(0));
        let counter = client_chunks.clone();
        let ready_for_query = Arc::new(AtomicUsize::new(0));
        let ready = ready_for_query.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                        counter.fetch_add(1, Ordering::Relaxed);
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                });
                let (chunks, mut delayed) = tokio::sync::mpsc::unbounded_channel();
                let ready = ready.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    let mut messages = MessageCounter::default();
                    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                        ready.fetch_add(messages.ready_for_query_in(&buf[..n]), Ordering::Relaxed);
                        if chunks
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, chunk)) = delayed.recv().await {
                        tokio::time::sleep_until(due).await;
                        if client_write.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Self {
            port,
            client_chunks,
            ready_for_query,
        }
    }

    fn client_chunks(&self) -> usize {
        self.client_chunks.load(Ordering::Relaxed)
    }

    fn ready_for_query(&self) -> usize {
        self.ready_for_query.load(Ordering::Relaxed)
    }
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn host_and_port(url: &str) -> String {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let authority = after_at.split('/').next().unwrap();
    authority.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_do_not_grow_with_the_statement_count() {
    const DELAY: Duration = Duration::from_millis(50);
    const STATEMENTS: i32 = 100;
    let db = pgengine_testing::TestDatabase::new().await.unwrap();
    let proxy = SlowProxy::start(host_and_port(db.url()), DELAY).await;
    let engine = common::builder(&db)
        .host("127.0.0.1")
        .port(proxy.port)
        .max_connections(1)
        .build()
        .await
        .unwrap();
    engine.run_ddl("CREATE TABLE t (id int)").await.unwrap();

    let bundle = |offset: i32| {
        let mut atomic = engine.atomic();
        atomic.add_all((0..STATEMENTS).map(|i| sql!("INSERT INTO t VALUES ({})", offset + i)));
        atomic
    };
    // A sequential client would need a round trip per statement: 100 × 50 ms = 5 s.
    let limit = DELAY * 10;

    // First run: the statement is prepared too.
    let started = Instant::now();
    bundle(0).run().await.unwrap();
    let first = started.elapsed();

    // Second run: prepared already (statement cache of the only connection).
    let chunks_before = proxy.client_chunks();
    let ready_before = proxy.ready_for_query();
    let started = Instant::now();
    bundle(STATEMENTS).run().await.unwrap();
    let second = started.elapsed();
    let chunks = proxy.client_chunks() - chunks_before;
    // BEGIN, the 100 inserts and COMMIT end in one Sync: the server answers once.
    assert_eq!(
        proxy.ready_for_query() - ready_before,
        1,
        "one Sync per bundle"
    );
    eprintln!(
        "{STATEMENTS} inserts over a {DELAY:?} link: first run {first:?}, second run {second:?} \
         ({chunks} client→server chunks)"
    );
    assert!(second < limit, "prepared: {second:?} ≥ {limit:?}");
    assert!(first < limit, "preparing: {first:?} ≥ {limit:?}");

    // Inside an ambient transaction too (the statement is prepared already).
    let in_transaction = engine
        .transaction()
        .run(async |_tx| {
            let ready_before = proxy.ready_for_query();
            let started = Instant::now();
            bundle(2 * STATEMENTS).run().await?;
            let elapsed = started.elapsed();
            assert_eq!(
                proxy.ready_for_query() - ready_before,
                1,
                "one Sync in a transaction"
            );
            Ok::<_, Error>(elapsed)
        })
        .await
        .unwrap();
    eprintln!("the same inside a transaction: {in_transaction:?}");
    assert!(
        in_transaction < limit,
        "in a transaction: {in_transaction:?} ≥ {limit:?}"
    );
    assert_eq!(common::count(&engine, "t").await, 3 * i64::from(STATEMENTS));
}
