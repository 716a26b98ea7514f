//! `Pricing`: the single writer of the promotion and coupon counters.
//!
//! Every check-then-act on a budget, a usage limit or a coupon happens in
//! [`Pricing::apply`], one command at a time, so a budget is never
//! over-spent and a coupon never used twice, however many checkouts race.
//! A refused command changes nothing. The TCC branches (`tcc.rs`) keep a
//! fence per (transaction, promotion or coupon), so every repeat is
//! answered as the first time was.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use peakstack_domain::{ErrorCode, Id};

use crate::book::PriceBook;
use crate::catalogue::{Coupon, CouponState, CouponTemplate, Promotion, SkuPrice};
use crate::quote_types::{PromotionUsage, UsageView};

pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A hash map's entries in key order: how anything that leaves this crate visits one.
pub(crate) fn sorted<'a, K: Ord + 'a, V>(items: impl Iterator<Item = (&'a K, &'a V)>) -> Vec<(&'a K, &'a V)> {
    let mut items: Vec<_> = items.collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    items
}

/// Most promotions one state holds.
pub const MAX_PROMOTIONS: usize = 65_536;
/// Most coupon templates one state holds.
pub const MAX_COUPON_TEMPLATES: usize = 65_536;
/// Most coupons one buyer may hold (used ones count).
pub const MAX_COUPONS_PER_BUYER: usize = 256;
/// Longest a reservation or a coupon lock may be held.
pub const MAX_HOLD_MS: u64 = 24 * 60 * 60 * 1000;
/// How long a finished branch's fence is kept, so that a late repeat of
/// its try or cancel is still answered as the first one was.
pub const FENCE_RETENTION_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Most commands one call of [`Pricing::due`] returns.
pub const MAX_DUE_COMMANDS: usize = 1024;

/// A command to the pricing state machine; all of them are logged.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    /// Same id and same fields: ok, unchanged; different fields: `ExistsWithDifferentFields`.
    CreatePromotion(Promotion),
    CreateCouponTemplate(CouponTemplate),
    /// `coupon_id` is assigned by the caller; refused past the template's `total_issue`.
    IssueCoupon {
        template_id: Id,
        buyer_id: Id,
        coupon_id: Id,
    },
    /// Reserves `discount` of the budget, one use and one use of the buyer.
    TryConsume {
        txn: u64,
        promotion_id: Id,
        buyer_id: Id,
        discount: u64,
        deadline_ms: u64,
    },
    ConfirmConsume {
        txn: u64,
        promotion_id: Id,
    },
    /// Gives a reservation back; before its try, records that the try must be refused.
    CancelConsume {
        txn: u64,
        promotion_id: Id,
    },
    LockCoupon {
        txn: u64,
        coupon_id: Id,
        buyer_id: Id,
        deadline_ms: u64,
    },
    UseCoupon {
        txn: u64,
        coupon_id: Id,
    },
    ReleaseCoupon {
        txn: u64,
        coupon_id: Id,
    },
    /// Drops a finished branch's fence once [`FENCE_RETENTION_MS`] passed (from [`Pricing::due`]).
    ForgetConsume {
        txn: u64,
        promotion_id: Id,
    },
    ForgetCouponFence {
        txn: u64,
        coupon_id: Id,
    },
    /// A discount given back by an order that was cancelled or expired
    /// unpaid: `discount` of the budget and `uses` of the uses (and of the
    /// buyer's). Refused (changing nothing) beyond what was given.
    Restore {
        promotion_id: Id,
        buyer_id: Id,
        discount: u64,
        uses: u64,
    },
    /// A used coupon given back by the checkout `txn` that used it, when
    /// every order of it was cancelled: available again.
    ReturnCoupon {
        txn: u64,
        coupon_id: Id,
    },
}

/// The answer to a command: done (or a repeat of done), or why not.
pub type Reply = Result<(), ErrorCode>;

