//! The inbox writer: the agent's event pump, which takes every event the
//! core delivers (through the driver's lossless event stream) into the
//! overlay's inbox, durably, before acknowledging it. One pump runs per
//! overlay, while the overlay does, in three parts:
//!
//! 1. [`to_inbox`] turns a batch of core events into inbox entries: the
//!    events of the agent's topics, and the local topics it subscribes to
//!    — membership changes (one exhaustive table, [`member_topic`]),
//!    luggage changes, delivery reports.
//! 2. [`InboxWriter`] hands out sequence numbers, reserving them durably
//!    ahead so that none is ever used twice; keeps the inbox within its
//!    byte cap, refusing at-least-once events that do not fit (the core
//!    takes them back, so they are resent); and stores the batch, with the
//!    de-duplication window and the publisher's report records, in one
//!    transaction — flushed to disk when it holds an at-least-once event or
//!    a report, else within [`VOLATILE_FOR`]. A failed commit is retried,
//!    never skipped.
//! 3. [`acknowledge`] tells the core what was stored; only then are the
//!    entries handed to the live feed of connected applications.
//!
//! The pump waits for the disk (the commits run on blocking threads, see
//! [`crate::persist::Db`]); the driver never waits for the pump.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumormill_core::events::{DeliveryReport, Event, EventId};
use rumormill_core::racks::{RackNotification, RaftRecord};
use rumormill_core::{MemberChange, Notification};
use tokio::sync::{broadcast, mpsc};

use crate::agent::{Agent, WriteGate, wall_ms};
use crate::driver::OverlayHandle;
use crate::events::{INBOX_KEEP, InboxItem, payload_fields};
use crate::persist::{Db, EncodedEntry, Op};
use crate::transport::Net;

/// Live inbox entries of one overlay, for connected applications.
pub(crate) type InboxFeed = broadcast::Sender<Arc<InboxItem>>;

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
/// Inbox sequence numbers reserved at a time.
const INBOX_RESERVE: u64 = 100_000;
/// How long inbox entries of best-effort events may stay unflushed.
pub(crate) const VOLATILE_FOR: Duration = Duration::from_secs(1);
/// Most core events taken into one batch.
const BATCH: usize = 256;

/// Runs the pump of one overlay until its event stream ends (the overlay
/// stopped) or the agent is gone.
pub(crate) async fn pump<N: Net>(
    agent: std::sync::Weak<Agent<N>>,
    name: String,
    handle: OverlayHandle,
    topics: Arc<std::sync::Mutex<Vec<String>>>,
    feed: InboxFeed,
    setup: WriterSetup,
) {
    let Some(mut stream) = handle.take_event_stream() else {
        return;
    };
    let Some(db) = agent.upgrade().map(|a| a.db.clone()) else {
        return;
    };
    let mut writer = InboxWriter::open(&db, name, setup).await;
    drop(db);
    loop {
        let first = tokio::select! {
            e = stream.recv() => e,
            () = crate::driver::sleep_until(writer.flush_by) => {
                if let Some(agent) = agent.upgrade() {
                    writer.flush(&agent).await;
                }
                continue;
            }
        };
        let Some(first) = first else {
            if let Some(agent) = agent.upgrade() {
                writer.flush_if_due(&agent).await;
            }
            return;
        };
        let mut batch = take_batch(first, &mut stream);
        let Some(agent) = agent.upgrade() else { return };
        if let Some(record) = latest_raft(&mut batch) {
            writer.save_raft(&agent, &handle, record).await;
        }
        let wanted: Vec<String> = topics.lock().map(|t| t.clone()).unwrap_or_default();
        let (entries, reports) = to_inbox(batch, &wanted);
        let stored = writer.store(&agent, &handle, entries, reports).await;
        acknowledge(&handle, stored.acks).await;
        for item in stored.entries {
            let _ = feed.send(Arc::new(item));
        }
    }
}

/// `first` and whatever else is already waiting, up to [`BATCH`] events.
fn take_batch(first: Notification, stream: &mut mpsc::UnboundedReceiver<Notification>) -> Vec<Notification> {
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match stream.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
    batch
}

/// Takes the Raft records out of `batch` and returns the latest: it holds
/// the whole durable state, so saving it saves those before it too.
fn latest_raft(batch: &mut Vec<Notification>) -> Option<RaftRecord> {
    let mut latest: Option<RaftRecord> = None;
    batch.retain(|n| match n {
        Notification::Raft(r) => {
            if latest.as_ref().is_none_or(|l| l.seq < r.seq) {
                latest = Some(r.clone());
            }
            false
        }
        _ => true,
    });
    latest
}

