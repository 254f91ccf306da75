//! SWIM's failure detector (Das, Gupta, Motivala 2002) with Lifeguard's
//! nacks (Dadgar et al. 2017).
//!
//! Every probe period the local member pings the next member of a shuffled
//! round-robin order (each member is probed once per round, so a failure is
//! noticed within one round at worst). With no ack within the probe timeout
//! it asks `indirect_checks` others to ping the target on its behalf
//! (ping-req); they forward the target's ack, or a nack if they heard
//! nothing, which tells the prober its own links work. With no ack by the end
//! of the period the target becomes suspect. A suspect target is told so in
//! the ping itself (Lifeguard's buddy system) so it can refute at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rumormill_wire::proto::{Ack, Envelope, Nack, Ping, PingReq, envelope::Body};

use super::lifecycle::suspect_envelope;
use super::{Env, MemberState, Membership, Tick};

/// The probe in flight.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub(crate) seq: u32,
    pub(crate) target: Arc<str>,
    /// When the direct ping times out and indirect probes start; `None`
    /// once they have.
    pub(crate) direct_deadline: Option<Instant>,
    pub(crate) expected_nacks: u32,
    pub(crate) nacks: u32,
}

/// An indirect probe this member runs for another (the other's ping-req):
/// it pinged the target and forwards the answer, or a nack.
#[derive(Debug, Clone)]
pub(crate) struct IndirectProbe {
    pub(crate) origin: SocketAddr,
    pub(crate) origin_seq: u32,
    pub(crate) deadline: Instant,
}

pub(crate) fn ping(seq: u32, target: &str) -> Envelope {
    Envelope {
        body: Some(Body::Ping(Ping {
            seq,
            target: target.to_owned(),
        })),
    }
}

fn ack(seq: u32) -> Envelope {
    Envelope {
        body: Some(Body::Ack(Ack { seq })),
    }
}

fn nack(seq: u32) -> Envelope {
    Envelope {
        body: Some(Body::Nack(Nack { seq })),
    }
}

