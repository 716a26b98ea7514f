//! Thin handlers: parse and validate, call the engine, map the result.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use peakstack_domain::{Account, ErrorCode, Id, NewAccount, Transfer, TransferRequest};
use peakstack_engine::{Engine, Origin};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::future::Future;

use crate::access::{check_transfer_namespace, AuthMode, Caller, Denied, Principal, Scope};
use crate::audit::{action, AuditRecord};
use crate::error::{is_transient_code, ApiError, Transient};
use crate::idempotency::{now_ms, LateAnswer};
use crate::keyed_outcomes::{AnsweredFromLog, ExistedAlready, KeyedOutcome};
use crate::post_guard::BATCH_BODY_LIMIT_BYTES;
use crate::wire::{
    parse_id, AccountBody, AccountJson, BatchBody, Page, PageQuery, PostBody, TransferBody, TransferJson, VoidBody,
};
use crate::{answer_json, buffers, json_errors, AppState};

/// Default page size of the list routes.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// Largest page size of the list routes.
pub const MAX_PAGE_LIMIT: usize = 1000;
/// Most transfers in one batch request.
pub const MAX_BATCH_TRANSFERS: usize = 8190;
/// Accounts read per engine call when a list is filtered to a tenant.
const TENANT_SCAN_PAGE: usize = 1000;
/// Most accounts one filtered list request reads; past it the page ends
/// early (possibly short) with a `next` cursor to continue from.
pub const MAX_TENANT_SCAN: usize = 100_000;

/// A JSON body as `T`: a content type other than JSON is 415, a body that
/// is not a `T` says which field breaks which rule ([`json_errors`]).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        JsonBody::from_request(request, state).await?.owned().await.map(ApiJson)
    }
}

/// A JSON body whose strings a handler may borrow (see
/// [`JsonBody::borrowed`]). Answers exactly like [`ApiJson`]: only what
/// `ApiJson` would accept is read borrowed, everything else goes through it.
pub struct JsonBody {
    parts: Parts,
    bytes: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        check_json_content_type(&parts.headers)?;
        // The POST guard has read and bounded the body: this takes its bytes.
        let bytes = axum::body::to_bytes(body, BATCH_BODY_LIMIT_BYTES).await.map_err(|_| {
            ApiError::BodyTooLarge(format!("the request body is larger than {BATCH_BODY_LIMIT_BYTES} bytes"))
        })?;
        Ok(JsonBody { parts, bytes })
    }
}

impl JsonBody {
    /// The body as `T`, with strings borrowed from it, when it says it is
    /// `application/json` and parses as `T` (with no escapes in the strings
    /// `T` borrows); `None` otherwise: then [`JsonBody::owned`] answers.
    pub fn borrowed<'a, T: Deserialize<'a>>(&'a self) -> Option<T> {
        let content_type = self.parts.headers.get(header::CONTENT_TYPE)?;
        if content_type.as_bytes() != b"application/json" {
            return None;
        }
        serde_json::from_slice(&self.bytes).ok()
    }

    /// The body as [`ApiJson`] reads it: the value, or why it is not one.
    pub async fn owned<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        json_errors::parse(&self.bytes).map_err(ApiError::InvalidRequest)
    }
}

/// Whether a Content-Type names JSON: `application/json`, with at most a
/// `charset=utf-8` parameter (JSON is UTF-8, RFC 8259), in any case.
pub fn is_json_content_type(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else { return false };
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        && parts.all(|parameter| {
            let parameter = parameter.trim();
            parameter.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("charset")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        })
}

/// 415 unless the request says its body is JSON.
pub fn check_json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        Some(value) if is_json_content_type(value) => Ok(()),
        Some(value) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type: the body must be application/json (optionally with charset=utf-8), not {:?}",
            String::from_utf8_lossy(value.as_bytes())
        ))),
        None => {
            Err(ApiError::UnsupportedMediaType("Content-Type: missing; the body must be application/json".to_owned()))
        }
    }
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
            .map_err(|rejection: QueryRejection| ApiError::InvalidRequest(query_detail(&rejection.body_text())))
    }
}

