//! The admin routes: API keys (create, list, read, revoke) and the audit
//! log. Every change to a key is written with its audit record in one
//! durable write before it takes effect.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::access::{Caller, Scope};
use crate::audit::{action, key_created, key_revoked, AuditFilter};
use crate::error::ApiError;
use crate::handlers::{ApiJson, ApiPath, ApiQuery, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};
use crate::idempotency::now_ms;
use crate::keys::{check_note, generate, is_key_id, KeyRecord, MAX_KEYS};
use crate::post_guard::ReplayBody;
use crate::wire::Page;
use crate::AppState;

/// How long an audit read waits for the records of changes already answered.
const AUDIT_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// Formats epoch milliseconds as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses an RFC 3339 time in UTC into epoch milliseconds.
pub fn parse_rfc3339_ms(field: &str, text: &str) -> Result<u64, String> {
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|_| format!("{field}: {text:?} is not an RFC 3339 time in UTC, e.g. \"2027-01-31T12:00:00Z\""))?;
    let ms = time.duration_since(UNIX_EPOCH).map_err(|_| format!("{field}: before 1970"))?;
    u64::try_from(ms.as_millis()).map_err(|_| format!("{field}: too far in the future"))
}

/// Parses an optional expiry, which must lie after `now_ms`.
pub fn parse_expiry(field: &str, text: Option<&str>, now_ms: u64) -> Result<Option<u64>, String> {
    let Some(text) = text else { return Ok(None) };
    let at_ms = parse_rfc3339_ms(field, text)?;
    if at_ms <= now_ms {
        return Err(format!("{field}: must be in the future"));
    }
    Ok(Some(at_ms))
}

fn parse_time(field: &str, text: &str) -> Result<u64, ApiError> {
    parse_rfc3339_ms(field, text).map_err(ApiError::InvalidRequest)
}

#[derive(Serialize)]
struct KeyJson {
    id: String,
    prefix: String,
    scope: String,
    status: &'static str,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    note: Option<String>,
    created_by: String,
    /// The whole key: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl KeyJson {
    fn new(record: &KeyRecord, now_ms: u64) -> KeyJson {
        KeyJson {
            id: record.id.clone(),
            prefix: record.prefix(),
            scope: record.scope.clone(),
            status: record.status(now_ms).as_str(),
            created_at: rfc3339(record.created_at_ms),
            expires_at: record.expires_at_ms.map(rfc3339),
            revoked_at: record.revoked_at_ms.map(rfc3339),
            note: record.note.clone(),
            created_by: record.created_by.clone(),
            key: None,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    scope: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

fn store_failed(error: crate::AccessStoreError) -> ApiError {
    ApiError::Unavailable(format!("the key store failed ({error}); nothing changed"))
}

pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<KeyBody>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let scope = Scope::parse(&body.scope).map_err(ApiError::InvalidRequest)?;
    let expires_at_ms =
        parse_expiry("expires_at", body.expires_at.as_deref(), now).map_err(ApiError::InvalidRequest)?;
    let note = check_note(body.note).map_err(ApiError::InvalidRequest)?;
    let _changing = state.key_changes().lock().await;
    if state.keys().len() >= MAX_KEYS {
        return Err(ApiError::invalid(format!(
            "this server holds {MAX_KEYS} keys already, the most it keeps; nothing is deleted, so revoked keys count too"
        )));
    }
    let new = generate(&scope, expires_at_ms, note, &caller.principal.key_id, now);
    let record = key_created(&caller.principal.key_id, &caller.request_id, &new.record);
    state.access_store().put_key(new.record.clone(), record).await.map_err(store_failed)?;
    state.keys().put(new.record.clone()).map_err(ApiError::Internal)?;
    tracing::info!(key_id = %new.record.id, scope = %scope, "API key created");

    let mut body = KeyJson::new(&new.record, now);
    // An Idempotency-Key replay answers without the secret: it is shown once
    // and never stored.
    let replay = Bytes::from(serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()))?);
    body.key = Some(new.secret_key);
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response.extensions_mut().insert(ReplayBody(replay));
    Ok(response)
}

pub async fn list_keys(State(state): State<AppState>) -> Response {
    let now = now_ms();
    let data: Vec<KeyJson> = state.keys().list().iter().map(|record| KeyJson::new(record, now)).collect();
    Json(Page { data, next: None }).into_response()
}

