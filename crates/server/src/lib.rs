//! peakstack's HTTP/JSON API.
//!
//! The outer layer of the system: it speaks HTTP and JSON, knows the wire
//! format, and owns nothing of the ledger. Every handler parses and
//! validates, calls the [`Engine`], and maps the result; every error is one
//! [`ApiError`] rendered as `application/problem+json` with a stable `code`.
//!
//! One middleware runs, in this order: an `X-Request-Id` for every request,
//! a tracing span carrying it, and its metrics; [`access::admit`] checks
//! the API key against the [`access::Access`] the route declares in the
//! route table (before anything else runs); the POST guard bounds bodies
//! (64 KiB, 4 MiB for a batch) and implements `Idempotency-Key` over a
//! durable redb store (`<data_dir>/idempotency.redb`, see [`idempotency`]);
//! innermost, a panic becomes a 500 problem.
//!
//! Running a server: [`serve`] binds `config.listen` and serves until the
//! shutdown future resolves. Tests that need the port bind first:
//!
//! ```no_run
//! # async fn demo(engine: peakstack_engine::Engine) -> anyhow::Result<()> {
//! use peakstack_server::{Server, ServerConfig};
//! let config = ServerConfig::new("127.0.0.1:0".parse()?, "/tmp/data".into());
//! let server = Server::bind(config, engine.clone()).await?;
//! let addr = server.local_addr(); // the port the OS picked
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(server.run(async move { let _ = stopped.await; }));
//! // ... talk to http://{addr} ...
//! let _ = stop.send(());
//! task.await??; // drained and closed; now the engine may shut down
//! engine.shutdown();
//! # Ok(()) }
//! ```

pub mod access;
pub mod access_store;
mod account_status;
mod admin;
mod answer_json;
pub mod audit;
mod audit_feed;
mod audit_index;
mod audit_rows;
mod buffers;
mod checkout_api;
mod error;
mod framing;
mod handlers;
mod head_errors;
pub mod idempotency;
mod inventory_api;
mod json_errors;
pub mod keyed_outcomes;
pub mod keys;
pub mod listener;
mod observe;
mod post_guard;
mod pricing_api;
mod settlement_api;
mod transactions_api;
mod transfer_list;
mod wire;

/// Memory each of the server's redb files (`access.redb`, the idempotency
/// store) may use to cache pages. redb's default is 1 GiB each; both are
/// written far more than read, so the cache only grew, and every page it
/// grew by was fresh memory the kernel had to zero (under `loadtest
/// --batch 1000` that was 70% of the audit writer's time).
pub const REDB_CACHE_BYTES: usize = 64 << 20;

