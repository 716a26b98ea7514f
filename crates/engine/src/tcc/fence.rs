//! The fences of the transactions an executor takes part in.
//!
//! A participant keeps a *live* fence per transaction from its first
//! message (a `Try`, or a cancel that overtook it) until the coordinator's
//! `Forget`: it answers repeats (the same `Tried`, the same `Acked`) and
//! says what a cancel must release. Every fence changes only as the effect
//! of a logged message, so a replay rebuilds them exactly.
//!
//! After `Forget` only the fact that the transaction ended here, and how,
//! is *retained*, until the transaction's deadline plus
//! [`FENCE_RETENTION_MS`]: a duplicated or reordered `Try` arriving before
//! its deadline then finds it and is refused, a repeated `Decide` is
//! answered without effect. After that the deadline alone refuses a `Try`
//! and a `Decide` is known stale, so the retained fence is purged (on the
//! tick, bounded per tick; lazily, unlogged: a fence purged or not answers
//! the same). Retained fences are bits: the coordinator's transaction
//! counters are dense and their deadlines grow with them, so each
//! coordinator gets a window of blocks of 64 counters, two bits of state
//! each, dropped from the front once the block's latest expiry passed.

use std::collections::{BTreeMap, VecDeque};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use peakstack_domain::{Balances, Id, Side};

use super::FENCE_RETENTION_MS;
use crate::codec::{Codec, CodecError, Reader, Writer};
use crate::protocol::{ExecutorId, OpResult, TxnId};

type Result<T> = std::result::Result<T, CodecError>;

/// How many blocks of retained fences one tick may drop, over all coordinators.
pub const MAX_FENCE_BLOCKS_PURGED_PER_TICK: usize = 4096;
/// The widest window of retained fences per coordinator, in blocks of 64
/// counters (2^26 transactions: far more than any coordinator starts within
/// a deadline and the retention). A fence past it is kept aside instead.
const MAX_RETAINED_BLOCKS: u64 = 1 << 20;

/// What a cancel must give back of one try op that succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Undo {
    /// A transfer id reserved on its home shard.
    Reservation(Id),
    /// A leg held on one of this executor's accounts.
    Hold(Id, Side),
    /// A pending transfer locked for a post, void or expiry.
    Lock(Id),
    /// A part's branch: its cancel command.
    Part(crate::parts::PartCommand),
}

/// A try's answer as a fence keeps it, to answer a repeat.
#[derive(Clone, Debug, PartialEq)]
pub enum TryAnswer {
    /// This many ops, each plainly `Ok` (nearly every try: nothing to copy).
    AllOk(usize),
    Results(Vec<OpResult>),
}

impl TryAnswer {
    pub fn of(results: &[OpResult]) -> TryAnswer {
        match results.iter().all(|r| *r == OpResult::Ok) {
            true => TryAnswer::AllOk(results.len()),
            false => TryAnswer::Results(results.to_vec()),
        }
    }

    pub fn results(&self) -> Vec<OpResult> {
        match self {
            TryAnswer::AllOk(ops) => vec![OpResult::Ok; *ops],
            TryAnswer::Results(results) => results.clone(),
        }
    }

    /// The first op that did not succeed (then the try cannot commit).
    pub fn refused(&self) -> Option<usize> {
        match self {
            TryAnswer::AllOk(_) => None,
            TryAnswer::Results(results) => {
                results.iter().position(|r| matches!(r, OpResult::Err(_) | OpResult::Exists(_)))
            }
        }
    }
}

/// A participant's fence while its coordinator still runs the transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Fence {
    /// The try was applied: its answer, and what a cancel releases (nothing
    /// when any op was refused: the try was all or nothing).
    Tried { answer: TryAnswer, undo: Vec<Undo>, deadline_ms: u64 },
    /// The decision was applied; the balances it answered with, for a repeat.
    Decided { commit: bool, balances: Vec<(Id, Balances)>, deadline_ms: u64 },
    /// A cancel arrived before its try: the try will be refused.
    Suspended { deadline_ms: u64 },
}

