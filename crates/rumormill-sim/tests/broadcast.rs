//! Properties of the replication protocols, checked in the simulator.

use std::time::Duration;

use rumormill_core::replication::{Direction, Loss, Mode, Removal, ReplicationConfig};
use rumormill_sim::replication::{ReplicationParams, run};

fn params(nodes: usize, loss: f64, config: ReplicationConfig, duration_s: f64) -> ReplicationParams {
    ReplicationParams {
        nodes,
        loss,
        config,
        duration_s,
        seed: 3,
        runs: 1,
    }
}

#[test]
fn anti_entropy_as_a_backstop_brings_the_residue_to_zero() {
    // Blind coin with k = 1 dies out early and leaves a large residue …
    let weak = ReplicationConfig {
        mode: Mode::Rumor,
        removal: Removal::Blind,
        loss: Loss::Coin,
        rounds: 1,
        fanout: 1,
        ..ReplicationConfig::default()
    };
    let alone = run(&params(1000, 0.1, weak.clone(), 60.0));
    assert!(alone.delivery < 0.9, "rumor alone: {}", alone.delivery);
    // … which anti-entropy repairs.
    let both = ReplicationConfig {
        mode: Mode::Both,
        anti_entropy_interval: Duration::from_secs(5),
        ..weak
    };
    let backed = run(&params(1000, 0.1, both, 120.0));
    assert_eq!(backed.delivery, 1.0, "{backed:?}");
}

#[test]
fn anti_entropy_alone_reaches_everyone_in_about_log_n_exchanges() {
    let c = ReplicationConfig {
        mode: Mode::AntiEntropy,
        anti_entropy_interval: Duration::from_secs(1),
        anti_entropy_direction: Direction::PushPull,
        ..ReplicationConfig::default()
    };
    let r = run(&params(1000, 0.0, c, 60.0));
    assert_eq!(r.delivery, 1.0);
    // Push-pull: ≈ log3(n) + ln ln(n) ≈ 8.2 rounds of 1 s; allow the random phases.
    let max = r.latency_max_s.expect("delivered");
    assert!((5.0..=16.0).contains(&max), "took {max:.1} s");
}

#[test]
fn rumor_mongering_reaches_all_but_a_small_residue_fast_under_loss() {
    let r = run(&params(
        2000,
        0.05,
        ReplicationConfig {
            mode: Mode::Rumor,
            ..ReplicationConfig::default()
        },
        30.0,
    ));
    assert!(r.delivery > 0.98, "{r:?}");
    let p99 = r.latency_p99_s.expect("delivered");
    assert!(p99 < 1.0, "p99 {p99:.3} s");
    // Feedback-counter with k = 3 stops: a bounded number of copies per member.
    assert!(r.copies_per_member < 20.0, "{r:?}");
}

#[test]
fn broadcast_runs_are_deterministic() {
    let p = params(300, 0.05, ReplicationConfig::default(), 20.0);
    assert_eq!(run(&p), run(&p));
}
