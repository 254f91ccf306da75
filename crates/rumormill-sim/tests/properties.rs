//! Properties of the membership protocol, checked in the simulator.

use rumormill_core::{Config, MemberChange, MemberState, Notification};
use rumormill_sim::membership::{MembershipParams, detection_bound_s, run};
use rumormill_sim::{NetworkModel, Simulation, member_name, secs};

#[test]
fn no_false_positives_with_200_members_and_10_percent_loss_for_10_minutes() {
    let r = run(&MembershipParams {
        nodes: 200,
        loss: 0.10,
        kill: 0,
        duration_s: 600.0,
        seed: 42,
        ..Default::default()
    });
    assert_eq!(r.false_positives, 0, "{r:?}");
    assert!(
        r.false_suspicions > 0,
        "10% loss must cause some (refuted) suspicions, or the test proves nothing"
    );
    assert!(r.converged, "{r:?}");
}

#[test]
fn killed_members_are_known_failed_by_all_within_the_configured_bound() {
    for loss in [0.0, 0.10] {
        let p = MembershipParams {
            nodes: 200,
            loss,
            kill: 3,
            duration_s: 150.0,
            seed: 7,
            ..Default::default()
        };
        let r = run(&p);
        let bound = detection_bound_s(&p.config, p.nodes);
        assert_eq!(r.undetected, 0, "loss {loss}: {r:?}");
        let worst = r.detect_all_max_s.expect("three members were killed");
        assert!(worst <= bound, "loss {loss}: took {worst:.1} s, bound {bound:.1} s");
        assert_eq!(r.false_positives, 0, "loss {loss}: {r:?}");
        assert!(r.converged, "loss {loss}: {r:?}");
    }
}

#[test]
fn detection_is_close_to_swim_and_lifeguard_expectations() {
    // First detection ≈ time to the first failed probe (e/(e−1) probe
    // periods on average) + the minimum suspicion timeout, reached once
    // suspicion_mult − 2 others confirm.
    let p = MembershipParams {
        nodes: 100,
        kill: 5,
        duration_s: 120.0,
        seed: 3,
        runs: 2,
        ..Default::default()
    };
    let r = run(&p);
    let (min, _) = p.config.suspicion_timeouts(100);
    let expected = std::f64::consts::E / (std::f64::consts::E - 1.0) + min.as_secs_f64();
    let first = r.detect_first_s.expect("members were killed");
    assert!(
        (first - expected).abs() < 2.5,
        "first detection {first:.2} s, expected ≈ {expected:.2} s"
    );
}

#[test]
fn a_50_50_partition_heals_to_one_view_after_it_ends() {
    let n = 100;
    let mut sim = Simulation::new(n, Config::new_lan(), NetworkModel::lan(0.0), 11);
    sim.bootstrap();
    sim.run_until(secs(5.0));
    sim.network.partition((0..n as u32).map(|i| i % 2).collect());
    sim.run_until(secs(95.0));
    // Each side has given up on the other.
    let o = sim.node(0).expect("running");
    assert_eq!(o.member(&member_name(1)).map(|m| m.state), Some(MemberState::Failed));
    assert_eq!(o.live_count(), n / 2);
    sim.network.heal();
    let healed = sim.now();
    let mut t = healed;
    while !sim.views_agree() {
        t += secs(1.0);
        assert!(
            t - healed <= secs(60.0),
            "views still differ 60 s after the partition ended"
        );
        sim.run_until(t);
    }
    assert_eq!(sim.node(1).expect("running").live_count(), n);
}

#[test]
fn a_crashed_member_restarted_elsewhere_takes_over_its_name() {
    let mut sim = Simulation::new(30, Config::new_lan(), NetworkModel::lan(0.01), 5);
    sim.bootstrap();
    sim.run_until(secs(5.0));
    sim.kill(7);
    sim.run_until(secs(40.0));
    sim.restart(7, true, 0);
    sim.run_until(secs(50.0));
    assert!(sim.views_agree());
    let seen = sim.node(3).and_then(|o| o.member(&member_name(7))).expect("known");
    assert_eq!((seen.state, seen.epoch), (MemberState::Alive, 2));
    let came_back = sim.events().iter().any(|(_, _, e)| {
        matches!(e, Notification::Member { change: MemberChange::Alive, member } if *member.name == *member_name(7))
    });
    assert!(came_back);
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let p = MembershipParams {
        nodes: 60,
        loss: 0.05,
        kill: 2,
        duration_s: 60.0,
        seed: 9,
        ..Default::default()
    };
    let a = run(&p);
    let b = run(&p);
    assert_eq!(a, b);
    let c = run(&MembershipParams { seed: 10, ..p });
    assert_ne!(a.bytes_per_member_per_s, c.bytes_per_member_per_s);
}
