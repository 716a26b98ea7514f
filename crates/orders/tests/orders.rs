//! Property tests of the orders part over random command sequences on a few
//! checkouts: the invariants hold after every command, `plan` and `apply`
//! agree (and the effects planned add up to the amounts recorded), a refusal
//! changes nothing, terminal payment states never move, every command's
//! encoding round-trips, and so does the checkpoint, byte for byte.

use std::collections::HashMap;

use peakstack_domain::wire::{Reader, Writer};
use peakstack_domain::{Currency, Id};
use peakstack_orders::{
    decode_command, encode_command, order_transfer_id, CaptureMode, Command, LedgerEffect, NewCheckout, NewOrder,
    OrderLine, Orders, PaymentState, RefundRequest,
};
use proptest::prelude::*;

const SLOTS: u64 = 4;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

/// (quantity, unit price, discount) per line, lines per order, orders per checkout.
type Shape = Vec<Vec<(u32, u64, u64)>>;

fn checkout(slot: u64, manual: bool, shape: &Shape) -> NewCheckout {
    let orders = shape
        .iter()
        .enumerate()
        .map(|(i, lines)| {
            let order_id = id(&format!("ord_1_{}", slot * 10 + i as u64));
            let lines: Vec<OrderLine> = lines
                .iter()
                .enumerate()
                .map(|(l, &(quantity, unit_price, discount))| {
                    let subtotal = unit_price * u64::from(quantity);
                    let discount = discount.min(subtotal);
                    OrderLine {
                        line_id: l as u32 + 1,
                        sku_id: id(&format!("sku{l}")),
                        quantity,
                        unit_price,
                        subtotal,
                        discounts: vec![(id("promo"), discount)],
                        total: subtotal - discount,
                    }
                })
                .collect();
            NewOrder {
                total: lines.iter().map(|l| l.total).sum(),
                transfer_id: order_transfer_id(&order_id),
                id: order_id,
                merchant_id: id(&format!("m{i}")),
                lines,
                settle_account_id: id(&format!("settle.m{i}")),
            }
        })
        .collect();
    NewCheckout {
        id: id(&format!("chk_1_{slot}")),
        buyer_id: id(&format!("b{}", slot % 2)),
        account_id: id("wallet"),
        currency: Currency::parse("EUR").unwrap(),
        capture: if manual { CaptureMode::Manual } else { CaptureMode::Automatic },
        payment_id: id(&format!("pay_1_{slot}")),
        coupon_ids: vec![id("cpn_1_1")],
        orders,
        created_ms: slot,
        authorization_expires_ms: 5_000 + slot * 3_000,
        consumed_promotions: Vec::new(),
    }
}

#[derive(Clone, Debug)]
enum Step {
    Try { slot: u64, other_txn: bool },
    Confirm { slot: u64, other_txn: bool },
    CancelPlace { slot: u64 },
    Capture { slot: u64, amount: Option<u64> },
    CancelPayment { slot: u64 },
    CancelOrder { slot: u64, part: u64 },
    RefundAmount { slot: u64, part: u64, refund: u64, amount: u64 },
    RefundLines { slot: u64, part: u64, refund: u64, lines: Vec<(u32, u32)> },
    Expire { slot: u64 },
    Advance { ms: u64 },
    Due,
    Checkpoint,
}

