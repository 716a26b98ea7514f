//! Over real HTTP: a transfer's `metadata` and `reference` on creates,
//! batch items, posts and voids; returned everywhere a transfer is, also
//! after a restart and for a record the archive holds; bounded, and part of
//! what an idempotent retry is compared by.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{insecure_config, open_engine, Answer, Running};
use serde_json::{json, Value};

const BOUND: Duration = Duration::from_secs(20);
/// Few records in memory: most of the transfers below end in the archive.
const RECORDS_IN_MEMORY: usize = 16;

struct TestServer {
    server: Running,
    client: reqwest::Client,
}

impl TestServer {
    async fn start(dir: &Path) -> TestServer {
        let engine = open_engine(dir, 8, 2, RECORDS_IN_MEMORY, 4096);
        TestServer { server: Running::start(engine, insecure_config(dir)).await, client: reqwest::Client::new() }
    }

    async fn stop(self) {
        self.server.stop().await;
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = Answer::read(tokio::time::timeout(BOUND, request.send()).await.unwrap().unwrap()).await;
        (answer.status, answer.body)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

fn transfer(id: &str, extra: Value) -> Value {
    let mut body =
        json!({"id": id, "debit_account_id": "alice", "credit_account_id": "bob", "amount": 5, "currency": "USD"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// `(metadata, reference)` of a transfer as answered; `Value::Null` for a
/// field left out.
fn details(transfer: &Value) -> (Value, Value) {
    (transfer["metadata"].clone(), transfer["reference"].clone())
}

/// Every transfer id below with the details it must answer with.
fn expected() -> Vec<(String, Value, Value)> {
    let order = json!({"order": 7, "lines": ["a", "b"], "note": "caf\u{e9} \"quoted\""});
    let mut all = vec![
        ("plain".to_owned(), Value::Null, Value::Null),
        ("with-both".to_owned(), order.clone(), json!("ord-7")),
        ("ref-only".to_owned(), Value::Null, json!("caf\u{e9} \\ \"q\"")),
        ("hold".to_owned(), json!({"hold": true}), json!("h-1")),
        ("hold-post".to_owned(), json!({"captured": 1}), json!("capture-1")),
        ("hold2".to_owned(), Value::Null, Value::Null),
        ("hold2-void".to_owned(), Value::Null, json!("cancelled by buyer")),
    ];
    for n in 0..3 {
        all.push((format!("batch-{n}"), json!({"n": n}), json!(format!("b-{n}"))));
    }
    all
}

async fn make_transfers(server: &TestServer) {
    for id in ["alice", "bob"] {
        assert_eq!(server.post("/v1/accounts", json!({"id": id, "currency": "USD"})).await.0, 201);
    }
    let all = expected();
    let extra = |id: &str| {
        let (_, metadata, reference) = all.iter().find(|(name, _, _)| name == id).unwrap();
        let mut extra = json!({});
        if !metadata.is_null() {
            extra["metadata"] = metadata.clone();
        }
        if !reference.is_null() {
            extra["reference"] = reference.clone();
        }
        extra
    };
    for id in ["plain", "with-both", "ref-only"] {
        let (status, body) = server.post("/v1/transfers", transfer(id, extra(id))).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(details(&body), details(&extra(id)), "{id}: the create's answer");
    }
    for id in ["hold", "hold2"] {
        let mut body = transfer(id, extra(id));
        body["pending"] = json!(true);
        assert_eq!(server.post("/v1/transfers", body).await.0, 201);
    }
    let mut post = extra("hold-post");
    post["id"] = json!("hold-post");
    let (status, body) = server.post("/v1/transfers/hold/post", post).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(details(&body), details(&extra("hold-post")));
    let mut void = extra("hold2-void");
    void["id"] = json!("hold2-void");
    let (status, body) = server.post("/v1/transfers/hold2/void", void).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(details(&body), details(&extra("hold2-void")));

    let items: Vec<Value> = (0..3).map(|n| transfer(&format!("batch-{n}"), extra(&format!("batch-{n}")))).collect();
    let (status, body) = server.post("/v1/transfers/batch", json!({"transfers": items})).await;
    assert_eq!(status, 200, "{body}");
    for (n, item) in body["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(details(&item["transfer"]), details(&extra(&format!("batch-{n}"))), "batch item {n}");
    }
    // Enough others that every transfer above leaves memory for the archive.
    for n in 0..RECORDS_IN_MEMORY * 4 {
        assert_eq!(server.post("/v1/transfers", transfer(&format!("filler-{n}"), json!({}))).await.0, 201);
    }
}

async fn check_transfers(server: &TestServer, when: &str) {
    for (id, metadata, reference) in expected() {
        let (status, body) = server.get(&format!("/v1/transfers/{id}")).await;
        assert_eq!(status, 200, "{when}: {id}: {body}");
        assert_eq!(details(&body), (metadata.clone(), reference.clone()), "{when}: GET {id}");
    }
    // Alice's history shows the same records, details and all.
    let mut seen = std::collections::BTreeMap::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let path = match &after {
            None => "/v1/accounts/alice/transfers?limit=100".to_owned(),
            Some(cursor) => format!("/v1/accounts/alice/transfers?limit=100&after={cursor}"),
        };
        let (status, page) = server.get(&path).await;
        assert_eq!(status, 200, "{when}: {page}");
        for t in page["data"].as_array().unwrap() {
            seen.insert(t["id"].as_str().unwrap().to_owned(), details(t));
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    for (id, metadata, reference) in expected() {
        assert_eq!(seen.get(&id), Some(&(metadata, reference)), "{when}: history of alice, {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_reference_are_kept_everywhere_also_archived_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    make_transfers(&server).await;
    check_transfers(&server, "before the restart").await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    check_transfers(&server, "after the restart").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn details_are_bounded_and_a_retry_must_repeat_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for id in ["alice", "bob"] {
        assert_eq!(server.post("/v1/accounts", json!({"id": id, "currency": "USD"})).await.0, 201);
    }
    let too_big = json!({"blob": "x".repeat(4096)});
    let refused = [
        json!({"reference": ""}),
        json!({"reference": "r".repeat(65)}),
        json!({"reference": "tab\there"}),
        json!({"reference": 7}),
        json!({"metadata": [1, 2]}),
        json!({"metadata": "text"}),
        json!({"metadata": too_big}),
    ];
    for extra in &refused {
        let (status, body) = server.post("/v1/transfers", transfer("t1", extra.clone())).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")), "{extra}: {body}");
        let (status, body) =
            server.post("/v1/transfers/batch", json!({"transfers": [transfer("t1", extra.clone())]})).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")), "batch {extra}: {body}");
    }
    // Nothing refused was made.
    assert_eq!(server.get("/v1/transfers/t1").await.0, 404);

    let sixty_four = "r".repeat(64);
    let first = transfer("t1", json!({"reference": sixty_four, "metadata": {"k": 1}}));
    assert_eq!(server.post("/v1/transfers", first.clone()).await.0, 201);
    // The same request again is the same transfer; other details are not.
    let (status, again) = server.post("/v1/transfers", first).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(details(&again), (json!({"k": 1}), json!(sixty_four)));
    for other in [json!({"reference": sixty_four}), json!({"reference": "other", "metadata": {"k": 1}}), json!({})] {
        let (status, body) = server.post("/v1/transfers", transfer("t1", other.clone())).await;
        assert_eq!((status, body["code"].as_str()), (409, Some("exists_with_different_fields")), "{other}: {body}");
    }
    // A post's details are its own, refused as a create's are.
    let mut hold = transfer("h1", json!({}));
    hold["pending"] = json!(true);
    assert_eq!(server.post("/v1/transfers", hold).await.0, 201);
    let (status, body) = server.post("/v1/transfers/h1/post", json!({"id": "p1", "reference": ""})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let (status, body) = server.post("/v1/transfers/h1/void", json!({"id": "v1", "metadata": 3})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let (status, body) = server.get("/v1/transfers/h1").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("pending")), "{body}");
    server.stop().await;
}
