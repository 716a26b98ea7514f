//! Over real HTTP, with API keys: settlements (`POST /v1/settlements`, by
//! id, per merchant), credit lines (`GET /v1/credit-lines/{buyer_id}`) and
//! dead letters (`GET /v1/dead-letters`, replay), with the outbox gauges.
//!
//! FIXME: checkouts are placed through the engine in-process (the
//! checkout routes are not served yet); everything asserted is read over
//! HTTP or from the ledger the engine keeps.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{client_with_key, create_key, open_engine, Answer, Running};
use peakstack_domain::Id;
use peakstack_engine::inventory;
use peakstack_engine::orders::{self, CaptureMode};
use peakstack_engine::pricing::CartLine;
use peakstack_engine::trade_checkout::CheckoutRequest;
use peakstack_engine::Engine;
use serde_json::{json, Value};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Admin,
    Read,
    M1,
    M2,
    /// An app key acting for this buyer.
    App(&'static str),
}

struct Harness {
    server: Running,
    keys: BTreeMap<&'static str, String>,
}

impl Harness {
    async fn start(dir: &Path, executors: u16) -> Harness {
        Harness::start_with(dir, executors, None).await
    }

    async fn start_with(dir: &Path, executors: u16, settle_every: Option<std::time::Duration>) -> Harness {
        let mut keys = BTreeMap::new();
        for (name, scope) in
            [("admin", "admin"), ("read", "read"), ("m1", "merchant:m1"), ("m2", "merchant:m2"), ("app", "app")]
        {
            keys.insert(name, create_key(dir, scope).await);
        }
        let mut config = common::loopback_config(dir);
        config.settlement_fee_bps = 250;
        config.settle_every = settle_every;
        let server = Running::start(open_engine(dir, 8, executors, 1 << 20, 1 << 30), config).await;
        Harness { server, keys }
    }

    fn engine(&self) -> &Engine {
        &self.server.engine
    }

