//! What a quote is asked and what it answers, and the invariants an answer keeps.

use peakstack_domain::{Currency, Id};
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;

/// One line of a cart: a SKU and how many units.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CartLine {
    pub sku_id: Id,
    /// 1..=[`crate::MAX_LINE_QUANTITY`].
    pub quantity: u32,
}

/// A cart to price: up to [`crate::MAX_QUOTE_LINES`] lines of distinct
/// SKUs and up to [`crate::MAX_QUOTE_COUPONS`] coupons, applied in this order.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct QuoteRequest {
    pub buyer_id: Id,
    pub lines: Vec<CartLine>,
    pub coupon_ids: Vec<Id>,
}

/// What a promotion has given so far, as its single writer counts it:
/// confirmed plus reserved (tried, not yet confirmed or cancelled).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PromotionUsage {
    /// Discount given or reserved, minor units.
    pub discount: u64,
    /// Orders it applied to or is reserved for.
    pub uses: u64,
    /// Of those, this buyer's (0 if the promotion has no per-buyer limit).
    pub buyer_uses: u64,
}

/// A snapshot of the promotion counters, as a quote reads them.
pub trait UsageView {
    fn usage(&self, promotion_id: &Id, buyer_id: &Id) -> PromotionUsage;
}

/// Counters that are all zero: a quote on the catalogue alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoUsage;

impl UsageView for NoUsage {
    fn usage(&self, _promotion_id: &Id, _buyer_id: &Id) -> PromotionUsage {
        PromotionUsage::default()
    }
}

/// Who gave a discount.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum DiscountSource {
    Promotion(Id),
    Coupon(Id),
}

impl DiscountSource {
    fn field(&self) -> (&'static str, &Id) {
        match self {
            DiscountSource::Promotion(id) => ("promotion_id", id),
            DiscountSource::Coupon(id) => ("coupon_id", id),
        }
    }
}

/// A line's share of one discount. A line keeps its shares, so that
/// refunding it gives back exactly what was paid for it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LineDiscount {
    pub source: DiscountSource,
    pub amount: u64,
}

/// One discount as a whole: the sum of its shares on the lines.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AppliedDiscount {
    pub source: DiscountSource,
    pub amount: u64,
}

/// Serializes `{"promotion_id": ..., "amount": ...}` (or `coupon_id`).
fn serialize_discount<S: Serializer>(
    name: &'static str,
    source: &DiscountSource,
    amount: u64,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let (field, id) = source.field();
    let mut state = serializer.serialize_struct(name, 2)?;
    state.serialize_field(field, id.as_str())?;
    state.serialize_field("amount", &amount)?;
    state.end()
}

impl Serialize for LineDiscount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_discount("LineDiscount", &self.source, self.amount, serializer)
    }
}

impl Serialize for AppliedDiscount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_discount("AppliedDiscount", &self.source, self.amount, serializer)
    }
}

fn serialize_id<S: Serializer>(id: &Id, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(id.as_str())
}

