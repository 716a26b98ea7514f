//! The JSON the API speaks: request bodies with their validation into
//! domain requests, and the answers built from domain records. Only this
//! module knows field names.

use peakstack_domain::{
    Account, AccountFlags, Amount, Balances, Currency, Details, Id, Net, NewAccount, Owner, Transfer, TransferDetails,
    TransferKind, TransferRequest, MAX_REFERENCE_LEN, MAX_TRANSFER_AMOUNT,
};
use peakstack_engine::TransferOutcome;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Largest account metadata, serialized as compact JSON.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Most flags an account request may list (there are two flags).
const MAX_FLAGS: usize = 8;

const ID_RULE: &str = "must be 1-64 characters of [A-Za-z0-9_.:~-] with at most one ~, not at either end";

pub fn parse_id(field: &str, text: &str) -> Result<Id, String> {
    Id::parse(text).ok_or_else(|| format!("{field}: {text:?} is not a valid id: it {ID_RULE}"))
}

/// An id a client may name as the subject of a write (not reserved).
pub(crate) fn parse_client_id(field: &str, text: &str) -> Result<Id, String> {
    let id = parse_id(field, text)?;
    if id.is_reserved() {
        return Err(format!("{field}: ids starting with '_' are reserved for system accounts"));
    }
    Ok(id)
}

pub(crate) fn parse_currency(text: &str) -> Result<Currency, String> {
    Currency::parse(text).ok_or_else(|| {
        format!("currency: {text:?} is not an ISO 4217 code this ledger moves (three upper-case letters, e.g. \"USD\")")
    })
}

pub(crate) fn parse_amount(field: &str, minor_units: u64) -> Result<Amount, String> {
    Amount::new(minor_units).ok_or_else(|| {
        format!("{field}: must be an integer from 1 to 2^53-1 ({MAX_TRANSFER_AMOUNT}), got {minor_units}")
    })
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    pub id: String,
    pub currency: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub overdraft_limit: u64,
    #[serde(default)]
    pub metadata: Option<Value>,
    /// `merchant:<id>` or `buyer:<id>`; none for a platform account.
    #[serde(default)]
    pub owner: Option<String>,
}

impl AccountBody {
    pub fn into_new_account(self) -> Result<NewAccount, String> {
        let id = parse_id("id", &self.id)?;
        let currency = parse_currency(&self.currency)?;
        if self.flags.len() > MAX_FLAGS {
            return Err(format!("flags: at most {MAX_FLAGS} entries"));
        }
        let mut flags = AccountFlags::empty();
        for name in &self.flags {
            let flag = AccountFlags::from_name(name).ok_or_else(|| {
                format!("flags: unknown flag {name:?}; known flags are \"debits_must_not_exceed_credits\" and \"credits_must_not_exceed_debits\"")
            })?;
            flags.insert(flag);
        }
        let metadata = parse_metadata(self.metadata)?;
        let owner = self
            .owner
            .map(|text| {
                Owner::parse(&text).ok_or_else(|| {
                    format!("owner: {text:?} is not an owner; use \"merchant:<id>\" or \"buyer:<id>\" (id: {ID_RULE})")
                })
            })
            .transpose()?;
        let new = NewAccount { id, currency, flags, overdraft_limit: self.overdraft_limit, metadata, owner };
        new.validate().map_err(str::to_owned)?;
        Ok(new)
    }
}

/// Metadata as kept: a JSON object as compact text, at most
/// [`MAX_METADATA_BYTES`]; null is none.
fn parse_metadata(metadata: Option<Value>) -> Result<Option<Box<str>>, String> {
    match metadata {
        None | Some(Value::Null) => Ok(None),
        Some(value @ Value::Object(_)) => {
            // serde_json's map is sorted by key, so the same object always
            // serializes to the same text and retries compare equal.
            let text = serde_json::to_string(&value).map_err(|e| format!("metadata: {e}"))?;
            if text.len() > MAX_METADATA_BYTES {
                return Err(format!("metadata: {} bytes serialized, at most {MAX_METADATA_BYTES} allowed", text.len()));
            }
            Ok(Some(text.into_boxed_str()))
        }
        Some(_) => Err("metadata: must be a JSON object".to_owned()),
    }
}

/// A transfer's metadata and reference (1-64 bytes, no control characters).
fn parse_details(metadata: Option<Value>, reference: Option<&str>) -> Result<Details, String> {
    let metadata = parse_metadata(metadata)?;
    let reference = match reference {
        None => None,
        Some(text) if text.is_empty() || text.len() > MAX_REFERENCE_LEN || text.chars().any(char::is_control) => {
            return Err(format!("reference: must be 1-{MAX_REFERENCE_LEN} bytes of UTF-8 without control characters"));
        }
        Some(text) => Some(Box::from(text)),
    };
    Ok(TransferDetails::of(metadata, reference))
}

