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
#[cfg(test)]
mod security_tests;
pub(crate) mod state_sync;
pub(crate) mod suspicion;
pub(crate) mod swim;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hashbrown::HashTable;
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

/// A socket address in 19 bytes (std's takes 32): the member table of a
/// large simulation holds 10⁸ of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompactAddr {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl From<SocketAddr> for CompactAddr {
    fn from(a: SocketAddr) -> CompactAddr {
        let (ip, v6) = match a.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
            IpAddr::V6(v6) => (v6.octets(), true),
        };
        CompactAddr {
            ip,
            port: a.port().to_be_bytes(),
            v6,
        }
    }
}

impl CompactAddr {
    pub(crate) fn get(self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.ip);
        let ip = match (self.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, u16::from_be_bytes(self.port))
    }
}

/// Milliseconds since the overlay was created: the member table's clock.
pub(crate) type Stamp = u64;

/// One entry of the member table (56 bytes).
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) name: Arc<str>,
    pub(crate) epoch: u64,
    /// When the state last changed.
    pub(crate) since: Stamp,
    pub(crate) incarnation: u32,
    pub(crate) addr: CompactAddr,
    pub(crate) state: MemberState,
}

impl Member {
    pub(crate) fn info(&self) -> MemberInfo {
        MemberInfo {
            name: self.name.clone(),
            addr: self.addr.get(),
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

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// This member's share of the view digest while it is live.
    fn digest(&self) -> u64 {
        if self.state.is_live() {
            name_hash(&self.name) ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        } else {
            0
        }
    }
}

/// FNV-1a: a fixed, fast hash for member names (no per-process seed, so
/// nothing about a run depends on the process).
pub(crate) fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The other members (not the local one), addressable by index for O(1)
/// random choice and by name. The name index holds only positions (4 bytes
/// a member: a simulation of 10,000 members holds 10⁸ entries) and is only
/// looked up, never iterated, so its order cannot change behaviour.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Vec<Member>,
    index: HashTable<u32>,
    live: usize,
    digest: u64,
}

impl Members {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Alive and suspect members.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Sum of the live members' `(name, epoch)` hashes: two members with the
    /// same digest (and count) see the same live members, whp.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    pub(crate) fn reserve(&mut self, more: usize) {
        self.list.reserve(more);
        let list = &self.list;
        self.index.reserve(more, |&k| name_hash(&list[k as usize].name));
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        let list = &self.list;
        self.index
            .find(name_hash(name), |&i| &*list[i as usize].name == name)
            .map(|&i| i as usize)
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
        self.digest = self.digest.wrapping_add(m.digest());
        let list = &self.list;
        self.index.insert_unique(name_hash(&m.name), i as u32, |&k| {
            name_hash(list.get(k as usize).map_or(&*m.name, |x| &*x.name))
        });
        self.list.push(m);
        i
    }

    /// Inserts a new member at a random position of the probe order (as
    /// memberlist does), so that members that learn of each other at the
    /// same time do not probe in lockstep.
    pub(crate) fn insert_randomly(&mut self, m: Member, rng: &mut impl Rng) -> usize {
        let i = self.insert(m);
        let j = rng.random_range(0..self.list.len());
        self.swap(i, j);
        j
    }

    /// Swaps two positions. The index entries are taken out first and put
    /// back after: positions in the index are a permutation, so each lookup
    /// by position is unambiguous at every step.
    fn swap(&mut self, i: usize, j: usize) {
        if i == j {
            return;
        }
        self.unindex(i);
        self.unindex(j);
        self.list.swap(i, j);
        self.index_at(i);
        self.index_at(j);
    }

    fn unindex(&mut self, i: usize) {
        if let Ok(e) = self
            .index
            .find_entry(name_hash(&self.list[i].name), |&k| k as usize == i)
        {
            e.remove();
        }
    }

    fn index_at(&mut self, i: usize) {
        let list = &self.list;
        self.index.insert_unique(name_hash(&list[i].name), i as u32, |&k| {
            name_hash(&list[k as usize].name)
        });
    }

    /// Changes a member, keeping the live count right.
    pub(crate) fn update(&mut self, i: usize, f: impl FnOnce(&mut Member)) {
        let was = self.list[i].state.is_live();
        self.digest = self.digest.wrapping_sub(self.list[i].digest());
        f(&mut self.list[i]);
        self.digest = self.digest.wrapping_add(self.list[i].digest());
        match (was, self.list[i].state.is_live()) {
            (true, false) => self.live -= 1,
            (false, true) => self.live += 1,
            _ => {}
        }
    }

    pub(crate) fn remove(&mut self, i: usize) -> Member {
        let last = self.list.len() - 1;
        self.swap(i, last);
        self.unindex(last);
        let m = self.list.swap_remove(last);
        self.digest = self.digest.wrapping_sub(m.digest());
        if m.state.is_live() {
            self.live -= 1;
        }
        m
    }

    /// Shuffles the table (the probe order) and rebuilds the index.
    pub(crate) fn shuffle(&mut self, rng: &mut impl Rng) {
        use rand::seq::SliceRandom;
        self.list.shuffle(rng);
        self.index.clear();
        for (i, m) in self.list.iter().enumerate() {
            let list = &self.list;
            self.index
                .insert_unique(name_hash(&m.name), i as u32, |&k| name_hash(&list[k as usize].name));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn member(name: String) -> Member {
        Member {
            name: name.into(),
            epoch: 1,
            since: 0,
            incarnation: 0,
            addr: CompactAddr::from(SocketAddr::from(([127, 0, 0, 1], 1))),
            state: MemberState::Alive,
        }
    }

    #[test]
    fn the_name_index_stays_exact_through_inserts_swaps_removals_and_shuffles() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut m = Members::default();
        for round in 0..20_000u32 {
            match rng.random_range(0..10) {
                0..=5 => {
                    m.insert_randomly(member(format!("n{}", rng.random_range(0..64))), &mut rng);
                }
                6..=8 if m.len() > 0 => {
                    m.remove(rng.random_range(0..m.len()));
                }
                _ => m.shuffle(&mut rng),
            }
            for p in 0..m.len() {
                assert_eq!(m.position(&m.at(p).name), Some(p), "round {round}");
            }
            assert_eq!(m.index.len(), m.len());
            assert_eq!(m.live(), m.len());
        }
    }
}
