//! The durable side of access control, `<data_dir>/access.redb`: the API
//! keys (hashes, never secrets) and the append-only audit log.
//!
//! One thread writes. Callers send it writes and await a oneshot; it takes
//! every write waiting (up to [`MAX_GROUP_WRITES`]), applies them in one
//! redb write transaction committed with `Durability::Immediate` (one fsync
//! per group) and only then answers. A key change and its audit record are
//! one write, so they land together or not at all. Reads run on their own
//! read transactions, beside the writer.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditFilter, AuditPage, AuditRecord};
use crate::audit_index::{self, IndexBuilder};
use crate::audit_rows::{self, PackedRow, PACKED_ROW_TAG};
use crate::keyed_outcomes::{self, KeyedOutcome};
use crate::keys::KeyRecord;

/// Most writes applied in one group (one write transaction).
pub const MAX_GROUP_WRITES: usize = 1024;
/// Writes waiting for the writer thread; senders wait past it.
pub const QUEUE_CAPACITY: usize = 4096;
/// Most records one audit query reads, matching or not; past it the page
/// ends early with a `next` cursor, so a narrow filter never scans the
/// whole log in one request.
pub const MAX_AUDIT_SCAN: usize = 100_000;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Rows of audit records keyed by the seq of their first record: a write's
/// records share rows of up to [`MAX_RECORDS_PER_ROW`] (an engine batch's
/// hundreds of transfers cost a few inserts), numbered on from it.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Most records one audit row holds. Rows stay a few pages long: one row per
/// write made values of megabytes under load, which redb writes through
/// fresh zeroed buffers, and which a query decodes whole to read one record.
pub const MAX_RECORDS_PER_ROW: usize = 64;

/// One row of the audit table: a JSON record, a JSON array of records
/// with consecutive seqs, or transfer records packed by the audit feed
/// ([`crate::audit_rows`]; numbered from the row's key).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Row {
    One(AuditRecord),
    Many(Vec<AuditRecord>),
}

impl Row {
    fn decode(first_seq: u64, bytes: &[u8]) -> Result<Vec<AuditRecord>, AccessStoreError> {
        let corrupt = |e: &dyn std::fmt::Display| AccessStoreError::Corrupt(format!("audit row {first_seq}: {e}"));
        if bytes.first() == Some(&PACKED_ROW_TAG) {
            return audit_rows::decode(first_seq, bytes).map_err(|e| corrupt(&e));
        }
        match serde_json::from_slice(bytes) {
            Ok(Row::One(record)) => Ok(vec![record]),
            Ok(Row::Many(records)) => Ok(records),
            Err(e) => Err(corrupt(&e)),
        }
    }
}
/// Per engine executor: the last audit batch of its feed stored here.
const FEED_MARKS: TableDefinition<u16, u64> = TableDefinition::new("feed_marks");
/// The audit records by target ([`crate::audit_index`]), written in the
/// same transaction as the records: `(bucket, last seq)` to packed pairs.
const AUDIT_INDEX: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("audit_index");
/// `INDEX_FROM`: the first seq the index covers. A store made before the
/// index existed gets the seq after its last record at its first open;
/// queries by target scan the records before it, as they all once did.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INDEX_FROM: &str = "audit_index_from";
/// Keyed transfers' outcomes ([`crate::keyed_outcomes`]), written by the
/// audit feed with the records of their batches: rows of up to
/// [`MAX_OUTCOMES_PER_ROW`] appended under increasing numbers, so a write
/// appends at the end of the tree instead of inserting a key at a random
/// place (a page copied per key: 12 us and 200 bytes of file a key). The
/// index from key hash to row is in memory ([`OutcomeIndex`]), rebuilt
/// from the rows at open; the purge deletes rows from the oldest.
const KEYED_OUTCOME_ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("keyed_outcome_rows");
/// Most outcomes one row holds.
pub const MAX_OUTCOMES_PER_ROW: usize = 512;
/// Most rows one purge chunk deletes.
pub const OUTCOME_PURGE_ROWS: usize = 64;

/// Key hash -> the row holding its outcome, for every outcome stored.
type OutcomeIndex = parking_lot::RwLock<std::collections::HashMap<[u8; 16], u64>>;
/// Most index pairs one query by target reads before its page ends early
/// with a `next` cursor (8 MB of pairs, 16 million records of the log at
/// 16 buckets); a row read counts as many pairs as a row holds records.
pub const MAX_INDEX_SCAN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AccessStoreError {
    #[error("access store: {0}")]
    Redb(#[from] redb::Error),
    #[error(
        "access store: {0} is open in another process (a running `peakstack serve`?); stop it, or manage keys over HTTP with an admin key (POST /v1/keys)"
    )]
    InUse(String),
    #[error("access store: {0}")]
    Failed(String),
    #[error("access store is closed")]
    Closed,
    #[error("access store: corrupt record: {0}")]
    Corrupt(String),
}

fn redb_error(error: impl Into<redb::Error>) -> AccessStoreError {
    AccessStoreError::Redb(error.into())
}

