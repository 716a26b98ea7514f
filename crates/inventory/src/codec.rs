//! The inventory's binary forms: its commands (in the engine's log) and its
//! checkpoint section. Decoding never trusts the bytes.

use peakstack_domain::wire::{CodecError, Reader, Writer};
use peakstack_domain::{Amount, AssignedKind, Currency, Id};

use crate::branches::{BranchFence, BranchState};
use crate::model::{FlashSaleView, NewFlashSale, NewSku, Reservation, ReservationState, SkuView};
use crate::state::{Command, Holder, Inventory};

type Result<T> = std::result::Result<T, CodecError>;

/// The format of the checkpoint section this build writes (its first byte).
pub const CHECKPOINT_FORMAT: u8 = 2;

fn id(r: &mut Reader<'_>) -> Result<Id> {
    Id::parse(r.str()?).ok_or(CodecError("invalid id"))
}

fn option_id(r: &mut Reader<'_>) -> Result<Option<Id>> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(id(r)?)),
        _ => Err(CodecError("invalid option")),
    }
}

fn put_option_id(w: &mut Writer, id: Option<&Id>) {
    match id {
        None => w.u8(0),
        Some(id) => {
            w.u8(1);
            w.str(id.as_str());
        }
    }
}

fn amount(r: &mut Reader<'_>) -> Result<Amount> {
    Amount::new(r.varint()?).ok_or(CodecError("invalid amount"))
}

fn currency(r: &mut Reader<'_>) -> Result<Currency> {
    Currency::from_bytes(r.array::<3>()?).ok_or(CodecError("invalid currency"))
}

fn u32_varint(r: &mut Reader<'_>) -> Result<u32> {
    u32::try_from(r.varint()?).map_err(|_| CodecError("number out of range"))
}

/// A limit of 0 means none (a limit is at least 1).
fn option_limit(r: &mut Reader<'_>) -> Result<Option<u32>> {
    Ok(Some(u32_varint(r)?).filter(|l| *l > 0))
}

fn ids(r: &mut Reader<'_>) -> Result<Vec<Id>> {
    let n = r.len()?;
    (0..n).map(|_| id(r)).collect()
}

fn put_ids(w: &mut Writer, ids: &[Id]) {
    w.varint(ids.len() as u64);
    ids.iter().for_each(|i| w.str(i.as_str()));
}

/// Appends a command's bytes.
pub fn encode_command(command: &Command, w: &mut Writer) {
    match command {
        Command::CreateSku(new) => {
            w.u8(0);
            w.str(new.id.as_str());
            w.str(new.merchant_id.as_str());
            w.str(&new.title);
            w.varint(new.price.get());
            w.buf.extend_from_slice(&new.currency.as_bytes());
            w.varint(new.stock);
            w.varint(u64::from(new.per_buyer_limit.unwrap_or(0)));
        }
        Command::Restock { sku_id, quantity } => {
            w.u8(1);
            w.str(sku_id.as_str());
            w.varint(*quantity);
        }
        Command::Reserve { shard, sku_id, buyer_id, quantity, hold_ms } => {
            w.u8(2);
            w.varint(u64::from(*shard));
            w.str(sku_id.as_str());
            w.str(buyer_id.as_str());
            w.varint(u64::from(*quantity));
            w.varint(*hold_ms);
        }
        Command::Confirm { reservation_id } => {
            w.u8(3);
            w.str(reservation_id.as_str());
        }
        Command::Cancel { reservation_id } => {
            w.u8(4);
            w.str(reservation_id.as_str());
        }
        Command::CreateFlashSale(new) => {
            w.u8(5);
            w.str(new.id.as_str());
            w.str(new.sku_id.as_str());
            w.varint(new.price.get());
            w.varint(new.quantity);
            w.varint(new.starts_at_ms);
            w.varint(new.ends_at_ms);
            w.varint(u64::from(new.per_buyer_limit));
            w.varint(new.pay_within_ms);
        }
        Command::Attempt { shard, sale_id, buyer_id, quantity } => {
            w.u8(6);
            w.varint(u64::from(*shard));
            w.str(sale_id.as_str());
            w.str(buyer_id.as_str());
            w.varint(u64::from(*quantity));
        }
        Command::Expire { reservations, sales } => {
            w.u8(7);
            put_ids(w, reservations);
            put_ids(w, sales);
        }
        Command::TryReserve { txn, shard, sku_id, buyer_id, quantity, deadline_ms } => {
            w.u8(8);
            w.u64(*txn);
            w.varint(u64::from(*shard));
            w.str(sku_id.as_str());
            w.str(buyer_id.as_str());
            w.varint(u64::from(*quantity));
            w.varint(*deadline_ms);
        }
        Command::ConfirmBranch { txn, sku_id } => {
            w.u8(9);
            w.u64(*txn);
            w.str(sku_id.as_str());
        }
        Command::CancelBranch { txn, sku_id } => {
            w.u8(10);
            w.u64(*txn);
            w.str(sku_id.as_str());
        }
        Command::ForgetFences { fences } => {
            w.u8(11);
            w.varint(fences.len() as u64);
            for (txn, sku_id) in fences {
                w.u64(*txn);
                w.str(sku_id.as_str());
            }
        }
        Command::Return { sku_id, buyer_id, quantity } => {
            w.u8(12);
            w.str(sku_id.as_str());
            w.str(buyer_id.as_str());
            w.varint(u64::from(*quantity));
        }
    }
}