/// The local topic of each racks notification (see [`member_topic`]), and
/// the member it names (a rack's new gateway).
pub(crate) fn rack_topic(n: &RackNotification) -> Option<(&'static str, &str, Option<&str>)> {
    Some(match n {
        RackNotification::GatewayChanged { rack, gateway, .. } => ("rack.gateway_changed", rack, Some(gateway)),
        RackNotification::Unreachable { rack } => ("rack.unreachable", rack, None),
        RackNotification::Reachable { rack } => ("rack.reachable", rack, None),
        // A kind of notice a newer core tells of: no topic for it yet.
        _ => return None,
    })
}

/// The local topic of each membership change. One arm per change and no
/// default: a new kind of change cannot be dropped unnoticed.
pub(crate) fn member_topic(change: MemberChange) -> &'static str {
    match change {
        MemberChange::Joined => "member.joined",
        MemberChange::Suspect => "member.suspect",
        MemberChange::Failed => "member.failed",
        MemberChange::Left => "member.left",
        MemberChange::Alive => "member.alive",
        MemberChange::Updated => "member.updated",
    }
}

/// An entry on its way into the inbox.
pub(crate) struct Incoming {
    item: InboxItem,
    payload: Option<Vec<u8>>,
    /// An at-least-once event (flushed at once, kept a day under the cap).
    alo: bool,
    /// The event to acknowledge once stored.
    ack: Option<EventId>,
}

impl Incoming {
    /// An entry of `topic` without payload, stamped now.
    fn local(topic: &str) -> Incoming {
        Incoming {
            item: InboxItem {
                seq: 0,
                topic: topic.to_owned(),
                id: None,
                payload: None,
                payload_base64: None,
                member: None,
                key: None,
                outcome: None,
                rack: None,
                term: None,
                time_ms: wall_ms(),
                elided: false,
            },
            payload: None,
            alo: false,
            ack: None,
        }
    }
}

/// Part 1: the inbox entries a batch of core events makes, for the topics
/// in `subscribed` (events reach the pump only for the agent's topics;
/// local topics are filtered here), and the delivery reports for the
/// publisher's records (kept whether or not `delivery.report` is
/// subscribed).
pub(crate) fn to_inbox(batch: Vec<Notification>, subscribed: &[String]) -> (Vec<Incoming>, Vec<DeliveryReport>) {
    let wants = |t: &str| subscribed.iter().any(|w| w == t);
    let mut entries = Vec::new();
    let mut reports = Vec::new();
    for e in batch {
        match e {
            Notification::Event(Event {
                id,
                topic,
                payload,
                at_least_once,
            }) => {
                let mut entry = Incoming::local(&topic);
                entry.item.id = Some(id.to_string());
                entry.item.member = Some(id.origin.to_string());
                entry.payload = Some(payload);
                entry.alo = at_least_once;
                entry.ack = Some(id);
                entries.push(entry);
            }
            Notification::Report(r) => {
                if wants("delivery.report") {
                    let mut entry = Incoming::local("delivery.report");
                    entry.item.id = Some(r.id.to_string());
                    entry.item.member = Some(r.subscriber.to_string());
                    entry.item.outcome = Some(r.outcome.as_str().into());
                    entries.push(entry);
                }
                reports.push(r);
            }
            Notification::Member { change, member } => {
                let topic = member_topic(change);
                if wants(topic) {
                    let mut entry = Incoming::local(topic);
                    entry.item.member = Some(member.name.to_string());
                    entries.push(entry);
                }
            }
            Notification::Update(u) => {
                if let Some((member, key)) = rumormill_core::luggage::changed(&u.update)
                    && wants("luggage.changed")
                {
                    let mut entry = Incoming::local("luggage.changed");
                    entry.item.member = Some(member);
                    entry.item.key = Some(key.to_owned());
                    entry.payload = u.update.value.clone();
                    entries.push(entry);
                }
            }
            Notification::Rack(r) => {
                if let Some((topic, rack, gateway)) = rack_topic(&r)
                    && wants(topic)
                {
                    let mut entry = Incoming::local(topic);
                    entry.item.rack = Some(rack.to_owned());
                    entry.item.member = gateway.map(str::to_owned);
                    if let RackNotification::GatewayChanged { term, .. } = r {
                        entry.item.term = Some(term);
                    }
                    entries.push(entry);
                }
            }
            // Not for the inbox: the first sync after a join (the start
            // waits for it), key rotation (the keyring watcher's), Raft
            // records (saved by the pump before the batch, see
            // [`latest_raft`]).
            Notification::StoreSynced | Notification::Keys(_) | Notification::Raft(_) => {}
        }
    }
    (entries, reports)
}

