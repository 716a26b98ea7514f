//! Promotions, coupon templates, coupons and quotes over HTTP: thin
//! handlers over the engine's pricing part.
//!
//! Who may do what: an admin key anything; a merchant key runs promotions
//! and coupon templates scoped to its own merchant or to its own SKUs and
//! sees those; an app key quotes and lists coupons for its `X-Buyer-Id`; a
//! read key reads.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use peakstack_domain::{Currency, ErrorCode, Id};
use peakstack_engine::pricing::{
    self, CartLine, Coupon, CouponDiscount, CouponState, CouponTemplate, CouponTemplateSpec, Promotion,
    PromotionCounters, PromotionKind, PromotionSpec, QuoteRequest, Scope as PriceScope,
};
use serde::{Deserialize, Serialize};

use crate::access::{Caller, Principal, Scope};
use crate::admin::{parse_rfc3339_ms, rfc3339};
use crate::audit::action;
use crate::error::ApiError;
use crate::handlers::{audit, json, path_id, read_within, ApiJson, ApiPath, ApiQuery, Deadline};
use crate::wire::{parse_client_id, parse_currency, parse_id};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeBody {
    #[serde(default)]
    sku_ids: Option<Vec<String>>,
    #[serde(default)]
    merchant_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KindBody {
    PercentOff {
        percent: u8,
    },
    AmountOff {
        amount: u64,
    },
    SpendThreshold {
        threshold: u64,
        off: u64,
        #[serde(default)]
        stepwise: bool,
    },
    BuyXGetY {
        buy: u32,
        get: u32,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionBody {
    id: String,
    currency: String,
    kind: KindBody,
    #[serde(default)]
    scope: Option<ScopeBody>,
    starts_at: String,
    ends_at: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    budget: Option<u64>,
    #[serde(default)]
    usage_limit: Option<u64>,
    #[serde(default)]
    per_buyer_limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CouponDiscountBody {
    PercentOff { percent: u8 },
    AmountOff { amount: u64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponTemplateBody {
    id: String,
    currency: String,
    discount: CouponDiscountBody,
    #[serde(default)]
    min_spend: u64,
    #[serde(default)]
    scope: Option<ScopeBody>,
    valid_from: String,
    valid_until: String,
    total_issue: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    buyer_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponsQuery {
    #[serde(default)]
    buyer_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteLineBody {
    sku_id: String,
    quantity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteBody {
    #[serde(default)]
    buyer_id: Option<String>,
    lines: Vec<QuoteLineBody>,
    #[serde(default)]
    coupon_ids: Vec<String>,
}

fn scope_json(scope: &PriceScope) -> serde_json::Value {
    match scope {
        PriceScope::Skus(skus) => serde_json::json!({"sku_ids": skus.iter().map(Id::as_str).collect::<Vec<_>>()}),
        PriceScope::Merchant(m) => serde_json::json!({"merchant_id": m.as_str()}),
        PriceScope::Everything => serde_json::json!({}),
    }
}

fn kind_json(kind: &PromotionKind) -> serde_json::Value {
    match *kind {
        PromotionKind::PercentOff { percent } => serde_json::json!({"type": "percent_off", "percent": percent}),
        PromotionKind::AmountOff { amount } => serde_json::json!({"type": "amount_off", "amount": amount}),
        PromotionKind::SpendThreshold { threshold, off, stepwise } => {
            serde_json::json!({"type": "spend_threshold", "threshold": threshold, "off": off, "stepwise": stepwise})
        }
        PromotionKind::BuyXGetY { buy, get } => serde_json::json!({"type": "buy_x_get_y", "buy": buy, "get": get}),
    }
}

#[derive(Serialize)]
struct PromotionJson {
    id: String,
    currency: String,
    kind: serde_json::Value,
    scope: serde_json::Value,
    starts_at: String,
    ends_at: String,
    group: Option<String>,
    priority: i32,
    budget: Option<u64>,
    usage_limit: Option<u64>,
    per_buyer_limit: Option<u64>,
    /// Discount confirmed, and reserved by checkouts not yet confirmed.
    given: u64,
    reserved: u64,
    uses: u64,
    reserved_uses: u64,
}

impl PromotionJson {
    fn of(p: &Promotion, c: PromotionCounters) -> PromotionJson {
        PromotionJson {
            id: p.id.to_string(),
            currency: p.currency.to_string(),
            kind: kind_json(&p.kind),
            scope: scope_json(&p.scope),
            starts_at: rfc3339(p.starts_at_ms),
            ends_at: rfc3339(p.ends_at_ms),
            group: p.group.clone(),
            priority: p.priority,
            budget: p.budget,
            usage_limit: p.usage_limit,
            per_buyer_limit: p.per_buyer_limit,
            given: c.given,
            reserved: c.reserved,
            uses: c.uses,
            reserved_uses: c.reserved_uses,
        }
    }
}

#[derive(Serialize)]
struct TemplateJson {
    id: String,
    currency: String,
    discount: serde_json::Value,
    min_spend: u64,
    scope: serde_json::Value,
    valid_from: String,
    valid_until: String,
    total_issue: u64,
    issued: u64,
}

impl TemplateJson {
    fn of(t: &CouponTemplate, issued: u64) -> TemplateJson {
        let discount = match t.discount {
            CouponDiscount::PercentOff { percent } => serde_json::json!({"type": "percent_off", "percent": percent}),
            CouponDiscount::AmountOff { amount } => serde_json::json!({"type": "amount_off", "amount": amount}),
        };
        TemplateJson {
            id: t.id.to_string(),
            currency: t.currency.to_string(),
            discount,
            min_spend: t.min_spend,
            scope: scope_json(&t.scope),
            valid_from: rfc3339(t.valid_from_ms),
            valid_until: rfc3339(t.valid_until_ms),
            total_issue: t.total_issue,
            issued,
        }
    }
}

#[derive(Serialize)]
struct CouponJson {
    id: String,
    template_id: String,
    buyer_id: String,
    state: &'static str,
}

impl CouponJson {
    fn of(c: &Coupon) -> CouponJson {
        let state = match c.state {
            CouponState::Available => "available",
            CouponState::Locked { .. } => "locked",
            CouponState::Used { .. } => "used",
        };
        CouponJson {
            id: c.id.to_string(),
            template_id: c.template_id.to_string(),
            buyer_id: c.buyer_id.to_string(),
            state,
        }
    }
}

fn invalid(e: String) -> ApiError {
    ApiError::InvalidRequest(e)
}

/// A scope as a caller may set it: a merchant key only its own merchant
/// (the default for it) or SKUs; an admin anything (default: everything).
fn scope_of(principal: &Principal, body: Option<ScopeBody>) -> Result<PriceScope, ApiError> {
    let own = match &principal.scope {
        Scope::Merchant(m) => Some(m.clone()),
        _ => None,
    };
    let scope = match body {
        None | Some(ScopeBody { sku_ids: None, merchant_id: None }) => match own.clone() {
            Some(m) => PriceScope::Merchant(m),
            None => PriceScope::Everything,
        },
        Some(ScopeBody { sku_ids: Some(ids), merchant_id: None }) => {
            let ids: Result<BTreeSet<Id>, ApiError> =
                ids.iter().map(|s| parse_id("scope.sku_ids", s).map_err(invalid)).collect();
            PriceScope::Skus(ids?)
        }
        Some(ScopeBody { sku_ids: None, merchant_id: Some(m) }) => {
            PriceScope::Merchant(parse_id("scope.merchant_id", &m).map_err(invalid)?)
        }
        Some(_) => return Err(ApiError::invalid("scope: name sku_ids or merchant_id, not both")),
    };
    match (&own, &scope) {
        (Some(own), PriceScope::Merchant(m)) if m != own => {
            Err(ApiError::Forbidden(format!("this merchant key runs promotions of {own} only")))
        }
        (Some(_), PriceScope::Everything) => {
            Err(ApiError::Forbidden("only an admin key runs a promotion over everything".into()))
        }
        _ => Ok(scope),
    }
}

/// A merchant key's SKU scope must name its own SKUs only (each looked up
/// where it lives); an unknown or another merchant's SKU is refused alike.
async fn check_own_skus(state: &AppState, principal: &Principal, scope: &PriceScope) -> Result<(), ApiError> {
    let (Scope::Merchant(own), PriceScope::Skus(skus)) = (&principal.scope, scope) else { return Ok(()) };
    for sku_id in skus {
        match state.engine().sku(sku_id).await.map_err(ApiError::ledger)? {
            Some(sku) if sku.merchant_id == *own => {}
            _ => {
                return Err(ApiError::Ledger(
                    ErrorCode::SkuNotFound,
                    format!("scope.sku_ids: SKU {sku_id} is not one of {own}'s"),
                ))
            }
        }
    }
    Ok(())
}

fn writer(principal: &Principal) -> Result<(), ApiError> {
    match principal.scope {
        Scope::Admin | Scope::Merchant(_) => Ok(()),
        _ => Err(ApiError::Forbidden("only an admin key or a merchant key runs promotions and coupons".into())),
    }
}

fn time(field: &str, text: &str) -> Result<u64, ApiError> {
    parse_rfc3339_ms(field, text).map_err(invalid)
}

fn currency(text: &str) -> Result<Currency, ApiError> {
    parse_currency(text).map_err(invalid)
}

fn exists(what: &str, id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::ExistsWithDifferentFields, format!("{what} {id} exists already, with different fields"))
}

pub async fn create_promotion(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<PromotionBody>,
) -> Result<Response, ApiError> {
    writer(&caller.principal)?;
    let id = parse_client_id("id", &body.id).map_err(invalid)?;
    let kind = match body.kind {
        KindBody::PercentOff { percent } => PromotionKind::PercentOff { percent },
        KindBody::AmountOff { amount } => PromotionKind::AmountOff { amount },
        KindBody::SpendThreshold { threshold, off, stepwise } => {
            PromotionKind::SpendThreshold { threshold, off, stepwise }
        }
        KindBody::BuyXGetY { buy, get } => PromotionKind::BuyXGetY { buy, get },
    };
    let spec = PromotionSpec {
        id: id.clone(),
        currency: currency(&body.currency)?,
        kind,
        scope: scope_of(&caller.principal, body.scope)?,
        starts_at_ms: time("starts_at", &body.starts_at)?,
        ends_at_ms: time("ends_at", &body.ends_at)?,
        group: body.group,
        priority: body.priority,
        budget: body.budget,
        usage_limit: body.usage_limit,
        per_buyer_limit: body.per_buyer_limit,
    };
    let promotion = Promotion::new(spec).map_err(|_| {
        ApiError::invalid(
            "percent 1-100; amounts 1 to 2^53-1 (off at most threshold); buy and get at least 1; ends_at after \
             starts_at; group 1-64 visible characters; budget, usage_limit and per_buyer_limit at least 1; \
             scope.sku_ids 1-1000",
        )
    })?;
    check_own_skus(&state, &caller.principal, &promotion.scope).await?;
    let existed = state.engine().promotion(&id).await.map_err(ApiError::ledger)?;
    match state.engine().pricing(pricing::Command::CreatePromotion(promotion)).await {
        Ok(_) => {}
        Err(ErrorCode::ExistsWithDifferentFields) => return Err(exists("promotion", &id)),
        Err(code) => return Err(ApiError::ledger(code)),
    }
    let (promotion, counters) =
        state.engine().promotion(&id).await.map_err(ApiError::ledger)?.ok_or_else(|| promotion_not_found(&id))?;
    if existed.is_none() {
        audit(&state, &caller, action::PROMOTION_CREATE, id.as_str(), serde_json::json!({"budget": promotion.budget}))
            .await?;
    }
    let status = if existed.is_none() { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json(status, &PromotionJson::of(&promotion, counters)))
}

fn promotion_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::PromotionNotFound, format!("promotion {id} does not exist"))
}

fn coupon_not_found(id: &Id) -> ApiError {
    ApiError::Ledger(ErrorCode::CouponNotFound, format!("coupon template {id} does not exist"))
}

/// Whether a merchant key sees this scope's object: its own merchant's, or
/// SKU-scoped ones (a merchant can scope only its own SKUs; another
/// merchant's SKU-scoped promotion shows its SKU ids, nothing of theirs else).
fn sees(principal: &Principal, scope: &PriceScope) -> bool {
    match (&principal.scope, scope) {
        (Scope::Merchant(own), PriceScope::Merchant(m)) => own == m,
        (Scope::Merchant(_), PriceScope::Everything) => false,
        _ => true,
    }
}

pub async fn get_promotion(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let read = async { state.engine().promotion(&id).await.map_err(ApiError::ledger) };
    match read_within(Deadline::of(&state), read).await? {
        Some((p, c)) if sees(&caller.principal, &p.scope) => Ok(json(StatusCode::OK, &PromotionJson::of(&p, c))),
        _ => Err(promotion_not_found(&id)),
    }
}

pub async fn create_coupon_template(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CouponTemplateBody>,
) -> Result<Response, ApiError> {
    writer(&caller.principal)?;
    let id = parse_client_id("id", &body.id).map_err(invalid)?;
    let discount = match body.discount {
        CouponDiscountBody::PercentOff { percent } => CouponDiscount::PercentOff { percent },
        CouponDiscountBody::AmountOff { amount } => CouponDiscount::AmountOff { amount },
    };
    let spec = CouponTemplateSpec {
        id: id.clone(),
        currency: currency(&body.currency)?,
        discount,
        min_spend: body.min_spend,
        scope: scope_of(&caller.principal, body.scope)?,
        valid_from_ms: time("valid_from", &body.valid_from)?,
        valid_until_ms: time("valid_until", &body.valid_until)?,
        total_issue: body.total_issue,
    };
    let template = CouponTemplate::new(spec).map_err(|_| {
        ApiError::invalid(
            "percent 1-100; amount 1 to 2^53-1; min_spend at most 2^53-1; valid_until after valid_from; \
             total_issue at least 1",
        )
    })?;
    check_own_skus(&state, &caller.principal, &template.scope).await?;
    let existed = state.engine().coupon_template(&id).await.map_err(ApiError::ledger)?;
    match state.engine().pricing(pricing::Command::CreateCouponTemplate(template)).await {
        Ok(_) => {}
        Err(ErrorCode::ExistsWithDifferentFields) => return Err(exists("coupon template", &id)),
        Err(code) => return Err(ApiError::ledger(code)),
    }
    let (template, issued) =
        state.engine().coupon_template(&id).await.map_err(ApiError::ledger)?.ok_or_else(|| coupon_not_found(&id))?;
    if existed.is_none() {
        let details = serde_json::json!({"total_issue": template.total_issue});
        audit(&state, &caller, action::COUPON_TEMPLATE_CREATE, id.as_str(), details).await?;
    }
    let status = if existed.is_none() { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json(status, &TemplateJson::of(&template, issued)))
}

pub async fn get_coupon_template(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id("id", &id)?;
    let read = async { state.engine().coupon_template(&id).await.map_err(ApiError::ledger) };
    match read_within(Deadline::of(&state), read).await? {
        Some((t, issued)) if sees(&caller.principal, &t.scope) => {
            Ok(json(StatusCode::OK, &TemplateJson::of(&t, issued)))
        }
        _ => Err(coupon_not_found(&id)),
    }
}

pub async fn issue_coupon(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<IssueBody>,
) -> Result<Response, ApiError> {
    writer(&caller.principal)?;
    let template_id = path_id("id", &id)?;
    let buyer_id = parse_id("buyer_id", &body.buyer_id).map_err(invalid)?;
    match state.engine().coupon_template(&template_id).await.map_err(ApiError::ledger)? {
        Some((t, _)) if sees(&caller.principal, &t.scope) => {}
        _ => return Err(coupon_not_found(&template_id)),
    }
    let command = pricing::Command::IssueCoupon {
        template_id: template_id.clone(),
        buyer_id: buyer_id.clone(),
        coupon_id: template_id.clone(), // the executor assigns the id
    };
    let coupon_id = match state.engine().pricing(command).await {
        Ok(Some(coupon_id)) => coupon_id,
        Ok(None) => return Err(ApiError::Internal("the coupon was issued without an id".into())),
        Err(code) => return Err(ApiError::ledger(code)),
    };
    let coupon = Coupon { id: coupon_id, template_id, buyer_id, state: CouponState::Available };
    Ok(json(StatusCode::CREATED, &CouponJson::of(&coupon)))
}

/// The buyer a read or quote is for: an app key's own, else the one named.
fn buyer_for(principal: &Principal, named: Option<&str>) -> Result<Id, ApiError> {
    let named = named.map(|b| parse_id("buyer_id", b).map_err(invalid)).transpose()?;
    match (&principal.scope, &principal.buyer, named) {
        (Scope::App, Some(own), Some(named)) if named != *own => {
            Err(ApiError::Forbidden(format!("this app key acts for buyer {own} (X-Buyer-Id), not {named}")))
        }
        (Scope::App, Some(own), _) => Ok(own.clone()),
        (_, _, Some(named)) => Ok(named),
        (_, _, None) => Err(ApiError::invalid("buyer_id: required")),
    }
}

pub async fn list_coupons(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<CouponsQuery>,
) -> Result<Response, ApiError> {
    if matches!(caller.principal.scope, Scope::Merchant(_)) {
        return Err(ApiError::Forbidden("coupons are read by admin, read and app keys".into()));
    }
    let buyer_id = buyer_for(&caller.principal, query.buyer_id.as_deref())?;
    let read = async { state.engine().coupons_of(&buyer_id).await.map_err(ApiError::ledger) };
    let coupons = read_within(Deadline::of(&state), read).await?;
    let data: Vec<CouponJson> = coupons.iter().map(CouponJson::of).collect();
    Ok(json(StatusCode::OK, &serde_json::json!({"data": data})))
}

/// The full breakdown of a cart's price, with no side effect.
pub async fn create_quote(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<QuoteBody>,
) -> Result<Response, ApiError> {
    let buyer_id = buyer_for(&caller.principal, body.buyer_id.as_deref())?;
    let lines = body
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sku_id = parse_id(&format!("lines[{i}].sku_id"), &l.sku_id).map_err(invalid)?;
            Ok(CartLine { sku_id, quantity: l.quantity })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let coupon_ids = body
        .coupon_ids
        .iter()
        .map(|c| parse_id("coupon_ids", c).map_err(invalid))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let request = QuoteRequest { buyer_id, lines, coupon_ids };
    let read = async { state.engine().quote(&request).await.map_err(quote_error) };
    let quote = read_within(Deadline::of(&state), read).await?;
    Ok(json(StatusCode::OK, &quote))
}

fn quote_error(code: ErrorCode) -> ApiError {
    match code {
        ErrorCode::InvalidRequest => ApiError::invalid(format!(
            "lines: 1-{} lines of distinct SKUs, quantity 1-{}; at most {} coupons",
            pricing::MAX_QUOTE_LINES,
            pricing::MAX_LINE_QUANTITY,
            pricing::MAX_QUOTE_COUPONS
        )),
        code => ApiError::ledger(code),
    }
}
