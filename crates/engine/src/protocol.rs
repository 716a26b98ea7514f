//! What executors log and send each other.
//!
//! The log of an executor is the sequence of its [`Input`]s, batch by batch,
//! each batch stamped with the time it was applied. Replaying the inputs
//! through the same pure state machine rebuilds the same state. Inputs that
//! were refused without changing anything are not logged.
//!
//! A transaction that touches several executors runs TCC: the coordinator
//! sends `Try` with the operations for each participant, collects `Tried`,
//! decides, sends `Decide` (with the commit operations, or cancel), collects
//! `Acked`, answers the client and sends `Forget`. Each participant keeps a
//! fence per transaction so that every message is applied at most once, a
//! cancel that overtakes its try is recorded as `suspended`, and a try that
//! finds `suspended` is refused. Deadlines, resends and how long fences
//! are kept: see `tcc/mod.rs`.

use std::sync::Arc;

use crate::parts::PartCommand;
use peakstack_domain::ledger::{Leg, PendingInfo, ResolveKind};
use peakstack_domain::{AccountChange, Balances, ErrorCode, Id, NewAccount, Side, Transfer, TransferRequest};

/// A transaction id: the coordinator's executor id in the top 16 bits and its
/// sequence below. Never 0 (0 means "nobody" in the ledger).
pub type TxnId = u64;
pub type ExecutorId = u16;

#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    CreateAccount(NewAccount),
    /// Freeze, unfreeze or close an account this executor owns.
    ChangeAccount {
        id: Id,
        change: AccountChange,
    },
    /// A client's transfers, coordinated by this executor.
    Transfers {
        requests: Vec<TransferRequest>,
        atomic: bool,
        /// Who asked, for the audit trail; logged with the request, so the
        /// audit record of a change is durable with the change itself.
        origin: Option<Origin>,
    },
    /// Pending transfers on this executor whose timeout passed.
    Expire {
        pending_ids: Vec<Id>,
    },
    /// A command of one of the parts the executor hosts (see `parts.rs`).
    Part(PartCommand),
    /// Transactions this executor coordinates whose deadline passed
    /// undecided (found by the tick): each still undecided is cancelled.
    Deadlines {
        txns: Vec<TxnId>,
    },
    /// A global transaction of a trade flow (a checkout): the flow's
    /// transfers (system ids, made only by the flows) and the branches of
    /// the parts (each part's try command, see [`PartCommand::branch`]),
    /// all confirmed or all cancelled. Coordinated by this executor; on one
    /// executor it is one atomic step with no messages.
    Global {
        transfers: Vec<TransferRequest>,
        branches: Vec<PartCommand>,
        origin: Option<Origin>,
        /// The Idempotency-Key of the request that placed it (a checkout):
        /// a retry whose answer a crash lost finds the checkout by it.
        key: Option<IdempotencyTag>,
    },
    /// An operator's replay of a dead letter this executor keeps (see `outbox.rs`).
    ReplayMessage {
        id: u64,
    },
    /// Messages from another executor (or, in a replay, from this one).
    Peer {
        from: ExecutorId,
        messages: Vec<PeerMsg>,
    },
}

/// Who made a request: the API key's id and the request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub key_id: Arc<str>,
    pub request_id: Arc<str>,
    /// The request's Idempotency-Key, when its answer is to be rebuilt
    /// from the log: logged with the request (one fsync for both), and
    /// handed to the audit feed with the answer's balances.
    pub idempotency: Option<IdempotencyTag>,
}

/// An Idempotency-Key as the log keeps it: a hash of the key (with the
/// caller it belongs to) and of the request it came with, 16 bytes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyTag {
    pub key_hash: [u8; 16],
    pub fingerprint: [u8; 16],
}

/// The balances a create answered with, kept for a keyed request so that
/// a replay answers byte for byte the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnsweredBalances {
    pub debit: Option<Balances>,
    pub credit: Option<Balances>,
}

