//! Freeze, unfreeze and close over real HTTP: who may, what a frozen or
//! closed account refuses (with its code, changing nothing), the audit
//! record of each change, and the status after a restart.

mod common;

use std::path::Path;

use common::{create_key, loopback_config, open_engine, transfer, Answer, Running};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Admin,
    Read,
    App,
    M1,
    M2,
}

const WHO: [Who; 5] = [Who::Admin, Who::Read, Who::App, Who::M1, Who::M2];

fn scope_of(who: Who) -> &'static str {
    match who {
        Who::Admin => "admin",
        Who::Read => "read",
        Who::App => "app",
        Who::M1 => "merchant:m1",
        Who::M2 => "merchant:m2",
    }
}

struct Harness {
    server: Running,
    http: reqwest::Client,
    keys: Vec<(Who, String)>,
}

impl Harness {
    /// A server on `dir`; keys are made on the first start only.
    async fn start(dir: &Path, keys: Option<Vec<(Who, String)>>) -> Harness {
        let engine = open_engine(dir, 8, 2, 64, 1 << 20);
        let keys = match keys {
            Some(keys) => keys,
            None => {
                let mut keys = Vec::new();
                for who in WHO {
                    keys.push((who, create_key(dir, scope_of(who)).await));
                }
                keys
            }
        };
        Harness { server: Running::start(engine, loopback_config(dir)).await, http: reqwest::Client::new(), keys }
    }

    async fn stop(self) -> Vec<(Who, String)> {
        self.server.stop().await;
        self.keys
    }

    fn key(&self, who: Who) -> &str {
        self.keys.iter().find(|(w, _)| *w == who).map(|(_, key)| key.as_str()).unwrap()
    }

    async fn call(&self, who: Who, method: &str, path: &str, body: Option<&Value>, request_id: &str) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, self.server.url(path))
            .bearer_auth(self.key(who))
            .header("x-request-id", request_id);
        if who == Who::App {
            request = request.header("x-buyer-id", "b1");
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let answer = self.call(Who::Admin, method, path, body, "admin-call").await;
        assert!((200..300).contains(&answer.status), "{method} {path}: {}", answer.body);
        answer.body
    }

    /// What a refused request must leave as it was: accounts and audit log.
    async fn state(&self) -> Value {
        let accounts = self.admin("GET", "/v1/accounts?limit=1000", None).await;
        let audit = self.admin("GET", "/v1/audit?limit=1000", None).await;
        json!({"accounts": accounts, "audit": audit})
    }

    async fn refused(&self, who: Who, method: &str, path: &str, body: Option<&Value>, status: u16, code: &str) {
        let before = self.state().await;
        let answer = self.call(who, method, path, body, "refused").await;
        let context = format!("{who:?} {method} {path} {body:?}");
        assert_eq!((answer.status, answer.code()), (status, code), "{context}: {}", answer.body);
        assert_eq!(answer.body["status"], status, "{context}: problem+json");
        assert_eq!(before, self.state().await, "{context}: a refused request changed something");
    }

    /// A status change that succeeds; answers the account.
    async fn change(&self, who: Who, account: &str, change: &str, request_id: &str) -> Value {
        let answer = self.call(who, "POST", &format!("/v1/accounts/{account}/{change}"), None, request_id).await;
        assert_eq!(answer.status, 200, "{who:?} {change} {account}: {}", answer.body);
        answer.body
    }

    async fn status(&self, account: &str) -> Value {
        self.admin("GET", &format!("/v1/accounts/{account}"), None).await["status"].clone()
    }

    async fn audit_of(&self, action: &str) -> Vec<Value> {
        let records = self.admin("GET", "/v1/audit?limit=1000", None).await["data"].as_array().unwrap().clone();
        records.into_iter().filter(|r| r["action"] == action).collect()
    }
}

