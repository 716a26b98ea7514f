//! The state machine: what one executor's inventory holds and how each
//! command changes it. Every check-then-act on stock, a sale or a buyer's
//! count happens here, in the one writer of that data.

use std::collections::BTreeSet;

use peakstack_domain::{AssignedKind, ErrorCode, Id};

use crate::model::{
    FlashSaleView, NewFlashSale, NewSku, Reservation, ReservationState, SkuView, MAX_HOLD_MS, MAX_PURCHASE_QUANTITY,
    MAX_STOCK,
};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Most reservations expired, sales closed or finished reservations
/// forgotten by one `Expire` command.
pub const MAX_DUE_PER_TICK: usize = 4096;
/// How long a finished (confirmed, cancelled, expired) reservation stays
/// readable before it is forgotten: a day, well past any deadline.
pub const RESERVATION_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// A command of the inventory part: logged when it changed state, and
/// replayed through [`Inventory::apply`] with the same `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    CreateSku(NewSku),
    Restock {
        sku_id: Id,
        quantity: u64,
    },
    /// Hold `quantity` units for a buyer for `hold_ms`. `shard` is the SKU's
    /// shard: the reservation's id carries it.
    Reserve {
        shard: u32,
        sku_id: Id,
        buyer_id: Id,
        quantity: u32,
        hold_ms: u64,
    },
    /// Turn a reservation's units into sold ones.
    Confirm {
        reservation_id: Id,
    },
    /// Give a reservation's units back.
    Cancel {
        reservation_id: Id,
    },
    CreateFlashSale(NewFlashSale),
    /// A buyer's try for units of a flash sale; `shard` as in `Reserve`.
    Attempt {
        shard: u32,
        sale_id: Id,
        buyer_id: Id,
        quantity: u32,
    },
    /// Deadlines that passed (found by [`Inventory::due`]): reservations to
    /// expire and sales to close; finished reservations past their
    /// retention are forgotten too.
    Expire {
        reservations: Vec<Id>,
        sales: Vec<Id>,
    },
    /// The try of a global transaction's branch on a SKU (see `branches.rs`):
    /// reserve, held until `deadline_ms` at the latest.
    TryReserve {
        txn: u64,
        shard: u32,
        sku_id: Id,
        buyer_id: Id,
        quantity: u32,
        deadline_ms: u64,
    },
    ConfirmBranch {
        txn: u64,
        sku_id: Id,
    },
    CancelBranch {
        txn: u64,
        sku_id: Id,
    },
    /// Branch fences past their retention (found by [`Inventory::due`]).
    ForgetFences {
        fences: Vec<(u64, Id)>,
    },
    /// Sold units given back by an order that was cancelled or expired
    /// unpaid: they are available again and no longer count against the
    /// buyer's limit. Refused (changing nothing) beyond what was sold.
    Return {
        sku_id: Id,
        buyer_id: Id,
        quantity: u32,
    },
}

