//! Data-driven tests of the pricing state machine: steps of (time,
//! command, expected outcome). After every step the state is checked
//! (`Pricing::check`), a refused or repeated command must leave it
//! unchanged, and the command and the checkpoint must round-trip.

use std::collections::BTreeSet;

use peakstack_domain::{Currency, ErrorCode, Id};

use crate::*;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// A promotion live from 0 to 10^12 with the given limits.
fn promotion(name: &str, budget: Option<u64>, usage_limit: Option<u64>, per_buyer_limit: Option<u64>) -> Promotion {
    Promotion::new(PromotionSpec {
        id: id(name),
        currency: usd(),
        kind: PromotionKind::AmountOff { amount: 100 },
        scope: Scope::Everything,
        starts_at_ms: 0,
        ends_at_ms: 1_000_000_000_000,
        group: None,
        priority: 0,
        budget,
        usage_limit,
        per_buyer_limit,
    })
    .unwrap()
}

fn template(name: &str, total_issue: u64) -> CouponTemplate {
    CouponTemplate::new(CouponTemplateSpec {
        id: id(name),
        currency: usd(),
        discount: CouponDiscount::AmountOff { amount: 100 },
        min_spend: 0,
        scope: Scope::Skus(BTreeSet::from([id("s1")])),
        valid_from_ms: 0,
        valid_until_ms: 10_000,
        total_issue,
    })
    .unwrap()
}

fn create(promotion: Promotion) -> Command {
    Command::CreatePromotion(promotion)
}

fn try_(txn: u64, promotion: &str, buyer: &str, discount: u64, deadline_ms: u64) -> Command {
    Command::TryConsume { txn, promotion_id: id(promotion), buyer_id: id(buyer), discount, deadline_ms }
}

fn confirm(txn: u64, promotion: &str) -> Command {
    Command::ConfirmConsume { txn, promotion_id: id(promotion) }
}

fn cancel(txn: u64, promotion: &str) -> Command {
    Command::CancelConsume { txn, promotion_id: id(promotion) }
}

fn forget(txn: u64, promotion: &str) -> Command {
    Command::ForgetConsume { txn, promotion_id: id(promotion) }
}

fn issue(template: &str, buyer: &str, coupon: &str) -> Command {
    Command::IssueCoupon { template_id: id(template), buyer_id: id(buyer), coupon_id: id(coupon) }
}

fn lock(txn: u64, coupon: &str, buyer: &str, deadline_ms: u64) -> Command {
    Command::LockCoupon { txn, coupon_id: id(coupon), buyer_id: id(buyer), deadline_ms }
}

fn use_(txn: u64, coupon: &str) -> Command {
    Command::UseCoupon { txn, coupon_id: id(coupon) }
}

fn release(txn: u64, coupon: &str) -> Command {
    Command::ReleaseCoupon { txn, coupon_id: id(coupon) }
}

fn forget_coupon(txn: u64, coupon: &str) -> Command {
    Command::ForgetCouponFence { txn, coupon_id: id(coupon) }
}

/// Applies one command and answers `changed`, `same` (ok, unchanged) or the error code.
fn step(pricing: &mut Pricing, command: &Command, now_ms: u64) -> String {
    let before = pricing.clone();
    let (changed, reply) = pricing.apply(command, now_ms);
    pricing.check().unwrap_or_else(|broken| panic!("after {command:?}: {broken}"));
    if !changed {
        assert_eq!(*pricing, before, "{command:?} changed the state but said it did not");
    }
    let mut bytes = Vec::new();
    encode_command(command, &mut bytes);
    assert_eq!(decode_command(&bytes).as_ref(), Ok(command));
    let mut checkpoint = Vec::new();
    pricing.encode_checkpoint(&mut checkpoint);
    assert_eq!(Pricing::decode_checkpoint(&checkpoint).as_ref(), Ok(&*pricing));
    match (changed, reply) {
        (true, Ok(())) => "changed".to_string(),
        (false, Ok(())) => "same".to_string(),
        (true, Err(code)) => panic!("{command:?} refused with {code} but changed the state"),
        (false, Err(code)) => code.as_str().to_string(),
    }
}

/// Runs `(now_ms, command, expected)` steps on `pricing`.
fn check(pricing: &mut Pricing, steps: &[(u64, Command, &str)]) {
    for (number, (now_ms, command, expected)) in steps.iter().enumerate() {
        let actual = step(pricing, command, *now_ms);
        assert_eq!(actual, *expected, "step {number}: {command:?} at {now_ms}");
    }
}

