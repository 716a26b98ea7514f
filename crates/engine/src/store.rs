//! The history store: every committed transfer record and, per account, the
//! transfers that touched it. An embedded redb database fed from the
//! executors' durable batches by one indexer thread, behind the critical
//! path.
//!
//! The command logs are the source of truth; the store is derived from them.
//! Each executor's batches are indexed in order and the store remembers, per
//! executor, the last batch it holds (its watermark). After a crash the
//! batches past the watermark are indexed again; every write is keyed
//! deterministically, so indexing twice changes nothing.
//!
//! The lag between the logs and the store is bounded ([`MAX_INDEX_LAG_RECORDS`]):
//! past it the log threads wait, which pushes back on the executors and so
//! on admissions. A peak is absorbed up to the bound and the store catches
//! up after it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use peakstack_domain::{Id, Transfer};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{Codec, Reader, Writer};
use crate::protocol::ExecutorId;

/// Records handed to the indexer and not yet committed to the store, at most.
pub const MAX_INDEX_LAG_RECORDS: u64 = 1_000_000;
/// Records one store transaction takes at most.
const MAX_RECORDS_PER_COMMIT: usize = 200_000;
/// How long a history read waits for the store to catch up with what was
/// acknowledged before the read (read your writes), at most.
pub const HISTORY_READ_WAIT: Duration = Duration::from_secs(2);

const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");
/// (account id, 0x00, time_ms, executor, batch sequence, index) -> transfer id
const ACCOUNT_HISTORY: TableDefinition<&[u8], &str> = TableDefinition::new("account_history");
/// executor -> last batch sequence indexed
const WATERMARKS: TableDefinition<u16, u64> = TableDefinition::new("watermarks");

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Transfer records of one durable batch, for the indexer.
pub struct IndexBatch {
    pub executor: ExecutorId,
    pub sequence: u64,
    pub time_ms: u64,
    pub records: Vec<(Transfer, bool)>,
}

struct Progress {
    /// Records handed to the indexer / committed by it, since start.
    sent: AtomicU64,
    indexed: AtomicU64,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    progress: Arc<Progress>,
}

