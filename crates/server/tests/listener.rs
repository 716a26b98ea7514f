//! The connection layer over real TCP on 127.0.0.1: TLS, HTTP/1.1 and
//! HTTP/2, slowloris, head limits, graceful drain, the connection bound.
//! Every wait is bounded; no test takes more than a few seconds.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use peakstack_server::listener::{load_tls_config, plain_http_allowed, serve, ConnectionLimits};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// Longest any single wait in these tests may take.
const BOUND: Duration = Duration::from_secs(3);
const SLOW: Duration = Duration::from_millis(300);

fn app() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hi" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(SLOW).await;
                "slow done"
            }),
        )
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "never"
            }),
        )
        .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }))
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl Running {
    async fn start(limits: ConnectionLimits, tls: Option<Arc<rustls::ServerConfig>>) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app(), tls, limits, async move {
            let _ = stopped.await;
        }));
        Running { addr, stop: Some(stop), task }
    }

    async fn connect(&self) -> TcpStream {
        bounded(TcpStream::connect(self.addr)).await.expect("connect")
    }

    /// Triggers shutdown and waits (bounded) for `serve` to return.
    async fn stop(mut self) -> Duration {
        let started = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        bounded(&mut self.task).await.expect("serve task").expect("serve result");
        started.elapsed()
    }
}

async fn bounded<F: std::future::Future>(work: F) -> F::Output {
    tokio::time::timeout(BOUND, work).await.expect("a test step took longer than its bound")
}

fn get_request(path: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{connection}\r\n")
}

/// Everything the peer sends until it closes (a reset or TLS error counts as
/// a close); panics if it does not close within the bound.
async fn read_until_close<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    bounded(async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    all
}

/// One HTTP/1.1 answer with a Content-Length body, leaving the connection open.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> (u16, String) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    bounded(async {
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length {
                    let status = head.get(9..12).and_then(|s| s.parse().ok()).expect("a status line");
                    let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]).to_string();
                    return (status, body);
                }
            }
            let n = stream.read(&mut buf).await.expect("read an answer");
            assert!(n > 0, "closed before a whole answer: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

async fn request<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, path: &str) -> (u16, String) {
    stream.write_all(get_request(path, false).as_bytes()).await.expect("send a request");
    read_answer(stream).await
}

/// Whether the peer has closed (or sends nothing) within `wait`: `Some(bytes
/// received before the close)`, or `None` if it is still open after `wait`.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, wait: Duration) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.is_ok().then_some(all)
}

// --- 1. plain HTTP/1.1 ------------------------------------------------------

#[tokio::test]
async fn plain_http1_is_answered_with_the_peer_address() {
    let server = Running::start(ConnectionLimits::default(), None).await;

    let mut stream = server.connect().await;
    let me = stream.local_addr().expect("client addr");
    assert_eq!(request(&mut stream, "/hello").await, (200, "hi".to_owned()));
    // The same connection serves a second request (keep-alive).
    assert_eq!(request(&mut stream, "/peer").await, (200, me.to_string()));

    let mut stream = server.connect().await;
    stream.write_all(get_request("/hello", true).as_bytes()).await.expect("send");
    let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhi"), "{answer}");

    server.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_answered() {
    let server = Running::start(ConnectionLimits::default(), None).await;
    let stream = server.connect().await;
    let me = stream.local_addr().expect("client addr");
    let (status, body) = h2_get(stream, "http://localhost/peer").await;
    assert_eq!((status, body), (200, me.to_string()));
    server.stop().await;
}

async fn h2_get<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, uri: &str) -> (u16, String) {
    let (mut sender, conn) = bounded(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)))
        .await
        .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(uri).body(Empty::<Bytes>::new()).expect("request");
    let answer = bounded(sender.send_request(request)).await.expect("h2 answer");
    let status = answer.status().as_u16();
    let body = bounded(answer.into_body().collect()).await.expect("h2 body").to_bytes();
    drop(sender);
    let _ = bounded(driver).await;
    (status, String::from_utf8_lossy(&body).to_string())
}

// --- 2. TLS -----------------------------------------------------------------

struct Pki {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    cert_der: CertificateDer<'static>,
}

fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let cert = dir.join(format!("{name}.crt.pem"));
    let key = dir.join(format!("{name}.key.pem"));
    std::fs::write(&cert, generated.cert.pem()).expect("write cert");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write key");
    (cert, key, generated.cert.der().clone())
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, cert_der) = self_signed(dir.path(), "server");
    Pki { _dir: dir, cert, key, cert_der }
}

fn tls_client(trusted: &CertificateDer<'static>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).expect("trust the test cert");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    server: &Running,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = server.connect().await;
    let name = ServerName::try_from("localhost").expect("server name");
    bounded(tls_client(trusted, alpn).connect(name, tcp)).await.expect("TLS handshake")
}