fn counters(pricing: &Pricing, promotion: &str) -> (u64, u64, u64, u64) {
    let (_, c) = pricing.promotion(&id(promotion)).unwrap();
    (c.given, c.reserved, c.uses, c.reserved_uses)
}

#[test]
fn creating_is_idempotent() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, create(promotion("p", Some(10), None, None)), "changed"),
            (0, create(promotion("p", Some(10), None, None)), "same"),
            (0, create(promotion("p", Some(11), None, None)), "exists_with_different_fields"),
            (0, Command::CreateCouponTemplate(template("t", 2)), "changed"),
            (0, Command::CreateCouponTemplate(template("t", 2)), "same"),
            (0, Command::CreateCouponTemplate(template("t", 3)), "exists_with_different_fields"),
        ],
    );
    assert_eq!(pricing.promotions().len(), 1);
    assert_eq!(pricing.coupon_templates().len(), 1);
}

#[test]
fn issuing_stops_at_the_total() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, Command::CreateCouponTemplate(template("t", 2)), "changed"),
            (0, issue("t", "b1", "c1"), "changed"),
            (0, issue("t", "b1", "c1"), "same"),
            (0, issue("t", "b2", "c1"), "exists_with_different_fields"),
            (0, issue("nope", "b1", "c9"), "coupon_not_found"),
            (10_000, issue("t", "b1", "c2"), "coupon_expired"),
            (0, issue("t", "b2", "c2"), "changed"),
            (0, issue("t", "b3", "c3"), "coupons_exhausted"),
        ],
    );
    assert_eq!(pricing.coupon_template(&id("t")).map(|(_, issued)| issued), Some(2));
    let ids: Vec<Id> = pricing.coupons_of(&id("b1")).into_iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![id("c1")]);
}

#[test]
fn a_buyer_holds_at_most_the_bound_of_coupons() {
    let mut pricing = Pricing::new();
    pricing.apply(&Command::CreateCouponTemplate(template("t", 1_000)), 0).1.unwrap();
    for n in 0..MAX_COUPONS_PER_BUYER {
        assert_eq!(pricing.apply(&issue("t", "b", &format!("c{n}")), 0), (true, Ok(())));
    }
    assert_eq!(pricing.apply(&issue("t", "b", "one-more"), 0), (false, Err(ErrorCode::CouponsExhausted)));
    assert_eq!(pricing.apply(&issue("t", "b2", "one-more"), 0), (true, Ok(())));
    let ids: Vec<String> = pricing.coupons_of(&id("b")).iter().map(|c| c.id.to_string()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!((ids.len(), ids == sorted), (MAX_COUPONS_PER_BUYER, true));
    pricing.check().unwrap();
}

#[test]
fn the_state_holds_at_most_the_bound_of_promotions() {
    let mut pricing = Pricing::new();
    for n in 0..MAX_PROMOTIONS {
        assert_eq!(pricing.apply(&create(promotion(&format!("p{n}"), None, None, None)), 0), (true, Ok(())));
    }
    let one_more = create(promotion("one-more", None, None, None));
    assert_eq!(pricing.apply(&one_more, 0), (false, Err(ErrorCode::InvalidRequest)));
    // A repeat of an existing one is still answered.
    assert_eq!(pricing.apply(&create(promotion("p7", None, None, None)), 0), (false, Ok(())));
}

#[test]
fn consuming_respects_every_limit() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, create(promotion("budget", Some(300), None, None)), "changed"),
            (0, create(promotion("uses", None, Some(2), None)), "changed"),
            (0, create(promotion("buyer", None, None, Some(1))), "changed"),
            (0, try_(1, "budget", "b1", 200, 100), "changed"),
            (0, try_(2, "budget", "b2", 101, 100), "promotion_budget_exhausted"),
            (0, try_(2, "budget", "b2", 100, 100), "changed"),
            (0, try_(3, "budget", "b3", 1, 100), "promotion_budget_exhausted"),
            (0, try_(1, "uses", "b1", 5, 100), "changed"),
            (0, try_(2, "uses", "b1", 5, 100), "changed"),
            (0, try_(3, "uses", "b1", 5, 100), "promotion_usage_limit_reached"),
            (0, try_(1, "buyer", "b1", 5, 100), "changed"),
            (0, try_(2, "buyer", "b1", 5, 100), "promotion_buyer_limit_reached"),
            (0, try_(3, "buyer", "b2", 5, 100), "changed"),
            (0, try_(9, "nope", "b1", 5, 100), "promotion_not_found"),
            (0, try_(9, "budget", "b1", 0, 100), "invalid_request"),
            (50, try_(9, "uses", "b1", 5, 50), "invalid_request"),
            (0, try_(9, "uses", "b1", 5, MAX_HOLD_MS + 1), "invalid_request"),
            (0, try_(9, "uses", "b1", peakstack_domain::MAX_TRANSFER_AMOUNT + 1, 100), "invalid_request"),
        ],
    );
    assert_eq!(counters(&pricing, "budget"), (0, 300, 0, 2));
    // Cancelling gives back: the budget and the buyer's use.
    check(
        &mut pricing,
        &[
            (1, cancel(1, "budget"), "changed"),
            (1, try_(3, "budget", "b3", 200, 100), "changed"),
            (1, cancel(1, "buyer"), "changed"),
            (1, try_(2, "buyer", "b1", 5, 100), "changed"),
        ],
    );
    assert_eq!(counters(&pricing, "budget"), (0, 300, 0, 2));
    assert_eq!(pricing.buyer_uses(&id("buyer"), &id("b1")), 1);
}

