//! Deciding a command without changing anything: whether it is refused,
//! what it would change (a [`Decision`]) and the ledger effects that go with
//! it. `plan` and `apply` both start here, so they cannot disagree.

use peakstack_domain::{ErrorCode, Id};

use crate::model::{CheckoutState, LedgerEffect, OrderState, PaymentState, RefundRequest, Release};
use crate::state::{Command, Orders, MAX_DUE_PER_TICK};

/// What a command that was not refused does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// An idempotent repeat, or nothing due: no change, no effects.
    Unchanged,
    /// Record the checkout Pending.
    Place,
    /// The checkout's transaction committed.
    Confirm,
    /// The checkout's transaction was cancelled after its try.
    Fail,
    /// Cancelled before its try: a suspended fence.
    Suspend,
    /// Each part (order id) captures its share (a share of 0 voids it).
    Capture { shares: Vec<(Id, u64)> },
    /// The parts (order ids) are voided and end in `to` (Canceled or Expired).
    Void { parts: Vec<Id>, to: PaymentState },
    /// A new refund of `amount`, with the units of each line (by index).
    Refund { amount: u64, line_units: Vec<(usize, u32)> },
    /// Suspended fences to forget.
    Forget { fences: Vec<(u64, Id)> },
    /// Record a tried settlement (its orders locked).
    PlaceSettlement,
    /// Its transaction committed: the parts become Settled.
    ConfirmSettlement,
    /// Its transaction was cancelled after its try.
    CancelSettlement,
}

/// The ledger transfer id of a refund: `_` + refund id (reserved ids start
/// with `_`: clients cannot make them). Panics for a refund id of the full
/// 64 characters ([`Command::Refund`] refuses those).
pub fn refund_transfer_id(refund_id: &Id) -> Id {
    reserved_id("_", refund_id).expect("a refund id leaves room for its transfer id")
}

/// The post of an order's capture: `_cap.<order_id>`.
pub fn capture_transfer_id(order_id: &Id) -> Id {
    reserved_id("_cap.", order_id).expect("an order id leaves room for its transfer ids")
}

/// The void of an order's authorization: `_void.<order_id>`.
pub fn void_transfer_id(order_id: &Id) -> Id {
    reserved_id("_void.", order_id).expect("an order id leaves room for its transfer ids")
}

/// An order's money (pending or posted at checkout): `_pay.<order_id>`.
pub fn order_transfer_id(order_id: &Id) -> Id {
    reserved_id("_pay.", order_id).expect("an order id leaves room for its transfer ids")
}

fn reserved_id(prefix: &str, id: &Id) -> Option<Id> {
    Id::parse(&format!("{prefix}{}", id.as_str()))
}

/// Shares of `amount` in proportion to `weights` by the largest-remainder
/// method (ties to the earlier weight): they add up to `amount` exactly and
/// none exceeds its weight. `amount` is at most the sum of the weights.
pub(crate) fn allocate(amount: u64, weights: &[u64]) -> Vec<u64> {
    let weight_sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    assert!(u128::from(amount) <= weight_sum, "allocating {amount} over weights summing to {weight_sum}");
    if amount == 0 {
        return vec![0; weights.len()];
    }
    let mut shares = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (index, weight) in weights.iter().enumerate() {
        let product = u128::from(*weight) * u128::from(amount);
        shares.push(u64::try_from(product / weight_sum).expect("a share is at most its weight"));
        remainders.push((product % weight_sum, index));
    }
    let given: u64 = shares.iter().sum();
    // The fractions left sum to exactly `left`, each below one: fewer units
    // are left than weights with a remainder.
    let left = usize::try_from(amount - given).expect("fewer units left than weights");
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, index) in remainders.iter().take(left) {
        shares[*index] += 1;
    }
    assert_eq!(shares.iter().sum::<u64>(), amount, "shares add up to the whole");
    assert!(shares.iter().zip(weights).all(|(s, w)| s <= w), "no share exceeds its weight");
    shares
}