/// Opens (or creates) a redb file with the server's cache bound.
fn open_redb(path: &std::path::Path) -> Result<redb::Database, redb::DatabaseError> {
    redb::Builder::new().set_cache_size(REDB_CACHE_BYTES).create(path)
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;
use peakstack_domain::{Id, Owner};
use peakstack_engine::Engine;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use access::{Access, AuthMode, Principal, Scope, X_BUYER_ID};
pub use access_store::{AccessStore, AccessStoreError};
pub use admin::{parse_expiry, parse_rfc3339_ms, rfc3339};
pub use error::{ApiError, PROBLEM_JSON};
pub use handlers::{DEFAULT_PAGE_LIMIT, MAX_BATCH_TRANSFERS, MAX_PAGE_LIMIT, OPENAPI_JSON};
pub use idempotency::{IdempotencyStore, StoreError};
pub use listener::ConnectionLimits;
pub use observe::{metrics_handle, X_REQUEST_ID};
pub use post_guard::{BATCH_BODY_LIMIT_BYTES, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, SINGLE_BODY_LIMIT_BYTES};
pub use settlement_api::{credit_line_account_id, parse_settle_every, MAX_CREDIT_LINE_ENTRIES};
pub use wire::MAX_METADATA_BYTES;

/// File name of the idempotency database inside the data dir.
pub const IDEMPOTENCY_FILE: &str = "idempotency.redb";
/// File name of the keys and audit database inside the data dir.
pub const ACCESS_FILE: &str = "access.redb";
/// Most account owners the server remembers (owners never change, so the
/// cache is never stale; past the bound it starts over).
const MAX_CACHED_OWNERS: usize = 1 << 20;
/// How often histogram data is drained into the exporter when nobody scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where `idempotency.redb` and `access.redb` live (created if
    /// missing). May be the engine's data dir.
    pub data_dir: PathBuf,
    /// Whether API keys are checked. [`ServerConfig::new`] checks them.
    pub auth: AuthMode,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Serve plain HTTP on an address that is not loopback (behind a proxy
    /// that terminates TLS). Without it, plain HTTP is loopback only.
    pub allow_plain_http: bool,
    pub limits: ConnectionLimits,
    /// How long a request waits for the engine to decide; past it the
    /// answer is 503 `deadline_exceeded` ([`DEFAULT_REQUEST_DEADLINE`]).
    pub request_deadline: Duration,
    /// How long an `Idempotency-Key` is remembered
    /// ([`idempotency::DEFAULT_RETENTION`]).
    pub idempotency_retention: Duration,
    /// The platform's fee of a settlement that names none, in basis points (0 by default).
    pub settlement_fee_bps: u32,
    /// Settle every merchant with captured money this often (off by default).
    pub settle_every: Option<Duration>,
}

/// The default of [`ServerConfig::request_deadline`].
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// PEM files of a certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerConfig {
    /// Listens on `listen` (plain HTTP, so loopback only), keeps its files
    /// in `data_dir`, checks API keys, default connection limits.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            listen,
            data_dir,
            auth: AuthMode::ApiKeys,
            tls: None,
            allow_plain_http: false,
            limits: ConnectionLimits::default(),
            request_deadline: DEFAULT_REQUEST_DEADLINE,
            idempotency_retention: idempotency::DEFAULT_RETENTION,
            settlement_fee_bps: 0,
            settle_every: None,
        }
    }
}

/// Opens `<data_dir>/access.redb` on its own, for `peakstack keys` on a
/// stopped server.
pub fn open_access_store(data_dir: &Path) -> anyhow::Result<(AccessStore, Vec<keys::KeyRecord>)> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    Ok(AccessStore::open(&data_dir.join(ACCESS_FILE))?)
}

/// What the handlers share: the engine, the stores, the key ring, the
/// metrics handle and the readiness flag. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    idempotency: IdempotencyStore,
    access: Arc<AccessStore>,
    audit_feed: audit_feed::AuditFeed,
    recent_outcomes: keyed_outcomes::RecentOutcomes,
    keys: keys::KeyRing,
    auth: AuthMode,
    route_access: access::RouteAccess,
    owners: RwLock<std::collections::HashMap<Id, Option<Owner>>>,
    /// Key changes run one at a time (the last-admin check needs it).
    key_changes: tokio::sync::Mutex<()>,
    metrics: PrometheusHandle,
    ready: AtomicBool,
    request_deadline: Duration,
    settlement_fee_bps: u32,
}

impl AppState {
    /// Opens `<data_dir>/idempotency.redb` and `<data_dir>/access.redb`.
    /// Starts not ready: [`Server::run`] flips readiness on while it serves.
    pub fn new(engine: Engine, data_dir: &Path, auth: AuthMode) -> anyhow::Result<AppState> {
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        let path = data_dir.join(IDEMPOTENCY_FILE);
        let idempotency = IdempotencyStore::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let (access, records) = open_access_store(data_dir)?;
        let access = Arc::new(access);
        let keys = keys::KeyRing::new(records).map_err(|e| anyhow::anyhow!("{}: {e}", ACCESS_FILE))?;
        let recent_outcomes = keyed_outcomes::RecentOutcomes::new(&engine);
        let audit_feed = audit_feed::AuditFeed::start(&engine, access.clone())?;
        let route_access = access::RouteAccess::new(route_table().into_iter().map(|(m, p, a, _)| (m, p, a)));
        Ok(AppState {
            inner: Arc::new(Inner {
                engine,
                idempotency,
                access,
                audit_feed,
                recent_outcomes,
                keys,
                auth,
                route_access,
                owners: RwLock::new(std::collections::HashMap::new()),
                key_changes: tokio::sync::Mutex::new(()),
                metrics: metrics_handle(),
                ready: AtomicBool::new(false),
                request_deadline: DEFAULT_REQUEST_DEADLINE,
                settlement_fee_bps: 0,
            }),
        })
    }

