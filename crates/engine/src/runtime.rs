//! The engine at run time: one apply thread and one log thread per executor.
//!
//! The apply thread drains a batch of inputs (peer messages first, then
//! client requests), applies them to its [`ExecutorCore`] and encodes the
//! ones that changed state into one log frame. The log thread appends the
//! frames of every batch waiting for it with a single `fdatasync` (group
//! commit), and only then answers the callers and sends the batch's
//! messages to the other executors. Apply and fsync overlap: while batch N
//! is being made durable, batch N+1 is being applied; nothing of N+1 leaves
//! before N+1 is durable, and N+1 is durable only after N.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;
use peakstack_domain::{Account, AccountChange, ErrorCode, Id, NewAccount, Transfer, TransferRequest};
use tokio::sync::oneshot;

use crate::archive::Archive;
use crate::batch_ids;
use crate::checkpoint;
use crate::checkpointer::{Checkpointer, CheckpointerConfig, PendingCheckpoint};
use crate::clock::Clock;
use crate::codec::{Codec, Writer};
use crate::executor::{ClientTag, Effects, ExecutorCore};
use crate::failstop;
use crate::history::{HistoryReader, HistoryWriter};
use crate::layout::Layout;
use crate::log::{encode_frame, Log, LogError};
use crate::meta::{Meta, MetaError};
use crate::parts::{PartAnswer, PartCommand, PartQuery, PartReply, Publication};
use crate::protocol::{AuditBatch, AuditEvent, ExecutorId, Input, Origin, PeerMsg, TransferResult, TxnId};
use crate::tcc::{TxnFilter, TxnView};
use crate::test_hooks::TestBatchGate;
use crate::trade_checkout::{CheckoutAnswer, CheckoutAsk};
use crate::trade_settlement::{SettleAnswer, SettleAsk};
use peakstack_inventory::SaleGates;

/// Most inputs one batch applies.
pub const MAX_BATCH_INPUTS: usize = 8192;
/// A batch stops taking client requests once it holds this many transfers.
/// Smaller groups pipeline better: the log thread syncs one while the apply
/// thread applies the next, and callers answered sooner send again sooner.
/// `peakstack bench` (4 clients of 1024): 575-608k transfers/s without the
/// cap, 652-735k with it, p99 about the same.
pub const MAX_BATCH_TRANSFERS: usize = 2048;
/// Most client requests waiting in one executor's queue; past it callers are refused.
pub const CLIENT_QUEUE_CAPACITY: usize = 16_384;
/// Applied batches waiting for their fsync, per executor.
pub const WRITE_QUEUE_CAPACITY: usize = 8;
/// A batch of at most this many client transfers and peer messages, applied
/// while the log thread has nothing queued, is written by the apply thread
/// itself instead of handed over: two thread wake-ups saved per batch (the log thread's, and the
/// callers' wake of an apply thread parked waiting for them), against
/// applying the next batch while this one syncs, which for a small batch is
/// a few tens of microseconds out of a sync of hundreds. One transfer per
/// HTTP request (`loadtest transfers`, 64 connections, the same build with
/// and without): server CPU 28.1 -> 25.3 us a request (apply and log
/// threads 6.6 -> 5.1, tokio workers 20.5 -> 19.2), 39.8k -> 42.8k
/// requests/s. Large batches (`bench`, `--batch 1000`) still go to the log
/// thread and keep apply and sync overlapped.
pub const INLINE_WRITE_MAX_ITEMS: usize = 64;
/// Most transactions one executor coordinates at once; past it, it stops
/// taking client requests until some finish.
pub const MAX_TXNS_IN_FLIGHT: usize = 100_000;
/// Transfer records an executor keeps in memory, by default, before it
/// archives the oldest final ones; a quarter of the limit goes per run.
/// Every record is archived once whatever the limit, but each checkpoint
/// carries the records in memory: at 200k, encoding one took about 100 ms
/// of a core and wrote tens of MiB while the log waited for the disk.
/// `peakstack bench` (3 clients of 1024), three alternating pairs: p99
/// 9.9/9.0/9.6 ms at 200k against 9.0/9.2/8.8 at 100k, the same
/// throughput (1.02-1.05M transfers/s), checkpoint thread 0.05-0.07 ->
/// 0.02-0.03 us a transfer, merge thread 0.08 -> 0.10-0.12, RSS 70 MiB less.
/// In a faster window 200k was 3-5% ahead on throughput (1.09/1.11M against
/// 1.05/1.06M, 4 clients) and still behind on p99 (10.5/9.8 against 9.7/9.7).
pub const MAX_RECORDS_IN_MEMORY: usize = 100_000;
/// An executor checkpoints once this much log was written since its last
/// checkpoint (and at shutdown), whatever is in flight.
pub const CHECKPOINT_EVERY_LOG_BYTES: u64 = 64 << 20;
/// How often an idle executor wakes to expire pending transfers.
pub const TICK: Duration = Duration::from_millis(50);
/// How long shutdown waits for transactions in flight to finish.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Shard count, used when the data dir is created; afterwards the data
    /// dir's own count wins.
    pub shards: u32,
    /// Executor count, likewise fixed when the data dir is created.
    pub executors: u16,
    pub clock: Arc<dyn Clock>,
    /// Transfer records an executor keeps in memory before it archives the
    /// oldest final ones (see `archive.rs`); [`MAX_RECORDS_IN_MEMORY`] by default.
    pub records_in_memory: usize,
    /// An executor checkpoints after this many bytes of log (and at
    /// shutdown); [`CHECKPOINT_EVERY_LOG_BYTES`] by default.
    pub checkpoint_every_log_bytes: u64,
}

impl EngineConfig {
    /// The defaults for a data dir: 64 shards, `executors` executors, the system clock.
    pub fn new(data_dir: impl Into<PathBuf>, executors: u16) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            shards: 64,
            executors,
            clock: Arc::new(crate::clock::SystemClock),
            records_in_memory: MAX_RECORDS_IN_MEMORY,
            checkpoint_every_log_bytes: CHECKPOINT_EVERY_LOG_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("replay of executor {executor} failed: {reason}")]
    Replay { executor: ExecutorId, reason: String },
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("history file: {0}")]
    History(std::io::Error),
}

pub use crate::executor::AccountReply;

#[derive(Debug)]
pub enum Query {
    Account(Id),
    Accounts {
        after: Option<Id>,
        limit: usize,
    },
    Transfer(Id),
    /// Transfer records by id, for a listing (see `listing.rs`).
    Transfers(Vec<Id>),
    /// How long the executor's history file is once this answer arrives.
    HistoryLen,
    Totals,
    /// A part's read (see `parts.rs`).
    Part(PartQuery),
    /// A global transaction this executor coordinates (see `tcc/`).
    Transaction(TxnId),
    /// Its unfinished transactions, in id order.
    Transactions {
        filter: TxnFilter,
        limit: usize,
    },
    /// Reliable messages it keeps (all, or the dead letters), in id order.
    Messages {
        dead_only: bool,
        limit: usize,
    },
}

/// One record of [`Query::Transfers`], as [`Engine::transfer`] sees it.
#[derive(Debug)]
pub enum Lookup {
    Found(Transfer),
    Missing,
    /// Reserved by a transaction in flight.
    Undecided,
}

#[derive(Debug)]
pub enum QueryAnswer {
    Account(Option<Account>),
    Accounts(Vec<Account>),
    Transfer(Option<Transfer>),
    /// The transfer's record is reserved by a transaction in flight.
    TransferUndecided,
    Transfers(Vec<Lookup>),
    HistoryLen(u64),
    Totals(Totals),
    Part(PartAnswer),
    Transaction(Option<TxnView>),
    Transactions(Vec<TxnView>),
    Messages(Vec<crate::outbox::MessageView>),
}

/// Sums for checking the books: over all accounts, credits minus debits
/// (pending included) must be zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub net: i128,
    /// Sum of the clearing accounts' balances: money in flight between shards
    /// (pending included). Zero when quiet.
    pub clearing_net: i128,
    pub accounts: u64,
    pub transfers_in_memory: u64,
    /// Final transfer records moved out of memory into the archive.
    pub archived: u64,
    pub holds: u64,
    pub txns_in_flight: u64,
    pub fences: u64,
}

impl std::ops::Add for Totals {
    type Output = Totals;
    fn add(self, o: Totals) -> Totals {
        Totals {
            net: self.net + o.net,
            clearing_net: self.clearing_net + o.clearing_net,
            accounts: self.accounts + o.accounts,
            transfers_in_memory: self.transfers_in_memory + o.transfers_in_memory,
            archived: self.archived + o.archived,
            holds: self.holds + o.holds,
            txns_in_flight: self.txns_in_flight + o.txns_in_flight,
            fences: self.fences + o.fences,
        }
    }
}

enum Request {
    CreateAccount(NewAccount, oneshot::Sender<AccountReply>),
    CreateAccounts(Vec<NewAccount>, oneshot::Sender<Vec<AccountReply>>),
    ChangeAccount(Id, AccountChange, oneshot::Sender<AccountReply>),
    Transfers {
        requests: Vec<TransferRequest>,
        atomic: bool,
        origin: Option<Origin>,
        reply: oneshot::Sender<Vec<TransferResult>>,
    },
    Query(Query, oneshot::Sender<QueryAnswer>),
    /// Commands of the parts, answered in order once durable.
    Parts(Vec<PartCommand>, oneshot::Sender<Vec<PartReply>>),
    /// A checkout to place from its home executor (see `trade_checkout.rs`).
    Checkout(Box<CheckoutAsk>, oneshot::Sender<CheckoutAnswer>),
    /// A merchant's settlement on its home executor (see `trade_settlement.rs`).
    Settle(SettleAsk, oneshot::Sender<SettleAnswer>),
    /// An operator's replay of a dead letter (see `outbox.rs`): whether it was one.
    ReplayMessage(u64, oneshot::Sender<bool>),
}

