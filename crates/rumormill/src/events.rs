//! The agent's side of events: durable publishing, delivery reports, the
//! inbox local applications read, and subscriptions.
//!
//! - **Publishing** an at-least-once event stores it (redb) before the
//!   request is answered; the record goes when every subscriber's report is
//!   final. After a restart the agent resumes the stored events under their
//!   original ids ([`rumormill_core::Overlay::resume`]).
//! - **Receiving**: the core runs with manual acknowledgements. Each event
//!   for a topic the agent subscribes to is appended to the overlay's
//!   *inbox* together with the de-duplication window, in one durable
//!   transaction, and only then acknowledged to its publisher — a crash in
//!   between makes the publisher resend it, and the restored window keeps
//!   it from being delivered twice.
//! - **The inbox** is an ordered log (sequence numbers from 1) of events,
//!   membership changes (`member.joined`, `member.suspect`,
//!   `member.failed`, `member.left`, `member.alive`), luggage changes
//!   (`luggage.changed`) and delivery reports (`delivery.report`) for the
//!   topics the agent subscribes to. Applications read it from a sequence
//!   number on (`?from=`), so one that reconnects misses nothing and sees
//!   nothing twice. The last [`INBOX_KEEP`] entries are kept, within a
//!   byte cap (`[overlay.limits] inbox_bytes`, 256 MiB by default): to make
//!   room, the oldest best-effort events and local-topic entries are
//!   evicted, then at-least-once events stored more than a day ago; an
//!   at-least-once event that still does not fit is refused — neither
//!   stored nor acknowledged, so its publisher resends it — unless the
//!   core can no longer take it back (it is far below the de-duplication
//!   floor, so the resend would be a duplicate): that one is stored over
//!   the cap (`inbox_over_cap`) rather than lost. A best-effort one that
//!   does not fit is dropped. All are counted. Each payload is stored
//!   once, as bytes; its text and base64 forms are made when it is read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use rumormill_core::events::{Delivery, DeliveryReport, EventId, EventMessage, PendingEvent, dedup::DedupEntry};
use rumormill_core::{Event, MemberChange};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::agent::{Agent, AgentError, has_left_or_unknown, stopped, wall, wall_ms};
use crate::driver::OverlayHandle;
use crate::persist::Op;
use crate::transport::Net;

/// Inbox entries kept per overlay.
pub const INBOX_KEEP: u64 = 100_000;
/// Most bytes of stored entries one read of the inbox returns (beyond its
/// first entry).
pub const INBOX_READ_BYTES: usize = 16 << 20;
/// How long the reports of a completed event are kept (pruned every
/// thousand at-least-once publications).
pub const REPORTS_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Topics handled by the agent itself, never gossiped.
pub const LOCAL_TOPICS: [&str; 7] = [
    "member.joined",
    "member.suspect",
    "member.failed",
    "member.left",
    "member.alive",
    "luggage.changed",
    "delivery.report",
];

/// One entry of the inbox, as applications receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboxItem {
    /// Position in the inbox (from 1): reconnect with `from` = the last one seen.
    pub seq: u64,
    /// The topic (an application topic, or one of the local ones).
    pub topic: String,
    /// Event id (`publisher/epoch/seq`) for events and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The payload as text, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// The member concerned (membership and luggage changes, reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The changed luggage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A report's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Wall-clock milliseconds when the agent stored it.
    pub time_ms: u64,
    /// On the live feed: the payload was left out (too large to keep in
    /// the feed's buffer); read the entry from the store.
    #[serde(skip)]
    pub(crate) elided: bool,
}

/// An inbox entry as stored: the item without its payload fields, and
/// the payload bytes once.
#[derive(Debug, Serialize, Deserialize)]
struct StoredHeader {
    #[serde(flatten)]
    item: InboxItem,
    /// An at-least-once event (never evicted for the byte cap before a day).
    #[serde(default)]
    alo: bool,
    /// Whether a payload follows the header.
    #[serde(default)]
    has_payload: bool,
}

