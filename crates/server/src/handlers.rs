//! Thin handlers: parse and validate, call the engine, map the result.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use peakstack_domain::{ErrorCode, Id, TransferRequest};
use peakstack_engine::TransferResult;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{is_transient_code, ledger_detail, ApiError, Transient};
use crate::wire::{
    parse_id, AccountBody, AccountJson, BatchAnswer, BatchBody, BatchItem, Page, PageQuery, PostBody, TransferBody,
    TransferJson, VoidBody,
};
use crate::AppState;

/// Default page size of the list routes.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// Largest page size of the list routes.
pub const MAX_PAGE_LIMIT: usize = 1000;
/// Most transfers in one batch request.
pub const MAX_BATCH_TRANSFERS: usize = 8190;
/// Longest `after` cursor of a transfer page.
const MAX_CURSOR_LEN: usize = 256;

/// `axum::Json`, with its rejections as problem+json.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::BodyTooLarge(rejection.body_text());
    }
    ApiError::InvalidRequest(rejection.body_text())
}

/// `axum::extract::Path`, with its rejections as problem+json.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection: PathRejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

/// `axum::extract::Query`, with its rejections as problem+json.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection: QueryRejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

fn page_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = limit else { return Ok(DEFAULT_PAGE_LIMIT) };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(format!("limit: must be an integer from 1 to {MAX_PAGE_LIMIT}, got {text:?}"))),
    }
}

fn path_id(field: &str, text: &str) -> Result<Id, ApiError> {
    parse_id(field, text).map_err(ApiError::InvalidRequest)
}

pub async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else {
        ApiError::Unavailable("the server is shutting down".to_owned()).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.engine().stats();
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed) as f64;
    metrics::gauge!("peakstack_engine_batches").set(load(&stats.batches));
    metrics::gauge!("peakstack_engine_inputs").set(load(&stats.inputs));
    metrics::gauge!("peakstack_engine_fsyncs").set(load(&stats.fsyncs));
    metrics::gauge!("peakstack_engine_log_bytes").set(load(&stats.log_bytes));
    let handle = state.metrics();
    handle.run_upkeep();
    let mut response = handle.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

pub const OPENAPI_JSON: &str = include_str!("openapi.json");

pub async fn openapi() -> Response {
    let mut response = OPENAPI_JSON.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub async fn create_account(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AccountBody>,
) -> Result<Response, ApiError> {
    let new = body.into_new_account().map_err(ApiError::InvalidRequest)?;
    let id = new.id.clone();
    match state.engine().create_account(new).await {
        Ok((account, created)) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json(status, &AccountJson::from_account(&account)))
        }
        Err(ErrorCode::ExistsWithDifferentFields) => Err(ApiError::Ledger(
            ErrorCode::ExistsWithDifferentFields,
            format!("account {id} exists already, with different fields"),
        )),
        Err(code) => Err(ApiError::ledger(code)),
    }
}

pub async fn get_account(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    match state.engine().account(&id).await.map_err(ApiError::ledger)? {
        Some(account) => Ok(json(StatusCode::OK, &AccountJson::from_account(&account))),
        None => Err(account_not_found(&id)),
    }
}

fn account_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::AccountNotFound, format!("account {id} does not exist"))
}

pub async fn list_accounts(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().map(|after| path_id("after", after)).transpose()?;
    let accounts = state.engine().accounts(after, limit).await.map_err(ApiError::ledger)?;
    let next = (accounts.len() == limit).then(|| accounts.last().map(|a| a.id.to_string())).flatten();
    let data = accounts.iter().map(AccountJson::from_account).collect();
    Ok(json(StatusCode::OK, &Page { data, next }))
}

pub async fn account_transfers(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let limit = page_limit(query.limit.as_deref())?;
    if let Some(after) = &query.after {
        if after.is_empty() || after.len() > MAX_CURSOR_LEN || !after.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::invalid("after: not a cursor this server handed out"));
        }
    }
    if state.engine().account(&id).await.map_err(ApiError::ledger)?.is_none() {
        return Err(account_not_found(&id));
    }
    let (transfers, next) =
        state.engine().account_transfers(&id, query.after, limit).await.map_err(|code| match code {
            ErrorCode::InvalidRequest => ApiError::invalid("after: not a cursor this server handed out"),
            code => ApiError::ledger(code),
        })?;
    let data = transfers.iter().map(TransferJson::from_transfer).collect();
    Ok(json(StatusCode::OK, &Page { data, next }))
}