/// A promotion's counters. Reserved amounts are tried and neither
/// confirmed nor cancelled yet; they count against the limits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PromotionCounters {
    /// Discount confirmed, minor units.
    pub given: u64,
    pub reserved: u64,
    /// Orders confirmed.
    pub uses: u64,
    pub reserved_uses: u64,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct PromotionEntry {
    pub(crate) promotion: Promotion,
    pub(crate) counters: PromotionCounters,
    /// Uses (confirmed and reserved) per buyer; kept only with a per-buyer
    /// limit, and without buyers at zero.
    pub(crate) buyer_uses: FastMap<Id, u64>,
}

impl PromotionEntry {
    /// The money invariants of a promotion, after every command that touched it.
    pub(crate) fn assert_invariants(&self, buyer_id: Option<&Id>) {
        let counters = &self.counters;
        let spent = counters.given.checked_add(counters.reserved).expect("given + reserved fits");
        assert!(
            self.promotion.budget.is_none_or(|budget| spent <= budget),
            "promotion {} over budget",
            self.promotion.id
        );
        let uses = counters.uses.checked_add(counters.reserved_uses).expect("uses fit");
        assert!(
            self.promotion.usage_limit.is_none_or(|limit| uses <= limit),
            "promotion {} over its usage limit",
            self.promotion.id
        );
        if let (Some(limit), Some(buyer_id)) = (self.promotion.per_buyer_limit, buyer_id) {
            let buyer_uses = self.buyer_uses.get(buyer_id).copied().unwrap_or(0);
            assert!(buyer_uses <= limit, "buyer {buyer_id} over the limit of promotion {}", self.promotion.id);
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct TemplateEntry {
    pub(crate) template: CouponTemplate,
    pub(crate) issued: u64,
}

/// Where a TCC branch is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BranchState {
    /// Held until confirmed or cancelled, at the latest at `deadline_ms`.
    Tried {
        deadline_ms: u64,
    },
    Confirmed {
        forget_at_ms: u64,
    },
    Cancelled {
        forget_at_ms: u64,
    },
    /// Cancelled before its try arrived: the try will be refused.
    Suspended {
        forget_at_ms: u64,
    },
}

impl BranchState {
    pub(crate) fn forget_at_ms(self) -> Option<u64> {
        match self {
            BranchState::Tried { .. } => None,
            BranchState::Confirmed { forget_at_ms }
            | BranchState::Cancelled { forget_at_ms }
            | BranchState::Suspended { forget_at_ms } => Some(forget_at_ms),
        }
    }
}

/// The fence of one (promotion, transaction): what was tried, and where it is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConsumeFence {
    /// `None` for a suspended branch (its try never came).
    pub buyer_id: Option<Id>,
    pub discount: u64,
    pub deadline_ms: u64,
    pub state: BranchState,
}

/// A time at which something falls due; ordered by time, then by what.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Timer {
    ConsumeDeadline { promotion_id: Id, txn: u64 },
    CouponDeadline { coupon_id: Id, txn: u64 },
    ConsumeForget { promotion_id: Id, txn: u64 },
    CouponForget { coupon_id: Id, txn: u64 },
}

impl Timer {
    fn command(&self) -> Command {
        match self.clone() {
            Timer::ConsumeDeadline { promotion_id, txn } => Command::CancelConsume { txn, promotion_id },
            Timer::CouponDeadline { coupon_id, txn } => Command::ReleaseCoupon { txn, coupon_id },
            Timer::ConsumeForget { promotion_id, txn } => Command::ForgetConsume { txn, promotion_id },
            Timer::CouponForget { coupon_id, txn } => Command::ForgetCouponFence { txn, coupon_id },
        }
    }
}

