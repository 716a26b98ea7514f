//! The engine through its public interface: real threads, real logs on disk.

use std::sync::Arc;
use std::time::Duration;

use peakstack_domain::{AccountFlags, Amount, Currency, ErrorCode, Id, NewAccount, TransferRequest, TransferStatus};
use peakstack_engine::{Engine, EngineConfig, ManualClock};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn open(dir: &std::path::Path, clock: Arc<ManualClock>) -> Engine {
    // Few records in memory and frequent checkpoints, so that the archive and
    // recovery from a checkpoint take part in every test.
    Engine::open(EngineConfig {
        shards: 8,
        clock,
        records_in_memory: 4,
        checkpoint_every_log_bytes: 2048,
        ..EngineConfig::new(dir, 2)
    })
    .unwrap()
}

fn account(name: &str, flags: AccountFlags) -> NewAccount {
    NewAccount { id: id(name), currency: usd(), flags, overdraft_limit: 0, metadata: None, owner: None }
}

fn create(tid: &str, debit: &str, credit: &str, amount: u64) -> TransferRequest {
    TransferRequest::Create {
        id: id(tid),
        debit_account_id: id(debit),
        credit_account_id: id(credit),
        amount: Amount::new(amount).unwrap(),
        currency: usd(),
        pending: false,
        timeout_ms: 0,
        details: None,
    }
}

fn pending(tid: &str, debit: &str, credit: &str, amount: u64, timeout_ms: u64) -> TransferRequest {
    match create(tid, debit, credit, amount) {
        TransferRequest::Create { id, debit_account_id, credit_account_id, amount, currency, .. } => {
            TransferRequest::Create {
                id,
                debit_account_id,
                credit_account_id,
                amount,
                currency,
                pending: true,
                timeout_ms,
                details: None,
            }
        }
        _ => unreachable!(),
    }
}

async fn one(engine: &Engine, request: TransferRequest) -> Result<peakstack_engine::TransferOutcome, ErrorCode> {
    engine.create_transfers(vec![request], false).await.pop().unwrap()
}

