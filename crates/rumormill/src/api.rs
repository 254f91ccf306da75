//! The HTTP control API: JSON over HTTP/1.1, described by the OpenAPI
//! document at `/v1/openapi.json`.
//!
//! Reads are open to whoever reaches the listener (127.0.0.1 by default);
//! every request that changes state, and the key export, need the admin
//! token as `Authorization: Bearer <token>`. Errors are
//! `{"error": "what was wrong"}` with a 4xx status (5xx only when the data
//! directory fails).
//!
//! ```no_run
//! # async fn f(agent: std::sync::Arc<rumormill::agent::Agent<rumormill::transport::TokioNet>>) -> std::io::Result<()> {
//! let (addr, server) = rumormill::api::serve(agent, "127.0.0.1:0".parse().unwrap(), "secret".into()).await?;
//! println!("API on http://{addr}/v1/openapi.json");
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::agent::{Agent, AgentError, MemberRow, OverlayStats, OverlaySummary, UpdateRow};
use crate::config::OverlaySpec;
use crate::events::{DeliverySpec, EventRecord, InboxItem, SubscriberReport};
use crate::keyring::{KeyChange, KeyRow};
use crate::transport::TokioNet;

type AgentRef = Arc<Agent<TokioNet>>;

#[derive(Clone)]
struct AppState {
    agent: AgentRef,
    token: Arc<str>,
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
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let status = match &e {
            AgentError::UnknownOverlay(_) | AgentError::UnknownKey(_) | AgentError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            AgentError::OverlayExists(_) | AgentError::Conflict(_) | AgentError::Bind { .. } => StatusCode::CONFLICT,
            AgentError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // The writer's data would be larger than the overlay stores for
            // one writer: a client error (retrying unchanged cannot help),
            // not a 5xx that clients and proxies would retry.
            AgentError::Quota(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        ApiError(status, e.to_string())
    }
}

/// A JSON body whose rejections are JSON errors too.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
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
    /// The key, base64 (`rumormill keygen`).
    pub key: String,
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
    info(title = "Rumormill agent API", description = "Control one Rumormill agent: overlays, members, values, keys."),
    paths(
        health, list_overlays, create_overlay, get_overlay, update_overlay, delete_overlay, members, join, leave,
        list_updates, get_update, put_update, delete_update, list_keys, install_key, use_key, remove_key, export_keys,
        publish, get_event, read_inbox, events_ws, list_subscriptions, subscribe, unsubscribe, list_luggage, set_luggage,
        delete_luggage
    ),
    components(schemas(
        ErrorBody, JoinRequest, PutRequest, KeyRequest, KeyExport, Health, OverlaySummary, OverlayStats, OverlaySpec,
        MemberRow, UpdateRow, KeyRow, KeyChange, PublishRequest, InboxItem, EventRecord, SubscriberReport, DeliverySpec,
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
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The API's routes.
pub fn router(agent: AgentRef, token: String) -> Router {
    let state = AppState {
        agent,
        token: token.into(),
    };
    let o = "/v1/overlays/{overlay}";
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(|| async { Json(openapi()) }))
        .route("/v1/overlays", get(list_overlays).post(create_overlay))
        .route(o, get(get_overlay).put(update_overlay).delete(delete_overlay))
        .route(&format!("{o}/members"), get(members))
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
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint (see /v1/openapi.json)".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint (see /v1/openapi.json)".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Requests that change state, and the key export, need the admin token.
async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The event stream subscribes the agent: it changes state too.
    let needs_token = !matches!(*req.method(), Method::GET | Method::HEAD)
        || path.ends_with("/keys/export")
        || path.ends_with("/events/ws");
    if needs_token {
        // Browsers cannot set headers on a WebSocket: `?token=` as well.
        let from_query = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_owned));
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or(from_query);
        let message = match given {
            None => Some(
                "this request needs the admin token: send `Authorization: Bearer <token>` (the token is in the agent's data directory, file admin-token)",
            ),
            Some(ref t) if !constant_time_eq(t.trim().as_bytes(), state.token.as_bytes()) => Some("wrong admin token"),
            Some(_) => None,
        };
        if let Some(m) = message {
            return ApiError(StatusCode::UNAUTHORIZED, m.into()).into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API on `bind` until the returned server task is aborted.
pub async fn serve(
    agent: AgentRef,
    bind: SocketAddr,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let app = router(agent, token);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    Ok((addr, task))
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
    let mut out = Vec::new();
    for name in s.agent.overlay_names().await {
        match s.agent.overlay(&name).await {
            Ok(o) => out.push(o),
            Err(AgentError::UnknownOverlay(_)) => {} // deleted meanwhile
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(out))
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

/// The members: the local one first, then by name.
#[utoipa::path(get, path = "/v1/overlays/{overlay}/members", params(("overlay" = String, Path)),
    responses((status = 200, body = [MemberRow]), (status = 404, body = ErrorBody)))]
async fn members(State(s): State<AppState>, Path(overlay): Path<String>) -> ApiResult<Json<Vec<MemberRow>>> {
    Ok(Json(s.agent.members(&overlay).await?))
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

/// Installs a key on every member of the overlay: packets sealed with it
/// are accepted from now on. Waits for every live member to report it.
#[utoipa::path(post, path = "/v1/overlays/{overlay}/keys", params(("overlay" = String, Path), WaitQuery), request_body = KeyRequest,
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange, description = "not every member followed in time"),
        (status = 400, body = ErrorBody)))]
async fn install_key(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    Body(req): Body<KeyRequest>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    let change = s.agent.install_key(&overlay, &req.key, wait).await?;
    Ok((change_status(&change), Json(change)))
}