/// One write: maybe a key (new or changed), and the audit records that go
/// with it (as records, or as rows the audit feed packed).
struct Write {
    key: Option<KeyRecord>,
    audit: Vec<AuditRecord>,
    packed: Vec<PackedRow>,
    /// Outcomes of keyed transfers of these batches, by key hash.
    outcomes: Vec<([u8; 16], KeyedOutcome)>,
    /// (executor, sequence) of the engine audit batches these records are.
    marks: Vec<(u16, u64)>,
    /// Whether the answer waits for the disk. Feed writes do not: the
    /// engine's log keeps their batches until a later durable commit (see
    /// [`AccessStore::sync_blocking`]) has made them safe here.
    durable: bool,
    /// The seqs the write's records got.
    reply: oneshot::Sender<Result<Range<u64>, AccessStoreError>>,
}

enum Op {
    Write(Box<Write>),
    /// Deletes up to `rows` rows of keyed outcomes all older than `cutoff_ms`.
    Purge {
        cutoff_ms: u64,
        rows: usize,
        reply: oneshot::Sender<Result<PurgedOutcomes, AccessStoreError>>,
    },
    Close,
}

/// What one purge chunk of keyed outcomes deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgedOutcomes {
    pub rows: usize,
    pub outcomes: usize,
}

pub struct AccessStore {
    outcome_index: Arc<OutcomeIndex>,
    /// Taken on close, so that the file is closed (and may be opened again,
    /// in this process too) once the writer has stopped.
    db: Mutex<Option<Arc<Database>>>,
    ops: mpsc::Sender<Op>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AccessStore {
    /// Opens (or creates) the store at `path`, starts its writer, and
    /// returns it with every key it holds.
    pub fn open(path: &Path) -> Result<(AccessStore, Vec<KeyRecord>), AccessStoreError> {
        let db = match crate::open_redb(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(AccessStoreError::InUse(path.display().to_string()))
            }
            Err(error) => return Err(redb_error(error)),
        };
        let mut txn = db.begin_write().map_err(redb_error)?;
        txn.set_durability(Durability::Immediate).map_err(redb_error)?;
        txn.open_table(KEYS).map_err(redb_error)?;
        txn.open_table(FEED_MARKS).map_err(redb_error)?;
        txn.open_table(AUDIT_INDEX).map_err(redb_error)?;
        txn.open_table(KEYED_OUTCOME_ROWS).map_err(redb_error)?;
        {
            let audit = txn.open_table(AUDIT).map_err(redb_error)?;
            let mut meta = txn.open_table(META).map_err(redb_error)?;
            if meta.get(INDEX_FROM).map_err(redb_error)?.is_none() {
                let index_from = last_seq(&audit)? + 1;
                meta.insert(INDEX_FROM, index_from).map_err(redb_error)?;
            }
        }
        txn.commit().map_err(redb_error)?;

        let db = Arc::new(db);
        let keys = load_keys(&db)?;
        let next_seq = {
            let txn = db.begin_read().map_err(redb_error)?;
            last_seq(&txn.open_table(AUDIT).map_err(redb_error)?)? + 1
        };
        let (index, next_row) = load_outcome_index(&db)?;
        let outcome_index = Arc::new(parking_lot::RwLock::new(index));
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        let writer_index = outcome_index.clone();
        let thread = peakstack_engine::failstop::spawn("access-store", move || {
            peakstack_engine::failstop::fault_point();
            run(&writer_db, &writer_index, rx, next_seq, next_row)
        })
        .map_err(|e| AccessStoreError::Failed(format!("cannot start its thread: {e}")))?;
        let store = AccessStore { outcome_index, db: Mutex::new(Some(db)), ops: tx, thread: Mutex::new(Some(thread)) };
        Ok((store, keys))
    }

