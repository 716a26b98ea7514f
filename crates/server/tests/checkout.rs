//! Checkouts, orders, payments and refunds through the HTTP API,
//! black-box over real HTTP on two executors: a checkout costs what its
//! quote said and moves the money to each merchant; a refused one changes
//! nothing; captures, cancels and refunds move money once, however they
//! race; who sees and does what; bad input is a 400 that changes nothing.

mod common;

use std::collections::BTreeMap;

use common::{client_with_key, create_key, open_engine, Answer, Running};
use peakstack_domain::Id;
use serde_json::{json, Value};

const PAST: &str = "2020-01-01T00:00:00Z";
const FUTURE: &str = "2099-01-01T00:00:00Z";

#[derive(Clone, Copy, Debug)]
enum Who<'a> {
    Admin,
    Read,
    /// An app key acting for this buyer.
    App(&'a str),
    M1,
    M2,
}

struct Shop {
    server: Running,
    admin: reqwest::Client,
    read: reqwest::Client,
    app: reqwest::Client,
    m1: reqwest::Client,
    m2: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Shop {
    /// A server on two executors with keys of every scope, a funding
    /// account, and SKUs: m1's a and b (1000 each, 100 in stock), m2's c
    /// (1000, 100), m3's d (100, 100) and m3's last (50, 3 in stock).
    async fn open() -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let admin = client_with_key(&create_key(dir.path(), "admin").await);
        let read = client_with_key(&create_key(dir.path(), "read").await);
        let app = client_with_key(&create_key(dir.path(), "app").await);
        let m1 = client_with_key(&create_key(dir.path(), "merchant:m1").await);
        let m2 = client_with_key(&create_key(dir.path(), "merchant:m2").await);
        let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
        let server = Running::start(engine, common::loopback_config(dir.path())).await;
        let shop = Shop { server, admin, read, app, m1, m2, _dir: dir };
        shop.ok("POST", "/v1/accounts", json!({"id": "bank", "currency": "USD"}), 201).await;
        for (id, merchant, price, stock) in [
            ("a", "m1", 1000, 100),
            ("b", "m1", 1000, 100),
            ("c", "m2", 1000, 100),
            ("d", "m3", 100, 100),
            ("last", "m3", 50, 3),
        ] {
            let sku = json!({"id": id, "merchant_id": merchant, "title": "Thing", "price": price, "currency": "USD",
                "stock": stock});
            shop.ok("POST", "/v1/skus", sku, 201).await;
        }
        shop
    }