pub struct Indexer {
    tx: Sender<IndexBatch>,
    thread: JoinHandle<()>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(TRANSFERS).map_err(err)?;
        tx.open_table(ACCOUNT_HISTORY).map_err(err)?;
        tx.open_table(WATERMARKS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Store {
            db: Arc::new(db),
            progress: Arc::new(Progress { sent: AtomicU64::new(0), indexed: AtomicU64::new(0) }),
        })
    }

    /// The last batch of `executor` the store holds (0 = none).
    pub fn watermark(&self, executor: ExecutorId) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(WATERMARKS).map_err(err)?;
        Ok(table.get(executor).map_err(err)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Starts the indexer thread.
    pub fn start_indexer(&self) -> Result<Indexer, StoreError> {
        let (tx, rx) = unbounded();
        let store = self.clone();
        let thread =
            std::thread::Builder::new().name("indexer".into()).spawn(move || store.run_indexer(rx)).map_err(err)?;
        Ok(Indexer { tx, thread })
    }

    /// Hands a durable batch's records to the indexer, waiting while the lag
    /// is at its bound.
    pub fn submit(&self, indexer: &Sender<IndexBatch>, batch: IndexBatch) {
        let count = batch.records.len() as u64;
        while self.lag() >= MAX_INDEX_LAG_RECORDS {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.progress.sent.fetch_add(count, Ordering::AcqRel);
        metrics::gauge!("peakstack_index_lag_records").set(self.lag() as f64);
        // The indexer only stops after every sender is gone.
        let _ = indexer.send(batch);
    }

    /// Records handed over and not yet in the store.
    pub fn lag(&self) -> u64 {
        self.progress.sent.load(Ordering::Acquire).saturating_sub(self.progress.indexed.load(Ordering::Acquire))
    }

    fn run_indexer(self, rx: Receiver<IndexBatch>) {
        let mut group: Vec<IndexBatch> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut records = first.records.len();
            group.push(first);
            while records < MAX_RECORDS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(batch) => {
                        records += batch.records.len();
                        group.push(batch);
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            if let Err(error) = self.write_group(&group) {
                // The logs still hold everything: stop loudly, restart re-indexes.
                tracing::error!(%error, "history store write failed; stopping");
                std::process::abort();
            }
            metrics::histogram!("peakstack_index_commit_seconds").record(started.elapsed().as_secs_f64());
            self.progress.indexed.fetch_add(records as u64, Ordering::AcqRel);
            group.clear();
        }
    }

    fn write_group(&self, group: &[IndexBatch]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut transfers = tx.open_table(TRANSFERS).map_err(err)?;
            let mut history = tx.open_table(ACCOUNT_HISTORY).map_err(err)?;
            let mut watermarks = tx.open_table(WATERMARKS).map_err(err)?;
            let mut value = Writer::default();
            let mut key = Vec::with_capacity(96);
            for batch in group {
                for (index, (transfer, new)) in batch.records.iter().enumerate() {
                    value.buf.clear();
                    transfer.encode(&mut value);
                    transfers.insert(transfer.id.as_str(), value.buf.as_slice()).map_err(err)?;
                    if *new {
                        for account in [&transfer.debit_account_id, &transfer.credit_account_id] {
                            history_key(&mut key, account, batch.time_ms, batch.executor, batch.sequence, index as u32);
                            history.insert(key.as_slice(), transfer.id.as_str()).map_err(err)?;
                        }
                    }
                }
                let previous = watermarks.get(batch.executor).map_err(err)?.map(|v| v.value()).unwrap_or(0);
                if batch.sequence > previous {
                    watermarks.insert(batch.executor, batch.sequence).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }

    /// A transfer record from the store.
    pub fn transfer(&self, id: &Id) -> Result<Option<Transfer>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(TRANSFERS).map_err(err)?;
        let Some(value) = table.get(id.as_str()).map_err(err)? else { return Ok(None) };
        Transfer::decode(&mut Reader::new(value.value())).map(Some).map_err(err)
    }

    /// Waits until the store holds every record handed to it before this
    /// call, or until `HISTORY_READ_WAIT` passes.
    pub fn catch_up(&self) {
        let target = self.progress.sent.load(Ordering::Acquire);
        let deadline = Instant::now() + HISTORY_READ_WAIT;
        while self.progress.indexed.load(Ordering::Acquire) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Transfers that touched `account`, oldest first, after the cursor.
    /// Answers the page and the cursor of the next page (None at the end).
    pub fn account_transfers(
        &self,
        account: &Id,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<String>), StoreError> {
        let mut prefix = account.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut start = prefix.clone();
        if let Some(cursor) = after {
            let suffix = decode_hex(cursor).ok_or_else(|| StoreError("invalid cursor".into()))?;
            start.extend_from_slice(&suffix);
            start.push(0); // strictly after the cursor's key
        }
        let mut end = account.as_str().as_bytes().to_vec();
        end.push(1);
        let tx = self.db.begin_read().map_err(err)?;
        let history = tx.open_table(ACCOUNT_HISTORY).map_err(err)?;
        let transfers = tx.open_table(TRANSFERS).map_err(err)?;
        let mut page = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        for entry in history.range(start.as_slice()..end.as_slice()).map_err(err)? {
            if page.len() == limit {
                break;
            }
            let (key, id) = entry.map_err(err)?;
            let Some(value) = transfers.get(id.value()).map_err(err)? else {
                return Err(StoreError(format!("history names transfer {} that is not stored", id.value())));
            };
            page.push(Transfer::decode(&mut Reader::new(value.value())).map_err(err)?);
            last_key = Some(key.value()[prefix.len()..].to_vec());
        }
        let next = if page.len() == limit { last_key.map(|k| encode_hex(&k)) } else { None };
        Ok((page, next))
    }
}

impl Indexer {
    pub fn sender(&self) -> Sender<IndexBatch> {
        self.tx.clone()
    }

    /// Waits for every batch handed over to be in the store, then stops.
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

fn history_key(key: &mut Vec<u8>, account: &Id, time_ms: u64, executor: ExecutorId, sequence: u64, index: u32) {
    key.clear();
    key.extend_from_slice(account.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&time_ms.to_be_bytes());
    key.extend_from_slice(&executor.to_be_bytes());
    key.extend_from_slice(&sequence.to_be_bytes());
    key.extend_from_slice(&index.to_be_bytes());
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 64 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