/// A query string that does not parse, in the API's terms. (Unknown
/// parameters never get here: the front middleware refuses them.)
fn query_detail(text: &str) -> String {
    let inner = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(text);
    match inner.strip_prefix("duplicate field `").and_then(|rest| rest.split_once('`')) {
        Some((name, _)) => format!("{name}: given more than once"),
        None => format!("the query string: {inner}"),
    }
}

/// About the size of one transfer's JSON answer.
const TRANSFER_JSON_BYTES: usize = 512;
/// Room for one item of a batch's answer: with ids of about 30 characters
/// an item is 340 bytes. A hint too small doubles the buffer halfway, by
/// copying into fresh pages.
const BATCH_ITEM_BYTES: usize = 448;

pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    json_sized(status, body, TRANSFER_JSON_BYTES)
}

/// A JSON answer serialized into one buffer of about `size_hint` bytes
/// (axum's `Json` starts at 128 bytes and grows by copying).
fn json_sized<T: Serialize>(status: StatusCode, body: &T, size_hint: usize) -> Response {
    let mut buffer = buffers::take(size_hint);
    match serde_json::to_writer(&mut buffer, body) {
        Ok(()) => json_bytes(status, buffer),
        Err(error) => ApiError::Internal(format!("the answer could not be serialized: {error}")).into_response(),
    }
}

/// A JSON answer written by hand ([`answer_json`]) into one buffer of about
/// `size_hint` bytes.
fn json_written(status: StatusCode, size_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Response {
    let mut buffer = buffers::take(size_hint);
    write(&mut buffer);
    json_bytes(status, buffer)
}

fn json_bytes(status: StatusCode, buffer: Vec<u8>) -> Response {
    let mut response = (status, buffers::into_bytes(buffer)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn transfer_answer(status: StatusCode, transfer: &TransferJson<'_>) -> Response {
    json_written(status, TRANSFER_JSON_BYTES, |out| answer_json::transfer(out, transfer))
}

pub(crate) fn page_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = limit else { return Ok(DEFAULT_PAGE_LIMIT) };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(format!("limit: must be an integer from 1 to {MAX_PAGE_LIMIT}, got {text:?}"))),
    }
}

/// When a request's engine calls must be decided by: the server's
/// `request_deadline` after the handler started.
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    at: tokio::time::Instant,
    after: std::time::Duration,
}

impl Deadline {
    pub(crate) fn of(state: &AppState) -> Deadline {
        let after = state.request_deadline();
        Deadline { at: tokio::time::Instant::now() + after, after }
    }

    fn exceeded(self, what: &str) -> ApiError {
        ApiError::DeadlineExceeded(format!("the ledger did not answer within {} ms; {what}", self.after.as_millis()))
    }
}

/// Engine reads by `deadline`: a read that comes too late is dropped
/// (it changes nothing) and answered `deadline_exceeded`.
pub(crate) async fn read_within<T>(
    deadline: Deadline,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout_at(deadline.at, read).await {
        Ok(answer) => answer,
        Err(_) => Err(deadline.exceeded("nothing changed: retry shortly")),
    }
}

/// A change by `deadline`. `work` (the engine call and the answer made of
/// its result) runs in a task of its own, so the engine's decision is never
/// cancelled: the change is made or refused as usual. If it is not decided
/// in time the answer is `deadline_exceeded` (with `pending`, saying how to
/// learn the outcome), carrying the answer-to-be for the Idempotency-Key.
pub(crate) async fn decide_within(
    deadline: Deadline,
    pending: &str,
    work: impl Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    let mut task = tokio::spawn(async move { work.await.unwrap_or_else(IntoResponse::into_response) });
    match tokio::time::timeout_at(deadline.at, &mut task).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(ApiError::Internal("the request failed while the ledger decided it".to_owned())),
        Err(_) => {
            let mut answer = deadline.exceeded(pending).into_response();
            answer.extensions_mut().insert(LateAnswer::new(task));
            Ok(answer)
        }
    }
}

