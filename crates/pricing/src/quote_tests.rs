//! Data-driven tests of the quote: a catalogue and a cart in, the quote
//! rendered as text out, compared with the expected text.

use std::collections::BTreeSet;
use std::fmt::Write;

use peakstack_domain::{Currency, ErrorCode, Id};

use crate::*;

const NOW: u64 = 500;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// s1 1000 (m1), s2 500 (m1), s3 2000 (m2), s4 333 (m2), a/b/c 1000 (m3), e1 100 EUR (m1),
/// big and big2 at the largest price (m1).
fn skus() -> Vec<SkuPrice> {
    let sku = |sku: &str, merchant: &str, unit_price: u64, currency: &str| SkuPrice {
        sku_id: id(sku),
        merchant_id: id(merchant),
        unit_price,
        currency: Currency::parse(currency).unwrap(),
    };
    vec![
        sku("s1", "m1", 1000, "USD"),
        sku("s2", "m1", 500, "USD"),
        sku("s3", "m2", 2000, "USD"),
        sku("s4", "m2", 333, "USD"),
        sku("a", "m3", 1000, "USD"),
        sku("b", "m3", 1000, "USD"),
        sku("c", "m3", 1000, "USD"),
        sku("e1", "m1", 100, "EUR"),
        sku("big", "m1", peakstack_domain::MAX_TRANSFER_AMOUNT, "USD"),
        sku("big2", "m1", peakstack_domain::MAX_TRANSFER_AMOUNT, "USD"),
    ]
}

/// A promotion live from 0 to 1000, priority 0, no group, no limits.
fn promo(name: &str, kind: PromotionKind, scope: Scope) -> PromotionSpec {
    PromotionSpec {
        id: id(name),
        currency: usd(),
        kind,
        scope,
        starts_at_ms: 0,
        ends_at_ms: 1000,
        group: None,
        priority: 0,
        budget: None,
        usage_limit: None,
        per_buyer_limit: None,
    }
}

fn on(skus: &[&str]) -> Scope {
    Scope::Skus(skus.iter().map(|s| id(s)).collect::<BTreeSet<_>>())
}

fn merchant(name: &str) -> Scope {
    Scope::Merchant(id(name))
}

fn percent(percent: u8) -> PromotionKind {
    PromotionKind::PercentOff { percent }
}

fn amount(amount: u64) -> PromotionKind {
    PromotionKind::AmountOff { amount }
}

fn threshold(threshold: u64, off: u64, stepwise: bool) -> PromotionKind {
    PromotionKind::SpendThreshold { threshold, off, stepwise }
}

fn bxgy(buy: u32, get: u32) -> PromotionKind {
    PromotionKind::BuyXGetY { buy, get }
}

fn grouped(group: &str, priority: i32, spec: PromotionSpec) -> PromotionSpec {
    PromotionSpec { group: Some(group.to_string()), priority, ..spec }
}

fn prio(priority: i32, spec: PromotionSpec) -> PromotionSpec {
    PromotionSpec { priority, ..spec }
}

/// A quote rendered one fact a line:
/// `s1 2x1000=2000 -p1:200 =1800` per cart line, then per merchant, the
/// applied discounts, the skipped promotions and the cart.
fn render(quote: &Quote) -> String {
    let source = |source: &DiscountSource| match source {
        DiscountSource::Promotion(id) | DiscountSource::Coupon(id) => id.to_string(),
    };
    let mut out = String::new();
    for line in &quote.lines {
        write!(out, "{} {}x{}={}", line.sku_id, line.quantity, line.unit_price, line.subtotal).unwrap();
        for discount in &line.discounts {
            write!(out, " -{}:{}", source(&discount.source), discount.amount).unwrap();
        }
        writeln!(out, " ={}", line.total).unwrap();
    }
    for merchant in &quote.merchants {
        writeln!(out, "{} {}-{}={}", merchant.merchant_id, merchant.subtotal, merchant.discount, merchant.total)
            .unwrap();
    }
    if !quote.applied.is_empty() {
        let applied: Vec<String> =
            quote.applied.iter().map(|a| format!("{}:{}", source(&a.source), a.amount)).collect();
        writeln!(out, "applied {}", applied.join(" ")).unwrap();
    }
    if !quote.skipped.is_empty() {
        let skipped: Vec<String> =
            quote.skipped.iter().map(|s| format!("{}:{}", s.promotion_id, s.reason.as_str())).collect();
        writeln!(out, "skipped {}", skipped.join(" ")).unwrap();
    }
    writeln!(out, "total {}-{}={}", quote.subtotal, quote.discount, quote.total).unwrap();
    out
}

