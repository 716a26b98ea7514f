//! The binary encoding of log records and messages.
//!
//! Little-endian fixed-width integers, LEB128 varints for lengths and small
//! numbers, strings as varint length + UTF-8. Every decode checks bounds and
//! validity and fails with [`CodecError`] instead of panicking: a log is
//! input from disk and is not trusted.

use peakstack_domain::ledger::{Leg, PendingInfo, ResolveKind};
use peakstack_domain::{
    AccountChange, AccountFlags, Amount, Balances, Currency, Details, ErrorCode, Id, NewAccount, Owner, Side, Transfer,
    TransferDetails, TransferKind, TransferRequest, TransferStatus,
};

use std::sync::Arc;

use crate::protocol::{CommitOp, IdempotencyTag, Input, OpResult, Origin, PeerMsg, TryOp};
use crate::tcc::NO_DEADLINE;

pub use peakstack_domain::wire::{CodecError, Reader, Writer};

type Result<T> = std::result::Result<T, CodecError>;

/// A value with a binary form.
pub trait Codec: Sized {
    fn encode(&self, w: &mut Writer);
    fn decode(r: &mut Reader<'_>) -> Result<Self>;
}

impl Codec for Id {
    fn encode(&self, w: &mut Writer) {
        w.str(self.as_str());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Id::parse(r.str()?).ok_or(CodecError("invalid id"))
    }
}

impl Codec for Currency {
    fn encode(&self, w: &mut Writer) {
        w.buf.extend_from_slice(&self.as_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Currency::from_bytes(r.array::<3>()?).ok_or(CodecError("invalid currency"))
    }
}

impl Codec for u64 {
    fn encode(&self, w: &mut Writer) {
        w.varint(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        r.varint()
    }
}

impl<T: Codec> Codec for Vec<T> {
    fn encode(&self, w: &mut Writer) {
        w.varint(self.len() as u64);
        for item in self {
            item.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let n = r.len()?;
        let mut items = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            items.push(T::decode(r)?);
        }
        Ok(items)
    }
}

impl<T: Codec> Codec for Option<T> {
    fn encode(&self, w: &mut Writer) {
        match self {
            None => w.u8(0),
            Some(v) => {
                w.u8(1);
                v.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(r)?)),
            _ => Err(CodecError("invalid option")),
        }
    }
}

impl<A: Codec, B: Codec> Codec for (A, B) {
    fn encode(&self, w: &mut Writer) {
        self.0.encode(w);
        self.1.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok((A::decode(r)?, B::decode(r)?))
    }
}

impl Codec for Side {
    fn encode(&self, w: &mut Writer) {
        w.u8(match self {
            Side::Debit => 0,
            Side::Credit => 1,
        });
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        match r.u8()? {
            0 => Ok(Side::Debit),
            1 => Ok(Side::Credit),
            _ => Err(CodecError("invalid side")),
        }
    }
}

/// Varints of u128: the bytes of u64 varints for values below 2^64, so a
/// log or checkpoint written when balances were u64 reads unchanged.
impl Codec for Balances {
    fn encode(&self, w: &mut Writer) {
        w.varint_u128(self.debits_pending);
        w.varint_u128(self.debits_posted);
        w.varint_u128(self.credits_pending);
        w.varint_u128(self.credits_posted);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Balances {
            debits_pending: r.varint_u128()?,
            debits_posted: r.varint_u128()?,
            credits_pending: r.varint_u128()?,
            credits_posted: r.varint_u128()?,
        })
    }
}

impl Codec for ErrorCode {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.tag());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        ErrorCode::from_tag(r.u8()?).ok_or(CodecError("invalid error code"))
    }
}

/// The fields a client names when it opens an account, shared by the
/// encodings of `NewAccount` (in the log) and `Account` (in checkpoints).
fn encode_account_spec(w: &mut Writer, spec: AccountSpec<'_>) {
    spec.id.encode(w);
    spec.currency.encode(w);
    w.u8(spec.flags.bits());
    w.varint(spec.overdraft_limit);
    // One tag byte for the optional fields: bit 0 metadata, bit 1 owner.
    // Data written before owners existed has tags 0 and 1 only.
    let tag = u8::from(spec.metadata.is_some()) | u8::from(spec.owner.is_some()) << 1;
    w.u8(tag);
    if let Some(metadata) = spec.metadata {
        w.str(metadata);
    }
    if let Some(owner) = spec.owner {
        w.str(&owner.to_string());
    }
}

struct AccountSpec<'a> {
    id: &'a Id,
    currency: Currency,
    flags: AccountFlags,
    overdraft_limit: u64,
    metadata: Option<&'a str>,
    owner: Option<&'a Owner>,
}

