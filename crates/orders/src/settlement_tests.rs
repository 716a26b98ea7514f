//! Settlements through the orders part's command interface: try, confirm
//! and cancel; what they lock; what a settled part refuses; the log and
//! checkpoint forms.

use peakstack_domain::wire::{Reader, Writer};
use peakstack_domain::{Currency, ErrorCode, Id};

use crate::decide::order_transfer_id;
use crate::model::{CaptureMode, LedgerEffect, NewCheckout, NewOrder, OrderLine, PaymentState, RefundRequest};
use crate::settlement::{fee_of, NewSettlement, SettlementLine, SettlementState};
use crate::state::{Command, Orders};

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// Checkout 1 of b1, paid at once: order `ord_1_10` of m0 (300) and
/// `ord_1_11` of m1 (80).
fn paid() -> Orders {
    let order = |i: u64, merchant: &str, price: u64| NewOrder {
        id: id(&format!("ord_1_{}", 10 + i)),
        merchant_id: id(merchant),
        lines: vec![OrderLine {
            line_id: 1,
            sku_id: id("sku"),
            quantity: 1,
            unit_price: price,
            subtotal: price,
            discounts: Vec::new(),
            total: price,
        }],
        total: price,
        transfer_id: order_transfer_id(&id(&format!("ord_1_{}", 10 + i))),
        settle_account_id: id(&format!("_settle.1.USD.{merchant}")),
    };
    let checkout = NewCheckout {
        id: id("chk_1_1"),
        buyer_id: id("b1"),
        account_id: id("wallet.b1"),
        currency: usd(),
        capture: CaptureMode::Automatic,
        payment_id: id("pay_1_1"),
        coupon_ids: Vec::new(),
        orders: vec![order(0, "m0", 300), order(1, "m1", 80)],
        created_ms: 0,
        authorization_expires_ms: 1_000,
        consumed_promotions: Vec::new(),
    };
    let mut orders = Orders::new();
    assert_eq!(orders.apply(&Command::TryPlace { txn: 1, checkout: Box::new(checkout) }, 0), (true, Ok(())));
    assert_eq!(orders.apply(&Command::ConfirmPlace { txn: 1, checkout_id: id("chk_1_1") }, 0), (true, Ok(())));
    orders
}

fn settlement(n: u64, order: &str, amount: u64, fee_bps: u32) -> NewSettlement {
    NewSettlement {
        id: id(&format!("stl_1_{n}")),
        merchant_id: id("m0"),
        currency: usd(),
        fee_bps,
        lines: vec![SettlementLine {
            order_id: id(order),
            settle_account_id: id("_settle.1.USD.m0"),
            amount,
            fee: fee_of(amount, fee_bps),
        }],
        created_ms: 5,
    }
}

fn try_settle(txn: u64, new: &NewSettlement) -> Command {
    Command::TrySettle { txn, settlement: Box::new(new.clone()) }
}

fn checkpoint(orders: &Orders) -> Vec<u8> {
    let mut w = Writer::default();
    orders.encode_checkpoint(&mut w);
    w.buf
}

/// Applies `command`: `expected` is the reply; a refusal or a repeat
/// changes no byte of the checkpoint; the invariants hold after.
fn check(orders: &mut Orders, command: Command, expected: Result<(), ErrorCode>, changes: bool) {
    let before = checkpoint(orders);
    assert_eq!(orders.plan(&command, 7).map(|e| e.is_empty()), expected.map(|()| true), "{command:?}");
    assert_eq!(orders.apply(&command, 7), (changes, expected), "{command:?}");
    if !changes {
        assert_eq!(checkpoint(orders), before, "{command:?} changed state");
    }
    orders.assert_invariants();
}

fn part(orders: &Orders, order: &str) -> PaymentState {
    orders.order(&id(order)).unwrap().payment_state
}

fn refund(order: &str, amount: u64) -> Command {
    Command::Refund { refund_id: id("rfd_1_50"), order_id: id(order), request: RefundRequest::Amount(amount) }
}

