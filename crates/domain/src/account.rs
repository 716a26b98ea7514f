//! Accounts and their balances.

use crate::{Currency, ErrorCode, Id, Owner};

/// Account constraints, as a small bit set (stable bits: they are logged).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct AccountFlags(u8);

impl AccountFlags {
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: AccountFlags = AccountFlags(1);
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: AccountFlags = AccountFlags(2);
    /// State bits, set by freeze and close (never by a client's create):
    /// kept in the flags byte that every booking reads already, so the
    /// check costs no extra cache line, and data written before them reads
    /// as open.
    pub const FROZEN: AccountFlags = AccountFlags(4);
    pub const CLOSED: AccountFlags = AccountFlags(8);
    const CONSTRAINTS: u8 = 3;
    const STATE: u8 = 4 | 8;
    const KNOWN: u8 = Self::CONSTRAINTS | Self::STATE;

    pub const fn empty() -> AccountFlags {
        AccountFlags(0)
    }

    pub fn from_bits(bits: u8) -> Option<AccountFlags> {
        (bits & !Self::KNOWN == 0).then_some(AccountFlags(bits))
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn contains(self, other: AccountFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: AccountFlags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: AccountFlags) {
        self.0 &= !other.0;
    }

    /// The constraint bits only (what a client chose; the state bits are not).
    pub fn constraints(self) -> AccountFlags {
        AccountFlags(self.0 & Self::CONSTRAINTS)
    }

    /// Parses the API's flag names.
    pub fn from_name(name: &str) -> Option<AccountFlags> {
        match name {
            "debits_must_not_exceed_credits" => Some(Self::DEBITS_MUST_NOT_EXCEED_CREDITS),
            "credits_must_not_exceed_debits" => Some(Self::CREDITS_MUST_NOT_EXCEED_DEBITS),
            _ => None,
        }
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.contains(Self::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            names.push("debits_must_not_exceed_credits");
        }
        if self.contains(Self::CREDITS_MUST_NOT_EXCEED_DEBITS) {
            names.push("credits_must_not_exceed_debits");
        }
        names
    }
}

/// Where an account is in its life: open, frozen (no new movements; can be
/// unfrozen) or closed (at zero, refuses everything, for ever).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccountStatus {
    Open,
    Frozen,
    Closed,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Open => "open",
            AccountStatus::Frozen => "frozen",
            AccountStatus::Closed => "closed",
        }
    }
}

/// A change of an account's status (see [`AccountStatus`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccountChange {
    Freeze,
    Unfreeze,
    Close,
}

impl AccountChange {
    /// Stable one-byte tag for the log.
    pub fn tag(self) -> u8 {
        match self {
            AccountChange::Freeze => 0,
            AccountChange::Unfreeze => 1,
            AccountChange::Close => 2,
        }
    }

    pub fn from_tag(tag: u8) -> Option<AccountChange> {
        [AccountChange::Freeze, AccountChange::Unfreeze, AccountChange::Close].get(usize::from(tag)).copied()
    }
}

/// What a client asks for when it opens an account.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewAccount {
    pub id: Id,
    pub currency: Currency,
    pub flags: AccountFlags,
    /// A credit line: debits may exceed credits by at most this much.
    /// Only meaningful with `debits_must_not_exceed_credits`.
    pub overdraft_limit: u64,
    /// A small JSON object, kept verbatim; the domain never parses it.
    pub metadata: Option<Box<str>>,
    /// Whose account this is; `None` for platform accounts. Never changes.
    pub owner: Option<Owner>,
}

impl NewAccount {
    /// Checks what can be checked without state. `Err` carries a readable reason.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.id.is_reserved() {
            return Err("ids starting with '_' are reserved for system accounts");
        }
        if self.flags.bits() & AccountFlags::STATE != 0 {
            return Err("an account is opened open; freeze and close are their own requests");
        }
        let both = AccountFlags(AccountFlags::CONSTRAINTS);
        if self.flags.contains(both) {
            return Err(
                "flags debits_must_not_exceed_credits and credits_must_not_exceed_debits are mutually exclusive",
            );
        }
        if self.overdraft_limit > 0 && !self.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            return Err("overdraft_limit requires the flag debits_must_not_exceed_credits");
        }
        if self.overdraft_limit > crate::MAX_TRANSFER_AMOUNT {
            return Err("overdraft_limit is larger than 2^53-1");
        }
        Ok(())
    }
}

