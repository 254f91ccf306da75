//! Events across racks, on hand-built racks: each member's events
//! sub-machine with its own member table (its rack), routes and wire, one
//! store for all (the replicated store is cluster-wide), and a network that
//! hands every message to its destination at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::{self, envelope::Body};

use super::{Delivery, DeliveryReport, Env, EventId, Events, Outcome};
use crate::config::Config;
use crate::membership::piggyback::Piggyback;
use crate::membership::{CompactAddr, Member, MemberState, Members};
use crate::notification::Notification;
use crate::overlay::{Identity, Sender, Wire};
use crate::racks::routes::Routes;
use crate::replication::{Store, Update};
use crate::reserved::{GatewayReport, Rack, RackMember, ReservedKey, Topics};

const TOPIC: &str = "orders";

struct Node {
    name: Arc<str>,
    addr: SocketAddr,
    rack: &'static str,
    events: Events,
    members: Members,
    wire: Wire,
    piggyback: Piggyback,
    gateway: Option<SocketAddr>,
    active: bool,
    gateways: BTreeMap<Arc<str>, SocketAddr>,
    got: Vec<EventId>,
    reports: Vec<DeliveryReport>,
    /// Lent flat routes, as without racks.
    flat: bool,
}

/// One message that went over the network.
#[derive(Debug, Clone)]
struct Sent {
    from: usize,
    to: usize,
    body: Body,
}

struct Racks {
    nodes: Vec<Node>,
    store: Store,
    rng: ChaCha8Rng,
    now: Instant,
    writes: u64,
    /// Directed links that drop everything.
    cut: BTreeSet<(usize, usize)>,
    log: Vec<Sent>,
}

fn at(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000))
}

