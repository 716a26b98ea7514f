//! The price book: an immutable snapshot of the catalogue, indexed for quotes.
//!
//! Promotions are kept sorted by (priority, id), the order they apply in,
//! and indexed by what their scope names (a SKU, a merchant, everything),
//! so a quote visits only the promotions that touch its cart, already in
//! order. The maps are hash maps for lookups only: nothing iterates them
//! into a result, so their order never leaks.

use std::collections::{BTreeMap, HashMap};

use peakstack_domain::{ErrorCode, Id, MAX_TRANSFER_AMOUNT};

use crate::catalogue::{CouponTemplate, Promotion, Scope, SkuPrice};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Most promotions, SKUs or coupon templates one book may hold.
pub const MAX_BOOK_ENTRIES: usize = 1 << 20;

/// A SKU in the book: its price, its merchant as a small number, and the
/// promotions that name it, so one lookup gives all a cart line needs.
#[derive(Debug)]
pub(crate) struct BookSku {
    pub(crate) price: SkuPrice,
    /// An index into `PriceBook::by_merchant`.
    pub(crate) merchant: u32,
    /// Places in `PriceBook::promotions`, ascending, of the promotions whose scope lists this SKU.
    pub(crate) promotions: Vec<u32>,
}

/// A promotion in the book, with its exclusive group as a small number.
#[derive(Debug)]
pub(crate) struct BookPromotion {
    pub(crate) promotion: Promotion,
    pub(crate) group: Option<u32>,
}

/// Prices, promotions and coupon templates, as one immutable snapshot.
#[derive(Debug)]
pub struct PriceBook {
    skus: FastMap<Id, BookSku>,
    /// Sorted by (priority, id): a promotion's place here is its order of application.
    promotions: Vec<BookPromotion>,
    /// Places in `promotions`, ascending, of the promotions on the whole cart.
    everything: Vec<u32>,
    /// By merchant number (merchants of the book's SKUs, numbered in id
    /// order): places of the promotions on that merchant, ascending.
    by_merchant: Vec<Vec<u32>>,
    templates: FastMap<Id, CouponTemplate>,
}

impl PriceBook {
    /// Builds the book. The order of the inputs does not matter: the same
    /// sets make the same book. Refused (`InvalidRequest`): two entries
    /// with one id, a unit price above `MAX_TRANSFER_AMOUNT`, more than
    /// [`MAX_BOOK_ENTRIES`] of a kind.
    pub fn new(
        skus: Vec<SkuPrice>,
        promotions: Vec<Promotion>,
        templates: Vec<CouponTemplate>,
    ) -> Result<PriceBook, ErrorCode> {
        if skus.len() > MAX_BOOK_ENTRIES || promotions.len() > MAX_BOOK_ENTRIES || templates.len() > MAX_BOOK_ENTRIES {
            return Err(ErrorCode::InvalidRequest);
        }
        // Merchants are numbered in id order: the same SKUs give the same numbers.
        let mut merchants: BTreeMap<&Id, u32> = skus.iter().map(|sku| (&sku.merchant_id, 0)).collect();
        for (number, slot) in merchants.values_mut().enumerate() {
            *slot = number as u32;
        }
        let merchant_numbers: FastMap<Id, u32> = merchants.iter().map(|(&id, &n)| (id.clone(), n)).collect();
        let mut sku_map = FastMap::with_capacity_and_hasher(skus.len(), Default::default());
        for sku in skus {
            if sku.unit_price > MAX_TRANSFER_AMOUNT {
                return Err(ErrorCode::InvalidRequest);
            }
            let merchant = merchant_numbers[&sku.merchant_id];
            let entry = BookSku { price: sku, merchant, promotions: Vec::new() };
            if sku_map.insert(entry.price.sku_id.clone(), entry).is_some() {
                return Err(ErrorCode::InvalidRequest);
            }
        }
        let mut template_map = FastMap::with_capacity_and_hasher(templates.len(), Default::default());
        for template in templates {
            if template_map.insert(template.id.clone(), template).is_some() {
                return Err(ErrorCode::InvalidRequest);
            }
        }
        let mut promotions = promotions;
        promotions.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
        if promotions.windows(2).any(|pair| pair[0].id == pair[1].id) {
            return Err(ErrorCode::InvalidRequest);
        }
        // Group names become numbers in name order: the same set of
        // promotions gives the same numbers.
        let mut groups: BTreeMap<&str, u32> = BTreeMap::new();
        for promotion in &promotions {
            if let Some(group) = promotion.group.as_deref() {
                groups.insert(group, 0);
            }
        }
        for (number, slot) in groups.values_mut().enumerate() {
            *slot = number as u32;
        }
        let group_numbers: Vec<Option<u32>> =
            promotions.iter().map(|p| p.group.as_deref().map(|g| groups[g])).collect();

        let mut book = PriceBook {
            skus: sku_map,
            promotions: Vec::with_capacity(promotions.len()),
            everything: Vec::new(),
            by_merchant: vec![Vec::new(); merchant_numbers.len()],
            templates: template_map,
        };
        // A scope that names a SKU or merchant without a price in the book
        // touches no cart: it is left out of the index.
        for (place, (promotion, group)) in promotions.into_iter().zip(group_numbers).enumerate() {
            let place = place as u32;
            match &promotion.scope {
                Scope::Everything => book.everything.push(place),
                Scope::Merchant(merchant) => {
                    if let Some(&number) = merchant_numbers.get(merchant) {
                        book.by_merchant[number as usize].push(place);
                    }
                }
                Scope::Skus(skus) => {
                    for sku in skus {
                        if let Some(entry) = book.skus.get_mut(sku) {
                            entry.promotions.push(place);
                        }
                    }
                }
            }
            book.promotions.push(BookPromotion { promotion, group });
        }
        Ok(book)
    }

    pub fn sku(&self, sku_id: &Id) -> Option<&SkuPrice> {
        self.skus.get(sku_id).map(|entry| &entry.price)
    }

    pub(crate) fn book_sku(&self, sku_id: &Id) -> Option<&BookSku> {
        self.skus.get(sku_id)
    }

    pub fn coupon_template(&self, template_id: &Id) -> Option<&CouponTemplate> {
        self.templates.get(template_id)
    }

    /// The promotions in their order of application.
    pub fn promotions(&self) -> impl Iterator<Item = &Promotion> {
        self.promotions.iter().map(|entry| &entry.promotion)
    }

    pub(crate) fn promotion_at(&self, place: u32) -> &BookPromotion {
        &self.promotions[place as usize]
    }

    pub(crate) fn on_everything(&self) -> &[u32] {
        &self.everything
    }

    pub(crate) fn on_merchant(&self, merchant: u32) -> &[u32] {
        &self.by_merchant[merchant as usize]
    }
}