/// Names of accounts that land on different executors and shards, so tests
/// exercise the cross-executor protocol whatever the hash does.
fn spread_names(engine: &Engine, count: usize) -> Vec<String> {
    let layout = engine.layout();
    let mut names = Vec::new();
    let mut executors_seen = Vec::new();
    for n in 0.. {
        let name = format!("acct-{n}");
        let e = layout.executor_of_account(&id(&name));
        if names.len() < count && (executors_seen.iter().filter(|x| **x == e).count() < count.div_ceil(2)) {
            executors_seen.push(e);
            names.push(name);
        }
        if names.len() == count {
            break;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_across_executors_balance_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = open(dir.path(), clock.clone());
    let names = spread_names(&engine, 4);
    let limited = AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS;
    for name in &names {
        let (_, created) = engine.create_account(account(name, limited)).await.unwrap();
        assert!(created);
    }
    engine.create_account(account("bank", AccountFlags::empty())).await.unwrap();
    // Retrying the same account is fine; different fields are refused.
    assert!(!engine.create_account(account(&names[0], limited)).await.unwrap().1);
    assert_eq!(
        engine.create_account(account(&names[0], AccountFlags::empty())).await.unwrap_err(),
        ErrorCode::ExistsWithDifferentFields
    );

    // Fund everyone from the bank.
    for (i, name) in names.iter().enumerate() {
        let out = one(&engine, create(&format!("fund-{i}"), "bank", name, 1000)).await.unwrap();
        assert!(out.created);
        assert_eq!(out.credit_balances.unwrap().credits_posted, 1000);
    }
    // Insufficient funds is refused and changes nothing.
    assert_eq!(
        one(&engine, create("too-much", &names[0], &names[1], 1001)).await.unwrap_err(),
        ErrorCode::ExceedsCredits
    );
    assert_eq!(
        one(&engine, create("same", &names[0], &names[0], 1)).await.unwrap_err(),
        ErrorCode::AccountsMustBeDifferent
    );
    assert_eq!(one(&engine, create("ghost", &names[0], "nobody", 1)).await.unwrap_err(), ErrorCode::AccountNotFound);

    // A plain transfer, and its idempotent retry.
    let out = one(&engine, create("t1", &names[0], &names[1], 300)).await.unwrap();
    assert!(out.created);
    assert_eq!(out.debit_balances.unwrap().debits_posted, 300);
    let again = one(&engine, create("t1", &names[0], &names[1], 300)).await.unwrap();
    assert!(!again.created);
    assert_eq!(
        one(&engine, create("t1", &names[0], &names[1], 301)).await.unwrap_err(),
        ErrorCode::ExistsWithDifferentFields
    );

    // Pending: hold, partial post, then the second post is refused.
    let held = one(&engine, pending("p1", &names[2], &names[3], 500, 0)).await.unwrap();
    assert_eq!(held.transfer.status, TransferStatus::Pending);
    let a2 = engine.account(&id(&names[2])).await.unwrap().unwrap();
    assert_eq!(a2.available(), Some(500));
    let post = one(
        &engine,
        TransferRequest::Post { id: id("p1-post"), pending_id: id("p1"), amount: Amount::new(200), details: None },
    )
    .await
    .unwrap();
    assert_eq!(post.transfer.amount, 200);
    assert_eq!(post.transfer.status, TransferStatus::Posted);
    assert_eq!(
        one(&engine, TransferRequest::Void { id: id("p1-void"), pending_id: id("p1"), details: None })
            .await
            .unwrap_err(),
        ErrorCode::PendingTransferAlreadyPosted
    );
    let a2 = engine.account(&id(&names[2])).await.unwrap().unwrap();
    assert_eq!((a2.balances.debits_pending, a2.balances.debits_posted), (0, 200));
    assert_eq!(engine.transfer(&id("p1")).await.unwrap().unwrap().posted_amount, Some(200));

    // Pending with a timeout expires and releases its hold.
    one(&engine, pending("p2", &names[3], &names[0], 100, 5_000)).await.unwrap();
    clock.advance(6_000);
    let mut expired = false;
    for _ in 0..200 {
        if engine.transfer(&id("p2")).await.unwrap().unwrap().status == TransferStatus::Expired {
            expired = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(expired, "pending transfer did not expire");
    assert_eq!(
        one(&engine, TransferRequest::Post { id: id("p2-post"), pending_id: id("p2"), amount: None, details: None })
            .await
            .unwrap_err(),
        ErrorCode::PendingTransferExpired
    );

    // Atomic batch: the second transfer fails, so neither happens.
    let results = engine
        .create_transfers(
            vec![create("a1", &names[1], &names[2], 10), create("a2", &names[3], &names[0], 999_999)],
            true,
        )
        .await;
    assert_eq!(results[0].clone().unwrap_err(), ErrorCode::LinkedEventFailed);
    assert_eq!(results[1].clone().unwrap_err(), ErrorCode::ExceedsCredits);
    assert!(engine.transfer(&id("a1")).await.unwrap().is_none());
    // Atomic batch where a later transfer spends what an earlier one credited.
    let before = engine.account(&id(&names[1])).await.unwrap().unwrap().available().unwrap();
    let results = engine
        .create_transfers(
            vec![
                create("b1", "bank", &names[1], 50),
                create("b2", &names[1], &names[2], u64::try_from(before).unwrap() + 50),
            ],
            true,
        )
        .await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|o| o.created)), "{results:?}");

    // History: every transfer that touched the account, newest first, paged;
    // the expired hold appears once although it touched the account twice.
    let (page, next) = engine.account_transfers(&id(&names[0]), None, 2).await.unwrap();
    let first_ids: Vec<_> = page.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(first_ids, ["p2", "t1"]);
    assert_eq!(page[0].status, TransferStatus::Expired);
    let (rest, end) = engine.account_transfers(&id(&names[0]), next, 100).await.unwrap();
    assert_eq!(rest.iter().map(|t| t.id.to_string()).collect::<Vec<_>>(), ["fund-0"]);
    assert!(end.is_none());
    assert_eq!(
        engine.account_transfers(&id(&names[0]), Some("12345".into()), 10).await.unwrap_err(),
        ErrorCode::InvalidRequest,
        "a forged cursor is refused"
    );
    assert_eq!(engine.account_transfers(&id("nobody"), None, 10).await.unwrap_err(), ErrorCode::AccountNotFound);
    // A hold and the post that settled it both show, newest first.
    let (held, _) = engine.account_transfers(&id(&names[2]), None, 100).await.unwrap();
    let held_ids: Vec<_> = held.iter().map(|t| t.id.to_string()).collect();
    let post_at = held_ids.iter().position(|t| t == "p1-post").expect("the post is in the history");
    let hold_at = held_ids.iter().position(|t| t == "p1").expect("the hold is in the history");
    assert!(post_at < hold_at, "{held_ids:?}");

    let totals = engine.totals().await.unwrap();
    assert_eq!(totals.net, 0);
    assert_eq!(totals.clearing_net, 0);
    assert_eq!(totals.txns_in_flight, 0);
    assert!(totals.archived > 0, "the archive took part: {totals:?}");
    let snapshot: Vec<_> = engine.accounts(None, 1000).await.unwrap();
    engine.shutdown();
    drop(engine);

    // Shutdown leaves a checkpoint per executor, so a restart replays little.
    for e in 0..2 {
        assert!(dir.path().join(format!("executor-{e:03}/checkpoint.snap")).exists());
    }

    // Restart: the same state from the checkpoints and logs.
    let engine = open(dir.path(), clock.clone());
    let after: Vec<_> = engine.accounts(None, 1000).await.unwrap();
    assert_eq!(snapshot, after);
    assert_eq!(engine.transfer(&id("p1")).await.unwrap().unwrap().status, TransferStatus::Posted);
    assert!(!one(&engine, create("t1", &names[0], &names[1], 300)).await.unwrap().created);
    let (again, _) = engine.account_transfers(&id(&names[0]), None, 2).await.unwrap();
    assert_eq!(again, page, "history is the same after a restart (rebuilt from the log)");
    engine.shutdown();
}

/// Under constant load that crosses executors there is no moment when no
/// transaction is in flight; checkpoints must still be taken, or the log
/// grows without bound and recovery replays all of it.
#[test]
fn checkpoints_are_taken_under_constant_cross_executor_load() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig {
        shards: 8,
        checkpoint_every_log_bytes: 64 * 1024,
        ..EngineConfig::new(dir.path(), 2)
    })
    .unwrap();
    let names = spread_names(&engine, 8);
    for name in &names {
        engine.create_account_blocking(account(name, AccountFlags::empty())).unwrap();
    }
    let (taken, logged) = load_until_logged(&engine, &names, 16, None, 4 << 20, Duration::ZERO);
    let due = logged / (64 * 1024);
    assert!(taken * 2 >= due, "{taken} checkpoints under load, {due} due ({logged} bytes of log)");
    engine.shutdown();
}

