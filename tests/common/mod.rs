//! Shared helpers for the integration tests: a fresh database and an engine on it.
#![allow(dead_code)] // each test binary uses its own subset

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use pgengine::{EngineBuilder, Executor, PostgresEngine, QueryString, sql};
use pgengine_testing::TestDatabase;

/// A fresh database, and an engine on it with `max_connections` connections.
pub async fn engine_with(max_connections: usize) -> (TestDatabase, PostgresEngine) {
    let db = TestDatabase::new().await.expect("test database");
    let engine = builder(&db)
        .max_connections(max_connections)
        .build()
        .await
        .expect("engine");
    (db, engine)
}

/// A fresh database and an engine with a pool of 8.
pub async fn engine() -> (TestDatabase, PostgresEngine) {
    engine_with(8).await
}

/// A builder for the database, with a unique application_name.
pub fn builder(db: &TestDatabase) -> EngineBuilder {
    PostgresEngine::builder()
        .url(db.url())
        .application_name(&application_name(db))
        .pool_wait_timeout(Duration::from_secs(20))
}

/// The application_name the test engines of `db` use (to find them in pg_stat_activity).
pub fn application_name(db: &TestDatabase) -> String {
    format!("pgengine-test-{}", db.name())
}

/// The states of the server sessions of our engines on `db` (an observer connection
/// of its own, outside the engine's pool), e.g. `["idle", "idle in transaction"]`.
pub async fn session_states(db: &TestDatabase) -> Vec<String> {
    let observer = db.connect().await.expect("observer connection");
    observer
        .query(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&application_name(db)],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits (at most 5 s) until no session of ours is inside a transaction, and returns
/// the states seen last.
pub async fn settled_session_states(db: &TestDatabase) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let states = session_states(db).await;
        let dirty = states
            .iter()
            .any(|s| s.contains("transaction") || s == "active");
        if !dirty || tokio::time::Instant::now() > deadline {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that none of our sessions is inside a transaction or busy.
pub async fn assert_sessions_clean(db: &TestDatabase) {
    let states = settled_session_states(db).await;
    assert!(
        states.iter().all(|s| s == "idle"),
        "sessions not clean: {states:?}"
    );
}

/// The number of rows of `table` (trusted, literal table name), counted through
/// `executor` (so inside its transaction, for a transaction).
pub async fn count(executor: &impl Executor, table: &str) -> i64 {
    executor
        .fetch_one(format!("SELECT count(*) FROM {table}"))
        .await
        .expect("count")
        .get(0)
}

/// The server pid of the session `executor` runs on.
pub async fn backend_pid(executor: &impl Executor) -> i32 {
    executor
        .fetch_one("SELECT pg_backend_pid()")
        .await
        .expect("pg_backend_pid")
        .get(0)
}

/// The value of a server setting, as `SHOW` gives it, on the session `executor` runs on.
pub async fn show(executor: &impl Executor, setting: &str) -> String {
    executor
        .fetch_one(format!("SHOW {setting}"))
        .await
        .expect("SHOW")
        .get(0)
}

/// Whether a table of that name exists (as seen through `executor`).
pub async fn table_exists(executor: &impl Executor, name: &str) -> bool {
    executor
        .fetch_one(sql!("SELECT to_regclass({}) IS NOT NULL", name.to_owned()))
        .await
        .expect("to_regclass")
        .get(0)
}

/// `band (name text PRIMARY KEY)`.
pub async fn create_band(engine: &PostgresEngine) {
    engine
        .run_ddl("CREATE TABLE band (name text PRIMARY KEY)")
        .await
        .expect("CREATE TABLE band");
}

/// `INSERT INTO band (name) VALUES ($1)`.
pub fn insert_band(name: &str) -> QueryString {
    sql!("INSERT INTO band (name) VALUES ({})", name.to_owned())
}

/// The names stored in `band`, sorted (inside its transaction, for a transaction).
pub async fn band_names(executor: &impl Executor) -> Vec<String> {
    executor
        .fetch("SELECT name FROM band ORDER BY name")
        .await
        .expect("band names")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Polls `future` until it has been `Pending` `pendings + 1` times, and drops it then
/// (`None`); `Some(output)` if it finished first. Each `Pending` is an await point that
/// waited for the server, so `pendings = 0, 1, 2, …` cancels at each await in turn.
pub async fn cancel_at_pending<F: Future>(future: F, pendings: usize) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut seen = 0;
    std::future::poll_fn(move |cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending if seen == pendings => Poll::Ready(None),
        Poll::Pending => {
            seen += 1;
            Poll::Pending
        }
    })
    .await
}

/// A `tracing` event seen by [`capture_events`]: its level, target, and fields as
/// `name=value ` pairs (quotes removed).
#[derive(Debug)]
pub struct Event {
    pub level: tracing::Level,
    pub target: String,
    pub text: String,
}

/// Collects the `tracing` events of this thread until the guard is dropped.
pub fn capture_events() -> (Arc<Mutex<Vec<Event>>>, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::{Context, SubscriberExt};

    struct Capture(Arc<Mutex<Vec<Event>>>);
    struct Fields(String);
    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0
                .push_str(&format!("{}={:?} ", field.name(), value).replace('"', ""));
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(Event {
                level: *event.metadata().level(),
                target: event.metadata().target().to_owned(),
                text: fields.0,
            });
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
    (events, tracing::subscriber::set_default(subscriber))
}

/// A `tracing` span seen by [`capture_spans`]: its name, target, fields (values as
/// their `Debug` text, quotes removed), its parent's index in the list, and whether it
/// was closed.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub name: String,
    pub target: String,
    pub fields: std::collections::BTreeMap<String, String>,
    pub parent: Option<usize>,
    pub closed: bool,
}

