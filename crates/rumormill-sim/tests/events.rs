//! Events on topics, in the simulator: 1,000 members, 10 subscribers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rumormill_core::events::{Delivery, Outcome};
use rumormill_core::{Config, Notification, Overlay};
use rumormill_sim::{NetworkModel, Simulation, secs};

const N: usize = 1000;
const TOPIC: &str = "orders";

/// Members 3, 103, 203… subscribe; the publisher (member 0) does not.
fn subscribers() -> Vec<usize> {
    (0..10).map(|k| 3 + 100 * k).collect()
}

fn cluster(loss: f64, seed: u64) -> Simulation {
    let mut sim = Simulation::new(N, Config::new_lan(), NetworkModel::lan(loss), seed);
    sim.bootstrap();
    sim.run_until(secs(2.0));
    for i in subscribers() {
        let wall = sim.wall();
        sim.with_node(i, |o, now| o.subscribe(now, wall, TOPIC))
            .expect("running")
            .expect("subscribe");
    }
    // Subscriptions spread like any value: rumor first, anti-entropy after.
    let everyone_knows =
        |sim: &Simulation| (0..N).all(|i| sim.node(i).is_none_or(|o: &Overlay| o.subscribers(TOPIC).len() == 10));
    let mut t = 2.0;
    while !everyone_knows(&sim) {
        assert!(t < 40.0, "the subscriptions did not reach every member in 38 s");
        t += 0.5;
        sim.run_until(secs(t));
    }
    sim
}

/// Event ids delivered to each member's application, with their count.
fn delivered(sim: &Simulation) -> BTreeMap<usize, Vec<u64>> {
    let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for (_, i, e) in sim.events() {
        if let Notification::Event(m) = e {
            out.entry(*i).or_default().push(m.id.seq);
        }
    }
    out
}

fn reports(sim: &Simulation, publisher: usize) -> Vec<(u64, String, Outcome)> {
    sim.events()
        .iter()
        .filter(|(_, i, _)| *i == publisher)
        .filter_map(|(_, _, e)| match e {
            Notification::Report(r) => Some((r.id.seq, r.subscriber.to_string(), r.outcome)),
            _ => None,
        })
        .collect()
}

/// Runs the simulation `s` seconds further.
fn advance(sim: &mut Simulation, s: f64) {
    let t = sim.now() as f64 / 1e9;
    sim.run_until(secs(t + s));
}

fn publish(sim: &mut Simulation, from: usize, count: usize, delivery: Delivery, every_s: f64) {
    for k in 0..count {
        let payload = format!("event {k}").into_bytes();
        sim.with_node(from, |o, now| o.publish(now, TOPIC, payload, delivery))
            .expect("running")
            .expect("publish");
        advance(sim, every_s);
    }
}

#[test]
fn only_subscribers_receive_events_and_each_gets_every_one() {
    let mut sim = cluster(0.0, 1);
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 50, alo, 0.1);
    advance(&mut sim, 10.0);
    let got = delivered(&sim);
    let subs: BTreeSet<usize> = subscribers().into_iter().collect();
    for i in &subs {
        let ids: BTreeSet<u64> = got.get(i).into_iter().flatten().copied().collect();
        assert_eq!(ids.len(), 50, "subscriber {i} got {} of 50", ids.len());
        assert_eq!(got[i].len(), 50, "subscriber {i}'s application saw an event twice");
    }
    for i in 0..N {
        let bytes = sim.node(i).map_or(0, |o| o.stats().event_payload_bytes_received);
        if subs.contains(&i) {
            assert!(bytes > 0);
        } else {
            assert_eq!(bytes, 0, "non-subscriber {i} received {bytes} payload bytes");
        }
    }
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 500, "one report per event and subscriber");
    assert!(r.iter().all(|(_, _, o)| *o == Outcome::Delivered), "{r:?}");
}

