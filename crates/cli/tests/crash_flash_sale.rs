//! Flash-sale reservations under kill -9 and across a clean restart: a real
//! `peakstack serve` process sells a sale of 30 units to concurrent buyers.
//!
//! Killed with SIGKILL mid-stream and restarted on the same data dir:
//! - every attempt answered 201 before the kill has its reservation,
//!   reserved, for its buyer;
//! - the sale's sold + reserved is the number of its reservations that
//!   exist (the acknowledged ones and any of the few in flight at the kill),
//!   never more than 30, and the SKU agrees;
//! - new attempts sell exactly what remains, then answer `sold_out`;
//! - and a clean restart after that changes nothing.
//!
//! Stopped with SIGTERM and restarted: the same numbers hold, confirmed and
//! cancelled reservations included, and a sold-out sale stays sold out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{client, create_key, free_port, start, terminate, wait_ready};
use serde_json::{json, Value};

const UNITS: u64 = 30;
/// The SKU's stock: 20 units stay off the sale, and must stay available.
const STOCK: u64 = 50;
const WRITERS: usize = 16;
/// Attempts per writer: enough to sell out with room to spare.
const ATTEMPTS_PER_WRITER: usize = 100;
const SKU: &str = "phone";
const SALE: &str = "d11";
const FLAGS: &[&str] = &["--shards", "16", "--executors", "2"];
/// Every wait of these tests gives up after this long.
const WAIT_BOUND: Duration = Duration::from_secs(10);

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

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn open_sale(&self) {
        let sku = json!({"id": SKU, "merchant_id": "m1", "title": "Phone", "price": 99900, "currency": "CNY",
                         "stock": STOCK});
        let (status, body) = self.post("/v1/skus", sku).await;
        assert_eq!(status, 201, "{body}");
        let sale = json!({"id": SALE, "sku_id": SKU, "price": 1, "quantity": UNITS,
                          "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
                          "per_buyer_limit": 1, "pay_within_seconds": 3600});
        let (status, body) = self.post("/v1/flash-sales", sale).await;
        assert_eq!(status, 201, "{body}");
    }

    async fn attempt(&self, buyer: &str) -> (u16, Value) {
        self.post(&format!("/v1/flash-sales/{SALE}/attempts"), json!({"buyer_id": buyer, "quantity": 1})).await
    }

    /// The sale's (sold, reserved, remaining), checked against its SKU.
    async fn books(&self) -> (u64, u64, u64) {
        let (status, sale) = self.get(&format!("/v1/flash-sales/{SALE}")).await;
        assert_eq!(status, 200, "{sale}");
        let field = |v: &Value, name: &str| v[name].as_u64().unwrap_or_else(|| panic!("{name} in {v}"));
        let (sold, reserved, remaining) = (field(&sale, "sold"), field(&sale, "reserved"), field(&sale, "remaining"));
        assert_eq!(sold + reserved + remaining, UNITS, "{sale}");
        let (status, sku) = self.get(&format!("/v1/skus/{SKU}")).await;
        assert_eq!(status, 200, "{sku}");
        assert_eq!(
            (field(&sku, "sold"), field(&sku, "reserved"), field(&sku, "on_flash_sale"), field(&sku, "available")),
            (sold, reserved, remaining, STOCK - UNITS),
            "the SKU agrees with its only sale: {sku}"
        );
        (sold, reserved, remaining)
    }

    /// Fresh buyers try one at a time: exactly `remaining` win, then the
    /// sale answers `sold_out`.
    async fn sell_the_rest(&self, prefix: &str, remaining: u64) {
        for n in 0..remaining {
            let (status, body) = self.attempt(&format!("{prefix}-{n}")).await;
            assert_eq!(status, 201, "unit {n} of the {remaining} remaining: {body}");
        }
        for n in 0..3 {
            let (status, body) = self.attempt(&format!("{prefix}-late-{n}")).await;
            assert_eq!((status, body["code"].as_str()), (422, Some("sold_out")), "{body}");
        }
        assert_eq!(self.books().await.2, 0);
    }

    /// The reservation, which must exist and be of this sale and buyer.
    async fn reservation(&self, id: &str, buyer: &str) -> Value {
        let (status, r) = self.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(status, 200, "reservation {id} of buyer {buyer}: {r}");
        assert_eq!((r["flash_sale_id"].as_str(), r["buyer_id"].as_str()), (Some(SALE), Some(buyer)), "{r}");
        assert_eq!(r["quantity"], 1, "{r}");
        r
    }
}