    async fn call(&self, who: Who, method: &str, path: &str, body: Option<Value>) -> Answer {
        let key = match who {
            Who::Admin => &self.keys["admin"],
            Who::Read => &self.keys["read"],
            Who::M1 => &self.keys["m1"],
            Who::M2 => &self.keys["m2"],
            Who::App(_) => &self.keys["app"],
        };
        let client = client_with_key(key);
        let mut request = client.request(method.parse().unwrap(), self.server.url(path));
        if let Who::App(buyer) = who {
            request = request.header("x-buyer-id", buyer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    /// An answer with the expected status, as JSON.
    async fn expect(&self, who: Who, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let answer = self.call(who, method, path, body).await;
        assert_eq!(answer.status, status, "{who:?} {method} {path}: {}", answer.text());
        answer.body
    }

    async fn refused(&self, who: Who, method: &str, path: &str, body: Option<Value>, status: u16, code: &str) {
        let answer = self.call(who, method, path, body).await;
        answer.assert_problem(status, code, &format!("{who:?} {method} {path}"));
    }

    async fn account(&self, id: &str, owner: Option<&str>, overdraft_limit: u64) {
        let mut body = json!({"id": id, "currency": "USD", "flags": ["debits_must_not_exceed_credits"], "overdraft_limit": overdraft_limit});
        if let Some(owner) = owner {
            body["owner"] = json!(owner);
        }
        self.expect(Who::Admin, "POST", "/v1/accounts", Some(body), 201).await;
    }

    async fn sku(&self, sku: &str, merchant: &str, price: u64) {
        let body =
            json!({"id": sku, "merchant_id": merchant, "title": sku, "price": price, "currency": "USD", "stock": 100});
        self.expect(Who::Admin, "POST", "/v1/skus", Some(body), 201).await;
    }

    async fn transfer(&self, transfer_id: &str, debit: &str, credit: &str, amount: u64) {
        let body = common::transfer(transfer_id, debit, credit, amount);
        self.expect(Who::Admin, "POST", "/v1/transfers", Some(body), 201).await;
    }

    /// A checkout (FIXME: in-process, see the top of the file).
    async fn checkout(
        &self,
        buyer: &str,
        account: &str,
        lines: &[(&str, u32)],
        capture: CaptureMode,
    ) -> Result<(orders::Checkout, Vec<orders::Order>), peakstack_domain::ErrorCode> {
        let request = CheckoutRequest {
            buyer_id: id(buyer),
            lines: lines.iter().map(|(s, q)| CartLine { sku_id: id(s), quantity: *q }).collect(),
            coupon_ids: Vec::new(),
            account_id: id(account),
            capture,
        };
        let checkout_id = self.engine().checkout(&request).await?;
        Ok(self.engine().checkout_view(&checkout_id).await.unwrap().unwrap())
    }

    async fn posted(&self, account: &str) -> (u128, u128) {
        match self.engine().account(&id(account)).await.unwrap() {
            Some(a) => (a.balances.debits_posted, a.balances.credits_posted),
            None => (0, 0),
        }
    }

    async fn gauge(&self, name: &str) -> f64 {
        let text = self.call(Who::Admin, "GET", "/metrics", None).await.text();
        assert!(text.contains(&format!("# HELP {name} ")), "HELP for {name}");
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }
}

fn amounts(movements: &Value) -> Vec<u64> {
    movements.as_array().unwrap().iter().map(|m| m["amount"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_lines_draw_and_repay_and_settlements_move_captured_money_once() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), 2).await;
    h.sku("phone", "m1", 300).await;
    h.sku("book", "m2", 80).await;
    let bank = json!({"id": "bank", "currency": "USD"});
    h.expect(Who::Admin, "POST", "/v1/accounts", Some(bank), 201).await;
    h.account("wallet.alice", Some("buyer:alice"), 0).await;
    h.transfer("fund-alice", "bank", "wallet.alice", 10_000).await;
    // Bob's credit line: 1000 to draw on, nothing in it.
    h.account("credit.bob", Some("buyer:bob"), 1_000).await;

    // A line with nothing drawn.
    let line = h.expect(Who::Admin, "GET", "/v1/credit-lines/bob", None, 200).await;
    assert_eq!(
        (line["limit"].as_u64(), line["used"].as_u64(), line["available"].as_u64()),
        (Some(1000), Some(0), Some(1000))
    );
    assert_eq!(line["account_id"], "credit.bob");

    // A checkout paid from the credit line draws on it.
    let (_, bob_orders) =
        h.checkout("bob", "credit.bob", &[("phone", 1), ("book", 1)], CaptureMode::Automatic).await.unwrap();
    let line = h.expect(Who::Admin, "GET", "/v1/credit-lines/bob", None, 200).await;
    assert_eq!((line["used"].as_u64(), line["available"].as_u64()), (Some(380), Some(620)), "{line}");
    let mut draws = amounts(&line["draws"]);
    draws.sort_unstable();
    assert_eq!(draws, [80, 300], "one draw per order: {line}");
    assert_eq!(amounts(&line["repayments"]), Vec::<u64>::new());
    // Past the limit: refused, and available never goes below zero.
    let refused = h.checkout("bob", "credit.bob", &[("phone", 3)], CaptureMode::Automatic).await;
    assert_eq!(refused.err(), Some(peakstack_domain::ErrorCode::ExceedsCredits));
    let (_, _) = h.checkout("bob", "credit.bob", &[("phone", 2)], CaptureMode::Automatic).await.unwrap();
    let line = h.expect(Who::Admin, "GET", "/v1/credit-lines/bob", None, 200).await;
    assert_eq!((line["used"].as_u64(), line["available"].as_u64()), (Some(980), Some(20)), "{line}");
    assert_eq!(
        h.checkout("bob", "credit.bob", &[("book", 1)], CaptureMode::Automatic).await.err(),
        Some(peakstack_domain::ErrorCode::ExceedsCredits)
    );
    // A repayment is a plain transfer into the line.
    h.transfer("repay-1", "bank", "credit.bob", 500).await;
    let line = h.expect(Who::Admin, "GET", "/v1/credit-lines/bob", None, 200).await;
    assert_eq!((line["used"].as_u64(), line["available"].as_u64()), (Some(480), Some(520)), "{line}");
    assert_eq!(amounts(&line["repayments"]), [500]);
    assert_eq!(line["repayments"][0]["transfer_id"], "repay-1");
    assert_eq!(line["repayments"][0]["account_id"], "bank");
    assert_eq!(line["draws"].as_array().unwrap().len(), 3);
    // Another period shows no movements, the same standing.
    let old = h.expect(Who::Admin, "GET", "/v1/credit-lines/bob?period=2001-01", None, 200).await;
    assert_eq!((old["draws"].as_array().unwrap().len(), old["repayments"].as_array().unwrap().len()), (0, 0));
    assert_eq!((old["period"].as_str(), old["used"].as_u64()), (Some("2001-01"), Some(480)));
    assert_eq!(old["period_start"], "2001-01-01T00:00:00.000Z");
    h.refused(Who::Admin, "GET", "/v1/credit-lines/bob?period=2001-13", None, 400, "invalid_request").await;
    // Who sees it: admin, read, bob's app key; nobody else, and a wallet is no credit line.
    h.expect(Who::Read, "GET", "/v1/credit-lines/bob", None, 200).await;
    h.expect(Who::App("bob"), "GET", "/v1/credit-lines/bob", None, 200).await;
    h.refused(Who::App("alice"), "GET", "/v1/credit-lines/bob", None, 404, "account_not_found").await;
    h.refused(Who::M1, "GET", "/v1/credit-lines/bob", None, 404, "account_not_found").await;
    h.refused(Who::Admin, "GET", "/v1/credit-lines/alice", None, 404, "account_not_found").await;
    h.refused(Who::Admin, "GET", "/v1/credit-lines/nobody", None, 404, "account_not_found").await;

    // Alice pays m1 by hand (authorized, then captured) and m2.
    let (checkout, alice_orders) =
        h.checkout("alice", "wallet.alice", &[("phone", 2), ("book", 1)], CaptureMode::Manual).await.unwrap();
    let capture = orders::Command::Capture { payment_id: checkout.checkout.payment_id.clone(), amount: None };
    h.engine().orders_command(capture).await.unwrap();

    // Settling is for admin keys; the body is checked.
    h.refused(Who::Read, "POST", "/v1/settlements", Some(json!({"merchant_id": "m1"})), 403, "forbidden").await;
    h.refused(Who::M1, "POST", "/v1/settlements", Some(json!({"merchant_id": "m1"})), 403, "forbidden").await;
    h.refused(Who::Admin, "POST", "/v1/settlements", Some(json!({})), 400, "invalid_request").await;
    let too_much = json!({"merchant_id": "m1", "fee_bps": 10_001});
    h.refused(Who::Admin, "POST", "/v1/settlements", Some(too_much), 400, "invalid_request").await;
    let made = h.expect(Who::Admin, "POST", "/v1/settlements", Some(json!({"merchant_id": "m1"})), 201).await;
    let made = made["data"].as_array().unwrap().clone();
    assert!(!made.is_empty() && made.len() <= 2, "one per home executor: {made:?}");
    let m1_orders: Vec<&orders::Order> =
        bob_orders.iter().chain(&alice_orders).filter(|o| o.order.merchant_id.as_str() == "m1").collect();
    let sum = |field: &str| made.iter().map(|s| s[field].as_u64().unwrap()).sum::<u64>();
    // Bob's phones (300 + 600) and Alice's (600), at the server's 2.5%.
    assert_eq!((sum("amount"), sum("fee"), sum("net")), (1500, 7 + 15 + 15, 1500 - 37));
    let lines: usize = made.iter().map(|s| s["lines"].as_array().unwrap().len()).sum();
    assert_eq!(lines, m1_orders.len() + 1, "every captured m1 part (bob's second checkout too)");
    for settlement in &made {
        assert_eq!((settlement["state"].as_str(), settlement["fee_bps"].as_u64()), (Some("completed"), Some(250)));
        assert_eq!(settlement["merchant_account_id"], "_merchant.m1.USD");
    }
    assert_eq!(h.posted("_merchant.m1.USD").await, (0, 1463));
    assert_eq!(h.posted("_fees.USD").await, (0, 37));
    for order in &m1_orders {
        let now = h.engine().order(&order.order.id).await.unwrap().unwrap();
        assert_eq!(now.payment_state, orders::PaymentState::Settled);
    }
    // Nothing new: 200 and no settlement.
    let again = h.expect(Who::Admin, "POST", "/v1/settlements", Some(json!({"merchant_id": "m1"})), 200).await;
    assert_eq!(again, json!({"data": []}));
    // A currency m2 has nothing in; then m2 at its own fee.
    let usd_less = json!({"merchant_id": "m2", "currency": "EUR"});
    assert_eq!(h.expect(Who::Admin, "POST", "/v1/settlements", Some(usd_less), 200).await, json!({"data": []}));
    let m2 =
        h.expect(Who::Admin, "POST", "/v1/settlements", Some(json!({"merchant_id": "m2", "fee_bps": 0})), 201).await;
    assert_eq!(m2["data"].as_array().unwrap().iter().map(|s| s["net"].as_u64().unwrap()).sum::<u64>(), 160);
    assert_eq!(h.posted("_merchant.m2.USD").await, (0, 160));

    // Reading them back.
    let first = made[0]["id"].as_str().unwrap();
    assert_eq!(h.expect(Who::Admin, "GET", &format!("/v1/settlements/{first}"), None, 200).await, made[0]);
    assert_eq!(h.expect(Who::M1, "GET", &format!("/v1/settlements/{first}"), None, 200).await, made[0]);
    h.refused(Who::M2, "GET", &format!("/v1/settlements/{first}"), None, 404, "settlement_not_found").await;
    h.refused(Who::App("bob"), "GET", &format!("/v1/settlements/{first}"), None, 404, "settlement_not_found").await;
    h.refused(Who::Admin, "GET", "/v1/settlements/stl_99_1", None, 404, "settlement_not_found").await;
    h.refused(Who::Admin, "GET", "/v1/settlements/nonsense", None, 404, "settlement_not_found").await;
    let listed = h.expect(Who::Read, "GET", "/v1/settlements?merchant_id=m1", None, 200).await;
    assert_eq!(listed["data"].as_array().unwrap(), &made);
    let own = h.expect(Who::M1, "GET", "/v1/settlements", None, 200).await;
    assert_eq!(own["data"].as_array().unwrap(), &made);
    let other = h.expect(Who::M2, "GET", "/v1/settlements?merchant_id=m1", None, 200).await;
    assert_eq!(other, json!({"data": []}), "nothing of another merchant");
    h.refused(Who::Admin, "GET", "/v1/settlements", None, 400, "invalid_request").await;
    let limited = h.expect(Who::Admin, "GET", "/v1/settlements?merchant_id=m1&limit=1", None, 200).await;
    assert_eq!(limited["data"].as_array().unwrap().len(), 1);
    // A refund of a settled part is refused: its money left the settle account.
    let refund = orders::Command::Refund {
        refund_id: id("r"),
        order_id: m1_orders[0].order.id.clone(),
        request: orders::RefundRequest::Amount(1),
    };
    assert_eq!(h.engine().orders_command(refund).await, Err(peakstack_domain::ErrorCode::InvalidState));
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reliable_message_is_a_dead_letter_that_a_replay_delivers() {
    let dir = tempfile::tempdir().unwrap();
    // One executor: a message to itself is refused at once and kept dead.
    let h = Harness::start(dir.path(), 1).await;
    assert_eq!(h.expect(Who::Read, "GET", "/v1/dead-letters", None, 200).await, json!({"data": []}));
    h.refused(Who::Admin, "POST", "/v1/dead-letters/msg_0_99/replay", None, 404, "message_not_found").await;
    h.refused(Who::Admin, "POST", "/v1/dead-letters/nonsense/replay", None, 404, "message_not_found").await;
    h.refused(Who::Admin, "POST", "/v1/dead-letters/msg_7_1/replay", None, 404, "message_not_found").await;
    h.refused(Who::App("bob"), "GET", "/v1/dead-letters", None, 403, "forbidden").await;
    h.refused(Who::M1, "GET", "/v1/dead-letters", None, 403, "forbidden").await;
    assert_eq!(h.gauge("peakstack_outbox_dead_letters").await, 0.0);
    assert_eq!(h.gauge("peakstack_outbox_messages").await, 0.0);

    h.sku("phone", "m1", 300).await;
    let bank = json!({"id": "bank", "currency": "USD"});
    h.expect(Who::Admin, "POST", "/v1/accounts", Some(bank), 201).await;
    h.account("wallet.alice", Some("buyer:alice"), 0).await;
    h.transfer("fund-alice", "bank", "wallet.alice", 10_000).await;
    let (checkout, _) = h.checkout("alice", "wallet.alice", &[("phone", 1)], CaptureMode::Manual).await.unwrap();
    // The unit the order holds is taken back behind its back, so the
    // return its cancel sends finds nothing sold: refused, a dead letter.
    let taken = inventory::Command::Return { sku_id: id("phone"), buyer_id: id("alice"), quantity: 1 };
    h.engine().inventory(taken).await.unwrap();
    let cancel = orders::Command::CancelPayment { payment_id: checkout.checkout.payment_id.clone() };
    h.engine().orders_command(cancel).await.unwrap();

    let dead = h.expect(Who::Read, "GET", "/v1/dead-letters", None, 200).await;
    let letters = dead["data"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dead}");
    let letter = &letters[0];
    let name = letter["id"].as_str().unwrap().to_owned();
    assert!(name.starts_with("msg_0_"), "{letter}");
    assert_eq!(letter["command"], "return 1 of sku phone (buyer alice)");
    assert_eq!((letter["attempts"].as_u64(), letter["last_error"].as_str()), (Some(1), Some("invalid_request")));
    assert!(letter["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{letter}");
    assert_eq!(h.gauge("peakstack_outbox_dead_letters").await, 1.0);
    assert_eq!(h.gauge("peakstack_outbox_messages").await, 1.0);

    // Replaying is for admin keys; refused again, it stays, counted.
    let replay = format!("/v1/dead-letters/{name}/replay");
    h.refused(Who::Read, "POST", &replay, None, 403, "forbidden").await;
    let answer = h.expect(Who::Admin, "POST", &replay, None, 200).await;
    assert_eq!(answer, json!({"id": name, "replayed": true}));
    let dead = h.expect(Who::Admin, "GET", "/v1/dead-letters", None, 200).await;
    assert_eq!(dead["data"][0]["attempts"], 2, "{dead}");
    // Once the unit is sold again, a replay gives it back and the letter is gone.
    h.checkout("alice", "wallet.alice", &[("phone", 1)], CaptureMode::Automatic).await.unwrap();
    let before = h.engine().sku(&id("phone")).await.unwrap().unwrap();
    h.expect(Who::Admin, "POST", &replay, None, 200).await;
    let after = h.engine().sku(&id("phone")).await.unwrap().unwrap();
    assert_eq!((before.sold - after.sold, after.available() - before.available()), (1, 1));
    assert_eq!(h.expect(Who::Admin, "GET", "/v1/dead-letters", None, 200).await, json!({"data": []}));
    h.refused(Who::Admin, "POST", &replay, None, 404, "message_not_found").await;
    assert_eq!(h.gauge("peakstack_outbox_dead_letters").await, 0.0);
    h.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_settles_every_merchant_with_captured_money() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start_with(dir.path(), 2, Some(std::time::Duration::from_secs(1))).await;
    h.sku("phone", "m1", 300).await;
    h.sku("book", "m2", 80).await;
    let bank = json!({"id": "bank", "currency": "USD"});
    h.expect(Who::Admin, "POST", "/v1/accounts", Some(bank), 201).await;
    h.account("wallet.alice", Some("buyer:alice"), 0).await;
    h.transfer("fund-alice", "bank", "wallet.alice", 10_000).await;
    h.checkout("alice", "wallet.alice", &[("phone", 1), ("book", 1)], CaptureMode::Automatic).await.unwrap();
    let mut settled = (0, 0);
    for _ in 0..100 {
        settled = (h.posted("_merchant.m1.USD").await.1, h.posted("_merchant.m2.USD").await.1);
        if settled == (293, 78) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(settled, (293, 78), "both merchants settled at the server's fee within a few rounds");
    for merchant in ["m1", "m2"] {
        let listed = h.expect(Who::Read, "GET", &format!("/v1/settlements?merchant_id={merchant}"), None, 200).await;
        assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{merchant}: {listed}");
    }
    assert_eq!(h.posted("_fees.USD").await, (0, 7 + 2));
    h.server.stop().await;
}
