//! The query methods that the engine and a transaction share: the [`Executor`] trait.

use std::future::Future;

use tokio::io::AsyncRead;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::batch::{AsyncBatch, TypedBatch};
use crate::copy_out::{CopyOut, CopyOutRows};
use crate::error::{Error, ErrorKind, Result};
use crate::from_row::FromRow;
use crate::query::{Query, QueryString};
use crate::runner::{Answer, FirstRow, compile_all};

pub(crate) mod sealed {
    use crate::error::Result;
    use crate::query::CompiledQuery;
    use crate::runner::Runner;

    /// Only the engine and transactions run queries.
    pub trait Sealed {
        /// Where the next query runs.
        fn runner(&self) -> impl Future<Output = Result<Runner>> + Send;

        /// Where the next query of `statements` runs: the engine may put a single
        /// statement on a shared connection (multiplexing).
        fn runner_for(
            &self,
            _statements: &[CompiledQuery<'_>],
        ) -> impl Future<Output = Result<Runner>> + Send {
            self.runner()
        }
    }
}

/// Runs queries: implemented by [`PostgresEngine`](crate::PostgresEngine) (inside the
/// ambient transaction when there is one, else on a pooled connection) and by
/// [`PostgresTransaction`](crate::PostgresTransaction) (on its connection).
///
/// A query of several statements runs them all, in order, in one transaction (the
/// current one, or its own), pipelined.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// // Works with the engine and inside a transaction alike.
/// async fn count_bands(db: &impl Executor) -> pgengine::Result<i64> {
///     Ok(db.fetch_one("SELECT count(*) FROM band").await?.get(0))
/// }
/// assert_eq!(count_bands(&engine).await?, 2);
/// let tx = engine.begin().await?;
/// tx.execute("DELETE FROM band WHERE name = 'Pythonistas'").await?;
/// assert_eq!(count_bands(&tx).await?, 1);
/// # Ok(()) });
/// ```
pub trait Executor: sealed::Sealed + Sync {
    /// Runs the query and returns its rows (of its last statement, for several).
    ///
    /// Every row is held in memory at once: `fetch` puts no bound on the result's size,
    /// and a million rows of 200 bytes take some 300 MiB. For a result that can be
    /// large, [`batch`](Executor::batch) streams it in memory bounded by its batch size.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// for row in engine.fetch(sql!("SELECT name FROM band WHERE popularity > {}", 100)).await? {
    ///     let name: String = row.get("name");
    /// }
    /// # Ok(()) });
    /// ```
    fn fetch<Q: Query>(&self, query: Q) -> impl Future<Output = Result<Vec<Row>>> + Send {
        run(self, query)
    }

    /// Runs the query and returns its only row; no row is [`ErrorKind::RowNotFound`],
    /// several are [`ErrorKind::TooManyRows`].
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let count: i64 = engine.fetch_one("SELECT count(*) FROM band").await?.get(0);
    /// # Ok(()) });
    /// ```
    fn fetch_one<Q: Query>(&self, query: Q) -> impl Future<Output = Result<Row>> + Send {
        async move {
            let first: FirstRow = run(self, query).await?;
            match first.count {
                1 => Ok(first.row.expect("one row")),
                0 => Err(Error::new(
                    ErrorKind::RowNotFound,
                    "fetch_one expected exactly one row, the query returned none",
                )),
                n => Err(Error::new(
                    ErrorKind::TooManyRows,
                    format!("fetch_one expected exactly one row, the query returned {n}"),
                )),
            }
        }
    }

    /// Runs the query and returns its row, or `None` when there is none; several rows
    /// are [`ErrorKind::TooManyRows`].
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let band = engine.fetch_optional(sql!("SELECT * FROM band WHERE name = {}", "Rustaceans")).await?;
    /// # Ok(()) });
    /// ```
    fn fetch_optional<Q: Query>(
        &self,
        query: Q,
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        async move {
            let first: FirstRow = run(self, query).await?;
            match first.count {
                0 | 1 => Ok(first.row),
                n => Err(Error::new(
                    ErrorKind::TooManyRows,
                    format!("fetch_optional expected at most one row, the query returned {n}"),
                )),
            }
        }
    }

    /// Runs the query and returns its rows as `T` (see [`FromRow`]: tuples, or your
    /// own types); a column of another type is an error naming it.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let bands: Vec<(String, i32)> = engine.fetch_as("SELECT name, popularity FROM band").await?;
    /// assert_eq!(bands.len(), 2);
    /// # Ok(()) });
    /// ```
    fn fetch_as<T, Q>(&self, query: Q) -> impl Future<Output = Result<Vec<T>>> + Send
    where
        T: FromRow + Send,
        Q: Query,
    {
        async move { self.fetch(query).await?.iter().map(T::from_row).collect() }
    }

    /// Runs the query and returns its one row as `T` (see
    /// [`fetch_one`](Executor::fetch_one)).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let (name, popularity): (String, i32) = engine
    ///     .fetch_one_as(sql!("SELECT name, popularity FROM band WHERE name = {}", "Rustaceans"))
    ///     .await?;
    /// # Ok(()) });
    /// ```
    fn fetch_one_as<T, Q>(&self, query: Q) -> impl Future<Output = Result<T>> + Send
    where
        T: FromRow + Send,
        Q: Query,
    {
        async move { T::from_row(&self.fetch_one(query).await?) }
    }

