//! The update store: the replicated key/value data, and what has been seen.
//!
//! Each update has an identity `(origin, epoch, seq)` — the member that wrote
//! it, that member's boot epoch (each life counts its writes from 1 again)
//! and its write counter — and a version `(lamport, origin, epoch)` that
//! orders concurrent writes of one key: the last writer wins, ties broken by
//! origin, so every member settles on the same value.
//!
//! For each origin and life the store remembers which sequence numbers it has seen
//! (everything up to a contiguous watermark, plus a few beyond). That is the
//! Scuttlebutt-style digest anti-entropy exchanges, and it is what lets the
//! rumor state of old updates be forgotten without a late copy ever counting
//! as news again.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use rumormill_wire::proto;

use crate::membership::Stamp;
use crate::reserved::ReservedKey;

/// An update as the store holds it. A `value` of `None` is a delete (a
/// tombstone that spreads like a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The key.
    pub key: String,
    /// The value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// Lamport time of the write.
    pub lamport: u64,
    /// The member that wrote it.
    pub origin: Arc<str>,
    /// The writer's boot epoch.
    pub epoch: u64,
    /// The origin's write counter in that epoch (from 1).
    pub seq: u64,
}

impl Update {
    /// The order of concurrent writes: `(lamport, origin, epoch)`.
    pub fn version(&self) -> (u64, &str, u64) {
        (self.lamport, &self.origin, self.epoch)
    }

    pub(crate) fn to_wire(&self) -> proto::Update {
        proto::Update {
            key: self.key.clone(),
            value: self.value.clone().unwrap_or_default(),
            deleted: self.value.is_none(),
            lamport: self.lamport,
            origin: self.origin.to_string(),
            seq: self.seq,
            epoch: self.epoch,
        }
    }

    /// Reads a wire update; `None` if it makes no sense (no origin, seq 0).
    pub(crate) fn from_wire(u: proto::Update) -> Option<Update> {
        // u64::MAX is reserved: counters and clocks must be able to go past
        // anything received.
        if u.origin.is_empty() || u.seq == 0 || u.seq == u64::MAX || u.lamport == u64::MAX {
            return None;
        }
        Some(Update {
            key: u.key,
            value: (!u.deleted).then_some(u.value),
            lamport: u.lamport,
            origin: u.origin.into(),
            epoch: u.epoch,
            seq: u.seq,
        })
    }
}

/// Most out-of-order sequence numbers taken from one peer summary.
const MAX_BEYOND: usize = 4096;
/// Most origins taken from one peer's summaries.
const MAX_ORIGINS: usize = 65_536;

/// Most refused updates remembered (see [`Refused`]).
const MAX_REFUSED: usize = 4096;
/// Most bytes of keys and origin names of the refused updates (and of the
/// blocked lives) remembered.
const MAX_REFUSED_BYTES: usize = 1 << 20;
/// Most lives whose summaries are never merged, once [`MAX_REFUSED`] is
/// reached; beyond it, no summary is merged at all.
const MAX_BLOCKED_LIVES: usize = 4096;

/// An update's identity: origin, epoch, seq.
type Id = (Arc<str>, u64, u64);

/// Updates refused on receipt (a quota), which must stay unseen until they
/// are stored or superseded: a peer's summaries are not merged for their
/// origin and epoch, so that the refused updates can come again. Bounded:
/// a life whose refusal cannot be remembered is *blocked* (its summaries
/// are never merged again; that costs full exchanges, not correctness), and
/// past [`MAX_BLOCKED_LIVES`] no summary is merged at all.
#[derive(Debug, Clone, Default)]
struct Refused {
    /// Refused updates by key: their ids and Lamport times, to find those a
    /// newer write of the key supersedes.
    by_key: BTreeMap<String, BTreeMap<Id, u64>>,
    /// Refused updates remembered per life.
    lives: BTreeMap<Arc<str>, BTreeMap<u64, usize>>,
    count: usize,
    /// Keys (once each) and origin names (once per id and blocked life).
    bytes: usize,
    blocked: BTreeMap<Arc<str>, BTreeSet<u64>>,
    blocked_count: usize,
    blocked_all: bool,
}

