//! The checkpoint form of the transactions an executor coordinates, in
//! id order. Their clients are not kept: a restored transaction answers
//! nobody, as after a replay. Their ops are not kept either: they are made
//! again from the items (see `coordinator.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;

use peakstack_domain::ledger::ResolveKind;
use peakstack_domain::{Balances, ErrorCode, Id, Transfer};

use super::coordinator::{Coordinator, Item, ItemKind, ItemOutcome, Part, Txn};
use crate::codec::{Codec, CodecError, Reader, Writer};
use crate::executor::ExecutorCore;
use crate::protocol::{IdempotencyTag, Origin};

type Result<T> = std::result::Result<T, CodecError>;

impl ExecutorCore {
    pub(crate) fn encode_txns(&self, w: &mut Writer) {
        let txns = self.coordinator.sorted();
        w.varint(txns.len() as u64);
        for (txn, state) in txns {
            w.u64(txn);
            encode_txn(state, w);
        }
    }

    /// The transactions of a checkpoint taken at `time_ms`, each to be sent
    /// again at once.
    pub(crate) fn decode_txns(r: &mut Reader<'_>, next_txn: u64, time_ms: u64) -> Result<Coordinator> {
        let mut coordinator = Coordinator::new(next_txn);
        for _ in 0..r.len()? {
            let txn = r.u64()?;
            if super::counter_of(txn) >= next_txn {
                return Err(CodecError("a transaction the counter has not reached"));
            }
            if coordinator.txns.insert(txn, decode_txn(r)?).is_some() {
                return Err(CodecError("a transaction appears twice"));
            }
        }
        coordinator.reschedule(time_ms);
        Ok(coordinator)
    }
}

fn encode_txn(state: &Txn, w: &mut Writer) {
    w.varint(state.started_ms);
    w.varint(state.deadline_ms);
    let decision = match state.decision {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    w.u8(decision | u8::from(state.timed_out) << 2);
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
            ItemKind::Branches(branches) => {
                w.u8(2);
                w.varint(branches.len() as u64);
                for branch in branches {
                    branch.encode(w);
                }
            }
        }
        item.record.encode(w);
        item.static_error.encode(w);
    }
    w.varint(state.parts.len() as u64);
    for part in &state.parts {
        w.varint(u64::from(part.exec));
        w.varint(part.ops as u64);
        part.tried.encode(w);
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
    w.varint(state.balances.len() as u64);
    for (id, b) in &state.balances {
        id.encode(w);
        b.encode(w);
    }
}

fn decode_txn(r: &mut Reader<'_>) -> Result<Txn> {
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
            let idempotency = match tag {
                2 => Some(IdempotencyTag { key_hash: r.array()?, fingerprint: r.array()? }),
                _ => None,
            };
            Some(Origin { key_id, request_id, idempotency })
        }
        _ => return Err(CodecError("invalid origin")),
    };
    let mut items = Vec::new();
    for _ in 0..r.len()? {
        let kind = match r.u8()? {
            0 => ItemKind::Create,
            1 => ItemKind::Resolve { pending_id: Id::decode(r)?, kind: ResolveKind::decode(r)? },
            2 => {
                let mut branches = Vec::new();
                for _ in 0..r.len()? {
                    branches.push(crate::parts::PartCommand::decode(r)?);
                }
                ItemKind::Branches(branches)
            }
            _ => return Err(CodecError("invalid item")),
        };
        let record = Option::<Transfer>::decode(r)?;
        if matches!(kind, ItemKind::Create) && record.is_none() {
            return Err(CodecError("a create without its record"));
        }
        items.push(Item { kind, record, static_error: Option::decode(r)? });
    }
    let mut parts = Vec::new();
    let mut executors = BTreeSet::new();
    for _ in 0..r.len()? {
        let exec = u16::try_from(r.varint()?).map_err(|_| CodecError("invalid executor"))?;
        let part = Part { exec, ops: r.len()?, tried: Option::decode(r)?, acked: r.bool()? };
        if !executors.insert(exec) || part.tried.as_ref().is_some_and(|t| t.len() != part.ops) {
            return Err(CodecError("invalid part"));
        }
        parts.push(part);
    }
    if !parts.is_sorted_by_key(|p: &Part| p.exec) {
        return Err(CodecError("parts out of order"));
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
    let mut balances = Vec::new();
    for _ in 0..r.len()? {
        balances.push((Id::decode(r)?, Balances::decode(r)?));
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
