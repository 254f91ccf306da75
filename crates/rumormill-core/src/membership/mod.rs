//! Membership: who is in the overlay and in what state.
//!
//! [`Membership`] is a sub-machine of the overlay, shaped like
//! [`crate::replication::Replication`]: it owns the member table, the
//! failure detector's state and the piggyback queue, takes messages and
//! timer expiries, and queues membership changes for the application. What
//! it needs of the rest of the overlay comes in an [`Env`] for each call.
//!
//! - [`lifecycle`]: the rules by which a member becomes alive, suspect,
//!   failed or left, and refutes suspicion about itself;
//! - [`swim`]: the failure detector's probes (ping, ack, ping-req, nack);
//! - [`suspicion`]: Lifeguard's suspicion timeout that shrinks with
//!   independent confirmations;
//! - [`awareness`]: Lifeguard's local health multiplier;
//! - [`piggyback`]: membership changes retransmitted on every packet, and
//!   the gossip rounds that carry them;
//! - [`state_sync`]: joins, push-pull full-state exchange, reconnection.

pub(crate) mod awareness;
pub(crate) mod lifecycle;
pub(crate) mod piggyback;
#[cfg(test)]
mod security_tests;
pub(crate) mod state_sync;
pub(crate) mod suspicion;
pub(crate) mod swim;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::{Index, IndexMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::Envelope;

use crate::config::Config;
use crate::notification::Notification;
use crate::overlay::{Deadline, Identity, Sender, Wire};
use awareness::Awareness;
use piggyback::Piggyback;
use suspicion::Suspicion;
use swim::{IndirectProbe, Probe};

/// A member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; failed unless it refutes in time.
    Suspect,
    /// Declared failed. Kept as a tombstone.
    Failed,
    /// Left gracefully. Kept as a tombstone.
    Left,
}

impl MemberState {
    /// Alive or suspect: still probed and counted in the cluster size.
    pub fn is_live(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// A public snapshot of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The member's name, unique in the overlay.
    pub name: Arc<str>,
    /// Where it receives datagrams and streams.
    pub addr: SocketAddr,
    /// Its incarnation within its boot epoch.
    pub incarnation: u32,
    /// Its boot epoch: a restarted member comes back with a higher one.
    pub epoch: u64,
    /// Its state.
    pub state: MemberState,
}

/// A socket address in 19 bytes (std's takes 32): the member table of a
/// large simulation holds 10⁸ of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompactAddr {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl From<SocketAddr> for CompactAddr {
    fn from(a: SocketAddr) -> CompactAddr {
        let (ip, v6) = match a.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
            IpAddr::V6(v6) => (v6.octets(), true),
        };
        CompactAddr {
            ip,
            port: a.port().to_be_bytes(),
            v6,
        }
    }
}

impl CompactAddr {
    pub(crate) fn get(self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.ip);
        let ip = match (self.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, u16::from_be_bytes(self.port))
    }
}

/// Milliseconds since the overlay was created: the member table's clock.
pub(crate) type Stamp = u64;

/// One entry of the member table (56 bytes).
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) name: Arc<str>,
    pub(crate) epoch: u64,
    /// When the state last changed.
    pub(crate) since: Stamp,
    pub(crate) incarnation: u32,
    pub(crate) addr: CompactAddr,
    pub(crate) state: MemberState,
}

impl Member {
    pub(crate) fn info(&self) -> MemberInfo {
        MemberInfo {
            name: self.name.clone(),
            addr: self.addr.get(),
            incarnation: self.incarnation,
            epoch: self.epoch,
            state: self.state,
        }
    }

    /// The order of a member's versions: a new boot epoch beats any
    /// incarnation of the old one.
    pub(crate) fn version(&self) -> (u64, u32) {
        (self.epoch, self.incarnation)
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// This member's share of the view digest while it is live.
    fn digest(&self) -> u64 {
        if self.state.is_live() {
            name_hash(&self.name) ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        } else {
            0
        }
    }
}

/// FNV-1a: a fixed, fast hash for member names (no per-process seed, so
/// nothing about a run depends on the process).
pub(crate) fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The other members (not the local one), addressable by index for O(1)
/// random choice and by name. The name index holds only positions (4 bytes
/// a member: a simulation of 10,000 members holds 10⁸ entries) and is only
/// looked up, never iterated, so its order cannot change behaviour.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Vec<Member>,
    index: HashTable<u32>,
    live: usize,
    digest: u64,
}