    /// [`ServerConfig::request_deadline`].
    pub fn request_deadline(&self) -> Duration {
        self.inner.request_deadline
    }

    fn with_request_deadline(mut self, deadline: Duration) -> AppState {
        Arc::get_mut(&mut self.inner).expect("not shared yet").request_deadline = deadline;
        self
    }

    fn with_settlement_fee_bps(mut self, fee_bps: u32) -> AppState {
        Arc::get_mut(&mut self.inner).expect("not shared yet").settlement_fee_bps = fee_bps;
        self
    }

    /// The fee of a settlement that names none (`--settlement-fee-bps`).
    pub fn settlement_fee_bps(&self) -> u32 {
        self.inner.settlement_fee_bps
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.inner.idempotency
    }

    pub fn access_store(&self) -> &AccessStore {
        &self.inner.access
    }

    /// Keyed transfers answered but maybe not yet stored by the audit feed.
    pub fn recent_outcomes(&self) -> &keyed_outcomes::RecentOutcomes {
        &self.inner.recent_outcomes
    }

    pub fn keys(&self) -> &keys::KeyRing {
        &self.inner.keys
    }

    pub fn auth_mode(&self) -> AuthMode {
        self.inner.auth
    }

    pub(crate) fn key_changes(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.key_changes
    }

    pub(crate) fn route_access(&self) -> &access::RouteAccess {
        &self.inner.route_access
    }

