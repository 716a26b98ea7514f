//! A hash index from ids to small integers (an account's or a record's
//! slot), made for the apply loop's access pattern: a batch first asks for
//! the cache line of every id it will look up ([`IdIndex::prefetch`]), then
//! looks them up, so the misses overlap instead of queueing. The standard
//! `HashMap` cannot say where an id's bucket is before it probes it; this
//! table can, because it is the simplest one that works well: open
//! addressing, linear probing, at most half full, deletion by shifting
//! entries back (no tombstones, so lookups stay short however many ids come
//! and go).
//!
//! An entry is 32 bytes (the id inline, its slot, 32 bits of its hash), two
//! per cache line; a probe compares the hash bits before it compares ids,
//! and growing or deleting never hashes an id again.
//! The hash is foldhash with a per-process random seed, so that clients
//! choosing ids cannot aim them at one bucket.

use std::hash::BuildHasher;

use crate::Id;

const EMPTY: u32 = u32::MAX;
const MIN_CAPACITY: usize = 16;

#[derive(Clone)]
struct Entry {
    /// The low 32 bits of the id's hash: its home entry, and a first
    /// check before the ids are compared.
    tag: u32,
    /// The value; [`EMPTY`] for a free entry.
    value: u32,
    id: Id,
}

impl Entry {
    fn empty() -> Entry {
        Entry { tag: 0, value: EMPTY, id: Id::filler() }
    }
}

#[derive(Default)]
pub struct IdIndex {
    entries: Vec<Entry>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl IdIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    fn tag(&self, id: &Id) -> u32 {
        self.hasher.hash_one(id.as_str()) as u32
    }

    fn home(&self, tag: u32) -> usize {
        tag as usize & (self.entries.len() - 1)
    }

    /// Starts bringing in the cache line where a lookup of `id` begins.
    pub fn prefetch(&self, id: &Id) {
        if !self.entries.is_empty() {
            crate::cache::prefetch(&self.entries[self.home(self.tag(id))]);
        }
    }

    /// The probe every operation shares: `Ok(entry)` where `id` is, or
    /// `Err(entry)`, the free entry that ends its probe (where it would go).
    /// The table must have a free entry.
    fn probe(&self, tag: u32, id: &Id) -> Result<usize, usize> {
        let mask = self.entries.len() - 1;
        let mut at = self.home(tag);
        loop {
            let entry = &self.entries[at];
            if entry.value == EMPTY {
                return Err(at);
            }
            if entry.tag == tag && entry.id == *id {
                return Ok(at);
            }
            at = (at + 1) & mask;
        }
    }