pub fn decode_command(r: &mut Reader<'_>) -> Result<Command> {
    Ok(match r.u8()? {
        0 => Command::CreateSku(NewSku {
            id: id(r)?,
            merchant_id: id(r)?,
            title: r.str()?.to_string(),
            price: amount(r)?,
            currency: currency(r)?,
            stock: r.varint()?,
            per_buyer_limit: option_limit(r)?,
        }),
        1 => Command::Restock { sku_id: id(r)?, quantity: r.varint()? },
        2 => Command::Reserve {
            shard: u32_varint(r)?,
            sku_id: id(r)?,
            buyer_id: id(r)?,
            quantity: u32_varint(r)?,
            hold_ms: r.varint()?,
        },
        3 => Command::Confirm { reservation_id: id(r)? },
        4 => Command::Cancel { reservation_id: id(r)? },
        5 => Command::CreateFlashSale(NewFlashSale {
            id: id(r)?,
            sku_id: id(r)?,
            price: amount(r)?,
            quantity: r.varint()?,
            starts_at_ms: r.varint()?,
            ends_at_ms: r.varint()?,
            per_buyer_limit: u32_varint(r)?,
            pay_within_ms: r.varint()?,
        }),
        6 => Command::Attempt { shard: u32_varint(r)?, sale_id: id(r)?, buyer_id: id(r)?, quantity: u32_varint(r)? },
        7 => Command::Expire { reservations: ids(r)?, sales: ids(r)? },
        8 => Command::TryReserve {
            txn: r.u64()?,
            shard: u32_varint(r)?,
            sku_id: id(r)?,
            buyer_id: id(r)?,
            quantity: u32_varint(r)?,
            deadline_ms: r.varint()?,
        },
        9 => Command::ConfirmBranch { txn: r.u64()?, sku_id: id(r)? },
        10 => Command::CancelBranch { txn: r.u64()?, sku_id: id(r)? },
        11 => {
            let n = r.len()?;
            let fences = (0..n).map(|_| Ok((r.u64()?, id(r)?))).collect::<Result<Vec<_>>>()?;
            Command::ForgetFences { fences }
        }
        12 => Command::Return { sku_id: id(r)?, buyer_id: id(r)?, quantity: u32_varint(r)? },
        _ => return Err(CodecError("unknown inventory command")),
    })
}

fn put_state(w: &mut Writer, state: ReservationState) {
    let (tag, at) = match state {
        ReservationState::Reserved => (0, 0),
        ReservationState::Confirmed { at_ms } => (1, at_ms),
        ReservationState::Cancelled { at_ms } => (2, at_ms),
        ReservationState::Expired { at_ms } => (3, at_ms),
    };
    w.u8(tag);
    w.varint(at);
}

fn state(r: &mut Reader<'_>) -> Result<ReservationState> {
    let tag = r.u8()?;
    let at_ms = r.varint()?;
    Ok(match tag {
        0 => ReservationState::Reserved,
        1 => ReservationState::Confirmed { at_ms },
        2 => ReservationState::Cancelled { at_ms },
        3 => ReservationState::Expired { at_ms },
        _ => return Err(CodecError("invalid reservation state")),
    })
}

