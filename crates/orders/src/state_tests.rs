//! The orders part through its command interface: every flow, every code,
//! and that a refused command leaves the state byte for byte as it was.

use peakstack_domain::wire::{Reader, Writer};
use peakstack_domain::{Currency, ErrorCode, Id};

use crate::decide::{capture_transfer_id, order_transfer_id, refund_transfer_id, void_transfer_id};
use crate::model::{
    CaptureMode, CheckoutState, LedgerEffect, NewCheckout, NewOrder, OrderLine, OrderState, PaymentState, RefundRequest,
};
use crate::state::{Command, Orders, FENCE_RETENTION_MS};

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// A line of `quantity` units at `unit_price` with `discount` off.
fn line(line_id: u32, quantity: u32, unit_price: u64, discount: u64) -> OrderLine {
    let subtotal = unit_price * u64::from(quantity);
    let discounts = if discount > 0 { vec![(id("promo1"), discount)] } else { Vec::new() };
    OrderLine {
        line_id,
        sku_id: id(&format!("sku{line_id}")),
        quantity,
        unit_price,
        subtotal,
        discounts,
        total: subtotal - discount,
    }
}

/// Checkout `n` of buyer b1, one order per entry of `orders` (merchant `m<i>`),
/// each a list of (quantity, unit_price, discount); its ids are `chk_1_<n>`,
/// `pay_1_<n>` and `ord_1_<10n+i>`. Authorization expires at 1000 ms.
fn checkout(n: u64, capture: CaptureMode, orders: &[&[(u32, u64, u64)]]) -> NewCheckout {
    let orders = orders
        .iter()
        .enumerate()
        .map(|(i, lines)| {
            let order_id = id(&format!("ord_1_{}", n * 10 + i as u64));
            let lines: Vec<OrderLine> =
                lines.iter().enumerate().map(|(l, (q, p, d))| line(l as u32 + 1, *q, *p, *d)).collect();
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
        id: id(&format!("chk_1_{n}")),
        buyer_id: id("b1"),
        account_id: id("wallet.b1"),
        currency: usd(),
        capture,
        payment_id: id(&format!("pay_1_{n}")),
        coupon_ids: Vec::new(),
        orders,
        created_ms: 0,
        authorization_expires_ms: 1_000,
        consumed_promotions: Vec::new(),
    }
}

fn try_place(txn: u64, checkout: &NewCheckout) -> Command {
    Command::TryPlace { txn, checkout: Box::new(checkout.clone()) }
}

fn confirm(txn: u64, n: u64) -> Command {
    Command::ConfirmPlace { txn, checkout_id: id(&format!("chk_1_{n}")) }
}

fn cancel_place(txn: u64, n: u64) -> Command {
    Command::CancelPlace { txn, checkout_id: id(&format!("chk_1_{n}")) }
}

fn capture(n: u64, amount: Option<u64>) -> Command {
    Command::Capture { payment_id: id(&format!("pay_1_{n}")), amount }
}

fn cancel_payment(n: u64) -> Command {
    Command::CancelPayment { payment_id: id(&format!("pay_1_{n}")) }
}

fn refund(refund: &str, order: &str, request: RefundRequest) -> Command {
    Command::Refund { refund_id: id(refund), order_id: id(order), request }
}

fn post(order: &str, amount: u64) -> LedgerEffect {
    let order = id(order);
    LedgerEffect::Post { id: capture_transfer_id(&order), pending_id: order_transfer_id(&order), amount }
}

fn void(order: &str) -> LedgerEffect {
    let order = id(order);
    LedgerEffect::Void { id: void_transfer_id(&order), pending_id: order_transfer_id(&order) }
}

fn moved(refund_id: &str, merchant: usize, amount: u64) -> LedgerEffect {
    LedgerEffect::Move {
        id: refund_transfer_id(&id(refund_id)),
        debit_account_id: id(&format!("settle.m{merchant}")),
        credit_account_id: id("wallet.b1"),
        amount,
        currency: usd(),
    }
}

fn checkpoint(orders: &Orders) -> Vec<u8> {
    let mut w = Writer::default();
    orders.encode_checkpoint(&mut w);
    w.buf
}

/// Plans and applies `command` at `now_ms`: the plan is `expected`, apply
/// agrees, a refusal leaves the checkpoint's bytes as they were, and every
/// invariant holds after. Returns whether the state changed.
fn check(orders: &mut Orders, command: Command, now_ms: u64, expected: Result<Vec<LedgerEffect>, ErrorCode>) -> bool {
    let before = checkpoint(orders);
    assert_eq!(orders.plan(&command, now_ms), expected, "plan of {command:?}");
    assert_eq!(checkpoint(orders), before, "plan changed state: {command:?}");
    let (changed, reply) = orders.apply(&command, now_ms);
    assert_eq!(reply, expected.map(|_| ()), "apply of {command:?}");
    if reply.is_err() || !changed {
        assert_eq!(checkpoint(orders), before, "a refusal or repeat changed state: {command:?}");
    }
    orders.assert_invariants();
    changed
}

fn ok() -> Result<Vec<LedgerEffect>, ErrorCode> {
    Ok(Vec::new())
}

fn order_state(orders: &Orders, order: &str) -> (OrderState, PaymentState) {
    let order = orders.order(&id(order)).unwrap();
    (order.state, order.payment_state)
}

/// Checkout `n` placed and confirmed by transaction `n`.
fn placed(orders: &mut Orders, n: u64, capture: CaptureMode, lines: &[&[(u32, u64, u64)]]) {
    let new = checkout(n, capture, lines);
    assert!(check(orders, try_place(n, &new), 0, ok()));
    assert!(check(orders, confirm(n, n), 0, ok()));
}

#[test]
fn place_confirm_and_capture_under_manual_capture() {
    let mut orders = Orders::new();
    let new = checkout(1, CaptureMode::Manual, &[&[(2, 500, 100)], &[(1, 300, 0)]]);
    assert!(check(&mut orders, try_place(7, &new), 0, ok()));
    assert!(!check(&mut orders, try_place(7, &new), 5, ok()), "a repeated try changes nothing");
    check(&mut orders, try_place(8, &new), 5, Err(ErrorCode::ExistsWithDifferentFields));
    let mut other = new.clone();
    other.created_ms = 1;
    check(&mut orders, try_place(7, &other), 5, Err(ErrorCode::ExistsWithDifferentFields));
    assert_eq!(orders.checkout(&new.id).unwrap().state, CheckoutState::Pending);
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().state, PaymentState::Pending);
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Pending, PaymentState::Pending));
    check(&mut orders, capture(1, None), 5, Err(ErrorCode::InvalidState));
    check(&mut orders, cancel_payment(1), 5, Err(ErrorCode::InvalidState));
    check(&mut orders, confirm(8, 1), 5, Err(ErrorCode::TransactionNotFound));
    check(&mut orders, confirm(7, 2), 5, Err(ErrorCode::TransactionNotFound));

    assert!(check(&mut orders, confirm(7, 1), 10, ok()));
    assert!(!check(&mut orders, confirm(7, 1), 11, ok()));
    assert_eq!(orders.checkout(&new.id).unwrap().state, CheckoutState::Completed);
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Authorized, PaymentState::RequiresCapture));
    let payment = orders.payment(&id("pay_1_1")).unwrap();
    assert_eq!(payment.state, PaymentState::RequiresCapture);
    assert_eq!((payment.amount_authorized, payment.amount_captured), (1_200, 0));
    assert_eq!(payment.parts.iter().map(|p| p.amount_authorized).collect::<Vec<_>>(), [900, 300]);
    check(&mut orders, cancel_place(7, 1), 12, Err(ErrorCode::InvalidState));

    let effects = vec![post("ord_1_10", 900), post("ord_1_11", 300)];
    assert!(check(&mut orders, capture(1, None), 20, Ok(effects)));
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Paid, PaymentState::Captured));
    let payment = orders.payment(&id("pay_1_1")).unwrap();
    assert_eq!((payment.state, payment.amount_captured), (PaymentState::Captured, 1_200));
    assert_eq!(orders.order(&id("ord_1_10")).unwrap().updated_ms, 20);
}

