//! `peakstack loadtest`: an HTTP/1.1 load generator for a peakstack server on
//! this machine.
//!
//! Server and load generator usually share two cores, so the client side is
//! kept as cheap as possible: every worker owns one keep-alive connection
//! (hyper's low-level `http1` client over a `TcpStream` with TCP_NODELAY),
//! request bodies are written with `write!` into a `String` instead of going
//! through serde, and every worker keeps its own counters and latency
//! histogram, merged once at the end.
//!
//! Counting rules (in the units of `ops`: transfers for `transfers`, requests
//! for `healthz`):
//! - `requests`: HTTP requests that got a response, whatever its status.
//! - `ops`: operations the server accepted (2xx, and for a batch every result
//!   whose status is not `"error"`).
//! - `errors`: operations that did not succeed: non-2xx responses, per-transfer
//!   errors inside a batch, and requests lost to a transport error. So
//!   `ops + errors` is every operation attempted.
//! - latency: one sample per response, from sending the request to having read
//!   the whole response body.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

mod checkout;
mod flash_sale;
pub use checkout::{run_checkout, CheckoutLoadConfig};
pub use flash_sale::{run_flash_sale, FlashSaleLoadConfig};

static IDEMPOTENCY_KEY: hyper::header::HeaderName = hyper::header::HeaderName::from_static("idempotency-key");

// Upper bounds on the knobs, so a typo cannot exhaust file descriptors or
// memory, or run for days.
const MAX_CONCURRENCY: usize = 1_024;
const MAX_SECONDS: f64 = 86_400.0;
const MAX_BATCH: usize = 10_000;
const MAX_ACCOUNTS: usize = 10_000_000;

const CURRENCY: &str = "USD";
const MAX_AMOUNT_MINOR: u64 = 1_000;
/// Accounts are created with this many requests in flight: enough to hide
/// loopback latency without swamping a server that shares our two cores.
const SETUP_CONCURRENCY: usize = 64;
/// Transport failures while creating one account are retried this often.
const SETUP_ATTEMPTS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a single request outside the timed phase (setup, health check,
/// invariant pages).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests still in flight at the deadline get this long to finish: the
/// invariant check afterwards needs a quiet ledger, and a request dropped
/// half-way may still be applied while we page through the accounts.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a transport error so a dead server does not turn every worker
/// into a busy loop of failing connects.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// Latencies above this are clamped (hdrhistogram needs a bound).
const HISTOGRAM_MAX_US: u64 = 60_000_000;
const HISTOGRAM_SIGFIGS: u8 = 3;
const ACCOUNTS_PAGE_LIMIT: usize = 1_000;
/// 100k pages of 1000 = 10^8 accounts; more means the cursor is broken.
const MAX_ACCOUNT_PAGES: usize = 100_000;
/// The ledger is summed page by page, not from a snapshot, so a transfer
/// applied while we page (another client, a straggler) can make one pass look
/// unbalanced. A real violation persists; a race does not.
const INVARIANT_ATTEMPTS: usize = 3;
const INVARIANT_RETRY_PAUSE: Duration = Duration::from_millis(500);
const BODY_SNIPPET_BYTES: usize = 200;

/// What the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Random transfers between freshly created accounts.
    Transfers,
    /// `GET /healthz`: the cost of the HTTP stack alone.
    Healthz,
}