/// Marks the stored form (a JSON entry of earlier versions starts with `{`).
const STORED_MAGIC: &[u8; 4] = b"\0RI1";

/// Counters of an overlay's inbox.
#[derive(Debug, Default)]
pub(crate) struct InboxCounters {
    /// Best-effort and local-topic entries evicted or not stored for the byte cap.
    pub(crate) evicted: std::sync::atomic::AtomicU64,
    /// At-least-once events refused (not acknowledged) for the byte cap.
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// At-least-once events stored over the byte cap because they could
    /// not be refused (too old for the de-duplication window to take back).
    pub(crate) over_cap: std::sync::atomic::AtomicU64,
}

/// Payloads up to this size travel in the live feed; larger ones are read
/// from the store by the followers, so that the feed's buffer (its last
/// 4,096 entries) holds at most a few megabytes.
const FEED_INLINE: usize = 1024;

/// At-least-once entries younger than this are not evicted for the byte cap.
const ALO_KEEP_MS: u64 = 24 * 3600 * 1000;

/// Encodes an entry: header, then the payload bytes.
fn encode_stored(item: &InboxItem, payload: Option<&[u8]>, alo: bool) -> Vec<u8> {
    let header = StoredHeader {
        item: InboxItem {
            payload: None,
            payload_base64: None,
            ..item.clone()
        },
        alo,
        has_payload: payload.is_some(),
    };
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let p = payload.unwrap_or_default();
    let mut out = Vec::with_capacity(8 + h.len() + p.len());
    out.extend_from_slice(STORED_MAGIC);
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(p);
    out
}

/// Decodes a stored entry, with its payload rendered, and whether it is an
/// at-least-once event. Entries of earlier versions (JSON) count as
/// at-least-once when they carry an event id on an application topic.
fn decode_stored(bytes: &[u8]) -> Option<(InboxItem, bool)> {
    let Some(rest) = bytes.strip_prefix(STORED_MAGIC) else {
        let item: InboxItem = serde_json::from_slice(bytes).ok()?;
        let alo = item.id.is_some() && !is_local(&item.topic);
        return Some((item, alo));
    };
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let header: StoredHeader = serde_json::from_slice(rest.get(4..4usize.checked_add(len)?)?).ok()?;
    let mut item = header.item;
    if header.has_payload {
        let (text, b64) = payload_fields(rest.get(4 + len..)?);
        item.payload = text;
        item.payload_base64 = b64;
    }
    Some((item, header.alo))
}

/// What the pump knows of the stored inbox, to keep it within its byte cap.
#[derive(Debug, Default)]
struct InboxIndex {
    /// Best-effort events and local topics: seq → stored bytes.
    evictable: BTreeMap<u64, u64>,
    /// At-least-once events: seq → (stored bytes, time stored).
    durable: BTreeMap<u64, (u64, u64)>,
    evictable_bytes: u64,
    bytes: u64,
}

impl InboxIndex {
    fn add(&mut self, seq: u64, len: u64, alo: bool, time_ms: u64) {
        if alo {
            self.durable.insert(seq, (len, time_ms));
        } else {
            self.evictable.insert(seq, len);
            self.evictable_bytes += len;
        }
        self.bytes += len;
    }

    /// Forgets entries below `below` (the count retention).
    fn trim(&mut self, below: u64) {
        let keep = self.evictable.split_off(&below);
        for (_, l) in std::mem::replace(&mut self.evictable, keep) {
            self.evictable_bytes -= l;
            self.bytes -= l;
        }
        let keep = self.durable.split_off(&below);
        for (_, (l, _)) in std::mem::replace(&mut self.durable, keep) {
            self.bytes -= l;
        }
    }

