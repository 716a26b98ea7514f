//! Checkouts, orders, payments and refunds over HTTP: thin handlers over
//! the engine's checkout flow and its orders part.
//!
//! Who may do what: an admin key anything; an app key checks out for the
//! buyer in its `X-Buyer-Id`, paying from an account that buyer owns, and
//! sees, cancels and reads the refunds of that buyer's checkouts, orders
//! and payments; a merchant key sees its own merchant's orders and refunds,
//! cancels such an order before capture and refunds it; a read key reads
//! everything. Capturing a payment (which spans merchants) is for admin
//! keys only. An object a caller may not see is answered 404, as if it did
//! not exist, so ids cannot be probed. Captures, cancels and refunds get an
//! audit record; a checkout is its own record.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{ErrorCode, Id, Owner};
use peakstack_engine::orders::{self, CaptureMode, Checkout, Order, PaymentView, Refund, RefundRequest};
use peakstack_engine::pricing::{self, CartLine};
use peakstack_engine::trade_checkout::CheckoutRequest;
use serde::{Deserialize, Serialize};

use crate::access::{Caller, Principal, Scope};
use crate::admin::rfc3339;
use crate::audit::action;
use crate::error::ApiError;
use crate::handlers::{
    account_not_found, audit, decide_within, json, page_limit, path_id, read_within, ApiJson, ApiPath, ApiQuery,
    Deadline,
};
use crate::wire::{parse_amount, parse_id, Page};
use crate::AppState;

// ---- request bodies ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutLineBody {
    sku_id: String,
    quantity: u32,
}