#[test]
fn consume_branches_are_idempotent_and_fenced() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, create(promotion("p", Some(1_000), Some(10), Some(5))), "changed"),
            (0, try_(1, "p", "b", 100, 100), "changed"),
            (1, try_(1, "p", "b", 100, 100), "same"),
            (1, try_(1, "p", "b", 101, 100), "exists_with_different_fields"),
            (1, try_(1, "p", "other", 100, 100), "exists_with_different_fields"),
            (2, confirm(1, "p"), "changed"),
            (3, confirm(1, "p"), "same"),
            // A late repeat of the try is answered as the first was.
            (4, try_(1, "p", "b", 100, 100), "same"),
            (4, cancel(1, "p"), "reservation_confirmed"),
            (4, confirm(2, "p"), "reservation_not_found"),
            (4, confirm(2, "nope"), "promotion_not_found"),
            (4, cancel(2, "nope"), "promotion_not_found"),
            // Try, cancel; the try again is refused, the cancel again is done.
            (5, try_(2, "p", "b", 50, 100), "changed"),
            (6, cancel(2, "p"), "changed"),
            (7, cancel(2, "p"), "same"),
            (7, try_(2, "p", "b", 50, 100), "branch_cancelled"),
            (7, confirm(2, "p"), "branch_cancelled"),
            // A cancel before its try suspends the branch: the try is refused.
            (8, cancel(3, "p"), "changed"),
            (8, cancel(3, "p"), "same"),
            (9, try_(3, "p", "b", 10, 100), "branch_cancelled"),
            (9, confirm(3, "p"), "branch_cancelled"),
        ],
    );
    assert_eq!(counters(&pricing, "p"), (100, 0, 1, 0));
    assert_eq!(pricing.buyer_uses(&id("p"), &id("b")), 1);
    assert_eq!(
        pricing.consume_fence(&id("p"), 3).map(|f| f.state),
        Some(BranchState::Suspended { forget_at_ms: 8 + FENCE_RETENTION_MS })
    );
    // Usage as a quote reads it.
    assert_eq!(pricing.usage(&id("p"), &id("b")), PromotionUsage { discount: 100, uses: 1, buyer_uses: 1 });
    assert_eq!(pricing.usage(&id("p"), &id("x")), PromotionUsage { discount: 100, uses: 1, buyer_uses: 0 });
    assert_eq!(pricing.usage(&id("nope"), &id("b")), PromotionUsage::default());
}

