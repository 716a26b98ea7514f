//! Idempotency-Key: the answers to keyed POSTs, remembered durably in redb.
//!
//! One thread writes the database. Callers send it writes and await a
//! oneshot; it takes every write waiting (up to [`MAX_GROUP_OPS`]), applies
//! them in one write transaction committed with `Durability::Immediate` (one
//! fsync for the group: group commit), and only then answers the writers. So
//! an answer is durable before the client sees it, and a burst of keyed
//! requests pays one fsync, not one each.
//!
//! Two requests with the same key never run at once: the first holds the key
//! in an in-memory set until its answer is stored, and the second is told
//! `idempotency_key_in_use`. That is also why a lookup reads the committed
//! state directly, on the caller's task, without waiting in the writer's
//! queue behind the fsync of a group: a read of key K is only made by the
//! holder of K, and K's last write was committed before K was let go.
//!
//! A request the engine did not decide within its deadline is answered 503
//! `deadline_exceeded` at once, but it still runs (see [`LateAnswer`]): its
//! key stays in flight until the real answer is stored, so a retry hears
//! `idempotency_key_in_use` meanwhile and the real answer afterwards, never
//! a replay of the 503 nor a second run of the request.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::keyed_outcomes::key_hash;

/// Longest key a client may send.
pub const MAX_KEY_LEN: usize = 255;
/// Keys are remembered this long unless the server is told otherwise
/// (`--idempotency-retention`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest retention accepted: a client's retry must find its key.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
/// How often expired keys are purged. Each run deletes every key that
/// expired (in chunks), so the store holds about retention x arrival rate
/// keys, whatever the rate.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(1);
/// Most keys one purge operation deletes: it shares a write transaction
/// with the keyed requests of its group, which wait for it.
pub const PURGE_CHUNK: usize = 4_096;
/// Most chunks of one purge run (a bound on the loop: 4M keys a run, a
/// run a second, is far beyond any arrival rate the store can take).
pub const MAX_PURGE_CHUNKS_PER_RUN: usize = 1_024;
/// Most operations applied in one group (one write transaction).
pub const MAX_GROUP_OPS: usize = 1024;
/// Operations waiting for the store thread; senders wait past it.
pub const QUEUE_CAPACITY: usize = 4096;
/// Most keys being processed at once; past it keyed requests are refused
/// with `unavailable`.
pub const MAX_KEYS_IN_FLIGHT: usize = 65_536;
/// Largest answer remembered (a full batch answer is a few MiB).
pub const MAX_STORED_ANSWER_BYTES: usize = 32 << 20;
/// How long closing the store waits for the keys still in flight: after
/// the server drained its requests, those are requests past their deadline
/// whose real answer is still to be stored (see [`LateAnswer`]).
pub const CLOSE_WAIT_FOR_KEYS: Duration = Duration::from_secs(10);

const ANSWERS: TableDefinition<&str, &[u8]> = TableDefinition::new("answers");
/// (created_at_ms, key): the purge walks this in age order.
const BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("answers_by_age");

const RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency store: {0}")]
    Redb(#[from] redb::Error),
    /// A failure shared by every operation of a group.
    #[error("idempotency store: {0}")]
    Failed(String),
    #[error("idempotency store is closed")]
    Closed,
    #[error("idempotency store: cannot start its thread: {0}")]
    Thread(std::io::Error),
    #[error("idempotency store: corrupt record for key {0:?}")]
    Corrupt(String),
}

/// What a keyed request got, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAnswer {
    /// sha256 of method, path and body of the request.
    pub fingerprint: [u8; 32],
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
    pub created_at_ms: u64,
}

impl StoredAnswer {
    fn encode(&self) -> Vec<u8> {
        let content_type = self.content_type.as_bytes();
        let content_type = &content_type[..content_type.len().min(255)];
        let mut out = Vec::with_capacity(44 + content_type.len() + self.body.len());
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.created_at_ms.to_be_bytes());
        out.push(content_type.len() as u8);
        out.extend_from_slice(content_type);
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<StoredAnswer> {
        let (&version, rest) = bytes.split_first()?;
        if version != RECORD_VERSION || rest.len() < 32 + 2 + 8 + 1 {
            return None;
        }
        let fingerprint: [u8; 32] = rest[..32].try_into().ok()?;
        let status = u16::from_be_bytes(rest[32..34].try_into().ok()?);
        let created_at_ms = u64::from_be_bytes(rest[34..42].try_into().ok()?);
        let content_type_len = usize::from(rest[42]);
        let rest = &rest[43..];
        if rest.len() < content_type_len {
            return None;
        }
        let content_type = std::str::from_utf8(&rest[..content_type_len]).ok()?.to_owned();
        let body = Bytes::copy_from_slice(&rest[content_type_len..]);
        Some(StoredAnswer { fingerprint, status, content_type, body, created_at_ms })
    }