impl Codec for NewAccount {
    fn encode(&self, w: &mut Writer) {
        encode_account_spec(
            w,
            AccountSpec {
                id: &self.id,
                currency: self.currency,
                flags: self.flags,
                overdraft_limit: self.overdraft_limit,
                metadata: self.metadata.as_deref(),
                owner: self.owner.as_ref(),
            },
        );
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let id = Id::decode(r)?;
        let currency = Currency::decode(r)?;
        let flags = AccountFlags::from_bits(r.u8()?).ok_or(CodecError("invalid flags"))?;
        let overdraft_limit = r.varint()?;
        let tag = r.u8()?;
        if tag > 3 {
            return Err(CodecError("invalid optional account fields"));
        }
        let metadata = if tag & 1 != 0 { Some(r.str()?.into()) } else { None };
        let owner = if tag & 2 != 0 { Some(Owner::parse(r.str()?).ok_or(CodecError("invalid owner"))?) } else { None };
        Ok(NewAccount { id, currency, flags, overdraft_limit, metadata, owner })
    }
}

fn amount(r: &mut Reader<'_>) -> Result<Amount> {
    Amount::new(r.varint()?).ok_or(CodecError("invalid amount"))
}

/// The tag bit of a transfer request or record that says details follow its
/// fields. Logs, checkpoints and archives written before transfers had
/// details never set it, so they read as they are; a transfer without
/// details is encoded exactly as before.
const DETAILS_FOLLOW: u8 = 0x10;

fn details_bit(details: &Details) -> u8 {
    if details.is_some() {
        DETAILS_FOLLOW
    } else {
        0
    }
}

/// Splits a tag into its value and whether details follow.
fn split_tag(tag: u8) -> (u8, bool) {
    (tag & !DETAILS_FOLLOW, tag & DETAILS_FOLLOW != 0)
}

/// One tag byte (bit 0 metadata, bit 1 reference), then the strings.
fn encode_details(w: &mut Writer, details: &Details) {
    let Some(details) = details else { return };
    w.u8(u8::from(details.metadata.is_some()) | u8::from(details.reference.is_some()) << 1);
    if let Some(metadata) = &details.metadata {
        w.str(metadata);
    }
    if let Some(reference) = &details.reference {
        w.str(reference);
    }
}

fn decode_details(r: &mut Reader<'_>, follow: bool) -> Result<Details> {
    if !follow {
        return Ok(None);
    }
    let tag = r.u8()?;
    // Tag 0 is never written: no details is `None`, not an empty box.
    if tag == 0 || tag > 3 {
        return Err(CodecError("invalid transfer details"));
    }
    let metadata = if tag & 1 != 0 { Some(r.str()?.into()) } else { None };
    let reference = if tag & 2 != 0 { Some(r.str()?.into()) } else { None };
    Ok(TransferDetails::of(metadata, reference))
}

impl Codec for TransferRequest {
    fn encode(&self, w: &mut Writer) {
        let bit = details_bit(self.details());
        match self {
            TransferRequest::Create {
                id,
                debit_account_id,
                credit_account_id,
                amount,
                currency,
                pending,
                timeout_ms,
                details: _,
            } => {
                w.u8(bit);
                id.encode(w);
                debit_account_id.encode(w);
                credit_account_id.encode(w);
                w.varint(amount.get());
                currency.encode(w);
                w.bool(*pending);
                w.varint(*timeout_ms);
            }
            TransferRequest::Post { id, pending_id, amount, details: _ } => {
                w.u8(1 | bit);
                id.encode(w);
                pending_id.encode(w);
                amount.map(Amount::get).encode(w);
            }
            TransferRequest::Void { id, pending_id, details: _ } => {
                w.u8(2 | bit);
                id.encode(w);
                pending_id.encode(w);
            }
        }
        encode_details(w, self.details());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let (tag, follow) = split_tag(r.u8()?);
        Ok(match tag {
            0 => {
                let id = Id::decode(r)?;
                let debit_account_id = Id::decode(r)?;
                let credit_account_id = Id::decode(r)?;
                let amount = amount(r)?;
                let currency = Currency::decode(r)?;
                let pending = r.bool()?;
                let timeout_ms = r.varint()?;
                let details = decode_details(r, follow)?;
                TransferRequest::Create {
                    id,
                    debit_account_id,
                    credit_account_id,
                    amount,
                    currency,
                    pending,
                    timeout_ms,
                    details,
                }
            }
            1 => {
                let id = Id::decode(r)?;
                let pending_id = Id::decode(r)?;
                let amount = match Option::<u64>::decode(r)? {
                    None => None,
                    Some(v) => Some(Amount::new(v).ok_or(CodecError("invalid amount"))?),
                };
                TransferRequest::Post { id, pending_id, amount, details: decode_details(r, follow)? }
            }
            2 => {
                let id = Id::decode(r)?;
                let pending_id = Id::decode(r)?;
                TransferRequest::Void { id, pending_id, details: decode_details(r, follow)? }
            }
            _ => return Err(CodecError("invalid transfer request")),
        })
    }
}

