//! A client of the agent's HTTP API, used by the command line.
//!
//! Every endpoint has a typed method, taking and returning the API's own
//! request and response types; [`Client::request`] sends anything else.
//!
//! ```no_run
//! # async fn f() -> Result<(), rumormill::client::ClientError> {
//! let client = rumormill::client::Client::new("127.0.0.1:7980".parse().unwrap(), None);
//! for member in client.on("default").members().await? {
//!     println!("{} {}", member.name, member.state);
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::agent::{MemberRow, OverlaySummary, RackMemberRow, RackRow, UpdateRow};
use crate::api::{JoinRequest, KeyExport, KeyRequest, LuggageRow, PublishRequest, PutRequest, Topics};
use crate::config::OverlaySpec;
use crate::events::EventRecord;
use crate::keyring::{KeyChange, KeyRow};

/// How long a request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers at the address.
    #[error("no agent answers at {0} (start one with `rumormill agent`, or give --api)")]
    Unreachable(SocketAddr),
    /// The agent answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// The request timed out or the answer was not understood.
    #[error("{0}")]
    Other(String),
}

/// An API client. It sends a token only with requests that need one: the
/// read token, when it has one, with reads; the other token otherwise.
#[derive(Clone)]
pub struct Client {
    base: SocketAddr,
    token: Option<String>,
    read_token: Option<String>,
    timeout: Duration,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("read_token", &self.read_token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the agent at `api`, sending `token` when given.
    pub fn new(api: SocketAddr, token: Option<String>) -> Client {
        Client {
            base: api,
            token,
            read_token: None,
            timeout: TIMEOUT,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The same client with another per-request time limit (30 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The same client sending `read_token` with reads (and its other
    /// token only with requests that need the admin token).
    pub fn with_read_token(mut self, read_token: Option<String>) -> Client {
        self.read_token = read_token;
        self
    }

    /// The token, when one was given.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The token sent with `method` on `path`, if any: none for health and
    /// the OpenAPI document, the read token (else the other) for reads,
    /// the other token for the rest.
    pub fn token_for(&self, method: &str, path: &str) -> Option<&str> {
        let method = hyper::Method::from_bytes(method.as_bytes()).unwrap_or(hyper::Method::POST);
        let path = path.split('?').next().unwrap_or_default();
        match crate::api::required_scope(&method, path) {
            crate::api::Scope::Open => None,
            crate::api::Scope::Read => self.read_token.as_deref().or(self.token.as_deref()),
            crate::api::Scope::Admin => self.token.as_deref(),
        }
    }

    /// The agent's API address.
    pub fn addr(&self) -> SocketAddr {
        self.base
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path, None).await
    }

    /// Sends a request and returns the JSON answer (`null` for no content).
    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.base, path))
            .header("content-type", "application/json");
        if let Some(t) = self.token_for(method, path) {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Other(format!("bad request: {e}")))?;
        let send = async {
            let resp = self.http.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ClientError::Unreachable(self.base)
                } else {
                    ClientError::Other(format!("request to {} failed: {e}", self.base))
                }
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Other(format!("reading the answer failed: {e}")))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, send).await.map_err(|_| {
            ClientError::Other(format!(
                "the agent at {} did not answer in {:?}",
                self.base, self.timeout
            ))
        })??;
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|_| {
                ClientError::Other(format!(
                    "the answer from {} is not JSON (HTTP {status}); is this a Rumormill agent?",
                    self.base
                ))
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the agent refused the request")
                .to_owned();
            Err(ClientError::Api {
                status: status.as_u16(),
                message,
            })
        }
    }
}

