//! Races of cluster-wide key rotation, in the simulator: rotations through
//! two members at once, a member down during a rotation, a rotation during
//! a partition. Time is simulated; nothing sleeps.

use rumormill_core::keys::{KeyError, KeyStep};
use rumormill_core::{Config, CoreError, KeyId, Overlay};
use rumormill_sim::{NetworkModel, Simulation, secs};

const OLD: [u8; 16] = [1; 16];
const NEW_A: [u8; 16] = [2; 16];
const NEW_B: [u8; 32] = [3; 32];
const NEW_C: [u8; 24] = [4; 24];

fn id(key: &[u8]) -> KeyId {
    rumormill_wire::key_id(key)
}

/// `n` members holding OLD, each knowing every member and every report.
fn cluster(n: usize, seed: u64) -> Simulation {
    let mut sim = Simulation::new_encrypted(n, Config::new_lan(), NetworkModel::lan(0.0), seed, &OLD);
    sim.bootstrap();
    let all_reports = |sim: &Simulation| {
        (0..n).all(|i| {
            sim.node(i).is_some_and(|o: &Overlay| {
                let r = o.key_reports();
                r.len() == n && r.iter().all(|(_, r)| r.is_some())
            })
        })
    };
    run_until(&mut sim, 30.0, "every report known", all_reports);
    sim
}

/// Runs until `done` holds, at most `limit` more simulated seconds.
fn run_until(sim: &mut Simulation, limit: f64, what: &str, done: impl Fn(&Simulation) -> bool) {
    let start = sim.now() as f64 / 1e9;
    let mut t = start;
    while !done(sim) {
        assert!(t - start < limit, "{what}: not after {limit} s");
        t += 0.25;
        sim.run_until(secs(t));
    }
}

fn advance(sim: &mut Simulation, s: f64) {
    let t = sim.now() as f64 / 1e9;
    sim.run_until(secs(t + s));
}

/// Member `i`'s keyring: its primary and every key, sorted.
fn held(sim: &Simulation, i: usize) -> (KeyId, Vec<KeyId>) {
    let keys = sim
        .node(i)
        .and_then(Overlay::keys)
        .expect("an encrypted, running member");
    let primary = keys.iter().find(|k| k.primary).map(|k| k.id).expect("a primary");
    (primary, keys.iter().map(|k| k.id).collect())
}

fn sorted(mut ids: Vec<KeyId>) -> Vec<KeyId> {
    ids.sort_unstable();
    ids
}

fn version(sim: &Simulation, i: usize) -> u64 {
    sim.node(i)
        .and_then(Overlay::keyring_record)
        .map(|r| r.version)
        .expect("encrypted")
}

fn live_view(sim: &Simulation, i: usize) -> usize {
    sim.node(i).map_or(0, Overlay::live_count)
}

#[test]
fn two_rotations_at_once_through_different_members_converge_on_one_keyring() {
    let n = 8;
    let mut sim = cluster(n, 1);
    // m1 and m2 install a key each at the same instant, by the same clock:
    // equal versions, so the writer's name decides (m2 > m1).
    let wall = sim.wall();
    sim.with_node(1, |o, now| o.install_key_everywhere(now, wall, &NEW_A))
        .expect("running")
        .expect("install A");
    sim.with_node(2, |o, now| o.install_key_everywhere(now, wall, &NEW_B))
        .expect("running")
        .expect("install B");
    let want = (id(&OLD), sorted(vec![id(&OLD), id(&NEW_B)]));
    run_until(&mut sim, 30.0, "everyone follows m2's keyring", |sim| {
        (0..n).all(|i| held(sim, i) == want)
    });
    assert!(
        (0..n).all(|i| version(&sim, i) == wall.as_unix_ms()),
        "one version everywhere"
    );
    // The losing operation shows as not followed where it was taken.
    let lost = sim
        .node(1)
        .expect("running")
        .key_progress(KeyStep::Installed(id(&NEW_A)), &[]);
    assert_eq!((lost.done.len(), lost.missing.len()), (0, n), "{lost:?}");

    // Now m1's clock is 5 ms ahead of m2's: its higher version wins over
    // the writer's name.
    advance(&mut sim, 1.0);
    let wall = sim.wall();
    sim.with_node(2, |o, now| o.install_key_everywhere(now, wall, &NEW_C))
        .expect("running")
        .expect("install C");
    let ahead = wall.saturating_add(std::time::Duration::from_millis(5));
    sim.with_node(1, |o, now| o.install_key_everywhere(now, ahead, &NEW_A))
        .expect("running")
        .expect("install A again");
    let want = (id(&OLD), sorted(vec![id(&OLD), id(&NEW_A), id(&NEW_B)]));
    run_until(&mut sim, 30.0, "everyone follows m1's newer keyring", |sim| {
        (0..n).all(|i| held(sim, i) == want)
    });
    assert!((0..n).all(|i| version(&sim, i) == ahead.as_unix_ms()));
    // And the rotation goes on from there, through a third member.
    let wall = sim.wall();
    sim.with_node(5, |o, now| o.use_key_everywhere(now, wall, id(&NEW_A), &[]))
        .expect("running")
        .expect("use A");
    run_until(&mut sim, 30.0, "everyone seals with A", |sim| {
        (0..n).all(|i| held(sim, i).0 == id(&NEW_A))
    });
    advance(&mut sim, 5.0);
    assert!(sim.views_agree(), "traffic flows under the new primary");
}

