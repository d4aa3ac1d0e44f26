//! Multiplexing: statements of many callers outside transactions share a few
//! connections, sent back to back without waiting for earlier answers (the driver
//! pipelines concurrent requests on one client), instead of taking a connection each.
//!
//! Only a statement that [`may_share`] a connection — one that leaves nothing on its
//! session for the next statement to see (settings, locks, temporary objects) and reads
//! nothing a previous one left — runs on a shared connection; everything else takes a
//! connection of its own from the pool, as does every statement when the shared
//! connections are full (`max_in_flight` requests each) or stalled. A connection is
//! stalled when its oldest outstanding request took its place more than `stall_after`
//! ago: it takes no new request until that one is answered. A slow statement thus
//! delays only the requests that took their places behind it within `stall_after` of
//! its own: at most `max_in_flight - 1` of them, each by at most the statement's time.
//! An abandoned statement that never ends (a lock wait, say) keeps its connection
//! stalled until it does: give the server a `statement_timeout`.
//!
//! A shared request whose future is dropped is never cancelled: a cancel request stops
//! whatever the backend runs at that moment, maybe another caller's statement. It runs
//! to its end and the driver drops its answer; an empty query sent behind it tells when
//! that end has come (answers come back in the order the requests went out).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::config::MultiplexSettings;
use crate::counters::Counter;
use crate::error::{ErrorKind, Result};
use crate::lifecycle::{self, Lifecycle};
use crate::pool::{Connection, ConnectionPool};
use crate::schema_change::first_word;

/// The first words of the statements that may share a connection.
const SHAREABLE: [&str; 7] = [
    "select", "with", "values", "table", "insert", "update", "delete",
];

/// The names that keep a statement off shared connections, at the start of a word (in
/// any case): functions and objects that read or change the state of the session — its
/// settings (`pg_settings` can be updated), advisory locks, temporary objects, the last
/// values of its sequences, its random seed, its prepared statements, its identity,
/// connections of its own — and `U&` escapes, which could spell any of them; and, in a
/// statement that reads, `INTO`. Listed by first letter: a statement is scanned once.
fn session_bound(first: u8, reads: bool) -> &'static [&'static str] {
    match first {
        b'c' => &["currval"],
        b'd' => &["dblink"],
        b'i' if reads => &["into"],
        b'l' => &["lastval"],
        b'p' => &[
            "pg_advisory",
            "pg_try_advisory",
            "pg_settings",
            "pg_temp",
            "pg_prepared_statements",
            "pg_backend_pid",
        ],
        b's' => &["set_config", "setseed"],
        b'u' => &["u&"],
        _ => &[],
    }
}

/// Whether `sql` (one statement) may run on a shared connection: it starts with
/// `SELECT`, `WITH`, `VALUES`, `TABLE`, `INSERT`, `UPDATE` or `DELETE`, holds no `;`,
/// has no word starting with a name of [`session_bound`], and is no `SELECT … INTO`
/// (which creates a table, maybe a temporary one). Every other statement — `SET`,
/// `LISTEN`, `PREPARE`, `DISCARD`, DDL, transaction control, anything unknown — may
/// change the session, and gets a connection of its own. The test is on the text, so it
/// errs on the side of caution: `into` or `currval` inside a string literal also keeps a
/// statement off.
///
/// ```ignore
/// assert!(may_share("SELECT * FROM band WHERE id = $1"));
/// assert!(!may_share("SET search_path TO app"));
/// ```
pub(crate) fn may_share(sql: &str) -> bool {
    let word = first_word(sql);
    let Some(&first) = SHAREABLE.iter().find(|w| w.eq_ignore_ascii_case(word)) else {
        return false;
    };
    if sql.contains(';') {
        return false;
    }
    let reads = matches!(first, "select" | "with" | "values" | "table");
    let bytes = sql.as_bytes();
    !(0..bytes.len()).any(|at| {
        // Most bytes start no name of `session_bound`: one table lookup rules them out.
        MAY_START_NAME[bytes[at] as usize]
            && (at == 0 || !is_identifier_byte(bytes[at - 1]))
            && session_bound(bytes[at].to_ascii_lowercase(), reads)
                .iter()
                .any(|name| {
                    bytes[at..]
                        .get(..name.len())
                        .is_some_and(|here| here.eq_ignore_ascii_case(name.as_bytes()))
                })
    })
}

/// The bytes that [`session_bound`] has names for, in either case.
const MAY_START_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let letters = b"cdilpsu";
    let mut i = 0;
    while i < letters.len() {
        table[letters[i] as usize] = true;
        table[letters[i].to_ascii_uppercase() as usize] = true;
        i += 1;
    }
    table
};

