//! The rules by which a member's state changes.
//!
//! Versions are ordered by `(boot epoch, incarnation)`: a restarted member
//! (new epoch) supersedes everything said about its previous life, and
//! within one life only the member itself raises its incarnation, to refute
//! a suspicion. For one version, failed beats suspect beats alive, so:
//!
//! - **alive** is accepted for an unknown member, a newer epoch, or a higher
//!   incarnation; the same incarnation never revives a failed or departed
//!   member (tombstones), and an alive member cannot move to another address
//!   within one epoch (a name conflict);
//! - **suspect** at the current or a higher incarnation marks an alive member
//!   suspect and starts a [`Suspicion`]; on a suspect member it counts as a
//!   confirmation;
//! - **dead** at the current or a higher version marks a member failed, or
//!   left when the member said so itself;
//! - news about the local member at its current version is **refuted**: its
//!   incarnation goes up and the new alive spreads.
//!
//! Every accepted change is queued for piggybacking, so it spreads further.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rumormill_wire::proto::{Alive, Dead, Envelope, Suspect, envelope::Body};

use super::suspicion::Suspicion;
use super::{Env, Member, MemberState, Membership, Tick};
use crate::notification::{MemberChange, Notification};

pub(crate) fn alive_envelope(name: &str, incarnation: u32, epoch: u64, addr: SocketAddr) -> Envelope {
    Envelope {
        body: Some(Body::Alive(Alive {
            name: name.to_owned(),
            incarnation,
            epoch,
            addr: Some(addr.into()),
        })),
    }
}

pub(crate) fn suspect_envelope(name: &str, incarnation: u32, epoch: u64, from: &str) -> Envelope {
    Envelope {
        body: Some(Body::Suspect(Suspect {
            name: name.to_owned(),
            incarnation,
            epoch,
            from: from.to_owned(),
        })),
    }
}

pub(crate) fn dead_envelope(name: &str, incarnation: u32, epoch: u64, from: &str) -> Envelope {
    Envelope {
        body: Some(Body::Dead(Dead {
            name: name.to_owned(),
            incarnation,
            epoch,
            from: from.to_owned(),
        })),
    }
}

impl Membership {
    /// An alive message: the address is checked here, as the rules need one.
    pub(crate) fn on_alive(&mut self, now: Instant, a: Alive, env: &mut Env<'_>) {
        match rumormill_wire::socket_addr(a.addr.as_ref()) {
            Ok(addr) if !a.name.is_empty() => self.apply_alive(now, &a.name, a.incarnation, a.epoch, addr, env),
            _ => env.wire.stats.malformed += 1,
        }
    }

    pub(crate) fn on_suspect(&mut self, now: Instant, s: Suspect, env: &mut Env<'_>) {
        self.apply_suspect(now, &s.name, s.incarnation, s.epoch, &s.from, env);
    }

    /// Marks a member as left, as if it had announced it: for a pool whose
    /// members are superseded by news from outside it (a rack's gateway
    /// replaced by one of a higher term). The departure is gossiped.
    pub(crate) fn retire(&mut self, now: Instant, name: &str, env: &mut Env<'_>) {
        if let Some((epoch, incarnation)) = self.members.get(name).map(Member::version) {
            self.apply_dead(now, name, incarnation, epoch, name, env);
        }
    }

    pub(crate) fn on_dead(&mut self, now: Instant, d: Dead, env: &mut Env<'_>) {
        self.apply_dead(now, &d.name, d.incarnation, d.epoch, &d.from, env);
    }

