//! SKUs, reservations and flash sales over HTTP: thin handlers over the
//! engine's inventory part.
//!
//! Who may do what: an admin key anything; a merchant key creates, restocks
//! and sees only its own SKUs and runs flash sales only on them; an app key
//! acts for the buyer in its `X-Buyer-Id` (reserves, tries a flash sale,
//! confirms and cancels that buyer's reservations, reads the catalogue);
//! a read key reads everything. Catalogue changes (SKUs, restocks, sales)
//! get an audit record; a reservation is its own record (buyer, time,
//! units), so the flash-sale hot path writes nothing else.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{ErrorCode, Id};
use peakstack_engine::inventory::{
    Answer, Command, FlashSaleView, NewFlashSale, NewSku, Reservation, SkuView, DEFAULT_PAY_WITHIN_MS,
    MAX_PURCHASE_QUANTITY,
};
use serde::{Deserialize, Serialize};

use crate::access::{Caller, Principal, Scope};
use crate::admin::{parse_rfc3339_ms, rfc3339};
use crate::audit::action;
use crate::error::ApiError;
use crate::handlers::{audit, json, page_limit, path_id, read_within, ApiJson, ApiPath, ApiQuery, Deadline};
use crate::idempotency::now_ms;
use crate::wire::{parse_amount, parse_client_id, parse_currency, parse_id, Page};
use crate::AppState;

/// How long a reservation made through `POST /v1/reservations` is held
/// unless the request says otherwise.
pub const DEFAULT_HOLD_SECONDS: u64 = 15 * 60;

#[derive(Serialize)]
struct SkuJson {
    id: String,
    merchant_id: String,
    title: String,
    price: u64,
    currency: String,
    per_buyer_limit: Option<u32>,
    stock: u64,
    available: u64,
    reserved: u64,
    sold: u64,
    on_flash_sale: u64,
    created_at: String,
}

impl SkuJson {
    fn of(sku: &SkuView) -> SkuJson {
        SkuJson {
            id: sku.id.to_string(),
            merchant_id: sku.merchant_id.to_string(),
            title: sku.title.clone(),
            price: sku.price.get(),
            currency: sku.currency.to_string(),
            per_buyer_limit: sku.per_buyer_limit,
            stock: sku.stock,
            available: sku.available(),
            reserved: sku.reserved,
            sold: sku.sold,
            on_flash_sale: sku.on_sale,
            created_at: rfc3339(sku.created_ms),
        }
    }
}

#[derive(Serialize)]
struct FlashSaleJson {
    id: String,
    sku_id: String,
    price: u64,
    currency: String,
    quantity: u64,
    remaining: u64,
    sold: u64,
    reserved: u64,
    state: &'static str,
    starts_at: String,
    ends_at: String,
    per_buyer_limit: u32,
    pay_within_seconds: u64,
}

impl FlashSaleJson {
    fn of(sale: &FlashSaleView, now_ms: u64) -> FlashSaleJson {
        FlashSaleJson {
            id: sale.id.to_string(),
            sku_id: sale.sku_id.to_string(),
            price: sale.price.get(),
            currency: sale.currency.to_string(),
            quantity: sale.quantity,
            remaining: sale.remaining(),
            sold: sale.sold,
            reserved: sale.reserved,
            state: sale.state(now_ms).as_str(),
            starts_at: rfc3339(sale.starts_at_ms),
            ends_at: rfc3339(sale.ends_at_ms),
            per_buyer_limit: sale.per_buyer_limit,
            pay_within_seconds: sale.pay_within_ms / 1000,
        }
    }
}

#[derive(Serialize)]
struct ReservationJson {
    id: String,
    sku_id: String,
    flash_sale_id: Option<String>,
    buyer_id: String,
    quantity: u32,
    unit_price: u64,
    amount: u64,
    currency: String,
    state: &'static str,
    created_at: String,
    expires_at: String,
    finished_at: Option<String>,
}

