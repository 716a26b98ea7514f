//! Keyed transfers whose answer the engine's log keeps.
//!
//! A `POST /v1/transfers` with an Idempotency-Key used to store its whole
//! answer (about 1.1 KB) in a store of its own, with an fsync stream of its
//! own, before the answer was sent: keyed requests ran at less than half
//! the keyless rate. Now the key rides the request into the engine's log
//! (an [`IdempotencyTag`]: 16 bytes of key hash, 16 of request
//! fingerprint), durable in the same fsync as the transfer. What the
//! answer holds beyond the request itself is the transfer's time and the
//! balances right after it; the engine hands those to the audit feed with
//! the transfer, and the feed stores them as a [`KeyedOutcome`] of a few
//! dozen bytes in `access.redb`. A replay parses the retried body (the
//! fingerprint says it is the same), rebuilds the record with the engine's
//! own [`create_record`] at the stored time, and writes it through the same
//! serializer: byte for byte the first answer.
//!
//! The feed stores an outcome a few milliseconds after its answer was sent;
//! a retry in between finds it in [`RecentOutcomes`], where the POST guard
//! put it when the answer went out. A generation of recent outcomes is
//! dropped once the feed's readers see every batch answered before the
//! generation was closed. After a restart the engine's replay makes the
//! outcomes not yet stored again; keyed lookups wait until the feed has
//! stored them ([`RecentOutcomes::started`]).
//!
//! Refusals, idempotent 200s, posts, voids and batches keep the stored
//! answer of [`crate::idempotency`]: they are not the hot path, and a
//! refusal is not in the log.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use peakstack_domain::{Balances, TransferKind, TransferRequest};
use peakstack_engine::codec::{Codec, Reader, Writer};
use peakstack_engine::executor::create_record;
use peakstack_engine::{AuditEvent, Engine, IdempotencyTag, TransferOutcome};
use sha2::{Digest, Sha256};

use crate::access_store::{AccessStore, OUTCOME_PURGE_ROWS};
use crate::idempotency::{now_ms, MAX_PURGE_CHUNKS_PER_RUN, PURGE_INTERVAL};

/// The first byte of a stored outcome.
const OUTCOME_VERSION: u8 = 1;
const HAS_DEBIT: u8 = 1;
const HAS_CREDIT: u8 = 2;

/// Most outcomes held in memory waiting for the feed; past it keyed
/// requests take the stored-answer path until the feed catches up.
pub const MAX_RECENT_OUTCOMES: usize = 1 << 21;

/// What a keyed create's answer holds beyond its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedOutcome {
    pub fingerprint: [u8; 16],
    pub timestamp_ms: u64,
    pub debit: Option<Balances>,
    pub credit: Option<Balances>,
}

impl KeyedOutcome {
    /// The outcome an audit event of a keyed create carries, with its key.
    pub fn of_event(event: &AuditEvent) -> Option<([u8; 16], KeyedOutcome)> {
        let tag = event.origin.idempotency?;
        let answered = event.answered.as_deref()?;
        let create = matches!(event.transfer.kind, TransferKind::Single | TransferKind::Pending { .. });
        create.then_some((
            tag.key_hash,
            KeyedOutcome {
                fingerprint: tag.fingerprint,
                timestamp_ms: event.transfer.timestamp_ms,
                debit: answered.debit,
                credit: answered.credit,
            },
        ))
    }

