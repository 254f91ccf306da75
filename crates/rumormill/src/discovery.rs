//! LAN multicast discovery, as Gossiperl had: every member announces its
//! overlay and gossip address to a multicast group, and joins the members
//! it hears of and does not know yet.
//!
//! An announcement holds no secret and proves nothing: it only makes the
//! hearer attempt a join, which on an encrypted overlay succeeds only with
//! the overlay's key. A TTL of 0 keeps announcements on the host, 1 on the
//! local network.
//!
//! ```
//! use rumormill::discovery::Announcement;
//! let a = Announcement { overlay: 7, addr: "10.0.0.5:7950".parse().unwrap(), name: "web-1".into() };
//! assert_eq!(Announcement::decode(&a.encode()), Some(a));
//! assert_eq!(Announcement::decode(b"garbage"), None);
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::config::MulticastSpec;
use crate::driver::OverlayHandle;

const MAGIC: &[u8; 4] = b"RMD1";
/// Least time between two joins of one announced address.
const JOIN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);
/// Announced addresses remembered at most.
const MAX_TRIED: usize = 4096;

/// What a member announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The overlay id ([`rumormill_wire::overlay_id`] of its name).
    pub overlay: u32,
    /// The member's gossip address.
    pub addr: SocketAddr,
    /// The member's name.
    pub name: String,
}

impl Announcement {
    /// `RMD1`, overlay id, address family, address, port, name length, name.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.name.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.overlay.to_be_bytes());
        match self.addr.ip() {
            IpAddr::V4(v4) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(6);
                out.extend_from_slice(&v6.octets());
            }
        }
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        let name = &self.name.as_bytes()[..self.name.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out
    }

    /// Decodes an announcement; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Announcement> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (overlay, rest) = rest.split_first_chunk::<4>()?;
        let (family, rest) = rest.split_first()?;
        let (ip, rest): (IpAddr, &[u8]) = match family {
            4 => {
                let (o, rest) = rest.split_first_chunk::<4>()?;
                (IpAddr::from(*o), rest)
            }
            6 => {
                let (o, rest) = rest.split_first_chunk::<16>()?;
                (IpAddr::from(*o), rest)
            }
            _ => return None,
        };
        let (port, rest) = rest.split_first_chunk::<2>()?;
        let (len, rest) = rest.split_first()?;
        let name = std::str::from_utf8(rest.get(..usize::from(*len))?).ok()?;
        if name.is_empty() || rest.len() != usize::from(*len) {
            return None;
        }
        Some(Announcement {
            overlay: u32::from_be_bytes(*overlay),
            addr: SocketAddr::new(ip, u16::from_be_bytes(*port)),
            name: name.to_owned(),
        })
    }
}

fn multicast_socket(spec: &MulticastSpec) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let IpAddr::V4(group) = spec.group.ip() else {
        return Err(std::io::Error::other("only IPv4 multicast groups are supported"));
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Bound to the group address: only the group's datagrams arrive.
    socket.bind(&SocketAddr::new(IpAddr::V4(group), spec.group.port()).into())?;
    socket.join_multicast_v4(&group, &spec.interface)?;
    if spec.interface != Ipv4Addr::UNSPECIFIED {
        socket.set_multicast_if_v4(&spec.interface)?;
    }
    socket.set_multicast_ttl_v4(spec.ttl)?;
    socket.set_multicast_loop_v4(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Announces the overlay's member every `spec.interval` and joins the
/// members heard of that the overlay does not know alive. Runs until the
/// overlay stops; a socket error is logged and retried after an interval.
pub async fn multicast(overlay: String, spec: MulticastSpec, handle: OverlayHandle) {
    let id = rumormill_wire::overlay_id(&overlay);
    let Ok(name) = handle.call(|o, _| o.name().to_owned()).await else {
        return;
    };
    let me = Announcement {
        overlay: id,
        addr: handle.addr(),
        name,
    }
    .encode();
    loop {
        let socket = match multicast_socket(&spec) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%overlay, group = %spec.group, error = %e, "multicast discovery unavailable");
                tokio::time::sleep(spec.interval).await;
                continue;
            }
        };
        let mut ticker = tokio::time::interval(spec.interval);
        let mut buf = [0u8; 512];
        // Announcements are unauthenticated: an address is tried at most
        // once per JOIN_BACKOFF, however often it is announced.
        let mut tried: std::collections::HashMap<SocketAddr, tokio::time::Instant> = Default::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = socket.send_to(&me, spec.group).await {
                        tracing::debug!(%overlay, error = %e, "announcement not sent");
                    }
                }
                received = socket.recv_from(&mut buf) => {
                    let Ok((n, _)) = received else { break };
                    let Some(a) = Announcement::decode(&buf[..n]) else { continue };
                    if a.overlay != id || a.addr == handle.addr() {
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    if tried.get(&a.addr).is_some_and(|t| now < *t + JOIN_BACKOFF) {
                        continue;
                    }
                    if tried.len() >= MAX_TRIED {
                        tried.retain(|_, t| now < *t + JOIN_BACKOFF);
                        if tried.len() >= MAX_TRIED {
                            continue;
                        }
                    }
                    tried.insert(a.addr, now);
                    let joined = handle
                        .call(move |o, now| {
                            let known = o.member(&a.name).is_some_and(|m| m.state.is_live());
                            if !known {
                                let _ = o.join(now, &[a.addr]);
                            }
                            (!known).then_some(a)
                        })
                        .await;
                    match joined {
                        Ok(Some(a)) => tracing::info!(%overlay, member = %a.name, addr = %a.addr, "discovered by multicast"),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_and_reject_truncation() {
        let a = Announcement {
            overlay: 0xdead_beef,
            addr: "[::1]:7950".parse().unwrap(),
            name: "node-ü".into(),
        };
        let bytes = a.encode();
        assert_eq!(Announcement::decode(&bytes), Some(a));
        for cut in 0..bytes.len() {
            assert_eq!(Announcement::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Announcement::decode(&longer), None);
    }
}
