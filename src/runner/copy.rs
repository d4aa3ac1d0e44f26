//! COPY through the runner. `COPY … FROM STDIN`: text or CSV read from an `AsyncRead`,
//! or typed rows in the binary format; one request that, inside a transaction, holds
//! the transaction's turn from start to end. `COPY … TO STDOUT`: started here, its data
//! read later, chunk by chunk. Either way, dropped half-way, the request stays open, so
//! the connection is cleaned before reuse and the transaction cannot commit.

use std::pin::pin;

use bytes::BytesMut;
use futures::SinkExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_postgres::CopyOutStream;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{Runner, sent_in_turn};
use crate::error::{Error, ErrorKind, Result};

/// How much of the reader's data is sent at a time.
const CHUNK: usize = 64 * 1024;

impl Runner {
    /// Runs `sql` (a `COPY … FROM STDIN`, text or CSV) with the data of `reader`;
    /// returns the rows copied.
    pub(crate) async fn copy_in<R>(&self, sql: &str, mut reader: R) -> Result<u64>
    where
        R: AsyncRead + Unpin + Send,
    {
        let result = async {
            let _permit = self.admit().await?;
            let _turn = self.turn().await;
            let connection = self.connection();
            connection
                .guarded(async {
                    let mut sink = pin!(connection.client().copy_in(sql).await?);
                    let mut buffer = BytesMut::with_capacity(CHUNK);
                    loop {
                        buffer.reserve(CHUNK);
                        let read = reader.read_buf(&mut buffer).await.map_err(|e| {
                            Error::new(
                                ErrorKind::InvalidInput,
                                format!("reading the data to COPY failed: {e}"),
                            )
                        })?;
                        if read == 0 {
                            break;
                        }
                        sink.send(buffer.split().freeze()).await?;
                    }
                    Ok(sink.as_mut().finish().await?)
                })
                .await
        }
        .await;
        self.noted(result)
    }

    /// Runs `sql` (a `COPY … FROM STDIN (FORMAT binary)`) with `rows`, each of the
    /// column `types`; returns the rows copied.
    pub(crate) async fn copy_in_rows<'a, I, R>(
        &self,
        sql: &str,
        types: &[Type],
        rows: I,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = R>,
        I::IntoIter: Send,
        R: AsRef<[&'a (dyn ToSql + Sync)]> + Send,
    {
        let result = async {
            let _permit = self.admit().await?;
            let _turn = self.turn().await;
            let connection = self.connection();
            connection
                .guarded(async {
                    let sink = connection.client().copy_in(sql).await?;
                    let mut writer = pin!(BinaryCopyInWriter::new(sink, types));
                    for row in rows {
                        let row = row.as_ref();
                        if row.len() != types.len() {
                            return Err(Error::invalid_input(format!(
                                "a COPY row has {} values for {} columns",
                                row.len(),
                                types.len()
                            )));
                        }
                        writer.as_mut().write(row).await?;
                    }
                    Ok(writer.as_mut().finish().await?)
                })
                .await
        }
        .await;
        self.noted(result)
    }

    /// Starts `sql` (a `COPY … TO STDOUT`); its data is read with
    /// [`copy_out_read`](Self::copy_out_read). Until the last of it is read, the request
    /// stays open: dropped before that, it is cancelled.
    pub(crate) async fn copy_out_start(&self, sql: &str) -> Result<CopyOutStream> {
        let result = async {
            let _permit = self.admit().await?;
            let turn = self.turn().await;
            let connection = self.connection();
            let start = std::pin::pin!(async { Ok(connection.client().copy_out(sql).await?) });
            connection.guarded(sent_in_turn(turn, start)).await
        }
        .await;
        let stream = self.noted(result)?;
        self.connection().set_request_open(true);
        Ok(stream)
    }

    /// Records what reading a `COPY … TO STDOUT` gave: the end, or an error of the
    /// statement, finishes the request; any other failure leaves it open, to be
    /// cancelled when dropped.
    pub(crate) fn copy_out_read<T>(
        &self,
        read: Option<std::result::Result<T, tokio_postgres::Error>>,
    ) -> Option<Result<T>> {
        match read {
            None => {
                self.connection().set_request_open(false);
                None
            }
            Some(Ok(data)) => Some(Ok(data)),
            Some(Err(error)) => {
                if error.as_db_error().is_some() {
                    self.connection().set_request_open(false);
                }
                Some(self.noted(Err(Error::from(error))))
            }
        }
    }
}
