//! Who may do what: scopes, the access each route declares, and the one
//! place where a caller's scope meets an object's owner.
//!
//! Two levels, both decided here and nowhere else:
//! - per route, [`Access`] (declared in the route table in `lib.rs`) says
//!   which scopes may call it at all; [`admit`], called by the one
//!   middleware in front of the handlers (`observe::front`), checks
//!   the key and the route before anything else runs (before the
//!   Idempotency-Key guard, so a replay is never shown to another key);
//! - per object, [`Principal`]'s methods say whether the caller may see an
//!   account or transfer (if not, the handler answers 404 as if it did not
//!   exist, so ids of other tenants cannot be probed) and whether it may
//!   move money out of it.

use std::fmt;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use peakstack_domain::{AccountChange, Id, Owner};

use crate::error::ApiError;
use crate::keys::{parse_bearer, KeyCheck};
use crate::AppState;

/// The header an `app` key names the buyer it acts for in.
pub static X_BUYER_ID: HeaderName = HeaderName::from_static("x-buyer-id");
/// The key id a request runs under when authentication is off.
pub const INSECURE_KEY_ID: &str = "insecure-no-auth";

/// What a key may do.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Scope {
    /// Everything, keys, audit and (later) policies, rules and switches included.
    Admin,
    /// One merchant's own objects: its accounts, and money out of them.
    Merchant(Id),
    /// Buyer-facing flows, acting for the buyer named in `X-Buyer-Id`.
    App,
    /// Read-only reporting over everything.
    Read,
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, String> {
        match text {
            "admin" => Ok(Scope::Admin),
            "app" => Ok(Scope::App),
            "read" => Ok(Scope::Read),
            _ => match text.strip_prefix("merchant:").map(Id::parse_plain) {
                Some(Some(id)) => Ok(Scope::Merchant(id)),
                _ => Err(format!(
                    "scope: {text:?} is not a scope; use \"admin\", \"read\", \"app\" or \"merchant:<id>\" (id: 1-64 of [A-Za-z0-9_.:-])"
                )),
            },
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Merchant(id) => write!(f, "merchant:{id}"),
            Scope::App => f.write_str("app"),
            Scope::Read => f.write_str("read"),
        }
    }
}

/// What a route demands of its caller, declared once per route.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// No key: liveness, readiness, the API document.
    Public,
    /// Operations data (metrics): admin and read keys.
    Operations,
    /// Any key; the handler shows each caller its own objects only.
    Read,
    /// admin, merchant and app keys; the handler checks whose money moves.
    Write,
    /// admin keys only: keys, audit, policies, rules, switches.
    Admin,
}

impl Access {
    pub fn allows(self, scope: &Scope) -> bool {
        match self {
            Access::Public | Access::Read => true,
            Access::Operations => matches!(scope, Scope::Admin | Scope::Read),
            Access::Write => matches!(scope, Scope::Admin | Scope::Merchant(_) | Scope::App),
            Access::Admin => matches!(scope, Scope::Admin),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Access::Public => "anyone",
            Access::Operations => "admin and read keys",
            Access::Read => "any key",
            Access::Write => "admin, merchant and app keys",
            Access::Admin => "admin keys",
        }
    }
}

/// The caller of a request, as the handlers see it.
#[derive(Clone, Debug)]
pub struct Principal {
    pub key_id: Arc<str>,
    pub scope: Scope,
    /// For `app` keys: the buyer this request acts for.
    pub buyer: Option<Id>,
}

/// Why an object-level check refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// The caller may not even know the object exists: answer 404.
    Hidden,
    /// The caller sees the object but may not do this: answer 403.
    Forbidden(String),
}

impl Principal {
    /// The buyer a buyer's request acts for: an app key's own (a body naming
    /// another is refused), or the one the body names for an admin key;
    /// `does` says what (for the refusal of every other key).
    pub fn acting_buyer(&self, named: Option<&str>, does: &str) -> Result<Id, ApiError> {
        let named =
            named.map(|b| crate::wire::parse_id("buyer_id", b).map_err(ApiError::InvalidRequest)).transpose()?;
        match (&self.scope, &self.buyer, named) {
            (Scope::App, Some(own), Some(named)) if named != *own => {
                Err(ApiError::Forbidden(format!("this app key acts for buyer {own} (X-Buyer-Id), not {named}")))
            }
            (Scope::App, Some(own), _) => Ok(own.clone()),
            (Scope::Admin, _, Some(named)) => Ok(named),
            (Scope::Admin, _, None) => Err(ApiError::invalid("buyer_id: required")),
            _ => Err(ApiError::Forbidden(format!("only an admin key or an app key acting for the buyer {does}"))),
        }
    }
    /// The caller when authentication is switched off: an admin.
    pub fn insecure() -> Principal {
        Principal { key_id: Arc::from(INSECURE_KEY_ID), scope: Scope::Admin, buyer: None }
    }