pub async fn get_transfer(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    match state.engine().transfer(&id).await.map_err(ApiError::ledger)? {
        Some(transfer) => Ok(json(StatusCode::OK, &TransferJson::from_transfer(&transfer))),
        None => Err(ApiError::Ledger(ErrorCode::TransferNotFound, format!("transfer {id} does not exist"))),
    }
}

/// One transfer request through the engine, answered like POST /v1/transfers.
async fn one_transfer(state: &AppState, request: TransferRequest) -> Result<Response, ApiError> {
    let result =
        state.engine().create_transfers(vec![request], false).await.pop().unwrap_or(Err(ErrorCode::Unavailable));
    let outcome = result.map_err(ApiError::ledger)?;
    if outcome.created {
        Ok(json(StatusCode::CREATED, &TransferJson::from_outcome(&outcome)))
    } else {
        Ok(json(StatusCode::OK, &TransferJson::from_transfer(&outcome.transfer)))
    }
}

pub async fn create_transfer(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TransferBody>,
) -> Result<Response, ApiError> {
    let request = body.into_request().map_err(ApiError::InvalidRequest)?;
    one_transfer(&state, request).await
}

pub async fn post_pending(
    State(state): State<AppState>,
    ApiPath(pending_id): ApiPath<String>,
    ApiJson(body): ApiJson<PostBody>,
) -> Result<Response, ApiError> {
    let pending_id = path_id("pending_id", &pending_id)?;
    let request = body.into_request(pending_id).map_err(ApiError::InvalidRequest)?;
    one_transfer(&state, request).await
}

pub async fn void_pending(
    State(state): State<AppState>,
    ApiPath(pending_id): ApiPath<String>,
    ApiJson(body): ApiJson<VoidBody>,
) -> Result<Response, ApiError> {
    let pending_id = path_id("pending_id", &pending_id)?;
    let request = body.into_request(pending_id).map_err(ApiError::InvalidRequest)?;
    one_transfer(&state, request).await
}

pub async fn create_batch(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BatchBody>,
) -> Result<Response, ApiError> {
    let count = body.transfers.len();
    if count == 0 || count > MAX_BATCH_TRANSFERS {
        return Err(ApiError::invalid(format!(
            "transfers: must hold 1 to {MAX_BATCH_TRANSFERS} transfers, got {count}"
        )));
    }
    let mut requests = Vec::with_capacity(count);
    for (index, value) in body.transfers.into_iter().enumerate() {
        let request = serde_json::from_value::<TransferBody>(value)
            .map_err(|e| e.to_string())
            .and_then(TransferBody::into_request)
            .map_err(|detail| ApiError::invalid(format!("transfers[{index}]: {detail}")))?;
        requests.push(request);
    }
    let results = state.engine().create_transfers(requests, body.atomic).await;
    let transient = results.iter().any(|r| matches!(r, Err(code) if is_transient_code(*code)));
    let answer = BatchAnswer { results: results.iter().enumerate().map(|(index, r)| batch_item(index, r)).collect() };
    let mut response = json(StatusCode::OK, &answer);
    if transient {
        response.extensions_mut().insert(Transient);
    }
    Ok(response)
}

fn batch_item(index: usize, result: &TransferResult) -> BatchItem {
    match result {
        Ok(outcome) => BatchItem {
            index,
            status: if outcome.created { "created" } else { "exists" },
            transfer: Some(TransferJson::from_transfer(&outcome.transfer)),
            code: None,
            detail: None,
        },
        Err(code) => BatchItem {
            index,
            status: "error",
            transfer: None,
            code: Some(code.as_str()),
            detail: Some(ledger_detail(*code)),
        },
    }
}

pub async fn unknown_route(request: Request) -> ApiError {
    ApiError::RouteNotFound(format!("{} {}", request.method(), request.uri().path()))
}

pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(request.method().to_string())
}