impl Refused {
    fn insert(&mut self, u: &Update) {
        let id = (u.origin.clone(), u.epoch, u.seq);
        if self.by_key.get(&u.key).is_some_and(|ids| ids.contains_key(&id)) {
            return;
        }
        let new_key = !self.by_key.contains_key(&u.key);
        let cost = if new_key { u.key.len() } else { 0 } + u.origin.len();
        if self.count >= MAX_REFUSED || self.bytes + cost > MAX_REFUSED_BYTES {
            // Even a life with remembered refusals: once those settle,
            // this one would be merged as seen.
            if self.blocked_all || self.blocked.get(&u.origin).is_some_and(|e| e.contains(&u.epoch)) {
                return;
            }
            if self.blocked_count < MAX_BLOCKED_LIVES && self.bytes + u.origin.len() <= MAX_REFUSED_BYTES {
                self.blocked.entry(u.origin.clone()).or_default().insert(u.epoch);
                self.blocked_count += 1;
                self.bytes += u.origin.len();
            } else {
                self.blocked_all = true;
            }
            return;
        }
        self.bytes += cost;
        self.count += 1;
        *self
            .lives
            .entry(u.origin.clone())
            .or_default()
            .entry(u.epoch)
            .or_default() += 1;
        self.by_key.entry(u.key.clone()).or_default().insert(id, u.lamport);
    }

    fn remove(&mut self, key: &str, id: &Id) {
        let Some(ids) = self.by_key.get_mut(key) else {
            return;
        };
        if ids.remove(id).is_none() {
            return;
        }
        if ids.is_empty() {
            self.by_key.remove(key);
            self.bytes = self.bytes.saturating_sub(key.len());
        }
        self.bytes = self.bytes.saturating_sub(id.0.len());
        self.count -= 1;
        if let Some(epochs) = self.lives.get_mut(&id.0) {
            if let Some(n) = epochs.get_mut(&id.1) {
                *n -= 1;
                if *n == 0 {
                    epochs.remove(&id.1);
                }
            }
            if epochs.is_empty() {
                self.lives.remove(&id.0);
            }
        }
    }

    /// Forgets `u` and the refused updates of its key it supersedes
    /// (older versions), which are returned: they count as seen now.
    fn settle(&mut self, u: &Update, stored: bool) -> Vec<Id> {
        let Some(ids) = self.by_key.get(&u.key) else {
            return Vec::new();
        };
        let id = (u.origin.clone(), u.epoch, u.seq);
        let gone: Vec<Id> = ids
            .iter()
            .filter(|((o, e, _), lamport)| stored && (**lamport, &**o, *e) < u.version())
            .map(|(id, _)| id.clone())
            .collect();
        self.remove(&u.key, &id);
        for g in &gone {
            self.remove(&u.key, g);
        }
        gone
    }

    fn holds_back(&self, origin: &str, epoch: u64) -> bool {
        if self.blocked_all {
            return true;
        }
        self.lives.get(origin).is_some_and(|e| e.contains_key(&epoch))
            || self.blocked.get(origin).is_some_and(|e| e.contains(&epoch))
    }
}

/// The seen sequence numbers of one origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    contiguous: u64,
    beyond: BTreeSet<u64>,
}

impl Seen {
    pub(crate) fn contains(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.beyond.contains(&seq)
    }

    pub(crate) fn insert(&mut self, seq: u64) {
        if self.contains(seq) || seq == u64::MAX {
            return;
        }
        self.beyond.insert(seq);
        self.compact();
    }

    fn compact(&mut self) {
        while self.contiguous < u64::MAX - 1 && self.beyond.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }

    /// Merges a peer's summary. Values no real counter reaches (u64::MAX)
    /// are ignored, and at most `MAX_BEYOND` out-of-order numbers are kept.
    fn merge(&mut self, s: &proto::OriginSummary) {
        if s.contiguous > self.contiguous && s.contiguous < u64::MAX {
            self.contiguous = s.contiguous;
            self.beyond = self.beyond.split_off(&(self.contiguous + 1));
        }
        for &q in &s.beyond {
            if self.beyond.len() >= MAX_BEYOND {
                break;
            }
            if q != u64::MAX && !self.contains(q) {
                self.beyond.insert(q);
            }
        }
        self.compact();
    }

    fn from_summary(s: &proto::OriginSummary) -> Seen {
        let mut seen = Seen::default();
        seen.merge(s);
        seen
    }
}

/// What one writer's current entries take in a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of keys and values.
    pub bytes: u64,
    /// Entries, deletes included (a delete holds its key until its TTL).
    pub entries: u64,
    /// Bytes of the writer's own luggage values.
    pub luggage: u64,
}

/// How much one writer, and all writers together, may make every member
/// store. They are overlay settings: every member must use the same, since
/// each applies them on receipt (see [`Store::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes (keys + values) of one writer's current entries.
    pub writer_bytes: u64,
    /// Most entries (deletes included) one writer holds.
    pub writer_entries: u64,
    /// Largest luggage value.
    pub luggage_value: u64,
    /// Most bytes of luggage values per member.
    pub luggage_total: u64,
    /// Most bytes (keys + values) of the whole store, all writers
    /// together. Writer names are not authenticated beyond the overlay's
    /// key, so without it a key holder writing under many names could make
    /// every member store `writer_bytes` per name.
    pub store_bytes: u64,
    /// Most entries (deletes included) of the whole store, all writers
    /// together.
    pub store_entries: u64,
}

/// Default bytes per writer: 16 MiB.
pub const DEFAULT_WRITER_BYTES: u64 = 16 << 20;
/// Default entries per writer: 16,384.
pub const DEFAULT_WRITER_ENTRIES: u64 = 16_384;
/// Default bytes of the whole store: 256 MiB.
pub const DEFAULT_STORE_BYTES: u64 = 256 << 20;
/// Default entries of the whole store: 262,144.
pub const DEFAULT_STORE_ENTRIES: u64 = 262_144;

impl Default for Limits {
    /// 16 MiB and 16,384 entries per writer: sixteen times the default
    /// luggage of a member (1 MiB) with room for its subscriptions, rack
    /// and key reports, and for application values beside them; luggage
    /// values of 64 KiB, 1 MiB per member. The whole store: 256 MiB and
    /// 262,144 entries, sixteen writers at their full quota, or a thousand
    /// members with 256 KiB each; as much as the agent's inbox may take.
    fn default() -> Limits {
        Limits {
            writer_bytes: DEFAULT_WRITER_BYTES,
            writer_entries: DEFAULT_WRITER_ENTRIES,
            luggage_value: crate::luggage::DEFAULT_MAX_VALUE as u64,
            luggage_total: crate::luggage::DEFAULT_MAX_TOTAL as u64,
            store_bytes: DEFAULT_STORE_BYTES,
            store_entries: DEFAULT_STORE_ENTRIES,
        }
    }
}

/// Why an update was refused: it would take its writer beyond a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaExceeded {
    /// Keys and values of the writer would exceed `max` bytes.
    #[error(
        "writer {writer:?} would hold {would} bytes of keys and values: at most {max} per writer (delete some keys first)"
    )]
    Bytes {
        /// The writer.
        writer: String,
        /// What it would hold.
        would: u64,
        /// The quota.
        max: u64,
    },
    /// The writer would hold more than `max` entries.
    #[error(
        "writer {writer:?} would hold {would} entries: at most {max} per writer, deletes included until they expire"
    )]
    Entries {
        /// The writer.
        writer: String,
        /// What it would hold.
        would: u64,
        /// The quota.
        max: u64,
    },
    /// Keys and values of all writers together would exceed `max` bytes.
    #[error(
        "the store would hold {would} bytes of keys and values: at most {max} for all writers together (store_bytes; delete some keys first)"
    )]
    StoreBytes {
        /// What the store would hold.
        would: u64,
        /// The limit.
        max: u64,
    },
    /// The store would hold more than `max` entries, all writers together.
    #[error(
        "the store would hold {would} entries: at most {max} for all writers together (store_entries), deletes included until they expire"
    )]
    StoreEntries {
        /// What the store would hold.
        would: u64,
        /// The limit.
        max: u64,
    },
    /// A luggage value over the limit.
    #[error("luggage value of {len} bytes: at most {max}")]
    LuggageValue {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The member's luggage would exceed its total.
    #[error("luggage would total {would} bytes: at most {max} per member")]
    LuggageTotal {
        /// What it would total.
        would: u64,
        /// The limit.
        max: u64,
    },
    /// A luggage key that the writer's own API would not take.
    #[error("luggage key of {len} bytes or with control characters: 1 to {max} bytes, none")]
    LuggageKey {
        /// Its length.
        len: u64,
        /// The longest allowed.
        max: u64,
    },
}

