//! Checkpoints: an executor's whole state at a batch boundary, so that
//! recovery loads it and replays only the log after it, and the log segments
//! it covers can be deleted.
//!
//! A checkpoint may be taken at any batch boundary: it is the ledger (with
//! what transactions in flight hold, reserve and lock), the parts, the
//! protocol's transactions and fences, two counters, and how far the
//! derived files (history, archive) reached. It is written by the
//! checkpoint thread after the batch it covers is durable and the history
//! and archive are synced, atomically (temporary file, fsync, rename, fsync
//! of the directory). File: `[magic "PSCK"][format: u32][crc32c of payload: u32]
//! [payload length: u64][payload]`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use peakstack_domain::ledger::{LedgerImage, LedgerSnapshot};

use crate::codec::{self, Codec, Reader, Writer};

pub const CHECKPOINT_FILE: &str = "checkpoint.snap";
const MAGIC: &[u8; 4] = b"PSCK";
/// 2: balances are u128. Their varints are the same bytes as format 1's u64
/// ones below 2^64, so format 1 reads as it is; a build that knows only
/// format 1 refuses a format 2 file instead of misreading a balance past u64.
/// 3: the parts' sections follow the ledger (see `parts.rs`); formats 1
/// and 2 read as an executor without parts.
/// 4: the protocol's section follows them (the transactions the executor
/// coordinates and its fences, see `tcc/`); formats 1-3, taken only
/// between transactions, read with none.
const FORMAT: u32 = 4;
/// The oldest format this build reads.
const OLDEST_FORMAT: u32 = 1;

/// A checkpoint as it is read back (`L` = [`LedgerSnapshot`]), or as the
/// apply thread takes it (`L` = [`LedgerImage`], records shared with the
/// live ledger until it is encoded). Both encode to the same bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint<L = LedgerSnapshot> {
    /// The last batch it covers.
    pub sequence: u64,
    pub time_ms: u64,
    pub next_txn: u64,
    pub history_len: u64,
    pub archive_runs: u32,
    pub ledger: L,
    /// The parts' checkpoint sections (see `Parts::encode_checkpoint`);
    /// empty in a checkpoint written before the executor hosted parts.
    pub parts: Vec<u8>,
    /// The protocol's section (see `ExecutorCore::checkpoint`); empty in a
    /// checkpoint of format 3 or older.
    pub tcc: Vec<u8>,
}

/// The ledger part of a checkpoint, in the one format both forms share.
pub trait CheckpointLedger {
    fn encode_ledger(&self, w: &mut Writer);
}

impl CheckpointLedger for LedgerSnapshot {
    fn encode_ledger(&self, w: &mut Writer) {
        self.encode(w);
    }
}

impl CheckpointLedger for LedgerImage {
    fn encode_ledger(&self, w: &mut Writer) {
        codec::encode_ledger_image(self, w);
    }
}

/// Bytes of the file header: magic, format, checksum, payload length.
const HEADER_BYTES: usize = 20;

impl<L: CheckpointLedger> Checkpoint<L> {
    pub fn encode(&self) -> Vec<u8> {
        // The payload is written after room for the header, which is filled
        // in last: a checkpoint is tens of megabytes, not worth a second copy.
        let mut w = Writer { buf: vec![0; HEADER_BYTES] };
        w.u64(self.sequence);
        w.u64(self.time_ms);
        w.u64(self.next_txn);
        w.u64(self.history_len);
        w.varint(u64::from(self.archive_runs));
        self.ledger.encode_ledger(&mut w);
        w.varint(self.parts.len() as u64);
        w.buf.extend_from_slice(&self.parts);
        w.varint(self.tcc.len() as u64);
        w.buf.extend_from_slice(&self.tcc);
        let mut out = w.buf;
        let payload_len = (out.len() - HEADER_BYTES) as u64;
        let crc = crc32c::crc32c(&out[HEADER_BYTES..]);
        out[..4].copy_from_slice(MAGIC);
        out[4..8].copy_from_slice(&FORMAT.to_le_bytes());
        out[8..12].copy_from_slice(&crc.to_le_bytes());
        out[12..20].copy_from_slice(&payload_len.to_le_bytes());
        out
    }
}

