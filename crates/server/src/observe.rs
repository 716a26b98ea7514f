//! What every request leaves behind: an `X-Request-Id`, a tracing span, a
//! counter and a latency histogram; the one middleware that runs them, access
//! control and the POST guard ([`front`]). And the process's Prometheus
//! recorder.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::{access, post_guard, AppState};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id taken from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Latency buckets in seconds: 100 us to 10 s.
const SECONDS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Inputs per engine batch: powers of two up to the engine's batch bound.
const BATCH_INPUTS_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// The process's Prometheus recorder, installed on first use. A process has
/// one global `metrics` recorder, so every server in it shares this handle.
/// If another recorder was installed first, this one still renders, but
/// only what is recorded through it (nothing): the log says so.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("peakstack_batch_inputs".to_owned()), BATCH_INPUTS_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => describe_metrics(),
                Err(error) => {
                    tracing::warn!(%error, "a metrics recorder was installed already; /metrics will be empty")
                }
            }
            handle
        })
        .clone()
}

/// Answers replayed from the idempotency store.
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "peakstack_idempotent_replays_total";
/// Pending transfers made and not yet posted, voided or expired.
pub const LEDGER_PENDING_TRANSFERS: &str = "peakstack_ledger_pending_transfers";
/// Transfer requests (single, post, void and batch items) by result code.
pub const LEDGER_RESULTS_TOTAL: &str = "peakstack_ledger_results_total";

/// Every series the process exports, with its `# HELP` text: (name, help).
/// Counters end in `_total`; the engine's counters are read from
/// `EngineStats` on each scrape ([`record_engine_stats`]).
const COUNTERS: &[(&str, &str)] = &[
    ("peakstack_http_requests_total", "HTTP requests answered, by route, method and status."),
    ("peakstack_access_refusals_total", "Requests refused by access control, by code."),
    (IDEMPOTENT_REPLAYS_TOTAL, "Answers replayed from the Idempotency-Key store instead of being made again."),
    (
        LEDGER_RESULTS_TOTAL,
        "Transfer requests (single, post, void and batch items) by result: created, exists, or the refusal code.",
    ),
    ("peakstack_engine_batches_total", "Batches the engine's executors applied and made durable."),
    ("peakstack_engine_inputs_total", "Inputs (requests and messages between executors) in those batches."),
    ("peakstack_engine_fsyncs_total", "Durable writes of the command logs."),
    ("peakstack_engine_inline_writes_total", "Batches the apply thread made durable itself, not the log thread."),
    ("peakstack_engine_log_bytes_total", "Bytes appended to the command logs."),
    ("peakstack_engine_checkpoints_total", "Checkpoints written."),
];
const GAUGES: &[(&str, &str)] = &[
    ("peakstack_audit_feed_lag_batches", "Durable batches whose audit events are not stored yet."),
    (LEDGER_PENDING_TRANSFERS, "Pending transfers (holds) made and not yet posted, voided or expired."),
    ("peakstack_outbox_messages", "Reliable messages between executors kept until applied, dead letters included."),
    (
        "peakstack_outbox_dead_letters",
        "Reliable messages refused too often and no longer retried (see GET /v1/dead-letters).",
    ),
];
const HISTOGRAMS: &[(&str, &str)] = &[
    ("peakstack_http_request_duration_seconds", "Time from a request's head to its answer, by route."),
    ("peakstack_log_fsync_seconds", "Duration of one durable write of a command log."),
    ("peakstack_batch_inputs", "Inputs per engine batch."),
    ("peakstack_checkpoint_seconds", "Time to encode and write one checkpoint."),
];

fn describe_metrics() {
    for &(name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for &(name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    for &(name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, help);
    }
}

/// Copies the engine's own counters into the recorder (they are kept as
/// plain atomics on the hot path), for a scrape.
pub fn record_engine_stats(engine: &peakstack_engine::Engine) {
    let stats = engine.stats();
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    metrics::counter!("peakstack_engine_batches_total").absolute(load(&stats.batches));
    metrics::counter!("peakstack_engine_inputs_total").absolute(load(&stats.inputs));
    metrics::counter!("peakstack_engine_fsyncs_total").absolute(load(&stats.fsyncs));
    metrics::counter!("peakstack_engine_inline_writes_total").absolute(load(&stats.inline_writes));
    metrics::counter!("peakstack_engine_log_bytes_total").absolute(load(&stats.log_bytes));
    metrics::counter!("peakstack_engine_checkpoints_total").absolute(load(&stats.checkpoints));
    metrics::gauge!("peakstack_audit_feed_lag_batches").set(engine.audit_lag() as f64);
    metrics::gauge!(LEDGER_PENDING_TRANSFERS).set(load(&stats.pending_transfers) as f64);
    metrics::gauge!("peakstack_outbox_messages").set(load(&stats.messages_kept) as f64);
    metrics::gauge!("peakstack_outbox_dead_letters").set(load(&stats.dead_letters) as f64);
}

/// Counts transfer results by code: one registry lookup per code present,
/// not per transfer (a batch holds up to 8,190).
pub fn count_ledger_results(results: &[Result<peakstack_engine::TransferOutcome, peakstack_domain::ErrorCode>]) {
    let mut created = 0u64;
    let mut exists = 0u64;
    let mut refused = [0u64; peakstack_domain::ErrorCode::ALL.len()];
    for result in results {
        match result {
            Ok(outcome) if outcome.created => created += 1,
            Ok(_) => exists += 1,
            Err(code) => {
                if let Some(index) = peakstack_domain::ErrorCode::ALL.iter().position(|c| c == code) {
                    refused[index] += 1;
                }
            }
        }
    }
    let count = |code: &'static str, n: u64| {
        if n > 0 {
            metrics::counter!(LEDGER_RESULTS_TOTAL, "code" => code).increment(n);
        }
    };
    count("created", created);
    count("exists", exists);
    for (code, n) in peakstack_domain::ErrorCode::ALL.iter().zip(refused) {
        count(code.as_str(), n);
    }
}

