//! The orders part's binary forms: its commands (in the engine's log) and
//! its checkpoint section. Every field is written; decoding never trusts
//! the bytes and checks every invariant of a checkpoint it reads.

use peakstack_domain::wire::{CodecError, Reader, Writer};
use peakstack_domain::{Currency, Id};

use crate::model::{
    CaptureMode, Checkout, CheckoutState, NewCheckout, NewOrder, Order, OrderLine, OrderState, PaymentState, Refund,
    RefundRequest,
};
use crate::settlement::{NewSettlement, Settlement, SettlementLine, SettlementState};
use crate::state::{Command, Orders};

type Result<T> = std::result::Result<T, CodecError>;

/// The format of the checkpoint section this build writes (its first byte).
/// Format 2 adds the settlements after the fences; a format 1 section
/// reads as one without settlements.
pub const CHECKPOINT_FORMAT: u8 = 2;

fn id(r: &mut Reader<'_>) -> Result<Id> {
    Id::parse(r.str()?).ok_or(CodecError("invalid id"))
}

fn put_id(w: &mut Writer, id: &Id) {
    w.str(id.as_str());
}

fn ids(r: &mut Reader<'_>) -> Result<Vec<Id>> {
    let n = r.len()?;
    (0..n).map(|_| id(r)).collect()
}

fn put_ids(w: &mut Writer, ids: &[Id]) {
    w.varint(ids.len() as u64);
    ids.iter().for_each(|i| put_id(w, i));
}

fn u32_varint(r: &mut Reader<'_>) -> Result<u32> {
    u32::try_from(r.varint()?).map_err(|_| CodecError("number out of range"))
}

fn currency(r: &mut Reader<'_>) -> Result<Currency> {
    Currency::from_bytes(r.array::<3>()?).ok_or(CodecError("invalid currency"))
}

fn put_line_units(w: &mut Writer, lines: &[(u32, u32)]) {
    w.varint(lines.len() as u64);
    for (line_id, units) in lines {
        w.varint(u64::from(*line_id));
        w.varint(u64::from(*units));
    }
}

fn line_units(r: &mut Reader<'_>) -> Result<Vec<(u32, u32)>> {
    let n = r.len()?;
    (0..n).map(|_| Ok((u32_varint(r)?, u32_varint(r)?))).collect()
}

fn put_line(w: &mut Writer, line: &OrderLine) {
    w.varint(u64::from(line.line_id));
    put_id(w, &line.sku_id);
    w.varint(u64::from(line.quantity));
    w.varint(line.unit_price);
    w.varint(line.subtotal);
    w.varint(line.discounts.len() as u64);
    for (by, amount) in &line.discounts {
        put_id(w, by);
        w.varint(*amount);
    }
    w.varint(line.total);
}

fn line(r: &mut Reader<'_>) -> Result<OrderLine> {
    Ok(OrderLine {
        line_id: u32_varint(r)?,
        sku_id: id(r)?,
        quantity: u32_varint(r)?,
        unit_price: r.varint()?,
        subtotal: r.varint()?,
        discounts: {
            let n = r.len()?;
            (0..n).map(|_| Ok((id(r)?, r.varint()?))).collect::<Result<Vec<_>>>()?
        },
        total: r.varint()?,
    })
}

fn put_new_order(w: &mut Writer, order: &NewOrder) {
    put_id(w, &order.id);
    put_id(w, &order.merchant_id);
    w.varint(order.lines.len() as u64);
    order.lines.iter().for_each(|l| put_line(w, l));
    w.varint(order.total);
    put_id(w, &order.transfer_id);
    put_id(w, &order.settle_account_id);
}

fn new_order(r: &mut Reader<'_>) -> Result<NewOrder> {
    Ok(NewOrder {
        id: id(r)?,
        merchant_id: id(r)?,
        lines: {
            let n = r.len()?;
            (0..n).map(|_| line(r)).collect::<Result<Vec<_>>>()?
        },
        total: r.varint()?,
        transfer_id: id(r)?,
        settle_account_id: id(r)?,
    })
}

fn put_new_checkout(w: &mut Writer, checkout: &NewCheckout) {
    put_id(w, &checkout.id);
    put_id(w, &checkout.buyer_id);
    put_id(w, &checkout.account_id);
    w.buf.extend_from_slice(&checkout.currency.as_bytes());
    w.u8(match checkout.capture {
        CaptureMode::Automatic => 0,
        CaptureMode::Manual => 1,
    });
    put_id(w, &checkout.payment_id);
    put_ids(w, &checkout.coupon_ids);
    w.varint(checkout.orders.len() as u64);
    checkout.orders.iter().for_each(|o| put_new_order(w, o));
    w.varint(checkout.created_ms);
    w.varint(checkout.authorization_expires_ms);
    put_ids(w, &checkout.consumed_promotions);
}