/// Whether `byte` can be inside an identifier (so no word starts after it).
fn is_identifier_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' || byte >= 0x80
}

/// The shared connections of one pool, and which one takes the next statement.
pub(crate) struct Multiplexer {
    slots: Box<[Slot]>,
    max_in_flight: u64,
    stall_after: Duration,
    /// The pool's lifecycle: shared connections older than its `max_lifetime` are
    /// replaced, and each starts from a reset session with its after-connect settings.
    lifecycle: Lifecycle,
    closed: AtomicBool,
}

/// One place for a shared connection: empty until a statement needs it, and again
/// once its connection broke or grew too old.
#[derive(Default)]
struct Slot {
    shared: RwLock<Option<Arc<Shared>>>,
    /// A caller is taking a connection from the pool for this slot.
    opening: AtomicBool,
}

/// A shared connection and its queue: each request is numbered when a caller takes its
/// place, and stays outstanding until it is answered (an abandoned one: until the marker
/// sent behind it is answered).
struct Shared {
    connection: Connection,
    /// The clock of the queue.
    epoch: Instant,
    /// The last number given.
    numbered: AtomicU64,
    /// The outstanding requests, oldest first: each one's number, and when it took its
    /// place (microseconds after `epoch`). Short (at most `max_in_flight` and the
    /// markers), and it keeps its capacity: no allocation per request.
    outstanding: Mutex<VecDeque<(u64, u64)>>,
}

impl Shared {
    fn new(connection: Connection) -> Self {
        Self {
            connection,
            epoch: Instant::now(),
            numbered: AtomicU64::new(0),
            outstanding: Mutex::default(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The requests outstanding, and whether the oldest of them has waited longer than
    /// `after` (the connection is stalled).
    fn load(&self, after: Duration) -> (u64, bool) {
        let queue = self.queue();
        let stalled = queue
            .front()
            .is_some_and(|(_, since)| self.now().saturating_sub(*since) > after.as_micros() as u64);
        (queue.len() as u64, stalled)
    }

    /// Numbers the next request and puts it in the queue.
    fn enqueue(&self) -> u64 {
        let number = self.numbered.fetch_add(1, Ordering::AcqRel) + 1;
        let mut queue = self.queue();
        // The clock is read under the lock: the queue stays in order of time.
        queue.push_back((number, self.now()));
        number
    }

    /// A place in the queue for the next request of a caller.
    fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket {
            number: self.enqueue(),
            shared: self.clone(),
            answered: AtomicBool::new(false),
        }
    }

    /// The requests `numbers` are answered.
    fn answer(&self, numbers: &[u64]) {
        let mut queue = self.queue();
        for number in numbers {
            if let Some(at) = queue.iter().position(|(n, _)| n == number) {
                queue.remove(at);
            }
        }
    }

    /// After the request `abandoned` was dropped: an empty query sent behind it is
    /// answered once the abandoned request is done, which ends both.
    fn follow_abandoned(self: Arc<Self>, abandoned: u64) {
        let marker = Marker {
            numbers: [abandoned, self.enqueue()],
            shared: self,
            answered: false,
        };
        // Without a runtime to send it on, the marker is dropped at once: see its `Drop`.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut marker = marker;
                let connection = &marker.shared.connection;
                let result = connection.client().batch_execute("").await;
                connection.note(&result.map_err(crate::Error::from));
                marker.answered = true;
            });
        }
    }
}

impl Drop for Shared {
    /// The last request is done (a marker followed every abandoned one): nothing of
    /// any caller runs on the connection, which goes back to the pool as it is, with
    /// nothing to cancel. (Where that is not known, a marker marked it broken.)
    fn drop(&mut self) {
        self.connection.set_request_open(false);
    }
}

/// One request's place in the queue of a shared connection. Dropped unanswered (its
/// future was abandoned), it is followed by a marker (see [`Shared::follow_abandoned`]).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    number: u64,
    answered: AtomicBool,
}

impl Ticket {
    /// The shared connection to send the request on.
    pub(crate) fn connection(&self) -> &Connection {
        &self.shared.connection
    }

    /// The request got its answer (an error too).
    pub(crate) fn answered(&self) {
        if !self.answered.swap(true, Ordering::AcqRel) {
            self.shared.answer(&[self.number]);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Acquire) {
            self.shared.clone().follow_abandoned(self.number);
        }
    }
}