/// An account's cumulative sums, in minor units. u128, as TigerBeetle's:
/// a transfer moves at most 2^53-1, so u64 sums were saturated by 2,048
/// maximal transfers, and the clearing account of a shard, which takes
/// every cross-shard leg of every tenant, could be exhausted by one. For
/// each side, posted + pending fits a u128 (checked before every booking).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Balances {
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
}

impl Balances {
    /// credits_posted - debits_posted (posted only, as a bank statement shows).
    pub fn balance(&self) -> Net {
        Net::difference(self.credits_posted, self.debits_posted)
    }

    /// The whole balance including pending amounts; sums to zero over all
    /// accounts. Modulo 2^128 as an `i128`: exact whenever it lies within
    /// ±2^127, and a sum of them is zero exactly when the books balance
    /// (modulo 2^128, a difference no run of transfers can make).
    pub fn net_including_pending(&self) -> i128 {
        let credits = self.credits_posted.wrapping_add(self.credits_pending);
        let debits = self.debits_posted.wrapping_add(self.debits_pending);
        credits.wrapping_sub(debits) as i128
    }

    /// Whether each side's posted + pending fits (what every booking keeps).
    pub fn in_range(&self) -> bool {
        self.debits_posted.checked_add(self.debits_pending).is_some()
            && self.credits_posted.checked_add(self.credits_pending).is_some()
    }
}

/// A difference of two u128 sums, exact: a sign and a magnitude (it can lie
/// beyond `i128`). Zero is never negative.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Net {
    negative: bool,
    magnitude: u128,
}

impl Net {
    pub fn difference(plus: u128, minus: u128) -> Net {
        if plus >= minus {
            Net { negative: false, magnitude: plus - minus }
        } else {
            Net { negative: true, magnitude: minus - plus }
        }
    }

    pub fn is_negative(self) -> bool {
        self.negative
    }

    pub fn magnitude(self) -> u128 {
        self.magnitude
    }

