//! What the inventory part holds: SKUs, flash sales and reservations, and
//! the checked constructors of what a client asks to create.

use peakstack_domain::{Amount, Currency, ErrorCode, Id};

/// Most units a SKU may hold in stock (restocks included): 2^53 - 1, so that
/// any count is exact in a JSON number.
pub const MAX_STOCK: u64 = (1 << 53) - 1;
/// Most units one reservation or flash-sale attempt may take.
pub const MAX_PURCHASE_QUANTITY: u32 = 10_000;
/// Longest SKU title, in bytes.
pub const MAX_TITLE_LEN: usize = 200;
/// How long a flash-sale winner has to pay, unless the sale says otherwise.
pub const DEFAULT_PAY_WITHIN_MS: u64 = 5 * 60 * 1000;
/// Longest a reservation may be held before it is paid: one day.
pub const MAX_HOLD_MS: u64 = 24 * 60 * 60 * 1000;

/// A SKU as a client creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSku {
    pub id: Id,
    pub merchant_id: Id,
    pub title: String,
    pub price: Amount,
    pub currency: Currency,
    pub stock: u64,
    pub per_buyer_limit: Option<u32>,
}

impl NewSku {
    /// Checks what the types cannot: the title's length and the bounds.
    pub fn validate(&self) -> Result<(), ErrorCode> {
        let title_ok = !self.title.trim().is_empty() && self.title.len() <= MAX_TITLE_LEN;
        let limit_ok = self.per_buyer_limit.is_none_or(|l| l >= 1);
        (title_ok && limit_ok && self.stock <= MAX_STOCK).then_some(()).ok_or(ErrorCode::InvalidRequest)
    }
}

/// A SKU with its counters. `available = stock - sold - reserved - on_sale`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkuView {
    pub id: Id,
    pub merchant_id: Id,
    pub title: String,
    pub price: Amount,
    pub currency: Currency,
    pub per_buyer_limit: Option<u32>,
    /// Every unit received (initial stock and restocks) and not given back.
    pub stock: u64,
    /// The stock it was created with (a repeat of the create must name it).
    pub initial_stock: u64,
    /// Units sold (reservations confirmed), flash sales' included.
    pub sold: u64,
    /// Units held by reservations not yet confirmed, flash sales' included.
    pub reserved: u64,
    /// Units set aside for flash sales, not yet reserved or sold.
    pub on_sale: u64,
    pub created_ms: u64,
}

impl SkuView {
    pub fn available(&self) -> u64 {
        self.stock - self.sold - self.reserved - self.on_sale
    }

    /// The invariant: nothing is sold, held or set aside beyond the stock.
    pub(crate) fn assert_within_stock(&self) {
        let used = self.sold.checked_add(self.reserved).and_then(|u| u.checked_add(self.on_sale));
        assert!(
            used.is_some_and(|u| u <= self.stock),
            "oversell on SKU {}: sold {} + reserved {} + on sale {} > stock {}",
            self.id,
            self.sold,
            self.reserved,
            self.on_sale,
            self.stock
        );
    }

    pub(crate) fn same_definition(&self, new: &NewSku) -> bool {
        self.merchant_id == new.merchant_id
            && self.title == new.title
            && self.price == new.price
            && self.currency == new.currency
            && self.per_buyer_limit == new.per_buyer_limit
            && self.initial_stock == new.stock
    }
}

/// A flash sale as a client creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFlashSale {
    pub id: Id,
    pub sku_id: Id,
    pub price: Amount,
    pub quantity: u64,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    pub per_buyer_limit: u32,
    /// How long a winner has to pay before the unit goes back on sale.
    pub pay_within_ms: u64,
}

impl NewFlashSale {
    pub fn validate(&self) -> Result<(), ErrorCode> {
        let ok = self.quantity >= 1
            && self.quantity <= MAX_STOCK
            && self.starts_at_ms < self.ends_at_ms
            && self.per_buyer_limit >= 1
            && (1..=MAX_HOLD_MS).contains(&self.pay_within_ms);
        ok.then_some(()).ok_or(ErrorCode::InvalidRequest)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaleState {
    Scheduled,
    Live,
    SoldOut,
    Ended,
}

impl SaleState {
    pub fn as_str(self) -> &'static str {
        match self {
            SaleState::Scheduled => "scheduled",
            SaleState::Live => "live",
            SaleState::SoldOut => "sold_out",
            SaleState::Ended => "ended",
        }
    }
}

/// A flash sale with its counters. Its units were set aside from its SKU
/// when it was created; what is left when it ends goes back to the SKU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlashSaleView {
    pub id: Id,
    pub sku_id: Id,
    pub price: Amount,
    pub currency: Currency,
    pub quantity: u64,
    pub sold: u64,
    pub reserved: u64,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    pub per_buyer_limit: u32,
    pub pay_within_ms: u64,
    /// Set once the sale's end was processed and its leftover returned.
    pub closed: bool,
    pub created_ms: u64,
}

impl FlashSaleView {
    /// Units still for sale: neither sold nor reserved (zero once closed).
    pub fn remaining(&self) -> u64 {
        if self.closed {
            0
        } else {
            self.quantity - self.sold - self.reserved
        }
    }

    pub fn state(&self, now_ms: u64) -> SaleState {
        if self.closed || now_ms >= self.ends_at_ms {
            SaleState::Ended
        } else if now_ms < self.starts_at_ms {
            SaleState::Scheduled
        } else if self.remaining() == 0 {
            SaleState::SoldOut
        } else {
            SaleState::Live
        }
    }

    pub(crate) fn assert_within_quantity(&self) {
        assert!(
            self.sold.checked_add(self.reserved).is_some_and(|u| u <= self.quantity),
            "oversell on flash sale {}: sold {} + reserved {} > quantity {}",
            self.id,
            self.sold,
            self.reserved,
            self.quantity
        );
    }

    pub(crate) fn same_definition(&self, new: &NewFlashSale) -> bool {
        self.sku_id == new.sku_id
            && self.price == new.price
            && self.quantity == new.quantity
            && self.starts_at_ms == new.starts_at_ms
            && self.ends_at_ms == new.ends_at_ms
            && self.per_buyer_limit == new.per_buyer_limit
            && self.pay_within_ms == new.pay_within_ms
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationState {
    Reserved,
    Confirmed { at_ms: u64 },
    Cancelled { at_ms: u64 },
    Expired { at_ms: u64 },
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Reserved => "reserved",
            ReservationState::Confirmed { .. } => "confirmed",
            ReservationState::Cancelled { .. } => "cancelled",
            ReservationState::Expired { .. } => "expired",
        }
    }

    pub fn finished_at_ms(self) -> Option<u64> {
        match self {
            ReservationState::Reserved => None,
            ReservationState::Confirmed { at_ms }
            | ReservationState::Cancelled { at_ms }
            | ReservationState::Expired { at_ms } => Some(at_ms),
        }
    }
}

/// Units of a SKU held for a buyer until a deadline: confirmed (sold),
/// cancelled or expired (given back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: Id,
    pub sku_id: Id,
    /// The flash sale it was won in, if any.
    pub sale_id: Option<Id>,
    pub buyer_id: Id,
    pub quantity: u32,
    /// The price of one unit when it was reserved (the sale's, in a sale).
    pub unit_price: Amount,
    pub currency: Currency,
    pub created_ms: u64,
    pub deadline_ms: u64,
    pub state: ReservationState,
}
