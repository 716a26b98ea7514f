//! u128 balances: random runs of maximal transfers, locally and through
//! clearing accounts, in one step or as held and committed legs, against a
//! model; the running sums and the check that a broken double entry fires.

use proptest::prelude::*;

use crate::ledger::{clearing_account_id, LedgerSnapshot, Leg, Side, TxnView};
use crate::{
    Account, AccountFlags, Balances, Currency, ErrorCode, Id, Ledger, NewAccount, Transfer, TransferKind,
    TransferStatus, MAX_TRANSFER_AMOUNT,
};

const SHARDS: u32 = 3;
/// Client accounts: account `n` lives on shard `n % SHARDS`.
const ACCOUNTS: usize = 5;

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn client(n: usize) -> Id {
    id(&format!("acct-{n}"))
}

fn shard(n: usize) -> u32 {
    n as u32 % SHARDS
}

fn account(name: Id, system: bool, balances: Balances) -> Account {
    let new = NewAccount {
        id: name,
        currency: usd(),
        flags: AccountFlags::empty(),
        overdraft_limit: 0,
        metadata: None,
        owner: None,
    };
    let mut account = Account::open(new, 1);
    account.system = system;
    account.balances = balances;
    account
}

/// A ledger whose accounts start `head_room` maximal transfers short of
/// 2^128 on one side (client `n` on its debits for even `n`, credits for
/// odd; clearing accounts likewise), balanced by an offsetting account.
fn ledger_near_the_top(head_room: u128) -> Ledger {
    let start = u128::MAX - head_room * u128::from(MAX_TRANSFER_AMOUNT);
    let one_side = |debit: bool| {
        if debit {
            Balances { debits_posted: start, ..Balances::default() }
        } else {
            Balances { credits_posted: start, ..Balances::default() }
        }
    };
    let mut accounts = Vec::new();
    for n in 0..ACCOUNTS {
        accounts.push(account(client(n), false, one_side(n % 2 == 0)));
        accounts.push(account(id(&format!("offset-{n}")), false, one_side(n % 2 != 0)));
    }
    for s in 0..SHARDS {
        accounts.push(account(clearing_account_id(s, usd()), true, one_side(s % 2 == 0)));
        accounts.push(account(id(&format!("offset-c{s}")), false, one_side(s % 2 != 0)));
    }
    Ledger::from_snapshot(LedgerSnapshot { accounts, ..LedgerSnapshot::default() }).unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    /// A plain transfer applied in one step.
    Local { debit: usize, credit: usize, amount: u64 },
    /// The same as legs: both held, then both committed (or the held one
    /// released when the other is refused), as TCC does.
    Legs { debit: usize, credit: usize, amount: u64, pending: bool },
    /// The oldest pending transfer left, posted in part (or voided).
    Resolve { post_of_8: u64 },
}

fn an_amount() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(MAX_TRANSFER_AMOUNT), 1 => 1..=MAX_TRANSFER_AMOUNT]
}

fn an_op() -> impl Strategy<Value = Op> {
    let pair = (0..ACCOUNTS, 1..ACCOUNTS).prop_map(|(d, step)| (d, (d + step) % ACCOUNTS));
    prop_oneof![
        3 => (pair.clone(), an_amount()).prop_map(|((debit, credit), amount)| Op::Local { debit, credit, amount }),
        2 => (pair, an_amount(), any::<bool>())
            .prop_map(|((debit, credit), amount, pending)| Op::Legs { debit, credit, amount, pending }),
        1 => (0..=8u64).prop_map(|post_of_8| Op::Resolve { post_of_8 }),
    ]
}

fn record(tid: &str, debit: usize, credit: usize, amount: u64) -> Transfer {
    Transfer {
        id: id(tid),
        debit_account_id: client(debit),
        credit_account_id: client(credit),
        amount,
        currency: usd(),
        kind: TransferKind::Single,
        status: TransferStatus::Posted,
        posted_amount: None,
        timestamp_ms: 5,
        details: None,
    }
}

/// Whether `amount` more fits on `side` of account `of`: posted + pending +
/// amount within u128, what the ledger must allow and nothing more.
fn fits(ledger: &Ledger, of: &Id, side: Side, amount: u64) -> bool {
    let b = ledger.account(of).map(|a| a.balances).unwrap_or_default();
    let (posted, pending) = match side {
        Side::Debit => (b.debits_posted, b.debits_pending),
        Side::Credit => (b.credits_posted, b.credits_pending),
    };
    posted.checked_add(pending).and_then(|t| t.checked_add(u128::from(amount))).is_some()
}