#[test]
fn place_and_confirm_under_automatic_capture_pays_at_once() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Automatic, &[&[(3, 100, 0)]]);
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Paid, PaymentState::Captured));
    let order = orders.order(&id("ord_1_10")).unwrap();
    assert_eq!((order.amount_authorized, order.amount_captured), (300, 300));
    assert!(orders.due(u64::MAX - FENCE_RETENTION_MS).is_empty(), "nothing to expire");
    assert!(!check(&mut orders, capture(1, None), 1, ok()), "already captured");
    check(&mut orders, cancel_payment(1), 1, Err(ErrorCode::InvalidState));
    check(&mut orders, Command::CancelOrder { order_id: id("ord_1_10") }, 1, Err(ErrorCode::InvalidState));
    check(
        &mut orders,
        refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(300)),
        2,
        Ok(vec![moved("rfd_1_1", 0, 300)]),
    );
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Refunded, PaymentState::Captured));
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().amount_refunded, 300);
}

#[test]
fn a_cancelled_place_fails_and_stays_readable() {
    let mut orders = Orders::new();
    let new = checkout(1, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    assert!(check(&mut orders, try_place(1, &new), 0, ok()));
    assert!(check(&mut orders, cancel_place(1, 1), 1, ok()));
    assert!(!check(&mut orders, cancel_place(1, 1), 2, ok()));
    assert_eq!(orders.checkout(&new.id).unwrap().state, CheckoutState::Failed);
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Failed, PaymentState::Failed));
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().state, PaymentState::Failed);
    check(&mut orders, confirm(1, 1), 3, Err(ErrorCode::BranchCancelled));
    check(&mut orders, try_place(1, &new), 3, Err(ErrorCode::BranchCancelled));
    // Another transaction's cancel of the same checkout id touches nothing.
    assert!(!check(&mut orders, cancel_place(2, 1), 3, ok()));
    assert!(!orders.is_fenced(2, &new.id));
    check(&mut orders, capture(1, None), 3, Err(ErrorCode::InvalidState));
    check(&mut orders, cancel_payment(1), 3, Err(ErrorCode::InvalidState));
    check(&mut orders, refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(1)), 3, Err(ErrorCode::InvalidState));
}

