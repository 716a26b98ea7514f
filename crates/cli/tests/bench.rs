//! `peakstack bench transfers` as a user runs it: the binary, a short run,
//! the JSON summary it promises, and a readable refusal of bad flags.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_peakstack"))
        .args(["bench", "transfers"])
        .args(args)
        .output()
        .expect("running peakstack bench")
}

#[test]
fn a_short_bench_reports_its_figures_and_balanced_books() {
    let output = bench(&["--accounts", "1000", "--seconds", "1", "--json"]);
    assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let summary: Value = serde_json::from_str(stdout.lines().last().expect("a last line")).expect("JSON");
    assert_eq!(summary["invariants_ok"], true);
    assert_eq!(summary["errors"], 0, "random transfers without constraints are never refused");
    let ops = summary["ops"].as_u64().unwrap();
    assert!(ops > 0);
    let seconds = summary["seconds"].as_f64().unwrap();
    assert!((1.0..30.0).contains(&seconds), "{seconds}");
    let rate = summary["ops_per_s"].as_f64().unwrap();
    assert!((rate - ops as f64 / seconds).abs() < 1.0, "{rate} vs {ops} / {seconds}");
    let latency: Vec<u64> =
        ["p50_us", "p99_us", "p999_us", "max_us"].iter().map(|k| summary[k].as_u64().unwrap()).collect();
    assert!(latency.windows(2).all(|w| w[0] <= w[1]) && latency[0] > 0, "{latency:?}");
    assert!(summary["fsyncs"].as_u64().unwrap() > 0, "durable writes are on");
    assert!(summary["rss_mib"].as_f64().unwrap() > 1.0);
    // The CPU breakdown names the engine's threads and the clients.
    let cpu = summary["cpu_us_per_transfer"].as_object().expect("a map of thread names");
    for thread in ["apply", "log", "client", "main"] {
        assert!(cpu.get(thread).and_then(Value::as_f64).is_some_and(|us| us >= 0.0), "{thread} missing in {cpu:?}");
    }
    assert!(cpu["client"].as_f64().unwrap() > 0.0, "clients spent time making requests: {cpu:?}");
}

#[test]
fn bad_flags_are_refused_with_a_readable_message() {
    for (args, expected) in [
        (&["--accounts", "1"][..], "--accounts must be at least 2"),
        (&["--hot", "1.5"][..], "--hot must be between 0 and 1"),
        (&["--batch", "0"][..], "--batch must be between 1 and 8190"),
    ] {
        let output = bench(&[args, &["--seconds", "1"]].concat());
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
