//! The transfer archive: final transfer records evicted from an executor's
//! memory, in immutable runs sorted by id fingerprint, with a compact filter
//! in front. Memory then holds the accounts, the work in flight and the
//! newest records, not every transfer ever made.
//!
//! A run is written once, when the executor evicts a chunk of its oldest
//! final records: `[fingerprint: u64 LE][length: u32 LE][record]...` in
//! fingerprint order (records of equal fingerprint newest first). Memory
//! keeps, per file, every [`SPARSE_EVERY`]-th fingerprint with its offset; a
//! lookup binary-searches that, reads one small block and scans it. In front
//! of all files sits a blocked Bloom filter ([`Filter`]) so that a new id,
//! the common case, costs a few cache lines and no I/O.
//!
//! The apply thread hands records over a few at a time ([`Archive::add_from`]),
//! as it evicts them, so that no batch stalls on a big eviction; they
//! gather in a staging run until it is full ([`Archive::seal`]). Runs are
//! sorted and written by a thread of the archive's own ("archive"): the
//! apply thread only fingerprints the records and adds them to the filter,
//! and keeps them readable in memory until the writer has written the file
//! (and started its write-back). The writer does not fsync it: runs past
//! the last checkpoint are derived from the command log, and recovery
//! deletes them and rebuilds them as it replays, so a run needs to be
//! durable only once a checkpoint counts on it. The checkpoint thread
//! makes the runs a checkpoint counts on durable just before it stores it
//! ([`RunSyncer::make_durable`]): one fdatasync per run (its pages mostly
//! on disk by then) and one of the directory, instead of a file and a
//! directory fsync per run on the writer. Every fsync here flushes the
//! disk's cache, and each log fsync waits for the writes queued before it:
//! the fewer the better.
//!
//! # Merging
//!
//! Runs are numbered 0, 1, 2... in the order they are sealed (logical runs;
//! a checkpoint counts them). A file holds a contiguous span of them:
//! `run-NNNNNN.dat` one run, `run-AAAAAA-BBBBBB.dat` runs A..=B merged.
//! Every filter false positive reads a block in every file, so a third
//! thread ("archive-merge", at a lower CPU priority) keeps the file count
//! logarithmic: whenever [`MERGE_FANIN`] adjacent files span the same tier
//! (`floor(log_FANIN(runs spanned))`), it stream-merges them by fingerprint
//! (raw bytes, bounded buffers, records of equal fingerprint from the newer
//! file first, so lookups stay newest first), writes the result under a
//! `.tmp` name, fsyncs it, renames it, fsyncs the directory, hands the new
//! file to the apply thread (which swaps it for its inputs in [`Archive::poll`])
//! and then deletes the inputs (the apply thread reads through descriptors
//! it already holds; nothing opens an input again). The smallest merges go
//! first, and writing sealed runs never waits for a merge: about
//! `(FANIN - 1) * log_FANIN(runs)` files, each record rewritten
//! `log_FANIN(runs)` times.
//!
//! The crash-safety rule: **only runs a stored checkpoint counts on are
//! merged.** The log thread raises the [`MergeHorizon`] to a checkpoint's
//! `archive_runs` once that checkpoint is durable, and a merge takes only
//! files below the horizon. Checkpoints only grow, so every later
//! [`Archive::open`] is told at least the horizon, and a merged file never
//! reaches past what recovery keeps (recovery deletes runs past its count;
//! had a merge swallowed one of those, its inputs below the count would be
//! gone with it). `open` covers runs `0..runs` with the fewest files (a
//! merged file before its inputs), and deletes everything else: temporary
//! files of an unfinished merge, inputs a crash left next to their merged
//! file, and files past `runs`. A crash at any point of a merge therefore
//! leaves either the inputs or the merged file (or both) readable. A
//! file that would have to be cut to fit `runs` is an error, not a guess.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use peakstack_domain::{fnv1a64, Id, Transfer};

use crate::codec::{Codec, Reader, Writer};

/// One sparse index point per this many records of a run.
pub const SPARSE_EVERY: usize = 32;
/// Bits of filter per archived id, and bits set per id in its 512-bit
/// block: 74 false positives in a million lookups of a full segment, where
/// 20 bits and 7 probes gave 312. Each false positive costs a read in every
/// file, and late in a long run there are dozens of files and six segments:
/// `bench --seconds 45`, two alternating pairs, apply thread 0.81/0.69 ->
/// 0.62/0.61 us a transfer, for 0.5 byte more per archived transfer (RSS
/// +43 MiB at 45M transfers).
const FILTER_BITS_PER_KEY: usize = 24;
const FILTER_PROBES: usize = 10;
/// Capacity of the first filter segment; each next one doubles.
const FIRST_SEGMENT_KEYS: usize = 1 << 20;
/// Largest record a run may hold.
const MAX_RECORD_BYTES: usize = 4096;
/// Bytes of a record's frame before the record: fingerprint and length.
const FRAME_HEADER_BYTES: usize = 12;
/// Runs waiting for the writer; past it `seal` waits for one to finish
/// (memory stays bounded when the disk falls behind).
const MAX_PENDING_RUNS: usize = 4;
/// Files merged into one: at most `MERGE_FANIN - 1` files per tier, and a
/// record is rewritten once per tier. 16 rather than 8: a few more files
/// (a false positive, under 0.01% of new ids a segment, reads each) for a
/// quarter less rewriting. The merges were the engine's largest disk
/// writer (about 140 bytes a transfer against 60 for the runs themselves),
/// and every log fsync waits for the writes queued before it. `peakstack
/// bench` over 30 s, two alternating pairs: merge thread 0.27 -> 0.20 us a
/// transfer, 0.99-1.02M -> 1.04-1.06M transfers/s.
pub const MERGE_FANIN: usize = 16;
/// Merges under way at once, the smallest stepped first, so that small
/// merges do not wait behind a big one.
const MAX_MERGES_IN_PROGRESS: usize = 3;
/// Bytes a merge writes before the merge thread looks at its news again.
const MERGE_STEP_BYTES: u64 = 1 << 20;
/// Read buffer per merge input, write buffer per merge output.
const MERGE_READ_BUFFER_BYTES: usize = 128 << 10;
const MERGE_WRITE_BUFFER_BYTES: usize = 1 << 20;
/// A merge starts the write-back of its output every this many bytes, so
/// that its final fsync is short.
const MERGE_WRITEBACK_BYTES: u64 = crate::writeback::WRITEBACK_EVERY_BYTES;
/// How often an idle merge thread looks whether the horizon moved.
const MERGE_IDLE_POLL: Duration = Duration::from_millis(50);

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
        let bits = (0..FILTER_PROBES).map(move |_| {
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

/// The logical runs `first..=last` that one file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Span {
    first: u32,
    last: u32,
}

impl Span {
    fn single(run: u32) -> Span {
        Span { first: run, last: run }
    }

    fn runs(self) -> u32 {
        self.last - self.first + 1
    }

    /// `floor(log_FANIN(runs))`: files of one tier are merged together.
    fn tier(self) -> u32 {
        let mut runs = self.runs();
        let mut tier = 0;
        while runs >= MERGE_FANIN as u32 {
            runs /= MERGE_FANIN as u32;
            tier += 1;
        }
        tier
    }

    fn path(self, dir: &Path) -> PathBuf {
        if self.first == self.last {
            dir.join(format!("run-{:06}.dat", self.first))
        } else {
            dir.join(format!("run-{:06}-{:06}.dat", self.first, self.last))
        }
    }

    /// Where a merge writes before its output is durable; `open` deletes it.
    fn tmp_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("run-{:06}-{:06}.tmp", self.first, self.last))
    }

    /// The span a file name holds (the inverse of [`Span::path`]); `None`
    /// for any other name.
    fn parse(name: &str) -> Option<Span> {
        let number = |s: &str| {
            if s.len() >= 6 && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u32>().ok()
            } else {
                None
            }
        };
        let stem = name.strip_prefix("run-")?.strip_suffix(".dat")?;
        match stem.split_once('-') {
            None => Some(Span::single(number(stem)?)),
            Some((first, last)) => {
                let span = Span { first: number(first)?, last: number(last)? };
                (span.first < span.last).then_some(span)
            }
        }
    }
}