#[test]
fn a_settlement_locks_its_parts_then_settles_them_once() {
    let mut orders = paid();
    let picked = orders.settleable(&id("m0"), None, 250);
    assert_eq!(picked.len(), 1);
    assert_eq!((picked[0].1.amount, picked[0].1.fee), (300, 7));
    assert_eq!(orders.merchants_to_settle(10), [id("m0"), id("m1")]);

    let first = settlement(1, "ord_1_10", 300, 250);
    check(&mut orders, try_settle(2, &first), Ok(()), true);
    check(&mut orders, try_settle(2, &first), Ok(()), false);
    assert_eq!(orders.settlement(&id("stl_1_1")).unwrap().state, SettlementState::Pending);
    // Locked while it is decided: no refund, no second settlement.
    check(&mut orders, refund("ord_1_10", 10), Err(ErrorCode::InvalidState), false);
    check(&mut orders, try_settle(3, &settlement(2, "ord_1_10", 300, 250)), Err(ErrorCode::InvalidState), false);
    assert!(orders.settleable(&id("m0"), None, 250).is_empty());
    // Cancelled: the part is free again, and a refund changes what is left.
    check(&mut orders, Command::CancelSettle { txn: 2, settlement_id: id("stl_1_1") }, Ok(()), true);
    check(&mut orders, Command::CancelSettle { txn: 2, settlement_id: id("stl_1_1") }, Ok(()), false);
    check(
        &mut orders,
        Command::ConfirmSettle { txn: 2, settlement_id: id("stl_1_1") },
        Err(ErrorCode::BranchCancelled),
        false,
    );
    assert!(orders.settlements_of(&id("m0"), 10).is_empty(), "a failed settlement leaves the listing");
    let mut refunded = orders.clone();
    let effects = refunded.plan(&refund("ord_1_10", 100), 7).unwrap();
    assert!(matches!(&effects[..], [LedgerEffect::Move { amount: 100, .. }]));
    assert_eq!(refunded.apply(&refund("ord_1_10", 100), 7), (true, Ok(())));
    check(&mut refunded, try_settle(4, &settlement(3, "ord_1_10", 300, 250)), Err(ErrorCode::InvalidState), false);
    assert_eq!(refunded.settleable(&id("m0"), None, 0)[0].1.amount, 200);

    // Settled: terminal, and refunds refused.
    let second = settlement(4, "ord_1_10", 300, 250);
    check(&mut orders, try_settle(5, &second), Ok(()), true);
    check(&mut orders, Command::ConfirmSettle { txn: 5, settlement_id: id("stl_1_4") }, Ok(()), true);
    check(&mut orders, Command::ConfirmSettle { txn: 5, settlement_id: id("stl_1_4") }, Ok(()), false);
    check(
        &mut orders,
        Command::CancelSettle { txn: 5, settlement_id: id("stl_1_4") },
        Err(ErrorCode::InvalidState),
        false,
    );
    assert_eq!(part(&orders, "ord_1_10"), PaymentState::Settled);
    assert_eq!(part(&orders, "ord_1_11"), PaymentState::Captured);
    assert_eq!(orders.payment(&id("pay_1_1")).unwrap().state, PaymentState::Captured, "until every part is");
    check(&mut orders, refund("ord_1_10", 1), Err(ErrorCode::InvalidState), false);
    check(&mut orders, try_settle(6, &settlement(5, "ord_1_10", 300, 250)), Err(ErrorCode::InvalidState), false);
    assert!(orders.settleable(&id("m0"), None, 250).is_empty());
    assert_eq!(orders.merchants_to_settle(10), [id("m1")]);
    assert_eq!(orders.settlements_of(&id("m0"), 10).len(), 1);
    assert!(orders.peek_sequence() > 4, "the settlement's id raised the counter");
}

#[test]
fn a_settlement_that_does_not_fit_is_refused() {
    let mut orders = paid();
    let mut wrong_fee = settlement(1, "ord_1_10", 300, 250);
    wrong_fee.lines[0].fee = 8;
    check(&mut orders, try_settle(2, &wrong_fee), Err(ErrorCode::InvalidRequest), false);
    check(&mut orders, try_settle(2, &settlement(1, "ord_1_10", 300, 10_001)), Err(ErrorCode::InvalidRequest), false);
    check(&mut orders, try_settle(2, &settlement(1, "ord_1_10", 299, 0)), Err(ErrorCode::InvalidState), false);
    check(&mut orders, try_settle(2, &settlement(1, "ord_1_11", 80, 0)), Err(ErrorCode::InvalidState), false);
    check(&mut orders, try_settle(2, &settlement(1, "ord_1_99", 80, 0)), Err(ErrorCode::OrderNotFound), false);
    let mut not_assigned = settlement(1, "ord_1_10", 300, 0);
    not_assigned.id = id("settle-1");
    check(&mut orders, try_settle(2, &not_assigned), Err(ErrorCode::InvalidRequest), false);
    let mut twice = settlement(1, "ord_1_10", 300, 0);
    twice.lines.push(twice.lines[0].clone());
    check(&mut orders, try_settle(2, &twice), Err(ErrorCode::InvalidRequest), false);
    // The same id by another transaction, or with other lines.
    check(&mut orders, try_settle(2, &settlement(1, "ord_1_10", 300, 0)), Ok(()), true);
    check(
        &mut orders,
        try_settle(3, &settlement(1, "ord_1_10", 300, 0)),
        Err(ErrorCode::ExistsWithDifferentFields),
        false,
    );
    // Unknown: a confirm is refused, a cancel has nothing to undo.
    check(
        &mut orders,
        Command::ConfirmSettle { txn: 9, settlement_id: id("stl_1_9") },
        Err(ErrorCode::TransactionNotFound),
        false,
    );
    check(&mut orders, Command::CancelSettle { txn: 9, settlement_id: id("stl_1_9") }, Ok(()), false);
}

#[test]
fn settlements_round_trip_through_the_log_and_the_checkpoint() {
    let mut orders = paid();
    let first = settlement(1, "ord_1_10", 300, 250);
    let commands = [
        try_settle(2, &first),
        Command::ConfirmSettle { txn: 2, settlement_id: id("stl_1_1") },
        Command::CancelSettle { txn: 2, settlement_id: id("stl_1_1") },
    ];
    for command in &commands {
        let mut w = Writer::default();
        crate::encode_command(command, &mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(&crate::decode_command(&mut r).unwrap(), command);
        assert!(r.is_empty());
    }
    // One settled, one pending, one failed.
    assert_eq!(orders.apply(&commands[0], 1), (true, Ok(())));
    assert_eq!(orders.apply(&commands[1], 1), (true, Ok(())));
    let bytes = checkpoint(&orders);
    let back = Orders::decode_checkpoint(&mut Reader::new(&bytes)).unwrap();
    assert_eq!(back, orders);
    assert_eq!(checkpoint(&back), bytes);
    for cut in 0..bytes.len() {
        assert!(Orders::decode_checkpoint(&mut Reader::new(&bytes[..cut])).is_err(), "truncated at {cut}");
    }
    // A format 1 section (before settlements) still reads.
    let plain = paid();
    let mut old = checkpoint(&plain);
    assert_eq!(old.pop(), Some(0), "no settlements: a zero count at the end");
    old[0] = 1;
    assert_eq!(Orders::decode_checkpoint(&mut Reader::new(&old)).unwrap(), plain);
}
