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
//! An entry is 8 bytes: 32 bits of the id's hash and its slot. The id itself
//! stays where it already is, in the slot's account or record, and a probe
//! compares it there (through the `holds` function every call passes) only
//! when the hash bits match: for a new id, the common case, almost never;
//! for an existing one, in memory the caller reads next anyway. With the id
//! inline the entries were 32 bytes: the records' index alone took 32 MiB at
//! 200k records in memory (sized for twice that, half full), now 8 MiB,
//! which the 32 MiB L3 of this machine can hold. Growing or
//! deleting never hashes an id again.
//! The hash is foldhash with a per-process random seed, so that clients
//! choosing ids cannot aim them at one bucket.

use std::hash::BuildHasher;

use crate::Id;

const EMPTY: u32 = u32::MAX;
const MIN_CAPACITY: usize = 16;

#[derive(Clone, Copy)]
struct Entry {
    /// The low 32 bits of the id's hash: its home entry, and a first
    /// check before the ids are compared.
    tag: u32,
    /// The value; [`EMPTY`] for a free entry.
    value: u32,
}

const FREE: Entry = Entry { tag: 0, value: EMPTY };

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

    /// The value of the first entry whose hash bits are `id`'s, without
    /// comparing ids: almost always `id`'s own value. For prefetching what
    /// `id` points to; a wrong guess costs a useless prefetch, nothing else.
    pub fn guess(&self, id: &Id) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let tag = self.tag(id);
        self.probe(tag, |_| true).ok().map(|at| self.entries[at].value)
    }

    /// The probe every operation shares: `Ok(entry)` where `id` is, or
    /// `Err(entry)`, the free entry that ends its probe (where it would go).
    /// `holds(value)` says whether the id behind a value with `id`'s hash
    /// bits is `id`. The table must have a free entry.
    fn probe(&self, tag: u32, holds: impl Fn(u32) -> bool) -> Result<usize, usize> {
        let mask = self.entries.len() - 1;
        let mut at = self.home(tag);
        loop {
            let entry = self.entries[at];
            if entry.value == EMPTY {
                return Err(at);
            }
            if entry.tag == tag && holds(entry.value) {
                return Ok(at);
            }
            at = (at + 1) & mask;
        }
    }

    /// Where `id` is, or `None`.
    fn find(&self, id: &Id, holds: impl Fn(u32) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.probe(self.tag(id), holds).ok()
    }

    /// `id`'s value; `holds(value)` says whether a value is `id`'s.
    pub fn get(&self, id: &Id, holds: impl Fn(u32) -> bool) -> Option<u32> {
        self.find(id, holds).map(|at| self.entries[at].value)
    }

    /// Inserts or replaces; answers the value replaced. One probe.
    pub fn insert(&mut self, id: &Id, value: u32, holds: impl Fn(u32) -> bool) -> Option<u32> {
        self.make_room();
        let tag = self.tag(id);
        match self.probe(tag, holds) {
            Ok(at) => Some(std::mem::replace(&mut self.entries[at].value, value)),
            Err(at) => {
                self.fill(at, Entry { tag, value });
                None
            }
        }
    }

    /// The value of `id`, or the one `make` gives, inserted now; and
    /// whether it was inserted. One probe.
    pub fn get_or_insert_with(
        &mut self,
        id: &Id,
        holds: impl Fn(u32) -> bool,
        make: impl FnOnce() -> u32,
    ) -> (u32, bool) {
        self.make_room();
        let tag = self.tag(id);
        match self.probe(tag, holds) {
            Ok(at) => (self.entries[at].value, false),
            Err(at) => {
                let value = make();
                self.fill(at, Entry { tag, value });
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
    pub fn remove_if(
        &mut self,
        id: &Id,
        holds: impl Fn(u32) -> bool,
        removable: impl FnOnce(u32) -> bool,
    ) -> Option<u32> {
        let at = self.find(id, holds)?;
        let value = self.entries[at].value;
        if !removable(value) {
            return None;
        }
        self.remove_at(at);
        Some(value)
    }

    pub fn remove(&mut self, id: &Id, holds: impl Fn(u32) -> bool) -> Option<u32> {
        self.remove_if(id, holds, |_| true)
    }

    /// Frees entry `at`, shifting back the entries after it that probed
    /// past it, so that every remaining id stays reachable from its home.
    fn remove_at(&mut self, mut at: usize) {
        let mask = self.entries.len() - 1;
        let mut next = (at + 1) & mask;
        loop {
            let entry = self.entries[next];
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
        self.entries[at] = FREE;
        self.len -= 1;
    }

    /// Makes room for `ids` entries at once, so that the table does not
    /// grow (and move every entry) while it fills up to that.
    pub fn reserve(&mut self, ids: usize) {
        if ids * 2 > self.entries.len() {
            self.grow(ids * 2);
        }
    }

    /// Moves every entry into a table of at least `at_least` entries: each
    /// to the first free entry from its home (the ids are distinct, so none
    /// is compared).
    fn grow(&mut self, at_least: usize) {
        let capacity = at_least.next_power_of_two().max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.entries, vec![FREE; capacity]);
        self.len = 0;
        for entry in old {
            if entry.value != EMPTY {
                let at = self.probe(entry.tag, |_| false).expect_err("nothing matches");
                self.fill(at, entry);
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

    /// Ids where the index's users keep them: a value is a slot here.
    #[derive(Default)]
    struct Slab(Vec<Id>);

    impl Slab {
        fn add(&mut self, id: Id) -> u32 {
            self.0.push(id);
            (self.0.len() - 1) as u32
        }

        fn holds<'a>(&'a self, id: &'a Id) -> impl Fn(u32) -> bool + 'a {
            move |value| self.0[value as usize] == *id
        }
    }

    #[test]
    fn an_entry_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 8);
    }

    proptest! {
        /// Any sequence of inserts and removals leaves the index answering
        /// exactly what a `HashMap` does (removal shifts entries back; a bug
        /// there strands ids behind a hole).
        #[test]
        fn behaves_as_a_hash_map(ops in proptest::collection::vec((0u8..3, 0u32..300), 1..2000)) {
            let mut index = IdIndex::default();
            let mut slab = Slab::default();
            let mut model: HashMap<u32, u32> = HashMap::new();
            for (op, key) in ops {
                let id = id(key);
                match op {
                    0 | 1 => {
                        let slot = slab.add(id.clone());
                        prop_assert_eq!(index.insert(&id, slot, slab.holds(&id)), model.insert(key, slot));
                    }
                    _ => prop_assert_eq!(index.remove(&id, slab.holds(&id)), model.remove(&key)),
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for key in 0..300 {
                let id = id(key);
                prop_assert_eq!(index.get(&id, slab.holds(&id)), model.get(&key).copied());
                if let Some(&slot) = model.get(&key) {
                    // The guess is the id's own slot, unless another id has
                    // the same 32 hash bits (rare, and then still a slot).
                    let guess = index.guess(&id).expect("an indexed id has a guess");
                    prop_assert!(guess == slot || index.tag(&slab.0[guess as usize]) == index.tag(&id));
                }
            }
        }
    }

    #[test]
    fn remove_if_asks_before_removing_and_get_or_insert_inserts_once() {
        let mut index = IdIndex::default();
        let mut slab = Slab::default();
        index.reserve(100);
        for n in 0..100 {
            let slot = slab.add(id(n));
            index.insert(&id(n), slot, slab.holds(&id(n)));
        }
        let seven = id(7);
        assert_eq!(index.remove_if(&seven, slab.holds(&seven), |v| v != 7), None);
        assert_eq!(index.remove_if(&seven, slab.holds(&seven), |v| v == 7), Some(7));
        assert_eq!(index.get(&seven, slab.holds(&seven)), None);
        assert_eq!(index.len(), 99);
        // Reserved up front: filling to the reservation did not grow it.
        assert_eq!(index.entries.len(), 256);
        index.prefetch(&id(8));
        assert_eq!(index.get(&id(8), slab.holds(&id(8))), Some(8));
        assert_eq!(index.get_or_insert_with(&id(8), slab.holds(&id(8)), || unreachable!()), (8, false));
        let slot = slab.add(seven.clone());
        assert_eq!(index.get_or_insert_with(&seven, slab.holds(&seven), || slot), (slot, true));
        assert_eq!(index.get(&seven, slab.holds(&seven)), Some(slot));
        // An id whose hash bits match an entry's but which is not its id is
        // not found: the slab decides.
        assert_eq!(index.get(&seven, |_| false), None);
    }
}
