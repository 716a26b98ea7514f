//! The parts on one executor's pure core, under random commands, clock
//! advances, checkpoints and crashes: a crash rebuilds the core from its
//! last checkpoint and the log after it, and the rebuilt parts must be the
//! state the live core had (the same SKUs, sales, reservations, buyers'
//! counts, promotions' counters, coupons, and the same ids assigned next).
//! After every step: no oversell, no purchase limit passed, no budget
//! over-spent, no coupon used twice.

use peakstack_domain::{Amount, Currency, Id};
use peakstack_engine::checkpoint::Checkpoint;
use peakstack_engine::executor::{Effects, ExecutorCore};
use peakstack_engine::inventory::{self, NewFlashSale, NewSku};
use peakstack_engine::pricing::{
    self, CouponDiscount, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec, Scope,
};
use peakstack_engine::protocol::Input;
use peakstack_engine::{Layout, PartCommand};
use proptest::prelude::*;

const SKUS: usize = 3;
const BUYERS: u8 = 5;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn buyer_id(buyer: u8) -> Id {
    id(&format!("b{buyer}"))
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

#[derive(Clone, Debug)]
enum Step {
    Reserve { sku: usize, buyer: u8, quantity: u32 },
    Attempt { buyer: u8, quantity: u32 },
    Confirm { pick: usize },
    Cancel { pick: usize },
    Restock { sku: usize, quantity: u64 },
    Issue { buyer: u8 },
    Consume { buyer: u8, discount: u64 },
    FinishConsume { pick: usize, confirm: bool },
    LockCoupon { pick: usize, buyer: u8 },
    Advance { ms: u64 },
    Checkpoint,
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..SKUS, 0..BUYERS, 1u32..4).prop_map(|(sku, buyer, quantity)| Step::Reserve { sku, buyer, quantity }),
        (0..BUYERS, 1u32..3).prop_map(|(buyer, quantity)| Step::Attempt { buyer, quantity }),
        (0usize..32).prop_map(|pick| Step::Confirm { pick }),
        (0usize..32).prop_map(|pick| Step::Cancel { pick }),
        (0..SKUS, 1u64..5).prop_map(|(sku, quantity)| Step::Restock { sku, quantity }),
        (0..BUYERS).prop_map(|buyer| Step::Issue { buyer }),
        (0..BUYERS, 1u64..400).prop_map(|(buyer, discount)| Step::Consume { buyer, discount }),
        (0usize..32, any::<bool>()).prop_map(|(pick, confirm)| Step::FinishConsume { pick, confirm }),
        (0usize..32, 0..BUYERS).prop_map(|(pick, buyer)| Step::LockCoupon { pick, buyer }),
        (1u64..3_000).prop_map(|ms| Step::Advance { ms }),
        Just(Step::Checkpoint),
        Just(Step::Crash),
    ]
}

/// One executor's core with its durable log and last checkpoint.
struct Node {
    layout: Layout,
    core: ExecutorCore,
    /// Inputs logged since the checkpoint, with their batch time.
    log: Vec<(u64, Input)>,
    checkpoint: Option<Vec<u8>>,
    sequence: u64,
}

impl Node {
    fn new() -> Node {
        let layout = Layout::new(8, 1).unwrap();
        Node { layout, core: ExecutorCore::new(0, layout), log: Vec::new(), checkpoint: None, sequence: 0 }
    }

    /// A client's command, as the runtime runs it: ids assigned, applied,
    /// logged when it changed state. Returns the reply.
    fn run(&mut self, mut command: PartCommand, now_ms: u64) -> peakstack_engine::PartReply {
        self.tick(now_ms);
        self.core.assign_part_ids(&mut command);
        let mut fx = peakstack_engine::executor::Effects::default();
        let (changed, reply) = self.core.apply_part(&command, now_ms, &mut fx);
        if changed {
            self.log.push((now_ms, Input::Part(command)));
            self.sequence += 1;
        }
        reply
    }

    /// The deadlines due, as the runtime's tick applies them.
    fn tick(&mut self, now_ms: u64) {
        for command in self.core.parts().due(now_ms) {
            let input = Input::Part(command);
            let (changed, _) = self.core.apply(&input, now_ms, None, &mut Effects::default());
            if changed {
                self.log.push((now_ms, input));
                self.sequence += 1;
            }
        }
    }

    fn take_checkpoint(&mut self, now_ms: u64) {
        let checkpoint = self.core.checkpoint(self.sequence, now_ms, 0, Vec::new());
        self.checkpoint = Some(checkpoint.encode());
        self.log.clear();
    }

