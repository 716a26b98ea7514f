//! An executor's checkpoint thread: it turns the images the apply thread
//! takes into checkpoint files, off the two threads every client waits for.
//!
//! The log thread hands an image over once the batch it covers is durable
//! ([`Checkpointer::offer`]). This thread sorts and encodes it (tens of
//! milliseconds for a few hundred thousand records; the image's records are
//! shared with the live ledger until then, see `ChunkedVec`), waits until
//! what the checkpoint counts on is durable (the archive runs it names, the
//! audit batches it covers), syncs the history file, writes the checkpoint
//! atomically and deletes the log segments it covers. Before, the log
//! thread did all this itself, and group commit stopped for as long as a
//! checkpoint took to encode and write.
//!
//! One checkpoint waits at a time: one offered while another waits is
//! dropped (a newer one would need even more of the audit stored, and under
//! steady load never get there).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use peakstack_domain::ledger::LedgerImage;
use peakstack_domain::Account;

use crate::archive::{MergeHorizon, RunSyncer};
use crate::checkpoint::{self, Checkpoint};
use crate::log;
use crate::protocol::ExecutorId;

/// How often a waiting checkpoint looks whether it may go.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// A checkpoint taken, on its way to disk: it may be written only once the
/// first `checkpoint.archive_runs` archive runs are durable and the audit
/// feed has stored the batches up to `audit_needed`.
pub(crate) struct PendingCheckpoint {
    pub checkpoint: Checkpoint<LedgerImage>,
    pub audit_needed: u64,
}

/// What the thread needs of the rest of the engine.
pub(crate) struct CheckpointerConfig {
    pub executor: ExecutorId,
    /// The executor's directory: checkpoint file and log segments.
    pub dir: PathBuf,
    /// A handle on the history file, to make it durable before a
    /// checkpoint counts on it (the log thread appends through another).
    pub history: File,
    /// The archive runs written, made durable here before a checkpoint
    /// counts on them (see `archive::RunSyncer`).
    pub archive_runs: RunSyncer,
    /// Raised to the archive runs a stored checkpoint counts on: the
    /// archive merges only those (see `archive.rs`).
    pub archive_horizon: MergeHorizon,
    /// Up to which batch the audit consumer has stored this executor's events.
    pub audit_stored: Box<dyn Fn() -> u64 + Send>,
    /// Called after each checkpoint written.
    pub on_written: Box<dyn Fn() + Send>,
    /// Account buffers of encoded images, back to the apply thread.
    pub spare_accounts: Sender<Vec<Account>>,
}

/// The log thread's end.
pub(crate) struct Checkpointer {
    to_thread: Option<Sender<PendingCheckpoint>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(config: CheckpointerConfig) -> std::io::Result<Checkpointer> {
        let (to_thread, rx) = bounded(1);
        let name = format!("checkpoint-{}", config.executor);
        let thread = crate::failstop::spawn(name, move || {
            // Encoding a checkpoint takes tens of milliseconds of CPU; the
            // apply and log threads go first.
            crate::background::lower_this_thread();
            Worker::new(config).run(rx)
        })?;
        Ok(Checkpointer { to_thread: Some(to_thread), thread: Some(thread) })
    }

    /// Hands over a checkpoint whose batches are all durable. Dropped when
    /// the thread is still busy with an earlier one.
    pub fn offer(&self, pending: PendingCheckpoint) {
        let sender = self.to_thread.as_ref().expect("the thread runs while the checkpointer lives");
        match sender.try_send(pending) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            // Without checkpoints the log would grow for good.
            Err(TrySendError::Disconnected(_)) => crate::failstop::stop("the checkpoint thread is gone"),
        }
    }
}

impl Drop for Checkpointer {
    /// Lets the thread write what it has (if it may), then stops it.
    fn drop(&mut self) {
        self.to_thread = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An encoded checkpoint waiting for what it counts on.
struct Waiting {
    sequence: u64,
    archive_runs: u32,
    audit_needed: u64,
    bytes: Vec<u8>,
}

struct Worker {
    config: CheckpointerConfig,
    waiting: Option<Waiting>,
}

impl Worker {
    fn new(config: CheckpointerConfig) -> Worker {
        Worker { config, waiting: None }
    }

    fn run(mut self, rx: Receiver<PendingCheckpoint>) {
        loop {
            if self.waiting.is_none() {
                match rx.recv() {
                    Ok(pending) => {
                        crate::failstop::fault_point();
                        self.encode(pending)
                    }
                    Err(_) => return,
                }
            }
            self.write_if_ready();
            if self.waiting.is_some() {
                match rx.recv_timeout(WAIT_POLL) {
                    // One waits at a time.
                    Ok(newer) => self.give_back(newer.checkpoint.ledger),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        // Stopping: the last checkpoint goes if it may.
                        self.write_if_ready();
                        if self.waiting.is_some() {
                            tracing::warn!(
                                executor = self.config.executor,
                                "last checkpoint not written: the audit feed has not stored what it covers"
                            );
                        }
                        return;
                    }
                }
            }
        }
    }

    fn encode(&mut self, pending: PendingCheckpoint) {
        let PendingCheckpoint { checkpoint, audit_needed } = pending;
        let bytes = checkpoint.encode();
        self.waiting =
            Some(Waiting { sequence: checkpoint.sequence, archive_runs: checkpoint.archive_runs, audit_needed, bytes });
        self.give_back(checkpoint.ledger);
    }

    /// Ends the image's sharing of records, and sends its accounts buffer
    /// back so that the next image copies into memory already mapped.
    fn give_back(&self, image: LedgerImage) {
        let _ = self.config.spare_accounts.try_send(image.accounts);
    }

    /// Writes the waiting checkpoint once the archive runs it counts on are
    /// durable and the audit feed has stored every batch it covers: after
    /// that, no replay will make them again.
    fn write_if_ready(&mut self) {
        let Some(waiting) = &self.waiting else { return };
        let stored = (self.config.audit_stored)();
        if stored < waiting.audit_needed || self.config.archive_runs.written() < waiting.archive_runs {
            return;
        }
        let waiting = self.waiting.take().expect("checked");
        match self.write(&waiting) {
            Ok(()) => {
                self.config.archive_horizon.checkpoint_stored(waiting.archive_runs);
                (self.config.on_written)();
            }
            // The log still has everything: carry on, recovery replays more.
            Err(error) => tracing::error!(executor = self.config.executor, %error, "checkpoint failed"),
        }
    }

    /// Makes the history and the archive runs it counts on durable, writes
    /// the checkpoint, then deletes the log segments it covers.
    fn write(&mut self, waiting: &Waiting) -> std::io::Result<()> {
        let started = Instant::now();
        self.config.history.sync_data()?;
        self.config.archive_runs.make_durable(waiting.archive_runs)?;
        checkpoint::store(&self.config.dir, &waiting.bytes)?;
        let removed = remove_covered_segments(&self.config.dir, waiting.sequence)?;
        metrics::histogram!("peakstack_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            executor = self.config.executor,
            covered = waiting.sequence,
            bytes = waiting.bytes.len(),
            removed_segments = removed,
            "checkpoint written"
        );
        Ok(())
    }
}

fn remove_covered_segments(dir: &Path, covered: u64) -> std::io::Result<usize> {
    log::remove_segments_before(dir, covered + 1).map_err(std::io::Error::other)
}
