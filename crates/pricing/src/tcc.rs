//! The TCC branches of pricing: reserve a promotion's budget and uses,
//! lock a coupon; confirm or cancel them.
//!
//! Each branch has a fence per (transaction, promotion or coupon): a
//! repeated message is answered from it, a cancel that comes before its
//! try is recorded as suspended and answered as done, and a try that finds
//! its branch cancelled or suspended is refused with `BranchCancelled`
//! (no hanging reservation). A refused try records nothing: its repeat is
//! judged again. A confirm is accepted as long as the hold exists, even past
//! its deadline: the budget is still held for it, and once the deadline's
//! cancel is applied (see `Pricing::due`) the confirm is refused with
//! `BranchCancelled`.
//!
//! A try does not look at the promotion's time window: the quote that
//! computed its discount did, at the checkout's own moment; the try
//! guards what only the single writer can, the counters.
//!
//! Limits refuse a try with their own codes: `PromotionBudgetExhausted`,
//! `PromotionUsageLimitReached`, `PromotionBuyerLimitReached`.

use peakstack_domain::{ErrorCode, Id, HELD_UNTIL_DECIDED, MAX_TRANSFER_AMOUNT};

use crate::catalogue::CouponState;
use crate::state::{BranchState, ConsumeFence, Pricing, Timer, FENCE_RETENTION_MS, MAX_HOLD_MS};

fn check_deadline(deadline_ms: u64, now_ms: u64) -> Result<(), ErrorCode> {
    if deadline_ms == HELD_UNTIL_DECIDED {
        return Ok(());
    }
    if deadline_ms <= now_ms || deadline_ms - now_ms > MAX_HOLD_MS {
        return Err(ErrorCode::InvalidRequest);
    }
    Ok(())
}

fn forget_at(now_ms: u64) -> u64 {
    now_ms.saturating_add(FENCE_RETENTION_MS)
}