/// Makes a key primary on every member (refused unless every live member
/// has it installed).
#[utoipa::path(post, path = "/v1/overlays/{overlay}/keys/{id}/use", params(("overlay" = String, Path), ("id" = String, Path), WaitQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn use_key(
    State(s): State<AppState>,
    Path((overlay, id)): Path<(String, String)>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    let change = s.agent.use_key(&overlay, &id, wait).await?;
    Ok((change_status(&change), Json(change)))
}

/// Removes a key from every member (refused while a live member seals
/// with it).
#[utoipa::path(delete, path = "/v1/overlays/{overlay}/keys/{id}", params(("overlay" = String, Path), ("id" = String, Path), WaitQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = KeyChange), (status = 202, body = KeyChange), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_key(
    State(s): State<AppState>,
    Path((overlay, id)): Path<(String, String)>,
    wait: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let wait = WaitQuery::duration(wait)?;
    let change = s.agent.remove_key(&overlay, &id, wait).await?;
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

/// Subscribes the agent to `topics` and streams the inbox entries of those
/// topics as JSON text messages, from `from` on (default: from now). One
/// that reconnects with `from` = the last `seq` it saw misses nothing and
/// sees nothing twice. Needs the admin token (`Authorization` or `?token=`).
#[utoipa::path(get, path = "/v1/overlays/{overlay}/events/ws", params(("overlay" = String, Path), InboxQuery),
    security(("admin_token" = [])),
    responses((status = 101, description = "WebSocket of InboxItem JSON messages"), (status = 400, body = ErrorBody)))]
async fn events_ws(
    State(s): State<AppState>,
    Path(overlay): Path<String>,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
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
    s.agent.subscribe(&overlay, &topics).await?;
    let (last, feed) = s.agent.inbox_feed(&overlay).await?;
    let from = q.from.unwrap_or(last);
    if from > last {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("from={from} is beyond the inbox's last entry ({last}): was the overlay recreated?"),
        ));
    }
    let agent = s.agent.clone();
    Ok(ws.on_upgrade(move |socket| stream_inbox(agent, overlay, topics, from, feed, socket)))
}

async fn stream_inbox(
    agent: AgentRef,
    overlay: String,
    topics: Vec<String>,
    mut sent: u64,
    mut feed: tokio::sync::broadcast::Receiver<Arc<InboxItem>>,
    mut socket: axum::extract::ws::WebSocket,
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
        }
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
        anonymous: Client,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        async fn new(tag: &str) -> Fixture {
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
            let (addr, server) = serve(agent.clone(), "127.0.0.1:0".parse().unwrap(), "sesame".into())
                .await
                .unwrap();
            Fixture {
                agent,
                server,
                admin: Client::new(addr, Some("sesame".into())),
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
    async fn changes_need_the_token_and_reads_do_not() {
        let f = Fixture::new("auth").await;
        let members = f.anonymous.get("/v1/overlays/default/members").await.unwrap();
        assert_eq!(members[0]["name"], "api-test");
        assert_eq!(members[0]["rack"], "r1");
        let body = Some(json!({ "value": "v" }));
        let (status, msg) = api_err(
            f.anonymous
                .request("PUT", "/v1/overlays/default/updates/k", body.clone())
                .await,
        );
        assert_eq!(status, 401);
        assert!(msg.contains("admin token"), "{msg}");
        let wrong = Client::new(f.server_addr(), Some("guess".into()));
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
        let got = f.anonymous.get("/v1/overlays/default/updates/a/b%20c").await.unwrap();
        assert_eq!(got["value"], "hello");
        let list = f.anonymous.get("/v1/overlays/default/updates?prefix=a/").await.unwrap();
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        f.admin
            .request("DELETE", "/v1/overlays/default/updates/a/b%20c", None)
            .await
            .unwrap();
        let (status, msg) = api_err(f.anonymous.get("/v1/overlays/default/updates/a/b%20c").await);
        assert_eq!((status, msg.as_str()), (404, "no value under key \"a/b c\""));

        let (status, msg) = api_err(f.anonymous.get("/v1/overlays/nope/members").await);
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
        let shown = f.anonymous.get("/v1/overlays/second").await.unwrap();
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
        let keys = f.anonymous.get("/v1/overlays/second/keys").await.unwrap();
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
        let keys = f.anonymous.get("/v1/overlays/second/keys").await.unwrap();
        assert_eq!(
            keys,
            json!([{ "id": id, "suite": "aes-256-gcm", "primary": true, "installed_on": 1, "primary_on": 1, "members": 1 }])
        );
        // The keyring is kept: a restart of the overlay uses the new key.
        let exported = f.admin.get("/v1/overlays/second/keys/export").await.unwrap();
        assert_eq!(exported["keys"], json!([new]));

        // An update that cannot bind keeps the overlay running as it was.
        let taken = f.agent.overlay("default").await.unwrap().addr;
        let update = json!({ "name": "second", "bind": taken.to_string(), "profile": "wan" });
        let (status, msg) = api_err(f.admin.request("PUT", "/v1/overlays/second", Some(update)).await);
        assert_eq!(status, 409, "{msg}");
        assert!(msg.contains("cannot listen on"), "{msg}");
        let shown = f.anonymous.get("/v1/overlays/second").await.unwrap();
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
        let (status, _) = api_err(f.anonymous.get("/v1/overlays/second").await);
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
        assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
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
        let (status, _) = api_err(f.anonymous.get("/v1/overlays/default/events/api-test/1/1").await);
        assert_eq!(status, 404);
        assert_eq!(
            f.anonymous.get("/v1/overlays/default/events?from=0").await.unwrap(),
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
                .anonymous
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
            shown = f
                .anonymous
                .get("/v1/overlays/default/events/api-test/1/1")
                .await
                .unwrap();
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
