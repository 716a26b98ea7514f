//! Over real HTTP: `ServerConfig::idempotency_retention` is what the purge
//! keeps to. Within it a key replays its first answer byte for byte (and a
//! different body under it is 422); after it the key is forgotten and the
//! next request with it runs. Keyed transfers, whose outcome the engine's
//! log keeps instead of a stored answer, replay the same way: at once,
//! once the audit feed stored them, after a restart, with one executor or
//! two (transfers crossing them).

use std::time::Duration;

use peakstack_engine::{Engine, EngineConfig};
use peakstack_server::{AuthMode, Server, ServerConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound of the polling loop below (steps of [`POLL_STEP`]): the purge
/// runs every second, so the key must be gone well within it.
const POLL_STEPS: usize = 300;
const POLL_STEP: Duration = Duration::from_millis(50);
const RETENTION: Duration = Duration::from_secs(2);

struct TestServer {
    base: String,
    client: reqwest::Client,
    engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

struct Answer {
    status: u16,
    content_type: Option<String>,
    replayed: bool,
    body: bytes::Bytes,
}

impl TestServer {
    async fn start(dir: &std::path::Path) -> TestServer {
        TestServer::start_with(dir, 1, RETENTION).await
    }

    async fn start_with(dir: &std::path::Path, executors: u16, retention: Duration) -> TestServer {
        let engine = Engine::open(EngineConfig { shards: 4, ..EngineConfig::new(dir, executors) }).unwrap();
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        config.auth = AuthMode::InsecureNoAuth;
        config.idempotency_retention = retention;
        let server = Server::bind(config, engine.clone()).await.unwrap();
        let base = format!("http://{}", server.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { base, client: reqwest::Client::new(), engine, stop: Some(stop), task: Some(task) }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
    }

    async fn post_keyed(&self, path: &str, body: &Value, key: &str) -> Answer {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .header("idempotency-key", key)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let replayed = response.headers().get("idempotent-replayed").is_some();
        Answer { status, content_type, replayed, body: response.bytes().await.unwrap() }
    }

    async fn post(&self, path: &str, body: &Value) -> u16 {
        let response = self.client.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        response.status().as_u16()
    }
}

fn transfer(id: &str, debit: &str, credit: &str, amount: u64, pending: bool) -> Value {
    json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
           "currency": "USD", "pending": pending, "metadata": {"order": id}, "reference": "ref-1"})
}

/// Keyed transfers among `accounts`, some pending; their first answers.
async fn keyed_transfers(server: &TestServer, accounts: &[String], count: usize) -> Vec<(String, Value, Answer)> {
    let mut answers = Vec::new();
    for n in 0..count {
        let (debit, credit) = (&accounts[n % accounts.len()], &accounts[(n * 3 + 1) % accounts.len()]);
        let credit = if credit == debit { &accounts[(n + 1) % accounts.len()] } else { credit };
        let body = transfer(&format!("kt-{n}"), debit, credit, 1 + n as u64 % 50, n % 5 == 0);
        let key = format!("key-{n}");
        let answer = server.post_keyed("/v1/transfers", &body, &key).await;
        assert_eq!(answer.status, 201, "{n}: {:?}", answer.body);
        assert!(!answer.replayed);
        answers.push((key, body, answer));
    }
    answers
}

async fn assert_replays(server: &TestServer, answers: &[(String, Value, Answer)], when: &str) {
    for (key, body, first) in answers {
        let replay = server.post_keyed("/v1/transfers", body, key).await;
        assert_eq!(
            (replay.status, &replay.content_type, &replay.body),
            (201, &first.content_type, &first.body),
            "{key} {when}: the replay is the first answer byte for byte"
        );
        assert!(replay.replayed, "{key} {when}: marked as a replay");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_transfers_replay_from_the_log_and_store_no_answer() {
    const TRANSFERS: usize = 120;
    for executors in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start_with(dir.path(), executors, Duration::from_secs(3600)).await;
        let accounts: Vec<String> = (0..6).map(|n| format!("acct-{n}")).collect();
        for account in &accounts {
            assert_eq!(server.post("/v1/accounts", &json!({"id": account, "currency": "USD"})).await, 201);
        }
        let answers = keyed_transfers(&server, &accounts, TRANSFERS).await;
        // At once, from the outcomes held until the feed stores them.
        assert_replays(&server, &answers, "at once").await;
        // A pending transfer posted since: its keyed create still replays
        // the answer it had (status pending), not the record as it is now.
        let (_, pending_body, _) = &answers[0];
        let post = json!({"id": "post-kt-0"});
        assert_eq!(
            server.post(&format!("/v1/transfers/{}/post", pending_body["id"].as_str().unwrap()), &post).await,
            201
        );
        // From the store, once the feed has it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_replays(&server, &answers, "from the store").await;
        assert!(String::from_utf8_lossy(&answers[0].2.body).contains("\"status\":\"pending\""));

        // The same key with another body, or on another route: refused, nothing made.
        let (key, body, _) = &answers[7];
        let mut other = body.clone();
        other["amount"] = json!(999);
        let reused = server.post_keyed("/v1/transfers", &other, key).await;
        assert_eq!(reused.status, 422, "{:?}", reused.body);
        let elsewhere = server.post_keyed("/v1/accounts", &json!({"id": "nope", "currency": "USD"}), key).await;
        assert_eq!(elsewhere.status, 422, "{:?}", elsewhere.body);
        server.stop().await;

        // What is stored: an outcome per keyed transfer, no answer.
        {
            let idempotency =
                peakstack_server::idempotency::IdempotencyStore::open(&dir.path().join("idempotency.redb")).unwrap();
            let (access, _) = peakstack_server::AccessStore::open(&dir.path().join("access.redb")).unwrap();
            assert_eq!(idempotency.stored_keys().await.unwrap(), 0, "no keyed transfer stored its answer");
            assert_eq!(access.keyed_outcomes_stored(), TRANSFERS as u64);
            idempotency.close().await;
            access.close().await;
        }

        // After a restart.
        let server = TestServer::start_with(dir.path(), executors, Duration::from_secs(3600)).await;
        assert_replays(&server, &answers, "after a restart").await;
        let reused = server.post_keyed("/v1/transfers", &other, key).await;
        assert_eq!(reused.status, 422, "{:?}", reused.body);
        assert_eq!(
            server.post("/v1/accounts", &json!({"id": "nope", "currency": "USD"})).await,
            201,
            "nothing was made"
        );
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_transfer_is_forgotten_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for account in ["ra", "rb"] {
        assert_eq!(server.post("/v1/accounts", &json!({"id": account, "currency": "USD"})).await, 201);
    }
    let first = server.post_keyed("/v1/transfers", &transfer("rt-1", "ra", "rb", 5, false), "kept").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let other = transfer("rt-2", "ra", "rb", 6, false);
    assert_eq!(server.post_keyed("/v1/transfers", &other, "kept").await.status, 422);
    let mut forgotten = None;
    for _ in 0..POLL_STEPS {
        let answer = server.post_keyed("/v1/transfers", &other, "kept").await;
        if answer.status != 422 {
            forgotten = Some(answer);
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    let forgotten = forgotten.expect("the keyed outcome is purged after its retention");
    assert_eq!(forgotten.status, 201, "{:?}", forgotten.body);
    assert!(!forgotten.replayed);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_remembered_for_the_retention_and_forgotten_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let first_body = json!({"id": "ret-a", "currency": "USD"});
    let first = server.post_keyed("/v1/accounts", &first_body, "retained").await;
    assert_eq!(first.status, 201, "{:?}", first.body);

    let replay = server.post_keyed("/v1/accounts", &first_body, "retained").await;
    assert_eq!((replay.status, &replay.content_type, &replay.body), (201, &first.content_type, &first.body));
    let reused = server.post_keyed("/v1/accounts", &json!({"id": "ret-b", "currency": "USD"}), "retained").await;
    assert_eq!(reused.status, 422, "{:?}", reused.body);

    // Past the retention the purge forgets the key: the other body runs.
    let mut forgotten = None;
    for _ in 0..POLL_STEPS {
        let answer = server.post_keyed("/v1/accounts", &json!({"id": "ret-b", "currency": "USD"}), "retained").await;
        if answer.status != 422 {
            forgotten = Some(answer);
            break;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    let forgotten = forgotten.expect("the key is purged after its retention");
    assert_eq!(forgotten.status, 201, "{:?}", forgotten.body);
    server.stop().await;
}

/// A keyed transfer whose client went away before the answer (the server
/// dropped the request, the engine made the transfer): a retry with the
/// key replays the 201 of that run, never a 200 "exists", whether the
/// audit feed stored its outcome before the retry or just after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_transfer_whose_client_went_away_replays_its_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for account in ["ga", "gb"] {
        assert_eq!(server.post("/v1/accounts", &json!({"id": account, "currency": "USD"})).await, 201);
    }
    for round in 0..5 {
        let body = transfer(&format!("gone-{round}"), "ga", "gb", 3, false);
        let key = format!("gone-{round}");
        server.engine.test_batch_gate(0).close();
        let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
        let sent = impatient
            .post(format!("{}/v1/transfers", server.base))
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await;
        assert!(sent.is_err(), "the engine is stalled: the client gives up first");
        server.engine.test_batch_gate(0).open();
        let mut retry = server.post_keyed("/v1/transfers", &body, &key).await;
        for _ in 0..POLL_STEPS {
            if retry.status != 409 {
                break;
            }
            tokio::time::sleep(POLL_STEP).await;
            retry = server.post_keyed("/v1/transfers", &body, &key).await;
        }
        assert_eq!(retry.status, 201, "round {round}: {:?}", retry.body);
        assert!(retry.replayed, "round {round}: the answer of the first run");
        let again = server.post_keyed("/v1/transfers", &body, &key).await;
        assert_eq!((again.status, &again.body), (201, &retry.body), "round {round}");
    }
    server.stop().await;
}
