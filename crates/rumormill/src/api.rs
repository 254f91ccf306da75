//! The HTTP control API: JSON over HTTP/1.1, described by the OpenAPI
//! document at `/v1/openapi.json`.
//!
//! Requests are served only when they name an accepted host (loopback
//! forms, the bind address, `[api] allowed_hosts`) and, when they carry an
//! `Origin`, come from the API's own origin or one of `[api]
//! allowed_origins`. Health and the OpenAPI document are open; every other
//! read needs the read token or the admin token, and every request that
//! changes state, and the key export, the admin token, as
//! `Authorization: Bearer <token>` (`?token=` only on the WebSocket
//! upgrade); the read token follows the event stream only of topics the
//! agent already subscribes to. Errors are `{"error": "what was wrong"}`
//! with a 4xx status (500 when the data directory fails; 503 with
//! `Retry-After` when the cap on event-stream followers or on key
//! operations waiting for the members is full).
//!
//! ```no_run
//! # async fn f(agent: std::sync::Arc<rumormill::agent::Agent<rumormill::transport::TokioNet>>) -> std::io::Result<()> {
//! let mut options = rumormill::api::ApiOptions::new("127.0.0.1:0".parse().unwrap(), "secret".into());
//! options.read_token = Some("reader".into());
//! let (addr, server) = rumormill::api::serve_with(agent, options).await?;
//! println!("API on http://{addr}/v1/openapi.json");
//! # Ok(()) }
//! ```

mod access;

pub use access::{Scope, required_scope};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::agent::{
    Agent, AgentError, CandidateRow, MemberRow, OverlayStats, OverlaySummary, RackMemberRow, RackRow, UpdateRow,
};
use crate::config::OverlaySpec;
use crate::events::{DeliverySpec, EventRecord, InboxItem, SubscriberReport};
use crate::keyring::{KeyChange, KeyRow};
use crate::transport::TokioNet;

type AgentRef = Arc<Agent<TokioNet>>;

#[derive(Clone)]
struct AppState {
    agent: AgentRef,
    token: Arc<str>,
    read_token: Option<Arc<str>>,
    hosts: Arc<access::HostPolicy>,
    /// One permit per event-stream follower.
    followers: Arc<tokio::sync::Semaphore>,
    /// One permit per key operation waiting for the members (`?wait=`).
    long_polls: Arc<tokio::sync::Semaphore>,
    max_followers: usize,
    max_long_polls: usize,
}

/// Which token a request was served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Admin,
}

/// What a request knows of its connection: the connection's slot, held
/// until the connection ends — past a WebSocket upgrade too — and a
/// signal that the server has stopped.
#[derive(Clone)]
struct Connection {
    _slot: Arc<tokio::sync::OwnedSemaphorePermit>,
    stopped: tokio::sync::watch::Receiver<()>,
}

/// Largest request body (a 1 MiB event payload in base64 fits).
pub const BODY_LIMIT: usize = 2 << 20;
/// How long a client may take to send a request's headers (also how long
/// an idle connection stays open).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 256;
/// Event-stream followers (WebSockets) at once; more get 503. Each also
/// holds a connection slot, as do long-polls, so that with
/// [`MAX_LONG_POLLS`] at most half of [`MAX_CONNECTIONS`] are long-lived.
pub const MAX_FOLLOWERS: usize = 64;
/// Key operations waiting for the members (`?wait=` above 0) at once;
/// more get 503.
pub const MAX_LONG_POLLS: usize = 64;
/// The `Retry-After` (seconds) of a 503 for a full follower or long-poll cap.
pub const RETRY_AFTER_SECS: u64 = 5;
/// Largest request head (request line and headers); larger gets 431.
const MAX_HEAD: usize = 64 << 10;

/// How the API is served: its address, tokens, the host names and origins
/// it accepts, and its connection limits.
#[derive(Clone)]
pub struct ApiOptions {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Token for everything.
    pub admin_token: String,
    /// Token for reads only (values, inbox, event stream, members…).
    pub read_token: Option<String>,
    /// Host names accepted besides the loopback forms and the bind address
    /// (`name` or `name:port`).
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) accepted besides the API's own.
    pub allowed_origins: Vec<String>,
    /// Time allowed to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Event-stream followers at once.
    pub max_followers: usize,
    /// Key operations waiting for the members at once.
    pub max_long_polls: usize,
}

impl ApiOptions {
    /// Defaults for an API on `bind` with `admin_token` and no read token.
    pub fn new(bind: SocketAddr, admin_token: String) -> ApiOptions {
        ApiOptions {
            bind,
            admin_token,
            read_token: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_followers: MAX_FOLLOWERS,
            max_long_polls: MAX_LONG_POLLS,
        }
    }
}

impl std::fmt::Debug for ApiOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiOptions")
            .field("bind", &self.bind)
            .field("admin_token", &"<redacted>")
            .field("read_token", &self.read_token.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_followers", &self.max_followers)
            .field("max_long_polls", &self.max_long_polls)
            .finish()
    }
}

/// An error answer: `{"error": message}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

/// An error with its status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        // The API answers 503 only when a cap on long-lived requests is full.
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        ApiError(status_of(&e), e.to_string())
    }
}

/// The HTTP status of each agent error: the one place where the agent's
/// errors meet HTTP. No default arm, so that a new error gets a status on
/// purpose.
fn status_of(e: &AgentError) -> StatusCode {
    use crate::keyring::KeyError;
    match e {
        AgentError::UnknownOverlay(_)
        | AgentError::UnknownKey(_)
        | AgentError::UnknownLuggage(_)
        | AgentError::UnknownEvent(_)
        | AgentError::NotSubscribed(_) => StatusCode::NOT_FOUND,
        AgentError::OverlayExists(_)
        | AgentError::Bind { .. }
        | AgentError::Left(_)
        | AgentError::AlreadyLeft(_)
        | AgentError::Stopped(_)
        | AgentError::NotStarted { .. }
        | AgentError::Plaintext(_)
        | AgentError::Core(rumormill_core::CoreError::Left) => StatusCode::CONFLICT,
        // Rack settings that contradict each other, or a rack name outside
        // its rules: the request itself is wrong.
        AgentError::Config(crate::config::ConfigError::Rack { .. }) => StatusCode::BAD_REQUEST,
        AgentError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AgentError::NoAddresses
        | AgentError::Update(_)
        | AgentError::ValueKey(_)
        | AgentError::LocalTopic(_)
        | AgentError::InvalidTopic(_)
        | AgentError::InvalidRack(_)
        | AgentError::InvalidDelivery(_)
        | AgentError::NothingStored => StatusCode::BAD_REQUEST,
        // The writer's data would be larger than the overlay stores for
        // one writer: a client error (retrying unchanged cannot help),
        // not a 5xx that clients and proxies would retry.
        AgentError::Core(rumormill_core::CoreError::Quota(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        AgentError::Core(_) => StatusCode::BAD_REQUEST,
        AgentError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
        AgentError::Key(k) => match k {
            KeyError::InvalidId(_) | KeyError::Unknown(_) | KeyError::InvalidSecret(_) => StatusCode::BAD_REQUEST,
            // Refused for the state of the overlay or of its members.
            KeyError::ClockBehind { .. }
            | KeyError::NotLocal(_)
            | KeyError::NotInstalled { .. }
            | KeyError::Primary(_)
            | KeyError::PrimaryOf { .. }
            | KeyError::NoKeyLeft => StatusCode::CONFLICT,
        },
    }
}

/// A JSON body whose rejections are JSON errors too.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the API's limit of {BODY_LIMIT} bytes"),
            )),
            Err(e) => {
                let status = match e {
                    JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError(status, e.body_text()))
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Body of `join`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinRequest {
    /// Gossip addresses (`ip:port`) of members to contact.
    #[schema(value_type = Vec<String>, example = json!(["127.0.0.1:7950"]))]
    pub addrs: Vec<SocketAddr>,
}

/// Body of a value write: `value` (text) or `value_base64` (bytes).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    /// The value as text.
    #[serde(default)]
    pub value: Option<String>,
    /// The value as base64.
    #[serde(default)]
    pub value_base64: Option<String>,
}

/// Body of a key install.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// The key, base64 (`rumormill keygen`). Wiped from memory once used.
    #[schema(value_type = String)]
    pub key: zeroize::Zeroizing<String>,
}

/// The keyring's secrets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyExport {
    /// Base64 keys, primary first.
    pub keys: Vec<String>,
}

/// How long a key operation waits for every live member to follow.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WaitQuery {
    /// Seconds (default 10, at most 120).
    pub wait: Option<u64>,
}

/// Where a key is installed or removed: `overlay` (default: every member;
/// the secret travels in the overlay's store, sealed under the current
/// keys) or `local` (this agent alone; the secret never leaves it).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ScopeQuery {
    /// `overlay` (default) or `local`.
    pub scope: Option<String>,
}

impl ScopeQuery {
    fn local(q: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>) -> ApiResult<bool> {
        let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
        match q.scope.as_deref() {
            None | Some("overlay") => Ok(false),
            Some("local") => Ok(true),
            Some(other) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("scope={other:?}: expected overlay or local"),
            )),
        }
    }
}

/// Members a `use` or `remove` leaves out: they are not waited for, and
/// are cut off once the old key is removed.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ExcludeQuery {
    /// Member names, comma-separated.
    pub exclude: Option<String>,
}

impl ExcludeQuery {
    fn members(q: Result<Query<ExcludeQuery>, axum::extract::rejection::QueryRejection>) -> ApiResult<Vec<String>> {
        let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
        let names: Vec<String> = q
            .exclude
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if names.len() > 1024 || names.iter().any(|n| n.len() > 128) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "exclude: at most 1024 member names of at most 128 characters".into(),
            ));
        }
        Ok(names)
    }
}

impl WaitQuery {
    fn duration(
        q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    ) -> ApiResult<std::time::Duration> {
        let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
        match q.wait.unwrap_or(10) {
            s @ 0..=120 => Ok(std::time::Duration::from_secs(s)),
            s => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("wait={s}: at most 120 seconds"),
            )),
        }
    }
}

/// A key change answers 200 when every live member followed, 202 when
/// some had not yet when the wait ended.
fn change_status(c: &KeyChange) -> StatusCode {
    if c.missing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    }
}

/// Filter of a value listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only keys starting with this.
    pub prefix: Option<String>,
}

