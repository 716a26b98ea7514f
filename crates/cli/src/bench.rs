//! `peakstack bench transfers`: the engine in-process, durable writes on.
//!
//! Opens a fresh engine on a temporary data dir (fsync per group commit, as
//! in production), opens `accounts` accounts, then for `seconds` several
//! client threads each submit batches of random transfers (a share `hot` of
//! them touching a few hot accounts) and wait for the durable answer. Prints
//! throughput and the latency of the batch calls, then checks the books.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use peakstack_domain::{Amount, Currency, Id, NewAccount, TransferRequest};
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use rand::{Rng, SeedableRng};

/// Hot accounts the `hot` share of transfers goes to.
const HOT_ACCOUNTS: usize = 8;
/// Accounts opened per request while loading.
const ACCOUNT_LOAD_CHUNK: usize = 10_000;

pub struct BenchConfig {
    pub accounts: usize,
    pub seconds: f64,
    pub hot: f64,
    pub batch: usize,
    pub clients: usize,
    pub shards: u32,
    pub executors: u16,
    pub records_in_memory: usize,
    pub json: bool,
}

#[derive(serde::Serialize)]
pub struct BenchSummary {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_s: f64,
    /// Latency of one batch call (submit to durable answer), microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub batch: usize,
    pub accounts: usize,
    pub executors: u16,
    pub shards: u32,
    pub fsyncs: u64,
    pub log_mib: f64,
    pub rss_mib: f64,
    /// Archive run files on disk at the end, all executors (each archive
    /// lookup that the filter lets through reads one block per file).
    pub archive_files: usize,
    /// CPU time per transfer made, microseconds, by thread name (numbered
    /// threads summed: `apply`, `log`, `client`, ...), over the timed run.
    /// On a noisy machine this is steadier than the throughput.
    pub cpu_us_per_transfer: BTreeMap<String, f64>,
    pub invariants_ok: bool,
}

pub fn run(config: BenchConfig) -> anyhow::Result<BenchSummary> {
    if config.accounts < 2 {
        bail!("--accounts must be at least 2");
    }
    if !(0.0..=1.0).contains(&config.hot) {
        bail!("--hot must be between 0 and 1");
    }
    if config.batch == 0 || config.batch > 8190 {
        bail!("--batch must be between 1 and 8190");
    }
    let dir = tempfile::Builder::new().prefix("peakstack-bench-").tempdir().context("creating a temporary data dir")?;
    let engine = Engine::open(EngineConfig {
        data_dir: dir.path().to_path_buf(),
        shards: config.shards,
        executors: config.executors,
        clock: Arc::new(SystemClock),
        records_in_memory: config.records_in_memory,
        checkpoint_every_log_bytes: peakstack_engine::runtime::CHECKPOINT_EVERY_LOG_BYTES,
    })?;
    let usd = Currency::parse("USD").expect("valid");
    let names: Arc<Vec<Id>> =
        Arc::new((0..config.accounts).map(|n| Id::parse(&format!("bench-{n}")).expect("valid")).collect());
    let started = Instant::now();
    for chunk in names.chunks(ACCOUNT_LOAD_CHUNK) {
        let accounts = chunk
            .iter()
            .map(|id| NewAccount {
                id: id.clone(),
                currency: usd,
                flags: Default::default(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            })
            .collect();
        for answer in engine.create_accounts_blocking(accounts) {
            answer.map_err(|code| anyhow::anyhow!("opening accounts failed: {code}"))?;
        }
    }
    if !config.json {
        eprintln!("opened {} accounts in {:.1}s", config.accounts, started.elapsed().as_secs_f64());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_before = thread_cpu();
    let run_started = Instant::now();
    let deadline = run_started + Duration::from_secs_f64(config.seconds);
    let mut threads = Vec::new();
    for client in 0..config.clients {
        let engine = engine.clone();
        let names = names.clone();
        let (stop, ops, errors) = (stop.clone(), ops.clone(), errors.clone());
        let (batch, hot) = (config.batch, config.hot);
        let spawned =
            std::thread::Builder::new().name(format!("client-{client}")).spawn(move || -> (Histogram<u64>, f64) {
                let cpu_started = this_thread_cpu_seconds();
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let mut rng = rand::rngs::SmallRng::seed_from_u64(client as u64 + 1);
                let mut counter = 0u64;
                // Transfer ids `c{client}-{counter}`, written into one buffer
                // (a `format!` per transfer was a tenth of the bench's CPU).
                let prefix = format!("c{client}-");
                let mut id_text = String::with_capacity(prefix.len() + 20);
                let mut digits = itoa::Buffer::new();
                // Bounded by the deadline: every iteration checks it.
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let requests: Vec<TransferRequest> = (0..batch)
                        .map(|_| {
                            counter += 1;
                            let (debit, credit) = pick_pair(&mut rng, names.len(), hot);
                            TransferRequest::Create {
                                id: {
                                    id_text.clear();
                                    id_text.push_str(&prefix);
                                    id_text.push_str(digits.format(counter));
                                    Id::parse(&id_text).expect("valid")
                                },
                                debit_account_id: names[debit].clone(),
                                credit_account_id: names[credit].clone(),
                                amount: Amount::new(rng.random_range(1..=1000)).expect("positive"),
                                currency: usd,
                                pending: false,
                                timeout_ms: 0,
                                details: None,
                            }
                        })
                        .collect();
                    let sent = Instant::now();
                    let results = engine.create_transfers_blocking(requests, false);
                    histogram.saturating_record(sent.elapsed().as_micros() as u64);
                    let failed = results.iter().filter(|r| !r.as_ref().is_ok_and(|o| o.created)).count() as u64;
                    ops.fetch_add(results.len() as u64 - failed, Ordering::Relaxed);
                    errors.fetch_add(failed, Ordering::Relaxed);
                }
                (histogram, this_thread_cpu_seconds() - cpu_started)
            });
        threads.push(spawned.context("starting a client thread")?);
    }
    let progress = (!config.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new((config.seconds * 10.0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}").expect("valid template"),
        );
        bar
    });
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(bar) = &progress {
            bar.inc(1);
            let elapsed = run_started.elapsed().as_secs_f64();
            bar.set_message(format!("{:.0} transfers/s", ops.load(Ordering::Relaxed) as f64 / elapsed));
        }
    }
    let mut cpu_after = thread_cpu();
    // Clients may end before that reading: each counts its own time.
    cpu_after.remove("client");
    stop.store(true, Ordering::Relaxed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for thread in threads {
        let (client_histogram, client_cpu) = thread.join().expect("client thread");
        histogram.add(client_histogram).expect("same bounds");
        *cpu_after.entry("client".to_string()).or_insert(0.0) += client_cpu;
    }
    let seconds = run_started.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    // Every call was answered, so nothing is in flight: the books must balance.
    let totals = engine.totals_blocking().map_err(|code| anyhow::anyhow!("reading totals failed: {code}"))?;
    let invariants_ok = totals.net == 0 && totals.clearing_net == 0 && totals.txns_in_flight == 0;
    let stats = engine.stats();
    let summary = BenchSummary {
        ops: ops.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds,
        ops_per_s: ops.load(Ordering::Relaxed) as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        batch: config.batch,
        accounts: config.accounts,
        executors: engine.layout().executors(),
        shards: engine.layout().shards(),
        fsyncs: stats.fsyncs.load(Ordering::Relaxed),
        log_mib: stats.log_bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
        rss_mib: rss_mib(),
        archive_files: archive_files(dir.path()),
        cpu_us_per_transfer: cpu_per_transfer(&cpu_before, &cpu_after, ops.load(Ordering::Relaxed)),
        invariants_ok,
    };
    engine.shutdown();
    Ok(summary)
}

