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
//! store. Deltas larger than `max_chunk` go over streams in chunks; each chunk
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
use super::{Direction, Dissemination};

/// Chunked deltas being received, by exchange id.
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    pending: BTreeMap<u64, (u32, Instant)>,
}

const MAX_PENDING: usize = 64;

impl Dissemination {
    /// Starts an exchange with `to` now, if anti-entropy is on (after a
    /// join: a new member should not wait an interval for the store).
    pub(crate) fn exchange_now(&mut self, to: SocketAddr) {
        if self.config.exchanges() {
            self.start_exchange(to);
        }
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
            }),
        );
    }

    pub(crate) fn on_digest(&mut self, from: SocketAddr, d: Digest) {
        let from = Dissemination::reply_address(from, d.reply_to.as_ref());
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
                }),
            );
        }
    }

    fn send_delta(&mut self, to: SocketAddr, peer: &[OriginSummary], always: bool) {
        let missing: Vec<_> = self.store.missing_for(peer).into_iter().map(Update::to_wire).collect();
        if missing.is_empty() && !self.store.knows_more_than(peer) {
            if always {
                // Nothing to give: an empty answer, so the partner knows it is synced.
                let done = Delta {
                    updates: Vec::new(),
                    seen: Vec::new(),
                    exchange: 0,
                    chunk: 0,
                    chunks: 1,
                };
                self.send(to, Body::Delta(done));
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
        let Some(accepted) = self.accept(now, news) else { return };
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
