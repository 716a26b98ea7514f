//! The transfer records a ledger keeps in memory, by id.
//!
//! A hash index of small entries (id, slot) over a slab of records. The
//! index is what the apply loop probes on every transfer (is this id new?)
//! and what it reshapes when records come and go, so it is kept small: a
//! probe touches one short bucket, and growing or cleaning the table moves
//! 32-byte entries, not whole records. Freed slots are reused, so the slab
//! stays as large as the most records ever held at once.

use crate::Id;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub(crate) struct RecordTable<R> {
    index: HashMap<Id, u32>,
    slots: Vec<Option<R>>,
    free: Vec<u32>,
}

impl<R> Default for RecordTable<R> {
    fn default() -> Self {
        RecordTable { index: HashMap::default(), slots: Vec::new(), free: Vec::new() }
    }
}

impl<R> RecordTable<R> {
    pub fn get(&self, id: &Id) -> Option<&R> {
        let slot = *self.index.get(id)?;
        self.slots[slot as usize].as_ref()
    }

    pub fn get_mut(&mut self, id: &Id) -> Option<&mut R> {
        let slot = *self.index.get(id)?;
        self.slots[slot as usize].as_mut()
    }

    pub fn contains_key(&self, id: &Id) -> bool {
        self.index.contains_key(id)
    }

    /// Inserts or replaces; answers the record replaced.
    pub fn insert(&mut self, id: Id, record: R) -> Option<R> {
        // One probe: this runs for every transfer made.
        let vacant = match self.index.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                return self.slots[*entry.get() as usize].replace(record);
            }
            std::collections::hash_map::Entry::Vacant(vacant) => vacant,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(record);
                slot
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 records in memory");
                self.slots.push(Some(record));
                slot
            }
        };
        vacant.insert(slot);
        None
    }

    /// Removes `id`'s record if `evictable` says so, in one probe.
    pub fn remove_if(&mut self, id: Id, evictable: impl FnOnce(&R) -> bool) -> Option<R> {
        match self.index.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let slot = *entry.get();
                if !self.slots[slot as usize].as_ref().is_some_and(evictable) {
                    return None;
                }
                entry.remove();
                self.free.push(slot);
                self.slots[slot as usize].take()
            }
            std::collections::hash_map::Entry::Vacant(_) => None,
        }
    }

    pub fn remove(&mut self, id: &Id) -> Option<R> {
        let slot = self.index.remove(id)?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &R> {
        self.slots.iter().flatten()
    }

    /// Makes room for `records` in the index at once, so that it does not
    /// grow (and rehash) record by record while the ledger fills up to that.
    pub fn reserve(&mut self, records: usize) {
        self.index.reserve(records.saturating_sub(self.index.len()));
        self.slots.reserve(records.saturating_sub(self.slots.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Id {
        Id::parse(&format!("t{n}")).unwrap()
    }

    #[test]
    fn records_come_and_go_and_slots_are_reused() {
        let mut table: RecordTable<u32> = RecordTable::default();
        for n in 0..100 {
            assert_eq!(table.insert(id(n), n), None);
        }
        assert_eq!(table.insert(id(7), 700), Some(7));
        for n in (0..100).step_by(2) {
            assert_eq!(table.remove(&id(n)), Some(n));
        }
        assert_eq!(table.remove(&id(0)), None);
        assert_eq!(table.len(), 50);
        for n in 100..150 {
            table.insert(id(n), n);
        }
        // Every freed slot was taken again: the slab did not grow.
        assert_eq!(table.slots.len(), 100);
        assert_eq!(table.get(&id(7)), Some(&700));
        assert_eq!(table.get(&id(8)), None);
        *table.get_mut(&id(9)).unwrap() = 90;
        assert_eq!(table.get(&id(9)), Some(&90));
        let mut values: Vec<u32> = table.values().copied().collect();
        values.sort_unstable();
        assert_eq!(values.len(), 100);
        assert!(table.contains_key(&id(149)) && !table.contains_key(&id(2)));
        assert_eq!(table.remove_if(id(9), |v| *v != 90), None);
        assert_eq!(table.remove_if(id(9), |v| *v == 90), Some(90));
        assert_eq!(table.remove_if(id(9), |_| true), None);
        assert_eq!(table.len(), 99);
    }
}
