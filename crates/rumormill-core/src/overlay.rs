use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::{Envelope, envelope::Body};
use rumormill_wire::{Codec, FrameKind, HeaderFilter, KeyId, KeyInfo, Keyring, PacketBuilder, Security, WireError};

use crate::config::Config;
use crate::events::{self, Delivery, EventId, Events, PendingEvent, dedup};
use crate::keys::{self, KeyError, KeyProgress, KeyStep, KeyringRecord, Rotation};
use crate::luggage;
use crate::membership::piggyback::Piggyback;
use crate::membership::{self, Member, MemberInfo, MemberState, Membership};
use crate::notification::Notification;
use crate::racks::{self, Fence, RackInfo, RackSpec, Racks, RaftError, RaftRecord, RemoteMember};
use crate::replication::{Replication, ReplicationStats, Store, Update, UpdateHandler};
use crate::reserved::KeyReport;
use crate::wall::{WallClock, WallTime};

/// Who the local member is.
///
/// ```
/// let id = rumormill_core::Identity::new("web-1", "127.0.0.1:7950".parse().unwrap(), 3);
/// assert_eq!(&*id.name, "web-1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Unique name in the overlay. A member restarted with the same name
    /// (and a higher epoch) takes over its old identity.
    pub name: Arc<str>,
    /// Address others reach it at (datagrams and streams).
    pub addr: SocketAddr,
    /// Boot epoch: must be higher at every start of the same name, e.g. a
    /// counter kept on disk. It orders the lives of a member. (It also goes
    /// into the subkey of its packets, but nonce uniqueness does not rest on
    /// it: each life adds a random salt, see [`Overlay::new`].)
    pub epoch: u64,
    /// The member's rack, or `None` for an overlay without racks (one flat
    /// pool, as if every member were in the same rack).
    pub rack: Option<RackSpec>,
}

impl Identity {
    /// An identity.
    pub fn new(name: impl Into<Arc<str>>, addr: SocketAddr, epoch: u64) -> Identity {
        Identity {
            name: name.into(),
            addr,
            epoch,
            rack: None,
        }
    }

    /// The same identity in a rack.
    ///
    /// ```
    /// use rumormill_core::{Identity, racks::RackSpec};
    /// let id = Identity::new("web-1", "127.0.0.1:7950".parse().unwrap(), 3)
    ///     .in_rack(RackSpec::new("eu-1").unwrap().candidate(3));
    /// assert_eq!(id.rack.map(|r| r.name), Some("eu-1".into()));
    /// ```
    pub fn in_rack(mut self, rack: RackSpec) -> Identity {
        self.rack = Some(rack);
        self
    }

    /// The sender id in packet headers: derived from the name, so unique in
    /// the overlay; with the epoch and the life's salt it keys the
    /// per-sender subkey.
    pub fn sender_id(&self) -> u64 {
        crate::membership::name_hash(&self.name)
    }
}

/// This life's salt for the packet header: drawn from the caller's seed on
/// a ChaCha stream of its own, so the protocol's random draws (stream 0) are
/// unchanged and the salt does not give the RNG's state away.
fn life_salt(seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0x5a17);
    rng.random()
}

/// The first `tick + k·interval` after `now`: a periodic timer that keeps its
/// phase however long it was idle.
pub(crate) fn next_tick(tick: Instant, interval: Duration, now: Instant) -> Instant {
    if tick > now {
        return tick;
    }
    let behind = now.duration_since(tick).as_nanos();
    let step = interval.as_nanos().max(1);
    let steps = u32::try_from(behind / step + 1).unwrap_or(u32::MAX);
    tick + interval * steps
}

/// Errors of API calls on an [`Overlay`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    /// A keyring operation failed.
    #[error(transparent)]
    Key(#[from] WireError),
    /// The member has left the overlay.
    #[error("this member has left the overlay")]
    Left,
    /// An argument is invalid (a topic name, a payload size…).
    #[error("{0}")]
    Invalid(String),
    /// The write would take this member beyond its quota in the store.
    #[error(transparent)]
    Quota(#[from] crate::replication::QuotaExceeded),
    /// A Raft state could not be restored (or this member is no candidate).
    #[error(transparent)]
    Raft(#[from] RaftError),
}

/// Something the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// A datagram, or a frame for a stream (which the driver prefixes with
    /// its length, see [`rumormill_wire::encode_frame`]).
    pub kind: FrameKind,
    /// The sealed bytes.
    pub payload: Vec<u8>,
}

/// Counters of what the overlay sent, received and rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Bytes of datagrams sent.
    pub datagram_bytes_sent: u64,
    /// Stream frames sent.
    pub frames_sent: u64,
    /// Bytes of stream frames sent.
    pub frame_bytes_sent: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Stream frames received.
    pub frames_received: u64,
    /// Bytes received (datagrams and frames).
    pub bytes_received: u64,
    /// Packets dropped because the wire layer rejected them (foreign key,
    /// replay, garbage…).
    pub rejected: u64,
    /// The last reason for a rejection.
    pub last_rejection: Option<WireError>,
    /// Messages that decoded but made no sense (bad address, empty name,
    /// no body).
    pub malformed: u64,
    /// Pings addressed to another member name.
    pub misdirected: u64,
    /// Alive messages for a known name, same epoch, other address.
    pub name_conflicts: u64,
    /// Times the local member refuted a suspicion.
    pub refutations: u64,
    /// Packets that could not be sealed (nonce counter exhausted).
    pub seal_errors: u64,
    /// New members ignored because the table held `max_members`.
    pub table_full: u64,
    /// Event messages received (subscribed or not, duplicates included).
    pub events_received: u64,
    /// Payload bytes of the event messages received.
    pub event_payload_bytes_received: u64,
    /// Events handed to the local application.
    pub events_delivered: u64,
    /// Event messages received again after delivery (acknowledged, not delivered).
    pub events_duplicate: u64,
    /// Event messages refused because the de-duplication window was full
    /// (neither delivered nor acknowledged: the publisher resends them).
    pub events_refused: u64,
    /// Event copies sent down the relay tree (first sends).
    pub events_relayed: u64,
    /// Relay copies sent again for want of a relay acknowledgement.
    pub event_hop_resends: u64,
    /// Spans taken back from a receiver that never acknowledged.
    pub event_hop_takeovers: u64,
    /// Packets refused at the header because they were sealed for the
    /// traffic between racks and this member is not its rack's active
    /// gateway (also counted in `rejected`).
    pub foreign_rack: u64,
    /// Packets between racks refused because their sender's term is below
    /// the highest this member has heard for its rack: a deposed gateway's.
    pub stale_term: u64,
    /// Raft messages refused: from a member that is not a voter, of another
    /// group, or forged.
    pub raft_refused: u64,
    /// Datagrams and stream frames sent to other racks' gateways.
    pub cross_packets_sent: u64,
    /// Bytes of those.
    pub cross_bytes_sent: u64,
}

/// A source of timeouts, as [`Overlay::handle_timeout`] runs them.
///
/// [`Timer::ALL`] is the one list both [`Overlay::poll_timeout`] (the
/// earliest entry) and [`Overlay::handle_timeout`] (every due entry, in
/// this order) walk. The order is part of determinism: it fixes the order
/// of the random draws within one call. A new timer is one variant and one
/// place in the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Membership(membership::Timer),
    /// Resends of events and of relay copies.
    Events,
    /// Rumor rounds, anti-entropy exchanges and garbage collection.
    Replication,
    /// Raft ticks, gateway reports and the pool of gateways ([`crate::racks`]).
    Racks,
}