fn step() -> impl Strategy<Value = Step> {
    let slot = 0..SLOTS;
    prop_oneof![
        3 => (slot.clone(), prop::bool::weighted(0.1)).prop_map(|(slot, other_txn)| Step::Try { slot, other_txn }),
        3 => (slot.clone(), prop::bool::weighted(0.1)).prop_map(|(slot, other_txn)| Step::Confirm { slot, other_txn }),
        1 => slot.clone().prop_map(|slot| Step::CancelPlace { slot }),
        3 => (slot.clone(), prop::option::weighted(0.7, 0u64..2_500)).prop_map(|(slot, amount)| Step::Capture { slot, amount }),
        1 => slot.clone().prop_map(|slot| Step::CancelPayment { slot }),
        1 => (slot.clone(), 0u64..3).prop_map(|(slot, part)| Step::CancelOrder { slot, part }),
        3 => (slot.clone(), 0u64..3, 0u64..8, 0u64..800)
            .prop_map(|(slot, part, refund, amount)| Step::RefundAmount { slot, part, refund, amount }),
        3 => (slot.clone(), 0u64..3, 0u64..8, prop::collection::vec((0u32..4, 0u32..4), 0..3))
            .prop_map(|(slot, part, refund, lines)| Step::RefundLines { slot, part, refund, lines }),
        1 => slot.prop_map(|slot| Step::Expire { slot }),
        2 => (1u64..4_000).prop_map(|ms| Step::Advance { ms }),
        2 => Just(Step::Due),
        1 => Just(Step::Checkpoint),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    prop::collection::vec(prop::collection::vec((1u32..6, 0u64..400, 0u64..150), 1..4), 1..4)
}

fn command_of(step: &Step, fixtures: &[NewCheckout]) -> Option<Command> {
    let order_id = |slot: u64, part: u64| id(&format!("ord_1_{}", slot * 10 + part));
    let refund_id = |refund: u64| id(&format!("rfd_1_{}", 100 + refund));
    Some(match step.clone() {
        Step::Try { slot, other_txn } => Command::TryPlace {
            txn: slot + 1 + u64::from(other_txn) * 100,
            checkout: Box::new(fixtures[slot as usize].clone()),
        },
        Step::Confirm { slot, other_txn } => Command::ConfirmPlace {
            txn: slot + 1 + u64::from(other_txn) * 100,
            checkout_id: fixtures[slot as usize].id.clone(),
        },
        Step::CancelPlace { slot } => {
            Command::CancelPlace { txn: slot + 1, checkout_id: fixtures[slot as usize].id.clone() }
        }
        Step::Capture { slot, amount } => {
            Command::Capture { payment_id: fixtures[slot as usize].payment_id.clone(), amount }
        }
        Step::CancelPayment { slot } => {
            Command::CancelPayment { payment_id: fixtures[slot as usize].payment_id.clone() }
        }
        Step::CancelOrder { slot, part } => Command::CancelOrder { order_id: order_id(slot, part) },
        Step::RefundAmount { slot, part, refund, amount } => Command::Refund {
            refund_id: refund_id(refund),
            order_id: order_id(slot, part),
            request: RefundRequest::Amount(amount),
        },
        Step::RefundLines { slot, part, refund, lines } => Command::Refund {
            refund_id: refund_id(refund),
            order_id: order_id(slot, part),
            request: RefundRequest::Lines(lines),
        },
        Step::Expire { slot } => Command::Expire { payments: vec![fixtures[slot as usize].payment_id.clone()] },
        Step::Advance { .. } | Step::Due | Step::Checkpoint => return None,
    })
}

fn checkpoint(orders: &Orders) -> Vec<u8> {
    let mut w = Writer::default();
    orders.encode_checkpoint(&mut w);
    w.buf
}

fn command_round_trips(command: &Command) -> Result<(), TestCaseError> {
    let mut w = Writer::default();
    encode_command(command, &mut w);
    let mut r = Reader::new(&w.buf);
    let back = decode_command(&mut r).map_err(|e| TestCaseError::fail(format!("{command:?}: {e}")))?;
    prop_assert!(r.is_empty());
    prop_assert_eq!(&back, command);
    let mut again = Writer::default();
    encode_command(&back, &mut again);
    prop_assert_eq!(again.buf, w.buf);
    Ok(())
}

/// What the ledger was asked to do, per order.
#[derive(Default, Debug)]
struct Booked {
    posted: u64,
    /// Posts and voids of the order's pending transfer (at most one).
    finished_pending: u32,
    moved: u64,
}

/// Plans and applies one command, checking they agree and what a refusal leaves.
fn run(
    orders: &mut Orders,
    command: &Command,
    now_ms: u64,
    booked: &mut HashMap<Id, Booked>,
) -> Result<(), TestCaseError> {
    command_round_trips(command)?;
    let before = checkpoint(orders);
    let plan = orders.plan(command, now_ms);
    prop_assert_eq!(&checkpoint(orders), &before, "plan changed state");
    let (changed, reply) = orders.apply(command, now_ms);
    prop_assert_eq!(plan.as_ref().map(|_| ()).map_err(|e| *e), reply, "plan and apply disagree on {:?}", command);
    match plan {
        Err(_) => prop_assert!(!changed && checkpoint(orders) == before, "a refusal changed state: {command:?}"),
        Ok(effects) => {
            prop_assert!(effects.is_empty() || changed, "effects without a change: {command:?}");
            if !changed {
                prop_assert_eq!(&checkpoint(orders), &before);
            }
            for effect in effects {
                match effect {
                    LedgerEffect::Post { id, amount, .. } => {
                        let order = id.as_str().strip_prefix("_cap.").expect("a capture id");
                        let entry = booked.entry(Id::parse(order).unwrap()).or_default();
                        entry.posted += amount;
                        entry.finished_pending += 1;
                    }
                    LedgerEffect::Void { id, .. } => {
                        let order = id.as_str().strip_prefix("_void.").expect("a void id");
                        booked.entry(Id::parse(order).unwrap()).or_default().finished_pending += 1;
                    }
                    LedgerEffect::Move { amount, .. } => {
                        let Command::Refund { order_id, .. } = command else { panic!("a move of {command:?}") };
                        prop_assert!(amount > 0);
                        booked.entry(order_id.clone()).or_default().moved += amount;
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_invariants(
    orders: &Orders,
    fixtures: &[NewCheckout],
    booked: &HashMap<Id, Booked>,
    last_states: &mut HashMap<Id, PaymentState>,
) -> Result<(), TestCaseError> {
    orders.assert_invariants();
    for fixture in fixtures {
        let Some(payment) = orders.payment(&fixture.payment_id) else { continue };
        let mut sums = (0u64, 0u64, 0u64);
        for (part, placed) in payment.parts.iter().zip(&fixture.orders) {
            let order = orders.order(&placed.id).unwrap();
            prop_assert!(order.amount_refunded <= order.amount_captured);
            prop_assert!(order.amount_captured <= order.amount_authorized);
            prop_assert!(order.amount_authorized <= placed.total);
            for (units, line) in order.refunded_units.iter().zip(&placed.lines) {
                prop_assert!(*units <= line.quantity);
            }
            let refunds: u64 = order.refunds.iter().map(|r| orders.refund(r).unwrap().amount).sum();
            prop_assert_eq!(refunds, order.amount_refunded);
            let book = booked.get(&placed.id);
            prop_assert!(book.is_none_or(|b| b.finished_pending <= 1), "a pending transfer finished twice");
            prop_assert_eq!(book.map_or(0, |b| b.moved), order.amount_refunded, "refund moves");
            if fixture.capture == CaptureMode::Manual {
                prop_assert_eq!(book.map_or(0, |b| b.posted), order.amount_captured, "capture posts");
            }
            if let Some(last) = last_states.insert(placed.id.clone(), part.state) {
                let terminal = matches!(
                    last,
                    PaymentState::Canceled | PaymentState::Expired | PaymentState::Failed | PaymentState::Settled
                );
                prop_assert!(!terminal || last == part.state, "terminal {last:?} became {:?}", part.state);
                prop_assert!(last != PaymentState::Captured || part.state == last, "captured went back");
            }
            sums = (sums.0 + part.amount_authorized, sums.1 + part.amount_captured, sums.2 + part.amount_refunded);
        }
        prop_assert_eq!(sums, (payment.amount_authorized, payment.amount_captured, payment.amount_refunded));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_keep_every_invariant(
        shapes in prop::collection::vec((any::<bool>(), shape()), SLOTS as usize),
        placed_first in prop::collection::vec(prop::bool::weighted(0.7), SLOTS as usize),
        steps in prop::collection::vec(step(), 1..100),
    ) {
        let fixtures: Vec<NewCheckout> =
            shapes.iter().enumerate().map(|(slot, (manual, shape))| checkout(slot as u64, *manual, shape)).collect();
        let mut orders = Orders::new();
        let mut booked: HashMap<Id, Booked> = HashMap::new();
        let mut last_states: HashMap<Id, PaymentState> = HashMap::new();
        let mut now_ms = 0u64;
        // Most checkouts start placed, so that captures and refunds get far.
        let placed: Vec<Step> = (0..SLOTS)
            .filter(|slot| placed_first[*slot as usize])
            .flat_map(|slot| [Step::Try { slot, other_txn: false }, Step::Confirm { slot, other_txn: false }])
            .collect();
        for step in placed.iter().chain(&steps) {
            match step {
                Step::Advance { ms } => now_ms += ms,
                Step::Due => {
                    for command in orders.due(now_ms) {
                        let (changed, reply) = orders.clone().apply(&command, now_ms);
                        prop_assert!(changed && reply.is_ok(), "a due command does something: {:?}", command);
                        run(&mut orders, &command, now_ms, &mut booked)?;
                    }
                    prop_assert!(orders.due(now_ms).is_empty(), "what was due is done");
                }
                Step::Checkpoint => {
                    let bytes = checkpoint(&orders);
                    let back = Orders::decode_checkpoint(&mut Reader::new(&bytes))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&checkpoint(&back), &bytes);
                    prop_assert_eq!(&back, &orders);
                    orders = back;
                }
                _ => {
                    let command = command_of(step, &fixtures).expect("a command step");
                    run(&mut orders, &command, now_ms, &mut booked)?;
                }
            }
            check_invariants(&orders, &fixtures, &booked, &mut last_states)?;
        }
        // Whatever happened, the state reads back byte for byte.
        let bytes = checkpoint(&orders);
        let back = Orders::decode_checkpoint(&mut Reader::new(&bytes)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(checkpoint(&back), bytes);
    }

    /// A line refunded in any steps gives back exactly its total.
    #[test]
    fn line_refunds_sum_to_the_line_total(
        quantity in 1u32..40,
        unit_price in 0u64..1_000_000,
        discount in 0u64..1_000_000,
        cuts in prop::collection::vec(1u32..40, 0..40),
    ) {
        let fixture = checkout(0, false, &vec![vec![(quantity, unit_price, discount)]]);
        let total = fixture.orders[0].total;
        let mut orders = Orders::new();
        let mut booked = HashMap::new();
        run(&mut orders, &Command::TryPlace { txn: 1, checkout: Box::new(fixture.clone()) }, 0, &mut booked)?;
        run(&mut orders, &Command::ConfirmPlace { txn: 1, checkout_id: fixture.id.clone() }, 0, &mut booked)?;
        let order_id = fixture.orders[0].id.clone();
        let mut left = quantity;
        for (n, units) in cuts.iter().copied().chain(std::iter::once(quantity)).enumerate() {
            let units = units.min(left);
            if units == 0 {
                break;
            }
            let request = RefundRequest::Lines(vec![(1, units)]);
            let command = Command::Refund { refund_id: id(&format!("rfd_1_{n}")), order_id: order_id.clone(), request };
            run(&mut orders, &command, 1, &mut booked)?;
            prop_assert_eq!(orders.refund(&id(&format!("rfd_1_{n}"))).map(|r| r.lines.clone()), Some(vec![(1, units)]));
            left -= units;
        }
        let order = orders.order(&order_id).unwrap();
        prop_assert_eq!(order.amount_refunded, total);
        prop_assert_eq!(order.refunded_units.clone(), vec![quantity]);
        prop_assert_eq!(order.state, peakstack_orders::OrderState::Refunded);
    }
}