async fn start_server(dir: &std::path::Path, port: u16, key: &str) -> (std::process::Child, Server) {
    let server = Server { base: format!("http://127.0.0.1:{port}"), client: client(key) };
    let child = start(dir, port, FLAGS);
    wait_ready(&server.client, &server.base).await;
    (child, server)
}

/// What the writers saw: each buyer's reservation id for a 201, every
/// buyer tried, and every answer that was neither a 201 nor `sold_out`.
#[derive(Default)]
struct Seen {
    won: BTreeMap<String, String>,
    tried: BTreeSet<String>,
    refused: BTreeSet<String>,
    odd: Vec<String>,
}

/// `WRITERS` concurrent writers, each trying for distinct buyers until
/// its first transport error (the server is gone) or its bound.
fn spawn_writers(server: &Arc<Server>, seen: &Arc<Mutex<Seen>>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (server, seen) = (server.clone(), seen.clone());
            tokio::spawn(async move {
                for n in 0..ATTEMPTS_PER_WRITER {
                    let buyer = format!("b{w}-{n}");
                    seen.lock().unwrap().tried.insert(buyer.clone());
                    let body = json!({"buyer_id": buyer, "quantity": 1});
                    let url = format!("{}/v1/flash-sales/{SALE}/attempts", server.base);
                    let Ok(response) = server.client.post(url).json(&body).send().await else { return };
                    let status = response.status().as_u16();
                    let Ok(answer) = response.json::<Value>().await else { return };
                    let mut seen = seen.lock().unwrap();
                    match (status, answer["code"].as_str()) {
                        (201, _) => {
                            seen.won.insert(buyer, answer["id"].as_str().unwrap().to_owned());
                        }
                        (422, Some("sold_out")) => {
                            seen.refused.insert(buyer);
                        }
                        _ => seen.odd.push(format!("{buyer}: {status} {answer}")),
                    }
                }
            })
        })
        .collect()
}

