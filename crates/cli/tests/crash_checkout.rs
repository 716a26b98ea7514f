//! Checkouts under kill -9: a real `peakstack serve` process takes
//! concurrent checkouts from funded buyer wallets for two merchants' SKUs
//! of limited stock, automatic and manual capture, with captures, cancels
//! and refunds between them, and is killed with SIGKILL at a moment that
//! differs from run to run. Restarted on the same data dir, once nothing
//! is in flight:
//! - every checkout answered 201 exists, completed, with its orders, and
//!   every capture, cancel and refund answered before the kill holds;
//! - no order is left pending, and an order whose checkout was never
//!   answered belongs to a checkout in flight at the kill;
//! - per SKU, sold is the units of its live orders (authorized, paid or
//!   refunded: not canceled, not failed), nothing is reserved, and
//!   available + sold is the stock;
//! - each wallet's books are its orders': debits_posted the captured sum,
//!   credits_posted its funding plus the refunded sum, debits_pending
//!   what its orders awaiting capture hold;
//! - each merchant's settle accounts hold its orders' net, and the ledger
//!   as a whole balances.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{client, create_key, free_port, start, terminate, wait_ready};
use serde_json::{json, Value};

/// (id, merchant, price, stock): some sell out within the two seconds
/// before the kill, so some checkouts are refused `out_of_stock`.
const SKUS: &[(&str, &str, u64, u64)] =
    &[("s1", "m1", 300, 400), ("s2", "m1", 500, 250), ("s3", "m2", 200, 600), ("s4", "m2", 900, 100)];
const BUYERS: usize = 30;
const FUNDING: u64 = 50_000;
const WRITERS: usize = 12;
/// Checkouts per writer: the kill comes well before the last.
const CHECKOUTS_PER_WRITER: usize = 400;
/// The kill comes this long after the first checkout is answered, plus
/// up to `KILL_SPREAD_MS` more, chosen per run.
const KILL_AFTER_MS: u64 = 200;
const KILL_SPREAD_MS: u64 = 1_800;
const FLAGS: &[&str] = &["--shards", "16", "--executors", "2"];
/// Every wait of this test gives up after this long.
const WAIT_BOUND: Duration = Duration::from_secs(15);
const PAGE_LIMIT: usize = 100;

struct Server {
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.send(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.send(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "POST {path}: {answer}");
        answer
    }

    /// Every item of a paged list.
    async fn all(&self, path: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        let separator = if path.contains('?') { '&' } else { '?' };
        for _ in 0..1_000 {
            let page = match &after {
                None => self.get(&format!("{path}{separator}limit={PAGE_LIMIT}")).await,
                Some(after) => self.get(&format!("{path}{separator}limit={PAGE_LIMIT}&after={after}")).await,
            };
            items.extend(page["data"].as_array().unwrap_or_else(|| panic!("{path}: {page}")).iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return items,
            }
        }
        panic!("{path}: more pages than this test makes");
    }

    async fn open_shop(&self) {
        self.post("/v1/accounts", json!({"id": "bank", "currency": "USD"})).await;
        for (id, merchant, price, stock) in SKUS {
            let sku = json!({"id": id, "merchant_id": merchant, "title": "Thing", "price": price, "currency": "USD",
                "stock": stock});
            self.post("/v1/skus", sku).await;
        }
        for n in 0..BUYERS {
            let account = json!({"id": wallet(n), "currency": "USD", "owner": format!("buyer:{}", buyer(n)),
                "flags": ["debits_must_not_exceed_credits"]});
            self.post("/v1/accounts", account).await;
            let fund = json!({"id": format!("fund-{n}"), "debit_account_id": "bank", "credit_account_id": wallet(n),
                "amount": FUNDING, "currency": "USD"});
            self.post("/v1/transfers", fund).await;
        }
    }

