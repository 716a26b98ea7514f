//! The API contract over real HTTP on 127.0.0.1: what every answer looks
//! like, which requests are refused before any route runs, what details
//! say, what the OpenAPI document promises, and what /metrics exports.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{insecure_config, open_engine, Answer, Running};
use peakstack_domain::ErrorCode;
use peakstack_server::{api_query_parameters, api_routes, ApiError, OPENAPI_JSON};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_AMOUNT: u64 = (1 << 53) - 1;
/// Longest any single wait in these tests may take.
const BOUND: Duration = Duration::from_secs(5);

struct TestServer {
    server: Running,
    client: reqwest::Client,
}

impl TestServer {
    async fn start(dir: &Path) -> TestServer {
        let engine = open_engine(dir, 4, 1, 1000, 1 << 20);
        TestServer { server: Running::start(engine, insecure_config(dir)).await, client: reqwest::Client::new() }
    }

    async fn stop(self) {
        self.server.stop().await;
    }

    async fn send(&self, method: &str, path: &str, body: Option<&[u8]>, headers: &[(&str, &str)]) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::read(tokio::time::timeout(BOUND, request.send()).await.unwrap().unwrap()).await
    }

    async fn post_json(&self, path: &str, body: &[u8]) -> Answer {
        self.send("POST", path, Some(body), &[("content-type", "application/json")]).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None, &[]).await
    }

    async fn setup_accounts(&self) {
        for id in ["a", "b"] {
            let body = serde_json::to_vec(&json!({"id": id, "currency": "USD"})).unwrap();
            assert_eq!(self.post_json("/v1/accounts", &body).await.status, 201);
        }
    }

    /// Writes `bytes` on a fresh connection and reads to its close.
    async fn raw_tcp(&self, bytes: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.server.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(BOUND, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
        String::from_utf8(answer).unwrap()
    }
}