#[derive(Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "snake_case")]
pub enum CaptureBody {
    #[default]
    Automatic,
    Manual,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    account_id: String,
    #[serde(default)]
    capture: CaptureBody,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    #[serde(default)]
    buyer_id: Option<String>,
    lines: Vec<CheckoutLineBody>,
    #[serde(default)]
    coupon_ids: Vec<String>,
    payment: PaymentBody,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureAmountBody {
    #[serde(default)]
    amount: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundLineBody {
    line_id: u32,
    quantity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    #[serde(default)]
    amount: Option<u64>,
    #[serde(default)]
    lines: Option<Vec<RefundLineBody>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderListQuery {
    #[serde(default)]
    buyer_id: Option<String>,
    #[serde(default)]
    merchant_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

// ---- answers ----

#[derive(Serialize)]
struct DiscountJson {
    source_id: String,
    amount: u64,
}

#[derive(Serialize)]
struct OrderLineJson {
    line_id: u32,
    sku_id: String,
    quantity: u32,
    unit_price: u64,
    subtotal: u64,
    discount: u64,
    discounts: Vec<DiscountJson>,
    total: u64,
    refunded_quantity: u32,
}

#[derive(Serialize)]
struct OrderJson {
    id: String,
    checkout_id: String,
    buyer_id: String,
    merchant_id: String,
    state: &'static str,
    payment_state: &'static str,
    currency: String,
    total: u64,
    amount_authorized: u64,
    amount_captured: u64,
    amount_refunded: u64,
    lines: Vec<OrderLineJson>,
    refunds: Vec<String>,
    updated_at: String,
}

impl OrderJson {
    fn of(order: &Order) -> Result<OrderJson, ApiError> {
        let placed = &order.order;
        let lines = placed
            .lines
            .iter()
            .zip(&order.refunded_units)
            .map(|(line, refunded)| OrderLineJson {
                line_id: line.line_id,
                sku_id: line.sku_id.to_string(),
                quantity: line.quantity,
                unit_price: line.unit_price,
                subtotal: line.subtotal,
                // The orders part checked subtotal - discounts = total.
                discount: line.subtotal - line.total,
                discounts: line
                    .discounts
                    .iter()
                    .map(|(source, amount)| DiscountJson { source_id: source.to_string(), amount: *amount })
                    .collect(),
                total: line.total,
                refunded_quantity: *refunded,
            })
            .collect();
        Ok(OrderJson {
            id: placed.id.to_string(),
            checkout_id: order.checkout_id.to_string(),
            buyer_id: order.buyer_id.to_string(),
            merchant_id: placed.merchant_id.to_string(),
            state: order.state.as_str(),
            payment_state: order.payment_state.as_str(),
            currency: order.currency.to_string(),
            total: placed.total,
            amount_authorized: order.amount_authorized,
            amount_captured: order.amount_captured,
            amount_refunded: order.amount_refunded,
            lines,
            refunds: order.refunds.iter().map(ToString::to_string).collect(),
            updated_at: rfc3339(order.updated_ms),
        })
    }
}

fn capture_str(capture: CaptureMode) -> &'static str {
    match capture {
        CaptureMode::Automatic => "automatic",
        CaptureMode::Manual => "manual",
    }
}

#[derive(Serialize)]
struct PaymentPartJson {
    order_id: String,
    merchant_id: String,
    state: &'static str,
    amount_authorized: u64,
    amount_captured: u64,
    amount_refunded: u64,
}

#[derive(Serialize)]
struct PaymentJson {
    id: String,
    checkout_id: String,
    state: &'static str,
    currency: String,
    account_id: String,
    capture: &'static str,
    amount_authorized: u64,
    amount_captured: u64,
    amount_refunded: u64,
    /// Null under automatic capture: nothing waits for a capture.
    authorization_expires_at: Option<String>,
    parts: Vec<PaymentPartJson>,
}

impl PaymentJson {
    fn of(payment: &PaymentView) -> PaymentJson {
        PaymentJson {
            id: payment.id.to_string(),
            checkout_id: payment.checkout_id.to_string(),
            state: payment.state.as_str(),
            currency: payment.currency.to_string(),
            account_id: payment.account_id.to_string(),
            capture: capture_str(payment.capture),
            amount_authorized: payment.amount_authorized,
            amount_captured: payment.amount_captured,
            amount_refunded: payment.amount_refunded,
            authorization_expires_at: (payment.capture == CaptureMode::Manual)
                .then(|| rfc3339(payment.authorization_expires_ms)),
            parts: payment
                .parts
                .iter()
                .map(|p| PaymentPartJson {
                    order_id: p.order_id.to_string(),
                    merchant_id: p.merchant_id.to_string(),
                    state: p.state.as_str(),
                    amount_authorized: p.amount_authorized,
                    amount_captured: p.amount_captured,
                    amount_refunded: p.amount_refunded,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct CheckoutJson {
    id: String,
    state: &'static str,
    buyer_id: String,
    account_id: String,
    currency: String,
    capture: &'static str,
    subtotal: u64,
    discount: u64,
    total: u64,
    payment: PaymentJson,
    orders: Vec<OrderJson>,
    coupon_ids: Vec<String>,
    created_at: String,
}

impl CheckoutJson {
    fn of(checkout: &Checkout, orders: &[Order], payment: &PaymentView) -> Result<CheckoutJson, ApiError> {
        let placed = &checkout.checkout;
        // Each order's lines were checked to add up when it was placed, and
        // the orders' totals to fit a u64; the subtotals are checked here.
        let lines = || placed.orders.iter().flat_map(|o| &o.lines);
        let subtotal = lines()
            .try_fold(0u64, |sum, line| sum.checked_add(line.subtotal))
            .ok_or_else(|| ApiError::ledger(ErrorCode::Overflow))?;
        let total: u64 = placed.orders.iter().map(|o| o.total).sum();
        Ok(CheckoutJson {
            id: placed.id.to_string(),
            state: checkout.state.as_str(),
            buyer_id: placed.buyer_id.to_string(),
            account_id: placed.account_id.to_string(),
            currency: placed.currency.to_string(),
            capture: capture_str(placed.capture),
            subtotal,
            discount: subtotal - total,
            total,
            payment: PaymentJson::of(payment),
            orders: orders.iter().map(OrderJson::of).collect::<Result<_, _>>()?,
            coupon_ids: placed.coupon_ids.iter().map(ToString::to_string).collect(),
            created_at: rfc3339(placed.created_ms),
        })
    }
}

#[derive(Serialize)]
struct RefundLineJson {
    line_id: u32,
    quantity: u32,
}

#[derive(Serialize)]
struct RefundJson {
    id: String,
    order_id: String,
    amount: u64,
    lines: Vec<RefundLineJson>,
    transfer_id: String,
    created_at: String,
}

impl RefundJson {
    fn of(refund: &Refund) -> RefundJson {
        RefundJson {
            id: refund.id.to_string(),
            order_id: refund.order_id.to_string(),
            amount: refund.amount,
            lines: refund
                .lines
                .iter()
                .map(|(line_id, quantity)| RefundLineJson { line_id: *line_id, quantity: *quantity })
                .collect(),
            transfer_id: refund.transfer_id.to_string(),
            created_at: rfc3339(refund.created_ms),
        }
    }
}

// ---- not found, and who sees what ----

fn checkout_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::CheckoutNotFound, format!("checkout {id} does not exist"))
}

fn order_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::OrderNotFound, format!("order {id} does not exist"))
}

fn payment_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::PaymentNotFound, format!("payment {id} does not exist"))
}

fn refund_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::RefundNotFound, format!("refund {id} does not exist"))
}

