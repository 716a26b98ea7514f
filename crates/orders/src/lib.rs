//! The orders part: checkouts, their orders (one per merchant), the payment
//! of each checkout (one part per order) and refunds, as a pure state
//! machine that one executor owns for its shards.
//!
//! A checkout is placed as a branch of its global transaction (TCC):
//! `TryPlace` records it pending, `ConfirmPlace` completes it (authorized
//! under manual capture, paid under automatic), `CancelPlace` fails it (or,
//! before its try, leaves a suspended fence that refuses the late try).
//! Captures, cancels, expiries and refunds then move the money through
//! [`LedgerEffect`]s: [`Orders::plan`] says which (changing nothing), the
//! executor books them in the same atomic step, and [`Orders::apply`]
//! records the change. Both start from one decision, so they agree.
//!
//! A settlement is another branch (`settlement.rs`): `TrySettle` locks the
//! captured parts it settles, `ConfirmSettle` marks them Settled (the money
//! moves by its global transaction's own transfers), `CancelSettle` lets
//! them go. A settled part refuses refunds (`invalid_state`).
//!
//! Invariants, asserted after every change (a violation panics: it is a bug,
//! and the shard stops rather than move money it should not):
//! - per order: `amount_refunded <= amount_captured <= amount_authorized`;
//! - per line: refunded units never exceed its quantity;
//! - per order: its refunds' amounts add up to `amount_refunded`;
//! - a terminal payment state (canceled, expired, failed, settled) never
//!   changes, and captured changes only by refunds;
//! - a refused command changes nothing.
//!
//! No I/O, no clock (time comes in as `now_ms`), no randomness, no floats;
//! every sum is checked (an overflow is `ErrorCode::Overflow`). Ids the
//! caller assigns ([`peakstack_domain::AssignedKind`]) take their sequence
//! from [`Orders::take_sequence`], and applying a command raises it above
//! the ids it carries, so a replay of the log assigns the same next ids.

mod codec;
mod decide;
mod model;
mod settlement;
#[cfg(test)]
mod settlement_tests;
mod state;
#[cfg(test)]
mod state_tests;

pub use codec::{decode_command, encode_command, CHECKPOINT_FORMAT};
pub use decide::{capture_transfer_id, order_transfer_id, refund_transfer_id, void_transfer_id};
pub use model::{
    CaptureMode, Checkout, CheckoutState, LedgerEffect, NewCheckout, NewOrder, Order, OrderLine, OrderState,
    PaymentState, Refund, RefundRequest, Release, DEFAULT_AUTHORIZATION_MS, MAX_ORDERS, MAX_ORDER_ID_LEN,
    MAX_ORDER_LINES,
};
pub use settlement::{
    fee_of, NewSettlement, Settlement, SettlementLine, SettlementState, MAX_FEE_BPS, MAX_SETTLEMENT_LINES,
    MAX_SETTLEMENT_PAGE,
};
pub use state::{Command, Orders, PaymentPartView, PaymentView, FENCE_RETENTION_MS, MAX_DUE_PER_TICK};