/// Runs the three steps through member `via`, each once the others report
/// the previous one.
fn rotate(sim: &mut Simulation, via: usize, members: &[usize], new: &[u8]) {
    let wall = sim.wall();
    sim.with_node(via, |o, now| o.install_key_everywhere(now, wall, new))
        .expect("running")
        .expect("install");
    let reported = |step: KeyStep| {
        move |sim: &Simulation| {
            sim.node(via)
                .is_some_and(|o: &Overlay| o.key_progress(step, &[]).missing.is_empty())
        }
    };
    run_until(sim, 30.0, "installed everywhere", reported(KeyStep::Installed(id(new))));
    let wall = sim.wall();
    sim.with_node(via, |o, now| o.use_key_everywhere(now, wall, id(new), &[]))
        .expect("running")
        .expect("use");
    run_until(sim, 30.0, "primary everywhere", reported(KeyStep::Primary(id(new))));
    let wall = sim.wall();
    sim.with_node(via, |o, now| o.remove_key_everywhere(now, wall, id(&OLD), &[]))
        .expect("running")
        .expect("remove");
    run_until(sim, 30.0, "removed everywhere", reported(KeyStep::Removed(id(&OLD))));
    for &i in members {
        assert_eq!(held(sim, i), (id(new), vec![id(new)]), "m{i}");
    }
}

#[test]
fn a_member_down_during_a_rotation_comes_back_with_the_old_key_and_is_kept_out_until_given_the_new_one() {
    let n = 6;
    let mut sim = cluster(n, 2);
    let down = 5;
    let others: Vec<usize> = (0..n - 1).collect();
    sim.kill(down);
    run_until(&mut sim, 60.0, "the others see m5 failed", |sim| {
        (0..n - 1).all(|i| live_view(sim, i) == n - 1)
    });
    // m5 is failed, hence not waited for: the rotation goes through.
    rotate(&mut sim, 0, &others, &NEW_B);
    let version_after = version(&sim, 0);

    // m5 restarts from what it kept: OLD only.
    sim.restart(down, false, 0);
    let rejected_before: u64 = others
        .iter()
        .map(|&i| sim.node(i).map_or(0, |o| o.stats().rejected))
        .sum();
    advance(&mut sim, 60.0);
    assert_eq!(held(&sim, down), (id(&OLD), vec![id(&OLD)]));
    assert_eq!(live_view(&sim, down), 1, "m5 sees nobody");
    for &i in &others {
        assert_eq!(live_view(&sim, i), n - 1, "m{i} is unaffected and does not see m5");
        assert_eq!(held(&sim, i), (id(&NEW_B), vec![id(&NEW_B)]), "m{i}");
    }
    let rejected_after: u64 = others
        .iter()
        .map(|&i| sim.node(i).map_or(0, |o| o.stats().rejected))
        .sum();
    assert!(rejected_after > rejected_before, "its packets are refused");

    // The new key installed on it alone is not enough: it can open the
    // others' packets now, but it still seals with OLD, which they no
    // longer accept.
    let wall = sim.wall();
    sim.with_node(down, |o, now| o.install_local_key(now, wall, &NEW_B))
        .expect("running")
        .expect("local install");
    advance(&mut sim, 60.0);
    assert_eq!(held(&sim, down).0, id(&OLD));
    assert_eq!(live_view(&sim, 0), n - 1, "still out");

    // Given the new key (a fresh start with it), it rejoins, takes the
    // store — the desired keyring included — and follows it.
    sim.set_keys(down, vec![NEW_B.to_vec()]);
    sim.restart(down, false, 0);
    run_until(&mut sim, 60.0, "m5 is back in every view", Simulation::views_agree);
    assert_eq!(live_view(&sim, down), n);
    run_until(&mut sim, 30.0, "m5 follows the overlay's keyring", |sim| {
        version(sim, down) == version_after
    });
    assert_eq!(held(&sim, down), (id(&NEW_B), vec![id(&NEW_B)]));
}

