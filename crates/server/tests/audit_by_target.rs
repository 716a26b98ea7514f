//! `GET /v1/audit?target=X` over real HTTP among more records than one
//! page of a scan reads: a target's records come in one page, from the
//! index, with paging by `after` and `next` as for any other filter.

mod common;

use common::{client_with_key, create_key, loopback_config, open_engine, Answer, Running};
use serde_json::{json, Value};

/// More transfers than `MAX_AUDIT_SCAN` (100,000), the records one page
/// of a scan reads.
const TRANSFERS: usize = 104_000;
const BATCH: usize = 8_000;

struct Harness {
    server: Running,
    client: reqwest::Client,
}

impl Harness {
    async fn start(dir: &std::path::Path) -> Harness {
        let key = create_key(dir, "admin").await;
        let engine = open_engine(dir, 8, 1, 1 << 20, 64 << 20);
        Harness { server: Running::start(engine, loopback_config(dir)).await, client: client_with_key(&key) }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = Answer::read(request.send().await.unwrap()).await;
        (answer.status, serde_json::from_slice(&answer.raw).unwrap())
    }

    /// The `(seq, action, target)` of one page of the audit log, and its `next`.
    async fn audit(&self, query: &str) -> (Vec<(u64, String, String)>, Value) {
        let (status, body) = self.call(reqwest::Method::GET, &format!("/v1/audit?{query}"), None).await;
        assert_eq!(status, 200, "{query}: {body}");
        let records = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["seq"].as_u64().unwrap(),
                    r["action"].as_str().unwrap().to_owned(),
                    r["target"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (records, body["next"].clone())
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

fn transfer(id: &str, amount: u64) -> Value {
    json!({"id": id, "debit_account_id": "bank", "credit_account_id": "shop", "amount": amount, "currency": "USD"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_among_100k_records_is_found_in_one_page() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    for id in ["bank", "shop"] {
        let (status, body) =
            h.call(reqwest::Method::POST, "/v1/accounts", Some(json!({"id": id, "currency": "USD"}))).await;
        assert_eq!(status, 201, "{body}");
    }
    for start in (0..TRANSFERS).step_by(BATCH) {
        let transfers: Vec<Value> = (start..start + BATCH).map(|i| transfer(&format!("t-{i}"), 1)).collect();
        let (status, body) =
            h.call(reqwest::Method::POST, "/v1/transfers/batch", Some(json!({"transfers": transfers}))).await;
        assert_eq!(status, 200, "{}", body["detail"]);
    }
    // A pending transfer and its post, late in the log.
    let mut pending = transfer("hold-1", 5);
    pending["pending"] = json!(true);
    pending["timeout_ms"] = json!(600_000);
    assert_eq!(h.call(reqwest::Method::POST, "/v1/transfers", Some(pending)).await.0, 201);
    let (status, body) =
        h.call(reqwest::Method::POST, "/v1/transfers/hold-1/post", Some(json!({"id": "hold-1-post"}))).await;
    assert_eq!(status, 201, "{body}");

    // Seqs: the key (1), the accounts (2, 3), then the transfers in order.
    let (records, next) = h.audit("target=t-103990").await;
    assert_eq!(records, vec![(3 + 103_991, "transfer.create".to_owned(), "t-103990".to_owned())]);
    assert!(next.is_null(), "{next}");
    let (records, next) = h.audit("target=shop").await;
    assert_eq!(records, vec![(3, "account.create".to_owned(), "shop".to_owned())]);
    assert!(next.is_null(), "{next}");
    let (records, next) = h.audit("target=hold-1-post").await;
    assert_eq!(records.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec!["transfer.post"]);
    assert!(next.is_null(), "{next}");
    let (records, _) = h.audit("target=t-10399").await;
    assert_eq!(records.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(), vec!["t-10399"], "exact, not a prefix");
    let (records, next) = h.audit("target=nobody").await;
    assert!(records.is_empty() && next.is_null(), "{records:?} {next}");
    // The other filters apply with it.
    let (records, _) = h.audit("target=t-103990&action=transfer.post").await;
    assert!(records.is_empty(), "{records:?}");

    // Paging: a key made and revoked has two records, a page each.
    let (status, key) = h.call(reqwest::Method::POST, "/v1/keys", Some(json!({"scope": "admin"}))).await;
    assert_eq!(status, 201, "{key}");
    let key_id = key["id"].as_str().unwrap().to_owned();
    let (status, body) = h.call(reqwest::Method::DELETE, &format!("/v1/keys/{key_id}"), None).await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let (first, next) = h.audit(&format!("target={key_id}&limit=1")).await;
    assert_eq!(first.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec!["key.create"]);
    let after = next.as_str().expect("a next cursor after a full page");
    let (second, _) = h.audit(&format!("target={key_id}&limit=1&after={after}")).await;
    assert_eq!(second.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec!["key.revoke"]);
    assert!(second[0].0 > first[0].0);
    h.stop().await;
}