/// Whether the caller sees what buyer `buyer_id` bought (a checkout, a
/// payment): everything for admin and read keys, its own buyer's for an
/// app key, nothing for a merchant key (a checkout spans merchants).
fn sees_buyers(principal: &Principal, buyer_id: &Id) -> bool {
    match &principal.scope {
        Scope::Admin | Scope::Read => true,
        Scope::App => principal.buyer.as_ref() == Some(buyer_id),
        Scope::Merchant(_) => false,
    }
}

/// Whether the caller sees an order (and its refunds): a merchant its own
/// merchant's, an app key its buyer's.
fn sees_order(principal: &Principal, order: &Order) -> bool {
    match &principal.scope {
        Scope::Merchant(own) => *own == order.order.merchant_id,
        _ => sees_buyers(principal, &order.buyer_id),
    }
}

async fn visible_checkout(
    state: &AppState,
    principal: &Principal,
    id: &Id,
) -> Result<(Checkout, Vec<Order>), ApiError> {
    match state.engine().checkout_view(id).await.map_err(ApiError::ledger)? {
        Some((checkout, orders)) if sees_buyers(principal, &checkout.checkout.buyer_id) => Ok((checkout, orders)),
        _ => Err(checkout_not_found(id)),
    }
}

async fn visible_order(state: &AppState, principal: &Principal, id: &Id) -> Result<Order, ApiError> {
    match state.engine().order(id).await.map_err(ApiError::ledger)? {
        Some(order) if sees_order(principal, &order) => Ok(order),
        _ => Err(order_not_found(id)),
    }
}

/// A payment, if the caller sees its checkout's buyer (an app key's read
/// costs one more read, of the checkout).
async fn visible_payment(state: &AppState, principal: &Principal, id: &Id) -> Result<PaymentView, ApiError> {
    let Some(payment) = state.engine().payment(id).await.map_err(ApiError::ledger)? else {
        return Err(payment_not_found(id));
    };
    let visible = match &principal.scope {
        Scope::Admin | Scope::Read => true,
        Scope::Merchant(_) => false,
        Scope::App => match state.engine().checkout_view(&payment.checkout_id).await.map_err(ApiError::ledger)? {
            Some((checkout, _)) => sees_buyers(principal, &checkout.checkout.buyer_id),
            None => false,
        },
    };
    if !visible {
        return Err(payment_not_found(id));
    }
    Ok(payment)
}

