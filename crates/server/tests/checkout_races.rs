//! A manual-capture payment whose capture and cancel race, over real HTTP
//! on two executors: each round places a new checkout, then fires
//! `RACERS` captures and `RACERS` cancels of its payment at once.
//! Exactly one outcome wins per payment: captured, with every cancel
//! answering `invalid_state`, or canceled, with every capture answering
//! `invalid_state`; the wallet's balances agree with the winner; and the
//! audit log holds one record of the winning action, none of the other.

mod common;

use std::sync::Arc;

use common::{client_with_key, create_key, open_engine, Answer, Running};
use serde_json::{json, Value};

const ROUNDS: usize = 10;
/// Captures, and as many cancels, fired at each payment at once.
const RACERS: usize = 4;
const FUNDING: u64 = 100_000;

struct Shop {
    server: Running,
    admin: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Shop {
    /// A server on two executors, a funding account, and SKUs from two
    /// merchants: m1's a (1000) and m2's c (700).
    async fn open() -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let admin = client_with_key(&create_key(dir.path(), "admin").await);
        let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
        let server = Running::start(engine, common::loopback_config(dir.path())).await;
        let shop = Shop { server, admin, _dir: dir };
        shop.ok("/v1/accounts", json!({"id": "bank", "currency": "USD"}), 201).await;
        for (id, merchant, price) in [("a", "m1", 1000), ("c", "m2", 700)] {
            let sku = json!({"id": id, "merchant_id": merchant, "title": "Thing", "price": price, "currency": "USD",
                "stock": 1000});
            shop.ok("/v1/skus", sku, 201).await;
        }
        shop
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut request = self.admin.request(method.parse().unwrap(), self.server.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    /// A POST that must answer `status`; its body.
    async fn ok(&self, path: &str, body: Value, status: u16) -> Value {
        let answer = self.send("POST", path, Some(body)).await;
        assert_eq!(answer.status, status, "POST {path}: {}", answer.text());
        answer.body
    }

    async fn get(&self, path: &str) -> Value {
        let answer = self.send("GET", path, None).await;
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.text());
        answer.body
    }

    /// A wallet of `buyer` (it cannot go below zero) with `FUNDING` in it.
    async fn wallet(&self, name: &str, buyer: &str) {
        let account = json!({"id": name, "currency": "USD", "owner": format!("buyer:{buyer}"),
            "flags": ["debits_must_not_exceed_credits"]});
        self.ok("/v1/accounts", account, 201).await;
        self.ok("/v1/transfers", common::transfer(&format!("fund-{name}"), "bank", name, FUNDING), 201).await;
    }

    /// (debits_posted, credits_posted, debits_pending) of an account.
    async fn balances(&self, account: &str) -> (u64, u64, u64) {
        let a = self.get(&format!("/v1/accounts/{account}")).await;
        let n = |field: &str| a[field].as_str().unwrap().parse::<u64>().unwrap();
        (n("debits_posted"), n("credits_posted"), n("debits_pending"))
    }

    /// How many audit records of `action` name `target`.
    async fn audited(&self, action: &str, target: &str) -> usize {
        let audit = self.get(&format!("/v1/audit?action={action}&target={target}")).await;
        audit["data"].as_array().unwrap_or_else(|| panic!("{audit}")).len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Winner {
    Capture,
    Cancel,
}

/// Each racer's action and answer, in the order they were fired.
async fn race(shop: &Arc<Shop>, payment: &str) -> Vec<(Winner, Answer)> {
    let racers: Vec<_> = (0..2 * RACERS)
        .map(|n| {
            let (shop, payment) = (shop.clone(), payment.to_owned());
            // Interleaved, so neither action is always fired first.
            let action = if n % 2 == 0 { Winner::Capture } else { Winner::Cancel };
            tokio::spawn(async move {
                let answer = match action {
                    Winner::Capture => {
                        shop.send("POST", &format!("/v1/payments/{payment}/capture"), Some(json!({}))).await
                    }
                    Winner::Cancel => shop.send("POST", &format!("/v1/payments/{payment}/cancel"), None).await,
                };
                (action, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for racer in racers {
        answers.push(racer.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_racing_capture_and_cancel_settle_each_payment_one_way_once() {
    let shop = Arc::new(Shop::open().await);
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let (wallet, buyer) = (format!("w-r{round}"), format!("r{round}"));
        shop.wallet(&wallet, &buyer).await;
        let cart = json!({"buyer_id": buyer, "lines": [{"sku_id": "a", "quantity": 1}, {"sku_id": "c", "quantity": 2}],
            "payment": {"account_id": wallet, "capture": "manual"}});
        let placed = shop.ok("/v1/checkouts", cart, 201).await;
        let payment = placed["payment"]["id"].as_str().unwrap().to_owned();
        let amount = placed["total"].as_u64().unwrap();
        assert_eq!(amount, 2400);
        assert_eq!(shop.balances(&wallet).await, (0, FUNDING, amount), "held before the race");

        let answers = race(&shop, &payment).await;
        let won: Vec<Winner> = answers.iter().filter(|(_, a)| a.status == 200).map(|(w, _)| *w).collect();
        let winner = *won.first().unwrap_or_else(|| panic!("round {round}: no racer won: {answers:?}"));
        let context = format!("round {round}, {payment} went to {winner:?}");
        for (action, answer) in &answers {
            match *action == winner {
                true => assert_eq!(answer.status, 200, "{context}: {}", answer.text()),
                false => answer.assert_problem(422, "invalid_state", &format!("{context}: the losing {action:?}")),
            }
        }
        let state = shop.get(&format!("/v1/payments/{payment}")).await;
        let (captures, cancels) =
            (shop.audited("payment.capture", &payment).await, shop.audited("payment.cancel", &payment).await);
        match winner {
            Winner::Capture => {
                assert_eq!(
                    (state["state"].as_str(), state["amount_captured"].as_u64()),
                    (Some("captured"), Some(amount)),
                    "{context}: {state}"
                );
                assert_eq!(shop.balances(&wallet).await, (amount, FUNDING, 0), "{context}: paid once, nothing held");
                assert_eq!(cancels, 0, "{context}: no cancel audited");
                assert_eq!(captures, 1, "{context}: the capture that did it is audited, once");
            }
            Winner::Cancel => {
                assert_eq!(
                    (state["state"].as_str(), state["amount_captured"].as_u64()),
                    (Some("canceled"), Some(0)),
                    "{context}: {state}"
                );
                assert_eq!(shop.balances(&wallet).await, (0, FUNDING, 0), "{context}: nothing paid, nothing held");
                assert_eq!(captures, 0, "{context}: no capture audited");
                assert_eq!(cancels, 1, "{context}: the cancel that did it is audited, once");
            }
        }
        wins[winner as usize] += 1;
    }
    eprintln!("captures won {}, cancels won {} of {ROUNDS} rounds", wins[0], wins[1]);
    Arc::into_inner(shop).unwrap().server.stop().await;
}
