//! The guard in front of every POST (run by the one middleware,
//! `observe::front`, after access control): it bounds the body and, when
//! the request carries an `Idempotency-Key`, answers a replay from the
//! store or stores the first answer (durably) before it is returned.

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::access::{Principal, INSECURE_KEY_ID};
use crate::error::{ApiError, Transient};
use crate::idempotency::{
    fingerprint, now_ms, valid_key, Busy, LateAnswer, StoredAnswer, MAX_KEY_LEN, MAX_STORED_ANSWER_BYTES,
};
use crate::keyed_outcomes::{short_fingerprint, AnsweredFromLog, ExistedAlready, KeyedOutcome};
use crate::{buffers, AppState};
use peakstack_engine::IdempotencyTag;

/// Largest body of a single-object request.
pub const SINGLE_BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Largest body of `POST /v1/transfers/batch`.
pub const BATCH_BODY_LIMIT_BYTES: usize = 4 * 1024 * 1024;
const BATCH_PATH: &str = "/v1/transfers/batch";

/// The longest a client may take to send a request body; slower clients
/// get 408 (the connection layer bounds the head the same way).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a replay of this answer shows instead of its body: set by answers
/// that carry a secret shown once (a new API key), which is never stored.
#[derive(Clone, Debug)]
pub struct ReplayBody(pub Bytes);

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub fn body_limit(path: &str) -> usize {
    if path == BATCH_PATH {
        BATCH_BODY_LIMIT_BYTES
    } else {
        SINGLE_BODY_LIMIT_BYTES
    }
}

/// Runs a request through the guard if it is a POST, else straight on.
pub async fn post_guard(state: &AppState, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    guarded(state, request, next).await.unwrap_or_else(IntoResponse::into_response)
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let expected = usize::try_from(HttpBody::size_hint(&body).lower()).unwrap_or(usize::MAX).min(limit);
    let read =
        tokio::time::timeout(BODY_READ_TIMEOUT, collect(Limited::new(body, limit), expected)).await.map_err(|_| {
            ApiError::RequestTimeout(format!(
                "the request body took longer than {} s to arrive",
                BODY_READ_TIMEOUT.as_secs()
            ))
        })?;
    match read {
        Ok(bytes) => Ok(bytes),
        Err(error) if error.is::<LengthLimitError>() => {
            Err(ApiError::BodyTooLarge(format!("the request body is larger than {limit} bytes")))
        }
        Err(error) => Err(ApiError::invalid(format!("the request body could not be read: {error}"))),
    }
}

