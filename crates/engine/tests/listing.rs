//! Listing transfers through the engine's interface: the whole ledger over
//! two executors and one account's history, newest first, filtered, paged
//! without duplicates or gaps, bounded per page, and the same after a
//! restart.

use std::collections::BTreeSet;
use std::sync::Arc;

use peakstack_domain::{AccountFlags, Amount, Currency, ErrorCode, Id, NewAccount, TransferRequest, TransferStatus};
use peakstack_engine::listing::MAX_SCAN_ENTRIES;
use peakstack_engine::{Engine, EngineConfig, ManualClock, TransferFilter, TransferSource};

const START_MS: u64 = 1_800_000_000_000;

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn open(dir: &std::path::Path, clock: Arc<ManualClock>) -> Engine {
    // Few records in memory: most records listed come from the archive.
    Engine::open(EngineConfig {
        shards: 8,
        clock,
        records_in_memory: 8,
        checkpoint_every_log_bytes: 4096,
        ..EngineConfig::new(dir, 2)
    })
    .unwrap()
}

fn create(tid: &str, debit: &str, credit: &str, pending: bool) -> TransferRequest {
    TransferRequest::Create {
        id: id(tid),
        debit_account_id: id(debit),
        credit_account_id: id(credit),
        amount: Amount::new(3).unwrap(),
        currency: Currency::parse("USD").unwrap(),
        pending,
        timeout_ms: if pending { 1_000 } else { 0 },
        details: None,
    }
}

async fn make(engine: &Engine, requests: Vec<TransferRequest>) {
    for result in engine.create_transfers(requests, false).await {
        assert!(result.is_ok_and(|o| o.created));
    }
}

/// Every page of a listing, followed to its end: the ids in order.
async fn all_pages(engine: &Engine, source: &TransferSource, filter: &TransferFilter, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let page = engine.list_transfers(source, filter, after.as_deref(), limit).await.unwrap();
        assert!(page.transfers.len() <= limit);
        ids.extend(page.transfers.iter().map(|t| t.id.to_string()));
        match page.next {
            Some(next) => after = Some(next),
            None => return ids,
        }
    }
    panic!("the listing never ended");
}

