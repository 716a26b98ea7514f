//! The pure state machine of one executor: its ledger, the transactions it
//! coordinates and the fences of the transactions it takes part in.
//!
//! No I/O, no clock, no threads: [`ExecutorCore::apply`] takes an input and
//! the batch time, changes state, and pushes what must be sent or answered
//! into [`Effects`]. The runtime logs the input, makes the batch durable, and
//! only then lets the effects out. Replaying the logged inputs gives the same
//! state, the same transaction ids and the same messages.

use std::collections::BTreeMap;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use peakstack_domain::ledger::{Booked, LedgerImage, Leg, LocalOutcome, PendingInfo, ResolveKind, TxnView};

use crate::checkpoint::Checkpoint;
use crate::history::{LegEntry, LegEvent};
use peakstack_domain::{
    Account, Balances, Currency, Details, ErrorCode, Id, Ledger, Side, Transfer, TransferKind, TransferRequest,
    TransferStatus,
};

use crate::codec::{Reader, Writer};
use crate::layout::Layout;
use crate::parts::{PartCommand, PartReply, Parts};
use crate::protocol::{
    AnsweredBalances, AuditEvent, CommitOp, ExecutorId, Input, OpResult, Origin, PeerMsg, TransferOutcome,
    TransferResult, TryOp, TxnId,
};

/// The answer to opening an account: the account and whether it was created now.
pub type AccountReply = Result<(Account, bool), ErrorCode>;

/// Which client call a transaction answers: the runtime's tag and the index
/// of each transfer in that call.
pub type ClientTag = u64;

/// How many pending transfers one tick may start expiring.
pub const MAX_EXPIRIES_PER_TICK: usize = 1024;
/// How many requests ahead the apply loop asks for the accounts a request
/// reads (and twice as far ahead for the index lines that find them).
const APPLY_LOOKAHEAD: usize = 8;

#[derive(Default)]
pub struct Effects {
    /// Messages to other executors, to be sent once this batch is durable.
    pub outbox: Vec<(ExecutorId, PeerMsg)>,
    /// Finished client work: the results, and beside them (tag, index in
    /// the call) of each. Two vectors rather than one of triples: when one
    /// call's answers come out whole and in order (the common case), the
    /// results vector is handed to the caller as it is, without copying
    /// each answer out of a triple.
    pub finished: Vec<TransferResult>,
    pub finished_for: Vec<(ClientTag, usize)>,
    /// Encoded account history entries, to append to the history file in
    /// order once the batch is durable (see `history.rs`).
    pub history: Vec<u8>,
    /// Transfers made by requests with an origin, for the audit trail.
    /// Made whether or not a client waits (also in a replay), so a replay
    /// makes them again.
    pub audit: Vec<AuditEvent>,
}

impl Effects {
    /// Records the answer to transfer `index` of client call `tag`.
    pub fn finish(&mut self, tag: ClientTag, index: usize, result: TransferResult) {
        self.finished.push(result);
        self.finished_for.push((tag, index));
    }

    /// Takes every finished answer, in the order they were made.
    pub fn drain_finished(&mut self) -> impl Iterator<Item = (ClientTag, usize, TransferResult)> + '_ {
        self.finished_for.drain(..).zip(self.finished.drain(..)).map(|((tag, index), result)| (tag, index, result))
    }

    pub fn clear(&mut self) {
        self.outbox.clear();
        self.finished.clear();
        self.finished_for.clear();
        self.history.clear();
        self.audit.clear();
    }
}

enum Fence {
    Tried {
        ops: Vec<TryOp>,
        results: Vec<OpResult>,
    },
    Decided,
    /// A cancel arrived before its try: the try will be refused.
    Suspended,
}

#[derive(Clone)]
enum ItemKind {
    Create,
    Resolve { pending_id: Id, kind: ResolveKind },
}

struct Item {
    kind: ItemKind,
    /// The record reserved on the id's home (None for an expiry).
    record: Option<Transfer>,
    /// Where this item's try ops went: (executor, index in that part's ops).
    op_refs: Vec<(ExecutorId, usize)>,
    static_error: Option<ErrorCode>,
}

#[derive(Default)]
struct Part {
    try_ops: Vec<TryOp>,
    tried: Option<Vec<OpResult>>,
    commit_ops: Vec<CommitOp>,
    acked: bool,
}

struct Txn {
    client: Option<(ClientTag, Vec<usize>)>,
    origin: Option<Origin>,
    items: Vec<Item>,
    parts: BTreeMap<ExecutorId, Part>,
    /// Set once decided.
    decision: Option<bool>,
    outcomes: Vec<ItemOutcome>,
    balances: HashMap<Id, Balances>,
}

#[derive(Clone)]
enum ItemOutcome {
    Ok { pending: Option<PendingInfo> },
    Exists(Transfer),
    Err(ErrorCode),
}

/// Bits of a [`TxnId`] below the coordinator's executor id: its counter.
const TXN_COUNTER_BITS: u32 = 48;

