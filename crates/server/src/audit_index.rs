//! The audit log's index by target: which seqs may hold records of a
//! target, so that `GET /v1/audit?target=X` reads a few rows instead of
//! scanning the log.
//!
//! A redb table keyed by `(hash, seq)` per record would cost one B-tree
//! insert per transfer at random places of a large tree: every insert of
//! a write group dirties its own leaf page (under `loadtest --batch 1000`
//! thousands of pages, megabytes copied per 5 ms group). Instead each
//! write group appends one entry per hash bucket ([`BUCKETS`]), keyed
//! `(bucket, last seq in the entry)`, holding the packed `(tag, seq)` pairs
//! of its records in that bucket: a group touches at most [`BUCKETS`]
//! leaves, each at the tail of its bucket, and the pairs cost 8 bytes a
//! record. A query reads the entries of one bucket after its cursor
//! (1/[`BUCKETS`] of the index), keeps the seqs whose tag matches, and
//! reads those records; it compares the target itself, so a collision of
//! hashes only costs a row read, never a wrong record.
//!
//! Entry layout: the entry's first seq (u64 LE), then per record in seq
//! order: the tag (u32 LE, the hash's high half) and the seq's offset from
//! the first one (u32 LE). The hash is part of the file format: it must
//! never change (see the pinned values in the tests).

/// Hash buckets; every write group writes at most one entry per bucket.
/// More make a query read less of the index, but each is an insert of its
/// own for a busy group (redb costs about a microsecond an insert): with 64
/// the store's thread spent 0.40 us per transfer under `loadtest --batch
/// 1000` against 0.26 without the index; with 16, 0.36 (ARCHITECTURE.md).
pub const BUCKETS: u16 = 16;

const PAIR_BYTES: usize = 8;
const HEADER_BYTES: usize = 8;

