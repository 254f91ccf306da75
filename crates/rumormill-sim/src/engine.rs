//! The discrete-event engine: a global `(time, sequence)` queue, one seeded
//! RNG for the network, and many [`Overlay`]s driven through their sans-IO
//! interface.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumormill_core::keys::KeyringRecord;
use rumormill_core::racks::{RackSpec, RaftRecord};
use rumormill_core::{
    Config, FrameKind, Identity, Keyring, MemberInfo, Notification, Overlay, Security, Transmit, WallTime,
};

use crate::network::NetworkModel;

/// Simulated time in nanoseconds since the start.
pub type Nanos = u64;

/// Seconds to [`Nanos`].
pub fn secs(s: f64) -> Nanos {
    (s * 1e9) as Nanos
}

#[derive(Debug)]
enum Action {
    Deliver {
        to: usize,
        from: SocketAddr,
        kind: FrameKind,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Nanos,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// What the engine needs of a simulated member: the sans-IO interface.
pub trait SimNode {
    /// A datagram or stream frame arrived.
    fn handle(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, bytes: &[u8]);
    /// A wake-up is due.
    fn handle_timeout(&mut self, now: Instant);
    /// The next packet to send.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// The next event.
    fn poll_notification(&mut self) -> Option<Notification>;
    /// The next wake-up.
    fn poll_timeout(&self) -> Option<Instant>;
    /// A Raft record it handed out is durable (the simulator keeps records
    /// in memory: at once).
    fn raft_persisted(&mut self, _now: Instant, _seq: u64) {}
}

impl SimNode for Overlay {
    fn handle(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, bytes: &[u8]) {
        Overlay::handle(self, now, from, kind, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        Overlay::handle_timeout(self, now);
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        Overlay::poll_transmit(self)
    }
    fn poll_notification(&mut self) -> Option<Notification> {
        Overlay::poll_notification(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Overlay::poll_timeout(self)
    }
    fn raft_persisted(&mut self, now: Instant, seq: u64) {
        Overlay::raft_persisted(self, now, seq);
    }
}

struct Slot<N> {
    node: Option<N>,
    addr: SocketAddr,
    epoch: u64,
    /// The keys the member starts with, primary first (none: plain text).
    keys: Vec<Vec<u8>>,
    /// The wake-up currently scheduled for this node, if any.
    timer: Option<Nanos>,
    /// The member's rack, given to it at every start.
    rack: Option<RackSpec>,
    /// The latest Raft record the member handed out: its durable Raft
    /// state, restored at its next start.
    raft: Option<RaftRecord>,
}

/// Traffic counted by the engine as it leaves the senders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams and stream frames sent.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams lost by the network model.
    pub lost: u64,
    /// Datagrams and stream frames from a member of one rack to a member
    /// of another ([`NetworkModel::crosses_racks`]), counted once as they
    /// leave (whether or not they arrive).
    pub cross_rack_packets: u64,
    /// Their bytes.
    pub cross_rack_bytes: u64,
    /// Those whose sender was not its rack's active gateway when it sent
    /// them, as judged by [`Simulation::judge_gateways_by`] (0 until a rule
    /// is given).
    pub cross_rack_packets_from_non_gateways: u64,
}

/// Whether a member is its rack's active gateway now.
type GatewayRule<N> = Box<dyn Fn(&N) -> bool>;

/// Who sends across racks: the rule telling an active gateway, and the
/// cross-rack packets each member sent.
struct CrossRack<N> {
    is_active_gateway: Option<GatewayRule<N>>,
    sent_by: Vec<u64>,
}

impl<N> Default for CrossRack<N> {
    fn default() -> Self {
        CrossRack {
            is_active_gateway: None,
            sent_by: Vec::new(),
        }
    }
}

/// Many members of one overlay over a [`NetworkModel`], with simulated time.
///
/// Same seed, same inputs: same run, bit for bit.
///
/// ```
/// use rumormill_sim::{NetworkModel, Simulation, secs};
/// let mut sim = Simulation::new(4, rumormill_core::Config::new_lan(), NetworkModel::lan(0.0), 7);
/// sim.bootstrap();
/// sim.run_until(secs(5.0));
/// assert!(sim.views_agree());
/// ```
pub struct Simulation<N = Overlay> {
    slots: Vec<Slot<N>>,
    by_addr: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    now: Nanos,
    base: Instant,
    rng: ChaCha8Rng,
    seed: u64,
    config: Option<Config>,
    /// The network model; change it between runs to partition or heal.
    pub network: NetworkModel,
    events: Vec<(Nanos, usize, Notification)>,
    traffic: Traffic,
    cross: CrossRack<N>,
    processed: u64,
}

/// The name of member `i` in a simulation.
pub fn member_name(i: usize) -> String {
    format!("m{i}")
}

/// The simulated address of member `i` in its `epoch`-th life.
pub fn member_addr(i: usize, epoch: u64) -> SocketAddr {
    // Simulated only: nothing is ever sent to these addresses.
    let ip = Ipv4Addr::new(127, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::new(ip.into(), 7000 + (epoch % 1000) as u16)
}

impl Simulation<Overlay> {
    /// `n` members with the given configuration, not yet in contact.
    pub fn new(n: usize, config: Config, network: NetworkModel, seed: u64) -> Simulation<Overlay> {
        Simulation::with_keys(n, config, network, seed, Vec::new())
    }

    /// Like [`Simulation::new`], every member's packets sealed under `key`
    /// (16, 24 or 32 bytes), for key rotation.
    pub fn new_encrypted(
        n: usize,
        config: Config,
        network: NetworkModel,
        seed: u64,
        key: &[u8],
    ) -> Simulation<Overlay> {
        Simulation::with_keys(n, config, network, seed, vec![key.to_vec()])
    }

    fn with_keys(
        n: usize,
        config: Config,
        network: NetworkModel,
        seed: u64,
        keys: Vec<Vec<u8>>,
    ) -> Simulation<Overlay> {
        let mut sim = Simulation::empty(Instant::now(), n, network, seed);
        sim.config = Some(config);
        for i in 0..n {
            let addr = member_addr(i, 1);
            sim.by_addr.insert(addr, i);
            sim.slots.push(Slot {
                node: None,
                addr,
                epoch: 1,
                keys: keys.clone(),
                timer: None,
                rack: None,
                raft: None,
            });
            sim.start(i);
        }
        sim
    }

    /// Member `i`'s rack from its next start on (see [`Identity::in_rack`]).
    pub fn set_rack(&mut self, i: usize, rack: RackSpec) {
        self.slots[i].rack = Some(rack);
    }

    /// Starts member `i` again (after [`Simulation::set_rack`], say) under
    /// the same epoch and address: for building an overlay of racks.
    pub fn start_again(&mut self, i: usize) {
        self.kill(i);
        self.start(i);
    }

    /// The keys member `i` starts with from its next restart on, primary
    /// first: as if given a key file and a fresh data directory.
    pub fn set_keys(&mut self, i: usize, keys: Vec<Vec<u8>>) {
        self.slots[i].keys = keys;
    }

    fn start(&mut self, i: usize) {
        let Some(config) = self.config.clone() else { return };
        let slot = &self.slots[i];
        let mut id = Identity::new(member_name(i), slot.addr, slot.epoch);
        if let Some(rack) = slot.rack.clone() {
            id = id.in_rack(rack);
        }
        let seed = self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ slot.epoch.rotate_left(32);
        let security = match slot.keys.split_first() {
            None => Security::Plaintext,
            Some((primary, rest)) => {
                let ring = Keyring::new(primary).and_then(|mut ring| {
                    for k in rest {
                        ring.install(k)?;
                    }
                    Ok(ring)
                });
                match ring {
                    Ok(ring) => Security::Encrypted(ring),
                    Err(e) => panic!("member {i}: the simulation's keys are not keys: {e}"),
                }
            }
        };
        let encrypted = !slot.keys.is_empty();
        let now = self.instant();
        let mut o = Overlay::new(config, id, security, seed, now);
        if let Some(record) = &self.slots[i].raft
            && let Err(e) = o.restore_raft(record)
        {
            panic!("member {i}: its own Raft record does not restore: {e}");
        }
        if encrypted {
            // A fresh start: the keys given, and the key report out.
            let _ = o.restore_keyring(now, self.wall(), &KeyringRecord::default());
        }
        self.slots[i].node = Some(o);
        self.slots[i].timer = None;
        self.reschedule(i);
    }

    /// Gives every member the full member list, as if the cluster had
    /// already converged (a warm start; joining 10,000 members one by one
    /// through a seed is its own experiment).
    pub fn bootstrap(&mut self) {
        let all: Vec<MemberInfo> = (0..self.slots.len())
            .filter_map(|i| self.slots[i].node.as_ref().map(Overlay::local))
            .collect();
        let now = self.instant();
        for i in 0..self.slots.len() {
            if let Some(o) = self.slots[i].node.as_mut() {
                o.restore(now, all.iter().cloned());
                o.set_seeds(vec![member_addr(0, 1)]);
            }
            self.reschedule(i);
        }
    }

    /// Member `i` joins through member `via`.
    pub fn join(&mut self, i: usize, via: usize) {
        let now = self.instant();
        let seed = self.slots[via].addr;
        if let Some(o) = self.slots[i].node.as_mut() {
            // A running overlay in the simulator has not left: join cannot fail.
            let _ = o.join(now, &[seed]);
        }
        self.flush(i);
    }

    /// Restarts a crashed member under its name with a new boot epoch,
    /// at a new address if `move_address`, and joins it through `via`.
    pub fn restart(&mut self, i: usize, move_address: bool, via: usize) {
        self.kill(i);
        let slot = &mut self.slots[i];
        slot.epoch += 1;
        if move_address {
            self.by_addr.remove(&slot.addr);
            slot.addr = member_addr(i, slot.epoch);
            self.by_addr.insert(slot.addr, i);
        }
        self.start(i);
        self.join(i, via);
    }

    /// Whether every running member sees exactly the running members (at
    /// their current boot epoch) as live (alive or suspect) and nobody else.
    ///
    /// Each member includes itself in its view, so equal view digests and
    /// live counts equal to the number of running members mean equal views
    /// made of exactly the running members (up to a 64-bit hash collision).
    pub fn views_agree(&self) -> bool {
        let running: Vec<&Overlay> = self.slots.iter().filter_map(|s| s.node.as_ref()).collect();
        let Some(first) = running.first() else { return true };
        let digest = first.view_digest();
        running
            .iter()
            .all(|o| o.live_count() == running.len() && o.view_digest() == digest)
    }
}

impl<N: SimNode> Simulation<N> {
    fn empty(base: Instant, n: usize, network: NetworkModel, seed: u64) -> Simulation<N> {
        Simulation {
            slots: Vec::with_capacity(n),
            by_addr: HashMap::with_capacity(n),
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            base,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            config: None,
            network,
            events: Vec::new(),
            traffic: Traffic::default(),
            cross: CrossRack::default(),
            processed: 0,
        }
    }

    /// A simulation of ready-made members; `base` is the instant they were
    /// created at (simulated time zero) and member `i` lives at `addrs[i]`.
    pub fn from_nodes(base: Instant, nodes: Vec<(SocketAddr, N)>, network: NetworkModel, seed: u64) -> Simulation<N> {
        let mut sim = Simulation::empty(base, nodes.len(), network, seed);
        for (i, (addr, node)) in nodes.into_iter().enumerate() {
            sim.by_addr.insert(addr, i);
            sim.slots.push(Slot {
                node: Some(node),
                addr,
                epoch: 1,
                keys: Vec::new(),
                timer: None,
                rack: None,
                raft: None,
            });
            sim.reschedule(i);
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    /// Simulated time now.
    pub fn now(&self) -> Nanos {
        self.now
    }

    /// The members' wall clock now, for their writes: a virtual one that
    /// reads the UNIX epoch at simulated time zero and runs with it, the
    /// same on every member (a run never depends on the host's clock).
    pub fn wall(&self) -> WallTime {
        WallTime::from_unix_ms(self.now / 1_000_000)
    }

    /// Number of member slots (running or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Crashes member `i`: it stops at once, silently.
    pub fn kill(&mut self, i: usize) {
        self.slots[i].node = None;
        self.slots[i].timer = None;
    }

    /// Whether member `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.slots[i].node.is_some()
    }

    /// Member `i`'s core, if running.
    pub fn node(&self, i: usize) -> Option<&N> {
        self.slots[i].node.as_ref()
    }

    /// Member `i`'s core, mutably (to call its API), if running. Call
    /// [`Simulation::flush`] afterwards so what it wants to send is sent.
    pub fn node_mut(&mut self, i: usize) -> Option<&mut N> {
        self.slots[i].node.as_mut()
    }

    /// Events seen so far (since the last [`Simulation::take_events`]),
    /// with time and observer, in order.
    pub fn events(&self) -> &[(Nanos, usize, Notification)] {
        &self.events
    }

    /// Takes the events seen since the last call (all of them the first
    /// time): a long run can digest them as it goes instead of keeping
    /// every notification.
    pub fn take_events(&mut self) -> Vec<(Nanos, usize, Notification)> {
        std::mem::take(&mut self.events)
    }

    /// Traffic so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Judges senders of cross-rack packets from now on: a packet from one
    /// rack to another whose sender `is_active_gateway` does not accept at
    /// send time counts in [`Traffic::cross_rack_packets_from_non_gateways`].
    pub fn judge_gateways_by(&mut self, is_active_gateway: impl Fn(&N) -> bool + 'static) {
        self.cross.is_active_gateway = Some(Box::new(is_active_gateway));
    }

    /// Cross-rack packets member `i` has sent so far (all its lives).
    pub fn cross_rack_packets_sent_by(&self, i: usize) -> u64 {
        self.cross.sent_by.get(i).copied().unwrap_or(0)
    }

    /// Scheduled actions processed so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    fn push(&mut self, at: Nanos, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            action,
        }));
    }

    fn reschedule(&mut self, i: usize) {
        let Some(o) = self.slots[i].node.as_ref() else {
            return;
        };
        let Some(t) = o.poll_timeout() else {
            self.slots[i].timer = None;
            return;
        };
        let at = (t.saturating_duration_since(self.base).as_nanos() as Nanos).max(self.now);
        if self.slots[i].timer != Some(at) {
            self.slots[i].timer = Some(at);
            self.push(at, Action::Timer { node: i });
        }
    }

    /// Calls `f` on member `i` (if running) with the current time, then
    /// sends what it queued: the way to subscribe, publish or write from a
    /// test.
    pub fn with_node<T>(&mut self, i: usize, f: impl FnOnce(&mut N, Instant) -> T) -> Option<T> {
        let now = self.instant();
        let out = self.slots.get_mut(i)?.node.as_mut().map(|n| f(n, now));
        self.flush(i);
        out
    }

    /// Sends what member `i` queued, collects its events, reschedules it.
    pub fn flush(&mut self, i: usize) {
        let from = self.slots[i].addr;
        // Every packet of one flush leaves at the same instant: the sender
        // is or is not its rack's gateway for all of them.
        let mut from_gateway: Option<bool> = None;
        let Some(o) = self.slots[i].node.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        let now = self.base + Duration::from_nanos(self.now);
        let mut raft = None;
        loop {
            while let Some(t) = o.poll_transmit() {
                out.push(t);
            }
            let mut persisted = false;
            while let Some(e) = o.poll_notification() {
                // Raft records are durable at once (kept for a restart):
                // the messages that waited for them leave now.
                if let Notification::Raft(r) = &e {
                    o.raft_persisted(now, r.seq);
                    raft = Some(r.clone());
                    persisted = true;
                }
                self.events.push((self.now, i, e));
            }
            if !persisted {
                break;
            }
        }
        if raft.is_some() {
            self.slots[i].raft = raft;
        }
        for t in out {
            self.traffic.packets += 1;
            self.traffic.bytes += t.payload.len() as u64;
            let Some(&to) = self.by_addr.get(&t.to) else { continue };
            if self.network.crosses_racks(i, to) {
                self.traffic.cross_rack_packets += 1;
                self.traffic.cross_rack_bytes += t.payload.len() as u64;
                if self.cross.sent_by.len() <= i {
                    self.cross.sent_by.resize(i + 1, 0);
                }
                self.cross.sent_by[i] += 1;
                if let Some(rule) = &self.cross.is_active_gateway {
                    let node = self.slots[i].node.as_ref();
                    let gateway = *from_gateway.get_or_insert_with(|| node.is_some_and(rule));
                    if !gateway {
                        self.traffic.cross_rack_packets_from_non_gateways += 1;
                    }
                }
            }
            if !self.network.connected(i, to) {
                continue;
            }
            let delay = match t.kind {
                FrameKind::Datagram => match self.network.datagram_delay(&mut self.rng, i, to) {
                    Some(d) => d,
                    None => {
                        self.traffic.lost += 1;
                        continue;
                    }
                },
                FrameKind::Stream => self.network.stream_delay(&mut self.rng, i, to, t.payload.len()),
            };
            self.push(
                self.now + delay,
                Action::Deliver {
                    to,
                    from,
                    kind: t.kind,
                    bytes: t.payload,
                },
            );
        }
        self.reschedule(i);
    }

    /// Processes everything scheduled up to and including `until`.
    pub fn run_until(&mut self, until: Nanos) {
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(s)) = self.queue.pop() else { break };
            self.now = s.at;
            self.processed += 1;
            match s.action {
                Action::Timer { node } => {
                    if self.slots[node].timer != Some(s.at) {
                        continue; // superseded
                    }
                    self.slots[node].timer = None;
                    let now = self.instant();
                    if let Some(o) = self.slots[node].node.as_mut() {
                        o.handle_timeout(now);
                        self.flush(node);
                    }
                }
                Action::Deliver { to, from, kind, bytes } => {
                    // A partition that started while the packet was in flight drops it too.
                    let sender = self.by_addr.get(&from).copied();
                    if sender.is_some_and(|s| !self.network.connected(s, to)) {
                        continue;
                    }
                    let now = self.instant();
                    if let Some(o) = self.slots[to].node.as_mut() {
                        o.handle(now, from, kind, &bytes);
                        self.flush(to);
                    }
                }
            }
        }
        self.now = self.now.max(until);
    }
}
