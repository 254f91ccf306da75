//! Rumor mongering (Demers et al. 1987, "complex epidemics").
//!
//! Per update, each member is *susceptible* (has not seen it), *infected*
//! (spreads it) or *removed* (knows it, no longer spreads it). An infected
//! member pushes its infected updates — packed into datagrams, the large ones
//! over streams — to `fanout` random members every `interval`. The first
//! round after a member goes from nothing to spread to something runs at
//! once (eager first push): an update crosses the overlay at network speed
//! instead of waiting half an interval per hop, and a burst of updates still
//! costs one round per interval.
//!
//! Loss of interest:
//! - **feedback + counter**: the receiver answers which pushed updates it
//!   already had; after `rounds` such unnecessary contacts in a row (a
//!   necessary one resets the count) the update is removed;
//! - **feedback + coin**: each unnecessary contact removes it with
//!   probability `1 / rounds`;
//! - **blind + counter**: removed after `rounds` rounds in which it was pushed;
//! - **blind + coin**: each push removes it with probability `1 / rounds`.
//!
//! An update received for the first time and accepted by the handler infects
//! the receiver. Removed updates are forgotten after `removed_ttl`; a late copy
//! is still recognised (the store's seen summaries) and never counts as news.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use rand::Rng;
use rumormill_wire::proto::{self, Rumor, RumorFeedback, UpdateId, envelope::Body};

use super::store::Update;
use super::{Loss, Removal, Replication};

/// Where one member stands with one update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RumorState {
    /// Not seen.
    Susceptible,
    /// Seen and spreading.
    Infected,
    /// Seen, no longer spread (or its rumor state was forgotten).
    Removed,
}

fn id(u: &proto::Update) -> UpdateId {
    UpdateId {
        origin: u.origin.clone(),
        seq: u.seq,
        epoch: u.epoch,
    }
}

/// The key of an update's rumor state: (origin, epoch, seq).
pub(crate) type RumorKey = (Arc<str>, u64, u64);

fn key_of(id: &UpdateId) -> RumorKey {
    (Arc::from(id.origin.as_str()), id.epoch, id.seq)
}

