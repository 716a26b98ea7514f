//! `peakstack bench quote`: the pricing function alone, in memory.
//!
//! Builds the pricing bench fixture (20 live promotions of every kind and
//! scope with exclusive groups, budgets and limits, a coupon, carts of 3
//! lines from 2 merchants), then prices its carts on `threads` threads for
//! `seconds`. Every `CHECK_EVERY`th quote is checked: its invariants
//! (shares add up to each discount, no line below zero, lines add up to
//! merchants add up to the cart) and that it equals the first quote of the
//! same cart (a quote is deterministic).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use peakstack_pricing::bench_fixture::{fixture, Fixture};
use peakstack_pricing::Quote;

/// One quote in this many is checked in full.
const CHECK_EVERY: u64 = 1024;
/// Quotes between two looks at the clock.
const QUOTES_PER_ROUND: u64 = 4096;

#[derive(clap::Args)]
pub struct QuoteArgs {
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Threads pricing carts. Default: one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct QuoteSummary {
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    /// Wall time per quote on one thread: seconds x threads / quotes.
    ns_per_quote: f64,
    /// CPU time per quote, all threads: steadier than the rate on a shared machine.
    cpu_ns_per_quote: f64,
    threads: usize,
    promotions: usize,
    carts: usize,
    lines_per_cart: usize,
    checked: u64,
    /// Checked quotes that broke an invariant or differed from the first quote of their cart.
    check_failures: u64,
    invariants_ok: bool,
}

struct ThreadResult {
    quotes: u64,
    checked: u64,
    failures: u64,
    cpu_seconds: f64,
}

pub fn run(args: QuoteArgs) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || args.seconds.is_nan() || args.seconds <= 0.0 {
        bail!("--threads and --seconds must be positive");
    }
    let fixture = Arc::new(fixture());
    let reference: Arc<Vec<Quote>> = Arc::new(
        (0..fixture.carts.len())
            .map(|cart| {
                fixture.quote(cart).map_err(|code| anyhow::anyhow!("fixture cart {cart} does not price: {code}"))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    for (cart, quote) in reference.iter().enumerate() {
        quote.check().map_err(|broken| anyhow::anyhow!("fixture cart {cart}: {broken}"))?;
    }
    if !args.json {
        eprintln!(
            "pricing {} carts against {} promotions on {threads} {} for {}s",
            fixture.carts.len(),
            fixture.book.promotions().count(),
            threads_word(threads),
            args.seconds
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let (fixture, reference, stop) = (fixture.clone(), reference.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("quote-{thread}"))
            .spawn(move || price_until(&fixture, &reference, &stop, deadline, thread));
        handles.push(spawned.context("starting a quote thread")?);
    }
    let results: Vec<ThreadResult> = handles.into_iter().map(|h| h.join().expect("quote thread")).collect();
    let seconds = started.elapsed().as_secs_f64();
    let quotes: u64 = results.iter().map(|r| r.quotes).sum();
    let checked: u64 = results.iter().map(|r| r.checked).sum();
    let check_failures: u64 = results.iter().map(|r| r.failures).sum();
    let cpu_seconds: f64 = results.iter().map(|r| r.cpu_seconds).sum();
    let summary = QuoteSummary {
        ops: quotes,
        seconds,
        ops_per_s: quotes as f64 / seconds,
        ns_per_quote: seconds * threads as f64 * 1e9 / quotes.max(1) as f64,
        cpu_ns_per_quote: cpu_seconds * 1e9 / quotes.max(1) as f64,
        threads,
        promotions: fixture.book.promotions().count(),
        carts: fixture.carts.len(),
        lines_per_cart: fixture.carts[0].lines.len(),
        checked,
        check_failures,
        invariants_ok: check_failures == 0,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        summary.print_human();
    }
    if !summary.invariants_ok {
        bail!("invariant check failed: {check_failures} checked quotes were wrong");
    }
    Ok(())
}

fn price_until(
    fixture: &Fixture,
    reference: &[Quote],
    stop: &AtomicBool,
    deadline: Instant,
    thread: usize,
) -> ThreadResult {
    let cpu_started = this_thread_cpu_seconds();
    let mut result = ThreadResult { quotes: 0, checked: 0, failures: 0, cpu_seconds: 0.0 };
    // Threads start on different carts, so they do not all price the same one.
    let mut cart = thread;
    // Bounded by the deadline: every round looks at it.
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for _ in 0..QUOTES_PER_ROUND {
            cart = (cart + 1) % reference.len();
            let quote = fixture.quote(cart);
            result.quotes += 1;
            if result.quotes.is_multiple_of(CHECK_EVERY) {
                result.checked += 1;
                let good = quote.as_ref().is_ok_and(|q| q.check().is_ok() && *q == reference[cart]);
                result.failures += u64::from(!good);
            }
            std::hint::black_box(quote.ok());
        }
    }
    stop.store(true, Ordering::Relaxed);
    result.cpu_seconds = this_thread_cpu_seconds() - cpu_started;
    result
}

fn threads_word(threads: usize) -> &'static str {
    if threads == 1 {
        "thread"
    } else {
        "threads"
    }
}

/// CPU seconds the calling thread has used.
fn this_thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

impl QuoteSummary {
    fn print_human(&self) {
        println!("quotes        {}", self.ops);
        println!("seconds       {:.2}", self.seconds);
        println!("throughput    {:.0} quotes/s on {} {}", self.ops_per_s, self.threads, threads_word(self.threads));
        println!("per quote     {:.0} ns wall per thread, {:.0} ns cpu", self.ns_per_quote, self.cpu_ns_per_quote);
        println!(
            "fixture       {} promotions, {} carts of {} lines from 2 merchants",
            self.promotions, self.carts, self.lines_per_cart
        );
        let verdict = if self.invariants_ok { "ok" } else { "BROKEN" };
        println!("invariants    {verdict} ({} quotes checked, {} wrong)", self.checked, self.check_failures);
    }
}