impl ReservationJson {
    fn of(r: &Reservation) -> ReservationJson {
        ReservationJson {
            id: r.id.to_string(),
            sku_id: r.sku_id.to_string(),
            flash_sale_id: r.sale_id.as_ref().map(ToString::to_string),
            buyer_id: r.buyer_id.to_string(),
            quantity: r.quantity,
            unit_price: r.unit_price.get(),
            // At most 10,000 units of at most 2^53-1: fits in u64.
            amount: r.unit_price.get() * u64::from(r.quantity),
            currency: r.currency.to_string(),
            state: r.state.as_str(),
            created_at: rfc3339(r.created_ms),
            expires_at: rfc3339(r.deadline_ms),
            finished_at: r.state.finished_at_ms().map(rfc3339),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuBody {
    id: String,
    #[serde(default)]
    merchant_id: Option<String>,
    title: String,
    price: u64,
    currency: String,
    stock: u64,
    #[serde(default)]
    per_buyer_limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    quantity: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationBody {
    sku_id: String,
    #[serde(default)]
    buyer_id: Option<String>,
    quantity: u32,
    #[serde(default)]
    hold_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashSaleBody {
    id: String,
    sku_id: String,
    price: u64,
    quantity: u64,
    starts_at: String,
    ends_at: String,
    per_buyer_limit: u32,
    #[serde(default)]
    pay_within_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptBody {
    #[serde(default)]
    buyer_id: Option<String>,
    quantity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuListQuery {
    #[serde(default)]
    merchant_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

fn sku_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::SkuNotFound, format!("SKU {id} does not exist"))
}

fn reservation_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::ReservationNotFound, format!("reservation {id} does not exist"))
}

fn flash_sale_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::FlashSaleNotFound, format!("flash sale {id} does not exist"))
}

/// The merchant a merchant key is confined to.
fn merchant_of(principal: &Principal) -> Option<&Id> {
    match &principal.scope {
        Scope::Merchant(id) => Some(id),
        _ => None,
    }
}

/// Whether the caller may see this SKU: a merchant only its own.
fn sees_sku(principal: &Principal, sku: &SkuView) -> bool {
    merchant_of(principal).is_none_or(|m| *m == sku.merchant_id)
}

/// Whether the caller may change this SKU (restock, run a sale on it):
/// an admin, or its merchant.
fn changes_sku(principal: &Principal, sku: &SkuView) -> Result<(), ApiError> {
    match &principal.scope {
        Scope::Admin => Ok(()),
        Scope::Merchant(m) if *m == sku.merchant_id => Ok(()),
        Scope::Merchant(_) => Err(sku_not_found(&sku.id)),
        _ => Err(ApiError::Forbidden("only an admin key or the SKU's merchant key changes a SKU".into())),
    }
}

async fn visible_sku(state: &AppState, principal: &Principal, id: &Id) -> Result<SkuView, ApiError> {
    match state.engine().sku(id).await.map_err(ApiError::ledger)? {
        Some(sku) if sees_sku(principal, &sku) => Ok(sku),
        _ => Err(sku_not_found(id)),
    }
}

pub async fn create_sku(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<SkuBody>,
) -> Result<Response, ApiError> {
    if !matches!(caller.principal.scope, Scope::Admin | Scope::Merchant(_)) {
        return Err(ApiError::Forbidden("only an admin key or a merchant key creates SKUs".into()));
    }
    let id = parse_client_id("id", &body.id).map_err(ApiError::InvalidRequest)?;
    let merchant_id = match (merchant_of(&caller.principal), body.merchant_id.as_deref()) {
        (Some(own), None) => own.clone(),
        (Some(own), Some(named)) if named == own.as_str() => own.clone(),
        (Some(own), Some(named)) => {
            return Err(ApiError::Forbidden(format!("this merchant key creates SKUs of {own} only, not {named}")))
        }
        (None, Some(named)) => parse_id("merchant_id", named).map_err(ApiError::InvalidRequest)?,
        (None, None) => return Err(ApiError::invalid("merchant_id: required")),
    };
    let new = NewSku {
        id: id.clone(),
        merchant_id,
        price: parse_amount("price", body.price).map_err(ApiError::InvalidRequest)?,
        currency: parse_currency(&body.currency).map_err(ApiError::InvalidRequest)?,
        title: body.title,
        stock: body.stock,
        per_buyer_limit: body.per_buyer_limit,
    };
    if new.validate().is_err() {
        return Err(ApiError::invalid(format!(
            "title: 1-{} bytes, not blank; stock: at most 2^53-1; per_buyer_limit: at least 1",
            peakstack_engine::inventory::MAX_TITLE_LEN
        )));
    }
    match state.engine().inventory(Command::CreateSku(new)).await {
        Ok(Answer::Sku { sku, created }) => {
            if created {
                let details = serde_json::json!({"merchant_id": sku.merchant_id.as_str(), "stock": sku.stock});
                audit(&state, &caller, action::SKU_CREATE, id.as_str(), details).await?;
            }
            Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &SkuJson::of(&sku)))
        }
        Err(ErrorCode::ExistsWithDifferentFields) => Err(ApiError::Ledger(
            ErrorCode::ExistsWithDifferentFields,
            format!("SKU {id} exists already, with different fields"),
        )),
        Err(code) => Err(ApiError::ledger(code)),
        Ok(_) => Err(ApiError::Internal("unexpected answer".into())),
    }
}