    /// A crash: the core rebuilt from the checkpoint and the log after it.
    fn recover(&self) -> ExecutorCore {
        let mut core = match &self.checkpoint {
            Some(bytes) => ExecutorCore::from_checkpoint(0, self.layout, Checkpoint::decode(bytes).unwrap()).unwrap(),
            None => ExecutorCore::new(0, self.layout),
        };
        for (time_ms, input) in &self.log {
            core.apply(input, *time_ms, None, &mut Effects::default());
        }
        core
    }
}

fn setup(node: &mut Node) {
    for sku in 0..SKUS {
        let new = NewSku {
            id: id(&format!("s{sku}")),
            merchant_id: id("m1"),
            title: "Thing".into(),
            price: Amount::new(1000).unwrap(),
            currency: usd(),
            stock: 6,
            per_buyer_limit: Some(4),
        };
        assert!(matches!(
            node.run(PartCommand::Inventory(inventory::Command::CreateSku(new)), 0),
            peakstack_engine::PartReply::Inventory(Ok(_))
        ));
    }
    let sale = NewFlashSale {
        id: id("f1"),
        sku_id: id("s0"),
        price: Amount::new(1).unwrap(),
        quantity: 3,
        starts_at_ms: 0,
        ends_at_ms: 40_000,
        per_buyer_limit: 2,
        pay_within_ms: 5_000,
    };
    node.run(PartCommand::Inventory(inventory::Command::CreateFlashSale(sale)), 0);
    let promotion = Promotion::new(PromotionSpec {
        id: id("p1"),
        currency: usd(),
        kind: PromotionKind::AmountOff { amount: 500 },
        scope: Scope::Everything,
        starts_at_ms: 0,
        ends_at_ms: 1 << 40,
        group: None,
        priority: 0,
        budget: Some(1_000),
        usage_limit: Some(6),
        per_buyer_limit: Some(2),
    })
    .unwrap();
    node.run(PartCommand::Pricing(pricing::Command::CreatePromotion(promotion)), 0);
    let template = CouponTemplate::new(CouponTemplateSpec {
        id: id("t1"),
        currency: usd(),
        discount: CouponDiscount::AmountOff { amount: 100 },
        min_spend: 0,
        scope: Scope::Everything,
        valid_from_ms: 0,
        valid_until_ms: 1 << 40,
        total_issue: 4,
    })
    .unwrap();
    node.run(PartCommand::Pricing(pricing::Command::CreateCouponTemplate(template)), 0);
}

fn check_invariants(core: &ExecutorCore) -> Result<(), TestCaseError> {
    let parts = core.parts();
    for sku in 0..SKUS {
        let s = parts.inventory.sku(&id(&format!("s{sku}"))).unwrap();
        prop_assert!(s.sold + s.reserved + s.on_sale <= s.stock, "oversell: {s:?}");
        for buyer in 0..BUYERS {
            let held = parts.inventory.buyer_units_of_sku(&s.id, &buyer_id(buyer));
            prop_assert!(held <= 4);
        }
    }
    let f1 = parts.inventory.sale(&id("f1")).unwrap();
    prop_assert!(f1.sold + f1.reserved <= f1.quantity);
    for buyer in 0..BUYERS {
        let held = parts.inventory.buyer_units_of_sale(&id("f1"), &buyer_id(buyer));
        prop_assert!(held <= 2);
    }
    let (_, counters) = parts.pricing.promotion(&id("p1")).unwrap();
    prop_assert!(counters.given + counters.reserved <= 1_000, "{counters:?}");
    prop_assert!(counters.uses + counters.reserved_uses <= 6, "{counters:?}");
    prop_assert!(parts.pricing.coupon_template(&id("t1")).unwrap().1 <= 4);
    Ok(())
}

