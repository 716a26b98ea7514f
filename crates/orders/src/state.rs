//! The state machine: what one executor's orders part holds, how a decided
//! command changes it, and the invariants asserted after every change.

use std::collections::BTreeSet;

use peakstack_domain::{AssignedKind, Currency, ErrorCode, Id};

use crate::decide::Decision;
use crate::model::{
    CaptureMode, Checkout, CheckoutState, LedgerEffect, NewCheckout, Order, OrderState, PaymentState, Refund,
    RefundRequest,
};
use crate::settlement::{NewSettlement, Settlements};

pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// How long a suspended fence (a cancel that came before its try) is kept:
/// a day, far longer than any redelivery of its transaction's messages.
pub const FENCE_RETENTION_MS: u64 = 24 * 3_600_000;
/// Most payments expired or fences forgotten by one command.
pub const MAX_DUE_PER_TICK: usize = 1024;

/// A command of the orders part: logged when it changed state, and replayed
/// through [`Orders::apply`] with the same `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A checkout's TCC branch on its home shard: records it Pending.
    /// Repeated by the same transaction: unchanged (refused with
    /// `branch_cancelled` once it failed). A checkout, order or payment id
    /// that exists otherwise: `exists_with_different_fields`. Refused with
    /// `branch_cancelled` when a cancel of (txn, checkout id) came first.
    TryPlace { txn: u64, checkout: Box<NewCheckout> },
    /// Pending -> Completed: orders Authorized (manual capture) or Paid
    /// (automatic). Repeat: unchanged. Unknown: `transaction_not_found`;
    /// failed or fenced: `branch_cancelled`.
    ConfirmPlace { txn: u64, checkout_id: Id },
    /// Pending -> Failed (the records stay). Before its try: a suspended
    /// fence, kept [`FENCE_RETENTION_MS`]. Repeat: unchanged. Completed:
    /// `invalid_state`.
    CancelPlace { txn: u64, checkout_id: Id },
    /// Capture `amount` (None: all authorized) over the parts awaiting
    /// capture, shared by largest remainder. Already captured: unchanged.
    Capture { payment_id: Id, amount: Option<u64> },
    /// Void every part awaiting capture. Already canceled: unchanged.
    CancelPayment { payment_id: Id },
    /// Void one order's part before capture. Already canceled: unchanged.
    CancelOrder { order_id: Id },
    /// Refund an amount or units of lines of a paid order.
    Refund { refund_id: Id, order_id: Id, request: RefundRequest },
    /// Authorizations whose window passed (from [`Orders::due`]).
    Expire { payments: Vec<Id> },
    /// Suspended fences past their retention (from [`Orders::due`]).
    ForgetFences { fences: Vec<(u64, Id)> },
    /// A settlement's TCC branch (see `settlement.rs`): records it Pending
    /// and locks its orders. Repeated by the same transaction: unchanged.
    /// An order that is not captured, held or settled already, or whose
    /// amount changed: `invalid_state`.
    TrySettle { txn: u64, settlement: Box<NewSettlement> },
    /// Pending -> Completed: its parts Settled. Repeat: unchanged.
    ConfirmSettle { txn: u64, settlement_id: Id },
    /// Pending -> Failed: its orders unlocked. Repeat or unknown: unchanged.
    CancelSettle { txn: u64, settlement_id: Id },
}

/// A checkout's payment, with one part per order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentView {
    pub id: Id,
    pub checkout_id: Id,
    pub state: PaymentState,
    pub currency: Currency,
    pub account_id: Id,
    pub capture: CaptureMode,
    pub amount_authorized: u64,
    pub amount_captured: u64,
    pub amount_refunded: u64,
    pub authorization_expires_ms: u64,
    pub parts: Vec<PaymentPartView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentPartView {
    pub order_id: Id,
    pub merchant_id: Id,
    pub state: PaymentState,
    pub amount_authorized: u64,
    pub amount_captured: u64,
    pub amount_refunded: u64,
}