impl Racks {
    /// Members `(name, rack, gateway, subscribes)`; each rack's gateway is
    /// active and knows the other racks' gateways; every gateway reports
    /// its rack, all alive, in term 1.
    fn new(spec: &[(&str, &'static str, bool, bool)]) -> Racks {
        let config = Config::new_lan();
        let now = Instant::now();
        let mut nodes: Vec<Node> = spec
            .iter()
            .enumerate()
            .map(|(i, (name, rack, _, _))| {
                let id = Identity::new(*name, at(i), 1);
                Node {
                    name: Arc::from(*name),
                    addr: at(i),
                    rack,
                    events: Events::new(&id, &config),
                    members: Members::default(),
                    wire: Wire::plaintext(id.sender_id(), config.mtu),
                    piggyback: Piggyback::default(),
                    gateway: None,
                    active: false,
                    gateways: BTreeMap::new(),
                    got: Vec::new(),
                    reports: Vec::new(),
                    flat: false,
                }
            })
            .collect();
        let gateway_of = |rack: &str| spec.iter().position(|(_, r, g, _)| *r == rack && *g);
        #[allow(clippy::needless_range_loop)] // each node reads the others' specs by index
        for i in 0..nodes.len() {
            let rack = nodes[i].rack;
            nodes[i].gateway = gateway_of(rack).map(at);
            nodes[i].active = gateway_of(rack) == Some(i);
            for (j, (name, r, g, _)) in spec.iter().enumerate() {
                if j == i {
                    continue;
                }
                if *r == rack {
                    nodes[i].members.insert(Member {
                        name: Arc::from(*name),
                        epoch: 1,
                        since: 0,
                        incarnation: 0,
                        addr: CompactAddr::from(at(j)),
                        state: MemberState::Alive,
                    });
                } else if *g && nodes[i].active {
                    nodes[i].gateways.insert(Arc::from(*r), at(j));
                }
            }
        }
        let mut net = Racks {
            nodes,
            store: Store::default(),
            rng: ChaCha8Rng::seed_from_u64(3),
            now,
            writes: 0,
            cut: BTreeSet::new(),
            log: Vec::new(),
        };
        for (name, rack, _, subscribes) in spec {
            net.write(
                name,
                ReservedKey::Rack {
                    member: name.to_string(),
                },
                Rack {
                    name: rack.to_string(),
                    gateway: false,
                }
                .encode(),
            );
            if *subscribes {
                net.subscribe(name, true);
            }
        }
        let racks: BTreeSet<&str> = spec.iter().map(|(_, r, _, _)| *r).collect();
        for rack in racks {
            if let Some(g) = gateway_of(rack) {
                net.report(g, 1, true, &[]);
            }
        }
        net
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| &*n.name == name)
            .expect("a node of that name")
    }

    /// A store write by `origin`, as replication would hold it.
    fn write(&mut self, origin: &str, key: ReservedKey, value: Vec<u8>) {
        self.writes += 1;
        self.store.apply(
            Update {
                key: key.key(),
                value: Some(value),
                lamport: self.writes,
                origin: Arc::from(origin),
                epoch: 1,
                seq: self.writes,
            },
            0,
        );
    }

    fn subscribe(&mut self, name: &str, on: bool) {
        let topics = if on { vec![TOPIC.to_owned()] } else { Vec::new() };
        self.write(
            name,
            ReservedKey::Topics {
                member: name.to_owned(),
            },
            Topics(topics).encode(),
        );
    }

    /// Gateway `g` reports its rack: every member alive but `states`.
    fn report(&mut self, g: usize, term: u64, active: bool, states: &[(&str, MemberState)]) {
        let rack = self.nodes[g].rack;
        let members = self
            .nodes
            .iter()
            .filter(|n| n.rack == rack)
            .map(|n| RackMember {
                name: n.name.to_string(),
                state: states
                    .iter()
                    .find(|(s, _)| *s == &*n.name)
                    .map_or(MemberState::Alive, |(_, st)| *st),
                epoch: 1,
                incarnation: 0,
            })
            .collect();
        let report = GatewayReport {
            rack: rack.to_owned(),
            term,
            addr: self.nodes[g].addr,
            wall_ms: 1_000 + self.writes,
            members,
            candidates: Vec::new(),
            active,
        };
        let name = self.nodes[g].name.to_string();
        self.write(
            &name,
            ReservedKey::GatewayReport { member: name.clone() },
            report.encode(),
        );
    }

    /// Runs `f` on node `i`'s events with its views.
    fn with<T>(&mut self, i: usize, f: impl FnOnce(&mut Events, &mut Env<'_>) -> T) -> T {
        let n = &mut self.nodes[i];
        let mut env = Env {
            members: &n.members,
            store: &self.store,
            rng: &mut self.rng,
            out: Sender::new(&mut n.wire, &mut n.piggyback, 0),
            routes: if n.flat {
                Routes::flat()
            } else {
                Routes {
                    rack: Some(n.rack),
                    gateway: n.gateway,
                    active: n.active,
                    gateways: &n.gateways,
                }
            },
        };
        let out = f(&mut n.events, &mut env);
        while let Some(e) = n.events.poll_notification() {
            match e {
                Notification::Event(e) => n.got.push(e.id),
                Notification::Report(r) => n.reports.push(r),
                _ => {}
            }
        }
        out
    }

    fn publish(&mut self, name: &str, delivery: Delivery) -> EventId {
        let i = self.index(name);
        let now = self.now;
        self.with(i, |e, env| e.publish(now, TOPIC, b"payload".to_vec(), delivery, env))
            .expect("published")
    }

    /// Moves messages until nobody has anything to send.
    fn deliver(&mut self) {
        for _ in 0..1_000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                for t in self.nodes[i].wire.take_transmits() {
                    moved = true;
                    let Some(j) = self.nodes.iter().position(|n| n.addr == t.to) else {
                        continue;
                    };
                    if self.cut.contains(&(i, j)) {
                        continue;
                    }
                    let envelopes = self.nodes[j].wire.open_transmit(&t).expect("opens");
                    let (from, now) = (self.nodes[i].addr, self.now);
                    for e in envelopes {
                        let Some(body) = e.body else { continue };
                        self.log.push(Sent {
                            from: i,
                            to: j,
                            body: body.clone(),
                        });
                        match body {
                            Body::Event(ev) => self.with(j, |e, env| e.on_event(now, from, *ev, env)),
                            Body::EventAck(a) => self.with(j, |e, env| e.on_event_ack(from, a, env)),
                            _ => {}
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the network never went quiet");
    }

    /// Moves time on by `d` and runs every member's timers.
    fn tick(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        for i in 0..self.nodes.len() {
            self.with(i, |e, env| e.handle_timeout(now, env));
        }
        self.deliver();
    }

    /// The events sent from `from` to `to` (names), with their racks and
    /// targets.
    fn events_sent(&self, from: &str, to: &str) -> Vec<(Vec<String>, Vec<String>)> {
        let (i, j) = (self.index(from), self.index(to));
        self.log
            .iter()
            .filter(|s| s.from == i && s.to == j)
            .filter_map(|s| match &s.body {
                Body::Event(e) => Some((e.racks.clone(), e.targets.clone())),
                _ => None,
            })
            .collect()
    }

    fn payload_bytes_received(&mut self, name: &str) -> u64 {
        let i = self.index(name);
        self.with(i, |_, env| env.out.stats().event_payload_bytes_received)
    }

    fn outcomes(&self, name: &str) -> BTreeMap<String, (Outcome, Option<String>)> {
        self.nodes[self.index(name)]
            .reports
            .iter()
            .map(|r| {
                (
                    r.subscriber.to_string(),
                    (r.outcome, r.rack.as_ref().map(|r| r.to_string())),
                )
            })
            .collect()
    }
}

const AT_LEAST_ONCE: Delivery = Delivery::AtLeastOnce {
    retry_every: Duration::from_secs(1),
    retry_max: 3,
};

/// Four racks: the publisher's (a), two with subscribers (b, c), one
/// without (d).
fn four_racks() -> Racks {
    Racks::new(&[
        ("p", "a", false, false),
        ("ga", "a", true, false),
        ("a1", "a", false, true),
        ("gb", "b", true, false),
        ("b1", "b", false, true),
        ("b2", "b", false, true),
        ("gc", "c", true, true),
        ("c1", "c", false, true),
        ("gd", "d", true, false),
        ("d1", "d", false, false),
    ])
}

#[test]
fn one_copy_goes_to_the_gateway_and_one_to_each_rack_with_subscribers() {
    let mut net = four_racks();
    let id = net.publish("p", AT_LEAST_ONCE);
    // Before anything moves: the local tree and one copy to the gateway.
    let first: Vec<SocketAddr> = net.nodes[0].wire.take_transmits().iter().map(|t| t.to).collect();
    assert_eq!(first, vec![at(2), at(1)], "to a1 (the local tree), then to ga");
    let mut net = four_racks();
    let id2 = net.publish("p", AT_LEAST_ONCE);
    assert_eq!(id, id2);
    net.deliver();
    let named = vec!["b".to_owned(), "c".to_owned()];
    assert_eq!(
        net.events_sent("p", "ga"),
        vec![(named, Vec::new())],
        "one copy naming both racks"
    );
    assert_eq!(net.events_sent("ga", "gb"), vec![(vec!["b".to_owned()], Vec::new())]);
    assert_eq!(net.events_sent("ga", "gc"), vec![(vec!["c".to_owned()], Vec::new())]);
    for n in ["gd", "d1"] {
        assert_eq!(net.payload_bytes_received(n), 0, "{n}: no subscriber, no payload");
    }
    assert_eq!(net.payload_bytes_received("ga"), 7, "the gateway of a gets its copy");
    for n in ["a1", "b1", "b2", "gc", "c1"] {
        let i = net.index(n);
        assert_eq!(net.nodes[i].got, vec![id.clone()], "{n} delivered it once");
    }
    for n in ["p", "ga", "gb", "gd", "d1"] {
        let i = net.index(n);
        assert!(net.nodes[i].got.is_empty(), "{n} does not subscribe");
    }
    // Every subscriber acknowledged, through the two gateways.
    let want: BTreeMap<String, (Outcome, Option<String>)> = [
        ("a1", None),
        ("b1", Some("b")),
        ("b2", Some("b")),
        ("gc", Some("c")),
        ("c1", Some("c")),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_owned(), (Outcome::Delivered, r.map(str::to_owned))))
    .collect();
    assert_eq!(net.outcomes("p"), want);
    assert!(net.nodes[0].events.pending.is_empty(), "nothing left to resend");
    let acks_from_ga = net
        .log
        .iter()
        .filter(|s| s.from == 1 && s.to == 0 && matches!(s.body, Body::EventAck(_)))
        .count();
    assert_eq!(
        acks_from_ga, 4,
        "each remote subscriber's acknowledgement came through ga"
    );
}

#[test]
fn a_gateway_that_publishes_sends_one_copy_per_rack_itself() {
    let mut net = four_racks();
    let id = net.publish("ga", AT_LEAST_ONCE);
    net.deliver();
    assert_eq!(net.events_sent("ga", "gb"), vec![(vec!["b".to_owned()], Vec::new())]);
    assert_eq!(net.events_sent("ga", "gc"), vec![(vec!["c".to_owned()], Vec::new())]);
    assert!(net.events_sent("ga", "gd").is_empty());
    let outcomes = net.outcomes("ga");
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert!(outcomes.values().all(|(o, _)| *o == Outcome::Delivered), "{outcomes:?}");
    assert_eq!(net.nodes[net.index("c1")].got, vec![id]);
}

#[test]
fn a_remote_subscribers_acknowledgement_is_taken_only_from_its_gateway() {
    let mut net = four_racks();
    // b1 hears nothing: its acknowledgement is forged below.
    let (gb, b1) = (net.index("gb"), net.index("b1"));
    net.cut.insert((gb, b1));
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert!(!net.outcomes("p").contains_key("b1"));
    let ack = proto::EventAck {
        id: Some(id.to_proto()),
        from: "b1".into(),
        unsubscribed: false,
        relay: false,
    };
    let malformed = |net: &mut Racks| net.with(0, |_, env| env.out.stats().malformed);
    let before = malformed(&mut net);
    // From b1's own address, and from b's gateway: neither is p's gateway.
    for from in [at(b1), at(gb)] {
        let a = ack.clone();
        net.with(0, |e, env| e.on_event_ack(from, a, env));
    }
    assert_eq!(malformed(&mut net), before + 2, "refused and counted");
    assert!(!net.outcomes("p").contains_key("b1"), "still waiting for b1");
    // Through p's own gateway it counts.
    net.with(0, |e, env| e.on_event_ack(at(1), ack, env));
    assert_eq!(net.outcomes("p")["b1"], (Outcome::Delivered, Some("b".to_owned())));
}

#[test]
fn a_resend_names_its_targets_and_the_remote_gateway_sends_to_them_directly() {
    let mut net = four_racks();
    let (gb, b2) = (net.index("gb"), net.index("b2"));
    net.cut.insert((gb, b2));
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    // gb's hop to b2 goes unacknowledged; gb takes its span back.
    for _ in 0..3 {
        net.tick(Duration::from_millis(100));
    }
    assert!(net.nodes[b2].got.is_empty());
    net.cut.clear();
    net.log.clear();
    net.tick(Duration::from_millis(700));
    assert_eq!(
        net.events_sent("p", "ga"),
        vec![(vec!["b".to_owned()], vec!["b2".to_owned()])],
        "one resend, through the gateway, naming b2"
    );
    assert_eq!(
        net.events_sent("ga", "gb"),
        vec![(vec!["b".to_owned()], vec!["b2".to_owned()])]
    );
    let direct = net.events_sent("gb", "b2");
    assert_eq!(direct, vec![(Vec::new(), Vec::new())], "sent to b2 directly");
    assert!(net.events_sent("gb", "b1").is_empty(), "b1 has it");
    assert!(net.events_sent("ga", "gc").is_empty(), "c has it");
    assert_eq!(net.nodes[b2].got, vec![id]);
    let r = net.nodes[0]
        .reports
        .iter()
        .find(|r| &*r.subscriber == "b2")
        .expect("b2 reported");
    assert_eq!((r.outcome, r.attempts), (Outcome::Delivered, 2));
}

#[test]
fn a_rack_without_a_gateway_waits_then_is_reported_unreachable() {
    let mut net = four_racks();
    // c's gateway stepped down and nobody took over: ga no longer knows one.
    let gc = net.index("gc");
    net.report(gc, 1, false, &[]);
    net.nodes[1].gateways.remove("c");
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert_eq!(
        net.events_sent("p", "ga"),
        vec![(vec!["b".to_owned(), "c".to_owned()], Vec::new())]
    );
    assert!(net.events_sent("ga", "gc").is_empty());
    for s in 1..=3 {
        net.log.clear();
        net.tick(Duration::from_secs(1));
        assert_eq!(
            net.events_sent("p", "ga"),
            vec![(vec!["c".to_owned()], vec!["c1".to_owned(), "gc".to_owned()])],
            "resend {s}"
        );
        assert!(!net.outcomes("p").contains_key("c1"), "waiting after resend {s}");
    }
    net.tick(Duration::from_secs(1));
    let outcomes = net.outcomes("p");
    assert_eq!(outcomes["c1"], (Outcome::RackUnreachable, Some("c".to_owned())));
    assert_eq!(outcomes["gc"], (Outcome::RackUnreachable, Some("c".to_owned())));
    assert_eq!(outcomes["b1"].0, Outcome::Delivered);
    assert!(net.nodes[net.index("c1")].got.is_empty());
    assert!(!net.nodes[0].events.pending.contains_key(&id), "every report final");
}

#[test]
fn forwarding_follows_subscriptions_and_remote_states_come_from_the_gateway_report() {
    let mut net = four_racks();
    // c's subscribers leave the topic; d1 subscribes.
    net.subscribe("gc", false);
    net.subscribe("c1", false);
    net.subscribe("d1", true);
    net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert_eq!(
        net.events_sent("p", "ga"),
        vec![(vec!["b".to_owned(), "d".to_owned()], Vec::new())]
    );
    assert!(net.events_sent("ga", "gc").is_empty());
    assert_eq!(net.payload_bytes_received("c1"), 0);
    assert_eq!(net.outcomes("p")["d1"].0, Outcome::Delivered);
    // A subscriber its gateway reports failed is reported failed; one it
    // reports suspect is still a subscriber.
    let mut net = four_racks();
    let (gb, b1, b2) = (net.index("gb"), net.index("b1"), net.index("b2"));
    net.cut.insert((gb, b1));
    net.cut.insert((gb, b2));
    net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    net.report(
        gb,
        1,
        true,
        &[("b1", MemberState::Failed), ("b2", MemberState::Suspect)],
    );
    net.tick(Duration::from_secs(1));
    assert_eq!(
        net.outcomes("p")["b1"],
        (Outcome::SubscriberFailed, Some("b".to_owned()))
    );
    assert!(!net.outcomes("p").contains_key("b2"), "suspect: still resent to");
    net.cut.clear();
    net.tick(Duration::from_secs(1));
    assert_eq!(net.outcomes("p")["b2"].0, Outcome::Delivered);
    // A remote member its gateway reports failed is no subscriber.
    net.report(gb, 1, true, &[("b1", MemberState::Failed)]);
    net.nodes[gb].members.insert(Member {
        name: Arc::from("b1"),
        epoch: 1,
        since: 0,
        incarnation: 0,
        addr: CompactAddr::from(at(b1)),
        state: MemberState::Failed,
    });
    net.log.clear();
    net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert_eq!(net.events_sent("ga", "gb"), vec![(vec!["b".to_owned()], Vec::new())]);
    assert!(net.events_sent("gb", "b1").is_empty());
}

#[test]
fn a_copy_from_another_rack_is_never_sent_across_again() {
    let mut net = four_racks();
    let id = net.publish("p", Delivery::BestEffort);
    net.deliver();
    // gb is handed a copy naming c and d, as if from a's gateway.
    let e = super::event_message(&id, TOPIC, b"payload", false, at(0), 1);
    let copy = proto::Event {
        racks: vec!["c".into(), "d".into()],
        ..e
    };
    net.log.clear();
    let gb = net.index("gb");
    let now = net.now;
    net.with(gb, |e, env| e.on_event(now, at(1), copy, env));
    net.deliver();
    assert!(net.log.is_empty(), "{:?}", net.log);
}

#[test]
fn with_flat_routes_nothing_crosses() {
    let mut net = four_racks();
    for n in &mut net.nodes {
        n.flat = true;
    }
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert!(net.events_sent("p", "ga").is_empty(), "no copy to the gateway");
    assert!(net.log.iter().all(|s| net.nodes[s.to].rack == "a"), "{:?}", net.log);
    assert_eq!(net.nodes[net.index("a1")].got, vec![id]);
    assert_eq!(
        net.outcomes("p").into_keys().collect::<Vec<_>>(),
        vec!["a1".to_owned()],
        "only the subscribers in the member table count"
    );
}

#[test]
fn a_manual_acknowledgement_in_another_rack_goes_back_through_the_gateways() {
    let mut net = four_racks();
    let b1 = net.index("b1");
    net.nodes[b1].events.set_manual_acks(true);
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert_eq!(net.nodes[b1].got, vec![id.clone()]);
    assert!(!net.outcomes("p").contains_key("b1"), "not acknowledged yet");
    net.with(b1, |e, env| e.acknowledge(&id, &mut env.out));
    net.deliver();
    assert_eq!(net.outcomes("p")["b1"], (Outcome::Delivered, Some("b".to_owned())));
}

#[test]
fn a_gateway_lost_mid_delivery_costs_a_resend_through_its_successor() {
    let mut net = four_racks();
    let (gb, b1, b2) = (net.index("gb"), net.index("b1"), net.index("b2"));
    // gb dies with the copy: nothing it sends arrives.
    for j in 0..net.nodes.len() {
        net.cut.insert((gb, j));
    }
    let id = net.publish("p", AT_LEAST_ONCE);
    net.deliver();
    assert!(net.nodes[b1].got.is_empty() && net.nodes[b2].got.is_empty());
    // b1 is elected in term 2; the others learn it (a's gateway from the
    // pool of gateways, everyone from the report).
    net.nodes[b1].active = true;
    net.nodes[b1].gateway = Some(at(b1));
    net.nodes[b1].gateways = net.nodes[gb].gateways.clone();
    net.nodes[b2].gateway = Some(at(b1));
    net.nodes[1].gateways.insert(Arc::from("b"), at(b1));
    net.report(b1, 2, true, &[("gb", MemberState::Failed)]);
    net.tick(Duration::from_secs(1));
    assert_eq!(net.nodes[b1].got, vec![id.clone()]);
    assert_eq!(net.nodes[b2].got, vec![id.clone()]);
    let outcomes = net.outcomes("p");
    assert_eq!(outcomes["b1"], (Outcome::Delivered, Some("b".to_owned())));
    assert_eq!(outcomes["b2"], (Outcome::Delivered, Some("b".to_owned())));
    assert!(!net.nodes[0].events.pending.contains_key(&id), "every report final");
    // Delivered once each, whatever was resent.
    for n in ["a1", "b1", "b2", "gc", "c1"] {
        assert_eq!(net.nodes[net.index(n)].got.len(), 1, "{n}");
    }
}
