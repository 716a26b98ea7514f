//! The ledger state one single writer owns: the accounts of its shards, the
//! holds placed on them, and the records of the transfers whose ids live on
//! its shards.
//!
//! Every change to money is split into legs so that it can run on the
//! executor that owns each account: a leg is first *held* (try), then
//! *committed* (confirm) or *released* (cancel). A transfer whose legs all
//! live on one executor does both steps in one batch; one whose legs live on
//! different executors runs them as a TCC transaction (see the engine). Every
//! leg is booked against the shard's clearing account when the other account
//! lives on another shard, so each shard balances on its own.
//!
//! This module does no I/O, reads no clock and never panics on input; it
//! asserts its own invariants.

use std::collections::{BTreeSet, VecDeque};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::balance_sums::{BalanceSums, Unbalanced};
use crate::chunked::ChunkedVec;
use crate::id_index::IdIndex;
use crate::record_table::{Keyed, RecordTable};
use crate::{
    Account, AccountChange, Balances, Currency, ErrorCode, Id, NewAccount, Transfer, TransferKind, TransferStatus,
};

/// Who placed a hold or a lock: the engine's transaction id. 0 = nobody (committed).
pub type Owner = u64;
pub const NO_OWNER: Owner = 0;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Side {
    Debit,
    Credit,
}

impl Side {
    /// The side a clearing account books a leg on: the mirror of the leg's.
    pub fn other(self) -> Side {
        match self {
            Side::Debit => Side::Credit,
            Side::Credit => Side::Debit,
        }
    }
}

/// One side of a money movement, on the executor that owns `account_id`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Leg {
    pub transfer_id: Id,
    pub side: Side,
    pub account_id: Id,
    pub currency: Currency,
    pub amount: u64,
    /// Book against this shard's clearing account (the other account lives on another shard).
    pub via_clearing: bool,
    /// The hold outlives the transaction: it is a pending transfer's hold.
    pub pending: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Hold {
    account: u32,
    clearing: Option<u32>,
    side: Side,
    amount: u64,
    /// Kept after commit: a pending transfer's hold.
    pending: bool,
    /// The transaction that placed it; NO_OWNER once committed.
    owner: Owner,
}

#[derive(Clone, Debug)]
struct Record {
    transfer: Transfer,
    /// Reserved by a transaction that has not committed yet (not visible).
    reserved_by: Owner,
    /// A transaction is resolving this pending transfer.
    locked_by: Owner,
}

impl Keyed for Record {
    fn key(&self) -> &Id {
        &self.transfer.id
    }
}

/// Whether account `index` of `accounts` is `id`'s (for [`IdIndex`]).
fn holds<'a>(accounts: &'a [Account], id: &'a Id) -> impl Fn(u32) -> bool + 'a {
    move |index| accounts[index as usize].id == *id
}

/// Outcome of reserving a transfer id on its home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    /// Same id, same fields: an idempotent retry. Carries the record.
    Exists(Transfer),
}

/// A movement booked on a client account when a hold commits or settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Booked {
    pub account_id: Id,
    pub balances: Balances,
    pub side: Side,
    /// The amount the hold had.
    pub held: u64,
    /// The amount posted now (0 when the hold stays pending, or is voided).
    pub posted: u64,
    /// The hold stays: a pending transfer was committed.
    pub still_pending: bool,
}

/// Outcome of [`Ledger::transfer_local`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    /// Applied; the two accounts' balances right after, and their slots.
    Created { debit: Balances, credit: Balances, debit_slot: AccountSlot, credit_slot: AccountSlot },
    /// Same id, same fields: an idempotent retry.
    Exists(Transfer),
}

/// Where an account sits in its ledger: valid for the ledger's life
/// (accounts are never removed), so a caller that already found an account
/// reaches it again without hashing its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountSlot(u32);

/// What resolving needs to know of a pending transfer, read on its home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingInfo {
    pub debit_account_id: Id,
    pub credit_account_id: Id,
    pub amount: u64,
    pub currency: Currency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveKind {
    Post(Option<u64>),
    Void,
    Expire,
}

/// Credits and debits a transaction has already held per account, so that a
/// later leg of the same atomic batch may spend them (sequential semantics).
#[derive(Default, Debug)]
pub struct TxnView {
    /// (account, credits, debits): u128, as a batch of 8190 maximal
    /// transfers into one account passes u64.
    moved: Vec<(u32, u128, u128)>,
}

impl TxnView {
    fn get(&self, account: u32) -> (u128, u128) {
        self.moved.iter().find(|m| m.0 == account).map(|m| (m.1, m.2)).unwrap_or((0, 0))
    }

    fn add(&mut self, account: u32, credits: u64, debits: u64) {
        let (credits, debits) = (u128::from(credits), u128::from(debits));
        match self.moved.iter_mut().find(|m| m.0 == account) {
            Some(m) => {
                m.1 = m.1.saturating_add(credits);
                m.2 = m.2.saturating_add(debits);
            }
            None => self.moved.push((account, credits, debits)),
        }
    }
}

/// The clearing account id of a shard for a currency: `_clearing.<shard>.<CUR>`.
pub fn clearing_account_id(shard: u32, currency: Currency) -> Id {
    Id::parse(&format!("_clearing.{shard}.{currency}")).expect("clearing ids are valid")
}

/// The pending-settlement account of a merchant on one shard, for one
/// currency: `_settle.<shard>.<CUR>.<merchant>`. A checkout's money goes to
/// the one on the shard of the buyer's paying account, so that paying and
/// refunding stay on that shard.
pub fn settle_account_id(shard: u32, currency: Currency, merchant_id: &Id) -> Option<Id> {
    Id::parse(&format!("_settle.{shard}.{currency}.{merchant_id}"))
}

/// A merchant's available account in one currency, where settlement
/// moves its captured money: `_merchant.<merchant>.<CUR>`. It names no
/// shard (it lives on the shard of its id's hash, as a client's would).
pub fn merchant_account_id(merchant_id: &Id, currency: Currency) -> Option<Id> {
    Id::parse(&format!("_merchant.{merchant_id}.{currency}"))
}

/// The platform's fee account in one currency: `_fees.<CUR>` (by hash).
pub fn fee_account_id(currency: Currency) -> Id {
    Id::parse(&format!("_fees.{currency}")).expect("fee account ids are valid")
}