#[test]
fn a_cancel_before_its_try_fences_the_late_try_until_its_retention() {
    let mut orders = Orders::new();
    let new = checkout(1, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    assert!(check(&mut orders, cancel_place(4, 1), 100, ok()));
    assert!(!check(&mut orders, cancel_place(4, 1), 101, ok()));
    assert!(orders.is_fenced(4, &new.id));
    check(&mut orders, try_place(4, &new), 102, Err(ErrorCode::BranchCancelled));
    check(&mut orders, confirm(4, 1), 102, Err(ErrorCode::BranchCancelled));
    assert!(orders.checkout(&new.id).is_none(), "nothing hangs");
    assert!(orders.due(100 + FENCE_RETENTION_MS - 1).is_empty());
    let due = orders.due(100 + FENCE_RETENTION_MS);
    assert_eq!(due, vec![Command::ForgetFences { fences: vec![(4, new.id.clone())] }]);
    // Early, the same command forgets nothing.
    assert!(!check(&mut orders, due[0].clone(), 100 + FENCE_RETENTION_MS - 1, ok()));
    assert!(check(&mut orders, due[0].clone(), 100 + FENCE_RETENTION_MS, ok()));
    assert!(!orders.is_fenced(4, &new.id));
    // Another transaction may place the id.
    assert!(check(&mut orders, try_place(5, &new), 200 + FENCE_RETENTION_MS, ok()));
}

#[test]
fn capture_twice_captures_once() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 1_000, 0)]]);
    assert!(check(&mut orders, capture(1, Some(400)), 1, Ok(vec![post("ord_1_10", 400)])));
    assert!(!check(&mut orders, capture(1, Some(400)), 2, ok()));
    assert!(!check(&mut orders, capture(1, None), 2, ok()));
    let order = orders.order(&id("ord_1_10")).unwrap();
    assert_eq!((order.amount_authorized, order.amount_captured), (1_000, 400));
    check(&mut orders, capture(1, Some(0)), 2, Err(ErrorCode::InvalidRequest));
    check(&mut orders, capture(9, None), 2, Err(ErrorCode::PaymentNotFound));
}

#[test]
fn capture_then_cancel_and_cancel_then_capture_are_refused() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 1_000, 0)]]);
    placed(&mut orders, 2, CaptureMode::Manual, &[&[(1, 1_000, 0)], &[(1, 500, 0)]]);
    assert!(check(&mut orders, capture(1, None), 1, Ok(vec![post("ord_1_10", 1_000)])));
    check(&mut orders, cancel_payment(1), 2, Err(ErrorCode::InvalidState));
    assert!(check(&mut orders, cancel_payment(2), 3, Ok(vec![void("ord_1_20"), void("ord_1_21")])));
    assert!(!check(&mut orders, cancel_payment(2), 4, ok()), "already canceled");
    check(&mut orders, capture(2, None), 4, Err(ErrorCode::InvalidState));
    assert_eq!(order_state(&orders, "ord_1_21"), (OrderState::Canceled, PaymentState::Canceled));
    assert_eq!(orders.payment(&id("pay_1_2")).unwrap().state, PaymentState::Canceled);
    check(&mut orders, cancel_payment(9), 4, Err(ErrorCode::PaymentNotFound));
}