fn pick_pair(rng: &mut impl Rng, accounts: usize, hot: f64) -> (usize, usize) {
    loop {
        let debit = if rng.random_bool(hot) {
            rng.random_range(0..HOT_ACCOUNTS.min(accounts))
        } else {
            rng.random_range(0..accounts)
        };
        let credit = rng.random_range(0..accounts);
        if debit != credit {
            return (debit, credit);
        }
    }
}

/// Run files in the archives of the data dir (`executor-*/archive/run-*.dat`).
fn archive_files(data_dir: &std::path::Path) -> usize {
    let Ok(executors) = std::fs::read_dir(data_dir) else { return 0 };
    executors
        .filter_map(|e| std::fs::read_dir(e.ok()?.path().join("archive")).ok())
        .flatten()
        .filter(|f| {
            f.as_ref()
                .is_ok_and(|f| f.file_name().to_str().is_some_and(|n| n.starts_with("run-") && n.ends_with(".dat")))
        })
        .count()
}

/// CPU seconds each thread of this process has used, by thread name with
/// its number dropped (`apply-0` and `apply-1` count as `apply`), from
/// /proc (Linux; empty elsewhere). Threads that ended are not counted.
pub(crate) fn thread_cpu() -> BTreeMap<String, f64> {
    let mut seconds = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return seconds };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: the name may hold spaces, so split after
        // its closing parenthesis; utime and stime are fields 14 and 15.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |at: usize| fields.get(at).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        // The main thread carries the program's name: call it `main`.
        let main = task.file_name().to_str() == Some(&std::process::id().to_string());
        let name = if main {
            "main"
        } else {
            stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches('-')
        };
        *seconds.entry(name.to_string()).or_insert(0.0) += (ticks(11) + ticks(12)) as f64 / ticks_per_s;
    }
    seconds
}

/// CPU seconds the calling thread has used.
fn this_thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// Microseconds of CPU per transfer made, by thread name, between two
/// readings of [`thread_cpu`]; rounded to hundredths.
pub(crate) fn cpu_per_transfer(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    transfers: u64,
) -> BTreeMap<String, f64> {
    let transfers = transfers.max(1) as f64;
    after
        .iter()
        .map(|(name, &spent)| {
            let used = spent - before.get(name).copied().unwrap_or(0.0);
            (name.clone(), (used * 1e6 / transfers * 100.0).round() / 100.0)
        })
        .collect()
}

/// Resident memory of this process, from /proc (Linux).
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let kib = line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()?;
                Some(kib / 1024.0)
            })
        })
        .unwrap_or(0.0)
}

impl BenchSummary {
    pub fn print_human(&self) {
        println!("transfers     {} ({} refused)", self.ops, self.errors);
        println!("seconds       {:.2}", self.seconds);
        println!("throughput    {:.0} transfers/s", self.ops_per_s);
        println!(
            "batch latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms (batches of {})",
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.p999_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
            self.batch
        );
        println!("layout        {} shards on {} executors, {} accounts", self.shards, self.executors, self.accounts);
        println!("durability    {} fsyncs, {:.1} MiB of log", self.fsyncs, self.log_mib);
        println!("memory        {:.0} MiB resident", self.rss_mib);
        if !self.cpu_us_per_transfer.is_empty() {
            let total: f64 = self.cpu_us_per_transfer.values().sum();
            let threads: Vec<String> =
                self.cpu_us_per_transfer.iter().map(|(name, us)| format!("{name} {us:.2}")).collect();
            println!("cpu           {total:.2} us per transfer ({})", threads.join(", "));
        }
        println!("archive       {} run files", self.archive_files);
        println!("invariants    {}", if self.invariants_ok { "ok (all balances sum to zero)" } else { "BROKEN" });
    }
}
