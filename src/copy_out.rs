//! `COPY … TO STDOUT` as a stream: [`CopyOut`], the data as the server sends it, and
//! [`CopyOutRows`], the binary format decoded into rows of known types.
//!
//! The stream holds its connection (or its transaction's) until the last of the data
//! is read, then gives it back. Dropped before that, its request is cancelled before
//! the connection is reused, and a transaction it ran in can no longer commit.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use tokio_postgres::binary_copy::{BinaryCopyOutRow, BinaryCopyOutStream};
use tokio_postgres::types::Type;

use crate::error::Result;
use crate::runner::Runner;

/// The data of a `COPY … TO STDOUT`, chunk by chunk, from
/// [`Executor::copy_out`](crate::Executor::copy_out).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::TryStreamExt;
/// use pgengine::prelude::*;
/// let copy = engine.copy_out("COPY (SELECT name FROM band ORDER BY name) TO STDOUT (FORMAT csv)").await?;
/// let chunks: Vec<bytes::Bytes> = copy.try_collect().await?;
/// assert_eq!(chunks.concat(), b"Pythonistas\nRustaceans\n");
/// # Ok(()) });
/// ```
pub struct CopyOut(Reading<tokio_postgres::CopyOutStream>);

/// The rows of a `COPY … TO STDOUT (FORMAT binary)`, decoded by their column types,
/// from [`Executor::copy_out_rows`](crate::Executor::copy_out_rows).
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use futures::TryStreamExt;
/// use pgengine::prelude::*;
/// use pgengine::types::Type;
/// let rows: Vec<pgengine::BinaryCopyOutRow> = engine
///     .copy_out_rows(
///         "COPY (SELECT name, popularity FROM band ORDER BY name) TO STDOUT (FORMAT binary)",
///         &[Type::TEXT, Type::INT4],
///     )
///     .await?
///     .try_collect()
///     .await?;
/// assert_eq!((rows[0].get::<&str>(0), rows[0].get::<i32>(1)), ("Pythonistas", 1000));
/// # Ok(()) });
/// ```
pub struct CopyOutRows(Reading<BinaryCopyOutStream>);

/// A `COPY … TO STDOUT` being read, with the runner of its connection (given back,
/// `None`, once it ended).
struct Reading<S> {
    runner: Option<Runner>,
    stream: Pin<Box<S>>,
}

impl<S, T> Reading<S>
where
    S: Stream<Item = std::result::Result<T, tokio_postgres::Error>>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        let Some(runner) = &self.runner else {
            return Poll::Ready(None);
        };
        let read = ready!(self.stream.as_mut().poll_next(cx));
        let item = runner.copy_out_read(read);
        if !matches!(item, Some(Ok(_))) {
            self.runner = None; // it ended: the connection goes back
        }
        Poll::Ready(item)
    }
}

impl CopyOut {
    /// Starts `sql` on the connection `runner` gives.
    pub(crate) async fn start(runner: Runner, sql: &str) -> Result<Self> {
        let stream = runner.copy_out_start(sql).await?;
        Ok(Self(Reading {
            runner: Some(runner),
            stream: Box::pin(stream),
        }))
    }
}

impl CopyOutRows {
    /// Starts `sql` on the connection `runner` gives, its rows decoded as `types`.
    pub(crate) async fn start(runner: Runner, sql: &str, types: &[Type]) -> Result<Self> {
        let stream = runner.copy_out_start(sql).await?;
        Ok(Self(Reading {
            runner: Some(runner),
            stream: Box::pin(BinaryCopyOutStream::new(stream, types)),
        }))
    }
}

impl Stream for CopyOut {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll(cx)
    }
}

impl Stream for CopyOutRows {
    type Item = Result<BinaryCopyOutRow>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll(cx)
    }
}

impl std::fmt::Debug for CopyOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOut")
            .field("open", &self.0.runner.is_some())
            .finish()
    }
}

impl std::fmt::Debug for CopyOutRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOutRows")
            .field("open", &self.0.runner.is_some())
            .finish()
    }
}
