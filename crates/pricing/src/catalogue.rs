//! The catalogue: SKU prices, promotions, coupon templates and coupons.
//!
//! Definitions are checked once, by their constructors, so that the quote
//! and the state machine never meet a promotion whose end comes before its
//! start or a percentage above 100.

use std::collections::BTreeSet;
use std::ops::Deref;

use peakstack_domain::{Currency, ErrorCode, Id, MAX_TRANSFER_AMOUNT};

/// Most SKUs a promotion or coupon template scope may list.
pub const MAX_SCOPE_SKUS: usize = 1_000;
/// Longest exclusive group name, in bytes.
pub const MAX_GROUP_LEN: usize = 64;
/// Most units one cart line may hold; also bounds a buy-x-get-y cycle.
pub const MAX_LINE_QUANTITY: u32 = 100_000;

/// The price of a SKU as the inventory part publishes it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SkuPrice {
    pub sku_id: Id,
    pub merchant_id: Id,
    /// Minor units of `currency`, at most [`MAX_TRANSFER_AMOUNT`] (0 is a free item).
    pub unit_price: u64,
    pub currency: Currency,
}

/// Which cart lines a promotion or coupon covers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Scope {
    /// These SKUs, whoever sells them (1 to [`MAX_SCOPE_SKUS`] of them).
    Skus(BTreeSet<Id>),
    /// Every SKU of this merchant.
    Merchant(Id),
    /// The whole cart.
    Everything,
}

impl Scope {
    pub fn covers(&self, sku_id: &Id, merchant_id: &Id) -> bool {
        match self {
            Scope::Skus(skus) => skus.contains(sku_id),
            Scope::Merchant(merchant) => merchant == merchant_id,
            Scope::Everything => true,
        }
    }

    fn validate(&self) -> Result<(), ErrorCode> {
        match self {
            Scope::Skus(skus) if skus.is_empty() || skus.len() > MAX_SCOPE_SKUS => Err(ErrorCode::InvalidRequest),
            _ => Ok(()),
        }
    }
}

/// What a promotion gives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PromotionKind {
    /// `percent` (1..=100) off each line in scope, rounded down per line.
    PercentOff { percent: u8 },
    /// `amount` off the in-scope subtotal (at most all of it), shared over its lines.
    AmountOff { amount: u64 },
    /// Spend `threshold` (in scope), save `off`; `stepwise`: every full
    /// `threshold` saves `off` again. Shared over the lines in scope.
    SpendThreshold { threshold: u64, off: u64, stepwise: bool },
    /// On each in-scope line, of every `buy + get` units, `get` are free.
    BuyXGetY { buy: u32, get: u32 },
}

impl PromotionKind {
    fn validate(&self) -> Result<(), ErrorCode> {
        let amount_ok = |amount: u64| (1..=MAX_TRANSFER_AMOUNT).contains(&amount);
        let ok = match *self {
            PromotionKind::PercentOff { percent } => (1..=100).contains(&percent),
            PromotionKind::AmountOff { amount } => amount_ok(amount),
            // Saving more than the threshold would pay the buyer to shop.
            PromotionKind::SpendThreshold { threshold, off, .. } => {
                amount_ok(threshold) && amount_ok(off) && off <= threshold
            }
            PromotionKind::BuyXGetY { buy, get } => {
                buy >= 1 && get >= 1 && u64::from(buy) + u64::from(get) <= u64::from(MAX_LINE_QUANTITY)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(ErrorCode::InvalidRequest)
        }
    }
}

/// The fields of a promotion, before they are checked: build one and pass it to [`Promotion::new`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PromotionSpec {
    pub id: Id,
    pub currency: Currency,
    pub kind: PromotionKind,
    pub scope: Scope,
    /// Live from `starts_at_ms` (inclusive) to `ends_at_ms` (exclusive).
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    /// Of the promotions of one exclusive group at most one applies to a
    /// cart: the one that saves the buyer the most (ties: the lower id).
    pub group: Option<String>,
    /// Order of application, lower first (ties: the lower id). Each
    /// promotion is computed on what the earlier ones left of the lines.
    pub priority: i32,
    /// Total discount it may give, minor units.
    pub budget: Option<u64>,
    /// Orders it may apply to.
    pub usage_limit: Option<u64>,
    /// Orders of one buyer it may apply to.
    pub per_buyer_limit: Option<u64>,
}

