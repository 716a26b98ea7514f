//! Transfers: what a client asks for, and the record the ledger keeps.

use crate::{Amount, Currency, Id};

/// Longest transfer reference, in bytes.
pub const MAX_REFERENCE_LEN: usize = 64;

/// What a client may attach to a transfer, kept verbatim. Rare next to the
/// record's other fields, so a record holds it boxed: a transfer without
/// it grows by one pointer (the records are kept small for the cache).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TransferDetails {
    /// A JSON object as compact text (bounded by the server as accounts'
    /// metadata is).
    pub metadata: Option<Box<str>>,
    /// The client's own name for it, e.g. a merchant's order number:
    /// 1-[`MAX_REFERENCE_LEN`] bytes.
    pub reference: Option<Box<str>>,
}

/// Details of a transfer, or `None`; never `Some` with both fields empty,
/// so that "nothing attached" has one form and compares equal.
pub type Details = Option<Box<TransferDetails>>;

impl TransferDetails {
    /// The details of `metadata` and `reference`, `None` if neither is given.
    pub fn of(metadata: Option<Box<str>>, reference: Option<Box<str>>) -> Details {
        (metadata.is_some() || reference.is_some()).then(|| Box::new(TransferDetails { metadata, reference }))
    }
}

/// What a client asks for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum TransferRequest {
    /// Move `amount` now, or hold it if `pending` (released after `timeout_ms`
    /// unless posted or voided first; 0 = no timeout).
    Create {
        id: Id,
        debit_account_id: Id,
        credit_account_id: Id,
        amount: Amount,
        currency: Currency,
        pending: bool,
        timeout_ms: u64,
        details: Details,
    },
    /// Post a pending transfer, in full (`amount: None`) or in part.
    Post { id: Id, pending_id: Id, amount: Option<Amount>, details: Details },
    /// Release a pending transfer's hold.
    Void { id: Id, pending_id: Id, details: Details },
}

impl TransferRequest {
    pub fn id(&self) -> &Id {
        match self {
            TransferRequest::Create { id, .. }
            | TransferRequest::Post { id, .. }
            | TransferRequest::Void { id, .. } => id,
        }
    }

    /// The pending transfer this request resolves, if it is a post or void.
    pub fn pending_id(&self) -> Option<&Id> {
        match self {
            TransferRequest::Create { .. } => None,
            TransferRequest::Post { pending_id, .. } | TransferRequest::Void { pending_id, .. } => Some(pending_id),
        }
    }

    pub fn details(&self) -> &Details {
        match self {
            TransferRequest::Create { details, .. }
            | TransferRequest::Post { details, .. }
            | TransferRequest::Void { details, .. } => details,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum TransferKind {
    /// Moved at once.
    Single,
    /// A hold; `expires_at_ms` is 0 when it never expires.
    Pending {
        timeout_ms: u64,
        expires_at_ms: u64,
    },
    /// Posted `pending_id`; `requested` is the amount the client named, if any.
    Post {
        pending_id: Id,
        requested: Option<u64>,
    },
    Void {
        pending_id: Id,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TransferStatus {
    Posted,
    Pending,
    Voided,
    Expired,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Posted => "posted",
            TransferStatus::Pending => "pending",
            TransferStatus::Voided => "voided",
            TransferStatus::Expired => "expired",
        }
    }
}

/// The ledger's record of a transfer, kept on the shard of its id.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transfer {
    pub id: Id,
    pub debit_account_id: Id,
    pub credit_account_id: Id,
    /// For a pending transfer: the amount held. For a post: the amount posted.
    pub amount: u64,
    pub currency: Currency,
    pub kind: TransferKind,
    pub status: TransferStatus,
    /// For a pending transfer that was posted: how much.
    pub posted_amount: Option<u64>,
    pub timestamp_ms: u64,
    /// The client's metadata and reference, if any.
    pub details: Details,
}

impl Transfer {
    /// Whether `other` asks for the same transfer as this record (an
    /// idempotent retry). Status, timestamps and derived fields do not count;
    /// a post or void is compared by what its client named. Metadata and
    /// reference count, as an account's metadata does.
    pub fn same_request_as(&self, other: &Transfer) -> bool {
        self.details == other.details && self.same_kind_as(other)
    }

    fn same_kind_as(&self, other: &Transfer) -> bool {
        match (&self.kind, &other.kind) {
            (TransferKind::Single, TransferKind::Single) => self.same_movement(other),
            (TransferKind::Pending { timeout_ms: a, .. }, TransferKind::Pending { timeout_ms: b, .. }) => {
                a == b && self.same_movement(other)
            }
            (
                TransferKind::Post { pending_id: a, requested: x },
                TransferKind::Post { pending_id: b, requested: y },
            ) => a == b && x == y,
            (TransferKind::Void { pending_id: a }, TransferKind::Void { pending_id: b }) => a == b,
            _ => false,
        }
    }

    fn same_movement(&self, other: &Transfer) -> bool {
        self.debit_account_id == other.debit_account_id
            && self.credit_account_id == other.credit_account_id
            && self.amount == other.amount
            && self.currency == other.currency
    }

    pub fn pending_id(&self) -> Option<&Id> {
        match &self.kind {
            TransferKind::Post { pending_id, .. } | TransferKind::Void { pending_id } => Some(pending_id),
            _ => None,
        }
    }
}
