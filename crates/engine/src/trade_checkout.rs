//! Checkout: one cart, priced by the quote engine, split into one order
//! per merchant under one checkout with one payment, placed by one global
//! transaction (see `flows.rs`): every line's stock reserved, every
//! limited promotion's budget consumed, every coupon locked, the order
//! placed and the buyer's money moved (automatic capture) or held (manual)
//! to each merchant's pending-settlement account, then all confirmed or
//! all cancelled.
//!
//! The checkout lives on the shard of the buyer's paying account (its
//! home): its ids carry that shard, its money and its orders stay there,
//! so a capture, a cancel or a refund later is one local step. On one
//! executor the whole checkout is one atomic step with no messages.

use peakstack_domain::ledger::settle_account_id;
use peakstack_domain::{Amount, AssignedKind, Currency, Details, ErrorCode, Id, TransferRequest};
use peakstack_inventory as inventory;
use peakstack_orders::{self as orders, CaptureMode, NewCheckout, NewOrder, OrderLine};
use std::collections::HashMap;
use std::sync::Arc;

use peakstack_pricing::{
    self as pricing, Coupon, DiscountSource, PriceBook, PromotionUsage, Quote, QuoteRequest, UsageView,
};

use crate::executor::ExecutorCore;
use crate::parts::{OrdersAnswer, OrdersQuery, PartAnswer, PartCommand, PartQuery, PartReply};
use crate::protocol::{ExecutorId, Input, TransferResult};
use crate::runtime::Engine;

/// A priced cart on its way to its home executor, which gives it its ids.
#[derive(Clone, Debug)]
pub struct CheckoutDraft {
    pub buyer_id: Id,
    pub account_id: Id,
    pub currency: Currency,
    pub capture: CaptureMode,
    pub coupon_ids: Vec<Id>,
    /// One per merchant, in the quote's merchant order.
    pub orders: Vec<DraftOrder>,
    /// Limited promotions the quote applied, with the discount each gave.
    pub promotions: Vec<(Id, u64)>,
    pub authorization_ms: u64,
}

#[derive(Clone, Debug)]
pub struct DraftOrder {
    pub merchant_id: Id,
    pub lines: Vec<OrderLine>,
    pub total: u64,
}

/// What a checkout asks.
#[derive(Clone, Debug)]
pub struct CheckoutRequest {
    pub buyer_id: Id,
    pub lines: Vec<pricing::CartLine>,
    pub coupon_ids: Vec<Id>,
    pub account_id: Id,
    pub capture: CaptureMode,
}

impl CheckoutDraft {
    /// The draft of a quote: its lines grouped by merchant (each order's
    /// lines in cart order), the limited promotions it used.
    pub fn of(quote: &Quote, request: &CheckoutRequest, book: &pricing::PriceBook) -> Result<CheckoutDraft, ErrorCode> {
        let mut orders: Vec<DraftOrder> = Vec::new();
        for line in &quote.lines {
            let at = match orders.iter().position(|o| o.merchant_id == line.merchant_id) {
                Some(at) => at,
                None => {
                    orders.push(DraftOrder { merchant_id: line.merchant_id.clone(), lines: Vec::new(), total: 0 });
                    orders.len() - 1
                }
            };
            let order = &mut orders[at];
            let discounts = line
                .discounts
                .iter()
                .map(|d| match &d.source {
                    DiscountSource::Promotion(id) | DiscountSource::Coupon(id) => (id.clone(), d.amount),
                })
                .collect();
            order.lines.push(OrderLine {
                line_id: order.lines.len() as u32 + 1,
                sku_id: line.sku_id.clone(),
                quantity: line.quantity,
                unit_price: line.unit_price,
                subtotal: line.subtotal,
                discounts,
                total: line.total,
            });
            order.total = order.total.checked_add(line.total).ok_or(ErrorCode::Overflow)?;
        }
        if orders.len() > orders::MAX_ORDERS || orders.iter().any(|o| o.lines.len() > orders::MAX_ORDER_LINES) {
            return Err(ErrorCode::InvalidRequest);
        }
        // A fully discounted order would move no money: not taken yet.
        if orders.iter().any(|o| o.total == 0) {
            return Err(ErrorCode::InvalidRequest);
        }
        let promotions = quote
            .applied
            .iter()
            .filter_map(|a| match &a.source {
                DiscountSource::Promotion(id) if book.promotions().any(|p| p.id == *id && p.is_limited()) => {
                    Some((id.clone(), a.amount))
                }
                _ => None,
            })
            .collect();
        Ok(CheckoutDraft {
            buyer_id: request.buyer_id.clone(),
            account_id: request.account_id.clone(),
            currency: quote.currency,
            capture: request.capture,
            coupon_ids: request.coupon_ids.clone(),
            orders,
            promotions,
            authorization_ms: orders::DEFAULT_AUTHORIZATION_MS,
        })
    }
}

