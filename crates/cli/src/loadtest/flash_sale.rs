//! `peakstack loadtest flash-sale`: buyers race over HTTP for the units of
//! one flash sale, then the server's books are checked against what the
//! answers said.
//!
//! Setup (over HTTP, ids unique to the run): a SKU of `stock` units and a
//! sale of all of them, live from a minute ago until an hour past the run,
//! `per_buyer_limit` units per buyer, a day to pay (so no reservation
//! expires and gives its unit back before the books are read). Then every
//! worker sends `POST /v1/flash-sales/{id}/attempts` for random buyers out
//! of `buyers`, one unit each.
//!
//! What it reports besides the overall rate: the rate and latency of the
//! attempts answered after the sale sold out. The earliest `sold_out`
//! answer marks the switch; after it every attempt should be refused by the
//! sale's gate from memory, so that phase measures the server's hot path
//! for losers (HTTP, access, the POST guard, JSON, the gate) with no fsync
//! in it. It is compared with `GET /healthz` at the same concurrency, run
//! right after the attempts: `sold_out_to_healthz_ratio`.
//!
//! Counting rules: `attempts` are the attempts answered, whatever the
//! answer; `errors` the answers that are none of won (201), `sold_out` and
//! `purchase_limit_exceeded` (422), plus attempts lost to a transport
//! error. Of those, `unknown_outcomes` may have won without our knowing (a
//! 5xx such as 503 `deadline_exceeded`, a lost connection): the books may
//! then hold up to that many units more than `won`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    check_health, connect_workers, fresh_idempotency_key, new_latency_histogram, new_run_id, open_endpoint,
    run_scenario, run_timed, snippet, validate_load, HttpConn, RunContext, Scenario, CURRENCY, DRAIN_GRACE,
    RECONNECT_BACKOFF, REQUEST_TIMEOUT,
};

/// Winners are tracked per buyer on this side: the stock bounds that map.
pub const MAX_STOCK: u64 = 10_000_000;
/// Buyers are drawn, never created, so many cost nothing; the bound keeps
/// their ids within [`peakstack_domain::INLINE_ID_LEN`] bytes.
pub const MAX_BUYERS: u32 = 100_000_000;
pub const MAX_PER_BUYER_LIMIT: u32 = 1_000_000;
/// How long `GET /healthz` is measured after the attempts (at most the
/// run's `--seconds`).
const HEALTHZ_SECONDS: f64 = 3.0;
/// The sale started this long before the run, so a clock a little ahead on
/// the server's side still finds it live.
const STARTED_AGO_MS: u64 = 60_000;
/// The sale ends this long after the run would.
const ENDS_AFTER_RUN_MS: u64 = 3_600_000;
/// The longest a reservation may wait for its payment: a day.
const PAY_WITHIN_SECONDS: u64 = 86_400;
const SKU_PRICE_MINOR: u64 = 99_900;
const SALE_PRICE_MINOR: u64 = 100;
/// The acceptance criterion for `sold_out_to_healthz_ratio`; printed
/// beside the ratio, never enforced.
const TARGET_RATIO: f64 = 0.60;