/// The order of a listing: an assigned id by (shard, sequence), any other
/// id after those, by id.
/// An order's place in the listings: (sequence, shard) of its id. The
/// sequences of one executor only grow, so its orders come in key order and
/// an index is an append-only vector (a B-tree insert cost a cache miss per
/// level at checkout rates).
pub(crate) type OrderKey = (u64, u32);

pub(crate) fn order_key(id: &Id) -> OrderKey {
    let (shard, sequence) = AssignedKind::Order.parse(id.as_str()).unwrap_or((u32::MAX, u64::MAX));
    (sequence, shard)
}

/// Order keys in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OrderIndex(Vec<OrderKey>);

impl OrderIndex {
    fn insert(&mut self, key: OrderKey) {
        match self.0.last() {
            Some(last) if *last >= key => {
                let at = self.0.partition_point(|k| *k < key);
                if self.0.get(at) != Some(&key) {
                    self.0.insert(at, key);
                }
            }
            _ => self.0.push(key),
        }
    }

    fn remove(&mut self, key: OrderKey) {
        if let Ok(at) = self.0.binary_search(&key) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn after(&self, key: Option<OrderKey>) -> impl Iterator<Item = &OrderKey> {
        let from = key.map_or(0, |key| self.0.partition_point(|k| *k <= key));
        self.0[from..].iter()
    }
}

/// A payment's state from its parts': captured if any part is (settled when
/// every part not canceled is), else the first of requires_capture,
/// pending, canceled, expired that a part is in, else failed.
pub(crate) fn payment_state_of(parts: &[PaymentState]) -> PaymentState {
    let any = |state: PaymentState| parts.contains(&state);
    if any(PaymentState::Captured) || any(PaymentState::Settled) {
        let settled = parts.iter().all(|s| matches!(s, PaymentState::Settled | PaymentState::Canceled));
        return if settled { PaymentState::Settled } else { PaymentState::Captured };
    }
    [PaymentState::RequiresCapture, PaymentState::Pending, PaymentState::Canceled, PaymentState::Expired]
        .into_iter()
        .find(|state| any(*state))
        .unwrap_or(PaymentState::Failed)
}

/// The orders part of one executor's shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orders {
    pub(crate) checkouts: HashMap<Id, Checkout>,
    pub(crate) orders: HashMap<Id, Order>,
    /// Payment id -> its checkout's id.
    pub(crate) payments: HashMap<Id, Id>,
    pub(crate) refunds: HashMap<Id, Refund>,
    /// Suspended fences: (txn, checkout id) -> when they are forgotten.
    pub(crate) fences: HashMap<(u64, Id), u64>,
    /// The fences by when they are forgotten.
    pub(crate) fence_forgets: BTreeSet<(u64, u64, Id)>,
    /// Payments with a part awaiting capture, by when the authorization expires.
    pub(crate) expiries: BTreeSet<(u64, Id)>,
    pub(crate) all_orders: OrderIndex,
    pub(crate) by_buyer: HashMap<Id, OrderIndex>,
    pub(crate) by_merchant: HashMap<Id, OrderIndex>,
    /// The next sequence [`Orders::take_sequence`] hands out.
    pub(crate) next_sequence: u64,
    pub(crate) settlements: Settlements,
}

impl Default for Orders {
    fn default() -> Orders {
        Orders::new()
    }
}

impl Orders {
    pub fn new() -> Orders {
        Orders {
            checkouts: HashMap::default(),
            orders: HashMap::default(),
            payments: HashMap::default(),
            refunds: HashMap::default(),
            fences: HashMap::default(),
            fence_forgets: BTreeSet::new(),
            expiries: BTreeSet::new(),
            all_orders: OrderIndex::default(),
            by_buyer: HashMap::default(),
            by_merchant: HashMap::default(),
            next_sequence: 1,
            settlements: Settlements::default(),
        }
    }

