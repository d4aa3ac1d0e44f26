//! Cancelling the request running on a connection, and knowing when the server has
//! acted on it.
//!
//! `tokio-postgres`'s `cancel_query` returns once the cancel request is written; the
//! server signals the session later. A cancel that lands late hits whatever the
//! session runs next, which may be the next user's query. The protocol says the server
//! closes the cancel connection once it has processed the request, so [`Canceller`]
//! has tokio-postgres send it over a socket that, on shutdown, waits for that close.
//! From then on the session has the signal: it cancels the abandoned request, or is
//! dropped by the server if it came when the session was idle.
//!
//! Where the cancel goes: a session that must use TLS (`sslmode` `require`,
//! `verify-ca`, `verify-full`) is cancelled through the driver, which connects to the
//! very address the session is on; the TLS connector wraps that socket so that its
//! shutdown still waits. Other sessions are cancelled at the [`ServerAddress`] of the
//! host they reached (the engine connects host by host when there are several):
//! `hostaddr`, an IP address or a unix socket are exact, but a host name is resolved
//! again (the driver does not tell which address a plaintext session is on), so with
//! round-robin DNS give `hostaddr` to pin it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::CancelToken;
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;

use crate::tls::Connector;

/// Sends cancel requests to the servers of one engine.
pub(crate) struct Canceller {
    /// The most a cancel may take, connecting included.
    timeout: Duration,
    /// The sessions' TLS connector: a cancel is encrypted when the session is.
    tls: Connector,
    /// Every session uses TLS, so the driver's own route to its address can be used.
    #[cfg(feature = "tls")]
    tls_required: bool,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Where one server takes cancel requests, and the host name TLS checks there.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServerAddress {
    route: Route,
    hostname: String,
}

impl ServerAddress {
    /// The one address of a single-host configuration: `hostaddr` over `host`, a unix
    /// socket directory as `<dir>/.s.PGSQL.<port>`; `None` with several hosts.
    pub(crate) fn of(pg: &tokio_postgres::Config) -> Option<Self> {
        let port = match pg.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return None,
        };
        let address = |ip: &IpAddr| Route::Address(SocketAddr::new(*ip, port));
        let route = match (pg.get_hosts(), pg.get_hostaddrs()) {
            ([] | [_], [ip]) => address(ip),
            ([Host::Tcp(name)], []) => Route::Name(name.clone(), port),
            #[cfg(unix)]
            ([Host::Unix(dir)], []) => Route::Socket(dir.join(format!(".s.PGSQL.{port}"))),
            _ => return None,
        };
        let hostname = match pg.get_hosts() {
            [Host::Tcp(name)] => name.clone(),
            _ => String::new(),
        };
        Some(Self { route, hostname })
    }
}

/// One server address.
#[derive(Debug, Clone, PartialEq)]
enum Route {
    Address(SocketAddr),
    Name(String, u16),
    #[cfg(unix)]
    Socket(PathBuf),
}

impl Canceller {
    /// A canceller for the server(s) `pg` connects to (without TLS support, only the
    /// timeout and the connector matter).
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    pub(crate) fn new(pg: &tokio_postgres::Config, timeout: Duration, tls: Connector) -> Self {
        Self {
            timeout,
            tls,
            #[cfg(feature = "tls")]
            tls_required: pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require,
        }
    }

    /// Cancels the request running under `token`, on a session of the server at
    /// `server`, and returns `true` once the server has signalled the session; `false`
    /// when that cannot be known (the request is still cancelled if possible), and the
    /// session must not be reused.
    pub(crate) async fn cancel(&self, token: &CancelToken, server: Option<&ServerAddress>) -> bool {
        #[cfg(feature = "tls")]
        if self.tls_required {
            let sent = async {
                token
                    .cancel_query(closing::CancelTls(self.tls.clone()))
                    .await
                    .map_err(io::Error::other)
            };
            return self.acted_on(tokio::time::timeout(self.timeout, sent).await);
        }
        let Some(server) = server else {
            let _ = tokio::time::timeout(self.timeout, token.cancel_query(self.tls.clone())).await;
            return false;
        };
        let hostname = &server.hostname;
        let sent = async {
            match &server.route {
                Route::Address(address) => {
                    self.send(token, hostname, TcpStream::connect(address).await?)
                        .await
                }
                Route::Name(host, port) => {
                    let stream = TcpStream::connect((host.as_str(), *port)).await?;
                    self.send(token, hostname, stream).await
                }
                #[cfg(unix)]
                Route::Socket(path) => {
                    self.send(token, hostname, UnixStream::connect(path).await?)
                        .await
                }
            }
        };
        self.acted_on(tokio::time::timeout(self.timeout, sent).await)
    }

