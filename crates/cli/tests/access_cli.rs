//! Access control of the real `peakstack` binary, black-box: `serve` refuses
//! to start without a key (unless told it is a local sandbox), `keys
//! create/list/revoke` on a stopped data dir, keys created and revoked over
//! HTTP take effect at once and survive a restart, the audit log names who
//! did it under which request id, HTTPS with a certificate, and plain HTTP
//! kept to loopback. The access rules themselves (every route against every
//! scope) are tested against the same server code in `crates/server`.
//!
//! Every child process is bounded: commands are killed past their time
//! limit, and a running server is killed when its guard drops, on every
//! path, panics included.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[allow(dead_code)] // not every shared helper is used here
mod common;

use common::{client, free_port};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_peakstack");
/// How long a `peakstack keys ...` command, or a `serve` that must refuse
/// to start, may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(5);
/// How long a server may take to answer `/readyz`, or to stop after SIGTERM.
const SERVER_LIMIT: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------
// Processes

/// What a finished command left behind.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} after {:?}\n--- stdout\n{}--- stderr\n{}", self.status, self.took, self.stdout, self.stderr)
    }
}

/// Kills (SIGKILL) and reaps the child when dropped, unless it was reaped
/// already.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `peakstack ARGS...` to completion, killing it past `limit`. Output
/// goes to anonymous files, so a chatty child never blocks on a full pipe.
fn run(args: &[&str], limit: Duration) -> Finished {
    let mut stdout = tempfile::tempfile().unwrap();
    let mut stderr = tempfile::tempfile().unwrap();
    let started = Instant::now();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(args)
            .env("PEAKSTACK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .expect("run peakstack"),
    );
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            drop(child);
            panic!("`peakstack {}` did not finish within {limit:?}: {}", args.join(" "), read_all(&mut stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    Finished { status, stdout: read_all(&mut stdout), stderr: read_all(&mut stderr), took }
}

fn read_all(file: &mut File) -> String {
    let mut text = String::new();
    file.rewind().unwrap();
    file.read_to_string(&mut text).unwrap();
    text
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// `peakstack keys ARGS... --data DATA`.
fn keys(data: &Path, args: &[&str]) -> Finished {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data", path_str(data)]);
    run(&all, COMMAND_LIMIT)
}

/// `peakstack keys create --scope SCOPE --data DATA ARGS...`: the key it printed.
fn new_key(data: &Path, scope: &str, args: &[&str]) -> String {
    let mut all = vec!["create", "--scope", scope];
    all.extend_from_slice(args);
    let created = keys(data, &all);
    assert!(created.status.success(), "{created:?}");
    let key = created.stdout.strip_suffix('\n').unwrap_or_else(|| panic!("one line: {created:?}"));
    assert!(is_key(key), "stdout is the key alone: {created:?}");
    key.to_owned()
}

/// The rows of `peakstack keys list` (header checked and left out), each
/// split on whitespace: [prefix, scope, status, created, expires, note...].
fn list_keys(data: &Path) -> Vec<Vec<String>> {
    let listed = keys(data, &["list"]);
    assert!(listed.status.success(), "keys list: {listed:?}");
    let mut lines = listed.stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header line").split_whitespace().collect();
    assert_eq!(header, ["PREFIX", "SCOPE", "STATUS", "CREATED", "EXPIRES", "NOTE"], "{listed:?}");
    lines.map(|line| line.split_whitespace().map(str::to_owned).collect()).collect()
}

/// The id part of a key `psk_<id>_<secret>`.
fn key_id(key: &str) -> &str {
    key.strip_prefix("psk_").and_then(|rest| rest.split('_').next()).expect("a psk_ key")
}

fn is_key(text: &str) -> bool {
    let hex =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match text.strip_prefix("psk_").and_then(|rest| rest.split_once('_')) {
        Some((id, secret)) => hex(id, 16) && hex(secret, 64),
        None => false,
    }
}

/// Whether anything accepts TCP connections on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// A `peakstack serve` that must refuse to start: it exits non-zero within
/// [`COMMAND_LIMIT`] and leaves nothing listening on `port`.
fn serve_refused(data: &Path, listen: &str, port: u16, flags: &[&str]) -> Finished {
    let mut args = vec!["serve", "--listen", listen, "--data", path_str(data)];
    args.extend_from_slice(flags);
    let finished = run(&args, COMMAND_LIMIT);
    assert!(!finished.status.success(), "serve should have refused to start: {finished:?}");
    assert!(finished.stdout.is_empty(), "{finished:?}");
    let last = finished.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "ends with a readable error: {finished:?}");
    assert!(!listening(port), "a refused serve left something listening on {port}");
    finished
}

/// A running `peakstack serve`, killed when dropped. Its log (stderr) goes
/// to a file, printed if the test fails.
struct Server {
    child: KillOnDrop,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` or `https://...`.
    base: String,
}

impl Server {
    /// Starts `serve --listen LISTEN --data DATA FLAGS...`; `base` is where
    /// the test reaches it.
    fn spawn(data: &Path, listen: &str, base: String, flags: &[&str]) -> Server {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let log = data.with_extension(format!("serve-{}.log", STARTED.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--data", path_str(data)])
            .args(flags)
            .env("PEAKSTACK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start peakstack serve");
        Server { child: KillOnDrop(child), log, base }
    }

    /// Plain HTTP on 127.0.0.1:`port`.
    fn start(data: &Path, port: u16, flags: &[&str]) -> Server {
        Server::spawn(data, &format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"), flags)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the server has exited.
    fn check_running(&mut self) {
        if let Some(status) = self.child.0.try_wait().unwrap() {
            panic!("serve exited with {status}:\n{}", self.log());
        }
    }

    /// Waits until `/readyz` answers 200 over plain HTTP and returns its body.
    async fn ready(&mut self) -> Value {
        let anonymous = anonymous();
        let deadline = Instant::now() + SERVER_LIMIT;
        loop {
            self.check_running();
            if let Ok(response) = anonymous.get(format!("{}/readyz", self.base)).send().await {
                if response.status() == 200 {
                    return response.json().await.unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "serve at {} not ready within {SERVER_LIMIT:?}:\n{}",
                self.base,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then a clean exit within [`SERVER_LIMIT`].
    fn terminate(mut self) {
        self.check_running();
        let pid = self.child.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success(), "kill -TERM {pid}");
        let deadline = Instant::now() + SERVER_LIMIT;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status} after SIGTERM:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "serve did not stop within {SERVER_LIMIT:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- serve log ({}):\n{}", self.base, self.log());
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// A client that sends no key.
fn anonymous() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    www_authenticate: Option<String>,
    request_id: Option<String>,
    body: Value,
}

async fn call(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
    request_id: Option<&str>,
) -> Answer {
    let mut request = client.request(method.parse().unwrap(), url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (status, content_type) = (response.status().as_u16(), header("content-type").unwrap_or_default());
    let (www_authenticate, request_id) = (header("www-authenticate"), header("x-request-id"));
    let raw = response.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
    Answer { status, content_type, www_authenticate, request_id, body }
}

async fn get(client: &reqwest::Client, url: &str) -> Answer {
    call(client, "GET", url, None, None).await
}

/// Asserts a 401 problem: code `unauthorized`, `WWW-Authenticate: Bearer`,
/// a detail that says why.
fn assert_unauthorized(answer: &Answer, why: &str) {
    assert_eq!(answer.status, 401, "{why}: {answer:?}");
    assert!(answer.content_type.starts_with("application/problem+json"), "{why}: {answer:?}");
    assert_eq!((&answer.body["code"], &answer.body["status"]), (&json!("unauthorized"), &json!(401)), "{answer:?}");
    assert!(answer.body["detail"].as_str().is_some_and(|detail| detail.contains(why)), "{why}: {answer:?}");
    assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"), "{why}: {answer:?}");
}

fn assert_problem(answer: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!((answer.status, answer.body["code"].as_str()), (status, Some(code)), "{what}: {answer:?}");
    assert!(answer.content_type.starts_with("application/problem+json"), "{what}: {answer:?}");
    assert_eq!(answer.www_authenticate, None, "only a 401 asks for credentials: {what}: {answer:?}");
}

/// The audit records (all of them: the tests make few).
async fn audit(admin: &reqwest::Client, base: &str) -> Vec<Value> {
    let answer = get(admin, &format!("{base}/v1/audit?limit=1000")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["next"], Value::Null, "one page holds them all: {answer:?}");
    answer.body["data"].as_array().unwrap().clone()
}

/// The one audit record of `action` on `target`.
fn audit_record<'a>(records: &'a [Value], action: &str, target: &str) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["action"] == action && r["target"] == target).collect();
    assert_eq!(found.len(), 1, "one {action} of {target} in {records:#?}");
    found[0]
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn serve_refuses_to_start_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let refused = serve_refused(&data, &format!("127.0.0.1:{port}"), port, &[]);
    assert!(refused.stderr.contains("no active API key"), "{refused:?}");
    assert!(refused.stderr.contains("peakstack keys create --scope admin"), "{refused:?}");
    assert!(refused.stderr.contains("--insecure-no-auth"), "names the way out for local development: {refused:?}");
    assert!(refused.took < Duration::from_secs(3), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_auth_is_an_open_sandbox_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut server = Server::start(&data, port, &["--insecure-no-auth"]);
    let ready = server.ready().await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["auth"], "disabled", "{ready}");
    let warning = ready["warning"].as_str().unwrap_or_else(|| panic!("a warning in {ready}"));
    assert!(warning.contains("authentication is off") && warning.contains("every caller is an admin"), "{ready}");
    assert_eq!(ready.as_object().unwrap().len(), 3, "{ready}");

    let base = &server.base;
    let nobody = anonymous();
    let created =
        call(&nobody, "POST", &format!("{base}/v1/accounts"), Some(json!({"id": "a1", "currency": "USD"})), None).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(get(&nobody, &format!("{base}/v1/accounts/a1")).await.status, 200);
    // Even the admin routes are open, and the audit log names the sandbox.
    let records = audit(&nobody, base).await;
    assert_eq!(audit_record(&records, "account.create", "a1")["key_id"], "insecure-no-auth", "{records:#?}");
    assert!(server.log().contains("AUTHENTICATION IS OFF"), "the log says so too:\n{}", server.log());
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_on_a_stopped_dir_then_serve_checks_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // Bad input is refused before anything is written: not even the dir.
    let bogus = keys(&data, &["create", "--scope", "bogus"]);
    assert!(!bogus.status.success(), "{bogus:?}");
    assert!(bogus.stdout.is_empty(), "{bogus:?}");
    assert!(bogus.stderr.contains("\"bogus\" is not a scope") && bogus.stderr.contains("merchant:<id>"), "{bogus:?}");
    assert!(!data.exists(), "a refused keys create made {}", data.display());

    let created = keys(&data, &["create", "--scope", "admin", "--note", "first admin"]);
    assert!(created.status.success(), "{created:?}");
    let admin_key = created.stdout.strip_suffix('\n').unwrap_or_else(|| panic!("one line: {created:?}"));
    assert!(is_key(admin_key) && !admin_key.contains('\n'), "stdout is the key alone: {created:?}");
    assert!(created.stderr.contains(&format!("created API key {}", key_id(admin_key))), "{created:?}");
    assert!(!created.stderr.contains(admin_key), "the key goes to stdout only: {created:?}");

    for (args, wanted) in [
        (&["create", "--scope", "bogus"][..], "is not a scope"),
        (&["create", "--scope", "merchant:"][..], "is not a scope"),
        (
            &["create", "--scope", "read", "--expires-at", "2000-01-01T00:00:00Z"][..],
            "--expires-at: must be in the future",
        ),
        (&["create", "--scope", "read", "--expires-at", "tomorrow"][..], "not an RFC 3339 time"),
    ] {
        let refused = keys(&data, args);
        assert!(!refused.status.success(), "{args:?}: {refused:?}");
        assert!(refused.stdout.is_empty(), "{args:?}: {refused:?}");
        assert!(refused.stderr.contains(wanted), "{args:?}: {refused:?}");
    }
    let listed = list_keys(&data);
    assert_eq!(listed.len(), 1, "only the admin key: {listed:?}");
    assert_eq!(listed[0][..3], [format!("psk_{}", key_id(admin_key)), "admin".into(), "active".into()]);
    assert_eq!(listed[0][4..], ["never", "first", "admin"], "{listed:?}");
    assert!(!listed.concat().concat().contains(&admin_key[21..]), "list never shows the secret");

    let port = free_port();
    let mut server = Server::start(&data, port, &[]);
    assert_eq!(server.ready().await, json!({"status": "ready", "auth": "api_keys"}));
    let accounts = format!("{}/v1/accounts", server.base);
    assert_unauthorized(&get(&anonymous(), &accounts).await, "needs an API key");
    let unknown = format!("psk_{}_{}", "0".repeat(16), "0".repeat(64));
    let tampered = format!("{}{}", &admin_key[..admin_key.len() - 1], if admin_key.ends_with('0') { '1' } else { '0' });
    for (key, why) in [("not-a-key", "malformed"), (&unknown, "not valid"), (&tampered, "not valid")] {
        assert_unauthorized(&get(&client(key), &accounts).await, why);
    }
    let admin = client(admin_key);
    let listed = get(&admin, &accounts).await;
    assert_eq!((listed.status, &listed.body["data"]), (200, &json!([])), "{listed:?}");

    // The store is locked while the server runs: the CLI points at HTTP.
    let locked = keys(&data, &["create", "--scope", "read"]);
    assert!(!locked.status.success(), "{locked:?}");
    assert!(locked.stdout.is_empty(), "{locked:?}");
    assert!(locked.stderr.contains("another process") && locked.stderr.contains("POST /v1/keys"), "{locked:?}");
    assert_eq!(get(&admin, &accounts).await.status, 200, "the server is unharmed");

    server.terminate();
    assert_eq!(list_keys(&data).len(), 1, "the refused create wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_and_revoked_over_http_take_effect_at_once_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_key = new_key(&data, "admin", &[]);
    let admin_id = key_id(&admin_key).to_owned();
    let admin = client(&admin_key);
    let mut server = Server::start(&data, free_port(), &[]);
    server.ready().await;
    let base = server.base.clone();
    let accounts = format!("{base}/v1/accounts");

    let made =
        call(&admin, "POST", &format!("{base}/v1/keys"), Some(json!({"scope": "read"})), Some("make-read-1")).await;
    assert_eq!(made.status, 201, "{made:?}");
    assert_eq!(made.request_id.as_deref(), Some("make-read-1"), "{made:?}");
    let read_key = made.body["key"].as_str().unwrap_or_else(|| panic!("the key in {made:?}")).to_owned();
    let read_id = made.body["id"].as_str().unwrap().to_owned();
    assert!(is_key(&read_key) && key_id(&read_key) == read_id, "{made:?}");
    assert_eq!(
        (&made.body["scope"], &made.body["status"], &made.body["created_by"]),
        (&json!("read"), &json!("active"), &json!(admin_id)),
        "{made:?}"
    );

    // A read key reads, and nothing more.
    let reader = client(&read_key);
    assert_eq!(get(&reader, &accounts).await.status, 200);
    let write = call(&reader, "POST", &accounts, Some(json!({"id": "r1", "currency": "USD"})), None).await;
    assert_problem(&write, 403, "forbidden", "read key opening an account");
    assert_problem(&get(&reader, &format!("{base}/v1/keys")).await, 403, "forbidden", "read key listing keys");
    assert_problem(&get(&reader, &format!("{base}/v1/audit")).await, 403, "forbidden", "read key reading the audit");
    assert_eq!(get(&admin, &format!("{accounts}/r1")).await.status, 404, "the refused account was not opened");

    // The last admin key stays.
    let last = call(&admin, "DELETE", &format!("{base}/v1/keys/{admin_id}"), None, None).await;
    assert_problem(&last, 409, "last_admin_key", "revoking the only admin key");
    assert_eq!(get(&admin, &accounts).await.status, 200, "the admin key still works");

    let revoked = call(&admin, "DELETE", &format!("{base}/v1/keys/{read_id}"), None, Some("revoke-read-1")).await;
    assert_eq!((revoked.status, &revoked.body["status"]), (200, &json!("revoked")), "{revoked:?}");
    assert!(revoked.body["revoked_at"].is_string(), "{revoked:?}");
    assert_eq!(revoked.body.get("key"), None, "the secret is shown once only: {revoked:?}");
    assert_unauthorized(&get(&reader, &accounts).await, "revoked");

    let records = audit(&admin, &base).await;
    let first = audit_record(&records, "key.create", &admin_id);
    assert_eq!((&first["key_id"], &first["request_id"]), (&json!("cli"), &json!("cli")), "{first}");
    let create = audit_record(&records, "key.create", &read_id);
    assert_eq!((&create["key_id"], &create["request_id"]), (&json!(admin_id), &json!("make-read-1")), "{create}");
    assert_eq!(create["details"]["scope"], "read", "{create}");
    let revoke = audit_record(&records, "key.revoke", &read_id);
    assert_eq!((&revoke["key_id"], &revoke["request_id"]), (&json!(admin_id), &json!("revoke-read-1")), "{revoke}");
    assert!(create["seq"].as_u64() < revoke["seq"].as_u64(), "{records:#?}");
    assert_eq!(records.len(), 3, "the refusals left no record: {records:#?}");

    // A graceful restart keeps keys and revocations.
    server.terminate();
    let mut server = Server::start(&data, free_port(), &[]);
    server.ready().await;
    let base = server.base.clone();
    assert_unauthorized(&get(&reader, &format!("{base}/v1/accounts")).await, "revoked");
    assert_eq!(get(&admin, &format!("{base}/v1/accounts")).await.status, 200);
    let after = get(&admin, &format!("{base}/v1/keys/{read_id}")).await;
    assert_eq!((after.status, &after.body["status"]), (200, &json!("revoked")), "{after:?}");
    assert_eq!(audit(&admin, &base).await, records, "the audit log survived the restart");
    server.terminate();

    let listed = list_keys(&data);
    let status_of = |id: &str| {
        let row =
            listed.iter().find(|row| row[0] == format!("psk_{id}")).unwrap_or_else(|| panic!("{id} in {listed:?}"));
        (row[1].clone(), row[2].clone())
    };
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(status_of(&admin_id), ("admin".to_owned(), "active".to_owned()));
    assert_eq!(status_of(&read_id), ("read".to_owned(), "revoked".to_owned()));
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Epoch milliseconds as RFC 3339 in UTC, to the millisecond (as the
/// binary prints times).
fn rfc3339(ms: u64) -> String {
    // Days to a civil date: Howard Hinnant's `civil_from_days`.
    let (days, ms_of_day) = ((ms / 86_400_000) as i64 + 719_468, ms % 86_400_000);
    let (era, day_of_era) = (days.div_euclid(146_097), days.rem_euclid(146_097));
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_revoked_from_the_cli_are_refused_by_the_next_server_and_expired_keys_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_key = new_key(&data, "admin", &[]);
    let read_key = new_key(&data, "read", &[]);
    let app_key = new_key(&data, "app", &[]);
    // Expires in an hour, to the millisecond: `keys list` shows it so.
    let in_an_hour = rfc3339(now_ms() + 3_600_000);
    let merchant_key = new_key(&data, "merchant:m1", &["--expires-at", &in_an_hour]);

    let by_id = keys(&data, &["revoke", key_id(&read_key)]);
    assert!(by_id.status.success(), "{by_id:?}");
    assert!(by_id.stderr.contains(&format!("revoked API key {}", key_id(&read_key))), "{by_id:?}");
    let by_prefix = keys(&data, &["revoke", &format!("psk_{}", key_id(&app_key))]);
    assert!(by_prefix.status.success(), "{by_prefix:?}");
    let again = keys(&data, &["revoke", key_id(&read_key)]);
    assert!(again.status.success() && again.stderr.contains("revoked already"), "{again:?}");
    let unknown = keys(&data, &["revoke", "0123456789abcdef"]);
    assert!(!unknown.status.success() && unknown.stderr.contains("no API key with id 0123456789abcdef"), "{unknown:?}");

    let listed = list_keys(&data);
    let rows: Vec<[&str; 3]> = listed.iter().map(|row| [row[1].as_str(), row[2].as_str(), row[4].as_str()]).collect();
    let expected = [
        ["admin", "active", "never"],
        ["read", "revoked", "never"],
        ["app", "revoked", "never"],
        ["merchant:m1", "active", in_an_hour.as_str()],
    ];
    assert_eq!(rows, expected, "in order of creation: {listed:?}");

    let mut server = Server::start(&data, free_port(), &[]);
    server.ready().await;
    let accounts = format!("{}/v1/accounts", server.base);
    assert_unauthorized(&get(&client(&read_key), &accounts).await, "revoked");
    let app = client(&app_key).get(&accounts).header("x-buyer-id", "b1").send().await.unwrap();
    assert_eq!(app.status(), 401, "app key revoked by psk_<id>");
    let admin = client(&admin_key);
    assert_eq!(get(&admin, &accounts).await.status, 200);
    assert_eq!(get(&client(&merchant_key), &accounts).await.status, 200, "not expired yet");
    let records = audit(&admin, &server.base).await;
    for key in [&read_key, &app_key] {
        let revoke = audit_record(&records, "key.revoke", key_id(key));
        assert_eq!(revoke["key_id"], "cli", "{revoke}");
    }
    let expiry = audit_record(&records, "key.create", key_id(&merchant_key));
    assert_eq!(expiry["details"], json!({"scope": "merchant:m1", "expires_at": in_an_hour}), "{expiry}");

    // A key stops working when it expires, without a restart.
    let expires_at_ms = now_ms() + 1_500;
    let body = json!({"scope": "read", "expires_at": rfc3339(expires_at_ms)});
    let made = call(&admin, "POST", &format!("{}/v1/keys", server.base), Some(body), None).await;
    assert_eq!((made.status, &made.body["expires_at"]), (201, &json!(rfc3339(expires_at_ms))), "{made:?}");
    let short_lived = client(made.body["key"].as_str().unwrap());
    assert_eq!(get(&short_lived, &accounts).await.status, 200, "not expired yet");
    tokio::time::sleep(Duration::from_millis(expires_at_ms.saturating_sub(now_ms()) + 100)).await;
    assert_unauthorized(&get(&short_lived, &accounts).await, "expired");
    let key = get(&admin, &format!("{}/v1/keys/{}", server.base, made.body["id"].as_str().unwrap())).await;
    assert_eq!(key.body["status"], "expired", "{key:?}");
    server.terminate();
    assert_eq!(
        list_keys(&data)[4][..3],
        [format!("psk_{}", key.body["id"].as_str().unwrap()), "read".into(), "expired".into()]
    );
}

/// A self-signed certificate for 127.0.0.1: (cert.pem, key.pem).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut openssl = KillOnDrop(
        Command::new("/usr/bin/openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", path_str(&key), "-out", path_str(&cert)])
            .args(["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl"),
    );
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = openssl.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "openssl req did not finish within {COMMAND_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success() && cert.exists() && key.exists(), "openssl req: {status}");
    (cert, key)
}

/// What `curl` got.
#[derive(Debug)]
struct Curled {
    exit: ExitStatus,
    /// "000" if no HTTP answer came.
    status: String,
    /// "1.1", "2", or "0" if no HTTP answer came.
    version: String,
    body: String,
}

/// `curl -sk URL` with extra args. Bounded by curl's own --max-time, and
/// killed past it.
fn curl(url: &str, extra: &[&str]) -> Curled {
    let mut body = tempfile::tempfile().unwrap();
    let mut child = KillOnDrop(
        Command::new("/usr/bin/curl")
            .args(["-sk", "--max-time", "2", "-w", "\n%{http_version} %{http_code}"])
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(body.try_clone().unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("run curl"),
    );
    let deadline = Instant::now() + Duration::from_secs(4);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "curl {url} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = read_all(&mut body);
    let (body, last) = out.rsplit_once('\n').unwrap_or(("", &out));
    let (version, code) = last.split_once(' ').unwrap_or(("", last));
    Curled { exit: status, status: code.to_owned(), version: version.to_owned(), body: body.to_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_speaks_https_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_key = new_key(&data, "admin", &[]);
    let (cert, key) = self_signed(dir.path());

    // A missing certificate: refused, naming the file.
    let missing = dir.path().join("no-such-cert.pem");
    let port = free_port();
    let flags = ["--tls-cert", path_str(&missing), "--tls-key", path_str(&key)];
    let refused = serve_refused(&data, &format!("127.0.0.1:{port}"), port, &flags);
    assert!(refused.stderr.contains(path_str(&missing)) && refused.stderr.contains("no such file"), "{refused:?}");

    let port = free_port();
    let https = format!("https://127.0.0.1:{port}");
    let flags = ["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)];
    let mut server = Server::spawn(&data, &format!("127.0.0.1:{port}"), https.clone(), &flags);
    let deadline = Instant::now() + SERVER_LIMIT;
    let ready = loop {
        server.check_running();
        let ready = curl(&format!("{https}/readyz"), &["--http1.1"]);
        if ready.exit.success() && ready.status == "200" {
            break ready;
        }
        assert!(Instant::now() < deadline, "no HTTPS answer within {SERVER_LIMIT:?}: {ready:?}");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(ready.version, "1.1", "{ready:?}");
    assert_eq!(serde_json::from_str::<Value>(&ready.body).unwrap(), json!({"status": "ready", "auth": "api_keys"}));
    let h2 = curl(&format!("{https}/readyz"), &["--http2"]);
    assert_eq!((h2.status.as_str(), h2.version.as_str()), ("200", "2"), "HTTP/2 by ALPN: {h2:?}");
    let nobody = curl(&format!("{https}/v1/accounts"), &[]);
    assert_eq!(nobody.status, "401", "keys are checked over HTTPS too: {nobody:?}");
    let bearer = format!("Authorization: Bearer {admin_key}");
    let admin = curl(&format!("{https}/v1/accounts"), &["-H", &bearer]);
    assert_eq!(admin.status, "200", "{admin:?}");
    assert_eq!(serde_json::from_str::<Value>(&admin.body).unwrap()["data"], json!([]), "{admin:?}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer); // EOF, reset or timeout: all fine, if no HTTP came
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP got an HTTP answer: {:?}", String::from_utf8_lossy(&answer));
    let plain = anonymous().get(format!("http://127.0.0.1:{port}/readyz")).send().await;
    assert!(plain.is_err(), "plain HTTP got an HTTP answer: {plain:?}");
    server.check_running();
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_stays_on_loopback_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_key = new_key(&data, "admin", &[]);

    let port = free_port();
    let refused = serve_refused(&data, &format!("0.0.0.0:{port}"), port, &[]);
    assert!(refused.stderr.contains(&format!("refusing to serve plain HTTP on 0.0.0.0:{port}")), "{refused:?}");
    assert!(refused.stderr.contains("not a loopback address"), "{refused:?}");
    assert!(refused.stderr.contains("--tls-cert") && refused.stderr.contains("--allow-plain-http"), "{refused:?}");

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Server::spawn(&data, &format!("0.0.0.0:{port}"), base.clone(), &["--allow-plain-http"]);
    assert_eq!(server.ready().await["auth"], "api_keys");
    assert_eq!(get(&client(&admin_key), &format!("{base}/v1/accounts")).await.status, 200);
    assert_unauthorized(&get(&anonymous(), &format!("{base}/v1/accounts")).await, "needs an API key");
    server.terminate();
}
