//! peakstack's pricing: promotions, coupons and quotes.
//!
//! Two pure parts:
//! - [`quote`], the single pricing function: a cart, a [`PriceBook`] (an
//!   immutable snapshot of prices, promotions and coupon templates), a
//!   snapshot of the promotion counters ([`UsageView`]) and the buyer's
//!   coupons in, the full breakdown out (per line, per merchant, applied
//!   discounts, skipped promotions and why). A quote and the order placed
//!   after it are priced by it, so they agree to the minor unit.
//! - [`Pricing`], the single writer of the counters: promotion budgets and
//!   uses, coupon issuing, and the TCC branches that reserve and confirm
//!   them, with its log encoding ([`encode_command`]) and checkpoint section.
//!
//! Invariants of this crate:
//! - No I/O, no clock (time comes in as `now_ms`), no randomness, no
//!   floats: money is `u64` minor units with checked arithmetic, overflow
//!   is `ErrorCode::Overflow`. Maps are iterated only in key order (or
//!   sorted first), so the same inputs give the same quote and the same state.
//! - A quote's order-level discounts are shared over their lines by the
//!   largest-remainder method: the shares add up to each discount exactly;
//!   no line is discounted below zero; lines add up to merchants add up to
//!   the cart ([`Quote::check`]).
//! - A promotion never gives more than is left of its budget; given plus
//!   reserved never exceeds the budget, uses never exceed the usage limit
//!   nor a buyer's uses the per-buyer limit, a template never issues more
//!   than its total, a coupon is used at most once. These are asserted in
//!   the code after every command: a violation is a bug and panics.
//! - A refused command changes nothing; a repeated TCC command is answered
//!   as the first one was; nothing held outlives its deadline once
//!   [`Pricing::due`]'s cancels are applied.
//! - Decoding trusts no byte: bad input is a [`DecodeError`], never a panic.

mod allocation;
pub mod bench_fixture;
mod book;
mod catalogue;
mod checkpoint;
mod codec;
mod quote;
mod quote_types;
mod state;
mod tcc;

#[cfg(test)]
mod quote_tests;
#[cfg(test)]
mod state_tests;

pub use allocation::allocate;
pub use book::{PriceBook, MAX_BOOK_ENTRIES};
pub use catalogue::{
    Coupon, CouponDiscount, CouponState, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec,
    Scope, SkuPrice, MAX_GROUP_LEN, MAX_LINE_QUANTITY, MAX_SCOPE_SKUS,
};
pub use checkpoint::CHECKPOINT_FORMAT_VERSION;
pub use codec::{decode_command, encode_command, DecodeError, COMMAND_FORMAT_VERSION};
pub use quote::{quote, MAX_QUOTE_COUPONS, MAX_QUOTE_LINES};
pub use quote_types::{
    AppliedDiscount, CartLine, DiscountSource, LineDiscount, MerchantTotal, NoUsage, PromotionUsage, Quote, QuoteLine,
    QuoteRequest, SkipReason, SkippedPromotion, UsageView,
};
pub use state::{
    BranchState, Command, ConsumeFence, Pricing, PromotionCounters, Reply, FENCE_RETENTION_MS, MAX_COUPONS_PER_BUYER,
    MAX_COUPON_TEMPLATES, MAX_DUE_COMMANDS, MAX_HOLD_MS, MAX_PROMOTIONS,
};
