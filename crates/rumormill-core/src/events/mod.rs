//! Events on topics: a publisher's event reaches the members subscribed to
//! its topic, and only them.
//!
//! - **Subscriptions** ([`subscriptions`]) are values of the replicated
//!   store, so every member knows who wants what.
//! - **Spreading** ([`tree`]): the event goes down a relay tree among the
//!   topic's live subscribers — the publisher sends it to at most
//!   `event_relay_fanout` of them, each with a span of the ring of member
//!   positions to cover, and so on — so that each subscriber gets one copy,
//!   within `⌈log_k S⌉` hops. Each hop is acknowledged and resent, then
//!   taken back by the relay, so loss and crashed relays cost time, not
//!   subtrees. Non-subscribers never see the payload.
//! - **Delivery**: [`Delivery::BestEffort`] stops there.
//!   [`Delivery::AtLeastOnce`] asks every receiver to acknowledge to the
//!   publisher, which resends the event directly to each subscriber that has
//!   not acknowledged, every `retry_every`, until it does, `retry_max`
//!   attempts are spent (0: no limit), or the subscriber fails, leaves or
//!   unsubscribes. Each subscriber's outcome is reported to the publisher
//!   once ([`DeliveryReport`]).
//! - **Once at the application**: receivers remember the events they
//!   delivered ([`dedup`]) and acknowledge duplicates without delivering
//!   them again.
//! - **Across racks** (`remote.rs`): subscribers in other racks get the
//!   event through the gateways, one copy per rack that has subscribers,
//!   and acknowledge back through them; the publisher tracks and reports
//!   them like the others.
//!
//! All of it is one sub-machine of the overlay, with private state: it
//! reads the member table and the store, and sends through a sender that
//! piggybacks membership changes, all lent to it for each call.

pub mod dedup;
mod remote;
#[cfg(test)]
mod remote_tests;
pub mod subscriptions;
pub mod tree;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::{self, Envelope, envelope::Body};

use crate::config::Config;
use crate::membership::{MemberState, Members};
use crate::notification::Notification;
use crate::overlay::{CoreError, Identity, Sender};
use crate::racks::routes::{RemoteRacks, Routes};
use crate::replication::Store;
use crate::reserved::{self, ReservedKey, Topics};

/// Largest event payload by default (1 MiB); bigger ones are refused.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Events awaiting acknowledgements at one publisher, at most.
pub const MAX_PENDING: usize = 65_536;
/// Payload bytes awaiting acknowledgements at one publisher, at most.
pub const MAX_PENDING_BYTES: usize = 256 << 20;

/// How long a best-effort event is taken to be on its way (resent hops
/// and slow relays included); receivers remember it at least that long.
pub const BEST_EFFORT_SETTLE: Duration = Duration::from_secs(5);
/// Best-effort events taken to be on their way at most: within the
/// receivers' de-duplication window (4,096) with room for at-least-once
/// ones.
pub const BEST_EFFORT_RECENT: usize = 2048;

/// An event's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// The publisher.
    pub origin: Arc<str>,
    /// Its boot epoch.
    pub epoch: u64,
    /// Its event counter in that epoch, from 1.
    pub seq: u64,
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.origin, self.epoch, self.seq)
    }
}

impl EventId {
    fn to_proto(&self) -> proto::EventId {
        proto::EventId {
            origin: self.origin.to_string(),
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    fn from_proto(p: Option<&proto::EventId>) -> Option<EventId> {
        let p = p?;
        (!p.origin.is_empty() && p.seq > 0).then(|| EventId {
            origin: p.origin.as_str().into(),
            epoch: p.epoch,
            seq: p.seq,
        })
    }
}

/// How hard the publisher tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Spread once among the subscribers; no acknowledgement, no report.
    BestEffort,
    /// Resent to each subscriber until it acknowledges.
    AtLeastOnce {
        /// Time between two resends.
        retry_every: Duration,
        /// Resends at most (0: until delivered or the subscriber is gone).
        retry_max: u32,
    },
}

/// What became of an event for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The subscriber has it.
    Delivered,
    /// `retry_max` resends went unacknowledged.
    RetriesExhausted,
    /// The subscriber was declared failed.
    SubscriberFailed,
    /// The subscriber left the overlay.
    SubscriberLeft,
    /// The subscriber no longer subscribes to the topic.
    Unsubscribed,
    /// The subscriber is in another rack, and `retry_max` resends went
    /// unacknowledged while its rack could not be reached (no gateway
    /// there, or none here).
    RackUnreachable,
}

