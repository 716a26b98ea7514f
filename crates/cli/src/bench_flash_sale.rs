//! `peakstack bench flash-sale`: a million buyers race for K units of one
//! hot SKU, in-process, durable. Every buyer tries `rounds` times (so the
//! purchase limit is hit too), in batches from several client threads; the
//! winners' reservations are fsynced, the losers after the sale is sold out
//! are answered by its gate. At the end: exactly min(K, buyers x limit)
//! units reserved, no buyer past the limit, and the engine's counters agree
//! with the answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use peakstack_domain::{Amount, Currency, ErrorCode, Id};
use peakstack_engine::inventory::{Answer, Command, NewFlashSale, NewSku};
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub struct FlashSaleBenchConfig {
    pub buyers: u32,
    pub stock: u64,
    pub per_buyer_limit: u32,
    pub rounds: u32,
    pub batch: usize,
    pub clients: usize,
    pub executors: u16,
}

#[derive(serde::Serialize)]
pub struct FlashSaleBenchSummary {
    pub attempts: u64,
    pub seconds: f64,
    pub attempts_per_s: f64,
    pub won: u64,
    pub sold_out: u64,
    pub limit_refusals: u64,
    pub other_refusals: u64,
    pub buyers: u32,
    pub stock: u64,
    pub per_buyer_limit: u32,
    pub fsyncs: u64,
    pub oversold: u64,
    pub buyers_past_limit: u64,
    pub invariants_ok: bool,
}

impl FlashSaleBenchSummary {
    pub fn print_human(&self) {
        println!(
            "{} attempts in {:.2}s: {:.0} attempts/s; {} won, {} sold out, {} over the limit, {} other; {} fsyncs",
            self.attempts,
            self.seconds,
            self.attempts_per_s,
            self.won,
            self.sold_out,
            self.limit_refusals,
            self.other_refusals,
            self.fsyncs
        );
        println!(
            "invariants: oversold {}, buyers past the limit {} -> {}",
            self.oversold,
            self.buyers_past_limit,
            if self.invariants_ok { "ok" } else { "BROKEN" }
        );
    }
}

pub fn run(config: FlashSaleBenchConfig) -> anyhow::Result<FlashSaleBenchSummary> {
    if config.buyers == 0 || config.stock == 0 || config.per_buyer_limit == 0 || config.rounds == 0 {
        bail!("--buyers, --stock, --limit and --rounds must be at least 1");
    }
    if config.batch == 0 || config.clients == 0 {
        bail!("--batch and --clients must be at least 1");
    }
    let dir = tempfile::Builder::new().prefix("peakstack-bench-").tempdir().context("creating a temporary data dir")?;
    let engine = Engine::open(EngineConfig {
        shards: 64,
        clock: Arc::new(SystemClock),
        ..EngineConfig::new(dir.path(), config.executors)
    })?;
    let sku_id = Id::parse("hot-sku").expect("valid");
    let sale_id = Id::parse("hot-sale").expect("valid");
    let setup = vec![
        Command::CreateSku(NewSku {
            id: sku_id.clone(),
            merchant_id: Id::parse("m1").expect("valid"),
            title: "The hot one".into(),
            price: Amount::new(99_900).expect("valid"),
            currency: Currency::parse("CNY").expect("valid"),
            stock: config.stock,
            per_buyer_limit: None,
        }),
        Command::CreateFlashSale(NewFlashSale {
            id: sale_id.clone(),
            sku_id: sku_id.clone(),
            price: Amount::new(1).expect("valid"),
            quantity: config.stock,
            starts_at_ms: 0,
            ends_at_ms: u64::MAX / 2,
            per_buyer_limit: config.per_buyer_limit,
            pay_within_ms: peakstack_engine::inventory::DEFAULT_PAY_WITHIN_MS,
        }),
    ];
    for reply in engine.inventory_blocking(setup) {
        reply.map_err(|code| anyhow::anyhow!("setting up the sale failed: {code}"))?;
    }
    // Every buyer `rounds` times, shuffled, split among the clients.
    let mut order: Vec<u32> = (0..config.rounds).flat_map(|_| 0..config.buyers).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
    let buyer_ids: Arc<Vec<Id>> =
        Arc::new((0..config.buyers).map(|b| Id::parse(&format!("buyer-{b}")).expect("valid")).collect());
    let chunk = order.len().div_ceil(config.clients);
    let tallies = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let fsyncs_before = engine.stats().fsyncs.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut threads = Vec::new();
    for part in order.chunks(chunk).map(<[u32]>::to_vec) {
        let (engine, buyer_ids, tallies, sale_id) =
            (engine.clone(), buyer_ids.clone(), tallies.clone(), sale_id.clone());
        let batch = config.batch;
        threads.push(std::thread::spawn(move || {
            let mut won: HashMap<u32, u32> = HashMap::new();
            for buyers in part.chunks(batch) {
                let commands = buyers
                    .iter()
                    .map(|b| Command::Attempt {
                        shard: 0,
                        sale_id: sale_id.clone(),
                        buyer_id: buyer_ids[*b as usize].clone(),
                        quantity: 1,
                    })
                    .collect();
                for (buyer, reply) in buyers.iter().zip(engine.inventory_blocking(commands)) {
                    let slot = match reply {
                        Ok(Answer::Reservation(_)) => {
                            *won.entry(*buyer).or_insert(0) += 1;
                            0
                        }
                        Err(ErrorCode::SoldOut) => 1,
                        Err(ErrorCode::PurchaseLimitExceeded) => 2,
                        _ => 3,
                    };
                    tallies[slot].fetch_add(1, Ordering::Relaxed);
                }
            }
            won
        }));
    }
    let mut won_by: HashMap<u32, u32> = HashMap::new();
    for thread in threads {
        for (buyer, units) in thread.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))? {
            *won_by.entry(buyer).or_insert(0) += units;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let fsyncs = engine.stats().fsyncs.load(Ordering::Relaxed) - fsyncs_before;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (sale, sku) = runtime.block_on(async { (engine.flash_sale(&sale_id).await, engine.sku(&sku_id).await) });
    let sale = sale.map_err(|c| anyhow::anyhow!("{c}"))?.context("the sale is gone")?;
    let sku = sku.map_err(|c| anyhow::anyhow!("{c}"))?.context("the SKU is gone")?;
    engine.shutdown();

    let won: u64 = won_by.values().map(|u| u64::from(*u)).sum();
    let expected = config.stock.min(u64::from(config.buyers) * u64::from(config.per_buyer_limit));
    let oversold = (sale.sold + sale.reserved).saturating_sub(config.stock);
    let buyers_past_limit = won_by.values().filter(|u| **u > config.per_buyer_limit).count() as u64;
    let counters_agree = sale.reserved + sale.sold == won && sku.reserved + sku.sold == won;
    let attempts = order.len() as u64;
    Ok(FlashSaleBenchSummary {
        attempts,
        seconds,
        attempts_per_s: attempts as f64 / seconds,
        won,
        sold_out: tallies[1].load(Ordering::Relaxed),
        limit_refusals: tallies[2].load(Ordering::Relaxed),
        other_refusals: tallies[3].load(Ordering::Relaxed),
        buyers: config.buyers,
        stock: config.stock,
        per_buyer_limit: config.per_buyer_limit,
        fsyncs,
        oversold,
        buyers_past_limit,
        invariants_ok: oversold == 0 && buyers_past_limit == 0 && counters_agree && won == expected,
    })
}
