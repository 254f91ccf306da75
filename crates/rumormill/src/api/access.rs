//! Who may use the API: the host names it answers to, the web origins whose
//! pages may call it, and the token each route needs.
//!
//! A web page can make a browser send requests to `127.0.0.1` — directly
//! (cross-origin, with an `Origin` header) or through a DNS name of its own
//! that it later points at this host (DNS rebinding, where the request
//! names the page's host in `Host`). Refusing foreign `Host` and `Origin`
//! values stops both before any handler runs; tokens stop the rest.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, Method, StatusCode, Uri, header};

use crate::config::{parse_authority, parse_origin};

/// What a request needs to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Nothing: health and the OpenAPI document.
    Open,
    /// The read token or the admin token.
    Read,
    /// The admin token.
    Admin,
}

/// The segments of an overlay route after `/v1/overlays/{overlay}/`.
fn overlay_tail(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix("/v1/overlays/")?;
    let mut parts = rest.split('/');
    parts.next()?;
    Some(parts.collect())
}

/// Whether `path` is the event stream's WebSocket upgrade.
pub fn is_event_stream(path: &str) -> bool {
    overlay_tail(path).is_some_and(|t| t == ["events", "ws"])
}

/// The scope a request needs: reads need a token (read or admin) except
/// health and the OpenAPI document; changes and the key export need the
/// admin token.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    let read = matches!(*method, Method::GET | Method::HEAD);
    let export = overlay_tail(path).is_some_and(|t| t == ["keys", "export"]);
    if !read || export {
        Scope::Admin
    } else if matches!(path, "/v1/health" | "/v1/openapi.json") {
        Scope::Open
    } else {
        Scope::Read
    }
}

/// The host names and origins the API accepts.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    /// The bind address, unless it is a wildcard.
    bind_ip: Option<IpAddr>,
    /// Configured names, with a port when only that one is accepted.
    hosts: Vec<(String, Option<u16>)>,
    /// Configured origins: scheme, host, port.
    origins: Vec<(String, String, u16)>,
}

impl HostPolicy {
    /// Loopback forms and `bind`'s address, plus `hosts` (`name` or
    /// `name:port`) and pages of `origins` (`scheme://host[:port]`).
    pub fn new(bind: SocketAddr, hosts: &[String], origins: &[String]) -> Result<HostPolicy, String> {
        let hosts = hosts
            .iter()
            .map(|h| parse_authority(h).map_err(|m| format!("allowed host {h:?}: {m}")))
            .collect::<Result<_, _>>()?;
        let origins = origins
            .iter()
            .map(|o| parse_origin(o).map_err(|m| format!("allowed origin {o:?}: {m}")))
            .collect::<Result<_, _>>()?;
        Ok(HostPolicy {
            bind_ip: Some(bind.ip()).filter(|ip| !ip.is_unspecified()),
            hosts,
            origins,
        })
    }

    fn host_allowed(&self, host: &str, port: Option<u16>) -> bool {
        if host == "localhost" {
            return true;
        }
        if let Ok(ip) = host.parse::<IpAddr>()
            && (ip.is_loopback() || Some(ip) == self.bind_ip)
        {
            return true;
        }
        self.hosts
            .iter()
            .any(|(h, p)| h == host && p.is_none_or(|p| Some(p) == port))
    }

