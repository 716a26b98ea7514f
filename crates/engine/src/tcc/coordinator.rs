//! The coordinator's side of TCC: the global transactions this executor
//! started, from their tries to the last acknowledgement.
//!
//! A transaction is durable once the batch that started it is (its input
//! is in the log), and every later step is the effect of a logged input (a
//! peer message, or [`crate::protocol::Input::Deadlines`]), so a replay, or
//! a checkpoint and the log after it, brings it back exactly. What to send
//! again, and when, is not state: it is kept beside the transactions and
//! rebuilt after a restart.
//!
//! A transaction keeps its items and, per part, only how many ops it was
//! sent and what it answered: the ops themselves (tries, commits) are a
//! function of the items and the layout, made again for a resend or a
//! view, so the hot path moves each op into its message instead of
//! keeping a copy.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use peakstack_domain::ledger::{Leg, PendingInfo, ResolveKind};
use peakstack_domain::{Balances, ErrorCode, Id, Side, Transfer, TransferKind, TransferRequest, TransferStatus};

use super::{
    MAX_RESENDS_PER_TICK, MAX_TIMEOUTS_PER_TICK, RESEND_MAX_MS, RESEND_MIN_MS, TXN_COUNTER_BITS, TXN_DEADLINE_MS,
};
use crate::executor::{audit_created, create_record, placeholder, ClientTag, Effects, ExecutorCore};
use crate::layout::Layout;
use crate::parts::PartCommand;
use crate::protocol::{CommitOp, ExecutorId, OpResult, Origin, PeerMsg, TransferOutcome, TryOp, TxnId};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ItemKind {
    Create,
    Resolve {
        pending_id: Id,
        kind: ResolveKind,
    },
    /// Branches of the parts (a trade flow's): each a try command stamped
    /// with the transaction, tried on its part's executor and confirmed
    /// or cancelled there. Its failure is the answer of every item of the
    /// transaction (the code of the branch that refused, not
    /// `linked_event_failed`: a checkout's caller wants to hear `out_of_stock`).
    Branches(Vec<PartCommand>),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Item {
    pub kind: ItemKind,
    /// The record reserved on the id's home (None for an expiry).
    pub record: Option<Transfer>,
    pub static_error: Option<ErrorCode>,
}

/// One participant of a transaction, as its coordinator keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Part {
    pub exec: ExecutorId,
    /// How many try ops it was sent (0: it only settles, at commit).
    pub ops: usize,
    pub tried: Option<Vec<OpResult>>,
    pub acked: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Txn {
    /// The caller waiting for the answer (none in a replay or after a restore).
    pub client: Option<(ClientTag, Vec<usize>)>,
    pub origin: Option<Origin>,
    pub items: Vec<Item>,
    /// By executor.
    pub parts: Vec<Part>,
    /// Set once decided.
    pub decision: Option<bool>,
    /// Cancelled because its deadline passed undecided.
    pub timed_out: bool,
    pub outcomes: Vec<ItemOutcome>,
    /// The balances the acknowledgements brought, in order (a later one
    /// of an account wins).
    pub balances: Vec<(Id, Balances)>,
    pub started_ms: u64,
    pub deadline_ms: u64,
}

impl Txn {
    fn part(&self, exec: ExecutorId) -> Option<&Part> {
        self.parts.iter().find(|p| p.exec == exec)
    }

    fn part_mut(&mut self, exec: ExecutorId) -> Option<&mut Part> {
        self.parts.iter_mut().find(|p| p.exec == exec)
    }

    fn balances_of(&self, account: &Id) -> Option<Balances> {
        self.balances.iter().rev().find(|(id, _)| id == account).map(|(_, b)| *b)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ItemOutcome {
    Ok { pending: Option<PendingInfo> },
    Exists(Transfer),
    Err(ErrorCode),
}

/// The transactions an executor coordinates.
#[derive(Default)]
pub(crate) struct Coordinator {
    pub next_txn: u64,
    pub txns: HashMap<TxnId, Txn>,
    /// (start, transaction) in start order: each comes up for its first
    /// resend (at `resend_cursor`), then for its deadline (at the front).
    started: VecDeque<(u64, TxnId)>,
    resend_cursor: usize,
    /// Which counters of `started` are still open, so that the finished
    /// ones (nearly all) are passed over without a lookup.
    open: OpenBits,
    /// (when, transaction, wait after that): the later resends of the
    /// transactions that needed a first one.
    resends: BinaryHeap<Reverse<(u64, TxnId, u64)>>,
}

impl Coordinator {
    pub fn new(next_txn: u64) -> Coordinator {
        Coordinator { next_txn, ..Coordinator::default() }
    }

    fn schedule(&mut self, txn: TxnId, started_ms: u64) {
        self.started.push_back((started_ms, txn));
        self.open.set(super::counter_of(txn));
    }

    /// The transactions in id order (a checkpoint, the resend after a replay).
    pub fn sorted(&self) -> Vec<(TxnId, &Txn)> {
        let mut txns: Vec<(TxnId, &Txn)> = self.txns.iter().map(|(id, t)| (*id, t)).collect();
        txns.sort_unstable_by_key(|(id, _)| *id);
        txns
    }

    /// After a restore: every transaction comes up for a resend at once.
    pub fn reschedule(&mut self, now_ms: u64) {
        let mut txns: Vec<(u64, TxnId)> = self.txns.iter().map(|(id, t)| (t.started_ms, *id)).collect();
        txns.sort_unstable();
        for (started_ms, txn) in txns {
            self.schedule(txn, started_ms);
            self.resends.push(Reverse((now_ms, txn, RESEND_MIN_MS)));
        }
        self.resend_cursor = self.started.len();
    }
}

/// Transaction counters still open, one bit each from `base` (a multiple
/// of 64). Counters only grow, and only the window from the oldest
/// transaction not past its deadline is kept.
#[derive(Default)]
struct OpenBits {
    base: u64,
    words: VecDeque<u64>,
}

impl OpenBits {
    fn set(&mut self, counter: u64) {
        if self.words.is_empty() {
            self.base = counter - counter % 64;
        }
        let Some(offset) = counter.checked_sub(self.base) else { return };
        let word = (offset / 64) as usize;
        while self.words.len() <= word {
            self.words.push_back(0);
        }
        self.words[word] |= 1 << (offset % 64);
    }

    fn clear(&mut self, counter: u64) {
        if let Some(offset) = counter.checked_sub(self.base) {
            if let Some(word) = self.words.get_mut((offset / 64) as usize) {
                *word &= !(1 << (offset % 64));
            }
        }
    }

    fn contains(&self, counter: u64) -> bool {
        let Some(offset) = counter.checked_sub(self.base) else { return false };
        self.words.get((offset / 64) as usize).is_some_and(|word| word >> (offset % 64) & 1 == 1)
    }

    /// Forgets the counters below `counter` (none of them is asked for again).
    fn trim_below(&mut self, counter: Option<u64>) {
        let Some(counter) = counter else { return self.words.clear() };
        while !self.words.is_empty() && self.base + 64 <= counter {
            self.words.pop_front();
            self.base += 64;
        }
    }
}

/// How a transaction stands, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnState {
    /// Phase one: tries sent, not every part has answered.
    Trying,
    Committing,
    Cancelling,
    /// Finished and forgotten by its coordinator.
    Done,
}

impl TxnState {
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Trying => "trying",
            TxnState::Committing => "committing",
            TxnState::Cancelling => "cancelling",
            TxnState::Done => "done",
        }
    }
}

