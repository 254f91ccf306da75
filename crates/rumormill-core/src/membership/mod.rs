//! Membership: who is in the overlay and in what state.
//!
//! - [`lifecycle`]: the rules by which a member becomes alive, suspect,
//!   failed or left, and refutes suspicion about itself;
//! - [`swim`]: the failure detector's probes (ping, ack, ping-req, nack);
//! - [`suspicion`]: Lifeguard's suspicion timeout that shrinks with
//!   independent confirmations;
//! - [`awareness`]: Lifeguard's local health multiplier;
//! - [`piggyback`]: membership changes retransmitted on every packet;
//! - [`state_sync`]: joins, push-pull full-state exchange, reconnection.

pub(crate) mod awareness;
pub(crate) mod lifecycle;
pub(crate) mod piggyback;
pub(crate) mod state_sync;
pub(crate) mod suspicion;
pub(crate) mod swim;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

/// A member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; failed unless it refutes in time.
    Suspect,
    /// Declared failed. Kept as a tombstone.
    Failed,
    /// Left gracefully. Kept as a tombstone.
    Left,
}

impl MemberState {
    /// Alive or suspect: still probed and counted in the cluster size.
    pub fn is_live(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// A public snapshot of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The member's name, unique in the overlay.
    pub name: Arc<str>,
    /// Where it receives datagrams and streams.
    pub addr: SocketAddr,
    /// Its incarnation within its boot epoch.
    pub incarnation: u32,
    /// Its boot epoch: a restarted member comes back with a higher one.
    pub epoch: u64,
    /// Its state.
    pub state: MemberState,
}

/// One entry of the member table.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) name: Arc<str>,
    pub(crate) addr: SocketAddr,
    pub(crate) incarnation: u32,
    pub(crate) epoch: u64,
    pub(crate) state: MemberState,
    /// When the state last changed.
    pub(crate) since: Instant,
}

impl Member {
    pub(crate) fn info(&self) -> MemberInfo {
        MemberInfo {
            name: self.name.clone(),
            addr: self.addr,
            incarnation: self.incarnation,
            epoch: self.epoch,
            state: self.state,
        }
    }

    /// The order of a member's versions: a new boot epoch beats any
    /// incarnation of the old one.
    pub(crate) fn version(&self) -> (u64, u32) {
        (self.epoch, self.incarnation)
    }
}

/// The other members (not the local one), addressable by index for O(1)
/// random choice and by name. The name index is only looked up, never
/// iterated, so its order cannot change behaviour.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Vec<Member>,
    index: HashMap<Arc<str>, usize>,
    live: usize,
}

impl Members {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Alive and suspect members.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Member> {
        self.position(name).map(|i| &self.list[i])
    }

    pub(crate) fn at(&self, i: usize) -> &Member {
        &self.list[i]
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.list.iter()
    }

    pub(crate) fn insert(&mut self, m: Member) -> usize {
        if let Some(i) = self.position(&m.name) {
            self.update(i, |slot| *slot = m);
            return i;
        }
        let i = self.list.len();
        if m.state.is_live() {
            self.live += 1;
        }
        self.index.insert(m.name.clone(), i);
        self.list.push(m);
        i
    }

    /// Inserts a new member at a random position of the probe order (as
    /// memberlist does), so that members that learn of each other at the
    /// same time do not probe in lockstep.
    pub(crate) fn insert_randomly(&mut self, m: Member, rng: &mut impl Rng) -> usize {
        let i = self.insert(m);
        let j = rng.random_range(0..self.list.len());
        if i != j {
            self.list.swap(i, j);
            for k in [i, j] {
                let name = self.list[k].name.clone();
                self.index.insert(name, k);
            }
        }
        j
    }

    /// Changes a member, keeping the live count right.
    pub(crate) fn update(&mut self, i: usize, f: impl FnOnce(&mut Member)) {
        let was = self.list[i].state.is_live();
        f(&mut self.list[i]);
        match (was, self.list[i].state.is_live()) {
            (true, false) => self.live -= 1,
            (false, true) => self.live += 1,
            _ => {}
        }
    }

    pub(crate) fn remove(&mut self, i: usize) -> Member {
        let m = self.list.swap_remove(i);
        self.index.remove(&m.name);
        if let Some(moved) = self.list.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
        if m.state.is_live() {
            self.live -= 1;
        }
        m
    }

    /// Shuffles the table (the probe order) and rebuilds the index.
    pub(crate) fn shuffle(&mut self, rng: &mut impl Rng) {
        use rand::seq::SliceRandom;
        self.list.shuffle(rng);
        for (i, m) in self.list.iter().enumerate() {
            if let Some(slot) = self.index.get_mut(&m.name) {
                *slot = i;
            }
        }
    }

    /// Up to `k` distinct random members accepted by `eligible`.
    pub(crate) fn random(&self, k: usize, rng: &mut impl Rng, eligible: impl Fn(&Member) -> bool) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        let n = self.list.len();
        if k == 0 || n == 0 {
            return out;
        }
        // Random probing is cheap when eligible members are common; fall back
        // to a full scan when they are rare.
        for _ in 0..(4 * k + 8) {
            if out.len() == k {
                return out;
            }
            let i = rng.random_range(0..n);
            if !out.contains(&i) && eligible(&self.list[i]) {
                out.push(i);
            }
        }
        let mut rest: Vec<usize> = (0..n)
            .filter(|i| !out.contains(i) && eligible(&self.list[*i]))
            .collect();
        while out.len() < k && !rest.is_empty() {
            let j = rng.random_range(0..rest.len());
            out.push(rest.swap_remove(j));
        }
        out
    }
}