#[test]
fn an_order_cancelled_before_capture_is_left_out_of_it() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 100, 0)], &[(1, 200, 0)]]);
    let cancel = Command::CancelOrder { order_id: id("ord_1_10") };
    assert!(check(&mut orders, cancel.clone(), 1, Ok(vec![void("ord_1_10")])));
    assert!(!check(&mut orders, cancel, 2, ok()));
    check(&mut orders, Command::CancelOrder { order_id: id("ord_9_9") }, 2, Err(ErrorCode::OrderNotFound));
    check(&mut orders, capture(1, Some(201)), 3, Err(ErrorCode::AmountExceedsAuthorized));
    assert!(check(&mut orders, capture(1, None), 3, Ok(vec![post("ord_1_11", 200)])));
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().state, PaymentState::Captured);
    assert!(!check(&mut orders, capture(1, None), 4, ok()));
    let paid = Command::CancelOrder { order_id: id("ord_1_11") };
    check(&mut orders, paid, 4, Err(ErrorCode::InvalidState));
    // The last part awaiting capture is gone: nothing left to expire.
    assert!(orders.due(1_000).is_empty());
}

#[test]
fn a_partial_capture_splits_exactly_by_largest_remainder() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 100, 0)], &[(1, 200, 0)], &[(1, 300, 0)]]);
    check(&mut orders, capture(1, Some(601)), 1, Err(ErrorCode::AmountExceedsAuthorized));
    // 100/600 of 100 is 16.67, 200/600 is 33.33, 300/600 is 50: the unit left goes to the largest remainder.
    let effects = vec![post("ord_1_10", 17), post("ord_1_11", 33), post("ord_1_12", 50)];
    assert!(check(&mut orders, capture(1, Some(100)), 1, Ok(effects)));
    let payment = orders.payment(&id("pay_1_1")).unwrap();
    assert_eq!(payment.amount_captured, 100);
    assert_eq!(payment.parts.iter().map(|p| p.amount_captured).collect::<Vec<_>>(), [17, 33, 50]);

    // A part whose share is 0 is voided instead and canceled; ties go to the earlier part.
    placed(&mut orders, 2, CaptureMode::Manual, &[&[(1, 1, 0)], &[(1, 1, 0)], &[(1, 1, 0)]]);
    let effects = vec![post("ord_1_20", 1), post("ord_1_21", 1), void("ord_1_22")];
    assert!(check(&mut orders, capture(2, Some(2)), 1, Ok(effects)));
    assert_eq!(order_state(&orders, "ord_1_22"), (OrderState::Canceled, PaymentState::Canceled));
    assert_eq!(orders.payment(&id("pay_1_2")).unwrap().state, PaymentState::Captured);
}

#[test]
fn refunds_never_exceed_what_was_captured() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(2, 500, 0)]]);
    check(&mut orders, refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(1)), 1, Err(ErrorCode::InvalidState));
    check(&mut orders, capture(1, Some(700)), 1, Ok(vec![post("ord_1_10", 700)]));
    check(&mut orders, refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(0)), 2, Err(ErrorCode::InvalidRequest));
    check(
        &mut orders,
        refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(701)),
        2,
        Err(ErrorCode::RefundExceedsCaptured),
    );
    check(&mut orders, refund("rfd_1_1", "ord_9_9", RefundRequest::Amount(1)), 2, Err(ErrorCode::OrderNotFound));
    check(
        &mut orders,
        refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(400)),
        2,
        Ok(vec![moved("rfd_1_1", 0, 400)]),
    );
    check(
        &mut orders,
        refund("rfd_1_2", "ord_1_10", RefundRequest::Amount(301)),
        3,
        Err(ErrorCode::RefundExceedsCaptured),
    );
    // Both units give back 1000, more than the 300 left of the partial capture.
    let both = RefundRequest::Lines(vec![(1, 2)]);
    check(&mut orders, refund("rfd_1_2", "ord_1_10", both), 3, Err(ErrorCode::RefundExceedsCaptured));
    check(
        &mut orders,
        refund("rfd_1_2", "ord_1_10", RefundRequest::Amount(300)),
        3,
        Ok(vec![moved("rfd_1_2", 0, 300)]),
    );
    let order = orders.order(&id("ord_1_10")).unwrap();
    assert_eq!((order.state, order.amount_refunded), (OrderState::Refunded, 700));
    assert_eq!(order.refunds, [id("rfd_1_1"), id("rfd_1_2")]);
    check(&mut orders, refund("rfd_1_3", "ord_1_10", RefundRequest::Amount(1)), 4, Err(ErrorCode::InvalidState));
    let long_refund_id = "r".repeat(peakstack_domain::MAX_ID_LEN);
    placed(&mut orders, 2, CaptureMode::Automatic, &[&[(1, 5, 0)]]);
    let too_long = refund(&long_refund_id, "ord_1_20", RefundRequest::Amount(1));
    check(&mut orders, too_long, 5, Err(ErrorCode::InvalidRequest));
}

