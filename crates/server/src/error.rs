//! The one error type of the HTTP layer, rendered as RFC 9457 problem+json
//! with a stable machine `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use peakstack_domain::ErrorCode;
use serde::Serialize;

pub const PROBLEM_JSON: &str = "application/problem+json";
/// `Retry-After` of a `deadline_exceeded` answer: about when the outcome
/// of a slow request is worth asking for again.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// Marks an answer that says "try again later" (a request or key in
/// flight, an engine or store that is unavailable). Such answers are never
/// remembered under an Idempotency-Key: the retry must get a real answer.
#[derive(Clone, Copy, Debug)]
pub struct Transient;

/// Everything a request can fail with. Each variant has one stable `code`
/// and one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, wrong types, unknown or missing fields, bad ids,
    /// currencies or amounts, bad headers or query parameters.
    #[error("{0}")]
    InvalidRequest(String),
    /// A body over the route's limit (code `invalid_request`, status 413).
    #[error("{0}")]
    BodyTooLarge(String),
    /// The ledger refused the request; nothing changed.
    #[error("{1}")]
    Ledger(ErrorCode, String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("this Idempotency-Key was used with a different request (method, path or body)")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyKeyInUse,
    /// Shutting down, overloaded, or the idempotency store failed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// No key, or a key that is malformed, unknown, expired or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key whose scope does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    KeyNotFound(String),
    #[error("{0}")]
    LastAdminKey(String),
    /// The client was too slow sending its request.
    #[error("{0}")]
    RequestTimeout(String),
    /// The engine did not decide within the request's deadline; the
    /// request was not cancelled (see `handlers::decide_within`).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A body that does not say it is JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A request head over the connection's bound (answered by the
    /// connection layer, before any route).
    #[error("{0}")]
    HeadTooLarge(String),
    /// A request target over hyper's bound (answered by the connection layer).
    #[error("{0}")]
    UriTooLong(String),
}

impl ApiError {
    /// One error of every variant: the codes the server answers besides the
    /// ledger's (the OpenAPI test checks they are all documented).
    pub fn examples() -> Vec<ApiError> {
        let all = vec![
            ApiError::InvalidRequest(String::new()),
            ApiError::BodyTooLarge(String::new()),
            ApiError::Ledger(ErrorCode::InvalidRequest, String::new()),
            ApiError::RouteNotFound(String::new()),
            ApiError::MethodNotAllowed(String::new()),
            ApiError::IdempotencyKeyReused,
            ApiError::IdempotencyKeyInUse,
            ApiError::Unavailable(String::new()),
            ApiError::Internal(String::new()),
            ApiError::Unauthorized(String::new()),
            ApiError::Forbidden(String::new()),
            ApiError::KeyNotFound(String::new()),
            ApiError::LastAdminKey(String::new()),
            ApiError::RequestTimeout(String::new()),
            ApiError::UnsupportedMediaType(String::new()),
            ApiError::HeadTooLarge(String::new()),
            ApiError::UriTooLong(String::new()),
            ApiError::DeadlineExceeded(String::new()),
        ];
        // No wildcard: a new variant fails to compile here until it is
        // listed above.
        for error in &all {
            match error {
                ApiError::InvalidRequest(_)
                | ApiError::BodyTooLarge(_)
                | ApiError::Ledger(..)
                | ApiError::RouteNotFound(_)
                | ApiError::MethodNotAllowed(_)
                | ApiError::IdempotencyKeyReused
                | ApiError::IdempotencyKeyInUse
                | ApiError::Unavailable(_)
                | ApiError::Internal(_)
                | ApiError::Unauthorized(_)
                | ApiError::Forbidden(_)
                | ApiError::KeyNotFound(_)
                | ApiError::LastAdminKey(_)
                | ApiError::RequestTimeout(_)
                | ApiError::UnsupportedMediaType(_)
                | ApiError::HeadTooLarge(_)
                | ApiError::UriTooLong(_)
                | ApiError::DeadlineExceeded(_) => {}
            }
        }
        all
    }

    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest(detail.into())
    }

    /// A ledger refusal with the standard explanation of its code.
    pub fn ledger(code: ErrorCode) -> ApiError {
        ApiError::Ledger(code, ledger_detail(code).to_owned())
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::BodyTooLarge(_) => "invalid_request",
            ApiError::Ledger(code, _) => code.as_str(),
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyKeyInUse => "idempotency_key_in_use",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::KeyNotFound(_) => "key_not_found",
            ApiError::LastAdminKey(_) => "last_admin_key",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::HeadTooLarge(_) => "request_header_fields_too_large",
            ApiError::UriTooLong(_) => "uri_too_long",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Ledger(code, _) => ledger_status(*code),
            ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyKeyInUse => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::KeyNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::LastAdminKey(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::DeadlineExceeded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
        }
    }

    /// Whether a retry may get a different answer (see [`Transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Ledger(code, _) => is_transient_code(*code),
            // The key's fingerprint does not cover the Content-Type: the
            // same body sent as JSON must still get its own answer.
            ApiError::IdempotencyKeyInUse
            | ApiError::Unavailable(_)
            | ApiError::Internal(_)
            | ApiError::RequestTimeout(_)
            | ApiError::DeadlineExceeded(_)
            | ApiError::UnsupportedMediaType(_) => true,
            _ => false,
        }
    }
}