/// The accounts a transfer from `debit` to `credit` books on, and the side.
fn touched(debit: usize, credit: usize) -> Vec<(Id, Side)> {
    let mut touched = vec![(client(debit), Side::Debit), (client(credit), Side::Credit)];
    if shard(debit) != shard(credit) {
        touched.push((clearing_account_id(shard(debit), usd()), Side::Credit));
        touched.push((clearing_account_id(shard(credit), usd()), Side::Debit));
    }
    touched
}

/// The exact sum of every account's credits minus debits, pending
/// included, as (negative, magnitude) of a 256-bit total.
fn books_balance(ledger: &Ledger) -> bool {
    let mut credits = (0u128, 0u128); // (high, low)
    let mut debits = (0u128, 0u128);
    let add = |sum: &mut (u128, u128), value: u128| {
        let (low, carry) = sum.1.overflowing_add(value);
        *sum = (sum.0 + u128::from(carry), low);
    };
    for a in ledger.accounts() {
        let b = &a.balances;
        add(&mut credits, b.credits_posted);
        add(&mut credits, b.credits_pending);
        add(&mut debits, b.debits_posted);
        add(&mut debits, b.debits_pending);
    }
    credits == debits
}

fn leg(tid: &str, side: Side, n: usize, other: usize, amount: u64, pending: bool) -> Leg {
    Leg {
        transfer_id: id(tid),
        side,
        account_id: client(n),
        currency: usd(),
        amount,
        via_clearing: shard(n) != shard(other),
        pending,
    }
}