/// Agent health.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the agent answers.
    pub status: String,
    /// The agent's version.
    pub version: String,
    /// Its overlays.
    pub overlays: Vec<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Rumormill agent API", description = "Control one Rumormill agent: overlays, members, values, keys. \
        Health and this document need no token; every other read needs the read token or the admin token; \
        changes and the key export need the admin token."),
    paths(
        health, list_overlays, create_overlay, get_overlay, update_overlay, delete_overlay, members, racks, join, leave,
        list_updates, get_update, put_update, delete_update, list_keys, install_key, use_key, remove_key, export_keys,
        publish, get_event, read_inbox, events_ws, list_subscriptions, subscribe, unsubscribe, list_luggage, set_luggage,
        delete_luggage
    ),
    components(schemas(
        ErrorBody, JoinRequest, PutRequest, KeyRequest, KeyExport, Health, OverlaySummary, OverlayStats, OverlaySpec,
        MemberRow, RackMemberRow, MemberList, RackRow, CandidateRow, UpdateRow, KeyRow, KeyChange, PublishRequest, InboxItem, EventRecord, SubscriberReport, DeliverySpec,
        Topics, LuggageRow, crate::config::Limits, crate::config::Profile, crate::config::Timings, crate::config::MulticastSpec
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every read but health and this document needs the read token
        // (or the admin token).
        components.add_security_scheme(
            "read_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The API's routes, answering to loopback host names, with `token` as
/// the admin token and no read token.
pub fn router(agent: AgentRef, token: String) -> Router {
    let options = ApiOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)), token);
    router_with(agent, &options).unwrap_or_else(|_| unreachable!("no configured hosts to reject"))
}

/// The API's routes with `options`' tokens, host names and origins; an
/// error names an invalid host name or origin.
pub fn router_with(agent: AgentRef, options: &ApiOptions) -> Result<Router, String> {
    let hosts = access::HostPolicy::new(options.bind, &options.allowed_hosts, &options.allowed_origins)?;
    let state = AppState {
        agent,
        token: options.admin_token.as_str().into(),
        read_token: options.read_token.as_deref().map(Into::into),
        hosts: Arc::new(hosts),
        followers: Arc::new(tokio::sync::Semaphore::new(options.max_followers)),
        long_polls: Arc::new(tokio::sync::Semaphore::new(options.max_long_polls)),
        max_followers: options.max_followers,
        max_long_polls: options.max_long_polls,
    };
    let o = "/v1/overlays/{overlay}";
    Ok(Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(|| async { Json(openapi()) }))
        .route("/v1/overlays", get(list_overlays).post(create_overlay))
        .route(o, get(get_overlay).put(update_overlay).delete(delete_overlay))
        .route(&format!("{o}/members"), get(members))
        .route(&format!("{o}/racks"), get(racks))
        .route(&format!("{o}/join"), post(join))
        .route(&format!("{o}/leave"), post(leave))
        .route(&format!("{o}/updates"), get(list_updates))
        .route(
            &format!("{o}/updates/{{*key}}"),
            get(get_update).put(put_update).delete(delete_update),
        )
        .route(&format!("{o}/keys"), get(list_keys).post(install_key))
        .route(&format!("{o}/keys/export"), get(export_keys))
        .route(&format!("{o}/keys/{{id}}/use"), post(use_key))
        .route(&format!("{o}/keys/{{id}}"), axum::routing::delete(remove_key))
        .route(&format!("{o}/events"), get(read_inbox).post(publish))
        .route(&format!("{o}/events/ws"), get(events_ws))
        .route(&format!("{o}/events/{{*id}}"), get(get_event))
        .route(&format!("{o}/subscriptions"), get(list_subscriptions))
        .route(
            &format!("{o}/subscriptions/{{topic}}"),
            axum::routing::put(subscribe).delete(unsubscribe),
        )
        .route(&format!("{o}/luggage"), get(list_luggage))
        .route(
            &format!("{o}/luggage/{{key}}"),
            axum::routing::put(set_luggage).delete(delete_luggage),
        )
        // Tokens on routes only: an unknown path is a 404 for anyone.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint (see /v1/openapi.json)".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint (see /v1/openapi.json)".into(),
            )
        })
        // Host and origin first, for every request.
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_host))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state))
}

/// Refuses requests naming a foreign host (DNS rebinding) or coming from a
/// web page of a foreign origin, before anything else looks at them.
async fn check_host(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Err((status, message)) = state.hosts.check(req.uri(), req.headers()) {
        return ApiError(status, message).into_response();
    }
    next.run(req).await
}

/// Reads need the read token or the admin token (health and the OpenAPI
/// document need none); changes and the key export need the admin token.
/// `?token=` is taken only on the event stream's WebSocket upgrade, which
/// a browser cannot give headers.
async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let from_query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_owned));
    if from_query.is_some() && !access::is_event_stream(path) {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "`?token=` is accepted only on the event stream's WebSocket (…/events/ws): send `Authorization: Bearer <token>`"
                .into(),
        )
        .into_response();
    }
    let scope = access::required_scope(req.method(), path);
    if scope == access::Scope::Open {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .or(from_query);
    let admin = given
        .as_deref()
        .is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()));
    let refusal = match given {
        None if scope == access::Scope::Admin => Some((
            StatusCode::UNAUTHORIZED,
            "this request needs the admin token: send `Authorization: Bearer <token>` (the token is in the agent's data directory, file admin-token)",
        )),
        None => Some((
            StatusCode::UNAUTHORIZED,
            "this request needs a token: send `Authorization: Bearer <token>` with the read token or the admin token (files read-token and admin-token in the agent's data directory)",
        )),
        Some(t) => {
            let read = state
                .read_token
                .as_ref()
                .is_some_and(|r| constant_time_eq(t.as_bytes(), r.as_bytes()));
            match scope {
                _ if admin => None,
                access::Scope::Admin if read => Some((
                    StatusCode::FORBIDDEN,
                    "the read token cannot do this: it needs the admin token (file admin-token in the agent's data directory)",
                )),
                access::Scope::Admin => Some((StatusCode::UNAUTHORIZED, "wrong admin token")),
                _ if read => None,
                _ => Some((
                    StatusCode::UNAUTHORIZED,
                    "wrong token: neither the read token nor the admin token",
                )),
            }
        }
    };
    if let Some((status, m)) = refusal {
        return ApiError(status, m.into()).into_response();
    }
    req.extensions_mut()
        .insert(if admin { Grant::Admin } else { Grant::Read });
    next.run(req).await
}

impl AppState {
    /// A long-poll slot when `wait` is not zero; 503 when all are taken.
    fn long_poll(&self, wait: Duration) -> ApiResult<Option<tokio::sync::OwnedSemaphorePermit>> {
        if wait.is_zero() {
            return Ok(None);
        }
        self.long_polls.clone().try_acquire_owned().map(Some).map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} key operations are already waiting for the members, the most the API runs at once: \
                     retry later, or with ?wait=0 (the change still spreads; `keys` shows who has it)",
                    self.max_long_polls
                ),
            )
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API on `bind`, loopback host names only, with `token` as the
/// admin token and no read token, until the returned server task is
/// aborted.
pub async fn serve(
    agent: AgentRef,
    bind: SocketAddr,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(agent, ApiOptions::new(bind, token)).await
}

/// Serves the API as `options` say until the returned server task is
/// aborted (which closes its connections too).
pub async fn serve_with(
    agent: AgentRef,
    mut options: ApiOptions,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(options.bind).await?;
    let addr = listener.local_addr()?;
    options.bind = addr;
    let app = router_with(agent, &options).map_err(std::io::Error::other)?;
    let task = tokio::spawn(accept(
        listener,
        app,
        options.header_read_timeout,
        options.max_connections,
    ));
    Ok((addr, task))
}

/// Accepts connections and serves each over HTTP/1.1 (upgrades allowed)
/// with a time limit on request heads and a bound on their size and on
/// the number of connections.
async fn accept(listener: tokio::net::TcpListener, app: Router, header_timeout: Duration, max_connections: usize) {
    use hyper::service::Service as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    // Dropped with this task: upgraded connections, which outlive their
    // connection task, see it and close.
    let (_stop, stopped) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The slot goes with every request of the connection, so that an
        // upgraded one (a WebSocket) keeps it after this task ends.
        let connection = Connection {
            _slot: Arc::new(permit),
            stopped: stopped.clone(),
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(connection.clone());
            inner.call(req)
        });
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD);
            if let Err(e) = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
}

/// Agent health and version.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
async fn health(State(s): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        overlays: s.agent.overlay_names().await,
    })
}

/// Every overlay of the agent.
#[utoipa::path(get, path = "/v1/overlays", responses((status = 200, body = [OverlaySummary])))]
async fn list_overlays(State(s): State<AppState>) -> ApiResult<Json<Vec<OverlaySummary>>> {
    Ok(Json(s.agent.overlays().await))
}

/// Creates and starts an overlay.
#[utoipa::path(post, path = "/v1/overlays", request_body = OverlaySpec, security(("admin_token" = [])),
    responses((status = 201, body = OverlaySummary), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_overlay(State(s): State<AppState>, Body(spec): Body<OverlaySpec>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(s.agent.create_overlay(spec).await?)))
}

/// One overlay: status, counters and settings (keys masked).
#[utoipa::path(get, path = "/v1/overlays/{overlay}", params(("overlay" = String, Path)),
    responses((status = 200, body = OverlaySummary), (status = 404, body = ErrorBody)))]