#[test]
fn line_refunds_in_any_unit_steps_give_back_exactly_the_line_total() {
    // 7 units at 150 with 50 off: a total of 1000 that 7 does not divide.
    for steps in [vec![7u32], vec![1, 1, 1, 1, 1, 1, 1], vec![1, 2, 3, 1], vec![3, 4], vec![6, 1], vec![2, 2, 2, 1]] {
        let mut orders = Orders::new();
        placed(&mut orders, 1, CaptureMode::Automatic, &[&[(7, 150, 50), (3, 10, 0)]]);
        let mut given = 0u64;
        for (n, units) in steps.iter().enumerate() {
            let refund_id = format!("rfd_1_{n}");
            let before = orders.order(&id("ord_1_10")).unwrap().amount_refunded;
            let command = refund(&refund_id, "ord_1_10", RefundRequest::Lines(vec![(1, *units)]));
            let effects = orders.plan(&command, 1).unwrap();
            assert!(check(&mut orders, command, 1, Ok(effects)));
            let after = orders.order(&id("ord_1_10")).unwrap().amount_refunded;
            assert_eq!(orders.refund(&id(&refund_id)).unwrap().amount, after - before);
            given = after;
        }
        assert_eq!(given, 1_000, "steps {steps:?}");
        let order = orders.order(&id("ord_1_10")).unwrap();
        assert_eq!((order.refunded_units.clone(), order.state), (vec![7, 0], OrderState::Paid));
        let more = refund("rfd_1_99", "ord_1_10", RefundRequest::Lines(vec![(1, 1)]));
        check(&mut orders, more, 2, Err(ErrorCode::RefundExceedsCaptured));
        let rest = refund("rfd_1_98", "ord_1_10", RefundRequest::Lines(vec![(2, 3)]));
        check(&mut orders, rest, 2, Ok(vec![moved("rfd_1_98", 0, 30)]));
        assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Refunded, PaymentState::Captured));
    }
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Automatic, &[&[(7, 150, 50), (3, 10, 0)]]);
    for lines in [vec![], vec![(3, 1)], vec![(1, 0)], vec![(1, 1), (1, 1)]] {
        let command = refund("rfd_1_1", "ord_1_10", RefundRequest::Lines(lines));
        check(&mut orders, command, 1, Err(ErrorCode::InvalidRequest));
    }
    let command = refund("rfd_1_1", "ord_1_10", RefundRequest::Lines(vec![(1, 1), (2, 4)]));
    check(&mut orders, command, 1, Err(ErrorCode::RefundExceedsCaptured));
    // floor(1000 * 1 / 7) = 142 and one unit of 10.
    let command = refund("rfd_1_1", "ord_1_10", RefundRequest::Lines(vec![(1, 1), (2, 1)]));
    check(&mut orders, command, 1, Ok(vec![moved("rfd_1_1", 0, 152)]));
    assert_eq!(orders.refund(&id("rfd_1_1")).unwrap().lines, [(1, 1), (2, 1)]);
}

#[test]
fn a_refund_id_that_exists_is_answered_or_refused() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Automatic, &[&[(2, 100, 0)], &[(1, 50, 0)]]);
    let first = refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(200));
    assert!(check(&mut orders, first.clone(), 1, Ok(vec![moved("rfd_1_1", 0, 200)])));
    // Repeated (even once the order is refunded): no effects, unchanged.
    assert!(!check(&mut orders, first, 2, ok()));
    for other in [
        refund("rfd_1_1", "ord_1_10", RefundRequest::Amount(100)),
        refund("rfd_1_1", "ord_1_11", RefundRequest::Amount(200)),
        refund("rfd_1_1", "ord_1_10", RefundRequest::Lines(vec![(1, 2)])),
    ] {
        check(&mut orders, other, 2, Err(ErrorCode::ExistsWithDifferentFields));
    }
    let lines = refund("rfd_1_2", "ord_1_11", RefundRequest::Lines(vec![(1, 1)]));
    assert!(check(&mut orders, lines.clone(), 3, Ok(vec![moved("rfd_1_2", 1, 50)])));
    assert!(!check(&mut orders, lines, 3, ok()));
    let refund_record = orders.refund(&id("rfd_1_1")).unwrap();
    assert_eq!((refund_record.transfer_id.as_str(), refund_record.created_ms), ("_rfd_1_1", 1));
}