/// The pricing state of one executor: promotions with their counters,
/// coupon templates with their issued counts, coupons, and the fences of
/// the TCC branches.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Pricing {
    pub(crate) promotions: FastMap<Id, PromotionEntry>,
    pub(crate) templates: FastMap<Id, TemplateEntry>,
    pub(crate) coupons: FastMap<Id, Coupon>,
    pub(crate) coupons_by_buyer: FastMap<Id, BTreeSet<Id>>,
    pub(crate) consumes: BTreeMap<(Id, u64), ConsumeFence>,
    /// Fences of coupon branches that ended without a use: cancelled or
    /// suspended. A lock or a use lives in the coupon's own state.
    pub(crate) coupon_fences: BTreeMap<(Id, u64), BranchState>,
    pub(crate) timers: BTreeSet<(u64, Timer)>,
}

impl Pricing {
    pub fn new() -> Pricing {
        Pricing::default()
    }

    /// Applies one command at `now_ms`. Answers whether the state changed
    /// (a refusal or a repeat changes nothing) and the reply.
    pub fn apply(&mut self, command: &Command, now_ms: u64) -> (bool, Reply) {
        let result = match command {
            Command::CreatePromotion(promotion) => self.create_promotion(promotion),
            Command::CreateCouponTemplate(template) => self.create_template(template),
            Command::IssueCoupon { template_id, buyer_id, coupon_id } => {
                self.issue_coupon(template_id, buyer_id, coupon_id, now_ms)
            }
            Command::TryConsume { txn, promotion_id, buyer_id, discount, deadline_ms } => {
                self.try_consume(*txn, promotion_id, buyer_id, *discount, *deadline_ms, now_ms)
            }
            Command::ConfirmConsume { txn, promotion_id } => self.confirm_consume(*txn, promotion_id, now_ms),
            Command::CancelConsume { txn, promotion_id } => self.cancel_consume(*txn, promotion_id, now_ms),
            Command::LockCoupon { txn, coupon_id, buyer_id, deadline_ms } => {
                self.lock_coupon(*txn, coupon_id, buyer_id, *deadline_ms, now_ms)
            }
            Command::UseCoupon { txn, coupon_id } => self.use_coupon(*txn, coupon_id),
            Command::ReleaseCoupon { txn, coupon_id } => self.release_coupon(*txn, coupon_id, now_ms),
            Command::ForgetConsume { txn, promotion_id } => self.forget_consume(*txn, promotion_id, now_ms),
            Command::ForgetCouponFence { txn, coupon_id } => self.forget_coupon_fence(*txn, coupon_id, now_ms),
            Command::Restore { promotion_id, buyer_id, discount, uses } => {
                self.restore(promotion_id, buyer_id, *discount, *uses)
            }
            Command::ReturnCoupon { txn, coupon_id } => self.return_coupon(*txn, coupon_id),
        };
        match result {
            Ok(changed) => (changed, Ok(())),
            Err(code) => (false, Err(code)),
        }
    }

    /// The commands that fall due by `now_ms`, oldest first, at most
    /// [`MAX_DUE_COMMANDS`]: the cancels of reservations and coupon locks
    /// whose deadline passed, and the forgetting of fences past their
    /// retention. Until they are applied, the next call returns them again.
    pub fn due(&self, now_ms: u64) -> Vec<Command> {
        self.timers
            .iter()
            .take_while(|(at_ms, _)| *at_ms <= now_ms)
            .take(MAX_DUE_COMMANDS)
            .map(|(_, timer)| timer.command())
            .collect()
    }

    fn create_promotion(&mut self, promotion: &Promotion) -> Result<bool, ErrorCode> {
        if let Some(entry) = self.promotions.get(&promotion.id) {
            return if entry.promotion == *promotion { Ok(false) } else { Err(ErrorCode::ExistsWithDifferentFields) };
        }
        if self.promotions.len() >= MAX_PROMOTIONS {
            return Err(ErrorCode::InvalidRequest);
        }
        let entry = PromotionEntry {
            promotion: promotion.clone(),
            counters: Default::default(),
            buyer_uses: Default::default(),
        };
        self.promotions.insert(promotion.id.clone(), entry);
        Ok(true)
    }