impl Outcome {
    /// A short name: `delivered`, `retries_exhausted`, `failed`, `left`,
    /// `unsubscribed`, `rack_unreachable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::RetriesExhausted => "retries_exhausted",
            Outcome::SubscriberFailed => "failed",
            Outcome::SubscriberLeft => "left",
            Outcome::Unsubscribed => "unsubscribed",
            Outcome::RackUnreachable => "rack_unreachable",
        }
    }
}

/// An event for the local application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its identity.
    pub id: EventId,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Whether it was published at-least-once (its publisher awaits an
    /// acknowledgement).
    pub at_least_once: bool,
}

/// An at-least-once event awaiting acknowledgements, as saved by a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// Its identity (kept across the publisher's restart).
    pub id: EventId,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Time between two resends.
    pub retry_every: Duration,
    /// Resends at most (0: no limit).
    pub retry_max: u32,
    /// Subscribers that have not acknowledged: name, direct sends, resends.
    pub waiting: Vec<(Arc<str>, u32, u32)>,
}

/// The final outcome of an at-least-once event for one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The event.
    pub id: EventId,
    /// The subscriber.
    pub subscriber: Arc<str>,
    /// What happened.
    pub outcome: Outcome,
    /// Direct sends made by the publisher (the first push included); for
    /// a subscriber in another rack, copies sent towards its rack.
    pub attempts: u32,
    /// The subscriber's rack, when it is not the publisher's (`None`
    /// without racks, and for subscribers of the publisher's rack).
    pub rack: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Target {
    /// Direct sends so far (the first push included).
    attempts: u32,
    /// Resends so far.
    resends: u32,
}

#[derive(Debug, Clone)]
struct Pending {
    topic: String,
    payload: Vec<u8>,
    retry_every: Duration,
    retry_max: u32,
    next: Instant,
    targets: BTreeMap<Arc<str>, Target>,
}

/// What the events sub-machine reads of the others for one input.
pub(crate) struct Env<'a> {
    /// The member table, read-only: who is live, and where.
    pub(crate) members: &'a Members,
    /// The replicated store, read-only: who subscribes to what.
    pub(crate) store: &'a Store,
    /// The overlay's RNG: relays are picked at random.
    pub(crate) rng: &'a mut ChaCha8Rng,
    /// Sends in datagrams that carry piggybacked membership changes, and
    /// counts.
    pub(crate) out: Sender<'a>,
    /// Where copies for other racks go (without racks: nowhere).
    pub(crate) routes: Routes<'a>,
}

/// The events sub-machine of one member: what it published and awaits
/// acknowledgements for, the relay copies it awaits relay
/// acknowledgements for, and what it delivered (for de-duplication).
#[derive(Debug)]
pub(crate) struct Events {
    /// The local member: events are published under its name and life.
    name: Arc<str>,
    addr: SocketAddr,
    epoch: u64,
    max_payload: usize,
    relay_fanout: usize,
    hop_timeout: Duration,
    next_seq: u64,
    /// Keyed by the whole id: events resumed after a restart keep the id
    /// (and boot epoch) they were published under.
    pending: BTreeMap<EventId, Pending>,
    /// Manual acknowledgement: delivered events the application has not
    /// acknowledged yet, with whom to acknowledge to.
    manual_acks: bool,
    unacked: BTreeMap<EventId, SocketAddr>,
    /// Manual mode: the events the application has stored (the window to
    /// save), a subset of `seen`.
    acked: dedup::Dedup,
    pending_bytes: usize,
    seen: dedup::Dedup,
    /// Relay copies awaiting their relay acknowledgement, by event and
    /// receiver.
    hops: BTreeMap<(EventId, Arc<str>), HopSent>,
    /// Own best-effort events still on their way: seq and publication time.
    recent: VecDeque<(u64, Instant)>,
    /// Deliveries and reports for the application.
    output: VecDeque<Notification>,
}