    /// The owner of account `id`: `None` if there is no such account,
    /// `Some(None)` for a platform account.
    pub async fn owner_of(&self, id: &Id) -> Result<Option<Option<Owner>>, ApiError> {
        if let Some(owner) = self.inner.owners.read().get(id) {
            return Ok(Some(owner.clone()));
        }
        let Some(account) = self.engine().account(id).await.map_err(ApiError::ledger)? else { return Ok(None) };
        let mut owners = self.inner.owners.write();
        if owners.len() >= MAX_CACHED_OWNERS {
            owners.clear();
        }
        owners.insert(account.id, account.owner.clone());
        Ok(Some(account.owner))
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// What `GET /readyz` answers.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Closes the stores (after the operations already queued). Keyed POSTs
    /// and changes that need an audit record answer `unavailable` afterwards.
    pub async fn close(&self) {
        self.set_ready(false);
        self.inner.idempotency.close().await;
        self.inner.audit_feed.stop().await;
        self.inner.access.close().await;
    }
}

type Routes = Vec<(&'static str, &'static str, Access, MethodRouter<AppState>)>;

/// Every route: (method, path, who may call it, handler). The router and
/// the access check are built from this table, and the OpenAPI test checks
/// the document against it.
fn route_table() -> Routes {
    use handlers::*;
    use Access::*;
    vec![
        ("GET", "/healthz", Public, get(healthz)),
        ("GET", "/readyz", Public, get(readyz)),
        ("GET", "/metrics", Operations, get(metrics)),
        ("GET", "/openapi.json", Public, get(openapi)),
        ("POST", "/v1/accounts", Write, post(create_account)),
        ("GET", "/v1/accounts", Read, get(list_accounts)),
        ("GET", "/v1/accounts/{id}", Read, get(get_account)),
        ("GET", "/v1/accounts/{id}/transfers", Read, get(transfer_list::account_transfers)),
        ("POST", "/v1/accounts/{id}/freeze", Write, post(account_status::freeze_account)),
        ("POST", "/v1/accounts/{id}/unfreeze", Write, post(account_status::unfreeze_account)),
        ("POST", "/v1/accounts/{id}/close", Write, post(account_status::close_account)),
        ("POST", "/v1/transfers", Write, post(create_transfer)),
        ("GET", "/v1/transfers", Read, get(transfer_list::list_transfers)),
        ("POST", "/v1/transfers/batch", Write, post(create_batch)),
        ("GET", "/v1/transfers/{id}", Read, get(get_transfer)),
        ("POST", "/v1/transfers/{id}/post", Write, post(post_pending)),
        ("POST", "/v1/transfers/{id}/void", Write, post(void_pending)),
        ("POST", "/v1/keys", Admin, post(admin::create_key)),
        ("GET", "/v1/keys", Admin, get(admin::list_keys)),
        ("GET", "/v1/keys/{id}", Admin, get(admin::get_key)),
        ("DELETE", "/v1/keys/{id}", Admin, axum::routing::delete(admin::revoke_key)),
        ("GET", "/v1/audit", Admin, get(admin::audit)),
        ("POST", "/v1/skus", Write, post(inventory_api::create_sku)),
        ("GET", "/v1/skus", Read, get(inventory_api::list_skus)),
        ("GET", "/v1/skus/{id}", Read, get(inventory_api::get_sku)),
        ("POST", "/v1/skus/{id}/restock", Write, post(inventory_api::restock_sku)),
        ("POST", "/v1/reservations", Write, post(inventory_api::create_reservation)),
        ("GET", "/v1/reservations/{id}", Read, get(inventory_api::get_reservation)),
        ("POST", "/v1/reservations/{id}/confirm", Write, post(inventory_api::confirm_reservation)),
        ("POST", "/v1/reservations/{id}/cancel", Write, post(inventory_api::cancel_reservation)),
        ("POST", "/v1/flash-sales", Write, post(inventory_api::create_flash_sale)),
        ("GET", "/v1/flash-sales/{id}", Read, get(inventory_api::get_flash_sale)),
        ("POST", "/v1/flash-sales/{id}/attempts", Write, post(inventory_api::attempt_flash_sale)),
        ("POST", "/v1/promotions", Write, post(pricing_api::create_promotion)),
        ("GET", "/v1/promotions/{id}", Read, get(pricing_api::get_promotion)),
        ("POST", "/v1/coupon-templates", Write, post(pricing_api::create_coupon_template)),
        ("GET", "/v1/coupon-templates/{id}", Read, get(pricing_api::get_coupon_template)),
        ("POST", "/v1/coupon-templates/{id}/issue", Write, post(pricing_api::issue_coupon)),
        ("GET", "/v1/coupons", Read, get(pricing_api::list_coupons)),
        ("POST", "/v1/quotes", Read, post(pricing_api::create_quote)),
        ("POST", "/v1/checkouts", Write, post(checkout_api::create_checkout)),
        ("GET", "/v1/checkouts/{id}", Read, get(checkout_api::get_checkout)),
        ("GET", "/v1/orders", Read, get(checkout_api::list_orders)),
        ("GET", "/v1/orders/{id}", Read, get(checkout_api::get_order)),
        ("POST", "/v1/orders/{id}/cancel", Write, post(checkout_api::cancel_order)),
        ("POST", "/v1/orders/{id}/refunds", Write, post(checkout_api::create_refund)),
        ("GET", "/v1/payments/{id}", Read, get(checkout_api::get_payment)),
        ("POST", "/v1/payments/{id}/capture", Admin, post(checkout_api::capture_payment)),
        ("POST", "/v1/payments/{id}/cancel", Write, post(checkout_api::cancel_payment)),
        ("GET", "/v1/refunds/{id}", Read, get(checkout_api::get_refund)),
        ("GET", "/v1/transactions", Operations, get(transactions_api::list_transactions)),
        ("GET", "/v1/transactions/{id}", Operations, get(transactions_api::get_transaction)),
        // Settlements, credit lines and dead letters (settlement_api.rs).
        ("POST", "/v1/settlements", Admin, post(settlement_api::create_settlement)),
        ("GET", "/v1/settlements", Read, get(settlement_api::list_settlements)),
        ("GET", "/v1/settlements/{id}", Read, get(settlement_api::get_settlement)),
        ("GET", "/v1/credit-lines/{id}", Read, get(settlement_api::get_credit_line)),
        ("GET", "/v1/dead-letters", Operations, get(settlement_api::list_dead_letters)),
        ("POST", "/v1/dead-letters/{id}/replay", Admin, post(settlement_api::replay_dead_letter)),
    ]
}

/// The query parameters each route takes (by its path in the route table);
/// any other is refused, so that a parameter this server does not know
/// (`?at=...` on an account) is never silently taken to mean something.
fn query_parameters(method: &str, path: &str) -> &'static [&'static str] {
    match (method, path) {
        ("GET", "/v1/accounts") => &["limit", "after"],
        ("GET", "/v1/accounts/{id}/transfers") => &["limit", "after", "status", "since", "until"],
        ("GET", "/v1/transfers") => &["limit", "after", "account_id", "status", "pending_id", "since", "until"],
        ("GET", "/v1/skus") => &["merchant_id", "limit", "after"],
        ("GET", "/v1/coupons") => &["buyer_id"],
        ("GET", "/v1/orders") => &["buyer_id", "merchant_id", "limit", "after"],
        ("GET", "/v1/transactions") => &["state", "limit"],
        ("GET", "/v1/audit") => &["key_id", "action", "target", "request_id", "since", "until", "after", "limit"],
        // Settlements, credit lines and dead letters.
        ("GET", "/v1/settlements") => &["merchant_id", "limit"],
        ("GET", "/v1/credit-lines/{id}") => &["period"],
        ("GET", "/v1/dead-letters") => &["limit"],
        _ => &[],
    }
}