/// The runs `files` hold (they span `0..` without gaps, oldest first).
fn runs_spanned(files: &[Run]) -> u32 {
    files.last().map_or(0, |r| r.span.last + 1)
}

struct Run {
    span: Span,
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
            if bytes.len() - at < FRAME_HEADER_BYTES {
                return Err(io::Error::other("archive run cut short"));
            }
            let f = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
            let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            if len > MAX_RECORD_BYTES || bytes.len() - at - FRAME_HEADER_BYTES < len {
                return Err(io::Error::other("archive record cut short"));
            }
            if f > fp {
                break;
            }
            if f == fp {
                let record = &bytes[at + FRAME_HEADER_BYTES..at + FRAME_HEADER_BYTES + len];
                let t = Transfer::decode(&mut Reader::new(record)).map_err(io::Error::other)?;
                if t.id == *id {
                    return Ok(Some(t));
                }
            }
            at += FRAME_HEADER_BYTES + len;
        }
        Ok(None)
    }
}

/// Reads a run file's records in order through a bounded buffer, checking
/// their framing and their order. Raw frames: nothing is decoded.
struct RunReader {
    reader: BufReader<File>,
    path: PathBuf,
    /// Where the current record's frame starts, and where the next one does.
    offset: u64,
    next_offset: u64,
    /// The current record's frame, header included.
    frame: Vec<u8>,
    fingerprint: u64,
    file_len: u64,
}

impl RunReader {
    fn open(path: &Path) -> io::Result<RunReader> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        Ok(RunReader {
            reader: BufReader::with_capacity(MERGE_READ_BUFFER_BYTES, file),
            path: path.to_path_buf(),
            offset: 0,
            next_offset: 0,
            frame: Vec::with_capacity(FRAME_HEADER_BYTES + MAX_RECORD_BYTES),
            fingerprint: 0,
            file_len,
        })
    }

    /// Moves to the next record; false at the end of the file.
    fn advance(&mut self) -> io::Result<bool> {
        let previous = (self.next_offset > 0).then_some(self.fingerprint);
        self.offset = self.next_offset;
        if self.reader.fill_buf()?.is_empty() {
            self.frame.clear();
            return Ok(false);
        }
        let (path, offset) = (&self.path, self.offset);
        let cut_short = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                io::Error::other(format!("{} is cut short at byte {offset}", path.display()))
            }
            _ => e,
        };
        self.frame.resize(FRAME_HEADER_BYTES, 0);
        self.reader.read_exact(&mut self.frame).map_err(cut_short)?;
        let fingerprint = u64::from_le_bytes(self.frame[..8].try_into().expect("8"));
        let len = u32::from_le_bytes(self.frame[8..12].try_into().expect("4")) as usize;
        if len > MAX_RECORD_BYTES {
            return Err(io::Error::other(format!("{}: a record of {len} bytes at byte {offset}", path.display())));
        }
        if previous.is_some_and(|p| p > fingerprint) {
            return Err(io::Error::other(format!("{} is out of order at byte {offset}", path.display())));
        }
        self.frame.resize(FRAME_HEADER_BYTES + len, 0);
        self.reader.read_exact(&mut self.frame[FRAME_HEADER_BYTES..]).map_err(cut_short)?;
        self.fingerprint = fingerprint;
        self.next_offset += self.frame.len() as u64;
        Ok(true)
    }
}

/// Reads a whole file at open: its sparse index, and its fingerprints into
/// the filter. Returns the run and its count of records.
fn scan(dir: &Path, span: Span, filter: &mut Filter) -> io::Result<(Run, u64)> {
    let mut reader = RunReader::open(&span.path(dir))?;
    let mut sparse = Vec::new();
    let mut records = 0u64;
    while reader.advance()? {
        if records.is_multiple_of(SPARSE_EVERY as u64) {
            sparse.push((reader.fingerprint, reader.offset));
        }
        filter.insert(reader.fingerprint);
        records += 1;
    }
    let len = reader.next_offset;
    Ok((Run { span, file: reader.reader.into_inner(), sparse, len }, records))
}