    /// Waits (bounded) until no global transaction is in flight.
    async fn settle_down(&self) {
        let deadline = Instant::now() + WAIT_BOUND;
        loop {
            let in_flight = self.get("/v1/transactions?state=in_flight").await;
            if in_flight["data"].as_array().unwrap_or_else(|| panic!("{in_flight}")).is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still in flight after {WAIT_BOUND:?}: {in_flight}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn buyer(n: usize) -> String {
    format!("b{n}")
}

fn wallet(n: usize) -> String {
    format!("w-b{n}")
}

fn amount(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("an amount: {value}"))
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_else(|| panic!("a string: {value}")).to_owned()
}

/// A balance field of an account (balances are strings).
fn balance(account: &Value, field: &str) -> u64 {
    account[field].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{field} of {account}"))
}

/// A small xorshift generator: the run's choices differ by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1
}

/// What one acknowledged checkout is known to be, from the answers seen.
#[derive(Debug)]
struct Acked {
    buyer: String,
    orders: BTreeSet<String>,
    payment: String,
    /// The payment's state answered last: 201's, then a capture's or cancel's 200.
    payment_state: String,
    /// Refunds answered 201, per order: the sum refunded.
    refunded: BTreeMap<String, u64>,
    /// A capture, cancel or refund sent and not answered (the kill came):
    /// it may or may not have happened.
    unanswered_action: bool,
}

/// What the writers saw.
#[derive(Default)]
struct Seen {
    acked: BTreeMap<String, Acked>,
    /// Checkouts sent and not answered: each writer's last one at the kill.
    unanswered: usize,
    /// Refused checkouts, by code.
    refused: BTreeMap<String, usize>,
    odd: Vec<String>,
}

/// One writer: checkouts for its buyers until its first transport error
/// (the server is gone) or its bound, with a capture, cancel or refund
/// after some of them.
async fn write(server: Arc<Server>, seen: Arc<Mutex<Seen>>, w: usize, mut rng: Rng) {
    let post = |path: String, body: Value| {
        let server = server.clone();
        async move {
            let response = server.client.post(format!("{}{path}", server.base)).json(&body).send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.json::<Value>().await.ok()?))
        }
    };
    for n in 0..CHECKOUTS_PER_WRITER {
        let b = (w + n * WRITERS) % BUYERS;
        let mut lines = Vec::new();
        for (sku, ..) in SKUS {
            if rng.below(3) == 0 {
                lines.push(json!({"sku_id": sku, "quantity": 1 + rng.below(2)}));
            }
        }
        if lines.is_empty() {
            lines.push(json!({"sku_id": SKUS[rng.below(SKUS.len() as u64) as usize].0, "quantity": 1}));
        }
        let capture = if rng.below(2) == 0 { "automatic" } else { "manual" };
        let cart = json!({"buyer_id": buyer(b), "lines": lines, "coupon_ids": [],
            "payment": {"account_id": wallet(b), "capture": capture}});
        seen.lock().unwrap().unanswered += 1;
        let Some((status, placed)) = post("/v1/checkouts".into(), cart).await else { return };
        if !seen.lock().unwrap().placed(status, &placed, buyer(b)) {
            continue;
        }
        let (id, payment) = (text(&placed["id"]), text(&placed["payment"]["id"]));
        // Then, sometimes: capture or cancel a manual payment; refund a
        // part of an automatic one's first order.
        let (path, body) = match (capture, rng.below(3)) {
            ("manual", 0) => (format!("/v1/payments/{payment}/capture"), json!({})),
            ("manual", 1) => (format!("/v1/payments/{payment}/cancel"), json!({})),
            ("automatic", 0) => {
                let order = &placed["orders"][0];
                let part = 1 + rng.below(amount(&order["total"]) / 2);
                (format!("/v1/orders/{}/refunds", text(&order["id"])), json!({"amount": part}))
            }
            _ => continue,
        };
        seen.lock().unwrap().acked.get_mut(&id).unwrap().unanswered_action = true;
        let Some((status, answer)) = post(path.clone(), body.clone()).await else { return };
        seen.lock().unwrap().answered(&id, status, &answer, || format!("{path} {body}"));
    }
}

impl Seen {
    /// Records a checkout's answer; whether it was a 201.
    fn placed(&mut self, status: u16, placed: &Value, buyer: String) -> bool {
        self.unanswered -= 1;
        match (status, placed["code"].as_str()) {
            (201, _) => {}
            (422, Some(code @ ("out_of_stock" | "exceeds_credits"))) => {
                *self.refused.entry(code.to_owned()).or_default() += 1;
                return false;
            }
            _ => {
                self.odd.push(format!("checkout: {status} {placed}"));
                return false;
            }
        }
        let acked = Acked {
            buyer,
            orders: placed["orders"].as_array().unwrap().iter().map(|o| text(&o["id"])).collect(),
            payment: text(&placed["payment"]["id"]),
            payment_state: text(&placed["payment"]["state"]),
            refunded: BTreeMap::new(),
            unanswered_action: false,
        };
        self.acked.insert(text(&placed["id"]), acked);
        true
    }

