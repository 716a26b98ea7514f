//! The quote: the single pricing function. A quote shown to a buyer and the
//! order placed after it are priced by this same function, so they agree
//! to the minor unit.
//!
//! Order of work:
//! 1. Lines: each SKU's price times its quantity; one currency per cart.
//! 2. Promotions whose scope touches the cart, in order of application
//!    (priority, lower first; ties by id), each computed on what the earlier
//!    ones left of the lines. Promotions in another currency than the cart
//!    are not for it and are passed over silently.
//! 3. An exclusive group is decided where its first member comes in that
//!    order: every eligible member is computed on the same amounts, the one
//!    that saves the most applies there (ties: the lower id), the others
//!    are skipped with `lost_to_group`. Give a group's members one priority
//!    and that is also the order one expects.
//! 4. Coupons, in the order of the request, on what the promotions left.
//!
//! A per-line promotion (percent off, buy x get y) rounds down on each
//! line. An order-level discount (amount off, spend threshold, coupon) is
//! shared over the lines it covers in proportion to what is left of them
//! (largest remainder), so its shares add up to it exactly. A promotion
//! with a budget gives at most what is left of it: a capped discount is
//! shared over the lines in proportion to the uncapped shares.

use peakstack_domain::{Currency, ErrorCode, Id};

use crate::allocation::{allocate, mul_div_rem};
use crate::book::PriceBook;
use crate::catalogue::{Coupon, CouponDiscount, CouponState, Promotion, PromotionKind, MAX_LINE_QUANTITY};
use crate::quote_types::{
    AppliedDiscount, DiscountSource, LineDiscount, MerchantTotal, Quote, QuoteLine, QuoteRequest, SkipReason,
    SkippedPromotion, UsageView,
};

/// Most lines one cart may hold (a line's place is a bit of a `u128` mask).
pub const MAX_QUOTE_LINES: usize = 100;
/// Most coupons one cart may use.
pub const MAX_QUOTE_COUPONS: usize = 4;

const _: () = assert!(MAX_QUOTE_LINES <= 128);

