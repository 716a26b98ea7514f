//! The participant's side of TCC: a branch's try, confirm and cancel on
//! this executor's ledger, each answered once and repeated from its fence.
//!
//! Messages may come twice and in any order. A `Try` applies only when it
//! finds no fence and comes before its deadline; a `Decide` applies at a
//! tried fence, records `suspended` when it overtook its try (before the
//! deadline: after it the try is refused anyway), and otherwise answers
//! what it answered before. A fence of a transaction the coordinator
//! forgot (or one purged after it) makes every late message a no-op.

use peakstack_domain::ledger::{Reservation, TxnView};
use peakstack_domain::{Balances, ErrorCode, Id};

use super::fence::{Fence, FenceState, Found, TryAnswer, Undo};
use super::{effective_deadline, FENCE_RETENTION_MS};
use crate::executor::{Effects, ExecutorCore};
use crate::protocol::{CommitOp, ExecutorId, OpResult, PeerMsg, TryOp, TxnId};

impl ExecutorCore {
    pub(crate) fn on_peer(&mut self, from: ExecutorId, message: &PeerMsg, now_ms: u64, fx: &mut Effects) {
        match message {
            PeerMsg::Try { txn, ops, deadline_ms } => {
                let results = self.on_try(*txn, ops, *deadline_ms, now_ms);
                fx.outbox.push((from, PeerMsg::Tried { txn: *txn, results }));
            }
            PeerMsg::Tried { txn, results } => self.on_tried(from, *txn, results, now_ms, fx),
            PeerMsg::Decide { txn, commit, ops, deadline_ms } => {
                let balances = self.on_decide(*txn, *commit, ops, *deadline_ms, now_ms, fx);
                fx.outbox.push((from, PeerMsg::Acked { txn: *txn, balances }));
            }
            PeerMsg::Acked { txn, balances } => self.on_acked(*txn, from, balances.clone(), fx),
            PeerMsg::Forget { txn } => self.fences.forget(*txn),
            PeerMsg::Deliver { id, floor, command } => self.on_deliver(from, *id, *floor, command, now_ms, fx),
            PeerMsg::Delivered { id, error } => self.on_delivered(*id, *error),
        }
    }

    /// Phase one of a branch: its ops applied all or nothing, or the
    /// answer its fence keeps.
    pub(crate) fn on_try(&mut self, txn: TxnId, ops: &[TryOp], deadline_ms: u64, now_ms: u64) -> Vec<OpResult> {
        let refuse = |code| ops.iter().map(|_| OpResult::Err(code)).collect();
        match self.fences.get(txn) {
            Found::Live(Fence::Tried { answer, .. }) => return answer.results(),
            // Decided, suspended, or forgotten: a try now would hang.
            Found::Live(_) | Found::Retained(_) => return refuse(ErrorCode::InFlight),
            Found::None => {}
        }
        if now_ms >= deadline_ms {
            // Its coordinator cancels at the deadline: nothing to keep.
            return refuse(ErrorCode::TransactionTimedOut);
        }
        let mut view = TxnView::default();
        let mut undo = Vec::new();
        // A part's branch after a refused op is not tried: it would be
        // given back at once (a checkout refused for stock leaves no
        // placed-and-failed orders behind). It answers the same refusal.
        let refused: std::cell::Cell<Option<ErrorCode>> = std::cell::Cell::new(None);
        let results: Vec<OpResult> = ops
            .iter()
            .map(|op| match op {
                TryOp::Part(_) if refused.get().is_some() => OpResult::Err(refused.get().expect("checked")),
                TryOp::Reserve(t) => match self.ledger.reserve(t.clone(), txn) {
                    Ok(Reservation::Reserved) => {
                        undo.push(Undo::Reservation(t.id.clone()));
                        OpResult::Ok
                    }
                    Ok(Reservation::Exists(t)) => OpResult::Exists(t),
                    Err(e) => OpResult::Err(e),
                },
                TryOp::Hold(leg) => {
                    self.open_flow_account(leg, now_ms);
                    let shard = self.layout.shard_of_account(&leg.account_id);
                    match self.ledger.hold(leg, shard, txn, &mut view, now_ms) {
                        Ok(()) => {
                            undo.push(Undo::Hold(leg.transfer_id.clone(), leg.side));
                            OpResult::Ok
                        }
                        Err(e) => OpResult::Err(e),
                    }
                }
                TryOp::LockPending { pending_id, kind } => {
                    match self.ledger.lock_pending(pending_id, *kind, txn, now_ms) {
                        Ok(info) => {
                            undo.push(Undo::Lock(pending_id.clone()));
                            OpResult::Pending(info)
                        }
                        Err(e) => OpResult::Err(e),
                    }
                }
                TryOp::Part(command) => {
                    let (_, reply) = self.parts.apply(command, now_ms);
                    match reply.error() {
                        None => {
                            undo.push(Undo::Part(command.branch_cancel()));
                            OpResult::Ok
                        }
                        Some(e) => OpResult::Err(e),
                    }
                }
            })
            .inspect(|result| {
                if let (None, OpResult::Err(e)) = (refused.get(), result) {
                    refused.set(Some(*e));
                }
            })
            .collect();
        // All or nothing per participant: if anything here failed, the
        // transaction cannot commit, so what did succeed is released now
        // rather than when the cancel arrives. Two legs on one shard are never
        // left half-held, so the shard balances at every moment. A cancel
        // arriving later finds nothing of this transaction to release.
        if !Fence::tried_ok(&results) {
            self.release_all(txn, &undo, now_ms);
            undo.clear();
        }
        let deadline_ms = effective_deadline(deadline_ms, now_ms);
        self.fences.insert(txn, Fence::Tried { answer: TryAnswer::of(&results), undo, deadline_ms });
        results
    }

