//! What the orders part keeps: checkouts, their orders (one per merchant),
//! the payment (one per checkout, one part per order) and refunds.

use peakstack_domain::{Currency, ErrorCode, Id};

/// Default authorization window of a manual-capture payment (ms): 7 days.
pub const DEFAULT_AUTHORIZATION_MS: u64 = 7 * 24 * 3_600_000;
/// Most orders (merchants) in one checkout.
pub const MAX_ORDERS: usize = 16;
/// Most lines in one order.
pub const MAX_ORDER_LINES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// Paid at once: the checkout's transfers are posted when it commits.
    Automatic,
    /// Authorized (funds held) until a capture, a cancel or the window's end.
    Manual,
}

/// A line as it was priced: what refunding it gives back is `total`
/// (its share of every discount already taken off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderLine {
    /// 1-based, in cart order within its order.
    pub line_id: u32,
    pub sku_id: Id,
    pub quantity: u32,
    pub unit_price: u64,
    /// `unit_price * quantity`.
    pub subtotal: u64,
    /// Discounts taken off this line, each with who gave it (a promotion or coupon id).
    pub discounts: Vec<(Id, u64)>,
    /// `subtotal - sum(discounts)`.
    pub total: u64,
}

/// One merchant's order of a checkout, as placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    pub id: Id,
    pub merchant_id: Id,
    pub lines: Vec<OrderLine>,
    /// The sum of the lines' totals: what this order's payment part authorizes.
    pub total: u64,
    /// The ledger transfer that moves (or holds) this order's money from the
    /// buyer's account to `settle_account_id`: pending under manual capture,
    /// posted under automatic capture.
    pub transfer_id: Id,
    /// The merchant's pending-settlement account on the checkout's shard.
    pub settle_account_id: Id,
}

/// A checkout as its global transaction places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCheckout {
    pub id: Id,
    pub buyer_id: Id,
    /// The buyer's paying account (a wallet or a credit line), on this shard.
    pub account_id: Id,
    pub currency: Currency,
    pub capture: CaptureMode,
    pub payment_id: Id,
    pub coupon_ids: Vec<Id>,
    pub orders: Vec<NewOrder>,
    pub created_ms: u64,
    /// When an uncaptured authorization expires (manual capture).
    pub authorization_expires_ms: u64,
    /// The limited promotions whose counters the checkout consumed (their
    /// discounts are in the lines): a cancelled order gives its share back.
    pub consumed_promotions: Vec<Id>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckoutState {
    /// Tried by its global transaction, not yet confirmed.
    Pending,
    Completed,
    /// Its global transaction was cancelled: nothing of it was done.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderState {
    Pending,
    /// Funds held, waiting for a capture.
    Authorized,
    Paid,
    Canceled,
    /// Everything captured was refunded.
    Refunded,
    /// Its checkout failed.
    Failed,
}

/// A payment part's state (one per order). `Canceled`, `Expired`,
/// `Failed` and `Settled` never change; `Captured` changes only by refunds
/// (its amounts), never back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentState {
    Pending,
    RequiresCapture,
    Captured,
    Settled,
    Canceled,
    Expired,
    Failed,
}

impl PaymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Pending => "pending",
            PaymentState::RequiresCapture => "requires_capture",
            PaymentState::Captured => "captured",
            PaymentState::Settled => "settled",
            PaymentState::Canceled => "canceled",
            PaymentState::Expired => "expired",
            PaymentState::Failed => "failed",
        }
    }
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Pending => "pending",
            OrderState::Authorized => "authorized",
            OrderState::Paid => "paid",
            OrderState::Canceled => "canceled",
            OrderState::Refunded => "refunded",
            OrderState::Failed => "failed",
        }
    }
}

impl CheckoutState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutState::Pending => "pending",
            CheckoutState::Completed => "completed",
            CheckoutState::Failed => "failed",
        }
    }
}

/// An order as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub checkout_id: Id,
    pub buyer_id: Id,
    /// Its checkout's currency.
    pub currency: Currency,
    pub order: NewOrder,
    pub state: OrderState,
    /// This order's part of the payment.
    pub amount_authorized: u64,
    pub amount_captured: u64,
    pub amount_refunded: u64,
    pub payment_state: PaymentState,
    /// Units refunded so far, per line (same order as `order.lines`).
    pub refunded_units: Vec<u32>,
    /// The refunds of this order, oldest first.
    pub refunds: Vec<Id>,
    pub updated_ms: u64,
}

/// A checkout as it stands (its orders are kept by id beside it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    /// The global transaction that placed it: a repeated try of the same
    /// transaction is answered from the record, another one is refused.
    pub txn: u64,
    pub checkout: NewCheckout,
    pub state: CheckoutState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefundRequest {
    /// An amount of the order's captured money.
    Amount(u64),
    /// Units of lines: each gives back exactly its paid share.
    Lines(Vec<(u32, u32)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    pub id: Id,
    pub order_id: Id,
    pub amount: u64,
    /// (line_id, units) when the refund was of lines.
    pub lines: Vec<(u32, u32)>,
    /// The ledger transfer that gave the money back.
    pub transfer_id: Id,
    pub created_ms: u64,
}

/// What a cancelled or expired order gives back to the other parts, as a
/// reliable message (they may live on other shards): its stock, its share
/// of each consumed promotion's budget, and, with the checkout's last open
/// order, the promotions' uses and the coupons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    Stock { sku_id: Id, buyer_id: Id, quantity: u32 },
    Budget { promotion_id: Id, buyer_id: Id, discount: u64, uses: u64 },
    Coupon { txn: u64, coupon_id: Id },
}