/// Ledger codes whose answer may change on a retry. A flash sale's
/// `sold_out` (an unpaid unit comes back) and `sale_not_started` changed
/// nothing and are answered from memory: stored under an Idempotency-Key
/// they cost an fsync each (a keyed race's losers ran at 0.375 of healthz)
/// and would refuse the retry that could now win.
pub fn is_transient_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InFlight
            | ErrorCode::Unavailable
            | ErrorCode::TransactionTimedOut
            | ErrorCode::SoldOut
            | ErrorCode::SaleNotStarted
    )
}

/// The HTTP status of each ledger code.
pub fn ledger_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::AccountNotFound
        | ErrorCode::TransferNotFound
        | ErrorCode::PendingTransferNotFound
        | ErrorCode::SkuNotFound
        | ErrorCode::FlashSaleNotFound
        | ErrorCode::ReservationNotFound
        | ErrorCode::PromotionNotFound
        | ErrorCode::CouponNotFound
        | ErrorCode::TransactionNotFound
        | ErrorCode::CheckoutNotFound
        | ErrorCode::OrderNotFound
        | ErrorCode::PaymentNotFound
        | ErrorCode::RefundNotFound
        | ErrorCode::SettlementNotFound
        | ErrorCode::MessageNotFound => StatusCode::NOT_FOUND,
        ErrorCode::ExistsWithDifferentFields | ErrorCode::InFlight => StatusCode::CONFLICT,
        ErrorCode::Unavailable | ErrorCode::TransactionTimedOut => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::CurrencyMismatch
        | ErrorCode::AccountsMustBeDifferent
        | ErrorCode::ExceedsCredits
        | ErrorCode::ExceedsDebits
        | ErrorCode::PendingTransferNotPending
        | ErrorCode::PendingTransferAlreadyPosted
        | ErrorCode::PendingTransferAlreadyVoided
        | ErrorCode::PendingTransferExpired
        | ErrorCode::AmountExceedsPending
        | ErrorCode::Overflow
        | ErrorCode::LinkedEventFailed
        | ErrorCode::DuplicateIdInBatch
        | ErrorCode::AccountFrozen
        | ErrorCode::AccountClosed
        | ErrorCode::AccountNotZero
        | ErrorCode::OutOfStock
        | ErrorCode::PurchaseLimitExceeded
        | ErrorCode::SaleNotStarted
        | ErrorCode::SaleEnded
        | ErrorCode::SoldOut
        | ErrorCode::ReservationExpired
        | ErrorCode::ReservationCancelled
        | ErrorCode::ReservationConfirmed
        | ErrorCode::CouponNotApplicable
        | ErrorCode::CouponAlreadyUsed
        | ErrorCode::CouponExpired
        | ErrorCode::CouponsExhausted
        | ErrorCode::PromotionBudgetExhausted
        | ErrorCode::PromotionUsageLimitReached
        | ErrorCode::PromotionBuyerLimitReached
        | ErrorCode::BranchCancelled
        | ErrorCode::InvalidState
        | ErrorCode::AmountExceedsAuthorized
        | ErrorCode::RefundExceedsCaptured => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// The standard explanation of a ledger code, for `detail`.
