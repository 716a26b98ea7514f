//! `peakstack bench checkout`: whole checkouts through the engine,
//! in-process, durable (fsync per group commit, as in production).
//!
//! Setup, not timed: `buyers` wallets owned by their buyers (debits must
//! not exceed credits), funded from a bank account in batches; two
//! merchants with six SKUs each and ample stock; the [`CATALOGUE`] of 20
//! live promotions of every kind (three limited, with budgets no run can
//! spend, so every checkout takes the budget branch); a coupon template
//! and one coupon per checkout, issued to its buyer. Timed: `checkouts`
//! carts of 3 lines from 2 merchants, each with its coupon, automatic
//! capture, placed by `concurrency` tokio tasks on a multi-thread runtime.
//!
//! At the end the books are read back and checked: every checkout
//! committed, each SKU sold exactly the units ordered, buyers' debits ==
//! merchants' settlement credits == the checkouts' totals, each coupon used
//! once, every budget counter within its budget and equal to the discounts
//! the orders carry, and the ledger balanced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use peakstack_domain::{AccountFlags, Amount, Currency, Details, ErrorCode, Id, NewAccount, Owner, TransferRequest};
use peakstack_engine::inventory::{self, NewSku};
use peakstack_engine::orders::{CaptureMode, CheckoutState, OrderState, PaymentState};
use peakstack_engine::pricing::{
    self, CartLine, CouponDiscount, CouponState, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind,
    PromotionSpec, Scope,
};
use peakstack_engine::trade_checkout::CheckoutRequest;
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use rand::{Rng, SeedableRng};

/// Most checkouts one run places: the budgets and limits of [`CATALOGUE`]
/// are sized so that a run this long cannot exhaust them.
pub const MAX_CHECKOUTS: usize = 10_000_000;
pub const MAX_BUYERS: usize = 1_000_000;
pub const MAX_CONCURRENCY: usize = 100_000;
/// A limited promotion's budget, minor units: more than [`MAX_CHECKOUTS`]
/// carts at their dearest ([`MAX_CART_MINOR`]) could be discounted, and
/// within the 2^53 - 1 an amount may be.
pub const BUDGET_MINOR: u64 = 1 << 50;
/// The usage and per-buyer limits of the limited promotions: above any run.
const USAGE_LIMIT: u64 = 1 << 40;
/// Units of each SKU in stock: every checkout could take its most of each.
const STOCK_PER_CHECKOUT: u64 = MAX_LINE_UNITS as u64;
/// Units per cart line, at most (drawn from 1..=this).
pub const MAX_LINE_UNITS: u32 = 3;
pub const LINES_PER_CART: usize = 3;
pub const SKUS_PER_MERCHANT: u32 = 6;
pub const MERCHANTS: [&str; 2] = ["m1", "m2"];
pub const CURRENCY: &str = "USD";
/// The dearest cart before discounts: three lines of the dearest SKU.
pub const MAX_CART_MINOR: u64 = LINES_PER_CART as u64 * MAX_LINE_UNITS as u64 * sku_price_minor(12);
/// Funding transfers per engine call (the engine takes at most 8190).
const FUNDING_BATCH: usize = 8_000;
/// Accounts opened per engine call while loading.
const ACCOUNT_LOAD_CHUNK: usize = 10_000;
/// The promotions and coupons are live from a day before the run to a day after.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Coupons' discount and the cart total they need (every cart of the
/// catalogue's SKUs passes it).
pub const COUPON_OFF_MINOR: u64 = 500;
pub const COUPON_MIN_SPEND_MINOR: u64 = 5_000;

/// The price of SKU `s<n>` (n in 1..=12), minor units.
pub const fn sku_price_minor(n: u32) -> u64 {
    999 + 1_250 * n as u64
}

/// The merchant of SKU `s<n>`: m1 sells s1..s6, m2 s7..s12.
pub fn sku_merchant(n: u32) -> &'static str {
    MERCHANTS[((n - 1) / SKUS_PER_MERCHANT) as usize]
}

