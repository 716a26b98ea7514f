//! Over real HTTP: duplicate ids in a batch, the cause of a failed atomic
//! batch, and requests the engine cannot decide within their deadline
//! (an executor stalled for real by the engine's test batch gate).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{insecure_config, transfer, Answer, Running};
use peakstack_domain::Id;
use peakstack_engine::{Engine, EngineConfig};
use serde_json::{json, Value};

/// Bound of every polling loop below (steps of [`POLL_STEP`]).
const POLL_STEPS: usize = 500;
const POLL_STEP: Duration = Duration::from_millis(10);

struct TestServer {
    server: Running,
    client: reqwest::Client,
}

/// `(status, code, cause_index)` of each item of a batch answer.
fn items(answer: &Answer) -> Vec<(String, String, Option<u64>)> {
    let results = answer.body["results"].as_array().unwrap_or_else(|| panic!("not a batch answer: {}", answer.body));
    results
        .iter()
        .map(|r| {
            let text = |field: &str| r[field].as_str().unwrap_or("").to_owned();
            (text("status"), text("code"), r["cause_index"].as_u64())
        })
        .collect()
}

impl TestServer {
    async fn start(dir: &Path, executors: u16, request_deadline: Duration) -> TestServer {
        let engine = Engine::open(EngineConfig { shards: 8, ..EngineConfig::new(dir, executors) }).unwrap();
        let mut config = insecure_config(dir);
        config.request_deadline = request_deadline;
        TestServer { server: Running::start(engine, config).await, client: reqwest::Client::new() }
    }

    /// Opens every executor's gate (a stalled one would hold the shutdown
    /// up), then stops the server and the engine.
    async fn stop(self) {
        for executor in 0..self.server.engine.layout().executors() {
            self.server.engine.test_batch_gate(executor).open();
        }
        self.server.stop().await;
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>, key: Option<&str>) -> Answer {
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, path, None, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(reqwest::Method::POST, path, Some(body), None).await
    }

    async fn post_keyed(&self, path: &str, body: &Value, key: &str) -> Answer {
        self.send(reqwest::Method::POST, path, Some(body), Some(key)).await
    }

    async fn account(&self, id: &str, flags: &[&str]) {
        let answer = self.post("/v1/accounts", &json!({"id": id, "currency": "USD", "flags": flags})).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
    }

    /// A name for an account (or a transfer id) on executor `executor`.
    fn name_on(&self, executor: u16, prefix: &str) -> String {
        common::name_on(&self.server.engine, executor, prefix)
    }

    /// Polls `path` until it answers something other than `while_status`.
    async fn get_until_not(&self, path: &str, while_status: &[u16]) -> Answer {
        for _ in 0..POLL_STEPS {
            let answer = self.get(path).await;
            if !while_status.contains(&answer.status) {
                return answer;
            }
            tokio::time::sleep(POLL_STEP).await;
        }
        panic!("{path} kept answering {while_status:?}");
    }

