//! A fixed catalogue to measure quotes on: 20 live promotions of every
//! kind and scope, three exclusive groups, budgets and limits with some
//! usage recorded, one coupon, and carts of 3 lines from 2 merchants.
//! Used by `peakstack bench quote` and `examples/quote_loop.rs`.

use std::collections::BTreeSet;

use peakstack_domain::{Currency, ErrorCode, Id};

use crate::book::PriceBook;
use crate::catalogue::{
    Coupon, CouponDiscount, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec, Scope,
    SkuPrice,
};
use crate::quote::quote;
use crate::quote_types::{CartLine, Quote, QuoteRequest};
use crate::state::{Command, Pricing};

/// The moment every fixture quote is priced at (2026-11-11T00:00:00Z).
pub const NOW_MS: u64 = 1_794_355_200_000;
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The catalogue, the counters and the carts.
pub struct Fixture {
    pub book: PriceBook,
    pub pricing: Pricing,
    pub carts: Vec<QuoteRequest>,
    /// The coupons of the carts' buyer.
    pub coupons: Vec<Coupon>,
    pub now_ms: u64,
}

impl Fixture {
    /// Quotes cart `cart` (modulo the number of carts).
    pub fn quote(&self, cart: usize) -> Result<Quote, ErrorCode> {
        quote(&self.book, &self.carts[cart % self.carts.len()], &self.pricing, &self.coupons, self.now_ms)
    }
}

fn id(text: &str) -> Id {
    Id::parse(text).expect("a valid fixture id")
}

fn skus(names: &[&str]) -> Scope {
    Scope::Skus(names.iter().map(|name| id(name)).collect::<BTreeSet<Id>>())
}

struct Limits {
    budget: Option<u64>,
    usage_limit: Option<u64>,
    per_buyer_limit: Option<u64>,
}

const NO_LIMITS: Limits = Limits { budget: None, usage_limit: None, per_buyer_limit: None };

fn promotion(
    name: &str,
    kind: PromotionKind,
    scope: Scope,
    group: Option<&str>,
    priority: i32,
    limits: Limits,
) -> Promotion {
    Promotion::new(PromotionSpec {
        id: id(name),
        currency: Currency::parse("USD").expect("valid"),
        kind,
        scope,
        starts_at_ms: NOW_MS - DAY_MS,
        ends_at_ms: NOW_MS + DAY_MS,
        group: group.map(str::to_string),
        priority,
        budget: limits.budget,
        usage_limit: limits.usage_limit,
        per_buyer_limit: limits.per_buyer_limit,
    })
    .expect("a valid fixture promotion")
}

fn promotions() -> Vec<Promotion> {
    use PromotionKind::*;
    let budget = |budget| Limits { budget: Some(budget), ..NO_LIMITS };
    vec![
        promotion("p01", PercentOff { percent: 10 }, skus(&["s1", "s2"]), None, 10, NO_LIMITS),
        promotion("p02", PercentOff { percent: 5 }, Scope::Merchant(id("m1")), Some("m1-store"), 10, NO_LIMITS),
        promotion("p03", AmountOff { amount: 500 }, Scope::Merchant(id("m1")), Some("m1-store"), 10, NO_LIMITS),
        promotion(
            "p04",
            SpendThreshold { threshold: 10_000, off: 1_000, stepwise: true },
            Scope::Merchant(id("m2")),
            None,
            20,
            NO_LIMITS,
        ),
        promotion("p05", BuyXGetY { buy: 2, get: 1 }, skus(&["s3", "s7"]), None, 5, NO_LIMITS),
        promotion("p06", PercentOff { percent: 15 }, skus(&["s8", "s9"]), None, 5, budget(1_000_000_000)),
        promotion("p07", AmountOff { amount: 300 }, Scope::Everything, Some("platform"), 30, NO_LIMITS),
        promotion(
            "p08",
            SpendThreshold { threshold: 20_000, off: 2_500, stepwise: false },
            Scope::Everything,
            Some("platform"),
            30,
            NO_LIMITS,
        ),
        promotion(
            "p09",
            PercentOff { percent: 8 },
            Scope::Everything,
            Some("platform"),
            30,
            Limits { per_buyer_limit: Some(1_000_000), ..NO_LIMITS },
        ),
        promotion("p10", BuyXGetY { buy: 1, get: 1 }, skus(&["s4"]), None, 5, NO_LIMITS),
        promotion(
            "p11",
            PercentOff { percent: 20 },
            skus(&["s10"]),
            None,
            5,
            Limits { usage_limit: Some(1_000_000_000), ..NO_LIMITS },
        ),
        promotion("p12", AmountOff { amount: 200 }, Scope::Merchant(id("m2")), None, 15, budget(500_000_000)),
        promotion(
            "p13",
            SpendThreshold { threshold: 5_000, off: 300, stepwise: true },
            Scope::Merchant(id("m1")),
            None,
            15,
            NO_LIMITS,
        ),
        promotion("p14", PercentOff { percent: 3 }, Scope::Everything, None, 40, NO_LIMITS),
        promotion("p15", AmountOff { amount: 100 }, skus(&["s5", "s11"]), None, 12, NO_LIMITS),
        promotion("p16", PercentOff { percent: 12 }, skus(&["s6", "s12"]), Some("flash"), 12, NO_LIMITS),
        promotion("p17", AmountOff { amount: 400 }, skus(&["s6", "s12"]), Some("flash"), 12, NO_LIMITS),
        promotion(
            "p18",
            SpendThreshold { threshold: 3_000, off: 150, stepwise: false },
            skus(&["s1", "s2", "s3", "s4", "s5", "s6"]),
            None,
            18,
            NO_LIMITS,
        ),
        promotion("p19", BuyXGetY { buy: 3, get: 1 }, Scope::Merchant(id("m2")), None, 8, NO_LIMITS),
        promotion(
            "p20",
            PercentOff { percent: 2 },
            Scope::Everything,
            None,
            50,
            Limits { budget: Some(2_000_000_000), usage_limit: Some(10_000_000), per_buyer_limit: Some(1_000) },
        ),
    ]
}