enum Inbound {
    Peer { from: ExecutorId, messages: Vec<PeerMsg> },
    Stop,
}

enum Completion {
    Account(oneshot::Sender<AccountReply>, AccountReply),
    Accounts(oneshot::Sender<Vec<AccountReply>>, Vec<AccountReply>),
    Transfers(oneshot::Sender<Vec<TransferResult>>, Vec<TransferResult>),
    Query(oneshot::Sender<QueryAnswer>, QueryAnswer),
    Parts(oneshot::Sender<Vec<PartReply>>, Vec<PartReply>),
    Checkout(oneshot::Sender<CheckoutAnswer>, CheckoutAnswer),
    Settle(oneshot::Sender<SettleAnswer>, SettleAnswer),
    Flag(oneshot::Sender<bool>, bool),
    /// Views the batch changed, made visible once it is durable (first,
    /// before any answer of the batch: a caller that hears of a new flash
    /// sale finds its gate).
    Publish(Publication, Arc<Shared>),
}

impl Completion {
    fn deliver(self) {
        // A caller that went away does not care; nothing to do.
        let _ = match self {
            Completion::Account(tx, v) => tx.send(v).map_err(drop),
            Completion::Accounts(tx, v) => tx.send(v).map_err(drop),
            Completion::Transfers(tx, v) => tx.send(v).map_err(drop),
            Completion::Query(tx, v) => tx.send(v).map_err(drop),
            Completion::Parts(tx, v) => tx.send(v).map_err(drop),
            Completion::Checkout(tx, v) => tx.send(v).map_err(drop),
            Completion::Settle(tx, v) => tx.send(v).map_err(drop),
            Completion::Flag(tx, v) => tx.send(v).map_err(drop),
            Completion::Publish(publication, shared) => {
                publication.publish(&shared.layout, &shared.gates, &shared.catalogue_epoch);
                Ok(())
            }
        };
    }
}

struct PendingWrite {
    /// The batch's inputs that changed state, in order, to be encoded into
    /// one log frame by the log thread (off the apply thread); empty when
    /// the batch logs nothing.
    logged: Vec<Input>,
    /// The batch time, written in its frame.
    time_ms: u64,
    history: Vec<u8>,
    /// A checkpoint taken at the end of this batch.
    checkpoint: Option<PendingCheckpoint>,
    completions: Vec<Completion>,
    outbox: Vec<(ExecutorId, PeerMsg)>,
    /// The audit events of the batch logged in `logged`.
    audit: Vec<AuditEvent>,
    /// That batch's sequence.
    sequence: u64,
}

/// Counters (and one gauge) the server exports; updated once per batch.
#[derive(Default)]
pub struct EngineStats {
    /// A gauge: pending transfers not yet posted, voided or expired, summed
    /// over executors (each apply thread adds the change of its ledger's
    /// count after a batch, so a client's answer never precedes its count).
    pub pending_transfers: AtomicU64,
    pub batches: AtomicU64,
    pub inputs: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Batches the apply thread made durable itself instead of handing them
    /// to the log thread (small ones, with nothing queued for it).
    pub inline_writes: AtomicU64,
    pub log_bytes: AtomicU64,
    /// Checkpoints written (each lets the log segments before it go).
    pub checkpoints: AtomicU64,
    /// Gauges over executors: reliable messages kept (not yet applied by
    /// their receiver, dead letters included), and of those the dead letters.
    pub messages_kept: AtomicU64,
    pub dead_letters: AtomicU64,
}

pub(crate) struct Shared {
    layout: Layout,
    clients: Vec<Sender<Request>>,
    peers: Vec<Sender<Inbound>>,
    closed: AtomicBool,
    txns_in_flight: AtomicUsize,
    audit: AuditFeed,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stats: EngineStats,
    /// Per executor: the account history file, for reads.
    history: Vec<HistoryReader>,
    /// Per executor, for tests only: see [`Engine::test_batch_gate`].
    test_gates: Vec<TestBatchGate>,
    /// The flash sales' published views (see `peakstack_inventory::SaleGates`).
    pub(crate) gates: SaleGates,
    pub(crate) clock: Arc<dyn Clock>,
    /// Bumped when a SKU, promotion or coupon template is made (after its
    /// batch is durable): a price book built at an older epoch is stale.
    pub(crate) catalogue_epoch: AtomicU64,
    /// The last price book built, with the epoch it was built at.
    pub(crate) price_book: Mutex<Option<(u64, Arc<peakstack_pricing::PriceBook>)>>,
}

/// A handle on a running engine; clone it freely.
#[derive(Clone)]
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
}

impl Engine {
    /// Opens (or creates) the data dir, replays every executor's log and
    /// starts the executors.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        failstop::arm_from_env();
        let meta = Meta::load_or_create(&config.data_dir, config.shards, config.executors)?;
        let layout = meta.layout();
        let mut history_writers = Vec::with_capacity(usize::from(layout.executors()));
        let mut history_readers = Vec::with_capacity(usize::from(layout.executors()));
        let mut archives = Vec::with_capacity(usize::from(layout.executors()));
        let executor_count = usize::from(layout.executors());
        let mut cores = Vec::with_capacity(executor_count);
        let mut logs = Vec::with_capacity(executor_count);
        let mut last_times = Vec::with_capacity(executor_count);
        // Audit batches a replay made again: their consumer may not have
        // stored them before the crash (it skips those it has).
        let mut recovered_audit = Vec::new();
        let mut last_audit_sequences = vec![0u64; executor_count];
        for e in 0..layout.executors() {
            let mut fx = Effects::default();
            let dir = executor_dir(&config.data_dir, e);
            std::fs::create_dir_all(&dir).map_err(EngineError::History)?;
            let replay_error = |reason: String| EngineError::Replay { executor: e, reason };
            // Start from the checkpoint if there is one; the history file and
            // the archive continue from where it left them. Without one they
            // are derived from the whole log, rewritten as it replays.
            let (mut core, mut history, mut archive, covered, mut last_time_ms) = match checkpoint::load(&dir)
                .map_err(replay_error)?
            {
                Some(c) => {
                    let history = HistoryWriter::open_at(&dir, c.history_len).map_err(EngineError::History)?;
                    let archive = Archive::open(&dir.join("archive"), c.archive_runs).map_err(EngineError::History)?;
                    let (sequence, time_ms) = (c.sequence, c.time_ms);
                    let core = ExecutorCore::from_checkpoint(e, layout, c).map_err(replay_error)?;
                    (core, history, archive, sequence, time_ms)
                }
                None => (
                    ExecutorCore::new(e, layout),
                    HistoryWriter::create(&dir).map_err(EngineError::History)?,
                    Archive::create(&dir.join("archive")).map_err(EngineError::History)?,
                    0,
                    0,
                ),
            };
            let mut history_error = None;
            let mut expected = covered + 1;
            let log = Log::open(&dir, |batch| {
                if batch.sequence <= covered {
                    return Ok(());
                }
                if batch.sequence != expected {
                    return Err(format!("batch {} follows checkpoint {covered}: the log has a gap", batch.sequence));
                }
                expected += 1;
                last_time_ms = batch.time_ms;
                for input in &batch.inputs {
                    if let Err(error) = prefetch(&mut core, &archive, input) {
                        history_error.get_or_insert(error);
                    }
                    core.apply(input, batch.time_ms, None, &mut fx);
                }
                if !fx.audit.is_empty() {
                    let events = std::mem::take(&mut fx.audit);
                    recovered_audit.push(AuditBatch { executor: e, sequence: batch.sequence, events });
                    last_audit_sequences[usize::from(e)] = batch.sequence;
                }
                if let Err(error) = history
                    .append(&mut fx.history)
                    .and_then(|()| evict(&mut core, &mut archive, config.records_in_memory))
                {
                    history_error.get_or_insert(error);
                }
                fx.clear();
                Ok(())
            })?;
            if let Some(error) = history_error {
                return Err(EngineError::History(error));
            }
            if log.next_sequence() <= covered {
                return Err(replay_error(format!(
                    "the log ends at batch {} but the checkpoint covers {covered}",
                    log.next_sequence() - 1
                )));
            }
            archives.push(archive);
            history_readers.push(HistoryReader::open(&dir).map_err(EngineError::History)?);
            history_writers.push(history);
            tracing::info!(
                executor = e,
                batches = log.next_sequence() - 1,
                accounts = core.ledger().account_count(),
                "replayed log"
            );
            cores.push(core);
            logs.push(log);
            last_times.push(last_time_ms);
        }

        let mut client_txs = Vec::new();
        let mut client_rxs = Vec::new();
        let mut peer_txs = Vec::new();
        let mut peer_rxs = Vec::new();
        for _ in 0..executor_count {
            let (tx, rx) = bounded(CLIENT_QUEUE_CAPACITY);
            client_txs.push(tx);
            client_rxs.push(rx);
            // Unbounded on purpose: peer messages only stem from admitted
            // client work (bounded by MAX_TXNS_IN_FLIGHT), and a bounded
            // channel here could deadlock two executors sending to each other.
            let (tx, rx) = unbounded();
            peer_txs.push(tx);
            peer_rxs.push(rx);
        }
        let shared = Arc::new(Shared {
            layout,
            clients: client_txs,
            peers: peer_txs,
            closed: AtomicBool::new(false),
            txns_in_flight: AtomicUsize::new(0),
            audit: AuditFeed::new(executor_count, recovered_audit),
            threads: Mutex::new(Vec::new()),
            stats: EngineStats::default(),
            history: history_readers,
            test_gates: (0..executor_count).map(|_| TestBatchGate::default()).collect(),
            gates: SaleGates::default(),
            clock: config.clock.clone(),
            catalogue_epoch: AtomicU64::new(0),
            price_book: Mutex::new(None),
        });
        for core in &cores {
            core.parts().publish_all(&layout, &shared.gates);
        }