    /// Whether a cancel request, sent within the timeout or not, was acted on.
    fn acted_on(
        &self,
        sent: std::result::Result<io::Result<()>, tokio::time::error::Elapsed>,
    ) -> bool {
        match sent {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(target: "pgengine::pool", error = %e, "a cancel request failed");
                false
            }
            Err(_) => {
                tracing::warn!(target: "pgengine::pool", timeout = ?self.timeout, "a cancel request timed out");
                false
            }
        }
    }

    /// Sends the cancel request over `stream` (over TLS when the session's `sslmode`
    /// asks for it) and waits until the server closes it.
    async fn send<S>(&self, token: &CancelToken, hostname: &str, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls =
            MakeTlsConnect::<ClosedByServer<S>>::make_tls_connect(&mut self.tls.clone(), hostname)
                .map_err(io::Error::other)?;
        token
            .cancel_query_raw(ClosedByServer::new(stream), tls)
            .await
            .map_err(io::Error::other)
    }
}

/// A stream whose shutdown, after closing its write half, reads until the peer closes
/// too.
///
/// Over TLS the server may close (with a reset, as our `close_notify` is left unread)
/// before the client's shutdown has written its `close_notify`; once the server has
/// answered anything (the handshake), a reset or broken pipe is taken as its close.
struct ClosedByServer<S> {
    inner: S,
    write_closed: bool,
    /// The server has sent something.
    answered: bool,
    /// The server has closed the connection.
    peer_closed: bool,
}

impl<S> ClosedByServer<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            write_closed: false,
            answered: false,
            peer_closed: false,
        }
    }

    /// Whether `error` says the peer has closed the connection.
    fn closed_by_peer(error: &io::Error) -> bool {
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClosedByServer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.answered |= buf.filled().len() > before;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClosedByServer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.peer_closed {
            return Poll::Ready(Ok(buf.len()));
        }
        match ready!(Pin::new(&mut self.inner).poll_write(cx, buf)) {
            Err(e) if self.answered && Self::closed_by_peer(&e) => {
                self.peer_closed = true;
                Poll::Ready(Ok(buf.len()))
            }
            written => Poll::Ready(written),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_closed {
            return Poll::Ready(Ok(()));
        }
        if !self.write_closed {
            match ready!(Pin::new(&mut self.inner).poll_shutdown(cx)) {
                Err(e) if Self::closed_by_peer(&e) => return Poll::Ready(Ok(())),
                result => result?,
            }
            self.write_closed = true;
        }
        let mut scratch = [0u8; 64];
        loop {
            let mut unread = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.inner).poll_read(cx, &mut unread)) {
                Err(e) if Self::closed_by_peer(&e) => return Poll::Ready(Ok(())),
                result => result?,
            }
            if unread.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(feature = "tls")]
mod closing {
    //! A TLS connector for the driver's own cancel route whose streams wait for the
    //! server's close on shutdown.

    use tokio_postgres::Socket;
    use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

    use super::ClosedByServer;
    use crate::tls::Connector;

    type Inner = <Connector as MakeTlsConnect<ClosedByServer<Socket>>>::TlsConnect;

    /// Makes TLS connections over a [`ClosedByServer`] socket.
    pub(super) struct CancelTls(pub(super) Connector);

    /// One such connection.
    pub(super) struct CancelTlsConnect(Inner);

    impl MakeTlsConnect<Socket> for CancelTls {
        type Stream = <Inner as TlsConnect<ClosedByServer<Socket>>>::Stream;
        type TlsConnect = CancelTlsConnect;
        type Error = <Connector as MakeTlsConnect<ClosedByServer<Socket>>>::Error;

        fn make_tls_connect(&mut self, hostname: &str) -> Result<CancelTlsConnect, Self::Error> {
            MakeTlsConnect::<ClosedByServer<Socket>>::make_tls_connect(&mut self.0, hostname)
                .map(CancelTlsConnect)
        }
    }

    impl TlsConnect<Socket> for CancelTlsConnect {
        type Stream = <Inner as TlsConnect<ClosedByServer<Socket>>>::Stream;
        type Error = <Inner as TlsConnect<ClosedByServer<Socket>>>::Error;
        type Future = <Inner as TlsConnect<ClosedByServer<Socket>>>::Future;

        fn connect(self, stream: Socket) -> Self::Future {
            self.0.connect(ClosedByServer::new(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(conninfo: &str) -> Option<Route> {
        ServerAddress::of(&conninfo.parse().unwrap()).map(|server| server.route)
    }

    #[test]
    fn a_single_host_has_one_route() {
        assert_eq!(
            route("postgres://u@db.example:6543/app"),
            Some(Route::Name("db.example".into(), 6543))
        );
        assert_eq!(
            route("host=db hostaddr=10.0.0.7 user=u"),
            Some(Route::Address("10.0.0.7:5432".parse().unwrap()))
        );
        assert_eq!(
            route("host=/run/postgresql port=5433 user=u"),
            Some(Route::Socket("/run/postgresql/.s.PGSQL.5433".into()))
        );
    }

    #[test]
    fn several_hosts_have_no_single_route() {
        assert_eq!(route("postgres://u@a:1,b:2/app"), None);
        assert_eq!(route("host=a,b user=u"), None);
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_peer_to_close() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(64);
        let mut client = ClosedByServer::new(client);
        client.write_all(b"cancel").await.unwrap();
        let shutdown = tokio::spawn(async move { client.shutdown().await });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!shutdown.is_finished(), "returned before the peer closed");
        drop(server);
        shutdown.await.unwrap().unwrap();
    }
}