/// What a batch left once stored: the events to acknowledge and the
/// entries for the live feed.
pub(crate) struct Stored {
    acks: Vec<EventId>,
    entries: Vec<InboxItem>,
}

/// What an [`InboxWriter`] is opened with, besides its overlay.
pub(crate) struct WriterSetup {
    /// The inbox's byte cap.
    pub(crate) cap: u64,
    /// Where it counts what the cap evicted and refused.
    pub(crate) counters: Arc<InboxCounters>,
    /// The gate of the overlay life's writes.
    pub(crate) writes: WriteGate,
}

/// Part 2: appends to one overlay's inbox (see the module's documentation).
pub(crate) struct InboxWriter {
    name: String,
    index: InboxIndex,
    cap: u64,
    counters: Arc<InboxCounters>,
    /// The gate of this overlay life's writes (see [`WriteGate`]).
    writes: WriteGate,
    /// The next sequence number to hand out.
    next_seq: u64,
    /// Sequence numbers below this one may be handed out: the reservation
    /// is written durably before any of them is, so that entries a crash
    /// loses (best-effort ones) leave a gap, never a number used twice.
    reserved: u64,
    /// When the last volatile write must be flushed by.
    flush_by: Option<std::time::Instant>,
}

/// The part of a batch admitted into the inbox, before it is stored.
struct Admitted {
    ops: Vec<Op>,
    acks: Vec<EventId>,
    entries: Vec<InboxItem>,
    /// Whether the write must be flushed to disk at once.
    durable: bool,
}

