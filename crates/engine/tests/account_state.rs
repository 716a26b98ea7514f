//! Freeze, unfreeze and close through the engine: the same answers with one
//! executor and with two (the accounts then live on different executors, so
//! transfers run the cross-executor protocol), and the state survives a
//! restart.

use std::sync::Arc;

use peakstack_domain::{
    AccountChange, AccountStatus, Amount, Currency, ErrorCode, Id, NewAccount, TransferRequest, TransferStatus,
};
use peakstack_engine::{Engine, EngineConfig, ManualClock};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn open(dir: &std::path::Path, executors: u16) -> Engine {
    Engine::open(EngineConfig {
        shards: 8,
        clock: Arc::new(ManualClock::new(1_000_000)),
        // Frequent checkpoints, so the restart reads the status from one.
        records_in_memory: 4,
        checkpoint_every_log_bytes: 512,
        ..EngineConfig::new(dir, executors)
    })
    .unwrap()
}

fn create(tid: &str, debit: &str, credit: &str, amount: u64, pending: bool) -> TransferRequest {
    TransferRequest::Create {
        id: id(tid),
        debit_account_id: id(debit),
        credit_account_id: id(credit),
        amount: Amount::new(amount).unwrap(),
        currency: usd(),
        pending,
        timeout_ms: 0,
        details: None,
    }
}

/// Two account names on different executors when there are two.
fn two_names(engine: &Engine) -> (String, String) {
    let layout = engine.layout();
    let first = "payer".to_string();
    let home = layout.executor_of_account(&id(&first));
    let executors = layout.executors();
    let second = (0..1000)
        .map(|n| format!("payee-{n}"))
        .find(|name| executors == 1 || layout.executor_of_account(&id(name)) != home)
        .expect("some name lands on the other executor");
    (first, second)
}

async fn transfer(engine: &Engine, request: TransferRequest) -> Result<TransferStatus, ErrorCode> {
    engine.create_transfers(vec![request], false).await.pop().unwrap().map(|o| o.transfer.status)
}

async fn change(engine: &Engine, name: &str, change: AccountChange) -> Result<(AccountStatus, bool), ErrorCode> {
    engine.change_account(id(name), change).await.map(|(account, changed)| (account.status(), changed))
}

/// Runs the whole life of an account and answers every step's result, so
/// that runs with different executor counts can be compared.
async fn lifecycle(engine: &Engine) -> Vec<String> {
    let (payer, payee) = two_names(engine);
    let mut seen = Vec::new();
    let mut note = |step: &str, result: String| seen.push(format!("{step}: {result}"));
    for name in [&payer, &payee] {
        let new = NewAccount {
            id: id(name),
            currency: usd(),
            flags: Default::default(),
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        engine.create_account(new).await.unwrap();
    }
    transfer(engine, create("t1", &payer, &payee, 10, false)).await.unwrap();
    transfer(engine, create("hold-void", &payer, &payee, 3, true)).await.unwrap();
    transfer(engine, create("hold-post", &payer, &payee, 4, true)).await.unwrap();

    note("freeze", format!("{:?}", change(engine, &payee, AccountChange::Freeze).await));
    note("freeze again", format!("{:?}", change(engine, &payee, AccountChange::Freeze).await));
    note("into frozen", format!("{:?}", transfer(engine, create("t2", &payer, &payee, 1, false)).await));
    note("out of frozen", format!("{:?}", transfer(engine, create("t3", &payee, &payer, 1, false)).await));
    note("hold into frozen", format!("{:?}", transfer(engine, create("t4", &payer, &payee, 1, true)).await));
    let void = TransferRequest::Void { id: id("void-1"), pending_id: id("hold-void"), details: None };
    note("void while frozen", format!("{:?}", transfer(engine, void).await));
    let post = TransferRequest::Post { id: id("post-1"), pending_id: id("hold-post"), amount: None, details: None };
    note("post while frozen", format!("{:?}", transfer(engine, post).await));
    note("close frozen, not zero", format!("{:?}", change(engine, &payee, AccountChange::Close).await));
    note("unfreeze", format!("{:?}", change(engine, &payee, AccountChange::Unfreeze).await));
    note("after unfreeze", format!("{:?}", transfer(engine, create("t5", &payee, &payer, 14, false)).await));
    note("close at zero", format!("{:?}", change(engine, &payee, AccountChange::Close).await));
    note("close again", format!("{:?}", change(engine, &payee, AccountChange::Close).await));
    note("into closed", format!("{:?}", transfer(engine, create("t6", &payer, &payee, 1, false)).await));
    note("out of closed", format!("{:?}", transfer(engine, create("t7", &payee, &payer, 1, false)).await));
    note("freeze closed", format!("{:?}", change(engine, &payee, AccountChange::Freeze).await));
    note("unfreeze closed", format!("{:?}", change(engine, &payee, AccountChange::Unfreeze).await));
    note("freeze payer", format!("{:?}", change(engine, &payer, AccountChange::Freeze).await));
    note("unknown", format!("{:?}", change(engine, "nobody", AccountChange::Freeze).await));
    seen
}

const EXPECTED: &[&str] = &[
    "freeze: Ok((Frozen, true))",
    "freeze again: Ok((Frozen, false))",
    "into frozen: Err(AccountFrozen)",
    "out of frozen: Err(AccountFrozen)",
    "hold into frozen: Err(AccountFrozen)",
    // Releasing a hold is always allowed.
    "void while frozen: Ok(Voided)",
    // FIXME: posting a hold made before the freeze is allowed too (the
    // post's accounts are known only after its pending is locked; refusing
    // it needs a second try round). Documented in the README.
    "post while frozen: Ok(Posted)",
    "close frozen, not zero: Err(AccountNotZero)",
    "unfreeze: Ok((Open, true))",
    "after unfreeze: Ok(Posted)",
    "close at zero: Ok((Closed, true))",
    "close again: Ok((Closed, false))",
    "into closed: Err(AccountClosed)",
    "out of closed: Err(AccountClosed)",
    "freeze closed: Err(AccountClosed)",
    "unfreeze closed: Err(AccountClosed)",
    "freeze payer: Ok((Frozen, true))",
    "unknown: Err(AccountNotFound)",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_close_answer_the_same_with_one_and_two_executors_and_survive_restart() {
    for executors in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path(), executors);
        let (payer, payee) = two_names(&engine);
        assert_eq!(lifecycle(&engine).await, EXPECTED, "with {executors} executor(s)");
        engine.shutdown();
        drop(engine);

        let engine = open(dir.path(), executors);
        let status = |name: &str| {
            let engine = &engine;
            let name = id(name);
            async move { engine.account(&name).await.unwrap().unwrap().status() }
        };
        assert_eq!(status(&payee).await, AccountStatus::Closed, "with {executors} executor(s)");
        assert_eq!(status(&payer).await, AccountStatus::Frozen, "with {executors} executor(s)");
        assert_eq!(
            transfer(&engine, create("t8", &payer, &payee, 1, false)).await,
            Err(ErrorCode::AccountClosed),
            "after restart with {executors} executor(s)"
        );
        engine.shutdown();
    }
}