/// A checked promotion. Read its fields through `Deref` to [`PromotionSpec`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Promotion(PromotionSpec);

impl Promotion {
    /// Checks the spec: a window that ends after it starts, a valid kind
    /// and scope, a group name of 1..=[`MAX_GROUP_LEN`] visible ASCII
    /// characters, limits of at least 1.
    pub fn new(spec: PromotionSpec) -> Result<Promotion, ErrorCode> {
        spec.kind.validate()?;
        spec.scope.validate()?;
        let group_ok = spec.group.as_deref().is_none_or(|group| {
            !group.is_empty() && group.len() <= MAX_GROUP_LEN && group.bytes().all(|b| b.is_ascii_graphic())
        });
        let limits_ok = [spec.budget, spec.usage_limit, spec.per_buyer_limit].iter().all(|limit| limit != &Some(0));
        if spec.ends_at_ms <= spec.starts_at_ms || !group_ok || !limits_ok {
            return Err(ErrorCode::InvalidRequest);
        }
        Ok(Promotion(spec))
    }

    pub fn spec(&self) -> &PromotionSpec {
        &self.0
    }

    /// Whether any counter limits it (only then does a quote read its usage).
    pub fn is_limited(&self) -> bool {
        self.0.budget.is_some() || self.0.usage_limit.is_some() || self.0.per_buyer_limit.is_some()
    }
}

impl Deref for Promotion {
    type Target = PromotionSpec;
    fn deref(&self) -> &PromotionSpec {
        &self.0
    }
}

/// What a coupon gives: always an order-level discount on the lines of the
/// template's scope, shared over them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CouponDiscount {
    /// `percent` (1..=100) of the in-scope amount, rounded down.
    PercentOff { percent: u8 },
    /// `amount` off the in-scope amount (at most all of it).
    AmountOff { amount: u64 },
}

/// The fields of a coupon template, before they are checked (see [`CouponTemplate::new`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CouponTemplateSpec {
    pub id: Id,
    pub currency: Currency,
    pub discount: CouponDiscount,
    /// The in-scope amount (after promotions) the cart must reach.
    pub min_spend: u64,
    pub scope: Scope,
    /// Valid from `valid_from_ms` (inclusive) to `valid_until_ms` (exclusive).
    pub valid_from_ms: u64,
    pub valid_until_ms: u64,
    /// Coupons it may issue, in all.
    pub total_issue: u64,
}

/// A checked coupon template. Read its fields through `Deref` to [`CouponTemplateSpec`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CouponTemplate(CouponTemplateSpec);

impl CouponTemplate {
    pub fn new(spec: CouponTemplateSpec) -> Result<CouponTemplate, ErrorCode> {
        let discount_ok = match spec.discount {
            CouponDiscount::PercentOff { percent } => (1..=100).contains(&percent),
            CouponDiscount::AmountOff { amount } => (1..=MAX_TRANSFER_AMOUNT).contains(&amount),
        };
        spec.scope.validate()?;
        if !discount_ok
            || spec.min_spend > MAX_TRANSFER_AMOUNT
            || spec.valid_until_ms <= spec.valid_from_ms
            || spec.total_issue == 0
        {
            return Err(ErrorCode::InvalidRequest);
        }
        Ok(CouponTemplate(spec))
    }

    pub fn spec(&self) -> &CouponTemplateSpec {
        &self.0
    }

    pub fn is_valid_at(&self, now_ms: u64) -> bool {
        (self.0.valid_from_ms..self.0.valid_until_ms).contains(&now_ms)
    }
}

impl Deref for CouponTemplate {
    type Target = CouponTemplateSpec;
    fn deref(&self) -> &CouponTemplateSpec {
        &self.0
    }
}