impl Client {
    /// Sends `body` and decodes the answer as `T` (`()` for no content).
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| ClientError::Other(format!("bad request body: {e}")))?;
        let answer = self.request(method, path, body).await?;
        serde_json::from_value(answer).map_err(|e| {
            ClientError::Other(format!(
                "the answer from {} is not what the API describes ({e}); is the agent of another version?",
                self.base
            ))
        })
    }

    async fn read<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, None::<&()>).await
    }

    /// The endpoints of one overlay.
    pub fn on(&self, overlay: &str) -> OverlayApi<'_> {
        OverlayApi {
            client: self,
            path: format!("/v1/overlays/{}", encode_segment(overlay)),
        }
    }

    /// Every overlay of the agent.
    pub async fn overlays(&self) -> Result<Vec<OverlaySummary>, ClientError> {
        self.read("/v1/overlays").await
    }

    /// One overlay's summary.
    pub async fn overlay(&self, name: &str) -> Result<OverlaySummary, ClientError> {
        self.read(&self.on(name).path).await
    }

    /// Creates and starts an overlay.
    pub async fn create_overlay(&self, spec: &OverlaySpec) -> Result<OverlaySummary, ClientError> {
        self.send("POST", "/v1/overlays", Some(spec)).await
    }

    /// Leaves gracefully and deletes an overlay.
    pub async fn delete_overlay(&self, name: &str) -> Result<(), ClientError> {
        self.send("DELETE", &self.on(name).path, None::<&()>).await
    }
}

/// The endpoints of one overlay (see [`Client::on`]).
#[derive(Debug, Clone)]
pub struct OverlayApi<'a> {
    client: &'a Client,
    /// `/v1/overlays/{overlay}`.
    path: String,
}

