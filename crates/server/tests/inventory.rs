//! SKUs, reservations and flash sales through the HTTP API, black-box:
//! every endpoint and code, who may do what, and racing buyers for the
//! last units of a flash sale over real connections.

mod common;

use std::sync::Arc;

use common::{client_with_key, create_key, open_engine, Answer, Running};
use serde_json::{json, Value};

struct Api {
    server: Running,
}

impl Api {
    async fn send(&self, client: &reqwest::Client, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut request = client.request(method.parse().unwrap(), self.server.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        Answer::read(request.send().await.unwrap()).await
    }
}

fn sku(id: &str, stock: u64) -> Value {
    json!({"id": id, "title": "Phone", "price": 99900, "currency": "CNY", "stock": stock})
}

fn sale(id: &str, sku_id: &str, quantity: u64, starts_at: &str, ends_at: &str) -> Value {
    json!({"id": id, "sku_id": sku_id, "price": 100, "quantity": quantity, "starts_at": starts_at,
           "ends_at": ends_at, "per_buyer_limit": 1})
}

const PAST: &str = "2020-01-01T00:00:00Z";
const FUTURE: &str = "2099-01-01T00:00:00Z";

fn app_client(key: &str, buyer: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    headers.insert("x-buyer-id", buyer.parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skus_reservations_and_flash_sales_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let admin = client_with_key(&create_key(dir.path(), "admin").await);
    let m1 = client_with_key(&create_key(dir.path(), "merchant:m1").await);
    let m2 = client_with_key(&create_key(dir.path(), "merchant:m2").await);
    let app_key = create_key(dir.path(), "app").await;
    let (b1, b2) = (app_client(&app_key, "b1"), app_client(&app_key, "b2"));
    let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
    let api = Api { server: Running::start(engine, common::loopback_config(dir.path())).await };

    // SKUs: a merchant key creates its own; repeats are idempotent.
    let created = api.send(&m1, "POST", "/v1/skus", Some(sku("phone", 5))).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.body["merchant_id"], "m1");
    assert_eq!((created.body["available"].as_u64(), created.body["sold"].as_u64()), (Some(5), Some(0)));
    assert_eq!(api.send(&m1, "POST", "/v1/skus", Some(sku("phone", 5))).await.status, 200);
    api.send(&m1, "POST", "/v1/skus", Some(sku("phone", 6))).await.assert_problem(
        409,
        "exists_with_different_fields",
        "same id, other stock",
    );
    let mut other = sku("case", 1);
    other["merchant_id"] = json!("m2");
    assert_eq!(api.send(&m1, "POST", "/v1/skus", Some(other.clone())).await.status, 403);
    assert_eq!(api.send(&admin, "POST", "/v1/skus", Some(other)).await.status, 201);
    api.send(&admin, "POST", "/v1/skus", Some(sku("nobody", 1))).await.assert_problem(
        400,
        "invalid_request",
        "admin without merchant_id",
    );
    let mut bad = sku("bad", 1);
    bad["price"] = json!(0);
    bad["merchant_id"] = json!("m1");
    api.send(&admin, "POST", "/v1/skus", Some(bad)).await.assert_problem(400, "invalid_request", "price 0");
    assert_eq!(api.send(&b1, "POST", "/v1/skus", Some(sku("x", 1))).await.status, 403);

    // A merchant sees and changes only its own SKUs.
    api.send(&m2, "GET", "/v1/skus/phone", None).await.assert_problem(404, "sku_not_found", "another merchant's");
    api.send(&m2, "POST", "/v1/skus/phone/restock", Some(json!({"quantity": 1}))).await.assert_problem(
        404,
        "sku_not_found",
        "restock another merchant's",
    );
    let listed = api.send(&m2, "GET", "/v1/skus", None).await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1, "{}", listed.text());
    assert_eq!(listed.body["data"][0]["id"], "case");
    let all = api.send(&admin, "GET", "/v1/skus?limit=1", None).await;
    assert_eq!((all.body["data"][0]["id"].as_str(), all.body["next"].as_str()), (Some("case"), Some("case")));
    let rest = api.send(&admin, "GET", "/v1/skus?after=case", None).await;
    assert_eq!(rest.body["data"][0]["id"], "phone");
    api.send(&admin, "GET", "/v1/skus?color=red", None).await.assert_problem(
        400,
        "invalid_request",
        "unknown parameter",
    );
    let restocked = api.send(&m1, "POST", "/v1/skus/phone/restock", Some(json!({"quantity": 5}))).await;
    assert_eq!(restocked.body["stock"], 10, "{}", restocked.text());
    api.send(&admin, "GET", "/v1/skus/nope", None).await.assert_problem(404, "sku_not_found", "missing SKU");