/// A kind's tag (with `bit` or'ed in) and fields.
fn encode_kind(kind: &TransferKind, bit: u8, w: &mut Writer) {
    match kind {
        TransferKind::Single => w.u8(bit),
        TransferKind::Pending { timeout_ms, expires_at_ms } => {
            w.u8(1 | bit);
            w.varint(*timeout_ms);
            w.varint(*expires_at_ms);
        }
        TransferKind::Post { pending_id, requested } => {
            w.u8(2 | bit);
            pending_id.encode(w);
            requested.encode(w);
        }
        TransferKind::Void { pending_id } => {
            w.u8(3 | bit);
            pending_id.encode(w);
        }
    }
}

/// A kind, and whether its tag said details follow the record.
fn decode_kind(r: &mut Reader<'_>) -> Result<(TransferKind, bool)> {
    let (tag, follow) = split_tag(r.u8()?);
    let kind = match tag {
        0 => TransferKind::Single,
        1 => TransferKind::Pending { timeout_ms: r.varint()?, expires_at_ms: r.varint()? },
        2 => TransferKind::Post { pending_id: Id::decode(r)?, requested: Option::decode(r)? },
        3 => TransferKind::Void { pending_id: Id::decode(r)? },
        _ => return Err(CodecError("invalid transfer kind")),
    };
    Ok((kind, follow))
}

impl Codec for TransferStatus {
    fn encode(&self, w: &mut Writer) {
        w.u8(match self {
            TransferStatus::Posted => 0,
            TransferStatus::Pending => 1,
            TransferStatus::Voided => 2,
            TransferStatus::Expired => 3,
        });
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => TransferStatus::Posted,
            1 => TransferStatus::Pending,
            2 => TransferStatus::Voided,
            3 => TransferStatus::Expired,
            _ => return Err(CodecError("invalid status")),
        })
    }
}

impl Codec for Transfer {
    fn encode(&self, w: &mut Writer) {
        self.id.encode(w);
        self.debit_account_id.encode(w);
        self.credit_account_id.encode(w);
        w.varint(self.amount);
        self.currency.encode(w);
        encode_kind(&self.kind, details_bit(&self.details), w);
        self.status.encode(w);
        self.posted_amount.encode(w);
        w.varint(self.timestamp_ms);
        encode_details(w, &self.details);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let id = Id::decode(r)?;
        let debit_account_id = Id::decode(r)?;
        let credit_account_id = Id::decode(r)?;
        let amount = r.varint()?;
        let currency = Currency::decode(r)?;
        let (kind, follow) = decode_kind(r)?;
        Ok(Transfer {
            id,
            debit_account_id,
            credit_account_id,
            amount,
            currency,
            kind,
            status: TransferStatus::decode(r)?,
            posted_amount: Option::decode(r)?,
            timestamp_ms: r.varint()?,
            details: decode_details(r, follow)?,
        })
    }
}

impl Codec for Leg {
    fn encode(&self, w: &mut Writer) {
        self.transfer_id.encode(w);
        self.side.encode(w);
        self.account_id.encode(w);
        self.currency.encode(w);
        w.varint(self.amount);
        w.u8(u8::from(self.via_clearing) | (u8::from(self.pending) << 1));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let transfer_id = Id::decode(r)?;
        let side = Side::decode(r)?;
        let account_id = Id::decode(r)?;
        let currency = Currency::decode(r)?;
        let amount = r.varint()?;
        let bits = r.u8()?;
        if bits > 3 {
            return Err(CodecError("invalid leg flags"));
        }
        Ok(Leg { transfer_id, side, account_id, currency, amount, via_clearing: bits & 1 != 0, pending: bits & 2 != 0 })
    }
}

impl Codec for ResolveKind {
    fn encode(&self, w: &mut Writer) {
        match self {
            ResolveKind::Post(amount) => {
                w.u8(0);
                amount.encode(w);
            }
            ResolveKind::Void => w.u8(1),
            ResolveKind::Expire => w.u8(2),
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => ResolveKind::Post(Option::decode(r)?),
            1 => ResolveKind::Void,
            2 => ResolveKind::Expire,
            _ => return Err(CodecError("invalid resolve kind")),
        })
    }
}

impl Codec for PendingInfo {
    fn encode(&self, w: &mut Writer) {
        self.debit_account_id.encode(w);
        self.credit_account_id.encode(w);
        w.varint(self.amount);
        self.currency.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(PendingInfo {
            debit_account_id: Id::decode(r)?,
            credit_account_id: Id::decode(r)?,
            amount: r.varint()?,
            currency: Currency::decode(r)?,
        })
    }
}

impl Codec for TryOp {
    fn encode(&self, w: &mut Writer) {
        match self {
            TryOp::Reserve(t) => {
                w.u8(0);
                t.encode(w);
            }
            TryOp::Hold(leg) => {
                w.u8(1);
                leg.encode(w);
            }
            TryOp::LockPending { pending_id, kind } => {
                w.u8(2);
                pending_id.encode(w);
                kind.encode(w);
            }
            TryOp::Part(command) => {
                w.u8(3);
                command.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => TryOp::Reserve(Transfer::decode(r)?),
            1 => TryOp::Hold(Leg::decode(r)?),
            2 => TryOp::LockPending { pending_id: Id::decode(r)?, kind: ResolveKind::decode(r)? },
            3 => TryOp::Part(crate::parts::PartCommand::decode(r)?),
            _ => return Err(CodecError("invalid try op")),
        })
    }
}

