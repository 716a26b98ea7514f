//! Checkpoints: an executor's whole state at a batch boundary, so that
//! recovery loads it and replays only the log after it, and the log segments
//! it covers can be deleted.
//!
//! A checkpoint is taken only between transactions (no transaction in
//! flight, no fence kept): then it is the ledger, two counters, and how far
//! the derived files (history, archive) reached. It is written by the log
//! thread after the batch it covers is durable and the history and archive
//! are synced, atomically (temporary file, fsync, rename, fsync of the
//! directory). File: `[magic "PSCK"][format: u32][crc32c of payload: u32]
//! [payload length: u64][payload]`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use peakstack_domain::ledger::LedgerSnapshot;

use crate::codec::{Codec, Reader, Writer};

pub const CHECKPOINT_FILE: &str = "checkpoint.snap";
const MAGIC: &[u8; 4] = b"PSCK";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The last batch it covers.
    pub sequence: u64,
    pub time_ms: u64,
    pub next_txn: u64,
    pub history_len: u64,
    pub archive_runs: u32,
    pub ledger: LedgerSnapshot,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.sequence);
        w.u64(self.time_ms);
        w.u64(self.next_txn);
        w.u64(self.history_len);
        w.varint(u64::from(self.archive_runs));
        self.ledger.encode(&mut w);
        let mut out = Vec::with_capacity(w.buf.len() + 20);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&w.buf).to_le_bytes());
        out.extend_from_slice(&(w.buf.len() as u64).to_le_bytes());
        out.extend_from_slice(&w.buf);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < 20 || &bytes[..4] != MAGIC {
            return Err("not a checkpoint".into());
        }
        let format = u32::from_le_bytes(bytes[4..8].try_into().expect("4"));
        if format != FORMAT {
            return Err(format!("checkpoint format {format} is not supported"));
        }
        let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8")) as usize;
        let payload = bytes.get(20..20 + len).ok_or("checkpoint cut short")?;
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
            ledger: LedgerSnapshot::decode(&mut r).map_err(|e| e.to_string())?,
        };
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
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::ledger::HoldSnapshot;
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
        let checkpoint = Checkpoint {
            sequence: 9,
            time_ms: 10,
            next_txn: 11,
            history_len: 12,
            archive_runs: 2,
            ledger: LedgerSnapshot {
                accounts: vec![account],
                holds: vec![HoldSnapshot {
                    transfer_id: id("p"),
                    side: Side::Debit,
                    account: 0,
                    clearing: None,
                    amount: 1,
                }],
                records: vec![Transfer {
                    id: id("p"),
                    debit_account_id: id("a"),
                    credit_account_id: id("b"),
                    amount: 1,
                    currency: usd,
                    kind: TransferKind::Pending { timeout_ms: 0, expires_at_ms: 0 },
                    status: TransferStatus::Pending,
                    posted_amount: None,
                    timestamp_ms: 5,
                }],
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
        assert_eq!(load(dir.path()).unwrap(), Some(checkpoint));
    }
}