pub fn ledger_detail(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidRequest => "the request is not valid",
        ErrorCode::AccountNotFound => "an account named in the request does not exist",
        ErrorCode::TransferNotFound => "the transfer does not exist",
        ErrorCode::CurrencyMismatch => "the transfer's currency differs from the currency of one of its accounts",
        ErrorCode::AccountsMustBeDifferent => "the debit and credit accounts of a transfer must be different",
        ErrorCode::ExceedsCredits => "the debit account's debits would exceed its credits (plus its overdraft limit)",
        ErrorCode::ExceedsDebits => "the credit account's credits would exceed its debits",
        ErrorCode::ExistsWithDifferentFields => "an object with this id exists already, with different fields",
        ErrorCode::PendingTransferNotFound => "the pending transfer does not exist",
        ErrorCode::PendingTransferNotPending => "the transfer named as pending is not a pending transfer",
        ErrorCode::PendingTransferAlreadyPosted => "the pending transfer was already posted",
        ErrorCode::PendingTransferAlreadyVoided => "the pending transfer was already voided",
        ErrorCode::PendingTransferExpired => "the pending transfer expired",
        ErrorCode::AmountExceedsPending => "the amount to post exceeds the pending amount",
        ErrorCode::Overflow => "a balance would overflow",
        ErrorCode::LinkedEventFailed => {
            "the transfer at cause_index failed or exists already, and an atomic batch is applied whole or not at all"
        }
        ErrorCode::InFlight => "another request for this transfer is being processed right now; retry shortly",
        ErrorCode::Unavailable => "the ledger is shutting down or overloaded; retry later",
        ErrorCode::DuplicateIdInBatch => "another transfer of this batch has the same id",
        ErrorCode::AccountFrozen => {
            "an account of the transfer is frozen: it takes no new transfers or holds until unfrozen"
        }
        ErrorCode::AccountClosed => "the account is closed: it takes nothing, for ever",
        ErrorCode::AccountNotZero => "only an account with posted balance zero and nothing pending can be closed",
        ErrorCode::SkuNotFound => "the SKU does not exist",
        ErrorCode::OutOfStock => "fewer units are available than asked for",
        ErrorCode::PurchaseLimitExceeded => {
            "the buyer would hold more units than the per-buyer limit allows (sold and reserved units count)"
        }
        ErrorCode::SaleNotStarted => "the flash sale has not started yet",
        ErrorCode::SaleEnded => "the flash sale is over",
        ErrorCode::SoldOut => "every unit of the flash sale is sold or reserved",
        ErrorCode::FlashSaleNotFound => "the flash sale does not exist",
        ErrorCode::ReservationNotFound => "the reservation does not exist",
        ErrorCode::ReservationExpired => "the reservation's deadline passed and its units went back on sale",
        ErrorCode::ReservationCancelled => "the reservation was cancelled and its units went back",
        ErrorCode::ReservationConfirmed => "the reservation is confirmed (sold) and can no longer be cancelled",
        ErrorCode::PromotionNotFound => "the promotion does not exist",
        ErrorCode::CouponNotFound => "the coupon or coupon template does not exist",
        ErrorCode::CouponNotApplicable => {
            "the coupon does not apply to this cart (scope, minimum spend, currency or buyer)"
        }
        ErrorCode::CouponAlreadyUsed => "the coupon was used or is locked by another checkout",
        ErrorCode::CouponExpired => "the coupon is outside its validity window",
        ErrorCode::CouponsExhausted => "the coupon template has issued every coupon it may",
        ErrorCode::TransactionNotFound => "the global transaction does not exist",
        ErrorCode::PromotionBudgetExhausted => "the promotion's budget has less left than this discount",
        ErrorCode::PromotionUsageLimitReached => "the promotion was used as often as its usage limit allows",
        ErrorCode::PromotionBuyerLimitReached => "the buyer used the promotion as often as its per-buyer limit allows",
        ErrorCode::BranchCancelled => "this transaction's branch was cancelled; its try or confirm is refused",
        ErrorCode::TransactionTimedOut => {
            "the transaction across executors was not decided by its deadline and was cancelled: nothing was done; \
             retrying is safe"
        }
        ErrorCode::CheckoutNotFound => "the checkout does not exist",
        ErrorCode::OrderNotFound => "the order does not exist",
        ErrorCode::PaymentNotFound => "the payment does not exist",
        ErrorCode::RefundNotFound => "the refund does not exist",
        ErrorCode::InvalidState => "the object's state does not allow this (for example a capture of a canceled payment or a refund of an unpaid order)",
        ErrorCode::AmountExceedsAuthorized => "the capture asks more than the payment has authorized and not yet captured",
        ErrorCode::RefundExceedsCaptured => "the refunds would give back more than was captured for the order (or more units of a line than it has)",
        ErrorCode::SettlementNotFound => "the settlement does not exist",
        ErrorCode::MessageNotFound => "no dead letter with this id",
    }
}