    /// Checks a request's `Host` (or the authority of an absolute URI) and
    /// `Origin`. A request without `Host` is not from a browser and
    /// passes the host check; one without `Origin` is not from a web page
    /// of another origin and passes the origin check.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        let forbidden = |m: String| (StatusCode::FORBIDDEN, m);
        let host_text = match uri.authority() {
            Some(a) => Some(a.as_str()),
            None => match headers.get(header::HOST).map(|v| v.to_str()) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(_)) => return Err((StatusCode::BAD_REQUEST, "the Host header is not ASCII".into())),
            },
        };
        let host = match host_text {
            None => None,
            Some(text) => {
                let refused = || {
                    forbidden(format!(
                        "host {text:?} is not one this API answers to: it answers to localhost, loopback \
                         addresses, its bind address and the names in [api] allowed_hosts (so that a web \
                         page cannot reach it through a DNS name pointing here)"
                    ))
                };
                let (h, p) = parse_authority(text).map_err(|_| refused())?;
                if !self.host_allowed(&h, p) {
                    return Err(refused());
                }
                Some((h, p))
            }
        };
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(origin.as_bytes());
        let refused = || {
            forbidden(format!(
                "requests from web pages of origin {text:?} are refused: only pages of the API's own \
                 origin and of [api] allowed_origins may call it"
            ))
        };
        let (scheme, oh, op) = parse_origin(&text).map_err(|_| refused())?;
        let same_origin = host.as_ref().is_some_and(|(h, p)| {
            let default_port = if scheme == "https" { 443 } else { 80 };
            *h == oh && p.unwrap_or(default_port) == op
        });
        let listed = self
            .origins
            .iter()
            .any(|(s, h, p)| *s == scheme && *h == oh && *p == op);
        if same_origin || listed { Ok(()) } else { Err(refused()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn policy(hosts: &[&str], origins: &[&str]) -> HostPolicy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        HostPolicy::new("127.0.0.1:7980".parse().unwrap(), &s(hosts), &s(origins)).unwrap()
    }

    fn check(p: &HostPolicy, host: Option<&str>, origin: Option<&str>) -> Result<(), StatusCode> {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        p.check(&Uri::from_static("/v1/health"), &h).map_err(|(s, _)| s)
    }

    #[test]
    fn loopback_forms_and_listed_names_are_accepted_and_others_refused() {
        let p = policy(&["gossip.internal", "ui.internal:8443"], &[]);
        for ok in [
            "localhost",
            "localhost:7980",
            "LOCALHOST:1",
            "127.0.0.1:7980",
            "127.3.4.5",
            "[::1]:7980",
            "[::1]",
            "gossip.internal:9",
            "ui.internal:8443",
        ] {
            assert_eq!(check(&p, Some(ok), None), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:7980",
            "localhost.:7980",
            "127.0.0.1.nip.io:7980",
            "ui.internal:8080",
            "10.0.0.5:7980",
            "[::ffff:10.0.0.5]:7980",
            "local host",
            "",
        ] {
            assert_eq!(check(&p, Some(bad), None), Err(StatusCode::FORBIDDEN), "{bad}");
        }
        // No Host at all: not a browser.
        assert_eq!(check(&p, None, None), Ok(()));
    }

    #[test]
    fn the_bind_address_is_accepted_unless_a_wildcard() {
        let p = HostPolicy::new("10.0.0.5:7980".parse().unwrap(), &[], &[]).unwrap();
        assert_eq!(check(&p, Some("10.0.0.5:7980"), None), Ok(()));
        let p = HostPolicy::new("0.0.0.0:7980".parse().unwrap(), &[], &[]).unwrap();
        assert_eq!(check(&p, Some("0.0.0.0:7980"), None), Err(StatusCode::FORBIDDEN));
        assert_eq!(check(&p, Some("127.0.0.1:7980"), None), Ok(()));
    }

    #[test]
    fn only_the_own_origin_and_listed_ones_are_accepted() {
        let p = policy(&[], &["https://ui.example"]);
        let host = Some("localhost:7980");
        assert_eq!(check(&p, host, Some("http://localhost:7980")), Ok(()));
        assert_eq!(check(&p, host, Some("https://ui.example")), Ok(()));
        assert_eq!(check(&p, host, Some("https://ui.example:443")), Ok(()));
        for bad in [
            "http://localhost:8080",
            "http://127.0.0.1:7980",
            "http://evil.example",
            "https://ui.example:8443",
            "null",
            "file://",
            "http://localhost:7980/x",
        ] {
            assert_eq!(check(&p, host, Some(bad)), Err(StatusCode::FORBIDDEN), "{bad}");
        }
        assert_eq!(check(&p, Some("localhost"), Some("http://localhost")), Ok(()));
        assert_eq!(
            check(&p, None, Some("http://localhost:7980")),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn scopes_per_route() {
        let get = Method::GET;
        assert_eq!(required_scope(&get, "/v1/health"), Scope::Open);
        assert_eq!(required_scope(&get, "/v1/openapi.json"), Scope::Open);
        assert_eq!(required_scope(&Method::POST, "/v1/health"), Scope::Admin);
        for read in [
            "/v1/overlays",
            "/v1/overlays/o",
            "/v1/overlays/o/members",
            "/v1/overlays/o/updates/a/keys/export",
            "/v1/overlays/o/events",
            "/v1/overlays/o/events/ws",
            "/v1/overlays/o/keys",
            "/v1/overlays/o/luggage",
        ] {
            assert_eq!(required_scope(&get, read), Scope::Read, "{read}");
        }
        assert_eq!(required_scope(&get, "/v1/overlays/o/keys/export"), Scope::Admin);
        assert_eq!(required_scope(&Method::PUT, "/v1/overlays/o/updates/k"), Scope::Admin);
        assert!(is_event_stream("/v1/overlays/o/events/ws"));
        assert!(!is_event_stream("/v1/overlays/o/events"));
        assert!(!is_event_stream("/v1/overlays/o/updates/events/ws"));
    }
}