async fn get_overlay(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<OverlaySummary>> {
    Ok(Json(s.agent.overlay(&overlay).await?))
}

/// Replaces an overlay's settings and restarts it (keys are kept).
#[utoipa::path(put, path = "/v1/overlays/{overlay}", params(("overlay" = String, Path)), request_body = OverlaySpec,
    security(("admin_token" = [])),
    responses((status = 200, body = OverlaySummary), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_overlay(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    Body(spec): Body<OverlaySpec>,
) -> ApiResult<Json<OverlaySummary>> {
    Ok(Json(s.agent.update_overlay(&overlay, spec).await?))
}

/// Leaves gracefully and deletes an overlay.
#[utoipa::path(delete, path = "/v1/overlays/{overlay}", params(("overlay" = String, Path)),
    security(("admin_token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_overlay(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<StatusCode> {
    s.agent.delete_overlay(&overlay).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which racks a member listing covers.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MembersQuery {
    /// Only the members of this rack: this member's rack as seen here,
    /// another as its gateway reports it (rows as `RackMemberRow`).
    pub rack: Option<String>,
    /// The members of every rack (rows as `RackMemberRow`).
    pub all_racks: Option<bool>,
}

/// A member listing: of this member's rack (or overlay, without racks) as
/// `MemberRow`s, or of other racks too as `RackMemberRow`s.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MemberList {
    /// Without `rack` or `all_racks`.
    Members(Vec<MemberRow>),
    /// With `rack` or `all_racks=true`.
    Racks(Vec<RackMemberRow>),
}

/// The members: the local one first, then by name; with `rack=R` those
/// of rack R, with `all_racks=true` those of every rack (other racks'
/// members with the state their gateway reports and the report's age).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/members", params(("overlay" = String, Path), MembersQuery),
    responses((status = 200, body = MemberList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn members(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    q: Result<Query<MembersQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<MemberList>> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    match (q.rack, q.all_racks.unwrap_or(false)) {
        (Some(_), true) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "rack and all_racks=true are exclusive: give one".into(),
        )),
        (None, false) => Ok(Json(MemberList::Members(s.agent.members(&overlay).await?))),
        (rack, _) => Ok(Json(MemberList::Racks(s.agent.rack_members(&overlay, rack).await?))),
    }
}

/// The racks this member knows, its own first: gateway, Raft term,
/// candidates with their roles, members alive/suspect/failed, and how long
/// ago each was last heard from. Empty for an overlay without racks.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/racks", params(("overlay" = String, Path)),
    responses((status = 200, body = [RackRow]), (status = 404, body = ErrorBody)))]
async fn racks(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<Vec<RackRow>>> {
    Ok(Json(s.agent.racks(&overlay).await?))
}

/// Joins members (after a leave, the overlay restarts first).
#[utoipa::path(post, path = "/v1/overlays/{overlay}/join", params(("overlay" = String, Path)), request_body = JoinRequest,
    security(("admin_token" = [])), responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn join(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    Body(req): Body<JoinRequest>,
) -> ApiResult<StatusCode> {
    s.agent.join(&overlay, req.addrs).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Leaves the overlay gracefully (it stays configured).
#[utoipa::path(post, path = "/v1/overlays/{overlay}/leave", params(("overlay" = String, Path)),
    security(("admin_token" = [])), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn leave(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<StatusCode> {
    s.agent.leave(&overlay).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The values, by key.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/updates", params(("overlay" = String, Path), ListQuery),
    responses((status = 200, body = [UpdateRow]), (status = 404, body = ErrorBody)))]
async fn list_updates(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<UpdateRow>>> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(s.agent.list(&overlay, q.prefix).await?))
}

/// One value.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/updates/{key}", params(("overlay" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = UpdateRow), (status = 404, body = ErrorBody)))]
async fn get_update(
    State(s): State<AppState>,
    Path((overlay, key)): Path<(String, String)>,
) -> ApiResult<Json<UpdateRow>> {
    Ok(Json(s.agent.get(&overlay, &key).await?))
}

/// Writes a value; it spreads to every member.
#[utoipa::path(put, path = "/v1/overlays/{overlay}/updates/{key}", params(("overlay" = String, Path), ("key" = String, Path)),
    request_body = PutRequest, security(("admin_token" = [])),
    responses((status = 200, body = UpdateRow), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_update(
    State(s): State<AppState>,
    Path((overlay, key)): Path<(String, String)>,
    Body(req): Body<PutRequest>,
) -> ApiResult<Json<UpdateRow>> {
    let value = match (req.value, req.value_base64) {
        (Some(v), None) => v.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "value_base64 is not valid base64".into()))?,
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give exactly one of `value` (text) and `value_base64`".into(),
            ));
        }
    };
    Ok(Json(s.agent.put(&overlay, &key, value).await?))
}

/// Deletes a value; the delete spreads like a write.
#[utoipa::path(delete, path = "/v1/overlays/{overlay}/updates/{key}", params(("overlay" = String, Path), ("key" = String, Path)),
    security(("admin_token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_update(
    State(s): State<AppState>,
    Path((overlay, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.agent.delete(&overlay, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The keyring: ids and suites, never secrets.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/keys", params(("overlay" = String, Path)),
    responses((status = 200, body = [KeyRow]), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn list_keys(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<Vec<KeyRow>>> {
    Ok(Json(s.agent.keys(&overlay).await?))
}

/// Installs a key on every member of the overlay (`scope=overlay`, the
/// default: the secret travels sealed under the current keys and waits for
/// every live member to report it), or on this agent alone (`scope=local`:
/// the secret never leaves it; answers at once with who reports the key).
/// Packets sealed with it are accepted from now on.
#[utoipa::path(post, path = "/v1/overlays/{overlay}/keys", params(("overlay" = String, Path), WaitQuery, ScopeQuery), request_body = KeyRequest,
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange, description = "not every member followed in time"),
        (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn install_key(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    scope: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
    Body(req): Body<KeyRequest>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    if ScopeQuery::local(scope)? {
        let change = s.agent.install_local_key(&overlay, &req.key).await?;
        return Ok((StatusCode::OK, Json(change)));
    }
    let _slot = s.long_poll(wait)?;
    let change = s.agent.install_key(&overlay, &req.key, wait).await?;
    Ok((change_status(&change), Json(change)))
}

/// Makes a key primary on every member (refused unless every live member
/// not excluded has it installed).
#[utoipa::path(post, path = "/v1/overlays/{overlay}/keys/{id}/use", params(("overlay" = String, Path), ("id" = String, Path), WaitQuery, ExcludeQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn use_key(
    State(s): State<AppState>,
    Path((overlay, id)): Path<(String, String)>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    exclude: Result<Query<ExcludeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    let exclude = ExcludeQuery::members(exclude)?;
    let _slot = s.long_poll(wait)?;
    let change = s.agent.use_key(&overlay, &id, wait, &exclude).await?;
    Ok((change_status(&change), Json(change)))
}

/// Removes a key from every member (refused while a live member not
/// excluded seals with it), or from this agent alone (`scope=local`, for a
/// key installed locally that no rotation uses yet).
#[utoipa::path(delete, path = "/v1/overlays/{overlay}/keys/{id}", params(("overlay" = String, Path), ("id" = String, Path), WaitQuery, ExcludeQuery, ScopeQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn remove_key(
    State(s): State<AppState>,
    Path((overlay, id)): Path<(String, String)>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    exclude: Result<Query<ExcludeQuery>, axum::extract::rejection::QueryRejection>,
    scope: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    let exclude = ExcludeQuery::members(exclude)?;
    if ScopeQuery::local(scope)? {
        let change = s.agent.remove_local_key(&overlay, &id).await?;
        return Ok((StatusCode::OK, Json(change)));
    }
    let _slot = s.long_poll(wait)?;
    let change = s.agent.remove_key(&overlay, &id, wait, &exclude).await?;
    Ok((change_status(&change), Json(change)))
}

/// The keyring's secrets, for other agents to join (admin token required).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/keys/export", params(("overlay" = String, Path)),
    security(("admin_token" = [])), responses((status = 200, body = KeyExport), (status = 401, body = ErrorBody)))]
async fn export_keys(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<KeyExport>> {
    Ok(Json(KeyExport {
        keys: s.agent.export_keys(&overlay).await?,
    }))
}

/// Body of a publish: `payload` (text) or `payload_base64`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Topic (1–255 bytes).
    pub topic: String,
    /// Payload as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Payload as base64.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Delivery (default best effort).
    #[serde(default = "best_effort")]
    pub delivery: DeliverySpec,
}

fn best_effort() -> DeliverySpec {
    DeliverySpec::BestEffort
}

/// Exactly one of a text and a base64 field.
fn bytes_of(text: Option<String>, b64: Option<String>, what: &str) -> ApiResult<Vec<u8>> {
    match (text, b64) {
        (Some(v), None) => Ok(v.into_bytes()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("{what}_base64 is not valid base64"))),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("give exactly one of `{what}` (text) and `{what}_base64`"),
        )),
    }
}

/// Publishes an event to the topic's subscribers. An at-least-once event
/// is stored before the answer; its reports come later (`GET …/events/{id}`).
#[utoipa::path(post, path = "/v1/overlays/{overlay}/events", params(("overlay" = String, Path)), request_body = PublishRequest,
    security(("admin_token" = [])),
    responses((status = 202, body = EventRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn publish(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    Body(req): Body<PublishRequest>,
) -> ApiResult<impl IntoResponse> {
    let payload = bytes_of(req.payload, req.payload_base64, "payload")?;
    let record = s.agent.publish(&overlay, &req.topic, payload, &req.delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// An at-least-once event this agent published, with a report per subscriber.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/events/{id}", params(("overlay" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = EventRecord), (status = 404, body = ErrorBody)))]
async fn get_event(
    State(s): State<AppState>,
    Path((overlay, id)): Path<(String, String)>,
) -> ApiResult<Json<EventRecord>> {
    Ok(Json(s.agent.event(&overlay, &id).await?))
}

/// Where to read the inbox from.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct InboxQuery {
    /// Entries after this sequence number (default 0).
    pub from: Option<u64>,
    /// At most this many (default 1000).
    pub limit: Option<usize>,
    /// Comma-separated topics (default: all).
    pub topics: Option<String>,
}

fn topic_list(topics: Option<&str>) -> Vec<String> {
    topics
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The inbox: events, membership changes, luggage changes and reports for
/// the agent's topics, in order.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/events", params(("overlay" = String, Path), InboxQuery),
    responses((status = 200, body = [InboxItem]), (status = 404, body = ErrorBody)))]
async fn read_inbox(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<InboxItem>>> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let topics = topic_list(q.topics.as_deref());
    let mut items = s
        .agent
        .inbox(&overlay, q.from.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000))
        .await?;
    if !topics.is_empty() {
        items.retain(|i| topics.contains(&i.topic));
    }
    Ok(Json(items))
}

/// Streams the inbox entries of `topics` as JSON text messages, from
/// `from` on (default: from now). One that reconnects with `from` = the
/// last `seq` it saw misses nothing and sees nothing twice. With the admin
/// token it first subscribes the agent to `topics` (kept across restarts,
/// and gossiped for application topics); the read token follows only
/// topics the agent already subscribes to (local ones such as
/// `member.failed` included), else 403. Needs a token in `Authorization`
/// (or `?token=`, here only), and a page of the API's own origin when it
/// comes from a browser. At most 64 followers at once (503 beyond, with
/// `Retry-After`).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/events/ws", params(("overlay" = String, Path), InboxQuery),
    security(("read_token" = []), ("admin_token" = [])),
    responses((status = 101, description = "WebSocket of InboxItem JSON messages"), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn events_ws(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
    grant: Option<axum::Extension<Grant>>,
    connection: Option<axum::Extension<Connection>>,
    ws: axum::extract::WebSocketUpgrade,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let topics = topic_list(q.topics.as_deref());
    if topics.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give the topics to follow: ?topics=a,b".into(),
        ));
    }
    let admin = grant.is_some_and(|axum::Extension(g)| g == Grant::Admin);
    if !admin {
        refuse_new_topics(&s.agent.subscriptions(&overlay).await?, &topics)?;
    }
    // A slot before anything is changed: a refused follower subscribes nothing.
    let slot = s.followers.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} event-stream followers are already connected, the most the API serves at once: \
                 retry later, or read the inbox with GET …/events?from=",
                s.max_followers
            ),
        )
    })?;
    if admin {
        s.agent.subscribe(&overlay, &topics).await?;
    }
    let (last, feed) = s.agent.inbox_feed(&overlay).await?;
    let from = q.from.unwrap_or(last);
    if from > last {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("from={from} is beyond the inbox's last entry ({last}): was the overlay recreated?"),
        ));
    }
    let agent = s.agent.clone();
    let connection = connection.map(|axum::Extension(c)| c);
    Ok(ws.on_upgrade(move |socket| async move {
        // Both slots last as long as the stream.
        let _slot = slot;
        let stopped = connection.as_ref().map(|c| c.stopped.clone());
        stream_inbox(agent, overlay, topics, from, feed, socket, stopped).await;
        drop(connection);
    }))
}

