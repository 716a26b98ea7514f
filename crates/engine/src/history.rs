//! Account history: an append-only file per executor of *leg entries*, one
//! for every movement booked on one of its accounts, each pointing back to
//! the account's previous entry. An account keeps only the offset of its
//! newest entry (`Account::history_head`), so memory is bounded by the
//! accounts, and a statement is a walk back along the chain.
//!
//! Why not a general-purpose store: written per transfer, redb and fjall
//! both managed about 250-330k random inserts a second on one core here,
//! three inserts per transfer, which capped the whole engine near 100k
//! transfers/s and ate a core. Appending to a file costs a memcpy.
//!
//! The file is derived from the command log: the apply thread encodes each
//! entry and assigns its offset (deterministic: the same inputs give the
//! same offsets), the log thread appends the bytes after the batch is
//! durable and before anyone is answered. It is never fsynced: recovery
//! replays the log and rewrites it.
//!
//! Entry: `[payload length: u32 LE][crc32c: u32 LE][payload]`, payload =
//! `[previous entry offset + 1 (0 = none): u64][fnv1a64 of the account id: u64][time_ms][transfer id][event]`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use peakstack_domain::{Id, Side};

use crate::codec::{Codec, CodecError, Reader, Writer};

pub const HISTORY_FILE: &str = "history.dat";
/// Largest entry payload; anything bigger is corrupt.
const MAX_ENTRY_BYTES: usize = 4096;

/// What happened to the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegEvent {
    /// `amount` was posted on `side`.
    Posted { side: Side, amount: u64 },
    /// `amount` is held on `side` by a pending transfer.
    Held { side: Side, amount: u64 },
    /// A pending transfer's hold of `held` was resolved: `posted` of it posted
    /// (0 = voided or expired), the rest released.
    Settled { side: Side, held: u64, posted: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegEntry {
    /// Offset + 1 of the account's previous entry; 0 when this is its first.
    pub previous: u64,
    /// `fnv1a64` of the account id: a walk checks every entry is its account's.
    pub account: u64,
    pub time_ms: u64,
    pub transfer_id: Id,
    pub event: LegEvent,
}

impl LegEntry {
    /// Appends the framed entry to `out`; answers its length. Encodes in
    /// place (no buffer of its own): this runs twice per transfer, on the
    /// apply thread. The checksum is left zero for
    /// [`HistoryWriter::append`] to fill in on the log thread.
    pub fn encode_framed(&self, out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]); // length, patched below, and checksum
        let mut w = Writer { buf: std::mem::take(out) };
        w.u64(self.previous);
        w.u64(self.account);
        w.varint(self.time_ms);
        self.transfer_id.encode(&mut w);
        let (tag, side, a, b) = match self.event {
            LegEvent::Posted { side, amount } => (0, side, amount, 0),
            LegEvent::Held { side, amount } => (1, side, amount, 0),
            LegEvent::Settled { side, held, posted } => (2, side, held, posted),
        };
        w.u8(tag);
        side.encode(&mut w);
        w.varint(a);
        w.varint(b);
        *out = w.buf;
        let payload_len = out.len() - start - 8;
        out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        (out.len() - start) as u64
    }

    fn decode(payload: &[u8]) -> Result<LegEntry, CodecError> {
        let mut r = Reader::new(payload);
        let previous = r.u64()?;
        let account = r.u64()?;
        let time_ms = r.varint()?;
        let transfer_id = Id::decode(&mut r)?;
        let tag = r.u8()?;
        let side = Side::decode(&mut r)?;
        let (a, b) = (r.varint()?, r.varint()?);
        let event = match tag {
            0 => LegEvent::Posted { side, amount: a },
            1 => LegEvent::Held { side, amount: a },
            2 => LegEvent::Settled { side, held: a, posted: b },
            _ => return Err(CodecError("invalid leg event")),
        };
        Ok(LegEntry { previous, account, time_ms, transfer_id, event })
    }
}

/// The writing end, owned by an executor's log thread.
pub struct HistoryWriter {
    file: File,
    path: PathBuf,
    /// Bytes in the file, and up to where write-back was started (the file
    /// is synced only before a checkpoint; see `writeback.rs`).
    len: u64,
    writeback_from: u64,
}

impl HistoryWriter {
    /// Starts the file afresh: recovery rewrites it from the log.
    pub fn create(dir: &Path) -> io::Result<HistoryWriter> {
        let path = dir.join(HISTORY_FILE);
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        Ok(HistoryWriter { file, path, len: 0, writeback_from: 0 })
    }

    /// Continues the file a checkpoint left at `len` bytes (anything after
    /// it is replayed again from the log).
    pub fn open_at(dir: &Path, len: u64) -> io::Result<HistoryWriter> {
        let path = dir.join(HISTORY_FILE);
        let file = OpenOptions::new().write(true).open(&path)?;
        let actual = file.metadata()?.len();
        if actual < len {
            return Err(io::Error::other(format!("{} has {actual} bytes, the checkpoint needs {len}", path.display())));
        }
        file.set_len(len)?;
        let mut writer = HistoryWriter { file, path, len, writeback_from: len };
        use std::io::Seek;
        writer.file.seek(io::SeekFrom::End(0))?;
        Ok(writer)
    }

