//! The API over real HTTP on 127.0.0.1, against a real engine on a temp dir.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{client_with_key, create_key, loopback_config, open_engine, transfer, Answer, Running};
use peakstack_domain::Id;
use peakstack_server::{api_routes, MAX_BATCH_TRANSFERS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_AMOUNT: u64 = (1 << 53) - 1;

struct TestServer {
    server: Running,
    /// The admin key the client sends.
    key: String,
    client: reqwest::Client,
}

impl TestServer {
    async fn start(dir: &Path) -> TestServer {
        // Few transfer records in memory: the archive takes part in every test.
        let engine = open_engine(dir, 8, 2, 16, 4096);
        // The same key across restarts: Idempotency-Keys belong to the API key.
        let key_file = dir.join("test-admin-key");
        let key = match std::fs::read_to_string(&key_file) {
            Ok(key) => key,
            Err(_) => {
                let key = create_key(dir, "admin").await;
                std::fs::write(&key_file, &key).unwrap();
                key
            }
        };
        let server = Running::start(engine, loopback_config(dir)).await;
        TestServer { server, client: client_with_key(&key), key }
    }

    /// Stops the server (draining), then the engine.
    async fn stop(self) {
        self.server.stop().await;
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>, headers: &[(&str, &str)]) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, self.server.url(path));
        let has_content_type = headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        if let Some(body) = body {
            if !has_content_type {
                request = request.header("content-type", "application/json");
            }
            request = request.body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.raw("GET", path, None, &[]).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        self.raw("POST", path, Some(serde_json::to_vec(body).unwrap()), &[]).await
    }

    async fn post_keyed(&self, path: &str, body: &Value, key: &str) -> Answer {
        self.raw("POST", path, Some(serde_json::to_vec(body).unwrap()), &[("idempotency-key", key)]).await
    }

    /// Every account (system clearing accounts included), as the API shows them.
    async fn accounts(&self) -> Value {
        let answer = self.get("/v1/accounts?limit=1000").await;
        assert_eq!(answer.status, 200);
        assert!(answer.body["next"].is_null(), "more than 1000 accounts in a test");
        answer.body["data"].clone()
    }

    /// The accounts, less clearing accounts that never moved anything: the
    /// engine opens a shard's clearing account on the first transfer that
    /// crosses to it, also when that transfer is then refused.
    async fn snapshot(&self) -> Value {
        let mut accounts = self.accounts().await;
        accounts.as_array_mut().unwrap().retain(|a| a["system"] == false || balances_of(a) != [0; 4]);
        accounts
    }

    async fn account(&self, name: &str, flags: &[&str]) -> Value {
        let answer = self.post("/v1/accounts", &json!({"id": name, "currency": "USD", "flags": flags})).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        answer.body
    }

    async fn transfer(&self, id: &str, debit: &str, credit: &str, amount: u64) -> Answer {
        self.post("/v1/transfers", &transfer(id, debit, credit, amount)).await
    }

    async fn balance(&self, name: &str) -> Value {
        let answer = self.get(&format!("/v1/accounts/{name}")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body
    }

    /// Waits until a pending transfer expired and its hold is released on
    /// every executor (the expiry is a transaction across executors).
    async fn wait_until_expired(&self, id: &str) {
        for _ in 0..300 {
            let expired = self.get(&format!("/v1/transfers/{id}")).await.body["status"] == "expired";
            if expired && self.server.engine.totals().await.unwrap().txns_in_flight == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{id} did not expire");
    }

    /// Names on executor `executor`, so tests cross executors on purpose.
    fn names_on(&self, executor: u16, prefix: &str, count: usize) -> Vec<String> {
        let layout = self.server.engine.layout();
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .filter(|name| layout.executor_of_account(&Id::parse(name).unwrap()) == executor)
            .take(count)
            .collect()
    }

    /// A refused request: the expected problem, and no account changed.
    async fn check_refused(&self, method: &str, path: &str, body: Option<Value>, status: u16, code: &str) {
        let before = self.snapshot().await;
        let answer = self.raw(method, path, body.as_ref().map(|b| serde_json::to_vec(b).unwrap()), &[]).await;
        answer.assert_problem(status, code, &format!("{method} {path} {body:?}"));
        let after = self.snapshot().await;
        assert_eq!(before, after, "{method} {path}: a refused request changed balances");
    }

    /// An invalid request: 400 (or 413) invalid_request, `needle` in the detail.
    async fn check_invalid(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
        status: u16,
        needle: &str,
    ) {
        let before = self.snapshot().await;
        let answer = self.raw(method, path, body.map(<[u8]>::to_vec), headers).await;
        let context = format!("{method} {path} {:?}", body.map(String::from_utf8_lossy));
        answer.assert_problem(status, "invalid_request", &context);
        let detail = answer.body["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{context}: detail {detail:?} lacks {needle:?}");
        assert_eq!(before, self.snapshot().await, "{context}: an invalid request changed balances");
    }
}

fn pending(id: &str, debit: &str, credit: &str, amount: u64, timeout_ms: u64) -> Value {
    let mut body = transfer(id, debit, credit, amount);
    body["pending"] = json!(true);
    body["timeout_ms"] = json!(timeout_ms);
    body
}

/// A balance of the JSON: a string of decimal digits (exact past 2^53).
fn digits(balance: &Value) -> u128 {
    let text = balance.as_str().unwrap_or_else(|| panic!("a balance is a string of digits, not {balance}"));
    assert!(!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
    text.parse().unwrap()
}

/// A signed balance of the JSON (`"-"` first when negative).
fn signed_digits(balance: &Value) -> (bool, u128) {
    let text = balance.as_str().unwrap_or_else(|| panic!("a balance is a string of digits, not {balance}"));
    match text.strip_prefix('-') {
        Some(magnitude) => (true, digits(&json!(magnitude))),
        None => (false, digits(balance)),
    }
}

fn balances_of(account: &Value) -> [u128; 4] {
    ["debits_pending", "debits_posted", "credits_pending", "credits_posted"].map(|f| digits(&account[f]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_create_get_and_list_with_pagination() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;

    let created = s
        .post(
            "/v1/accounts",
            &json!({"id": "alice", "currency": "USD", "flags": ["debits_must_not_exceed_credits"], "overdraft_limit": 500,
                    "metadata": {"owner": "Alice", "tier": 2}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.content_type(), "application/json");
    let alice = &created.body;
    for (field, expected) in [
        ("id", json!("alice")),
        ("currency", json!("USD")),
        ("flags", json!(["debits_must_not_exceed_credits"])),
        ("overdraft_limit", json!(500)),
        ("metadata", json!({"owner": "Alice", "tier": 2})),
        ("debits_pending", json!("0")),
        ("debits_posted", json!("0")),
        ("credits_pending", json!("0")),
        ("credits_posted", json!("0")),
        ("balance", json!("0")),
        ("available", json!("500")),
        ("system", json!(false)),
    ] {
        assert_eq!(alice[field], expected, "{field}");
    }
    assert!(alice["created_at_ms"].as_u64().unwrap() > 0);

    // The same account again (metadata keys in another order) is 200.
    let again = s
        .post(
            "/v1/accounts",
            &json!({"id": "alice", "currency": "USD", "flags": ["debits_must_not_exceed_credits"], "overdraft_limit": 500,
                    "metadata": {"tier": 2, "owner": "Alice"}}),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(&again.body, alice);
    s.check_refused(
        "POST",
        "/v1/accounts",
        Some(json!({"id": "alice", "currency": "USD"})),
        409,
        "exists_with_different_fields",
    )
    .await;

    let bank = s.account("bank", &[]).await;
    assert_eq!(bank["available"], Value::Null, "unlimited debits");
    assert_eq!(bank["metadata"], Value::Null);
    assert_eq!(s.get("/v1/accounts/alice").await.body, *alice);
    s.check_refused("GET", "/v1/accounts/nobody", None, 404, "account_not_found").await;

    // A cross-shard transfer makes clearing accounts appear; they are listed too.
    for n in 0..7 {
        s.account(&format!("user-{n}"), &[]).await;
    }
    for n in 0..7 {
        assert_eq!(s.transfer(&format!("fund-{n}"), "bank", &format!("user-{n}"), 10).await.status, 201);
    }
    let all = s.accounts().await;
    let ids: Vec<&str> = all.as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "accounts come in id order");
    let clearing: Vec<&Value> = all.as_array().unwrap().iter().filter(|a| a["system"] == true).collect();
    assert!(!clearing.is_empty(), "transfers across shards go through clearing accounts");
    assert!(clearing.iter().all(|a| a["id"].as_str().unwrap().starts_with("_clearing.")));
    let clearing_id = clearing[0]["id"].as_str().unwrap();
    assert_eq!(s.get(&format!("/v1/accounts/{clearing_id}")).await.body["system"], true);

    // Pages of 3 walk the same list.
    let mut walked = Vec::new();
    let mut path = "/v1/accounts?limit=3".to_owned();
    loop {
        let page = s.get(&path).await;
        assert_eq!(page.status, 200);
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        walked.extend(data.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        match page.body["next"].as_str() {
            Some(next) => {
                assert_eq!(data.len(), 3, "next only on a full page");
                assert_eq!(next, data.last().unwrap()["id"]);
                path = format!("/v1/accounts?limit=3&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(walked, ids);
    let default_page = s.get("/v1/accounts").await;
    assert_eq!(default_page.body["data"].as_array().unwrap().len(), ids.len(), "default limit is 100");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_created_then_existing_with_balances_in_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    // Accounts on different executors: the transfer crosses them.
    let debit = s.names_on(0, "payer-", 1).remove(0);
    let credit = s.names_on(1, "payee-", 1).remove(0);
    s.account("bank", &[]).await;
    s.account(&debit, &["debits_must_not_exceed_credits"]).await;
    s.account(&credit, &[]).await;
    assert_eq!(s.transfer("fund", "bank", &debit, 1000).await.status, 201);

    let created = s.transfer("t1", &debit, &credit, 300).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let t = &created.body;
    for (field, expected) in [
        ("id", json!("t1")),
        ("debit_account_id", json!(debit)),
        ("credit_account_id", json!(credit)),
        ("amount", json!(300)),
        ("currency", json!("USD")),
        ("pending", json!(false)),
        ("timeout_ms", json!(0)),
        ("expires_at_ms", Value::Null),
        ("status", json!("posted")),
        ("pending_id", Value::Null),
        ("posted_amount", Value::Null),
    ] {
        assert_eq!(t[field], expected, "{field}");
    }
    assert!(t["timestamp_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        t["balances"]["debit_account"],
        json!({"debits_pending": "0", "debits_posted": "300", "credits_pending": "0", "credits_posted": "1000", "balance": "700"})
    );
    assert_eq!(
        t["balances"]["credit_account"],
        json!({"debits_pending": "0", "debits_posted": "0", "credits_pending": "0", "credits_posted": "300", "balance": "300"})
    );

    // The retry answers 200 with the transfer and no balances; nothing moves twice.
    let again = s.transfer("t1", &debit, &credit, 300).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.body.get("balances").is_none());
    let mut without_balances = t.clone();
    without_balances.as_object_mut().unwrap().remove("balances");
    assert_eq!(again.body, without_balances);
    assert_eq!(s.get("/v1/transfers/t1").await.body, without_balances);
    assert_eq!(balances_of(&s.balance(&debit).await), [0, 300, 0, 1000]);
    assert_eq!(s.balance(&debit).await["balance"], "700");
    assert_eq!(s.balance(&debit).await["available"], "700");
    s.check_refused("GET", "/v1/transfers/nothing", None, 404, "transfer_not_found").await;

    // The books balance across all accounts, clearing accounts included.
    let total: i128 = s
        .accounts()
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|a| digits(&a["credits_posted"]) as i128 - digits(&a["debits_posted"]) as i128)
        .sum();
    assert_eq!(total, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_transfers_post_in_full_in_part_void_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("bank", &[]).await;
    s.account("buyer", &["debits_must_not_exceed_credits"]).await;
    s.account("shop", &[]).await;
    assert_eq!(s.transfer("fund", "bank", "buyer", 1000).await.status, 201);

    // Hold 400, post 250 of it.
    let hold = s.post("/v1/transfers", &pending("h1", "buyer", "shop", 400, 0)).await;
    assert_eq!(hold.status, 201, "{}", hold.body);
    assert_eq!((hold.body["pending"].clone(), hold.body["status"].clone()), (json!(true), json!("pending")));
    assert_eq!(hold.body["expires_at_ms"], Value::Null);
    assert_eq!(hold.body["balances"]["debit_account"]["debits_pending"], "400");
    assert_eq!(s.balance("buyer").await["available"], "600");
    let posted = s.post("/v1/transfers/h1/post", &json!({"id": "h1-post", "amount": 250})).await;
    assert_eq!(posted.status, 201, "{}", posted.body);
    assert_eq!(posted.body["pending_id"], "h1");
    assert_eq!(posted.body["amount"], 250);
    assert_eq!(posted.body["status"], "posted");
    assert_eq!(posted.body["balances"]["debit_account"]["debits_posted"], "250");
    assert_eq!(posted.body["balances"]["debit_account"]["debits_pending"], "0");
    let again = s.post("/v1/transfers/h1/post", &json!({"id": "h1-post", "amount": 250})).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let h1 = s.get("/v1/transfers/h1").await.body;
    assert_eq!((h1["status"].clone(), h1["posted_amount"].clone()), (json!("posted"), json!(250)));
    assert_eq!(balances_of(&s.balance("buyer").await), [0, 250, 0, 1000]);

    // Hold 100, post it all.
    assert_eq!(s.post("/v1/transfers", &pending("h2", "buyer", "shop", 100, 0)).await.status, 201);
    let posted = s.post("/v1/transfers/h2/post", &json!({"id": "h2-post"})).await;
    assert_eq!((posted.status, posted.body["amount"].clone()), (201, json!(100)));
    assert_eq!(balances_of(&s.balance("buyer").await), [0, 350, 0, 1000]);

    // Hold 50, void it.
    assert_eq!(s.post("/v1/transfers", &pending("h3", "buyer", "shop", 50, 0)).await.status, 201);
    assert_eq!(s.balance("buyer").await["debits_pending"], "50");
    let voided = s.post("/v1/transfers/h3/void", &json!({"id": "h3-void"})).await;
    assert_eq!(voided.status, 201, "{}", voided.body);
    assert_eq!(voided.body["pending_id"], "h3");
    assert_eq!(s.get("/v1/transfers/h3").await.body["status"], "voided");
    assert_eq!(balances_of(&s.balance("buyer").await), [0, 350, 0, 1000]);

    // Hold with a timeout: it expires and releases its hold.
    let timed = s.post("/v1/transfers", &pending("h4", "buyer", "shop", 70, 30)).await;
    assert_eq!(timed.status, 201, "{}", timed.body);
    let expires_at_ms = timed.body["expires_at_ms"].as_u64().unwrap();
    assert_eq!(expires_at_ms, timed.body["timestamp_ms"].as_u64().unwrap() + 30);
    s.wait_until_expired("h4").await;
    assert_eq!(balances_of(&s.balance("buyer").await), [0, 350, 0, 1000]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_atomic_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("bank", &[]).await;
    s.account("a", &["debits_must_not_exceed_credits"]).await;
    s.account("b", &["debits_must_not_exceed_credits"]).await;
    assert_eq!(s.transfer("fund", "bank", "a", 100).await.status, 201);

    // Not atomic: each transfer on its own.
    let answer = s
        .post(
            "/v1/transfers/batch",
            &json!({"transfers": [transfer("n1", "a", "b", 10), transfer("fund", "bank", "a", 100), transfer("n2", "a", "b", 1000),
                                  transfer("n3", "a", "nobody", 1)]}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let results = answer.body["results"].as_array().unwrap();
    let summary: Vec<(u64, &str, &str)> = results
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["status"].as_str().unwrap(), r["code"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        summary,
        [(0, "created", ""), (1, "exists", ""), (2, "error", "exceeds_credits"), (3, "error", "account_not_found")]
    );
    assert_eq!(results[0]["transfer"]["id"], "n1");
    assert_eq!(results[1]["transfer"]["id"], "fund");
    assert!(results[2]["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(balances_of(&s.balance("a").await), [0, 10, 0, 100]);

    // Atomic: one fails, so none happens.
    let before = s.snapshot().await;
    let answer = s
        .post(
            "/v1/transfers/batch",
            &json!({"atomic": true, "transfers": [transfer("x1", "a", "b", 10), transfer("x2", "b", "a", 500)]}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let codes: Vec<&str> =
        answer.body["results"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["linked_event_failed", "exceeds_credits"]);
    assert_eq!(before, s.snapshot().await);
    assert_eq!(s.get("/v1/transfers/x1").await.status, 404);

    // Atomic: a later transfer may spend what an earlier one credited.
    let answer = s
        .post(
            "/v1/transfers/batch",
            &json!({"atomic": true, "transfers": [transfer("y1", "a", "b", 90), transfer("y2", "b", "a", 100)]}),
        )
        .await;
    let statuses: Vec<&str> =
        answer.body["results"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["created", "created"], "{}", answer.body);
    assert_eq!(balances_of(&s.balance("b").await), [0, 100, 0, 100]);

    // The largest batch is accepted.
    let many: Vec<Value> = (0..MAX_BATCH_TRANSFERS).map(|n| transfer(&format!("m{n}"), "bank", "b", 1)).collect();
    let answer = s.post("/v1/transfers/batch", &json!({"transfers": many})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let results = answer.body["results"].as_array().unwrap();
    assert_eq!(results.len(), MAX_BATCH_TRANSFERS);
    assert!(results.iter().all(|r| r["status"] == "created"));
    assert_eq!(digits(&s.balance("b").await["credits_posted"]), 100 + MAX_BATCH_TRANSFERS as u128);
    s.stop().await;
}

/// Bodies are read with their strings borrowed when they can be; escaped
/// strings and content types with parameters take the other path and must
/// answer the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_strings_and_content_type_parameters_read_as_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("a", &[]).await;
    s.account("b", &[]).await;
    let escaped =
        br#"{"id":"e\u0031","debit_account_id":"\u0061","credit_account_id":"b","amount":3,"currency":"US\u0044"}"#;
    let answer = s.raw("POST", "/v1/transfers", Some(escaped.to_vec()), &[]).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(
        (answer.body["id"].as_str(), answer.body["debit_account_id"].as_str(), answer.body["currency"].as_str()),
        (Some("e1"), Some("a"), Some("USD"))
    );
    let charset = serde_json::to_vec(&transfer("e2", "a", "b", 4)).unwrap();
    let headers = [("content-type", "application/json; charset=utf-8")];
    assert_eq!(s.raw("POST", "/v1/transfers", Some(charset.clone()), &headers).await.status, 201);
    // A retry of each, through the other path, finds the transfer made.
    let plain_retry = serde_json::to_vec(&transfer("e1", "a", "b", 3)).unwrap();
    assert_eq!(s.raw("POST", "/v1/transfers", Some(plain_retry), &[]).await.status, 200);
    assert_eq!(s.raw("POST", "/v1/transfers", Some(charset), &[]).await.status, 200);

    let batch =
        br#"{"transfers":[{"id":"e3","debit_account_id":"a","credit_account_id":"b","amount":1,"currency":"USD"},
        {"id":"e\u0034","debit_account_id":"a","credit_account_id":"b","amount":1,"currency":"USD"}],"atomic":true}"#;
    for (headers, statuses) in [
        (vec![], ["created", "created"]),
        (vec![("content-type", "application/json; charset=utf-8")], ["exists", "exists"]),
    ] {
        let answer = s.raw("POST", "/v1/transfers/batch", Some(batch.to_vec()), &headers).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let results: Vec<(&str, &str)> = answer.body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["status"].as_str().unwrap(), r["transfer"]["id"].as_str().unwrap()))
            .collect();
        assert_eq!(results, vec![(statuses[0], "e3"), (statuses[1], "e4")]);
    }
    // An escaped item that is not a valid transfer is reported at its index.
    let bad = br#"{"transfers":[{"id":"e5","debit_account_id":"a","credit_account_id":"b","amount":1,"currency":"USD"},
        {"id":"e\u0036","debit_account_id":"a","credit_account_id":"b","amount":0,"currency":"USD"}]}"#;
    let answer = s.raw("POST", "/v1/transfers/batch", Some(bad.to_vec()), &[]).await;
    answer.assert_problem(400, "invalid_request", "escaped bad item");
    assert!(answer.body["detail"].as_str().unwrap().starts_with("transfers[1].amount"), "{}", answer.body);
    assert_eq!(s.balance("a").await["debits_posted"], "9");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ledger_refusal_is_a_problem_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let alice = s.names_on(0, "alice-", 1).remove(0);
    let bob = s.names_on(1, "bob-", 1).remove(0);
    s.account("bank", &[]).await;
    s.account(&alice, &["debits_must_not_exceed_credits"]).await;
    s.account(&bob, &["debits_must_not_exceed_credits"]).await;
    s.account("carol", &["credits_must_not_exceed_debits"]).await;
    assert_eq!(s.post("/v1/accounts", &json!({"id": "euro", "currency": "EUR"})).await.status, 201);
    assert_eq!(s.transfer("fund", "bank", &alice, 1000).await.status, 201);
    assert_eq!(s.transfer("single", &alice, &bob, 10).await.status, 201);
    for (id, timeout_ms) in [("held", 0), ("to-post", 0), ("to-void", 0), ("to-expire", 1)] {
        assert_eq!(s.post("/v1/transfers", &pending(id, &alice, &bob, 100, timeout_ms)).await.status, 201);
    }
    assert_eq!(s.post("/v1/transfers/to-post/post", &json!({"id": "posting"})).await.status, 201);
    assert_eq!(s.post("/v1/transfers/to-void/void", &json!({"id": "voiding"})).await.status, 201);
    // Wait until the expiry has happened, so that nothing moves during the checks.
    s.wait_until_expired("to-expire").await;

    let post = |pending_id: &str, body: Value| ("POST", format!("/v1/transfers/{pending_id}/post"), Some(body));
    let create = |body: Value| ("POST", "/v1/transfers".to_owned(), Some(body));
    type Check<'a> = ((&'a str, String, Option<Value>), u16, &'a str);
    let checks: Vec<Check> = vec![
        (("GET", "/v1/accounts/nobody".to_owned(), None), 404, "account_not_found"),
        (create(transfer("r1", &alice, "nobody", 1)), 404, "account_not_found"),
        (("GET", "/v1/transfers/nothing".to_owned(), None), 404, "transfer_not_found"),
        (post("nothing", json!({"id": "r2"})), 404, "pending_transfer_not_found"),
        (
            ("POST", "/v1/transfers/nothing/void".to_owned(), Some(json!({"id": "r3"}))),
            404,
            "pending_transfer_not_found",
        ),
        (
            ("POST", "/v1/accounts".to_owned(), Some(json!({"id": alice, "currency": "USD"}))),
            409,
            "exists_with_different_fields",
        ),
        (create(transfer("single", &alice, &bob, 11)), 409, "exists_with_different_fields"),
        (create(transfer("r4", &alice, "euro", 1)), 422, "currency_mismatch"),
        (create(transfer("r5", &alice, &alice, 1)), 422, "accounts_must_be_different"),
        (create(transfer("r6", &alice, &bob, 1_000_000)), 422, "exceeds_credits"),
        (create(pending("r7", &alice, &bob, 1_000_000, 0)), 422, "exceeds_credits"),
        (create(transfer("r8", "bank", "carol", 5)), 422, "exceeds_debits"),
        (post("single", json!({"id": "r9"})), 422, "pending_transfer_not_pending"),
        (
            ("POST", "/v1/transfers/to-post/void".to_owned(), Some(json!({"id": "r10"}))),
            422,
            "pending_transfer_already_posted",
        ),
        (post("to-void", json!({"id": "r11"})), 422, "pending_transfer_already_voided"),
        (post("to-expire", json!({"id": "r12"})), 422, "pending_transfer_expired"),
        (post("held", json!({"id": "r13", "amount": 101})), 422, "amount_exceeds_pending"),
        (create(transfer("r14", &alice, &bob, 0)), 400, "invalid_request"),
    ];
    for ((method, path, body), status, code) in checks {
        s.check_refused(method, &path, body, status, code).await;
    }
    for n in 1..=14 {
        assert_eq!(s.get(&format!("/v1/transfers/r{n}")).await.status, 404, "r{n} was refused, so it must not exist");
    }
    s.stop().await;
}

/// Names of accounts on `shard`, and on shards other than it.
fn names_on(s: &TestServer, prefix: &str, shard: u32, on: bool, count: usize) -> Vec<String> {
    let layout = s.server.engine.layout();
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .filter(|name| (layout.shard_of_account(&Id::parse(name).unwrap()) == shard) == on)
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearing_account_past_2_to_the_64_takes_another_tenants_transfer_and_balances_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let key_of = |scope: &'static str| {
        let s = &s;
        async move {
            let created = s.post("/v1/keys", &json!({"scope": scope, "note": "tenant"})).await;
            assert_eq!(created.status, 201, "{}", created.body);
            format!("Bearer {}", created.body["key"].as_str().unwrap())
        }
    };
    let (m1, m2) = (key_of("merchant:m1").await, key_of("merchant:m2").await);
    let as_tenant = |key: &str, path: &str, body: Value| {
        let (s, key, path) = (&s, key.to_owned(), path.to_owned());
        async move { s.raw("POST", &path, Some(serde_json::to_vec(&body).unwrap()), &[("authorization", &key)]).await }
    };
    // Tenant m1 moves money out of shard 0 to another shard, tenant m2 too.
    let shard = 0;
    let m1_out = names_on(&s, "merchant:m1~out", shard, true, 1).remove(0);
    let m1_in = names_on(&s, "merchant:m1~in", shard, false, 1).remove(0);
    let m2_out = names_on(&s, "merchant:m2~out", shard, true, 1).remove(0);
    let m2_in = names_on(&s, "merchant:m2~in", shard, false, 1).remove(0);
    for (key, name) in [(&m1, &m1_out), (&m1, &m1_in), (&m2, &m2_out), (&m2, &m2_in)] {
        let created = as_tenant(key, "/v1/accounts", json!({"id": name, "currency": "USD"})).await;
        assert_eq!(created.status, 201, "{}", created.body);
    }

    // 2,100 maximal transfers: past 2^64 on m1's accounts and on shard 0's
    // clearing account, which u64 balances refused after 2,048.
    let count: u128 = 2100;
    for batch in 0..3 {
        let transfers: Vec<Value> =
            (0..700).map(|n| transfer(&format!("merchant:m1~big-{batch}-{n}"), &m1_out, &m1_in, MAX_AMOUNT)).collect();
        let answer = as_tenant(&m1, "/v1/transfers/batch", json!({"transfers": transfers})).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body["results"].as_array().unwrap().iter().all(|r| r["status"] == "created"), "{}", answer.body);
    }
    let moved = count * u128::from(MAX_AMOUNT);
    assert!(moved > u128::from(u64::MAX));
    let clearing = format!("_clearing.{shard}.USD");
    assert_eq!(digits(&s.balance(&clearing).await["credits_posted"]), moved);

    // m2's ordinary 10,000.00 out of the same shard goes through.
    let other = as_tenant(&m2, "/v1/transfers", transfer("merchant:m2~pay", &m2_out, &m2_in, 1_000_000)).await;
    assert_eq!(other.status, 201, "{}", other.body);
    assert_eq!(other.body["balances"]["debit_account"]["balance"], "-1000000");

    // Read back exact, as strings of digits, in the answer and the account.
    let raw = String::from_utf8(s.get(&format!("/v1/accounts/{m1_out}")).await.raw.to_vec()).unwrap();
    assert!(raw.contains(&format!("\"debits_posted\":\"{moved}\"")), "{raw}");
    assert!(raw.contains(&format!("\"balance\":\"-{moved}\"")), "{raw}");
    assert_eq!(balances_of(&s.balance(&m1_in).await), [0, 0, 0, moved]);
    let clearing_account = s.balance(&clearing).await;
    assert_eq!(balances_of(&clearing_account), [0, 0, 0, moved + 1_000_000]);
    assert_eq!(signed_digits(&clearing_account["balance"]), (false, moved + 1_000_000));
    // The books still balance, every account and clearing account counted.
    let (mut credits, mut debits) = (0u128, 0u128);
    for account in s.accounts().await.as_array().unwrap() {
        let [debits_pending, debits_posted, credits_pending, credits_posted] = balances_of(account);
        debits += debits_pending + debits_posted;
        credits += credits_pending + credits_posted;
    }
    assert_eq!(credits, debits);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_transfer_are_in_flight_or_exist_and_move_money_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(TestServer::start(dir.path()).await);
    // The transfer ids live on executor 0 and both accounts on executor 1,
    // so the id stays reserved while executor 0 waits for executor 1.
    let layout = s.server.engine.layout();
    let ids: Vec<String> = (0..)
        .map(|n| format!("race-{n}"))
        .filter(|id| layout.executor_of_transfer(&Id::parse(id).unwrap()) == 0)
        .take(30)
        .collect();
    let accounts = s.names_on(1, "acct-", 2);
    s.account(&accounts[0], &[]).await;
    s.account(&accounts[1], &[]).await;
    let mut in_flight_seen = 0;
    let mut rounds = 0;
    for id in &ids {
        rounds += 1;
        let body = transfer(id, &accounts[0], &accounts[1], 1);
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let s = s.clone();
                let body = body.clone();
                tokio::spawn(async move { s.post("/v1/transfers", &body).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for call in calls {
            let answer = call.await.unwrap();
            if answer.status == 409 {
                answer.assert_problem(409, "transfer_in_flight", id);
                in_flight_seen += 1;
            }
            statuses.push(answer.status);
        }
        assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{id}: {statuses:?}");
        assert!(statuses.iter().all(|s| [200, 201, 409].contains(s)), "{id}: {statuses:?}");
        if in_flight_seen > 0 {
            break;
        }
    }
    assert!(in_flight_seen > 0, "no transfer_in_flight in {rounds} rounds of 12 concurrent retries");
    assert_eq!(digits(&s.balance(&accounts[1]).await["credits_posted"]), rounds as u128);
    let s = Arc::into_inner(s).unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_failure_is_a_400_problem() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("a", &[]).await;
    s.account("b", &[]).await;
    assert_eq!(s.post("/v1/transfers", &pending("held", "a", "b", 10, 0)).await.status, 201);

    let t = |patch: Value| {
        let mut body = transfer("t", "a", "b", 5);
        for (field, value) in patch.as_object().unwrap() {
            if value.is_null() {
                body.as_object_mut().unwrap().remove(field);
            } else {
                body[field] = value.clone();
            }
        }
        serde_json::to_vec(&body).unwrap()
    };
    let account = |body: Value| serde_json::to_vec(&body).unwrap();
    let long_id = "x".repeat(65);
    let big_metadata = json!({"blob": "m".repeat(5000)});
    let batch_with_bad_third = serde_json::to_vec(
        &json!({"transfers": [transfer("b1", "a", "b", 1), transfer("b2", "a", "b", 1), transfer("b3", "a", "b", 0)]}),
    )
    .unwrap();
    let too_many: Vec<Value> = (0..=MAX_BATCH_TRANSFERS).map(|n| transfer(&format!("m{n}"), "a", "b", 1)).collect();
    let too_many = serde_json::to_vec(&json!({"transfers": too_many})).unwrap();
    let huge_single =
        serde_json::to_vec(&json!({"id": "a2", "currency": "USD", "metadata": {"x": "y".repeat(70_000)}})).unwrap();
    let huge_batch = vec![b' '; 4 * 1024 * 1024 + 1];
    let long_key = "k".repeat(256);
    // Nesting deeper than the JSON parser's bound (128).
    let deep = format!(r#"{{"id":"c","currency":"USD","metadata":{}1{}}}"#, r#"{"a":"#.repeat(200), "}".repeat(200));

    type Case<'a> = (&'a str, &'a str, Option<Vec<u8>>, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", "/v1/transfers", Some(b"not json".to_vec()), vec![], 400, "JSON"),
        ("POST", "/v1/transfers", Some(b"[1, 2]".to_vec()), vec![], 400, "must be a JSON object"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": "5"}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": 1.5}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": 0}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": -5}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": MAX_AMOUNT + 1}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers", Some(t(json!({"amount": null}))), vec![], 400, "amount: is required"),
        ("POST", "/v1/transfers", Some(t(json!({"currency": null}))), vec![], 400, "currency: is required"),
        ("POST", "/v1/transfers", Some(t(json!({"colour": "red"}))), vec![], 400, "colour: is not a field"),
        ("POST", "/v1/transfers", Some(t(json!({"id": "has space"}))), vec![], 400, "id"),
        ("POST", "/v1/transfers", Some(t(json!({"id": long_id}))), vec![], 400, "id"),
        ("POST", "/v1/transfers", Some(t(json!({"id": ""}))), vec![], 400, "id"),
        ("POST", "/v1/transfers", Some(t(json!({"debit_account_id": "_clearing.0.USD"}))), vec![], 400, "reserved"),
        ("POST", "/v1/transfers", Some(t(json!({"currency": "usd"}))), vec![], 400, "currency"),
        ("POST", "/v1/transfers", Some(t(json!({"currency": "ABC"}))), vec![], 400, "currency"),
        ("POST", "/v1/transfers", Some(t(json!({"timeout_ms": 10}))), vec![], 400, "timeout_ms"),
        ("POST", "/v1/transfers", Some(t(json!({"pending": "yes"}))), vec![], 400, "pending"),
        ("POST", "/v1/accounts", Some(account(json!({"id": "_mine", "currency": "USD"}))), vec![], 400, "reserved"),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "flags": ["vip"]}))),
            vec![],
            400,
            "vip",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(account(
                json!({"id": "c", "currency": "USD", "flags": ["debits_must_not_exceed_credits", "credits_must_not_exceed_debits"]}),
            )),
            vec![],
            400,
            "mutually exclusive",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "overdraft_limit": 5}))),
            vec![],
            400,
            "overdraft_limit",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "metadata": [1]}))),
            vec![],
            400,
            "metadata",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "metadata": big_metadata}))),
            vec![],
            400,
            "metadata",
        ),
        ("POST", "/v1/accounts", Some(account(json!({"id": "c"}))), vec![], 400, "currency"),
        ("POST", "/v1/accounts", Some(deep.into_bytes()), vec![], 400, "recursion limit"),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "owner": "m1"}))),
            vec![],
            400,
            "owner",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(account(json!({"id": "c", "currency": "USD", "owner": "merchant:bad id"}))),
            vec![],
            400,
            "owner",
        ),
        ("POST", "/v1/transfers/held/post", Some(account(json!({"id": "p", "amount": 0}))), vec![], 400, "amount"),
        ("POST", "/v1/transfers/held/post", Some(account(json!({}))), vec![], 400, "id: is required"),
        (
            "POST",
            "/v1/transfers/held/void",
            Some(account(json!({"id": "v", "amount": 5}))),
            vec![],
            400,
            "amount: is not a field",
        ),
        ("POST", "/v1/transfers/bad%20id/void", Some(account(json!({"id": "v"}))), vec![], 400, "pending_id"),
        ("POST", "/v1/transfers/batch", Some(account(json!({"transfers": []}))), vec![], 400, "transfers"),
        (
            "POST",
            "/v1/transfers/batch",
            Some(account(json!({"transfers": [], "linked": true}))),
            vec![],
            400,
            "linked: is not a field",
        ),
        ("POST", "/v1/transfers/batch", Some(batch_with_bad_third), vec![], 400, "transfers[2]"),
        ("POST", "/v1/transfers/batch", Some(too_many), vec![], 400, "8190"),
        ("POST", "/v1/accounts", Some(huge_single), vec![], 413, "65536"),
        ("POST", "/v1/transfers/batch", Some(huge_batch), vec![], 413, "4194304"),
        ("POST", "/v1/transfers", Some(t(json!({}))), vec![("idempotency-key", &long_key)], 400, "Idempotency-Key"),
        ("POST", "/v1/transfers", Some(t(json!({}))), vec![("idempotency-key", "")], 400, "Idempotency-Key"),
        ("GET", "/v1/accounts?limit=0", None, vec![], 400, "limit"),
        ("GET", "/v1/accounts?limit=1001", None, vec![], 400, "limit"),
        ("GET", "/v1/accounts?limit=ten", None, vec![], 400, "limit"),
        ("GET", "/v1/accounts?after=bad%20id", None, vec![], 400, "after"),
        ("GET", "/v1/accounts?sort=desc", None, vec![], 400, "sort"),
        ("GET", "/v1/accounts/bad%20id", None, vec![], 400, "id"),
        ("GET", "/v1/transfers/bad%20id", None, vec![], 400, "id"),
        ("GET", "/v1/accounts/a/transfers?limit=0", None, vec![], 400, "limit"),
    ];
    for (method, path, body, headers, status, needle) in cases {
        s.check_invalid(method, path, body.as_deref(), &headers, status, needle).await;
    }
    assert_eq!(s.get("/v1/transfers/t").await.status, 404, "no invalid request created a transfer");
    assert_eq!(s.get("/v1/accounts/c").await.status, 404, "no invalid request created an account");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_replay_refuse_reuse_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("bank", &[]).await;
    s.account("shop", &[]).await;

    // The first answer, then the same answer byte for byte, marked as a replay.
    let body = transfer("k1", "bank", "shop", 25);
    let first = s.post_keyed("/v1/transfers", &body, "key-1").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.body.get("balances").is_some());
    assert_eq!(first.header("idempotent-replayed"), None);
    let replay = s.post_keyed("/v1/transfers", &body, "key-1").await;
    assert_eq!(replay.status, 201, "the replay is the first answer, not a 200 'exists'");
    assert_eq!(replay.raw, first.raw);
    assert_eq!(replay.content_type(), "application/json");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.balance("shop").await["credits_posted"], "25");

    // The same key with another body or path is refused, and changes nothing.
    let before = s.snapshot().await;
    let other_body = s.post_keyed("/v1/transfers", &transfer("k1", "bank", "shop", 26), "key-1").await;
    other_body.assert_problem(422, "idempotency_key_reused", "other body");
    let other_path = s.post_keyed("/v1/accounts", &json!({"id": "k1", "currency": "USD"}), "key-1").await;
    other_path.assert_problem(422, "idempotency_key_reused", "other path");
    assert_eq!(before, s.snapshot().await);
    assert_eq!(s.get("/v1/accounts/k1").await.status, 404);

    // A final 4xx is remembered too: the replay answers it even after the account appears.
    let refused = s.post_keyed("/v1/transfers", &transfer("k2", "bank", "late", 5), "key-2").await;
    refused.assert_problem(404, "account_not_found", "first");
    s.account("late", &[]).await;
    let replay = s.post_keyed("/v1/transfers", &transfer("k2", "bank", "late", 5), "key-2").await;
    assert_eq!((replay.status, &replay.raw), (404, &refused.raw));
    assert_eq!(replay.content_type(), "application/problem+json");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // An invalid request with a key is remembered as well.
    let invalid = s.post_keyed("/v1/transfers", &transfer("k3", "bank", "late", 0), "key-3").await;
    invalid.assert_problem(400, "invalid_request", "invalid");
    assert_eq!(s.post_keyed("/v1/transfers", &transfer("k3", "bank", "late", 0), "key-3").await.raw, invalid.raw);

    // Keys on account creation.
    let account = json!({"id": "keyed", "currency": "USD"});
    let created = s.post_keyed("/v1/accounts", &account, "key-4").await;
    assert_eq!(created.status, 201);
    assert_eq!(s.post_keyed("/v1/accounts", &account, "key-4").await.raw, created.raw);

    // A key whose first request is still running is refused with 409.
    let s = Arc::new(s);
    let mut in_use_seen = false;
    for round in 0..10 {
        let key = format!("busy-{round}");
        let many: Vec<Value> = (0..4000).map(|n| transfer(&format!("busy-{round}-{n}"), "bank", "shop", 1)).collect();
        let body = json!({"transfers": many});
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let (s, body, key) = (s.clone(), body.clone(), key.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3 * i)).await;
                    s.post_keyed("/v1/transfers/batch", &body, &key).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        let executed: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
        let first_raw = &executed[0].raw;
        assert!(executed.iter().all(|a| a.raw == *first_raw), "every 200 is the same answer");
        assert_eq!(executed.iter().filter(|a| a.header("idempotent-replayed").is_none()).count(), 1, "it ran once");
        for answer in answers.iter().filter(|a| a.status != 200) {
            answer.assert_problem(409, "idempotency_key_in_use", &key);
            in_use_seen = true;
        }
        if in_use_seen {
            break;
        }
    }
    assert!(in_use_seen, "no idempotency_key_in_use in 10 rounds");
    let s = Arc::into_inner(s).unwrap();

    // Keys survive a restart on the same data dir.
    s.stop().await;
    let s = TestServer::start(dir.path()).await;
    let replay = s.post_keyed("/v1/transfers", &body, "key-1").await;
    assert_eq!((replay.status, &replay.raw), (201, &first.raw));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    s.post_keyed("/v1/transfers", &transfer("k1", "bank", "shop", 26), "key-1").await.assert_problem(
        422,
        "idempotency_key_reused",
        "after restart",
    );
    assert_eq!(s.balance("late").await["credits_posted"], "0");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    for (method, path) in [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/accounts/a/b/c")] {
        let answer = s.raw(method, path, Some(b"{}".to_vec()), &[]).await;
        answer.assert_problem(404, "not_found", path);
    }
    for (method, path) in
        [("DELETE", "/v1/accounts"), ("PATCH", "/v1/transfers"), ("PUT", "/v1/transfers/x/post"), ("POST", "/healthz")]
    {
        let answer = s.raw(method, path, None, &[]).await;
        answer.assert_problem(405, "method_not_allowed", path);
        assert!(answer.header("allow").is_some_and(|allow| !allow.is_empty()), "{path}: 405 names the allowed methods");
    }

    // A valid request id is echoed; a missing or invalid one is replaced.
    let echoed = s.raw("GET", "/healthz", None, &[("x-request-id", "req-42.a:b_c")]).await;
    assert_eq!(echoed.header("x-request-id"), Some("req-42.a:b_c"));
    let generated = s.get("/healthz").await.header("x-request-id").unwrap().to_owned();
    let invalid = s.raw("GET", "/nope", None, &[("x-request-id", "not valid!")]).await;
    let replaced = invalid.header("x-request-id").unwrap();
    for id in [generated.as_str(), replaced] {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(generated, replaced);
    let problem = s.post("/v1/transfers", &json!({})).await;
    assert!(problem.header("x-request-id").is_some(), "errors carry a request id too");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let health = s.get("/healthz").await;
    assert_eq!((health.status, health.body.clone()), (200, json!({"status": "ok"})));
    let ready = s.get("/readyz").await;
    assert_eq!((ready.status, ready.body.clone()), (200, json!({"status": "ready", "auth": "api_keys"})));
    s.server.state.set_ready(false);
    s.get("/readyz").await.assert_problem(503, "unavailable", "readyz");
    s.server.state.set_ready(true);

    s.account("a", &[]).await;
    s.account("b", &[]).await;
    assert_eq!(s.transfer("t", "a", "b", 1).await.status, 201);
    let metrics = s.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.content_type().starts_with("text/plain"));
    let text = String::from_utf8(metrics.raw.to_vec()).unwrap();
    let has_line = |name: &str, labels: &[&str]| {
        text.lines().any(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
    };
    assert!(
        has_line("peakstack_http_requests_total{", &["route=\"/v1/accounts\"", "method=\"POST\"", "status=\"201\""]),
        "{text}"
    );
    assert!(has_line("peakstack_http_requests_total{", &["route=\"/readyz\"", "status=\"503\""]), "{text}");
    assert!(has_line("peakstack_http_request_duration_seconds_bucket{", &["route=\"/v1/transfers\"", "le="]), "{text}");
    assert!(has_line("peakstack_log_fsync_seconds_bucket{", &["le="]), "{text}");
    assert!(has_line("peakstack_batch_inputs_bucket{", &["le="]), "{text}");
    // Monotonic series are counters, named *_total; levels are gauges.
    for (series, kind) in [
        ("peakstack_engine_batches_total", "counter"),
        ("peakstack_engine_inputs_total", "counter"),
        ("peakstack_engine_fsyncs_total", "counter"),
        ("peakstack_engine_inline_writes_total", "counter"),
        ("peakstack_engine_log_bytes_total", "counter"),
        ("peakstack_engine_checkpoints_total", "counter"),
        ("peakstack_http_requests_total", "counter"),
        ("peakstack_ledger_results_total", "counter"),
        ("peakstack_audit_feed_lag_batches", "gauge"),
        ("peakstack_ledger_pending_transfers", "gauge"),
        ("peakstack_http_request_duration_seconds", "histogram"),
    ] {
        assert!(text.lines().any(|line| line == format!("# TYPE {series} {kind}")), "{series} {kind} in {text}");
    }
    // Every series has its HELP line.
    for series in text.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
        let name = series.split(' ').next().unwrap();
        assert!(text.lines().any(|line| line.starts_with(&format!("# HELP {name} "))), "HELP for {name} in {text}");
    }
    assert!(has_line("peakstack_ledger_results_total{", &["code=\"created\""]), "{text}");
    // One request at a time: nothing is ever queued for the log thread, so
    // the apply thread wrote every batch itself.
    let inline_writes: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("peakstack_engine_inline_writes_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("peakstack_engine_inline_writes_total in {text}"));
    assert!(inline_writes >= 3.0, "{inline_writes} batches written by the apply thread");

    // The OpenAPI document names exactly the routes the router serves.
    let doc = s.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.content_type(), "application/json");
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.0"));
    let paths = doc.body["paths"].as_object().unwrap();
    for (method, path) in api_routes() {
        let operation =
            &paths.get(path).unwrap_or_else(|| panic!("{path} missing from openapi.json"))[method.to_lowercase()];
        assert!(operation.is_object(), "{method} {path} missing from openapi.json");
        assert!(operation["responses"].is_object(), "{method} {path} has no responses");
    }
    let documented: usize = paths.values().map(|ops| ops.as_object().unwrap().len()).sum();
    assert_eq!(documented, api_routes().len(), "openapi.json documents a route the router does not serve");
    s.stop().await;
}

