//! `peakstack loadtest checkout`: whole checkouts over HTTP against a
//! running server, then the server's books checked against the answers.
//!
//! Setup (over HTTP with an admin key, ids unique to the run): a bank and
//! `wallets` buyer wallets (owned by `buyer:<id>`, debits must not exceed
//! credits) funded in batches; the catalogue of `bench checkout` (two
//! merchants' SKUs with ample stock, its 20 promotions, live from a minute
//! ago until an hour past the run); a coupon template and one coupon per
//! checkout the run may place (`checkouts`), issued to its buyer. Then
//! every worker sends `POST /v1/checkouts` for the next cart (3 lines from
//! 2 merchants, its coupon, automatic capture) until the duration is over
//! or every coupon is spent.
//!
//! Checks after: each SKU sold the units of the committed (201) checkouts
//! and holds nothing reserved; the wallets' debits add up to the 201
//! totals; as many coupons used as checkouts committed; every limited
//! promotion within its budget; the ledger balanced. A checkout of unknown
//! outcome (a 5xx, a lost connection) may have committed: the checks then
//! allow up to that many more.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    check_health, connect_workers, count_bar, judge_response, ledger_balanced, new_latency_histogram, new_run_id,
    open_endpoint, run_timed, snippet, validate_load, Endpoint, HttpConn, CURRENCY, DRAIN_GRACE, RECONNECT_BACKOFF,
    REQUEST_TIMEOUT, SETUP_ATTEMPTS, SETUP_CONCURRENCY,
};
use crate::bench_checkout::{
    cart_lines, checkouts_of_buyer, now_ms, PromotionRow, ScopeRow, CATALOGUE, COUPON_MIN_SPEND_MINOR,
    COUPON_OFF_MINOR, MAX_CART_MINOR, MAX_LINE_UNITS, SKUS_PER_MERCHANT,
};
use peakstack_engine::pricing::PromotionKind;

/// Coupons are issued in setup, one per checkout the run may place: this
/// bounds them (and the run's checkouts).
pub const MAX_CHECKOUTS: usize = 1_000_000;
/// Wallets are opened and read back one request each.
pub const MAX_WALLETS: usize = 1_000_000;
/// Funding transfers per `POST /v1/transfers/batch`.
const FUNDING_BATCH: usize = 1_000;
/// The catalogue is live from this long before the run...
const STARTED_AGO_MS: u64 = 60_000;
/// ... until this long after it would end.
const ENDS_AFTER_RUN_MS: u64 = 3_600_000;
/// SKUs of the catalogue: s1..s12.
const SKUS: u32 = 2 * SKUS_PER_MERCHANT;