/// A transaction as [`ExecutorCore::transaction`] answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnView {
    pub id: TxnId,
    pub state: TxnState,
    /// Unknown once done (the coordinator keeps nothing of it then).
    pub started_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    /// Cancelled at its deadline.
    pub timed_out: bool,
    pub branches: Vec<BranchView>,
}

/// One participant's branch of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchView {
    pub executor: ExecutorId,
    /// Its try operations in short form (`reserve t1`, `hold debit a1 10 USD`).
    pub operations: Vec<String>,
    /// `waiting` (for its answer to the try, or to the decision), `tried`,
    /// `confirmed`, `cancelled`, or `suspended` (cancelled before its try
    /// answered).
    pub state: &'static str,
}

/// Which transactions a listing shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnFilter {
    /// Every transaction not finished yet.
    InFlight,
    /// Those still unfinished at their deadline.
    Stuck,
}

impl ExecutorCore {
    pub(crate) fn build_item(&self, request: &TransferRequest, now_ms: u64) -> Item {
        match request {
            TransferRequest::Create { .. } => {
                let (record, static_error) = create_record(request, now_ms);
                Item { kind: ItemKind::Create, record: Some(record), static_error }
            }
            TransferRequest::Post { id, pending_id, amount, details } => {
                let kind = ResolveKind::Post(amount.map(|a| a.get()));
                let record = placeholder(
                    id,
                    TransferKind::Post { pending_id: pending_id.clone(), requested: amount.map(|a| a.get()) },
                    details,
                    now_ms,
                );
                resolve_item(id, pending_id, kind, record)
            }
            TransferRequest::Void { id, pending_id, details } => {
                let record = placeholder(id, TransferKind::Void { pending_id: pending_id.clone() }, details, now_ms);
                resolve_item(id, pending_id, ResolveKind::Void, record)
            }
        }
    }

