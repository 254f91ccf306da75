//! LAN multicast discovery, as Gossiperl had: every member announces its
//! overlay and gossip address to a multicast group, and joins the members
//! it hears of and does not know yet.
//!
//! An announcement holds no secret and proves nothing: it only makes the
//! hearer attempt a join, which on an encrypted overlay succeeds only with
//! the overlay's key. What announcements can make an agent remember and
//! contact is bounded (see [`Heard`]). A TTL of 0 keeps announcements on the host, 1 on the
//! local network.
//!
//! ```
//! use rumormill::discovery::Announcement;
//! let a = Announcement { overlay: 7, addr: "10.0.0.5:7950".parse().unwrap(), name: "web-1".into() };
//! assert_eq!(Announcement::decode(&a.encode()), Some(a));
//! assert_eq!(Announcement::decode(b"garbage"), None);
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::config::MulticastSpec;
use crate::driver::OverlayHandle;

const MAGIC: &[u8; 4] = b"RMD1";
/// Least time between two contacts of one announced address.
pub const JOIN_BACKOFF: Duration = Duration::from_secs(30);
/// Announced addresses remembered at most; others are ignored until some
/// expire.
pub const MAX_HEARD: usize = 64;
/// Announced addresses contacted at most per announcement interval, all
/// together.
pub const CONTACTS_PER_INTERVAL: u32 = 4;
/// An address not announced again for this many intervals is forgotten.
pub const EXPIRY_INTERVALS: u32 = 3;

/// The addresses heard in announcements, bounded and expiring: which ones
/// to contact, and when.
///
/// Announcements are unauthenticated, so anyone on the LAN can announce any
/// number of addresses. At most [`MAX_HEARD`] are remembered, each
/// forgotten [`EXPIRY_INTERVALS`] intervals after it was last announced;
/// one address is contacted at most once per [`JOIN_BACKOFF`], and all of
/// them together at most [`CONTACTS_PER_INTERVAL`] times per interval.
/// Contacted addresses are not kept as seeds (see
/// [`rumormill_core::Overlay::contact`]): members found this way are
/// reached again through the membership, or through their next
/// announcement.
///
/// ```
/// use std::time::{Duration, Instant};
/// use rumormill::discovery::Heard;
/// let mut heard = Heard::new(Duration::from_secs(5));
/// let now = Instant::now();
/// let a = "10.0.0.5:7950".parse().unwrap();
/// assert!(heard.hear(now, a), "contacted at once");
/// assert!(!heard.hear(now + Duration::from_secs(5), a), "not again before the backoff");
/// ```
#[derive(Debug, Clone)]
pub struct Heard {
    interval: Duration,
    entries: BTreeMap<SocketAddr, Entry>,
    /// Contacts left in the current interval, and when it began.
    budget: (u32, Option<Instant>),
    /// Announcements ignored because the table was full.
    pub ignored: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_heard: Instant,
    contacted: Option<Instant>,
}

impl Heard {
    /// An empty table for announcements sent every `interval`.
    pub fn new(interval: Duration) -> Heard {
        Heard {
            interval: interval.max(Duration::from_millis(1)),
            entries: BTreeMap::new(),
            budget: (CONTACTS_PER_INTERVAL, None),
            ignored: 0,
        }
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Notes an announcement of `addr` at `now`; true if it should be
    /// contacted now.
    pub fn hear(&mut self, now: Instant, addr: SocketAddr) -> bool {
        let expiry = self.interval * EXPIRY_INTERVALS;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_heard) < expiry);
        if !self.entries.contains_key(&addr) && self.entries.len() >= MAX_HEARD {
            self.ignored += 1;
            return false;
        }
        let entry = self.entries.entry(addr).or_insert(Entry {
            last_heard: now,
            contacted: None,
        });
        entry.last_heard = now;
        if entry
            .contacted
            .is_some_and(|t| now.saturating_duration_since(t) < JOIN_BACKOFF)
        {
            return false;
        }
        let (left, since) = &mut self.budget;
        if since.is_none_or(|s| now.saturating_duration_since(s) >= self.interval) {
            *left = CONTACTS_PER_INTERVAL;
            *since = Some(now);
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        entry.contacted = Some(now);
        true
    }
}

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

/// Announces the overlay's member every `spec.interval` and contacts the
/// members heard of that the overlay does not know alive, within the bounds
/// of [`Heard`]. Runs until the
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
        let mut heard = Heard::new(spec.interval);
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
                    if !heard.hear(Instant::now(), a.addr) {
                        continue;
                    }
                    let contacted = handle
                        .call(move |o, _| {
                            let known = o.member(&a.name).is_some_and(|m| m.state.is_live());
                            if !known {
                                let _ = o.contact(a.addr);
                            }
                            (!known).then_some(a)
                        })
                        .await;
                    match contacted {
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

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 7950))
    }

    #[test]
    fn a_flood_of_announced_addresses_is_capped_and_rate_limited() {
        let interval = Duration::from_secs(5);
        let mut heard = Heard::new(interval);
        let t0 = Instant::now();
        let mut contacted = 0;
        // 4,096 addresses announced within one interval.
        for i in 0..4096 {
            contacted += usize::from(heard.hear(t0 + Duration::from_micros(u64::from(i)), addr(i)));
        }
        assert_eq!(contacted, CONTACTS_PER_INTERVAL as usize);
        assert_eq!(heard.len(), MAX_HEARD);
        assert_eq!(heard.ignored, 4096 - MAX_HEARD as u64);
        // Announced again every interval for a minute: at most
        // CONTACTS_PER_INTERVAL contacts per interval, each address at most
        // once per backoff.
        let mut per_addr: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for round in 1..=12u32 {
            let at = t0 + interval * round;
            let mut this_round = 0;
            for i in 0..4096 {
                if heard.hear(at, addr(i)) {
                    this_round += 1;
                    *per_addr.entry(addr(i)).or_default() += 1;
                }
            }
            assert!(
                this_round <= CONTACTS_PER_INTERVAL as usize,
                "round {round}: {this_round}"
            );
            contacted += this_round;
            assert!(heard.len() <= MAX_HEARD);
        }
        assert!(contacted <= 13 * CONTACTS_PER_INTERVAL as usize);
        let most = per_addr.values().max().copied().unwrap_or(0);
        assert!(
            most <= 2,
            "an address contacted {most} times in 60 s with a 30 s backoff"
        );
    }

    #[test]
    fn addresses_no_longer_announced_expire_and_make_room() {
        let interval = Duration::from_secs(1);
        let mut heard = Heard::new(interval);
        let t0 = Instant::now();
        for i in 0..MAX_HEARD as u32 {
            heard.hear(t0, addr(i));
        }
        assert_eq!(heard.len(), MAX_HEARD);
        let newcomer = addr(10_000);
        assert!(!heard.hear(t0 + interval, newcomer), "full: ignored");
        assert_eq!(heard.ignored, 1);
        // Only the newcomer keeps being announced.
        let later = t0 + interval * EXPIRY_INTERVALS;
        assert!(heard.hear(later, newcomer), "the others expired: contacted");
        assert_eq!(heard.len(), 1);
    }

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