pub struct ExecutorCore {
    id: ExecutorId,
    layout: Layout,
    ledger: Ledger,
    next_txn: u64,
    txns: HashMap<TxnId, Txn>,
    fences: HashMap<TxnId, Fence>,
    /// Length of this executor's history file once every entry so far is
    /// appended: the next entry's offset.
    history_len: u64,
    /// The parts beside the ledger (inventory, ...), see `parts.rs`.
    parts: Parts,
}

impl ExecutorCore {
    pub fn new(id: ExecutorId, layout: Layout) -> ExecutorCore {
        ExecutorCore {
            id,
            layout,
            ledger: Ledger::new(),
            next_txn: 1,
            txns: HashMap::default(),
            fences: HashMap::default(),
            history_len: 0,
            parts: Parts::default(),
        }
    }

    pub fn id(&self) -> ExecutorId {
        self.id
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Length of the history file once every entry applied so far is in.
    pub fn history_len(&self) -> u64 {
        self.history_len
    }

    /// The state for a checkpoint, or `None` while a transaction is in
    /// flight or a fence is kept (checkpoints are taken between them).
    /// `accounts` is a buffer to copy the accounts into (see [`Ledger::image`]).
    pub fn checkpoint(
        &self,
        sequence: u64,
        time_ms: u64,
        archive_runs: u32,
        accounts: Vec<Account>,
    ) -> Option<Checkpoint<LedgerImage>> {
        if !self.is_quiet() {
            return None;
        }
        Some(Checkpoint {
            sequence,
            time_ms,
            next_txn: self.next_txn,
            history_len: self.history_len,
            archive_runs,
            ledger: self.ledger.image(accounts)?,
            parts: self.parts_section(),
        })
    }

    /// No transaction in flight and no fence kept: a moment a checkpoint
    /// may be taken at.
    pub fn is_quiet(&self) -> bool {
        self.txns.is_empty() && self.fences.is_empty()
    }

    /// An executor as a checkpoint left it.
    pub fn from_checkpoint(id: ExecutorId, layout: Layout, checkpoint: Checkpoint) -> Result<ExecutorCore, String> {
        let parts = match checkpoint.parts.is_empty() {
            // Written before the executor hosted parts.
            true => Parts::default(),
            false => Parts::decode_checkpoint(&mut Reader::new(&checkpoint.parts)).map_err(|e| e.to_string())?,
        };
        let ledger = Ledger::from_snapshot(checkpoint.ledger).map_err(str::to_string)?;
        for account in ledger.accounts() {
            if layout.executor_of_account(&account.id) != id {
                return Err(format!("account {} does not belong to executor {id}", account.id));
            }
        }
        Ok(ExecutorCore {
            id,
            layout,
            ledger,
            next_txn: checkpoint.next_txn,
            txns: HashMap::default(),
            fences: HashMap::default(),
            history_len: checkpoint.history_len,
            parts,
        })
    }

    /// The parts' checkpoint sections.
    fn parts_section(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.parts.encode_checkpoint(&mut w);
        w.buf
    }

    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    pub fn parts_mut(&mut self) -> &mut Parts {
        &mut self.parts
    }

    /// Gives a client's part command the ids this executor assigns.
    pub fn assign_part_ids(&mut self, command: &mut PartCommand) {
        self.parts.assign(command, &self.layout);
    }

    /// Applies a part's command for a client: whether it changed state
    /// (then it is logged as [`Input::Part`]) and its answer.
    pub fn apply_part(&mut self, command: &PartCommand, now_ms: u64) -> (bool, PartReply) {
        self.parts.apply(command, now_ms)
    }

    /// Brings an archived record back into memory (see `archive.rs`).
    pub fn restore_record(&mut self, transfer: Transfer) {
        self.ledger.restore_record(transfer);
    }

    /// See [`Ledger::reserve_records`].
    pub fn reserve_records(&mut self, records: usize) {
        self.ledger.reserve_records(records);
    }

    /// Takes up to `max` of the oldest final records out of memory,
    /// appending them to `out`.
    pub fn evict_oldest_into(&mut self, max: usize, out: &mut Vec<Transfer>) {
        self.ledger.evict_oldest_into(max, out);
    }

    pub fn txns_in_flight(&self) -> usize {
        self.txns.len()
    }

    pub fn fence_count(&self) -> usize {
        self.fences.len()
    }

    /// The executor that coordinates `txn` (its id is in the top 16 bits).
    pub fn coordinator_of(txn: TxnId) -> ExecutorId {
        (txn >> TXN_COUNTER_BITS) as ExecutorId
    }

    /// Applies one input. Returns the answer to an account creation, if it
    /// was one; transfer answers come out through `fx.finished`. Returns
    /// whether the input must be logged (it changed state).
    pub fn apply(
        &mut self,
        input: &Input,
        now_ms: u64,
        client: Option<ClientTag>,
        fx: &mut Effects,
    ) -> (bool, Option<AccountReply>) {
        match input {
            Input::CreateAccount(new) => {
                let result = self.ledger.create_account(new.clone(), now_ms).map(|(a, created)| (a.clone(), created));
                let changed = matches!(result, Ok((_, true)));
                (changed, Some(result))
            }
            Input::ChangeAccount { id, change } => {
                let result = self.ledger.change_account(id, *change).map(|(a, changed)| (a.clone(), changed));
                let changed = matches!(result, Ok((_, true)));
                (changed, Some(result))
            }
            Input::Transfers { requests, atomic, origin } => {
                if *atomic {
                    let items = requests.iter().map(|r| self.build_item(r, now_ms)).collect();
                    let indices = (0..requests.len()).collect();
                    self.start_txn(items, client.map(|c| (c, indices)), origin.clone(), now_ms, fx);
                } else {
                    // A software pipeline over the memory each request
                    // reads: index lines `2 * APPLY_LOOKAHEAD` requests ahead, the
                    // accounts they point to `APPLY_LOOKAHEAD` ahead, so that the
                    // misses overlap and the lines are still cached when
                    // the request is applied.
                    if client.is_some() {
                        // Sized once: the caller may take this vector whole.
                        fx.finished.reserve(requests.len());
                        fx.finished_for.reserve(requests.len());
                    }
                    requests.iter().take(2 * APPLY_LOOKAHEAD).for_each(|r| self.prefetch_index_lines(r));
                    requests.iter().take(APPLY_LOOKAHEAD).for_each(|r| self.prefetch_accounts(r));
                    for (index, request) in requests.iter().enumerate() {
                        if let Some(ahead) = requests.get(index + 2 * APPLY_LOOKAHEAD) {
                            self.prefetch_index_lines(ahead);
                        }
                        if let Some(ahead) = requests.get(index + APPLY_LOOKAHEAD) {
                            self.prefetch_accounts(ahead);
                        }
                        if let Some(result) = self.try_fast_path(request, now_ms, fx) {
                            if let (Some(origin), Ok(outcome)) = (origin, &result) {
                                if outcome.created {
                                    let answered = (outcome.debit_balances, outcome.credit_balances);
                                    audit_created(origin, outcome.transfer.clone(), answered, fx);
                                }
                            }
                            if let Some(tag) = client {
                                fx.finish(tag, index, result);
                            }
                            continue;
                        }
                        let item = self.build_item(request, now_ms);
                        self.start_txn(vec![item], client.map(|c| (c, vec![index])), origin.clone(), now_ms, fx);
                    }
                }
                (true, None)
            }
            Input::Expire { pending_ids } => {
                for pending_id in pending_ids {
                    let item = Item {
                        kind: ItemKind::Resolve { pending_id: pending_id.clone(), kind: ResolveKind::Expire },
                        record: None,
                        op_refs: Vec::new(),
                        static_error: None,
                    };
                    self.start_txn(vec![item], None, None, now_ms, fx);
                }
                (true, None)
            }
            Input::Part(command) => (self.parts.apply(command, now_ms).0, None),
            Input::Peer { from, messages } => {
                for message in messages {
                    self.on_peer(*from, message, now_ms, fx);
                }
                (true, None)
            }
        }
    }

    /// Asks for the index lines through which a request's record and
    /// accounts are found (see [`ExecutorCore::apply`]).
    fn prefetch_index_lines(&self, request: &TransferRequest) {
        if let TransferRequest::Create { id, debit_account_id, credit_account_id, .. } = request {
            self.ledger.prefetch_record_index(id);
            self.ledger.prefetch_account_index(debit_account_id);
            self.ledger.prefetch_account_index(credit_account_id);
        }
    }

    /// Asks for a request's accounts; their index lines should be in by now.
    fn prefetch_accounts(&self, request: &TransferRequest) {
        if let TransferRequest::Create { debit_account_id, credit_account_id, .. } = request {
            self.ledger.prefetch_account(debit_account_id);
            self.ledger.prefetch_account(credit_account_id);
        }
    }

    /// Pending transfers on this executor whose timeout has passed.
    pub fn due_expiries(&self, now_ms: u64) -> Vec<Id> {
        self.ledger.due_expiries(now_ms, MAX_EXPIRIES_PER_TICK)
    }

    /// After a replay: the messages of unfinished transactions, sent again.
    /// Participants answer repeats from their fences.
    pub fn resend(&self) -> Vec<(ExecutorId, PeerMsg)> {
        let mut out = Vec::new();
        // In transaction order, so that a replay resends the same messages
        // in the same order.
        let mut txns: Vec<(&TxnId, &Txn)> = self.txns.iter().collect();
        txns.sort_unstable_by_key(|(txn, _)| **txn);
        for (&txn, state) in txns {
            for (&exec, part) in &state.parts {
                if exec == self.id {
                    continue;
                }
                match state.decision {
                    None if part.tried.is_none() => out.push((exec, PeerMsg::Try { txn, ops: part.try_ops.clone() })),
                    Some(commit) if !part.acked => {
                        out.push((exec, PeerMsg::Decide { txn, commit, ops: part.commit_ops.clone() }))
                    }
                    _ => {}
                }
            }
        }
        out
    }

    // ---- coordinator --------------------------------------------------------

    /// The hot path: a plain transfer whose record and both accounts live on
    /// this executor is applied in one step, without a transaction. It gives
    /// the same answer the transaction would. `None` when it does not apply.
    fn try_fast_path(&mut self, request: &TransferRequest, now_ms: u64, fx: &mut Effects) -> Option<TransferResult> {
        let TransferRequest::Create { id, debit_account_id, credit_account_id, pending: false, .. } = request else {
            return None;
        };
        let debit_shard = self.layout.shard_of_account(debit_account_id);
        let credit_shard = self.layout.shard_of_account(credit_account_id);
        let local = self.layout.executor_of_transfer(id) == self.id
            && self.layout.executor_of_shard(debit_shard) == self.id
            && self.layout.executor_of_shard(credit_shard) == self.id;
        if !local {
            return None;
        }
        // The record straight from the request: no `Item` around it to be
        // built and taken apart again (each a copy of the record).
        let record = match create_record(request, now_ms) {
            (record, None) => record,
            (_, Some(error)) => return Some(Err(error)),
        };
        Some(match self.ledger.transfer_local(&record, debit_shard, credit_shard, now_ms) {
            Ok(LocalOutcome::Created { debit, credit, debit_slot, credit_slot }) => {
                let amount = record.amount;
                // Client accounts only: a local transfer never names a clearing account.
                for (account, slot, side) in [
                    (&record.debit_account_id, debit_slot, Side::Debit),
                    (&record.credit_account_id, credit_slot, Side::Credit),
                ] {
                    let previous = self.ledger.swap_history_head_at(slot, self.history_len + 1);
                    self.append_history(previous, account, &record.id, LegEvent::Posted { side, amount }, now_ms, fx);
                }
                Ok(TransferOutcome {
                    created: true,
                    transfer: record,
                    debit_balances: Some(debit),
                    credit_balances: Some(credit),
                })
            }
            Ok(LocalOutcome::Exists(transfer)) => {
                Ok(TransferOutcome { created: false, transfer, debit_balances: None, credit_balances: None })
            }
            Err(error) => Err(error),
        })
    }

    fn build_item(&self, request: &TransferRequest, now_ms: u64) -> Item {
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
                self.resolve_item(id, pending_id, kind, record)
            }
            TransferRequest::Void { id, pending_id, details } => {
                let record = placeholder(id, TransferKind::Void { pending_id: pending_id.clone() }, details, now_ms);
                self.resolve_item(id, pending_id, ResolveKind::Void, record)
            }
        }
    }

    fn resolve_item(&self, id: &Id, pending_id: &Id, kind: ResolveKind, record: Transfer) -> Item {
        let static_error = (id.is_reserved() || pending_id.is_reserved()).then_some(ErrorCode::InvalidRequest);
        Item {
            kind: ItemKind::Resolve { pending_id: pending_id.clone(), kind },
            record: Some(record),
            op_refs: Vec::new(),
            static_error,
        }
    }

    fn start_txn(
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
                let ops = self.try_ops_of(item);
                for (exec, op) in ops {
                    let part = parts.entry(exec).or_default();
                    item.op_refs.push((exec, part.try_ops.len()));
                    part.try_ops.push(op);
                }
            }
        }
        let mut state =
            Txn { client, origin, items, parts, decision: None, outcomes: Vec::new(), balances: HashMap::default() };
        // Local part: tried now, in this batch.
        if let Some(part) = state.parts.get_mut(&self.id) {
            let ops = part.try_ops.clone();
            part.tried = Some(self.on_try(txn, ops, now_ms));
        }
        for (&exec, part) in &state.parts {
            if exec != self.id {
                fx.outbox.push((exec, PeerMsg::Try { txn, ops: part.try_ops.clone() }));
            }
        }
        self.txns.insert(txn, state);
        self.maybe_decide(txn, now_ms, fx);
    }

    /// A new transaction id: this executor's id over its counter. A
    /// counter that reached the executor bits would make ids of another
    /// coordinator, or repeat old ones: stop instead.
    fn take_txn_id(&mut self) -> TxnId {
        let counter = self.next_txn;
        assert!(counter < 1 << TXN_COUNTER_BITS, "executor {}: the transaction id counter is exhausted", self.id);
        self.next_txn = counter + 1;
        (u64::from(self.id) << TXN_COUNTER_BITS) | counter
    }

    fn try_ops_of(&self, item: &Item) -> Vec<(ExecutorId, TryOp)> {
        let record = item.record.as_ref();
        match &item.kind {
            ItemKind::Create => {
                let t = record.expect("a create has a record");
                let debit_shard = self.layout.shard_of_account(&t.debit_account_id);
                let credit_shard = self.layout.shard_of_account(&t.credit_account_id);
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
                    (self.layout.executor_of_transfer(&t.id), TryOp::Reserve(t.clone())),
                    (self.layout.executor_of_shard(debit_shard), TryOp::Hold(leg(Side::Debit, &t.debit_account_id))),
                    (self.layout.executor_of_shard(credit_shard), TryOp::Hold(leg(Side::Credit, &t.credit_account_id))),
                ]
            }
            ItemKind::Resolve { pending_id, kind } => {
                let mut ops = Vec::with_capacity(2);
                if let Some(t) = record {
                    ops.push((self.layout.executor_of_transfer(&t.id), TryOp::Reserve(t.clone())));
                }
                ops.push((
                    self.layout.executor_of_transfer(pending_id),
                    TryOp::LockPending { pending_id: pending_id.clone(), kind: *kind },
                ));
                ops
            }
        }
    }

    fn maybe_decide(&mut self, txn: TxnId, now_ms: u64, fx: &mut Effects) {
        let Some(state) = self.txns.get_mut(&txn) else { return };
        if state.decision.is_some() || state.parts.values().any(|p| p.tried.is_none()) {
            return;
        }
        let outcomes: Vec<ItemOutcome> = state.items.iter().map(|item| outcome_of(item, &state.parts)).collect();
        let commit = outcomes.iter().all(|o| matches!(o, ItemOutcome::Ok { .. }));
        if commit {
            let mut commit_ops: Vec<(ExecutorId, CommitOp)> = Vec::new();
            for (item, outcome) in state.items.iter_mut().zip(&outcomes) {
                let ItemOutcome::Ok { pending } = outcome else { unreachable!("all ok") };
                commit_ops.extend(commit_ops_of(&self.layout, item, pending.as_ref(), now_ms));
            }
            for (exec, op) in commit_ops {
                state.parts.entry(exec).or_default().commit_ops.push(op);
            }
        }
        state.decision = Some(commit);
        state.outcomes = outcomes;
        let sends: Vec<(ExecutorId, Vec<CommitOp>)> =
            state.parts.iter().map(|(&exec, part)| (exec, part.commit_ops.clone())).collect();
        for (exec, ops) in sends {
            if exec == self.id {
                let balances = self.on_decide(txn, commit, &ops, now_ms, fx);
                self.on_acked(txn, exec, balances, fx);
            } else {
                fx.outbox.push((exec, PeerMsg::Decide { txn, commit, ops }));
            }
        }
        // A transaction with no parts at all (refused before any op) ends here.
        self.maybe_finish(txn, fx);
    }

    fn on_acked(&mut self, txn: TxnId, from: ExecutorId, balances: Vec<(Id, Balances)>, fx: &mut Effects) {
        let Some(state) = self.txns.get_mut(&txn) else { return };
        let Some(part) = state.parts.get_mut(&from) else { return };
        if part.acked || state.decision.is_none() {
            return;
        }
        part.acked = true;
        state.balances.extend(balances);
        self.maybe_finish(txn, fx);
    }

    fn maybe_finish(&mut self, txn: TxnId, fx: &mut Effects) {
        let Some(state) = self.txns.get(&txn) else { return };
        if state.decision.is_none() || state.parts.values().any(|p| !p.acked) {
            return;
        }
        let state = self.txns.remove(&txn).expect("present");
        self.fences.remove(&txn);
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

    // ---- history ------------------------------------------------------------

    /// Appends a leg entry to the account's chain (clearing accounts keep none).
    fn book_history(&mut self, account: &Id, transfer_id: &Id, event: LegEvent, now_ms: u64, fx: &mut Effects) {
        if account.is_reserved() {
            return;
        }
        let head = self.history_len + 1;
        let Some(previous) = self.ledger.swap_history_head(account, head) else { return };
        self.append_history(previous, account, transfer_id, event, now_ms, fx);
    }

    /// Appends the entry that became `account`'s history head; `previous` is
    /// the head it replaced.
    fn append_history(
        &mut self,
        previous: u64,
        account: &Id,
        transfer_id: &Id,
        event: LegEvent,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let entry = LegEntry {
            previous,
            account: peakstack_domain::fnv1a64(account.as_str().as_bytes()),
            time_ms: now_ms,
            transfer_id: transfer_id.clone(),
            event,
        };
        self.history_len += entry.encode_framed(&mut fx.history);
    }

    /// Books a committed (`settled: false`) or settled pending hold in the history.
    fn book(
        &mut self,
        booked: Booked,
        transfer_id: &Id,
        settled: bool,
        now_ms: u64,
        fx: &mut Effects,
    ) -> (Id, Balances) {
        let event = if settled {
            LegEvent::Settled { side: booked.side, held: booked.held, posted: booked.posted }
        } else if booked.still_pending {
            LegEvent::Held { side: booked.side, amount: booked.held }
        } else {
            LegEvent::Posted { side: booked.side, amount: booked.posted }
        };
        self.book_history(&booked.account_id, transfer_id, event, now_ms, fx);
        (booked.account_id, booked.balances)
    }

    // ---- participant --------------------------------------------------------

    fn on_peer(&mut self, from: ExecutorId, message: &PeerMsg, now_ms: u64, fx: &mut Effects) {
        match message {
            PeerMsg::Try { txn, ops } => {
                let results = self.on_try(*txn, ops.clone(), now_ms);
                fx.outbox.push((from, PeerMsg::Tried { txn: *txn, results }));
            }
            PeerMsg::Tried { txn, results } => {
                if let Some(part) = self.txns.get_mut(txn).and_then(|s| s.parts.get_mut(&from)) {
                    if part.tried.is_none() && results.len() == part.try_ops.len() {
                        part.tried = Some(results.clone());
                    }
                }
                self.maybe_decide(*txn, now_ms, fx);
            }
            PeerMsg::Decide { txn, commit, ops } => {
                let balances = self.on_decide(*txn, *commit, ops, now_ms, fx);
                fx.outbox.push((from, PeerMsg::Acked { txn: *txn, balances }));
            }
            PeerMsg::Acked { txn, balances } => self.on_acked(*txn, from, balances.clone(), fx),
            PeerMsg::Forget { txn } => {
                self.fences.remove(txn);
            }
        }
    }

    fn on_try(&mut self, txn: TxnId, ops: Vec<TryOp>, now_ms: u64) -> Vec<OpResult> {
        match self.fences.get(&txn) {
            Some(Fence::Tried { results, .. }) => return results.clone(),
            Some(Fence::Suspended) | Some(Fence::Decided) => {
                return ops.iter().map(|_| OpResult::Err(ErrorCode::InFlight)).collect();
            }
            None => {}
        }
        let mut view = TxnView::default();
        let results: Vec<OpResult> = ops
            .iter()
            .map(|op| match op {
                TryOp::Reserve(t) => match self.ledger.reserve(t.clone(), txn) {
                    Ok(peakstack_domain::ledger::Reservation::Reserved) => OpResult::Ok,
                    Ok(peakstack_domain::ledger::Reservation::Exists(t)) => OpResult::Exists(t),
                    Err(e) => OpResult::Err(e),
                },
                TryOp::Hold(leg) => {
                    let shard = self.layout.shard_of_account(&leg.account_id);
                    match self.ledger.hold(leg, shard, txn, &mut view, now_ms) {
                        Ok(()) => OpResult::Ok,
                        Err(e) => OpResult::Err(e),
                    }
                }
                TryOp::LockPending { pending_id, kind } => {
                    match self.ledger.lock_pending(pending_id, *kind, txn, now_ms) {
                        Ok(info) => OpResult::Pending(info),
                        Err(e) => OpResult::Err(e),
                    }
                }
            })
            .collect();
        // All or nothing per participant: if anything here failed, the
        // transaction cannot commit, so what did succeed is released now
        // rather than when the cancel arrives. Two legs on one shard are never
        // left half-held, so the shard balances at every moment. A cancel
        // arriving later finds nothing of this transaction to release.
        if results.iter().any(|r| matches!(r, OpResult::Err(_) | OpResult::Exists(_))) {
            for (op, result) in ops.iter().zip(&results).rev() {
                self.release(txn, op, result);
            }
        }
        self.fences.insert(txn, Fence::Tried { ops, results: results.clone() });
        results
    }

    fn on_decide(
        &mut self,
        txn: TxnId,
        commit: bool,
        commit_ops: &[CommitOp],
        now_ms: u64,
        fx: &mut Effects,
    ) -> Vec<(Id, Balances)> {
        let mut balances = Vec::new();
        match self.fences.remove(&txn) {
            Some(Fence::Tried { ops, results }) => {
                if commit {
                    // The coordinator commits only when every try succeeded:
                    // a commit over a refused try would book money never held.
                    let refused = results.iter().position(|r| matches!(r, OpResult::Err(_) | OpResult::Exists(_)));
                    assert!(
                        refused.is_none(),
                        "executor {}: commit of txn {txn:#x} at a fence whose try {refused:?} did not succeed",
                        self.id
                    );
                    self.apply_commit_ops(txn, commit_ops, now_ms, &mut balances, fx);
                } else {
                    for (op, result) in ops.iter().zip(&results).rev() {
                        self.release(txn, op, result);
                    }
                }
            }
            Some(Fence::Decided) => {}
            Some(Fence::Suspended) => {
                // Suspended refuses the try, so no coordinator can commit.
                assert!(!commit, "executor {}: commit of txn {txn:#x} at a suspended fence", self.id);
                self.fences.insert(txn, Fence::Suspended);
                return balances;
            }
            None => {
                if commit {
                    // A participant with commit work only (it settles a
                    // pending hold): every other commit op follows a try here.
                    let untried = commit_ops.iter().find(|op| !matches!(op, CommitOp::Settle { .. }));
                    assert!(
                        untried.is_none(),
                        "executor {}: commit of txn {txn:#x} without a fence, for {untried:?}",
                        self.id
                    );
                    self.apply_commit_ops(txn, commit_ops, now_ms, &mut balances, fx);
                } else {
                    self.fences.insert(txn, Fence::Suspended);
                    return balances;
                }
            }
        }
        self.fences.insert(txn, Fence::Decided);
        balances
    }

    fn release(&mut self, txn: TxnId, op: &TryOp, result: &OpResult) {
        match (op, result) {
            (TryOp::Reserve(t), OpResult::Ok) => self.ledger.cancel_reservation(&t.id, txn),
            (TryOp::Hold(leg), OpResult::Ok) => self.ledger.release_hold(&leg.transfer_id, leg.side, txn),
            (TryOp::LockPending { pending_id, .. }, OpResult::Pending(_)) => {
                self.ledger.unlock_pending(pending_id, txn)
            }
            _ => {}
        }
    }

    fn apply_commit_ops(
        &mut self,
        txn: TxnId,
        ops: &[CommitOp],
        now_ms: u64,
        balances: &mut Vec<(Id, Balances)>,
        fx: &mut Effects,
    ) {
        for op in ops {
            match op {
                CommitOp::CommitHold { transfer_id, side, account_id } => {
                    match self.ledger.commit_hold(transfer_id, *side, txn) {
                        Some(booked) => balances.push(self.book(booked, transfer_id, false, now_ms, fx)),
                        // A pending hold a post settled before this commit
                        // arrived is gone; its account's balances still answer.
                        None => balances.extend(self.ledger.account(account_id).map(|a| (a.id.clone(), a.balances))),
                    }
                }
                CommitOp::CommitReservation { id, filled } => {
                    self.ledger.commit_reservation(id, txn, filled.clone());
                }
                CommitOp::FinishPending { pending_id, kind } => {
                    self.ledger.finish_pending(pending_id, txn, *kind);
                }
                CommitOp::Settle { pending_id, side, post_amount, by } => {
                    if let Some(booked) = self.ledger.settle_pending(pending_id, *side, *post_amount) {
                        // The history names the post or void that settled it
                        // (an expiry has none: then the pending transfer).
                        balances.push(self.book(booked, by.as_ref().unwrap_or(pending_id), true, now_ms, fx));
                    }
                }
            }
        }
    }
}