impl OverlayApi<'_> {
    async fn read<T: DeserializeOwned>(&self, tail: &str) -> Result<T, ClientError> {
        self.client.read(&format!("{}{tail}", self.path)).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        tail: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.client.send(method, &format!("{}{tail}", self.path), body).await
    }

    /// The path of the event stream's WebSocket.
    pub fn events_ws_path(&self) -> String {
        format!("{}/events/ws", self.path)
    }

    /// The members, the local one first.
    pub async fn members(&self) -> Result<Vec<MemberRow>, ClientError> {
        self.read("/members").await
    }

    /// The members of rack `rack`, or (`None`) of every rack: this
    /// member's rack as seen here, the others as their gateways report.
    pub async fn rack_members(&self, rack: Option<&str>) -> Result<Vec<RackMemberRow>, ClientError> {
        match rack {
            Some(r) => self.read(&format!("/members?rack={}", encode_segment(r))).await,
            None => self.read("/members?all_racks=true").await,
        }
    }

    /// The racks this member knows, its own first.
    pub async fn racks(&self) -> Result<Vec<RackRow>, ClientError> {
        self.read("/racks").await
    }

    /// Joins members at these gossip addresses.
    pub async fn join(&self, request: &JoinRequest) -> Result<(), ClientError> {
        self.send("POST", "/join", Some(request)).await
    }

    /// Leaves the overlay gracefully.
    pub async fn leave(&self) -> Result<(), ClientError> {
        self.send("POST", "/leave", None::<&()>).await
    }

    /// Writes a value.
    pub async fn put(&self, key: &str, request: &PutRequest) -> Result<UpdateRow, ClientError> {
        self.send("PUT", &format!("/updates/{}", encode_path(key)), Some(request))
            .await
    }

    /// Reads a value.
    pub async fn get(&self, key: &str) -> Result<UpdateRow, ClientError> {
        self.read(&format!("/updates/{}", encode_path(key))).await
    }

    /// Deletes a value.
    pub async fn delete(&self, key: &str) -> Result<(), ClientError> {
        self.send("DELETE", &format!("/updates/{}", encode_path(key)), None::<&()>)
            .await
    }

    /// The values, by key (those starting with `prefix`).
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<UpdateRow>, ClientError> {
        let q = prefix
            .map(|p| format!("?prefix={}", encode_path(p)))
            .unwrap_or_default();
        self.read(&format!("/updates{q}")).await
    }

    /// Publishes an event.
    pub async fn publish(&self, request: &PublishRequest) -> Result<EventRecord, ClientError> {
        self.send("POST", "/events", Some(request)).await
    }

    /// An at-least-once event this agent published, with its reports.
    pub async fn event(&self, id: &str) -> Result<EventRecord, ClientError> {
        self.read(&format!("/events/{}", encode_path(id))).await
    }

    /// The agent's topics.
    pub async fn subscriptions(&self) -> Result<Topics, ClientError> {
        self.read("/subscriptions").await
    }

    /// Unsubscribes the agent from a topic.
    pub async fn unsubscribe(&self, topic: &str) -> Result<Topics, ClientError> {
        self.send(
            "DELETE",
            &format!("/subscriptions/{}", encode_segment(topic)),
            None::<&()>,
        )
        .await
    }

    /// The luggage of every member (or of one).
    pub async fn luggage(&self, member: Option<&str>) -> Result<Vec<LuggageRow>, ClientError> {
        let q = member
            .map(|m| format!("?member={}", encode_path(m)))
            .unwrap_or_default();
        self.read(&format!("/luggage{q}")).await
    }

    /// Sets one of this member's luggage entries.
    pub async fn set_luggage(&self, key: &str, request: &PutRequest) -> Result<(), ClientError> {
        self.send("PUT", &format!("/luggage/{}", encode_segment(key)), Some(request))
            .await
    }

    /// Deletes one of this member's luggage entries.
    pub async fn delete_luggage(&self, key: &str) -> Result<(), ClientError> {
        self.send("DELETE", &format!("/luggage/{}", encode_segment(key)), None::<&()>)
            .await
    }

    /// The keyring (ids, never secrets).
    pub async fn keys(&self) -> Result<Vec<KeyRow>, ClientError> {
        self.read("/keys").await
    }

    /// Installs a key on every member (or, `local`, on this agent alone),
    /// waiting up to `wait` seconds for the members.
    pub async fn install_key(&self, request: &KeyRequest, wait: u64, local: bool) -> Result<KeyChange, ClientError> {
        let scope = if local { "local" } else { "overlay" };
        self.send("POST", &format!("/keys?wait={wait}&scope={scope}"), Some(request))
            .await
    }

    /// Makes a key primary on every member but those in `exclude`.
    pub async fn use_key(&self, id: &str, wait: u64, exclude: &[String]) -> Result<KeyChange, ClientError> {
        let path = format!("/keys/{}/use?wait={wait}{}", encode_segment(id), exclude_query(exclude));
        self.send("POST", &path, None::<&()>).await
    }

    /// Removes a key from every member (or, `local`, from this agent alone).
    pub async fn remove_key(
        &self,
        id: &str,
        wait: u64,
        exclude: &[String],
        local: bool,
    ) -> Result<KeyChange, ClientError> {
        let path = if local {
            format!("/keys/{}?scope=local", encode_segment(id))
        } else {
            format!("/keys/{}?wait={wait}{}", encode_segment(id), exclude_query(exclude))
        };
        self.send("DELETE", &path, None::<&()>).await
    }

    /// The keyring's secrets.
    pub async fn export_keys(&self) -> Result<KeyExport, ClientError> {
        self.read("/keys/export").await
    }
}

/// `&exclude=a,b`, or nothing.
fn exclude_query(members: &[String]) -> String {
    if members.is_empty() {
        String::new()
    } else {
        format!("&exclude={}", encode_path(&members.join(",")))
    }
}

/// Percent-encodes the tail of a path that the API takes whole (a value's
/// key, an event id: any character; `/` is kept, the API takes the rest of
/// the path as the key).
pub fn encode_path(s: &str) -> String {
    encode(s, true)
}

/// Percent-encodes one path segment (an overlay's name, a topic, a luggage
/// key, a key id), `/` included: the API takes only this segment.
pub fn encode_segment(s: &str) -> String {
    encode(s, false)
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