    /// Runs the query and returns its row, if any, as `T` (see
    /// [`fetch_optional`](Executor::fetch_optional)).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let missing: Option<(i32,)> = engine
    ///     .fetch_optional_as(sql!("SELECT popularity FROM band WHERE name = {}", "nobody"))
    ///     .await?;
    /// assert!(missing.is_none());
    /// # Ok(()) });
    /// ```
    fn fetch_optional_as<T, Q>(&self, query: Q) -> impl Future<Output = Result<Option<T>>> + Send
    where
        T: FromRow + Send,
        Q: Query,
    {
        async move {
            match self.fetch_optional(query).await? {
                Some(row) => T::from_row(&row).map(Some),
                None => Ok(None),
            }
        }
    }

    /// Runs the query and returns the number of rows it affected (summed over its
    /// statements).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let n = engine.execute(sql!("UPDATE band SET popularity = {} WHERE name = {}", 0, "Pythonistas")).await?;
    /// # Ok(()) });
    /// ```
    fn execute<Q: Query>(&self, query: Q) -> impl Future<Output = Result<u64>> + Send {
        run(self, query)
    }

    /// Runs `sql`, one statement, once for each of `rows` (its parameters, in `$n`
    /// order), all in one transaction (this one, or its own), and returns the rows
    /// affected, summed. The statement is prepared once and every row goes out in one
    /// pipeline, answered once: the way to insert many rows when a `COPY` will not do
    /// (`ON CONFLICT`, `RETURNING`-less upserts, updates). A failing row is named (the
    /// error's [`statement`](crate::Error::statement) index is the row's) and no row is
    /// applied; a row with the wrong number of values is an
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) error before anything is sent.
    /// A row is anything that holds its values as a slice: an array made on the fly, a
    /// `Vec`, or a slice borrowed from elsewhere.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// use pgengine::types::ToSql;
    /// let bands = [("Gophers", 3000), ("Crabs", 500)];
    /// let inserted = engine
    ///     .execute_many(
    ///         "INSERT INTO band (name, popularity) VALUES ($1, $2)",
    ///         bands.iter().map(|(n, p)| [n as &(dyn ToSql + Sync), p as _]),
    ///     )
    ///     .await?;
    /// assert_eq!(inserted, 2);
    /// # Ok(()) });
    /// ```
    fn execute_many<'a, I, R>(&self, sql: &str, rows: I) -> impl Future<Output = Result<u64>> + Send
    where
        I: IntoIterator<Item = R> + Send,
        I::IntoIter: Send,
        R: AsRef<[&'a (dyn ToSql + Sync)]> + Send + Sync,
    {
        async move {
            let rows: Vec<R> = rows.into_iter().collect();
            self.runner().await?.execute_many(sql, &rows).await
        }
    }

    /// Runs DDL: one statement or several separated by `;`, sent as written over the
    /// simple protocol. Several statements outside a transaction run as one implicit
    /// transaction (all or nothing).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// engine.run_ddl("CREATE TABLE venue (name text); CREATE INDEX ON venue (name)").await?;
    /// # Ok(()) });
    /// ```
    fn run_ddl(&self, ddl: &str) -> impl Future<Output = Result<()>> + Send {
        async move { self.runner().await?.simple(ddl).await }
    }

    /// Runs `sql`, a `COPY … FROM STDIN` in text or CSV format, with the data read from
    /// `reader`, and returns the number of rows copied. A COPY dropped half-way leaves
    /// the connection clean (outside a transaction) or the transaction unable to commit
    /// (inside one).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let csv = "Gophers,3000\nCrabs,500\n".as_bytes();
    /// let copied = engine.copy_in("COPY band (name, popularity) FROM STDIN (FORMAT csv)", csv).await?;
    /// assert_eq!(copied, 2);
    /// # Ok(()) });
    /// ```
    fn copy_in<R>(&self, sql: &str, reader: R) -> impl Future<Output = Result<u64>> + Send
    where
        R: AsyncRead + Unpin + Send,
    {
        async move { self.runner().await?.copy_in(sql, reader).await }
    }

    /// Runs `sql`, a `COPY … FROM STDIN (FORMAT binary)`, with `rows` (each a slice
    /// of values of the column `types`, in order), and returns the number of rows
    /// copied: the fastest way to load many rows. A row of the wrong length is an
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) error, and nothing is copied.
    /// Rows are read as they are sent: an iterator that makes each row (an array of
    /// borrowed values, say) holds no more than one in memory.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// use pgengine::types::{ToSql, Type};
    /// let bands = [("Gophers", 3000), ("Crabs", 500)];
    /// let copied = engine
    ///     .copy_in_rows(
    ///         "COPY band (name, popularity) FROM STDIN (FORMAT binary)",
    ///         &[Type::TEXT, Type::INT4],
    ///         bands.iter().map(|(n, p)| [n as &(dyn ToSql + Sync), p as _]),
    ///     )
    ///     .await?;
    /// assert_eq!(copied, 2);
    /// # Ok(()) });
    /// ```
    fn copy_in_rows<'a, I, R>(
        &self,
        sql: &str,
        types: &[Type],
        rows: I,
    ) -> impl Future<Output = Result<u64>> + Send
    where
        I: IntoIterator<Item = R> + Send,
        I::IntoIter: Send,
        R: AsRef<[&'a (dyn ToSql + Sync)]> + Send,
    {
        async move { self.runner().await?.copy_in_rows(sql, types, rows).await }
    }

    /// Runs `sql`, a `COPY … TO STDOUT`, and streams its data as the server sends it
    /// (text, CSV or binary, as `sql` asks); see [`CopyOut`]. Dropped before its end,
    /// the COPY is cancelled (and a transaction it ran in cannot commit).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use futures::StreamExt;
    /// use pgengine::prelude::*;
    /// let mut copy = engine.copy_out("COPY band TO STDOUT (FORMAT csv, HEADER)").await?;
    /// while let Some(chunk) = copy.next().await {
    ///     let chunk = chunk?; // write it to a file, a socket, …
    /// }
    /// # Ok(()) });
    /// ```
    fn copy_out(&self, sql: &str) -> impl Future<Output = Result<CopyOut>> + Send {
        async move { CopyOut::start(self.runner().await?, sql).await }
    }

    /// Runs `sql`, a `COPY … TO STDOUT (FORMAT binary)`, and streams its rows decoded
    /// as the column `types`; see [`CopyOutRows`].
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use futures::TryStreamExt;
    /// use pgengine::prelude::*;
    /// use pgengine::types::Type;
    /// let mut rows = engine
    ///     .copy_out_rows("COPY band (name) TO STDOUT (FORMAT binary)", &[Type::TEXT])
    ///     .await?;
    /// while let Some(row) = rows.try_next().await? {
    ///     let name: &str = row.get(0);
    /// }
    /// # Ok(()) });
    /// ```
    fn copy_out_rows(
        &self,
        sql: &str,
        types: &[Type],
    ) -> impl Future<Output = Result<CopyOutRows>> + Send {
        async move { CopyOutRows::start(self.runner().await?, sql, types).await }
    }

    /// Streams the rows of `query`, at most `batch_size` at a time, in bounded memory;
    /// see [`AsyncBatch`]. Inside a transaction (this one, or the ambient one of the
    /// engine) it reads a cursor of that transaction and sees its uncommitted rows.
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let mut batch = engine.batch("SELECT * FROM big_table", 1000).await?;
    /// while let Some(rows) = batch.next().await? {
    ///     println!("{} rows", rows.len());
    /// }
    /// let tx = engine.begin().await?;
    /// let mut batch = tx.batch("SELECT * FROM big_table", 1000).await?;
    /// # Ok(()) });
    /// ```
    fn batch<Q: Query>(
        &self,
        query: Q,
        batch_size: usize,
    ) -> impl Future<Output = Result<AsyncBatch>> + Send {
        AsyncBatch::open(self.runner(), query, batch_size)
    }

    /// [`batch`](Executor::batch) with each row made into `T` ([`FromRow`]); see
    /// [`TypedBatch`].
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use futures::TryStreamExt;
    /// use pgengine::prelude::*;
    /// #[derive(pgengine::FromRow)]
    /// struct Band { name: String, popularity: i32 }
    /// let batches: Vec<Vec<Band>> = engine
    ///     .batch_as::<Band, _>("SELECT name, popularity FROM band ORDER BY name", 1)
    ///     .await?
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(batches.len(), 2);
    /// # Ok(()) });
    /// ```
    fn batch_as<T, Q>(
        &self,
        query: Q,
        batch_size: usize,
    ) -> impl Future<Output = Result<TypedBatch<T>>> + Send
    where
        T: FromRow,
        Q: Query,
    {
        async move { Ok(TypedBatch::new(self.batch(query, batch_size).await?)) }
    }

    /// Runs one [`QueryString`] and returns its rows: the seed's name for
    /// [`fetch`](Executor::fetch).
    ///
    /// ```
    /// # pgengine_testing::doctest(async |engine| {
    /// use pgengine::prelude::*;
    /// let rows = engine.run_querystring(sql!("SELECT {}::int", 1)).await?;
    /// # Ok(()) });
    /// ```
    fn run_querystring(
        &self,
        querystring: QueryString,
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        self.fetch(querystring)
    }
}

/// Runs the query where `executor` says, for the answer `A` (its rows, its first row
/// and count of rows, or the rows it affected): one statement as a prepared request,
/// several in one transaction, pipelined.
async fn run<E, Q, A>(executor: &E, query: Q) -> Result<A>
where
    E: Executor + ?Sized,
    Q: Query,
    A: Answer,
{
    let statements = query.into_statements();
    let compiled = compile_all(&statements)?;
    let runner = executor.runner_for(&compiled).await?;
    match &*compiled {
        [one] => runner.prepared(one.sql(), one.params()).await,
        many => runner.pipelined(many).await,
    }
}