    /// As an `i128`, when it fits.
    pub fn to_i128(self) -> Option<i128> {
        let magnitude = i128::try_from(self.magnitude).ok();
        if self.negative {
            // -2^127 fits although its magnitude does not.
            magnitude.map(|m| -m).or((self.magnitude == 1 << 127).then_some(i128::MIN))
        } else {
            magnitude
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.negative {
            f.write_str("-")?;
        }
        write!(f, "{}", self.magnitude)
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Account {
    pub id: Id,
    pub currency: Currency,
    pub flags: AccountFlags,
    pub overdraft_limit: u64,
    pub metadata: Option<Box<str>>,
    pub owner: Option<Owner>,
    pub balances: Balances,
    pub created_at_ms: u64,
    /// True for clearing accounts the system keeps per shard and currency.
    pub system: bool,
    /// Where the engine keeps this account's newest history entry (an
    /// opaque position set by the engine; 0 = none). The domain only stores it.
    pub history_head: u64,
}

impl Account {
    pub fn open(new: NewAccount, now_ms: u64) -> Account {
        Account {
            id: new.id,
            currency: new.currency,
            flags: new.flags,
            overdraft_limit: new.overdraft_limit,
            metadata: new.metadata,
            owner: new.owner,
            balances: Balances::default(),
            created_at_ms: now_ms,
            system: false,
            history_head: 0,
        }
    }

    /// Whether re-creating with `new` is the same request (idempotent success).
    pub fn same_fields(&self, new: &NewAccount) -> bool {
        self.currency == new.currency
            && self.flags.constraints() == new.flags
            && self.overdraft_limit == new.overdraft_limit
            && self.metadata == new.metadata
            && self.owner == new.owner
    }

    pub fn status(&self) -> AccountStatus {
        if self.flags.contains(AccountFlags::CLOSED) {
            AccountStatus::Closed
        } else if self.flags.contains(AccountFlags::FROZEN) {
            AccountStatus::Frozen
        } else {
            AccountStatus::Open
        }
    }

    /// Applies a freeze, unfreeze or close. `Ok(false)` when the account
    /// was in that state already (an idempotent retry changes nothing).
    pub(crate) fn change_state(&mut self, change: AccountChange) -> Result<bool, ErrorCode> {
        if self.flags.contains(AccountFlags::CLOSED) {
            // Closed is final: a repeated close is the same request.
            return if change == AccountChange::Close { Ok(false) } else { Err(ErrorCode::AccountClosed) };
        }
        let frozen = self.flags.contains(AccountFlags::FROZEN);
        match change {
            AccountChange::Freeze if frozen => Ok(false),
            AccountChange::Freeze => {
                self.flags.insert(AccountFlags::FROZEN);
                Ok(true)
            }
            AccountChange::Unfreeze if !frozen => Ok(false),
            AccountChange::Unfreeze => {
                self.flags.remove(AccountFlags::FROZEN);
                Ok(true)
            }
            AccountChange::Close => {
                let b = &self.balances;
                let zero = b.debits_pending == 0 && b.credits_pending == 0 && b.debits_posted == b.credits_posted;
                if !zero {
                    return Err(ErrorCode::AccountNotZero);
                }
                self.flags.remove(AccountFlags::FROZEN);
                self.flags.insert(AccountFlags::CLOSED);
                Ok(true)
            }
        }
    }

    /// Refuses every new movement of a frozen or closed account. One read of
    /// the flags byte, which the constraint checks read anyway.
    fn check_movable(&self) -> Result<(), ErrorCode> {
        if self.flags.bits() & AccountFlags::STATE == 0 {
            return Ok(());
        }
        if self.flags.contains(AccountFlags::CLOSED) {
            Err(ErrorCode::AccountClosed)
        } else {
            Err(ErrorCode::AccountFrozen)
        }
    }

    /// What can still be debited; `None` when debits are not limited.
    pub fn available(&self) -> Option<u128> {
        if !self.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            return None;
        }
        let b = &self.balances;
        let limit = b.credits_posted.saturating_add(u128::from(self.overdraft_limit));
        let used = b.debits_posted.saturating_add(b.debits_pending);
        Some(limit.saturating_sub(used))
    }

    /// Whether `amount` more may be debited: the account's constraint holds
    /// and no sum overflows. `extra_credits` are credits of the same
    /// transaction not yet posted, which an atomic batch may spend. Holding
    /// and posting check the same way, so a transfer gets the same answer
    /// on every path.
    pub(crate) fn check_debit(&self, amount: u64, extra_credits: u128) -> Result<(), ErrorCode> {
        self.check_movable()?;
        let b = &self.balances;
        let new_pending = b.debits_pending.checked_add(u128::from(amount)).ok_or(ErrorCode::Overflow)?;
        let new_total = b.debits_posted.checked_add(new_pending).ok_or(ErrorCode::Overflow)?;
        if self.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            // Saturating: a limit past u128::MAX limits nothing a u128 total can reach.
            let limit = b.credits_posted.saturating_add(u128::from(self.overdraft_limit)).saturating_add(extra_credits);
            if new_total > limit {
                return Err(ErrorCode::ExceedsCredits);
            }
        }
        Ok(())
    }

    pub(crate) fn check_credit(&self, amount: u64, extra_debits: u128) -> Result<(), ErrorCode> {
        self.check_movable()?;
        let b = &self.balances;
        let new_pending = b.credits_pending.checked_add(u128::from(amount)).ok_or(ErrorCode::Overflow)?;
        let new_total = b.credits_posted.checked_add(new_pending).ok_or(ErrorCode::Overflow)?;
        if self.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && new_total > b.debits_posted.saturating_add(extra_debits)
        {
            return Err(ErrorCode::ExceedsDebits);
        }
        Ok(())
    }
}