/// Whether an id is one of the system accounts settlement credits
/// (merchant available and fee accounts): the only system accounts that
/// name no shard, opened where they live when first credited.
pub fn is_settlement_account(id: &str) -> bool {
    id.starts_with("_merchant.") || id.starts_with("_fees.")
}

/// The shard a system id names, if it names one: a clearing or a
/// settlement account (`_clearing.<shard>.<CUR>`, `_settle.<shard>.<CUR>.<merchant>`),
/// or a transfer the trade flows make for an object they assigned an id
/// to (`_pay.ord_12_345`, `_rfd_12_7`: the order's or refund's shard). Every other id routes by
/// the documented hash.
pub fn system_shard(id: &str) -> Option<u32> {
    // Hot path: nearly every id is a client's, which never starts with '_'.
    let rest = id.strip_prefix('_')?;
    if let Some(shard) = clearing_shard(id) {
        return Some(shard);
    }
    if let Some(rest) = rest.strip_prefix("settle.") {
        let (shard, rest) = rest.split_once('.')?;
        let (currency, merchant) = rest.split_once('.')?;
        Currency::parse(currency)?;
        if merchant.is_empty() {
            return None;
        }
        return shard.parse().ok();
    }
    match rest.split_once('.') {
        Some((_, assigned)) => crate::ids::assigned_shard(assigned),
        // `_rfd_12_3`: a refund's own transfer.
        None => crate::ids::assigned_shard(rest),
    }
}

/// Parses the shard out of a clearing account id.
pub fn clearing_shard(id: &str) -> Option<u32> {
    // Hot path: nearly every id is a client's, which never starts with '_'.
    if !id.starts_with('_') {
        return None;
    }
    let rest = id.strip_prefix("_clearing.")?;
    let (shard, currency) = rest.split_once('.')?;
    Currency::parse(currency)?;
    shard.parse().ok()
}

#[derive(Default)]
pub struct Ledger {
    accounts: Vec<Account>,
    by_id: IdIndex,
    ordered: BTreeSet<Id>,
    holds: HashMap<(Id, Side), Hold>,
    records: RecordTable<Record>,
    expiries: BTreeSet<(u64, Id)>,
    /// (shard, currency) -> clearing account index; hashed, it is looked up
    /// twice per cross-shard transfer.
    clearing: HashMap<(u32, [u8; 3]), u32>,
    /// Ids of records that became final, oldest first: the order in which
    /// the engine may evict them (an id may appear twice; eviction checks).
    final_order: VecDeque<Id>,
    /// Records a transaction has reserved or locked (counted, and checked
    /// against the records when an image is taken).
    claimed_records: usize,
    /// Committed pending transfers not yet posted, voided or expired: the
    /// `peakstack_ledger_pending_transfers` gauge. Counted where a record
    /// enters or leaves that state, so reading it is free.
    pending_transfers: usize,
    /// Every account's balances summed per currency, kept by every booking
    /// (see [`Ledger::check_balanced`]).
    sums: BalanceSums,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    // ---- accounts ----------------------------------------------------------

    /// Opens an account, or answers the existing one for an identical retry.
    /// Returns the account and whether it was created now.
    pub fn create_account(&mut self, new: NewAccount, now_ms: u64) -> Result<(&Account, bool), ErrorCode> {
        if new.validate().is_err() {
            return Err(ErrorCode::InvalidRequest);
        }
        if let Some(index) = self.account_index(&new.id) {
            let existing = &self.accounts[index as usize];
            if !existing.same_fields(&new) {
                return Err(ErrorCode::ExistsWithDifferentFields);
            }
            return Ok((existing, false));
        }
        let index = self.push_account(Account::open(new, now_ms));
        Ok((&self.accounts[index as usize], true))
    }

    /// Whether `amount` more could be debited to an account now (it exists,
    /// in this currency, movable, within its constraint): the check a
    /// movement would make, without making it.
    pub fn can_debit(&self, account_id: &Id, currency: Currency, amount: u64) -> Result<(), ErrorCode> {
        let account = self.account(account_id).ok_or(ErrorCode::AccountNotFound)?;
        if account.currency != currency {
            return Err(ErrorCode::CurrencyMismatch);
        }
        account.check_debit(amount, 0)
    }

    /// Opens a system account (a merchant's pending settlement) if it does
    /// not exist: no overdraft (its debits never pass its credits), owned
    /// by nobody. Returns whether it was opened now.
    pub fn open_system_account(&mut self, id: &Id, currency: Currency, now_ms: u64) -> bool {
        if self.account_index(id).is_some() {
            return false;
        }
        let flags = crate::AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS;
        let new = NewAccount { id: id.clone(), currency, flags, overdraft_limit: 0, metadata: None, owner: None };
        let mut account = Account::open(new, now_ms);
        account.system = true;
        self.push_account(account);
        true
    }

    /// Freezes, unfreezes or closes a client account. Returns the account
    /// and whether it changed now (false for a retry). The state lives in
    /// the account's flags, so checkpoints keep it.
    pub fn change_account(&mut self, id: &Id, change: AccountChange) -> Result<(&Account, bool), ErrorCode> {
        let index = self.account_index(id).ok_or(ErrorCode::AccountNotFound)?;
        let account = &mut self.accounts[index as usize];
        if account.system {
            // Clearing accounts carry every cross-shard leg: not a client's to stop.
            return Err(ErrorCode::AccountNotFound);
        }
        let changed = account.change_state(change)?;
        Ok((&self.accounts[index as usize], changed))
    }

    fn push_account(&mut self, account: Account) -> u32 {
        let index = u32::try_from(self.accounts.len()).expect("fewer than 2^32 accounts per executor");
        self.by_id.insert(&account.id, index, holds(&self.accounts, &account.id));
        self.ordered.insert(account.id.clone());
        self.accounts.push(account);
        index
    }

    pub fn account(&self, id: &Id) -> Option<&Account> {
        self.account_index(id).map(|i| &self.accounts[i as usize])
    }

    /// Where account `id` is in `accounts`.
    fn account_index(&self, id: &Id) -> Option<u32> {
        self.by_id.get(id, holds(&self.accounts, id))
    }