impl Codec for OpResult {
    fn encode(&self, w: &mut Writer) {
        match self {
            OpResult::Ok => w.u8(0),
            OpResult::Exists(t) => {
                w.u8(1);
                t.encode(w);
            }
            OpResult::Pending(p) => {
                w.u8(2);
                p.encode(w);
            }
            OpResult::Err(e) => {
                w.u8(3);
                e.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => OpResult::Ok,
            1 => OpResult::Exists(Transfer::decode(r)?),
            2 => OpResult::Pending(PendingInfo::decode(r)?),
            3 => OpResult::Err(ErrorCode::decode(r)?),
            _ => return Err(CodecError("invalid op result")),
        })
    }
}

impl Codec for CommitOp {
    fn encode(&self, w: &mut Writer) {
        match self {
            CommitOp::CommitHold { transfer_id, side, account_id } => {
                w.u8(0);
                transfer_id.encode(w);
                side.encode(w);
                account_id.encode(w);
            }
            CommitOp::CommitReservation { id, filled } => {
                w.u8(1);
                id.encode(w);
                filled.encode(w);
            }
            CommitOp::FinishPending { pending_id, kind } => {
                w.u8(2);
                pending_id.encode(w);
                kind.encode(w);
            }
            CommitOp::Settle { pending_id, side, post_amount, by } => {
                w.u8(3);
                pending_id.encode(w);
                side.encode(w);
                w.varint(*post_amount);
                by.encode(w);
            }
            CommitOp::Part(command) => {
                w.u8(4);
                command.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => {
                CommitOp::CommitHold { transfer_id: Id::decode(r)?, side: Side::decode(r)?, account_id: Id::decode(r)? }
            }
            1 => CommitOp::CommitReservation { id: Id::decode(r)?, filled: Option::decode(r)? },
            2 => CommitOp::FinishPending { pending_id: Id::decode(r)?, kind: ResolveKind::decode(r)? },
            3 => CommitOp::Settle {
                pending_id: Id::decode(r)?,
                side: Side::decode(r)?,
                post_amount: r.varint()?,
                by: Option::decode(r)?,
            },
            4 => CommitOp::Part(crate::parts::PartCommand::decode(r)?),
            _ => return Err(CodecError("invalid commit op")),
        })
    }
}

/// Peer message tags: 0-4 as first written; 5 and 6 are `Try` and
/// `Decide` with their transaction's deadline (0 and 2, logged before
/// deadlines existed, read with [`NO_DEADLINE`]).
impl Codec for PeerMsg {
    fn encode(&self, w: &mut Writer) {
        match self {
            PeerMsg::Try { txn, ops, deadline_ms } => {
                w.u8(5);
                w.u64(*txn);
                w.varint(*deadline_ms);
                ops.encode(w);
            }
            PeerMsg::Tried { txn, results } => {
                w.u8(1);
                w.u64(*txn);
                results.encode(w);
            }
            PeerMsg::Decide { txn, commit, ops, deadline_ms } => {
                w.u8(6);
                w.u64(*txn);
                w.varint(*deadline_ms);
                w.bool(*commit);
                ops.encode(w);
            }
            PeerMsg::Acked { txn, balances } => {
                w.u8(3);
                w.u64(*txn);
                balances.encode(w);
            }
            PeerMsg::Forget { txn } => {
                w.u8(4);
                w.u64(*txn);
            }
            PeerMsg::Deliver { id, floor, command } => {
                w.u8(7);
                w.varint(*id);
                w.varint(*floor);
                command.encode(w);
            }
            PeerMsg::Delivered { id, error } => {
                w.u8(8);
                w.varint(*id);
                error.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => PeerMsg::Try { txn: r.u64()?, ops: Vec::decode(r)?, deadline_ms: NO_DEADLINE },
            5 => PeerMsg::Try { txn: r.u64()?, deadline_ms: r.varint()?, ops: Vec::decode(r)? },
            1 => PeerMsg::Tried { txn: r.u64()?, results: Vec::decode(r)? },
            2 => PeerMsg::Decide { txn: r.u64()?, commit: r.bool()?, ops: Vec::decode(r)?, deadline_ms: NO_DEADLINE },
            6 => PeerMsg::Decide { txn: r.u64()?, deadline_ms: r.varint()?, commit: r.bool()?, ops: Vec::decode(r)? },
            3 => PeerMsg::Acked { txn: r.u64()?, balances: Vec::decode(r)? },
            4 => PeerMsg::Forget { txn: r.u64()? },
            7 => {
                PeerMsg::Deliver { id: r.varint()?, floor: r.varint()?, command: crate::parts::PartCommand::decode(r)? }
            }
            8 => PeerMsg::Delivered { id: r.varint()?, error: Option::decode(r)? },
            _ => return Err(CodecError("invalid peer message")),
        })
    }
}

