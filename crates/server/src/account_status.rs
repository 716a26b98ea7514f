//! Freeze, unfreeze and close an account: thin handlers over
//! `Engine::change_account`, each change audited.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{AccountChange, ErrorCode, Id};

use crate::access::Caller;
use crate::audit::action;
use crate::error::ApiError;
use crate::handlers::{
    account_not_found, audit, decide_within, json, path_id, read_within, refused, visible_account, ApiPath, Deadline,
};
use crate::wire::AccountJson;
use crate::AppState;

pub async fn freeze_account(state: State<AppState>, caller: Caller, id: ApiPath<String>) -> Result<Response, ApiError> {
    change_status(state, caller, id, AccountChange::Freeze).await
}

pub async fn unfreeze_account(
    state: State<AppState>,
    caller: Caller,
    id: ApiPath<String>,
) -> Result<Response, ApiError> {
    change_status(state, caller, id, AccountChange::Unfreeze).await
}

pub async fn close_account(state: State<AppState>, caller: Caller, id: ApiPath<String>) -> Result<Response, ApiError> {
    change_status(state, caller, id, AccountChange::Close).await
}

/// The scope is checked before the account is looked up, and an account
/// the caller may not see answers as one that does not exist: neither
/// refusal tells whether the id exists.
async fn change_status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    change: AccountChange,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    caller.principal.may_change_accounts(change).map_err(|d| refused(d, || account_not_found(&id)))?;
    let deadline = Deadline::of(&state);
    // The owner never changes, so seeing the account now is seeing it when
    // the change is applied.
    read_within(deadline, visible_account(&state, &caller.principal, &id)).await?;
    let pending = format!("the status of account {id} may still change: read it at /v1/accounts/{id}, or retry");
    decide_within(deadline, &pending, apply(state, caller, id, change)).await
}

/// The engine's part of `change_status` (run by `decide_within`).
async fn apply(state: AppState, caller: Caller, id: Id, change: AccountChange) -> Result<Response, ApiError> {
    match state.engine().change_account(id.clone(), change).await {
        Ok((account, changed)) => {
            if changed {
                let details = serde_json::json!({ "status": account.status().as_str() });
                audit(&state, &caller, action_of(change), id.as_str(), details).await?;
            }
            Ok(json(StatusCode::OK, &AccountJson::from_account(&account)))
        }
        Err(ErrorCode::AccountNotFound) => Err(account_not_found(&id)),
        Err(code) => Err(ApiError::ledger(code)),
    }
}

fn action_of(change: AccountChange) -> &'static str {
    match change {
        AccountChange::Freeze => action::ACCOUNT_FREEZE,
        AccountChange::Unfreeze => action::ACCOUNT_UNFREEZE,
        AccountChange::Close => action::ACCOUNT_CLOSE,
    }
}
