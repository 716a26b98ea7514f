//! Settlements: a merchant's captured money moved from its pending-settlement
//! accounts to its available account, minus the platform's fee.
//!
//! A settlement is a TCC branch of its global transaction (the ledger
//! movements are the transaction's transfers, booked by the engine):
//! `TrySettle` records it Pending and locks its orders (no refund, no second
//! settlement while it is decided), `ConfirmSettle` marks every part Settled,
//! `CancelSettle` fails it and unlocks them. The branch always runs on the
//! executor that coordinates its transaction (the settlement's id names a
//! shard of it) and is tried in the step that starts the transaction, so a
//! cancel never overtakes its try: no suspended fences here.
//!
//! A settled part never changes again: a refund of it is refused with
//! `invalid_state` (its money left the settle account the refund books from).

use std::collections::BTreeSet;

use peakstack_domain::{AssignedKind, Currency, ErrorCode, Id};

use crate::decide::Decision;
use crate::model::PaymentState;
use crate::state::Orders;

/// An id's place in a settlement index: (sequence, shard) of its kind, then
/// the id (what it names).
type Key = (u64, u32, Id);

fn key_of(kind: AssignedKind, id: &Id) -> Key {
    let (shard, sequence) = kind.parse(id.as_str()).unwrap_or((u32::MAX, u64::MAX));
    (sequence, shard, id.clone())
}

fn order_key(id: &Id) -> Key {
    key_of(AssignedKind::Order, id)
}

/// Most parts one settlement takes; the rest wait for the next one.
pub const MAX_SETTLEMENT_LINES: usize = 1024;
/// A fee of 100% (basis points).
pub const MAX_FEE_BPS: u32 = 10_000;
/// Most settlements one listing page holds.
pub const MAX_SETTLEMENT_PAGE: usize = 1000;

/// One settled part: the order, the settle account its money sits in, what
/// is settled (captured minus refunded) and the fee taken off it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementLine {
    pub order_id: Id,
    pub settle_account_id: Id,
    pub amount: u64,
    pub fee: u64,
}

impl SettlementLine {
    /// What the merchant gets of this line.
    pub fn net(&self) -> u64 {
        self.amount - self.fee
    }
}

/// The fee of `amount` at `fee_bps` basis points, rounded down (the
/// platform never takes more than the rate says).
pub fn fee_of(amount: u64, fee_bps: u32) -> u64 {
    let fee = u128::from(amount) * u128::from(fee_bps.min(MAX_FEE_BPS)) / u128::from(MAX_FEE_BPS);
    u64::try_from(fee).expect("a fee is at most its amount")
}

/// A settlement as its global transaction places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSettlement {
    pub id: Id,
    pub merchant_id: Id,
    pub currency: Currency,
    pub fee_bps: u32,
    pub lines: Vec<SettlementLine>,
    pub created_ms: u64,
}

impl NewSettlement {
    /// Checks its shape and sums: lines of distinct orders, each with
    /// something to settle and exactly the fee its rate says. Returns the
    /// (amount, fee) totals.
    pub fn validate(&self) -> Result<(u64, u64), ErrorCode> {
        if self.lines.is_empty() || self.lines.len() > MAX_SETTLEMENT_LINES || self.fee_bps > MAX_FEE_BPS {
            return Err(ErrorCode::InvalidRequest);
        }
        let (mut amount, mut fee) = (0u64, 0u64);
        for (index, line) in self.lines.iter().enumerate() {
            let twice = self.lines[..index].iter().any(|l| l.order_id == line.order_id);
            if twice || line.amount == 0 || line.fee != fee_of(line.amount, self.fee_bps) {
                return Err(ErrorCode::InvalidRequest);
            }
            amount = amount.checked_add(line.amount).ok_or(ErrorCode::Overflow)?;
            fee = fee.checked_add(line.fee).ok_or(ErrorCode::Overflow)?;
        }
        Ok((amount, fee))
    }