/// The empty query sent behind an abandoned request. Dropped, it ends both in the
/// queue; dropped unanswered (no runtime, or one shutting down), the abandoned request
/// may still run, so the connection is marked broken: it is discarded, never reused.
struct Marker {
    shared: Arc<Shared>,
    /// The abandoned request's number and its own.
    numbers: [u64; 2],
    answered: bool,
}

impl Drop for Marker {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.connection.mark_broken();
        }
        self.shared.answer(&self.numbers);
    }
}

/// What one shared connection is doing: see
/// [`PostgresEngine::shared_connections`](crate::PostgresEngine::shared_connections).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// for shared in engine.shared_connections() {
///     println!("{} requests in flight, stalled: {}", shared.in_flight, shared.stalled);
/// }
/// # Ok(()) });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedConnectionStatus {
    /// Requests sent on it and not yet answered (abandoned ones until they are done).
    pub in_flight: usize,
    /// Whether its oldest request has run past `multiplex_stall_after`: it takes no new
    /// request until that one is answered.
    pub stalled: bool,
}

/// Marks a connection broken when dropped, unless its session was reset.
struct BrokenUnlessReset<'a>(&'a Connection, bool);

impl Drop for BrokenUnlessReset<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.mark_broken();
        }
    }
}

/// Holds a slot's `opening` flag while a caller opens its connection.
struct Opening<'a>(&'a AtomicBool);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Multiplexer {
    /// The shared connections `settings` ask for (none when multiplexing is off), none
    /// opened yet, taken from a pool with `lifecycle`.
    pub(crate) fn new(settings: &MultiplexSettings, lifecycle: &Lifecycle) -> Self {
        Self {
            slots: (0..settings.connections).map(|_| Slot::default()).collect(),
            max_in_flight: settings.max_in_flight as u64,
            stall_after: settings.stall_after,
            lifecycle: lifecycle.clone(),
            closed: AtomicBool::new(false),
        }
    }

    /// Whether statements may share connections at all.
    pub(crate) fn is_on(&self) -> bool {
        !self.slots.is_empty()
    }

