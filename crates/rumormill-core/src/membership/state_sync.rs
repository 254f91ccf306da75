//! Full-state exchange and the ways a member finds the overlay again.
//!
//! - **Join**: a push-pull request to each seed address; the reply carries
//!   the seed's whole view.
//! - **Push-pull**: every `push_pull_interval` (scaled with the cluster
//!   size) a random live member exchanges full state over a stream, repairing
//!   whatever gossip missed. Tombstones travel too, so a failed or departed
//!   member cannot be brought back by someone's stale view. A remote "failed"
//!   only makes a live member *suspect* here: it gets a chance to refute.
//! - **Reconnect**: every `reconnect_interval` a member pings one seed it does
//!   not see alive, or one failed member (for `reconnect_timeout`); if it
//!   answers, they push-pull. An isolated member, or each side of a healed
//!   partition, finds the rest by itself this way.
//! - **Reaping**: tombstones are forgotten after `tombstone_ttl`.

use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;
use rumormill_wire::proto::{Envelope, MemberState as WireState, MemberStatus, PushPull, envelope::Body};

use super::{Member, MemberState};
use crate::overlay::Overlay;

fn to_wire(s: MemberState) -> MemberStatus {
    match s {
        MemberState::Alive => MemberStatus::Alive,
        MemberState::Suspect => MemberStatus::Suspect,
        MemberState::Failed => MemberStatus::Failed,
        MemberState::Left => MemberStatus::Left,
    }
}

impl Overlay {
    fn push_pull_message(&self, join: bool, reply: bool) -> Envelope {
        let mut members = Vec::with_capacity(self.members.len() + 1);
        members.push(WireState {
            name: self.me.name.to_string(),
            addr: Some(self.me.addr.into()),
            incarnation: self.me.incarnation,
            epoch: self.me.epoch,
            status: MemberStatus::Alive as i32,
        });
        members.extend(self.members.iter().map(|m| WireState {
            name: m.name.to_string(),
            addr: Some(m.addr().into()),
            incarnation: m.incarnation,
            epoch: m.epoch,
            status: to_wire(m.state) as i32,
        }));
        Envelope {
            body: Some(Body::PushPull(PushPull {
                join,
                reply,
                from: self.me.name.to_string(),
                from_addr: Some(self.me.addr.into()),
                members,
            })),
        }
    }

    pub(crate) fn push_pull_with(&mut self, addr: SocketAddr, join: bool) {
        let msg = self.push_pull_message(join, false);
        self.send_stream(addr, msg);
    }

    pub(crate) fn push_pull_tick(&mut self, now: Instant) {
        self.timers.push_pull = now + self.config.push_pull_interval_for(self.cluster_size());
        let peer = self.members.random(1, &mut self.rng, |m| m.state == MemberState::Alive);
        if let Some(&i) = peer.first() {
            let addr = self.members.at(i).addr();
            self.push_pull_with(addr, false);
        }
    }

    pub(crate) fn on_push_pull(&mut self, now: Instant, from: SocketAddr, pp: PushPull) {
        let peer = rumormill_wire::socket_addr(pp.from_addr.as_ref()).unwrap_or(from);
        let incarnation = self.me.incarnation;
        self.merge(now, &pp.from, pp.members);
        if pp.reply && pp.join {
            // Our join was answered: fetch the replicated store (topics,
            // luggage, values) at once rather than at the next interval.
            self.sync_store_with(peer);
            // Members joining at the same moment reach us only by gossip,
            // whose retransmissions can miss one of a burst of joins: one
            // more full-state exchange once the burst is over (1–2 s on a
            // LAN), not a whole push-pull interval later.
            let settle = self.config.gossip_interval * 5;
            let at = now + settle + settle.mul_f64(rand::Rng::random::<f64>(&mut self.rng));
            self.timers.push_pull = self.timers.push_pull.min(at);
        }
        if !pp.reply {
            let msg = self.push_pull_message(pp.join, true);
            self.send_stream(peer, msg);
        } else if self.me.incarnation != incarnation {
            // The peer's view had us suspect or failed: tell it directly
            // rather than wait for it to hear our refutation by gossip.
            let alive = self.local_alive();
            self.send(peer, vec![alive]);
        }
    }