/// Transfers made with an origin come out of the audit feed once durable;
/// until the consumer has stored them no checkpoint covers them, so a crash
/// before it did makes them again on replay.
#[test]
fn the_audit_feed_delivers_every_transfer_made_and_survives_a_restart_until_stored() {
    use peakstack_engine::{AuditBatch, Origin};
    let dir = tempfile::tempdir().unwrap();
    let config = || EngineConfig { shards: 8, checkpoint_every_log_bytes: 512, ..EngineConfig::new(dir.path(), 2) };
    let origin = |request: &str| Origin { key_id: Arc::from("k1"), request_id: Arc::from(request), idempotency: None };
    let ids = |batches: &[AuditBatch]| -> Vec<String> {
        let mut ids: Vec<String> = batches.iter().flat_map(|b| &b.events).map(|e| e.transfer.id.to_string()).collect();
        ids.sort();
        ids
    };

    let engine = Engine::open(config()).unwrap();
    let names = spread_names(&engine, 4);
    for name in &names {
        engine.create_account_blocking(account(name, AccountFlags::empty())).unwrap();
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut made = Vec::new();
    for n in 0..40 {
        let request = create(&format!("t{n:02}"), &names[n % 4], &names[(n + 1) % 4], 1);
        let result = runtime.block_on(engine.create_transfers_as(vec![request], false, Some(origin(&format!("r{n}")))));
        assert!(result[0].as_ref().unwrap().created);
        made.push(format!("t{n:02}"));
    }
    // Without an origin: not in the trail.
    engine.create_transfers_blocking(vec![create("plain", &names[0], &names[1], 1)], false);
    assert!(!engine.audit_caught_up(), "nothing is stored yet");
    let (backlog, feed) = engine.take_audit_feed().unwrap();
    assert!(engine.take_audit_feed().is_none(), "one consumer");
    let mut batches = backlog;
    while let Ok(batch) = feed.recv_timeout(std::time::Duration::from_millis(200)) {
        batches.push(batch);
    }
    assert_eq!(ids(&batches), made);
    let event = batches.iter().flat_map(|b| &b.events).find(|e| e.transfer.id.as_str() == "t07").unwrap();
    assert_eq!((&*event.origin.key_id, &*event.origin.request_id), ("k1", "r7"));
    // Not stored: the log is long past the checkpoint size, yet no
    // checkpoint may cover these batches.
    assert_eq!(engine.stats().checkpoints.load(std::sync::atomic::Ordering::Relaxed), 0);
    engine.shutdown();

    // Restart: the replay makes the same batches again.
    let engine = Engine::open(config()).unwrap();
    let (again, _feed) = engine.take_audit_feed().unwrap();
    assert_eq!(ids(&again), made);
    let keyed = |b: &[AuditBatch]| b.iter().map(|b| (b.executor, b.sequence)).collect::<Vec<_>>();
    let mut first = keyed(&batches);
    first.sort();
    let mut second = keyed(&again);
    second.sort();
    assert_eq!(first, second, "the same batches, by (executor, sequence)");
    // Stored now: checkpoints may go ahead, and do at shutdown.
    for batch in &again {
        engine.audit_stored(batch.executor, batch.sequence);
    }
    assert!(engine.audit_caught_up());
    engine.shutdown();
    assert!(engine.stats().checkpoints.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let engine = Engine::open(config()).unwrap();
    let (after, _feed) = engine.take_audit_feed().unwrap();
    assert!(after.is_empty(), "a checkpoint covers the stored batches: nothing is made again");
    engine.shutdown();
}

/// Under steady load the audit consumer is always a little behind; a
/// checkpoint taken at a quiet moment waits for it and is then written, so
/// checkpoints keep coming (a checkpoint that had to find the consumer fully
/// caught up would never come).
#[test]
fn checkpoints_keep_coming_under_load_while_the_audit_consumer_lags() {
    use peakstack_engine::Origin;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig {
        shards: 8,
        checkpoint_every_log_bytes: 64 * 1024,
        ..EngineConfig::new(dir.path(), 1)
    })
    .unwrap();
    let names: Vec<String> = (0..8).map(|n| format!("acct-{n}")).collect();
    for name in &names {
        engine.create_account_blocking(account(name, AccountFlags::empty())).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The consumer: stores what arrived, 50 ms late.
    let (backlog, feed) = engine.take_audit_feed().unwrap();
    assert!(backlog.is_empty());
    let consumer = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let mut last = None;
                while let Ok(batch) = feed.try_recv() {
                    last = Some((batch.executor, batch.sequence));
                }
                if let Some((executor, sequence)) = last {
                    engine.audit_stored(executor, sequence);
                }
            }
        })
    };
    let origin = Origin { key_id: Arc::from("k"), request_id: Arc::from("load"), idempotency: None };
    // Here checkpoints wait for the consumer's 50 ms rounds, not for log
    // bytes: how many are due depends on time, so the load runs for two
    // seconds at least (in a release build 1 MiB of log takes under one).
    let (taken, logged) = load_until_logged(&engine, &names, 4, Some(origin), 1 << 20, Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    consumer.join().unwrap();
    assert!(taken >= 4, "{taken} checkpoints in two seconds or more under load ({logged} bytes of log)");
    engine.shutdown();
}

