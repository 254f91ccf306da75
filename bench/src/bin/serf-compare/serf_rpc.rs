//! A client of the Serf agent's RPC protocol (MsgPack over TCP): the
//! protocol `serf members`, `serf event` and `serf monitor` speak. Each
//! request is a header map `{Command, Seq}` followed by an optional body; each
//! answer is a header `{Seq, Error}` followed by a body for the commands
//! that have one. A `stream` request is answered once, then every matching
//! event arrives as another header and body.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rmpv::Value;

use crate::Result;

/// One RPC connection to a Serf agent, handshake done.
pub struct SerfRpc {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    seq: u64,
}

/// An event a `stream` request delivers.
#[derive(Debug)]
pub enum StreamEvent {
    /// A user event (`serf event`): its name and payload.
    User { name: String, payload: Vec<u8> },
    /// `member-failed` (and other member events): the members concerned.
    Member { kind: String, names: Vec<String> },
}

impl SerfRpc {
    /// Connects and performs the handshake (protocol version 1).
    pub fn connect(addr: SocketAddr) -> Result<SerfRpc> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rpc = SerfRpc {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            seq: 0,
        };
        rpc.call("handshake", Some(map(vec![("Version", Value::from(1))])))?;
        Ok(rpc)
    }

    /// Sends a request and reads its answer header; fails on an error.
    fn call(&mut self, command: &str, body: Option<Value>) -> Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let mut buf = Vec::with_capacity(128);
        let header = map(vec![("Command", Value::from(command)), ("Seq", Value::from(seq))]);
        rmpv::encode::write_value(&mut buf, &header)?;
        if let Some(body) = body {
            rmpv::encode::write_value(&mut buf, &body)?;
        }
        self.writer.write_all(&buf)?;
        let answer = self.read()?;
        let error = field(&answer, "Error").and_then(text).unwrap_or_default();
        if !error.is_empty() {
            return Err(format!("serf rpc {command}: {error}").into());
        }
        Ok(())
    }

    fn read(&mut self) -> Result<Value> {
        Ok(rmpv::decode::read_value(&mut self.reader)?)
    }

    /// `(name, status)` of every member the agent knows.
    pub fn members(&mut self) -> Result<Vec<(String, String)>> {
        self.call("members", None)?;
        let body = self.read()?;
        let members = field(&body, "Members")
            .and_then(Value::as_array)
            .ok_or("serf rpc members: no Members in the answer")?;
        Ok(members
            .iter()
            .map(|m| {
                let name = field(m, "Name").and_then(text).unwrap_or_default();
                let status = field(m, "Status").and_then(text).unwrap_or_default();
                (name, status)
            })
            .collect())
    }

    /// Fires a user event, not coalesced.
    pub fn event(&mut self, name: &str, payload: &[u8]) -> Result<()> {
        let body = map(vec![
            ("Name", Value::from(name)),
            ("Payload", Value::Binary(payload.to_vec())),
            ("Coalesce", Value::Boolean(false)),
        ]);
        self.call("event", Some(body))
    }

    /// Subscribes to events (`user`, `member-failed`, …); `on_event` is
    /// called for each until the connection ends (the agent stopped) or it
    /// returns false.
    pub fn stream(mut self, types: &str, mut on_event: impl FnMut(StreamEvent) -> bool) -> Result<()> {
        self.writer.set_read_timeout(None)?;
        self.call("stream", Some(map(vec![("Type", Value::from(types))])))?;
        loop {
            let Ok(_header) = self.read() else { return Ok(()) };
            let Ok(body) = self.read() else { return Ok(()) };
            let kind = field(&body, "Event").and_then(text).unwrap_or_default();
            let event = if kind == "user" {
                StreamEvent::User {
                    name: field(&body, "Name").and_then(text).unwrap_or_default(),
                    payload: field(&body, "Payload").map(bytes).unwrap_or_default(),
                }
            } else {
                let names = field(&body, "Members")
                    .and_then(Value::as_array)
                    .map(|ms| ms.iter().filter_map(|m| field(m, "Name").and_then(text)).collect())
                    .unwrap_or_default();
                StreamEvent::Member { kind, names }
            };
            if !on_event(event) {
                return Ok(());
            }
        }
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

/// A map's entry; Serf's encoder writes keys as strings or raw bytes.
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| bytes(k) == key.as_bytes())
        .map(|(_, v)| v)
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Binary(b) => b.clone(),
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(_) | Value::Binary(_) => Some(String::from_utf8_lossy(&bytes(v)).into_owned()),
        _ => None,
    }
}