/// The fewest files that hold runs `0..runs` exactly, oldest first (a
/// merged file rather than its inputs), or the first run that none holds.
/// Files are never partly overlapping (each merges adjacent whole files), so
/// taking the widest file at each step finds a cover whenever one exists.
fn cover(found: &[Span], runs: u32) -> Result<Vec<Span>, u32> {
    let mut sorted = found.to_vec();
    sorted.sort_unstable_by_key(|s| (s.first, std::cmp::Reverse(s.last)));
    let mut cover = Vec::new();
    let mut next = 0u32;
    let mut at = 0usize;
    while next < runs {
        while sorted.get(at).is_some_and(|s| s.first < next) {
            at += 1;
        }
        let mut widest = None;
        while let Some(&span) = sorted.get(at).filter(|s| s.first == next) {
            if span.last < runs && widest.is_none() {
                widest = Some(span);
            }
            at += 1;
        }
        let span = widest.ok_or(next)?;
        cover.push(span);
        next = span.last + 1;
    }
    Ok(cover)
}

/// Where the next merge starts in `files` (oldest first): the first of
/// [`MERGE_FANIN`] adjacent files of one tier, none being merged, all below
/// the horizon; the lowest tier first (the cheapest, and the most files
/// removed per byte written).
fn next_merge(files: &[DiskFile], horizon: u32) -> Option<usize> {
    files
        .windows(MERGE_FANIN)
        .enumerate()
        .filter(|(_, window)| {
            let tier = window[0].span.tier();
            window.iter().all(|f| !f.merging && f.span.last < horizon && f.span.tier() == tier)
        })
        .min_by_key(|(at, window)| (window[0].span.tier(), *at))
        .map(|(at, _)| at)
}

/// A merge under way: adjacent files into one, streamed by fingerprint.
struct Merge {
    span: Span,
    input_spans: Vec<Span>,
    /// Oldest first, each on its current record (or done).
    inputs: Vec<RunReader>,
    live: Vec<bool>,
    input_bytes: u64,
    tmp: PathBuf,
    out: BufWriter<File>,
    sparse: Vec<(u64, u64)>,
    written: u64,
    records: u64,
    /// Bytes up to here have been handed to write-back.
    writeback_from: u64,
}

impl Merge {
    fn start(dir: &Path, inputs: &[Span]) -> io::Result<Merge> {
        assert!(inputs.len() >= 2 && inputs.windows(2).all(|w| w[0].last + 1 == w[1].first), "{inputs:?}");
        let span = Span { first: inputs[0].first, last: inputs[inputs.len() - 1].last };
        let mut readers = Vec::with_capacity(inputs.len());
        let mut live = Vec::with_capacity(inputs.len());
        let mut input_bytes = 0;
        for input in inputs {
            let mut reader = RunReader::open(&input.path(dir))?;
            input_bytes += reader.file_len;
            live.push(reader.advance()?);
            readers.push(reader);
        }
        let tmp = span.tmp_path(dir);
        let out = BufWriter::with_capacity(MERGE_WRITE_BUFFER_BYTES, File::create(&tmp)?);
        Ok(Merge {
            span,
            input_spans: inputs.to_vec(),
            inputs: readers,
            live,
            input_bytes,
            tmp,
            out,
            sparse: Vec::new(),
            written: 0,
            records: 0,
            writeback_from: 0,
        })
    }

    /// Writes about `budget_bytes` more; true once every input is done.
    fn step(&mut self, budget_bytes: u64) -> io::Result<bool> {
        let until = self.written + budget_bytes;
        while self.written < until {
            // The smallest fingerprint; of equal ones the newest file's, so
            // that a lookup meets the newest record of an id first.
            let mut next: Option<usize> = None;
            for (at, input) in self.inputs.iter().enumerate() {
                if self.live[at] && next.is_none_or(|n| input.fingerprint <= self.inputs[n].fingerprint) {
                    next = Some(at);
                }
            }
            let Some(at) = next else { return Ok(true) };
            let input = &mut self.inputs[at];
            if self.records.is_multiple_of(SPARSE_EVERY as u64) {
                self.sparse.push((input.fingerprint, self.written));
            }
            self.out.write_all(&input.frame)?;
            self.written += input.frame.len() as u64;
            self.records += 1;
            self.live[at] = input.advance()?;
        }
        self.start_writeback()?;
        Ok(!self.live.contains(&true))
    }

    /// Starts writing back what is written so far, without waiting for it,
    /// so that the final fsync has little left to do and holds nothing up.
    fn start_writeback(&mut self) -> io::Result<()> {
        if self.written - self.writeback_from < MERGE_WRITEBACK_BYTES {
            return Ok(());
        }
        self.out.flush()?;
        crate::writeback::start(self.out.get_ref(), self.writeback_from, self.written - self.writeback_from);
        self.writeback_from = self.written;
        Ok(())
    }

    /// Makes the merged file durable under its own name (fsync, rename,
    /// fsync of the directory) and opens it for reading. The inputs are
    /// still there: deleting them is the caller's next step.
    fn finish(self, dir: &Path) -> io::Result<Run> {
        // Frames are copied whole: every input byte must be in the output
        // once. Anything else lost or doubled a record.
        if self.written != self.input_bytes {
            return Err(io::Error::other(format!(
                "merging runs {}..={} wrote {} bytes of {}",
                self.span.first, self.span.last, self.written, self.input_bytes
            )));
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let path = self.span.path(dir);
        fs::rename(&self.tmp, &path)?;
        File::open(dir)?.sync_all()?;
        Ok(Run { span: self.span, file: File::open(&path)?, sparse: self.sparse, len: self.written })
    }

    /// Gives up; the temporary file goes (after a crash, `open` deletes it).
    fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self);
        let _ = fs::remove_file(tmp);
    }
}

/// Merges `inputs` whole, at once, and deletes them (tests: the merge
/// thread does the same a step at a time).
#[cfg(test)]
fn merge_now(dir: &Path, inputs: &[Span], delete_inputs: bool) -> io::Result<Span> {
    let mut merge = Merge::start(dir, inputs)?;
    while !merge.step(u64::MAX)? {}
    let run = merge.finish(dir)?;
    if delete_inputs {
        for input in inputs {
            fs::remove_file(input.path(dir))?;
        }
    }
    Ok(run.span)
}

/// A file on disk as the merge thread sees it.
struct DiskFile {
    span: Span,
    merging: bool,
}

