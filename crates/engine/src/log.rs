//! The command log of one executor: segment files of checksummed batches.
//!
//! A frame is `[payload length: u32 LE][crc32c of payload: u32 LE][payload]`.
//! The payload of a batch is `[sequence: u64][time_ms: u64][input count][inputs]`.
//! Sequences start at 1 and have no gaps. The top bit of the sequence field
//! ([`WRITE_START`]) marks the first frame of each durable write (logs
//! written before it existed have it nowhere). Segments are named by the first
//! sequence they hold (`00000000000000000001.log`). One durable write makes
//! a whole group of batches durable: a direct, synchronous write into a
//! prepared segment (see [`Log::append`]), else a write and an `fdatasync`.
//!
//! **Prepared segments.** An `fdatasync` that grows a file must also
//! allocate its new blocks and write the inode's size (with a journal, commit
//! it): more writes and round trips, and here a log fdatasync took 0.55 ms
//! appending against 0.27-0.33 ms overwriting blocks already written
//! (64 KiB writes, nothing else on the disk). So the log writes its frames
//! in place over a segment whose blocks are all written already: a segment
//! a checkpoint covered, reused instead of deleted
//! ([`remove_segments_before`] keeps one as `recycled.segment`), or else
//! one a background thread (`log-prep-N`) fills with zeros and syncs. The
//! log asks for a prepared segment once it has written
//! [`PREPARE_AFTER_BYTES`] since it opened (a data dir that sees a few
//! batches never pays for one), and for the next one when its current
//! segment is half full. When none is ready it appends to a plain file.
//!
//! Recovery reads every segment in order. A segment's frames end at the end
//! of the file, where zeros start, or at the first frame that is not whole,
//! fails its checksum, or is older than the segment (what a reused segment
//! held before). A closed segment must end where the next one starts (its
//! name), else batches were lost: corruption, which stops the executor
//! loudly, as does a gap in the sequences. In the newest segment, bytes
//! after its last whole batch may be a torn write: the file is cut there,
//! so nothing of it can be read later. Only the last write can be torn: a
//! frame that is not whole but is followed by a whole frame that starts a
//! later write (marked, and of a sequence not yet read: what a reused
//! segment held is older) was damaged after it was durable, and acknowledged
//! batches follow it. That is corruption, and opening fails, naming the file
//! and offset (see [`LogError::Corrupt`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::codec::{Codec, Reader, Writer};
use crate::protocol::Input;
use crate::{background, writeback};

/// Size of a prepared segment; an unprepared one is closed past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Largest batch payload a frame may carry.
pub const MAX_FRAME_BYTES: usize = 64 << 20;
/// The log asks for its first prepared segment once it has written this
/// much since it opened.
pub const PREPARE_AFTER_BYTES: u64 = 1 << 20;
/// The segment being prepared, until the log takes it and names it.
const SPARE_NAME: &str = "next.segment";
/// A segment a checkpoint covered, kept to be reused as the next spare.
const RECYCLED_NAME: &str = "recycled.segment";
/// In the sequence field of a frame: the frame starts a durable write.
pub const WRITE_START: u64 = 1 << 63;
/// The smallest frame: header, sequence, time and a one-byte input count.
const MIN_FRAME_BYTES: usize = 8 + 8 + 8 + 1;
/// The unit of a direct write: offsets, lengths and buffer addresses are
/// multiples of it (the disk's physical block; its logical one is smaller).
const BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log i/o at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Opening stops here: the executor does not start. Unless the reason
    /// says otherwise, restore its directory from a backup or a replica.
    #[error("log corrupt at {path} offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// One batch as read back from the log.
#[derive(Debug, PartialEq)]
pub struct Batch {
    pub sequence: u64,
    pub time_ms: u64,
    pub inputs: Vec<Input>,
}

/// Encodes a batch payload into a frame appended to `out`; `starts_write`
/// for the first frame of each [`Log::append`].
pub fn encode_frame(
    sequence: u64,
    time_ms: u64,
    inputs_encoded: &[u8],
    input_count: usize,
    starts_write: bool,
    out: &mut Vec<u8>,
) {
    assert!(sequence & WRITE_START == 0, "batch sequence {sequence} reaches the write-start bit");
    let mut header = Writer::default();
    header.u64(if starts_write { sequence | WRITE_START } else { sequence });
    header.u64(time_ms);
    header.varint(input_count as u64);
    let len = header.buf.len() + inputs_encoded.len();
    let mut crc = crc32c::crc32c(&header.buf);
    crc = crc32c::crc32c_append(crc, inputs_encoded);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&header.buf);
    out.extend_from_slice(inputs_encoded);
}

fn decode_payload(payload: &[u8]) -> Result<Batch, String> {
    let mut r = Reader::new(payload);
    let sequence = r.u64().map_err(|e| e.to_string())? & !WRITE_START;
    let time_ms = r.u64().map_err(|e| e.to_string())?;
    let count = r.len().map_err(|e| e.to_string())?;
    let mut inputs = Vec::with_capacity(count.min(65536));
    for _ in 0..count {
        inputs.push(Input::decode(&mut r).map_err(|e| e.to_string())?);
    }
    if !r.is_empty() {
        return Err("trailing bytes in batch".into());
    }
    Ok(Batch { sequence, time_ms, inputs })
}

