//! Data dirs of earlier releases open with this one. A data dir written before balances were u128 (`fixtures/v1-data`, made
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
    assert_eq!(checkpoint_format(dir.path(), "executor-000"), 4);
    assert_eq!(checkpoint_format(dir.path(), "executor-001"), 4);
    let engine = open(dir.path());
    assert_eq!(balances(&engine).await, after);
    engine.shutdown();
}

/// The data dir of the last release before the engine hosted parts
/// (`fixtures/v2-data`, made by `fixtures/make-v2-data.sh` with the build of
/// commit 7cd9ba6: checkpoint format 2, a checkpoint and log after it on each
/// of two executors, killed with SIGKILL) opens with its balances, statuses
/// and transfer details, takes inventory commands, and checkpoints in the
/// new format with the inventory in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_release_before_parts_opens_and_takes_inventory() {
    use peakstack_engine::inventory::{Answer, Command, NewSku};
    const V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v2-data");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new(V2), dir.path());
    assert_eq!(checkpoint_format(dir.path(), "executor-000"), 2, "the fixture is of the old format");
    let v2_balances: Vec<(String, u128, u128, u128, u128)> = [
        ("_clearing.2.USD", 0, 6700, 0, 0),
        ("_clearing.4.USD", 50, 0, 0, 14200),
        ("_clearing.7.USD", 0, 10000, 50, 2500),
        ("alice", 50, 3100, 0, 10000),
        ("bob", 0, 14200, 50, 0),
        ("carol", 0, 0, 0, 6700),
        ("dave", 0, 0, 0, 600),
    ]
    .iter()
    .map(|&(id, a, b, c, d)| (id.to_owned(), a, b, c, d))
    .collect();

    let engine = open(dir.path());
    assert_eq!(balances(&engine).await, v2_balances, "balances from the checkpoint and the log after it");
    let dave = engine.account(&Id::parse("dave").unwrap()).await.unwrap().unwrap();
    assert_eq!(dave.status(), peakstack_domain::AccountStatus::Frozen);
    let t1 = engine.transfer(&Id::parse("t1").unwrap()).await.unwrap().unwrap();
    assert_eq!(t1.details.as_ref().and_then(|d| d.reference.as_deref()), Some("ord-1"));
    let h2 = engine.transfer(&Id::parse("h2").unwrap()).await.unwrap().unwrap();
    assert_eq!(h2.status, TransferStatus::Pending, "logged after the checkpoint, before the kill");
    assert_eq!(engine.totals().await.unwrap().net, 0);

    let sku = Command::CreateSku(NewSku {
        id: Id::parse("s1").unwrap(),
        merchant_id: Id::parse("bob").unwrap(),
        title: "Mug".into(),
        price: peakstack_domain::Amount::new(500).unwrap(),
        currency: peakstack_domain::Currency::parse("USD").unwrap(),
        stock: 3,
        per_buyer_limit: None,
    });
    assert!(matches!(engine.inventory(sku).await, Ok(Answer::Sku { created: true, .. })));
    engine.shutdown();
    drop(engine);

    for executor in ["executor-000", "executor-001"] {
        assert_eq!(checkpoint_format(dir.path(), executor), 4);
    }
    let engine = open(dir.path());
    assert_eq!(balances(&engine).await, v2_balances);
    assert_eq!(engine.sku(&Id::parse("s1").unwrap()).await.unwrap().map(|s| s.stock), Some(3));
    engine.shutdown();
}