    async fn write(&self, key: Option<KeyRecord>, audit: Vec<AuditRecord>) -> Result<Range<u64>, AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        let write =
            Write { key, audit, packed: Vec::new(), outcomes: Vec::new(), marks: Vec::new(), durable: true, reply };
        self.ops.send(Op::Write(Box::new(write))).await.map_err(|_| AccessStoreError::Closed)?;
        answer.await.map_err(|_| AccessStoreError::Closed)?
    }

    fn write_blocking(&self, write: Write) -> Result<(), AccessStoreError> {
        self.ops.blocking_send(Op::Write(Box::new(write))).map_err(|_| AccessStoreError::Closed)?;
        Ok(())
    }

    /// Appends the records of engine audit batches, packed into rows, with
    /// their marks, from a thread outside the async runtime; returns once
    /// readable, not durable (a crash rolls it back whole: records and marks
    /// together).
    pub fn append_feed_blocking(
        &self,
        rows: Vec<PackedRow>,
        outcomes: Vec<([u8; 16], KeyedOutcome)>,
        marks: Vec<(u16, u64)>,
    ) -> Result<(), AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        self.write_blocking(Write {
            key: None,
            audit: Vec::new(),
            packed: rows,
            outcomes,
            marks,
            durable: false,
            reply,
        })?;
        answer.blocking_recv().map_err(|_| AccessStoreError::Closed)?.map(|_| ())
    }

    /// Makes every write so far durable (one commit that waits for the disk).
    pub fn sync_blocking(&self) -> Result<(), AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write {
            key: None,
            audit: Vec::new(),
            packed: Vec::new(),
            outcomes: Vec::new(),
            marks: Vec::new(),
            durable: true,
            reply,
        };
        self.write_blocking(write)?;
        answer.blocking_recv().map_err(|_| AccessStoreError::Closed)?.map(|_| ())
    }

    /// Per engine executor, the last audit batch stored.
    pub fn feed_marks(&self) -> Result<Vec<(u16, u64)>, AccessStoreError> {
        let db = self.db.lock().clone().ok_or(AccessStoreError::Closed)?;
        let txn = db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(FEED_MARKS).map_err(redb_error)?;
        let mut marks = Vec::new();
        for entry in table.iter().map_err(redb_error)? {
            let (executor, sequence) = entry.map_err(redb_error)?;
            marks.push((executor.value(), sequence.value()));
        }
        Ok(marks)
    }

    /// The outcome stored for a keyed transfer. A key with none (nearly
    /// every lookup: a fresh key) costs one lookup in memory; one with an
    /// outcome, a read of its row from what the writer has committed.
    pub fn keyed_outcome(&self, key_hash: &[u8; 16]) -> Result<Option<KeyedOutcome>, AccessStoreError> {
        let Some(row) = self.outcome_index.read().get(key_hash).copied() else { return Ok(None) };
        let db = self.db.lock().clone().ok_or(AccessStoreError::Closed)?;
        let txn = db.begin_read().map_err(redb_error)?;
        let table = txn.open_table(KEYED_OUTCOME_ROWS).map_err(redb_error)?;
        // Gone since the index was read: purged, as expired.
        let Some(bytes) = table.get(row).map_err(redb_error)? else { return Ok(None) };
        let outcomes = keyed_outcomes::decode_row(bytes.value())
            .ok_or_else(|| AccessStoreError::Corrupt(format!("keyed outcome row {row}")))?;
        Ok(outcomes.into_iter().rev().find(|(hash, _)| hash == key_hash).map(|(_, outcome)| outcome))
    }

    /// How many keyed outcomes are stored.
    pub fn keyed_outcomes_stored(&self) -> u64 {
        self.outcome_index.read().len() as u64
    }

    /// Deletes up to `rows` of the oldest rows of keyed outcomes whose
    /// outcomes are all older than `cutoff_ms`. Not durable by itself: a
    /// crash may bring back a chunk, which the next purge deletes again.
    pub async fn purge_keyed_outcomes(&self, cutoff_ms: u64, rows: usize) -> Result<PurgedOutcomes, AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        self.ops.send(Op::Purge { cutoff_ms, rows, reply }).await.map_err(|_| AccessStoreError::Closed)?;
        answer.await.map_err(|_| AccessStoreError::Closed)?
    }

    /// Stores a key (new or changed) with its audit record; returns once
    /// both are durable.
    pub async fn put_key(&self, key: KeyRecord, audit: AuditRecord) -> Result<u64, AccessStoreError> {
        let seqs = self.write(Some(key), vec![audit]).await?;
        Ok(seqs.start)
    }

    /// Appends one audit record; returns its seq once it is durable.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AccessStoreError> {
        let seqs = self.write(None, vec![record]).await?;
        Ok(seqs.start)
    }

    /// Records with seq > `after` that match `filter`, oldest first, at most
    /// `limit`.
    pub async fn query(&self, filter: AuditFilter, after: u64, limit: usize) -> Result<AuditPage, AccessStoreError> {
        let db = self.db.lock().clone().ok_or(AccessStoreError::Closed)?;
        tokio::task::spawn_blocking(move || query(&db, &filter, after, limit, &mut QueryWork::default()))
            .await
            .map_err(|e| AccessStoreError::Failed(e.to_string()))?
    }

    /// Stops the writer after the writes already queued.
    pub async fn close(&self) {
        let _ = self.ops.send(Op::Close).await;
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.db.lock().take();
    }
}

fn load_keys(db: &Database) -> Result<Vec<KeyRecord>, AccessStoreError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(KEYS).map_err(redb_error)?;
    let mut keys = Vec::new();
    for entry in table.iter().map_err(redb_error)? {
        let (id, value) = entry.map_err(redb_error)?;
        let record: KeyRecord = serde_json::from_slice(value.value())
            .map_err(|e| AccessStoreError::Corrupt(format!("key {}: {e}", id.value())))?;
        keys.push(record);
    }
    Ok(keys)
}

fn last_seq(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<u64, AccessStoreError> {
    let Some((first, row)) = table.last().map_err(redb_error)? else { return Ok(0) };
    let records = Row::decode(first.value(), row.value())?;
    Ok(records.last().map_or(first.value(), |record| record.seq))
}

/// What a query read, for tests to bound.
#[derive(Debug, Default)]
struct QueryWork {
    rows_read: usize,
    index_entries_read: usize,
}

type AuditTable = redb::ReadOnlyTable<u64, &'static [u8]>;

fn query(
    db: &Database,
    filter: &AuditFilter,
    after: u64,
    limit: usize,
    work: &mut QueryWork,
) -> Result<AuditPage, AccessStoreError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let audit = txn.open_table(AUDIT).map_err(redb_error)?;
    let Some(target) = filter.target.as_deref() else { return scan(&audit, filter, after, u64::MAX, limit, work) };
    let index_from = txn.open_table(META).map_err(redb_error)?.get(INDEX_FROM).map_err(redb_error)?;
    let index_from = index_from.map_or(1, |seq| seq.value());
    let mut records = Vec::new();
    if after.saturating_add(1) < index_from {
        // Written before the index existed: scanned, then the index goes on.
        let page = scan(&audit, filter, after, index_from, limit, work)?;
        if page.next.is_some() {
            return Ok(page);
        }
        records = page.records;
    }
    let index = txn.open_table(AUDIT_INDEX).map_err(redb_error)?;
    let lookup = Lookup { audit: &audit, filter, limit, work, row: None };
    lookup.run(&index, target, after.max(index_from - 1), records)
}

