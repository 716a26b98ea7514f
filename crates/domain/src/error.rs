//! Ledger error codes: stable, machine-readable, one per way a request can be refused.

use std::fmt;

/// Why the ledger refused a request. A refused request changes nothing.
///
/// The string form (`as_str`) is the stable `code` in problem+json answers;
/// never rename a variant's code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ErrorCode {
    InvalidRequest,
    AccountNotFound,
    TransferNotFound,
    CurrencyMismatch,
    AccountsMustBeDifferent,
    ExceedsCredits,
    ExceedsDebits,
    ExistsWithDifferentFields,
    PendingTransferNotFound,
    PendingTransferNotPending,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    AmountExceedsPending,
    Overflow,
    /// In an atomic batch: this transfer was fine, another one failed.
    LinkedEventFailed,
    /// Another request with the same transfer id (or on the same pending
    /// transfer) is being processed right now; retry shortly.
    InFlight,
    /// The engine is shutting down or overloaded beyond its bounds.
    Unavailable,
    /// Two transfers of one call carry the same id: the later one is
    /// refused, whatever the executors (it can never succeed on a retry).
    DuplicateIdInBatch,
    /// A frozen account takes no new transfers or holds (releasing a hold
    /// still works); it can be unfrozen.
    AccountFrozen,
    /// A closed account refuses everything, for ever.
    AccountClosed,
    /// Only an account with posted balance zero and nothing pending closes.
    AccountNotZero,
    /// No SKU with this id.
    SkuNotFound,
    /// Fewer units available than asked for.
    OutOfStock,
    /// The buyer would hold more units than the SKU's or sale's per-buyer limit (sold and reserved count).
    PurchaseLimitExceeded,
    /// The flash sale has not started yet.
    SaleNotStarted,
    /// The flash sale is over.
    SaleEnded,
    /// Every unit of the flash sale is sold or reserved.
    SoldOut,
    /// No flash sale with this id.
    FlashSaleNotFound,
    /// No reservation with this id.
    ReservationNotFound,
    /// The reservation's deadline passed; its units went back.
    ReservationExpired,
    /// The reservation was cancelled; its units went back.
    ReservationCancelled,
    /// The reservation was confirmed (sold); it can no longer be cancelled.
    ReservationConfirmed,
    /// No promotion with this id.
    PromotionNotFound,
    /// No coupon (or coupon template) with this id.
    CouponNotFound,
    /// The coupon does not apply to this cart (scope, minimum spend, currency or buyer).
    CouponNotApplicable,
    /// The coupon was used or is locked by another checkout.
    CouponAlreadyUsed,
    /// The coupon is outside its validity window.
    CouponExpired,
    /// The coupon template has issued all the coupons it may.
    CouponsExhausted,
    /// No global transaction with this id.
    TransactionNotFound,
    /// A promotion's budget has less left than the discount a checkout reserves.
    PromotionBudgetExhausted,
    /// A promotion was used as often as its usage limit allows.
    PromotionUsageLimitReached,
    /// The buyer used a promotion as often as its per-buyer limit allows.
    PromotionBuyerLimitReached,
    /// A TCC branch of this transaction was cancelled (or its cancel came first): its try or confirm is refused.
    BranchCancelled,
    /// A transaction across executors was not decided by its deadline and
    /// was cancelled: nothing of it was done (retrying is safe).
    TransactionTimedOut,
    /// No checkout with this id.
    CheckoutNotFound,
    /// No order with this id.
    OrderNotFound,
    /// No payment with this id.
    PaymentNotFound,
    /// No refund with this id.
    RefundNotFound,
    /// The object's state does not allow this (a capture of a canceled payment, a refund of an unpaid order).
    InvalidState,
    /// A capture asks more than the payment holds.
    AmountExceedsAuthorized,
    /// Refunds would give back more than was captured (or a line more units than it has).
    RefundExceedsCaptured,
    /// No settlement with this id.
    SettlementNotFound,
    /// No reliable message (dead letter) with this id.
    MessageNotFound,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 54] = [
        ErrorCode::InvalidRequest,
        ErrorCode::AccountNotFound,
        ErrorCode::TransferNotFound,
        ErrorCode::CurrencyMismatch,
        ErrorCode::AccountsMustBeDifferent,
        ErrorCode::ExceedsCredits,
        ErrorCode::ExceedsDebits,
        ErrorCode::ExistsWithDifferentFields,
        ErrorCode::PendingTransferNotFound,
        ErrorCode::PendingTransferNotPending,
        ErrorCode::PendingTransferAlreadyPosted,
        ErrorCode::PendingTransferAlreadyVoided,
        ErrorCode::PendingTransferExpired,
        ErrorCode::AmountExceedsPending,
        ErrorCode::Overflow,
        ErrorCode::LinkedEventFailed,
        ErrorCode::Unavailable,
        ErrorCode::InFlight,
        // Append only: the position is the tag in the log.
        ErrorCode::DuplicateIdInBatch,
        ErrorCode::AccountFrozen,
        ErrorCode::AccountClosed,
        ErrorCode::AccountNotZero,
        ErrorCode::SkuNotFound,
        ErrorCode::OutOfStock,
        ErrorCode::PurchaseLimitExceeded,
        ErrorCode::SaleNotStarted,
        ErrorCode::SaleEnded,
        ErrorCode::SoldOut,
        ErrorCode::FlashSaleNotFound,
        ErrorCode::ReservationNotFound,
        ErrorCode::ReservationExpired,
        ErrorCode::ReservationCancelled,
        ErrorCode::ReservationConfirmed,
        ErrorCode::PromotionNotFound,
        ErrorCode::CouponNotFound,
        ErrorCode::CouponNotApplicable,
        ErrorCode::CouponAlreadyUsed,
        ErrorCode::CouponExpired,
        ErrorCode::CouponsExhausted,
        ErrorCode::TransactionNotFound,
        ErrorCode::PromotionBudgetExhausted,
        ErrorCode::PromotionUsageLimitReached,
        ErrorCode::PromotionBuyerLimitReached,
        ErrorCode::BranchCancelled,
        ErrorCode::TransactionTimedOut,
        ErrorCode::CheckoutNotFound,
        ErrorCode::OrderNotFound,
        ErrorCode::PaymentNotFound,
        ErrorCode::RefundNotFound,
        ErrorCode::InvalidState,
        ErrorCode::AmountExceedsAuthorized,
        ErrorCode::RefundExceedsCaptured,
        ErrorCode::SettlementNotFound,
        ErrorCode::MessageNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::AccountNotFound => "account_not_found",
            ErrorCode::TransferNotFound => "transfer_not_found",
            ErrorCode::CurrencyMismatch => "currency_mismatch",
            ErrorCode::AccountsMustBeDifferent => "accounts_must_be_different",
            ErrorCode::ExceedsCredits => "exceeds_credits",
            ErrorCode::ExceedsDebits => "exceeds_debits",
            ErrorCode::ExistsWithDifferentFields => "exists_with_different_fields",
            ErrorCode::PendingTransferNotFound => "pending_transfer_not_found",
            ErrorCode::PendingTransferNotPending => "pending_transfer_not_pending",
            ErrorCode::PendingTransferAlreadyPosted => "pending_transfer_already_posted",
            ErrorCode::PendingTransferAlreadyVoided => "pending_transfer_already_voided",
            ErrorCode::PendingTransferExpired => "pending_transfer_expired",
            ErrorCode::AmountExceedsPending => "amount_exceeds_pending",
            ErrorCode::Overflow => "overflow",
            ErrorCode::LinkedEventFailed => "linked_event_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InFlight => "transfer_in_flight",
            ErrorCode::DuplicateIdInBatch => "duplicate_id_in_batch",
            ErrorCode::AccountFrozen => "account_frozen",
            ErrorCode::AccountClosed => "account_closed",
            ErrorCode::AccountNotZero => "account_not_zero",
            ErrorCode::SkuNotFound => "sku_not_found",
            ErrorCode::OutOfStock => "out_of_stock",
            ErrorCode::PurchaseLimitExceeded => "purchase_limit_exceeded",
            ErrorCode::SaleNotStarted => "sale_not_started",
            ErrorCode::SaleEnded => "sale_ended",
            ErrorCode::SoldOut => "sold_out",
            ErrorCode::FlashSaleNotFound => "flash_sale_not_found",
            ErrorCode::ReservationNotFound => "reservation_not_found",
            ErrorCode::ReservationExpired => "reservation_expired",
            ErrorCode::ReservationCancelled => "reservation_cancelled",
            ErrorCode::ReservationConfirmed => "reservation_confirmed",
            ErrorCode::PromotionNotFound => "promotion_not_found",
            ErrorCode::CouponNotFound => "coupon_not_found",
            ErrorCode::CouponNotApplicable => "coupon_not_applicable",
            ErrorCode::CouponAlreadyUsed => "coupon_already_used",
            ErrorCode::CouponExpired => "coupon_expired",
            ErrorCode::CouponsExhausted => "coupons_exhausted",
            ErrorCode::TransactionNotFound => "transaction_not_found",
            ErrorCode::PromotionBudgetExhausted => "promotion_budget_exhausted",
            ErrorCode::PromotionUsageLimitReached => "promotion_usage_limit_reached",
            ErrorCode::PromotionBuyerLimitReached => "promotion_buyer_limit_reached",
            ErrorCode::BranchCancelled => "branch_cancelled",
            ErrorCode::TransactionTimedOut => "transaction_timed_out",
            ErrorCode::CheckoutNotFound => "checkout_not_found",
            ErrorCode::OrderNotFound => "order_not_found",
            ErrorCode::PaymentNotFound => "payment_not_found",
            ErrorCode::RefundNotFound => "refund_not_found",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::AmountExceedsAuthorized => "amount_exceeds_authorized",
            ErrorCode::RefundExceedsCaptured => "refund_exceeds_captured",
            ErrorCode::SettlementNotFound => "settlement_not_found",
            ErrorCode::MessageNotFound => "message_not_found",
        }
    }

    /// Stable one-byte tag for the log.
    pub fn tag(self) -> u8 {
        ErrorCode::ALL.iter().position(|c| *c == self).expect("listed") as u8
    }

    pub fn from_tag(tag: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.get(usize::from(tag)).copied()
    }

    /// When two legs of one transfer fail, the answer names the most basic
    /// problem first, so the same request gets the same code wherever its
    /// accounts live.
    pub fn precedence(self) -> u8 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::DuplicateIdInBatch => 0,
            ErrorCode::AccountsMustBeDifferent => 1,
            ErrorCode::ExistsWithDifferentFields => 2,
            ErrorCode::PendingTransferNotFound
            | ErrorCode::PendingTransferNotPending
            | ErrorCode::PendingTransferAlreadyPosted
            | ErrorCode::PendingTransferAlreadyVoided
            | ErrorCode::PendingTransferExpired
            | ErrorCode::AmountExceedsPending => 3,
            ErrorCode::AccountNotFound | ErrorCode::TransferNotFound => 4,
            ErrorCode::CurrencyMismatch => 5,
            // Before the constraints: the same answer whatever the amount.
            ErrorCode::AccountClosed | ErrorCode::AccountNotZero => 6,
            ErrorCode::AccountFrozen => 7,
            ErrorCode::ExceedsCredits | ErrorCode::ExceedsDebits => 8,
            ErrorCode::Overflow => 9,
            ErrorCode::InFlight => 10,
            ErrorCode::Unavailable | ErrorCode::TransactionTimedOut => 10,
            ErrorCode::LinkedEventFailed => 11,
            // The trade parts answer one check at a time.
            ErrorCode::SkuNotFound
            | ErrorCode::OutOfStock
            | ErrorCode::PurchaseLimitExceeded
            | ErrorCode::SaleNotStarted
            | ErrorCode::SaleEnded
            | ErrorCode::SoldOut
            | ErrorCode::FlashSaleNotFound
            | ErrorCode::ReservationNotFound
            | ErrorCode::ReservationExpired
            | ErrorCode::ReservationCancelled
            | ErrorCode::ReservationConfirmed
            | ErrorCode::PromotionNotFound
            | ErrorCode::CouponNotFound
            | ErrorCode::CouponNotApplicable
            | ErrorCode::CouponAlreadyUsed
            | ErrorCode::CouponExpired
            | ErrorCode::CouponsExhausted
            | ErrorCode::TransactionNotFound
            | ErrorCode::PromotionBudgetExhausted
            | ErrorCode::PromotionUsageLimitReached
            | ErrorCode::PromotionBuyerLimitReached
            | ErrorCode::BranchCancelled
            | ErrorCode::CheckoutNotFound
            | ErrorCode::OrderNotFound
            | ErrorCode::PaymentNotFound
            | ErrorCode::RefundNotFound
            | ErrorCode::InvalidState
            | ErrorCode::AmountExceedsAuthorized
            | ErrorCode::RefundExceedsCaptured
            | ErrorCode::SettlementNotFound
            | ErrorCode::MessageNotFound => 12,
        }
    }

    /// The more basic of two errors (see [`ErrorCode::precedence`]).
    pub fn first_of(self, other: ErrorCode) -> ErrorCode {
        if other.precedence() < self.precedence() {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ErrorCode {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_tag(code.tag()), Some(code));
            assert!(seen.insert(code.as_str()));
        }
        assert_eq!(ErrorCode::from_tag(200), None);
    }
}
