//! The engine's API for the pricing part: promotions, coupon templates and
//! coupons where they live, and quotes over a price book built from every
//! executor's catalogue.
//!
//! A quote has no side effect. Its price book (SKU prices, promotions,
//! coupon templates: read-mostly data) is built once per catalogue change
//! and shared; the counters it reads (budgets, uses, a buyer's uses) and the
//! buyer's coupons are asked of their single writers at quote time, so a
//! quote says `budget_exhausted` only of a budget that is.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use peakstack_domain::{ErrorCode, Id};
use peakstack_pricing::{
    self as pricing, Coupon, CouponTemplate, PriceBook, Promotion, PromotionCounters, PromotionUsage, Quote,
    QuoteRequest, UsageView,
};

use crate::parts::{coupon_shard, PartAnswer, PartCommand, PartQuery, PartReply, PricingAnswer, PricingQuery};
use crate::protocol::ExecutorId;
use crate::runtime::Engine;

/// Counters of the promotions a quote reads, as their writers answered.
struct Usage {
    by_promotion: HashMap<Id, PromotionUsage>,
}

impl UsageView for Usage {
    fn usage(&self, promotion_id: &Id, _buyer_id: &Id) -> PromotionUsage {
        self.by_promotion.get(promotion_id).copied().unwrap_or_default()
    }
}

impl Engine {
    /// Runs one pricing command where its promotion or template lives;
    /// answered once durable. An issued coupon answers its new id.
    pub async fn pricing(&self, command: pricing::Command) -> Result<Option<Id>, ErrorCode> {
        match self.part(PartCommand::Pricing(command)).await? {
            PartReply::Pricing(reply, issued) => reply.map(|()| issued),
            PartReply::Inventory(_) | PartReply::Orders(..) => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn promotion(&self, id: &Id) -> Result<Option<(Promotion, PromotionCounters)>, ErrorCode> {
        match self.pricing_read(self.layout().executor_of_id(id), PricingQuery::Promotion(id.clone())).await? {
            PricingAnswer::Promotion(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn coupon_template(&self, id: &Id) -> Result<Option<(CouponTemplate, u64)>, ErrorCode> {
        match self.pricing_read(self.layout().executor_of_id(id), PricingQuery::CouponTemplate(id.clone())).await? {
            PricingAnswer::CouponTemplate(found) => Ok(found),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// A buyer's coupons, over every executor (a coupon lives with its template).
    pub async fn coupons_of(&self, buyer_id: &Id) -> Result<Vec<Coupon>, ErrorCode> {
        let mut all = Vec::new();
        for executor in 0..self.layout().executors() {
            if let PricingAnswer::Coupons(found) =
                self.pricing_read(executor, PricingQuery::CouponsOf(buyer_id.clone())).await?
            {
                all.extend(found.into_iter().flatten());
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Coupons by id, each from the executor its id names (missing ones left out).
    pub async fn coupons(&self, ids: &[Id]) -> Result<Vec<Coupon>, ErrorCode> {
        let layout = self.layout();
        let mut by_executor: HashMap<ExecutorId, Vec<Id>> = HashMap::new();
        for id in ids {
            if let Some(shard) = coupon_shard(&layout, id) {
                by_executor.entry(layout.executor_of_shard(shard)).or_default().push(id.clone());
            }
        }
        let mut found = Vec::new();
        for (executor, ids) in by_executor {
            if let PricingAnswer::Coupons(coupons) = self.pricing_read(executor, PricingQuery::Coupons(ids)).await? {
                found.extend(coupons.into_iter().flatten());
            }
        }
        Ok(found)
    }

    /// The price book of the catalogue as of its last change: built again
    /// (one read per executor) only after a SKU, promotion or coupon
    /// template was made.
    pub async fn price_book(&self) -> Result<Arc<PriceBook>, ErrorCode> {
        let epoch = self.shared.catalogue_epoch.load(Ordering::Acquire);
        if let Some((built_at, book)) = self.shared.price_book.lock().as_ref() {
            if *built_at == epoch {
                return Ok(book.clone());
            }
        }
        let (mut skus, mut promotions, mut templates) = (Vec::new(), Vec::new(), Vec::new());
        for executor in 0..self.layout().executors() {
            if let PricingAnswer::Catalogue { skus: s, promotions: p, templates: t } =
                self.pricing_read(executor, PricingQuery::Catalogue).await?
            {
                skus.extend(s);
                promotions.extend(p);
                templates.extend(t);
            }
        }
        let book = Arc::new(PriceBook::new(skus, promotions, templates)?);
        *self.shared.price_book.lock() = Some((epoch, book.clone()));
        Ok(book)
    }

    /// Prices a cart with no side effect: the same function checkout prices
    /// with, over the current price book, counters and the buyer's coupons.
    pub async fn quote(&self, request: &QuoteRequest) -> Result<Quote, ErrorCode> {
        let book = self.price_book().await?;
        let (by_promotion, coupons) = self.pricing_inputs(&book, request, None).await?;
        pricing::quote(&book, request, &Usage { by_promotion }, &coupons, self.shared.clock.now_ms())
    }

    /// What a quote reads besides the price book: the counters of the
    /// limited promotions (with the buyer's uses) and the cart's coupons,
    /// each from its writer, except those on `skip` (a checkout's home
    /// reads its own where it applies the checkout).
    pub(crate) async fn pricing_inputs(
        &self,
        book: &PriceBook,
        request: &QuoteRequest,
        skip: Option<ExecutorId>,
    ) -> Result<(HashMap<Id, PromotionUsage>, Vec<Coupon>), ErrorCode> {
        let layout = self.layout();
        let mut limited: HashMap<ExecutorId, Vec<Id>> = HashMap::new();
        for promotion in book.promotions().filter(|p| p.is_limited()) {
            let executor = layout.executor_of_id(&promotion.id);
            if Some(executor) != skip {
                limited.entry(executor).or_default().push(promotion.id.clone());
            }
        }
        let mut by_promotion = HashMap::new();
        for (executor, promotions) in limited {
            let query = PricingQuery::Usage { promotions: promotions.clone(), buyer_id: request.buyer_id.clone() };
            if let PricingAnswer::Usage(counters) = self.pricing_read(executor, query).await? {
                by_promotion.extend(promotions.into_iter().zip(counters));
            }
        }
        let remote: Vec<Id> = request
            .coupon_ids
            .iter()
            .filter(|c| coupon_shard(&layout, c).map(|s| layout.executor_of_shard(s)) != skip)
            .cloned()
            .collect();
        let coupons = if remote.is_empty() { Vec::new() } else { self.coupons(&remote).await? };
        Ok((by_promotion, coupons))
    }

    async fn pricing_read(&self, executor: ExecutorId, query: PricingQuery) -> Result<PricingAnswer, ErrorCode> {
        match self.query_part(executor, PartQuery::Pricing(query)).await? {
            PartAnswer::Pricing(answer) => Ok(answer),
            PartAnswer::Inventory(_) | PartAnswer::Orders(_) => Err(ErrorCode::Unavailable),
        }
    }
}
