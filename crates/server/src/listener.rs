//! The connection layer: accepting, optional TLS, HTTP/1.1 and HTTP/2, and
//! the bounds that keep one client from holding the server.
//!
//! `axum::serve` has no TLS and no deadline for a request head, so a client
//! that trickles its head (slowloris) holds a connection for ever. [`serve`]
//! bounds every stage of a connection:
//!
//! | stage | bound |
//! | --- | --- |
//! | open connections | [`ConnectionLimits::max_connections`]; past it the accept loop waits |
//! | TLS handshake | [`ConnectionLimits::tls_handshake_timeout`] |
//! | first bytes (telling HTTP/2 from HTTP/1.1) | [`ConnectionLimits::header_read_timeout`] |
//! | each HTTP/1.1 request head, and the idle time before it | `header_read_timeout`; then hyper closes the connection without an answer |
//! | HTTP/1.1 head size and field count | [`ConnectionLimits::max_header_bytes`], [`ConnectionLimits::max_headers`]; past them the answer is 431 problem+json and the connection closes |
//! | HTTP/2 header list | `max_header_bytes`; streams per connection; a peer that stops answering pings is dropped |
//! | shutdown | [`ConnectionLimits::drain_timeout`]; then connections still busy are cut |
//!
//! Not bounded here: the time a client takes to send a request body or to read
//! an answer (a body timeout belongs in the router, where the body is read).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use bytes::{Buf, Bytes};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::head_errors::{HeadBounds, HeadErrors};

/// Bounds on every connection.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// A client must send its whole request head within this (slowloris). Default 10 s.
    ///
    /// It also bounds how long an idle HTTP/1.1 keep-alive connection waits
    /// for its next request, and how long a new connection may stay silent.
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers) in bytes; beyond it the answer is 431. Default 32 KiB.
    ///
    /// For HTTP/2 it is the largest header list (as RFC 9113 counts it).
    pub max_header_bytes: usize,
    /// Most header fields in one request; beyond it 431. Default 100. HTTP/1.1 only.
    pub max_headers: usize,
    /// Most open connections; past it the accept loop waits for one to close. Default 10_000.
    /// (0 counts as 1.)
    pub max_connections: usize,
    /// A TLS handshake must finish within this. Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// On shutdown, connections still busy after this are closed. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Sleep after a failed accept: the usual causes (out of file descriptors or