impl FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Scenario> {
        match text {
            "transfers" => Ok(Scenario::Transfers),
            "healthz" => Ok(Scenario::Healthz),
            other => bail!("unknown scenario {other:?} (expected transfers or healthz)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadtestConfig {
    pub scenario: Scenario,
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`. Loopback only.
    pub target: String,
    /// Workers, each with its own keep-alive connection.
    pub concurrency: usize,
    pub seconds: f64,
    /// Transfers per request: 1 uses `POST /v1/transfers`, more uses
    /// `POST /v1/transfers/batch`.
    pub batch: usize,
    /// Accounts created before the `transfers` run.
    pub accounts: usize,
    pub json: bool,
    /// Show progress bars on stderr (pass true only when it is a terminal).
    pub progress: bool,
    /// Sent as `Authorization: Bearer <key>` on every request.
    pub api_key: Option<String>,
    /// Send a fresh `Idempotency-Key` with every request of the timed phase
    /// (what a Stripe-style client does), to measure what keys cost.
    pub idempotency_keys: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadtestSummary {
    pub requests: u64,
    pub ops: u64,
    pub errors: u64,
    /// Measured wall time of the timed phase, including the drain of requests
    /// in flight at the deadline.
    pub seconds: f64,
    pub requests_per_s: f64,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// `Some(sum of credits == sum of debits)` over all accounts after a
    /// `transfers` run; `None` for `healthz` or when the check could not run.
    pub invariants_ok: Option<bool>,
    /// Whether every request of the timed phase carried a fresh
    /// `Idempotency-Key`.
    pub idempotency_keys: bool,
}

impl LoadtestSummary {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "ops": self.ops,
            "errors": self.errors,
            "seconds": self.seconds,
            "requests_per_s": self.requests_per_s,
            "ops_per_s": self.ops_per_s,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "invariants_ok": self.invariants_ok,
            "idempotency_keys": self.idempotency_keys,
        })
    }

    pub fn print_human(&self) {
        print!("{}", self.human_text());
    }

    fn human_text(&self) -> String {
        let invariants = match self.invariants_ok {
            Some(true) => "ok (sum of debits == sum of credits)",
            Some(false) => "VIOLATED (sum of debits != sum of credits)",
            None => "not checked",
        };
        format!(
            "duration      {:.2} s\n\
             requests      {} ({:.1} req/s)\n\
             ops           {} ({:.1} ops/s)\n\
             errors        {}\n\
             latency p50   {}\n\
             latency p99   {}\n\
             latency p99.9 {}\n\
             latency max   {}\n\
             invariants    {}\n\
             keys          {}\n",
            self.seconds,
            self.requests,
            self.requests_per_s,
            self.ops,
            self.ops_per_s,
            self.errors,
            format_latency(self.p50_us),
            format_latency(self.p99_us),
            format_latency(self.p999_us),
            format_latency(self.max_us),
            invariants,
            if self.idempotency_keys { "a fresh Idempotency-Key per request" } else { "none" },
        )
    }
}

fn format_latency(latency_us: u64) -> String {
    if latency_us < 1_000 {
        format!("{latency_us} us")
    } else {
        // Whole microseconds, shown as milliseconds with three decimals; no
        // float rounding surprises.
        format!("{}.{:03} ms", latency_us / 1_000, latency_us % 1_000)
    }
}

/// Runs the load test described by `config` and returns its summary.
pub async fn run(config: LoadtestConfig) -> anyhow::Result<LoadtestSummary> {
    let duration = validate(&config)?;
    // Bars would only garble a terminal that also shows the JSON.
    let progress = config.progress && !config.json;
    let endpoint = open_endpoint(&config.target, config.api_key.as_deref()).await?;
    let mut probe = HttpConn::new(endpoint.clone());
    check_health(&mut probe).await?;

    let run_id = new_run_id();
    if config.scenario == Scenario::Transfers {
        create_accounts(&endpoint, &run_id, config.accounts, progress).await?;
    }

    let context = Arc::new(RunContext {
        scenario: config.scenario,
        run_id,
        accounts: config.accounts,
        batch: config.batch,
        endpoint: endpoint.clone(),
        requests_done: Arc::default(),
        idempotency_keys: config.idempotency_keys,
    });
    let (totals, elapsed) = run_scenario(&context, config.concurrency, duration, progress).await?;
    if let Some(first_error) = &totals.first_error {
        eprintln!("loadtest: {} errors; first: {first_error}", totals.errors);
    }

    let invariants_ok = match config.scenario {
        Scenario::Healthz => None,
        Scenario::Transfers => match ledger_balanced(&mut probe).await {
            Ok(balanced) => Some(balanced),
            Err(error) => {
                eprintln!("loadtest: invariant check could not run: {error:#}");
                None
            }
        },
    };

    let mut summary = summarize(&totals.latency_us, totals.requests, totals.ops, totals.errors, elapsed, invariants_ok);
    summary.idempotency_keys = config.idempotency_keys;
    Ok(summary)
}

/// The endpoint `target` names, with `Authorization: Bearer <api_key>` on
/// every request when a key is given.
async fn open_endpoint(target: &str, api_key: Option<&str>) -> anyhow::Result<Arc<Endpoint>> {
    let parsed = parse_target(target)?;
    let mut endpoint = Endpoint::resolve(target, &parsed).await?;
    if let Some(key) = api_key {
        let value = HeaderValue::from_str(&format!("Bearer {key}")).context("--api-key: not a valid header value")?;
        endpoint.authorization = Some(value);
    }
    Ok(Arc::new(endpoint))
}

/// The timed phase of the `transfers` and `healthz` scenarios: every
/// worker's totals merged, and the phase's wall time.
async fn run_scenario(
    context: &Arc<RunContext>,
    concurrency: usize,
    duration: Duration,
    progress: bool,
) -> anyhow::Result<(WorkerTotals, Duration)> {
    let conns = connect_workers(&context.endpoint, concurrency).await?;
    let worker_context = context.clone();
    let (per_worker, elapsed) =
        run_timed(conns, duration, progress, context.requests_done.clone(), move |worker, conn, deadline| {
            run_worker(worker_context.clone(), worker, conn, deadline)
        })
        .await?;
    let mut totals = WorkerTotals::new();
    for worker_totals in per_worker {
        totals.merge(worker_totals)?;
    }
    Ok((totals, elapsed))
}

/// One connection per worker, connected before the clock starts so that
/// connection setup is not billed to the run.
async fn connect_workers(endpoint: &Arc<Endpoint>, concurrency: usize) -> anyhow::Result<Vec<HttpConn>> {
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut conn = HttpConn::new(endpoint.clone());
        conn.ensure_connected().await?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Runs `worker` on each connection until `duration` has passed (each
/// worker stops by itself at the deadline it is given), with a progress
/// bar fed by `requests_done`. Returns what each worker returned and the
/// wall time, stopped before the caller merges anything.
async fn run_timed<T, F, Fut>(
    conns: Vec<HttpConn>,
    duration: Duration,
    progress: bool,
    requests_done: Arc<AtomicU64>,
    worker: F,
) -> anyhow::Result<(Vec<T>, Duration)>
where
    T: Send + 'static,
    F: Fn(usize, HttpConn, Instant) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let concurrency = conns.len();
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        workers.spawn(worker(index, conn, deadline));
    }
    let bar = run_bar(progress, duration);
    let ticker = progress.then(|| tokio::spawn(tick_progress(bar.clone(), requests_done, start, deadline)));

    let mut per_worker = Vec::with_capacity(concurrency);
    while let Some(joined) = workers.join_next().await {
        per_worker.push(joined.context("load worker panicked")?);
    }
    // Stop the clock before merging: adding up 64 histograms takes
    // milliseconds that are not part of the load.
    let elapsed = start.elapsed();
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    bar.finish_and_clear();
    Ok((per_worker, elapsed))
}

fn validate(config: &LoadtestConfig) -> anyhow::Result<Duration> {
    let duration = validate_load(config.concurrency, config.seconds)?;
    if !(1..=MAX_BATCH).contains(&config.batch) {
        bail!("--batch must be between 1 and {MAX_BATCH}, got {}", config.batch);
    }
    if config.scenario == Scenario::Transfers && !(2..=MAX_ACCOUNTS).contains(&config.accounts) {
        bail!("--accounts must be between 2 and {MAX_ACCOUNTS} (a transfer needs two), got {}", config.accounts);
    }
    Ok(duration)
}

/// Checks the knobs every scenario has; the timed phase's length.
fn validate_load(concurrency: usize, seconds: f64) -> anyhow::Result<Duration> {
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        bail!("--concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}");
    }
    if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
        bail!("--seconds must be greater than 0 and at most {MAX_SECONDS}, got {seconds}");
    }
    Duration::try_from_secs_f64(seconds).with_context(|| format!("invalid --seconds {seconds}"))
}

// ---------------------------------------------------------------------------
// Target URL

#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetUrl {
    /// Host name or IP address, without IPv6 brackets.
    host: String,
    port: u16,
    /// Path prefix without trailing slash: "" or e.g. "/ledger".
    base_path: String,
}

impl TargetUrl {
    /// The `Host` header value.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `http://host[:port][/prefix]`; the scheme may be left out.
fn parse_target(url: &str) -> anyhow::Result<TargetUrl> {
    let trimmed = url.trim();
    let rest = match trimmed.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            bail!("unsupported scheme {scheme:?} in target {url:?}: only http:// is supported")
        }
        None => trimmed,
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if authority.contains('@') {
        bail!("target {url:?} must not contain user info");
    }
    let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) =
            bracketed.split_once(']').ok_or_else(|| anyhow!("target {url:?}: unterminated '[' in IPv6 address"))?;
        let port_text = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| anyhow!("target {url:?}: expected ':' after ']'"))?),
        };
        (host, port_text)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let host_ok =
        !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !host_ok {
        bail!("target {url:?}: invalid host {host:?}");
    }
    let port = match port_text {
        None => 80,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| anyhow!("target {url:?}: invalid port {text:?}"))?,
    };
    let path_ok = path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~'));
    if !path_ok {
        bail!("target {url:?}: the path may only hold a plain prefix such as /ledger");
    }
    Ok(TargetUrl { host: host.to_owned(), port, base_path: path.trim_end_matches('/').to_owned() })
}

/// Where requests go, with the URIs and headers prepared once.
struct Endpoint {
    /// The target as the user wrote it, for messages.
    url: String,
    /// `http://host:port`, to which request paths are appended in messages.
    origin: String,
    addr: SocketAddr,
    host_header: HeaderValue,
    /// `Bearer <key>`, when the server checks API keys.
    authorization: Option<HeaderValue>,
    base_path: String,
    healthz_uri: Uri,
    transfers_uri: Uri,
    batch_uri: Uri,
}

