//! A loopback TCP proxy that delays every chunk by a fixed latency each way,
//! and counts round trips: a client→server write burst that follows data
//! from the server is one round trip.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

/// Chunks in flight per direction before the reader waits.
const IN_FLIGHT: usize = 1024;
/// Most bursts kept (the oldest are dropped beyond this).
const MAX_BURSTS: usize = 10_000_000;

/// A running proxy; stops when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    bursts: Arc<Mutex<Vec<SystemTime>>>,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bursts = Arc::new(Mutex::new(Vec::new()));
        let counted = bursts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, delay, counted).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            bursts,
            accept,
        })
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Round trips that started between `from` and `to`, over all connections.
    pub fn round_trips_between(&self, from: SystemTime, to: SystemTime) -> usize {
        let bursts = self.bursts.lock().expect("burst log poisoned");
        bursts.iter().filter(|t| **t >= from && **t <= to).count()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays both directions of one connection until either side closes.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    bursts: Arc<Mutex<Vec<SystemTime>>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whether the server spoke last: the client's next write starts a round trip.
    let server_spoke = Arc::new(AtomicBool::new(true));

    let up = {
        let server_spoke = server_spoke.clone();
        pipe(client_read, server_write, delay, move || {
            if server_spoke.swap(false, Ordering::SeqCst) {
                let mut bursts = bursts.lock().expect("burst log poisoned");
                if bursts.len() < MAX_BURSTS {
                    bursts.push(SystemTime::now());
                }
            }
        })
    };
    let down = pipe(server_read, client_write, delay, move || {
        server_spoke.store(true, Ordering::SeqCst);
    });
    tokio::join!(up, down);
}

/// Copies `from` to `to`, delivering each chunk `delay` after it was read.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
    on_chunk: impl Fn(),
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    on_chunk();
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
