//! The JSON of the hottest answers, a transfer and a batch's results,
//! written by hand.
//!
//! serde_json spends most of its time per field rather than per byte (its
//! serializer state, a table lookup for every byte of every string to find
//! what needs escaping, an `io::Write` call per fragment): serializing batch
//! answers was 12% of the server's CPU under `loadtest --batch 1000`. Ids
//! and currency codes only ever hold characters JSON takes as they are
//! (checked when they are parsed), so here a string is checked in one pass
//! and copied; one that would need escaping goes through serde_json. The
//! output is byte for byte what serde_json makes of the same values: the
//! tests hold it to the `Serialize` definitions (`wire::TransferJson`, and
//! for a batch the one in the tests).

use peakstack_domain::ErrorCode;
use peakstack_engine::TransferResult;

use crate::error::ledger_detail;
use crate::wire::{BalancesJson, TransferJson};

/// Appends `t` as JSON.
pub fn transfer(out: &mut Vec<u8>, t: &TransferJson<'_>) {
    out.extend_from_slice(b"{\"id\":");
    string(out, t.id);
    out.extend_from_slice(b",\"debit_account_id\":");
    string(out, t.debit_account_id);
    out.extend_from_slice(b",\"credit_account_id\":");
    string(out, t.credit_account_id);
    out.extend_from_slice(b",\"amount\":");
    integer(out, t.amount);
    out.extend_from_slice(b",\"currency\":");
    string(out, t.currency);
    out.extend_from_slice(if t.pending { b",\"pending\":true" } else { b",\"pending\":false" });
    out.extend_from_slice(b",\"timeout_ms\":");
    integer(out, t.timeout_ms);
    out.extend_from_slice(b",\"expires_at_ms\":");
    optional(out, t.expires_at_ms, integer);
    out.extend_from_slice(b",\"status\":");
    string(out, t.status);
    out.extend_from_slice(b",\"pending_id\":");
    optional(out, t.pending_id, string);
    out.extend_from_slice(b",\"posted_amount\":");
    optional(out, t.posted_amount, integer);
    out.extend_from_slice(b",\"timestamp_ms\":");
    integer(out, t.timestamp_ms);
    if let Some(metadata) = t.metadata {
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(metadata.get().as_bytes());
    }
    if let Some(reference) = t.reference {
        out.extend_from_slice(b",\"reference\":");
        string(out, reference);
    }
    if let Some(pair) = &t.balances {
        out.extend_from_slice(b",\"balances\":{");
        let mut first = true;
        for (name, balances) in [("debit_account", &pair.debit_account), ("credit_account", &pair.credit_account)] {
            let Some(balances) = balances else { continue };
            if !first {
                out.push(b',');
            }
            first = false;
            string(out, name);
            out.push(b':');
            balances_object(out, balances);
        }
        out.push(b'}');
    }
    out.push(b'}');
}