impl Endpoint {
    async fn resolve(url: &str, target: &TargetUrl) -> anyhow::Result<Endpoint> {
        let url = url.trim().trim_end_matches('/').to_owned();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("cannot resolve {url}"))?
            .collect();
        // This tool generates a lot of traffic: it only ever aims at this
        // machine, never at anything reachable over a network.
        let loopback: Vec<SocketAddr> = addrs.iter().copied().filter(|addr| addr.ip().is_loopback()).collect();
        let Some(&first) = loopback.first() else {
            bail!(
                "refusing to load-test {url}: it does not resolve to a loopback address \
                 (got {addrs:?}); only targets on this machine are allowed"
            );
        };
        // `localhost` often resolves to both ::1 and 127.0.0.1 while the
        // server listens on only one: take the first that accepts. If none
        // does, the health check reports the first one as unreachable.
        let mut addr = first;
        for candidate in &loopback {
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(candidate)).await;
            if matches!(probe, Ok(Ok(_))) {
                addr = *candidate;
                break;
            }
        }
        let host_header =
            HeaderValue::from_str(&target.authority()).with_context(|| format!("target {url}: invalid host"))?;
        let base_path = target.base_path.clone();
        let uri = |path: &str| -> anyhow::Result<Uri> {
            format!("{base_path}{path}").parse::<Uri>().with_context(|| format!("target {url}: invalid path"))
        };
        Ok(Endpoint {
            healthz_uri: uri("/healthz")?,
            transfers_uri: uri("/v1/transfers")?,
            batch_uri: uri("/v1/transfers/batch")?,
            origin: format!("http://{}", target.authority()),
            url: url.clone(),
            addr,
            host_header,
            authorization: None,
            base_path,
        })
    }
}

// ---------------------------------------------------------------------------
// HTTP connection

/// One keep-alive HTTP/1.1 connection that reconnects lazily after an error.
struct HttpConn {
    endpoint: Arc<Endpoint>,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Sent as `Idempotency-Key` with the next request only.
    next_idempotency_key: Option<HeaderValue>,
}

impl HttpConn {
    fn new(endpoint: Arc<Endpoint>) -> HttpConn {
        HttpConn { endpoint, sender: None, next_idempotency_key: None }
    }

    async fn ensure_connected(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        // `take` keeps this cancel-safe: if the caller's timeout drops us
        // mid-request, the half-used connection is simply gone.
        let sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(&self.endpoint).await?,
        };
        Ok(self.sender.insert(sender))
    }

    /// Sends one request and reads the whole response, giving up at
    /// `give_up_at`. Any failure drops the connection so the next request
    /// starts on a fresh one.
    async fn request_until(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
        give_up_at: Instant,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        // `Uri` clones share their bytes: cheaper than formatting the path
        // for a message that is rarely needed.
        let request = self.request(method.clone(), uri.clone(), body);
        let error = match tokio::time::timeout_at(give_up_at, request).await {
            Ok(Ok(response)) => return Ok(response),
            // Already says which server could not be reached.
            Ok(Err(RequestError::Connect(error))) => error,
            Ok(Err(RequestError::Exchange(error))) => {
                anyhow!("{method} {}{uri}: {error:#}", self.endpoint.origin)
            }
            Err(_elapsed) => anyhow!("{method} {}{uri}: timed out", self.endpoint.origin),
        };
        self.sender = None;
        Err(error)
    }

    async fn request(&mut self, method: Method, uri: Uri, body: Bytes) -> Result<(StatusCode, Bytes), RequestError> {
        let headers = RequestHeaders {
            host: self.endpoint.host_header.clone(),
            authorization: self.endpoint.authorization.clone(),
            idempotency_key: self.next_idempotency_key.take(),
        };
        // Two tries at a ready connection: a server may close an idle
        // keep-alive connection at any time, and finding that out before
        // anything was sent is not a failed request.
        for attempt in 0..2 {
            let sender = self.ensure_connected().await.map_err(RequestError::Connect)?;
            match sender.ready().await {
                Ok(()) => {
                    return exchange(sender, method, uri, headers.clone(), body).await.map_err(RequestError::Exchange);
                }
                Err(_closed) if attempt == 0 => self.sender = None,
                Err(error) => return Err(RequestError::Exchange(error.into())),
            }
        }
        Err(RequestError::Exchange(anyhow!("no ready connection")))
    }
}

#[derive(Clone)]
struct RequestHeaders {
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    idempotency_key: Option<HeaderValue>,
}

enum RequestError {
    Connect(anyhow::Error),
    Exchange(anyhow::Error),
}

