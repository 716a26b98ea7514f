//! The audit log's records and filters: who (key id) changed what, when,
//! under which request id. Records are appended by [`crate::access_store`]
//! and never changed or deleted.
//!
//! Changes to keys are written with their record in one durable write.
//! Changes to money carry their origin into the engine's log, so the record
//! is durable with the change itself; the engine's audit feed then brings
//! one record per transfer made into the store, after the answer, and again
//! after a crash until stored (see `Engine::take_audit_feed`).

use peakstack_domain::{Currency, TransferKind};

use crate::admin::rfc3339;
use crate::keys::KeyRecord;
use peakstack_engine::AuditEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What kind of change a record is about.
pub mod action {
    pub const ACCOUNT_CREATE: &str = "account.create";
    pub const ACCOUNT_FREEZE: &str = "account.freeze";
    pub const ACCOUNT_UNFREEZE: &str = "account.unfreeze";
    pub const ACCOUNT_CLOSE: &str = "account.close";
    pub const TRANSFER_CREATE: &str = "transfer.create";
    pub const TRANSFER_POST: &str = "transfer.post";
    pub const TRANSFER_VOID: &str = "transfer.void";
    pub const KEY_CREATE: &str = "key.create";
    pub const KEY_REVOKE: &str = "key.revoke";
    pub const SKU_CREATE: &str = "sku.create";
    pub const SKU_RESTOCK: &str = "sku.restock";
    pub const FLASH_SALE_CREATE: &str = "flash_sale.create";
    pub const PROMOTION_CREATE: &str = "promotion.create";
    pub const COUPON_TEMPLATE_CREATE: &str = "coupon_template.create";
    pub const PAYMENT_CAPTURE: &str = "payment.capture";
    pub const PAYMENT_CANCEL: &str = "payment.cancel";
    pub const ORDER_CANCEL: &str = "order.cancel";
    pub const REFUND_CREATE: &str = "refund.create";
    pub const SETTLEMENT_CREATE: &str = "settlement.create";
    pub const DEAD_LETTER_REPLAY: &str = "dead_letter.replay";
    pub const ALL: &[&str] = &[
        ACCOUNT_CREATE,
        TRANSFER_CREATE,
        TRANSFER_POST,
        TRANSFER_VOID,
        KEY_CREATE,
        KEY_REVOKE,
        ACCOUNT_FREEZE,
        ACCOUNT_UNFREEZE,
        ACCOUNT_CLOSE,
        SKU_CREATE,
        SKU_RESTOCK,
        FLASH_SALE_CREATE,
        PROMOTION_CREATE,
        COUPON_TEMPLATE_CREATE,
        PAYMENT_CAPTURE,
        PAYMENT_CANCEL,
        ORDER_CANCEL,
        REFUND_CREATE,
        SETTLEMENT_CREATE,
        DEAD_LETTER_REPLAY,
    ];
}

/// One change. `seq` is assigned when the record is appended: 1, 2, 3...
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: u64,
    pub key_id: String,
    pub request_id: String,
    pub action: String,
    /// The id of the object changed (account, transfer, key; a batch's
    /// first transfer).
    pub target: String,
    pub details: Value,
}

impl AuditRecord {
    pub fn new(key_id: &str, request_id: &str, action: &str, target: &str, details: Value, at_ms: u64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            at_ms,
            key_id: key_id.to_owned(),
            request_id: request_id.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            details,
        }
    }
}

/// The record of a key just made, by `actor` (a key id, or `cli`).
pub fn key_created(actor: &str, request_id: &str, key: &KeyRecord) -> AuditRecord {
    let details = serde_json::json!({"scope": key.scope, "expires_at": key.expires_at_ms.map(rfc3339)});
    AuditRecord::new(actor, request_id, action::KEY_CREATE, &key.id, details, key.created_at_ms)
}

/// The record of a key just revoked, by `actor` (a key id, or `cli`).
pub fn key_revoked(actor: &str, request_id: &str, key: &KeyRecord) -> AuditRecord {
    let at_ms = key.revoked_at_ms.unwrap_or(key.created_at_ms);
    AuditRecord::new(actor, request_id, action::KEY_REVOKE, &key.id, Value::Null, at_ms)
}