pub async fn get_sku(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let sku = read_within(Deadline::of(&state), visible_sku(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &SkuJson::of(&sku)))
}

pub async fn list_skus(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<SkuListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().map(|after| path_id("after", after)).transpose()?;
    let named = query.merchant_id.as_deref().map(|m| path_id("merchant_id", m)).transpose()?;
    let merchant_id = match (merchant_of(&caller.principal), named) {
        (Some(own), Some(named)) if named != *own => {
            return Err(ApiError::Forbidden(format!("this merchant key lists the SKUs of {own} only")))
        }
        (Some(own), _) => Some(own.clone()),
        (None, named) => named,
    };
    let read = async { state.engine().skus(merchant_id, after, limit).await.map_err(ApiError::ledger) };
    let skus = read_within(Deadline::of(&state), read).await?;
    let next = (skus.len() == limit).then(|| skus.last().map(|s| s.id.to_string())).flatten();
    let data: Vec<SkuJson> = skus.iter().map(SkuJson::of).collect();
    Ok(json(StatusCode::OK, &Page { data, next }))
}

pub async fn restock_sku(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RestockBody>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    if body.quantity == 0 {
        return Err(ApiError::invalid("quantity: at least 1"));
    }
    let sku = visible_sku(&state, &caller.principal, &id).await?;
    changes_sku(&caller.principal, &sku)?;
    match state.engine().inventory(Command::Restock { sku_id: id.clone(), quantity: body.quantity }).await {
        Ok(Answer::Sku { sku, .. }) => {
            audit(&state, &caller, action::SKU_RESTOCK, id.as_str(), serde_json::json!({"quantity": body.quantity}))
                .await?;
            Ok(json(StatusCode::OK, &SkuJson::of(&sku)))
        }
        Err(ErrorCode::Overflow) => {
            Err(ApiError::Ledger(ErrorCode::Overflow, "quantity: the stock would pass 2^53-1 units".to_owned()))
        }
        Err(code) => Err(ApiError::ledger(code)),
        Ok(_) => Err(ApiError::Internal("unexpected answer".into())),
    }
}

fn reservation_answer(status: StatusCode, reply: Result<Answer, ErrorCode>) -> Result<Response, ApiError> {
    match reply {
        Ok(Answer::Reservation(r)) => Ok(json(status, &ReservationJson::of(&r))),
        Err(code) => Err(ApiError::ledger(code)),
        Ok(_) => Err(ApiError::Internal("unexpected answer".into())),
    }
}

pub async fn create_reservation(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ReservationBody>,
) -> Result<Response, ApiError> {
    let buyer_id = caller.principal.acting_buyer(body.buyer_id.as_deref(), "reserves units")?;
    let sku_id = parse_id("sku_id", &body.sku_id).map_err(ApiError::InvalidRequest)?;
    check_quantity(body.quantity)?;
    let hold_seconds = body.hold_seconds.unwrap_or(DEFAULT_HOLD_SECONDS);
    if !(1..=24 * 3600).contains(&hold_seconds) {
        return Err(ApiError::invalid("hold_seconds: from 1 to 86400 (a day)"));
    }
    let command =
        Command::Reserve { shard: 0, sku_id, buyer_id, quantity: body.quantity, hold_ms: hold_seconds * 1000 };
    reservation_answer(StatusCode::CREATED, state.engine().inventory(command).await)
}

fn check_quantity(quantity: u32) -> Result<(), ApiError> {
    if !(1..=MAX_PURCHASE_QUANTITY).contains(&quantity) {
        return Err(ApiError::invalid(format!("quantity: from 1 to {MAX_PURCHASE_QUANTITY}")));
    }
    Ok(())
}

/// Reservation `id`, if the caller may see it: an app key its buyer's, a
/// merchant key those of its SKUs.
async fn visible_reservation(state: &AppState, principal: &Principal, id: &Id) -> Result<Reservation, ApiError> {
    let Some(reservation) = state.engine().reservation(id).await.map_err(ApiError::ledger)? else {
        return Err(reservation_not_found(id));
    };
    let visible = match &principal.scope {
        Scope::Admin | Scope::Read => true,
        Scope::App => principal.buyer.as_ref() == Some(&reservation.buyer_id),
        Scope::Merchant(_) => visible_sku(state, principal, &reservation.sku_id).await.is_ok(),
    };
    if !visible {
        return Err(reservation_not_found(id));
    }
    Ok(reservation)
}

pub async fn get_reservation(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let reservation = read_within(Deadline::of(&state), visible_reservation(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &ReservationJson::of(&reservation)))
}

