//! Fail-stop with a real `peakstack serve`: an engine thread that panics
//! (made to, by the `PEAKSTACK_FAULT_PANIC` test hook) stops the whole
//! process with exit status 70 and a log line naming the thread and the
//! panic, instead of leaving the other threads serving around a dead one. A
//! restart without the hook recovers everything acknowledged before. The
//! server's store threads stop it the same way.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Duration;

mod common;

use common::{client, create_key, free_port, serve_command, start, terminate, wait_exit, wait_ready};
use serde_json::{json, Value};

/// What makes the faulty thread reach its first fault point.
#[derive(Clone, Copy)]
enum Trigger {
    /// Accounts created one request at a time (each a batch of its own).
    Accounts,
    /// Two accounts, then one batch of transfers too big for the apply
    /// thread to write itself: it goes to the log thread.
    TransferBatch,
}

const ACCOUNTS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_one_executors_apply_thread_stops_the_process() {
    // Two executors: the other one would go on serving.
    check("apply-0", &["--executors", "2"], Trigger::Accounts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_log_thread_stops_the_process() {
    check("log-0", &["--executors", "1"], Trigger::TransferBatch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_checkpoint_thread_stops_the_process() {
    // A checkpoint after every batch that logs anything.
    check("checkpoint-0", &["--executors", "1", "--checkpoint-log-bytes", "1"], Trigger::Accounts).await;
}

#[test]
fn a_panic_on_a_server_store_thread_stops_the_process() {
    // The store threads reach their fault point when they start.
    for thread in ["idempotency", "access-store", "audit-feed"] {
        let dir = tempfile::tempdir().unwrap();
        create_key(dir.path(), "admin");
        let mut faulty = serve_command(dir.path(), free_port(), &[])
            .env("PEAKSTACK_FAULT_PANIC", thread)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start peakstack serve");
        let stderr = collect_stderr(&mut faulty);
        let status = wait_exit(&mut faulty, Duration::from_secs(20));
        let log = stderr.join().unwrap();
        assert_eq!(status.code(), Some(70), "{thread}: exit status {status}; stderr:\n{log}");
        assert!(log.contains(&format!("fatal: thread {thread} panicked")), "{thread}: stderr:\n{log}");
    }
}

async fn check(thread: &str, flags: &[&str], trigger: Trigger) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = client(&create_key(dir.path(), "admin"));

    let mut faulty = serve_command(dir.path(), port, flags)
        .env("PEAKSTACK_FAULT_PANIC", thread)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peakstack serve");
    let stderr = collect_stderr(&mut faulty);
    wait_ready(&client, &base).await;
    let acknowledged = send(&client, &base, trigger).await;

    let status = wait_exit(&mut faulty, Duration::from_secs(20));
    let log = stderr.join().unwrap();
    assert_eq!(status.code(), Some(70), "exit status {status}; stderr:\n{log}");
    let line = format!("fatal: thread {thread} panicked: fault injected by PEAKSTACK_FAULT_PANIC={thread}");
    assert_eq!(log.lines().filter(|l| l.contains(&line)).count(), 1, "one line {line:?} in stderr:\n{log}");

    // Restarted without the hook, recovery brings back all it acknowledged.
    let server = start(dir.path(), port, flags);
    wait_ready(&client, &base).await;
    for id in &acknowledged {
        let answer = client.get(format!("{base}/v1/accounts/{id}")).send().await.unwrap();
        assert_eq!(answer.status(), 200, "acknowledged account {id} after the restart");
    }
    terminate(server);
}

/// Sends the trigger's requests until the server stops answering; answers
/// the ids of the accounts it acknowledged.
async fn send(client: &reqwest::Client, base: &str, trigger: Trigger) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let accounts = match trigger {
        Trigger::Accounts => ACCOUNTS,
        Trigger::TransferBatch => 2,
    };
    for n in 0..accounts {
        let id = format!("acc-{n}");
        let body = json!({"id": id, "currency": "USD"});
        match client.post(format!("{base}/v1/accounts")).json(&body).send().await {
            Ok(answer) if answer.status() == 201 => acknowledged.push(id),
            // The executor died with the request: its answer was dropped.
            Ok(answer) if answer.status() == 503 => break,
            Ok(answer) => panic!("creating {id}: {} {}", answer.status(), answer.text().await.unwrap()),
            // The process stopped, as it should.
            Err(_) => break,
        }
    }
    assert!(!acknowledged.is_empty(), "no account was created before the fault: nothing to recover");
    if let (Trigger::TransferBatch, 2) = (trigger, acknowledged.len()) {
        let transfers: Vec<Value> = (0..100)
            .map(|n| json!({"id": format!("t-{n}"), "debit_account_id": "acc-0", "credit_account_id": "acc-1", "amount": 1, "currency": "USD"}))
            .collect();
        let batch = json!({"transfers": transfers});
        let answer = client.post(format!("{base}/v1/transfers/batch")).json(&batch).send().await;
        // The log thread died before the batch was durable: no answer, or
        // one where every transfer failed, never one that was made.
        if let Ok(answer) = answer {
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            let made = body["results"].as_array().into_iter().flatten().filter(|r| r["status"] != "error").count();
            assert_eq!(made, 0, "transfers acknowledged that were never durable: {body}");
        }
    }
    acknowledged
}

/// The child's whole stderr, read on a thread (a full pipe would block the
/// child) until the child exits.
fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut pipe = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