/// The record a create request makes, and the error that refuses it before
/// any state is read (same accounts, a reserved id, an expiry past the
/// clock's range), if any. Only for [`TransferRequest::Create`].
/// An idempotent replay rebuilds its answer's record with it.
pub fn create_record(request: &TransferRequest, now_ms: u64) -> (Transfer, Option<ErrorCode>) {
    let TransferRequest::Create {
        id,
        debit_account_id,
        credit_account_id,
        amount,
        currency,
        pending,
        timeout_ms,
        details,
    } = request
    else {
        unreachable!("create_record is called for creates only")
    };
    let mut static_error = None;
    if debit_account_id == credit_account_id {
        static_error = Some(ErrorCode::AccountsMustBeDifferent);
    }
    if id.is_reserved() || debit_account_id.is_reserved() || credit_account_id.is_reserved() {
        static_error = Some(ErrorCode::InvalidRequest);
    }
    let expires_at_ms = if *pending && *timeout_ms > 0 {
        now_ms.checked_add(*timeout_ms).unwrap_or_else(|| {
            static_error = Some(ErrorCode::Overflow);
            0
        })
    } else {
        0
    };
    let record = Transfer {
        id: id.clone(),
        debit_account_id: debit_account_id.clone(),
        credit_account_id: credit_account_id.clone(),
        amount: amount.get(),
        currency: *currency,
        kind: if *pending {
            TransferKind::Pending { timeout_ms: *timeout_ms, expires_at_ms }
        } else {
            TransferKind::Single
        },
        status: if *pending { TransferStatus::Pending } else { TransferStatus::Posted },
        posted_amount: None,
        timestamp_ms: now_ms,
        details: details.clone(),
    };
    (record, static_error)
}