    /// The outcome of an answer just made (the same values the feed will
    /// store).
    pub fn of_answer(tag: IdempotencyTag, outcome: &TransferOutcome) -> KeyedOutcome {
        KeyedOutcome {
            fingerprint: tag.fingerprint,
            timestamp_ms: outcome.transfer.timestamp_ms,
            debit: outcome.debit_balances,
            credit: outcome.credit_balances,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer { buf: Vec::with_capacity(64) };
        w.u8(OUTCOME_VERSION);
        w.buf.extend_from_slice(&self.fingerprint);
        w.varint(self.timestamp_ms);
        w.u8(if self.debit.is_some() { HAS_DEBIT } else { 0 } | if self.credit.is_some() { HAS_CREDIT } else { 0 });
        for balances in [&self.debit, &self.credit].into_iter().flatten() {
            balances.encode(&mut w);
        }
        w.buf
    }

    /// Reads what [`KeyedOutcome::encode`] wrote; anything else is `None`.
    pub fn decode(bytes: &[u8]) -> Option<KeyedOutcome> {
        let mut r = Reader::new(bytes);
        if r.u8().ok()? != OUTCOME_VERSION {
            return None;
        }
        let fingerprint = r.array().ok()?;
        let timestamp_ms = r.varint().ok()?;
        let flags = r.u8().ok()?;
        if flags & !(HAS_DEBIT | HAS_CREDIT) != 0 {
            return None;
        }
        let mut read = |flag| if flags & flag != 0 { Balances::decode(&mut r).map(Some).ok() } else { Some(None) };
        let debit = read(HAS_DEBIT)?;
        let credit = read(HAS_CREDIT)?;
        r.is_empty().then_some(KeyedOutcome { fingerprint, timestamp_ms, debit, credit })
    }

    /// The engine's answer to `request` (the request this outcome's
    /// fingerprint names), as it was made.
    pub fn answer(&self, request: &TransferRequest) -> Option<TransferOutcome> {
        if !matches!(request, TransferRequest::Create { .. }) {
            return None;
        }
        let (transfer, refused) = create_record(request, self.timestamp_ms);
        refused.is_none().then_some(TransferOutcome {
            created: true,
            transfer,
            debit_balances: self.debit,
            credit_balances: self.credit,
        })
    }
}

/// On the answer of a keyed create the log keeps: what a replay needs.
/// The POST guard holds it in [`RecentOutcomes`] instead of storing the
/// answer.
#[derive(Clone, Copy, Debug)]
pub struct AnsweredFromLog(pub KeyedOutcome);

/// On the 200 of a keyed create whose transfer existed already: maybe an
/// earlier run of this very request, whose answer never reached its
/// client, and whose outcome the feed is about to store.
#[derive(Clone, Copy, Debug)]
pub struct ExistedAlready;

/// The first byte of a row of outcomes.
const ROW_VERSION: u8 = 1;

/// A row of outcomes as `access.redb` keeps it: [`ROW_VERSION`], then per
/// outcome its key hash, the length of its encoding and the encoding.
pub fn encode_row(outcomes: &[([u8; 16], KeyedOutcome)]) -> Vec<u8> {
    let mut w = Writer { buf: Vec::with_capacity(1 + outcomes.len() * 64) };
    w.u8(ROW_VERSION);
    for (hash, outcome) in outcomes {
        w.buf.extend_from_slice(hash);
        let bytes = outcome.encode();
        w.varint(bytes.len() as u64);
        w.buf.extend_from_slice(&bytes);
    }
    w.buf
}

/// Reads what [`encode_row`] wrote; anything else is `None`.
pub fn decode_row(bytes: &[u8]) -> Option<Vec<([u8; 16], KeyedOutcome)>> {
    let mut r = Reader::new(bytes);
    if r.u8().ok()? != ROW_VERSION {
        return None;
    }
    let mut outcomes = Vec::new();
    while !r.is_empty() {
        let hash = r.array().ok()?;
        let len = r.len().ok()?;
        let outcome = KeyedOutcome::decode(r.bytes(len).ok()?)?;
        outcomes.push((hash, outcome));
    }
    Some(outcomes)
}

/// The 16 bytes a key (already scoped to its caller) is stored under.
pub fn key_hash(scoped_key: &str) -> [u8; 16] {
    let mut hash = Sha256::new();
    hash.update(b"peakstack idempotency key\n");
    hash.update(scoped_key.as_bytes());
    let digest: [u8; 32] = hash.finalize().into();
    digest[..16].try_into().expect("16 bytes")
}

/// The first half of a request fingerprint, as the log keeps it.
pub fn short_fingerprint(fingerprint: &[u8; 32]) -> [u8; 16] {
    fingerprint[..16].try_into().expect("16 bytes")
}

/// Outcomes answered but maybe not yet stored by the feed.
pub struct RecentOutcomes {
    generations: Mutex<Generations>,
    /// Per executor, the batches made before this process served: the
    /// replay of a crash's log, whose outcomes the feed is storing.
    startup_marks: Vec<u64>,
    started: AtomicBool,
}

type Outcomes = HashMap<[u8; 16], KeyedOutcome>;

#[derive(Default)]
struct Generations {
    current: Outcomes,
    /// Closed generations with the engine's audit marks at closing, oldest
    /// first: dropped once the feed's readers see up to those marks.
    closed: VecDeque<(Vec<u64>, Outcomes)>,
    held: usize,
}

impl RecentOutcomes {
    /// Outcomes for `engine`'s answers from now on.
    pub fn new(engine: &Engine) -> RecentOutcomes {
        RecentOutcomes {
            generations: Mutex::new(Generations::default()),
            startup_marks: engine.audit_produced(),
            started: AtomicBool::new(false),
        }
    }

