//! Properties of `quote` over random catalogues, counters, coupons and carts.

use std::collections::{BTreeMap, BTreeSet};

use peakstack_domain::{Currency, Id};
use peakstack_pricing::*;
use proptest::prelude::*;

const SKUS: usize = 8;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn sku_id(n: usize) -> Id {
    id(&format!("s{n}"))
}

fn merchant_of(n: usize) -> Id {
    id(&format!("m{}", n % 3))
}

#[derive(Clone, Debug)]
struct PromotionInput {
    kind: (u8, u64, u64, bool),
    scope: (u8, BTreeSet<usize>),
    window: (u64, u64),
    group: Option<u8>,
    priority: i32,
    limits: (Option<u64>, Option<u64>, Option<u64>),
    usage: (u64, u64, u64),
}

fn promotion_input() -> impl Strategy<Value = PromotionInput> {
    (
        (0u8..4, 1u64..3000, 1u64..3000, any::<bool>()),
        (0u8..3, proptest::collection::btree_set(0..SKUS, 1..4)),
        (0u64..100, 1u64..100),
        proptest::option::of(0u8..3),
        -3i32..3,
        (proptest::option::of(1u64..5000), proptest::option::of(1u64..5), proptest::option::of(1u64..3)),
        (0u64..5000, 0u64..5, 0u64..3),
    )
        .prop_map(|(kind, scope, window, group, priority, limits, usage)| PromotionInput {
            kind,
            scope,
            window,
            group,
            priority,
            limits,
            usage,
        })
}

fn build_promotion(n: usize, input: &PromotionInput) -> Option<(Promotion, PromotionUsage)> {
    let (kind, a, b, flag) = input.kind;
    let kind = match kind {
        0 => PromotionKind::PercentOff { percent: (a % 100 + 1) as u8 },
        1 => PromotionKind::AmountOff { amount: a },
        2 => PromotionKind::SpendThreshold { threshold: a.max(b), off: a.min(b), stepwise: flag },
        _ => PromotionKind::BuyXGetY { buy: (a % 4 + 1) as u32, get: (b % 3 + 1) as u32 },
    };
    let first = *input.scope.1.iter().next().unwrap();
    let scope = match input.scope.0 {
        0 => Scope::Skus(input.scope.1.iter().map(|&s| sku_id(s)).collect()),
        1 => Scope::Merchant(merchant_of(first)),
        _ => Scope::Everything,
    };
    let spec = PromotionSpec {
        id: id(&format!("p{n:02}")),
        currency: Currency::parse("USD").unwrap(),
        kind,
        scope,
        starts_at_ms: input.window.0,
        ends_at_ms: input.window.0 + input.window.1,
        group: input.group.map(|g| format!("g{g}")),
        priority: input.priority,
        budget: input.limits.0,
        usage_limit: input.limits.1,
        per_buyer_limit: input.limits.2,
    };
    let (discount, uses, buyer_uses) = input.usage;
    Promotion::new(spec).ok().map(|p| (p, PromotionUsage { discount, uses, buyer_uses }))
}

struct Counters(BTreeMap<Id, PromotionUsage>);