    fn create_template(&mut self, template: &CouponTemplate) -> Result<bool, ErrorCode> {
        if let Some(entry) = self.templates.get(&template.id) {
            return if entry.template == *template { Ok(false) } else { Err(ErrorCode::ExistsWithDifferentFields) };
        }
        if self.templates.len() >= MAX_COUPON_TEMPLATES {
            return Err(ErrorCode::InvalidRequest);
        }
        self.templates.insert(template.id.clone(), TemplateEntry { template: template.clone(), issued: 0 });
        Ok(true)
    }

    fn issue_coupon(
        &mut self,
        template_id: &Id,
        buyer_id: &Id,
        coupon_id: &Id,
        now_ms: u64,
    ) -> Result<bool, ErrorCode> {
        if let Some(coupon) = self.coupons.get(coupon_id) {
            let same = coupon.template_id == *template_id && coupon.buyer_id == *buyer_id;
            return if same { Ok(false) } else { Err(ErrorCode::ExistsWithDifferentFields) };
        }
        let entry = self.templates.get_mut(template_id).ok_or(ErrorCode::CouponNotFound)?;
        if now_ms >= entry.template.valid_until_ms {
            return Err(ErrorCode::CouponExpired);
        }
        let held = self.coupons_by_buyer.get(buyer_id).map_or(0, BTreeSet::len);
        if entry.issued >= entry.template.total_issue || held >= MAX_COUPONS_PER_BUYER {
            return Err(ErrorCode::CouponsExhausted);
        }
        entry.issued += 1;
        assert!(entry.issued <= entry.template.total_issue, "template {template_id} issued past its total");
        let coupon = Coupon {
            id: coupon_id.clone(),
            template_id: template_id.clone(),
            buyer_id: buyer_id.clone(),
            state: CouponState::Available,
        };
        self.coupons.insert(coupon_id.clone(), coupon);
        self.coupons_by_buyer.entry(buyer_id.clone()).or_default().insert(coupon_id.clone());
        Ok(true)
    }

    /// A promotion with its counters.
    pub fn promotion(&self, promotion_id: &Id) -> Option<(&Promotion, PromotionCounters)> {
        self.promotions.get(promotion_id).map(|entry| (&entry.promotion, entry.counters))
    }

    /// Every promotion, by id.
    pub fn promotions(&self) -> Vec<&Promotion> {
        let mut promotions: Vec<&Promotion> = self.promotions.values().map(|entry| &entry.promotion).collect();
        promotions.sort_by(|a, b| a.id.cmp(&b.id));
        promotions
    }

    /// A buyer's uses of a promotion, confirmed and reserved (0 without a per-buyer limit).
    pub fn buyer_uses(&self, promotion_id: &Id, buyer_id: &Id) -> u64 {
        self.promotions.get(promotion_id).and_then(|entry| entry.buyer_uses.get(buyer_id)).copied().unwrap_or(0)
    }

    /// A coupon template with the number of coupons it issued.
    pub fn coupon_template(&self, template_id: &Id) -> Option<(&CouponTemplate, u64)> {
        self.templates.get(template_id).map(|entry| (&entry.template, entry.issued))
    }

    /// Every coupon template, by id.
    pub fn coupon_templates(&self) -> Vec<&CouponTemplate> {
        let mut templates: Vec<&CouponTemplate> = self.templates.values().map(|entry| &entry.template).collect();
        templates.sort_by(|a, b| a.id.cmp(&b.id));
        templates
    }

    pub fn coupon(&self, coupon_id: &Id) -> Option<&Coupon> {
        self.coupons.get(coupon_id)
    }

    /// A buyer's coupons (at most [`MAX_COUPONS_PER_BUYER`]), by id: what a quote takes.
    pub fn coupons_of(&self, buyer_id: &Id) -> Vec<Coupon> {
        self.coupons_by_buyer
            .get(buyer_id)
            .map_or_else(Vec::new, |ids| ids.iter().map(|id| self.coupons[id].clone()).collect())
    }

