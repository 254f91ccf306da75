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

use super::{Env, Member, MemberInfo, MemberState, Members, Membership, Tick};
use crate::overlay::Sender;

fn to_wire(s: MemberState) -> MemberStatus {
    match s {
        MemberState::Alive => MemberStatus::Alive,
        MemberState::Suspect => MemberStatus::Suspect,
        MemberState::Failed => MemberStatus::Failed,
        MemberState::Left => MemberStatus::Left,
    }
}

/// What a push-pull asks of the replicated store: an anti-entropy exchange
/// with the member whose join reply just arrived, sent through the sender
/// it is given (so its datagrams carry piggybacked changes too).
pub(crate) type StoreSync<'s> = dyn FnMut(SocketAddr, &mut Sender<'_>) + 's;

impl Membership {
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

    pub(super) fn push_pull_with(&mut self, addr: SocketAddr, join: bool, env: &mut Env<'_>) {
        let msg = self.push_pull_message(join, false);
        env.wire.send_stream(addr, msg);
    }

    pub(super) fn push_pull_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        self.ticks[Tick::PushPull] = now + env.config.push_pull_interval_for(self.cluster_size());
        let peer = self.members.random(1, env.rng, |m| m.state == MemberState::Alive);
        if let Some(&i) = peer.first() {
            let addr = self.members.at(i).addr();
            self.push_pull_with(addr, false, env);
        }
    }

    pub(crate) fn on_push_pull(
        &mut self,
        now: Instant,
        from: SocketAddr,
        pp: PushPull,
        env: &mut Env<'_>,
        store: &mut StoreSync<'_>,
    ) {
        let peer = rumormill_wire::socket_addr(pp.from_addr.as_ref()).unwrap_or(from);
        let incarnation = self.me.incarnation;
        self.merge(now, &pp.from, pp.members, env);
        if pp.reply && pp.join {
            // Our join was answered: fetch the replicated store (topics,
            // luggage, values) at once rather than at the next interval.
            store(peer, &mut self.sender(env.wire, env.config));
            // Members joining at the same moment reach us only by gossip,
            // whose retransmissions can miss one of a burst of joins: one
            // more full-state exchange once the burst is over (1–2 s on a
            // LAN), not a whole push-pull interval later.
            let settle = env.config.gossip_interval * 5;
            let at = now + settle + settle.mul_f64(env.rng.random::<f64>());
            self.ticks[Tick::PushPull] = self.ticks[Tick::PushPull].min(at);
        }
        if !pp.reply {
            let msg = self.push_pull_message(pp.join, true);
            env.wire.send_stream(peer, msg);
        } else if self.me.incarnation != incarnation {
            // The peer's view had us suspect or failed: tell it directly
            // rather than wait for it to hear our refutation by gossip.
            let alive = self.local_alive();
            self.send(env, peer, vec![alive]);
        }
    }

    fn merge(&mut self, now: Instant, from: &str, states: Vec<WireState>, env: &mut Env<'_>) {
        for s in states {
            let Ok(addr) = rumormill_wire::socket_addr(s.addr.as_ref()) else {
                env.wire.stats.malformed += 1;
                continue;
            };
            let (name, inc, epoch) = (s.name.as_str(), s.incarnation, s.epoch);
            let Ok(status) = MemberStatus::try_from(s.status) else {
                env.wire.stats.malformed += 1;
                continue;
            };
            if name.is_empty() {
                env.wire.stats.malformed += 1;
                continue;
            }
            if name == &*self.me.name {
                // Rule 4: refute what this peer believes about us.
                if matches!(status, MemberStatus::Suspect | MemberStatus::Failed) {
                    self.about_me(epoch, inc, env);
                }
                continue;
            }
            match status {
                MemberStatus::Alive => self.apply_alive(now, name, inc, epoch, addr, env),
                MemberStatus::Suspect => {
                    // Unknown here: learn the member, then the suspicion.
                    if self.members.position(name).is_none() {
                        self.apply_alive(now, name, inc, epoch, addr, env);
                    }
                    self.merge_suspicion(now, name, inc, epoch, from, env);
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
                        None if self.has_room(env) => {
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
                        Some(true) if state == MemberState::Failed => {
                            self.merge_suspicion(now, name, inc, epoch, from, env)
                        }
                        _ => self.apply_dead(
                            now,
                            name,
                            inc,
                            epoch,
                            if state == MemberState::Left { name } else { from },
                            env,
                        ),
                    }
                }
            }
        }
    }

    /// A suspicion found in someone's full state starts one here if the
    /// member is alive, but never counts as a confirmation: the peer only
    /// relays what it heard, it is no independent evidence.
    fn merge_suspicion(&mut self, now: Instant, name: &str, inc: u32, epoch: u64, from: &str, env: &mut Env<'_>) {
        if self.members.get(name).is_some_and(|m| m.state == MemberState::Alive) {
            self.apply_suspect(now, name, inc, epoch, from, env);
        }
    }

    /// Joins through the given addresses and remembers them as seeds.
    pub(crate) fn join_via(&mut self, now: Instant, addrs: &[SocketAddr], env: &mut Env<'_>) {
        // The seeds were just contacted: no need to re-contact them at once.
        self.ticks[Tick::Reconnect] = now + env.config.reconnect_interval;
        for &addr in addrs {
            if addr == self.me.addr {
                continue;
            }
            if !self.seeds.contains(&addr) {
                self.seeds.push(addr);
            }
            self.push_pull_with(addr, true, env);
        }
    }

    /// A full-state exchange with `addr`, which is not kept as a seed.
    pub(crate) fn contact(&mut self, addr: SocketAddr, env: &mut Env<'_>) {
        if addr != self.me.addr {
            self.push_pull_with(addr, true, env);
        }
    }

    /// Adds members known from elsewhere, without events (see
    /// [`crate::Overlay::restore`]).
    pub(crate) fn restore(&mut self, now: Instant, members: impl IntoIterator<Item = MemberInfo>, env: &mut Env<'_>) {
        let since = self.stamp(now);
        let mut fresh: Vec<Member> = members
            .into_iter()
            .filter(|m| m.name != self.me.name && self.members.position(&m.name).is_none())
            .map(|m| Member {
                name: m.name,
                addr: m.addr.into(),
                incarnation: m.incarnation,
                epoch: m.epoch,
                state: if m.state == MemberState::Suspect {
                    MemberState::Alive
                } else {
                    m.state
                },
                since,
            })
            .collect();
        // A random place in the probe order for each, as if they had joined one by one.
        rand::seq::SliceRandom::shuffle(&mut fresh[..], env.rng);
        self.members.reserve(fresh.len());
        for m in fresh {
            self.members.insert(m);
        }
        // Spread the first full-state exchanges over the interval this
        // cluster size calls for, not the base one.
        let interval = env.config.push_pull_interval_for(self.cluster_size());
        self.ticks[Tick::PushPull] = now + interval.mul_f64(env.rng.random::<f64>());
    }

    pub(super) fn reconnect_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        self.ticks[Tick::Reconnect] = now + env.config.reconnect_interval;
        let live_addrs = |m: &Members, a: SocketAddr| m.iter().any(|m| m.state.is_live() && m.addr() == a);
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|&a| a != self.me.addr && !live_addrs(&self.members, a))
            .collect();
        let horizon = env.config.reconnect_timeout.as_millis() as u64;
        let t = self.stamp(now);
        let failed = self.members.random(1, env.rng, |m| {
            m.state == MemberState::Failed && t.saturating_sub(m.since) < horizon
        });
        let choices = seeds.len() + failed.len();
        if choices == 0 {
            return;
        }
        let pick = env.rng.random_range(0..choices);
        if pick < seeds.len() {
            self.reconnect_ping(now, seeds[pick], "", env);
        } else {
            let m = self.members.at(failed[0]);
            let (addr, name) = (m.addr(), m.name.clone());
            self.reconnect_ping(now, addr, &name, env);
        }
    }

    pub(super) fn reap_tick(&mut self, now: Instant, env: &mut Env<'_>) {
        self.ticks[Tick::Reap] = now + env.config.tombstone_ttl.min(std::time::Duration::from_secs(60));
        let ttl = env.config.tombstone_ttl.as_millis() as u64;
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
        assert!(o.seeds().is_empty(), "contacted addresses are not seeds");
        o.join(now, &heard[..1]).unwrap();
        assert_eq!(o.seeds(), &heard[..1], "joined ones are");
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