/// A promotion that touches the cart: its place in the book (its order of
/// application) and the lines of the cart in its scope, one bit each.
#[derive(Clone, Copy)]
struct Candidate {
    place: u32,
    lines: u128,
    /// For a member of an exclusive group: set for all members at once,
    /// when the group is decided.
    decision: Decision,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Decision {
    Pending,
    Applied,
    Skipped(SkipReason),
}

/// Amounts per line, on the stack: what is left of each line, and buffers
/// for the shares of the discount being computed.
struct Work {
    len: usize,
    remaining: [u64; MAX_QUOTE_LINES],
    weights: [u64; MAX_QUOTE_LINES],
    shares: [u64; MAX_QUOTE_LINES],
    best: [u64; MAX_QUOTE_LINES],
}

/// Prices a cart. `usage` gives the promotion counters (a snapshot of the
/// single writer's), `coupons` the buyer's coupons; `now_ms` decides which
/// promotions and coupons are live. Same inputs, same quote.
///
/// Errors: `InvalidRequest` (no lines, more than [`MAX_QUOTE_LINES`], a
/// quantity of 0 or above [`MAX_LINE_QUANTITY`], a SKU twice, more than
/// [`MAX_QUOTE_COUPONS`] coupons or one twice), `SkuNotFound`,
/// `CurrencyMismatch` (SKUs in several currencies), `Overflow`, and for a
/// coupon `CouponNotFound`, `CouponNotApplicable` (another buyer's, another
/// currency, no line in scope, below its minimum spend, a second coupon of
/// one template, or nothing to take off), `CouponAlreadyUsed` (used or
/// locked) and `CouponExpired` (outside its validity window).
pub fn quote<U: UsageView + ?Sized>(
    book: &PriceBook,
    request: &QuoteRequest,
    usage: &U,
    coupons: &[Coupon],
    now_ms: u64,
) -> Result<Quote, ErrorCode> {
    check_shape(request)?;
    let mut candidates = Vec::with_capacity(book.on_everything().len() + 8 * request.lines.len());
    let mut line_merchants = [0u32; MAX_QUOTE_LINES];
    let (mut lines, currency, subtotal) = price_lines(book, request, &mut line_merchants, &mut candidates)?;
    add_shared_candidates(book, &line_merchants[..lines.len()], &mut candidates);
    let mut work = Work {
        len: lines.len(),
        remaining: [0; MAX_QUOTE_LINES],
        weights: [0; MAX_QUOTE_LINES],
        shares: [0; MAX_QUOTE_LINES],
        best: [0; MAX_QUOTE_LINES],
    };
    for (slot, line) in work.remaining.iter_mut().zip(&lines) {
        *slot = line.subtotal;
    }
    // Sized once: at most every candidate and coupon gives, and skips.
    let coupon_count = request.coupon_ids.len();
    for (index, line) in lines.iter_mut().enumerate() {
        let touching = candidates.iter().filter(|candidate| covers(candidate.lines, index)).count();
        line.discounts.reserve_exact(touching + coupon_count);
    }
    let mut applied = Vec::with_capacity(candidates.len() + coupon_count);
    let mut skipped = Vec::with_capacity(candidates.len());
    let promotions = Promotions { book, usage, buyer_id: &request.buyer_id, currency, now_ms };
    promotions.apply(&mut candidates, &mut lines, &mut work, &mut applied, &mut skipped);
    apply_coupons(book, request, coupons, currency, now_ms, &mut lines, &mut work, &mut applied)?;

    let mut discount = 0;
    for (line, &left) in lines.iter_mut().zip(&work.remaining) {
        line.total = left;
        line.discount = line.subtotal - left;
        discount += line.discount;
    }
    let merchants = merchant_totals(&lines);
    Ok(Quote { currency, subtotal, discount, total: subtotal - discount, lines, merchants, applied, skipped })
}

fn check_shape(request: &QuoteRequest) -> Result<(), ErrorCode> {
    let lines = &request.lines;
    let coupons = &request.coupon_ids;
    let shape_ok = !lines.is_empty()
        && lines.len() <= MAX_QUOTE_LINES
        && lines.iter().all(|line| (1..=MAX_LINE_QUANTITY).contains(&line.quantity))
        && coupons.len() <= MAX_QUOTE_COUPONS;
    // Quadratic, but over at most MAX_QUOTE_LINES short ids.
    let distinct = (1..lines.len()).all(|i| lines[..i].iter().all(|earlier| earlier.sku_id != lines[i].sku_id))
        && (1..coupons.len()).all(|i| !coupons[..i].contains(&coupons[i]));
    if shape_ok && distinct {
        Ok(())
    } else {
        Err(ErrorCode::InvalidRequest)
    }
}

/// Prices the lines; notes each line's merchant number, and as candidates
/// the promotions that name its SKU.
fn price_lines(
    book: &PriceBook,
    request: &QuoteRequest,
    line_merchants: &mut [u32; MAX_QUOTE_LINES],
    candidates: &mut Vec<Candidate>,
) -> Result<(Vec<QuoteLine>, Currency, u64), ErrorCode> {
    let mut lines = Vec::with_capacity(request.lines.len());
    let mut currency = None;
    let mut subtotal = 0u64;
    for (index, line) in request.lines.iter().enumerate() {
        let entry = book.book_sku(&line.sku_id).ok_or(ErrorCode::SkuNotFound)?;
        let sku = &entry.price;
        line_merchants[index] = entry.merchant;
        let (mask, decision) = (1 << index, Decision::Pending);
        candidates.extend(entry.promotions.iter().map(|&place| Candidate { place, lines: mask, decision }));
        if *currency.get_or_insert(sku.currency) != sku.currency {
            return Err(ErrorCode::CurrencyMismatch);
        }
        let line_subtotal = sku.unit_price.checked_mul(u64::from(line.quantity)).ok_or(ErrorCode::Overflow)?;
        subtotal = subtotal.checked_add(line_subtotal).ok_or(ErrorCode::Overflow)?;
        lines.push(QuoteLine {
            sku_id: sku.sku_id.clone(),
            merchant_id: sku.merchant_id.clone(),
            unit_price: sku.unit_price,
            quantity: line.quantity,
            subtotal: line_subtotal,
            discounts: Vec::new(),
            discount: 0,
            total: line_subtotal,
        });
    }
    Ok((lines, currency.expect("at least one line"), subtotal))
}

/// The promotions' side of a quote: what it reads.
struct Promotions<'a, U: ?Sized> {
    book: &'a PriceBook,
    usage: &'a U,
    buyer_id: &'a Id,
    currency: Currency,
    now_ms: u64,
}