    /// (settle account, net to the merchant, fee) per settle account, in
    /// the order the accounts first appear: the movements that settle it.
    pub fn movements(&self) -> Vec<(Id, u64, u64)> {
        let mut out: Vec<(Id, u64, u64)> = Vec::new();
        for line in &self.lines {
            let at = match out.iter().position(|(account, _, _)| *account == line.settle_account_id) {
                Some(at) => at,
                None => {
                    out.push((line.settle_account_id.clone(), 0, 0));
                    out.len() - 1
                }
            };
            // Checked by `validate`: the totals fit in u64.
            out[at].1 += line.net();
            out[at].2 += line.fee;
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettlementState {
    /// Tried by its global transaction: its orders are locked.
    Pending,
    Completed,
    /// Its transaction was cancelled: nothing of it was done.
    Failed,
}

impl SettlementState {
    pub fn as_str(self) -> &'static str {
        match self {
            SettlementState::Pending => "pending",
            SettlementState::Completed => "completed",
            SettlementState::Failed => "failed",
        }
    }
}

/// A settlement as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub txn: u64,
    pub settlement: NewSettlement,
    pub state: SettlementState,
}

/// The settlements of one executor's orders part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Settlements {
    pub(crate) by_id: crate::state::HashMap<Id, Settlement>,
    /// Order id -> the settlement that holds it (pending) or settled it.
    pub(crate) of_order: crate::state::HashMap<Id, Id>,
    /// A merchant's settlements that did not fail, in id order.
    pub(crate) by_merchant: crate::state::HashMap<Id, BTreeSet<Key>>,
    /// A merchant's orders with something to settle (captured, not held by
    /// a settlement, not all refunded), in id order: kept after every
    /// change of an order, so picking and scheduling read only these.
    pub(crate) to_settle: crate::state::HashMap<Id, BTreeSet<Key>>,
}

impl Settlements {
    pub(crate) fn insert(&mut self, settlement: Settlement) {
        let new = &settlement.settlement;
        if settlement.state != SettlementState::Failed {
            for line in &new.lines {
                let previous = self.of_order.insert(line.order_id.clone(), new.id.clone());
                assert!(previous.is_none(), "order {} is settled once", line.order_id);
            }
            self.by_merchant
                .entry(new.merchant_id.clone())
                .or_default()
                .insert(key_of(AssignedKind::Settlement, &new.id));
        }
        self.by_id.insert(new.id.clone(), settlement);
    }
}

impl Orders {
    pub fn settlement(&self, id: &Id) -> Option<&Settlement> {
        self.settlements.by_id.get(id)
    }

    /// A merchant's settlements (not the failed ones) in id order, at most `limit`.
    pub fn settlements_of(&self, merchant_id: &Id, limit: usize) -> Vec<&Settlement> {
        let Some(keys) = self.settlements.by_merchant.get(merchant_id) else { return Vec::new() };
        keys.iter().take(limit.min(MAX_SETTLEMENT_PAGE)).map(|(_, _, id)| &self.settlements.by_id[id]).collect()
    }

    /// The settlement that holds or settled an order, if any.
    pub fn settlement_of_order(&self, order_id: &Id) -> Option<&Settlement> {
        self.settlements.of_order.get(order_id).map(|id| &self.settlements.by_id[id])
    }

    /// What is left to settle of an order's part: captured minus refunded
    /// of a captured part no settlement holds, else 0.
    fn settleable_amount(&self, order_id: &Id) -> u64 {
        let order = &self.orders[order_id];
        match order.payment_state == PaymentState::Captured && !self.settlements.of_order.contains_key(order_id) {
            true => order.amount_captured - order.amount_refunded,
            false => 0,
        }
    }