    pub(crate) fn expiry_item(pending_id: &Id) -> Item {
        Item {
            kind: ItemKind::Resolve { pending_id: pending_id.clone(), kind: ResolveKind::Expire },
            record: None,
            static_error: None,
        }
    }

    pub(crate) fn start_txn(
        &mut self,
        items: Vec<Item>,
        client: Option<(ClientTag, Vec<usize>)>,
        origin: Option<Origin>,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let txn = self.take_txn_id();
        let mut items = items;
        let deadline_ms = now_ms.saturating_add(TXN_DEADLINE_MS);
        for item in &mut items {
            if let ItemKind::Branches(branches) = &mut item.kind {
                // A part holds what a branch took until the decision comes
                // (a confirm decided before the deadline may arrive long
                // after it), as the ledger holds its legs; this executor's
                // fences answer repeats, so the parts keep none once decided.
                branches.iter_mut().for_each(|b| b.stamp_branch(txn, peakstack_domain::HELD_UNTIL_DECIDED));
            }
        }
        let ops = try_ops_by_executor(&self.layout, &items);
        let parts = ops.iter().map(|(exec, ops)| Part { exec: *exec, ops: ops.len(), tried: None, acked: false });
        let mut state = Txn {
            client,
            origin,
            items,
            parts: parts.collect(),
            decision: None,
            timed_out: false,
            outcomes: Vec::new(),
            balances: Vec::new(),
            started_ms: now_ms,
            deadline_ms,
        };
        let id = self.id;
        for (exec, ops) in ops {
            if exec == id {
                // Local part: tried now, in this batch.
                let results = self.on_try(txn, &ops, deadline_ms, now_ms);
                state.part_mut(id).expect("a part per executor").tried = Some(results);
            } else {
                fx.outbox.push((exec, PeerMsg::Try { txn, ops, deadline_ms }));
            }
        }
        self.coordinator.txns.insert(txn, state);
        self.maybe_decide(txn, now_ms, fx);
        if self.coordinator.txns.contains_key(&txn) {
            self.coordinator.schedule(txn, now_ms);
        }
    }

    /// A new transaction id: this executor's id over its counter. A
    /// counter that reached the executor bits would make ids of another
    /// coordinator, or repeat old ones: stop instead.
    pub(crate) fn take_txn_id(&mut self) -> TxnId {
        let counter = self.coordinator.next_txn;
        assert!(counter < 1 << TXN_COUNTER_BITS, "executor {}: the transaction id counter is exhausted", self.id);
        self.coordinator.next_txn = counter + 1;
        (u64::from(self.id) << TXN_COUNTER_BITS) | counter
    }

    pub(crate) fn on_tried(
        &mut self,
        from: ExecutorId,
        txn: TxnId,
        results: &[OpResult],
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let Some(state) = self.coordinator.txns.get_mut(&txn) else { return };
        if let Some(part) = state.part_mut(from) {
            if part.tried.is_none() && results.len() == part.ops {
                part.tried = Some(results.to_vec());
            }
        }
        self.maybe_decide(txn, now_ms, fx);
    }

    fn maybe_decide(&mut self, txn: TxnId, now_ms: u64, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get_mut(&txn) else { return };
        if state.decision.is_some() || state.parts.iter().any(|p| p.tried.is_none()) {
            return;
        }
        // Never a commit at or after the deadline: participants refuse a
        // try from then on, so the answer must not depend on which came first.
        if now_ms >= state.deadline_ms {
            return self.time_out(txn, now_ms, fx);
        }
        state.outcomes = outcomes_of(&self.layout, &state.items, &state.parts);
        let commit = state.outcomes.iter().all(|o| matches!(o, ItemOutcome::Ok { .. }));
        self.decide(txn, commit, now_ms, fx);
    }