fn run_case(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut node = Node::new();
    setup(&mut node);
    let mut now = 1u64;
    let (mut reservations, mut coupons, mut txns): (Vec<Id>, Vec<Id>, Vec<u64>) = (Vec::new(), Vec::new(), Vec::new());
    let mut next_txn = 1u64;
    for step in steps {
        let command = match step {
            Step::Reserve { sku, buyer, quantity } => PartCommand::Inventory(inventory::Command::Reserve {
                shard: id(&format!("s{sku}")).shard(8),
                sku_id: id(&format!("s{sku}")),
                buyer_id: id(&format!("b{buyer}")),
                quantity: *quantity,
                hold_ms: 4_000,
            }),
            Step::Attempt { buyer, quantity } => PartCommand::Inventory(inventory::Command::Attempt {
                shard: id("s0").shard(8),
                sale_id: id("f1"),
                buyer_id: id(&format!("b{buyer}")),
                quantity: *quantity,
            }),
            Step::Confirm { pick } | Step::Cancel { pick } if !reservations.is_empty() => {
                let reservation_id = reservations[pick % reservations.len()].clone();
                PartCommand::Inventory(match step {
                    Step::Confirm { .. } => inventory::Command::Confirm { reservation_id },
                    _ => inventory::Command::Cancel { reservation_id },
                })
            }
            Step::Restock { sku, quantity } => PartCommand::Inventory(inventory::Command::Restock {
                sku_id: id(&format!("s{sku}")),
                quantity: *quantity,
            }),
            Step::Issue { buyer } => PartCommand::Pricing(pricing::Command::IssueCoupon {
                template_id: id("t1"),
                buyer_id: id(&format!("b{buyer}")),
                coupon_id: id("placeholder"),
            }),
            Step::Consume { buyer, discount } => {
                let txn = next_txn;
                next_txn += 1;
                txns.push(txn);
                PartCommand::Pricing(pricing::Command::TryConsume {
                    txn,
                    promotion_id: id("p1"),
                    buyer_id: id(&format!("b{buyer}")),
                    discount: *discount,
                    deadline_ms: now + 6_000,
                })
            }
            Step::FinishConsume { pick, confirm } if !txns.is_empty() => {
                let txn = txns[pick % txns.len()];
                PartCommand::Pricing(match confirm {
                    true => pricing::Command::ConfirmConsume { txn, promotion_id: id("p1") },
                    false => pricing::Command::CancelConsume { txn, promotion_id: id("p1") },
                })
            }
            Step::LockCoupon { pick, buyer } if !coupons.is_empty() => {
                let txn = next_txn;
                next_txn += 1;
                PartCommand::Pricing(pricing::Command::LockCoupon {
                    txn,
                    coupon_id: coupons[pick % coupons.len()].clone(),
                    buyer_id: id(&format!("b{buyer}")),
                    deadline_ms: now + 3_000,
                })
            }
            Step::Advance { ms } => {
                now += ms;
                node.tick(now);
                check_invariants(&node.core)?;
                continue;
            }
            Step::Checkpoint => {
                node.take_checkpoint(now);
                continue;
            }
            Step::Crash => {
                let recovered = node.recover();
                prop_assert!(
                    recovered.parts().inventory.same_state(&node.core.parts().inventory),
                    "the inventory a crash rebuilds is the one the core had"
                );
                prop_assert_eq!(&recovered.parts().pricing, &node.core.parts().pricing);
                node.core = recovered;
                continue;
            }
            _ => continue,
        };
        let issuable =
            matches!(step, Step::Issue { .. }) && node.core.parts().pricing.coupon_template(&id("t1")).unwrap().1 < 4;
        let reply = node.run(command, now);
        if issuable {
            prop_assert!(matches!(reply, peakstack_engine::PartReply::Pricing(Ok(()), Some(_))), "{reply:?}");
        }
        match reply {
            peakstack_engine::PartReply::Inventory(Ok(inventory::Answer::Reservation(r)))
                if r.state == inventory::ReservationState::Reserved =>
            {
                reservations.push(r.id)
            }
            peakstack_engine::PartReply::Pricing(Ok(()), Some(coupon)) => {
                prop_assert!(!coupons.contains(&coupon), "coupon id {coupon} assigned twice");
                coupons.push(coupon)
            }
            _ => {}
        }
        check_invariants(&node.core)?;
    }
    // Every coupon issued is there, under the id it was answered with.
    prop_assert_eq!(node.core.parts().pricing.coupon_template(&id("t1")).unwrap().1, coupons.len() as u64);
    for coupon in &coupons {
        prop_assert!(node.core.parts().pricing.coupon(coupon).is_some(), "coupon {coupon} is gone");
    }
    let recovered = node.recover();
    prop_assert!(recovered.parts().inventory.same_state(&node.core.parts().inventory));
    prop_assert_eq!(&recovered.parts().pricing, &node.core.parts().pricing);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn a_crash_rebuilds_the_parts_the_core_had(steps in proptest::collection::vec(step(), 1..150)) {
        run_case(&steps)?;
    }
}