impl<U: UsageView + ?Sized> Promotions<'_, U> {
    fn apply(
        &self,
        candidates: &mut [Candidate],
        lines: &mut [QuoteLine],
        work: &mut Work,
        applied: &mut Vec<AppliedDiscount>,
        skipped: &mut Vec<SkippedPromotion>,
    ) {
        for index in 0..candidates.len() {
            let candidate = candidates[index];
            let entry = self.book.promotion_at(candidate.place);
            let promotion = &entry.promotion;
            if promotion.currency != self.currency {
                continue;
            }
            let outcome = match entry.group {
                None => match self.compute(promotion, candidate.lines, lines, work) {
                    Ok(amount) => {
                        let source = DiscountSource::Promotion(promotion.id.clone());
                        give(source, amount, &work.shares[..work.len], &mut work.remaining, lines, applied);
                        None
                    }
                    Err(reason) => Some(reason),
                },
                Some(group) => {
                    if candidate.decision == Decision::Pending {
                        self.decide_group(group, index, candidates, lines, work, applied);
                    }
                    match candidates[index].decision {
                        Decision::Pending => unreachable!("decided with its group"),
                        Decision::Applied => None,
                        Decision::Skipped(reason) => Some(reason),
                    }
                }
            };
            if let Some(reason) = outcome {
                skipped.push(SkippedPromotion { promotion_id: promotion.id.clone(), reason });
            }
        }
    }

    /// Computes every eligible member of `group` (from candidate `first` on)
    /// on the same amounts, applies the best, and records each member's decision.
    fn decide_group(
        &self,
        group: u32,
        first: usize,
        candidates: &mut [Candidate],
        lines: &mut [QuoteLine],
        work: &mut Work,
        applied: &mut Vec<AppliedDiscount>,
    ) {
        let len = work.len;
        let mut best: Option<(usize, u64)> = None;
        for index in first..candidates.len() {
            let candidate = candidates[index];
            let entry = self.book.promotion_at(candidate.place);
            if entry.group != Some(group) || entry.promotion.currency != self.currency {
                continue;
            }
            match self.compute(&entry.promotion, candidate.lines, lines, work) {
                Err(reason) => candidates[index].decision = Decision::Skipped(reason),
                Ok(amount) => {
                    candidates[index].decision = Decision::Skipped(SkipReason::LostToGroup);
                    let better = best.is_none_or(|(best_index, best_amount)| {
                        let best_id = &self.book.promotion_at(candidates[best_index].place).promotion.id;
                        amount > best_amount || (amount == best_amount && entry.promotion.id < *best_id)
                    });
                    if better {
                        best = Some((index, amount));
                        work.best[..len].copy_from_slice(&work.shares[..len]);
                    }
                }
            }
        }
        if let Some((winner, amount)) = best {
            let id = self.book.promotion_at(candidates[winner].place).promotion.id.clone();
            give(DiscountSource::Promotion(id), amount, &work.best[..len], &mut work.remaining, lines, applied);
            candidates[winner].decision = Decision::Applied;
        }
    }

    /// What `promotion` would give now, into `work.shares`, or why it gives nothing.
    fn compute(
        &self,
        promotion: &Promotion,
        in_scope: u128,
        lines: &[QuoteLine],
        work: &mut Work,
    ) -> Result<u64, SkipReason> {
        let budget_left = self.eligible(promotion)?;
        let amount = discount_of(promotion.kind, in_scope, lines, work)?;
        if amount <= budget_left {
            return Ok(amount);
        }
        // What is left of the budget, shared like the full discount would be.
        let len = work.len;
        work.weights[..len].copy_from_slice(&work.shares[..len]);
        allocate(budget_left, &work.weights[..len], &mut work.shares[..len]);
        Ok(budget_left)
    }

    /// The budget left (`u64::MAX` without one), or why the promotion is out.
    fn eligible(&self, promotion: &Promotion) -> Result<u64, SkipReason> {
        if self.now_ms < promotion.starts_at_ms {
            return Err(SkipReason::NotStarted);
        }
        if self.now_ms >= promotion.ends_at_ms {
            return Err(SkipReason::Ended);
        }
        if !promotion.is_limited() {
            return Ok(u64::MAX);
        }
        let used = self.usage.usage(&promotion.id, self.buyer_id);
        if promotion.usage_limit.is_some_and(|limit| used.uses >= limit) {
            return Err(SkipReason::UsageLimitReached);
        }
        if promotion.per_buyer_limit.is_some_and(|limit| used.buyer_uses >= limit) {
            return Err(SkipReason::PerBuyerLimitReached);
        }
        match promotion.budget {
            None => Ok(u64::MAX),
            Some(budget) => match budget.saturating_sub(used.discount) {
                0 => Err(SkipReason::BudgetExhausted),
                left => Ok(left),
            },
        }
    }
}