/// What an update costs its writer.
fn cost(u: &Update) -> Usage {
    let luggage = match (&u.value, crate::reserved::owned(u)) {
        (Some(v), Some(ReservedKey::Luggage { .. })) => v.len() as u64,
        _ => 0,
    };
    Usage {
        bytes: (u.key.len() + u.value.as_ref().map_or(0, Vec::len)) as u64,
        entries: 1,
        luggage,
    }
}

#[derive(Debug, Clone)]
struct Entry {
    update: Update,
    /// When a tombstone was stored, to forget it after its TTL.
    stored: Stamp,
}

/// The replicated key/value data of an overlay.
#[derive(Debug, Clone, Default)]
pub struct Store {
    entries: BTreeMap<String, Entry>,
    /// Held updates by identity, for digests: the cost of a difference
    /// follows the difference, not the store.
    by_id: BTreeMap<(Arc<str>, u64, u64), String>,
    /// Seen sequence numbers, per origin and epoch.
    seen: BTreeMap<Arc<str>, BTreeMap<u64, Seen>>,
    tombstones: usize,
    /// What each writer's current entries take.
    usage: BTreeMap<Arc<str>, Usage>,
    /// What all current entries take together (`luggage` unused).
    total: Usage,
    /// Updates refused on receipt, kept unseen.
    refused: Refused,
}

impl Store {
    /// Deletes held.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// What `writer`'s current entries take.
    pub fn usage(&self, writer: &str) -> Usage {
        self.usage.get(writer).copied().unwrap_or_default()
    }

    /// What all current entries take together.
    pub fn total(&self) -> Usage {
        self.total
    }

    /// Whether storing `u` keeps its writer, and the whole store, within
    /// `limits`. An update that would not be stored (an older version) or
    /// that does not raise what its writer (or the store) holds passes: a
    /// writer over its quota (under a member with a smaller one) can still
    /// shrink.
    pub fn check(&self, u: &Update, limits: &Limits) -> Result<(), QuotaExceeded> {
        let cur = self.entries.get(&u.key).map(|e| &e.update);
        if cur.is_some_and(|c| c.version() >= u.version()) {
            return Ok(());
        }
        if let Some(ReservedKey::Luggage { key, .. }) = crate::reserved::owned(u)
            && u.value.is_some()
            && !crate::luggage::key_ok(&key)
        {
            return Err(QuotaExceeded::LuggageKey {
                len: key.len() as u64,
                max: crate::luggage::MAX_KEY as u64,
            });
        }
        let before = self.usage(&u.origin);
        let add = cost(u);
        let sub = match cur {
            Some(c) if c.origin == u.origin => cost(c),
            _ => Usage::default(),
        };
        let after = Usage {
            bytes: (before.bytes + add.bytes).saturating_sub(sub.bytes),
            entries: (before.entries + add.entries).saturating_sub(sub.entries),
            luggage: (before.luggage + add.luggage).saturating_sub(sub.luggage),
        };
        let writer = || u.origin.to_string();
        if add.luggage > limits.luggage_value {
            return Err(QuotaExceeded::LuggageValue {
                len: add.luggage,
                max: limits.luggage_value,
            });
        }
        if after.luggage > limits.luggage_total && after.luggage > before.luggage {
            return Err(QuotaExceeded::LuggageTotal {
                would: after.luggage,
                max: limits.luggage_total,
            });
        }
        if after.bytes > limits.writer_bytes && after.bytes > before.bytes {
            return Err(QuotaExceeded::Bytes {
                writer: writer(),
                would: after.bytes,
                max: limits.writer_bytes,
            });
        }
        if after.entries > limits.writer_entries && after.entries > before.entries {
            return Err(QuotaExceeded::Entries {
                writer: writer(),
                would: after.entries,
                max: limits.writer_entries,
            });
        }
        // The whole store: whoever wrote what `u` replaces.
        let sub = cur.map(cost).unwrap_or_default();
        let total = self.total.bytes + add.bytes;
        let total = total.saturating_sub(sub.bytes);
        if total > limits.store_bytes && add.bytes > sub.bytes {
            return Err(QuotaExceeded::StoreBytes {
                would: total,
                max: limits.store_bytes,
            });
        }
        let entries = (self.total.entries + add.entries).saturating_sub(sub.entries);
        if entries > limits.store_entries && add.entries > sub.entries {
            return Err(QuotaExceeded::StoreEntries {
                would: entries,
                max: limits.store_entries,
            });
        }
        Ok(())
    }