    /// As text, whatever the width of the balance type.
    async fn credits_posted(&self, account: &str) -> String {
        let account = self.server.engine.account(&Id::parse(account).unwrap()).await.unwrap().unwrap();
        account.balances.credits_posted.to_string()
    }
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_in_a_batch_are_refused_whole_with_any_executor_count() {
    for executors in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(dir.path(), executors, LONG).await;
        // Accounts on different executors, so that the transfer crosses them.
        let (a, b) = (s.name_on(0, "a"), s.name_on(executors - 1, "b"));
        s.account(&a, &[]).await;
        s.account(&b, &[]).await;
        for atomic in [false, true] {
            for second in [transfer("x", &a, &b, 1), transfer("x", &a, &b, 2)] {
                let batch = json!({"atomic": atomic, "transfers": [transfer("x", &a, &b, 1), transfer("y", &a, &b, 1), second]});
                let answer = s.post("/v1/transfers/batch", &batch).await;
                let context = format!("{executors} executors, atomic {atomic}");
                assert_eq!(answer.status, 422, "{context}: {}", answer.body);
                answer.assert_problem(422, "duplicate_id_in_batch", "");
                let detail = answer.body["detail"].as_str().unwrap();
                assert!(detail.contains("transfers[2]") && detail.contains("transfers[0]"), "{context}: {detail}");
                for id in ["x", "y"] {
                    assert_eq!(s.get(&format!("/v1/transfers/{id}")).await.status, 404, "{context}: {id} was made");
                }
            }
        }
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_atomic_batch_names_its_cause() {
    for executors in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(dir.path(), executors, LONG).await;
        let bank = s.name_on(0, "bank");
        let a = s.name_on(executors - 1, "a");
        let b = s.name_on(0, "b");
        s.account(&bank, &[]).await;
        s.account(&a, &["debits_must_not_exceed_credits"]).await;
        s.account(&b, &[]).await;
        assert_eq!(s.post("/v1/transfers", &transfer("fund", &bank, &a, 100)).await.status, 201);
        let context = format!("{executors} executors");
        let item = |status: &str, code: &str, cause: Option<u64>| (status.to_owned(), code.to_owned(), cause);

        // One item fails: it carries its own code, the others point at it.
        let batch = json!({"atomic": true, "transfers": [
            transfer("x1", &a, &b, 10), transfer("x2", &a, &b, 500), transfer("x3", &bank, &b, 1)]});
        let answer = s.post("/v1/transfers/batch", &batch).await;
        assert_eq!(answer.status, 200, "{context}: {}", answer.body);
        let linked = item("error", "linked_event_failed", Some(1));
        assert_eq!(items(&answer), [linked.clone(), item("error", "exceeds_credits", None), linked], "{context}");

        // An item made earlier, beside a new one: the batch is not made,
        // and the existing item is the named cause.
        let batch =
            json!({"atomic": true, "transfers": [transfer("n1", &a, &b, 10), transfer("fund", &bank, &a, 100)]});
        let answer = s.post("/v1/transfers/batch", &batch).await;
        assert_eq!(
            items(&answer),
            [item("error", "linked_event_failed", Some(1)), item("exists", "", None)],
            "{context}"
        );
        assert_eq!(s.get("/v1/transfers/n1").await.status, 404, "{context}");

        // A whole batch made earlier (a retry): every item exists, no failure.
        let batch = json!({"atomic": true, "transfers": [transfer("r1", &a, &b, 10), transfer("r2", &bank, &b, 5)]});
        let answer = s.post("/v1/transfers/batch", &batch).await;
        assert_eq!(items(&answer), [item("created", "", None), item("created", "", None)], "{context}");
        let answer = s.post("/v1/transfers/batch", &batch).await;
        assert_eq!(items(&answer), [item("exists", "", None), item("exists", "", None)], "{context}");
        assert_eq!(s.credits_posted(&b).await, "15", "{context}");
        s.stop().await;
    }
}

/// POSTs `body` to `path` while the gate of executor `stalled` is closed:
/// the answer is 503 `deadline_exceeded`, within the deadline.
async fn post_stalled(s: &TestServer, stalled: u16, path: &str, body: &Value, key: Option<&str>) {
    s.server.engine.test_batch_gate(stalled).close();
    let started = Instant::now();
    let answer = s.send(reqwest::Method::POST, path, Some(body), key).await;
    let elapsed = started.elapsed();
    answer.assert_problem(503, "deadline_exceeded", "");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(elapsed >= DEADLINE && elapsed < DEADLINE + Duration::from_secs(2), "answered after {elapsed:?}");
}

const DEADLINE: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_not_decided_in_time_answers_503_and_its_outcome_is_read_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), 1, DEADLINE).await;
    s.account("a", &[]).await;
    s.account("b", &[]).await;
    post_stalled(&s, 0, "/v1/transfers", &transfer("t1", "a", "b", 7), None).await;
    // The stalled executor cannot answer a read either, in time.
    s.get("/v1/transfers/t1").await.assert_problem(503, "deadline_exceeded", "");
    s.server.engine.test_batch_gate(0).open();
    let answer = s.get_until_not("/v1/transfers/t1", &[503]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!((answer.body["status"].as_str(), answer.body["amount"].as_u64()), (Some("posted"), Some(7)));
    assert_eq!(s.credits_posted("b").await, "7");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_held_up_across_executors_reads_as_in_flight_until_decided() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), 2, DEADLINE).await;
    let (a, b) = (s.name_on(0, "a"), s.name_on(1, "b"));
    s.account(&a, &[]).await;
    s.account(&b, &[]).await;
    // Its record lives on executor 0, which coordinates; executor 1 holds
    // the credit leg and is stalled.
    let id = s.name_on(0, "t");
    post_stalled(&s, 1, "/v1/transfers", &transfer(&id, &a, &b, 9), None).await;
    s.get(&format!("/v1/transfers/{id}")).await.assert_problem(409, "transfer_in_flight", "");
    s.server.engine.test_batch_gate(1).open();
    let answer = s.get_until_not(&format!("/v1/transfers/{id}"), &[409]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "posted");
    assert_eq!(s.credits_posted(&b).await, "9");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_after_the_deadline_gets_the_real_answer() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), 1, DEADLINE).await;
    s.account("a", &[]).await;
    s.account("b", &[]).await;
    let body = transfer("k1", "a", "b", 5);
    post_stalled(&s, 0, "/v1/transfers", &body, Some("key-1")).await;
    // Not decided yet: the key is still in flight, not a remembered 503.
    s.post_keyed("/v1/transfers", &body, "key-1").await.assert_problem(409, "idempotency_key_in_use", "");
    s.server.engine.test_batch_gate(0).open();
    let mut answer = s.post_keyed("/v1/transfers", &body, "key-1").await;
    for _ in 0..POLL_STEPS {
        if answer.status != 409 {
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
        answer = s.post_keyed("/v1/transfers", &body, "key-1").await;
    }
    // The answer the first request would have had: made now, by that request.
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.header("idempotent-replayed"), Some("true"));
    assert_eq!(answer.body["id"], "k1");
    assert_eq!(s.credits_posted("b").await, "5");

    // A batch as well.
    let batch = json!({"atomic": true, "transfers": [transfer("k2", "a", "b", 1), transfer("k3", "a", "b", 2)]});
    post_stalled(&s, 0, "/v1/transfers/batch", &batch, Some("key-2")).await;
    s.server.engine.test_batch_gate(0).open();
    let mut answer = s.post_keyed("/v1/transfers/batch", &batch, "key-2").await;
    for _ in 0..POLL_STEPS {
        if answer.status != 409 {
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
        answer = s.post_keyed("/v1/transfers/batch", &batch, "key-2").await;
    }
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("idempotent-replayed"), Some("true"));
    let created = ("created".to_owned(), String::new(), None);
    assert_eq!(items(&answer), [created.clone(), created]);
    assert_eq!(s.credits_posted("b").await, "8");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_stored_before_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(dir.path(), 1, DEADLINE).await;
    s.account("a", &[]).await;
    s.account("b", &[]).await;
    let body = transfer("s1", "a", "b", 3);
    post_stalled(&s, 0, "/v1/transfers", &body, Some("key-s")).await;
    // Stop serving while the engine has not decided; once the listener is
    // gone the server is closing its stores, and only then may it decide.
    s.server.signal_stop();
    let mut refused = false;
    for _ in 0..POLL_STEPS {
        if s.client.get(s.server.url("/healthz")).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    assert!(refused, "the server kept serving");
    s.server.engine.test_batch_gate(0).open();
    s.stop().await;

    let s = TestServer::start(dir.path(), 1, DEADLINE).await;
    let answer = s.post_keyed("/v1/transfers", &body, "key-s").await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.credits_posted("b").await, "3");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_not_opened_in_time_is_opened_later() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), 1, DEADLINE).await;
    post_stalled(&s, 0, "/v1/accounts", &json!({"id": "late", "currency": "USD"}), None).await;
    s.server.engine.test_batch_gate(0).open();
    let answer = s.get_until_not("/v1/accounts/late", &[503]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["currency"], "USD");
    s.stop().await;
}