/// `clients` threads move money among `names` in calls of 32 transfers
/// (on behalf of `origin`, if given) until the engine has logged `bytes`
/// and `min_duration` has passed (or a minute); returns the checkpoints written by then and the
/// bytes logged.
fn load_until_logged(
    engine: &Engine,
    names: &[String],
    clients: usize,
    origin: Option<peakstack_engine::Origin>,
    bytes: u64,
    min_duration: Duration,
) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (engine, names, stop, origin) = (engine.clone(), names.to_vec(), stop.clone(), origin.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    let batch = (0..32)
                        .map(|i| {
                            n += 1;
                            let debit = &names[(n as usize + i) % names.len()];
                            let credit = &names[(n as usize + i + 1) % names.len()];
                            create(&format!("c{client}-{n}"), debit, credit, 1)
                        })
                        .collect();
                    for result in runtime.block_on(engine.create_transfers_as(batch, false, origin.clone())) {
                        result.unwrap();
                    }
                }
            })
        })
        .collect();
    let stats = engine.stats();
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    while (stats.log_bytes.load(Relaxed) < bytes || started.elapsed() < min_duration)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let taken = stats.checkpoints.load(Relaxed);
    let logged = stats.log_bytes.load(Relaxed);
    stop.store(true, Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    (taken, logged)
}