    /// Where `id` is, or `None`.
    fn find(&self, id: &Id) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.probe(self.tag(id), id).ok()
    }

    pub fn get(&self, id: &Id) -> Option<u32> {
        self.find(id).map(|at| self.entries[at].value)
    }

    pub fn contains_key(&self, id: &Id) -> bool {
        self.find(id).is_some()
    }

    /// Inserts or replaces; answers the value replaced. One probe.
    pub fn insert(&mut self, id: Id, value: u32) -> Option<u32> {
        self.make_room();
        let tag = self.tag(&id);
        self.insert_tagged(tag, id, value)
    }

    fn insert_tagged(&mut self, tag: u32, id: Id, value: u32) -> Option<u32> {
        match self.probe(tag, &id) {
            Ok(at) => Some(std::mem::replace(&mut self.entries[at].value, value)),
            Err(at) => {
                self.fill(at, Entry { tag, value, id });
                None
            }
        }
    }

    /// The value of `id`, or the one `make` gives, inserted now; and
    /// whether it was inserted. One probe.
    pub fn get_or_insert_with(&mut self, id: Id, make: impl FnOnce() -> u32) -> (u32, bool) {
        self.make_room();
        let tag = self.tag(&id);
        match self.probe(tag, &id) {
            Ok(at) => (self.entries[at].value, false),
            Err(at) => {
                let value = make();
                self.fill(at, Entry { tag, value, id });
                (value, true)
            }
        }
    }

    /// Grows the table if one more entry would fill it past half.
    fn make_room(&mut self) {
        self.reserve(self.len + 1);
    }

    fn fill(&mut self, at: usize, entry: Entry) {
        debug_assert_ne!(entry.value, EMPTY, "u32::MAX marks free entries");
        self.entries[at] = entry;
        self.len += 1;
    }

    /// Removes `id` if `removable` says so of its value; answers the value.
    pub fn remove_if(&mut self, id: &Id, removable: impl FnOnce(u32) -> bool) -> Option<u32> {
        let at = self.find(id)?;
        let value = self.entries[at].value;
        if !removable(value) {
            return None;
        }
        self.remove_at(at);
        Some(value)
    }

    pub fn remove(&mut self, id: &Id) -> Option<u32> {
        self.remove_if(id, |_| true)
    }

    /// Frees entry `at`, shifting back the entries after it that probed
    /// past it, so that every remaining id stays reachable from its home.
    fn remove_at(&mut self, mut at: usize) {
        let mask = self.entries.len() - 1;
        let mut next = (at + 1) & mask;
        loop {
            let entry = &self.entries[next];
            if entry.value == EMPTY {
                break;
            }
            // The entry at `next` may move to the hole at `at` if its home
            // is not in the cyclic range (at, next].
            let home = self.home(entry.tag);
            let distance_to_home = next.wrapping_sub(home) & mask;
            let distance_to_hole = next.wrapping_sub(at) & mask;
            if distance_to_home >= distance_to_hole {
                self.entries.swap(at, next);
                at = next;
            }
            next = (next + 1) & mask;
        }
        self.entries[at] = Entry::empty();
        self.len -= 1;
    }

    /// Makes room for `ids` entries at once, so that the table does not
    /// grow (and move every entry) while it fills up to that.
    pub fn reserve(&mut self, ids: usize) {
        if ids * 2 > self.entries.len() {
            self.grow(ids * 2);
        }
    }

    fn grow(&mut self, at_least: usize) {
        let capacity = at_least.next_power_of_two().max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.entries, vec![Entry::empty(); capacity]);
        self.len = 0;
        for entry in old {
            if entry.value != EMPTY {
                self.insert_tagged(entry.tag, entry.id, entry.value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn id(n: u32) -> Id {
        Id::parse(&format!("id-{n}")).unwrap()
    }

    #[test]
    fn an_entry_is_half_a_cache_line() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    proptest! {
        /// Any sequence of inserts and removals leaves the index answering
        /// exactly what a `HashMap` does (removal shifts entries back; a bug
        /// there strands ids behind a hole).
        #[test]
        fn behaves_as_a_hash_map(ops in proptest::collection::vec((0u8..3, 0u32..300, 0u32..1000), 1..2000)) {
            let mut index = IdIndex::default();
            let mut model: HashMap<u32, u32> = HashMap::new();
            for (op, key, value) in ops {
                match op {
                    0 | 1 => prop_assert_eq!(index.insert(id(key), value), model.insert(key, value)),
                    _ => prop_assert_eq!(index.remove(&id(key)), model.remove(&key)),
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for key in 0..300 {
                prop_assert_eq!(index.get(&id(key)), model.get(&key).copied());
            }
        }
    }

    #[test]
    fn remove_if_asks_before_removing() {
        let mut index = IdIndex::default();
        index.reserve(100);
        for n in 0..100 {
            index.insert(id(n), n);
        }
        assert_eq!(index.remove_if(&id(7), |v| v != 7), None);
        assert_eq!(index.remove_if(&id(7), |v| v == 7), Some(7));
        assert!(!index.contains_key(&id(7)));
        assert_eq!(index.len(), 99);
        // Reserved up front: filling to the reservation did not grow it.
        assert_eq!(index.entries.len(), 256);
        index.prefetch(&id(8));
        assert_eq!(index.get(&id(8)), Some(8));
    }
}