impl ExecutorCore {
    /// Gives a draft its ids on this executor (the home) and makes the
    /// global transaction that places it: the checkout's id and the input
    /// to apply and log.
    /// `Ok((id, None))`: the checkout this key placed already (nothing to apply).
    pub fn checkout_input(&mut self, ask: CheckoutAsk, now_ms: u64) -> Result<(Id, Option<Input>), ErrorCode> {
        let CheckoutAsk { request, book, usage, mut coupons, key } = ask;
        if let Some(placed) = key.as_ref().and_then(|tag| self.parts.keyed_checkout(tag)) {
            return placed.map(|id| (id, None));
        }
        for id in &request.coupon_ids {
            if !coupons.iter().any(|c| c.id == *id) {
                coupons.extend(self.parts.pricing.coupon(id).cloned());
            }
        }
        let home_usage = HomeUsage { pricing: &self.parts.pricing, remote: &usage };
        let quote = pricing::quote(&book, &request.quote_request(), &home_usage, &coupons, now_ms)?;
        let draft = CheckoutDraft::of(&quote, &request, &book)?;
        let layout = self.layout;
        let home = layout.shard_of_account(&draft.account_id);
        let orders_part = &mut self.parts.orders;
        let sequence = orders_part.take_sequence();
        let checkout_id = AssignedKind::Checkout.id(home, sequence);
        let payment_id = AssignedKind::Payment.id(home, sequence);
        let mut new_orders = Vec::with_capacity(draft.orders.len());
        let mut transfers = Vec::with_capacity(draft.orders.len());
        for (index, order) in draft.orders.into_iter().enumerate() {
            let order_sequence = if index == 0 { sequence } else { orders_part.take_sequence() };
            let order_id = AssignedKind::Order.id(home, order_sequence);
            let settle =
                settle_account_id(home, draft.currency, &order.merchant_id).ok_or(ErrorCode::InvalidRequest)?;
            let transfer_id = orders::order_transfer_id(&order_id);
            transfers.push(TransferRequest::Create {
                id: transfer_id.clone(),
                debit_account_id: draft.account_id.clone(),
                credit_account_id: settle.clone(),
                amount: Amount::new(order.total).ok_or(ErrorCode::InvalidRequest)?,
                currency: draft.currency,
                pending: draft.capture == CaptureMode::Manual,
                timeout_ms: 0,
                details: Details::default(),
            });
            new_orders.push(NewOrder {
                id: order_id,
                merchant_id: order.merchant_id,
                lines: order.lines,
                total: order.total,
                transfer_id,
                settle_account_id: settle,
            });
        }
        let mut branches = Vec::new();
        for order in &new_orders {
            for line in &order.lines {
                branches.push(PartCommand::Inventory(inventory::Command::TryReserve {
                    txn: 0,
                    shard: line.sku_id.shard(layout.shards()),
                    sku_id: line.sku_id.clone(),
                    buyer_id: draft.buyer_id.clone(),
                    quantity: line.quantity,
                    deadline_ms: 0,
                }));
            }
        }
        for (promotion_id, discount) in &draft.promotions {
            branches.push(PartCommand::Pricing(pricing::Command::TryConsume {
                txn: 0,
                promotion_id: promotion_id.clone(),
                buyer_id: draft.buyer_id.clone(),
                discount: *discount,
                deadline_ms: 0,
            }));
        }
        for coupon_id in &draft.coupon_ids {
            branches.push(PartCommand::Pricing(pricing::Command::LockCoupon {
                txn: 0,
                coupon_id: coupon_id.clone(),
                buyer_id: draft.buyer_id.clone(),
                deadline_ms: 0,
            }));
        }
        let checkout = NewCheckout {
            id: checkout_id.clone(),
            buyer_id: draft.buyer_id,
            account_id: draft.account_id,
            currency: draft.currency,
            capture: draft.capture,
            payment_id,
            coupon_ids: draft.coupon_ids,
            orders: new_orders,
            created_ms: now_ms,
            authorization_expires_ms: now_ms.saturating_add(draft.authorization_ms),
            consumed_promotions: draft.promotions.iter().map(|(id, _)| id.clone()).collect(),
        };
        branches.push(PartCommand::Orders(orders::Command::TryPlace { txn: 0, checkout: Box::new(checkout) }));
        Ok((checkout_id, Some(Input::Global { transfers, branches, origin: None, key })))
    }
}

