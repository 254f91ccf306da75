use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::{Envelope, envelope::Body};
use rumormill_wire::{Codec, FrameKind, HeaderFilter, KeyId, KeyInfo, Keyring, PacketBuilder, Security, WireError};

use crate::broadcast::{Dissemination, DisseminationStats, Store, Update, UpdateHandler};
use crate::config::Config;
use crate::event::Event;
use crate::membership::awareness::Awareness;
use crate::membership::piggyback::Piggyback;
use crate::membership::suspicion::Suspicion;
use crate::membership::swim::{Probe, Relay};
use crate::membership::{Member, MemberInfo, MemberState, Members};
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
}

impl Identity {
    /// An identity.
    pub fn new(name: impl Into<Arc<str>>, addr: SocketAddr, epoch: u64) -> Identity {
        Identity {
            name: name.into(),
            addr,
            epoch,
        }
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
    Quota(#[from] crate::broadcast::QuotaExceeded),
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
    /// Messages that decoded but made no sense (bad address, empty name).
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
}

#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub(crate) name: Arc<str>,
    pub(crate) addr: SocketAddr,
    pub(crate) epoch: u64,
    pub(crate) incarnation: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Timers {
    pub(crate) probe: Instant,
    pub(crate) gossip: Instant,
    pub(crate) push_pull: Instant,
    pub(crate) reconnect: Instant,
    pub(crate) reap: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    Leaving,
    Closed,
}

/// One member's participation in one overlay: the sans-IO state machine.
///
/// See the [crate documentation](crate) for the input/output contract.
pub struct Overlay {
    pub(crate) config: Config,
    /// Zero of the member table's millisecond clock.
    origin: Instant,
    pub(crate) me: Local,
    pub(crate) codec: Codec,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) members: Members,
    pub(crate) dissemination: Dissemination,
    pub(crate) piggyback: Piggyback,
    pub(crate) awareness: Awareness,
    pub(crate) suspicions: BTreeMap<Arc<str>, Suspicion>,
    pub(crate) probe: Option<Probe>,
    pub(crate) probe_index: usize,
    pub(crate) relays: BTreeMap<u32, Relay>,
    pub(crate) reconnects: BTreeMap<u32, (SocketAddr, Instant)>,
    pub(crate) next_seq: u32,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) timers: Timers,
    status: Status,
    transmits: VecDeque<Transmit>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) pubsub: crate::events::Events,
    pub(crate) stats: Stats,
    /// The latest wall-clock reading given with a write.
    pub(crate) wall: WallClock,
    /// After a join, the store's exchanges completed before it: the next
    /// one is reported as [`Event::StoreSynced`].
    first_sync: Option<u64>,
    /// Cluster-wide key rotation ([`crate::keys`]).
    pub(crate) rotation: crate::keys::Rotation,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .field("codec", &self.codec)
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
        // Random phases, so that members started together do not act in lockstep.
        let mut phase = |d: Duration| now + d.mul_f64(rng.random::<f64>());
        let timers = Timers {
            probe: phase(config.probe_interval),
            gossip: phase(config.gossip_interval),
            push_pull: phase(config.push_pull_interval),
            reconnect: phase(config.reconnect_interval),
            reap: now + config.tombstone_ttl.min(Duration::from_secs(60)),
        };
        let codec = Codec::new(
            overlay_id,
            identity.sender_id(),
            identity.epoch,
            life_salt(seed),
            security,
        );
        let budget = config.mtu.saturating_sub(codec.overhead());
        let mut dconfig = config.dissemination.clone();
        dconfig.limits.luggage_value = config.max_luggage_value as u64;
        dconfig.limits.luggage_total = config.max_luggage_total as u64;
        let dissemination = Dissemination::new(
            dconfig,
            &identity.name,
            identity.epoch,
            identity.addr,
            budget,
            seed ^ 0xd155_e111,
            now,
        );
        Overlay {
            dissemination,
            origin: now,
            awareness: Awareness::new(config.awareness_max),
            config,
            me: Local {
                name: identity.name,
                addr: identity.addr,
                epoch: identity.epoch,
                incarnation: 0,
            },
            codec,
            rng,
            members: Members::default(),
            piggyback: Piggyback::default(),
            suspicions: BTreeMap::new(),
            probe: None,
            probe_index: 0,
            relays: BTreeMap::new(),
            reconnects: BTreeMap::new(),
            next_seq: 0,
            seeds: Vec::new(),
            timers,
            status: Status::Active,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            pubsub: crate::events::Events::default(),
            stats: Stats::default(),
            wall: WallClock::default(),
            first_sync: None,
            rotation: crate::keys::Rotation::default(),
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
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        if self.status == Status::Closed {
            return;
        }
        let packet = self
            .codec
            .open(FrameKind::Datagram, bytes)
            .and_then(|o| rumormill_wire::decode_packet(&o.body));
        match packet {
            Ok(p) => {
                for e in p.envelopes {
                    self.handle_envelope(now, from, e);
                }
            }
            Err(e) => self.reject(e),
        }
    }

    /// Handles one frame received on a stream (without its length prefix).
    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, frame: &[u8]) {
        self.stats.frames_received += 1;
        self.stats.bytes_received += frame.len() as u64;
        if self.status == Status::Closed {
            return;
        }
        if frame.len() > self.config.max_stream_frame {
            self.reject(WireError::FrameTooLarge {
                len: frame.len(),
                max: self.config.max_stream_frame,
            });
            return;
        }
        match self
            .codec
            .open(FrameKind::Stream, frame)
            .and_then(|o| rumormill_wire::decode_envelope(&o.body))
        {
            Ok(e) => self.handle_envelope(now, from, e),
            Err(e) => self.reject(e),
        }
    }

    /// Counts a stream frame the driver refused on its header, before
    /// reading its body (see [`Overlay::header_filter`]), as rejected.
    pub fn count_refused_frame(&mut self, e: WireError) {
        self.reject(e);
    }

    /// What the overlay's codec accepts in a header, for the tasks that read
    /// stream connections; it changes with the keyring.
    pub fn header_filter(&self) -> HeaderFilter {
        self.codec.header_filter()
    }

    fn reject(&mut self, e: WireError) {
        self.stats.rejected += 1;
        self.stats.last_rejection = Some(e);
    }

    fn handle_envelope(&mut self, now: Instant, from: SocketAddr, e: Envelope) {
        let Some(body) = e.body else {
            self.stats.malformed += 1;
            return;
        };
        match body {
            Body::Ping(p) => self.on_ping(from, p),
            Body::Ack(a) => self.on_ack(a),
            Body::PingReq(r) => self.on_ping_req(now, from, r),
            Body::Nack(n) => self.on_nack(n),
            Body::Alive(a) => match rumormill_wire::socket_addr(a.addr.as_ref()) {
                Ok(addr) if !a.name.is_empty() => self.apply_alive(now, &a.name, a.incarnation, a.epoch, addr),
                _ => self.stats.malformed += 1,
            },
            Body::Suspect(s) => self.apply_suspect(now, &s.name, s.incarnation, s.epoch, &s.from),
            Body::Dead(d) => self.apply_dead(now, &d.name, d.incarnation, d.epoch, &d.from),
            Body::PushPull(pp) => self.on_push_pull(now, from, pp),
            Body::Event(ev) => self.on_event(now, from, *ev),
            Body::EventAck(a) => self.on_event_ack(from, a),
            other => {
                self.dissemination.handle(now, from, other);
                self.drain_dissemination();
                self.follow_keyring(now);
            }
        }
    }

    /// Starts an anti-entropy exchange with `peer` now.
    pub(crate) fn sync_store_with(&mut self, peer: SocketAddr) {
        self.dissemination.exchange_now(peer);
        self.drain_dissemination();
    }

    /// Sends what dissemination queued and forwards its events.
    fn drain_dissemination(&mut self) {
        while let Some(out) = self.dissemination.poll_message() {
            if out.stream {
                self.send_stream(out.to, out.envelope);
            } else {
                self.send(out.to, vec![out.envelope]);
            }
        }
        while let Some(e) = self.dissemination.poll_event() {
            self.rotation.on_update(&e.update);
            self.events.push_back(Event::Update(e));
        }
        if let Some(before) = self.first_sync
            && self.dissemination.stats().syncs > before
        {
            self.first_sync = None;
            self.events.push_back(Event::StoreSynced);
        }
    }

    /// Advances timers: probes, gossip, push-pull, reconnection, suspicion
    /// timeouts. Call it at (or after) [`Overlay::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.status {
            Status::Closed => return,
            Status::Leaving if self.piggyback.is_empty() => {
                self.status = Status::Closed;
                return;
            }
            Status::Leaving => {}
            Status::Active => {
                if let Some(deadline) = self.probe.as_ref().and_then(|p| p.direct_deadline) {
                    if deadline <= now {
                        self.start_indirect_probe();
                    }
                }
                self.expire_relays(now);
                self.expire_suspicions(now);
                self.check_suspects(now);
                if self.timers.probe <= now {
                    self.probe_tick(now);
                }
                if self.timers.push_pull <= now {
                    self.push_pull_tick(now);
                }
                if self.timers.reconnect <= now {
                    self.reconnect_tick(now);
                }
                if self.timers.reap <= now {
                    self.reap_tick(now);
                }
                if self.pubsub.poll_timeout().is_some_and(|t| t <= now) {
                    self.events_tick(now);
                }
                if self.dissemination.poll_timeout() <= now {
                    let (members, rng) = (&self.members, &mut self.rng);
                    let mut peers = |k: usize| {
                        let k = if k == 0 { members.len() } else { k };
                        let picked = members.random(k, rng, |m| m.state == MemberState::Alive);
                        picked.into_iter().map(|i| members.at(i).addr()).collect()
                    };
                    self.dissemination.handle_timeout(now, &mut peers);
                    self.drain_dissemination();
                }
            }
        }
        if self.timers.gossip <= now {
            self.gossip_tick(now);
        }
    }

    /// Contacts the given addresses (seeds) with a full-state exchange. They
    /// are also remembered as seeds to re-contact whenever none of them is
    /// seen alive.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), CoreError> {
        if self.status != Status::Active {
            return Err(CoreError::Left);
        }
        let syncs = self.dissemination.stats().syncs;
        self.first_sync.get_or_insert(syncs);
        self.join_via(now, seeds);
        Ok(())
    }

    /// Contacts `addr` with a full-state exchange, like [`Overlay::join`],
    /// without remembering it as a seed: for addresses heard of from
    /// unauthenticated sources (multicast announcements), which must not
    /// pile up in the seed list.
    pub fn contact(&mut self, addr: SocketAddr) -> Result<(), CoreError> {
        if self.status != Status::Active {
            return Err(CoreError::Left);
        }
        if addr != self.me.addr {
            self.push_pull_with(addr, true);
        }
        Ok(())
    }

    /// Writes a value under `key`; it spreads to every member (see
    /// [`crate::broadcast`]). `wall` is the caller's wall clock: the write
    /// clock is at least that (see [`crate::WallTime`]). Refused with
    /// [`CoreError::Quota`] if it would take this member beyond its quota
    /// ([`crate::broadcast::Limits`]).
    pub fn put(&mut self, now: Instant, wall: WallTime, key: &str, value: Vec<u8>) -> Result<Update, CoreError> {
        if self.status != Status::Active {
            return Err(CoreError::Left);
        }
        self.floor_write_clock(now, wall);
        Ok(self.dissemination.try_put(now, key, value)?)
    }

    /// Deletes `key` everywhere.
    pub fn delete(&mut self, now: Instant, wall: WallTime, key: &str) -> Result<Update, CoreError> {
        if self.status != Status::Active {
            return Err(CoreError::Left);
        }
        self.floor_write_clock(now, wall);
        Ok(self.dissemination.try_delete(now, key)?)
    }

    /// Raises the write clock to the wall clock in milliseconds (a hybrid
    /// logical clock), so that a restarted member's writes order after
    /// those of its previous life, and remembers the reading.
    fn floor_write_clock(&mut self, now: Instant, wall: WallTime) {
        self.wall.observe(now, wall);
        self.dissemination.advance_clock(wall.as_unix_ms());
    }

    /// The replicated updates.
    pub fn store(&self) -> &Store {
        self.dissemination.store()
    }

    /// Replaces the handler that decides which incoming updates to keep.
    pub fn set_update_handler(&mut self, handler: impl UpdateHandler + 'static) {
        self.dissemination.set_handler(handler);
    }

    /// The dissemination state machine (rumor states, counters).
    pub fn dissemination(&self) -> &Dissemination {
        &self.dissemination
    }

    /// Counters of the dissemination protocols.
    pub fn dissemination_stats(&self) -> DisseminationStats {
        self.dissemination.stats()
    }

    /// Replaces the seed addresses re-contacted when not seen alive.
    pub fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        self.seeds = seeds;
    }

    /// Adds members known from elsewhere (a snapshot taken before a
    /// restart, or a bootstrap list) without events. Entries about the local
    /// member, or already known, are ignored; suspects are restored as alive
    /// (the failure detector will judge them afresh).
    pub fn restore(&mut self, now: Instant, members: impl IntoIterator<Item = MemberInfo>) {
        let since = self.stamp(now);
        let mut fresh: Vec<Member> = members
            .into_iter()
            .filter(|m| m.name != self.me.name && self.members.position(&m.name).is_none())
            .map(|m| Member {
                name: m.name,
                addr: m.addr.into(),
                incarnation: m.incarnation,
                epoch: m.epoch,
                state: if m.state == MemberState::Suspect {
                    MemberState::Alive
                } else {
                    m.state
                },
                since,
            })
            .collect();
        // A random place in the probe order for each, as if they had joined one by one.
        rand::seq::SliceRandom::shuffle(&mut fresh[..], &mut self.rng);
        self.members.reserve(fresh.len());
        for m in fresh {
            self.members.insert(m);
        }
        // Spread the first full-state exchanges over the interval this
        // cluster size calls for, not the base one.
        let interval = self.config.push_pull_interval_for(self.cluster_size());
        self.timers.push_pull = now + interval.mul_f64(self.rng.random::<f64>());
    }

    /// Leaves gracefully: tells the overlay, keeps gossiping until the news
    /// has been retransmitted enough, then goes quiet ([`Overlay::is_closed`]).
    pub fn leave(&mut self, now: Instant) {
        if self.status != Status::Active {
            return;
        }
        self.status = Status::Leaving;
        self.probe = None;
        let (name, inc, epoch) = (self.me.name.clone(), self.me.incarnation, self.me.epoch);
        let dead = crate::membership::lifecycle::dead_envelope(&name, inc, epoch, &name);
        self.piggyback.push(name, dead);
        self.timers.gossip = now;
    }

    /// Whether a [`Overlay::leave`] has completed.
    pub fn is_closed(&self) -> bool {
        self.status == Status::Closed
    }

    pub(crate) fn is_leaving(&self) -> bool {
        self.status != Status::Active
    }

    /// Installs a key (the overlay must be encrypted).
    pub fn install_key(&mut self, key: &[u8]) -> Result<KeyId, CoreError> {
        Ok(self.codec.with_keyring(|r| r.install(key))?)
    }

    /// Makes an installed key the one outgoing packets are sealed with.
    pub fn use_key(&mut self, id: KeyId) -> Result<(), CoreError> {
        Ok(self.codec.with_keyring(|r| r.use_key(id))?)
    }

    /// Removes a key that is not the primary one.
    pub fn remove_key(&mut self, id: KeyId) -> Result<(), CoreError> {
        Ok(self.codec.with_keyring(|r| r.remove(id))?)
    }

    /// Runs any keyring operation.
    pub fn with_keyring<T>(&mut self, f: impl FnOnce(&mut Keyring) -> Result<T, WireError>) -> Result<T, CoreError> {
        Ok(self.codec.with_keyring(f)?)
    }

    /// The installed keys, or `None` on a plain-text overlay.
    pub fn keys(&self) -> Option<Vec<KeyInfo>> {
        self.codec.keys()
    }

    // ----- outputs ------------------------------------------------------

    /// The next datagram or stream frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Overlay::handle_timeout`] must be called next; `None` once
    /// closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.status {
            Status::Closed => None,
            Status::Leaving => Some(self.timers.gossip),
            Status::Active => {
                let t = &self.timers;
                let mut next = t.probe.min(t.push_pull).min(t.reconnect).min(t.reap);
                let others = [
                    (!self.piggyback.is_empty()).then_some(self.timers.gossip),
                    self.probe.as_ref().and_then(|p| p.direct_deadline),
                    self.relays.values().map(|r| r.deadline).min(),
                    self.reconnects.values().map(|r| r.1).min(),
                    self.suspicions.values().map(|s| s.deadline.min(s.next_check)).min(),
                    Some(self.dissemination.poll_timeout()),
                    self.pubsub.poll_timeout(),
                ];
                for d in others.into_iter().flatten() {
                    next = next.min(d);
                }
                Some(next)
            }
        }
    }

    // ----- queries ------------------------------------------------------

    /// The local member's name.
    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// The local member's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.me.addr
    }

    /// The local member as others should see it.
    pub fn local(&self) -> MemberInfo {
        MemberInfo {
            name: self.me.name.clone(),
            addr: self.me.addr,
            incarnation: self.me.incarnation,
            epoch: self.me.epoch,
            state: if self.is_leaving() {
                MemberState::Left
            } else {
                MemberState::Alive
            },
        }
    }

    /// One member by name (not the local one).
    pub fn member(&self, name: &str) -> Option<MemberInfo> {
        self.members.get(name).map(Member::info)
    }

    /// All known members except the local one, tombstones included, in no
    /// particular but deterministic order.
    pub fn members(&self) -> impl Iterator<Item = MemberInfo> + '_ {
        self.members.iter().map(Member::info)
    }

    /// Alive and suspect members, the local one included.
    pub fn live_count(&self) -> usize {
        self.cluster_size()
    }

    /// A fingerprint of the live view (the local member and every alive or
    /// suspect member, with their boot epochs). Members whose digests and
    /// [`Overlay::live_count`]s are equal see the same members, with high
    /// probability: a cheap way to check that an overlay has converged.
    pub fn view_digest(&self) -> u64 {
        let me = crate::membership::name_hash(&self.me.name) ^ self.me.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.members.digest().wrapping_add(me)
    }

    /// Lifeguard's local health score (0 = healthy).
    pub fn health_score(&self) -> u32 {
        self.awareness.score()
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn stamp(&self, now: Instant) -> crate::membership::Stamp {
        now.saturating_duration_since(self.origin).as_millis() as u64
    }

    // ----- sending ------------------------------------------------------

    /// Sends messages in one datagram, filling the rest with piggybacked
    /// membership changes.
    pub(crate) fn send(&mut self, to: SocketAddr, msgs: Vec<Envelope>) {
        let budget = self.config.mtu.saturating_sub(self.codec.overhead());
        let mut packet = PacketBuilder::new(budget);
        for m in msgs {
            if let Err(m) = packet.push(m) {
                // Too big for one datagram: it goes over a stream instead.
                self.send_stream(to, m);
            }
        }
        let limit = self.config.retransmit_limit(self.cluster_size());
        self.piggyback.fill(&mut packet, limit);
        if packet.is_empty() {
            return;
        }
        self.seal(to, FrameKind::Datagram, &packet.finish());
    }

    /// Room for messages in one datagram.
    pub(crate) fn datagram_budget(&self) -> usize {
        self.config.mtu.saturating_sub(self.codec.overhead())
    }

    pub(crate) fn send_stream(&mut self, to: SocketAddr, msg: Envelope) {
        self.seal(to, FrameKind::Stream, &rumormill_wire::encode_envelope(&msg));
    }

    fn seal(&mut self, to: SocketAddr, kind: FrameKind, body: &[u8]) {
        match self.codec.seal(kind, body) {
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
                self.transmits.push_back(Transmit { to, kind, payload });
            }
            Err(_) => self.stats.seal_errors += 1,
        }
    }

    /// A gossip round: piggybacked changes to a few random members (live
    /// ones, and recently failed ones so they can refute).
    fn gossip_tick(&mut self, now: Instant) {
        self.timers.gossip = next_tick(self.timers.gossip, self.config.gossip_interval, now);
        if self.piggyback.is_empty() {
            return;
        }
        let dead_window = self.config.gossip_to_the_dead.as_millis() as u64;
        let t = self.stamp(now);
        let targets = self.members.random(self.config.gossip_nodes, &mut self.rng, |m| {
            m.state.is_live() || (m.state == MemberState::Failed && t.saturating_sub(m.since) < dead_window)
        });
        if targets.is_empty() && self.is_leaving() {
            // Nobody left to tell: the leave is complete.
            self.piggyback.clear();
        }
        for i in targets {
            let addr = self.members.at(i).addr();
            self.send(addr, Vec::new());
            if self.piggyback.is_empty() {
                break;
            }
        }
    }
}
