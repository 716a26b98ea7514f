//! Promotions, coupon templates, coupons and quotes through the HTTP API,
//! black-box: every endpoint, the codes, a quote's breakdown with its
//! shares adding up, and racing checkouts' branches for the last of a
//! budget and for one single-use coupon (driven through the engine, as the
//! next issue's checkout will).

mod common;

use std::sync::Arc;

use common::{client_with_key, create_key, open_engine, Answer, Running};
use peakstack_domain::{ErrorCode, Id};
use peakstack_engine::pricing::Command;
use serde_json::{json, Value};

async fn send(server: &Running, client: &reqwest::Client, method: &str, path: &str, body: Option<Value>) -> Answer {
    let mut request = client.request(method.parse().unwrap(), server.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    Answer::read(request.send().await.unwrap()).await
}

const PAST: &str = "2020-01-01T00:00:00Z";
const FUTURE: &str = "2099-01-01T00:00:00Z";

fn sku(id: &str, merchant: &str, price: u64) -> Value {
    json!({"id": id, "merchant_id": merchant, "title": "Thing", "price": price, "currency": "USD", "stock": 100})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotions_coupons_and_quotes_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let admin = client_with_key(&create_key(dir.path(), "admin").await);
    let m1 = client_with_key(&create_key(dir.path(), "merchant:m1").await);
    let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
    let server = Running::start(engine, common::loopback_config(dir.path())).await;

    for (id, merchant, price) in [("a", "m1", 1000), ("b", "m1", 1000), ("c", "m2", 1000)] {
        assert_eq!(send(&server, &admin, "POST", "/v1/skus", Some(sku(id, merchant, price))).await.status, 201);
    }
    let ten_percent = json!({"id": "p10", "currency": "USD", "kind": {"type": "percent_off", "percent": 10},
        "starts_at": PAST, "ends_at": FUTURE, "budget": 100000});
    let created = send(&server, &m1, "POST", "/v1/promotions", Some(ten_percent.clone())).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.body["scope"]["merchant_id"], "m1", "a merchant's promotion is scoped to it by default");
    assert_eq!(send(&server, &m1, "POST", "/v1/promotions", Some(ten_percent)).await.status, 200);
    let everything = json!({"id": "p-all", "currency": "USD", "kind": {"type": "amount_off", "amount": 1000},
        "starts_at": PAST, "ends_at": FUTURE});
    let mut theirs = everything.clone();
    theirs["scope"] = json!({"merchant_id": "m2"});
    assert_eq!(send(&server, &m1, "POST", "/v1/promotions", Some(theirs)).await.status, 403);
    let mut their_sku = everything.clone();
    their_sku["scope"] = json!({"sku_ids": ["a", "c"]});
    send(&server, &m1, "POST", "/v1/promotions", Some(their_sku)).await.assert_problem(
        404,
        "sku_not_found",
        "a merchant's promotion on another merchant's SKU",
    );
    let all = send(&server, &admin, "POST", "/v1/promotions", Some(everything)).await;
    assert_eq!(all.status, 201, "{}", all.text());
    let bad = json!({"id": "bad", "currency": "USD", "kind": {"type": "percent_off", "percent": 0},
        "starts_at": PAST, "ends_at": FUTURE});
    send(&server, &admin, "POST", "/v1/promotions", Some(bad)).await.assert_problem(400, "invalid_request", "0%");
    send(&server, &admin, "GET", "/v1/promotions/nope", None).await.assert_problem(404, "promotion_not_found", "?");
    let p10 = send(&server, &admin, "GET", "/v1/promotions/p10", None).await;
    assert_eq!((p10.body["given"].as_u64(), p10.body["budget"].as_u64()), (Some(0), Some(100000)));

    let template = json!({"id": "welcome", "currency": "USD", "discount": {"type": "amount_off", "amount": 500},
        "min_spend": 2000, "valid_from": PAST, "valid_until": FUTURE, "total_issue": 2});
    assert_eq!(send(&server, &admin, "POST", "/v1/coupon-templates", Some(template)).await.status, 201);
    let issue = |buyer: &str| json!({"buyer_id": buyer});
    let first = send(&server, &admin, "POST", "/v1/coupon-templates/welcome/issue", Some(issue("b1"))).await;
    assert_eq!((first.status, first.body["state"].as_str()), (201, Some("available")), "{}", first.text());
    let coupon = first.body["id"].as_str().unwrap().to_owned();
    assert!(coupon.starts_with("cpn_"), "{coupon}");
    assert_eq!(
        send(&server, &admin, "POST", "/v1/coupon-templates/welcome/issue", Some(issue("b2"))).await.status,
        201
    );
    send(&server, &admin, "POST", "/v1/coupon-templates/welcome/issue", Some(issue("b3"))).await.assert_problem(
        422,
        "coupons_exhausted",
        "past total_issue",
    );
    send(&server, &admin, "POST", "/v1/coupon-templates/nope/issue", Some(issue("b3"))).await.assert_problem(
        404,
        "coupon_not_found",
        "an unknown template",
    );
    let template = send(&server, &admin, "GET", "/v1/coupon-templates/welcome", None).await;
    assert_eq!(template.body["issued"], 2);
    let listed = send(&server, &admin, "GET", "/v1/coupons?buyer_id=b1", None).await;
    assert_eq!(listed.body["data"][0]["id"], coupon.as_str(), "{}", listed.text());

    // A quote: 3 lines from 2 merchants. p10 takes 10% of m1's lines, p-all
    // 10.00 off the rest shared over the three lines, the coupon 5.00 more.
    let cart = json!({"buyer_id": "b1", "lines": [{"sku_id": "a", "quantity": 1}, {"sku_id": "b", "quantity": 2},
        {"sku_id": "c", "quantity": 1}], "coupon_ids": [coupon]});
    let quote = send(&server, &admin, "POST", "/v1/quotes", Some(cart.clone())).await;
    assert_eq!(quote.status, 200, "{}", quote.text());
    let total = quote.body["total"].as_u64().unwrap();
    let subtotal = quote.body["subtotal"].as_u64().unwrap();
    assert_eq!(subtotal, 4000);
    assert_eq!(subtotal - quote.body["discount"].as_u64().unwrap(), total);
    let lines = quote.body["lines"].as_array().unwrap();
    let line_totals: u64 = lines.iter().map(|l| l["total"].as_u64().unwrap()).sum();
    assert_eq!(line_totals, total, "lines add up to the total");
    for applied in quote.body["applied"].as_array().unwrap() {
        let source = applied.get("promotion_id").or(applied.get("coupon_id")).unwrap();
        let shares: u64 = lines
            .iter()
            .flat_map(|l| l["discounts"].as_array().unwrap())
            .filter(|d| d.get("promotion_id").or(d.get("coupon_id")) == Some(source))
            .map(|d| d["amount"].as_u64().unwrap())
            .sum();
        assert_eq!(shares, applied["amount"].as_u64().unwrap(), "the shares of {source} add up");
    }
    assert!(
        quote.body["applied"].as_array().unwrap().iter().any(|a| a["coupon_id"] == coupon.as_str()),
        "{}",
        quote.text()
    );
    // Same cart, same answer, byte for byte; nothing was consumed.
    assert_eq!(send(&server, &admin, "POST", "/v1/quotes", Some(cart)).await.raw, quote.raw);
    let unknown = json!({"buyer_id": "b1", "lines": [{"sku_id": "nope", "quantity": 1}]});
    send(&server, &admin, "POST", "/v1/quotes", Some(unknown)).await.assert_problem(404, "sku_not_found", "?");
    let someone_elses = json!({"buyer_id": "b2", "lines": [{"sku_id": "a", "quantity": 3}], "coupon_ids": [coupon]});
    let answer = send(&server, &admin, "POST", "/v1/quotes", Some(someone_elses)).await;
    answer.assert_problem(422, "coupon_not_applicable", "another buyer's coupon");
    // An expired coupon, a coupon in use, a cart of two currencies.
    let expired = json!({"id": "old", "currency": "USD", "discount": {"type": "percent_off", "percent": 5},
        "valid_from": PAST, "valid_until": "2021-01-01T00:00:00Z", "total_issue": 1});
    assert_eq!(send(&server, &admin, "POST", "/v1/coupon-templates", Some(expired)).await.status, 201);
    send(&server, &admin, "POST", "/v1/coupon-templates/old/issue", Some(issue("b1"))).await.assert_problem(
        422,
        "coupon_expired",
        "issuing from a template past its validity",
    );
    let soon = humantime::format_rfc3339_millis(std::time::SystemTime::now() + std::time::Duration::from_millis(800));
    let brief = json!({"id": "brief", "currency": "USD", "discount": {"type": "percent_off", "percent": 5},
        "valid_from": PAST, "valid_until": soon.to_string(), "total_issue": 1});
    assert_eq!(send(&server, &admin, "POST", "/v1/coupon-templates", Some(brief)).await.status, 201);
    let old = send(&server, &admin, "POST", "/v1/coupon-templates/brief/issue", Some(issue("b1"))).await;
    let old_id = old.body["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    let with_old = json!({"buyer_id": "b1", "lines": [{"sku_id": "a", "quantity": 3}], "coupon_ids": [old_id]});
    send(&server, &admin, "POST", "/v1/quotes", Some(with_old)).await.assert_problem(
        422,
        "coupon_expired",
        "old coupon",
    );
    let locked = server
        .engine
        .pricing(Command::LockCoupon {
            txn: 77,
            coupon_id: Id::parse(&coupon).unwrap(),
            buyer_id: Id::parse("b1").unwrap(),
            deadline_ms: peakstack_server::idempotency::now_ms() + 60_000,
        })
        .await;
    assert!(locked.is_ok(), "{locked:?}");
    let with_locked = json!({"buyer_id": "b1", "lines": [{"sku_id": "a", "quantity": 3}], "coupon_ids": [coupon]});
    send(&server, &admin, "POST", "/v1/quotes", Some(with_locked)).await.assert_problem(
        422,
        "coupon_already_used",
        "a coupon another checkout holds",
    );
    let mut eur = sku("e", "m2", 500);
    eur["currency"] = json!("EUR");
    assert_eq!(send(&server, &admin, "POST", "/v1/skus", Some(eur)).await.status, 201);
    let mixed = json!({"buyer_id": "b1", "lines": [{"sku_id": "a", "quantity": 1}, {"sku_id": "e", "quantity": 1}]});
    send(&server, &admin, "POST", "/v1/quotes", Some(mixed)).await.assert_problem(
        422,
        "currency_mismatch",
        "USD and EUR",
    );
    let empty = json!({"buyer_id": "b1", "lines": []});
    send(&server, &admin, "POST", "/v1/quotes", Some(empty)).await.assert_problem(400, "invalid_request", "no lines");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_branches_never_spend_a_budget_twice_nor_a_coupon() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
    let server = Running::start(engine.clone(), common::insecure_config(dir.path())).await;
    let client = reqwest::Client::new();
    let promotion = json!({"id": "last", "currency": "USD", "kind": {"type": "amount_off", "amount": 300},
        "starts_at": PAST, "ends_at": FUTURE, "budget": 1000});
    assert_eq!(send(&server, &client, "POST", "/v1/promotions", Some(promotion)).await.status, 201);
    let template = json!({"id": "once", "currency": "USD", "discount": {"type": "amount_off", "amount": 100},
        "valid_from": PAST, "valid_until": FUTURE, "total_issue": 1});
    assert_eq!(send(&server, &client, "POST", "/v1/coupon-templates", Some(template)).await.status, 201);
    let issued =
        send(&server, &client, "POST", "/v1/coupon-templates/once/issue", Some(json!({"buyer_id": "b1"}))).await;
    let coupon = Id::parse(issued.body["id"].as_str().unwrap()).unwrap();

    // 20 checkouts at once each try 300 of a budget of 1000, and lock the one coupon.
    let engine = Arc::new(engine);
    let deadline_ms = peakstack_server::idempotency::now_ms() + 60_000;
    let mut tasks = Vec::new();
    for txn in 1..=20u64 {
        let (engine, coupon) = (engine.clone(), coupon.clone());
        tasks.push(tokio::spawn(async move {
            let consume = engine
                .pricing(Command::TryConsume {
                    txn,
                    promotion_id: Id::parse("last").unwrap(),
                    buyer_id: Id::parse(&format!("b{txn}")).unwrap(),
                    discount: 300,
                    deadline_ms,
                })
                .await;
            let lock = engine
                .pricing(Command::LockCoupon {
                    txn,
                    coupon_id: coupon,
                    buyer_id: Id::parse("b1").unwrap(),
                    deadline_ms,
                })
                .await;
            (consume.is_ok(), lock)
        }));
    }
    let (mut consumed, mut locked) = (0, 0);
    for task in tasks {
        let (consume, lock) = task.await.unwrap();
        consumed += usize::from(consume);
        match lock {
            Ok(_) => locked += 1,
            Err(code) => {
                assert!(matches!(code, ErrorCode::CouponAlreadyUsed | ErrorCode::CouponNotApplicable), "{code:?}")
            }
        }
    }
    assert_eq!(consumed, 3, "three of 300 fit a budget of 1000");
    assert_eq!(locked, 1, "one checkout locks the coupon");
    let promotion = send(&server, &client, "GET", "/v1/promotions/last", None).await;
    assert_eq!(promotion.body["reserved"], 900, "{}", promotion.text());
    let coupons = send(&server, &client, "GET", "/v1/coupons?buyer_id=b1", None).await;
    assert_eq!(coupons.body["data"][0]["state"], "locked");
    Arc::try_unwrap(engine).ok();
    server.stop().await;
}