/// The answer of a checkout's global transaction: its id and one result
/// per order's transfer (all ok, or the refusal).
pub type CheckoutAnswer = Result<(Id, Vec<TransferResult>), ErrorCode>;

impl Engine {
    /// Prices a cart and places it: the checkout's id once its global
    /// transaction committed, or the first refusal (nothing reserved,
    /// consumed, locked, held or moved then). The home executor prices it
    /// with the same code as a quote, reading its own counters and
    /// coupons where it applies it; the others' are read first (none on
    /// one executor: a checkout is one request to it).
    pub async fn checkout(&self, request: &CheckoutRequest) -> Result<Id, ErrorCode> {
        self.checkout_keyed(request, None).await
    }

    /// [`Engine::checkout`] under an Idempotency-Key (its tag): placed once;
    /// a retry after its stored answer was lost (a crash between the
    /// commit and the key store) answers the checkout it placed.
    pub async fn checkout_keyed(
        &self,
        request: &CheckoutRequest,
        key: Option<crate::protocol::IdempotencyTag>,
    ) -> Result<Id, ErrorCode> {
        let book = self.price_book().await?;
        let home = self.layout().executor_of_account(&request.account_id);
        let quote_request = request.quote_request();
        let (usage, coupons) = self.pricing_inputs(&book, &quote_request, Some(home)).await?;
        let ask = CheckoutAsk { request: request.clone(), book, usage, coupons, key };
        let (id, results) = self.submit_checkout(home, ask).await?;
        checkout_outcome(id, results)
    }
}

impl CheckoutRequest {
    pub fn quote_request(&self) -> QuoteRequest {
        QuoteRequest { buyer_id: self.buyer_id.clone(), lines: self.lines.clone(), coupon_ids: self.coupon_ids.clone() }
    }
}

/// A checkout on its way to its home executor: the cart, the price book,
/// and what the quote reads from other executors.
#[derive(Debug)]
pub struct CheckoutAsk {
    pub request: CheckoutRequest,
    pub book: Arc<PriceBook>,
    pub usage: HashMap<Id, PromotionUsage>,
    pub coupons: Vec<Coupon>,
    pub key: Option<crate::protocol::IdempotencyTag>,
}

/// The counters a checkout's quote reads: the home's own promotions from
/// its pricing part, the others' as their writers answered.
struct HomeUsage<'a> {
    pricing: &'a pricing::Pricing,
    remote: &'a HashMap<Id, PromotionUsage>,
}

impl UsageView for HomeUsage<'_> {
    fn usage(&self, promotion_id: &Id, buyer_id: &Id) -> PromotionUsage {
        match self.remote.get(promotion_id) {
            Some(usage) => *usage,
            None => self.pricing.usage(promotion_id, buyer_id),
        }
    }
}

/// The checkout's id if every transfer committed, else the refusal that
/// explains it (a branch's code rather than `linked_event_failed`).
pub fn checkout_outcome(id: Id, results: Vec<TransferResult>) -> Result<Id, ErrorCode> {
    let mut refusal = None;
    for result in results {
        if let Err(e) = result {
            if refusal.is_none() || refusal == Some(ErrorCode::LinkedEventFailed) {
                refusal = Some(e);
            }
        }
    }
    match refusal {
        None => Ok(id),
        Some(e) => Err(e),
    }
}