/// The value of an unlabelled gauge on `/metrics`, once it reads `want`.
/// Every server of a test process shares one recorder, and a scrape sets
/// the engine gauges from its own server's engine: another test's scrape
/// may overwrite them between this one's set and render, so it retries.
async fn gauge_reads(s: &TestServer, name: &str, want: f64) -> f64 {
    let mut seen = f64::NAN;
    for _ in 0..100 {
        let text = String::from_utf8(s.get("/metrics").await.raw.to_vec()).unwrap();
        assert!(text.lines().any(|line| line == format!("# TYPE {name} gauge")), "{name} is a gauge in {text}");
        assert!(text.lines().any(|line| line.starts_with(&format!("# HELP {name} "))), "HELP for {name} in {text}");
        seen = text
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"));
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_pending_transfers_until_posted_voided_or_expired_and_after_a_restart() {
    const GAUGE: &str = "peakstack_ledger_pending_transfers";
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    assert_eq!(gauge_reads(&s, GAUGE, 0.0).await, 0.0);
    // The two executors both take part: accounts on each, holds both ways.
    let on_0 = s.names_on(0, "zero-", 1).pop().unwrap();
    let on_1 = s.names_on(1, "one-", 1).pop().unwrap();
    s.account(&on_0, &[]).await;
    s.account(&on_1, &[]).await;
    for (n, (debit, credit)) in [(&on_0, &on_1), (&on_1, &on_0), (&on_0, &on_1), (&on_1, &on_0)].into_iter().enumerate()
    {
        let hold = s.post("/v1/transfers", &pending(&format!("p{n}"), debit, credit, 10, 0)).await;
        assert_eq!(hold.status, 201, "{}", hold.body);
    }
    assert_eq!(s.transfer("plain", &on_0, &on_1, 5).await.status, 201);
    assert_eq!(gauge_reads(&s, GAUGE, 4.0).await, 4.0, "four holds");
    assert_eq!(s.post("/v1/transfers/p0/post", &json!({"id": "p0-post", "amount": 4})).await.status, 201);
    assert_eq!(gauge_reads(&s, GAUGE, 3.0).await, 3.0, "after a post");
    assert_eq!(s.post("/v1/transfers/p1/void", &json!({"id": "p1-void"})).await.status, 201);
    assert_eq!(gauge_reads(&s, GAUGE, 2.0).await, 2.0, "after a void");
    let timed = s.post("/v1/transfers", &pending("p4", &on_0, &on_1, 10, 30)).await;
    assert_eq!(timed.status, 201, "{}", timed.body);
    s.wait_until_expired("p4").await;
    assert_eq!(gauge_reads(&s, GAUGE, 2.0).await, 2.0, "after an expiry");
    s.stop().await;

    let s = TestServer::start(dir.path()).await;
    assert_eq!(gauge_reads(&s, GAUGE, 2.0).await, 2.0, "after a restart");
    assert_eq!(s.post("/v1/transfers/p2/void", &json!({"id": "p2-void"})).await.status, 201);
    assert_eq!(gauge_reads(&s, GAUGE, 1.0).await, 1.0, "after a void past the restart");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_transfers_are_paged_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    for name in ["bank", "a", "b"] {
        s.account(name, &[]).await;
    }
    let mut expected = Vec::new();
    for n in 0..5 {
        let id = format!("h{n}");
        let (debit, credit) = if n % 2 == 0 { ("bank", "a") } else { ("a", "b") };
        assert_eq!(s.transfer(&id, debit, credit, 1).await.status, 201);
        expected.push(id);
        assert_eq!(s.transfer(&format!("other-{n}"), "bank", "b", 1).await.status, 201);
    }
    let mut walked = Vec::new();
    let mut path = "/v1/accounts/a/transfers?limit=2".to_owned();
    loop {
        let page = s.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        walked.extend(data.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match page.body["next"].as_str() {
            Some(next) => path = format!("/v1/accounts/a/transfers?limit=2&after={next}"),
            None => break,
        }
    }
    expected.reverse();
    assert_eq!(walked, expected, "newest first");
    let all = s.get("/v1/accounts/a/transfers").await;
    assert_eq!(
        all.body["data"][0],
        s.get("/v1/transfers/h4").await.body,
        "the same transfer JSON as GET /v1/transfers/{{id}}"
    );
    s.check_refused("GET", "/v1/accounts/nobody/transfers", None, 404, "account_not_found").await;
    s.check_invalid("GET", "/v1/accounts/a/transfers?after=not-hex", None, &[], 400, "after").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.account("a", &[]).await;
    let engine = s.server.engine.clone();
    tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
    s.transfer("t", "a", "b", 1).await.assert_problem(503, "unavailable", "transfer");
    s.get("/v1/accounts/a").await.assert_problem(503, "unavailable", "account");
    // Unavailable is not remembered under a key: a retry must get a real answer.
    let keyed = s.post_keyed("/v1/transfers", &transfer("t", "a", "b", 1), "retry-me").await;
    keyed.assert_problem(503, "unavailable", "keyed");
    assert_eq!(s.server.state.idempotency().get("retry-me").await.unwrap(), None);
    assert_eq!(s.get("/healthz").await.status, 200, "health does not touch the engine");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path()).await;
    // A request whose body is half sent when shutdown starts.
    let body = serde_json::to_vec(&json!({"id": "late-account", "currency": "USD"})).unwrap();
    let mut stream = tokio::net::TcpStream::connect(s.server.addr).await.unwrap();
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        s.key,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.server.signal_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!s.server.state.is_ready(), "not ready once shutdown started");
    stream.write_all(&body[5..]).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    s.server.wait_stopped().await;
    assert!(tokio::net::TcpStream::connect(s.server.addr).await.is_err(), "no longer listening");
    // The account was created before the engine stopped.
    assert!(s.server.engine.account(&Id::parse("late-account").unwrap()).await.unwrap().is_some());
    s.stop().await;
}