/// A movement of money that a command needs the ledger to make, in the
/// same atomic step as the command's change of state. The orders part says
/// what; the executor books it (all on the checkout's shard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerEffect {
    /// Post a pending transfer (`amount` of it; the rest is released).
    Post { id: Id, pending_id: Id, amount: u64 },
    /// Release a pending transfer.
    Void { id: Id, pending_id: Id },
    /// A new posted transfer.
    Move { id: Id, debit_account_id: Id, credit_account_id: Id, amount: u64, currency: Currency },
}

/// Longest order id: its derived transfer ids (`_pay.`, `_cap.`, `_void.`
/// + the id) must stay within [`peakstack_domain::MAX_ID_LEN`].
pub const MAX_ORDER_ID_LEN: usize = peakstack_domain::MAX_ID_LEN - "_void.".len();

impl NewCheckout {
    /// Checks the checkout's shape and its sums (every one checked: an
    /// overflow is [`ErrorCode::Overflow`], a total that does not add up is
    /// [`ErrorCode::InvalidRequest`]). Returns the checkout's total.
    pub fn validate(&self) -> Result<u64, ErrorCode> {
        if self.orders.is_empty() || self.orders.len() > MAX_ORDERS {
            return Err(ErrorCode::InvalidRequest);
        }
        let mut total = 0u64;
        for (index, order) in self.orders.iter().enumerate() {
            let duplicate = self.orders[..index].iter().any(|o| o.id == order.id);
            if duplicate || order.id.as_str().len() > MAX_ORDER_ID_LEN {
                return Err(ErrorCode::InvalidRequest);
            }
            order.validate()?;
            total = total.checked_add(order.total).ok_or(ErrorCode::Overflow)?;
        }
        Ok(total)
    }
}

impl NewOrder {
    fn validate(&self) -> Result<(), ErrorCode> {
        if self.lines.is_empty() || self.lines.len() > MAX_ORDER_LINES {
            return Err(ErrorCode::InvalidRequest);
        }
        let mut total = 0u64;
        for (index, line) in self.lines.iter().enumerate() {
            let duplicate = self.lines[..index].iter().any(|l| l.line_id == line.line_id);
            if duplicate || line.line_id == 0 || line.quantity == 0 {
                return Err(ErrorCode::InvalidRequest);
            }
            line.validate()?;
            total = total.checked_add(line.total).ok_or(ErrorCode::Overflow)?;
        }
        if total != self.total {
            return Err(ErrorCode::InvalidRequest);
        }
        Ok(())
    }

    /// The index of a line in `lines`.
    pub fn line_index(&self, line_id: u32) -> Option<usize> {
        self.lines.iter().position(|l| l.line_id == line_id)
    }
}

impl OrderLine {
    fn validate(&self) -> Result<(), ErrorCode> {
        let subtotal = self.unit_price.checked_mul(u64::from(self.quantity)).ok_or(ErrorCode::Overflow)?;
        let discounted =
            self.discounts.iter().try_fold(0u64, |sum, (_, d)| sum.checked_add(*d)).ok_or(ErrorCode::Overflow)?;
        // A line's total is never negative: discounts beyond it are a bug upstream.
        let total = subtotal.checked_sub(discounted).ok_or(ErrorCode::InvalidRequest)?;
        if subtotal != self.subtotal || total != self.total {
            return Err(ErrorCode::InvalidRequest);
        }
        Ok(())
    }

    /// What refunding `units` more of this line gives back when `refunded`
    /// units were refunded before: the difference of the floors of the
    /// proportional shares, so any steps that refund every unit add up to
    /// exactly `total`.
    pub fn refund_amount(&self, refunded: u32, units: u32) -> u64 {
        let quantity = u128::from(self.quantity);
        let after = u128::from(refunded) + u128::from(units);
        assert!(after <= quantity, "refunding {after} of {quantity} units");
        let share = |units: u128| u128::from(self.total) * units / quantity;
        u64::try_from(share(after) - share(u128::from(refunded))).expect("a share of a u64 total fits in u64")
    }
}

impl PaymentState {
    /// A state that never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PaymentState::Canceled | PaymentState::Expired | PaymentState::Failed | PaymentState::Settled)
    }

    /// Whether a part may go from `self` to `next` (the same state is no move).
    pub fn may_become(self, next: PaymentState) -> bool {
        use PaymentState::*;
        matches!(
            (self, next),
            (Pending, RequiresCapture | Captured | Failed)
                | (RequiresCapture, Captured | Canceled | Expired)
                | (Captured, Settled)
        )
    }
}

impl Order {
    /// The first of its invariants it breaks, if any. `refunded` is the sum
    /// of its refunds' amounts.
    pub fn problem(&self, refunded: u64) -> Option<&'static str> {
        if self.amount_refunded > self.amount_captured || self.amount_captured > self.amount_authorized {
            return Some("not refunded <= captured <= authorized");
        }
        if self.amount_authorized > self.order.total {
            return Some("authorized beyond its total");
        }
        if self.refunded_units.len() != self.order.lines.len() {
            return Some("refunded units not one per line");
        }
        if self.refunded_units.iter().zip(&self.order.lines).any(|(units, line)| *units > line.quantity) {
            return Some("a line refunded beyond its quantity");
        }
        if refunded != self.amount_refunded {
            return Some("its refunds do not add up to amount_refunded");
        }
        None
    }
}