/// As [`decide_within`], for work that is one engine call and the answer
/// made of its result (transfers, batches): polled on the caller's task,
/// and moved into a task of its own only when the deadline passes. A task
/// per request is woken on another worker thread: `loadtest transfers`
/// (one transfer a request, fresh server per run, alternated with the
/// build before deadlines) ran 4-20% slower with a task, within noise of
/// that build polled here (0.86-1.07 of it in four runs). Dropping
/// the work early (the client went away) loses no part of a change: the
/// engine has the call after the first poll, its audit record rides the
/// engine's log, and only the answer is left to make.
pub(crate) async fn decide_call_within(
    deadline: Deadline,
    pending: &str,
    work: impl Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    let mut work = Box::pin(work);
    match tokio::time::timeout_at(deadline.at, &mut work).await {
        Ok(answer) => answer,
        Err(_) => {
            let task = tokio::spawn(async move { work.await.unwrap_or_else(IntoResponse::into_response) });
            let mut answer = deadline.exceeded(pending).into_response();
            answer.extensions_mut().insert(LateAnswer::new(task));
            Ok(answer)
        }
    }
}

pub(crate) fn path_id(field: &str, text: &str) -> Result<Id, ApiError> {
    parse_id(field, text).map_err(ApiError::InvalidRequest)
}

/// The pending transfer a post or void names: never a reserved id, which
/// only the system's own transfers have.
fn pending_path_id(text: &str) -> Result<Id, ApiError> {
    let id = path_id("pending_id", text)?;
    if id.is_reserved() {
        return Err(ApiError::invalid("pending_id: ids starting with '_' are reserved for the system"));
    }
    Ok(id)
}