impl Members {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Alive and suspect members.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Sum of the live members' `(name, epoch)` hashes: two members with the
    /// same digest (and count) see the same live members, whp.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    pub(crate) fn reserve(&mut self, more: usize) {
        self.list.reserve(more);
        let list = &self.list;
        self.index.reserve(more, |&k| name_hash(&list[k as usize].name));
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        let list = &self.list;
        self.index
            .find(name_hash(name), |&i| &*list[i as usize].name == name)
            .map(|&i| i as usize)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Member> {
        self.position(name).map(|i| &self.list[i])
    }

    pub(crate) fn at(&self, i: usize) -> &Member {
        &self.list[i]
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.list.iter()
    }

    pub(crate) fn insert(&mut self, m: Member) -> usize {
        if let Some(i) = self.position(&m.name) {
            self.update(i, |slot| *slot = m);
            return i;
        }
        let i = self.list.len();
        if m.state.is_live() {
            self.live += 1;
        }
        self.digest = self.digest.wrapping_add(m.digest());
        let list = &self.list;
        self.index.insert_unique(name_hash(&m.name), i as u32, |&k| {
            name_hash(list.get(k as usize).map_or(&*m.name, |x| &*x.name))
        });
        self.list.push(m);
        i
    }

    /// Inserts a new member at a random position of the probe order (as
    /// memberlist does), so that members that learn of each other at the
    /// same time do not probe in lockstep.
    pub(crate) fn insert_randomly(&mut self, m: Member, rng: &mut impl Rng) -> usize {
        let i = self.insert(m);
        let j = rng.random_range(0..self.list.len());
        self.swap(i, j);
        j
    }

    /// Swaps two positions. The index entries are taken out first and put
    /// back after: positions in the index are a permutation, so each lookup
    /// by position is unambiguous at every step.
    fn swap(&mut self, i: usize, j: usize) {
        if i == j {
            return;
        }
        self.unindex(i);
        self.unindex(j);
        self.list.swap(i, j);
        self.index_at(i);
        self.index_at(j);
    }

    fn unindex(&mut self, i: usize) {
        if let Ok(e) = self
            .index
            .find_entry(name_hash(&self.list[i].name), |&k| k as usize == i)
        {
            e.remove();
        }
    }

    fn index_at(&mut self, i: usize) {
        let list = &self.list;
        self.index.insert_unique(name_hash(&list[i].name), i as u32, |&k| {
            name_hash(&list[k as usize].name)
        });
    }

    /// Changes a member, keeping the live count right.
    pub(crate) fn update(&mut self, i: usize, f: impl FnOnce(&mut Member)) {
        let was = self.list[i].state.is_live();
        self.digest = self.digest.wrapping_sub(self.list[i].digest());
        f(&mut self.list[i]);
        self.digest = self.digest.wrapping_add(self.list[i].digest());
        match (was, self.list[i].state.is_live()) {
            (true, false) => self.live -= 1,
            (false, true) => self.live += 1,
            _ => {}
        }
    }

    pub(crate) fn remove(&mut self, i: usize) -> Member {
        let last = self.list.len() - 1;
        self.swap(i, last);
        self.unindex(last);
        let m = self.list.swap_remove(last);
        self.digest = self.digest.wrapping_sub(m.digest());
        if m.state.is_live() {
            self.live -= 1;
        }
        m
    }

    /// Shuffles the table (the probe order) and rebuilds the index.
    pub(crate) fn shuffle(&mut self, rng: &mut impl Rng) {
        use rand::seq::SliceRandom;
        self.list.shuffle(rng);
        self.index.clear();
        for (i, m) in self.list.iter().enumerate() {
            let list = &self.list;
            self.index
                .insert_unique(name_hash(&m.name), i as u32, |&k| name_hash(&list[k as usize].name));
        }
    }

