//! `peakstack bench checkout` as a user runs it: the debug binary, a small
//! run, the JSON summary with every end-of-run check passed, within a
//! bound of time; and a readable refusal of bad flags.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A debug build places a few thousand checkouts a second: 2000 take a
/// second or two; the bound leaves room for a loaded machine.
const RUN_BOUND: Duration = Duration::from_secs(120);

/// Runs `peakstack bench checkout <args>`, killed past [`RUN_BOUND`].
fn bench(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peakstack"))
        .args(["bench", "checkout"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running peakstack bench checkout");
    let started = Instant::now();
    // Bounded by RUN_BOUND: past it the child is killed and the test fails.
    while child.try_wait().expect("waiting for the bench").is_none() {
        if started.elapsed() > RUN_BOUND {
            let _ = child.kill();
            panic!("bench checkout {args:?} ran past {RUN_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("the bench's output")
}

#[test]
fn a_small_checkout_bench_passes_its_checks_and_reports_its_figures() {
    let output = bench(&["--checkouts", "2000", "--buyers", "100", "--concurrency", "64", "--json"]);
    assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let summary: Value = serde_json::from_str(stdout.lines().last().expect("a last line")).expect("JSON");
    assert_eq!(summary["invariants_ok"], true, "{summary}");
    assert_eq!(summary["failures"], serde_json::json!([]));
    assert_eq!((summary["checkouts"].as_u64(), summary["refused"].as_u64()), (Some(2000), Some(0)));
    let rate = summary["checkouts_per_s"].as_f64().unwrap();
    let seconds = summary["seconds"].as_f64().unwrap();
    assert!(rate > 0.0 && (rate - 2000.0 / seconds).abs() < 1.0, "{rate} vs 2000 / {seconds}");
    let latency: Vec<u64> =
        ["p50_us", "p99_us", "p999_us", "max_us"].iter().map(|k| summary[k].as_u64().unwrap()).collect();
    assert!(latency.windows(2).all(|w| w[0] <= w[1]) && latency[0] > 0, "{latency:?}");
    assert!(summary["fsyncs"].as_u64().unwrap() > 0, "durable writes are on");
    let books = &summary["books"];
    assert_eq!(books["units_ordered"], books["units_sold"]);
    assert_eq!(books["units_reserved"], 0);
    assert_eq!(books["coupons_used"], 2000);
    assert_eq!(books["checkouts_total_minor"], books["wallet_debits_minor"]);
    assert_eq!(books["checkouts_total_minor"], books["settle_credits_minor"]);
    assert!(books["checkouts_total_minor"].as_u64().unwrap() > 0);
    assert_eq!((books["ledger_net"].as_i64(), books["clearing_net"].as_i64()), (Some(0), Some(0)));
    // The budget branch ran: a budget-limited promotion was given, within its budget.
    let budgeted: Vec<&Value> =
        books["limited_promotions"].as_array().unwrap().iter().filter(|p| p["budget"].is_u64()).collect();
    assert!(!budgeted.is_empty());
    for promotion in budgeted {
        let (given, budget) = (promotion["given"].as_u64().unwrap(), promotion["budget"].as_u64().unwrap());
        assert!(given > 0 && given <= budget && promotion["given"] == promotion["discount_in_orders"], "{promotion}");
    }
}

#[test]
fn bad_flags_are_refused_with_a_readable_message() {
    for (args, expected) in [
        (&["--checkouts", "0"][..], "--checkouts must be between 1 and"),
        (&["--buyers", "0"][..], "--buyers must be between 1 and"),
        (&["--concurrency", "0"][..], "--concurrency must be between 1 and"),
    ] {
        let output = bench(args);
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