#[test]
fn an_authorization_expires_through_due() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 100, 0)], &[(1, 200, 0)]]);
    placed(&mut orders, 2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    check(&mut orders, Command::CancelOrder { order_id: id("ord_1_11") }, 1, Ok(vec![void("ord_1_11")]));
    check(&mut orders, capture(2, None), 1, Ok(vec![post("ord_1_20", 100)]));
    assert!(orders.due(999).is_empty());
    let due = orders.due(1_000);
    assert_eq!(due, vec![Command::Expire { payments: vec![id("pay_1_1")] }]);
    // Before its window passed, an expiry skips it.
    assert!(!check(&mut orders, due[0].clone(), 999, ok()));
    let expire_both = Command::Expire { payments: vec![id("pay_1_1"), id("pay_1_2"), id("pay_1_1"), id("pay_9_9")] };
    assert!(check(&mut orders, expire_both, 1_000, Ok(vec![void("ord_1_10")])));
    assert_eq!(order_state(&orders, "ord_1_10"), (OrderState::Canceled, PaymentState::Expired));
    assert_eq!(order_state(&orders, "ord_1_11"), (OrderState::Canceled, PaymentState::Canceled));
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().state, PaymentState::Canceled);
    assert!(orders.due(u64::MAX - FENCE_RETENTION_MS).is_empty());
    check(&mut orders, capture(1, None), 1_001, Err(ErrorCode::InvalidState));
    assert!(!check(&mut orders, cancel_payment(1), 1_001, ok()), "canceled (one part) counts as canceled");
    placed(&mut orders, 3, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    let due = orders.due(1_000).remove(0);
    check(&mut orders, due, 1_000, Ok(vec![void("ord_1_30")]));
    assert_eq!(orders.payment(&id("pay_1_3")).unwrap().state, PaymentState::Expired);
    check(&mut orders, cancel_payment(3), 1_001, Err(ErrorCode::InvalidState));
    check(&mut orders, capture(3, None), 1_001, Err(ErrorCode::InvalidState));
}

#[test]
fn terminal_payment_states_are_unchanged_by_every_later_command() {
    let mut orders = Orders::new();
    // Failed (1), canceled (2), expired (3), and captured (4) to refund.
    let failed = checkout(1, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    check(&mut orders, try_place(1, &failed), 0, ok());
    check(&mut orders, cancel_place(1, 1), 0, ok());
    placed(&mut orders, 2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    check(&mut orders, cancel_payment(2), 0, Ok(vec![void("ord_1_20")]));
    placed(&mut orders, 3, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    check(&mut orders, Command::Expire { payments: vec![id("pay_1_3")] }, 1_000, Ok(vec![void("ord_1_30")]));
    let terminal =
        [("ord_1_10", PaymentState::Failed), ("ord_1_20", PaymentState::Canceled), ("ord_1_30", PaymentState::Expired)];
    for n in 1..=3u64 {
        let order_id = format!("ord_1_{}", n * 10);
        for command in [
            try_place(n, &checkout(n, CaptureMode::Manual, &[&[(1, 100, 0)]])),
            confirm(n, n),
            cancel_place(n, n),
            capture(n, None),
            capture(n, Some(1)),
            cancel_payment(n),
            Command::CancelOrder { order_id: id(&order_id) },
            refund(&format!("rfd_1_{n}"), &order_id, RefundRequest::Amount(1)),
            refund(&format!("rfd_1_{n}"), &order_id, RefundRequest::Lines(vec![(1, 1)])),
            Command::Expire { payments: vec![id(&format!("pay_1_{n}"))] },
        ] {
            let before = checkpoint(&orders);
            let (changed, _) = orders.apply(&command, 2_000);
            assert!(!changed, "{command:?} changed a terminal payment");
            assert_eq!(checkpoint(&orders), before);
            for (order, state) in terminal {
                assert_eq!(orders.order(&id(order)).unwrap().payment_state, state);
            }
        }
    }
}

#[test]
fn a_refused_try_leaves_everything_as_it_was() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    let mut bad_total = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    bad_total.orders[0].total = 99;
    let mut bad_line = checkout(2, CaptureMode::Manual, &[&[(2, 100, 0)]]);
    bad_line.orders[0].lines[0].subtotal = 100;
    let mut over_discounted = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    over_discounted.orders[0].lines[0].discounts = vec![(id("p"), 101)];
    let mut overflow = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    overflow.orders[0].lines[0].quantity = 2;
    overflow.orders[0].lines[0].unit_price = u64::MAX;
    let mut taken_order = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    taken_order.orders[0].id = id("ord_1_10");
    let mut taken_payment = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    taken_payment.payment_id = id("pay_1_1");
    let mut no_orders = checkout(2, CaptureMode::Manual, &[]);
    no_orders.orders.clear();
    let mut twice = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)], &[(1, 100, 0)]]);
    twice.orders[1].id = twice.orders[0].id.clone();
    let mut long_id = checkout(2, CaptureMode::Manual, &[&[(1, 100, 0)]]);
    long_id.orders[0].id = id(&"o".repeat(crate::model::MAX_ORDER_ID_LEN + 1));
    let big = u64::MAX / 2 + 1;
    let sum_overflow = checkout(2, CaptureMode::Manual, &[&[(1, big, 0)], &[(1, big, 0)]]);
    for (new, code) in [
        (bad_total, ErrorCode::InvalidRequest),
        (bad_line, ErrorCode::InvalidRequest),
        (over_discounted, ErrorCode::InvalidRequest),
        (overflow, ErrorCode::Overflow),
        (taken_order, ErrorCode::ExistsWithDifferentFields),
        (taken_payment, ErrorCode::ExistsWithDifferentFields),
        (no_orders, ErrorCode::InvalidRequest),
        (twice, ErrorCode::InvalidRequest),
        (long_id, ErrorCode::InvalidRequest),
        (sum_overflow, ErrorCode::Overflow),
    ] {
        check(&mut orders, try_place(2, &new), 1, Err(code));
    }
    assert!(orders.checkout(&id("chk_1_2")).is_none());
}