    /// Up to `k` distinct random members accepted by `eligible`.
    pub(crate) fn random(&self, k: usize, rng: &mut impl Rng, eligible: impl Fn(&Member) -> bool) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        let n = self.list.len();
        if k == 0 || n == 0 {
            return out;
        }
        // Random probing is cheap when eligible members are common; fall back
        // to a full scan when they are rare.
        for _ in 0..(4 * k + 8) {
            if out.len() == k {
                return out;
            }
            let i = rng.random_range(0..n);
            if !out.contains(&i) && eligible(&self.list[i]) {
                out.push(i);
            }
        }
        let mut rest: Vec<usize> = (0..n)
            .filter(|i| !out.contains(i) && eligible(&self.list[*i]))
            .collect();
        while out.len() < k && !rest.is_empty() {
            let j = rng.random_range(0..rest.len());
            out.push(rest.swap_remove(j));
        }
        out
    }
}

/// What membership borrows from the overlay for one input: the
/// configuration, the overlay's RNG (membership's draws and the others'
/// share one stream, in a fixed order) and the wire that seals and counts.
pub(crate) struct Env<'a> {
    pub(crate) config: &'a Config,
    pub(crate) rng: &'a mut ChaCha8Rng,
    pub(crate) wire: &'a mut Wire,
}

/// Who the local member is; its incarnation rises when it refutes.
#[derive(Debug, Clone)]
struct Local {
    name: Arc<str>,
    addr: SocketAddr,
    epoch: u64,
    incarnation: u32,
}

/// Membership's periodic ticks, the entries of [`Ticks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    Probe,
    Gossip,
    PushPull,
    Reconnect,
    Reap,
}

/// When each periodic tick runs next, indexed by [`Tick`].
#[derive(Debug, Clone)]
struct Ticks([Instant; 5]);

impl Index<Tick> for Ticks {
    type Output = Instant;
    fn index(&self, t: Tick) -> &Instant {
        &self.0[t as usize]
    }
}

impl IndexMut<Tick> for Ticks {
    fn index_mut(&mut self, t: Tick) -> &mut Instant {
        &mut self.0[t as usize]
    }
}

/// The timers membership answers for, as the overlay's timer table lists
/// them: the periodic ticks and the deadlines of what is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The direct ping of the probe in flight times out: indirect probes start.
    ProbeDeadline,
    /// Indirect probes served for others whose target stayed silent.
    IndirectProbes,
    /// Reconnection pings that went unanswered.
    Reconnects,
    /// Suspicions that expire, and suspects due for a check.
    Suspicions,
    Probe,
    PushPull,
    Reconnect,
    Reap,
    Gossip,
}

impl Timer {
    /// Every timer, in the order the overlay runs them (gossip last: its
    /// round carries the changes the others just made).
    pub(crate) const ALL: [Timer; 9] = [
        Timer::ProbeDeadline,
        Timer::IndirectProbes,
        Timer::Reconnects,
        Timer::Suspicions,
        Timer::Probe,
        Timer::PushPull,
        Timer::Reconnect,
        Timer::Reap,
        Timer::Gossip,
    ];
}

/// The membership sub-machine of one member: the member table, the failure
/// detector, the piggyback queue and the local member's own life.
#[derive(Debug)]
pub(crate) struct Membership {
    me: Local,
    /// Zero of the member table's millisecond clock.
    origin: Instant,
    members: Members,
    piggyback: Piggyback,
    awareness: Awareness,
    suspicions: BTreeMap<Arc<str>, Suspicion>,
    probe: Option<Probe>,
    probe_index: usize,
    /// Ping-reqs this member serves for others, by the seq of its own ping.
    indirect_probes: BTreeMap<u32, IndirectProbe>,
    /// Reconnection pings in flight: the address and when to give up.
    reconnects: BTreeMap<u32, (SocketAddr, Instant)>,
    next_seq: u32,
    seeds: Vec<SocketAddr>,
    ticks: Ticks,
    /// The local member has announced its departure.
    leaving: bool,
    events: VecDeque<Notification>,
}