impl Fence {
    pub fn deadline_ms(&self) -> u64 {
        match self {
            Fence::Tried { deadline_ms, .. }
            | Fence::Decided { deadline_ms, .. }
            | Fence::Suspended { deadline_ms } => *deadline_ms,
        }
    }

    pub fn state(&self) -> FenceState {
        match self {
            Fence::Tried { .. } => FenceState::Tried,
            Fence::Decided { commit: true, .. } => FenceState::Confirmed,
            Fence::Decided { commit: false, .. } => FenceState::Cancelled,
            Fence::Suspended { .. } => FenceState::Suspended,
        }
    }

    /// Whether every op of the try succeeded (a commit may follow).
    pub fn tried_ok(results: &[OpResult]) -> bool {
        !results.iter().any(|r| matches!(r, OpResult::Err(_) | OpResult::Exists(_)))
    }
}

/// The states of a fence (the names operators see).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceState {
    Tried,
    Confirmed,
    Cancelled,
    Suspended,
}

impl FenceState {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceState::Tried => "tried",
            FenceState::Confirmed => "confirmed",
            FenceState::Cancelled => "cancelled",
            FenceState::Suspended => "suspended",
        }
    }

    fn tag(self) -> u8 {
        match self {
            FenceState::Tried => 0,
            FenceState::Confirmed => 1,
            FenceState::Cancelled => 2,
            FenceState::Suspended => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<FenceState> {
        [FenceState::Tried, FenceState::Confirmed, FenceState::Cancelled, FenceState::Suspended]
            .get(usize::from(tag))
            .copied()
    }
}

/// A fence as [`Fences::get`] finds it.
#[derive(Debug, PartialEq)]
pub enum Found<'a> {
    Live(&'a Fence),
    /// The coordinator forgot the transaction; this is how it ended here.
    Retained(FenceState),
    None,
}

/// 64 consecutive transaction counters of one coordinator, two bits each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Block {
    present: u64,
    /// With `present`: bit set in `high`/`low` = the state's tag bits.
    high: u64,
    low: u64,
    /// The latest expiry of a fence in the block (0 when none).
    expires_at_ms: u64,
}

/// The retained fences of one coordinator.
#[derive(Clone, Debug, Default, PartialEq)]
struct Window {
    /// The counter of bit 0 of `blocks[0]`, a multiple of 64.
    base: u64,
    blocks: VecDeque<Block>,
    /// Fences below `base` or past [`MAX_RETAINED_BLOCKS`] (rare: a
    /// transaction forgotten long after the ones around it), with their expiry.
    aside: BTreeMap<TxnId, (FenceState, u64)>,
}

const COUNTER_MASK: u64 = (1 << super::TXN_COUNTER_BITS) - 1;

impl Window {
    fn slot(&self, counter: u64) -> Option<(usize, u32)> {
        let offset = counter.checked_sub(self.base)?;
        let block = offset / 64;
        (block < self.blocks.len() as u64).then_some((block as usize, (offset % 64) as u32))
    }

    fn get(&self, txn: TxnId) -> Option<FenceState> {
        if let Some((state, _)) = self.aside.get(&txn) {
            return Some(*state);
        }
        let (block, bit) = self.slot(txn & COUNTER_MASK)?;
        let b = &self.blocks[block];
        if b.present >> bit & 1 == 0 {
            return None;
        }
        FenceState::from_tag(((b.high >> bit & 1) << 1 | (b.low >> bit & 1)) as u8)
    }

