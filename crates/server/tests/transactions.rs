//! Over real HTTP, for operators: a transfer across executors is a global
//! transaction that `GET /v1/transactions/{id}` shows while it is in flight
//! (its state, deadline and each branch with its operations), and `done`
//! once finished; `GET /v1/transactions` lists the unfinished ones.

mod common;

use std::time::Duration;

use common::{open_engine, Running};
use serde_json::{json, Value};

const POLL_STEPS: usize = 200;
const POLL_STEP: Duration = Duration::from_millis(25);

struct TestServer {
    server: Running,
    base: String,
    client: reqwest::Client,
}

impl TestServer {
    async fn start(dir: &std::path::Path) -> TestServer {
        let server = Running::start(open_engine(dir, 4, 2, 1 << 20, 1 << 30), common::insecure_config(dir)).await;
        TestServer { base: server.base.clone(), server, client: reqwest::Client::new() }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    fn name_on(&self, executor: u16, prefix: &str) -> String {
        common::name_on(&self.server.engine, executor, prefix)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_across_executors_is_visible_with_its_branches_while_in_flight_and_done_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let (debit, credit) = (s.name_on(0, "a"), s.name_on(1, "b"));
    for account in [&debit, &credit] {
        let answer = s.client.post(format!("{}/v1/accounts", s.base)).json(&json!({"id": account, "currency": "USD"}));
        assert_eq!(answer.send().await.unwrap().status(), 201);
    }
    // Nothing in flight, and ids that name no transaction.
    assert_eq!(s.get("/v1/transactions").await, (200, json!({"data": []})));
    for id in ["txn_0_1", "txn_7_1", "nonsense", "txn_0_0"] {
        let (status, body) = s.get(&format!("/v1/transactions/{id}")).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("transaction_not_found")), "{id}");
    }
    let (status, body) = s.get("/v1/transactions?state=everything").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")));

    // The transfer's record and debit live on executor 0, which
    // coordinates; executor 1, which holds the credit leg, is stalled.
    let id = s.name_on(0, "t");
    s.server.engine.test_batch_gate(1).close();
    let body =
        json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": 9, "currency": "USD"});
    let post = tokio::spawn({
        let (client, url) = (s.client.clone(), format!("{}/v1/transfers", s.base));
        async move { client.post(url).json(&body).send().await.unwrap().status().as_u16() }
    });
    // A fresh engine's first global transaction on executor 0.
    let mut seen = Value::Null;
    for _ in 0..POLL_STEPS {
        let (status, body) = s.get("/v1/transactions/txn_0_1").await;
        if status == 200 {
            seen = body;
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    assert_eq!(seen["id"], "txn_0_1", "{seen}");
    assert_eq!(seen["state"], "trying", "{seen}");
    assert_eq!(seen["timed_out"], false);
    assert!(seen["deadline"].as_str().is_some_and(|d| d > seen["started_at"].as_str().unwrap()), "{seen}");
    let branches = seen["branches"].as_array().unwrap();
    assert_eq!(branches.len(), 2, "{seen}");
    assert_eq!(branches[0]["executor"], 0);
    assert_eq!(branches[0]["state"], "tried", "the coordinator's own branch, tried at once");
    assert_eq!(branches[0]["operations"], json!([format!("reserve {id}"), format!("hold debit {debit} 9 USD")]));
    assert_eq!(branches[1]["executor"], 1);
    assert_eq!(branches[1]["state"], "waiting", "the stalled executor has not answered");
    assert_eq!(branches[1]["operations"], json!([format!("hold credit {credit} 9 USD")]));

    s.server.engine.test_batch_gate(1).open();
    assert_eq!(post.await.unwrap(), 201);
    let mut done = Value::Null;
    for _ in 0..POLL_STEPS {
        let (status, body) = s.get("/v1/transactions/txn_0_1").await;
        assert_eq!(status, 200);
        if body["state"] == "done" {
            done = body;
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    assert_eq!(
        done,
        json!({"id": "txn_0_1", "state": "done", "started_at": null, "deadline": null, "timed_out": false,
               "branches": []})
    );
    assert_eq!(s.get("/v1/transactions?state=in_flight&limit=10").await, (200, json!({"data": []})));
    assert_eq!(s.get("/v1/transactions?state=stuck").await, (200, json!({"data": []})));
    s.server.stop().await;
}
