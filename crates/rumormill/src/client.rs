//! A client of the agent's HTTP API, used by the command line.
//!
//! ```no_run
//! # async fn f() -> Result<(), rumormill::client::ClientError> {
//! let client = rumormill::client::Client::new("127.0.0.1:7980".parse().unwrap(), None);
//! let members = client.get("/v1/overlays/default/members").await?;
//! println!("{members}");
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

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

/// Percent-encodes a path segment (keys may hold any character; `/` is
/// kept, the API takes the rest of the path as the key).
pub fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