/// What an audit record keeps of a transfer, whether it comes from an
/// engine event or from a stored row.
pub struct TransferFacts<'a> {
    pub debit: &'a str,
    pub credit: &'a str,
    pub amount: u64,
    pub currency: Currency,
    pub kind: TransferFactsKind,
}

pub enum TransferFactsKind {
    Single,
    Pending { timeout_ms: u64 },
    Post { pending_id: String },
    Void { pending_id: String },
}

/// The action and the `details` of a transfer's audit record.
pub fn transfer_details(facts: &TransferFacts) -> (&'static str, Value) {
    let mut details = serde_json::json!({
        "debit_account_id": facts.debit,
        "credit_account_id": facts.credit,
        "amount": facts.amount,
        "currency": facts.currency.as_str(),
    });
    let action = match &facts.kind {
        TransferFactsKind::Single => action::TRANSFER_CREATE,
        TransferFactsKind::Pending { timeout_ms } => {
            details["pending"] = Value::Bool(true);
            details["timeout_ms"] = Value::from(*timeout_ms);
            action::TRANSFER_CREATE
        }
        TransferFactsKind::Post { pending_id } => {
            details["pending_id"] = Value::from(pending_id.as_str());
            action::TRANSFER_POST
        }
        TransferFactsKind::Void { pending_id } => {
            details["pending_id"] = Value::from(pending_id.as_str());
            action::TRANSFER_VOID
        }
    };
    (action, details)
}

/// The record of a transfer the engine made for a request with an origin
/// (as the audit feed stores it: see [`crate::audit_rows`]).
pub fn transfer_record(event: &AuditEvent) -> AuditRecord {
    let transfer = &event.transfer;
    let kind = match &transfer.kind {
        TransferKind::Single => TransferFactsKind::Single,
        TransferKind::Pending { timeout_ms, .. } => TransferFactsKind::Pending { timeout_ms: *timeout_ms },
        TransferKind::Post { pending_id, .. } => TransferFactsKind::Post { pending_id: pending_id.to_string() },
        TransferKind::Void { pending_id } => TransferFactsKind::Void { pending_id: pending_id.to_string() },
    };
    let facts = TransferFacts {
        debit: transfer.debit_account_id.as_str(),
        credit: transfer.credit_account_id.as_str(),
        amount: transfer.amount,
        currency: transfer.currency,
        kind,
    };
    let (action, details) = transfer_details(&facts);
    AuditRecord::new(
        &event.origin.key_id,
        &event.origin.request_id,
        action,
        transfer.id.as_str(),
        details,
        event.time_ms,
    )
}

/// Which records a query wants; every field set must match.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub key_id: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub request_id: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl AuditFilter {
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let same = |wanted: &Option<String>, have: &str| wanted.as_deref().is_none_or(|w| w == have);
        same(&self.key_id, &record.key_id)
            && same(&self.action, &record.action)
            && same(&self.target, &record.target)
            && same(&self.request_id, &record.request_id)
            && self.since_ms.is_none_or(|since| record.at_ms >= since)
            && self.until_ms.is_none_or(|until| record.at_ms < until)
    }
}

/// A page of records.
#[derive(Debug)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// Where the next page starts (a seq), if the scan stopped early.
    pub next: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_match_every_field_they_name() {
        let record = AuditRecord {
            seq: 7,
            at_ms: 1_000,
            key_id: "k1".into(),
            request_id: "r1".into(),
            action: action::TRANSFER_CREATE.into(),
            target: "t1".into(),
            details: json!({"amount": 5}),
        };
        let check = |filter: AuditFilter, expected: bool| assert_eq!(filter.matches(&record), expected, "{filter:?}");
        check(AuditFilter::default(), true);
        check(AuditFilter { key_id: Some("k1".into()), ..Default::default() }, true);
        check(AuditFilter { key_id: Some("k2".into()), ..Default::default() }, false);
        check(AuditFilter { target: Some("t1".into()), ..Default::default() }, true);
        check(AuditFilter { target: Some("t2".into()), ..Default::default() }, false);
        check(AuditFilter { action: Some("key.create".into()), ..Default::default() }, false);
        check(AuditFilter { since_ms: Some(1_000), until_ms: Some(1_001), ..Default::default() }, true);
        check(AuditFilter { until_ms: Some(1_000), ..Default::default() }, false);
        check(AuditFilter { request_id: Some("r1".into()), key_id: Some("k2".into()), ..Default::default() }, false);
    }
}