/// Records with `after` < seq < `before` that match `filter`, reading
/// every one of them (at most [`MAX_AUDIT_SCAN`] a page).
fn scan(
    table: &AuditTable,
    filter: &AuditFilter,
    after: u64,
    before: u64,
    limit: usize,
    work: &mut QueryWork,
) -> Result<AuditPage, AccessStoreError> {
    let mut records = Vec::new();
    let mut scanned = 0;
    // From the row holding record `after + 1` (rows hold several records).
    let start = match table.range(..=after.saturating_add(1)).map_err(redb_error)?.next_back() {
        Some(entry) => entry.map_err(redb_error)?.0.value(),
        None => 0,
    };
    for entry in table.range(start..before).map_err(redb_error)? {
        let (first, row) = entry.map_err(redb_error)?;
        work.rows_read += 1;
        for record in Row::decode(first.value(), row.value())? {
            let seq = record.seq;
            if seq <= after {
                continue;
            }
            if seq >= before {
                break;
            }
            scanned += 1;
            if filter.matches(&record) {
                records.push(record);
                if records.len() == limit {
                    return Ok(AuditPage { records, next: Some(seq) });
                }
            }
            if scanned == MAX_AUDIT_SCAN {
                return Ok(AuditPage { records, next: Some(seq) });
            }
        }
    }
    Ok(AuditPage { records, next: None })
}

/// A query by target through the index.
struct Lookup<'a> {
    audit: &'a AuditTable,
    filter: &'a AuditFilter,
    limit: usize,
    work: &'a mut QueryWork,
    /// The last row read (candidates often share one).
    row: Option<(u64, Vec<AuditRecord>)>,
}

impl Lookup<'_> {
    /// Appends to `records` the matches with seq > `after`, oldest first.
    fn run(
        mut self,
        index: &redb::ReadOnlyTable<(u16, u64), &'static [u8]>,
        target: &str,
        after: u64,
        mut records: Vec<AuditRecord>,
    ) -> Result<AuditPage, AccessStoreError> {
        let (bucket, tag) = audit_index::bucket_and_tag(audit_index::target_hash(target));
        let mut scanned = 0;
        for entry in index.range((bucket, after.saturating_add(1))..=(bucket, u64::MAX)).map_err(redb_error)? {
            let (key, pairs) = entry.map_err(redb_error)?;
            let last_seq = key.value().1;
            self.work.index_entries_read += 1;
            let (pair_count, seqs) = audit_index::matching_seqs(pairs.value(), tag, last_seq)
                .map_err(|e| AccessStoreError::Corrupt(format!("audit index entry {bucket}/{last_seq}: {e}")))?;
            scanned += pair_count;
            for seq in seqs.into_iter().filter(|&seq| seq > after) {
                let record = self.record(seq)?;
                scanned += MAX_RECORDS_PER_ROW;
                // The target itself, not its hash, decides.
                if self.filter.matches(&record) {
                    records.push(record);
                    if records.len() == self.limit {
                        return Ok(AuditPage { records, next: Some(seq) });
                    }
                }
            }
            if scanned >= MAX_INDEX_SCAN {
                return Ok(AuditPage { records, next: Some(last_seq) });
            }
        }
        Ok(AuditPage { records, next: None })
    }

    /// The record `seq`, which the index says exists.
    fn record(&mut self, seq: u64) -> Result<AuditRecord, AccessStoreError> {
        let holds = |row: &Option<(u64, Vec<AuditRecord>)>| {
            row.as_ref().is_some_and(|(first, records)| (*first..*first + records.len() as u64).contains(&seq))
        };
        if !holds(&self.row) {
            let entry = self.audit.range(..=seq).map_err(redb_error)?.next_back().transpose().map_err(redb_error)?;
            let (first, bytes) = entry.ok_or_else(|| {
                AccessStoreError::Corrupt(format!("the audit index names seq {seq}, before every row"))
            })?;
            self.work.rows_read += 1;
            self.row = Some((first.value(), Row::decode(first.value(), bytes.value())?));
        }
        let (first, records) = self.row.as_ref().expect("read above");
        match records.get((seq - first) as usize) {
            Some(record) if record.seq == seq => Ok(record.clone()),
            _ => Err(AccessStoreError::Corrupt(format!("the audit index names seq {seq}, which no row holds"))),
        }
    }
}

/// The index of the stored outcomes, and the number of the next row.
fn load_outcome_index(db: &Database) -> Result<(std::collections::HashMap<[u8; 16], u64>, u64), AccessStoreError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(KEYED_OUTCOME_ROWS).map_err(redb_error)?;
    let mut index = std::collections::HashMap::new();
    let mut next_row = 0;
    for entry in table.iter().map_err(redb_error)? {
        let (row, bytes) = entry.map_err(redb_error)?;
        let row = row.value();
        let outcomes = keyed_outcomes::decode_row(bytes.value())
            .ok_or_else(|| AccessStoreError::Corrupt(format!("keyed outcome row {row}")))?;
        index.extend(outcomes.into_iter().map(|(hash, _)| (hash, row)));
        next_row = row + 1;
    }
    Ok((index, next_row))
}