#[test]
fn deadlines_cancel_and_retention_forgets() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, create(promotion("p", Some(1_000), None, Some(1))), "changed"),
            (0, try_(1, "p", "b", 400, 100), "changed"),
            (0, try_(2, "p", "c", 400, 200), "changed"),
        ],
    );
    assert_eq!(pricing.due(99), vec![]);
    assert_eq!(pricing.due(100), vec![cancel(1, "p")]);
    assert_eq!(pricing.due(500), vec![cancel(1, "p"), cancel(2, "p")]);
    // Past its deadline, a hold not yet cancelled can still be confirmed.
    check(&mut pricing, &[(150, cancel(1, "p"), "changed"), (250, confirm(2, "p"), "changed")]);
    assert_eq!(counters(&pricing, "p"), (400, 0, 1, 0));
    assert_eq!(pricing.due(250), vec![]);
    let cancelled_forget = 150 + FENCE_RETENTION_MS;
    let confirmed_forget = 250 + FENCE_RETENTION_MS;
    assert_eq!(pricing.due(cancelled_forget), vec![forget(1, "p")]);
    check(
        &mut pricing,
        &[
            (cancelled_forget - 1, forget(1, "p"), "invalid_request"),
            (cancelled_forget, forget(1, "p"), "changed"),
            (cancelled_forget, forget(1, "p"), "same"),
            (cancelled_forget, try_(3, "p", "d", 1, cancelled_forget + 10), "changed"),
            (cancelled_forget, forget(3, "p"), "invalid_request"),
            (confirmed_forget, forget(2, "p"), "changed"),
        ],
    );
    // The counters outlive the fences.
    assert_eq!(counters(&pricing, "p"), (400, 1, 1, 1));
    assert_eq!(pricing.buyer_uses(&id("p"), &id("c")), 1);
}

#[test]
fn due_is_bounded_and_oldest_first() {
    let mut pricing = Pricing::new();
    pricing.apply(&create(promotion("p", None, None, None)), 0).1.unwrap();
    let holds = MAX_DUE_COMMANDS as u64 + 10;
    for txn in 0..holds {
        pricing.apply(&try_(txn, "p", "b", 1, 1_000 + holds - txn), 0).1.unwrap();
    }
    let due = pricing.due(u64::MAX);
    assert_eq!(due.len(), MAX_DUE_COMMANDS);
    assert_eq!(due[0], cancel(holds - 1, "p"));
    for command in &due {
        assert_eq!(pricing.apply(command, 5_000), (true, Ok(())));
    }
    assert_eq!(pricing.due(5_000).len(), 10);
    pricing.check().unwrap();
}

#[test]
fn coupon_branches() {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, Command::CreateCouponTemplate(template("t", 10)), "changed"),
            (0, issue("t", "b", "c1"), "changed"),
            (0, issue("t", "b", "c2"), "changed"),
            (0, lock(1, "c1", "b", 100), "changed"),
            (1, lock(1, "c1", "b", 100), "same"),
            (1, lock(1, "c1", "b", 101), "exists_with_different_fields"),
            (1, lock(2, "c1", "b", 100), "coupon_already_used"),
            (1, lock(2, "c1", "x", 100), "coupon_not_applicable"),
            (1, lock(2, "nope", "b", 100), "coupon_not_found"),
            (2, use_(2, "c1"), "reservation_not_found"),
            (2, use_(1, "c1"), "changed"),
            (3, use_(1, "c1"), "same"),
            (3, lock(1, "c1", "b", 100), "same"),
            (3, lock(2, "c1", "b", 100), "coupon_already_used"),
            (3, release(1, "c1"), "reservation_confirmed"),
            // Release of another transaction's coupon: that branch is suspended.
            (3, release(2, "c1"), "changed"),
            (3, lock(2, "c1", "b", 100), "branch_cancelled"),
            // Lock, release, lock again by the same transaction: refused.
            (4, lock(3, "c2", "b", 100), "changed"),
            (5, release(3, "c2"), "changed"),
            (5, release(3, "c2"), "same"),
            (5, lock(3, "c2", "b", 100), "branch_cancelled"),
            (5, use_(3, "c2"), "branch_cancelled"),
            // The coupon is free again for another checkout.
            (6, lock(4, "c2", "b", 100), "changed"),
            (6, lock(5, "c2", "b", 100), "coupon_already_used"),
            (7, lock(5, "c2", "b", 7), "coupon_already_used"),
            (7, use_(5, "nope"), "coupon_not_found"),
            (7, release(5, "nope"), "coupon_not_found"),
        ],
    );
    assert_eq!(pricing.coupon(&id("c1")).map(|c| c.state), Some(CouponState::Used { txn: 1 }));
    assert_eq!(pricing.coupon(&id("c2")).map(|c| c.state), Some(CouponState::Locked { txn: 4, deadline_ms: 100 }));
    // The lock's deadline releases it.
    assert_eq!(pricing.due(100), vec![release(4, "c2")]);
    check(&mut pricing, &[(100, release(4, "c2"), "changed"), (101, use_(4, "c2"), "branch_cancelled")]);
    assert_eq!(
        pricing.coupon_fence(&id("c2"), 4),
        Some(BranchState::Cancelled { forget_at_ms: 100 + FENCE_RETENTION_MS })
    );
    check(
        &mut pricing,
        &[
            (100, forget_coupon(4, "c2"), "invalid_request"),
            (100 + FENCE_RETENTION_MS, forget_coupon(4, "c2"), "changed"),
            (100 + FENCE_RETENTION_MS, forget_coupon(4, "c2"), "same"),
        ],
    );
    // An expired coupon locks no more, and deadlines are bounded.
    check(
        &mut pricing,
        &[
            (10_000, lock(9, "c2", "b", 10_100), "coupon_expired"),
            (50, lock(9, "c2", "b", 50), "invalid_request"),
            (50, lock(9, "c2", "b", 51 + MAX_HOLD_MS), "invalid_request"),
        ],
    );
}

