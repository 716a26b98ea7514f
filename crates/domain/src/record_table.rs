//! The transfer records a ledger keeps in memory, by id.
//!
//! A hash index of small entries (hash bits, slot) over a slab of records,
//! each record holding its own id ([`Keyed`]). The index is what the apply
//! loop probes on every transfer (is this id new?) and what it reshapes
//! when records come and go, so it is kept small: a probe touches one short
//! bucket, and growing or cleaning the table moves 8-byte entries, not
//! whole records. Freed slots are reused, so the slab stays as large as the
//! most records ever held at once.
//!
//! The slab is a [`ChunkedVec`]: a checkpoint takes the records with
//! [`RecordTable::share`] in a few pointer copies, and the apply loop copies
//! a chunk only when it writes to one the checkpoint still reads.

use crate::chunked::ChunkedVec;
use crate::id_index::IdIndex;
use crate::Id;

/// A record that knows its id: the index keeps none, it compares the id
/// in the record.
pub(crate) trait Keyed {
    fn key(&self) -> &Id;
}

/// Whether `slot` holds the record of `id`.
fn holds<'a, R: Keyed + Clone>(slots: &'a ChunkedVec<Option<R>>, id: &'a Id) -> impl Fn(u32) -> bool + 'a {
    move |slot| slots[slot as usize].as_ref().is_some_and(|r| r.key() == id)
}

pub(crate) struct RecordTable<R> {
    index: IdIndex,
    slots: ChunkedVec<Option<R>>,
    free: Vec<u32>,
}

impl<R> Default for RecordTable<R> {
    fn default() -> Self {
        RecordTable { index: IdIndex::default(), slots: ChunkedVec::default(), free: Vec::new() }
    }
}

impl<R: Clone + Keyed> RecordTable<R> {
    pub fn get(&self, id: &Id) -> Option<&R> {
        let slot = self.index.get(id, holds(&self.slots, id))?;
        self.slots[slot as usize].as_ref()
    }

    pub fn get_mut(&mut self, id: &Id) -> Option<&mut R> {
        let slot = self.index.get(id, holds(&self.slots, id))?;
        self.slots[slot as usize].as_mut()
    }

    /// Starts bringing in the index line a lookup of `id` reads.
    pub fn prefetch(&self, id: &Id) {
        self.index.prefetch(id);
    }

    /// Looks `id` up (by its hash bits only: see [`IdIndex::guess`]) and
    /// starts bringing its record into the cache.
    pub fn prefetch_record(&self, id: &Id) {
        if let Some(Some(record)) = self.index.guess(id).map(|slot| &self.slots[slot as usize]) {
            crate::cache::prefetch_all(record);
        }
    }

    pub fn contains_key(&self, id: &Id) -> bool {
        self.get(id).is_some()
    }

    /// Inserts or replaces the record of `record`'s id; answers the record
    /// replaced.
    pub fn insert(&mut self, record: R) -> Option<R> {
        // One probe: this runs for every transfer made.
        let (free, slots) = (&mut self.free, &self.slots);
        let mut grow_slab = false;
        let id = record.key();
        let (slot, inserted) = self.index.get_or_insert_with(id, holds(slots, id), || match free.pop() {
            Some(slot) => slot,
            None => {
                grow_slab = true;
                u32::try_from(slots.len()).expect("fewer than 2^32 records in memory")
            }
        });
        if grow_slab {
            self.slots.push(None);
        }
        let previous = self.slots[slot as usize].replace(record);
        debug_assert_eq!(previous.is_none(), inserted);
        previous
    }

    /// Removes `id`'s record if `evictable` says so, in one probe.
    pub fn remove_if(&mut self, id: Id, evictable: impl FnOnce(&R) -> bool) -> Option<R> {
        let slots = &self.slots;
        let slot = self
            .index
            .remove_if(&id, holds(slots, &id), |slot| slots[slot as usize].as_ref().is_some_and(evictable))?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    pub fn remove(&mut self, id: &Id) -> Option<R> {
        let slot = self.index.remove(id, holds(&self.slots, id))?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &R> {
        self.slots.iter().flatten()
    }

    /// Every record as it is now, whatever the table does later (a few
    /// pointer copies; see [`ChunkedVec::share`]).
    pub fn share(&self) -> ChunkedVec<Option<R>> {
        self.slots.share()
    }

    /// Makes room for `records` in the index at once, so that it does not
    /// grow (and rehash) record by record while the ledger fills up to that.
    pub fn reserve(&mut self, records: usize) {
        self.index.reserve(records);
        self.slots.reserve(records.saturating_sub(self.slots.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Id {
        Id::parse(&format!("t{n}")).unwrap()
    }

    /// A record of the test: its id and a number.
    #[derive(Clone, Debug, PartialEq)]
    struct R(Id, u32);

    impl Keyed for R {
        fn key(&self) -> &Id {
            &self.0
        }
    }

    fn r(n: u32, value: u32) -> R {
        R(id(n), value)
    }

    #[test]
    fn records_come_and_go_and_slots_are_reused() {
        let mut table: RecordTable<R> = RecordTable::default();
        for n in 0..100 {
            assert_eq!(table.insert(r(n, n)), None);
        }
        assert_eq!(table.insert(r(7, 700)), Some(r(7, 7)));
        for n in (0..100).step_by(2) {
            assert_eq!(table.remove(&id(n)), Some(r(n, n)));
        }
        assert_eq!(table.remove(&id(0)), None);
        assert_eq!(table.len(), 50);
        for n in 100..150 {
            table.insert(r(n, n));
        }
        // Every freed slot was taken again: the slab did not grow.
        assert_eq!(table.slots.len(), 100);
        assert_eq!(table.get(&id(7)), Some(&r(7, 700)));
        assert_eq!(table.get(&id(8)), None);
        table.get_mut(&id(9)).unwrap().1 = 90;
        assert_eq!(table.get(&id(9)), Some(&r(9, 90)));
        let mut values: Vec<u32> = table.values().map(|r| r.1).collect();
        values.sort_unstable();
        assert_eq!(values.len(), 100);
        assert!(table.contains_key(&id(149)) && !table.contains_key(&id(2)));
        assert_eq!(table.remove_if(id(9), |v| v.1 != 90), None);
        assert_eq!(table.remove_if(id(9), |v| v.1 == 90), Some(r(9, 90)));
        assert_eq!(table.remove_if(id(9), |_| true), None);
        assert_eq!(table.len(), 99);
    }
}
