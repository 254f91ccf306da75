//! Cross-rack traffic in the simulator: the topology's accounting, and the racks
//! experiment's determinism.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumormill_core::{FrameKind, Notification, Transmit};
use rumormill_sim::racks::{self, RacksParams};
use rumormill_sim::{Link, NetworkModel, SimNode, Simulation, member_addr, secs};

/// A member that sends a scripted packet to each of `targets` at its first
/// wake-up, and records what arrives.
struct Scripted {
    start: Instant,
    targets: Vec<(SocketAddr, FrameKind, usize)>,
    out: VecDeque<Transmit>,
    fired: bool,
    gateway: bool,
    received: usize,
}

impl Scripted {
    fn new(start: Instant, targets: Vec<(SocketAddr, FrameKind, usize)>, gateway: bool) -> Scripted {
        Scripted {
            start,
            targets,
            out: VecDeque::new(),
            fired: false,
            gateway,
            received: 0,
        }
    }
}

impl SimNode for Scripted {
    fn handle(&mut self, _: Instant, _: SocketAddr, _: FrameKind, _: &[u8]) {
        self.received += 1;
    }
    fn handle_timeout(&mut self, _: Instant) {
        self.fired = true;
        for &(to, kind, len) in &self.targets {
            self.out.push_back(Transmit {
                to,
                kind,
                payload: vec![0; len],
            });
        }
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }
    fn poll_notification(&mut self) -> Option<Notification> {
        None
    }
    fn poll_timeout(&self) -> Option<Instant> {
        (!self.fired).then_some(self.start + Duration::from_millis(1))
    }
}

/// What a scripted member sends (to member, kind, bytes), and whether it is
/// a gateway.
type Script = (Vec<(usize, FrameKind, usize)>, bool);

/// Racks 0 = {0, 1}, 1 = {2, 3}, 2 = {4}; member 5 in no rack.
fn scripted(net: NetworkModel, scripts: Vec<Script>) -> Simulation<Scripted> {
    let base = Instant::now();
    let nodes = scripts
        .into_iter()
        .enumerate()
        .map(|(i, (targets, gateway))| {
            let targets = targets
                .into_iter()
                .map(|(to, k, len)| (member_addr(to, 1), k, len))
                .collect();
            (member_addr(i, 1), Scripted::new(base, targets, gateway))
        })
        .collect();
    Simulation::from_nodes(base, nodes, net, 1)
}

fn racked(loss: f64) -> NetworkModel {
    NetworkModel::lan(0.0).with_racks(vec![0, 0, 1, 1, 2], Link::new(loss, 0.030, 0.040))
}

#[test]
fn a_packet_between_two_racks_counts_once_and_inside_a_rack_not_at_all() {
    use FrameKind::{Datagram, Stream};
    let mut sim = scripted(
        racked(0.0),
        vec![
            // Member 0: one inside its rack, two across (a datagram of 100
            // bytes to rack 1, a stream frame of 300 to rack 2), one to a
            // member in no rack.
            (
                vec![
                    (1, Datagram, 10),
                    (2, Datagram, 100),
                    (4, Stream, 300),
                    (5, Datagram, 7),
                ],
                false,
            ),
            (vec![], false),
            // Member 2, the gateway of rack 1: one across, one inside.
            (vec![(0, Datagram, 50), (3, Datagram, 20)], true),
            (vec![], false),
            (vec![], false),
            (vec![], false),
        ],
    );
    sim.judge_gateways_by(|n: &Scripted| n.gateway);
    sim.run_until(secs(1.0));
    let t = sim.traffic();
    assert_eq!(t.packets, 6);
    assert_eq!(t.cross_rack_packets, 3, "{t:?}");
    assert_eq!(t.cross_rack_bytes, 100 + 300 + 50);
    assert_eq!(t.cross_rack_packets_from_non_gateways, 2, "member 0 is no gateway");
    assert_eq!(sim.cross_rack_packets_sent_by(0), 2);
    assert_eq!(sim.cross_rack_packets_sent_by(2), 1);
    assert_eq!(sim.cross_rack_packets_sent_by(1), 0);
    // Everything arrived, across racks too, after the links' latency.
    assert_eq!(sim.node(4).map(|n| n.received), Some(1));
    assert_eq!(sim.node(0).map(|n| n.received), Some(1));
}

#[test]
fn lost_and_partitioned_cross_rack_packets_still_count_as_sent() {
    // Everything between racks is lost; a partition cuts rack 2 off.
    let mut net = racked(0.999_999);
    net.partition(vec![0, 0, 0, 0, 1]);
    let mut sim = scripted(
        net,
        vec![
            (vec![(2, FrameKind::Datagram, 10), (4, FrameKind::Datagram, 10)], false),
            (vec![], false),
            (vec![], false),
            (vec![], false),
            (vec![], false),
        ],
    );
    sim.run_until(secs(1.0));
    let t = sim.traffic();
    assert_eq!((t.cross_rack_packets, t.cross_rack_bytes), (2, 20));
    assert_eq!(
        t.cross_rack_packets_from_non_gateways, 0,
        "no rule given: nobody is judged"
    );
    assert_eq!(sim.node(2).map(|n| n.received), Some(0));
    assert_eq!(sim.node(4).map(|n| n.received), Some(0));
}

#[test]
fn cross_rack_latency_delays_delivery() {
    let mut sim = scripted(
        racked(0.0),
        vec![
            (vec![(2, FrameKind::Datagram, 10), (1, FrameKind::Datagram, 10)], false),
            (vec![], false),
            (vec![], false),
        ],
    );
    sim.run_until(secs(0.01));
    assert_eq!(
        sim.node(1).map(|n| n.received),
        Some(1),
        "inside the rack: under a millisecond"
    );
    assert_eq!(sim.node(2).map(|n| n.received), Some(0), "across: the 30 ms floor");
    sim.run_until(secs(1.0));
    assert_eq!(sim.node(2).map(|n| n.received), Some(1));
}

#[test]
fn the_racks_experiment_is_deterministic_for_one_seed() {
    let p = RacksParams {
        racks: 2,
        members_per_rack: 10,
        duration_s: 25.0,
        drain_s: 8.0,
        seed: 7,
        ..Default::default()
    };
    let a = racks::run(&p).expect("valid parameters");
    let b = racks::run(&p).expect("valid parameters");
    let (ja, jb) = (
        serde_json::to_string(&a).expect("encodes"),
        serde_json::to_string(&b).expect("encodes"),
    );
    assert_eq!(ja, jb);
    // The flat overlay crosses racks all the time, and the workload ran.
    let f = &a.flat;
    assert!(f.cross_rack_packets > 0 && f.cross_rack_bytes_per_s > 0.0);
    assert!(f.events_published > 0 && f.writes > 0);
    assert_eq!(f.events_lost, 0, "{ja}");
    assert_eq!(f.payload_bytes_to_racks_without_subscribers, 0);
    assert_eq!(
        f.killed.as_deref(),
        Some("m10"),
        "rack 1's first member in the flat run"
    );
    assert_eq!(f.cross_rack_timeline.len(), 25);
    assert!(f.event_remote_p99_ms.is_some_and(|ms| ms >= 27.0), "{ja}");
    assert!(f.converged, "{ja}");
    assert_eq!(f.false_positives, 0);
    // A different seed is a different run.
    let c = racks::run(&RacksParams { seed: 8, ..p }).expect("valid parameters");
    assert_ne!(serde_json::to_string(&c).expect("encodes"), ja);
}