        // Unfinished transactions resume and kept reliable messages go
        // out again.
        let now_ms = shared.clock.now_ms();
        for core in &mut cores {
            let mut by_dest: Vec<Vec<PeerMsg>> = vec![Vec::new(); executor_count];
            let mut resent = core.resend();
            resent.extend(core.outbox_resend(now_ms));
            for (dest, msg) in resent {
                by_dest[usize::from(dest)].push(msg);
            }
            for (dest, messages) in by_dest.into_iter().enumerate() {
                if !messages.is_empty() {
                    send_to_peer(&shared, dest, Inbound::Peer { from: core.id(), messages });
                }
            }
            shared.txns_in_flight.fetch_add(core.txns_in_flight(), Ordering::SeqCst);
            shared.stats.pending_transfers.fetch_add(core.ledger().pending_transfer_count() as u64, Ordering::Relaxed);
        }
        // Fences whose Forget the crash lost go too, or they would stay for
        // good (and block checkpoints).
        let core_refs: Vec<&ExecutorCore> = cores.iter().collect();
        for (participant, coordinator, message) in crate::executor::lost_forgets(&core_refs) {
            if usize::from(coordinator) < executor_count {
                let forget = Inbound::Peer { from: coordinator, messages: vec![message] };
                send_to_peer(&shared, usize::from(participant), forget);
            }
        }