    pub(super) fn apply_alive(
        &mut self,
        now: Instant,
        name: &str,
        incarnation: u32,
        epoch: u64,
        addr: SocketAddr,
        env: &mut Env<'_>,
    ) {
        if name == &*self.me.name {
            if epoch == self.me.epoch && incarnation > self.me.incarnation && !self.leaving {
                self.refute(incarnation, env);
            }
            return;
        }
        let Some(i) = self.members.position(name) else {
            if !self.has_room(env) {
                return;
            }
            let name: Arc<str> = name.into();
            let since = self.stamp(now);
            let member = Member {
                name: name.clone(),
                addr: addr.into(),
                incarnation,
                epoch,
                state: MemberState::Alive,
                since,
            };
            let i = self.members.insert_randomly(member, env.rng);
            self.emit(MemberChange::Joined, i);
            self.piggyback
                .push(name, alive_envelope(&self.members.at(i).name, incarnation, epoch, addr));
            return;
        };
        let m = self.members.at(i);
        let new_life = epoch > m.epoch;
        if epoch < m.epoch {
            return;
        }
        if !new_life {
            // A live member cannot move within one life. A tombstone can:
            // its epoch may have come from a `Dead`, which has no address.
            if addr != m.addr() && m.state.is_live() {
                env.wire.stats.name_conflicts += 1;
                return;
            }
            if incarnation <= m.incarnation {
                return;
            }
        }
        let was = m.state;
        let moved = addr != m.addr();
        let since = self.stamp(now);
        let name = m.name.clone();
        self.members.update(i, |m| {
            m.incarnation = incarnation;
            m.epoch = epoch;
            m.addr = addr.into();
            if was != MemberState::Alive {
                m.state = MemberState::Alive;
                m.since = since;
            }
        });
        self.suspicions.remove(&name);
        let change = match was {
            MemberState::Alive if new_life || moved => Some(MemberChange::Updated),
            MemberState::Alive => None,
            _ => Some(MemberChange::Alive),
        };
        if let Some(change) = change {
            self.emit(change, i);
        }
        self.piggyback
            .push(name.clone(), alive_envelope(&name, incarnation, epoch, addr));
    }

    pub(super) fn apply_suspect(
        &mut self,
        now: Instant,
        name: &str,
        incarnation: u32,
        epoch: u64,
        from: &str,
        env: &mut Env<'_>,
    ) {
        if name == &*self.me.name {
            self.about_me(epoch, incarnation, env);
            return;
        }
        let Some(i) = self.members.position(name) else { return };
        let m = self.members.at(i);
        if epoch != m.epoch || incarnation < m.incarnation {
            return;
        }
        let name = m.name.clone();
        match m.state {
            MemberState::Failed | MemberState::Left => {}
            MemberState::Suspect => {
                if incarnation > m.incarnation {
                    self.members.update(i, |m| m.incarnation = incarnation);
                    if let Some(s) = self.suspicions.get_mut(&name) {
                        s.incarnation = incarnation;
                    }
                }
                let confirmed = self.suspicions.get_mut(&name).is_some_and(|s| s.confirm(from.into()));
                if confirmed {
                    self.piggyback
                        .push(name.clone(), suspect_envelope(&name, incarnation, epoch, from));
                }
            }
            MemberState::Alive => {
                let since = self.stamp(now);
                self.members.update(i, |m| {
                    m.state = MemberState::Suspect;
                    m.incarnation = incarnation;
                    m.since = since;
                });
                let n = self.cluster_size();
                let config = env.config;
                let timeouts = config.suspicion_timeouts(n);
                let k = config.suspicion_mult.saturating_sub(2);
                let k = if n.saturating_sub(2) < k as usize { 0 } else { k };
                let check = config.probe_interval * 2;
                let s = Suspicion::new(now, (epoch, incarnation), from.into(), k, timeouts, check);
                self.suspicions.insert(name.clone(), s);
                self.emit(MemberChange::Suspect, i);
                self.piggyback
                    .push(name.clone(), suspect_envelope(&name, incarnation, epoch, from));
            }
        }
    }

    pub(super) fn apply_dead(
        &mut self,
        now: Instant,
        name: &str,
        incarnation: u32,
        epoch: u64,
        from: &str,
        env: &mut Env<'_>,
    ) {
        let left = name == from;
        if name == &*self.me.name {
            if !left {
                self.about_me(epoch, incarnation, env);
            }
            return;
        }
        let Some(i) = self.members.position(name) else { return };
        let m = self.members.at(i);
        if (epoch, incarnation) < m.version() {
            return;
        }
        let name = m.name.clone();
        let state = if left { MemberState::Left } else { MemberState::Failed };
        if !m.state.is_live() {
            // Already a tombstone: only keep the newest version.
            self.members.update(i, |m| {
                m.epoch = epoch;
                m.incarnation = incarnation;
            });
            return;
        }
        let since = self.stamp(now);
        self.members.update(i, |m| {
            m.state = state;
            m.epoch = epoch;
            m.incarnation = incarnation;
            m.since = since;
        });
        self.suspicions.remove(&name);
        self.emit(if left { MemberChange::Left } else { MemberChange::Failed }, i);
        self.piggyback
            .push(name.clone(), dead_envelope(&name, incarnation, epoch, from));
    }