#[derive(Debug, Clone)]
pub struct FlashSaleLoadConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`. Loopback only.
    pub target: String,
    /// Workers, each with its own keep-alive connection.
    pub concurrency: usize,
    /// Length of the attempts phase.
    pub seconds: f64,
    /// Units of the SKU, all of them on the sale.
    pub stock: u64,
    pub per_buyer_limit: u32,
    /// Buyers are drawn uniformly from this many.
    pub buyers: u32,
    pub json: bool,
    /// Show progress bars on stderr (pass true only when it is a terminal).
    pub progress: bool,
    /// Sent as `Authorization: Bearer <key>`: an admin key (an attempt
    /// names its buyer in the body, which only an admin key may).
    pub api_key: Option<String>,
    /// Send a fresh `Idempotency-Key` with every attempt.
    pub idempotency_keys: bool,
}

/// A rate and its latencies over one stretch of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub requests: u64,
    pub seconds: f64,
    pub per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Rate {
    fn of(latency_us: &Histogram<u64>, requests: u64, seconds: f64) -> Rate {
        Rate {
            requests,
            seconds,
            per_s: if seconds > 0.0 { requests as f64 / seconds } else { 0.0 },
            p50_us: latency_us.value_at_quantile(0.5),
            p99_us: latency_us.value_at_quantile(0.99),
            p999_us: latency_us.value_at_quantile(0.999),
            max_us: latency_us.max(),
        }
    }

    fn human_text(&self, unit: &str) -> String {
        format!(
            "{} {unit} in {:.2} s ({:.1}/s); p50 {}, p99 {}, p99.9 {}, max {}",
            self.requests,
            self.seconds,
            self.per_s,
            super::format_latency(self.p50_us),
            super::format_latency(self.p99_us),
            super::format_latency(self.p999_us),
            super::format_latency(self.max_us),
        )
    }
}

/// The sale's and the SKU's counters as the server showed them after the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SaleBooks {
    pub quantity: u64,
    pub remaining: u64,
    pub sold: u64,
    pub reserved: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SkuBooks {
    pub stock: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub on_flash_sale: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlashSaleLoadSummary {
    pub flash_sale_id: String,
    pub sku_id: String,
    pub stock: u64,
    pub per_buyer_limit: u32,
    pub buyers: u32,
    /// Attempts answered, and their rate and latency over the whole phase.
    pub attempts: Rate,
    pub won: u64,
    pub sold_out: u64,
    pub limit_refusals: u64,
    pub errors: u64,
    pub unknown_outcomes: u64,
    /// Seconds from the start to the first `sold_out` answer; `None` when
    /// the sale did not sell out.
    pub sold_out_after_s: Option<f64>,
    /// The attempts answered from then on.
    pub sold_out_phase: Option<Rate>,
    pub healthz: Rate,
    /// `sold_out_phase.per_s / healthz.per_s`.
    pub sold_out_to_healthz_ratio: Option<f64>,
    pub sale: SaleBooks,
    pub sku: SkuBooks,
    pub buyers_past_limit: u64,
    /// Every check that failed, in words; empty when the books agree.
    pub failures: Vec<String>,
    pub invariants_ok: bool,
    pub idempotency_keys: bool,
}

impl FlashSaleLoadSummary {
    pub fn print_human(&self) {
        print!("{}", self.human_text());
    }

    fn human_text(&self) -> String {
        let mut out = String::new();
        let _infallible = writeln!(
            out,
            "flash sale    {}: {} units of SKU {}, {} per buyer, {} buyers",
            self.flash_sale_id, self.stock, self.sku_id, self.per_buyer_limit, self.buyers
        );
        let _infallible = writeln!(out, "attempts      {}", self.attempts.human_text("answered"));
        let _infallible = writeln!(
            out,
            "answers       {} won, {} sold out, {} over the limit, {} errors ({} of unknown outcome)",
            self.won, self.sold_out, self.limit_refusals, self.errors, self.unknown_outcomes
        );
        match (self.sold_out_after_s, &self.sold_out_phase) {
            (Some(after_s), Some(phase)) => {
                let _infallible = writeln!(out, "sold out      after {after_s:.3} s");
                let _infallible = writeln!(out, "then          {}", phase.human_text("answered"));
            }
            _ => {
                let _infallible = writeln!(out, "sold out      not within the run");
            }
        }
        let _infallible = writeln!(out, "healthz       {}", self.healthz.human_text("requests"));
        let ratio = match self.sold_out_to_healthz_ratio {
            Some(ratio) => format!("{ratio:.3}"),
            None => "n/a".to_owned(),
        };
        let _infallible = writeln!(
            out,
            "ratio         {ratio} (sold-out attempts/s over healthz/s; the target is >= {TARGET_RATIO:.2})"
        );
        let _infallible = writeln!(
            out,
            "books         sale: {} sold + {} reserved, {} remaining of {}; SKU: {} sold + {} reserved, {} on sale, {} available of {}",
            self.sale.sold,
            self.sale.reserved,
            self.sale.remaining,
            self.sale.quantity,
            self.sku.sold,
            self.sku.reserved,
            self.sku.on_flash_sale,
            self.sku.available,
            self.sku.stock
        );
        if self.failures.is_empty() {
            let _infallible = writeln!(
                out,
                "invariants    ok (sold + reserved == won <= stock, remaining == stock - won, the SKU agrees, no buyer past the limit)"
            );
        } else {
            let _infallible = writeln!(out, "invariants    VIOLATED: {}", self.failures.join("; "));
        }
        let keys = if self.idempotency_keys { "a fresh Idempotency-Key per attempt" } else { "none" };
        let _infallible = writeln!(out, "keys          {keys}");
        out
    }
}

/// Runs the flash-sale load test and returns its summary; a failed check
/// is in `failures` (the caller decides the exit code).
pub async fn run_flash_sale(config: FlashSaleLoadConfig) -> anyhow::Result<FlashSaleLoadSummary> {
    let duration = validate(&config)?;
    let progress = config.progress && !config.json;
    let endpoint = open_endpoint(&config.target, config.api_key.as_deref()).await?;
    let mut probe = HttpConn::new(endpoint.clone());
    check_health(&mut probe).await?;

    let run_id = new_run_id();
    let ids = SaleIds::of(&run_id);
    create_sale(&mut probe, &ids, &config, duration).await?;

    let conns = connect_workers(&endpoint, config.concurrency).await?;
    let context = Arc::new(SaleRun {
        attempts_uri: Uri::try_from(format!("{}/v1/flash-sales/{}/attempts", endpoint.base_path, ids.sale))?,
        run_id: run_id.clone(),
        buyers: config.buyers,
        idempotency_keys: config.idempotency_keys,
        base: Instant::now(),
        sold_out_at_us: AtomicU64::new(NOT_SOLD_OUT),
        requests_done: Arc::default(),
    });
    let worker_context = context.clone();
    let (per_worker, elapsed) =
        run_timed(conns, duration, progress, context.requests_done.clone(), move |worker, conn, deadline| {
            attempt_worker(worker_context.clone(), worker, conn, deadline)
        })
        .await?;
    let mut totals = AttemptTotals::new();
    for worker_totals in per_worker {
        totals.merge(worker_totals)?;
    }
    if let Some(first_error) = &totals.first_error {
        eprintln!("loadtest: {} errors; first: {first_error}", totals.errors);
    }

    let healthz_duration = Duration::from_secs_f64(HEALTHZ_SECONDS).min(duration);
    let healthz_context = Arc::new(RunContext {
        scenario: Scenario::Healthz,
        run_id,
        accounts: 0,
        batch: 1,
        endpoint: endpoint.clone(),
        requests_done: Arc::default(),
        idempotency_keys: false,
    });
    let (healthz, healthz_elapsed) =
        run_scenario(&healthz_context, config.concurrency, healthz_duration, progress).await?;
    let healthz = Rate::of(&healthz.latency_us, healthz.requests, healthz_elapsed.as_secs_f64());

    let sale: SaleBooks = read_json(&mut probe, &format!("/v1/flash-sales/{}", ids.sale)).await?;
    let sku: SkuBooks = read_json(&mut probe, &format!("/v1/skus/{}", ids.sku)).await?;
    let answers = Answers {
        stock: config.stock,
        per_buyer_limit: config.per_buyer_limit,
        won: totals.won,
        unknown_outcomes: totals.unknown_outcomes,
        won_by_buyer: &totals.won_by_buyer,
    };
    let failures = check_books(&answers, &sale, &sku);

    let sold_out_at_us = context.sold_out_at_us.load(Ordering::Acquire);
    let sold_out_after_s = (sold_out_at_us != NOT_SOLD_OUT).then(|| sold_out_at_us as f64 / 1e6);
    let sold_out_phase = sold_out_after_s.map(|_| {
        let seconds = totals.last_answer_us.saturating_sub(sold_out_at_us) as f64 / 1e6;
        Rate::of(&totals.after_sold_out_latency_us, totals.after_sold_out, seconds)
    });
    let sold_out_to_healthz_ratio =
        sold_out_phase.as_ref().filter(|_| healthz.per_s > 0.0).map(|phase| phase.per_s / healthz.per_s);
    Ok(FlashSaleLoadSummary {
        flash_sale_id: ids.sale,
        sku_id: ids.sku,
        stock: config.stock,
        per_buyer_limit: config.per_buyer_limit,
        buyers: config.buyers,
        attempts: Rate::of(&totals.latency_us, totals.attempts, elapsed.as_secs_f64()),
        won: totals.won,
        sold_out: totals.sold_out,
        limit_refusals: totals.limit_refusals,
        errors: totals.errors,
        unknown_outcomes: totals.unknown_outcomes,
        sold_out_after_s,
        sold_out_phase,
        healthz,
        sold_out_to_healthz_ratio,
        sale,
        sku,
        buyers_past_limit: buyers_past_limit(&totals.won_by_buyer, config.per_buyer_limit),
        invariants_ok: failures.is_empty(),
        failures,
        idempotency_keys: config.idempotency_keys,
    })
}

fn validate(config: &FlashSaleLoadConfig) -> anyhow::Result<Duration> {
    let duration = validate_load(config.concurrency, config.seconds)?;
    if !(1..=MAX_STOCK).contains(&config.stock) {
        bail!("--stock must be between 1 and {MAX_STOCK}, got {}", config.stock);
    }
    if !(1..=MAX_PER_BUYER_LIMIT).contains(&config.per_buyer_limit) {
        bail!("--limit must be between 1 and {MAX_PER_BUYER_LIMIT}, got {}", config.per_buyer_limit);
    }
    if !(1..=MAX_BUYERS).contains(&config.buyers) {
        bail!("--buyers must be between 1 and {MAX_BUYERS}, got {}", config.buyers);
    }
    Ok(duration)
}

// ---------------------------------------------------------------------------
// Setup

/// The run's SKU and sale. Ids hold only hex digits, digits and dashes, so
/// no body or path needs escaping.
struct SaleIds {
    sku: String,
    sale: String,
}

impl SaleIds {
    fn of(run_id: &str) -> SaleIds {
        SaleIds { sku: format!("lt-{run_id}-sku"), sale: format!("lt-{run_id}-sale") }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(0))
}

async fn create_sale(
    conn: &mut HttpConn,
    ids: &SaleIds,
    config: &FlashSaleLoadConfig,
    duration: Duration,
) -> anyhow::Result<()> {
    let sku = serde_json::json!({
        "id": ids.sku,
        "merchant_id": "lt-merchant",
        "title": "loadtest flash-sale unit",
        "price": SKU_PRICE_MINOR,
        "currency": CURRENCY,
        "stock": config.stock,
    });
    post_setup(conn, "/v1/skus", &sku).await.context("creating the SKU")?;
    let now_ms = now_ms();
    let run_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let sale = serde_json::json!({
        "id": ids.sale,
        "sku_id": ids.sku,
        "price": SALE_PRICE_MINOR,
        "quantity": config.stock,
        "starts_at": peakstack_server::rfc3339(now_ms.saturating_sub(STARTED_AGO_MS)),
        "ends_at": peakstack_server::rfc3339(now_ms.saturating_add(run_ms).saturating_add(ENDS_AFTER_RUN_MS)),
        "per_buyer_limit": config.per_buyer_limit,
        "pay_within_seconds": PAY_WITHIN_SECONDS,
    });
    post_setup(conn, "/v1/flash-sales", &sale).await.context("creating the flash sale")?;
    Ok(())
}

/// One setup request, answered 201 (or 200: made already, the same).
async fn post_setup(conn: &mut HttpConn, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let uri = Uri::try_from(format!("{}{path}", conn.endpoint.base_path))?;
    let body = Bytes::from(body.to_string());
    let (status, answer) = conn.request_until(Method::POST, uri, body, Instant::now() + REQUEST_TIMEOUT).await?;
    if !matches!(status, StatusCode::CREATED | StatusCode::OK) {
        bail!("POST {path}: HTTP {status}: {}", snippet(&answer));
    }
    Ok(())
}

async fn read_json<T: serde::de::DeserializeOwned>(conn: &mut HttpConn, path: &str) -> anyhow::Result<T> {
    let uri = Uri::try_from(format!("{}{path}", conn.endpoint.base_path))?;
    let (status, body) = conn.request_until(Method::GET, uri, Bytes::new(), Instant::now() + REQUEST_TIMEOUT).await?;
    if status != StatusCode::OK {
        bail!("GET {path}: HTTP {status}: {}", snippet(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {path}: unreadable answer: {}", snippet(&body)))
}

// ---------------------------------------------------------------------------
// Timed phase

/// No `sold_out` answer yet.
const NOT_SOLD_OUT: u64 = u64::MAX;

struct SaleRun {
    attempts_uri: Uri,
    run_id: String,
    buyers: u32,
    idempotency_keys: bool,
    /// Answers are timed from here (once the workers are connected, just
    /// before they start).
    base: Instant,
    /// Microseconds from `base` to the earliest `sold_out` answer, or
    /// [`NOT_SOLD_OUT`].
    sold_out_at_us: AtomicU64,
    /// Read only by the progress bar.
    requests_done: Arc<AtomicU64>,
}

/// What an attempt's answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Won,
    SoldOut,
    LimitExceeded,
    /// Refused for another reason: it did not win.
    Refused,
    /// It may have won, or not (a 5xx, a lost connection).
    Unknown,
}

#[derive(Deserialize)]
struct Problem<'a> {
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

fn judge_attempt(status: StatusCode, body: &[u8]) -> Outcome {
    match status {
        StatusCode::CREATED => Outcome::Won,
        StatusCode::UNPROCESSABLE_ENTITY => {
            match serde_json::from_slice::<Problem>(body).ok().and_then(|p| p.code).as_deref() {
                Some("sold_out") => Outcome::SoldOut,
                Some("purchase_limit_exceeded") => Outcome::LimitExceeded,
                _ => Outcome::Refused,
            }
        }
        status if status.is_client_error() => Outcome::Refused,
        _ => Outcome::Unknown,
    }
}

/// The body of one attempt, for buyer number `buyer` of the run.
fn attempt_body(run_id: &str, buyer: u32) -> String {
    let mut out = String::with_capacity(48);
    let _infallible = write!(out, "{{\"buyer_id\":\"lt-{run_id}-{buyer}\",\"quantity\":1}}");
    out
}

struct AttemptTotals {
    attempts: u64,
    won: u64,
    sold_out: u64,
    limit_refusals: u64,
    errors: u64,
    unknown_outcomes: u64,
    latency_us: Histogram<u64>,
    /// Attempts answered at or after the first `sold_out` answer.
    after_sold_out: u64,
    after_sold_out_latency_us: Histogram<u64>,
    /// Microseconds from the run's base to the last answer.
    last_answer_us: u64,
    /// Units won per buyer number (one per 201: every attempt asks one).
    won_by_buyer: HashMap<u32, u32>,
    first_error: Option<String>,
}

impl AttemptTotals {
    fn new() -> AttemptTotals {
        AttemptTotals {
            attempts: 0,
            won: 0,
            sold_out: 0,
            limit_refusals: 0,
            errors: 0,
            unknown_outcomes: 0,
            latency_us: new_latency_histogram(),
            after_sold_out: 0,
            after_sold_out_latency_us: new_latency_histogram(),
            last_answer_us: 0,
            won_by_buyer: HashMap::new(),
            first_error: None,
        }
    }

    fn count(&mut self, outcome: Outcome, buyer: u32) {
        match outcome {
            Outcome::Won => {
                self.won += 1;
                *self.won_by_buyer.entry(buyer).or_insert(0) += 1;
            }
            Outcome::SoldOut => self.sold_out += 1,
            Outcome::LimitExceeded => self.limit_refusals += 1,
            Outcome::Refused => self.errors += 1,
            Outcome::Unknown => {
                self.errors += 1;
                self.unknown_outcomes += 1;
            }
        }
    }

    fn merge(&mut self, other: AttemptTotals) -> anyhow::Result<()> {
        self.attempts += other.attempts;
        self.won += other.won;
        self.sold_out += other.sold_out;
        self.limit_refusals += other.limit_refusals;
        self.errors += other.errors;
        self.unknown_outcomes += other.unknown_outcomes;
        let merge_error = |error| anyhow::anyhow!("merging latency histograms: {error:?}");
        self.latency_us.add(&other.latency_us).map_err(merge_error)?;
        self.after_sold_out += other.after_sold_out;
        self.after_sold_out_latency_us.add(&other.after_sold_out_latency_us).map_err(merge_error)?;
        self.last_answer_us = self.last_answer_us.max(other.last_answer_us);
        for (buyer, units) in other.won_by_buyer {
            *self.won_by_buyer.entry(buyer).or_insert(0) += units;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

async fn attempt_worker(context: Arc<SaleRun>, worker: usize, mut conn: HttpConn, deadline: Instant) -> AttemptTotals {
    let mut totals = AttemptTotals::new();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let give_up_at = deadline + DRAIN_GRACE;
    let mut requests_sent: u64 = 0;
    // Bounded by the deadline: every request gives up at `give_up_at`, and
    // no new request starts after `deadline`.
    while Instant::now() < deadline {
        let buyer = rng.random_range(0..context.buyers);
        let body = Bytes::from(attempt_body(&context.run_id, buyer));
        if context.idempotency_keys {
            conn.next_idempotency_key = Some(fresh_idempotency_key(&context.run_id, worker, requests_sent));
        }
        requests_sent += 1;
        let started = Instant::now();
        match conn.request_until(Method::POST, context.attempts_uri.clone(), body, give_up_at).await {
            Ok((status, body)) => {
                let answered = Instant::now();
                let latency_us = micros(answered - started);
                let answered_us = micros(answered - context.base);
                let outcome = judge_attempt(status, &body);
                if outcome == Outcome::SoldOut {
                    context.sold_out_at_us.fetch_min(answered_us, Ordering::AcqRel);
                }
                if answered_us >= context.sold_out_at_us.load(Ordering::Acquire) {
                    totals.after_sold_out += 1;
                    totals.after_sold_out_latency_us.saturating_record(latency_us);
                }
                totals.attempts += 1;
                totals.latency_us.saturating_record(latency_us);
                totals.last_answer_us = totals.last_answer_us.max(answered_us);
                totals.count(outcome, buyer);
                context.requests_done.fetch_add(1, Ordering::Relaxed);
                if matches!(outcome, Outcome::Refused | Outcome::Unknown) && totals.first_error.is_none() {
                    totals.first_error = Some(format!("HTTP {status}: {}", snippet(&body)));
                }
            }
            Err(error) => {
                totals.count(Outcome::Unknown, buyer);
                if totals.first_error.is_none() {
                    totals.first_error = Some(format!("{error:#}"));
                }
                let resume_at = (Instant::now() + RECONNECT_BACKOFF).min(deadline);
                tokio::time::sleep_until(resume_at).await;
            }
        }
    }
    totals
}

// ---------------------------------------------------------------------------
// The books

/// What the answers of the run said.
struct Answers<'a> {
    stock: u64,
    per_buyer_limit: u32,
    won: u64,
    unknown_outcomes: u64,
    won_by_buyer: &'a HashMap<u32, u32>,
}

fn buyers_past_limit(won_by_buyer: &HashMap<u32, u32>, per_buyer_limit: u32) -> u64 {
    won_by_buyer.values().filter(|units| **units > per_buyer_limit).count() as u64
}

/// Every way the server's books disagree with the answers, in words.
fn check_books(answers: &Answers<'_>, sale: &SaleBooks, sku: &SkuBooks) -> Vec<String> {
    let mut failures = Vec::new();
    let taken = sale.sold.saturating_add(sale.reserved);
    let won = answers.won;
    if answers.unknown_outcomes == 0 && taken != won {
        failures.push(format!("the sale has {taken} units sold or reserved, the answers said {won} won"));
    }
    if answers.unknown_outcomes > 0 && !(won..=won.saturating_add(answers.unknown_outcomes)).contains(&taken) {
        failures.push(format!(
            "the sale has {taken} units sold or reserved, the answers said {won} won and {} unknown",
            answers.unknown_outcomes
        ));
    }
    if taken > answers.stock || won > answers.stock {
        failures.push(format!("oversold: {taken} units taken and {won} won of {}", answers.stock));
    }
    if sale.quantity != answers.stock {
        failures.push(format!("the sale has {} units, not {}", sale.quantity, answers.stock));
    }
    if sale.remaining != sale.quantity.saturating_sub(taken) || taken > sale.quantity {
        failures.push(format!(
            "the sale has {} remaining of {} with {taken} sold or reserved",
            sale.remaining, sale.quantity
        ));
    }
    if answers.unknown_outcomes == 0 && sale.remaining != answers.stock.saturating_sub(won) {
        failures
            .push(format!("the sale has {} remaining, {} - {won} won were expected", sale.remaining, answers.stock));
    }
    // The SKU's units are all on this sale: what the sale took, it has
    // reserved or sold; the rest is still on the sale.
    if sku.sold.saturating_add(sku.reserved) != taken || sku.sold != sale.sold {
        failures.push(format!(
            "the SKU has {} sold + {} reserved, the sale {} sold + {} reserved",
            sku.sold, sku.reserved, sale.sold, sale.reserved
        ));
    }
    if sku.on_flash_sale != sale.remaining || sku.stock != answers.stock || sku.available != 0 {
        failures.push(format!(
            "the SKU has {} on the sale and {} available of {}; the sale {} remaining of {}",
            sku.on_flash_sale, sku.available, sku.stock, sale.remaining, answers.stock
        ));
    }
    let past_limit = buyers_past_limit(answers.won_by_buyer, answers.per_buyer_limit);
    if past_limit > 0 {
        failures.push(format!("{past_limit} buyers won more than the limit of {}", answers.per_buyer_limit));
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::INLINE_ID_LEN;

    #[test]
    fn judges_attempts() {
        let problem = |code: &str| format!(r#"{{"type":"about:blank","status":422,"code":"{code}","detail":"x"}}"#);
        let cases: [(u16, String, Outcome); 9] = [
            (201, r#"{"id":"rsv_1_1"}"#.to_owned(), Outcome::Won),
            (422, problem("sold_out"), Outcome::SoldOut),
            (422, problem("purchase_limit_exceeded"), Outcome::LimitExceeded),
            (422, problem("sale_ended"), Outcome::Refused),
            (422, "not json".to_owned(), Outcome::Refused),
            (404, problem("flash_sale_not_found"), Outcome::Refused),
            (503, problem("deadline_exceeded"), Outcome::Unknown),
            (500, String::new(), Outcome::Unknown),
            (200, "{}".to_owned(), Outcome::Unknown),
        ];
        for (status, body, expected) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(judge_attempt(status, body.as_bytes()), expected, "{status} {body}");
        }
    }

    #[test]
    fn attempt_bodies_and_ids_fit() {
        let run_id = format!("{:08x}", u32::MAX);
        let body = attempt_body(&run_id, MAX_BUYERS - 1);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["quantity"], 1);
        let buyer = parsed["buyer_id"].as_str().unwrap();
        assert!(buyer.len() <= INLINE_ID_LEN, "{buyer} is longer than {INLINE_ID_LEN} bytes");
        let ids = SaleIds::of(&run_id);
        assert!(ids.sku.len() <= INLINE_ID_LEN && ids.sale.len() <= INLINE_ID_LEN);
    }

    fn check(won: u64, unknown_outcomes: u64, won_by_buyer: &[(u32, u32)], sale: SaleBooks, sku: SkuBooks) -> usize {
        let won_by_buyer: HashMap<u32, u32> = won_by_buyer.iter().copied().collect();
        let answers = Answers { stock: 10, per_buyer_limit: 1, won, unknown_outcomes, won_by_buyer: &won_by_buyer };
        check_books(&answers, &sale, &sku).len()
    }

    #[test]
    fn checks_the_books() {
        let sale = |sold, reserved| SaleBooks { quantity: 10, remaining: 10 - sold - reserved, sold, reserved };
        let sku =
            |sold, reserved| SkuBooks { stock: 10, available: 0, sold, reserved, on_flash_sale: 10 - sold - reserved };
        let winners = [(1, 1), (2, 1), (3, 1)];
        // Agreeing books, sold out or not, some units paid for.
        assert_eq!(check(3, 0, &winners, sale(0, 3), sku(0, 3)), 0);
        assert_eq!(check(3, 0, &winners, sale(1, 2), sku(1, 2)), 0);
        let all: Vec<(u32, u32)> = (0..10).map(|b| (b, 1)).collect();
        assert_eq!(check(10, 0, &all, sale(0, 10), sku(0, 10)), 0);
        // A unit the answers do not know of, or one missing.
        assert_eq!(check(3, 0, &winners, sale(0, 4), sku(0, 4)), 2);
        assert_eq!(check(3, 0, &winners, sale(0, 2), sku(0, 2)), 2);
        // ... unless an answer was lost: then up to that many more.
        assert_eq!(check(3, 1, &winners, sale(0, 4), sku(0, 4)), 0);
        assert_eq!(check(3, 1, &winners, sale(0, 5), sku(0, 5)), 1);
        // The SKU disagrees with its sale.
        assert_eq!(check(3, 0, &winners, sale(0, 3), sku(1, 2)), 1);
        assert_eq!(check(3, 0, &winners, sale(0, 3), SkuBooks { available: 1, ..sku(0, 3) }), 1);
        // A remaining that does not add up.
        assert_eq!(check(3, 0, &winners, SaleBooks { remaining: 6, ..sale(0, 3) }, sku(0, 3)), 3);
        // Oversold.
        let oversold = SaleBooks { quantity: 10, remaining: 0, sold: 0, reserved: 11 };
        let oversold_sku = SkuBooks { stock: 10, available: 0, sold: 0, reserved: 11, on_flash_sale: 0 };
        assert!(check(11, 0, &all, oversold, oversold_sku) >= 2);
        // A buyer past the limit.
        assert_eq!(check(3, 0, &[(1, 2), (2, 1)], sale(0, 3), sku(0, 3)), 1);
    }

    // ---- a flash sale speaking just enough HTTP/1.1 ----

    use std::sync::Mutex;

    use crate::loadtest::tests::{start_mock_server, MockRoutes};

    #[derive(Default)]
    struct MockSale {
        books: Mutex<MockBooks>,
        /// Report one unit more reserved than was won, to fake a broken sale.
        skew: bool,
    }

    #[derive(Default)]
    struct MockBooks {
        quantity: u64,
        reserved: u64,
        per_buyer_limit: u32,
        won_by_buyer: HashMap<String, u32>,
        keyed_attempts: u64,
    }

    impl MockRoutes for MockSale {
        fn route(&self, method: &str, target: &str, key: Option<String>, body: &[u8]) -> (u16, String) {
            let json = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
            let mut books = self.books.lock().unwrap();
            let problem = |code: &str| (422, format!(r#"{{"status":422,"code":"{code}"}}"#));
            match (method, target) {
                ("GET", "/healthz") => (200, r#"{"status":"ok"}"#.to_owned()),
                ("POST", "/v1/skus") => (201, "{}".to_owned()),
                ("POST", "/v1/flash-sales") => {
                    books.quantity = json["quantity"].as_u64().unwrap_or_default();
                    books.per_buyer_limit = json["per_buyer_limit"].as_u64().unwrap_or_default() as u32;
                    (201, "{}".to_owned())
                }
                ("POST", attempt) if attempt.ends_with("/attempts") => {
                    books.keyed_attempts += u64::from(key.is_some());
                    let buyer = json["buyer_id"].as_str().unwrap_or_default().to_owned();
                    let limit = books.per_buyer_limit;
                    if books.reserved == books.quantity {
                        return problem("sold_out");
                    }
                    let units = books.won_by_buyer.entry(buyer).or_insert(0);
                    if *units >= limit {
                        return problem("purchase_limit_exceeded");
                    }
                    *units += 1;
                    books.reserved += 1;
                    (201, r#"{"id":"rsv_1_1"}"#.to_owned())
                }
                ("GET", sale) if sale.starts_with("/v1/flash-sales/") => {
                    let reserved = books.reserved + u64::from(self.skew);
                    let remaining = books.quantity - reserved;
                    let body = serde_json::json!({"quantity": books.quantity, "remaining": remaining, "sold": 0, "reserved": reserved});
                    (200, body.to_string())
                }
                ("GET", sku) if sku.starts_with("/v1/skus/") => {
                    let reserved = books.reserved + u64::from(self.skew);
                    let body = serde_json::json!({"stock": books.quantity, "available": 0, "sold": 0,
                        "reserved": reserved, "on_flash_sale": books.quantity - reserved});
                    (200, body.to_string())
                }
                _ => (404, r#"{"code":"not_found"}"#.to_owned()),
            }
        }
    }

    /// Long enough to sell the mock's 20 units with 4 clients on a loaded
    /// machine (a request has taken 44 ms there, and 0.3 s sold only 17).
    const MOCK_SECONDS: f64 = 1.0;

    fn mock_config(target: String) -> FlashSaleLoadConfig {
        FlashSaleLoadConfig {
            target,
            concurrency: 4,
            seconds: MOCK_SECONDS,
            stock: 20,
            per_buyer_limit: 2,
            buyers: 15,
            json: false,
            progress: false,
            api_key: None,
            idempotency_keys: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn races_a_mock_sale_and_checks_its_books() {
        let sale = Arc::new(MockSale::default());
        let url = start_mock_server(sale.clone()).await;
        let started = std::time::Instant::now();
        let summary = run_flash_sale(mock_config(url)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "the run must stop by itself");
        assert_eq!(summary.failures, Vec::<String>::new());
        assert!(summary.invariants_ok);
        assert_eq!((summary.won, summary.errors, summary.buyers_past_limit), (20, 0, 0), "{summary:?}");
        assert!(summary.sold_out > 0 && summary.limit_refusals > 0, "{summary:?}");
        let phase = summary.sold_out_phase.clone().expect("sold out within the run");
        assert!(phase.requests > 0 && phase.requests <= summary.sold_out + summary.limit_refusals, "{phase:?}");
        assert!(summary.sold_out_after_s.is_some_and(|s| s < MOCK_SECONDS), "{summary:?}");
        assert!(summary.healthz.requests > 0 && summary.healthz.seconds >= MOCK_SECONDS, "{summary:?}");
        assert!(summary.sold_out_to_healthz_ratio.is_some_and(|r| r > 0.0), "{summary:?}");
        assert_eq!(summary.attempts.requests, summary.won + summary.sold_out + summary.limit_refusals);
        assert_eq!(sale.books.lock().unwrap().keyed_attempts, 0);
        let json = serde_json::to_value(&summary).unwrap();
        for key in ["attempts", "won", "sold_out_phase", "healthz", "sold_out_to_healthz_ratio", "invariants_ok"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert!(json["sold_out_phase"]["per_s"].as_f64().is_some());
        let text = summary.human_text();
        assert!(text.contains("invariants    ok"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_sale_whose_books_disagree_and_sends_keys_when_asked() {
        let sale = Arc::new(MockSale { skew: true, ..MockSale::default() });
        let url = start_mock_server(sale.clone()).await;
        let config = FlashSaleLoadConfig { idempotency_keys: true, stock: 1_000_000, ..mock_config(url) };
        let summary = run_flash_sale(config).await.unwrap();
        assert!(!summary.invariants_ok);
        assert!(summary.failures.iter().any(|f| f.contains("the answers said")), "{:?}", summary.failures);
        // Not sold out: no sold-out phase, no ratio.
        assert_eq!((summary.sold_out_phase.clone(), summary.sold_out_to_healthz_ratio), (None, None));
        assert!(summary.human_text().contains("VIOLATED"));
        let keyed = sale.books.lock().unwrap().keyed_attempts;
        assert!(keyed > 0 && keyed == summary.attempts.requests, "{keyed} keyed, {summary:?}");
    }

    #[test]
    fn validates_config() {
        let good = mock_config("http://127.0.0.1:1".to_owned());
        assert_eq!(validate(&good).unwrap(), Duration::from_secs_f64(MOCK_SECONDS));
        for bad in [
            FlashSaleLoadConfig { stock: 0, ..good.clone() },
            FlashSaleLoadConfig { stock: MAX_STOCK + 1, ..good.clone() },
            FlashSaleLoadConfig { per_buyer_limit: 0, ..good.clone() },
            FlashSaleLoadConfig { buyers: 0, ..good.clone() },
            FlashSaleLoadConfig { concurrency: 0, ..good.clone() },
            FlashSaleLoadConfig { seconds: 0.0, ..good.clone() },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
