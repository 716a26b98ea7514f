//! The command log of one executor: segment files of checksummed batches.
//!
//! A frame is `[payload length: u32 LE][crc32c of payload: u32 LE][payload]`.
//! The payload of a batch is `[sequence: u64][time_ms: u64][input count][inputs]`.
//! Sequences start at 1 and have no gaps. Segments are named by the first
//! sequence they hold (`00000000000000000001.log`) and rotated past
//! [`SEGMENT_BYTES`]. One `fdatasync` makes a whole group of batches durable.
//!
//! Recovery reads every segment in order. A frame cut short or failing its
//! checksum at the end of the newest segment is a torn write: the file is
//! cut back to the last whole batch. Anything wrong anywhere else, or a gap
//! in the sequences, is corruption and stops the executor loudly.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::codec::{Codec, Reader, Writer};
use crate::protocol::Input;

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 256 << 20;
/// Largest batch payload a frame may carry.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log i/o at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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

/// Encodes a batch payload into a frame appended to `out`.
pub fn encode_frame(sequence: u64, time_ms: u64, inputs_encoded: &[u8], input_count: usize, out: &mut Vec<u8>) {
    let mut header = Writer::default();
    header.u64(sequence);
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
    let sequence = r.u64().map_err(|e| e.to_string())?;
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

pub struct Log {
    dir: PathBuf,
    file: File,
    file_path: PathBuf,
    file_bytes: u64,
    next_sequence: u64,
}

impl Log {
    /// Opens the log in `dir` (created if missing), reads back every batch
    /// and cuts a torn tail. `on_batch` sees each batch in order.
    pub fn open(dir: &Path, mut on_batch: impl FnMut(Batch) -> Result<(), String>) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut segments = list_segments(dir)?;
        let mut next_sequence = 1;
        let last_index = segments.len().checked_sub(1);
        for (index, (first, path)) in segments.iter().enumerate() {
            if *first != next_sequence && !(index == 0 && *first > 0) {
                return Err(LogError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    reason: format!("segment starts at {first}, expected {next_sequence}"),
                });
            }
            if index == 0 {
                next_sequence = *first;
            }
            let bytes = fs::read(path).map_err(io_err(path))?;
            let mut offset = 0usize;
            loop {
                if offset == bytes.len() {
                    break;
                }
                let torn = |reason: &str| -> Result<Option<u64>, LogError> {
                    if Some(index) == last_index {
                        Ok(Some(offset as u64))
                    } else {
                        Err(LogError::Corrupt { path: path.clone(), offset: offset as u64, reason: reason.to_string() })
                    }
                };
                let cut = if bytes.len() - offset < 8 {
                    torn("frame header cut short")?
                } else {
                    let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4")) as usize;
                    let crc = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().expect("4"));
                    if len > MAX_FRAME_BYTES || bytes.len() - offset - 8 < len {
                        torn("frame cut short")?
                    } else if crc32c::crc32c(&bytes[offset + 8..offset + 8 + len]) != crc {
                        torn("checksum mismatch")?
                    } else {
                        let batch = decode_payload(&bytes[offset + 8..offset + 8 + len]).map_err(|reason| {
                            LogError::Corrupt { path: path.clone(), offset: offset as u64, reason }
                        })?;
                        if batch.sequence != next_sequence {
                            return Err(LogError::Corrupt {
                                path: path.clone(),
                                offset: offset as u64,
                                reason: format!("batch {} where {} was expected", batch.sequence, next_sequence),
                            });
                        }
                        next_sequence += 1;
                        on_batch(batch).map_err(|reason| LogError::Corrupt {
                            path: path.clone(),
                            offset: offset as u64,
                            reason,
                        })?;
                        offset += 8 + len;
                        None
                    }
                };
                if let Some(cut_at) = cut {
                    tracing::warn!(path = %path.display(), offset = cut_at, "cutting torn log tail");
                    let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
                    file.set_len(cut_at).map_err(io_err(path))?;
                    file.sync_all().map_err(io_err(path))?;
                    break;
                }
            }
        }
        let (file_path, file, file_bytes) = match segments.pop() {
            Some((_, path)) => {
                let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
                let len = file.metadata().map_err(io_err(&path))?.len();
                (path, file, len)
            }
            None => {
                let (path, file) = create_segment(dir, next_sequence)?;
                (path, file, 0)
            }
        };
        Ok(Log { dir: dir.to_path_buf(), file, file_path, file_bytes, next_sequence })
    }

    /// The sequence the next batch must carry.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Appends frames (built with [`encode_frame`] for sequences starting at
    /// [`Log::next_sequence`]) and makes them durable with one fdatasync.
    pub fn append(&mut self, frames: &[u8], batch_count: u64) -> Result<(), LogError> {
        if self.file_bytes >= SEGMENT_BYTES {
            let (path, file) = create_segment(&self.dir, self.next_sequence)?;
            self.file = file;
            self.file_path = path;
            self.file_bytes = 0;
        }
        self.file.write_all(frames).map_err(io_err(&self.file_path))?;
        self.file.sync_data().map_err(io_err(&self.file_path))?;
        self.file_bytes += frames.len() as u64;
        self.next_sequence += batch_count;
        Ok(())
    }
}

/// Deletes the closed segments in `dir` whose batches all precede
/// `sequence` (a checkpoint covers them). Safe beside the thread that
/// appends: a segment is closed once a newer one exists, and the newest is
/// never deleted.
pub fn remove_segments_before(dir: &Path, sequence: u64) -> Result<usize, LogError> {
    let segments = list_segments(dir)?;
    let mut removed = 0;
    for window in segments.windows(2) {
        let (_, path) = &window[0];
        let (next_first, _) = &window[1];
        if *next_first <= sequence {
            fs::remove_file(path).map_err(io_err(path))?;
            removed += 1;
        }
    }
    Ok(removed)
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

fn create_segment(dir: &Path, first_sequence: u64) -> Result<(PathBuf, File), LogError> {
    let path = dir.join(format!("{first_sequence:020}.log"));
    let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
    // The new name must be durable before anything in it counts.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
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
        encode_frame(sequence, 1000 + sequence, &w.buf, inputs.len(), &mut out);
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
}
