//! A data dir written before balances were u128 (`fixtures/v1-data`, made
//! by `fixtures/make-v1-data.sh` with the build of commit 128dd29: u64
//! balances, checkpoint format 1, a checkpoint and log after it on each of
//! two executors) opens with its exact balances, keeps working, and is
//! checkpointed in the new format.

use std::path::Path;
use std::sync::Arc;

use peakstack_domain::{Id, TransferRequest, TransferStatus};
use peakstack_engine::{Engine, EngineConfig, SystemClock};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-data");

/// (account, debits_pending, debits_posted, credits_pending, credits_posted)
/// as the old build answered them just before it was killed.
const EXPECTED: &[(&str, u128, u128, u128, u128)] = &[
    ("_clearing.1.EUR", 0, 77, 0, 777),
    ("_clearing.2.USD", 0, 6700, 0, 0),
    ("_clearing.3.EUR", 0, 777, 0, 77),
    ("_clearing.4.USD", 50, 9007199254740991, 0, 14200),
    ("_clearing.7.USD", 0, 10000, 50, 9007199254743491),
    ("alice", 50, 3100, 0, 9007199254750991),
    ("bob", 0, 14200, 50, 9007199254740991),
    ("carol", 0, 0, 0, 6700),
    ("dave", 0, 18014398509481982, 0, 600),
    ("erin", 0, 777, 0, 77),
    ("frank", 0, 77, 0, 777),
];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Opens the engine and stores the audit events its replay made again (the
/// fixture's transfers came over HTTP), as the server would: a checkpoint
/// waits for them.
fn open(dir: &Path) -> Engine {
    let engine =
        Engine::open(EngineConfig { shards: 8, clock: Arc::new(SystemClock), ..EngineConfig::new(dir, 2) }).unwrap();
    let (backlog, _feed) = engine.take_audit_feed().unwrap();
    for batch in backlog {
        engine.audit_stored(batch.executor, batch.sequence);
    }
    engine
}

async fn balances(engine: &Engine) -> Vec<(String, u128, u128, u128, u128)> {
    let accounts = engine.accounts(None, 100).await.unwrap();
    accounts
        .iter()
        .map(|a| {
            let b = a.balances;
            (a.id.to_string(), b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
        })
        .collect()
}

fn expected() -> Vec<(String, u128, u128, u128, u128)> {
    EXPECTED.iter().map(|&(id, a, b, c, d)| (id.to_owned(), a, b, c, d)).collect()
}

fn checkpoint_format(dir: &Path, executor: &str) -> u32 {
    let bytes = std::fs::read(dir.join(executor).join("checkpoint.snap")).unwrap();
    u32::from_le_bytes(bytes[4..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_u64_balances_opens_with_its_balances() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new(FIXTURE), dir.path());
    assert_eq!(checkpoint_format(dir.path(), "executor-000"), 1, "the fixture is of the old format");

    let engine = open(dir.path());
    assert_eq!(balances(&engine).await, expected(), "balances from the checkpoint and the log after it");
    let status = |tid: &str| {
        let engine = engine.clone();
        let tid = Id::parse(tid).unwrap();
        async move { engine.transfer(&tid).await.unwrap().map(|t| t.status) }
    };
    assert_eq!(status("t6").await, Some(TransferStatus::Posted), "logged after the checkpoint");
    assert_eq!(status("h2").await, Some(TransferStatus::Voided));
    assert_eq!(status("h3").await, Some(TransferStatus::Pending));
    assert_eq!(engine.totals().await.unwrap().net, 0);

    // It keeps working: alice's hold from before is posted.
    let post = TransferRequest::Post {
        id: Id::parse("h3-post").unwrap(),
        pending_id: Id::parse("h3").unwrap(),
        amount: None,
        details: None,
    };
    engine.create_transfers(vec![post], false).await.pop().unwrap().unwrap();
    let mut after = expected();
    for (id, dp, dpo, cp, cpo) in &mut after {
        match id.as_str() {
            "alice" | "_clearing.4.USD" => (*dp, *dpo) = (*dp - 50, *dpo + 50),
            "bob" | "_clearing.7.USD" => (*cp, *cpo) = (*cp - 50, *cpo + 50),
            _ => {}
        }
    }
    assert_eq!(balances(&engine).await, after);
    engine.shutdown();
    drop(engine);

    // Shut down, it wrote checkpoints of the new format, which read back.
    assert_eq!(checkpoint_format(dir.path(), "executor-000"), 3);
    assert_eq!(checkpoint_format(dir.path(), "executor-001"), 3);
    let engine = open(dir.path());
    assert_eq!(balances(&engine).await, after);
    engine.shutdown();
}
