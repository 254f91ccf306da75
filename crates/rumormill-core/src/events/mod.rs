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

pub mod dedup;
pub mod subscriptions;
pub mod tree;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumormill_wire::proto::{self, Envelope, envelope::Body};

use crate::membership::MemberState;
use crate::overlay::{CoreError, Overlay};
use crate::reserved::{self, ReservedKey, Topics};
use crate::wall::WallTime;

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
}

impl Outcome {
    /// A short name: `delivered`, `retries_exhausted`, `failed`, `left`,
    /// `unsubscribed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::RetriesExhausted => "retries_exhausted",
            Outcome::SubscriberFailed => "failed",
            Outcome::SubscriberLeft => "left",
            Outcome::Unsubscribed => "unsubscribed",
        }
    }
}

/// An event for the local application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
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
    /// Direct sends made by the publisher (the first push included).
    pub attempts: u32,
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

/// The event state of one member.
#[derive(Debug, Default)]
pub(crate) struct Events {
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
    pub(crate) seen: dedup::Dedup,
    /// Relay copies awaiting their relay acknowledgement, by event and
    /// receiver.
    hops: BTreeMap<(EventId, Arc<str>), HopSent>,
    /// Own best-effort events still on their way: seq and publication time.
    recent: std::collections::VecDeque<(u64, Instant)>,
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

impl Events {
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let resend = self.pending.values().map(|p| p.next).min();
        let hop = self.hops.values().map(|h| h.next).min();
        resend.into_iter().chain(hop).min()
    }
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

impl Overlay {
    /// Subscribes the local member to `topic`; every member learns it.
    pub fn subscribe(&mut self, now: Instant, wall: WallTime, topic: &str) -> Result<(), CoreError> {
        subscriptions::check_topic(topic).map_err(CoreError::Invalid)?;
        let mut topics = self.subscriptions();
        if topics.iter().any(|t| t == topic) {
            return Ok(());
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
        self.write_topics(now, wall, topics)
    }

    /// Unsubscribes the local member from `topic`.
    pub fn unsubscribe(&mut self, now: Instant, wall: WallTime, topic: &str) -> Result<(), CoreError> {
        let mut topics = self.subscriptions();
        let before = topics.len();
        topics.retain(|t| t != topic);
        if topics.len() == before {
            return Ok(());
        }
        self.write_topics(now, wall, topics)
    }

    fn write_topics(&mut self, now: Instant, wall: WallTime, topics: Vec<String>) -> Result<(), CoreError> {
        let key = ReservedKey::Topics {
            member: self.me.name.to_string(),
        };
        self.put(now, wall, &key.key(), Topics(topics).encode()).map(|_| ())
    }

    /// The local member's topics.
    pub fn subscriptions(&self) -> Vec<String> {
        self.topics_of(&self.me.name)
    }

    /// A member's topics, as the local member knows them.
    pub fn topics_of(&self, member: &str) -> Vec<String> {
        self.topics_value(member).map(|t| t.0).unwrap_or_default()
    }

    /// The stored topics of `member`, if written by the member itself.
    fn topics_value(&self, member: &str) -> Option<Topics> {
        let key = ReservedKey::Topics {
            member: member.to_owned(),
        };
        let u = self.store().get(&key.key())?;
        if !reserved::from_owner(u) {
            return None;
        }
        Topics::decode(u.value.as_deref()?).ok()
    }

    fn subscribes(&self, member: &str, topic: &str) -> bool {
        self.topics_value(member).is_some_and(|t| t.lists(topic))
    }

    /// The live members subscribed to `topic`, the local one included,
    /// with their addresses.
    pub fn subscribers(&self, topic: &str) -> Vec<(Arc<str>, SocketAddr)> {
        let mut out = Vec::new();
        if self.subscribes(&self.me.name, topic) {
            out.push((self.me.name.clone(), self.me.addr));
        }
        let every = ReservedKey::Topics { member: String::new() }.key();
        for u in self.store().prefixed(&every) {
            let Some(ReservedKey::Topics { member: name }) = reserved::owned(u) else {
                continue;
            };
            // Written by the member itself, listing the topic, and not us.
            let lists = u
                .value
                .as_deref()
                .and_then(|v| Topics::decode(v).ok())
                .is_some_and(|t| t.lists(topic));
            if name == *self.me.name || !lists {
                continue;
            }
            if let Some(i) = self.members.position(&name) {
                let m = self.members.at(i);
                if m.state.is_live() {
                    out.push((m.name.clone(), m.addr()));
                }
            }
        }
        out
    }

    /// Publishes `payload` on `topic` to its subscribers (see [`crate::events`]).
    pub fn publish(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Vec<u8>,
        delivery: Delivery,
    ) -> Result<EventId, CoreError> {
        if self.is_leaving() {
            return Err(CoreError::Left);
        }
        subscriptions::check_topic(topic).map_err(CoreError::Invalid)?;
        if payload.len() > self.config.max_event_payload {
            return Err(CoreError::Invalid(format!(
                "payload of {} bytes: at most {}",
                payload.len(),
                self.config.max_event_payload
            )));
        }
        if let Delivery::AtLeastOnce { retry_every, .. } = delivery {
            if retry_every.is_zero() {
                return Err(CoreError::Invalid("retry_every must be above zero".into()));
            }
            if self.pubsub.pending.len() >= MAX_PENDING || self.pubsub.pending_bytes + payload.len() > MAX_PENDING_BYTES
            {
                return Err(CoreError::Invalid(format!(
                    "{MAX_PENDING} at-least-once events are still awaiting acknowledgements"
                )));
            }
        }
        self.pubsub.next_seq += 1;
        let id = EventId {
            origin: self.me.name.clone(),
            epoch: self.me.epoch,
            seq: self.pubsub.next_seq,
        };
        let remote: Vec<(Arc<str>, SocketAddr)> = self
            .subscribers(topic)
            .into_iter()
            .filter(|(n, _)| *n != self.me.name)
            .collect();
        let ack = matches!(delivery, Delivery::AtLeastOnce { .. });
        let recent = &mut self.pubsub.recent;
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
        if self.subscribes(&self.me.name, topic) {
            self.pubsub.seen.insert(&id.origin, id.epoch, id.seq);
            self.deliver(EventMessage {
                id: id.clone(),
                topic: topic.to_owned(),
                payload: payload.clone(),
                at_least_once: ack,
            });
            if ack && self.pubsub.manual_acks {
                // The local application is a subscriber like the others: its
                // copy counts once it is stored (`acknowledge` sends the ack
                // to ourselves), and a crash before that resends it.
                self.pubsub.unacked.insert(id.clone(), self.me.addr);
                targets.insert(
                    self.me.name.clone(),
                    Target {
                        attempts: 1,
                        resends: 0,
                    },
                );
            }
        }
        let floor = self.pending_floor(id.epoch).min(id.seq);
        let message = event_message(&id, topic, &payload, ack, self.me.addr, floor);
        let direct = self.relay(now, &id, &message, tree::Span::WHOLE, &[]);
        for (name, _) in remote {
            let attempts = u32::from(direct.contains(&name));
            targets.insert(name, Target { attempts, resends: 0 });
        }
        if let Delivery::AtLeastOnce { retry_every, retry_max } = delivery {
            if !targets.is_empty() {
                self.pubsub.pending_bytes += payload.len();
                self.pubsub.pending.insert(
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
    ) -> Vec<Arc<str>> {
        let me = tree::ring_position(&self.me.name);
        let members: Vec<(Arc<str>, SocketAddr)> = self
            .subscribers(&message.topic)
            .into_iter()
            .filter(|(n, _)| *n != self.me.name && *n != id.origin && !unresponsive.contains(n))
            .collect();
        let hops = tree::split(span, me, members, self.config.event_relay_fanout, &mut self.rng);
        let mut sent = Vec::with_capacity(hops.len());
        for hop in hops {
            self.send_hop(now, id, message, &hop, unresponsive);
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
    ) {
        let mut copy = message.clone();
        copy.relay = Some(proto::Span {
            first: hop.span.first,
            last: hop.span.last,
            acknowledge: true,
        });
        // Envelope and packet framing: a few bytes.
        let fits = prost::Message::encoded_len(&copy) + 16 <= self.datagram_budget();
        let key = (id.clone(), hop.name.clone());
        let track = fits && (self.pubsub.hops.len() < tree::MAX_HOPS || self.pubsub.hops.contains_key(&key));
        if let Some(span) = copy.relay.as_mut() {
            span.acknowledge = track;
        }
        self.stats.events_relayed += 1;
        if track {
            self.pubsub.hops.insert(
                key,
                HopSent {
                    addr: hop.addr,
                    span: hop.span,
                    attempts: 1,
                    next: now + self.config.event_hop_timeout,
                    event: Box::new(copy.clone()),
                    unresponsive: unresponsive.to_vec(),
                },
            );
        }
        self.send(hop.addr, vec![envelope(copy)]);
    }

    /// Resends relay copies not acknowledged in time; after
    /// [`tree::HOP_ATTEMPTS`] copies, relays the receiver's span without it.
    fn hops_tick(&mut self, now: Instant) {
        let due: Vec<(EventId, Arc<str>)> = self
            .pubsub
            .hops
            .iter()
            .filter(|(_, h)| h.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(h) = self.pubsub.hops.remove(&key) else {
                continue;
            };
            let (id, name) = key;
            if h.attempts < tree::HOP_ATTEMPTS {
                self.stats.event_hop_resends += 1;
                let copy = (*h.event).clone();
                self.pubsub.hops.insert(
                    (id, name),
                    HopSent {
                        attempts: h.attempts + 1,
                        next: now + self.config.event_hop_timeout,
                        ..h
                    },
                );
                self.send(h.addr, vec![envelope(copy)]);
            } else {
                self.stats.event_hop_takeovers += 1;
                let mut message = *h.event;
                message.relay = None;
                let mut unresponsive = h.unresponsive;
                unresponsive.push(name);
                self.relay(now, &id, &message, h.span, &unresponsive);
            }
        }
    }

    fn deliver(&mut self, m: EventMessage) {
        self.stats.events_delivered += 1;
        self.events.push_back(crate::Event::Message(m));
    }

    fn report(&mut self, id: &EventId, subscriber: Arc<str>, outcome: Outcome, attempts: u32) {
        self.events.push_back(crate::Event::Report(DeliveryReport {
            id: id.clone(),
            subscriber,
            outcome,
            attempts,
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
        let recent = self
            .pubsub
            .recent
            .front()
            .filter(|_| epoch == self.me.epoch)
            .map(|(seq, _)| *seq);
        self.pubsub
            .pending
            .keys()
            .filter(|id| id.epoch == epoch && *id.origin == *self.me.name)
            .map(|id| id.seq)
            .chain(recent)
            .min()
            .unwrap_or(self.pubsub.next_seq + 1)
    }

    pub(crate) fn on_event(&mut self, now: Instant, from: SocketAddr, e: proto::Event) {
        self.stats.events_received += 1;
        self.stats.event_payload_bytes_received += e.payload.len() as u64;
        let (Some(id), Ok(reply_to)) = (
            EventId::from_proto(e.id.as_ref()),
            rumormill_wire::socket_addr(e.reply_to.as_ref()),
        ) else {
            self.stats.malformed += 1;
            return;
        };
        if subscriptions::check_topic(&e.topic).is_err() || e.payload.len() > self.config.max_event_payload {
            self.stats.malformed += 1;
            return;
        }
        let subscribed = self.subscribes(&self.me.name, &e.topic);
        // What the publisher has settled need not be remembered any more.
        let settled = e.pending_floor.saturating_sub(1).min(id.seq.saturating_sub(1));
        self.pubsub.seen.advance(&id.origin, id.epoch, settled);
        self.pubsub.acked.advance(&id.origin, id.epoch, settled);
        let insert = if subscribed {
            self.pubsub.seen.insert(&id.origin, id.epoch, id.seq)
        } else {
            dedup::Insert::Seen
        };
        if insert == dedup::Insert::Full {
            // Not delivered, not acknowledged: resent once the window has room.
            self.stats.events_refused += 1;
            return;
        }
        let first = insert == dedup::Insert::New;
        if let Some(span) = e.relay {
            // The relay acknowledgement goes back even for a duplicate (the
            // first one may have been lost). A member that does not
            // subscribe relays what it is given all the same.
            if span.acknowledge {
                self.send(from, vec![ack_envelope(&id, &self.me.name, false, true)]);
            }
            if (first || !subscribed) && span.first <= span.last {
                let span = tree::Span {
                    first: span.first,
                    last: span.last,
                };
                self.relay(now, &id, &e, span, &[]);
            }
        }
        if first {
            self.deliver(EventMessage {
                id: id.clone(),
                topic: e.topic,
                payload: e.payload,
                at_least_once: e.ack,
            });
        } else if subscribed {
            self.stats.events_duplicate += 1;
        }
        if e.ack {
            if subscribed && self.pubsub.manual_acks {
                // Acknowledged when the application says it has it (a
                // duplicate before then changes nothing).
                if first || self.pubsub.unacked.contains_key(&id) {
                    self.pubsub.unacked.insert(id, reply_to);
                    return;
                }
            }
            self.send(reply_to, vec![ack_envelope(&id, &self.me.name, !subscribed, false)]);
        }
    }

    pub(crate) fn on_event_ack(&mut self, from: SocketAddr, a: proto::EventAck) {
        let Some(id) = EventId::from_proto(a.id.as_ref()) else {
            self.stats.malformed += 1;
            return;
        };
        // Only the subscriber itself may acknowledge: the datagram must come
        // from its host.
        let sender_ok = if a.from == *self.me.name {
            from.ip() == self.me.addr.ip()
        } else {
            self.members
                .position(&a.from)
                .is_some_and(|i| self.members.at(i).addr().ip() == from.ip())
        };
        if !sender_ok {
            self.stats.malformed += 1;
            return;
        }
        if a.relay {
            self.pubsub.hops.remove(&(id, Arc::from(a.from.as_str())));
            return;
        }
        let Some(p) = self.pubsub.pending.get_mut(&id) else {
            return;
        };
        let Some((name, t)) = p.targets.remove_entry(a.from.as_str()) else {
            return;
        };
        if p.targets.is_empty() {
            if let Some(done) = self.pubsub.pending.remove(&id) {
                self.pubsub.pending_bytes = self.pubsub.pending_bytes.saturating_sub(done.payload.len());
            }
        }
        let outcome = if a.unsubscribed {
            Outcome::Unsubscribed
        } else {
            Outcome::Delivered
        };
        self.report(&id, name, outcome, t.attempts.max(1));
    }

    /// Resends relay copies and unacknowledged at-least-once events;
    /// reports subscribers that are gone.
    pub(crate) fn events_tick(&mut self, now: Instant) {
        self.hops_tick(now);
        let due: Vec<EventId> = self
            .pubsub
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(mut p) = self.pubsub.pending.remove(&id) else {
                continue;
            };
            let mut keep = BTreeMap::new();
            let floor = self.pending_floor(id.epoch).min(id.seq);
            let msg = envelope(event_message(&id, &p.topic, &p.payload, true, self.me.addr, floor));
            for (name, mut t) in std::mem::take(&mut p.targets) {
                let member = self.members.position(&name).map(|i| self.members.at(i));
                // Unknown members and topics (a publisher that just
                // restarted has not synced yet) are waited for, not judged.
                let unsubscribed = self.topics_value(&name).is_some() && !self.subscribes(&name, &p.topic);
                let gone = match member.map(|m| m.state) {
                    Some(MemberState::Failed) => Some(Outcome::SubscriberFailed),
                    Some(MemberState::Left) => Some(Outcome::SubscriberLeft),
                    Some(_) if unsubscribed => Some(Outcome::Unsubscribed),
                    _ if p.retry_max != 0 && t.resends >= p.retry_max => Some(Outcome::RetriesExhausted),
                    _ => None,
                };
                match gone {
                    Some(outcome) => self.report(&id, name, outcome, t.attempts),
                    None => {
                        if let Some(addr) = member.map(|m| m.addr()) {
                            self.send(addr, vec![msg.clone()]);
                            t.attempts += 1;
                        }
                        t.resends += 1;
                        keep.insert(name, t);
                    }
                }
            }
            if keep.is_empty() {
                self.pubsub.pending_bytes = self.pubsub.pending_bytes.saturating_sub(p.payload.len());
            } else {
                p.targets = keep;
                p.next = crate::overlay::next_tick(p.next, p.retry_every, now);
                self.pubsub.pending.insert(id, p);
            }
        }
    }

    /// At-least-once events still awaiting acknowledgements: what a
    /// driver saves to resume them after a restart ([`Overlay::resume`]).
    pub fn pending_events(&self) -> Vec<PendingEvent> {
        self.pubsub
            .pending
            .keys()
            .filter_map(|id| self.pending_event(id))
            .collect()
    }

    /// Takes over an at-least-once event published before a restart: it
    /// keeps its id (so subscribers that have it do not deliver it again)
    /// and is resent to the subscribers still waiting one `retry_every`
    /// later (time to rejoin and sync).
    pub fn resume(&mut self, now: Instant, e: PendingEvent) -> Result<(), CoreError> {
        if *e.id.origin != *self.me.name {
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
        self.pubsub.pending_bytes += e.payload.len();
        if let Some(old) = self.pubsub.pending.insert(
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
            self.pubsub.pending_bytes = self.pubsub.pending_bytes.saturating_sub(old.payload.len());
        }
        Ok(())
    }

    /// With manual acknowledgements on, a delivered event is acknowledged
    /// to its publisher only once the application calls
    /// [`Overlay::acknowledge`] — after storing it durably, say — so that a
    /// crash in between makes the publisher resend it instead of losing it.
    pub fn set_manual_acks(&mut self, on: bool) {
        self.pubsub.manual_acks = on;
    }

    /// Records that the application has stored these delivered events
    /// (manual mode): they join the window [`Overlay::delivered_window`]
    /// returns. Save that window with them, then [`Overlay::acknowledge`].
    pub fn mark_stored(&mut self, ids: &[EventId]) {
        for id in ids {
            self.pubsub.acked.insert(&id.origin, id.epoch, id.seq);
        }
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
        if !self.pubsub.seen.forget(&id.origin, id.epoch, id.seq) {
            return false;
        }
        self.pubsub.unacked.remove(id);
        true
    }

    /// Acknowledges a delivered event to its publisher (manual mode).
    pub fn acknowledge(&mut self, id: &EventId) {
        self.pubsub.acked.insert(&id.origin, id.epoch, id.seq);
        if let Some(to) = self.pubsub.unacked.remove(id) {
            self.send(to, vec![ack_envelope(id, &self.me.name, false, false)]);
        }
    }

    /// One pending at-least-once event (see [`Overlay::pending_events`]).
    pub fn pending_event(&self, id: &EventId) -> Option<PendingEvent> {
        let p = self.pubsub.pending.get(id)?;
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

    /// The de-duplication window to save across a restart: with manual
    /// acknowledgements, the events the application has stored (never one
    /// it has not: that one must be delivered again); otherwise every event
    /// delivered.
    pub fn delivered_window(&self) -> Vec<dedup::DedupEntry> {
        if self.pubsub.manual_acks {
            self.pubsub.acked.entries()
        } else {
            self.pubsub.seen.entries()
        }
    }

    /// Restores a saved de-duplication window: those events are not
    /// delivered again.
    pub fn restore_delivered(&mut self, entries: impl IntoIterator<Item = dedup::DedupEntry>) {
        let entries: Vec<_> = entries.into_iter().collect();
        self.pubsub.acked.restore(entries.clone());
        self.pubsub.seen.restore(entries);
    }
}
