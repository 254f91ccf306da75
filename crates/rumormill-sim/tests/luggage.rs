//! Luggage in the simulator: 50 members change their luggage 1,000 times;
//! a member that joins afterwards gets all of it.

use rumormill_core::{Config, Overlay};
use rumormill_sim::{NetworkModel, Simulation, member_name, secs};

const MEMBERS: usize = 50;
const CHANGES_EACH: usize = 20;

fn value(member: usize, key: usize) -> Vec<u8> {
    format!("{}:{key}:{}", member_name(member), "x".repeat(200)).into_bytes()
}

/// Whether `o` holds the final luggage of every writer.
fn has_all(o: &Overlay) -> bool {
    (0..MEMBERS).all(|m| {
        let l = o.luggage(&member_name(m));
        // Ten keys per member, each written twice: the second value wins.
        l.len() == CHANGES_EACH / 2
            && l.iter()
                .all(|(k, v)| k.parse().is_ok_and(|k: usize| *v == value(m, k + 100)))
    })
}

#[test]
fn a_late_joiner_gets_every_members_luggage() {
    let mut sim = Simulation::new(MEMBERS + 1, Config::new_lan(), NetworkModel::lan(0.01), 11);
    sim.bootstrap();
    let late = MEMBERS;
    sim.kill(late);
    // 1,000 changes: each member sets 10 keys, then overwrites them.
    for round in 0..CHANGES_EACH {
        for m in 0..MEMBERS {
            let key = round % (CHANGES_EACH / 2);
            let v = if round < CHANGES_EACH / 2 {
                value(m, key)
            } else {
                value(m, key + 100)
            };
            let wall = sim.wall();
            sim.with_node(m, |o, now| o.set_luggage(now, wall, &key.to_string(), v))
                .expect("running")
                .expect("luggage");
        }
        let t = sim.now() as f64 / 1e9 + 0.05;
        sim.run_until(secs(t));
    }
    // Held by every member.
    let mut t = sim.now() as f64 / 1e9;
    let start = t;
    while !(0..MEMBERS).all(|i| sim.node(i).is_some_and(has_all)) {
        assert!(t - start < 60.0, "the luggage did not reach every member within 60 s");
        t += 0.5;
        sim.run_until(secs(t));
    }
    // A new member joins and receives all of it.
    sim.restart(late, false, 0);
    let joined = sim.now() as f64 / 1e9;
    let mut t = joined;
    while !sim.node(late).is_some_and(has_all) {
        assert!(t - joined < 60.0, "the late joiner lacked luggage 60 s after joining");
        t += 0.25;
        sim.run_until(secs(t));
    }
    let bytes = sim.node(late).map_or(0, |o| o.stats().bytes_received);
    let held: usize = (0..MEMBERS)
        .map(|m| {
            sim.node(late).map_or(0, |o| {
                o.luggage(&member_name(m)).iter().map(|(_, v)| v.len()).sum::<usize>()
            })
        })
        .sum();
    eprintln!(
        "late joiner: all luggage of {MEMBERS} members ({held} bytes of values) after {:.2} s, {bytes} bytes received",
        t - joined
    );
    assert!(bytes as usize >= held, "cannot have received less than it holds");
}
