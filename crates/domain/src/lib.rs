//! peakstack's pure domain: money, ids, accounts, transfers and the ledger
//! state one single writer owns.
//!
//! Invariants of this crate: it does no I/O, never reads a clock (time comes
//! in with every call as `now_ms`), uses no randomness, and never uses floats
//! for money. The same inputs always give the same state, so a log of inputs
//! replays to the same ledger.

mod account;
mod balance_sums;
#[cfg(test)]
mod balance_tests;
pub mod cache;
mod chunked;
mod error;
mod id_index;
mod ids;
pub mod ledger;
mod money;
mod owner;
mod record_table;
mod transfer;
pub mod wire;

/// The deadline a branch try carries when the coordinator that drives it
/// keeps its own fences (the engine's TCC): the part holds what it takes
/// until the decision comes, however late, and keeps no fence of its own
/// once decided (the coordinator's answers repeats). A part given any
/// other deadline gives its hold back by itself when it passes.
pub const HELD_UNTIL_DECIDED: u64 = u64::MAX;

pub use account::{Account, AccountChange, AccountFlags, AccountStatus, Balances, Net, NewAccount};
pub use balance_sums::Unbalanced;
pub use error::ErrorCode;
pub use ids::{assigned_shard, fnv1a64, shard_of, AssignedKind, Id, INLINE_ID_LEN, MAX_ID_LEN};
pub use ledger::{Ledger, Side};
pub use money::{Amount, Currency, MAX_TRANSFER_AMOUNT};
pub use owner::Owner;
pub use transfer::{
    Details, Transfer, TransferDetails, TransferKind, TransferRequest, TransferStatus, MAX_REFERENCE_LEN,
};