impl Orders {
    /// Whether `command` is refused at `now_ms`, and if not what it does.
    pub(crate) fn decide(&self, command: &Command, now_ms: u64) -> Result<Decision, ErrorCode> {
        match command {
            Command::TryPlace { txn, checkout } => self.decide_try(*txn, checkout),
            Command::ConfirmPlace { txn, checkout_id } => self.decide_confirm(*txn, checkout_id),
            Command::CancelPlace { txn, checkout_id } => self.decide_cancel_place(*txn, checkout_id),
            Command::Capture { payment_id, amount } => self.decide_capture(payment_id, *amount),
            Command::CancelPayment { payment_id } => self.decide_cancel_payment(payment_id),
            Command::CancelOrder { order_id } => self.decide_cancel_order(order_id),
            Command::Refund { refund_id, order_id, request } => self.decide_refund(refund_id, order_id, request),
            Command::Expire { payments } => Ok(self.decide_expire(payments, now_ms)),
            Command::ForgetFences { fences } => Ok(self.decide_forget(fences, now_ms)),
            Command::TrySettle { txn, settlement } => self.decide_try_settle(*txn, settlement),
            Command::ConfirmSettle { txn, settlement_id } => self.decide_confirm_settle(*txn, settlement_id),
            Command::CancelSettle { txn, settlement_id } => self.decide_cancel_settle(*txn, settlement_id),
        }
    }

    /// What `command` gives back to the other parts when it ends orders
    /// unpaid (a cancel, an expiry, a capture that takes nothing of a
    /// part): each such order's stock and its share of every consumed
    /// promotion's budget; when no order of its checkout stays open, the
    /// promotions' uses and the coupons too. Empty for a refused command.
    /// Asked before the command is applied (it reads the state it changes).
    pub fn releases(&self, command: &Command, now_ms: u64) -> Vec<Release> {
        let ended: Vec<Id> = match self.decide(command, now_ms) {
            Ok(Decision::Void { parts, .. }) => parts,
            Ok(Decision::Capture { shares }) => shares.into_iter().filter(|(_, s)| *s == 0).map(|(o, _)| o).collect(),
            _ => return Vec::new(),
        };
        let mut out = Vec::new();
        let mut checkouts: Vec<&Id> = Vec::new();
        for order_id in &ended {
            let order = &self.orders[order_id];
            let checkout = &self.checkouts[&order.checkout_id].checkout;
            for line in &order.order.lines {
                out.push(Release::Stock {
                    sku_id: line.sku_id.clone(),
                    buyer_id: order.buyer_id.clone(),
                    quantity: line.quantity,
                });
            }
            for promotion_id in &checkout.consumed_promotions {
                let discount: u64 = order
                    .order
                    .lines
                    .iter()
                    .flat_map(|l| l.discounts.iter())
                    .filter(|(source, _)| source == promotion_id)
                    .map(|(_, amount)| *amount)
                    .sum();
                if discount > 0 {
                    out.push(Release::Budget {
                        promotion_id: promotion_id.clone(),
                        buyer_id: order.buyer_id.clone(),
                        discount,
                        uses: 0,
                    });
                }
            }
            if !checkouts.contains(&&order.checkout_id) {
                checkouts.push(&order.checkout_id);
            }
        }
        for checkout_id in checkouts {
            let checkout = &self.checkouts[checkout_id];
            let still_open = checkout.checkout.orders.iter().any(|o| {
                !ended.contains(&o.id) && !matches!(self.orders[&o.id].state, OrderState::Canceled | OrderState::Failed)
            });
            if still_open {
                continue;
            }
            for promotion_id in &checkout.checkout.consumed_promotions {
                out.push(Release::Budget {
                    promotion_id: promotion_id.clone(),
                    buyer_id: checkout.checkout.buyer_id.clone(),
                    discount: 0,
                    uses: 1,
                });
            }
            for coupon_id in &checkout.checkout.coupon_ids {
                out.push(Release::Coupon { txn: checkout.txn, coupon_id: coupon_id.clone() });
            }
        }
        out
    }

