//! Settlements, credit lines and dead letters over HTTP: thin handlers over
//! [`peakstack_engine::Engine::settle`], the account history and the
//! engine's outbox.
//!
//! Who may do what: an admin key settles (`POST /v1/settlements`) and
//! replays dead letters; admin and read keys see every settlement, a
//! merchant key its own (another's answers 404). A credit line is the
//! account `credit.<buyer_id>` owned by `buyer:<buyer_id>` with
//! `debits_must_not_exceed_credits` (its `overdraft_limit` is the limit):
//! admin and read keys and the buyer's app key (`X-Buyer-Id`) see it.
//! Dead letters are operations data (admin and read keys).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{AccountFlags, ErrorCode, Id, Owner, TransferKind, TransferStatus};
use peakstack_engine::orders::{Settlement, MAX_FEE_BPS};
use peakstack_engine::outbox::{message_name, MessageView};
use peakstack_engine::{PartCommand, TransferFilter, TransferSource};
use serde::{Deserialize, Serialize};

use crate::access::{Caller, Scope};
use crate::admin::{parse_rfc3339_ms, rfc3339};
use crate::audit::action;
use crate::error::ApiError;
use crate::handlers::{
    audit, decide_within, json, page_limit, path_id, read_within, ApiJson, ApiPath, ApiQuery, Deadline,
};
use crate::idempotency::now_ms;
use crate::wire::{parse_currency, parse_id};
use crate::AppState;

/// Most movements of a credit line one answer lists per side; past it the
/// answer says `truncated` (the account's own history pages further).
pub const MAX_CREDIT_LINE_ENTRIES: usize = 1000;
/// Transfers read per page of a credit line's history.
const CREDIT_LINE_PAGE: usize = 500;

#[derive(Serialize)]
struct SettlementLineJson {
    order_id: String,
    /// Captured minus refunded.
    amount: u64,
    fee: u64,
    /// What the merchant got of it: `amount - fee`.
    net: u64,
}

#[derive(Serialize)]
struct SettlementJson {
    id: String,
    merchant_id: String,
    currency: String,
    /// `pending`, `completed` or `failed`.
    state: &'static str,
    fee_bps: u32,
    amount: u64,
    fee: u64,
    net: u64,
    /// The merchant's available account the net went to.
    merchant_account_id: Option<String>,
    created_at: String,
    lines: Vec<SettlementLineJson>,
}

