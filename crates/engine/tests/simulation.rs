//! A deterministic simulation of the pure [`ExecutorCore`] across several
//! executors: no threads, no disk, no clock.
//!
//! The [`Sim`] plays the runtime's part by hand. Each executor has a durable
//! log (the inputs that changed state and were made durable, with their batch
//! time) and a volatile part (inputs applied since its last simulated fsync,
//! with their effects held back). Messages between a pair of executors travel
//! in a queue, and only after the batch that produced them is durable; a
//! step may deliver a later message of a queue first (reordering) or hand
//! out again one already delivered (duplication), as a network or a stream
//! redelivering may. Proptest chooses the steps: client commands, message
//! deliveries, fsyncs, clock advances (some past transactions' deadlines),
//! expiries, ticks of the protocol (deadlines, resends, fence purges) and
//! crashes. After every step the invariants of
//! DESIGN.md are checked; at the end the system is driven to quiescence and
//! the books are rebuilt from the transfer records and compared, account by
//! account and hold by hold.
//!
//! A step checkpoints an executor, whatever is in flight, and restarts it
//! from the checkpoint alone (its state must be the same); a crash then
//! recovers from the last checkpoint plus the log after it.
//!
//! Two kinds of crash are simulated:
//! - One executor crashes (as a cell would in scale-out, where messages live
//!   in a replicated stream): its volatile inputs and held effects are lost,
//!   the queues stay, and the messages it had consumed in batches that never
//!   became durable are handed out again (a stream redelivers what was not
//!   acknowledged). It rebuilds by replaying its durable log with
//!   `client = None` and sends what `resend()` answers.
//! - The whole process crashes (kill -9 of the embedded runtime): every
//!   executor loses its volatile part and every in-memory queue is gone;
//!   each executor replays and resends.
//!
//! Resent messages leave in an order chosen by the step (the runtime sends
//! them in `HashMap` order, which is arbitrary).
//!
//! A Forget lost in a process crash would leave its participant's fence
//! behind for good; recovery delivers it again (`executor::lost_forgets`),
//! and the checks require every fence gone once quiet.
//!
//! Deterministic: a fixed seed and 256 cases of up to 200 steps unless
//! `PROPTEST_RNG_SEED` / `PROPTEST_CASES` say otherwise; for a long hunt, e.g.
//! `PROPTEST_CASES=20000 PROPTEST_RNG_SEED=7 cargo test -p peakstack-engine --test simulation`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use peakstack_domain::ledger::LedgerSnapshot;
use peakstack_domain::ledger::{clearing_account_id, Leg};
use peakstack_domain::{
    Account, AccountFlags, Amount, Balances, Currency, ErrorCode, Id, NewAccount, Owner, Side, Transfer, TransferKind,
    TransferRequest, TransferStatus, MAX_TRANSFER_AMOUNT,
};
use peakstack_engine::checkpoint::Checkpoint;
use peakstack_engine::executor::{lost_forgets, ClientTag, Effects, ExecutorCore};
use peakstack_engine::protocol::{
    AuditEvent, CommitOp, ExecutorId, Input, OpResult, Origin, PeerMsg, TransferOutcome, TransferResult, TryOp, TxnId,
};
use peakstack_engine::tcc::{TxnFilter, TxnView, FENCE_RETENTION_MS, TXN_DEADLINE_MS};
use peakstack_engine::Layout;
use proptest::collection::vec as vec_of;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;

const SHARDS: u32 = 8;
/// Accounts `acct0`..`acct9`; the first `SETUP_ACCOUNTS` are opened before the
/// first step, the others only by a step (until then: account_not_found).
const ACCOUNTS: usize = 10;
const SETUP_ACCOUNTS: usize = 9;
/// Accounts `acct0` and `acct1` have no constraint: they fund the others.
const BANKS: usize = 2;
const MAX_STEPS: usize = 200;
const CASES: u32 = 256;
/// A liveness bound: quiescence must come within this many deliver-all/fsync-all rounds.
const MAX_QUIESCE_ROUNDS: usize = 1_000;
/// Messages one delivery step hands to the receiver as one input at most.
const MAX_MESSAGES_PER_DELIVERY: usize = 8;
/// Delivered messages remembered per queue, for a step to hand out again.
const MAX_REMEMBERED_DELIVERIES: usize = 32;

fn id(text: &str) -> Id {
    Id::parse(text).expect("valid id")
}

fn usd() -> Currency {
    Currency::parse("USD").expect("valid currency")
}

fn eur() -> Currency {
    Currency::parse("EUR").expect("valid currency")
}

fn amount(minor_units: u64) -> Amount {
    Amount::new(minor_units).expect("valid amount")
}

fn account_id(index: usize) -> Id {
    id(&format!("acct{index}"))
}

fn create(tid: &Id, debit: &Id, credit: &Id, minor_units: u64, currency: Currency) -> TransferRequest {
    TransferRequest::Create {
        id: tid.clone(),
        debit_account_id: debit.clone(),
        credit_account_id: credit.clone(),
        amount: amount(minor_units),
        currency,
        pending: false,
        timeout_ms: 0,
        details: None,
    }
}

fn pending(tid: &Id, debit: &Id, credit: &Id, minor_units: u64, timeout_ms: u64) -> TransferRequest {
    TransferRequest::Create {
        id: tid.clone(),
        debit_account_id: debit.clone(),
        credit_account_id: credit.clone(),
        amount: amount(minor_units),
        currency: usd(),
        pending: true,
        timeout_ms,
        details: None,
    }
}

fn plain_account(account: &Id, flags: AccountFlags) -> NewAccount {
    NewAccount { id: account.clone(), currency: usd(), flags, overdraft_limit: 0, metadata: None, owner: None }
}

/// The `nth` id `prefix<n>` whose shard runs on `executor`.
fn name_on(layout: Layout, prefix: &str, executor: ExecutorId, nth: usize) -> Id {
    (0..10_000)
        .map(|n| id(&format!("{prefix}{n}")))
        .filter(|candidate| layout.executor_of_transfer(candidate) == executor)
        .nth(nth)
        .expect("some name lands on every executor")
}

// ---- the simulated runtime ---------------------------------------------------

/// In which order an executor's `resend()` messages leave after a crash.
#[derive(Clone, Copy, Debug)]
enum ResendOrder {
    /// Ascending transaction id per destination.
    TxnOrder,
    /// Descending transaction id per destination.
    Reversed,
    /// A permutation drawn from the seed (as `HashMap` iteration may give).
    Shuffled(u64),
}

fn arrange(mut messages: Vec<(ExecutorId, PeerMsg)>, order: ResendOrder) -> Vec<(ExecutorId, PeerMsg)> {
    messages.sort_by_key(|(dest, message)| (*dest, message.txn()));
    match order {
        ResendOrder::TxnOrder => {}
        ResendOrder::Reversed => messages.reverse(),
        ResendOrder::Shuffled(seed) => {
            let mut state = seed;
            for i in (1..messages.len()).rev() {
                let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
                messages.swap(i, j);
            }
        }
    }
    messages
}