fn run(db: &Database, outcome_index: &OutcomeIndex, mut rx: mpsc::Receiver<Op>, mut next_seq: u64, mut next_row: u64) {
    let mut group = Vec::with_capacity(MAX_GROUP_WRITES);
    let mut index = IndexBuilder::default();
    let mut close = false;
    while !close {
        let Some(first) = rx.blocking_recv() else { break };
        for op in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())).take(MAX_GROUP_WRITES) {
            match op {
                Op::Write(write) => group.push(*write),
                Op::Purge { cutoff_ms, rows, reply } => {
                    let _ = reply.send(purge_outcomes(db, outcome_index, cutoff_ms, rows));
                }
                Op::Close => {
                    close = true;
                    break;
                }
            }
        }
        if !group.is_empty() {
            (next_seq, next_row) = write_group(db, &mut group, &mut index, outcome_index, (next_seq, next_row));
        }
    }
}

/// Applies one group in one transaction; returns the next free seq and
/// outcome row.
fn write_group(
    db: &Database,
    group: &mut Vec<Write>,
    index: &mut IndexBuilder,
    outcome_index: &OutcomeIndex,
    (next_seq, next_row): (u64, u64),
) -> (u64, u64) {
    // A failed group may have left its pairs.
    index.clear();
    let mut seq = next_seq;
    let mut row = next_row;
    let mut indexed: Vec<([u8; 16], u64)> = Vec::new();
    let mut seqs_of = Vec::with_capacity(group.len());
    let outcome = (|| -> Result<(), AccessStoreError> {
        let mut txn = db.begin_write().map_err(redb_error)?;
        // One durable commit persists the non-durable ones before it too.
        let durable = group.iter().any(|write| write.durable);
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(redb_error)?;
        {
            let mut keys = txn.open_table(KEYS).map_err(redb_error)?;
            let mut audit = txn.open_table(AUDIT).map_err(redb_error)?;
            let mut marks = txn.open_table(FEED_MARKS).map_err(redb_error)?;
            for write in group.iter_mut() {
                for &(executor, sequence) in &write.marks {
                    marks.insert(executor, sequence).map_err(redb_error)?;
                }
                if let Some(key) = &write.key {
                    let bytes = serde_json::to_vec(key).map_err(|e| AccessStoreError::Failed(e.to_string()))?;
                    keys.insert(key.id.as_str(), bytes.as_slice()).map_err(redb_error)?;
                }
                let first_seq = seq;
                // Taken: on failure every writer hears so (the audit feed
                // sends its batches again).
                let mut numbered = std::mem::take(&mut write.audit);
                for record in &mut numbered {
                    record.seq = seq;
                    index.push(audit_index::target_hash(&record.target), seq);
                    seq += 1;
                }
                for chunk in numbered.chunks(MAX_RECORDS_PER_ROW) {
                    // The shapes `Row` reads: one record, or an array of them.
                    let bytes = match chunk {
                        [one] => serde_json::to_vec(one),
                        many => serde_json::to_vec(many),
                    }
                    .map_err(|e| AccessStoreError::Failed(e.to_string()))?;
                    audit.insert(chunk[0].seq, bytes.as_slice()).map_err(redb_error)?;
                }
                for row in &write.packed {
                    assert_eq!(row.target_hashes.len(), row.records as usize, "a packed row's hashes are its records'");
                    audit.insert(seq, row.bytes.as_slice()).map_err(redb_error)?;
                    for (&hash, record_seq) in row.target_hashes.iter().zip(seq..) {
                        index.push(hash, record_seq);
                    }
                    seq += u64::from(row.records);
                }
                seqs_of.push(first_seq..seq);
            }
            let mut outcome_rows = txn.open_table(KEYED_OUTCOME_ROWS).map_err(redb_error)?;
            for write in group.iter() {
                for chunk in write.outcomes.chunks(MAX_OUTCOMES_PER_ROW) {
                    outcome_rows.insert(row, keyed_outcomes::encode_row(chunk).as_slice()).map_err(redb_error)?;
                    indexed.extend(chunk.iter().map(|(hash, _)| (*hash, row)));
                    row += 1;
                }
            }
            let mut index_table = txn.open_table(AUDIT_INDEX).map_err(redb_error)?;
            for (key, pairs) in index.drain() {
                index_table.insert(key, pairs.as_slice()).map_err(redb_error)?;
            }
        }
        txn.commit().map_err(redb_error)?;
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            // Indexed before the feed hears its write is stored (and tells
            // the engine its batches are visible).
            outcome_index.write().extend(indexed);
            for (write, seqs) in group.drain(..).zip(seqs_of) {
                let _ = write.reply.send(Ok(seqs));
            }
            (seq, row)
        }
        Err(error) => {
            // Nothing of the group was stored: every writer hears so, and
            // the seqs are handed out again.
            tracing::error!(%error, "access store write failed");
            let text = error.to_string();
            for write in group.drain(..) {
                let _ = write.reply.send(Err(AccessStoreError::Failed(text.clone())));
            }
            (next_seq, next_row)
        }
    }
}