impl Inventory {
    /// The checkpoint section: a format byte, then SKUs, sales (in map
    /// order: sorting on the apply thread cost more than writing),
    /// reservations (in sequence order), buyers' counts and branch fences;
    /// the deadline indexes are rebuilt from them.
    pub fn encode_checkpoint(&self, w: &mut Writer) {
        w.u8(CHECKPOINT_FORMAT);
        w.varint(self.next_sequence);
        w.varint(self.skus.len() as u64);
        for sku in self.skus.values() {
            w.str(sku.id.as_str());
            w.str(sku.merchant_id.as_str());
            w.str(&sku.title);
            w.varint(sku.price.get());
            w.buf.extend_from_slice(&sku.currency.as_bytes());
            w.varint(u64::from(sku.per_buyer_limit.unwrap_or(0)));
            for n in [sku.stock, sku.initial_stock, sku.sold, sku.reserved, sku.on_sale, sku.created_ms] {
                w.varint(n);
            }
        }
        w.varint(self.sales.len() as u64);
        for sale in self.sales.values() {
            w.str(sale.id.as_str());
            w.str(sale.sku_id.as_str());
            w.varint(sale.price.get());
            w.buf.extend_from_slice(&sale.currency.as_bytes());
            for n in [sale.quantity, sale.sold, sale.reserved, sale.starts_at_ms, sale.ends_at_ms] {
                w.varint(n);
            }
            w.varint(u64::from(sale.per_buyer_limit));
            w.varint(sale.pay_within_ms);
            w.bool(sale.closed);
            w.varint(sale.created_ms);
        }
        w.varint(self.reservations.len() as u64);
        for reservation in self.reservations.values() {
            w.str(reservation.id.as_str());
            w.str(reservation.sku_id.as_str());
            put_option_id(w, reservation.sale_id.as_ref());
            w.str(reservation.buyer_id.as_str());
            w.varint(u64::from(reservation.quantity));
            w.varint(reservation.unit_price.get());
            w.buf.extend_from_slice(&reservation.currency.as_bytes());
            w.varint(reservation.created_ms);
            w.varint(reservation.deadline_ms);
            put_state(w, reservation.state);
        }
        // The buyers' counts are written, not rebuilt: a confirmed
        // reservation is forgotten after its retention, its units still count.
        w.varint(self.buyer_units.len() as u64);
        for ((holder, buyer), count) in &self.buyer_units {
            let (kind, holder) = match holder {
                Holder::Sku(id) => (0, id),
                Holder::Sale(id) => (1, id),
            };
            w.u8(kind);
            w.str(holder.as_str());
            w.str(buyer.as_str());
            w.varint(u64::from(*count));
        }
        w.varint(self.fences.len() as u64);
        for ((txn, sku_id), fence) in &self.fences {
            w.u64(*txn);
            w.str(sku_id.as_str());
            w.u8(match fence.state {
                BranchState::Tried => 0,
                BranchState::Confirmed => 1,
                BranchState::Cancelled => 2,
                BranchState::Suspended => 3,
            });
            put_option_id(w, fence.reservation.as_ref());
            w.varint(fence.forget_at_ms);
        }
        // Since format 2: units held for the engine's transactions.
        w.varint(self.held.len() as u64);
        for ((txn, sku_id), (buyer_id, quantity)) in &self.held {
            w.u64(*txn);
            w.str(sku_id.as_str());
            w.str(buyer_id.as_str());
            w.varint(u64::from(*quantity));
        }
    }

