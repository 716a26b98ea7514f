//! Random sequences of TCC commands, deadline expiries and retention on one
//! promotion with a budget and limits and on a few coupons, against a
//! simple model: the answers and the counters must be the model's, the
//! budget is never over-spent and no coupon is used twice.

use std::collections::BTreeMap;

use peakstack_domain::{Currency, ErrorCode, Id};
use peakstack_pricing::*;
use proptest::prelude::*;

const BUYERS: usize = 3;
const COUPONS: usize = 3;
/// Longest hold the generated tries and locks ask for.
const HOLD_MS: u64 = 40;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn buyer(n: usize) -> Id {
    id(&format!("b{n}"))
}

/// Coupon n belongs to buyer n % 2.
fn coupon(n: usize) -> Id {
    id(&format!("c{n}"))
}

#[derive(Clone, Debug)]
enum Op {
    Try {
        txn: u64,
        buyer: usize,
        discount: u64,
        hold_ms: u64,
    },
    Confirm {
        txn: u64,
    },
    Cancel {
        txn: u64,
    },
    Lock {
        txn: u64,
        coupon: usize,
        buyer: usize,
        hold_ms: u64,
    },
    Use {
        txn: u64,
        coupon: usize,
    },
    Release {
        txn: u64,
        coupon: usize,
    },
    /// Time passes; everything due is applied.
    Wait {
        ms: u64,
    },
    /// Past the fences' retention.
    WaitRetention,
}

