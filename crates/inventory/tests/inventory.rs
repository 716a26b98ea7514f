//! The inventory part through its command interface: every code, the
//! flash-sale race, deadlines, and a property test of the invariants over
//! random command sequences (with checkpoints taken and read back midway).

use peakstack_domain::wire::{Reader, Writer};
use peakstack_domain::{Amount, Currency, ErrorCode, Id};
use peakstack_inventory::{
    decode_command, encode_command, Answer, Command, Inventory, NewFlashSale, NewSku, ReservationState, SaleState,
};
use proptest::prelude::*;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn sku(name: &str, stock: u64, limit: Option<u32>) -> Command {
    Command::CreateSku(NewSku {
        id: id(name),
        merchant_id: id("m1"),
        title: "Phone".into(),
        price: Amount::new(99_900).unwrap(),
        currency: Currency::parse("CNY").unwrap(),
        stock,
        per_buyer_limit: limit,
    })
}

fn sale(name: &str, sku_id: &str, quantity: u64, starts_at_ms: u64, ends_at_ms: u64, limit: u32) -> Command {
    Command::CreateFlashSale(NewFlashSale {
        id: id(name),
        sku_id: id(sku_id),
        price: Amount::new(1).unwrap(),
        quantity,
        starts_at_ms,
        ends_at_ms,
        per_buyer_limit: limit,
        pay_within_ms: 1_000,
    })
}

fn attempt(sale_id: &str, buyer: &str, quantity: u32) -> Command {
    Command::Attempt { shard: 3, sale_id: id(sale_id), buyer_id: id(buyer), quantity }
}

fn reserve(sku_id: &str, buyer: &str, quantity: u32) -> Command {
    Command::Reserve { shard: 3, sku_id: id(sku_id), buyer_id: id(buyer), quantity, hold_ms: 1_000 }
}

/// Applies `command` at `now_ms` and checks whether it changed state and its
/// answer's code (`None`: accepted).
fn check(inventory: &mut Inventory, command: Command, now_ms: u64, expected: Option<ErrorCode>) -> Option<Answer> {
    let (changed, reply) = inventory.apply(&command, now_ms);
    assert_eq!(reply.as_ref().err().copied(), expected, "{command:?}");
    if expected.is_some() {
        let may_change = matches!(command, Command::Confirm { .. } | Command::ConfirmBranch { .. });
        assert!(!changed || may_change, "a refusal changed state: {command:?}");
    }
    reply.ok()
}

/// Applies what is due at `now_ms`; whether anything was.
fn run_due(inventory: &mut Inventory, now_ms: u64) -> bool {
    let due = inventory.due(now_ms);
    for command in &due {
        let (changed, reply) = inventory.apply(command, now_ms);
        assert!(changed && reply.is_ok(), "{command:?}: {reply:?}");
    }
    !due.is_empty()
}

fn reservation_of(answer: Option<Answer>) -> peakstack_domain::Id {
    match answer {
        Some(Answer::Reservation(r)) => r.id,
        other => panic!("not a reservation: {other:?}"),
    }
}

#[test]
fn skus_reservations_and_their_codes() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("s1", 5, Some(3)), 0, None);
    check(&mut inv, sku("s1", 5, Some(3)), 0, None); // same fields: an idempotent repeat
    check(&mut inv, sku("s1", 6, Some(2)), 0, Some(ErrorCode::ExistsWithDifferentFields));
    check(&mut inv, reserve("nope", "b1", 1), 0, Some(ErrorCode::SkuNotFound));
    check(&mut inv, reserve("s1", "b1", 0), 0, Some(ErrorCode::InvalidRequest));
    let first = reservation_of(check(&mut inv, reserve("s1", "b1", 2), 0, None));
    assert_eq!(first.as_str(), "rsv_3_1");
    check(&mut inv, reserve("s1", "b1", 2), 0, Some(ErrorCode::PurchaseLimitExceeded));
    let second = reservation_of(check(&mut inv, reserve("s1", "b2", 3), 0, None));
    check(&mut inv, reserve("s1", "b3", 1), 0, Some(ErrorCode::OutOfStock));
    check(&mut inv, Command::Confirm { reservation_id: first.clone() }, 10, None);
    check(&mut inv, Command::Confirm { reservation_id: first.clone() }, 10, None); // repeat: same answer
    check(&mut inv, Command::Cancel { reservation_id: first.clone() }, 10, Some(ErrorCode::ReservationConfirmed));
    check(&mut inv, Command::Cancel { reservation_id: second.clone() }, 10, None);
    check(&mut inv, Command::Confirm { reservation_id: second.clone() }, 10, Some(ErrorCode::ReservationCancelled));
    check(&mut inv, Command::Confirm { reservation_id: id("rsv_3_99") }, 10, Some(ErrorCode::ReservationNotFound));
    let s = inv.sku(&id("s1")).unwrap();
    assert_eq!((s.stock, s.sold, s.reserved, s.available()), (5, 2, 0, 3));
    // Sold units count against the limit; cancelled ones do not.
    check(&mut inv, reserve("s1", "b1", 2), 10, Some(ErrorCode::PurchaseLimitExceeded));
    check(&mut inv, reserve("s1", "b2", 3), 10, None);
    check(&mut inv, Command::Restock { sku_id: id("s1"), quantity: 0 }, 10, Some(ErrorCode::InvalidRequest));
    check(&mut inv, Command::Restock { sku_id: id("nope"), quantity: 1 }, 10, Some(ErrorCode::SkuNotFound));
    check(&mut inv, Command::Restock { sku_id: id("s1"), quantity: 1 << 53 }, 10, Some(ErrorCode::Overflow));
    check(&mut inv, Command::Restock { sku_id: id("s1"), quantity: 4 }, 10, None);
    assert_eq!(inv.sku(&id("s1")).unwrap().available(), 4);
}