    /// Starts bringing in the index line where account `id` is looked up
    /// (see [`crate::cache`]). A batch asks for every id's index line, then
    /// for every account ([`Ledger::prefetch_account`]), then applies.
    pub fn prefetch_account_index(&self, id: &Id) {
        self.by_id.prefetch(id);
    }

    /// Looks `id` up and starts bringing its account into the cache.
    pub fn prefetch_account(&self, id: &Id) {
        // By the hash bits only (a wrong guess is a useless prefetch): a
        // full lookup would wait here for the account line it compares.
        if let Some(index) = self.by_id.guess(id) {
            // All of it: the checks read its currency, flags and limit, the
            // booking its balances and history head, wherever they lie.
            crate::cache::prefetch_all(&self.accounts[index as usize]);
        }
    }

    /// Starts bringing in the index line where record `id` is looked up.
    pub fn prefetch_record_index(&self, id: &Id) {
        self.records.prefetch(id);
    }

    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    /// Accounts in id order, strictly after `after`.
    pub fn accounts_after<'a>(&'a self, after: Option<&Id>, limit: usize) -> impl Iterator<Item = &'a Account> + 'a {
        let range = match after {
            Some(after) => self.ordered.range::<Id, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.ordered.range::<Id, _>(..),
        };
        range.take(limit).map(|id| &self.accounts[self.account_index(id).expect("ordered ids are indexed") as usize])
    }

    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    fn clearing_index(&self, shard: u32, currency: Currency) -> Option<u32> {
        self.clearing.get(&(shard, currency.as_bytes())).copied()
    }

    fn clearing_for(&mut self, shard: u32, currency: Currency, now_ms: u64) -> u32 {
        if let Some(&index) = self.clearing.get(&(shard, currency.as_bytes())) {
            return index;
        }
        let mut account = Account::open(
            NewAccount {
                id: clearing_account_id(shard, currency),
                currency,
                flags: Default::default(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            },
            now_ms,
        );
        account.system = true;
        let index = self.push_account(account);
        self.clearing.insert((shard, currency.as_bytes()), index);
        index
    }

    // ---- a whole transfer on one ledger --------------------------------------

    /// Applies a plain (not pending) transfer whose record and both accounts
    /// this ledger owns, in one step. It answers exactly what holding both
    /// legs and committing them would (same checks, same error precedence),
    /// without the intermediate state. `record.kind` must be `Single`.
    pub fn transfer_local(
        &mut self,
        record: &Transfer,
        debit_shard: u32,
        credit_shard: u32,
        now_ms: u64,
    ) -> Result<LocalOutcome, ErrorCode> {
        debug_assert_eq!(record.kind, TransferKind::Single);
        let mut error: Option<ErrorCode> = None;
        let mut note = |e: ErrorCode| error = Some(error.map_or(e, |prev| prev.first_of(e)));
        if let Some(existing) = self.records.get(&record.id) {
            if existing.reserved_by != NO_OWNER {
                note(ErrorCode::InFlight);
            } else if existing.transfer.same_request_as(record) {
                return Ok(LocalOutcome::Exists(existing.transfer.clone()));
            } else {
                note(ErrorCode::ExistsWithDifferentFields);
            }
        }
        let amount = record.amount;
        let via_clearing = debit_shard != credit_shard;
        let debit = self.account_index(&record.debit_account_id);
        let credit = self.account_index(&record.credit_account_id);
        // A clearing account that does not exist yet has zero balances and
        // no constraint: any amount passes its check. It is opened only when
        // the transfer is applied, so a refused transfer leaves nothing behind.
        let (debit_clearing, credit_clearing) = if via_clearing {
            (self.clearing_index(debit_shard, record.currency), self.clearing_index(credit_shard, record.currency))
        } else {
            (None, None)
        };
        match debit {
            None => note(ErrorCode::AccountNotFound),
            Some(d) => {
                let account = &self.accounts[d as usize];
                if account.currency != record.currency {
                    note(ErrorCode::CurrencyMismatch);
                } else if let Err(e) = account.check_debit(amount, 0).and_then(|()| match debit_clearing {
                    Some(c) => self.accounts[c as usize].check_credit(amount, 0),
                    None => Ok(()),
                }) {
                    note(e);
                }
            }
        }
        match credit {
            None => note(ErrorCode::AccountNotFound),
            Some(c) => {
                let account = &self.accounts[c as usize];
                if account.currency != record.currency {
                    note(ErrorCode::CurrencyMismatch);
                } else if let Err(e) = account.check_credit(amount, 0).and_then(|()| match credit_clearing {
                    Some(k) => self.accounts[k as usize].check_debit(amount, 0),
                    None => Ok(()),
                }) {
                    note(e);
                }
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let (debit, credit) = (debit.expect("checked"), credit.expect("checked"));
        self.book_posted(debit, Side::Debit, amount);
        self.book_posted(credit, Side::Credit, amount);
        if via_clearing {
            let dc = self.clearing_for(debit_shard, record.currency, now_ms);
            let cc = self.clearing_for(credit_shard, record.currency, now_ms);
            self.book_posted(dc, Side::Credit, amount);
            self.book_posted(cc, Side::Debit, amount);
        }
        self.records.insert(Record { transfer: record.clone(), reserved_by: NO_OWNER, locked_by: NO_OWNER });
        self.final_order.push_back(record.id.clone());
        Ok(LocalOutcome::Created {
            debit: self.accounts[debit as usize].balances,
            credit: self.accounts[credit as usize].balances,
            debit_slot: AccountSlot(debit),
            credit_slot: AccountSlot(credit),
        })
    }

    // ---- legs: hold, commit, release -------------------------------------

    /// Holds one leg (try). On error nothing changed.
    pub fn hold(
        &mut self,
        leg: &Leg,
        shard: u32,
        owner: Owner,
        view: &mut TxnView,
        now_ms: u64,
    ) -> Result<(), ErrorCode> {
        let key = (leg.transfer_id.clone(), leg.side);
        if self.holds.contains_key(&key) {
            // Another transaction with the same transfer id is in flight (or
            // this id was used before); the home shard's record decides.
            return Err(ErrorCode::InFlight);
        }
        let account = self.account_index(&leg.account_id).ok_or(ErrorCode::AccountNotFound)?;
        if self.accounts[account as usize].currency != leg.currency {
            return Err(ErrorCode::CurrencyMismatch);
        }
        let (credits_seen, debits_seen) = view.get(account);
        // Check both sides first (a clearing account not opened yet passes),
        // so that a refused leg changes nothing, not even by opening one.
        let existing_clearing = if leg.via_clearing { self.clearing_index(shard, leg.currency) } else { None };
        match leg.side {
            Side::Debit => {
                self.accounts[account as usize].check_debit(leg.amount, credits_seen)?;
                if let Some(c) = existing_clearing {
                    self.accounts[c as usize].check_credit(leg.amount, 0)?;
                }
            }
            Side::Credit => {
                self.accounts[account as usize].check_credit(leg.amount, debits_seen)?;
                if let Some(c) = existing_clearing {
                    self.accounts[c as usize].check_debit(leg.amount, 0)?;
                }
            }
        }
        let clearing = leg.via_clearing.then(|| self.clearing_for(shard, leg.currency, now_ms));
        self.book_held(account, leg.side, leg.amount);
        if let Some(c) = clearing {
            self.book_held(c, leg.side.other(), leg.amount);
        }
        if !leg.pending {
            match leg.side {
                Side::Debit => view.add(account, 0, leg.amount),
                Side::Credit => view.add(account, leg.amount, 0),
            }
        }
        self.holds
            .insert(key, Hold { account, clearing, side: leg.side, amount: leg.amount, pending: leg.pending, owner });
        Ok(())
    }

    /// Commits a held leg: a plain transfer's hold is posted; a pending
    /// transfer's hold stays, now owned by nobody.
    pub fn commit_hold(&mut self, transfer_id: &Id, side: Side, owner: Owner) -> Option<Booked> {
        let key = (transfer_id.clone(), side);
        let hold = self.holds.get_mut(&key)?;
        if hold.owner != owner {
            return None;
        }
        if hold.pending {
            hold.owner = NO_OWNER;
            let (account, held) = (hold.account, hold.amount);
            return Some(self.booked(account, side, held, 0, true));
        }
        let hold = self.holds.remove(&key).expect("present");
        self.settle(&hold, hold.amount);
        Some(self.booked(hold.account, side, hold.amount, hold.amount, false))
    }

    fn booked(&self, index: u32, side: Side, held: u64, posted: u64, still_pending: bool) -> Booked {
        let account = &self.accounts[index as usize];
        Booked { account_id: account.id.clone(), balances: account.balances, side, held, posted, still_pending }
    }

    /// Sets an account's history head (see [`Account::history_head`]) and
    /// answers the previous one; `None` for an unknown account.
    pub fn swap_history_head(&mut self, id: &Id, head: u64) -> Option<u64> {
        let index = self.account_index(id)?;
        Some(self.swap_history_head_at(AccountSlot(index), head))
    }

    /// [`Ledger::swap_history_head`] for an account already found.
    pub fn swap_history_head_at(&mut self, slot: AccountSlot, head: u64) -> u64 {
        std::mem::replace(&mut self.accounts[slot.0 as usize].history_head, head)
    }

    /// Releases a held leg placed by `owner` (cancel). A hold of another owner is left alone.
    pub fn release_hold(&mut self, transfer_id: &Id, side: Side, owner: Owner) {
        let key = (transfer_id.clone(), side);
        if self.holds.get(&key).is_some_and(|h| h.owner == owner) {
            let hold = self.holds.remove(&key).expect("present");
            self.settle(&hold, 0);
        }
    }

    /// Removes `hold.amount` from pending and posts `post_amount` of it.
    fn settle(&mut self, hold: &Hold, post_amount: u64) {
        assert!(post_amount <= hold.amount, "posting more than held");
        self.book_settled(hold.account, hold.side, hold.amount, post_amount);
        if let Some(c) = hold.clearing {
            self.book_settled(c, hold.side.other(), hold.amount, post_amount);
        }
    }

    // ---- bookings: every change to a balance, with the sums --------------

    /// Posts `amount` on `side` of account `index`; the caller checked that
    /// it fits (`Account::check_debit` / `check_credit`).
    fn book_posted(&mut self, index: u32, side: Side, amount: u64) {
        let account = &mut self.accounts[index as usize];
        let b = &mut account.balances;
        let posted = match side {
            Side::Debit => &mut b.debits_posted,
            Side::Credit => &mut b.credits_posted,
        };
        *posted = posted.checked_add(u128::from(amount)).expect("checked before booking");
        self.sums.post(account.currency, side, amount);
    }

    /// Holds `amount` on `side` of account `index`; the caller checked it.
    fn book_held(&mut self, index: u32, side: Side, amount: u64) {
        let account = &mut self.accounts[index as usize];
        let b = &mut account.balances;
        let pending = match side {
            Side::Debit => &mut b.debits_pending,
            Side::Credit => &mut b.credits_pending,
        };
        *pending = pending.checked_add(u128::from(amount)).expect("checked before booking");
        self.sums.hold(account.currency, side, amount);
    }

    /// Resolves a hold of `held` on `side` of account `index`, posting
    /// `posted` of it. Cannot overflow: posted + pending was checked when held.
    fn book_settled(&mut self, index: u32, side: Side, held: u64, posted: u64) {
        let account = &mut self.accounts[index as usize];
        let b = &mut account.balances;
        let (pending, total) = match side {
            Side::Debit => (&mut b.debits_pending, &mut b.debits_posted),
            Side::Credit => (&mut b.credits_pending, &mut b.credits_posted),
        };
        *pending = pending.checked_sub(u128::from(held)).expect("hold is in pending");
        *total = total.checked_add(u128::from(posted)).expect("posted + pending fits");
        self.sums.settle(account.currency, side, held, posted);
    }

    /// Whether the ledger still balances: per currency, debits equal
    /// credits, pending and posted apart (from running sums: no scan).
    pub fn check_balanced(&self) -> Result<(), Unbalanced> {
        self.sums.check()
    }

    /// [`Ledger::check_balanced`], as the engine asserts it after every
    /// batch: a ledger that no longer balances must stop, loudly.
    pub fn assert_balanced(&self) {
        if let Err(broken) = self.check_balanced() {
            panic!("broken invariant, double entry: {broken}");
        }
    }

    /// Resolves a pending transfer's hold: posts `post_amount` of it (0 =
    /// void) and releases the rest. The home shard's lock on the pending
    /// transfer serializes resolves, so no try is needed here. Idempotent:
    /// a hold already settled is not found and nothing happens.
    ///
    /// The hold may still be owned by the transaction that created it: its
    /// commit can reach this executor after the resolve does (the home shard
    /// committed the pending transfer first, which means that transaction
    /// decided to commit). The hold is settled all the same, and that late
    /// commit then finds nothing to do.
    pub fn settle_pending(&mut self, pending_id: &Id, side: Side, post_amount: u64) -> Option<Booked> {
        let key = (pending_id.clone(), side);
        if !self.holds.get(&key).is_some_and(|h| h.pending) {
            return None;
        }
        let hold = self.holds.remove(&key).expect("present");
        let posted = post_amount.min(hold.amount);
        self.settle(&hold, posted);
        Some(self.booked(hold.account, side, hold.amount, posted, false))
    }

    pub fn hold_count(&self) -> usize {
        self.holds.len()
    }

    // ---- transfer records (on the shard of the transfer id) ----------------

    /// Reserves `request.id()` for a new transfer (try), or reports an
    /// identical existing one.
    pub fn reserve(&mut self, transfer: Transfer, owner: Owner) -> Result<Reservation, ErrorCode> {
        if let Some(record) = self.records.get(&transfer.id) {
            if record.reserved_by != NO_OWNER {
                return Err(ErrorCode::InFlight);
            }
            if record.transfer.same_request_as(&transfer) {
                return Ok(Reservation::Exists(record.transfer.clone()));
            }
            return Err(ErrorCode::ExistsWithDifferentFields);
        }
        if owner != NO_OWNER {
            self.claimed_records += 1;
        }
        self.records.insert(Record { transfer, reserved_by: owner, locked_by: NO_OWNER });
        Ok(Reservation::Reserved)
    }

    /// Makes a reserved record visible; a pending one starts its timeout.
    /// `filled` replaces the reserved record when the transaction learnt its
    /// final fields only during its try (a post learns its accounts then).
    pub fn commit_reservation(&mut self, id: &Id, owner: Owner, filled: Option<Transfer>) -> Option<&Transfer> {
        let record = self.records.get_mut(id)?;
        if record.reserved_by != owner || owner == NO_OWNER {
            return None;
        }
        record.reserved_by = NO_OWNER;
        self.claimed_records -= 1;
        if let Some(transfer) = filled {
            debug_assert_eq!(transfer.id, *id);
            record.transfer = transfer;
        }
        if record.transfer.status == TransferStatus::Pending {
            self.pending_transfers += 1;
        } else {
            self.final_order.push_back(id.clone());
        }
        if let TransferKind::Pending { expires_at_ms, .. } = record.transfer.kind {
            if expires_at_ms > 0 {
                self.expiries.insert((expires_at_ms, id.clone()));
            }
        }
        Some(&record.transfer)
    }

    pub fn cancel_reservation(&mut self, id: &Id, owner: Owner) {
        if owner != NO_OWNER && self.records.get(id).is_some_and(|r| r.reserved_by == owner) {
            self.records.remove(id);
            self.claimed_records -= 1;
        }
    }

    /// A committed transfer record.
    pub fn transfer(&self, id: &Id) -> Option<&Transfer> {
        self.records.get(id).filter(|r| r.reserved_by == NO_OWNER).map(|r| &r.transfer)
    }

    /// Whether a transaction not decided yet holds `id`'s record reserved.
    pub fn is_undecided(&self, id: &Id) -> bool {
        self.records.get(id).is_some_and(|r| r.reserved_by != NO_OWNER)
    }

    pub fn transfer_count(&self) -> usize {
        self.records.len()
    }

    /// Committed pending transfers not yet posted, voided or expired (a
    /// pending transfer whose transaction is still deciding is not one yet).
    pub fn pending_transfer_count(&self) -> usize {
        self.pending_transfers
    }

    /// Locks a pending transfer for posting, voiding or expiring it.
    pub fn lock_pending(
        &mut self,
        pending_id: &Id,
        kind: ResolveKind,
        owner: Owner,
        now_ms: u64,
    ) -> Result<PendingInfo, ErrorCode> {
        let record = self.records.get_mut(pending_id).ok_or(ErrorCode::PendingTransferNotFound)?;
        if record.reserved_by != NO_OWNER {
            return Err(ErrorCode::PendingTransferNotFound);
        }
        let TransferKind::Pending { expires_at_ms, .. } = record.transfer.kind else {
            return Err(ErrorCode::PendingTransferNotPending);
        };
        match record.transfer.status {
            TransferStatus::Posted => return Err(ErrorCode::PendingTransferAlreadyPosted),
            TransferStatus::Voided => return Err(ErrorCode::PendingTransferAlreadyVoided),
            TransferStatus::Expired => return Err(ErrorCode::PendingTransferExpired),
            TransferStatus::Pending => {}
        }
        if record.locked_by != NO_OWNER {
            return Err(ErrorCode::InFlight);
        }
        let expired = expires_at_ms > 0 && now_ms >= expires_at_ms;
        if expired && kind != ResolveKind::Expire {
            return Err(ErrorCode::PendingTransferExpired);
        }
        if let ResolveKind::Post(Some(amount)) = kind {
            if amount > record.transfer.amount {
                return Err(ErrorCode::AmountExceedsPending);
            }
        }
        if owner != NO_OWNER {
            record.locked_by = owner;
            self.claimed_records += 1;
        }
        let t = &record.transfer;
        Ok(PendingInfo {
            debit_account_id: t.debit_account_id.clone(),
            credit_account_id: t.credit_account_id.clone(),
            amount: t.amount,
            currency: t.currency,
        })
    }

    /// Records the outcome of a resolve on the pending transfer and answers
    /// the updated record.
    pub fn finish_pending(&mut self, pending_id: &Id, owner: Owner, kind: ResolveKind) -> Option<&Transfer> {
        let record = self.records.get_mut(pending_id)?;
        if record.locked_by != owner || owner == NO_OWNER {
            return None;
        }
        record.locked_by = NO_OWNER;
        self.claimed_records -= 1;
        let t = &mut record.transfer;
        // Only a pending record is locked (`lock_pending`), so this is one.
        debug_assert_eq!(t.status, TransferStatus::Pending, "only a pending transfer is finished");
        if t.status == TransferStatus::Pending {
            self.pending_transfers -= 1;
        }
        match kind {
            ResolveKind::Post(amount) => {
                t.status = TransferStatus::Posted;
                t.posted_amount = Some(amount.unwrap_or(t.amount));
            }
            ResolveKind::Void => t.status = TransferStatus::Voided,
            ResolveKind::Expire => t.status = TransferStatus::Expired,
        }
        if let TransferKind::Pending { expires_at_ms, .. } = t.kind {
            self.expiries.remove(&(expires_at_ms, pending_id.clone()));
        }
        self.final_order.push_back(pending_id.clone());
        Some(&record.transfer)
    }

    pub fn unlock_pending(&mut self, pending_id: &Id, owner: Owner) {
        if let Some(record) = self.records.get_mut(pending_id) {
            if record.locked_by == owner && owner != NO_OWNER {
                record.locked_by = NO_OWNER;
                self.claimed_records -= 1;
            }
        }
    }

    /// Pending transfers whose timeout has passed and that nobody is resolving.
    pub fn due_expiries(&self, now_ms: u64, limit: usize) -> Vec<Id> {
        self.expiries
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .filter(|(_, id)| self.records.get(id).is_some_and(|r| r.locked_by == NO_OWNER))
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Removes up to `max` of the oldest final records from memory and
    /// appends them to `out`: the archive's staging run, so each record
    /// moves once. The engine looks them up there again, through
    /// [`Ledger::restore_record`], before any input that names their ids.
    /// Pending, reserved and locked records stay.
    pub fn evict_oldest_into(&mut self, max: usize, out: &mut Vec<Transfer>) {
        // The oldest records are long out of the cache. A software pipeline
        // asks for the index line of the id `2 * EVICT_LOOKAHEAD` places ahead and
        // for the record `EVICT_LOOKAHEAD` ahead (found through its index line,
        // in by then) before taking the next one; asking for all of them
        // first overflowed the cache before the first was taken.
        const EVICT_LOOKAHEAD: usize = 8;
        let (order, records) = (&self.final_order, &self.records);
        order.iter().take(2 * EVICT_LOOKAHEAD).for_each(|id| records.prefetch(id));
        order.iter().take(EVICT_LOOKAHEAD).for_each(|id| records.prefetch_record(id));
        out.reserve(max.min(self.final_order.len()));
        let mut taken = 0;
        while taken < max {
            if let Some(id) = self.final_order.get(2 * EVICT_LOOKAHEAD) {
                self.records.prefetch(id);
            }
            if let Some(id) = self.final_order.get(EVICT_LOOKAHEAD) {
                self.records.prefetch_record(id);
            }
            let Some(id) = self.final_order.pop_front() else { break };
            let record = self.records.remove_if(id, |r| {
                r.reserved_by == NO_OWNER && r.locked_by == NO_OWNER && r.transfer.status != TransferStatus::Pending
            });
            if let Some(record) = record {
                out.push(record.transfer);
                taken += 1;
            }
        }
    }

    /// Makes room for `records` transfer records in memory at once (the
    /// engine keeps at most about that many), so that the table does not
    /// grow, and stall the apply loop, while it fills up.
    pub fn reserve_records(&mut self, records: usize) {
        self.records.reserve(records);
    }

    /// Whether a record of this id is in memory (committed or reserved).
    pub fn has_record(&self, id: &Id) -> bool {
        self.records.contains_key(id)
    }

    /// Brings an archived (final) record back into memory.
    pub fn restore_record(&mut self, transfer: Transfer) {
        debug_assert!(transfer.status != TransferStatus::Pending, "pending records are never archived");
        let id = transfer.id.clone();
        if !self.records.contains_key(&id) {
            self.records.insert(Record { transfer, reserved_by: NO_OWNER, locked_by: NO_OWNER });
            self.final_order.push_back(id);
        }
    }

    /// Sum over all accounts of credits - debits, pending included. Zero when
    /// every in-flight movement is booked on both sides of this ledger.
    /// Modulo 2^128, as [`Balances::net_including_pending`].
    pub fn net_total(&self) -> i128 {
        self.accounts.iter().fold(0i128, |sum, a| sum.wrapping_add(a.balances.net_including_pending()))
    }
}

/// A pending transfer's hold, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldSnapshot {
    pub transfer_id: Id,
    pub side: Side,
    /// Index of the account in [`LedgerSnapshot::accounts`].
    pub account: u32,
    pub clearing: Option<u32>,
    pub amount: u64,
}

/// A hold a transaction in flight owns: a leg it tried, or the hold of a
/// pending transfer it is creating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedHold {
    pub hold: HoldSnapshot,
    /// It stays once committed: a pending transfer's hold.
    pub pending: bool,
    pub owner: Owner,
}

/// Everything a ledger holds. `holds` and `records` are what a ledger
/// between transactions has (pending transfers' holds, committed records);
/// the last three lists are what transactions in flight own (empty in a
/// checkpoint written before they could be in one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSnapshot {
    pub accounts: Vec<Account>,
    pub holds: Vec<HoldSnapshot>,
    /// Committed records in memory, oldest first when sorted
    /// ([`LedgerSnapshot::sort_records`]): the order in which a rebuilt
    /// ledger evicts them. [`Ledger::snapshot`] sorts them.
    pub records: Vec<Transfer>,
    /// Holds owned by transactions in flight, by transfer id and side.
    pub owned_holds: Vec<OwnedHold>,
    /// Records reserved by a transaction in flight (not visible yet): (owner, record), by id.
    pub reserved: Vec<(Owner, Transfer)>,
    /// Committed pending transfers a transaction in flight locked to resolve: (id, owner), by id.
    pub locked: Vec<(Id, Owner)>,
}

