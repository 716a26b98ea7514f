//! What a call with several transfers answers, item by item, must not
//! depend on how many executors the engine runs: duplicate ids in one call,
//! and atomic calls that fail.

use peakstack_domain::{AccountFlags, Amount, Currency, ErrorCode, Id, NewAccount, TransferRequest};
use peakstack_engine::{Engine, EngineConfig, TransferResult};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn create(tid: &str, debit: &str, credit: &str, amount: u64) -> TransferRequest {
    TransferRequest::Create {
        id: id(tid),
        debit_account_id: id(debit),
        credit_account_id: id(credit),
        amount: Amount::new(amount).unwrap(),
        currency: Currency::parse("USD").unwrap(),
        pending: false,
        timeout_ms: 0,
        details: None,
    }
}

/// Each result as a short word: `created`, `exists` or the error code.
fn summary(results: &[TransferResult]) -> Vec<&'static str> {
    results
        .iter()
        .map(|r| match r {
            Ok(outcome) if outcome.created => "created",
            Ok(_) => "exists",
            Err(code) => code.as_str(),
        })
        .collect()
}

/// A fresh engine with `executors` executors and accounts `bank`, `a`
/// (which may not go below zero) and `b`, where `a` has 100 from `bank`.
fn engine_with_accounts(dir: &std::path::Path, executors: u16) -> Engine {
    let engine = Engine::open(EngineConfig { shards: 8, ..EngineConfig::new(dir, executors) }).unwrap();
    for (name, flags) in [
        ("bank", AccountFlags::default()),
        ("a", AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS),
        ("b", AccountFlags::default()),
    ] {
        let new = NewAccount {
            id: id(name),
            currency: Currency::parse("USD").unwrap(),
            flags,
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        engine.create_account_blocking(new).unwrap();
    }
    let funded = engine.create_transfers_blocking(vec![create("fund", "bank", "a", 100)], false);
    assert_eq!(summary(&funded), ["created"]);
    engine
}

fn check_books(engine: &Engine) {
    let totals = engine.totals_blocking().unwrap();
    assert_eq!((totals.net, totals.txns_in_flight, totals.holds), (0, 0, 0));
}

#[test]
fn duplicate_ids_in_one_call_answer_the_same_with_any_executor_count() {
    for executors in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_accounts(dir.path(), executors);
        let call = |first: &str| {
            vec![
                create(first, "a", "b", 1),
                create("y", "b", "a", 1),
                create(first, "a", "b", 1),
                create(first, "a", "b", 2),
            ]
        };
        let answers = engine.create_transfers_blocking(call("x"), false);
        let dup = "duplicate_id_in_batch";
        assert_eq!(summary(&answers), ["created", "created", dup, dup], "{executors} executors");
        let answers = engine.create_transfers_blocking(call("z"), true);
        let linked = "linked_event_failed";
        assert_eq!(summary(&answers), [linked, linked, dup, dup], "{executors} executors");
        // The async call answers the same.
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let answers = runtime.block_on(engine.create_transfers(call("w"), false));
        assert_eq!(summary(&answers), ["created", "exists", dup, dup], "{executors} executors");
        let a = runtime.block_on(engine.account(&id("a"))).unwrap().unwrap();
        let posted = (a.balances.debits_posted, a.balances.credits_posted);
        assert_eq!(posted, (2, 101), "{executors} executors: a's (debits, credits) posted");
        check_books(&engine);
        engine.shutdown();
    }
}

#[test]
fn a_failed_atomic_call_answers_the_same_with_one_and_two_executors() {
    let mut seen = Vec::new();
    for executors in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_accounts(dir.path(), executors);
        let failing = vec![create("x1", "a", "b", 10), create("x2", "a", "b", 500), create("x3", "bank", "b", 1)];
        let beside_existing = vec![create("n1", "a", "b", 10), create("fund", "bank", "a", 100)];
        let answers = [
            summary(&engine.create_transfers_blocking(failing, true)),
            summary(&engine.create_transfers_blocking(beside_existing, true)),
        ];
        assert_eq!(answers[0], ["linked_event_failed", ErrorCode::ExceedsCredits.as_str(), "linked_event_failed"]);
        assert_eq!(answers[1], ["linked_event_failed", "exists"]);
        check_books(&engine);
        engine.shutdown();
        seen.push(answers);
    }
    assert_eq!(seen[0], seen[1]);
}
