//! Access control over real HTTP: every route against every kind of caller
//! and every tenant's objects, with the exact status, and nothing changed
//! where access was refused. Keys rotate and revoke at once; every change is
//! in the audit log under the key that made it.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{loopback_config, open_engine, store_key, transfer, Answer, Running};
use peakstack_server::{api_route_access, Access, Scope};
use serde_json::{json, Value};

/// The callers of the matrix. `App` acts for buyer b1 (X-Buyer-Id).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    NoKey,
    Malformed,
    Unknown,
    Expired,
    Revoked,
    Admin,
    Read,
    App,
    AppWithoutBuyer,
    M1,
    M2,
}

const ANONYMOUS: [Who; 5] = [Who::NoKey, Who::Malformed, Who::Unknown, Who::Expired, Who::Revoked];
const KEYED: [Who; 5] = [Who::Admin, Who::Read, Who::App, Who::M1, Who::M2];

struct Harness {
    server: Running,
    http: reqwest::Client,
    keys: Vec<(Who, String)>,
}

fn key_id(key: &str) -> &str {
    &key[4..20]
}

impl Harness {
    async fn start(dir: &Path) -> Harness {
        let engine = open_engine(dir, 8, 2, 64, 1 << 20);
        let mut keys = vec![
            (Who::Admin, store_key(dir, "admin", None, false).await),
            (Who::Read, store_key(dir, "read", None, false).await),
            (Who::App, store_key(dir, "app", None, false).await),
            (Who::M1, store_key(dir, "merchant:m1", None, false).await),
            (Who::M2, store_key(dir, "merchant:m2", None, false).await),
            (Who::Expired, store_key(dir, "admin", Some(1_000), false).await),
            (Who::Revoked, store_key(dir, "admin", None, true).await),
        ];
        keys.push((Who::AppWithoutBuyer, keys[2].1.clone()));
        keys.push((Who::Unknown, format!("psk_{}_{}", "0".repeat(16), "0".repeat(64))));
        keys.push((Who::Malformed, "psk_not-a-key".to_owned()));
        Harness { server: Running::start(engine, loopback_config(dir)).await, http: reqwest::Client::new(), keys }
    }

    async fn stop(self) {
        self.server.stop().await;
    }

    fn key(&self, who: Who) -> Option<&str> {
        self.keys.iter().find(|(w, _)| *w == who).map(|(_, key)| key.as_str())
    }

