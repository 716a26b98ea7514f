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
use crate::audit_rows::{self, PackedRow, PACKED_ROW_TAG};
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
    Close,
}

pub struct AccessStore {
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
        txn.open_table(AUDIT).map_err(redb_error)?;
        txn.open_table(FEED_MARKS).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;

        let db = Arc::new(db);
        let keys = load_keys(&db)?;
        let next_seq = last_seq(&db)? + 1;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        let thread = peakstack_engine::failstop::spawn("access-store", move || {
            peakstack_engine::failstop::fault_point();
            run(&writer_db, rx, next_seq)
        })
        .map_err(|e| AccessStoreError::Failed(format!("cannot start its thread: {e}")))?;
        Ok((AccessStore { db: Mutex::new(Some(db)), ops: tx, thread: Mutex::new(Some(thread)) }, keys))
    }

    async fn write(&self, key: Option<KeyRecord>, audit: Vec<AuditRecord>) -> Result<Range<u64>, AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write { key, audit, packed: Vec::new(), marks: Vec::new(), durable: true, reply };
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
    pub fn append_feed_blocking(&self, rows: Vec<PackedRow>, marks: Vec<(u16, u64)>) -> Result<(), AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        self.write_blocking(Write { key: None, audit: Vec::new(), packed: rows, marks, durable: false, reply })?;
        answer.blocking_recv().map_err(|_| AccessStoreError::Closed)?.map(|_| ())
    }

    /// Makes every write so far durable (one commit that waits for the disk).
    pub fn sync_blocking(&self) -> Result<(), AccessStoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write { key: None, audit: Vec::new(), packed: Vec::new(), marks: Vec::new(), durable: true, reply };
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
        tokio::task::spawn_blocking(move || query(&db, &filter, after, limit))
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

fn last_seq(db: &Database) -> Result<u64, AccessStoreError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(AUDIT).map_err(redb_error)?;
    let Some((first, row)) = table.last().map_err(redb_error)? else { return Ok(0) };
    let records = Row::decode(first.value(), row.value())?;
    Ok(records.last().map_or(first.value(), |record| record.seq))
}

fn query(db: &Database, filter: &AuditFilter, after: u64, limit: usize) -> Result<AuditPage, AccessStoreError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(AUDIT).map_err(redb_error)?;
    let mut records = Vec::new();
    let mut scanned = 0;
    // From the row holding record `after + 1` (rows hold several records).
    let start = match table.range(..=after.saturating_add(1)).map_err(redb_error)?.next_back() {
        Some(entry) => entry.map_err(redb_error)?.0.value(),
        None => 0,
    };
    for entry in table.range(start..).map_err(redb_error)? {
        let (first, row) = entry.map_err(redb_error)?;
        for record in Row::decode(first.value(), row.value())? {
            let seq = record.seq;
            if seq <= after {
                continue;
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

fn run(db: &Database, mut rx: mpsc::Receiver<Op>, mut next_seq: u64) {
    let mut group = Vec::with_capacity(MAX_GROUP_WRITES);
    let mut close = false;
    while !close {
        let Some(first) = rx.blocking_recv() else { break };
        for op in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())).take(MAX_GROUP_WRITES) {
            match op {
                Op::Write(write) => group.push(*write),
                Op::Close => {
                    close = true;
                    break;
                }
            }
        }
        if !group.is_empty() {
            next_seq = write_group(db, &mut group, next_seq);
        }
    }
}

/// Applies one group in one transaction; returns the next free seq.
fn write_group(db: &Database, group: &mut Vec<Write>, next_seq: u64) -> u64 {
    let mut seq = next_seq;
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
                    audit.insert(seq, row.bytes.as_slice()).map_err(redb_error)?;
                    seq += u64::from(row.records);
                }
                seqs_of.push(first_seq..seq);
            }
        }
        txn.commit().map_err(redb_error)?;
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            for (write, seqs) in group.drain(..).zip(seqs_of) {
                let _ = write.reply.send(Ok(seqs));
            }
            seq
        }
        Err(error) => {
            // Nothing of the group was stored: every writer hears so, and
            // the seqs are handed out again.
            tracing::error!(%error, "access store write failed");
            let text = error.to_string();
            for write in group.drain(..) {
                let _ = write.reply.send(Err(AccessStoreError::Failed(text.clone())));
            }
            next_seq
        }
    }
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
            origin: peakstack_engine::Origin { key_id: Arc::from("k"), request_id: Arc::from("req") },
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
        store.append_feed_blocking(packer.finish(), vec![(0, 7), (1, 3)]).unwrap();
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
        store.append_feed_blocking(packer.finish(), vec![(0, 8)]).unwrap();
        runtime.block_on(store.close());
        let (store, _) = AccessStore::open(&path).unwrap();
        assert_eq!(runtime.block_on(store.append(record("k", action::KEY_CREATE, "k3", 6))).unwrap(), 158);
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
