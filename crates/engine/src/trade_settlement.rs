//! Settlement: a merchant's captured money moved from its pending-settlement
//! accounts (`_settle.<shard>.<CUR>.<merchant>`, on the checkouts' home
//! shards) to its available account (`_merchant.<merchant>.<CUR>`, on the
//! shard of that id), minus the platform's fee (to `_fees.<CUR>`).
//!
//! One global transaction per (home executor, currency), coordinated by
//! that executor, which is the single writer of every order it settles:
//! it picks the captured, unsettled parts there in its own step (so no
//! refund or capture slips between the pick and the try), and the
//! transaction carries one transfer per settle account to the merchant
//! and one to the fee account, with the orders part's `TrySettle` branch
//! that locks the parts and, confirmed, marks them Settled. All or nothing.
//!
//! The credited accounts are opened by the executor that owns them when
//! the first hold on them arrives (`flows.rs`, `open_flow_account`): a
//! `Try` is a logged input of that executor, so a replay opens them too,
//! and no separate step has to run (and be retried) before the transfer.

use peakstack_domain::ledger::system_shard;
pub use peakstack_domain::ledger::{fee_account_id, merchant_account_id};
use peakstack_domain::{Amount, AssignedKind, Currency, Details, ErrorCode, Id, TransferRequest};
use peakstack_orders::{self as orders, NewSettlement, Settlement};

use crate::executor::ExecutorCore;
use crate::parts::{OrdersAnswer, OrdersQuery, PartAnswer, PartCommand, PartQuery};
use crate::protocol::{ExecutorId, Input, TransferResult};
use crate::runtime::Engine;

/// A merchant's settlement in one currency, asked of one home executor.
#[derive(Clone, Debug)]
pub struct SettleAsk {
    pub merchant_id: Id,
    pub currency: Currency,
    pub fee_bps: u32,
}

/// The answer of a settlement's global transaction: none when there was
/// nothing to settle, else its id and one result per transfer.
pub type SettleAnswer = Result<Option<(Id, Vec<TransferResult>)>, ErrorCode>;

/// Most merchants one scheduled round settles.
pub const MAX_MERCHANTS_PER_ROUND: usize = 1000;

impl ExecutorCore {
    /// The global transaction that settles what `ask`'s merchant has to
    /// settle on this executor, with the settlement's id; none if nothing.
    pub(crate) fn settlement_input(&mut self, ask: &SettleAsk, now_ms: u64) -> Result<Option<(Id, Input)>, ErrorCode> {
        if ask.fee_bps > orders::MAX_FEE_BPS {
            return Err(ErrorCode::InvalidRequest);
        }
        let picked = self.parts.orders.settleable(&ask.merchant_id, Some(ask.currency), ask.fee_bps);
        let Some((_, first)) = picked.first() else { return Ok(None) };
        let merchant_account = merchant_account_id(&ask.merchant_id, ask.currency).ok_or(ErrorCode::InvalidRequest)?;
        let shard = system_shard(first.settle_account_id.as_str()).expect("a settle account names its shard");
        let id = AssignedKind::Settlement.id(shard, self.parts.orders.take_sequence());
        let settlement = NewSettlement {
            id: id.clone(),
            merchant_id: ask.merchant_id.clone(),
            currency: ask.currency,
            fee_bps: ask.fee_bps,
            lines: picked.into_iter().map(|(_, line)| line).collect(),
            created_ms: now_ms,
        };
        settlement.validate()?;
        let mut transfers = Vec::new();
        for (index, (settle_account, net, fee)) in settlement.movements().into_iter().enumerate() {
            let legs = [(net, "net", merchant_account.clone()), (fee, "fee", fee_account_id(ask.currency))];
            for (amount, kind, credit_account_id) in legs {
                let Some(amount) = Amount::new(amount) else { continue };
                transfers.push(TransferRequest::Create {
                    id: Id::parse(&format!("_{kind}{index}.{id}")).expect("settlement transfer ids are short"),
                    debit_account_id: settle_account.clone(),
                    credit_account_id,
                    amount,
                    currency: ask.currency,
                    pending: false,
                    timeout_ms: 0,
                    details: Details::default(),
                });
            }
        }
        assert!(!transfers.is_empty(), "a settlement of something moves something");
        let branch = PartCommand::Orders(orders::Command::TrySettle { txn: 0, settlement: Box::new(settlement) });
        Ok(Some((id, Input::Global { transfers, branches: vec![branch], origin: None, key: None })))
    }
}