impl Codec for Input {
    fn encode(&self, w: &mut Writer) {
        match self {
            Input::CreateAccount(new) => {
                w.u8(0);
                new.encode(w);
            }
            Input::Transfers { requests, atomic, origin: None } => {
                w.u8(1);
                w.bool(*atomic);
                requests.encode(w);
            }
            Input::Transfers { requests, atomic, origin: Some(origin) } => {
                w.u8(if origin.idempotency.is_some() { 6 } else { 4 });
                w.bool(*atomic);
                requests.encode(w);
                w.str(&origin.key_id);
                w.str(&origin.request_id);
                if let Some(tag) = &origin.idempotency {
                    w.buf.extend_from_slice(&tag.key_hash);
                    w.buf.extend_from_slice(&tag.fingerprint);
                }
            }
            Input::ChangeAccount { id, change } => {
                w.u8(5);
                id.encode(w);
                w.u8(change.tag());
            }
            Input::Expire { pending_ids } => {
                w.u8(2);
                pending_ids.encode(w);
            }
            Input::Part(command) => {
                w.u8(7);
                command.encode(w);
            }
            Input::Deadlines { txns } => {
                w.u8(8);
                w.varint(txns.len() as u64);
                for txn in txns {
                    w.u64(*txn);
                }
            }
            Input::Global { transfers, branches, origin, key } => {
                w.u8(9);
                transfers.encode(w);
                w.varint(branches.len() as u64);
                for branch in branches {
                    branch.encode(w);
                }
                w.bool(origin.is_some());
                if let Some(origin) = origin {
                    w.str(&origin.key_id);
                    w.str(&origin.request_id);
                    w.bool(origin.idempotency.is_some());
                    if let Some(tag) = &origin.idempotency {
                        w.buf.extend_from_slice(&tag.key_hash);
                        w.buf.extend_from_slice(&tag.fingerprint);
                    }
                }
                w.bool(key.is_some());
                if let Some(tag) = key {
                    w.buf.extend_from_slice(&tag.key_hash);
                    w.buf.extend_from_slice(&tag.fingerprint);
                }
            }
            Input::ReplayMessage { id } => {
                w.u8(10);
                w.varint(*id);
            }
            Input::Peer { from, messages } => {
                w.u8(3);
                w.varint(u64::from(*from));
                messages.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => Input::CreateAccount(NewAccount::decode(r)?),
            1 => {
                let atomic = r.bool()?;
                Input::Transfers { requests: Vec::decode(r)?, atomic, origin: None }
            }
            tag @ (4 | 6) => {
                let atomic = r.bool()?;
                let requests = Vec::decode(r)?;
                let key_id = Arc::from(r.str()?);
                let request_id = Arc::from(r.str()?);
                let idempotency = match tag {
                    6 => Some(IdempotencyTag { key_hash: r.array()?, fingerprint: r.array()? }),
                    _ => None,
                };
                Input::Transfers { requests, atomic, origin: Some(Origin { key_id, request_id, idempotency }) }
            }
            5 => {
                let id = Id::decode(r)?;
                let change = AccountChange::from_tag(r.u8()?).ok_or(CodecError("invalid account change"))?;
                Input::ChangeAccount { id, change }
            }
            2 => Input::Expire { pending_ids: Vec::decode(r)? },
            7 => Input::Part(crate::parts::PartCommand::decode(r)?),
            8 => {
                let mut txns = Vec::new();
                for _ in 0..r.len()? {
                    txns.push(r.u64()?);
                }
                Input::Deadlines { txns }
            }
            9 => {
                let transfers = Vec::decode(r)?;
                let mut branches = Vec::new();
                for _ in 0..r.len()? {
                    branches.push(crate::parts::PartCommand::decode(r)?);
                }
                let origin = match r.bool()? {
                    false => None,
                    true => {
                        let key_id = Arc::from(r.str()?);
                        let request_id = Arc::from(r.str()?);
                        let idempotency = match r.bool()? {
                            true => Some(IdempotencyTag { key_hash: r.array()?, fingerprint: r.array()? }),
                            false => None,
                        };
                        Some(Origin { key_id, request_id, idempotency })
                    }
                };
                let key = match r.bool()? {
                    true => Some(IdempotencyTag { key_hash: r.array()?, fingerprint: r.array()? }),
                    false => None,
                };
                Input::Global { transfers, branches, origin, key }
            }
            10 => Input::ReplayMessage { id: r.varint()? },
            3 => Input::Peer {
                from: u16::try_from(r.varint()?).map_err(|_| CodecError("invalid executor"))?,
                messages: Vec::decode(r)?,
            },
            _ => return Err(CodecError("invalid input")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn round_trip(input: Input) {
        let mut w = Writer::default();
        input.encode(&mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(Input::decode(&mut r).unwrap(), input);
        assert!(r.is_empty());
        // Every strict prefix is refused, never misread.
        for cut in 0..w.buf.len() {
            let mut r = Reader::new(&w.buf[..cut]);
            assert!(Input::decode(&mut r).is_err(), "prefix {cut} decoded");
        }
    }

    #[test]
    fn inputs_round_trip_and_truncation_is_detected() {
        let usd = Currency::parse("USD").unwrap();
        let transfer = Transfer {
            id: id("t1"),
            debit_account_id: id("a"),
            credit_account_id: id("b"),
            amount: 5,
            currency: usd,
            kind: TransferKind::Pending { timeout_ms: 10, expires_at_ms: 99 },
            status: TransferStatus::Pending,
            posted_amount: None,
            timestamp_ms: 89,
            details: None,
        };
        for change in [AccountChange::Freeze, AccountChange::Unfreeze, AccountChange::Close] {
            round_trip(Input::ChangeAccount { id: id("a"), change });
        }
        round_trip(Input::CreateAccount(NewAccount {
            id: id("a"),
            currency: usd,
            flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            overdraft_limit: 7,
            metadata: Some("{\"k\":1}".into()),
            owner: Owner::parse("merchant:m1"),
        }));
        round_trip(Input::Transfers {
            requests: vec![
                TransferRequest::Create {
                    id: id("t1"),
                    debit_account_id: id("a"),
                    credit_account_id: id("b"),
                    amount: Amount::new(300).unwrap(),
                    currency: usd,
                    pending: true,
                    timeout_ms: 1000,
                    details: details(Some("{\"order\":[1,2]}"), Some("ord-1")),
                },
                TransferRequest::Post { id: id("p"), pending_id: id("t1"), amount: Amount::new(2), details: None },
                TransferRequest::Void { id: id("v"), pending_id: id("t1"), details: None },
            ],
            atomic: true,
            origin: None,
        });
        round_trip(Input::Transfers {
            requests: vec![TransferRequest::Void { id: id("v"), pending_id: id("t1"), details: None }],
            atomic: false,
            origin: Some(Origin {
                key_id: Arc::from("0123456789abcdef"),
                request_id: Arc::from("req-1"),
                idempotency: None,
            }),
        });
        round_trip(Input::Transfers {
            requests: vec![TransferRequest::Void { id: id("v"), pending_id: id("t1"), details: None }],
            atomic: false,
            origin: Some(Origin {
                key_id: Arc::from("0123456789abcdef"),
                request_id: Arc::from("req-2"),
                idempotency: Some(crate::protocol::IdempotencyTag { key_hash: [7; 16], fingerprint: [9; 16] }),
            }),
        });
        round_trip(Input::Expire { pending_ids: vec![id("t1")] });
        round_trip(Input::Deadlines { txns: vec![1 << 48 | 3, 7] });
        round_trip(Input::Part(crate::parts::PartCommand::Inventory(peakstack_inventory::Command::Restock {
            sku_id: id("s1"),
            quantity: 3,
        })));
        round_trip(Input::Peer {
            from: 3,
            messages: vec![
                PeerMsg::Try {
                    txn: 1 << 48 | 5,
                    deadline_ms: 6_000,
                    ops: vec![
                        TryOp::Reserve(transfer.clone()),
                        TryOp::Hold(Leg {
                            transfer_id: id("t1"),
                            side: Side::Credit,
                            account_id: id("b"),
                            currency: usd,
                            amount: 5,
                            via_clearing: true,
                            pending: false,
                        }),
                        TryOp::LockPending { pending_id: id("t0"), kind: ResolveKind::Post(Some(3)) },
                    ],
                },
                PeerMsg::Tried {
                    txn: 9,
                    results: vec![
                        OpResult::Ok,
                        OpResult::Exists(transfer.clone()),
                        OpResult::Err(ErrorCode::ExceedsCredits),
                        OpResult::Pending(PendingInfo {
                            debit_account_id: id("a"),
                            credit_account_id: id("b"),
                            amount: 5,
                            currency: usd,
                        }),
                    ],
                },
                PeerMsg::Decide {
                    txn: 9,
                    commit: true,
                    deadline_ms: 7_000,
                    ops: vec![
                        CommitOp::CommitHold { transfer_id: id("t1"), side: Side::Debit, account_id: id("a") },
                        CommitOp::CommitReservation { id: id("t1"), filled: Some(transfer) },
                        CommitOp::FinishPending { pending_id: id("t0"), kind: ResolveKind::Expire },
                        CommitOp::Settle {
                            pending_id: id("t0"),
                            side: Side::Credit,
                            post_amount: 0,
                            by: Some(id("v")),
                        },
                    ],
                },
                PeerMsg::Acked {
                    txn: 9,
                    balances: vec![
                        (id("a"), Balances { debits_posted: 5, ..Default::default() }),
                        (
                            id("b"),
                            Balances {
                                debits_pending: u128::MAX,
                                debits_posted: 1 << 64,
                                credits_pending: u128::from(u64::MAX),
                                credits_posted: (1 << 127) + 3,
                            },
                        ),
                    ],
                },
                PeerMsg::Forget { txn: 9 },
            ],
        });
    }

    proptest::proptest! {
        /// A u64 written as balances were written before they were u128
        /// reads back the same as a u128: old logs and checkpoints open.
        #[test]
        fn a_u64_varint_reads_as_the_same_u128(value in proptest::num::u64::ANY) {
            let mut w = Writer::default();
            w.varint(value);
            let mut wide = Writer::default();
            wide.varint_u128(u128::from(value));
            proptest::prop_assert_eq!(&w.buf, &wide.buf);
            let mut r = Reader::new(&w.buf);
            proptest::prop_assert_eq!(r.varint_u128(), Ok(u128::from(value)));
            proptest::prop_assert!(r.is_empty());
        }

        #[test]
        fn a_u128_varint_round_trips(value in proptest::num::u128::ANY) {
            let mut w = Writer::default();
            w.varint_u128(value);
            let mut r = Reader::new(&w.buf);
            proptest::prop_assert_eq!(r.varint_u128(), Ok(value));
            proptest::prop_assert!(r.is_empty());
        }
    }

    fn details(metadata: Option<&str>, reference: Option<&str>) -> Details {
        TransferDetails::of(metadata.map(Box::from), reference.map(Box::from))
    }

    /// A record and a request as they were encoded before transfers had
    /// details (bytes written out by hand) still decode, with none; with
    /// details they round trip, and no prefix decodes.
    #[test]
    fn transfers_from_before_details_decode_and_details_round_trip() {
        let old_record: &[u8] = &[
            2, b't', b'1', 1, b'a', 1, b'b', 5, b'U', b'S', b'D', // id, accounts, amount, currency
            1, 10, 99, // pending, timeout 10, expires at 99
            1, 0, 89, // status pending, no posted amount, timestamp 89
        ];
        let record = Transfer::decode(&mut Reader::new(old_record)).unwrap();
        assert_eq!(record.kind, TransferKind::Pending { timeout_ms: 10, expires_at_ms: 99 });
        assert_eq!((record.timestamp_ms, record.details.clone()), (89, None));
        let mut w = Writer::default();
        record.encode(&mut w);
        assert_eq!(w.buf, old_record, "a record without details is encoded as before");

        let old_void: &[u8] = &[2, 1, b'v', 2, b't', b'1'];
        let void = TransferRequest::decode(&mut Reader::new(old_void)).unwrap();
        assert_eq!(void, TransferRequest::Void { id: id("v"), pending_id: id("t1"), details: None });

        for d in [details(Some("{\"k\":1}"), None), details(None, Some("order 7")), details(Some("{}"), Some("é"))] {
            let with = Transfer { details: d.clone(), ..record.clone() };
            let mut w = Writer::default();
            with.encode(&mut w);
            assert_eq!(Transfer::decode(&mut Reader::new(&w.buf)).unwrap(), with);
            for cut in 0..w.buf.len() {
                assert!(Transfer::decode(&mut Reader::new(&w.buf[..cut])).is_err(), "prefix {cut} decoded");
            }
            round_trip(Input::Transfers {
                requests: vec![
                    TransferRequest::Void { id: id("v"), pending_id: id("t1"), details: d.clone() },
                    TransferRequest::Post { id: id("p"), pending_id: id("t1"), amount: None, details: d.clone() },
                ],
                atomic: false,
                origin: None,
            });
        }
        // Details flagged but empty are corrupt, not an empty box.
        let mut flagged = old_record.to_vec();
        flagged[11] |= DETAILS_FOLLOW;
        flagged.push(0);
        assert_eq!(Transfer::decode(&mut Reader::new(&flagged)), Err(CodecError("invalid transfer details")));
    }

    /// A `Try` or `Decide` logged before deadlines existed (tags 0 and 2)
    /// reads with no deadline; written again it takes the new tags.
    #[test]
    fn peer_messages_from_before_deadlines_decode_without_one() {
        let txn: u64 = 1 << 48 | 5;
        let mut old_try = vec![0u8];
        old_try.extend_from_slice(&txn.to_le_bytes());
        old_try.push(0); // no ops
        let mut old_decide = vec![2u8];
        old_decide.extend_from_slice(&txn.to_le_bytes());
        old_decide.extend_from_slice(&[1, 0]); // commit, no ops
        assert_eq!(
            PeerMsg::decode(&mut Reader::new(&old_try)),
            Ok(PeerMsg::Try { txn, ops: vec![], deadline_ms: NO_DEADLINE })
        );
        assert_eq!(
            PeerMsg::decode(&mut Reader::new(&old_decide)),
            Ok(PeerMsg::Decide { txn, commit: true, ops: vec![], deadline_ms: NO_DEADLINE })
        );
        let mut w = Writer::default();
        PeerMsg::Try { txn, ops: vec![], deadline_ms: 9 }.encode(&mut w);
        assert_eq!(w.buf[0], 5);
    }

    #[test]
    fn a_u128_varint_past_2_to_the_128_is_corrupt() {
        let mut w = Writer::default();
        w.varint_u128(u128::MAX);
        assert_eq!(w.buf.len(), 19);
        let mut past = w.buf.clone();
        *past.last_mut().unwrap() = 0x04; // bit 128
        assert_eq!(Reader::new(&past).varint_u128(), Err(CodecError("varint out of range")));
        let mut longer = w.buf.clone();
        *longer.last_mut().unwrap() |= 0x80;
        longer.push(0);
        assert!(Reader::new(&longer).varint_u128().is_err());
    }
}

pub use snapshot::{decode_ledger_before_4, encode_ledger_image};

mod snapshot {
    use super::*;
    use peakstack_domain::ledger::{HoldSnapshot, LedgerImage, LedgerSnapshot, OwnedHold};
    use peakstack_domain::Account;

    impl Codec for Account {
        fn encode(&self, w: &mut Writer) {
            encode_account_spec(
                w,
                AccountSpec {
                    id: &self.id,
                    currency: self.currency,
                    flags: self.flags,
                    overdraft_limit: self.overdraft_limit,
                    metadata: self.metadata.as_deref(),
                    owner: self.owner.as_ref(),
                },
            );
            self.balances.encode(w);
            w.varint(self.created_at_ms);
            w.bool(self.system);
            w.u64(self.history_head);
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            let spec = NewAccount::decode(r)?;
            Ok(Account {
                id: spec.id,
                currency: spec.currency,
                flags: spec.flags,
                overdraft_limit: spec.overdraft_limit,
                metadata: spec.metadata,
                owner: spec.owner,
                balances: Balances::decode(r)?,
                created_at_ms: r.varint()?,
                system: r.bool()?,
                history_head: r.u64()?,
            })
        }
    }

    impl Codec for HoldSnapshot {
        fn encode(&self, w: &mut Writer) {
            self.transfer_id.encode(w);
            self.side.encode(w);
            w.varint(u64::from(self.account));
            self.clearing.map(u64::from).encode(w);
            w.varint(self.amount);
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            let index = |v: u64| u32::try_from(v).map_err(|_| CodecError("invalid account index"));
            Ok(HoldSnapshot {
                transfer_id: Id::decode(r)?,
                side: Side::decode(r)?,
                account: index(r.varint()?)?,
                clearing: Option::<u64>::decode(r)?.map(index).transpose()?,
                amount: r.varint()?,
            })
        }
    }

    impl Codec for OwnedHold {
        fn encode(&self, w: &mut Writer) {
            self.hold.encode(w);
            w.bool(self.pending);
            w.u64(self.owner);
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            Ok(OwnedHold { hold: HoldSnapshot::decode(r)?, pending: r.bool()?, owner: r.u64()? })
        }
    }

    /// Encodes an image exactly as the [`LedgerSnapshot`] it stands for,
    /// records sorted, without copying them out.
    pub fn encode_ledger_image(image: &LedgerImage, w: &mut Writer) {
        image.accounts.encode(w);
        image.holds.encode(w);
        let records = image.sorted_records();
        w.varint(records.len() as u64);
        for record in records {
            record.encode(w);
        }
        image.owned_holds.encode(w);
        let (reserved, locked) = image.claims();
        w.varint(reserved.len() as u64);
        for (owner, record) in reserved {
            w.u64(owner);
            record.encode(w);
        }
        w.varint(locked.len() as u64);
        for (id, owner) in locked {
            id.encode(w);
            w.u64(owner);
        }
    }

    /// Checkpoint format 4: what transactions in flight own follows the
    /// three lists of formats 1-3 (see [`decode_ledger_before_4`]).
    impl Codec for LedgerSnapshot {
        fn encode(&self, w: &mut Writer) {
            self.accounts.encode(w);
            self.holds.encode(w);
            self.records.encode(w);
            self.owned_holds.encode(w);
            w.varint(self.reserved.len() as u64);
            for (owner, record) in &self.reserved {
                w.u64(*owner);
                record.encode(w);
            }
            w.varint(self.locked.len() as u64);
            for (id, owner) in &self.locked {
                id.encode(w);
                w.u64(*owner);
            }
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            let mut snapshot = decode_ledger_before_4(r)?;
            snapshot.owned_holds = Vec::decode(r)?;
            for _ in 0..r.len()? {
                let owner = r.u64()?;
                snapshot.reserved.push((owner, Transfer::decode(r)?));
            }
            for _ in 0..r.len()? {
                let id = Id::decode(r)?;
                snapshot.locked.push((id, r.u64()?));
            }
            Ok(snapshot)
        }
    }

    /// A ledger of checkpoint formats 1-3: taken between transactions, so
    /// nothing is owned by one.
    pub fn decode_ledger_before_4(r: &mut Reader<'_>) -> Result<LedgerSnapshot> {
        Ok(LedgerSnapshot {
            accounts: Vec::decode(r)?,
            holds: Vec::decode(r)?,
            records: Vec::decode(r)?,
            ..LedgerSnapshot::default()
        })
    }
}