    async fn call(&self, who: Who<'_>, method: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> Answer {
        let client = match who {
            Who::Admin => &self.admin,
            Who::Read => &self.read,
            Who::App(_) => &self.app,
            Who::M1 => &self.m1,
            Who::M2 => &self.m2,
        };
        let mut request = client.request(method.parse().unwrap(), self.server.url(path));
        if let Who::App(buyer) = who {
            request = request.header("x-buyer-id", buyer);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    async fn send(&self, who: Who<'_>, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call(who, method, path, body.as_ref(), None).await
    }

    /// An admin request that must answer `status`; its body.
    async fn ok(&self, method: &str, path: &str, body: Value, status: u16) -> Value {
        let body = (method == "POST").then_some(body);
        let answer = self.send(Who::Admin, method, path, body).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.text());
        answer.body
    }

    async fn get(&self, path: &str) -> Value {
        self.ok("GET", path, Value::Null, 200).await
    }

    /// A wallet of `buyer` (it cannot go below zero) with `balance` in it.
    async fn wallet(&self, name: &str, buyer: &str, balance: u64) {
        let account = json!({"id": name, "currency": "USD", "owner": format!("buyer:{buyer}"),
            "flags": ["debits_must_not_exceed_credits"]});
        self.ok("POST", "/v1/accounts", account, 201).await;
        let fund = common::transfer(&format!("fund-{name}"), "bank", name, balance);
        self.ok("POST", "/v1/transfers", fund, 201).await;
    }

    /// (debits_posted, credits_posted, debits_pending) of an account.
    async fn balances(&self, account: &str) -> (u64, u64, u64) {
        let a = self.get(&format!("/v1/accounts/{account}")).await;
        let n = |field: &str| a[field].as_str().unwrap().parse::<u64>().unwrap();
        (n("debits_posted"), n("credits_posted"), n("debits_pending"))
    }

    /// The pending-settlement account of `merchant` for checkouts paid from `wallet`.
    fn settle(&self, wallet: &str, merchant: &str) -> String {
        let shard = self.server.engine.layout().shard_of_account(&Id::parse(wallet).unwrap());
        format!("_settle.{shard}.USD.{merchant}")
    }

    /// (available, sold) of a SKU.
    async fn stock(&self, sku: &str) -> (u64, u64) {
        let s = self.get(&format!("/v1/skus/{sku}")).await;
        (s["available"].as_u64().unwrap(), s["sold"].as_u64().unwrap())
    }

    async fn coupon_states(&self, buyer: &str) -> Vec<(String, String)> {
        let listed = self.get(&format!("/v1/coupons?buyer_id={buyer}")).await;
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_str().unwrap().to_owned(), c["state"].as_str().unwrap().to_owned()))
            .collect()
    }

    /// A coupon of `template` (created if new: 500 off over 2000) for `buyer`.
    async fn coupon(&self, template: &str, buyer: &str) -> String {
        let spec = json!({"id": template, "currency": "USD", "discount": {"type": "amount_off", "amount": 500},
            "min_spend": 2000, "valid_from": PAST, "valid_until": FUTURE, "total_issue": 100});
        let created = self.send(Who::Admin, "POST", "/v1/coupon-templates", Some(spec)).await;
        assert!(created.status == 201 || created.status == 200, "{}", created.text());
        let path = format!("/v1/coupon-templates/{template}/issue");
        let issued = self.ok("POST", &path, json!({"buyer_id": buyer}), 201).await;
        issued["id"].as_str().unwrap().to_owned()
    }

    /// What a buyer's checkouts could have changed: the stock of every
    /// SKU, the wallet and the settle accounts' balances, the buyer's
    /// coupons and orders.
    async fn snapshot(&self, wallet: &str, buyer: &str) -> Value {
        let mut stock = BTreeMap::new();
        for sku in ["a", "b", "c", "d", "last"] {
            stock.insert(sku, self.stock(sku).await);
        }
        let mut settles = BTreeMap::new();
        for merchant in ["m1", "m2", "m3"] {
            let id = self.settle(wallet, merchant);
            let account = self.send(Who::Admin, "GET", &format!("/v1/accounts/{id}"), None).await;
            // A settle account not made yet holds nothing (see
            // `refused_checkouts_change_nothing`).
            let balance = match account.status {
                404 => json!("0"),
                _ => account.body["balance"].clone(),
            };
            settles.insert(merchant, balance);
        }
        let orders = self.get(&format!("/v1/orders?buyer_id={buyer}")).await;
        json!({"stock": stock, "wallet": self.balances(wallet).await, "settles": settles,
            "coupons": self.coupon_states(buyer).await, "orders": orders["data"]})
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

fn cart(lines: &[(&str, u32)], coupons: &[&str], account: &str, capture: &str) -> Value {
    let lines: Vec<Value> = lines.iter().map(|(sku, q)| json!({"sku_id": sku, "quantity": q})).collect();
    json!({"lines": lines, "coupon_ids": coupons, "payment": {"account_id": account, "capture": capture}})
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_else(|| panic!("a string: {value}")).to_owned()
}

fn amount(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("an amount: {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_merchant_cart_costs_what_its_quote_said_and_pays_each_merchant() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    let promotion = json!({"id": "m1-ten", "currency": "USD", "kind": {"type": "percent_off", "percent": 10},
        "scope": {"merchant_id": "m1"}, "starts_at": PAST, "ends_at": FUTURE, "budget": 100_000});
    shop.ok("POST", "/v1/promotions", promotion, 201).await;
    let coupon = shop.coupon("welcome", "b1").await;
    let lines = [("a", 1), ("b", 2), ("c", 1)];
    let quote = shop
        .send(
            Who::App("b1"),
            "POST",
            "/v1/quotes",
            Some(json!({"lines": [{"sku_id": "a", "quantity": 1},
            {"sku_id": "b", "quantity": 2}, {"sku_id": "c", "quantity": 1}], "coupon_ids": [coupon]})),
        )
        .await;
    assert_eq!(quote.status, 200, "{}", quote.text());
    let total = amount(&quote.body["total"]);
    assert!(amount(&quote.body["discount"]) > 500, "the promotion and the coupon both apply: {}", quote.text());

    let placed =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&lines, &[&coupon], "w-b1", "automatic"))).await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let checkout = &placed.body;
    assert_eq!(amount(&checkout["total"]), total, "the checkout's total is the quote's, to the minor unit");
    assert_eq!(amount(&checkout["subtotal"]), amount(&quote.body["subtotal"]));
    assert_eq!(amount(&checkout["discount"]), amount(&quote.body["discount"]));
    assert_eq!(
        (text(&checkout["state"]), text(&checkout["buyer_id"]), text(&checkout["capture"])),
        ("completed".into(), "b1".into(), "automatic".into())
    );
    assert_eq!(checkout["coupon_ids"], json!([coupon]));
    let orders = checkout["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 2, "one order per merchant");
    for merchant in quote.body["merchants"].as_array().unwrap() {
        let order = orders.iter().find(|o| o["merchant_id"] == merchant["merchant_id"]).unwrap();
        assert_eq!(amount(&order["total"]), amount(&merchant["total"]), "{merchant}");
        assert_eq!((text(&order["state"]), text(&order["payment_state"])), ("paid".into(), "captured".into()));
        assert_eq!(amount(&order["amount_captured"]), amount(&order["total"]));
        let line_sum: u64 = order["lines"].as_array().unwrap().iter().map(|l| amount(&l["total"])).sum();
        assert_eq!(line_sum, amount(&order["total"]));
        let m = text(&merchant["merchant_id"]);
        let (_, credited, _) = shop.balances(&shop.settle("w-b1", &m)).await;
        assert_eq!(credited, amount(&order["total"]), "{m}'s pending settlement holds its order");
    }
    let payment = &checkout["payment"];
    assert_eq!((text(&payment["state"]), amount(&payment["amount_captured"])), ("captured".into(), total));
    assert_eq!(payment["authorization_expires_at"], Value::Null);
    assert_eq!(shop.balances("w-b1").await, (total, 10_000, 0), "the wallet paid the total, once");
    assert_eq!(shop.stock("b").await, (98, 2));
    assert_eq!(shop.coupon_states("b1").await, vec![(coupon.clone(), "used".to_owned())]);
    let promotion = shop.get("/v1/promotions/m1-ten").await;
    assert_eq!(amount(&promotion["given"]), 300, "10% of m1's 3000");

    // The reads show what the checkout answered.
    let id = text(&checkout["id"]);
    assert_eq!(shop.get(&format!("/v1/checkouts/{id}")).await, placed.body);
    let payment_id = text(&payment["id"]);
    assert_eq!(&shop.get(&format!("/v1/payments/{payment_id}")).await, payment);
    let order_id = text(&orders[0]["id"]);
    assert_eq!(&shop.get(&format!("/v1/orders/{order_id}")).await, &orders[0]);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_checkouts_change_nothing() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    let coupon = shop.coupon("welcome", "b1").await;
    let first = cart(&[("a", 3)], &[&coupon], "w-b1", "automatic");
    assert_eq!(shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(first)).await.status, 201);
    let before = shop.snapshot("w-b1", "b1").await;
    for (body, status, code) in [
        (cart(&[("b", 1), ("last", 4)], &[], "w-b1", "automatic"), 422, "out_of_stock"),
        (cart(&[("a", 3)], &[&coupon], "w-b1", "automatic"), 422, "coupon_already_used"),
        (cart(&[("b", 9), ("c", 2)], &[], "w-b1", "manual"), 422, "exceeds_credits"),
        (cart(&[("b", 1), ("nope", 1)], &[], "w-b1", "automatic"), 404, "sku_not_found"),
    ] {
        let answer = shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(body.clone())).await;
        answer.assert_problem(status, code, &body.to_string());
        assert_eq!(shop.snapshot("w-b1", "b1").await, before, "{code} changed nothing");
    }
    // Across executors a refused checkout may leave the (empty) pending-
    // settlement accounts its transfers would have credited: the protocol
    // holds legs on them, so they are opened before the try (a merchant's
    // settlement account on a shard is opened by the first checkout to pay
    // it; see flows.rs). No money moved.
    let m3 = shop.get(&format!("/v1/accounts/{}", shop.settle("w-b1", "m3"))).await;
    assert_eq!((m3["debits_posted"].as_str(), m3["credits_posted"].as_str()), (Some("0"), Some("0")));
    assert_eq!((m3["debits_pending"].as_str(), m3["credits_pending"].as_str()), (Some("0"), Some("0")));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_capture_in_part_once_and_cancels_before_capture_only() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 100_000).await;
    let placed = shop
        .send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("a", 1), ("c", 3)], &[], "w-b1", "manual")))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let payment = &placed.body["payment"];
    let pay = text(&payment["id"]);
    assert_eq!((text(&payment["state"]), amount(&payment["amount_authorized"])), ("requires_capture".into(), 4000));
    assert!(payment["authorization_expires_at"].is_string());
    assert_eq!(shop.balances("w-b1").await, (0, 100_000, 4000), "held, not paid");
    let capture = format!("/v1/payments/{pay}/capture");

    shop.send(Who::Admin, "POST", &capture, Some(json!({"amount": 4001}))).await.assert_problem(
        422,
        "amount_exceeds_authorized",
        "more than authorized",
    );
    shop.send(Who::App("b1"), "POST", &capture, Some(json!({}))).await.assert_problem(403, "forbidden", "app capture");
    let captured = shop.send(Who::Admin, "POST", &capture, Some(json!({"amount": 1000}))).await;
    assert_eq!(captured.status, 200, "{}", captured.text());
    let parts = captured.body["parts"].as_array().unwrap();
    let shares: Vec<u64> = parts.iter().map(|p| amount(&p["amount_captured"])).collect();
    assert_eq!(shares, vec![250, 750], "shared 1000:3000 over the orders");
    // Capturing twice captures once.
    let again = shop.send(Who::Admin, "POST", &capture, Some(json!({"amount": 1000}))).await;
    assert_eq!((again.status, amount(&again.body["amount_captured"])), (200, 1000), "{}", again.text());
    assert_eq!(shop.balances("w-b1").await, (1000, 100_000, 0), "1000 paid, the rest of the hold released");
    let audit = shop.get(&format!("/v1/audit?action=payment.capture&target={pay}")).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 1, "one capture, one record: {audit}");
    shop.send(Who::App("b1"), "POST", &format!("/v1/payments/{pay}/cancel"), None).await.assert_problem(
        422,
        "invalid_state",
        "cancel after capture",
    );

    // Another: canceled by the buyer, then neither captured nor canceled again.
    let second =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("c", 1)], &[], "w-b1", "manual"))).await;
    let pay2 = text(&second.body["payment"]["id"]);
    let order2 = text(&second.body["orders"][0]["id"]);
    shop.send(Who::App("b1"), "POST", &format!("/v1/orders/{order2}/refunds"), Some(json!({"amount": 1})))
        .await
        .assert_problem(403, "forbidden", "a buyer does not refund itself");
    shop.send(Who::Admin, "POST", &format!("/v1/orders/{order2}/refunds"), Some(json!({"amount": 1})))
        .await
        .assert_problem(422, "invalid_state", "refund before capture");
    let canceled = shop.send(Who::App("b1"), "POST", &format!("/v1/payments/{pay2}/cancel"), None).await;
    assert_eq!((canceled.status, text(&canceled.body["state"])), (200, "canceled".into()), "{}", canceled.text());
    assert_eq!(shop.balances("w-b1").await, (1000, 100_000, 0), "the hold is released");
    let late = shop.send(Who::Admin, "POST", &format!("/v1/payments/{pay2}/capture"), Some(json!({}))).await;
    late.assert_problem(422, "invalid_state", "capture after cancel");

    // One order of a manual checkout, canceled by its merchant.
    let third = shop
        .send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("a", 1), ("c", 1)], &[], "w-b1", "manual")))
        .await;
    let orders = third.body["orders"].as_array().unwrap();
    let of_m1 = text(&orders.iter().find(|o| o["merchant_id"] == "m1").unwrap()["id"]);
    shop.send(Who::M2, "POST", &format!("/v1/orders/{of_m1}/cancel"), None).await.assert_problem(
        404,
        "order_not_found",
        "another merchant's order",
    );
    let canceled = shop.send(Who::M1, "POST", &format!("/v1/orders/{of_m1}/cancel"), None).await;
    assert_eq!((canceled.status, text(&canceled.body["state"])), (200, "canceled".into()), "{}", canceled.text());
    assert_eq!(shop.balances("w-b1").await, (1000, 100_000, 1000), "m2's order is still held");
    let pay3 = text(&third.body["payment"]["id"]);
    let rest = shop.send(Who::Admin, "POST", &format!("/v1/payments/{pay3}/capture"), Some(json!({}))).await;
    assert_eq!(amount(&rest.body["amount_captured"]), 1000, "{}", rest.text());
    assert_eq!(shop.balances("w-b1").await, (2000, 100_000, 0));
    let audits = shop.get("/v1/audit?action=order.cancel").await;
    assert_eq!(audits["data"][0]["target"], of_m1.as_str(), "{audits}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_by_amount_and_by_lines_never_exceed_the_capture() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    let placed =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("d", 3)], &[], "w-b1", "automatic"))).await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let order = text(&placed.body["orders"][0]["id"]);
    let refunds = format!("/v1/orders/{order}/refunds");
    let settle = shop.settle("w-b1", "m3");
    assert_eq!(shop.balances(&settle).await.1, 300);

    let by_lines =
        shop.send(Who::Admin, "POST", &refunds, Some(json!({"lines": [{"line_id": 1, "quantity": 2}]}))).await;
    assert_eq!(by_lines.status, 201, "{}", by_lines.text());
    assert_eq!(
        (amount(&by_lines.body["amount"]), &by_lines.body["lines"]),
        (200, &json!([{"line_id": 1, "quantity": 2}]))
    );
    let refund_id = text(&by_lines.body["id"]);
    assert_eq!(shop.get(&format!("/v1/refunds/{refund_id}")).await, by_lines.body);
    assert_eq!(shop.balances("w-b1").await, (300, 10_200, 0), "200 back to the wallet");
    assert_eq!(shop.balances(&settle).await.0, 200, "out of m3's pending settlement");
    shop.send(Who::Admin, "POST", &refunds, Some(json!({"lines": [{"line_id": 1, "quantity": 2}]})))
        .await
        .assert_problem(422, "refund_exceeds_captured", "more units than are left");
    shop.send(Who::Admin, "POST", &refunds, Some(json!({"amount": 101}))).await.assert_problem(
        422,
        "refund_exceeds_captured",
        "more than is left",
    );
    let by_amount = shop.send(Who::Admin, "POST", &refunds, Some(json!({"amount": 100}))).await;
    assert_eq!((by_amount.status, amount(&by_amount.body["amount"])), (201, 100), "{}", by_amount.text());
    let order = shop.get(&format!("/v1/orders/{order}")).await;
    assert_eq!((text(&order["state"]), amount(&order["amount_refunded"])), ("refunded".into(), 300));
    assert_eq!(order["lines"][0]["refunded_quantity"], 2);
    assert_eq!(order["refunds"].as_array().unwrap().len(), 2);
    assert_eq!(shop.balances("w-b1").await, (300, 10_300, 0));
    let audit = shop.get("/v1/audit?action=refund.create").await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 2, "{audit}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_refunds_give_back_at_most_what_was_captured() {
    let shop = std::sync::Arc::new(Shop::open().await);
    shop.wallet("w-b1", "b1", 10_000).await;
    let placed =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("d", 1)], &[], "w-b1", "automatic"))).await;
    let order = text(&placed.body["orders"][0]["id"]);
    assert_eq!(amount(&placed.body["total"]), 100);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (shop, path) = (shop.clone(), format!("/v1/orders/{order}/refunds"));
            tokio::spawn(async move { shop.send(Who::Admin, "POST", &path, Some(json!({"amount": 60}))).await })
        })
        .collect();
    let mut made = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            201 => made += 1,
            _ => answer.assert_problem(422, "refund_exceeds_captured", "a losing refund"),
        }
    }
    assert_eq!(made, 1, "one refund of 60 fits a capture of 100");
    let order = shop.get(&format!("/v1/orders/{order}")).await;
    assert_eq!((amount(&order["amount_refunded"]), amount(&order["amount_captured"])), (60, 100));
    assert_eq!(shop.balances("w-b1").await, (100, 10_060, 0), "60 back, once");
    std::sync::Arc::into_inner(shop).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_checkouts_sell_exactly_the_stock_and_use_a_coupon_once() {
    let shop = std::sync::Arc::new(Shop::open().await);
    let buyers: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    for buyer in &buyers {
        shop.wallet(&format!("w-{buyer}"), buyer, 10_000).await;
    }
    let mut tasks = Vec::new();
    for buyer in buyers.clone() {
        let shop = shop.clone();
        tasks.push(tokio::spawn(async move {
            let body = cart(&[("last", 1)], &[], &format!("w-{buyer}"), "automatic");
            shop.send(Who::App(&buyer), "POST", "/v1/checkouts", Some(body)).await
        }));
    }
    let mut sold = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            201 => sold += 1,
            _ => answer.assert_problem(422, "out_of_stock", "a buyer too late"),
        }
    }
    assert_eq!(sold, 3, "the three units, no more");
    assert_eq!(shop.stock("last").await, (0, 3));
    let m3 = shop.get("/v1/orders?merchant_id=m3").await;
    assert_eq!(m3["data"].as_array().unwrap().iter().filter(|o| o["state"] == "paid").count(), 3);

    // One coupon, five checkouts at once.
    shop.wallet("w-b1", "b1", 100_000).await;
    let coupon = shop.coupon("once", "b1").await;
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (shop, coupon) = (shop.clone(), coupon.clone());
            tokio::spawn(async move {
                let body = cart(&[("a", 3)], &[&coupon], "w-b1", "automatic");
                shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(body)).await
            })
        })
        .collect();
    let mut used = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            201 => used += 1,
            _ => answer.assert_problem(422, "coupon_already_used", "a checkout that lost the coupon"),
        }
    }
    assert_eq!(used, 1);
    assert_eq!(shop.coupon_states("b1").await, vec![(coupon, "used".to_owned())]);
    assert_eq!(shop.balances("w-b1").await, (2500, 100_000, 0), "3000 less the coupon's 500, paid once");
    std::sync::Arc::into_inner(shop).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_replays_the_checkout_and_moves_money_once() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    let body = cart(&[("a", 1)], &[], "w-b1", "automatic");
    let first = shop.call(Who::App("b1"), "POST", "/v1/checkouts", Some(&body), Some("k-1")).await;
    assert_eq!(first.status, 201, "{}", first.text());
    let again = shop.call(Who::App("b1"), "POST", "/v1/checkouts", Some(&body), Some("k-1")).await;
    assert_eq!((again.status, &again.raw), (201, &first.raw), "the same checkout, byte for byte");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let orders = shop.get("/v1/orders?buyer_id=b1").await;
    assert_eq!(orders["data"].as_array().unwrap().len(), 1, "one order: {orders}");
    assert_eq!(shop.balances("w-b1").await, (1000, 10_000, 0), "paid once");
    assert_eq!(shop.stock("a").await, (99, 1));
    let other = cart(&[("a", 2)], &[], "w-b1", "automatic");
    let reused = shop.call(Who::App("b1"), "POST", "/v1/checkouts", Some(&other), Some("k-1")).await;
    reused.assert_problem(422, "idempotency_key_reused", "another cart under the same key");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_key_sees_and_does_what_its_scope_allows() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    shop.wallet("w-b2", "b2", 10_000).await;
    let before = shop.snapshot("w-b1", "b1").await;
    // Another buyer's account is answered as if it did not exist.
    let theirs = cart(&[("a", 1)], &[], "w-b2", "automatic");
    shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(theirs.clone())).await.assert_problem(
        404,
        "account_not_found",
        "another buyer's wallet",
    );
    let mut named = cart(&[("a", 1)], &[], "w-b1", "automatic");
    named["buyer_id"] = json!("b2");
    shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(named)).await.assert_problem(403, "forbidden", "b2");
    let platform = cart(&[("a", 1)], &[], "bank", "automatic");
    shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(platform)).await.assert_problem(
        404,
        "account_not_found",
        "a platform account",
    );
    shop.send(Who::Read, "POST", "/v1/checkouts", Some(cart(&[("a", 1)], &[], "w-b1", "automatic")))
        .await
        .assert_problem(403, "forbidden", "a read key");
    shop.send(Who::M1, "POST", "/v1/checkouts", Some(cart(&[("a", 1)], &[], "w-b1", "automatic")))
        .await
        .assert_problem(403, "forbidden", "a merchant key");
    let missing = cart(&[("a", 1)], &[], "nobody", "automatic");
    let mut admin_missing = missing.clone();
    admin_missing["buyer_id"] = json!("b1");
    shop.send(Who::Admin, "POST", "/v1/checkouts", Some(admin_missing)).await.assert_problem(
        404,
        "account_not_found",
        "no such account",
    );
    assert_eq!(shop.snapshot("w-b1", "b1").await, before);

    // An admin pays for b2 from b2's wallet; b1 checks out itself.
    let mut for_b2 = cart(&[("a", 1), ("c", 1)], &[], "w-b2", "manual");
    for_b2["buyer_id"] = json!("b2");
    let b2 = shop.send(Who::Admin, "POST", "/v1/checkouts", Some(for_b2)).await;
    assert_eq!(b2.status, 201, "{}", b2.text());
    let b1 =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("a", 1)], &[], "w-b1", "automatic"))).await;
    assert_eq!(b1.status, 201, "{}", b1.text());
    let checkout = text(&b2.body["id"]);
    let payment = text(&b2.body["payment"]["id"]);
    let m1_order =
        text(&b2.body["orders"].as_array().unwrap().iter().find(|o| o["merchant_id"] == "m1").unwrap()["id"]);
    let m2_order =
        text(&b2.body["orders"].as_array().unwrap().iter().find(|o| o["merchant_id"] == "m2").unwrap()["id"]);

    // b1's app key sees none of b2's; merchants see their orders only.
    for (who, path, code) in [
        (Who::App("b1"), format!("/v1/checkouts/{checkout}"), "checkout_not_found"),
        (Who::App("b1"), format!("/v1/payments/{payment}"), "payment_not_found"),
        (Who::App("b1"), format!("/v1/orders/{m1_order}"), "order_not_found"),
        (Who::M1, format!("/v1/checkouts/{checkout}"), "checkout_not_found"),
        (Who::M1, format!("/v1/payments/{payment}"), "payment_not_found"),
        (Who::M1, format!("/v1/orders/{m2_order}"), "order_not_found"),
        (Who::Admin, "/v1/checkouts/chk_0_999".to_owned(), "checkout_not_found"),
        (Who::Admin, "/v1/orders/ord_0_999".to_owned(), "order_not_found"),
        (Who::Admin, "/v1/payments/pay_0_999".to_owned(), "payment_not_found"),
        (Who::Admin, "/v1/refunds/rfd_0_999".to_owned(), "refund_not_found"),
        (Who::Admin, "/v1/refunds/not-a-refund".to_owned(), "refund_not_found"),
    ] {
        shop.send(who, "GET", &path, None).await.assert_problem(404, code, &format!("{who:?} {path}"));
    }
    shop.send(Who::App("b1"), "POST", &format!("/v1/payments/{payment}/cancel"), None).await.assert_problem(
        404,
        "payment_not_found",
        "another buyer's payment",
    );
    for (who, path) in [
        (Who::App("b2"), format!("/v1/checkouts/{checkout}")),
        (Who::App("b2"), format!("/v1/payments/{payment}")),
        (Who::M1, format!("/v1/orders/{m1_order}")),
        (Who::Read, format!("/v1/checkouts/{checkout}")),
        (Who::Read, format!("/v1/payments/{payment}")),
        (Who::Read, format!("/v1/orders/{m2_order}")),
    ] {
        assert_eq!(shop.send(who, "GET", &path, None).await.status, 200, "{who:?} {path}");
    }
    let listed = |answer: Answer| -> Vec<String> {
        assert_eq!(answer.status, 200, "{}", answer.text());
        answer.body["data"].as_array().unwrap().iter().map(|o| text(&o["id"])).collect()
    };
    let of_m1 = listed(shop.send(Who::M1, "GET", "/v1/orders", None).await);
    assert_eq!(of_m1.len(), 2, "b1's and b2's m1 orders: {of_m1:?}");
    assert!(of_m1.contains(&m1_order) && !of_m1.contains(&m2_order));
    let b1_orders = listed(shop.send(Who::App("b1"), "GET", "/v1/orders", None).await);
    assert_eq!(b1_orders, vec![text(&b1.body["orders"][0]["id"])]);
    assert_eq!(listed(shop.send(Who::Read, "GET", "/v1/orders", None).await).len(), 3);
    let paged = shop.send(Who::Admin, "GET", "/v1/orders?limit=2", None).await;
    let next = text(&paged.body["next"]);
    let rest = listed(shop.send(Who::Admin, "GET", &format!("/v1/orders?limit=2&after={next}"), None).await);
    assert_eq!(rest.len(), 1, "three orders over two pages");
    shop.send(Who::M1, "GET", "/v1/orders?merchant_id=m2", None).await.assert_problem(403, "forbidden", "m2's list");
    shop.send(Who::App("b1"), "GET", "/v1/orders?buyer_id=b2", None).await.assert_problem(403, "forbidden", "b2's");

    // Refunds: the order's merchant refunds; the other merchant sees nothing of it.
    let captured = shop.send(Who::Admin, "POST", &format!("/v1/payments/{payment}/capture"), Some(json!({}))).await;
    assert_eq!(captured.status, 200, "{}", captured.text());
    let path = format!("/v1/orders/{m1_order}/refunds");
    shop.send(Who::M2, "POST", &path, Some(json!({"amount": 1}))).await.assert_problem(404, "order_not_found", "m2");
    let refund = shop.send(Who::M1, "POST", &path, Some(json!({"amount": 1}))).await;
    assert_eq!(refund.status, 201, "{}", refund.text());
    let refund_path = format!("/v1/refunds/{}", text(&refund.body["id"]));
    shop.send(Who::M2, "GET", &refund_path, None).await.assert_problem(404, "refund_not_found", "m2 reads m1's");
    shop.send(Who::App("b1"), "GET", &refund_path, None).await.assert_problem(404, "refund_not_found", "b1");
    for who in [Who::M1, Who::App("b2"), Who::Read] {
        assert_eq!(shop.send(who, "GET", &refund_path, None).await.status, 200, "{who:?}");
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_a_400_problem_and_changes_nothing() {
    let shop = Shop::open().await;
    shop.wallet("w-b1", "b1", 10_000).await;
    let placed =
        shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(cart(&[("a", 2)], &[], "w-b1", "manual"))).await;
    let payment = text(&placed.body["payment"]["id"]);
    let order = text(&placed.body["orders"][0]["id"]);
    let before = shop.snapshot("w-b1", "b1").await;
    let mut unknown = cart(&[("a", 1)], &[], "w-b1", "automatic");
    unknown["tip"] = json!(5);
    let mut unknown_in_payment = cart(&[("a", 1)], &[], "w-b1", "automatic");
    unknown_in_payment["payment"]["method"] = json!("card");
    let too_many: Vec<Value> = (0..101).map(|i| json!({"sku_id": format!("s{i}"), "quantity": 1})).collect();
    for (body, says) in [
        (unknown, "tip"),
        (unknown_in_payment, "method"),
        (cart(&[], &[], "w-b1", "automatic"), "lines: 1 to 100 lines, got 0"),
        (json!({"lines": too_many, "payment": {"account_id": "w-b1"}}), "lines: 1 to 100 lines, got 101"),
        (cart(&[("a", 0)], &[], "w-b1", "automatic"), "lines[0].quantity: from 1 to 100000, got 0"),
        (cart(&[("a", 100_001)], &[], "w-b1", "automatic"), "lines[0].quantity"),
        (cart(&[("a", 1), ("a", 2)], &[], "w-b1", "automatic"), "lines[1].sku_id"),
        (cart(&[("a", 1)], &["c1", "c1"], "w-b1", "automatic"), "coupon_ids[1]"),
        (cart(&[("a", 1)], &["c1", "c2", "c3", "c4", "c5"], "w-b1", "automatic"), "coupon_ids: at most 4"),
        (cart(&[("a", 1)], &[], "w-b1", "later"), "capture"),
        (cart(&[("bad sku", 1)], &[], "w-b1", "automatic"), "lines[0].sku_id"),
        (json!({"lines": [{"sku_id": "a", "quantity": 1}]}), "payment"),
    ] {
        let answer = shop.send(Who::App("b1"), "POST", "/v1/checkouts", Some(body.clone())).await;
        answer.assert_problem(400, "invalid_request", &body.to_string());
        assert!(answer.detail().contains(says), "{body}: {}", answer.detail());
    }
    // An admin must name the buyer.
    let answer =
        shop.send(Who::Admin, "POST", "/v1/checkouts", Some(cart(&[("a", 1)], &[], "w-b1", "automatic"))).await;
    answer.assert_problem(400, "invalid_request", "no buyer_id");
    let refunds = format!("/v1/orders/{order}/refunds");
    for (body, says) in [
        (json!({"amount": 5, "lines": [{"line_id": 1, "quantity": 1}]}), "exactly one"),
        (json!({}), "exactly one"),
        (json!({"amount": 0}), "amount"),
        (json!({"lines": []}), "lines: 1 to 64"),
        (json!({"lines": [{"line_id": 1, "quantity": 0}]}), "lines[0].quantity"),
        (json!({"lines": [{"line_id": 1, "quantity": 1}, {"line_id": 1, "quantity": 1}]}), "lines[1].line_id"),
        (json!({"amount": 5, "reason": "x"}), "reason"),
    ] {
        let answer = shop.send(Who::Admin, "POST", &refunds, Some(body.clone())).await;
        answer.assert_problem(400, "invalid_request", &body.to_string());
        assert!(answer.detail().contains(says), "{body}: {}", answer.detail());
    }
    let capture = format!("/v1/payments/{payment}/capture");
    for body in [json!({"amount": 0}), json!({"amount": 5, "when": "now"})] {
        shop.send(Who::Admin, "POST", &capture, Some(body.clone())).await.assert_problem(
            400,
            "invalid_request",
            &body.to_string(),
        );
    }
    shop.send(Who::Admin, "GET", "/v1/orders?limit=0", None).await.assert_problem(400, "invalid_request", "limit 0");
    assert_eq!(shop.snapshot("w-b1", "b1").await, before, "no refused request changed anything");
    let payment = shop.get(&format!("/v1/payments/{payment}")).await;
    assert_eq!(payment["state"], "requires_capture");
    shop.stop().await;
}
