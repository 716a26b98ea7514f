//! The engine's API for the parts beside the ledger: route a command to the
//! executor of its data, answer what a gate can answer alone, and gather
//! reads that span executors.

use peakstack_domain::{ErrorCode, Id};
use peakstack_inventory::{self as inventory, SaleGates, SkuView};

use crate::parts::{self, PartAnswer, PartCommand, PartQuery, PartReply};
use crate::protocol::ExecutorId;
use crate::runtime::Engine;

/// Most SKUs one listing page holds.
pub const MAX_SKU_PAGE: usize = 1000;

impl Engine {
    /// The flash sales' published views: a sale's window and what it has
    /// left as of its last durable batch.
    pub fn sale_gates(&self) -> &SaleGates {
        &self.shared.gates
    }

    /// Runs one inventory command where its data lives; answered once
    /// durable. A flash-sale attempt that its gate refuses (not live, sold
    /// out) is answered at once, without the executor.
    pub async fn inventory(&self, command: inventory::Command) -> inventory::Reply {
        match self.part(PartCommand::Inventory(command)).await? {
            PartReply::Inventory(reply) => reply,
            PartReply::Pricing(..) | PartReply::Orders(..) => Err(ErrorCode::Unavailable),
        }
    }

    /// Runs one command of some part where its data lives; answered once durable.
    pub(crate) async fn part(&self, command: PartCommand) -> Result<PartReply, ErrorCode> {
        let (executor, command) = self.route(command)?;
        let rx = self.submit_parts(executor, vec![command], false)?;
        rx.await.map_err(|_| ErrorCode::Unavailable)?.pop().ok_or(ErrorCode::Unavailable)
    }

    /// Many inventory commands from a thread of its own (the benchmark's),
    /// one request per executor; answers in order.
    pub fn inventory_blocking(&self, commands: Vec<inventory::Command>) -> Vec<inventory::Reply> {
        let executors = usize::from(self.layout().executors());
        let mut replies: Vec<inventory::Reply> = vec![Err(ErrorCode::Unavailable); commands.len()];
        let mut groups: Vec<(Vec<usize>, Vec<PartCommand>)> = vec![Default::default(); executors];
        for (index, command) in commands.into_iter().enumerate() {
            match self.route(PartCommand::Inventory(command)) {
                Ok((executor, command)) => {
                    let group = &mut groups[usize::from(executor)];
                    group.0.push(index);
                    group.1.push(command);
                }
                Err(code) => replies[index] = Err(code),
            }
        }
        let mut waits = Vec::new();
        for (executor, (indices, group)) in groups.into_iter().enumerate() {
            if !group.is_empty() {
                if let Ok(rx) = self.submit_parts(executor as ExecutorId, group, true) {
                    waits.push((indices, rx));
                }
            }
        }
        for (indices, rx) in waits {
            let Ok(answers) = rx.blocking_recv() else { continue };
            for (index, answer) in indices.into_iter().zip(answers) {
                if let PartReply::Inventory(reply) = answer {
                    replies[index] = reply;
                }
            }
        }
        replies
    }

    fn route(&self, mut command: PartCommand) -> Result<(ExecutorId, PartCommand), ErrorCode> {
        let layout = self.layout();
        parts::prepare(&mut command, &layout, &self.shared.gates, self.shared.clock.now_ms())?;
        let executor = command.executor(&layout, &self.shared.gates)?;
        Ok((executor, command))
    }

    pub async fn sku(&self, id: &Id) -> Result<Option<SkuView>, ErrorCode> {
        let executor = self.layout().executor_of_id(id);
        match self.inventory_read(executor, inventory::Query::Sku(id.clone())).await? {
            inventory::QueryAnswer::Sku(sku) => Ok(sku),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn flash_sale(&self, id: &Id) -> Result<Option<inventory::FlashSaleView>, ErrorCode> {
        let Some(gate) = self.shared.gates.get(id) else { return Ok(None) };
        let executor = self.layout().executor_of_shard(gate.shard);
        match self.inventory_read(executor, inventory::Query::FlashSale(id.clone())).await? {
            inventory::QueryAnswer::FlashSale(sale) => Ok(sale),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    pub async fn reservation(&self, id: &Id) -> Result<Option<inventory::Reservation>, ErrorCode> {
        let layout = self.layout();
        let Some(shard) = parts::reservation_shard(&layout, id) else { return Ok(None) };
        match self.inventory_read(layout.executor_of_shard(shard), inventory::Query::Reservation(id.clone())).await? {
            inventory::QueryAnswer::Reservation(reservation) => Ok(reservation),
            _ => Err(ErrorCode::Unavailable),
        }
    }

    /// SKUs in id order after `after` (of one merchant, or all), at most
    /// `limit` (bounded by [`MAX_SKU_PAGE`]), over every executor.
    pub async fn skus(
        &self,
        merchant_id: Option<Id>,
        after: Option<Id>,
        limit: usize,
    ) -> Result<Vec<SkuView>, ErrorCode> {
        let limit = limit.min(MAX_SKU_PAGE);
        let mut all = Vec::new();
        for executor in 0..self.layout().executors() {
            let query = inventory::Query::Skus { merchant_id: merchant_id.clone(), after: after.clone(), limit };
            if let inventory::QueryAnswer::Skus(mut page) = self.inventory_read(executor, query).await? {
                all.append(&mut page);
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.truncate(limit);
        Ok(all)
    }

    async fn inventory_read(
        &self,
        executor: ExecutorId,
        query: inventory::Query,
    ) -> Result<inventory::QueryAnswer, ErrorCode> {
        match self.query_part(executor, PartQuery::Inventory(query)).await? {
            PartAnswer::Inventory(answer) => Ok(answer),
            PartAnswer::Pricing(_) | PartAnswer::Orders(_) => Err(ErrorCode::Unavailable),
        }
    }
}
