//! Checkout through the engine: a cart of two merchants priced by the quote
//! engine, placed by one global transaction (stock, a limited promotion, a
//! coupon, the orders, the money), on one executor (one atomic step) and
//! across two (the TCC with part branches); a refused branch leaves
//! nothing behind; captures, cancels and refunds move the ledger and the
//! payment together; everything survives a restart.

use std::collections::BTreeSet;
use std::sync::Arc;

use peakstack_domain::{AccountFlags, Amount, Currency, Details, ErrorCode, Id, NewAccount, TransferRequest};
use peakstack_engine::inventory::{self, Answer, NewSku};
use peakstack_engine::orders::{self, CaptureMode, OrderState, PaymentState, RefundRequest};
use peakstack_engine::pricing::{
    self, CartLine, CouponDiscount, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec, Scope,
};
use peakstack_engine::trade_checkout::CheckoutRequest;
use peakstack_engine::{Engine, EngineConfig, ManualClock};

const NOW: u64 = 1_800_000_000_000;

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

async fn sku(engine: &Engine, name: &str, merchant: &str, price: u64, stock: u64) {
    let new = NewSku {
        id: id(name),
        merchant_id: id(merchant),
        title: name.into(),
        price: Amount::new(price).unwrap(),
        currency: cny(),
        stock,
        per_buyer_limit: None,
    };
    assert!(matches!(engine.inventory(inventory::Command::CreateSku(new)).await, Ok(Answer::Sku { .. })));
}

async fn stock_of(engine: &Engine, name: &str) -> (u64, u64, u64) {
    let sku = engine.sku(&id(name)).await.unwrap().unwrap();
    (sku.available(), sku.reserved, sku.sold)
}

