//! The pending-transfers gauge (`EngineStats::pending_transfers`): pending
//! transfers made and not yet posted, voided or expired, counted by each
//! executor's ledger and summed. The same count with one executor and with
//! two (holds then cross executors), after a restart from the shutdown's
//! checkpoint, and after a restart that replays the whole log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use peakstack_domain::{Amount, Currency, ErrorCode, Id, NewAccount, TransferRequest, TransferStatus};
use peakstack_engine::{Engine, EngineConfig, Layout, ManualClock};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn open(dir: &std::path::Path, executors: u16, clock: Arc<ManualClock>) -> Engine {
    Engine::open(EngineConfig { shards: 8, clock, ..EngineConfig::new(dir, executors) }).unwrap()
}

fn gauge(engine: &Engine) -> u64 {
    engine.stats().pending_transfers.load(Ordering::Relaxed)
}

fn hold(tid: &str, debit: &str, credit: &str, amount: u64, timeout_ms: u64) -> TransferRequest {
    TransferRequest::Create {
        id: id(tid),
        debit_account_id: id(debit),
        credit_account_id: id(credit),
        amount: Amount::new(amount).unwrap(),
        currency: Currency::parse("USD").unwrap(),
        pending: true,
        timeout_ms,
        details: None,
    }
}

async fn one(engine: &Engine, request: TransferRequest) -> Result<TransferStatus, ErrorCode> {
    engine.create_transfers(vec![request], false).await.pop().unwrap().map(|o| o.transfer.status)
}

/// Names that spread over every executor, by `home` (an account's or a
/// transfer's executor).
fn spread(engine: &Engine, prefix: &str, count: usize, home: fn(&Layout, &Id) -> u16) -> Vec<String> {
    let layout = engine.layout();
    let mut names = Vec::new();
    for executor in (0..layout.executors()).cycle() {
        if names.len() == count {
            break;
        }
        let name = (0..1000)
            .map(|n| format!("{prefix}-{n}"))
            .find(|n| home(&layout, &id(n)) == executor && !names.contains(n))
            .expect("some name lands on each executor");
        names.push(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_transfers_gauge_follows_holds_and_survives_restarts() {
    for executors in [1u16, 2] {
        let context = format!("{executors} executor(s)");
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_000_000));
        let engine = open(dir.path(), executors, clock.clone());
        assert_eq!(gauge(&engine), 0, "{context}");
        let accounts = spread(&engine, "acct", 2, Layout::executor_of_account);
        for name in &accounts {
            let new = NewAccount {
                id: id(name),
                currency: Currency::parse("USD").unwrap(),
                flags: Default::default(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            };
            engine.create_account(new).await.unwrap();
        }
        let (payer, payee) = (&accounts[0], &accounts[1]);
        let holds = spread(&engine, "hold", 5, Layout::executor_of_transfer);

        for (n, h) in holds.iter().enumerate() {
            let timeout_ms = if n == 3 { 5_000 } else { 0 };
            assert_eq!(one(&engine, hold(h, payer, payee, 10, timeout_ms)).await, Ok(TransferStatus::Pending));
            assert_eq!(gauge(&engine), n as u64 + 1, "{context}: after hold {n}");
        }
        // A retry and a refusal make no pending transfer.
        assert_eq!(one(&engine, hold(&holds[0], payer, payee, 10, 0)).await, Ok(TransferStatus::Pending));
        assert_eq!(one(&engine, hold("refused", payer, "nobody", 10, 0)).await, Err(ErrorCode::AccountNotFound));
        assert_eq!(gauge(&engine), 5, "{context}: after a retry and a refusal");

        let post = TransferRequest::Post { id: id("post-0"), pending_id: id(&holds[0]), amount: None, details: None };
        assert_eq!(one(&engine, post).await, Ok(TransferStatus::Posted));
        assert_eq!(gauge(&engine), 4, "{context}: after a post");
        let partial = TransferRequest::Post {
            id: id("post-1"),
            pending_id: id(&holds[1]),
            amount: Amount::new(3),
            details: None,
        };
        assert_eq!(one(&engine, partial).await, Ok(TransferStatus::Posted));
        assert_eq!(gauge(&engine), 3, "{context}: after a partial post");
        let void = TransferRequest::Void { id: id("void-2"), pending_id: id(&holds[2]), details: None };
        assert_eq!(one(&engine, void).await, Ok(TransferStatus::Voided));
        assert_eq!(gauge(&engine), 2, "{context}: after a void");
        let again = TransferRequest::Void { id: id("void-2b"), pending_id: id(&holds[2]), details: None };
        assert_eq!(one(&engine, again).await, Err(ErrorCode::PendingTransferAlreadyVoided));
        assert_eq!(gauge(&engine), 2, "{context}: a refused void changes nothing");

        clock.advance(6_000);
        let mut waited = 0;
        while engine.transfer(&id(&holds[3])).await.unwrap().unwrap().status != TransferStatus::Expired {
            assert!(waited < 500, "{context}: hold 3 did not expire");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        // The expiry resolves the record first and may still be releasing
        // the holds on the other executor; the gauge counts records.
        assert_eq!(gauge(&engine), 1, "{context}: after an expiry");
        engine.shutdown();
        drop(engine);

        // From the checkpoint the shutdown wrote.
        let engine = open(dir.path(), executors, clock.clone());
        assert_eq!(gauge(&engine), 1, "{context}: after a restart");
        assert_eq!(one(&engine, hold("hold-after", payer, payee, 1, 0)).await, Ok(TransferStatus::Pending));
        assert_eq!(gauge(&engine), 2, "{context}: a hold after the restart");
        engine.shutdown();
        drop(engine);

        // From the log alone: without the checkpoints the whole log replays
        // (no segment was full, so none was deleted).
        for e in 0..executors {
            std::fs::remove_file(dir.path().join(format!("executor-{e:03}/checkpoint.snap"))).unwrap();
        }
        let engine = open(dir.path(), executors, clock.clone());
        assert_eq!(gauge(&engine), 2, "{context}: after replaying the log");
        assert_eq!(engine.transfer(&id(&holds[4])).await.unwrap().unwrap().status, TransferStatus::Pending);
        let void = TransferRequest::Void { id: id("void-4"), pending_id: id(&holds[4]), details: None };
        assert_eq!(one(&engine, void).await, Ok(TransferStatus::Voided));
        assert_eq!(gauge(&engine), 1, "{context}: after a void past the replay");
        engine.shutdown();
    }
}
