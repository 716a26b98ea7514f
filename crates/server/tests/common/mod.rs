//! The harness the server's HTTP tests share: a real server and engine on
//! a temp dir, API keys stored as `peakstack keys create` stores them,
//! requests and their answers. Each test binary uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use peakstack_server::audit::AuditRecord;
use peakstack_server::{open_access_store, AppState, AuthMode, Scope, Server, ServerConfig};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The engine the tests run on, in real time: `shards` and `executors`
/// shape the keyspace, `records_in_memory` small makes the archive take
/// part, `checkpoint_every_log_bytes` small makes restarts read checkpoints.
pub fn open_engine(
    dir: &Path,
    shards: u32,
    executors: u16,
    records_in_memory: usize,
    checkpoint_every_log_bytes: u64,
) -> Engine {
    Engine::open(EngineConfig {
        data_dir: dir.to_path_buf(),
        shards,
        executors,
        clock: Arc::new(SystemClock),
        records_in_memory,
        checkpoint_every_log_bytes,
    })
    .unwrap()
}

/// A name (an account or transfer id) that lives on executor `executor`.
pub fn name_on(engine: &Engine, executor: u16, prefix: &str) -> String {
    let layout = engine.layout();
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| layout.executor_of_account(&peakstack_domain::Id::parse(name).unwrap()) == executor)
        .unwrap()
}

/// A server on a free loopback port with the data dir `dir`, API keys
/// required.
pub fn loopback_config(dir: &Path) -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf())
}

/// The same without keys: every caller is an admin.
pub fn insecure_config(dir: &Path) -> ServerConfig {
    let mut config = loopback_config(dir);
    config.auth = AuthMode::InsecureNoAuth;
    config
}

/// A server running on its own task, over `engine`.
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub addr: SocketAddr,
    pub engine: Engine,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub async fn start(engine: Engine, config: ServerConfig) -> Running {
        let server = Server::bind(config, engine.clone()).await.unwrap();
        let addr = server.local_addr();
        let state = server.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Running { base: format!("http://{addr}"), addr, engine, state, stop: Some(stop), task: Some(task) }
    }

    /// Tells the server to stop taking requests (it drains), without
    /// waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the server has stopped (after [`Running::signal_stop`]);
    /// the engine still runs.
    pub async fn wait_stopped(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops the server (draining), then the engine.
    pub async fn stop(mut self) {
        self.signal_stop();
        self.wait_stopped().await;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Stores a key straight into the data dir's access store (the server must
/// not be running on it), as `peakstack keys create` does, also an expired
/// or revoked one; returns the secret key.
pub async fn store_key(dir: &Path, scope: &str, expires_at_ms: Option<u64>, revoked: bool) -> String {
    let (store, _) = open_access_store(dir).unwrap();
    let mut new = peakstack_server::keys::generate(&Scope::parse(scope).unwrap(), expires_at_ms, None, "test", 1);
    if revoked {
        new.record.revoked_at_ms = Some(2);
    }
    let audit = AuditRecord::new("test", "test", "key.create", &new.record.id, Value::Null, 1);
    store.put_key(new.record, audit).await.unwrap();
    store.close().await;
    new.secret_key
}

/// A valid key of `scope`.
pub async fn create_key(dir: &Path, scope: &str) -> String {
    store_key(dir, scope, None, false).await
}

/// A client that sends `key` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub raw: Bytes,
    /// The body as JSON; `Value::Null` when it is not JSON.
    pub body: Value,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let raw = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Answer { status, headers, raw, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// A problem's `code`, `""` for any other answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or_default()
    }

    /// Asserts a problem+json answer with `status` and `code`.
    pub fn assert_problem(&self, status: u16, code: &str, context: &str) {
        assert_eq!(self.status, status, "{context}: {}", self.text());
        assert_eq!(self.content_type(), "application/problem+json", "{context}");
        assert_eq!(self.body["code"], code, "{context}: {}", self.text());
        assert_eq!(self.body["status"], status, "{context}");
        assert!(self.body["type"].as_str().is_some_and(|t| t.ends_with(code)), "{context}");
        assert!(self.body["title"].as_str().is_some_and(|t| !t.is_empty()), "{context}");
        assert!(!self.detail().is_empty(), "{context}");
    }
}

/// A transfer's body.
pub fn transfer(id: &str, debit: &str, credit: &str, amount: u64) -> Value {
    json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount, "currency": "USD"})
}