impl Checkpoint {
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
            return Err("not a checkpoint".into());
        }
        let format = u32::from_le_bytes(bytes[4..8].try_into().expect("4"));
        if format > FORMAT {
            return Err(format!(
                "checkpoint format {format} was written by a newer peakstack; this build reads formats \
                 {OLDEST_FORMAT}-{FORMAT} (run the newer build, or restore a data dir it has not written)"
            ));
        }
        if format < OLDEST_FORMAT {
            return Err(format!(
                "checkpoint format {format} is not supported (this build reads {OLDEST_FORMAT}-{FORMAT})"
            ));
        }
        let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8")) as usize;
        let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len).ok_or("checkpoint cut short")?;
        if crc32c::crc32c(payload) != crc {
            return Err("checkpoint fails its checksum".into());
        }
        let mut r = Reader::new(payload);
        let checkpoint = Checkpoint {
            sequence: r.u64().map_err(|e| e.to_string())?,
            time_ms: r.u64().map_err(|e| e.to_string())?,
            next_txn: r.u64().map_err(|e| e.to_string())?,
            history_len: r.u64().map_err(|e| e.to_string())?,
            archive_runs: u32::try_from(r.varint().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
            ledger: match format {
                4.. => LedgerSnapshot::decode(&mut r),
                _ => codec::decode_ledger_before_4(&mut r),
            }
            .map_err(|e| e.to_string())?,
            parts: Vec::new(),
            tcc: Vec::new(),
        };
        let mut checkpoint = checkpoint;
        if format >= 3 {
            let len = r.byte_len().map_err(|e| e.to_string())?;
            checkpoint.parts = r.bytes(len).map_err(|e| e.to_string())?.to_vec();
        }
        if format >= 4 {
            let len = r.byte_len().map_err(|e| e.to_string())?;
            checkpoint.tcc = r.bytes(len).map_err(|e| e.to_string())?.to_vec();
        }
        if !r.is_empty() {
            return Err("trailing bytes in checkpoint".into());
        }
        Ok(checkpoint)
    }
}