/// Splits members `0..n/2` from the others and waits until each side sees
/// only itself.
fn split(sim: &mut Simulation, n: usize) {
    sim.network.partition((0..n).map(|i| u32::from(i >= n / 2)).collect());
    run_until(sim, 60.0, "each side sees only itself", |sim| {
        (0..n).all(|i| live_view(sim, i) == n / 2)
    });
}

// What holds for a rotation during a partition: a step taken on one side
// reaches the other side once the partition heals as long as both sides
// still seal with a key that both hold. An install does (both sides go on
// sealing with OLD; the other side learns NEW by anti-entropy once healed,
// and every member then holds the same keyring). A `use` then a `remove`
// taken on one side do not: the other side's members are failed there, so
// not waited for, and they go on sealing with OLD, which the first side no
// longer holds; after healing the two sides stay apart — each whole and
// working, neither able to open the other's packets — until the members of
// the other side are given the new key. The refusal rules cannot prevent
// that: they see only live members.

#[test]
fn an_install_during_a_partition_reaches_the_other_side_once_healed() {
    let n = 8;
    let mut sim = cluster(n, 3);
    split(&mut sim, n);
    let wall = sim.wall();
    sim.with_node(0, |o, now| o.install_key_everywhere(now, wall, &NEW_A))
        .expect("running")
        .expect("install");
    let want = (id(&OLD), sorted(vec![id(&OLD), id(&NEW_A)]));
    run_until(&mut sim, 30.0, "the first side holds NEW", |sim| {
        (0..n / 2).all(|i| held(sim, i) == want)
    });
    advance(&mut sim, 10.0);
    assert!(
        (n / 2..n).all(|i| held(&sim, i) == (id(&OLD), vec![id(&OLD)])),
        "the other side has not heard"
    );
    sim.network.heal();
    run_until(&mut sim, 120.0, "one view again", Simulation::views_agree);
    run_until(&mut sim, 60.0, "every member holds OLD and NEW", |sim| {
        (0..n).all(|i| held(sim, i) == want)
    });
    let v = version(&sim, 0);
    assert!((0..n).all(|i| version(&sim, i) == v), "one version everywhere");
    // A cluster-wide install carries the secret in the store, by design
    // (what the rotation-out test shows a local install never does).
    let o = sim.node(n - 1).expect("running");
    assert!(o.store().iter().any(|u| {
        u.value
            .as_deref()
            .is_some_and(|v| v.windows(NEW_A.len()).any(|w| w == NEW_A))
    }));
}

#[test]
fn a_full_rotation_during_a_partition_keeps_the_other_side_out_until_it_is_given_the_new_key() {
    let n = 8;
    let mut sim = cluster(n, 4);
    split(&mut sim, n);
    let first: Vec<usize> = (0..n / 2).collect();
    rotate(&mut sim, 0, &first, &NEW_B);
    sim.network.heal();
    advance(&mut sim, 120.0);
    for i in 0..n {
        assert_eq!(live_view(&sim, i), n / 2, "m{i}: the sides stay apart, each whole");
    }
    assert!((n / 2..n).all(|i| held(&sim, i) == (id(&OLD), vec![id(&OLD)])));
    assert!(first.iter().all(|&i| held(&sim, i) == (id(&NEW_B), vec![id(&NEW_B)])));
    // Each side still works: a write on either reaches its whole side.
    let wall = sim.wall();
    sim.with_node(0, |o, now| o.put(now, wall, "k", b"a".to_vec()))
        .expect("running")
        .expect("put");
    sim.with_node(n - 1, |o, now| o.put(now, wall, "j", b"b".to_vec()))
        .expect("running")
        .expect("put");
    advance(&mut sim, 10.0);
    for i in 0..n {
        let o = sim.node(i).expect("running");
        let (mine, theirs) = if i < n / 2 { ("k", "j") } else { ("j", "k") };
        assert!(
            o.store().value(mine).is_some() && o.store().value(theirs).is_none(),
            "m{i}"
        );
    }
    // Given the new key, the other side rejoins and follows the keyring.
    for i in n / 2..n {
        sim.set_keys(i, vec![NEW_B.to_vec()]);
        sim.restart(i, false, 0);
    }
    run_until(&mut sim, 120.0, "one view again", Simulation::views_agree);
    let v = version(&sim, 0);
    run_until(&mut sim, 60.0, "every member follows the keyring", |sim| {
        (0..n).all(|i| version(sim, i) == v)
    });
    assert!((0..n).all(|i| held(&sim, i) == (id(&NEW_B), vec![id(&NEW_B)])));
}