    /// Sees every object (no per-object checks needed).
    pub fn sees_everything(&self) -> bool {
        matches!(self.scope, Scope::Admin | Scope::Read)
    }

    /// The owner whose objects this caller is confined to, if any.
    pub fn tenant(&self) -> Option<Owner> {
        match &self.scope {
            Scope::Admin | Scope::Read => None,
            Scope::Merchant(id) => Some(Owner::Merchant(id.clone())),
            Scope::App => self.buyer.clone().map(Owner::Buyer),
        }
    }

    /// Whether the caller may see an account owned by `owner` (`None`: a
    /// platform account).
    pub fn can_see(&self, owner: Option<&Owner>) -> bool {
        self.sees_everything() || (owner.is_some() && owner == self.tenant().as_ref())
    }

    /// Whether the caller may see a transfer between accounts owned by
    /// `debit` and `credit`: it sees either side.
    pub fn can_see_transfer(&self, debit: Option<&Owner>, credit: Option<&Owner>) -> bool {
        self.can_see(debit) || self.can_see(credit)
    }

    /// Whether the caller may move money out of an account owned by `owner`.
    pub fn can_debit(&self, owner: Option<&Owner>) -> Result<(), Denied> {
        match &self.scope {
            Scope::Admin => Ok(()),
            Scope::Read => Err(Denied::Forbidden("read keys cannot move money".to_owned())),
            Scope::Merchant(_) | Scope::App if self.can_see(owner) => Ok(()),
            Scope::Merchant(_) | Scope::App => Err(Denied::Hidden),
        }
    }

    /// Whether the caller may post or void a pending transfer between
    /// accounts owned by `debit` and `credit`: a merchant captures or
    /// releases holds on either side of it (the buyer's authorization to
    /// pay it, or its own); an app releases or captures its buyer's holds.
    pub fn can_settle(&self, debit: Option<&Owner>, credit: Option<&Owner>) -> Result<(), Denied> {
        match &self.scope {
            Scope::Admin => Ok(()),
            Scope::Read => Err(Denied::Forbidden("read keys cannot move money".to_owned())),
            Scope::Merchant(_) if self.can_see_transfer(debit, credit) => Ok(()),
            Scope::App if self.can_see(debit) => Ok(()),
            Scope::Merchant(_) | Scope::App => Err(Denied::Hidden),
        }
    }

    /// Whether the caller may make an object (account, transfer, post,
    /// void) with id `id`. A tenant key makes ids in its own namespace
    /// only (`<owner>~...`), so that inside a namespace every object is the
    /// tenant's own and a clash can only be with itself; decided from the
    /// id alone, so the refusal never tells whether the id exists.
    pub fn may_create_id(&self, id: &Id) -> Result<(), Denied> {
        if matches!(self.scope, Scope::Admin | Scope::Read) {
            return Ok(());
        }
        // An app key without its buyer has no namespace (and no id is in "").
        let tenant = self.tenant().map(|t| t.to_string()).unwrap_or_default();
        if id.namespace() == Some(tenant.as_str()) {
            return Ok(());
        }
        Err(Denied::Forbidden(format!("{id}: ids a {} key makes start with {tenant}~", self.scope)))
    }

    /// Whether the caller may freeze, unfreeze or close accounts at all,
    /// decided before any account is looked up (so the refusal is the same
    /// whether the account exists). Admins change any account; a merchant
    /// may freeze and close its own (stop or retire its money), but only an
    /// admin lifts a freeze, which the platform may have put there; app
    /// and read keys change no account's status. The account itself must
    /// then be visible ([`Principal::can_see`]), else it is hidden.
    pub fn may_change_accounts(&self, change: AccountChange) -> Result<(), Denied> {
        match (&self.scope, change) {
            (Scope::Admin, _) => Ok(()),
            (Scope::Merchant(_), AccountChange::Freeze | AccountChange::Close) => Ok(()),
            (Scope::Merchant(_), AccountChange::Unfreeze) => {
                Err(Denied::Forbidden("only admin keys unfreeze accounts".to_owned()))
            }
            (Scope::App | Scope::Read, _) => {
                Err(Denied::Forbidden(format!("{} keys cannot change an account's status", self.scope)))
            }
        }
    }

