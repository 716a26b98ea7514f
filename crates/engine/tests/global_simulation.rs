//! A deterministic simulation of global transactions with part branches
//! (checkouts: stock reserved, a promotion's budget consumed, a coupon
//! locked, the orders placed, the buyer's money moved) across three
//! executors, over a network that reorders and redelivers, with crashes
//! (an executor replays its log, from its last checkpoint), checkpoints
//! whatever is in flight, process crashes that lose every message in
//! flight, and clocks that pass transactions' deadlines.
//!
//! The pure [`ExecutorCore`]s are driven by hand: every applied input is
//! durable at once (the main simulation, `simulation.rs`, covers volatile
//! batches for the ledger's own transactions); a step chooses what happens
//! next from a seeded generator. At the end the system is driven to
//! quiescence and every part must agree with the ledger and with what
//! clients were told: a checkout answered ok is completed, one answered
//! with a refusal is not; stock sold, budget given, coupons used and money
//! moved are exactly those of the completed checkouts; nothing is held,
//! reserved or locked, no transaction is in flight and no fence is left.
//!
//! `GLOBAL_SIM_SEEDS=2000 cargo test -p peakstack-engine --test global_simulation` for a longer hunt.

use std::collections::{BTreeMap, VecDeque};

use peakstack_domain::ledger::settle_account_id;
use peakstack_domain::{
    AccountFlags, Amount, AssignedKind, Currency, Details, ErrorCode, Id, NewAccount, TransferRequest,
};
use peakstack_engine::checkpoint::Checkpoint;
use peakstack_engine::executor::{lost_forgets, Effects, ExecutorCore};
use peakstack_engine::inventory::{self, NewSku};
use peakstack_engine::orders::{
    self, CaptureMode, CheckoutState, NewCheckout, NewOrder, OrderLine, OrderState, PaymentState,
};
use peakstack_engine::pricing::{
    self, CouponDiscount, CouponState, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec,
    Scope,
};
use peakstack_engine::protocol::{ExecutorId, Input, PeerMsg, TransferResult};
use peakstack_engine::tcc::{FENCE_RETENTION_MS, TXN_DEADLINE_MS};
use peakstack_engine::{Layout, PartCommand};