fn serialize_currency<S: Serializer>(currency: &Currency, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(currency.as_str())
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct QuoteLine {
    #[serde(serialize_with = "serialize_id")]
    pub sku_id: Id,
    #[serde(serialize_with = "serialize_id")]
    pub merchant_id: Id,
    pub unit_price: u64,
    pub quantity: u32,
    /// `unit_price * quantity`.
    pub subtotal: u64,
    /// In order of application.
    pub discounts: Vec<LineDiscount>,
    /// Sum of `discounts`, at most `subtotal`.
    pub discount: u64,
    /// `subtotal - discount`: what the buyer pays for this line.
    pub total: u64,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct MerchantTotal {
    #[serde(serialize_with = "serialize_id")]
    pub merchant_id: Id,
    pub subtotal: u64,
    pub discount: u64,
    pub total: u64,
}

/// Why a promotion that touches the cart gave nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    BudgetExhausted,
    UsageLimitReached,
    PerBuyerLimitReached,
    NotStarted,
    Ended,
    /// Spend threshold not reached, or no in-scope line has `buy + get` units.
    BelowThreshold,
    /// Another promotion of its exclusive group saves the buyer more.
    LostToGroup,
    /// Its lines have nothing left after earlier promotions, or its
    /// discount rounds down to zero.
    NothingToDiscount,
}

impl SkipReason {
    pub const ALL: [SkipReason; 8] = [
        SkipReason::BudgetExhausted,
        SkipReason::UsageLimitReached,
        SkipReason::PerBuyerLimitReached,
        SkipReason::NotStarted,
        SkipReason::Ended,
        SkipReason::BelowThreshold,
        SkipReason::LostToGroup,
        SkipReason::NothingToDiscount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BudgetExhausted => "budget_exhausted",
            SkipReason::UsageLimitReached => "usage_limit_reached",
            SkipReason::PerBuyerLimitReached => "per_buyer_limit_reached",
            SkipReason::NotStarted => "not_started",
            SkipReason::Ended => "ended",
            SkipReason::BelowThreshold => "below_threshold",
            SkipReason::LostToGroup => "lost_to_group",
            SkipReason::NothingToDiscount => "nothing_to_discount",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct SkippedPromotion {
    #[serde(serialize_with = "serialize_id")]
    pub promotion_id: Id,
    pub reason: SkipReason,
}

/// The priced cart.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Quote {
    #[serde(serialize_with = "serialize_currency")]
    pub currency: Currency,
    pub subtotal: u64,
    pub discount: u64,
    pub total: u64,
    /// In the order of the request.
    pub lines: Vec<QuoteLine>,
    /// Sorted by merchant id.
    pub merchants: Vec<MerchantTotal>,
    /// In order of application: promotions, then coupons.
    pub applied: Vec<AppliedDiscount>,
    /// In order of application, only promotions whose scope touches the cart.
    pub skipped: Vec<SkippedPromotion>,
}

impl Quote {
    /// The invariants every quote keeps: each discount's shares add up to
    /// it, no line is discounted below zero, lines add up to merchants add
    /// up to the cart. `quote` asserts the cheap ones as it goes; tests and
    /// `peakstack bench quote` check the whole.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut merchant_sums: Vec<MerchantTotal> = Vec::new();
        for line in &self.lines {
            if line.unit_price.checked_mul(u64::from(line.quantity)) != Some(line.subtotal) {
                return Err("line subtotal is not unit price times quantity");
            }
            let discount = line.discounts.iter().try_fold(0u64, |sum, d| sum.checked_add(d.amount));
            if discount != Some(line.discount) || line.discounts.iter().any(|d| d.amount == 0) {
                return Err("line discounts do not add up to the line discount");
            }
            if line.discount > line.subtotal || line.total != line.subtotal - line.discount {
                return Err("line total is not subtotal minus discount");
            }
            match merchant_sums.iter_mut().find(|m| m.merchant_id == line.merchant_id) {
                Some(sum) => {
                    sum.subtotal += line.subtotal;
                    sum.discount += line.discount;
                    sum.total += line.total;
                }
                None => merchant_sums.push(MerchantTotal {
                    merchant_id: line.merchant_id.clone(),
                    subtotal: line.subtotal,
                    discount: line.discount,
                    total: line.total,
                }),
            }
        }
        merchant_sums.sort_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
        if merchant_sums != self.merchants {
            return Err("merchant totals are not the sums of their lines");
        }
        let sum = |field: fn(&MerchantTotal) -> u64| self.merchants.iter().map(field).sum::<u64>();
        if sum(|m| m.subtotal) != self.subtotal
            || sum(|m| m.discount) != self.discount
            || sum(|m| m.total) != self.total
        {
            return Err("cart totals are not the sums of the merchants");
        }
        for (index, applied) in self.applied.iter().enumerate() {
            if applied.amount == 0 || self.applied[..index].iter().any(|a| a.source == applied.source) {
                return Err("an applied discount is zero or listed twice");
            }
            let shares: u64 = self
                .lines
                .iter()
                .flat_map(|l| &l.discounts)
                .filter(|d| d.source == applied.source)
                .map(|d| d.amount)
                .sum();
            if shares != applied.amount {
                return Err("the shares of a discount do not add up to it");
            }
        }
        let listed = |d: &LineDiscount| self.applied.iter().any(|a| a.source == d.source);
        if !self.lines.iter().flat_map(|l| &l.discounts).all(listed) {
            return Err("a line carries a discount that is not applied");
        }
        Ok(())
    }
}