/// Most orders one listing page holds.
pub const MAX_ORDER_PAGE: usize = 1000;

impl Engine {
    /// Runs an orders command (capture, cancel, refund) at the home of the
    /// object it names; answered once durable, with a new refund's id.
    pub async fn orders_command(&self, command: orders::Command) -> Result<Option<Id>, ErrorCode> {
        self.orders_command_changed(command).await.map(|(id, _)| id)
    }

    /// [`Engine::orders_command`], with whether it changed anything (false
    /// for a repeat: a second capture of a captured payment, a cancel of a
    /// canceled one), decided where the command ran, so racing callers
    /// learn which of them did it.
    pub async fn orders_command_changed(&self, command: orders::Command) -> Result<(Option<Id>, bool), ErrorCode> {
        match self.part(PartCommand::Orders(command)).await? {
            PartReply::Orders(reply, id, changed) => reply.map(|()| (id, changed)),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    async fn orders_read(&self, executor: ExecutorId, query: OrdersQuery) -> Result<OrdersAnswer, ErrorCode> {
        match self.query_part(executor, PartQuery::Orders(query)).await? {
            PartAnswer::Orders(answer) => Ok(answer),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// The executor an assigned id of `kind` names, if it is one.
    fn home_of(&self, kind: AssignedKind, id: &Id) -> Option<ExecutorId> {
        let layout = self.layout();
        kind.shard_of(id.as_str()).filter(|s| *s < layout.shards()).map(|s| layout.executor_of_shard(s))
    }

    /// A checkout with its orders.
    pub async fn checkout_view(&self, id: &Id) -> Result<Option<(orders::Checkout, Vec<orders::Order>)>, ErrorCode> {
        let Some(executor) = self.home_of(AssignedKind::Checkout, id) else { return Ok(None) };
        match self.orders_read(executor, OrdersQuery::Checkout(id.clone())).await? {
            OrdersAnswer::Checkout(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn order(&self, id: &Id) -> Result<Option<orders::Order>, ErrorCode> {
        let Some(executor) = self.home_of(AssignedKind::Order, id) else { return Ok(None) };
        match self.orders_read(executor, OrdersQuery::Order(id.clone())).await? {
            OrdersAnswer::Order(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn payment(&self, id: &Id) -> Result<Option<orders::PaymentView>, ErrorCode> {
        let Some(executor) = self.home_of(AssignedKind::Payment, id) else { return Ok(None) };
        match self.orders_read(executor, OrdersQuery::Payment(id.clone())).await? {
            OrdersAnswer::Payment(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn refund(&self, id: &Id) -> Result<Option<orders::Refund>, ErrorCode> {
        let Some(executor) = self.home_of(AssignedKind::Refund, id) else { return Ok(None) };
        match self.orders_read(executor, OrdersQuery::Refund(id.clone())).await? {
            OrdersAnswer::Refund(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// Orders of a buyer and/or a merchant, in (shard, sequence) order of
    /// their ids after `after`: one read per executor, merged.
    pub async fn list_orders(
        &self,
        buyer_id: Option<Id>,
        merchant_id: Option<Id>,
        after: Option<Id>,
        limit: usize,
    ) -> Result<Vec<orders::Order>, ErrorCode> {
        let limit = limit.min(MAX_ORDER_PAGE);
        let mut all = Vec::new();
        for executor in 0..self.layout().executors() {
            let query = OrdersQuery::Orders {
                buyer_id: buyer_id.clone(),
                merchant_id: merchant_id.clone(),
                after: after.clone(),
                limit,
            };
            if let OrdersAnswer::Orders(found) = self.orders_read(executor, query).await? {
                all.extend(found);
            }
        }
        // The orders part's listing order: (sequence, shard) of the id.
        all.sort_by_key(|o| AssignedKind::Order.parse(o.order.id.as_str()).map(|(shard, sequence)| (sequence, shard)));
        all.truncate(limit);
        Ok(all)
    }
}
