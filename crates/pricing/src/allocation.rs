//! Sharing an amount out over lines: the largest-remainder method, integers only.
//!
//! Every line gets the floor of its exact proportional share; the units
//! left over go one each to the lines with the largest remainders (ties:
//! the earlier line). So the shares add up to the whole exactly, and, as
//! long as the whole is at most the sum of the weights, no share exceeds
//! its weight: a line is never discounted below zero.

/// Remainders kept on the stack below this many weights; more use the heap.
const INLINE_WEIGHTS: usize = 16;

/// `a * b / c` and `a * b % c`, in u64 when the product fits (the usual
/// case: u128 division is a library call, several times slower).
pub(crate) fn mul_div_rem(a: u64, b: u64, c: u64) -> (u64, u64) {
    debug_assert!(c > 0);
    match a.checked_mul(b) {
        Some(product) => (product / c, product % c),
        None => {
            let product = u128::from(a) * u128::from(b);
            let c = u128::from(c);
            // quotient <= a when b <= c, which every caller ensures; the
            // conversion asserts it.
            (u64::try_from(product / c).expect("share fits in u64"), (product % c) as u64)
        }
    }
}

/// Writes into `shares` the largest-remainder shares of `total` in
/// proportion to `weights` (same length).
///
/// Panics if `total` exceeds the sum of the weights (a share could then
/// exceed its line): callers cap the whole first, and a violation is a bug.
pub fn allocate(total: u64, weights: &[u64], shares: &mut [u64]) {
    assert_eq!(weights.len(), shares.len());
    let weight_sum: u64 = weights.iter().try_fold(0u64, |sum, &w| sum.checked_add(w)).expect("weights fit in u64");
    assert!(total <= weight_sum, "allocating {total} over weights summing to {weight_sum}");
    if total == 0 {
        shares.fill(0);
        return;
    }
    if weights.len() <= INLINE_WEIGHTS {
        let mut remainders = [(0u64, 0u32); INLINE_WEIGHTS];
        allocate_with(total, weight_sum, weights, shares, &mut remainders[..weights.len()]);
    } else {
        let mut remainders = vec![(0u64, 0u32); weights.len()];
        allocate_with(total, weight_sum, weights, shares, &mut remainders);
    }
}

fn allocate_with(total: u64, weight_sum: u64, weights: &[u64], shares: &mut [u64], remainders: &mut [(u64, u32)]) {
    let mut given = 0u64;
    for (index, (&weight, share)) in weights.iter().zip(shares.iter_mut()).enumerate() {
        // Out-of-scope lines weigh nothing: no division for them.
        let (floor, remainder) = if weight == 0 { (0, 0) } else { mul_div_rem(weight, total, weight_sum) };
        *share = floor;
        given += floor;
        remainders[index] = (remainder, index as u32);
    }
    // Fewer units are left than lines with a non-zero remainder (their
    // fractions sum to exactly `left`, each below one), so a line of weight
    // zero (remainder zero) never gets one.
    let left = (total - given) as usize;
    if left == 0 {
        return;
    }
    // Largest remainder first; ties to the earlier line.
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(remainder, index) in &remainders[..left] {
        debug_assert!(remainder > 0);
        shares[index as usize] += 1;
    }
    debug_assert_eq!(shares.iter().sum::<u64>(), total);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(total: u64, weights: &[u64], expected: &[u64]) {
        let mut shares = vec![0; weights.len()];
        allocate(total, weights, &mut shares);
        assert_eq!(shares, expected, "{total} over {weights:?}");
    }

    #[test]
    fn largest_remainder() {
        // 10.00 over three equal lines: 3.34 / 3.33 / 3.33.
        check(1000, &[500, 500, 500], &[334, 333, 333]);
        check(1000, &[1000, 1000, 1000], &[334, 333, 333]);
        check(2, &[1, 1, 1], &[1, 1, 0]);
        check(0, &[5, 7], &[0, 0]);
        check(12, &[5, 7], &[5, 7]);
        // 7 * 6/12 = 3.5, 5 * 6/12 = 2.5: the tie goes to the earlier line.
        check(6, &[7, 5], &[4, 2]);
        // Weight zero gets nothing, even with units left over.
        check(5, &[0, 3, 3, 0], &[0, 3, 2, 0]);
        // Remainders 1/3 and 2/3: the larger wins.
        check(1, &[1, 2], &[0, 1]);
        // Products past u64.
        check(u64::MAX / 2, &[u64::MAX / 2, u64::MAX / 2], &[u64::MAX / 4 + 1, u64::MAX / 4]);
        // More lines than fit on the stack.
        let weights = vec![1u64; 40];
        let mut expected = vec![0u64; 40];
        expected[..7].fill(1);
        check(7, &weights, &expected);
    }

    proptest! {
        #[test]
        fn shares_add_up_and_never_exceed_their_weight(
            weights in proptest::collection::vec(0u64..1_000_000_000_000, 1..40),
            fraction in 0u64..=1_000_000,
        ) {
            let sum: u64 = weights.iter().sum();
            let total = (u128::from(sum) * u128::from(fraction) / 1_000_000) as u64;
            let mut shares = vec![0; weights.len()];
            allocate(total, &weights, &mut shares);
            prop_assert_eq!(shares.iter().sum::<u64>(), total);
            for (share, weight) in shares.iter().zip(&weights) {
                prop_assert!(share <= weight);
                // Within one unit of the exact proportional share.
                let exact = u128::from(*weight) * u128::from(total);
                let low = exact / u128::from(sum.max(1));
                prop_assert!(u128::from(*share) == low || u128::from(*share) == low + 1);
            }
        }
    }
}