#[tokio::test]
async fn tls_serves_http1_and_h2_and_plain_http_gets_no_answer() {
    let pki = pki();
    let config = load_tls_config(&pki.cert, &pki.key).expect("load the TLS config");
    assert_eq!(config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    let server = Running::start(ConnectionLimits::default(), Some(config)).await;

    // HTTP/1.1, chosen by ALPN.
    let mut tls = tls_connect(&server, &pki.cert_der, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(get_request("/hello", true).as_bytes()).await.expect("send over TLS");
    let answer = String::from_utf8(read_until_close(&mut tls).await).expect("utf-8");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhi"), "{answer}");

    // No ALPN at all: the first bytes tell HTTP/1.1.
    let mut tls = tls_connect(&server, &pki.cert_der, &[]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    assert_eq!(request(&mut tls, "/hello").await, (200, "hi".to_owned()));

    // HTTP/2, chosen by ALPN.
    let tls = tls_connect(&server, &pki.cert_der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(h2_get(tls, "https://localhost/hello").await, (200, "hi".to_owned()));

    // Plain HTTP to the TLS port: rustls answers with a fatal TLS alert
    // record (content type 21; decode_error) and the connection closes.
    let mut plain = server.connect().await;
    plain.write_all(get_request("/hello", true).as_bytes()).await.expect("send");
    let answer = read_until_close(&mut plain).await;
    assert!(!answer.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&answer));
    assert_eq!(answer.first(), Some(&21), "a TLS alert record: {answer:?}");

    server.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_and_does_not_block_others() {
    let pki = pki();
    let config = load_tls_config(&pki.cert, &pki.key).expect("load the TLS config");
    let limits = ConnectionLimits { tls_handshake_timeout: SLOW, ..ConnectionLimits::default() };
    let server = Running::start(limits, Some(config)).await;

    let started = Instant::now();
    let mut stalled = server.connect().await;
    let mut tls = tls_connect(&server, &pki.cert_der, &[b"http/1.1"]).await;
    assert_eq!(request(&mut tls, "/hello").await, (200, "hi".to_owned()));
    let closed = closed_within(&mut stalled, BOUND).await;
    assert_eq!(closed, Some(Vec::new()), "the stalled handshake is closed without a byte");
    assert!(started.elapsed() >= SLOW - Duration::from_millis(50), "closed by the timeout, not at once");

    server.stop().await;
}

// --- 3. load_tls_config errors ------------------------------------------------

fn tls_error(cert: &Path, key: &Path) -> String {
    match load_tls_config(cert, key) {
        Ok(_) => panic!("loading {} / {} should fail", cert.display(), key.display()),
        Err(error) => format!("{error:#}"),
    }
}

#[test]
fn tls_config_errors_name_the_file_and_the_problem() {
    let pki = pki();
    let dir = pki.cert.parent().expect("dir").to_path_buf();
    let missing = dir.join("missing.pem");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file\n").expect("write");
    let (_, other_key, _) = self_signed(&dir, "other");

    let error = tls_error(&missing, &pki.key);
    assert_eq!(error, format!("TLS certificate chain {}: no such file", missing.display()));

    let error = tls_error(&pki.cert, &missing);
    assert_eq!(error, format!("TLS private key {}: no such file", missing.display()));

    // A key where the certificate should be: no certificate in it.
    let error = tls_error(&pki.key, &pki.key);
    assert!(
        error.starts_with(&format!("TLS certificate chain {}: no certificate in it", pki.key.display())),
        "{error}"
    );
    let error = tls_error(&garbage, &pki.key);
    assert!(
        error.starts_with(&format!("TLS certificate chain {}: no certificate in it", garbage.display())),
        "{error}"
    );

    // A certificate where the key should be: no key in it.
    let error = tls_error(&pki.cert, &pki.cert);
    assert!(error.starts_with(&format!("TLS private key {}: no private key in it", pki.cert.display())), "{error}");

    let error = tls_error(&pki.cert, &other_key);
    assert_eq!(
        error,
        format!("TLS private key {}: does not match the certificate in {}", other_key.display(), pki.cert.display())
    );
}

// --- 4. slowloris -------------------------------------------------------------

#[tokio::test]
async fn slowloris_is_closed_without_an_answer_while_others_are_served() {
    let limits = ConnectionLimits { header_read_timeout: SLOW, ..ConnectionLimits::default() };
    let server = Running::start(limits, None).await;

    let started = Instant::now();
    let mut half = server.connect().await;
    half.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n").await.expect("send half a head");
    let mut silent = server.connect().await;

    let mut normal = server.connect().await;
    assert_eq!(request(&mut normal, "/hello").await, (200, "hi".to_owned()));

    // hyper closes the connection when the head deadline passes: no 408, no byte.
    assert_eq!(closed_within(&mut half, BOUND).await, Some(Vec::new()));
    assert_eq!(closed_within(&mut silent, BOUND).await, Some(Vec::new()));
    let took = started.elapsed();
    assert!(took >= SLOW - Duration::from_millis(50), "closed by the timeout, not at once ({took:?})");
    assert!(took < Duration::from_secs(2), "closed within ~2 s ({took:?})");

    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let limits = ConnectionLimits { header_read_timeout: SLOW, ..ConnectionLimits::default() };
    let server = Running::start(limits, None).await;

    let mut stream = server.connect().await;
    assert_eq!(request(&mut stream, "/hello").await, (200, "hi".to_owned()));
    let idle = Instant::now();
    assert_eq!(closed_within(&mut stream, BOUND).await, Some(Vec::new()));
    assert!(idle.elapsed() >= SLOW - Duration::from_millis(50), "{:?}", idle.elapsed());

    server.stop().await;
}

// --- 5. head limits -------------------------------------------------------------

/// A GET /hello head of exactly `len` bytes (a padding header makes up the length).
fn head_of_len(len: usize) -> Vec<u8> {
    let start = "GET /hello HTTP/1.1\r\nHost: localhost\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = len - start.len() - end.len();
    format!("{start}{}{end}", "a".repeat(pad)).into_bytes()
}

fn head_with_fields(fields: usize) -> Vec<u8> {
    let mut head = String::from("GET /hello HTTP/1.1\r\nHost: localhost\r\n");
    for i in 1..fields {
        head.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends `head`, reads to the close, returns the status (0 if no answer).
async fn status_of(server: &Running, head: &[u8], close: bool) -> u16 {
    let mut stream = server.connect().await;
    stream.write_all(head).await.expect("send");
    if !close {
        return read_answer(&mut stream).await.0;
    }
    let answer = read_until_close(&mut stream).await;
    String::from_utf8_lossy(&answer).get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn heads_beyond_the_byte_or_field_limit_get_431_and_a_close() {
    let limits = ConnectionLimits { max_header_bytes: 1024, max_headers: 10, ..ConnectionLimits::default() };
    let server = Running::start(limits, None).await;

    // The byte limit is exact: 1024 passes, 1025 does not.
    assert_eq!(status_of(&server, &head_of_len(1024), false).await, 200);
    let mut stream = server.connect().await;
    stream.write_all(&head_of_len(1025)).await.expect("send");
    let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
    // A problem+json answer, and the connection is closed after it.
    assert_problem(&answer, 431, "request_header_fields_too_large");

    // The field limit is exact too: 10 fields pass, 11 do not.
    assert_eq!(status_of(&server, &head_with_fields(10), false).await, 200);
    assert_eq!(status_of(&server, &head_with_fields(11), true).await, 431);

    server.stop().await;
}

#[tokio::test]
async fn the_default_head_limit_is_32_kib() {
    let server = Running::start(ConnectionLimits::default(), None).await;
    assert_eq!(status_of(&server, &head_of_len(32 * 1024), false).await, 200);

    // Far over the limit, hyper stops reading at 32 KiB, answers 431 and shuts
    // its side down: the answer arrives before the end of stream. (The client
    // may fail to write the rest, as the server never reads it.)
    let mut stream = server.connect().await;
    let _ = stream.write_all(&head_of_len(1024 * 1024)).await;
    let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
    assert_problem(&answer, 431, "request_header_fields_too_large");

    server.stop().await;
}

/// Asserts a whole answer (read to the close) is a problem+json `status`
/// with `code`, announced as the connection's last.
fn assert_problem(answer: &str, status: u16, code: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end in {answer:?}"));
    assert_eq!(head.get(9..12), Some(status.to_string().as_str()), "{answer}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\ncontent-type: application/problem+json\r\n"), "{answer}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{answer}");
    let problem: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    assert_eq!(problem["code"], code, "{answer}");
    assert_eq!(problem["status"], status, "{answer}");
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with(code)), "{answer}");
    for field in ["title", "detail"] {
        assert!(problem[field].as_str().is_some_and(|t| !t.is_empty()), "{field} in {answer}");
    }
}

#[tokio::test]
async fn malformed_heads_get_a_400_problem_and_a_close() {
    let server = Running::start(ConnectionLimits::default(), None).await;
    for head in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /hello HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /hel lo HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ] {
        let mut stream = server.connect().await;
        stream.write_all(head).await.expect("send");
        let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
        assert_problem(&answer, 400, "invalid_request");
    }
    // Both framings (request smuggling), in either order, also after a
    // chunked request on the same connection: refused before any route runs.
    for head in [
        &b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ] {
        let mut stream = server.connect().await;
        stream.write_all(head).await.expect("send");
        let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
        assert_problem(&answer, 400, "invalid_request");
        assert!(answer.contains("Content-Length and Transfer-Encoding"), "{answer}");
    }
    let mut stream = server.connect().await;
    let chunked = b"GET /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
    let smuggled =
        b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    stream.write_all(&[&chunked[..], smuggled].concat()).await.expect("send");
    let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
    let (first, rest) = answer.split_once("hi").unwrap_or_else(|| panic!("{answer}"));
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_problem(rest, 400, "invalid_request");

    // The connection's earlier answers are untouched, the bad one replaced.
    let mut stream = server.connect().await;
    stream.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n").await.expect("send");
    let answer = String::from_utf8(read_until_close(&mut stream).await).expect("utf-8");
    let (first, rest) = answer.split_once("hi").unwrap_or_else(|| panic!("{answer}"));
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_problem(rest, 400, "invalid_request");
    server.stop().await;
}

// --- 6. graceful shutdown -----------------------------------------------------------

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_then_refuses_new_connections() {
    let server = Running::start(ConnectionLimits::default(), None).await;
    let addr = server.addr;

    let mut slow = server.connect().await;
    slow.write_all(get_request("/slow", false).as_bytes()).await.expect("send");
    let mut idle = server.connect().await;
    assert_eq!(request(&mut idle, "/hello").await, (200, "hi".to_owned()));
    tokio::time::sleep(Duration::from_millis(100)).await; // /slow is in its handler now

    let stopping = tokio::spawn(server.stop());
    assert_eq!(read_answer(&mut slow).await, (200, "slow done".to_owned()));
    // Both connections are closed once they have nothing in flight.
    assert_eq!(closed_within(&mut slow, BOUND).await, Some(Vec::new()));
    assert_eq!(closed_within(&mut idle, BOUND).await, Some(Vec::new()));
    let took = bounded(stopping).await.expect("stop");
    assert!(took < Duration::from_secs(2), "{took:?}");

    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "connecting after shutdown must fail");
}

#[tokio::test]
async fn connections_still_busy_after_the_drain_timeout_are_cut() {
    let limits = ConnectionLimits { drain_timeout: SLOW, ..ConnectionLimits::default() };
    let server = Running::start(limits, None).await;

    let mut hanging = server.connect().await;
    hanging.write_all(get_request("/hang", false).as_bytes()).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let took = server.stop().await;
    assert!(took >= SLOW - Duration::from_millis(50) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(closed_within(&mut hanging, BOUND).await, Some(Vec::new()), "cut without an answer");
}

// --- 7. max_connections ---------------------------------------------------------

#[tokio::test]
async fn a_connection_past_the_limit_waits_until_one_closes() {
    let limits = ConnectionLimits { max_connections: 2, ..ConnectionLimits::default() };
    let server = Running::start(limits, None).await;

    let mut first = server.connect().await;
    let mut second = server.connect().await;
    assert_eq!(request(&mut first, "/hello").await, (200, "hi".to_owned()));
    assert_eq!(request(&mut second, "/hello").await, (200, "hi".to_owned()));

    // The kernel completes the TCP handshake, but nobody reads the request.
    let mut third = server.connect().await;
    third.write_all(get_request("/hello", false).as_bytes()).await.expect("send");
    assert_eq!(closed_within(&mut third, Duration::from_millis(500)).await, None, "the third must wait");

    drop(first);
    let waited = Instant::now();
    assert_eq!(read_answer(&mut third).await, (200, "hi".to_owned()));
    assert!(waited.elapsed() < Duration::from_secs(1), "{:?}", waited.elapsed());
    assert_eq!(request(&mut second, "/hello").await, (200, "hi".to_owned()));

    server.stop().await;
}

// --- 8. plain_http_allowed ----------------------------------------------------------

#[test]
fn plain_http_only_on_loopback_unless_allowed() {
    for addr in ["127.0.0.1:8080", "[::1]:8080", "127.1.2.3:80", "[::ffff:127.0.0.1]:80"] {
        let addr: SocketAddr = addr.parse().expect("addr");
        assert!(plain_http_allowed(&addr, false), "{addr}");
        assert!(plain_http_allowed(&addr, true), "{addr}");
    }
    for addr in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080", "[2001:db8::1]:443"] {
        let addr: SocketAddr = addr.parse().expect("addr");
        assert!(!plain_http_allowed(&addr, false), "{addr}");
        assert!(plain_http_allowed(&addr, true), "{addr}");
    }
}
