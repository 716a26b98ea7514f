//! What every request leaves behind: an `X-Request-Id`, a tracing span, a
//! counter and a latency histogram. And the process's Prometheus recorder.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

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
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "a metrics recorder was installed already; /metrics will be empty");
            }
            handle
        })
        .clone()
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
    HeaderValue::from_str(&format!("{prefix:016x}{n:016x}")).expect("hex is a valid header value")
}

/// The outermost middleware: request id, span, metrics.
pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = match request.headers().get(&X_REQUEST_ID) {
        Some(value) if valid_request_id(value) => value.clone(),
        _ => generate_request_id(),
    };
    request.headers_mut().insert(X_REQUEST_ID.clone(), request_id.clone());
    // Unknown paths share one label, so a scan cannot blow up the series.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %String::from_utf8_lossy(request_id.as_bytes()),
        method = %method,
        route = %route,
        key_id = tracing::field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    response.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!(
        "peakstack_http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("peakstack_http_request_duration_seconds", "route" => route).record(elapsed.as_secs_f64());
    span.in_scope(|| tracing::debug!(status, latency_us = elapsed.as_micros() as u64, "answered"));
    response
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
