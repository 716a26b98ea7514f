//! The reservations of one executor, by sequence: a reservation's id is
//! `rsv_<shard>_<sequence>` with the sequence counted per executor, so the
//! live ones are a dense run of sequences, oldest forgotten first. A deque
//! indexed by sequence holds them in about their own size, where a hash map
//! by id took three times that (the key again, empty buckets, rehashing)
//! and made the apply thread's page faults half its time at a million
//! reservations.

use std::collections::VecDeque;

use peakstack_domain::{AssignedKind, Id};

use crate::model::Reservation;

#[derive(Debug, Default)]
pub(crate) struct ReservationTable {
    /// The sequence of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Reservation>>,
    len: usize,
}

fn sequence(id: &Id) -> Option<u64> {
    AssignedKind::Reservation.parse(id.as_str()).map(|(_, sequence)| sequence)
}

impl ReservationTable {
    fn slot(&self, id: &Id) -> Option<usize> {
        let index = sequence(id)?.checked_sub(self.base)?;
        usize::try_from(index).ok().filter(|i| *i < self.slots.len())
    }

    pub(crate) fn get(&self, id: &Id) -> Option<&Reservation> {
        // The id names its shard too: the whole id must match.
        self.slots.get(self.slot(id)?)?.as_ref().filter(|r| r.id == *id)
    }

    pub(crate) fn get_mut(&mut self, id: &Id) -> Option<&mut Reservation> {
        let slot = self.slot(id)?;
        self.slots.get_mut(slot)?.as_mut().filter(|r| r.id == *id)
    }

    /// Puts a reservation in its sequence's slot; false if one is there.
    pub(crate) fn insert(&mut self, reservation: Reservation) -> bool {
        let sequence = sequence(&reservation.id).expect("a reservation's id is an assigned one");
        if self.slots.is_empty() {
            self.base = sequence;
        }
        while sequence < self.base {
            self.slots.push_front(None);
            self.base -= 1;
        }
        let index = usize::try_from(sequence - self.base).expect("sequences of live reservations are close");
        if index >= self.slots.len() {
            self.slots.resize(index + 1, None);
        }
        if self.slots[index].is_some() {
            return false;
        }
        self.slots[index] = Some(reservation);
        self.len += 1;
        true
    }

    pub(crate) fn remove(&mut self, id: &Id) -> Option<Reservation> {
        let slot = self.slot(id)?;
        let removed = self.slots[slot].take_if(|r| r.id == *id)?;
        self.len -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(removed)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// In sequence order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Reservation> {
        self.slots.iter().flatten()
    }
}

impl PartialEq for ReservationTable {
    fn eq(&self, other: &ReservationTable) -> bool {
        self.len == other.len && self.values().eq(other.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReservationState;
    use peakstack_domain::{Amount, Currency};

    fn reservation(shard: u32, sequence: u64) -> Reservation {
        Reservation {
            id: AssignedKind::Reservation.id(shard, sequence),
            sku_id: Id::parse("s").unwrap(),
            sale_id: None,
            buyer_id: Id::parse("b").unwrap(),
            quantity: 1,
            unit_price: Amount::new(1).unwrap(),
            currency: Currency::parse("USD").unwrap(),
            created_ms: 0,
            deadline_ms: 1,
            state: ReservationState::Reserved,
        }
    }

    #[test]
    fn slots_by_sequence_and_the_whole_id_must_match() {
        let mut table = ReservationTable::default();
        assert!(table.insert(reservation(3, 10)));
        assert!(table.insert(reservation(5, 12)));
        assert!(table.insert(reservation(3, 8)), "an older sequence goes in front");
        assert!(!table.insert(reservation(4, 10)), "one reservation per sequence");
        let id = |shard, sequence| AssignedKind::Reservation.id(shard, sequence);
        assert!(table.get(&id(3, 10)).is_some());
        assert!(table.get(&id(4, 10)).is_none(), "the same sequence on another shard is another id");
        assert!(table.get(&id(3, 9)).is_none() && table.get(&id(3, 99)).is_none());
        assert!(table.get(&Id::parse("rsv_x").unwrap()).is_none());
        assert_eq!(table.len(), 3);
        assert!(table.remove(&id(3, 8)).is_some());
        assert!(table.remove(&id(3, 8)).is_none());
        assert_eq!((table.base, table.len()), (10, 2), "the front's empty slots go");
        let order: Vec<_> = table.values().map(|r| r.id.to_string()).collect();
        assert_eq!(order, ["rsv_3_10", "rsv_5_12"]);
    }
}