    /// A place for one statement on the shared connection with the fewest requests in
    /// flight among those neither full nor stalled, opening one from `pool` when a slot
    /// is empty. `None` when none can take it now: the statement takes a connection of
    /// its own (counted as an overflow). Never waits for a busy connection.
    pub(crate) async fn take(&self, pool: &ConnectionPool) -> Option<Result<Ticket>> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut best: Option<(u64, Arc<Shared>)> = None;
        let mut vacant = None;
        for (index, slot) in self.slots.iter().enumerate() {
            let mut guard = slot.shared.read().unwrap_or_else(PoisonError::into_inner);
            if guard.as_ref().is_some_and(|shared| self.worn(shared)) {
                drop(guard);
                self.retire(index);
                guard = slot.shared.read().unwrap_or_else(PoisonError::into_inner);
            }
            let Some(shared) = guard.as_ref() else {
                if !slot.opening.load(Ordering::Acquire) {
                    vacant.get_or_insert(index);
                }
                continue;
            };
            let (in_flight, stalled) = shared.load(self.stall_after);
            if in_flight >= self.max_in_flight || stalled {
                continue;
            }
            if best.as_ref().is_none_or(|(fewest, _)| in_flight < *fewest) {
                best = Some((in_flight, shared.clone()));
            }
        }
        let chosen = match (best, vacant) {
            (Some((0, shared)), _) | (Some((_, shared)), None) => Some(Ok(shared)),
            // Every connection is busy or missing: spread the load onto a new one.
            // (Boxed: opening is rare, and its future would make every query's larger.)
            (best, Some(index)) => match (Box::pin(self.open(index, pool)).await, best) {
                (Some(Ok(opened)), _) => Some(Ok(opened)),
                // Opening failed, or another caller is opening it: the best one open.
                (_, Some((_, shared))) => Some(Ok(shared)),
                (opened, None) => opened,
            },
            (None, None) => None,
        };
        match &chosen {
            Some(Ok(_)) => pool.counters().add(Counter::Multiplexed, 1),
            Some(Err(_)) => {}
            None => pool.counters().add(Counter::MultiplexOverflows, 1),
        }
        chosen.map(|opened| opened.map(|shared| shared.ticket()))
    }

    /// Opens every shared connection missing (see
    /// [`PostgresEngine::start_connection_pool`](crate::PostgresEngine::start_connection_pool)).
    pub(crate) async fn open_all(&self, pool: &ConnectionPool) -> Result<()> {
        for (index, slot) in self.slots.iter().enumerate() {
            self.retire(index);
            let vacant = slot
                .shared
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none();
            if vacant && let Some(Err(error)) = self.open(index, pool).await {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Empties the slot `index` if its connection is worn: the connection goes back to
    /// the pool (or is discarded, broken) once its last request is answered.
    fn retire(&self, index: usize) {
        let mut current = self.slots[index]
            .shared
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|shared| self.worn(shared)) {
            current.take();
        }
    }

    /// Whether `shared` must be replaced: it broke, or outlived `max_lifetime`.
    fn worn(&self, shared: &Shared) -> bool {
        shared.connection.is_broken()
            || self
                .lifecycle
                .max_lifetime
                .is_some_and(|max| shared.connection.age() > max)
    }

    /// Fills the slot `index` with a connection from `pool`, its session reset (a
    /// previous user of the pooled connection may have left a setting on it), unless
    /// another caller is doing so or the pool has no free connection (`None`). The
    /// connection it replaces goes back to the pool once its last request is answered.
    async fn open(&self, index: usize, pool: &ConnectionPool) -> Option<Result<Arc<Shared>>> {
        let slot = &self.slots[index];
        if slot.opening.swap(true, Ordering::AcqRel) {
            return None;
        }
        let _opening = Opening(&slot.opening);
        let connection = match pool.get_free().await {
            Ok(connection) => connection,
            Err(error) if error.kind() == ErrorKind::PoolTimeout => return None,
            Err(error) => return Some(Err(error)),
        };
        // Dropped before the reset is done (the caller's future was), or failed: the
        // session is neither its last user's nor a fresh one, so it is discarded.
        let mut unreset = BrokenUnlessReset(&connection, true);
        if lifecycle::reset_session(connection.client(), &self.lifecycle)
            .await
            .is_err()
        {
            return None;
        }
        unreset.1 = false;
        drop(unreset);
        let shared = Arc::new(Shared::new(connection));
        let mut current = slot.shared.write().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        *current = Some(shared.clone());
        Some(Ok(shared))
    }

    /// What each open shared connection is doing.
    pub(crate) fn status(&self) -> Vec<SharedConnectionStatus> {
        self.slots
            .iter()
            .filter_map(|slot| {
                let guard = slot.shared.read().unwrap_or_else(PoisonError::into_inner);
                guard.as_ref().map(|shared| {
                    let (in_flight, stalled) = shared.load(self.stall_after);
                    SharedConnectionStatus {
                        in_flight: in_flight as usize,
                        stalled,
                    }
                })
            })
            .collect()
    }

    /// Stops sharing: the shared connections go back to the pool as their last
    /// requests are answered, and every later statement takes a connection of its own.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for slot in &self.slots {
            let taken = slot
                .shared
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            drop(taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAY_START_NAME, may_share, session_bound};

    #[test]
    fn the_first_byte_table_holds_the_first_letters_of_the_session_bound_names() {
        for byte in 0..=255u8 {
            let named = !session_bound(byte.to_ascii_lowercase(), true).is_empty();
            assert_eq!(MAY_START_NAME[byte as usize], named, "{byte}");
        }
    }

    #[test]
    fn reads_and_writes_share_and_session_statements_do_not() {
        for sql in [
            "SELECT * FROM band WHERE id = $1",
            "  select 1",
            "/* c */ WITH t AS (SELECT 1) SELECT * FROM t",
            "INSERT INTO band VALUES ($1)",
            "UPDATE band SET popularity = 1",
            "DELETE FROM band",
            "VALUES (1)",
            "TABLE band",
            "SELECT nextval('s')",
        ] {
            assert!(may_share(sql), "{sql}");
        }
        for sql in [
            "SET search_path TO app",
            "RESET ALL",
            "LISTEN channel",
            "PREPARE p AS SELECT 1",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "SET ROLE app",
            "BEGIN",
            "CREATE TEMP TABLE t (id int)",
            "SELECT set_config('app.user', 'x', false)",
            "SELECT PG_ADVISORY_LOCK(1)",
            "SELECT pg_try_advisory_lock(1)",
            "SELECT * FROM pg_temp.t",
            "SELECT currval('s')",
            "SELECT lastval()",
            "SELECT pg_backend_pid()",
            "SELECT 1; SELECT 2",
            "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'",
            "SELECT setseed(0.5)",
            "SELECT * FROM pg_prepared_statements",
            "SELECT U&\"pg_adv\\0069sory_lock\"(1)",
            "/* /* */ SELECT */ SET search_path TO x",
            "SELECT * INTO TEMP t FROM band",
            "select *\ninto t from band",
            "EXPLAIN ANALYZE SELECT 1",
            "COPY band TO STDOUT",
            "CALL proc()",
            "",
        ] {
            assert!(!may_share(sql), "{sql}");
        }
    }
}