impl Membership {
    /// The local member `identity`, alone. The ticks start at random
    /// phases, so that members started together do not act in lockstep.
    pub(crate) fn new(config: &Config, identity: &Identity, now: Instant, rng: &mut ChaCha8Rng) -> Membership {
        let mut phase = |d: Duration| now + d.mul_f64(rng.random::<f64>());
        // One draw each, in this order.
        let probe = phase(config.probe_interval);
        let gossip = phase(config.gossip_interval);
        let push_pull = phase(config.push_pull_interval);
        let reconnect = phase(config.reconnect_interval);
        let reap = now + config.tombstone_ttl.min(Duration::from_secs(60));
        Membership {
            me: Local {
                name: identity.name.clone(),
                addr: identity.addr,
                epoch: identity.epoch,
                incarnation: 0,
            },
            origin: now,
            members: Members::default(),
            piggyback: Piggyback::default(),
            awareness: Awareness::new(config.awareness_max),
            suspicions: BTreeMap::new(),
            probe: None,
            probe_index: 0,
            indirect_probes: BTreeMap::new(),
            reconnects: BTreeMap::new(),
            next_seq: 0,
            seeds: Vec::new(),
            ticks: Ticks([probe, gossip, push_pull, reconnect, reap]),
            leaving: false,
            events: VecDeque::new(),
        }
    }

    /// The local member `identity` in the pool of racks' active gateways:
    /// its changes go only on packets between racks.
    pub(crate) fn new_crossing(config: &Config, identity: &Identity, now: Instant, rng: &mut ChaCha8Rng) -> Membership {
        let mut m = Membership::new(config, identity, now, rng);
        m.piggyback.crossing = true;
        m
    }

    // ----- views for the other sub-machines -----------------------------

    /// The member table, read-only.
    pub(crate) fn table(&self) -> &Members {
        &self.members
    }

    /// A sender whose datagrams carry this member's piggybacked changes.
    pub(crate) fn sender<'a>(&'a mut self, wire: &'a mut Wire, config: &Config) -> Sender<'a> {
        self.lend(wire, config).1
    }