impl Timer {
    const ALL: [Timer; 12] = [
        Timer::Membership(membership::Timer::ProbeDeadline),
        Timer::Membership(membership::Timer::IndirectProbes),
        Timer::Membership(membership::Timer::Reconnects),
        Timer::Membership(membership::Timer::Suspicions),
        Timer::Membership(membership::Timer::Probe),
        Timer::Membership(membership::Timer::PushPull),
        Timer::Membership(membership::Timer::Reconnect),
        Timer::Membership(membership::Timer::Reap),
        Timer::Events,
        Timer::Replication,
        Timer::Racks,
        // Last: it also runs while leaving, and its round carries the
        // changes the entries above just made.
        Timer::Membership(membership::Timer::Gossip),
    ];
}

/// When a timer is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    /// Whether the overlay must wake up for it. An idle timer keeps its
    /// phase: it runs when due if something else woke the overlay, but is
    /// no reason to wake.
    pub(crate) wakes: bool,
}

impl Deadline {
    pub(crate) fn wake(at: Instant) -> Deadline {
        Deadline { at, wakes: true }
    }
}

/// The overlay's end of the wire: the codec that opens and seals packets,
/// the sealed transmits waiting for the driver, and the counters of what
/// went through. The sub-machines send through it and count in it.
pub(crate) struct Wire {
    codec: Codec,
    mtu: usize,
    transmits: VecDeque<Transmit>,
    pub(crate) stats: Stats,
    /// In a rack: the scope of the traffic between racks, whether this
    /// member accepts it or not (see [`Wire::send`]).
    cross_scope: Option<u32>,
    /// While this member is its rack's active gateway: how it crosses.
    crossing: Option<Crossing>,
}

/// How an active gateway's packets cross to other racks: the fence every
/// one of them carries, and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Crossing {
    pub(crate) rack: Arc<str>,
    pub(crate) term: u64,
    /// The other racks' gateways and the addresses being contacted.
    pub(crate) peers: std::collections::BTreeSet<SocketAddr>,
}

impl Crossing {
    /// Bytes the `Crossing` wrapper adds to a packet's envelopes, at most:
    /// the rack name, the term, and three tags with lengths.
    fn overhead(&self) -> usize {
        self.rack.len() + 2 + 11 + 3 * 4
    }

    fn wrap(&self, envelopes: Vec<Envelope>) -> Envelope {
        Envelope {
            body: Some(Body::Crossing(rumormill_wire::proto::Crossing {
                rack: self.rack.to_string(),
                term: self.term,
                envelopes,
            })),
        }
    }
}

impl Wire {
    /// The cross scope, when this member is in a rack.
    pub(crate) fn cross_scope(&self) -> Option<u32> {
        self.cross_scope
    }

    /// Starts (or, with `None`, stops) sealing and opening the traffic
    /// between racks.
    pub(crate) fn set_crossing(&mut self, crossing: Option<Crossing>) {
        let Some(scope) = self.cross_scope else { return };
        match &crossing {
            Some(_) => self.codec.accept_scope(scope),
            None => self.codec.refuse_scope(scope),
        }
        self.crossing = crossing;
    }

    /// The crossing, if `to` is another rack's gateway: the one rule by
    /// which scope and wrapping are chosen.
    fn crossing_to(&self, to: SocketAddr) -> Option<&Crossing> {
        self.crossing.as_ref().filter(|c| c.peers.contains(&to))
    }

    /// Room for messages in one datagram.
    pub(crate) fn datagram_budget(&self) -> usize {
        self.mtu.saturating_sub(self.codec.overhead())
    }

    /// Sends messages in one datagram, filling the rest with piggybacked
    /// membership changes, each of which goes out at most `limit` times.
    ///
    /// Scope and wrapping follow the destination: to another rack's gateway
    /// (only while this member is its rack's active gateway) the packet is
    /// sealed in the cross scope and its messages wrapped in one `Crossing`
    /// with this rack's name and term; to anyone else, in the home scope
    /// (the rack's, or the overlay's without racks). Piggybacked changes go
    /// only to their own pool: a rack's to the rack, the gateways' pool's
    /// between racks.
    pub(crate) fn send(&mut self, to: SocketAddr, msgs: Vec<Envelope>, piggyback: &mut Piggyback, limit: u32) {
        let crossing = self.crossing_to(to).cloned();
        let overhead = crossing.as_ref().map_or(0, Crossing::overhead);
        let mut packet = PacketBuilder::new(self.datagram_budget().saturating_sub(overhead));
        for m in msgs {
            if let Err(m) = packet.push(m) {
                // Too big for one datagram: it goes over a stream instead.
                self.send_stream(to, m);
            }
        }
        if piggyback.is_crossing() == crossing.is_some() {
            piggyback.fill(&mut packet, limit);
        }
        if packet.is_empty() {
            return;
        }
        match crossing {
            Some(c) => {
                let body = rumormill_wire::proto::Packet {
                    envelopes: vec![c.wrap(packet.into_envelopes())],
                };
                self.seal(to, FrameKind::Datagram, &prost::Message::encode_to_vec(&body), true);
            }
            None => self.seal(to, FrameKind::Datagram, &packet.finish(), false),
        }
    }

    pub(crate) fn send_stream(&mut self, to: SocketAddr, msg: Envelope) {
        match self.crossing_to(to) {
            Some(c) => {
                let body = rumormill_wire::encode_envelope(&c.wrap(vec![msg]));
                self.seal(to, FrameKind::Stream, &body, true);
            }
            None => self.seal(to, FrameKind::Stream, &rumormill_wire::encode_envelope(&msg), false),
        }
    }

    fn seal(&mut self, to: SocketAddr, kind: FrameKind, body: &[u8], crossing: bool) {
        let sealed = match (crossing, self.cross_scope) {
            (true, Some(scope)) => self.codec.seal_in(scope, kind, body),
            _ => self.codec.seal(kind, body),
        };
        match sealed {
            Ok(payload) => {
                match kind {
                    FrameKind::Datagram => {
                        self.stats.datagrams_sent += 1;
                        self.stats.datagram_bytes_sent += payload.len() as u64;
                    }
                    FrameKind::Stream => {
                        self.stats.frames_sent += 1;
                        self.stats.frame_bytes_sent += payload.len() as u64;
                    }
                }
                if crossing {
                    self.stats.cross_packets_sent += 1;
                    self.stats.cross_bytes_sent += payload.len() as u64;
                }
                self.transmits.push_back(Transmit { to, kind, payload });
            }
            Err(_) => self.stats.seal_errors += 1,
        }
    }

    /// The keyring, or `None` on a plain-text overlay.
    pub(crate) fn keyring(&self) -> Option<&Keyring> {
        self.codec.keyring()
    }

    /// Changes the keyring (see [`Codec::with_keyring`]).
    pub(crate) fn with_keyring<T>(
        &mut self,
        f: impl FnOnce(&mut Keyring) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        self.codec.with_keyring(f)
    }

    fn reject(&mut self, e: WireError) {
        if let WireError::WrongOverlay { got, .. } = e
            && Some(got) == self.cross_scope
        {
            self.stats.foreign_rack += 1;
        }
        self.stats.rejected += 1;
        self.stats.last_rejection = Some(e);
    }
}

/// A sender lent out by membership (to events, and for replication's
/// messages): its datagrams carry membership's piggybacked changes like
/// membership's own.
pub(crate) struct Sender<'a> {
    wire: &'a mut Wire,
    piggyback: &'a mut Piggyback,
    limit: u32,
}

impl<'a> Sender<'a> {
    pub(crate) fn new(wire: &'a mut Wire, piggyback: &'a mut Piggyback, limit: u32) -> Sender<'a> {
        Sender { wire, piggyback, limit }
    }

    /// Sends messages in one datagram (see [`Wire::send`]).
    pub(crate) fn send(&mut self, to: SocketAddr, msgs: Vec<Envelope>) {
        self.wire.send(to, msgs, self.piggyback, self.limit);
    }

    pub(crate) fn send_stream(&mut self, to: SocketAddr, msg: Envelope) {
        self.wire.send_stream(to, msg);
    }

    /// Room for messages in one datagram.
    pub(crate) fn datagram_budget(&self) -> usize {
        self.wire.datagram_budget()
    }

    /// The overlay's counters.
    pub(crate) fn stats(&mut self) -> &mut Stats {
        &mut self.wire.stats
    }
}

