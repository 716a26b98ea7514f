//! Transfer audit records in rows of a compact binary form, as the audit
//! feed stores them in `access.redb`.
//!
//! A row of JSON records cost about 640 bytes a transfer, formatted through
//! a `serde_json::Value` per record; under `loadtest --batch 1000` that was
//! hundreds of MB/s of JSON for redb to copy. Records of one row are alike
//! (same key, often the same request, ids with common prefixes), so a row
//! keeps each string as the length it shares with the same field of the
//! record before it plus the rest: about 30 bytes a transfer.
//!
//! Row layout: [`PACKED_ROW_TAG`], then records until the end, each:
//! `kind` (1 byte), `at_ms` (zigzag varint, difference to the record
//! before), `key_id`, `request_id`, `target`, `debit`, `credit` (each a
//! string: varint shared prefix length, varint suffix length, suffix),
//! `amount` (varint), `currency` (3 bytes), then for a hold `timeout_ms`
//! (varint), for a post or void `pending_id` (a string, against the target).
//! Record `i` of a row keyed `first_seq` has seq `first_seq + i`. Decoding
//! trusts nothing: a row that does not parse whole is corrupt.

use peakstack_domain::{Currency, TransferKind};
use peakstack_engine::AuditEvent;

use crate::audit::{transfer_details, AuditRecord, TransferFacts, TransferFactsKind};
use crate::audit_index::target_hash;

/// The first byte of a packed row. JSON rows start with `{` or `[`.
pub const PACKED_ROW_TAG: u8 = 0x01;

const KIND_CREATE: u8 = 0;
const KIND_PENDING: u8 = 1;
const KIND_POST: u8 = 2;
const KIND_VOID: u8 = 3;

/// One encoded row, how many records it holds, and the hash of each
/// record's target ([`crate::audit_index::target_hash`]), taken while the
/// target is at hand so that the index costs no decoding.
#[derive(Debug, Clone)]
pub struct PackedRow {
    pub records: u32,
    pub bytes: Vec<u8>,
    pub target_hashes: Vec<u64>,
}

/// The fields a record's strings are compressed against.
#[derive(Default)]
struct Previous {
    at_ms: u64,
    key_id: String,
    request_id: String,
    target: String,
    debit: String,
    credit: String,
}

impl Previous {
    fn set(field: &mut String, value: &str) {
        field.clear();
        field.push_str(value);
    }
}

/// Packs audit events into rows of at most `max_records_per_row`.
pub struct RowPacker {
    max_records_per_row: u32,
    rows: Vec<PackedRow>,
    current: PackedRow,
    previous: Previous,
}

impl RowPacker {
    pub fn new(max_records_per_row: usize) -> RowPacker {
        assert!(max_records_per_row > 0 && max_records_per_row <= u32::MAX as usize);
        RowPacker {
            max_records_per_row: max_records_per_row as u32,
            rows: Vec::new(),
            current: PackedRow { records: 0, bytes: Vec::new(), target_hashes: Vec::new() },
            previous: Previous::default(),
        }
    }

    pub fn push(&mut self, event: &AuditEvent) {
        if self.current.records == 0 {
            self.current.bytes.clear();
            self.current.bytes.push(PACKED_ROW_TAG);
            self.current.target_hashes.clear();
            self.previous = Previous::default();
        }
        let out = &mut self.current.bytes;
        let previous = &mut self.previous;
        let transfer = &event.transfer;
        let kind = match transfer.kind {
            TransferKind::Single => KIND_CREATE,
            TransferKind::Pending { .. } => KIND_PENDING,
            TransferKind::Post { .. } => KIND_POST,
            TransferKind::Void { .. } => KIND_VOID,
        };
        out.push(kind);
        put_varint(out, zigzag(event.time_ms.wrapping_sub(previous.at_ms) as i64));
        previous.at_ms = event.time_ms;
        for (field, value) in [
            (&mut previous.key_id, &*event.origin.key_id),
            (&mut previous.request_id, &*event.origin.request_id),
            (&mut previous.target, transfer.id.as_str()),
            (&mut previous.debit, transfer.debit_account_id.as_str()),
            (&mut previous.credit, transfer.credit_account_id.as_str()),
        ] {
            put_string(out, field, value);
            Previous::set(field, value);
        }
        put_varint(out, transfer.amount);
        out.extend_from_slice(&transfer.currency.as_bytes());
        match &transfer.kind {
            TransferKind::Single => {}
            TransferKind::Pending { timeout_ms, .. } => put_varint(out, *timeout_ms),
            TransferKind::Post { pending_id, .. } | TransferKind::Void { pending_id } => {
                put_string(out, transfer.id.as_str(), pending_id.as_str())
            }
        }
        self.current.target_hashes.push(target_hash(transfer.id.as_str()));
        self.current.records += 1;
        if self.current.records == self.max_records_per_row {
            self.finish_row();
        }
    }