fn op() -> impl Strategy<Value = Op> {
    let txn = 0u64..12;
    prop_oneof![
        4 => (txn.clone(), 0..BUYERS, 1u64..400, 1u64..HOLD_MS)
            .prop_map(|(txn, buyer, discount, hold_ms)| Op::Try { txn, buyer, discount, hold_ms }),
        2 => txn.clone().prop_map(|txn| Op::Confirm { txn }),
        2 => txn.clone().prop_map(|txn| Op::Cancel { txn }),
        3 => (txn.clone(), 0..COUPONS, 0..2usize, 1u64..HOLD_MS)
            .prop_map(|(txn, coupon, buyer, hold_ms)| Op::Lock { txn, coupon, buyer, hold_ms }),
        2 => (txn.clone(), 0..COUPONS).prop_map(|(txn, coupon)| Op::Use { txn, coupon }),
        2 => (txn, 0..COUPONS).prop_map(|(txn, coupon)| Op::Release { txn, coupon }),
        2 => (0u64..30).prop_map(|ms| Op::Wait { ms }),
        1 => Just(Op::WaitRetention),
    ]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Branch {
    Tried { buyer: usize, discount: u64, deadline_ms: u64 },
    Confirmed { buyer: usize, discount: u64, deadline_ms: u64, forget_at_ms: u64 },
    Cancelled { forget_at_ms: u64 },
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum CouponModel {
    Available,
    Locked { txn: u64, deadline_ms: u64 },
    Used { txn: u64 },
}

/// What the state machine should do, written as plainly as possible.
struct Model {
    budget: u64,
    usage_limit: u64,
    per_buyer_limit: u64,
    branches: BTreeMap<u64, Branch>,
    given: u64,
    uses: u64,
    confirmed_by_buyer: [u64; BUYERS],
    coupons: [CouponModel; COUPONS],
    /// (coupon, txn) -> forget time, for branches that ended without a use.
    coupon_fences: BTreeMap<(usize, u64), u64>,
    uses_of_coupon: [u32; COUPONS],
}

type Answer = (bool, Reply);

const DONE: Answer = (true, Ok(()));
const SAME: Answer = (false, Ok(()));

fn refused(code: ErrorCode) -> Answer {
    (false, Err(code))
}

impl Model {
    fn reserved(&self) -> (u64, u64) {
        self.branches.values().fold((0, 0), |(discount, uses), branch| match branch {
            Branch::Tried { discount: d, .. } => (discount + d, uses + 1),
            _ => (discount, uses),
        })
    }

    fn buyer_uses(&self, buyer: usize) -> u64 {
        let tried =
            self.branches.values().filter(|b| matches!(b, Branch::Tried { buyer: x, .. } if *x == buyer)).count();
        self.confirmed_by_buyer[buyer] + tried as u64
    }

    fn try_(&mut self, txn: u64, buyer: usize, discount: u64, deadline_ms: u64) -> Answer {
        match self.branches.get(&txn) {
            Some(Branch::Cancelled { .. }) => return refused(ErrorCode::BranchCancelled),
            Some(Branch::Tried { buyer: b, discount: d, deadline_ms: t })
            | Some(Branch::Confirmed { buyer: b, discount: d, deadline_ms: t, .. }) => {
                let same = (*b, *d, *t) == (buyer, discount, deadline_ms);
                return if same { SAME } else { refused(ErrorCode::ExistsWithDifferentFields) };
            }
            None => {}
        }
        let (reserved, reserved_uses) = self.reserved();
        if self.uses + reserved_uses >= self.usage_limit {
            return refused(ErrorCode::PromotionUsageLimitReached);
        }
        if self.buyer_uses(buyer) >= self.per_buyer_limit {
            return refused(ErrorCode::PromotionBuyerLimitReached);
        }
        if self.given + reserved + discount > self.budget {
            return refused(ErrorCode::PromotionBudgetExhausted);
        }
        self.branches.insert(txn, Branch::Tried { buyer, discount, deadline_ms });
        DONE
    }

    fn confirm(&mut self, txn: u64, now_ms: u64) -> Answer {
        match self.branches.get(&txn).copied() {
            None => refused(ErrorCode::ReservationNotFound),
            Some(Branch::Tried { buyer, discount, deadline_ms }) => {
                self.given += discount;
                self.uses += 1;
                self.confirmed_by_buyer[buyer] += 1;
                let forget_at_ms = now_ms + FENCE_RETENTION_MS;
                self.branches.insert(txn, Branch::Confirmed { buyer, discount, deadline_ms, forget_at_ms });
                DONE
            }
            Some(Branch::Confirmed { .. }) => SAME,
            Some(Branch::Cancelled { .. }) => refused(ErrorCode::BranchCancelled),
        }
    }

    fn cancel(&mut self, txn: u64, now_ms: u64) -> Answer {
        let cancelled = Branch::Cancelled { forget_at_ms: now_ms + FENCE_RETENTION_MS };
        match self.branches.get(&txn) {
            None | Some(Branch::Tried { .. }) => {
                self.branches.insert(txn, cancelled);
                DONE
            }
            Some(Branch::Cancelled { .. }) => SAME,
            Some(Branch::Confirmed { .. }) => refused(ErrorCode::ReservationConfirmed),
        }
    }

    fn lock(&mut self, txn: u64, coupon: usize, buyer: usize, deadline_ms: u64) -> Answer {
        if coupon % 2 != buyer {
            return refused(ErrorCode::CouponNotApplicable);
        }
        if self.coupon_fences.contains_key(&(coupon, txn)) {
            return refused(ErrorCode::BranchCancelled);
        }
        match self.coupons[coupon] {
            CouponModel::Locked { txn: t, deadline_ms: d } if t == txn => {
                if d == deadline_ms {
                    SAME
                } else {
                    refused(ErrorCode::ExistsWithDifferentFields)
                }
            }
            CouponModel::Used { txn: t } if t == txn => SAME,
            CouponModel::Locked { .. } | CouponModel::Used { .. } => refused(ErrorCode::CouponAlreadyUsed),
            CouponModel::Available => {
                self.coupons[coupon] = CouponModel::Locked { txn, deadline_ms };
                DONE
            }
        }
    }

    fn use_(&mut self, txn: u64, coupon: usize) -> Answer {
        match self.coupons[coupon] {
            CouponModel::Locked { txn: t, .. } if t == txn => {
                self.coupons[coupon] = CouponModel::Used { txn };
                self.uses_of_coupon[coupon] += 1;
                DONE
            }
            CouponModel::Used { txn: t } if t == txn => SAME,
            _ if self.coupon_fences.contains_key(&(coupon, txn)) => refused(ErrorCode::BranchCancelled),
            _ => refused(ErrorCode::ReservationNotFound),
        }
    }

    fn release(&mut self, txn: u64, coupon: usize, now_ms: u64) -> Answer {
        match self.coupons[coupon] {
            CouponModel::Locked { txn: t, .. } if t == txn => {
                self.coupons[coupon] = CouponModel::Available;
            }
            CouponModel::Used { txn: t } if t == txn => return refused(ErrorCode::ReservationConfirmed),
            _ if self.coupon_fences.contains_key(&(coupon, txn)) => return SAME,
            _ => {}
        }
        self.coupon_fences.insert((coupon, txn), now_ms + FENCE_RETENTION_MS);
        DONE
    }

    /// Time passed to `now_ms`: holds past their deadline are cancelled, fences past their retention forgotten.
    fn wait(&mut self, now_ms: u64) {
        let expired: Vec<u64> = self
            .branches
            .iter()
            .filter(|(_, b)| matches!(b, Branch::Tried { deadline_ms, .. } if *deadline_ms <= now_ms))
            .map(|(txn, _)| *txn)
            .collect();
        let forgotten: Vec<u64> = self
            .branches
            .iter()
            .filter(|(_, b)| match b {
                Branch::Confirmed { forget_at_ms, .. } | Branch::Cancelled { forget_at_ms } => *forget_at_ms <= now_ms,
                Branch::Tried { .. } => false,
            })
            .map(|(txn, _)| *txn)
            .collect();
        for txn in forgotten {
            self.branches.remove(&txn);
        }
        for txn in expired {
            assert_eq!(self.cancel(txn, now_ms), DONE);
        }
        self.coupon_fences.retain(|_, forget_at_ms| *forget_at_ms > now_ms);
        for coupon in 0..COUPONS {
            if let CouponModel::Locked { txn, deadline_ms } = self.coupons[coupon] {
                if deadline_ms <= now_ms {
                    assert_eq!(self.release(txn, coupon, now_ms), DONE);
                }
            }
        }
    }
}

fn setup(budget: u64, usage_limit: u64, per_buyer_limit: u64) -> Pricing {
    let usd = Currency::parse("USD").unwrap();
    let mut pricing = Pricing::new();
    let promotion = Promotion::new(PromotionSpec {
        id: id("p"),
        currency: usd,
        kind: PromotionKind::AmountOff { amount: 100 },
        scope: Scope::Everything,
        starts_at_ms: 0,
        ends_at_ms: u64::MAX,
        group: None,
        priority: 0,
        budget: Some(budget),
        usage_limit: Some(usage_limit),
        per_buyer_limit: Some(per_buyer_limit),
    })
    .unwrap();
    let template = CouponTemplate::new(CouponTemplateSpec {
        id: id("t"),
        currency: usd,
        discount: CouponDiscount::AmountOff { amount: 100 },
        min_spend: 0,
        scope: Scope::Everything,
        valid_from_ms: 0,
        valid_until_ms: u64::MAX,
        total_issue: COUPONS as u64,
    })
    .unwrap();
    assert_eq!(pricing.apply(&Command::CreatePromotion(promotion), 0), DONE);
    assert_eq!(pricing.apply(&Command::CreateCouponTemplate(template), 0), DONE);
    for n in 0..COUPONS {
        let issue = Command::IssueCoupon { template_id: id("t"), buyer_id: buyer(n % 2), coupon_id: coupon(n) };
        assert_eq!(pricing.apply(&issue, 0), DONE);
    }
    pricing
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_state_machine_follows_the_model(
        budget in 1u64..1000,
        usage_limit in 1u64..8,
        per_buyer_limit in 1u64..4,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut pricing = setup(budget, usage_limit, per_buyer_limit);
        let mut model = Model {
            budget,
            usage_limit,
            per_buyer_limit,
            branches: BTreeMap::new(),
            given: 0,
            uses: 0,
            confirmed_by_buyer: [0; BUYERS],
            coupons: [CouponModel::Available; COUPONS],
            coupon_fences: BTreeMap::new(),
            uses_of_coupon: [0; COUPONS],
        };
        let promotion_id = id("p");
        let mut now_ms = 1u64;
        for op in &ops {
            let (command, expected) = match *op {
                Op::Try { txn, buyer: b, discount, hold_ms } => (
                    Command::TryConsume { txn, promotion_id: promotion_id.clone(), buyer_id: buyer(b), discount, deadline_ms: now_ms + hold_ms },
                    model.try_(txn, b, discount, now_ms + hold_ms),
                ),
                Op::Confirm { txn } => (Command::ConfirmConsume { txn, promotion_id: promotion_id.clone() }, model.confirm(txn, now_ms)),
                Op::Cancel { txn } => (Command::CancelConsume { txn, promotion_id: promotion_id.clone() }, model.cancel(txn, now_ms)),
                Op::Lock { txn, coupon: c, buyer: b, hold_ms } => (
                    Command::LockCoupon { txn, coupon_id: coupon(c), buyer_id: buyer(b), deadline_ms: now_ms + hold_ms },
                    model.lock(txn, c, b, now_ms + hold_ms),
                ),
                Op::Use { txn, coupon: c } => (Command::UseCoupon { txn, coupon_id: coupon(c) }, model.use_(txn, c)),
                Op::Release { txn, coupon: c } => (Command::ReleaseCoupon { txn, coupon_id: coupon(c) }, model.release(txn, c, now_ms)),
                Op::Wait { ms: 0 } => continue,
                Op::Wait { .. } | Op::WaitRetention => {
                    now_ms += match *op { Op::Wait { ms } => ms, _ => FENCE_RETENTION_MS + 1 };
                    // Apply what falls due, as the engine would, until nothing is left.
                    loop {
                        let due = pricing.due(now_ms);
                        if due.is_empty() {
                            break;
                        }
                        for command in &due {
                            let (_, reply) = pricing.apply(command, now_ms);
                            prop_assert_eq!(reply, Ok(()), "{:?}", command);
                        }
                    }
                    model.wait(now_ms);
                    pricing.check().map_err(TestCaseError::fail)?;
                    prop_assert!(pricing.due(now_ms).is_empty());
                    continue;
                }
            };
            let actual = pricing.apply(&command, now_ms);
            prop_assert_eq!(actual, expected, "{:?} at {}", command, now_ms);
            pricing.check().map_err(TestCaseError::fail)?;

            // The counters are the model's.
            let (_, counters) = pricing.promotion(&promotion_id).unwrap();
            let (reserved, reserved_uses) = model.reserved();
            prop_assert_eq!(counters, PromotionCounters { given: model.given, reserved, uses: model.uses, reserved_uses });
            prop_assert!(counters.given + counters.reserved <= budget, "over budget");
            prop_assert!(counters.uses + counters.reserved_uses <= usage_limit);
            for b in 0..BUYERS {
                prop_assert_eq!(pricing.buyer_uses(&promotion_id, &buyer(b)), model.buyer_uses(b));
                prop_assert!(model.buyer_uses(b) <= per_buyer_limit);
            }
            for c in 0..COUPONS {
                let state = pricing.coupon(&coupon(c)).unwrap().state;
                let expected = match model.coupons[c] {
                    CouponModel::Available => CouponState::Available,
                    CouponModel::Locked { txn, deadline_ms } => CouponState::Locked { txn, deadline_ms },
                    CouponModel::Used { txn } => CouponState::Used { txn },
                };
                prop_assert_eq!(state, expected);
                prop_assert!(model.uses_of_coupon[c] <= 1, "coupon used twice");
            }
            // Nothing outlives its deadline once what is due is applied.
            for command in pricing.due(now_ms) {
                prop_assert!(false, "{:?} due at {} and not applied", command, now_ms);
            }
        }
        // The state survives a checkpoint.
        let mut bytes = Vec::new();
        pricing.encode_checkpoint(&mut bytes);
        prop_assert_eq!(Pricing::decode_checkpoint(&bytes), Ok(pricing));
    }
}

proptest! {
    /// Arbitrary bytes decode to an error or to something that encodes back
    /// to the same bytes; never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), tag in 1u8..12) {
        if let Ok(command) = decode_command(&bytes) {
            let mut again = Vec::new();
            encode_command(&command, &mut again);
            prop_assert_eq!(&again, &bytes);
        }
        // With a valid version and tag, the fields themselves are what is random.
        if bytes.len() >= 2 {
            bytes[0] = COMMAND_FORMAT_VERSION;
            bytes[1] = tag;
            let _ = decode_command(&bytes);
            bytes[0] = CHECKPOINT_FORMAT_VERSION;
        }
        if let Ok(pricing) = Pricing::decode_checkpoint(&bytes) {
            prop_assert_eq!(pricing.check(), Ok(()));
        }
    }
}
