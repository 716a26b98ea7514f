//! Running sums of a ledger's balances per currency, for the assertion
//! after every batch that the ledger still balances (TigerBeetle-style: a
//! broken invariant on money stops the process rather than spreads).
//!
//! Every booking on an account adds to its currency's sums as well, so the
//! check is a comparison per currency, not a scan of the accounts. Every
//! movement is booked on two accounts of one ledger (a client account and
//! its counterpart or the shard's clearing account), each side in the same
//! input, so after each input debits equal credits, pending and posted
//! apart. The sums wrap (mod 2^128): the totals over many accounts may pass
//! what one account can hold, and a one-sided booking of any amount below
//! 2^128 still shows.

use crate::{Balances, Currency, Side};

/// The sums of one currency: a [`Balances`] over all the ledger's accounts.
#[derive(Clone, Debug, Default)]
pub struct BalanceSums {
    /// Few currencies per ledger: a linear search beats hashing here.
    by_currency: Vec<(Currency, Balances)>,
}

/// A currency whose debits and credits no longer agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the ledger does not balance in {currency}: debits pending {} / posted {}, credits pending {} / posted {} (sums mod 2^128)",
    sums.debits_pending, sums.debits_posted, sums.credits_pending, sums.credits_posted
)]
pub struct Unbalanced {
    pub currency: Currency,
    pub sums: Balances,
}

impl BalanceSums {
    fn of(&mut self, currency: Currency) -> &mut Balances {
        match self.by_currency.iter().position(|(c, _)| *c == currency) {
            Some(at) => &mut self.by_currency[at].1,
            None => {
                self.by_currency.push((currency, Balances::default()));
                &mut self.by_currency.last_mut().expect("just pushed").1
            }
        }
    }

    /// Adds an account's balances (a ledger rebuilt from a snapshot).
    pub fn add_account(&mut self, currency: Currency, b: &Balances) {
        let sums = self.of(currency);
        sums.debits_pending = sums.debits_pending.wrapping_add(b.debits_pending);
        sums.debits_posted = sums.debits_posted.wrapping_add(b.debits_posted);
        sums.credits_pending = sums.credits_pending.wrapping_add(b.credits_pending);
        sums.credits_posted = sums.credits_posted.wrapping_add(b.credits_posted);
    }

    /// A hold of `held` on `side` is resolved: it leaves pending, and
    /// `posted` of it arrives in posted.
    pub fn settle(&mut self, currency: Currency, side: Side, held: u64, posted: u64) {
        let sums = self.of(currency);
        let (pending, total) = match side {
            Side::Debit => (&mut sums.debits_pending, &mut sums.debits_posted),
            Side::Credit => (&mut sums.credits_pending, &mut sums.credits_posted),
        };
        *pending = pending.wrapping_sub(u128::from(held));
        *total = total.wrapping_add(u128::from(posted));
    }

    /// `amount` is held on `side`.
    pub fn hold(&mut self, currency: Currency, side: Side, amount: u64) {
        let sums = self.of(currency);
        let pending = match side {
            Side::Debit => &mut sums.debits_pending,
            Side::Credit => &mut sums.credits_pending,
        };
        *pending = pending.wrapping_add(u128::from(amount));
    }

    /// `amount` is posted on `side` directly (a local transfer).
    pub fn post(&mut self, currency: Currency, side: Side, amount: u64) {
        self.settle(currency, side, 0, amount);
    }

    /// Whether debits equal credits in every currency, pending and posted.
    pub fn check(&self) -> Result<(), Unbalanced> {
        match self
            .by_currency
            .iter()
            .find(|(_, s)| s.debits_pending != s.credits_pending || s.debits_posted != s.credits_posted)
        {
            Some(&(currency, sums)) => Err(Unbalanced { currency, sums }),
            None => Ok(()),
        }
    }
}