impl SpanRecord {
    /// The field's value, if it was recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

thread_local! {
    /// Where [`capture_spans`] puts this thread's spans.
    static SPAN_SINK: std::cell::RefCell<Option<SpanList>> = const { std::cell::RefCell::new(None) };
}

type SpanList = Arc<Mutex<Vec<SpanRecord>>>;

/// Stops [`capture_spans`] on this thread when dropped.
pub struct SpanCapture;

impl Drop for SpanCapture {
    fn drop(&mut self) {
        SPAN_SINK.with(|sink| *sink.borrow_mut() = None);
    }
}

/// Collects the `tracing` spans opened on this thread, in order, until the guard is
/// dropped.
///
/// One global subscriber routes each span to its thread's list. (A per-thread
/// `set_default` subscriber, as [`capture_events`] uses, can miss spans while tests
/// run in parallel: a callsite's interest is cached for all threads.)
pub fn capture_spans() -> (SpanList, SpanCapture) {
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    struct Capture;
    /// The list a span went to, and its index there.
    struct Entry(SpanList, usize);
    struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);
    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.insert(
                field.name().to_owned(),
                format!("{value:?}").replace('"', ""),
            );
        }
    }
    impl<S> tracing_subscriber::Layer<S> for Capture
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let Some(list) = SPAN_SINK.with(|sink| sink.borrow().clone()) else {
                return;
            };
            let span = ctx.span(id).expect("a new span is registered");
            let parent = span.parent().and_then(|parent| {
                parent
                    .extensions()
                    .get::<Entry>()
                    .filter(|entry| Arc::ptr_eq(&entry.0, &list))
                    .map(|entry| entry.1)
            });
            let mut fields = std::collections::BTreeMap::new();
            attrs.record(&mut Fields(&mut fields));
            let index = {
                let mut spans = list.lock().unwrap();
                spans.push(SpanRecord {
                    name: attrs.metadata().name().to_owned(),
                    target: attrs.metadata().target().to_owned(),
                    fields,
                    parent,
                    closed: false,
                });
                spans.len() - 1
            };
            span.extensions_mut().insert(Entry(list, index));
        }

        fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
            let span = ctx.span(id).expect("a recorded span is registered");
            if let Some(Entry(list, index)) = span.extensions().get::<Entry>() {
                values.record(&mut Fields(&mut list.lock().unwrap()[*index].fields));
            }
        }

        fn on_close(&self, id: Id, ctx: Context<'_, S>) {
            let span = ctx.span(&id).expect("a closed span is registered");
            if let Some(Entry(list, index)) = span.extensions().get::<Entry>() {
                list.lock().unwrap()[*index].closed = true;
            }
        }
    }
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture))
            .expect("no other global subscriber");
    });
    tracing::callsite::rebuild_interest_cache();
    let spans: SpanList = Arc::default();
    SPAN_SINK.with(|sink| *sink.borrow_mut() = Some(spans.clone()));
    (spans, SpanCapture)
}