impl UsageView for Counters {
    fn usage(&self, promotion_id: &Id, _buyer_id: &Id) -> PromotionUsage {
        self.0.get(promotion_id).copied().unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
struct Input {
    prices: Vec<u64>,
    promotions: Vec<PromotionInput>,
    coupon: Option<(bool, u64, u64, u8, usize)>,
    cart: BTreeMap<usize, u32>,
    now_ms: u64,
}

fn input() -> impl Strategy<Value = Input> {
    (
        proptest::collection::vec(0u64..5000, SKUS),
        proptest::collection::vec(promotion_input(), 0..14),
        proptest::option::of((any::<bool>(), 1u64..3000, 0u64..4000, 0u8..3, 0..SKUS)),
        proptest::collection::btree_map(0..SKUS, 1u32..12, 1..6),
        0u64..200,
    )
        .prop_map(|(prices, promotions, coupon, cart, now_ms)| Input { prices, promotions, coupon, cart, now_ms })
}

struct World {
    skus: Vec<SkuPrice>,
    promotions: Vec<Promotion>,
    templates: Vec<CouponTemplate>,
    coupons: Vec<Coupon>,
    counters: Counters,
    request: QuoteRequest,
    now_ms: u64,
}

fn world(input: &Input) -> World {
    let usd = Currency::parse("USD").unwrap();
    let skus = (0..SKUS)
        .map(|n| SkuPrice {
            sku_id: sku_id(n),
            merchant_id: merchant_of(n),
            unit_price: input.prices[n],
            currency: usd,
        })
        .collect();
    let mut promotions = Vec::new();
    let mut counters = BTreeMap::new();
    for (n, promotion) in input.promotions.iter().enumerate() {
        if let Some((promotion, usage)) = build_promotion(n, promotion) {
            counters.insert(promotion.id.clone(), usage);
            promotions.push(promotion);
        }
    }
    let (mut templates, mut coupons, mut coupon_ids) = (Vec::new(), Vec::new(), Vec::new());
    if let Some((percent, amount, min_spend, scope, sku)) = input.coupon {
        let spec = CouponTemplateSpec {
            id: id("t"),
            currency: usd,
            discount: if percent {
                CouponDiscount::PercentOff { percent: (amount % 100 + 1) as u8 }
            } else {
                CouponDiscount::AmountOff { amount }
            },
            min_spend,
            scope: match scope {
                0 => Scope::Skus(BTreeSet::from([sku_id(sku)])),
                1 => Scope::Merchant(merchant_of(sku)),
                _ => Scope::Everything,
            },
            valid_from_ms: 0,
            valid_until_ms: 1_000,
            total_issue: 1,
        };
        templates.push(CouponTemplate::new(spec).unwrap());
        coupons.push(Coupon { id: id("c"), template_id: id("t"), buyer_id: id("b"), state: CouponState::Available });
        coupon_ids.push(id("c"));
    }
    let lines = input.cart.iter().map(|(&sku, &quantity)| CartLine { sku_id: sku_id(sku), quantity }).collect();
    let request = QuoteRequest { buyer_id: id("b"), lines, coupon_ids };
    World { skus, promotions, templates, coupons, counters: Counters(counters), request, now_ms: input.now_ms }
}

impl World {
    fn quote_with(
        &self,
        promotions: Vec<Promotion>,
        request: &QuoteRequest,
    ) -> Result<Quote, peakstack_domain::ErrorCode> {
        let book = PriceBook::new(self.skus.clone(), promotions, self.templates.clone()).unwrap();
        quote(&book, request, &self.counters, &self.coupons, self.now_ms)
    }
}

fn check_quote(world: &World, quote: &Quote) -> Result<(), TestCaseError> {
    quote.check().map_err(TestCaseError::fail)?;
    for line in &quote.lines {
        prop_assert!(line.total <= line.subtotal);
    }
    let by_id: BTreeMap<&Id, &Promotion> = world.promotions.iter().map(|p| (&p.id, p)).collect();
    let mut groups = BTreeSet::new();
    for applied in &quote.applied {
        let DiscountSource::Promotion(promotion_id) = &applied.source else { continue };
        let promotion = by_id[promotion_id];
        prop_assert!((promotion.starts_at_ms..promotion.ends_at_ms).contains(&world.now_ms));
        let used = world.counters.0[promotion_id];
        if let Some(budget) = promotion.budget {
            // Never more than is left of the budget.
            prop_assert!(used.discount < budget && applied.amount <= budget - used.discount);
        }
        if let Some(group) = &promotion.group {
            prop_assert!(groups.insert(group.clone()), "two promotions of group {group} applied");
        }
    }
    for skipped in &quote.skipped {
        let promotion = by_id[&skipped.promotion_id];
        let live = (promotion.starts_at_ms..promotion.ends_at_ms).contains(&world.now_ms);
        match skipped.reason {
            SkipReason::NotStarted => prop_assert!(world.now_ms < promotion.starts_at_ms),
            SkipReason::Ended => prop_assert!(world.now_ms >= promotion.ends_at_ms),
            SkipReason::LostToGroup => prop_assert!(live && promotion.group.is_some()),
            _ => prop_assert!(live),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn quotes_keep_their_invariants_and_do_not_depend_on_the_book_order(input in input(), rotate in 0usize..14) {
        let world = world(&input);
        let answer = world.quote_with(world.promotions.clone(), &world.request);
        // Same input, same quote.
        prop_assert_eq!(&answer, &world.quote_with(world.promotions.clone(), &world.request));
        // Reordering the promotions in the book changes nothing.
        let mut reversed = world.promotions.clone();
        reversed.reverse();
        prop_assert_eq!(&answer, &world.quote_with(reversed, &world.request));
        let mut rotated = world.promotions.clone();
        let by = rotate % rotated.len().max(1);
        rotated.rotate_left(by);
        prop_assert_eq!(&answer, &world.quote_with(rotated, &world.request));
        match &answer {
            Ok(quote) => check_quote(&world, quote)?,
            Err(code) => prop_assert!(
                !world.request.coupon_ids.is_empty() || matches!(code, peakstack_domain::ErrorCode::Overflow),
                "a cart of known SKUs fails only on its coupon: {code}"
            ),
        }
        // The same cart without its coupon always prices.
        let mut no_coupon = world.request.clone();
        no_coupon.coupon_ids.clear();
        let quote = world.quote_with(world.promotions.clone(), &no_coupon).unwrap();
        check_quote(&world, &quote)?;
        // A coupon only ever takes off more.
        if let Ok(with_coupon) = &answer {
            prop_assert!(with_coupon.total <= quote.total);
            prop_assert_eq!(&with_coupon.applied[..quote.applied.len()], &quote.applied[..]);
        }
    }
}
