//! Trade flows on the executor: global transactions that compose the
//! parts' branches with the flow's own ledger movements (a checkout), and
//! the ledger movements a part's command needs in the same atomic step (a
//! capture posts its holds, a refund moves money back).
//!
//! The executor knows branches and movements, not what they mean: a part
//! says which movements a command needs ([`peakstack_orders::LedgerEffect`]),
//! the flow books them as one atomic transaction and applies the command
//! only if they all succeeded. Both are effects of one logged input, so a
//! replay books and applies the same.

use peakstack_domain::ledger::{system_shard, Leg};
use peakstack_domain::{Amount, Details, ErrorCode, Side, TransferRequest};
use peakstack_orders::LedgerEffect;

use crate::executor::{create_record_as, ClientTag, Effects, ExecutorCore, FLOW_TAG};
use crate::parts::{PartCommand, PartReply};
use crate::protocol::{Origin, TransferResult};
use crate::tcc::coordinator::{Item, ItemKind};

impl ExecutorCore {
    /// Starts a flow's global transaction (see
    /// [`crate::protocol::Input::Global`]): its transfers (one answer
    /// each for the caller), then one item of the parts' branches.
    pub(crate) fn start_global(
        &mut self,
        transfers: &[TransferRequest],
        branches: &[PartCommand],
        client: Option<ClientTag>,
        origin: Option<Origin>,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        for branch in branches {
            match branch {
                PartCommand::Orders(peakstack_orders::Command::TryPlace { checkout, .. }) => {
                    self.parts.orders.note_assigned(checkout);
                }
                PartCommand::Orders(peakstack_orders::Command::TrySettle { settlement, .. }) => {
                    self.parts.orders.note_settlement(settlement);
                }
                _ => {}
            }
        }
        if self.global_locally(transfers, branches, client, now_ms, fx) {
            return;
        }
        // The protocol holds legs on them: they must exist before the try
        // (a refused checkout leaves them, empty: a merchant's settlement
        // account on a shard is opened by the first checkout to pay it).
        self.open_settle_accounts(transfers, now_ms);
        let mut items: Vec<Item> = transfers.iter().map(|request| self.flow_item(request, now_ms)).collect();
        if !branches.is_empty() {
            items.push(Item { kind: ItemKind::Branches(branches.to_vec()), record: None, static_error: None });
        }
        let indices = (0..transfers.len()).collect();
        self.start_txn(items, client.map(|c| (c, indices)), origin, now_ms, fx);
    }

