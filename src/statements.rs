//! How a statement with parameters reaches the server: prepared once per connection and
//! kept in a bounded cache (least recently used evicted), or — with a capacity of `0`,
//! for a pooler in transaction mode such as pgbouncer — as an unnamed statement, parsed,
//! bound and run in one round trip, so no named statement outlives its request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use deadpool_postgres::ClientWrapper;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, RowStream, Statement};

use crate::error::{Error, Result};

/// The default number of statements each connection keeps prepared.
pub(crate) const DEFAULT_STATEMENT_CACHE_CAPACITY: usize = 512;

/// The statements one connection keeps prepared, each with when it was last used, to
/// evict the least recently used one once the cache is over its capacity (the evicted
/// statement is closed on the server when its last user drops it). Each pooled session
/// owns its own (see [`Session`](crate::connect::Session)): finding it costs nothing.
#[derive(Default)]
pub(crate) struct Recency {
    cache: Mutex<RecencyInner>,
}

#[derive(Default)]
struct RecencyInner {
    clock: u64,
    by_sql: HashMap<String, (Statement, u64), foldhash::fast::RandomState>,
    /// The schema epoch the statements were prepared in.
    epoch: u64,
}

impl Recency {
    /// The statement prepared for `sql`, if any, now the most recently used. In a newer
    /// schema `epoch` than the statements were prepared in, they are all dropped first.
    fn get(&self, sql: &str, epoch: u64) -> Option<Statement> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.epoch != epoch {
            cache.by_sql.clear();
            cache.epoch = epoch;
        }
        cache.clock += 1;
        let now = cache.clock;
        let (statement, last_use) = cache.by_sql.get_mut(sql)?;
        *last_use = now;
        Some(statement.clone())
    }

    /// Keeps `statement` for `sql`, evicting the least recently used statement when the
    /// cache then holds more than `capacity`.
    fn insert(&self, sql: &str, statement: Statement, capacity: usize) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.clock += 1;
        let now = cache.clock;
        cache.by_sql.insert(sql.to_owned(), (statement, now));
        if cache.by_sql.len() > capacity {
            let oldest = cache
                .by_sql
                .iter()
                .min_by_key(|(_, (_, last_use))| *last_use)
                .map(|(sql, _)| sql.clone());
            if let Some(oldest) = oldest {
                cache.by_sql.remove(&oldest);
            }
        }
    }

    /// Forgets `sql` (dropped from the cache).
    fn forget(&self, sql: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.by_sql.remove(sql);
    }

    /// Forgets every statement.
    fn forget_all(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.by_sql.clear();
    }
}

/// The statement cache of one connection, as a view for one use: its capacity, its
/// recency, and the pool's schema epoch (nothing is cloned to make one).
pub(crate) struct StatementCache<'a> {
    capacity: usize,
    recency: &'a Recency,
    schema_epoch: &'a AtomicU64,
}

impl<'a> StatementCache<'a> {
    /// A cache of `capacity` statements with the connection's `recency`, renewed when
    /// the pool's `schema_epoch` moves.
    pub(crate) fn new(capacity: usize, recency: &'a Recency, schema_epoch: &'a AtomicU64) -> Self {
        Self {
            capacity,
            recency,
            schema_epoch,
        }
    }

    /// Whether statements are prepared and cached (capacity above 0).
    pub(crate) fn caches_statements(&self) -> bool {
        self.capacity > 0
    }

    /// `sql` prepared on this connection, from the cache or prepared now (evicting the
    /// least recently used statement when the cache is full).
    pub(crate) async fn statement(
        &self,
        client: &ClientWrapper,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cached(sql) {
            return Ok(statement);
        }
        // Boxed: a miss is rare, and its request would make every query's future larger.
        let statement = Box::pin(client.prepare(sql)).await?;
        self.recency.insert(sql, statement.clone(), self.capacity);
        Ok(statement)
    }

    /// `sql` prepared on this connection if the cache has it (nothing is sent).
    pub(crate) fn cached(&self, sql: &str) -> Option<Statement> {
        let epoch = self.schema_epoch.load(Ordering::Acquire);
        self.recency.get(sql, epoch)
    }

    /// Drops `sql` from the statement cache.
    pub(crate) fn forget(&self, sql: &str) {
        self.recency.forget(sql);
    }

    /// Empties this connection's statement cache (the other connections keep theirs).
    pub(crate) fn forget_all(&self) {
        self.recency.forget_all();
    }

    /// Runs `sql` with its rows: prepared (cache) or unnamed (capacity 0).
    pub(crate) async fn query_rows(
        &self,
        client: &ClientWrapper,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        if self.caches_statements() {
            let statement = self.statement(client, sql).await?;
            Ok(client.query(&statement, params).await?)
        } else {
            Ok(client.query_typed(sql, &typed(params)?).await?)
        }
    }

    /// Runs `sql`, counting the rows it affected: prepared (cache) or unnamed.
    pub(crate) async fn execute_count(
        &self,
        client: &ClientWrapper,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        if self.caches_statements() {
            let statement = self.statement(client, sql).await?;
            Ok(client.execute(&statement, params).await?)
        } else {
            Ok(client.execute_typed(sql, &typed(params)?).await?)
        }
    }

    /// Starts `sql`, its rows read as they come: prepared (cache) or unnamed.
    pub(crate) async fn query_stream(
        &self,
        client: &ClientWrapper,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream> {
        if self.caches_statements() {
            let statement = self.statement(client, sql).await?;
            Ok(client.query_raw(&statement, params.iter().copied()).await?)
        } else {
            Ok(client.query_typed_raw(sql, typed(params)?).await?)
        }
    }
}

/// The types an unnamed statement declares for its parameters, in the order they are
/// tried: the first type a value can be sent as is the one declared (the server casts
/// it where the statement needs another, as it would a literal of that type).
const DECLARABLE: &[Type] = &[
    Type::BOOL,
    Type::INT2,
    Type::INT4,
    Type::INT8,
    Type::FLOAT4,
    Type::FLOAT8,
    Type::TEXT,
    Type::BYTEA,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::UUID,
    Type::NUMERIC,
    Type::INET,
    Type::INTERVAL,
    Type::OID,
    Type::CHAR,
    Type::BOOL_ARRAY,
    Type::INT2_ARRAY,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TIMESTAMP_ARRAY,
    Type::DATE_ARRAY,
    Type::UUID_ARRAY,
];

/// Each parameter with the type it is declared as in an unnamed statement (which,
/// unlike a prepared one, cannot ask the server first).
pub(crate) fn typed<'a>(
    params: &[&'a (dyn ToSql + Sync)],
) -> Result<Vec<(&'a (dyn ToSql + Sync), Type)>> {
    let mut scratch = BytesMut::new();
    params
        .iter()
        .enumerate()
        .map(|(index, param)| {
            let declared = DECLARABLE.iter().find(|ty| {
                scratch.clear();
                param.to_sql_checked(ty, &mut scratch).is_ok()
            });
            match declared {
                Some(ty) => Ok((*param, ty.clone())),
                None => Err(Error::invalid_input(format!(
                    "parameter ${} has a type an unnamed statement cannot declare \
                     (statement_cache_capacity is 0); cast it in SQL from one of \
                     bool, int2/4/8, float4/8, text, bytea, jsonb, timestamp(tz), date, \
                     time, uuid, numeric, inet, interval, or their arrays",
                    index + 1
                ))),
            }
        })
        .collect()
}