impl Pricing {
    pub(crate) fn try_consume(
        &mut self,
        txn: u64,
        promotion_id: &Id,
        buyer_id: &Id,
        discount: u64,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<bool, ErrorCode> {
        let key = (promotion_id.clone(), txn);
        if let Some(fence) = self.consumes.get(&key) {
            let same = fence.buyer_id.as_ref() == Some(buyer_id)
                && fence.discount == discount
                && fence.deadline_ms == deadline_ms;
            return match fence.state {
                BranchState::Cancelled { .. } | BranchState::Suspended { .. } => Err(ErrorCode::BranchCancelled),
                BranchState::Tried { .. } | BranchState::Confirmed { .. } if same => Ok(false),
                _ => Err(ErrorCode::ExistsWithDifferentFields),
            };
        }
        let entry = self.promotions.get_mut(promotion_id).ok_or(ErrorCode::PromotionNotFound)?;
        if discount == 0 || discount > MAX_TRANSFER_AMOUNT {
            return Err(ErrorCode::InvalidRequest);
        }
        check_deadline(deadline_ms, now_ms)?;
        let promotion = &entry.promotion;
        let counters = &mut entry.counters;
        let uses = counters.uses + counters.reserved_uses;
        if promotion.usage_limit.is_some_and(|limit| uses >= limit) {
            return Err(ErrorCode::PromotionUsageLimitReached);
        }
        let buyer_uses = entry.buyer_uses.get(buyer_id).copied().unwrap_or(0);
        if promotion.per_buyer_limit.is_some_and(|limit| buyer_uses >= limit) {
            return Err(ErrorCode::PromotionBuyerLimitReached);
        }
        let reserved = counters.reserved.checked_add(discount).ok_or(ErrorCode::Overflow)?;
        let spent = counters.given.checked_add(reserved).ok_or(ErrorCode::Overflow)?;
        if promotion.budget.is_some_and(|budget| spent > budget) {
            return Err(ErrorCode::PromotionBudgetExhausted);
        }
        // Checked: now it acts.
        counters.reserved = reserved;
        counters.reserved_uses += 1;
        if promotion.per_buyer_limit.is_some() {
            *entry.buyer_uses.entry(buyer_id.clone()).or_default() += 1;
        }
        entry.assert_invariants(Some(buyer_id));
        let fence = ConsumeFence {
            buyer_id: Some(buyer_id.clone()),
            discount,
            deadline_ms,
            state: BranchState::Tried { deadline_ms },
        };
        self.consumes.insert(key, fence);
        self.timers.insert((deadline_ms, Timer::ConsumeDeadline { promotion_id: promotion_id.clone(), txn }));
        Ok(true)
    }

    pub(crate) fn confirm_consume(&mut self, txn: u64, promotion_id: &Id, now_ms: u64) -> Result<bool, ErrorCode> {
        let key = (promotion_id.clone(), txn);
        let Some(fence) = self.consumes.get_mut(&key) else {
            return Err(if self.promotions.contains_key(promotion_id) {
                ErrorCode::ReservationNotFound
            } else {
                ErrorCode::PromotionNotFound
            });
        };
        let deadline_ms = match fence.state {
            BranchState::Tried { deadline_ms } => deadline_ms,
            BranchState::Confirmed { .. } => return Ok(false),
            BranchState::Cancelled { .. } | BranchState::Suspended { .. } => return Err(ErrorCode::BranchCancelled),
        };
        let entry = self.promotions.get_mut(promotion_id).expect("a fence's promotion exists");
        let counters = &mut entry.counters;
        counters.reserved -= fence.discount;
        counters.given += fence.discount;
        counters.reserved_uses -= 1;
        counters.uses += 1;
        entry.assert_invariants(fence.buyer_id.as_ref());
        let forget_at_ms = forget_at(now_ms);
        fence.state = BranchState::Confirmed { forget_at_ms };
        let timer = Timer::ConsumeDeadline { promotion_id: promotion_id.clone(), txn };
        assert!(self.timers.remove(&(deadline_ms, timer)), "a tried branch has its deadline timer");
        self.keep_consume_fence(key, deadline_ms, forget_at_ms);
        Ok(true)
    }

    pub(crate) fn cancel_consume(&mut self, txn: u64, promotion_id: &Id, now_ms: u64) -> Result<bool, ErrorCode> {
        let key = (promotion_id.clone(), txn);
        let forget_at_ms = forget_at(now_ms);
        let Some(fence) = self.consumes.get_mut(&key) else {
            if !self.promotions.contains_key(promotion_id) {
                return Err(ErrorCode::PromotionNotFound);
            }
            // Cancelled before the try: answer done, and refuse the try if it comes.
            let state = BranchState::Suspended { forget_at_ms };
            self.consumes.insert(key, ConsumeFence { buyer_id: None, discount: 0, deadline_ms: 0, state });
            self.timers.insert((forget_at_ms, Timer::ConsumeForget { promotion_id: promotion_id.clone(), txn }));
            return Ok(true);
        };
        let deadline_ms = match fence.state {
            BranchState::Tried { deadline_ms } => deadline_ms,
            BranchState::Cancelled { .. } | BranchState::Suspended { .. } => return Ok(false),
            BranchState::Confirmed { .. } => return Err(ErrorCode::ReservationConfirmed),
        };
        let entry = self.promotions.get_mut(promotion_id).expect("a fence's promotion exists");
        entry.counters.reserved -= fence.discount;
        entry.counters.reserved_uses -= 1;
        let buyer_id = fence.buyer_id.as_ref().expect("a tried branch has its buyer");
        if let Some(uses) = entry.buyer_uses.get_mut(buyer_id) {
            *uses -= 1;
            if *uses == 0 {
                entry.buyer_uses.remove(buyer_id);
            }
        }
        entry.assert_invariants(Some(buyer_id));
        fence.state = BranchState::Cancelled { forget_at_ms };
        let timer = Timer::ConsumeDeadline { promotion_id: promotion_id.clone(), txn };
        assert!(self.timers.remove(&(deadline_ms, timer)), "a tried branch has its deadline timer");
        self.keep_consume_fence(key, deadline_ms, forget_at_ms);
        Ok(true)
    }

    /// A decided consume's fence is kept for its retention; one held until
    /// decided (see [`HELD_UNTIL_DECIDED`]) is dropped: its coordinator's
    /// fence answers a repeat.
    fn keep_consume_fence(&mut self, key: (Id, u64), deadline_ms: u64, forget_at_ms: u64) {
        if deadline_ms == HELD_UNTIL_DECIDED {
            self.consumes.remove(&key);
        } else {
            self.timers.insert((forget_at_ms, Timer::ConsumeForget { promotion_id: key.0, txn: key.1 }));
        }
    }

    pub(crate) fn forget_consume(&mut self, txn: u64, promotion_id: &Id, now_ms: u64) -> Result<bool, ErrorCode> {
        let key = (promotion_id.clone(), txn);
        let Some(fence) = self.consumes.get(&key) else { return Ok(false) };
        match fence.state.forget_at_ms() {
            Some(forget_at_ms) if forget_at_ms <= now_ms => {
                self.consumes.remove(&key);
                let timer = Timer::ConsumeForget { promotion_id: promotion_id.clone(), txn };
                assert!(self.timers.remove(&(forget_at_ms, timer)), "a finished branch has its forget timer");
                Ok(true)
            }
            // A live hold, or a fence still within its retention.
            _ => Err(ErrorCode::InvalidRequest),
        }
    }

    pub(crate) fn lock_coupon(
        &mut self,
        txn: u64,
        coupon_id: &Id,
        buyer_id: &Id,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<bool, ErrorCode> {
        let coupon = self.coupons.get(coupon_id).ok_or(ErrorCode::CouponNotFound)?;
        if coupon.buyer_id != *buyer_id {
            return Err(ErrorCode::CouponNotApplicable);
        }
        if self.coupon_fences.contains_key(&(coupon_id.clone(), txn)) {
            return Err(ErrorCode::BranchCancelled);
        }
        match coupon.state {
            CouponState::Locked { txn: holder, deadline_ms: held_until } if holder == txn => {
                return if held_until == deadline_ms { Ok(false) } else { Err(ErrorCode::ExistsWithDifferentFields) };
            }
            CouponState::Used { txn: holder } if holder == txn => return Ok(false),
            CouponState::Locked { .. } | CouponState::Used { .. } => return Err(ErrorCode::CouponAlreadyUsed),
            CouponState::Available => {}
        }
        let template = &self.templates.get(&coupon.template_id).expect("a coupon's template exists").template;
        if !template.is_valid_at(now_ms) {
            return Err(ErrorCode::CouponExpired);
        }
        check_deadline(deadline_ms, now_ms)?;
        let coupon = self.coupons.get_mut(coupon_id).expect("found above");
        coupon.state = CouponState::Locked { txn, deadline_ms };
        self.timers.insert((deadline_ms, Timer::CouponDeadline { coupon_id: coupon_id.clone(), txn }));
        Ok(true)
    }

    pub(crate) fn use_coupon(&mut self, txn: u64, coupon_id: &Id) -> Result<bool, ErrorCode> {
        let coupon = self.coupons.get_mut(coupon_id).ok_or(ErrorCode::CouponNotFound)?;
        match coupon.state {
            CouponState::Locked { txn: holder, deadline_ms } if holder == txn => {
                coupon.state = CouponState::Used { txn };
                let timer = Timer::CouponDeadline { coupon_id: coupon_id.clone(), txn };
                assert!(self.timers.remove(&(deadline_ms, timer)), "a lock has its deadline timer");
                Ok(true)
            }
            CouponState::Used { txn: holder } if holder == txn => Ok(false),
            _ if self.coupon_fences.contains_key(&(coupon_id.clone(), txn)) => Err(ErrorCode::BranchCancelled),
            _ => Err(ErrorCode::ReservationNotFound),
        }
    }

    pub(crate) fn release_coupon(&mut self, txn: u64, coupon_id: &Id, now_ms: u64) -> Result<bool, ErrorCode> {
        let coupon = self.coupons.get_mut(coupon_id).ok_or(ErrorCode::CouponNotFound)?;
        let key = (coupon_id.clone(), txn);
        let forget_at_ms = forget_at(now_ms);
        match coupon.state {
            CouponState::Locked { txn: holder, deadline_ms } if holder == txn => {
                coupon.state = CouponState::Available;
                let timer = Timer::CouponDeadline { coupon_id: coupon_id.clone(), txn };
                assert!(self.timers.remove(&(deadline_ms, timer)), "a lock has its deadline timer");
                if deadline_ms == HELD_UNTIL_DECIDED {
                    // Its coordinator's fence answers a repeat.
                    return Ok(true);
                }
                self.coupon_fences.insert(key, BranchState::Cancelled { forget_at_ms });
            }
            CouponState::Used { txn: holder } if holder == txn => return Err(ErrorCode::ReservationConfirmed),
            _ if self.coupon_fences.contains_key(&key) => return Ok(false),
            // Released before its lock: answer done, and refuse the lock if it comes.
            _ => {
                self.coupon_fences.insert(key, BranchState::Suspended { forget_at_ms });
            }
        }
        self.timers.insert((forget_at_ms, Timer::CouponForget { coupon_id: coupon_id.clone(), txn }));
        Ok(true)
    }

    pub(crate) fn forget_coupon_fence(&mut self, txn: u64, coupon_id: &Id, now_ms: u64) -> Result<bool, ErrorCode> {
        let key = (coupon_id.clone(), txn);
        let Some(state) = self.coupon_fences.get(&key) else { return Ok(false) };
        let forget_at_ms = state.forget_at_ms().expect("coupon fences are final");
        if forget_at_ms > now_ms {
            return Err(ErrorCode::InvalidRequest);
        }
        self.coupon_fences.remove(&key);
        let timer = Timer::CouponForget { coupon_id: coupon_id.clone(), txn };
        assert!(self.timers.remove(&(forget_at_ms, timer)), "a coupon fence has its forget timer");
        Ok(true)
    }

    pub(crate) fn restore(
        &mut self,
        promotion_id: &Id,
        buyer_id: &Id,
        discount: u64,
        uses: u64,
    ) -> Result<bool, ErrorCode> {
        let entry = self.promotions.get_mut(promotion_id).ok_or(ErrorCode::PromotionNotFound)?;
        let counters = &mut entry.counters;
        if (discount == 0 && uses == 0) || counters.given < discount || counters.uses < uses {
            return Err(ErrorCode::InvalidRequest);
        }
        counters.given -= discount;
        counters.uses -= uses;
        if uses > 0 {
            if let Some(count) = entry.buyer_uses.get_mut(buyer_id) {
                *count = count.saturating_sub(uses);
                if *count == 0 {
                    entry.buyer_uses.remove(buyer_id);
                }
            }
        }
        entry.assert_invariants(Some(buyer_id));
        Ok(true)
    }

    pub(crate) fn return_coupon(&mut self, txn: u64, coupon_id: &Id) -> Result<bool, ErrorCode> {
        let coupon = self.coupons.get_mut(coupon_id).ok_or(ErrorCode::CouponNotFound)?;
        match coupon.state {
            CouponState::Used { txn: holder } if holder == txn => {
                coupon.state = CouponState::Available;
                Ok(true)
            }
            // Given back already (a repeat), or never this checkout's.
            CouponState::Available => Ok(false),
            _ => Err(ErrorCode::InvalidState),
        }
    }
}