/// Sends what replication queued, through `out`.
fn forward(replication: &mut Replication, out: &mut Sender<'_>) {
    while let Some(o) = replication.poll_message() {
        if o.stream {
            out.send_stream(o.to, o.envelope);
        } else {
            out.send(o.to, vec![o.envelope]);
        }
    }
}

/// One member's participation in one overlay: the sans-IO state machine.
///
/// Inputs are [`Overlay::handle_datagram`], [`Overlay::handle_stream`],
/// [`Overlay::handle_timeout`] and the API calls; after each, a driver
/// drains [`Overlay::poll_transmit`] and [`Overlay::poll_notification`], then
/// sleeps until [`Overlay::poll_timeout`]. See the [crate
/// documentation](crate) for an example.
///
/// Inside, the overlay is a router: it opens and decodes packets, hands
/// each message to the sub-machine whose protocol it belongs to —
/// membership (SWIM, state sync), [`Replication`] (the replicated store)
/// or events on topics — seals what they send, and runs their timers from
/// one table. Each sub-machine gets only narrow views of the others for the
/// call: membership the configuration, the RNG, the wire and a way to sync
/// the store after a join; replication a sampler of alive members; events
/// the member table and the store (read-only), the RNG and a sender that
/// piggybacks membership changes; key rotation ([`crate::keys`]) the
/// wire's keyring, the store (read-only) and the live members' names, and
/// it hands back the store writes for the overlay to make.
pub struct Overlay {
    config: Config,
    rng: ChaCha8Rng,
    wire: Wire,
    membership: Membership,
    replication: Replication,
    events: Events,
    /// Cluster-wide key rotation ([`crate::keys`]).
    rotation: Rotation,
    /// What the sub-machines told, in the order they told it.
    output: VecDeque<Notification>,
    /// The departure has been gossiped: nothing more is sent or received.
    closed: bool,
    /// The latest wall-clock reading given with a write.
    wall: WallClock,
    /// After a join, the store's exchanges completed before it: the next
    /// one is reported as [`Notification::StoreSynced`].
    first_sync: Option<u64>,
    /// The member's rack, its election and crossings; `None` without racks.
    racks: Option<Racks>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("me", self.membership.name())
            .field("members", &self.membership.table().len())
            .field("codec", &self.wire.codec)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// The local member `identity` in a new overlay: `security` decides
    /// whether packets are sealed, `seed` seeds the RNG, `now` starts the
    /// clock. When packets are sealed, `seed` must be fresh randomness at
    /// every start (e.g. `rand::random()`): it also draws this life's salt,
    /// which keeps nonces unique even if the epoch repeats. Packets carry overlay id 0; use [`Overlay::with_overlay_id`]
    /// to tell overlays apart on the wire.
    pub fn new(config: Config, identity: Identity, security: Security, seed: u64, now: Instant) -> Overlay {
        Overlay::with_overlay_id(config, identity, security, seed, now, 0)
    }

    /// Like [`Overlay::new`], tagging every packet with `overlay_id` (see
    /// [`rumormill_wire::overlay_id`]) and rejecting packets of others.
    pub fn with_overlay_id(
        config: Config,
        identity: Identity,
        security: Security,
        seed: u64,
        now: Instant,
        overlay_id: u32,
    ) -> Overlay {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let membership = Membership::new(&config, &identity, now, &mut rng);
        // In a rack, the rack's scope is home; the cross scope is known
        // (to count what is refused) and accepted only while active.
        let (home, cross_scope) = match &identity.rack {
            Some(r) => (
                rumormill_wire::scope_id(overlay_id, &format!("rack/{}", r.name)),
                Some(rumormill_wire::scope_id(overlay_id, "cross")),
            ),
            None => (overlay_id, None),
        };
        let racks = identity
            .rack
            .clone()
            .map(|spec| Racks::new(&config, &identity, spec, seed, now));
        let codec = Codec::new(home, identity.sender_id(), identity.epoch, life_salt(seed), security);
        let budget = config.mtu.saturating_sub(codec.overhead());
        let mut rconfig = config.replication.clone();
        rconfig.limits.luggage_value = config.max_luggage_value as u64;
        rconfig.limits.luggage_total = config.max_luggage_total as u64;
        let replication = Replication::new(
            rconfig,
            &identity.name,
            identity.epoch,
            identity.addr,
            budget,
            seed ^ 0xd155_e111,
            now,
        );
        Overlay {
            replication,
            events: Events::new(&identity, &config),
            membership,
            wire: Wire {
                codec,
                mtu: config.mtu,
                transmits: VecDeque::new(),
                stats: Stats::default(),
                cross_scope,
                crossing: None,
            },
            config,
            rng,
            rotation: Rotation::default(),
            output: VecDeque::new(),
            closed: false,
            wall: WallClock::default(),
            first_sync: None,
            racks,
        }
    }

    /// Membership, with what it borrows of the overlay for one call.
    fn membership(&mut self) -> (&mut Membership, membership::Env<'_>) {
        let env = membership::Env {
            config: &self.config,
            rng: &mut self.rng,
            wire: &mut self.wire,
        };
        (&mut self.membership, env)
    }

    /// Events, with their views of the others for one call.
    fn events(&mut self) -> (&mut Events, events::Env<'_>) {
        let (members, out) = self.membership.lend(&mut self.wire, &self.config);
        let env = events::Env {
            members,
            store: self.replication.store(),
            rng: &mut self.rng,
            out,
        };
        (&mut self.events, env)
    }

    /// Moves what membership and events have to tell into the output. Each
    /// input reaches one of them at a time, so the order is kept.
    fn collect(&mut self) {
        while let Some(e) = self.membership.poll_notification() {
            if let Some(r) = self.racks.as_mut() {
                r.rack_changed();
            }
            self.output.push_back(e);
        }
        while let Some(e) = self.events.poll_notification() {
            self.output.push_back(e);
        }
        if let Some(r) = self.racks.as_mut() {
            while let Some(e) = r.poll_notification() {
                self.output.push_back(e);
            }
        }
    }

    /// Sends the Raft messages the election queued, in the rack's scope.
    fn drain_racks(&mut self) {
        let Some(racks) = self.racks.as_mut() else { return };
        let mut out = self.membership.sender(&mut self.wire, &self.config);
        while let Some((to, msg)) = racks.poll_raft() {
            out.send(
                to,
                vec![Envelope {
                    body: Some(Body::Raft(Box::new(msg))),
                }],
            );
        }
    }

    /// What an accepted update means to racks: a gateway report moves
    /// terms and gateways; a stale copy of this member's `Rack` value is
    /// written again.
    fn follow_update(&mut self, now: Instant, u: &Update) {
        let Some(racks) = self.racks.as_mut() else { return };
        if let Some(writer) = racks::is_report(&u.key) {
            racks.on_report(now, writer, self.replication.store(), &mut self.wire);
        } else if racks.is_own_rack_key(&u.key) {
            racks.check_rack_value(u.value.as_deref());
        }
    }

    /// A non-gateway member's own write goes to its rack's gateway at once
    /// as well, so it crosses without waiting for the rack's epidemic.
    fn push_to_gateway(&mut self, u: &Update) {
        let Some(racks) = self.racks.as_ref() else { return };
        if racks.is_active() {
            return;
        }
        if let Some(g) = racks.gateway(self.membership.table(), self.replication.store())
            && g != self.membership.addr()
        {
            self.replication.push(g, u);
            self.drain_replication_sends();
        }
    }