/// memory) persist for a while, and retrying at once would spin a core and
/// flood the log.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// hyper's own read buffer limit (8 KiB + 100 × 4 KiB); raised only when the
/// head limit is larger, so the head limit is the one that answers 431.
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;
/// RFC 9113 recommends allowing at least 100; each stream is a request in
/// flight that the server must answer.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 has no head deadline in hyper; pings at least drop a peer that has
/// gone away without closing.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1) and builds a rustls server config
/// offering ALPN h2 and http/1.1. Errors name the file and what is wrong with it (missing, no certificate in it, no key in it, key does not match).
pub fn load_tls_config(cert_pem: &Path, key_pem: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|error| pem_error(cert_pem, "TLS certificate chain", "certificate", error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(cert_pem, "TLS certificate chain", "certificate", error))?;
    if certs.is_empty() {
        anyhow::bail!(
            "TLS certificate chain {}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)",
            cert_pem.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|error| pem_error(key_pem, "TLS private key", "private key", error))?;

    // An explicit provider: with none installed process-wide, rustls would
    // have to guess, and panics if more than one is compiled in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS library offers no protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
                "TLS private key {}: does not match the certificate in {}",
                key_pem.display(),
                cert_pem.display()
            ),
            other => anyhow::anyhow!(
                "TLS certificate {} with private key {}: unusable: {other}",
                cert_pem.display(),
                key_pem.display()
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn pem_error(path: &Path, what: &str, item: &str, error: pem::Error) -> anyhow::Error {
    let why = match error {
        pem::Error::Io(io) if io.kind() == io::ErrorKind::NotFound => "no such file".to_owned(),
        pem::Error::Io(io) => format!("cannot read it: {io}"),
        pem::Error::NoItemsFound => {
            format!("no {item} in it (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)")
        }
        other => format!("not valid PEM: {other}"),
    };
    anyhow::anyhow!("{what} {}: {why}", path.display())
}

/// Whether plain HTTP may be served on `addr`: only loopback, unless the operator allowed it.
pub fn plain_http_allowed(addr: &SocketAddr, allow_plain_http: bool) -> bool {
    // to_canonical: ::ffff:127.0.0.1 is loopback too.
    allow_plain_http || addr.ip().to_canonical().is_loopback()
}

/// Serves `router` on `listener` until `shutdown` resolves: then stops accepting, lets every open connection finish its
/// request in flight (graceful shutdown of each hyper connection), waits at most `limits.drain_timeout`, and returns.
/// With `tls`, every connection does a TLS handshake first (in its own task, bounded by tls_handshake_timeout, so a slow
/// handshake never blocks accepting others). Serves HTTP/1.1 and HTTP/2 (by ALPN under TLS, else by the HTTP/2 preface).
/// Each request gets the extension `axum::extract::ConnectInfo<SocketAddr>` with the peer address.
///
/// Accept errors are logged and retried, never returned: the result is
/// always `Ok` once `shutdown` has resolved and the connections are drained.
/// Connection upgrades (WebSocket) are not offered: an upgraded stream would
/// escape the connection bound and the drain.
///
/// hyper's own HTTP/1.1 answers to heads it cannot parse become problem+json
/// (`head_errors`): an answer of `router` with status 400, 414 or 431 must
/// carry an `x-request-id` header (the API's middleware sets one on every
/// answer), or it is taken for hyper's and replaced.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(router, tls, &limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    // One signal for every connection: `true` means stop taking requests.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        // Reaped here so that finished tasks never pile up in the set.
        while let Some(done) = connections.try_join_next() {
            report_task_end(done);
        }
        let permit = tokio::select! {
            () = shutdown.as_mut() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break, // never closed; ending beats spinning
            },
        };
        let accepted = tokio::select! {
            () = shutdown.as_mut() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed; retrying shortly");
                tokio::select! {
                    () = shutdown.as_mut() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        connections.spawn(connection(tcp, peer, Arc::clone(&shared), stop_rx.clone(), permit));
    }

    // Closing the socket first, so that new clients are refused rather than
    // left waiting in the backlog through the drain.
    drop(listener);
    let _ = stop_tx.send(true);
    if !connections.is_empty() {
        tracing::info!(open = connections.len(), "draining connections");
    }
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while let Some(done) = connections.join_next().await {
            report_task_end(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            busy = connections.len(),
            drain_timeout = ?limits.drain_timeout,
            "connections still busy after the drain timeout: closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn report_task_end(done: Result<(), JoinError>) {
    if let Err(error) = done {
        if error.is_panic() {
            tracing::error!(%error, "a connection task panicked");
        }
    }
}

/// What every connection task needs, built once.
struct Shared {
    router: Router,
    tls: Option<TlsAcceptor>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    tls_handshake_timeout: Duration,
    head_bounds: HeadBounds,
}

impl Shared {
    fn new(router: Router, tls: Option<Arc<rustls::ServerConfig>>, limits: &ConnectionLimits) -> Shared {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            .max_headers(limits.max_headers)
            .max_buf_size(limits.max_header_bytes.max(HYPER_DEFAULT_MAX_BUF));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        Shared {
            router,
            tls: tls.map(TlsAcceptor::from),
            http1,
            http2,
            header_read_timeout: limits.header_read_timeout,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            head_bounds: HeadBounds { max_header_bytes: limits.max_header_bytes, max_headers: limits.max_headers },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// One connection, from accepted socket to close. Holds its permit until it
/// returns, which is what bounds the open connections.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let Some(acceptor) = shared.tls.clone() else {
        serve_io(tcp, None, peer, &shared, &mut stop).await;
        return;
    };
    let handshake = tokio::time::timeout(shared.tls_handshake_timeout, acceptor.accept(tcp));
    let tls = match until_stopped(handshake, &mut stop).await {
        None => return,
        Some(Ok(Ok(tls))) => tls,
        Some(Ok(Err(error))) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Some(Err(_elapsed)) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Some(Protocol::Http2),
        Some(b"http/1.1") => Some(Protocol::Http1),
        _ => None,
    };
    serve_io(tls, protocol, peer, &shared, &mut stop).await;
}

/// Serves HTTP on an established byte stream; `protocol` is `None` when the
/// client's first bytes must tell.
async fn serve_io<IO>(
    mut io: IO,
    protocol: Option<Protocol>,
    peer: SocketAddr,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, prefix) = match protocol {
        Some(protocol) => (protocol, Bytes::new()),
        None => {
            // hyper's head deadline starts only once it parses HTTP/1.1; a
            // client that never sends a byte must be bounded here.
            let sniffing = tokio::time::timeout(shared.header_read_timeout, sniff(&mut io));
            match until_stopped(sniffing, stop).await {
                None => return,
                Some(Ok(Ok(Some(sniffed)))) => sniffed,
                Some(Ok(Ok(None))) => return, // closed before sending anything
                Some(Ok(Err(error))) => {
                    tracing::debug!(%peer, %error, "reading the first bytes failed");
                    return;
                }
                Some(Err(_elapsed)) => {
                    tracing::debug!(%peer, "no request within the header read timeout");
                    return;
                }
            }
        }
    };
    let io = Rewind { prefix, io };
    let service = TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(shared.router.clone()));
    let served = match protocol {
        Protocol::Http1 => {
            let io = TokioIo::new(HeadErrors::new(io, shared.head_bounds));
            drive(shared.http1.serve_connection(io, service), stop).await
        }
        Protocol::Http2 => drive(shared.http2.serve_connection(TokioIo::new(io), service), stop).await,
    };
    if let Err(error) = served {
        // Client-side failures (resets, header timeouts, malformed heads) are
        // routine on a public port: not worth more than debug.
        tracing::debug!(%peer, ?protocol, %error, "connection ended with an error");
    }
}

/// Runs `conn` to its end; once stop is signalled, asks it to finish the
/// requests in flight and close (HTTP/1.1: after the current answer; HTTP/2:
/// GOAWAY, then the open streams).
async fn drive<C: GracefulConnection>(conn: C, stop: &mut watch::Receiver<bool>) -> Result<(), C::Error> {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return served,
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// `None` if stop is signalled first. Stop is only ever set once, and a
/// dropped sender means `serve` is gone: either way, stop.
async fn until_stopped<F: Future>(work: F, stop: &mut watch::Receiver<bool>) -> Option<F::Output> {
    tokio::select! {
        done = work => Some(done),
        _ = stop.changed() => None,
    }
}

/// Reads until the bytes either diverge from the HTTP/2 preface (HTTP/1.1) or
/// complete it (HTTP/2); returns what was read, to be replayed to hyper.
/// `None` if the client closed before sending anything.
async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Option<(Protocol, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        let read = io.read(&mut buf[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            // A fragment of the preface and then EOF: hyper will find the
            // head incomplete and close.
            return Ok(Some((Protocol::Http1, Bytes::copy_from_slice(&buf[..filled]))));
        }
        filled += read;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok(Some((Protocol::Http1, Bytes::copy_from_slice(&buf[..filled]))));
        }
        if filled == H2_PREFACE.len() {
            return Ok(Some((Protocol::Http2, Bytes::copy_from_slice(&buf))));
        }
    }
}

/// A stream that first replays bytes already read from it.
struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() && buf.remaining() > 0 {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_tells_http2_preface_from_http1() {
        let mut h2 = &H2_PREFACE[..];
        assert_eq!(sniff(&mut h2).await.ok().flatten().map(|(p, _)| p), Some(Protocol::Http2));
        let mut h1: &[u8] = b"PRI * HTTP/1.1\r\n";
        let sniffed = sniff(&mut h1).await.ok().flatten();
        assert_eq!(sniffed, Some((Protocol::Http1, Bytes::from_static(b"PRI * HTTP/1.1\r\n"))));
        let mut empty: &[u8] = b"";
        assert_eq!(sniff(&mut empty).await.ok().flatten(), None);
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_the_rest() {
        let mut rewound = Rewind { prefix: Bytes::from_static(b"GET "), io: &b"/ HTTP/1.1"[..] };
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.ok();
        assert_eq!(all, b"GET / HTTP/1.1");
    }
}