impl Command {
    /// The id whose shard runs this command: the SKU's for everything on a
    /// SKU, the sale's SKU for an attempt (see `SaleGates`), the shard
    /// inside a reservation id.
    pub fn routing_id(&self) -> Option<&Id> {
        match self {
            Command::CreateSku(new) => Some(&new.id),
            Command::Restock { sku_id, .. }
            | Command::Reserve { sku_id, .. }
            | Command::TryReserve { sku_id, .. }
            | Command::ConfirmBranch { sku_id, .. }
            | Command::CancelBranch { sku_id, .. }
            | Command::Return { sku_id, .. } => Some(sku_id),
            Command::CreateFlashSale(new) => Some(&new.sku_id),
            Command::Confirm { reservation_id } | Command::Cancel { reservation_id } => Some(reservation_id),
            Command::Attempt { .. } | Command::Expire { .. } | Command::ForgetFences { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Sku { sku: SkuView, created: bool },
    FlashSale { sale: FlashSaleView, created: bool },
    Reservation(Reservation),
    Done,
}

pub type Reply = Result<Answer, ErrorCode>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Sku(Id),
    FlashSale(Id),
    Reservation(Id),
    /// SKUs in id order after `after`, of one merchant or all.
    Skus {
        merchant_id: Option<Id>,
        after: Option<Id>,
        limit: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryAnswer {
    Sku(Option<SkuView>),
    FlashSale(Option<FlashSaleView>),
    Reservation(Option<Reservation>),
    Skus(Vec<SkuView>),
}

/// Whose limit a buyer's units count against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Holder {
    Sku(Id),
    Sale(Id),
}

/// The inventory of one executor's shards.
#[derive(Default, Debug)]
pub struct Inventory {
    pub(crate) skus: HashMap<Id, SkuView>,
    pub(crate) sales: HashMap<Id, FlashSaleView>,
    pub(crate) reservations: crate::table::ReservationTable,
    /// Units sold and reserved per (SKU or sale, buyer), for the limits;
    /// only entries above zero are kept.
    pub(crate) buyer_units: HashMap<(Holder, Id), u32>,
    /// Open reservations by deadline.
    pub(crate) deadlines: BTreeSet<(u64, Id)>,
    /// Open sales by end.
    pub(crate) sale_ends: BTreeSet<(u64, Id)>,
    /// Finished reservations by when they finished, to forget them.
    pub(crate) finished: BTreeSet<(u64, Id)>,
    /// The next reservation's sequence (its id is `rsv_<shard>_<sequence>`).
    pub(crate) next_sequence: u64,
    /// Fences of transactions' branches, by (transaction, SKU).
    pub(crate) fences: HashMap<(u64, Id), crate::branches::BranchFence>,
    /// The fences by when they are forgotten.
    pub(crate) fence_forgets: BTreeSet<(u64, u64, Id)>,
    /// Units held for branches of the engine's own transactions (tried with
    /// `HELD_UNTIL_DECIDED`), by (transaction, SKU): (buyer, units). They
    /// count in the SKU's `reserved` and the buyer's units; no reservation
    /// record or fence is kept for them (the executor's fence is theirs).
    pub(crate) held: HashMap<(u64, Id), (Id, u32)>,
    /// Sales whose counters changed since [`Inventory::take_sale_updates`].
    sale_updates: Vec<Id>,
}

impl Inventory {
    pub fn new() -> Inventory {
        Inventory { next_sequence: 1, ..Inventory::default() }
    }

    /// The same state (what a checkpoint keeps; not the publications due).
    pub fn same_state(&self, other: &Inventory) -> bool {
        self.skus == other.skus
            && self.sales == other.sales
            && self.reservations == other.reservations
            && self.buyer_units == other.buyer_units
            && self.held == other.held
            && self.deadlines == other.deadlines
            && self.sale_ends == other.sale_ends
            && self.finished == other.finished
            && self.next_sequence == other.next_sequence
            && self.fences == other.fences
            && self.fence_forgets == other.fence_forgets
    }

    pub fn sku(&self, id: &Id) -> Option<&SkuView> {
        self.skus.get(id)
    }

    pub fn skus(&self) -> impl Iterator<Item = &SkuView> {
        self.skus.values()
    }

    pub fn sale(&self, id: &Id) -> Option<&FlashSaleView> {
        self.sales.get(id)
    }

    pub fn sales(&self) -> impl Iterator<Item = &FlashSaleView> {
        self.sales.values()
    }

    pub fn reservation(&self, id: &Id) -> Option<&Reservation> {
        self.reservations.get(id)
    }

    pub fn open_reservations(&self) -> usize {
        self.deadlines.len()
    }

    /// Units a buyer holds (sold and reserved) of a SKU outside sales.
    pub fn buyer_units_of_sku(&self, sku_id: &Id, buyer_id: &Id) -> u32 {
        self.buyer_units.get(&(Holder::Sku(sku_id.clone()), buyer_id.clone())).copied().unwrap_or(0)
    }

    /// Units a buyer holds (sold and reserved) in a flash sale.
    pub fn buyer_units_of_sale(&self, sale_id: &Id, buyer_id: &Id) -> u32 {
        self.buyer_units.get(&(Holder::Sale(sale_id.clone()), buyer_id.clone())).copied().unwrap_or(0)
    }

    /// The sales whose counters changed since the last call, each once.
    pub fn take_sale_updates(&mut self) -> Vec<Id> {
        let mut updates = std::mem::take(&mut self.sale_updates);
        updates.sort_unstable();
        updates.dedup();
        updates
    }

    /// The deadlines that passed by `now_ms`, as the commands that handle
    /// them (none when nothing is due).
    pub fn due(&self, now_ms: u64) -> Vec<Command> {
        let mut due: Vec<Command> = self.due_deadlines(now_ms).into_iter().collect();
        let fences = self.due_fences(now_ms);
        if !fences.is_empty() {
            due.push(Command::ForgetFences { fences });
        }
        due
    }

    fn due_deadlines(&self, now_ms: u64) -> Option<Command> {
        let reservations: Vec<Id> = self
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .take(MAX_DUE_PER_TICK)
            .map(|(_, id)| id.clone())
            .collect();
        let sales: Vec<Id> = self
            .sale_ends
            .iter()
            .take_while(|(end, _)| *end <= now_ms)
            .take(MAX_DUE_PER_TICK)
            .map(|(_, id)| id.clone())
            .collect();
        let forget = self.finished.first().is_some_and(|(at, _)| at.saturating_add(RESERVATION_RETENTION_MS) <= now_ms);
        (!reservations.is_empty() || !sales.is_empty() || forget).then_some(Command::Expire { reservations, sales })
    }

    pub fn query(&self, query: &Query) -> QueryAnswer {
        match query {
            Query::Sku(id) => QueryAnswer::Sku(self.skus.get(id).cloned()),
            Query::FlashSale(id) => QueryAnswer::FlashSale(self.sales.get(id).cloned()),
            Query::Reservation(id) => QueryAnswer::Reservation(self.reservations.get(id).cloned()),
            Query::Skus { merchant_id, after, limit } => {
                let mut skus: Vec<&SkuView> = self
                    .skus
                    .values()
                    .filter(|s| merchant_id.as_ref().is_none_or(|m| &s.merchant_id == m))
                    .filter(|s| after.as_ref().is_none_or(|a| &s.id > a))
                    .collect();
                skus.sort_unstable_by(|a, b| a.id.cmp(&b.id));
                QueryAnswer::Skus(skus.into_iter().take(*limit).cloned().collect())
            }
        }
    }

    /// Applies one command at `now_ms`. Returns whether it changed state
    /// (then it must be logged) and the answer. A refusal changes nothing.
    pub fn apply(&mut self, command: &Command, now_ms: u64) -> (bool, Reply) {
        match command {
            Command::CreateSku(new) => self.create_sku(new, now_ms),
            Command::Restock { sku_id, quantity } => self.restock(sku_id, *quantity),
            Command::Return { sku_id, buyer_id, quantity } => self.return_sold(sku_id, buyer_id, *quantity),
            Command::Reserve { shard, sku_id, buyer_id, quantity, hold_ms } => {
                self.reserve(*shard, sku_id, buyer_id, *quantity, *hold_ms, now_ms)
            }
            Command::Confirm { reservation_id } => self.confirm(reservation_id, now_ms),
            Command::Cancel { reservation_id } => self.cancel(reservation_id, now_ms),
            Command::CreateFlashSale(new) => self.create_sale(new, now_ms),
            Command::Attempt { shard, sale_id, buyer_id, quantity } => {
                self.attempt(*shard, sale_id, buyer_id, *quantity, now_ms)
            }
            Command::Expire { reservations, sales } => {
                for id in reservations.iter().take(MAX_DUE_PER_TICK) {
                    self.expire(id, now_ms);
                }
                for id in sales.iter().take(MAX_DUE_PER_TICK) {
                    self.close_sale(id, now_ms);
                }
                self.forget_finished(now_ms);
                (true, Ok(Answer::Done))
            }
            Command::TryReserve { txn, shard, sku_id, buyer_id, quantity, deadline_ms } => {
                self.try_branch(*txn, *shard, sku_id, buyer_id, *quantity, *deadline_ms, now_ms)
            }
            Command::ConfirmBranch { txn, sku_id } => self.confirm_branch(*txn, sku_id, now_ms),
            Command::CancelBranch { txn, sku_id } => self.cancel_branch(*txn, sku_id, now_ms),
            Command::ForgetFences { fences } => {
                self.forget_fences(fences, now_ms);
                (true, Ok(Answer::Done))
            }
        }
    }

    fn create_sku(&mut self, new: &NewSku, now_ms: u64) -> (bool, Reply) {
        if let Err(code) = new.validate() {
            return (false, Err(code));
        }
        if let Some(existing) = self.skus.get(&new.id) {
            return match existing.same_definition(new) {
                true => (false, Ok(Answer::Sku { sku: existing.clone(), created: false })),
                false => (false, Err(ErrorCode::ExistsWithDifferentFields)),
            };
        }
        let sku = SkuView {
            id: new.id.clone(),
            merchant_id: new.merchant_id.clone(),
            title: new.title.clone(),
            price: new.price,
            currency: new.currency,
            per_buyer_limit: new.per_buyer_limit,
            stock: new.stock,
            initial_stock: new.stock,
            sold: 0,
            reserved: 0,
            on_sale: 0,
            created_ms: now_ms,
        };
        self.skus.insert(sku.id.clone(), sku.clone());
        (true, Ok(Answer::Sku { sku, created: true }))
    }

    fn restock(&mut self, sku_id: &Id, quantity: u64) -> (bool, Reply) {
        let Some(sku) = self.skus.get_mut(sku_id) else { return (false, Err(ErrorCode::SkuNotFound)) };
        if quantity == 0 {
            return (false, Err(ErrorCode::InvalidRequest));
        }
        match sku.stock.checked_add(quantity).filter(|s| *s <= MAX_STOCK) {
            Some(stock) => sku.stock = stock,
            None => return (false, Err(ErrorCode::Overflow)),
        }
        sku.assert_within_stock();
        (true, Ok(Answer::Sku { sku: sku.clone(), created: false }))
    }

    fn return_sold(&mut self, sku_id: &Id, buyer_id: &Id, quantity: u32) -> (bool, Reply) {
        let Some(sku) = self.skus.get_mut(sku_id) else { return (false, Err(ErrorCode::SkuNotFound)) };
        if quantity == 0 || sku.sold < u64::from(quantity) {
            return (false, Err(ErrorCode::InvalidRequest));
        }
        sku.sold -= u64::from(quantity);
        sku.assert_within_stock();
        let view = sku.clone();
        let key = (Holder::Sku(sku_id.clone()), buyer_id.clone());
        if let Some(units) = self.buyer_units.get_mut(&key) {
            *units = units.saturating_sub(quantity);
            if *units == 0 {
                self.buyer_units.remove(&key);
            }
        }
        (true, Ok(Answer::Sku { sku: view, created: false }))
    }

    pub(crate) fn reserve(
        &mut self,
        shard: u32,
        sku_id: &Id,
        buyer_id: &Id,
        quantity: u32,
        hold_ms: u64,
        now_ms: u64,
    ) -> (bool, Reply) {
        if !(1..=MAX_HOLD_MS).contains(&hold_ms) {
            return (false, Err(ErrorCode::InvalidRequest));
        }
        let (unit_price, currency) = match self.take_units(sku_id, buyer_id, quantity) {
            Ok(sku) => (sku.price, sku.currency),
            Err(code) => return (false, Err(code)),
        };
        let reservation =
            self.new_reservation(shard, sku_id, None, buyer_id, quantity, unit_price, currency, hold_ms, now_ms);
        (true, Ok(Answer::Reservation(reservation)))
    }

    /// Holds units for a branch of the engine's own transaction: the
    /// checks of a reservation, without its record. A repeat is answered
    /// done and changes nothing.
    pub(crate) fn hold_for_branch(&mut self, txn: u64, sku_id: &Id, buyer_id: &Id, quantity: u32) -> (bool, Reply) {
        if self.held.contains_key(&(txn, sku_id.clone())) {
            return (false, Ok(Answer::Done));
        }
        if let Err(code) = self.take_units(sku_id, buyer_id, quantity) {
            return (false, Err(code));
        }
        self.held.insert((txn, sku_id.clone()), (buyer_id.clone(), quantity));
        (true, Ok(Answer::Done))
    }

    /// Checks `quantity` more units of a SKU for a buyer (the quantity, the
    /// buyer's limit, what is available) and, if they pass, counts them
    /// reserved and the buyer's: the check-then-act of every hold.
    fn take_units(&mut self, sku_id: &Id, buyer_id: &Id, quantity: u32) -> Result<&SkuView, ErrorCode> {
        if !(1..=MAX_PURCHASE_QUANTITY).contains(&quantity) {
            return Err(ErrorCode::InvalidRequest);
        }
        let sku = self.skus.get_mut(sku_id).ok_or(ErrorCode::SkuNotFound)?;
        let holder = (Holder::Sku(sku_id.clone()), buyer_id.clone());
        let units = self.buyer_units.get(&holder).copied().unwrap_or(0);
        if sku.per_buyer_limit.is_some_and(|limit| units + quantity > limit) {
            return Err(ErrorCode::PurchaseLimitExceeded);
        }
        if sku.available() < u64::from(quantity) {
            return Err(ErrorCode::OutOfStock);
        }
        sku.reserved += u64::from(quantity);
        sku.assert_within_stock();
        *self.buyer_units.entry(holder).or_insert(0) += quantity;
        Ok(sku)
    }

    /// Ends a held branch: its units sold (`confirm`) or given back. None
    /// when `(txn, sku)` holds nothing.
    pub(crate) fn end_held(&mut self, txn: u64, sku_id: &Id, confirm: bool) -> Option<(bool, Reply)> {
        let (buyer_id, quantity) = self.held.remove(&(txn, sku_id.clone()))?;
        let sku = self.skus.get_mut(sku_id).expect("held units have their SKU");
        sku.reserved -= u64::from(quantity);
        if confirm {
            sku.sold += u64::from(quantity);
        }
        sku.assert_within_stock();
        if !confirm {
            self.uncount_units((Holder::Sku(sku_id.clone()), buyer_id), quantity);
        }
        Some((true, Ok(Answer::Done)))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_reservation(
        &mut self,
        shard: u32,
        sku_id: &Id,
        sale_id: Option<&Id>,
        buyer_id: &Id,
        quantity: u32,
        unit_price: peakstack_domain::Amount,
        currency: peakstack_domain::Currency,
        hold_ms: u64,
        now_ms: u64,
    ) -> Reservation {
        let id = AssignedKind::Reservation.id(shard, self.next_sequence);
        self.next_sequence += 1;
        let deadline_ms = now_ms.saturating_add(hold_ms);
        let reservation = Reservation {
            id: id.clone(),
            sku_id: sku_id.clone(),
            sale_id: sale_id.cloned(),
            buyer_id: buyer_id.clone(),
            quantity,
            unit_price,
            currency,
            created_ms: now_ms,
            deadline_ms,
            state: ReservationState::Reserved,
        };
        self.deadlines.insert((deadline_ms, id));
        let new = self.reservations.insert(reservation.clone());
        assert!(new, "reservation id {} assigned twice", reservation.id);
        reservation
    }

    pub(crate) fn confirm(&mut self, id: &Id, now_ms: u64) -> (bool, Reply) {
        let Some(reservation) = self.reservations.get(id) else {
            return (false, Err(ErrorCode::ReservationNotFound));
        };
        match reservation.state {
            ReservationState::Confirmed { .. } => return (false, Ok(Answer::Reservation(reservation.clone()))),
            ReservationState::Cancelled { .. } => return (false, Err(ErrorCode::ReservationCancelled)),
            ReservationState::Expired { .. } => return (false, Err(ErrorCode::ReservationExpired)),
            ReservationState::Reserved if reservation.deadline_ms <= now_ms => {
                // Its deadline passed before the expiry ran: it is expired.
                self.expire(id, now_ms);
                return (true, Err(ErrorCode::ReservationExpired));
            }
            ReservationState::Reserved => {}
        }
        let reservation = self.finish(id, ReservationState::Confirmed { at_ms: now_ms });
        let units = u64::from(reservation.quantity);
        let sku = self.skus.get_mut(&reservation.sku_id).expect("a reservation's SKU exists");
        sku.reserved -= units;
        sku.sold += units;
        sku.assert_within_stock();
        if let Some(sale_id) = &reservation.sale_id {
            let sale = self.sales.get_mut(sale_id).expect("a reservation's sale exists");
            sale.reserved -= units;
            sale.sold += units;
            sale.assert_within_quantity();
            self.sale_updates.push(sale_id.clone());
        }
        (true, Ok(Answer::Reservation(reservation)))
    }

    pub(crate) fn cancel(&mut self, id: &Id, now_ms: u64) -> (bool, Reply) {
        let Some(reservation) = self.reservations.get(id) else {
            return (false, Err(ErrorCode::ReservationNotFound));
        };
        match reservation.state {
            ReservationState::Confirmed { .. } => (false, Err(ErrorCode::ReservationConfirmed)),
            // Its units are back already: cancelling again is done.
            ReservationState::Cancelled { .. } | ReservationState::Expired { .. } => {
                (false, Ok(Answer::Reservation(reservation.clone())))
            }
            ReservationState::Reserved => {
                let reservation = self.give_back(id, ReservationState::Cancelled { at_ms: now_ms });
                (true, Ok(Answer::Reservation(reservation)))
            }
        }
    }

    fn expire(&mut self, id: &Id, now_ms: u64) {
        let open = self.reservations.get(id).is_some_and(|r| r.state == ReservationState::Reserved);
        if open {
            self.give_back(id, ReservationState::Expired { at_ms: now_ms });
        }
    }

    /// Ends an open reservation as cancelled or expired: its units go back
    /// to its sale while the sale is open, else to its SKU.
    fn give_back(&mut self, id: &Id, state: ReservationState) -> Reservation {
        let reservation = self.finish(id, state);
        let units = u64::from(reservation.quantity);
        let sku = self.skus.get_mut(&reservation.sku_id).expect("a reservation's SKU exists");
        sku.reserved -= units;
        let holder = match &reservation.sale_id {
            Some(sale_id) => {
                let sale = self.sales.get_mut(sale_id).expect("a reservation's sale exists");
                sale.reserved -= units;
                if !sale.closed {
                    sku.on_sale += units;
                }
                sale.assert_within_quantity();
                self.sale_updates.push(sale_id.clone());
                Holder::Sale(sale_id.clone())
            }
            None => Holder::Sku(reservation.sku_id.clone()),
        };
        sku.assert_within_stock();
        self.uncount_units((holder, reservation.buyer_id.clone()), reservation.quantity);
        reservation
    }

    /// Takes units given back out of a buyer's count (only counts above
    /// zero are kept); they were counted when held.
    fn uncount_units(&mut self, key: (Holder, Id), quantity: u32) {
        let units = self.buyer_units.get_mut(&key).expect("held units are counted");
        *units -= quantity;
        if *units == 0 {
            self.buyer_units.remove(&key);
        }
    }

    /// Moves an open reservation to a final state and out of the deadlines.
    fn finish(&mut self, id: &Id, state: ReservationState) -> Reservation {
        let reservation = self.reservations.get_mut(id).expect("looked up");
        assert_eq!(reservation.state, ReservationState::Reserved, "only an open reservation finishes");
        reservation.state = state;
        let at_ms = state.finished_at_ms().expect("a final state");
        let removed = self.deadlines.remove(&(reservation.deadline_ms, id.clone()));
        assert!(removed, "an open reservation has a deadline");
        self.finished.insert((at_ms, id.clone()));
        reservation.clone()
    }

    fn forget_finished(&mut self, now_ms: u64) {
        for _ in 0..MAX_DUE_PER_TICK {
            match self.finished.first() {
                Some((at, _)) if at.saturating_add(RESERVATION_RETENTION_MS) <= now_ms => {
                    let (_, id) = self.finished.pop_first().expect("looked at");
                    self.reservations.remove(&id);
                }
                _ => return,
            }
        }
    }

    fn create_sale(&mut self, new: &NewFlashSale, now_ms: u64) -> (bool, Reply) {
        if let Err(code) = new.validate() {
            return (false, Err(code));
        }
        if let Some(existing) = self.sales.get(&new.id) {
            return match existing.same_definition(new) {
                true => (false, Ok(Answer::FlashSale { sale: existing.clone(), created: false })),
                false => (false, Err(ErrorCode::ExistsWithDifferentFields)),
            };
        }
        let Some(sku) = self.skus.get_mut(&new.sku_id) else { return (false, Err(ErrorCode::SkuNotFound)) };
        if new.ends_at_ms <= now_ms {
            return (false, Err(ErrorCode::SaleEnded));
        }
        if sku.available() < new.quantity {
            return (false, Err(ErrorCode::OutOfStock));
        }
        sku.on_sale += new.quantity;
        sku.assert_within_stock();
        let sale = FlashSaleView {
            id: new.id.clone(),
            sku_id: new.sku_id.clone(),
            price: new.price,
            currency: sku.currency,
            quantity: new.quantity,
            sold: 0,
            reserved: 0,
            starts_at_ms: new.starts_at_ms,
            ends_at_ms: new.ends_at_ms,
            per_buyer_limit: new.per_buyer_limit,
            pay_within_ms: new.pay_within_ms,
            closed: false,
            created_ms: now_ms,
        };
        self.sale_ends.insert((sale.ends_at_ms, sale.id.clone()));
        self.sales.insert(sale.id.clone(), sale.clone());
        self.sale_updates.push(sale.id.clone());
        (true, Ok(Answer::FlashSale { sale, created: true }))
    }

    /// A buyer's try in a flash sale. The checks run in the order a gate in
    /// front of the executor can repeat without the buyer's count: the
    /// sale's window, then sold out, then the buyer's limit, then stock.
    fn attempt(&mut self, shard: u32, sale_id: &Id, buyer_id: &Id, quantity: u32, now_ms: u64) -> (bool, Reply) {
        if !(1..=MAX_PURCHASE_QUANTITY).contains(&quantity) {
            return (false, Err(ErrorCode::InvalidRequest));
        }
        let Some(sale) = self.sales.get(sale_id) else { return (false, Err(ErrorCode::FlashSaleNotFound)) };
        if now_ms < sale.starts_at_ms {
            return (false, Err(ErrorCode::SaleNotStarted));
        }
        if sale.closed || now_ms >= sale.ends_at_ms {
            return (false, Err(ErrorCode::SaleEnded));
        }
        let remaining = sale.remaining();
        if remaining == 0 {
            return (false, Err(ErrorCode::SoldOut));
        }
        let holder = (Holder::Sale(sale_id.clone()), buyer_id.clone());
        let held = self.buyer_units.get(&holder).copied().unwrap_or(0);
        if held + quantity > sale.per_buyer_limit {
            return (false, Err(ErrorCode::PurchaseLimitExceeded));
        }
        if remaining < u64::from(quantity) {
            return (false, Err(ErrorCode::OutOfStock));
        }
        let (price, pay_within_ms, sku_id) = (sale.price, sale.pay_within_ms, sale.sku_id.clone());
        let sale = self.sales.get_mut(sale_id).expect("looked up");
        sale.reserved += u64::from(quantity);
        sale.assert_within_quantity();
        let sku = self.skus.get_mut(&sku_id).expect("a sale's SKU exists");
        sku.on_sale -= u64::from(quantity);
        sku.reserved += u64::from(quantity);
        sku.assert_within_stock();
        let currency = sku.currency;
        *self.buyer_units.entry(holder).or_insert(0) += quantity;
        self.sale_updates.push(sale_id.clone());
        let reservation = self.new_reservation(
            shard,
            &sku_id,
            Some(sale_id),
            buyer_id,
            quantity,
            price,
            currency,
            pay_within_ms,
            now_ms,
        );
        (true, Ok(Answer::Reservation(reservation)))
    }

    /// A sale's end: what it did not sell or reserve goes back to its SKU.
    fn close_sale(&mut self, id: &Id, now_ms: u64) {
        let Some(sale) = self.sales.get_mut(id) else { return };
        if sale.closed || sale.ends_at_ms > now_ms {
            return;
        }
        let leftover = sale.remaining();
        sale.closed = true;
        self.sale_ends.remove(&(sale.ends_at_ms, id.clone()));
        let sku = self.skus.get_mut(&sale.sku_id).expect("a sale's SKU exists");
        sku.on_sale -= leftover;
        sku.assert_within_stock();
        self.sale_updates.push(id.clone());
    }
}