/// 403 when `topics` has some the agent does not subscribe to: the read
/// token follows, it does not subscribe.
fn refuse_new_topics(subscribed: &[String], topics: &[String]) -> ApiResult<()> {
    let new: Vec<&String> = topics.iter().filter(|t| !subscribed.contains(t)).collect();
    if new.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 8;
    let mut names = new
        .iter()
        .take(SHOWN)
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if new.len() > SHOWN {
        names.push_str(&format!(" and {} more", new.len() - SHOWN));
    }
    Err(ApiError(
        StatusCode::FORBIDDEN,
        format!(
            "the agent does not subscribe to {names}: the read token follows only topics the agent already \
             subscribes to; subscribing needs the admin token (PUT …/subscriptions/{{topic}}, or this stream \
             with the admin token)"
        ),
    ))
}

async fn stream_inbox(
    agent: AgentRef,
    overlay: String,
    topics: Vec<String>,
    mut sent: u64,
    mut feed: tokio::sync::broadcast::Receiver<Arc<InboxItem>>,
    mut socket: axum::extract::ws::WebSocket,
    mut stopped: Option<tokio::sync::watch::Receiver<()>>,
) {
    use axum::extract::ws::Message;
    use tokio::sync::broadcast::error::RecvError;
    async fn send(socket: &mut axum::extract::ws::WebSocket, item: &InboxItem) -> bool {
        let text = serde_json::to_string(item).unwrap_or_default();
        socket.send(Message::Text(text.into())).await.is_ok()
    }
    let mut backlog = true;
    loop {
        if backlog {
            // Stored entries first, then the live feed.
            let Ok(items) = agent.inbox(&overlay, sent, 1000).await else {
                return;
            };
            if items.is_empty() {
                backlog = false;
                continue;
            }
            for it in items {
                sent = it.seq;
                if topics.contains(&it.topic) && !send(&mut socket, &it).await {
                    return;
                }
            }
            continue;
        }
        tokio::select! {
            item = feed.recv() => match item {
                Ok(it) if it.seq <= sent => {}
                Ok(it) if it.seq == sent + 1 && !it.elided => {
                    sent = it.seq;
                    if topics.contains(&it.topic) && !send(&mut socket, &it).await {
                        return;
                    }
                }
                // A gap (entries stored before we listened, or missed), or
                // an entry whose payload the feed left out: read from the store.
                Ok(_) | Err(RecvError::Lagged(_)) => backlog = true,
                Err(RecvError::Closed) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            // The server stopped (its task aborted): close the stream too.
            () = server_stopped(&mut stopped) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Completes when the server's task has stopped (never without a signal).
async fn server_stopped(signal: &mut Option<tokio::sync::watch::Receiver<()>>) {
    match signal {
        // Nothing is ever sent: this returns once the sender is dropped.
        Some(s) => while s.changed().await.is_ok() {},
        None => std::future::pending().await,
    }
}

/// Topics the agent subscribes to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Topics {
    /// The topics.
    pub topics: Vec<String>,
}

/// The agent's topics (application topics and local ones such as `member.failed`).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/subscriptions", params(("overlay" = String, Path)),
    responses((status = 200, body = Topics), (status = 404, body = ErrorBody)))]
async fn list_subscriptions(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<Topics>> {
    Ok(Json(Topics {
        topics: s.agent.subscriptions(&overlay).await?,
    }))
}

/// Subscribes the agent to a topic (kept across restarts).
#[utoipa::path(put, path = "/v1/overlays/{overlay}/subscriptions/{topic}", params(("overlay" = String, Path), ("topic" = String, Path)),
    security(("admin_token" = [])), responses((status = 200, body = Topics), (status = 400, body = ErrorBody)))]
async fn subscribe(
    State(s): State<AppState>,
    Path((overlay, topic)): Path<(String, String)>,
) -> ApiResult<Json<Topics>> {
    Ok(Json(Topics {
        topics: s.agent.subscribe(&overlay, &[topic]).await?,
    }))
}

/// Unsubscribes the agent from a topic.
#[utoipa::path(delete, path = "/v1/overlays/{overlay}/subscriptions/{topic}", params(("overlay" = String, Path), ("topic" = String, Path)),
    security(("admin_token" = [])), responses((status = 200, body = Topics), (status = 404, body = ErrorBody)))]
async fn unsubscribe(
    State(s): State<AppState>,
    Path((overlay, topic)): Path<(String, String)>,
) -> ApiResult<Json<Topics>> {
    Ok(Json(Topics {
        topics: s.agent.unsubscribe(&overlay, &topic).await?,
    }))
}

/// One member's luggage entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LuggageRow {
    /// The member.
    pub member: String,
    /// The key.
    pub key: String,
    /// The value as text, when UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value, base64.
    pub value_base64: String,
}

/// Luggage of every member (`?member=` for one).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/luggage", params(("overlay" = String, Path), ("member" = Option<String>, Query)),
    responses((status = 200, body = [LuggageRow]), (status = 404, body = ErrorBody)))]
async fn list_luggage(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Vec<LuggageRow>>> {
    let rows = s.agent.luggage(&overlay, q.get("member").cloned()).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(member, key, v)| LuggageRow {
                member,
                key,
                value: std::str::from_utf8(&v).ok().map(str::to_owned),
                value_base64: base64::engine::general_purpose::STANDARD.encode(&v),
            })
            .collect(),
    ))
}

/// Sets one of this member's luggage entries (body as for values).
#[utoipa::path(put, path = "/v1/overlays/{overlay}/luggage/{key}", params(("overlay" = String, Path), ("key" = String, Path)),
    request_body = PutRequest, security(("admin_token" = [])), responses((status = 204), (status = 400, body = ErrorBody)))]