/// How many runs the newest stored checkpoint counts on: the runs the
/// archive may merge (see the module doc). Whoever stores checkpoints
/// raises it once one is durable.
#[derive(Clone)]
pub struct MergeHorizon(Arc<AtomicU32>);

impl MergeHorizon {
    /// A checkpoint that counts on the first `archive_runs` runs is durable:
    /// no recovery will be told fewer.
    pub fn checkpoint_stored(&self, archive_runs: u32) {
        self.0.fetch_max(archive_runs, Ordering::Release);
    }

    fn runs(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// The merge thread: the files on disk, oldest first, and the merges under way.
struct Merger {
    dir: PathBuf,
    files: Vec<DiskFile>,
    merges: Vec<Merge>,
    horizon: MergeHorizon,
    stop: Arc<AtomicBool>,
    /// Runs the writer has made durable (after telling the apply thread).
    written: Receiver<Span>,
    to_apply: Sender<Finished>,
    /// Files a merge replaced, handed back by the apply thread to be closed
    /// here: see [`Archive::finished`].
    retired: Receiver<Vec<Run>>,
}

impl Merger {
    fn run(mut self) {
        crate::background::lower_this_thread();
        let result = self.merge_until_stopped();
        for merge in self.merges.drain(..) {
            merge.abandon();
        }
        if let Err(error) = result {
            let _ = self.to_apply.send(Err(error));
        }
    }

    fn merge_until_stopped(&mut self) -> io::Result<()> {
        while !self.stop.load(Ordering::Acquire) {
            while let Ok(runs) = self.retired.try_recv() {
                drop(runs);
            }
            if self.merges.is_empty() {
                match self.written.recv_timeout(MERGE_IDLE_POLL) {
                    Ok(span) => {
                        crate::failstop::fault_point();
                        self.files.push(DiskFile { span, merging: false })
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The writer stopped: the archive is closing or failed.
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            while let Ok(span) = self.written.try_recv() {
                self.files.push(DiskFile { span, merging: false });
            }
            while self.merges.len() < MAX_MERGES_IN_PROGRESS {
                let Some(at) = next_merge(&self.files, self.horizon.runs()) else { break };
                let inputs: Vec<Span> = self.files[at..at + MERGE_FANIN].iter().map(|f| f.span).collect();
                self.merges.push(Merge::start(&self.dir, &inputs)?);
                self.files[at..at + MERGE_FANIN].iter_mut().for_each(|f| f.merging = true);
            }
            let Some(smallest) = (0..self.merges.len()).min_by_key(|&m| self.merges[m].span.runs()) else {
                continue;
            };
            if self.merges[smallest].step(MERGE_STEP_BYTES)? {
                let merge = self.merges.swap_remove(smallest);
                self.finish(merge)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, merge: Merge) -> io::Result<()> {
        let inputs = merge.input_spans.clone();
        let run = merge.finish(&self.dir)?;
        let span = run.span;
        let at = self.files.iter().position(|f| f.span == inputs[0]).expect("a merge's inputs stay listed");
        assert!(self.files[at..at + inputs.len()].iter().map(|f| f.span).eq(inputs.iter().copied()));
        self.files.splice(at..at + inputs.len(), [DiskFile { span, merging: false }]);
        // The apply thread reads the inputs through descriptors it holds
        // until it swaps the new file in, and nothing opens them again: they
        // may go at once.
        if self.to_apply.send(Ok(Done::Merged(run))).is_err() {
            return Ok(());
        }
        for input in inputs {
            fs::remove_file(input.path(&self.dir))?;
        }
        Ok(())
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

/// What the archive's threads hand the apply thread.
enum Done {
    /// The next sealed run is written (not yet durable: see the module doc).
    Written(Run),
    /// A merged file is durable; it takes the place of the files it spans.
    Merged(Run),
}

type Finished = io::Result<Done>;

pub struct Archive {
    /// Files on disk, oldest first, spanning runs `0..` without gaps.
    runs: Vec<Run>,
    /// Runs on their way to disk, oldest first; they follow `runs`.
    pending: VecDeque<Arc<PendingRun>>,
    /// Records added since the last seal; they follow `pending`.
    staging: PendingRun,
    /// A written run's buffers, emptied, for the next staging run: a fresh
    /// one grew by doubling (copying the records each time) into memory
    /// that had to be faulted in.
    spare: Option<PendingRun>,
    filter: Filter,
    records: u64,
    /// Runs written to their files, for checkpoints (see [`RunSyncer`]).
    written: Arc<AtomicU32>,
    /// Runs durable on disk when the archive opened.
    durable_at_start: u32,
    dir: PathBuf,
    horizon: MergeHorizon,
    stop_merging: Arc<AtomicBool>,
    to_writer: Option<Sender<(u32, Arc<PendingRun>)>>,
    from_writer: Receiver<Finished>,
    writer: Option<JoinHandle<()>>,
    merger: Option<JoinHandle<()>>,
    /// To the merge thread: files a merge replaced, to close there.
    retire: Sender<Vec<Run>>,
}

impl Archive {
    /// Starts an empty archive in `dir`, deleting runs left by an earlier
    /// process: recovery rebuilds them from the log.
    pub fn create(dir: &Path) -> io::Result<Archive> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Archive::start(dir, Vec::new(), Filter::default(), 0, 0)
    }

    /// Opens the archive a checkpoint left with `runs` runs: the fewest
    /// files that hold them are read to rebuild the sparse indexes and the
    /// filter, and every other file is deleted (later runs: replay writes
    /// them again; inputs of a finished merge; an unfinished merge).
    pub fn open(dir: &Path, runs: u32) -> io::Result<Archive> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        let mut others = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            match entry.file_name().to_str().and_then(Span::parse) {
                Some(span) => found.push(span),
                None => others.push(entry.path()),
            }
        }
        let cover = cover(&found, runs).map_err(|missing| {
            io::Error::other(format!("{}: no file holds archive run {missing} of {runs}", dir.display()))
        })?;
        let mut kept = Vec::with_capacity(cover.len());
        let mut filter = Filter::default();
        let mut records = 0u64;
        for &span in &cover {
            let (run, count) = scan(dir, span, &mut filter)?;
            records += count;
            kept.push(run);
        }
        // Only once the kept files have been read: a failure above deletes nothing.
        for span in found.iter().filter(|span| cover.binary_search(span).is_err()) {
            fs::remove_file(span.path(dir))?;
        }
        for path in others {
            fs::remove_file(path)?;
        }
        Archive::start(dir, kept, filter, records, runs)
    }

    fn start(dir: &Path, runs: Vec<Run>, filter: Filter, records: u64, run_count: u32) -> io::Result<Archive> {
        debug_assert!(runs.windows(2).all(|w| w[0].span.last + 1 == w[1].span.first));
        debug_assert_eq!(runs_spanned(&runs), run_count);
        let written = Arc::new(AtomicU32::new(run_count));
        // The caller's checkpoint counts on these runs (none for `create`).
        let horizon = MergeHorizon(Arc::new(AtomicU32::new(run_count)));
        let stop_merging = Arc::new(AtomicBool::new(false));
        let (to_writer, writer_rx) = unbounded::<(u32, Arc<PendingRun>)>();
        let (done_tx, from_writer) = unbounded::<Finished>();
        let (to_merger, merger_rx) = unbounded::<Span>();
        let (retire, retired) = unbounded::<Vec<Run>>();
        let merger = Merger {
            dir: dir.to_path_buf(),
            files: runs.iter().map(|r| DiskFile { span: r.span, merging: false }).collect(),
            merges: Vec::new(),
            horizon: horizon.clone(),
            stop: stop_merging.clone(),
            written: merger_rx,
            to_apply: done_tx.clone(),
            retired,
        };
        let merger = crate::failstop::spawn("archive-merge", move || merger.run())?;
        let writer = {
            let (dir, written_runs) = (dir.to_path_buf(), written.clone());
            crate::failstop::spawn("archive", move || {
                for (index, run) in writer_rx {
                    crate::failstop::fault_point();
                    let written = write_run(&dir, index, &run);
                    let span = written.as_ref().ok().map(|run| run.span);
                    if span.is_some() {
                        written_runs.fetch_add(1, Ordering::Release);
                    }
                    if done_tx.send(written.map(Done::Written)).is_err() {
                        return;
                    }
                    // The apply thread hears of the run before any merge of it.
                    match span {
                        Some(span) => drop(to_merger.send(span)),
                        None => return,
                    }
                }
            })?
        };
        Ok(Archive {
            runs,
            pending: VecDeque::new(),
            staging: PendingRun::default(),
            spare: None,
            filter,
            records,
            written,
            durable_at_start: run_count,
            dir: dir.to_path_buf(),
            horizon,
            stop_merging,
            to_writer: Some(to_writer),
            from_writer,
            writer: Some(writer),
            merger: Some(merger),
            retire,
        })
    }

    /// How many runs a checkpoint taken now counts on: every sealed run,
    /// written or not (seal first: staged records are in none). It may be
    /// stored once the runs are written and made durable ([`RunSyncer`]).
    pub fn run_count(&self) -> u32 {
        runs_spanned(&self.runs) + self.pending.len() as u32
    }

    /// The checkpoint thread's handle for making written runs durable.
    pub fn run_syncer(&self) -> RunSyncer {
        RunSyncer { dir: self.dir.clone(), written: self.written.clone(), durable: self.durable_at_start }
    }

    /// The runs the archive may merge; raise it when a checkpoint is stored.
    pub fn merge_horizon(&self) -> MergeHorizon {
        self.horizon.clone()
    }

    /// Adds `records`; once `run_records` are staged they go to the writer
    /// as a run (tests; the engine evicts through [`Archive::add_from`]).
    #[cfg(test)]
    fn add(&mut self, records: Vec<Transfer>, run_records: usize) -> io::Result<()> {
        self.add_from(run_records, |staging| staging.extend(records))
    }

    /// Adds the records `fill` appends to the staging run (an eviction
    /// writes them there directly, without a vector of its own); once
    /// `run_records` are staged they go to the writer as a run.
    pub fn add_from(&mut self, run_records: usize, fill: impl FnOnce(&mut Vec<Transfer>)) -> io::Result<()> {
        self.poll()?;
        // The first run's buffers are sized once: grown by doubling, the
        // apply thread copied megabytes of records at a time (later runs
        // reuse a written run's buffers).
        let room = run_records.saturating_sub(self.staging.records.len());
        self.staging.records.reserve(room);
        self.staging.fps.reserve(room);
        let from = self.staging.records.len();
        fill(&mut self.staging.records);
        // Fingerprints first, asking for their filter lines, then the
        // inserts: the cache misses overlap.
        for record in &self.staging.records[from..] {
            let fp = fingerprint(&record.id);
            self.filter.prefetch_insert(fp);
            self.staging.fps.push(fp);
        }
        for &fp in &self.staging.fps[from..] {
            self.filter.insert(fp);
        }
        self.records += (self.staging.records.len() - from) as u64;
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
            let done = self.from_writer.recv().map_err(|_| io::Error::other("archive writer stopped"))?;
            self.finished(done)?;
        }
        let next = self.spare.take().unwrap_or_else(|| PendingRun {
            fps: Vec::with_capacity(self.staging.fps.capacity()),
            records: Vec::with_capacity(self.staging.records.capacity()),
        });
        let run = Arc::new(std::mem::replace(&mut self.staging, next));
        let index = self.run_count();
        self.pending.push_back(run.clone());
        let sender = self.to_writer.as_ref().expect("the writer runs while the archive lives");
        sender.send((index, run)).map_err(|_| io::Error::other("archive writer stopped"))
    }

    /// Adds `records` as one run of their own (tests).
    #[cfg(test)]
    fn add_run(&mut self, records: Vec<Transfer>) -> io::Result<()> {
        let count = records.len();
        self.add(records, count)?;
        self.seal()
    }

    /// Takes in the runs the writer has finished and the files the merge
    /// thread has made; an error is theirs.
    pub fn poll(&mut self) -> io::Result<()> {
        while let Ok(done) = self.from_writer.try_recv() {
            self.finished(done)?;
        }
        Ok(())
    }

    fn finished(&mut self, done: Finished) -> io::Result<()> {
        match done? {
            Done::Written(run) => {
                let written = self.pending.pop_front().expect("the writer answers runs in order");
                // The writer is done with it, usually already gone.
                if let Ok(mut buffers) = Arc::try_unwrap(written) {
                    buffers.fps.clear();
                    buffers.records.clear();
                    self.spare = Some(buffers);
                }
                assert_eq!(run.span, Span::single(runs_spanned(&self.runs)));
                self.runs.push(run);
            }
            Done::Merged(merged) => {
                // Its inputs are whole files, from the one it starts with to
                // the one it ends with. Their descriptors close on the merge
                // thread, which also unlinks them: the last of the two frees
                // the file's blocks, and on a disk mounted with `discard`
                // that waits for the device (the apply thread had stalled
                // here for milliseconds).
                let from = self.runs.iter().position(|r| r.span.first == merged.span.first);
                let to = self.runs.iter().position(|r| r.span.last == merged.span.last);
                let (Some(from), Some(to)) = (from, to) else {
                    panic!("merged runs {:?} are not whole files of the archive", merged.span);
                };
                let replaced: Vec<Run> = self.runs.splice(from..=to, [merged]).collect();
                // A merger that stopped leaves them to close here.
                let _ = self.retire.send(replaced);
            }
        }
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

    /// Files the archive reads from (each filter false positive reads one
    /// block of each).
    pub fn file_count(&self) -> usize {
        self.runs.len()
    }

    /// Memory the archive keeps: filter plus sparse indexes (runs on their
    /// way to disk not counted).
    pub fn memory_bytes(&self) -> usize {
        self.filter.bytes() + self.runs.iter().map(|r| r.sparse.len() * 16).sum::<usize>()
    }
}

impl Drop for Archive {
    /// Lets the writer finish the runs handed to it, gives up the merges
    /// under way (their inputs stay), then stops both threads.
    fn drop(&mut self) {
        self.stop_merging.store(true, Ordering::Release);
        self.to_writer = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Some(merger) = self.merger.take() {
            let _ = merger.join();
        }
    }
}

/// Makes written runs durable, for the checkpoint thread: a checkpoint may
/// count on a run only once its file and directory entry are on disk.
pub struct RunSyncer {
    dir: PathBuf,
    written: Arc<AtomicU32>,
    /// Runs below this are durable.
    durable: u32,
}

impl RunSyncer {
    /// Runs written to their files so far.
    pub fn written(&self) -> u32 {
        self.written.load(Ordering::Acquire)
    }

    /// Makes runs `0..runs` durable; they must be written. The runs not
    /// durable yet are at or past the merge horizon (it is raised only after
    /// a checkpoint counting on them is stored, and this comes first), so no
    /// merge has taken them: each is still the file its writer made.
    pub fn make_durable(&mut self, runs: u32) -> io::Result<()> {
        if runs <= self.durable {
            return Ok(());
        }
        assert!(runs <= self.written(), "runs {runs} made durable, {} written", self.written());
        for run in self.durable..runs {
            File::open(Span::single(run).path(&self.dir))?.sync_data()?;
        }
        File::open(&self.dir)?.sync_all()?;
        self.durable = runs;
        Ok(())
    }
}

/// Sorts run `index` by fingerprint (of equal ones, the newest record
/// first), writes it and starts its write-back, on the writer thread. Not
/// durable yet: see [`RunSyncer`].
fn write_run(dir: &Path, index: u32, run: &PendingRun) -> io::Result<Run> {
    let span = Span::single(index);
    let path = span.path(dir);
    // Frames are encoded in the order the records were evicted, reading
    // them front to back, and then copied out in fingerprint order: encoding
    // them in fingerprint order had read the records at random, a cache
    // miss or more per record, and was two thirds of this thread's time.
    let mut w = Writer { buf: Vec::with_capacity(run.records.len() * 64) };
    let mut keyed: Vec<(u64, std::cmp::Reverse<u32>, usize)> = Vec::with_capacity(run.records.len());
    for (index, (&fp, record)) in run.fps.iter().zip(&run.records).enumerate() {
        let at = w.buf.len();
        w.buf.extend_from_slice(&fp.to_le_bytes());
        w.buf.extend_from_slice(&[0; 4]);
        record.encode(&mut w);
        let len = (w.buf.len() - at - FRAME_HEADER_BYTES) as u32;
        w.buf[at + 8..at + FRAME_HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
        keyed.push((fp, std::cmp::Reverse(index as u32), at));
    }
    keyed.sort_unstable();
    let frames = w.buf;
    let mut sparse = Vec::with_capacity(keyed.len() / SPARSE_EVERY + 1);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
    let mut offset = 0u64;
    for (n, &(fp, _, at)) in keyed.iter().enumerate() {
        if n.is_multiple_of(SPARSE_EVERY) {
            sparse.push((fp, offset));
        }
        let len = u32::from_le_bytes(frames[at + 8..at + FRAME_HEADER_BYTES].try_into().expect("4 bytes")) as usize;
        let frame = &frames[at..at + FRAME_HEADER_BYTES + len];
        out.write_all(frame)?;
        offset += frame.len() as u64;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    crate::writeback::start(&file, 0, offset);
    Ok(Run { span, file: File::open(&path)?, sparse, len: offset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::{Currency, TransferKind, TransferStatus};
    use proptest::prelude::*;
    use std::time::Instant;

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
            details: None,
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
        let mut syncer = archive.run_syncer();
        drop(archive);
        // Dropping lets the writer finish: every sealed run is written.
        assert_eq!(syncer.written(), 3);
        syncer.make_durable(3).unwrap();
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

    #[test]
    fn a_full_filter_segment_has_the_false_positive_rate_its_size_was_chosen_for() {
        let mut filter = Filter::default();
        let present = |n: usize| fingerprint(&id(&format!("t-{n}")));
        for n in 0..FIRST_SEGMENT_KEYS {
            filter.insert(present(n));
        }
        assert_eq!(filter.segments.len(), 1, "exactly one full segment");
        // 74 here (about 59 expected of a blocked filter this size); 20 bits
        // and 7 probes gave 312.
        let false_positives =
            (0..1_000_000).filter(|n| filter.maybe_contains(fingerprint(&id(&format!("absent-{n}"))))).count();
        assert!(false_positives < 120, "{false_positives} false positives in a million");
    }

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    /// The fan-in, for the arithmetic of which runs merge.
    const F: u32 = MERGE_FANIN as u32;

    /// The file name of runs `first..=last`.
    fn file_name(first: u32, last: u32) -> String {
        Span { first, last }.path(Path::new("")).to_str().unwrap().to_string()
    }

    /// Polls until `done` holds (the merge thread works on its own time).
    fn wait_for(archive: &mut Archive, what: &str, done: impl Fn(&Archive) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            archive.poll().unwrap();
            if done(archive) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The files in `dir`, sorted, once their count is `expected` (inputs
    /// of a merge are deleted just after the apply thread hears of it).
    fn files_once(dir: &Path, expected: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut names: Vec<String> =
                fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            if names.len() == expected || Instant::now() >= deadline {
                return names;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An archive of `runs` runs of `per_run` records `r{run}-{n}` made
    /// durable, merged below `horizon`, then closed.
    fn archive_of_runs(path: &Path, runs: u32, per_run: usize, horizon: u32, files: usize) {
        let mut archive = Archive::create(path).unwrap();
        archive.merge_horizon().checkpoint_stored(horizon);
        for run in 0..runs {
            archive.add_run((0..per_run).map(|n| record(&format!("r{run}-{n}"))).collect()).unwrap();
        }
        wait_for(&mut archive, "the merges", |a| a.file_count() == files && a.pending.is_empty());
        assert_eq!(files_once(path, files).len(), files);
    }

    /// Whether the archive holds exactly the records of runs `0..runs`.
    fn check_holds_runs(archive: &Archive, runs: u32, of: u32, per_run: usize) {
        assert_eq!(archive.run_count(), runs);
        assert_eq!(archive.records(), u64::from(runs) * per_run as u64);
        for run in 0..of {
            for n in (0..per_run).step_by(3) {
                let name = format!("r{run}-{n}");
                let expected = (run < runs).then(|| record(&name));
                assert_eq!(archive.get(&id(&name)).unwrap(), expected, "{name} (runs {runs})");
            }
        }
    }

    #[test]
    fn merged_runs_find_every_record_and_no_absent_one_and_the_newest_of_a_repeated_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        let mut archive = Archive::create(&path).unwrap();
        archive.merge_horizon().checkpoint_stored(1000);
        let repeated = |amount| Transfer { amount, ..record("repeated") };
        // F*F + 6 runs: one file of tier 2 and six single runs.
        let runs = F * F + 6;
        for run in 0..runs {
            let mut records: Vec<Transfer> = (0..40).map(|n| record(&format!("r{run}-{n}"))).collect();
            if run == 3 || run == 5 {
                records.push(repeated(u64::from(run)));
            }
            archive.add_run(records).unwrap();
        }
        wait_for(&mut archive, "the merges", |a| a.file_count() == 7);
        assert_eq!(archive.run_count(), runs);
        assert_eq!(archive.run_syncer().written(), runs);
        let mut expected: Vec<String> = (F * F..runs).map(|n| file_name(n, n)).collect();
        expected.insert(0, file_name(0, F * F - 1));
        assert_eq!(files_once(&path, 7), expected);
        for run in 0..runs {
            for n in 0..40 {
                let name = format!("r{run}-{n}");
                assert_eq!(archive.get(&id(&name)).unwrap(), Some(record(&name)), "{name}");
            }
        }
        for n in 0..20_000 {
            assert_eq!(archive.get(&id(&format!("absent-{n}"))).unwrap(), None);
        }
        assert_eq!(archive.get(&id("repeated")).unwrap(), Some(repeated(5)), "the newer run's record");
        assert_eq!(archive.records(), u64::from(runs) * 40 + 2);
    }

    #[test]
    fn only_runs_below_the_horizon_merge_and_a_reopened_archive_keeps_its_runs_and_drops_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        // Below the horizon 2F + 4: two files of F runs and four single
        // runs; 50 more single runs above it.
        let (horizon, all) = (2 * F + 4, 2 * F + 54);
        archive_of_runs(&path, all, 20, horizon, 56);
        // Runs past 3F + 6 go; those kept are all below the new horizon, so
        // 2F..3F merge too.
        let kept = 3 * F + 6;
        let mut reopened = Archive::open(&path, kept).unwrap();
        check_holds_runs(&reopened, kept, all, 20);
        wait_for(&mut reopened, "the merges", |a| a.file_count() == 9);
        check_holds_runs(&reopened, kept, all, 20);
        drop(reopened);
        let names = files_once(&path, 9);
        assert_eq!(names[..3], [file_name(0, F - 1), file_name(F, 2 * F - 1), file_name(2 * F, 3 * F - 1)]);
        assert_eq!(names[8], file_name(kept - 1, kept - 1));
        // The horizon promised no checkpoint would count fewer runs: a count
        // that cuts a merged file is refused, and nothing is deleted.
        let refused = Archive::open(&path, F + 2).err().expect("runs F..2F are one file");
        let expected = format!("no file holds archive run {F} of {}", F + 2);
        assert!(refused.to_string().contains(&expected), "{refused}");
        assert_eq!(files_once(&path, 9), names);
    }

    #[test]
    fn a_reopened_archive_merges_what_its_checkpoint_counts_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        let runs = F + 4;
        archive_of_runs(&path, runs, 10, 0, runs as usize);
        let mut reopened = Archive::open(&path, runs).unwrap();
        wait_for(&mut reopened, "the merge", |a| a.file_count() == 5);
        check_holds_runs(&reopened, runs, runs, 10);
        assert_eq!(files_once(&path, 5)[0], file_name(0, F - 1));
    }

    /// What a crash left of a merge of the F runs of 30 records of an
    /// archive, and the files an archive opened with `runs` must use.
    fn check_crash(stage: &str, runs: u32, leave: impl Fn(&Path), expected_files: &[String]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        archive_of_runs(&path, F, 30, 0, F as usize);
        leave(&path);
        let mut reopened = Archive::open(&path, runs).unwrap();
        check_holds_runs(&reopened, runs, F, 30);
        // Runs below the count may merge again once open.
        wait_for(&mut reopened, "the merges", |a| a.file_count() == expected_files.len());
        check_holds_runs(&reopened, runs, F, 30);
        drop(reopened);
        assert_eq!(files_once(&path, expected_files.len()), expected_files, "{stage}");
    }

    #[test]
    fn a_crash_at_any_step_of_a_merge_reopens_with_every_record_once() {
        let all: Vec<Span> = (0..F).map(Span::single).collect();
        let merged = [file_name(0, F - 1)];
        check_crash(
            "merged file partly written",
            F,
            |path| fs::write(Span { first: 0, last: F - 1 }.tmp_path(path), b"partial").unwrap(),
            &merged,
        );
        check_crash(
            "merged file durable, no input deleted",
            F,
            |path| {
                merge_now(path, &all, false).unwrap();
            },
            &merged,
        );
        check_crash(
            "merged file durable, some inputs deleted",
            F,
            |path| {
                merge_now(path, &all, false).unwrap();
                fs::remove_file(Span::single(2).path(path)).unwrap();
                fs::remove_file(Span::single(0).path(path)).unwrap();
            },
            &merged,
        );
        check_crash(
            "merged file past the checkpoint's runs (never made: only a defence)",
            5,
            |path| {
                merge_now(path, &all, false).unwrap();
            },
            &(0..5).map(|n| file_name(n, n)).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn run_file_names_round_trip_and_other_names_are_not_runs() {
        for span in [Span::single(0), Span::single(12), Span { first: 0, last: 7 }, Span { first: 8, last: 1_234_567 }]
        {
            let name = span.path(Path::new("")).to_str().unwrap().to_string();
            assert_eq!(Span::parse(&name), Some(span), "{name}");
        }
        for name in ["run-000003-000003.dat", "run-000009-000002.dat", "run-000000-000007.tmp", "run-12.dat", "x.dat"] {
            assert_eq!(Span::parse(name), None, "{name}");
        }
    }

    #[test]
    fn cover_takes_the_widest_files_that_fit() {
        fn check(found: &[(u32, u32)], runs: u32, expected: Result<&[(u32, u32)], u32>) {
            let spans: Vec<Span> = found.iter().map(|&(first, last)| Span { first, last }).collect();
            let got = cover(&spans, runs).map(|c| c.iter().map(|s| (s.first, s.last)).collect::<Vec<_>>());
            assert_eq!(got, expected.map(|e| e.to_vec()), "{found:?} runs {runs}");
        }
        check(&[], 0, Ok(&[]));
        check(&[(0, 0), (1, 1)], 2, Ok(&[(0, 0), (1, 1)]));
        check(&[(0, 0), (1, 1), (0, 1), (2, 2)], 3, Ok(&[(0, 1), (2, 2)]));
        check(&[(0, 0), (1, 1), (0, 1), (2, 2)], 1, Ok(&[(0, 0)]));
        check(&[(0, 0), (1, 1), (0, 1), (2, 2)], 4, Err(3));
        check(&[(0, 7), (8, 8), (1, 1)], 8, Ok(&[(0, 7)]));
        check(&[(0, 7), (8, 8)], 5, Err(0));
        check(&[(0, 63), (0, 7), (8, 15), (64, 64)], 65, Ok(&[(0, 63), (64, 64)]));
    }

    #[test]
    fn the_next_merge_is_of_the_lowest_tier_below_the_horizon() {
        fn check(files: &[(u32, u32, bool)], horizon: u32, expected: Option<usize>) {
            let files: Vec<DiskFile> =
                files.iter().map(|&(first, last, merging)| DiskFile { span: Span { first, last }, merging }).collect();
            assert_eq!(next_merge(&files, horizon), expected);
        }
        let singles = |from: u32, count: u32| (from..from + count).map(|n| (n, n, false)).collect::<Vec<_>>();
        let far = u32::MAX;
        check(&singles(0, F), F, Some(0));
        check(&singles(0, F), F - 1, None);
        check(&singles(0, F - 1), far, None);
        check(&[[(0, F - 1, false)].as_slice(), &singles(F, F)].concat(), 2 * F, Some(1));
        let mut one_merging = singles(0, F + 1);
        one_merging[3].2 = true;
        check(&one_merging, far, None);
        let tier_one: Vec<_> = (0..F).map(|n| (n * F, n * F + F - 1, false)).collect();
        check(&[tier_one.clone(), singles(F * F, F)].concat(), far, Some(F as usize));
        check(&[tier_one, singles(F * F, F)].concat(), F * F + 6, Some(0));
        check(
            &[(0, F * F - 1, false), (F * F, F * F + F - 1, false), (F * F + F, F * F + 2 * F - 1, false)],
            far,
            None,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A merge keeps every frame once, in fingerprint order, and of equal
        /// fingerprints the newer file's first (each file's own order kept).
        #[test]
        fn a_merge_keeps_every_record_in_order_newest_first(
            runs in proptest::collection::vec(proptest::collection::vec(0u64..40, 0..60), 2..=MERGE_FANIN),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut frames_by_run = Vec::new();
            for (index, fps) in runs.iter().enumerate() {
                let run = PendingRun {
                    fps: fps.clone(),
                    records: (0..fps.len()).map(|n| record(&format!("p{index}-{n}"))).collect(),
                };
                let written = write_run(dir.path(), index as u32, &run).unwrap();
                prop_assert_eq!(written.span, Span::single(index as u32));
                let mut reader = RunReader::open(&Span::single(index as u32).path(dir.path())).unwrap();
                let mut frames = Vec::new();
                while reader.advance().unwrap() {
                    frames.push((reader.fingerprint, reader.frame.clone()));
                }
                frames_by_run.push(frames);
            }
            let mut expected: Vec<(u64, Vec<u8>)> = frames_by_run.iter().rev().flatten().cloned().collect();
            expected.sort_by_key(|(fp, _)| *fp);
            let inputs: Vec<Span> = (0..runs.len() as u32).map(Span::single).collect();
            let span = merge_now(dir.path(), &inputs, true).unwrap();
            prop_assert_eq!(span, Span { first: 0, last: runs.len() as u32 - 1 });
            let mut filter = Filter::default();
            let (merged, count) = scan(dir.path(), span, &mut filter).unwrap();
            prop_assert_eq!(count as usize, expected.len());
            let mut reader = RunReader::open(&span.path(dir.path())).unwrap();
            let mut got = Vec::new();
            while reader.advance().unwrap() {
                got.push((reader.fingerprint, reader.frame.clone()));
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(merged.len, reader.next_offset);
            let names: Vec<String> =
                fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            prop_assert_eq!(names, vec![span.path(Path::new("")).to_str().unwrap().to_string()]);
        }
    }
}
