//! The binary encoding of pricing commands (the engine's log).
//!
//! A command is a format version byte, a tag byte and its fields:
//! LEB128 varints for numbers (the shortest form only, so one value has
//! one encoding), ids and strings as a varint length and their bytes,
//! currencies as their three letters. Decoding trusts nothing: every
//! length is bounded, every id, currency and definition is checked again
//! by its constructor, trailing bytes are refused; bad bytes give a
//! [`DecodeError`], never a panic.

use std::collections::BTreeSet;
use std::fmt;

use peakstack_domain::{Currency, Id, MAX_ID_LEN};

use crate::catalogue::{
    CouponDiscount, CouponTemplate, CouponTemplateSpec, Promotion, PromotionKind, PromotionSpec, Scope, MAX_GROUP_LEN,
    MAX_SCOPE_SKUS,
};
use crate::state::Command;

/// The version of the command encoding, its first byte.
pub const COMMAND_FORMAT_VERSION: u8 = 1;

/// Why bytes do not decode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DecodeError {
    /// The bytes end before the value does.
    Truncated,
    /// Written by a newer (or unknown) version of this encoding.
    UnknownVersion(u8),
    /// Bytes left after the value.
    TrailingBytes,
    /// A field that is not valid: what it is.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated pricing record"),
            DecodeError::UnknownVersion(version) => {
                write!(f, "pricing record of unknown format version {version} (a newer peakstack wrote it?)")
            }
            DecodeError::TrailingBytes => f.write_str("bytes after the end of a pricing record"),
            DecodeError::Invalid(what) => write!(f, "corrupt pricing record: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub(crate) type Result<T> = std::result::Result<T, DecodeError>;

pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, value: u8) {
        self.out.push(value);
    }

    pub(crate) fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.out.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.out.push(value as u8);
    }

    pub(crate) fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    pub(crate) fn i32(&mut self, value: i32) {
        // Zigzag: small magnitudes of either sign stay short.
        self.varint(u64::from(((value << 1) ^ (value >> 31)) as u32));
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.varint(bytes.len() as u64);
        self.out.extend_from_slice(bytes);
    }

    pub(crate) fn id(&mut self, id: &Id) {
        self.bytes(id.as_str().as_bytes());
    }

    pub(crate) fn currency(&mut self, currency: Currency) {
        self.out.extend_from_slice(&currency.as_bytes());
    }

    pub(crate) fn option(&mut self, value: Option<u64>) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                self.varint(value);
            }
        }
    }

    pub(crate) fn scope(&mut self, scope: &Scope) {
        match scope {
            Scope::Everything => self.u8(0),
            Scope::Merchant(merchant) => {
                self.u8(1);
                self.id(merchant);
            }
            Scope::Skus(skus) => {
                self.u8(2);
                self.varint(skus.len() as u64);
                for sku in skus {
                    self.id(sku);
                }
            }
        }
    }

    pub(crate) fn promotion(&mut self, promotion: &Promotion) {
        self.id(&promotion.id);
        self.currency(promotion.currency);
        match promotion.kind {
            PromotionKind::PercentOff { percent } => {
                self.u8(0);
                self.u8(percent);
            }
            PromotionKind::AmountOff { amount } => {
                self.u8(1);
                self.varint(amount);
            }
            PromotionKind::SpendThreshold { threshold, off, stepwise } => {
                self.u8(2);
                self.varint(threshold);
                self.varint(off);
                self.bool(stepwise);
            }
            PromotionKind::BuyXGetY { buy, get } => {
                self.u8(3);
                self.varint(u64::from(buy));
                self.varint(u64::from(get));
            }
        }
        self.scope(&promotion.scope);
        self.varint(promotion.starts_at_ms);
        self.varint(promotion.ends_at_ms);
        match &promotion.group {
            None => self.u8(0),
            Some(group) => {
                self.u8(1);
                self.bytes(group.as_bytes());
            }
        }
        self.i32(promotion.priority);
        self.option(promotion.budget);
        self.option(promotion.usage_limit);
        self.option(promotion.per_buyer_limit);
    }

    pub(crate) fn template(&mut self, template: &CouponTemplate) {
        self.id(&template.id);
        self.currency(template.currency);
        match template.discount {
            CouponDiscount::PercentOff { percent } => {
                self.u8(0);
                self.u8(percent);
            }
            CouponDiscount::AmountOff { amount } => {
                self.u8(1);
                self.varint(amount);
            }
        }
        self.varint(template.min_spend);
        self.scope(&template.scope);
        self.varint(template.valid_from_ms);
        self.varint(template.valid_until_ms);
        self.varint(template.total_issue);
    }
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    pub(crate) fn finish(&self) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Invalid("varint past 64 bits"));
            }
            value |= bits << shift;
            if byte < 0x80 {
                // A final zero byte after others is a longer form of a shorter value.
                if byte == 0 && shift > 0 {
                    return Err(DecodeError::Invalid("varint not in its shortest form"));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid("varint too long"))
    }

    /// A count of items that each take at least one byte: bounded by
    /// `max` and by the bytes left, so a corrupt count allocates nothing.
    pub(crate) fn count(&mut self, max: usize) -> Result<usize> {
        let count = self.varint()?;
        if count > max as u64 || count > self.bytes.len() as u64 {
            return Err(DecodeError::Invalid("count out of bounds"));
        }
        Ok(count as usize)
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Invalid("u32 out of range"))
    }

    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("bool")),
        }
    }

    pub(crate) fn i32(&mut self) -> Result<i32> {
        let zigzag = self.u32()?;
        Ok(((zigzag >> 1) as i32) ^ -((zigzag & 1) as i32))
    }

    fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(DecodeError::Invalid("string too long"));
        }
        self.take(len as usize)
    }

    pub(crate) fn id(&mut self) -> Result<Id> {
        let bytes = self.bytes(MAX_ID_LEN)?;
        std::str::from_utf8(bytes).ok().and_then(Id::parse).ok_or(DecodeError::Invalid("id"))
    }

    pub(crate) fn currency(&mut self) -> Result<Currency> {
        let bytes = self.take(3)?;
        Currency::from_bytes([bytes[0], bytes[1], bytes[2]]).ok_or(DecodeError::Invalid("currency"))
    }

    pub(crate) fn option(&mut self) -> Result<Option<u64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.varint()?)),
            _ => Err(DecodeError::Invalid("option tag")),
        }
    }

    pub(crate) fn scope(&mut self) -> Result<Scope> {
        match self.u8()? {
            0 => Ok(Scope::Everything),
            1 => Ok(Scope::Merchant(self.id()?)),
            2 => {
                let count = self.count(MAX_SCOPE_SKUS)?;
                let mut skus = BTreeSet::new();
                let mut last: Option<Id> = None;
                for _ in 0..count {
                    let sku = self.id()?;
                    // Ascending and distinct, as written: one set, one encoding.
                    if last.as_ref().is_some_and(|last| *last >= sku) {
                        return Err(DecodeError::Invalid("scope SKUs out of order"));
                    }
                    last = Some(sku.clone());
                    skus.insert(sku);
                }
                Ok(Scope::Skus(skus))
            }
            _ => Err(DecodeError::Invalid("scope tag")),
        }
    }

    pub(crate) fn promotion(&mut self) -> Result<Promotion> {
        let id = self.id()?;
        let currency = self.currency()?;
        let kind = match self.u8()? {
            0 => PromotionKind::PercentOff { percent: self.u8()? },
            1 => PromotionKind::AmountOff { amount: self.varint()? },
            2 => {
                PromotionKind::SpendThreshold { threshold: self.varint()?, off: self.varint()?, stepwise: self.bool()? }
            }
            3 => PromotionKind::BuyXGetY { buy: self.u32()?, get: self.u32()? },
            _ => return Err(DecodeError::Invalid("promotion kind")),
        };
        let scope = self.scope()?;
        let starts_at_ms = self.varint()?;
        let ends_at_ms = self.varint()?;
        let group = match self.u8()? {
            0 => None,
            1 => {
                let bytes = self.bytes(MAX_GROUP_LEN)?;
                Some(std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid("group"))?.to_string())
            }
            _ => return Err(DecodeError::Invalid("group tag")),
        };
        let spec = PromotionSpec {
            id,
            currency,
            kind,
            scope,
            starts_at_ms,
            ends_at_ms,
            group,
            priority: self.i32()?,
            budget: self.option()?,
            usage_limit: self.option()?,
            per_buyer_limit: self.option()?,
        };
        Promotion::new(spec).map_err(|_| DecodeError::Invalid("promotion"))
    }

    pub(crate) fn template(&mut self) -> Result<CouponTemplate> {
        let id = self.id()?;
        let currency = self.currency()?;
        let discount = match self.u8()? {
            0 => CouponDiscount::PercentOff { percent: self.u8()? },
            1 => CouponDiscount::AmountOff { amount: self.varint()? },
            _ => return Err(DecodeError::Invalid("coupon discount")),
        };
        let spec = CouponTemplateSpec {
            id,
            currency,
            discount,
            min_spend: self.varint()?,
            scope: self.scope()?,
            valid_from_ms: self.varint()?,
            valid_until_ms: self.varint()?,
            total_issue: self.varint()?,
        };
        CouponTemplate::new(spec).map_err(|_| DecodeError::Invalid("coupon template"))
    }
}