pub async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        let body = match state.auth_mode() {
            AuthMode::ApiKeys => serde_json::json!({"status": "ready", "auth": "api_keys"}),
            AuthMode::InsecureNoAuth => serde_json::json!({
                "status": "ready",
                "auth": "disabled",
                "warning": "authentication is off (--insecure-no-auth): every caller is an admin; for local development only",
            }),
        };
        json(StatusCode::OK, &body)
    } else {
        ApiError::Unavailable("the server is shutting down".to_owned()).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::observe::record_engine_stats(state.engine());
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

/// A refusal at object level as an answer: hidden objects answer like
/// missing ones.
pub(crate) fn refused(denied: Denied, hidden: impl FnOnce() -> ApiError) -> ApiError {
    match denied {
        Denied::Hidden => hidden(),
        Denied::Forbidden(detail) => ApiError::Forbidden(detail),
    }
}

/// Appends the audit record of a change that took effect. The answer waits
/// for it: an acknowledged change always has its record.
pub(crate) async fn audit(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    details: Value,
) -> Result<(), ApiError> {
    let record = AuditRecord::new(&caller.principal.key_id, &caller.request_id, action, target, details, now_ms());
    state.access_store().append(record).await.map(|_| ()).map_err(|error| {
        tracing::error!(%error, action, target, "a change took effect but its audit record was not written");
        ApiError::Unavailable(format!(
            "the change took effect, but its audit record could not be written ({error}); retry to read the result"
        ))
    })
}

pub async fn create_account(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<AccountBody>,
) -> Result<Response, ApiError> {
    let mut new = body.into_new_account().map_err(ApiError::InvalidRequest)?;
    let id = new.id.clone();
    caller.principal.may_create_id(&id).map_err(|d| refused(d, || account_not_found(&id)))?;
    new.owner =
        caller.principal.owner_for_new_account(new.owner.take()).map_err(|d| refused(d, || account_not_found(&id)))?;
    crate::access::check_namespace_owner(&id, new.owner.as_ref()).map_err(ApiError::InvalidRequest)?;
    let deadline = Deadline::of(&state);
    let pending = format!("account {id} may still be opened: read it at /v1/accounts/{id}, or retry");
    decide_within(deadline, &pending, open_account(state, caller, id, new)).await
}

/// The engine's part of `create_account` (run by [`decide_within`]).
async fn open_account(state: AppState, caller: Caller, id: Id, new: NewAccount) -> Result<Response, ApiError> {
    match state.engine().create_account(new).await {
        Ok((account, created)) => {
            if created {
                let details = serde_json::json!({
                    "currency": account.currency.to_string(),
                    "owner": account.owner.as_ref().map(ToString::to_string),
                });
                audit(&state, &caller, action::ACCOUNT_CREATE, id.as_str(), details).await?;
            }
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

pub async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let account = read_within(Deadline::of(&state), visible_account(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &AccountJson::from_account(&account)))
}

/// Account `id`, if it exists and the caller may see it; else the same
/// `account_not_found` either way.
pub(crate) async fn visible_account(state: &AppState, principal: &Principal, id: &Id) -> Result<Account, ApiError> {
    match state.engine().account(id).await.map_err(ApiError::ledger)? {
        Some(account) if principal.can_see(account.owner.as_ref()) => Ok(account),
        _ => Err(account_not_found(id)),
    }
}

pub(crate) fn account_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::AccountNotFound, format!("account {id} does not exist"))
}

pub async fn list_accounts(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().map(|after| path_id("after", after)).transpose()?;
    let deadline = Deadline::of(&state);
    let (accounts, next) = if caller.principal.sees_everything() {
        let read = async { state.engine().accounts(after, limit).await.map_err(ApiError::ledger) };
        let accounts = read_within(deadline, read).await?;
        let next = (accounts.len() == limit).then(|| accounts.last().map(|a| a.id.to_string())).flatten();
        (accounts, next)
    } else {
        read_within(deadline, tenant_accounts(&state, &caller.principal, after, limit)).await?
    };
    let data = accounts.iter().map(AccountJson::from_account).collect();
    Ok(json(StatusCode::OK, &Page { data, next }))
}

/// The caller's own accounts after `after`, in id order: a bounded scan
/// ([`MAX_TENANT_SCAN`]) that may end a page early with a cursor.
async fn tenant_accounts(
    state: &AppState,
    principal: &Principal,
    mut after: Option<Id>,
    limit: usize,
) -> Result<(Vec<Account>, Option<String>), ApiError> {
    let mut own = Vec::new();
    let mut scanned = 0;
    loop {
        let page = state.engine().accounts(after.clone(), TENANT_SCAN_PAGE).await.map_err(ApiError::ledger)?;
        let full = page.len() == TENANT_SCAN_PAGE;
        scanned += page.len();
        after = page.last().map(|a| a.id.clone());
        for account in page {
            if principal.can_see(account.owner.as_ref()) {
                own.push(account);
                if own.len() == limit {
                    let next = own.last().map(|a| a.id.to_string());
                    return Ok((own, next));
                }
            }
        }
        if !full {
            return Ok((own, None));
        }
        if scanned >= MAX_TENANT_SCAN {
            return Ok((own, after.map(|id| id.to_string())));
        }
    }
}

pub async fn get_transfer(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let not_found = || ApiError::Ledger(ErrorCode::TransferNotFound, format!("transfer {id} does not exist"));
    let read = async {
        let transfer = state.engine().transfer(&id).await.map_err(|code| match code {
            ErrorCode::InFlight => {
                ApiError::Ledger(code, format!("transfer {id} is being decided right now; ask again shortly"))
            }
            code => ApiError::ledger(code),
        })?;
        let Some(transfer) = transfer else { return Err(not_found()) };
        if !caller.principal.sees_everything() {
            let (debit, credit) = transfer_owners(&state, &transfer).await?;
            if !caller.principal.can_see_transfer(debit.as_ref(), credit.as_ref()) {
                return Err(not_found());
            }
        }
        Ok(transfer)
    };
    let transfer = read_within(Deadline::of(&state), read).await?;
    Ok(transfer_answer(StatusCode::OK, &TransferJson::from_transfer(&transfer)))
}

/// The owners of a transfer's two accounts (which exist: the ledger
/// checked them when it made the transfer).
async fn transfer_owners(
    state: &AppState,
    transfer: &Transfer,
) -> Result<(Option<peakstack_domain::Owner>, Option<peakstack_domain::Owner>), ApiError> {
    let debit = state.owner_of(&transfer.debit_account_id).await?.flatten();
    let credit = state.owner_of(&transfer.credit_account_id).await?.flatten();
    Ok((debit, credit))
}

/// Whether the caller may make `request`: move money out of the debit
/// account, or settle the pending transfer. What the caller may not see
/// answers as missing. A transfer id in a tenant's namespace must move
/// that tenant's money, whoever asks ([`check_transfer_namespace`]).
async fn authorize_transfer(
    state: &AppState,
    principal: &Principal,
    request: &TransferRequest,
) -> Result<(), ApiError> {
    principal.may_create_id(request.id()).map_err(|d| refused(d, || account_not_found(request.id())))?;
    let admin = principal.scope == Scope::Admin;
    let namespaced = request.id().namespace().is_some();
    if admin && !namespaced {
        return Ok(());
    }
    let (debit, credit) = match request {
        TransferRequest::Create { debit_account_id, credit_account_id, .. } => {
            let debit = state.owner_of(debit_account_id).await?;
            if !admin {
                let not_found = || account_not_found(debit_account_id);
                let owner = debit.as_ref().ok_or_else(not_found)?;
                principal.can_debit(owner.as_ref()).map_err(|d| refused(d, not_found))?;
            }
            if !namespaced
                || check_transfer_namespace(request.id(), debit.as_ref().and_then(Option::as_ref), None).is_ok()
            {
                return Ok(());
            }
            // Neither side may be missing: a missing one answers as the
            // ledger would, rather than letting its later opening decide.
            let debit = debit.ok_or_else(|| account_not_found(debit_account_id))?;
            let credit =
                state.owner_of(credit_account_id).await?.ok_or_else(|| account_not_found(credit_account_id))?;
            (debit, credit)
        }
        TransferRequest::Post { pending_id, .. } | TransferRequest::Void { pending_id, .. } => {
            let not_found = || {
                ApiError::Ledger(
                    ErrorCode::PendingTransferNotFound,
                    format!("pending transfer {pending_id} does not exist"),
                )
            };
            let pending = state.engine().transfer(pending_id).await.map_err(ApiError::ledger)?.ok_or_else(not_found)?;
            let (debit, credit) = transfer_owners(state, &pending).await?;
            if !admin {
                principal.can_settle(debit.as_ref(), credit.as_ref()).map_err(|d| refused(d, not_found))?;
            }
            (debit, credit)
        }
    };
    check_transfer_namespace(request.id(), debit.as_ref(), credit.as_ref()).map_err(ApiError::Forbidden)
}

/// One transfer request through the engine, answered like POST /v1/transfers.
async fn one_transfer(state: &AppState, caller: &Caller, request: TransferRequest) -> Result<Response, ApiError> {
    let deadline = Deadline::of(state);
    read_within(deadline, authorize_transfer(state, &caller.principal, &request)).await?;
    let id = request.id();
    let pending = format!(
        "transfer {id} may still be made: read it at /v1/transfers/{id}, or retry with the same id or Idempotency-Key"
    );
    decide_call_within(deadline, &pending, make_transfer(state.engine().clone(), request, caller.origin())).await
}

/// The engine's part of [`one_transfer`] (run by [`decide_call_within`]).
async fn make_transfer(engine: Engine, request: TransferRequest, origin: Origin) -> Result<Response, ApiError> {
    let keyed = origin.idempotency;
    let results = engine.create_transfers_as(vec![request], false, Some(origin)).await;
    crate::observe::count_ledger_results(&results);
    let outcome = results.into_iter().next().unwrap_or(Err(ErrorCode::Unavailable)).map_err(ApiError::ledger)?;
    if outcome.created {
        let mut answer = transfer_answer(StatusCode::CREATED, &TransferJson::from_outcome(&outcome));
        if let Some(tag) = keyed {
            answer.extensions_mut().insert(AnsweredFromLog(KeyedOutcome::of_answer(tag, &outcome)));
        }
        Ok(answer)
    } else {
        let mut answer = transfer_answer(StatusCode::OK, &TransferJson::from_transfer(&outcome.transfer));
        if keyed.is_some() {
            answer.extensions_mut().insert(ExistedAlready);
        }
        Ok(answer)
    }
}

/// The replay of a keyed create from its outcome: the retried body (the
/// same request, by its fingerprint) read as the handler reads it, the
/// record rebuilt as the engine built it, the same serializer.
pub fn replay_keyed_create(outcome: &KeyedOutcome, body: &[u8]) -> Result<Response, ApiError> {
    let unreadable =
        || ApiError::Internal("the stored outcome of this Idempotency-Key does not fit its request".to_owned());
    let fields: TransferBody = serde_json::from_slice(body).map_err(|_| unreadable())?;
    let request = fields.into_request().map_err(|_| unreadable())?;
    let outcome = outcome.answer(&request).ok_or_else(unreadable)?;
    Ok(transfer_answer(StatusCode::CREATED, &TransferJson::from_outcome(&outcome)))
}

pub async fn create_transfer(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let request = match body.borrowed::<TransferBody<&str>>() {
        Some(fields) => fields.into_request(),
        None => body.owned::<TransferBody>().await?.into_request(),
    };
    one_transfer(&state, &caller, request.map_err(ApiError::InvalidRequest)?).await
}

pub async fn post_pending(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(pending_id): ApiPath<String>,
    ApiJson(body): ApiJson<PostBody>,
) -> Result<Response, ApiError> {
    let pending_id = pending_path_id(&pending_id)?;
    let request = body.into_request(pending_id).map_err(ApiError::InvalidRequest)?;
    one_transfer(&state, &caller, request).await
}

pub async fn void_pending(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(pending_id): ApiPath<String>,
    ApiJson(body): ApiJson<VoidBody>,
) -> Result<Response, ApiError> {
    let pending_id = pending_path_id(&pending_id)?;
    let request = body.into_request(pending_id).map_err(ApiError::InvalidRequest)?;
    one_transfer(&state, &caller, request).await
}

pub async fn create_batch(State(state): State<AppState>, caller: Caller, body: JsonBody) -> Result<Response, ApiError> {
    let owned: BatchBody;
    let (transfers, atomic): (Vec<&RawValue>, bool) = match body.borrowed::<BatchBody<&RawValue>>() {
        Some(borrowed) => (borrowed.transfers, borrowed.atomic),
        None => {
            owned = body.owned().await?;
            (owned.transfers.iter().map(AsRef::as_ref).collect(), owned.atomic)
        }
    };
    let count = transfers.len();
    if count == 0 || count > MAX_BATCH_TRANSFERS {
        return Err(ApiError::invalid(format!(
            "transfers: must hold 1 to {MAX_BATCH_TRANSFERS} transfers, got {count}"
        )));
    }
    let mut requests = Vec::with_capacity(count);
    for (index, raw) in transfers.iter().enumerate() {
        let request = match serde_json::from_str::<TransferBody<&str>>(raw.get()) {
            Ok(fields) => fields.into_request(),
            // Escapes in a string, or not a transfer: read it owned, for
            // the value or the error it always gave.
            Err(_) => match serde_json::from_str::<TransferBody>(raw.get()) {
                Ok(fields) => fields.into_request(),
                Err(_) => {
                    let at = format!("transfers[{index}]");
                    return Err(ApiError::invalid(json_errors::explain::<TransferBody>(&at, raw.get())));
                }
            },
        }
        .map_err(|detail| ApiError::invalid(format!("transfers[{index}].{detail}")))?;
        requests.push(request);
    }
    refuse_duplicate_ids(&requests)?;
    let deadline = Deadline::of(&state);
    // Every transfer is checked before any is made: a batch the caller may
    // not make in full changes nothing.
    let authorized = async {
        for (index, request) in requests.iter().enumerate() {
            authorize_transfer(&state, &caller.principal, request).await.map_err(|error| at_index(index, error))?;
        }
        Ok(())
    };
    read_within(deadline, authorized).await?;
    let pending = "its transfers may still be made: read them by id, or retry the batch with the same ids or \
                   Idempotency-Key";
    let (engine, origin) = (state.engine().clone(), caller.origin());
    decide_call_within(deadline, pending, async move {
        let results = engine.create_transfers_as(requests, atomic, Some(origin)).await;
        crate::observe::count_ledger_results(&results);
        Ok(batch_response(&results, atomic))
    })
    .await
}

/// A batch naming one id twice is refused whole, before the engine: the
/// later transfer could never be made (see `peakstack_engine::batch_ids`).
fn refuse_duplicate_ids(requests: &[TransferRequest]) -> Result<(), ApiError> {
    match peakstack_engine::batch_ids::duplicates(requests).first() {
        None => Ok(()),
        Some(duplicate) => Err(ApiError::Ledger(
            ErrorCode::DuplicateIdInBatch,
            format!(
                "transfers[{}]: id {} is also the id of transfers[{}]; the ids of a batch must differ",
                duplicate.index,
                requests[duplicate.index].id(),
                duplicate.first
            ),
        )),
    }
}

fn batch_response(results: &[peakstack_engine::TransferResult], atomic: bool) -> Response {
    let transient = results.iter().any(|r| matches!(r, Err(code) if is_transient_code(*code)));
    let cause = if atomic { atomic_failure_cause(results) } else { None };
    let mut response = json_written(StatusCode::OK, BATCH_ITEM_BYTES * results.len(), |out| {
        answer_json::batch_answer(out, results, cause)
    });
    if transient {
        response.extensions_mut().insert(Transient);
    }
    response
}

/// Why an atomic batch was not applied: the first item that failed, or
/// that exists already while others do not (a batch is made whole or not
/// at all, so one item made earlier keeps the new ones from being made).
/// `None` when the batch was applied, or when every item exists (a retry).
fn atomic_failure_cause(results: &[peakstack_engine::TransferResult]) -> Option<usize> {
    if !results.iter().any(|r| matches!(r, Err(ErrorCode::LinkedEventFailed))) {
        return None;
    }
    results.iter().position(|r| match r {
        Ok(outcome) => !outcome.created,
        Err(code) => *code != ErrorCode::LinkedEventFailed,
    })
}

/// An error about the batch's transfer `index`, saying so.
fn at_index(index: usize, error: ApiError) -> ApiError {
    match error {
        ApiError::Ledger(code, detail) => ApiError::Ledger(code, format!("transfers[{index}]: {detail}")),
        ApiError::Forbidden(detail) => ApiError::Forbidden(format!("transfers[{index}]: {detail}")),
        other => other,
    }
}

pub async fn unknown_route(request: Request) -> ApiError {
    ApiError::RouteNotFound(format!("{} {}", request.method(), request.uri().path()))
}

pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(request.method().to_string())
}