/// Applies `op` as transfer number `n`; answers whether it was refused
/// with `overflow` (the only refusal these accounts can give).
fn apply(ledger: &mut Ledger, n: usize, op: &Op, pending: &mut Vec<(String, u64)>) -> Result<(), ErrorCode> {
    let tid = format!("t{n}");
    match *op {
        Op::Local { debit, credit, amount } => {
            ledger.transfer_local(&record(&tid, debit, credit, amount), shard(debit), shard(credit), 5).map(|_| ())
        }
        Op::Legs { debit, credit, amount, pending: is_pending } => {
            let owner = n as u64 + 1;
            let mut view = TxnView::default();
            let d = leg(&tid, Side::Debit, debit, credit, amount, is_pending);
            let c = leg(&tid, Side::Credit, credit, debit, amount, is_pending);
            ledger.hold(&d, shard(debit), owner, &mut view, 5)?;
            if let Err(e) = ledger.hold(&c, shard(credit), owner, &mut view, 5) {
                ledger.release_hold(&d.transfer_id, Side::Debit, owner);
                return Err(e);
            }
            ledger.commit_hold(&d.transfer_id, Side::Debit, owner).unwrap();
            ledger.commit_hold(&d.transfer_id, Side::Credit, owner).unwrap();
            if is_pending {
                pending.push((tid, amount));
            }
            Ok(())
        }
        Op::Resolve { post_of_8 } => {
            if !pending.is_empty() {
                let (tid, amount) = pending.remove(0);
                let post = (u128::from(amount) * u128::from(post_of_8) / 8) as u64;
                ledger.settle_pending(&id(&tid), Side::Debit, post).unwrap();
                ledger.settle_pending(&id(&tid), Side::Credit, post).unwrap();
            }
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Balances near 2^128 take every maximal transfer that fits and refuse
    /// with `overflow` exactly the ones that do not; the books balance, and
    /// the running sums agree, after every step.
    #[test]
    fn maximal_transfers_overflow_only_past_2_to_the_128(
        head_room in 0u128..6,
        ops in proptest::collection::vec(an_op(), 1..60),
    ) {
        let mut ledger = ledger_near_the_top(head_room);
        let mut pending = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            let expected_overflow = match *op {
                Op::Local { debit, credit, amount } | Op::Legs { debit, credit, amount, .. } => {
                    !touched(debit, credit).iter().all(|(of, side)| fits(&ledger, of, *side, amount))
                }
                Op::Resolve { .. } => false,
            };
            let before = ledger.snapshot().accounts;
            let result = apply(&mut ledger, n, op, &mut pending);
            if expected_overflow {
                prop_assert_eq!(result, Err(ErrorCode::Overflow), "op {} {:?}", n, op);
                prop_assert_eq!(ledger.snapshot().accounts, before, "a refused transfer changed nothing");
            } else {
                prop_assert_eq!(result, Ok(()), "op {} {:?}", n, op);
            }
            prop_assert!(books_balance(&ledger), "the books do not balance after op {}", n);
            prop_assert_eq!(ledger.check_balanced(), Ok(()));
            prop_assert_eq!(ledger.net_total(), 0);
        }
    }

    /// From zero, thousands of maximal transfers out of one shard (the
    /// clearing account takes them all) pass what u64 sums held.
    #[test]
    fn a_clearing_account_passes_u64(count in 2049u64..2200) {
        let mut ledger = Ledger::new();
        for n in 0..ACCOUNTS {
            let new = NewAccount {
                id: client(n),
                currency: usd(),
                flags: AccountFlags::empty(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            };
            ledger.create_account(new, 1).unwrap();
        }
        for n in 0..count {
            let t = record(&format!("big-{n}"), 0, 1, MAX_TRANSFER_AMOUNT);
            ledger.transfer_local(&t, shard(0), shard(1), 5).unwrap();
        }
        let clearing = ledger.account(&clearing_account_id(shard(0), usd())).unwrap().balances;
        let expected = u128::from(count) * u128::from(MAX_TRANSFER_AMOUNT);
        prop_assert!(expected > u128::from(u64::MAX));
        prop_assert_eq!(clearing.credits_posted, expected);
        prop_assert_eq!(ledger.account(&client(0)).unwrap().balances.balance().to_string(), format!("-{expected}"));
        // Another tenant's cross-shard transfer out of the same shard.
        ledger.transfer_local(&record("other", 3, 1, 1_000_000), shard(3), shard(1), 5).unwrap();
        prop_assert_eq!(ledger.check_balanced(), Ok(()));
    }
}

#[test]
fn a_one_sided_booking_breaks_the_check_and_the_assertion_fires() {
    let mut ledger = ledger_near_the_top(3);
    ledger.transfer_local(&record("fine", 0, 1, 7), shard(0), shard(1), 5).unwrap();
    assert_eq!(ledger.check_balanced(), Ok(()));
    ledger.assert_balanced();

    ledger.book_one_side_for_test(&client(2), Side::Credit, 7);
    let broken = ledger.check_balanced().expect_err("a one-sided booking does not balance");
    assert_eq!(broken.currency, usd());
    assert!(broken.to_string().contains("does not balance in USD"), "{broken}");
    let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ledger.assert_balanced()));
    let message = fired.expect_err("the assertion panics");
    let message = message.downcast_ref::<String>().expect("a formatted message");
    assert!(message.contains("broken invariant, double entry"), "{message}");

    // Put right by the mirror booking, it balances again.
    ledger.book_one_side_for_test(&client(3), Side::Debit, 7);
    assert_eq!(ledger.check_balanced(), Ok(()));
}

#[test]
fn a_snapshot_that_does_not_balance_or_passes_2_to_the_128_is_refused() {
    let unbalanced = vec![account(client(0), false, Balances { debits_posted: 5, ..Balances::default() })];
    let snapshot = |accounts| LedgerSnapshot { accounts, ..LedgerSnapshot::default() };
    assert!(Ledger::from_snapshot(snapshot(unbalanced)).is_err());
    let beyond = Balances { debits_posted: u128::MAX, debits_pending: 1, ..Balances::default() };
    let offset = Balances { credits_posted: u128::MAX, credits_pending: 0, ..Balances::default() };
    let accounts = vec![account(client(0), false, beyond), account(client(1), false, offset)];
    assert!(Ledger::from_snapshot(snapshot(accounts)).is_err());
}

#[test]
fn a_net_beyond_i128_is_exact() {
    let b = Balances { debits_posted: u128::MAX, credits_posted: 0, ..Balances::default() };
    assert_eq!(b.balance().to_string(), format!("-{}", u128::MAX));
    assert!(b.balance().is_negative());
    let zero = Balances::default().balance();
    assert_eq!((zero.to_string(), zero.is_negative()), ("0".to_owned(), false));
}