    /// Records the answer to a capture, cancel (200) or refund (201) of checkout `id`.
    fn answered(&mut self, id: &str, status: u16, answer: &Value, request: impl Fn() -> String) {
        let acked = self.acked.get_mut(id).unwrap();
        acked.unanswered_action = false;
        match status {
            200 => acked.payment_state = text(&answer["state"]),
            201 => *acked.refunded.entry(text(&answer["order_id"])).or_default() += amount(&answer["amount"]),
            _ => self.odd.push(format!("{}: {status} {answer}", request())),
        }
    }
}

/// Every order, by buyer, read after the restart.
async fn orders_by_buyer(server: &Server) -> BTreeMap<String, Vec<Value>> {
    let mut by_buyer = BTreeMap::new();
    for n in 0..BUYERS {
        by_buyer.insert(buyer(n), server.all(&format!("/v1/orders?buyer_id={}", buyer(n))).await);
    }
    by_buyer
}

/// The acknowledged checkouts and their effects hold.
async fn check_acknowledged(server: &Server, acked: &BTreeMap<String, Acked>, orders: &BTreeMap<&str, &Value>) {
    for (id, seen) in acked {
        let checkout = server.get(&format!("/v1/checkouts/{id}")).await;
        assert_eq!(
            (checkout["state"].as_str(), checkout["buyer_id"].as_str()),
            (Some("completed"), Some(&*seen.buyer))
        );
        let ids: BTreeSet<String> = checkout["orders"].as_array().unwrap().iter().map(|o| text(&o["id"])).collect();
        assert_eq!(ids, seen.orders, "{id}'s orders");
        assert_eq!(checkout["payment"]["id"].as_str(), Some(&*seen.payment), "{checkout}");
        let state = text(&checkout["payment"]["state"]);
        match seen.unanswered_action {
            false => assert_eq!(state, seen.payment_state, "{id}: the last answer holds"),
            // A capture or cancel at the kill did or did not happen.
            true => assert!(
                [&*seen.payment_state, "captured", "canceled"].contains(&&*state),
                "{id}: {state} after {}",
                seen.payment_state
            ),
        }
        for order in &seen.orders {
            let listed = orders.get(order.as_str()).unwrap_or_else(|| panic!("{order} of {id} not listed"));
            let (refunded, known) =
                (amount(&listed["amount_refunded"]), seen.refunded.get(order).copied().unwrap_or(0));
            match seen.unanswered_action {
                false => assert_eq!(refunded, known, "{order}: the refunds answered 201"),
                true => assert!(refunded >= known, "{order}: {refunded} refunded, {known} answered"),
            }
        }
    }
}

/// Per SKU: sold is the units of the live orders, nothing is reserved.
async fn check_stock(server: &Server, orders: &BTreeMap<&str, &Value>) {
    let mut units: BTreeMap<String, u64> = BTreeMap::new();
    for order in orders.values() {
        if matches!(order["state"].as_str(), Some("authorized" | "paid" | "refunded")) {
            for line in order["lines"].as_array().unwrap() {
                *units.entry(text(&line["sku_id"])).or_default() += amount(&line["quantity"]);
            }
        }
    }
    for (id, _, _, stock) in SKUS {
        let sku = server.get(&format!("/v1/skus/{id}")).await;
        let sold = units.get(*id).copied().unwrap_or(0);
        assert_eq!((amount(&sku["sold"]), amount(&sku["reserved"])), (sold, 0), "{sku}");
        assert_eq!(amount(&sku["available"]) + sold, *stock, "{sku}");
    }
}

/// Captured less refunded, and held: the sums over `orders`.
fn net_and_held<'a>(orders: impl Iterator<Item = &'a Value>) -> (u64, u64, u64) {
    let (mut captured, mut refunded, mut held) = (0, 0, 0);
    for order in orders {
        captured += amount(&order["amount_captured"]);
        refunded += amount(&order["amount_refunded"]);
        if order["payment_state"] == "requires_capture" {
            held += amount(&order["amount_authorized"]);
        }
    }
    (captured, refunded, held)
}