fn all_zero(bytes: &[u8]) -> bool {
    // OR-folding fixed chunks vectorizes; a prepared tail is megabytes.
    bytes.chunks(4096).all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// How the frames of one segment ended.
enum SegmentEnd {
    /// At the end of the file or of the frames, only zeros after: `at` is
    /// where the next frame goes.
    Clean { at: usize },
    /// At a whole frame older than the segment: what a reused segment held.
    Reused { at: usize },
    /// At a frame that is cut short, fails its checksum, or is zeros with
    /// written bytes after them: a torn write, or older bytes of a reused
    /// segment.
    Torn { at: usize, reason: &'static str },
}

/// Reads the frames of segment `first` in order, handing each batch to
/// `on_batch` and checking that sequences follow `*next_sequence`.
fn read_segment(
    path: &Path,
    first: u64,
    bytes: &[u8],
    next_sequence: &mut u64,
    on_batch: &mut impl FnMut(Batch) -> Result<(), String>,
) -> Result<SegmentEnd, LogError> {
    let corrupt =
        |offset: usize, reason: String| LogError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason };
    let mut offset = 0usize;
    loop {
        let rest = &bytes[offset..];
        if rest.len() < 8 || rest[..4] == [0; 4] {
            // A payload is never empty: a zero length is where a prepared
            // tail starts.
            return Ok(if all_zero(rest) {
                SegmentEnd::Clean { at: offset }
            } else if rest.len() < 8 {
                SegmentEnd::Torn { at: offset, reason: "frame header cut short" }
            } else {
                SegmentEnd::Torn { at: offset, reason: "written bytes after unwritten ones" }
            });
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4"));
        if len > MAX_FRAME_BYTES || rest.len() - 8 < len {
            return Ok(SegmentEnd::Torn { at: offset, reason: "frame cut short" });
        }
        let payload = &rest[8..8 + len];
        if crc32c::crc32c(payload) != crc {
            return Ok(SegmentEnd::Torn { at: offset, reason: "checksum mismatch" });
        }
        let batch = decode_payload(payload).map_err(|reason| corrupt(offset, reason))?;
        if batch.sequence < first {
            return Ok(SegmentEnd::Reused { at: offset });
        }
        if batch.sequence != *next_sequence {
            return Err(corrupt(offset, format!("batch {} where {} was expected", batch.sequence, next_sequence)));
        }
        *next_sequence += 1;
        on_batch(batch).map_err(|reason| corrupt(offset, reason))?;
        offset += 8 + len;
    }
}

/// The first whole frame after `from` that starts a write of a batch from
/// `expected` on: its offset and sequence. Frames start anywhere, so every offset is a candidate; but a marked
/// sequence below 2^56 has 0x80 for its top byte, so only offsets 15
/// bytes before such a byte are tried (found a word at a time: a reused
/// segment's tail is megabytes), the checksum last.
fn later_write(bytes: &[u8], from: usize, expected: u64) -> Option<(usize, u64)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let first_mark = from + 1 + 15;
    if first_mark >= bytes.len() {
        return None;
    }
    for (index, word) in bytes[first_mark..].chunks(8).enumerate() {
        if let Ok(word) = <[u8; 8]>::try_from(word) {
            // Zero bytes of `x` are 0x80 bytes of the word.
            let x = u64::from_le_bytes(word) ^ HIGHS;
            if x.wrapping_sub(ONES) & !x & HIGHS == 0 {
                continue;
            }
        }
        let word_at = first_mark + index * 8;
        for (offset, &byte) in word.iter().enumerate() {
            let at = word_at + offset - 15;
            if byte == 0x80 {
                if let Some(sequence) = whole_marked_frame(&bytes[at..], expected) {
                    return Some((at, sequence));
                }
            }
        }
    }
    None
}

/// The sequence of `frame` when it starts with a whole frame, marked
/// [`WRITE_START`], of a sequence from `expected` on (and not beyond what
/// the bytes could hold).
fn whole_marked_frame(frame: &[u8], expected: u64) -> Option<u64> {
    if frame.len() < MIN_FRAME_BYTES {
        return None;
    }
    let len = u32::from_le_bytes(frame[..4].try_into().expect("4")) as usize;
    let marked = u64::from_le_bytes(frame[8..16].try_into().expect("8"));
    let sequence = marked & !WRITE_START;
    let plausible = marked & WRITE_START != 0
        && (MIN_FRAME_BYTES - 8..=MAX_FRAME_BYTES).contains(&len)
        && len <= frame.len() - 8
        && (expected..expected.saturating_add(frame.len() as u64)).contains(&sequence);
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4"));
    (plausible && crc32c::crc32c(&frame[8..8 + len]) == crc).then_some(sequence)
}

/// The error for a newest segment whose frames stop at `at` (for `reason`)
/// although a later write follows: what to do about it is in the message.
fn damaged_before_later_write(path: &Path, at: usize, reason: &str, later: (usize, u64)) -> LogError {
    let (later_at, later_sequence) = later;
    LogError::Corrupt {
        path: path.to_path_buf(),
        offset: at as u64,
        reason: format!(
            "{reason}, but a later write follows (batch {later_sequence} at offset {later_at}): this is damage \
             to batches already acknowledged, not a torn last write, so the log is not cut. Restore this \
             executor's directory from a backup or a replica; or, accepting the loss of every batch from \
             offset {at} on, cut the file there (truncate -s {at} {}) and start again",
            path.display()
        ),
    }
}

pub struct Log {
    dir: PathBuf,
    file: File,
    file_path: PathBuf,
    /// Where the next frame is written.
    offset: u64,
    /// Bytes of the file already written (zeros of a prepared segment):
    /// frames below this overwrite them without growing the file.
    capacity: u64,
    /// The current segment opened for direct, synchronous writes
    /// (`O_DIRECT | O_DSYNC`) when it is a prepared one: see [`Log::append`].
    direct: Option<File>,
    /// The bytes from the start of the block holding `offset` up to it: a
    /// direct write starts at that block and writes them again.
    tail: Vec<u8>,
    /// Where a direct write is assembled (block-aligned).
    staging: AlignedBuf,
    next_sequence: u64,
    written_since_open: u64,
    spare: Arc<Spare>,
    preparer: Option<JoinHandle<()>>,
}

impl Log {
    /// Opens the log in `dir` (created if missing), reads back every batch
    /// and cuts a torn tail. `on_batch` sees each batch in order.
    pub fn open(dir: &Path, mut on_batch: impl FnMut(Batch) -> Result<(), String>) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // A segment being prepared when the process stopped is unfinished.
        let spare_path = dir.join(SPARE_NAME);
        if let Err(error) = fs::remove_file(&spare_path) {
            if error.kind() != io::ErrorKind::NotFound {
                return Err(io_err(&spare_path)(error));
            }
        }
        let segments = list_segments(dir)?;
        let mut next_sequence = 1;
        let mut tail = None;
        // Where the previous segment's frames stopped short, if they did.
        let mut torn_before: Option<(&Path, usize, &'static str)> = None;
        for (index, (first, path)) in segments.iter().enumerate() {
            if *first != next_sequence && !(index == 0 && *first > 0) {
                return Err(match torn_before {
                    Some((torn_path, at, reason)) => LogError::Corrupt {
                        path: torn_path.to_path_buf(),
                        offset: at as u64,
                        reason: format!(
                            "{reason} in a closed segment: batch {next_sequence} is lost ({} starts at {first})",
                            path.display()
                        ),
                    },
                    None => LogError::Corrupt {
                        path: path.clone(),
                        offset: 0,
                        reason: format!("segment starts at {first}, expected {next_sequence}"),
                    },
                });
            }
            if index == 0 {
                next_sequence = *first;
            }
            let bytes = fs::read(path).map_err(io_err(path))?;
            let end = read_segment(path, *first, &bytes, &mut next_sequence, &mut on_batch)?;
            if index + 1 < segments.len() {
                // Closed: where it ends is checked against the next name.
                torn_before = match end {
                    SegmentEnd::Torn { at, reason } => Some((path, at, reason)),
                    _ => None,
                };
                continue;
            }
            if let SegmentEnd::Torn { at, reason } = end {
                if let Some(later) = later_write(&bytes, at, next_sequence) {
                    return Err(damaged_before_later_write(path, at, reason, later));
                }
            }
            drop(bytes);
            let at = match end {
                SegmentEnd::Clean { at } => at,
                SegmentEnd::Reused { at } | SegmentEnd::Torn { at, .. } => {
                    if let SegmentEnd::Torn { reason, .. } = end {
                        tracing::warn!(
                            path = %path.display(),
                            offset = at,
                            reason,
                            "cutting the log after its last whole batch (a torn write, or older bytes of a reused segment)"
                        );
                    }
                    let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
                    file.set_len(at as u64).map_err(io_err(path))?;
                    file.sync_all().map_err(io_err(path))?;
                    at
                }
            };
            tail = Some((path.clone(), at as u64));
        }
        let (file_path, file, offset) = match tail {
            Some((path, offset)) => {
                let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                (path, file, offset)
            }
            None => {
                let (path, file) = create_segment(dir, next_sequence)?;
                (path, file, 0)
            }
        };
        let capacity = file.metadata().map_err(io_err(&file_path))?.len();
        let (direct, tail) = open_direct(&file_path, offset, capacity)?;
        let spare = Arc::new(Spare::default());
        let preparer = {
            let (spare, prep_dir) = (spare.clone(), dir.to_path_buf());
            // `executor-003` prepares on `log-prep-3`.
            let number =
                dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.rsplit('-').next()?.parse::<u64>().ok());
            let name = number.map_or_else(|| "log-prep".to_string(), |n| format!("log-prep-{n}"));
            crate::failstop::spawn(name, move || spare.run(&prep_dir)).map_err(io_err(dir))?
        };
        Ok(Log {
            dir: dir.to_path_buf(),
            file,
            file_path,
            offset,
            capacity,
            direct,
            tail,
            staging: AlignedBuf::default(),
            next_sequence,
            written_since_open: 0,
            spare,
            preparer: Some(preparer),
        })
    }

    /// The sequence the next batch must carry.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Appends frames (built with [`encode_frame`] for sequences starting at
    /// [`Log::next_sequence`]) and makes them durable.
    ///
    /// Into a prepared segment, with one direct, synchronous write: from
    /// the block holding the end of the log (its bytes before the end written
    /// again, the same bytes) through the frames, zeros after them to the end
    /// of the block, as the prepared segment held. No page cache copy and
    /// write-back, and no separate fdatasync: a quarter less CPU per write
    /// and a fifth less latency than buffered write and fdatasync, measured
    /// here with 4-16 KiB writes. A torn write cannot damage the frames
    /// written before in the same block: every sector of it is either the
    /// old one or the new one, and both hold the same bytes there. Anywhere
    /// else (a plain file, or where direct writes are refused), a write and
    /// one fdatasync.
    pub fn append(&mut self, frames: &[u8], batch_count: u64) -> Result<(), LogError> {
        // Recovery tells a torn last write from damage by this mark.
        assert!(frames.len() >= 16 && frames[15] & 0x80 != 0, "a log write must start with a frame marked WRITE_START");
        let len = frames.len() as u64;
        if self.offset + len > self.capacity {
            if let Some(prepared) = self.spare.take() {
                self.start_prepared_segment(prepared)?;
            } else if self.offset >= SEGMENT_BYTES {
                let (path, file) = create_segment(&self.dir, self.next_sequence)?;
                (self.file, self.file_path, self.offset, self.capacity) = (file, path, 0, 0);
                (self.direct, self.tail) = (None, Vec::new());
            }
        }
        match &self.direct {
            Some(direct) if self.offset + len <= self.capacity => {
                let start = self.offset - self.tail.len() as u64;
                let data = self.tail.len() + frames.len();
                let buf = self.staging.block_aligned(data.next_multiple_of(BLOCK));
                buf[..self.tail.len()].copy_from_slice(&self.tail);
                buf[self.tail.len()..data].copy_from_slice(frames);
                buf[data..].fill(0);
                direct.write_all_at(buf, start).map_err(io_err(&self.file_path))?;
                let kept = ((self.offset + len) % BLOCK as u64) as usize;
                self.tail.clear();
                self.tail.extend_from_slice(&buf[data - kept..data]);
            }
            _ => {
                self.file.write_all_at(frames, self.offset).map_err(io_err(&self.file_path))?;
                self.file.sync_data().map_err(io_err(&self.file_path))?;
            }
        }
        self.offset += len;
        self.next_sequence += batch_count;
        self.written_since_open += len;
        if self.written_since_open >= PREPARE_AFTER_BYTES && self.offset * 2 >= self.capacity {
            self.spare.want();
        }
        Ok(())
    }

    /// Names the prepared segment after the next sequence and writes into
    /// it from now on. When the current segment holds no frame yet it has
    /// that same name and the rename replaces it.
    fn start_prepared_segment(&mut self, file: File) -> Result<(), LogError> {
        let path = self.dir.join(segment_name(self.next_sequence));
        fs::rename(self.dir.join(SPARE_NAME), &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        let capacity = file.metadata().map_err(io_err(&path))?.len();
        (self.direct, self.tail) = open_direct(&path, 0, capacity)?;
        (self.file, self.file_path, self.offset, self.capacity) = (file, path, 0, capacity);
        Ok(())
    }
}

/// The segment at `path` opened for direct, synchronous writes when it is a
/// prepared one (its blocks all written, `capacity` a whole number of
/// blocks), with the bytes of its block holding `offset` up to it; `None`
/// when it is not, or when the file system refuses direct writes.
fn open_direct(path: &Path, offset: u64, capacity: u64) -> Result<(Option<File>, Vec<u8>), LogError> {
    #[cfg(target_os = "linux")]
    const DIRECT_FLAGS: Option<i32> = Some(libc::O_DIRECT | libc::O_DSYNC);
    #[cfg(not(target_os = "linux"))]
    const DIRECT_FLAGS: Option<i32> = None;
    let Some(flags) = DIRECT_FLAGS else { return Ok((None, Vec::new())) };
    if capacity < SEGMENT_BYTES || !capacity.is_multiple_of(BLOCK as u64) || offset >= capacity {
        return Ok((None, Vec::new()));
    }
    let opened = OpenOptions::new().write(true).custom_flags(flags).open(path);
    let direct = match opened {
        Ok(file) => file,
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "no direct writes for the log; buffered instead");
            return Ok((None, Vec::new()));
        }
    };
    let block_start = offset - offset % BLOCK as u64;
    let mut tail = vec![0u8; (offset - block_start) as usize];
    File::open(path).and_then(|f| f.read_exact_at(&mut tail, block_start)).map_err(io_err(path))?;
    Ok((Some(direct), tail))
}

