//! The transfer archive: final transfer records evicted from an executor's
//! memory, in immutable runs sorted by id fingerprint, with a compact filter
//! in front. Memory then holds the accounts, the work in flight and the
//! newest records, not every transfer ever made.
//!
//! A run is written once, when the executor evicts a chunk of its oldest
//! final records: `[fingerprint: u64 LE][length: u32 LE][record]...` in
//! fingerprint order. Memory keeps, per run, every [`SPARSE_EVERY`]-th
//! fingerprint with its offset; a lookup binary-searches that, reads one
//! small block and scans it. In front of all runs sits a blocked Bloom
//! filter ([`Filter`]) so that a new id, the common case, costs a few cache
//! lines and no I/O.
//!
//! The apply thread hands records over a few at a time ([`Archive::add`]),
//! as it evicts them, so that no batch stalls on a big eviction; they
//! gather in a staging run until it is full ([`Archive::seal`]). Runs are
//! sorted and written by a thread of the archive's own: the apply thread
//! only fingerprints the records and adds them to the filter, and keeps
//! them readable in memory until the writer has made the file durable
//! (write, fsync). A checkpoint counts on a run only
//! once it is durable ([`Archive::durable_runs`]); runs past the last
//! checkpoint are derived from the command log, and recovery deletes them
//! and rebuilds them as it replays.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use peakstack_domain::{fnv1a64, Id, Transfer};

use crate::codec::{Codec, Reader, Writer};

/// One sparse index point per this many records of a run.
pub const SPARSE_EVERY: usize = 32;
/// Bits of filter per archived id: about 0.03% false positives per
/// segment. Each false positive costs a read in every run, so this is worth
/// its 2.5 bytes per archived transfer.
const FILTER_BITS_PER_KEY: usize = 20;
/// Capacity of the first filter segment; each next one doubles.
const FIRST_SEGMENT_KEYS: usize = 1 << 20;
/// Largest record a run may hold.
const MAX_RECORD_BYTES: usize = 4096;
/// Runs waiting for the writer; past it `seal` waits for one to finish
/// (memory stays bounded when the disk falls behind).
const MAX_PENDING_RUNS: usize = 4;

