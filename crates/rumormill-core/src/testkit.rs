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
    /// Each node's rack (index), when the net has racks.
    pub(crate) racks: Vec<Option<usize>>,
    /// Candidates per rack, when the net has racks.
    candidates: usize,
    /// Packets between nodes of different racks: (when, from, to, whether
    /// the sender was its rack's active gateway at the time).
    pub(crate) crossings: Vec<(Duration, usize, usize, bool)>,
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
            racks: Vec::new(),
            candidates: 0,
            crossings: Vec::new(),
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

    /// `racks.len()` racks of `racks[r]` members each, the first
    /// `candidates` of each rack its gateway candidates; each member joins
    /// its rack's first member.
    pub(crate) fn with_racks(racks: &[usize], candidates: usize, config: Config) -> Net {
        let now = Instant::now();
        let mut net = Net {
            nodes: Vec::new(),
            now,
            start: now,
            cut: BTreeSet::new(),
            log: Vec::new(),
            config,
            security: || Security::Plaintext,
            racks: Vec::new(),
            candidates,
            crossings: Vec::new(),
        };
        for (r, &n) in racks.iter().enumerate() {
            for _ in 0..n {
                net.racks.push(Some(r));
            }
        }
        for i in 0..net.racks.len() {
            let o = net.spawn(i, addr(i), 1);
            net.nodes.push(Some(o));
        }
        for i in 0..net.racks.len() {
            let first = net.rack_members(net.racks[i].unwrap_or(0))[0];
            if first != i {
                let now = net.now;
                net.node(i).join(now, &[addr(first)]).expect("active");
            }
        }
        net
    }

    /// The nodes of rack `r`.
    pub(crate) fn rack_members(&self, r: usize) -> Vec<usize> {
        (0..self.racks.len()).filter(|&i| self.racks[i] == Some(r)).collect()
    }

    /// The rack spec of node `i`, if the net has racks.
    fn rack_spec(&self, i: usize) -> Option<crate::racks::RackSpec> {
        let r = (*self.racks.get(i)?)?;
        let members = self.rack_members(r);
        let spec = crate::racks::RackSpec::new(&format!("r{r}")).expect("a valid rack name");
        let first = members.iter().position(|&m| m == i)?;
        if first >= self.candidates {
            return Some(spec);
        }
        // A candidate knows the other racks' candidates.
        let seeds = (0..self.racks.len())
            .filter(|&j| self.racks[j].is_some_and(|q| q != r))
            .filter(|&j| {
                let q = self.racks[j].unwrap_or(0);
                self.rack_members(q)
                    .iter()
                    .position(|&m| m == j)
                    .is_some_and(|p| p < self.candidates)
            })
            .map(addr)
            .collect();
        Some(spec.candidate(self.candidates).with_remote_seeds(seeds))
    }

    fn spawn(&self, i: usize, at: SocketAddr, epoch: u64) -> Overlay {
        let mut id = Identity::new(name(i), at, epoch);
        if let Some(spec) = self.rack_spec(i) {
            id = id.in_rack(spec);
        }
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
        let seed = match self.racks.get(i).copied().flatten() {
            Some(r) => addr(*self.rack_members(r).iter().find(|&&m| m != i).unwrap_or(&0)),
            None => addr(0),
        };
        o.join(self.now, &[seed]).expect("active");
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
                    if let (Some(Some(a)), Some(Some(b))) = (self.racks.get(i), self.racks.get(j))
                        && a != b
                    {
                        let gateway = self.nodes[i].as_ref().is_some_and(Overlay::is_active_gateway);
                        self.crossings.push((self.now - self.start, i, j, gateway));
                    }
                    if self.cut.contains(&(i, j)) {
                        continue;
                    }
                    let now = self.now;
                    if let Some(dst) = self.nodes[j].as_mut() {
                        dst.handle(now, from, t.kind, &t.payload);
                    }
                }
            }
            moved |= self.collect_events();
            if !moved {
                return;
            }
        }
        panic!("packets kept flowing for 10,000 rounds at one instant");
    }

    /// Moves the nodes' notifications into the log; Raft records are
    /// durable at once. Whether any was.
    fn collect_events(&mut self) -> bool {
        let at = self.now - self.start;
        let now = self.now;
        let mut persisted = false;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(o) = n.as_mut() {
                while let Some(e) = o.poll_notification() {
                    if let Notification::Raft(r) = &e {
                        o.raft_persisted(now, r.seq);
                        persisted = true;
                    }
                    self.log.push((at, i, e));
                }
            }
        }
        persisted
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
        self.inject_in(0, to, from, kind, envelopes);
    }

    /// Like [`Net::inject`], sealed in `scope` (a rack's, see [`rumormill_wire::scope_id`]).
    pub(crate) fn inject_in(
        &mut self,
        scope: u32,
        to: usize,
        from: SocketAddr,
        kind: FrameKind,
        envelopes: Vec<Envelope>,
    ) {
        let mut codec = Codec::new(scope, u64::from(from.port()) << 8 | 0xfe, 1, 1, Security::Plaintext);
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