/// A reusable buffer that hands out block-aligned slices, as direct I/O
/// needs.
#[derive(Default)]
struct AlignedBuf(Vec<u8>);

impl AlignedBuf {
    /// A block-aligned slice of `len` bytes (its contents are left over).
    fn block_aligned(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + BLOCK {
            self.0 = vec![0; len + BLOCK];
        }
        let at = self.0.as_ptr().align_offset(BLOCK);
        &mut self.0[at..at + len]
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.spare.stop();
        if let Some(preparer) = self.preparer.take() {
            let _ = preparer.join();
        }
    }
}

/// The hand-over of one prepared segment between the log and its
/// preparing thread.
#[derive(Default)]
struct Spare {
    state: Mutex<SpareState>,
    changed: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
enum SpareState {
    #[default]
    Idle,
    Wanted,
    Ready(File),
    /// Preparing failed (a full disk, say): the log goes on appending to
    /// plain segments.
    Unavailable,
}

impl Spare {
    fn want(&self) {
        let mut state = self.state.lock().expect("spare lock");
        if matches!(*state, SpareState::Idle) {
            *state = SpareState::Wanted;
            self.changed.notify_one();
        }
    }

    fn take(&self) -> Option<File> {
        let mut state = self.state.lock().expect("spare lock");
        match std::mem::take(&mut *state) {
            SpareState::Ready(file) => Some(file),
            other => {
                *state = other;
                None
            }
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _state = self.state.lock().expect("spare lock");
        self.changed.notify_one();
    }

    /// The preparing thread: prepares a segment each time one is wanted.
    fn run(&self, dir: &Path) {
        background::lower_this_thread();
        loop {
            {
                let mut state = self.state.lock().expect("spare lock");
                while !matches!(*state, SpareState::Wanted) && !self.stopping.load(Ordering::Relaxed) {
                    state = self.changed.wait(state).expect("spare lock");
                }
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            crate::failstop::fault_point();
            let prepared = self.prepare(&dir.join(SPARE_NAME));
            let mut state = self.state.lock().expect("spare lock");
            *state = match prepared {
                Ok(Some(file)) => SpareState::Ready(file),
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot prepare a log segment; appending instead");
                    let _ = fs::remove_file(dir.join(SPARE_NAME));
                    SpareState::Unavailable
                }
            };
        }
    }

    /// A segment whose blocks are all written: the recycled one if there is
    /// one, else zeros written and made durable; `None` when the log closed
    /// meanwhile.
    fn prepare(&self, path: &Path) -> io::Result<Option<File>> {
        const CHUNK: usize = 1 << 20;
        let recycled = path.with_file_name(RECYCLED_NAME);
        match fs::rename(&recycled, path) {
            Ok(()) => {
                let file = OpenOptions::new().write(true).open(path)?;
                if file.metadata()?.len() == SEGMENT_BYTES {
                    return Ok(Some(file));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let file = OpenOptions::new().create(true).truncate(true).write(true).open(path)?;
        let zeros = vec![0u8; CHUNK];
        let mut written = 0u64;
        while written < SEGMENT_BYTES {
            if self.stopping.load(Ordering::Relaxed) {
                drop(file);
                fs::remove_file(path)?;
                return Ok(None);
            }
            file.write_all_at(&zeros, written)?;
            written += CHUNK as u64;
            if written.is_multiple_of(writeback::WRITEBACK_EVERY_BYTES) {
                writeback::start(&file, written - writeback::WRITEBACK_EVERY_BYTES, writeback::WRITEBACK_EVERY_BYTES);
            }
        }
        file.sync_all()?;
        Ok(Some(file))
    }
}

/// Removes the closed segments in `dir` whose batches all precede
/// `sequence` (a checkpoint covers them): one of full size is kept as
/// `recycled.segment` for the log to reuse, unless one is kept already;
/// the others are deleted. Safe beside the thread that appends: a segment
/// is closed once a newer one exists, and the newest is never removed.
pub fn remove_segments_before(dir: &Path, sequence: u64) -> Result<usize, LogError> {
    let segments = list_segments(dir)?;
    let recycled = dir.join(RECYCLED_NAME);
    let mut removed = 0;
    for window in segments.windows(2) {
        let (_, path) = &window[0];
        let (next_first, _) = &window[1];
        if *next_first <= sequence {
            let full = fs::metadata(path).map_err(io_err(path))?.len() == SEGMENT_BYTES;
            if full && !recycled.exists() {
                fs::rename(path, &recycled).map_err(io_err(path))?;
            } else {
                fs::remove_file(path).map_err(io_err(path))?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

fn segment_name(first_sequence: u64) -> String {
    format!("{first_sequence:020}.log")
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(first) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        segments.push((first, entry.path()));
    }
    segments.sort();
    Ok(segments)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn create_segment(dir: &Path, first_sequence: u64) -> Result<(PathBuf, File), LogError> {
    let path = dir.join(segment_name(first_sequence));
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    // The new name must be durable before anything in it counts.
    sync_dir(dir)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Input;
    use peakstack_domain::Id;

    fn frame(sequence: u64, ids: &[&str]) -> Vec<u8> {
        let mut w = Writer::default();
        let inputs: Vec<Input> =
            ids.iter().map(|i| Input::Expire { pending_ids: vec![Id::parse(i).unwrap()] }).collect();
        for input in &inputs {
            input.encode(&mut w);
        }
        let mut out = Vec::new();
        encode_frame(sequence, 1000 + sequence, &w.buf, inputs.len(), true, &mut out);
        out
    }

    /// A frame that continues a write (not its first).
    fn continuing(sequence: u64, ids: &[&str]) -> Vec<u8> {
        let mut out = frame(sequence, ids);
        out[15] &= 0x7f;
        let crc = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn read_all(dir: &Path) -> Result<Vec<u64>, LogError> {
        let mut seen = Vec::new();
        Log::open(dir, |b| {
            seen.push(b.sequence);
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn appends_read_back_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        let mut frames = frame(1, &["a"]);
        frames.extend(frame(2, &["b", "c"]));
        log.append(&frames, 2).unwrap();
        log.append(&frame(3, &["d"]), 1).unwrap();
        drop(log);
        assert_eq!(read_all(dir.path()).unwrap(), vec![1, 2, 3]);

        // Tear the last frame: every cut inside it loses exactly batch 3.
        let segment = list_segments(dir.path()).unwrap()[0].1.clone();
        let whole = fs::read(&segment).unwrap();
        let last_len = frame(3, &["d"]).len();
        for cut in 1..last_len {
            fs::write(&segment, &whole[..whole.len() - cut]).unwrap();
            assert_eq!(read_all(dir.path()).unwrap(), vec![1, 2], "cut {cut}");
            assert_eq!(fs::metadata(&segment).unwrap().len() as usize, whole.len() - last_len);
        }
        // After the cut, appending continues at sequence 3.
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        assert_eq!(log.next_sequence(), 3);
        log.append(&frame(3, &["e"]), 1).unwrap();
        drop(log);
        assert_eq!(read_all(dir.path()).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn corruption_before_the_tail_stops_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        log.append(&frame(1, &["a"]), 1).unwrap();
        drop(log);
        // A later segment exists, so damage in the first one is not a torn tail.
        let first = list_segments(dir.path()).unwrap()[0].1.clone();
        fs::write(dir.path().join(format!("{:020}.log", 2)), frame(2, &["b"])).unwrap();
        let mut bytes = fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&first, bytes).unwrap();
        assert!(matches!(read_all(dir.path()), Err(LogError::Corrupt { .. })));
    }

    #[test]
    fn a_gap_in_sequences_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        log.append(&frame(1, &["a"]), 1).unwrap();
        log.append(&frame(3, &["c"]), 1).unwrap();
        drop(log);
        assert!(matches!(read_all(dir.path()), Err(LogError::Corrupt { .. })));
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    /// Appends big batches from `sequence` until the log has written enough
    /// to ask for a prepared segment; answers the next sequence and the
    /// bytes written.
    fn append_until_prepare_is_wanted(log: &mut Log, mut sequence: u64) -> (u64, u64) {
        let ids: Vec<String> = (0..2000).map(|i| format!("pending-transfer-{i:06}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut written = 0;
        while written < PREPARE_AFTER_BYTES {
            let frame = frame(sequence, &ids);
            written += frame.len() as u64;
            log.append(&frame, 1).unwrap();
            sequence += 1;
        }
        (sequence, written)
    }

    /// Appends small batches from `sequence` until the log moves to a second
    /// segment; answers the next sequence and that segment.
    fn append_until_a_second_segment(log: &mut Log, dir: &Path, mut sequence: u64) -> (u64, (u64, PathBuf)) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            log.append(&frame(sequence, &["a"]), 1).unwrap();
            sequence += 1;
            let mut segments = list_segments(dir).unwrap();
            if segments.len() == 2 {
                return (sequence, segments.pop().unwrap());
            }
            assert!(std::time::Instant::now() < deadline, "no prepared segment taken after 30 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_busy_log_moves_to_prepared_segments_and_writes_over_their_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        let (sequence, written) = append_until_prepare_is_wanted(&mut log, 1);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        // The first segment was a plain file, grown by every append.
        let first = list_segments(dir.path()).unwrap()[0].1.clone();
        assert_eq!(file_len(&first), written);
        // Small batches until the prepared segment is ready and taken.
        let (mut sequence, (second_starts_at, second)) = append_until_a_second_segment(&mut log, dir.path(), sequence);
        assert_eq!(second_starts_at, sequence - 1);
        assert_eq!(file_len(&second), SEGMENT_BYTES, "frames overwrite the zeros, the file does not grow");
        assert!(log.direct.is_some(), "a prepared segment is written with direct writes");
        log.append(&frame(sequence, &["b", "c"]), 1).unwrap();
        sequence += 1;
        // Frames of many sizes, so that writes start and end everywhere in
        // a block and cross block boundaries.
        for n in 0..300 {
            let ids: Vec<String> = (0..n % 97).map(|i| format!("id-{n}-{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            log.append(&frame(sequence, &ids), 1).unwrap();
            sequence += 1;
        }
        assert_eq!(file_len(&second), SEGMENT_BYTES);
        assert_ne!(log.offset % BLOCK as u64, 0, "the log ends inside a block");
        drop(log);
        assert!(!dir.path().join(SPARE_NAME).exists(), "the log took its spare or removed it on close");

        let all: Vec<u64> = (1..sequence).collect();
        assert_eq!(read_all(dir.path()).unwrap(), all);
        // Reopened, it goes on writing in place after the last frame.
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        assert_eq!(log.next_sequence(), sequence);
        assert!(log.direct.is_some() && !log.tail.is_empty(), "reopened inside a block of the prepared segment");
        log.append(&frame(sequence, &["d"]), 1).unwrap();
        drop(log);
        assert_eq!(file_len(&second), SEGMENT_BYTES);
        assert_eq!(read_all(dir.path()).unwrap(), (1..=sequence).collect::<Vec<_>>());
    }

    /// Writes `frames` at the start of a prepared segment named for `first`.
    fn prepared_segment(dir: &Path, first: u64, frames: &[Vec<u8>]) -> PathBuf {
        let mut bytes: Vec<u8> = frames.concat();
        bytes.resize(1 << 20, 0);
        let path = dir.join(segment_name(first));
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_torn_write_over_zeros_is_cut_so_no_part_of_it_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        // Batches 3 and 4 were one write, never synced; the crash kept
        // batch 4 and lost the first page of batch 3 (zeros there).
        let frames = vec![frame(1, &["x"]), frame(2, &["x"]), frame(3, &["x"]), continuing(4, &["x"])];
        let path = prepared_segment(dir.path(), 1, &frames);
        let mut bytes = fs::read(&path).unwrap();
        let at = frames[0].len() + frames[1].len();
        bytes[at..at + 8].fill(0);
        fs::write(&path, bytes).unwrap();

        assert_eq!(read_all(dir.path()).unwrap(), vec![1, 2]);
        assert_eq!(file_len(&path), at as u64, "the torn write is cut off");
        // A new batch 3 of the same length lands where the old one was;
        // the old batch 4 after it must not come back.
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        let again = frame(3, &["y"]);
        assert_eq!(again.len(), frames[2].len());
        log.append(&again, 1).unwrap();
        drop(log);
        let mut seen = Vec::new();
        Log::open(dir.path(), |b| {
            seen.push((b.sequence, b.inputs));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].1, vec![Input::Expire { pending_ids: vec![Id::parse("y").unwrap()] }]);
    }

    #[test]
    fn closed_segments_end_at_their_zeros_and_a_half_prepared_spare_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        prepared_segment(dir.path(), 1, &[frame(1, &["a"]), frame(2, &["b"])]);
        prepared_segment(dir.path(), 3, &[frame(3, &["c"])]);
        fs::write(dir.path().join(SPARE_NAME), vec![0u8; 4096]).unwrap();
        assert_eq!(read_all(dir.path()).unwrap(), vec![1, 2, 3]);
        assert!(!dir.path().join(SPARE_NAME).exists());
        // A closed segment that ends before its successor starts lost batches.
        prepared_segment(dir.path(), 1, &[frame(1, &["a"])]);
        assert!(matches!(read_all(dir.path()), Err(LogError::Corrupt { .. })));
    }

    #[test]
    fn a_covered_segment_is_reused_and_its_old_frames_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        // A full closed segment of batches 1-3 and the newest, from batch 4.
        let mut old: Vec<u8> = (1..=3).flat_map(|s| frame(s, &["old"])).collect();
        old.resize(SEGMENT_BYTES as usize, 0xab);
        fs::write(dir.path().join(segment_name(1)), &old).unwrap();
        fs::write(dir.path().join(segment_name(4)), frame(4, &["d"])).unwrap();
        drop(old);
        // A checkpoint covers batches 1-3: their segment is kept for reuse.
        assert_eq!(remove_segments_before(dir.path(), 4).unwrap(), 1);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        assert_eq!(file_len(&dir.path().join(RECYCLED_NAME)), SEGMENT_BYTES);

        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        let (sequence, _) = append_until_prepare_is_wanted(&mut log, 5);
        let (sequence, (_, reused)) = append_until_a_second_segment(&mut log, dir.path(), sequence);
        assert!(!dir.path().join(RECYCLED_NAME).exists());
        // Written over in place: the old bytes are still there past the new frame.
        let bytes = fs::read(&reused).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        assert_eq!(*bytes.last().unwrap(), 0xab, "no zeros were written: the segment was reused");
        drop(log);

        // Read back: the new batches only, then the old bytes are cut off.
        assert_eq!(read_all(dir.path()).unwrap(), (4..sequence).collect::<Vec<_>>());
        assert!(file_len(&reused) < SEGMENT_BYTES);
        let mut log = Log::open(dir.path(), |_| Ok(())).unwrap();
        log.append(&frame(sequence, &["e"]), 1).unwrap();
        drop(log);
        assert_eq!(read_all(dir.path()).unwrap(), (4..=sequence).collect::<Vec<_>>());
    }

    #[test]
    fn a_whole_old_frame_after_the_new_ones_ends_a_reused_segment() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 10 reused: batch 10 written over the start, old batch 2 after it.
        prepared_segment(dir.path(), 10, &[frame(10, &["x"]), frame(2, &["y"])]);
        assert_eq!(read_all(dir.path()).unwrap(), vec![10]);
        // Closed, such a segment ends there too, when the next one follows on.
        prepared_segment(dir.path(), 11, &[frame(11, &["z"])]);
        prepared_segment(dir.path(), 10, &[frame(10, &["x"]), frame(2, &["y"])]);
        assert_eq!(read_all(dir.path()).unwrap(), vec![10, 11]);
    }

    /// Appends batches 1..=10, one write each, and answers the segment and
    /// the offsets where each frame starts.
    fn ten_writes(dir: &Path) -> (PathBuf, Vec<usize>) {
        let mut log = Log::open(dir, |_| Ok(())).unwrap();
        let mut starts = Vec::new();
        for sequence in 1..=10 {
            starts.push(log.offset as usize);
            log.append(&frame(sequence, &["a", "b"]), 1).unwrap();
        }
        drop(log);
        (list_segments(dir).unwrap()[0].1.clone(), starts)
    }

    #[test]
    fn a_damaged_frame_before_a_later_write_is_corruption_not_a_torn_tail() {
        // A flipped byte in frame 5's length, checksum, marked sequence and
        // inputs: batches 5-10 were acknowledged, none may go silently.
        for within in [0, 5, 15, 30] {
            let dir = tempfile::tempdir().unwrap();
            let (segment, starts) = ten_writes(dir.path());
            let mut bytes = fs::read(&segment).unwrap();
            bytes[starts[4] + within] ^= 0x10;
            fs::write(&segment, &bytes).unwrap();
            let error = read_all(dir.path()).unwrap_err();
            let LogError::Corrupt { path, offset, .. } = &error else { panic!("{error}") };
            assert_eq!((path, *offset), (&segment, starts[4] as u64), "byte {within}: {error}");
            let message = error.to_string();
            assert!(message.contains(&format!("batch 6 at offset {}", starts[5])), "{message}");
            assert!(message.contains("backup") && message.contains("truncate -s"), "{message}");
            assert_eq!(fs::read(&segment).unwrap(), bytes, "nothing was cut");
        }
    }

    #[test]
    fn a_damaged_frame_in_a_prepared_segment_before_a_later_write_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<Vec<u8>> = (1..=6).map(|s| frame(s, &["x"])).collect();
        let path = prepared_segment(dir.path(), 1, &frames);
        let mut bytes = fs::read(&path).unwrap();
        let at = frames[0].len() + frames[1].len();
        bytes[at + 20] ^= 1;
        fs::write(&path, bytes).unwrap();
        let error = read_all(dir.path()).unwrap_err();
        assert!(matches!(&error, LogError::Corrupt { offset, .. } if *offset == at as u64), "{error}");
    }

    #[test]
    fn a_cut_last_write_still_opens_with_every_batch_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, starts) = ten_writes(dir.path());
        let whole = fs::read(&segment).unwrap();
        fs::write(&segment, &whole[..starts[9] + 11]).unwrap();
        assert_eq!(read_all(dir.path()).unwrap(), (1..=9).collect::<Vec<_>>());
        assert_eq!(file_len(&segment), starts[9] as u64);
    }

    #[test]
    fn old_frames_of_a_reused_segment_after_a_torn_write_are_not_a_later_write() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 10 reused over one that held batches 2-5 (each its own
        // write, so marked); batches 10 and 11 written over its start, and
        // batch 12 torn after them: its first half, then old bytes.
        let old: Vec<u8> = (2..=5).flat_map(|s| frame(s, &["old-batch-with-longer-ids"])).collect();
        let new: Vec<u8> = [frame(10, &["x"]), frame(11, &["y"])].concat();
        let torn = frame(12, &["z"]);
        let mut bytes = old.clone();
        bytes[..new.len()].copy_from_slice(&new);
        bytes[new.len()..new.len() + torn.len() / 2].copy_from_slice(&torn[..torn.len() / 2]);
        let old_whole_after = old.len() - frame(5, &["old-batch-with-longer-ids"]).len();
        assert!(old_whole_after > new.len() + torn.len(), "an old whole frame follows the torn one");
        let path = prepared_segment(dir.path(), 10, &[bytes]);
        assert_eq!(read_all(dir.path()).unwrap(), vec![10, 11]);
        assert_eq!(file_len(&path), new.len() as u64);
    }

    #[test]
    fn damage_in_a_closed_segment_names_that_segment_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<Vec<u8>> = (1..=3).map(|s| frame(s, &["x"])).collect();
        let first = prepared_segment(dir.path(), 1, &frames);
        prepared_segment(dir.path(), 4, &[frame(4, &["y"])]);
        let mut bytes = fs::read(&first).unwrap();
        bytes[frames[0].len() + 20] ^= 1;
        fs::write(&first, bytes).unwrap();
        let error = read_all(dir.path()).unwrap_err();
        let LogError::Corrupt { path, offset, .. } = &error else { panic!("{error}") };
        assert_eq!((path, *offset), (&first, frames[0].len() as u64), "{error}");
    }
}
