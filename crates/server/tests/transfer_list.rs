//! Over real HTTP: `GET /v1/transfers` and the filters of
//! `GET /v1/accounts/{id}/transfers`. Each filter and their combination
//! against what `GET /v1/transfers/{id}` shows, paging across pages without
//! duplicates or gaps, the scan bound handing out a cursor, tenants seeing
//! nothing of each other, bad parameters, and the same answers after a
//! restart of the server on its data dir.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use peakstack_engine::listing::MAX_SCAN_ENTRIES;
use peakstack_engine::{Engine, EngineConfig, SystemClock};
use peakstack_server::audit::AuditRecord;
use peakstack_server::keys::generate;
use peakstack_server::{open_access_store, rfc3339, Scope, Server, ServerConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(30);
/// Few records in memory: most transfers listed come from the archive.
const RECORDS_IN_MEMORY: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Admin,
    Read,
    M1,
    M2,
    /// An app key acting for buyer b1.
    App,
}

struct TestServer {
    base: String,
    client: reqwest::Client,
    keys: Vec<(Who, String)>,
    engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

impl Answer {
    fn ids(&self) -> Vec<String> {
        let data = self.body["data"].as_array().unwrap_or_else(|| panic!("not a page: {}", self.body));
        data.iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect()
    }

    fn next(&self) -> Option<String> {
        self.body["next"].as_str().map(str::to_owned)
    }

    fn assert_problem(&self, status: u16, code: &str, naming: &str) {
        assert_eq!((self.status, self.body["code"].as_str()), (status, Some(code)), "{}", self.body);
        assert_eq!(self.content_type, "application/problem+json", "{}", self.body);
        assert_eq!(self.body["status"], status);
        let detail = self.body["detail"].as_str().unwrap();
        assert!(detail.contains(naming), "the detail names {naming:?}: {detail}");
    }
}

async fn store_key(dir: &Path, scope: &str) -> String {
    let (store, _) = open_access_store(dir).unwrap();
    let new = generate(&Scope::parse(scope).unwrap(), None, None, "test", 1);
    let audit = AuditRecord::new("test", "test", "key.create", &new.record.id, Value::Null, 1);
    store.put_key(new.record, audit).await.unwrap();
    store.close().await;
    new.secret_key
}

impl TestServer {
    /// A server on `dir` with keys of every kind; `keys` from an earlier
    /// start on the same dir, or none to make them.
    async fn start(dir: &Path, keys: Option<Vec<(Who, String)>>) -> TestServer {
        let keys = match keys {
            Some(keys) => keys,
            None => vec![
                (Who::Admin, store_key(dir, "admin").await),
                (Who::Read, store_key(dir, "read").await),
                (Who::M1, store_key(dir, "merchant:m1").await),
                (Who::M2, store_key(dir, "merchant:m2").await),
                (Who::App, store_key(dir, "app").await),
            ],
        };
        let engine = Engine::open(EngineConfig {
            data_dir: dir.to_path_buf(),
            shards: 8,
            executors: 2,
            clock: Arc::new(SystemClock),
            records_in_memory: RECORDS_IN_MEMORY,
            checkpoint_every_log_bytes: 1 << 16,
        })
        .unwrap();
        let config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
        let server = Server::bind(config, engine.clone()).await.unwrap();
        let base = format!("http://{}", server.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { base, client: reqwest::Client::new(), keys, engine, stop: Some(stop), task: Some(task) }
    }

    /// Stops the server and the engine; answers the keys for a restart.
    async fn stop(mut self) -> Vec<(Who, String)> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
        std::mem::take(&mut self.keys)
    }