    /// The ledger effects of a decision, in the order the executor books them.
    pub(crate) fn effects(&self, command: &Command, decision: &Decision) -> Vec<LedgerEffect> {
        match decision {
            Decision::Capture { shares } => shares
                .iter()
                .map(|(order_id, share)| {
                    let pending_id = self.orders[order_id].order.transfer_id.clone();
                    match share {
                        0 => LedgerEffect::Void { id: void_transfer_id(order_id), pending_id },
                        _ => LedgerEffect::Post { id: capture_transfer_id(order_id), pending_id, amount: *share },
                    }
                })
                .collect(),
            Decision::Void { parts, .. } => parts
                .iter()
                .map(|order_id| LedgerEffect::Void {
                    id: void_transfer_id(order_id),
                    pending_id: self.orders[order_id].order.transfer_id.clone(),
                })
                .collect(),
            // A refund of units that cost nothing moves no money.
            Decision::Refund { amount: 0, .. } => Vec::new(),
            Decision::Refund { amount, .. } => {
                let Command::Refund { refund_id, order_id, .. } = command else { unreachable!("a refund's decision") };
                let order = &self.orders[order_id];
                let checkout = &self.checkouts[&order.checkout_id].checkout;
                vec![LedgerEffect::Move {
                    id: refund_transfer_id(refund_id),
                    debit_account_id: order.order.settle_account_id.clone(),
                    credit_account_id: checkout.account_id.clone(),
                    amount: *amount,
                    currency: checkout.currency,
                }]
            }
            Decision::Unchanged
            | Decision::Place
            | Decision::Confirm
            | Decision::Fail
            | Decision::Suspend
            | Decision::Forget { .. }
            // A settlement's movements are its transaction's own transfers.
            | Decision::PlaceSettlement
            | Decision::ConfirmSettlement
            | Decision::CancelSettlement => Vec::new(),
        }
    }

    fn decide_try(&self, txn: u64, new: &crate::model::NewCheckout) -> Result<Decision, ErrorCode> {
        if self.fences.contains_key(&(txn, new.id.clone())) {
            return Err(ErrorCode::BranchCancelled);
        }
        if let Some(existing) = self.checkouts.get(&new.id) {
            if existing.txn != txn || existing.checkout != *new {
                return Err(ErrorCode::ExistsWithDifferentFields);
            }
            return match existing.state {
                CheckoutState::Failed => Err(ErrorCode::BranchCancelled),
                CheckoutState::Pending | CheckoutState::Completed => Ok(Decision::Unchanged),
            };
        }
        new.validate()?;
        let taken = self.payments.contains_key(&new.payment_id)
            || new.orders.iter().any(|order| self.orders.contains_key(&order.id));
        if taken {
            return Err(ErrorCode::ExistsWithDifferentFields);
        }
        Ok(Decision::Place)
    }

    fn decide_confirm(&self, txn: u64, checkout_id: &Id) -> Result<Decision, ErrorCode> {
        match self.checkouts.get(checkout_id) {
            Some(checkout) if checkout.txn == txn => match checkout.state {
                CheckoutState::Pending => Ok(Decision::Confirm),
                CheckoutState::Completed => Ok(Decision::Unchanged),
                CheckoutState::Failed => Err(ErrorCode::BranchCancelled),
            },
            _ if self.fences.contains_key(&(txn, checkout_id.clone())) => Err(ErrorCode::BranchCancelled),
            _ => Err(ErrorCode::TransactionNotFound),
        }
    }

    fn decide_cancel_place(&self, txn: u64, checkout_id: &Id) -> Result<Decision, ErrorCode> {
        match self.checkouts.get(checkout_id) {
            Some(checkout) if checkout.txn == txn => match checkout.state {
                CheckoutState::Pending => Ok(Decision::Fail),
                CheckoutState::Failed => Ok(Decision::Unchanged),
                CheckoutState::Completed => Err(ErrorCode::InvalidState),
            },
            // Another transaction's checkout: this transaction's try was
            // (or will be) refused by it, for ever; nothing to undo or fence.
            Some(_) => Ok(Decision::Unchanged),
            None if self.fences.contains_key(&(txn, checkout_id.clone())) => Ok(Decision::Unchanged),
            None => Ok(Decision::Suspend),
        }
    }

    /// The order ids of a payment's parts in a state.
    fn parts_in(&self, payment_id: &Id, state: PaymentState) -> Vec<Id> {
        let checkout = &self.checkouts[&self.payments[payment_id]].checkout;
        checkout.orders.iter().filter(|o| self.orders[&o.id].payment_state == state).map(|o| o.id.clone()).collect()
    }

