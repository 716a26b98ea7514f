//! The pure state machine of one executor: its ledger, the transactions it
//! coordinates and the fences of the transactions it takes part in.
//!
//! No I/O, no clock, no threads: [`ExecutorCore::apply`] takes an input and
//! the batch time, changes state, and pushes what must be sent or answered
//! into [`Effects`]. The runtime logs the input, makes the batch durable, and
//! only then lets the effects out. Replaying the logged inputs gives the same
//! state, the same transaction ids and the same messages.

use peakstack_domain::ledger::{Booked, LedgerImage, LocalOutcome};

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
    AnsweredBalances, AuditEvent, CommitOp, ExecutorId, Input, Origin, PeerMsg, TransferOutcome, TransferResult, TryOp,
    TxnId,
};
use crate::tcc::coordinator::Coordinator;
use crate::tcc::fence::Fences;
use crate::tcc::{TxnFilter, TxnView};

/// The answer to opening an account: the account and whether it was created now.
pub type AccountReply = Result<(Account, bool), ErrorCode>;

/// Which client call a transaction answers: the runtime's tag and the index
/// of each transfer in that call.
pub type ClientTag = u64;

/// The client tag of a trade flow's own ledger movements (see
/// `flows.rs`): never a runtime's (it counts up from 0).
pub const FLOW_TAG: ClientTag = u64::MAX;

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
    /// The answers of a trade flow's own ledger movements (tag
    /// [`FLOW_TAG`]), taken by the flow in the same step.
    pub flow: Vec<(usize, TransferResult)>,
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
        if tag == FLOW_TAG {
            return self.flow.push((index, result));
        }
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
        self.flow.clear();
        self.history.clear();
        self.audit.clear();
    }
}

pub struct ExecutorCore {
    pub(crate) id: ExecutorId,
    pub(crate) layout: Layout,
    pub(crate) ledger: Ledger,
    /// The transactions it coordinates (see `tcc/coordinator.rs`).
    pub(crate) coordinator: Coordinator,
    /// The fences of the transactions it takes part in (see `tcc/fence.rs`).
    pub(crate) fences: Fences,
    /// Length of this executor's history file once every entry so far is
    /// appended: the next entry's offset.
    history_len: u64,
    /// The parts beside the ledger (inventory, ...), see `parts.rs`.
    pub(crate) parts: Parts,
    /// Reliable messages it sends and what it applied of others' (see `outbox.rs`).
    pub(crate) outbox: crate::outbox::Outbox,
    pub(crate) inbox: crate::outbox::Inbox,
}