/// Bytes an update adds to a message (field tag, length, body).
pub(crate) fn wire_len(u: &proto::Update) -> usize {
    let len = u.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Room taken by the envelope around a batch: tags, lengths, flags.
const BATCH_OVERHEAD: usize = 16;

/// Splits updates into batches of at most `budget` bytes each (an update
/// bigger than that gets a batch of its own).
pub(crate) fn batches(updates: Vec<proto::Update>, budget: usize) -> Vec<Vec<proto::Update>> {
    let mut out: Vec<Vec<proto::Update>> = Vec::new();
    let mut size = 0;
    for u in updates {
        let len = wire_len(&u);
        match out.last_mut() {
            Some(batch) if size + len + BATCH_OVERHEAD <= budget => {
                size += len;
                batch.push(u);
            }
            _ => {
                size = len;
                out.push(vec![u]);
            }
        }
    }
    out
}

impl Replication {
    /// Where this member stands with an update.
    pub fn rumor_state(&self, u: &Update) -> RumorState {
        if self.infected.contains_key(&(u.origin.clone(), u.epoch, u.seq)) {
            RumorState::Infected
        } else if self.store.seen(&u.origin, u.epoch, u.seq) {
            RumorState::Removed
        } else {
            RumorState::Susceptible
        }
    }

    /// Updates this member is spreading.
    pub fn infected_count(&self) -> usize {
        self.infected.len()
    }

    pub(crate) fn infect(&mut self, now: Instant, u: &Update) {
        if self.config.rumors() {
            if self.infected.is_empty() {
                self.next_rumor = now;
            }
            self.infected.insert((u.origin.clone(), u.epoch, u.seq), 0);
        }
    }

    fn lose_interest(&mut self, now: Instant, key: &RumorKey) {
        if self.infected.remove(key).is_some() {
            let t = self.stamp(now);
            self.removed.insert(key.clone(), t);
            self.stats.removed += 1;
        }
    }

    fn coin(&mut self) -> bool {
        self.rng.random_range(0..self.config.rounds) == 0
    }

    pub(crate) fn rumor_round(&mut self, now: Instant, targets: Vec<SocketAddr>) {
        // Updates overwritten since they were infected are not spread.
        let mut current = Vec::new();
        let mut stale = Vec::new();
        for key in self.infected.keys() {
            match self.store.by_id(&key.0, key.1, key.2) {
                Some(u) => current.push(u.to_wire()),
                None => stale.push(key.clone()),
            }
        }
        for key in stale {
            self.lose_interest(now, &key);
        }
        if current.is_empty() || targets.is_empty() {
            return;
        }
        self.stats.rumor_rounds += 1;
        let ids: Vec<RumorKey> = current.iter().map(|u| key_of(&id(u))).collect();
        let want_feedback = self.config.removal == Removal::Feedback;
        let batches = batches(current, self.budget);
        for &to in &targets {
            for b in &batches {
                self.stats.updates_sent += b.len() as u64;
                self.send(
                    to,
                    Body::Rumor(Rumor {
                        updates: b.clone(),
                        want_feedback,
                        reply_to: None,
                    }),
                );
            }
        }
        if self.config.removal == Removal::Blind {
            for key in ids {
                let gone = match self.config.loss {
                    Loss::Counter => {
                        let pushes = self.infected.get_mut(&key).map(|c| {
                            *c += 1;
                            *c
                        });
                        pushes.is_some_and(|c| c >= self.config.rounds)
                    }
                    Loss::Coin => (0..targets.len()).any(|_| self.coin()),
                };
                if gone {
                    self.lose_interest(now, &key);
                }
            }
        }
    }

    pub(crate) fn on_rumor(&mut self, now: Instant, from: SocketAddr, r: Rumor) {
        let from = Replication::reply_address(from, r.reply_to.as_ref());
        let mut known = Vec::new();
        let mut news = Vec::new();
        for w in r.updates {
            self.stats.updates_received += 1;
            if self.store.seen(&w.origin, w.epoch, w.seq) {
                self.stats.redundant += 1;
                known.push(id(&w));
            } else if let Some(u) = Update::from_wire(w) {
                news.push(u);
            }
        }
        // The handler said ignore: as if the push never came, no feedback.
        let mut refused = Vec::new();
        let Some(accepted) = self.accept(now, news, &mut refused) else {
            return;
        };
        // Refused for a quota: answered as known, so the pusher loses
        // interest instead of pushing it here for ever.
        known.extend(refused.into_iter().map(|(origin, epoch, seq)| UpdateId {
            origin: origin.to_string(),
            seq,
            epoch,
        }));
        self.stats.fresh += accepted.len() as u64;
        let fresh: Vec<UpdateId> = accepted
            .iter()
            .map(|u| UpdateId {
                origin: u.origin.to_string(),
                seq: u.seq,
                epoch: u.epoch,
            })
            .collect();
        for u in &accepted {
            self.infect(now, u);
        }
        if r.want_feedback && !(known.is_empty() && fresh.is_empty()) {
            self.send(from, Body::RumorFeedback(RumorFeedback { known, fresh }));
        }
    }

    pub(crate) fn on_feedback(&mut self, now: Instant, f: RumorFeedback) {
        for k in f.known {
            let key = key_of(&k);
            let gone = match self.config.loss {
                Loss::Counter => {
                    let count = self.infected.get_mut(&key).map(|c| {
                        *c += 1;
                        *c
                    });
                    count.is_some_and(|c| c >= self.config.rounds)
                }
                Loss::Coin => self.infected.contains_key(&key) && self.coin(),
            };
            if gone {
                self.lose_interest(now, &key);
            }
        }
        if self.config.loss == Loss::Counter {
            for k in f.fresh {
                if let Some(c) = self.infected.get_mut(&key_of(&k)) {
                    *c = 0;
                }
            }
        }
    }
}
