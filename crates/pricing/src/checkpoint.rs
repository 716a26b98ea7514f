//! The checkpoint section of the pricing state.
//!
//! A format version byte, then promotions (with counters and per-buyer
//! uses), coupon templates (with issued counts), coupons and the fences,
//! each list sorted by key, so one state has one encoding. The derived
//! indexes (coupons by buyer, timers) are rebuilt on decode, and the whole
//! is checked ([`Pricing::check`]) before it is trusted.

use peakstack_domain::Id;

use crate::catalogue::{Coupon, CouponState};
use crate::codec::{DecodeError, Reader, Result, Writer};
use crate::state::{
    sorted, BranchState, ConsumeFence, Pricing, PromotionCounters, PromotionEntry, TemplateEntry, MAX_COUPON_TEMPLATES,
    MAX_PROMOTIONS,
};

/// The version of the checkpoint section, its first byte.
pub const CHECKPOINT_FORMAT_VERSION: u8 = 1;
/// Most coupons or fences one checkpoint may list.
const MAX_CHECKPOINT_ITEMS: usize = 1 << 32;

fn write_state(w: &mut Writer<'_>, state: BranchState) {
    match state {
        BranchState::Tried { deadline_ms } => {
            w.u8(0);
            w.varint(deadline_ms);
        }
        BranchState::Confirmed { forget_at_ms } => {
            w.u8(1);
            w.varint(forget_at_ms);
        }
        BranchState::Cancelled { forget_at_ms } => {
            w.u8(2);
            w.varint(forget_at_ms);
        }
        BranchState::Suspended { forget_at_ms } => {
            w.u8(3);
            w.varint(forget_at_ms);
        }
    }
}

fn read_state(r: &mut Reader<'_>) -> Result<BranchState> {
    let tag = r.u8()?;
    let at_ms = r.varint()?;
    Ok(match tag {
        0 => BranchState::Tried { deadline_ms: at_ms },
        1 => BranchState::Confirmed { forget_at_ms: at_ms },
        2 => BranchState::Cancelled { forget_at_ms: at_ms },
        3 => BranchState::Suspended { forget_at_ms: at_ms },
        _ => return Err(DecodeError::Invalid("branch state")),
    })
}

/// Fails unless each key comes strictly after the one before.
fn ascending<K: Ord + Clone>(last: &mut Option<K>, key: &K) -> Result<()> {
    if last.as_ref().is_some_and(|last| last >= key) {
        return Err(DecodeError::Invalid("keys out of order"));
    }
    *last = Some(key.clone());
    Ok(())
}

impl Pricing {
    /// Appends the checkpoint section of this state to `out`.
    pub fn encode_checkpoint(&self, out: &mut Vec<u8>) {
        let mut w = Writer { out };
        w.u8(CHECKPOINT_FORMAT_VERSION);
        w.varint(self.promotions.len() as u64);
        for (_, entry) in sorted(self.promotions.iter()) {
            w.promotion(&entry.promotion);
            let counters = entry.counters;
            for value in [counters.given, counters.reserved, counters.uses, counters.reserved_uses] {
                w.varint(value);
            }
            w.varint(entry.buyer_uses.len() as u64);
            for (buyer_id, uses) in sorted(entry.buyer_uses.iter()) {
                w.id(buyer_id);
                w.varint(*uses);
            }
        }
        w.varint(self.templates.len() as u64);
        for (_, entry) in sorted(self.templates.iter()) {
            w.template(&entry.template);
            w.varint(entry.issued);
        }
        w.varint(self.coupons.len() as u64);
        for (_, coupon) in sorted(self.coupons.iter()) {
            w.id(&coupon.id);
            w.id(&coupon.template_id);
            w.id(&coupon.buyer_id);
            match coupon.state {
                CouponState::Available => w.u8(0),
                CouponState::Locked { txn, deadline_ms } => {
                    w.u8(1);
                    w.varint(txn);
                    w.varint(deadline_ms);
                }
                CouponState::Used { txn } => {
                    w.u8(2);
                    w.varint(txn);
                }
            }
        }
        w.varint(self.consumes.len() as u64);
        for ((promotion_id, txn), fence) in &self.consumes {
            w.id(promotion_id);
            w.varint(*txn);
            match &fence.buyer_id {
                None => w.u8(0),
                Some(buyer_id) => {
                    w.u8(1);
                    w.id(buyer_id);
                }
            }
            w.varint(fence.discount);
            w.varint(fence.deadline_ms);
            write_state(&mut w, fence.state);
        }
        w.varint(self.coupon_fences.len() as u64);
        for ((coupon_id, txn), state) in &self.coupon_fences {
            w.id(coupon_id);
            w.varint(*txn);
            write_state(&mut w, *state);
        }
    }