/// The 64-bit fingerprint of a transfer id in the archive. Not the shard
/// hash itself: a second, independent mix, so that ids of one shard spread
/// over the whole fingerprint space.
pub fn fingerprint(id: &Id) -> u64 {
    let mut x = fnv1a64(id.as_str().as_bytes()) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64 finalizer
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A blocked Bloom filter that grows by adding segments of doubling size.
#[derive(Default)]
pub struct Filter {
    segments: Vec<Segment>,
}

/// 512 bits on one cache line (aligned so that a probe touches one line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u64; 8]);

struct Segment {
    blocks: Vec<Block>,
    keys: usize,
    capacity: usize,
}

impl Segment {
    fn new(capacity: usize) -> Segment {
        let blocks = (capacity * FILTER_BITS_PER_KEY).div_ceil(512).max(1);
        Segment { blocks: vec![Block([0u64; 8]); blocks], keys: 0, capacity }
    }

    fn block_of(&self, fp: u64) -> usize {
        ((fp as u128 * self.blocks.len() as u128) >> 64) as usize
    }

    fn probes(&self, fp: u64) -> (usize, impl Iterator<Item = u32>) {
        let block = self.block_of(fp);
        let mut h = fp.rotate_left(32) | 1;
        let bits = (0..7).map(move |_| {
            h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (h >> 55) as u32 // 0..512
        });
        (block, bits)
    }

    fn insert(&mut self, fp: u64) {
        let (block, bits) = self.probes(fp);
        let block = &mut self.blocks[block].0;
        for bit in bits {
            block[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.keys += 1;
    }

    fn maybe_contains(&self, fp: u64) -> bool {
        let (block, mut bits) = self.probes(fp);
        let block = &self.blocks[block].0;
        bits.all(|bit| block[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

impl Filter {
    pub fn insert(&mut self, fp: u64) {
        if self.segments.last().is_none_or(|s| s.keys >= s.capacity) {
            let capacity = self.segments.last().map_or(FIRST_SEGMENT_KEYS, |s| s.capacity * 2);
            self.segments.push(Segment::new(capacity));
        }
        self.segments.last_mut().expect("pushed").insert(fp);
    }

    pub fn maybe_contains(&self, fp: u64) -> bool {
        self.segments.iter().any(|s| s.maybe_contains(fp))
    }

    /// Starts bringing in the lines a check of `fp` reads (one per segment).
    pub fn prefetch(&self, fp: u64) {
        for segment in &self.segments {
            peakstack_domain::cache::prefetch(&segment.blocks[segment.block_of(fp)]);
        }
    }

    /// Starts bringing in the line an insert of `fp` writes.
    fn prefetch_insert(&self, fp: u64) {
        if let Some(segment) = self.segments.last() {
            peakstack_domain::cache::prefetch(&segment.blocks[segment.block_of(fp)]);
        }
    }

    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.blocks.len() * 64).sum()
    }
}

struct Run {
    file: File,
    /// (fingerprint, offset) of every SPARSE_EVERY-th record, and the end.
    sparse: Vec<(u64, u64)>,
    len: u64,
}

impl Run {
    fn find(&self, fp: u64, id: &Id) -> io::Result<Option<Transfer>> {
        // Every record with this fingerprint lies between the last sparse
        // point below it and the first sparse point above it.
        let lo = self.sparse.partition_point(|(f, _)| *f < fp);
        let hi = self.sparse.partition_point(|(f, _)| *f <= fp);
        let start = if lo == 0 { 0 } else { self.sparse[lo - 1].1 };
        let end = self.sparse.get(hi).map_or(self.len, |p| p.1);
        if end <= start {
            return Ok(None);
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        self.file.read_exact_at(&mut bytes, start)?;
        let mut at = 0usize;
        while at < bytes.len() {
            if bytes.len() - at < 12 {
                return Err(io::Error::other("archive run cut short"));
            }
            let f = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
            let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            if len > MAX_RECORD_BYTES || bytes.len() - at - 12 < len {
                return Err(io::Error::other("archive record cut short"));
            }
            if f > fp {
                break;
            }
            if f == fp {
                let t = Transfer::decode(&mut Reader::new(&bytes[at + 12..at + 12 + len])).map_err(io::Error::other)?;
                if t.id == *id {
                    return Ok(Some(t));
                }
            }
            at += 12 + len;
        }
        Ok(None)
    }
}

/// Records not on disk yet: the staging run, or a sealed run on its way
/// to the writer, in the order they were evicted. Looked up by a scan of
/// the fingerprints, which only the filter's rare positives pay for.
#[derive(Default)]
struct PendingRun {
    fps: Vec<u64>,
    records: Vec<Transfer>,
}

impl PendingRun {
    fn find(&self, fp: u64, id: &Id) -> Option<Transfer> {
        self.fps.iter().zip(&self.records).rev().find(|(f, t)| **f == fp && t.id == *id).map(|(_, t)| t.clone())
    }
}

type Written = io::Result<Run>;

pub struct Archive {
    runs: Vec<Run>,
    /// Runs on their way to disk, oldest first; they follow `runs`.
    pending: VecDeque<Arc<PendingRun>>,
    /// Records added since the last seal; they follow `pending`.
    staging: PendingRun,
    filter: Filter,
    records: u64,
    /// Runs durable on disk (written and fsynced), for checkpoints.
    durable: Arc<AtomicU32>,
    to_writer: Option<Sender<(u32, Arc<PendingRun>)>>,
    from_writer: Receiver<Written>,
    writer: Option<JoinHandle<()>>,
}

impl Archive {
    /// Starts an empty archive in `dir`, deleting runs left by an earlier
    /// process: recovery rebuilds them from the log.
    pub fn create(dir: &Path) -> io::Result<Archive> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Archive::start(dir, Vec::new(), Filter::default(), 0)
    }

    /// Opens the archive a checkpoint left with `runs` runs: later runs are
    /// deleted (replay writes them again) and the kept ones are read to
    /// rebuild the sparse indexes and the filter.
    pub fn open(dir: &Path, runs: u32) -> io::Result<Archive> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let index = name.to_str().and_then(|n| n.strip_prefix("run-")?.strip_suffix(".dat")?.parse::<u32>().ok());
            if index.is_none_or(|i| i >= runs) {
                fs::remove_file(entry.path())?;
            }
        }
        let mut kept = Vec::new();
        let mut filter = Filter::default();
        let mut records = 0u64;
        for index in 0..runs {
            let path = run_path(dir, index);
            let bytes = fs::read(&path)?;
            let mut sparse = Vec::new();
            let mut at = 0usize;
            let mut count = 0usize;
            while at < bytes.len() {
                if bytes.len() - at < 12 {
                    return Err(io::Error::other(format!("{} is cut short", path.display())));
                }
                let fp = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
                let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
                if len > MAX_RECORD_BYTES || bytes.len() - at - 12 < len {
                    return Err(io::Error::other(format!("{} is cut short", path.display())));
                }
                if count.is_multiple_of(SPARSE_EVERY) {
                    sparse.push((fp, at as u64));
                }
                filter.insert(fp);
                count += 1;
                at += 12 + len;
            }
            records += count as u64;
            kept.push(Run { file: File::open(&path)?, sparse, len: bytes.len() as u64 });
        }
        Archive::start(dir, kept, filter, records)
    }

    fn start(dir: &Path, runs: Vec<Run>, filter: Filter, records: u64) -> io::Result<Archive> {
        let durable = Arc::new(AtomicU32::new(runs.len() as u32));
        let (to_writer, writer_rx) = unbounded::<(u32, Arc<PendingRun>)>();
        let (writer_tx, from_writer) = unbounded::<Written>();
        let writer = {
            let (dir, durable) = (dir.to_path_buf(), durable.clone());
            std::thread::Builder::new().name("archive".into()).spawn(move || {
                for (index, run) in writer_rx {
                    let written = write_run(&dir, index, &run);
                    let failed = written.is_err();
                    if !failed {
                        durable.fetch_add(1, Ordering::Release);
                    }
                    if writer_tx.send(written).is_err() || failed {
                        return;
                    }
                }
            })?
        };
        Ok(Archive {
            runs,
            pending: VecDeque::new(),
            staging: PendingRun::default(),
            filter,
            records,
            durable,
            to_writer: Some(to_writer),
            from_writer,
            writer: Some(writer),
        })
    }

    /// How many runs a checkpoint taken now counts on: every sealed run,
    /// written or not (seal first: staged records are in none). It may be
    /// stored once [`Archive::durable_runs`] reaches this.
    pub fn run_count(&self) -> u32 {
        (self.runs.len() + self.pending.len()) as u32
    }

    /// The count of runs durable on disk, kept up to date by the writer.
    pub fn durable_runs(&self) -> Arc<AtomicU32> {
        self.durable.clone()
    }

    /// Adds evicted records; once `run_records` are staged they go to the
    /// writer as a run.
    pub fn add(&mut self, records: Vec<Transfer>, run_records: usize) -> io::Result<()> {
        self.poll()?;
        // Fingerprints first, asking for their filter lines, then the
        // inserts: the cache misses overlap.
        let from = self.staging.fps.len();
        for record in &records {
            let fp = fingerprint(&record.id);
            self.filter.prefetch_insert(fp);
            self.staging.fps.push(fp);
        }
        for &fp in &self.staging.fps[from..] {
            self.filter.insert(fp);
        }
        self.records += records.len() as u64;
        self.staging.records.extend(records);
        if self.staging.records.len() >= run_records.max(1) {
            self.seal()?;
        }
        Ok(())
    }

    /// Hands the staged records to the writer as a run (nothing when none
    /// are staged). They stay readable from memory until their file is durable.
    pub fn seal(&mut self) -> io::Result<()> {
        if self.staging.records.is_empty() {
            return Ok(());
        }
        while self.pending.len() >= MAX_PENDING_RUNS {
            let written = self.from_writer.recv().map_err(|_| io::Error::other("archive writer stopped"))?;
            self.finished(written)?;
        }
        let run = Arc::new(std::mem::take(&mut self.staging));
        let index = self.run_count();
        self.pending.push_back(run.clone());
        let sender = self.to_writer.as_ref().expect("the writer runs while the archive lives");
        sender.send((index, run)).map_err(|_| io::Error::other("archive writer stopped"))
    }

    /// Adds `records` as one run of their own (tests).
    #[cfg(test)]
    fn add_run(&mut self, records: Vec<Transfer>) -> io::Result<()> {
        self.add(records, usize::MAX)?;
        self.seal()
    }

    /// Takes in the runs the writer has finished; an error is the writer's.
    pub fn poll(&mut self) -> io::Result<()> {
        while let Ok(written) = self.from_writer.try_recv() {
            self.finished(written)?;
        }
        Ok(())
    }

    fn finished(&mut self, written: Written) -> io::Result<()> {
        let run = written?;
        self.pending.pop_front().expect("the writer answers runs in order");
        self.runs.push(run);
        Ok(())
    }

    /// Cheap: whether `id` may be archived (no I/O).
    pub fn maybe_contains(&self, id: &Id) -> bool {
        self.records > 0 && self.filter.maybe_contains(fingerprint(id))
    }

    /// The archived record of `id`, newest run first. Cheap for an id the
    /// filter rules out (no I/O).
    pub fn get(&self, id: &Id) -> io::Result<Option<Transfer>> {
        self.get_fingerprinted(id, fingerprint(id))
    }

    /// Starts bringing in the filter lines a lookup of fingerprint `fp`
    /// reads; a batch asks for all of them before it looks any up.
    pub fn prefetch(&self, fp: u64) {
        if self.records > 0 {
            self.filter.prefetch(fp);
        }
    }

    /// [`Archive::get`] for an id whose fingerprint is known.
    pub fn get_fingerprinted(&self, id: &Id, fp: u64) -> io::Result<Option<Transfer>> {
        debug_assert_eq!(fp, fingerprint(id));
        if self.records == 0 || !self.filter.maybe_contains(fp) {
            return Ok(None);
        }
        let mut unwritten = std::iter::once(&self.staging).chain(self.pending.iter().rev().map(|run| &**run));
        if let Some(t) = unwritten.find_map(|run| run.find(fp, id)) {
            return Ok(Some(t));
        }
        for run in self.runs.iter().rev() {
            if let Some(t) = run.find(fp, id)? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Memory the archive keeps: filter plus sparse indexes (runs on their
    /// way to disk not counted).
    pub fn memory_bytes(&self) -> usize {
        self.filter.bytes() + self.runs.iter().map(|r| r.sparse.len() * 16).sum::<usize>()
    }
}

impl Drop for Archive {
    /// Lets the writer finish the runs handed to it, then stops it.
    fn drop(&mut self) {
        self.to_writer = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn run_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("run-{index:06}.dat"))
}

/// Sorts run `index` by fingerprint, writes it and makes it durable (file and
/// directory entry), on the writer thread.
fn write_run(dir: &Path, index: u32, run: &PendingRun) -> io::Result<Run> {
    let path = run_path(dir, index);
    let file = File::create(&path)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut keyed: Vec<(u64, u32)> = run.fps.iter().enumerate().map(|(index, &fp)| (fp, index as u32)).collect();
    keyed.sort_unstable();
    let mut sparse = Vec::with_capacity(keyed.len() / SPARSE_EVERY + 1);
    let mut offset = 0u64;
    let mut w = Writer::default();
    for (n, &(fp, index)) in keyed.iter().enumerate() {
        if n.is_multiple_of(SPARSE_EVERY) {
            sparse.push((fp, offset));
        }
        w.buf.clear();
        run.records[index as usize].encode(&mut w);
        out.write_all(&fp.to_le_bytes())?;
        out.write_all(&(w.buf.len() as u32).to_le_bytes())?;
        out.write_all(&w.buf)?;
        offset += 12 + w.buf.len() as u64;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(Run { file: File::open(&path)?, sparse, len: offset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::{Currency, TransferKind, TransferStatus};

    fn record(id: &str) -> Transfer {
        Transfer {
            id: Id::parse(id).unwrap(),
            debit_account_id: Id::parse("a").unwrap(),
            credit_account_id: Id::parse("b").unwrap(),
            amount: id.len() as u64,
            currency: Currency::parse("USD").unwrap(),
            kind: TransferKind::Single,
            status: TransferStatus::Posted,
            posted_amount: None,
            timestamp_ms: 7,
        }
    }

    #[test]
    fn every_archived_record_is_found_and_absent_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut archive = Archive::create(&dir.path().join("archive")).unwrap();
        for run in 0..3 {
            archive.add_run((0..5000).map(|n| record(&format!("r{run}-{n}"))).collect()).unwrap();
        }
        for run in 0..3 {
            for n in (0..5000).step_by(7) {
                let id = format!("r{run}-{n}");
                assert_eq!(archive.get(&Id::parse(&id).unwrap()).unwrap(), Some(record(&id)), "{id}");
            }
        }
        let mut false_positives = 0;
        for n in 0..20_000 {
            let id = Id::parse(&format!("absent-{n}")).unwrap();
            assert_eq!(archive.get(&id).unwrap(), None);
            false_positives += usize::from(archive.maybe_contains(&id));
        }
        assert!(false_positives < 100, "filter too loose: {false_positives} of 20000");
        assert_eq!(archive.records(), 15_000);
    }

    #[test]
    fn staged_and_unwritten_records_are_found_and_a_reopened_archive_has_every_sealed_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        let id = |n: usize| Id::parse(&format!("s-{n}")).unwrap();
        let mut archive = Archive::create(&path).unwrap();
        // Added a few at a time, as the apply loop evicts: runs of 1000.
        for chunk in (0..2500).collect::<Vec<_>>().chunks(70) {
            archive.add(chunk.iter().map(|&n| record(&format!("s-{n}"))).collect(), 1000).unwrap();
        }
        assert_eq!(archive.run_count(), 2, "two full runs sealed, the rest staged");
        assert_eq!(archive.records(), 2500);
        // Found wherever they are: staged, on their way, or on disk.
        for n in (0..2500).step_by(3) {
            assert_eq!(archive.get(&id(n)).unwrap().map(|t| t.id), Some(id(n)), "record {n}");
        }
        assert_eq!(archive.get(&Id::parse("s-2500").unwrap()).unwrap(), None);
        archive.seal().unwrap();
        assert_eq!(archive.run_count(), 3);
        let durable = archive.durable_runs();
        drop(archive);
        // Dropping lets the writer finish: every sealed run is durable.
        assert_eq!(durable.load(Ordering::Acquire), 3);
        let reopened = Archive::open(&path, 3).unwrap();
        assert_eq!(reopened.records(), 2500);
        for n in 0..2500 {
            assert_eq!(reopened.get(&id(n)).unwrap(), Some(record(&format!("s-{n}"))), "record {n}");
        }
        // A checkpoint that counted two runs drops the third on open.
        drop(reopened);
        let older = Archive::open(&path, 2).unwrap();
        // A run is sealed once it holds at least 1000: 15 chunks of 70.
        assert_eq!(older.records(), 2100);
        assert_eq!(older.get(&id(2400)).unwrap(), None);
    }

    #[test]
    fn the_filter_grows_and_never_forgets() {
        let mut filter = Filter::default();
        let keys: Vec<u64> = (0..3_000_000u64).map(|n| n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        for &k in &keys {
            filter.insert(k);
        }
        assert!(filter.segments.len() >= 2);
        assert!(keys.iter().all(|&k| filter.maybe_contains(k)));
    }
}