    async fn call(&self, who: Who, method: reqwest::Method, path: &str, body: Option<Value>) -> Answer {
        let key = &self.keys.iter().find(|(w, _)| *w == who).unwrap().1;
        let mut request = self.client.request(method, format!("{}{path}", self.base)).bearer_auth(key);
        if who == Who::App {
            request = request.header("x-buyer-id", "b1");
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(BOUND, request.send()).await.unwrap().unwrap();
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = response.json().await.unwrap_or(Value::Null);
        Answer { status, content_type, body }
    }

    async fn get_as(&self, who: Who, path: &str) -> Answer {
        self.call(who, reqwest::Method::GET, path, None).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.get_as(Who::Admin, path).await
    }

    /// A page every transfer of which is answered as GET shows it.
    async fn page(&self, who: Who, path: &str) -> Answer {
        let answer = self.get_as(who, path).await;
        assert_eq!(answer.status, 200, "{who:?} {path}: {}", answer.body);
        answer
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let answer = self.call(Who::Admin, reqwest::Method::POST, path, Some(body)).await;
        assert!((200..300).contains(&answer.status), "POST {path}: {}", answer.body);
        answer.body
    }

    async fn account(&self, id: &str, owner: Option<&str>) {
        self.post("/v1/accounts", json!({"id": id, "currency": "USD", "owner": owner})).await;
    }

    async fn transfer(&self, id: &str, debit: &str, credit: &str) {
        self.post("/v1/transfers", transfer(id, debit, credit)).await;
    }

    async fn hold(&self, id: &str, debit: &str, credit: &str, timeout_ms: u64) {
        let mut body = transfer(id, debit, credit);
        body["pending"] = json!(true);
        body["timeout_ms"] = json!(timeout_ms);
        self.post("/v1/transfers", body).await;
    }

    /// Every page from `path`, `limit` a page, as `who`; answers the ids
    /// and how many pages there were.
    async fn all_pages(&self, who: Who, path: &str, limit: usize) -> (Vec<String>, usize) {
        let path = path.trim_end_matches('?');
        let path = format!("{path}{}", if path.contains('?') { "&" } else { "?" });
        let mut ids = Vec::new();
        let mut pages = 0;
        let mut next: Option<String> = None;
        loop {
            let cursor = next.as_deref().map(|after| format!("&after={after}")).unwrap_or_default();
            let page = self.page(who, &format!("{path}limit={limit}{cursor}")).await;
            pages += 1;
            assert!(page.ids().len() <= limit);
            ids.extend(page.ids());
            next = page.next();
            if next.is_none() {
                return (ids, pages);
            }
            assert!(pages < 1000, "the listing never ends");
        }
    }

    /// GET /v1/transfers/{id} of every id.
    async fn records(&self, ids: &[String]) -> Vec<Value> {
        let mut records = Vec::new();
        for id in ids {
            let answer = self.get(&format!("/v1/transfers/{id}")).await;
            assert_eq!(answer.status, 200, "{id}");
            records.push(answer.body);
        }
        records
    }
}

fn transfer(id: &str, debit: &str, credit: &str) -> Value {
    json!({"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": 5, "currency": "USD"})
}

fn no_duplicates(ids: &[String]) {
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "a transfer listed twice: {ids:?}");
}

/// Transfers among alice, bob and carol, a few milliseconds apart: singles,
/// a hold posted, one voided, one that expires and one left pending.
/// Answers every id made, oldest first.
async fn ledger(s: &TestServer) -> Vec<String> {
    for name in ["alice", "bob", "carol"] {
        s.account(name, None).await;
    }
    let mut made = Vec::new();
    let pairs = [("alice", "bob"), ("bob", "carol"), ("carol", "alice"), ("alice", "carol")];
    for n in 0..12 {
        let (debit, credit) = pairs[n % pairs.len()];
        s.transfer(&format!("s{n}"), debit, credit).await;
        made.push(format!("s{n}"));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    s.hold("h-post", "alice", "bob", 0).await;
    s.post("/v1/transfers/h-post/post", json!({"id": "h-post-p", "amount": 2})).await;
    s.hold("h-void", "bob", "carol", 0).await;
    s.post("/v1/transfers/h-void/void", json!({"id": "h-void-v"})).await;
    s.hold("h-expire", "carol", "alice", 300).await;
    s.hold("h-open", "carol", "bob", 0).await;
    made.extend(["h-post", "h-post-p", "h-void", "h-void-v", "h-expire", "h-open"].map(String::from));
    for _ in 0..200 {
        if s.get("/v1/transfers/h-expire").await.body["status"] == "expired" {
            return made;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("h-expire did not expire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_and_their_combination_match_what_a_get_shows() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    let made = ledger(&s).await;
    let records = s.records(&made).await;

    // Unfiltered: every transfer once, newest first, as GET shows it.
    let all = s.page(Who::Admin, "/v1/transfers?limit=1000").await;
    let mut newest_first = made.clone();
    newest_first.reverse();
    assert_eq!(all.ids(), newest_first);
    assert_eq!(all.next(), None);
    for listed in all.body["data"].as_array().unwrap() {
        let id = listed["id"].as_str().unwrap();
        assert_eq!(listed, &records[made.iter().position(|m| m == id).unwrap()], "{id} as GET shows it");
    }

    // `expected(keep)`: the ids whose GET answer `keep` takes, newest first.
    let expected = |keep: &dyn Fn(&Value) -> bool| -> Vec<String> {
        let mut ids: Vec<String> =
            records.iter().filter(|r| keep(r)).map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        ids.reverse();
        ids
    };
    let touches =
        |account: &'static str| move |r: &Value| r["debit_account_id"] == account || r["credit_account_id"] == account;
    for account in ["alice", "bob", "carol"] {
        let listed = s.page(Who::Admin, &format!("/v1/transfers?account_id={account}&limit=1000")).await;
        assert_eq!(listed.ids(), expected(&touches(account)), "account_id={account}");
        // The account's own history route answers the same.
        let history = s.page(Who::Admin, &format!("/v1/accounts/{account}/transfers?limit=1000")).await;
        assert_eq!(history.body, listed.body, "{account}");
    }
    for status in ["pending", "posted", "voided", "expired"] {
        let listed = s.page(Who::Admin, &format!("/v1/transfers?status={status}")).await;
        let with_status = expected(&|r: &Value| r["status"] == status);
        assert!(!with_status.is_empty(), "the ledger has {status} transfers");
        assert_eq!(listed.ids(), with_status, "status={status}");
    }
    assert_eq!(s.page(Who::Admin, "/v1/transfers?status=expired").await.ids(), ["h-expire"]);
    assert_eq!(s.page(Who::Admin, "/v1/transfers?pending_id=h-post").await.ids(), ["h-post-p"]);
    assert_eq!(s.page(Who::Admin, "/v1/transfers?pending_id=h-void").await.ids(), ["h-void-v"]);
    for nothing in ["h-open", "h-expire", "s3", "no-such-transfer"] {
        let page = s.page(Who::Admin, &format!("/v1/transfers?pending_id={nothing}")).await;
        assert_eq!((page.ids().len(), page.next()), (0, None), "pending_id={nothing}");
    }

    // A window [since, until) on the transfers' timestamps.
    let at = |id: &str| records[made.iter().position(|m| m == id).unwrap()]["timestamp_ms"].as_u64().unwrap();
    let (since, until) = (at("s3"), at("s9"));
    let in_window = |r: &Value| (since..until).contains(&r["timestamp_ms"].as_u64().unwrap());
    let window = format!("since={}&until={}", rfc3339(since), rfc3339(until));
    let listed = s.page(Who::Admin, &format!("/v1/transfers?{window}")).await;
    assert_eq!(listed.ids(), expected(&in_window));
    assert!(listed.ids().contains(&"s3".to_owned()) && !listed.ids().contains(&"s9".to_owned()));
    let since_only = s.page(Who::Admin, &format!("/v1/transfers?since={}", rfc3339(at("h-void")))).await;
    assert_eq!(since_only.ids(), expected(&|r: &Value| r["timestamp_ms"].as_u64().unwrap() >= at("h-void")));
    let until_only = s.page(Who::Admin, &format!("/v1/transfers?until={}", rfc3339(at("s2")))).await;
    assert_eq!(until_only.ids(), expected(&|r: &Value| r["timestamp_ms"].as_u64().unwrap() < at("s2")));

    // Combined: every filter must hold.
    let combined = format!("account_id=alice&status=posted&{window}");
    let listed = s.page(Who::Admin, &format!("/v1/transfers?{combined}")).await;
    let both = expected(&|r: &Value| touches("alice")(r) && r["status"] == "posted" && in_window(r));
    assert!(!both.is_empty());
    assert_eq!(listed.ids(), both);
    let history = s.page(Who::Admin, &format!("/v1/accounts/alice/transfers?status=posted&{window}")).await;
    assert_eq!(history.body, listed.body);
    let posts_on_bob = s.page(Who::Admin, "/v1/transfers?pending_id=h-post&account_id=bob&status=posted").await;
    assert_eq!(posts_on_bob.ids(), ["h-post-p"]);
    let posts_on_carol = s.page(Who::Admin, "/v1/transfers?pending_id=h-post&account_id=carol").await;
    assert!(posts_on_carol.ids().is_empty(), "h-post-p does not touch carol");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_the_cursor_without_duplicates_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    let made = ledger(&s).await;
    let mut newest_first = made.clone();
    newest_first.reverse();
    for limit in [1, 2, 5] {
        let (ids, pages) = s.all_pages(Who::Admin, "/v1/transfers?", limit).await;
        no_duplicates(&ids);
        assert_eq!(ids, newest_first, "limit {limit}: no gaps, the same order");
        assert!(pages >= made.len() / limit);
        let (alice, _) = s.all_pages(Who::Read, "/v1/accounts/alice/transfers?", limit).await;
        let whole = s.page(Who::Read, "/v1/accounts/alice/transfers?limit=1000").await.ids();
        no_duplicates(&alice);
        assert_eq!(alice, whole);
    }
    // Transfers made while a client pages are not in the pages it has left
    // (they are newer than where it stands): nothing twice, nothing skipped.
    let first = s.page(Who::Admin, "/v1/transfers?limit=3").await;
    for n in 0..5 {
        s.transfer(&format!("later-{n}"), "alice", "bob").await;
    }
    let mut ids = first.ids();
    let mut next = first.next();
    while let Some(after) = next {
        let page = s.page(Who::Admin, &format!("/v1/transfers?limit=3&after={after}")).await;
        ids.extend(page.ids());
        next = page.next();
    }
    assert_eq!(ids, newest_first);
    assert_eq!(s.page(Who::Admin, "/v1/transfers?limit=1").await.ids(), ["later-4"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_the_scan_bound_with_a_cursor_to_go_on_from() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    for name in ["payer", "payee"] {
        s.account(name, None).await;
    }
    s.hold("the-hold", "payer", "payee", 0).await;
    // More transfers than a page reads entries, in one batch.
    let count = MAX_SCAN_ENTRIES + 50;
    let items: Vec<Value> = (0..count).map(|n| transfer(&format!("bulk-{n}"), "payer", "payee")).collect();
    let answer = s.post("/v1/transfers/batch", json!({"transfers": items})).await;
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), count);
    assert!(results.iter().all(|r| r["status"] == "created"), "{answer}");
    for path in [
        "/v1/transfers?status=pending",
        "/v1/transfers?status=pending&account_id=payee",
        "/v1/accounts/payer/transfers?status=pending",
    ] {
        let first = s.page(Who::Admin, &format!("{path}&limit=10")).await;
        assert!(first.ids().is_empty(), "{path}: the hold lies past the first page's bound");
        let next = first.next().unwrap_or_else(|| panic!("{path}: a cursor to go on from"));
        assert!(!next.is_empty());
        let (ids, pages) = s.all_pages(Who::Admin, path, 10).await;
        assert_eq!(ids, ["the-hold"], "{path}");
        assert!(pages >= 2, "{path}");
    }
    // Every plain one, once.
    let (posted, _) = s.all_pages(Who::Admin, "/v1/transfers?status=posted", 1000).await;
    assert_eq!(posted.len(), count);
    no_duplicates(&posted);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_sees_none_of_another_tenants_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    for (id, owner) in [
        ("m1-cash", Some("merchant:m1")),
        ("m2-cash", Some("merchant:m2")),
        ("b1-wallet", Some("buyer:b1")),
        ("platform", None),
    ] {
        s.account(id, owner).await;
    }
    for n in 0..3 {
        s.transfer(&format!("to-m1-{n}"), "platform", "m1-cash").await;
        s.transfer(&format!("to-m2-{n}"), "platform", "m2-cash").await;
    }
    s.transfer("fund-b1", "platform", "b1-wallet").await;
    s.hold("b1-pays-m1", "b1-wallet", "m1-cash", 0).await;
    s.post("/v1/transfers/b1-pays-m1/post", json!({"id": "b1-pays-m1-post"})).await;
    s.hold("m2-hold", "m2-cash", "platform", 0).await;
    let m1_view = ["b1-pays-m1-post", "b1-pays-m1", "to-m1-2", "to-m1-1", "to-m1-0"];

    // The whole ledger is for admin and read keys.
    for who in [Who::M1, Who::M2, Who::App] {
        s.get_as(who, "/v1/transfers").await.assert_problem(403, "forbidden", "account_id");
        s.get_as(who, "/v1/transfers?status=posted").await.assert_problem(403, "forbidden", "account_id");
    }
    for who in [Who::Admin, Who::Read] {
        assert_eq!(s.page(who, "/v1/transfers?limit=1000").await.ids().len(), 10);
    }
    // Its own account: every transfer that touched it, and nothing else.
    let own = s.page(Who::M1, "/v1/transfers?account_id=m1-cash").await;
    assert_eq!(own.ids(), m1_view);
    assert_eq!(s.page(Who::M1, "/v1/accounts/m1-cash/transfers").await.body, own.body);
    let (paged, _) = s.all_pages(Who::M1, "/v1/transfers?account_id=m1-cash", 1).await;
    assert_eq!(paged, m1_view);
    assert_eq!(
        s.page(Who::App, "/v1/transfers?account_id=b1-wallet").await.ids(),
        ["b1-pays-m1-post", "b1-pays-m1", "fund-b1"]
    );
    // Another tenant's account answers as a missing one does.
    for (who, other) in [(Who::M1, "m2-cash"), (Who::M1, "b1-wallet"), (Who::M1, "platform"), (Who::App, "m1-cash")] {
        let hidden = s.get_as(who, &format!("/v1/transfers?account_id={other}")).await;
        let missing = s.get_as(who, "/v1/transfers?account_id=nobody").await;
        hidden.assert_problem(404, "account_not_found", other);
        assert_eq!((hidden.status, &hidden.body["code"]), (missing.status, &missing.body["code"]));
        let history = s.get_as(who, &format!("/v1/accounts/{other}/transfers?status=posted")).await;
        history.assert_problem(404, "account_not_found", other);
    }
    // A pending transfer: its post for the tenants on either side; for
    // anyone else the same empty page as for an id that does not exist.
    for who in [Who::M1, Who::App, Who::Admin] {
        assert_eq!(s.page(who, "/v1/transfers?pending_id=b1-pays-m1").await.ids(), ["b1-pays-m1-post"], "{who:?}");
    }
    let hidden = s.page(Who::M2, "/v1/transfers?pending_id=b1-pays-m1").await;
    assert_eq!(hidden.body, s.page(Who::M2, "/v1/transfers?pending_id=no-such-hold").await.body);
    assert_eq!(hidden.body, json!({"data": [], "next": null}));
    let hidden = s.page(Who::M1, "/v1/transfers?pending_id=m2-hold").await;
    assert_eq!(hidden.body, json!({"data": [], "next": null}));
    // Another tenant's cursor does not walk its account.
    let m2_first = s.page(Who::M2, "/v1/transfers?account_id=m2-cash&limit=1").await;
    let m2_cursor = m2_first.next().expect("m2 has more than one transfer");
    s.get_as(Who::M1, &format!("/v1/transfers?account_id=m1-cash&after={m2_cursor}")).await.assert_problem(
        400,
        "invalid_request",
        "after",
    );

    // What m1 sees does not change, page for page and cursor for cursor,
    // while m2 and the platform keep moving money.
    let mut before = Vec::new();
    for limit in [1, 2, 100] {
        before.push(s.page(Who::M1, &format!("/v1/transfers?account_id=m1-cash&limit={limit}")).await.body);
    }
    for n in 0..40 {
        s.transfer(&format!("busy-m2-{n}"), "platform", "m2-cash").await;
    }
    for (index, limit) in [1, 2, 100].into_iter().enumerate() {
        let after = s.page(Who::M1, &format!("/v1/transfers?account_id=m1-cash&limit={limit}")).await.body;
        assert_eq!(after, before[index], "limit {limit}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_refused_with_a_problem_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    s.account("alice", None).await;
    let cases = [
        ("/v1/transfers?limit=0", "limit"),
        ("/v1/transfers?limit=1001", "limit"),
        ("/v1/transfers?limit=ten", "limit"),
        ("/v1/transfers?status=settled", "status"),
        ("/v1/transfers?status=", "status"),
        ("/v1/transfers?since=yesterday", "since"),
        ("/v1/transfers?until=2027-13-01T00:00:00Z", "until"),
        ("/v1/transfers?since=2027-01-02T00:00:00Z&until=2027-01-01T00:00:00Z", "until"),
        ("/v1/transfers?account_id=not%20an%20id", "account_id"),
        ("/v1/transfers?pending_id=", "pending_id"),
        ("/v1/transfers?after=", "after"),
        ("/v1/transfers?after=h1.2.3", "after"),
        ("/v1/transfers?after=h99999999999.0", "after"),
        ("/v1/transfers?after=12345&account_id=alice", "after"),
        ("/v1/transfers?status=posted&status=voided", "status"),
        ("/v1/transfers?at=2027-01-01T00:00:00Z", "at"),
        ("/v1/transfers?account=alice", "account"),
        ("/v1/accounts/alice/transfers?status=open", "status"),
        ("/v1/accounts/alice/transfers?since=now", "since"),
        ("/v1/accounts/alice/transfers?account_id=alice", "account_id"),
        ("/v1/accounts/alice/transfers?pending_id=h1", "pending_id"),
        ("/v1/accounts/alice/transfers?after=h0.0", "after"),
    ];
    for (path, naming) in cases {
        let answer = s.get(path).await;
        answer.assert_problem(400, "invalid_request", naming);
    }
    // The same parameters, valid, are taken.
    for path in [
        "/v1/transfers?limit=1000&status=posted&since=2020-01-01T00:00:00Z&until=2099-01-01T00:00:00.5Z",
        "/v1/transfers?account_id=alice&pending_id=x",
        "/v1/accounts/alice/transfers?status=pending&since=2020-01-01T00:00:00Z",
    ] {
        s.page(Who::Admin, path).await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_survive_a_restart_of_the_server_on_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), None).await;
    let made = ledger(&s).await;
    let paths = [
        "/v1/transfers?limit=1000",
        "/v1/transfers?status=voided",
        "/v1/transfers?status=expired",
        "/v1/transfers?pending_id=h-post",
        "/v1/transfers?account_id=carol&status=pending",
        "/v1/accounts/bob/transfers?limit=1000",
    ];
    let mut before = Vec::new();
    for path in paths {
        before.push(s.page(Who::Read, path).await.body);
    }
    let first = s.page(Who::Admin, "/v1/transfers?limit=4").await;
    let cursor = first.next().unwrap();
    let keys = s.stop().await;

    let s = TestServer::start(dir.path(), Some(keys)).await;
    for (path, before) in paths.iter().zip(&before) {
        assert_eq!(&s.page(Who::Read, path).await.body, before, "{path} after a restart");
    }
    // A cursor handed out before the restart goes on where it stood.
    let mut ids = first.ids();
    let rest = s.page(Who::Admin, &format!("/v1/transfers?limit=1000&after={cursor}")).await;
    assert_eq!(rest.next(), None);
    ids.extend(rest.ids());
    let mut newest_first = made;
    newest_first.reverse();
    assert_eq!(ids, newest_first);
    s.stop().await;
}