impl LedgerSnapshot {
    /// Puts the records oldest first by time, then by id.
    pub fn sort_records(&mut self) {
        self.records.sort_unstable_by(eviction_order);
    }
}

/// Oldest first by time, then by id: the order a rebuilt ledger evicts
/// its records in, and so the order a snapshot keeps them in.
fn eviction_order(a: &Transfer, b: &Transfer) -> std::cmp::Ordering {
    (a.timestamp_ms, &a.id).cmp(&(b.timestamp_ms, &b.id))
}

/// Records reserved by transactions in flight (owner, record), and pending
/// transfers they locked (id, owner), each by id.
pub type Claims<'a> = (Vec<(Owner, &'a Transfer)>, Vec<(&'a Id, Owner)>);

/// A ledger's state as [`Ledger::image`] takes it on the apply thread:
/// the accounts copied, the records shared (see [`ChunkedVec`]). Whoever
/// encodes it turns it into the same bytes as a [`LedgerSnapshot`] with its
/// records sorted; dropping it ends the sharing.
pub struct LedgerImage {
    pub accounts: Vec<Account>,
    pub holds: Vec<HoldSnapshot>,
    pub owned_holds: Vec<OwnedHold>,
    records: ChunkedVec<Option<Record>>,
    /// Whether any record is reserved or locked (else the scan for them is skipped).
    claimed: bool,
}

impl LedgerImage {
    /// The committed records, oldest first by time, then by id (the order
    /// of [`LedgerSnapshot::sort_records`]).
    pub fn sorted_records(&self) -> Vec<&Transfer> {
        let mut records: Vec<&Transfer> =
            self.records.iter().flatten().filter(|r| r.reserved_by == NO_OWNER).map(|r| &r.transfer).collect();
        records.sort_unstable_by(|a, b| eviction_order(a, b));
        records
    }

    /// The records reserved by transactions in flight, and the pending
    /// transfers they locked, by id (see [`LedgerSnapshot`]).
    pub fn claims(&self) -> Claims<'_> {
        if !self.claimed {
            return (Vec::new(), Vec::new());
        }
        let mut reserved: Vec<(Owner, &Transfer)> = Vec::new();
        let mut locked: Vec<(&Id, Owner)> = Vec::new();
        for record in self.records.iter().flatten() {
            if record.reserved_by != NO_OWNER {
                reserved.push((record.reserved_by, &record.transfer));
            }
            if record.locked_by != NO_OWNER {
                locked.push((&record.transfer.id, record.locked_by));
            }
        }
        reserved.sort_unstable_by(|a, b| a.1.id.cmp(&b.1.id));
        locked.sort_unstable();
        (reserved, locked)
    }

    /// The image as a snapshot (records copied, sorted).
    pub fn to_snapshot(&self) -> LedgerSnapshot {
        let (reserved, locked) = self.claims();
        LedgerSnapshot {
            accounts: self.accounts.clone(),
            holds: self.holds.clone(),
            records: self.sorted_records().into_iter().cloned().collect(),
            owned_holds: self.owned_holds.clone(),
            reserved: reserved.into_iter().map(|(owner, t)| (owner, t.clone())).collect(),
            locked: locked.into_iter().map(|(id, owner)| (id.clone(), owner)).collect(),
        }
    }
}