/// Reads the executor's checkpoint, if it has one. A checkpoint that exists
/// but cannot be read is an error: the log it covered may be gone.
pub fn load(dir: &Path) -> Result<Option<Checkpoint>, String> {
    let path = dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => Checkpoint::decode(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the checkpoint atomically.
pub fn store(dir: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let path = dir.join(CHECKPOINT_FILE);
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    // In pieces, each handed to write-back as it is written, so that the
    // final fsync does not flood the disk under the log (`writeback.rs`).
    let mut offset = 0u64;
    for piece in bytes.chunks(crate::writeback::WRITEBACK_EVERY_BYTES as usize) {
        file.write_all(piece)?;
        crate::writeback::start(&file, offset, piece.len() as u64);
        offset += piece.len() as u64;
    }
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::ledger::{HoldSnapshot, OwnedHold};
    use peakstack_domain::{
        Account, AccountFlags, Balances, Currency, Id, NewAccount, Side, Transfer, TransferKind, TransferStatus,
    };

    #[test]
    fn a_checkpoint_round_trips_and_damage_is_detected() {
        let usd = Currency::parse("USD").unwrap();
        let id = |s: &str| Id::parse(s).unwrap();
        let mut account = Account::open(
            NewAccount {
                id: id("a"),
                currency: usd,
                flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                overdraft_limit: 3,
                metadata: Some("{\"k\":1}".into()),
                owner: peakstack_domain::Owner::parse("buyer:b1"),
            },
            5,
        );
        account.balances = Balances { debits_pending: 1, debits_posted: 2, credits_pending: 3, credits_posted: 4 };
        account.history_head = 77;
        let pending_record = Transfer {
            id: id("p"),
            debit_account_id: id("a"),
            credit_account_id: id("b"),
            amount: 1,
            currency: usd,
            kind: TransferKind::Pending { timeout_ms: 0, expires_at_ms: 0 },
            status: TransferStatus::Pending,
            posted_amount: None,
            timestamp_ms: 5,
            details: None,
        };
        let checkpoint = Checkpoint {
            sequence: 9,
            time_ms: 10,
            next_txn: 11,
            history_len: 12,
            archive_runs: 2,
            // The parts' and the protocol's sections are opaque here.
            parts: vec![1, 2, 3],
            tcc: vec![4, 5],
            ledger: LedgerSnapshot {
                accounts: vec![account],
                holds: vec![HoldSnapshot {
                    transfer_id: id("p"),
                    side: Side::Debit,
                    account: 0,
                    clearing: None,
                    amount: 1,
                }],
                records: vec![pending_record.clone()],
                // What transactions in flight own (format 4).
                owned_holds: vec![OwnedHold {
                    hold: HoldSnapshot {
                        transfer_id: id("q"),
                        side: Side::Credit,
                        account: 0,
                        clearing: None,
                        amount: 2,
                    },
                    pending: false,
                    owner: 1 << 48 | 3,
                }],
                reserved: vec![(1 << 48 | 3, Transfer { id: id("q"), ..pending_record.clone() })],
                locked: vec![(id("p"), 4)],
            },
        };
        let bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), checkpoint);
        assert!(Checkpoint::decode(&bytes[..bytes.len() - 1]).is_err(), "cut short");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(Checkpoint::decode(&flipped).is_err(), "checksum");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        store(dir.path(), &bytes).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(checkpoint.clone()));

        // Formats 1 (u64 balances: the same payload bytes below 2^64) and
        // 2 had no parts' sections: their files read as an executor
        // without parts; format 3 had no protocol section, and none of
        // them anything owned by a transaction in flight. A format past
        // this build's is refused.
        let quiet =
            LedgerSnapshot { owned_holds: vec![], reserved: vec![], locked: vec![], ..checkpoint.ledger.clone() };
        let without_parts = Checkpoint { parts: Vec::new(), tcc: Vec::new(), ledger: quiet, ..checkpoint.clone() };
        let without_tcc = Checkpoint { parts: checkpoint.parts.clone(), ..without_parts.clone() };
        let older = |format: u32| {
            let of = if format < 3 { &without_parts } else { &without_tcc };
            let mut w = Writer { buf: vec![0; HEADER_BYTES] };
            for field in [of.sequence, of.time_ms, of.next_txn, of.history_len] {
                w.u64(field);
            }
            w.varint(u64::from(of.archive_runs));
            codec::Codec::encode(&of.ledger.accounts, &mut w);
            codec::Codec::encode(&of.ledger.holds, &mut w);
            codec::Codec::encode(&of.ledger.records, &mut w);
            if format == 3 {
                w.varint(of.parts.len() as u64);
                w.buf.extend_from_slice(&of.parts);
            }
            let mut old = w.buf;
            let payload_len = (old.len() - HEADER_BYTES) as u64;
            let crc = crc32c::crc32c(&old[HEADER_BYTES..]);
            old[..4].copy_from_slice(MAGIC);
            old[4..8].copy_from_slice(&format.to_le_bytes());
            old[8..12].copy_from_slice(&crc.to_le_bytes());
            old[12..20].copy_from_slice(&payload_len.to_le_bytes());
            Checkpoint::decode(&old)
        };
        assert_eq!(older(1).unwrap(), without_parts);
        assert_eq!(older(2).unwrap(), without_parts);
        assert_eq!(older(3).unwrap(), without_tcc);
        let with_format = |format: u32| {
            let mut bytes = bytes.clone();
            bytes[4..8].copy_from_slice(&format.to_le_bytes());
            Checkpoint::decode(&bytes)
        };
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 4, "written as format 4");
        let newer = with_format(5).unwrap_err();
        assert!(newer.contains("format 5 was written by a newer peakstack"), "{newer}");
        assert!(with_format(0).is_err());
    }

    /// A part's section may pass 16 MiB (the orders of a busy day): the
    /// length of a section is bounded by the bytes left, not by the bound
    /// on a collection's items. (Read back as 'length out of range' before.)
    #[test]
    fn sections_past_16_mib_round_trip() {
        let big: Vec<u8> = (0..(17u32 << 20)).map(|i| (i % 251) as u8).collect();
        let checkpoint = Checkpoint {
            sequence: 1,
            time_ms: 2,
            next_txn: 3,
            history_len: 0,
            archive_runs: 0,
            parts: big.clone(),
            tcc: big[..1000].to_vec(),
            ledger: LedgerSnapshot::default(),
        };
        let back = Checkpoint::decode(&checkpoint.encode()).expect("a big checkpoint reads back");
        assert_eq!(back.parts, big);
        assert_eq!(back.tcc, big[..1000]);
    }

    #[test]
    fn balances_past_u64_round_trip() {
        let usd = Currency::parse("USD").unwrap();
        let new = |name: &str| NewAccount {
            id: Id::parse(name).unwrap(),
            currency: usd,
            flags: AccountFlags::empty(),
            overdraft_limit: 0,
            metadata: None,
            owner: None,
        };
        let (mut debtor, mut creditor) = (Account::open(new("d"), 1), Account::open(new("c"), 1));
        debtor.balances = Balances { debits_posted: u128::MAX - 9, debits_pending: 9, ..Balances::default() };
        creditor.balances = Balances { credits_posted: u128::MAX - 9, credits_pending: 9, ..Balances::default() };
        let checkpoint = Checkpoint {
            sequence: 1,
            time_ms: 2,
            next_txn: 3,
            history_len: 0,
            archive_runs: 0,
            ledger: LedgerSnapshot { accounts: vec![debtor, creditor], ..LedgerSnapshot::default() },
            parts: Vec::new(),
            tcc: Vec::new(),
        };
        let decoded = Checkpoint::decode(&checkpoint.encode()).unwrap();
        assert_eq!(decoded, checkpoint);
        let ledger = peakstack_domain::Ledger::from_snapshot(decoded.ledger).unwrap();
        assert_eq!(ledger.check_balanced(), Ok(()));
    }

    /// The apply thread's image of a ledger encodes to the bytes of the
    /// snapshot taken at the same moment, whatever the ledger does between
    /// taking the image and encoding it (its records are shared, not copied).
    #[test]
    fn an_image_encodes_as_its_snapshot_even_after_the_ledger_moved_on() {
        let usd = Currency::parse("USD").unwrap();
        let id = |s: String| Id::parse(&s).unwrap();
        let mut ledger = peakstack_domain::Ledger::new();
        for n in 0..50 {
            let new = NewAccount {
                id: id(format!("a{n}")),
                currency: usd,
                flags: AccountFlags::empty(),
                overdraft_limit: 0,
                metadata: None,
                owner: None,
            };
            ledger.create_account(new, 1).unwrap();
        }
        let transfer = |n: u64| Transfer {
            id: id(format!("t{n}")),
            debit_account_id: id(format!("a{}", n % 50)),
            credit_account_id: id(format!("a{}", (n * 7 + 1) % 50)),
            amount: 1 + n,
            currency: usd,
            kind: TransferKind::Single,
            status: TransferStatus::Posted,
            posted_amount: None,
            // Not in id order, so the sort shows.
            timestamp_ms: 1000 - n % 10,
            details: None,
        };
        let apply = |ledger: &mut peakstack_domain::Ledger, range: std::ops::Range<u64>| {
            for n in range {
                let t = transfer(n);
                if t.debit_account_id != t.credit_account_id {
                    ledger.transfer_local(&t, 0, 1, t.timestamp_ms).unwrap();
                }
            }
        };
        // Enough records for several chunks, some of them evicted so that
        // freed slots are reused after the image.
        apply(&mut ledger, 0..700);
        let mut evicted = Vec::new();
        ledger.evict_oldest_into(100, &mut evicted);
        assert_eq!(evicted.len(), 100);
        fn header<L>(ledger: L) -> Checkpoint<L> {
            Checkpoint {
                sequence: 3,
                time_ms: 4,
                next_txn: 5,
                history_len: 6,
                archive_runs: 7,
                ledger,
                parts: Vec::new(),
                tcc: Vec::new(),
            }
        }
        let snapshot = ledger.snapshot();
        let mut sorted = snapshot.clone();
        sorted.sort_records();
        assert_eq!((snapshot.records.len(), &sorted), (600, &snapshot), "every record in memory, oldest first");
        let image = ledger.image(Vec::new());
        apply(&mut ledger, 700..900);
        ledger.evict_oldest_into(300, &mut evicted);
        let bytes = header(image).encode();
        assert_eq!(bytes, header(snapshot.clone()).encode());
        assert_eq!(Checkpoint::decode(&bytes).unwrap().ledger, snapshot);
        assert_ne!(ledger.snapshot(), snapshot, "the ledger did move on");
    }
}
