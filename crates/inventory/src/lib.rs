//! The inventory part: SKUs and their stock, reservations with deadlines,
//! per-buyer purchase limits and flash sales, as a pure state machine that
//! one executor owns for its shards.
//!
//! Invariants, checked after every command that changes a SKU or a sale
//! (a violation panics: it is a bug, and the process stops rather than sell
//! what it does not have):
//! - per SKU: `sold + reserved + on_sale <= stock` (no oversell);
//! - per flash sale: `sold + reserved <= quantity`;
//! - per (SKU or sale, buyer): units sold and reserved never exceed the limit;
//! - a refused command changes nothing.
//!
//! No I/O, no clock (time comes in as `now_ms`), no randomness, no floats.
//! Ids the part assigns (reservations) carry their shard
//! ([`peakstack_domain::AssignedKind`]); the command that makes one says
//! which shard it runs on, so a replay assigns the same ids.

mod branches;
mod codec;
mod gates;
mod model;
mod state;
mod table;

pub use branches::{BranchFence, BranchState, FENCE_RETENTION_MS};
pub use codec::{decode_command, encode_command, CHECKPOINT_FORMAT};
pub use gates::{SaleGate, SaleGates};
pub use model::{
    FlashSaleView, NewFlashSale, NewSku, Reservation, ReservationState, SaleState, SkuView, DEFAULT_PAY_WITHIN_MS,
    MAX_PURCHASE_QUANTITY, MAX_STOCK, MAX_TITLE_LEN,
};
pub use state::{Answer, Command, Inventory, Query, QueryAnswer, Reply, MAX_DUE_PER_TICK, RESERVATION_RETENTION_MS};