/// One coupon of one buyer, issued from a template.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Coupon {
    pub id: Id,
    pub template_id: Id,
    pub buyer_id: Id,
    pub state: CouponState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CouponState {
    Available,
    /// Held by a checkout (TCC try) until it is used or released, at the latest at `deadline_ms`.
    Locked {
        txn: u64,
        deadline_ms: u64,
    },
    /// Spent by the checkout `txn`, for good.
    Used {
        txn: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse(text).unwrap()
    }

    fn spec(kind: PromotionKind) -> PromotionSpec {
        PromotionSpec {
            id: id("p"),
            currency: Currency::parse("USD").unwrap(),
            kind,
            scope: Scope::Everything,
            starts_at_ms: 10,
            ends_at_ms: 20,
            group: None,
            priority: 0,
            budget: None,
            usage_limit: None,
            per_buyer_limit: None,
        }
    }

    #[test]
    fn promotions_are_checked() {
        let cases: Vec<(PromotionSpec, bool)> = vec![
            (spec(PromotionKind::PercentOff { percent: 1 }), true),
            (spec(PromotionKind::PercentOff { percent: 100 }), true),
            (spec(PromotionKind::PercentOff { percent: 0 }), false),
            (spec(PromotionKind::PercentOff { percent: 101 }), false),
            (spec(PromotionKind::AmountOff { amount: 0 }), false),
            (spec(PromotionKind::AmountOff { amount: MAX_TRANSFER_AMOUNT + 1 }), false),
            (spec(PromotionKind::SpendThreshold { threshold: 100, off: 100, stepwise: true }), true),
            (spec(PromotionKind::SpendThreshold { threshold: 100, off: 101, stepwise: false }), false),
            (spec(PromotionKind::SpendThreshold { threshold: 0, off: 0, stepwise: false }), false),
            (spec(PromotionKind::BuyXGetY { buy: 2, get: 1 }), true),
            (spec(PromotionKind::BuyXGetY { buy: 0, get: 1 }), false),
            (spec(PromotionKind::BuyXGetY { buy: 1, get: 0 }), false),
            (spec(PromotionKind::BuyXGetY { buy: MAX_LINE_QUANTITY, get: 1 }), false),
            (PromotionSpec { ends_at_ms: 10, ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { group: Some(String::new()), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { group: Some("a b".into()), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { group: Some("x".repeat(65)), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { group: Some("x".repeat(64)), ..spec(PromotionKind::AmountOff { amount: 1 }) }, true),
            (PromotionSpec { budget: Some(0), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { usage_limit: Some(0), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (PromotionSpec { per_buyer_limit: Some(0), ..spec(PromotionKind::AmountOff { amount: 1 }) }, false),
            (
                PromotionSpec { scope: Scope::Skus(BTreeSet::new()), ..spec(PromotionKind::AmountOff { amount: 1 }) },
                false,
            ),
        ];
        for (spec, ok) in cases {
            assert_eq!(Promotion::new(spec.clone()).is_ok(), ok, "{spec:?}");
        }
        let too_many: BTreeSet<Id> = (0..=MAX_SCOPE_SKUS).map(|n| id(&format!("s{n}"))).collect();
        let spec = PromotionSpec { scope: Scope::Skus(too_many), ..spec(PromotionKind::AmountOff { amount: 1 }) };
        assert_eq!(Promotion::new(spec), Err(ErrorCode::InvalidRequest));
    }

    #[test]
    fn coupon_templates_are_checked() {
        let base = CouponTemplateSpec {
            id: id("t"),
            currency: Currency::parse("USD").unwrap(),
            discount: CouponDiscount::AmountOff { amount: 5 },
            min_spend: 0,
            scope: Scope::Everything,
            valid_from_ms: 1,
            valid_until_ms: 2,
            total_issue: 1,
        };
        for (spec, ok) in [
            (base.clone(), true),
            (CouponTemplateSpec { discount: CouponDiscount::PercentOff { percent: 0 }, ..base.clone() }, false),
            (CouponTemplateSpec { discount: CouponDiscount::AmountOff { amount: 0 }, ..base.clone() }, false),
            (CouponTemplateSpec { valid_until_ms: 1, ..base.clone() }, false),
            (CouponTemplateSpec { total_issue: 0, ..base.clone() }, false),
            (CouponTemplateSpec { min_spend: MAX_TRANSFER_AMOUNT + 1, ..base.clone() }, false),
        ] {
            assert_eq!(CouponTemplate::new(spec.clone()).is_ok(), ok, "{spec:?}");
        }
        let template = CouponTemplate::new(base).unwrap();
        assert!(!template.is_valid_at(0) && template.is_valid_at(1) && !template.is_valid_at(2));
    }
}