#[test]
fn the_price_book_comes_from_the_state() {
    let mut pricing = Pricing::new();
    pricing.apply(&create(promotion("p", None, None, None)), 0).1.unwrap();
    pricing.apply(&Command::CreateCouponTemplate(template("t", 1)), 0).1.unwrap();
    let sku = SkuPrice { sku_id: id("s1"), merchant_id: id("m"), unit_price: 1_000, currency: usd() };
    let book = pricing.price_book(vec![sku]).unwrap();
    assert_eq!(book.promotions().count(), 1);
    assert!(book.coupon_template(&id("t")).is_some());
}

fn all_commands() -> Vec<Command> {
    let spec = PromotionSpec {
        id: id("p"),
        currency: usd(),
        kind: PromotionKind::SpendThreshold { threshold: 1_000, off: 100, stepwise: true },
        scope: Scope::Skus(BTreeSet::from([id("a"), id("b")])),
        starts_at_ms: 5,
        ends_at_ms: u64::MAX,
        group: Some("g-1".into()),
        priority: -7,
        budget: Some(u64::MAX),
        usage_limit: None,
        per_buyer_limit: Some(1),
    };
    let kinds = [
        PromotionKind::PercentOff { percent: 100 },
        PromotionKind::AmountOff { amount: 1 },
        PromotionKind::BuyXGetY { buy: 3, get: 2 },
    ];
    let mut commands = vec![create(Promotion::new(spec.clone()).unwrap())];
    for (kind, scope) in kinds.into_iter().zip([Scope::Everything, Scope::Merchant(id("m")), Scope::Everything]) {
        let spec = PromotionSpec { kind, scope, group: None, priority: i32::MAX, ..spec.clone() };
        commands.push(create(Promotion::new(spec).unwrap()));
    }
    commands.push(Command::CreateCouponTemplate(template("t", u64::MAX)));
    let percent = CouponTemplateSpec {
        discount: CouponDiscount::PercentOff { percent: 5 },
        scope: Scope::Merchant(id("m")),
        ..template("t2", 1).spec().clone()
    };
    commands.push(Command::CreateCouponTemplate(CouponTemplate::new(percent).unwrap()));
    commands.extend([
        issue("t", "b", "c"),
        try_(u64::MAX, "p", "b", 7, 9),
        confirm(0, "p"),
        cancel(1, "p"),
        lock(2, "c", "b", u64::MAX),
        use_(3, "c"),
        release(4, "c"),
        forget(5, "p"),
        forget_coupon(6, "c"),
    ]);
    commands
}

