//! Anti-entropy (Demers et al. 1987, "simple epidemics"), Scuttlebutt style.
//!
//! Every `anti_entropy_interval` a member sends `anti_entropy_fanout`
//! partners a *digest* — per origin, the sequence numbers it has seen — and
//! the partners answer with only what is missing:
//!
//! - **pull**: digest → the partner's *delta* (what the initiator lacks);
//! - **push**: digest → the partner's digest → the initiator's delta;
//! - **push-pull**: digest → delta + the partner's digest → delta.
//!
//! A digest costs one entry per origin (writer), not per update, and a delta
//! holds only the difference, so the cost follows the difference, not the
//! store. The periodic push-pull exchange starts with a *check* — a hash
//! of the digest, not the digest: a partner in sync answers with an empty
//! delta, one that is not starts a full exchange back — so that an idle
//! cluster's exchanges cost two small datagrams, whatever the number of
//! writers. Deltas larger than `max_chunk` go over streams in chunks; each chunk
//! carries the sender's summaries, which the receiver merges once every chunk
//! has arrived — that is how it learns of updates the sender overwrote and
//! will never send.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;
use rumormill_wire::proto::{Delta, Digest, ExchangeMode, OriginSummary, envelope::Body};

use super::rumor::{batches, wire_len};
use super::store::Update;
use super::{Direction, Replication};

/// Chunked deltas being received, by exchange id.
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    pending: BTreeMap<u64, (u32, Instant)>,
}

const MAX_PENDING: usize = 64;

impl Replication {
    /// Starts an exchange with `to` now, if anti-entropy is on (after a
    /// join: a new member should not wait an interval for the store).
    pub(crate) fn exchange_now(&mut self, to: SocketAddr) {
        if self.config.exchanges() {
            self.start_exchange(to);
        }
    }

    /// The periodic exchange: a check first when it is push-pull.
    pub(crate) fn start_check(&mut self, to: SocketAddr) {
        if self.config.anti_entropy_direction != Direction::PushPull {
            self.start_exchange(to);
            return;
        }
        self.stats.exchanges += 1;
        let fingerprint = fingerprint(&self.store.summaries());
        self.send(
            to,
            Body::Digest(Digest {
                origins: Vec::new(),
                mode: ExchangeMode::PushPull as i32,
                reply: false,
                reply_to: None,
                check: true,
                fingerprint,
            }),
        );
    }

    pub(crate) fn start_exchange(&mut self, to: SocketAddr) {
        self.stats.exchanges += 1;
        let mode = match self.config.anti_entropy_direction {
            Direction::Push => ExchangeMode::Push,
            Direction::Pull => ExchangeMode::Pull,
            Direction::PushPull => ExchangeMode::PushPull,
        };
        let origins = self.store.summaries();
        self.send(
            to,
            Body::Digest(Digest {
                origins,
                mode: mode as i32,
                reply: false,
                reply_to: None,
                check: false,
                fingerprint: 0,
            }),
        );
    }

    pub(crate) fn on_digest(&mut self, from: SocketAddr, d: Digest) {
        let from = Replication::reply_address(from, d.reply_to.as_ref());
        if d.check && !d.reply {
            if d.fingerprint == fingerprint(&self.store.summaries()) {
                self.send_synced(from);
            } else {
                self.start_exchange(from);
            }
            return;
        }
        if d.reply {
            // The partner's answer to our push or push-pull: send what it lacks.
            self.send_delta(from, &d.origins, false);
            return;
        }
        let mode = ExchangeMode::try_from(d.mode).unwrap_or(ExchangeMode::PushPull);
        if mode != ExchangeMode::Push {
            // Always answered, even when empty: the initiator learns it is synced.
            self.send_delta(from, &d.origins, true);
        }
        if mode != ExchangeMode::Pull {
            let origins = self.store.summaries();
            self.send(
                from,
                Body::Digest(Digest {
                    origins,
                    mode: d.mode,
                    reply: true,
                    reply_to: None,
                    check: false,
                    fingerprint: 0,
                }),
            );
        }
    }

    fn send_delta(&mut self, to: SocketAddr, peer: &[OriginSummary], always: bool) {
        let missing: Vec<_> = self.store.missing_for(peer).into_iter().map(Update::to_wire).collect();
        if missing.is_empty() && !self.store.knows_more_than(peer) {
            if always {
                self.send_synced(to);
            }
            return;
        }
        let seen = self.store.summaries();
        let seen_len: usize = seen.iter().map(|s| prost::Message::encoded_len(s) + 4).sum();
        let total: usize = missing.iter().map(wire_len).sum::<usize>() + seen_len;
        // One message when it fits a datagram; otherwise stream chunks.
        let room = if total + 32 <= self.budget {
            self.budget
        } else {
            self.config.max_chunk.saturating_sub(seen_len)
        };
        let mut chunks = batches(missing, room.max(1));
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let exchange: u64 = self.rng.random();
        let count = chunks.len() as u32;
        for (i, updates) in chunks.into_iter().enumerate() {
            self.stats.updates_sent += updates.len() as u64;
            let delta = Delta {
                updates,
                seen: seen.clone(),
                exchange,
                chunk: i as u32,
                chunks: count,
            };
            self.send(to, Body::Delta(delta));
        }
    }

    /// Nothing to give: an empty answer, so the partner knows it is synced.
    fn send_synced(&mut self, to: SocketAddr) {
        let done = Delta {
            updates: Vec::new(),
            seen: Vec::new(),
            exchange: 0,
            chunk: 0,
            chunks: 1,
        };
        self.send(to, Body::Delta(done));
    }

    pub(crate) fn on_delta(&mut self, now: Instant, d: Delta) {
        let mut news = Vec::new();
        for w in d.updates {
            self.stats.updates_received += 1;
            if self.store.seen(&w.origin, w.epoch, w.seq) {
                self.stats.redundant += 1;
            } else if let Some(u) = Update::from_wire(w) {
                news.push(u);
            }
        }
        let mut refused = Vec::new();
        let Some(accepted) = self.accept(now, news, &mut refused) else {
            return;
        };
        self.stats.fresh += accepted.len() as u64;
        for u in &accepted {
            // Found by anti-entropy: rumor it onwards too.
            self.infect(now, u);
        }
        if d.chunks <= 1 || self.reassembly.complete(now, d.exchange, d.chunks) {
            self.store.merge_seen(&d.seen);
            self.stats.syncs += 1;
        }
    }
}

/// A hash of a digest (FNV-1a over the encoded summaries, which come in
/// the store's order): equal for two stores that have seen the same.
fn fingerprint(origins: &[OriginSummary]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = Vec::new();
    for o in origins {
        buf.clear();
        prost::Message::encode_length_delimited(o, &mut buf).unwrap_or_default();
        for b in &buf {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl Reassembly {
    /// Counts a chunk of `exchange`; true once all `chunks` have arrived.
    fn complete(&mut self, now: Instant, exchange: u64, chunks: u32) -> bool {
        let entry = self.pending.entry(exchange).or_insert((0, now));
        entry.0 += 1;
        if entry.0 >= chunks {
            self.pending.remove(&exchange);
            return true;
        }
        if self.pending.len() > MAX_PENDING {
            // The oldest exchanges lost a chunk: their summaries are not merged.
            let oldest = self.pending.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.pending.remove(&k);
            }
        }
        false
    }
}