/// Completes the candidates (the promotions that touch the cart) with
/// those on a merchant of the cart and on everything, and puts them in
/// order of application, one entry per promotion with all the lines it
/// covers. Built from the book's scope index, not by scanning the book.
fn add_shared_candidates(book: &PriceBook, line_merchants: &[u32], found: &mut Vec<Candidate>) {
    let decision = Decision::Pending;
    let all_lines = u128::MAX >> (128 - line_merchants.len());
    found.extend(book.on_everything().iter().map(|&place| Candidate { place, lines: all_lines, decision }));
    for (index, &merchant) in line_merchants.iter().enumerate() {
        if line_merchants[..index].contains(&merchant) {
            continue;
        }
        let lines = line_merchants[index..]
            .iter()
            .enumerate()
            .filter(|(_, &later)| later == merchant)
            .fold(0u128, |mask, (offset, _)| mask | 1 << (index + offset));
        found.extend(book.on_merchant(merchant).iter().map(|&place| Candidate { place, lines, decision }));
    }
    found.sort_unstable_by_key(|candidate| candidate.place);
    found.dedup_by(|later, kept| {
        let same = later.place == kept.place;
        if same {
            kept.lines |= later.lines;
        }
        same
    });
}

fn covers(in_scope: u128, line: usize) -> bool {
    in_scope & (1 << line) != 0
}

/// The discount of a promotion kind on what is left of the lines in scope,
/// with its shares in `work.shares`.
fn discount_of(kind: PromotionKind, in_scope: u128, lines: &[QuoteLine], work: &mut Work) -> Result<u64, SkipReason> {
    let len = work.len;
    let total = match kind {
        PromotionKind::PercentOff { percent } => {
            let mut total = 0;
            for line in 0..len {
                let left = work.remaining[line];
                work.shares[line] =
                    if covers(in_scope, line) { mul_div_rem(left, u64::from(percent), 100).0 } else { 0 };
                total += work.shares[line];
            }
            total
        }
        PromotionKind::BuyXGetY { buy, get } => {
            let cycle = u64::from(buy) + u64::from(get);
            let mut qualifies = false;
            let mut total = 0;
            for (line, quoted) in lines.iter().enumerate() {
                let quantity = u64::from(quoted.quantity);
                work.shares[line] = 0;
                if covers(in_scope, line) && quantity >= cycle {
                    qualifies = true;
                    // The free units' part of what is left of the line
                    // (all of their price when nothing came off before).
                    let free = quantity / cycle * u64::from(get);
                    work.shares[line] = mul_div_rem(work.remaining[line], free, quantity).0;
                    total += work.shares[line];
                }
            }
            if !qualifies {
                return Err(SkipReason::BelowThreshold);
            }
            total
        }
        PromotionKind::AmountOff { amount } => {
            let in_scope_left = scoped_weights(in_scope, work);
            share_out(amount.min(in_scope_left), work)
        }
        PromotionKind::SpendThreshold { threshold, off, stepwise } => {
            let in_scope_left = scoped_weights(in_scope, work);
            if in_scope_left < threshold {
                return Err(SkipReason::BelowThreshold);
            }
            let amount = if stepwise { (in_scope_left / threshold).saturating_mul(off) } else { off };
            share_out(amount.min(in_scope_left), work)
        }
    };
    if total == 0 {
        return Err(SkipReason::NothingToDiscount);
    }
    Ok(total)
}