#[test]
fn a_reservation_past_its_deadline_expires_and_gives_its_units_back() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("s1", 1, None), 0, None);
    let r = reservation_of(check(&mut inv, reserve("s1", "b1", 1), 0, None));
    assert_eq!(inv.due(999), Vec::new());
    assert!(run_due(&mut inv, 1_000), "the deadline passed");
    assert!(matches!(inv.reservation(&r).unwrap().state, ReservationState::Expired { at_ms: 1_000 }));
    check(&mut inv, Command::Confirm { reservation_id: r.clone() }, 1_001, Some(ErrorCode::ReservationExpired));
    assert_eq!(inv.sku(&id("s1")).unwrap().available(), 1);
    // A confirm that comes after the deadline, before the expiry ran, finds it expired.
    let late = reservation_of(check(&mut inv, reserve("s1", "b1", 1), 2_000, None));
    check(&mut inv, Command::Confirm { reservation_id: late.clone() }, 3_000, Some(ErrorCode::ReservationExpired));
    assert_eq!(inv.sku(&id("s1")).unwrap().available(), 1);
    // Finished reservations are forgotten a day after they finished.
    let day = peakstack_inventory::RESERVATION_RETENTION_MS;
    assert!(run_due(&mut inv, 3_000 + day), "retention passed");
    assert!(inv.reservation(&r).is_none() && inv.reservation(&late).is_none());
}

#[test]
fn a_flash_sale_answers_each_phase_with_its_code() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("s1", 10, None), 0, None);
    check(&mut inv, sale("f1", "nope", 3, 100, 200, 2), 0, Some(ErrorCode::SkuNotFound));
    check(&mut inv, sale("f1", "s1", 11, 100, 200, 2), 0, Some(ErrorCode::OutOfStock));
    check(&mut inv, sale("f1", "s1", 3, 200, 100, 2), 0, Some(ErrorCode::InvalidRequest));
    check(&mut inv, sale("f1", "s1", 3, 100, 200, 2), 0, None);
    assert_eq!(inv.sku(&id("s1")).unwrap().available(), 7);
    check(&mut inv, attempt("nope", "b1", 1), 100, Some(ErrorCode::FlashSaleNotFound));
    check(&mut inv, attempt("f1", "b1", 1), 99, Some(ErrorCode::SaleNotStarted));
    assert_eq!(inv.sale(&id("f1")).unwrap().state(99), SaleState::Scheduled);
    check(&mut inv, attempt("f1", "b1", 2), 100, None);
    check(&mut inv, attempt("f1", "b1", 1), 100, Some(ErrorCode::PurchaseLimitExceeded));
    check(&mut inv, attempt("f1", "b2", 2), 100, Some(ErrorCode::OutOfStock));
    check(&mut inv, attempt("f1", "b2", 1), 100, None);
    check(&mut inv, attempt("f1", "b3", 1), 100, Some(ErrorCode::SoldOut));
    assert_eq!(inv.sale(&id("f1")).unwrap().state(100), SaleState::SoldOut);
    check(&mut inv, attempt("f1", "b3", 1), 200, Some(ErrorCode::SaleEnded));
}