    fn insert(&mut self, txn: TxnId, state: FenceState, expires_at_ms: u64) {
        let counter = txn & COUNTER_MASK;
        if self.blocks.is_empty() {
            self.base = counter - counter % 64;
        }
        let fits = counter >= self.base && (counter - self.base) / 64 < MAX_RETAINED_BLOCKS;
        if !fits {
            self.aside.insert(txn, (state, expires_at_ms));
            return;
        }
        let block = ((counter - self.base) / 64) as usize;
        while self.blocks.len() <= block {
            self.blocks.push_back(Block::default());
        }
        let bit = counter % 64;
        let tag = u64::from(state.tag());
        let b = &mut self.blocks[block];
        b.present |= 1 << bit;
        b.high = b.high & !(1 << bit) | (tag >> 1) << bit;
        b.low = b.low & !(1 << bit) | (tag & 1) << bit;
        b.expires_at_ms = b.expires_at_ms.max(expires_at_ms);
    }

    /// Drops up to `budget` blocks whose every fence expired by `now_ms`
    /// (and the fences kept aside that did); answers what it used.
    fn purge(&mut self, now_ms: u64, budget: usize) -> usize {
        let mut used = 0;
        while used < budget && self.blocks.front().is_some_and(|b| b.expires_at_ms <= now_ms) {
            self.blocks.pop_front();
            self.base += 64;
            used += 1;
        }
        if !self.aside.is_empty() && used < budget {
            let expired: Vec<TxnId> = self
                .aside
                .iter()
                .filter(|(_, (_, at))| *at <= now_ms)
                .take(budget - used)
                .map(|(txn, _)| *txn)
                .collect();
            used += expired.len();
            for txn in expired {
                self.aside.remove(&txn);
            }
        }
        used
    }

    fn count(&self) -> usize {
        self.blocks.iter().map(|b| b.present.count_ones() as usize).sum::<usize>() + self.aside.len()
    }

    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.aside.is_empty()
    }
}

/// Every fence of one executor.
#[derive(Default)]
pub struct Fences {
    live: HashMap<TxnId, Fence>,
    retained: BTreeMap<ExecutorId, Window>,
}

