//! `peakstack keys`: API keys in a data dir whose server is stopped. The
//! secret of a new key goes to stdout alone, so `KEY=$(peakstack keys
//! create --scope admin)` keeps it; everything else goes to stderr.

use anyhow::{bail, Context};
use peakstack_server::audit::{key_created, key_revoked};
use peakstack_server::idempotency::now_ms;
use peakstack_server::keys::{check_note, generate, is_key_id, KeyRing, KEY_PREFIX};
use peakstack_server::{open_access_store, parse_expiry, rfc3339, Scope};

use crate::KeysAction;

/// The key id the CLI's changes are audited under.
const CLI_ACTOR: &str = "cli";

pub async fn run(action: KeysAction) -> anyhow::Result<()> {
    match action {
        KeysAction::Create { scope, data, expires_at, note } => {
            let scope = Scope::parse(&scope).map_err(anyhow::Error::msg)?;
            let now = now_ms();
            let expires_at_ms = parse_expiry("--expires-at", expires_at.as_deref(), now).map_err(anyhow::Error::msg)?;
            let note = check_note(note).map_err(anyhow::Error::msg)?;
            let (store, _) = open_access_store(&data)?;
            let new = generate(&scope, expires_at_ms, note, CLI_ACTOR, now);
            let record = key_created(CLI_ACTOR, CLI_ACTOR, &new.record);
            let stored = store.put_key(new.record.clone(), record).await;
            store.close().await;
            stored.context("storing the key")?;
            eprintln!(
                "created API key {} (scope {scope}) in {}. It is shown once, below; only its hash is kept.",
                new.record.id,
                data.display()
            );
            println!("{}", new.secret_key);
            Ok(())
        }
        KeysAction::List { data } => {
            let (store, keys) = open_access_store(&data)?;
            store.close().await;
            let keys = KeyRing::new(keys).map_err(anyhow::Error::msg)?;
            let now = now_ms();
            println!("{:<24} {:<20} {:<8} {:<24} {:<24} NOTE", "PREFIX", "SCOPE", "STATUS", "CREATED", "EXPIRES");
            for key in keys.list() {
                println!(
                    "{:<24} {:<20} {:<8} {:<24} {:<24} {}",
                    key.prefix(),
                    key.scope,
                    key.status(now).as_str(),
                    rfc3339(key.created_at_ms),
                    key.expires_at_ms.map(rfc3339).unwrap_or_else(|| "never".to_owned()),
                    key.note.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        KeysAction::Revoke { id, data } => {
            // An id, `psk_<id>`, or a whole key: only the id part is used
            // (and echoed), so a pasted secret never reaches a terminal log.
            let id = key_id_of(&id)?;
            let (store, keys) = open_access_store(&data)?;
            let keys = KeyRing::new(keys).map_err(anyhow::Error::msg)?;
            let now = now_ms();
            let admins_left = keys.other_active_admins(&id, now);
            let Some(mut key) = keys.get(&id) else {
                store.close().await;
                bail!("no API key with id {id} in {}", data.display());
            };
            if key.revoked_at_ms.is_some() {
                store.close().await;
                eprintln!("API key {id} was revoked already");
                return Ok(());
            }
            let key_scope_is_admin = key.scope == "admin";
            key.revoked_at_ms = Some(now);
            let record = key_revoked(CLI_ACTOR, CLI_ACTOR, &key);
            let stored = store.put_key(key, record).await;
            store.close().await;
            stored.context("storing the revocation")?;
            eprintln!("revoked API key {id}");
            if key_scope_is_admin && admins_left == 0 {
                eprintln!(
                    "warning: no active admin key is left; create one with `peakstack keys create --scope admin` to manage keys over HTTP"
                );
            }
            Ok(())
        }
    }
}

/// The key id in `<id>`, `psk_<id>` or `psk_<id>_<secret>`.
fn key_id_of(text: &str) -> anyhow::Result<String> {
    let rest = text.strip_prefix(KEY_PREFIX).unwrap_or(text);
    let id = rest.split('_').next().unwrap_or_default();
    if !is_key_id(id) {
        bail!("not a key id: expected 16 hex digits (as `peakstack keys list` shows after psk_)");
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_id_is_taken_from_an_id_a_prefix_or_a_whole_key() {
        let id = "0123456789abcdef";
        for text in [id.to_owned(), format!("psk_{id}"), format!("psk_{id}_{}", "f".repeat(64))] {
            assert_eq!(key_id_of(&text).unwrap(), id, "{text}");
        }
        for bad in ["", "psk_", "0123", "0123456789ABCDEF", "psk_0123456789abcdeg_secret"] {
            let error = key_id_of(bad).unwrap_err().to_string();
            assert!(!error.contains("secret") && !error.contains("abcdeg"), "echoed {bad:?}: {error}");
        }
    }
}