impl InboxWriter {
    /// A writer that continues the stored inbox of `name`. The scan of
    /// its entries (up to [`INBOX_KEEP`] headers) runs on a blocking
    /// thread.
    pub(crate) async fn open(db: &Db, name: String, setup: WriterSetup) -> InboxWriter {
        let WriterSetup { cap, counters, writes } = setup;
        let scan = {
            let (db, name) = (db.clone(), name.clone());
            tokio::task::spawn_blocking(move || {
                let mut index = InboxIndex::default();
                let scanned = db.inbox_scan(&name, |e| index.add(e.seq, e.len, e.alo, e.time_ms));
                (index, scanned)
            })
        };
        let index = match scan.await {
            Ok((index, Ok(()))) => index,
            Ok((index, Err(e))) => {
                tracing::warn!(overlay = %name, error = %e, "inbox not measured");
                index
            }
            Err(e) => {
                tracing::warn!(overlay = %name, error = %e, "inbox not measured: its thread failed");
                InboxIndex::default()
            }
        };
        // Without it, numbers could be handed out twice: wait for it.
        let mut backoff = Duration::from_millis(50);
        let next_seq = loop {
            let read = {
                let (db, name) = (db.clone(), name.clone());
                tokio::task::spawn_blocking(move || db.inbox_next(&name))
                    .await
                    .unwrap_or_else(|e| Err(db_thread_failed(&e)))
            };
            match read {
                Ok(n) => break n,
                Err(e) => {
                    tracing::error!(overlay = %name, error = %e, "inbox position not read yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        InboxWriter {
            name,
            index,
            cap,
            counters,
            writes,
            next_seq,
            reserved: next_seq,
            flush_by: None,
        }
    }

    /// Saves a Raft record durably, then tells the core, which lets out
    /// the messages that waited for it (Raft's rule: a vote or an entry is
    /// on disk before anyone hears of it). A failed commit is retried; once
    /// the overlay's gate is closed nothing is saved and nothing let out.
    pub(crate) async fn save_raft<N: Net>(&mut self, agent: &Agent<N>, handle: &OverlayHandle, record: RaftRecord) {
        let seq = record.seq;
        let ops: Arc<[Op]> = vec![Op::Raft(record)].into();
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(passage) = self.writes.enter().await else {
                return;
            };
            match agent.db.write_holding(&self.name, ops.clone(), true, passage).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(overlay = %self.name, error = %e, "Raft state not stored yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = handle.call(move |o, now| o.raft_persisted(now, seq)).await;
    }

    /// Flushes the volatile writes made so far to disk.
    async fn flush<N: Net>(&mut self, agent: &Agent<N>) {
        self.flush_by = None;
        let Some(passage) = self.writes.enter().await else {
            return;
        };
        if let Err(e) = agent.db.write_holding(&self.name, Vec::new(), true, passage).await {
            tracing::warn!(overlay = %self.name, error = %e, "inbox not flushed");
        }
    }

    /// Flushes if volatile writes wait for it (the overlay is stopping).
    async fn flush_if_due<N: Net>(&mut self, agent: &Agent<N>) {
        if self.flush_by.is_some() {
            self.flush(agent).await;
        }
    }

    /// Stores `entries` (what fits) and the report records of `reports`.
    pub(crate) async fn store<N: Net>(
        &mut self,
        agent: &Agent<N>,
        handle: &OverlayHandle,
        entries: Vec<Incoming>,
        reports: Vec<DeliveryReport>,
    ) -> Stored {
        let mut admitted = self.admit(handle, entries).await;
        if !admitted.acks.is_empty() {
            let Some(window) = window_op(handle, &admitted.acks).await else {
                // The overlay stopped: store no entry, acknowledge nothing.
                // The publishers resend, and the window saved last, which
                // holds none of these, lets them in once at the next start.
                // Their numbers stay a gap; what the batch reserved and
                // evicted, and the reports, are stored all the same.
                let index = &mut self.index;
                admitted.ops.retain(|op| match op {
                    Op::Inbox(seq, _) => {
                        index.forget(*seq);
                        false
                    }
                    _ => true,
                });
                if !admitted.ops.is_empty() || !reports.is_empty() {
                    self.commit(agent, admitted.ops, reports, true).await;
                }
                return Stored {
                    acks: Vec::new(),
                    entries: Vec::new(),
                };
            };
            admitted.ops.push(window);
        }
        if !admitted.ops.is_empty() || !reports.is_empty() {
            self.commit(agent, admitted.ops, reports, admitted.durable).await;
        }
        Stored {
            acks: admitted.acks,
            entries: admitted.entries,
        }
    }

    /// Numbers the entries and makes room for them under the byte cap;
    /// what does not fit is refused (at-least-once: taken back by the core,
    /// to be resent) or dropped (best effort, local topics).
    async fn admit(&mut self, handle: &OverlayHandle, entries: Vec<Incoming>) -> Admitted {
        let mut out = Admitted {
            ops: Vec::new(),
            acks: Vec::new(),
            entries: Vec::with_capacity(entries.len()),
            // Best-effort events and local topics need no flush to disk: a
            // crash may lose the last second of them.
            durable: false,
        };
        let now_ms = wall_ms();
        for mut inc in entries {
            inc.item.seq = self.next_seq;
            let bytes = EncodedEntry::new(&inc.item, inc.payload.as_deref(), inc.alo);
            match self.index.make_room(bytes.size() as u64, self.cap, now_ms) {
                Some(gone) => {
                    self.counters.evicted.fetch_add(gone.len() as u64, Ordering::Relaxed);
                    out.ops.extend(gone.into_iter().map(Op::DeleteInbox));
                }
                // No room without evicting recent at-least-once events.
                None => match inc.ack.clone() {
                    Some(id) if inc.alo => {
                        // Refused, to be resent, unless the core cannot
                        // take it back (far below its de-duplication
                        // floor: the resend would be a duplicate). Then
                        // it is stored over the cap rather than lost.
                        let back = id.clone();
                        let taken_back = handle.call(move |o, _| o.refuse(&back)).await.unwrap_or(false);
                        if taken_back {
                            self.counters.refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        self.counters.over_cap.fetch_add(1, Ordering::Relaxed);
                    }
                    // Best effort: not stored; nothing to resend.
                    Some(id) => {
                        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                        out.acks.push(id);
                        continue;
                    }
                    None => {
                        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
            }
            self.next_seq += 1;
            out.durable |= inc.alo;
            self.index
                .add(inc.item.seq, bytes.size() as u64, inc.alo, inc.item.time_ms);
            out.ops.push(Op::Inbox(inc.item.seq, bytes));
            if let Some(id) = inc.ack {
                out.acks.push(id);
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
            out.entries.push(item);
        }
        if self.next_seq > self.reserved {
            self.reserved = self.next_seq + INBOX_RESERVE;
            out.ops.push(Op::ReserveInbox(self.reserved));
            out.durable = true;
        }
        if self.next_seq > INBOX_KEEP && out.entries.iter().any(|it| it.seq % 1000 == 0) {
            out.ops.push(Op::TrimInbox(self.next_seq - INBOX_KEEP));
            self.index.trim(self.next_seq - INBOX_KEEP);
        }
        out
    }

    /// Stores `ops` and the report records in one transaction, retrying
    /// until it commits: nothing is acknowledged before, and the core holds
    /// these events as delivered, so a resend would not bring them back.
    /// Each attempt passes the overlay's [`WriteGate`] (not held while
    /// waiting to retry); once the gate is closed — the overlay deleted or
    /// restarted — nothing more is stored.
    async fn commit<N: Net>(
        &mut self,
        agent: &Agent<N>,
        mut ops: Vec<Op>,
        reports: Vec<DeliveryReport>,
        durable: bool,
    ) {
        let durable = durable || !reports.is_empty();
        if !reports.is_empty() {
            ops.push(Op::Reports(reports));
        }
        let ops: Arc<[Op]> = ops.into();
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(passage) = self.writes.enter().await else {
                return;
            };
            match agent.db.write_holding(&self.name, ops.clone(), durable, passage).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(overlay = %self.name, error = %e, "events not stored yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if durable {
            self.flush_by = None;
        } else if self.flush_by.is_none() {
            self.flush_by = Some(std::time::Instant::now() + VOLATILE_FOR);
        }
    }
}

/// The error of a database read whose blocking thread failed.
fn db_thread_failed(e: &tokio::task::JoinError) -> crate::persist::PersistError {
    crate::persist::PersistError::Io {
        path: std::path::PathBuf::from(crate::persist::DB_FILE),
        reason: format!("the read's thread failed: {e}"),
    }
}

/// Marks `acks` stored in the core and returns the de-duplication window
/// to save with them: it includes exactly these events and those stored
/// before, never one that is not in the inbox. `None` once the overlay
/// has stopped (an empty window saved then would wipe the one on disk).
async fn window_op(handle: &OverlayHandle, acks: &[EventId]) -> Option<Op> {
    let ids = acks.to_vec();
    let window = handle
        .call(move |o, _| {
            o.mark_stored(&ids);
            o.delivered_window()
        })
        .await
        .ok()?;
    Some(Op::Dedup(window))
}

/// Part 3: acknowledges the stored events to their publishers.
pub(crate) async fn acknowledge(handle: &OverlayHandle, acks: Vec<EventId>) {
    if acks.is_empty() {
        return;
    }
    let _ = handle
        .call(move |o, _| {
            for id in &acks {
                o.acknowledge(id);
            }
        })
        .await;
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

    /// Forgets one entry (added, then not stored).
    fn forget(&mut self, seq: u64) {
        if let Some(l) = self.evictable.remove(&seq) {
            self.evictable_bytes -= l;
            self.bytes -= l;
        } else if let Some((l, _)) = self.durable.remove(&seq) {
            self.bytes -= l;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::{scratch, spec, start, wait_until};

    #[test]
    fn every_member_change_has_a_local_topic() {
        for change in [
            MemberChange::Joined,
            MemberChange::Suspect,
            MemberChange::Failed,
            MemberChange::Left,
            MemberChange::Alive,
            MemberChange::Updated,
        ] {
            let topic = member_topic(change);
            assert!(crate::events::is_local(topic), "{change:?} → {topic}");
            let member = rumormill_core::MemberInfo {
                name: "m".into(),
                addr: "127.0.0.1:1".parse().expect("address"),
                incarnation: 0,
                epoch: 1,
                state: rumormill_core::MemberState::Alive,
            };
            let (entries, _) = to_inbox(vec![Notification::Member { change, member }], &[topic.to_owned()]);
            assert_eq!(entries.len(), 1, "{change:?}");
            assert_eq!(entries[0].item.topic, topic);
        }
    }

    #[test]
    fn racks_notices_are_local_topic_entries() {
        let notices = [
            RackNotification::GatewayChanged {
                rack: "eu".into(),
                gateway: "eu-2".into(),
                term: 7,
            },
            RackNotification::Unreachable { rack: "us".into() },
            RackNotification::Reachable { rack: "us".into() },
        ];
        let topics: Vec<String> = notices
            .iter()
            .map(|n| rack_topic(n).expect("a topic").0.to_owned())
            .collect();
        assert_eq!(topics, ["rack.gateway_changed", "rack.unreachable", "rack.reachable"]);
        assert!(topics.iter().all(|t| crate::events::is_local(t)));
        let batch = notices.iter().cloned().map(Notification::Rack).collect();
        let (entries, _) = to_inbox(batch, &topics);
        /// Topic, rack, member, term.
        type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<u64>);
        let got: Vec<Row<'_>> = entries
            .iter()
            .map(|e| {
                let i = &e.item;
                (i.topic.as_str(), i.rack.as_deref(), i.member.as_deref(), i.term)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("rack.gateway_changed", Some("eu"), Some("eu-2"), Some(7)),
                ("rack.unreachable", Some("us"), None, None),
                ("rack.reachable", Some("us"), None, None),
            ]
        );
        // Not subscribed: nothing.
        let batch = notices.iter().cloned().map(Notification::Rack).collect();
        assert!(to_inbox(batch, &[]).0.is_empty());
    }

    #[test]
    fn only_the_latest_raft_record_of_a_batch_is_saved_and_none_reaches_the_inbox() {
        let record = |seq| {
            let mut r = RaftRecord::decode(&[]).expect("an empty record");
            r.seq = seq;
            Notification::Raft(r)
        };
        let mut batch = vec![record(3), Notification::StoreSynced, record(5), record(4)];
        let latest = latest_raft(&mut batch).expect("a record");
        assert_eq!(latest.seq, 5);
        assert!(matches!(batch.as_slice(), [Notification::StoreSynced]));
        assert!(latest_raft(&mut batch).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_the_stopped_overlay_cannot_take_keeps_its_reservation() {
        let dir = scratch("stopped-batch");
        let x = start(&dir, vec![spec("a", "x", &[])]).await;
        let handle = x.handle("a").await.expect("a");
        // A writer of its own, under another name: the overlay's pump
        // does not write there.
        let setup = WriterSetup {
            cap: u64::MAX,
            counters: Arc::default(),
            writes: WriteGate::new(),
        };
        let mut writer = InboxWriter::open(&x.db, "other".into(), setup).await;
        handle.shutdown(false).await;
        let mut entry = Incoming::local("t");
        entry.alo = true;
        entry.payload = Some(b"e".to_vec());
        entry.ack = Some(EventId {
            origin: "p".into(),
            epoch: 1,
            seq: 1,
        });
        let stored = writer.store(&x, &handle, vec![entry], Vec::new()).await;
        assert!(stored.acks.is_empty() && stored.entries.is_empty(), "nothing stored");
        assert_eq!(
            x.db.inbox_next("other").expect("position"),
            writer.reserved,
            "the numbers the batch reserved must be reserved on disk too"
        );
        assert_eq!(writer.index.bytes, 0, "the entry not stored is not counted");
        assert!(x.db.inbox_after("other", 0, 10, usize::MAX).expect("inbox").is_empty());
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_at_a_new_address_is_a_member_updated_entry() {
        let (dir_x, dir_y) = (scratch("updated-x"), scratch("updated-y"));
        let x = start(&dir_x, vec![spec("a", "x", &[])]).await;
        x.subscribe("a", &["member.updated".to_owned()])
            .await
            .expect("subscribe");
        let x_addr = x.overlay("a").await.expect("a on x").addr;
        let y = start(&dir_y, vec![spec("a", "y", &[x_addr])]).await;
        let first = y.overlay("a").await.expect("a on y").addr;
        wait_until("x to see y alive", 10, async || {
            let rows = x.members("a").await.map_err(|e| e.to_string())?;
            match rows.iter().find(|m| m.name == "y") {
                Some(m) if m.state == "alive" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // y stops without a word and comes back at once, from the same data
        // directory (a new boot epoch), on another port.
        y.shutdown(false).await;
        drop(y);
        let y = start(&dir_y, vec![spec("a", "y", &[x_addr])]).await;
        let second = y.overlay("a").await.expect("a on y").addr;
        assert_ne!(first, second, "y must come back at another address");
        wait_until("x's inbox to hold member.updated for y", 10, async || {
            let items = x.inbox("a", 0, 1000).await.map_err(|e| e.to_string())?;
            let topics: Vec<(String, Option<String>)> = items.into_iter().map(|i| (i.topic, i.member)).collect();
            match topics
                .iter()
                .any(|(t, m)| t == "member.updated" && m.as_deref() == Some("y"))
            {
                true => Ok(()),
                false => Err(format!("{topics:?}")),
            }
        })
        .await;
        let rows = x.members("a").await.expect("members");
        let y_row = rows.iter().find(|m| m.name == "y").expect("y");
        assert_eq!((y_row.addr, y_row.state.as_str()), (second, "alive"));
        y.shutdown(false).await;
        x.shutdown(false).await;
        for d in [dir_x, dir_y] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