    /// A second handle on the file, to make what was appended durable
    /// from another thread (before a checkpoint counts on it).
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Appends whole entries as [`LegEntry::encode_framed`] left them,
    /// filling in their checksums first.
    pub fn append(&mut self, bytes: &mut [u8]) -> io::Result<()> {
        checksum_entries(bytes)?;
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        if self.len - self.writeback_from >= crate::writeback::WRITEBACK_EVERY_BYTES {
            crate::writeback::start(&self.file, self.writeback_from, self.len - self.writeback_from);
            self.writeback_from = self.len;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Fills in the checksum of each entry in `bytes`, walking them by their
/// lengths. Done here, on the log thread: on the apply thread it was a
/// tenth of the time a transfer took.
fn checksum_entries(bytes: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 8) else {
            return Err(io::Error::other(format!("history bytes end inside an entry header at {at}")));
        };
        let len = u32::from_le_bytes(header[..4].try_into().expect("4")) as usize;
        let end = at + 8 + len;
        let Some(payload) = bytes.get(at + 8..end) else {
            return Err(io::Error::other(format!("history entry at {at} runs past the bytes given")));
        };
        let crc = crc32c::crc32c(payload);
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    Ok(())
}

/// The reading end; any thread, positional reads.
pub struct HistoryReader {
    file: File,
}

impl HistoryReader {
    pub fn open(dir: &Path) -> io::Result<HistoryReader> {
        Ok(HistoryReader { file: File::open(dir.join(HISTORY_FILE))? })
    }

    /// The entry at `head - 1` (a head as kept by an account).
    pub fn entry(&self, head: u64) -> io::Result<LegEntry> {
        let offset = head.checked_sub(1).ok_or_else(|| io::Error::other("no entry at head 0"))?;
        let mut header = [0u8; 8];
        self.file.read_exact_at(&mut header, offset)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4"));
        if len > MAX_ENTRY_BYTES {
            return Err(io::Error::other(format!("history entry at {offset} has length {len}")));
        }
        let mut payload = vec![0u8; len];
        self.file.read_exact_at(&mut payload, offset + 8)?;
        if crc32c::crc32c(&payload) != crc {
            return Err(io::Error::other(format!("history entry at {offset} fails its checksum")));
        }
        LegEntry::decode(&payload).map_err(io::Error::other)
    }
}

/// Bytes a backward walk reads per step ([`HistoryReader::entries_before`]):
/// some hundreds of entries (60-120 bytes each), and far more than one of
/// the largest (`8 + MAX_ENTRY_BYTES`), so every step finds an entry start.
pub const BACKWARD_READ_BYTES: u64 = 64 << 10;

impl HistoryReader {
    /// The whole entries that end at or before `end` (an entry boundary:
    /// the length written, or a start this returned before), from the
    /// [`BACKWARD_READ_BYTES`] before it: `(start offset, entry)`, oldest
    /// first, the last one ending exactly at `end`. Empty at `end` 0.
    ///
    /// The file has no back pointers between accounts, so the first entry
    /// start in the block is found by trying each offset of its first
    /// `8 + MAX_ENTRY_BYTES` bytes: one is taken only when every frame from
    /// it passes its length bound, its checksum and its decoding, and they
    /// end exactly at `end`. An offset inside an entry would need its bytes
    /// to pass a 32-bit checksum and frame exactly up to a true start: no
    /// accident.
    pub fn entries_before(&self, end: u64) -> io::Result<Vec<(u64, LegEntry)>> {
        if end == 0 {
            return Ok(Vec::new());
        }
        let start = end.saturating_sub(BACKWARD_READ_BYTES);
        let mut block = vec![0u8; (end - start) as usize];
        self.file.read_exact_at(&mut block, start)?;
        let tries = if start == 0 { 1 } else { block.len().min(8 + MAX_ENTRY_BYTES) };
        // Starts that were framed from and led nowhere: each offset is
        // framed from at most once, so a cursor in the middle of an entry
        // costs one pass over the block, not one per offset tried.
        let mut dead_ends = vec![false; block.len()];
        for first in 0..tries {
            if let Some(entries) = frames_to_end(&block, first, &mut dead_ends) {
                return Ok(entries.into_iter().map(|(at, entry)| (start + at as u64, entry)).collect());
            }
        }
        Err(io::Error::other(format!("no whole history entries end at offset {end}")))
    }
}

/// The entries framed from `first` to the end of `block`, if every frame
/// is whole and sound and the last ends exactly there. Marks the starts it
/// framed from in `dead_ends` when it fails, and stops at one marked.
fn frames_to_end(block: &[u8], first: usize, dead_ends: &mut [bool]) -> Option<Vec<(usize, LegEntry)>> {
    let mut entries = Vec::new();
    let mut at = first;
    let framed = loop {
        if at == block.len() {
            break true;
        }
        if dead_ends[at] {
            break false;
        }
        match frame_at(block, at) {
            Some((entry, len)) => {
                entries.push((at, entry));
                at += len;
            }
            None => {
                dead_ends[at] = true;
                break false;
            }
        }
    };
    if framed {
        return Some(entries);
    }
    entries.iter().for_each(|(start, _)| dead_ends[*start] = true);
    None
}

/// The sound entry framed at `at` in `block` and its framed length.
fn frame_at(block: &[u8], at: usize) -> Option<(LegEntry, usize)> {
    let header = block.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4"));
    if len > MAX_ENTRY_BYTES {
        return None;
    }
    let payload = block.get(at + 8..at + 8 + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    Some((LegEntry::decode(payload).ok()?, 8 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(previous: u64, account: u64, time_ms: u64, transfer_id: &str, event: LegEvent) -> LegEntry {
        LegEntry { previous, account, time_ms, transfer_id: Id::parse(transfer_id).unwrap(), event }
    }

    #[test]
    fn entries_chain_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = HistoryWriter::create(dir.path()).unwrap();
        let mut bytes = Vec::new();
        let first = leg(0, 11, 5, "t1", LegEvent::Posted { side: Side::Debit, amount: 7 });
        let first_len = first.encode_framed(&mut bytes);
        let second = leg(1, 11, 6, "t2", LegEvent::Settled { side: Side::Credit, held: 9, posted: 4 });
        second.encode_framed(&mut bytes);
        writer.append(&mut bytes).unwrap();
        let reader = HistoryReader::open(dir.path()).unwrap();
        assert_eq!(reader.entry(first_len + 1).unwrap(), second);
        assert_eq!(reader.entry(second.previous).unwrap(), first);
        assert!(reader.entry(0).is_err());
        assert!(reader.entry(3).is_err(), "a head that is not an entry start is refused");
    }

    /// Writes `count` entries of varied sizes; answers each one's start.
    fn write_entries(dir: &Path, count: u64) -> (Vec<u64>, Vec<LegEntry>) {
        let mut writer = HistoryWriter::create(dir).unwrap();
        let (mut starts, mut entries, mut at) = (Vec::new(), Vec::new(), 0u64);
        for n in 0..count {
            // Ids of 3 to 60 bytes and amounts of every varint width.
            let id = format!("t{}-{}", n, "x".repeat((n * 7 % 55) as usize));
            let entry =
                leg(at / 3, n % 5, 1_000 + n, &id, LegEvent::Posted { side: Side::Debit, amount: n << (n % 50) });
            let mut bytes = Vec::new();
            let len = entry.encode_framed(&mut bytes);
            writer.append(&mut bytes).unwrap();
            starts.push(at);
            entries.push(entry);
            at += len;
        }
        (starts, entries)
    }

    #[test]
    fn a_backward_walk_finds_every_entry_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Several blocks' worth, so most steps start mid-file.
        let (starts, entries) = write_entries(dir.path(), 4000);
        let file_len = std::fs::metadata(dir.path().join(HISTORY_FILE)).unwrap().len();
        assert!(file_len > 3 * BACKWARD_READ_BYTES, "{file_len}");
        let reader = HistoryReader::open(dir.path()).unwrap();
        let mut walked = Vec::new();
        let mut end = file_len;
        while end > 0 {
            let block = reader.entries_before(end).unwrap();
            assert!(!block.is_empty());
            end = block[0].0;
            walked.extend(block.into_iter().rev());
        }
        walked.reverse();
        let expected: Vec<(u64, LegEntry)> = starts.into_iter().zip(entries).collect();
        assert_eq!(walked, expected);
        assert!(reader.entries_before(0).unwrap().is_empty());
    }

    #[test]
    fn a_backward_walk_from_inside_an_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (starts, _) = write_entries(dir.path(), 3000);
        let reader = HistoryReader::open(dir.path()).unwrap();
        // Every true start walks; the byte after one does not.
        for &start in starts.iter().step_by(97) {
            if start > 0 {
                assert_eq!(reader.entries_before(start).unwrap().last().map(|(at, _)| *at < start), Some(true));
            }
            assert!(reader.entries_before(start + 1).is_err(), "end {}", start + 1);
        }
    }

    #[test]
    fn checksums_are_filled_in_on_append_and_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = HistoryWriter::create(dir.path()).unwrap();
        let entry = leg(0, 3, 1, "t9", LegEvent::Held { side: Side::Debit, amount: 70 });
        let mut bytes = Vec::new();
        let len = entry.encode_framed(&mut bytes) as usize;
        // A cut entry is refused whole, and nothing is written.
        assert!(writer.append(&mut bytes[..len - 1].to_vec()).is_err());
        writer.append(&mut bytes).unwrap();
        let reader = HistoryReader::open(dir.path()).unwrap();
        assert_eq!(reader.entry(1).unwrap(), entry);
        // One flipped payload byte on disk fails the checksum.
        let file = OpenOptions::new().write(true).open(dir.path().join(HISTORY_FILE)).unwrap();
        file.write_all_at(&[bytes[len - 1] ^ 1], (len - 1) as u64).unwrap();
        let error = reader.entry(1).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
    }
}