async fn setup(h: &Harness) {
    for (id, owner) in [("m1-cash", Some("merchant:m1")), ("m2-cash", Some("merchant:m2")), ("platform", None)] {
        h.admin("POST", "/v1/accounts", Some(&json!({"id": id, "currency": "USD", "owner": owner}))).await;
    }
    h.admin("POST", "/v1/transfers", Some(&transfer("fund-m1", "platform", "m1-cash", 100))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_freeze_unfreeze_and_close_and_refusals_do_not_tell_whether_an_account_exists() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), None).await;
    setup(&h).await;
    assert_eq!(h.status("m1-cash").await, "open");
    for change in ["freeze", "unfreeze", "close"] {
        for account in ["m1-cash", "no-such-account"] {
            let path = format!("/v1/accounts/{account}/{change}");
            // Read keys cannot write at all; app keys change no status.
            h.refused(Who::Read, "POST", &path, None, 403, "forbidden").await;
            h.refused(Who::App, "POST", &path, None, 403, "forbidden").await;
            // Another merchant's account answers as a missing one.
            let other = if change == "unfreeze" { (403, "forbidden") } else { (404, "account_not_found") };
            h.refused(Who::M2, "POST", &path, None, other.0, other.1).await;
        }
    }
    // Only an admin lifts a freeze, also on the merchant's own account.
    h.refused(Who::M1, "POST", "/v1/accounts/m1-cash/unfreeze", None, 403, "forbidden").await;
    h.refused(Who::Admin, "POST", "/v1/accounts/_clearing.0.USD/freeze", None, 404, "account_not_found").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_account_refuses_movements_until_unfrozen_and_a_closed_one_refuses_everything_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), None).await;
    setup(&h).await;
    let mut hold = transfer("hold-1", "m1-cash", "m2-cash", 5);
    hold["pending"] = json!(true);
    h.admin("POST", "/v1/transfers", Some(&hold)).await;

    let frozen = h.change(Who::M1, "m1-cash", "freeze", "req-freeze").await;
    assert_eq!((frozen["id"].as_str(), frozen["status"].as_str()), (Some("m1-cash"), Some("frozen")));
    // A repeated freeze is the same answer and no second audit record.
    assert_eq!(h.change(Who::M1, "m1-cash", "freeze", "req-freeze-again").await, frozen);
    let records = h.audit_of("account.freeze").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["target"], "m1-cash");
    assert_eq!(records[0]["request_id"], "req-freeze");
    assert_eq!(records[0]["key_id"], h.key(Who::M1)[4..20]);

    for (id, debit, credit) in [("t-in", "platform", "m1-cash"), ("t-out", "m1-cash", "platform")] {
        h.refused(Who::Admin, "POST", "/v1/transfers", Some(&transfer(id, debit, credit, 1)), 422, "account_frozen")
            .await;
        let batch = json!({"transfers": [transfer(id, debit, credit, 1)]});
        let answer = h.call(Who::Admin, "POST", "/v1/transfers/batch", Some(&batch), "batch").await;
        assert_eq!(answer.body["results"][0]["code"], "account_frozen", "{}", answer.body);
    }
    // Releasing a hold is always allowed.
    h.admin("POST", "/v1/transfers/hold-1/void", Some(&json!({"id": "void-1"}))).await;

    h.change(Who::Admin, "m1-cash", "unfreeze", "req-unfreeze").await;
    assert_eq!(h.status("m1-cash").await, "open");
    h.admin("POST", "/v1/transfers", Some(&transfer("t-after", "platform", "m1-cash", 1))).await;

    // Closing needs posted balance zero and nothing pending.
    h.refused(Who::M1, "POST", "/v1/accounts/m1-cash/close", None, 422, "account_not_zero").await;
    h.admin("POST", "/v1/transfers", Some(&transfer("payout", "m1-cash", "platform", 101))).await;
    let closed = h.change(Who::M1, "m1-cash", "close", "req-close").await;
    assert_eq!(closed["status"], "closed");
    assert_eq!(h.change(Who::M1, "m1-cash", "close", "req-close-again").await, closed);
    assert_eq!(h.audit_of("account.close").await.len(), 1);
    assert_eq!(h.audit_of("account.unfreeze").await.len(), 1);

    let keys = h.stop().await;
    let h = Harness::start(dir.path(), Some(keys)).await;
    assert_eq!(h.status("m1-cash").await, "closed");
    h.refused(
        Who::Admin,
        "POST",
        "/v1/transfers",
        Some(&transfer("t-closed", "platform", "m1-cash", 1)),
        422,
        "account_closed",
    )
    .await;
    for change in ["freeze", "unfreeze"] {
        h.refused(Who::Admin, "POST", &format!("/v1/accounts/m1-cash/{change}"), None, 422, "account_closed").await;
    }
    h.stop().await;
}