    /// Cancels an undecided transaction whose deadline passed: every item
    /// is answered `transaction_timed_out` (nothing of it is done) at once,
    /// without waiting for the acknowledgements (a part that never answered
    /// may never), which only clean up.
    fn time_out(&mut self, txn: TxnId, now_ms: u64, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get_mut(&txn) else { return };
        if state.decision.is_some() {
            return;
        }
        state.timed_out = true;
        state.outcomes = state.items.iter().map(|_| ItemOutcome::Err(ErrorCode::TransactionTimedOut)).collect();
        if let Some((tag, indices)) = state.client.take() {
            for index in indices {
                fx.finish(tag, index, Err(ErrorCode::TransactionTimedOut));
            }
        }
        self.decide(txn, false, now_ms, fx);
    }

    /// The transactions of an [`crate::protocol::Input::Deadlines`]:
    /// cancelled if still undecided.
    pub(crate) fn on_deadlines(&mut self, txns: &[TxnId], now_ms: u64, fx: &mut Effects) {
        for &txn in txns {
            self.time_out(txn, now_ms, fx);
        }
    }

    /// Records the decision (the outcomes are set) and sends it: the commit
    /// ops of each part (a part that only settles joins now), or the cancel.
    fn decide(&mut self, txn: TxnId, commit: bool, now_ms: u64, fx: &mut Effects) {
        let state = self.coordinator.txns.get_mut(&txn).expect("deciding a transaction in flight");
        state.decision = Some(commit);
        let deadline_ms = state.deadline_ms;
        let sends = match commit {
            true => commit_ops_by_executor(&self.layout, &state.items, &state.outcomes),
            false => Vec::new(),
        };
        for (exec, _) in &sends {
            if state.part(*exec).is_none() {
                let at = state.parts.partition_point(|p| p.exec < *exec);
                state.parts.insert(at, Part { exec: *exec, ops: 0, tried: None, acked: false });
            }
        }
        let mut sends = sends.into_iter().peekable();
        let execs: Vec<ExecutorId> = state.parts.iter().map(|p| p.exec).collect();
        for exec in execs {
            let ops = match sends.peek() {
                Some((e, _)) if *e == exec => sends.next().expect("peeked").1,
                _ => Vec::new(),
            };
            if exec == self.id {
                let balances = self.on_decide(txn, commit, &ops, deadline_ms, now_ms, fx);
                self.on_acked(txn, exec, balances, fx);
            } else {
                fx.outbox.push((exec, PeerMsg::Decide { txn, commit, ops, deadline_ms }));
            }
        }
        // A transaction with no parts at all (refused before any op) ends here.
        self.maybe_finish(txn, fx);
    }

    pub(crate) fn on_acked(&mut self, txn: TxnId, from: ExecutorId, balances: Vec<(Id, Balances)>, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get_mut(&txn) else { return };
        let decided = state.decision.is_some();
        let Some(part) = state.part_mut(from) else { return };
        if part.acked || !decided {
            return;
        }
        part.acked = true;
        if state.balances.is_empty() {
            state.balances = balances;
        } else {
            state.balances.extend(balances);
        }
        if state.parts.iter().all(|p| p.acked) {
            self.finish(txn, fx);
        }
    }

    fn maybe_finish(&mut self, txn: TxnId, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get(&txn) else { return };
        if state.decision.is_some() && state.parts.iter().all(|p| p.acked) {
            self.finish(txn, fx);
        }
    }