    /// Keeps an order in [`Settlements::to_settle`] exactly while it has
    /// something to settle (after every change of it).
    pub(crate) fn note_settleable(&mut self, order_id: &Id) {
        let merchant = self.orders[order_id].order.merchant_id.clone();
        let key = order_key(order_id);
        match self.settleable_amount(order_id) > 0 {
            true => {
                self.settlements.to_settle.entry(merchant).or_default().insert(key);
            }
            false => {
                if let Some(keys) = self.settlements.to_settle.get_mut(&merchant) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        self.settlements.to_settle.remove(&merchant);
                    }
                }
            }
        }
    }

    /// A merchant's parts with something to settle, in order id order, of
    /// one currency or of each, at most [`MAX_SETTLEMENT_LINES`]: the
    /// currency and the line (its fee at `fee_bps`).
    pub fn settleable(
        &self,
        merchant_id: &Id,
        currency: Option<Currency>,
        fee_bps: u32,
    ) -> Vec<(Currency, SettlementLine)> {
        let Some(keys) = self.settlements.to_settle.get(merchant_id) else { return Vec::new() };
        keys.iter()
            .filter_map(|(_, _, order_id)| {
                let amount = self.settleable_amount(order_id);
                let order = &self.orders[order_id];
                let of = self.checkouts[&order.checkout_id].checkout.currency;
                (amount > 0 && currency.is_none_or(|c| c == of)).then(|| {
                    let line = SettlementLine {
                        order_id: order_id.clone(),
                        settle_account_id: order.order.settle_account_id.clone(),
                        amount,
                        fee: fee_of(amount, fee_bps),
                    };
                    (of, line)
                })
            })
            .take(MAX_SETTLEMENT_LINES)
            .collect()
    }

    /// Merchants with something to settle, in id order, at most `limit`.
    pub fn merchants_to_settle(&self, limit: usize) -> Vec<Id> {
        let mut merchants: Vec<&Id> = self.settlements.to_settle.keys().collect();
        merchants.sort_unstable();
        merchants.into_iter().take(limit).cloned().collect()
    }

    pub(crate) fn decide_try_settle(&self, txn: u64, new: &NewSettlement) -> Result<Decision, ErrorCode> {
        if let Some(existing) = self.settlements.by_id.get(&new.id) {
            if existing.txn != txn || existing.settlement != *new {
                return Err(ErrorCode::ExistsWithDifferentFields);
            }
            return match existing.state {
                SettlementState::Failed => Err(ErrorCode::BranchCancelled),
                SettlementState::Pending | SettlementState::Completed => Ok(Decision::Unchanged),
            };
        }
        if AssignedKind::Settlement.parse(new.id.as_str()).is_none() {
            return Err(ErrorCode::InvalidRequest);
        }
        new.validate()?;
        for line in &new.lines {
            let order = self.orders.get(&line.order_id).ok_or(ErrorCode::OrderNotFound)?;
            let currency = self.checkouts[&order.checkout_id].checkout.currency;
            let fits = order.order.merchant_id == new.merchant_id
                && currency == new.currency
                && order.order.settle_account_id == line.settle_account_id
                && self.settleable_amount(&line.order_id) == line.amount;
            if !fits {
                return Err(ErrorCode::InvalidState);
            }
        }
        Ok(Decision::PlaceSettlement)
    }

    pub(crate) fn decide_confirm_settle(&self, txn: u64, id: &Id) -> Result<Decision, ErrorCode> {
        match self.settlements.by_id.get(id) {
            Some(settlement) if settlement.txn == txn => match settlement.state {
                SettlementState::Pending => Ok(Decision::ConfirmSettlement),
                SettlementState::Completed => Ok(Decision::Unchanged),
                SettlementState::Failed => Err(ErrorCode::BranchCancelled),
            },
            _ => Err(ErrorCode::TransactionNotFound),
        }
    }

    pub(crate) fn decide_cancel_settle(&self, txn: u64, id: &Id) -> Result<Decision, ErrorCode> {
        match self.settlements.by_id.get(id) {
            Some(settlement) if settlement.txn == txn => match settlement.state {
                SettlementState::Pending => Ok(Decision::CancelSettlement),
                SettlementState::Failed => Ok(Decision::Unchanged),
                SettlementState::Completed => Err(ErrorCode::InvalidState),
            },
            // Refused at its try (or of another transaction): nothing to undo.
            _ => Ok(Decision::Unchanged),
        }
    }

    /// Records a tried settlement: its orders are locked. Returns them.
    pub(crate) fn place_settlement(&mut self, txn: u64, new: &NewSettlement) -> Vec<Id> {
        self.raise_assigned(AssignedKind::Settlement, &new.id);
        self.settlements.insert(Settlement { txn, settlement: new.clone(), state: SettlementState::Pending });
        new.lines.iter().map(|l| l.order_id.clone()).collect()
    }

    /// Every part of a confirmed settlement becomes Settled. Returns them.
    pub(crate) fn confirm_settlement(&mut self, id: &Id, now_ms: u64) -> Vec<Id> {
        let settlement = self.settlements.by_id.get_mut(id).expect("a decided settlement exists");
        assert_eq!(settlement.state, SettlementState::Pending, "settlement {id} finishes once");
        settlement.state = SettlementState::Completed;
        let order_ids: Vec<Id> = settlement.settlement.lines.iter().map(|l| l.order_id.clone()).collect();
        for order_id in &order_ids {
            self.settle_part(order_id, now_ms);
        }
        order_ids
    }

    /// A cancelled settlement fails and lets its orders go. Returns them.
    pub(crate) fn cancel_settlement(&mut self, id: &Id) -> Vec<Id> {
        let settlement = self.settlements.by_id.get_mut(id).expect("a decided settlement exists");
        assert_eq!(settlement.state, SettlementState::Pending, "settlement {id} finishes once");
        settlement.state = SettlementState::Failed;
        let new = settlement.settlement.clone();
        for line in &new.lines {
            self.settlements.of_order.remove(&line.order_id);
        }
        if let Some(keys) = self.settlements.by_merchant.get_mut(&new.merchant_id) {
            keys.remove(&key_of(AssignedKind::Settlement, &new.id));
            if keys.is_empty() {
                self.settlements.by_merchant.remove(&new.merchant_id);
            }
        }
        new.lines.iter().map(|l| l.order_id.clone()).collect()
    }

    /// The first invariant an order breaks against its settlement: a
    /// settled part is a line of a completed settlement of exactly what
    /// it has (captured minus refunded); a held one, of a pending one.
    pub(crate) fn settlement_problem(&self, order_id: &Id) -> Option<&'static str> {
        let order = &self.orders[order_id];
        let scheduled =
            self.settlements.to_settle.get(&order.order.merchant_id).is_some_and(|k| k.contains(&order_key(order_id)));
        if scheduled != (self.settleable_amount(order_id) > 0) {
            return Some("listed to settle exactly while it has something to settle");
        }
        let settled = order.payment_state == PaymentState::Settled;
        let Some(settlement) = self.settlement_of_order(order_id) else {
            return settled.then_some("settled without a settlement");
        };
        let expected = match settled {
            true => SettlementState::Completed,
            false => SettlementState::Pending,
        };
        if settlement.state != expected
            || !matches!(order.payment_state, PaymentState::Captured | PaymentState::Settled)
        {
            return Some("its part's state does not fit its settlement's");
        }
        let line = settlement.settlement.lines.iter().find(|l| l.order_id == *order_id);
        match line {
            Some(line) if line.amount == order.amount_captured - order.amount_refunded => None,
            _ => Some("its settlement's line does not match what it has"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fees_round_down_and_stay_within_the_amount() {
        for (amount, bps, fee) in
            [(10_000u64, 250u32, 250u64), (99, 250, 2), (1, 9_999, 0), (7, 10_000, 7), (0, 300, 0)]
        {
            assert_eq!(fee_of(amount, bps), fee, "{amount} at {bps}");
        }
        assert_eq!(fee_of(u64::MAX, MAX_FEE_BPS), u64::MAX);
    }
}