async fn visible_refund(state: &AppState, principal: &Principal, id: &Id) -> Result<Refund, ApiError> {
    let Some(refund) = state.engine().refund(id).await.map_err(ApiError::ledger)? else {
        return Err(refund_not_found(id));
    };
    if !principal.sees_everything() {
        visible_order(state, principal, &refund.order_id).await.map_err(|_| refund_not_found(id))?;
    }
    Ok(refund)
}

// ---- checkouts ----

/// The cart of a checkout body, checked: 1 to MAX_QUOTE_LINES lines of
/// distinct SKUs, quantities 1 to MAX_LINE_QUANTITY, at most
/// MAX_QUOTE_COUPONS distinct coupons.
fn cart_of(body: &CheckoutBody) -> Result<(Vec<CartLine>, Vec<Id>), ApiError> {
    let count = body.lines.len();
    if !(1..=pricing::MAX_QUOTE_LINES).contains(&count) {
        return Err(ApiError::invalid(format!("lines: 1 to {} lines, got {count}", pricing::MAX_QUOTE_LINES)));
    }
    let mut lines = Vec::with_capacity(count);
    let mut skus = BTreeSet::new();
    for (index, line) in body.lines.iter().enumerate() {
        let sku_id = parse_id(&format!("lines[{index}].sku_id"), &line.sku_id).map_err(ApiError::InvalidRequest)?;
        if !(1..=pricing::MAX_LINE_QUANTITY).contains(&line.quantity) {
            return Err(ApiError::invalid(format!(
                "lines[{index}].quantity: from 1 to {}, got {}",
                pricing::MAX_LINE_QUANTITY,
                line.quantity
            )));
        }
        if !skus.insert(sku_id.clone()) {
            return Err(ApiError::invalid(format!("lines[{index}].sku_id: SKU {sku_id} is on an earlier line")));
        }
        lines.push(CartLine { sku_id, quantity: line.quantity });
    }
    if body.coupon_ids.len() > pricing::MAX_QUOTE_COUPONS {
        return Err(ApiError::invalid(format!(
            "coupon_ids: at most {} coupons, got {}",
            pricing::MAX_QUOTE_COUPONS,
            body.coupon_ids.len()
        )));
    }
    let mut coupon_ids: Vec<Id> = Vec::with_capacity(body.coupon_ids.len());
    for (index, text) in body.coupon_ids.iter().enumerate() {
        let coupon_id = parse_id(&format!("coupon_ids[{index}]"), text).map_err(ApiError::InvalidRequest)?;
        if coupon_ids.contains(&coupon_id) {
            return Err(ApiError::invalid(format!("coupon_ids[{index}]: coupon {coupon_id} is named twice")));
        }
        coupon_ids.push(coupon_id);
    }
    Ok((lines, coupon_ids))
}

/// Whether the caller may pay from `account_id`: it exists and, for an app
/// key, its buyer owns it; else it is answered as if it did not exist.
async fn check_paying_account(state: &AppState, principal: &Principal, account_id: &Id) -> Result<(), ApiError> {
    let owner = state.owner_of(account_id).await?.ok_or_else(|| account_not_found(account_id))?;
    match &principal.scope {
        Scope::Admin => Ok(()),
        Scope::App if owner.is_some() && owner == principal.buyer.clone().map(Owner::Buyer) => Ok(()),
        _ => Err(account_not_found(account_id)),
    }
}

fn checkout_error(code: ErrorCode) -> ApiError {
    match code {
        ErrorCode::InvalidRequest => ApiError::Ledger(
            code,
            format!(
                "the cart cannot be checked out: at most {} merchants, {} lines per merchant, and no merchant's \
                 order may be discounted to zero",
                orders::MAX_ORDERS,
                orders::MAX_ORDER_LINES
            ),
        ),
        code => ApiError::ledger(code),
    }
}