#[derive(Debug, Clone)]
pub struct CheckoutLoadConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`. Loopback only.
    pub target: String,
    /// Workers, each with its own keep-alive connection.
    pub concurrency: usize,
    pub seconds: f64,
    /// Most checkouts to place (coupons issued in setup).
    pub checkouts: usize,
    /// Buyer wallets; checkout i is buyer i % wallets's.
    pub wallets: usize,
    pub json: bool,
    pub progress: bool,
    /// Sent as `Authorization: Bearer <key>`: an admin key (setup makes
    /// promotions over everything, a checkout names its buyer).
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckoutLoadSummary {
    pub run_id: String,
    /// Checkouts answered, whatever the answer.
    pub requests: u64,
    /// Answered 201.
    pub checkouts: u64,
    pub seconds: f64,
    pub checkouts_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Answers that were not 201, by problem code (`http_<status>` without
    /// one, `transport` for a lost request).
    pub errors: BTreeMap<String, u64>,
    pub unknown_outcomes: u64,
    pub wallets: usize,
    pub coupons_issued: usize,
    /// The 201 answers' totals, summed; and what the server's books say.
    pub answered_total_minor: u128,
    pub wallet_debits_minor: u128,
    pub units_ordered: u64,
    pub units_sold: u64,
    pub coupons_used: u64,
    pub ledger_balanced: bool,
    pub failures: Vec<String>,
    pub invariants_ok: bool,
}

impl CheckoutLoadSummary {
    pub fn print_human(&self) {
        print!("{}", self.human_text());
    }

    fn human_text(&self) -> String {
        let mut out = String::new();
        let _infallible = writeln!(
            out,
            "checkouts     {} committed of {} answered in {:.2} s: {:.1} checkouts/s",
            self.checkouts, self.requests, self.seconds, self.checkouts_per_s
        );
        let _infallible = writeln!(
            out,
            "latency       p50 {}, p99 {}, p99.9 {}, max {}",
            super::format_latency(self.p50_us),
            super::format_latency(self.p99_us),
            super::format_latency(self.p999_us),
            super::format_latency(self.max_us)
        );
        let errors: Vec<String> = self.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
        let _infallible = writeln!(
            out,
            "errors        {} ({} of unknown outcome)",
            if errors.is_empty() { "none".to_owned() } else { errors.join(", ") },
            self.unknown_outcomes
        );
        let _infallible = writeln!(
            out,
            "books         {} units ordered, {} sold; {} coupons used of {} issued; wallets debited {}, answers total {}; ledger {}",
            self.units_ordered,
            self.units_sold,
            self.coupons_used,
            self.coupons_issued,
            self.wallet_debits_minor,
            self.answered_total_minor,
            if self.ledger_balanced { "balanced" } else { "NOT balanced" }
        );
        if self.failures.is_empty() {
            let _infallible = writeln!(out, "invariants    ok");
        } else {
            let _infallible = writeln!(out, "invariants    VIOLATED: {}", self.failures.join("; "));
        }
        out
    }
}

pub async fn run_checkout(config: CheckoutLoadConfig) -> anyhow::Result<CheckoutLoadSummary> {
    let duration = validate(&config)?;
    let progress = config.progress && !config.json;
    let endpoint = open_endpoint(&config.target, config.api_key.as_deref()).await?;
    let mut probe = HttpConn::new(endpoint.clone());
    check_health(&mut probe).await?;
    let run_id = new_run_id();
    let names = Names { run_id: run_id.clone() };

    open_wallets(&endpoint, &mut probe, &names, &config, progress).await?;
    set_up_catalogue(&mut probe, &names, &config, duration).await?;
    let issue: Vec<(String, Bytes)> = (0..config.checkouts)
        .map(|index| {
            let path = format!("/v1/coupon-templates/{}/issue", names.template());
            (path, Bytes::from(format!("{{\"buyer_id\":\"{}\"}}", names.buyer(index % config.wallets))))
        })
        .collect();
    let answers = send_all(&endpoint, Method::POST, issue, progress, "issuing coupons").await?;
    let coupons = answers
        .iter()
        .map(|body| parse_id_answer(body).context("an issued coupon"))
        .collect::<anyhow::Result<Vec<String>>>()?;

    let conns = connect_workers(&endpoint, config.concurrency).await?;
    let context = Arc::new(CheckoutRun {
        uri: Uri::try_from(format!("{}/v1/checkouts", endpoint.base_path))?,
        names: names.clone(),
        wallets: config.wallets,
        coupons,
        next: AtomicUsize::new(0),
        requests_done: Arc::default(),
    });
    let worker_context = context.clone();
    let (per_worker, elapsed) =
        run_timed(conns, duration, progress, context.requests_done.clone(), move |_worker, conn, deadline| {
            checkout_worker(worker_context.clone(), conn, deadline)
        })
        .await?;
    let mut totals = CheckoutTotals::new();
    for worker_totals in per_worker {
        totals.merge(worker_totals)?;
    }
    if let Some(first_error) = &totals.first_error {
        eprintln!("loadtest: {} errors; first: {first_error}", totals.errors.values().sum::<u64>());
    }
    let seen = read_books(&endpoint, &mut probe, &names, &config, progress).await?;
    let failures = check_books(&totals, &seen);
    let seconds = elapsed.as_secs_f64();
    Ok(CheckoutLoadSummary {
        run_id,
        requests: totals.requests,
        checkouts: totals.committed,
        seconds,
        checkouts_per_s: if seconds > 0.0 { totals.committed as f64 / seconds } else { 0.0 },
        p50_us: totals.latency_us.value_at_quantile(0.5),
        p99_us: totals.latency_us.value_at_quantile(0.99),
        p999_us: totals.latency_us.value_at_quantile(0.999),
        max_us: totals.latency_us.max(),
        errors: totals.errors.clone(),
        unknown_outcomes: totals.unknown_outcomes,
        wallets: config.wallets,
        coupons_issued: config.checkouts,
        answered_total_minor: totals.total_minor,
        wallet_debits_minor: seen.wallet_debits_minor,
        units_ordered: totals.units_by_sku.iter().sum(),
        units_sold: seen.sold_by_sku.iter().sum(),
        coupons_used: seen.coupons_used,
        ledger_balanced: seen.ledger_balanced,
        invariants_ok: failures.is_empty(),
        failures,
    })
}

fn validate(config: &CheckoutLoadConfig) -> anyhow::Result<Duration> {
    let duration = validate_load(config.concurrency, config.seconds)?;
    if !(1..=MAX_CHECKOUTS).contains(&config.checkouts) {
        bail!("--checkouts must be between 1 and {MAX_CHECKOUTS}, got {}", config.checkouts);
    }
    if !(1..=MAX_WALLETS).contains(&config.wallets) {
        bail!("--accounts (buyer wallets) must be between 1 and {MAX_WALLETS}, got {}", config.wallets);
    }
    Ok(duration)
}

// ---------------------------------------------------------------------------
// Names. Hex run ids, digits and dashes only: no body or path needs escaping.

#[derive(Clone)]
struct Names {
    run_id: String,
}

impl Names {
    fn bank(&self) -> String {
        format!("lt-{}-bank", self.run_id)
    }
    fn wallet(&self, buyer: usize) -> String {
        format!("lt-{}-w{buyer}", self.run_id)
    }
    fn buyer(&self, buyer: usize) -> String {
        format!("lt-{}-b{buyer}", self.run_id)
    }
    fn sku(&self, n: u32) -> String {
        format!("lt-{}-s{n}", self.run_id)
    }
    fn merchant(&self, name: &str) -> String {
        format!("lt-{}-{name}", self.run_id)
    }
    fn promotion(&self, name: &str) -> String {
        format!("lt-{}-{name}", self.run_id)
    }
    fn template(&self) -> String {
        format!("lt-{}-t1", self.run_id)
    }
}

/// The body of checkout `index`: its cart, its buyer's coupon and wallet.
fn checkout_body(names: &Names, index: usize, wallets: usize, coupon: &str) -> String {
    let buyer = index % wallets;
    let mut out = String::with_capacity(320);
    let _infallible = write!(out, "{{\"buyer_id\":\"{}\",\"lines\":[", names.buyer(buyer));
    for (at, (sku, quantity)) in cart_lines(index as u64).iter().enumerate() {
        if at > 0 {
            out.push(',');
        }
        let _infallible = write!(out, "{{\"sku_id\":\"{}\",\"quantity\":{quantity}}}", names.sku(*sku));
    }
    let coupon = serde_json::to_string(coupon).unwrap_or_default();
    let _infallible = write!(
        out,
        "],\"coupon_ids\":[{coupon}],\"payment\":{{\"account_id\":\"{}\",\"capture\":\"automatic\"}}}}",
        names.wallet(buyer)
    );
    out
}

// ---------------------------------------------------------------------------
// Setup

#[derive(Deserialize)]
struct IdAnswer {
    id: String,
}

fn parse_id_answer(body: &[u8]) -> anyhow::Result<String> {
    let answer: IdAnswer = serde_json::from_slice(body).with_context(|| format!("no id in {}", snippet(body)))?;
    Ok(answer.id)
}

/// Sends every request (path, body), [`SETUP_CONCURRENCY`] at a time, each
/// retried on a transport error; every answer must be 200 or 201. The
/// answers' bodies, in order.
async fn send_all(
    endpoint: &Arc<Endpoint>,
    method: Method,
    requests: Vec<(String, Bytes)>,
    progress: bool,
    label: &'static str,
) -> anyhow::Result<Vec<Bytes>> {
    let count = requests.len();
    let bar = count_bar(progress, count, label);
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY.min(count) {
        let (mut conn, requests, next, bar) =
            (HttpConn::new(endpoint.clone()), requests.clone(), next.clone(), bar.clone());
        let method = method.clone();
        tasks.spawn(async move {
            let mut answers = Vec::new();
            // Bounded: every iteration claims a distinct request.
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, body)) = requests.get(index) else { return Ok::<_, anyhow::Error>(answers) };
                let uri = Uri::try_from(format!("{}{path}", conn.endpoint.base_path))?;
                let mut last_error = None;
                for _attempt in 0..SETUP_ATTEMPTS {
                    let give_up_at = Instant::now() + REQUEST_TIMEOUT;
                    match conn.request_until(method.clone(), uri.clone(), body.clone(), give_up_at).await {
                        Ok((StatusCode::OK | StatusCode::CREATED, answer)) => {
                            answers.push((index, answer));
                            last_error = None;
                            break;
                        }
                        Ok((status, answer)) => bail!("{method} {path}: HTTP {status}: {}", snippet(&answer)),
                        Err(error) => last_error = Some(error),
                    }
                }
                if let Some(error) = last_error {
                    return Err(error);
                }
                bar.inc(1);
            }
        });
    }
    let mut answers = vec![Bytes::new(); count];
    while let Some(joined) = tasks.join_next().await {
        for (index, answer) in joined.context("a setup task panicked")?.with_context(|| format!("{label} failed"))? {
            answers[index] = answer;
        }
    }
    bar.finish_and_clear();
    Ok(answers)
}

async fn open_wallets(
    endpoint: &Arc<Endpoint>,
    probe: &mut HttpConn,
    names: &Names,
    config: &CheckoutLoadConfig,
    progress: bool,
) -> anyhow::Result<()> {
    let bank = serde_json::json!({"id": names.bank(), "currency": CURRENCY});
    post_one(probe, "/v1/accounts", bank.to_string()).await.context("opening the bank account")?;
    let wallets: Vec<(String, Bytes)> = (0..config.wallets)
        .map(|buyer| {
            let body = serde_json::json!({
                "id": names.wallet(buyer),
                "currency": CURRENCY,
                "flags": ["debits_must_not_exceed_credits"],
                "owner": format!("buyer:{}", names.buyer(buyer)),
            });
            ("/v1/accounts".to_owned(), Bytes::from(body.to_string()))
        })
        .collect();
    send_all(endpoint, Method::POST, wallets, progress, "opening wallets").await?;
    let buyers: Vec<usize> = (0..config.wallets).collect();
    let batches: Vec<(String, Bytes)> = buyers
        .chunks(FUNDING_BATCH)
        .map(|chunk| {
            let transfers: Vec<serde_json::Value> = chunk
                .iter()
                .map(|&buyer| {
                    let amount = checkouts_of_buyer(config.checkouts, config.wallets, buyer).max(1) * MAX_CART_MINOR;
                    serde_json::json!({
                        "id": format!("lt-{}-f{buyer}", names.run_id),
                        "debit_account_id": names.bank(),
                        "credit_account_id": names.wallet(buyer),
                        "amount": amount,
                        "currency": CURRENCY,
                    })
                })
                .collect();
            let body = serde_json::json!({"transfers": transfers, "atomic": false});
            ("/v1/transfers/batch".to_owned(), Bytes::from(body.to_string()))
        })
        .collect();
    let expected: Vec<u64> = buyers.chunks(FUNDING_BATCH).map(|chunk| chunk.len() as u64).collect();
    let answers = send_all(endpoint, Method::POST, batches, progress, "funding wallets").await?;
    for (answer, expected) in answers.iter().zip(expected) {
        let (funded, detail) = judge_response(true, expected, StatusCode::OK, answer, true);
        if funded != expected {
            bail!("funding wallets: {funded} of {expected} transfers made: {}", detail.unwrap_or_default());
        }
    }
    Ok(())
}

fn kind_json(kind: &PromotionKind) -> serde_json::Value {
    match *kind {
        PromotionKind::PercentOff { percent } => serde_json::json!({"type": "percent_off", "percent": percent}),
        PromotionKind::AmountOff { amount } => serde_json::json!({"type": "amount_off", "amount": amount}),
        PromotionKind::SpendThreshold { threshold, off, stepwise } => {
            serde_json::json!({"type": "spend_threshold", "threshold": threshold, "off": off, "stepwise": stepwise})
        }
        PromotionKind::BuyXGetY { buy, get } => serde_json::json!({"type": "buy_x_get_y", "buy": buy, "get": get}),
    }
}

/// A promotion's body for this run; with no scope an admin key's
/// promotion covers everything.
fn promotion_body(names: &Names, row: &PromotionRow, starts_at: &str, ends_at: &str) -> serde_json::Value {
    let mut body = serde_json::json!({
        "id": names.promotion(row.name),
        "currency": CURRENCY,
        "kind": kind_json(&row.kind),
        "starts_at": starts_at,
        "ends_at": ends_at,
        "priority": row.priority,
    });
    match row.scope {
        ScopeRow::Skus(skus) => {
            body["scope"] = serde_json::json!({"sku_ids": skus.iter().map(|n| names.sku(*n)).collect::<Vec<_>>()})
        }
        ScopeRow::Merchant(merchant) => body["scope"] = serde_json::json!({"merchant_id": names.merchant(merchant)}),
        ScopeRow::Everything => {}
    }
    // Group names are per run too: another run's exclusive group is not this one's.
    if let Some(group) = row.group {
        body["group"] = serde_json::json!(format!("{}-{group}", names.run_id));
    }
    for (field, value) in
        [("budget", row.budget), ("usage_limit", row.usage_limit), ("per_buyer_limit", row.per_buyer_limit)]
    {
        if let Some(value) = value {
            body[field] = serde_json::json!(value);
        }
    }
    body
}

async fn set_up_catalogue(
    probe: &mut HttpConn,
    names: &Names,
    config: &CheckoutLoadConfig,
    duration: Duration,
) -> anyhow::Result<()> {
    let stock = config.checkouts as u64 * u64::from(MAX_LINE_UNITS);
    for n in 1..=SKUS {
        let sku = serde_json::json!({
            "id": names.sku(n),
            "merchant_id": names.merchant(crate::bench_checkout::sku_merchant(n)),
            "title": format!("loadtest checkout SKU {n}"),
            "price": crate::bench_checkout::sku_price_minor(n),
            "currency": CURRENCY,
            "stock": stock,
        });
        post_one(probe, "/v1/skus", sku.to_string()).await.with_context(|| format!("creating SKU {n}"))?;
    }
    let now = now_ms();
    let run_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let starts_at = peakstack_server::rfc3339(now.saturating_sub(STARTED_AGO_MS));
    let ends_at = peakstack_server::rfc3339(now.saturating_add(run_ms).saturating_add(ENDS_AFTER_RUN_MS));
    for row in &CATALOGUE {
        let body = promotion_body(names, row, &starts_at, &ends_at);
        post_one(probe, "/v1/promotions", body.to_string())
            .await
            .with_context(|| format!("creating promotion {}", row.name))?;
    }
    let template = serde_json::json!({
        "id": names.template(),
        "currency": CURRENCY,
        "discount": {"type": "amount_off", "amount": COUPON_OFF_MINOR},
        "min_spend": COUPON_MIN_SPEND_MINOR,
        "valid_from": starts_at,
        "valid_until": ends_at,
        "total_issue": config.checkouts,
    });
    post_one(probe, "/v1/coupon-templates", template.to_string()).await.context("creating the coupon template")?;
    Ok(())
}

/// One setup request, answered 201 (or 200: made already, the same).
async fn post_one(conn: &mut HttpConn, path: &str, body: String) -> anyhow::Result<Bytes> {
    let uri = Uri::try_from(format!("{}{path}", conn.endpoint.base_path))?;
    let (status, answer) =
        conn.request_until(Method::POST, uri, Bytes::from(body), Instant::now() + REQUEST_TIMEOUT).await?;
    if !matches!(status, StatusCode::CREATED | StatusCode::OK) {
        bail!("POST {path}: HTTP {status}: {}", snippet(&answer));
    }
    Ok(answer)
}

// ---------------------------------------------------------------------------
// Timed phase

struct CheckoutRun {
    uri: Uri,
    names: Names,
    wallets: usize,
    /// One per checkout, in index order.
    coupons: Vec<String>,
    next: AtomicUsize,
    requests_done: Arc<AtomicU64>,
}

/// What a checkout's answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// 201, with its total.
    Committed { total_minor: u64 },
    /// Refused (a 4xx) with its code: nothing happened.
    Refused(String),
    /// May have committed, or not (a 5xx, an unreadable 201).
    Unknown(String),
}

#[derive(Deserialize)]
struct Problem<'a> {
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Committed {
    #[allow(dead_code)]
    id: String,
    total: u64,
}

fn judge_checkout(status: StatusCode, body: &[u8]) -> Outcome {
    let code = || match serde_json::from_slice::<Problem>(body).ok().and_then(|p| p.code) {
        Some(code) => code.into_owned(),
        None => format!("http_{}", status.as_u16()),
    };
    match status {
        StatusCode::CREATED => match serde_json::from_slice::<Committed>(body) {
            Ok(answer) => Outcome::Committed { total_minor: answer.total },
            Err(_) => Outcome::Unknown("unreadable_201".to_owned()),
        },
        status if status.is_client_error() => Outcome::Refused(code()),
        _ => Outcome::Unknown(code()),
    }
}

struct CheckoutTotals {
    requests: u64,
    committed: u64,
    total_minor: u128,
    /// Units of the committed checkouts, per SKU number - 1.
    units_by_sku: [u64; SKUS as usize],
    errors: BTreeMap<String, u64>,
    unknown_outcomes: u64,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

impl CheckoutTotals {
    fn new() -> CheckoutTotals {
        CheckoutTotals {
            requests: 0,
            committed: 0,
            total_minor: 0,
            units_by_sku: [0; SKUS as usize],
            errors: BTreeMap::new(),
            unknown_outcomes: 0,
            latency_us: new_latency_histogram(),
            first_error: None,
        }
    }

    fn count(&mut self, index: usize, outcome: Outcome) {
        match outcome {
            Outcome::Committed { total_minor } => {
                self.committed += 1;
                self.total_minor += u128::from(total_minor);
                for (sku, quantity) in cart_lines(index as u64) {
                    self.units_by_sku[sku as usize - 1] += u64::from(quantity);
                }
            }
            Outcome::Refused(code) => *self.errors.entry(code).or_insert(0) += 1,
            Outcome::Unknown(code) => {
                self.unknown_outcomes += 1;
                *self.errors.entry(code).or_insert(0) += 1;
            }
        }
    }

    fn merge(&mut self, other: CheckoutTotals) -> anyhow::Result<()> {
        self.requests += other.requests;
        self.committed += other.committed;
        self.total_minor += other.total_minor;
        for (mine, theirs) in self.units_by_sku.iter_mut().zip(other.units_by_sku) {
            *mine += theirs;
        }
        for (code, count) in other.errors {
            *self.errors.entry(code).or_insert(0) += count;
        }
        self.unknown_outcomes += other.unknown_outcomes;
        self.latency_us.add(&other.latency_us).map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

async fn checkout_worker(context: Arc<CheckoutRun>, mut conn: HttpConn, deadline: Instant) -> CheckoutTotals {
    let mut totals = CheckoutTotals::new();
    let give_up_at = deadline + DRAIN_GRACE;
    // Bounded by the deadline and by the coupons: every iteration claims a
    // distinct checkout, and none starts after `deadline`.
    while Instant::now() < deadline {
        let index = context.next.fetch_add(1, Ordering::Relaxed);
        let Some(coupon) = context.coupons.get(index) else { break };
        let body = Bytes::from(checkout_body(&context.names, index, context.wallets, coupon));
        let started = Instant::now();
        match conn.request_until(Method::POST, context.uri.clone(), body, give_up_at).await {
            Ok((status, body)) => {
                totals.latency_us.saturating_record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                totals.requests += 1;
                context.requests_done.fetch_add(1, Ordering::Relaxed);
                let outcome = judge_checkout(status, &body);
                if !matches!(outcome, Outcome::Committed { .. }) && totals.first_error.is_none() {
                    totals.first_error = Some(format!("HTTP {status}: {}", snippet(&body)));
                }
                totals.count(index, outcome);
            }
            Err(error) => {
                totals.count(index, Outcome::Unknown("transport".to_owned()));
                if totals.first_error.is_none() {
                    totals.first_error = Some(format!("{error:#}"));
                }
                tokio::time::sleep_until((Instant::now() + RECONNECT_BACKOFF).min(deadline)).await;
            }
        }
    }
    totals
}

// ---------------------------------------------------------------------------
// The books

/// What the server showed after the run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SeenBooks {
    /// Per SKU number - 1.
    sold_by_sku: Vec<u64>,
    reserved_by_sku: Vec<u64>,
    wallet_debits_minor: u128,
    wallet_debits_pending_minor: u128,
    coupons_used: u64,
    /// (promotion, given, reserved, budget) of the limited promotions.
    promotions: Vec<(String, u64, u64, Option<u64>)>,
    ledger_balanced: bool,
}

#[derive(Deserialize)]
struct SkuRow {
    sold: u64,
    reserved: u64,
}

#[derive(Deserialize)]
struct WalletRow {
    #[serde(deserialize_with = "super::digits")]
    debits_posted: u128,
    #[serde(deserialize_with = "super::digits")]
    debits_pending: u128,
}

#[derive(Deserialize)]
struct CouponRows<'a> {
    #[serde(borrow)]
    data: Vec<CouponRow<'a>>,
}

#[derive(Deserialize)]
struct CouponRow<'a> {
    #[serde(borrow)]
    template_id: Cow<'a, str>,
    #[serde(borrow)]
    state: Cow<'a, str>,
}

#[derive(Deserialize)]
struct PromotionRowJson {
    given: u64,
    reserved: u64,
    budget: Option<u64>,
}

async fn read_books(
    endpoint: &Arc<Endpoint>,
    probe: &mut HttpConn,
    names: &Names,
    config: &CheckoutLoadConfig,
    progress: bool,
) -> anyhow::Result<SeenBooks> {
    let mut seen = SeenBooks::default();
    let skus: Vec<(String, Bytes)> = (1..=SKUS).map(|n| (format!("/v1/skus/{}", names.sku(n)), Bytes::new())).collect();
    for answer in send_all(endpoint, Method::GET, skus, false, "reading SKUs").await? {
        let row: SkuRow = serde_json::from_slice(&answer).with_context(|| format!("a SKU: {}", snippet(&answer)))?;
        seen.sold_by_sku.push(row.sold);
        seen.reserved_by_sku.push(row.reserved);
    }
    let wallets: Vec<(String, Bytes)> =
        (0..config.wallets).map(|b| (format!("/v1/accounts/{}", names.wallet(b)), Bytes::new())).collect();
    for answer in send_all(endpoint, Method::GET, wallets, progress, "reading wallets").await? {
        let row: WalletRow =
            serde_json::from_slice(&answer).with_context(|| format!("a wallet: {}", snippet(&answer)))?;
        seen.wallet_debits_minor += row.debits_posted;
        seen.wallet_debits_pending_minor += row.debits_pending;
    }
    let coupons: Vec<(String, Bytes)> =
        (0..config.wallets).map(|b| (format!("/v1/coupons?buyer_id={}", names.buyer(b)), Bytes::new())).collect();
    let template = names.template();
    for answer in send_all(endpoint, Method::GET, coupons, progress, "reading coupons").await? {
        let rows: CouponRows =
            serde_json::from_slice(&answer).with_context(|| format!("coupons: {}", snippet(&answer)))?;
        seen.coupons_used += rows.data.iter().filter(|c| c.template_id == template && c.state == "used").count() as u64;
    }
    for row in CATALOGUE.iter().filter(|r| r.budget.is_some() || r.usage_limit.is_some() || r.per_buyer_limit.is_some())
    {
        let id = names.promotion(row.name);
        let path = format!("/v1/promotions/{id}");
        let uri = Uri::try_from(format!("{}{path}", endpoint.base_path))?;
        let (status, answer) =
            probe.request_until(Method::GET, uri, Bytes::new(), Instant::now() + REQUEST_TIMEOUT).await?;
        if status != StatusCode::OK {
            bail!("GET {path}: HTTP {status}: {}", snippet(&answer));
        }
        let promotion: PromotionRowJson = serde_json::from_slice(&answer).with_context(|| format!("GET {path}"))?;
        seen.promotions.push((id, promotion.given, promotion.reserved, promotion.budget));
    }
    seen.ledger_balanced = ledger_balanced(probe).await?;
    Ok(seen)
}

/// Every way the server's books disagree with the answers, in words.
fn check_books(totals: &CheckoutTotals, seen: &SeenBooks) -> Vec<String> {
    let mut failures = Vec::new();
    let unknown = totals.unknown_outcomes;
    for (at, ordered) in totals.units_by_sku.iter().enumerate() {
        let sold = seen.sold_by_sku.get(at).copied().unwrap_or(0);
        let reserved = seen.reserved_by_sku.get(at).copied().unwrap_or(0);
        let most = ordered + unknown * u64::from(MAX_LINE_UNITS);
        if !(*ordered..=most).contains(&sold) || reserved != 0 {
            failures.push(format!(
                "SKU s{}: {sold} sold and {reserved} reserved, the 201 answers ordered {ordered} ({unknown} unknown)",
                at + 1
            ));
        }
    }
    let answered = totals.total_minor;
    let debited = seen.wallet_debits_minor;
    let most = answered + u128::from(unknown) * u128::from(MAX_CART_MINOR);
    if !(answered..=most).contains(&debited) || seen.wallet_debits_pending_minor != 0 {
        failures.push(format!(
            "wallets debited {debited} (+{} pending), the 201 answers total {answered} ({unknown} unknown)",
            seen.wallet_debits_pending_minor
        ));
    }
    if !(totals.committed..=totals.committed + unknown).contains(&seen.coupons_used) {
        failures.push(format!(
            "{} coupons used, {} checkouts committed ({unknown} unknown)",
            seen.coupons_used, totals.committed
        ));
    }
    for (id, given, reserved, budget) in &seen.promotions {
        if budget.is_some_and(|b| given + reserved > b) || *reserved != 0 {
            failures.push(format!("promotion {id}: given {given} + reserved {reserved} of budget {budget:?}"));
        }
    }
    if !seen.ledger_balanced {
        failures.push("the ledger does not balance".to_owned());
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_checkout::LINES_PER_CART;
    use peakstack_domain::INLINE_ID_LEN;

    fn names() -> Names {
        Names { run_id: format!("{:08x}", u32::MAX) }
    }

    #[test]
    fn checkout_bodies_follow_the_contract() {
        let names = names();
        let body = checkout_body(&names, 12_345, 1_000, "cpn_3_17");
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["buyer_id"], names.buyer(345));
        assert_eq!(parsed["coupon_ids"], serde_json::json!(["cpn_3_17"]));
        assert_eq!(parsed["payment"], serde_json::json!({"account_id": names.wallet(345), "capture": "automatic"}));
        let lines = parsed["lines"].as_array().unwrap();
        assert_eq!(lines.len(), LINES_PER_CART);
        for (line, (sku, quantity)) in lines.iter().zip(cart_lines(12_345)) {
            assert_eq!(line["sku_id"], names.sku(sku));
            assert_eq!(line["quantity"], quantity);
        }
        for id in [names.wallet(MAX_WALLETS - 1), names.buyer(MAX_WALLETS - 1), names.sku(SKUS), names.template()] {
            assert!(id.len() <= INLINE_ID_LEN, "{id} is longer than {INLINE_ID_LEN} bytes");
        }
    }

    #[test]
    fn judges_checkout_answers() {
        let problem = |code: &str| format!(r#"{{"type":"about:blank","status":422,"code":"{code}","detail":"x"}}"#);
        let committed = r#"{"id":"chk_1_2","state":"completed","total":4321,"orders":[],"payment":{"id":"pay_1_2"}}"#;
        let cases: [(u16, String, Outcome); 7] = [
            (201, committed.to_owned(), Outcome::Committed { total_minor: 4321 }),
            (201, "{}".to_owned(), Outcome::Unknown("unreadable_201".to_owned())),
            (422, problem("out_of_stock"), Outcome::Refused("out_of_stock".to_owned())),
            (409, problem("coupon_already_used"), Outcome::Refused("coupon_already_used".to_owned())),
            (404, "not json".to_owned(), Outcome::Refused("http_404".to_owned())),
            (503, problem("deadline_exceeded"), Outcome::Unknown("deadline_exceeded".to_owned())),
            (500, String::new(), Outcome::Unknown("http_500".to_owned())),
        ];
        for (status, body, expected) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(judge_checkout(status, body.as_bytes()), expected, "{status} {body}");
        }
    }

    #[test]
    fn promotion_bodies_carry_the_catalogue() {
        let names = names();
        let bodies: Vec<serde_json::Value> = CATALOGUE
            .iter()
            .map(|row| promotion_body(&names, row, "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"))
            .collect();
        assert_eq!(bodies[0]["scope"], serde_json::json!({"sku_ids": [names.sku(1), names.sku(2)]}));
        assert_eq!(bodies[1]["scope"], serde_json::json!({"merchant_id": names.merchant("m1")}));
        assert_eq!(bodies[1]["group"], format!("{}-m1-store", names.run_id));
        assert!(bodies[6].get("scope").is_none(), "everything: no scope");
        assert_eq!(
            bodies[3]["kind"],
            serde_json::json!({"type": "spend_threshold", "threshold": 10_000, "off": 1_000, "stepwise": true})
        );
        assert!(bodies.iter().filter(|b| b.get("budget").is_some()).count() >= 1);
        assert!(bodies.iter().all(|b| b["id"].as_str().unwrap().starts_with("lt-ffffffff-p")));
    }

    fn books(sold: u64, debited: u128, coupons_used: u64) -> SeenBooks {
        let mut sold_by_sku = vec![0; SKUS as usize];
        sold_by_sku[0] = sold;
        SeenBooks {
            sold_by_sku,
            reserved_by_sku: vec![0; SKUS as usize],
            wallet_debits_minor: debited,
            wallet_debits_pending_minor: 0,
            coupons_used,
            promotions: vec![("p06".to_owned(), 10, 0, Some(100))],
            ledger_balanced: true,
        }
    }

    fn answered(units: u64, total: u128, committed: u64, unknown: u64) -> CheckoutTotals {
        let mut totals = CheckoutTotals::new();
        totals.units_by_sku[0] = units;
        totals.total_minor = total;
        totals.committed = committed;
        totals.unknown_outcomes = unknown;
        totals
    }

    #[test]
    fn checks_the_books() {
        assert_eq!(check_books(&answered(5, 900, 2, 0), &books(5, 900, 2)), Vec::<String>::new());
        // A unit sold, money debited or a coupon used that no answer knows of.
        assert_eq!(check_books(&answered(5, 900, 2, 0), &books(6, 900, 2)).len(), 1);
        assert_eq!(check_books(&answered(5, 900, 2, 0), &books(5, 901, 2)).len(), 1);
        assert_eq!(check_books(&answered(5, 900, 2, 0), &books(5, 900, 3)).len(), 1);
        // ... unless an answer was lost.
        assert_eq!(check_books(&answered(5, 900, 2, 1), &books(6, 1000, 3)), Vec::<String>::new());
        // Less than the answers said is wrong whatever was lost.
        assert_eq!(check_books(&answered(5, 900, 2, 1), &books(4, 800, 1)).len(), 3);
        // A budget overspent, something left reserved, an unbalanced ledger.
        let mut broken = books(5, 900, 2);
        broken.promotions.push(("p12".to_owned(), 101, 0, Some(100)));
        broken.reserved_by_sku[3] = 1;
        broken.ledger_balanced = false;
        assert_eq!(check_books(&answered(5, 900, 2, 0), &broken).len(), 3);
    }

    #[test]
    fn validates_config() {
        let good = CheckoutLoadConfig {
            target: "http://127.0.0.1:1".to_owned(),
            concurrency: 4,
            seconds: 1.0,
            checkouts: 100,
            wallets: 10,
            json: false,
            progress: false,
            api_key: None,
        };
        assert!(validate(&good).is_ok());
        for bad in [
            CheckoutLoadConfig { checkouts: 0, ..good.clone() },
            CheckoutLoadConfig { checkouts: MAX_CHECKOUTS + 1, ..good.clone() },
            CheckoutLoadConfig { wallets: 0, ..good.clone() },
            CheckoutLoadConfig { concurrency: 0, ..good.clone() },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