#[test]
fn applied_ids_raise_the_sequence_so_a_replay_assigns_the_same_next() {
    let mut live = Orders::new();
    assert_eq!(live.take_sequence(), 1);
    let commands = [
        try_place(1, &checkout(4, CaptureMode::Automatic, &[&[(1, 100, 0)]])),
        confirm(1, 4),
        refund("rfd_1_57", "ord_1_40", RefundRequest::Amount(1)),
    ];
    for command in &commands {
        assert_eq!(live.apply(command, 0), (true, Ok(())));
    }
    assert_eq!(live.take_sequence(), 58);
    let mut replayed = Orders::new();
    for command in &commands {
        assert_eq!(replayed.apply(command, 0), (true, Ok(())));
    }
    assert_eq!(replayed.take_sequence(), 58);
    // A refused command raises nothing.
    let refused = refund("rfd_1_900", "ord_1_40", RefundRequest::Amount(1_000));
    assert_eq!(replayed.apply(&refused, 0).1, Err(ErrorCode::RefundExceedsCaptured));
    assert_eq!(replayed.take_sequence(), 59);
}

#[test]
fn orders_list_in_sequence_order_by_buyer_and_merchant() {
    let mut orders = Orders::new();
    placed(&mut orders, 0, CaptureMode::Automatic, &[&[(1, 1, 0)], &[(1, 1, 0)]]); // ord_1_0, ord_1_1
    placed(&mut orders, 1, CaptureMode::Automatic, &[&[(1, 1, 0)], &[(1, 1, 0)]]); // ord_1_10, ord_1_11
    let mut other_buyer = checkout(2, CaptureMode::Automatic, &[&[(1, 1, 0)]]); // ord_1_20
    other_buyer.buyer_id = id("b2");
    check(&mut orders, try_place(2, &other_buyer), 0, ok());
    let list = |buyer: Option<&str>, merchant: Option<&str>, after: Option<&str>, limit: usize| -> Vec<String> {
        let (buyer, merchant, after) = (buyer.map(id), merchant.map(id), after.map(id));
        orders
            .orders(buyer.as_ref(), merchant.as_ref(), after.as_ref(), limit)
            .iter()
            .map(|o| o.order.id.to_string())
            .collect()
    };
    assert_eq!(list(None, None, None, 10), ["ord_1_0", "ord_1_1", "ord_1_10", "ord_1_11", "ord_1_20"]);
    assert_eq!(list(Some("b1"), None, None, 10), ["ord_1_0", "ord_1_1", "ord_1_10", "ord_1_11"]);
    assert_eq!(list(Some("b1"), Some("m0"), None, 10), ["ord_1_0", "ord_1_10"]);
    assert_eq!(list(None, Some("m0"), Some("ord_1_0"), 10), ["ord_1_10", "ord_1_20"]);
    assert_eq!(list(None, None, Some("ord_1_1"), 2), ["ord_1_10", "ord_1_11"]);
    assert_eq!(list(Some("b3"), None, None, 10), Vec::<String>::new());
    assert_eq!(list(None, None, None, 0), Vec::<String>::new());
}