/// A checkout with its orders and payment, as the API shows it.
async fn checkout_answer(
    state: &AppState,
    id: &Id,
    checkout: &Checkout,
    orders: &[Order],
) -> Result<CheckoutJson, ApiError> {
    let payment = state
        .engine()
        .payment(&checkout.checkout.payment_id)
        .await
        .map_err(ApiError::ledger)?
        .ok_or_else(|| ApiError::Internal(format!("checkout {id} has no payment")))?;
    CheckoutJson::of(checkout, orders, &payment)
}

pub async fn create_checkout(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<Response, ApiError> {
    let buyer_id = caller.principal.acting_buyer(body.buyer_id.as_deref(), "checks out")?;
    let (lines, coupon_ids) = cart_of(&body)?;
    let account_id = parse_id("payment.account_id", &body.payment.account_id).map_err(ApiError::InvalidRequest)?;
    check_paying_account(&state, &caller.principal, &account_id).await?;
    let capture = match body.payment.capture {
        CaptureBody::Automatic => CaptureMode::Automatic,
        CaptureBody::Manual => CaptureMode::Manual,
    };
    let request = CheckoutRequest { buyer_id, lines, coupon_ids, account_id, capture };
    let pending = "the checkout may still be placed: list the buyer's orders at /v1/orders, or retry with the same \
                   Idempotency-Key";
    // Keyed: the engine keeps the key with the checkout, so a retry whose
    // stored answer a crash lost answers this checkout again.
    let key = caller.idempotency;
    decide_within(Deadline::of(&state), pending, async move {
        let id = state.engine().checkout_keyed(&request, key).await.map_err(checkout_error)?;
        let (checkout, orders) = state
            .engine()
            .checkout_view(&id)
            .await
            .map_err(ApiError::ledger)?
            .ok_or_else(|| ApiError::Internal(format!("checkout {id} was placed but cannot be read")))?;
        Ok(json(StatusCode::CREATED, &checkout_answer(&state, &id, &checkout, &orders).await?))
    })
    .await
}

pub async fn get_checkout(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let read = async {
        let (checkout, orders) = visible_checkout(&state, &caller.principal, &id).await?;
        checkout_answer(&state, &id, &checkout, &orders).await
    };
    let answer = read_within(Deadline::of(&state), read).await?;
    Ok(json(StatusCode::OK, &answer))
}

// ---- orders ----

pub async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let order = read_within(Deadline::of(&state), visible_order(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &OrderJson::of(&order)?))
}

/// A filter a tenant key is confined to: its own, also when named; naming
/// another tenant's is refused.
fn own_filter(field: &str, own: &Id, named: Option<Id>) -> Result<Id, ApiError> {
    match named {
        Some(named) if named != *own => {
            Err(ApiError::Forbidden(format!("this key lists the orders of {field} {own} only")))
        }
        _ => Ok(own.clone()),
    }
}

pub async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<OrderListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().map(|after| path_id("after", after)).transpose()?;
    let buyer_id = query.buyer_id.as_deref().map(|b| path_id("buyer_id", b)).transpose()?;
    let merchant_id = query.merchant_id.as_deref().map(|m| path_id("merchant_id", m)).transpose()?;
    let principal = &caller.principal;
    let (buyer_id, merchant_id) = match (&principal.scope, &principal.buyer) {
        (Scope::Merchant(own), _) => (buyer_id, Some(own_filter("merchant", own, merchant_id)?)),
        (Scope::App, Some(own)) => (Some(own_filter("buyer", own, buyer_id)?), merchant_id),
        (Scope::App, None) => return Err(ApiError::invalid("X-Buyer-Id: an app key names its buyer")),
        (Scope::Admin | Scope::Read, _) => (buyer_id, merchant_id),
    };
    let read =
        async { state.engine().list_orders(buyer_id, merchant_id, after, limit).await.map_err(ApiError::ledger) };
    let orders = read_within(Deadline::of(&state), read).await?;
    let next = (orders.len() == limit).then(|| orders.last().map(|o| o.order.id.to_string())).flatten();
    let data = orders.iter().map(OrderJson::of).collect::<Result<Vec<_>, _>>()?;
    Ok(json(StatusCode::OK, &Page { data, next }))
}