    // Reservations: an app key reserves for its buyer.
    let held = api.send(&b1, "POST", "/v1/reservations", Some(json!({"sku_id": "phone", "quantity": 2}))).await;
    assert_eq!(held.status, 201, "{}", held.text());
    assert_eq!((held.body["buyer_id"].as_str(), held.body["state"].as_str()), (Some("b1"), Some("reserved")));
    assert_eq!(held.body["amount"], 199800);
    let rid = held.body["id"].as_str().unwrap().to_owned();
    let for_other = json!({"sku_id": "phone", "quantity": 1, "buyer_id": "b2"});
    assert_eq!(api.send(&b1, "POST", "/v1/reservations", Some(for_other)).await.status, 403);
    api.send(&b1, "POST", "/v1/reservations", Some(json!({"sku_id": "phone", "quantity": 11}))).await.assert_problem(
        422,
        "out_of_stock",
        "more than available",
    );
    api.send(&b1, "POST", "/v1/reservations", Some(json!({"sku_id": "nope", "quantity": 1}))).await.assert_problem(
        404,
        "sku_not_found",
        "reserve a missing SKU",
    );
    api.send(&b2, "GET", &format!("/v1/reservations/{rid}"), None).await.assert_problem(
        404,
        "reservation_not_found",
        "another buyer's reservation",
    );
    assert_eq!(api.send(&m1, "GET", &format!("/v1/reservations/{rid}"), None).await.status, 200);
    let confirmed = api.send(&b1, "POST", &format!("/v1/reservations/{rid}/confirm"), None).await;
    assert_eq!(confirmed.body["state"], "confirmed", "{}", confirmed.text());
    api.send(&b1, "POST", &format!("/v1/reservations/{rid}/cancel"), None).await.assert_problem(
        422,
        "reservation_confirmed",
        "cancel after confirm",
    );
    let phone = api.send(&m1, "GET", "/v1/skus/phone", None).await;
    assert_eq!((phone.body["sold"].as_u64(), phone.body["available"].as_u64()), (Some(2), Some(8)));
    api.send(&admin, "GET", "/v1/reservations/rsv_1_999", None).await.assert_problem(
        404,
        "reservation_not_found",
        "an unknown reservation",
    );

