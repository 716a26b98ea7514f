//! API keys: how they look, how they are made, and the in-memory ring the
//! server checks every request against.
//!
//! A key is `psk_<id>_<secret>`: `id` is 16 hex digits (64 random bits) that
//! name the key in lists and in the audit log, `secret` is 64 hex digits
//! (256 random bits). Only the SHA-256 of the secret is stored; a secret of
//! 256 random bits needs no slow password hash, as nothing short of the
//! secret itself opens it. The check compares hashes in constant time, and
//! hashes a dummy for unknown ids, so timing tells nothing about a secret.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::access::Scope;

pub const KEY_PREFIX: &str = "psk_";
const ID_HEX_LEN: usize = 16;
const SECRET_HEX_LEN: usize = 64;
/// Longest note kept with a key.
pub const MAX_NOTE_LEN: usize = 256;
/// Most keys a data dir holds (revoked ones included); creating more is refused.
pub const MAX_KEYS: usize = 10_000;

/// A key as stored: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub scope: String,
    /// Hex SHA-256 of the secret part.
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    pub note: Option<String>,
    /// The key id that created it, or `cli` for `peakstack keys create`.
    pub created_by: String,
}

impl KeyRecord {
    /// What a client sees of the key in lists: `psk_<id>`.
    pub fn prefix(&self) -> String {
        format!("{KEY_PREFIX}{}", self.id)
    }

    pub fn status(&self, now_ms: u64) -> KeyStatus {
        if self.revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// A key just made: its record and the whole key, shown once.
pub struct NewKey {
    pub record: KeyRecord,
    pub secret_key: String,
}

/// Checks a key's note: at most [`MAX_NOTE_LEN`] characters, no control
/// characters.
pub fn check_note(note: Option<String>) -> Result<Option<String>, String> {
    match note {
        Some(note) if note.chars().count() > MAX_NOTE_LEN => Err(format!("note: at most {MAX_NOTE_LEN} characters")),
        Some(note) if note.chars().any(char::is_control) => Err("note: no control characters".to_owned()),
        note => Ok(note),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // ThreadRng is a CSPRNG seeded from the operating system.
    rand::rng().fill_bytes(&mut buffer);
    hex(&buffer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a new key of `scope`.
pub fn generate(
    scope: &Scope,
    expires_at_ms: Option<u64>,
    note: Option<String>,
    created_by: &str,
    now_ms: u64,
) -> NewKey {
    let id = random_hex(ID_HEX_LEN / 2);
    let secret = random_hex(SECRET_HEX_LEN / 2);
    let secret_key = format!("{KEY_PREFIX}{id}_{secret}");
    let record = KeyRecord {
        id,
        scope: scope.to_string(),
        secret_sha256: hex(&sha256(&secret)),
        created_at_ms: now_ms,
        expires_at_ms,
        revoked_at_ms: None,
        note,
        created_by: created_by.to_owned(),
    };
    NewKey { record, secret_key }
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `text` has the form of a key id (16 lower-case hex digits).
pub fn is_key_id(text: &str) -> bool {
    is_lower_hex(text, ID_HEX_LEN)
}

/// Splits `Bearer psk_<id>_<secret>` into id and secret.
pub fn parse_bearer(header: &[u8]) -> Result<(&str, &str), String> {
    let text = std::str::from_utf8(header).map_err(|_| "Authorization: not ASCII".to_owned())?;
    let (scheme, token) = text.split_once(' ').ok_or("Authorization: expected \"Bearer <key>\"")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!("Authorization: the scheme must be Bearer, not {scheme:?}"));
    }
    let malformed = || "Authorization: the key is malformed (expected psk_<16 hex>_<64 hex>)".to_owned();
    let rest = token.trim().strip_prefix(KEY_PREFIX).ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
    if !is_key_id(id) || !is_lower_hex(secret, SECRET_HEX_LEN) {
        return Err(malformed());
    }
    Ok((id, secret))
}

/// What checking a key found.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    Valid { key_id: Arc<str>, scope: Scope },
    Unknown,
    Revoked,
    Expired,
}

struct Entry {
    record: KeyRecord,
    key_id: Arc<str>,
    scope: Scope,
    hash: [u8; 32],
}

impl Entry {
    fn new(record: KeyRecord) -> Result<Entry, String> {
        let scope = Scope::parse(&record.scope)?;
        let mut hash = [0u8; 32];
        if record.secret_sha256.len() != 64 {
            return Err(format!("key {}: corrupt hash", record.id));
        }
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&record.secret_sha256[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("key {}: corrupt hash", record.id))?;
        }
        Ok(Entry { key_id: Arc::from(record.id.as_str()), record, scope, hash })
    }
}

/// Every key of the data dir, in memory; the store is the durable copy and
/// is written first. Changes take effect on the next request.
#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<HashMap<String, Entry>>,
}

impl KeyRing {
    pub fn new(records: Vec<KeyRecord>) -> Result<KeyRing, String> {
        let ring = KeyRing::default();
        for record in records {
            ring.put(record)?;
        }
        Ok(ring)
    }

