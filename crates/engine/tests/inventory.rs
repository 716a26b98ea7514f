//! The inventory part hosted by the engine: commands routed to the executor
//! of their SKU, answered once durable; flash sales whose gate answers the
//! losers; deadlines run by the executor's tick; state kept across a
//! restart from the shutdown's checkpoint (the log's replay after a kill -9
//! is in the server's crash tests).

use std::sync::Arc;
use std::time::Duration;

use peakstack_domain::{Amount, Currency, ErrorCode, Id};
use peakstack_engine::inventory::{Answer, Command, NewFlashSale, NewSku, ReservationState};
use peakstack_engine::{Engine, EngineConfig, ManualClock};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn open(dir: &std::path::Path, executors: u16, clock: Arc<ManualClock>, checkpoint_bytes: u64) -> Engine {
    let config = EngineConfig {
        shards: 8,
        clock,
        checkpoint_every_log_bytes: checkpoint_bytes,
        ..EngineConfig::new(dir, executors)
    };
    Engine::open(config).unwrap()
}

fn new_sku(name: &str, stock: u64) -> Command {
    Command::CreateSku(NewSku {
        id: id(name),
        merchant_id: id("m1"),
        title: "Phone".into(),
        price: Amount::new(500).unwrap(),
        currency: Currency::parse("CNY").unwrap(),
        stock,
        per_buyer_limit: None,
    })
}

fn new_sale(name: &str, sku: &str, quantity: u64, starts_at_ms: u64) -> Command {
    Command::CreateFlashSale(NewFlashSale {
        id: id(name),
        sku_id: id(sku),
        price: Amount::new(1).unwrap(),
        quantity,
        starts_at_ms,
        ends_at_ms: starts_at_ms + 3_600_000,
        per_buyer_limit: 1,
        pay_within_ms: 60_000,
    })
}

fn attempt(sale: &str, buyer: &str) -> Command {
    Command::Attempt { shard: 0, sale_id: id(sale), buyer_id: id(buyer), quantity: 1 }
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

async fn won(engine: &Engine, sale: &str, buyers: std::ops::Range<u32>) -> (Vec<Id>, Vec<ErrorCode>) {
    let (mut ids, mut refusals) = (Vec::new(), Vec::new());
    for buyer in buyers {
        match engine.inventory(attempt(sale, &format!("b{buyer}"))).await {
            Ok(Answer::Reservation(r)) => ids.push(r.id),
            Err(code) => refusals.push(code),
            other => panic!("{other:?}"),
        }
    }
    (ids, refusals)
}

#[tokio::test]
async fn a_flash_sale_sells_its_units_once_across_executors_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let engine = open(dir.path(), 2, clock.clone(), 1 << 30);
    for sku in ["s1", "s2", "s3", "s4"] {
        assert!(matches!(engine.inventory(new_sku(sku, 10)).await, Ok(Answer::Sku { created: true, .. })));
    }
    assert_eq!(engine.inventory(attempt("f1", "b1")).await, Err(ErrorCode::FlashSaleNotFound));
    engine.inventory(new_sale("f1", "s3", 3, 2_000)).await.unwrap();
    // The gate answers before the sale starts, without the executor.
    assert_eq!(engine.inventory(attempt("f1", "b1")).await, Err(ErrorCode::SaleNotStarted));
    clock.advance(1_000);
    let (winners, refusals) = won(&engine, "f1", 0..10).await;
    assert_eq!(winners.len(), 3);
    assert!(refusals.iter().all(|c| *c == ErrorCode::SoldOut), "{refusals:?}");
    // Ids name the SKU's shard, so any of them routes without a lookup.
    let shard = id("s3").shard(8);
    assert!(winners.iter().all(|w| w.as_str().starts_with(&format!("rsv_{shard}_"))));
    assert_eq!(engine.sale_gates().get(&id("f1")).unwrap().remaining(), 0);
    engine.inventory(Command::Confirm { reservation_id: winners[0].clone() }).await.unwrap();
    engine.shutdown();

    // After a restart from the shutdown's checkpoint: the same counts, the
    // gate rebuilt, and the unpaid units come back when their deadline passes.
    let engine = open(dir.path(), 2, clock.clone(), 1 << 30);
    let sale = engine.flash_sale(&id("f1")).await.unwrap().unwrap();
    assert_eq!((sale.sold, sale.reserved, sale.remaining()), (1, 2, 0));
    assert_eq!(engine.inventory(attempt("f1", "b20")).await, Err(ErrorCode::SoldOut));
    clock.advance(60_000);
    wait_for(|| engine.sale_gates().get(&id("f1")).unwrap().remaining() == 2).await;
    let expired = engine.reservation(&winners[1]).await.unwrap().unwrap();
    assert!(matches!(expired.state, ReservationState::Expired { .. }));
    // A buyer who held a unit once may not try again (limit 1 counts sold units).
    assert_eq!(engine.inventory(attempt("f1", "b0")).await.err(), Some(ErrorCode::PurchaseLimitExceeded));
    let (again, _) = won(&engine, "f1", 30..40).await;
    assert_eq!(again.len(), 2);
    let sku = engine.sku(&id("s3")).await.unwrap().unwrap();
    assert_eq!((sku.stock, sku.sold, sku.reserved, sku.on_sale, sku.available()), (10, 1, 2, 0, 7));
    let page = engine.skus(Some(id("m1")), Some(id("s1")), 2).await.unwrap();
    assert_eq!(page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s2", "s3"]);
    assert_eq!(engine.reservation(&id("rsv_99_1")).await.unwrap(), None);
    assert_eq!(engine.reservation(&id("not-one")).await.unwrap(), None);
    engine.shutdown();
}
