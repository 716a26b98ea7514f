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

/// A promotion in the book, with its exclusive group as a small number.
#[derive(Debug)]
pub(crate) struct BookPromotion {
    pub(crate) promotion: Promotion,
    pub(crate) group: Option<u32>,
}

/// Prices, promotions and coupon templates, as one immutable snapshot.
#[derive(Debug)]
pub struct PriceBook {
    skus: FastMap<Id, SkuPrice>,
    /// Sorted by (priority, id): a promotion's place here is its order of application.
    promotions: Vec<BookPromotion>,
    /// Places in `promotions`, ascending, of the promotions on the whole cart.
    everything: Vec<u32>,
    by_merchant: FastMap<Id, Vec<u32>>,
    by_sku: FastMap<Id, Vec<u32>>,
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
        let mut sku_map = FastMap::with_capacity_and_hasher(skus.len(), Default::default());
        for sku in skus {
            if sku.unit_price > MAX_TRANSFER_AMOUNT {
                return Err(ErrorCode::InvalidRequest);
            }
            if sku_map.insert(sku.sku_id.clone(), sku).is_some() {
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
            by_merchant: FastMap::default(),
            by_sku: FastMap::default(),
            templates: template_map,
        };
        for (place, (promotion, group)) in promotions.into_iter().zip(group_numbers).enumerate() {
            let place = place as u32;
            match &promotion.scope {
                Scope::Everything => book.everything.push(place),
                Scope::Merchant(merchant) => book.by_merchant.entry(merchant.clone()).or_default().push(place),
                Scope::Skus(skus) => {
                    for sku in skus {
                        book.by_sku.entry(sku.clone()).or_default().push(place);
                    }
                }
            }
            book.promotions.push(BookPromotion { promotion, group });
        }
        Ok(book)
    }

    pub fn sku(&self, sku_id: &Id) -> Option<&SkuPrice> {
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

    pub(crate) fn on_merchant(&self, merchant_id: &Id) -> &[u32] {
        self.by_merchant.get(merchant_id).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn on_sku(&self, sku_id: &Id) -> &[u32] {
        self.by_sku.get(sku_id).map_or(&[], Vec::as_slice)
    }
}
