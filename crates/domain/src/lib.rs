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