/// Runs an orders command that changes money and, if it changed anything
/// (the engine says, where the command ran: of racing captures or cancels
/// only the one that did it), writes its audit record (callers run it
/// under `decide_within`, so neither is cancelled by a late or vanished client).
async fn run_command(
    state: AppState,
    caller: Caller,
    command: orders::Command,
    audited: Option<(&'static str, Id, serde_json::Value)>,
) -> Result<Option<Id>, ApiError> {
    let (created, changed) = state.engine().orders_command_changed(command).await.map_err(ApiError::ledger)?;
    if let (Some((action, target, details)), true) = (audited, changed) {
        audit(&state, &caller, action, target.as_str(), details).await?;
    }
    Ok(created)
}

pub async fn cancel_order(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    // Read keys cannot call the route; every other key that sees the
    // order may cancel it (admin, its merchant, its buyer's app key).
    let order = visible_order(&state, &caller.principal, &id).await?;
    let audited = (order.state != orders::OrderState::Canceled).then(|| {
        let details = serde_json::json!({"checkout_id": order.checkout_id.as_str(), "amount": order.amount_authorized});
        (action::ORDER_CANCEL, id.clone(), details)
    });
    let pending = format!("the order may still be canceled: read it at /v1/orders/{id}");
    decide_within(Deadline::of(&state), &pending, async move {
        let command = orders::Command::CancelOrder { order_id: id.clone() };
        run_command(state.clone(), caller, command, audited).await?;
        let order = state.engine().order(&id).await.map_err(ApiError::ledger)?.ok_or_else(|| order_not_found(&id))?;
        Ok(json(StatusCode::OK, &OrderJson::of(&order)?))
    })
    .await
}

// ---- payments ----

pub async fn get_payment(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let payment = read_within(Deadline::of(&state), visible_payment(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &PaymentJson::of(&payment)))
}

async fn payment_command(
    state: AppState,
    caller: Caller,
    id: Id,
    command: orders::Command,
    audited: Option<(&'static str, Id, serde_json::Value)>,
) -> Result<Response, ApiError> {
    let pending = format!("the payment may still change: read it at /v1/payments/{id}");
    decide_within(Deadline::of(&state), &pending, async move {
        run_command(state.clone(), caller, command, audited).await?;
        let payment =
            state.engine().payment(&id).await.map_err(ApiError::ledger)?.ok_or_else(|| payment_not_found(&id))?;
        Ok(json(StatusCode::OK, &PaymentJson::of(&payment)))
    })
    .await
}

/// Captures `amount` (all that is authorized when left out) of a manual
/// payment, shared over its orders by largest remainder; the rest of the
/// hold is released. Capturing twice captures once.
pub async fn capture_payment(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CaptureAmountBody>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let amount = body
        .amount
        .map(|a| parse_amount("amount", a).map(|a| a.get()))
        .transpose()
        .map_err(ApiError::InvalidRequest)?;
    let payment = visible_payment(&state, &caller.principal, &id).await?;
    let audited = (payment.state == orders::PaymentState::RequiresCapture).then(|| {
        let details = serde_json::json!({"amount": amount.unwrap_or(payment.amount_authorized), "authorized": payment.amount_authorized});
        (action::PAYMENT_CAPTURE, id.clone(), details)
    });
    let command = orders::Command::Capture { payment_id: id.clone(), amount };
    payment_command(state, caller, id, command, audited).await
}

/// Releases every hold of a payment not yet captured.
pub async fn cancel_payment(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    // Read keys cannot call the route and merchant keys see no payment:
    // what is left is an admin or the buyer's app key.
    let payment = visible_payment(&state, &caller.principal, &id).await?;
    let audited = (payment.state == orders::PaymentState::RequiresCapture)
        .then(|| (action::PAYMENT_CANCEL, id.clone(), serde_json::json!({"amount": payment.amount_authorized})));
    let command = orders::Command::CancelPayment { payment_id: id.clone() };
    payment_command(state, caller, id, command, audited).await
}

// ---- refunds ----

fn refund_request(body: RefundBody) -> Result<RefundRequest, ApiError> {
    match (body.amount, body.lines) {
        (Some(amount), None) => {
            let amount = parse_amount("amount", amount).map_err(ApiError::InvalidRequest)?;
            Ok(RefundRequest::Amount(amount.get()))
        }
        (None, Some(lines)) => {
            if !(1..=orders::MAX_ORDER_LINES).contains(&lines.len()) {
                return Err(ApiError::invalid(format!(
                    "lines: 1 to {} lines, got {}",
                    orders::MAX_ORDER_LINES,
                    lines.len()
                )));
            }
            let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(lines.len());
            for (index, line) in lines.iter().enumerate() {
                if line.quantity == 0 {
                    return Err(ApiError::invalid(format!("lines[{index}].quantity: at least 1")));
                }
                if pairs.iter().any(|(line_id, _)| *line_id == line.line_id) {
                    return Err(ApiError::invalid(format!(
                        "lines[{index}].line_id: line {} is on an earlier entry",
                        line.line_id
                    )));
                }
                pairs.push((line.line_id, line.quantity));
            }
            Ok(RefundRequest::Lines(pairs))
        }
        _ => Err(ApiError::invalid("give exactly one of amount (minor units) and lines (line_id and quantity each)")),
    }
}

fn refund_error(code: ErrorCode) -> ApiError {
    match code {
        ErrorCode::InvalidRequest => {
            ApiError::Ledger(code, "lines: every line_id must be a line of this order".to_owned())
        }
        code => ApiError::ledger(code),
    }
}

/// Gives money of a paid order back to the buyer's paying account: an
/// amount, or units of lines (each unit its paid share). Never more than
/// was captured, however many refunds race.
pub async fn create_refund(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RefundBody>,
) -> Result<Response, ApiError> {
    let order_id = path_id("id", &id)?;
    let request = refund_request(body)?;
    visible_order(&state, &caller.principal, &order_id).await?;
    if !matches!(caller.principal.scope, Scope::Admin | Scope::Merchant(_)) {
        return Err(ApiError::Forbidden("only an admin key or the order's merchant key refunds".into()));
    }
    let pending = format!("the refund may still be made: read the order's refunds at /v1/orders/{order_id}");
    decide_within(Deadline::of(&state), &pending, async move {
        // The executor assigns the refund's id.
        let command = orders::Command::Refund { refund_id: order_id.clone(), order_id: order_id.clone(), request };
        let refund_id = state
            .engine()
            .orders_command(command)
            .await
            .map_err(refund_error)?
            .ok_or_else(|| ApiError::Internal("the refund was made without an id".into()))?;
        let refund = state
            .engine()
            .refund(&refund_id)
            .await
            .map_err(ApiError::ledger)?
            .ok_or_else(|| refund_not_found(&refund_id))?;
        let details = serde_json::json!({"order_id": order_id.as_str(), "amount": refund.amount});
        audit(&state, &caller, action::REFUND_CREATE, refund_id.as_str(), details).await?;
        Ok(json(StatusCode::CREATED, &RefundJson::of(&refund)))
    })
    .await
}

pub async fn get_refund(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let refund = read_within(Deadline::of(&state), visible_refund(&state, &caller.principal, &id)).await?;
    Ok(json(StatusCode::OK, &RefundJson::of(&refund)))
}