/// Sends one request on a ready connection and reads the whole response, so
/// the connection can carry the next one.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    method: Method,
    uri: Uri,
    headers: RequestHeaders,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(HOST, headers.host)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(authorization) = headers.authorization {
        request = request.header(AUTHORIZATION, authorization);
    }
    if let Some(key) = headers.idempotency_key {
        request = request.header(&IDEMPOTENCY_KEY, key);
    }
    let request = request.body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn connect(endpoint: &Endpoint) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let url = &endpoint.url;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint.addr))
        .await
        .map_err(|_elapsed| anyhow!("cannot reach {url}: connect timed out after {} s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|error| anyhow!("cannot reach {url}: {}", describe_io_error(&error)))?;
    // Requests are small and latency is what we measure: never let Nagle
    // hold a request back waiting for an ACK.
    stream.set_nodelay(true).with_context(|| format!("{url}: cannot set TCP_NODELAY"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("{url}: HTTP handshake failed"))?;
    // The connection task ends by itself once `sender` is dropped.
    tokio::spawn(async move {
        let _closed = connection.await;
    });
    Ok(sender)
}

fn describe_io_error(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        ErrorKind::ConnectionReset => "connection reset".to_owned(),
        ErrorKind::TimedOut => "timed out".to_owned(),
        ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        _ => error.to_string(),
    }
}

fn snippet(body: &[u8]) -> String {
    let cut = &body[..body.len().min(BODY_SNIPPET_BYTES)];
    let text = String::from_utf8_lossy(cut);
    if body.len() > BODY_SNIPPET_BYTES {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

async fn check_health(conn: &mut HttpConn) -> anyhow::Result<()> {
    let uri = conn.endpoint.healthz_uri.clone();
    let (status, body) = conn.request_until(Method::GET, uri, Bytes::new(), Instant::now() + REQUEST_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!("{}/healthz answered HTTP {status}: {}", conn.endpoint.url, snippet(&body));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Request bodies. Ids are built from hex run ids and decimal numbers only, so
// none of them needs JSON escaping.

/// The prefix of every id a run makes: 8 random hex digits, so that runs
/// against the same data dir do not collide, and short enough that the ids
/// of a run of the default size stay within [`peakstack_domain::INLINE_ID_LEN`] bytes, as most
/// real ids do (a longer id costs the server a heap allocation, and every
/// copy of it an atomic count: with 16 digits the ids were 26-31 bytes).
fn new_run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn write_account_id(out: &mut String, run_id: &str, account: usize) {
    let _infallible = write!(out, "lt-{run_id}-{account}");
}

fn account_body(run_id: &str, account: usize) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("{\"id\":\"");
    write_account_id(&mut out, run_id, account);
    let _infallible = write!(out, "\",\"currency\":\"{CURRENCY}\"}}");
    out
}

/// One transfer a worker is about to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TransferSpec {
    worker: usize,
    counter: u64,
    debit_account: usize,
    credit_account: usize,
    amount_minor: u64,
}

fn write_transfer(out: &mut String, run_id: &str, spec: &TransferSpec) {
    let _infallible = write!(out, "{{\"id\":\"lt-{run_id}-t{}-{}\",\"debit_account_id\":\"", spec.worker, spec.counter);
    write_account_id(out, run_id, spec.debit_account);
    out.push_str("\",\"credit_account_id\":\"");
    write_account_id(out, run_id, spec.credit_account);
    let _infallible = write!(out, "\",\"amount\":{},\"currency\":\"{CURRENCY}\"}}", spec.amount_minor);
}

fn transfer_body(run_id: &str, spec: &TransferSpec) -> String {
    let mut out = String::with_capacity(160);
    write_transfer(&mut out, run_id, spec);
    out
}

fn batch_body(run_id: &str, specs: &[TransferSpec]) -> String {
    let mut out = String::with_capacity(40 + 160 * specs.len());
    out.push_str("{\"transfers\":[");
    for (index, spec) in specs.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        write_transfer(&mut out, run_id, spec);
    }
    out.push_str("],\"atomic\":false}");
    out
}

/// Two distinct accounts in `0..accounts` (needs `accounts >= 2`) and an
/// amount in `1..=MAX_AMOUNT_MINOR`.
fn random_transfer(rng: &mut SmallRng, accounts: usize, worker: usize, counter: u64) -> TransferSpec {
    let debit_account = rng.random_range(0..accounts);
    // Draw from one fewer and skip the debit account: uniform and distinct
    // without a retry loop.
    let mut credit_account = rng.random_range(0..accounts - 1);
    if credit_account >= debit_account {
        credit_account += 1;
    }
    TransferSpec {
        worker,
        counter,
        debit_account,
        credit_account,
        amount_minor: rng.random_range(1..=MAX_AMOUNT_MINOR),
    }
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
struct BatchResponse<'a> {
    #[serde(borrow)]
    results: Vec<BatchItem<'a>>,
}

#[derive(Deserialize)]
struct BatchItem<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// How many of the `expected_ops` operations in one response succeeded, and
/// (only when some did not and `want_detail`) why not.
fn judge_response(
    batched: bool,
    expected_ops: u64,
    status: StatusCode,
    body: &[u8],
    want_detail: bool,
) -> (u64, Option<String>) {
    if !status.is_success() {
        let detail = want_detail.then(|| format!("HTTP {status}: {}", snippet(body)));
        return (0, detail);
    }
    if !batched {
        return (expected_ops, None);
    }
    let response: BatchResponse = match serde_json::from_slice(body) {
        Ok(response) => response,
        Err(error) => {
            let detail = want_detail.then(|| format!("unreadable batch response ({error}): {}", snippet(body)));
            return (0, detail);
        }
    };
    let mut ok_ops: u64 = 0;
    let mut first_code = None;
    for item in &response.results {
        if item.status == "error" {
            first_code = first_code.or(Some(item.code.as_deref().unwrap_or("(no code)")));
        } else {
            ok_ops += 1;
        }
    }
    // A server that answers with more results than transfers sent must not
    // inflate `ops`; one that answers with fewer lost the rest.
    let ok_ops = ok_ops.min(expected_ops);
    if ok_ops == expected_ops || !want_detail {
        return (ok_ops, None);
    }
    let detail = match first_code {
        Some(code) => format!("batch item error: {code}"),
        None => format!("batch answered {} results for {expected_ops} transfers", response.results.len()),
    };
    (ok_ops, Some(detail))
}

// ---------------------------------------------------------------------------
// Setup

async fn create_accounts(
    endpoint: &Arc<Endpoint>,
    run_id: &str,
    accounts: usize,
    progress: bool,
) -> anyhow::Result<()> {
    let bar = count_bar(progress, accounts, "creating accounts");
    let next_account = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY.min(accounts) {
        let mut conn = HttpConn::new(endpoint.clone());
        let run_id = run_id.to_owned();
        let next_account = next_account.clone();
        let failed = failed.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            // Bounded: every iteration claims a distinct index below
            // `accounts`, so all tasks together run `accounts` iterations.
            loop {
                let account = next_account.fetch_add(1, Ordering::Relaxed);
                if account >= accounts || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Err(error) = create_account(&mut conn, &run_id, account).await {
                    failed.store(true, Ordering::Relaxed);
                    return Err(error);
                }
                bar.inc(1);
            }
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.context("account setup task panicked")?;
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    bar.finish_and_clear();
    match first_error {
        Some(error) => Err(error.context("creating accounts failed")),
        None => Ok(()),
    }
}

async fn create_account(conn: &mut HttpConn, run_id: &str, account: usize) -> anyhow::Result<()> {
    let body = Bytes::from(account_body(run_id, account));
    let uri = Uri::try_from(format!("{}/v1/accounts", conn.endpoint.base_path))?;
    let mut last_error = None;
    for _attempt in 0..SETUP_ATTEMPTS {
        let give_up_at = Instant::now() + REQUEST_TIMEOUT;
        match conn.request_until(Method::POST, uri.clone(), body.clone(), give_up_at).await {
            // 201 created, 200 already there with the same fields.
            Ok((StatusCode::CREATED | StatusCode::OK, _)) => return Ok(()),
            Ok((status, body)) => {
                bail!("account lt-{run_id}-{account}: HTTP {status}: {}", snippet(&body))
            }
            // Transport errors are retried: creation is idempotent.
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("account lt-{run_id}-{account}: no attempt made")))
}

// ---------------------------------------------------------------------------
// Timed phase

struct RunContext {
    scenario: Scenario,
    run_id: String,
    accounts: usize,
    batch: usize,
    endpoint: Arc<Endpoint>,
    /// Read only by the progress bar.
    requests_done: Arc<AtomicU64>,
    idempotency_keys: bool,
}

struct WorkerTotals {
    requests: u64,
    ops: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

impl WorkerTotals {
    fn new() -> WorkerTotals {
        WorkerTotals { requests: 0, ops: 0, errors: 0, latency_us: new_latency_histogram(), first_error: None }
    }

    fn merge(&mut self, other: WorkerTotals) -> anyhow::Result<()> {
        self.requests += other.requests;
        self.ops += other.ops;
        self.errors += other.errors;
        self.latency_us.add(&other.latency_us).map_err(|error| anyhow!("merging latency histograms: {error:?}"))?;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

fn new_latency_histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_SIGFIGS).expect("constant histogram bounds are valid")
}

async fn run_worker(context: Arc<RunContext>, worker: usize, mut conn: HttpConn, deadline: Instant) -> WorkerTotals {
    let mut totals = WorkerTotals::new();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let give_up_at = deadline + DRAIN_GRACE;
    let batched = context.scenario == Scenario::Transfers && context.batch > 1;
    let ops_per_request = match context.scenario {
        Scenario::Healthz => 1,
        Scenario::Transfers => context.batch as u64,
    };
    let mut counter: u64 = 0;
    let mut requests_sent: u64 = 0;
    let mut specs = Vec::with_capacity(context.batch);
    // Bounded by the deadline: every request gives up at `give_up_at`, and
    // no new request starts after `deadline`.
    while Instant::now() < deadline {
        let (method, uri, body) = match context.scenario {
            Scenario::Healthz => (Method::GET, context.endpoint.healthz_uri.clone(), Bytes::new()),
            Scenario::Transfers => {
                specs.clear();
                for _ in 0..context.batch {
                    specs.push(random_transfer(&mut rng, context.accounts, worker, counter));
                    counter += 1;
                }
                if batched {
                    let body = batch_body(&context.run_id, &specs);
                    (Method::POST, context.endpoint.batch_uri.clone(), Bytes::from(body))
                } else {
                    let body = transfer_body(&context.run_id, &specs[0]);
                    (Method::POST, context.endpoint.transfers_uri.clone(), Bytes::from(body))
                }
            }
        };
        if context.idempotency_keys {
            conn.next_idempotency_key = Some(fresh_idempotency_key(&context.run_id, worker, requests_sent));
        }
        requests_sent += 1;
        let started = Instant::now();
        match conn.request_until(method, uri, body, give_up_at).await {
            Ok((status, body)) => {
                let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                totals.latency_us.saturating_record(latency_us);
                totals.requests += 1;
                context.requests_done.fetch_add(1, Ordering::Relaxed);
                let want_detail = totals.first_error.is_none();
                let (ok_ops, detail) = judge_response(batched, ops_per_request, status, &body, want_detail);
                totals.ops += ok_ops;
                totals.errors += ops_per_request - ok_ops;
                if detail.is_some() {
                    totals.first_error = detail;
                }
            }
            Err(error) => {
                totals.errors += ops_per_request;
                if totals.first_error.is_none() {
                    totals.first_error = Some(format!("{error:#}"));
                }
                let resume_at = (Instant::now() + RECONNECT_BACKOFF).min(deadline);
                tokio::time::sleep_until(resume_at).await;
            }
        }
    }
    totals
}

/// Unique per run, worker and request of the worker.
fn fresh_idempotency_key(run_id: &str, worker: usize, request: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("lt-{run_id}-{worker}-{request}")).expect("hex and digits are a valid header value")
}

fn bar_style(template: &str) -> ProgressStyle {
    // Only constant templates are passed in; fall back to the default style
    // rather than fail a load test over a progress bar.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn count_bar(progress: bool, total: usize, label: &'static str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(bar_style("{msg} [{bar:30}] {pos}/{len} ({per_sec})"));
    bar.set_message(label);
    bar
}

fn run_bar(progress: bool, duration: Duration) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(bar_style("[{elapsed_precise}] [{bar:30}] {msg}"));
    bar
}

async fn tick_progress(bar: ProgressBar, requests_done: Arc<AtomicU64>, start: Instant, deadline: Instant) {
    let mut interval = tokio::time::interval(PROGRESS_TICK);
    // Bounded by the deadline; the caller also aborts this task when the
    // workers are done.
    while Instant::now() < deadline {
        interval.tick().await;
        let elapsed = start.elapsed();
        let requests = requests_done.load(Ordering::Relaxed);
        let rate_per_s = requests as f64 / elapsed.as_secs_f64().max(1e-3);
        bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        bar.set_message(format!("{requests} requests, {rate_per_s:.0} req/s"));
    }
}

fn summarize(
    latency_us: &Histogram<u64>,
    requests: u64,
    ops: u64,
    errors: u64,
    elapsed: Duration,
    invariants_ok: Option<bool>,
) -> LoadtestSummary {
    let seconds = elapsed.as_secs_f64();
    let per_s = |count: u64| {
        if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        }
    };
    // An empty histogram reports 0 for every quantile, which is what we want
    // when nothing got through.
    LoadtestSummary {
        requests,
        ops,
        errors,
        seconds,
        requests_per_s: per_s(requests),
        ops_per_s: per_s(ops),
        p50_us: latency_us.value_at_quantile(0.5),
        p99_us: latency_us.value_at_quantile(0.99),
        p999_us: latency_us.value_at_quantile(0.999),
        max_us: latency_us.max(),
        invariants_ok,
        idempotency_keys: false,
    }
}

// ---------------------------------------------------------------------------
// Double-entry invariant

#[derive(Deserialize)]
struct AccountsPage {
    data: Vec<AccountRow>,
    next: Option<String>,
}

/// An account's balances: u128, sent as strings of decimal digits (a JSON
/// number past 2^53 is not exact in many clients).
#[derive(Deserialize)]
struct AccountRow {
    #[serde(deserialize_with = "digits")]
    debits_pending: u128,
    #[serde(deserialize_with = "digits")]
    debits_posted: u128,
    #[serde(deserialize_with = "digits")]
    credits_pending: u128,
    #[serde(deserialize_with = "digits")]
    credits_posted: u128,
}

/// A balance: a JSON string of decimal digits, nothing else.
fn digits<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!("a balance is a string of decimal digits, not {text:?}")));
    }
    text.parse().map_err(|_| serde::de::Error::custom(format!("balance {text:?} is past 2^128")))
}