fn find_key(state: &AppState, id: &str) -> Result<KeyRecord, ApiError> {
    // Ids are 16 hex digits. Anything else is not echoed: it may be a whole
    // key pasted by mistake.
    let detail = if is_key_id(id) {
        format!("API key {id} does not exist")
    } else {
        "no API key has this id (a key id is 16 hex digits)".to_owned()
    };
    state.keys().get(id).ok_or(ApiError::KeyNotFound(detail))
}

pub async fn get_key(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let record = find_key(&state, &id)?;
    Ok(Json(KeyJson::new(&record, now_ms())).into_response())
}

/// Revokes a key at once; revoking a revoked key answers it again. The last
/// active admin key cannot be revoked: nobody could manage keys after it.
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let _changing = state.key_changes().lock().await;
    let now = now_ms();
    let mut record = find_key(&state, &id)?;
    if record.revoked_at_ms.is_some() {
        return Ok(Json(KeyJson::new(&record, now)).into_response());
    }
    if record.scope == "admin" && state.keys().other_active_admins(&record.id, now) == 0 {
        return Err(ApiError::LastAdminKey(format!(
            "key {id} is the last active admin key; create another admin key before revoking it"
        )));
    }
    record.revoked_at_ms = Some(now);
    let audit = key_revoked(&caller.principal.key_id, &caller.request_id, &record);
    state.access_store().put_key(record.clone(), audit).await.map_err(store_failed)?;
    state.keys().put(record.clone()).map_err(ApiError::Internal)?;
    tracing::info!(key_id = %record.id, "API key revoked");
    Ok(Json(KeyJson::new(&record, now)).into_response())
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    key_id: Option<String>,
    action: Option<String>,
    target: Option<String>,
    request_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize)]
struct AuditJson {
    seq: u64,
    at: String,
    key_id: String,
    request_id: String,
    action: String,
    target: String,
    details: Value,
}

/// `GET /v1/audit`: records oldest first, filtered by any of key id,
/// action, target (a batch matches any transfer it made), request id and
/// a time window `[since, until)`.
pub async fn audit(State(state): State<AppState>, ApiQuery(query): ApiQuery<AuditQuery>) -> Result<Response, ApiError> {
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::invalid(format!("limit: must be an integer from 1 to {MAX_PAGE_LIMIT}"))),
        },
    };
    let after = match query.after.as_deref() {
        None => 0,
        Some(text) => {
            text.parse::<u64>().map_err(|_| ApiError::invalid("after: not a cursor this server handed out"))?
        }
    };
    if let Some(wanted) = query.action.as_deref() {
        if !action::ALL.contains(&wanted) {
            return Err(ApiError::invalid(format!("action: {wanted:?} is not one of {}", action::ALL.join(", "))));
        }
    }
    for (field, value) in [("key_id", &query.key_id), ("target", &query.target), ("request_id", &query.request_id)] {
        if value.as_ref().is_some_and(|v| v.is_empty() || v.chars().count() > 255) {
            return Err(ApiError::invalid(format!("{field}: 1 to 255 characters")));
        }
    }
    let filter = AuditFilter {
        key_id: query.key_id,
        action: query.action,
        target: query.target,
        request_id: query.request_id,
        since_ms: query.since.as_deref().map(|t| parse_time("since", t)).transpose()?,
        until_ms: query.until.as_deref().map(|t| parse_time("until", t)).transpose()?,
    };
    // Read your writes: the records of changes already answered are in.
    let deadline = std::time::Instant::now() + AUDIT_CATCH_UP_TIMEOUT;
    while !state.engine().audit_caught_up() {
        if std::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable(
                "the audit log is still storing the records of recent changes; retry shortly".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let page = state
        .access_store()
        .query(filter, after, limit)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the audit log could not be read: {e}")))?;
    let data: Vec<AuditJson> = page
        .records
        .into_iter()
        .map(|r| AuditJson {
            seq: r.seq,
            at: rfc3339(r.at_ms),
            key_id: r.key_id,
            request_id: r.request_id,
            action: r.action,
            target: r.target,
            details: r.details,
        })
        .collect();
    Ok(Json(Page { data, next: page.next.map(|seq| seq.to_string()) }).into_response())
}