    /// The member table to read and a sender, together: what a sub-machine
    /// that sends to members it looks up (events) is given.
    pub(crate) fn lend<'a>(&'a mut self, wire: &'a mut Wire, config: &Config) -> (&'a Members, Sender<'a>) {
        let limit = config.retransmit_limit(self.cluster_size());
        (&self.members, Sender::new(wire, &mut self.piggyback, limit))
    }

    // ----- timers -------------------------------------------------------

    /// When `timer` is due, or `None` when nothing waits on it.
    pub(crate) fn deadline(&self, timer: Timer) -> Option<Deadline> {
        if self.leaving {
            // A departing member only gossips its departure.
            return (timer == Timer::Gossip).then(|| Deadline::wake(self.ticks[Tick::Gossip]));
        }
        match timer {
            Timer::ProbeDeadline => self.probe.as_ref().and_then(|p| p.direct_deadline).map(Deadline::wake),
            Timer::IndirectProbes => self
                .indirect_probes
                .values()
                .map(|r| r.deadline)
                .min()
                .map(Deadline::wake),
            Timer::Reconnects => self.reconnects.values().map(|r| r.1).min().map(Deadline::wake),
            Timer::Suspicions => self
                .suspicions
                .values()
                .map(|s| s.deadline.min(s.next_check))
                .min()
                .map(Deadline::wake),
            Timer::Probe => Some(Deadline::wake(self.ticks[Tick::Probe])),
            Timer::PushPull => Some(Deadline::wake(self.ticks[Tick::PushPull])),
            Timer::Reconnect => Some(Deadline::wake(self.ticks[Tick::Reconnect])),
            Timer::Reap => Some(Deadline::wake(self.ticks[Tick::Reap])),
            // With nothing to gossip the tick still moves on when due (so
            // the next round keeps its phase) but is no reason to wake.
            Timer::Gossip => Some(Deadline {
                at: self.ticks[Tick::Gossip],
                wakes: !self.piggyback.is_empty(),
            }),
        }
    }

    /// Runs `timer`, due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant, timer: Timer, env: &mut Env<'_>) {
        match timer {
            Timer::ProbeDeadline => self.start_indirect_probe(env),
            Timer::IndirectProbes => self.expire_indirect_probes(now, env),
            Timer::Reconnects => self.reconnects.retain(|_, (_, deadline)| *deadline > now),
            Timer::Suspicions => {
                self.expire_suspicions(now, env);
                self.check_suspects(now, env);
            }
            Timer::Probe => self.probe_tick(now, env),
            Timer::PushPull => self.push_pull_tick(now, env),
            Timer::Reconnect => self.reconnect_tick(now, env),
            Timer::Reap => self.reap_tick(now, env),
            Timer::Gossip => self.gossip_tick(now, env),
        }
    }

    // ----- outputs and queries ------------------------------------------

    /// The next membership change for the application.
    pub(crate) fn poll_notification(&mut self) -> Option<Notification> {
        self.events.pop_front()
    }

    /// Whether the local member has announced its departure.
    pub(crate) fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// Whether every change (a departure included) has been sent enough.
    pub(crate) fn nothing_to_tell(&self) -> bool {
        self.piggyback.is_empty()
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.me.name
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.me.addr
    }

    /// The local member as others should see it.
    pub(crate) fn local(&self) -> MemberInfo {
        MemberInfo {
            name: self.me.name.clone(),
            addr: self.me.addr,
            incarnation: self.me.incarnation,
            epoch: self.me.epoch,
            state: if self.leaving {
                MemberState::Left
            } else {
                MemberState::Alive
            },
        }
    }

    /// A fingerprint of the live view (see [`crate::Overlay::view_digest`]).
    pub(crate) fn view_digest(&self) -> u64 {
        let me = name_hash(&self.me.name) ^ self.me.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.members.digest().wrapping_add(me)
    }

    /// Lifeguard's local health score.
    pub(crate) fn health_score(&self) -> u32 {
        self.awareness.score()
    }

    /// Live members including the local one.
    pub(crate) fn cluster_size(&self) -> usize {
        self.members.live() + 1
    }

    #[cfg(test)]
    pub(crate) fn seeds(&self) -> &[SocketAddr] {
        &self.seeds
    }

    /// Replaces the seed addresses re-contacted when not seen alive.
    pub(crate) fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        self.seeds = seeds;
    }

    pub(super) fn stamp(&self, now: Instant) -> Stamp {
        now.saturating_duration_since(self.origin).as_millis() as u64
    }

    // ----- sending ------------------------------------------------------

    /// Sends messages in one datagram with piggybacked changes; each
    /// change goes out as often as the cluster's size calls for.
    pub(super) fn send(&mut self, env: &mut Env<'_>, to: SocketAddr, msgs: Vec<Envelope>) {
        let limit = env.config.retransmit_limit(self.cluster_size());
        env.wire.send(to, msgs, &mut self.piggyback, limit);
    }

    pub(super) fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn member(name: String) -> Member {
        Member {
            name: name.into(),
            epoch: 1,
            since: 0,
            incarnation: 0,
            addr: CompactAddr::from(SocketAddr::from(([127, 0, 0, 1], 1))),
            state: MemberState::Alive,
        }
    }

    #[test]
    fn the_name_index_stays_exact_through_inserts_swaps_removals_and_shuffles() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut m = Members::default();
        for round in 0..20_000u32 {
            match rng.random_range(0..10) {
                0..=5 => {
                    m.insert_randomly(member(format!("n{}", rng.random_range(0..64))), &mut rng);
                }
                6..=8 if m.len() > 0 => {
                    m.remove(rng.random_range(0..m.len()));
                }
                _ => m.shuffle(&mut rng),
            }
            for p in 0..m.len() {
                assert_eq!(m.position(&m.at(p).name), Some(p), "round {round}");
            }
            assert_eq!(m.index.len(), m.len());
            assert_eq!(m.live(), m.len());
        }
    }
}
