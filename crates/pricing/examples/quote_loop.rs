//! A quick measure of `quote` on the bench fixture, one thread:
//! `cargo run --release -p peakstack-pricing --example quote_loop [seconds]`.

use std::time::Instant;

use peakstack_pricing::bench_fixture::fixture;

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let fixture = fixture();
    let first: Vec<_> =
        (0..fixture.carts.len()).map(|cart| fixture.quote(cart).expect("fixture carts quote")).collect();
    for quote in &first {
        quote.check().expect("invariants hold");
    }
    let started = Instant::now();
    let mut quotes = 0u64;
    let mut cents = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..10_000 {
            let quote = fixture.quote(quotes as usize).expect("fixture carts quote");
            cents = cents.wrapping_add(quote.total);
            quotes += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{quotes} quotes in {elapsed:.2}s: {:.0} ns/quote, {:.0} quotes/s (checksum {cents})",
        elapsed * 1e9 / quotes as f64,
        quotes as f64 / elapsed
    );
    let sample = &first[0];
    println!(
        "cart 0: {} lines, {} applied, {} skipped, total {}",
        sample.lines.len(),
        sample.applied.len(),
        sample.skipped.len(),
        sample.total
    );
}