#[test]
fn best_effort_reaches_each_subscriber_once_without_the_publisher_sending_every_copy() {
    let mut sim = cluster(0.0, 2);
    let before = sim.node(0).map(|o| o.stats().datagrams_sent).unwrap_or_default();
    publish(&mut sim, 0, 50, Delivery::BestEffort, 0.001);
    let sent = sim.node(0).map(|o| o.stats().datagrams_sent).unwrap_or_default() - before;
    advance(&mut sim, 2.0);
    let got = delivered(&sim);
    let total: usize = subscribers().iter().map(|i| got.get(i).map_or(0, Vec::len)).sum();
    // Down the relay tree: the publisher sends at most k + 1 = 5 copies,
    // and without loss each subscriber gets exactly one.
    assert_eq!(total, 500, "best effort delivered {total} of 500");
    let copies: u64 = subscribers()
        .iter()
        .filter_map(|&i| sim.node(i).map(|o| o.stats().events_received))
        .sum();
    assert_eq!(copies, 500, "one copy per subscriber and event");
    assert!(sent <= 50 * 5 + 20, "the publisher sent {sent} datagrams for 50 events");
    assert!(reports(&sim, 0).is_empty(), "no reports for best effort");
}

#[test]
fn best_effort_survives_loss_and_crashed_relays_by_hop_resends_and_takeovers() {
    // 10% of all datagrams lost, and three subscribers crashed a moment
    // ago (still taken for alive): the relay hops towards them are resent,
    // then their spans are taken back by the relay above.
    let mut sim = cluster(0.0, 5);
    let crashed: Vec<usize> = subscribers()[..3].to_vec();
    for &i in &crashed {
        sim.kill(i);
    }
    sim.network = NetworkModel::lan(0.1);
    publish(&mut sim, 0, 50, Delivery::BestEffort, 0.02);
    advance(&mut sim, 3.0);
    let got = delivered(&sim);
    let live: Vec<usize> = subscribers().into_iter().filter(|i| !crashed.contains(i)).collect();
    let total: usize = live.iter().map(|i| got.get(i).map_or(0, Vec::len)).sum();
    let stat = |f: fn(&rumormill_core::Stats) -> u64| -> u64 {
        (0..N).filter_map(|i| sim.node(i).map(|o| f(o.stats()))).sum()
    };
    let (resends, takeovers) = (stat(|s| s.event_hop_resends), stat(|s| s.event_hop_takeovers));
    eprintln!(
        "best effort, 10% loss, 3 crashed: {total} of 350 delivered, {resends} hop resends, {takeovers} takeovers"
    );
    assert!(
        total >= 347,
        "best effort delivered {total} of 350 to the live subscribers"
    );
    assert!(takeovers > 0 && resends > 0);
    for i in &live {
        let ids = got.get(i).map_or(0, Vec::len);
        assert_eq!(
            ids,
            got.get(i).into_iter().flatten().collect::<BTreeSet<_>>().len(),
            "subscriber {i} saw an event twice"
        );
    }
}

#[test]
fn at_least_once_under_20_percent_loss_delivers_everything_once() {
    // Subscriptions spread first; then 20% of all datagrams (events and
    // acknowledgements included) are lost while 50 events are published.
    let mut sim = cluster(0.0, 3);
    sim.network = NetworkModel::lan(0.2);
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 50, alo, 0.1);
    advance(&mut sim, 15.0);
    let got = delivered(&sim);
    for i in subscribers() {
        let ids: BTreeSet<u64> = got.get(&i).into_iter().flatten().copied().collect();
        assert_eq!(ids.len(), 50, "subscriber {i} got {} of 50", ids.len());
        assert_eq!(got[&i].len(), 50, "subscriber {i}'s application saw an event twice");
    }
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 500);
    assert!(r.iter().all(|(_, _, o)| *o == Outcome::Delivered), "{r:?}");
    let dups: u64 = subscribers()
        .iter()
        .filter_map(|&i| sim.node(i).map(|o| o.stats().events_duplicate))
        .sum();
    eprintln!("duplicates on the wire, acknowledged and not delivered: {dups}");
}

#[test]
fn a_crashed_subscriber_is_reported_failed_or_delivered_if_back_in_time() {
    let mut sim = cluster(0.0, 4);
    let (gone, back) = (subscribers()[2], subscribers()[5]);
    sim.kill(gone);
    sim.kill(back);
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 5, alo, 0.2);
    // `back` restarts under its name 3 s later (long before it could be
    // declared failed) and subscribes again.
    advance(&mut sim, 3.0);
    sim.restart(back, false, 0);
    let wall = sim.wall();
    sim.with_node(back, |o, now| o.subscribe(now, wall, TOPIC))
        .expect("running")
        .expect("subscribe");
    advance(&mut sim, 60.0);
    let name = |i: usize| rumormill_sim::member_name(i);
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 50, "{r:?}");
    for (seq, who, outcome) in &r {
        let expected = if *who == name(gone) {
            Outcome::SubscriberFailed
        } else {
            Outcome::Delivered
        };
        assert_eq!(*outcome, expected, "event {seq} for {who}");
    }
    let got = delivered(&sim);
    assert_eq!(
        got.get(&back).map(Vec::len),
        Some(5),
        "the restarted subscriber got every event"
    );
}