    /// A global transaction whose branches and transfers all live on this
    /// executor, with posted transfers from one account (a checkout under
    /// automatic capture on its home): applied whole in this step, without
    /// the protocol's bookkeeping, with the same checks and answers. The
    /// branches are tried first; the money is checked as one sum on its one
    /// debit account (the credits are merchants' pending settlements, which
    /// take any credit), so the transfers cannot fail once it passes; then
    /// every branch is confirmed, or every tried one cancelled. False when
    /// it does not qualify (the protocol runs it).
    fn global_locally(
        &mut self,
        transfers: &[TransferRequest],
        branches: &[PartCommand],
        client: Option<ClientTag>,
        now_ms: u64,
        fx: &mut Effects,
    ) -> bool {
        let me = self.id;
        let layout = self.layout;
        let Some(TransferRequest::Create { debit_account_id: payer, currency, .. }) = transfers.first() else {
            return false;
        };
        let qualifies = transfers.iter().all(|t| match t {
            TransferRequest::Create {
                id, debit_account_id, credit_account_id, currency: c, pending: false, ..
            } => {
                debit_account_id == payer
                    && c == currency
                    && layout.executor_of_transfer(id) == me
                    && layout.executor_of_account(debit_account_id) == me
                    && layout.executor_of_account(credit_account_id) == me
                    && credit_account_id.as_str().starts_with("_settle.")
            }
            _ => false,
        }) && branches.iter().all(|b| b.branch_executor(&layout) == me);
        if !qualifies {
            return false;
        }
        let (payer, currency) = (payer.clone(), *currency);
        let answer = |fx: &mut Effects, results: Vec<TransferResult>| {
            if let Some(tag) = client {
                for (index, result) in results.into_iter().enumerate() {
                    fx.finish(tag, index, result);
                }
            }
        };
        let refuse = |fx: &mut Effects, code: ErrorCode| answer(fx, vec![Err(code); transfers.len()]);
        let mut records = Vec::with_capacity(transfers.len());
        let mut total = 0u64;
        for request in transfers {
            let (record, static_error) = create_record_as(request, now_ms, true);
            if let Some(code) = static_error {
                refuse(fx, code);
                return true;
            }
            if self.ledger.transfer(&record.id).is_some() {
                refuse(fx, ErrorCode::ExistsWithDifferentFields);
                return true;
            }
            total = match total.checked_add(record.amount) {
                Some(total) => total,
                None => {
                    refuse(fx, ErrorCode::Overflow);
                    return true;
                }
            };
            records.push(record);
        }
        // The branches, each stamped with a transaction id of this executor
        // (its parts key what they hold by it).
        let txn = self.take_txn_id();
        let mut tried: Vec<PartCommand> = Vec::with_capacity(branches.len());
        let mut refusal = None;
        for branch in branches {
            let mut branch = branch.clone();
            branch.stamp_branch(txn, peakstack_domain::HELD_UNTIL_DECIDED);
            let (_, reply) = self.parts.apply(&branch, now_ms);
            match reply.error() {
                None => tried.push(branch),
                Some(code) => {
                    refusal = Some(code);
                    break;
                }
            }
        }
        let refusal = refusal.or_else(|| self.ledger.can_debit(&payer, currency, total).err());
        if let Some(code) = refusal {
            for branch in tried.iter().rev() {
                let (_, reply) = self.parts.apply(&branch.branch_cancel(), now_ms);
                assert!(reply.error().is_none(), "executor {me}: cancel of {branch:?} refused: {reply:?}");
            }
            refuse(fx, code);
            return true;
        }
        self.open_settle_accounts(transfers, now_ms);
        let mut results = Vec::with_capacity(records.len());
        for record in records {
            let outcome = self.book_local(record, now_ms, fx);
            assert!(outcome.is_ok(), "executor {me}: a checked local movement was refused: {outcome:?}");
            results.push(outcome);
        }
        for branch in &tried {
            let (_, reply) = self.parts.apply(&branch.branch_confirm(), now_ms);
            assert!(reply.error().is_none(), "executor {me}: confirm of {branch:?} refused: {reply:?}");
        }
        answer(fx, results);
        true
    }

    /// A flow's transfer as an item: its system ids are its own to use.
    fn flow_item(&self, request: &TransferRequest, now_ms: u64) -> Item {
        match request {
            TransferRequest::Create { .. } => {
                let (record, static_error) = create_record_as(request, now_ms, true);
                Item { kind: ItemKind::Create, record: Some(record), static_error }
            }
            _ => {
                let mut item = self.build_item(request, now_ms);
                // Reserved ids are refused for clients only.
                if item.static_error == Some(ErrorCode::InvalidRequest) {
                    item.static_error = None;
                }
                item
            }
        }
    }

    /// The merchants' pending-settlement accounts a flow's transfers
    /// credit, on this executor: opened if new (they hold nothing until
    /// the transfer commits; a refused one leaves an empty account).
    fn open_settle_accounts(&mut self, transfers: &[TransferRequest], now_ms: u64) {
        for request in transfers {
            if let TransferRequest::Create { credit_account_id, currency, .. } = request {
                let settle = credit_account_id.as_str().starts_with("_settle.")
                    && system_shard(credit_account_id.as_str()).is_some();
                if settle && self.layout.executor_of_account(credit_account_id) == self.id {
                    self.ledger.open_system_account(credit_account_id, *currency, now_ms);
                }
            }
        }
    }

