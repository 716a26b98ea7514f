//! Over real HTTP: `ServerConfig::idempotency_retention` is what the purge
//! keeps to. Within it a key replays its first answer byte for byte (and a
//! different body under it is 422); after it the key is forgotten and the
//! next request with it runs.

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
    body: bytes::Bytes,
}

impl TestServer {
    async fn start(dir: &std::path::Path) -> TestServer {
        let engine = Engine::open(EngineConfig { shards: 4, ..EngineConfig::new(dir, 1) }).unwrap();
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        config.auth = AuthMode::InsecureNoAuth;
        config.idempotency_retention = RETENTION;
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
        Answer { status, content_type, body: response.bytes().await.unwrap() }
    }
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
