//! Where things live: ids -> shards -> executors.

use peakstack_domain::ledger::system_shard;
use peakstack_domain::{shard_of, Id, TransferRequest};

use crate::protocol::ExecutorId;

/// A client call's transfers for one coordinator: the executor, the
/// transfers' positions in the call, and the transfers.
pub type Route = (ExecutorId, Vec<usize>, Vec<TransferRequest>);

/// Most shards a data dir may have.
pub const MAX_SHARDS: u32 = 4096;
/// Most executors one process may run.
pub const MAX_EXECUTORS: u16 = 256;

/// The fixed shard count of a data dir and how shards are spread over the
/// executors of this process: shard `s` runs on executor `s % executors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    shards: u32,
    executors: u16,
}

impl Layout {
    pub fn new(shards: u32, executors: u16) -> Option<Layout> {
        let valid = (1..=MAX_SHARDS).contains(&shards) && (1..=MAX_EXECUTORS).contains(&executors);
        valid.then_some(Layout { shards, executors: executors.min(shards as u16) })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn executors(&self) -> u16 {
        self.executors
    }

    /// The shard of an account: by the documented hash, except system
    /// accounts, which name their shard (`_clearing.<shard>.<CUR>`,
    /// `_settle.<shard>.<CUR>.<merchant>`: see [`system_shard`]).
    pub fn shard_of_account(&self, id: &Id) -> u32 {
        match system_shard(id.as_str()) {
            Some(shard) if shard < self.shards => shard,
            _ => shard_of(id.as_str(), self.shards),
        }
    }

    pub fn executor_of_shard(&self, shard: u32) -> ExecutorId {
        (shard % u32::from(self.executors)) as ExecutorId
    }

    pub fn executor_of_account(&self, id: &Id) -> ExecutorId {
        self.executor_of_shard(self.shard_of_account(id))
    }

    /// The executor of an id's shard by the documented hash: where a
    /// SKU, a promotion or a coupon template lives.
    pub fn executor_of_id(&self, id: &Id) -> ExecutorId {
        self.executor_of_shard(shard_of(id.as_str(), self.shards))
    }

    /// The executor that keeps a transfer's record: the one of its id's
    /// shard (a trade flow's transfer names its object's: `_pay.ord_12_345`).
    pub fn executor_of_transfer(&self, id: &Id) -> ExecutorId {
        self.executor_of_shard(self.shard_of_account(id))
    }

    /// The executor that coordinates a transfer request: the one that keeps
    /// its record, or for a post or void the one that keeps the pending transfer.
    pub fn coordinator_of(&self, request: &TransferRequest) -> ExecutorId {
        self.executor_of_transfer(request.pending_id().unwrap_or(request.id()))
    }

    /// Splits a non-atomic call by coordinator; an atomic one goes whole to
    /// the coordinator of its first transfer.
    pub fn route(&self, requests: Vec<TransferRequest>, atomic: bool) -> Vec<Route> {
        if atomic || self.executors == 1 {
            let coordinator = requests.first().map(|r| self.coordinator_of(r)).unwrap_or(0);
            let indices = (0..requests.len()).collect();
            return vec![(coordinator, indices, requests)];
        }
        let mut groups: Vec<Route> = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            let coordinator = self.coordinator_of(&request);
            match groups.iter_mut().find(|g| g.0 == coordinator) {
                Some(group) => {
                    group.1.push(index);
                    group.2.push(request);
                }
                None => groups.push((coordinator, vec![index], vec![request])),
            }
        }
        groups
    }
}