    /// The owner an account this caller opens gets: admins name any owner
    /// (or none), merchants and apps open accounts of their own tenant only
    /// (named or left out).
    pub fn owner_for_new_account(&self, requested: Option<Owner>) -> Result<Option<Owner>, Denied> {
        match &self.scope {
            Scope::Admin => Ok(requested),
            Scope::Read => Err(Denied::Forbidden("read keys cannot open accounts".to_owned())),
            Scope::Merchant(_) | Scope::App => {
                let tenant = self.tenant();
                match requested {
                    None => Ok(tenant),
                    Some(owner) if Some(&owner) == tenant.as_ref() => Ok(tenant),
                    Some(owner) => Err(Denied::Forbidden(format!(
                        "a {} key opens accounts of {} only, not of {owner}",
                        self.scope,
                        tenant.map_or_else(|| "its buyer".to_owned(), |t| t.to_string())
                    ))),
                }
            }
        }
    }
}

/// An account whose id lies in a tenant's namespace belongs to that tenant
/// (also when an admin opens it), so a tenant's namespace holds its own
/// accounts only.
pub fn check_namespace_owner(id: &Id, owner: Option<&Owner>) -> Result<(), String> {
    match id.namespace() {
        Some(namespace) if owner.map(ToString::to_string).as_deref() != Some(namespace) => {
            Err(format!("id: {id} lies in the namespace of {namespace}, so its owner must be {namespace}"))
        }
        _ => Ok(()),
    }
}

/// A transfer whose id lies in a tenant's namespace moves that tenant's
/// money: its debit or credit account is the tenant's (for a post or void,
/// the pending transfer's). Applied to every caller, admins included: else
/// an admin could make an id in a tenant's namespace between others'
/// accounts, and the tenant would later clash with an id it cannot read.
/// A tenant key's transfers meet it already (its ids are in its own
/// namespace and it moves only its own money); `debit` and `credit` are the
/// owners of accounts that exist.
pub fn check_transfer_namespace(id: &Id, debit: Option<&Owner>, credit: Option<&Owner>) -> Result<(), String> {
    match id.namespace() {
        Some(namespace) if !owns_namespace(debit, namespace) && !owns_namespace(credit, namespace) => Err(format!(
            "id: {id} lies in the namespace of {namespace}, so the transfer must move money of {namespace}: \
             its debit or credit account (for a post or void, the pending transfer's) must be owned by {namespace}"
        )),
        _ => Ok(()),
    }
}

/// Whether `owner` is the owner `namespace` names (no allocation: this
/// runs for every namespaced transfer).
fn owns_namespace(owner: Option<&Owner>, namespace: &str) -> bool {
    match owner {
        Some(Owner::Merchant(id)) => namespace.strip_prefix("merchant:") == Some(id.as_str()),
        Some(Owner::Buyer(id)) => namespace.strip_prefix("buyer:") == Some(id.as_str()),
        None => false,
    }
}

/// The caller and the request id, as a handler extracts them.
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
    /// Set by the POST guard on a keyed request whose answer the engine's
    /// log keeps ([`crate::keyed_outcomes`]).
    pub idempotency: Option<peakstack_engine::IdempotencyTag>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
            ApiError::Internal("this route declares no access; refusing to run it without a caller".to_owned())
        })?;
        let request_id = parts
            .headers
            .get(&crate::observe::X_REQUEST_ID)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default();
        let idempotency = parts.extensions.get::<peakstack_engine::IdempotencyTag>().copied();
        Ok(Caller { principal, request_id, idempotency })
    }
}

impl Caller {
    /// Who made a request, as the engine's audit trail keeps it.
    pub fn origin(&self) -> peakstack_engine::Origin {
        peakstack_engine::Origin {
            key_id: self.principal.key_id.clone(),
            request_id: std::sync::Arc::from(self.request_id.as_str()),
            idempotency: self.idempotency,
        }
    }
}

