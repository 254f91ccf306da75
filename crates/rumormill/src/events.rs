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
//!   `member.failed`, `member.left`, `member.alive`, and `member.updated`
//!   for a member that restarted or moved to a new address), luggage changes
//!   (`luggage.changed`), delivery reports (`delivery.report`) and racks
//!   (`rack.gateway_changed`: a rack has a new gateway, with its term;
//!   `rack.unreachable`, `rack.reachable`: the gateways' pool lost or found
//!   a rack's gateway again) for the topics the agent subscribes to. Applications read it from a sequence
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
use std::time::Duration;

use base64::Engine;
use rumormill_core::events::{Delivery, DeliveryReport, PendingEvent, dedup::DedupEntry};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::agent::{Agent, AgentError, exists, stopped, wall, wall_ms};
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
pub const LOCAL_TOPICS: [&str; 11] = [
    "member.joined",
    "member.suspect",
    "member.failed",
    "member.left",
    "member.alive",
    "member.updated",
    "luggage.changed",
    "delivery.report",
    "rack.gateway_changed",
    "rack.unreachable",
    "rack.reachable",
];

/// One entry of the inbox, as applications receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboxItem {
    /// Position in the inbox (from 1): reconnect with `from` = the last one seen.
    pub seq: u64,
    /// The topic: an application topic, or one of the local ones —
    /// `member.joined`, `member.suspect`, `member.failed`, `member.left`,
    /// `member.alive`, `member.updated` (a member restarted or moved to a
    /// new address), `luggage.changed`, `delivery.report`,
    /// `rack.gateway_changed`, `rack.unreachable`, `rack.reachable`.
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
    /// The rack concerned (`rack.*` topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// The new gateway's Raft term (`rack.gateway_changed`; the gateway
    /// is `member`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// Wall-clock milliseconds when the agent stored it.
    pub time_ms: u64,
    /// On the live feed: the payload was left out (too large to keep in
    /// the feed's buffer); read the entry from the store.
    #[serde(skip)]
    pub(crate) elided: bool,
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
                let every = crate::config::parse_duration(retry_every).map_err(AgentError::InvalidDelivery)?;
                if every < Duration::from_millis(10) {
                    return Err(AgentError::InvalidDelivery("retry_every must be at least 10ms".into()));
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

pub(crate) fn payload_fields(p: &[u8]) -> (Option<String>, Option<String>) {
    (
        std::str::from_utf8(p).ok().map(str::to_owned),
        Some(base64::engine::general_purpose::STANDARD.encode(p)),
    )
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
            return Err(AgentError::LocalTopic(topic.to_owned()));
        }
        let d = delivery.to_core()?;
        let (handle, writes) = {
            let r = self.lock_running(name).await?;
            (r.handle.clone(), r.writes.clone())
        };
        // Held from before the core publishes (the pump stores the event's
        // reports after its record, never before) until the record is
        // written, a cancelled request included: a delete or restart of
        // the overlay waits for it.
        let passage = writes.enter().await.ok_or_else(|| stopped(name))?;
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
            let mut ops = vec![Op::PutReport(record.clone())];
            if let Some(p) = pending {
                ops.push(Op::PutPending(p));
            }
            self.db.write_holding(name, ops, true, passage).await?;
            if id.seq % 1000 == 0 {
                self.prune_reports(name).await;
            }
        }
        Ok(record)
    }

    /// Forgets the reports of events whose every report is final and that
    /// are older than [`REPORTS_KEEP`].
    async fn prune_reports(&self, name: &str) {
        let cutoff = wall_ms().saturating_sub(u64::try_from(REPORTS_KEEP.as_millis()).unwrap_or(u64::MAX));
        let keep = move |r: &EventRecord| !r.complete || r.published_ms >= cutoff;
        if let Err(e) = self.db.retain_reports(name, keep).await {
            tracing::warn!(overlay = %name, error = %e, "old reports not pruned");
        }
    }

    /// A published event and its reports (at-least-once events only).
    pub async fn event(&self, name: &str, id: &str) -> Result<EventRecord, AgentError> {
        exists(self, name).await?;
        self.db
            .report(name, id)?
            .ok_or_else(|| AgentError::UnknownEvent(id.to_owned()))
    }

    /// The agent's topics in an overlay.
    pub async fn subscriptions(&self, name: &str) -> Result<Vec<String>, AgentError> {
        Ok(self.lock(name).await?.record.topics.clone())
    }

    /// Subscribes the agent to topics (kept across restarts).
    pub async fn subscribe(&self, name: &str, topics: &[String]) -> Result<Vec<String>, AgentError> {
        for t in topics {
            rumormill_core::events::subscriptions::check_topic(t).map_err(AgentError::InvalidTopic)?;
        }
        let mut r = self.lock_running(name).await?;
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
        // In memory first (see `RecordSave`), saved without the slot.
        r.share_topics();
        let (save, now) = (r.record_save(), r.record.topics.clone());
        drop(r);
        save.write(&self.db).await?;
        Ok(now)
    }

    /// Unsubscribes the agent from a topic.
    pub async fn unsubscribe(&self, name: &str, topic: &str) -> Result<Vec<String>, AgentError> {
        let mut r = self.lock_running(name).await?;
        if !r.record.topics.iter().any(|t| t == topic) {
            return Err(AgentError::NotSubscribed(topic.to_owned()));
        }
        let t = topic.to_owned();
        r.handle
            .call(move |o, now| o.unsubscribe(now, wall(), &t))
            .await
            .map_err(|_| stopped(name))?
            .map_err(crate::agent::core_error)?;
        r.record.topics.retain(|x| x != topic);
        r.share_topics();
        let (save, now) = (r.record_save(), r.record.topics.clone());
        drop(r);
        save.write(&self.db).await?;
        Ok(now)
    }

    /// Inbox entries after `after`, at most `limit` and — beyond the first
    /// — at most 16 MiB of them.
    pub async fn inbox(&self, name: &str, after: u64, limit: usize) -> Result<Vec<InboxItem>, AgentError> {
        exists(self, name).await?;
        Ok(self.db.inbox_after(name, after, limit, INBOX_READ_BYTES)?)
    }

    /// The last inbox sequence number, and the live feed from there on.
    pub(crate) async fn inbox_feed(
        &self,
        name: &str,
    ) -> Result<(u64, broadcast::Receiver<Arc<InboxItem>>), AgentError> {
        let rx = self.lock(name).await?.feed.subscribe();
        Ok((self.db.inbox_last(name)?, rx))
    }

    /// What an overlay must know before its driver handles anything:
    /// the saved de-duplication window, the agent's topics, the pending
    /// events to resume (see [`Restore::apply`]).
    pub(crate) fn prepare_restore(&self, name: &str, topics: &[String]) -> Result<Restore, AgentError> {
        Ok(Restore {
            window: self.db.dedup(name)?,
            pending: self.db.pending(name)?,
            topics: topics.iter().filter(|t| !is_local(t)).cloned().collect(),
        })
    }
}