impl Ledger {
    /// The ledger's state, with what transactions in flight own.
    pub fn snapshot(&self) -> LedgerSnapshot {
        self.image(Vec::new()).to_snapshot()
    }

    /// The ledger's state for a checkpoint, transactions in flight
    /// included. Cheap enough for the apply thread: the accounts are copied
    /// into `accounts` (a buffer an earlier image left, so that its memory
    /// is already mapped), the records are shared.
    pub fn image(&self, mut accounts: Vec<Account>) -> LedgerImage {
        debug_assert_eq!(
            self.claimed_records,
            self.records.values().filter(|r| r.reserved_by != NO_OWNER || r.locked_by != NO_OWNER).count(),
            "claimed records are counted"
        );
        debug_assert_eq!(
            self.pending_transfers,
            self.records
                .values()
                .filter(|r| r.reserved_by == NO_OWNER && r.transfer.status == TransferStatus::Pending)
                .count(),
            "pending transfers are counted"
        );
        let mut holds: Vec<HoldSnapshot> = Vec::with_capacity(self.holds.len());
        let mut owned_holds: Vec<OwnedHold> = Vec::new();
        for ((transfer_id, side), h) in &self.holds {
            let hold = HoldSnapshot {
                transfer_id: transfer_id.clone(),
                side: *side,
                account: h.account,
                clearing: h.clearing,
                amount: h.amount,
            };
            match h.owner {
                NO_OWNER => {
                    debug_assert!(h.pending, "a hold nobody owns is a pending transfer's");
                    holds.push(hold);
                }
                owner => owned_holds.push(OwnedHold { hold, pending: h.pending, owner }),
            }
        }
        holds.sort_by(|a, b| (&a.transfer_id, a.side).cmp(&(&b.transfer_id, b.side)));
        owned_holds.sort_by(|a, b| (&a.hold.transfer_id, a.hold.side).cmp(&(&b.hold.transfer_id, b.hold.side)));
        accounts.clone_from(&self.accounts);
        LedgerImage { accounts, holds, owned_holds, records: self.records.share(), claimed: self.claimed_records > 0 }
    }