async fn finish_reservation(state: AppState, caller: Caller, id: String, confirm: bool) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let reservation = visible_reservation(&state, &caller.principal, &id).await?;
    if !matches!(caller.principal.scope, Scope::Admin | Scope::App) {
        return Err(ApiError::Forbidden("only an admin key or the buyer's app key confirms or cancels".into()));
    }
    let command = match confirm {
        true => Command::Confirm { reservation_id: reservation.id },
        false => Command::Cancel { reservation_id: reservation.id },
    };
    reservation_answer(StatusCode::OK, state.engine().inventory(command).await)
}

pub async fn confirm_reservation(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    finish_reservation(state, caller, id, true).await
}

pub async fn cancel_reservation(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    finish_reservation(state, caller, id, false).await
}

pub async fn create_flash_sale(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<FlashSaleBody>,
) -> Result<Response, ApiError> {
    let id = parse_client_id("id", &body.id).map_err(ApiError::InvalidRequest)?;
    let sku_id = parse_id("sku_id", &body.sku_id).map_err(ApiError::InvalidRequest)?;
    let price = parse_amount("price", body.price).map_err(ApiError::InvalidRequest)?;
    let starts_at_ms = parse_rfc3339_ms("starts_at", &body.starts_at).map_err(ApiError::InvalidRequest)?;
    let ends_at_ms = parse_rfc3339_ms("ends_at", &body.ends_at).map_err(ApiError::InvalidRequest)?;
    if ends_at_ms <= starts_at_ms {
        return Err(ApiError::invalid("ends_at: must be after starts_at"));
    }
    if body.quantity == 0 || body.per_buyer_limit == 0 {
        return Err(ApiError::invalid("quantity and per_buyer_limit: at least 1"));
    }
    let pay_within_ms = body.pay_within_seconds.map_or(DEFAULT_PAY_WITHIN_MS, |s| s.saturating_mul(1000));
    if !(1_000..=24 * 3600 * 1000).contains(&pay_within_ms) {
        return Err(ApiError::invalid("pay_within_seconds: from 1 to 86400 (a day)"));
    }
    let sku = visible_sku(&state, &caller.principal, &sku_id).await?;
    changes_sku(&caller.principal, &sku)?;
    let new = NewFlashSale {
        id: id.clone(),
        sku_id,
        price,
        quantity: body.quantity,
        starts_at_ms,
        ends_at_ms,
        per_buyer_limit: body.per_buyer_limit,
        pay_within_ms,
    };
    match state.engine().inventory(Command::CreateFlashSale(new)).await {
        Ok(Answer::FlashSale { sale, created }) => {
            if created {
                let details = serde_json::json!({"sku_id": sale.sku_id.as_str(), "quantity": sale.quantity});
                audit(&state, &caller, action::FLASH_SALE_CREATE, id.as_str(), details).await?;
            }
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json(status, &FlashSaleJson::of(&sale, now_ms())))
        }
        Err(ErrorCode::ExistsWithDifferentFields) => Err(ApiError::Ledger(
            ErrorCode::ExistsWithDifferentFields,
            format!("flash sale {id} exists already, with different fields"),
        )),
        Err(code) => Err(ApiError::ledger(code)),
        Ok(_) => Err(ApiError::Internal("unexpected answer".into())),
    }
}

pub async fn get_flash_sale(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let read = async {
        match state.engine().flash_sale(&id).await.map_err(ApiError::ledger)? {
            Some(sale) => Ok(sale),
            None => Err(flash_sale_not_found(&id)),
        }
    };
    let sale = read_within(Deadline::of(&state), read).await?;
    if merchant_of(&caller.principal).is_some() {
        visible_sku(&state, &caller.principal, &sale.sku_id).await.map_err(|_| flash_sale_not_found(&id))?;
    }
    Ok(json(StatusCode::OK, &FlashSaleJson::of(&sale, now_ms())))
}

/// A buyer's try: a winner gets a reservation to pay by its deadline; a
/// sale that is not live or has nothing left answers from memory.
pub async fn attempt_flash_sale(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<AttemptBody>,
) -> Result<Response, ApiError> {
    let sale_id = path_id("id", &id)?;
    let buyer_id = caller.principal.acting_buyer(body.buyer_id.as_deref(), "reserves units")?;
    check_quantity(body.quantity)?;
    let command = Command::Attempt { shard: 0, sale_id: sale_id.clone(), buyer_id, quantity: body.quantity };
    match state.engine().inventory(command).await {
        Err(ErrorCode::FlashSaleNotFound) => Err(flash_sale_not_found(&sale_id)),
        reply => reservation_answer(StatusCode::CREATED, reply),
    }
}