/// `rsv_<shard>_<sequence>`: a reservation id's shard and sequence.
fn shard_and_sequence(id: &str) -> (u32, u64) {
    let rest = id.strip_prefix("rsv_").unwrap_or_else(|| panic!("{id} is not a reservation id"));
    let (shard, sequence) = rest.split_once('_').unwrap();
    (shard.parse().unwrap(), sequence.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_flash_sale_reservations_survive_sigkill() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = create_key(dir.path(), "admin");
    let (mut child, server) = start_server(dir.path(), port, &key).await;
    server.open_sale().await;

    // Kill once some units are acknowledged, at a point that differs from
    // run to run (from 5 to 24 of the 30).
    let kill_after = 5 + (std::process::id() as usize % 20);
    let server = Arc::new(server);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let writers = spawn_writers(&server, &seen);
    let deadline = Instant::now() + WAIT_BOUND;
    while seen.lock().unwrap().won.len() < kill_after {
        assert!(Instant::now() < deadline, "fewer than {kill_after} units won within {WAIT_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.odd.is_empty(), "answers other than won and sold_out: {:?}", seen.odd);
    assert!(seen.won.len() >= kill_after && seen.won.len() as u64 <= UNITS, "{} won", seen.won.len());
    // Each writer had at most one attempt in flight at the kill.
    let unanswered: BTreeSet<&String> =
        seen.tried.iter().filter(|b| !seen.won.contains_key(*b) && !seen.refused.contains(*b)).collect();
    assert!(unanswered.len() <= WRITERS, "{} unanswered", unanswered.len());

    let (child, server) = start_server(dir.path(), port, &key).await;
    // Every acknowledged attempt has its reservation, still reserved.
    for (buyer, id) in &seen.won {
        let r = server.reservation(id, buyer).await;
        assert_eq!(r["state"], "reserved", "{r}");
    }
    // The sale's reservations are numbered from 1 on its SKU's shard: find
    // every one that exists, acknowledged or not, past the last that does.
    let (shard, _) = shard_and_sequence(seen.won.values().next().unwrap());
    let mut existing: BTreeMap<String, String> = BTreeMap::new();
    let mut sequence = 1;
    let mut missing_in_a_row = 0;
    while missing_in_a_row < 2 * WRITERS {
        let id = format!("rsv_{shard}_{sequence}");
        let (status, r) = server.get(&format!("/v1/reservations/{id}")).await;
        match status {
            200 => {
                missing_in_a_row = 0;
                let buyer = r["buyer_id"].as_str().unwrap().to_owned();
                assert_eq!((r["flash_sale_id"].as_str(), r["state"].as_str()), (Some(SALE), Some("reserved")), "{r}");
                let acknowledged = seen.won.get(&buyer) == Some(&id);
                assert!(
                    acknowledged || unanswered.contains(&buyer),
                    "{id} is of buyer {buyer}, whose attempt was not in flight"
                );
                assert!(existing.insert(buyer, id).is_none(), "a buyer with two reservations");
            }
            404 => missing_in_a_row += 1,
            other => panic!("GET /v1/reservations/{id}: {other} {r}"),
        }
        sequence += 1;
        assert!(sequence < 1_000, "reservation ids past any this sale could have made");
    }
    for (buyer, id) in &seen.won {
        assert_eq!(existing.get(buyer), Some(id), "acknowledged reservation {id} not found by its number");
    }
    let (sold, reserved, remaining) = server.books().await;
    assert_eq!(sold, 0);
    assert_eq!(reserved, existing.len() as u64, "sold + reserved is the reservations that exist");
    assert!(reserved <= UNITS);
    assert!(existing.len() - seen.won.len() <= unanswered.len(), "only attempts in flight may have won unseen");
    // `sold_out` is said only of units that are durable: one such answer
    // before the kill, and all 30 came back.
    if !seen.refused.is_empty() {
        assert_eq!(reserved, UNITS, "sold_out was answered before the kill, yet units came back");
    }

    // New attempts sell exactly what remains.
    server.sell_the_rest("after-kill", remaining).await;
    assert_eq!(server.books().await, (0, UNITS, 0));

    // And a clean restart after the recovery changes none of it.
    terminate(child);
    let (mut child, server) = start_server(dir.path(), port, &key).await;
    assert_eq!(server.books().await, (0, UNITS, 0));
    for (buyer, id) in &existing {
        assert_eq!(server.reservation(id, buyer).await["state"], "reserved");
    }
    let (status, body) = server.attempt("after-kill-and-restart").await;
    assert_eq!((status, body["code"].as_str()), (422, Some("sold_out")), "{body}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_books_survive_a_clean_restart() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key = create_key(dir.path(), "admin");
    let (child, server) = start_server(dir.path(), port, &key).await;
    server.open_sale().await;

    // 20 buyers at once, then 3 of them pay and 2 cancel.
    let server = Arc::new(server);
    let attempts: Vec<_> = (0..20)
        .map(|n| {
            let server = server.clone();
            tokio::spawn(async move {
                let buyer = format!("b{n}");
                let (status, body) = server.attempt(&buyer).await;
                assert_eq!(status, 201, "{body}");
                (buyer, body["id"].as_str().unwrap().to_owned())
            })
        })
        .collect();
    let mut won: Vec<(String, String)> = Vec::new();
    for attempt in attempts {
        won.push(attempt.await.unwrap());
    }
    let mut states: BTreeMap<&str, &str> = won.iter().map(|(_, id)| (id.as_str(), "reserved")).collect();
    for (index, (_, id)) in won.iter().enumerate().take(5) {
        let (action, state) = if index < 3 { ("confirm", "confirmed") } else { ("cancel", "cancelled") };
        let (status, body) = server.post(&format!("/v1/reservations/{id}/{action}"), json!({})).await;
        assert_eq!((status, body["state"].as_str()), (200, Some(state)), "{body}");
        states.insert(id, state);
    }
    let before = server.books().await;
    assert_eq!(before, (3, 15, 12));
    terminate(child);

    let (child, server) = start_server(dir.path(), port, &key).await;
    assert_eq!(server.books().await, before, "the same numbers after a clean restart");
    for (buyer, id) in &won {
        let r = server.reservation(id, buyer).await;
        assert_eq!(r["state"].as_str(), Some(states[id.as_str()]), "{r}");
    }
    // A buyer who paid is at the limit still; one who cancelled is not.
    let (status, body) = server.attempt(&won[0].0).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("purchase_limit_exceeded")), "{body}");
    let (status, body) = server.attempt(&won[3].0).await;
    assert_eq!(status, 201, "{body}");
    server.sell_the_rest("after-restart", 11).await;
    assert_eq!(server.books().await, (3, UNITS - 3, 0));
    terminate(child);

    // Sold out stays sold out.
    let (child, server) = start_server(dir.path(), port, &key).await;
    assert_eq!(server.books().await, (3, UNITS - 3, 0));
    let (status, body) = server.attempt("after-second-restart").await;
    assert_eq!((status, body["code"].as_str()), (422, Some("sold_out")), "{body}");
    terminate(child);
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}