    /// Every part acknowledged the decision: forget it, audit and answer.
    fn finish(&mut self, txn: TxnId, fx: &mut Effects) {
        let mut state = self.coordinator.txns.remove(&txn).expect("present");
        self.coordinator.open.clear(super::counter_of(txn));
        self.fences.drop_live(txn);
        for part in &state.parts {
            if part.exec != self.id {
                fx.outbox.push((part.exec, PeerMsg::Forget { txn }));
            }
        }
        let first_error = state.outcomes.iter().find_map(|o| match o {
            ItemOutcome::Err(e) => Some(*e),
            _ => None,
        });
        let branch_error = state.items.iter().zip(&state.outcomes).find_map(|(item, outcome)| match outcome {
            ItemOutcome::Err(e) if matches!(item.kind, ItemKind::Branches(_)) => Some(*e),
            _ => None,
        });
        let committed = first_error.is_none() && state.decision == Some(true);
        if let (Some(origin), true) = (&state.origin, committed) {
            for (item, outcome) in state.items.iter().zip(&state.outcomes) {
                if let ItemOutcome::Ok { pending } = outcome {
                    if let Some(transfer) = final_record(item, pending.as_ref()) {
                        let answered = (
                            state.balances_of(&transfer.debit_account_id),
                            state.balances_of(&transfer.credit_account_id),
                        );
                        audit_created(origin, transfer, answered, fx);
                    }
                }
            }
        }
        let Some((tag, indices)) = state.client.take() else { return };
        for ((item, outcome), index) in state.items.iter().zip(&state.outcomes).zip(indices) {
            let result = match outcome {
                ItemOutcome::Exists(t) => Ok(TransferOutcome {
                    created: false,
                    transfer: t.clone(),
                    debit_balances: None,
                    credit_balances: None,
                }),
                ItemOutcome::Err(e) => Err(*e),
                ItemOutcome::Ok { .. } if first_error.is_some() || state.decision == Some(false) => {
                    Err(branch_error.unwrap_or(ErrorCode::LinkedEventFailed))
                }
                ItemOutcome::Ok { pending } => {
                    let transfer = final_record(item, pending.as_ref()).expect("a client item has a record");
                    Ok(TransferOutcome {
                        created: true,
                        debit_balances: state.balances_of(&transfer.debit_account_id),
                        credit_balances: state.balances_of(&transfer.credit_account_id),
                        transfer,
                    })
                }
            };
            fx.finish(tag, index, result);
        }
    }

    // ---- the tick ---------------------------------------------------------

    /// What the coordinator does between batches: the transactions whose
    /// deadline passed undecided (to apply and log as
    /// [`crate::protocol::Input::Deadlines`]), and the messages of the
    /// others sent again where a part has not answered (into `fx.outbox`,
    /// to leave with the next batch), each transaction backing off. Bounded
    /// per call; a transaction that finished costs a bit test, not a lookup.
    pub(crate) fn coordinator_tick(&mut self, now_ms: u64, fx: &mut Effects) -> Vec<TxnId> {
        let (me, layout) = (self.id, &self.layout);
        let c = &mut self.coordinator;
        let mut resent = 0;
        // First resends, in start order.
        while let Some(&(started_ms, txn)) = c.started.get(c.resend_cursor) {
            if started_ms.saturating_add(RESEND_MIN_MS) > now_ms || resent >= MAX_RESENDS_PER_TICK {
                break;
            }
            c.resend_cursor += 1;
            if !c.open.contains(super::counter_of(txn)) {
                continue;
            }
            if let Some(state) = c.txns.get(&txn) {
                resent += 1;
                resend_of(layout, me, txn, state, now_ms, &mut fx.outbox);
                c.resends.push(Reverse((now_ms.saturating_add(2 * RESEND_MIN_MS), txn, 2 * RESEND_MIN_MS)));
            }
        }
        // Deadlines, in start order, once a transaction's first resend came up.
        let mut due = Vec::new();
        while let Some(&(started_ms, txn)) = c.started.front() {
            let at_deadline = started_ms.saturating_add(TXN_DEADLINE_MS) <= now_ms;
            if !at_deadline || c.resend_cursor == 0 || due.len() >= MAX_TIMEOUTS_PER_TICK {
                break;
            }
            c.started.pop_front();
            c.resend_cursor -= 1;
            let counter = super::counter_of(txn);
            if c.open.contains(counter) {
                c.open.clear(counter);
                if c.txns.get(&txn).is_some_and(|t| t.decision.is_none() && t.deadline_ms <= now_ms) {
                    due.push(txn);
                }
            }
        }
        let oldest = c.started.front().map(|(_, txn)| super::counter_of(*txn));
        c.open.trim_below(oldest);
        // Later resends, backing off.
        while resent < MAX_RESENDS_PER_TICK {
            let Some(&Reverse((at_ms, txn, wait_ms))) = c.resends.peek() else { break };
            if at_ms > now_ms {
                break;
            }
            c.resends.pop();
            let Some(state) = c.txns.get(&txn) else { continue };
            resent += 1;
            resend_of(layout, me, txn, state, now_ms, &mut fx.outbox);
            let wait_ms = (wait_ms * 2).min(RESEND_MAX_MS);
            c.resends.push(Reverse((now_ms.saturating_add(wait_ms), txn, wait_ms)));
        }
        due
    }