    fn decide_capture(&self, payment_id: &Id, amount: Option<u64>) -> Result<Decision, ErrorCode> {
        let state = self.payment_state(payment_id).ok_or(ErrorCode::PaymentNotFound)?;
        if amount == Some(0) {
            return Err(ErrorCode::InvalidRequest);
        }
        match state {
            // Capture twice captures once.
            PaymentState::Captured | PaymentState::Settled => return Ok(Decision::Unchanged),
            PaymentState::RequiresCapture => {}
            PaymentState::Pending | PaymentState::Canceled | PaymentState::Expired | PaymentState::Failed => {
                return Err(ErrorCode::InvalidState)
            }
        }
        let parts = self.parts_in(payment_id, PaymentState::RequiresCapture);
        let weights: Vec<u64> = parts.iter().map(|id| self.orders[id].amount_authorized).collect();
        let authorized = weights.iter().try_fold(0u64, |sum, w| sum.checked_add(*w)).ok_or(ErrorCode::Overflow)?;
        let amount = amount.unwrap_or(authorized);
        if amount > authorized {
            return Err(ErrorCode::AmountExceedsAuthorized);
        }
        let shares = allocate(amount, &weights);
        Ok(Decision::Capture { shares: parts.into_iter().zip(shares).collect() })
    }

    fn decide_cancel_payment(&self, payment_id: &Id) -> Result<Decision, ErrorCode> {
        match self.payment_state(payment_id).ok_or(ErrorCode::PaymentNotFound)? {
            PaymentState::RequiresCapture => Ok(Decision::Void {
                parts: self.parts_in(payment_id, PaymentState::RequiresCapture),
                to: PaymentState::Canceled,
            }),
            PaymentState::Canceled => Ok(Decision::Unchanged),
            PaymentState::Pending
            | PaymentState::Captured
            | PaymentState::Settled
            | PaymentState::Expired
            | PaymentState::Failed => Err(ErrorCode::InvalidState),
        }
    }

    fn decide_cancel_order(&self, order_id: &Id) -> Result<Decision, ErrorCode> {
        let order = self.orders.get(order_id).ok_or(ErrorCode::OrderNotFound)?;
        match order.state {
            OrderState::Authorized => {
                assert_eq!(order.payment_state, PaymentState::RequiresCapture, "an authorized order's part");
                Ok(Decision::Void { parts: vec![order_id.clone()], to: PaymentState::Canceled })
            }
            OrderState::Canceled => Ok(Decision::Unchanged),
            OrderState::Pending | OrderState::Paid | OrderState::Refunded | OrderState::Failed => {
                Err(ErrorCode::InvalidState)
            }
        }
    }

    fn decide_refund(&self, refund_id: &Id, order_id: &Id, request: &RefundRequest) -> Result<Decision, ErrorCode> {
        if let Some(existing) = self.refunds.get(refund_id) {
            let same_request = match request {
                RefundRequest::Amount(amount) => existing.lines.is_empty() && existing.amount == *amount,
                RefundRequest::Lines(lines) => existing.lines == *lines,
            };
            return match existing.order_id == *order_id && same_request {
                true => Ok(Decision::Unchanged),
                false => Err(ErrorCode::ExistsWithDifferentFields),
            };
        }
        let order = self.orders.get(order_id).ok_or(ErrorCode::OrderNotFound)?;
        if reserved_id("_", refund_id).is_none() {
            return Err(ErrorCode::InvalidRequest);
        }
        // A settled part's money left the settle account a refund books
        // from (and one being settled is locked): refused, see `settlement.rs`.
        let paid = order.state == OrderState::Paid && order.payment_state == PaymentState::Captured;
        if !paid || self.settlements.of_order.contains_key(order_id) {
            return Err(ErrorCode::InvalidState);
        }
        let left = order.amount_captured - order.amount_refunded;
        match request {
            RefundRequest::Amount(0) => Err(ErrorCode::InvalidRequest),
            RefundRequest::Amount(amount) if *amount > left => Err(ErrorCode::RefundExceedsCaptured),
            RefundRequest::Amount(amount) => Ok(Decision::Refund { amount: *amount, line_units: Vec::new() }),
            RefundRequest::Lines(lines) => {
                let line_units = self.refund_lines(order_id, lines)?;
                let mut amount = 0u64;
                for (index, units) in &line_units {
                    let line = &order.order.lines[*index];
                    let share = line.refund_amount(order.refunded_units[*index], *units);
                    amount = amount.checked_add(share).ok_or(ErrorCode::Overflow)?;
                }
                // A partial capture may have taken less than the lines' totals.
                if amount > left {
                    return Err(ErrorCode::RefundExceedsCaptured);
                }
                Ok(Decision::Refund { amount, line_units })
            }
        }
    }