    fn merge(&mut self, now: Instant, from: &str, states: Vec<WireState>) {
        for s in states {
            let Ok(addr) = rumormill_wire::socket_addr(s.addr.as_ref()) else {
                self.stats.malformed += 1;
                continue;
            };
            let (name, inc, epoch) = (s.name.as_str(), s.incarnation, s.epoch);
            let Ok(status) = MemberStatus::try_from(s.status) else {
                self.stats.malformed += 1;
                continue;
            };
            if name.is_empty() {
                self.stats.malformed += 1;
                continue;
            }
            if name == &*self.me.name {
                // Rule 4: refute what this peer believes about us.
                if matches!(status, MemberStatus::Suspect | MemberStatus::Failed) {
                    self.about_me(epoch, inc);
                }
                continue;
            }
            match status {
                MemberStatus::Alive => self.apply_alive(now, name, inc, epoch, addr),
                MemberStatus::Suspect => {
                    // Unknown here: learn the member, then the suspicion.
                    if self.members.position(name).is_none() {
                        self.apply_alive(now, name, inc, epoch, addr);
                    }
                    self.merge_suspicion(now, name, inc, epoch, from);
                }
                MemberStatus::Failed | MemberStatus::Left => {
                    let state = if status == MemberStatus::Left {
                        MemberState::Left
                    } else {
                        MemberState::Failed
                    };
                    let known = self.members.get(name).map(|m| m.state.is_live());
                    match known {
                        // Unknown here: keep the tombstone, quietly, so that
                        // nobody's stale view can resurrect the member.
                        None if self.has_room() => {
                            let since = self.stamp(now);
                            self.members.insert(Member {
                                name: name.into(),
                                addr: addr.into(),
                                incarnation: inc,
                                epoch,
                                state,
                                since,
                            });
                        }
                        Some(true) if state == MemberState::Failed => self.merge_suspicion(now, name, inc, epoch, from),
                        _ => self.apply_dead(
                            now,
                            name,
                            inc,
                            epoch,
                            if state == MemberState::Left { name } else { from },
                        ),
                    }
                }
            }
        }
    }

    /// A suspicion found in someone's full state starts one here if the
    /// member is alive, but never counts as a confirmation: the peer only
    /// relays what it heard, it is no independent evidence.
    fn merge_suspicion(&mut self, now: Instant, name: &str, inc: u32, epoch: u64, from: &str) {
        if self.members.get(name).is_some_and(|m| m.state == MemberState::Alive) {
            self.apply_suspect(now, name, inc, epoch, from);
        }
    }

    /// Joins through the given addresses and remembers them as seeds.
    pub(crate) fn join_via(&mut self, now: Instant, addrs: &[SocketAddr]) {
        // The seeds were just contacted: no need to re-contact them at once.
        self.timers.reconnect = now + self.config.reconnect_interval;
        for &addr in addrs {
            if addr == self.me.addr {
                continue;
            }
            if !self.seeds.contains(&addr) {
                self.seeds.push(addr);
            }
            self.push_pull_with(addr, true);
        }
    }