fn new_checkout(r: &mut Reader<'_>) -> Result<NewCheckout> {
    Ok(NewCheckout {
        id: id(r)?,
        buyer_id: id(r)?,
        account_id: id(r)?,
        currency: currency(r)?,
        capture: match r.u8()? {
            0 => CaptureMode::Automatic,
            1 => CaptureMode::Manual,
            _ => return Err(CodecError("invalid capture mode")),
        },
        payment_id: id(r)?,
        coupon_ids: ids(r)?,
        orders: {
            let n = r.len()?;
            (0..n).map(|_| new_order(r)).collect::<Result<Vec<_>>>()?
        },
        created_ms: r.varint()?,
        authorization_expires_ms: r.varint()?,
        consumed_promotions: ids(r)?,
    })
}

fn put_new_settlement(w: &mut Writer, settlement: &NewSettlement) {
    put_id(w, &settlement.id);
    put_id(w, &settlement.merchant_id);
    w.buf.extend_from_slice(&settlement.currency.as_bytes());
    w.varint(u64::from(settlement.fee_bps));
    w.varint(settlement.lines.len() as u64);
    for line in &settlement.lines {
        put_id(w, &line.order_id);
        put_id(w, &line.settle_account_id);
        w.varint(line.amount);
        w.varint(line.fee);
    }
    w.varint(settlement.created_ms);
}

