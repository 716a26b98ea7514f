//! Global transactions across executors, for operators: one by id (its
//! state, deadline and branches), and the unfinished ones (in flight, or
//! stuck: still unfinished at their deadline). Thin handlers over
//! [`peakstack_engine::Engine::transaction`] and `transactions`; the id is
//! the printable `txn_<executor>_<counter>`, which routes to its
//! coordinator without a lookup.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::ErrorCode;
use peakstack_engine::tcc::{self, TxnFilter, TxnView};
use serde::{Deserialize, Serialize};

use crate::admin::rfc3339;
use crate::error::ApiError;
use crate::handlers::{json, page_limit, read_within, ApiPath, ApiQuery, Deadline};
use crate::AppState;

#[derive(Serialize)]
struct TransactionJson {
    id: String,
    /// `trying`, `committing`, `cancelling` or `done`.
    state: &'static str,
    /// Unknown (null) once done: the coordinator keeps nothing of it then.
    started_at: Option<String>,
    deadline: Option<String>,
    /// Cancelled because its deadline passed undecided.
    timed_out: bool,
    branches: Vec<BranchJson>,
}

#[derive(Serialize)]
struct BranchJson {
    executor: u16,
    /// `waiting`, `tried`, `confirmed`, `cancelled` or `suspended`.
    state: &'static str,
    operations: Vec<String>,
}

impl TransactionJson {
    fn of(view: &TxnView) -> TransactionJson {
        TransactionJson {
            id: tcc::txn_name(view.id),
            state: view.state.as_str(),
            started_at: view.started_ms.map(rfc3339),
            deadline: view.deadline_ms.map(rfc3339),
            timed_out: view.timed_out,
            branches: view
                .branches
                .iter()
                .map(|b| BranchJson { executor: b.executor, state: b.state, operations: b.operations.clone() })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct TransactionList {
    data: Vec<TransactionJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionListQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

pub async fn get_transaction(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::Ledger(ErrorCode::TransactionNotFound, format!("transaction {id} does not exist"));
    let Some(txn) = tcc::parse_txn_name(&id) else { return Err(not_found()) };
    let read = async { state.engine().transaction(txn).await.map_err(ApiError::ledger) };
    match read_within(Deadline::of(&state), read).await? {
        Some(view) => Ok(json(StatusCode::OK, &TransactionJson::of(&view))),
        None => Err(not_found()),
    }
}

pub async fn list_transactions(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<TransactionListQuery>,
) -> Result<Response, ApiError> {
    let filter = match query.state.as_deref() {
        None | Some("in_flight") => TxnFilter::InFlight,
        Some("stuck") => TxnFilter::Stuck,
        Some(other) => return Err(ApiError::invalid(format!("state: in_flight or stuck, got {other:?}"))),
    };
    let limit = page_limit(query.limit.as_deref())?;
    let read = async { state.engine().transactions(filter, limit).await.map_err(ApiError::ledger) };
    let views = read_within(Deadline::of(&state), read).await?;
    Ok(json(StatusCode::OK, &TransactionList { data: views.iter().map(TransactionJson::of).collect() }))
}