    /// Whether the outcomes of batches made before this process served are
    /// stored (readable) by now; a keyed lookup before then could miss one.
    pub fn started(&self, engine: &Engine) -> bool {
        if self.started.load(Ordering::Acquire) {
            return true;
        }
        let started = engine.audit_visible_up_to(&self.startup_marks);
        if started {
            self.started.store(true, Ordering::Release);
        }
        started
    }

    /// Whether a new keyed request may take this path.
    pub fn accepting(&self) -> bool {
        self.generations.lock().held < MAX_RECENT_OUTCOMES
    }

    /// Holds the outcome of an answer about to be sent.
    pub fn insert(&self, key_hash: [u8; 16], outcome: KeyedOutcome) {
        let mut generations = self.generations.lock();
        if generations.current.insert(key_hash, outcome).is_none() {
            generations.held += 1;
        }
    }

    /// The newest outcome held for `key_hash`.
    pub fn get(&self, key_hash: &[u8; 16]) -> Option<KeyedOutcome> {
        let generations = self.generations.lock();
        if let Some(outcome) = generations.current.get(key_hash) {
            return Some(*outcome);
        }
        generations.closed.iter().rev().find_map(|(_, outcomes)| outcomes.get(key_hash).copied())
    }

    /// Closes the current generation and drops the closed ones the feed's
    /// readers have caught up with. Run every few hundred milliseconds.
    pub fn rotate(&self, engine: &Engine) {
        let mut generations = self.generations.lock();
        while let Some((marks, _)) = generations.closed.front() {
            if !engine.audit_visible_up_to(marks) {
                break;
            }
            let (_, outcomes) = generations.closed.pop_front().expect("checked");
            generations.held -= outcomes.len();
        }
        if !generations.current.is_empty() {
            let capacity = generations.current.len();
            let outcomes = std::mem::replace(&mut generations.current, HashMap::with_capacity(capacity));
            // Read after the swap: every outcome of the generation was
            // inserted after its batch was published, so within these.
            let marks = engine.audit_produced();
            generations.closed.push_back((marks, outcomes));
        }
    }
}

/// How often a generation of recent outcomes is closed (and the closed
/// ones the feed caught up with are dropped): outcomes stay in memory
/// about this long plus the feed's lag.
pub const ROTATE_INTERVAL: Duration = Duration::from_millis(100);

/// Until `stop` changes: rotates the recent outcomes, and every
/// [`PURGE_INTERVAL`] deletes the stored outcomes older than `retention`,
/// all of them (in chunks), so that purging keeps pace with arrivals.
pub async fn run_upkeep(
    engine: &Engine,
    recent: &RecentOutcomes,
    store: &AccessStore,
    retention: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut ticks = tokio::time::interval(ROTATE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge = Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        recent.rotate(engine);
        if last_purge.elapsed() < PURGE_INTERVAL {
            continue;
        }
        last_purge = Instant::now();
        let cutoff_ms = now_ms().saturating_sub(retention_ms);
        let mut purged = 0;
        for _ in 0..MAX_PURGE_CHUNKS_PER_RUN {
            match store.purge_keyed_outcomes(cutoff_ms, OUTCOME_PURGE_ROWS).await {
                Ok(chunk) => {
                    purged += chunk.outcomes;
                    if chunk.rows < OUTCOME_PURGE_ROWS {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "purging keyed outcomes failed");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::debug!(purged, "purged expired keyed outcomes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balances(n: u128) -> Balances {
        Balances { debits_pending: n, debits_posted: n * 3, credits_pending: 0, credits_posted: u128::MAX - n }
    }

    #[test]
    fn outcomes_round_trip_in_a_few_dozen_bytes() {
        let cases = [
            KeyedOutcome { fingerprint: [3; 16], timestamp_ms: 1_764_000_000_000, debit: None, credit: None },
            KeyedOutcome {
                fingerprint: [4; 16],
                timestamp_ms: 1,
                debit: Some(balances(5)),
                credit: Some(balances(u128::MAX / 4)),
            },
            KeyedOutcome { fingerprint: [5; 16], timestamp_ms: 7, debit: None, credit: Some(balances(0)) },
        ];
        for outcome in cases {
            let bytes = outcome.encode();
            assert_eq!(KeyedOutcome::decode(&bytes), Some(outcome));
            for cut in 0..bytes.len() {
                assert_eq!(KeyedOutcome::decode(&bytes[..cut]), None, "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(KeyedOutcome::decode(&longer), None);
        }
        let typical = KeyedOutcome {
            fingerprint: [1; 16],
            timestamp_ms: 1_764_000_000_000,
            debit: Some(Balances {
                debits_pending: 0,
                debits_posted: 123_456_789,
                credits_pending: 0,
                credits_posted: 0,
            }),
            credit: Some(Balances { debits_pending: 0, debits_posted: 0, credits_pending: 0, credits_posted: 987_654 }),
        };
        assert!(typical.encode().len() <= 40, "{} bytes", typical.encode().len());
    }

    #[test]
    fn rows_round_trip_and_refuse_what_does_not_parse_whole() {
        let outcomes: Vec<([u8; 16], KeyedOutcome)> = (0..5u8)
            .map(|n| {
                let outcome = KeyedOutcome {
                    fingerprint: [n; 16],
                    timestamp_ms: 1_000 + u64::from(n),
                    debit: (n % 2 == 0).then(|| balances(u128::from(n))),
                    credit: Some(balances(7)),
                };
                ([n + 100; 16], outcome)
            })
            .collect();
        let row = encode_row(&outcomes);
        assert_eq!(decode_row(&row), Some(outcomes.clone()));
        assert_eq!(decode_row(&encode_row(&[])), Some(Vec::new()));
        // Whole outcomes end at these offsets; a row cut anywhere else
        // does not parse.
        let mut ends = vec![1];
        for (_, outcome) in &outcomes {
            ends.push(ends.last().unwrap() + 16 + 1 + outcome.encode().len());
        }
        assert_eq!(*ends.last().unwrap(), row.len());
        for cut in 0..row.len() {
            match ends.iter().position(|&end| end == cut) {
                Some(whole) => assert_eq!(decode_row(&row[..cut]), Some(outcomes[..whole].to_vec()), "cut at {cut}"),
                None => assert_eq!(decode_row(&row[..cut]), None, "cut at {cut}"),
            }
        }
        let mut wrong = row.clone();
        wrong[0] = 9;
        assert_eq!(decode_row(&wrong), None);
    }

    #[test]
    fn key_hashes_differ_by_key_and_caller() {
        assert_ne!(key_hash("k1\nabc"), key_hash("k2\nabc"));
        assert_ne!(key_hash("abc"), key_hash("abd"));
        assert_eq!(key_hash("abc"), key_hash("abc"));
    }
}