    /// What `command` would do at `now_ms`, changing nothing: the ledger
    /// effects to book in the same atomic step, or why it is refused.
    pub fn plan(&self, command: &Command, now_ms: u64) -> Result<Vec<LedgerEffect>, ErrorCode> {
        let decision = self.decide(command, now_ms)?;
        Ok(self.effects(command, &decision))
    }

    /// Applies a command whose planned effects the executor booked. Returns
    /// whether state changed (then the command is logged) and the reply; a
    /// refused command changes nothing and gets the same error as `plan`.
    pub fn apply(&mut self, command: &Command, now_ms: u64) -> (bool, Result<(), ErrorCode>) {
        match self.decide(command, now_ms) {
            Err(code) => (false, Err(code)),
            Ok(Decision::Unchanged) => (false, Ok(())),
            Ok(decision) => {
                let touched = self.execute(command, decision, now_ms);
                for order_id in &touched {
                    self.note_settleable(order_id);
                    self.assert_order(order_id);
                }
                (true, Ok(()))
            }
        }
    }

    /// A sequence number for an id the caller assigns (see [`AssignedKind`]).
    /// The sequence the next assigned id would take, without taking it: for
    /// an id used and applied in one step (a refund), whose command raises
    /// the counter when it is applied, so that a refused one leaves the
    /// counter as a replay (which never sees it) would.
    pub fn peek_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Raises the counter above the ids a checkout carries: applied with
    /// the logged input that carries them (before its try may be), so a
    /// replay counts as the run that assigned them did.
    pub fn note_assigned(&mut self, checkout: &NewCheckout) {
        self.raise_sequence(AssignedKind::Checkout, &checkout.id);
        self.raise_sequence(AssignedKind::Payment, &checkout.payment_id);
        for order in &checkout.orders {
            self.raise_sequence(AssignedKind::Order, &order.id);
        }
    }