impl Membership {
    /// Start of a probe period: conclude the previous probe, then ping the
    /// next member in the round-robin order.
    pub(super) fn probe_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        if let Some(p) = self.probe.take() {
            self.probe_failed(now, p, env);
        }
        self.ticks[Tick::Probe] = now + self.awareness.scale(env.config.probe_interval);
        let Some(i) = self.next_probe_target(env) else { return };
        let m = self.members.at(i);
        let (target, addr) = (m.name.clone(), m.addr());
        let buddy =
            (m.state == MemberState::Suspect).then(|| suspect_envelope(&target, m.incarnation, m.epoch, &self.me.name));
        let seq = self.next_seq();
        // The suspicion goes first: the suspect refutes before it acks, so
        // the ack already carries the refutation.
        let mut msgs: Vec<Envelope> = buddy.into_iter().collect();
        msgs.push(ping(seq, &target));
        self.send(env, addr, msgs);
        self.probe = Some(Probe {
            seq,
            target,
            direct_deadline: Some(now + self.awareness.scale(env.config.probe_timeout)),
            expected_nacks: 0,
            nacks: 0,
        });
    }

    fn next_probe_target(&mut self, env: &mut Env<'_>) -> Option<usize> {
        for _ in 0..=self.members.len() {
            if self.probe_index >= self.members.len() {
                self.members.shuffle(env.rng);
                self.probe_index = 0;
                if self.members.len() == 0 {
                    return None;
                }
            }
            let i = self.probe_index;
            self.probe_index += 1;
            if self.members.at(i).state.is_live() {
                return Some(i);
            }
        }
        None
    }

    /// The direct ping went unanswered: ask others to try.
    pub(super) fn start_indirect_probe(&mut self, env: &mut Env<'_>) {
        let Some(p) = self.probe.as_mut() else { return };
        p.direct_deadline = None;
        let (seq, target) = (p.seq, p.target.clone());
        let Some(t) = self.members.get(&target) else { return };
        let target_addr = t.addr();
        let helpers = self.members.random(env.config.indirect_checks, env.rng, |m| {
            m.state == MemberState::Alive && m.name != target
        });
        if let Some(p) = self.probe.as_mut() {
            p.expected_nacks = helpers.len() as u32;
        }
        for h in helpers {
            let addr = self.members.at(h).addr();
            let req = PingReq {
                seq,
                target: target.to_string(),
                target_addr: Some(target_addr.into()),
            };
            self.send(
                env,
                addr,
                vec![Envelope {
                    body: Some(Body::PingReq(req)),
                }],
            );
        }
    }

    /// The probe period ended with no ack.
    fn probe_failed(&mut self, now: Instant, p: Probe, env: &mut Env<'_>) {
        let delta = if p.expected_nacks > 0 {
            p.expected_nacks - p.nacks.min(p.expected_nacks)
        } else {
            1
        };
        self.awareness.apply(i64::from(delta));
        let Some(m) = self.members.get(&p.target) else { return };
        if m.state.is_live() {
            let (inc, epoch, me) = (m.incarnation, m.epoch, self.me.name.clone());
            self.apply_suspect(now, &p.target, inc, epoch, &me, env);
        }
    }

    pub(crate) fn on_ping(&mut self, from: SocketAddr, p: Ping, env: &mut Env<'_>) {
        // An empty target is a reconnect probe of an address whose member is unknown.
        if !p.target.is_empty() && p.target != *self.me.name {
            env.wire.stats.misdirected += 1;
            return;
        }
        self.send(env, from, vec![ack(p.seq)]);
    }

    pub(crate) fn on_ping_req(&mut self, now: Instant, from: SocketAddr, r: PingReq, env: &mut Env<'_>) {
        let Ok(target_addr) = rumormill_wire::socket_addr(r.target_addr.as_ref()) else {
            env.wire.stats.malformed += 1;
            return;
        };
        let seq = self.next_seq();
        self.indirect_probes.insert(
            seq,
            IndirectProbe {
                origin: from,
                origin_seq: r.seq,
                deadline: now + env.config.probe_timeout,
            },
        );
        self.send(env, target_addr, vec![ping(seq, &r.target)]);
    }

    pub(crate) fn on_ack(&mut self, a: Ack, env: &mut Env<'_>) {
        if let Some(p) = &self.probe {
            if p.seq == a.seq {
                // Answered directly: our links are fine. Through others: no change.
                if p.direct_deadline.is_some() {
                    self.awareness.apply(-1);
                }
                self.probe = None;
                return;
            }
        }
        if let Some(r) = self.indirect_probes.remove(&a.seq) {
            self.send(env, r.origin, vec![ack(r.origin_seq)]);
            return;
        }
        if let Some(addr) = self.reconnects.remove(&a.seq) {
            self.push_pull_with(addr.0, false, env);
        }
    }

    pub(crate) fn on_nack(&mut self, n: Nack) {
        if let Some(p) = self.probe.as_mut() {
            if p.seq == n.seq {
                p.nacks += 1;
            }
        }
    }

    /// Indirect probes whose target stayed silent answer the origin with a
    /// nack.
    pub(super) fn expire_indirect_probes(&mut self, now: Instant, env: &mut Env<'_>) {
        let expired: Vec<u32> = self
            .indirect_probes
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            if let Some(r) = self.indirect_probes.remove(&seq) {
                self.send(env, r.origin, vec![nack(r.origin_seq)]);
            }
        }
    }

    /// Pings an address to see whether a push-pull is worth sending there.
    pub(super) fn reconnect_ping(&mut self, now: Instant, addr: SocketAddr, target: &str, env: &mut Env<'_>) {
        let seq = self.next_seq();
        self.reconnects.insert(seq, (addr, now + env.config.probe_interval));
        self.send(env, addr, vec![ping(seq, target)]);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testkit::{Net, name};
    use crate::{Config, MemberChange, MemberState};

    #[test]
    fn indirect_probes_keep_a_member_alive_across_a_broken_link() {
        let mut net = Net::new(5, Config::new_lan());
        net.run_for(Duration::from_secs(3));
        // n0 cannot reach n1 directly, but others can: n1 is never suspected
        // for long, and never failed.
        net.cut.insert((0, 1));
        net.cut.insert((1, 0));
        net.run_for(Duration::from_secs(60));
        assert!(net.changes(1, MemberChange::Failed).is_empty());
        assert_eq!(net.state_at(0, 1), Some(MemberState::Alive));
        assert!(
            net.changes(1, MemberChange::Suspect).is_empty(),
            "indirect acks answer for n1"
        );
    }

    #[test]
    fn a_member_that_hears_nothing_raises_its_health_score_and_slows_down() {
        let mut net = Net::new(4, Config::new_lan());
        net.run_for(Duration::from_secs(3));
        // Everything sent to n0 is lost: its own probes fail without nacks.
        for i in 1..4 {
            net.cut.insert((i, 0));
        }
        net.run_for(Duration::from_secs(6));
        let score = net.node(0).health_score();
        assert!(score >= 3, "score {score}");
        let before = net.node(0).stats().datagrams_sent;
        net.run_for(Duration::from_secs(10));
        let probes_in_10s = net.node(0).stats().datagrams_sent - before;
        // A healthy member sends 10 probes in 10 s plus gossip; a slowed one far fewer.
        assert!(probes_in_10s < 25, "sent {probes_in_10s}");
    }

    #[test]
    fn a_suspect_learns_it_from_the_ping_itself() {
        // Two members: no one else could tell n1 it is suspected.
        let mut net = Net::new(2, Config::new_lan());
        net.run_for(Duration::from_secs(3));
        net.cut.insert((1, 0)); // n1's acks are lost, n0's pings arrive.
        net.run_for(Duration::from_secs(3));
        assert_eq!(net.state_at(0, 1), Some(MemberState::Suspect));
        assert!(
            net.node(1).local().incarnation >= 1,
            "the buddy ping carried the suspicion"
        );
        net.cut.clear();
        net.run_for(Duration::from_secs(2));
        assert_eq!(net.state_at(0, 1), Some(MemberState::Alive));
        assert!(net.changes(1, MemberChange::Failed).is_empty());
        let _ = name(0);
    }
}