/// The whole body; one of `expected` bytes (its Content-Length) or more
/// is read into a pooled buffer instead of being gathered in fresh ones.
async fn collect(mut body: Limited<Body>, expected: usize) -> Result<Bytes, BoxError> {
    if expected < buffers::MIN_POOLED_BYTES {
        return Ok(body.collect().await?.to_bytes());
    }
    let mut buffer = buffers::take(expected);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffers::into_bytes(buffer))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn guarded(state: &AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let mut keys = request.headers().get_all(&IDEMPOTENCY_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => None,
        (Some(value), None) if valid_key(value.as_bytes()) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        _ => {
            return Err(ApiError::invalid(format!(
                "Idempotency-Key: must be one header of 1 to {MAX_KEY_LEN} printable ASCII characters"
            )))
        }
    };
    let limit = body_limit(request.uri().path());
    let (parts, body) = request.into_parts();
    let bytes = read_body(body, limit).await?;
    let request = Request::from_parts(parts, Body::from(bytes.clone()));
    // Unknown routes answer 404 whatever the key; nothing to remember.
    let (Some(key), true) = (key, request.extensions().get::<MatchedPath>().is_some()) else {
        return Ok(next.run(request).await);
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let fingerprint = fingerprint(request.method().as_str(), path, &bytes);
    // Each API key has its own keys: one caller's key never replays another
    // caller's answer. (A newline cannot occur in a client's key.)
    let key = match request.extensions().get::<Principal>() {
        Some(principal) if principal.key_id.as_ref() != INSECURE_KEY_ID => format!("{}\n{key}", principal.key_id),
        _ => key,
    };
    let store = state.idempotency();
    let key_guard = store.begin(&key).map_err(|busy| match busy {
        Busy::KeyInUse => ApiError::IdempotencyKeyInUse,
        Busy::Full => ApiError::Unavailable("too many requests with an Idempotency-Key in flight".to_owned()),
    })?;
    let stored = store.get(&key).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if let Some(stored) = stored {
        if stored.fingerprint != fingerprint {
            return Err(ApiError::IdempotencyKeyReused);
        }
        return Ok(replay(stored));
    }
    let keyed = Keyed { hash: key_guard.key_hash(), key, fingerprint, body: bytes };
    wait_for_replayed_outcomes(state).await?;
    if let Some(outcome) = keyed_outcome(state, &keyed.hash)? {
        return replay_outcome(&outcome, &keyed);
    }
    let mut request = request;
    let path = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
    let tag = IdempotencyTag { key_hash: keyed.hash, fingerprint: short_fingerprint(&keyed.fingerprint) };
    if path.as_deref() == Some(CREATE_PATH) && state.recent_outcomes().accepting() {
        request.extensions_mut().insert(tag);
    } else if path.as_deref() == Some(CHECKOUT_PATH) {
        // The engine keeps a checkout's key itself (see `Parts::keyed_checkout`).
        request.extensions_mut().insert(tag);
    }

    let mut response = next.run(request).await;
    if let Some(late) = LateAnswer::take(&mut response) {
        // Not decided in time (a 503 not to remember): the key stays in
        // flight until the real answer is, so a retry gets that one.
        let state = state.clone();
        tokio::spawn(async move {
            let answer =
                late.await.unwrap_or_else(|_| ApiError::Internal("the request failed".to_owned()).into_response());
            if let Err(error) = remember(&state, &keyed, answer).await {
                tracing::warn!(%error, "the late answer of a keyed request was not stored");
            }
            drop(key_guard);
        });
        return Ok(response);
    }
    let answer = remember(state, &keyed, response).await;
    drop(key_guard);
    answer
}

/// The route whose keyed answers the engine's log keeps.
const CREATE_PATH: &str = "/v1/transfers";
/// The route whose keyed requests the engine finds again by their key.
const CHECKOUT_PATH: &str = "/v1/checkouts";

/// A keyed request: its key (scoped to its caller), the key's hash, the
/// request's fingerprint and body.
struct Keyed {
    key: String,
    hash: [u8; 16],
    fingerprint: [u8; 32],
    body: Bytes,
}

/// The outcome of a keyed create, held or stored.
fn keyed_outcome(state: &AppState, hash: &[u8; 16]) -> Result<Option<KeyedOutcome>, ApiError> {
    if let Some(outcome) = state.recent_outcomes().get(hash) {
        return Ok(Some(outcome));
    }
    state.access_store().keyed_outcome(hash).map_err(|e| ApiError::Unavailable(e.to_string()))
}

fn replay_outcome(outcome: &KeyedOutcome, keyed: &Keyed) -> Result<Response, ApiError> {
    if outcome.fingerprint != short_fingerprint(&keyed.fingerprint) {
        return Err(ApiError::IdempotencyKeyReused);
    }
    Ok(marked_replayed(crate::handlers::replay_keyed_create(outcome, &keyed.body)?))
}

/// How long a keyed request waits, after a restart, for the audit feed to
/// store the outcomes the engine's replay made again.
const REPLAYED_OUTCOMES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn wait_for_replayed_outcomes(state: &AppState) -> Result<(), ApiError> {
    if state.recent_outcomes().started(state.engine()) {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + REPLAYED_OUTCOMES_WAIT;
    while !state.recent_outcomes().started(state.engine()) {
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable(
                "the answers of keyed requests made before the restart are still being restored; retry shortly"
                    .to_owned(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

/// A keyed create found its transfer made already. If an earlier run of
/// this request made it (its client went away before the answer), that
/// run's outcome reaches the store within the feed's lag: wait until the
/// feed's readers see every batch answered so far (twice, for a
/// transaction whose record was committed a moment before its coordinator
/// published it), and replay it if it is there.
async fn earlier_run(state: &AppState, keyed: &Keyed) -> Result<Option<Response>, ApiError> {
    let deadline = tokio::time::Instant::now() + REPLAYED_OUTCOMES_WAIT;
    for _ in 0..2 {
        let marks = state.engine().audit_produced();
        while !state.engine().audit_visible_up_to(&marks) {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Unavailable(
                    "the transfer exists; the audit feed is behind, so whether this key made it is not known yet: \
                     retry shortly with the same Idempotency-Key"
                        .to_owned(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        if let Some(outcome) = keyed_outcome(state, &keyed.hash)? {
            return replay_outcome(&outcome, keyed).map(Some);
        }
    }
    Ok(None)
}

/// Stores `response` as the key's answer if it is final, and returns it.
/// A keyed create's answer the log keeps is held until the feed stores
/// its outcome instead.
async fn remember(state: &AppState, keyed: &Keyed, response: Response) -> Result<Response, ApiError> {
    if let Some(AnsweredFromLog(outcome)) = response.extensions().get::<AnsweredFromLog>().copied() {
        state.recent_outcomes().insert(keyed.hash, outcome);
        return Ok(response);
    }
    if response.extensions().get::<ExistedAlready>().is_some() {
        if let Some(replayed) = earlier_run(state, keyed).await? {
            return Ok(replayed);
        }
    }
    let store = state.idempotency();
    let (key, fingerprint) = (keyed.key.as_str(), keyed.fingerprint);
    let status = response.status();
    let final_answer = status.is_success() || status.is_client_error();
    if !final_answer || response.extensions().get::<Transient>().is_some() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let replay_body = parts.extensions.get::<ReplayBody>().map(|replay| replay.0.clone());
    let body = match Limited::new(body, MAX_STORED_ANSWER_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => return Err(ApiError::Internal(format!("the answer could not be read: {error}"))),
    };
    let content_type =
        parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_owned();
    let answer = StoredAnswer {
        fingerprint,
        status: status.as_u16(),
        content_type,
        body: replay_body.unwrap_or_else(|| body.clone()),
        created_at_ms: now_ms(),
    };
    store.put(key, answer).await.map_err(|e| {
        ApiError::Unavailable(format!(
            "the answer could not be stored ({e}); the request may have taken effect: retry with the same Idempotency-Key"
        ))
    })?;
    Ok(Response::from_parts(parts, Body::from(body)))
}

fn replay(stored: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body).into_response();
    if let Ok(content_type) = HeaderValue::from_str(&stored.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    }
    marked_replayed(response)
}

/// A replay, whichever way it was remembered: counted and marked.
fn marked_replayed(mut response: Response) -> Response {
    metrics::counter!(crate::observe::IDEMPOTENT_REPLAYS_TOTAL).increment(1);
    response.headers_mut().insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    response
}