    /// The fence of a promotion branch.
    pub fn consume_fence(&self, promotion_id: &Id, txn: u64) -> Option<&ConsumeFence> {
        self.consumes.get(&(promotion_id.clone(), txn))
    }

    /// The fence of a coupon branch that ended without a use.
    pub fn coupon_fence(&self, coupon_id: &Id, txn: u64) -> Option<BranchState> {
        self.coupon_fences.get(&(coupon_id.clone(), txn)).copied()
    }

    /// A price book of these promotions and coupon templates with `skus`' prices.
    pub fn price_book(&self, skus: Vec<SkuPrice>) -> Result<PriceBook, ErrorCode> {
        let promotions = self.promotions.values().map(|entry| entry.promotion.clone()).collect();
        let templates = self.templates.values().map(|entry| entry.template.clone()).collect();
        PriceBook::new(skus, promotions, templates)
    }

    /// Checks that the counters agree with the fences and the limits, and
    /// the indexes with what they index. Run on every decoded checkpoint,
    /// and by the tests after every command. Visits everything in key
    /// order, so the same state always gives the same answer.
    pub fn check(&self) -> Result<(), &'static str> {
        self.check_promotions()?;
        self.check_coupons()?;
        if self.timers != self.expected_timers() {
            return Err("the timers differ from the fences and locks");
        }
        Ok(())
    }

    fn check_promotions(&self) -> Result<(), &'static str> {
        // What the tried fences hold, per promotion and per (promotion, buyer).
        let mut reserved: BTreeMap<&Id, (u64, u64)> = BTreeMap::new();
        let mut reserved_by_buyer: BTreeMap<(&Id, &Id), u64> = BTreeMap::new();
        for ((promotion_id, _), fence) in &self.consumes {
            let entry = self.promotions.get(promotion_id).ok_or("a fence of an unknown promotion")?;
            match (fence.state, &fence.buyer_id) {
                (BranchState::Suspended { .. }, None) => {}
                (BranchState::Suspended { .. }, Some(_)) | (_, None) => {
                    return Err("a fence's buyer does not fit its state")
                }
                _ if fence.discount == 0 => return Err("a fence of no discount"),
                (BranchState::Tried { .. }, Some(buyer_id)) => {
                    let slot = reserved.entry(promotion_id).or_default();
                    slot.0 = slot.0.checked_add(fence.discount).ok_or("reserved overflows")?;
                    slot.1 += 1;
                    if entry.promotion.per_buyer_limit.is_some() {
                        *reserved_by_buyer.entry((promotion_id, buyer_id)).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        for (promotion_id, entry) in sorted(self.promotions.iter()) {
            let (promotion, counters) = (&entry.promotion, entry.counters);
            let (discount, uses) = reserved.get(promotion_id).copied().unwrap_or((0, 0));
            if promotion.id != *promotion_id || counters.reserved != discount || counters.reserved_uses != uses {
                return Err("reserved counters differ from the tried fences");
            }
            let spent = counters.given.checked_add(counters.reserved).ok_or("given + reserved overflows")?;
            let used = counters.uses.checked_add(counters.reserved_uses).ok_or("uses overflow")?;
            if promotion.budget.is_some_and(|budget| spent > budget)
                || promotion.usage_limit.is_some_and(|limit| used > limit)
            {
                return Err("a promotion is over its budget or usage limit");
            }
            if promotion.per_buyer_limit.is_none() && !entry.buyer_uses.is_empty() {
                return Err("buyer uses without a per-buyer limit");
            }
            for (buyer_id, &buyer_uses) in sorted(entry.buyer_uses.iter()) {
                let tried = reserved_by_buyer.get(&(promotion_id, buyer_id)).copied().unwrap_or(0);
                let over = promotion.per_buyer_limit.is_some_and(|limit| buyer_uses > limit);
                if buyer_uses == 0 || buyer_uses < tried || over {
                    return Err("a buyer's uses are out of bounds");
                }
            }
        }
        if reserved_by_buyer.keys().any(|(p, b)| !self.promotions[*p].buyer_uses.contains_key(*b)) {
            return Err("a tried fence's buyer has no uses");
        }
        Ok(())
    }

    fn check_coupons(&self) -> Result<(), &'static str> {
        let mut issued: BTreeMap<&Id, u64> = BTreeMap::new();
        for (coupon_id, coupon) in sorted(self.coupons.iter()) {
            let template = self.templates.get(&coupon.template_id).ok_or("a coupon of an unknown template")?;
            *issued.entry(&template.template.id).or_default() += 1;
            let indexed = self.coupons_by_buyer.get(&coupon.buyer_id).is_some_and(|ids| ids.contains(coupon_id));
            if coupon.id != *coupon_id || !indexed {
                return Err("a coupon is not indexed under its buyer");
            }
        }
        for (template_id, entry) in sorted(self.templates.iter()) {
            let count = issued.get(template_id).copied().unwrap_or(0);
            if entry.template.id != *template_id || entry.issued != count || entry.issued > entry.template.total_issue {
                return Err("a template's issued count differs from its coupons");
            }
        }
        let indexed: usize = self.coupons_by_buyer.values().map(BTreeSet::len).sum();
        if indexed != self.coupons.len() || self.coupons_by_buyer.values().any(|ids| ids.len() > MAX_COUPONS_PER_BUYER)
        {
            return Err("the buyer index holds coupons that do not exist");
        }
        for ((coupon_id, txn), state) in &self.coupon_fences {
            let coupon = self.coupons.get(coupon_id).ok_or("a fence of an unknown coupon")?;
            let final_state = matches!(state, BranchState::Cancelled { .. } | BranchState::Suspended { .. });
            let held_by_it =
                matches!(coupon.state, CouponState::Locked { txn: t, .. } | CouponState::Used { txn: t } if t == *txn);
            if !final_state || held_by_it {
                return Err("a coupon fence contradicts its coupon");
            }
        }
        Ok(())
    }

    /// The timers the fences and coupon locks call for.
    pub(crate) fn expected_timers(&self) -> BTreeSet<(u64, Timer)> {
        let mut timers = BTreeSet::new();
        for ((promotion_id, txn), fence) in &self.consumes {
            let (promotion_id, txn) = (promotion_id.clone(), *txn);
            timers.insert(match fence.state {
                BranchState::Tried { deadline_ms } => (deadline_ms, Timer::ConsumeDeadline { promotion_id, txn }),
                state => (state.forget_at_ms().expect("final"), Timer::ConsumeForget { promotion_id, txn }),
            });
        }
        for coupon in self.coupons.values() {
            if let CouponState::Locked { txn, deadline_ms } = coupon.state {
                timers.insert((deadline_ms, Timer::CouponDeadline { coupon_id: coupon.id.clone(), txn }));
            }
        }
        for ((coupon_id, txn), state) in &self.coupon_fences {
            let forget_at_ms = state.forget_at_ms().unwrap_or(0);
            timers.insert((forget_at_ms, Timer::CouponForget { coupon_id: coupon_id.clone(), txn: *txn }));
        }
        timers
    }
}

impl UsageView for Pricing {
    fn usage(&self, promotion_id: &Id, buyer_id: &Id) -> PromotionUsage {
        let Some(entry) = self.promotions.get(promotion_id) else { return PromotionUsage::default() };
        let counters = entry.counters;
        PromotionUsage {
            discount: counters.given + counters.reserved,
            uses: counters.uses + counters.reserved_uses,
            buyer_uses: if entry.buyer_uses.is_empty() {
                0
            } else {
                entry.buyer_uses.get(buyer_id).copied().unwrap_or(0)
            },
        }
    }
}
