//! `GET /v1/transfers` and `GET /v1/accounts/{id}/transfers`: transfers
//! newest first, filtered, paged (the walk is the engine's, see
//! `peakstack_engine::listing`).
//!
//! Who lists what: admin and read keys list the whole ledger, or one
//! account's transfers (`account_id`). A tenant key (merchant, app) lists
//! only through an account it sees (`account_id`: another tenant's answers
//! 404 like a missing one) or a pending transfer it sees (`pending_id`),
//! and is refused (403) the whole ledger. So a tenant's walk only ever
//! passes transfers of its own accounts: no page, count or cursor depends
//! on another tenant's transfers. Every transfer of an account it sees is
//! one it may read (it sees one side), as `GET /v1/transfers/{id}` decides.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{ErrorCode, Id, TransferKind, TransferStatus};
use peakstack_engine::{TransferFilter, TransferPage, TransferSource};
use serde::Deserialize;

use crate::access::{Caller, Principal};
use crate::admin::parse_rfc3339_ms;
use crate::handlers::{json, page_limit, path_id, read_within, visible_account, ApiPath, ApiQuery, Deadline};
use crate::wire::{Page, TransferJson};
use crate::{ApiError, AppState};

/// Longest `after` cursor: a whole-ledger one holds an offset per executor.
const MAX_CURSOR_LEN: usize = 2048;

/// The query of `GET /v1/transfers` (names as in `lib.rs::query_parameters`).
#[derive(Deserialize, Debug)]
pub struct TransferListQuery {
    limit: Option<String>,
    after: Option<String>,
    account_id: Option<String>,
    status: Option<String>,
    pending_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// The query of `GET /v1/accounts/{id}/transfers`.
#[derive(Deserialize, Debug)]
pub struct AccountTransfersQuery {
    limit: Option<String>,
    after: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

pub async fn list_transfers(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<TransferListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let after = cursor(query.after)?;
    let account = query.account_id.as_deref().map(|text| path_id("account_id", text)).transpose()?;
    let pending_id = query.pending_id.as_deref().map(|text| path_id("pending_id", text)).transpose()?;
    let filter = TransferFilter {
        pending_id,
        ..filter(query.status.as_deref(), query.since.as_deref(), query.until.as_deref())?
    };
    if account.is_none() && filter.pending_id.is_none() && !caller.principal.sees_everything() {
        return Err(ApiError::Forbidden(
            "this key lists the transfers of one of its accounts or pending transfers: give account_id or pending_id"
                .to_owned(),
        ));
    }
    let read = async {
        let source = match (account, &filter.pending_id) {
            (Some(account), _) => {
                visible_account(&state, &caller.principal, &account).await?;
                TransferSource::Account(account)
            }
            (None, Some(pending_id)) => match pending_chain(&state, &caller.principal, pending_id).await? {
                Some(account) => TransferSource::Account(account),
                None => return Ok(TransferPage { transfers: Vec::new(), next: None }),
            },
            (None, None) => TransferSource::All,
        };
        walk(&state, &source, &filter, after.as_deref(), limit).await
    };
    let page = read_within(Deadline::of(&state), read).await?;
    Ok(answer(&page))
}

pub async fn account_transfers(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<AccountTransfersQuery>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let limit = page_limit(query.limit.as_deref())?;
    let after = cursor(query.after)?;
    let filter = filter(query.status.as_deref(), query.since.as_deref(), query.until.as_deref())?;
    let read = async {
        visible_account(&state, &caller.principal, &id).await?;
        walk(&state, &TransferSource::Account(id.clone()), &filter, after.as_deref(), limit).await
    };
    let page = read_within(Deadline::of(&state), read).await?;
    Ok(answer(&page))
}

fn answer(page: &TransferPage) -> Response {
    let data = page.transfers.iter().map(TransferJson::from_transfer).collect();
    json(StatusCode::OK, &Page { data, next: page.next.clone() })
}

async fn walk(
    state: &AppState,
    source: &TransferSource,
    filter: &TransferFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<TransferPage, ApiError> {
    state.engine().list_transfers(source, filter, after, limit).await.map_err(|code| match code {
        ErrorCode::InvalidRequest => not_a_cursor(),
        code => ApiError::ledger(code),
    })
}

/// The account whose history holds the posts and voids of `pending_id`, on
/// a side the caller sees; `None` when there is no such pending transfer
/// or the caller may not see it (the same empty answer either way).
async fn pending_chain(state: &AppState, principal: &Principal, pending_id: &Id) -> Result<Option<Id>, ApiError> {
    let pending = match state.engine().transfer(pending_id).await {
        Ok(Some(pending)) if matches!(pending.kind, TransferKind::Pending { .. }) => pending,
        // Being decided: not posted or voided yet either.
        Ok(_) | Err(ErrorCode::InFlight) => return Ok(None),
        Err(code) => return Err(ApiError::ledger(code)),
    };
    if principal.sees_everything() {
        return Ok(Some(pending.debit_account_id));
    }
    let debit = state.owner_of(&pending.debit_account_id).await?.flatten();
    if principal.can_see(debit.as_ref()) {
        return Ok(Some(pending.debit_account_id));
    }
    let credit = state.owner_of(&pending.credit_account_id).await?.flatten();
    Ok(principal.can_see(credit.as_ref()).then_some(pending.credit_account_id))
}

fn not_a_cursor() -> ApiError {
    ApiError::invalid("after: not a cursor this server handed out")
}

fn cursor(after: Option<String>) -> Result<Option<String>, ApiError> {
    match after {
        Some(text) if text.is_empty() || text.len() > MAX_CURSOR_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(not_a_cursor())
        }
        after => Ok(after),
    }
}

/// The filters both routes take.
fn filter(status: Option<&str>, since: Option<&str>, until: Option<&str>) -> Result<TransferFilter, ApiError> {
    let status = status.map(parse_status).transpose()?;
    let time = |field: &str, text: Option<&str>| {
        text.map(|text| parse_rfc3339_ms(field, text)).transpose().map_err(ApiError::InvalidRequest)
    };
    let (since_ms, until_ms) = (time("since", since)?, time("until", until)?);
    if let (Some(since_ms), Some(until_ms)) = (since_ms, until_ms) {
        if until_ms <= since_ms {
            return Err(ApiError::invalid("until: must be later than since (the window is [since, until))"));
        }
    }
    Ok(TransferFilter { status, pending_id: None, since_ms, until_ms })
}

const STATUSES: [TransferStatus; 4] =
    [TransferStatus::Pending, TransferStatus::Posted, TransferStatus::Voided, TransferStatus::Expired];

fn parse_status(text: &str) -> Result<TransferStatus, ApiError> {
    STATUSES.into_iter().find(|status| status.as_str() == text).ok_or_else(|| {
        let names: Vec<&str> = STATUSES.iter().map(|status| status.as_str()).collect();
        ApiError::invalid(format!("status: must be one of {}, got {text:?}", names.join(", ")))
    })
}
