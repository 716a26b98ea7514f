//! The real `peakstack serve` process over HTTP, black-box: the answers a
//! client sees, idempotency across a graceful restart (SIGTERM), and that a
//! refused request changes nothing. The full matrix of error codes and bad
//! inputs runs against the same server code in `crates/server/tests/http.rs`.

mod common;

use common::{client, create_key, free_port, start, terminate, wait_ready};
use serde_json::Value;

struct Answer {
    status: u16,
    content_type: String,
    body: Value,
    raw: String,
}

async fn call(client: &reqwest::Client, method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> Answer {
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url).header("content-type", "application/json"),
    };
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let raw = response.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Answer { status, content_type, body, raw }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_ledger_and_keeps_idempotency_keys_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = client(&create_key(dir.path(), "admin"));
    let server = start(dir.path(), port, &[]);
    wait_ready(&client, &base).await;

    let accounts = format!("{base}/v1/accounts");
    let transfers = format!("{base}/v1/transfers");
    let alice = r#"{"id":"alice","currency":"USD","flags":["debits_must_not_exceed_credits"]}"#;
    assert_eq!(call(&client, "POST", &accounts, Some(alice), None).await.status, 201);
    assert_eq!(call(&client, "POST", &accounts, Some(alice), None).await.status, 200, "same account again");
    assert_eq!(call(&client, "POST", &accounts, Some(r#"{"id":"bob","currency":"USD"}"#), None).await.status, 201);

    let fund = r#"{"id":"t1","debit_account_id":"bob","credit_account_id":"alice","amount":10000,"currency":"USD"}"#;
    let first = call(&client, "POST", &transfers, Some(fund), Some("fund-1")).await;
    assert_eq!(first.status, 201, "{}", first.raw);
    assert_eq!(first.body["balances"]["credit_account"]["credits_posted"], "10000");

    // Refusals: problem+json with a stable code, and nothing changes.
    let before = call(&client, "GET", &format!("{accounts}?limit=100"), None, None).await.raw;
    let refusals = [
        (
            r#"{"id":"t2","debit_account_id":"alice","credit_account_id":"bob","amount":10001,"currency":"USD"}"#,
            422,
            "exceeds_credits",
        ),
        (
            r#"{"id":"t3","debit_account_id":"alice","credit_account_id":"bob","amount":1.5,"currency":"USD"}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"id":"t4","debit_account_id":"alice","credit_account_id":"nobody","amount":1,"currency":"USD"}"#,
            404,
            "account_not_found",
        ),
        (
            r#"{"id":"t1","debit_account_id":"bob","credit_account_id":"alice","amount":9,"currency":"USD"}"#,
            409,
            "exists_with_different_fields",
        ),
        (
            r#"{"id":"t5","debit_account_id":"alice","credit_account_id":"bob","amount":1,"currency":"EUR"}"#,
            422,
            "currency_mismatch",
        ),
        (r#"not json"#, 400, "invalid_request"),
    ];
    for (body, status, code) in refusals {
        let answer = call(&client, "POST", &transfers, Some(body), None).await;
        assert_eq!((answer.status, answer.body["code"].as_str()), (status, Some(code)), "{body}: {}", answer.raw);
        assert!(answer.content_type.starts_with("application/problem+json"), "{}", answer.content_type);
    }
    let after = call(&client, "GET", &format!("{accounts}?limit=100"), None, None).await.raw;
    assert_eq!(before, after, "refused requests changed balances");
    let missing = call(&client, "GET", &format!("{base}/v1/nothing-here"), None, None).await;
    assert_eq!((missing.status, missing.body["code"].as_str()), (404, Some("not_found")));

    // A graceful restart keeps everything, idempotency keys included.
    terminate(server);
    let server = start(dir.path(), port, &[]);
    wait_ready(&client, &base).await;
    let replay = call(&client, "POST", &transfers, Some(fund), Some("fund-1")).await;
    assert_eq!((replay.status, &replay.raw), (201, &first.raw), "the first answer, byte for byte");
    let reused = call(&client, "POST", &transfers, Some(&fund.replace("10000", "5")), Some("fund-1")).await;
    assert_eq!((reused.status, reused.body["code"].as_str()), (422, Some("idempotency_key_reused")));
    let alice_now = call(&client, "GET", &format!("{accounts}/alice"), None, None).await;
    assert_eq!(alice_now.body["credits_posted"], "10000", "the replay moved no money");
    terminate(server);
}