fn new_settlement(r: &mut Reader<'_>) -> Result<NewSettlement> {
    Ok(NewSettlement {
        id: id(r)?,
        merchant_id: id(r)?,
        currency: currency(r)?,
        fee_bps: u32_varint(r)?,
        lines: {
            let n = r.len()?;
            (0..n)
                .map(|_| {
                    Ok(SettlementLine {
                        order_id: id(r)?,
                        settle_account_id: id(r)?,
                        amount: r.varint()?,
                        fee: r.varint()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        },
        created_ms: r.varint()?,
    })
}

const SETTLEMENT_STATES: [SettlementState; 3] =
    [SettlementState::Pending, SettlementState::Completed, SettlementState::Failed];

/// Appends a command's bytes.
pub fn encode_command(command: &Command, w: &mut Writer) {
    match command {
        Command::TryPlace { txn, checkout } => {
            w.u8(0);
            w.u64(*txn);
            put_new_checkout(w, checkout);
        }
        Command::ConfirmPlace { txn, checkout_id } => {
            w.u8(1);
            w.u64(*txn);
            put_id(w, checkout_id);
        }
        Command::CancelPlace { txn, checkout_id } => {
            w.u8(2);
            w.u64(*txn);
            put_id(w, checkout_id);
        }
        Command::Capture { payment_id, amount } => {
            w.u8(3);
            put_id(w, payment_id);
            match amount {
                None => w.u8(0),
                Some(amount) => {
                    w.u8(1);
                    w.varint(*amount);
                }
            }
        }
        Command::CancelPayment { payment_id } => {
            w.u8(4);
            put_id(w, payment_id);
        }
        Command::CancelOrder { order_id } => {
            w.u8(5);
            put_id(w, order_id);
        }
        Command::Refund { refund_id, order_id, request } => {
            w.u8(6);
            put_id(w, refund_id);
            put_id(w, order_id);
            match request {
                RefundRequest::Amount(amount) => {
                    w.u8(0);
                    w.varint(*amount);
                }
                RefundRequest::Lines(lines) => {
                    w.u8(1);
                    put_line_units(w, lines);
                }
            }
        }
        Command::Expire { payments } => {
            w.u8(7);
            put_ids(w, payments);
        }
        Command::ForgetFences { fences } => {
            w.u8(8);
            w.varint(fences.len() as u64);
            for (txn, checkout_id) in fences {
                w.u64(*txn);
                put_id(w, checkout_id);
            }
        }
        Command::TrySettle { txn, settlement } => {
            w.u8(9);
            w.u64(*txn);
            put_new_settlement(w, settlement);
        }
        Command::ConfirmSettle { txn, settlement_id } => {
            w.u8(10);
            w.u64(*txn);
            put_id(w, settlement_id);
        }
        Command::CancelSettle { txn, settlement_id } => {
            w.u8(11);
            w.u64(*txn);
            put_id(w, settlement_id);
        }
    }
}

pub fn decode_command(r: &mut Reader<'_>) -> Result<Command> {
    Ok(match r.u8()? {
        0 => Command::TryPlace { txn: r.u64()?, checkout: Box::new(new_checkout(r)?) },
        1 => Command::ConfirmPlace { txn: r.u64()?, checkout_id: id(r)? },
        2 => Command::CancelPlace { txn: r.u64()?, checkout_id: id(r)? },
        3 => Command::Capture {
            payment_id: id(r)?,
            amount: match r.u8()? {
                0 => None,
                1 => Some(r.varint()?),
                _ => return Err(CodecError("invalid option")),
            },
        },
        4 => Command::CancelPayment { payment_id: id(r)? },
        5 => Command::CancelOrder { order_id: id(r)? },
        6 => Command::Refund {
            refund_id: id(r)?,
            order_id: id(r)?,
            request: match r.u8()? {
                0 => RefundRequest::Amount(r.varint()?),
                1 => RefundRequest::Lines(line_units(r)?),
                _ => return Err(CodecError("invalid refund request")),
            },
        },
        7 => Command::Expire { payments: ids(r)? },
        8 => {
            let n = r.len()?;
            let fences = (0..n).map(|_| Ok((r.u64()?, id(r)?))).collect::<Result<Vec<_>>>()?;
            Command::ForgetFences { fences }
        }
        9 => Command::TrySettle { txn: r.u64()?, settlement: Box::new(new_settlement(r)?) },
        10 => Command::ConfirmSettle { txn: r.u64()?, settlement_id: id(r)? },
        11 => Command::CancelSettle { txn: r.u64()?, settlement_id: id(r)? },
        _ => return Err(CodecError("unknown orders command")),
    })
}

const CHECKOUT_STATES: [CheckoutState; 3] = [CheckoutState::Pending, CheckoutState::Completed, CheckoutState::Failed];
const ORDER_STATES: [OrderState; 6] = [
    OrderState::Pending,
    OrderState::Authorized,
    OrderState::Paid,
    OrderState::Canceled,
    OrderState::Refunded,
    OrderState::Failed,
];
const PAYMENT_STATES: [PaymentState; 7] = [
    PaymentState::Pending,
    PaymentState::RequiresCapture,
    PaymentState::Captured,
    PaymentState::Settled,
    PaymentState::Canceled,
    PaymentState::Expired,
    PaymentState::Failed,
];

/// A state as its index in `states` (one byte).
fn put_state<T: PartialEq>(w: &mut Writer, states: &[T], state: &T) {
    w.u8(states.iter().position(|s| s == state).expect("every state is listed") as u8);
}

fn state<T: Copy>(r: &mut Reader<'_>, states: &[T]) -> Result<T> {
    states.get(usize::from(r.u8()?)).copied().ok_or(CodecError("invalid state"))
}

/// What an order holds beyond its placed form (that is its checkout's).
fn put_order_state(w: &mut Writer, order: &Order) {
    put_state(w, &ORDER_STATES, &order.state);
    w.varint(order.amount_authorized);
    w.varint(order.amount_captured);
    w.varint(order.amount_refunded);
    put_state(w, &PAYMENT_STATES, &order.payment_state);
    // One per line: the count is the order's.
    order.refunded_units.iter().for_each(|units| w.varint(u64::from(*units)));
    put_ids(w, &order.refunds);
    w.varint(order.updated_ms);
}

fn order_state(r: &mut Reader<'_>, checkout: &NewCheckout, placed: &NewOrder) -> Result<Order> {
    Ok(Order {
        checkout_id: checkout.id.clone(),
        buyer_id: checkout.buyer_id.clone(),
        currency: checkout.currency,
        order: placed.clone(),
        state: state(r, &ORDER_STATES)?,
        amount_authorized: r.varint()?,
        amount_captured: r.varint()?,
        amount_refunded: r.varint()?,
        payment_state: state(r, &PAYMENT_STATES)?,
        refunded_units: placed.lines.iter().map(|_| u32_varint(r)).collect::<Result<Vec<_>>>()?,
        refunds: ids(r)?,
        updated_ms: r.varint()?,
    })
}

fn sorted<'a, K: Ord + 'a, V: 'a>(map: impl Iterator<Item = (&'a K, &'a V)>) -> Vec<(&'a K, &'a V)> {
    let mut entries: Vec<_> = map.collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    entries
}

impl Orders {
    /// The checkpoint section: a format byte, the sequence counter, then
    /// checkouts (each followed by its orders' state), refunds and suspended
    /// fences, each sorted by id so the same state writes the same bytes.
    /// The payments, indexes and expiry schedule are rebuilt from them.
    pub fn encode_checkpoint(&self, w: &mut Writer) {
        w.u8(CHECKPOINT_FORMAT);
        w.varint(self.next_sequence);
        w.varint(self.checkouts.len() as u64);
        for (_, checkout) in sorted(self.checkouts.iter()) {
            w.u64(checkout.txn);
            put_state(w, &CHECKOUT_STATES, &checkout.state);
            put_new_checkout(w, &checkout.checkout);
            for placed in &checkout.checkout.orders {
                put_order_state(w, &self.orders[&placed.id]);
            }
        }
        w.varint(self.refunds.len() as u64);
        for (_, refund) in sorted(self.refunds.iter()) {
            put_id(w, &refund.id);
            put_id(w, &refund.order_id);
            w.varint(refund.amount);
            put_line_units(w, &refund.lines);
            put_id(w, &refund.transfer_id);
            w.varint(refund.created_ms);
        }
        w.varint(self.fences.len() as u64);
        for ((txn, checkout_id), forget_at_ms) in sorted(self.fences.iter()) {
            w.u64(*txn);
            put_id(w, checkout_id);
            w.varint(*forget_at_ms);
        }
        w.varint(self.settlements.by_id.len() as u64);
        for (_, settlement) in sorted(self.settlements.by_id.iter()) {
            w.u64(settlement.txn);
            put_state(w, &SETTLEMENT_STATES, &settlement.state);
            put_new_settlement(w, &settlement.settlement);
        }
    }

    /// Reads a checkpoint section back, rebuilding the payments, indexes and
    /// expiry schedule, and checks every invariant of what it read.
    pub fn decode_checkpoint(r: &mut Reader<'_>) -> Result<Orders> {
        let format = r.u8()?;
        if format != 1 && format != CHECKPOINT_FORMAT {
            return Err(CodecError("orders section of an unknown (newer) format"));
        }
        let mut orders = Orders::new();
        orders.next_sequence = r.varint()?;
        for _ in 0..r.len()? {
            let txn = r.u64()?;
            let checkout_state = state(r, &CHECKOUT_STATES)?;
            let checkout = new_checkout(r)?;
            if checkout.validate().is_err() {
                return Err(CodecError("an invalid checkout"));
            }
            for placed in &checkout.orders {
                let order = order_state(r, &checkout, placed)?;
                if order.state != OrderState::Failed {
                    orders.index_order(&order);
                }
                if orders.orders.insert(placed.id.clone(), order).is_some() {
                    return Err(CodecError("an order appears twice"));
                }
            }
            if orders.payments.insert(checkout.payment_id.clone(), checkout.id.clone()).is_some() {
                return Err(CodecError("a payment appears twice"));
            }
            let id = checkout.id.clone();
            if orders.checkouts.insert(id.clone(), Checkout { txn, checkout, state: checkout_state }).is_some() {
                return Err(CodecError("a checkout appears twice"));
            }
            orders.reschedule(&id);
        }
        for _ in 0..r.len()? {
            let refund = Refund {
                id: id(r)?,
                order_id: id(r)?,
                amount: r.varint()?,
                lines: line_units(r)?,
                transfer_id: id(r)?,
                created_ms: r.varint()?,
            };
            let listed = orders.orders.get(&refund.order_id).is_some_and(|o| o.refunds.contains(&refund.id));
            if !listed || Id::parse(&format!("_{}", refund.id)).as_ref() != Some(&refund.transfer_id) {
                return Err(CodecError("a refund its order does not list, or of another transfer"));
            }
            if orders.refunds.insert(refund.id.clone(), refund).is_some() {
                return Err(CodecError("a refund appears twice"));
            }
        }
        for _ in 0..r.len()? {
            let (txn, checkout_id, forget_at_ms) = (r.u64()?, id(r)?, r.varint()?);
            if orders.fences.insert((txn, checkout_id.clone()), forget_at_ms).is_some() {
                return Err(CodecError("a fence appears twice"));
            }
            orders.fence_forgets.insert((forget_at_ms, txn, checkout_id));
        }
        if format >= 2 {
            for _ in 0..r.len()? {
                let (txn, state) = (r.u64()?, state(r, &SETTLEMENT_STATES)?);
                let settlement = new_settlement(r)?;
                let known = settlement.lines.iter().all(|l| orders.orders.contains_key(&l.order_id));
                let held = settlement.lines.iter().any(|l| orders.settlements.of_order.contains_key(&l.order_id));
                if settlement.validate().is_err() || !known || (state != SettlementState::Failed && held) {
                    return Err(CodecError("an invalid settlement, or one of unknown or twice settled orders"));
                }
                if orders.settlements.by_id.contains_key(&settlement.id) {
                    return Err(CodecError("a settlement appears twice"));
                }
                orders.settlements.insert(Settlement { txn, settlement, state });
            }
        }
        let listed_refunds: usize = orders.orders.values().map(|o| o.refunds.len()).sum();
        if listed_refunds != orders.refunds.len() {
            return Err(CodecError("an order lists a refund twice or one that is missing"));
        }
        let order_ids: Vec<Id> = orders.orders.keys().cloned().collect();
        for order_id in &order_ids {
            orders.note_settleable(order_id);
        }
        if orders.orders.keys().any(|id| orders.order_problem(id).is_some()) {
            return Err(CodecError("an order breaks an invariant"));
        }
        Ok(orders)
    }
}
