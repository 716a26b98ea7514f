//! Durability under kill -9: a real `peakstack serve` process takes
//! concurrent transfers, many crossing executors, and is killed with SIGKILL
//! at a random moment. After a restart on the same data dir:
//! - every acknowledged transfer is there, with the same fields;
//! - no transfer is half-applied: every account's balance is exactly what the
//!   transfers that exist add up to;
//! - transfers caught between executors complete (clearing accounts net to
//!   zero) and all balances sum to zero;
//! - every acknowledged request sent with an Idempotency-Key (half the
//!   writers send one) replays its first answer byte for byte, also the
//!   last ones before the kill, whose outcomes only the engine's log held.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{client, create_key, free_port, start, wait_ready};
use serde_json::{json, Value};

const ACCOUNTS: usize = 24;
const WRITERS: usize = 16;
/// Two executors (so transfers cross them), few records in memory (so they
/// get archived under load) and frequent checkpoints.
const FLAGS: &[&str] =
    &["--shards", "16", "--executors", "2", "--records-in-memory", "200", "--checkpoint-log-bytes", "16384"];

/// A keyed request acknowledged: its key, body and the answer's bytes.
type KeyedAnswers = HashMap<String, (String, Value, bytes::Bytes)>;

#[derive(Clone, Debug, PartialEq)]
struct Sent {
    debit: String,
    credit: String,
    amount: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_transfers_survive_sigkill() {
    kill_under_load_and_recover(Moment::AfterCheckpoints).await;
}

/// The same, killed while both logs write over the zeros of a prepared
/// segment: recovery must find the frames before the zeros and cut
/// whatever the kill left after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_transfers_survive_sigkill_in_prepared_log_segments() {
    kill_under_load_and_recover(Moment::InPreparedSegments).await;
}

/// When the server is killed, besides both executors having checkpointed.
#[derive(Clone, Copy, PartialEq)]
enum Moment {
    AfterCheckpoints,
    InPreparedSegments,
}

/// Whether the executor's newest log segment is a prepared one (written
/// zeros of the full segment size, frames over them).
fn writes_in_prepared_segment(executor_dir: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir(executor_dir) else { return false };
    let newest = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".log")))
        .max_by_key(|e| e.file_name());
    newest.is_some_and(|e| e.metadata().is_ok_and(|m| m.len() == peakstack_engine::log::SEGMENT_BYTES))
}