    /// Rebuilds a ledger from a snapshot, checking that it is consistent.
    pub fn from_snapshot(mut snapshot: LedgerSnapshot) -> Result<Ledger, &'static str> {
        snapshot.sort_records();
        let mut ledger = Ledger::new();
        for account in snapshot.accounts {
            if ledger.account_index(&account.id).is_some() {
                return Err("an account appears twice");
            }
            if !account.balances.in_range() {
                return Err("an account's posted and pending sums pass 2^128");
            }
            ledger.sums.add_account(account.currency, &account.balances);
            if account.system {
                let index = ledger.accounts.len() as u32;
                match clearing_shard(account.id.as_str()) {
                    Some(shard) => {
                        ledger.clearing.insert((shard, account.currency.as_bytes()), index);
                    }
                    None if system_shard(account.id.as_str()).is_some() => {}
                    None if is_settlement_account(account.id.as_str()) => {}
                    None => return Err("a system account that is no clearing, settlement, merchant or fee account"),
                }
            }
            ledger.push_account(account);
        }
        let count = ledger.accounts.len() as u32;
        let free = snapshot.holds.into_iter().map(|hold| OwnedHold { hold, pending: true, owner: NO_OWNER });
        let owned = snapshot.owned_holds.into_iter().map(|h| match h.owner {
            NO_OWNER => Err("a hold owned by nobody among the owned ones"),
            _ => Ok(h),
        });
        for owned in free.map(Ok).chain(owned) {
            let OwnedHold { hold: h, pending, owner } = owned?;
            if h.account >= count || h.clearing.is_some_and(|c| c >= count) {
                return Err("a hold names an account that does not exist");
            }
            let hold =
                Hold { account: h.account, clearing: h.clearing, side: h.side, amount: h.amount, pending, owner };
            if ledger.holds.insert((h.transfer_id, h.side), hold).is_some() {
                return Err("a hold appears twice");
            }
        }
        for transfer in snapshot.records {
            let id = transfer.id.clone();
            match transfer.kind {
                TransferKind::Pending { expires_at_ms, .. } if transfer.status == TransferStatus::Pending => {
                    ledger.pending_transfers += 1;
                    if expires_at_ms > 0 {
                        ledger.expiries.insert((expires_at_ms, id.clone()));
                    }
                }
                _ => ledger.final_order.push_back(id.clone()),
            }
            let record = Record { transfer, reserved_by: NO_OWNER, locked_by: NO_OWNER };
            if ledger.records.insert(record).is_some() {
                return Err("a record appears twice");
            }
        }
        for (owner, transfer) in snapshot.reserved {
            if owner == NO_OWNER {
                return Err("a reserved record owned by nobody");
            }
            if ledger.records.insert(Record { transfer, reserved_by: owner, locked_by: NO_OWNER }).is_some() {
                return Err("a record appears twice");
            }
            ledger.claimed_records += 1;
        }
        for (id, owner) in snapshot.locked {
            let record = ledger.records.get_mut(&id).ok_or("a lock on a record that does not exist")?;
            let lockable = record.reserved_by == NO_OWNER && record.transfer.status == TransferStatus::Pending;
            if !lockable || record.locked_by != NO_OWNER || owner == NO_OWNER {
                return Err("a lock on a record that is not a pending transfer free to lock");
            }
            record.locked_by = owner;
            ledger.claimed_records += 1;
        }
        // A snapshot balances (every hold is booked on both sides of this
        // ledger): one that does not is damaged, and replaying onto it
        // would stop at the first batch.
        ledger.check_balanced().map_err(|_| "the accounts' balances do not net to zero per currency")?;
        Ok(ledger)
    }
}

