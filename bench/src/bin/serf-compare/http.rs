//! The Rumormill agent's HTTP API as the harness uses it: one short
//! HTTP/1.1 request per call (`Connection: close`), and the events
//! WebSocket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

use crate::Result;

/// Sends one request; returns the status and the body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("HTTP answer without headers")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("HTTP answer without a status")?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A request that must succeed (2xx); returns the body.
pub fn ok(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Result<String> {
    let (status, text) = request(addr, method, path, token, body)?;
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path} on {addr}: HTTP {status}: {}", text.trim()).into());
    }
    Ok(text)
}

/// Follows the inbox of `topics` over the WebSocket; `on_item` gets each
/// entry (parsed JSON) until the agent goes away or it returns false.
pub fn follow(
    addr: SocketAddr,
    token: &str,
    topics: &str,
    mut on_item: impl FnMut(serde_json::Value) -> bool,
) -> Result<()> {
    let url = format!("ws://{addr}/v1/overlays/default/events/ws?topics={topics}");
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_nodelay(true)?;
    let (mut socket, _) = tungstenite::client(req, stream).map_err(|e| format!("websocket to {addr}: {e}"))?;
    loop {
        let Ok(msg) = socket.read() else { return Ok(()) };
        if let Message::Text(t) = msg
            && let Ok(item) = serde_json::from_str(t.as_str())
            && !on_item(item)
        {
            return Ok(());
        }
    }
}
