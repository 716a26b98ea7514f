//! Transfer ids repeated within one call, found before the call is routed.
//!
//! Two requests with one id in one call can never both be made. Left to the
//! executors, the later one would meet the earlier one's record, which is
//! reserved (`transfer_in_flight`, "retry shortly", forever) or made already
//! (`exists`, or `exists_with_different_fields`) depending on whether the
//! id's transfer crosses executors: the answer would depend on the layout.
//! Found here, it is `duplicate_id_in_batch` with any number of executors.

use peakstack_domain::{ErrorCode, TransferRequest};

use crate::protocol::TransferResult;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A request whose id an earlier request of the same call has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// The later request's position in the call.
    pub index: usize,
    /// The position of the first request with that id.
    pub first: usize,
}

/// Every request of `requests` whose id an earlier one has, in order.
pub fn duplicates(requests: &[TransferRequest]) -> Vec<Duplicate> {
    if requests.len() < 2 {
        return Vec::new();
    }
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity_and_hasher(requests.len(), Default::default());
    let mut found = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        if let Some(&first) = first_of.get(request.id().as_str()) {
            found.push(Duplicate { index, first });
        } else {
            first_of.insert(request.id().as_str(), index);
        }
    }
    found
}

/// The answers to an atomic call with duplicates: nothing of it is made;
/// each duplicate says why, every other request `linked_event_failed`.
pub fn refuse_atomic(count: usize, duplicates: &[Duplicate]) -> Vec<TransferResult> {
    let mut results = vec![Err(ErrorCode::LinkedEventFailed); count];
    for duplicate in duplicates {
        results[duplicate.index] = Err(ErrorCode::DuplicateIdInBatch);
    }
    results
}

/// A non-atomic call without its duplicates: the requests to make, and
/// the position in the call of each.
pub fn without(requests: Vec<TransferRequest>, duplicates: &[Duplicate]) -> (Vec<TransferRequest>, Vec<usize>) {
    let mut refused = duplicates.iter().map(|d| d.index).peekable();
    let mut kept = Vec::with_capacity(requests.len() - duplicates.len());
    let mut positions = Vec::with_capacity(kept.capacity());
    for (index, request) in requests.into_iter().enumerate() {
        if refused.peek() == Some(&index) {
            refused.next();
        } else {
            kept.push(request);
            positions.push(index);
        }
    }
    (kept, positions)
}

/// The answers to the whole call: those of the requests made, at their
/// positions, and `duplicate_id_in_batch` everywhere else.
pub fn merge(count: usize, positions: Vec<usize>, answers: Vec<TransferResult>) -> Vec<TransferResult> {
    let mut results = vec![Err(ErrorCode::DuplicateIdInBatch); count];
    for (index, answer) in positions.into_iter().zip(answers) {
        results[index] = answer;
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::{Amount, Currency, Id};

    fn create(id: &str) -> TransferRequest {
        TransferRequest::Create {
            id: Id::parse(id).unwrap(),
            debit_account_id: Id::parse("a").unwrap(),
            credit_account_id: Id::parse("b").unwrap(),
            amount: Amount::new(1).unwrap(),
            currency: Currency::parse("USD").unwrap(),
            pending: false,
            timeout_ms: 0,
            details: None,
        }
    }

    #[test]
    fn later_repeats_are_found_with_their_first() {
        let requests: Vec<TransferRequest> = ["x", "y", "x", "z", "y", "x"].into_iter().map(create).collect();
        let found = duplicates(&requests);
        let pairs: Vec<(usize, usize)> = found.iter().map(|d| (d.index, d.first)).collect();
        assert_eq!(pairs, [(2, 0), (4, 1), (5, 0)]);
        assert!(duplicates(&requests[..2]).is_empty());
        assert!(duplicates(&[]).is_empty());

        let (kept, positions) = without(requests, &found);
        assert_eq!(kept.iter().map(|r| r.id().as_str()).collect::<Vec<_>>(), ["x", "y", "z"]);
        assert_eq!(positions, [0, 1, 3]);
        let ok = |_| Err(ErrorCode::Overflow);
        let merged = merge(6, positions, (0..3).map(ok).collect());
        let codes: Vec<ErrorCode> = merged.into_iter().map(|r| r.unwrap_err()).collect();
        use ErrorCode::{DuplicateIdInBatch as D, Overflow as O};
        assert_eq!(codes, [O, O, D, O, D, D]);
        let atomic: Vec<ErrorCode> = refuse_atomic(6, &found).into_iter().map(|r| r.unwrap_err()).collect();
        use ErrorCode::LinkedEventFailed as L;
        assert_eq!(atomic, [L, L, D, L, D, D]);
    }
}