    pub fn take_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence = sequence.checked_add(1).expect("2^64 ids");
        sequence
    }

    pub fn checkout(&self, id: &Id) -> Option<&Checkout> {
        self.checkouts.get(id)
    }

    pub fn order(&self, id: &Id) -> Option<&Order> {
        self.orders.get(id)
    }

    pub fn refund(&self, id: &Id) -> Option<&Refund> {
        self.refunds.get(id)
    }

    /// Whether a suspended fence of (txn, checkout id) is kept.
    pub fn is_fenced(&self, txn: u64, checkout_id: &Id) -> bool {
        self.fences.contains_key(&(txn, checkout_id.clone()))
    }

    pub(crate) fn payment_state(&self, payment_id: &Id) -> Option<PaymentState> {
        let checkout = &self.checkouts[self.payments.get(payment_id)?].checkout;
        let parts: Vec<PaymentState> = checkout.orders.iter().map(|o| self.orders[&o.id].payment_state).collect();
        Some(payment_state_of(&parts))
    }

    pub fn payment(&self, id: &Id) -> Option<PaymentView> {
        let checkout = &self.checkouts[self.payments.get(id)?].checkout;
        let parts: Vec<PaymentPartView> = checkout
            .orders
            .iter()
            .map(|o| {
                let order = &self.orders[&o.id];
                PaymentPartView {
                    order_id: o.id.clone(),
                    merchant_id: o.merchant_id.clone(),
                    state: order.payment_state,
                    amount_authorized: order.amount_authorized,
                    amount_captured: order.amount_captured,
                    amount_refunded: order.amount_refunded,
                }
            })
            .collect();
        let states: Vec<PaymentState> = parts.iter().map(|p| p.state).collect();
        // Every part's amount is at most its order's total, and the totals'
        // sum was checked to fit when the checkout was placed.
        let sum = |amount: fn(&PaymentPartView) -> u64| parts.iter().map(amount).sum();
        Some(PaymentView {
            id: id.clone(),
            checkout_id: checkout.id.clone(),
            state: payment_state_of(&states),
            currency: checkout.currency,
            account_id: checkout.account_id.clone(),
            capture: checkout.capture,
            amount_authorized: sum(|p| p.amount_authorized),
            amount_captured: sum(|p| p.amount_captured),
            amount_refunded: sum(|p| p.amount_refunded),
            authorization_expires_ms: checkout.authorization_expires_ms,
            parts,
        })
    }

    /// Orders in id order (see [`OrderKey`]) after `after`, at most `limit`,
    /// of a buyer and/or a merchant.
    pub fn orders(
        &self,
        buyer_id: Option<&Id>,
        merchant_id: Option<&Id>,
        after: Option<&Id>,
        limit: usize,
    ) -> Vec<&Order> {
        let empty = OrderIndex::default();
        let index = match (buyer_id, merchant_id) {
            (Some(buyer), _) => self.by_buyer.get(buyer).unwrap_or(&empty),
            (None, Some(merchant)) => self.by_merchant.get(merchant).unwrap_or(&empty),
            (None, None) => &self.all_orders,
        };
        index
            .after(after.map(order_key))
            .map(|(sequence, shard)| &self.orders[&AssignedKind::Order.id(*shard, *sequence)])
            .filter(|order| merchant_id.is_none_or(|m| order.order.merchant_id == *m))
            .take(limit)
            .collect()
    }

    /// The commands for the deadlines passed by `now_ms`: authorizations to
    /// expire and fences to forget, each at most [`MAX_DUE_PER_TICK`].
    pub fn due(&self, now_ms: u64) -> Vec<Command> {
        let payments: Vec<Id> = self
            .expiries
            .iter()
            .take_while(|(expires_ms, _)| *expires_ms <= now_ms)
            .take(MAX_DUE_PER_TICK)
            .map(|(_, id)| id.clone())
            .collect();
        let fences: Vec<(u64, Id)> = self
            .fence_forgets
            .iter()
            .take_while(|(forget_at_ms, _, _)| *forget_at_ms <= now_ms)
            .take(MAX_DUE_PER_TICK)
            .map(|(_, txn, id)| (*txn, id.clone()))
            .collect();
        let mut due = Vec::new();
        if !payments.is_empty() {
            due.push(Command::Expire { payments });
        }
        if !fences.is_empty() {
            due.push(Command::ForgetFences { fences });
        }
        due
    }

    /// Makes a decided change; returns the orders it touched.
    fn execute(&mut self, command: &Command, decision: Decision, now_ms: u64) -> Vec<Id> {
        match (decision, command) {
            (Decision::Place, Command::TryPlace { txn, checkout }) => self.place(*txn, checkout, now_ms),
            (Decision::Confirm, Command::ConfirmPlace { checkout_id, .. }) => self.confirm(checkout_id, now_ms),
            (Decision::Fail, Command::CancelPlace { checkout_id, .. }) => self.fail(checkout_id, now_ms),
            (Decision::Suspend, Command::CancelPlace { txn, checkout_id }) => {
                let forget_at_ms = now_ms.saturating_add(FENCE_RETENTION_MS);
                self.fences.insert((*txn, checkout_id.clone()), forget_at_ms);
                self.fence_forgets.insert((forget_at_ms, *txn, checkout_id.clone()));
                self.raise_sequence(AssignedKind::Checkout, checkout_id);
                Vec::new()
            }
            (Decision::Capture { shares }, Command::Capture { .. }) => self.capture(&shares, now_ms),
            (Decision::Void { parts, to }, _) => self.void(&parts, to, now_ms),
            (Decision::Refund { amount, line_units }, Command::Refund { refund_id, order_id, request }) => {
                self.add_refund(refund_id, order_id, request, amount, &line_units, now_ms)
            }
            (Decision::Forget { fences }, Command::ForgetFences { .. }) => {
                for fence in fences {
                    let forget_at_ms = self.fences.remove(&fence).expect("a fence due exists");
                    let removed = self.fence_forgets.remove(&(forget_at_ms, fence.0, fence.1));
                    assert!(removed, "a fence is scheduled to be forgotten");
                }
                Vec::new()
            }
            (Decision::PlaceSettlement, Command::TrySettle { txn, settlement }) => {
                self.place_settlement(*txn, settlement)
            }
            (Decision::ConfirmSettlement, Command::ConfirmSettle { settlement_id, .. }) => {
                self.confirm_settlement(settlement_id, now_ms)
            }
            (Decision::CancelSettlement, Command::CancelSettle { settlement_id, .. }) => {
                self.cancel_settlement(settlement_id)
            }
            (decision, command) => unreachable!("{decision:?} is no decision of {command:?}"),
        }
    }

    /// Raises the sequence counter above an assigned id's, so that a replay
    /// of the log hands out the same next ids.
    pub(crate) fn raise_assigned(&mut self, kind: AssignedKind, id: &Id) {
        self.raise_sequence(kind, id);
    }

    /// Raises the counter above a settlement id the executor assigned:
    /// applied with the logged input that carries it (see `note_assigned`).
    pub fn note_settlement(&mut self, settlement: &NewSettlement) {
        self.raise_sequence(AssignedKind::Settlement, &settlement.id);
    }

    fn raise_sequence(&mut self, kind: AssignedKind, id: &Id) {
        if let Some((_, sequence)) = kind.parse(id.as_str()) {
            self.next_sequence = self.next_sequence.max(sequence.saturating_add(1));
        }
    }

    fn place(&mut self, txn: u64, new: &NewCheckout, now_ms: u64) -> Vec<Id> {
        let mut touched = Vec::with_capacity(new.orders.len());
        for placed in &new.orders {
            let order = Order {
                checkout_id: new.id.clone(),
                buyer_id: new.buyer_id.clone(),
                currency: new.currency,
                order: placed.clone(),
                state: OrderState::Pending,
                amount_authorized: 0,
                amount_captured: 0,
                amount_refunded: 0,
                payment_state: PaymentState::Pending,
                refunded_units: vec![0; placed.lines.len()],
                refunds: Vec::new(),
                updated_ms: now_ms,
            };
            self.index_order(&order);
            self.raise_sequence(AssignedKind::Order, &placed.id);
            let previous = self.orders.insert(placed.id.clone(), order);
            assert!(previous.is_none(), "an order id is placed once");
            touched.push(placed.id.clone());
        }
        self.raise_sequence(AssignedKind::Checkout, &new.id);
        self.raise_sequence(AssignedKind::Payment, &new.payment_id);
        let previous = self.payments.insert(new.payment_id.clone(), new.id.clone());
        assert!(previous.is_none(), "a payment id is placed once");
        let checkout = Checkout { txn, checkout: new.clone(), state: CheckoutState::Pending };
        self.checkouts.insert(new.id.clone(), checkout);
        touched
    }

    pub(crate) fn index_order(&mut self, order: &Order) {
        let key = order_key(&order.order.id);
        self.all_orders.insert(key);
        self.by_buyer.entry(order.buyer_id.clone()).or_default().insert(key);
        self.by_merchant.entry(order.order.merchant_id.clone()).or_default().insert(key);
    }

    /// Moves an order's payment part to `next`: terminal states never change.
    fn set_part(&mut self, order_id: &Id, next: PaymentState, state: OrderState, now_ms: u64) -> &mut Order {
        let order = self.orders.get_mut(order_id).expect("a decided order exists");
        assert!(
            order.payment_state.may_become(next),
            "order {order_id}: payment part {:?} may not become {next:?}",
            order.payment_state
        );
        order.payment_state = next;
        order.state = state;
        order.updated_ms = now_ms;
        order
    }

    /// A captured part becomes Settled (its order keeps its state).
    pub(crate) fn settle_part(&mut self, order_id: &Id, now_ms: u64) {
        let state = self.orders[order_id].state;
        self.set_part(order_id, PaymentState::Settled, state, now_ms);
    }

    fn set_checkout(&mut self, checkout_id: &Id, state: CheckoutState) -> Vec<Id> {
        let checkout = self.checkouts.get_mut(checkout_id).expect("a decided checkout exists");
        assert_eq!(checkout.state, CheckoutState::Pending, "checkout {checkout_id} finishes once");
        checkout.state = state;
        checkout.checkout.orders.iter().map(|o| o.id.clone()).collect()
    }

    fn confirm(&mut self, checkout_id: &Id, now_ms: u64) -> Vec<Id> {
        let order_ids = self.set_checkout(checkout_id, CheckoutState::Completed);
        let capture = self.checkouts[checkout_id].checkout.capture;
        for order_id in &order_ids {
            let order = match capture {
                CaptureMode::Manual => {
                    self.set_part(order_id, PaymentState::RequiresCapture, OrderState::Authorized, now_ms)
                }
                CaptureMode::Automatic => {
                    let order = self.set_part(order_id, PaymentState::Captured, OrderState::Paid, now_ms);
                    order.amount_captured = order.order.total;
                    order
                }
            };
            order.amount_authorized = order.order.total;
        }
        self.reschedule(checkout_id);
        order_ids
    }

    /// A failed checkout's orders stay readable by id but leave the
    /// listings: a buyer's orders are the ones placed.
    fn fail(&mut self, checkout_id: &Id, now_ms: u64) -> Vec<Id> {
        let order_ids = self.set_checkout(checkout_id, CheckoutState::Failed);
        for order_id in &order_ids {
            self.set_part(order_id, PaymentState::Failed, OrderState::Failed, now_ms);
            let order = self.orders[order_id].clone();
            self.unindex_order(&order);
        }
        order_ids
    }

    fn unindex_order(&mut self, order: &Order) {
        let key = order_key(&order.order.id);
        self.all_orders.remove(key);
        for (index, owner) in [(&mut self.by_buyer, &order.buyer_id), (&mut self.by_merchant, &order.order.merchant_id)]
        {
            if let Some(keys) = index.get_mut(owner) {
                keys.remove(key);
                if keys.is_empty() {
                    index.remove(owner);
                }
            }
        }
    }

    fn capture(&mut self, shares: &[(Id, u64)], now_ms: u64) -> Vec<Id> {
        for (order_id, share) in shares {
            match share {
                0 => {
                    self.set_part(order_id, PaymentState::Canceled, OrderState::Canceled, now_ms);
                }
                _ => self.set_part(order_id, PaymentState::Captured, OrderState::Paid, now_ms).amount_captured = *share,
            }
        }
        self.reschedule_orders(shares.iter().map(|(id, _)| id));
        shares.iter().map(|(id, _)| id.clone()).collect()
    }

    fn void(&mut self, parts: &[Id], to: PaymentState, now_ms: u64) -> Vec<Id> {
        for order_id in parts {
            self.set_part(order_id, to, OrderState::Canceled, now_ms);
        }
        self.reschedule_orders(parts.iter());
        parts.to_vec()
    }

    fn add_refund(
        &mut self,
        refund_id: &Id,
        order_id: &Id,
        request: &RefundRequest,
        amount: u64,
        line_units: &[(usize, u32)],
        now_ms: u64,
    ) -> Vec<Id> {
        let order = self.orders.get_mut(order_id).expect("a decided order exists");
        for (index, units) in line_units {
            order.refunded_units[*index] += units;
        }
        order.amount_refunded = order.amount_refunded.checked_add(amount).expect("at most what was captured");
        order.refunds.push(refund_id.clone());
        order.updated_ms = now_ms;
        let every_unit = order.refunded_units.iter().zip(&order.order.lines).all(|(r, l)| *r == l.quantity);
        // An order that captured nothing is refunded once every unit is.
        if order.amount_refunded == order.amount_captured && (order.amount_captured > 0 || every_unit) {
            order.state = OrderState::Refunded;
        }
        let lines = match request {
            RefundRequest::Amount(_) => Vec::new(),
            RefundRequest::Lines(lines) => lines.clone(),
        };
        let refund = Refund {
            id: refund_id.clone(),
            order_id: order_id.clone(),
            amount,
            lines,
            transfer_id: crate::decide::refund_transfer_id(refund_id),
            created_ms: now_ms,
        };
        self.refunds.insert(refund_id.clone(), refund);
        self.raise_sequence(AssignedKind::Refund, refund_id);
        vec![order_id.clone()]
    }

    fn reschedule_orders<'a>(&mut self, order_ids: impl Iterator<Item = &'a Id>) {
        let mut checkouts: Vec<Id> = order_ids.map(|id| self.orders[id].checkout_id.clone()).collect();
        checkouts.sort_unstable();
        checkouts.dedup();
        for checkout_id in &checkouts {
            self.reschedule(checkout_id);
        }
    }

    /// Keeps a payment in the expiry schedule exactly while a part awaits capture.
    pub(crate) fn reschedule(&mut self, checkout_id: &Id) {
        let checkout = &self.checkouts[checkout_id].checkout;
        let key = (checkout.authorization_expires_ms, checkout.payment_id.clone());
        let awaiting =
            checkout.orders.iter().any(|o| self.orders[&o.id].payment_state == PaymentState::RequiresCapture);
        match awaiting {
            true => self.expiries.insert(key),
            false => self.expiries.remove(&key),
        };
    }

    /// The sum of an order's refunds' amounts, checked.
    pub(crate) fn refunded_by_refunds(&self, order: &Order) -> Option<u64> {
        order.refunds.iter().try_fold(0u64, |sum, id| sum.checked_add(self.refunds.get(id)?.amount))
    }

    /// The first invariant an order breaks, with its refunds and checkout.
    pub(crate) fn order_problem(&self, order_id: &Id) -> Option<&'static str> {
        let order = &self.orders[order_id];
        let Some(refunded) = self.refunded_by_refunds(order) else { return Some("refunds missing or beyond u64") };
        if let Some(problem) = order.problem(refunded) {
            return Some(problem);
        }
        let Some(checkout) = self.checkouts.get(&order.checkout_id) else { return Some("without its checkout") };
        let consistent = match checkout.state {
            CheckoutState::Pending => {
                order.payment_state == PaymentState::Pending && order.state == OrderState::Pending
            }
            CheckoutState::Failed => order.payment_state == PaymentState::Failed && order.state == OrderState::Failed,
            CheckoutState::Completed => !matches!(order.payment_state, PaymentState::Pending | PaymentState::Failed),
        };
        if !consistent {
            return Some("its part's state does not fit its checkout's");
        }
        let paid = matches!(order.state, OrderState::Paid | OrderState::Refunded);
        let captured = matches!(order.payment_state, PaymentState::Captured | PaymentState::Settled);
        if paid != captured || (!captured && order.amount_captured > 0) {
            return Some("its state does not fit its part's");
        }
        let authorized = order.state == OrderState::Authorized;
        if authorized != (order.payment_state == PaymentState::RequiresCapture) {
            return Some("authorized without a part awaiting capture");
        }
        self.settlement_problem(order_id)
    }

    /// An order's invariants (a violation is a bug: panics).
    fn assert_order(&self, order_id: &Id) {
        if let Some(problem) = self.order_problem(order_id) {
            panic!("order {order_id}: {problem}: {:?}", self.orders[order_id]);
        }
    }

    /// Every invariant of every order (a violation panics).
    pub fn assert_invariants(&self) {
        for order_id in self.orders.keys() {
            self.assert_order(order_id);
        }
    }
}