impl Fences {
    pub fn get(&self, txn: TxnId) -> Found<'_> {
        if let Some(fence) = self.live.get(&txn) {
            return Found::Live(fence);
        }
        match self.retained.get(&super::coordinator_of(txn)).and_then(|w| w.get(txn)) {
            Some(state) => Found::Retained(state),
            None => Found::None,
        }
    }

    pub fn insert(&mut self, txn: TxnId, fence: Fence) {
        self.live.insert(txn, fence);
    }

    pub fn take_live(&mut self, txn: TxnId) -> Option<Fence> {
        self.live.remove(&txn)
    }

    /// The coordinator forgot `txn`: its live fence becomes a retained one.
    /// A tried fence stays live (it holds what only a decision may release;
    /// a coordinator forgets only what every participant acknowledged).
    pub fn forget(&mut self, txn: TxnId) {
        if matches!(self.live.get(&txn), None | Some(Fence::Tried { .. })) {
            return;
        }
        let fence = self.live.remove(&txn).expect("present");
        let expires_at_ms = fence.deadline_ms().saturating_add(FENCE_RETENTION_MS);
        self.retained.entry(super::coordinator_of(txn)).or_default().insert(txn, fence.state(), expires_at_ms);
    }

    /// Drops a fence without retaining it (the coordinator's own part, to
    /// which no message ever comes).
    pub fn drop_live(&mut self, txn: TxnId) {
        self.live.remove(&txn);
    }

    /// Purges retained fences that expired by `now_ms`, at most
    /// [`MAX_FENCE_BLOCKS_PURGED_PER_TICK`] blocks a call.
    pub fn purge(&mut self, now_ms: u64) {
        let mut budget = MAX_FENCE_BLOCKS_PURGED_PER_TICK;
        for window in self.retained.values_mut() {
            budget -= window.purge(now_ms, budget);
            if budget == 0 {
                break;
            }
        }
        self.retained.retain(|_, window| !window.is_empty());
    }

    /// Live fences: transactions not yet forgotten by their coordinator.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Retained fences of transactions their coordinator forgot.
    pub fn retained_count(&self) -> usize {
        self.retained.values().map(Window::count).sum()
    }

    pub fn live(&self) -> impl Iterator<Item = (&TxnId, &Fence)> {
        self.live.iter()
    }

    // ---- checkpoint -----------------------------------------------------

    /// Live fences in transaction order, then each coordinator's window.
    pub fn encode(&self, w: &mut Writer) {
        let mut live: Vec<(&TxnId, &Fence)> = self.live.iter().collect();
        live.sort_unstable_by_key(|(txn, _)| **txn);
        w.varint(live.len() as u64);
        for (txn, fence) in live {
            w.u64(*txn);
            fence.encode(w);
        }
        w.varint(self.retained.len() as u64);
        for (coordinator, window) in &self.retained {
            w.varint(u64::from(*coordinator));
            w.varint(window.base);
            w.varint(window.blocks.len() as u64);
            for b in &window.blocks {
                for word in [b.present, b.high, b.low] {
                    w.u64(word);
                }
                w.varint(b.expires_at_ms);
            }
            w.varint(window.aside.len() as u64);
            for (txn, (state, at)) in &window.aside {
                w.u64(*txn);
                w.u8(state.tag());
                w.varint(*at);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Fences> {
        let mut fences = Fences::default();
        for _ in 0..r.len()? {
            let txn = r.u64()?;
            if fences.live.insert(txn, Fence::decode(r)?).is_some() {
                return Err(CodecError("a fence appears twice"));
            }
        }
        for _ in 0..r.len()? {
            let coordinator = u16::try_from(r.varint()?).map_err(|_| CodecError("invalid executor"))?;
            let base = r.varint()?;
            if base % 64 != 0 {
                return Err(CodecError("invalid fence window"));
            }
            let mut window = Window { base, ..Window::default() };
            for _ in 0..r.len()? {
                let (present, high, low) = (r.u64()?, r.u64()?, r.u64()?);
                window.blocks.push_back(Block { present, high, low, expires_at_ms: r.varint()? });
            }
            for _ in 0..r.len()? {
                let txn = r.u64()?;
                let state = FenceState::from_tag(r.u8()?).ok_or(CodecError("invalid fence state"))?;
                window.aside.insert(txn, (state, r.varint()?));
            }
            fences.retained.insert(coordinator, window);
        }
        Ok(fences)
    }
}

impl Codec for Undo {
    fn encode(&self, w: &mut Writer) {
        match self {
            Undo::Reservation(id) => {
                w.u8(0);
                id.encode(w);
            }
            Undo::Hold(id, side) => {
                w.u8(1);
                id.encode(w);
                side.encode(w);
            }
            Undo::Lock(id) => {
                w.u8(2);
                id.encode(w);
            }
            Undo::Part(command) => {
                w.u8(3);
                command.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            0 => Undo::Reservation(Id::decode(r)?),
            1 => Undo::Hold(Id::decode(r)?, Side::decode(r)?),
            2 => Undo::Lock(Id::decode(r)?),
            3 => Undo::Part(crate::parts::PartCommand::decode(r)?),
            _ => return Err(CodecError("invalid undo")),
        })
    }
}

impl Codec for Fence {
    fn encode(&self, w: &mut Writer) {
        match self {
            Fence::Tried { answer, undo, deadline_ms } => {
                match answer {
                    TryAnswer::AllOk(ops) => {
                        w.u8(3);
                        w.varint(*ops as u64);
                    }
                    TryAnswer::Results(results) => {
                        w.u8(0);
                        results.encode(w);
                    }
                }
                undo.encode(w);
                w.varint(*deadline_ms);
            }
            Fence::Decided { commit, balances, deadline_ms } => {
                w.u8(1);
                w.bool(*commit);
                balances.encode(w);
                w.varint(*deadline_ms);
            }
            Fence::Suspended { deadline_ms } => {
                w.u8(2);
                w.varint(*deadline_ms);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(match r.u8()? {
            tag @ (0 | 3) => {
                let answer = match tag {
                    3 => TryAnswer::AllOk(r.len()?),
                    _ => TryAnswer::Results(Vec::decode(r)?),
                };
                Fence::Tried { answer, undo: Vec::decode(r)?, deadline_ms: r.varint()? }
            }
            1 => Fence::Decided { commit: r.bool()?, balances: Vec::decode(r)?, deadline_ms: r.varint()? },
            2 => Fence::Suspended { deadline_ms: r.varint()? },
            _ => return Err(CodecError("invalid fence")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(coordinator: u16, counter: u64) -> TxnId {
        u64::from(coordinator) << super::super::TXN_COUNTER_BITS | counter
    }

    #[test]
    fn retained_fences_answer_until_they_expire_then_are_purged_a_block_at_a_time() {
        let mut fences = Fences::default();
        let decided = |commit| Fence::Decided { commit, balances: Vec::new(), deadline_ms: 100 };
        // Counters 1..=200 of coordinator 1, each decided, then forgotten;
        // the later ones with a later deadline.
        for counter in 1..=200u64 {
            let fence = match counter % 3 {
                0 => decided(true),
                1 => decided(false),
                _ => Fence::Suspended { deadline_ms: 100 + counter },
            };
            fences.insert(txn(1, counter), fence);
        }
        // A tried fence is never forgotten: it holds what a decision releases.
        let undo = vec![Undo::Hold(Id::parse("t9").unwrap(), Side::Debit)];
        fences.insert(txn(1, 500), Fence::Tried { answer: TryAnswer::AllOk(1), undo, deadline_ms: 1 });
        let results = vec![OpResult::Err(peakstack_domain::ErrorCode::ExceedsCredits)];
        fences.insert(txn(1, 501), Fence::Tried { answer: TryAnswer::of(&results), undo: vec![], deadline_ms: 1 });
        for counter in (1..=200u64).chain([500]) {
            fences.forget(txn(1, counter));
        }
        assert_eq!((fences.live_count(), fences.retained_count()), (2, 200));
        assert_eq!(fences.get(txn(1, 3)), Found::Retained(FenceState::Confirmed));
        assert_eq!(fences.get(txn(1, 4)), Found::Retained(FenceState::Cancelled));
        assert_eq!(fences.get(txn(1, 5)), Found::Retained(FenceState::Suspended));
        assert_eq!(fences.get(txn(2, 5)), Found::None, "another coordinator's counter");
        assert_eq!(fences.get(txn(1, 201)), Found::None);
        assert!(matches!(fences.get(txn(1, 500)), Found::Live(Fence::Tried { .. })));

        // Round trip through a checkpoint.
        let mut w = Writer::default();
        fences.encode(&mut w);
        let decoded = Fences::decode(&mut Reader::new(&w.buf)).unwrap();
        assert_eq!(decoded.retained, fences.retained);
        assert_eq!(decoded.live, fences.live);

        // Nothing expires before deadline + retention; then block by block.
        fences.purge(100 + FENCE_RETENTION_MS - 1);
        assert_eq!(fences.retained_count(), 200);
        fences.purge(100 + FENCE_RETENTION_MS + 63);
        // Block 0 (counters 0..63) expired at 100 + 62 + retention.
        assert_eq!(fences.get(txn(1, 3)), Found::None);
        assert_eq!(fences.get(txn(1, 65)), Found::Retained(FenceState::Suspended));
        // A fence forgotten after its window moved on is kept aside.
        fences.insert(txn(1, 10), Fence::Suspended { deadline_ms: 10_000 });
        fences.forget(txn(1, 10));
        assert_eq!(fences.get(txn(1, 10)), Found::Retained(FenceState::Suspended));
        fences.purge(10_000 + FENCE_RETENTION_MS - 1);
        assert_eq!(fences.get(txn(1, 10)), Found::Retained(FenceState::Suspended));
        assert_eq!(fences.retained_count(), 1);
        fences.purge(u64::MAX);
        assert_eq!(fences.retained_count(), 0);
        assert!(fences.retained.is_empty());
        assert_eq!(fences.live_count(), 2);
    }
}