/// A wallet for `buyer` with `balance` in it, funded from a bank account.
async fn wallet(engine: &Engine, name: &str, balance: u64) {
    let open = |account: &str, flags| NewAccount {
        id: id(account),
        currency: cny(),
        flags,
        overdraft_limit: 0,
        metadata: None,
        owner: None,
    };
    engine.create_account(open("bank", AccountFlags::default())).await.unwrap();
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

async fn posted(engine: &Engine, account: &str) -> (u128, u128) {
    match engine.account(&id(account)).await.unwrap() {
        Some(a) => (a.balances.debits_posted, a.balances.credits_posted),
        None => (0, 0),
    }
}

async fn pending_debits(engine: &Engine, account: &str) -> u128 {
    engine.account(&id(account)).await.unwrap().unwrap().balances.debits_pending
}

/// Two merchants' SKUs, a promotion with a budget (10 off m1's SKUs), a
/// coupon template (20 off over 100) with one coupon for `buyer`.
async fn catalogue(engine: &Engine, buyer: &str) -> Id {
    sku(engine, "phone", "m1", 300, 5).await;
    sku(engine, "case", "m1", 50, 5).await;
    sku(engine, "book", "m2", 80, 1).await;
    let promotion = Promotion::new(PromotionSpec {
        id: id("m1-ten-off"),
        currency: cny(),
        kind: PromotionKind::AmountOff { amount: 10 },
        scope: Scope::Merchant(id("m1")),
        starts_at_ms: 0,
        ends_at_ms: u64::MAX / 2,
        group: None,
        priority: 0,
        budget: Some(25),
        usage_limit: None,
        per_buyer_limit: None,
    })
    .unwrap();
    engine.pricing(pricing::Command::CreatePromotion(promotion)).await.unwrap();
    let template = CouponTemplate::new(CouponTemplateSpec {
        id: id("twenty-off"),
        currency: cny(),
        discount: CouponDiscount::AmountOff { amount: 20 },
        min_spend: 100,
        scope: Scope::Everything,
        valid_from_ms: 0,
        valid_until_ms: u64::MAX / 2,
        total_issue: 10,
    })
    .unwrap();
    engine.pricing(pricing::Command::CreateCouponTemplate(template)).await.unwrap();
    let issue =
        pricing::Command::IssueCoupon { template_id: id("twenty-off"), buyer_id: id(buyer), coupon_id: id("x") };
    engine.pricing(issue).await.unwrap().expect("a coupon id")
}

fn cart(buyer: &str, account: &str, lines: &[(&str, u32)], coupons: &[Id], capture: CaptureMode) -> CheckoutRequest {
    CheckoutRequest {
        buyer_id: id(buyer),
        lines: lines.iter().map(|(s, q)| CartLine { sku_id: id(s), quantity: *q }).collect(),
        coupon_ids: coupons.to_vec(),
        account_id: id(account),
        capture,
    }
}

async fn automatic_checkout_places_orders_per_merchant_and_pays_them(executors: u16) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = open(dir.path(), executors, clock.clone());
    wallet(&engine, "w-alice", 10_000).await;
    let coupon = catalogue(&engine, "alice").await;
    let request = cart(
        "alice",
        "w-alice",
        &[("phone", 1), ("case", 2), ("book", 1)],
        std::slice::from_ref(&coupon),
        CaptureMode::Automatic,
    );
    let quote = engine
        .quote(&pricing::QuoteRequest {
            buyer_id: id("alice"),
            lines: request.lines.clone(),
            coupon_ids: request.coupon_ids.clone(),
        })
        .await
        .unwrap();
    // 300 + 100 + 80 = 480; 10 off m1's 400; 20 off the rest (470).
    assert_eq!((quote.subtotal, quote.discount, quote.total), (480, 30, 450));

    let checkout_id = engine.checkout(&request).await.unwrap();
    let (checkout, placed) = engine.checkout_view(&checkout_id).await.unwrap().unwrap();
    assert_eq!(checkout.state, orders::CheckoutState::Completed);
    assert_eq!(placed.len(), 2, "one order per merchant");
    let total: u64 = placed.iter().map(|o| o.order.total).sum();
    assert_eq!(total, quote.total, "the orders total what the quote said, to the minor unit");
    for order in &placed {
        assert_eq!(order.state, OrderState::Paid);
        assert_eq!(order.payment_state, PaymentState::Captured);
        assert_eq!(order.amount_captured, order.order.total);
        let (_, credited) = posted(&engine, order.order.settle_account_id.as_str()).await;
        assert_eq!(credited, u128::from(order.order.total), "the merchant's pending settlement holds its order");
    }
    let payment = engine.payment(&checkout.checkout.payment_id).await.unwrap().unwrap();
    assert_eq!((payment.state, payment.amount_captured), (PaymentState::Captured, 450));
    assert_eq!(posted(&engine, "w-alice").await.0, 450);
    assert_eq!(stock_of(&engine, "phone").await, (4, 0, 1));
    assert_eq!(stock_of(&engine, "case").await, (3, 0, 2));
    assert_eq!(stock_of(&engine, "book").await, (0, 0, 1));
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert_eq!(counters.given, 10);
    let coupons = engine.coupons(std::slice::from_ref(&coupon)).await.unwrap();
    assert!(matches!(coupons[0].state, pricing::CouponState::Used { .. }), "the coupon is used: {:?}", coupons[0]);

    // The same coupon again: refused, and nothing else of the cart happens.
    let again = cart("alice", "w-alice", &[("phone", 1)], std::slice::from_ref(&coupon), CaptureMode::Automatic);
    assert_eq!(engine.checkout(&again).await, Err(ErrorCode::CouponAlreadyUsed));
    // The book is sold out: the whole cart is refused, its phone not reserved.
    let sold_out = cart("alice", "w-alice", &[("phone", 1), ("book", 1)], &[], CaptureMode::Automatic);
    assert_eq!(engine.checkout(&sold_out).await, Err(ErrorCode::OutOfStock));
    assert_eq!(stock_of(&engine, "phone").await, (4, 0, 1));
    assert_eq!(posted(&engine, "w-alice").await.0, 450);
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert_eq!((counters.given, counters.reserved), (10, 0), "a refused checkout consumed no budget");

    // A buyer who cannot pay: refused for the money, no stock taken.
    wallet(&engine, "w-bob", 100).await;
    let poor = cart("bob", "w-bob", &[("phone", 1)], &[], CaptureMode::Automatic);
    assert_eq!(engine.checkout(&poor).await, Err(ErrorCode::ExceedsCredits));
    assert_eq!(stock_of(&engine, "phone").await, (4, 0, 1));

    // Listing by buyer and by merchant.
    let mine = engine.list_orders(Some(id("alice")), None, None, 10).await.unwrap();
    assert_eq!(mine.len(), 2);
    let m2 = engine.list_orders(None, Some(id("m2")), None, 10).await.unwrap();
    assert_eq!(m2.len(), 1);

    // Across a restart (shutdown checkpoint), then after replaying the log alone.
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), executors, clock);
    let (checkout, placed) = engine.checkout_view(&checkout_id).await.unwrap().unwrap();
    assert_eq!(checkout.state, orders::CheckoutState::Completed);
    assert_eq!(placed.iter().map(|o| o.amount_captured).sum::<u64>(), 450);
    assert_eq!(posted(&engine, "w-alice").await.0, 450);
    assert_eq!(stock_of(&engine, "phone").await, (4, 0, 1));
    let totals = engine.totals().await.unwrap();
    assert_eq!(totals.txns_in_flight, 0);
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_checkout_on_one_executor() {
    automatic_checkout_places_orders_per_merchant_and_pays_them(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_checkout_across_executors() {
    automatic_checkout_places_orders_per_merchant_and_pays_them(3).await;
}

async fn manual_capture_then_refunds(executors: u16) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = open(dir.path(), executors, clock.clone());
    wallet(&engine, "w-carol", 10_000).await;
    catalogue(&engine, "carol").await;
    let request = cart("carol", "w-carol", &[("phone", 1), ("case", 1), ("book", 1)], &[], CaptureMode::Manual);
    let checkout_id = engine.checkout(&request).await.unwrap();
    let (checkout, placed) = engine.checkout_view(&checkout_id).await.unwrap().unwrap();
    let payment_id = checkout.checkout.payment_id.clone();
    // 350 of m1 less 10, 80 of m2: 420 held, nothing posted.
    assert_eq!(pending_debits(&engine, "w-carol").await, 420);
    assert_eq!(posted(&engine, "w-carol").await.0, 0);
    assert!(placed.iter().all(|o| o.state == OrderState::Authorized));
    let payment = engine.payment(&payment_id).await.unwrap().unwrap();
    assert_eq!((payment.state, payment.amount_authorized), (PaymentState::RequiresCapture, 420));

    // More than authorized: refused, nothing changes.
    let too_much = orders::Command::Capture { payment_id: payment_id.clone(), amount: Some(421) };
    assert_eq!(engine.orders_command(too_much).await, Err(ErrorCode::AmountExceedsAuthorized));
    // A partial capture of 210: shared 340:80 by largest remainder (170, 40), the rest released.
    let capture = orders::Command::Capture { payment_id: payment_id.clone(), amount: Some(210) };
    assert_eq!(engine.orders_command_changed(capture.clone()).await, Ok((None, true)));
    // Twice captures once, and says it changed nothing.
    assert_eq!(engine.orders_command_changed(capture).await, Ok((None, false)));
    let payment = engine.payment(&payment_id).await.unwrap().unwrap();
    assert_eq!((payment.state, payment.amount_captured), (PaymentState::Captured, 210));
    assert_eq!(posted(&engine, "w-carol").await.0, 210);
    assert_eq!(pending_debits(&engine, "w-carol").await, 0, "the rest of the hold is released");
    let cancel = orders::Command::CancelPayment { payment_id: payment_id.clone() };
    assert_eq!(engine.orders_command(cancel).await, Err(ErrorCode::InvalidState));

    // Refunds of the m1 order never exceed its capture, however asked.
    let m1 = placed.iter().find(|o| o.order.merchant_id == id("m1")).unwrap().order.id.clone();
    let captured = engine.order(&m1).await.unwrap().unwrap().amount_captured;
    assert_eq!(captured, 170);
    let refund = |request| orders::Command::Refund { refund_id: id("x"), order_id: m1.clone(), request };
    let first = engine.orders_command(refund(RefundRequest::Amount(100))).await.unwrap().expect("a refund id");
    assert_eq!(engine.orders_command(refund(RefundRequest::Amount(71))).await, Err(ErrorCode::RefundExceedsCaptured));
    engine.orders_command(refund(RefundRequest::Amount(70))).await.unwrap();
    let order = engine.order(&m1).await.unwrap().unwrap();
    assert_eq!((order.amount_refunded, order.state), (170, OrderState::Refunded));
    assert_eq!(engine.refund(&first).await.unwrap().unwrap().amount, 100);
    let settle = order.order.settle_account_id.as_str();
    assert_eq!(posted(&engine, settle).await, (170, 170), "the merchant's pending settlement gave it all back");
    assert_eq!(posted(&engine, "w-carol").await, (210, 10_000 + 170));

    // A refund of an order that is not captured yet: refused.
    let second = engine.checkout(&cart("carol", "w-carol", &[("case", 1)], &[], CaptureMode::Manual)).await.unwrap();
    let (checkout2, placed2) = engine.checkout_view(&second).await.unwrap().unwrap();
    let unpaid = placed2[0].order.id.clone();
    let early = orders::Command::Refund { refund_id: id("x"), order_id: unpaid, request: RefundRequest::Amount(1) };
    assert_eq!(engine.orders_command(early).await, Err(ErrorCode::InvalidState));
    // Cancel voids the hold; capture after it is refused.
    let pay2 = checkout2.checkout.payment_id.clone();
    engine.orders_command(orders::Command::CancelPayment { payment_id: pay2.clone() }).await.unwrap();
    assert_eq!(pending_debits(&engine, "w-carol").await, 0);
    let late = orders::Command::Capture { payment_id: pay2.clone(), amount: None };
    assert_eq!(engine.orders_command(late).await, Err(ErrorCode::InvalidState));
    assert_eq!(engine.payment(&pay2).await.unwrap().unwrap().state, PaymentState::Canceled);

    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), executors, clock);
    assert_eq!(engine.order(&m1).await.unwrap().unwrap().amount_refunded, 170);
    assert_eq!(engine.payment(&pay2).await.unwrap().unwrap().state, PaymentState::Canceled);
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_capture_and_refunds_on_one_executor() {
    manual_capture_then_refunds(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_capture_and_refunds_across_executors() {
    manual_capture_then_refunds(2).await;
}

/// Racing checkouts for the last units, for one coupon and for the last of
/// a budget: exactly what there is is sold, used or given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_checkouts_never_oversell_or_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = Arc::new(open(dir.path(), 2, clock));
    let coupon = catalogue(&engine, "dave").await;
    let buyers: Vec<String> = (0..12).map(|i| format!("buyer{i}")).collect();
    for buyer in &buyers {
        wallet(&engine, &format!("w-{buyer}"), 10_000).await;
    }
    wallet(&engine, "w-dave", 10_000).await;
    // 5 phones, 3 cases with a coupon (150, over its minimum spend of 100 with or without the 10 off); the m1 promotion's budget of 25
    // covers two whole discounts of 10 and 5 of a third.
    let mut tasks = Vec::new();
    for buyer in buyers.clone() {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let request = cart(&buyer, &format!("w-{buyer}"), &[("phone", 1)], &[], CaptureMode::Automatic);
            engine.checkout(&request).await
        }));
    }
    // Four tries of dave's one coupon at once.
    for _ in 0..4 {
        let engine = engine.clone();
        let coupon = coupon.clone();
        tasks.push(tokio::spawn(async move {
            let request = cart("dave", "w-dave", &[("case", 3)], &[coupon], CaptureMode::Automatic);
            engine.checkout(&request).await
        }));
    }
    let mut phones = 0;
    let mut with_coupon = 0;
    for (index, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) if index < buyers.len() => phones += 1,
            Ok(_) => with_coupon += 1,
            Err(e) => assert!(
                matches!(
                    e,
                    ErrorCode::OutOfStock
                        | ErrorCode::CouponAlreadyUsed
                        | ErrorCode::PromotionBudgetExhausted
                        | ErrorCode::TransactionTimedOut
                ),
                "{e:?}"
            ),
        }
    }
    // Every buyer could pay and nothing timed out (the clock stands still):
    // the five phones are sold and the coupon used, exactly.
    assert_eq!((phones, with_coupon), (5, 1), "phones sold, coupon uses");
    let (available, reserved, sold) = stock_of(&engine, "phone").await;
    assert_eq!((available + sold, reserved, sold), (5, 0, phones));
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert!(counters.given <= 25 && counters.reserved == 0, "{counters:?}");
    assert_eq!(counters.given, 25, "the budget is given out whole (the last order gets what is left), never more");
    let mut sold_to: BTreeSet<Id> = BTreeSet::new();
    for order in engine.list_orders(None, Some(id("m1")), None, 100).await.unwrap() {
        assert_eq!(order.state, OrderState::Paid);
        sold_to.insert(order.buyer_id.clone());
    }
    assert_eq!(sold_to.len() as u64, phones + u64::from(with_coupon > 0));
    engine.shutdown();
}