    /// After a replay: the messages of unfinished transactions, sent again.
    /// Participants answer repeats from their fences.
    pub fn resend(&self) -> Vec<(ExecutorId, PeerMsg)> {
        let mut out = Vec::new();
        // In transaction order, so that a replay resends the same messages
        // in the same order.
        for (txn, state) in self.coordinator.sorted() {
            resend_of(&self.layout, self.id, txn, state, 0, &mut out);
        }
        out
    }

    // ---- reads ------------------------------------------------------------

    /// One transaction this executor coordinates; `done` for one it
    /// finished, `None` for an id it never gave.
    pub fn transaction(&self, txn: TxnId) -> Option<TxnView> {
        if let Some(state) = self.coordinator.txns.get(&txn) {
            return Some(view_of(&self.layout, txn, state));
        }
        let counter = super::counter_of(txn);
        let given = super::coordinator_of(txn) == self.id && counter > 0 && counter < self.coordinator.next_txn;
        given.then_some(TxnView {
            id: txn,
            state: TxnState::Done,
            started_ms: None,
            deadline_ms: None,
            timed_out: false,
            branches: Vec::new(),
        })
    }

    /// Unfinished transactions in id order after `after`, at most `limit`.
    pub fn transactions(&self, filter: TxnFilter, after: Option<TxnId>, limit: usize, now_ms: u64) -> Vec<TxnView> {
        let mut ids: Vec<TxnId> = self
            .coordinator
            .txns
            .iter()
            .filter(|(id, state)| {
                after.is_none_or(|after| **id > after) && (filter == TxnFilter::InFlight || now_ms >= state.deadline_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.truncate(limit);
        ids.into_iter().map(|id| view_of(&self.layout, id, &self.coordinator.txns[&id])).collect()
    }
}

/// What `txn` still needs sent: its try to the parts that have not
/// answered (until its deadline: then it is being cancelled), or its
/// decision to those that have not acknowledged.
fn resend_of(
    layout: &Layout,
    me: ExecutorId,
    txn: TxnId,
    state: &Txn,
    now_ms: u64,
    out: &mut Vec<(ExecutorId, PeerMsg)>,
) {
    let deadline_ms = state.deadline_ms;
    for part in &state.parts {
        if part.exec == me {
            continue;
        }
        match state.decision {
            None if part.tried.is_none() && now_ms < deadline_ms => {
                let ops = try_ops_for(layout, &state.items, part.exec);
                out.push((part.exec, PeerMsg::Try { txn, ops, deadline_ms }))
            }
            Some(commit) if !part.acked => {
                let ops = match commit {
                    true => commit_ops_for(layout, &state.items, &state.outcomes, part.exec),
                    false => Vec::new(),
                };
                out.push((part.exec, PeerMsg::Decide { txn, commit, ops, deadline_ms }))
            }
            _ => {}
        }
    }
}

fn view_of(layout: &Layout, txn: TxnId, state: &Txn) -> TxnView {
    let state_name = match state.decision {
        None => TxnState::Trying,
        Some(true) => TxnState::Committing,
        Some(false) => TxnState::Cancelling,
    };
    let branches = state
        .parts
        .iter()
        .map(|part| BranchView {
            executor: part.exec,
            operations: try_ops_for(layout, &state.items, part.exec).iter().map(short_form).collect(),
            state: match (state.decision, part.tried.is_some(), part.acked) {
                (None, true, _) => "tried",
                (_, _, false) => "waiting",
                (Some(true), _, true) => "confirmed",
                (Some(false), true, true) => "cancelled",
                (Some(false), false, true) => "suspended",
                (None, false, true) => "waiting",
            },
        })
        .collect();
    TxnView {
        id: txn,
        state: state_name,
        started_ms: Some(state.started_ms),
        deadline_ms: Some(state.deadline_ms),
        timed_out: state.timed_out,
        branches,
    }
}

fn short_form(op: &TryOp) -> String {
    let side = |side: Side| match side {
        Side::Debit => "debit",
        Side::Credit => "credit",
    };
    match op {
        TryOp::Reserve(t) => format!("reserve {}", t.id),
        TryOp::Hold(leg) => format!("hold {} {} {} {}", side(leg.side), leg.account_id, leg.amount, leg.currency),
        TryOp::Part(command) => command.short_form(),
        TryOp::LockPending { pending_id, kind } => {
            let kind = match kind {
                ResolveKind::Post(_) => "post",
                ResolveKind::Void => "void",
                ResolveKind::Expire => "expiry",
            };
            format!("lock {pending_id} for {kind}")
        }
    }
}

fn resolve_item(id: &Id, pending_id: &Id, kind: ResolveKind, record: Transfer) -> Item {
    let static_error = (id.is_reserved() || pending_id.is_reserved()).then_some(ErrorCode::InvalidRequest);
    Item { kind: ItemKind::Resolve { pending_id: pending_id.clone(), kind }, record: Some(record), static_error }
}

/// The try ops of a transaction's items grouped by executor (in executor
/// order, each in item order): none when any item is refused before its
/// tries.
fn try_ops_by_executor(layout: &Layout, items: &[Item]) -> Vec<(ExecutorId, Vec<TryOp>)> {
    let mut by: Vec<(ExecutorId, Vec<TryOp>)> = Vec::new();
    if items.iter().any(|i| i.static_error.is_some()) {
        return by;
    }
    for item in items {
        for_each_try_op(layout, item, |exec, op| match by.binary_search_by_key(&exec, |(e, _)| *e) {
            Ok(at) => by[at].1.push(op()),
            Err(at) => by.insert(at, (exec, vec![op()])),
        });
    }
    by
}

/// The try ops one executor was sent.
fn try_ops_for(layout: &Layout, items: &[Item], exec: ExecutorId) -> Vec<TryOp> {
    let mut ops = Vec::new();
    if items.iter().all(|i| i.static_error.is_none()) {
        for item in items {
            for_each_try_op(layout, item, |e, op| {
                if e == exec {
                    ops.push(op());
                }
            });
        }
    }
    ops
}

/// Calls `each(executor, make_op)` for an item's try ops in order; the op
/// is made (its record or leg copied) only if asked for.
fn for_each_try_op(layout: &Layout, item: &Item, mut each: impl FnMut(ExecutorId, &dyn Fn() -> TryOp)) {
    let record = item.record.as_ref();
    match &item.kind {
        ItemKind::Create => {
            let t = record.expect("a create has a record");
            let debit_shard = layout.shard_of_account(&t.debit_account_id);
            let credit_shard = layout.shard_of_account(&t.credit_account_id);
            let via_clearing = debit_shard != credit_shard;
            let pending = t.status == TransferStatus::Pending;
            let leg = |side, account_id: &Id| Leg {
                transfer_id: t.id.clone(),
                side,
                account_id: account_id.clone(),
                currency: t.currency,
                amount: t.amount,
                via_clearing,
                pending,
            };
            each(layout.executor_of_transfer(&t.id), &|| TryOp::Reserve(t.clone()));
            each(layout.executor_of_shard(debit_shard), &|| TryOp::Hold(leg(Side::Debit, &t.debit_account_id)));
            each(layout.executor_of_shard(credit_shard), &|| TryOp::Hold(leg(Side::Credit, &t.credit_account_id)));
        }
        ItemKind::Resolve { pending_id, kind } => {
            if let Some(t) = record {
                each(layout.executor_of_transfer(&t.id), &|| TryOp::Reserve(t.clone()));
            }
            each(layout.executor_of_transfer(pending_id), &|| TryOp::LockPending {
                pending_id: pending_id.clone(),
                kind: *kind,
            });
        }
        ItemKind::Branches(branches) => {
            for branch in branches {
                each(branch.branch_executor(layout), &|| TryOp::Part(branch.clone()));
            }
        }
    }
}

/// Each item's outcome from the parts' answers to their tries.
fn outcomes_of(layout: &Layout, items: &[Item], parts: &[Part]) -> Vec<ItemOutcome> {
    let tried = items.iter().all(|i| i.static_error.is_none());
    // The next op of each part, as the items' ops were dealt out (on the
    // stack for the usual few parts).
    let mut few = [0usize; 8];
    let mut many = Vec::new();
    let next: &mut [usize] = match parts.len() {
        n if n <= few.len() => &mut few[..n],
        n => {
            many.resize(n, 0);
            &mut many
        }
    };
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let mut error = item.static_error;
        let mut pending = None;
        let mut exists = None;
        if tried {
            for_each_try_op(layout, item, |exec, _| {
                let at = parts.iter().position(|p| p.exec == exec).expect("a part per executor tried");
                let result = &parts[at].tried.as_ref().expect("decided after every try")[next[at]];
                next[at] += 1;
                match result {
                    OpResult::Ok => {}
                    OpResult::Exists(t) => exists = exists.take().or_else(|| Some(t.clone())),
                    OpResult::Pending(info) => pending = Some(info.clone()),
                    OpResult::Err(e) => error = Some(error.map_or(*e, |prev: ErrorCode| prev.first_of(*e))),
                }
            });
        }
        outcomes.push(match (exists, error) {
            (Some(t), _) => ItemOutcome::Exists(t),
            (None, Some(e)) => ItemOutcome::Err(e),
            (None, None) => ItemOutcome::Ok { pending },
        });
    }
    outcomes
}

fn post_amount(kind: ResolveKind, info: &PendingInfo) -> u64 {
    match kind {
        ResolveKind::Post(amount) => amount.unwrap_or(info.amount),
        ResolveKind::Void | ResolveKind::Expire => 0,
    }
}

/// The record a committed item leaves on its home shard.
fn final_record(item: &Item, pending: Option<&PendingInfo>) -> Option<Transfer> {
    let record = item.record.as_ref()?;
    match (&item.kind, pending) {
        (ItemKind::Resolve { kind, .. }, Some(info)) => {
            let posted = post_amount(*kind, info);
            Some(Transfer {
                debit_account_id: info.debit_account_id.clone(),
                credit_account_id: info.credit_account_id.clone(),
                amount: if posted > 0 { posted } else { info.amount },
                currency: info.currency,
                status: if posted > 0 { TransferStatus::Posted } else { TransferStatus::Voided },
                ..record.clone()
            })
        }
        _ => Some(record.clone()),
    }
}

/// A committed transaction's ops grouped by executor (in executor order,
/// each in item order).
fn commit_ops_by_executor(
    layout: &Layout,
    items: &[Item],
    outcomes: &[ItemOutcome],
) -> Vec<(ExecutorId, Vec<CommitOp>)> {
    let mut by: Vec<(ExecutorId, Vec<CommitOp>)> = Vec::new();
    for (item, outcome) in items.iter().zip(outcomes) {
        let ItemOutcome::Ok { pending } = outcome else { unreachable!("a commit has every item ok") };
        commit_ops_of(layout, item, pending.as_ref(), |exec, op| match by.binary_search_by_key(&exec, |(e, _)| *e) {
            Ok(at) => by[at].1.push(op),
            Err(at) => by.insert(at, (exec, vec![op])),
        });
    }
    by
}

/// The commit ops one executor was sent.
fn commit_ops_for(layout: &Layout, items: &[Item], outcomes: &[ItemOutcome], exec: ExecutorId) -> Vec<CommitOp> {
    commit_ops_by_executor(layout, items, outcomes)
        .into_iter()
        .find(|(e, _)| *e == exec)
        .map_or(Vec::new(), |(_, ops)| ops)
}

/// Calls `each(executor, op)` for an item's commit ops in order.
fn commit_ops_of(
    layout: &Layout,
    item: &Item,
    pending: Option<&PendingInfo>,
    mut each: impl FnMut(ExecutorId, CommitOp),
) {
    match &item.kind {
        ItemKind::Create => {
            let t = item.record.as_ref().expect("a create has a record");
            each(layout.executor_of_transfer(&t.id), CommitOp::CommitReservation { id: t.id.clone(), filled: None });
            for (side, account_id) in [(Side::Debit, &t.debit_account_id), (Side::Credit, &t.credit_account_id)] {
                each(
                    layout.executor_of_account(account_id),
                    CommitOp::CommitHold { transfer_id: t.id.clone(), side, account_id: account_id.clone() },
                );
            }
        }
        ItemKind::Resolve { pending_id, kind } => {
            let info = pending.expect("a locked pending transfer answers its info");
            let amount = post_amount(*kind, info);
            let by = item.record.as_ref().map(|t| t.id.clone());
            if let Some(t) = &item.record {
                each(
                    layout.executor_of_transfer(&t.id),
                    CommitOp::CommitReservation { id: t.id.clone(), filled: final_record(item, pending) },
                );
            }
            each(
                layout.executor_of_transfer(pending_id),
                CommitOp::FinishPending { pending_id: pending_id.clone(), kind: *kind },
            );
            for (side, account_id) in [(Side::Debit, &info.debit_account_id), (Side::Credit, &info.credit_account_id)] {
                each(
                    layout.executor_of_account(account_id),
                    CommitOp::Settle { pending_id: pending_id.clone(), side, post_amount: amount, by: by.clone() },
                );
            }
        }
        ItemKind::Branches(branches) => {
            for branch in branches {
                each(branch.branch_executor(layout), CommitOp::Part(branch.branch_confirm()));
            }
        }
    }
}
