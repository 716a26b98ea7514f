//! Reservations as branches of a global transaction (TCC): try reserves,
//! confirm turns reserved into sold, cancel gives the units back.
//!
//! Each branch has a fence per (transaction, SKU), written by the same
//! command as its effect and kept until [`FENCE_RETENTION_MS`] after the
//! transaction's deadline (checkpointed with the rest):
//! - a repeated try, confirm or cancel is answered from the fence;
//! - a cancel that comes before its try records `Suspended` and answers
//!   done (an empty rollback); the try that comes later is refused
//!   (`branch_cancelled`): nothing hangs;
//! - a try at or after its transaction's deadline is refused and leaves
//!   nothing behind;
//! - the reservation a try makes is held until the transaction's deadline
//!   at the latest: unconfirmed, it expires then like any other.
//!
//! A try with the deadline [`HELD_UNTIL_DECIDED`] is a branch of the
//! engine's own TCC, whose fences answer repeats and refuse late tries: it
//! holds its units (in the SKU's `reserved`, without a reservation record
//! or a fence) until its confirm (sold) or cancel (given back), however
//! late that comes.
//!
//! These hold whatever order the messages come in and however often.

use peakstack_domain::{ErrorCode, Id, HELD_UNTIL_DECIDED};

use crate::model::ReservationState;
use crate::state::{Answer, Inventory, Reply, MAX_DUE_PER_TICK};

/// How long a branch's fence outlives its transaction's deadline: a day,
/// far longer than any redelivery of its messages.
pub const FENCE_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchState {
    Tried,
    Confirmed,
    Cancelled,
    /// Cancelled before its try came: the try will be refused.
    Suspended,
}

/// The fence of one (transaction, SKU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchFence {
    pub state: BranchState,
    /// The reservation the try made (none for a suspended branch).
    pub reservation: Option<Id>,
    pub forget_at_ms: u64,
}

impl Inventory {
    pub fn branch(&self, txn: u64, sku_id: &Id) -> Option<&BranchFence> {
        self.fences.get(&(txn, sku_id.clone()))
    }

    fn fence(&mut self, txn: u64, sku_id: &Id, fence: BranchFence) {
        let key = (txn, sku_id.clone());
        if let Some(old) = self.fences.insert(key.clone(), fence.clone()) {
            self.fence_forgets.remove(&(old.forget_at_ms, key.0, key.1.clone()));
        }
        self.fence_forgets.insert((fence.forget_at_ms, key.0, key.1));
    }

    /// Records a decided branch: in its fence, kept for its retention; or,
    /// held until decided (see [`HELD_UNTIL_DECIDED`]), not at all: its
    /// coordinator's fence answers a repeat.
    fn decided(&mut self, txn: u64, sku_id: &Id, fence: BranchFence) {
        if fence.forget_at_ms != u64::MAX {
            return self.fence(txn, sku_id, fence);
        }
        let key = (txn, sku_id.clone());
        if let Some(old) = self.fences.remove(&key) {
            self.fence_forgets.remove(&(old.forget_at_ms, key.0, key.1));
        }
    }