    /// Reads a checkpoint section back, rebuilding the indexes, and checks
    /// every invariant of what it read.
    pub fn decode_checkpoint(r: &mut Reader<'_>) -> Result<Inventory> {
        let format = r.u8()?;
        if format == 0 || format > CHECKPOINT_FORMAT {
            return Err(CodecError("inventory section of an unknown (newer) format"));
        }
        let mut inventory = Inventory::new();
        inventory.next_sequence = r.varint()?;
        for _ in 0..r.len()? {
            let sku = SkuView {
                id: id(r)?,
                merchant_id: id(r)?,
                title: r.str()?.to_string(),
                price: amount(r)?,
                currency: currency(r)?,
                per_buyer_limit: option_limit(r)?,
                stock: r.varint()?,
                initial_stock: r.varint()?,
                sold: r.varint()?,
                reserved: r.varint()?,
                on_sale: r.varint()?,
                created_ms: r.varint()?,
            };
            let within = sku.sold.checked_add(sku.reserved).and_then(|u| u.checked_add(sku.on_sale));
            if within.is_none_or(|u| u > sku.stock) {
                return Err(CodecError("SKU counters beyond its stock"));
            }
            inventory.skus.insert(sku.id.clone(), sku);
        }
        for _ in 0..r.len()? {
            let sale = FlashSaleView {
                id: id(r)?,
                sku_id: id(r)?,
                price: amount(r)?,
                currency: currency(r)?,
                quantity: r.varint()?,
                sold: r.varint()?,
                reserved: r.varint()?,
                starts_at_ms: r.varint()?,
                ends_at_ms: r.varint()?,
                per_buyer_limit: u32_varint(r)?,
                pay_within_ms: r.varint()?,
                closed: r.bool()?,
                created_ms: r.varint()?,
            };
            if sale.sold.checked_add(sale.reserved).is_none_or(|u| u > sale.quantity)
                || !inventory.skus.contains_key(&sale.sku_id)
            {
                return Err(CodecError("flash sale beyond its quantity or without its SKU"));
            }
            if !sale.closed {
                inventory.sale_ends.insert((sale.ends_at_ms, sale.id.clone()));
            }
            inventory.sales.insert(sale.id.clone(), sale);
        }
        for _ in 0..r.len()? {
            let reservation = Reservation {
                id: id(r)?,
                sku_id: id(r)?,
                sale_id: option_id(r)?,
                buyer_id: id(r)?,
                quantity: u32_varint(r)?,
                unit_price: amount(r)?,
                currency: currency(r)?,
                created_ms: r.varint()?,
                deadline_ms: r.varint()?,
                state: state(r)?,
            };
            if !inventory.skus.contains_key(&reservation.sku_id)
                || reservation.sale_id.as_ref().is_some_and(|s| !inventory.sales.contains_key(s))
            {
                return Err(CodecError("reservation without its SKU or sale"));
            }
            if AssignedKind::Reservation.parse(reservation.id.as_str()).is_none() {
                return Err(CodecError("a reservation id that is not one"));
            }
            inventory.index_reservation(&reservation);
            if !inventory.reservations.insert(reservation) {
                return Err(CodecError("a reservation appears twice"));
            }
        }
        for _ in 0..r.len()? {
            let holder = match r.u8()? {
                0 => Holder::Sku(id(r)?),
                1 => Holder::Sale(id(r)?),
                _ => return Err(CodecError("invalid holder")),
            };
            let buyer = id(r)?;
            let count = u32_varint(r)?;
            if count == 0 {
                return Err(CodecError("a buyer's count of zero is not kept"));
            }
            inventory.buyer_units.insert((holder, buyer), count);
        }
        for _ in 0..r.len()? {
            let (txn, sku_id) = (r.u64()?, id(r)?);
            let state = match r.u8()? {
                0 => BranchState::Tried,
                1 => BranchState::Confirmed,
                2 => BranchState::Cancelled,
                3 => BranchState::Suspended,
                _ => return Err(CodecError("invalid branch state")),
            };
            let fence = BranchFence { state, reservation: option_id(r)?, forget_at_ms: r.varint()? };
            if fence.reservation.is_none() != (state == BranchState::Suspended) {
                return Err(CodecError("a branch's reservation does not match its state"));
            }
            inventory.fence_forgets.insert((fence.forget_at_ms, txn, sku_id.clone()));
            inventory.fences.insert((txn, sku_id), fence);
        }
        if format >= 2 {
            for _ in 0..r.len()? {
                let (txn, sku_id, buyer_id, quantity) = (r.u64()?, id(r)?, id(r)?, u32_varint(r)?);
                let within = inventory.skus.get(&sku_id).is_some_and(|s| s.reserved >= u64::from(quantity));
                if quantity == 0 || !within {
                    return Err(CodecError("held units beyond their SKU's reserved units"));
                }
                inventory.held.insert((txn, sku_id), (buyer_id, quantity));
            }
        }
        Ok(inventory)
    }

    /// Puts a reservation read from a checkpoint into the indexes: its
    /// deadline while open, its finish time once final.
    fn index_reservation(&mut self, reservation: &Reservation) {
        match reservation.state.finished_at_ms() {
            None => {
                self.deadlines.insert((reservation.deadline_ms, reservation.id.clone()));
            }
            Some(at_ms) => {
                self.finished.insert((at_ms, reservation.id.clone()));
            }
        }
    }
}