    /// The (line index, units) of a refund of lines, checked against the order.
    fn refund_lines(&self, order_id: &Id, lines: &[(u32, u32)]) -> Result<Vec<(usize, u32)>, ErrorCode> {
        let order = &self.orders[order_id];
        if lines.is_empty() {
            return Err(ErrorCode::InvalidRequest);
        }
        let mut line_units = Vec::with_capacity(lines.len());
        for (position, (line_id, units)) in lines.iter().enumerate() {
            let index = order.order.line_index(*line_id).ok_or(ErrorCode::InvalidRequest)?;
            let twice = lines[..position].iter().any(|(earlier, _)| earlier == line_id);
            if *units == 0 || twice {
                return Err(ErrorCode::InvalidRequest);
            }
            line_units.push((index, *units));
        }
        for (index, units) in &line_units {
            let refunded = u64::from(order.refunded_units[*index]) + u64::from(*units);
            if refunded > u64::from(order.order.lines[*index].quantity) {
                return Err(ErrorCode::RefundExceedsCaptured);
            }
        }
        Ok(line_units)
    }

    fn decide_expire(&self, payments: &[Id], now_ms: u64) -> Decision {
        let mut parts: Vec<Id> = Vec::new();
        for payment_id in payments.iter().take(MAX_DUE_PER_TICK) {
            let Some(checkout_id) = self.payments.get(payment_id) else { continue };
            if self.checkouts[checkout_id].checkout.authorization_expires_ms > now_ms {
                continue;
            }
            for order_id in self.parts_in(payment_id, PaymentState::RequiresCapture) {
                if !parts.contains(&order_id) {
                    parts.push(order_id);
                }
            }
        }
        match parts.is_empty() {
            true => Decision::Unchanged,
            false => Decision::Void { parts, to: PaymentState::Expired },
        }
    }

    fn decide_forget(&self, fences: &[(u64, Id)], now_ms: u64) -> Decision {
        let mut due: Vec<(u64, Id)> = Vec::new();
        for fence in fences.iter().take(MAX_DUE_PER_TICK) {
            let past = self.fences.get(fence).is_some_and(|forget_at_ms| *forget_at_ms <= now_ms);
            if past && !due.contains(fence) {
                due.push(fence.clone());
            }
        }
        match due.is_empty() {
            true => Decision::Unchanged,
            false => Decision::Forget { fences: due },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_remainder_adds_up_and_ties_go_to_the_earlier_part() {
        for (amount, weights, expected) in [
            (10u64, vec![5u64, 5, 5], vec![4u64, 3, 3]),
            (2, vec![1, 1, 1], vec![1, 1, 0]),
            (0, vec![5, 5], vec![0, 0]),
            (7, vec![7, 0], vec![7, 0]),
            (100, vec![33, 33, 34], vec![33, 33, 34]),
            (5, vec![3, 3, 3], vec![2, 2, 1]),
            (u64::MAX, vec![u64::MAX], vec![u64::MAX]),
        ] {
            assert_eq!(allocate(amount, &weights), expected, "{amount} over {weights:?}");
        }
    }

    #[test]
    fn reserved_transfer_ids() {
        let order = Id::parse("ord_1_2").unwrap();
        assert_eq!(capture_transfer_id(&order).as_str(), "_cap.ord_1_2");
        assert_eq!(void_transfer_id(&order).as_str(), "_void.ord_1_2");
        assert_eq!(order_transfer_id(&order).as_str(), "_pay.ord_1_2");
        assert_eq!(refund_transfer_id(&Id::parse("rfd_1_3").unwrap()).as_str(), "_rfd_1_3");
        assert!(capture_transfer_id(&order).is_reserved());
        let longest = Id::parse(&"o".repeat(crate::model::MAX_ORDER_ID_LEN)).unwrap();
        assert_eq!(void_transfer_id(&longest).as_str().len(), peakstack_domain::MAX_ID_LEN);
    }
}