async fn kill_under_load_and_recover(moment: Moment) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let key = create_key(dir.path(), "admin");
    let key_id = key[4..20].to_owned();
    let client = client(&key);
    let mut server = start(dir.path(), port, FLAGS);
    wait_ready(&client, &base).await;

    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("crash-{i}")).collect();
    for name in &names {
        let r = client
            .post(format!("{base}/v1/accounts"))
            .json(&json!({"id": name, "currency": "USD"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    let acked: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    let attempted: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    let keyed: Arc<Mutex<KeyedAnswers>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (client, base, names) = (client.clone(), base.clone(), names.clone());
        let (acked, attempted, keyed) = (acked.clone(), attempted.clone(), keyed.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: stops at the first failed request (the server is gone) or after 100k.
            for n in 0..100_000u64 {
                let debit = &names[(w * 7 + n as usize * 5) % ACCOUNTS];
                let credit = &names[(w * 11 + n as usize * 3 + 1) % ACCOUNTS];
                if debit == credit {
                    continue;
                }
                let id = format!("w{w}-{n}");
                let sent = Sent { debit: debit.clone(), credit: credit.clone(), amount: 1 + n % 97 };
                attempted.lock().unwrap().insert(id.clone(), sent.clone());
                let body = json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": sent.amount, "currency": "USD"});
                let key = (w % 2 == 0).then(|| format!("key-{id}"));
                let mut request = client.post(format!("{base}/v1/transfers")).json(&body);
                if let Some(key) = &key {
                    request = request.header("idempotency-key", key);
                }
                let Ok(r) = request.send().await else { return };
                if r.status().as_u16() != 201 {
                    return;
                }
                let Ok(raw) = r.bytes().await else { return };
                if let Some(key) = key {
                    keyed.lock().unwrap().insert(id.clone(), (key, body, raw));
                }
                acked.lock().unwrap().insert(id, sent);
            }
        }));
    }
    // Kill once both executors have checkpointed under load (so recovery
    // starts from a checkpoint and replays the log after it), at a moment
    // that depends on the run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = |e: usize| {
        let executor_dir = dir.path().join(format!("executor-{e:03}"));
        executor_dir.join("checkpoint.snap").exists()
            && (moment == Moment::AfterCheckpoints || writes_in_prepared_segment(&executor_dir))
    };
    while !(0..2).all(ready) {
        assert!(Instant::now() < deadline, "not ready to kill after 60 s under load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wait_ms = 100 + (std::process::id() as u64 % 500);
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    server.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    server.wait().unwrap();
    for writer in writers {
        let _ = writer.await;
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    let keyed = keyed.lock().unwrap().clone();
    assert!(acked.len() > 50, "too few writes before the kill ({}) to test anything", acked.len());

    let mut server = start(dir.path(), port, FLAGS);
    wait_ready(&client, &base).await;

    // Every acknowledged transfer is there with the same fields.
    for (id, sent) in &acked {
        let t: Value = client.get(format!("{base}/v1/transfers/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(t["debit_account_id"], sent.debit.as_str(), "{id}: {t}");
        assert_eq!(t["credit_account_id"], sent.credit.as_str(), "{id}: {t}");
        assert_eq!(t["amount"], sent.amount, "{id}: {t}");
        assert_eq!(t["status"], "posted", "{id}: {t}");
    }
    // Every acknowledged transfer is in the audit log, under the key that
    // made it, once: its record was durable with the transfer, even if the
    // kill came before the audit store had it.
    let mut audited: BTreeMap<String, usize> = BTreeMap::new();
    let mut after = String::new();
    loop {
        let page: Value = client
            .get(format!("{base}/v1/audit?action=transfer.create&limit=1000{after}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for record in page["data"].as_array().unwrap_or_else(|| panic!("{page}")) {
            assert_eq!(record["key_id"], key_id.as_str(), "{record}");
            *audited.entry(record["target"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    for id in acked.keys() {
        assert_eq!(audited.get(id), Some(&1), "acknowledged transfer {id} has no single audit record");
    }

    // Keyed requests replay their first answer byte for byte: the last
    // ten of each keyed writer (their outcomes were likely in the engine's
    // log only when it died) and every tenth of the rest.
    let mut by_writer: BTreeMap<&str, Vec<(u64, &String)>> = BTreeMap::new();
    for id in keyed.keys() {
        let (writer, n) = id.split_once('-').unwrap();
        by_writer.entry(writer).or_default().push((n.parse().unwrap(), id));
    }
    let mut replayed = 0;
    for ids in by_writer.values_mut() {
        ids.sort();
        let last = ids.len().saturating_sub(10);
        for (index, (_, id)) in ids.iter().enumerate() {
            if index < last && index % 10 != 0 {
                continue;
            }
            let (key, body, first) = &keyed[*id];
            let r = client
                .post(format!("{base}/v1/transfers"))
                .header("idempotency-key", key)
                .json(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "{id}: the replay of a keyed transfer");
            assert_eq!(r.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]), "{id}");
            assert_eq!(&r.bytes().await.unwrap(), first, "{id}: the replay is the first answer byte for byte");
            replayed += 1;
        }
    }
    assert!(replayed >= 10, "too few keyed answers ({replayed}) to test replays");

    // Each writer had at most one request in flight when the server died.
    let unacked: Vec<(&String, &Sent)> = attempted.iter().filter(|(id, _)| !acked.contains_key(*id)).collect();
    assert!(unacked.len() <= WRITERS);

    // Cross-executor transfers caught in flight finish after the restart.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut total: i128 = 0;
        let mut clearing: i128 = 0;
        let mut balances = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let url = match &after {
                Some(a) => format!("{base}/v1/accounts?limit=1000&after={a}"),
                None => format!("{base}/v1/accounts?limit=1000"),
            };
            let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            for a in page["data"].as_array().unwrap() {
                // Balances are strings of digits; these stay far below 2^127.
                let balance = |field: &str| -> i128 { a[field].as_str().unwrap().parse().unwrap() };
                let net = balance("credits_posted") + balance("credits_pending")
                    - balance("debits_posted")
                    - balance("debits_pending");
                total += net;
                let id = a["id"].as_str().unwrap().to_string();
                if id.starts_with("_clearing.") {
                    clearing += net;
                } else {
                    balances.insert(id, net);
                }
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        assert_eq!(total, 0, "balances must sum to zero at every moment");
        // Unacknowledged transfers either happened whole or not at all (one
        // resumed after the restart may appear a moment later): balances are
        // exactly the sum of the transfers that exist.
        let mut expected: BTreeMap<String, i128> = names.iter().map(|n| (n.clone(), 0)).collect();
        let existing_unacked = {
            let mut found = Vec::new();
            for (id, sent) in &unacked {
                let r = client.get(format!("{base}/v1/transfers/{id}")).send().await.unwrap();
                if r.status().is_success() {
                    found.push(*sent);
                }
            }
            found
        };
        for sent in acked.values().chain(existing_unacked) {
            *expected.get_mut(&sent.debit).unwrap() -= i128::from(sent.amount);
            *expected.get_mut(&sent.credit).unwrap() += i128::from(sent.amount);
        }
        if clearing == 0 && balances == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in-flight transfers did not settle: clearing {clearing}, balances {balances:?} expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
}