#[test]
fn a_desired_keyring_of_version_max_is_refused_and_later_rotations_still_win() {
    use rumormill_core::Notification;
    use rumormill_core::keys::KeysNotification;
    use rumormill_core::reserved::{DesiredKeyring, ReservedKey, Secret};
    let n = 4;
    let mut sim = cluster(n, 5);
    // A key holder writes a desired keyring that no later version could beat.
    let forged = DesiredKeyring {
        version: u64::MAX,
        ids: vec![id(&OLD)],
        shared: vec![Secret::new(OLD.to_vec())],
    };
    let key = ReservedKey::DesiredKeyring { member: "m3".into() }.key();
    let wall = sim.wall();
    sim.with_node(3, |o, now| o.put(now, wall, &key, forged.encode().to_vec()))
        .expect("running")
        .expect("forged write");
    advance(&mut sim, 5.0);
    for i in 0..n - 1 {
        let refused = sim.events().iter().any(|(_, at, e)| {
            *at == i && matches!(e, Notification::Keys(KeysNotification::Refused { writer, version }) if writer == "m3" && *version == u64::MAX)
        });
        assert!(refused, "m{i} refused it");
    }
    let all: Vec<usize> = (0..n).collect();
    rotate(&mut sim, 1, &all, &NEW_A);
}

#[test]
fn a_holder_is_rotated_out_and_the_new_secret_never_enters_the_store() {
    let n = 4;
    let mut sim = cluster(n, 6);
    let out = vec!["m3".to_owned()];
    for i in 0..3 {
        let wall = sim.wall();
        sim.with_node(i, |o, now| o.install_local_key(now, wall, &NEW_A))
            .expect("running")
            .expect("local install");
    }
    let new = id(&NEW_A);
    let via_progress = |step: KeyStep, out: Vec<String>| {
        move |sim: &Simulation| {
            sim.node(0)
                .is_some_and(|o: &Overlay| o.key_progress(step, &out).missing.is_empty())
        }
    };
    run_until(
        &mut sim,
        30.0,
        "the kept members report NEW",
        via_progress(KeyStep::Installed(new), out.clone()),
    );
    // Without leaving m3 out, `use` is refused and names it.
    let wall = sim.wall();
    let refused = sim
        .with_node(0, |o, now| o.use_key_everywhere(now, wall, new, &[]))
        .expect("running");
    assert!(
        matches!(&refused, Err(rumormill_core::keys::KeyError::NotInstalledOn { members, .. }) if *members == out),
        "{refused:?}"
    );
    sim.with_node(0, |o, now| o.use_key_everywhere(now, wall, new, &out))
        .expect("running")
        .expect("use, leaving m3 out");
    run_until(
        &mut sim,
        30.0,
        "the kept members seal with NEW",
        via_progress(KeyStep::Primary(new), out.clone()),
    );
    let wall = sim.wall();
    sim.with_node(1, |o, now| o.remove_key_everywhere(now, wall, id(&OLD), &out))
        .expect("running")
        .expect("remove, leaving m3 out");
    run_until(&mut sim, 30.0, "OLD is gone from the kept members", |sim| {
        (0..3).all(|i| held(sim, i) == (new, vec![new]))
    });
    assert_eq!(held(&sim, 3), (id(&OLD), vec![id(&OLD)]));
    for i in 0..n {
        let o = sim.node(i).expect("running");
        for u in o.store().iter() {
            let v = u.value.as_deref().unwrap_or_default();
            assert!(
                !v.windows(NEW_A.len()).any(|w| w == NEW_A),
                "NEW's secret is in m{i}'s store under {}",
                u.key
            );
        }
    }
    run_until(&mut sim, 60.0, "the kept members drop m3", |sim| {
        (0..3).all(|i| live_view(sim, i) == 3)
    });
}

#[test]
fn a_refused_desired_keyring_write_leaves_the_version_where_it_was() {
    let mut sim = cluster(2, 9);
    let before = version(&sim, 0);
    let record = sim.node(0).and_then(Overlay::keyring_record).expect("encrypted");
    let wall = sim.wall();
    let result = sim
        .with_node(0, |o, now| {
            o.leave(now);
            o.install_key_everywhere(now, wall, &NEW_A)
        })
        .expect("running");
    assert!(matches!(result, Err(KeyError::Core(CoreError::Left))), "{result:?}");
    let after = sim.node(0).and_then(Overlay::keyring_record).expect("encrypted");
    assert_eq!(
        after.version, before,
        "no desired keyring of a higher version was written"
    );
    assert_eq!((after.local, after.pending), (record.local, record.pending));
}