/// A relay copy sent in a datagram, not acknowledged yet.
#[derive(Debug, Clone)]
struct HopSent {
    addr: SocketAddr,
    span: tree::Span,
    /// Copies sent so far.
    attempts: u32,
    next: Instant,
    event: Box<proto::Event>,
    /// Members of the span found not answering for this event.
    unresponsive: Vec<Arc<str>>,
}

/// An event message; acknowledgements go to `reply_to` (the publisher).
/// Without a span it is delivered, not relayed.
fn event_message(
    id: &EventId,
    topic: &str,
    payload: &[u8],
    ack: bool,
    reply_to: SocketAddr,
    pending_floor: u64,
) -> proto::Event {
    proto::Event {
        id: Some(id.to_proto()),
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        ack,
        reply_to: Some(reply_to.into()),
        pending_floor,
        relay: None,
        racks: Vec::new(),
        targets: Vec::new(),
    }
}

fn envelope(e: proto::Event) -> Envelope {
    Envelope {
        body: Some(Body::Event(Box::new(e))),
    }
}

fn ack_envelope(id: &EventId, me: &str, unsubscribed: bool, relay: bool) -> Envelope {
    Envelope {
        body: Some(Body::EventAck(proto::EventAck {
            id: Some(id.to_proto()),
            from: me.to_owned(),
            unsubscribed,
            relay,
        })),
    }
}

impl Events {
    /// The events state of the local member `identity`.
    pub(crate) fn new(identity: &Identity, config: &Config) -> Events {
        Events {
            name: identity.name.clone(),
            addr: identity.addr,
            epoch: identity.epoch,
            max_payload: config.max_event_payload,
            relay_fanout: config.event_relay_fanout,
            hop_timeout: config.event_hop_timeout,
            next_seq: 0,
            pending: BTreeMap::new(),
            manual_acks: false,
            unacked: BTreeMap::new(),
            acked: dedup::Dedup::default(),
            pending_bytes: 0,
            seen: dedup::Dedup::default(),
            hops: BTreeMap::new(),
            recent: VecDeque::new(),
            output: VecDeque::new(),
        }
    }