/// Each wallet's books are its orders'; each merchant's settle accounts
/// hold its orders' net; the ledger balances.
async fn check_money(server: &Server, by_buyer: &BTreeMap<String, Vec<Value>>) {
    for n in 0..BUYERS {
        let account = server.get(&format!("/v1/accounts/{}", wallet(n))).await;
        let (captured, refunded, held) = net_and_held(by_buyer[&buyer(n)].iter());
        assert_eq!(
            [balance(&account, "debits_posted"), balance(&account, "credits_posted")],
            [captured, FUNDING + refunded],
            "{account}"
        );
        assert_eq!([balance(&account, "debits_pending"), balance(&account, "credits_pending")], [held, 0], "{account}");
    }
    let accounts = server.all("/v1/accounts").await;
    let total = |field: &str| accounts.iter().map(|a| balance(a, field)).sum::<u64>();
    assert_eq!(total("debits_posted"), total("credits_posted"), "the ledger balances, posted");
    assert_eq!(total("debits_pending"), total("credits_pending"), "the ledger balances, pending");
    for merchant in ["m1", "m2"] {
        let settles = accounts.iter().filter(|a| {
            let id = text(&a["id"]);
            id.starts_with("_settle.") && id.ends_with(&format!(".{merchant}"))
        });
        let (mut net, mut held) = (0, 0);
        for settle in settles {
            net += balance(settle, "credits_posted") - balance(settle, "debits_posted");
            held += balance(settle, "credits_pending") - balance(settle, "debits_pending");
        }
        let of_merchant = by_buyer.values().flatten().filter(|o| o["merchant_id"] == merchant);
        let (captured, refunded, authorized) = net_and_held(of_merchant);
        assert_eq!((net, held), (captured - refunded, authorized), "{merchant}'s settle accounts");
    }
}

async fn start_server(dir: &std::path::Path, port: u16, key: &str) -> (std::process::Child, Server) {
    let server = Server { base: format!("http://127.0.0.1:{port}"), client: client(key) };
    let child = start(dir, port, FLAGS);
    wait_ready(&server.client, &server.base).await;
    (child, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_checkouts_and_their_money_survive_sigkill() {
    let started = Instant::now();
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = create_key(dir.path(), "admin");
    let (mut child, server) = start_server(dir.path(), port, &key).await;
    server.open_shop().await;

    let server = Arc::new(server);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write(server.clone(), seen.clone(), w, Rng(rng.below(u64::MAX) | 1))))
        .collect();
    let deadline = Instant::now() + WAIT_BOUND;
    while seen.lock().unwrap().acked.is_empty() {
        assert!(Instant::now() < deadline, "no checkout answered within {WAIT_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let kill_after_ms = KILL_AFTER_MS + rng.below(KILL_SPREAD_MS);
    tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.odd.is_empty(), "unexpected answers: {:?}", seen.odd);
    assert!(seen.unanswered <= WRITERS, "{} unanswered", seen.unanswered);
    eprintln!(
        "killed {kill_after_ms} ms after the first checkout: {} acknowledged, refused {:?}, {} in flight",
        seen.acked.len(),
        seen.refused,
        seen.unanswered
    );

    let (child, server) = start_server(dir.path(), port, &key).await;
    server.settle_down().await;
    let by_buyer = orders_by_buyer(&server).await;
    let orders: BTreeMap<&str, &Value> = by_buyer.values().flatten().map(|o| (o["id"].as_str().unwrap(), o)).collect();
    for order in orders.values() {
        assert_ne!(order["state"], "pending", "nothing is in flight: {order}");
    }
    // Orders of checkouts never answered: of those in flight at the kill.
    let unseen: BTreeSet<&str> =
        orders.values().map(|o| o["checkout_id"].as_str().unwrap()).filter(|c| !seen.acked.contains_key(*c)).collect();
    assert!(unseen.len() <= seen.unanswered, "{unseen:?}: more than the {} in flight", seen.unanswered);
    check_acknowledged(&server, &seen.acked, &orders).await;
    check_stock(&server, &orders).await;
    check_money(&server, &by_buyer).await;
    terminate(child);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}