impl Engine {
    /// Settles every captured, unsettled part of a merchant (in one
    /// currency, or in each it has): one global transaction per home
    /// executor and currency. The settlements made, in id order; the first
    /// refusal stops it (those made before stay made: each is whole, and
    /// asking again settles what is left).
    pub async fn settle(
        &self,
        merchant_id: &Id,
        currency: Option<Currency>,
        fee_bps: u32,
    ) -> Result<Vec<Settlement>, ErrorCode> {
        let mut made = Vec::new();
        for executor in 0..self.layout().executors() {
            let currencies =
                match self.settlement_read(executor, OrdersQuery::SettleableCurrencies(merchant_id.clone())).await? {
                    OrdersAnswer::Currencies(found) => found,
                    _ => return Err(ErrorCode::Unavailable),
                };
            for of in currencies.into_iter().filter(|c| currency.is_none_or(|wanted| wanted == *c)) {
                let ask = SettleAsk { merchant_id: merchant_id.clone(), currency: of, fee_bps };
                let Some((id, results)) = self.submit_settlement(executor, ask).await? else { continue };
                let id = crate::trade_checkout::checkout_outcome(id, results)?;
                made.push(self.settlement(&id).await?.ok_or(ErrorCode::Unavailable)?);
            }
        }
        // In the order a listing shows them.
        made.sort_by_key(|s| AssignedKind::Settlement.parse(s.settlement.id.as_str()));
        Ok(made)
    }

    /// Settles every merchant with captured money (at most
    /// [`MAX_MERCHANTS_PER_ROUND`] per executor): the settlements made.
    pub async fn settle_all(&self, fee_bps: u32) -> Result<Vec<Settlement>, ErrorCode> {
        let mut merchants = Vec::new();
        for executor in 0..self.layout().executors() {
            let query = OrdersQuery::MerchantsToSettle { limit: MAX_MERCHANTS_PER_ROUND };
            if let OrdersAnswer::Merchants(found) = self.settlement_read(executor, query).await? {
                merchants.extend(found);
            }
        }
        merchants.sort_unstable();
        merchants.dedup();
        let mut made = Vec::new();
        for merchant_id in &merchants {
            made.extend(self.settle(merchant_id, None, fee_bps).await?);
        }
        Ok(made)
    }

    pub async fn settlement(&self, id: &Id) -> Result<Option<Settlement>, ErrorCode> {
        let layout = self.layout();
        let Some(shard) = AssignedKind::Settlement.shard_of(id.as_str()).filter(|s| *s < layout.shards()) else {
            return Ok(None);
        };
        match self.settlement_read(layout.executor_of_shard(shard), OrdersQuery::Settlement(id.clone())).await? {
            OrdersAnswer::Settlement(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// A merchant's settlements (not the failed ones), in (shard, sequence)
    /// order of their ids, at most `limit`.
    pub async fn settlements(&self, merchant_id: &Id, limit: usize) -> Result<Vec<Settlement>, ErrorCode> {
        let limit = limit.min(orders::MAX_SETTLEMENT_PAGE);
        let mut all = Vec::new();
        for executor in 0..self.layout().executors() {
            let query = OrdersQuery::Settlements { merchant_id: merchant_id.clone(), limit };
            if let OrdersAnswer::Settlements(found) = self.settlement_read(executor, query).await? {
                all.extend(found);
            }
        }
        all.sort_by_key(|s| AssignedKind::Settlement.parse(s.settlement.id.as_str()));
        all.truncate(limit);
        Ok(all)
    }

    async fn settlement_read(&self, executor: ExecutorId, query: OrdersQuery) -> Result<OrdersAnswer, ErrorCode> {
        match self.query_part(executor, PartQuery::Orders(query)).await? {
            PartAnswer::Orders(answer) => Ok(answer),
            _ => Err(ErrorCode::Unavailable),
        }
    }
}
