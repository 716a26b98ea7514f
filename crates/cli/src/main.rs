//! The peakstack binary.

mod bench;
mod bench_checkout;
mod bench_flash_sale;
mod bench_quote;
mod keys;
mod loadtest;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use peakstack_server::{AuthMode, ServerConfig, TlsFiles};

/// mimalloc instead of glibc's malloc: the HTTP path allocates per request
/// (JSON, headers, futures) and glibc's allocator was a third of the
/// server's profile under `loadtest transfers --batch 1000`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_e` of the
/// mimalloc (v3) that libmimalloc-sys 0.1.49 builds, whose Rust bindings do
/// not name it. A test checks it against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps memory freed by the process mapped instead of handing it back to
/// the OS a second later (mimalloc's default). The engine's threads free
/// large buffers on one thread and allocate them again on another, every
/// batch; with purging, new buffers came back as fresh pages, and zeroing
/// them (`clear_page_erms`, often whole 2 MiB huge pages) was up to a sixth
/// of the apply thread. `peakstack bench` page faults over 6 s: about 7,500
/// with purging after 1 s, 59,000 after 10 ms, about 400 without. Memory stays bounded by the engine's
/// own limits; the process keeps its peak instead of shrinking after a burst.
fn keep_freed_memory_mapped() {
    // SAFETY: sets an option of the allocator this binary links, which
    // mimalloc allows at any time from any thread; -1 is the documented
    // value for "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "peakstack",
    version,
    about = "The transaction core for peak commerce: a double-entry ledger with group commit."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API on an embedded data dir.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "PEAKSTACK_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Data directory (created if missing).
        #[arg(long, env = "PEAKSTACK_DATA", default_value = "./peakstack-data")]
        data: PathBuf,
        /// Logical shards; fixed when the data dir is created.
        #[arg(long, env = "PEAKSTACK_SHARDS", default_value_t = 64)]
        shards: u32,
        /// Executors (single-writer threads with their own log); fixed when
        /// the data dir is created. Default: one per two cores.
        #[arg(long, env = "PEAKSTACK_EXECUTORS")]
        executors: Option<u16>,
        /// Transfer records each executor keeps in memory before archiving
        /// the oldest final ones to disk.
        #[arg(long, env = "PEAKSTACK_RECORDS_IN_MEMORY", default_value_t = peakstack_engine::runtime::MAX_RECORDS_IN_MEMORY)]
        records_in_memory: usize,
        /// Bytes of log after which each executor writes a checkpoint.
        #[arg(long, env = "PEAKSTACK_CHECKPOINT_LOG_BYTES", default_value_t = peakstack_engine::runtime::CHECKPOINT_EVERY_LOG_BYTES)]
        checkpoint_log_bytes: u64,
        /// Serve without API keys: every caller is an admin. For local
        /// development only; the log and /readyz say so.
        #[arg(long, env = "PEAKSTACK_INSECURE_NO_AUTH")]
        insecure_no_auth: bool,
        /// PEM certificate chain: serve HTTPS (with --tls-key).
        #[arg(long, env = "PEAKSTACK_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, env = "PEAKSTACK_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address that is not loopback (only behind
        /// a proxy that terminates TLS).
        #[arg(long, env = "PEAKSTACK_ALLOW_PLAIN_HTTP")]
        allow_plain_http: bool,
        /// Milliseconds a request waits for the engine to decide; past it
        /// the answer is 503 `deadline_exceeded` (the request still runs:
        /// read its outcome by its id, or retry with its Idempotency-Key).
        #[arg(long, env = "PEAKSTACK_REQUEST_DEADLINE_MS", default_value_t = peakstack_server::DEFAULT_REQUEST_DEADLINE.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
        request_deadline_ms: u64,
        /// How long an Idempotency-Key is remembered (e.g. 24h, 90m,
        /// 7days): a retry after it runs the request again.
        #[arg(long, env = "PEAKSTACK_IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = peakstack_server::idempotency::parse_retention)]
        idempotency_retention: std::time::Duration,
        /// Settle every merchant with captured money this often (e.g. 1h,
        /// 1day); off unless given. See POST /v1/settlements.
        #[arg(long, env = "PEAKSTACK_SETTLE_EVERY", value_parser = peakstack_server::parse_settle_every)]
        settle_every: Option<std::time::Duration>,
        /// The platform's fee of a settlement, in basis points (250 = 2.5%),
        /// unless the request names one.
        #[arg(long, env = "PEAKSTACK_SETTLEMENT_FEE_BPS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        settlement_fee_bps: u32,
    },
    /// Manage API keys in a data dir whose server is stopped (a running
    /// server manages them over HTTP: POST/GET/DELETE /v1/keys).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Benchmark the engine in-process (durable writes, fresh temporary data dir).
    Bench {
        #[command(subcommand)]
        workload: BenchWorkload,
    },
    /// Load a running server over HTTP.
    Loadtest {
        scenario: LoadScenario,
        /// Base URL of the server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        target: String,
        /// Requests in flight (one connection each).
        #[arg(long, alias = "connections", default_value_t = 64)]
        concurrency: usize,
        #[arg(long, alias = "duration", default_value_t = 10.0)]
        seconds: f64,
        /// Transfers per request: 1 uses POST /v1/transfers, more uses /v1/transfers/batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Accounts to open and move money between (checkout: buyer wallets).
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// checkout: most checkouts to place; one coupon each is issued in setup.
        #[arg(long, default_value_t = 20_000)]
        checkouts: usize,
        /// Print one JSON object as the last line of stdout.
        #[arg(long)]
        json: bool,
        /// API key sent as `Authorization: Bearer <key>` (an admin key, or
        /// any key allowed to open accounts and move money).
        #[arg(long, env = "PEAKSTACK_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Send a fresh Idempotency-Key with every request (what a
        /// Stripe-style client does), to measure what the keys cost.
        #[arg(long)]
        idempotency_keys: bool,
        /// flash-sale: units of the SKU, all on the sale.
        #[arg(long, default_value_t = 10_000)]
        stock: u64,
        /// flash-sale: units one buyer may win.
        #[arg(long, default_value_t = 1)]
        limit: u32,
        /// flash-sale: buyers, drawn at random for every attempt.
        #[arg(long, default_value_t = 1_000_000)]
        buyers: u32,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key and print it once on stdout (only its hash is kept).
    Create {
        /// admin, read, app or merchant:<id>.
        #[arg(long)]
        scope: String,
        #[arg(long, env = "PEAKSTACK_DATA", default_value = "./peakstack-data")]
        data: PathBuf,
        /// When the key stops working: RFC 3339 in UTC, e.g. 2027-01-31T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// What the key is for (at most 256 characters).
        #[arg(long)]
        note: Option<String>,
    },
    /// List the keys (ids, prefixes, scopes, status; never secrets).
    List {
        #[arg(long, env = "PEAKSTACK_DATA", default_value = "./peakstack-data")]
        data: PathBuf,
    },
    /// Revoke a key by id.
    Revoke {
        id: String,
        #[arg(long, env = "PEAKSTACK_DATA", default_value = "./peakstack-data")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchWorkload {
    /// Random transfers between accounts.
    Transfers {
        #[arg(long, default_value_t = 100_000)]
        accounts: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Share of transfers (0..1) whose debit side is one of a few hot accounts.
        #[arg(long, default_value_t = 0.0)]
        hot: f64,
        /// Transfers per engine call (the latency percentiles are per call).
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Client threads submitting batches. Three keep one executor busy;
        /// four (4096 transfers in flight) queue behind each other: p99
        /// 1-2 ms higher for 0-3% more throughput, measured on 2 cores.
        #[arg(long, default_value_t = 3)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Default: one per two cores.
        #[arg(long)]
        executors: Option<u16>,
        /// Transfer records each executor keeps in memory before archiving.
        #[arg(long, default_value_t = peakstack_engine::runtime::MAX_RECORDS_IN_MEMORY)]
        records_in_memory: usize,
        /// Print one JSON object as the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Buyers racing for the units of one flash sale (durable winners,
    /// losers answered from memory); checks no oversell and the limit.
    FlashSale {
        #[arg(long, default_value_t = 1_000_000)]
        buyers: u32,
        #[arg(long, default_value_t = 10_000)]
        stock: u64,
        /// Units one buyer may win.
        #[arg(long, default_value_t = 1)]
        limit: u32,
        /// How many times every buyer tries.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        /// Attempts per engine call.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Default: one per two cores.
        #[arg(long)]
        executors: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Price the pricing fixture's carts (pure and in memory: no engine, no disk).
    Quote(bench_quote::QuoteArgs),
    /// Whole checkouts (carts of 3 lines from 2 merchants, 20 promotions, a
    /// coupon each, automatic capture) from concurrent tasks; checks stock,
    /// money, coupons, budgets and the ledger after.
    Checkout {
        #[arg(long, default_value_t = 200_000)]
        checkouts: usize,
        /// Buyers, each with a funded wallet; checkout i is buyer i % buyers's.
        #[arg(long, default_value_t = 10_000)]
        buyers: usize,
        /// Checkouts in flight (one tokio task each).
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Default: one per two cores.
        #[arg(long)]
        executors: Option<u16>,
        /// Print one JSON object as the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Prints a benchmark's summary: one JSON object as the last line of
/// stdout with `--json`, else for people.
fn report(summary: &impl serde::Serialize, json: bool, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        human();
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum LoadScenario {
    Transfers,
    Healthz,
    /// Buyers racing for a flash sale's units; checks the books after.
    FlashSale,
    /// Whole checkouts (POST /v1/checkouts); checks stock, money and coupons after.
    Checkout,
}

/// One executor per two cores: an executor keeps one core busy applying and
/// its log thread, the HTTP server and the clients need the rest. Measured on
/// a 2-core machine, one executor does about four times the transfers per
/// second of two (see ARCHITECTURE.md).
fn default_executors() -> u16 {
    std::thread::available_parallelism().map(|n| (n.get() / 2).clamp(1, 64) as u16).unwrap_or(1)
}

fn init_tracing(json_output: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PEAKSTACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if json_output { "warn" } else { "info" }));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> std::process::ExitCode {
    keep_freed_memory_mapped();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            data,
            shards,
            executors,
            records_in_memory,
            checkpoint_log_bytes,
            insecure_no_auth,
            tls_cert,
            tls_key,
            allow_plain_http,
            request_deadline_ms,
            idempotency_retention,
            settle_every,
            settlement_fee_bps,
        } => {
            init_tracing(false);
            let mut config = ServerConfig::new(listen, data.clone());
            config.auth = if insecure_no_auth { AuthMode::InsecureNoAuth } else { AuthMode::ApiKeys };
            config.tls = tls_cert.zip(tls_key).map(|(cert, key)| TlsFiles { cert, key });
            config.allow_plain_http = allow_plain_http;
            config.request_deadline = std::time::Duration::from_millis(request_deadline_ms);
            config.idempotency_retention = idempotency_retention;
            config.settle_every = settle_every;
            config.settlement_fee_bps = settlement_fee_bps;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(peakstack_server::preflight(&config))?;
            let engine = Engine::open(EngineConfig {
                data_dir: data.clone(),
                shards,
                executors: executors.unwrap_or_else(default_executors),
                clock: Arc::new(SystemClock),
                records_in_memory,
                checkpoint_every_log_bytes: checkpoint_log_bytes,
            })
            .with_context(|| format!("opening data dir {}", data.display()))?;
            let result = runtime.block_on(peakstack_server::serve(config, engine.clone(), shutdown_signal()));
            // In-flight requests are drained; now flush the logs and stop.
            engine.shutdown();
            tracing::info!("stopped");
            result
        }
        Command::Bench {
            workload:
                BenchWorkload::Transfers {
                    accounts,
                    seconds,
                    hot,
                    batch,
                    clients,
                    shards,
                    executors,
                    records_in_memory,
                    json,
                },
        } => {
            init_tracing(true);
            let summary = bench::run(bench::BenchConfig {
                accounts,
                seconds,
                hot,
                batch,
                clients,
                shards,
                executors: executors.unwrap_or_else(default_executors),
                records_in_memory,
                json,
            })?;
            report(&summary, json, || summary.print_human())?;
            if !summary.invariants_ok {
                anyhow::bail!("invariant check failed: balances do not sum to zero");
            }
            Ok(())
        }
        Command::Bench {
            workload: BenchWorkload::FlashSale { buyers, stock, limit, rounds, batch, clients, executors, json },
        } => {
            init_tracing(true);
            let summary = bench_flash_sale::run(bench_flash_sale::FlashSaleBenchConfig {
                buyers,
                stock,
                per_buyer_limit: limit,
                rounds,
                batch,
                clients,
                executors: executors.unwrap_or_else(default_executors),
            })?;
            report(&summary, json, || summary.print_human())?;
            if !summary.invariants_ok {
                anyhow::bail!("invariant check failed: oversold, a limit passed, or counters disagree");
            }
            Ok(())
        }
        Command::Bench { workload: BenchWorkload::Checkout { checkouts, buyers, concurrency, executors, json } } => {
            init_tracing(true);
            let summary = bench_checkout::run(bench_checkout::CheckoutBenchConfig {
                checkouts,
                buyers,
                concurrency,
                executors: executors.unwrap_or_else(default_executors),
                json,
            })?;
            report(&summary, json, || summary.print_human())?;
            if !summary.invariants_ok {
                anyhow::bail!("invariant check failed: {}", summary.failures.join("; "));
            }
            Ok(())
        }
        Command::Bench { workload: BenchWorkload::Quote(args) } => {
            init_tracing(true);
            bench_quote::run(args)
        }
        Command::Keys { action } => {
            init_tracing(true);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(keys::run(action))
        }
        Command::Loadtest {
            scenario,
            target,
            concurrency,
            seconds,
            batch,
            accounts,
            json,
            api_key,
            idempotency_keys,
            stock,
            limit,
            buyers,
            checkouts,
        } => {
            init_tracing(true);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let progress = !json && std::io::stderr().is_terminal();
            let scenario = match scenario {
                LoadScenario::Transfers => loadtest::Scenario::Transfers,
                LoadScenario::Healthz => loadtest::Scenario::Healthz,
                LoadScenario::Checkout => {
                    let summary = runtime.block_on(loadtest::run_checkout(loadtest::CheckoutLoadConfig {
                        target,
                        concurrency,
                        seconds,
                        checkouts,
                        wallets: accounts,
                        json,
                        progress,
                        api_key,
                    }))?;
                    report(&summary, json, || summary.print_human())?;
                    if !summary.invariants_ok {
                        anyhow::bail!("invariant check failed: {}", summary.failures.join("; "));
                    }
                    return Ok(());
                }
                LoadScenario::FlashSale => {
                    let summary = runtime.block_on(loadtest::run_flash_sale(loadtest::FlashSaleLoadConfig {
                        target,
                        concurrency,
                        seconds,
                        stock,
                        per_buyer_limit: limit,
                        buyers,
                        json,
                        progress,
                        api_key,
                        idempotency_keys,
                    }))?;
                    report(&summary, json, || summary.print_human())?;
                    if !summary.invariants_ok {
                        anyhow::bail!("invariant check failed: {}", summary.failures.join("; "));
                    }
                    return Ok(());
                }
            };
            let summary = runtime.block_on(loadtest::run(loadtest::LoadtestConfig {
                scenario,
                target,
                concurrency,
                seconds,
                batch,
                accounts,
                json,
                progress,
                api_key,
                idempotency_keys,
            }))?;
            if json {
                println!("{}", summary.to_json());
            } else {
                summary.print_human();
            }
            if summary.invariants_ok == Some(false) {
                anyhow::bail!("invariant check failed: balances do not sum to zero");
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is right: at it, mimalloc answers the purge delay's
    /// default (1000 ms) until it is set, then what was set.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads and sets allocator options, allowed at any time.
        let (before, numa_nodes) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1),
            )
        };
        // Nothing in this test process set it; the option after it is
        // `use_numa_nodes`, 0 by default.
        assert_eq!((before, numa_nodes), (1000, 0));
        keep_freed_memory_mapped();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    }
}