/// (method, path, query parameters) of every route.
pub fn api_query_parameters() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    route_table().into_iter().map(|(method, path, _, _)| (method, path, query_parameters(method, path))).collect()
}

/// Refuses a query parameter the route does not take, naming it.
pub(crate) fn check_query(method: &axum::http::Method, route: &str, uri: &axum::http::Uri) -> Result<(), ApiError> {
    if uri.query().is_none_or(str::is_empty) {
        return Ok(());
    }
    // HEAD is answered by the GET route.
    let method = if method == axum::http::Method::HEAD { "GET" } else { method.as_str() };
    static ROUTES: std::sync::OnceLock<Vec<(&'static str, &'static str)>> = std::sync::OnceLock::new();
    if !ROUTES.get_or_init(api_routes).contains(&(method, route)) {
        return Ok(()); // a method the path does not have: 405 says so
    }
    let allowed = query_parameters(method, route);
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|_| ApiError::invalid("the query string is not valid form encoding"))?;
    match pairs.0.iter().find(|(name, _)| !allowed.contains(&name.as_str())) {
        None => Ok(()),
        Some((name, _)) if allowed.is_empty() => {
            Err(ApiError::invalid(format!("{name}: unknown query parameter; {method} {route} takes none")))
        }
        Some((name, _)) => {
            Err(ApiError::invalid(format!("{name}: unknown query parameter; {route} takes {}", allowed.join(", "))))
        }
    }
}

/// (method, path) of every route the router serves, paths in the router's
/// (and OpenAPI's) `{param}` syntax.
pub fn api_routes() -> Vec<(&'static str, &'static str)> {
    route_table().into_iter().map(|(method, path, _, _)| (method, path)).collect()
}

/// (method, path, access) of every route.
pub fn api_route_access() -> Vec<(&'static str, &'static str, Access)> {
    route_table().into_iter().map(|(method, path, access, _)| (method, path, access)).collect()
}

fn panic_answer(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("the server failed while answering; the request may or may not have taken effect".to_owned())
        .into_response()
}

/// The whole API with its middleware.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (_, path, _, handler) in route_table() {
        router = router.route(path, handler);
    }
    router
        .fallback(handlers::unknown_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // Innermost, so that a panic's 500 still passes the POST guard (which
        // does not remember it) and gets its request id and metrics.
        .layer(CatchPanicLayer::custom(panic_answer))
        // The POST guard has bounded and buffered the body already.
        .layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT_BYTES))
        // Request id, span and metrics; then access control; then, before
        // the handler, the POST guard (a replay is shown only to a caller
        // who may call the route, under the key it was stored for).
        .layer(from_fn_with_state(state.clone(), observe::front))
        .with_state(state)
}