    fn answer_reservation(&self, fence: &BranchFence) -> Reply {
        let id = fence.reservation.as_ref().expect("a tried branch has its reservation");
        let reservation = self.reservations.get(id).cloned().ok_or(ErrorCode::ReservationNotFound)?;
        Ok(Answer::Reservation(reservation))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_branch(
        &mut self,
        txn: u64,
        shard: u32,
        sku_id: &Id,
        buyer_id: &Id,
        quantity: u32,
        deadline_ms: u64,
        now_ms: u64,
    ) -> (bool, Reply) {
        if deadline_ms == HELD_UNTIL_DECIDED {
            return self.hold_for_branch(txn, sku_id, buyer_id, quantity);
        }
        if let Some(fence) = self.fences.get(&(txn, sku_id.clone())) {
            return match fence.state {
                BranchState::Tried | BranchState::Confirmed => (false, self.answer_reservation(fence)),
                BranchState::Cancelled | BranchState::Suspended => (false, Err(ErrorCode::BranchCancelled)),
            };
        }
        if deadline_ms <= now_ms {
            return (false, Err(ErrorCode::BranchCancelled));
        }
        let (changed, reply) = self.reserve(shard, sku_id, buyer_id, quantity, deadline_ms - now_ms, now_ms);
        if let Ok(Answer::Reservation(reservation)) = &reply {
            let fence = BranchFence {
                state: BranchState::Tried,
                reservation: Some(reservation.id.clone()),
                forget_at_ms: deadline_ms.saturating_add(FENCE_RETENTION_MS),
            };
            self.fence(txn, sku_id, fence);
        }
        (changed, reply)
    }

    pub(crate) fn confirm_branch(&mut self, txn: u64, sku_id: &Id, now_ms: u64) -> (bool, Reply) {
        if let Some(ended) = self.end_held(txn, sku_id, true) {
            return ended;
        }
        let Some(fence) = self.fences.get(&(txn, sku_id.clone())).cloned() else {
            // A confirm comes only after every try succeeded.
            return (false, Err(ErrorCode::TransactionNotFound));
        };
        match fence.state {
            BranchState::Confirmed => (false, self.answer_reservation(&fence)),
            BranchState::Cancelled | BranchState::Suspended => (false, Err(ErrorCode::BranchCancelled)),
            BranchState::Tried => {
                let id = fence.reservation.clone().expect("a tried branch has its reservation");
                let (changed, reply) = self.confirm(&id, now_ms);
                let finished = self.reservations.get(&id).is_none_or(|r| r.state != ReservationState::Reserved);
                if !finished {
                    return (changed, reply);
                }
                // Confirmed, or expired at its deadline (the units went back).
                let state = if reply.is_ok() { BranchState::Confirmed } else { BranchState::Cancelled };
                self.decided(txn, sku_id, BranchFence { state, ..fence });
                (true, reply)
            }
        }
    }

    pub(crate) fn cancel_branch(&mut self, txn: u64, sku_id: &Id, now_ms: u64) -> (bool, Reply) {
        if let Some(ended) = self.end_held(txn, sku_id, false) {
            return ended;
        }
        let Some(fence) = self.fences.get(&(txn, sku_id.clone())).cloned() else {
            let fence = BranchFence {
                state: BranchState::Suspended,
                reservation: None,
                forget_at_ms: now_ms.saturating_add(FENCE_RETENTION_MS),
            };
            self.fence(txn, sku_id, fence);
            return (true, Ok(Answer::Done));
        };
        match fence.state {
            BranchState::Cancelled | BranchState::Suspended => (false, Ok(Answer::Done)),
            BranchState::Confirmed => (false, Err(ErrorCode::ReservationConfirmed)),
            BranchState::Tried => {
                let id = fence.reservation.clone().expect("a tried branch has its reservation");
                let (_, reply) = self.cancel(&id, now_ms);
                if let Err(code) = reply {
                    return (false, Err(code));
                }
                self.decided(txn, sku_id, BranchFence { state: BranchState::Cancelled, ..fence });
                (true, Ok(Answer::Done))
            }
        }
    }

    /// Fences whose retention passed by `now_ms`, at most [`MAX_DUE_PER_TICK`].
    pub(crate) fn due_fences(&self, now_ms: u64) -> Vec<(u64, Id)> {
        self.fence_forgets
            .iter()
            .take_while(|(at, _, _)| *at <= now_ms)
            .take(MAX_DUE_PER_TICK)
            .map(|(_, txn, sku)| (*txn, sku.clone()))
            .collect()
    }

    pub(crate) fn forget_fences(&mut self, fences: &[(u64, Id)], now_ms: u64) {
        for (txn, sku_id) in fences.iter().take(MAX_DUE_PER_TICK) {
            let key = (*txn, sku_id.clone());
            if let Some(fence) = self.fences.get(&key) {
                if fence.forget_at_ms <= now_ms {
                    self.fence_forgets.remove(&(fence.forget_at_ms, *txn, sku_id.clone()));
                    self.fences.remove(&key);
                }
            }
        }
    }
}