/// A transfer a request with an [`Origin`] created (a post or void
/// included), in the order the executor made them.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub origin: Origin,
    pub time_ms: u64,
    pub transfer: Transfer,
    /// Set when the origin has an [`IdempotencyTag`].
    pub answered: Option<Box<AnsweredBalances>>,
}

/// The audit events of one durable log batch of one executor. `(executor,
/// sequence)` names it: replaying the log after a crash makes the same
/// batch with the same events again.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditBatch {
    pub executor: ExecutorId,
    pub sequence: u64,
    pub events: Vec<AuditEvent>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PeerMsg {
    /// `deadline_ms`: the transaction's deadline (see `tcc/mod.rs`); a
    /// participant refuses a try that comes at or after it.
    Try {
        txn: TxnId,
        ops: Vec<TryOp>,
        deadline_ms: u64,
    },
    Tried {
        txn: TxnId,
        results: Vec<OpResult>,
    },
    Decide {
        txn: TxnId,
        commit: bool,
        ops: Vec<CommitOp>,
        deadline_ms: u64,
    },
    Acked {
        txn: TxnId,
        balances: Vec<(Id, Balances)>,
    },
    Forget {
        txn: TxnId,
    },
    /// A reliable message (see `outbox.rs`): `floor` is the lowest id the
    /// sender still keeps for this receiver.
    Deliver {
        id: u64,
        floor: u64,
        command: PartCommand,
    },
    /// Its answer: applied (now or before), or refused with this code.
    Delivered {
        id: u64,
        error: Option<ErrorCode>,
    },
}

impl PeerMsg {
    pub fn txn(&self) -> TxnId {
        match self {
            PeerMsg::Try { txn, .. }
            | PeerMsg::Tried { txn, .. }
            | PeerMsg::Decide { txn, .. }
            | PeerMsg::Acked { txn, .. }
            | PeerMsg::Forget { txn } => *txn,
            PeerMsg::Deliver { .. } | PeerMsg::Delivered { .. } => 0,
        }
    }
}

/// Phase one of a transaction on one participant.
#[derive(Clone, Debug, PartialEq)]
pub enum TryOp {
    /// Reserve a transfer id on its home shard.
    Reserve(Transfer),
    /// Hold one side of a movement.
    Hold(Leg),
    /// Lock a pending transfer on its home shard for a post, void or expiry.
    LockPending { pending_id: Id, kind: ResolveKind },
    /// A part's branch try (reserve stock, consume a promotion's budget,
    /// lock a coupon, place a checkout), stamped with its transaction.
    Part(PartCommand),
}

#[derive(Clone, Debug, PartialEq)]
pub enum OpResult {
    Ok,
    /// The transfer id exists with the same fields (idempotent retry).
    Exists(Transfer),
    /// A locked pending transfer's accounts and amount.
    Pending(PendingInfo),
    Err(ErrorCode),
}

/// Phase two, when the coordinator commits.
#[derive(Clone, Debug, PartialEq)]
pub enum CommitOp {
    CommitHold {
        transfer_id: Id,
        side: Side,
        account_id: Id,
    },
    CommitReservation {
        id: Id,
        filled: Option<Transfer>,
    },
    FinishPending {
        pending_id: Id,
        kind: ResolveKind,
    },
    /// Settle a pending transfer's hold; `by` is the post or void doing it
    /// (none for an expiry).
    Settle {
        pending_id: Id,
        side: Side,
        post_amount: u64,
        by: Option<Id>,
    },
    /// Confirm a part's branch (the confirm command of its try).
    Part(PartCommand),
}

/// What the engine answers for one transfer.
#[derive(Clone, Debug, PartialEq)]
pub struct TransferOutcome {
    /// False when the transfer existed already (an idempotent retry).
    pub created: bool,
    pub transfer: Transfer,
    /// Balances of the debit and credit accounts right after the transfer
    /// (absent for an existing transfer).
    pub debit_balances: Option<Balances>,
    pub credit_balances: Option<Balances>,
}

pub type TransferResult = Result<TransferOutcome, ErrorCode>;