/// Totals in minor units, modulo 2^128 as the engine's own check: balances
/// are u128, so their sum can pass it, and equal totals modulo 2^128 are
/// equal totals for any run of transfers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct LedgerTotals {
    accounts: u64,
    debits_minor: u128,
    credits_minor: u128,
}

impl LedgerTotals {
    fn add_page(&mut self, rows: &[AccountRow]) {
        for row in rows {
            self.accounts += 1;
            self.debits_minor = self.debits_minor.wrapping_add(row.debits_posted).wrapping_add(row.debits_pending);
            self.credits_minor = self.credits_minor.wrapping_add(row.credits_posted).wrapping_add(row.credits_pending);
        }
    }

    fn balanced(&self) -> bool {
        self.debits_minor == self.credits_minor
    }
}

fn accounts_page_uri(base_path: &str, after: Option<&str>) -> anyhow::Result<Uri> {
    let mut path = format!("{base_path}/v1/accounts?limit={ACCOUNTS_PAGE_LIMIT}");
    if let Some(cursor) = after {
        path.push_str("&after=");
        percent_encode_into(&mut path, cursor);
    }
    Uri::try_from(path).context("building accounts page URI")
}

/// Percent-encodes everything but RFC 3986 unreserved characters: the cursor
/// is opaque and may hold anything.
fn percent_encode_into(out: &mut String, text: &str) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _infallible = write!(out, "%{byte:02X}");
        }
    }
}

/// Sums debits and credits over every account, system accounts included.
async fn sum_ledger(conn: &mut HttpConn) -> anyhow::Result<LedgerTotals> {
    let mut totals = LedgerTotals::default();
    let mut cursor: Option<String> = None;
    for _page in 0..MAX_ACCOUNT_PAGES {
        let uri = accounts_page_uri(&conn.endpoint.base_path, cursor.as_deref())?;
        let give_up_at = Instant::now() + REQUEST_TIMEOUT;
        let (status, body) = conn.request_until(Method::GET, uri, Bytes::new(), give_up_at).await?;
        if !status.is_success() {
            bail!("listing accounts: HTTP {status}: {}", snippet(&body));
        }
        let page: AccountsPage = serde_json::from_slice(&body).context("listing accounts: unreadable page")?;
        totals.add_page(&page.data);
        match page.next {
            None => return Ok(totals),
            Some(next) if next.is_empty() => return Ok(totals),
            Some(next) => {
                if cursor.as_deref() == Some(next.as_str()) {
                    bail!("listing accounts: cursor {next:?} did not advance");
                }
                cursor = Some(next);
            }
        }
    }
    bail!("listing accounts: gave up after {MAX_ACCOUNT_PAGES} pages")
}