    /// Pings suspects whose check is due, with the suspicion in the same
    /// packet (first, so the ack already carries any refutation).
    pub(super) fn check_suspects(&mut self, now: Instant, env: &mut Env<'_>) {
        let due: Vec<Arc<str>> = self
            .suspicions
            .iter()
            .filter(|(_, s)| s.next_check <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let base = env.config.probe_interval;
        for name in due {
            if let Some(s) = self.suspicions.get_mut(&name) {
                s.checked(now, base);
            }
            let Some(m) = self.members.get(&name) else { continue };
            let (addr, inc, epoch) = (m.addr(), m.incarnation, m.epoch);
            let buddy = suspect_envelope(&name, inc, epoch, &self.me.name);
            let seq = self.next_seq();
            self.send(env, addr, vec![buddy, super::swim::ping(seq, &name)]);
        }
    }

    /// Suspicion timed out: the local member declares the suspect failed.
    pub(super) fn expire_suspicions(&mut self, now: Instant, env: &mut Env<'_>) {
        let expired: Vec<(Arc<str>, Suspicion)> = self
            .suspicions
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let me = self.me.name.clone();
        for (name, s) in expired {
            self.suspicions.remove(&name);
            // Declare the member failed at the version it is suspected at now.
            let (inc, epoch) = match self.members.get(&name) {
                Some(m) if m.state == MemberState::Suspect && m.epoch == s.epoch => (m.incarnation, m.epoch),
                _ => (s.incarnation, s.epoch),
            };
            self.apply_dead(now, &name, inc, epoch, &me, env);
        }
    }

    /// Someone suspects the local member, or declares it failed. At the
    /// current version: refute. At an older version the sender missed the
    /// refutation: spread the current alive again (no new incarnation).
    pub(super) fn about_me(&mut self, epoch: u64, incarnation: u32, env: &mut Env<'_>) {
        if self.leaving || epoch != self.me.epoch {
            return;
        }
        if incarnation >= self.me.incarnation {
            self.refute(incarnation, env);
        } else {
            let alive = self.local_alive();
            self.piggyback.push(self.me.name.clone(), alive);
        }
    }

    /// Someone says the local member is suspect or failed (or is alive at a
    /// version it never had): raise the incarnation and spread the news.
    pub(super) fn refute(&mut self, seen: u32, env: &mut Env<'_>) {
        self.me.incarnation = seen.max(self.me.incarnation).saturating_add(1);
        self.awareness.apply(1);
        env.wire.stats.refutations += 1;
        let alive = self.local_alive();
        self.piggyback.push(self.me.name.clone(), alive);
    }

    /// Leaves gracefully: the departure is piggybacked, and gossiped at once.
    pub(crate) fn leave(&mut self, now: Instant) {
        self.leaving = true;
        self.probe = None;
        let (name, inc, epoch) = (self.me.name.clone(), self.me.incarnation, self.me.epoch);
        let dead = dead_envelope(&name, inc, epoch, &name);
        self.piggyback.push(name, dead);
        self.ticks[Tick::Gossip] = now;
    }

    pub(super) fn local_alive(&self) -> Envelope {
        alive_envelope(&self.me.name, self.me.incarnation, self.me.epoch, self.me.addr)
    }

    pub(super) fn emit(&mut self, change: MemberChange, i: usize) {
        self.events.push_back(Notification::Member {
            change,
            member: self.members.at(i).info(),
        });
    }

    /// Whether the member table may grow; counts a refusal.
    pub(super) fn has_room(&mut self, env: &mut Env<'_>) -> bool {
        let room = self.members.len() < env.config.max_members;
        if !room {
            env.wire.stats.table_full += 1;
        }
        room
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{alive_envelope, dead_envelope, suspect_envelope};
    use crate::testkit::{Net, addr, name};
    use crate::{Config, FrameKind, MemberChange, MemberInfo, MemberState, Overlay, Security};

    fn lan() -> Config {
        Config::new_lan()
    }

    #[test]
    fn members_join_through_a_seed_and_converge() {
        let mut net = Net::new(5, lan());
        net.run_for(Duration::from_secs(5));
        assert!(net.all_alive());
        assert_eq!(net.node(4).live_count(), 5);
    }

    #[test]
    fn a_suspected_member_refutes_with_a_higher_incarnation() {
        let mut net = Net::new(4, lan());
        net.run_for(Duration::from_secs(3));
        // Cut n3 off long enough to be suspected, not long enough to be failed.
        net.partition(&[3]);
        for _ in 0..100 {
            if !net.changes(3, MemberChange::Suspect).is_empty() {
                break;
            }
            net.run_for(Duration::from_millis(100));
        }
        assert!(
            !net.changes(3, MemberChange::Suspect).is_empty(),
            "n3 should be suspected"
        );
        net.cut.clear();
        net.run_for(Duration::from_secs(3));
        assert!(net.node(3).local().incarnation >= 1, "n3 must have refuted");
        assert!(
            net.changes(3, MemberChange::Failed).is_empty(),
            "refuted in time: never failed"
        );
        assert!(!net.changes(3, MemberChange::Alive).is_empty());
        // n3 suspected everyone while cut off; Lifeguard slowed its probes, so
        // its own view takes a little longer to mend.
        for _ in 0..30 {
            if net.all_alive() {
                break;
            }
            net.run_for(Duration::from_secs(1));
        }
        assert!(net.all_alive());
    }

    #[test]
    fn a_silent_member_is_declared_failed_by_everyone() {
        let mut net = Net::new(5, lan());
        net.run_for(Duration::from_secs(3));
        net.kill(2);
        net.run_for(Duration::from_secs(40));
        for i in [0, 1, 3, 4] {
            assert_eq!(net.state_at(i, 2), Some(MemberState::Failed), "seen by n{i}");
        }
    }

    #[test]
    fn graceful_leave_is_left_not_failed() {
        let mut net = Net::new(4, lan());
        net.run_for(Duration::from_secs(3));
        let now = net.now;
        net.node(1).leave(now);
        net.run_for(Duration::from_secs(5));
        assert!(net.node(1).is_closed());
        for i in [0, 2, 3] {
            assert_eq!(net.state_at(i, 1), Some(MemberState::Left));
        }
        assert!(net.changes(1, MemberChange::Failed).is_empty());
    }

    #[test]
    fn the_last_member_can_leave() {
        let mut net = Net::new(2, lan());
        net.run_for(Duration::from_secs(3));
        let now = net.now;
        net.node(1).leave(now);
        net.run_for(Duration::from_secs(5));
        let now = net.now;
        net.node(0).leave(now);
        net.run_for(Duration::from_secs(5));
        assert!(net.node(0).is_closed(), "alone, the leave completes at once");
        assert_eq!(net.node(0).poll_timeout(), None);
    }

    #[test]
    fn a_stale_state_sync_never_resurrects_a_departed_member() {
        let mut net = Net::new(3, lan());
        net.run_for(Duration::from_secs(3));
        let old = net.node(0).member(&name(2)).expect("n0 knows n2");
        let now = net.now;
        net.node(2).leave(now);
        net.run_for(Duration::from_secs(5));
        assert_eq!(net.state_at(0, 2), Some(MemberState::Left));
        // A member that still holds n2 alive at the same version syncs with n0.
        let mut stale = Overlay::new(
            lan(),
            crate::Identity::new("stale", addr(99), 1),
            Security::Plaintext,
            5,
            now,
        );
        stale.restore(
            now,
            [MemberInfo {
                state: MemberState::Alive,
                ..old
            }],
        );
        stale.join(now, &[addr(0)]).expect("active");
        net.nodes.push(Some(stale));
        net.run_for(Duration::from_millis(10));
        assert_eq!(net.state_at(0, 2), Some(MemberState::Left), "the tombstone wins");
        assert!(net.changes(2, MemberChange::Alive).is_empty());
        // And n0's reply taught the stale member the tombstone.
        let stale = net.nodes[3].as_ref().expect("running");
        assert_eq!(stale.member(&name(2)).map(|m| m.state), Some(MemberState::Left));
    }

    #[test]
    fn a_restarted_member_takes_over_its_name_at_a_new_address() {
        let mut net = Net::new(4, lan());
        net.run_for(Duration::from_secs(3));
        net.kill(3);
        net.run_for(Duration::from_secs(40));
        assert_eq!(net.state_at(0, 3), Some(MemberState::Failed));
        net.restart(3, 2, addr(50));
        net.run_for(Duration::from_secs(3));
        for i in 0..3 {
            let m = net.node(i).member(&name(3)).expect("known");
            assert_eq!(
                (m.state, m.epoch, m.addr),
                (MemberState::Alive, 2, addr(50)),
                "seen by n{i}"
            );
        }
        assert!(!net.changes(3, MemberChange::Alive).is_empty());
    }

    #[test]
    fn a_quick_restart_before_detection_is_an_update() {
        let mut net = Net::new(3, lan());
        net.run_for(Duration::from_secs(3));
        net.kill(2);
        net.restart(2, 2, addr(2));
        net.run_for(Duration::from_secs(2));
        assert!(!net.changes(2, MemberChange::Updated).is_empty());
        assert_eq!(net.node(0).member(&name(2)).map(|m| m.epoch), Some(2));
        assert!(net.changes(2, MemberChange::Failed).is_empty());
    }

    #[test]
    fn a_suspicion_raised_to_a_higher_incarnation_still_expires() {
        let mut net = Net::new(3, lan());
        net.run_for(Duration::from_secs(3));
        net.kill(2);
        // n0 hears that n2 is suspect, then suspect again at a higher incarnation
        // (n2 had refuted once before it crashed).
        net.inject(
            0,
            addr(1),
            FrameKind::Datagram,
            vec![suspect_envelope(&name(2), 0, 1, &name(1))],
        );
        net.inject(
            0,
            addr(1),
            FrameKind::Datagram,
            vec![suspect_envelope(&name(2), 1, 1, &name(1))],
        );
        assert_eq!(net.state_at(0, 2), Some(MemberState::Suspect));
        net.run_for(Duration::from_secs(60));
        assert_eq!(
            net.state_at(0, 2),
            Some(MemberState::Failed),
            "the suspicion must end in failure"
        );
    }

    #[test]
    fn a_tombstone_from_a_newer_life_accepts_that_life_at_its_new_address() {
        let mut net = Net::new(3, lan());
        net.run_for(Duration::from_secs(3));
        // n2 restarted (epoch 2) at a new address; n0 missed its alive and
        // first hears that the new life failed, then that it refuted.
        net.inject(
            0,
            addr(1),
            FrameKind::Datagram,
            vec![dead_envelope(&name(2), 0, 2, &name(1))],
        );
        assert_eq!(net.state_at(0, 2), Some(MemberState::Failed));
        net.inject(
            0,
            addr(1),
            FrameKind::Datagram,
            vec![alive_envelope(&name(2), 1, 2, addr(60))],
        );
        let m = net.node(0).member(&name(2)).expect("known");
        assert_eq!(
            (m.state, m.epoch, m.incarnation, m.addr),
            (MemberState::Alive, 2, 1, addr(60))
        );
        assert_eq!(net.node(0).stats().name_conflicts, 0);
    }

    #[test]
    fn a_state_sync_that_suspects_us_is_refuted() {
        let mut net = Net::new(2, lan());
        net.run_for(Duration::from_secs(2));
        let me = net.node(0).local();
        let state = rumormill_wire::proto::MemberState {
            name: me.name.to_string(),
            addr: Some(me.addr.into()),
            incarnation: me.incarnation,
            epoch: me.epoch,
            status: rumormill_wire::proto::MemberStatus::Suspect as i32,
        };
        let pp = rumormill_wire::proto::PushPull {
            join: false,
            reply: false,
            from: "x".into(),
            from_addr: Some(addr(70).into()),
            members: vec![state],
        };
        let env = rumormill_wire::proto::Envelope {
            body: Some(rumormill_wire::proto::envelope::Body::PushPull(pp)),
        };
        net.inject(0, addr(70), FrameKind::Stream, vec![env]);
        assert_eq!(net.node(0).local().incarnation, me.incarnation + 1);
    }

    #[test]
    fn an_address_conflict_within_one_epoch_is_refused() {
        let mut net = Net::new(2, lan());
        net.run_for(Duration::from_secs(2));
        let now = net.now;
        // An impostor claims n1's name and epoch from another address.
        let mut impostor = Overlay::new(
            lan(),
            crate::Identity::new(name(1), addr(77), 1),
            Security::Plaintext,
            9,
            now,
        );
        impostor.join(now, &[addr(0)]).expect("active");
        while let Some(t) = impostor.poll_transmit() {
            net.raw(0, addr(77), t.kind, &t.payload);
        }
        assert_eq!(net.node(0).member(&name(1)).map(|m| m.addr), Some(addr(1)));
        assert!(net.node(0).stats().name_conflicts >= 1);
    }
}
