//! Settlement through the engine: a merchant's captured money (from
//! checkouts on several home shards, one partly refunded, one captured by
//! hand) moved from its pending-settlement accounts to its available
//! account minus the platform's fee, its parts marked Settled, all in one
//! global transaction per home executor; on one executor and on three.
//! A second settlement settles nothing; a refund of a settled part is
//! refused; everything survives a restart.

use std::sync::Arc;

use peakstack_domain::{AccountFlags, Amount, Currency, Details, ErrorCode, Id, NewAccount, TransferRequest};
use peakstack_engine::inventory::{self, Answer, NewSku};
use peakstack_engine::orders::{self, CaptureMode, PaymentState, RefundRequest, SettlementState};
use peakstack_engine::pricing::CartLine;
use peakstack_engine::trade_checkout::CheckoutRequest;
use peakstack_engine::{Engine, EngineConfig, ManualClock};

const NOW: u64 = 1_800_000_000_000;
const FEE_BPS: u32 = 250;

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn cny() -> Currency {
    Currency::parse("CNY").unwrap()
}

fn open(dir: &std::path::Path, executors: u16, clock: Arc<ManualClock>) -> Engine {
    let config = EngineConfig { shards: 8, clock, ..EngineConfig::new(dir, executors) };
    Engine::open(config).unwrap()
}

async fn sku(engine: &Engine, name: &str, merchant: &str, price: u64) {
    let new = NewSku {
        id: id(name),
        merchant_id: id(merchant),
        title: name.into(),
        price: Amount::new(price).unwrap(),
        currency: cny(),
        stock: 100,
        per_buyer_limit: None,
    };
    assert!(matches!(engine.inventory(inventory::Command::CreateSku(new)).await, Ok(Answer::Sku { .. })));
}

async fn wallet(engine: &Engine, name: &str, balance: u64) {
    let open = |account: &str, flags| NewAccount {
        id: id(account),
        currency: cny(),
        flags,
        overdraft_limit: 0,
        metadata: None,
        owner: None,
    };
    let _ = engine.create_account(open("bank", AccountFlags::default())).await;
    engine.create_account(open(name, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)).await.unwrap();
    let fund = TransferRequest::Create {
        id: id(&format!("fund-{name}")),
        debit_account_id: id("bank"),
        credit_account_id: id(name),
        amount: Amount::new(balance).unwrap(),
        currency: cny(),
        pending: false,
        timeout_ms: 0,
        details: Details::default(),
    };
    assert!(engine.create_transfers(vec![fund], false).await[0].is_ok());
}

/// (debits posted, credits posted) of an account, zeros if it does not exist.
async fn posted(engine: &Engine, account: &str) -> (u128, u128) {
    match engine.account(&id(account)).await.unwrap() {
        Some(a) => (a.balances.debits_posted, a.balances.credits_posted),
        None => (0, 0),
    }
}

async fn checkout(engine: &Engine, account: &str, lines: &[(&str, u32)], capture: CaptureMode) -> Vec<orders::Order> {
    let request = CheckoutRequest {
        buyer_id: id("alice"),
        lines: lines.iter().map(|(s, q)| CartLine { sku_id: id(s), quantity: *q }).collect(),
        coupon_ids: Vec::new(),
        account_id: id(account),
        capture,
    };
    let checkout_id = engine.checkout(&request).await.unwrap();
    let (checkout, placed) = engine.checkout_view(&checkout_id).await.unwrap().unwrap();
    if capture == CaptureMode::Manual {
        let capture = orders::Command::Capture { payment_id: checkout.checkout.payment_id.clone(), amount: None };
        engine.orders_command(capture).await.unwrap();
    }
    placed
}

fn of_merchant<'a>(placed: &'a [orders::Order], merchant: &str) -> &'a orders::Order {
    placed.iter().find(|o| o.order.merchant_id.as_str() == merchant).unwrap()
}