/// An executor rebuilt from checkpoint bytes.
fn restore(e: ExecutorId, layout: Layout, bytes: &[u8]) -> ExecutorCore {
    let checkpoint = Checkpoint::decode(bytes).expect("a checkpoint reads back");
    ExecutorCore::from_checkpoint(e, layout, checkpoint).expect("a checkpoint restores")
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

type AccountAnswer = Result<(Account, bool), ErrorCode>;

struct Node {
    core: ExecutorCore,
    /// (batch time, input) of every input that changed state and is durable.
    durable: Vec<(u64, Input)>,
    /// Applied since the last fsync; lost in a crash.
    volatile: Vec<(u64, Input)>,
    /// Client groups whose input is in `volatile`.
    volatile_tags: Vec<ClientTag>,
    held_outbox: Vec<(ExecutorId, PeerMsg)>,
    held_finished: Vec<(ClientTag, usize, TransferResult)>,
    held_accounts: Vec<(NewAccount, AccountAnswer)>,
    /// Peer messages applied since the last fsync, with their sender.
    consumed: Vec<(ExecutorId, PeerMsg)>,
    /// Audit events of inputs in `volatile`, and of durable ones.
    held_audit: Vec<AuditEvent>,
    durable_audit: Vec<AuditEvent>,
    /// The last checkpoint (see [`Sim::checkpoint`]): recovery starts from it.
    checkpoint: Option<NodeCheckpoint>,
}

struct NodeCheckpoint {
    bytes: Vec<u8>,
    /// How many inputs of `durable`, and events of `durable_audit`, it covers.
    inputs: usize,
    audit_events: usize,
}

impl Node {
    fn new(e: ExecutorId, layout: Layout) -> Node {
        Node {
            core: ExecutorCore::new(e, layout),
            durable: Vec::new(),
            volatile: Vec::new(),
            volatile_tags: Vec::new(),
            held_outbox: Vec::new(),
            held_finished: Vec::new(),
            held_accounts: Vec::new(),
            consumed: Vec::new(),
            held_audit: Vec::new(),
            durable_audit: Vec::new(),
            checkpoint: None,
        }
    }

    fn idle(&self) -> bool {
        self.volatile.is_empty()
            && self.held_outbox.is_empty()
            && self.held_finished.is_empty()
            && self.held_accounts.is_empty()
            && self.core.txns_in_flight() == 0
    }
}

/// What a retried request must be answered.
#[derive(Clone, Debug)]
enum Expect {
    Anything,
    /// The id was acknowledged with this record and the retry asks the same.
    Exists(Transfer),
    ExistsWithDifferentFields,
}

/// One client call (as `Engine::create_transfers` receives it).
struct Call {
    requests: Vec<TransferRequest>,
    atomic: bool,
    expect: Vec<Expect>,
    results: Vec<Option<TransferResult>>,
}

/// The part of a call routed to one coordinator; its tag is its index + 1.
struct Group {
    call: usize,
    indices: Vec<usize>,
    coordinator: ExecutorId,
    /// Its coordinator crashed before answering everything: no more answers come.
    dead: bool,
    /// Its input was lost in a crash before it became durable.
    lost: bool,
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    /// Accounts, holds and records, with what transactions in flight own.
    ledger: LedgerSnapshot,
    transfers: Vec<Option<Transfer>>,
    pending_transfers: usize,
    fences: usize,
    txns: Vec<TxnView>,
    due: Vec<Id>,
}

struct Sim {
    layout: Layout,
    now_ms: u64,
    nodes: Vec<Node>,
    queues: BTreeMap<(ExecutorId, ExecutorId), VecDeque<PeerMsg>>,
    calls: Vec<Call>,
    groups: Vec<Group>,
    /// Transfers acknowledged to a client (created or existing), as answered.
    acked_transfers: BTreeMap<Id, Transfer>,
    /// Ids a client was told were created (must happen once per id).
    created_ids: BTreeSet<Id>,
    acked_accounts: BTreeMap<Id, Account>,
    /// How many requests named each transfer id.
    id_uses: BTreeMap<Id, usize>,
    /// Accounts on which an atomic call may hold a leg against a plain leg of
    /// the other side that the same call held earlier (`TxnView`): while it
    /// is in flight only their posted balances must obey the constraint.
    tainted: BTreeSet<Id>,
    /// Forget messages lost in a process crash: each may leave one fence behind.
    lost_forgets: usize,
    /// The last messages delivered on each queue, newest last.
    delivered: BTreeMap<(ExecutorId, ExecutorId), VecDeque<PeerMsg>>,
}

impl Sim {
    fn new(executors: u16) -> Sim {
        let layout = Layout::new(SHARDS, executors).expect("valid layout");
        Sim {
            layout,
            now_ms: 1_000_000,
            nodes: (0..layout.executors()).map(|e| Node::new(e, layout)).collect(),
            queues: BTreeMap::new(),
            calls: Vec::new(),
            groups: Vec::new(),
            acked_transfers: BTreeMap::new(),
            created_ids: BTreeSet::new(),
            acked_accounts: BTreeMap::new(),
            id_uses: BTreeMap::new(),
            tainted: BTreeSet::new(),
            lost_forgets: 0,
            delivered: BTreeMap::new(),
        }
    }

    fn executors(&self) -> ExecutorId {
        self.layout.executors()
    }

    fn ledger(&self, e: ExecutorId) -> &peakstack_domain::Ledger {
        self.nodes[usize::from(e)].core.ledger()
    }

    fn transfer(&self, tid: &Id) -> Option<&Transfer> {
        self.ledger(self.layout.executor_of_transfer(tid)).transfer(tid)
    }

    fn account(&self, account: &Id) -> Option<&Account> {
        self.ledger(self.layout.executor_of_account(account)).account(account)
    }

    fn balances(&self, account: &Id) -> Balances {
        self.account(account).expect("account exists").balances
    }

    fn apply(&mut self, e: ExecutorId, input: Input, client: Option<ClientTag>) -> Option<AccountAnswer> {
        let now_ms = self.now_ms;
        let node = &mut self.nodes[usize::from(e)];
        let mut fx = Effects::default();
        let (changed, answer) = node.core.apply(&input, now_ms, client, &mut fx);
        if changed {
            node.volatile.push((now_ms, input));
            node.volatile_tags.extend(client);
        } else {
            assert!(
                fx.outbox.is_empty() && fx.finished.is_empty() && fx.audit.is_empty(),
                "an input that changed nothing has effects"
            );
        }
        node.held_audit.append(&mut fx.audit);
        node.held_outbox.append(&mut fx.outbox);
        node.held_finished.extend(fx.drain_finished());
        answer
    }

    // ---- client commands ----------------------------------------------------

    fn create_account(&mut self, new: NewAccount) {
        let e = self.layout.executor_of_account(&new.id);
        let answer = self.apply(e, Input::CreateAccount(new.clone()), None).expect("an account creation answers");
        self.nodes[usize::from(e)].held_accounts.push((new, answer));
    }

    fn expectation(&self, request: &TransferRequest) -> Expect {
        match self.acked_transfers.get(request.id()) {
            None => Expect::Anything,
            Some(acked) if asks_for(request, acked) => Expect::Exists(acked.clone()),
            Some(_) => Expect::ExistsWithDifferentFields,
        }
    }

    /// Submits one client call, routed as `Engine::route` does. Returns the call's index.
    fn submit(&mut self, requests: Vec<TransferRequest>, atomic: bool) -> usize {
        assert!(!requests.is_empty());
        // In an atomic call another item's failure decides an item's answer.
        let expect = requests.iter().map(|r| if atomic { Expect::Anything } else { self.expectation(r) }).collect();
        for request in &requests {
            *self.id_uses.entry(request.id().clone()).or_default() += 1;
        }
        if atomic {
            // A leg held against a plain (not pending) leg of the other side
            // held earlier in the same call.
            let (mut credited, mut debited) = (BTreeSet::new(), BTreeSet::new());
            for request in &requests {
                if let TransferRequest::Create { debit_account_id, credit_account_id, pending, .. } = request {
                    if credited.contains(debit_account_id) {
                        self.tainted.insert(debit_account_id.clone());
                    }
                    if debited.contains(credit_account_id) {
                        self.tainted.insert(credit_account_id.clone());
                    }
                    if !pending {
                        debited.insert(debit_account_id.clone());
                        credited.insert(credit_account_id.clone());
                    }
                }
            }
        }
        let call = self.calls.len();
        let count = requests.len();
        self.calls.push(Call { requests: requests.clone(), atomic, expect, results: vec![None; count] });
        for (coordinator, indices, group) in self.layout.route(requests, atomic) {
            self.groups.push(Group { call, indices, coordinator, dead: false, lost: false });
            let tag = self.groups.len() as ClientTag;
            let origin = Origin {
                key_id: format!("key-{}", call % 3).into(),
                request_id: format!("call-{call}").into(),
                idempotency: None,
            };
            self.apply(coordinator, Input::Transfers { requests: group, atomic, origin: Some(origin) }, Some(tag));
        }
        call
    }

    fn answers(&self, call: usize) -> Vec<Option<TransferResult>> {
        self.calls[call].results.clone()
    }

    fn answer(&self, call: usize) -> TransferResult {
        let results = &self.calls[call].results;
        assert_eq!(results.len(), 1);
        results[0].clone().expect("answered")
    }

    // ---- the runtime's moves ------------------------------------------------

    /// Hands up to `count` messages of the queue `from -> to` to `to` as one input.
    fn deliver(&mut self, from: ExecutorId, to: ExecutorId, count: usize) -> bool {
        let Some(queue) = self.queues.get_mut(&(from, to)) else { return false };
        let take = count.min(queue.len());
        if take == 0 {
            return false;
        }
        let messages: Vec<PeerMsg> = queue.drain(..take).collect();
        self.hand(from, to, messages);
        true
    }

    /// Applies `messages` from `from` at `to`, as one input.
    fn hand(&mut self, from: ExecutorId, to: ExecutorId, messages: Vec<PeerMsg>) {
        let remembered = self.delivered.entry((from, to)).or_default();
        for message in &messages {
            if remembered.len() == MAX_REMEMBERED_DELIVERIES {
                remembered.pop_front();
            }
            remembered.push_back(message.clone());
        }
        let node = &mut self.nodes[usize::from(to)];
        node.consumed.extend(messages.iter().map(|m| (from, m.clone())));
        self.apply(to, Input::Peer { from, messages }, None);
    }

    /// Delivers the message at `index` of the queue `from -> to` before the
    /// ones ahead of it.
    fn deliver_out_of_order(&mut self, from: ExecutorId, to: ExecutorId, index: usize) -> bool {
        let Some(message) = self.queues.get_mut(&(from, to)).and_then(|q| q.remove(index)) else { return false };
        self.hand(from, to, vec![message]);
        true
    }

    /// Hands out again the `nth` newest message delivered on `from -> to`.
    fn redeliver(&mut self, from: ExecutorId, to: ExecutorId, nth: usize) -> bool {
        let Some(remembered) = self.delivered.get(&(from, to)) else { return false };
        let Some(message) = remembered.iter().rev().nth(nth).cloned() else { return false };
        self.hand(from, to, vec![message]);
        true
    }

    /// What the runtime does between batches: the protocol's deadlines
    /// (applied and logged), resends (leaving with the next fsync) and
    /// fence purges.
    fn tick(&mut self, e: ExecutorId) {
        let now_ms = self.now_ms;
        let node = &mut self.nodes[usize::from(e)];
        let mut fx = Effects::default();
        let deadlines = node.core.tick(now_ms, &mut fx);
        assert!(fx.finished.is_empty() && fx.audit.is_empty() && fx.history.is_empty(), "a tick only sends");
        node.held_outbox.append(&mut fx.outbox);
        if let Some(input) = deadlines {
            assert!(matches!(input, Input::Deadlines { .. }));
            self.apply(e, input, None);
        }
    }

    fn deliver_all(&mut self, from: ExecutorId, to: ExecutorId) {
        while self.deliver(from, to, MAX_MESSAGES_PER_DELIVERY) {}
    }

    /// Makes executor `e`'s volatile inputs durable and lets their effects out.
    fn fsync(&mut self, e: ExecutorId) {
        let node = &mut self.nodes[usize::from(e)];
        let volatile = std::mem::take(&mut node.volatile);
        node.durable.extend(volatile);
        let audit = std::mem::take(&mut node.held_audit);
        node.durable_audit.extend(audit);
        node.volatile_tags.clear();
        node.consumed.clear();
        let outbox = std::mem::take(&mut node.held_outbox);
        let finished = std::mem::take(&mut node.held_finished);
        let accounts = std::mem::take(&mut node.held_accounts);
        for (dest, message) in outbox {
            assert_ne!(dest, e, "an executor sends nothing to itself");
            self.queues.entry((e, dest)).or_default().push_back(message);
        }
        for (tag, index, result) in finished {
            self.on_finished(tag, index, result);
        }
        for (new, answer) in accounts {
            self.on_account_answer(new, answer);
        }
    }

    fn fsync_all(&mut self) {
        for e in 0..self.executors() {
            self.fsync(e);
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// What the runtime does at the start of every batch.
    fn expire(&mut self, e: ExecutorId) {
        let due = self.nodes[usize::from(e)].core.due_expiries(self.now_ms);
        if !due.is_empty() {
            self.apply(e, Input::Expire { pending_ids: due }, None);
        }
    }

    fn snapshot(&self, e: ExecutorId) -> Snapshot {
        let core = &self.nodes[usize::from(e)].core;
        let ledger = core.ledger();
        Snapshot {
            ledger: ledger.snapshot(),
            transfers: self.id_uses.keys().map(|tid| ledger.transfer(tid).cloned()).collect(),
            pending_transfers: ledger.pending_transfer_count(),
            fences: core.fence_count(),
            txns: core.list_transactions(TxnFilter::InFlight, usize::MAX, 0),
            due: core.due_expiries(u64::MAX),
        }
    }

    /// Drops executor `e`'s volatile part and rebuilds it from its durable log.
    fn lose_volatile_and_replay(&mut self, e: ExecutorId) {
        let before = self.nodes[usize::from(e)].volatile.is_empty().then(|| self.snapshot(e));
        let layout = self.layout;
        let node = &mut self.nodes[usize::from(e)];
        let lost_tags = std::mem::take(&mut node.volatile_tags);
        node.volatile.clear();
        node.held_outbox.clear();
        node.held_finished.clear();
        node.held_accounts.clear();
        node.held_audit.clear();
        // From the last checkpoint, if any, and the log after it.
        let (mut core, inputs, audit_events) = match &node.checkpoint {
            None => (ExecutorCore::new(e, layout), 0, 0),
            Some(c) => (restore(e, layout, &c.bytes), c.inputs, c.audit_events),
        };
        let mut fx = Effects::default();
        let mut replayed_audit = Vec::new();
        for (time_ms, input) in &node.durable[inputs..] {
            let (changed, _) = core.apply(input, *time_ms, None, &mut fx);
            assert!(changed, "only inputs that changed state are logged, and a replay changes state again");
            replayed_audit.append(&mut fx.audit);
            fx.clear();
        }
        assert_eq!(
            replayed_audit,
            node.durable_audit[audit_events..],
            "replaying executor {e} makes other audit events"
        );
        node.core = core;
        for tag in lost_tags {
            self.groups[tag as usize - 1].lost = true;
        }
        for group in &mut self.groups {
            if group.coordinator == e && group.indices.iter().any(|&i| self.calls[group.call].results[i].is_none()) {
                group.dead = true;
            }
        }
        if let Some(before) = before {
            assert_eq!(before, self.snapshot(e), "replaying the durable log of executor {e} gives another state");
        }
    }

    /// Executor `e` checkpoints (once its batch is durable, as the runtime
    /// does), whatever is in flight, and restarts from the checkpoint
    /// alone: the same state, its clients gone, its messages sent again.
    fn checkpoint(&mut self, e: ExecutorId, order: ResendOrder) {
        self.fsync(e);
        let before = self.snapshot(e);
        let layout = self.layout;
        let now_ms = self.now_ms;
        let node = &mut self.nodes[usize::from(e)];
        let inputs = node.durable.len();
        let bytes = node.core.checkpoint(inputs as u64, now_ms, 0, Vec::new()).encode();
        node.core = restore(e, layout, &bytes);
        node.checkpoint = Some(NodeCheckpoint { bytes, inputs, audit_events: node.durable_audit.len() });
        assert_eq!(before, self.snapshot(e), "executor {e} restored from its checkpoint is another");
        for group in &mut self.groups {
            if group.coordinator == e && group.indices.iter().any(|&i| self.calls[group.call].results[i].is_none()) {
                group.dead = true;
            }
        }
        self.resend(e, order);
    }

    fn resend(&mut self, e: ExecutorId, order: ResendOrder) {
        for (dest, message) in arrange(self.nodes[usize::from(e)].core.resend(), order) {
            assert_ne!(dest, e);
            self.queues.entry((e, dest)).or_default().push_back(message);
        }
    }

    /// Executor `e` alone crashes; the queues (a replicated stream) survive.
    fn crash(&mut self, e: ExecutorId, order: ResendOrder) {
        // What it consumed in batches that never became durable was never
        // acknowledged: it is handed out again, first, in the same order.
        let consumed = std::mem::take(&mut self.nodes[usize::from(e)].consumed);
        for (from, message) in consumed.into_iter().rev() {
            self.queues.entry((from, e)).or_default().push_front(message);
        }
        self.lose_volatile_and_replay(e);
        self.resend(e, order);
    }

    /// The whole process crashes: volatile parts and in-memory queues are gone.
    fn crash_all(&mut self, order: ResendOrder) {
        let is_forget = |m: &PeerMsg| matches!(m, PeerMsg::Forget { .. });
        self.lost_forgets += self.queues.values().flatten().filter(|m| is_forget(m)).count();
        self.queues.clear();
        for node in &mut self.nodes {
            self.lost_forgets += node.consumed.iter().filter(|(_, m)| is_forget(m)).count();
            node.consumed.clear();
        }
        for e in 0..self.executors() {
            self.lose_volatile_and_replay(e);
        }
        for e in 0..self.executors() {
            self.resend(e, order);
        }
        // As the runtime does after recovery: the fences whose Forget the
        // crash lost are forgotten.
        let cores: Vec<&ExecutorCore> = self.nodes.iter().map(|n| &n.core).collect();
        for (participant, coordinator, message) in lost_forgets(&cores) {
            self.queues.entry((coordinator, participant)).or_default().push_back(message);
        }
    }

    fn quiet(&self) -> bool {
        self.queues.values().all(VecDeque::is_empty) && self.nodes.iter().all(Node::idle)
    }

    /// Delivers everything and fsyncs until nothing moves any more.
    fn quiesce(&mut self) {
        for _ in 0..MAX_QUIESCE_ROUNDS {
            if self.quiet() {
                return;
            }
            let busy: Vec<(ExecutorId, ExecutorId)> =
                self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
            for (from, to) in busy {
                self.deliver_all(from, to);
            }
            self.fsync_all();
            self.check_invariants();
        }
        let txns: Vec<usize> = self.nodes.iter().map(|n| n.core.txns_in_flight()).collect();
        panic!("no quiescence after {MAX_QUIESCE_ROUNDS} rounds; transactions in flight per executor: {txns:?}");
    }

    // ---- answers ------------------------------------------------------------

    fn on_finished(&mut self, tag: ClientTag, index: usize, result: TransferResult) {
        let group = &self.groups[tag as usize - 1];
        assert!(!group.dead, "an answer for a client whose coordinator crashed (replays have no client)");
        let slot = group.indices[index];
        let call = &self.calls[group.call];
        assert!(call.results[slot].is_none(), "request answered twice: {:?}", call.requests[slot]);
        let request = call.requests[slot].clone();
        match (&call.expect[slot], &result) {
            (Expect::Anything, _) => {}
            // Not decided by its deadline: nothing was done, whatever the request.
            (_, Err(ErrorCode::TransactionTimedOut)) => {}
            (Expect::Exists(acked), Ok(outcome)) if !outcome.created && same_record(&outcome.transfer, acked) => {}
            (Expect::ExistsWithDifferentFields, Err(ErrorCode::ExistsWithDifferentFields)) => {}
            (expect, _) => panic!("retry {request:?} expected {expect:?}, answered {result:?}"),
        }
        if let Ok(outcome) = &result {
            self.on_transfer_acked(&request, outcome);
        }
        self.calls[self.groups[tag as usize - 1].call].results[slot] = Some(result);
    }

    fn on_transfer_acked(&mut self, request: &TransferRequest, outcome: &TransferOutcome) {
        let t = &outcome.transfer;
        assert_eq!(&t.id, request.id());
        if outcome.created {
            assert!(self.created_ids.insert(t.id.clone()), "transfer {} created twice", t.id);
            assert!(asks_for(request, t), "created {t:?} for {request:?}");
            // Every leg of a created transfer reports its account's balances.
            assert!(
                outcome.debit_balances.is_some() && outcome.credit_balances.is_some(),
                "created {t:?} without the balances of both accounts: {outcome:?}"
            );
        }
        match self.acked_transfers.get(&t.id) {
            Some(acked) => assert!(same_record(t, acked), "transfer {} answered as {t:?}, earlier as {acked:?}", t.id),
            None => {
                self.acked_transfers.insert(t.id.clone(), t.clone());
            }
        }
    }

    fn on_account_answer(&mut self, new: NewAccount, answer: AccountAnswer) {
        if let Some(acked) = self.acked_accounts.get(&new.id) {
            match &answer {
                Ok((account, false)) if acked.same_fields(&new) => {
                    assert_eq!(account.created_at_ms, acked.created_at_ms)
                }
                Err(ErrorCode::ExistsWithDifferentFields) if !acked.same_fields(&new) => {}
                _ => panic!("account {new:?} exists as {acked:?}, answered {answer:?}"),
            }
        }
        if let Ok((account, _)) = answer {
            assert!(account.same_fields(&new));
            self.acked_accounts.entry(account.id.clone()).or_insert(account);
        }
    }

    // ---- invariants ---------------------------------------------------------

    /// Checked after every step.
    fn check_invariants(&mut self) {
        if self.nodes.iter().all(|n| n.core.txns_in_flight() == 0) {
            // No transaction in flight anywhere: no hold of one is left.
            self.tainted.clear();
        }
        let mut total = 0;
        for (e, node) in self.nodes.iter().enumerate() {
            let ledger = node.core.ledger();
            // (1) Double entry, per executor: clearing accounts book every cross-shard leg.
            assert_eq!(ledger.net_total(), 0, "executor {e} does not balance");
            assert_eq!(ledger.check_balanced(), Ok(()), "executor {e}: the running sums do not balance");
            total += ledger.net_total();
            for account in ledger.accounts() {
                assert_eq!(self.layout.executor_of_account(&account.id) as usize, e, "{account:?} on executor {e}");
                // (2) No account breaks its constraint.
                check_constraint(account, !self.tainted.contains(&account.id));
            }
        }
        assert_eq!(total, 0);
        // (4, 6) Every acknowledged write is still there, with the same fields.
        for (tid, acked) in &self.acked_transfers {
            match self.transfer(tid) {
                Some(now) if same_record(now, acked) => {}
                now => panic!("acknowledged transfer {acked:?} is now {now:?}"),
            }
        }
        for (account_id, acked) in &self.acked_accounts {
            match self.account(account_id) {
                Some(now) if now.same_fields(&new_of(acked)) && now.created_at_ms == acked.created_at_ms => {}
                now => panic!("acknowledged account {acked:?} is now {now:?}"),
            }
        }
    }

    /// Checked once the system is quiet: the books rebuilt from the records
    /// agree with every balance and every hold, and every call is accounted for.
    fn check_quiescent(&mut self) {
        assert!(self.quiet());
        self.check_invariants();
        assert!(self.tainted.is_empty());
        let executors = usize::from(self.executors());
        let mut expected: BTreeMap<Id, Balances> = BTreeMap::new();
        let mut holds = vec![0usize; executors];
        let mut records = vec![0usize; executors];
        let mut pending_transfers = vec![0usize; executors];
        let mut resolved_by: BTreeMap<Id, Vec<Transfer>> = BTreeMap::new();
        for tid in self.id_uses.keys() {
            let Some(t) = self.transfer(tid) else { continue };
            records[usize::from(self.layout.executor_of_transfer(tid))] += 1;
            let (posted, held) = match (&t.kind, t.status) {
                (TransferKind::Single, TransferStatus::Posted) => (t.amount, 0),
                (TransferKind::Pending { .. }, TransferStatus::Pending) => {
                    pending_transfers[usize::from(self.layout.executor_of_transfer(tid))] += 1;
                    (0, t.amount)
                }
                (TransferKind::Pending { .. }, TransferStatus::Posted) => {
                    let posted = t.posted_amount.expect("a posted pending transfer says how much");
                    assert!(posted <= t.amount, "{t:?}");
                    (posted, 0)
                }
                (TransferKind::Pending { .. }, TransferStatus::Voided | TransferStatus::Expired) => (0, 0),
                (TransferKind::Post { pending_id, .. }, TransferStatus::Posted)
                | (TransferKind::Void { pending_id }, TransferStatus::Voided) => {
                    resolved_by.entry(pending_id.clone()).or_default().push(t.clone());
                    continue;
                }
                _ => panic!("impossible record {t:?}"),
            };
            if held > 0 {
                holds[usize::from(self.layout.executor_of_account(&t.debit_account_id))] += 1;
                holds[usize::from(self.layout.executor_of_account(&t.credit_account_id))] += 1;
            }
            let debit_shard = self.layout.shard_of_account(&t.debit_account_id);
            let credit_shard = self.layout.shard_of_account(&t.credit_account_id);
            book(&mut expected, &t.debit_account_id, Side::Debit, posted, held);
            book(&mut expected, &t.credit_account_id, Side::Credit, posted, held);
            if debit_shard != credit_shard {
                book(&mut expected, &clearing_account_id(debit_shard, t.currency), Side::Credit, posted, held);
                book(&mut expected, &clearing_account_id(credit_shard, t.currency), Side::Debit, posted, held);
            }
        }
        // A pending transfer is posted or voided by exactly one post or void record.
        for tid in self.id_uses.keys() {
            let Some(t) = self.transfer(tid) else { continue };
            if !matches!(t.kind, TransferKind::Pending { .. }) {
                continue;
            }
            let resolutions = resolved_by.remove(tid).unwrap_or_default();
            match t.status {
                TransferStatus::Posted | TransferStatus::Voided => {
                    assert_eq!(resolutions.len(), 1, "{t:?} resolved by {resolutions:?}");
                    let r = &resolutions[0];
                    assert_eq!(
                        (&r.debit_account_id, &r.credit_account_id),
                        (&t.debit_account_id, &t.credit_account_id)
                    );
                    if let TransferKind::Pending { expires_at_ms, .. } = t.kind {
                        assert!(
                            expires_at_ms == 0 || r.timestamp_ms < expires_at_ms,
                            "{t:?} resolved after its timeout by {r:?}"
                        );
                    }
                    match r.kind {
                        TransferKind::Post { .. } => {
                            assert_eq!(t.status, TransferStatus::Posted);
                            assert_eq!(t.posted_amount, Some(r.amount), "{t:?} posted by {r:?}");
                        }
                        _ => assert_eq!(t.status, TransferStatus::Voided, "{t:?} voided by {r:?}"),
                    }
                }
                _ => assert!(resolutions.is_empty(), "{t:?} resolved by {resolutions:?}"),
            }
        }
        assert!(resolved_by.is_empty(), "posts or voids of no pending transfer: {resolved_by:?}");

        let mut clearing_net = 0;
        let mut clearing_posted = 0;
        for (e, node) in self.nodes.iter().enumerate() {
            let ledger = node.core.ledger();
            for account in ledger.accounts() {
                let want = expected.remove(&account.id).unwrap_or_default();
                assert_eq!(
                    account.balances, want,
                    "balances of {} (executor {e}) disagree with the records",
                    account.id
                );
                if account.system {
                    clearing_net += account.balances.net_including_pending();
                    clearing_posted += account.balances.balance().to_i128().expect("small balances");
                }
            }
            assert_eq!(ledger.hold_count(), holds[e], "executor {e} keeps holds that no pending transfer explains");
            assert_eq!(ledger.transfer_count(), records[e], "executor {e} keeps records that are not visible");
            assert_eq!(
                ledger.pending_transfer_count(),
                pending_transfers[e],
                "executor {e} counts pending transfers its records do not show"
            );
        }
        assert!(expected.is_empty(), "money booked on accounts that do not exist: {expected:?}");
        assert_eq!((clearing_net, clearing_posted), (0, 0), "money left in flight between shards");

        // The audit trail names every transfer made, once, and nothing else.
        let mut audited = std::collections::BTreeSet::new();
        for event in self.nodes.iter().flat_map(|n| &n.durable_audit) {
            assert!(audited.insert(event.transfer.id.clone()), "{} audited twice", event.transfer.id);
            let call: usize = event.origin.request_id.strip_prefix("call-").unwrap().parse().unwrap();
            assert!(
                self.calls[call].requests.iter().any(|r| r.id() == &event.transfer.id),
                "audited under another call"
            );
        }
        let made: std::collections::BTreeSet<Id> =
            self.id_uses.keys().filter(|tid| self.transfer(tid).is_some()).cloned().collect();
        assert_eq!(audited, made, "the audit trail and the transfers made differ");

        // Every fence is forgotten, also when a process crash lost its
        // Forget (recovery finds and delivers those: `lost_forgets`).
        let fences: usize = self.nodes.iter().map(|n| n.core.fence_count()).sum();
        assert_eq!(fences, 0, "fences left behind ({} Forget messages were lost in crashes)", self.lost_forgets);

        // Every call is answered, or its coordinator crashed first; nothing is half-applied.
        for group in &self.groups {
            let call = &self.calls[group.call];
            for &slot in &group.indices {
                let request = &call.requests[slot];
                let unique = self.id_uses[request.id()] == 1;
                match &call.results[slot] {
                    None => assert!(group.dead, "unanswered, coordinator alive: {request:?}"),
                    Some(Ok(_)) => assert!(self.transfer(request.id()).is_some(), "answered, then lost: {request:?}"),
                    Some(Err(e)) if unique => {
                        assert!(self.transfer(request.id()).is_none(), "refused ({e}) but applied: {request:?}")
                    }
                    Some(Err(_)) => {}
                }
                if group.lost && unique {
                    assert!(self.transfer(request.id()).is_none(), "input lost in a crash, yet applied: {request:?}");
                }
            }
        }
        for call in &self.calls {
            if !call.atomic || call.requests.iter().any(|r| self.id_uses[r.id()] != 1) {
                continue;
            }
            let applied = call.requests.iter().filter(|r| self.transfer(r.id()).is_some()).count();
            assert!(applied == 0 || applied == call.requests.len(), "atomic call half-applied: {:?}", call.requests);
            if call.results.iter().any(|r| matches!(r, Some(Err(_)))) {
                assert_eq!(applied, 0, "atomic call refused, yet applied: {:?}", call.requests);
            }
        }
    }

    /// After the clock passed every timeout: no pending transfer with a timeout is left.
    fn check_all_expired(&self) {
        for tid in self.id_uses.keys() {
            if let Some(t) = self.transfer(tid) {
                if let TransferKind::Pending { expires_at_ms, .. } = t.kind {
                    assert!(expires_at_ms == 0 || t.status != TransferStatus::Pending, "not expired: {t:?}");
                }
            }
        }
    }
}

/// Whether `request` asks for the transfer `record` is (an idempotent retry).
fn asks_for(request: &TransferRequest, record: &Transfer) -> bool {
    match (request, &record.kind) {
        (
            TransferRequest::Create {
                debit_account_id, credit_account_id, amount, currency, pending, timeout_ms, ..
            },
            kind,
        ) => {
            let kind_matches = match kind {
                TransferKind::Single => !pending,
                TransferKind::Pending { timeout_ms: t, .. } => *pending && t == timeout_ms,
                _ => false,
            };
            kind_matches
                && *debit_account_id == record.debit_account_id
                && *credit_account_id == record.credit_account_id
                && amount.get() == record.amount
                && *currency == record.currency
        }
        (TransferRequest::Post { pending_id, amount, .. }, TransferKind::Post { pending_id: p, requested }) => {
            pending_id == p && amount.map(Amount::get) == *requested
        }
        (TransferRequest::Void { pending_id, .. }, TransferKind::Void { pending_id: p }) => pending_id == p,
        _ => false,
    }
}

/// The same record, except what may change later: a pending transfer's
/// status and posted amount.
fn same_record(now: &Transfer, acked: &Transfer) -> bool {
    match acked.status {
        TransferStatus::Pending => {
            Transfer { status: acked.status, posted_amount: acked.posted_amount, ..now.clone() } == *acked
        }
        _ => now == acked,
    }
}

fn new_of(account: &Account) -> NewAccount {
    NewAccount {
        id: account.id.clone(),
        currency: account.currency,
        flags: account.flags,
        overdraft_limit: account.overdraft_limit,
        metadata: account.metadata.clone(),
        owner: account.owner.clone(),
    }
}

fn book(expected: &mut BTreeMap<Id, Balances>, account: &Id, side: Side, posted: u64, held: u64) {
    let (posted, held) = (u128::from(posted), u128::from(held));
    let b = expected.entry(account.clone()).or_default();
    match side {
        Side::Debit => {
            b.debits_posted += posted;
            b.debits_pending += held;
        }
        Side::Credit => {
            b.credits_posted += posted;
            b.credits_pending += held;
        }
    }
}

/// Invariant (2). `strict` counts pending amounts; without it only posted
/// amounts are checked (see `Sim::tainted`).
fn check_constraint(account: &Account, strict: bool) {
    let b = &account.balances;
    // The simulation's sums stay far below 2^128: plain sums cannot overflow.
    if account.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
        let limit = b.credits_posted + u128::from(account.overdraft_limit);
        assert!(b.debits_posted <= limit, "overdrawn (posted): {account:?}");
        assert!(!strict || b.debits_posted + b.debits_pending <= limit, "overdrawn: {account:?}");
    }
    if account.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS) {
        let limit = b.debits_posted;
        assert!(b.credits_posted <= limit, "over-credited (posted): {account:?}");
        assert!(!strict || b.credits_posted + b.credits_pending <= limit, "over-credited: {account:?}");
    }
}

// ---- the property -------------------------------------------------------------

#[derive(Clone, Debug)]
struct AccountSpec {
    eur: bool,
    /// 0: no constraint, 1: debits_must_not_exceed_credits, 2: credits_must_not_exceed_debits.
    constraint: u8,
    overdraft_limit: u64,
}

fn new_account(index: usize, spec: &AccountSpec, alternative: bool) -> NewAccount {
    let bank = index < BANKS;
    let flags = match spec.constraint {
        _ if bank => AccountFlags::empty(),
        1 => AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        2 => AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS,
        _ => AccountFlags::empty(),
    };
    NewAccount {
        id: account_id(index),
        currency: if spec.eur && !bank { eur() } else { usd() },
        flags,
        overdraft_limit: if flags == AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS { spec.overdraft_limit } else { 0 },
        // The alternative asks for the same id with other fields.
        metadata: alternative.then(|| Box::from("{\"alternative\":true}")),
        owner: (index % 3 == 1).then(|| Owner::Merchant(Id::parse(&format!("m{}", index % 2)).unwrap())),
    }
}

#[derive(Clone, Debug)]
enum Item {
    /// `name` names the new transfer (made unique if taken), so that
    /// shrinking a case away does not rename the transfers of the others.
    Create {
        name: u16,
        debit: usize,
        /// The credit account is `debit + credit_offset` (mod ACCOUNTS), or the debit one if `same_account`.
        credit_offset: usize,
        same_account: bool,
        amount: u64,
        pending: bool,
        timeout_ms: u64,
        other_currency: bool,
    },
    /// `pick` chooses among the pending transfers acknowledged so far, or if
    /// `any` among all the pending transfers asked for.
    Post {
        name: u16,
        pick: Index,
        any: bool,
        amount: Option<u64>,
    },
    Void {
        name: u16,
        pick: Index,
        any: bool,
    },
}

#[derive(Clone, Debug)]
enum Step {
    CreateAccount {
        account: usize,
        alternative: bool,
    },
    Transfers {
        items: Vec<Item>,
        atomic: bool,
    },
    /// Retry an earlier request (an acknowledged one unless `any`), as it was or with other fields.
    Retry {
        pick: Index,
        any: bool,
        mutation: Option<u8>,
    },
    Deliver {
        pick: Index,
        count: usize,
    },
    Fsync {
        executor: usize,
    },
    FsyncAll,
    Advance {
        ms: u64,
    },
    Expire {
        executor: usize,
    },
    /// The protocol's tick on one executor.
    Tick {
        executor: usize,
    },
    /// Deliver a later message of a queue first.
    DeliverOutOfOrder {
        pick: Index,
        skip: usize,
    },
    /// Hand out again a message already delivered.
    Redeliver {
        pick: Index,
        nth: usize,
    },
    Crash {
        executor: usize,
        seed: u64,
    },
    CrashAll {
        seed: u64,
    },
    /// Checkpoint one executor and restart it from the checkpoint.
    Checkpoint {
        executor: usize,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
struct Case {
    executors: u16,
    accounts: Vec<AccountSpec>,
    steps: Vec<Step>,
}

fn item_strategy() -> impl Strategy<Value = Item> {
    let create = (
        any::<u16>(),
        prop_oneof![1 => 0..BANKS, 2 => 0..ACCOUNTS],
        1..ACCOUNTS,
        prop::bool::weighted(0.03),
        1..=100u64,
        any::<bool>(),
        prop_oneof![2 => Just(0u64), 1 => 1..=60u64],
        prop::bool::weighted(0.03),
    )
        .prop_map(|(name, debit, credit_offset, same_account, amount, pending, timeout_ms, other_currency)| {
            Item::Create { name, debit, credit_offset, same_account, amount, pending, timeout_ms, other_currency }
        });
    let any_pending = prop::bool::weighted(0.3);
    prop_oneof![
        6 => create,
        2 => (any::<u16>(), any::<Index>(), any_pending, prop::option::of(1..=100u64))
            .prop_map(|(name, pick, any, amount)| Item::Post { name, pick, any, amount }),
        1 => (any::<u16>(), any::<Index>(), any_pending).prop_map(|(name, pick, any)| Item::Void { name, pick, any }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..ACCOUNTS, prop::bool::weighted(0.3))
            .prop_map(|(account, alternative)| Step::CreateAccount { account, alternative }),
        20 => (vec_of(item_strategy(), 1..=3), any::<bool>())
            .prop_map(|(items, atomic)| Step::Transfers { items, atomic }),
        5 => (any::<Index>(), prop::bool::weighted(0.3), prop::option::of(0..3u8))
            .prop_map(|(pick, any, mutation)| Step::Retry { pick, any, mutation }),
        35 => (any::<Index>(), 1..=3usize).prop_map(|(pick, count)| Step::Deliver { pick, count }),
        12 => (0..4usize).prop_map(|executor| Step::Fsync { executor }),
        3 => Just(Step::FsyncAll),
        4 => (1..=30u64).prop_map(|ms| Step::Advance { ms }),
        // Past the deadline of the transactions in flight, now and then.
        1 => (TXN_DEADLINE_MS / 2..=TXN_DEADLINE_MS + 100).prop_map(|ms| Step::Advance { ms }),
        4 => (0..4usize).prop_map(|executor| Step::Expire { executor }),
        4 => (0..4usize).prop_map(|executor| Step::Tick { executor }),
        5 => (any::<Index>(), 1..=4usize).prop_map(|(pick, skip)| Step::DeliverOutOfOrder { pick, skip }),
        3 => (any::<Index>(), 0..8usize).prop_map(|(pick, nth)| Step::Redeliver { pick, nth }),
        2 => (0..4usize, any::<u64>()).prop_map(|(executor, seed)| Step::Crash { executor, seed }),
        1 => any::<u64>().prop_map(|seed| Step::CrashAll { seed }),
        2 => (0..4usize, any::<u64>()).prop_map(|(executor, seed)| Step::Checkpoint { executor, seed }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let executors = prop_oneof![1 => Just(1u16), 2 => Just(2u16), 4 => Just(3u16), 2 => Just(4u16)];
    let spec = (prop::bool::weighted(0.15), 0..3u8, prop_oneof![Just(0u64), 1..=50u64])
        .prop_map(|(eur, constraint, overdraft_limit)| AccountSpec { eur, constraint, overdraft_limit });
    (executors, vec_of(spec, ACCOUNTS), vec_of(step_strategy(), 1..=MAX_STEPS))
        .prop_map(|(executors, accounts, steps)| Case { executors, accounts, steps })
}

/// Turns proptest's steps into commands, with fresh ids for new transfers.
struct Workload {
    sim: Sim,
    accounts: Vec<AccountSpec>,
    pending_ids: Vec<Id>,
    submitted: Vec<TransferRequest>,
    names: BTreeSet<Id>,
}

impl Workload {
    fn fresh(&mut self, prefix: &str, name: u16) -> Id {
        let mut candidate = id(&format!("{prefix}{name}"));
        for n in 1.. {
            if self.names.insert(candidate.clone()) {
                break;
            }
            candidate = id(&format!("{prefix}{name}.{n}"));
        }
        candidate
    }

    fn pending_id(&self, pick: &Index, any: bool) -> Id {
        let acked: Vec<&Id> = self
            .pending_ids
            .iter()
            .filter(|p| {
                self.sim.acked_transfers.get(*p).is_some_and(|t| matches!(t.kind, TransferKind::Pending { .. }))
            })
            .collect();
        let candidates: Vec<&Id> = if any || acked.is_empty() { self.pending_ids.iter().collect() } else { acked };
        if candidates.is_empty() {
            return id("t-missing");
        }
        candidates[pick.index(candidates.len())].clone()
    }

    fn request(&mut self, item: &Item) -> TransferRequest {
        match item {
            Item::Create {
                name,
                debit,
                credit_offset,
                same_account,
                amount: minor_units,
                pending,
                timeout_ms,
                other_currency,
            } => {
                let tid = self.fresh("t", *name);
                let credit = if *same_account { *debit } else { (debit + credit_offset) % ACCOUNTS };
                let currency = match (self.accounts[*debit].eur && *debit >= BANKS) != *other_currency {
                    true => eur(),
                    false => usd(),
                };
                if *pending {
                    self.pending_ids.push(tid.clone());
                }
                TransferRequest::Create {
                    id: tid,
                    debit_account_id: account_id(*debit),
                    credit_account_id: account_id(credit),
                    amount: amount(*minor_units),
                    currency,
                    pending: *pending,
                    timeout_ms: if *pending { *timeout_ms } else { 0 },
                    details: None,
                }
            }
            Item::Post { name, pick, any, amount: minor_units } => TransferRequest::Post {
                id: self.fresh("p", *name),
                pending_id: self.pending_id(pick, *any),
                amount: minor_units.map(amount),
                details: None,
            },
            Item::Void { name, pick, any } => TransferRequest::Void {
                id: self.fresh("v", *name),
                pending_id: self.pending_id(pick, *any),
                details: None,
            },
        }
    }

    fn run(&mut self, step: &Step) {
        let executors = usize::from(self.sim.executors());
        let sim = &mut self.sim;
        match step {
            Step::CreateAccount { account, alternative } => {
                sim.create_account(new_account(*account, &self.accounts[*account], *alternative))
            }
            Step::Transfers { items, atomic } => {
                let requests: Vec<TransferRequest> = items.iter().map(|item| self.request(item)).collect();
                self.submitted.extend(requests.iter().cloned());
                self.sim.submit(requests, *atomic);
            }
            Step::Retry { pick, any, mutation } => {
                let acked: Vec<&TransferRequest> =
                    self.submitted.iter().filter(|r| sim.acked_transfers.contains_key(r.id())).collect();
                let candidates: Vec<&TransferRequest> =
                    if *any || acked.is_empty() { self.submitted.iter().collect() } else { acked };
                if candidates.is_empty() {
                    return;
                }
                let original = candidates[pick.index(candidates.len())];
                let request = match mutation {
                    None => original.clone(),
                    Some(kind) => mutate(original, *kind),
                };
                sim.submit(vec![request], false);
            }
            Step::Deliver { pick, count } => {
                let busy: Vec<(ExecutorId, ExecutorId)> =
                    sim.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if !busy.is_empty() {
                    let (from, to) = busy[pick.index(busy.len())];
                    sim.deliver(from, to, *count);
                }
            }
            Step::Fsync { executor } => sim.fsync((executor % executors) as ExecutorId),
            Step::FsyncAll => sim.fsync_all(),
            Step::Advance { ms } => sim.advance(*ms),
            Step::Expire { executor } => sim.expire((executor % executors) as ExecutorId),
            Step::Tick { executor } => sim.tick((executor % executors) as ExecutorId),
            Step::DeliverOutOfOrder { pick, skip } => {
                let busy: Vec<(ExecutorId, ExecutorId)> =
                    sim.queues.iter().filter(|(_, q)| q.len() > 1).map(|(k, _)| *k).collect();
                if !busy.is_empty() {
                    let (from, to) = busy[pick.index(busy.len())];
                    let index = (*skip).min(sim.queues[&(from, to)].len() - 1);
                    sim.deliver_out_of_order(from, to, index);
                }
            }
            Step::Redeliver { pick, nth } => {
                let seen: Vec<(ExecutorId, ExecutorId)> = sim.delivered.keys().copied().collect();
                if !seen.is_empty() {
                    let (from, to) = seen[pick.index(seen.len())];
                    sim.redeliver(from, to, *nth);
                }
            }
            Step::Crash { executor, seed } => {
                sim.crash((executor % executors) as ExecutorId, ResendOrder::Shuffled(*seed))
            }
            Step::CrashAll { seed } => sim.crash_all(ResendOrder::Shuffled(*seed)),
            Step::Checkpoint { executor, seed } => {
                sim.checkpoint((executor % executors) as ExecutorId, ResendOrder::Shuffled(*seed))
            }
        }
    }
}

/// The same id with other fields.
fn mutate(request: &TransferRequest, kind: u8) -> TransferRequest {
    match request.clone() {
        TransferRequest::Create {
            id,
            debit_account_id,
            credit_account_id,
            amount: a,
            currency,
            pending,
            timeout_ms,
            ..
        } => match kind {
            0 => TransferRequest::Create {
                id,
                debit_account_id,
                credit_account_id,
                amount: amount(if a.get() < MAX_TRANSFER_AMOUNT { a.get() + 1 } else { 1 }),
                currency,
                pending,
                timeout_ms,
                details: None,
            },
            1 => TransferRequest::Create {
                id,
                debit_account_id,
                credit_account_id,
                amount: a,
                currency,
                pending: !pending,
                timeout_ms: 0,
                details: None,
            },
            _ => TransferRequest::Create {
                id,
                debit_account_id: credit_account_id,
                credit_account_id: debit_account_id,
                amount: a,
                currency,
                pending,
                timeout_ms,
                details: None,
            },
        },
        TransferRequest::Post { id, pending_id, amount: a, .. } => TransferRequest::Post {
            id,
            pending_id,
            amount: Some(amount(a.map_or(1, |a| a.get() % 100 + 1))),
            details: None,
        },
        TransferRequest::Void { id, pending_id, .. } => {
            TransferRequest::Post { id, pending_id, amount: None, details: None }
        }
    }
}

fn run_case(case: &Case) {
    let mut workload = Workload {
        sim: Sim::new(case.executors),
        accounts: case.accounts.clone(),
        pending_ids: Vec::new(),
        submitted: Vec::new(),
        names: BTreeSet::new(),
    };
    for (index, spec) in case.accounts.iter().enumerate().take(SETUP_ACCOUNTS) {
        workload.sim.create_account(new_account(index, spec, false));
    }
    workload.sim.fsync_all();
    workload.sim.check_invariants();
    for step in &case.steps {
        workload.run(step);
        workload.sim.check_invariants();
    }
    let sim = &mut workload.sim;
    sim.quiesce();
    sim.check_quiescent();
    // Then let every timeout pass.
    sim.advance(1_000);
    for e in 0..sim.executors() {
        sim.expire(e);
    }
    sim.quiesce();
    sim.check_quiescent();
    sim.check_all_expired();
    // And every fence's retention: the ticks purge them all.
    sim.advance(TXN_DEADLINE_MS + FENCE_RETENTION_MS);
    for e in 0..sim.executors() {
        sim.tick(e);
    }
    sim.quiesce();
    sim.check_quiescent();
    let retained: usize = sim.nodes.iter().map(|n| n.core.retained_fence_count()).sum();
    assert_eq!(retained, 0, "fences kept past their retention");
}

fn config() -> ProptestConfig {
    let defaults = ProptestConfig::default();
    let env = |name: &str| std::env::var_os(name).is_some();
    ProptestConfig {
        // Deterministic unless asked otherwise (PROPTEST_CASES, PROPTEST_RNG_SEED).
        cases: if env("PROPTEST_CASES") { defaults.cases } else { CASES },
        rng_seed: if env("PROPTEST_RNG_SEED") { defaults.rng_seed } else { RngSeed::Fixed(0x7065_616b_7374_6163) },
        max_shrink_iters: if env("PROPTEST_MAX_SHRINK_ITERS") { defaults.max_shrink_iters } else { 1_024 },
        failure_persistence: None,
        ..defaults
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn executors_keep_the_invariants_through_crashes(case in case_strategy()) {
        run_case(&case);
    }
}

// ---- focused examples -----------------------------------------------------------

/// The time of the focused examples' inputs, and the deadline of their transaction.
const NOW_MS: u64 = 1_000;
const DEADLINE_MS: u64 = NOW_MS + TXN_DEADLINE_MS;

/// Applies one peer message to `core` at `now_ms` and returns what it sends back.
fn feed_at(core: &mut ExecutorCore, from: ExecutorId, message: PeerMsg, now_ms: u64) -> Vec<(ExecutorId, PeerMsg)> {
    let mut fx = Effects::default();
    let (changed, _) = core.apply(&Input::Peer { from, messages: vec![message] }, now_ms, None, &mut fx);
    assert!(changed);
    assert!(fx.finished.is_empty());
    fx.outbox
}

fn feed(core: &mut ExecutorCore, from: ExecutorId, message: PeerMsg) -> Vec<(ExecutorId, PeerMsg)> {
    feed_at(core, from, message, NOW_MS)
}

/// A fresh core of executor `e` rebuilt from `log`, as after a crash.
fn replay(e: ExecutorId, layout: Layout, log: &[Input]) -> ExecutorCore {
    let mut core = ExecutorCore::new(e, layout);
    let mut fx = Effects::default();
    for input in log {
        core.apply(input, NOW_MS, None, &mut fx);
        fx.clear();
    }
    core
}

fn check(sent: Vec<(ExecutorId, PeerMsg)>, expected: PeerMsg) {
    assert_eq!(sent, vec![(0, expected)]);
}

/// A participant on executor 1 of 2 with one open account, and a debit leg on it.
fn participant() -> (ExecutorCore, Id, Leg) {
    let layout = Layout::new(SHARDS, 2).expect("valid layout");
    let mut core = ExecutorCore::new(1, layout);
    let account = name_on(layout, "acct", 1, 0);
    let mut fx = Effects::default();
    let (changed, _) =
        core.apply(&Input::CreateAccount(plain_account(&account, AccountFlags::empty())), NOW_MS, None, &mut fx);
    assert!(changed);
    let leg = Leg {
        transfer_id: id("t1"),
        side: Side::Debit,
        account_id: account.clone(),
        currency: usd(),
        amount: 10,
        via_clearing: true,
        pending: false,
    };
    (core, account, leg)
}

/// A transaction that executor 0 coordinates.
const TXN: TxnId = (1 << 48) + 7;

fn try_hold(leg: &Leg) -> PeerMsg {
    PeerMsg::Try { txn: TXN, ops: vec![TryOp::Hold(leg.clone())], deadline_ms: DEADLINE_MS }
}

fn decide(commit: bool, ops: Vec<CommitOp>) -> PeerMsg {
    PeerMsg::Decide { txn: TXN, commit, ops, deadline_ms: DEADLINE_MS }
}

fn refused(code: ErrorCode) -> PeerMsg {
    PeerMsg::Tried { txn: TXN, results: vec![OpResult::Err(code)] }
}

/// Runs the tick of `core` at `now_ms` (purging the fences whose retention passed).
fn tick_at(core: &mut ExecutorCore, now_ms: u64) {
    let mut fx = Effects::default();
    assert_eq!(core.tick(now_ms, &mut fx), None, "a participant has no deadline of its own");
    assert!(fx.outbox.is_empty());
}

/// No hold, nothing booked, not even a clearing account opened.
fn nothing_left(core: &ExecutorCore, account: &Id) {
    assert_eq!(core.ledger().hold_count(), 0);
    assert_eq!(core.ledger().account_count(), 1);
    assert_eq!(core.ledger().account(account).expect("open").balances, Balances::default());
}

#[test]
fn a_cancel_before_its_try_suspends_the_fence_and_the_late_try_is_refused() {
    let (mut core, account, leg) = participant();
    let cancel = decide(false, vec![]);
    check(feed(&mut core, 0, cancel.clone()), PeerMsg::Acked { txn: TXN, balances: vec![] });
    assert_eq!(core.fence_count(), 1);
    // The suspended fence is in the log: a crash does not forget it.
    let log = [
        Input::CreateAccount(plain_account(&account, AccountFlags::empty())),
        Input::Peer { from: 0, messages: vec![cancel.clone()] },
    ];
    let mut replayed = replay(1, Layout::new(SHARDS, 2).expect("valid layout"), &log);
    assert_eq!(replayed.fence_count(), 1);
    check(feed(&mut replayed, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    assert_eq!(replayed.ledger().hold_count(), 0);
    check(feed(&mut core, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    nothing_left(&core, &account);
    // The fence stays suspended across repeats, and after the coordinator
    // forgot the transaction it is retained: a try is still refused.
    check(feed(&mut core, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    check(feed(&mut core, 0, cancel.clone()), PeerMsg::Acked { txn: TXN, balances: vec![] });
    assert_eq!(core.fence_count(), 1);
    assert!(feed(&mut core, 0, PeerMsg::Forget { txn: TXN }).is_empty());
    assert_eq!((core.fence_count(), core.retained_fence_count()), (0, 1));
    check(feed(&mut core, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    check(feed(&mut core, 0, cancel), PeerMsg::Acked { txn: TXN, balances: vec![] });
    nothing_left(&core, &account);
    // Kept until deadline + retention; then purged, and the deadline alone
    // refuses the try.
    let expiry_ms = DEADLINE_MS + FENCE_RETENTION_MS;
    tick_at(&mut core, expiry_ms - 1);
    assert_eq!(core.retained_fence_count(), 1);
    tick_at(&mut core, expiry_ms);
    assert_eq!(core.retained_fence_count(), 0);
    check(feed_at(&mut core, 0, try_hold(&leg), expiry_ms), refused(ErrorCode::TransactionTimedOut));
    nothing_left(&core, &account);
    assert_eq!((core.fence_count(), core.retained_fence_count()), (0, 0), "a refused try leaves no fence");
}

#[test]
fn a_cancel_after_the_deadline_that_finds_no_try_keeps_nothing() {
    let (mut core, account, leg) = participant();
    check(feed_at(&mut core, 0, decide(false, vec![]), DEADLINE_MS), PeerMsg::Acked { txn: TXN, balances: vec![] });
    assert_eq!(core.fence_count(), 0, "past the deadline the try is refused anyway");
    check(feed_at(&mut core, 0, try_hold(&leg), DEADLINE_MS), refused(ErrorCode::TransactionTimedOut));
    nothing_left(&core, &account);
}

#[test]
fn a_repeated_try_or_decide_is_answered_from_the_fence_without_applying_twice() {
    let (mut core, account, leg) = participant();
    let tried = PeerMsg::Tried { txn: TXN, results: vec![OpResult::Ok] };
    for _ in 0..2 {
        check(feed(&mut core, 0, try_hold(&leg)), tried.clone());
        let b = core.ledger().account(&account).expect("open").balances;
        assert_eq!((b.debits_pending, b.debits_posted), (10, 0));
        assert_eq!(core.ledger().hold_count(), 1);
    }
    let commit = decide(
        true,
        vec![CommitOp::CommitHold {
            transfer_id: leg.transfer_id.clone(),
            side: Side::Debit,
            account_id: account.clone(),
        }],
    );
    let posted = Balances { debits_posted: 10, ..Balances::default() };
    let acked = PeerMsg::Acked { txn: TXN, balances: vec![(account.clone(), posted)] };
    check(feed(&mut core, 0, commit.clone()), acked.clone());
    // The repeat finds the fence decided: the same answer, booked once
    // (even when it comes after the deadline).
    check(feed(&mut core, 0, commit.clone()), acked.clone());
    check(feed_at(&mut core, 0, commit.clone(), DEADLINE_MS + 1), acked);
    assert_eq!(core.ledger().account(&account).expect("open").balances, posted);
    // A try repeated after the decision is refused and holds nothing.
    check(feed(&mut core, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    assert_eq!(core.ledger().hold_count(), 0);
    assert_eq!(core.ledger().account(&account).expect("open").balances, posted);
    assert_eq!(core.ledger().net_total(), 0);
    assert!(feed(&mut core, 0, PeerMsg::Forget { txn: TXN }).is_empty());
    assert_eq!((core.fence_count(), core.retained_fence_count()), (0, 1));
    // After the forget, repeats are answered without effect.
    check(feed(&mut core, 0, commit.clone()), PeerMsg::Acked { txn: TXN, balances: vec![] });
    check(feed(&mut core, 0, try_hold(&leg)), refused(ErrorCode::InFlight));
    assert_eq!(core.ledger().account(&account).expect("open").balances, posted);
    // And once the retention passed and the fence is purged, a stale
    // commit is known by its deadline: no effect, no assertion.
    let expiry_ms = DEADLINE_MS + FENCE_RETENTION_MS;
    tick_at(&mut core, expiry_ms);
    assert_eq!(core.retained_fence_count(), 0);
    check(feed_at(&mut core, 0, commit, expiry_ms), PeerMsg::Acked { txn: TXN, balances: vec![] });
    check(feed_at(&mut core, 0, try_hold(&leg), expiry_ms), refused(ErrorCode::TransactionTimedOut));
    assert_eq!(core.ledger().account(&account).expect("open").balances, posted);
    assert_eq!((core.fence_count(), core.ledger().hold_count()), (0, 0));
}

#[test]
fn a_late_try_after_the_transaction_ended_leaves_nothing() {
    let (mut core, account, leg) = participant();
    // At the deadline or after: refused, nothing held, no fence.
    for at in [DEADLINE_MS, DEADLINE_MS + 1, DEADLINE_MS + FENCE_RETENTION_MS * 2] {
        check(feed_at(&mut core, 0, try_hold(&leg), at), refused(ErrorCode::TransactionTimedOut));
        nothing_left(&core, &account);
        assert_eq!((core.fence_count(), core.retained_fence_count()), (0, 0));
    }
    // Just before it, the try holds; its coordinator decides cancel
    // (timed out) and forgets; the duplicate of the try that comes next,
    // still before the deadline, finds the retained fence.
    let (mut core, account, leg) = participant();
    check(
        feed_at(&mut core, 0, try_hold(&leg), DEADLINE_MS - 2),
        PeerMsg::Tried { txn: TXN, results: vec![OpResult::Ok] },
    );
    assert_eq!(core.ledger().hold_count(), 1);
    check(feed_at(&mut core, 0, decide(false, vec![]), DEADLINE_MS), PeerMsg::Acked { txn: TXN, balances: vec![] });
    assert!(feed_at(&mut core, 0, PeerMsg::Forget { txn: TXN }, DEADLINE_MS).is_empty());
    check(feed_at(&mut core, 0, try_hold(&leg), DEADLINE_MS - 1), refused(ErrorCode::InFlight));
    // The clearing account the try opened stays, at zero.
    assert_eq!(core.ledger().hold_count(), 0);
    assert_eq!(core.ledger().account(&account).expect("open").balances, Balances::default());
    assert_eq!(core.ledger().net_total(), 0);
}

#[test]
fn a_participant_that_never_answers_is_cancelled_at_the_deadline_and_every_hold_released() {
    let mut sim = Sim::new(2);
    let layout = sim.layout;
    let tid = name_on(layout, "t", 0, 0);
    let (debit, credit) = (name_on(layout, "a", 0, 0), name_on(layout, "a", 1, 0));
    for account in [&debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();
    let call = sim.submit(vec![create(&tid, &debit, &credit, 25, usd())], false);
    sim.fsync(0);
    // The coordinator holds its side; executor 1 never takes its message.
    assert_eq!(sim.ledger(0).hold_count(), 1);
    sim.advance(TXN_DEADLINE_MS / 2);
    sim.tick(0);
    sim.fsync(0);
    assert_eq!(sim.queues[&(0, 1)].len(), 2, "the try, and the try sent again");
    assert_eq!(sim.answers(call), vec![None]);
    sim.advance(TXN_DEADLINE_MS / 2);
    sim.tick(0);
    sim.fsync(0);
    // At the deadline: cancelled, the client told at once, the hold released.
    assert_eq!(sim.answer(call), Err(ErrorCode::TransactionTimedOut));
    assert_eq!(sim.ledger(0).hold_count(), 0);
    assert_eq!(sim.balances(&debit), Balances::default());
    assert!(sim.transfer(&tid).is_none());
    let view = sim.nodes[0].core.list_transactions(peakstack_engine::tcc::TxnFilter::Stuck, 10, sim.now_ms);
    assert_eq!(view.len(), 1, "waiting for the acknowledgement of its cancel");
    assert!(view[0].timed_out);
    // Executor 1 comes back: the tries are refused (past the deadline),
    // the cancel acknowledged, and nothing is left anywhere.
    sim.quiesce();
    assert_eq!(sim.balances(&credit), Balances::default());
    assert_eq!(sim.ledger(1).hold_count(), 0);
    sim.check_quiescent();
}

#[test]
fn a_coordinator_that_crashes_after_its_tries_resends_them_and_the_transfer_happens_once() {
    let mut sim = Sim::new(3);
    let layout = sim.layout;
    let tid = name_on(layout, "t", 0, 0);
    let (debit, credit) = (name_on(layout, "a", 1, 0), name_on(layout, "a", 2, 0));
    for account in [&debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();
    let call = sim.submit(vec![create(&tid, &debit, &credit, 25, usd())], false);
    sim.fsync(0);
    sim.deliver_all(0, 1);
    sim.deliver_all(0, 2);
    sim.fsync(1);
    sim.fsync(2);
    // Both Tried wait in the queues; the coordinator crashes and tries again.
    sim.crash(0, ResendOrder::TxnOrder);
    assert_eq!(sim.queues[&(0, 1)].len(), 1);
    assert_eq!(sim.queues[&(0, 2)].len(), 1);
    sim.quiesce();
    assert_eq!(sim.answers(call), vec![None], "the client went with the crash");
    assert_eq!(sim.balances(&debit), Balances { debits_posted: 25, ..Balances::default() });
    assert_eq!(sim.balances(&credit), Balances { credits_posted: 25, ..Balances::default() });
    sim.check_quiescent();
    // The client retries and is told that it exists.
    let retry = sim.submit(vec![create(&tid, &debit, &credit, 25, usd())], false);
    sim.quiesce();
    assert!(matches!(sim.answer(retry), Ok(TransferOutcome { created: false, .. })));
    assert_eq!(sim.balances(&debit).debits_posted, 25);
    sim.check_quiescent();
}

#[test]
fn checkpoints_taken_with_transactions_in_flight_resume_them_after_a_restart_and_a_crash() {
    let mut sim = Sim::new(3);
    let layout = sim.layout;
    let (tid, post_id) = (name_on(layout, "t", 0, 0), name_on(layout, "r", 0, 0));
    let pending_id = name_on(layout, "p", 1, 0);
    let (debit, credit) = (name_on(layout, "a", 1, 0), name_on(layout, "a", 2, 0));
    for account in [&debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();
    let made = sim.submit(vec![pending(&pending_id, &debit, &credit, 40, 0)], false);
    sim.quiesce();
    assert!(matches!(sim.answer(made), Ok(TransferOutcome { created: true, .. })));
    // A transfer (coordinated by executor 0) and a post of the pending
    // transfer (by its home, executor 1) in flight: the tries delivered
    // (held, locked), the answers not yet back.
    sim.submit(vec![create(&tid, &debit, &credit, 25, usd())], false);
    let post =
        TransferRequest::Post { id: post_id.clone(), pending_id: pending_id.clone(), amount: None, details: None };
    sim.submit(vec![post], false);
    sim.fsync(0);
    sim.deliver_all(0, 1);
    sim.deliver_all(0, 2);
    assert_eq!(sim.ledger(1).hold_count(), 2, "the pending transfer's hold and the transfer's leg");
    // Each executor checkpoints now and restarts from it: the coordinator
    // with its transactions, the participants with their holds and fences.
    for e in 0..3 {
        sim.checkpoint(e, ResendOrder::TxnOrder);
    }
    let in_flight: Vec<usize> = sim.nodes.iter().map(|n| n.core.txns_in_flight()).collect();
    assert_eq!(in_flight, [1, 1, 0], "the transfer on executor 0, the post on the pending transfer's home");
    assert_eq!(sim.nodes[1].core.fence_count(), 2, "its leg of the transfer, its own part of the post");
    assert_eq!(sim.ledger(1).snapshot().locked.len(), 1, "the post's lock is in the checkpoint");
    // A little more happens after the checkpoints, then everyone crashes:
    // recovery is the checkpoint plus the log after it.
    sim.deliver_all(1, 0);
    sim.fsync_all();
    sim.crash_all(ResendOrder::Reversed);
    sim.quiesce();
    assert_eq!(sim.balances(&debit), Balances { debits_posted: 65, ..Balances::default() });
    assert_eq!(sim.balances(&credit), Balances { credits_posted: 65, ..Balances::default() });
    assert_eq!(sim.transfer(&pending_id).map(|t| t.status), Some(TransferStatus::Posted));
    assert!(sim.transfer(&tid).is_some() && sim.transfer(&post_id).is_some());
    sim.check_quiescent();
}

#[test]
fn a_transfer_across_three_executors_refused_on_the_credit_side_changes_no_balance() {
    let mut sim = Sim::new(3);
    let layout = sim.layout;
    let tid = name_on(layout, "t", 0, 0);
    let bank = name_on(layout, "bank", 0, 0);
    let debit = name_on(layout, "a", 1, 0);
    let credit = name_on(layout, "a", 2, 0);
    sim.create_account(plain_account(&bank, AccountFlags::empty()));
    sim.create_account(plain_account(&debit, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS));
    sim.create_account(plain_account(&credit, AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS));
    sim.fsync_all();
    let funding = sim.submit(vec![create(&name_on(layout, "f", 2, 0), &bank, &debit, 50, usd())], false);
    sim.quiesce();
    assert!(matches!(sim.answer(funding), Ok(TransferOutcome { created: true, .. })));
    let books = |sim: &Sim| -> Vec<Vec<Account>> { (0..3).map(|e| sim.ledger(e).accounts().to_vec()).collect() };
    let before = books(&sim);

    let call = sim.submit(vec![create(&tid, &debit, &credit, 20, usd())], false);
    sim.quiesce();
    assert_eq!(sim.answer(call), Err(ErrorCode::ExceedsDebits));
    let after = books(&sim);
    // Clearing accounts opened by the try may appear; every balance is as before.
    for (e, (before, after)) in before.iter().zip(&after).enumerate() {
        for account in after {
            let was = before.iter().find(|a| a.id == account.id).map_or(Balances::default(), |a| a.balances);
            assert_eq!(account.balances, was, "{} on executor {e}", account.id);
        }
    }
    assert!(sim.transfer(&tid).is_none());
    assert!((0..3).all(|e| sim.ledger(e).hold_count() == 0 && sim.nodes[usize::from(e)].core.fence_count() == 0));
    sim.check_quiescent();
}

// ---- regressions: bugs this simulation found ----------------------------------------
//
// Each failed before commit 8b18533 ("settle before hold commit",
// "all-or-nothing tries") and asserts the behaviour that commit restored.

/// A pending transfer's record becomes visible on its home executor when the
/// home applies the creating transaction's Decide, while the Decide that
/// commits its debit hold may still be on its way to another executor. A post
/// coordinated by the home then sends `Settle` there on another FIFO queue. If
/// it arrives first, `Ledger::settle_pending` used to find the hold still
/// owned by the creating transaction and do nothing; the late commit then made
/// it a pending hold nothing would ever settle: the transfer said "posted",
/// its credit side was posted, its debit side stayed pending forever (money
/// locked, posted balances no longer summing to zero, and the post answered
/// without the debit account's balances). Reached without any crash when an
/// atomic call's first transfer lives elsewhere than the pending transfer it
/// creates.
#[test]
fn a_post_that_overtakes_the_commit_of_its_pending_transfer_still_settles_both_sides() {
    let mut sim = Sim::new(3);
    let layout = sim.layout;
    let first = name_on(layout, "q", 0, 0); // coordinator of the atomic call: executor 0
    let pending_id = name_on(layout, "p", 1, 0); // home of the pending transfer: executor 1
    let post_id = name_on(layout, "r", 1, 0);
    let (qa, qb) = (name_on(layout, "a", 0, 0), name_on(layout, "a", 0, 1));
    let debit = name_on(layout, "d", 2, 0); // debit side: executor 2
    let credit = name_on(layout, "c", 0, 2);
    for account in [&qa, &qb, &debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();

    let atomic =
        sim.submit(vec![create(&first, &qa, &qb, 5, usd()), pending(&pending_id, &debit, &credit, 10, 0)], true);
    sim.fsync(0);
    sim.deliver_all(0, 1);
    sim.deliver_all(0, 2);
    sim.fsync(1);
    sim.fsync(2);
    sim.deliver_all(1, 0);
    sim.deliver_all(2, 0);
    sim.fsync(0); // decided: Decide -> 1 (commit the record), Decide -> 2 (commit the debit hold)
    sim.deliver_all(0, 1);
    sim.fsync(1);
    assert!(sim.transfer(&pending_id).is_some(), "the pending transfer is visible on its home");

    let post = sim.submit(
        vec![TransferRequest::Post {
            id: post_id.clone(),
            pending_id: pending_id.clone(),
            amount: None,
            details: None,
        }],
        false,
    );
    sim.fsync(1);
    sim.deliver_all(1, 2); // the post's Settle reaches executor 2 ...
    sim.deliver_all(0, 2); // ... before the creating transaction's commit
    sim.quiesce();

    assert!(matches!(sim.answers(atomic).as_slice(), [Some(Ok(_)), Some(Ok(_))]));
    assert_eq!(sim.transfer(&pending_id).map(|t| t.status), Some(TransferStatus::Posted));
    assert_eq!(sim.balances(&credit), Balances { credits_posted: 10, ..Balances::default() });
    // Before the fix: debits_pending 10, debits_posted 0, and a hold nobody would settle.
    assert_eq!(sim.balances(&debit), Balances { debits_posted: 10, ..Balances::default() }, "debit side of the post");
    assert!(matches!(sim.answer(post), Ok(TransferOutcome { created: true, debit_balances: Some(_), .. })));
    sim.check_quiescent();
}

/// The same race, second trigger, no crash: an atomic call coordinated
/// elsewhere than a pending transfer's home posts it. The home locks the
/// pending transfer as soon as its record is visible, and the call's Settle
/// travels on the coordinator's queue, racing the Decide that commits the
/// pending transfer's hold on the home's queue.
#[test]
fn an_atomic_post_coordinated_elsewhere_still_settles_both_sides() {
    let mut sim = Sim::new(3);
    let layout = sim.layout;
    let pending_id = name_on(layout, "p", 1, 0); // home and coordinator of its creation: executor 1
    let debit = name_on(layout, "d", 2, 0); // debit side: executor 2
    let credit = name_on(layout, "c", 1, 0);
    let first = name_on(layout, "q", 0, 0); // the atomic call is coordinated by executor 0
    let post_id = name_on(layout, "r", 0, 0);
    let (qa, qb) = (name_on(layout, "a", 0, 0), name_on(layout, "a", 0, 1));
    for account in [&qa, &qb, &debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();
    sim.submit(vec![pending(&pending_id, &debit, &credit, 10, 0)], false);
    sim.fsync(1);
    sim.deliver_all(1, 2);
    sim.fsync(2);
    sim.deliver_all(2, 1);
    sim.fsync(1); // decided: the record is visible on 1, Decide -> 2 waits in the queue 1 -> 2

    let post = TransferRequest::Post { id: post_id, pending_id: pending_id.clone(), amount: None, details: None };
    let atomic = sim.submit(vec![create(&first, &qa, &qb, 5, usd()), post], true);
    sim.fsync(0);
    sim.deliver_all(0, 1); // the lock on the pending transfer
    sim.fsync(1);
    sim.deliver_all(1, 0);
    sim.fsync(0); // decided: Settle -> 2 waits in the queue 0 -> 2
    sim.deliver_all(0, 2); // the Settle reaches executor 2 before ...
    sim.fsync(2);
    sim.deliver_all(1, 2); // ... the commit of the pending transfer's hold
    sim.quiesce();

    assert_eq!(sim.transfer(&pending_id).map(|t| t.status), Some(TransferStatus::Posted));
    assert_eq!(sim.balances(&credit), Balances { credits_posted: 10, ..Balances::default() });
    // Before the fix: debits_pending 10, debits_posted 0, and a hold nobody would settle.
    assert_eq!(sim.balances(&debit), Balances { debits_posted: 10, ..Balances::default() }, "debit side of the post");
    assert!(matches!(sim.answers(atomic).as_slice(), [Some(Ok(_)), Some(Ok(_))]));
    sim.check_quiescent();
}

/// The same race, reached through a crash: after a process crash,
/// `ExecutorCore::resend` sends the messages of unfinished transactions in
/// `HashMap` order. When the Decide that commits a pending transfer's hold and
/// the Decide of a post of that transfer both wait for the same participant,
/// the post's may leave first.
#[test]
fn after_a_crash_the_resent_decides_still_settle_a_posted_pending_transfer() {
    let mut sim = Sim::new(2);
    let layout = sim.layout;
    let pending_id = name_on(layout, "p", 0, 0);
    let post_id = name_on(layout, "r", 0, 0);
    let debit = name_on(layout, "d", 1, 0);
    let credit = name_on(layout, "c", 0, 0);
    for account in [&debit, &credit] {
        sim.create_account(plain_account(account, AccountFlags::empty()));
    }
    sim.fsync_all();
    sim.submit(vec![pending(&pending_id, &debit, &credit, 10, 0)], false);
    sim.fsync(0);
    sim.deliver_all(0, 1);
    sim.fsync(1);
    sim.deliver_all(1, 0); // decided: the record is committed, Decide -> 1 in the outbox
    sim.submit(
        vec![TransferRequest::Post { id: post_id, pending_id: pending_id.clone(), amount: None, details: None }],
        false,
    );
    sim.fsync(0); // both Decides wait in the queue 0 -> 1, in order
    assert_eq!(sim.queues[&(0, 1)].len(), 2);
    sim.crash_all(ResendOrder::Reversed);
    sim.quiesce();

    assert_eq!(sim.transfer(&pending_id).map(|t| t.status), Some(TransferStatus::Posted));
    assert_eq!(sim.balances(&credit), Balances { credits_posted: 10, ..Balances::default() });
    // Before the fix: debits_pending 10, debits_posted 0, and a hold nobody would settle.
    assert_eq!(sim.balances(&debit), Balances { debits_posted: 10, ..Balances::default() }, "debit side of the post");
    sim.check_quiescent();
}

/// A participant used to keep the legs of a try that succeeded even when
/// another leg of the same try failed. For a transfer whose two accounts share
/// a shard (no clearing account in between), the debit leg was then held
/// without its credit leg: the executor's books, and the sum over all
/// executors, were off by the amount until the coordinator's cancel arrived (a
/// round trip later; after a crash, much later). Invariant 1 says "at every
/// moment".
#[test]
fn a_refused_leg_does_not_leave_its_twin_unbalanced_while_the_cancel_is_on_its_way() {
    let mut sim = Sim::new(2);
    let layout = sim.layout;
    let tid = name_on(layout, "t", 0, 0); // coordinated by executor 0
    let debit = name_on(layout, "s", 1, 0);
    let credit = (1..)
        .map(|n| name_on(layout, "s", 1, n))
        .find(|c| layout.shard_of_account(c) == layout.shard_of_account(&debit))
        .expect("two names on one shard");
    sim.create_account(plain_account(&debit, AccountFlags::empty()));
    sim.create_account(plain_account(&credit, AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS));
    sim.fsync_all();
    let call = sim.submit(vec![create(&tid, &debit, &credit, 10, usd())], false);
    sim.fsync(0);
    // The try: the debit leg can be held, the credit leg is refused. Before
    // the fix the executor was off by -10 until the cancel came.
    sim.deliver_all(0, 1);
    assert_eq!(sim.ledger(1).net_total(), 0, "executor 1 balances while the cancel is on its way");
    sim.quiesce();
    assert_eq!(sim.answer(call), Err(ErrorCode::ExceedsDebits));
    sim.check_quiescent();
}