    /// Makes room for `len` more bytes within `cap`: the entries to delete,
    /// or `None` (nothing evicted) when even evicting all it may would
    /// not make room.
    fn make_room(&mut self, len: u64, cap: u64, now_ms: u64) -> Option<Vec<u64>> {
        if self.bytes + len <= cap {
            return Some(Vec::new());
        }
        let old: u64 = self
            .durable
            .values()
            .take_while(|(_, t)| now_ms.saturating_sub(*t) >= ALO_KEEP_MS)
            .map(|(l, _)| *l)
            .sum();
        if self.bytes - self.evictable_bytes - old + len > cap {
            return None;
        }
        let mut gone = Vec::new();
        while self.bytes + len > cap {
            if let Some((s, l)) = self.evictable.pop_first() {
                self.evictable_bytes -= l;
                self.bytes -= l;
                gone.push(s);
            } else if let Some((s, (l, _))) = self.durable.pop_first() {
                self.bytes -= l;
                gone.push(s);
            } else {
                break;
            }
        }
        Some(gone)
    }
}

/// How an event is delivered, in API terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeliverySpec {
    /// Spread once; no reports.
    BestEffort,
    /// Resent until acknowledged; a report per subscriber.
    AtLeastOnce {
        /// Time between resends, e.g. `1s` (default 1s).
        #[serde(default = "default_retry_every")]
        retry_every: String,
        /// Resends at most; 0 (default): until delivered or the subscriber is gone.
        #[serde(default)]
        retry_max: u32,
    },
}

fn default_retry_every() -> String {
    "1s".into()
}

impl DeliverySpec {
    /// The core's form.
    pub fn to_core(&self) -> Result<Delivery, AgentError> {
        Ok(match self {
            DeliverySpec::BestEffort => Delivery::BestEffort,
            DeliverySpec::AtLeastOnce { retry_every, retry_max } => {
                let every = crate::config::parse_duration(retry_every).map_err(AgentError::BadRequest)?;
                if every < Duration::from_millis(10) {
                    return Err(AgentError::BadRequest("retry_every must be at least 10ms".into()));
                }
                Delivery::AtLeastOnce {
                    retry_every: every,
                    retry_max: *retry_max,
                }
            }
        })
    }
}

/// One subscriber's state for an at-least-once event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriberReport {
    /// The subscriber.
    pub member: String,
    /// `pending`, `delivered`, `retries_exhausted`, `failed`, `left` or `unsubscribed`.
    pub outcome: String,
    /// Direct sends by the publisher.
    pub attempts: u32,
}

/// A published event and its reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// `publisher/epoch/seq`.
    pub id: String,
    /// Topic.
    pub topic: String,
    /// `best_effort` or `at_least_once`.
    pub delivery: String,
    /// Wall-clock milliseconds of publication.
    pub published_ms: u64,
    /// Subscribers known at publication (at-least-once).
    pub subscribers: Vec<SubscriberReport>,
    /// Whether every report is final.
    pub complete: bool,
}

/// A pending event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPending {
    origin: String,
    epoch: u64,
    seq: u64,
    topic: String,
    payload: String,
    retry_every_ms: u64,
    retry_max: u32,
    waiting: Vec<(String, u32, u32)>,
}