#[cfg(test)]
impl Ledger {
    /// Books `amount` on one side of one account only, as a bug would: the
    /// way for a test to break the double entry and see the check fire.
    pub(crate) fn book_one_side_for_test(&mut self, id: &Id, side: Side, amount: u64) {
        let index = self.account_index(id).expect("an account of this ledger");
        self.book_posted(index, side, amount);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::{AccountFlags, Amount};

    #[test]
    fn a_snapshot_rebuilds_the_same_ledger() {
        let usd = Currency::parse("USD").unwrap();
        let id = |s: &str| Id::parse(s).unwrap();
        let mut ledger = Ledger::new();
        for name in ["a", "b"] {
            let new = NewAccount {
                id: id(name),
                currency: usd,
                flags: AccountFlags::empty(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            };
            ledger.create_account(new, 1).unwrap();
        }
        let record = |tid: &str, pending: bool| Transfer {
            id: id(tid),
            debit_account_id: id("a"),
            credit_account_id: id("b"),
            amount: 5,
            currency: usd,
            kind: if pending {
                TransferKind::Pending { timeout_ms: 10, expires_at_ms: 20 }
            } else {
                TransferKind::Single
            },
            status: if pending { TransferStatus::Pending } else { TransferStatus::Posted },
            posted_amount: None,
            timestamp_ms: 10,
            details: None,
        };
        ledger.transfer_local(&record("t1", false), 0, 1, 10).unwrap();
        // A pending transfer: reserve, hold both legs via clearing, commit.
        let pending = record("p1", true);
        ledger.reserve(pending.clone(), 9).unwrap();
        let mut view = TxnView::default();
        for (side, account) in [(Side::Debit, "a"), (Side::Credit, "b")] {
            let leg = Leg {
                transfer_id: id("p1"),
                side,
                account_id: id(account),
                currency: usd,
                amount: 5,
                via_clearing: true,
                pending: true,
            };
            ledger.hold(&leg, 3, 9, &mut view, 10).unwrap();
        }
        // With the transaction in flight (its holds and reservation owned):
        // the snapshot keeps them, and rebuilds the same ledger.
        let in_flight = ledger.snapshot();
        assert_eq!((in_flight.owned_holds.len(), in_flight.reserved.len()), (2, 1));
        let rebuilt = Ledger::from_snapshot(in_flight.clone()).unwrap();
        assert_eq!(rebuilt.snapshot(), in_flight);
        assert!(rebuilt.is_undecided(&id("p1")));
        for side in [Side::Debit, Side::Credit] {
            ledger.commit_hold(&id("p1"), side, 9);
        }
        ledger.commit_reservation(&id("p1"), 9, None);
        let mut snapshot = ledger.snapshot();
        assert!(snapshot.owned_holds.is_empty() && snapshot.reserved.is_empty());
        snapshot.sort_records();
        let rebuilt = Ledger::from_snapshot(snapshot.clone()).unwrap();
        let mut again = rebuilt.snapshot();
        again.sort_records();
        assert_eq!(again, snapshot);
        assert_eq!(rebuilt.due_expiries(20, 10), vec![id("p1")]);
        assert_eq!(rebuilt.net_total(), 0);
        assert_eq!(ledger.pending_transfer_count(), 1);
        assert_eq!(rebuilt.pending_transfer_count(), 1, "the count is rebuilt from the records");
        // A lock on the pending transfer (a post in flight) is kept too.
        ledger.lock_pending(&id("p1"), ResolveKind::Void, 12, 11).unwrap();
        let locked = ledger.snapshot();
        assert_eq!(locked.locked, vec![(id("p1"), 12)]);
        let rebuilt = Ledger::from_snapshot(locked.clone()).unwrap();
        assert_eq!(rebuilt.snapshot(), locked);
        assert_eq!(rebuilt.due_expiries(20, 10), Vec::<Id>::new(), "a locked transfer is not due");
        let _ = Amount::new(1);
    }
}