#[test]
fn exhausted_retries_and_unsubscribing_are_reported() {
    let mut sim = cluster(0.0, 5);
    let (silent, leaving_topic) = (subscribers()[1], subscribers()[4]);
    sim.kill(silent);
    // Unsubscribes at the same moment the event is published: the
    // publisher still counts it, the subscriber answers "unsubscribed".
    let wall = sim.wall();
    sim.with_node(leaving_topic, |o, now| o.unsubscribe(now, wall, TOPIC))
        .expect("running")
        .expect("unsubscribe");
    let limited = Delivery::AtLeastOnce {
        retry_every: Duration::from_millis(500),
        retry_max: 2,
    };
    publish(&mut sim, 0, 1, limited, 0.0);
    advance(&mut sim, 5.0);
    let name = rumormill_sim::member_name;
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 10, "{r:?}");
    for (_, who, outcome) in &r {
        let expected = if *who == name(silent) {
            Outcome::RetriesExhausted // 2 resends in 1 s, long before failure detection
        } else if *who == name(leaving_topic) {
            Outcome::Unsubscribed
        } else {
            Outcome::Delivered
        };
        assert_eq!(*outcome, expected, "{who}");
    }
    let got = delivered(&sim);
    assert_eq!(
        got.get(&leaving_topic),
        None,
        "an unsubscribed member's application gets nothing"
    );
}

#[test]
fn manual_acks_hold_the_acknowledgement_until_the_application_has_it() {
    let mut sim = cluster(0.0, 6);
    let careful = subscribers()[0];
    sim.with_node(careful, |o, _| o.set_manual_acks(true));
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 1, alo, 3.5);
    let name = rumormill_sim::member_name(careful);
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 9, "everyone but the careful subscriber: {r:?}");
    assert!(r.iter().all(|(_, who, _)| *who != name));
    assert_eq!(
        delivered(&sim).get(&careful).map(Vec::len),
        Some(1),
        "resends are not delivered again"
    );
    let resent = sim.node(careful).map_or(0, |o| o.stats().events_duplicate);
    assert!(resent >= 2, "the publisher kept resending ({resent})");
    // The application has stored it: now it is acknowledged.
    let id = sim
        .events()
        .iter()
        .find_map(|(_, i, e)| match e {
            Notification::Event(m) if *i == careful => Some(m.id.clone()),
            _ => None,
        })
        .expect("delivered");
    sim.with_node(careful, |o, _| o.acknowledge(&id));
    advance(&mut sim, 1.0);
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 10);
    assert!(r.contains(&(id.seq, name, Outcome::Delivered)), "{r:?}");
}

#[test]
fn a_refused_event_is_not_acknowledged_and_the_next_resend_delivers_it_again() {
    let mut sim = cluster(0.0, 8);
    let full = subscribers()[0];
    sim.with_node(full, |o, _| o.set_manual_acks(true));
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 1, alo, 0.5);
    let deliveries = |sim: &Simulation| {
        sim.events()
            .iter()
            .filter(|(_, i, e)| *i == full && matches!(e, Notification::Event(_)))
            .count()
    };
    assert_eq!(deliveries(&sim), 1);
    let id = sim
        .events()
        .iter()
        .find_map(|(_, i, e)| match e {
            Notification::Event(m) if *i == full => Some(m.id.clone()),
            _ => None,
        })
        .expect("delivered");
    // The application could not store it (its inbox is full): refused.
    assert_eq!(sim.with_node(full, |o, _| o.refuse(&id)), Some(true), "refused");
    advance(&mut sim, 1.5);
    assert_eq!(
        deliveries(&sim),
        2,
        "the resend is delivered again, not taken for a duplicate"
    );
    let name = rumormill_sim::member_name(full);
    assert!(
        !reports(&sim, 0).iter().any(|(_, who, _)| *who == name),
        "not acknowledged"
    );
    sim.with_node(full, |o, _| o.acknowledge(&id));
    advance(&mut sim, 1.0);
    assert!(reports(&sim, 0).contains(&(id.seq, name, Outcome::Delivered)));
}