    /// Decodes a checkpoint section, all of `bytes`, and checks it.
    pub fn decode_checkpoint(bytes: &[u8]) -> Result<Pricing> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != CHECKPOINT_FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let mut pricing = Pricing::new();
        let mut last_id: Option<Id> = None;
        for _ in 0..r.count(MAX_PROMOTIONS)? {
            let promotion = r.promotion()?;
            ascending(&mut last_id, &promotion.id)?;
            let mut values = [0u64; 4];
            for value in &mut values {
                *value = r.varint()?;
            }
            let [given, reserved, uses, reserved_uses] = values;
            let counters = PromotionCounters { given, reserved, uses, reserved_uses };
            let mut entry = PromotionEntry { promotion, counters, buyer_uses: Default::default() };
            let mut last_buyer: Option<Id> = None;
            for _ in 0..r.count(MAX_CHECKPOINT_ITEMS)? {
                let buyer_id = r.id()?;
                ascending(&mut last_buyer, &buyer_id)?;
                entry.buyer_uses.insert(buyer_id, r.varint()?);
            }
            pricing.promotions.insert(entry.promotion.id.clone(), entry);
        }
        last_id = None;
        for _ in 0..r.count(MAX_COUPON_TEMPLATES)? {
            let template = r.template()?;
            ascending(&mut last_id, &template.id)?;
            let issued = r.varint()?;
            pricing.templates.insert(template.id.clone(), TemplateEntry { template, issued });
        }
        last_id = None;
        for _ in 0..r.count(MAX_CHECKPOINT_ITEMS)? {
            let (id, template_id, buyer_id) = (r.id()?, r.id()?, r.id()?);
            ascending(&mut last_id, &id)?;
            let state = match r.u8()? {
                0 => CouponState::Available,
                1 => CouponState::Locked { txn: r.varint()?, deadline_ms: r.varint()? },
                2 => CouponState::Used { txn: r.varint()? },
                _ => return Err(DecodeError::Invalid("coupon state")),
            };
            pricing.coupons_by_buyer.entry(buyer_id.clone()).or_default().insert(id.clone());
            pricing.coupons.insert(id.clone(), Coupon { id, template_id, buyer_id, state });
        }
        let mut last_key: Option<(Id, u64)> = None;
        for _ in 0..r.count(MAX_CHECKPOINT_ITEMS)? {
            let key = (r.id()?, r.varint()?);
            ascending(&mut last_key, &key)?;
            let buyer_id = match r.u8()? {
                0 => None,
                1 => Some(r.id()?),
                _ => return Err(DecodeError::Invalid("fence buyer tag")),
            };
            let (discount, deadline_ms) = (r.varint()?, r.varint()?);
            let state = read_state(&mut r)?;
            if matches!(state, BranchState::Tried { deadline_ms: at } if at != deadline_ms) {
                return Err(DecodeError::Invalid("a tried fence's deadline"));
            }
            pricing.consumes.insert(key, ConsumeFence { buyer_id, discount, deadline_ms, state });
        }
        last_key = None;
        for _ in 0..r.count(MAX_CHECKPOINT_ITEMS)? {
            let key = (r.id()?, r.varint()?);
            ascending(&mut last_key, &key)?;
            let state = read_state(&mut r)?;
            pricing.coupon_fences.insert(key, state);
        }
        r.finish()?;
        // The timers are derived from the fences and locks, not stored.
        pricing.timers = pricing.expected_timers();
        pricing.check().map_err(DecodeError::Invalid)?;
        Ok(pricing)
    }
}