fn transfer_text(amount: &str) -> Vec<u8> {
    format!(r#"{{"id":"t1","debit_account_id":"a","credit_account_id":"b","amount":{amount},"currency":"USD"}}"#)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn details_name_the_field_and_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.setup_accounts().await;
    let rule = format!("amount: must be an integer from 1 to {MAX_AMOUNT}");
    let batch = |item: &[u8]| {
        let mut body =
            br#"{"transfers":[{"id":"t9","debit_account_id":"a","credit_account_id":"b","amount":1,"currency":"USD"},"#
                .to_vec();
        body.extend_from_slice(item);
        body.extend_from_slice(b"]}");
        body
    };
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("/v1/transfers", transfer_text("-1"), format!("{rule}, got -1")),
        (
            "/v1/transfers",
            transfer_text("18446744073709551616"),
            format!("{rule}, got a number too large (1.8446744073709552e+19)"),
        ),
        ("/v1/transfers", transfer_text("1.5"), format!("{rule}, got the fraction 1.5")),
        ("/v1/transfers", transfer_text("\"5\""), format!("{rule}, got the string \"5\"")),
        ("/v1/transfers", transfer_text("true"), format!("{rule}, got true")),
        (
            "/v1/transfers",
            transfer_text(&(MAX_AMOUNT + 1).to_string()),
            format!("amount: must be an integer from 1 to 2^53-1 ({MAX_AMOUNT}), got {}", MAX_AMOUNT + 1),
        ),
        (
            "/v1/transfers",
            br#"{"id":"t1","debit_account_id":"a","credit_account_id":"b","currency":"USD"}"#.to_vec(),
            "amount: is required".to_owned(),
        ),
        (
            "/v1/transfers",
            br#"{"id":"t1","debit_account_id":"a","credit_account_id":"b","amount":1,"currency":"USD","at":1}"#
                .to_vec(),
            "at: is not a field of this request (the fields are id, debit_account_id, credit_account_id, amount, \
             currency, pending, timeout_ms, metadata, reference)"
                .to_owned(),
        ),
        ("/v1/transfers", br#"{"id":"t1","#.to_vec(), "the body is not valid JSON: it ends too early".to_owned()),
        ("/v1/transfers", b"[]".to_vec(), "the body: must be a JSON object, got an array".to_owned()),
        ("/v1/transfers/batch", batch(&transfer_text("-3")), format!("transfers[1].{rule}, got -3")),
        ("/v1/transfers/batch", batch(b"{}"), "transfers[1].id: is required".to_owned()),
        ("/v1/transfers/batch", batch(b"7"), "transfers[1]: must be a JSON object, got a number".to_owned()),
        (
            "/v1/transfers/batch",
            br#"{"transfers":[],"atomic":"yes"}"#.to_vec(),
            "atomic: must be true or false, got the string \"yes\"".to_owned(),
        ),
        (
            "/v1/accounts",
            br#"{"id":"c","currency":"USD","overdraft_limit":-1}"#.to_vec(),
            format!("overdraft_limit: must be an integer from 0 to {}, got -1", u64::MAX),
        ),
        ("/v1/transfers/p/post", br#"{"id":"x","amount":0.5}"#.to_vec(), format!("{rule}, got the fraction 0.5")),
    ];
    for (path, body, expected) in cases {
        let answer = s.post_json(path, &body).await;
        let context = format!("POST {path} {}", String::from_utf8_lossy(&body));
        answer.assert_problem(400, "invalid_request", &context);
        assert!(
            answer.detail().starts_with(&expected),
            "{context}: {:?} does not start with {expected:?}",
            answer.detail()
        );
        assert!(
            !answer.detail().contains("deserialize") && !answer.detail().contains("u64"),
            "{context}: {}",
            answer.text()
        );
    }
    assert_eq!(s.get("/v1/transfers/t1").await.status, 404, "no refused request made a transfer");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_json_bodies_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.setup_accounts().await;
    let body = transfer_text("1");
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/vnd.api+json"),
        Some("application/json; charset=latin1"),
        Some("application/jsonx"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = content_type.iter().map(|c| ("content-type", *c)).collect();
        let answer = s.send("POST", "/v1/transfers", Some(&body), &headers).await;
        answer.assert_problem(415, "unsupported_media_type", &format!("{content_type:?}"));
    }
    // A 415 is not remembered under its Idempotency-Key: the same request
    // with a JSON content type is then answered for real.
    let keyed = [("content-type", "text/plain"), ("idempotency-key", "k-415")];
    s.send("POST", "/v1/transfers", Some(&body), &keyed).await.assert_problem(415, "unsupported_media_type", "keyed");
    let keyed = [("content-type", "Application/JSON; Charset=\"UTF-8\""), ("idempotency-key", "k-415")];
    let answer = s.send("POST", "/v1/transfers", Some(&body), &keyed).await;
    assert_eq!(answer.status, 201, "{}", answer.text());
    s.stop().await;
}

/// The route's path with every `{param}` filled.
fn concrete(path: &str) -> String {
    path.replace("{id}", "a")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_query_parameters_are_refused_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.setup_accounts().await;
    for (method, path) in api_routes() {
        let body = (method == "POST").then_some(&b"{}"[..]);
        let headers = [("content-type", "application/json")];
        for query in ["at=2027-01-01T00:00:00Z", "at=1&limit=1", "a%74=1"] {
            let target = format!("{}?{query}", concrete(path));
            let answer = s.send(method, &target, body, &headers).await;
            let context = format!("{method} {target}");
            answer.assert_problem(400, "invalid_request", &context);
            assert!(answer.detail().starts_with("at: unknown query parameter"), "{context}: {}", answer.text());
        }
    }
    let answer = s.get("/v1/accounts?limit=1&limit=2").await;
    answer.assert_problem(400, "invalid_request", "a repeated parameter");
    assert_eq!(answer.detail(), "limit: given more than once");
    // A method the path does not have is 405 whatever the query.
    let answer = s.send("PATCH", "/v1/accounts?limit=1&at=1", None, &[]).await;
    answer.assert_problem(405, "method_not_allowed", "PATCH with a query");
    // What a route takes still works, and nothing else answered as if it had.
    assert_eq!(s.get("/v1/accounts?limit=1").await.status, 200);
    assert_eq!(s.get("/v1/accounts/a?").await.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_refuses_are_problems_and_router_answers_pass_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    let big = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(40 * 1024));
    for (head, status, code) in [
        (big.as_str(), 431u16, "request_header_fields_too_large"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n", 400, "invalid_request"),
        ("NOT HTTP\r\n\r\n", 400, "invalid_request"),
        (
            "POST /v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
            "invalid_request",
        ),
    ] {
        let answer = s.raw_tcp(head.as_bytes()).await;
        let (head_text, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(head_text.get(9..12), Some(status.to_string().as_str()), "{answer}");
        assert!(head_text.contains("content-type: application/problem+json"), "{answer}");
        assert!(head_text.contains("x-request-id: "), "{answer}");
        let problem: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{answer}"));
        assert_eq!((problem["status"].as_u64(), problem["code"].as_str()), (Some(u64::from(status)), Some(code)));
    }
    // A 400 of the router itself is left as it is.
    let answer = s.raw_tcp(b"GET /v1/accounts?limit=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(answer.contains("limit: must be an integer"), "{answer}");
    s.stop().await;
}

/// The codes the OpenAPI document lists in the Problem schema.
fn documented_codes(doc: &Value) -> BTreeSet<String> {
    doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
        .as_array()
        .expect("a code enum")
        .iter()
        .map(|code| code.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_openapi_code_enum_is_every_code_the_server_answers() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let documented = documented_codes(&doc);
    let produced: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|code| code.as_str().to_owned())
        .chain(ApiError::examples().iter().map(|error| error.code().to_owned()))
        .collect();
    let missing: Vec<_> = produced.difference(&documented).collect();
    assert!(missing.is_empty(), "codes the server answers but openapi.json does not list: {missing:?}");
    let extra: Vec<_> = documented.difference(&produced).collect();
    assert!(extra.is_empty(), "codes openapi.json lists but the server never answers: {extra:?}");
    // Every status an error can have is described somewhere in the document.
    for error in ApiError::examples() {
        // 405 answers a method a path does not have: no operation to put it on.
        if matches!(error, ApiError::MethodNotAllowed(_)) {
            continue;
        }
        let status = error.status().as_u16().to_string();
        let documented = doc["paths"].as_object().unwrap().values().any(|operations| {
            operations.as_object().unwrap().values().any(|operation| operation["responses"].get(&status).is_some())
        });
        assert!(documented, "status {status} ({}) is on no route of openapi.json", error.code());
    }
}

#[test]
fn the_openapi_query_parameters_are_the_ones_each_route_takes() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let parameters = &doc["components"]["parameters"];
    for (method, path, taken) in api_query_parameters() {
        let operation = &doc["paths"][path][method.to_lowercase()];
        let documented: BTreeSet<String> = operation["parameters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|parameter| match parameter["$ref"].as_str() {
                Some(reference) => &parameters[reference.rsplit('/').next().unwrap()],
                None => parameter,
            })
            .filter(|parameter| parameter["in"] == "query")
            .map(|parameter| parameter["name"].as_str().unwrap().to_owned())
            .collect();
        let taken: BTreeSet<String> = taken.iter().map(|name| (*name).to_owned()).collect();
        assert_eq!(documented, taken, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_ledger_results_and_replays_as_counters() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.setup_accounts().await;
    let keyed = [("content-type", "application/json"), ("idempotency-key", "replayed")];
    for _ in 0..2 {
        assert!(s.send("POST", "/v1/transfers", Some(&transfer_text("1")), &keyed).await.status < 300);
    }
    let refused = br#"{"id":"t2","debit_account_id":"a","credit_account_id":"a","amount":1,"currency":"USD"}"#;
    s.post_json("/v1/transfers", refused).await.assert_problem(422, "accounts_must_be_different", "same account");
    let text = s.get("/metrics").await.text();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{series} in {text}"))
    };
    // The process's recorder is shared by the tests in this binary: at least.
    assert!(value("peakstack_ledger_results_total{code=\"created\"}") >= 1.0, "{text}");
    assert!(value("peakstack_ledger_results_total{code=\"accounts_must_be_different\"}") >= 1.0, "{text}");
    assert!(value("peakstack_idempotent_replays_total") >= 1.0, "{text}");
    for series in ["peakstack_ledger_results_total", "peakstack_idempotent_replays_total"] {
        assert!(text.contains(&format!("# TYPE {series} counter\n")), "{series} in {text}");
        assert!(text.contains(&format!("# HELP {series} ")), "{series} in {text}");
    }
    s.stop().await;
}

#[test]
fn the_openapi_currencies_are_the_ones_the_ledger_moves() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let documented: BTreeSet<String> = doc["components"]["schemas"]["Currency"]["enum"]
        .as_array()
        .expect("a currency enum")
        .iter()
        .map(|code| code.as_str().unwrap().to_owned())
        .collect();
    let letters = b'A'..=b'Z';
    let moved: BTreeSet<String> = letters
        .clone()
        .flat_map(|a| letters.clone().flat_map(move |b| (b'A'..=b'Z').map(move |c| [a, b, c])))
        .map(|code| String::from_utf8(code.to_vec()).unwrap())
        .filter(|code| peakstack_domain::Currency::parse(code).is_some())
        .collect();
    assert_eq!(documented, moved);
}

#[test]
fn the_openapi_audit_actions_are_the_ones_recorded() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let action = doc["paths"]["/v1/audit"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|parameter| parameter["name"] == "action")
        .expect("an action parameter");
    let documented: Vec<&str> =
        action["schema"]["enum"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(documented, peakstack_server::audit::action::ALL);
}