#[test]
fn a_restarted_publisher_resumes_its_pending_events() {
    let mut sim = cluster(0.0, 7);
    let publisher = 1;
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    for k in 0..5 {
        let payload = format!("event {k}").into_bytes();
        sim.with_node(publisher, |o, now| o.publish(now, TOPIC, payload, alo))
            .expect("running")
            .expect("publish");
    }
    // Saved before the crash (an agent saves them as it publishes), then
    // the publisher dies before any acknowledgement is back.
    let saved = sim.node(publisher).map(Overlay::pending_events).expect("running");
    assert_eq!(saved.len(), 5);
    sim.kill(publisher);
    advance(&mut sim, 2.0);
    sim.restart(publisher, false, 0);
    // The join fetches the replicated store at once: the subscribers are
    // known again within a second, not at the next anti-entropy interval.
    advance(&mut sim, 1.0);
    let known = sim.node(publisher).map_or(0, |o| o.subscribers(TOPIC).len());
    assert_eq!(known, 10, "the restarted publisher knows the subscribers again");
    for e in saved {
        sim.with_node(publisher, |o, now| o.resume(now, e))
            .expect("running")
            .expect("resume");
    }
    advance(&mut sim, 5.0);
    let r = reports(&sim, publisher);
    assert_eq!(r.len(), 50, "{r:?}");
    assert!(r.iter().all(|(_, _, o)| *o == Outcome::Delivered), "{r:?}");
    let got = delivered(&sim);
    for i in subscribers() {
        assert_eq!(got.get(&i).map(Vec::len), Some(5), "subscriber {i}: each event once");
    }
}

#[test]
fn a_one_mebibyte_event_reaches_every_subscriber_over_streams() {
    let mut sim = cluster(0.0, 8);
    let payload = vec![0x42; 1 << 20];
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(2),
        retry_max: 0,
    };
    let frames_before = sim.node(0).map_or(0, |o| o.stats().frames_sent);
    sim.with_node(0, |o, now| o.publish(now, TOPIC, payload, alo))
        .expect("running")
        .expect("publish");
    advance(&mut sim, 10.0);
    let frames = sim.node(0).map_or(0, |o| o.stats().frames_sent) - frames_before;
    assert!(frames >= 1, "a 1 MiB event cannot travel in a datagram");
    let got = delivered(&sim);
    for i in subscribers() {
        assert_eq!(got.get(&i).map(Vec::len), Some(1), "subscriber {i}");
        let bytes = sim.node(i).map_or(0, |o| o.stats().event_payload_bytes_received);
        assert!(bytes >= 1 << 20, "subscriber {i} received {bytes} payload bytes");
    }
    let r = reports(&sim, 0);
    assert_eq!(r.len(), 10);
    assert!(r.iter().all(|(_, _, o)| *o == Outcome::Delivered), "{r:?}");
}

#[test]
fn an_event_too_old_to_be_forgotten_is_not_refused_and_can_still_be_acknowledged() {
    let mut sim = cluster(0.0, 8);
    let full = subscribers()[0];
    sim.with_node(full, |o, _| o.set_manual_acks(true));
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    publish(&mut sim, 0, 1, alo, 0.5);
    let id = sim
        .events()
        .iter()
        .find_map(|(_, i, e)| match e {
            Notification::Event(m) if *i == full => Some(m.id.clone()),
            _ => None,
        })
        .expect("delivered");
    // The member has since taken far more of this publisher's events as
    // final: forgetting this one would not make its resend news again.
    let floor = id.seq + rumormill_core::events::dedup::WINDOW as u64 + 10;
    sim.with_node(full, |o, _| {
        o.restore_delivered([rumormill_core::events::dedup::DedupEntry {
            origin: id.origin.clone(),
            epoch: id.epoch,
            floor,
            above: Vec::new(),
        }])
    });
    assert!(
        sim.with_node(full, |o, _| o.refuse(&id)) == Some(false),
        "a refusal that cannot be undone is declined"
    );
    // Still awaiting its acknowledgement: the application stores it anyway.
    sim.with_node(full, |o, _| o.acknowledge(&id));
    advance(&mut sim, 1.0);
    let name = rumormill_sim::member_name(full);
    assert!(
        reports(&sim, 0).contains(&(id.seq, name, Outcome::Delivered)),
        "acknowledged, not lost"
    );
}