#[test]
fn a_checkpoint_reads_back_and_a_newer_format_is_refused() {
    let mut orders = Orders::new();
    placed(&mut orders, 1, CaptureMode::Manual, &[&[(2, 100, 10)], &[(1, 300, 0)]]);
    placed(&mut orders, 2, CaptureMode::Automatic, &[&[(1, 100, 0)]]);
    check(
        &mut orders,
        refund("rfd_1_5", "ord_1_20", RefundRequest::Lines(vec![(1, 1)])),
        1,
        Ok(vec![moved("rfd_1_5", 0, 100)]),
    );
    check(&mut orders, cancel_place(9, 9), 2, ok());
    let bytes = checkpoint(&orders);
    let back = Orders::decode_checkpoint(&mut Reader::new(&bytes)).unwrap();
    assert_eq!(back, orders, "indexes and the expiry schedule are rebuilt");
    assert_eq!(checkpoint(&back), bytes);
    let mut newer = bytes.clone();
    newer[0] = crate::codec::CHECKPOINT_FORMAT + 1;
    let refused = Orders::decode_checkpoint(&mut Reader::new(&newer)).unwrap_err();
    assert!(refused.0.contains("newer"), "{refused}");
    for cut in 0..bytes.len() {
        assert!(Orders::decode_checkpoint(&mut Reader::new(&bytes[..cut])).is_err(), "truncated at {cut}");
    }
}

#[test]
fn one_tick_expires_and_forgets_at_most_max_due_per_tick() {
    use crate::state::MAX_DUE_PER_TICK;
    let mut orders = Orders::new();
    let count = MAX_DUE_PER_TICK as u64 + 6;
    for n in 0..count {
        let mut new = checkout(n, CaptureMode::Manual, &[&[(1, 100, 0)]]);
        new.orders[0].id = id(&format!("ord_2_{n}"));
        assert_eq!(orders.apply(&try_place(n, &new), 0), (true, Ok(())));
        assert_eq!(orders.apply(&confirm(n, n), 0), (true, Ok(())));
        let fence = Command::CancelPlace { txn: n, checkout_id: id(&format!("chk_9_{n}")) };
        assert_eq!(orders.apply(&fence, 0), (true, Ok(())));
    }
    let now_ms = FENCE_RETENTION_MS;
    let due = orders.due(now_ms);
    let [Command::Expire { payments }, Command::ForgetFences { fences }] = due.as_slice() else { panic!("{due:?}") };
    assert_eq!((payments.len(), fences.len()), (MAX_DUE_PER_TICK, MAX_DUE_PER_TICK));
    // A longer list than the bound is cut at the bound too.
    let every: Vec<Id> = (0..count).map(|n| id(&format!("pay_1_{n}"))).collect();
    let effects = orders.plan(&Command::Expire { payments: every.clone() }, now_ms).unwrap();
    assert_eq!(effects.len(), MAX_DUE_PER_TICK);
    for command in &due {
        assert_eq!(orders.apply(command, now_ms), (true, Ok(())));
    }
    let rest = orders.due(now_ms);
    assert!(matches!(rest.as_slice(), [Command::Expire { payments }, Command::ForgetFences { fences }]
        if payments.len() == 6 && fences.len() == 6));
    for command in &rest {
        assert_eq!(orders.apply(command, now_ms), (true, Ok(())));
    }
    assert!(orders.due(now_ms).is_empty());
    orders.assert_invariants();
}

#[test]
fn a_checkout_of_too_many_orders_or_lines_is_refused() {
    let mut orders = Orders::new();
    let one_line: &[(u32, u64, u64)] = &[(1, 1, 0)];
    let too_many_orders = vec![one_line; crate::model::MAX_ORDERS + 1];
    let mut new = checkout(1, CaptureMode::Manual, &too_many_orders);
    check(&mut orders, try_place(1, &new), 0, Err(ErrorCode::InvalidRequest));
    new.orders.pop();
    check(&mut orders, try_place(1, &new), 0, ok());
    let lines = vec![(1u32, 1u64, 0u64); crate::model::MAX_ORDER_LINES + 1];
    // Checkout 1's 16 orders took ord_1_10..ord_1_25.
    let mut new = checkout(5, CaptureMode::Manual, &[&lines]);
    check(&mut orders, try_place(5, &new), 0, Err(ErrorCode::InvalidRequest));
    new.orders[0].lines.pop();
    new.orders[0].total -= 1;
    check(&mut orders, try_place(5, &new), 0, ok());
}
