//! Client-chosen identifiers and the documented shard hash.

use std::fmt;

use smol_str::SmolStr;

/// Longest id a client may choose.
pub const MAX_ID_LEN: usize = 64;
/// Longest id held inline, without a heap allocation (see [`Id`]).
pub const INLINE_ID_LEN: usize = 23;

/// An account or transfer id: 1-64 characters of `[A-Za-z0-9_.:~-]`, with
/// at most one `~`, between a tenant namespace and the rest (see [`Id::namespace`]).
///
/// Ids starting with `_` are reserved for accounts the system creates
/// (clearing accounts); clients may read them but not create them.
///
/// Held inline up to [`INLINE_ID_LEN`] bytes (most ids), else in a shared heap string: a
/// clone is a copy or a refcount, never an allocation, and hashing or
/// comparing a short id reads no memory outside the id itself. The apply
/// loop touches several ids per transfer, so this is worth it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(SmolStr);

impl Id {
    pub fn parse(text: &str) -> Option<Id> {
        let valid = !text.is_empty()
            && text.len() <= MAX_ID_LEN
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-' | b'~'))
            && Self::namespace_of(text).is_none_or(|(prefix, rest)| !prefix.is_empty() && !rest.is_empty());
        valid.then(|| Id(SmolStr::new(text)))
    }

    /// An id without a namespace separator: what a merchant or buyer id
    /// is, so that `<owner>~` is never a prefix of another owner's namespace.
    pub fn parse_plain(text: &str) -> Option<Id> {
        Id::parse(text).filter(|id| !id.0.contains('~'))
    }

    /// The tenant namespace an id lies in: what comes before its one `~`
    /// (`merchant:m1~order-7` lies in `merchant:m1`). `~` is in no owner,
    /// so the namespace is unambiguous; an id has at most one.
    pub fn namespace(&self) -> Option<&str> {
        Self::namespace_of(&self.0).map(|(prefix, _)| prefix)
    }