    fn created_at_of(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(35..43)?.try_into().ok()?))
    }
}

/// The fingerprint of a request: what must match for a replay.
pub fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b" ");
    hash.update(path_and_query.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().into()
}

/// Parses `--idempotency-retention`: a duration such as `24h`, `90m`,
/// `7days`, at least [`MIN_RETENTION`].
pub fn parse_retention(text: &str) -> Result<Duration, String> {
    let retention = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 24h, 90m, 7days)"))?;
    if retention < MIN_RETENTION {
        return Err(format!("{text:?}: at least {} s", MIN_RETENTION.as_secs()));
    }
    Ok(retention)
}

/// Checks an Idempotency-Key: 1-255 printable ASCII characters.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.iter().all(|b| (0x20..=0x7e).contains(b))
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

enum Op {
    Put { key: String, answer: StoredAnswer, reply: oneshot::Sender<Result<(), StoreError>> },
    Purge { cutoff_ms: u64, limit: usize, reply: oneshot::Sender<Result<usize, StoreError>> },
    Close,
}

/// The answer-to-be of a request answered `deadline_exceeded` while the
/// engine still decides it: the handler sets it on that 503, and the POST
/// guard, if the request has an Idempotency-Key, keeps the key in flight
/// until it arrives and stores it as the key's answer.
#[derive(Clone)]
pub struct LateAnswer(Arc<Mutex<Option<tokio::task::JoinHandle<axum::response::Response>>>>);

impl LateAnswer {
    /// `task` makes the answer; it runs on whether or not anyone awaits it.
    pub fn new(task: tokio::task::JoinHandle<axum::response::Response>) -> LateAnswer {
        LateAnswer(Arc::new(Mutex::new(Some(task))))
    }

    /// Takes the answer-to-be off `response`, if it has one.
    pub fn take(response: &mut axum::response::Response) -> Option<tokio::task::JoinHandle<axum::response::Response>> {
        response.extensions_mut().remove::<LateAnswer>().and_then(|late| late.0.lock().take())
    }
}

/// The durable map key -> answer, and the set of keys in flight.
pub struct IdempotencyStore {
    ops: mpsc::Sender<Op>,
    thread: Mutex<Option<JoinHandle<()>>>,
    in_flight: Arc<InFlight>,
    /// The hashes of the keys stored: a lookup of any other key (nearly
    /// every lookup, since keyed creates keep no answer here) costs no
    /// read of the database. Updated by the writer before it answers.
    stored: Arc<Mutex<HashSet<[u8; 16]>>>,
    /// Read by lookups; taken out by [`IdempotencyStore::close`] so that the
    /// file is closed once the writer is gone.
    reader: parking_lot::RwLock<Option<Arc<Database>>>,
}

#[derive(Default)]
struct InFlight {
    keys: Mutex<HashSet<[u8; 16]>>,
    /// Told whenever the last key in flight is let go.
    none_left: tokio::sync::Notify,
}

/// Holds a key in flight; dropping it (also when a request is cancelled)
/// lets the next request with the key in.
pub struct KeyGuard {
    key: [u8; 16],
    in_flight: Arc<InFlight>,
}

impl KeyGuard {
    /// The hash of the key held ([`crate::keyed_outcomes::key_hash`]).
    pub fn key_hash(&self) -> [u8; 16] {
        self.key
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut keys = self.in_flight.keys.lock();
        keys.remove(&self.key);
        if keys.is_empty() {
            self.in_flight.none_left.notify_waiters();
        }
    }
}

/// Why a key could not be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// Another request holds this key.
    KeyInUse,
    /// [`MAX_KEYS_IN_FLIGHT`] keys are being processed.
    Full,
}

impl IdempotencyStore {
    /// Opens (or creates) the database at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<IdempotencyStore, StoreError> {
        let db = crate::open_redb(path).map_err(redb::Error::from)?;
        // Create the tables so that readers always find them.
        let mut txn = db.begin_write().map_err(redb::Error::from)?;
        txn.set_durability(Durability::Immediate).map_err(redb::Error::from)?;
        txn.open_table(ANSWERS).map_err(redb::Error::from)?;
        txn.open_table(BY_AGE).map_err(redb::Error::from)?;
        txn.commit().map_err(redb::Error::from)?;
        let mut hashes = HashSet::new();
        {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            for entry in txn.open_table(ANSWERS).map_err(redb::Error::from)?.iter().map_err(redb::Error::from)? {
                hashes.insert(key_hash(entry.map_err(redb::Error::from)?.0.value()));
            }
        }
        let stored = Arc::new(Mutex::new(hashes));