#[test]
fn unpaid_units_go_back_on_sale_and_leftovers_back_to_the_sku_when_it_ends() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("s1", 10, None), 0, None);
    check(&mut inv, sale("f1", "s1", 2, 0, 10_000, 1), 0, None);
    let paid = reservation_of(check(&mut inv, attempt("f1", "b1", 1), 0, None));
    let unpaid = reservation_of(check(&mut inv, attempt("f1", "b2", 1), 0, None));
    check(&mut inv, attempt("f1", "b3", 1), 0, Some(ErrorCode::SoldOut));
    check(&mut inv, Command::Confirm { reservation_id: paid }, 500, None);
    assert!(run_due(&mut inv, 1_000));
    assert!(matches!(inv.reservation(&unpaid).unwrap().state, ReservationState::Expired { .. }));
    // b2's unit is back on sale; b2 may try again (nothing of it counts now).
    assert_eq!(inv.sale(&id("f1")).unwrap().remaining(), 1);
    let resold = reservation_of(check(&mut inv, attempt("f1", "b3", 1), 1_000, None));
    let f1 = inv.sale(&id("f1")).unwrap();
    assert_eq!((f1.sold, f1.reserved, f1.remaining()), (1, 1, 0));
    // The sale ends with b3's unit reserved: when it expires it goes back to the SKU.
    assert!(run_due(&mut inv, 10_000));
    assert_eq!(inv.sale(&id("f1")).unwrap().state(10_000), SaleState::Ended);
    assert!(inv.reservation(&resold).unwrap().state == ReservationState::Expired { at_ms: 10_000 });
    let s1 = inv.sku(&id("s1")).unwrap();
    assert_eq!((s1.sold, s1.reserved, s1.on_sale, s1.available()), (1, 0, 0, 9));
}

#[test]
fn racing_buyers_for_k_units_buy_exactly_k_and_never_more_than_the_limit() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("hot", 1_000, None), 0, None);
    check(&mut inv, sale("f1", "hot", 100, 0, 1_000_000, 2), 0, None);
    let mut won = 0u64;
    for round in 0..3u64 {
        for buyer in 0..500 {
            let (_, reply) = inv.apply(&attempt("f1", &format!("b{}", buyer % 60), 1), round * 2_000);
            if reply.is_ok() {
                won += 1;
            }
        }
        // Nobody pays in the first two rounds: every unit comes back.
        run_due(&mut inv, round * 2_000 + 1_000);
    }
    // 60 buyers, limit 2: at most 120 units a round, and 100 on sale.
    assert_eq!(won, 300, "each round sells exactly the 100 units");
    for buyer in 0..60 {
        assert!(inv.buyer_units_of_sale(&id("f1"), &id(&format!("b{buyer}"))) <= 2);
    }
}