#[test]
fn commands_round_trip_and_bad_bytes_are_errors() {
    for command in all_commands() {
        let mut bytes = Vec::new();
        encode_command(&command, &mut bytes);
        assert_eq!(decode_command(&bytes), Ok(command.clone()));
        for len in 0..bytes.len() {
            assert!(decode_command(&bytes[..len]).is_err(), "{command:?} truncated at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_command(&longer), Err(DecodeError::TrailingBytes));
        let mut newer = bytes.clone();
        newer[0] = COMMAND_FORMAT_VERSION + 1;
        assert_eq!(decode_command(&newer), Err(DecodeError::UnknownVersion(COMMAND_FORMAT_VERSION + 1)));
        // Every single-byte change decodes to an error or to a valid command; it never panics.
        for at in 0..bytes.len() {
            for value in [0u8, 1, 0x7f, 0x80, 0xff, bytes[at] ^ 1] {
                let mut garbled = bytes.clone();
                garbled[at] = value;
                if let Ok(decoded) = decode_command(&garbled) {
                    let mut again = Vec::new();
                    encode_command(&decoded, &mut again);
                    assert_eq!(again, garbled, "one command, one encoding");
                }
            }
        }
    }
    assert_eq!(decode_command(&[]), Err(DecodeError::Truncated));
    assert_eq!(decode_command(&[COMMAND_FORMAT_VERSION, 200]), Err(DecodeError::Invalid("command tag")));
    // A varint in a longer form than it needs is refused.
    assert_eq!(
        decode_command(&[COMMAND_FORMAT_VERSION, 5, 0x81, 0x00, 1, b'p']),
        Err(DecodeError::Invalid("varint not in its shortest form"))
    );
}

/// A state with something in every section: counters, buyer uses, all
/// kinds of fences, coupons in every state.
fn busy_state() -> Pricing {
    let mut pricing = Pricing::new();
    check(
        &mut pricing,
        &[
            (0, create(promotion("p", Some(1_000), Some(10), Some(3))), "changed"),
            (0, create(promotion("q", None, None, None)), "changed"),
            (0, Command::CreateCouponTemplate(template("t", 10)), "changed"),
            (0, issue("t", "b", "c1"), "changed"),
            (0, issue("t", "b", "c2"), "changed"),
            (0, issue("t", "x", "c3"), "changed"),
            (0, try_(1, "p", "b", 100, 1_000), "changed"),
            (0, try_(2, "p", "b", 200, 1_000), "changed"),
            (0, confirm(2, "p"), "changed"),
            (0, try_(3, "p", "x", 50, 1_000), "changed"),
            (0, cancel(3, "p"), "changed"),
            (0, cancel(4, "q"), "changed"),
            (0, lock(5, "c1", "b", 1_000), "changed"),
            (0, lock(6, "c2", "b", 1_000), "changed"),
            (0, use_(6, "c2"), "changed"),
            (0, release(7, "c3"), "changed"),
        ],
    );
    pricing
}

#[test]
fn checkpoints_round_trip_and_bad_bytes_are_errors() {
    let pricing = busy_state();
    let mut bytes = Vec::new();
    pricing.encode_checkpoint(&mut bytes);
    assert_eq!(bytes[0], CHECKPOINT_FORMAT_VERSION);
    let decoded = Pricing::decode_checkpoint(&bytes).unwrap();
    assert_eq!(decoded, pricing);
    let mut again = Vec::new();
    decoded.encode_checkpoint(&mut again);
    assert_eq!(again, bytes, "one state, one encoding");
    for len in 0..bytes.len() {
        assert!(Pricing::decode_checkpoint(&bytes[..len]).is_err(), "truncated at {len}");
    }
    let mut newer = bytes.clone();
    newer[0] = CHECKPOINT_FORMAT_VERSION + 1;
    assert_eq!(Pricing::decode_checkpoint(&newer), Err(DecodeError::UnknownVersion(CHECKPOINT_FORMAT_VERSION + 1)));
    let mut accepted = 0;
    for at in 1..bytes.len() {
        for value in [0u8, 1, 2, 0x7f, 0x80, 0xff, bytes[at].wrapping_add(1), bytes[at].wrapping_sub(1)] {
            let mut garbled = bytes.clone();
            garbled[at] = value;
            // Never a panic; what decodes is a consistent state.
            if let Ok(state) = Pricing::decode_checkpoint(&garbled) {
                state.check().unwrap();
                accepted += 1;
            }
        }
    }
    // Changing a counter alone must break the consistency check: bump `reserved` of p.
    let mut inconsistent = pricing.clone();
    inconsistent.promotions.get_mut(&id("p")).unwrap().counters.reserved += 1;
    let mut bad = Vec::new();
    inconsistent.encode_checkpoint(&mut bad);
    assert_eq!(
        Pricing::decode_checkpoint(&bad),
        Err(DecodeError::Invalid("reserved counters differ from the tried fences"))
    );
    // Some changes (a deadline, a txn number) still make a consistent state.
    assert!(accepted > 0);
}

#[test]
fn an_empty_state_round_trips() {
    let mut bytes = Vec::new();
    Pricing::new().encode_checkpoint(&mut bytes);
    assert_eq!(bytes, vec![CHECKPOINT_FORMAT_VERSION, 0, 0, 0, 0, 0]);
    assert_eq!(Pricing::decode_checkpoint(&bytes), Ok(Pricing::new()));
}