async fn ledger_balanced(conn: &mut HttpConn) -> anyhow::Result<bool> {
    let mut last = LedgerTotals::default();
    for attempt in 0..INVARIANT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(INVARIANT_RETRY_PAUSE).await;
        }
        last = sum_ledger(conn).await?;
        if last.balanced() {
            return Ok(true);
        }
    }
    eprintln!(
        "loadtest: double-entry invariant violated over {} accounts: debits {} != credits {} (minor units)",
        last.accounts, last.debits_minor, last.credits_minor
    );
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::INLINE_ID_LEN;

    fn spec(worker: usize, counter: u64, debit: usize, credit: usize, amount_minor: u64) -> TransferSpec {
        TransferSpec { worker, counter, debit_account: debit, credit_account: credit, amount_minor }
    }

    #[test]
    fn parses_targets() {
        let cases = [
            ("http://127.0.0.1:8080", "127.0.0.1", 8080, ""),
            ("http://127.0.0.1:8080/", "127.0.0.1", 8080, ""),
            ("HTTP://localhost", "localhost", 80, ""),
            ("localhost:9000/ledger/", "localhost", 9000, "/ledger"),
            ("http://[::1]:8080", "::1", 8080, ""),
            ("  http://[::1]/x  ", "::1", 80, "/x"),
        ];
        for (url, host, port, base_path) in cases {
            let target = parse_target(url).unwrap_or_else(|error| panic!("{url}: {error}"));
            assert_eq!(target.host, host, "{url}");
            assert_eq!(target.port, port, "{url}");
            assert_eq!(target.base_path, base_path, "{url}");
        }
        assert_eq!(parse_target("http://[::1]:8080").unwrap().authority(), "[::1]:8080");
        assert_eq!(parse_target("http://127.0.0.1").unwrap().authority(), "127.0.0.1:80");
    }

    #[test]
    fn rejects_bad_targets() {
        for url in [
            "https://127.0.0.1:8080",
            "ftp://127.0.0.1",
            "http://",
            "http://:8080",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:abc",
            "http://user@127.0.0.1",
            "http://[::1",
            "http://[::1]x",
            "http://127.0.0.1/a?b=c",
            "http://127.0.0.1/a b",
        ] {
            assert!(parse_target(url).is_err(), "{url} should be rejected");
        }
    }

    #[tokio::test]
    async fn refuses_non_loopback_targets() {
        // An IP literal resolves without any network traffic.
        let target = parse_target("http://192.0.2.1:80").unwrap();
        let error =
            Endpoint::resolve("http://192.0.2.1:80", &target).await.err().expect("non-loopback target must be refused");
        assert!(error.to_string().contains("loopback"), "{error}");
    }

    #[test]
    fn builds_bodies() {
        assert_eq!(account_body("ab12", 7), r#"{"id":"lt-ab12-7","currency":"USD"}"#);
        let single = transfer_body("ab12", &spec(3, 41, 0, 9, 500));
        assert_eq!(
            single,
            r#"{"id":"lt-ab12-t3-41","debit_account_id":"lt-ab12-0","credit_account_id":"lt-ab12-9","amount":500,"currency":"USD"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&single).unwrap();
        assert_eq!(parsed["amount"], 500);

        let batch = batch_body("ab12", &[spec(1, 0, 1, 2, 1), spec(1, 1, 2, 1, 1000)]);
        let parsed: serde_json::Value = serde_json::from_str(&batch).unwrap();
        assert_eq!(parsed["atomic"], false);
        let transfers = parsed["transfers"].as_array().unwrap();
        assert_eq!(transfers.len(), 2);
        assert_eq!(transfers[1]["id"], "lt-ab12-t1-1");
        assert_eq!(transfers[1]["debit_account_id"], "lt-ab12-2");
        assert_eq!(transfers[1]["amount"], 1000);
    }

    #[test]
    fn ids_of_a_default_sized_run_are_held_inline() {
        let run_id = new_run_id();
        assert_eq!(run_id.len(), 8);
        // 64 workers (the default concurrency), ten million transfers each,
        // a million accounts.
        let body = transfer_body(&run_id, &spec(63, 9_999_999, 999_999, 0, 1));
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        for field in ["id", "debit_account_id", "credit_account_id"] {
            let id = parsed[field].as_str().unwrap();
            assert!(id.len() <= INLINE_ID_LEN, "{field} {id} is longer than {INLINE_ID_LEN} bytes");
        }
    }

    #[test]
    fn ids_fit_the_server_limit() {
        // The server accepts ids of at most 64 characters.
        let run_id = format!("{:08x}", u32::MAX);
        let body = transfer_body(&run_id, &spec(MAX_CONCURRENCY, u64::MAX, MAX_ACCOUNTS, 0, 1));
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        for field in ["id", "debit_account_id", "credit_account_id"] {
            let id = parsed[field].as_str().unwrap();
            assert!(id.len() <= 64, "{field} {id} is too long");
        }
    }

    #[test]
    fn random_transfers_use_distinct_accounts() {
        let mut rng = SmallRng::seed_from_u64(7);
        for counter in 0..10_000 {
            let accounts = 2 + (counter as usize % 5);
            let transfer = random_transfer(&mut rng, accounts, 0, counter);
            assert_ne!(transfer.debit_account, transfer.credit_account);
            assert!(transfer.debit_account < accounts && transfer.credit_account < accounts);
            assert!((1..=MAX_AMOUNT_MINOR).contains(&transfer.amount_minor));
        }
    }

    #[test]
    fn judges_responses() {
        assert_eq!(judge_response(false, 1, StatusCode::CREATED, b"{}", true), (1, None));
        assert_eq!(judge_response(false, 1, StatusCode::OK, b"{}", true), (1, None));
        let (ok, detail) =
            judge_response(false, 1, StatusCode::CONFLICT, br#"{"code":"exists_with_different_fields"}"#, true);
        assert_eq!(ok, 0);
        assert!(detail.unwrap().contains("exists_with_different_fields"));
        assert_eq!(judge_response(false, 1, StatusCode::SERVICE_UNAVAILABLE, b"", false), (0, None));

        let body = br#"{"results":[{"status":"created","id":"a"},{"status":"error","code":"account_not_found"},{"status":"exists"}]}"#;
        let (ok, detail) = judge_response(true, 3, StatusCode::OK, body, true);
        assert_eq!(ok, 2);
        assert_eq!(detail.as_deref(), Some("batch item error: account_not_found"));

        let short = br#"{"results":[{"status":"created"}]}"#;
        let (ok, detail) = judge_response(true, 3, StatusCode::OK, short, true);
        assert_eq!(ok, 1);
        assert!(detail.unwrap().contains("1 results for 3"));

        let (ok, detail) = judge_response(true, 2, StatusCode::OK, b"not json", true);
        assert_eq!(ok, 0);
        assert!(detail.unwrap().contains("unreadable"));
    }

    #[test]
    fn summarizes_histograms() {
        let mut latency_us = new_latency_histogram();
        for value_us in 1..=1_000u64 {
            latency_us.record(value_us).unwrap();
        }
        latency_us.record(50_000).unwrap();
        let summary = summarize(&latency_us, 1_001, 2_002, 3, Duration::from_secs(2), Some(true));
        assert_eq!(summary.requests, 1_001);
        assert_eq!(summary.ops, 2_002);
        assert_eq!(summary.errors, 3);
        assert_eq!(summary.seconds, 2.0);
        assert_eq!(summary.requests_per_s, 500.5);
        assert_eq!(summary.ops_per_s, 1_001.0);
        // hdrhistogram with 3 significant figures is exact below 2048.
        assert_eq!(summary.p50_us, 501);
        assert_eq!(summary.p99_us, 991);
        assert_eq!(summary.p999_us, 1_000);
        assert!((50_000..=50_050).contains(&summary.max_us), "{}", summary.max_us);

        let json = summary.to_json();
        for key in [
            "ops",
            "seconds",
            "ops_per_s",
            "requests",
            "requests_per_s",
            "errors",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "invariants_ok",
            "idempotency_keys",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["invariants_ok"], true);
        assert_eq!(json["ops"], 2_002);

        let empty = summarize(&new_latency_histogram(), 0, 0, 0, Duration::ZERO, None);
        assert_eq!((empty.p50_us, empty.max_us, empty.ops_per_s), (0, 0, 0.0));
        assert_eq!(empty.to_json()["invariants_ok"], serde_json::Value::Null);
    }

    #[test]
    fn human_text_is_readable() {
        let summary = summarize(&new_latency_histogram(), 10, 10, 0, Duration::from_secs(1), None);
        let text = summary.human_text();
        assert!(text.contains("requests      10 (10.0 req/s)"), "{text}");
        assert!(text.contains("invariants    not checked"), "{text}");
        assert_eq!(format_latency(999), "999 us");
        assert_eq!(format_latency(1_234), "1.234 ms");
        assert_eq!(format_latency(2_000_005), "2000.005 ms");
    }

    #[test]
    fn builds_account_page_uris() {
        assert_eq!(accounts_page_uri("", None).unwrap().to_string(), "/v1/accounts?limit=1000");
        assert_eq!(
            accounts_page_uri("/p", Some("_clearing.USD:1/+ x")).unwrap().to_string(),
            "/p/v1/accounts?limit=1000&after=_clearing.USD%3A1%2F%2B%20x"
        );
    }

    #[test]
    fn sums_ledger_pages_of_u128_balances() {
        let page: AccountsPage = serde_json::from_str(
            r#"{"data":[
                {"id":"a","balance":"-5","debits_pending":"1","debits_posted":"36893488147419103232","credits_pending":"0","credits_posted":"0"},
                {"id":"_clearing.USD","balance":"5","debits_pending":"0","debits_posted":"0","credits_pending":"1","credits_posted":"36893488147419103232"}
            ],"next":null}"#,
        )
        .unwrap();
        assert!(page.next.is_none());
        let mut totals = LedgerTotals::default();
        totals.add_page(&page.data);
        totals.add_page(&page.data);
        assert_eq!(totals.accounts, 4);
        assert_eq!(totals.debits_minor, 2 * ((1u128 << 65) + 1), "exact past 2^64");
        assert!(totals.balanced());
        totals.add_page(&page.data[..1]);
        assert!(!totals.balanced());
        // Numbers, signs and junk are not balances.
        for bad in [r#"1"#, r#""-1""#, r#""""#, r#""1e3""#, r#""340282366920938463463374607431768211456""#] {
            let row =
                format!(r#"{{"debits_pending":{bad},"debits_posted":"0","credits_pending":"0","credits_posted":"0"}}"#);
            assert!(serde_json::from_str::<AccountRow>(&row).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn validates_config() {
        let good = LoadtestConfig {
            scenario: Scenario::Transfers,
            target: "http://127.0.0.1:1".to_owned(),
            concurrency: 64,
            seconds: 10.0,
            batch: 1,
            accounts: 10_000,
            json: false,
            progress: false,
            api_key: None,
            idempotency_keys: false,
        };
        assert_eq!(validate(&good).unwrap(), Duration::from_secs(10));
        let bad = [
            LoadtestConfig { concurrency: 0, ..good.clone() },
            LoadtestConfig { seconds: 0.0, ..good.clone() },
            LoadtestConfig { seconds: f64::NAN, ..good.clone() },
            LoadtestConfig { seconds: -1.0, ..good.clone() },
            LoadtestConfig { batch: 0, ..good.clone() },
            LoadtestConfig { accounts: 1, ..good.clone() },
        ];
        for config in bad {
            assert!(validate(&config).is_err(), "{config:?}");
        }
        // Healthz does not use accounts.
        let healthz = LoadtestConfig { scenario: Scenario::Healthz, accounts: 0, ..good };
        assert!(validate(&healthz).is_ok());
        assert_eq!("healthz".parse::<Scenario>().unwrap(), Scenario::Healthz);
        assert_eq!("transfers".parse::<Scenario>().unwrap(), Scenario::Transfers);
        assert!("nope".parse::<Scenario>().is_err());
    }

    #[tokio::test]
    async fn connection_refused_is_readable() {
        // Bind and drop to get a loopback port that nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let target = format!("http://127.0.0.1:{port}");
        let error = run(LoadtestConfig {
            scenario: Scenario::Healthz,
            target: target.clone(),
            concurrency: 1,
            seconds: 0.1,
            batch: 1,
            accounts: 2,
            json: false,
            progress: false,
            api_key: None,
            idempotency_keys: false,
        })
        .await
        .expect_err("nothing listens there");
        assert_eq!(error.to_string(), format!("cannot reach {target}: connection refused"));
    }

    // ---- an in-memory ledger speaking just enough HTTP/1.1 ----

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    #[derive(Default)]
    struct MockLedger {
        /// id -> (debits_posted, credits_posted)
        accounts: Mutex<BTreeMap<String, (u64, u64)>>,
        /// Report one extra minor unit of debits, to fake a broken ledger.
        skew: bool,
        /// Close each connection after this many requests (0 = never), the
        /// way servers recycle keep-alive connections.
        close_after: usize,
        /// Idempotency-Keys of the transfer requests, and how many came
        /// without one.
        idempotency_keys: Mutex<std::collections::BTreeSet<String>>,
        transfer_posts: std::sync::atomic::AtomicU64,
        unkeyed_transfer_posts: std::sync::atomic::AtomicU64,
    }

    impl MockLedger {
        fn apply(&self, transfer: &serde_json::Value) -> Result<(), &'static str> {
            let mut accounts = self.accounts.lock().unwrap();
            let debit = transfer["debit_account_id"].as_str().ok_or("bad_request")?;
            let credit = transfer["credit_account_id"].as_str().ok_or("bad_request")?;
            let amount = transfer["amount"].as_u64().ok_or("bad_request")?;
            if debit == credit || !accounts.contains_key(debit) || !accounts.contains_key(credit) {
                return Err("account_not_found");
            }
            accounts.get_mut(debit).ok_or("account_not_found")?.0 += amount;
            accounts.get_mut(credit).ok_or("account_not_found")?.1 += amount;
            Ok(())
        }

        fn answer(&self, method: &str, target: &str, body: &[u8]) -> (u16, String) {
            let json = || serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            match (method, path) {
                ("GET", "/healthz") => (200, r#"{"status":"ok"}"#.to_owned()),
                ("POST", "/v1/accounts") => {
                    let id = json()["id"].as_str().unwrap_or_default().to_owned();
                    self.accounts.lock().unwrap().insert(id, (0, 0));
                    (201, "{}".to_owned())
                }
                ("POST", "/v1/transfers") => match self.apply(&json()) {
                    Ok(()) => (201, "{}".to_owned()),
                    Err(code) => (404, format!(r#"{{"code":"{code}"}}"#)),
                },
                ("POST", "/v1/transfers/batch") => {
                    let request = json();
                    let empty = Vec::new();
                    let results: Vec<serde_json::Value> = request["transfers"]
                        .as_array()
                        .unwrap_or(&empty)
                        .iter()
                        .map(|transfer| match self.apply(transfer) {
                            Ok(()) => serde_json::json!({"status": "created"}),
                            Err(code) => serde_json::json!({"status": "error", "code": code}),
                        })
                        .collect();
                    (200, serde_json::json!({ "results": results }).to_string())
                }
                ("GET", "/v1/accounts") => (200, self.page(query)),
                _ => (404, r#"{"code":"not_found"}"#.to_owned()),
            }
        }

        /// Pages of 3 so the client has to follow cursors; cursors carry a
        /// ':' so they get percent-encoded on the way back.
        fn page(&self, query: &str) -> String {
            let after = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("after="))
                .map(|cursor| cursor.replace("%3A", ":"))
                .and_then(|cursor| cursor.strip_prefix("c:").map(str::to_owned));
            let accounts = self.accounts.lock().unwrap();
            let rows: Vec<(&String, &(u64, u64))> = match &after {
                Some(after) => accounts
                    .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                    .take(3)
                    .collect(),
                None => accounts.iter().take(3).collect(),
            };
            let next = (rows.len() == 3).then(|| format!("c:{}", rows[2].0));
            let data: Vec<serde_json::Value> = rows
                .iter()
                .enumerate()
                .map(|(index, (id, (debits, credits)))| {
                    let skew = u64::from(self.skew && after.is_none() && index == 0);
                    serde_json::json!({
                        "id": id,
                        "balance": (i128::from(*credits) - i128::from(*debits)).to_string(),
                        "debits_pending": "0",
                        "debits_posted": (debits + skew).to_string(),
                        "credits_pending": "0",
                        "credits_posted": credits.to_string(),
                    })
                })
                .collect();
            serde_json::json!({ "data": data, "next": next }).to_string()
        }
    }

    /// A server that speaks just enough HTTP/1.1 for the load generator:
    /// the mock ledger here, the mock flash sale in `flash_sale`'s tests.
    pub(super) trait MockRoutes: Send + Sync + 'static {
        /// The status and body of one request.
        fn route(&self, method: &str, target: &str, idempotency_key: Option<String>, body: &[u8]) -> (u16, String);

        /// Close each connection after this many requests (0 = never), the
        /// way servers recycle keep-alive connections.
        fn close_after(&self) -> usize {
            0
        }
    }

    impl MockRoutes for MockLedger {
        fn route(&self, method: &str, target: &str, idempotency_key: Option<String>, body: &[u8]) -> (u16, String) {
            if target.starts_with("/v1/transfers") {
                self.transfer_posts.fetch_add(1, Ordering::Relaxed);
                match idempotency_key {
                    Some(key) => {
                        self.idempotency_keys.lock().unwrap().insert(key);
                    }
                    None => {
                        self.unkeyed_transfer_posts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.answer(method, target, body)
        }

        fn close_after(&self) -> usize {
            self.close_after
        }
    }

    async fn serve_connection<R: MockRoutes>(stream: tokio::net::TcpStream, routes: Arc<R>) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream);
        for request in 1..1_000_000 {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).await? == 0 {
                return Ok(());
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_owned();
            let target = parts.next().unwrap_or_default().to_owned();
            let mut content_length = 0usize;
            let mut idempotency_key = None;
            for _header in 0..100 {
                let mut line = String::new();
                reader.read_line(&mut line).await?;
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        content_length = value.trim().parse().unwrap_or(0);
                    }
                    if name.eq_ignore_ascii_case("idempotency-key") {
                        idempotency_key = Some(value.trim().to_owned());
                    }
                }
            }
            let mut body = vec![0; content_length];
            reader.read_exact(&mut body).await?;
            let (status, response) = routes.route(&method, &target, idempotency_key, &body);
            let closing = request == routes.close_after();
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
                response.len(),
                if closing { "connection: close\r\n" } else { "" },
            );
            let stream = reader.get_mut();
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(response.as_bytes()).await?;
            if closing {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Serves `routes` on a loopback port; its URL.
    pub(super) async fn start_mock_server<R: MockRoutes>(routes: Arc<R>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            // The runtime ends with the test; the bound is just a backstop.
            for _connection in 0..10_000 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(stream, routes.clone()));
            }
        });
        url
    }

    async fn start_mock(ledger: MockLedger) -> (String, Arc<MockLedger>) {
        let ledger = Arc::new(ledger);
        (start_mock_server(ledger.clone()).await, ledger)
    }

    fn mock_config(scenario: Scenario, target: String, batch: usize) -> LoadtestConfig {
        LoadtestConfig {
            scenario,
            target,
            concurrency: 4,
            seconds: 0.3,
            batch,
            accounts: 10,
            json: false,
            progress: true,
            api_key: None,
            idempotency_keys: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_transfers_against_a_mock_ledger() {
        for (batch, close_after) in [(1, 0), (5, 0), (1, 7)] {
            let (url, ledger) = start_mock(MockLedger { close_after, ..MockLedger::default() }).await;
            let started = std::time::Instant::now();
            let summary = run(mock_config(Scenario::Transfers, url, batch)).await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(5), "run must stop by itself");
            assert_eq!(summary.errors, 0, "{summary:?}");
            assert!(summary.requests > 0, "{summary:?}");
            assert_eq!(summary.ops, summary.requests * batch as u64, "{summary:?}");
            assert_eq!(summary.invariants_ok, Some(true), "{summary:?}");
            assert!(summary.seconds >= 0.3 && summary.seconds < 3.0, "{summary:?}");
            assert!(summary.p50_us > 0 && summary.p50_us <= summary.max_us, "{summary:?}");
            assert_eq!(ledger.accounts.lock().unwrap().len(), 10);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_a_fresh_idempotency_key_per_request_when_asked() {
        for (idempotency_keys, batch) in [(true, 1), (true, 3), (false, 1)] {
            let (url, ledger) = start_mock(MockLedger::default()).await;
            let config = LoadtestConfig { idempotency_keys, ..mock_config(Scenario::Transfers, url, batch) };
            let summary = run(config).await.unwrap();
            assert_eq!(summary.errors, 0, "{summary:?}");
            assert_eq!(summary.idempotency_keys, idempotency_keys);
            assert_eq!(summary.to_json()["idempotency_keys"], idempotency_keys);
            let posts = ledger.transfer_posts.load(Ordering::Relaxed);
            let unkeyed = ledger.unkeyed_transfer_posts.load(Ordering::Relaxed);
            let distinct_keys = ledger.idempotency_keys.lock().unwrap().len() as u64;
            assert!(posts > 0 && posts == summary.requests, "{posts} posts, {summary:?}");
            if idempotency_keys {
                assert_eq!((unkeyed, distinct_keys), (0, posts), "every request, its own key");
            } else {
                assert_eq!((unkeyed, distinct_keys), (posts, 0));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_healthz_and_reports_broken_ledgers() {
        let (url, _ledger) = start_mock(MockLedger { skew: true, ..MockLedger::default() }).await;
        let summary = run(mock_config(Scenario::Healthz, url.clone(), 1)).await.unwrap();
        assert_eq!(summary.invariants_ok, None);
        assert!(summary.ops > 0 && summary.ops == summary.requests, "{summary:?}");
        let summary = run(mock_config(Scenario::Transfers, url, 1)).await.unwrap();
        assert_eq!(summary.invariants_ok, Some(false), "{summary:?}");
    }
}