    /// Phase two of a branch: the balances it answers with (the same for a repeat).
    pub(crate) fn on_decide(
        &mut self,
        txn: TxnId,
        commit: bool,
        commit_ops: &[CommitOp],
        deadline_ms: u64,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Vec<(Id, Balances)> {
        let deadline_ms = effective_deadline(deadline_ms, now_ms);
        let mut balances = Vec::new();
        match self.fences.take_live(txn) {
            Some(Fence::Tried { answer, undo, deadline_ms }) => {
                if commit {
                    // The coordinator commits only when every try succeeded:
                    // a commit over a refused try would book money never held.
                    let refused = answer.refused();
                    assert!(
                        refused.is_none(),
                        "executor {}: commit of txn {txn:#x} at a fence whose try {refused:?} did not succeed",
                        self.id
                    );
                    self.apply_commit_ops(txn, commit_ops, now_ms, &mut balances, fx);
                } else {
                    self.release_all(txn, &undo, now_ms);
                }
                self.fences.insert(txn, Fence::Decided { commit, balances: balances.clone(), deadline_ms });
            }
            Some(Fence::Decided { commit: decided, balances: answered, deadline_ms }) => {
                assert_eq!(decided, commit, "executor {}: txn {txn:#x} decided both ways", self.id);
                balances.clone_from(&answered);
                self.fences.insert(txn, Fence::Decided { commit, balances: answered, deadline_ms });
            }
            Some(Fence::Suspended { deadline_ms }) => {
                // Suspended refuses the try, so no coordinator can commit.
                assert!(!commit, "executor {}: commit of txn {txn:#x} at a suspended fence", self.id);
                self.fences.insert(txn, Fence::Suspended { deadline_ms });
            }
            None => match self.fences.get(txn) {
                // Forgotten by its coordinator: a late repeat, no effect.
                Found::Retained(state) => {
                    let agrees = match state {
                        FenceState::Confirmed => commit,
                        FenceState::Cancelled | FenceState::Suspended => !commit,
                        FenceState::Tried => true,
                    };
                    assert!(agrees, "executor {}: txn {txn:#x} decided both ways", self.id);
                }
                Found::Live(_) => unreachable!("taken above"),
                Found::None if commit => {
                    // A participant with commit work only (it settles a
                    // pending hold): every other commit op follows a try
                    // here, whose fence is kept until the coordinator forgot
                    // it and its retention passed; such a commit now is a
                    // stale repeat.
                    let untried = commit_ops.iter().find(|op| !matches!(op, CommitOp::Settle { .. }));
                    let stale = now_ms >= deadline_ms.saturating_add(FENCE_RETENTION_MS);
                    if untried.is_some() && stale {
                        return balances;
                    }
                    assert!(
                        untried.is_none(),
                        "executor {}: commit of txn {txn:#x} without a fence, for {untried:?}",
                        self.id
                    );
                    // Settling is idempotent on its own (a settled hold is
                    // gone): past the retention no fence is needed to repeat it.
                    self.apply_commit_ops(txn, commit_ops, now_ms, &mut balances, fx);
                    if !stale {
                        self.fences.insert(txn, Fence::Decided { commit, balances: balances.clone(), deadline_ms });
                    }
                }
                Found::None => {
                    // A cancel before its try: the try will be refused. Past
                    // the deadline the deadline refuses it: nothing to keep.
                    if now_ms < deadline_ms {
                        self.fences.insert(txn, Fence::Suspended { deadline_ms });
                    }
                }
            },
        }
        balances
    }

    /// Gives back what a try took, last first.
    fn release_all(&mut self, txn: TxnId, undo: &[Undo], now_ms: u64) {
        for undo in undo.iter().rev() {
            match undo {
                Undo::Reservation(id) => self.ledger.cancel_reservation(id, txn),
                Undo::Hold(id, side) => self.ledger.release_hold(id, *side, txn),
                Undo::Lock(id) => self.ledger.unlock_pending(id, txn),
                Undo::Part(cancel) => {
                    let (_, reply) = self.parts.apply(cancel, now_ms);
                    assert!(
                        reply.error().is_none(),
                        "executor {}: {cancel:?} of txn {txn:#x} refused: {reply:?}",
                        self.id
                    );
                }
            }
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
                CommitOp::Part(confirm) => {
                    // The try succeeded and its part holds it until well after
                    // the deadline (see `start_txn`): a confirm cannot fail.
                    let (_, reply) = self.parts.apply(confirm, now_ms);
                    assert!(
                        reply.error().is_none(),
                        "executor {}: {confirm:?} of txn {txn:#x} refused: {reply:?}",
                        self.id
                    );
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