    /// Sends what replication queued (without its notifications).
    fn drain_replication_sends(&mut self) {
        forward(
            &mut self.replication,
            &mut self.membership.sender(&mut self.wire, &self.config),
        );
    }

    /// Sends what replication queued and forwards its events.
    fn drain_replication(&mut self, now: Instant) {
        forward(
            &mut self.replication,
            &mut self.membership.sender(&mut self.wire, &self.config),
        );
        while let Some(e) = self.replication.poll_notification() {
            self.rotation.on_update(&e.update);
            self.follow_update(now, &e.update);
            self.output.push_back(Notification::Update(e));
        }
        if let Some(before) = self.first_sync
            && self.replication.stats().syncs > before
        {
            self.first_sync = None;
            self.output.push_back(Notification::StoreSynced);
        }
    }

    /// Moves what the rotation has to tell into the output.
    fn drain_keys(&mut self) {
        while let Some(e) = self.rotation.poll_notification() {
            self.output.push_back(Notification::Keys(e));
        }
    }

    // ----- inputs -------------------------------------------------------

    /// Handles a datagram or a stream frame.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, bytes: &[u8]) {
        match kind {
            FrameKind::Datagram => self.handle_datagram(now, from, bytes),
            FrameKind::Stream => self.handle_stream(now, from, bytes),
        }
    }

    /// Handles a received datagram. Anything that does not open and decode
    /// is counted in [`Stats::rejected`] and dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.wire.stats.datagrams_received += 1;
        self.wire.stats.bytes_received += bytes.len() as u64;
        if self.closed {
            return;
        }
        let packet = self
            .wire
            .codec
            .open(FrameKind::Datagram, bytes)
            .and_then(|o| Ok((o.scope(), rumormill_wire::decode_packet(&o.body)?)));
        match packet {
            Ok((scope, p)) if Some(scope) == self.wire.cross_scope() => {
                self.handle_crossing(now, from, FrameKind::Datagram, p.envelopes);
            }
            Ok((_, p)) => {
                for e in p.envelopes {
                    self.handle_envelope(now, from, e, false);
                }
            }
            Err(e) => self.wire.reject(e),
        }
    }

    /// Handles one frame received on a stream (without its length prefix).
    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, frame: &[u8]) {
        self.wire.stats.frames_received += 1;
        self.wire.stats.bytes_received += frame.len() as u64;
        if self.closed {
            return;
        }
        if frame.len() > self.config.max_stream_frame {
            self.wire.reject(WireError::FrameTooLarge {
                len: frame.len(),
                max: self.config.max_stream_frame,
            });
            return;
        }
        match self
            .wire
            .codec
            .open(FrameKind::Stream, frame)
            .and_then(|o| Ok((o.scope(), rumormill_wire::decode_envelope(&o.body)?)))
        {
            Ok((scope, e)) if Some(scope) == self.wire.cross_scope() => {
                self.handle_crossing(now, from, FrameKind::Stream, vec![e]);
            }
            Ok((_, e)) => self.handle_envelope(now, from, e, false),
            Err(e) => self.wire.reject(e),
        }
    }

    /// A packet between racks (this member is its rack's active gateway,
    /// or the codec would have refused it): one `Crossing`, whose fence is
    /// checked before its messages are handled as traffic between racks.
    fn handle_crossing(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, mut envelopes: Vec<Envelope>) {
        let crossing = match (envelopes.pop(), envelopes.is_empty()) {
            (
                Some(Envelope {
                    body: Some(Body::Crossing(c)),
                }),
                true,
            ) => c,
            _ => {
                self.wire.stats.malformed += 1;
                return;
            }
        };
        let Some(racks) = self.racks.as_mut() else {
            self.wire.stats.malformed += 1;
            return;
        };
        let datagram = kind == FrameKind::Datagram;
        match racks.admit(now, from, datagram, &crossing.rack, crossing.term, &mut self.wire) {
            Fence::Pass => {
                for e in crossing.envelopes {
                    self.handle_envelope(now, from, e, true);
                }
                if let Some(racks) = self.racks.as_mut() {
                    racks.follow_pool(&mut self.wire);
                    racks.update_route(&mut self.wire);
                }
                self.collect();
            }
            Fence::Stale => self.wire.stats.stale_term += 1,
            Fence::Malformed => self.wire.stats.malformed += 1,
        }
    }

    /// A membership message between racks, for the pool of gateways.
    fn handle_pool(&mut self, now: Instant, from: SocketAddr, body: Body) {
        let Some(racks) = self.racks.as_mut() else { return };
        let store = &mut self.replication;
        let Some((pool, mut env)) = racks.pool(&mut self.wire) else {
            return;
        };
        match body {
            Body::Ping(p) => pool.on_ping(from, p, &mut env),
            Body::Ack(a) => pool.on_ack(a, &mut env),
            Body::PingReq(r) => pool.on_ping_req(now, from, r, &mut env),
            Body::Nack(n) => pool.on_nack(n),
            Body::Alive(a) => pool.on_alive(now, a, &mut env),
            Body::Suspect(s) => pool.on_suspect(now, s, &mut env),
            Body::Dead(d) => pool.on_dead(now, d, &mut env),
            Body::PushPull(pp) => {
                // Gateways that meet sync the store at once, across.
                let mut sync = |peer: SocketAddr, out: &mut Sender<'_>| {
                    store.exchange_now(peer);
                    forward(store, out);
                };
                pool.on_push_pull(now, from, pp, &mut env, &mut sync);
                // Its exchange is on its way; nothing else to drain.
            }
            _ => env.wire.stats.malformed += 1,
        }
        racks.update_route(&mut self.wire);
    }

    /// Counts a stream frame the driver refused on its header, before
    /// reading its body (see [`Overlay::header_filter`]), as rejected.
    pub fn count_refused_frame(&mut self, e: WireError) {
        self.wire.reject(e);
    }

    /// What the overlay's codec accepts in a header, for the tasks that read
    /// stream connections; it changes with the keyring.
    pub fn header_filter(&self) -> HeaderFilter {
        self.wire.codec.header_filter()
    }

    /// Hands one message to the sub-machine whose protocol it belongs to.
    /// Every message type is named: one that nothing handled would be
    /// counted as malformed, never dropped unseen.
    ///
    /// `crossed`: the message came from another rack's gateway. Its
    /// membership messages are the pool of gateways'; a Raft message or a
    /// crossing inside a crossing is malformed.
    fn handle_envelope(&mut self, now: Instant, from: SocketAddr, e: Envelope, crossed: bool) {
        let Some(body) = e.body else {
            self.wire.stats.malformed += 1;
            return;
        };
        match body {
            Body::Raft(_) | Body::Crossing(_) if crossed => self.wire.stats.malformed += 1,
            body @ (Body::Ping(_)
            | Body::Ack(_)
            | Body::PingReq(_)
            | Body::Nack(_)
            | Body::Alive(_)
            | Body::Suspect(_)
            | Body::Dead(_)
            | Body::PushPull(_))
                if crossed =>
            {
                self.handle_pool(now, from, body);
            }
            Body::Raft(msg) => {
                let Some(racks) = self.racks.as_mut() else {
                    self.wire.stats.malformed += 1;
                    return;
                };
                // Only a member of this rack can have sealed it; which one
                // its address says.
                let members = self.membership.table();
                let sender = members.iter().find(|m| m.addr() == from).map(|m| m.name.clone());
                racks.on_raft(sender.as_deref(), *msg, &mut self.wire.stats);
                self.settle_racks(now, None);
            }
            // A crossing is only ever a cross-scope packet's one message.
            Body::Crossing(_) => self.wire.stats.malformed += 1,
            Body::Ping(p) => {
                let (m, mut env) = self.membership();
                m.on_ping(from, p, &mut env);
            }
            Body::Ack(a) => {
                let (m, mut env) = self.membership();
                m.on_ack(a, &mut env);
            }
            Body::PingReq(r) => {
                let (m, mut env) = self.membership();
                m.on_ping_req(now, from, r, &mut env);
            }
            Body::Nack(n) => self.membership.on_nack(n),
            Body::Alive(a) => {
                let (m, mut env) = self.membership();
                m.on_alive(now, a, &mut env);
            }
            Body::Suspect(s) => {
                let (m, mut env) = self.membership();
                m.on_suspect(now, s, &mut env);
            }
            Body::Dead(d) => {
                let (m, mut env) = self.membership();
                m.on_dead(now, d, &mut env);
            }
            Body::PushPull(pp) => {
                let store = &mut self.replication;
                let mut env = membership::Env {
                    config: &self.config,
                    rng: &mut self.rng,
                    wire: &mut self.wire,
                };
                // A join answered: the store is synced at once, through the
                // same sender, before the rest of the reply is handled.
                let mut sync = |peer: SocketAddr, out: &mut Sender<'_>| {
                    store.exchange_now(peer);
                    forward(store, out);
                };
                self.membership.on_push_pull(now, from, pp, &mut env, &mut sync);
                // Membership's changes came first, then the store's.
                self.collect();
                self.drain_replication(now);
            }
            Body::Event(ev) => {
                let (events, mut env) = self.events();
                events.on_event(now, from, *ev, &mut env);
            }
            Body::EventAck(a) => {
                let (events, mut env) = self.events();
                events.on_event_ack(from, a, &mut env);
            }
            body @ (Body::Rumor(_) | Body::RumorFeedback(_) | Body::Digest(_) | Body::Delta(_)) => {
                let handled = self.replication.handle(now, from, body);
                debug_assert!(handled, "only replication's messages are handed to it");
                self.drain_replication(now);
                // The store may hold a newer desired keyring now.
                self.follow_keyring(now);
            }
        }
        self.collect();
    }

    /// When `timer` is due, or `None` when nothing waits on it (and for
    /// every timer once closed). A departing member only gossips.
    fn deadline(&self, timer: Timer) -> Option<Deadline> {
        if self.closed {
            return None;
        }
        let active = !self.membership.is_leaving();
        match timer {
            Timer::Membership(t) => self.membership.deadline(t),
            Timer::Events if active => self.events.poll_timeout().map(Deadline::wake),
            Timer::Replication if active => Some(Deadline::wake(self.replication.poll_timeout())),
            Timer::Racks if active => self.racks.as_ref().and_then(Racks::poll_timeout).map(Deadline::wake),
            Timer::Events | Timer::Replication | Timer::Racks => None,
        }
    }

    /// Runs racks' timer (`Some(now)`) or follows what an input changed
    /// (`None`): sends the Raft messages, makes the store writes.
    fn settle_racks(&mut self, now: Instant, timer: Option<Instant>) {
        let wall_ms = self.wall.read(now).map_or(0, |w| w.as_unix_ms());
        let Some(racks) = self.racks.as_mut() else { return };
        let mut view = racks::View {
            members: self.membership.table(),
            store: self.replication.store(),
            wire: &mut self.wire,
        };
        let writes = match timer {
            Some(now) => racks.handle_timeout(now, wall_ms, &mut view),
            None => racks.settle(now, wall_ms, &mut view),
        };
        self.drain_racks();
        for (key, value) in writes {
            if let Ok(u) = self.replication.try_put(now, &key, value) {
                self.push_to_gateway(&u);
            }
        }
        self.drain_replication(now);
        self.collect();
    }

    /// Runs `timer`, due at `now`.
    fn run_timer(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Membership(t) => {
                let (m, mut env) = self.membership();
                m.handle_timeout(now, t, &mut env);
            }
            Timer::Events => {
                let (events, mut env) = self.events();
                events.handle_timeout(now, &mut env);
            }
            Timer::Replication => {
                // The sampler of alive members replication is lent.
                let (members, rng) = (self.membership.table(), &mut self.rng);
                let mut peers = |k: usize| {
                    let k = if k == 0 { members.len() } else { k };
                    let picked = members.random(k, rng, |m| m.state == MemberState::Alive);
                    picked.into_iter().map(|i| members.at(i).addr()).collect()
                };
                // An active gateway also spreads to every reachable
                // gateway of the other racks.
                let remote: Vec<SocketAddr> = self
                    .racks
                    .as_ref()
                    .map(|r| r.remote_gateways().values().copied().collect())
                    .unwrap_or_default();
                let mut peers = |k: usize| {
                    let mut v: Vec<SocketAddr> = peers(k);
                    v.extend(remote.iter().copied());
                    v
                };
                self.replication.handle_timeout(now, &mut peers);
                self.drain_replication(now);
            }
            Timer::Racks => self.settle_racks(now, Some(now)),
        }
        self.collect();
    }

    /// Runs every due timer: probes, gossip, push-pull, reconnection,
    /// suspicion timeouts, event resends, replication rounds. Call it at
    /// (or after) [`Overlay::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.membership.is_leaving() && self.membership.nothing_to_tell() {
            self.closed = true;
            return;
        }
        for timer in Timer::ALL {
            // Read afresh: an earlier entry may have moved this one.
            if self.deadline(timer).is_some_and(|d| d.at <= now) {
                self.run_timer(now, timer);
            }
        }
    }

    /// Contacts the given addresses (seeds) with a full-state exchange. They
    /// are also remembered as seeds to re-contact whenever none of them is
    /// seen alive.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), CoreError> {
        self.check_active()?;
        let syncs = self.replication.stats().syncs;
        self.first_sync.get_or_insert(syncs);
        let (m, mut env) = self.membership();
        m.join_via(now, seeds, &mut env);
        Ok(())
    }

    /// Whether a [`Overlay::join`] still waits for the store's first
    /// exchange ([`Notification::StoreSynced`] not reported yet).
    pub fn awaits_first_sync(&self) -> bool {
        self.first_sync.is_some()
    }

    /// Contacts `addr` with a full-state exchange, like [`Overlay::join`],
    /// without remembering it as a seed: for addresses heard of from
    /// unauthenticated sources (multicast announcements), which must not
    /// pile up in the seed list.
    pub fn contact(&mut self, addr: SocketAddr) -> Result<(), CoreError> {
        self.check_active()?;
        let (m, mut env) = self.membership();
        m.contact(addr, &mut env);
        Ok(())
    }

    /// Writes a value under `key`; it spreads to every member (see
    /// [`crate::replication`]). `wall` is the caller's wall clock: the write
    /// clock is at least that (see [`crate::WallTime`]). Refused with
    /// [`CoreError::Quota`] if it would take this member beyond its quota
    /// ([`crate::replication::Limits`]).
    pub fn put(&mut self, now: Instant, wall: WallTime, key: &str, value: Vec<u8>) -> Result<Update, CoreError> {
        self.check_active()?;
        self.floor_write_clock(now, wall);
        let u = self.replication.try_put(now, key, value)?;
        self.push_to_gateway(&u);
        Ok(u)
    }

    /// Deletes `key` everywhere.
    pub fn delete(&mut self, now: Instant, wall: WallTime, key: &str) -> Result<Update, CoreError> {
        self.check_active()?;
        self.floor_write_clock(now, wall);
        let u = self.replication.try_delete(now, key)?;
        self.push_to_gateway(&u);
        Ok(u)
    }

    /// Raises the write clock to the wall clock in milliseconds (a hybrid
    /// logical clock), so that a restarted member's writes order after
    /// those of its previous life, and remembers the reading.
    fn floor_write_clock(&mut self, now: Instant, wall: WallTime) {
        self.wall.observe(now, wall);
        self.replication.advance_clock(wall.as_unix_ms());
    }

    /// The replicated updates.
    pub fn store(&self) -> &Store {
        self.replication.store()
    }

    /// Replaces the handler that decides which incoming updates to keep.
    pub fn set_update_handler(&mut self, handler: impl UpdateHandler + 'static) {
        self.replication.set_handler(handler);
    }

    /// The replication state machine (rumor states, counters).
    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// Replication itself, for tests that write past the API's checks.
    #[cfg(test)]
    pub(crate) fn replication_mut(&mut self) -> &mut Replication {
        &mut self.replication
    }

    /// Counters of the replication protocols.
    pub fn replication_stats(&self) -> ReplicationStats {
        self.replication.stats()
    }

    /// Replaces the seed addresses re-contacted when not seen alive.
    pub fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        self.membership.set_seeds(seeds);
    }

    #[cfg(test)]
    pub(crate) fn seeds(&self) -> &[SocketAddr] {
        self.membership.seeds()
    }

    /// Adds members known from elsewhere (a snapshot taken before a
    /// restart, or a bootstrap list) without events. Entries about the local
    /// member, or already known, are ignored; suspects are restored as alive
    /// (the failure detector will judge them afresh).
    pub fn restore(&mut self, now: Instant, members: impl IntoIterator<Item = MemberInfo>) {
        let (m, mut env) = self.membership();
        m.restore(now, members, &mut env);
    }

    /// Leaves gracefully: tells the overlay, keeps gossiping until the news
    /// has been retransmitted enough, then goes quiet ([`Overlay::is_closed`]).
    pub fn leave(&mut self, now: Instant) {
        if self.check_active().is_ok() {
            self.membership.leave(now);
        }
    }

    /// Whether a [`Overlay::leave`] has completed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Refuses writes and joins once the local member is leaving or gone.
    fn check_active(&self) -> Result<(), CoreError> {
        if self.membership.is_leaving() || self.closed {
            return Err(CoreError::Left);
        }
        Ok(())
    }

    /// Installs a key on this member alone, bypassing key rotation (no
    /// report, no notification): for the core's tests of the wire. Drivers
    /// use the key operations below.
    #[cfg(test)]
    pub(crate) fn install_key(&mut self, key: &[u8]) -> Result<KeyId, CoreError> {
        Ok(self.wire.codec.with_keyring(|r| r.install(key))?)
    }

    /// Seals with an installed key, bypassing key rotation (tests).
    #[cfg(test)]
    pub(crate) fn use_key(&mut self, id: KeyId) -> Result<(), CoreError> {
        Ok(self.wire.codec.with_keyring(|r| r.use_key(id))?)
    }

    /// Removes a key, bypassing key rotation (tests).
    #[cfg(test)]
    pub(crate) fn remove_key(&mut self, id: KeyId) -> Result<(), CoreError> {
        Ok(self.wire.codec.with_keyring(|r| r.remove(id))?)
    }

    /// The installed keys, or `None` on a plain-text overlay.
    pub fn keys(&self) -> Option<Vec<KeyInfo>> {
        self.wire.codec.keys()
    }

    // ----- cluster-wide key rotation (see crate::keys) ------------------

    /// Takes back what [`Overlay::keyring_record`] gave in an earlier life
    /// (the keys are installed, the first made primary) and publishes this
    /// member's key report. A driver calls it once after [`Overlay::new`],
    /// before joining, with a default record on a first start (the keys
    /// given to `new` stay); until then desired keyrings are not followed.
    pub fn restore_keyring(&mut self, now: Instant, wall: WallTime, record: &KeyringRecord) -> Result<(), KeyError> {
        let (rotation, view) = self.rotation();
        let report = keys::restore(rotation, view, record)?;
        self.wall.observe(now, wall);
        self.publish_key_report(now, wall, report);
        // A desired keyring that arrived before is followed now.
        self.follow_keyring(now);
        self.drain_keys();
        Ok(())
    }

    /// What to save of the keyring, or `None` on a plain-text overlay.
    pub fn keyring_record(&self) -> Option<KeyringRecord> {
        Some(self.rotation.record(self.wire.keyring()?))
    }

    /// Ids of the keys installed on this member alone.
    pub fn local_keys(&self) -> Vec<KeyId> {
        self.rotation.local().to_vec()
    }

    /// Installs a key on every member: the secret travels in the overlay's
    /// store, sealed under the current keys, so every current holder
    /// learns it.
    pub fn install_key_everywhere(&mut self, now: Instant, wall: WallTime, secret: &[u8]) -> Result<KeyId, KeyError> {
        let (rotation, view) = self.rotation();
        let result = keys::install_everywhere(rotation, view, wall, secret)
            .and_then(|(id, writes)| self.make_key_writes(now, wall, writes).map(|()| id));
        self.drain_keys();
        result
    }

    /// Installs a key on this member alone: packets sealed with it are
    /// accepted here from now on. The secret never enters the store (only
    /// its id, in this member's report), so a member can be rotated out:
    /// install the new key this way on every member to keep, then use it
    /// and remove the old one, excluding the others.
    pub fn install_local_key(&mut self, now: Instant, wall: WallTime, secret: &[u8]) -> Result<KeyId, KeyError> {
        let (rotation, view) = self.rotation();
        let report = keys::install_local(rotation, view, secret)?;
        self.publish_key_report(now, wall, report);
        self.drain_keys();
        Ok(rumormill_wire::key_id(secret))
    }

    /// Takes a key installed with [`Overlay::install_local_key`] that no
    /// rotation has used yet back off this member.
    pub fn remove_local_key(&mut self, now: Instant, wall: WallTime, id: KeyId) -> Result<(), KeyError> {
        let (rotation, view) = self.rotation();
        let report = keys::remove_local(rotation, view, id)?;
        self.publish_key_report(now, wall, report);
        self.drain_keys();
        Ok(())
    }

    /// Makes a key primary on every member. Refused unless every live
    /// member not in `exclude` reports it installed (retry while reports
    /// are on their way); those in `exclude` are not waited for.
    pub fn use_key_everywhere(
        &mut self,
        now: Instant,
        wall: WallTime,
        id: KeyId,
        exclude: &[String],
    ) -> Result<(), KeyError> {
        let live = self.live_names();
        let (rotation, view) = self.rotation();
        let result = keys::use_everywhere(rotation, view, wall, id, &live, exclude)
            .and_then(|writes| self.make_key_writes(now, wall, writes));
        self.drain_keys();
        result
    }

    /// Removes a key from every member. Refused while it is this member's
    /// primary, or while a live member not in `exclude` still seals with it
    /// (retry once it has followed the change of primary).
    pub fn remove_key_everywhere(
        &mut self,
        now: Instant,
        wall: WallTime,
        id: KeyId,
        exclude: &[String],
    ) -> Result<(), KeyError> {
        let live = self.live_names();
        let (rotation, view) = self.rotation();
        let result = keys::remove_everywhere(rotation, view, wall, id, &live, exclude)
            .and_then(|writes| self.make_key_writes(now, wall, writes));
        self.drain_keys();
        result
    }

    /// The live members (this one included), by name, with the key report
    /// each published (`None`: none heard yet).
    pub fn key_reports(&self) -> Vec<(String, Option<KeyReport>)> {
        keys::reports(self.store(), &self.live_names())
    }

    /// Which live members (this one included) have taken `step` — who has
    /// followed a change — leaving those in `exclude` apart.
    pub fn key_progress(&self, step: KeyStep, exclude: &[String]) -> KeyProgress {
        keys::progress(self.store(), &self.live_names(), step, exclude)
    }

    /// The rotation, with what it borrows of the overlay for one call.
    fn rotation(&mut self) -> (&mut Rotation, keys::View<'_>) {
        let view = keys::View {
            wire: &mut self.wire,
            store: self.replication.store(),
            me: self.membership.name(),
        };
        (&mut self.rotation, view)
    }

    /// Gives the overlay a reading of the wall clock without a write. Between
    /// readings the overlay runs the wall clock on with `now`, which misses
    /// a step of the system clock (set right by NTP, a suspended host): a
    /// driver calls this at every wake-up (the agent does, before each
    /// [`Overlay::handle_timeout`]), so that what is judged on receipt —
    /// how far ahead a desired keyring is — is judged against the current
    /// clock. A reading more than a second off the estimate has the desired
    /// keyrings judged again: one refused as too far ahead may be fine now.
    pub fn handle_wall_clock(&mut self, now: Instant, wall: WallTime) {
        let stepped = self
            .wall
            .read(now)
            .is_none_or(|w| w.as_unix_ms().abs_diff(wall.as_unix_ms()) > 1_000);
        self.wall.observe(now, wall);
        if stepped && self.rotation.restored() {
            self.judge_keyrings(now);
        }
    }

    /// Follows the newest desired keyring if one arrived: called after the
    /// store took updates. Before any wall-clock reading nothing is
    /// followed (a version cannot be judged without one).
    fn follow_keyring(&mut self, now: Instant) {
        if !self.rotation.due() {
            return;
        }
        self.judge_keyrings(now);
    }

    /// Follows the newest plausible desired keyring in the store.
    fn judge_keyrings(&mut self, now: Instant) {
        let Some(wall) = self.wall.read(now) else {
            return;
        };
        if self.wire.keyring().is_none() {
            return;
        }
        let (rotation, view) = self.rotation();
        let report = keys::follow(rotation, view, wall);
        self.publish_key_report(now, wall, report);
        self.drain_keys();
    }

    /// Makes the writes of a keyring change: the key report, then the
    /// desired keyring.
    fn make_key_writes(&mut self, now: Instant, wall: WallTime, writes: keys::Writes) -> Result<(), KeyError> {
        self.publish_key_report(now, wall, writes.report);
        if let Some((key, value)) = writes.desired {
            self.put(now, wall, &key, value.to_vec())?;
        }
        if let Some(settled) = writes.settled {
            self.rotation.commit(settled);
        }
        Ok(())
    }

    /// Writes this member's key report, if it changed. A refused write (the
    /// member left, a quota) is made again with the next change.
    fn publish_key_report(&mut self, now: Instant, wall: WallTime, report: Option<keys::Write>) {
        if let Some((key, value)) = report {
            let _ = self.put(now, wall, &key, value.to_vec());
        }
    }

    /// Live members' names, this one included.
    fn live_names(&self) -> Vec<String> {
        let me: &str = self.membership.name();
        std::iter::once(me.to_owned())
            .chain(
                self.members()
                    .filter(|m| m.state.is_live() && &*m.name != me)
                    .map(|m| m.name.to_string()),
            )
            .collect()
    }

    // ----- events on topics ---------------------------------------------

    /// Subscribes the local member to `topic`; every member learns it.
    pub fn subscribe(&mut self, now: Instant, wall: WallTime, topic: &str) -> Result<(), CoreError> {
        match self.events.subscribe(self.replication.store(), topic)? {
            Some((key, value)) => self.put(now, wall, &key, value).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Unsubscribes the local member from `topic`.
    pub fn unsubscribe(&mut self, now: Instant, wall: WallTime, topic: &str) -> Result<(), CoreError> {
        match self.events.unsubscribe(self.replication.store(), topic) {
            Some((key, value)) => self.put(now, wall, &key, value).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The local member's topics.
    pub fn subscriptions(&self) -> Vec<String> {
        self.topics_of(self.membership.name())
    }

    /// A member's topics, as the local member knows them.
    pub fn topics_of(&self, member: &str) -> Vec<String> {
        events::topics_of(self.replication.store(), member)
    }

    /// The live members subscribed to `topic`, the local one included,
    /// with their addresses.
    pub fn subscribers(&self, topic: &str) -> Vec<(Arc<str>, SocketAddr)> {
        self.events
            .subscribers(self.replication.store(), self.membership.table(), topic)
    }

    /// Publishes `payload` on `topic` to its subscribers (see [`crate::events`]).
    pub fn publish(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Vec<u8>,
        delivery: Delivery,
    ) -> Result<EventId, CoreError> {
        if self.membership.is_leaving() {
            return Err(CoreError::Left);
        }
        let (events, mut env) = self.events();
        let id = events.publish(now, topic, payload, delivery, &mut env);
        self.collect();
        id
    }

    /// At-least-once events still awaiting acknowledgements: what a
    /// driver saves to resume them after a restart ([`Overlay::resume`]).
    pub fn pending_events(&self) -> Vec<PendingEvent> {
        self.events.pending_events()
    }

    /// One pending at-least-once event (see [`Overlay::pending_events`]).
    pub fn pending_event(&self, id: &EventId) -> Option<PendingEvent> {
        self.events.pending_event(id)
    }

    /// Takes over an at-least-once event published before a restart: it
    /// keeps its id (so subscribers that have it do not deliver it again)
    /// and is resent to the subscribers still waiting one `retry_every`
    /// later (time to rejoin and sync).
    pub fn resume(&mut self, now: Instant, e: PendingEvent) -> Result<(), CoreError> {
        self.events.resume(now, e)
    }

    /// With manual acknowledgements on, a delivered event is acknowledged
    /// to its publisher only once the application calls
    /// [`Overlay::acknowledge`] — after storing it durably, say — so that a
    /// crash in between makes the publisher resend it instead of losing it.
    pub fn set_manual_acks(&mut self, on: bool) {
        self.events.set_manual_acks(on);
    }

    /// Records that the application has stored these delivered events
    /// (manual mode): they join the window [`Overlay::delivered_window`]
    /// returns. Save that window with them, then [`Overlay::acknowledge`].
    pub fn mark_stored(&mut self, ids: &[EventId]) {
        self.events.mark_stored(ids);
    }

    /// Refuses a delivered at-least-once event the application could not
    /// store (manual mode; a full inbox, say): it is not acknowledged, and
    /// the publisher's next resend delivers it again. Returns `false`, and
    /// refuses nothing, if the event cannot be forgotten — its sequence
    /// number is more than [`dedup::WINDOW`] below what this member has
    /// taken as final from its publisher, so a resend would be taken for a
    /// duplicate: the application must then store it anyway (and
    /// acknowledge it), or it is lost.
    #[must_use = "an event that cannot be refused must be stored, or it is lost"]
    pub fn refuse(&mut self, id: &EventId) -> bool {
        self.events.refuse(id)
    }

    /// Acknowledges a delivered event to its publisher (manual mode).
    pub fn acknowledge(&mut self, id: &EventId) {
        let (events, mut env) = self.events();
        events.acknowledge(id, &mut env.out);
    }

    /// The de-duplication window to save across a restart: with manual
    /// acknowledgements, the events the application has stored (never one
    /// it has not: that one must be delivered again); otherwise every event
    /// delivered.
    pub fn delivered_window(&self) -> Vec<dedup::DedupEntry> {
        self.events.delivered_window()
    }

    /// Restores a saved de-duplication window: those events are not
    /// delivered again.
    pub fn restore_delivered(&mut self, entries: impl IntoIterator<Item = dedup::DedupEntry>) {
        self.events.restore_delivered(entries);
    }

    // ----- luggage ------------------------------------------------------

    /// Sets one of the local member's luggage entries (see [`crate::luggage`]).
    pub fn set_luggage(&mut self, now: Instant, wall: WallTime, key: &str, value: Vec<u8>) -> Result<(), CoreError> {
        let store_key = luggage::check_write(self.store(), &self.config, self.membership.name(), key, &value)?;
        self.put(now, wall, &store_key, value).map(|_| ())
    }

    /// Deletes one of the local member's luggage entries; false if it had none.
    pub fn delete_luggage(&mut self, now: Instant, wall: WallTime, key: &str) -> Result<bool, CoreError> {
        let store_key = luggage::store_key(self.membership.name(), key);
        if self.store().value(&store_key).is_none() {
            return Ok(false);
        }
        self.delete(now, wall, &store_key).map(|_| true)
    }

    /// A member's luggage as the local member holds it, by key.
    pub fn luggage(&self, member: &str) -> Vec<(String, Vec<u8>)> {
        luggage::entries(self.store(), member)
    }

    // ----- racks --------------------------------------------------------

    /// The driver has made the Raft record `seq` of a
    /// [`Notification::Raft`] durable: the messages that depend on it
    /// leave. Without racks, or on a member that is no candidate, nothing
    /// happens.
    pub fn raft_persisted(&mut self, now: Instant, seq: u64) {
        if let Some(racks) = self.racks.as_mut() {
            racks.persisted(seq, self.membership.table());
            self.settle_racks(now, None);
        }
    }

    /// Brings a restarted candidate's Raft state back from its latest
    /// durable record, before the first input.
    pub fn restore_raft(&mut self, record: &RaftRecord) -> Result<(), CoreError> {
        match self.racks.as_mut() {
            Some(r) => Ok(r.restore(record)?),
            None => Err(RaftError::State("this member is in no rack".into()).into()),
        }
    }

    /// The routes events get, owned: (rack, gateway, active, other racks'
    /// gateways).
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub(crate) fn routes(&self) -> Option<(String, Option<SocketAddr>, bool, Vec<(Arc<str>, SocketAddr)>)> {
        let r = self.racks.as_ref()?;
        let routes = r.routes(self.membership.table(), self.replication.store());
        Some((
            routes.rack?.to_owned(),
            routes.gateway,
            routes.active,
            routes.gateways.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        ))
    }

    /// Whether this member is its rack's active gateway.
    pub fn is_active_gateway(&self) -> bool {
        self.racks.as_ref().is_some_and(Racks::is_active)
    }

    /// Every rack known, this member's own first: its gateway, term,
    /// candidates, members, and how long ago it was heard from. Empty
    /// without racks.
    pub fn racks(&self, now: Instant) -> Vec<RackInfo> {
        let wall = self.wall.read(now).map(|w| w.as_unix_ms());
        self.racks.as_ref().map_or_else(Vec::new, |r| {
            r.racks(now, wall, self.membership.table(), self.replication.store())
        })
    }

    /// Members of the other racks as their gateways report them.
    pub fn remote_members(&self, now: Instant) -> Vec<RemoteMember> {
        let wall = self.wall.read(now).map(|w| w.as_unix_ms());
        self.racks
            .as_ref()
            .map_or_else(Vec::new, |r| r.remote_members(now, wall, self.replication.store()))
    }

    // ----- outputs ------------------------------------------------------

    /// The next datagram or stream frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.wire.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_notification(&mut self) -> Option<Notification> {
        self.output.pop_front()
    }

    /// When [`Overlay::handle_timeout`] must be called next: the earliest
    /// timer that wakes; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter_map(|t| self.deadline(t))
            .filter(|d| d.wakes)
            .map(|d| d.at)
            .min()
    }

    // ----- queries ------------------------------------------------------

    /// The local member's name.
    pub fn name(&self) -> &str {
        self.membership.name()
    }

    /// The local member's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.membership.addr()
    }

    /// The local member as others should see it.
    pub fn local(&self) -> MemberInfo {
        self.membership.local()
    }

    /// One member by name (not the local one).
    pub fn member(&self, name: &str) -> Option<MemberInfo> {
        self.membership.table().get(name).map(Member::info)
    }

    /// All known members except the local one, tombstones included, in no
    /// particular but deterministic order.
    pub fn members(&self) -> impl Iterator<Item = MemberInfo> + '_ {
        self.membership.table().iter().map(Member::info)
    }

    /// Alive and suspect members, the local one included.
    pub fn live_count(&self) -> usize {
        self.membership.cluster_size()
    }

    /// A fingerprint of the live view (the local member and every alive or
    /// suspect member, with their boot epochs). Members whose digests and
    /// [`Overlay::live_count`]s are equal see the same members, with high
    /// probability: a cheap way to check that an overlay has converged.
    pub fn view_digest(&self) -> u64 {
        self.membership.view_digest()
    }

    /// Lifeguard's local health score (0 = healthy).
    pub fn health_score(&self) -> u32 {
        self.membership.health_score()
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Stats {
        &self.wire.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumormill_wire::proto::Envelope;

    use crate::testkit::{Net, addr};
    use crate::{Config, FrameKind};

    #[test]
    fn a_keyring_refused_by_a_stale_clock_is_followed_once_the_clock_is_set_right() {
        use crate::{Keyring, Security, WallTime};
        let encrypted = || Security::Encrypted(Keyring::new(&[1; 32]).expect("a 32-byte key"));
        let mut net = Net::with_security(2, Config::new_lan(), encrypted);
        net.run_for(Duration::from_secs(3));
        let day = Duration::from_secs(24 * 3600);
        let right = WallTime::from_unix_ms(1_800_000_000_000);
        let (now, stale) = (
            net.now,
            WallTime::from_unix_ms(right.as_unix_ms() - 2 * day.as_millis() as u64),
        );
        // Member 0's clock is two days behind (its last reading); member 1's is right.
        let fresh = crate::keys::KeyringRecord::default();
        net.node(0).restore_keyring(now, stale, &fresh).expect("restore");
        net.node(1).restore_keyring(now, right, &fresh).expect("restore");
        let id = net
            .node(1)
            .install_key_everywhere(now, right, &[2; 32])
            .expect("install");
        net.run_for(Duration::from_secs(5));
        let holds = |o: &crate::Overlay| o.keys().expect("encrypted").iter().any(|k| k.id == id);
        assert!(!holds(net.node(0)), "a keyring two days ahead of the clock is refused");
        // The clock is set right: the same keyring is plausible now.
        let now = net.now;
        net.node(0)
            .handle_wall_clock(now, right.saturating_add(Duration::from_secs(8)));
        assert!(holds(net.node(0)), "followed once the clock is right");
    }

    #[test]
    fn a_message_without_a_body_is_counted_as_malformed() {
        let mut net = Net::new(2, Config::new_lan());
        net.run_for(std::time::Duration::from_secs(1));
        let before = net.node(0).stats().malformed;
        net.inject(0, addr(1), FrameKind::Datagram, vec![Envelope { body: None }]);
        assert_eq!(net.node(0).stats().malformed, before + 1);
    }

    #[test]
    fn the_timer_table_names_each_source_once() {
        use super::Timer;
        use crate::membership::Timer as M;
        // One number per timer. The match is exhaustive: a new timer does
        // not compile until it has a number here, and fails below until
        // it is in `Timer::ALL`.
        let number = |t: Timer| match t {
            Timer::Membership(m) => match m {
                M::ProbeDeadline => 0,
                M::IndirectProbes => 1,
                M::Reconnects => 2,
                M::Suspicions => 3,
                M::Probe => 4,
                M::PushPull => 5,
                M::Reconnect => 6,
                M::Reap => 7,
                M::Gossip => 8,
            },
            Timer::Events => 9,
            Timer::Replication => 10,
            Timer::Racks => 11,
        };
        let mut listed: Vec<usize> = Timer::ALL.iter().map(|&t| number(t)).collect();
        listed.sort_unstable();
        assert_eq!(listed, (0..=11).collect::<Vec<_>>(), "each timer once in Timer::ALL");
    }
}