/// The access of every route, by method and path pattern. A linear scan:
/// the table has a few dozen entries.
pub struct RouteAccess(Vec<(Method, &'static str, Access)>);

impl RouteAccess {
    pub fn new(routes: impl IntoIterator<Item = (&'static str, &'static str, Access)>) -> RouteAccess {
        let routes = routes
            .into_iter()
            .map(|(method, path, access)| {
                (Method::from_bytes(method.as_bytes()).expect("a valid method"), path, access)
            })
            .collect();
        RouteAccess(routes)
    }

    fn of(&self, method: &Method, path: &str) -> Option<Access> {
        self.0.iter().find(|(m, p, _)| m == method && *p == path).map(|(_, _, access)| *access)
    }
}

/// Whether the server checks keys.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthMode {
    /// Every route but the public ones needs a valid key.
    ApiKeys,
    /// Local development only: every caller is an admin. The log and
    /// `/readyz` say so.
    InsecureNoAuth,
}

/// Authenticates a request and checks its route's [`Access`] (`route`:
/// the matched path, if any). On success the handlers find the
/// [`Principal`] in the request's extensions; otherwise the refusal is the
/// answer.
pub fn admit(state: &AppState, request: &mut Request, route: Option<&str>) -> Result<(), Box<Response>> {
    let access = route.and_then(|path| state.route_access().of(request.method(), path));
    // Unknown routes and wrong methods answer 404/405 to anyone.
    let Some(access) = access else { return Ok(()) };
    if access == Access::Public {
        return Ok(());
    }
    match principal_of(state, request, access) {
        Ok(principal) => {
            tracing::Span::current().record("key_id", &*principal.key_id);
            request.extensions_mut().insert(principal);
            Ok(())
        }
        Err(error) => {
            let unauthorized = matches!(error, ApiError::Unauthorized(_));
            metrics::counter!("peakstack_access_refusals_total", "code" => error.code()).increment(1);
            let mut response = error.into_response();
            if unauthorized {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Err(Box::new(response))
        }
    }
}

fn principal_of(state: &AppState, request: &Request, access: Access) -> Result<Principal, ApiError> {
    let principal = match state.auth_mode() {
        AuthMode::InsecureNoAuth => Principal::insecure(),
        AuthMode::ApiKeys => {
            let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
            let value = match (values.next(), values.next()) {
                (Some(value), None) => value,
                (None, _) => {
                    return Err(ApiError::Unauthorized(
                        "this route needs an API key: send \"Authorization: Bearer <key>\"".to_owned(),
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(ApiError::Unauthorized("send exactly one Authorization header".to_owned()))
                }
            };
            let (key_id, secret) = parse_bearer(value.as_bytes()).map_err(ApiError::Unauthorized)?;
            match state.keys().check(key_id, secret, crate::idempotency::now_ms()) {
                KeyCheck::Valid { key_id, scope } => Principal { key_id, scope, buyer: None },
                KeyCheck::Unknown => return Err(ApiError::Unauthorized("the API key is not valid".to_owned())),
                KeyCheck::Revoked => return Err(ApiError::Unauthorized("the API key was revoked".to_owned())),
                KeyCheck::Expired => return Err(ApiError::Unauthorized("the API key expired".to_owned())),
            }
        }
    };
    if !access.allows(&principal.scope) {
        return Err(ApiError::Forbidden(format!(
            "a {} key may not call this route; it is open to {}",
            principal.scope,
            access.describe()
        )));
    }
    if principal.scope != Scope::App {
        return Ok(principal);
    }
    let buyer =
        request.headers().get(&X_BUYER_ID).and_then(|value| value.to_str().ok()).and_then(Id::parse_plain).ok_or_else(
            || {
                ApiError::invalid(
                "X-Buyer-Id: an app key names the buyer it acts for in this header (an id of 1-64 of [A-Za-z0-9_.:-])",
            )
            },
        )?;
    Ok(Principal { buyer: Some(buyer), ..principal })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse(text).unwrap()
    }

    fn principal(scope: &str, buyer: Option<&str>) -> Principal {
        Principal { key_id: Arc::from("k"), scope: Scope::parse(scope).unwrap(), buyer: buyer.map(id) }
    }

    #[test]
    fn scopes_parse_and_print_back() {
        for text in ["admin", "read", "app", "merchant:m1", "merchant:a.b-c"] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        for bad in ["", "Admin", "merchant:", "merchant:has space", "buyer:b1", "root"] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn routes_open_to_the_scopes_they_declare() {
        // (access, admin, merchant, app, read)
        for (access, expected) in [
            (Access::Public, [true, true, true, true]),
            (Access::Read, [true, true, true, true]),
            (Access::Operations, [true, false, false, true]),
            (Access::Write, [true, true, true, false]),
            (Access::Admin, [true, false, false, false]),
        ] {
            let scopes = [Scope::Admin, Scope::Merchant(id("m")), Scope::App, Scope::Read];
            let got: Vec<bool> = scopes.iter().map(|scope| access.allows(scope)).collect();
            assert_eq!(got, expected, "{access:?}");
        }
    }

    #[test]
    fn objects_are_seen_and_moved_by_their_tenant_only() {
        let m1 = Owner::parse("merchant:m1");
        let m2 = Owner::parse("merchant:m2");
        let b1 = Owner::parse("buyer:b1");
        let platform: Option<Owner> = None;
        let admin = principal("admin", None);
        let read = principal("read", None);
        let merchant = principal("merchant:m1", None);
        let app = principal("app", Some("b1"));
        for owner in [&m1, &m2, &b1, &platform] {
            assert!(admin.can_see(owner.as_ref()) && read.can_see(owner.as_ref()));
            assert_eq!(admin.can_debit(owner.as_ref()), Ok(()));
            assert!(matches!(read.can_debit(owner.as_ref()), Err(Denied::Forbidden(_))));
        }
        assert!(merchant.can_see(m1.as_ref()));
        assert!(!merchant.can_see(m2.as_ref()) && !merchant.can_see(b1.as_ref()) && !merchant.can_see(None));
        assert_eq!(merchant.can_debit(m1.as_ref()), Ok(()));
        assert_eq!(merchant.can_debit(m2.as_ref()), Err(Denied::Hidden));
        assert_eq!(merchant.can_debit(None), Err(Denied::Hidden));
        assert!(app.can_see(b1.as_ref()) && !app.can_see(m1.as_ref()));
        assert_eq!(app.can_debit(b1.as_ref()), Ok(()));
        assert_eq!(app.can_debit(Owner::parse("buyer:b2").as_ref()), Err(Denied::Hidden));
        // A transfer is seen by either side; a hold is settled by the
        // merchant on either side, by the app on the paying side only.
        assert!(merchant.can_see_transfer(b1.as_ref(), m1.as_ref()));
        assert!(!merchant.can_see_transfer(b1.as_ref(), m2.as_ref()));
        assert_eq!(merchant.can_settle(b1.as_ref(), m1.as_ref()), Ok(()));
        assert_eq!(merchant.can_settle(b1.as_ref(), m2.as_ref()), Err(Denied::Hidden));
        assert_eq!(app.can_settle(b1.as_ref(), m1.as_ref()), Ok(()));
        assert_eq!(app.can_settle(m1.as_ref(), b1.as_ref()), Err(Denied::Hidden));
    }

    #[test]
    fn a_namespaced_transfer_moves_money_of_its_namespace() {
        let m1 = Owner::parse("merchant:m1");
        let m2 = Owner::parse("merchant:m2");
        let b1 = Owner::parse("buyer:b1");
        let check = |tid: &str, debit: &Option<Owner>, credit: &Option<Owner>| {
            check_transfer_namespace(&id(tid), debit.as_ref(), credit.as_ref()).is_ok()
        };
        for (tid, debit, credit, allowed) in [
            ("plain", &None, &None, true),
            ("merchant:m1~x", &m1, &None, true),
            ("merchant:m1~x", &b1, &m1, true),
            ("merchant:m1~x", &m2, &b1, false),
            ("merchant:m1~x", &None, &None, false),
            ("buyer:b1~x", &b1, &m1, true),
            ("buyer:b1~x", &m1, &m2, false),
            // An owner whose id only starts like the namespace's is another.
            ("merchant:m1~x", &Owner::parse("merchant:m10"), &None, false),
            ("merchant:m10~x", &m1, &None, false),
            ("buyer:m1~x", &m1, &None, false),
        ] {
            assert_eq!(check(tid, debit, credit), allowed, "{tid} {debit:?} {credit:?}");
        }
    }

    #[test]
    fn new_accounts_belong_to_the_callers_tenant() {
        let m1 = Owner::parse("merchant:m1");
        assert_eq!(principal("admin", None).owner_for_new_account(None), Ok(None));
        assert_eq!(principal("admin", None).owner_for_new_account(m1.clone()), Ok(m1.clone()));
        assert_eq!(principal("merchant:m1", None).owner_for_new_account(None), Ok(m1.clone()));
        assert_eq!(principal("merchant:m1", None).owner_for_new_account(m1.clone()), Ok(m1.clone()));
        assert!(matches!(
            principal("merchant:m1", None).owner_for_new_account(Owner::parse("merchant:m2")),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(principal("app", Some("b1")).owner_for_new_account(None), Ok(Owner::parse("buyer:b1")));
        assert!(matches!(principal("read", None).owner_for_new_account(None), Err(Denied::Forbidden(_))));
    }
}
