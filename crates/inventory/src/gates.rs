//! The flash sales as every thread in front of the executors sees them: a
//! read-mostly registry of each sale's window and home shard, and its units
//! left as of the last durable batch.
//!
//! A sale's losers must not queue behind its winners' fsync: an attempt on
//! a sale that is not live or has nothing left is answered here, from
//! memory, without a message to the executor or a durable write. The
//! executor publishes `remaining` only after the batch that changed it is
//! durable, so "sold out" is never said of units a crash could give back.
//! A unit that comes back (a winner did not pay) raises it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use peakstack_domain::{ErrorCode, Id};

use crate::model::FlashSaleView;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// One sale's published view.
#[derive(Debug)]
pub struct SaleGate {
    /// The shard of the sale's SKU, which runs its attempts.
    pub shard: u32,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    remaining: AtomicU64,
}

impl SaleGate {
    /// The refusal this gate can give on its own at `now_ms`, if any.
    pub fn refusal(&self, now_ms: u64) -> Option<ErrorCode> {
        if now_ms < self.starts_at_ms {
            Some(ErrorCode::SaleNotStarted)
        } else if now_ms >= self.ends_at_ms {
            Some(ErrorCode::SaleEnded)
        } else if self.remaining.load(Ordering::Acquire) == 0 {
            Some(ErrorCode::SoldOut)
        } else {
            None
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }
}

/// Every sale of the engine, by id.
#[derive(Default, Debug)]
pub struct SaleGates {
    sales: RwLock<HashMap<Id, Arc<SaleGate>>>,
}

impl SaleGates {
    pub fn get(&self, id: &Id) -> Option<Arc<SaleGate>> {
        self.sales.read().get(id).cloned()
    }

    /// Publishes a sale's durable state: registers it the first time, then
    /// updates what is left. Called by the sale's one writer, in batch order.
    pub fn publish(&self, sale: &FlashSaleView, shard: u32) {
        if let Some(gate) = self.sales.read().get(&sale.id) {
            gate.remaining.store(sale.remaining(), Ordering::Release);
            return;
        }
        let gate = SaleGate {
            shard,
            starts_at_ms: sale.starts_at_ms,
            ends_at_ms: sale.ends_at_ms,
            remaining: AtomicU64::new(sale.remaining()),
        };
        self.sales.write().insert(sale.id.clone(), Arc::new(gate));
    }

    pub fn len(&self) -> usize {
        self.sales.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