    // Flash sales: each phase answers its code.
    api.send(&m2, "POST", "/v1/flash-sales", Some(sale("f0", "phone", 1, PAST, FUTURE))).await.assert_problem(
        404,
        "sku_not_found",
        "a sale on another merchant's SKU",
    );
    api.send(&m1, "POST", "/v1/flash-sales", Some(sale("f0", "phone", 9, PAST, FUTURE))).await.assert_problem(
        422,
        "out_of_stock",
        "more units than available",
    );
    api.send(&m1, "POST", "/v1/flash-sales", Some(sale("f0", "phone", 1, FUTURE, PAST))).await.assert_problem(
        400,
        "invalid_request",
        "ends before it starts",
    );
    let later =
        api.send(&m1, "POST", "/v1/flash-sales", Some(sale("later", "phone", 1, FUTURE, "2099-01-02T00:00:00Z"))).await;
    assert_eq!((later.status, later.body["state"].as_str()), (201, Some("scheduled")), "{}", later.text());
    api.send(&b1, "POST", "/v1/flash-sales/later/attempts", Some(json!({"quantity": 1}))).await.assert_problem(
        422,
        "sale_not_started",
        "before starts_at",
    );
    let live = api.send(&m1, "POST", "/v1/flash-sales", Some(sale("f1", "phone", 2, PAST, FUTURE))).await;
    assert_eq!((live.status, live.body["state"].as_str()), (201, Some("live")), "{}", live.text());
    let won = api.send(&b1, "POST", "/v1/flash-sales/f1/attempts", Some(json!({"quantity": 1}))).await;
    assert_eq!((won.status, won.body["flash_sale_id"].as_str()), (201, Some("f1")), "{}", won.text());
    assert_eq!(won.body["unit_price"], 100);
    api.send(&b1, "POST", "/v1/flash-sales/f1/attempts", Some(json!({"quantity": 1}))).await.assert_problem(
        422,
        "purchase_limit_exceeded",
        "a second unit for b1",
    );
    assert_eq!(api.send(&b2, "POST", "/v1/flash-sales/f1/attempts", Some(json!({"quantity": 1}))).await.status, 201);
    let b3 = app_client(&app_key, "b3");
    api.send(&b3, "POST", "/v1/flash-sales/f1/attempts", Some(json!({"quantity": 1}))).await.assert_problem(
        422,
        "sold_out",
        "after the last unit",
    );
    api.send(&b3, "POST", "/v1/flash-sales/nope/attempts", Some(json!({"quantity": 1}))).await.assert_problem(
        404,
        "flash_sale_not_found",
        "an unknown sale",
    );
    api.send(&b3, "POST", "/v1/flash-sales/f1/attempts", Some(json!({"quantity": 0}))).await.assert_problem(
        400,
        "invalid_request",
        "quantity 0",
    );
    let f1 = api.send(&b3, "GET", "/v1/flash-sales/f1", None).await;
    assert_eq!(
        (f1.body["state"].as_str(), f1.body["remaining"].as_u64(), f1.body["reserved"].as_u64()),
        (Some("sold_out"), Some(0), Some(2)),
        "{}",
        f1.text()
    );
    let phone = api.send(&m1, "GET", "/v1/skus/phone", None).await;
    assert_eq!(phone.body["on_flash_sale"], 1, "the scheduled sale's unit: {}", phone.text());
    let audit = api.send(&admin, "GET", "/v1/audit?action=flash_sale.create", None).await;
    assert_eq!(audit.body["data"].as_array().map(Vec::len), Some(2), "{}", audit.text());
    api.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_buyers_over_http_buy_exactly_the_units_on_sale() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
    let api = Arc::new(Api { server: Running::start(engine, common::insecure_config(dir.path())).await });
    let admin = reqwest::Client::new();
    let mut hot = sku("hot", 100);
    hot["merchant_id"] = json!("m1");
    assert_eq!(api.send(&admin, "POST", "/v1/skus", Some(hot)).await.status, 201);
    let mut f = sale("hot-sale", "hot", 25, PAST, FUTURE);
    f["per_buyer_limit"] = json!(2);
    assert_eq!(api.send(&admin, "POST", "/v1/flash-sales", Some(f)).await.status, 201);
    // 40 buyers, each trying 3 times for one unit, at once.
    let mut tasks = Vec::new();
    for buyer in 0..40 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut codes = Vec::new();
            for _ in 0..3 {
                let body = json!({"buyer_id": format!("b{buyer}"), "quantity": 1});
                let answer = api.send(&client, "POST", "/v1/flash-sales/hot-sale/attempts", Some(body)).await;
                codes.push(if answer.status == 201 { "won".to_owned() } else { answer.code().to_owned() });
            }
            (buyer, codes)
        }));
    }
    let mut won = 0;
    for task in tasks {
        let (buyer, codes) = task.await.unwrap();
        let mine = codes.iter().filter(|c| *c == "won").count();
        assert!(mine <= 2, "buyer {buyer} got {mine} units: {codes:?}");
        assert!(
            codes.iter().all(|c| ["won", "sold_out", "purchase_limit_exceeded"].contains(&c.as_str())),
            "{codes:?}"
        );
        won += mine;
    }
    assert_eq!(won, 25, "exactly the units on sale are sold");
    let f = api.send(&admin, "GET", "/v1/flash-sales/hot-sale", None).await;
    assert_eq!((f.body["reserved"].as_u64(), f.body["remaining"].as_u64()), (Some(25), Some(0)));
    let sku = api.send(&admin, "GET", "/v1/skus/hot", None).await;
    assert_eq!((sku.body["reserved"].as_u64(), sku.body["available"].as_u64()), (Some(25), Some(75)));
    Arc::try_unwrap(api).ok().unwrap().server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_sold_out_is_not_remembered_so_its_retry_can_win_a_unit_that_came_back() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path(), 8, 2, 1 << 20, 1 << 30);
    let api = Api { server: Running::start(engine, common::insecure_config(dir.path())).await };
    let client = reqwest::Client::new();
    let mut one = sku("one", 1);
    one["merchant_id"] = json!("m1");
    assert_eq!(api.send(&client, "POST", "/v1/skus", Some(one)).await.status, 201);
    assert_eq!(api.send(&client, "POST", "/v1/flash-sales", Some(sale("f", "one", 1, PAST, FUTURE))).await.status, 201);
    let won =
        api.send(&client, "POST", "/v1/flash-sales/f/attempts", Some(json!({"buyer_id": "b1", "quantity": 1}))).await;
    let reservation = won.body["id"].as_str().unwrap().to_owned();
    let keyed = |key: &'static str| {
        let request = client
            .post(api.server.url("/v1/flash-sales/f/attempts"))
            .header("idempotency-key", key)
            .json(&json!({"buyer_id": "b2", "quantity": 1}));
        async move { Answer::read(request.send().await.unwrap()).await }
    };
    keyed("late-1").await.assert_problem(422, "sold_out", "the last unit is reserved");
    let cancelled = api.send(&client, "POST", &format!("/v1/reservations/{reservation}/cancel"), None).await;
    assert_eq!(cancelled.body["state"], "cancelled", "{}", cancelled.text());
    let retry = keyed("late-1").await;
    assert_eq!(retry.status, 201, "the retry is judged again: {}", retry.text());
    let again = keyed("late-1").await;
    assert_eq!((again.status, again.body["id"].clone()), (201, retry.body["id"].clone()), "a win is remembered");
    api.server.stop().await;
}