    /// Adds or replaces a key.
    pub fn put(&self, record: KeyRecord) -> Result<(), String> {
        let entry = Entry::new(record)?;
        self.keys.write().insert(entry.record.id.clone(), entry);
        Ok(())
    }

    pub fn check(&self, id: &str, secret: &str, now_ms: u64) -> KeyCheck {
        let presented = sha256(secret);
        let keys = self.keys.read();
        let Some(entry) = keys.get(id) else {
            // Same work as a known key, so an unknown id takes as long.
            let _ = presented.ct_eq(&[0u8; 32]);
            return KeyCheck::Unknown;
        };
        if !bool::from(presented.ct_eq(&entry.hash)) {
            return KeyCheck::Unknown;
        }
        match entry.record.status(now_ms) {
            KeyStatus::Active => KeyCheck::Valid { key_id: entry.key_id.clone(), scope: entry.scope.clone() },
            KeyStatus::Expired => KeyCheck::Expired,
            KeyStatus::Revoked => KeyCheck::Revoked,
        }
    }

    pub fn get(&self, id: &str) -> Option<KeyRecord> {
        self.keys.read().get(id).map(|entry| entry.record.clone())
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut records: Vec<KeyRecord> = self.keys.read().values().map(|entry| entry.record.clone()).collect();
        records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        records
    }

    pub fn len(&self) -> usize {
        self.keys.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys that open the API now.
    pub fn active(&self, now_ms: u64) -> usize {
        self.keys.read().values().filter(|entry| entry.record.status(now_ms) == KeyStatus::Active).count()
    }

    /// Active admin keys other than `except`.
    pub fn other_active_admins(&self, except: &str, now_ms: u64) -> usize {
        self.keys
            .read()
            .values()
            .filter(|entry| entry.record.id != except)
            .filter(|entry| entry.scope == Scope::Admin && entry.record.status(now_ms) == KeyStatus::Active)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_checked_by_hash_and_never_stored_in_clear() {
        let a = generate(&Scope::Admin, None, None, "cli", 1_000);
        let b = generate(&Scope::Admin, None, None, "cli", 1_000);
        assert_ne!(a.secret_key, b.secret_key);
        assert_ne!(a.record.id, b.record.id);
        assert_eq!(a.secret_key.len(), KEY_PREFIX.len() + ID_HEX_LEN + 1 + SECRET_HEX_LEN);
        let header_a = format!("Bearer {}", a.secret_key);
        let (id, secret) = parse_bearer(header_a.as_bytes()).unwrap();
        assert_eq!(id, a.record.id);
        assert!(!serde_json::to_string(&a.record).unwrap().contains(secret), "the secret is stored");

        let ring = KeyRing::new(vec![a.record.clone()]).unwrap();
        assert_eq!(ring.check(id, secret, 2_000), KeyCheck::Valid { key_id: Arc::from(id), scope: Scope::Admin });
        let header_b = format!("Bearer {}", b.secret_key);
        let (other_id, other_secret) = parse_bearer(header_b.as_bytes()).unwrap();
        assert_eq!(ring.check(other_id, other_secret, 2_000), KeyCheck::Unknown);
        assert_eq!(ring.check(id, other_secret, 2_000), KeyCheck::Unknown, "a wrong secret for a known id");
    }

    #[test]
    fn expired_and_revoked_keys_stop_working() {
        let key = generate(&Scope::Read, Some(5_000), None, "cli", 1_000);
        let header_key = format!("Bearer {}", key.secret_key);
        let (id, secret) = parse_bearer(header_key.as_bytes()).unwrap();
        let ring = KeyRing::new(vec![key.record.clone()]).unwrap();
        assert!(matches!(ring.check(id, secret, 4_999), KeyCheck::Valid { .. }));
        assert_eq!(ring.check(id, secret, 5_000), KeyCheck::Expired);
        let mut revoked = key.record.clone();
        revoked.revoked_at_ms = Some(2_000);
        ring.put(revoked).unwrap();
        assert_eq!(ring.check(id, secret, 3_000), KeyCheck::Revoked);
        assert_eq!(ring.active(3_000), 0);
    }

    #[test]
    fn malformed_authorization_headers() {
        let good = format!("psk_{}_{}", "a".repeat(16), "b".repeat(64));
        assert!(parse_bearer(format!("Bearer {good}").as_bytes()).is_ok());
        assert!(parse_bearer(format!("bearer {good}").as_bytes()).is_ok());
        for bad in [
            good.clone(),
            format!("Basic {good}"),
            "Bearer".to_owned(),
            "Bearer ".to_owned(),
            format!("Bearer {}", &good[..good.len() - 1]),
            format!("Bearer {}", good.to_uppercase()),
            format!("Bearer xsk_{}", &good[4..]),
            format!("Bearer psk_{}", "a".repeat(81)),
        ] {
            assert!(parse_bearer(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