impl ExecutorCore {
    pub fn new(id: ExecutorId, layout: Layout) -> ExecutorCore {
        ExecutorCore {
            id,
            layout,
            ledger: Ledger::new(),
            coordinator: Coordinator::new(1),
            fences: Fences::default(),
            history_len: 0,
            parts: Parts::default(),
            outbox: Default::default(),
            inbox: Default::default(),
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

    /// The state for a checkpoint, at any batch boundary: transactions in
    /// flight, their holds, reservations and locks, and the fences
    /// included. `accounts` is a buffer to copy the accounts into (see
    /// [`Ledger::image`]).
    pub fn checkpoint(
        &self,
        sequence: u64,
        time_ms: u64,
        archive_runs: u32,
        accounts: Vec<Account>,
    ) -> Checkpoint<LedgerImage> {
        Checkpoint {
            sequence,
            time_ms,
            next_txn: self.coordinator.next_txn,
            history_len: self.history_len,
            archive_runs,
            ledger: self.ledger.image(accounts),
            parts: self.parts_section(),
            tcc: self.tcc_section(),
        }
    }

    /// The protocol's checkpoint section: the transactions this executor
    /// coordinates, then its fences.
    fn tcc_section(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode_txns(&mut w);
        self.fences.encode(&mut w);
        // Since reliable messages: absent in older checkpoints.
        self.encode_messages(&mut w);
        w.buf
    }

    /// An executor as a checkpoint left it.
    pub fn from_checkpoint(id: ExecutorId, layout: Layout, checkpoint: Checkpoint) -> Result<ExecutorCore, String> {
        let parts = match checkpoint.parts.is_empty() {
            // Written before the executor hosted parts.
            true => Parts::default(),
            false => Parts::decode_checkpoint(&mut Reader::new(&checkpoint.parts)).map_err(|e| e.to_string())?,
        };
        let mut messages = None;
        let (coordinator, fences) = match checkpoint.tcc.is_empty() {
            // Written when checkpoints were taken only between transactions.
            true => (Coordinator::new(checkpoint.next_txn), Fences::default()),
            false => {
                let mut r = Reader::new(&checkpoint.tcc);
                let coordinator = ExecutorCore::decode_txns(&mut r, checkpoint.next_txn, checkpoint.time_ms)
                    .map_err(|e| e.to_string())?;
                let fences = Fences::decode(&mut r).map_err(|e| e.to_string())?;
                if !r.is_empty() {
                    messages = Some(checkpoint.tcc.len() - r.remaining());
                }
                (coordinator, fences)
            }
        };
        let ledger = Ledger::from_snapshot(checkpoint.ledger).map_err(str::to_string)?;
        for account in ledger.accounts() {
            if layout.executor_of_account(&account.id) != id {
                return Err(format!("account {} does not belong to executor {id}", account.id));
            }
        }
        let mut core = ExecutorCore {
            id,
            layout,
            ledger,
            coordinator,
            fences,
            history_len: checkpoint.history_len,
            parts,
            outbox: Default::default(),
            inbox: Default::default(),
        };
        if let Some(at) = messages {
            let mut r = Reader::new(&checkpoint.tcc[at..]);
            core.decode_messages(&mut r).map_err(|e| e.to_string())?;
            if !r.is_empty() {
                return Err("trailing bytes in the checkpoint's protocol section".into());
            }
        }
        Ok(core)
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
    pub fn apply_part(&mut self, command: &PartCommand, now_ms: u64, fx: &mut Effects) -> (bool, PartReply) {
        self.apply_part_command(command, now_ms, fx)
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
        self.coordinator.txns.len()
    }

    /// Live fences: of transactions whose coordinator has not forgotten them.
    pub fn fence_count(&self) -> usize {
        self.fences.live_count()
    }

    /// Fences kept after their coordinator forgot the transaction, until
    /// its deadline and [`crate::tcc::FENCE_RETENTION_MS`] pass.
    pub fn retained_fence_count(&self) -> usize {
        self.fences.retained_count()
    }

    /// The executor that coordinates `txn` (its id is in the top 16 bits).
    pub fn coordinator_of(txn: TxnId) -> ExecutorId {
        crate::tcc::coordinator_of(txn)
    }

    /// Unfinished transactions this executor coordinates (see [`TxnFilter`]).
    pub fn list_transactions(&self, filter: TxnFilter, limit: usize, now_ms: u64) -> Vec<TxnView> {
        self.transactions(filter, None, limit, now_ms)
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
                    self.start_txn(vec![ExecutorCore::expiry_item(pending_id)], None, None, now_ms, fx);
                }
                (true, None)
            }
            Input::Deadlines { txns } => {
                self.on_deadlines(txns, now_ms, fx);
                (true, None)
            }
            Input::Part(command) => (self.apply_part_command(command, now_ms, fx).0, None),
            Input::ReplayMessage { id } => (self.replay_dead_letter(*id, now_ms, fx), None),
            Input::Global { transfers, branches, origin, key } => {
                if let Some(tag) = key {
                    self.parts.note_keyed_checkout(tag, branches);
                }
                self.start_global(transfers, branches, client, origin.clone(), now_ms, fx);
                (true, None)
            }
            Input::Peer { from, messages } => {
                // The same software pipeline as for client requests, over
                // the accounts and records the messages' ops name.
                messages.iter().take(2 * APPLY_LOOKAHEAD).for_each(|m| self.prefetch_message(m, false));
                messages.iter().take(APPLY_LOOKAHEAD).for_each(|m| self.prefetch_message(m, true));
                for (index, message) in messages.iter().enumerate() {
                    if let Some(ahead) = messages.get(index + 2 * APPLY_LOOKAHEAD) {
                        self.prefetch_message(ahead, false);
                    }
                    if let Some(ahead) = messages.get(index + APPLY_LOOKAHEAD) {
                        self.prefetch_message(ahead, true);
                    }
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

    /// Asks for the index lines (`accounts` false) or the accounts a
    /// participant's message reads (see [`ExecutorCore::apply`]).
    fn prefetch_message(&self, message: &PeerMsg, accounts: bool) {
        let account = |id: &Id| match accounts {
            false => self.ledger.prefetch_account_index(id),
            true => self.ledger.prefetch_account(id),
        };
        let record = |id: &Id| {
            if !accounts {
                self.ledger.prefetch_record_index(id);
            }
        };
        match message {
            PeerMsg::Try { ops, .. } => {
                for op in ops {
                    match op {
                        TryOp::Hold(leg) => account(&leg.account_id),
                        TryOp::Reserve(t) => record(&t.id),
                        TryOp::LockPending { pending_id, .. } => record(pending_id),
                        TryOp::Part(_) => {}
                    }
                }
            }
            PeerMsg::Decide { ops, .. } => {
                for op in ops {
                    match op {
                        CommitOp::CommitHold { account_id, .. } => account(account_id),
                        CommitOp::CommitReservation { id, .. } => record(id),
                        CommitOp::FinishPending { pending_id, .. } => record(pending_id),
                        CommitOp::Settle { .. } | CommitOp::Part(_) => {}
                    }
                }
            }
            PeerMsg::Tried { .. }
            | PeerMsg::Acked { .. }
            | PeerMsg::Forget { .. }
            | PeerMsg::Deliver { .. }
            | PeerMsg::Delivered { .. } => {}
        }
    }

    /// Pending transfers on this executor whose timeout has passed.
    pub fn due_expiries(&self, now_ms: u64) -> Vec<Id> {
        self.ledger.due_expiries(now_ms, MAX_EXPIRIES_PER_TICK)
    }

    /// What the protocol does between batches (see `tcc/mod.rs`): returns
    /// the input that cancels the transactions whose deadline passed
    /// undecided, to be applied and logged like any other; pushes the
    /// messages sent again into `fx.outbox`, to leave with the batch; purges
    /// the fences whose retention passed. Bounded per call; costs a few
    /// comparisons when nothing is due.
    pub fn tick(&mut self, now_ms: u64, fx: &mut Effects) -> Option<Input> {
        let due = self.coordinator_tick(now_ms, fx);
        self.fences.purge(now_ms);
        self.outbox_tick(now_ms, fx);
        (!due.is_empty()).then_some(Input::Deadlines { txns: due })
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
        Some(self.book_local(record, now_ms, fx))
    }

    /// A posted transfer whose record and accounts all live here, applied
    /// whole (`Ledger::transfer_local`) with its history entries.
    pub(crate) fn book_local(&mut self, record: Transfer, now_ms: u64, fx: &mut Effects) -> TransferResult {
        let debit_shard = self.layout.shard_of_account(&record.debit_account_id);
        let credit_shard = self.layout.shard_of_account(&record.credit_account_id);
        match self.ledger.transfer_local(&record, debit_shard, credit_shard, now_ms) {
            Ok(LocalOutcome::Created { debit, credit, debit_slot, credit_slot }) => {
                let amount = record.amount;
                // Client accounts only, as on every path (a flow's system
                // accounts keep no chain).
                for (account, slot, side) in [
                    (&record.debit_account_id, debit_slot, Side::Debit),
                    (&record.credit_account_id, credit_slot, Side::Credit),
                ] {
                    if account.is_reserved() {
                        continue;
                    }
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
    pub(crate) fn book(
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
}

/// The record a create request makes, and the error that refuses it before
/// any state is read (same accounts, a reserved id, an expiry past the
/// clock's range), if any. Only for [`TransferRequest::Create`].
/// An idempotent replay rebuilds its answer's record with it.
pub fn create_record(request: &TransferRequest, now_ms: u64) -> (Transfer, Option<ErrorCode>) {
    create_record_as(request, now_ms, false)
}

/// [`create_record`] for a client (`system` false: reserved ids are
/// refused) or for a trade flow, whose transfers have system ids.
pub(crate) fn create_record_as(request: &TransferRequest, now_ms: u64, system: bool) -> (Transfer, Option<ErrorCode>) {
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
    if !system && (id.is_reserved() || debit_account_id.is_reserved() || credit_account_id.is_reserved()) {
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
pub(crate) fn placeholder(id: &Id, kind: TransferKind, details: &Details, now_ms: u64) -> Transfer {
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

/// The audit event of a transfer just made for a request from `origin`,
/// stamped with the transfer's own time.
pub(crate) fn audit_created(
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
    let open: std::collections::HashSet<TxnId> =
        cores.iter().flat_map(|core| core.coordinator.txns.keys().copied()).collect();
    let mut out = Vec::new();
    for core in cores {
        let mut leftover: Vec<TxnId> =
            core.fences.live().map(|(txn, _)| *txn).filter(|txn| !open.contains(txn)).collect();
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
    use crate::protocol::{CommitOp, TryOp};
    use crate::tcc::TXN_COUNTER_BITS;
    use peakstack_domain::ledger::Leg;
    use peakstack_domain::{AccountFlags, NewAccount};
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// A transaction that executor 0 coordinates, and its deadline.
    const TXN: TxnId = 7;
    const DEADLINE_MS: u64 = 10_000;

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
        PeerMsg::Decide { txn: TXN, commit: true, ops: vec![hold], deadline_ms: DEADLINE_MS }
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
        let try_hold =
            |leg: &Leg| PeerMsg::Try { txn: TXN, ops: vec![TryOp::Hold(leg.clone())], deadline_ms: DEADLINE_MS };
        let cancel = PeerMsg::Decide { txn: TXN, commit: false, ops: vec![], deadline_ms: DEADLINE_MS };
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
        core.coordinator.next_txn = (1 << TXN_COUNTER_BITS) - 1;
        assert_eq!(core.take_txn_id(), (1 << TXN_COUNTER_BITS) | ((1 << TXN_COUNTER_BITS) - 1));
        assert!(catch_unwind(AssertUnwindSafe(|| core.take_txn_id())).is_err());
    }
}
