//! The parts an executor hosts beside the ledger, and the one place that
//! dispatches to them.
//!
//! Each part is a pure state machine of its own crate (its commands, state,
//! log encoding and checkpoint section); the executor logs its commands as
//! [`Input::Part`](crate::protocol::Input::Part), replays them, checkpoints
//! it as a section and asks it for its deadlines. Nothing here knows what
//! stock is. Adding a part adds a variant to each enum below and an arm to
//! each match, and touches nothing else.

use peakstack_domain::wire::{CodecError, Reader, Writer};
use peakstack_domain::{AssignedKind, ErrorCode, Id};
use peakstack_inventory as inventory;
use peakstack_inventory::{FlashSaleView, Inventory, SaleGates};

use crate::layout::Layout;

/// A command of some part, as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartCommand {
    Inventory(inventory::Command),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartReply {
    Inventory(inventory::Reply),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartQuery {
    Inventory(inventory::Query),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartAnswer {
    Inventory(inventory::QueryAnswer),
}

/// A part's tag in the log and in checkpoint sections. Never reuse one.
const INVENTORY: u8 = 1;

impl PartCommand {
    pub fn encode(&self, w: &mut Writer) {
        match self {
            PartCommand::Inventory(command) => {
                w.u8(INVENTORY);
                inventory::encode_command(command, w);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<PartCommand, CodecError> {
        match r.u8()? {
            INVENTORY => Ok(PartCommand::Inventory(inventory::decode_command(r)?)),
            _ => Err(CodecError("a command of an unknown part (written by a newer peakstack?)")),
        }
    }

    /// The executor that runs this command, or `None` when its id names
    /// nothing it could run on (a reservation id that is not one). A flash
    /// sale's attempt is routed by its gate (see [`route_attempt`]).
    pub fn executor(&self, layout: &Layout, gates: &SaleGates) -> Result<crate::protocol::ExecutorId, ErrorCode> {
        match self {
            PartCommand::Inventory(inventory::Command::Confirm { reservation_id })
            | PartCommand::Inventory(inventory::Command::Cancel { reservation_id }) => {
                reservation_shard(layout, reservation_id)
                    .map(|s| layout.executor_of_shard(s))
                    .ok_or(ErrorCode::ReservationNotFound)
            }
            PartCommand::Inventory(inventory::Command::Attempt { sale_id, .. }) => {
                gates.get(sale_id).map(|gate| layout.executor_of_shard(gate.shard)).ok_or(ErrorCode::FlashSaleNotFound)
            }
            PartCommand::Inventory(command) => {
                let id = command.routing_id().ok_or(ErrorCode::InvalidRequest)?;
                Ok(layout.executor_of_shard(id.shard(layout.shards())))
            }
        }
    }
}

/// The shard a reservation id names, if it is one of this data dir's.
pub fn reservation_shard(layout: &Layout, id: &Id) -> Option<u32> {
    AssignedKind::Reservation.shard_of(id.as_str()).filter(|s| *s < layout.shards())
}

/// Fills in what a command takes from where it runs (the shard whose id a
/// new reservation carries) and checks a flash-sale attempt at its gate.
/// `Err` is the answer, given without the executor.
pub fn prepare(command: &mut PartCommand, layout: &Layout, gates: &SaleGates, now_ms: u64) -> Result<(), ErrorCode> {
    match command {
        PartCommand::Inventory(inventory::Command::Reserve { shard, sku_id, .. }) => {
            *shard = sku_id.shard(layout.shards());
            Ok(())
        }
        PartCommand::Inventory(inventory::Command::Attempt { shard, sale_id, .. }) => {
            let gate = gates.get(sale_id).ok_or(ErrorCode::FlashSaleNotFound)?;
            if let Some(refusal) = gate.refusal(now_ms) {
                return Err(refusal);
            }
            *shard = gate.shard;
            Ok(())
        }
        PartCommand::Inventory(_) => Ok(()),
    }
}

/// Every part of one executor.
#[derive(Debug)]
pub struct Parts {
    pub inventory: Inventory,
}

impl Default for Parts {
    fn default() -> Parts {
        Parts { inventory: Inventory::new() }
    }
}

impl Parts {
    pub fn apply(&mut self, command: &PartCommand, now_ms: u64) -> (bool, PartReply) {
        match command {
            PartCommand::Inventory(command) => {
                let (changed, reply) = self.inventory.apply(command, now_ms);
                (changed, PartReply::Inventory(reply))
            }
        }
    }

    pub fn query(&self, query: &PartQuery) -> PartAnswer {
        match query {
            PartQuery::Inventory(query) => PartAnswer::Inventory(self.inventory.query(query)),
        }
    }

    /// The commands for the deadlines that passed by `now_ms`.
    pub fn due(&self, now_ms: u64) -> Vec<PartCommand> {
        self.inventory.due(now_ms).map(PartCommand::Inventory).into_iter().collect()
    }

    /// What changed since the last call and must be published once the
    /// batch that changed it is durable (see [`Publication::publish`]).
    pub fn take_publication(&mut self) -> Option<Publication> {
        let sales: Vec<FlashSaleView> =
            self.inventory.take_sale_updates().into_iter().filter_map(|id| self.inventory.sale(&id).cloned()).collect();
        (!sales.is_empty()).then_some(Publication { sales })
    }

    /// Everything published, as after a restart.
    pub fn publish_all(&self, layout: &Layout, gates: &SaleGates) {
        for sale in self.inventory.sales() {
            gates.publish(sale, sale.sku_id.shard(layout.shards()));
        }
    }

    /// The checkpoint sections: `[count][tag, length, bytes]...`.
    pub fn encode_checkpoint(&self, w: &mut Writer) {
        let mut section = Writer::default();
        self.inventory.encode_checkpoint(&mut section);
        w.varint(1);
        w.u8(INVENTORY);
        w.varint(section.buf.len() as u64);
        w.buf.extend_from_slice(&section.buf);
    }

    pub fn decode_checkpoint(r: &mut Reader<'_>) -> Result<Parts, CodecError> {
        let mut parts = Parts::default();
        for _ in 0..r.len()? {
            let tag = r.u8()?;
            let len = r.len()?;
            let mut section = Reader::new(r.bytes(len)?);
            match tag {
                INVENTORY => parts.inventory = Inventory::decode_checkpoint(&mut section)?,
                _ => return Err(CodecError("a checkpoint section of an unknown part")),
            }
            if !section.is_empty() {
                return Err(CodecError("trailing bytes in a checkpoint section"));
            }
        }
        Ok(parts)
    }
}

/// Published views of what a batch changed.
pub struct Publication {
    sales: Vec<FlashSaleView>,
}

impl Publication {
    pub fn publish(&self, layout: &Layout, gates: &SaleGates) {
        for sale in &self.sales {
            gates.publish(sale, sale.sku_id.shard(layout.shards()));
        }
    }
}