        let mut threads = Vec::new();
        for (((core, log), (client_rx, peer_rx)), last_time_ms) in
            cores.into_iter().zip(logs).zip(client_rxs.into_iter().zip(peer_rxs)).zip(last_times)
        {
            let id = core.id();
            // Eviction keeps the records in memory near the limit; twice
            // that leaves the table sparse enough never to grow or rehash.
            let mut core = core;
            core.reserve_records(config.records_in_memory.saturating_mul(2));
            let (write_tx, write_rx) = bounded::<PendingWrite>(WRITE_QUEUE_CAPACITY);
            let log_bytes = Arc::new(AtomicU64::new(0));
            let (spare_history_tx, spare_history_rx) = bounded::<Vec<u8>>(WRITE_QUEUE_CAPACITY);
            let (spare_accounts_tx, spare_accounts_rx) = bounded::<Vec<Account>>(1);
            let archive = archives.remove(0);
            let checkpointer = {
                let history = &history_writers[0];
                let shared = shared.clone();
                let shared_for_stats = shared.clone();
                Checkpointer::start(CheckpointerConfig {
                    executor: id,
                    dir: history.path().parent().expect("the history file is in the executor dir").to_path_buf(),
                    history: history.sync_handle().map_err(EngineError::History)?,
                    archive_runs: archive.run_syncer(),
                    archive_horizon: archive.merge_horizon(),
                    audit_stored: Box::new(move || shared.audit.stored[usize::from(id)].load(Ordering::Acquire)),
                    on_written: Box::new(move || {
                        shared_for_stats.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }),
                    spare_accounts: spare_accounts_tx,
                })
                .map_err(EngineError::Thread)?
            };
            let next_sequence = log.next_sequence();
            let resumed = core.txns_in_flight();
            let pending_transfers = core.ledger().pending_transfer_count();
            let writer = Arc::new(Mutex::new(LogWriter {
                id,
                log,
                group: Vec::new(),
                frames: Vec::new(),
                encoded: Writer::default(),
                shared: shared.clone(),
                history: history_writers.remove(0),
                log_bytes: log_bytes.clone(),
                spare_history: spare_history_tx,
                checkpointer,
            }));
            let queued = Arc::new(AtomicUsize::new(0));
            let applier = Applier {
                core,
                archive,
                records_in_memory: config.records_in_memory,
                log_bytes: log_bytes.clone(),
                log_bytes_at_checkpoint: 0,
                spare_history: spare_history_rx,
                spare_accounts: spare_accounts_rx,
                spare_audit: shared.audit.spares[usize::from(id)].1.clone(),
                checkpoint_every_log_bytes: config.checkpoint_every_log_bytes,
                client_rx,
                peer_rx,
                log: LogHandOff { writer: writer.clone(), queued: queued.clone(), tx: write_tx },
                clock: config.clock.clone(),
                shared: shared.clone(),
                next_sequence,
                last_time_ms,
                next_tag: 1,
                clients: std::collections::HashMap::new(),
                reported_in_flight: resumed,
                reported_pending_transfers: pending_transfers,
                reported_messages: (0, 0),
                last_audit_sequence: last_audit_sequences[usize::from(id)],
            };
            let log_thread = LogThread { writer, queued, rx: write_rx };
            threads.push(failstop::spawn(format!("apply-{id}"), move || applier.run()).map_err(EngineError::Thread)?);
            threads.push(failstop::spawn(format!("log-{id}"), move || log_thread.run()).map_err(EngineError::Thread)?);
        }
        *shared.threads.lock() = threads;
        Ok(Engine { shared })
    }

    pub fn layout(&self) -> Layout {
        self.shared.layout
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Tests only: the gate in front of executor `executor`'s batches, to
    /// stall it for real (see `test_hooks.rs`).
    pub fn test_batch_gate(&self, executor: ExecutorId) -> &TestBatchGate {
        &self.shared.test_gates[usize::from(executor)]
    }

    /// The audit trail of transfers made with an origin, for one consumer:
    /// the batches waiting so far (those a recovery made again included)
    /// and the channel the rest arrive on, per executor in log order. The
    /// consumer stores them and reports with [`Engine::audit_stored`]; until
    /// it has, no checkpoint covers them, so a crash loses none: the replay
    /// makes them again (the consumer skips what it has). `None` once taken.
    pub fn take_audit_feed(&self) -> Option<(Vec<AuditBatch>, Receiver<AuditBatch>)> {
        self.shared.audit.attach()
    }

    /// The consumer has durably stored executor `executor`'s audit batches
    /// up to `sequence`: checkpoints may cover them.
    pub fn audit_stored(&self, executor: ExecutorId, sequence: u64) {
        self.audit_visible(executor, sequence);
        if let Some(stored) = self.shared.audit.stored.get(usize::from(executor)) {
            stored.fetch_max(sequence, Ordering::AcqRel);
        }
    }

    /// Hands back the events of an audit batch once consumed: the executor
    /// fills the buffer again. The events are dropped here, on the caller's
    /// thread.
    pub fn recycle_audit_events(&self, executor: ExecutorId, mut events: AuditEvents) {
        events.clear();
        if let Some((spares, _)) = self.shared.audit.spares.get(usize::from(executor)) {
            let _ = spares.try_send(events);
        }
    }

    /// The consumer's readers see executor `executor`'s audit batches up to
    /// `sequence` (durable or not yet).
    pub fn audit_visible(&self, executor: ExecutorId, sequence: u64) {
        if let Some(visible) = self.shared.audit.visible.get(usize::from(executor)) {
            visible.fetch_max(sequence, Ordering::AcqRel);
        }
    }

    /// How many log batches with audit events the consumer has not stored
    /// durably yet, summed over executors (counted in batch sequences).
    pub fn audit_lag(&self) -> u64 {
        let feed = &self.shared.audit;
        feed.produced
            .iter()
            .zip(&feed.stored)
            .map(|(p, s)| p.load(Ordering::Acquire).saturating_sub(s.load(Ordering::Acquire)))
            .sum()
    }

    /// Per executor, the last audit batch published: every change answered
    /// so far is in a batch up to it.
    pub fn audit_produced(&self) -> Vec<u64> {
        self.shared.audit.produced.iter().map(|p| p.load(Ordering::Acquire)).collect()
    }

    /// Whether the consumer's readers see every audit batch up to `marks`
    /// (as [`Engine::audit_produced`] gave them).
    pub fn audit_visible_up_to(&self, marks: &[u64]) -> bool {
        self.shared.audit.visible.iter().zip(marks).all(|(v, &m)| v.load(Ordering::Acquire) >= m)
    }

    /// Whether every audit batch of a change already answered is visible
    /// to the consumer's readers (what a read of the audit trail waits for).
    pub fn audit_caught_up(&self) -> bool {
        let feed = &self.shared.audit;
        feed.produced.iter().zip(&feed.visible).all(|(p, v)| v.load(Ordering::Acquire) >= p.load(Ordering::Acquire))
    }

    fn submit(&self, executor: ExecutorId, request: Request) -> Result<(), ErrorCode> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ErrorCode::Unavailable);
        }
        match self.shared.clients[usize::from(executor)].try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(ErrorCode::Unavailable),
        }
    }

    /// Like `submit`, but waits for room in the queue (for in-process
    /// callers on their own threads, such as the benchmark).
    fn submit_blocking(&self, executor: ExecutorId, request: Request) -> Result<(), ErrorCode> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ErrorCode::Unavailable);
        }
        self.shared.clients[usize::from(executor)].send(request).map_err(|_| ErrorCode::Unavailable)
    }

    pub async fn create_account(&self, new: NewAccount) -> AccountReply {
        let (tx, rx) = oneshot::channel();
        self.submit(self.shared.layout.executor_of_account(&new.id), Request::CreateAccount(new, tx))?;
        rx.await.unwrap_or(Err(ErrorCode::Unavailable))
    }

    /// Freezes, unfreezes or closes an account: one logged input of the
    /// executor that owns it, answered once durable.
    pub async fn change_account(&self, id: Id, change: AccountChange) -> AccountReply {
        let (tx, rx) = oneshot::channel();
        self.submit(self.shared.layout.executor_of_account(&id), Request::ChangeAccount(id, change, tx))?;
        rx.await.unwrap_or(Err(ErrorCode::Unavailable))
    }

    pub fn create_account_blocking(&self, new: NewAccount) -> AccountReply {
        let (tx, rx) = oneshot::channel();
        self.submit_blocking(self.shared.layout.executor_of_account(&new.id), Request::CreateAccount(new, tx))?;
        rx.blocking_recv().unwrap_or(Err(ErrorCode::Unavailable))
    }

    /// Opens many accounts at once (one request per executor), for bulk
    /// loads such as the benchmark's. Answers in order.
    pub fn create_accounts_blocking(&self, accounts: Vec<NewAccount>) -> Vec<AccountReply> {
        let count = accounts.len();
        let executors = usize::from(self.shared.layout.executors());
        let mut groups: Vec<(Vec<usize>, Vec<NewAccount>)> = vec![(Vec::new(), Vec::new()); executors];
        for (index, new) in accounts.into_iter().enumerate() {
            let group = &mut groups[usize::from(self.shared.layout.executor_of_account(&new.id))];
            group.0.push(index);
            group.1.push(new);
        }
        let mut results: Vec<AccountReply> = vec![Err(ErrorCode::Unavailable); count];
        let mut waits = Vec::new();
        for (executor, (indices, group)) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            if self.submit_blocking(executor as ExecutorId, Request::CreateAccounts(group, tx)).is_ok() {
                waits.push((indices, rx));
            }
        }
        for (indices, rx) in waits {
            if let Ok(answers) = rx.blocking_recv() {
                place(&mut results, indices, answers);
            }
        }
        results
    }

    /// Creates transfers (or posts and voids pending ones). Answers one
    /// result per request, in order, once every outcome is final and durable.
    /// A request whose id an earlier one of the call has is refused with
    /// `duplicate_id_in_batch` (in an atomic call, with the whole call; see
    /// `batch_ids.rs`).
    pub async fn create_transfers(&self, requests: Vec<TransferRequest>, atomic: bool) -> Vec<TransferResult> {
        self.create_transfers_as(requests, atomic, None).await
    }

    /// [`Engine::create_transfers`] on behalf of `origin`: every transfer it
    /// makes comes out of [`Engine::take_audit_feed`] with it, logged with
    /// the request (so durable with the change, and made again by a replay).
    pub async fn create_transfers_as(
        &self,
        requests: Vec<TransferRequest>,
        atomic: bool,
        origin: Option<Origin>,
    ) -> Vec<TransferResult> {
        let duplicates = batch_ids::duplicates(&requests);
        if duplicates.is_empty() {
            return self.submit_transfers(requests, atomic, origin).await;
        }
        if atomic {
            return batch_ids::refuse_atomic(requests.len(), &duplicates);
        }
        let count = requests.len();
        let (kept, positions) = batch_ids::without(requests, &duplicates);
        batch_ids::merge(count, positions, self.submit_transfers(kept, false, origin).await)
    }

    async fn submit_transfers(
        &self,
        requests: Vec<TransferRequest>,
        atomic: bool,
        origin: Option<Origin>,
    ) -> Vec<TransferResult> {
        let count = requests.len();
        if count == 0 {
            return Vec::new();
        }
        let mut waits = Vec::new();
        for (executor, indices, group) in self.shared.layout.route(requests, atomic) {
            let (tx, rx) = oneshot::channel();
            let request = Request::Transfers { requests: group, atomic, origin: origin.clone(), reply: tx };
            if self.submit(executor, request).is_ok() {
                waits.push((indices, rx));
            }
        }
        let mut answered = Vec::with_capacity(waits.len());
        for (indices, rx) in waits {
            answered.push((indices, rx.await.ok()));
        }
        gather(count, answered)
    }

    /// The blocking twin of [`Engine::create_transfers`], for callers on
    /// their own threads (the in-process benchmark).
    pub fn create_transfers_blocking(&self, requests: Vec<TransferRequest>, atomic: bool) -> Vec<TransferResult> {
        let duplicates = batch_ids::duplicates(&requests);
        if duplicates.is_empty() {
            return self.submit_transfers_blocking(requests, atomic);
        }
        if atomic {
            return batch_ids::refuse_atomic(requests.len(), &duplicates);
        }
        let count = requests.len();
        let (kept, positions) = batch_ids::without(requests, &duplicates);
        batch_ids::merge(count, positions, self.submit_transfers_blocking(kept, false))
    }

    fn submit_transfers_blocking(&self, requests: Vec<TransferRequest>, atomic: bool) -> Vec<TransferResult> {
        let count = requests.len();
        let mut waits = Vec::new();
        for (executor, indices, group) in self.shared.layout.route(requests, atomic) {
            let (tx, rx) = oneshot::channel();
            let request = Request::Transfers { requests: group, atomic, origin: None, reply: tx };
            if self.submit_blocking(executor, request).is_ok() {
                waits.push((indices, rx));
            }
        }
        let answered = waits.into_iter().map(|(indices, rx)| (indices, rx.blocking_recv().ok())).collect();
        gather(count, answered)
    }

    /// Sends a checkout to its home executor; answered once its global
    /// transaction is decided and durable.
    pub(crate) async fn submit_checkout(&self, executor: ExecutorId, ask: CheckoutAsk) -> CheckoutAnswer {
        let (tx, rx) = oneshot::channel();
        self.submit(executor, Request::Checkout(Box::new(ask), tx))?;
        rx.await.map_err(|_| ErrorCode::Unavailable)?
    }

    /// Sends a settlement to its home executor; answered once its global
    /// transaction is decided and durable (none: nothing to settle there).
    pub(crate) async fn submit_settlement(&self, executor: ExecutorId, ask: SettleAsk) -> SettleAnswer {
        let (tx, rx) = oneshot::channel();
        self.submit(executor, Request::Settle(ask, tx))?;
        rx.await.map_err(|_| ErrorCode::Unavailable)?
    }

    /// Sends parts' commands to one executor; the answers come in order.
    pub(crate) fn submit_parts(
        &self,
        executor: ExecutorId,
        commands: Vec<PartCommand>,
        blocking: bool,
    ) -> Result<oneshot::Receiver<Vec<PartReply>>, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        let request = Request::Parts(commands, tx);
        match blocking {
            true => self.submit_blocking(executor, request)?,
            false => self.submit(executor, request)?,
        }
        Ok(rx)
    }

    pub(crate) async fn query_part(&self, executor: ExecutorId, query: PartQuery) -> Result<PartAnswer, ErrorCode> {
        match self.query(executor, Query::Part(query)).await? {
            QueryAnswer::Part(answer) => Ok(answer),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    async fn query(&self, executor: ExecutorId, query: Query) -> Result<QueryAnswer, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.submit(executor, Request::Query(query, tx))?;
        rx.await.map_err(|_| ErrorCode::Unavailable)
    }

    fn query_blocking(&self, executor: ExecutorId, query: Query) -> Result<QueryAnswer, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.submit_blocking(executor, Request::Query(query, tx))?;
        rx.blocking_recv().map_err(|_| ErrorCode::Unavailable)
    }

    pub async fn account(&self, id: &Id) -> Result<Option<Account>, ErrorCode> {
        match self.query(self.shared.layout.executor_of_account(id), Query::Account(id.clone())).await? {
            QueryAnswer::Account(a) => Ok(a),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// A decided transfer; `transfer_in_flight` while a transaction that
    /// makes it is not decided yet (it may still be made or refused).
    pub async fn transfer(&self, id: &Id) -> Result<Option<Transfer>, ErrorCode> {
        match self.query(self.shared.layout.executor_of_transfer(id), Query::Transfer(id.clone())).await? {
            QueryAnswer::Transfer(t) => Ok(t),
            QueryAnswer::TransferUndecided => Err(ErrorCode::InFlight),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// Transfer records by id (at most a few hundred a call: the executor
    /// answers them between batches), each as [`Engine::transfer`] sees it.
    pub(crate) async fn lookup_transfers(&self, ids: &[Id]) -> Result<Vec<Lookup>, ErrorCode> {
        let layout = &self.shared.layout;
        let mut by_executor: Vec<(Vec<usize>, Vec<Id>)> = vec![Default::default(); usize::from(layout.executors())];
        for (index, id) in ids.iter().enumerate() {
            let (indices, group) = &mut by_executor[usize::from(layout.executor_of_transfer(id))];
            indices.push(index);
            group.push(id.clone());
        }
        let mut found: Vec<Lookup> = ids.iter().map(|_| Lookup::Missing).collect();
        for (executor, (indices, group)) in by_executor.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let QueryAnswer::Transfers(answers) = self.query(executor as ExecutorId, Query::Transfers(group)).await?
            else {
                return Err(ErrorCode::Unavailable);
            };
            place(&mut found, indices, answers);
        }
        Ok(found)
    }

    /// How long each executor's history file is: every entry before is
    /// written and may be read.
    pub(crate) async fn history_lens(&self) -> Result<Vec<u64>, ErrorCode> {
        let mut lens = Vec::with_capacity(usize::from(self.shared.layout.executors()));
        for executor in 0..self.shared.layout.executors() {
            match self.query(executor, Query::HistoryLen).await? {
                QueryAnswer::HistoryLen(len) => lens.push(len),
                _ => return Err(ErrorCode::Unavailable),
            }
        }
        Ok(lens)
    }

    /// Runs `read` over the executors' history files on a blocking thread.
    pub(crate) async fn read_history<T: Send + 'static>(
        &self,
        read: impl FnOnce(&[HistoryReader]) -> T + Send + 'static,
    ) -> Result<T, ErrorCode> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || read(&shared.history)).await.map_err(|_| ErrorCode::Unavailable)
    }

    /// A global transaction across executors, from its coordinator (the
    /// executor in its id): in flight with its branches, `done` once
    /// finished, `None` for an id never given.
    pub async fn transaction(&self, id: TxnId) -> Result<Option<TxnView>, ErrorCode> {
        let executor = crate::tcc::coordinator_of(id);
        if executor >= self.shared.layout.executors() {
            return Ok(None);
        }
        match self.query(executor, Query::Transaction(id)).await? {
            QueryAnswer::Transaction(view) => Ok(view),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// Unfinished global transactions over every executor, in id order
    /// (so by coordinator, then age), at most `limit`.
    pub async fn transactions(&self, filter: TxnFilter, limit: usize) -> Result<Vec<TxnView>, ErrorCode> {
        let mut all = Vec::new();
        for e in 0..self.shared.layout.executors() {
            match self.query(e, Query::Transactions { filter, limit }).await? {
                QueryAnswer::Transactions(mut views) => all.append(&mut views),
                _ => return Err(ErrorCode::Unavailable),
            }
        }
        all.sort_unstable_by_key(|view| view.id);
        all.truncate(limit);
        Ok(all)
    }

    /// Reliable messages kept (the backlog), or only the dead letters, over
    /// every executor, at most `limit`.
    pub async fn messages(&self, dead_only: bool, limit: usize) -> Result<Vec<crate::outbox::MessageView>, ErrorCode> {
        let mut all = Vec::new();
        for e in 0..self.shared.layout.executors() {
            match self.query(e, Query::Messages { dead_only, limit }).await? {
                QueryAnswer::Messages(mut views) => all.append(&mut views),
                _ => return Err(ErrorCode::Unavailable),
            }
        }
        all.truncate(limit);
        Ok(all)
    }

    /// Replays a dead letter by its printable id (`msg_<executor>_<id>`):
    /// false if it names none.
    pub async fn replay_message(&self, name: &str) -> Result<bool, ErrorCode> {
        let Some((executor, id)) = crate::outbox::parse_message_name(name) else { return Ok(false) };
        if executor >= self.shared.layout.executors() {
            return Ok(false);
        }
        let (tx, rx) = oneshot::channel();
        self.submit(executor, Request::ReplayMessage(id, tx))?;
        rx.await.map_err(|_| ErrorCode::Unavailable)
    }

    /// Accounts in id order after `after`, at most `limit`, over every executor.
    pub async fn accounts(&self, after: Option<Id>, limit: usize) -> Result<Vec<Account>, ErrorCode> {
        let mut all = Vec::new();
        for e in 0..self.shared.layout.executors() {
            if let QueryAnswer::Accounts(mut page) =
                self.query(e, Query::Accounts { after: after.clone(), limit }).await?
            {
                all.append(&mut page);
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.truncate(limit);
        Ok(all)
    }

    /// The transfers that touched an account, newest first, walking the
    /// account's history chain. `after` is the `next` cursor of the previous
    /// page. Each transfer appears once (see `listing.rs`).
    pub async fn account_transfers(
        &self,
        account: &Id,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Transfer>, Option<String>), ErrorCode> {
        let source = crate::listing::TransferSource::Account(account.clone());
        let filter = crate::listing::TransferFilter::default();
        let page = self.list_transfers(&source, &filter, after.as_deref(), limit).await?;
        Ok((page.transfers, page.next))
    }

    pub async fn totals(&self) -> Result<Totals, ErrorCode> {
        let mut sum = Totals::default();
        for e in 0..self.shared.layout.executors() {
            if let QueryAnswer::Totals(t) = self.query(e, Query::Totals).await? {
                sum = sum + t;
            }
        }
        Ok(sum)
    }

    pub fn totals_blocking(&self) -> Result<Totals, ErrorCode> {
        let mut sum = Totals::default();
        for e in 0..self.shared.layout.executors() {
            if let QueryAnswer::Totals(t) = self.query_blocking(e, Query::Totals)? {
                sum = sum + t;
            }
        }
        Ok(sum)
    }

    /// Stops taking requests, lets transactions in flight finish (up to
    /// [`SHUTDOWN_DRAIN`]), flushes every log and joins the threads.
    pub fn shutdown(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        while self.shared.txns_in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for peer in &self.shared.peers {
            let _ = peer.send(Inbound::Stop);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Puts one executor's answers back at their positions in the caller's call.
fn place<T>(results: &mut [T], indices: Vec<usize>, answers: Vec<T>) {
    for (index, answer) in indices.into_iter().zip(answers) {
        results[index] = answer;
    }
}

/// The results of `count` transfers in request order, from the answers of
/// the executors they went to (`None`: the executor went away). A part
/// that was not answered stays `unavailable`. One part holding every
/// transfer in order (always so with one executor) is the answer as it
/// came: no second vector of a whole batch's results is made and filled.
fn gather(count: usize, mut parts: Vec<(Vec<usize>, Option<Vec<TransferResult>>)>) -> Vec<TransferResult> {
    if let [(indices, Some(answers))] = parts.as_slice() {
        if answers.len() == count && indices.iter().enumerate().all(|(i, &index)| i == index) {
            return parts.pop().and_then(|(_, answers)| answers).expect("checked above");
        }
    }
    let mut results: Vec<TransferResult> = vec![Err(ErrorCode::Unavailable); count];
    for (indices, answers) in parts {
        if let Some(answers) = answers {
            place(&mut results, indices, answers);
        }
    }
    results
}

/// Sends to an executor's peer queue. Only a stopping engine may lose a
/// message (it is in its sender's log, and recovery sends it again); a
/// running one that lost it would leave a transaction hanging.
fn send_to_peer(shared: &Shared, dest: usize, inbound: Inbound) {
    if shared.peers[dest].send(inbound).is_err() && !shared.closed.load(Ordering::Acquire) {
        failstop::stop(&format!("executor {dest} is gone while the engine runs"));
    }
}

pub fn executor_dir(data_dir: &Path, executor: ExecutorId) -> PathBuf {
    data_dir.join(format!("executor-{executor:03}"))
}

struct ClientBatch {
    results: Vec<Option<TransferResult>>,
    remaining: usize,
    reply: ClientReply,
}

/// Who waits for a client batch's answers.
enum ClientReply {
    Transfers(oneshot::Sender<Vec<TransferResult>>),
    /// A checkout, by its id.
    Checkout(Id, oneshot::Sender<CheckoutAnswer>),
    /// A settlement, by its id.
    Settle(Id, oneshot::Sender<SettleAnswer>),
}

impl ClientReply {
    fn completion(self, results: Vec<TransferResult>) -> Completion {
        match self {
            ClientReply::Transfers(tx) => Completion::Transfers(tx, results),
            ClientReply::Checkout(id, tx) => Completion::Checkout(tx, Ok((id, results))),
            ClientReply::Settle(id, tx) => Completion::Settle(tx, Ok(Some((id, results)))),
        }
    }
}

struct Applier {
    core: ExecutorCore,
    archive: Archive,
    records_in_memory: usize,
    /// Log bytes written by this executor's log thread, and their count
    /// when the last checkpoint was taken.
    log_bytes: Arc<AtomicU64>,
    log_bytes_at_checkpoint: u64,
    /// History buffers the log thread is done with, to write into again.
    spare_history: Receiver<Vec<u8>>,
    /// The accounts buffer of the last checkpoint, once encoded: the next
    /// one copies the accounts into memory already mapped.
    spare_accounts: Receiver<Vec<Account>>,
    /// Audit event buffers the audit consumer is done with.
    spare_audit: Receiver<AuditEvents>,
    checkpoint_every_log_bytes: u64,
    client_rx: Receiver<Request>,
    peer_rx: Receiver<Inbound>,
    log: LogHandOff,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    next_sequence: u64,
    last_time_ms: u64,
    next_tag: ClientTag,
    clients: std::collections::HashMap<ClientTag, ClientBatch>,
    reported_in_flight: usize,
    /// This executor's share of [`EngineStats::pending_transfers`].
    reported_pending_transfers: usize,
    /// This executor's share of the message gauges (kept, dead).
    reported_messages: (usize, usize),
    /// The last batch that made audit events: no checkpoint may cover it
    /// before the audit consumer has stored it.
    last_audit_sequence: u64,
}

impl Applier {
    fn run(mut self) {
        let mut fx = Effects::default();
        let mut stopping = false;
        let mut clients_open = true;
        loop {
            let mut logged: Vec<Input> = Vec::new();
            let mut completions = Vec::new();
            // Wait for the first piece of work, or a tick.
            let mut first: Option<Result<Inbound, Request>> = None;
            if !stopping {
                let never = crossbeam_channel::never();
                let can_take_clients = self.may_take_clients(clients_open);
                let client_rx = if can_take_clients { &self.client_rx } else { &never };
                crossbeam_channel::select! {
                    recv(self.peer_rx) -> m => if let Ok(m) = m { first = Some(Ok(m)) },
                    recv(client_rx) -> r => match r {
                        Ok(r) => first = Some(Err(r)),
                        Err(_) => clients_open = false,
                    },
                    default(TICK) => {}
                }
                self.shared.test_gates[usize::from(self.core.id())].pass();
            }
            if first.is_some() {
                failstop::fault_point();
            }
            let now_ms = self.clock.now_ms().max(self.last_time_ms);
            self.last_time_ms = now_ms;

            let due = self.core.due_expiries(now_ms);
            if !due.is_empty() {
                self.apply(Input::Expire { pending_ids: due }, now_ms, None, &mut fx, &mut logged);
            }
            // Deadlines, resends and fence purges of the protocol (its
            // resent messages leave with this batch, once it is durable).
            if let Some(deadlines) = self.core.tick(now_ms, &mut fx) {
                self.apply(deadlines, now_ms, None, &mut fx, &mut logged);
            }
            for command in self.core.parts().due(now_ms) {
                self.apply(Input::Part(command), now_ms, None, &mut fx, &mut logged);
            }
            let mut taken = 0usize;
            let mut transfers_taken = 0usize;
            let mut messages_taken = 0usize;
            let mut pending_first = first;
            loop {
                let next = match pending_first.take() {
                    Some(item) => Some(item),
                    None if taken >= MAX_BATCH_INPUTS || transfers_taken >= MAX_BATCH_TRANSFERS => None,
                    None => match self.peer_rx.try_recv() {
                        Ok(m) => Some(Ok(m)),
                        Err(_) if self.may_take_clients(clients_open) => match self.client_rx.try_recv() {
                            Ok(r) => Some(Err(r)),
                            Err(TryRecvError::Disconnected) => {
                                clients_open = false;
                                None
                            }
                            Err(TryRecvError::Empty) => None,
                        },
                        Err(_) => None,
                    },
                };
                let Some(item) = next else { break };
                taken += 1;
                match item {
                    Ok(Inbound::Stop) => stopping = true,
                    Ok(Inbound::Peer { from, messages }) => {
                        messages_taken += messages.len();
                        self.apply(Input::Peer { from, messages }, now_ms, None, &mut fx, &mut logged);
                    }
                    Err(Request::CreateAccount(new, reply)) => {
                        let answer = self.open_account(new, now_ms, &mut fx, &mut logged);
                        completions.push(Completion::Account(reply, answer));
                    }
                    Err(Request::ChangeAccount(id, change, reply)) => {
                        let answer = self
                            .apply(Input::ChangeAccount { id, change }, now_ms, None, &mut fx, &mut logged)
                            .unwrap_or(Err(ErrorCode::Unavailable));
                        completions.push(Completion::Account(reply, answer));
                    }
                    Err(Request::CreateAccounts(accounts, reply)) => {
                        let answers = accounts
                            .into_iter()
                            .map(|new| self.open_account(new, now_ms, &mut fx, &mut logged))
                            .collect();
                        completions.push(Completion::Accounts(reply, answers));
                    }
                    Err(Request::Transfers { requests, atomic, origin, reply }) => {
                        transfers_taken += requests.len();
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        let n = requests.len();
                        let nothing_before = fx.finished_for.is_empty();
                        self.apply(
                            Input::Transfers { requests, atomic, origin },
                            now_ms,
                            Some(tag),
                            &mut fx,
                            &mut logged,
                        );
                        // Common case: every transfer was local and answered
                        // now, in order. Hand the answers over in one move.
                        // (Nothing is left over from an earlier input: the
                        // loop below takes every answer after each.)
                        let in_order = nothing_before
                            && fx.finished_for.len() == n
                            && fx.finished_for.iter().enumerate().all(|(i, (t, index))| *t == tag && *index == i);
                        if in_order {
                            // The answers vector goes to the caller as it is.
                            fx.finished_for.clear();
                            completions.push(Completion::Transfers(reply, std::mem::take(&mut fx.finished)));
                        } else {
                            let reply = ClientReply::Transfers(reply);
                            self.clients.insert(tag, ClientBatch { results: vec![None; n], remaining: n, reply });
                        }
                    }
                    Err(Request::Query(query, reply)) => {
                        completions.push(Completion::Query(reply, self.answer(query)));
                    }
                    Err(Request::ReplayMessage(id, reply)) => {
                        let mut replayed = false;
                        if self.core.messages(true, id.checked_sub(1), 1).first().is_some_and(|m| m.id == id) {
                            self.apply(Input::ReplayMessage { id }, now_ms, None, &mut fx, &mut logged);
                            replayed = true;
                        }
                        completions.push(Completion::Flag(reply, replayed));
                    }
                    Err(Request::Checkout(ask, reply)) => {
                        transfers_taken += ask.request.lines.len();
                        match self.core.checkout_input(*ask, now_ms) {
                            Err(e) => completions.push(Completion::Checkout(reply, Err(e))),
                            // Placed under this key already: its id, nothing moved.
                            Ok((id, None)) => completions.push(Completion::Checkout(reply, Ok((id, Vec::new())))),
                            Ok((id, Some(input))) => {
                                let tag = self.next_tag;
                                self.next_tag += 1;
                                let Input::Global { transfers, .. } = &input else { unreachable!("a global input") };
                                let n = transfers.len();
                                let reply = ClientReply::Checkout(id, reply);
                                self.clients.insert(tag, ClientBatch { results: vec![None; n], remaining: n, reply });
                                self.apply(input, now_ms, Some(tag), &mut fx, &mut logged);
                            }
                        }
                    }
                    Err(Request::Settle(ask, reply)) => match self.core.settlement_input(&ask, now_ms) {
                        Err(e) => completions.push(Completion::Settle(reply, Err(e))),
                        Ok(None) => completions.push(Completion::Settle(reply, Ok(None))),
                        Ok(Some((id, input))) => {
                            let tag = self.next_tag;
                            self.next_tag += 1;
                            let Input::Global { transfers, .. } = &input else { unreachable!("a global input") };
                            transfers_taken += transfers.len();
                            let n = transfers.len();
                            let reply = ClientReply::Settle(id, reply);
                            self.clients.insert(tag, ClientBatch { results: vec![None; n], remaining: n, reply });
                            self.apply(input, now_ms, Some(tag), &mut fx, &mut logged);
                        }
                    },
                    Err(Request::Parts(commands, reply)) => {
                        transfers_taken += commands.len();
                        let mut replies = Vec::with_capacity(commands.len());
                        for mut command in commands {
                            self.core.assign_part_ids(&mut command);
                            let (changed, answer) = self.core.apply_part(&command, now_ms, &mut fx);
                            if changed {
                                logged.push(Input::Part(command));
                            }
                            replies.push(answer);
                        }
                        completions.push(Completion::Parts(reply, replies));
                    }
                }
                // Finished client work from this input (or from peer messages).
                for (tag, index, result) in fx.drain_finished() {
                    let done = match self.clients.get_mut(&tag) {
                        Some(batch) => {
                            if batch.results[index].replace(result).is_none() {
                                batch.remaining -= 1;
                            }
                            batch.remaining == 0
                        }
                        None => false,
                    };
                    if done {
                        let batch = self.clients.remove(&tag).expect("present");
                        let results = batch.results.into_iter().map(|r| r.expect("filled")).collect();
                        completions.push(batch.reply.completion(results));
                    }
                }
            }
            // Double entry, before the batch is logged: a broken one stops here.
            self.core.ledger().assert_balanced();
            if let Some(publication) = self.core.parts_mut().take_publication() {
                completions.insert(0, Completion::Publish(publication, self.shared.clone()));
            }
            let previous = self.in_flight_reported();
            self.shared.txns_in_flight.fetch_add(self.core.txns_in_flight(), Ordering::SeqCst);
            self.shared.txns_in_flight.fetch_sub(previous, Ordering::SeqCst);
            self.report_pending_transfers();
            self.report_messages();

            if let Err(error) = evict(&mut self.core, &mut self.archive, self.records_in_memory) {
                tracing::error!(executor = self.core.id(), %error, "archive write failed; executor stops");
                std::process::abort();
            }
            let outbox = std::mem::take(&mut fx.outbox);
            let finishing = stopping && self.peer_rx.is_empty();
            let log_bytes = self.log_bytes.load(Ordering::Relaxed);
            let due = finishing || log_bytes - self.log_bytes_at_checkpoint >= self.checkpoint_every_log_bytes;
            let inputs_logged = logged.len();
            let checkpoint = if due {
                // The batch being built is covered if it logs anything.
                let covered = if inputs_logged > 0 { self.next_sequence } else { self.next_sequence - 1 };
                // The checkpoint no longer holds the records evicted since
                // the last one: they must be in a run it counts on.
                if let Err(error) = self.archive.seal() {
                    tracing::error!(executor = self.core.id(), %error, "archive write failed; executor stops");
                    std::process::abort();
                }
                let accounts = self.spare_accounts.try_recv().unwrap_or_default();
                // Transactions in flight go in with it: none pins the log.
                let checkpoint = self.core.checkpoint(covered, now_ms, self.archive.run_count(), accounts);
                // The audit events it covers: this batch's, or earlier ones.
                let audit_needed = if inputs_logged > 0 && !fx.audit.is_empty() {
                    self.next_sequence
                } else {
                    self.last_audit_sequence
                };
                self.log_bytes_at_checkpoint = log_bytes;
                Some(PendingCheckpoint { checkpoint, audit_needed })
            } else {
                None
            };
            if inputs_logged > 0 || !completions.is_empty() || !outbox.is_empty() || checkpoint.is_some() {
                let sequence = self.next_sequence;
                if inputs_logged > 0 {
                    self.next_sequence += 1;
                }
                // A buffer the log thread is done with, so that the next
                // batch writes into memory already mapped (a fresh one of
                // this size costs page faults on every batch).
                let spare = self.spare_history.try_recv().unwrap_or_else(|_| Vec::with_capacity(fx.history.len()));
                let history = std::mem::replace(&mut fx.history, spare);
                debug_assert!(history.is_empty() || inputs_logged > 0, "history comes from logged inputs");
                let audit = if fx.audit.is_empty() {
                    Vec::new()
                } else {
                    std::mem::replace(&mut fx.audit, self.spare_audit.try_recv().unwrap_or_default())
                };
                if !audit.is_empty() {
                    self.last_audit_sequence = sequence;
                }
                let write =
                    PendingWrite { logged, time_ms: now_ms, history, completions, outbox, checkpoint, audit, sequence };
                if self.log.hand_over(write, transfers_taken + messages_taken).is_err() {
                    // Its answers would never come: callers and peers would hang.
                    failstop::stop(&format!("the log thread of executor {} is gone", self.core.id()));
                }
            }
            if finishing {
                return;
            }
        }
    }

    /// Whether to take new client work now: not past the bound on
    /// transactions in flight.
    fn may_take_clients(&self, clients_open: bool) -> bool {
        clients_open && self.core.txns_in_flight() < MAX_TXNS_IN_FLIGHT
    }

    /// Keeps the shared in-flight counter equal to the sum over executors:
    /// returns what this executor reported last and remembers the new count.
    fn in_flight_reported(&mut self) -> usize {
        std::mem::replace(&mut self.reported_in_flight, self.core.txns_in_flight())
    }

    /// Keeps the pending-transfers gauge equal to the sum over executors:
    /// one atomic add per batch that changed this executor's count.
    fn report_pending_transfers(&mut self) {
        let now = self.core.ledger().pending_transfer_count();
        let before = std::mem::replace(&mut self.reported_pending_transfers, now);
        let gauge = &self.shared.stats.pending_transfers;
        if now > before {
            gauge.fetch_add((now - before) as u64, Ordering::Relaxed);
        } else if now < before {
            gauge.fetch_sub((before - now) as u64, Ordering::Relaxed);
        }
    }

    /// Keeps the reliable-message gauges equal to the sums over executors.
    fn report_messages(&mut self) {
        let now = self.core.outbox_counts();
        let before = std::mem::replace(&mut self.reported_messages, now);
        if now != before {
            let stats = &self.shared.stats;
            for (gauge, now, before) in
                [(&stats.messages_kept, now.0, before.0), (&stats.dead_letters, now.1, before.1)]
            {
                if now > before {
                    gauge.fetch_add((now - before) as u64, Ordering::Relaxed);
                } else {
                    gauge.fetch_sub((before - now) as u64, Ordering::Relaxed);
                }
            }
        }
    }

    fn open_account(
        &mut self,
        new: NewAccount,
        now_ms: u64,
        fx: &mut Effects,
        logged: &mut Vec<Input>,
    ) -> AccountReply {
        self.apply(Input::CreateAccount(new), now_ms, None, fx, logged).unwrap_or(Err(ErrorCode::Unavailable))
    }

    fn apply(
        &mut self,
        input: Input,
        now_ms: u64,
        tag: Option<ClientTag>,
        fx: &mut Effects,
        logged: &mut Vec<Input>,
    ) -> Option<AccountReply> {
        if let Err(error) = prefetch(&mut self.core, &self.archive, &input) {
            // Deciding without the archived record could answer a retry as
            // new: stop rather than guess.
            tracing::error!(executor = self.core.id(), %error, "archive read failed; executor stops");
            std::process::abort();
        }
        let (changed, answer) = self.core.apply(&input, now_ms, tag, fx);
        if changed {
            logged.push(input);
        }
        answer
    }

    /// A transfer's record, in memory or in the archive.
    fn decided_transfer(&self, id: &Id) -> Option<Transfer> {
        self.core.ledger().transfer(id).cloned().or_else(|| {
            self.archive.get(id).unwrap_or_else(|error| {
                tracing::error!(%error, "archive read failed");
                None
            })
        })
    }

    fn answer(&self, query: Query) -> QueryAnswer {
        let ledger = self.core.ledger();
        match query {
            Query::Account(id) => QueryAnswer::Account(ledger.account(&id).cloned()),
            Query::Accounts { after, limit } => {
                QueryAnswer::Accounts(ledger.accounts_after(after.as_ref(), limit).cloned().collect())
            }
            Query::Transfer(id) if ledger.is_undecided(&id) => QueryAnswer::TransferUndecided,
            Query::Transfer(id) => QueryAnswer::Transfer(self.decided_transfer(&id)),
            Query::Transfers(ids) => QueryAnswer::Transfers(
                ids.iter()
                    .map(|id| match ledger.is_undecided(id) {
                        true => Lookup::Undecided,
                        false => self.decided_transfer(id).map_or(Lookup::Missing, Lookup::Found),
                    })
                    .collect(),
            ),
            Query::HistoryLen => QueryAnswer::HistoryLen(self.core.history_len()),
            Query::Part(query) => QueryAnswer::Part(self.core.parts().query(&query)),
            Query::Transaction(id) => QueryAnswer::Transaction(self.core.transaction(id)),
            Query::Transactions { filter, limit } => {
                let now_ms = self.clock.now_ms().max(self.last_time_ms);
                QueryAnswer::Transactions(self.core.list_transactions(filter, limit, now_ms))
            }
            Query::Messages { dead_only, limit } => QueryAnswer::Messages(self.core.messages(dead_only, None, limit)),
            Query::Totals => {
                let mut totals = Totals {
                    accounts: ledger.account_count() as u64,
                    transfers_in_memory: ledger.transfer_count() as u64,
                    archived: self.archive.records(),
                    holds: ledger.hold_count() as u64,
                    txns_in_flight: self.core.txns_in_flight() as u64,
                    fences: self.core.fence_count() as u64,
                    ..Totals::default()
                };
                for account in ledger.accounts() {
                    let net = account.balances.net_including_pending();
                    totals.net += net;
                    // Clearing accounts only: settle, merchant and fee accounts hold money at rest.
                    if account.system && peakstack_domain::ledger::clearing_shard(account.id.as_str()).is_some() {
                        totals.clearing_net += net;
                    }
                }
                QueryAnswer::Totals(totals)
            }
        }
    }
}

/// Most audit batches waiting for their consumer; past it the log thread
/// waits (the audit trail must keep up with the ledger).
pub const AUDIT_FEED_CAPACITY: usize = 4096;
/// How long a log thread waits for room in a full audit feed before it
/// gives up on the feed until the next restart (see [`AuditFeed::publish`]).
pub const AUDIT_FEED_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Most consumed audit event buffers kept per executor for reuse.
pub const SPARE_AUDIT_BUFFERS: usize = 16;

/// The events of one audit batch (a buffer handed back and forth).
type AuditEvents = Vec<AuditEvent>;

/// The audit batches on their way to one consumer. Before it attaches they
/// wait in memory (a recovery's included); then they go through a bounded
/// channel, per executor in log order.
struct AuditFeed {
    state: Mutex<FeedState>,
    tx: Sender<AuditBatch>,
    rx: Mutex<Option<Receiver<AuditBatch>>>,
    /// Per executor: the last batch with audit events handed out.
    produced: Vec<AtomicU64>,
    /// Per executor: up to where the consumer has stored them durably.
    stored: Vec<AtomicU64>,
    /// Per executor: up to where the consumer's readers see them.
    visible: Vec<AtomicU64>,
    /// Per executor: event buffers the consumer is done with, for the apply
    /// thread to fill again (a fresh one grows by reallocation and page
    /// faults: a quarter of the apply thread under `loadtest --batch 1000`).
    spares: Vec<(Sender<AuditEvents>, Receiver<AuditEvents>)>,
}

#[derive(Default)]
struct FeedState {
    attached: bool,
    /// After a batch could not be handed over: nothing more is, until a
    /// restart replays from the gap (checkpoints wait for `stored`, which
    /// stays below it, so the log keeps everything after it).
    broken: bool,
    backlog: Vec<AuditBatch>,
}

impl AuditFeed {
    fn new(executors: usize, recovered: Vec<AuditBatch>) -> AuditFeed {
        let (tx, rx) = bounded(AUDIT_FEED_CAPACITY);
        let produced: Vec<AtomicU64> = (0..executors).map(|_| AtomicU64::new(0)).collect();
        for batch in &recovered {
            produced[usize::from(batch.executor)].fetch_max(batch.sequence, Ordering::AcqRel);
        }
        AuditFeed {
            state: Mutex::new(FeedState { backlog: recovered, ..FeedState::default() }),
            tx,
            rx: Mutex::new(Some(rx)),
            produced,
            stored: (0..executors).map(|_| AtomicU64::new(0)).collect(),
            visible: (0..executors).map(|_| AtomicU64::new(0)).collect(),
            spares: (0..executors).map(|_| bounded(SPARE_AUDIT_BUFFERS)).collect(),
        }
    }

    fn attach(&self) -> Option<(Vec<AuditBatch>, Receiver<AuditBatch>)> {
        let mut state = self.state.lock();
        let rx = self.rx.lock().take()?;
        state.attached = true;
        Some((std::mem::take(&mut state.backlog), rx))
    }

    fn publish(&self, batch: AuditBatch) {
        let (executor, sequence) = (batch.executor, batch.sequence);
        let mut state = self.state.lock();
        if state.broken {
            return;
        }
        self.produced[usize::from(executor)].fetch_max(sequence, Ordering::AcqRel);
        if !state.attached {
            state.backlog.push(batch);
            return;
        }
        drop(state);
        if self.tx.send_timeout(batch, AUDIT_FEED_SEND_TIMEOUT).is_err() {
            tracing::error!(
                executor,
                sequence,
                "the audit consumer stopped taking batches; the audit feed stops until a restart replays it"
            );
            self.state.lock().broken = true;
        }
    }
}

/// Where an applied batch goes to be made durable: written in place by the
/// apply thread when it is small and nothing is queued, else queued for the
/// log thread.
///
/// Batches reach the log in sequence order because only the apply thread
/// makes them: it counts a batch in `queued` before it sends it, and the
/// log thread counts it out only once it is written and its answers are
/// delivered. When `queued` reads zero (Acquire, against the log thread's
/// Release), every earlier batch is written and the log thread holds no
/// lock nor will take one before the next send, so the apply thread may
/// write in place.
struct LogHandOff {
    writer: Arc<Mutex<LogWriter>>,
    queued: Arc<AtomicUsize>,
    tx: Sender<PendingWrite>,
}

impl LogHandOff {
    /// `items`: the client transfers and peer messages the batch applied.
    fn hand_over(&self, write: PendingWrite, items: usize) -> Result<(), ()> {
        if items <= INLINE_WRITE_MAX_ITEMS && self.queued.load(Ordering::Acquire) == 0 {
            let mut writer = self.writer.lock();
            writer.group.push(write);
            writer.write_group();
            writer.shared.stats.inline_writes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(write).map_err(|_| ())
    }
}

/// The log thread: writes the batches queued for it, many to a group.
struct LogThread {
    writer: Arc<Mutex<LogWriter>>,
    queued: Arc<AtomicUsize>,
    rx: Receiver<PendingWrite>,
}

impl LogThread {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            failstop::fault_point();
            let mut writer = self.writer.lock();
            writer.group.push(first);
            while let Ok(more) = self.rx.try_recv() {
                writer.group.push(more);
            }
            let written = writer.group.len();
            writer.write_group();
            drop(writer);
            self.queued.fetch_sub(written, Ordering::Release);
        }
        // Stopping: the last holder of the writer drops its checkpointer,
        // which writes the last checkpoint, if it may.
    }
}

/// The durable side of an executor: its log and history file, the
/// checkpoints offered once their batch is durable, and the delivery of a
/// group's answers and messages once it is written. Used by the log thread,
/// or by the apply thread for a small batch (see [`LogHandOff`]).
struct LogWriter {
    id: ExecutorId,
    log: Log,
    /// The group being written, and buffers kept for the next one.
    group: Vec<PendingWrite>,
    frames: Vec<u8>,
    encoded: Writer,
    shared: Arc<Shared>,
    history: HistoryWriter,
    /// Log bytes written, for the apply thread's checkpoint schedule.
    log_bytes: Arc<AtomicU64>,
    /// History buffers written out, going back to the apply thread.
    spare_history: Sender<Vec<u8>>,
    /// Takes checkpoints on from here once their batches are durable.
    checkpointer: Checkpointer,
}

impl LogWriter {
    /// Writes `self.group` in one durable append, then appends its history,
    /// publishes its audit events, answers its callers, sends its messages
    /// and offers its checkpoint. Leaves the group empty.
    fn write_group(&mut self) {
        let group = &mut self.group;
        let frames = &mut self.frames;
        let encoded = &mut self.encoded;
        frames.clear();
        let mut batch_count = 0;
        let mut inputs = 0;
        for write in group.iter_mut() {
            if write.logged.is_empty() {
                continue;
            }
            encoded.buf.clear();
            for input in &write.logged {
                input.encode(encoded);
            }
            let starts_write = batch_count == 0;
            encode_frame(write.sequence, write.time_ms, &encoded.buf, write.logged.len(), starts_write, frames);
            batch_count += 1;
            inputs += write.logged.len();
            // Dropped here, off the apply thread.
            write.logged = Vec::new();
        }
        if batch_count > 0 {
            let started = Instant::now();
            if let Err(error) = self.log.append(frames, batch_count) {
                // Nothing of this group was acknowledged; stop loudly
                // rather than answer from state that is not durable.
                tracing::error!(executor = self.id, %error, "log append failed; executor stops");
                std::process::abort();
            }
            metrics::histogram!("peakstack_log_fsync_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("peakstack_batch_inputs").record(inputs as f64);
            let stats = &self.shared.stats;
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            stats.batches.fetch_add(batch_count, Ordering::Relaxed);
            stats.inputs.fetch_add(inputs as u64, Ordering::Relaxed);
            stats.log_bytes.fetch_add(frames.len() as u64, Ordering::Relaxed);
            self.log_bytes.fetch_add(frames.len() as u64, Ordering::Relaxed);
        }
        let executors = self.shared.peers.len();
        let mut by_dest: Vec<Vec<PeerMsg>> = vec![Vec::new(); executors];
        let checkpoint = group.iter_mut().filter_map(|w| w.checkpoint.take()).next_back();
        for mut write in group.drain(..) {
            // History is appended before anyone is answered, so a history
            // read after an answer finds it.
            if !write.history.is_empty() {
                if let Err(error) = self.history.append(&mut write.history) {
                    tracing::error!(executor = self.id, path = %self.history.path().display(), %error, "history append failed; executor stops");
                    std::process::abort();
                }
            }
            let mut spare = write.history;
            spare.clear();
            // Back to the apply thread; dropped when it has enough.
            let _ = self.spare_history.try_send(spare);
            // Audit before answers: a read of the audit trail after an
            // answer waits for this batch (see `Engine::audit_caught_up`).
            if !write.audit.is_empty() {
                self.shared.audit.publish(AuditBatch {
                    executor: self.id,
                    sequence: write.sequence,
                    events: write.audit,
                });
            }
            for completion in write.completions {
                completion.deliver();
            }
            for (dest, msg) in write.outbox {
                by_dest[usize::from(dest)].push(msg);
            }
        }
        for (dest, messages) in by_dest.into_iter().enumerate() {
            if !messages.is_empty() {
                send_to_peer(&self.shared, dest, Inbound::Peer { from: self.id, messages });
            }
        }
        if let Some(checkpoint) = checkpoint {
            self.checkpointer.offer(checkpoint);
        }
    }
}

/// Brings archived records that `input` names back into memory, so that the
/// pure core decides exactly as if they had never left it.
fn prefetch(core: &mut ExecutorCore, archive: &Archive, input: &Input) -> std::io::Result<()> {
    let mut ids: Vec<&Id> = Vec::new();
    match input {
        Input::Transfers { requests, .. } => {
            for request in requests {
                ids.push(request.id());
                ids.extend(request.pending_id());
            }
        }
        Input::Peer { messages, .. } => {
            for message in messages {
                if let PeerMsg::Try { ops, .. } = message {
                    for op in ops {
                        match op {
                            crate::protocol::TryOp::Reserve(t) => ids.push(&t.id),
                            crate::protocol::TryOp::LockPending { pending_id, .. } => ids.push(pending_id),
                            crate::protocol::TryOp::Hold(_) | crate::protocol::TryOp::Part(_) => {}
                        }
                    }
                }
            }
        }
        Input::Global { transfers, .. } => ids.extend(transfers.iter().map(|t| t.id())),
        Input::CreateAccount(_)
        | Input::ChangeAccount { .. }
        | Input::Expire { .. }
        | Input::Deadlines { .. }
        | Input::ReplayMessage { .. }
        | Input::Part(_) => {}
    }
    // A software pipeline: the lines an id's check reads (its index line
    // and the filter's blocks, whose addresses come from hashes alone) are
    // asked for `ARCHIVE_CHECK_LOOKAHEAD` ids before the check, so that misses overlap
    // and what was fetched is still in the cache when it is read. Asking
    // for a whole batch's lines first (thousands of ids) overflowed the
    // cache before the first was read. The accounts are fetched the same
    // way by the apply loop (`ExecutorCore::apply`).
    let fingerprints: Vec<u64> = ids.iter().map(|id| crate::archive::fingerprint(id)).collect();
    let ask = |core: &ExecutorCore, at: usize| {
        if let (Some(id), Some(&fp)) = (ids.get(at), fingerprints.get(at)) {
            core.ledger().prefetch_record_index(id);
            archive.prefetch(fp);
        }
    };
    (0..ARCHIVE_CHECK_LOOKAHEAD).for_each(|at| ask(core, at));
    for (at, (id, &fp)) in ids.iter().zip(&fingerprints).enumerate() {
        ask(core, at + ARCHIVE_CHECK_LOOKAHEAD);
        if !core.ledger().has_record(id) {
            if let Some(transfer) = archive.get_fingerprinted(id, fp)? {
                core.restore_record(transfer);
            }
        }
    }
    Ok(())
}

/// How many ids ahead [`prefetch`] asks for the lines an id's check reads.
const ARCHIVE_CHECK_LOOKAHEAD: usize = 16;

/// Archives the oldest final records once memory holds too many: as many
/// as went over the limit, and a little more, so that every batch evicts
/// about what it added and none stalls on a big eviction. Archive runs
/// hold a quarter of the limit each.
fn evict(core: &mut ExecutorCore, archive: &mut Archive, limit: usize) -> std::io::Result<()> {
    let count = core.ledger().transfer_count();
    if count > limit {
        // As many as the batch added, so that every batch pays its share
        // (an eviction of thousands at once is a stall of milliseconds).
        archive.add_from(limit.div_ceil(4), |staging| core.evict_oldest_into(count - limit, staging))?;
    } else {
        archive.poll()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(codes: &[ErrorCode]) -> Vec<TransferResult> {
        codes.iter().map(|&code| Err(code)).collect()
    }

    #[test]
    fn gather_puts_each_answer_at_its_request() {
        use ErrorCode::{AccountNotFound as A, ExceedsCredits as E, Overflow as O, Unavailable as U};
        // One part in order: the answer as it came.
        assert_eq!(gather(3, vec![(vec![0, 1, 2], Some(results(&[A, E, O])))]), results(&[A, E, O]));
        // One part out of order, parts interleaved, a part never answered.
        assert_eq!(gather(2, vec![(vec![1, 0], Some(results(&[A, E])))]), results(&[E, A]));
        assert_eq!(
            gather(4, vec![(vec![0, 2], Some(results(&[A, E]))), (vec![1, 3], Some(results(&[O, A])))]),
            results(&[A, O, E, A])
        );
        assert_eq!(gather(3, vec![(vec![0, 2], Some(results(&[A, E]))), (vec![1], None)]), results(&[A, U, E]));
        assert_eq!(gather(2, vec![(vec![0, 1], None)]), results(&[U, U]));
    }
}