#[test]
fn commands_round_trip_and_garbage_does_not_decode() {
    let commands = vec![
        sku("s1", 5, Some(3)),
        sku("s2", 0, None),
        Command::Restock { sku_id: id("s1"), quantity: 7 },
        reserve("s1", "b1", 2),
        Command::Confirm { reservation_id: id("rsv_3_1") },
        Command::Cancel { reservation_id: id("rsv_3_1") },
        sale("f1", "s1", 3, 100, 200, 2),
        attempt("f1", "b1", 1),
        Command::Expire { reservations: vec![id("rsv_3_2")], sales: vec![id("f1")] },
        try_reserve(7, "s1", 2, 99),
        confirm_branch(7, "s1"),
        cancel_branch(1 << 50, "s2"),
        Command::ForgetFences { fences: vec![(7, id("s1")), (8, id("s2"))] },
    ];
    for command in commands {
        let mut w = Writer::default();
        encode_command(&command, &mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(decode_command(&mut r).unwrap(), command);
        assert!(r.is_empty());
        for cut in 0..w.buf.len() {
            let mut r = Reader::new(&w.buf[..cut]);
            assert!(decode_command(&mut r).is_err(), "a prefix of {cut} bytes decoded");
        }
    }
    assert!(decode_command(&mut Reader::new(&[200])).is_err());
}

/// A checkpoint of `inv` read back, asserting it is the same state.
fn reloaded(inv: &Inventory) -> Inventory {
    let mut w = Writer::default();
    inv.encode_checkpoint(&mut w);
    let mut r = Reader::new(&w.buf);
    let back = Inventory::decode_checkpoint(&mut r).expect("a checkpoint reads back");
    assert!(r.is_empty());
    assert!(back.same_state(inv), "a checkpoint keeps the whole state");
    for cut in [1, w.buf.len() / 2, w.buf.len() - 1] {
        assert!(Inventory::decode_checkpoint(&mut Reader::new(&w.buf[..cut])).is_err(), "cut at {cut}");
    }
    back
}

#[derive(Clone, Debug)]
enum Step {
    Reserve {
        buyer: u8,
        quantity: u32,
    },
    Attempt {
        buyer: u8,
        quantity: u32,
    },
    Confirm {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    Restock {
        quantity: u64,
    },
    Advance {
        ms: u64,
    },
    Checkpoint,
    /// Branch messages of a few transactions, in any order and repeated.
    Branch {
        txn: u64,
        what: u8,
        quantity: u32,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..8, 1u32..4).prop_map(|(buyer, quantity)| Step::Reserve { buyer, quantity }),
        (0u8..8, 1u32..4).prop_map(|(buyer, quantity)| Step::Attempt { buyer, quantity }),
        (0usize..64).prop_map(|pick| Step::Confirm { pick }),
        (0usize..64).prop_map(|pick| Step::Cancel { pick }),
        (1u64..4).prop_map(|quantity| Step::Restock { quantity }),
        (1u64..1_500).prop_map(|ms| Step::Advance { ms }),
        Just(Step::Checkpoint),
        (0u64..6, 0u8..3, 1u32..3).prop_map(|(txn, what, quantity)| Step::Branch { txn, what, quantity }),
    ]
}

proptest! {
    /// Whatever happens, no unit is sold twice, no buyer passes a limit,
    /// the counters agree with the reservations, and a checkpoint read
    /// back behaves as the state it was taken of.
    #[test]
    fn no_oversell_no_limit_passed_and_checkpoints_keep_everything(steps in proptest::collection::vec(step(), 1..120)) {
        let mut inv = Inventory::new();
        prop_assert!(inv.apply(&sku("s1", 6, Some(3)), 0).1.is_ok());
        prop_assert!(inv.apply(&sale("f1", "s1", 4, 0, 20_000, 2), 0).1.is_ok());
        let mut now = 0u64;
        let mut made: Vec<Id> = Vec::new();
        for step in steps {
            run_due(&mut inv, now);
            let command = match step {
                Step::Reserve { buyer, quantity } => reserve("s1", &format!("b{buyer}"), quantity),
                Step::Attempt { buyer, quantity } => attempt("f1", &format!("b{buyer}"), quantity),
                Step::Confirm { pick } if !made.is_empty() => Command::Confirm { reservation_id: made[pick % made.len()].clone() },
                Step::Cancel { pick } if !made.is_empty() => Command::Cancel { reservation_id: made[pick % made.len()].clone() },
                Step::Restock { quantity } => Command::Restock { sku_id: id("s1"), quantity },
                Step::Advance { ms } => { now += ms; continue }
                Step::Checkpoint => { inv = reloaded(&inv); continue }
                Step::Branch { txn, what: 0, quantity } => try_reserve(txn, "s1", quantity, txn * 3_000 + 2_000),
                Step::Branch { txn, what: 1, .. } => confirm_branch(txn, "s1"),
                Step::Branch { txn, .. } => cancel_branch(txn, "s1"),
                _ => continue,
            };
            if let (_, Ok(Answer::Reservation(r))) = inv.apply(&command, now) {
                if r.state == ReservationState::Reserved && !made.contains(&r.id) { made.push(r.id) }
            }
            let s1 = inv.sku(&id("s1")).unwrap().clone();
            let f1 = inv.sale(&id("f1")).unwrap().clone();
            prop_assert!(s1.sold + s1.reserved + s1.on_sale <= s1.stock);
            prop_assert!(f1.sold + f1.reserved <= f1.quantity);
            let (mut sold, mut reserved, mut sale_sold, mut sale_reserved) = (0u64, 0u64, 0u64, 0u64);
            for rid in &made {
                let Some(r) = inv.reservation(rid) else { continue };
                let units = u64::from(r.quantity);
                match (r.state, r.sale_id.is_some()) {
                    (ReservationState::Confirmed { .. }, true) => { sold += units; sale_sold += units }
                    (ReservationState::Confirmed { .. }, false) => sold += units,
                    (ReservationState::Reserved, true) => { reserved += units; sale_reserved += units }
                    (ReservationState::Reserved, false) => reserved += units,
                    _ => {}
                }
            }
            prop_assert_eq!((s1.sold, s1.reserved), (sold, reserved));
            prop_assert_eq!((f1.sold, f1.reserved), (sale_sold, sale_reserved));
            for buyer in 0..8 {
                let b = id(&format!("b{buyer}"));
                prop_assert!(inv.buyer_units_of_sku(&id("s1"), &b) <= 3);
                prop_assert!(inv.buyer_units_of_sale(&id("f1"), &b) <= 2);
            }
        }
    }
}

fn try_reserve(txn: u64, sku_id: &str, quantity: u32, deadline_ms: u64) -> Command {
    Command::TryReserve { txn, shard: 3, sku_id: id(sku_id), buyer_id: id("b1"), quantity, deadline_ms }
}

fn confirm_branch(txn: u64, sku_id: &str) -> Command {
    Command::ConfirmBranch { txn, sku_id: id(sku_id) }
}

fn cancel_branch(txn: u64, sku_id: &str) -> Command {
    Command::CancelBranch { txn, sku_id: id(sku_id) }
}

#[test]
fn branches_answer_repeats_from_their_fences_and_a_cancel_first_suspends() {
    let mut inv = Inventory::new();
    check(&mut inv, sku("s1", 5, None), 0, None);
    // Try, repeated: one reservation, the same answer.
    let first = reservation_of(check(&mut inv, try_reserve(1, "s1", 2, 1_000), 0, None));
    let again = reservation_of(check(&mut inv, try_reserve(1, "s1", 2, 1_000), 10, None));
    assert_eq!(first, again);
    assert_eq!(inv.sku(&id("s1")).unwrap().reserved, 2);
    // Confirm, repeated; a cancel after it is refused.
    check(&mut inv, confirm_branch(1, "s1"), 20, None);
    check(&mut inv, confirm_branch(1, "s1"), 30, None);
    check(&mut inv, cancel_branch(1, "s1"), 30, Some(ErrorCode::ReservationConfirmed));
    assert_eq!(inv.sku(&id("s1")).unwrap().sold, 2);
    // A cancel before its try: suspended, done; the try that comes later is
    // refused and holds nothing (no hanging reservation).
    check(&mut inv, cancel_branch(2, "s1"), 40, None);
    check(&mut inv, cancel_branch(2, "s1"), 41, None);
    check(&mut inv, try_reserve(2, "s1", 1, 1_000), 50, Some(ErrorCode::BranchCancelled));
    assert_eq!(inv.branch(2, &id("s1")).unwrap().state, peakstack_inventory::BranchState::Suspended);
    assert_eq!(inv.sku(&id("s1")).unwrap().reserved, 0);
    // Tried then cancelled: the units go back; a late repeat of the try is refused.
    check(&mut inv, try_reserve(3, "s1", 3, 1_000), 60, None);
    check(&mut inv, cancel_branch(3, "s1"), 70, None);
    check(&mut inv, try_reserve(3, "s1", 3, 1_000), 80, Some(ErrorCode::BranchCancelled));
    check(&mut inv, confirm_branch(3, "s1"), 80, Some(ErrorCode::BranchCancelled));
    assert_eq!(inv.sku(&id("s1")).unwrap().available(), 3);
    // A try at or past its transaction's deadline leaves nothing behind.
    check(&mut inv, try_reserve(4, "s1", 1, 100), 100, Some(ErrorCode::BranchCancelled));
    assert!(inv.branch(4, &id("s1")).is_none());
    // A try nobody confirms expires at the transaction's deadline; the
    // confirm that comes later is refused and the branch ends cancelled.
    check(&mut inv, try_reserve(5, "s1", 1, 2_000), 1_000, None);
    assert!(run_due(&mut inv, 2_000));
    assert_eq!(inv.sku(&id("s1")).unwrap().reserved, 0);
    check(&mut inv, confirm_branch(5, "s1"), 2_001, Some(ErrorCode::ReservationExpired));
    assert_eq!(inv.branch(5, &id("s1")).unwrap().state, peakstack_inventory::BranchState::Cancelled);
    // Fences are kept until a day past their deadline, then forgotten.
    let retention = peakstack_inventory::FENCE_RETENTION_MS;
    run_due(&mut inv, 2_000 + retention - 1);
    assert!(inv.branch(5, &id("s1")).is_some());
    assert!(run_due(&mut inv, 2_000 + retention));
    assert!(inv.branch(5, &id("s1")).is_none());
    assert!(inv.branch(1, &id("s1")).is_none(), "forgotten a day after its deadline");
    let back = reloaded(&inv);
    assert!(back.same_state(&inv));
}
