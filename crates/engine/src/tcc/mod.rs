//! TCC between executors: the coordinator's global transactions
//! (`coordinator.rs`, their checkpoint form in `codec.rs`), the
//! participant's branches (`participant.rs`) and their fences (`fence.rs`).
//!
//! Every global transaction has a deadline, [`TXN_DEADLINE_MS`] after the
//! batch that started it, carried in its `Try` and `Decide` messages. A
//! coordinator never commits at or after it: an undecided transaction is
//! cancelled there (on the tick, as a logged [`Input::Deadlines`], or when
//! its last `Tried` comes late) and its client hears
//! `transaction_timed_out`. A participant refuses a `Try` that arrives at or
//! after the deadline and leaves nothing behind. On every tick the
//! coordinator sends `Try` again to the parts that have not answered and
//! `Decide` to those that have not acknowledged, each transaction backing
//! off from [`RESEND_MIN_MS`] to [`RESEND_MAX_MS`], until every branch has
//! answered, after a crash too; participants answer repeats from their
//! fences.
//!
//! Bounds, while both executors run: a transaction is decided at most one
//! tick (and one batch) after its deadline; a hold a transaction placed is
//! released or committed within one resend interval ([`RESEND_MAX_MS`])
//! and a delivery after that; a participant's fence is retained until
//! deadline + [`FENCE_RETENTION_MS`] after the coordinator forgot it, then
//! purged within a few ticks.
//!
//! [`Input::Deadlines`]: crate::protocol::Input::Deadlines

mod codec;
pub(crate) mod coordinator;
pub mod fence;
pub(crate) mod participant;

use crate::protocol::{ExecutorId, TxnId};

pub use coordinator::{BranchView, TxnFilter, TxnState, TxnView};

/// How long after its start a global transaction may still be decided to
/// commit (ms). A request deadline of the server is 5 s by default too.
pub const TXN_DEADLINE_MS: u64 = 5_000;
/// How long after its deadline a participant keeps a forgotten
/// transaction's fence (ms): a late message is answered from it until then.
pub const FENCE_RETENTION_MS: u64 = 30_000;
/// The first resend of a transaction's messages waits this long (ms);
/// each next one twice as long, up to [`RESEND_MAX_MS`]. Well above the
/// protocol's round trip under load (tens of ms), so a healthy run sends
/// nothing twice.
pub const RESEND_MIN_MS: u64 = 250;
pub const RESEND_MAX_MS: u64 = 4_000;
/// Most transactions one tick cancels at their deadline.
pub const MAX_TIMEOUTS_PER_TICK: usize = 1024;
/// Most transactions whose messages one tick sends again.
pub const MAX_RESENDS_PER_TICK: usize = 1024;
/// A deadline that was never given (a `Try` or `Decide` logged before
/// deadlines existed): the participant counts [`TXN_DEADLINE_MS`] from
/// when it applies it.
pub const NO_DEADLINE: u64 = u64::MAX;

/// Bits of a [`TxnId`] below the coordinator's executor id: its counter.
pub const TXN_COUNTER_BITS: u32 = 48;

/// The executor that coordinates `txn` (its id is in the top 16 bits).
pub fn coordinator_of(txn: TxnId) -> ExecutorId {
    (txn >> TXN_COUNTER_BITS) as ExecutorId
}

/// The coordinator's counter of `txn`.
pub fn counter_of(txn: TxnId) -> u64 {
    txn & ((1 << TXN_COUNTER_BITS) - 1)
}

/// The printable form of a transaction id: `txn_<executor>_<counter>`
/// (see [`peakstack_domain::AssignedKind::Transaction`]: the executor's
/// id is also the number of a shard it owns, so it routes as any assigned id).
pub fn txn_name(txn: TxnId) -> String {
    peakstack_domain::AssignedKind::Transaction.id(u32::from(coordinator_of(txn)), counter_of(txn)).to_string()
}

/// The transaction id a printable one names, if it is one.
pub fn parse_txn_name(text: &str) -> Option<TxnId> {
    let executor = peakstack_domain::AssignedKind::Transaction.shard_of(text)?;
    let executor = ExecutorId::try_from(executor).ok()?;
    let counter: u64 = text.rsplit('_').next()?.parse().ok()?;
    (counter > 0 && counter < 1 << TXN_COUNTER_BITS).then(|| u64::from(executor) << TXN_COUNTER_BITS | counter)
}

/// The deadline a participant keeps for a message that may carry none.
fn effective_deadline(deadline_ms: u64, now_ms: u64) -> u64 {
    match deadline_ms {
        NO_DEADLINE => now_ms.saturating_add(TXN_DEADLINE_MS),
        given => given,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_print_and_parse_back() {
        let txn = 3u64 << TXN_COUNTER_BITS | 41;
        assert_eq!(txn_name(txn), "txn_3_41");
        assert_eq!(parse_txn_name("txn_3_41"), Some(txn));
        for text in ["txn_3_0", "txn_70000_1", "txn_1", "rsv_1_2", "txn_1_281474976710656", "txn_a_1"] {
            assert_eq!(parse_txn_name(text), None, "{text}");
        }
    }
}