    /// Opens the account a flow's credit leg names, on this executor (its
    /// owner), if it is one the flows open themselves and new: a
    /// settlement's merchant and fee accounts (see `trade_settlement.rs`).
    /// Called for every hold a participant takes, before it; a `Try` is a
    /// logged input, so a replay opens the same accounts. Clients cannot
    /// name reserved ids, so only a flow's transfer gets here with one; a
    /// refused transfer leaves an empty account.
    pub(crate) fn open_flow_account(&mut self, leg: &Leg, now_ms: u64) {
        if leg.side == Side::Credit && peakstack_domain::ledger::is_settlement_account(leg.account_id.as_str()) {
            self.ledger.open_system_account(&leg.account_id, leg.currency, now_ms);
        }
    }

    /// Books a part command's ledger movements as one atomic transaction
    /// that must be local to this executor (every id names its shard): all
    /// of them, or none and the first refusal.
    pub(crate) fn book_locally(
        &mut self,
        transfers: Vec<TransferRequest>,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<(), ErrorCode> {
        if transfers.is_empty() {
            return Ok(());
        }
        let n = transfers.len();
        self.open_settle_accounts(&transfers, now_ms);
        let items: Vec<Item> = transfers.iter().map(|request| self.flow_item(request, now_ms)).collect();
        let before = fx.outbox.len();
        fx.flow.clear();
        self.start_txn(items, Some((FLOW_TAG, (0..n).collect())), None, now_ms, fx);
        assert_eq!(fx.outbox.len(), before, "executor {}: a flow's local movements sent messages", self.id);
        assert_eq!(fx.flow.len(), n, "executor {}: a flow's local movements did not finish in one step", self.id);
        let results: Vec<TransferResult> = fx.flow.drain(..).map(|(_, r)| r).collect();
        match results.iter().find_map(|r| r.as_ref().err().copied().filter(|e| *e != ErrorCode::LinkedEventFailed)) {
            Some(e) => Err(e),
            None => results.into_iter().try_for_each(|r| r.map(drop)),
        }
    }

    /// Applies a part's command. An orders command that moves money books
    /// its movements first, in the same step: if the ledger refuses one,
    /// none is booked and the command is refused with that code. Such a
    /// command is logged even when refused (`changed`): its booking took a
    /// transaction id, which a replay must take too.
    pub(crate) fn apply_part_command(
        &mut self,
        command: &PartCommand,
        now_ms: u64,
        fx: &mut Effects,
    ) -> (bool, PartReply) {
        if let PartCommand::Orders(orders_command) = command {
            match self.parts.orders.plan(orders_command, now_ms) {
                Err(e) => return (false, PartReply::Orders(Err(e), None, false)),
                Ok(effects) if !effects.is_empty() => {
                    let transfers = effects.into_iter().map(movement).collect::<Result<Vec<_>, _>>();
                    let booked = transfers.and_then(|t| self.book_locally(t, now_ms, fx));
                    if let Err(e) = booked {
                        return (true, PartReply::Orders(Err(e), None, false));
                    }
                    let releases = self.parts.orders.releases(orders_command, now_ms);
                    let (_, reply) = self.parts.apply(command, now_ms);
                    assert!(
                        reply.error().is_none(),
                        "executor {}: {command:?} refused after its plan was booked: {reply:?}",
                        self.id
                    );
                    // What the ended orders held goes back, reliably, in this batch.
                    for release in releases {
                        self.send_reliably(PartCommand::of_release(release), now_ms, fx);
                    }
                    return (true, reply);
                }
                Ok(_) => {}
            }
        }
        self.parts.apply(command, now_ms)
    }
}

/// The transfer request of a part's ledger movement.
fn movement(effect: LedgerEffect) -> Result<TransferRequest, ErrorCode> {
    let amount = |a: u64| Amount::new(a).ok_or(ErrorCode::InvalidRequest);
    Ok(match effect {
        LedgerEffect::Post { id, pending_id, amount: a } => {
            TransferRequest::Post { id, pending_id, amount: Some(amount(a)?), details: Details::default() }
        }
        LedgerEffect::Void { id, pending_id } => TransferRequest::Void { id, pending_id, details: Details::default() },
        LedgerEffect::Move { id, debit_account_id, credit_account_id, amount: a, currency } => {
            TransferRequest::Create {
                id,
                debit_account_id,
                credit_account_id,
                amount: amount(a)?,
                currency,
                pending: false,
                timeout_ms: 0,
                details: Details::default(),
            }
        }
    })
}
