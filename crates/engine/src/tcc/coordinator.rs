//! The coordinator's side of TCC: the global transactions this executor
//! started, from their tries to the last acknowledgement.
//!
//! A transaction is durable once the batch that started it is (its input
//! is in the log), and every later step is the effect of a logged input (a
//! peer message, or [`crate::protocol::Input::Deadlines`]), so a replay, or a checkpoint and
//! the log after it, brings it back exactly. What to send again, and when,
//! is not state: it is kept beside the transactions and rebuilt after a
//! restart.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use peakstack_domain::ledger::{Leg, PendingInfo, ResolveKind};
use peakstack_domain::{Balances, ErrorCode, Id, Side, Transfer, TransferKind, TransferRequest, TransferStatus};

use super::{
    MAX_RESENDS_PER_TICK, MAX_TIMEOUTS_PER_TICK, RESEND_MAX_MS, RESEND_MIN_MS, TXN_COUNTER_BITS, TXN_DEADLINE_MS,
};
use crate::codec::{Codec, CodecError, Reader, Writer};
use crate::executor::{audit_created, create_record, placeholder, ClientTag, Effects, ExecutorCore};
use crate::layout::Layout;
use crate::protocol::{CommitOp, ExecutorId, IdempotencyTag, OpResult, Origin, PeerMsg, TransferOutcome, TryOp, TxnId};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ItemKind {
    Create,
    Resolve { pending_id: Id, kind: ResolveKind },
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Item {
    pub kind: ItemKind,
    /// The record reserved on the id's home (None for an expiry).
    pub record: Option<Transfer>,
    /// Where this item's try ops went: (executor, index in that part's ops).
    pub op_refs: Vec<(ExecutorId, usize)>,
    pub static_error: Option<ErrorCode>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Part {
    try_ops: Vec<TryOp>,
    tried: Option<Vec<OpResult>>,
    commit_ops: Vec<CommitOp>,
    acked: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Txn {
    /// The caller waiting for the answer (none in a replay or after a restore).
    client: Option<(ClientTag, Vec<usize>)>,
    origin: Option<Origin>,
    items: Vec<Item>,
    parts: BTreeMap<ExecutorId, Part>,
    /// Set once decided.
    decision: Option<bool>,
    /// Cancelled because its deadline passed undecided.
    timed_out: bool,
    outcomes: Vec<ItemOutcome>,
    balances: HashMap<Id, Balances>,
    started_ms: u64,
    deadline_ms: u64,
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
    /// Undecided transactions by deadline, in start order (so sorted);
    /// decided ones are skipped when they come up.
    deadlines: VecDeque<(u64, TxnId)>,
    /// (when, transaction, wait after that): its next resend.
    resends: BinaryHeap<Reverse<(u64, TxnId, u64)>>,
}

impl Coordinator {
    pub fn new(next_txn: u64) -> Coordinator {
        Coordinator { next_txn, ..Coordinator::default() }
    }

    fn schedule(&mut self, txn: TxnId, deadline_ms: u64, now_ms: u64) {
        self.deadlines.push_back((deadline_ms, txn));
        self.resends.push(Reverse((now_ms.saturating_add(RESEND_MIN_MS), txn, RESEND_MIN_MS)));
    }

    /// The transactions in id order (a checkpoint, the resend after a replay).
    fn sorted(&self) -> Vec<(TxnId, &Txn)> {
        let mut txns: Vec<(TxnId, &Txn)> = self.txns.iter().map(|(id, t)| (*id, t)).collect();
        txns.sort_unstable_by_key(|(id, _)| *id);
        txns
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
                Item { kind: ItemKind::Create, record: Some(record), op_refs: Vec::new(), static_error }
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
            op_refs: Vec::new(),
            static_error: None,
        }
    }

    pub(crate) fn start_txn(
        &mut self,
        mut items: Vec<Item>,
        client: Option<(ClientTag, Vec<usize>)>,
        origin: Option<Origin>,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let txn = self.take_txn_id();
        let mut parts: BTreeMap<ExecutorId, Part> = BTreeMap::new();
        let any_static_error = items.iter().any(|i| i.static_error.is_some());
        if !any_static_error {
            for item in &mut items {
                for (exec, op) in try_ops_of(&self.layout, item) {
                    let part = parts.entry(exec).or_default();
                    item.op_refs.push((exec, part.try_ops.len()));
                    part.try_ops.push(op);
                }
            }
        }
        let deadline_ms = now_ms.saturating_add(TXN_DEADLINE_MS);
        let mut state = Txn {
            client,
            origin,
            items,
            parts,
            decision: None,
            timed_out: false,
            outcomes: Vec::new(),
            balances: HashMap::default(),
            started_ms: now_ms,
            deadline_ms,
        };
        // Local part: tried now, in this batch.
        let id = self.id;
        if let Some(part) = state.parts.get(&id) {
            let results = self.on_try(txn, &part.try_ops, deadline_ms, now_ms);
            state.parts.get_mut(&id).expect("present").tried = Some(results);
        }
        for (&exec, part) in &state.parts {
            if exec != id {
                fx.outbox.push((exec, PeerMsg::Try { txn, ops: part.try_ops.clone(), deadline_ms }));
            }
        }
        self.coordinator.txns.insert(txn, state);
        self.maybe_decide(txn, now_ms, fx);
        if self.coordinator.txns.contains_key(&txn) {
            self.coordinator.schedule(txn, deadline_ms, now_ms);
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
        if let Some(part) = self.coordinator.txns.get_mut(&txn).and_then(|s| s.parts.get_mut(&from)) {
            if part.tried.is_none() && results.len() == part.try_ops.len() {
                part.tried = Some(results.to_vec());
            }
        }
        self.maybe_decide(txn, now_ms, fx);
    }

    fn maybe_decide(&mut self, txn: TxnId, now_ms: u64, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get_mut(&txn) else { return };
        if state.decision.is_some() || state.parts.values().any(|p| p.tried.is_none()) {
            return;
        }
        // Never a commit at or after the deadline: participants refuse a
        // try from then on, so the answer must not depend on which came first.
        if now_ms >= state.deadline_ms {
            return self.time_out(txn, now_ms, fx);
        }
        let outcomes: Vec<ItemOutcome> = state.items.iter().map(|item| outcome_of(item, &state.parts)).collect();
        let commit = outcomes.iter().all(|o| matches!(o, ItemOutcome::Ok { .. }));
        if commit {
            let mut commit_ops: Vec<(ExecutorId, CommitOp)> = Vec::new();
            for (item, outcome) in state.items.iter().zip(&outcomes) {
                let ItemOutcome::Ok { pending } = outcome else { unreachable!("all ok") };
                commit_ops.extend(commit_ops_of(&self.layout, item, pending.as_ref()));
            }
            for (exec, op) in commit_ops {
                state.parts.entry(exec).or_default().commit_ops.push(op);
            }
        }
        state.outcomes = outcomes;
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
        let client = state.client.take();
        if let Some((tag, indices)) = client {
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

    fn decide(&mut self, txn: TxnId, commit: bool, now_ms: u64, fx: &mut Effects) {
        let state = self.coordinator.txns.get_mut(&txn).expect("deciding a transaction in flight");
        state.decision = Some(commit);
        let deadline_ms = state.deadline_ms;
        let sends: Vec<(ExecutorId, Vec<CommitOp>)> =
            state.parts.iter().map(|(&exec, part)| (exec, part.commit_ops.clone())).collect();
        for (exec, ops) in sends {
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
        let Some(part) = state.parts.get_mut(&from) else { return };
        if part.acked || state.decision.is_none() {
            return;
        }
        part.acked = true;
        state.balances.extend(balances);
        self.maybe_finish(txn, fx);
    }

    fn maybe_finish(&mut self, txn: TxnId, fx: &mut Effects) {
        let Some(state) = self.coordinator.txns.get(&txn) else { return };
        if state.decision.is_none() || state.parts.values().any(|p| !p.acked) {
            return;
        }
        let state = self.coordinator.txns.remove(&txn).expect("present");
        self.fences.drop_live(txn);
        for &exec in state.parts.keys() {
            if exec != self.id {
                fx.outbox.push((exec, PeerMsg::Forget { txn }));
            }
        }
        let first_error = state.outcomes.iter().find_map(|o| match o {
            ItemOutcome::Err(e) => Some(*e),
            _ => None,
        });
        let committed = first_error.is_none() && state.decision == Some(true);
        if let (Some(origin), true) = (&state.origin, committed) {
            for (item, outcome) in state.items.iter().zip(&state.outcomes) {
                if let ItemOutcome::Ok { pending } = outcome {
                    if let Some(transfer) = final_record(item, pending.as_ref()) {
                        let answered = (
                            state.balances.get(&transfer.debit_account_id).copied(),
                            state.balances.get(&transfer.credit_account_id).copied(),
                        );
                        audit_created(origin, transfer, answered, fx);
                    }
                }
            }
        }
        let Some((tag, indices)) = state.client else { return };
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
                    Err(ErrorCode::LinkedEventFailed)
                }
                ItemOutcome::Ok { pending } => {
                    let transfer = final_record(item, pending.as_ref()).expect("a client item has a record");
                    Ok(TransferOutcome {
                        created: true,
                        debit_balances: state.balances.get(&transfer.debit_account_id).copied(),
                        credit_balances: state.balances.get(&transfer.credit_account_id).copied(),
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
    /// [`crate::protocol::Input::Deadlines`]),
    /// and the messages of the others sent again where a part has not
    /// answered (into `fx.outbox`, to leave with the next batch), each
    /// transaction backing off. Bounded per call.
    pub(crate) fn coordinator_tick(&mut self, now_ms: u64, fx: &mut Effects) -> Vec<TxnId> {
        let coordinator = &mut self.coordinator;
        let mut due = Vec::new();
        while let Some(&(deadline_ms, txn)) = coordinator.deadlines.front() {
            if deadline_ms > now_ms || due.len() >= MAX_TIMEOUTS_PER_TICK {
                break;
            }
            coordinator.deadlines.pop_front();
            if coordinator.txns.get(&txn).is_some_and(|t| t.decision.is_none()) {
                due.push(txn);
            }
        }
        let mut resent = 0;
        while resent < MAX_RESENDS_PER_TICK {
            let Some(&Reverse((at_ms, txn, wait_ms))) = coordinator.resends.peek() else { break };
            if at_ms > now_ms {
                break;
            }
            coordinator.resends.pop();
            let Some(state) = coordinator.txns.get(&txn) else { continue };
            resent += 1;
            if state.decision.is_some() || now_ms < state.deadline_ms {
                resend_of(self.id, txn, state, &mut fx.outbox);
            }
            let wait_ms = (wait_ms * 2).min(RESEND_MAX_MS);
            coordinator.resends.push(Reverse((now_ms.saturating_add(wait_ms), txn, wait_ms)));
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
            resend_of(self.id, txn, state, &mut out);
        }
        out
    }

    // ---- reads ------------------------------------------------------------

    /// One transaction this executor coordinates; `done` for one it
    /// finished, `None` for an id it never gave.
    pub fn transaction(&self, txn: TxnId) -> Option<TxnView> {
        if let Some(state) = self.coordinator.txns.get(&txn) {
            return Some(view_of(txn, state));
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
        ids.into_iter().map(|id| view_of(id, &self.coordinator.txns[&id])).collect()
    }

    // ---- checkpoint -------------------------------------------------------

    /// The transactions in flight, in id order (their clients are not kept:
    /// a restored transaction answers nobody, as after a replay).
    pub(crate) fn encode_txns(&self, w: &mut Writer) {
        let txns = self.coordinator.sorted();
        w.varint(txns.len() as u64);
        for (txn, state) in txns {
            w.u64(txn);
            encode_txn(state, w);
        }
    }

    pub(crate) fn decode_txns(r: &mut Reader<'_>, next_txn: u64, now_ms: u64) -> Result<Coordinator, CodecError> {
        let mut coordinator = Coordinator::new(next_txn);
        for _ in 0..r.len()? {
            let txn = r.u64()?;
            if super::counter_of(txn) >= next_txn {
                return Err(CodecError("a transaction the counter has not reached"));
            }
            let state = decode_txn(r)?;
            if coordinator.txns.insert(txn, state).is_some() {
                return Err(CodecError("a transaction appears twice"));
            }
        }
        let mut undecided: Vec<(u64, TxnId)> =
            coordinator.txns.iter().filter(|(_, s)| s.decision.is_none()).map(|(id, s)| (s.deadline_ms, *id)).collect();
        undecided.sort_unstable();
        coordinator.deadlines = undecided.into();
        let txns: Vec<TxnId> = coordinator.txns.keys().copied().collect();
        for txn in txns {
            coordinator.resends.push(Reverse((now_ms, txn, RESEND_MIN_MS)));
        }
        Ok(coordinator)
    }
}

/// What `txn` still needs sent: its try to the parts that have not
/// answered, or its decision to those that have not acknowledged.
fn resend_of(me: ExecutorId, txn: TxnId, state: &Txn, out: &mut Vec<(ExecutorId, PeerMsg)>) {
    let deadline_ms = state.deadline_ms;
    for (&exec, part) in &state.parts {
        if exec == me {
            continue;
        }
        match state.decision {
            None if part.tried.is_none() => {
                out.push((exec, PeerMsg::Try { txn, ops: part.try_ops.clone(), deadline_ms }))
            }
            Some(commit) if !part.acked => {
                out.push((exec, PeerMsg::Decide { txn, commit, ops: part.commit_ops.clone(), deadline_ms }))
            }
            _ => {}
        }
    }
}

fn view_of(txn: TxnId, state: &Txn) -> TxnView {
    let state_name = match state.decision {
        None => TxnState::Trying,
        Some(true) => TxnState::Committing,
        Some(false) => TxnState::Cancelling,
    };
    let branches = state
        .parts
        .iter()
        .map(|(&executor, part)| BranchView {
            executor,
            operations: part.try_ops.iter().map(short_form).collect(),
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
    Item {
        kind: ItemKind::Resolve { pending_id: pending_id.clone(), kind },
        record: Some(record),
        op_refs: Vec::new(),
        static_error,
    }
}

fn try_ops_of(layout: &Layout, item: &Item) -> Vec<(ExecutorId, TryOp)> {
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
            vec![
                (layout.executor_of_transfer(&t.id), TryOp::Reserve(t.clone())),
                (layout.executor_of_shard(debit_shard), TryOp::Hold(leg(Side::Debit, &t.debit_account_id))),
                (layout.executor_of_shard(credit_shard), TryOp::Hold(leg(Side::Credit, &t.credit_account_id))),
            ]
        }
        ItemKind::Resolve { pending_id, kind } => {
            let mut ops = Vec::with_capacity(2);
            if let Some(t) = record {
                ops.push((layout.executor_of_transfer(&t.id), TryOp::Reserve(t.clone())));
            }
            ops.push((
                layout.executor_of_transfer(pending_id),
                TryOp::LockPending { pending_id: pending_id.clone(), kind: *kind },
            ));
            ops
        }
    }
}

fn outcome_of(item: &Item, parts: &BTreeMap<ExecutorId, Part>) -> ItemOutcome {
    let mut error = item.static_error;
    let mut pending = None;
    for &(exec, index) in &item.op_refs {
        let result = &parts[&exec].tried.as_ref().expect("decided after every try")[index];
        match result {
            OpResult::Ok => {}
            OpResult::Exists(t) => return ItemOutcome::Exists(t.clone()),
            OpResult::Pending(info) => pending = Some(info.clone()),
            OpResult::Err(e) => error = Some(error.map_or(*e, |prev: ErrorCode| prev.first_of(*e))),
        }
    }
    match error {
        Some(e) => ItemOutcome::Err(e),
        None => ItemOutcome::Ok { pending },
    }
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

fn commit_ops_of(layout: &Layout, item: &Item, pending: Option<&PendingInfo>) -> Vec<(ExecutorId, CommitOp)> {
    match &item.kind {
        ItemKind::Create => {
            let t = item.record.as_ref().expect("a create has a record");
            vec![
                (layout.executor_of_transfer(&t.id), CommitOp::CommitReservation { id: t.id.clone(), filled: None }),
                (
                    layout.executor_of_account(&t.debit_account_id),
                    CommitOp::CommitHold {
                        transfer_id: t.id.clone(),
                        side: Side::Debit,
                        account_id: t.debit_account_id.clone(),
                    },
                ),
                (
                    layout.executor_of_account(&t.credit_account_id),
                    CommitOp::CommitHold {
                        transfer_id: t.id.clone(),
                        side: Side::Credit,
                        account_id: t.credit_account_id.clone(),
                    },
                ),
            ]
        }
        ItemKind::Resolve { pending_id, kind } => {
            let info = pending.expect("a locked pending transfer answers its info");
            let amount = post_amount(*kind, info);
            let by = item.record.as_ref().map(|t| t.id.clone());
            let mut ops = Vec::with_capacity(4);
            if let Some(t) = &item.record {
                ops.push((
                    layout.executor_of_transfer(&t.id),
                    CommitOp::CommitReservation { id: t.id.clone(), filled: final_record(item, pending) },
                ));
            }
            ops.push((
                layout.executor_of_transfer(pending_id),
                CommitOp::FinishPending { pending_id: pending_id.clone(), kind: *kind },
            ));
            ops.push((
                layout.executor_of_account(&info.debit_account_id),
                CommitOp::Settle {
                    pending_id: pending_id.clone(),
                    side: Side::Debit,
                    post_amount: amount,
                    by: by.clone(),
                },
            ));
            ops.push((
                layout.executor_of_account(&info.credit_account_id),
                CommitOp::Settle { pending_id: pending_id.clone(), side: Side::Credit, post_amount: amount, by },
            ));
            ops
        }
    }
}

// ---- the checkpoint form of a transaction ------------------------------------

fn encode_txn(state: &Txn, w: &mut Writer) {
    w.varint(state.started_ms);
    w.varint(state.deadline_ms);
    w.u8(match state.decision {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    } | u8::from(state.timed_out) << 2);
    match &state.origin {
        None => w.u8(0),
        Some(origin) => {
            w.u8(1 + u8::from(origin.idempotency.is_some()));
            w.str(&origin.key_id);
            w.str(&origin.request_id);
            if let Some(tag) = &origin.idempotency {
                w.buf.extend_from_slice(&tag.key_hash);
                w.buf.extend_from_slice(&tag.fingerprint);
            }
        }
    }
    w.varint(state.items.len() as u64);
    for item in &state.items {
        match &item.kind {
            ItemKind::Create => w.u8(0),
            ItemKind::Resolve { pending_id, kind } => {
                w.u8(1);
                pending_id.encode(w);
                kind.encode(w);
            }
        }
        item.record.encode(w);
        w.varint(item.op_refs.len() as u64);
        for &(exec, index) in &item.op_refs {
            w.varint(u64::from(exec));
            w.varint(index as u64);
        }
        item.static_error.encode(w);
    }
    w.varint(state.parts.len() as u64);
    for (&exec, part) in &state.parts {
        w.varint(u64::from(exec));
        part.try_ops.encode(w);
        part.tried.encode(w);
        part.commit_ops.encode(w);
        w.bool(part.acked);
    }
    w.varint(state.outcomes.len() as u64);
    for outcome in &state.outcomes {
        match outcome {
            ItemOutcome::Ok { pending } => {
                w.u8(0);
                pending.encode(w);
            }
            ItemOutcome::Exists(t) => {
                w.u8(1);
                t.encode(w);
            }
            ItemOutcome::Err(e) => {
                w.u8(2);
                e.encode(w);
            }
        }
    }
    let mut balances: Vec<(&Id, &Balances)> = state.balances.iter().collect();
    balances.sort_unstable_by_key(|(id, _)| *id);
    w.varint(balances.len() as u64);
    for (id, b) in balances {
        id.encode(w);
        b.encode(w);
    }
}

fn executor(r: &mut Reader<'_>) -> Result<ExecutorId, CodecError> {
    u16::try_from(r.varint()?).map_err(|_| CodecError("invalid executor"))
}

fn decode_txn(r: &mut Reader<'_>) -> Result<Txn, CodecError> {
    let started_ms = r.varint()?;
    let deadline_ms = r.varint()?;
    let flags = r.u8()?;
    let decision = match flags & 3 {
        0 => None,
        1 => Some(true),
        2 => Some(false),
        _ => return Err(CodecError("invalid decision")),
    };
    if flags > 7 {
        return Err(CodecError("invalid transaction flags"));
    }
    let origin = match r.u8()? {
        0 => None,
        tag @ (1 | 2) => {
            let key_id = Arc::from(r.str()?);
            let request_id = Arc::from(r.str()?);
            let idempotency = (tag == 2)
                .then(|| Ok::<_, CodecError>(IdempotencyTag { key_hash: r.array()?, fingerprint: r.array()? }));
            Some(Origin { key_id, request_id, idempotency: idempotency.transpose()? })
        }
        _ => return Err(CodecError("invalid origin")),
    };
    let mut items = Vec::new();
    for _ in 0..r.len()? {
        let kind = match r.u8()? {
            0 => ItemKind::Create,
            1 => ItemKind::Resolve { pending_id: Id::decode(r)?, kind: ResolveKind::decode(r)? },
            _ => return Err(CodecError("invalid item")),
        };
        let record = Option::decode(r)?;
        let mut op_refs = Vec::new();
        for _ in 0..r.len()? {
            op_refs.push((executor(r)?, r.len()?));
        }
        items.push(Item { kind, record, op_refs, static_error: Option::decode(r)? });
    }
    let mut parts = BTreeMap::new();
    for _ in 0..r.len()? {
        let exec = executor(r)?;
        let part =
            Part { try_ops: Vec::decode(r)?, tried: Option::decode(r)?, commit_ops: Vec::decode(r)?, acked: r.bool()? };
        parts.insert(exec, part);
    }
    for item in &items {
        let valid = item.op_refs.iter().all(|(exec, index)| parts.get(exec).is_some_and(|p| *index < p.try_ops.len()));
        if !valid {
            return Err(CodecError("an item names an op no part has"));
        }
    }
    let mut outcomes = Vec::new();
    for _ in 0..r.len()? {
        outcomes.push(match r.u8()? {
            0 => ItemOutcome::Ok { pending: Option::decode(r)? },
            1 => ItemOutcome::Exists(Transfer::decode(r)?),
            2 => ItemOutcome::Err(ErrorCode::decode(r)?),
            _ => return Err(CodecError("invalid item outcome")),
        });
    }
    let expected_outcomes = if decision.is_some() { items.len() } else { 0 };
    if outcomes.len() != expected_outcomes {
        return Err(CodecError("a transaction's outcomes do not match its decision"));
    }
    let mut balances = HashMap::default();
    for _ in 0..r.len()? {
        balances.insert(Id::decode(r)?, Balances::decode(r)?);
    }
    Ok(Txn {
        client: None,
        origin,
        items,
        parts,
        decision,
        timed_out: flags & 4 != 0,
        outcomes,
        balances,
        started_ms,
        deadline_ms,
    })
}