/// A small batch is made durable by the apply thread itself when nothing is
/// queued for the log thread; a large one goes to the log thread. Callers of
/// both kinds at once must still find every acknowledged transfer after a
/// restart: the log only replays batches in sequence, so one written out of
/// order would cut the log there and lose what was acknowledged after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_large_batches_at_once_are_all_durable_after_a_restart() {
    const CALLERS: usize = 4;
    const CALLS: usize = 24;
    const SIZES: [usize; 6] = [1, 2, 63, 64, 65, 300];
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let config = || EngineConfig { shards: 8, clock: clock.clone(), ..EngineConfig::new(dir.path(), 1) };
    let engine = Engine::open(config()).unwrap();
    let sinks: Vec<String> = (0..8).map(|n| format!("sink-{n}")).collect();
    engine.create_account(account("bank", AccountFlags::empty())).await.unwrap();
    for sink in &sinks {
        engine.create_account(account(sink, AccountFlags::empty())).await.unwrap();
    }

    // Alone, one transfer at a time: nothing is ever queued, so the apply
    // thread writes each itself.
    for n in 0..5 {
        one(&engine, create(&format!("alone-{n}"), "bank", &sinks[0], 1)).await.unwrap();
    }
    let stats = engine.stats();
    let inline = stats.inline_writes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(inline >= 5, "{inline} batches written by the apply thread");

    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let engine = engine.clone();
            let sinks = sinks.clone();
            std::thread::spawn(move || {
                let mut acknowledged = Vec::new();
                for call in 0..CALLS {
                    let size = SIZES[(caller + call) % SIZES.len()];
                    let batch: Vec<(String, usize)> =
                        (0..size).map(|i| (format!("t-{caller}-{call}-{i}"), i % sinks.len())).collect();
                    let requests = batch.iter().map(|(tid, sink)| create(tid, "bank", &sinks[*sink], 1)).collect();
                    let results = engine.create_transfers_blocking(requests, false);
                    assert_eq!(results.len(), batch.len());
                    for result in results {
                        assert!(result.unwrap().created);
                    }
                    acknowledged.extend(batch);
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged: Vec<(String, usize)> = Vec::new();
    for caller in callers {
        acknowledged.extend(caller.join().unwrap());
    }
    let stats = engine.stats();
    let inline = stats.inline_writes.load(std::sync::atomic::Ordering::Relaxed);
    let fsyncs = stats.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(fsyncs > inline, "the log thread wrote none of {fsyncs} groups");
    engine.shutdown();

    let engine = Engine::open(config()).unwrap();
    let mut per_sink = vec![0u64; sinks.len()];
    per_sink[0] = 5;
    for (tid, sink) in &acknowledged {
        let transfer = engine.transfer(&id(tid)).await.unwrap();
        assert!(transfer.is_some(), "acknowledged transfer {tid} is gone after the restart");
        per_sink[*sink] += 1;
    }
    for (sink, expected) in sinks.iter().zip(per_sink) {
        let account = engine.account(&id(sink)).await.unwrap().unwrap();
        assert_eq!(account.balances.credits_posted, u128::from(expected), "{sink}");
    }
    let bank = engine.account(&id("bank")).await.unwrap().unwrap();
    assert_eq!(bank.balances.debits_posted, acknowledged.len() as u128 + 5);
    engine.shutdown();
}