/// Usage counters given per promotion: (discount, uses, buyer uses).
struct Usage(Vec<(&'static str, PromotionUsage)>);

impl UsageView for Usage {
    fn usage(&self, promotion_id: &Id, _buyer_id: &Id) -> PromotionUsage {
        self.0.iter().find(|(name, _)| promotion_id.as_str() == *name).map(|(_, usage)| *usage).unwrap_or_default()
    }
}

struct Setup {
    promotions: Vec<PromotionSpec>,
    templates: Vec<CouponTemplateSpec>,
    coupons: Vec<Coupon>,
    usage: Usage,
    now_ms: u64,
}

impl Setup {
    fn new(promotions: Vec<PromotionSpec>) -> Setup {
        Setup { promotions, templates: Vec::new(), coupons: Vec::new(), usage: Usage(Vec::new()), now_ms: NOW }
    }

    fn quote(&self, cart: &[(&str, u32)], coupon_ids: &[&str]) -> Result<Quote, ErrorCode> {
        let promotions = self.promotions.iter().map(|spec| Promotion::new(spec.clone()).unwrap()).collect();
        let templates = self.templates.iter().map(|spec| CouponTemplate::new(spec.clone()).unwrap()).collect();
        let book = PriceBook::new(skus(), promotions, templates).unwrap();
        let request = QuoteRequest {
            buyer_id: id("buyer"),
            lines: cart.iter().map(|&(sku, quantity)| CartLine { sku_id: id(sku), quantity }).collect(),
            coupon_ids: coupon_ids.iter().map(|c| id(c)).collect(),
        };
        let quote = quote(&book, &request, &self.usage, &self.coupons, self.now_ms)?;
        quote.check().unwrap();
        Ok(quote)
    }
}

fn check_setup(setup: &Setup, cart: &[(&str, u32)], coupon_ids: &[&str], expected: &str) {
    let actual = match setup.quote(cart, coupon_ids) {
        Ok(quote) => render(&quote),
        Err(code) => format!("error {code}\n"),
    };
    let expected: String =
        expected.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| format!("{l}\n")).collect();
    assert_eq!(actual, expected, "\nactual:\n{actual}\nexpected:\n{expected}");
}

fn check(promotions: Vec<PromotionSpec>, cart: &[(&str, u32)], expected: &str) {
    check_setup(&Setup::new(promotions), cart, &[], expected);
}

#[test]
fn no_promotions() {
    check(
        vec![],
        &[("s1", 2), ("s3", 1)],
        "s1 2x1000=2000 =2000
         s3 1x2000=2000 =2000
         m1 2000-0=2000
         m2 2000-0=2000
         total 4000-0=4000",
    );
}

#[test]
fn percent_off_rounds_down_per_line() {
    check(
        vec![promo("p1", percent(10), Scope::Everything)],
        &[("s4", 1), ("s1", 1)],
        "s4 1x333=333 -p1:33 =300
         s1 1x1000=1000 -p1:100 =900
         m1 1000-100=900
         m2 333-33=300
         applied p1:133
         total 1333-133=1200",
    );
    // 100% takes the whole line and no more.
    check(
        vec![promo("p1", percent(100), on(&["s4"]))],
        &[("s4", 2)],
        "s4 2x333=666 -p1:666 =0
         m2 666-666=0
         applied p1:666
         total 666-666=0",
    );
}

#[test]
fn amount_off_is_shared_by_largest_remainder() {
    // 10.00 over three equal lines: 3.34 / 3.33 / 3.33.
    check(
        vec![promo("p1", amount(1000), merchant("m3"))],
        &[("a", 1), ("b", 1), ("c", 1)],
        "a 1x1000=1000 -p1:334 =666
         b 1x1000=1000 -p1:333 =667
         c 1x1000=1000 -p1:333 =667
         m3 3000-1000=2000
         applied p1:1000
         total 3000-1000=2000",
    );
    // In proportion to the lines: 1000 and 500 share 300 as 200 / 100.
    check(
        vec![promo("p1", amount(300), merchant("m1"))],
        &[("s1", 1), ("s2", 1), ("s3", 1)],
        "s1 1x1000=1000 -p1:200 =800
         s2 1x500=500 -p1:100 =400
         s3 1x2000=2000 =2000
         m1 1500-300=1200
         m2 2000-0=2000
         applied p1:300
         total 3500-300=3200",
    );
    // Capped at the in-scope subtotal.
    check(
        vec![promo("p1", amount(5000), on(&["s4"]))],
        &[("s4", 1), ("s2", 1)],
        "s4 1x333=333 -p1:333 =0
         s2 1x500=500 =500
         m1 500-0=500
         m2 333-333=0
         applied p1:333
         total 833-333=500",
    );
}

#[test]
fn spend_threshold() {
    let once = || vec![promo("p1", threshold(1500, 100, false), Scope::Everything)];
    check(
        once(),
        &[("s1", 1), ("s2", 1)],
        "s1 1x1000=1000 -p1:67 =933
         s2 1x500=500 -p1:33 =467
         m1 1500-100=1400
         applied p1:100
         total 1500-100=1400",
    );
    check(
        once(),
        &[("s1", 1), ("s4", 1)],
        "s1 1x1000=1000 =1000
         s4 1x333=333 =333
         m1 1000-0=1000
         m2 333-0=333
         skipped p1:below_threshold
         total 1333-0=1333",
    );
    // Stepwise: every full 1000 saves 100.
    check(
        vec![promo("p1", threshold(1000, 100, true), Scope::Everything)],
        &[("s1", 3), ("s2", 1)],
        "s1 3x1000=3000 -p1:257 =2743
         s2 1x500=500 -p1:43 =457
         m1 3500-300=3200
         applied p1:300
         total 3500-300=3200",
    );
}

#[test]
fn buy_x_get_y() {
    // 7 units, buy 2 get 1: two full cycles, two units free.
    check(
        vec![promo("p1", bxgy(2, 1), on(&["s1", "s2"]))],
        &[("s1", 7), ("s2", 2)],
        "s1 7x1000=7000 -p1:2000 =5000
         s2 2x500=1000 =1000
         m1 8000-2000=6000
         applied p1:2000
         total 8000-2000=6000",
    );
    check(
        vec![promo("p1", bxgy(2, 1), on(&["s1"]))],
        &[("s1", 2)],
        "s1 2x1000=2000 =2000
         m1 2000-0=2000
         skipped p1:below_threshold
         total 2000-0=2000",
    );
    // After 10% off, the free unit is worth a third of what is left.
    check(
        vec![prio(1, promo("p1", percent(10), on(&["s4"]))), prio(2, promo("p2", bxgy(2, 1), on(&["s4"])))],
        &[("s4", 3)],
        "s4 3x333=999 -p1:99 -p2:300 =600
         m2 999-399=600
         applied p1:99 p2:300
         total 999-399=600",
    );
}

#[test]
fn priorities_order_the_promotions_and_ties_go_by_id() {
    let both = |first: i32, second: i32| {
        vec![prio(first, promo("pa", amount(100), on(&["s1"]))), prio(second, promo("pp", percent(50), on(&["s1"])))]
    };
    // Amount first: (1000 - 100) / 2. Percent first: 1000 / 2 - 100.
    check(
        both(1, 2),
        &[("s1", 1)],
        "s1 1x1000=1000 -pa:100 -pp:450 =450
         m1 1000-550=450
         applied pa:100 pp:450
         total 1000-550=450",
    );
    check(
        both(2, 1),
        &[("s1", 1)],
        "s1 1x1000=1000 -pp:500 -pa:100 =400
         m1 1000-600=400
         applied pp:500 pa:100
         total 1000-600=400",
    );
    check(
        both(-5, -5),
        &[("s1", 1)],
        "s1 1x1000=1000 -pa:100 -pp:450 =450
         m1 1000-550=450
         applied pa:100 pp:450
         total 1000-550=450",
    );
}

#[test]
fn a_line_never_goes_below_zero() {
    check(
        vec![
            prio(1, promo("p1", percent(90), on(&["s2"]))),
            prio(2, promo("p2", amount(1000), on(&["s2"]))),
            prio(3, promo("p3", percent(50), on(&["s2"]))),
        ],
        &[("s2", 1)],
        "s2 1x500=500 -p1:450 -p2:50 =0
         m1 500-500=0
         applied p1:450 p2:50
         skipped p3:nothing_to_discount
         total 500-500=0",
    );
    // 1% of the 33 left rounds down to nothing.
    check(
        vec![prio(1, promo("p1", amount(300), on(&["s4"]))), prio(2, promo("p2", percent(1), on(&["s4"])))],
        &[("s4", 1)],
        "s4 1x333=333 -p1:300 =33
         m2 333-300=33
         applied p1:300
         skipped p2:nothing_to_discount
         total 333-300=33",
    );
}

#[test]
fn exclusive_groups_keep_the_best_for_the_buyer() {
    let group = || {
        vec![
            grouped("g", 1, promo("g1", percent(10), Scope::Everything)),
            grouped("g", 1, promo("g2", amount(250), Scope::Everything)),
            grouped("g", 1, promo("g3", threshold(5000, 1000, false), Scope::Everything)),
            promo("free", percent(1), on(&["s3"])),
        ]
    };
    // 10% of 2000 = 200 < 250: g2 wins; g3 is below its threshold.
    check(
        group(),
        &[("s1", 2)],
        "s1 2x1000=2000 -g2:250 =1750
         m1 2000-250=1750
         applied g2:250
         skipped g1:lost_to_group g3:below_threshold
         total 2000-250=1750",
    );
    // 10% of 3000 = 300 > 250.
    check(
        group(),
        &[("s1", 3)],
        "s1 3x1000=3000 -g1:300 =2700
         m1 3000-300=2700
         applied g1:300
         skipped g2:lost_to_group g3:below_threshold
         total 3000-300=2700",
    );
    // A tie goes to the lower id, whatever the order of application.
    check(
        vec![
            grouped("g", 2, promo("g1", amount(250), Scope::Everything)),
            grouped("g", 1, promo("g2", percent(25), Scope::Everything)),
        ],
        &[("s1", 1)],
        "s1 1x1000=1000 -g1:250 =750
         m1 1000-250=750
         applied g1:250
         skipped g2:lost_to_group
         total 1000-250=750",
    );
    // The group is decided where its first member comes: after p1 (priority 0),
    // before p2 (priority 5), though its winner has priority 9.
    check(
        vec![
            promo("p1", percent(50), on(&["s1"])),
            grouped("g", 3, promo("g1", amount(100), on(&["s1"]))),
            grouped("g", 9, promo("g2", amount(200), on(&["s1"]))),
            prio(5, promo("p2", percent(50), on(&["s1"]))),
        ],
        &[("s1", 1)],
        "s1 1x1000=1000 -p1:500 -g2:200 -p2:150 =150
         m1 1000-850=150
         applied p1:500 g2:200 p2:150
         skipped g1:lost_to_group
         total 1000-850=150",
    );
}

#[test]
fn time_windows() {
    let window = |starts_at_ms, ends_at_ms| {
        vec![PromotionSpec { starts_at_ms, ends_at_ms, ..promo("p1", amount(10), Scope::Everything) }]
    };
    let cart = &[("s4", 1)];
    let live = "s4 1x333=333 -p1:10 =323
                m2 333-10=323
                applied p1:10
                total 333-10=323";
    check(window(NOW, NOW + 1), cart, live);
    check(window(0, NOW + 1), cart, live);
    check(window(NOW + 1, NOW + 2), cart, "s4 1x333=333 =333\nm2 333-0=333\nskipped p1:not_started\ntotal 333-0=333");
    // The end is exclusive.
    check(window(0, NOW), cart, "s4 1x333=333 =333\nm2 333-0=333\nskipped p1:ended\ntotal 333-0=333");
}

#[test]
fn limits_from_the_counters() {
    let limited = || {
        vec![
            PromotionSpec { budget: Some(1000), ..promo("pb", amount(300), on(&["s1"])) },
            PromotionSpec { usage_limit: Some(5), ..promo("pu", amount(10), on(&["s1"])) },
            PromotionSpec { per_buyer_limit: Some(2), ..promo("pp", amount(10), on(&["s1"])) },
        ]
    };
    let used = |discount, uses, buyer_uses| PromotionUsage { discount, uses, buyer_uses };
    let mut setup = Setup::new(limited());
    setup.usage = Usage(vec![("pb", used(1000, 3, 0)), ("pu", used(50, 5, 0)), ("pp", used(0, 9, 2))]);
    check_setup(
        &setup,
        &[("s1", 1)],
        &[],
        "s1 1x1000=1000 =1000
         m1 1000-0=1000
         skipped pb:budget_exhausted pp:per_buyer_limit_reached pu:usage_limit_reached
         total 1000-0=1000",
    );
    // 120 of the budget left: the discount is capped to it.
    setup.usage = Usage(vec![("pb", used(880, 3, 0)), ("pu", used(40, 4, 0)), ("pp", used(0, 9, 1))]);
    check_setup(
        &setup,
        &[("s1", 1)],
        &[],
        "s1 1x1000=1000 -pb:120 -pp:10 -pu:10 =860
         m1 1000-140=860
         applied pb:120 pp:10 pu:10
         total 1000-140=860",
    );
    // A capped per-line discount is shared like the full one would be: 10%
    // of 1000 and 2000 is 100 / 200; 150 left gives 50 / 100.
    let mut setup =
        Setup::new(vec![PromotionSpec { budget: Some(1000), ..promo("p1", percent(10), Scope::Everything) }]);
    setup.usage = Usage(vec![("p1", used(850, 1, 0))]);
    check_setup(
        &setup,
        &[("s1", 1), ("s3", 1)],
        &[],
        "s1 1x1000=1000 -p1:50 =950
         s3 1x2000=2000 -p1:100 =1900
         m1 1000-50=950
         m2 2000-100=1900
         applied p1:150
         total 3000-150=2850",
    );
}

#[test]
fn skipped_lists_only_promotions_that_touch_the_cart() {
    check(
        vec![
            PromotionSpec { ends_at_ms: 1, ..promo("p1", amount(10), on(&["s3"])) },
            PromotionSpec { ends_at_ms: 1, ..promo("p2", amount(10), merchant("m2")) },
            PromotionSpec { ends_at_ms: 1, ..promo("p3", amount(10), on(&["s1", "s3"])) },
            // Another currency: not for this cart.
            PromotionSpec { currency: Currency::parse("EUR").unwrap(), ..promo("p4", amount(10), Scope::Everything) },
        ],
        &[("s1", 1)],
        "s1 1x1000=1000 =1000
         m1 1000-0=1000
         skipped p3:ended
         total 1000-0=1000",
    );
}

#[test]
fn refused_carts() {
    let no = Setup::new(vec![]);
    let too_many: Vec<(String, u32)> = (0..=MAX_QUOTE_LINES).map(|n| (format!("x{n}"), 1)).collect();
    let too_many: Vec<(&str, u32)> = too_many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    for (cart, coupons, expected) in [
        (&[][..], &[][..], "error invalid_request"),
        (&[("s1", 0)][..], &[][..], "error invalid_request"),
        (&[("s1", MAX_LINE_QUANTITY + 1)][..], &[][..], "error invalid_request"),
        (&[("s1", 1), ("s1", 2)][..], &[][..], "error invalid_request"),
        (&[("s1", 1)][..], &["c1", "c1"][..], "error invalid_request"),
        (&[("s1", 1)][..], &["c1", "c2", "c3", "c4", "c5"][..], "error invalid_request"),
        (&too_many[..], &[][..], "error invalid_request"),
        (&[("nope", 1)][..], &[][..], "error sku_not_found"),
        (&[("s1", 1), ("e1", 1)][..], &[][..], "error currency_mismatch"),
        (&[("big", 3000)][..], &[][..], "error overflow"),
        // Each line fits, their sum does not.
        (&[("big", 1500), ("big2", 1500)][..], &[][..], "error overflow"),
    ] {
        check_setup(&no, cart, coupons, expected);
    }
    assert_eq!(no.quote(&[("big", 1500)], &[]).map(|q| q.total), Ok(peakstack_domain::MAX_TRANSFER_AMOUNT * 1500));
    // The largest cart allowed prices.
    let skus_100: Vec<SkuPrice> = (0..MAX_QUOTE_LINES)
        .map(|n| SkuPrice { sku_id: id(&format!("x{n}")), merchant_id: id("m"), unit_price: 7, currency: usd() })
        .collect();
    let book =
        PriceBook::new(skus_100, vec![Promotion::new(promo("p", amount(100), Scope::Everything)).unwrap()], vec![])
            .unwrap();
    let request = QuoteRequest {
        buyer_id: id("b"),
        lines: (0..MAX_QUOTE_LINES).map(|n| CartLine { sku_id: id(&format!("x{n}")), quantity: 1 }).collect(),
        coupon_ids: vec![],
    };
    let quote = quote(&book, &request, &NoUsage, &[], NOW).unwrap();
    quote.check().unwrap();
    assert_eq!(quote.discount, 100);
    assert!(quote.lines.iter().all(|line| line.discount == 1));
}

fn template(name: &str, discount: CouponDiscount, min_spend: u64, scope: Scope) -> CouponTemplateSpec {
    CouponTemplateSpec {
        id: id(name),
        currency: usd(),
        discount,
        min_spend,
        scope,
        valid_from_ms: 100,
        valid_until_ms: 1000,
        total_issue: 10,
    }
}

fn coupon(name: &str, template: &str, buyer: &str, state: CouponState) -> Coupon {
    Coupon { id: id(name), template_id: id(template), buyer_id: id(buyer), state }
}

fn coupon_setup() -> Setup {
    let mut setup = Setup::new(vec![promo("p1", percent(10), Scope::Everything)]);
    setup.templates = vec![
        template("t-amount", CouponDiscount::AmountOff { amount: 300 }, 1500, Scope::Everything),
        template("t-pct", CouponDiscount::PercentOff { percent: 50 }, 0, merchant("m2")),
        template("t-sku", CouponDiscount::AmountOff { amount: 10 }, 0, on(&["s4"])),
        CouponTemplateSpec {
            currency: Currency::parse("EUR").unwrap(),
            ..template("t-eur", CouponDiscount::AmountOff { amount: 1 }, 0, Scope::Everything)
        },
    ];
    setup.coupons = vec![
        coupon("c-amount", "t-amount", "buyer", CouponState::Available),
        coupon("c-amount2", "t-amount", "buyer", CouponState::Available),
        coupon("c-pct", "t-pct", "buyer", CouponState::Available),
        coupon("c-sku", "t-sku", "buyer", CouponState::Available),
        coupon("c-eur", "t-eur", "buyer", CouponState::Available),
        coupon("c-other", "t-amount", "someone-else", CouponState::Available),
        coupon("c-used", "t-amount", "buyer", CouponState::Used { txn: 1 }),
        coupon("c-locked", "t-amount", "buyer", CouponState::Locked { txn: 2, deadline_ms: 9999 }),
        coupon("c-orphan", "t-none", "buyer", CouponState::Available),
    ];
    setup
}

#[test]
fn coupons_apply_after_promotions_in_request_order() {
    let setup = coupon_setup();
    // 10% first: 1800 + 1800 left; 300 shared evenly; then 50% of m2's 1650.
    check_setup(
        &setup,
        &[("s1", 2), ("s3", 1)],
        &["c-amount", "c-pct"],
        "s1 2x1000=2000 -p1:200 -c-amount:150 =1650
         s3 1x2000=2000 -p1:200 -c-amount:150 -c-pct:825 =825
         m1 2000-350=1650
         m2 2000-1175=825
         applied p1:400 c-amount:300 c-pct:825
         total 4000-1525=2475",
    );
}

#[test]
fn refused_coupons() {
    let setup = coupon_setup();
    for (cart, coupons, expected) in [
        (&[("s1", 2)][..], &["c-missing"][..], "error coupon_not_found"),
        (&[("s1", 2)][..], &["c-orphan"][..], "error coupon_not_found"),
        (&[("s1", 2)][..], &["c-other"][..], "error coupon_not_applicable"),
        (&[("s1", 2)][..], &["c-used"][..], "error coupon_already_used"),
        (&[("s1", 2)][..], &["c-locked"][..], "error coupon_already_used"),
        (&[("s1", 2)][..], &["c-eur"][..], "error coupon_not_applicable"),
        // Not in scope: m2's coupon on m1's lines.
        (&[("s1", 2)][..], &["c-pct"][..], "error coupon_not_applicable"),
        // Min spend is on what the promotions left: 1500 - 10% = 1350 < 1500.
        (&[("s1", 1), ("s2", 1)][..], &["c-amount"][..], "error coupon_not_applicable"),
        // Two coupons of one template.
        (&[("s1", 2)][..], &["c-amount", "c-amount2"][..], "error coupon_not_applicable"),
    ] {
        check_setup(&setup, cart, coupons, expected);
    }
    let mut early = coupon_setup();
    early.now_ms = 99;
    check_setup(&early, &[("s1", 2)], &["c-amount"], "error coupon_expired");
    let mut late = coupon_setup();
    late.now_ms = 1000;
    check_setup(&late, &[("s1", 2)], &["c-amount"], "error coupon_expired");
    // The first coupon that fails decides the error.
    check_setup(&setup, &[("s1", 2)], &["c-used", "c-missing"], "error coupon_already_used");
}

#[test]
fn a_coupon_that_takes_off_nothing_is_not_applicable() {
    let mut setup = coupon_setup();
    // The line is already at zero after the promotion.
    setup.promotions = vec![promo("p1", percent(100), on(&["s4"]))];
    check_setup(&setup, &[("s4", 1)], &["c-sku"], "error coupon_not_applicable");
}

#[test]
fn the_order_of_the_book_does_not_matter() {
    let mut promotions = vec![
        grouped("g", 1, promo("g1", percent(10), Scope::Everything)),
        grouped("g", 1, promo("g2", amount(250), Scope::Everything)),
        prio(3, promo("p1", threshold(1000, 50, true), merchant("m1"))),
        prio(-1, promo("p2", bxgy(1, 1), on(&["s1"]))),
    ];
    let forward = Setup::new(promotions.clone()).quote(&[("s1", 3), ("s3", 1)], &[]).unwrap();
    promotions.reverse();
    let backward = Setup::new(promotions).quote(&[("s1", 3), ("s3", 1)], &[]).unwrap();
    assert_eq!(forward, backward);
}

#[test]
fn books_refuse_duplicates() {
    let p = || Promotion::new(promo("p", amount(1), Scope::Everything)).unwrap();
    assert_eq!(PriceBook::new(vec![], vec![p(), p()], vec![]).err(), Some(ErrorCode::InvalidRequest));
    let mut two = skus();
    two.push(two[0].clone());
    assert_eq!(PriceBook::new(two, vec![], vec![]).err(), Some(ErrorCode::InvalidRequest));
    let t =
        || CouponTemplate::new(template("t", CouponDiscount::AmountOff { amount: 1 }, 0, Scope::Everything)).unwrap();
    assert_eq!(PriceBook::new(vec![], vec![], vec![t(), t()]).err(), Some(ErrorCode::InvalidRequest));
    let mut dear = skus();
    dear[0].unit_price = peakstack_domain::MAX_TRANSFER_AMOUNT + 1;
    assert_eq!(PriceBook::new(dear, vec![], vec![]).err(), Some(ErrorCode::InvalidRequest));
}

#[test]
fn quotes_serialize_with_snake_case_reasons() {
    let mut setup = coupon_setup();
    setup.promotions.push(PromotionSpec { ends_at_ms: 1, ..promo("p0", amount(1), Scope::Everything) });
    let quote = setup.quote(&[("s3", 1)], &["c-pct"]).unwrap();
    let json = serde_json::to_value(&quote).unwrap();
    assert_eq!(json["currency"], "USD");
    assert_eq!(json["skipped"][0], serde_json::json!({"promotion_id": "p0", "reason": "ended"}));
    assert_eq!(json["applied"][1], serde_json::json!({"coupon_id": "c-pct", "amount": 900}));
    assert_eq!(json["lines"][0]["discounts"][0], serde_json::json!({"promotion_id": "p1", "amount": 200}));
    assert_eq!(json["merchants"][0]["merchant_id"], "m2");
    for reason in SkipReason::ALL {
        assert_eq!(serde_json::to_value(reason).unwrap(), reason.as_str());
    }
}

#[test]
fn the_check_finds_broken_quotes() {
    let quote = coupon_setup().quote(&[("s1", 2), ("s3", 1)], &["c-amount"]).unwrap();
    let mut broken = Vec::new();
    let mut q = quote.clone();
    q.lines[0].discounts[0].amount += 1;
    broken.push(q);
    let mut q = quote.clone();
    q.applied[0].amount -= 1;
    broken.push(q);
    let mut q = quote.clone();
    q.total += 1;
    broken.push(q);
    let mut q = quote.clone();
    q.merchants[0].discount += 1;
    broken.push(q);
    let mut q = quote.clone();
    q.applied.pop();
    broken.push(q);
    for q in broken {
        assert!(q.check().is_err(), "{q:?}");
    }
    assert_eq!(quote.check(), Ok(()));
}