        let db = Arc::new(db);
        let writer = db.clone();
        let writer_stored = stored.clone();
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let thread = peakstack_engine::failstop::spawn("idempotency", move || {
            peakstack_engine::failstop::fault_point();
            run(writer, &writer_stored, rx)
        })
        .map_err(StoreError::Thread)?;
        Ok(IdempotencyStore {
            ops: tx,
            thread: Mutex::new(Some(thread)),
            in_flight: Arc::new(InFlight::default()),
            stored,
            reader: parking_lot::RwLock::new(Some(db)),
        })
    }

    /// Takes `key` for one request.
    pub fn begin(&self, key: &str) -> Result<KeyGuard, Busy> {
        let hash = key_hash(key);
        let mut in_flight = self.in_flight.keys.lock();
        if in_flight.contains(&hash) {
            return Err(Busy::KeyInUse);
        }
        if in_flight.len() >= MAX_KEYS_IN_FLIGHT {
            return Err(Busy::Full);
        }
        in_flight.insert(hash);
        Ok(KeyGuard { key: hash, in_flight: self.in_flight.clone() })
    }

    async fn call<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(op(tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The answer stored for `key`: one lookup in a read transaction of
    /// the committed state (a B-tree walk in redb's page cache).
    pub async fn get(&self, key: &str) -> Result<Option<StoredAnswer>, StoreError> {
        let db = self.reader.read().clone().ok_or(StoreError::Closed)?;
        if !self.stored.lock().contains(&key_hash(key)) {
            return Ok(None);
        }
        let txn = db.begin_read().map_err(redb::Error::from)?;
        let table = txn.open_table(ANSWERS).map_err(redb::Error::from)?;
        let value = table.get(key).map_err(redb::Error::from)?;
        match value {
            None => Ok(None),
            Some(value) => {
                StoredAnswer::decode(value.value()).map(Some).ok_or_else(|| StoreError::Corrupt(key.to_owned()))
            }
        }
    }

    /// Stores an answer; returns once it is durable.
    pub async fn put(&self, key: &str, answer: StoredAnswer) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.call(|reply| Op::Put { key, answer, reply }).await
    }

    /// Deletes up to `limit` answers created before `cutoff_ms`, oldest
    /// first; returns how many.
    pub async fn purge(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.call(|reply| Op::Purge { cutoff_ms, limit, reply }).await
    }

    /// Deletes every answer created before `cutoff_ms`, `chunk` at a time
    /// (each chunk its own operation, so keyed requests are stored between
    /// them), at most [`MAX_PURGE_CHUNKS_PER_RUN`] chunks; returns how many.
    pub async fn purge_expired(&self, cutoff_ms: u64, chunk: usize) -> Result<u64, StoreError> {
        let mut purged = 0;
        for _ in 0..MAX_PURGE_CHUNKS_PER_RUN {
            let deleted = self.purge(cutoff_ms, chunk).await?;
            purged += deleted as u64;
            if deleted < chunk {
                break;
            }
        }
        Ok(purged)
    }

    /// How many answers are stored.
    pub async fn stored_keys(&self) -> Result<u64, StoreError> {
        let db = self.reader.read().clone().ok_or(StoreError::Closed)?;
        let txn = db.begin_read().map_err(redb::Error::from)?;
        Ok(txn.open_table(ANSWERS).map_err(redb::Error::from)?.len().map_err(redb::Error::from)?)
    }

    /// Waits (up to [`CLOSE_WAIT_FOR_KEYS`]) until no key is in flight, then
    /// stops the thread after the operations already queued and closes the
    /// database (so that it can be opened again, in this process too).
    pub async fn close(&self) {
        let none_left = async {
            loop {
                let notified = self.in_flight.none_left.notified();
                if self.in_flight.keys.lock().is_empty() {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(CLOSE_WAIT_FOR_KEYS, none_left).await.is_err() {
            tracing::warn!("closing the idempotency store with keys still in flight: their answers are not stored");
        }
        self.reader.write().take();
        let _ = self.ops.send(Op::Close).await;
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Every [`PURGE_INTERVAL`] until `stop` changes, deletes the keys older
/// than `retention`: all of them, so that purging keeps pace with arrivals.
pub async fn run_purges(store: &IdempotencyStore, retention: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut ticks = tokio::time::interval(PURGE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let cutoff_ms = now_ms().saturating_sub(retention_ms);
        match store.purge_expired(cutoff_ms, PURGE_CHUNK).await {
            Ok(0) => {}
            Ok(purged) => tracing::debug!(purged, "purged expired idempotency keys"),
            Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
        }
    }
}

fn run(db: Arc<Database>, stored: &Mutex<HashSet<[u8; 16]>>, mut rx: mpsc::Receiver<Op>) {
    let mut group = Vec::with_capacity(MAX_GROUP_OPS);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP_OPS {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let close = apply_group(&db, stored, &mut group);
        if close {
            break;
        }
    }
    drop(db);
}

/// Applies one group; returns whether the store was asked to close.
fn apply_group(db: &Database, stored: &Mutex<HashSet<[u8; 16]>>, group: &mut Vec<Op>) -> bool {
    let close = group.iter().any(|op| matches!(op, Op::Close));
    let writes: Vec<Op> = group.drain(..).filter(|op| !matches!(op, Op::Close)).collect();
    if !writes.is_empty() {
        write_all(db, stored, writes);
    }
    close
}

enum WriteResult {
    Put(oneshot::Sender<Result<(), StoreError>>),
    Purge(oneshot::Sender<Result<usize, StoreError>>, usize),
}

fn write_all(db: &Database, stored: &Mutex<HashSet<[u8; 16]>>, writes: Vec<Op>) {
    let mut results = Vec::with_capacity(writes.len());
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let outcome = (|| -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut answers = txn.open_table(ANSWERS)?;
            let mut by_age = txn.open_table(BY_AGE)?;
            for op in writes {
                match op {
                    Op::Put { key, answer, reply } => {
                        let old = answers
                            .insert(key.as_str(), answer.encode().as_slice())?
                            .and_then(|old| StoredAnswer::created_at_of(old.value()));
                        if let Some(old_created_at_ms) = old {
                            by_age.remove((old_created_at_ms, key.as_str()))?;
                        }
                        by_age.insert((answer.created_at_ms, key.as_str()), ())?;
                        added.push(key_hash(&key));
                        results.push(WriteResult::Put(reply));
                    }
                    Op::Purge { cutoff_ms, limit, reply } => {
                        let mut victims = Vec::new();
                        for entry in by_age.range(..(cutoff_ms, ""))?.take(limit) {
                            let (k, _) = entry?;
                            let (created_at_ms, key) = k.value();
                            victims.push((created_at_ms, key.to_owned()));
                        }
                        for (created_at_ms, key) in &victims {
                            by_age.remove((*created_at_ms, key.as_str()))?;
                            let current =
                                answers.get(key.as_str())?.and_then(|v| StoredAnswer::created_at_of(v.value()));
                            // Only the answer this index entry was made for.
                            if current == Some(*created_at_ms) {
                                answers.remove(key.as_str())?;
                                removed.push(key_hash(key));
                            }
                        }
                        results.push(WriteResult::Purge(reply, victims.len()));
                    }
                    Op::Close => unreachable!("close is taken out before"),
                }
            }
        }
        txn.commit()?;
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            {
                let mut stored = stored.lock();
                removed.iter().for_each(|hash| {
                    stored.remove(hash);
                });
                stored.extend(added);
            }
            for result in results {
                match result {
                    WriteResult::Put(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    WriteResult::Purge(reply, n) => {
                        let _ = reply.send(Ok(n));
                    }
                }
            }
        }
        Err(error) => {
            // Nothing of the group was stored; every writer hears so (the
            // failed operation's own reply was dropped: it hears `Closed`).
            tracing::error!(%error, "idempotency store write failed");
            let text = error.to_string();
            for result in results {
                let error = || StoreError::Failed(text.clone());
                match result {
                    WriteResult::Put(reply) => {
                        let _ = reply.send(Err(error()));
                    }
                    WriteResult::Purge(reply, _) => {
                        let _ = reply.send(Err(error()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(created_at_ms: u64, body: &str) -> StoredAnswer {
        StoredAnswer {
            fingerprint: fingerprint("POST", "/v1/transfers", body.as_bytes()),
            status: 201,
            content_type: "application/json".to_owned(),
            body: Bytes::from(body.to_owned()),
            created_at_ms,
        }
    }

    #[test]
    fn records_round_trip() {
        let a = answer(1234, "{\"x\":1}");
        assert_eq!(StoredAnswer::decode(&a.encode()), Some(a.clone()));
        assert_eq!(StoredAnswer::created_at_of(&a.encode()), Some(1234));
        assert_eq!(StoredAnswer::decode(&[9, 9]), None);
    }

    #[test]
    fn keys() {
        let long = "k".repeat(MAX_KEY_LEN);
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        for (key, ok) in [
            ("abc", true),
            ("with space ~!", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("tab\there", false),
            ("é", false),
        ] {
            assert_eq!(valid_key(key.as_bytes()), ok, "{key:?}");
        }
    }

    #[tokio::test]
    async fn put_get_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.redb");
        let store = IdempotencyStore::open(&path).unwrap();
        store.put("old-1", answer(10, "a")).await.unwrap();
        store.put("old-2", answer(20, "b")).await.unwrap();
        store.put("new", answer(5_000, "c")).await.unwrap();
        // Re-stored with a newer time: the old index entry must not purge it.
        store.put("old-2", answer(6_000, "b2")).await.unwrap();
        assert_eq!(store.get("old-1").await.unwrap(), Some(answer(10, "a")));
        assert_eq!(store.get("missing").await.unwrap(), None);

        // Bounded: one per run.
        assert_eq!(store.purge(1_000, 1).await.unwrap(), 1);
        assert_eq!(store.get("old-1").await.unwrap(), None);
        assert_eq!(store.purge(1_000, 10).await.unwrap(), 0);
        assert_eq!(store.get("old-2").await.unwrap(), Some(answer(6_000, "b2")));
        store.close().await;
        assert!(matches!(store.get("new").await, Err(StoreError::Closed)));

        let store = IdempotencyStore::open(&path).unwrap();
        assert_eq!(store.get("new").await.unwrap(), Some(answer(5_000, "c")));
        assert_eq!(store.purge(u64::MAX, 10).await.unwrap(), 2);
        store.close().await;
    }

    /// Keys arrive faster than one chunk per purge run: purging them all
    /// each run keeps the store at about retention x rate (a purge of one
    /// chunk per run, as before, lets it grow without bound).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purging_keeps_pace_with_arrivals() {
        const KEYS_PER_TICK: u64 = 2_500;
        const CHUNK: usize = 1_000;
        const RETENTION_TICKS: u64 = 2;
        const TICK_MS: u64 = 1_000;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(IdempotencyStore::open(&dir.path().join("i.redb")).unwrap());
        let bound = (RETENTION_TICKS + 1) * KEYS_PER_TICK;
        let mut most_stored = 0;
        for tick in 1..=8u64 {
            let mut puts = tokio::task::JoinSet::new();
            for n in 0..KEYS_PER_TICK {
                let store = store.clone();
                let created_at_ms = tick * TICK_MS + n % TICK_MS;
                puts.spawn(async move { store.put(&format!("k{tick}-{n}"), answer(created_at_ms, "a")).await });
            }
            while let Some(put) = puts.join_next().await {
                put.unwrap().unwrap();
            }
            let cutoff_ms = tick.saturating_sub(RETENTION_TICKS) * TICK_MS;
            let purged = store.purge_expired(cutoff_ms, CHUNK).await.unwrap();
            let stored = store.stored_keys().await.unwrap();
            assert!(stored <= bound, "tick {tick}: {stored} keys stored, purged {purged}; bound {bound}");
            most_stored = most_stored.max(stored);
        }
        // Every key younger than the retention is still there.
        assert_eq!(store.stored_keys().await.unwrap(), bound);
        assert!(store.get("k8-0").await.unwrap().is_some());
        assert!(store.get("k5-0").await.unwrap().is_none());
        assert!(most_stored > KEYS_PER_TICK, "the test must keep more than one tick of keys");
        store.close().await;
    }

    #[test]
    fn retention_is_a_duration_of_at_least_a_second() {
        assert_eq!(parse_retention("24h"), Ok(DEFAULT_RETENTION));
        assert_eq!(parse_retention("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_retention("1s"), Ok(MIN_RETENTION));
        assert!(parse_retention("500ms").unwrap_err().contains("at least 1 s"));
        assert!(parse_retention("soon").is_err());
        assert!(parse_retention("").is_err());
    }

    #[test]
    fn one_request_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdempotencyStore::open(&dir.path().join("i.redb")).unwrap();
        let guard = store.begin("k").unwrap();
        assert_eq!(store.begin("k").err(), Some(Busy::KeyInUse));
        assert!(store.begin("other").is_ok());
        drop(guard);
        assert!(store.begin("k").is_ok());
    }
}
