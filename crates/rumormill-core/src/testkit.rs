//! A tiny deterministic network for unit tests: zero-latency delivery,
//! time stepped by hand, links that can be cut.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prost::Message;
use rumormill_wire::Codec;
use rumormill_wire::proto::Envelope;

use crate::{Config, FrameKind, Identity, MemberChange, MemberState, Notification, Overlay, Security};

pub(crate) struct Net {
    pub(crate) nodes: Vec<Option<Overlay>>,
    pub(crate) now: Instant,
    pub(crate) start: Instant,
    /// Directed links that drop everything.
    pub(crate) cut: BTreeSet<(usize, usize)>,
    /// Every event, with the node that saw it and when.
    pub(crate) log: Vec<(Duration, usize, Notification)>,
    config: Config,
    security: fn() -> Security,
}

pub(crate) fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16))
}

pub(crate) fn name(i: usize) -> String {
    format!("n{i}")
}

impl Net {
    pub(crate) fn new(n: usize, config: Config) -> Net {
        Net::with_security(n, config, || Security::Plaintext)
    }

    pub(crate) fn with_security(n: usize, config: Config, security: fn() -> Security) -> Net {
        let now = Instant::now();
        let mut net = Net {
            nodes: Vec::new(),
            now,
            start: now,
            cut: BTreeSet::new(),
            log: Vec::new(),
            config,
            security,
        };
        for i in 0..n {
            let o = net.spawn(i, addr(i), 1);
            net.nodes.push(Some(o));
        }
        for i in 1..n {
            net.node(i).join(now, &[addr(0)]).expect("active");
        }
        net
    }

    fn spawn(&self, i: usize, at: SocketAddr, epoch: u64) -> Overlay {
        let id = Identity::new(name(i), at, epoch);
        Overlay::new(
            self.config.clone(),
            id,
            (self.security)(),
            1000 + i as u64 * 7 + epoch,
            self.now,
        )
    }

    pub(crate) fn node(&mut self, i: usize) -> &mut Overlay {
        self.nodes[i].as_mut().expect("node is running")
    }

    pub(crate) fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// Starts node `i` again under its name, with a new epoch and address,
    /// joining through node 0.
    pub(crate) fn restart(&mut self, i: usize, epoch: u64, at: SocketAddr) {
        let mut o = self.spawn(i, at, epoch);
        o.join(self.now, &[addr(0)]).expect("active");
        self.nodes[i] = Some(o);
    }

    pub(crate) fn partition(&mut self, side: &[usize]) {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if side.contains(&a) != side.contains(&b) {
                    self.cut.insert((a, b));
                }
            }
        }
    }

    fn index_of(&self, a: SocketAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|o| o.local_addr() == a))
    }

    /// Moves packets until nobody has anything to send.
    fn deliver(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                let Some(o) = self.nodes[i].as_mut() else { continue };
                let from = o.local_addr();
                let out: Vec<_> = std::iter::from_fn(|| o.poll_transmit()).collect();
                for t in out {
                    moved = true;
                    let Some(j) = self.index_of(t.to) else { continue };
                    if self.cut.contains(&(i, j)) {
                        continue;
                    }
                    let now = self.now;
                    if let Some(dst) = self.nodes[j].as_mut() {
                        dst.handle(now, from, t.kind, &t.payload);
                    }
                }
            }
            self.collect_events();
            if !moved {
                return;
            }
        }
        panic!("packets kept flowing for 10,000 rounds at one instant");
    }

    fn collect_events(&mut self) {
        let at = self.now - self.start;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(o) = n.as_mut() {
                while let Some(e) = o.poll_notification() {
                    self.log.push((at, i, e));
                }
            }
        }
    }

    /// Advances time in 10 ms steps, firing due timers and delivering.
    pub(crate) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.deliver();
        while self.now < end {
            self.now += Duration::from_millis(10);
            let now = self.now;
            for o in self.nodes.iter_mut().flatten() {
                if o.poll_timeout().is_some_and(|t| t <= now) {
                    o.handle_timeout(now);
                }
            }
            self.deliver();
        }
    }

    pub(crate) fn state_at(&self, observer: usize, subject: usize) -> Option<MemberState> {
        self.nodes[observer].as_ref()?.member(&name(subject)).map(|m| m.state)
    }

    pub(crate) fn changes(&self, subject: usize, change: MemberChange) -> Vec<(Duration, usize)> {
        self.log
            .iter()
            .filter_map(|(t, i, e)| match e {
                Notification::Member { change: c, member } if *c == change && *member.name == name(subject) => {
                    Some((*t, *i))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether every running node sees every other running node alive.
    pub(crate) fn all_alive(&self) -> bool {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].is_some()).collect();
        up.iter().all(|&a| {
            up.iter()
                .all(|&b| a == b || self.state_at(a, b) == Some(MemberState::Alive))
        })
    }

    /// Delivers `envelopes` to node `to` as if sent by a plain-text member
    /// at `from` (a datagram, or one stream frame per envelope).
    pub(crate) fn inject(&mut self, to: usize, from: SocketAddr, kind: FrameKind, envelopes: Vec<Envelope>) {
        let mut codec = Codec::new(0, u64::from(from.port()) << 8 | 0xfe, 1, 1, Security::Plaintext);
        let frames: Vec<Vec<u8>> = match kind {
            FrameKind::Datagram => vec![rumormill_wire::proto::Packet { envelopes }.encode_to_vec()],
            FrameKind::Stream => envelopes.iter().map(rumormill_wire::encode_envelope).collect(),
        };
        for body in frames {
            let packet = codec.seal(kind, &body).expect("fresh counter");
            self.raw(to, from, kind, &packet);
        }
    }

    pub(crate) fn raw(&mut self, to: usize, from: SocketAddr, kind: FrameKind, bytes: &[u8]) {
        let now = self.now;
        self.node(to).handle(now, from, kind, bytes);
        self.deliver();
    }
}