/// See [`Agent::prepare_restore`].
pub(crate) struct Restore {
    window: Vec<DedupEntry>,
    pending: Vec<PendingEvent>,
    topics: Vec<String>,
}

impl Restore {
    /// Manual acknowledgements, the window, the topics, the pending events —
    /// on a fresh overlay, before its first packet: an event that arrives
    /// first must find it subscribed and remembering.
    pub(crate) fn apply(self, o: &mut rumormill_core::Overlay, now: std::time::Instant) {
        o.set_manual_acks(true);
        o.restore_delivered(self.window);
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

/// Delivery reports by the id of their event.
pub(crate) fn by_event(reports: &[DeliveryReport]) -> BTreeMap<String, Vec<&DeliveryReport>> {
    let mut by_event: BTreeMap<String, Vec<&DeliveryReport>> = BTreeMap::new();
    for r in reports {
        by_event.entry(r.id.to_string()).or_default().push(r);
    }
    by_event
}

/// Takes an event's reports into its record (see [`crate::persist::Op::Reports`],
/// which does it inside the transaction that stores them).
pub(crate) fn merge_reports(record: &mut EventRecord, reports: &[&DeliveryReport]) {
    for r in reports {
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
}

/// Keeps in a pending event only the subscribers its record still has
/// pending (for an incomplete record; a complete one's event goes).
pub(crate) fn still_waiting(record: &EventRecord, p: &mut PendingEvent) {
    let waiting: BTreeSet<&str> = record
        .subscribers
        .iter()
        .filter(|s| s.outcome == "pending")
        .map(|s| s.member.as_str())
        .collect();
    p.waiting.retain(|(n, _, _)| waiting.contains(n.as_ref()));
}