impl SettlementJson {
    fn of(settlement: &Settlement) -> SettlementJson {
        let new = &settlement.settlement;
        // Checked when it was placed: the sums fit in u64.
        let amount = new.lines.iter().map(|l| l.amount).sum();
        let fee = new.lines.iter().map(|l| l.fee).sum();
        SettlementJson {
            id: new.id.to_string(),
            merchant_id: new.merchant_id.to_string(),
            currency: new.currency.to_string(),
            state: settlement.state.as_str(),
            fee_bps: new.fee_bps,
            amount,
            fee,
            net: amount - fee,
            merchant_account_id: peakstack_engine::trade_settlement::merchant_account_id(
                &new.merchant_id,
                new.currency,
            )
            .map(|id| id.to_string()),
            created_at: rfc3339(new.created_ms),
            lines: new
                .lines
                .iter()
                .map(|l| SettlementLineJson {
                    order_id: l.order_id.to_string(),
                    amount: l.amount,
                    fee: l.fee,
                    net: l.net(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct SettlementList {
    data: Vec<SettlementJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    merchant_id: String,
    #[serde(default)]
    currency: Option<String>,
    /// The platform's fee in basis points; the server's `--settlement-fee-bps` if absent.
    #[serde(default)]
    fee_bps: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementListQuery {
    #[serde(default)]
    merchant_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

fn settlement_not_found(id: &str) -> ApiError {
    ApiError::Ledger(ErrorCode::SettlementNotFound, format!("settlement {id} does not exist"))
}

/// Settles every captured, unsettled payment part of a merchant: one
/// settlement per home executor and currency, each all or nothing. 201
/// with the settlements made, 200 with none when there was nothing to settle.
pub async fn create_settlement(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<SettleBody>,
) -> Result<Response, ApiError> {
    let merchant_id = parse_id("merchant_id", &body.merchant_id).map_err(ApiError::InvalidRequest)?;
    if merchant_id.is_reserved() {
        return Err(ApiError::invalid("merchant_id: ids starting with '_' are reserved"));
    }
    let currency = body.currency.as_deref().map(parse_currency).transpose().map_err(ApiError::InvalidRequest)?;
    let fee_bps = body.fee_bps.unwrap_or(state.settlement_fee_bps());
    if fee_bps > MAX_FEE_BPS {
        return Err(ApiError::invalid(format!("fee_bps: at most {MAX_FEE_BPS} (100%), got {fee_bps}")));
    }
    let work_state = state.clone();
    let work = async move {
        let made = work_state.engine().settle(&merchant_id, currency, fee_bps).await.map_err(ApiError::ledger)?;
        for settlement in &made {
            let new = &settlement.settlement;
            let details = serde_json::json!({"merchant_id": new.merchant_id.as_str(), "lines": new.lines.len()});
            audit(&work_state, &caller, action::SETTLEMENT_CREATE, new.id.as_str(), details).await?;
        }
        let status = if made.is_empty() { StatusCode::OK } else { StatusCode::CREATED };
        Ok(json(status, &SettlementList { data: made.iter().map(SettlementJson::of).collect() }))
    };
    let pending = "the settlement may still be made: list GET /v1/settlements?merchant_id=..., or retry (nothing is settled twice)";
    decide_within(Deadline::of(&state), pending, work).await
}

/// Whether the caller sees a merchant's settlements: admin and read keys
/// all, a merchant key its own.
fn sees_merchant(caller: &Caller, merchant_id: &Id) -> bool {
    match &caller.principal.scope {
        Scope::Admin | Scope::Read => true,
        Scope::Merchant(own) => own == merchant_id,
        Scope::App => false,
    }
}

pub async fn get_settlement(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some(settlement_id) = Id::parse(&id) else { return Err(settlement_not_found(&id)) };
    let read = async { state.engine().settlement(&settlement_id).await.map_err(ApiError::ledger) };
    match read_within(Deadline::of(&state), read).await? {
        Some(s) if sees_merchant(&caller, &s.settlement.merchant_id) => {
            Ok(json(StatusCode::OK, &SettlementJson::of(&s)))
        }
        _ => Err(settlement_not_found(&id)),
    }
}

pub async fn list_settlements(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<SettlementListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let named = query.merchant_id.as_deref().map(|m| path_id("merchant_id", m)).transpose()?;
    let merchant_id = match (named, &caller.principal.scope) {
        (Some(named), _) => named,
        (None, Scope::Merchant(own)) => own.clone(),
        (None, _) => return Err(ApiError::invalid("merchant_id: required")),
    };
    if !sees_merchant(&caller, &merchant_id) {
        // Nothing of another tenant, not even whether it has settlements.
        return Ok(json(StatusCode::OK, &SettlementList { data: Vec::new() }));
    }
    let read = async { state.engine().settlements(&merchant_id, limit).await.map_err(ApiError::ledger) };
    let found = read_within(Deadline::of(&state), read).await?;
    Ok(json(StatusCode::OK, &SettlementList { data: found.iter().map(SettlementJson::of).collect() }))
}

/// Shortest `--settle-every`.
pub const MIN_SETTLE_EVERY: Duration = Duration::from_secs(1);

/// Parses `--settle-every` (e.g. 1h, 30m, 1day): at least [`MIN_SETTLE_EVERY`].
pub fn parse_settle_every(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 1h, 30m, 1day)"))?;
    if every < MIN_SETTLE_EVERY {
        return Err(format!("{text:?}: at least {} s", MIN_SETTLE_EVERY.as_secs()));
    }
    Ok(every)
}

/// Settles every merchant with captured money every `every`, until `stop`
/// (`peakstack serve --settle-every`). A round that fails is logged and
/// the next one tries again: settling is idempotent (what a round settled
/// is Settled, what it did not is still there).
pub async fn settle_loop(state: AppState, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is at once: the first round waits a period
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        match state.engine().settle_all(state.settlement_fee_bps()).await {
            Ok(made) if !made.is_empty() => tracing::info!(settlements = made.len(), "scheduled settlement"),
            Ok(_) => {}
            Err(code) => tracing::warn!(%code, "scheduled settlement failed; the next round tries again"),
        }
    }
}

// ---- credit lines ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditLineQuery {
    /// `YYYY-MM` (UTC); the current month if absent.
    #[serde(default)]
    period: Option<String>,
}

#[derive(Serialize)]
struct MovementJson {
    transfer_id: String,
    /// The other account of the movement.
    account_id: String,
    amount: u64,
    /// `posted` or `pending` (a draw held for a manual capture).
    status: &'static str,
    at: String,
}

#[derive(Serialize)]
struct CreditLineJson {
    buyer_id: String,
    account_id: String,
    currency: String,
    /// The line's size: the account's `overdraft_limit`.
    limit: u64,
    /// Drawn and not repaid (pending draws included): never below zero.
    used: u64,
    /// What may still be drawn (a repayment beyond what was used adds to
    /// it): the account's own `available`, never below zero.
    available: u64,
    period: String,
    period_start: String,
    period_end: String,
    draws: Vec<MovementJson>,
    repayments: Vec<MovementJson>,
    /// More movements in the period than one answer lists.
    truncated: bool,
}

/// The credit-line account of a buyer, by convention: `credit.<buyer_id>`.
pub fn credit_line_account_id(buyer_id: &Id) -> Option<Id> {
    Id::parse(&format!("credit.{buyer_id}"))
}

/// `[start, end)` of a `YYYY-MM` month in epoch ms, with its name.
fn period_bounds(period: Option<&str>, now_ms: u64) -> Result<(String, u64, u64), ApiError> {
    let name = match period {
        Some(text) => text.to_owned(),
        None => rfc3339(now_ms)[..7].to_owned(),
    };
    let refuse = || ApiError::invalid(format!("period: a month as YYYY-MM, e.g. \"2027-01\", got {name:?}"));
    let (year, month) = name.split_once('-').ok_or_else(refuse)?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(year, 4) || !digits(month, 2) {
        return Err(refuse());
    }
    let (year, month): (u32, u32) = (year.parse().map_err(|_| refuse())?, month.parse().map_err(|_| refuse())?);
    if !(1..=12).contains(&month) || year < 1970 {
        return Err(refuse());
    }
    let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    let start = parse_rfc3339_ms("period", &format!("{year:04}-{month:02}-01T00:00:00Z")).map_err(ApiError::invalid)?;
    let end = parse_rfc3339_ms("period", &format!("{next_year:04}-{next_month:02}-01T00:00:00Z"))
        .map_err(ApiError::invalid)?;
    Ok((name, start, end))
}

pub async fn get_credit_line(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(buyer): ApiPath<String>,
    ApiQuery(query): ApiQuery<CreditLineQuery>,
) -> Result<Response, ApiError> {
    let not_found =
        || ApiError::Ledger(ErrorCode::AccountNotFound, format!("buyer {buyer} has no credit line (credit.{buyer})"));
    let buyer_id = Id::parse(&buyer).ok_or_else(not_found)?;
    let account_id = credit_line_account_id(&buyer_id).ok_or_else(not_found)?;
    let (period, since_ms, until_ms) = period_bounds(query.period.as_deref(), now_ms())?;
    let deadline = Deadline::of(&state);
    let read = async { state.engine().account(&account_id).await.map_err(ApiError::ledger) };
    let account = match read_within(deadline, read).await? {
        Some(account) => account,
        None => return Err(not_found()),
    };
    let owner = Owner::Buyer(buyer_id.clone());
    let is_line =
        account.owner.as_ref() == Some(&owner) && account.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS);
    if !is_line || !caller.principal.can_see(account.owner.as_ref()) {
        return Err(not_found());
    }
    let filter = TransferFilter { since_ms: Some(since_ms), until_ms: Some(until_ms), ..TransferFilter::default() };
    let source = TransferSource::Account(account_id.clone());
    let (mut draws, mut repayments, mut truncated) = (Vec::new(), Vec::new(), false);
    let mut after: Option<String> = None;
    loop {
        let page = async {
            state
                .engine()
                .list_transfers(&source, &filter, after.as_deref(), CREDIT_LINE_PAGE)
                .await
                .map_err(ApiError::ledger)
        };
        let page = read_within(deadline, page).await?;
        for transfer in &page.transfers {
            // A post or void is listed beside the hold it settles: the hold
            // (with its posted amount) stands for both.
            if !matches!(transfer.kind, TransferKind::Single | TransferKind::Pending { .. }) {
                continue;
            }
            let (status, amount) = match transfer.status {
                TransferStatus::Posted => ("posted", transfer.posted_amount.unwrap_or(transfer.amount)),
                TransferStatus::Pending => ("pending", transfer.amount),
                TransferStatus::Voided | TransferStatus::Expired => continue,
            };
            let draw = transfer.debit_account_id == account_id;
            let other = if draw { &transfer.credit_account_id } else { &transfer.debit_account_id };
            let movement = MovementJson {
                transfer_id: transfer.id.to_string(),
                account_id: other.to_string(),
                amount,
                status,
                at: rfc3339(transfer.timestamp_ms),
            };
            let side = if draw { &mut draws } else { &mut repayments };
            match side.len() < MAX_CREDIT_LINE_ENTRIES {
                true => side.push(movement),
                false => truncated = true,
            }
        }
        match page.next {
            Some(next) if !truncated => after = Some(next),
            _ => break,
        }
    }
    let b = &account.balances;
    let drawn = b.debits_posted.saturating_add(b.debits_pending);
    let used = drawn.saturating_sub(b.credits_posted);
    let to_u64 = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    let answer = CreditLineJson {
        buyer_id: buyer_id.to_string(),
        account_id: account_id.to_string(),
        currency: account.currency.to_string(),
        limit: account.overdraft_limit,
        used: to_u64(used),
        available: to_u64(account.available().unwrap_or(0)),
        period,
        period_start: rfc3339(since_ms),
        period_end: rfc3339(until_ms),
        draws,
        repayments,
        truncated,
    };
    Ok(json(StatusCode::OK, &answer))
}

// ---- dead letters ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    #[serde(default)]
    limit: Option<String>,
}

#[derive(Serialize)]
struct DeadLetterJson {
    id: String,
    /// The executor that keeps it (the sender) and the one it goes to.
    executor: u16,
    destination: u16,
    command: String,
    attempts: u32,
    last_error: Option<&'static str>,
    created_at: String,
}

#[derive(Serialize)]
struct DeadLetterList {
    data: Vec<DeadLetterJson>,
}

impl DeadLetterJson {
    fn of(view: &MessageView) -> DeadLetterJson {
        DeadLetterJson {
            id: message_name(view.executor, view.id),
            executor: view.executor,
            destination: view.message.dest,
            command: readable(&view.message.command),
            attempts: view.message.attempts,
            last_error: view.message.last_error.map(ErrorCode::as_str),
            created_at: rfc3339(view.message.created_ms),
        }
    }
}

fn readable(command: &PartCommand) -> String {
    command.short_form()
}

pub async fn list_dead_letters(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let read = async { state.engine().messages(true, limit).await.map_err(ApiError::ledger) };
    let views = read_within(Deadline::of(&state), read).await?;
    Ok(json(StatusCode::OK, &DeadLetterList { data: views.iter().map(DeadLetterJson::of).collect() }))
}

#[derive(Serialize)]
struct ReplayJson {
    id: String,
    replayed: bool,
}

pub async fn replay_dead_letter(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let work_state = state.clone();
    let work = async move {
        let replayed = work_state.engine().replay_message(&id).await.map_err(ApiError::ledger)?;
        if !replayed {
            return Err(ApiError::Ledger(ErrorCode::MessageNotFound, format!("no dead letter {id}")));
        }
        audit(&work_state, &caller, action::DEAD_LETTER_REPLAY, &id, serde_json::json!({})).await?;
        Ok(json(StatusCode::OK, &ReplayJson { id, replayed }))
    };
    decide_within(Deadline::of(&state), "the replay may still run: read GET /v1/dead-letters, or retry", work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_months_in_utc() {
        let (name, start, end) = period_bounds(Some("2027-02"), 0).unwrap();
        assert_eq!(
            (name.as_str(), rfc3339(start), rfc3339(end)),
            ("2027-02", "2027-02-01T00:00:00.000Z".to_owned(), "2027-03-01T00:00:00.000Z".to_owned())
        );
        let (_, _, end) = period_bounds(Some("2026-12"), 0).unwrap();
        assert_eq!(rfc3339(end), "2027-01-01T00:00:00.000Z");
        let now = parse_rfc3339_ms("now", "2027-05-17T10:00:00Z").unwrap();
        assert_eq!(period_bounds(None, now).unwrap().0, "2027-05");
        for bad in ["2027-13", "2027-1", "27-01", "2027/01", "", "1969-12"] {
            assert!(period_bounds(Some(bad), 0).is_err(), "{bad}");
        }
    }
}