    async fn call_with(
        &self,
        key: Option<&str>,
        buyer: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Answer {
        self.call_full(key, buyer, method, path, body, &[]).await
    }

    async fn call_full(
        &self,
        key: Option<&str>,
        buyer: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, self.server.url(path));
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(buyer) = buyer {
            request = request.header("x-buyer-id", buyer);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    async fn call(&self, who: Who, method: &str, path: &str, body: Option<&Value>) -> Answer {
        let buyer = (who == Who::App).then_some("b1");
        self.call_with(self.key(who), buyer, method, path, body).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let answer = self.call(Who::Admin, method, path, body).await;
        assert!((200..300).contains(&answer.status), "{method} {path}: {}", answer.body);
        answer.body
    }

    /// Everything a refused request must leave as it was: every account with
    /// its balances (clearing accounts included), the keys, and the audit log.
    async fn state(&self) -> Value {
        let accounts = self.admin("GET", "/v1/accounts?limit=1000", None).await;
        let keys = self.admin("GET", "/v1/keys", None).await;
        let audit = self.admin("GET", "/v1/audit?limit=1000", None).await;
        json!({"accounts": accounts, "keys": keys, "audit": audit})
    }

    async fn audit_records(&self) -> Vec<Value> {
        self.admin("GET", "/v1/audit?limit=1000", None).await["data"].as_array().unwrap().clone()
    }

    /// The request is refused with `status`/`code` and changes nothing.
    async fn refused(&self, who: Who, method: &str, path: &str, body: Option<&Value>, status: u16, code: &str) {
        let before = self.state().await;
        let answer = self.call(who, method, path, body).await;
        let context = format!("{who:?} {method} {path} {body:?}");
        assert_eq!((answer.status, answer.code()), (status, code), "{context}: {}", answer.body);
        assert_eq!(answer.body["status"], status, "{context}: problem+json");
        assert_eq!(before, self.state().await, "{context}: a refused request changed something");
    }

    /// The request succeeds with `status`.
    async fn allowed(&self, who: Who, method: &str, path: &str, body: Option<&Value>, status: u16) -> Value {
        let answer = self.call(who, method, path, body).await;
        assert_eq!(answer.status, status, "{who:?} {method} {path} {body:?}: {}", answer.body);
        answer.body
    }
}

fn account(id: &str, owner: Option<&str>) -> Value {
    json!({"id": id, "currency": "USD", "owner": owner})
}

fn pending(id: &str, debit: &str, credit: &str, amount: u64) -> Value {
    let mut body = transfer(id, debit, credit, amount);
    body["pending"] = json!(true);
    body
}

/// The accounts of the matrix, by owner.
const ACCOUNTS: [(&str, Option<&str>); 6] = [
    ("m1-cash", Some("merchant:m1")),
    ("m1-fees", Some("merchant:m1")),
    ("m2-cash", Some("merchant:m2")),
    ("b1-wallet", Some("buyer:b1")),
    ("b2-wallet", Some("buyer:b2")),
    ("platform", None),
];

/// Which of [`ACCOUNTS`] each caller sees.
fn sees(who: Who, account: &str) -> bool {
    match who {
        Who::Admin | Who::Read => true,
        Who::M1 => account.starts_with("m1-"),
        Who::M2 => account.starts_with("m2-"),
        Who::App => account.starts_with("b1-"),
        _ => false,
    }
}

/// A server on a fresh data dir with the accounts and payments of [`setup`].
async fn started() -> (tempfile::TempDir, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    setup(&h).await;
    (dir, h)
}

async fn setup(h: &Harness) {
    for (id, owner) in ACCOUNTS {
        h.admin("POST", "/v1/accounts", Some(&account(id, owner))).await;
    }
    for (id, _) in &ACCOUNTS[..5] {
        h.admin("POST", "/v1/transfers", Some(&transfer(&format!("fund-{id}"), "platform", id, 1_000))).await;
    }
    // Payments: b1 pays m1, b2 pays m2.
    h.admin("POST", "/v1/transfers", Some(&transfer("pay-b1-m1", "b1-wallet", "m1-cash", 10))).await;
    h.admin("POST", "/v1/transfers", Some(&transfer("pay-b2-m2", "b2-wallet", "m2-cash", 10))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_callers_without_a_valid_key_and_scopes_get_exactly_their_routes() {
    let (_dir, h) = started().await;
    h.admin("POST", "/v1/transfers", Some(&pending("hold", "b1-wallet", "m1-cash", 5))).await;
    let some_key = h.admin("GET", "/v1/keys", None).await["data"][0]["id"].as_str().unwrap().to_owned();

    for (method, route, access) in api_route_access() {
        let path = route
            .replace("/v1/accounts/{id}", "/v1/accounts/m1-cash")
            .replace("/v1/transfers/{id}", "/v1/transfers/hold")
            .replace("/v1/keys/{id}", &format!("/v1/keys/{some_key}"));
        // A body that would be valid, so that only access decides.
        let body = match (method, route) {
            ("POST", "/v1/accounts") => Some(account("new-account", None)),
            ("POST", "/v1/transfers") => Some(transfer("new-transfer", "m1-cash", "platform", 1)),
            ("POST", "/v1/transfers/batch") => {
                Some(json!({"transfers": [transfer("new-b", "m1-cash", "platform", 1)]}))
            }
            ("POST", "/v1/transfers/{id}/post") => Some(json!({"id": "new-post"})),
            ("POST", "/v1/transfers/{id}/void") => Some(json!({"id": "new-void"})),
            ("POST", "/v1/keys") => Some(json!({"scope": "read"})),
            _ => None,
        };
        if access == Access::Public {
            let answer = h.call(Who::NoKey, method, &path, body.as_ref()).await;
            assert_eq!(answer.status, 200, "{method} {route} is public");
            continue;
        }
        for who in ANONYMOUS {
            let before = h.state().await;
            let answer = h.call(who, method, &path, body.as_ref()).await;
            assert_eq!((answer.status, answer.code()), (401, "unauthorized"), "{who:?} {method} {route}");
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"), "{who:?} {method} {route}");
            assert_eq!(before, h.state().await, "{who:?} {method} {route} changed something");
        }
        // An app key must name its buyer.
        let answer = h.call(Who::AppWithoutBuyer, method, &path, body.as_ref()).await;
        if access.allows(&Scope::App) {
            assert_eq!((answer.status, answer.code()), (400, "invalid_request"), "app without X-Buyer-Id {route}");
        }
        for who in KEYED {
            let scope = match who {
                Who::Admin => Scope::Admin,
                Who::Read => Scope::Read,
                Who::App => Scope::App,
                Who::M1 | Who::M2 => Scope::parse("merchant:m").unwrap(),
                _ => unreachable!(),
            };
            if !access.allows(&scope) {
                h.refused(who, method, &path, body.as_ref(), 403, "forbidden").await;
            }
        }
    }
    // Refusals are counted by code for the operators.
    let metrics = h.http.get(h.server.url("/metrics")).bearer_auth(h.key(Who::Admin).unwrap()).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    for code in ["unauthorized", "forbidden"] {
        let counted = text.lines().any(|l| l.starts_with("peakstack_access_refusals_total{") && l.contains(code));
        assert!(counted, "no refusal counter for {code}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_accounts_and_transfers() {
    let (_dir, h) = started().await;

    for who in KEYED {
        // One account: its own, or 404 as if it did not exist.
        for (id, _) in ACCOUNTS {
            let path = format!("/v1/accounts/{id}");
            if sees(who, id) {
                assert_eq!(h.allowed(who, "GET", &path, None, 200).await["id"], id);
                let history = h.allowed(who, "GET", &format!("{path}/transfers"), None, 200).await;
                assert!(!history["data"].as_array().unwrap().is_empty(), "{who:?} {id}");
            } else {
                h.refused(who, "GET", &path, None, 404, "account_not_found").await;
                h.refused(who, "GET", &format!("{path}/transfers"), None, 404, "account_not_found").await;
            }
        }
        // The list: exactly its own (everything, clearing included, for
        // admin and read).
        let listed: BTreeSet<String> = h.allowed(who, "GET", "/v1/accounts?limit=1000", None, 200).await["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect();
        let expected: BTreeSet<String> =
            ACCOUNTS.iter().filter(|(id, _)| sees(who, id)).map(|(id, _)| id.to_string()).collect();
        if matches!(who, Who::Admin | Who::Read) {
            assert!(listed.is_superset(&expected) && listed.iter().any(|id| id.starts_with('_')), "{who:?}");
        } else {
            assert_eq!(listed, expected, "{who:?}");
        }
        // A transfer: seen from either side.
        for (id, debit, credit) in [
            ("pay-b1-m1", "b1-wallet", "m1-cash"),
            ("pay-b2-m2", "b2-wallet", "m2-cash"),
            ("fund-m1-fees", "platform", "m1-fees"),
        ] {
            let path = format!("/v1/transfers/{id}");
            if sees(who, debit) || sees(who, credit) {
                assert_eq!(h.allowed(who, "GET", &path, None, 200).await["id"], id);
            } else {
                h.refused(who, "GET", &path, None, 404, "transfer_not_found").await;
            }
        }
    }
    // Paging a merchant's list walks only its accounts.
    let first = h.allowed(Who::M1, "GET", "/v1/accounts?limit=1", None, 200).await;
    assert_eq!((first["data"][0]["id"].as_str(), first["next"].as_str()), (Some("m1-cash"), Some("m1-cash")));
    let second = h.allowed(Who::M1, "GET", "/v1/accounts?limit=1&after=m1-cash", None, 200).await;
    assert_eq!(second["data"][0]["id"], "m1-fees");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_moves_only_out_of_the_callers_own_accounts() {
    let (_dir, h) = started().await;

    // Opening accounts: merchants and apps open their own only.
    let opened = h.allowed(Who::M1, "POST", "/v1/accounts", Some(&account("merchant:m1~new", None)), 201).await;
    assert_eq!(opened["owner"], "merchant:m1", "a merchant's account is its own");
    h.allowed(Who::M1, "POST", "/v1/accounts", Some(&account("merchant:m1~new2", Some("merchant:m1"))), 201).await;
    h.refused(
        Who::M1,
        "POST",
        "/v1/accounts",
        Some(&account("merchant:m1~steal", Some("merchant:m2"))),
        403,
        "forbidden",
    )
    .await;
    h.refused(Who::M1, "POST", "/v1/accounts", Some(&account("merchant:m1~plat", Some("buyer:b1"))), 403, "forbidden")
        .await;
    let opened = h.allowed(Who::App, "POST", "/v1/accounts", Some(&account("buyer:b1~savings", None)), 201).await;
    assert_eq!(opened["owner"], "buyer:b1");
    h.refused(Who::App, "POST", "/v1/accounts", Some(&account("buyer:b1~x", Some("buyer:b2"))), 403, "forbidden").await;
    h.refused(Who::Read, "POST", "/v1/accounts", Some(&account("r-x", None)), 403, "forbidden").await;
    let opened =
        h.allowed(Who::Admin, "POST", "/v1/accounts", Some(&account("m2-new", Some("merchant:m2"))), 201).await;
    assert_eq!(opened["owner"], "merchant:m2");
    // Tenants make ids in their own namespace only; an admin gives a
    // namespaced account to the namespace's tenant only.
    h.refused(Who::M1, "POST", "/v1/accounts", Some(&account("m1-plain", None)), 403, "forbidden").await;
    h.refused(Who::M1, "POST", "/v1/accounts", Some(&account("merchant:m2~x", None)), 403, "forbidden").await;
    let foreign = account("merchant:m1~adm", Some("merchant:m2"));
    h.refused(Who::Admin, "POST", "/v1/accounts", Some(&foreign), 400, "invalid_request").await;
    h.allowed(Who::Admin, "POST", "/v1/accounts", Some(&account("merchant:m1~adm", Some("merchant:m1"))), 201).await;

    // Transfers: out of own accounts only; anything else is "not found".
    h.allowed(Who::M1, "POST", "/v1/transfers", Some(&transfer("merchant:m1~refund", "m1-cash", "b1-wallet", 3)), 201)
        .await;
    h.allowed(Who::M1, "POST", "/v1/transfers", Some(&transfer("merchant:m1~sweep", "m1-cash", "m1-fees", 1)), 201)
        .await;
    for debit in ["m2-cash", "b1-wallet", "platform", "no-such-account"] {
        let body = transfer(&format!("merchant:m1~from-{debit}"), debit, "m1-cash", 1);
        h.refused(Who::M1, "POST", "/v1/transfers", Some(&body), 404, "account_not_found").await;
    }
    h.allowed(Who::App, "POST", "/v1/transfers", Some(&transfer("buyer:b1~pays", "b1-wallet", "m2-cash", 4)), 201)
        .await;
    h.refused(
        Who::App,
        "POST",
        "/v1/transfers",
        Some(&transfer("buyer:b1~x", "b2-wallet", "b1-wallet", 1)),
        404,
        "account_not_found",
    )
    .await;
    h.refused(Who::Read, "POST", "/v1/transfers", Some(&transfer("r-x", "platform", "m1-cash", 1)), 403, "forbidden")
        .await;
    h.allowed(Who::Admin, "POST", "/v1/transfers", Some(&transfer("adm", "m2-cash", "platform", 1)), 201).await;

    // Holds: the merchant settles holds on either side of it, the app its
    // buyer's; nobody else even sees them.
    for id in ["h1", "h2", "h3", "h4"] {
        h.admin("POST", "/v1/transfers", Some(&pending(id, "b1-wallet", "m1-cash", 5))).await;
    }
    h.refused(
        Who::M2,
        "POST",
        "/v1/transfers/h1/post",
        Some(&json!({"id": "merchant:m2~h1"})),
        404,
        "pending_transfer_not_found",
    )
    .await;
    h.refused(Who::Read, "POST", "/v1/transfers/h1/void", Some(&json!({"id": "h1-r"})), 403, "forbidden").await;
    h.allowed(Who::M1, "POST", "/v1/transfers/h1/post", Some(&json!({"id": "merchant:m1~h1-post"})), 201).await;
    h.allowed(Who::M1, "POST", "/v1/transfers/h2/void", Some(&json!({"id": "merchant:m1~h2-void"})), 201).await;
    h.allowed(Who::App, "POST", "/v1/transfers/h3/void", Some(&json!({"id": "buyer:b1~h3-void"})), 201).await;
    h.refused(
        Who::M1,
        "POST",
        "/v1/transfers/nope/post",
        Some(&json!({"id": "merchant:m1~x"})),
        404,
        "pending_transfer_not_found",
    )
    .await;
    let b2_hold = pending("h5", "b2-wallet", "m2-cash", 5);
    h.admin("POST", "/v1/transfers", Some(&b2_hold)).await;
    h.refused(
        Who::App,
        "POST",
        "/v1/transfers/h5/void",
        Some(&json!({"id": "buyer:b1~h5-void"})),
        404,
        "pending_transfer_not_found",
    )
    .await;

    // A batch is checked whole before anything moves.
    let mixed = json!({"transfers": [transfer("merchant:m1~bt-1", "m1-cash", "platform", 1), transfer("merchant:m1~bt-2", "m2-cash", "platform", 1)]});
    h.refused(Who::M1, "POST", "/v1/transfers/batch", Some(&mixed), 404, "account_not_found").await;
    assert_eq!(
        h.call(Who::Admin, "GET", "/v1/transfers/merchant:m1~bt-1", None).await.status,
        404,
        "nothing of the batch was made"
    );
    let own = json!({"transfers": [transfer("merchant:m1~bt-3", "m1-cash", "platform", 1), transfer("merchant:m1~bt-4", "m1-fees", "platform", 1)]});
    let answer = h.allowed(Who::M1, "POST", "/v1/transfers/batch", Some(&own), 200).await;
    assert!(answer["results"].as_array().unwrap().iter().all(|r| r["status"] == "created"), "{answer}");

    // Idempotency-Keys belong to the API key: m2 reusing m1's key gets no
    // replay of m1's answer.
    let body = transfer("merchant:m1~idem", "m1-cash", "platform", 2);
    let headers = [("idempotency-key", "shared-key")];
    let first = h.call_full(h.key(Who::M1), None, "POST", "/v1/transfers", Some(&body), &headers).await;
    assert_eq!(first.status, 201);
    let other = h.call_full(h.key(Who::M2), None, "POST", "/v1/transfers", Some(&body), &headers).await;
    assert_eq!((other.status, other.code()), (403, "forbidden"), "m2 must not see m1's answer");
    let replay = h.call_full(h.key(Who::M1), None, "POST", "/v1/transfers", Some(&body), &headers).await;
    assert_eq!((replay.status, &replay.body), (201, &first.body));

    // The books still balance.
    let totals = h.server.engine.totals().await.unwrap();
    assert_eq!(totals.net, 0, "all balances sum to zero");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_and_revoke_at_once_and_every_change_is_audited_under_its_key() {
    let (_dir, h) = started().await;
    let admin_id = key_id(h.key(Who::Admin).unwrap()).to_owned();
    let m1_old = h.key(Who::M1).unwrap().to_owned();

    // Rotation: a new m1 key works at once; the old one stops at once.
    let created = h
        .call_full(
            h.key(Who::Admin),
            None,
            "POST",
            "/v1/keys",
            Some(&json!({"scope": "merchant:m1", "note": "rotation"})),
            &[("x-request-id", "rotate-1")],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let m1_new = created.body["key"].as_str().unwrap().to_owned();
    let new_id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["prefix"], format!("psk_{new_id}"));
    assert_eq!(
        (created.body["scope"].as_str(), created.body["status"].as_str()),
        (Some("merchant:m1"), Some("active"))
    );
    let listed = h.admin("GET", "/v1/keys", None).await;
    assert!(!listed.to_string().contains(&m1_new[21..]), "a list shows no secret");
    assert_eq!(h.call_with(Some(&m1_new), None, "GET", "/v1/accounts/m1-cash", None).await.status, 200);
    let revoked = h.admin("DELETE", &format!("/v1/keys/{}", key_id(&m1_old)), None).await;
    assert_eq!(revoked["status"], "revoked");
    let answer = h.call_with(Some(&m1_old), None, "GET", "/v1/accounts/m1-cash", None).await;
    assert_eq!((answer.status, answer.code()), (401, "unauthorized"));
    assert!(answer.body["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(h.call_with(Some(&m1_new), None, "GET", "/v1/accounts/m1-cash", None).await.status, 200);
    // Revoking again answers the same; an unknown key is 404.
    assert_eq!(h.admin("DELETE", &format!("/v1/keys/{}", key_id(&m1_old)), None).await["status"], "revoked");
    h.refused(Who::Admin, "DELETE", "/v1/keys/0123456789abcdef", None, 404, "key_not_found").await;
    // A whole key pasted in place of an id is not echoed back.
    let pasted = h.call(Who::Admin, "DELETE", &format!("/v1/keys/{}", &m1_new[..]), None).await;
    assert_eq!((pasted.status, pasted.code()), (404, "key_not_found"));
    assert!(!pasted.body.to_string().contains(&m1_new[21..]), "the secret was echoed: {}", pasted.body);
    // The last admin key cannot go.
    h.refused(Who::Admin, "DELETE", &format!("/v1/keys/{admin_id}"), None, 409, "last_admin_key").await;
    // Bad key requests change nothing.
    for body in [
        json!({"scope": "root"}),
        json!({"scope": "merchant:"}),
        json!({"scope": "read", "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"scope": "read", "expires_at": "tomorrow"}),
        json!({"scope": "read", "note": "x".repeat(257)}),
        json!({"scope": "read", "secret": "mine"}),
    ] {
        h.refused(Who::Admin, "POST", "/v1/keys", Some(&body), 400, "invalid_request").await;
    }
    // A replay under the same Idempotency-Key answers without the secret.
    let headers = [("idempotency-key", "key-once")];
    let body = json!({"scope": "read"});
    let first = h.call_full(h.key(Who::Admin), None, "POST", "/v1/keys", Some(&body), &headers).await;
    let replay = h.call_full(h.key(Who::Admin), None, "POST", "/v1/keys", Some(&body), &headers).await;
    assert_eq!((first.status, replay.status), (201, 201));
    assert!(first.body["key"].is_string() && replay.body.get("key").is_none(), "{}", replay.body);
    assert_eq!(first.body["id"], replay.body["id"], "the replay names the same key; no second key was made");

    // Changes under the new m1 key, each with a request id.
    let m1_new_id = key_id(&m1_new).to_owned();
    let change = |id: &'static str, request: &'static str, path: &'static str, body: Value| {
        let key = m1_new.clone();
        let h = &h;
        async move {
            let answer = h.call_full(Some(&key), None, "POST", path, Some(&body), &[("x-request-id", request)]).await;
            assert_eq!(answer.status, 201, "{id}: {}", answer.body);
        }
    };
    change("acct", "req-acct", "/v1/accounts", account("merchant:m1~audited", None)).await;
    change("t", "req-t", "/v1/transfers", transfer("merchant:m1~audited-t", "m1-cash", "merchant:m1~audited", 7)).await;
    change("p", "req-p", "/v1/transfers", pending("merchant:m1~audited-p", "m1-cash", "merchant:m1~audited", 2)).await;
    change("post", "req-post", "/v1/transfers/merchant:m1~audited-p/post", json!({"id": "merchant:m1~audited-post"}))
        .await;
    // An idempotent retry and a refusal change nothing and leave no record.
    let retry = h
        .call_with(
            Some(&m1_new),
            None,
            "POST",
            "/v1/transfers",
            Some(&transfer("merchant:m1~audited-t", "m1-cash", "merchant:m1~audited", 7)),
        )
        .await;
    assert_eq!(retry.status, 200);

    let records = h.audit_records().await;
    let find = |action: &str, target: &str| -> Value {
        records
            .iter()
            .find(|r| r["action"] == action && r["target"] == target)
            .unwrap_or_else(|| panic!("no {action} {target} in {records:?}"))
            .clone()
    };
    for (action, target, request) in [
        ("account.create", "merchant:m1~audited", "req-acct"),
        ("transfer.create", "merchant:m1~audited-t", "req-t"),
        ("transfer.create", "merchant:m1~audited-p", "req-p"),
        ("transfer.post", "merchant:m1~audited-post", "req-post"),
    ] {
        let record = find(action, target);
        assert_eq!(
            (record["key_id"].as_str(), record["request_id"].as_str()),
            (Some(m1_new_id.as_str()), Some(request))
        );
        assert!(record["at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(find("transfer.create", "merchant:m1~audited-t")["details"]["amount"], 7);
    assert_eq!(
        records.iter().filter(|r| r["target"] == "merchant:m1~audited-t").count(),
        1,
        "the retry left no record"
    );
    let key_create = find("key.create", &new_id);
    assert_eq!(
        (key_create["key_id"].as_str(), key_create["request_id"].as_str()),
        (Some(admin_id.as_str()), Some("rotate-1"))
    );
    assert_eq!(find("key.revoke", key_id(&m1_old))["key_id"], admin_id);
    assert_eq!(find("transfer.create", "fund-m1-cash")["key_id"], admin_id);
    // Seqs count up without gaps.
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (seqs[0]..seqs[0] + seqs.len() as u64).collect::<Vec<_>>());

    // Filters.
    let by_key = h.admin("GET", &format!("/v1/audit?key_id={m1_new_id}"), None).await;
    assert_eq!(by_key["data"].as_array().unwrap().len(), 4);
    let posts = h.admin("GET", "/v1/audit?action=transfer.post", None).await;
    assert_eq!(posts["data"].as_array().unwrap().len(), 1);
    let by_request = h.admin("GET", "/v1/audit?request_id=req-t", None).await;
    assert_eq!(by_request["data"][0]["target"], "merchant:m1~audited-t");
    let paged = h.admin("GET", &format!("/v1/audit?key_id={m1_new_id}&limit=3"), None).await;
    assert_eq!(paged["data"].as_array().unwrap().len(), 3);
    let rest =
        h.admin("GET", &format!("/v1/audit?key_id={m1_new_id}&after={}", paged["next"].as_str().unwrap()), None).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    let future = h.admin("GET", "/v1/audit?since=2999-01-01T00:00:00Z", None).await;
    assert!(future["data"].as_array().unwrap().is_empty());
    for bad in ["action=key.eat", "since=yesterday", "after=x", "limit=0", "colour=red"] {
        h.refused(Who::Admin, "GET", &format!("/v1/audit?{bad}"), None, 400, "invalid_request").await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clash_with_another_tenants_id_answers_as_if_the_id_were_free() {
    let (_dir, h) = started().await;
    // m1's own objects, in m1's namespace (an admin may make them for m1).
    h.admin("POST", "/v1/accounts", Some(&account("merchant:m1~cash", Some("merchant:m1")))).await;
    h.admin("POST", "/v1/transfers", Some(&transfer("merchant:m1~t", "platform", "merchant:m1~cash", 5))).await;
    h.admin("POST", "/v1/transfers", Some(&pending("merchant:m1~hold", "b1-wallet", "m1-cash", 2))).await;
    h.admin("POST", "/v1/transfers/merchant:m1~hold/post", Some(&json!({"id": "merchant:m1~post"}))).await;
    // Holds the other callers may settle.
    h.admin("POST", "/v1/transfers", Some(&pending("h-b2", "b2-wallet", "m2-cash", 2))).await;
    h.admin("POST", "/v1/transfers", Some(&pending("h-b1", "b1-wallet", "m2-cash", 2))).await;

    let existing = ["merchant:m1~cash", "merchant:m1~t", "merchant:m1~hold", "merchant:m1~post"];
    let missing = "merchant:m1~never-made";
    for who in [Who::M2, Who::App] {
        let hold = if who == Who::M2 { "h-b2" } else { "h-b1" };
        let debit = if who == Who::M2 { "m2-cash" } else { "b1-wallet" };
        let requests = |id: &str| -> Vec<(String, Value)> {
            vec![
                ("/v1/accounts".to_owned(), account(id, None)),
                ("/v1/transfers".to_owned(), transfer(id, debit, "m1-cash", 1)),
                (format!("/v1/transfers/{hold}/post"), json!({"id": id})),
                (format!("/v1/transfers/{hold}/void"), json!({"id": id})),
                ("/v1/transfers/batch".to_owned(), json!({"transfers": [transfer(id, debit, "m1-cash", 1)]})),
            ]
        };
        for id in existing {
            for ((path, body), (_, free_body)) in requests(id).into_iter().zip(requests(missing)) {
                h.refused(who, "POST", &path, Some(&body), 403, "forbidden").await;
                // Status, code and words the same, the id aside.
                let clash = h.call(who, "POST", &path, Some(&body)).await;
                let free = h.call(who, "POST", &path, Some(&free_body)).await;
                let words = |answer: &Answer, id: &str| answer.body.to_string().replace(id, "ID");
                assert_eq!(clash.status, free.status, "{who:?} {path} {id}");
                assert_eq!(words(&clash, id), words(&free, missing), "{who:?} {path} {id}");
            }
        }
    }
    // m1 itself meets its own ids as before: a clash is with itself.
    let own = h.call(Who::M1, "POST", "/v1/accounts", Some(&account("merchant:m1~t", None))).await;
    assert_eq!(own.status, 201, "a transfer id and an account id do not clash: {}", own.body);
    let again =
        h.call(Who::M1, "POST", "/v1/transfers", Some(&transfer("merchant:m1~t", "m1-cash", "platform", 9))).await;
    assert_eq!((again.status, again.code()), (409, "exists_with_different_fields"));
    h.stop().await;
}

/// A namespaced id belongs to its tenant's objects, whoever makes it: an
/// admin key may make `merchant:m1~...` transfers of m1's money (for m1),
/// but not between accounts none of which is m1's, which would squat an id
/// m1 then clashes with and cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_makes_namespaced_ids_only_for_the_namespaces_own_objects() {
    let (_dir, h) = started().await;
    h.admin("POST", "/v1/transfers", Some(&pending("h-b2", "b2-wallet", "m2-cash", 2))).await;
    h.admin("POST", "/v1/transfers", Some(&pending("h-b1", "b1-wallet", "m1-cash", 2))).await;
    for (path, body) in [
        ("/v1/transfers", transfer("merchant:m1~x", "b2-wallet", "m2-cash", 1)),
        ("/v1/transfers", transfer("merchant:m1~x", "platform", "b1-wallet", 1)),
        ("/v1/transfers", pending("merchant:m1~x", "b2-wallet", "m2-cash", 1)),
        ("/v1/transfers", transfer("buyer:b1~x", "m1-cash", "m2-cash", 1)),
        ("/v1/transfers/h-b2/post", json!({"id": "merchant:m1~x"})),
        ("/v1/transfers/h-b2/void", json!({"id": "merchant:m1~x"})),
        ("/v1/transfers/h-b1/void", json!({"id": "merchant:m2~x"})),
        (
            "/v1/transfers/batch",
            json!({"transfers": [transfer("merchant:m1~b", "m1-cash", "platform", 1), transfer("merchant:m1~x", "b2-wallet", "m2-cash", 1)]}),
        ),
    ] {
        h.refused(Who::Admin, "POST", path, Some(&body), 403, "forbidden").await;
        let answer = h.call(Who::Admin, "POST", path, Some(&body)).await;
        let detail = answer.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("must be owned by"), "{path}: the detail names the rule: {detail}");
    }
    // A missing account answers as the ledger would, before the rule.
    let missing = transfer("merchant:m1~x", "no-such-account", "m2-cash", 1);
    h.refused(Who::Admin, "POST", "/v1/transfers", Some(&missing), 404, "account_not_found").await;
    let missing = transfer("merchant:m1~x", "m2-cash", "no-such-account", 1);
    h.refused(Who::Admin, "POST", "/v1/transfers", Some(&missing), 404, "account_not_found").await;
    // An account in a namespace is its tenant's, also an admin's platform account.
    let platform = account("merchant:m1~platform", None);
    h.refused(Who::Admin, "POST", "/v1/accounts", Some(&platform), 400, "invalid_request").await;

    // m1's money on either side: the admin makes it, as before.
    h.allowed(Who::Admin, "POST", "/v1/transfers", Some(&transfer("merchant:m1~in", "platform", "m1-cash", 1)), 201)
        .await;
    h.allowed(Who::Admin, "POST", "/v1/transfers", Some(&transfer("merchant:m1~out", "m1-cash", "b2-wallet", 1)), 201)
        .await;
    h.allowed(Who::Admin, "POST", "/v1/transfers", Some(&transfer("buyer:b1~in", "platform", "b1-wallet", 1)), 201)
        .await;
    h.allowed(Who::Admin, "POST", "/v1/transfers/h-b1/post", Some(&json!({"id": "merchant:m1~post"})), 201).await;
    // The squatted id stayed free: m1 makes it, with its own money.
    let own =
        h.call(Who::M1, "POST", "/v1/transfers", Some(&transfer("merchant:m1~x", "m1-cash", "platform", 1))).await;
    assert_eq!(own.status, 201, "m1 makes the id the admin was refused: {}", own.body);
    h.stop().await;
}