impl StoredPending {
    fn from_core(p: &PendingEvent) -> StoredPending {
        StoredPending {
            origin: p.id.origin.to_string(),
            epoch: p.id.epoch,
            seq: p.id.seq,
            topic: p.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&p.payload),
            retry_every_ms: u64::try_from(p.retry_every.as_millis()).unwrap_or(u64::MAX),
            retry_max: p.retry_max,
            waiting: p.waiting.iter().map(|(n, a, r)| (n.to_string(), *a, *r)).collect(),
        }
    }

    fn to_core(&self) -> Option<PendingEvent> {
        Some(PendingEvent {
            id: EventId {
                origin: self.origin.as_str().into(),
                epoch: self.epoch,
                seq: self.seq,
            },
            topic: self.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD.decode(&self.payload).ok()?,
            retry_every: Duration::from_millis(self.retry_every_ms),
            retry_max: self.retry_max,
            waiting: self
                .waiting
                .iter()
                .map(|(n, a, r)| (n.as_str().into(), *a, *r))
                .collect(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredDedup {
    origin: String,
    epoch: u64,
    floor: u64,
    above: Vec<u64>,
}

/// Live inbox entries of one overlay, for connected applications.
pub(crate) type InboxFeed = broadcast::Sender<Arc<InboxItem>>;

fn payload_fields(p: &[u8]) -> (Option<String>, Option<String>) {
    (
        std::str::from_utf8(p).ok().map(str::to_owned),
        Some(base64::engine::general_purpose::STANDARD.encode(p)),
    )
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Whether a topic is one of the agent's local ones.
pub fn is_local(topic: &str) -> bool {
    LOCAL_TOPICS.contains(&topic)
}

impl<N: Net> Agent<N> {
    /// Publishes an event; an at-least-once one is stored before this returns.
    pub async fn publish(
        &self,
        name: &str,
        topic: &str,
        payload: Vec<u8>,
        delivery: &DeliverySpec,
    ) -> Result<EventRecord, AgentError> {
        if is_local(topic) {
            return Err(AgentError::BadRequest(format!(
                "topic {topic:?} is the agent's own: it cannot be published"
            )));
        }
        let d = delivery.to_core()?;
        let handle = self.handle(name).await?;
        let _guard = self.events_lock.lock().await;
        let topic_owned = topic.to_owned();
        let (id, pending) = handle
            .call(move |o, now| {
                let id = o.publish(now, &topic_owned, payload, d)?;
                let pending = o.pending_event(&id);
                Ok::<_, rumormill_core::CoreError>((id, pending))
            })
            .await
            .map_err(|_| stopped(name))?
            .map_err(crate::agent::core_error)?;
        let record = EventRecord {
            id: id.to_string(),
            topic: topic.to_owned(),
            delivery: match d {
                Delivery::BestEffort => "best_effort",
                Delivery::AtLeastOnce { .. } => "at_least_once",
            }
            .into(),
            published_ms: wall_ms(),
            subscribers: pending
                .iter()
                .flat_map(|p| p.waiting.iter())
                .map(|(n, a, _)| SubscriberReport {
                    member: n.to_string(),
                    outcome: "pending".into(),
                    attempts: *a,
                })
                .collect(),
            complete: pending.is_none(),
        };
        if let Delivery::AtLeastOnce { .. } = d {
            let mut ops = vec![Op::PutReport(record.id.clone(), json(&record))];
            if let Some(p) = &pending {
                ops.push(Op::PutPending(record.id.clone(), json(&StoredPending::from_core(p))));
            }
            self.db.write(name, &ops)?;
            if id.seq % 1000 == 0 {
                self.prune_reports(name);
            }
        }
        Ok(record)
    }

    /// Forgets the reports of events whose every report is final and that
    /// are older than [`REPORTS_KEEP`].
    fn prune_reports(&self, name: &str) {
        let cutoff = wall_ms().saturating_sub(u64::try_from(REPORTS_KEEP.as_millis()).unwrap_or(u64::MAX));
        let keep =
            |v: &[u8]| serde_json::from_slice::<EventRecord>(v).is_ok_and(|r| !r.complete || r.published_ms >= cutoff);
        if let Err(e) = self.db.retain_reports(name, keep) {
            tracing::warn!(overlay = %name, error = %e, "old reports not pruned");
        }
    }

    /// A published event and its reports (at-least-once events only).
    pub async fn event(&self, name: &str, id: &str) -> Result<EventRecord, AgentError> {
        has_left_or_unknown(self, name).await?;
        let bytes = self
            .db
            .report(name, id)?
            .ok_or_else(|| AgentError::NotFound(format!("no at-least-once event {id:?} published by this agent")))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::BadRequest(format!("stored report unreadable: {e}")))
    }

    /// The agent's topics in an overlay.
    pub async fn subscriptions(&self, name: &str) -> Result<Vec<String>, AgentError> {
        let overlays = self.overlays.lock().await;
        let r = overlays
            .get(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        Ok(r.record.topics.clone())
    }

    /// Subscribes the agent to topics (kept across restarts).
    pub async fn subscribe(&self, name: &str, topics: &[String]) -> Result<Vec<String>, AgentError> {
        for t in topics {
            rumormill_core::events::subscriptions::check_topic(t).map_err(AgentError::BadRequest)?;
        }
        let mut overlays = self.overlays.lock().await;
        let r = crate::agent::running_mut(&mut overlays, name)?;
        let gossiped: Vec<String> = topics.iter().filter(|t| !is_local(t)).cloned().collect();
        r.handle
            .call(move |o, now| {
                let wall = wall();
                gossiped.iter().try_for_each(|t| o.subscribe(now, wall, t))
            })
            .await
            .map_err(|_| stopped(name))?
            .map_err(crate::agent::core_error)?;
        let mut all: BTreeSet<String> = r.record.topics.iter().cloned().collect();
        all.extend(topics.iter().cloned());
        r.record.topics = all.into_iter().collect();
        self.db.put_overlay(&r.record)?;
        r.share_topics();
        Ok(r.record.topics.clone())
    }

    /// Unsubscribes the agent from a topic.
    pub async fn unsubscribe(&self, name: &str, topic: &str) -> Result<Vec<String>, AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = crate::agent::running_mut(&mut overlays, name)?;
        if !r.record.topics.iter().any(|t| t == topic) {
            return Err(AgentError::NotFound(format!(
                "the agent does not subscribe to {topic:?}"
            )));
        }
        let t = topic.to_owned();
        r.handle
            .call(move |o, now| o.unsubscribe(now, wall(), &t))
            .await
            .map_err(|_| stopped(name))?
            .map_err(crate::agent::core_error)?;
        r.record.topics.retain(|x| x != topic);
        self.db.put_overlay(&r.record)?;
        r.share_topics();
        Ok(r.record.topics.clone())
    }

    /// Inbox entries after `after`, at most `limit` and — beyond the first
    /// — at most 16 MiB of them.
    pub async fn inbox(&self, name: &str, after: u64, limit: usize) -> Result<Vec<InboxItem>, AgentError> {
        has_left_or_unknown(self, name).await?;
        Ok(self
            .db
            .inbox_after(name, after, limit, INBOX_READ_BYTES)?
            .into_iter()
            .filter_map(|(_, v)| decode_stored(&v).map(|(item, _)| item))
            .collect())
    }

    /// The last inbox sequence number, and the live feed from there on.
    pub(crate) async fn inbox_feed(
        &self,
        name: &str,
    ) -> Result<(u64, broadcast::Receiver<Arc<InboxItem>>), AgentError> {
        let overlays = self.overlays.lock().await;
        let r = overlays
            .get(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        let rx = r.feed.subscribe();
        Ok((self.db.inbox_last(name)?, rx))
    }

    /// What an overlay must know before its driver handles anything:
    /// the saved de-duplication window, the agent's topics, the pending
    /// events to resume (see [`Restore::apply`]).
    pub(crate) fn prepare_restore(&self, name: &str, topics: &[String]) -> Result<Restore, AgentError> {
        let window: Vec<StoredDedup> = match self.db.dedup(name)? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => Vec::new(),
        };
        let pending: Vec<PendingEvent> = self
            .db
            .pending(name)?
            .iter()
            .filter_map(|b| serde_json::from_slice::<StoredPending>(b).ok()?.to_core())
            .collect();
        Ok(Restore {
            window,
            pending,
            topics: topics.iter().filter(|t| !is_local(t)).cloned().collect(),
        })
    }
}

/// See [`Agent::prepare_restore`].
pub(crate) struct Restore {
    window: Vec<StoredDedup>,
    pending: Vec<PendingEvent>,
    topics: Vec<String>,
}

impl Restore {
    /// Manual acknowledgements, the window, the topics, the pending events —
    /// on a fresh overlay, before its first packet: an event that arrives
    /// first must find it subscribed and remembering.
    pub(crate) fn apply(self, o: &mut rumormill_core::Overlay, now: std::time::Instant) {
        o.set_manual_acks(true);
        o.restore_delivered(self.window.into_iter().map(|w| DedupEntry {
            origin: w.origin.into(),
            epoch: w.epoch,
            floor: w.floor,
            above: w.above,
        }));
        let wall = wall();
        for t in &self.topics {
            let _ = o.subscribe(now, wall, t);
        }
        let resumed = self.pending.len();
        for p in self.pending {
            let _ = o.resume(now, p);
        }
        if resumed > 0 {
            tracing::info!(member = %o.name(), events = resumed, "resumed at-least-once events awaiting reports");
        }
    }
}

/// Moves the overlay's events into the inbox and the report records,
/// durably, then acknowledges the delivered ones. Runs while the overlay does.
/// Inbox sequence numbers reserved at a time.
const INBOX_RESERVE: u64 = 100_000;
/// How long inbox entries of best-effort events may stay unflushed.
const VOLATILE_FOR: Duration = Duration::from_secs(1);

pub(crate) async fn pump<N: Net>(
    agent: std::sync::Weak<Agent<N>>,
    name: String,
    handle: OverlayHandle,
    topics: Arc<std::sync::Mutex<Vec<String>>>,
    feed: InboxFeed,
    counters: Arc<InboxCounters>,
    cap: u64,
) {
    let Some(mut stream) = handle.take_event_stream() else {
        return;
    };
    let mut index = InboxIndex::default();
    let mut next_seq = match agent.upgrade() {
        Some(a) => {
            let scanned = a.db.inbox_scan(&name, |seq, v| {
                let (alo, time) = decode_stored(v).map_or((true, 0), |(it, alo)| (alo, it.time_ms));
                index.add(seq, v.len() as u64, alo, time);
            });
            if let Err(e) = scanned {
                tracing::warn!(overlay = %name, error = %e, "inbox not measured");
            }
            a.db.inbox_next(&name).unwrap_or(1)
        }
        None => return,
    };
    // Sequence numbers below `reserved` may be handed out; the reservation
    // is written durably before any of them is, so that entries a crash
    // loses (best-effort ones) leave a gap, never a number used twice.
    let mut reserved = next_seq;
    // When the last volatile write must be flushed by.
    let mut flush_by: Option<std::time::Instant> = None;
    loop {
        let first = tokio::select! {
            e = stream.recv() => e,
            () = crate::driver::sleep_until(flush_by) => {
                flush_by = None;
                if let Some(agent) = agent.upgrade() {
                    let _guard = agent.events_lock.lock().await;
                    if let Err(e) = agent.db.write(&name, &[]) {
                        tracing::warn!(overlay = %name, error = %e, "inbox not flushed");
                    }
                }
                continue;
            }
        };
        let Some(first) = first else {
            if flush_by.is_some()
                && let Some(agent) = agent.upgrade()
                && let Err(e) = agent.db.write(&name, &[])
            {
                tracing::warn!(overlay = %name, error = %e, "inbox not flushed");
            }
            return;
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match stream.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let Some(agent) = agent.upgrade() else { return };
        let wanted: Vec<String> = topics.lock().map(|t| t.clone()).unwrap_or_default();
        let subscribed = |t: &str| wanted.iter().any(|w| w == t);
        let mut items: Vec<Incoming> = Vec::new();
        let mut reports: Vec<DeliveryReport> = Vec::new();
        // Best-effort events and local topics need no flush to disk: a
        // crash may lose the last second of them.
        let mut durable = false;
        for e in batch {
            let item = |topic: &str| InboxItem {
                seq: 0,
                topic: topic.to_owned(),
                id: None,
                payload: None,
                payload_base64: None,
                member: None,
                key: None,
                outcome: None,
                time_ms: wall_ms(),
                elided: false,
            };
            let plain = |item: InboxItem| Incoming {
                item,
                payload: None,
                alo: false,
                ack: None,
            };
            match e {
                Event::Message(EventMessage {
                    id,
                    topic,
                    payload,
                    at_least_once,
                }) => {
                    items.push(Incoming {
                        item: InboxItem {
                            id: Some(id.to_string()),
                            member: Some(id.origin.to_string()),
                            ..item(&topic)
                        },
                        payload: Some(payload),
                        alo: at_least_once,
                        ack: Some(id),
                    });
                }
                Event::Report(r) => {
                    if subscribed("delivery.report") {
                        items.push(plain(InboxItem {
                            id: Some(r.id.to_string()),
                            member: Some(r.subscriber.to_string()),
                            outcome: Some(r.outcome.as_str().into()),
                            ..item("delivery.report")
                        }));
                    }
                    reports.push(r);
                }
                Event::Member { change, member } => {
                    let topic = match change {
                        MemberChange::Joined => "member.joined",
                        MemberChange::Suspect => "member.suspect",
                        MemberChange::Failed => "member.failed",
                        MemberChange::Left => "member.left",
                        MemberChange::Alive => "member.alive",
                        _ => continue,
                    };
                    if subscribed(topic) {
                        items.push(plain(InboxItem {
                            member: Some(member.name.to_string()),
                            ..item(topic)
                        }));
                    }
                }
                Event::Update(u) => {
                    if let Some((member, key)) = rumormill_core::luggage::changed(&u.update) {
                        if subscribed("luggage.changed") {
                            items.push(Incoming {
                                payload: u.update.value.clone(),
                                ..plain(InboxItem {
                                    member: Some(member),
                                    key: Some(key.to_owned()),
                                    ..item("luggage.changed")
                                })
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut acks: Vec<EventId> = Vec::new();
        let mut stored: Vec<InboxItem> = Vec::with_capacity(items.len());
        let now_ms = wall_ms();
        for mut inc in items {
            inc.item.seq = next_seq;
            let bytes = encode_stored(&inc.item, inc.payload.as_deref(), inc.alo);
            match index.make_room(bytes.len() as u64, cap, now_ms) {
                Some(gone) => {
                    let evicted = gone.len() as u64;
                    counters.evicted.fetch_add(evicted, Ordering::Relaxed);
                    ops.extend(gone.into_iter().map(Op::DeleteInbox));
                }
                None => {
                    // No room without evicting recent at-least-once events.
                    match inc.ack.clone() {
                        Some(id) if inc.alo => {
                            // Refused, to be resent, unless the core cannot
                            // take it back (far below its de-duplication
                            // floor: the resend would be a duplicate). Then
                            // it is stored over the cap rather than lost.
                            let back = id.clone();
                            let taken_back = handle.call(move |o, _| o.refuse(&back)).await.unwrap_or(false);
                            if taken_back {
                                counters.refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            counters.over_cap.fetch_add(1, Ordering::Relaxed);
                        }
                        // Best effort: not stored; nothing to resend.
                        Some(id) => {
                            counters.evicted.fetch_add(1, Ordering::Relaxed);
                            acks.push(id);
                            continue;
                        }
                        None => {
                            counters.evicted.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
            }
            next_seq += 1;
            durable |= inc.alo;
            index.add(inc.item.seq, bytes.len() as u64, inc.alo, inc.item.time_ms);
            ops.push(Op::Inbox(inc.item.seq, bytes));
            if let Some(id) = inc.ack {
                acks.push(id);
            }
            let mut item = inc.item;
            match inc.payload {
                Some(p) if p.len() <= FEED_INLINE => {
                    let (text, b64) = payload_fields(&p);
                    item.payload = text;
                    item.payload_base64 = b64;
                }
                Some(_) => item.elided = true,
                None => {}
            }
            stored.push(item);
        }
        if next_seq > reserved {
            reserved = next_seq + INBOX_RESERVE;
            ops.push(Op::ReserveInbox(reserved));
            durable = true;
        }
        if next_seq > INBOX_KEEP && stored.iter().any(|it| it.seq % 1000 == 0) {
            ops.push(Op::TrimInbox(next_seq - INBOX_KEEP));
            index.trim(next_seq - INBOX_KEEP);
        }
        if !acks.is_empty() {
            // The window saved with these events includes exactly them and
            // what was stored before: never one that is not in the inbox.
            let ids = acks.clone();
            let window = handle
                .call(move |o, _| {
                    o.mark_stored(&ids);
                    o.delivered_window()
                })
                .await
                .unwrap_or_default();
            let stored: Vec<StoredDedup> = window
                .into_iter()
                .map(|w| StoredDedup {
                    origin: w.origin.to_string(),
                    epoch: w.epoch,
                    floor: w.floor,
                    above: w.above,
                })
                .collect();
            ops.push(Op::Dedup(json(&stored)));
        }
        if !ops.is_empty() || !reports.is_empty() {
            let _guard = agent.events_lock.lock().await;
            ops.extend(report_ops(&agent, &name, &reports));
            // Until stored, nothing is acknowledged: keep trying (the core
            // holds these events as delivered, so a resend would not bring
            // them back).
            durable |= !reports.is_empty();
            let write = |ops: &[Op]| {
                if durable {
                    agent.db.write(&name, ops)
                } else {
                    agent.db.write_volatile(&name, ops)
                }
            };
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = write(&ops) {
                tracing::error!(overlay = %name, error = %e, "events not stored yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            if durable {
                flush_by = None;
            } else if flush_by.is_none() {
                flush_by = Some(std::time::Instant::now() + VOLATILE_FOR);
            }
        }
        if !acks.is_empty() {
            let _ = handle
                .call(move |o, _| {
                    for id in &acks {
                        o.acknowledge(id);
                    }
                })
                .await;
        }
        for it in stored {
            let _ = feed.send(Arc::new(it));
        }
    }
}

/// An entry on its way into the inbox.
struct Incoming {
    item: InboxItem,
    payload: Option<Vec<u8>>,
    alo: bool,
    /// The event to acknowledge once stored.
    ack: Option<EventId>,
}

/// Updates the stored records of the reported events.
fn report_ops<N: Net>(agent: &Agent<N>, name: &str, reports: &[DeliveryReport]) -> Vec<Op> {
    let mut by_event: BTreeMap<String, Vec<&DeliveryReport>> = BTreeMap::new();
    for r in reports {
        by_event.entry(r.id.to_string()).or_default().push(r);
    }
    let mut ops = Vec::new();
    for (id, rs) in by_event {
        let Ok(Some(bytes)) = agent.db.report(name, &id) else {
            continue;
        };
        let Ok(mut record) = serde_json::from_slice::<EventRecord>(&bytes) else {
            continue;
        };
        for r in rs {
            match record.subscribers.iter_mut().find(|s| s.member == *r.subscriber) {
                Some(s) => {
                    s.outcome = r.outcome.as_str().into();
                    s.attempts = r.attempts;
                }
                None => record.subscribers.push(SubscriberReport {
                    member: r.subscriber.to_string(),
                    outcome: r.outcome.as_str().into(),
                    attempts: r.attempts,
                }),
            }
        }
        record.complete = record.subscribers.iter().all(|s| s.outcome != "pending");
        if record.complete {
            ops.push(Op::DeletePending(id.clone()));
        } else if let Some(mut p) = agent
            .db
            .pending_one(name, &id)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<StoredPending>(&b).ok())
        {
            let waiting: BTreeSet<&str> = record
                .subscribers
                .iter()
                .filter(|s| s.outcome == "pending")
                .map(|s| s.member.as_str())
                .collect();
            p.waiting.retain(|(n, _, _)| waiting.contains(n.as_str()));
            ops.push(Op::PutPending(id.clone(), json(&p)));
        }
        ops.push(Op::PutReport(id, json(&record)));
    }
    ops
}