async fn settles_captured_money_once(executors: u16) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = open(dir.path(), executors, clock.clone());
    sku(&engine, "phone", "m1", 300).await;
    sku(&engine, "book", "m2", 80).await;
    // Wallets on several shards: the money sits in several settle accounts.
    let wallets = ["w-a", "w-b", "w-c", "w-d", "w-e"];
    for name in wallets {
        wallet(&engine, name, 10_000).await;
    }
    let mut m1_orders = Vec::new();
    let mut expected_amount = 0u64;
    for (index, name) in wallets.iter().enumerate() {
        let capture = if index % 2 == 0 { CaptureMode::Automatic } else { CaptureMode::Manual };
        let placed = checkout(&engine, name, &[("phone", 2), ("book", 1)], capture).await;
        m1_orders.push(of_merchant(&placed, "m1").clone());
        expected_amount += 600;
    }
    // A refund before settlement comes out of the settle account, as before.
    let refund = orders::Command::Refund {
        refund_id: id("r"),
        order_id: m1_orders[0].order.id.clone(),
        request: RefundRequest::Amount(100),
    };
    engine.orders_command(refund).await.unwrap();
    expected_amount -= 100;
    let settle_accounts: std::collections::BTreeSet<Id> =
        m1_orders.iter().map(|o| o.order.settle_account_id.clone()).collect();
    assert!(settle_accounts.len() > 1, "the test wants money on several shards");

    let made = engine.settle(&id("m1"), Some(cny()), FEE_BPS).await.unwrap();
    assert!(!made.is_empty() && made.len() <= usize::from(executors), "one settlement per home executor: {made:?}");
    let lines: Vec<&orders::SettlementLine> = made.iter().flat_map(|s| s.settlement.lines.iter()).collect();
    assert_eq!(lines.len(), m1_orders.len(), "every captured part of m1, once");
    let amount: u64 = lines.iter().map(|l| l.amount).sum();
    let fee: u64 = lines.iter().map(|l| l.fee).sum();
    assert_eq!(amount, expected_amount, "captured minus refunded");
    // 2.5% of 600 four times, of 500 once, each rounded down.
    assert_eq!(fee, 4 * 15 + 12);
    for settlement in &made {
        assert_eq!(settlement.state, SettlementState::Completed);
        assert_eq!(settlement.settlement.merchant_id, id("m1"));
        assert_eq!(settlement.settlement.fee_bps, FEE_BPS);
    }
    // The money moved: settle accounts emptied, merchant and fees credited.
    for account in &settle_accounts {
        let (debits, credits) = posted(&engine, account.as_str()).await;
        assert_eq!(debits, credits, "{account} is settled to zero");
    }
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, u128::from(amount - fee)));
    assert_eq!(posted(&engine, "_fees.CNY").await, (0, u128::from(fee)));
    // m2's money has not moved.
    let m2_settle = engine.list_orders(None, Some(id("m2")), None, 10).await.unwrap();
    assert!(m2_settle.iter().all(|o| o.payment_state == PaymentState::Captured));
    for order in &m1_orders {
        let now = engine.order(&order.order.id).await.unwrap().unwrap();
        assert_eq!(now.payment_state, PaymentState::Settled, "{}", order.order.id);
    }
    // Nothing new to settle.
    assert_eq!(engine.settle(&id("m1"), None, FEE_BPS).await.unwrap(), Vec::new());
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, u128::from(amount - fee)));
    // A refund of a settled part: refused, nothing moves.
    let late = orders::Command::Refund {
        refund_id: id("r"),
        order_id: m1_orders[1].order.id.clone(),
        request: RefundRequest::Amount(10),
    };
    assert_eq!(engine.orders_command(late).await, Err(ErrorCode::InvalidState));
    // Another currency has nothing; m2 in every currency settles its book sales.
    assert_eq!(engine.settle(&id("m2"), Currency::parse("USD"), 0).await.unwrap(), Vec::new());
    let m2 = engine.settle(&id("m2"), None, 0).await.unwrap();
    assert_eq!(m2.iter().map(|s| s.settlement.lines.len()).sum::<usize>(), wallets.len());
    assert_eq!(posted(&engine, "_merchant.m2.CNY").await, (0, 5 * 80));
    assert_eq!(posted(&engine, "_fees.CNY").await, (0, u128::from(fee)), "no fee at 0 bps");
    // Listed per merchant, and found by id.
    let listed = engine.settlements(&id("m1"), 100).await.unwrap();
    assert_eq!(listed, made);
    assert_eq!(engine.settlement(&made[0].settlement.id).await.unwrap().as_ref(), Some(&made[0]));
    assert_eq!(engine.settlement(&id("stl_99_1")).await.unwrap(), None);
    let totals = engine.totals().await.unwrap();
    assert_eq!((totals.net, totals.clearing_net, totals.txns_in_flight), (0, 0, 0));

    // Across a restart.
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), executors, clock);
    assert_eq!(engine.settlements(&id("m1"), 100).await.unwrap(), made);
    for order in &m1_orders {
        let now = engine.order(&order.order.id).await.unwrap().unwrap();
        assert_eq!(now.payment_state, PaymentState::Settled);
    }
    assert_eq!(engine.settle(&id("m1"), None, FEE_BPS).await.unwrap(), Vec::new());
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, u128::from(amount - fee)));
    // New money after the restart settles under new ids.
    let placed = checkout(&engine, "w-a", &[("phone", 1)], CaptureMode::Automatic).await;
    let again = engine.settle(&id("m1"), None, FEE_BPS).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].settlement.lines[0].order_id, placed[0].order.id);
    assert!(made.iter().all(|s| s.settlement.id != again[0].settlement.id), "a fresh id");
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, u128::from(amount - fee + 300 - 7)));
    let all = engine.settlements(&id("m1"), 100).await.unwrap();
    engine.shutdown();
    drop(engine);

    // From the log alone (no segment was full, so none was deleted): the
    // same settlements, parts and balances, and the counter past their ids.
    for e in 0..executors {
        std::fs::remove_file(dir.path().join(format!("executor-{e:03}/checkpoint.snap"))).unwrap();
    }
    let engine = open(dir.path(), executors, Arc::new(ManualClock::new(NOW + 1)));
    assert_eq!(engine.settlements(&id("m1"), 100).await.unwrap(), all);
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, u128::from(amount - fee + 300 - 7)));
    assert_eq!(posted(&engine, "_fees.CNY").await, (0, u128::from(fee + 7)));
    let placed = checkout(&engine, "w-b", &[("phone", 1)], CaptureMode::Automatic).await;
    let third = engine.settle(&id("m1"), None, FEE_BPS).await.unwrap();
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].settlement.lines[0].order_id, placed[0].order.id);
    assert!(all.iter().all(|s| s.settlement.id != third[0].settlement.id), "a fresh id after a replay");
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_on_one_executor() {
    settles_captured_money_once(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_across_three_executors() {
    settles_captured_money_once(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_all_settles_every_merchant_with_captured_money() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 3, Arc::new(ManualClock::new(NOW)));
    sku(&engine, "phone", "m1", 300).await;
    sku(&engine, "book", "m2", 80).await;
    wallet(&engine, "w-a", 10_000).await;
    checkout(&engine, "w-a", &[("phone", 1), ("book", 1)], CaptureMode::Automatic).await;
    // An authorization not captured has nothing to settle yet.
    let held = CheckoutRequest {
        buyer_id: id("alice"),
        lines: vec![CartLine { sku_id: id("book"), quantity: 1 }],
        coupon_ids: Vec::new(),
        account_id: id("w-a"),
        capture: CaptureMode::Manual,
    };
    engine.checkout(&held).await.unwrap();
    let made = engine.settle_all(100).await.unwrap();
    let mut merchants: Vec<&str> = made.iter().map(|s| s.settlement.merchant_id.as_str()).collect();
    merchants.sort_unstable();
    assert_eq!(merchants, ["m1", "m2"]);
    assert_eq!(posted(&engine, "_merchant.m1.CNY").await, (0, 297));
    // 1% of 80 rounds down to nothing.
    assert_eq!(posted(&engine, "_merchant.m2.CNY").await, (0, 80));
    assert_eq!(posted(&engine, "_fees.CNY").await, (0, 3));
    assert_eq!(engine.settle_all(100).await.unwrap(), Vec::new());
    engine.shutdown();
}