/// Takes a client's request id when it is 1-128 characters of
/// `[A-Za-z0-9._:-]`; anything else is replaced.
pub fn valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh id: a random per-process prefix and a counter, so ids are unique
/// within a process and, with overwhelming odds, across restarts.
pub fn generate_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| RandomState::new().build_hasher().finish());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 32];
    for (i, byte) in text.iter_mut().enumerate() {
        let word = if i < 16 { prefix } else { n };
        let nibble = (word >> (4 * (15 - i % 16))) & 0xf;
        *byte = b"0123456789abcdef"[nibble as usize];
    }
    HeaderValue::from_bytes(&text).expect("hex is a valid header value")
}

/// The one middleware in front of the handlers. Outermost first: the
/// request id, its span and metrics (here); access control
/// ([`access::admit`]); the POST guard ([`post_guard::post_guard`]). One
/// layer instead of three: each layer costs a boxed future and a clone of
/// the service below it on every request.
pub async fn front(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = match request.headers().get(&X_REQUEST_ID) {
        Some(value) if valid_request_id(value) => value.clone(),
        _ => generate_request_id(),
    };
    request.headers_mut().insert(X_REQUEST_ID.clone(), request_id.clone());
    // Unknown paths share one label, so a scan cannot blow up the series.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let route_label = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = request_id.to_str().unwrap_or_default(),
        method = method.as_str(),
        route = route_label,
        key_id = tracing::field::Empty,
    );
    let answer = async {
        let route = route.as_ref().map(MatchedPath::as_str);
        if let Err(refusal) = access::admit(&state, &mut request, route) {
            return *refusal;
        }
        if let Err(error) = route.map_or(Ok(()), |route| crate::check_query(&method, route, request.uri())) {
            return error.into_response();
        }
        post_guard::post_guard(&state, request, next).await
    };
    let mut response = answer.instrument(span.clone()).await;
    response.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    record_request(route_label, &method, status, elapsed.as_secs_f64());
    span.in_scope(|| tracing::debug!(status, latency_us = elapsed.as_micros() as u64, "answered"));
    response
}

const UNMATCHED: &str = "unmatched";
/// The route label of a request whose head did not parse.
const UNPARSED: &str = "unparsed";

/// Counts a request answered by the connection layer because its head did
/// not parse (its method is not known: the label is empty).
pub fn count_unparsed_request(status: u16) {
    metrics::counter!(
        "peakstack_http_requests_total",
        "route" => UNPARSED,
        "method" => "",
        "status" => status.to_string()
    )
    .increment(1);
}
/// Most (route, method, status) metric handles a worker thread keeps; past
/// it, requests are counted through the recorder's registry (slower).
const MAX_CACHED_METRIC_HANDLES: usize = 512;

/// The handles of one (route, method, status): incrementing a handle is an
/// atomic add, where `metrics::counter!` builds its labels and looks the
/// series up in the registry on every call.
struct RequestHandles {
    route: Box<str>,
    method: Method,
    status: u16,
    requests: metrics::Counter,
    duration_seconds: metrics::Histogram,
}

thread_local! {
    static HANDLES: RefCell<HashMap<u64, RequestHandles>> = RefCell::new(HashMap::new());
}

fn handles_key(route: &str, method: &Method, status: u16) -> u64 {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    let mut hasher = KEYS.get_or_init(RandomState::new).build_hasher();
    route.hash(&mut hasher);
    method.hash(&mut hasher);
    status.hash(&mut hasher);
    hasher.finish()
}

fn request_handles(route: &str, method: &Method, status: u16) -> RequestHandles {
    let requests = metrics::counter!(
        "peakstack_http_requests_total",
        "route" => route.to_owned(),
        "method" => method.as_str().to_owned(),
        "status" => status.to_string()
    );
    let duration_seconds = metrics::histogram!("peakstack_http_request_duration_seconds", "route" => route.to_owned());
    RequestHandles { route: route.into(), method: method.clone(), status, requests, duration_seconds }
}

/// Counts a request and its latency.
fn record_request(route: &str, method: &Method, status: u16, elapsed_seconds: f64) {
    let key = handles_key(route, method, status);
    HANDLES.with_borrow_mut(|handles| {
        let cached = handles.get(&key).filter(|h| h.status == status && h.method == method && &*h.route == route);
        if let Some(cached) = cached {
            cached.requests.increment(1);
            cached.duration_seconds.record(elapsed_seconds);
            return;
        }
        let fresh = request_handles(route, method, status);
        fresh.requests.increment(1);
        fresh.duration_seconds.record(elapsed_seconds);
        if handles.len() < MAX_CACHED_METRIC_HANDLES && !handles.contains_key(&key) {
            handles.insert(key, fresh);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let long = "r".repeat(MAX_REQUEST_ID_LEN);
        let too_long = "r".repeat(MAX_REQUEST_ID_LEN + 1);
        for (id, ok) in [
            ("abc-123", true),
            ("0b4f2c1e-7c1d-4a7e-9d3a-1c2b3d4e5f60", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("has space", false),
            ("quote\"", false),
        ] {
            assert_eq!(valid_request_id(&HeaderValue::from_str(id).unwrap()), ok, "{id:?}");
        }
        let a = generate_request_id();
        let b = generate_request_id();
        assert_ne!(a, b);
        assert!(valid_request_id(&a));
    }
}