async fn set_luggage(
    State(s): State<AppState>,
    Path((overlay, key)): Path<(String, String)>,
    Body(req): Body<PutRequest>,
) -> ApiResult<StatusCode> {
    let value = bytes_of(req.value, req.value_base64, "value")?;
    s.agent.set_luggage(&overlay, &key, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes one of this member's luggage entries.
#[utoipa::path(delete, path = "/v1/overlays/{overlay}/luggage/{key}", params(("overlay" = String, Path), ("key" = String, Path)),
    security(("admin_token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_luggage(
    State(s): State<AppState>,
    Path((overlay, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.agent.delete_luggage(&overlay, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, ClientError};
    use crate::config::AgentConfig;
    use serde_json::{Value, json};

    struct Fixture {
        agent: AgentRef,
        server: tokio::task::JoinHandle<()>,
        admin: Client,
        reader: Client,
        anonymous: Client,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        async fn new(tag: &str) -> Fixture {
            Fixture::with(tag, |_| {}).await
        }

        async fn with(tag: &str, adjust: impl FnOnce(&mut ApiOptions)) -> Fixture {
            let dir = std::env::temp_dir().join(format!("rm-api-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut spec = OverlaySpec::named("default");
            spec.bind = "127.0.0.1:0".into();
            spec.member = Some("api-test".into());
            spec.rack = Some("r1".into());
            spec.keys = vec![crate::config::generate_key()];
            let config = AgentConfig {
                data_dir: dir.clone(),
                overlays: vec![spec],
                ..AgentConfig::default()
            };
            let agent = Agent::start(TokioNet, config).await.unwrap();
            let mut options = ApiOptions::new("127.0.0.1:0".parse().unwrap(), "sesame".into());
            options.read_token = Some("reader".into());
            adjust(&mut options);
            let (addr, server) = serve_with(agent.clone(), options).await.unwrap();
            Fixture {
                agent,
                server,
                admin: Client::new(addr, Some("sesame".into())),
                reader: Client::new(addr, Some("reader".into())),
                anonymous: Client::new(addr, None),
                dir,
            }
        }

        async fn finish(self) {
            self.server.abort();
            self.agent.shutdown(false).await;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn api_err(r: Result<Value, ClientError>) -> (u16, String) {
        match r {
            Err(ClientError::Api { status, message }) => (status, message),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_need_a_token_and_changes_the_admin_token() {
        let f = Fixture::new("auth").await;
        // Health and the OpenAPI document are open.
        let health = f.anonymous.get("/v1/health").await.unwrap();
        assert_eq!(health["status"], "ok");
        f.anonymous.get("/v1/openapi.json").await.unwrap();
        // Everything else needs a token, payloads first.
        for path in [
            "/v1/overlays/default/events?from=0",
            "/v1/overlays/default/updates",
            "/v1/overlays/default/updates/k",
            "/v1/overlays/default/members",
            "/v1/overlays/default/luggage",
            "/v1/overlays/default",
            "/v1/overlays",
        ] {
            let (status, msg) = api_err(f.anonymous.get(path).await);
            assert_eq!(status, 401, "{path}: {msg}");
            assert!(msg.contains("read token or the admin token"), "{msg}");
        }
        let wrong = Client::new(f.server_addr(), Some("guess".into()));
        let (status, msg) = api_err(wrong.get("/v1/overlays/default/events?from=0").await);
        assert_eq!(
            (status, msg.as_str()),
            (401, "wrong token: neither the read token nor the admin token")
        );
        // The read token reads, the admin token too.
        f.admin
            .request("PUT", "/v1/overlays/default/updates/k", Some(json!({ "value": "v" })))
            .await
            .unwrap();
        for c in [&f.reader, &f.admin] {
            let members = c.get("/v1/overlays/default/members").await.unwrap();
            assert_eq!(members[0]["name"], "api-test");
            assert_eq!(members[0]["rack"], "r1");
            assert_eq!(c.get("/v1/overlays/default/updates/k").await.unwrap()["value"], "v");
            assert!(c.get("/v1/overlays/default/events?from=0").await.unwrap().is_array());
        }
        // The read token changes nothing and exports no key.
        let body = Some(json!({ "value": "w" }));
        for (method, path) in [
            ("PUT", "/v1/overlays/default/updates/k"),
            ("DELETE", "/v1/overlays/default/updates/k"),
            ("PUT", "/v1/overlays/default/subscriptions/t"),
            ("GET", "/v1/overlays/default/keys/export"),
        ] {
            let (status, msg) = api_err(
                f.reader
                    .request(method, path, body.clone().filter(|_| method == "PUT"))
                    .await,
            );
            assert_eq!(status, 403, "{method} {path}: {msg}");
            assert!(msg.contains("needs the admin token"), "{msg}");
        }
        let (status, msg) = api_err(f.reader.get("/v1/overlays/default/keys/export").await);
        assert_eq!(status, 403, "{msg}");
        assert_eq!(
            f.reader.get("/v1/overlays/default/updates/k").await.unwrap()["value"],
            "v"
        );
        // Changes without the admin token.
        let (status, msg) = api_err(
            f.anonymous
                .request("PUT", "/v1/overlays/default/updates/k", body.clone())
                .await,
        );
        assert_eq!(status, 401);
        assert!(msg.contains("admin token"), "{msg}");
        let (status, msg) = api_err(
            wrong
                .request("PUT", "/v1/overlays/default/updates/k", body.clone())
                .await,
        );
        assert_eq!((status, msg.as_str()), (401, "wrong admin token"));
        let (status, _) = api_err(f.anonymous.get("/v1/overlays/default/keys/export").await);
        assert_eq!(status, 401);
        let exported = f.admin.get("/v1/overlays/default/keys/export").await.unwrap();
        assert_eq!(exported["keys"].as_array().map(Vec::len), Some(1));
        // An unknown endpoint is a 404 for anyone.
        let (status, _) = api_err(f.anonymous.get("/v1/nothing").await);
        assert_eq!(status, 404);
        f.finish().await;
    }

    /// Sends `head` (and `body`) on a new connection and returns the status
    /// and the body of the answer.
    async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "no complete answer within 10 s");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn get_with(path: &str, headers: &[(&str, &str)]) -> String {
        let mut head = format!("GET {path} HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer sesame\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    #[tokio::test]
    async fn a_rebinding_host_name_and_a_foreign_origin_are_refused() {
        let f = Fixture::new("hosts").await;
        let addr = f.server_addr();
        let port = addr.port();
        let inbox = "/v1/overlays/default/events?from=0";
        // A page of evil.example whose name now points to 127.0.0.1: its
        // requests name evil.example in Host (and come from its origin).
        for headers in [
            vec![("Host", format!("evil.example:{port}"))],
            vec![
                ("Host", format!("evil.example:{port}")),
                ("Origin", format!("http://evil.example:{port}")),
            ],
            vec![("Host", "127.0.0.1.nip.io".to_owned())],
        ] {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, body) = raw(addr, &get_with(inbox, &h), b"").await;
            assert_eq!(status, 403, "{headers:?}: {body}");
            assert!(body.contains("is not one this API answers to"), "{body}");
            let (status, _) = raw(addr, &get_with("/v1/health", &h), b"").await;
            assert_eq!(status, 403, "health through {headers:?}");
        }
        // A page of another local origin calling 127.0.0.1 directly.
        for origin in ["http://localhost:8080", "http://evil.example", "null"] {
            let h = [("Host", format!("127.0.0.1:{port}")), ("Origin", origin.to_owned())];
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, body) = raw(addr, &get_with(inbox, &h), b"").await;
            assert_eq!(status, 403, "{origin}: {body}");
            assert!(body.contains("are refused"), "{body}");
        }
        // Loopback names, the API's own origin, no Origin at all: served.
        for headers in [
            vec![("Host", format!("localhost:{port}"))],
            vec![("Host", format!("127.0.0.1:{port}"))],
            vec![("Host", format!("[::1]:{port}"))],
            vec![
                ("Host", format!("localhost:{port}")),
                ("Origin", format!("http://localhost:{port}")),
            ],
        ] {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, body) = raw(addr, &get_with(inbox, &h), b"").await;
            assert_eq!(status, 200, "{headers:?}: {body}");
        }
        f.finish().await;
    }

    #[tokio::test]
    async fn configured_host_names_and_origins_are_served() {
        let f = Fixture::with("hosts-conf", |o| {
            o.allowed_hosts = vec!["gossip.internal".into()];
            o.allowed_origins = vec!["https://ui.internal".into()];
        })
        .await;
        let addr = f.server_addr();
        let h = [("Host", "gossip.internal:7980"), ("Origin", "https://ui.internal")];
        let (status, body) = raw(addr, &get_with("/v1/overlays/default/members", &h), b"").await;
        assert_eq!(status, 200, "{body}");
        let h = [("Host", "other.internal:7980")];
        let (status, _) = raw(addr, &get_with("/v1/overlays/default/members", &h), b"").await;
        assert_eq!(status, 403);
        f.finish().await;
    }

    async fn ws_status(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<(), u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{addr}/v1/overlays/default/events/ws?topics=t{query}");
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut().insert(name, v.parse().unwrap());
        }
        let connect = tokio_tungstenite::connect_async(req);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok((mut ws, _))) => {
                let _ = ws.close(None).await;
                Ok(())
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
            Ok(Err(e)) => panic!("websocket: {e}"),
            Err(_) => panic!("no websocket answer within 10 s"),
        }
    }

    #[tokio::test]
    async fn the_event_stream_needs_a_token_and_refuses_foreign_origins() {
        let f = Fixture::new("ws").await;
        let addr = f.server_addr();
        assert_eq!(ws_status(addr, "", &[]).await, Err(401));
        assert_eq!(ws_status(addr, "&token=guess", &[]).await, Err(401));
        // The read token follows the stream of a subscribed topic, in the
        // header or the query.
        f.admin
            .request("PUT", "/v1/overlays/default/subscriptions/t", None)
            .await
            .unwrap();
        assert_eq!(ws_status(addr, "", &[("authorization", "Bearer reader")]).await, Ok(()));
        assert_eq!(ws_status(addr, "&token=reader", &[]).await, Ok(()));
        let own = format!("http://{addr}");
        assert_eq!(ws_status(addr, "&token=reader", &[("origin", &own)]).await, Ok(()));
        // A web page of another origin cannot, whatever token it has.
        for origin in ["http://evil.example", "http://localhost:1"] {
            assert_eq!(
                ws_status(addr, "&token=sesame", &[("origin", origin)]).await,
                Err(403),
                "{origin}"
            );
        }
        assert_eq!(
            ws_status(addr, "&token=sesame", &[("host", "evil.example")]).await,
            Err(403)
        );
        f.finish().await;
    }

    type Follower = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    /// Opens the event stream of `topics` with `token`; a refusal gives its
    /// status, `Retry-After` and message.
    async fn follow(addr: SocketAddr, topics: &str, token: &str) -> Result<Follower, (u16, Option<String>, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{addr}/v1/overlays/default/events/ws?topics={topics}")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await {
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let retry = resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap_or_default().to_owned());
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                let message = serde_json::from_str::<Value>(&body).unwrap()["error"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                Err((resp.status().as_u16(), retry, message))
            }
            Ok(Err(e)) => panic!("websocket: {e}"),
            Err(_) => panic!("no websocket answer within 10 s"),
        }
    }

    /// The next text message of a follower, within 10 s.
    async fn next_text(ws: &mut Follower) -> Value {
        use futures_util::StreamExt;
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    return serde_json::from_str(&t).unwrap();
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no message from the stream: {other:?}"),
            }
        }
        panic!("100 frames without a text message");
    }

    async fn topics_of(c: &Client) -> Vec<String> {
        let v = c.get("/v1/overlays/default/subscriptions").await.unwrap();
        serde_json::from_value(v["topics"].clone()).unwrap()
    }

    #[tokio::test]
    async fn the_read_token_follows_only_topics_the_agent_subscribes_to() {
        let f = Fixture::new("ws-read").await;
        let addr = f.server_addr();
        // Neither an application topic nor a local one: 403, nothing subscribed.
        for topics in ["t", "member.failed", "t,member.failed,u"] {
            let Err((status, _, msg)) = follow(addr, topics, "reader").await else {
                panic!("{topics}: the read token subscribed");
            };
            assert_eq!(status, 403, "{topics}: {msg}");
            assert!(msg.contains("needs the admin token"), "{msg}");
            let named = topics.split(',').all(|t| msg.contains(&format!("{t:?}")));
            assert!(named, "{topics}: {msg}");
            assert_eq!(topics_of(&f.reader).await, Vec::<String>::new(), "{topics}");
        }
        let Err((_, _, msg)) = follow(addr, "t,member.failed,u", "reader").await else {
            unreachable!()
        };
        assert!(msg.contains("\"t\", \"member.failed\", \"u\""), "{msg}");
        // Reading the inbox filtered by topic subscribes nothing either.
        f.reader
            .get("/v1/overlays/default/events?from=0&topics=t")
            .await
            .unwrap();
        assert_eq!(topics_of(&f.reader).await, Vec::<String>::new());
        // The admin token subscribes as it follows.
        let mut admin = follow(addr, "t,member.failed", "sesame").await.unwrap();
        assert_eq!(topics_of(&f.reader).await, vec!["member.failed", "t"]);
        // Now the read token follows them, and gets the events.
        let mut reader = follow(addr, "t", "reader").await.unwrap();
        let Err((status, _, msg)) = follow(addr, "t,u", "reader").await else {
            panic!("the read token subscribed to u");
        };
        assert_eq!(status, 403, "{msg}");
        assert!(msg.contains("\"u\"") && !msg.contains("\"t\""), "{msg}");
        f.admin
            .request(
                "POST",
                "/v1/overlays/default/events",
                Some(json!({ "topic": "t", "payload": "hello" })),
            )
            .await
            .unwrap();
        for ws in [&mut reader, &mut admin] {
            let item = next_text(ws).await;
            assert_eq!(
                (item["topic"].as_str(), item["payload"].as_str()),
                (Some("t"), Some("hello"))
            );
        }
        assert_eq!(topics_of(&f.reader).await, vec!["member.failed", "t"]);
        let _ = reader.close(None).await;
        let _ = admin.close(None).await;
        f.finish().await;
    }

    #[tokio::test]
    async fn followers_beyond_the_cap_are_refused_while_requests_still_answer() {
        let f = Fixture::with("ws-cap", |o| o.max_followers = 2).await;
        let addr = f.server_addr();
        f.admin
            .request("PUT", "/v1/overlays/default/subscriptions/t", None)
            .await
            .unwrap();
        let mut first = follow(addr, "t", "reader").await.unwrap();
        let _second = follow(addr, "t", "reader").await.unwrap();
        for (token, topics) in [("reader", "t"), ("sesame", "new")] {
            let Err((status, retry, msg)) = follow(addr, topics, token).await else {
                panic!("a third follower was served");
            };
            assert_eq!((status, retry.as_deref()), (503, Some("5")), "{msg}");
            assert!(msg.contains("2 event-stream followers"), "{msg}");
        }
        // The refused admin follower subscribed nothing.
        assert_eq!(topics_of(&f.reader).await, vec!["t"]);
        // Ordinary requests are served.
        for _ in 0..5 {
            assert_eq!(
                f.reader.get("/v1/overlays/default/members").await.unwrap()[0]["name"],
                "api-test"
            );
        }
        // A follower that closes makes room.
        let _ = first.close(None).await;
        drop(first);
        let started = std::time::Instant::now();
        let third = loop {
            match follow(addr, "t", "reader").await {
                Ok(ws) => break ws,
                Err((503, _, _)) if started.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("no room 5 s after a follower closed: {e:?}"),
            }
        };
        drop(third);
        f.finish().await;
    }

    #[tokio::test]
    async fn a_follower_keeps_its_connection_slot_until_it_closes() {
        use futures_util::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = Fixture::with("ws-slot", |o| {
            o.max_connections = 2;
            o.max_followers = 2;
        })
        .await;
        let addr = f.server_addr();
        // Not through the API: a client's idle keep-alive connection would
        // hold a slot.
        f.agent.subscribe("default", &["t".to_owned()]).await.unwrap();
        let mut first = follow(addr, "t", "reader").await.unwrap();
        let mut second = follow(addr, "t", "reader").await.unwrap();
        // Both connection slots are the followers': a request waits.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(get_with("/v1/health", &[("Host", "localhost")]).as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let early = tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut answer)).await;
        assert!(
            early.is_err(),
            "answered while the followers held every slot: {answer:?}"
        );
        // One closes: the request is served.
        let _ = first.close(None).await;
        drop(first);
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "no answer within 5 s of a follower closing");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // Stopping the server closes the followers it still has.
        f.server.abort();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match second.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a follower stayed open 5 s after the server stopped");
        f.finish().await;
    }

    #[tokio::test]
    async fn key_operations_that_wait_are_capped_and_ones_that_do_not_are_served() {
        let f = Fixture::with("long-poll-cap", |o| o.max_long_polls = 0).await;
        let addr = f.server_addr();
        let key = crate::config::generate_key();
        let body = serde_json::to_vec(&json!({ "key": key })).unwrap();
        let head = |wait: &str| {
            format!(
                "POST /v1/overlays/default/keys?wait={wait} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                 Authorization: Bearer sesame\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
        };
        let (status, msg) = raw(addr, &head("5"), &body).await;
        assert_eq!(status, 503, "{msg}");
        assert!(msg.contains("0 key operations are already waiting"), "{msg}");
        let keys = f.admin.get("/v1/overlays/default/keys").await.unwrap();
        assert_eq!(
            keys.as_array().map(Vec::len),
            Some(1),
            "the refused install installed nothing"
        );
        let (status, msg) = raw(addr, &head("0"), &body).await;
        assert_eq!(status, 200, "{msg}");
        f.finish().await;
    }

    #[tokio::test]
    async fn a_token_in_the_query_is_refused_except_on_the_event_stream() {
        let f = Fixture::new("query-token").await;
        for path in [
            "/v1/overlays/default/events?from=0&token=sesame",
            "/v1/overlays/default/keys/export?token=sesame",
            "/v1/health?token=sesame",
        ] {
            let (status, msg) = api_err(f.anonymous.get(path).await);
            assert_eq!(status, 400, "{path}: {msg}");
            assert!(msg.contains("only on the event stream"), "{msg}");
        }
        let (status, _) = api_err(
            f.anonymous
                .request(
                    "PUT",
                    "/v1/overlays/default/updates/k?token=sesame",
                    Some(json!({ "value": "v" })),
                )
                .await,
        );
        assert_eq!(status, 400);
        let (status, _) = api_err(f.admin.get("/v1/overlays/default/updates/k").await);
        assert_eq!(status, 404, "the refused write stored nothing");
        f.finish().await;
    }

    #[tokio::test]
    async fn a_half_sent_request_is_closed_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_millis(300);
        let f = Fixture::with("header-timeout", |o| o.header_read_timeout = timeout).await;
        let addr = f.server_addr();
        for sent in ["GET /v1/health HTTP/1.1\r\nHost: localhost\r\n", ""] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(sent.as_bytes()).await.unwrap();
            let started = std::time::Instant::now();
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let elapsed = started.elapsed();
            assert!(read.is_ok(), "{sent:?}: still open after 5 s");
            assert!(
                elapsed >= timeout / 2 && elapsed < Duration::from_secs(3),
                "{sent:?}: closed after {elapsed:?}"
            );
        }
        // A whole request is still served.
        let (status, _) = raw(addr, &get_with("/v1/health", &[("Host", "localhost")]), b"").await;
        assert_eq!(status, 200);
        f.finish().await;
    }

    #[tokio::test]
    async fn connections_are_capped_and_idle_ones_make_room_after_the_header_timeout() {
        let timeout = Duration::from_millis(400);
        let f = Fixture::with("conn-cap", |o| {
            o.header_read_timeout = timeout;
            o.max_connections = 2;
        })
        .await;
        let addr = f.server_addr();
        let idle: Vec<_> = [0, 1]
            .iter()
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // Both slots are taken (they were queued first): the third waits
        // until the idle ones are closed by the header timeout, then is
        // served.
        let started = std::time::Instant::now();
        let (status, _) = raw(addr, &get_with("/v1/health", &[("Host", "localhost")]), b"").await;
        let waited = started.elapsed();
        assert_eq!(status, 200);
        assert!(
            waited >= timeout / 2 && waited < Duration::from_secs(5),
            "served after {waited:?}"
        );
        drop(idle);
        f.finish().await;
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_with_a_message() {
        let f = Fixture::new("body-limit").await;
        let big = json!({ "value": "x".repeat(BODY_LIMIT + 1) });
        let (status, msg) = api_err(
            f.admin
                .request("PUT", "/v1/overlays/default/updates/k", Some(big))
                .await,
        );
        assert_eq!(status, 413, "{msg}");
        assert!(msg.contains(&format!("limit of {BODY_LIMIT} bytes")), "{msg}");
        // Without the admin token, the body is not even read: 401.
        let body = vec![b'x'; BODY_LIMIT + 1];
        let head = format!(
            "PUT /v1/overlays/default/updates/k HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (status, _) = raw(f.server_addr(), &head, &body).await;
        assert_eq!(status, 401);
        f.finish().await;
    }

    impl Fixture {
        fn server_addr(&self) -> SocketAddr {
            self.admin.addr()
        }
    }

    #[tokio::test]
    async fn values_round_trip_and_errors_say_what_was_wrong() {
        let f = Fixture::new("values").await;
        let row = f
            .admin
            .request(
                "PUT",
                "/v1/overlays/default/updates/a/b%20c",
                Some(json!({ "value": "hello" })),
            )
            .await
            .unwrap();
        assert_eq!(
            (row["key"].as_str(), row["value"].as_str()),
            (Some("a/b c"), Some("hello"))
        );
        let got = f.reader.get("/v1/overlays/default/updates/a/b%20c").await.unwrap();
        assert_eq!(got["value"], "hello");
        let list = f.reader.get("/v1/overlays/default/updates?prefix=a/").await.unwrap();
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        f.admin
            .request("DELETE", "/v1/overlays/default/updates/a/b%20c", None)
            .await
            .unwrap();
        let (status, msg) = api_err(f.reader.get("/v1/overlays/default/updates/a/b%20c").await);
        assert_eq!((status, msg.as_str()), (404, "no value under key \"a/b c\""));

        let (status, msg) = api_err(f.reader.get("/v1/overlays/nope/members").await);
        assert_eq!((status, msg.as_str()), (404, "no overlay named \"nope\""));
        let (status, msg) = api_err(f.anonymous.get("/v1/nothing").await);
        assert_eq!(status, 404);
        assert!(msg.contains("no such endpoint"), "{msg}");
        let (status, msg) = api_err(
            f.admin
                .request("PUT", "/v1/overlays/default/updates/k", Some(json!({ "valeu": "x" })))
                .await,
        );
        assert_eq!(status, 422);
        assert!(msg.contains("unknown field `valeu`"), "{msg}");
        let (status, msg) = api_err(
            f.admin
                .request("PUT", "/v1/overlays/default/updates/k", Some(json!({})))
                .await,
        );
        assert_eq!(status, 400);
        assert!(msg.contains("exactly one of"), "{msg}");
        let (status, msg) = api_err(
            f.admin
                .request(
                    "PUT",
                    "/v1/overlays/default/updates/_rumormill/rack/x",
                    Some(json!({ "value": "x" })),
                )
                .await,
        );
        assert_eq!(status, 400);
        assert!(msg.contains("reserved"), "{msg}");
        let (status, msg) = api_err(
            f.admin
                .request(
                    "POST",
                    "/v1/overlays/default/join",
                    Some(json!({ "addrs": ["nowhere"] })),
                )
                .await,
        );
        assert_eq!(status, 422);
        assert!(msg.contains("addrs"), "{msg}");
        f.finish().await;
    }

    #[tokio::test]
    async fn a_luggage_key_with_a_slash_goes_through_the_client() {
        let f = Fixture::new("slash").await;
        let on = f.admin.on("default");
        let put = PutRequest {
            value: Some("eu".into()),
            value_base64: None,
        };
        on.set_luggage("zone/rack", &put).await.expect("set");
        let rows = on.luggage(None).await.expect("luggage");
        assert!(
            rows.iter()
                .any(|r| r.key == "zone/rack" && r.value.as_deref() == Some("eu")),
            "{rows:?}"
        );
        on.delete_luggage("zone/rack").await.expect("delete");
        f.finish().await;
    }

    #[tokio::test]
    async fn overlays_are_created_masked_and_deleted() {
        let f = Fixture::new("overlays").await;
        let key = crate::config::generate_key();
        let spec = json!({ "name": "second", "bind": "127.0.0.1:0", "keys": [key] });
        let created = f
            .admin
            .request("POST", "/v1/overlays", Some(spec.clone()))
            .await
            .unwrap();
        assert_eq!(created["status"], "running");
        let (status, msg) = api_err(f.admin.request("POST", "/v1/overlays", Some(spec)).await);
        assert_eq!(
            (status, msg.as_str()),
            (409, "an overlay named \"second\" already exists")
        );
        let shown = f.reader.get("/v1/overlays/second").await.unwrap();
        assert!(!shown.to_string().contains(&key), "the key leaked: {shown}");
        assert_eq!(shown["spec"]["keys"][0], "<redacted>");
        let (status, msg) = api_err(
            f.admin
                .request(
                    "POST",
                    "/v1/overlays",
                    Some(json!({ "name": "third", "bind": "127.0.0.1:0" })),
                )
                .await,
        );
        assert_eq!(status, 422);
        assert!(msg.contains("no key"), "{msg}");

        // Key rotation rules.
        let keys = f.reader.get("/v1/overlays/second/keys").await.unwrap();
        let old = keys[0]["id"].as_str().unwrap().to_owned();
        let (status, msg) = api_err(
            f.admin
                .request("DELETE", &format!("/v1/overlays/second/keys/{old}"), None)
                .await,
        );
        assert_eq!(status, 409);
        assert!(msg.contains("is the primary key"), "{msg}");
        let new = crate::config::generate_key();
        let row = f
            .admin
            .request("POST", "/v1/overlays/second/keys", Some(json!({ "key": new })))
            .await
            .unwrap();
        let id = row["id"].as_str().unwrap().to_owned();
        assert_eq!(row["missing"], json!([]), "{row}");
        let (status, msg) = api_err(f.admin.request("POST", "/v1/overlays/second/keys/zz/use", None).await);
        assert_eq!(
            (status, msg.as_str()),
            (400, "\"zz\" is not a key id (8 hex digits, see `keys list`)")
        );
        f.admin
            .request("POST", &format!("/v1/overlays/second/keys/{id}/use"), None)
            .await
            .unwrap();
        f.admin
            .request("DELETE", &format!("/v1/overlays/second/keys/{old}"), None)
            .await
            .unwrap();
        let keys = f.reader.get("/v1/overlays/second/keys").await.unwrap();
        assert_eq!(
            keys,
            json!([{ "id": id, "suite": "aes-256-gcm", "primary": true, "local": false, "installed_on": 1, "primary_on": 1, "members": 1 }])
        );
        // The keyring is kept: a restart of the overlay uses the new key.
        let exported = f.admin.get("/v1/overlays/second/keys/export").await.unwrap();
        assert_eq!(exported["keys"], json!([new]));

        // A key installed on this agent alone, then removed from it.
        let (status, msg) = api_err(
            f.admin
                .request(
                    "POST",
                    "/v1/overlays/second/keys?scope=nope",
                    Some(json!({ "key": new })),
                )
                .await,
        );
        assert_eq!(
            (status, msg.as_str()),
            (400, "scope=\"nope\": expected overlay or local")
        );
        let local = crate::config::generate_key();
        let row = f
            .admin
            .request(
                "POST",
                "/v1/overlays/second/keys?scope=local",
                Some(json!({ "key": local })),
            )
            .await
            .unwrap();
        let local_id = row["id"].as_str().unwrap().to_owned();
        let keys = f.reader.get("/v1/overlays/second/keys").await.unwrap();
        let flags: Vec<(bool, bool)> = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["primary"] == true, k["local"] == true))
            .collect();
        assert_eq!(flags.len(), 2, "{keys}");
        assert!(
            flags.contains(&(true, false)) && flags.contains(&(false, true)),
            "{keys}"
        );
        f.admin
            .request(
                "DELETE",
                &format!("/v1/overlays/second/keys/{local_id}?scope=local"),
                None,
            )
            .await
            .unwrap();
        let exported = f.admin.get("/v1/overlays/second/keys/export").await.unwrap();
        assert_eq!(exported["keys"], json!([new]));

        // An update that cannot bind keeps the overlay running as it was.
        let taken = f.agent.overlay("default").await.unwrap().addr;
        let update = json!({ "name": "second", "bind": taken.to_string(), "profile": "wan" });
        let (status, msg) = api_err(f.admin.request("PUT", "/v1/overlays/second", Some(update)).await);
        assert_eq!(status, 409, "{msg}");
        assert!(msg.contains("cannot listen on"), "{msg}");
        let shown = f.reader.get("/v1/overlays/second").await.unwrap();
        assert_eq!(
            (shown["status"].as_str(), shown["spec"]["profile"].as_str()),
            (Some("running"), Some("lan"))
        );
        let update = json!({ "name": "second", "bind": "127.0.0.1:0", "member": "renamed" });
        let (status, msg) = api_err(f.admin.request("PUT", "/v1/overlays/second", Some(update)).await);
        assert_eq!(status, 400);
        assert!(msg.contains("member name"), "{msg}");
        let update = json!({ "name": "second", "bind": "127.0.0.1:0", "profile": "wan" });
        let shown = f
            .admin
            .request("PUT", "/v1/overlays/second", Some(update))
            .await
            .unwrap();
        // Epochs: 1 at creation, 2 for the restart with the old settings (the
        // failed start never sent a packet), 3 now.
        assert_eq!(
            (shown["spec"]["profile"].as_str(), shown["epoch"].as_u64()),
            (Some("wan"), Some(3))
        );
        // Restarting on the very same port works: the old sockets are closed
        // before the new ones bind.
        let port = shown["addr"].as_str().unwrap().rsplit_once(':').unwrap().1.to_owned();
        let update = json!({ "name": "second", "bind": format!("127.0.0.1:{port}"), "profile": "lan" });
        let shown = f
            .admin
            .request("PUT", "/v1/overlays/second", Some(update))
            .await
            .unwrap();
        assert_eq!(shown["addr"].as_str(), Some(format!("127.0.0.1:{port}").as_str()));

        f.admin.request("DELETE", "/v1/overlays/second", None).await.unwrap();
        let (status, _) = api_err(f.reader.get("/v1/overlays/second").await);
        assert_eq!(status, 404);
        f.finish().await;
    }

    #[tokio::test]
    async fn the_openapi_document_lists_every_route() {
        let f = Fixture::new("openapi").await;
        let doc = f.anonymous.get("/v1/openapi.json").await.unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/overlays",
            "/v1/overlays/{overlay}",
            "/v1/overlays/{overlay}/members",
            "/v1/overlays/{overlay}/updates/{key}",
            "/v1/overlays/{overlay}/keys/{id}/use",
        ] {
            assert!(paths.contains_key(p), "{p} missing from the OpenAPI document");
        }
        assert!(paths.contains_key("/v1/overlays/{overlay}/racks"), "racks missing");
        let params = doc["paths"]["/v1/overlays/{overlay}/members"]["get"]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for name in ["rack", "all_racks"] {
            let p = params.iter().find(|p| p["name"] == name);
            assert_eq!(p.map(|p| p["in"].clone()), Some(json!("query")), "{name}: {params:?}");
        }
        assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
        assert!(doc["components"]["securitySchemes"]["read_token"].is_object());
        f.finish().await;
    }

    #[tokio::test]
    async fn bad_publishes_are_refused_with_a_reason_and_store_nothing() {
        let f = Fixture::new("publish").await;
        let post = |body: Value| f.admin.request("POST", "/v1/overlays/default/events", Some(body));
        let cases = [
            (
                json!({ "topic": "", "payload": "x" }),
                400,
                "a topic name cannot be empty",
            ),
            (
                json!({ "topic": "t".repeat(256), "payload": "x" }),
                400,
                "topic name of 256 bytes: at most 255",
            ),
            (
                json!({ "topic": "t", "payload": "x".repeat((1 << 20) + 1) }),
                400,
                "payload of 1048577 bytes: at most 1048576",
            ),
            (
                json!({ "topic": "member.failed", "payload": "x" }),
                400,
                "is the agent's own",
            ),
            (json!({ "topic": "t" }), 400, "give exactly one of `payload`"),
            (
                json!({ "topic": "t", "payload": "x", "delivery": { "mode": "at_least_once", "retry_every": "1ms" } }),
                400,
                "retry_every must be at least 10ms",
            ),
            (
                json!({ "topic": "t", "payload": "x", "delivery": { "mode": "twice" } }),
                422,
                "unknown variant `twice`",
            ),
        ];
        for (body, status, needle) in cases {
            let (got, msg) = api_err(post(body).await);
            assert_eq!(got, status, "{msg}");
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        let (status, msg) = api_err(
            f.admin
                .request(
                    "POST",
                    "/v1/overlays/nope/events",
                    Some(json!({ "topic": "t", "payload": "x" })),
                )
                .await,
        );
        assert_eq!((status, msg.as_str()), (404, "no overlay named \"nope\""));
        // Nothing was stored: no record under the first id, an empty inbox.
        let (status, _) = api_err(f.reader.get("/v1/overlays/default/events/api-test/1/1").await);
        assert_eq!(status, 404);
        assert_eq!(
            f.reader.get("/v1/overlays/default/events?from=0").await.unwrap(),
            json!([])
        );
        f.finish().await;
    }

    #[tokio::test]
    async fn a_subscribed_agent_reads_its_own_events_and_reports_from_its_inbox() {
        let f = Fixture::new("inbox").await;
        let topics = f
            .admin
            .request("PUT", "/v1/overlays/default/subscriptions/orders", None)
            .await
            .unwrap();
        assert_eq!(topics, json!({ "topics": ["orders"] }));
        let body = json!({ "topic": "orders", "payload": "one", "delivery": { "mode": "at_least_once" } });
        let record = f
            .admin
            .request("POST", "/v1/overlays/default/events", Some(body))
            .await
            .unwrap();
        assert_eq!(record["id"], "api-test/1/1");
        // The agent itself subscribes: its own inbox is a subscriber too,
        // reported once the event is stored there.
        assert_eq!(record["subscribers"][0]["member"], "api-test", "{record}");
        let mut inbox = json!([]);
        for _ in 0..100 {
            inbox = f
                .reader
                .get("/v1/overlays/default/events?from=0&topics=orders")
                .await
                .unwrap();
            if inbox.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(inbox[0]["seq"], 1, "{inbox}");
        assert_eq!(inbox[0]["payload"], "one");
        let mut shown = json!(null);
        for _ in 0..100 {
            shown = f.reader.get("/v1/overlays/default/events/api-test/1/1").await.unwrap();
            if shown["complete"] == true {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(shown["subscribers"][0]["outcome"], "delivered", "{shown}");
        let (status, msg) = api_err(
            f.admin
                .request("DELETE", "/v1/overlays/default/subscriptions/nothing", None)
                .await,
        );
        assert_eq!(
            (status, msg.as_str()),
            (404, "the agent does not subscribe to \"nothing\"")
        );
        f.finish().await;
    }
}

#[cfg(test)]
mod racks_tests {
    //! The racks view through the API: three racks on loopback, one
    //! candidate each (a Raft group of one elects itself at once).
    use super::*;
    use crate::agent::tests::{scratch, spec, start, wait_until};
    use crate::client::{Client, ClientError};
    use serde_json::json;

    /// A candidate of `rack` (the only one), knowing `remote` gateways.
    fn candidate(rack: &str, member: &str, remote: &[SocketAddr]) -> OverlaySpec {
        let mut s = spec("a", member, &[]);
        s.rack = Some(rack.into());
        s.gateway = true;
        s.candidates = Some(1);
        s.remote_seeds = remote.iter().map(ToString::to_string).collect();
        s
    }

    async fn api(agent: &AgentRef) -> (Client, tokio::task::JoinHandle<()>) {
        let mut options = ApiOptions::new("127.0.0.1:0".parse().expect("addr"), "sesame".into());
        options.read_token = Some("reader".into());
        let (addr, server) = serve_with(agent.clone(), options).await.expect("api");
        (Client::new(addr, Some("reader".into())), server)
    }

    /// Waits until `c` lists `racks` racks, each with a gateway.
    async fn all_gateways(c: &Client, racks: usize) -> Vec<RackRow> {
        let mut last = Vec::new();
        wait_until("every rack to show a gateway", 30, async || {
            last = c.on("a").racks().await.map_err(|e| e.to_string())?;
            if last.len() == racks && last.iter().all(|r| r.gateway.is_some() && r.term > 0) {
                Ok(())
            } else {
                Err(format!("{last:?}"))
            }
        })
        .await;
        last
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_racks_show_their_gateways_and_a_restarted_candidate_keeps_its_term() {
        let dirs = [scratch("racks-eu"), scratch("racks-us"), scratch("racks-ap")];
        let eu = start(&dirs[0], vec![candidate("eu", "eu-1", &[])]).await;
        let eu_addr = eu.overlay("a").await.expect("a on eu").addr;
        let us = start(&dirs[1], vec![candidate("us", "us-1", &[eu_addr])]).await;
        let us_addr = us.overlay("a").await.expect("a on us").addr;
        let ap = start(&dirs[2], vec![candidate("ap", "ap-1", &[eu_addr, us_addr])]).await;
        let (c, server) = api(&ap).await;
        let racks = all_gateways(&c, 3).await;
        assert!(racks[0].local && racks[0].name == "ap", "own rack first: {racks:?}");
        assert_eq!(racks[0].gateway.as_deref(), Some("ap-1"));
        assert_eq!(
            racks[0].candidates,
            vec![CandidateRow {
                name: "ap-1".into(),
                role: "leader".into()
            }]
        );
        assert!(
            racks.iter().skip(1).all(|r| !r.local && r.last_heard_s.is_some()),
            "{racks:?}"
        );

        // Members of other racks come from their gateways' reports.
        wait_until("ap to list eu's member from eu's report", 30, async || {
            let rows = c.on("a").rack_members(Some("eu")).await.map_err(|e| e.to_string())?;
            match rows.as_slice() {
                [m] if m.name == "eu-1" && m.state == "alive" && m.report_age_s.is_some() && m.addr.is_none() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let all = c.on("a").rack_members(None).await.expect("all racks");
        let names: Vec<(&str, Option<&str>)> = all.iter().map(|m| (m.name.as_str(), m.rack.as_deref())).collect();
        assert_eq!(names[0], ("ap-1", Some("ap")), "the local member first: {names:?}");
        assert!(all[0].local && all[0].addr.is_some());
        // The plain listing stays this rack's members, as before.
        let plain = c.on("a").members().await.expect("members");
        assert_eq!(plain.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["ap-1"]);

        // Bad rack names are refused with the rule they break.
        let bad = c.get("/v1/overlays/a/members?rack=EU").await;
        match bad {
            Err(ClientError::Api { status: 400, message }) => {
                assert!(message.contains("'E' is not one of a-z"), "{message}")
            }
            other => panic!("expected 400, got {other:?}"),
        }
        let both = c.get("/v1/overlays/a/members?rack=eu&all_racks=true").await;
        assert!(matches!(both, Err(ClientError::Api { status: 400, .. })), "{both:?}");

        ap.subscribe("a", &["rack.gateway_changed".to_owned()])
            .await
            .expect("subscribe");
        // eu's candidate restarts from its data directory: its Raft term
        // comes back from redb, so its next term is above the last.
        let (ce, server_eu) = api(&eu).await;
        let before = all_gateways(&ce, 3).await[0].term;
        server_eu.abort();
        eu.shutdown(false).await;
        drop(eu);
        let ap_addr = ap.overlay("a").await.expect("a on ap").addr;
        let eu = start(&dirs[0], vec![candidate("eu", "eu-1", &[us_addr, ap_addr])]).await;
        let (ce, server_eu) = api(&eu).await;
        let after = all_gateways(&ce, 1).await;
        assert!(
            after[0].term > before,
            "a restarted candidate must keep its term: {before} before, {:?} after",
            after[0]
        );
        wait_until("ap to see eu's new term", 30, async || {
            let racks = c.on("a").racks().await.map_err(|e| e.to_string())?;
            match racks.iter().find(|r| r.name == "eu") {
                Some(r) if r.term > before => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // ...and its inbox tells of it.
        wait_until("ap's inbox to hold eu's new gateway", 10, async || {
            let items = ap.inbox("a", 0, 1000).await.map_err(|e| e.to_string())?;
            let found = items.iter().any(|i| {
                i.topic == "rack.gateway_changed"
                    && i.rack.as_deref() == Some("eu")
                    && i.member.as_deref() == Some("eu-1")
                    && i.term.is_some_and(|t| t > before)
            });
            if found { Ok(()) } else { Err(format!("{items:?}")) }
        })
        .await;
        server.abort();
        server_eu.abort();
        for a in [eu, us, ap] {
            a.shutdown(false).await;
        }
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overlay_without_racks_lists_none() {
        let dir = scratch("racks-flat");
        let x = start(&dir, vec![spec("a", "x", &[])]).await;
        let (c, server) = api(&x).await;
        assert!(c.on("a").racks().await.expect("racks").is_empty());
        let all = c.on("a").rack_members(None).await.expect("all racks");
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].name.as_str(), all[0].rack.as_deref()), ("x", None));
        server.abort();

        // Bad rack settings in a create are 400s naming the rule.
        let mut options = ApiOptions::new("127.0.0.1:0".parse().expect("addr"), "sesame".into());
        options.read_token = None;
        let (addr, server) = serve_with(x.clone(), options).await.expect("api");
        let admin = Client::new(addr, Some("sesame".into()));
        let base = json!({"name": "r", "bind": "127.0.0.1:0", "plaintext": true});
        for (extra, needle) in [
            (json!({"rack": "Eu"}), "'E' is not one of a-z"),
            (json!({"gateway": true}), "gateway = true needs a rack"),
            (
                json!({"rack": "eu", "gateway": true, "candidates": 0}),
                "candidates = 0",
            ),
            (
                json!({"rack": "eu", "remote_seeds": ["127.0.0.1:1"]}),
                "remote_seeds needs gateway = true",
            ),
        ] {
            let mut body = base.clone();
            body.as_object_mut()
                .expect("object")
                .extend(extra.as_object().expect("object").clone());
            match admin.request("POST", "/v1/overlays", Some(body.clone())).await {
                Err(ClientError::Api { status: 400, message }) => {
                    assert!(message.contains(needle) && !message.contains('\n'), "{body}: {message}")
                }
                other => panic!("{body}: expected 400, got {other:?}"),
            }
        }
        // An even number of candidates is allowed (with a warning in the log).
        let mut body = base.clone();
        body.as_object_mut().expect("object").extend(
            json!({"rack": "eu", "gateway": true, "candidates": 2})
                .as_object()
                .expect("object")
                .clone(),
        );
        admin
            .request("POST", "/v1/overlays", Some(body))
            .await
            .expect("two candidates");
        server.abort();
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