/// Accounts on both executors, transfers between them made a millisecond
/// apart: singles `s<n>`, holds `h<n>` that are posted (`h<n>-post`),
/// voided (`h<n>-void`), expire, or stay pending.
async fn ledger(engine: &Engine, clock: &ManualClock) -> Vec<String> {
    let layout = engine.layout();
    let names: Vec<String> = (0..4).map(|n| format!("acct-{n}")).collect();
    let executors: BTreeSet<_> = names.iter().map(|n| layout.executor_of_account(&id(n))).collect();
    assert_eq!(executors.len(), 2, "accounts on both executors");
    for name in &names {
        let new = NewAccount {
            id: id(name),
            currency: Currency::parse("USD").unwrap(),
            flags: AccountFlags::empty(),
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        engine.create_account(new).await.unwrap();
    }
    let mut made = Vec::new();
    for n in 0..40 {
        clock.advance(1);
        // A batch reads the clock when it starts: a request drained into a
        // batch begun before the advance would get the previous ms and tie
        // with the transfer before it. A read of every executor answered
        // after the advance puts the next request in a later batch.
        engine.totals().await.unwrap();
        let (debit, credit) = (&names[n % 4], &names[(n + 1 + n / 4) % 4]);
        let (debit, credit) = if debit == credit { (debit, &names[(n + 2) % 4]) } else { (debit, credit) };
        let tid = format!("s{n}");
        make(engine, vec![create(&tid, debit, credit, false)]).await;
        made.push(tid);
        if n % 4 == 0 {
            let hold = format!("h{n}");
            make(engine, vec![create(&hold, credit, debit, true)]).await;
            made.push(hold.clone());
            let settle = match n % 16 {
                0 => Some(TransferRequest::Post {
                    id: id(&format!("{hold}-post")),
                    pending_id: id(&hold),
                    amount: None,
                    details: None,
                }),
                4 => Some(TransferRequest::Void {
                    id: id(&format!("{hold}-void")),
                    pending_id: id(&hold),
                    details: None,
                }),
                _ => None,
            };
            if let Some(settle) = settle {
                clock.advance(1);
                made.push(settle.id().to_string());
                make(engine, vec![settle]).await;
            }
        }
    }
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_ledger_lists_each_transfer_once_newest_first_and_filters_combine() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), clock.clone());
    let made = ledger(&engine, &clock).await;
    // Holds not settled by now expire.
    clock.advance(5_000);
    make(&engine, vec![create("late", "acct-0", "acct-1", false)]).await;
    let mut expected = made.clone();
    expected.push("late".to_owned());
    for _ in 0..200 {
        if engine.transfer(&id("h8")).await.unwrap().unwrap().status == TransferStatus::Expired {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let everything = TransferFilter::default();
    for limit in [1, 3, 7, 100] {
        let listed = all_pages(&engine, &TransferSource::All, &everything, limit).await;
        let mut newest_first = expected.clone();
        newest_first.reverse();
        // Each exactly once; newest first by the time each was booked.
        assert_eq!(listed.iter().collect::<BTreeSet<_>>().len(), listed.len(), "no duplicates: {listed:?}");
        assert_eq!(listed.iter().collect::<BTreeSet<_>>(), expected.iter().collect::<BTreeSet<_>>(), "no gaps");
        assert_eq!(listed, newest_first, "limit {limit}");
    }

    let status = |status| TransferFilter { status: Some(status), ..Default::default() };
    let of = |filter: &TransferFilter| {
        let engine = engine.clone();
        let filter = filter.clone();
        async move { all_pages(&engine, &TransferSource::All, &filter, 5).await }
    };
    // A void and the hold it voided both show `voided`, as a GET of each does.
    let voided = ["h36-void", "h36", "h20-void", "h20", "h4-void", "h4"].map(String::from);
    assert_eq!(of(&status(TransferStatus::Voided)).await, voided);
    let expired = of(&status(TransferStatus::Expired)).await;
    assert_eq!(expired, ["h28", "h24", "h12", "h8"].map(String::from));
    for listed in &expired {
        assert_eq!(engine.transfer(&id(listed)).await.unwrap().unwrap().status, TransferStatus::Expired);
    }
    let posts_of_h16 = TransferFilter { pending_id: Some(id("h16")), ..Default::default() };
    assert_eq!(of(&posts_of_h16).await, ["h16-post"]);
    // A time window [since, until) on the record's timestamp, with another
    // filter: the posted transfers of s10..s12's millisecond range.
    let s10 = engine.transfer(&id("s10")).await.unwrap().unwrap().timestamp_ms;
    let s12 = engine.transfer(&id("s12")).await.unwrap().unwrap().timestamp_ms;
    let window = TransferFilter {
        status: Some(TransferStatus::Posted),
        since_ms: Some(s10),
        until_ms: Some(s12),
        ..Default::default()
    };
    assert_eq!(of(&window).await, ["s11", "s10"]);
    let nothing = TransferFilter {
        status: Some(TransferStatus::Pending),
        since_ms: Some(s10),
        until_ms: Some(s12),
        ..Default::default()
    };
    assert!(of(&nothing).await.is_empty());

    // One account: the transfers that touched it, the same filters.
    let account = TransferSource::Account(id("acct-0"));
    let history = all_pages(&engine, &account, &everything, 2).await;
    let touching: Vec<String> = {
        let mut ids = Vec::new();
        for listed in expected.iter().rev() {
            let t = engine.transfer(&id(listed)).await.unwrap().unwrap();
            if t.debit_account_id == id("acct-0") || t.credit_account_id == id("acct-0") {
                ids.push(listed.clone());
            }
        }
        ids
    };
    assert_eq!(history, touching);
    let pending_of_account = all_pages(&engine, &account, &status(TransferStatus::Pending), 2).await;
    for listed in &pending_of_account {
        assert!(touching.contains(listed));
        assert_eq!(engine.transfer(&id(listed)).await.unwrap().unwrap().status, TransferStatus::Pending);
    }

    // Cursors this walk did not hand out are refused.
    for bad in ["h1.2", "h99999999.0", "12", "x"] {
        let answer = engine.list_transfers(&TransferSource::All, &everything, Some(bad), 5).await;
        assert_eq!(answer.unwrap_err(), ErrorCode::InvalidRequest, "{bad}");
    }
    assert_eq!(
        engine.list_transfers(&TransferSource::Account(id("nobody")), &everything, None, 5).await.unwrap_err(),
        ErrorCode::AccountNotFound
    );

    // A restart rebuilds the history from the log: the same listing, and a
    // cursor handed out before it goes on as before.
    let first = engine.list_transfers(&TransferSource::All, &everything, None, 10).await.unwrap();
    let before: Vec<String> = all_pages(&engine, &TransferSource::All, &everything, 4).await;
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), clock.clone());
    assert_eq!(all_pages(&engine, &TransferSource::All, &everything, 4).await, before);
    let rest = engine.list_transfers(&TransferSource::All, &everything, first.next.as_deref(), 1000).await.unwrap();
    let mut resumed: Vec<String> = first.transfers.iter().map(|t| t.id.to_string()).collect();
    resumed.extend(rest.transfers.iter().map(|t| t.id.to_string()));
    assert_eq!(resumed, before);
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_reads_a_bounded_number_of_entries_and_says_where_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), clock.clone());
    for name in ["a", "b"] {
        let new = NewAccount {
            id: id(name),
            currency: Currency::parse("USD").unwrap(),
            flags: AccountFlags::empty(),
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        engine.create_account(new).await.unwrap();
    }
    // One hold, then more plain transfers than a page reads.
    make(&engine, vec![create("hold", "a", "b", true)]).await;
    let plain = MAX_SCAN_ENTRIES + 100;
    for chunk in (0..plain).collect::<Vec<_>>().chunks(1000) {
        make(&engine, chunk.iter().map(|n| create(&format!("t{n}"), "a", "b", false)).collect()).await;
    }
    let pending = TransferFilter { status: Some(TransferStatus::Pending), ..Default::default() };
    for source in [TransferSource::All, TransferSource::Account(id("a"))] {
        let first = engine.list_transfers(&source, &pending, None, 10).await.unwrap();
        assert!(first.transfers.is_empty(), "{source:?}: the hold lies past the first page's bound");
        assert!(first.next.is_some(), "{source:?}: a cursor to go on from");
        let rest = all_pages(&engine, &source, &pending, 10).await;
        assert_eq!(rest, ["hold"], "{source:?}");
    }
    // `since` stops the walk back at the window instead of at the bound.
    clock.advance(60_000);
    make(&engine, vec![create("recent", "a", "b", false)]).await;
    let recent = TransferFilter { since_ms: Some(START_MS + 60_000), ..Default::default() };
    let page = engine.list_transfers(&TransferSource::All, &recent, None, 10).await.unwrap();
    assert_eq!(page.transfers.iter().map(|t| t.id.to_string()).collect::<Vec<_>>(), ["recent"]);
    assert_eq!(page.next, None);
    engine.shutdown();
}