    fn finish_row(&mut self) {
        if self.current.records > 0 {
            let bytes = std::mem::take(&mut self.current.bytes);
            let target_hashes = std::mem::take(&mut self.current.target_hashes);
            self.rows.push(PackedRow { records: self.current.records, bytes, target_hashes });
            self.current.records = 0;
        }
    }

    /// Every row packed so far (the last one possibly short).
    pub fn finish(mut self) -> Vec<PackedRow> {
        self.finish_row();
        self.rows
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `value` as the prefix it shares with `previous` and the rest.
fn put_string(out: &mut Vec<u8>, previous: &str, value: &str) {
    let shared = previous.bytes().zip(value.bytes()).take_while(|(a, b)| a == b).count();
    // Cut on a character boundary, so both parts are UTF-8 on their own.
    let shared = (0..=shared).rev().find(|&at| value.is_char_boundary(at)).unwrap_or(0);
    put_varint(out, shared as u64);
    put_varint(out, (value.len() - shared) as u64);
    out.extend_from_slice(&value.as_bytes()[shared..]);
}

/// Reads a packed row.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let byte = *self.bytes.get(self.at).ok_or("truncated")?;
        self.at += 1;
        Ok(byte)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 64 bits".to_owned())
    }

    fn take(&mut self, len: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(len).filter(|&end| end <= self.bytes.len()).ok_or("truncated")?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// A string stored against `previous`.
    fn string(&mut self, previous: &str) -> Result<String, String> {
        let shared = usize::try_from(self.varint()?).map_err(|_| "prefix too long")?;
        let suffix_len = usize::try_from(self.varint()?).map_err(|_| "string too long")?;
        let prefix = previous.get(..shared).ok_or("prefix longer than the string it refers to")?;
        let suffix = std::str::from_utf8(self.take(suffix_len)?).map_err(|_| "not UTF-8")?;
        let mut text = String::with_capacity(shared + suffix_len);
        text.push_str(prefix);
        text.push_str(suffix);
        Ok(text)
    }
}

/// The records of a packed row keyed `first_seq`.
pub fn decode(first_seq: u64, bytes: &[u8]) -> Result<Vec<AuditRecord>, String> {
    if bytes.first() != Some(&PACKED_ROW_TAG) {
        return Err("not a packed row".to_owned());
    }
    let mut reader = Reader { bytes, at: 1 };
    let mut records = Vec::new();
    let mut previous = Previous::default();
    while reader.at < bytes.len() {
        let kind = reader.byte()?;
        previous.at_ms = previous.at_ms.wrapping_add(unzigzag(reader.varint()?) as u64);
        previous.key_id = reader.string(&previous.key_id)?;
        previous.request_id = reader.string(&previous.request_id)?;
        previous.target = reader.string(&previous.target)?;
        previous.debit = reader.string(&previous.debit)?;
        previous.credit = reader.string(&previous.credit)?;
        let amount = reader.varint()?;
        let code: [u8; 3] = reader.take(3)?.try_into().map_err(|_| "truncated")?;
        let currency = Currency::from_bytes(code).ok_or("unknown currency")?;
        let kind = match kind {
            KIND_CREATE => TransferFactsKind::Single,
            KIND_PENDING => TransferFactsKind::Pending { timeout_ms: reader.varint()? },
            KIND_POST => TransferFactsKind::Post { pending_id: reader.string(&previous.target)? },
            KIND_VOID => TransferFactsKind::Void { pending_id: reader.string(&previous.target)? },
            other => return Err(format!("unknown record kind {other}")),
        };
        let facts = TransferFacts { debit: &previous.debit, credit: &previous.credit, amount, currency, kind };
        let (action, details) = transfer_details(&facts);
        let seq = first_seq.checked_add(records.len() as u64).ok_or("seq overflow")?;
        records.push(AuditRecord {
            seq,
            at_ms: previous.at_ms,
            key_id: previous.key_id.clone(),
            request_id: previous.request_id.clone(),
            action: action.to_owned(),
            target: previous.target.clone(),
            details,
        });
    }
    if records.is_empty() {
        return Err("a row without records".to_owned());
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peakstack_domain::{Id, Transfer, TransferStatus};
    use peakstack_engine::Origin;

    use super::*;
    use crate::audit::transfer_record;

    fn id(text: &str) -> Id {
        Id::parse(text).unwrap()
    }

    fn event(transfer_id: &str, kind: TransferKind, request_id: &str, time_ms: u64) -> AuditEvent {
        AuditEvent {
            origin: Origin {
                key_id: Arc::from("0123456789abcdef"),
                request_id: Arc::from(request_id),
                idempotency: None,
            },
            time_ms,
            transfer: Transfer {
                id: id(transfer_id),
                debit_account_id: id(&format!("lt-0123456789abcdef-{}", time_ms % 7)),
                credit_account_id: id("lt-0123456789abcdef-4242"),
                amount: time_ms.wrapping_mul(1_000_003) % (1 << 53) + 1,
                currency: Currency::parse(if time_ms.is_multiple_of(2) { "EUR" } else { "JPY" }).unwrap(),
                kind,
                status: TransferStatus::Posted,
                posted_amount: None,
                timestamp_ms: time_ms,
                details: None,
            },
            answered: None,
        }
    }

    /// Packs `events` into rows of at most `max_records_per_row`, expects
    /// rows of `expected_rows` records, and reads back exactly what
    /// [`transfer_record`] makes of each event.
    fn check(events: &[AuditEvent], max_records_per_row: usize, expected_rows: &[u32]) {
        let mut packer = RowPacker::new(max_records_per_row);
        for event in events {
            packer.push(event);
        }
        let rows = packer.finish();
        assert_eq!(rows.iter().map(|row| row.records).collect::<Vec<_>>(), expected_rows);
        let mut seq = 100;
        let mut decoded = Vec::new();
        for row in &rows {
            let records = decode(seq, &row.bytes).unwrap();
            assert_eq!(records.len() as u32, row.records);
            let hashes: Vec<u64> = records.iter().map(|record| target_hash(&record.target)).collect();
            assert_eq!(row.target_hashes, hashes);
            seq += u64::from(row.records);
            decoded.extend(records);
        }
        let expected: Vec<AuditRecord> = events
            .iter()
            .enumerate()
            .map(|(i, event)| AuditRecord { seq: 100 + i as u64, ..transfer_record(event) })
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn rows_read_back_as_the_records_they_pack() {
        let every_kind = [
            event("t1", TransferKind::Single, "req-1", 1_700_000_000_000),
            event("h1", TransferKind::Pending { timeout_ms: 60_000, expires_at_ms: 5 }, "req-2", 1_700_000_000_003),
            event(
                "h1-post",
                TransferKind::Post { pending_id: id("h1"), requested: Some(3) },
                "req-2",
                1_699_999_999_000,
            ),
            event("h2-void", TransferKind::Void { pending_id: id("h2") }, "other", 0),
            event("h3", TransferKind::Single, "req-\u{e9}\u{e9}", u64::MAX),
        ];
        check(&every_kind, 64, &[5]);
        check(&every_kind, 2, &[2, 2, 1]);
        check(&every_kind[..1], 1, &[1]);
        check(&[], 64, &[]);
        let many: Vec<AuditEvent> =
            (0..150).map(|i| event(&format!("lt-0123456789abcdef-t3-{i}"), TransferKind::Single, "r", i)).collect();
        check(&many, 64, &[64, 64, 22]);
    }

    #[test]
    fn a_loadtest_transfer_packs_into_a_few_dozen_bytes() {
        let events: Vec<AuditEvent> = (0..64)
            .map(|i| {
                let request_id = format!("2f1c9a0b3d4e5f60{i:016x}");
                event(
                    &format!("lt-0123456789abcdef-t3-{}", 1000 + i),
                    TransferKind::Single,
                    &request_id,
                    1_700_000_000_000 + i,
                )
            })
            .collect();
        let mut packer = RowPacker::new(64);
        events.iter().for_each(|event| packer.push(event));
        let rows = packer.finish();
        let bytes_per_record = rows[0].bytes.len() / 64;
        assert!(bytes_per_record <= 40, "{bytes_per_record} bytes a record");
    }

    #[test]
    fn corrupt_rows_are_refused() {
        let mut packer = RowPacker::new(64);
        packer.push(&event("t1", TransferKind::Single, "req-1", 5));
        let row = packer.finish().remove(0).bytes;
        for cut in 0..row.len() {
            assert!(decode(1, &row[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = row.clone();
        bad_kind[1] = 9;
        assert!(decode(1, &bad_kind).is_err());
        // A prefix longer than the string before it.
        let mut bad_prefix = row.clone();
        bad_prefix[3] = 5;
        assert!(decode(1, &bad_prefix).is_err());
        assert!(decode(1, b"[]").is_err());
    }
}