fn title(code: &str) -> &'static str {
    match code {
        "invalid_request" => "Invalid request",
        "account_not_found" => "Account not found",
        "transfer_not_found" => "Transfer not found",
        "pending_transfer_not_found" => "Pending transfer not found",
        "currency_mismatch" => "Currency mismatch",
        "accounts_must_be_different" => "Accounts must be different",
        "exceeds_credits" => "Debits would exceed credits",
        "exceeds_debits" => "Credits would exceed debits",
        "exists_with_different_fields" => "Exists with different fields",
        "pending_transfer_not_pending" => "Transfer is not pending",
        "pending_transfer_already_posted" => "Pending transfer already posted",
        "pending_transfer_already_voided" => "Pending transfer already voided",
        "pending_transfer_expired" => "Pending transfer expired",
        "amount_exceeds_pending" => "Amount exceeds pending amount",
        "overflow" => "Balance overflow",
        "linked_event_failed" => "Linked transfer failed",
        "transfer_in_flight" => "Transfer in flight",
        "unavailable" => "Service unavailable",
        "not_found" => "Not found",
        "method_not_allowed" => "Method not allowed",
        "idempotency_key_reused" => "Idempotency key reused",
        "idempotency_key_in_use" => "Idempotency key in use",
        "unauthorized" => "Unauthorized",
        "forbidden" => "Forbidden",
        "key_not_found" => "API key not found",
        "last_admin_key" => "Last admin key",
        "request_timeout" => "Request timeout",
        "deadline_exceeded" => "Deadline exceeded",
        "duplicate_id_in_batch" => "Duplicate id in batch",
        "account_frozen" => "Account frozen",
        "account_closed" => "Account closed",
        "account_not_zero" => "Account not at zero",
        "sku_not_found" => "SKU not found",
        "out_of_stock" => "Out of stock",
        "purchase_limit_exceeded" => "Purchase limit exceeded",
        "sale_not_started" => "Sale not started",
        "sale_ended" => "Sale ended",
        "sold_out" => "Sold out",
        "flash_sale_not_found" => "Flash sale not found",
        "reservation_not_found" => "Reservation not found",
        "reservation_expired" => "Reservation expired",
        "reservation_cancelled" => "Reservation cancelled",
        "reservation_confirmed" => "Reservation confirmed",
        "promotion_not_found" => "Promotion not found",
        "coupon_not_found" => "Coupon not found",
        "coupon_not_applicable" => "Coupon not applicable",
        "coupon_already_used" => "Coupon already used",
        "coupon_expired" => "Coupon expired",
        "coupons_exhausted" => "Coupons exhausted",
        "transaction_not_found" => "Transaction not found",
        "promotion_budget_exhausted" => "Promotion budget exhausted",
        "promotion_usage_limit_reached" => "Promotion usage limit reached",
        "promotion_buyer_limit_reached" => "Promotion buyer limit reached",
        "branch_cancelled" => "Branch cancelled",
        "transaction_timed_out" => "Transaction timed out",
        "checkout_not_found" => "Checkout not found",
        "order_not_found" => "Order not found",
        "payment_not_found" => "Payment not found",
        "refund_not_found" => "Refund not found",
        "invalid_state" => "Invalid state",
        "amount_exceeds_authorized" => "Amount exceeds authorized",
        "refund_exceeds_captured" => "Refund exceeds captured",
        "settlement_not_found" => "Settlement not found",
        "message_not_found" => "Message not found",
        "unsupported_media_type" => "Unsupported media type",
        "request_header_fields_too_large" => "Request header fields too large",
        "uri_too_long" => "URI too long",
        _ => "Internal error",
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    code: &'a str,
}

/// The problem+json body of an answer.
pub fn problem_body(status: StatusCode, code: &str, detail: String) -> Vec<u8> {
    let body = Problem {
        kind: format!("urn:peakstack:problem:{code}"),
        title: title(code),
        status: status.as_u16(),
        detail,
        code,
    };
    serde_json::to_vec(&body).expect("a problem serializes")
}

/// Renders a problem+json answer.
pub fn problem(status: StatusCode, code: &str, detail: String) -> Response {
    let bytes = problem_body(status, code, detail);
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let transient = self.is_transient();
        let retry_after = matches!(self, ApiError::DeadlineExceeded(_));
        let mut response = problem(self.status(), self.code(), self.to_string());
        if retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        if transient {
            response.extensions_mut().insert(Transient);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_code_has_a_status_a_title_and_a_detail() {
        for code in ErrorCode::ALL {
            let status = ledger_status(code);
            assert!(status.is_client_error() || status.is_server_error(), "{code}");
            assert_ne!(title(code.as_str()), "Internal error", "{code}");
            assert!(!ledger_detail(code).is_empty());
        }
    }
}
