//! Racks in the simulator: each rack elects one gateway, only gateways
//! cross, writes reach every rack, a crashed gateway is replaced, racks cut
//! off from each other heal.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use rumormill_core::racks::RackSpec;
use rumormill_core::{Config, FrameKind, Identity, Notification, Overlay, Security, Transmit};
use rumormill_sim::{NetworkModel, SimNode, Simulation, member_addr, member_name, secs};

/// Every packet sent: (sender, destination, whether the sender was its
/// rack's active gateway then).
type Sent = Rc<RefCell<Vec<(usize, SocketAddr, bool)>>>;

/// An overlay that records where its packets go.
struct Member {
    overlay: Overlay,
    index: usize,
    sent: Sent,
}

impl SimNode for Member {
    fn handle(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, bytes: &[u8]) {
        self.overlay.handle(now, from, kind, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.overlay.handle_timeout(now);
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.overlay.poll_transmit()?;
        let gateway = self.overlay.is_active_gateway();
        self.sent.borrow_mut().push((self.index, t.to, gateway));
        Some(t)
    }
    fn poll_notification(&mut self) -> Option<Notification> {
        self.overlay.poll_notification()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.overlay.poll_timeout()
    }
    fn raft_persisted(&mut self, now: Instant, seq: u64) {
        self.overlay.raft_persisted(now, seq);
    }
}

struct Racks {
    sim: Simulation<Member>,
    /// Each member's rack.
    rack: Vec<usize>,
    sent: Sent,
    by_addr: BTreeMap<SocketAddr, usize>,
}

const CANDIDATES: usize = 3;

/// Racks of the given sizes; the first three members of each are its
/// candidates and know the other racks' candidates; each member joins its
/// rack's first member.
fn racks(sizes: &[usize], loss: f64, seed: u64) -> Racks {
    let base = Instant::now();
    let rack: Vec<usize> = sizes
        .iter()
        .enumerate()
        .flat_map(|(r, &n)| std::iter::repeat_n(r, n))
        .collect();
    let first = |r: usize| rack.iter().position(|&q| q == r).expect("a member");
    let is_candidate = |i: usize| i - first(rack[i]) < CANDIDATES;
    let sent: Sent = Rc::default();
    let mut nodes = Vec::new();
    for i in 0..rack.len() {
        let mut spec = RackSpec::new(&format!("rack-{}", rack[i])).expect("valid");
        if is_candidate(i) {
            let seeds = (0..rack.len())
                .filter(|&j| rack[j] != rack[i] && is_candidate(j))
                .map(|j| member_addr(j, 1))
                .collect();
            spec = spec.candidate(CANDIDATES).with_remote_seeds(seeds);
        }
        let id = Identity::new(member_name(i), member_addr(i, 1), 1).in_rack(spec);
        let mut overlay = Overlay::new(Config::new_lan(), id, Security::Plaintext, seed * 1000 + i as u64, base);
        if i != first(rack[i]) {
            overlay.join(base, &[member_addr(first(rack[i]), 1)]).expect("active");
        }
        nodes.push((
            member_addr(i, 1),
            Member {
                overlay,
                index: i,
                sent: sent.clone(),
            },
        ));
    }
    let by_addr = (0..rack.len()).map(|i| (member_addr(i, 1), i)).collect();
    Racks {
        sim: Simulation::from_nodes(base, nodes, NetworkModel::lan(loss), seed),
        rack,
        sent,
        by_addr,
    }
}

impl Racks {
    /// The active gateways: rack → (member, term).
    fn gateways(&self) -> BTreeMap<usize, Vec<(usize, u64)>> {
        let mut out: BTreeMap<usize, Vec<(usize, u64)>> = BTreeMap::new();
        for i in 0..self.rack.len() {
            if let Some(m) = self.sim.node(i)
                && m.overlay.is_active_gateway()
            {
                let term = m.overlay.racks(Instant::now())[0].term;
                out.entry(self.rack[i]).or_default().push((i, term));
            }
        }
        out
    }

    /// Runs to `until` in steps of 100 ms, checking that no (rack, term)
    /// ever has two leaders.
    fn run_checked(&mut self, until: f64, leaders: &mut BTreeMap<(usize, u64), BTreeSet<usize>>) {
        let mut t = self.sim.now() as f64 / 1e9;
        while t < until {
            t += 0.1;
            self.sim.run_until(secs(t));
            for (rack, list) in self.gateways() {
                for (i, term) in list {
                    let seen = leaders.entry((rack, term)).or_default();
                    seen.insert(i);
                    assert_eq!(seen.len(), 1, "rack {rack}, term {term}: two leaders {seen:?}");
                }
            }
        }
    }

    /// Packets sent between racks: (in all, from a member that was not its
    /// rack's active gateway).
    fn crossings(&self) -> (usize, usize) {
        let sent = self.sent.borrow();
        let across: Vec<_> = sent
            .iter()
            .filter(|(i, to, _)| self.by_addr.get(to).is_some_and(|&j| self.rack[j] != self.rack[*i]))
            .collect();
        (across.len(), across.iter().filter(|s| !s.2).count())
    }