/// One purge chunk, in a transaction of its own (not waiting for the disk):
/// the oldest rows whose outcomes are all older than `cutoff_ms`, at most
/// `max_rows`, and their keys from the index (those it still has at the
/// row: a key stored again since points at a newer row).
fn purge_outcomes(
    db: &Database,
    outcome_index: &OutcomeIndex,
    cutoff_ms: u64,
    max_rows: usize,
) -> Result<PurgedOutcomes, AccessStoreError> {
    let mut txn = db.begin_write().map_err(redb_error)?;
    txn.set_durability(Durability::None).map_err(redb_error)?;
    let mut victims = Vec::new();
    {
        let mut rows = txn.open_table(KEYED_OUTCOME_ROWS).map_err(redb_error)?;
        for entry in rows.iter().map_err(redb_error)?.take(max_rows) {
            let (row, bytes) = entry.map_err(redb_error)?;
            let outcomes = keyed_outcomes::decode_row(bytes.value())
                .ok_or_else(|| AccessStoreError::Corrupt(format!("keyed outcome row {}", row.value())))?;
            if outcomes.iter().any(|(_, outcome)| outcome.timestamp_ms >= cutoff_ms) {
                break;
            }
            victims.push((row.value(), outcomes.into_iter().map(|(hash, _)| hash).collect::<Vec<_>>()));
        }
        for (row, _) in &victims {
            rows.remove(row).map_err(redb_error)?;
        }
    }
    txn.commit().map_err(redb_error)?;
    let mut index = outcome_index.write();
    let mut purged = PurgedOutcomes { rows: victims.len(), outcomes: 0 };
    for (row, hashes) in victims {
        for hash in hashes {
            if index.get(&hash) == Some(&row) {
                index.remove(&hash);
                purged.outcomes += 1;
            }
        }
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Scope;
    use crate::audit::action;
    use crate::keys::generate;
    use serde_json::json;

    fn record(key_id: &str, action: &str, target: &str, at_ms: u64) -> AuditRecord {
        AuditRecord::new(key_id, "req", action, target, json!({}), at_ms)
    }

    #[tokio::test]
    async fn keys_and_audit_survive_a_reopen_and_seqs_keep_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.redb");
        let (store, keys) = AccessStore::open(&path).unwrap();
        assert!(keys.is_empty());
        let key = generate(&Scope::Admin, None, Some("first".into()), "cli", 10);
        assert_eq!(
            store.put_key(key.record.clone(), record("cli", action::KEY_CREATE, &key.record.id, 10)).await.unwrap(),
            1
        );
        assert_eq!(store.append(record(&key.record.id, action::TRANSFER_CREATE, "t1", 20)).await.unwrap(), 2);
        // A second process cannot open it meanwhile.
        assert!(matches!(AccessStore::open(&path), Err(AccessStoreError::InUse(_))));
        store.close().await;
        assert!(matches!(store.append(record("x", "y", "z", 1)).await, Err(AccessStoreError::Closed)));

        let (store, keys) = AccessStore::open(&path).unwrap();
        assert_eq!(keys, vec![key.record.clone()]);
        assert_eq!(store.append(record(&key.record.id, action::TRANSFER_CREATE, "t2", 30)).await.unwrap(), 3);
        let all = store.query(AuditFilter::default(), 0, 100).await.unwrap();
        assert_eq!(all.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all.next, None);
        let transfers = AuditFilter { action: Some(action::TRANSFER_CREATE.into()), ..Default::default() };
        let page = store.query(transfers.clone(), 0, 1).await.unwrap();
        assert_eq!((page.records[0].target.as_str(), page.next), ("t1", Some(2)));
        let page = store.query(transfers, 2, 1).await.unwrap();
        assert_eq!(page.records[0].target, "t2");
        store.close().await;
    }

    fn transfer_event(transfer_id: &str, time_ms: u64) -> peakstack_engine::AuditEvent {
        let id = |text: &str| peakstack_domain::Id::parse(text).unwrap();
        peakstack_engine::AuditEvent {
            origin: peakstack_engine::Origin {
                key_id: Arc::from("k"),
                request_id: Arc::from("req"),
                idempotency: None,
            },
            time_ms,
            transfer: peakstack_domain::Transfer {
                id: id(transfer_id),
                debit_account_id: id("a"),
                credit_account_id: id("b"),
                amount: 5,
                currency: peakstack_domain::Currency::parse("USD").unwrap(),
                kind: peakstack_domain::TransferKind::Single,
                status: peakstack_domain::TransferStatus::Posted,
                posted_amount: None,
                timestamp_ms: time_ms,
                details: None,
            },
            answered: None,
        }
    }

    #[test]
    fn a_feed_write_fills_rows_that_queries_read_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.redb");
        let (store, _) = AccessStore::open(&path).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(store.append(record("k", action::KEY_CREATE, "k1", 1))).unwrap();
        let mut packer = crate::audit_rows::RowPacker::new(MAX_RECORDS_PER_ROW);
        for i in 0..150 {
            packer.push(&transfer_event(&format!("t{i}"), 2));
        }
        // Seqs 2..=151, in rows of 64, 64 and 22 records.
        store.append_feed_blocking(packer.finish(), Vec::new(), vec![(0, 7), (1, 3)]).unwrap();
        // Rows of JSON records (as stores before packed rows wrote them)
        // read on beside packed ones: seqs 152..=153 in one row.
        let json_rows =
            vec![record("k", action::TRANSFER_CREATE, "j1", 3), record("k", action::TRANSFER_CREATE, "j2", 3)];
        assert_eq!(runtime.block_on(store.write(None, json_rows)).unwrap(), 152..154);
        runtime.block_on(store.append(record("k", action::KEY_REVOKE, "k1", 3))).unwrap();
        assert_eq!(store.feed_marks().unwrap(), vec![(0, 7), (1, 3)]);
        let all = runtime.block_on(store.query(AuditFilter::default(), 0, 1000)).unwrap();
        assert_eq!(all.records.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=154).collect::<Vec<_>>());
        assert_eq!(all.records[3].target, "t2");
        assert_eq!(
            all.records[3].details,
            json!({"debit_account_id": "a", "credit_account_id": "b", "amount": 5, "currency": "USD"})
        );
        assert_eq!(all.records[152].target, "j2");
        assert_eq!(all.records[153].action, action::KEY_REVOKE);
        let targets = |page: &AuditPage| page.records.iter().map(|r| r.target.clone()).collect::<Vec<_>>();
        // A cursor in the middle of a row.
        let page = runtime.block_on(store.query(AuditFilter::default(), 3, 2)).unwrap();
        assert_eq!(targets(&page), vec!["t2", "t3"]);
        assert_eq!(page.next, Some(5));
        // A page across two rows: seq 66 (t64) starts the second one.
        let page = runtime.block_on(store.query(AuditFilter::default(), 64, 3)).unwrap();
        assert_eq!(targets(&page), vec!["t63", "t64", "t65"]);
        // Across a packed row and a JSON one.
        let page = runtime.block_on(store.query(AuditFilter::default(), 150, 3)).unwrap();
        assert_eq!(targets(&page), vec!["t149", "j1", "j2"]);
        runtime.block_on(store.close());
        // Seqs go on after a reopen from the last record of the last row,
        // packed or not.
        let (store, _) = AccessStore::open(&path).unwrap();
        assert_eq!(runtime.block_on(store.append(record("k", action::KEY_CREATE, "k2", 4))).unwrap(), 155);
        let mut packer = crate::audit_rows::RowPacker::new(MAX_RECORDS_PER_ROW);
        packer.push(&transfer_event("t150", 5));
        packer.push(&transfer_event("t151", 5));
        store.append_feed_blocking(packer.finish(), Vec::new(), vec![(0, 8)]).unwrap();
        runtime.block_on(store.close());
        let (store, _) = AccessStore::open(&path).unwrap();
        assert_eq!(runtime.block_on(store.append(record("k", action::KEY_CREATE, "k3", 6))).unwrap(), 158);
        runtime.block_on(store.close());
    }

    /// Pages through `query` for `filter` from the start, `limit` a page;
    /// returns the seqs found and the work done.
    fn pages(store: &AccessStore, filter: &AuditFilter, limit: usize) -> (Vec<u64>, QueryWork) {
        let db = store.db.lock().clone().unwrap();
        let mut work = QueryWork::default();
        let (mut seqs, mut after) = (Vec::new(), 0);
        for _ in 0..1000 {
            let page = query(&db, filter, after, limit, &mut work).unwrap();
            assert!(page.records.len() <= limit);
            assert!(page.records.iter().all(|record| filter.matches(record)));
            seqs.extend(page.records.iter().map(|record| record.seq));
            match page.next {
                Some(next) => after = next,
                None => return (seqs, work),
            }
        }
        panic!("more than 1000 pages");
    }

    /// What a scan of every record finds for `filter`.
    fn scanned(store: &AccessStore, filter: &AuditFilter) -> Vec<u64> {
        let db = store.db.lock().clone().unwrap();
        let txn = db.begin_read().unwrap();
        let audit = txn.open_table(AUDIT).unwrap();
        let (mut seqs, mut after) = (Vec::new(), 0);
        loop {
            let page = scan(&audit, filter, after, u64::MAX, usize::MAX, &mut QueryWork::default()).unwrap();
            seqs.extend(page.records.iter().map(|record| record.seq));
            match page.next {
                Some(next) => after = next,
                None => return seqs,
            }
        }
    }

    fn by_target(target: &str) -> AuditFilter {
        AuditFilter { target: Some(target.into()), ..Default::default() }
    }

    /// Feeds `count` transfers named `t<i>` in writes of 1000, except that
    /// those at `needles` are named `needle`.
    fn feed(store: &AccessStore, count: usize, needles: &[usize]) {
        for start in (0..count).step_by(1000) {
            let mut packer = crate::audit_rows::RowPacker::new(MAX_RECORDS_PER_ROW);
            for i in start..count.min(start + 1000) {
                let name = if needles.contains(&i) { "needle".to_owned() } else { format!("t{i}") };
                packer.push(&transfer_event(&name, i as u64));
            }
            store.append_feed_blocking(packer.finish(), Vec::new(), vec![(0, start as u64 + 1)]).unwrap();
        }
    }

    #[test]
    fn a_query_by_target_among_100k_records_reads_the_index_and_the_rows_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AccessStore::open(&dir.path().join("access.redb")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // Records 1..=100_000 from the feed, needles among them; then JSON
        // rows: the needle's key records, and a target that only shares a
        // prefix with it.
        let needles = [17, 20_000, 20_001, 63_999, 99_999];
        feed(&store, 100_000, &needles);
        runtime.block_on(store.append(record("k", action::KEY_CREATE, "needle", 9))).unwrap();
        runtime.block_on(store.append(record("k", action::KEY_CREATE, "needle-2", 9))).unwrap();
        runtime.block_on(store.append(record("k", action::KEY_REVOKE, "needle", 10))).unwrap();
        let expected: Vec<u64> = needles.iter().map(|&i| i as u64 + 1).chain([100_001, 100_003]).collect();
        assert_eq!(scanned(&store, &by_target("needle")), expected);
        for limit in [1, 2, 3, 100] {
            let (seqs, work) = pages(&store, &by_target("needle"), limit);
            assert_eq!(seqs, expected, "limit {limit}");
            // At most one row read per record found (a scan reads every one
            // of 1565 rows), and the entries of one bucket: one per write
            // (103 writes), plus the one each page ends in.
            let pages = expected.len().div_ceil(limit) + 1;
            assert!(work.rows_read <= expected.len(), "limit {limit}: {work:?}");
            assert!(work.index_entries_read <= 103 + pages, "limit {limit}: {work:?}");
        }
        // The other filters still apply.
        let revoked = AuditFilter { action: Some(action::KEY_REVOKE.into()), ..by_target("needle") };
        assert_eq!(pages(&store, &revoked, 10).0, vec![100_003]);
        let late = AuditFilter { since_ms: Some(20_001), until_ms: Some(99_999), ..by_target("needle") };
        assert_eq!(pages(&store, &late, 10).0, vec![20_002, 64_000]);
        assert_eq!(pages(&store, &by_target("t5"), 10).0, vec![6]);
        let (seqs, work) = pages(&store, &by_target("nobody"), 10);
        assert_eq!((seqs, work.rows_read), (vec![], 0));
        // A cursor inside the needles' run.
        let db = store.db.lock().clone().unwrap();
        let page = query(&db, &by_target("needle"), 20_001, 2, &mut QueryWork::default()).unwrap();
        assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![20_002, 64_000]);
        drop(db);
        runtime.block_on(store.close());
    }

    #[test]
    fn a_hash_collision_in_the_index_shows_no_record_of_another_target() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AccessStore::open(&dir.path().join("access.redb")).unwrap();
        feed(&store, 10, &[]);
        // An entry that names t3 (seq 4) under the hash of "ghost", as a
        // collision of hashes would.
        let db = store.db.lock().clone().unwrap();
        let mut index = IndexBuilder::default();
        index.push(audit_index::target_hash("ghost"), 4);
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(AUDIT_INDEX).unwrap();
            for (key, pairs) in index.drain() {
                table.insert(key, pairs.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let (seqs, work) = pages(&store, &by_target("ghost"), 10);
        assert_eq!((seqs, work.rows_read), (vec![], 1));
        assert_eq!(pages(&store, &by_target("t3"), 10).0, vec![4]);
    }

    #[test]
    fn a_store_from_before_the_index_answers_by_target_from_its_scan_then_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.redb");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (store, _) = AccessStore::open(&path).unwrap();
        // Seqs 1..=300, needles at 6 and 201; then 301 in a JSON row.
        feed(&store, 300, &[5, 200]);
        runtime.block_on(store.append(record("k", action::KEY_CREATE, "needle", 1))).unwrap();
        runtime.block_on(store.close());
        // As a store written before the index existed: no index, no mark.
        {
            let db = crate::open_redb(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(AUDIT_INDEX).unwrap();
            txn.delete_table(META).unwrap();
            txn.commit().unwrap();
        }
        let (store, _) = AccessStore::open(&path).unwrap();
        // Seqs from 302 on are indexed.
        runtime.block_on(store.append(record("k", action::KEY_REVOKE, "needle", 2))).unwrap();
        let mut packer = crate::audit_rows::RowPacker::new(MAX_RECORDS_PER_ROW);
        packer.push(&transfer_event("other", 3));
        packer.push(&transfer_event("needle", 3));
        store.append_feed_blocking(packer.finish(), Vec::new(), vec![(0, 999)]).unwrap();
        let expected = vec![6, 201, 301, 302, 304];
        assert_eq!(scanned(&store, &by_target("needle")), expected);
        for limit in [1, 2, 10] {
            assert_eq!(pages(&store, &by_target("needle"), limit).0, expected, "limit {limit}");
        }
        // A cursor past the scanned part reads only the index.
        let db = store.db.lock().clone().unwrap();
        let mut work = QueryWork::default();
        let page = query(&db, &by_target("needle"), 302, 10, &mut work).unwrap();
        assert_eq!((page.records.len(), page.records[0].seq, work.rows_read), (1, 304, 1));
        drop(db);
        runtime.block_on(store.close());
        // The mark stays where it was set.
        let (store, _) = AccessStore::open(&path).unwrap();
        assert_eq!(pages(&store, &by_target("needle"), 2).0, expected);
        runtime.block_on(store.close());
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AccessStore::open(&dir.path().join("access.redb")).unwrap();
        let store = Arc::new(store);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.append(record("k", "a", &format!("t{i}"), i)).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
        store.close().await;
    }
}