fn sku_prices() -> Vec<SkuPrice> {
    let usd = Currency::parse("USD").expect("valid");
    (1..=12)
        .map(|n| SkuPrice {
            sku_id: id(&format!("s{n}")),
            merchant_id: id(if n <= 6 { "m1" } else { "m2" }),
            unit_price: 999 + 1_250 * n as u64,
            currency: usd,
        })
        .collect()
}

fn cart(lines: [(&str, u32); 3], coupon: bool) -> QuoteRequest {
    QuoteRequest {
        buyer_id: id("buyer-1"),
        lines: lines.iter().map(|&(sku, quantity)| CartLine { sku_id: id(sku), quantity }).collect(),
        coupon_ids: if coupon { vec![id("c1")] } else { Vec::new() },
    }
}

/// Builds the fixture: a `Pricing` state with the promotions, the coupon
/// template and the buyer's coupon, some usage tried and confirmed, and a
/// book built from it.
pub fn fixture() -> Fixture {
    let mut pricing = Pricing::new();
    let mut run = |command: Command| {
        let (_, reply) = pricing.apply(&command, NOW_MS);
        reply.expect("a fixture command succeeds");
    };
    for promotion in promotions() {
        run(Command::CreatePromotion(promotion));
    }
    let template = CouponTemplate::new(CouponTemplateSpec {
        id: id("t1"),
        currency: Currency::parse("USD").expect("valid"),
        discount: CouponDiscount::AmountOff { amount: 500 },
        min_spend: 5_000,
        scope: Scope::Everything,
        valid_from_ms: NOW_MS - DAY_MS,
        valid_until_ms: NOW_MS + DAY_MS,
        total_issue: 1_000_000,
    })
    .expect("a valid fixture template");
    run(Command::CreateCouponTemplate(template));
    run(Command::IssueCoupon { template_id: id("t1"), buyer_id: id("buyer-1"), coupon_id: id("c1") });
    // Some orders already used the limited promotions, one still reserved.
    for (txn, promotion) in ["p06", "p09", "p11", "p12", "p20"].iter().enumerate() {
        let (txn, promotion_id) = (txn as u64 + 1, id(promotion));
        let buyer_id = id("buyer-1");
        run(Command::TryConsume {
            txn,
            promotion_id: promotion_id.clone(),
            buyer_id,
            discount: 250,
            deadline_ms: NOW_MS + 60_000,
        });
        if promotion != &"p20" {
            run(Command::ConfirmConsume { txn, promotion_id });
        }
    }
    let book = pricing.price_book(sku_prices()).expect("a valid fixture book");
    let carts = vec![
        cart([("s1", 2), ("s3", 3), ("s8", 1)], true),
        cart([("s2", 1), ("s7", 3), ("s12", 2)], false),
        cart([("s4", 2), ("s6", 1), ("s10", 1)], true),
        cart([("s5", 1), ("s9", 2), ("s11", 4)], false),
        cart([("s1", 1), ("s6", 2), ("s7", 1)], true),
        cart([("s3", 4), ("s4", 1), ("s12", 1)], false),
        cart([("s2", 3), ("s8", 2), ("s10", 2)], true),
        cart([("s5", 2), ("s9", 1), ("s11", 1)], false),
    ];
    let coupons = pricing.coupons_of(&id("buyer-1"));
    Fixture { book, pricing, carts, coupons, now_ms: NOW_MS }
}