/// Orders that end unpaid (cancelled, expired) give back their stock, their
/// share of the budget and, with the checkout's last order, the
/// promotion's use and the coupon: as reliable messages to the executors
/// of the SKUs, the promotion and the coupon.
async fn unpaid_orders_give_back_what_they_held(executors: u16) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = open(dir.path(), executors, clock.clone());
    wallet(&engine, "w-erin", 10_000).await;
    let coupon = catalogue(&engine, "erin").await;
    let request = cart(
        "erin",
        "w-erin",
        &[("phone", 1), ("case", 2), ("book", 1)],
        std::slice::from_ref(&coupon),
        CaptureMode::Manual,
    );
    let checkout_id = engine.checkout(&request).await.unwrap();
    let (checkout, placed) = engine.checkout_view(&checkout_id).await.unwrap().unwrap();
    assert_eq!(stock_of(&engine, "phone").await, (4, 0, 1));
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert_eq!((counters.given, counters.uses), (10, 1));

    // The m1 order is cancelled: its stock and its 10 of budget come back;
    // the coupon stays used (the m2 order is still open).
    let m1 = placed.iter().find(|o| o.order.merchant_id == id("m1")).unwrap().order.id.clone();
    engine.orders_command(orders::Command::CancelOrder { order_id: m1.clone() }).await.unwrap();
    let settled = |engine: &Engine| {
        let stats = engine.stats();
        stats.messages_kept.load(std::sync::atomic::Ordering::Relaxed) == 0
    };
    for _ in 0..200 {
        if settled(&engine) && stock_of(&engine, "phone").await == (5, 0, 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(stock_of(&engine, "phone").await, (5, 0, 0));
    assert_eq!(stock_of(&engine, "case").await, (5, 0, 0));
    assert_eq!(stock_of(&engine, "book").await, (0, 0, 1));
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert_eq!((counters.given, counters.uses), (0, 1), "the order's share of the budget is back, not the use");
    let coupons = engine.coupons(std::slice::from_ref(&coupon)).await.unwrap();
    assert!(matches!(coupons[0].state, pricing::CouponState::Used { .. }));

    // The authorization window passes for the rest: voided, the book and
    // (the checkout's last order) the promotion's use and the coupon come back.
    clock.advance(orders::DEFAULT_AUTHORIZATION_MS + 1);
    let payment_id = checkout.checkout.payment_id.clone();
    for _ in 0..300 {
        let expired = engine.payment(&payment_id).await.unwrap().unwrap().state == PaymentState::Expired;
        if expired && settled(&engine) && stock_of(&engine, "book").await == (1, 0, 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let payment = engine.payment(&payment_id).await.unwrap().unwrap();
    assert_eq!(
        payment.parts.iter().map(|p| p.state).collect::<Vec<_>>(),
        vec![PaymentState::Canceled, PaymentState::Expired]
    );
    assert_eq!(pending_debits(&engine, "w-erin").await, 0, "every hold is released");
    assert_eq!(stock_of(&engine, "book").await, (1, 0, 0));
    let (_, counters) = engine.promotion(&id("m1-ten-off")).await.unwrap().unwrap();
    assert_eq!((counters.given, counters.uses), (0, 0));
    let coupons = engine.coupons(std::slice::from_ref(&coupon)).await.unwrap();
    assert!(matches!(coupons[0].state, pricing::CouponState::Available), "{:?}", coupons[0]);
    assert!(engine.messages(false, 10).await.unwrap().is_empty(), "every message was applied");
    // The coupon can be used again.
    let again = cart("erin", "w-erin", &[("phone", 1)], &[coupon], CaptureMode::Automatic);
    engine.checkout(&again).await.unwrap();
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_give_back_on_one_executor() {
    unpaid_orders_give_back_what_they_held(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_give_back_across_executors() {
    unpaid_orders_give_back_what_they_held(3).await;
}

/// A checkout under an Idempotency-Key whose stored answer a crash lost (the
/// server's key store never heard of it) is found again by its key: the
/// retry answers the same checkout and moves nothing more, also after a
/// restart; the key with another request is refused; a key whose checkout
/// failed may be tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_checkout_is_placed_once_even_when_its_answer_was_lost() {
    use peakstack_engine::IdempotencyTag;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    let engine = open(dir.path(), 1, clock.clone());
    wallet(&engine, "w-gus", 10_000).await;
    catalogue(&engine, "gus").await;
    let tag = IdempotencyTag { key_hash: [7; 16], fingerprint: [1; 16] };
    let request = cart("gus", "w-gus", &[("phone", 1), ("book", 1)], &[], CaptureMode::Automatic);
    let first = engine.checkout_keyed(&request, Some(tag)).await.unwrap();
    let paid = posted(&engine, "w-gus").await.0;
    assert_eq!(engine.checkout_keyed(&request, Some(tag)).await, Ok(first.clone()), "the retry finds it");
    assert_eq!(posted(&engine, "w-gus").await.0, paid, "and moves nothing more");
    assert_eq!(engine.list_orders(Some(id("gus")), None, None, 10).await.unwrap().len(), 2);
    let other = IdempotencyTag { fingerprint: [2; 16], ..tag };
    assert_eq!(engine.checkout_keyed(&request, Some(other)).await, Err(ErrorCode::ExistsWithDifferentFields));
    // Without a key, the same cart is another checkout (the book is sold out now).
    assert_eq!(engine.checkout(&request).await, Err(ErrorCode::OutOfStock));

    // A keyed checkout that failed leaves its key free for a retry.
    let failing = IdempotencyTag { key_hash: [8; 16], fingerprint: [3; 16] };
    assert_eq!(engine.checkout_keyed(&request, Some(failing)).await, Err(ErrorCode::OutOfStock));
    engine.inventory(inventory::Command::Restock { sku_id: id("book"), quantity: 1 }).await.unwrap();
    let second = engine.checkout_keyed(&request, Some(failing)).await.unwrap();
    assert_ne!(second, first);

    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), 1, clock);
    assert_eq!(engine.checkout_keyed(&request, Some(tag)).await, Ok(first), "found after a restart too");
    assert_eq!(engine.checkout_keyed(&request, Some(failing)).await, Ok(second));
    assert_eq!(engine.list_orders(Some(id("gus")), None, None, 10).await.unwrap().len(), 4);
    engine.shutdown();
}