/// A post's or void's record before its try has read the pending transfer:
/// only its id and kind are meaningful (they are what a retry is compared
/// by, with its details); the rest is filled in at commit and never shown
/// before.
fn placeholder(id: &Id, kind: TransferKind, details: &Details, now_ms: u64) -> Transfer {
    Transfer {
        id: id.clone(),
        debit_account_id: id.clone(),
        credit_account_id: id.clone(),
        amount: 0,
        currency: Currency::parse("XAF").expect("valid"),
        kind,
        status: TransferStatus::Posted,
        posted_amount: None,
        timestamp_ms: now_ms,
        details: details.clone(),
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

fn commit_ops_of(
    layout: &Layout,
    item: &Item,
    pending: Option<&PendingInfo>,
    _now_ms: u64,
) -> Vec<(ExecutorId, CommitOp)> {
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

/// The audit event of a transfer just made for a request from `origin`,
/// stamped with the transfer's own time.
fn audit_created(
    origin: &Origin,
    transfer: Transfer,
    (debit, credit): (Option<Balances>, Option<Balances>),
    fx: &mut Effects,
) {
    // The balances only for a keyed request: its replay answers with them.
    let answered = origin.idempotency.map(|_| Box::new(AnsweredBalances { debit, credit }));
    fx.audit.push(AuditEvent { origin: origin.clone(), time_ms: transfer.timestamp_ms, transfer, answered });
}

/// The `Forget` messages a whole-process crash lost, found after every
/// executor has replayed: (participant, coordinator, message) to deliver as
/// if the coordinator sent them.
///
/// A participant keeps a fence until the coordinator's `Forget` arrives, and
/// a `Forget` lives only in memory until the participant logs it: in a queue,
/// or in a batch not yet durable. A crash can lose it after the coordinator
/// finished the transaction for good, and then nobody would ever send it
/// again; the fence would stay, and with it the executor could never take a
/// checkpoint. A participant's fence proves its coordinator made the
/// transaction durable (a `Try` leaves only after that), so a fence whose
/// transaction no executor still has open is exactly such a leftover.
/// Delivered as ordinary peer messages, the forgets are logged and replay
/// the same way. In transaction order, so that the same state gives the
/// same messages.
pub fn lost_forgets(cores: &[&ExecutorCore]) -> Vec<(ExecutorId, ExecutorId, PeerMsg)> {
    let open: std::collections::HashSet<TxnId> = cores.iter().flat_map(|core| core.txns.keys().copied()).collect();
    let mut out = Vec::new();
    for core in cores {
        let mut leftover: Vec<TxnId> = core.fences.keys().copied().filter(|txn| !open.contains(txn)).collect();
        leftover.sort_unstable();
        for txn in leftover {
            out.push((core.id, ExecutorCore::coordinator_of(txn), PeerMsg::Forget { txn }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::{AccountFlags, NewAccount};
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// A transaction that executor 0 coordinates.
    const TXN: TxnId = 7;

    /// A participant on executor 1 of 2 with one open account, and a debit
    /// leg of `amount` on it.
    fn participant(amount: u64) -> (ExecutorCore, Leg) {
        let layout = Layout::new(8, 2).expect("valid layout");
        let mut core = ExecutorCore::new(1, layout);
        let account = (0..1000)
            .map(|n| Id::parse(&format!("acct{n}")).expect("valid id"))
            .find(|id| layout.executor_of_account(id) == 1)
            .expect("an account on executor 1");
        let new = NewAccount {
            id: account.clone(),
            currency: Currency::parse("USD").expect("valid"),
            flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        core.apply(&Input::CreateAccount(new), 1_000, None, &mut Effects::default());
        let leg = Leg {
            transfer_id: Id::parse("t1").expect("valid id"),
            side: Side::Debit,
            account_id: account,
            currency: Currency::parse("USD").expect("valid"),
            amount,
            via_clearing: true,
            pending: false,
        };
        (core, leg)
    }

    fn feed(core: &mut ExecutorCore, message: PeerMsg) {
        core.apply(&Input::Peer { from: 0, messages: vec![message] }, 1_000, None, &mut Effects::default());
    }

    fn commit(leg: &Leg) -> PeerMsg {
        let hold = CommitOp::CommitHold {
            transfer_id: leg.transfer_id.clone(),
            side: leg.side,
            account_id: leg.account_id.clone(),
        };
        PeerMsg::Decide { txn: TXN, commit: true, ops: vec![hold] }
    }

    /// Whether feeding `messages` in order stops (panics) at the last.
    fn stops_at_last(amount: u64, messages: impl Fn(&Leg) -> Vec<PeerMsg>) -> bool {
        let (mut core, leg) = participant(amount);
        let mut messages = messages(&leg);
        let last = messages.pop().expect("a message");
        for message in messages {
            feed(&mut core, message);
        }
        catch_unwind(AssertUnwindSafe(|| feed(&mut core, last))).is_err()
    }

    #[test]
    fn a_commit_arrives_only_at_a_fence_whose_tries_succeeded() {
        let try_hold = |leg: &Leg| PeerMsg::Try { txn: TXN, ops: vec![TryOp::Hold(leg.clone())] };
        let cancel = PeerMsg::Decide { txn: TXN, commit: false, ops: vec![] };
        // Holding 0 on an account that must not go below zero succeeds;
        // holding 10 is refused.
        assert!(!stops_at_last(0, |leg| vec![try_hold(leg), commit(leg)]), "a commit after a good try");
        assert!(stops_at_last(10, |leg| vec![try_hold(leg), commit(leg)]), "a commit after a refused try");
        assert!(!stops_at_last(10, |leg| vec![try_hold(leg), cancel.clone()]), "a cancel after a refused try");
        assert!(stops_at_last(0, |leg| vec![cancel.clone(), commit(leg)]), "a commit at a suspended fence");
        assert!(stops_at_last(0, |leg| vec![commit(leg)]), "a commit of a hold never tried");
    }

    #[test]
    fn the_transaction_id_counter_stops_before_it_reaches_the_executor_bits() {
        let (mut core, _) = participant(0);
        core.next_txn = (1 << TXN_COUNTER_BITS) - 1;
        assert_eq!(core.take_txn_id(), (1 << TXN_COUNTER_BITS) | ((1 << TXN_COUNTER_BITS) - 1));
        assert!(catch_unwind(AssertUnwindSafe(|| core.take_txn_id())).is_err());
    }
}
