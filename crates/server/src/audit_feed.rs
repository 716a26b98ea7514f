//! The consumer of the engine's audit feed: one audit record per transfer
//! made with an origin, stored in `access.redb`, after the client has its
//! answer. The engine logs the origin with the request, so the change and
//! its attribution are durable together; until this consumer reports a
//! batch stored, no checkpoint covers it, and a crash makes it again on
//! replay. Batches stored before (by their `(executor, sequence)` mark) are
//! skipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use peakstack_engine::{AuditBatch, Engine};

use crate::access_store::{AccessStore, AccessStoreError, MAX_RECORDS_PER_ROW};
use crate::audit_rows::RowPacker;
use crate::keyed_outcomes::KeyedOutcome;

/// Most engine batches stored in one write.
pub const MAX_BATCHES_PER_WRITE: usize = 256;
/// How often an idle consumer looks for the stop flag; also the pause
/// before a failed write is tried again.
const POLL: Duration = Duration::from_millis(50);
/// How long the batches after a first one gather before they are written
/// together. One write per engine batch cost, under one transfer per
/// request, a wake-up of this thread and one of the store's, and a redb
/// commit, for every fsync of the engine: 13% of the server's CPU. Audit
/// reads wait at most this much longer for the records of recent changes.
pub const GATHER: Duration = Duration::from_millis(5);
/// Records are written without waiting for the disk (they are readable at
/// once) and made durable together this often: only then does the engine
/// hear they are stored, and may checkpoint past them.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// The running consumer.
pub struct AuditFeed {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditFeed {
    /// Takes the engine's feed (if nobody has) and starts storing it.
    pub fn start(engine: &Engine, store: Arc<AccessStore>) -> Result<AuditFeed, AccessStoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let Some((backlog, feed)) = engine.take_audit_feed() else {
            return Ok(AuditFeed { stop, thread: Mutex::new(None) });
        };
        let marks: HashMap<u16, u64> = store.feed_marks()?.into_iter().collect();
        for (&executor, &sequence) in &marks {
            engine.audit_stored(executor, sequence);
        }
        let consumer = Consumer {
            engine: engine.clone(),
            store,
            feed,
            marks,
            unsynced: BTreeMap::new(),
            last_sync: Instant::now(),
            stop: stop.clone(),
        };
        let thread = peakstack_engine::failstop::spawn("audit-feed", move || {
            peakstack_engine::failstop::fault_point();
            consumer.run(backlog.into())
        })
        .map_err(|e| AccessStoreError::Failed(format!("cannot start the audit feed: {e}")))?;
        Ok(AuditFeed { stop, thread: Mutex::new(Some(thread)) })
    }

    /// Stops after the write in progress. What is not stored yet is made
    /// again by the engine's next replay.
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct Consumer {
    engine: Engine,
    store: Arc<AccessStore>,
    feed: Receiver<AuditBatch>,
    /// Per executor: the last batch written.
    marks: HashMap<u16, u64>,
    /// Written but not yet made durable.
    unsynced: BTreeMap<u16, u64>,
    last_sync: Instant,
    stop: Arc<AtomicBool>,
}

impl Consumer {
    /// Makes what was written durable, then tells the engine.
    fn sync(&mut self) {
        self.last_sync = Instant::now();
        match self.store.sync_blocking() {
            Ok(()) => {
                for (executor, sequence) in std::mem::take(&mut self.unsynced) {
                    self.engine.audit_stored(executor, sequence);
                }
            }
            Err(error) => tracing::error!(%error, "making audit records durable failed; trying again"),
        }
    }

    fn run(mut self, mut pending: VecDeque<AuditBatch>) {
        while !self.stop.load(Ordering::Acquire) {
            if !self.unsynced.is_empty() && self.last_sync.elapsed() >= SYNC_INTERVAL {
                self.sync();
            }
            if pending.is_empty() {
                match self.feed.recv_timeout(POLL) {
                    Ok(batch) => {
                        pending.push_back(batch);
                        // Asleep, not waiting on the channel, so the batches
                        // of the next moment gather without waking anyone.
                        std::thread::sleep(GATHER);
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while pending.len() < MAX_BATCHES_PER_WRITE {
                match self.feed.try_recv() {
                    Ok(batch) => pending.push_back(batch),
                    Err(_) => break,
                }
            }
            let take = pending.len().min(MAX_BATCHES_PER_WRITE);
            let batches: Vec<AuditBatch> = pending.drain(..take).collect();
            let mut rows = RowPacker::new(MAX_RECORDS_PER_ROW);
            let mut outcomes = Vec::new();
            let mut marks: BTreeMap<u16, u64> = BTreeMap::new();
            for batch in &batches {
                if batch.sequence <= self.marks.get(&batch.executor).copied().unwrap_or(0) {
                    continue; // stored before a crash, made again by the replay
                }
                for event in &batch.events {
                    rows.push(event);
                    outcomes.extend(KeyedOutcome::of_event(event));
                }
                let mark = marks.entry(batch.executor).or_default();
                *mark = (*mark).max(batch.sequence);
            }
            if marks.is_empty() {
                continue;
            }
            let stored_marks = marks.iter().map(|(&e, &s)| (e, s)).collect();
            match self.store.append_feed_blocking(rows.finish(), outcomes, stored_marks) {
                Ok(()) => {
                    for (executor, sequence) in marks {
                        self.marks.insert(executor, sequence);
                        self.unsynced.insert(executor, sequence);
                        self.engine.audit_visible(executor, sequence);
                    }
                    for batch in batches {
                        self.engine.recycle_audit_events(batch.executor, batch.events);
                    }
                }
                Err(AccessStoreError::Closed) => return,
                Err(error) => {
                    tracing::error!(%error, "storing audit records failed; trying again");
                    for batch in batches.into_iter().rev() {
                        pending.push_front(batch);
                    }
                    std::thread::sleep(POLL);
                }
            }
        }
        // Stopping: what was written becomes durable, so that the engine's
        // last checkpoint can cover it.
        if !self.unsynced.is_empty() {
            self.sync();
        }
    }
}
