//! Membership changes piggybacked on every packet, and the gossip rounds
//! that carry them when there is nothing else to send.
//!
//! Each change (alive, suspect, dead) waits here and is added to outgoing
//! packets — probes, acks and gossip rounds — whenever there is room, the
//! least-sent first and, among equals, the newest first. A change is
//! retransmitted `retransmit_mult · ceil(log10(n + 1))` times, enough for an
//! epidemic to reach every member with high probability, then dropped. News
//! about a member replaces older news about the same member.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use rumormill_wire::proto::Envelope;
use rumormill_wire::{PacketBuilder, envelope_len};

use super::{Env, MemberState, Membership, Tick};
use crate::overlay::next_tick;

type Priority = (u32, Reverse<u64>);

#[derive(Debug)]
struct Entry {
    member: Arc<str>,
    envelope: Envelope,
    len: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Piggyback {
    /// The changes are the pool of active gateways': they go only on
    /// packets between racks, and a rack's changes never do.
    pub(crate) crossing: bool,
    queue: BTreeMap<Priority, Entry>,
    by_member: HashMap<Arc<str>, Priority>,
    next_id: u64,
}

impl Piggyback {
    pub(crate) fn push(&mut self, member: Arc<str>, envelope: Envelope) {
        if let Some(old) = self.by_member.remove(&member) {
            self.queue.remove(&old);
        }
        let prio = (0, Reverse(self.next_id));
        self.next_id += 1;
        let len = envelope_len(&envelope);
        self.by_member.insert(member.clone(), prio);
        self.queue.insert(prio, Entry { member, envelope, len });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether these are the changes of the pool between racks.
    pub(crate) fn is_crossing(&self) -> bool {
        self.crossing
    }

    /// Forgets everything queued.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.by_member.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Adds as many changes as fit, counting a transmission for each and
    /// dropping those sent `limit` times.
    pub(crate) fn fill(&mut self, packet: &mut PacketBuilder, limit: u32) {
        let mut taken = Vec::new();
        let empty = packet.is_empty();
        let mut unsendable = Vec::new();
        for (prio, e) in &self.queue {
            if packet.remaining() < 4 {
                break;
            }
            if packet.fits(e.len) {
                taken.push(*prio);
                // Cannot fail: it fits.
                let _ = packet.push(e.envelope.clone());
            } else if empty && packet.is_empty() {
                // Bigger than a whole datagram: it could never be sent.
                unsendable.push(*prio);
            }
        }
        for prio in unsendable {
            if let Some(e) = self.queue.remove(&prio) {
                self.by_member.remove(&e.member);
            }
        }
        for prio in taken {
            let Some(e) = self.queue.remove(&prio) else { continue };
            let sent = prio.0 + 1;
            if sent >= limit {
                self.by_member.remove(&e.member);
            } else {
                let next = (sent, prio.1);
                self.by_member.insert(e.member.clone(), next);
                self.queue.insert(next, e);
            }
        }
    }
}

impl Membership {
    /// A gossip round: piggybacked changes to a few random members (live
    /// ones, and recently failed ones so they can refute).
    pub(super) fn gossip_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        self.ticks[Tick::Gossip] = next_tick(self.ticks[Tick::Gossip], env.config.gossip_interval, now);
        if self.piggyback.is_empty() {
            return;
        }
        let dead_window = env.config.gossip_to_the_dead.as_millis() as u64;
        let t = self.stamp(now);
        let targets = self.members.random(env.config.gossip_nodes, env.rng, |m| {
            m.state.is_live() || (m.state == MemberState::Failed && t.saturating_sub(m.since) < dead_window)
        });
        if targets.is_empty() && self.leaving {
            // Nobody left to tell: the leave is complete.
            self.piggyback.clear();
        }
        for i in targets {
            let addr = self.members.at(i).addr();
            self.send(env, addr, Vec::new());
            if self.piggyback.is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumormill_wire::proto::{Ack, envelope::Body};

    fn env(seq: u32) -> Envelope {
        Envelope {
            body: Some(Body::Ack(Ack { seq })),
        }
    }

    #[test]
    fn each_change_is_sent_limit_times_then_dropped() {
        let mut q = Piggyback::default();
        q.push("a".into(), env(1));
        for round in 0..3 {
            let mut b = PacketBuilder::new(1000);
            q.fill(&mut b, 3);
            assert_eq!(b.len(), 1, "round {round}");
        }
        assert!(q.is_empty());
    }

    #[test]
    fn news_bigger_than_a_datagram_is_dropped_not_kept_forever() {
        let mut q = Piggyback::default();
        q.push("a".into(), env(1));
        let big = Envelope {
            body: Some(Body::Alive(rumormill_wire::proto::Alive {
                name: "x".repeat(2000),
                ..Default::default()
            })),
        };
        q.push("x".into(), big);
        let mut b = PacketBuilder::new(1300);
        q.fill(&mut b, 10);
        assert_eq!(b.len(), 1);
        assert_eq!(
            q.len(),
            1,
            "the oversized entry is gone, the small one stays for more sends"
        );
    }

    #[test]
    fn newer_news_about_a_member_replaces_the_old_and_least_sent_go_first() {
        let mut q = Piggyback::default();
        q.push("a".into(), env(1));
        let mut b = PacketBuilder::new(1000);
        q.fill(&mut b, 10);
        q.push("b".into(), env(2));
        q.push("a".into(), env(3));
        assert_eq!(q.len(), 2);
        // Room for one envelope only: the newest unsent goes first.
        let mut b = PacketBuilder::new(envelope_len(&env(3)));
        q.fill(&mut b, 10);
        assert_eq!(
            rumormill_wire::decode_packet(&b.finish()).unwrap().envelopes,
            vec![env(3)]
        );
    }
}