/// A stable 64-bit hash of a target (word at a time, then murmur3's
/// finalizer so that both the bucket's low bits and the tag's high ones
/// depend on every byte). Stored on disk: never change it.
pub fn target_hash(target: &str) -> u64 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |hash: u64, word: u64| (hash.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    let bytes = target.as_bytes();
    let mut hash = bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        hash = mix(hash, u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        hash = mix(hash, u64::from_le_bytes(word));
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The bucket and the tag of a hash.
pub fn bucket_and_tag(hash: u64) -> (u16, u32) {
    ((hash % u64::from(BUCKETS)) as u16, (hash >> 32) as u32)
}

/// Gathers the `(hash, seq)` of one write group's records, then gives
/// the entries to insert. Kept by the writer and reused (cleared) across
/// groups.
pub struct IndexBuilder {
    buckets: Vec<Vec<(u32, u64)>>,
}

impl Default for IndexBuilder {
    fn default() -> Self {
        IndexBuilder { buckets: vec![Vec::new(); usize::from(BUCKETS)] }
    }
}

impl IndexBuilder {
    /// Seqs must come in ascending order.
    pub fn push(&mut self, hash: u64, seq: u64) {
        let (bucket, tag) = bucket_and_tag(hash);
        let pairs = &mut self.buckets[usize::from(bucket)];
        debug_assert!(pairs.last().is_none_or(|&(_, last)| last < seq), "seqs out of order");
        pairs.push((tag, seq));
    }

    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(Vec::clear);
    }

    /// The entries (`(bucket, last seq)`, bytes), in key order, and clears
    /// the builder. An entry whose seqs would span more than a u32 of
    /// offsets is split.
    pub fn drain(&mut self) -> Vec<((u16, u64), Vec<u8>)> {
        let mut entries = Vec::new();
        for (bucket, pairs) in self.buckets.iter_mut().enumerate() {
            let bucket = bucket as u16;
            let mut rest = pairs.as_slice();
            while let Some(&(_, first_seq)) = rest.first() {
                let len = rest.iter().take_while(|&&(_, seq)| seq - first_seq <= u64::from(u32::MAX)).count();
                let (entry, later) = rest.split_at(len);
                let mut bytes = Vec::with_capacity(HEADER_BYTES + PAIR_BYTES * entry.len());
                bytes.extend_from_slice(&first_seq.to_le_bytes());
                for &(tag, seq) in entry {
                    bytes.extend_from_slice(&tag.to_le_bytes());
                    bytes.extend_from_slice(&((seq - first_seq) as u32).to_le_bytes());
                }
                entries.push(((bucket, entry[entry.len() - 1].1), bytes));
                rest = later;
            }
            pairs.clear();
        }
        entries
    }
}

/// How many pairs an entry holds, and the seqs of those whose tag is
/// `tag`, ascending. An entry that does not parse is corrupt.
pub fn matching_seqs(entry: &[u8], tag: u32, last_seq: u64) -> Result<(usize, Vec<u64>), String> {
    let (header, pairs) = entry.split_first_chunk::<HEADER_BYTES>().ok_or("index entry too short")?;
    if pairs.is_empty() || !pairs.len().is_multiple_of(PAIR_BYTES) {
        return Err(format!("index entry of {} bytes", entry.len()));
    }
    let first_seq = u64::from_le_bytes(*header);
    let mut seqs = Vec::new();
    let mut previous = None;
    for pair in pairs.chunks_exact(PAIR_BYTES) {
        let offset = u32::from_le_bytes(pair[4..].try_into().expect("4 bytes"));
        let seq = first_seq.checked_add(u64::from(offset)).ok_or("index entry seq overflow")?;
        if previous.is_some_and(|previous| previous >= seq) {
            return Err("index entry seqs out of order".to_owned());
        }
        previous = Some(seq);
        if u32::from_le_bytes(pair[..4].try_into().expect("4 bytes")) == tag {
            seqs.push(seq);
        }
    }
    if previous != Some(last_seq) {
        return Err(format!("index entry keyed {last_seq} ends at {previous:?}"));
    }
    Ok((pairs.len() / PAIR_BYTES, seqs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned_because_it_is_stored() {
        assert_eq!(target_hash(""), 0);
        assert_eq!(target_hash("t1"), target_hash("t1"));
        assert_ne!(target_hash("t1"), target_hash("t2"));
        assert_ne!(target_hash("abcdefgh"), target_hash("abcdefgh\0"));
        let pinned: Vec<u64> = ["t1", "lt-0123456789abcdef-t3-1000"].iter().map(|t| target_hash(t)).collect();
        assert_eq!(pinned, vec![572_464_422_511_050_357, 14_877_392_594_744_848_171]);
    }

    #[test]
    fn entries_hold_the_seqs_of_their_bucket_in_order() {
        let mut builder = IndexBuilder::default();
        let targets = ["a", "b", "a", "c", "a"];
        for (seq, target) in (10..).zip(targets) {
            builder.push(target_hash(target), seq);
        }
        // A seq too far from the entry's first to be an offset: a new entry.
        let far = 10 + u64::from(u32::MAX) + 1;
        builder.push(target_hash("a"), far);
        let entries = builder.drain();
        let (bucket, tag) = bucket_and_tag(target_hash("a"));
        let of_a: Vec<_> = entries.iter().filter(|((b, _), _)| *b == bucket).collect();
        assert_eq!(of_a.len(), 2);
        let ((_, last), bytes) = of_a[0];
        let (pairs, seqs) = matching_seqs(bytes, tag, *last).unwrap();
        assert!(pairs >= 3);
        assert_eq!(seqs, vec![10, 12, 14]);
        assert_eq!(matching_seqs(&of_a[1].1, tag, far).unwrap(), (1, vec![far]));
        assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
        assert!(builder.drain().is_empty(), "drained");
        // Corrupt entries are refused.
        assert!(matching_seqs(&bytes[..bytes.len() - 1], tag, *last).is_err());
        assert!(matching_seqs(&bytes[..HEADER_BYTES], tag, *last).is_err());
        assert!(matching_seqs(bytes, tag, *last + 1).is_err());
    }
}
