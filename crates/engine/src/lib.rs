//! peakstack's engine: shards placed on executors, each executor a single
//! writer with its own command log and group commit, and the TCC protocol
//! that carries work across executors.

pub mod archive;
mod background;
pub mod batch_ids;
pub mod checkpoint;
mod checkpointer;
pub mod clock;
pub mod codec;
pub mod executor;
pub mod failstop;
mod flows;
pub mod history;
pub mod layout;
pub mod listing;
pub mod log;
pub mod meta;
pub mod outbox;
pub mod parts;
pub mod protocol;
pub mod runtime;
pub mod tcc;
pub mod test_hooks;
pub mod trade;
pub mod trade_checkout;
mod trade_pricing;
pub mod trade_settlement;
mod writeback;

pub use clock::{Clock, ManualClock, SystemClock};
pub use layout::Layout;
pub use listing::{TransferFilter, TransferPage, TransferSource};
pub use parts::{PartAnswer, PartCommand, PartQuery, PartReply};
pub use peakstack_inventory as inventory;
pub use peakstack_orders as orders;
pub use peakstack_pricing as pricing;
pub use protocol::{AnsweredBalances, AuditBatch, AuditEvent, IdempotencyTag, Origin, TransferOutcome, TransferResult};
pub use runtime::{Engine, EngineConfig, EngineError, Totals};
