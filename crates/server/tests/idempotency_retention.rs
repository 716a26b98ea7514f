//! Over real HTTP: `ServerConfig::idempotency_retention` is what the purge
//! keeps to. Within it a key replays its first answer byte for byte (and a
//! different body under it is 422); after it the key is forgotten and the
//! next request with it runs.

mod common;

use std::time::Duration;

use common::{insecure_config, Answer, Running};
use peakstack_engine::{Engine, EngineConfig};
use serde_json::{json, Value};

/// Bound of the polling loop below (steps of [`POLL_STEP`]): the purge
/// runs every second, so the key must be gone well within it.
const POLL_STEPS: usize = 300;
const POLL_STEP: Duration = Duration::from_millis(50);
const RETENTION: Duration = Duration::from_secs(2);

struct TestServer {
    server: Running,
    client: reqwest::Client,
}

impl TestServer {
    async fn start(dir: &std::path::Path) -> TestServer {
        let engine = Engine::open(EngineConfig { shards: 4, ..EngineConfig::new(dir, 1) }).unwrap();
        let mut config = insecure_config(dir);
        config.idempotency_retention = RETENTION;
        TestServer { server: Running::start(engine, config).await, client: reqwest::Client::new() }
    }

    async fn stop(self) {
        self.server.stop().await;
    }

    async fn post_keyed(&self, path: &str, body: &Value, key: &str) -> Answer {
        let request = self.client.post(self.server.url(path)).json(body).header("idempotency-key", key);
        Answer::read(request.send().await.unwrap()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_remembered_for_the_retention_and_forgotten_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let first_body = json!({"id": "ret-a", "currency": "USD"});
    let first = server.post_keyed("/v1/accounts", &first_body, "retained").await;
    assert_eq!(first.status, 201, "{}", first.text());

    let replay = server.post_keyed("/v1/accounts", &first_body, "retained").await;
    assert_eq!((replay.status, replay.content_type(), &replay.raw), (201, first.content_type(), &first.raw));
    let reused = server.post_keyed("/v1/accounts", &json!({"id": "ret-b", "currency": "USD"}), "retained").await;
    assert_eq!(reused.status, 422, "{}", reused.text());

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
    assert_eq!(forgotten.status, 201, "{}", forgotten.text());
    server.stop().await;
}