mod tag {
    pub const CREATE_PROMOTION: u8 = 1;
    pub const CREATE_COUPON_TEMPLATE: u8 = 2;
    pub const ISSUE_COUPON: u8 = 3;
    pub const TRY_CONSUME: u8 = 4;
    pub const CONFIRM_CONSUME: u8 = 5;
    pub const CANCEL_CONSUME: u8 = 6;
    pub const LOCK_COUPON: u8 = 7;
    pub const USE_COUPON: u8 = 8;
    pub const RELEASE_COUPON: u8 = 9;
    pub const FORGET_CONSUME: u8 = 10;
    pub const FORGET_COUPON_FENCE: u8 = 11;
    pub const RESTORE: u8 = 12;
    pub const RETURN_COUPON: u8 = 13;
}

/// Appends the encoding of `command` to `out`.
pub fn encode_command(command: &Command, out: &mut Vec<u8>) {
    let mut w = Writer { out };
    w.u8(COMMAND_FORMAT_VERSION);
    match command {
        Command::CreatePromotion(promotion) => {
            w.u8(tag::CREATE_PROMOTION);
            w.promotion(promotion);
        }
        Command::CreateCouponTemplate(template) => {
            w.u8(tag::CREATE_COUPON_TEMPLATE);
            w.template(template);
        }
        Command::IssueCoupon { template_id, buyer_id, coupon_id } => {
            w.u8(tag::ISSUE_COUPON);
            w.id(template_id);
            w.id(buyer_id);
            w.id(coupon_id);
        }
        Command::TryConsume { txn, promotion_id, buyer_id, discount, deadline_ms } => {
            w.u8(tag::TRY_CONSUME);
            w.varint(*txn);
            w.id(promotion_id);
            w.id(buyer_id);
            w.varint(*discount);
            w.varint(*deadline_ms);
        }
        Command::LockCoupon { txn, coupon_id, buyer_id, deadline_ms } => {
            w.u8(tag::LOCK_COUPON);
            w.varint(*txn);
            w.id(coupon_id);
            w.id(buyer_id);
            w.varint(*deadline_ms);
        }
        Command::Restore { promotion_id, buyer_id, discount, uses } => {
            w.u8(tag::RESTORE);
            w.id(promotion_id);
            w.id(buyer_id);
            w.varint(*discount);
            w.varint(*uses);
        }
        Command::ReturnCoupon { txn, coupon_id } => {
            w.u8(tag::RETURN_COUPON);
            w.varint(*txn);
            w.id(coupon_id);
        }
        Command::ConfirmConsume { txn, promotion_id: id }
        | Command::CancelConsume { txn, promotion_id: id }
        | Command::ForgetConsume { txn, promotion_id: id }
        | Command::UseCoupon { txn, coupon_id: id }
        | Command::ReleaseCoupon { txn, coupon_id: id }
        | Command::ForgetCouponFence { txn, coupon_id: id } => {
            w.u8(match command {
                Command::ConfirmConsume { .. } => tag::CONFIRM_CONSUME,
                Command::CancelConsume { .. } => tag::CANCEL_CONSUME,
                Command::ForgetConsume { .. } => tag::FORGET_CONSUME,
                Command::UseCoupon { .. } => tag::USE_COUPON,
                Command::ReleaseCoupon { .. } => tag::RELEASE_COUPON,
                _ => tag::FORGET_COUPON_FENCE,
            });
            w.varint(*txn);
            w.id(id);
        }
    }
}

