//! The parts an executor hosts beside the ledger, and the one place that
//! dispatches to them.
//!
//! Each part is a pure state machine of its own crate (its commands, state,
//! log encoding and checkpoint section); the executor logs its commands as
//! [`Input::Part`](crate::protocol::Input::Part), replays them, checkpoints
//! it as a section and asks it for its deadlines. Nothing here knows what
//! stock is. Adding a part adds a variant to each enum below and an arm to
//! each match, and touches nothing else.

use peakstack_domain::wire::{CodecError, Reader, Writer};
use peakstack_domain::Currency;
use peakstack_domain::{AssignedKind, ErrorCode, Id};
use peakstack_inventory as inventory;
use peakstack_inventory::{FlashSaleView, Inventory, SaleGates};
use peakstack_orders as orders;
use peakstack_orders::{Checkout, Order, Orders, PaymentView, Refund, Settlement};
use peakstack_pricing as pricing;
use peakstack_pricing::{
    Coupon, CouponTemplate, Pricing, Promotion, PromotionCounters, PromotionUsage, SkuPrice, UsageView,
};

use crate::layout::Layout;

/// A command of some part, as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartCommand {
    Inventory(inventory::Command),
    Pricing(pricing::Command),
    Orders(orders::Command),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartReply {
    Inventory(inventory::Reply),
    /// The pricing part answers done or why not; an issued coupon's id is
    /// the one [`Parts::assign`] put in the command.
    Pricing(pricing::Reply, Option<Id>),
    /// A refund's id is the one [`Parts::assign`] put in the command; and
    /// whether the command changed anything (a repeat of a capture or a
    /// cancel answers ok and changes nothing: it is not audited again).
    Orders(Result<(), ErrorCode>, Option<Id>, bool),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartQuery {
    Inventory(inventory::Query),
    Pricing(PricingQuery),
    Orders(OrdersQuery),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartAnswer {
    Inventory(inventory::QueryAnswer),
    Pricing(PricingAnswer),
    Orders(OrdersAnswer),
}

/// Reads of the orders part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrdersQuery {
    Checkout(Id),
    Order(Id),
    Payment(Id),
    Refund(Id),
    /// Orders in id order after `after`, of a buyer and/or a merchant.
    Orders {
        buyer_id: Option<Id>,
        merchant_id: Option<Id>,
        after: Option<Id>,
        limit: usize,
    },
    Settlement(Id),
    /// A merchant's settlements in id order.
    Settlements {
        merchant_id: Id,
        limit: usize,
    },
    /// The currencies a merchant has captured money to settle in.
    SettleableCurrencies(Id),
    /// Merchants with captured money to settle, at most `limit`.
    MerchantsToSettle {
        limit: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrdersAnswer {
    /// A checkout with its orders.
    Checkout(Option<(Checkout, Vec<Order>)>),
    Order(Option<Order>),
    Payment(Option<PaymentView>),
    Refund(Option<Refund>),
    Orders(Vec<Order>),
    Settlement(Option<Settlement>),
    Settlements(Vec<Settlement>),
    Currencies(Vec<Currency>),
    Merchants(Vec<Id>),
}

/// Reads of the pricing part (and, for the catalogue, of the SKU prices
/// beside it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PricingQuery {
    Promotion(Id),
    CouponTemplate(Id),
    Coupons(Vec<Id>),
    CouponsOf(Id),
    /// Counters of these promotions, with this buyer's uses.
    Usage {
        promotions: Vec<Id>,
        buyer_id: Id,
    },
    /// Everything a price book is made of that lives on this executor.
    Catalogue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PricingAnswer {
    Promotion(Option<(Promotion, PromotionCounters)>),
    CouponTemplate(Option<(CouponTemplate, u64)>),
    Coupons(Vec<Option<Coupon>>),
    Usage(Vec<PromotionUsage>),
    Catalogue { skus: Vec<SkuPrice>, promotions: Vec<Promotion>, templates: Vec<CouponTemplate> },
}

/// A part's tag in the log and in checkpoint sections. Never reuse one.
const INVENTORY: u8 = 1;
const PRICING: u8 = 2;
const ORDERS: u8 = 3;
/// The checkouts placed under an Idempotency-Key (see [`Parts::keyed_checkout`]).
const KEYED_CHECKOUTS: u8 = 4;
/// The checkpoint section of the ids the executor assigns for the parts.
const ASSIGNED_IDS: u8 = 0;

impl PartCommand {
    pub fn encode(&self, w: &mut Writer) {
        match self {
            PartCommand::Inventory(command) => {
                w.u8(INVENTORY);
                inventory::encode_command(command, w);
            }
            PartCommand::Pricing(command) => {
                w.u8(PRICING);
                let mut bytes = Vec::new();
                pricing::encode_command(command, &mut bytes);
                w.varint(bytes.len() as u64);
                w.buf.extend_from_slice(&bytes);
            }
            PartCommand::Orders(command) => {
                w.u8(ORDERS);
                orders::encode_command(command, w);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<PartCommand, CodecError> {
        match r.u8()? {
            INVENTORY => Ok(PartCommand::Inventory(inventory::decode_command(r)?)),
            PRICING => {
                let len = r.len()?;
                let command =
                    pricing::decode_command(r.bytes(len)?).map_err(|_| CodecError("invalid pricing command"))?;
                Ok(PartCommand::Pricing(command))
            }
            ORDERS => Ok(PartCommand::Orders(orders::decode_command(r)?)),
            _ => Err(CodecError("a command of an unknown part (written by a newer peakstack?)")),
        }
    }

    /// The executor that runs this command, or `None` when its id names
    /// nothing it could run on (a reservation id that is not one). A flash
    /// sale's attempt is routed by its gate (see [`route_attempt`]).
    pub fn executor(&self, layout: &Layout, gates: &SaleGates) -> Result<crate::protocol::ExecutorId, ErrorCode> {
        match self {
            PartCommand::Inventory(inventory::Command::Confirm { reservation_id })
            | PartCommand::Inventory(inventory::Command::Cancel { reservation_id }) => {
                reservation_shard(layout, reservation_id)
                    .map(|s| layout.executor_of_shard(s))
                    .ok_or(ErrorCode::ReservationNotFound)
            }
            PartCommand::Inventory(inventory::Command::Attempt { sale_id, .. }) => {
                gates.get(sale_id).map(|gate| layout.executor_of_shard(gate.shard)).ok_or(ErrorCode::FlashSaleNotFound)
            }
            PartCommand::Inventory(command) => {
                let id = command.routing_id().ok_or(ErrorCode::InvalidRequest)?;
                Ok(layout.executor_of_shard(id.shard(layout.shards())))
            }
            PartCommand::Pricing(command) => pricing_shard(layout, command).map(|s| layout.executor_of_shard(s)),
            PartCommand::Orders(command) => orders_shard(layout, command).map(|s| layout.executor_of_shard(s)),
        }
    }
}

/// The shard that keeps what an orders command changes: the one its
/// checkout's, order's or payment's id names.
fn orders_shard(layout: &Layout, command: &orders::Command) -> Result<u32, ErrorCode> {
    use orders::Command as C;
    let named = |kind: AssignedKind, id: &Id, missing: ErrorCode| {
        kind.shard_of(id.as_str()).filter(|s| *s < layout.shards()).ok_or(missing)
    };
    match command {
        C::TryPlace { checkout, .. } => named(AssignedKind::Checkout, &checkout.id, ErrorCode::CheckoutNotFound),
        C::ConfirmPlace { checkout_id, .. } | C::CancelPlace { checkout_id, .. } => {
            named(AssignedKind::Checkout, checkout_id, ErrorCode::CheckoutNotFound)
        }
        C::Capture { payment_id, .. } | C::CancelPayment { payment_id } => {
            named(AssignedKind::Payment, payment_id, ErrorCode::PaymentNotFound)
        }
        C::CancelOrder { order_id } | C::Refund { order_id, .. } => {
            named(AssignedKind::Order, order_id, ErrorCode::OrderNotFound)
        }
        C::TrySettle { settlement, .. } => {
            named(AssignedKind::Settlement, &settlement.id, ErrorCode::SettlementNotFound)
        }
        C::ConfirmSettle { settlement_id, .. } | C::CancelSettle { settlement_id, .. } => {
            named(AssignedKind::Settlement, settlement_id, ErrorCode::SettlementNotFound)
        }
        C::Expire { .. } | C::ForgetFences { .. } => Err(ErrorCode::InvalidRequest),
    }
}

impl PartCommand {
    /// Whether this is a branch try of a global transaction (see
    /// [`PartCommand::stamp_branch`]).
    pub fn is_branch_try(&self) -> bool {
        matches!(
            self,
            PartCommand::Inventory(inventory::Command::TryReserve { .. })
                | PartCommand::Pricing(pricing::Command::TryConsume { .. } | pricing::Command::LockCoupon { .. })
                | PartCommand::Orders(orders::Command::TryPlace { .. } | orders::Command::TrySettle { .. })
        )
    }

    /// Stamps a branch try with its transaction and the time until which
    /// its part may hold what it takes: past that, unconfirmed, the part
    /// gives it back by itself.
    pub fn stamp_branch(&mut self, txn: u64, hold_until_ms: u64) {
        match self {
            PartCommand::Inventory(inventory::Command::TryReserve { txn: t, deadline_ms, .. })
            | PartCommand::Pricing(pricing::Command::TryConsume { txn: t, deadline_ms, .. })
            | PartCommand::Pricing(pricing::Command::LockCoupon { txn: t, deadline_ms, .. }) => {
                *t = txn;
                *deadline_ms = hold_until_ms;
            }
            // A placed checkout holds nothing by itself: its fence is the executor's.
            PartCommand::Orders(orders::Command::TryPlace { txn: t, .. })
            | PartCommand::Orders(orders::Command::TrySettle { txn: t, .. }) => *t = txn,
            _ => unreachable!("only branch tries are stamped: {self:?}"),
        }
    }

    /// The executor a branch's try, confirm and cancel run on.
    pub fn branch_executor(&self, layout: &Layout) -> crate::protocol::ExecutorId {
        let shard = match self {
            PartCommand::Inventory(
                inventory::Command::TryReserve { sku_id, .. }
                | inventory::Command::ConfirmBranch { sku_id, .. }
                | inventory::Command::CancelBranch { sku_id, .. },
            ) => sku_id.shard(layout.shards()),
            PartCommand::Pricing(command) => pricing_shard(layout, command).unwrap_or(0),
            PartCommand::Orders(command) => orders_shard(layout, command).unwrap_or(0),
            _ => unreachable!("not a branch command: {self:?}"),
        };
        layout.executor_of_shard(shard)
    }

    /// The executor a reliable message's command runs on (see `outbox.rs`):
    /// the one of the SKU, promotion or coupon it gives back to.
    pub fn message_executor(&self, layout: &Layout) -> crate::protocol::ExecutorId {
        let shard = match self {
            PartCommand::Inventory(command) => command.routing_id().map_or(0, |id| id.shard(layout.shards())),
            PartCommand::Pricing(command) => pricing_shard(layout, command).unwrap_or(0),
            PartCommand::Orders(command) => orders_shard(layout, command).unwrap_or(0),
        };
        layout.executor_of_shard(shard)
    }

    /// The commands that give back what an order held, to send reliably.
    pub fn of_release(release: orders::Release) -> PartCommand {
        match release {
            orders::Release::Stock { sku_id, buyer_id, quantity } => {
                PartCommand::Inventory(inventory::Command::Return { sku_id, buyer_id, quantity })
            }
            orders::Release::Budget { promotion_id, buyer_id, discount, uses } => {
                PartCommand::Pricing(pricing::Command::Restore { promotion_id, buyer_id, discount, uses })
            }
            orders::Release::Coupon { txn, coupon_id } => {
                PartCommand::Pricing(pricing::Command::ReturnCoupon { txn, coupon_id })
            }
        }
    }

    /// The command that confirms a branch try.
    pub fn branch_confirm(&self) -> PartCommand {
        match self {
            PartCommand::Inventory(inventory::Command::TryReserve { txn, sku_id, .. }) => {
                PartCommand::Inventory(inventory::Command::ConfirmBranch { txn: *txn, sku_id: sku_id.clone() })
            }
            PartCommand::Pricing(pricing::Command::TryConsume { txn, promotion_id, .. }) => {
                PartCommand::Pricing(pricing::Command::ConfirmConsume { txn: *txn, promotion_id: promotion_id.clone() })
            }
            PartCommand::Pricing(pricing::Command::LockCoupon { txn, coupon_id, .. }) => {
                PartCommand::Pricing(pricing::Command::UseCoupon { txn: *txn, coupon_id: coupon_id.clone() })
            }
            PartCommand::Orders(orders::Command::TryPlace { txn, checkout }) => {
                PartCommand::Orders(orders::Command::ConfirmPlace { txn: *txn, checkout_id: checkout.id.clone() })
            }
            PartCommand::Orders(orders::Command::TrySettle { txn, settlement }) => {
                PartCommand::Orders(orders::Command::ConfirmSettle { txn: *txn, settlement_id: settlement.id.clone() })
            }
            _ => unreachable!("not a branch try: {self:?}"),
        }
    }

    /// The command that cancels a branch try (also before it came).
    pub fn branch_cancel(&self) -> PartCommand {
        match self {
            PartCommand::Inventory(inventory::Command::TryReserve { txn, sku_id, .. }) => {
                PartCommand::Inventory(inventory::Command::CancelBranch { txn: *txn, sku_id: sku_id.clone() })
            }
            PartCommand::Pricing(pricing::Command::TryConsume { txn, promotion_id, .. }) => {
                PartCommand::Pricing(pricing::Command::CancelConsume { txn: *txn, promotion_id: promotion_id.clone() })
            }
            PartCommand::Pricing(pricing::Command::LockCoupon { txn, coupon_id, .. }) => {
                PartCommand::Pricing(pricing::Command::ReleaseCoupon { txn: *txn, coupon_id: coupon_id.clone() })
            }
            PartCommand::Orders(orders::Command::TryPlace { txn, checkout }) => {
                PartCommand::Orders(orders::Command::CancelPlace { txn: *txn, checkout_id: checkout.id.clone() })
            }
            PartCommand::Orders(orders::Command::TrySettle { txn, settlement }) => {
                PartCommand::Orders(orders::Command::CancelSettle { txn: *txn, settlement_id: settlement.id.clone() })
            }
            _ => unreachable!("not a branch try: {self:?}"),
        }
    }

    /// A short form for operators (`GET /v1/transactions/{id}`).
    pub fn short_form(&self) -> String {
        match self {
            PartCommand::Inventory(inventory::Command::TryReserve { sku_id, quantity, .. }) => {
                format!("reserve {quantity} of sku {sku_id}")
            }
            PartCommand::Pricing(pricing::Command::TryConsume { promotion_id, discount, .. }) => {
                format!("consume {discount} of promotion {promotion_id}")
            }
            PartCommand::Pricing(pricing::Command::LockCoupon { coupon_id, .. }) => format!("lock coupon {coupon_id}"),
            PartCommand::Orders(orders::Command::TryPlace { checkout, .. }) => {
                format!("place checkout {}", checkout.id)
            }
            PartCommand::Orders(orders::Command::TrySettle { settlement, .. }) => {
                format!(
                    "settle {} parts of merchant {} as {}",
                    settlement.lines.len(),
                    settlement.merchant_id,
                    settlement.id
                )
            }
            // What an unpaid order gives back (reliable messages, see `outbox.rs`).
            PartCommand::Inventory(inventory::Command::Return { sku_id, buyer_id, quantity }) => {
                format!("return {quantity} of sku {sku_id} (buyer {buyer_id})")
            }
            PartCommand::Pricing(pricing::Command::Restore { promotion_id, buyer_id, discount, uses }) => {
                format!("restore {discount} and {uses} uses of promotion {promotion_id} (buyer {buyer_id})")
            }
            PartCommand::Pricing(pricing::Command::ReturnCoupon { coupon_id, .. }) => {
                format!("return coupon {coupon_id}")
            }
            other => format!("{other:?}"),
        }
    }
}

impl PartReply {
    /// The refusal, if the command was refused.
    pub fn error(&self) -> Option<ErrorCode> {
        match self {
            PartReply::Inventory(reply) => reply.as_ref().err().copied(),
            PartReply::Pricing(reply, _) => reply.as_ref().err().copied(),
            PartReply::Orders(reply, ..) => reply.as_ref().err().copied(),
        }
    }
}

/// The shard that owns what a pricing command changes: a promotion's, a
/// template's (with its coupons: a coupon id names its template's shard).
fn pricing_shard(layout: &Layout, command: &pricing::Command) -> Result<u32, ErrorCode> {
    use pricing::Command as C;
    let by_hash = |id: &Id| Ok(id.shard(layout.shards()));
    match command {
        C::CreatePromotion(promotion) => by_hash(&promotion.id),
        C::CreateCouponTemplate(template) => by_hash(&template.id),
        C::IssueCoupon { template_id, .. } => by_hash(template_id),
        C::TryConsume { promotion_id, .. }
        | C::Restore { promotion_id, .. }
        | C::ConfirmConsume { promotion_id, .. }
        | C::CancelConsume { promotion_id, .. }
        | C::ForgetConsume { promotion_id, .. } => by_hash(promotion_id),
        C::LockCoupon { coupon_id, .. }
        | C::ReturnCoupon { coupon_id, .. }
        | C::UseCoupon { coupon_id, .. }
        | C::ReleaseCoupon { coupon_id, .. }
        | C::ForgetCouponFence { coupon_id, .. } => coupon_shard(layout, coupon_id).ok_or(ErrorCode::CouponNotFound),
    }
}

/// The shard a coupon id names, if it is one of this data dir's.
pub fn coupon_shard(layout: &Layout, id: &Id) -> Option<u32> {
    AssignedKind::Coupon.shard_of(id.as_str()).filter(|s| *s < layout.shards())
}

/// The shard a reservation id names, if it is one of this data dir's.
pub fn reservation_shard(layout: &Layout, id: &Id) -> Option<u32> {
    AssignedKind::Reservation.shard_of(id.as_str()).filter(|s| *s < layout.shards())
}

/// Fills in what a command takes from where it runs (the shard whose id a
/// new reservation carries) and checks a flash-sale attempt at its gate.
/// `Err` is the answer, given without the executor.
pub fn prepare(command: &mut PartCommand, layout: &Layout, gates: &SaleGates, now_ms: u64) -> Result<(), ErrorCode> {
    match command {
        PartCommand::Inventory(inventory::Command::Reserve { shard, sku_id, .. })
        | PartCommand::Inventory(inventory::Command::TryReserve { shard, sku_id, .. }) => {
            *shard = sku_id.shard(layout.shards());
            Ok(())
        }
        PartCommand::Inventory(inventory::Command::Attempt { shard, sale_id, .. }) => {
            let gate = gates.get(sale_id).ok_or(ErrorCode::FlashSaleNotFound)?;
            if let Some(refusal) = gate.refusal(now_ms) {
                return Err(refusal);
            }
            *shard = gate.shard;
            Ok(())
        }
        PartCommand::Inventory(_) | PartCommand::Pricing(_) | PartCommand::Orders(_) => Ok(()),
    }
}

/// Every part of one executor.
#[derive(Debug)]
pub struct Parts {
    pub inventory: Inventory,
    pub pricing: Pricing,
    pub orders: Orders,
    /// Checkouts placed under an Idempotency-Key, by the key's hash: (the
    /// request's fingerprint, the checkout id). Logged with the checkout
    /// (`Input::Global`), so a retry whose stored answer a crash lost finds
    /// its checkout instead of placing a second one.
    keyed_checkouts: std::collections::HashMap<[u8; 16], ([u8; 16], Id)>,
    /// The next coupon's sequence (its id is `cpn_<shard>_<sequence>`).
    next_coupon: u64,
    /// Set when a SKU, promotion or coupon template was made: price books
    /// built before are stale.
    catalogue_changed: bool,
}

impl Default for Parts {
    fn default() -> Parts {
        Parts {
            inventory: Inventory::new(),
            pricing: Pricing::new(),
            orders: Orders::new(),
            keyed_checkouts: Default::default(),
            next_coupon: 1,
            catalogue_changed: false,
        }
    }
}

impl Parts {
    /// Gives a command the ids this executor assigns (a coupon's), before
    /// it is applied and logged: the log holds the command with its id, so
    /// a replay makes the same coupon.
    pub fn assign(&mut self, command: &mut PartCommand, layout: &Layout) {
        match command {
            PartCommand::Pricing(pricing::Command::IssueCoupon { template_id, coupon_id, .. }) => {
                *coupon_id = AssignedKind::Coupon.id(template_id.shard(layout.shards()), self.next_coupon);
            }
            PartCommand::Orders(orders::Command::Refund { refund_id, order_id, .. }) => {
                if let Some(shard) = AssignedKind::Order.shard_of(order_id.as_str()) {
                    *refund_id = AssignedKind::Refund.id(shard, self.orders.peek_sequence());
                }
            }
            _ => {}
        }
    }

    pub fn apply(&mut self, command: &PartCommand, now_ms: u64) -> (bool, PartReply) {
        match command {
            PartCommand::Inventory(command) => {
                let (changed, reply) = self.inventory.apply(command, now_ms);
                self.catalogue_changed |= changed && matches!(command, inventory::Command::CreateSku(_));
                (changed, PartReply::Inventory(reply))
            }
            PartCommand::Pricing(command) => {
                let (changed, reply) = self.pricing.apply(command, now_ms);
                let mut issued = None;
                match command {
                    pricing::Command::CreatePromotion(_) | pricing::Command::CreateCouponTemplate(_) => {
                        self.catalogue_changed |= changed;
                    }
                    pricing::Command::IssueCoupon { coupon_id, .. } if changed => {
                        // Also in a replay: the counter follows the ids in the log.
                        let sequence = AssignedKind::Coupon.parse(coupon_id.as_str()).map(|(_, sequence)| sequence);
                        self.next_coupon = self.next_coupon.max(sequence.map_or(0, |s| s + 1));
                        issued = Some(coupon_id.clone());
                    }
                    _ => {}
                }
                (changed, PartReply::Pricing(reply, issued))
            }
            PartCommand::Orders(command) => {
                let (changed, reply) = self.orders.apply(command, now_ms);
                let refund = match command {
                    orders::Command::Refund { refund_id, .. } if reply.is_ok() => Some(refund_id.clone()),
                    _ => None,
                };
                (changed, PartReply::Orders(reply, refund, changed))
            }
        }
    }

    pub fn query(&self, query: &PartQuery) -> PartAnswer {
        match query {
            PartQuery::Inventory(query) => PartAnswer::Inventory(self.inventory.query(query)),
            PartQuery::Pricing(query) => PartAnswer::Pricing(self.pricing_query(query)),
            PartQuery::Orders(query) => PartAnswer::Orders(self.orders_query(query)),
        }
    }

    fn orders_query(&self, query: &OrdersQuery) -> OrdersAnswer {
        let part = &self.orders;
        match query {
            OrdersQuery::Checkout(id) => OrdersAnswer::Checkout(part.checkout(id).map(|checkout| {
                let orders = checkout.checkout.orders.iter().filter_map(|o| part.order(&o.id).cloned()).collect();
                (checkout.clone(), orders)
            })),
            OrdersQuery::Order(id) => OrdersAnswer::Order(part.order(id).cloned()),
            OrdersQuery::Payment(id) => OrdersAnswer::Payment(part.payment(id)),
            OrdersQuery::Refund(id) => OrdersAnswer::Refund(part.refund(id).cloned()),
            OrdersQuery::Orders { buyer_id, merchant_id, after, limit } => OrdersAnswer::Orders(
                part.orders(buyer_id.as_ref(), merchant_id.as_ref(), after.as_ref(), *limit)
                    .into_iter()
                    .cloned()
                    .collect(),
            ),
            OrdersQuery::Settlement(id) => OrdersAnswer::Settlement(part.settlement(id).cloned()),
            OrdersQuery::Settlements { merchant_id, limit } => {
                OrdersAnswer::Settlements(part.settlements_of(merchant_id, *limit).into_iter().cloned().collect())
            }
            OrdersQuery::SettleableCurrencies(merchant_id) => {
                let mut currencies: Vec<Currency> =
                    part.settleable(merchant_id, None, 0).into_iter().map(|(currency, _)| currency).collect();
                currencies.sort_unstable_by_key(|c| c.as_bytes());
                currencies.dedup();
                OrdersAnswer::Currencies(currencies)
            }
            OrdersQuery::MerchantsToSettle { limit } => OrdersAnswer::Merchants(part.merchants_to_settle(*limit)),
        }
    }

    fn pricing_query(&self, query: &PricingQuery) -> PricingAnswer {
        let pricing = &self.pricing;
        match query {
            PricingQuery::Promotion(id) => {
                PricingAnswer::Promotion(pricing.promotion(id).map(|(p, counters)| (p.clone(), counters)))
            }
            PricingQuery::CouponTemplate(id) => {
                PricingAnswer::CouponTemplate(pricing.coupon_template(id).map(|(t, issued)| (t.clone(), issued)))
            }
            PricingQuery::Coupons(ids) => {
                PricingAnswer::Coupons(ids.iter().map(|id| pricing.coupon(id).cloned()).collect())
            }
            PricingQuery::CouponsOf(buyer_id) => {
                PricingAnswer::Coupons(pricing.coupons_of(buyer_id).into_iter().map(Some).collect())
            }
            PricingQuery::Usage { promotions, buyer_id } => {
                PricingAnswer::Usage(promotions.iter().map(|p| pricing.usage(p, buyer_id)).collect())
            }
            PricingQuery::Catalogue => PricingAnswer::Catalogue {
                skus: self
                    .inventory
                    .skus()
                    .map(|s| SkuPrice {
                        sku_id: s.id.clone(),
                        merchant_id: s.merchant_id.clone(),
                        unit_price: s.price.get(),
                        currency: s.currency,
                    })
                    .collect(),
                promotions: pricing.promotions().into_iter().cloned().collect(),
                templates: pricing.coupon_templates().into_iter().cloned().collect(),
            },
        }
    }

    /// Records the key a checkout was placed under (its `TryPlace` branch names it).
    pub fn note_keyed_checkout(&mut self, tag: &crate::protocol::IdempotencyTag, branches: &[PartCommand]) {
        for branch in branches {
            if let PartCommand::Orders(orders::Command::TryPlace { checkout, .. }) = branch {
                self.keyed_checkouts.insert(tag.key_hash, (tag.fingerprint, checkout.id.clone()));
            }
        }
    }

    /// The checkout placed under this key, if one was and did not fail:
    /// `Ok(id)` for the same request, `Err(ExistsWithDifferentFields)` for
    /// another one, `Err(InFlight)` while it is still being placed.
    pub fn keyed_checkout(&self, tag: &crate::protocol::IdempotencyTag) -> Option<Result<Id, ErrorCode>> {
        let (fingerprint, id) = self.keyed_checkouts.get(&tag.key_hash)?;
        let state = self.orders.checkout(id).map(|c| c.state)?;
        match state {
            orders::CheckoutState::Failed => None,
            _ if *fingerprint != tag.fingerprint => Some(Err(ErrorCode::ExistsWithDifferentFields)),
            orders::CheckoutState::Pending => Some(Err(ErrorCode::InFlight)),
            orders::CheckoutState::Completed => Some(Ok(id.clone())),
        }
    }

    /// The commands for the deadlines that passed by `now_ms`.
    pub fn due(&self, now_ms: u64) -> Vec<PartCommand> {
        let mut due: Vec<PartCommand> = self.inventory.due(now_ms).into_iter().map(PartCommand::Inventory).collect();
        due.extend(self.pricing.due(now_ms).into_iter().map(PartCommand::Pricing));
        due.extend(self.orders.due(now_ms).into_iter().map(PartCommand::Orders));
        due
    }

    /// What changed since the last call and must be published once the
    /// batch that changed it is durable (see [`Publication::publish`]).
    pub fn take_publication(&mut self) -> Option<Publication> {
        let sales: Vec<FlashSaleView> =
            self.inventory.take_sale_updates().into_iter().filter_map(|id| self.inventory.sale(&id).cloned()).collect();
        let catalogue_changed = std::mem::take(&mut self.catalogue_changed);
        (!sales.is_empty() || catalogue_changed).then_some(Publication { sales, catalogue_changed })
    }

    /// Everything published, as after a restart.
    pub fn publish_all(&self, layout: &Layout, gates: &SaleGates) {
        Publication::publish_sales(self.inventory.sales(), layout, gates);
    }

    /// The checkpoint sections: `[count][tag, length, bytes]...`.
    pub fn encode_checkpoint(&self, w: &mut Writer) {
        let mut inventory = Writer::default();
        self.inventory.encode_checkpoint(&mut inventory);
        let mut pricing = Vec::new();
        self.pricing.encode_checkpoint(&mut pricing);
        let mut ids = Writer::default();
        ids.varint(self.next_coupon);
        let mut orders = Writer::default();
        self.orders.encode_checkpoint(&mut orders);
        let mut keyed = Writer::default();
        let mut entries: Vec<_> = self.keyed_checkouts.iter().collect();
        entries.sort_unstable_by_key(|(hash, _)| **hash);
        keyed.varint(entries.len() as u64);
        for (hash, (fingerprint, id)) in entries {
            keyed.buf.extend_from_slice(hash);
            keyed.buf.extend_from_slice(fingerprint);
            keyed.str(id.as_str());
        }
        w.varint(5);
        let sections = [
            (ASSIGNED_IDS, &ids.buf),
            (INVENTORY, &inventory.buf),
            (PRICING, &pricing),
            (ORDERS, &orders.buf),
            (KEYED_CHECKOUTS, &keyed.buf),
        ];
        for (tag, bytes) in sections {
            w.u8(tag);
            w.varint(bytes.len() as u64);
            w.buf.extend_from_slice(bytes);
        }
    }

    pub fn decode_checkpoint(r: &mut Reader<'_>) -> Result<Parts, CodecError> {
        let mut parts = Parts::default();
        for _ in 0..r.len()? {
            let tag = r.u8()?;
            let len = r.byte_len()?;
            let mut section = Reader::new(r.bytes(len)?);
            match tag {
                ASSIGNED_IDS => parts.next_coupon = section.varint()?,
                INVENTORY => parts.inventory = Inventory::decode_checkpoint(&mut section)?,
                PRICING => {
                    parts.pricing = Pricing::decode_checkpoint(section.bytes(len)?)
                        .map_err(|_| CodecError("invalid pricing checkpoint section"))?;
                }
                ORDERS => parts.orders = Orders::decode_checkpoint(&mut section)?,
                KEYED_CHECKOUTS => {
                    for _ in 0..section.len()? {
                        let (hash, fingerprint) = (section.array()?, section.array()?);
                        let id = Id::parse(section.str()?).ok_or(CodecError("an invalid checkout id"))?;
                        parts.keyed_checkouts.insert(hash, (fingerprint, id));
                    }
                }
                _ => return Err(CodecError("a checkpoint section of an unknown part")),
            }
            if !section.is_empty() {
                return Err(CodecError("trailing bytes in a checkpoint section"));
            }
        }
        Ok(parts)
    }
}

/// Published views of what a batch changed.
pub struct Publication {
    sales: Vec<FlashSaleView>,
    catalogue_changed: bool,
}

impl Publication {
    /// Each sale's gate, on the shard of its SKU (which runs its attempts).
    fn publish_sales<'a>(sales: impl IntoIterator<Item = &'a FlashSaleView>, layout: &Layout, gates: &SaleGates) {
        for sale in sales {
            gates.publish(sale, sale.sku_id.shard(layout.shards()));
        }
    }

    pub fn publish(&self, layout: &Layout, gates: &SaleGates, catalogue_epoch: &std::sync::atomic::AtomicU64) {
        Publication::publish_sales(&self.sales, layout, gates);
        if self.catalogue_changed {
            catalogue_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}