/// Who a promotion applies to, by the catalogue's short names (the
/// loadtest prefixes them with its run id).
pub enum ScopeRow {
    Skus(&'static [u32]),
    Merchant(&'static str),
    Everything,
}

pub struct PromotionRow {
    pub name: &'static str,
    pub kind: PromotionKind,
    pub scope: ScopeRow,
    pub group: Option<&'static str>,
    pub priority: i32,
    pub budget: Option<u64>,
    pub usage_limit: Option<u64>,
    pub per_buyer_limit: Option<u64>,
}

const fn row(
    name: &'static str,
    kind: PromotionKind,
    scope: ScopeRow,
    group: Option<&'static str>,
    priority: i32,
) -> PromotionRow {
    PromotionRow { name, kind, scope, group, priority, budget: None, usage_limit: None, per_buyer_limit: None }
}

/// The 20 live promotions (the pricing bench fixture's mix: every kind and
/// scope, three exclusive groups), p06, p12 and p20 limited by a budget,
/// p09 per buyer, p11 by uses.
pub const CATALOGUE: [PromotionRow; 20] = {
    use PromotionKind::*;
    [
        row("p01", PercentOff { percent: 10 }, ScopeRow::Skus(&[1, 2]), None, 10),
        row("p02", PercentOff { percent: 5 }, ScopeRow::Merchant("m1"), Some("m1-store"), 10),
        row("p03", AmountOff { amount: 500 }, ScopeRow::Merchant("m1"), Some("m1-store"), 10),
        row(
            "p04",
            SpendThreshold { threshold: 10_000, off: 1_000, stepwise: true },
            ScopeRow::Merchant("m2"),
            None,
            20,
        ),
        row("p05", BuyXGetY { buy: 2, get: 1 }, ScopeRow::Skus(&[3, 7]), None, 5),
        PromotionRow {
            budget: Some(BUDGET_MINOR),
            ..row("p06", PercentOff { percent: 15 }, ScopeRow::Skus(&[8, 9]), None, 5)
        },
        row("p07", AmountOff { amount: 300 }, ScopeRow::Everything, Some("platform"), 30),
        row(
            "p08",
            SpendThreshold { threshold: 20_000, off: 2_500, stepwise: false },
            ScopeRow::Everything,
            Some("platform"),
            30,
        ),
        PromotionRow {
            per_buyer_limit: Some(USAGE_LIMIT),
            ..row("p09", PercentOff { percent: 8 }, ScopeRow::Everything, Some("platform"), 30)
        },
        row("p10", BuyXGetY { buy: 1, get: 1 }, ScopeRow::Skus(&[4]), None, 5),
        PromotionRow {
            usage_limit: Some(USAGE_LIMIT),
            ..row("p11", PercentOff { percent: 20 }, ScopeRow::Skus(&[10]), None, 5)
        },
        PromotionRow {
            budget: Some(BUDGET_MINOR),
            ..row("p12", AmountOff { amount: 200 }, ScopeRow::Merchant("m2"), None, 15)
        },
        row("p13", SpendThreshold { threshold: 5_000, off: 300, stepwise: true }, ScopeRow::Merchant("m1"), None, 15),
        row("p14", PercentOff { percent: 3 }, ScopeRow::Everything, None, 40),
        row("p15", AmountOff { amount: 100 }, ScopeRow::Skus(&[5, 11]), None, 12),
        row("p16", PercentOff { percent: 12 }, ScopeRow::Skus(&[6, 12]), Some("flash"), 12),
        row("p17", AmountOff { amount: 400 }, ScopeRow::Skus(&[6, 12]), Some("flash"), 12),
        row(
            "p18",
            SpendThreshold { threshold: 3_000, off: 150, stepwise: false },
            ScopeRow::Skus(&[1, 2, 3, 4, 5, 6]),
            None,
            18,
        ),
        row("p19", BuyXGetY { buy: 3, get: 1 }, ScopeRow::Merchant("m2"), None, 8),
        PromotionRow {
            budget: Some(BUDGET_MINOR),
            usage_limit: Some(USAGE_LIMIT),
            per_buyer_limit: Some(USAGE_LIMIT),
            ..row("p20", PercentOff { percent: 2 }, ScopeRow::Everything, None, 50)
        },
    ]
};

/// Cart `index`'s lines as (SKU number, units): two SKUs of one merchant
/// and one of the other, distinct, 1..=[`MAX_LINE_UNITS`] units each;
/// the same for the same index in every run.
pub fn cart_lines(index: u64) -> [(u32, u32); LINES_PER_CART] {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(index);
    let (first, other) = if rng.random_bool(0.5) { (0, SKUS_PER_MERCHANT) } else { (SKUS_PER_MERCHANT, 0) };
    let a = first + rng.random_range(1..=SKUS_PER_MERCHANT);
    let b = loop {
        let b = first + rng.random_range(1..=SKUS_PER_MERCHANT);
        if b != a {
            break b;
        }
    };
    let c = other + rng.random_range(1..=SKUS_PER_MERCHANT);
    [a, b, c].map(|sku| (sku, rng.random_range(1..=MAX_LINE_UNITS)))
}

/// Checkouts buyer number `buyer` places in a run: checkout `i` is buyer `i % buyers`'s.
pub fn checkouts_of_buyer(checkouts: usize, buyers: usize, buyer: usize) -> u64 {
    (checkouts / buyers + usize::from(buyer < checkouts % buyers)) as u64
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(0))
}

pub struct CheckoutBenchConfig {
    pub checkouts: usize,
    pub buyers: usize,
    pub concurrency: usize,
    pub executors: u16,
    pub json: bool,
}

#[derive(serde::Serialize)]
pub struct CheckoutBenchSummary {
    /// Checkouts committed, and refused (by code).
    pub checkouts: u64,
    pub refused: u64,
    pub refusals: BTreeMap<String, u64>,
    pub seconds: f64,
    pub checkouts_per_s: f64,
    /// Latency of one `Engine::checkout` call, microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub setup_seconds: f64,
    pub buyers: usize,
    pub concurrency: usize,
    pub executors: u16,
    pub shards: u32,
    pub promotions: usize,
    pub fsyncs: u64,
    pub log_mib: f64,
    pub rss_mib: f64,
    /// CPU time per committed checkout, microseconds, by thread name, over the timed run.
    pub cpu_us_per_checkout: BTreeMap<String, f64>,
    pub books: Books,
    /// Every check that failed, in words; empty when the books agree.
    pub failures: Vec<String>,
    pub invariants_ok: bool,
}

/// What the engine's books said after the run.
#[derive(serde::Serialize, Default)]
pub struct Books {
    pub units_ordered: u64,
    pub units_sold: u64,
    pub units_reserved: u64,
    /// The checkouts' totals (their orders' totals), summed.
    pub checkouts_total_minor: u128,
    pub wallet_debits_minor: u128,
    pub wallet_debits_pending_minor: u128,
    pub settle_credits_minor: u128,
    pub settle_accounts: usize,
    pub coupons_used: u64,
    /// Per limited promotion: its counters and the discount the orders carry.
    pub limited_promotions: Vec<PromotionBooks>,
    pub ledger_net: i128,
    /// The clearing accounts' net (the engine's `clearing_net`: clearing
    /// accounts only, not the merchants' settlement accounts).
    pub clearing_net: i128,
    pub txns_in_flight: u64,
    pub accounts: u64,
}

#[derive(serde::Serialize)]
pub struct PromotionBooks {
    pub id: String,
    pub budget: Option<u64>,
    pub given: u64,
    pub reserved: u64,
    pub uses: u64,
    pub discount_in_orders: u64,
}

/// What setup made, for the timed phase and the checks.
struct Fixture {
    /// One per checkout, in index order.
    requests: Vec<CheckoutRequest>,
    wallets: Vec<Id>,
    skus: Vec<Id>,
    limited: Vec<(Id, Option<u64>, Option<u64>)>,
}

pub fn run(config: CheckoutBenchConfig) -> anyhow::Result<CheckoutBenchSummary> {
    validate(&config)?;
    let dir = tempfile::Builder::new().prefix("peakstack-bench-").tempdir().context("creating a temporary data dir")?;
    let engine = Engine::open(EngineConfig {
        shards: 64,
        clock: Arc::new(SystemClock),
        ..EngineConfig::new(dir.path(), config.executors)
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let setup_started = Instant::now();
    let wallets = open_wallets(&engine, &config)?;
    let fixture = runtime.block_on(set_up_catalogue(&engine, &config, wallets))?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    if !config.json {
        eprintln!(
            "set up {} funded wallets, {} SKUs, {} promotions and {} coupons in {setup_seconds:.1}s",
            config.buyers,
            fixture.skus.len(),
            CATALOGUE.len(),
            config.checkouts
        );
    }
    let fixture = Arc::new(fixture);
    let fsyncs_before = engine.stats().fsyncs.load(Ordering::Relaxed);
    let log_bytes_before = engine.stats().log_bytes.load(Ordering::Relaxed);
    let cpu_before = crate::bench::thread_cpu();
    let placed = runtime.block_on(place_all(&engine, &fixture, &config))?;
    let cpu_after = crate::bench::thread_cpu();
    let stats = engine.stats();
    let fsyncs = stats.fsyncs.load(Ordering::Relaxed) - fsyncs_before;
    let log_bytes = stats.log_bytes.load(Ordering::Relaxed) - log_bytes_before;

    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    for outcome in &placed.outcomes {
        if let Err(code) = outcome {
            *refusals.entry(code.to_string()).or_insert(0) += 1;
        }
    }
    let refused: u64 = refusals.values().sum();
    let committed = placed.outcomes.len() as u64 - refused;
    let (books, mut failures) =
        runtime.block_on(read_books(&engine, &fixture, &placed.outcomes, config.concurrency))?;
    if refused > 0 {
        // Stock, money, budgets and coupons are all ample: no refusal is expected.
        failures.insert(0, format!("{refused} checkouts refused: {refusals:?}"));
    }
    let summary = CheckoutBenchSummary {
        checkouts: committed,
        refused,
        refusals,
        seconds: placed.seconds,
        checkouts_per_s: committed as f64 / placed.seconds,
        p50_us: placed.latency_us.value_at_quantile(0.50),
        p99_us: placed.latency_us.value_at_quantile(0.99),
        p999_us: placed.latency_us.value_at_quantile(0.999),
        max_us: placed.latency_us.max(),
        setup_seconds,
        buyers: config.buyers,
        concurrency: config.concurrency,
        executors: engine.layout().executors(),
        shards: engine.layout().shards(),
        promotions: CATALOGUE.len(),
        fsyncs,
        log_mib: log_bytes as f64 / (1024.0 * 1024.0),
        rss_mib: crate::bench::rss_mib(),
        cpu_us_per_checkout: crate::bench::cpu_per_transfer(&cpu_before, &cpu_after, committed),
        books,
        invariants_ok: failures.is_empty(),
        failures,
    };
    engine.shutdown();
    Ok(summary)
}

fn validate(config: &CheckoutBenchConfig) -> anyhow::Result<()> {
    if !(1..=MAX_CHECKOUTS).contains(&config.checkouts) {
        bail!("--checkouts must be between 1 and {MAX_CHECKOUTS}");
    }
    if !(1..=MAX_BUYERS).contains(&config.buyers) {
        bail!("--buyers must be between 1 and {MAX_BUYERS}");
    }
    if !(1..=MAX_CONCURRENCY).contains(&config.concurrency) {
        bail!("--concurrency must be between 1 and {MAX_CONCURRENCY}");
    }
    if config.executors == 0 {
        bail!("--executors must be at least 1");
    }
    Ok(())
}

fn id(text: &str) -> Id {
    Id::parse(text).expect("a valid bench id")
}

fn usd() -> Currency {
    Currency::parse(CURRENCY).expect("valid")
}

/// Opens the bank and the wallets (`w<n>`, owned by `buyer:b<n>`) and funds
/// each wallet with what its checkouts could cost at most, in batches.
fn open_wallets(engine: &Engine, config: &CheckoutBenchConfig) -> anyhow::Result<Vec<Id>> {
    let account =
        |id: Id, flags, owner| NewAccount { id, currency: usd(), flags, overdraft_limit: 0, metadata: None, owner };
    let bank = id("bank");
    let wallets: Vec<Id> = (0..config.buyers).map(|b| id(&format!("w{b}"))).collect();
    let mut accounts = vec![account(bank.clone(), AccountFlags::default(), None)];
    accounts.extend(wallets.iter().enumerate().map(|(b, wallet)| {
        let owner = Owner::Buyer(id(&format!("b{b}")));
        account(wallet.clone(), AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, Some(owner))
    }));
    for chunk in accounts.chunks(ACCOUNT_LOAD_CHUNK) {
        for answer in engine.create_accounts_blocking(chunk.to_vec()) {
            answer.map_err(|code| anyhow!("opening accounts failed: {code}"))?;
        }
    }
    let funding: Vec<TransferRequest> = wallets
        .iter()
        .enumerate()
        .filter_map(|(b, wallet)| {
            let amount = checkouts_of_buyer(config.checkouts, config.buyers, b) * MAX_CART_MINOR;
            Some(TransferRequest::Create {
                id: id(&format!("fund-{b}")),
                debit_account_id: bank.clone(),
                credit_account_id: wallet.clone(),
                amount: Amount::new(amount)?,
                currency: usd(),
                pending: false,
                timeout_ms: 0,
                details: Details::default(),
            })
        })
        .collect();
    for chunk in funding.chunks(FUNDING_BATCH) {
        for result in engine.create_transfers_blocking(chunk.to_vec(), false) {
            result.map_err(|code| anyhow!("funding a wallet failed: {code}"))?;
        }
    }
    Ok(wallets)
}

fn scope(row: &ScopeRow) -> Scope {
    match row {
        ScopeRow::Skus(skus) => Scope::Skus(skus.iter().map(|n| id(&format!("s{n}"))).collect()),
        ScopeRow::Merchant(merchant) => Scope::Merchant(id(merchant)),
        ScopeRow::Everything => Scope::Everything,
    }
}

/// The SKUs, the promotions, the coupon template and one coupon per
/// checkout (issued `concurrency` at a time); the checkout requests.
async fn set_up_catalogue(engine: &Engine, config: &CheckoutBenchConfig, wallets: Vec<Id>) -> anyhow::Result<Fixture> {
    let stock = config.checkouts as u64 * STOCK_PER_CHECKOUT;
    let mut skus = Vec::new();
    for n in 1..=2 * SKUS_PER_MERCHANT {
        let sku = NewSku {
            id: id(&format!("s{n}")),
            merchant_id: id(sku_merchant(n)),
            title: format!("bench SKU {n}"),
            price: Amount::new(sku_price_minor(n)).expect("positive"),
            currency: usd(),
            stock,
            per_buyer_limit: None,
        };
        skus.push(sku.id.clone());
        engine.inventory(inventory::Command::CreateSku(sku)).await.map_err(|c| anyhow!("creating a SKU: {c}"))?;
    }
    let now = now_ms();
    let mut limited = Vec::new();
    for row in &CATALOGUE {
        let promotion = Promotion::new(PromotionSpec {
            id: id(row.name),
            currency: usd(),
            kind: row.kind,
            scope: scope(&row.scope),
            starts_at_ms: now - DAY_MS,
            ends_at_ms: now + DAY_MS,
            group: row.group.map(str::to_string),
            priority: row.priority,
            budget: row.budget,
            usage_limit: row.usage_limit,
            per_buyer_limit: row.per_buyer_limit,
        })
        .map_err(|_| anyhow!("promotion {} is not valid", row.name))?;
        if promotion.is_limited() {
            limited.push((promotion.id.clone(), row.budget, row.usage_limit));
        }
        engine
            .pricing(pricing::Command::CreatePromotion(promotion))
            .await
            .map_err(|c| anyhow!("creating promotion {}: {c}", row.name))?;
    }
    let template = CouponTemplate::new(CouponTemplateSpec {
        id: id("t1"),
        currency: usd(),
        discount: CouponDiscount::AmountOff { amount: COUPON_OFF_MINOR },
        min_spend: COUPON_MIN_SPEND_MINOR,
        scope: Scope::Everything,
        valid_from_ms: now - DAY_MS,
        valid_until_ms: now + DAY_MS,
        total_issue: config.checkouts as u64,
    })
    .map_err(|_| anyhow!("the coupon template is not valid"))?;
    engine
        .pricing(pricing::Command::CreateCouponTemplate(template))
        .await
        .map_err(|c| anyhow!("creating the coupon template: {c}"))?;
    let coupons = issue_coupons(engine, config).await?;
    let requests = coupons
        .into_iter()
        .enumerate()
        .map(|(index, coupon)| {
            let buyer = index % config.buyers;
            CheckoutRequest {
                buyer_id: id(&format!("b{buyer}")),
                lines: cart_lines(index as u64)
                    .iter()
                    .map(|&(sku, quantity)| CartLine { sku_id: skus[sku as usize - 1].clone(), quantity })
                    .collect(),
                coupon_ids: vec![coupon],
                account_id: wallets[buyer].clone(),
                capture: CaptureMode::Automatic,
            }
        })
        .collect();
    Ok(Fixture { requests, wallets, skus, limited })
}

/// One coupon of template `t1` per checkout, to the checkout's buyer, in
/// checkout order; `concurrency` issued at a time.
async fn issue_coupons(engine: &Engine, config: &CheckoutBenchConfig) -> anyhow::Result<Vec<Id>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.min(config.checkouts) {
        let (engine, next) = (engine.clone(), next.clone());
        let (checkouts, buyers) = (config.checkouts, config.buyers);
        tasks.spawn(async move {
            let mut issued = Vec::new();
            // Bounded: every iteration claims a distinct index below `checkouts`.
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= checkouts {
                    return Ok::<_, anyhow::Error>(issued);
                }
                let command = pricing::Command::IssueCoupon {
                    template_id: id("t1"),
                    buyer_id: id(&format!("b{}", index % buyers)),
                    // The executor assigns the id.
                    coupon_id: id("t1"),
                };
                match engine.pricing(command).await {
                    Ok(Some(coupon)) => issued.push((index, coupon)),
                    Ok(None) => bail!("a coupon was issued without an id"),
                    Err(code) => bail!("issuing a coupon failed: {code}"),
                }
            }
        });
    }
    let mut coupons: Vec<Option<Id>> = vec![None; config.checkouts];
    while let Some(joined) = tasks.join_next().await {
        for (index, coupon) in joined.context("a coupon task panicked")?? {
            coupons[index] = Some(coupon);
        }
    }
    coupons.into_iter().map(|c| c.context("a checkout has no coupon")).collect()
}

struct Placed {
    /// One per checkout, in index order.
    outcomes: Vec<Result<Id, ErrorCode>>,
    latency_us: Histogram<u64>,
    seconds: f64,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// The timed phase: `concurrency` tasks take the next checkout until none is left.
async fn place_all(engine: &Engine, fixture: &Arc<Fixture>, config: &CheckoutBenchConfig) -> anyhow::Result<Placed> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = (!config.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(config.checkouts as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} {msg}").expect("valid template"),
        );
        bar
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.min(config.checkouts) {
        let (engine, fixture, next, done) = (engine.clone(), fixture.clone(), next.clone(), done.clone());
        tasks.spawn(async move {
            let mut histogram = new_histogram();
            let mut outcomes = Vec::new();
            // Bounded: every iteration claims a distinct checkout.
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = fixture.requests.get(index) else { return (histogram, outcomes) };
                let sent = Instant::now();
                let outcome = engine.checkout(request).await;
                histogram.saturating_record(sent.elapsed().as_micros() as u64);
                outcomes.push((index, outcome));
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let ticker = progress.clone().map(|bar| {
        let done = done.clone();
        tokio::spawn(async move {
            // Aborted once the tasks are done.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let placed = done.load(Ordering::Relaxed);
                bar.set_position(placed);
                bar.set_message(format!("{:.0} checkouts/s", placed as f64 / started.elapsed().as_secs_f64()));
            }
        })
    });
    let mut latency_us = new_histogram();
    let mut outcomes: Vec<Result<Id, ErrorCode>> = vec![Err(ErrorCode::Unavailable); config.checkouts];
    let mut per_task = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        per_task.push(joined.context("a checkout task panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    for (histogram, placed) in per_task {
        latency_us.add(histogram).expect("same bounds");
        for (index, outcome) in placed {
            outcomes[index] = outcome;
        }
    }
    Ok(Placed { outcomes, latency_us, seconds })
}

/// What one checkout's view added up to.
#[derive(Default)]
struct Tally {
    total_minor: u128,
    units_by_sku: HashMap<Id, u64>,
    discount_by_source: HashMap<Id, u64>,
    settle_accounts: HashSet<Id>,
    failures: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.total_minor += other.total_minor;
        for (sku, units) in other.units_by_sku {
            *self.units_by_sku.entry(sku).or_insert(0) += units;
        }
        for (source, discount) in other.discount_by_source {
            *self.discount_by_source.entry(source).or_insert(0) += discount;
        }
        self.settle_accounts.extend(other.settle_accounts);
        self.failures.extend(other.failures);
    }
}

/// Most failures of one kind kept in words (the count is always given).
const MAX_FAILURES_LISTED: usize = 10;

/// Reads every committed checkout back (`concurrency` at a time) and
/// compares the engine's books with what was asked.
async fn read_books(
    engine: &Engine,
    fixture: &Arc<Fixture>,
    outcomes: &[Result<Id, ErrorCode>],
    concurrency: usize,
) -> anyhow::Result<(Books, Vec<String>)> {
    let committed: Arc<Vec<(usize, Id)>> =
        Arc::new(outcomes.iter().enumerate().filter_map(|(i, o)| Some((i, o.clone().ok()?))).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(committed.len()) {
        let (engine, fixture, committed, next) = (engine.clone(), fixture.clone(), committed.clone(), next.clone());
        tasks.spawn(async move {
            let mut tally = Tally::default();
            // Bounded: every iteration claims a distinct checkout.
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some((index, checkout_id)) = committed.get(at) else { return Ok::<_, anyhow::Error>(tally) };
                let view = engine.checkout_view(checkout_id).await.map_err(|c| anyhow!("reading a checkout: {c}"))?;
                tally_checkout(&mut tally, &fixture.requests[*index], checkout_id, view);
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        tally.merge(joined.context("a reading task panicked")??);
    }
    let mut failures = Vec::new();
    if tally.failures.len() > MAX_FAILURES_LISTED {
        failures.push(format!("{} checkouts read back wrong", tally.failures.len()));
    }
    failures.extend(tally.failures.drain(..).take(MAX_FAILURES_LISTED));
    let mut books = Books { checkouts_total_minor: tally.total_minor, ..Books::default() };

    // Stock: what was asked of each SKU, what its orders hold, what it sold.
    let mut asked: HashMap<Id, u64> = HashMap::new();
    for (index, _) in committed.iter() {
        for line in &fixture.requests[*index].lines {
            *asked.entry(line.sku_id.clone()).or_insert(0) += u64::from(line.quantity);
        }
    }
    for sku_id in &fixture.skus {
        let sku = engine.sku(sku_id).await.map_err(|c| anyhow!("reading SKU {sku_id}: {c}"))?;
        let sku = sku.with_context(|| format!("SKU {sku_id} is gone"))?;
        let ordered = asked.get(sku_id).copied().unwrap_or(0);
        let in_orders = tally.units_by_sku.get(sku_id).copied().unwrap_or(0);
        books.units_ordered += ordered;
        books.units_sold += sku.sold;
        books.units_reserved += sku.reserved;
        if sku.sold != ordered || in_orders != ordered || sku.reserved != 0 {
            failures.push(format!(
                "SKU {sku_id}: {} sold and {} reserved, {ordered} units ordered, {in_orders} in the orders",
                sku.sold, sku.reserved
            ));
        }
    }

    // Money: the buyers' debits, the merchants' settlement credits, the totals.
    for wallet in &fixture.wallets {
        let account = engine.account(wallet).await.map_err(|c| anyhow!("reading wallet {wallet}: {c}"))?;
        let balances = account.with_context(|| format!("wallet {wallet} is gone"))?.balances;
        books.wallet_debits_minor += balances.debits_posted;
        books.wallet_debits_pending_minor += balances.debits_pending;
    }
    for settle in &tally.settle_accounts {
        let account = engine.account(settle).await.map_err(|c| anyhow!("reading {settle}: {c}"))?;
        let balances = account.with_context(|| format!("settlement account {settle} is missing"))?.balances;
        books.settle_credits_minor += balances.credits_posted;
    }
    books.settle_accounts = tally.settle_accounts.len();
    if books.wallet_debits_minor != books.checkouts_total_minor
        || books.settle_credits_minor != books.checkouts_total_minor
        || books.wallet_debits_pending_minor != 0
    {
        failures.push(format!(
            "money: wallets debited {} (+{} pending), settlement accounts credited {}, checkouts total {}",
            books.wallet_debits_minor,
            books.wallet_debits_pending_minor,
            books.settle_credits_minor,
            books.checkouts_total_minor
        ));
    }

    // Coupons: each committed checkout's coupon used, by one transaction each.
    let coupon_ids: Vec<Id> = committed.iter().flat_map(|(i, _)| fixture.requests[*i].coupon_ids.clone()).collect();
    let mut txns = HashSet::new();
    for chunk in coupon_ids.chunks(1000) {
        for coupon in engine.coupons(chunk).await.map_err(|c| anyhow!("reading coupons: {c}"))? {
            match coupon.state {
                CouponState::Used { txn } if txns.insert(txn) => books.coupons_used += 1,
                state => failures.push(format!("coupon {}: {state:?} (or its transaction used another)", coupon.id)),
            }
        }
    }
    if books.coupons_used != coupon_ids.len() as u64 {
        failures.push(format!("{} coupons used once of {} committed checkouts", books.coupons_used, coupon_ids.len()));
    }

    // Limited promotions: within their limits, and given what the orders say.
    for (promotion_id, budget, usage_limit) in &fixture.limited {
        let found = engine.promotion(promotion_id).await.map_err(|c| anyhow!("reading {promotion_id}: {c}"))?;
        let (_, counters) = found.with_context(|| format!("promotion {promotion_id} is gone"))?;
        let in_orders = tally.discount_by_source.get(promotion_id).copied().unwrap_or(0);
        let within = budget.is_none_or(|b| counters.given + counters.reserved <= b)
            && usage_limit.is_none_or(|u| counters.uses + counters.reserved_uses <= u);
        if !within || counters.reserved != 0 || counters.given != in_orders {
            failures.push(format!(
                "promotion {promotion_id}: given {} + reserved {} (budget {budget:?}), {} uses (limit {usage_limit:?}), the orders carry {in_orders}",
                counters.given, counters.reserved, counters.uses
            ));
        }
        books.limited_promotions.push(PromotionBooks {
            id: promotion_id.to_string(),
            budget: *budget,
            given: counters.given,
            reserved: counters.reserved,
            uses: counters.uses,
            discount_in_orders: in_orders,
        });
    }
    if books.limited_promotions.iter().all(|p| p.uses == 0) && !committed.is_empty() {
        failures.push("no limited promotion was used: the budget branch was not exercised".to_string());
    }

    // Every call was answered, so nothing is in flight: the books must balance.
    let totals = engine.totals().await.map_err(|c| anyhow!("reading totals: {c}"))?;
    books.ledger_net = totals.net;
    books.clearing_net = totals.clearing_net;
    books.txns_in_flight = totals.txns_in_flight;
    books.accounts = totals.accounts;
    if totals.net != 0 || books.clearing_net != 0 || totals.txns_in_flight != 0 {
        failures.push(format!(
            "ledger: net {}, clearing {}, {} transactions in flight",
            totals.net, books.clearing_net, totals.txns_in_flight
        ));
    }
    Ok((books, failures))
}

/// Adds one checkout's view to the tally; what disagrees with its request
/// goes to the tally's failures.
fn tally_checkout(
    tally: &mut Tally,
    request: &CheckoutRequest,
    checkout_id: &Id,
    view: Option<(peakstack_engine::orders::Checkout, Vec<peakstack_engine::orders::Order>)>,
) {
    let Some((checkout, orders)) = view else {
        tally.failures.push(format!("checkout {checkout_id} committed but cannot be read"));
        return;
    };
    if checkout.state != CheckoutState::Completed || checkout.checkout.coupon_ids != request.coupon_ids {
        tally.failures.push(format!("checkout {checkout_id}: {:?}", checkout.state));
    }
    let mut units = 0u64;
    for order in &orders {
        let paid = order.state == OrderState::Paid
            && order.payment_state == PaymentState::Captured
            && order.amount_captured == order.order.total;
        if !paid {
            tally.failures.push(format!("order {}: {:?}, {:?}", order.order.id, order.state, order.payment_state));
        }
        tally.total_minor += u128::from(order.order.total);
        tally.settle_accounts.insert(order.order.settle_account_id.clone());
        for line in &order.order.lines {
            units += u64::from(line.quantity);
            *tally.units_by_sku.entry(line.sku_id.clone()).or_insert(0) += u64::from(line.quantity);
            for (source, discount) in &line.discounts {
                *tally.discount_by_source.entry(source.clone()).or_insert(0) += discount;
            }
        }
    }
    let asked: u64 = request.lines.iter().map(|l| u64::from(l.quantity)).sum();
    if orders.len() != MERCHANTS.len() || units != asked {
        tally.failures.push(format!("checkout {checkout_id}: {} orders of {units} units, {asked} asked", orders.len()));
    }
}

impl CheckoutBenchSummary {
    pub fn print_human(&self) {
        println!("checkouts     {} ({} refused{})", self.checkouts, self.refused, refusal_text(&self.refusals));
        println!("seconds       {:.2} (setup {:.1})", self.seconds, self.setup_seconds);
        println!("throughput    {:.0} checkouts/s", self.checkouts_per_s);
        println!(
            "latency       p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms ({} in flight)",
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.p999_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
            self.concurrency
        );
        println!(
            "layout        {} shards on {} executors, {} buyers, {} promotions, carts of {LINES_PER_CART} lines from 2 merchants with a coupon",
            self.shards, self.executors, self.buyers, self.promotions
        );
        println!("durability    {} fsyncs, {:.1} MiB of log", self.fsyncs, self.log_mib);
        println!("memory        {:.0} MiB resident", self.rss_mib);
        if !self.cpu_us_per_checkout.is_empty() {
            let total: f64 = self.cpu_us_per_checkout.values().sum();
            let threads: Vec<String> =
                self.cpu_us_per_checkout.iter().map(|(name, us)| format!("{name} {us:.2}")).collect();
            println!("cpu           {total:.2} us per checkout ({})", threads.join(", "));
        }
        let b = &self.books;
        println!(
            "books         {} units ordered, {} sold, {} reserved; {} coupons used once",
            b.units_ordered, b.units_sold, b.units_reserved, b.coupons_used
        );
        println!(
            "money         checkouts {} = wallet debits {} = settlement credits {} ({} accounts)",
            b.checkouts_total_minor, b.wallet_debits_minor, b.settle_credits_minor, b.settle_accounts
        );
        for p in &b.limited_promotions {
            println!(
                "promotion     {}: given {} of budget {}, {} uses, orders carry {}",
                p.id,
                p.given,
                p.budget.map_or("none".to_string(), |b| b.to_string()),
                p.uses,
                p.discount_in_orders
            );
        }
        println!(
            "ledger        net {}, clearing {}, {} in flight, {} accounts",
            b.ledger_net, b.clearing_net, b.txns_in_flight, b.accounts
        );
        if self.invariants_ok {
            println!("invariants    ok");
        } else {
            println!("invariants    BROKEN: {}", self.failures.join("; "));
        }
    }
}

fn refusal_text(refusals: &BTreeMap<String, u64>) -> String {
    if refusals.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = refusals.iter().map(|(code, count)| format!("{code} {count}")).collect();
    format!(": {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carts_have_three_distinct_lines_from_two_merchants() {
        for index in 0..10_000 {
            let lines = cart_lines(index);
            let mut skus: Vec<u32> = lines.iter().map(|l| l.0).collect();
            skus.sort_unstable();
            skus.dedup();
            assert_eq!(skus.len(), LINES_PER_CART, "{lines:?}");
            let merchants: HashSet<&str> = lines.iter().map(|l| sku_merchant(l.0)).collect();
            assert_eq!(merchants.len(), 2, "{lines:?}");
            assert!(lines.iter().all(|l| (1..=2 * SKUS_PER_MERCHANT).contains(&l.0)));
            assert!(lines.iter().all(|l| (1..=MAX_LINE_UNITS).contains(&l.1)));
            let subtotal: u64 = lines.iter().map(|&(s, q)| sku_price_minor(s) * u64::from(q)).sum();
            assert!((COUPON_MIN_SPEND_MINOR..=MAX_CART_MINOR).contains(&subtotal), "{lines:?}");
        }
        assert_eq!(cart_lines(7), cart_lines(7), "a cart is the same in every run");
    }

    #[test]
    fn buyers_share_the_checkouts_out() {
        for (checkouts, buyers) in [(10, 3), (3, 10), (1, 1), (2000, 64)] {
            let shares: Vec<u64> = (0..buyers).map(|b| checkouts_of_buyer(checkouts, buyers, b)).collect();
            assert_eq!(shares.iter().sum::<u64>(), checkouts as u64);
            let expected: Vec<u64> =
                (0..buyers).map(|b| (0..checkouts).filter(|i| i % buyers == b).count() as u64).collect();
            assert_eq!(shares, expected);
        }
    }

    #[test]
    fn the_catalogue_is_valid_and_its_limits_outlast_any_run() {
        let mut limited = 0;
        for row in &CATALOGUE {
            let spec = PromotionSpec {
                id: id(row.name),
                currency: usd(),
                kind: row.kind,
                scope: scope(&row.scope),
                starts_at_ms: 0,
                ends_at_ms: DAY_MS,
                group: row.group.map(str::to_string),
                priority: row.priority,
                budget: row.budget,
                usage_limit: row.usage_limit,
                per_buyer_limit: row.per_buyer_limit,
            };
            let promotion = Promotion::new(spec).unwrap_or_else(|_| panic!("{} is not valid", row.name));
            limited += usize::from(promotion.is_limited());
            if let Some(budget) = row.budget {
                assert!(budget / MAX_CART_MINOR > MAX_CHECKOUTS as u64, "{}", row.name);
            }
            for limit in [row.usage_limit, row.per_buyer_limit].into_iter().flatten() {
                assert!(limit > MAX_CHECKOUTS as u64, "{}", row.name);
            }
        }
        assert_eq!(limited, 5);
        assert!(CATALOGUE.iter().filter(|r| r.budget.is_some()).count() >= 1);
    }
}