const SHARDS: u32 = 8;
const EXECUTORS: u16 = 3;
const SKUS: usize = 4;
const BUYERS: usize = 4;
const STOCK: u64 = 6;
const BUDGET: u64 = 50;
const STEPS: usize = 150;
const START_MS: u64 = 1_000_000;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn cny() -> Currency {
    Currency::parse("CNY").unwrap()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An id with `prefix` whose shard lives on `executor`.
fn name_on(layout: Layout, prefix: &str, executor: ExecutorId) -> Id {
    (0..).map(|i| id(&format!("{prefix}{i}"))).find(|c| layout.executor_of_id(c) == executor).expect("some id")
}

struct Node {
    core: ExecutorCore,
    /// (time, input) of every input that changed state: all durable.
    log: Vec<(u64, Input)>,
    /// The last checkpoint's bytes and how many inputs of `log` it covers.
    checkpoint: Option<(Vec<u8>, usize)>,
}

/// A checkout a client submitted, and what it was told.
struct Submitted {
    id: Id,
    home: ExecutorId,
    discount: Option<u64>,
    coupon: Option<Id>,
    results: Vec<Option<TransferResult>>,
    /// Its coordinator crashed before answering: no answer will come.
    lost: bool,
}

struct World {
    layout: Layout,
    rng: u64,
    now_ms: u64,
    nodes: Vec<Node>,
    queues: BTreeMap<(ExecutorId, ExecutorId), VecDeque<PeerMsg>>,
    /// Messages delivered per queue, for a step to hand out again.
    delivered: BTreeMap<(ExecutorId, ExecutorId), Vec<PeerMsg>>,
    skus: Vec<Id>,
    promotion: Id,
    wallets: Vec<(Id, Id)>,
    /// Coupons by buyer index, each tried by at most a few checkouts.
    coupons: Vec<Id>,
    submitted: Vec<Submitted>,
}

impl World {
    fn new(seed: u64) -> World {
        let layout = Layout::new(SHARDS, EXECUTORS).unwrap();
        let nodes = (0..EXECUTORS)
            .map(|e| Node { core: ExecutorCore::new(e, layout), log: Vec::new(), checkpoint: None })
            .collect();
        let mut world = World {
            layout,
            rng: seed,
            now_ms: START_MS,
            nodes,
            queues: BTreeMap::new(),
            delivered: BTreeMap::new(),
            skus: Vec::new(),
            promotion: name_on(layout, "promo", 1),
            wallets: Vec::new(),
            coupons: Vec::new(),
            submitted: Vec::new(),
        };
        world.setup();
        world
    }

    fn random(&mut self, n: usize) -> usize {
        (splitmix64(&mut self.rng) % n as u64) as usize
    }

    /// Applies an input on executor `e` (durable at once) and sends its messages.
    fn apply(&mut self, e: ExecutorId, input: Input, client: Option<u64>) {
        let now_ms = self.now_ms;
        let node = &mut self.nodes[usize::from(e)];
        let mut fx = Effects::default();
        let (changed, _) = node.core.apply(&input, now_ms, client, &mut fx);
        node.core.ledger().assert_balanced();
        if changed {
            node.log.push((now_ms, input));
        } else {
            assert!(fx.outbox.is_empty() && fx.finished.is_empty(), "an input that changed nothing has effects");
        }
        for (dest, message) in std::mem::take(&mut fx.outbox) {
            self.queues.entry((e, dest)).or_default().push_back(message);
        }
        for (tag, index, result) in fx.drain_finished() {
            let submitted = &mut self.submitted[tag as usize];
            assert!(submitted.results[index].is_none(), "checkout {} answered twice", submitted.id);
            submitted.results[index] = Some(result);
        }
    }

    fn part(&mut self, e: ExecutorId, mut command: PartCommand) {
        self.nodes[usize::from(e)].core.assign_part_ids(&mut command);
        self.apply(e, Input::Part(command), None);
    }

    fn setup(&mut self) {
        let layout = self.layout;
        for s in 0..SKUS {
            let sku = name_on(layout, &format!("sku{s}-"), (s % usize::from(EXECUTORS)) as ExecutorId);
            let new = NewSku {
                id: sku.clone(),
                merchant_id: id(if s % 2 == 0 { "m1" } else { "m2" }),
                title: "thing".into(),
                price: Amount::new(10 + s as u64).unwrap(),
                currency: cny(),
                stock: STOCK,
                per_buyer_limit: None,
            };
            self.part(layout.executor_of_id(&sku), PartCommand::Inventory(inventory::Command::CreateSku(new)));
            self.skus.push(sku);
        }
        let promotion = Promotion::new(PromotionSpec {
            id: self.promotion.clone(),
            currency: cny(),
            kind: PromotionKind::AmountOff { amount: 7 },
            scope: Scope::Everything,
            starts_at_ms: 0,
            ends_at_ms: u64::MAX / 2,
            group: None,
            priority: 0,
            budget: Some(BUDGET),
            usage_limit: Some(6),
            per_buyer_limit: None,
        })
        .unwrap();
        self.part(1, PartCommand::Pricing(pricing::Command::CreatePromotion(promotion)));
        let template_id = name_on(layout, "tpl", 2);
        let template = CouponTemplate::new(CouponTemplateSpec {
            id: template_id.clone(),
            currency: cny(),
            discount: CouponDiscount::AmountOff { amount: 5 },
            min_spend: 0,
            scope: Scope::Everything,
            valid_from_ms: 0,
            valid_until_ms: u64::MAX / 2,
            total_issue: 100,
        })
        .unwrap();
        self.part(2, PartCommand::Pricing(pricing::Command::CreateCouponTemplate(template)));
        for b in 0..BUYERS {
            let home = (b % usize::from(EXECUTORS)) as ExecutorId;
            let wallet = name_on(layout, &format!("wallet{b}-"), home);
            let bank = name_on(layout, &format!("bank{b}-"), home);
            for (account, flags) in
                [(&bank, AccountFlags::default()), (&wallet, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)]
            {
                let new = NewAccount {
                    id: account.clone(),
                    currency: cny(),
                    flags,
                    overdraft_limit: 0,
                    metadata: None,
                    owner: None,
                };
                self.apply(home, Input::CreateAccount(new), None);
            }
            let fund = TransferRequest::Create {
                id: name_on(layout, &format!("fund{b}-"), home),
                debit_account_id: bank,
                credit_account_id: wallet.clone(),
                // Enough for a few checkouts, not for all: some are refused for money.
                amount: Amount::new(150).unwrap(),
                currency: cny(),
                pending: false,
                timeout_ms: 0,
                details: Details::default(),
            };
            self.apply(home, Input::Transfers { requests: vec![fund], atomic: false, origin: None }, None);
            self.wallets.push((id(&format!("buyer{b}")), wallet));
            let issue = pricing::Command::IssueCoupon {
                template_id: template_id.clone(),
                buyer_id: id(&format!("buyer{b}")),
                coupon_id: id("x"),
            };
            self.part(2, PartCommand::Pricing(issue));
        }
        self.coupons = self.nodes[2].core.parts().pricing.coupons_of(&id("buyer0")).into_iter().map(|c| c.id).collect();
        for b in 1..BUYERS {
            let more = self.nodes[2].core.parts().pricing.coupons_of(&id(&format!("buyer{b}")));
            self.coupons.extend(more.into_iter().map(|c| c.id));
        }
        assert_eq!(self.coupons.len(), BUYERS);
        assert!(self.queues.values().all(VecDeque::is_empty), "the setup is local to each executor");
    }

    /// A client's checkout: 1-3 lines over the SKUs (two merchants), maybe
    /// the promotion, maybe the buyer's coupon.
    fn submit(&mut self) {
        let buyer = self.random(BUYERS);
        let (buyer_id, wallet) = self.wallets[buyer].clone();
        let home = self.layout.executor_of_account(&wallet);
        let home_shard = self.layout.shard_of_account(&wallet);
        let mut lines: Vec<(Id, u32)> = Vec::new();
        for _ in 0..1 + self.random(3) {
            let pick = self.random(SKUS);
            let sku = self.skus[pick].clone();
            if !lines.iter().any(|(s, _)| *s == sku) {
                lines.push((sku, 1 + self.random(3) as u32));
            }
        }
        let discount = (self.random(2) == 0).then(|| 1 + self.random(15) as u64);
        let with_coupon = self.random(3) == 0;
        let coupon = with_coupon.then(|| self.coupons[buyer].clone());
        let orders_part = &mut self.nodes[usize::from(home)].core;
        let sequence = orders_part.parts_mut().orders.take_sequence();
        let checkout_id = AssignedKind::Checkout.id(home_shard, sequence);
        let mut orders_of: Vec<NewOrder> = Vec::new();
        for (sku, quantity) in &lines {
            let s = self.skus.iter().position(|x| x == sku).unwrap();
            let merchant = id(if s % 2 == 0 { "m1" } else { "m2" });
            let unit_price = 10 + s as u64;
            let at = match orders_of.iter().position(|o| o.merchant_id == merchant) {
                Some(at) => at,
                None => {
                    let order_sequence =
                        if orders_of.is_empty() { sequence } else { orders_part.parts_mut().orders.take_sequence() };
                    let order_id = AssignedKind::Order.id(home_shard, order_sequence);
                    orders_of.push(NewOrder {
                        id: order_id.clone(),
                        merchant_id: merchant.clone(),
                        lines: Vec::new(),
                        total: 0,
                        transfer_id: orders::order_transfer_id(&order_id),
                        settle_account_id: settle_account_id(home_shard, cny(), &merchant).unwrap(),
                    });
                    orders_of.len() - 1
                }
            };
            let order = &mut orders_of[at];
            let subtotal = unit_price * u64::from(*quantity);
            order.lines.push(OrderLine {
                line_id: order.lines.len() as u32 + 1,
                sku_id: sku.clone(),
                quantity: *quantity,
                unit_price,
                subtotal,
                discounts: Vec::new(),
                total: subtotal,
            });
            order.total += subtotal;
        }
        // The promotion's discount is taken off the first line (at most all of it).
        let discount = discount.map(|d| d.min(orders_of[0].lines[0].subtotal - 1));
        if let Some(d) = discount {
            let line = &mut orders_of[0].lines[0];
            line.discounts.push((self.promotion.clone(), d));
            line.total -= d;
            orders_of[0].total -= d;
        }
        let capture = if self.random(3) == 0 { CaptureMode::Manual } else { CaptureMode::Automatic };
        let transfers: Vec<TransferRequest> = orders_of
            .iter()
            .map(|o| TransferRequest::Create {
                id: o.transfer_id.clone(),
                debit_account_id: wallet.clone(),
                credit_account_id: o.settle_account_id.clone(),
                amount: Amount::new(o.total).unwrap(),
                currency: cny(),
                pending: capture == CaptureMode::Manual,
                timeout_ms: 0,
                details: Details::default(),
            })
            .collect();
        let mut branches: Vec<PartCommand> = lines
            .iter()
            .map(|(sku, quantity)| {
                PartCommand::Inventory(inventory::Command::TryReserve {
                    txn: 0,
                    shard: sku.shard(SHARDS),
                    sku_id: sku.clone(),
                    buyer_id: buyer_id.clone(),
                    quantity: *quantity,
                    deadline_ms: 0,
                })
            })
            .collect();
        if let Some(discount) = discount {
            branches.push(PartCommand::Pricing(pricing::Command::TryConsume {
                txn: 0,
                promotion_id: self.promotion.clone(),
                buyer_id: buyer_id.clone(),
                discount,
                deadline_ms: 0,
            }));
        }
        if let Some(coupon) = &coupon {
            branches.push(PartCommand::Pricing(pricing::Command::LockCoupon {
                txn: 0,
                coupon_id: coupon.clone(),
                buyer_id: buyer_id.clone(),
                deadline_ms: 0,
            }));
        }
        let checkout = NewCheckout {
            id: checkout_id.clone(),
            buyer_id,
            account_id: wallet,
            currency: cny(),
            capture,
            payment_id: AssignedKind::Payment.id(home_shard, sequence),
            coupon_ids: coupon.iter().cloned().collect(),
            orders: orders_of,
            created_ms: self.now_ms,
            authorization_expires_ms: self.now_ms + 1 + self.random(30_000) as u64,
            consumed_promotions: discount.iter().map(|_| self.promotion.clone()).collect(),
        };
        branches.push(PartCommand::Orders(orders::Command::TryPlace { txn: 0, checkout: Box::new(checkout) }));
        let tag = self.submitted.len() as u64;
        let n = transfers.len();
        self.submitted.push(Submitted { id: checkout_id, home, discount, coupon, results: vec![None; n], lost: false });
        self.apply(home, Input::Global { transfers, branches, origin: None, key: None }, Some(tag));
    }

    /// A client captures or cancels a manual checkout's payment, or cancels one of its orders.
    fn pay_or_cancel(&mut self) {
        if self.submitted.is_empty() {
            return;
        }
        let pick = self.random(self.submitted.len());
        let (home, checkout_id) = (self.submitted[pick].home, self.submitted[pick].id.clone());
        let Some(checkout) = self.nodes[usize::from(home)].core.parts().orders.checkout(&checkout_id).cloned() else {
            return;
        };
        let payment_id = checkout.checkout.payment_id.clone();
        let command = match self.random(3) {
            0 => orders::Command::Capture { payment_id, amount: None },
            1 => orders::Command::CancelPayment { payment_id },
            _ => {
                let at = self.random(checkout.checkout.orders.len());
                orders::Command::CancelOrder { order_id: checkout.checkout.orders[at].id.clone() }
            }
        };
        self.apply(home, Input::Part(PartCommand::Orders(command)), None);
    }

    /// Hands the receiver one message of a queue (any of them: reordering).
    fn deliver(&mut self) -> bool {
        let busy: Vec<(ExecutorId, ExecutorId)> =
            self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return false;
        }
        let key = busy[self.random(busy.len())];
        let len = self.queues[&key].len();
        let at = if self.random(3) == 0 { self.random(len) } else { 0 };
        let message = self.queues.get_mut(&key).unwrap().remove(at).unwrap();
        let remembered = self.delivered.entry(key).or_default();
        remembered.push(message.clone());
        if remembered.len() > 32 {
            remembered.remove(0);
        }
        self.apply(key.1, Input::Peer { from: key.0, messages: vec![message] }, None);
        true
    }

    /// Hands out again a message already delivered (a redelivering stream).
    fn redeliver(&mut self) {
        let keys: Vec<(ExecutorId, ExecutorId)> = self.delivered.keys().copied().collect();
        if keys.is_empty() {
            return;
        }
        let key = keys[self.random(keys.len())];
        let len = self.delivered[&key].len();
        let pick = self.random(len);
        let message = self.delivered[&key][pick].clone();
        self.apply(key.1, Input::Peer { from: key.0, messages: vec![message] }, None);
    }

    /// What the runtime does between batches: the protocol's tick and the parts' deadlines.
    fn tick(&mut self, e: ExecutorId) {
        let now_ms = self.now_ms;
        let mut fx = Effects::default();
        let deadlines = self.nodes[usize::from(e)].core.tick(now_ms, &mut fx);
        for (dest, message) in fx.outbox {
            self.queues.entry((e, dest)).or_default().push_back(message);
        }
        if let Some(input) = deadlines {
            self.apply(e, input, None);
        }
        let due = self.nodes[usize::from(e)].core.parts().due(now_ms);
        for command in due {
            self.apply(e, Input::Part(command), None);
        }
    }

    fn restore(&self, e: ExecutorId) -> ExecutorCore {
        let node = &self.nodes[usize::from(e)];
        let (mut core, from) = match &node.checkpoint {
            None => (ExecutorCore::new(e, self.layout), 0),
            Some((bytes, inputs)) => {
                let checkpoint = Checkpoint::decode(bytes).expect("a checkpoint reads back");
                (ExecutorCore::from_checkpoint(e, self.layout, checkpoint).expect("it restores"), *inputs)
            }
        };
        let mut fx = Effects::default();
        for (time_ms, input) in &node.log[from..] {
            let (changed, _) = core.apply(input, *time_ms, None, &mut fx);
            assert!(changed, "a logged input changes state again in a replay");
            fx.clear();
        }
        core
    }

    /// Whether two cores hold the same state (what a replay or a
    /// checkpoint must bring back), part by part.
    fn assert_same(e: ExecutorId, a: &ExecutorCore, b: &ExecutorCore) {
        use peakstack_engine::tcc::TxnFilter;
        assert_eq!(a.ledger().snapshot(), b.ledger().snapshot(), "executor {e}: the ledger");
        assert_eq!(
            a.list_transactions(TxnFilter::InFlight, usize::MAX, 0),
            b.list_transactions(TxnFilter::InFlight, usize::MAX, 0),
            "executor {e}: the transactions"
        );
        assert_eq!(a.resend(), b.resend(), "executor {e}: what it would send again");
        // (Retained fences are purged by the tick, which is not logged: a
        // replay may keep some a tick will purge.)
        assert_eq!(a.fence_count(), b.fence_count(), "executor {e}: live fences");
        assert!(a.parts().inventory.same_state(&b.parts().inventory), "executor {e}: the inventory");
        assert_eq!(a.parts().pricing, b.parts().pricing, "executor {e}: the pricing part");
        assert_eq!(a.parts().orders, b.parts().orders, "executor {e}: the orders part");
        assert!(a.same_messages(b), "executor {e}: the reliable messages");
    }

    /// Executor `e` crashes and replays its log from its last checkpoint;
    /// its clients hear nothing more; it sends its unfinished messages again.
    fn crash(&mut self, e: ExecutorId) {
        let core = self.restore(e);
        World::assert_same(e, &self.nodes[usize::from(e)].core, &core);
        self.nodes[usize::from(e)].core = core;
        for s in &mut self.submitted {
            if s.home == e && s.results.iter().any(Option::is_none) {
                s.lost = true;
            }
        }
        self.resend(e);
    }

    fn checkpoint(&mut self, e: ExecutorId) {
        let node = &mut self.nodes[usize::from(e)];
        let bytes = node.core.checkpoint(node.log.len() as u64, self.now_ms, 0, Vec::new()).encode();
        node.checkpoint = Some((bytes, node.log.len()));
        self.crash(e);
    }

    fn resend(&mut self, e: ExecutorId) {
        let now_ms = self.now_ms;
        let core = &mut self.nodes[usize::from(e)].core;
        let mut resent = core.resend();
        resent.extend(core.outbox_resend(now_ms));
        for (dest, message) in resent {
            self.queues.entry((e, dest)).or_default().push_back(message);
        }
    }

    /// Every executor crashes and every message in flight is lost.
    fn crash_all(&mut self) {
        self.queues.clear();
        for e in 0..EXECUTORS {
            self.crash(e);
        }
        let cores: Vec<&ExecutorCore> = self.nodes.iter().map(|n| &n.core).collect();
        for (participant, coordinator, message) in lost_forgets(&cores) {
            self.queues.entry((coordinator, participant)).or_default().push_back(message);
        }
    }

    fn step(&mut self) {
        match self.random(100) {
            0..=24 => self.submit(),
            25..=64 => {
                self.deliver();
            }
            65..=69 => self.redeliver(),
            70..=79 => {
                let e = self.random(usize::from(EXECUTORS)) as ExecutorId;
                self.tick(e);
            }
            80..=87 => self.now_ms += 1 + self.random(400) as u64,
            88 => self.now_ms += TXN_DEADLINE_MS,
            89 => self.pay_or_cancel(),
            90..=93 => {
                let e = self.random(usize::from(EXECUTORS)) as ExecutorId;
                self.crash(e);
            }
            94..=97 => {
                let e = self.random(usize::from(EXECUTORS)) as ExecutorId;
                self.checkpoint(e);
            }
            _ => self.crash_all(),
        }
    }

    /// Delivers, ticks and lets time pass until nothing moves.
    fn quiesce(&mut self) {
        for _ in 0..2_000 {
            while self.deliver() {}
            let before = self.now_ms;
            self.now_ms += 1_000;
            for e in 0..EXECUTORS {
                self.tick(e);
            }
            let busy = self.queues.values().any(|q| !q.is_empty())
                || self
                    .nodes
                    .iter()
                    .any(|n| n.core.txns_in_flight() > 0 || n.core.fence_count() > 0 || n.core.outbox_counts().0 > 0);
            if !busy && self.now_ms - before > 0 {
                // Past every retention: fences, branch fences and part deadlines.
                self.now_ms += FENCE_RETENTION_MS + pricing::FENCE_RETENTION_MS.max(inventory::FENCE_RETENTION_MS) + 1;
                for e in 0..EXECUTORS {
                    self.tick(e);
                }
                while self.deliver() {}
                for e in 0..EXECUTORS {
                    self.tick(e);
                }
                if self.queues.values().all(VecDeque::is_empty) {
                    return;
                }
            }
        }
        panic!("no quiescence");
    }

    fn check(&self) {
        let mut sold: BTreeMap<Id, u64> = BTreeMap::new();
        let mut given = 0u64;
        let mut uses = 0u64;
        let mut coupon_users: BTreeMap<Id, usize> = BTreeMap::new();
        let mut paid: BTreeMap<Id, (u64, u64)> = BTreeMap::new();
        for s in &self.submitted {
            let home = &self.nodes[usize::from(s.home)].core;
            let state = home.parts().orders.checkout(&s.id).map(|c| c.state);
            assert_ne!(state, Some(CheckoutState::Pending), "checkout {} still pending", s.id);
            let completed = state == Some(CheckoutState::Completed);
            if !s.lost && s.results.iter().all(Option::is_some) {
                let ok = s.results.iter().all(|r| matches!(r, Some(Ok(_))));
                assert_eq!(ok, completed, "checkout {}: told {:?}, is {state:?}", s.id, s.results);
                if !ok {
                    let refusal = s.results.iter().find_map(|r| r.as_ref().and_then(|r| r.as_ref().err()));
                    assert!(refusal.is_some_and(|e| *e != ErrorCode::LinkedEventFailed), "{:?}", s.results);
                }
            } else if !s.lost {
                panic!("checkout {} was never answered though its coordinator lived", s.id);
            }
            if completed {
                let checkout = home.parts().orders.checkout(&s.id).unwrap().checkout.clone();
                let open = |order: &orders::Order| {
                    matches!(order.state, OrderState::Paid | OrderState::Authorized | OrderState::Refunded)
                };
                let placed: Vec<orders::Order> =
                    checkout.orders.iter().map(|o| home.parts().orders.order(&o.id).unwrap().clone()).collect();
                let any_open = placed.iter().any(open);
                let entry = paid.entry(checkout.account_id.clone()).or_default();
                for order in &placed {
                    entry.0 += order.amount_captured;
                    if order.payment_state == PaymentState::RequiresCapture {
                        entry.1 += order.amount_authorized;
                    }
                    if !open(order) {
                        continue;
                    }
                    for line in &order.order.lines {
                        *sold.entry(line.sku_id.clone()).or_default() += u64::from(line.quantity);
                        given += line.discounts.iter().map(|(_, d)| *d).sum::<u64>();
                    }
                }
                if s.discount.is_some() && any_open {
                    uses += 1;
                }
                if let (Some(c), true) = (&s.coupon, any_open) {
                    *coupon_users.entry(c.clone()).or_default() += 1;
                }
            }
        }
        for sku in &self.skus {
            let core = &self.nodes[usize::from(self.layout.executor_of_id(sku))].core;
            let view = core.parts().inventory.sku(sku).unwrap();
            let expected = sold.get(sku).copied().unwrap_or(0);
            assert_eq!((view.sold, view.reserved), (expected, 0), "SKU {sku}");
            assert!(view.sold <= STOCK, "SKU {sku} oversold");
        }
        let (_, counters) = self.nodes[1].core.parts().pricing.promotion(&self.promotion).unwrap();
        assert_eq!((counters.given, counters.uses, counters.reserved), (given, uses, 0), "{counters:?}");
        assert!(given <= BUDGET && uses <= 6);
        for coupon in &self.coupons {
            let state = self.nodes[2].core.parts().pricing.coupon(coupon).unwrap().state;
            let users = coupon_users.get(coupon).copied().unwrap_or(0);
            assert!(users <= 1, "coupon {coupon} used {users} times");
            assert_eq!(matches!(state, CouponState::Used { .. }), users == 1, "coupon {coupon}: {state:?}");
            assert!(!matches!(state, CouponState::Locked { .. }), "coupon {coupon} still locked");
        }
        for (_, wallet) in &self.wallets {
            let core = &self.nodes[usize::from(self.layout.executor_of_account(wallet))].core;
            let balances = core.ledger().account(wallet).unwrap().balances;
            let (posted, held) = paid.get(wallet).copied().unwrap_or((0, 0));
            assert_eq!(balances.debits_posted, u128::from(posted), "wallet {wallet} paid");
            assert_eq!(balances.debits_pending, u128::from(held), "wallet {wallet} holds");
        }
        for node in &self.nodes {
            node.core.ledger().assert_balanced();
            assert_eq!(node.core.txns_in_flight(), 0);
            assert_eq!(node.core.fence_count(), 0);
            assert_eq!(
                node.core.outbox_counts(),
                (0, 0),
                "every reliable message was applied: {:?}",
                node.core.messages(false, None, 5)
            );
        }
    }
}

fn run(seed: u64) {
    let mut world = World::new(seed);
    for _ in 0..STEPS {
        world.step();
    }
    world.quiesce();
    world.check();
}

#[test]
fn checkouts_across_executors_agree_with_the_ledger_under_reordering_redelivery_crashes_and_deadlines() {
    let seeds: u64 = std::env::var("GLOBAL_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    for seed in 0..seeds {
        let outcome = std::panic::catch_unwind(|| run(seed));
        if let Err(panic) = outcome {
            eprintln!("seed {seed} failed");
            std::panic::resume_unwind(panic);
        }
    }
}