/// Appends a batch's answer, `{"results": [...]}`, one item per result;
/// each `linked_event_failed` item names `cause_index`, if given.
pub fn batch_answer(out: &mut Vec<u8>, results: &[TransferResult], cause_index: Option<usize>) {
    out.extend_from_slice(b"{\"results\":[");
    for (index, result) in results.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"index\":");
        integer(out, index as u64);
        match result {
            Ok(outcome) => {
                out.extend_from_slice(if outcome.created {
                    b",\"status\":\"created\",\"transfer\":"
                } else {
                    b",\"status\":\"exists\",\"transfer\":"
                });
                transfer(out, &TransferJson::from_transfer(&outcome.transfer));
            }
            Err(code) => {
                out.extend_from_slice(b",\"status\":\"error\",\"code\":");
                string(out, code.as_str());
                out.extend_from_slice(b",\"detail\":");
                string(out, ledger_detail(*code));
                if let (ErrorCode::LinkedEventFailed, Some(cause)) = (code, cause_index) {
                    out.extend_from_slice(b",\"cause_index\":");
                    integer(out, cause as u64);
                }
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// Balances are strings of digits (see `wire::Decimal`).
fn balances_object(out: &mut Vec<u8>, b: &BalancesJson) {
    out.extend_from_slice(b"{\"debits_pending\":");
    decimal(out, false, b.debits_pending.0);
    out.extend_from_slice(b",\"debits_posted\":");
    decimal(out, false, b.debits_posted.0);
    out.extend_from_slice(b",\"credits_pending\":");
    decimal(out, false, b.credits_pending.0);
    out.extend_from_slice(b",\"credits_posted\":");
    decimal(out, false, b.credits_posted.0);
    out.extend_from_slice(b",\"balance\":");
    decimal(out, b.balance.0.is_negative(), b.balance.0.magnitude());
    out.push(b'}');
}

/// A JSON string of decimal digits, `-` first when `negative`.
fn decimal(out: &mut Vec<u8>, negative: bool, magnitude: u128) {
    out.extend_from_slice(if negative { b"\"-" } else { b"\"" });
    integer(out, magnitude);
    out.push(b'"');
}

fn integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn optional<T>(out: &mut Vec<u8>, value: Option<T>, write: fn(&mut Vec<u8>, T)) {
    match value {
        Some(value) => write(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string: copied between quotes when nothing in it needs escaping
/// (always so for ids, codes and currencies), else escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serializes into a Vec");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BalancesPair;
    use peakstack_domain::{Balances, Currency, ErrorCode, Id, Transfer, TransferKind, TransferStatus};
    use peakstack_engine::TransferOutcome;
    use proptest::prelude::*;
    use serde::Serialize;

    // The serde definition of a batch answer, which `batch_answer` writes.
    #[derive(Serialize, Debug)]
    struct BatchItem<'a> {
        index: usize,
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        transfer: Option<TransferJson<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cause_index: Option<usize>,
    }

    /// The answer to a batch: one item per transfer, serialized as it is
    /// made (no vector of items in between). The definition the answers
    /// `answer_json` writes by hand are tested against.
    struct BatchAnswer<'a> {
        results: &'a [TransferResult],
        cause_index: Option<usize>,
    }

    impl Serialize for BatchAnswer<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{SerializeSeq, SerializeStruct};
            struct Items<'a>(&'a [TransferResult], Option<usize>);
            impl Serialize for Items<'_> {
                fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                    let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
                    for (index, result) in self.0.iter().enumerate() {
                        seq.serialize_element(&BatchItem::of(index, result, self.1))?;
                    }
                    seq.end()
                }
            }
            let mut answer = serializer.serialize_struct("BatchAnswer", 1)?;
            answer.serialize_field("results", &Items(self.results, self.cause_index))?;
            answer.end()
        }
    }

    impl<'a> BatchItem<'a> {
        fn of(index: usize, result: &'a TransferResult, cause_index: Option<usize>) -> BatchItem<'a> {
            match result {
                Ok(outcome) => BatchItem {
                    index,
                    status: if outcome.created { "created" } else { "exists" },
                    transfer: Some(TransferJson::from_transfer(&outcome.transfer)),
                    code: None,
                    detail: None,
                    cause_index: None,
                },
                Err(code) => BatchItem {
                    index,
                    status: "error",
                    transfer: None,
                    code: Some(code.as_str()),
                    detail: Some(ledger_detail(*code)),
                    cause_index: cause_index.filter(|_| *code == ErrorCode::LinkedEventFailed),
                },
            }
        }
    }

    fn id(text: &str) -> Id {
        Id::parse(text).unwrap()
    }

    fn a_transfer() -> impl Strategy<Value = Transfer> {
        let kind = prop_oneof![
            Just(TransferKind::Single),
            (any::<u64>(), any::<u64>())
                .prop_map(|(timeout_ms, expires_at_ms)| TransferKind::Pending { timeout_ms, expires_at_ms }),
            (any::<Option<u64>>()).prop_map(|requested| TransferKind::Post { pending_id: id("p-1"), requested }),
            Just(TransferKind::Void { pending_id: id("hold.2:x") }),
            Just(TransferKind::Pending { timeout_ms: 5, expires_at_ms: 0 }),
        ];
        let status =
            prop_oneof![Just(TransferStatus::Posted), Just(TransferStatus::Pending), Just(TransferStatus::Voided)];
        (
            "[A-Za-z0-9_.:-]{1,64}",
            "[A-Za-z0-9_.:-]{1,64}",
            any::<u64>(),
            kind,
            status,
            any::<Option<u64>>(),
            any::<u64>(),
            a_details(),
        )
            .prop_map(|(debit, credit, amount, kind, status, posted_amount, timestamp_ms, details)| Transfer {
                id: id(&format!("t-{debit}")[..debit.len().min(62) + 2]),
                debit_account_id: id(&debit),
                credit_account_id: id(&credit),
                amount,
                currency: Currency::parse("EUR").unwrap(),
                kind,
                status,
                posted_amount,
                timestamp_ms,
                details,
            })
    }

    /// Details as the server keeps them: metadata as compact JSON, a
    /// reference that may need escaping.
    fn a_details() -> impl Strategy<Value = peakstack_domain::Details> {
        let metadata = proptest::option::of(prop_oneof![
            Just("{}".to_owned()),
            "[a-z\"\\\\é]{0,8}".prop_map(|v| serde_json::json!({"k": v, "n": [1, -2]}).to_string()),
        ]);
        let reference = proptest::option::of("[ -~é\"\\\\]{1,64}");
        (metadata, reference).prop_map(|(m, r)| {
            peakstack_domain::TransferDetails::of(m.map(String::into_boxed_str), r.map(String::into_boxed_str))
        })
    }

    fn some_balances() -> impl Strategy<Value = Option<Balances>> {
        let sum = prop_oneof![any::<u128>(), any::<u64>().prop_map(u128::from), Just(0), Just(u128::MAX)];
        proptest::option::of((sum.clone(), sum.clone(), sum.clone(), sum).prop_map(|(a, b, c, d)| Balances {
            debits_pending: a,
            debits_posted: b,
            credits_pending: c,
            credits_posted: d,
        }))
    }

    fn a_result() -> impl Strategy<Value = TransferResult> {
        prop_oneof![
            (a_transfer(), any::<bool>()).prop_map(|(transfer, created)| Ok(TransferOutcome {
                transfer,
                created,
                debit_balances: None,
                credit_balances: None
            })),
            prop_oneof![
                Just(ErrorCode::ExceedsCredits),
                Just(ErrorCode::AccountNotFound),
                Just(ErrorCode::ExistsWithDifferentFields),
                Just(ErrorCode::Overflow),
                Just(ErrorCode::LinkedEventFailed),
            ]
            .prop_map(Err),
        ]
    }

    proptest! {
        #[test]
        fn a_transfer_is_written_as_serde_json_writes_it(
            t in a_transfer(),
            debit in some_balances(),
            credit in some_balances(),
        ) {
            let mut json = TransferJson::from_transfer(&t);
            let mut out = Vec::new();
            transfer(&mut out, &json);
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&json).unwrap());
            json.balances = Some(BalancesPair {
                debit_account: debit.as_ref().map(BalancesJson::from),
                credit_account: credit.as_ref().map(BalancesJson::from),
            });
            let mut out = Vec::new();
            transfer(&mut out, &json);
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&json).unwrap());
        }

        #[test]
        fn a_batch_answer_is_written_as_serde_json_writes_it(
            results in proptest::collection::vec(a_result(), 0..20),
            cause_index in proptest::option::of(0usize..20),
        ) {
            let mut out = Vec::new();
            batch_answer(&mut out, &results, cause_index);
            let expected = serde_json::to_string(&BatchAnswer { results: &results, cause_index }).unwrap();
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn balances_are_strings_of_digits_exact_past_2_to_the_64() {
        let b = Balances { debits_pending: 0, debits_posted: u128::MAX, credits_pending: 1 << 64, credits_posted: 7 };
        let mut out = Vec::new();
        balances_object(&mut out, &BalancesJson::from(&b));
        let expected = format!(
            r#"{{"debits_pending":"0","debits_posted":"{max}","credits_pending":"18446744073709551616","credits_posted":"7","balance":"-{}"}}"#,
            u128::MAX - 7,
            max = u128::MAX
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(serde_json::to_string(&BalancesJson::from(&b)).unwrap(), expected);
    }

    #[test]
    fn a_string_that_needs_escaping_is_escaped() {
        for text in ["plain", "quote \" and \\ backslash", "line\nbreak \u{1}", "ünïcode ✓", ""] {
            let mut out = Vec::new();
            string(&mut out, text);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(text).unwrap());
        }
    }
}