    fn put(&mut self, i: usize, key: &str, value: &[u8]) {
        let wall = self.sim.wall();
        self.sim
            .with_node(i, |m, now| m.overlay.put(now, wall, key, value.to_vec()))
            .expect("running")
            .expect("put");
    }

    fn everyone_has(&self, key: &str, value: &[u8]) -> bool {
        (0..self.rack.len()).all(|i| {
            self.sim
                .node(i)
                .is_none_or(|m| m.overlay.store().value(key) == Some(value))
        })
    }
}

#[test]
fn one_gateway_per_rack_and_only_gateways_cross() {
    let mut r = racks(&[3, 6, 10], 0.01, 1);
    let mut leaders = BTreeMap::new();
    r.run_checked(10.0, &mut leaders);
    let g = r.gateways();
    assert_eq!(g.len(), 3, "{g:?}");
    assert!(g.values().all(|l| l.len() == 1), "{g:?}");
    let (across, from_others) = r.crossings();
    assert!(across > 0);
    assert_eq!(from_others, 0, "packets between racks from non-gateways");
    // The counters agree with what the network carried.
    let counted: u64 = (0..r.rack.len())
        .filter_map(|i| r.sim.node(i))
        .map(|m| m.overlay.stats().cross_packets_sent)
        .sum();
    assert_eq!(counted as usize, across);
    for i in 0..r.rack.len() {
        let o = &r.sim.node(i).expect("running").overlay;
        if !o.is_active_gateway() {
            assert_eq!(o.stats().cross_packets_sent, 0, "member {i}");
        }
    }
    // Writes in each rack reach every member of every rack.
    for (k, i) in [(0, 1usize), (1, 5), (2, 15)] {
        r.put(i, &format!("k{k}"), b"v");
    }
    r.run_checked(14.0, &mut leaders);
    for k in 0..3 {
        assert!(r.everyone_has(&format!("k{k}"), b"v"), "k{k}");
    }
    let (across, from_others) = r.crossings();
    assert_eq!(from_others, 0);
    println!("cross-rack packets in 14 s, 3 racks of 3/6/10: {across}");
}

#[test]
fn a_crashed_gateway_is_replaced_and_cross_traffic_resumes_through_its_successor() {
    let mut r = racks(&[5, 5, 5], 0.01, 2);
    let mut leaders = BTreeMap::new();
    r.run_checked(10.0, &mut leaders);
    let (old, old_term) = r.gateways()[&0][0];
    r.sim.kill(old);
    let killed = r.sim.now();
    let mut t = 10.0;
    let (new, term) = loop {
        r.run_checked(t + 0.1, &mut leaders);
        t += 0.1;
        if let Some(&(new, term)) = r.gateways().get(&0).and_then(|l| l.first()) {
            break (new, term);
        }
        assert!(t < 20.0, "no new gateway in rack 0");
    };
    assert!(new != old && term > old_term);
    // Failover: until a packet crosses from the successor.
    let before = r.sent.borrow().len();
    loop {
        let crossed = r.sent.borrow()[before..]
            .iter()
            .any(|(i, to, _)| *i == new && r.by_addr.get(to).is_some_and(|&j| r.rack[j] != 0));
        if crossed {
            break;
        }
        t += 0.05;
        r.run_checked(t, &mut leaders);
        assert!(t < 25.0, "nothing crossed through the new gateway");
    }
    let failover = (r.sim.now() - killed) as f64 / 1e9;
    println!("gateway failover: {failover:.2} s (term {old_term} → {term})");
    assert!(failover < 3.0, "failover took {failover} s");
    r.put(6, "after", b"1");
    r.run_checked(t + 6.0, &mut leaders);
    assert!(r.everyone_has("after", b"1"));
    // Every member of the other racks knows the new gateway.
    for i in 5..15 {
        let info = r.sim.node(i).expect("running").overlay.racks(Instant::now());
        let rack0 = info.iter().find(|x| &*x.name == "rack-0").expect("rack 0 known");
        assert_eq!(rack0.gateway.as_deref(), Some(&*member_name(new)), "member {i}");
        assert_eq!(rack0.term, term);
    }
    assert_eq!(r.crossings().1, 0);
}

#[test]
fn racks_cut_off_from_each_other_heal_and_resync_the_store() {
    let mut r = racks(&[4, 4, 4], 0.0, 3);
    let mut leaders = BTreeMap::new();
    r.run_checked(10.0, &mut leaders);
    r.sim.network.partition(r.rack.iter().map(|&k| k as u32).collect());
    r.run_checked(40.0, &mut leaders);
    let unreachable = r.sim.events().iter().any(|(_, _, e)| {
        matches!(
            e,
            Notification::Rack(rumormill_core::racks::RackNotification::Unreachable { .. })
        )
    });
    assert!(unreachable, "the gateways noticed");
    r.put(1, "a", b"1");
    r.put(5, "b", b"2");
    r.run_checked(45.0, &mut leaders);
    assert!(!r.everyone_has("a", b"1"));
    r.sim.network.heal();
    r.run_checked(100.0, &mut leaders);
    assert!(r.everyone_has("a", b"1") && r.everyone_has("b", b"2"), "resynced");
    assert_eq!(r.crossings().1, 0);
}