/// A bound listener with its state, not yet serving.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    local_addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    idempotency_retention: Duration,
    settle_every: Option<Duration>,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port: see
    /// [`Server::local_addr`]) and opens the stores. Refuses to start with
    /// keys checked but no key that opens the API.
    pub async fn bind(config: ServerConfig, engine: Engine) -> anyhow::Result<Server> {
        let tls = tls_of(&config)?;
        let state = AppState::new(engine, &config.data_dir, config.auth)?
            .with_request_deadline(config.request_deadline)
            .with_settlement_fee_bps(config.settlement_fee_bps);
        if let Err(error) = check_keys(&config, state.keys()) {
            state.close().await;
            return Err(error);
        }
        if config.auth == AuthMode::InsecureNoAuth {
            tracing::warn!(
                "AUTHENTICATION IS OFF (--insecure-no-auth): every caller is an admin. Never run this with real money."
            );
        }
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                state.close().await;
                return Err(error).with_context(|| format!("cannot listen on {}", config.listen));
            }
        };
        let local_addr = listener.local_addr()?;
        Ok(Server {
            listener,
            state,
            local_addr,
            tls,
            limits: config.limits,
            idempotency_retention: config.idempotency_retention,
            settle_every: config.settle_every,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves; then stops accepting, reports not
    /// ready, drains the requests in flight, stops the background tasks and
    /// closes the idempotency store. The caller shuts the engine down after.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Server { listener, state, local_addr, tls, limits, idempotency_retention, settle_every } = self;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!("listening on {scheme}://{local_addr}");
        state.set_ready(true);
        let (stop_tasks, tasks_stopped) = tokio::sync::watch::channel(false);
        let purge = tokio::spawn(purge_loop(state.clone(), idempotency_retention, tasks_stopped.clone()));
        let upkeep = tokio::spawn(upkeep_loop(state.metrics().clone(), tasks_stopped.clone()));
        let settle =
            settle_every.map(|every| tokio::spawn(settlement_api::settle_loop(state.clone(), every, tasks_stopped)));

        let signal_state = state.clone();
        let served = listener::serve(listener, router(state.clone()), tls, limits, async move {
            shutdown.await;
            signal_state.set_ready(false);
            tracing::info!("shutting down: draining requests in flight");
        })
        .await;

        let _ = stop_tasks.send(true);
        let _ = purge.await;
        let _ = upkeep.await;
        if let Some(settle) = settle {
            let _ = settle.await;
        }
        state.close().await;
        tracing::info!("server stopped");
        served.context("server failed")
    }
}

/// The TLS config `config` asks for, or none if plain HTTP is allowed on
/// its address.
fn tls_of(config: &ServerConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match &config.tls {
        Some(files) => Ok(Some(listener::load_tls_config(&files.cert, &files.key)?)),
        None if !listener::plain_http_allowed(&config.listen, config.allow_plain_http) => anyhow::bail!(
            "refusing to serve plain HTTP on {}, which is not a loopback address: give --tls-cert and --tls-key, \
             or --allow-plain-http if a proxy in front terminates TLS",
            config.listen
        ),
        None => Ok(None),
    }
}

/// With keys checked, some key must open the API.
fn check_keys(config: &ServerConfig, keys: &keys::KeyRing) -> anyhow::Result<()> {
    if config.auth == AuthMode::ApiKeys && keys.active(idempotency::now_ms()) == 0 {
        anyhow::bail!(
            "no active API key in {dir}: create the first with `peakstack keys create --scope admin --data {dir}` \
             (it is printed once), or start with --insecure-no-auth for local development only",
            dir = config.data_dir.display()
        );
    }
    Ok(())
}

/// Checks what [`Server::bind`] would refuse (TLS files, plain HTTP off
/// loopback, no usable key) without opening the engine, so that `serve`
/// fails at once instead of after replaying a large log.
pub async fn preflight(config: &ServerConfig) -> anyhow::Result<()> {
    tls_of(config)?;
    if config.auth == AuthMode::ApiKeys {
        let (store, records) = open_access_store(&config.data_dir)?;
        store.close().await;
        let ring = keys::KeyRing::new(records).map_err(|e| anyhow::anyhow!("{ACCESS_FILE}: {e}"))?;
        check_keys(config, &ring)?;
    }
    Ok(())
}

/// Binds, logs "listening on ADDR", serves until `shutdown` resolves, drains
/// the requests in flight, then returns. The caller then calls
/// `engine.shutdown()`. To learn a port picked by the OS, use
/// [`Server::bind`] and [`Server::run`].
pub async fn serve(
    config: ServerConfig,
    engine: Engine,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::bind(config, engine).await?.run(shutdown).await
}

/// Deletes idempotency keys older than `retention` (see
/// [`idempotency::run_purges`]).
async fn purge_loop(state: AppState, retention: Duration, stop: tokio::sync::watch::Receiver<bool>) {
    tokio::join!(
        idempotency::run_purges(state.idempotency(), retention, stop.clone()),
        keyed_outcomes::run_upkeep(state.engine(), state.recent_outcomes(), state.access_store(), retention, stop),
    );
}

async fn upkeep_loop(handle: PrometheusHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => handle.run_upkeep(),
            _ = stop.changed() => return,
        }
    }
}