/// A transfer as a client sends it. `S` is `String`, or `&str` to borrow
/// the strings from a body that has no escapes in them (no copies).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TransferBody<S = String> {
    pub id: S,
    pub debit_account_id: S,
    pub credit_account_id: S,
    pub amount: u64,
    pub currency: S,
    #[serde(default)]
    pub pending: bool,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub reference: Option<S>,
}

impl<S: AsRef<str>> TransferBody<S> {
    pub fn into_request(self) -> Result<TransferRequest, String> {
        let id = parse_client_id("id", self.id.as_ref())?;
        let debit_account_id = parse_client_id("debit_account_id", self.debit_account_id.as_ref())?;
        let credit_account_id = parse_client_id("credit_account_id", self.credit_account_id.as_ref())?;
        let amount = parse_amount("amount", self.amount)?;
        let currency = parse_currency(self.currency.as_ref())?;
        if self.timeout_ms > 0 && !self.pending {
            return Err("timeout_ms: only allowed with \"pending\": true".to_owned());
        }
        if self.timeout_ms > MAX_TRANSFER_AMOUNT {
            return Err(format!("timeout_ms: at most 2^53-1 ({MAX_TRANSFER_AMOUNT})"));
        }
        Ok(TransferRequest::Create {
            id,
            debit_account_id,
            credit_account_id,
            amount,
            currency,
            pending: self.pending,
            timeout_ms: self.timeout_ms,
            details: parse_details(self.metadata, self.reference.as_ref().map(AsRef::as_ref))?,
        })
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PostBody {
    pub id: String,
    #[serde(default)]
    pub amount: Option<u64>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub reference: Option<String>,
}

impl PostBody {
    pub fn into_request(self, pending_id: Id) -> Result<TransferRequest, String> {
        let id = parse_client_id("id", &self.id)?;
        let amount = self.amount.map(|a| parse_amount("amount", a)).transpose()?;
        let details = parse_details(self.metadata, self.reference.as_deref())?;
        Ok(TransferRequest::Post { id, pending_id, amount, details })
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct VoidBody {
    pub id: String,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub reference: Option<String>,
}

impl VoidBody {
    pub fn into_request(self, pending_id: Id) -> Result<TransferRequest, String> {
        let id = parse_client_id("id", &self.id)?;
        let details = parse_details(self.metadata, self.reference.as_deref())?;
        Ok(TransferRequest::Void { id, pending_id, details })
    }
}

/// A batch keeps its transfers as raw JSON text (no intermediate tree) so
/// that each is parsed once, straight into a [`TransferBody`], and a bad one
/// is reported with its index. `R` is boxed, or `&RawValue` to borrow from
/// the body.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<R = Box<serde_json::value::RawValue>> {
    pub transfers: Vec<R>,
    #[serde(default)]
    pub atomic: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<String>,
    pub after: Option<String>,
}

/// A balance in the JSON: a string of decimal digits (`"-"` first when
/// negative). Balances are u128 and pass 2^53, past which a JSON number
/// loses precision in JavaScript and in every client that reads numbers as
/// doubles. Amounts, at most 2^53-1, stay numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal<T>(pub T);

impl<T: std::fmt::Display> Serialize for Decimal<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

#[derive(Serialize, Debug)]
pub struct AccountJson {
    pub id: String,
    pub currency: String,
    pub flags: Vec<&'static str>,
    /// open, frozen or closed.
    pub status: &'static str,
    pub overdraft_limit: u64,
    pub metadata: Option<Value>,
    pub owner: Option<String>,
    pub debits_pending: Decimal<u128>,
    pub debits_posted: Decimal<u128>,
    pub credits_pending: Decimal<u128>,
    pub credits_posted: Decimal<u128>,
    pub balance: Decimal<Net>,
    pub available: Option<Decimal<u128>>,
    pub system: bool,
    pub created_at_ms: u64,
}

impl AccountJson {
    pub fn from_account(account: &Account) -> AccountJson {
        let b = &account.balances;
        AccountJson {
            id: account.id.to_string(),
            currency: account.currency.to_string(),
            flags: account.flags.names(),
            status: account.status().as_str(),
            overdraft_limit: account.overdraft_limit,
            metadata: account.metadata.as_deref().and_then(|text| serde_json::from_str(text).ok()),
            owner: account.owner.as_ref().map(ToString::to_string),
            debits_pending: Decimal(b.debits_pending),
            debits_posted: Decimal(b.debits_posted),
            credits_pending: Decimal(b.credits_pending),
            credits_posted: Decimal(b.credits_posted),
            balance: Decimal(b.balance()),
            available: account.available().map(Decimal),
            system: account.system,
            created_at_ms: account.created_at_ms,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct BalancesJson {
    pub debits_pending: Decimal<u128>,
    pub debits_posted: Decimal<u128>,
    pub credits_pending: Decimal<u128>,
    pub credits_posted: Decimal<u128>,
    pub balance: Decimal<Net>,
}

impl From<&Balances> for BalancesJson {
    fn from(b: &Balances) -> BalancesJson {
        BalancesJson {
            debits_pending: Decimal(b.debits_pending),
            debits_posted: Decimal(b.debits_posted),
            credits_pending: Decimal(b.credits_pending),
            credits_posted: Decimal(b.credits_posted),
            balance: Decimal(b.balance()),
        }
    }
}

#[derive(Serialize, Debug)]
pub struct BalancesPair {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debit_account: Option<BalancesJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credit_account: Option<BalancesJson>,
}

/// A transfer as answered. Borrows from the record: an answer is
/// serialized straight from it, with no string copied on the way.
#[derive(Serialize, Debug)]
pub struct TransferJson<'a> {
    pub id: &'a str,
    pub debit_account_id: &'a str,
    pub credit_account_id: &'a str,
    pub amount: u64,
    pub currency: &'a str,
    pub pending: bool,
    pub timeout_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub status: &'static str,
    pub pending_id: Option<&'a str>,
    pub posted_amount: Option<u64>,
    pub timestamp_ms: u64,
    /// Left out when absent, so that answers without them are as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balances: Option<BalancesPair>,
}

impl<'a> TransferJson<'a> {
    pub fn from_transfer(t: &'a Transfer) -> TransferJson<'a> {
        let (pending, timeout_ms, expires_at_ms) = match t.kind {
            TransferKind::Pending { timeout_ms, expires_at_ms } => {
                (true, timeout_ms, (expires_at_ms > 0).then_some(expires_at_ms))
            }
            _ => (false, 0, None),
        };
        TransferJson {
            id: t.id.as_str(),
            debit_account_id: t.debit_account_id.as_str(),
            credit_account_id: t.credit_account_id.as_str(),
            amount: t.amount,
            currency: t.currency.as_str(),
            pending,
            timeout_ms,
            expires_at_ms,
            status: t.status.as_str(),
            pending_id: t.pending_id().map(Id::as_str),
            posted_amount: t.posted_amount,
            timestamp_ms: t.timestamp_ms,
            // Kept as the compact text of an object, checked when it came in.
            metadata: t.details.as_ref().and_then(|d| d.metadata.as_deref()).and_then(|m| serde_json::from_str(m).ok()),
            reference: t.details.as_ref().and_then(|d| d.reference.as_deref()),
            balances: None,
        }
    }

    /// The answer to a create: the record, plus the balances right after it
    /// when this request created it.
    pub fn from_outcome(outcome: &'a TransferOutcome) -> TransferJson<'a> {
        let mut json = TransferJson::from_transfer(&outcome.transfer);
        if outcome.debit_balances.is_some() || outcome.credit_balances.is_some() {
            json.balances = Some(BalancesPair {
                debit_account: outcome.debit_balances.as_ref().map(BalancesJson::from),
                credit_account: outcome.credit_balances.as_ref().map(BalancesJson::from),
            });
        }
        json
    }
}

#[derive(Serialize, Debug)]
pub struct Page<T: Serialize> {
    pub data: Vec<T>,
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(json: Value) -> Result<TransferRequest, String> {
        serde_json::from_value::<TransferBody>(json).map_err(|e| e.to_string())?.into_request()
    }

    #[test]
    fn transfer_validation() {
        let ok = serde_json::json!({"id": "t1", "debit_account_id": "a", "credit_account_id": "b", "amount": 5, "currency": "USD"});
        assert!(transfer(ok.clone()).is_ok());
        let cases: [(&str, Value, &str); 8] = [
            ("amount", serde_json::json!(0), "amount"),
            ("amount", serde_json::json!(MAX_TRANSFER_AMOUNT + 1), "amount"),
            ("amount", serde_json::json!(1.5), "floating point"),
            ("amount", serde_json::json!(-3), "invalid value"),
            ("currency", serde_json::json!("usd"), "currency"),
            ("id", serde_json::json!("has space"), "id"),
            ("debit_account_id", serde_json::json!("_clearing.0.USD"), "reserved"),
            ("timeout_ms", serde_json::json!(5), "timeout_ms"),
        ];
        for (field, value, needle) in cases {
            let mut body = ok.clone();
            body[field] = value;
            let error = transfer(body).unwrap_err();
            assert!(error.contains(needle), "{field}: {error}");
        }
    }
}