    pub(crate) fn reconnect_tick(&mut self, now: Instant) {
        self.timers.reconnect = now + self.config.reconnect_interval;
        let live_addrs = |o: &Overlay, a: SocketAddr| o.members.iter().any(|m| m.state.is_live() && m.addr() == a);
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|&a| a != self.me.addr && !live_addrs(self, a))
            .collect();
        let horizon = self.config.reconnect_timeout.as_millis() as u64;
        let t = self.stamp(now);
        let failed = self.members.random(1, &mut self.rng, |m| {
            m.state == MemberState::Failed && t.saturating_sub(m.since) < horizon
        });
        let choices = seeds.len() + failed.len();
        if choices == 0 {
            return;
        }
        let pick = self.rng.random_range(0..choices);
        if pick < seeds.len() {
            self.reconnect_ping(now, seeds[pick], "");
        } else {
            let m = self.members.at(failed[0]);
            let (addr, name) = (m.addr(), m.name.clone());
            self.reconnect_ping(now, addr, &name);
        }
    }

    pub(crate) fn reap_tick(&mut self, now: Instant) {
        self.timers.reap = now + self.config.tombstone_ttl.min(std::time::Duration::from_secs(60));
        let ttl = self.config.tombstone_ttl.as_millis() as u64;
        let t = self.stamp(now);
        let mut i = 0;
        while i < self.members.len() {
            let m = self.members.at(i);
            if !m.state.is_live() && t.saturating_sub(m.since) >= ttl {
                self.members.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testkit::Net;
    use crate::{Config, MemberChange, MemberState};

    #[test]
    fn both_sides_of_a_healed_partition_find_each_other_again() {
        let mut net = Net::new(6, Config::new_lan());
        net.run_for(Duration::from_secs(5));
        net.partition(&[0, 1, 2]);
        net.run_for(Duration::from_secs(60));
        assert_eq!(net.state_at(0, 4), Some(MemberState::Failed));
        assert_eq!(net.state_at(4, 0), Some(MemberState::Failed));
        net.cut.clear();
        let healed = net.now;
        let mut waited = Duration::ZERO;
        while !net.all_alive() {
            assert!(
                waited < Duration::from_secs(60),
                "not healed 60 s after the partition ended"
            );
            net.run_for(Duration::from_secs(1));
            waited += Duration::from_secs(1);
        }
        assert!(net.now - healed <= Duration::from_secs(60));
    }

    #[test]
    fn an_isolated_member_recontacts_its_seed() {
        let mut net = Net::new(3, Config::new_lan());
        net.run_for(Duration::from_secs(3));
        // n2 is cut off until it and the others gave up on each other.
        net.partition(&[2]);
        net.run_for(Duration::from_secs(60));
        assert_eq!(net.node(2).live_count(), 1, "n2 sees nobody alive");
        assert_eq!(net.state_at(0, 2), Some(MemberState::Failed));
        net.cut.clear();
        net.run_for(Duration::from_secs(30));
        assert!(net.all_alive());
        assert!(!net.changes(2, MemberChange::Alive).is_empty());
    }

    #[test]
    fn a_contacted_address_is_sent_a_state_exchange_but_not_kept_as_a_seed() {
        use crate::{Identity, Overlay, Security};
        let now = std::time::Instant::now();
        let me: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut o = Overlay::new(
            Config::new_lan(),
            Identity::new("a", me, 1),
            Security::Plaintext,
            1,
            now,
        );
        let heard: Vec<std::net::SocketAddr> = (1..=100u16).map(|p| ([127, 0, 0, 9], p).into()).collect();
        for &a in &heard {
            o.contact(a).unwrap();
        }
        o.contact(me).unwrap();
        let mut sent = Vec::new();
        while let Some(t) = o.poll_transmit() {
            sent.push(t.to);
        }
        assert_eq!(sent, heard, "one exchange per contacted address, none to itself");
        assert!(o.seeds.is_empty(), "contacted addresses are not seeds");
        o.join(now, &heard[..1]).unwrap();
        assert_eq!(o.seeds, heard[..1], "joined ones are");
    }

    #[test]
    fn the_member_table_does_not_grow_past_its_bound() {
        let mut c = Config::new_lan();
        c.max_members = 3;
        let mut net = Net::new(6, c);
        net.run_for(Duration::from_secs(5));
        assert_eq!(net.node(0).members().count(), 3);
        assert!(net.node(0).stats().table_full > 0);
    }

    #[test]
    fn tombstones_are_reaped_after_their_ttl() {
        let mut c = Config::new_lan();
        c.tombstone_ttl = Duration::from_secs(30);
        let mut net = Net::new(3, c);
        net.run_for(Duration::from_secs(3));
        net.kill(2);
        net.run_for(Duration::from_secs(30));
        assert_eq!(net.state_at(0, 2), Some(MemberState::Failed));
        net.run_for(Duration::from_secs(70));
        assert_eq!(net.state_at(0, 2), None);
    }
}