    fn charge(&mut self, u: &Update) {
        let c = cost(u);
        let key: Arc<str> = match self.usage.get_key_value(&*u.origin) {
            Some((k, _)) => k.clone(),
            None => u.origin.clone(),
        };
        let e = self.usage.entry(key).or_default();
        e.bytes += c.bytes;
        e.entries += c.entries;
        e.luggage += c.luggage;
        self.total.bytes += c.bytes;
        self.total.entries += c.entries;
    }

    fn refund(&mut self, u: &Update) {
        let c = cost(u);
        self.total.bytes = self.total.bytes.saturating_sub(c.bytes);
        self.total.entries = self.total.entries.saturating_sub(c.entries);
        if let Some(e) = self.usage.get_mut(&*u.origin) {
            e.bytes = e.bytes.saturating_sub(c.bytes);
            e.entries = e.entries.saturating_sub(c.entries);
            e.luggage = e.luggage.saturating_sub(c.luggage);
            if e.entries == 0 {
                self.usage.remove(&*u.origin);
            }
        }
    }

    /// The current update of `key` (a delete included).
    pub fn get(&self, key: &str) -> Option<&Update> {
        self.entries.get(key).map(|e| &e.update)
    }

    /// The current updates whose keys start with `prefix`, in key order.
    pub fn prefixed<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Update> + 'a {
        self.entries
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| &e.update)
    }

    /// The value of `key`, if it has one (not deleted).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.get(key).and_then(|u| u.value.as_deref())
    }

    /// Every current update, deletes included, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Update> {
        self.entries.values().map(|e| &e.update)
    }

    /// Keys held (deletes included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn seen(&self, origin: &str, epoch: u64, seq: u64) -> bool {
        self.seen
            .get(origin)
            .and_then(|lives| lives.get(&epoch))
            .is_some_and(|s| s.contains(seq))
    }

    fn seen_mut(&mut self, origin: &str, epoch: u64) -> &mut Seen {
        let key: Arc<str> = match self.seen.get_key_value(origin) {
            Some((k, _)) => k.clone(),
            None => origin.into(),
        };
        self.seen.entry(key).or_default().entry(epoch).or_default()
    }

    pub(crate) fn mark_seen(&mut self, origin: &str, epoch: u64, seq: u64) {
        self.seen_mut(origin, epoch).insert(seq);
    }

    /// A held update by identity.
    pub(crate) fn by_id(&self, origin: &Arc<str>, epoch: u64, seq: u64) -> Option<&Update> {
        let key = self.by_id.get(&(origin.clone(), epoch, seq))?;
        self.entries.get(key).map(|e| &e.update)
    }

    /// Every (origin, epoch) with what was seen of it.
    fn lives(&self) -> impl Iterator<Item = (&Arc<str>, u64, &Seen)> {
        self.seen
            .iter()
            .flat_map(|(o, lives)| lives.iter().map(move |(e, s)| (o, *e, s)))
    }

    /// Whether this store has seen something a peer with these summaries
    /// has not (held or overwritten).
    pub(crate) fn knows_more_than(&self, peer: &[proto::OriginSummary]) -> bool {
        let peer: BTreeMap<(&str, u64), &proto::OriginSummary> =
            peer.iter().map(|s| ((s.origin.as_str(), s.epoch), s)).collect();
        self.lives().any(|(origin, epoch, mine)| {
            let Some(theirs) = peer.get(&(&**origin, epoch)) else {
                return true;
            };
            let theirs = Seen::from_summary(theirs);
            mine.beyond.iter().any(|q| !theirs.contains(*q))
                || (theirs.contiguous < mine.contiguous
                    && (mine.contiguous - theirs.contiguous)
                        > theirs.beyond.range(theirs.contiguous + 1..=mine.contiguous).count() as u64)
        })
    }

    /// Stores `u` if it is newer than what the store holds for its key, and
    /// marks it seen either way. Returns whether it was stored.
    pub(crate) fn apply(&mut self, u: Update, now: Stamp) -> bool {
        self.mark_seen(&u.origin, u.epoch, u.seq);
        if let Some(cur) = self.entries.get(&u.key) {
            if cur.update.version() >= u.version() {
                self.refused.settle(&u, false);
                return false;
            }
            let old = (cur.update.origin.clone(), cur.update.epoch, cur.update.seq);
            if cur.update.value.is_none() {
                self.tombstones -= 1;
            }
            self.by_id.remove(&old);
        }
        if u.value.is_none() {
            self.tombstones += 1;
        }
        for (o, e, q) in self.refused.settle(&u, true) {
            // Superseded: as if it had arrived after this write.
            self.mark_seen(&o, e, q);
        }
        self.charge(&u);
        self.by_id.insert((u.origin.clone(), u.epoch, u.seq), u.key.clone());
        // The replaced update — its value with it — is dropped here.
        if let Some(old) = self.entries.insert(u.key.clone(), Entry { update: u, stored: now }) {
            self.refund(&old.update);
        }
        true
    }

    /// Replaces the whole store (a handler's decision). Each update is
    /// checked against `limits` as it is added, as if received: those that
    /// would take their writer or the store beyond them are left out. Returns
    /// the errors of those left out.
    pub(crate) fn replace(&mut self, updates: Vec<Update>, now: Stamp, limits: &Limits) -> Vec<QuotaExceeded> {
        self.entries.clear();
        self.by_id.clear();
        self.usage.clear();
        self.total = Usage::default();
        self.tombstones = 0;
        let mut refused = Vec::new();
        for u in updates {
            match self.check(&u, limits) {
                Ok(()) => {
                    self.apply(u, now);
                }
                Err(e) => refused.push(e),
            }
        }
        refused
    }

    /// What this store has seen, per origin and epoch.
    pub(crate) fn summaries(&self) -> Vec<proto::OriginSummary> {
        self.lives()
            .map(|(o, epoch, s)| proto::OriginSummary {
                origin: o.to_string(),
                epoch,
                contiguous: s.contiguous,
                beyond: s.beyond.iter().copied().collect(),
            })
            .collect()
    }

    /// Remembers that `u` was refused on receipt: it stays unseen, and the
    /// summaries of its origin and epoch are not merged, until it is stored
    /// or a newer write of its key supersedes it.
    pub(crate) fn refuse(&mut self, u: &Update) {
        self.refused.insert(u);
    }

    /// Counts as seen what a peer has seen: sent with the last chunk of a
    /// delta, once everything the peer held that we lacked has arrived.
    /// Lives with refused updates (see [`Store::refuse`]) are left out:
    /// those must stay unseen so that they can come again once there is
    /// room.
    pub(crate) fn merge_seen(&mut self, summaries: &[proto::OriginSummary]) {
        for s in summaries.iter().take(MAX_ORIGINS) {
            if !s.origin.is_empty() && !self.refused.holds_back(&s.origin, s.epoch) {
                self.seen_mut(&s.origin, s.epoch).merge(s);
            }
        }
    }

    /// The held updates a peer with these summaries has not seen.
    pub(crate) fn missing_for(&self, peer: &[proto::OriginSummary]) -> Vec<&Update> {
        let peer: BTreeMap<(&str, u64), Seen> = peer
            .iter()
            .map(|s| ((s.origin.as_str(), s.epoch), Seen::from_summary(s)))
            .collect();
        let mut out = Vec::new();
        for (origin, epoch, _) in self.lives() {
            let seen = peer.get(&(&**origin, epoch));
            let from = seen.map_or(0, |s| s.contiguous);
            let range = (
                Bound::Excluded((origin.clone(), epoch, from)),
                Bound::Included((origin.clone(), epoch, u64::MAX)),
            );
            for ((_, _, seq), key) in self.by_id.range(range) {
                if seen.is_some_and(|s| s.contains(*seq)) {
                    continue;
                }
                if let Some(e) = self.entries.get(key) {
                    out.push(&e.update);
                }
            }
        }
        out
    }

    /// Forgets tombstones stored more than `ttl` ms ago.
    pub(crate) fn forget_tombstones(&mut self, now: Stamp, ttl: u64) {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.update.value.is_none() && now.saturating_sub(e.stored) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(e) = self.entries.remove(&k) {
                self.tombstones -= 1;
                self.refund(&e.update);
                self.by_id.remove(&(e.update.origin, e.update.epoch, e.update.seq));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(key: &str, v: &str, lamport: u64, origin: &str, seq: u64) -> Update {
        up_in(key, v, lamport, origin, 1, seq)
    }

    fn up_in(key: &str, v: &str, lamport: u64, origin: &str, epoch: u64, seq: u64) -> Update {
        Update {
            key: key.into(),
            value: Some(v.as_bytes().to_vec()),
            lamport,
            origin: origin.into(),
            epoch,
            seq,
        }
    }

    #[test]
    fn the_last_writer_wins_and_ties_break_by_origin() {
        let mut s = Store::default();
        assert!(s.apply(up("k", "a", 5, "a", 1), 0));
        assert!(!s.apply(up("k", "old", 4, "z", 1), 0), "older lamport loses");
        assert!(
            s.apply(up("k", "b", 5, "b", 1), 0),
            "same lamport: the larger origin wins"
        );
        assert!(!s.apply(up("k", "a again", 5, "a", 1), 0));
        assert_eq!(s.value("k"), Some(&b"b"[..]));
        assert!(s.seen("z", 1, 1), "a losing write is still seen");
    }

    #[test]
    fn seen_sets_compact_into_a_watermark() {
        let mut seen = Seen::default();
        for q in [3, 1, 5, 2] {
            seen.insert(q);
        }
        assert_eq!(
            (seen.contiguous, seen.beyond.iter().copied().collect::<Vec<_>>()),
            (3, vec![5])
        );
        seen.insert(4);
        assert_eq!((seen.contiguous, seen.beyond.len()), (5, 0));
    }

    #[test]
    fn the_difference_holds_only_what_the_peer_has_not_seen() {
        let mut a = Store::default();
        for i in 1..=100 {
            a.apply(up(&format!("k{i}"), "v", i, "a", i), 0);
        }
        let mut b = Store::default();
        for i in 1..=97 {
            b.apply(up(&format!("k{i}"), "v", i, "a", i), 0);
        }
        b.apply(up("k99", "v", 99, "a", 99), 0);
        let missing: Vec<u64> = a.missing_for(&b.summaries()).iter().map(|u| u.seq).collect();
        assert_eq!(missing, vec![98, 100]);
        assert!(b.missing_for(&a.summaries()).is_empty());
    }

    #[test]
    fn overwritten_updates_are_covered_by_the_summary() {
        let mut a = Store::default();
        a.apply(up("k", "1", 1, "a", 1), 0);
        a.apply(up("k", "2", 2, "a", 2), 0);
        let mut b = Store::default();
        let missing: Vec<Update> = a.missing_for(&b.summaries()).into_iter().cloned().collect();
        assert_eq!(missing.len(), 1, "only the current value travels");
        for u in missing {
            b.apply(u, 0);
        }
        b.merge_seen(&a.summaries());
        assert!(b.seen("a", 1, 1) && b.seen("a", 1, 2));
        assert!(a.missing_for(&b.summaries()).is_empty());
    }

    #[test]
    fn summaries_at_the_edge_of_the_counter_space_neither_panic_nor_silence_an_origin() {
        let mut s = Store::default();
        let evil = proto::OriginSummary {
            origin: "x".into(),
            epoch: 1,
            contiguous: u64::MAX,
            beyond: vec![u64::MAX, 5],
        };
        s.merge_seen(&[evil]);
        let edge = proto::OriginSummary {
            origin: "y".into(),
            epoch: 1,
            contiguous: u64::MAX - 1,
            beyond: vec![u64::MAX],
        };
        s.merge_seen(&[edge]);
        assert!(!s.seen("x", 1, 6), "an impossible watermark is ignored");
        assert!(s.seen("x", 1, 5));
        let mut wire = up("k", "v", u64::MAX, "x", 7).to_wire();
        assert!(Update::from_wire(wire.clone()).is_none(), "lamport u64::MAX is refused");
        wire.lamport = 3;
        wire.seq = u64::MAX;
        assert!(Update::from_wire(wire).is_none(), "seq u64::MAX is refused");
    }

    #[test]
    fn each_life_of_an_origin_counts_its_writes_anew() {
        let mut s = Store::default();
        s.apply(up_in("k", "old", 1, "a", 1, 1), 0);
        // Restarted: seq 1 again, in epoch 2. It is news, and newer.
        assert!(!s.seen("a", 2, 1));
        assert!(
            s.apply(up_in("k", "new", 1, "a", 2, 1), 0),
            "same lamport: the later life wins the tie"
        );
        assert_eq!(s.value("k"), Some(&b"new"[..]));
        let mut peer = Store::default();
        peer.apply(up_in("k", "old", 1, "a", 1, 1), 0);
        let missing: Vec<u64> = s.missing_for(&peer.summaries()).iter().map(|u| u.epoch).collect();
        assert_eq!(missing, vec![2]);
    }

    #[test]
    fn past_the_bound_of_refusals_remembered_a_writers_summaries_are_not_merged() {
        let mut s = Store::default();
        let n = MAX_REFUSED as u64 + 1;
        for q in 1..=n {
            s.refuse(&up(&format!("k{q}"), "v", q, "a", q));
        }
        // Every remembered refusal settles: stored at last.
        for q in 1..n {
            assert!(s.apply(up(&format!("k{q}"), "v", q, "a", q), 0));
        }
        let peer = proto::OriginSummary {
            origin: "a".into(),
            epoch: 1,
            contiguous: n,
            beyond: Vec::new(),
        };
        s.merge_seen(std::slice::from_ref(&peer));
        assert!(!s.seen("a", 1, n), "the refusal past the bound is not merged as seen");
        // Another writer's lives still merge.
        s.merge_seen(&[proto::OriginSummary {
            origin: "b".into(),
            ..peer
        }]);
        assert!(s.seen("b", 1, n));
    }

    #[test]
    fn tombstones_are_forgotten_after_their_ttl_but_stay_seen() {
        let mut s = Store::default();
        s.apply(up("k", "1", 1, "a", 1), 0);
        s.apply(
            Update {
                value: None,
                ..up("k", "", 2, "a", 2)
            },
            10,
        );
        s.forget_tombstones(20, 100);
        assert!(s.get("k").is_some());
        s.forget_tombstones(200, 100);
        assert!(s.get("k").is_none());
        assert!(s.seen("a", 1, 1), "a late copy of the old put is not news");
    }
}