    /// When [`Events::handle_timeout`] is due: the next resend of an
    /// at-least-once event or of a relay copy.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let resend = self.pending.values().map(|p| p.next).min();
        let hop = self.hops.values().map(|h| h.next).min();
        resend.into_iter().chain(hop).min()
    }

    /// The next delivery or delivery report for the application.
    pub(crate) fn poll_notification(&mut self) -> Option<Notification> {
        self.output.pop_front()
    }

    /// The write that subscribes the local member to `topic` (a store key
    /// and value), or `None` if it subscribes already.
    pub(crate) fn subscribe(&self, store: &Store, topic: &str) -> Result<Option<(String, Vec<u8>)>, CoreError> {
        subscriptions::check_topic(topic).map_err(CoreError::Invalid)?;
        let mut topics = topics_of(store, &self.name);
        if topics.iter().any(|t| t == topic) {
            return Ok(None);
        }
        if topics.len() >= subscriptions::MAX_TOPICS {
            return Err(CoreError::Invalid(format!(
                "already {} topics: at most {}",
                topics.len(),
                subscriptions::MAX_TOPICS
            )));
        }
        topics.push(topic.to_owned());
        topics.sort();
        Ok(Some(topics_write(&self.name, topics)))
    }

    /// The write that unsubscribes the local member from `topic`, or
    /// `None` if it does not subscribe.
    pub(crate) fn unsubscribe(&self, store: &Store, topic: &str) -> Option<(String, Vec<u8>)> {
        let mut topics = topics_of(store, &self.name);
        let before = topics.len();
        topics.retain(|t| t != topic);
        if topics.len() == before {
            return None;
        }
        Some(topics_write(&self.name, topics))
    }

    /// The live members subscribed to `topic`, the local one included,
    /// with their addresses.
    pub(crate) fn subscribers(&self, store: &Store, members: &Members, topic: &str) -> Vec<(Arc<str>, SocketAddr)> {
        let mut out = Vec::new();
        if subscribes(store, &self.name, topic) {
            out.push((self.name.clone(), self.addr));
        }
        let every = ReservedKey::Topics { member: String::new() }.key();
        for u in store.prefixed(&every) {
            let Some(ReservedKey::Topics { member: name }) = reserved::owned(u) else {
                continue;
            };
            // Written by the member itself, listing the topic, and not us.
            let lists = u
                .value
                .as_deref()
                .and_then(|v| Topics::decode(v).ok())
                .is_some_and(|t| t.lists(topic));
            if name == *self.name || !lists {
                continue;
            }
            if let Some(i) = members.position(&name) {
                let m = members.at(i);
                if m.state.is_live() {
                    out.push((m.name.clone(), m.addr()));
                }
            }
        }
        out
    }

    /// Publishes `payload` on `topic` (see [`crate::Overlay::publish`]).
    pub(crate) fn publish(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Vec<u8>,
        delivery: Delivery,
        env: &mut Env<'_>,
    ) -> Result<EventId, CoreError> {
        subscriptions::check_topic(topic).map_err(CoreError::Invalid)?;
        if payload.len() > self.max_payload {
            return Err(CoreError::Invalid(format!(
                "payload of {} bytes: at most {}",
                payload.len(),
                self.max_payload
            )));
        }
        if let Delivery::AtLeastOnce { retry_every, .. } = delivery {
            if retry_every.is_zero() {
                return Err(CoreError::Invalid("retry_every must be above zero".into()));
            }
            if self.pending.len() >= MAX_PENDING || self.pending_bytes + payload.len() > MAX_PENDING_BYTES {
                return Err(CoreError::Invalid(format!(
                    "{MAX_PENDING} at-least-once events are still awaiting acknowledgements"
                )));
            }
        }
        self.next_seq += 1;
        let id = EventId {
            origin: self.name.clone(),
            epoch: self.epoch,
            seq: self.next_seq,
        };
        let remote: Vec<(Arc<str>, SocketAddr)> = self
            .subscribers(env.store, env.members, topic)
            .into_iter()
            .filter(|(n, _)| *n != self.name)
            .collect();
        let ack = matches!(delivery, Delivery::AtLeastOnce { .. });
        let recent = &mut self.recent;
        while recent
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > BEST_EFFORT_SETTLE)
            || recent.len() >= BEST_EFFORT_RECENT
        {
            recent.pop_front();
        }
        if !ack {
            recent.push_back((id.seq, now));
        }
        let mut targets = BTreeMap::new();
        if subscribes(env.store, &self.name, topic) {
            self.seen.insert(&id.origin, id.epoch, id.seq);
            self.deliver(
                Event {
                    id: id.clone(),
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                    at_least_once: ack,
                },
                env,
            );
            if ack && self.manual_acks {
                // The local application is a subscriber like the others: its
                // copy counts once it is stored (`acknowledge` sends the ack
                // to ourselves), and a crash before that resends it.
                self.unacked.insert(id.clone(), self.addr);
                targets.insert(
                    self.name.clone(),
                    Target {
                        attempts: 1,
                        resends: 0,
                    },
                );
            }
        }
        let floor = self.pending_floor(id.epoch).min(id.seq);
        let message = event_message(&id, topic, &payload, ack, self.addr, floor);
        let direct = self.relay(now, &id, &message, tree::Span::WHOLE, &[], env);
        let across = self.publish_across(&message, &remote, env);
        for (name, _) in remote {
            let attempts = u32::from(direct.contains(&name));
            targets.insert(name, Target { attempts, resends: 0 });
        }
        for (name, attempts) in across {
            targets.entry(name).or_insert(Target { attempts, resends: 0 });
        }
        if let Delivery::AtLeastOnce { retry_every, retry_max } = delivery {
            if !targets.is_empty() {
                self.pending_bytes += payload.len();
                self.pending.insert(
                    id.clone(),
                    Pending {
                        topic: topic.to_owned(),
                        payload,
                        retry_every,
                        retry_max,
                        next: now + retry_every,
                        targets,
                    },
                );
            }
        }
        Ok(id)
    }

    /// Sends `message` down the relay tree for `span` (see [`tree`]): to
    /// one live subscriber of each run of the span, the local member, the
    /// publisher and the `unresponsive` ones left out. Returns the members
    /// sent to.
    fn relay(
        &mut self,
        now: Instant,
        id: &EventId,
        message: &proto::Event,
        span: tree::Span,
        unresponsive: &[Arc<str>],
        env: &mut Env<'_>,
    ) -> Vec<Arc<str>> {
        let me = tree::ring_position(&self.name);
        let members: Vec<(Arc<str>, SocketAddr)> = self
            .subscribers(env.store, env.members, &message.topic)
            .into_iter()
            .filter(|(n, _)| *n != self.name && *n != id.origin && !unresponsive.contains(n))
            .collect();
        let hops = tree::split(span, me, members, self.relay_fanout, env.rng);
        let mut sent = Vec::with_capacity(hops.len());
        for hop in hops {
            self.send_hop(now, id, message, &hop, unresponsive, env);
            sent.push(hop.name);
        }
        sent
    }

    /// Sends one relay copy; one that fits in a datagram is tracked until
    /// its relay acknowledgement.
    fn send_hop(
        &mut self,
        now: Instant,
        id: &EventId,
        message: &proto::Event,
        hop: &tree::Hop,
        unresponsive: &[Arc<str>],
        env: &mut Env<'_>,
    ) {
        let mut copy = message.clone();
        copy.relay = Some(proto::Span {
            first: hop.span.first,
            last: hop.span.last,
            acknowledge: true,
        });
        // Envelope and packet framing: a few bytes.
        let fits = prost::Message::encoded_len(&copy) + 16 <= env.out.datagram_budget();
        let key = (id.clone(), hop.name.clone());
        let track = fits && (self.hops.len() < tree::MAX_HOPS || self.hops.contains_key(&key));
        if let Some(span) = copy.relay.as_mut() {
            span.acknowledge = track;
        }
        env.out.stats().events_relayed += 1;
        if track {
            self.hops.insert(
                key,
                HopSent {
                    addr: hop.addr,
                    span: hop.span,
                    attempts: 1,
                    next: now + self.hop_timeout,
                    event: Box::new(copy.clone()),
                    unresponsive: unresponsive.to_vec(),
                },
            );
        }
        env.out.send(hop.addr, vec![envelope(copy)]);
    }

    /// Resends relay copies not acknowledged in time; after
    /// [`tree::HOP_ATTEMPTS`] copies, relays the receiver's span without it.
    fn hops_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        let due: Vec<(EventId, Arc<str>)> = self
            .hops
            .iter()
            .filter(|(_, h)| h.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(h) = self.hops.remove(&key) else {
                continue;
            };
            let (id, name) = key;
            if h.attempts < tree::HOP_ATTEMPTS {
                env.out.stats().event_hop_resends += 1;
                let copy = (*h.event).clone();
                self.hops.insert(
                    (id, name),
                    HopSent {
                        attempts: h.attempts + 1,
                        next: now + self.hop_timeout,
                        ..h
                    },
                );
                env.out.send(h.addr, vec![envelope(copy)]);
            } else {
                env.out.stats().event_hop_takeovers += 1;
                let mut message = *h.event;
                message.relay = None;
                let mut unresponsive = h.unresponsive;
                unresponsive.push(name);
                self.relay(now, &id, &message, h.span, &unresponsive, env);
            }
        }
    }

    fn deliver(&mut self, m: Event, env: &mut Env<'_>) {
        env.out.stats().events_delivered += 1;
        self.output.push_back(Notification::Event(m));
    }

    fn report(&mut self, id: &EventId, subscriber: Arc<str>, outcome: Outcome, attempts: u32, rack: Option<Arc<str>>) {
        self.output.push_back(Notification::Report(DeliveryReport {
            id: id.clone(),
            subscriber,
            outcome,
            attempts,
            rack,
        }));
    }

    /// The lowest seq of `epoch` still awaiting acknowledgements (everything
    /// below is final here), or the next seq when none is.
    ///
    /// A best-effort event is final once it has had time to arrive
    /// ([`BEST_EFFORT_SETTLE`]): until then it holds the floor too, or a
    /// receiver that got a later event first (another branch of the relay
    /// tree) would take it for one it had forgotten.
    fn pending_floor(&self, epoch: u64) -> u64 {
        let recent = self.recent.front().filter(|_| epoch == self.epoch).map(|(seq, _)| *seq);
        self.pending
            .keys()
            .filter(|id| id.epoch == epoch && *id.origin == *self.name)
            .map(|id| id.seq)
            .chain(recent)
            .min()
            .unwrap_or(self.next_seq + 1)
    }

    pub(crate) fn on_event(&mut self, now: Instant, from: SocketAddr, e: proto::Event, env: &mut Env<'_>) {
        let stats = env.out.stats();
        stats.events_received += 1;
        stats.event_payload_bytes_received += e.payload.len() as u64;
        let (Some(id), Ok(reply_to)) = (
            EventId::from_proto(e.id.as_ref()),
            rumormill_wire::socket_addr(e.reply_to.as_ref()),
        ) else {
            stats.malformed += 1;
            return;
        };
        if subscriptions::check_topic(&e.topic).is_err() || e.payload.len() > self.max_payload {
            stats.malformed += 1;
            return;
        }
        if !e.racks.is_empty() {
            self.cross(now, id, e, env);
            return;
        }
        self.take(now, from, id, reply_to, e, env);
    }

    /// Takes an event for the local member: delivers it once if it
    /// subscribes, relays it down its span, acknowledges it.
    fn take(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: EventId,
        reply_to: SocketAddr,
        e: proto::Event,
        env: &mut Env<'_>,
    ) {
        let subscribed = subscribes(env.store, &self.name, &e.topic);
        // What the publisher has settled need not be remembered any more.
        let settled = e.pending_floor.saturating_sub(1).min(id.seq.saturating_sub(1));
        self.seen.advance(&id.origin, id.epoch, settled);
        self.acked.advance(&id.origin, id.epoch, settled);
        let insert = if subscribed {
            self.seen.insert(&id.origin, id.epoch, id.seq)
        } else {
            dedup::Insert::Seen
        };
        if insert == dedup::Insert::Full {
            // Not delivered, not acknowledged: resent once the window has room.
            env.out.stats().events_refused += 1;
            return;
        }
        let first = insert == dedup::Insert::New;
        if let Some(span) = e.relay {
            // The relay acknowledgement goes back even for a duplicate (the
            // first one may have been lost). A member that does not
            // subscribe relays what it is given all the same.
            if span.acknowledge {
                env.out.send(from, vec![ack_envelope(&id, &self.name, false, true)]);
            }
            if (first || !subscribed) && span.first <= span.last {
                let span = tree::Span {
                    first: span.first,
                    last: span.last,
                };
                self.relay(now, &id, &e, span, &[], env);
            }
        }
        if first {
            self.deliver(
                Event {
                    id: id.clone(),
                    topic: e.topic,
                    payload: e.payload,
                    at_least_once: e.ack,
                },
                env,
            );
        } else if subscribed {
            env.out.stats().events_duplicate += 1;
        }
        if e.ack {
            if subscribed && self.manual_acks {
                // Acknowledged when the application says it has it (a
                // duplicate before then changes nothing).
                if first || self.unacked.contains_key(&id) {
                    self.unacked.insert(id, reply_to);
                    return;
                }
            }
            env.out
                .send(reply_to, vec![ack_envelope(&id, &self.name, !subscribed, false)]);
        }
    }

    pub(crate) fn on_event_ack(&mut self, from: SocketAddr, a: proto::EventAck, env: &mut Env<'_>) {
        let Some(id) = EventId::from_proto(a.id.as_ref()) else {
            env.out.stats().malformed += 1;
            return;
        };
        // Only the subscriber itself may acknowledge: the datagram must come
        // from its host — or, for a subscriber in another rack, from the
        // gateway its acknowledgements come through.
        let local = a.from == *self.name || env.members.position(&a.from).is_some();
        let sender_ok = if a.from == *self.name {
            from.ip() == self.addr.ip()
        } else if local {
            env.members
                .position(&a.from)
                .is_some_and(|i| env.members.at(i).addr().ip() == from.ip())
        } else {
            self.remote_ack_source(&a.from, env)
                .is_some_and(|via| via.ip() == from.ip())
        };
        if !sender_ok {
            env.out.stats().malformed += 1;
            return;
        }
        if a.relay {
            self.hops.remove(&(id, Arc::from(a.from.as_str())));
            return;
        }
        if *id.origin != *self.name {
            // Not ours: a gateway passes it on towards the publisher.
            self.forward_ack(&id, local, a, env);
            return;
        }
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let Some((name, t)) = p.targets.remove_entry(a.from.as_str()) else {
            return;
        };
        if p.targets.is_empty() {
            if let Some(done) = self.pending.remove(&id) {
                self.pending_bytes = self.pending_bytes.saturating_sub(done.payload.len());
            }
        }
        let outcome = if a.unsubscribed {
            Outcome::Unsubscribed
        } else {
            Outcome::Delivered
        };
        let rack = (!local).then(|| self.remote_rack(&name, env)).flatten();
        self.report(&id, name, outcome, t.attempts.max(1), rack);
    }

    /// Resends relay copies and unacknowledged at-least-once events;
    /// reports subscribers that are gone.
    pub(crate) fn handle_timeout(&mut self, now: Instant, env: &mut Env<'_>) {
        self.hops_tick(now, env);
        // The other racks' reports, read once if a subscriber there waits.
        let mut remote: Option<RemoteRacks> = None;
        let due: Vec<EventId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(mut p) = self.pending.remove(&id) else {
                continue;
            };
            let mut keep = BTreeMap::new();
            let floor = self.pending_floor(id.epoch).min(id.seq);
            let message = event_message(&id, &p.topic, &p.payload, true, self.addr, floor);
            let msg = envelope(message.clone());
            // Subscribers of other racks still waiting, by rack.
            let mut across: BTreeMap<Arc<str>, Vec<Arc<str>>> = BTreeMap::new();
            for (name, mut t) in std::mem::take(&mut p.targets) {
                if let Some(rack) = self.remote_rack(&name, env) {
                    let remote = remote.get_or_insert_with(|| RemoteRacks::read(env.store));
                    match self.remote_outcome((&name, &rack), &p, &t, remote, env) {
                        Some(outcome) => self.report(&id, name, outcome, t.attempts, Some(rack)),
                        None => {
                            t.resends += 1;
                            across.entry(rack).or_default().push(name.clone());
                            keep.insert(name, t);
                        }
                    }
                    continue;
                }
                let member = env.members.position(&name).map(|i| env.members.at(i));
                // Unknown members and topics (a publisher that just
                // restarted has not synced yet) are waited for, not judged.
                let unsubscribed = topics_value(env.store, &name).is_some() && !subscribes(env.store, &name, &p.topic);
                let gone = match member.map(|m| m.state) {
                    Some(MemberState::Failed) => Some(Outcome::SubscriberFailed),
                    Some(MemberState::Left) => Some(Outcome::SubscriberLeft),
                    Some(_) if unsubscribed => Some(Outcome::Unsubscribed),
                    _ if p.retry_max != 0 && t.resends >= p.retry_max => Some(Outcome::RetriesExhausted),
                    _ => None,
                };
                match gone {
                    Some(outcome) => self.report(&id, name, outcome, t.attempts, None),
                    None => {
                        if let Some(addr) = member.map(|m| m.addr()) {
                            env.out.send(addr, vec![msg.clone()]);
                            t.attempts += 1;
                        }
                        t.resends += 1;
                        keep.insert(name, t);
                    }
                }
            }
            for name in self.resend_across(&message, &across, env) {
                if let Some(t) = keep.get_mut(&name) {
                    t.attempts += 1;
                }
            }
            if keep.is_empty() {
                self.pending_bytes = self.pending_bytes.saturating_sub(p.payload.len());
            } else {
                p.targets = keep;
                p.next = crate::overlay::next_tick(p.next, p.retry_every, now);
                self.pending.insert(id, p);
            }
        }
    }

    /// At-least-once events still awaiting acknowledgements.
    pub(crate) fn pending_events(&self) -> Vec<PendingEvent> {
        self.pending.keys().filter_map(|id| self.pending_event(id)).collect()
    }

    /// Takes over an at-least-once event published before a restart (see
    /// [`crate::Overlay::resume`]).
    pub(crate) fn resume(&mut self, now: Instant, e: PendingEvent) -> Result<(), CoreError> {
        if *e.id.origin != *self.name {
            return Err(CoreError::Invalid(format!(
                "event {} was not published by this member",
                e.id
            )));
        }
        if e.retry_every.is_zero() || e.waiting.is_empty() {
            return Err(CoreError::Invalid(format!("event {} has nothing to resend", e.id)));
        }
        let targets = e
            .waiting
            .into_iter()
            .map(|(n, attempts, resends)| (n, Target { attempts, resends }))
            .collect();
        self.pending_bytes += e.payload.len();
        if let Some(old) = self.pending.insert(
            e.id,
            Pending {
                topic: e.topic,
                payload: e.payload,
                retry_every: e.retry_every,
                retry_max: e.retry_max,
                // One interval to rejoin and sync first.
                next: now + e.retry_every,
                targets,
            },
        ) {
            self.pending_bytes = self.pending_bytes.saturating_sub(old.payload.len());
        }
        Ok(())
    }

    pub(crate) fn set_manual_acks(&mut self, on: bool) {
        self.manual_acks = on;
    }

    pub(crate) fn mark_stored(&mut self, ids: &[EventId]) {
        for id in ids {
            self.acked.insert(&id.origin, id.epoch, id.seq);
        }
    }

    /// Refuses a delivered event (see [`crate::Overlay::refuse`]); false if
    /// it can no longer be forgotten.
    pub(crate) fn refuse(&mut self, id: &EventId) -> bool {
        if !self.seen.forget(&id.origin, id.epoch, id.seq) {
            return false;
        }
        self.unacked.remove(id);
        true
    }

    /// Acknowledges a delivered event to its publisher (manual mode).
    pub(crate) fn acknowledge(&mut self, id: &EventId, out: &mut Sender<'_>) {
        self.acked.insert(&id.origin, id.epoch, id.seq);
        if let Some(to) = self.unacked.remove(id) {
            out.send(to, vec![ack_envelope(id, &self.name, false, false)]);
        }
    }

    pub(crate) fn pending_event(&self, id: &EventId) -> Option<PendingEvent> {
        let p = self.pending.get(id)?;
        Some(PendingEvent {
            id: id.clone(),
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            retry_every: p.retry_every,
            retry_max: p.retry_max,
            waiting: p
                .targets
                .iter()
                .map(|(n, t)| (n.clone(), t.attempts, t.resends))
                .collect(),
        })
    }

    /// The de-duplication window to save (see
    /// [`crate::Overlay::delivered_window`]).
    pub(crate) fn delivered_window(&self) -> Vec<dedup::DedupEntry> {
        if self.manual_acks {
            self.acked.entries()
        } else {
            self.seen.entries()
        }
    }

    pub(crate) fn restore_delivered(&mut self, entries: impl IntoIterator<Item = dedup::DedupEntry>) {
        let entries: Vec<_> = entries.into_iter().collect();
        self.acked.restore(entries.clone());
        self.seen.restore(entries);
    }
}

/// A member's topics, as the local member knows them.
pub(crate) fn topics_of(store: &Store, member: &str) -> Vec<String> {
    topics_value(store, member).map(|t| t.0).unwrap_or_default()
}

/// The stored topics of `member`, if written by the member itself.
fn topics_value(store: &Store, member: &str) -> Option<Topics> {
    let key = ReservedKey::Topics {
        member: member.to_owned(),
    };
    let u = store.get(&key.key())?;
    if !reserved::from_owner(u) {
        return None;
    }
    Topics::decode(u.value.as_deref()?).ok()
}

/// The store write that makes `topics` the local member's.
fn topics_write(me: &str, topics: Vec<String>) -> (String, Vec<u8>) {
    let key = ReservedKey::Topics { member: me.to_owned() };
    (key.key(), Topics(topics).encode())
}

fn subscribes(store: &Store, member: &str, topic: &str) -> bool {
    topics_value(store, member).is_some_and(|t| t.lists(topic))
}