    fn namespace_of(text: &str) -> Option<(&str, &str)> {
        let (prefix, rest) = text.split_once('~')?;
        // A second '~' makes no namespace; `parse` refuses it (empty part).
        if rest.contains('~') {
            return Some(("", ""));
        }
        Some((prefix, rest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reserved for system accounts (clearing accounts).
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('_')
    }

    /// The logical shard this id lives on. See [`shard_of`].
    pub fn shard(&self, shard_count: u32) -> u32 {
        shard_of(self.as_str(), shard_count)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kinds of ids the system assigns. Each carries its owner's shard in a
/// fixed place, `<kind>_<shard>_<sequence>` (`rsv_12_40961`), as Alipay's
/// ids carry two digits of the user id: any of them routes to its shard
/// without a lookup, and the sequence (per executor) makes it unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignedKind {
    Reservation,
    Coupon,
    /// A global transaction across executors: `txn_<executor>_<counter>`,
    /// its coordinator's executor id in the shard's place (executor `e`
    /// owns shard `e`, so it routes as any assigned id).
    Transaction,
    /// A checkout (one cart, one payment), on the shard of its paying account.
    Checkout,
    /// One merchant's order of a checkout, on its checkout's shard.
    Order,
    /// A checkout's payment, on its checkout's shard.
    Payment,
    /// A refund of an order, on its order's shard.
    Refund,
    /// A settlement of a merchant's captured payments, on the shard of
    /// the checkouts it settles (a shard of their home executor).
    Settlement,
}

impl AssignedKind {
    pub fn prefix(self) -> &'static str {
        match self {
            AssignedKind::Reservation => "rsv",
            AssignedKind::Coupon => "cpn",
            AssignedKind::Transaction => "txn",
            AssignedKind::Checkout => "chk",
            AssignedKind::Order => "ord",
            AssignedKind::Payment => "pay",
            AssignedKind::Refund => "rfd",
            AssignedKind::Settlement => "stl",
        }
    }

    /// The id of the `sequence`-th object of this kind on `shard`. Short
    /// enough to stay inline (see [`Id`]) for any shard and sequence below 2^40.
    pub fn id(self, shard: u32, sequence: u64) -> Id {
        use std::fmt::Write;
        let mut text = smol_str::SmolStrBuilder::new();
        write!(text, "{}_{shard}_{sequence}", self.prefix()).expect("writes to memory");
        Id(text.finish())
    }

    /// The shard an id of this kind names, or `None` when it is not one
    /// (then it names nothing the system assigned: a lookup answers not found).
    pub fn shard_of(self, id: &str) -> Option<u32> {
        self.parse(id).map(|(shard, _)| shard)
    }

    /// The shard and sequence an id of this kind names.
    pub fn parse(self, id: &str) -> Option<(u32, u64)> {
        let rest = id.strip_prefix(self.prefix())?.strip_prefix('_')?;
        let (shard, sequence) = rest.split_once('_')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(shard) || !digits(sequence) {
            return None;
        }
        Some((shard.parse().ok()?, sequence.parse().ok()?))
    }
}

/// The shard an id the system assigned names, whatever its kind.
pub fn assigned_shard(id: &str) -> Option<u32> {
    [
        AssignedKind::Reservation,
        AssignedKind::Coupon,
        AssignedKind::Checkout,
        AssignedKind::Order,
        AssignedKind::Payment,
        AssignedKind::Refund,
        AssignedKind::Settlement,
    ]
    .into_iter()
    .find_map(|kind| kind.shard_of(id))
}

/// The documented shard hash: `fnv1a64(utf8 bytes of the id) % shard_count`.
///
/// FNV-1a (64-bit, offset basis 0xcbf29ce484222325, prime 0x100000001b3) is
/// stable across versions and platforms and trivial to reimplement in any
/// client that wants to route by itself. It must never change for a data dir.
pub fn shard_of(id: &str, shard_count: u32) -> u32 {
    debug_assert!(shard_count > 0);
    (fnv1a64(id.as_bytes()) % u64::from(shard_count)) as u32
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let long = "a".repeat(MAX_ID_LEN);
        let too_long = "a".repeat(MAX_ID_LEN + 1);
        for (input, ok) in [
            ("alice", true),
            ("merchant:42.wallet_USD-1", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("has space", false),
            ("slash/no", false),
            ("ünicode", false),
            ("merchant:m1~order-7", true),
            ("~x", false),
            ("x~", false),
            ("a~b~c", false),
        ] {
            assert_eq!(Id::parse(input).is_some(), ok, "{input:?}");
        }
        assert_eq!(Id::parse("merchant:m1.x~o:1").unwrap().namespace(), Some("merchant:m1.x"));
        assert_eq!(Id::parse("merchant:m1").unwrap().namespace(), None);
        assert!(Id::parse("_clearing").unwrap().is_reserved());
    }

    #[test]
    fn assigned_ids_name_their_shard() {
        let id = AssignedKind::Reservation.id(12, 40961);
        assert_eq!(id.as_str(), "rsv_12_40961");
        assert_eq!(AssignedKind::Reservation.shard_of(id.as_str()), Some(12));
        assert!(!AssignedKind::Reservation.id(4095, (1 << 40) - 1).0.is_heap_allocated());
        for text in ["rsv_12", "rsv__1", "rsv_1_", "rsv_a_1", "ord_1_1", "rsv_1_2_3", "rsv_99999999999_1"] {
            assert_eq!(AssignedKind::Reservation.shard_of(text), None, "{text}");
        }
    }

    #[test]
    fn ids_up_to_the_inline_length_are_not_on_the_heap() {
        let inline = Id::parse(&"a".repeat(INLINE_ID_LEN)).unwrap();
        let heap = Id::parse(&"a".repeat(INLINE_ID_LEN + 1)).unwrap();
        assert!(!inline.0.is_heap_allocated());
        assert!(heap.0.is_heap_allocated());
    }

    #[test]
    fn shard_hash_is_the_documented_fnv1a() {
        // Reference values of FNV-1a 64 (from the FNV test suite).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(shard_of("foobar", 64), (0x85944171f73967e8u64 % 64) as u32);
    }
}