/// Sets `work.weights` to what is left of the lines in scope (0 elsewhere); returns their sum.
fn scoped_weights(in_scope: u128, work: &mut Work) -> u64 {
    let mut sum = 0;
    for line in 0..work.len {
        work.weights[line] = if covers(in_scope, line) { work.remaining[line] } else { 0 };
        sum += work.weights[line];
    }
    sum
}

/// Shares `amount` (at most the sum of `work.weights`) out into `work.shares`.
fn share_out(amount: u64, work: &mut Work) -> u64 {
    let len = work.len;
    allocate(amount, &work.weights[..len], &mut work.shares[..len]);
    amount
}

/// Takes `shares` off the lines and records the discount.
fn give(
    source: DiscountSource,
    amount: u64,
    shares: &[u64],
    remaining: &mut [u64],
    lines: &mut [QuoteLine],
    applied: &mut Vec<AppliedDiscount>,
) {
    let mut given = 0;
    for ((line, &share), left) in lines.iter_mut().zip(shares).zip(remaining.iter_mut()) {
        if share == 0 {
            continue;
        }
        assert!(share <= *left, "a share of {share} exceeds its line's {left}");
        *left -= share;
        given += share;
        line.discounts.push(LineDiscount { source: source.clone(), amount: share });
    }
    assert_eq!(given, amount, "the shares of a discount must add up to it");
    applied.push(AppliedDiscount { source, amount });
}

#[allow(clippy::too_many_arguments)]
fn apply_coupons(
    book: &PriceBook,
    request: &QuoteRequest,
    coupons: &[Coupon],
    currency: Currency,
    now_ms: u64,
    lines: &mut [QuoteLine],
    work: &mut Work,
    applied: &mut Vec<AppliedDiscount>,
) -> Result<(), ErrorCode> {
    for (index, coupon_id) in request.coupon_ids.iter().enumerate() {
        let coupon = coupons.iter().find(|coupon| coupon.id == *coupon_id).ok_or(ErrorCode::CouponNotFound)?;
        if coupon.buyer_id != request.buyer_id {
            return Err(ErrorCode::CouponNotApplicable);
        }
        let template = book.coupon_template(&coupon.template_id).ok_or(ErrorCode::CouponNotFound)?;
        if coupon.state != CouponState::Available {
            return Err(ErrorCode::CouponAlreadyUsed);
        }
        if !template.is_valid_at(now_ms) {
            return Err(ErrorCode::CouponExpired);
        }
        let same_template = request.coupon_ids[..index]
            .iter()
            .any(|earlier| coupons.iter().any(|c| c.id == *earlier && c.template_id == coupon.template_id));
        if template.currency != currency || same_template {
            return Err(ErrorCode::CouponNotApplicable);
        }
        let mut in_scope = 0u128;
        for (line, quoted) in lines.iter().enumerate() {
            if template.scope.covers(&quoted.sku_id, &quoted.merchant_id) {
                in_scope |= 1 << line;
            }
        }
        let in_scope_left = scoped_weights(in_scope, work);
        if in_scope_left == 0 || in_scope_left < template.min_spend {
            return Err(ErrorCode::CouponNotApplicable);
        }
        let amount = match template.discount {
            CouponDiscount::PercentOff { percent } => mul_div_rem(in_scope_left, u64::from(percent), 100).0,
            CouponDiscount::AmountOff { amount } => amount.min(in_scope_left),
        };
        if amount == 0 {
            return Err(ErrorCode::CouponNotApplicable);
        }
        share_out(amount, work);
        let source = DiscountSource::Coupon(coupon.id.clone());
        give(source, amount, &work.shares[..work.len], &mut work.remaining, lines, applied);
    }
    Ok(())
}

fn merchant_totals(lines: &[QuoteLine]) -> Vec<MerchantTotal> {
    let mut merchants: Vec<MerchantTotal> = Vec::with_capacity(4);
    for line in lines {
        match merchants.iter_mut().find(|m| m.merchant_id == line.merchant_id) {
            Some(merchant) => {
                merchant.subtotal += line.subtotal;
                merchant.discount += line.discount;
                merchant.total += line.total;
            }
            None => merchants.push(MerchantTotal {
                merchant_id: line.merchant_id.clone(),
                subtotal: line.subtotal,
                discount: line.discount,
                total: line.total,
            }),
        }
    }
    merchants.sort_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
    merchants
}