/// Decodes one command, all of `bytes`.
pub fn decode_command(bytes: &[u8]) -> Result<Command> {
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != COMMAND_FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let command = match r.u8()? {
        tag::CREATE_PROMOTION => Command::CreatePromotion(r.promotion()?),
        tag::CREATE_COUPON_TEMPLATE => Command::CreateCouponTemplate(r.template()?),
        tag::ISSUE_COUPON => Command::IssueCoupon { template_id: r.id()?, buyer_id: r.id()?, coupon_id: r.id()? },
        tag::TRY_CONSUME => Command::TryConsume {
            txn: r.varint()?,
            promotion_id: r.id()?,
            buyer_id: r.id()?,
            discount: r.varint()?,
            deadline_ms: r.varint()?,
        },
        tag::LOCK_COUPON => {
            Command::LockCoupon { txn: r.varint()?, coupon_id: r.id()?, buyer_id: r.id()?, deadline_ms: r.varint()? }
        }
        tag::CONFIRM_CONSUME => Command::ConfirmConsume { txn: r.varint()?, promotion_id: r.id()? },
        tag::CANCEL_CONSUME => Command::CancelConsume { txn: r.varint()?, promotion_id: r.id()? },
        tag::FORGET_CONSUME => Command::ForgetConsume { txn: r.varint()?, promotion_id: r.id()? },
        tag::USE_COUPON => Command::UseCoupon { txn: r.varint()?, coupon_id: r.id()? },
        tag::RELEASE_COUPON => Command::ReleaseCoupon { txn: r.varint()?, coupon_id: r.id()? },
        tag::FORGET_COUPON_FENCE => Command::ForgetCouponFence { txn: r.varint()?, coupon_id: r.id()? },
        tag::RESTORE => {
            Command::Restore { promotion_id: r.id()?, buyer_id: r.id()?, discount: r.varint()?, uses: r.varint()? }
        }
        tag::RETURN_COUPON => Command::ReturnCoupon { txn: r.varint()?, coupon_id: r.id()? },
        _ => return Err(DecodeError::Invalid("command tag")),
    };
    r.finish()?;
    Ok(command)
}
