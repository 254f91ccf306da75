//! One test per replication rule, on pairs of state machines driven by
//! hand, and end-to-end over the test network.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumormill_wire::proto::envelope::Body;

use super::*;
use crate::testkit::{Net, addr};
use crate::{Config, Notification, WallTime};

fn config(removal: Removal, loss: Loss, rounds: u32) -> ReplicationConfig {
    ReplicationConfig {
        mode: Mode::Rumor,
        removal,
        loss,
        rounds,
        ..ReplicationConfig::default()
    }
}

struct Pair {
    a: Replication,
    b: Replication,
    now: Instant,
}

const A: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1));
const B: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 2));

impl Pair {
    fn new(ca: ReplicationConfig, cb: ReplicationConfig) -> Pair {
        let now = Instant::now();
        Pair {
            a: Replication::new(ca, "a", 1, A, 1300, 1, now),
            b: Replication::new(cb, "b", 1, B, 1300, 2, now),
            now,
        }
    }

    /// Runs one round at `a` towards `b`, then carries messages both ways
    /// until quiet. Returns the message kinds that travelled.
    fn round(&mut self) -> Vec<&'static str> {
        self.now += Duration::from_secs(60);
        let now = self.now;
        self.a.handle_timeout(now, &mut |_| vec![B]);
        self.shuttle()
    }

    fn shuttle(&mut self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        let now = self.now;
        loop {
            let mut moved = false;
            while let Some(m) = self.a.poll_message() {
                moved = true;
                kinds.push(kind(&m));
                if let Some(body) = m.envelope.body {
                    self.b.handle(now, A, body);
                }
            }
            while let Some(m) = self.b.poll_message() {
                moved = true;
                kinds.push(kind(&m));
                if let Some(body) = m.envelope.body {
                    self.a.handle(now, B, body);
                }
            }
            if !moved {
                return kinds;
            }
        }
    }
}

fn kind(m: &Outgoing) -> &'static str {
    match &m.envelope.body {
        Some(Body::Rumor(_)) => "rumor",
        Some(Body::RumorFeedback(_)) => "feedback",
        Some(Body::Digest(_)) => "digest",
        Some(Body::Delta(_)) => "delta",
        _ => "other",
    }
}

#[test]
fn a_push_infects_the_receiver_which_answers_with_feedback() {
    let c = config(Removal::Feedback, Loss::Counter, 2);
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    assert_eq!(p.b.rumor_state(&u), RumorState::Susceptible);
    assert_eq!(p.round(), ["rumor", "feedback"]);
    assert_eq!(p.b.rumor_state(&u), RumorState::Infected);
    assert_eq!(p.b.store().value("k"), Some(&b"v"[..]));
    assert_eq!(p.b.poll_notification().map(|e| e.update.key), Some("k".to_string()));
    assert_eq!(
        p.a.rumor_state(&u),
        RumorState::Infected,
        "a necessary contact keeps it spreading"
    );
}

#[test]
fn feedback_counter_removes_after_k_unnecessary_contacts() {
    let c = config(Removal::Feedback, Loss::Counter, 3);
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    p.round(); // necessary
    for i in 1..=3 {
        assert_eq!(
            p.a.rumor_state(&u),
            RumorState::Infected,
            "before unnecessary contact {i}"
        );
        p.round();
    }
    assert_eq!(p.a.rumor_state(&u), RumorState::Removed);
    assert_eq!(p.round(), Vec::<&str>::new(), "a removed update is not pushed");
}

#[test]
fn feedback_coin_with_k_1_removes_at_the_first_unnecessary_contact() {
    let c = config(Removal::Feedback, Loss::Coin, 1);
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    p.round();
    assert_eq!(p.a.rumor_state(&u), RumorState::Infected);
    p.round();
    assert_eq!(p.a.rumor_state(&u), RumorState::Removed);
}

#[test]
fn feedback_coin_loses_interest_with_probability_one_over_k() {
    // Over many unnecessary contacts with k = 4, about a quarter remove.
    let c = config(Removal::Feedback, Loss::Coin, 4);
    let mut p = Pair::new(c.clone(), c);
    let mut removed = 0;
    for i in 0..400 {
        let u = p.a.put(p.now, &format!("k{i}"), b"v".to_vec());
        p.b.put(p.now, "warm-up", Vec::new());
        // b already has it: copy it over without a push.
        let wire = u.to_wire();
        p.b.handle(
            p.now,
            A,
            Body::Delta(rumormill_wire::proto::Delta {
                updates: vec![wire],
                chunks: 1,
                ..Default::default()
            }),
        );
        p.b.poll_message();
        let before = p.a.stats().removed;
        p.round();
        removed += p.a.stats().removed - before;
        p.a.infected.clear();
    }
    assert!(
        (70..=130).contains(&removed),
        "removed {removed} of 400, expected ≈ 100"
    );
}

#[test]
fn blind_counter_removes_after_k_pushes_without_feedback() {
    let c = config(Removal::Blind, Loss::Counter, 2);
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    assert_eq!(p.round(), ["rumor"], "blind asks for no feedback");
    assert_eq!(p.a.rumor_state(&u), RumorState::Infected);
    p.round();
    assert_eq!(p.a.rumor_state(&u), RumorState::Removed);
}

#[test]
fn blind_coin_with_k_1_removes_after_one_push() {
    let c = config(Removal::Blind, Loss::Coin, 1);
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    p.round();
    assert_eq!(p.a.rumor_state(&u), RumorState::Removed);
}

#[test]
fn forgotten_removed_updates_never_come_back_as_news() {
    let c = ReplicationConfig {
        removed_ttl: Duration::from_secs(1),
        ..config(Removal::Feedback, Loss::Coin, 1)
    };
    let mut p = Pair::new(c.clone(), c);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    p.round();
    p.round(); // b pushes nothing (a's timer only); a removes on b's "known"
    p.now += Duration::from_secs(5);
    let now = p.now;
    p.b.handle_timeout(now, &mut |_| Vec::new()); // GC at b
    p.b.infected.clear();
    p.b.removed.clear();
    while p.b.poll_notification().is_some() {}
    // A late copy of the same update reaches b.
    let late = rumormill_wire::proto::Rumor {
        updates: vec![u.to_wire()],
        want_feedback: true,
        reply_to: None,
    };
    p.b.handle(now, A, Body::Rumor(late));
    assert!(p.b.poll_notification().is_none(), "not news");
    assert_eq!(p.b.rumor_state(&u), RumorState::Removed, "not re-infected");
    let answer = p.b.poll_message().expect("feedback");
    assert!(matches!(answer.envelope.body, Some(Body::RumorFeedback(f)) if f.known.len() == 1 && f.fresh.is_empty()));
}

#[test]
fn a_handler_that_ignores_sends_no_feedback_and_stores_nothing() {
    let c = config(Removal::Feedback, Loss::Counter, 2);
    let mut p = Pair::new(c.clone(), c);
    p.b.set_handler(|_: &[Update], _: &Store| Decision::Ignore);
    let u = p.a.put(p.now, "k", b"v".to_vec());
    assert_eq!(p.round(), ["rumor"], "no feedback");
    assert!(p.b.store().is_empty());
    assert_eq!(p.b.rumor_state(&u), RumorState::Susceptible);
}

#[test]
fn a_handler_can_accept_a_subset_or_replace_the_store() {
    let c = config(Removal::Feedback, Loss::Counter, 2);
    let mut p = Pair::new(c.clone(), c);
    p.b.set_handler(|batch: &[Update], _: &Store| {
        Decision::AcceptSubset(
            (0..batch.len())
                .filter(|&i| batch[i].key.starts_with("public/"))
                .collect(),
        )
    });
    p.a.put(p.now, "public/x", b"1".to_vec());
    p.a.put(p.now, "private/y", b"2".to_vec());
    p.round();
    assert_eq!(p.b.store().len(), 1);
    assert!(p.b.store().get("public/x").is_some());
    p.b.set_handler(|_: &[Update], _: &Store| {
        Decision::Replace(vec![Update {
            key: "only".into(),
            value: Some(vec![]),
            lamport: 9,
            origin: "b".into(),
            epoch: 1,
            seq: 99,
        }])
    });
    p.a.put(p.now, "public/z", b"3".to_vec());
    p.round();
    assert_eq!(p.b.store().iter().map(|u| u.key.as_str()).collect::<Vec<_>>(), ["only"]);
}

#[test]
fn a_digest_exchange_sends_only_the_difference() {
    let c = ReplicationConfig {
        mode: Mode::AntiEntropy,
        anti_entropy_direction: Direction::Pull,
        ..ReplicationConfig::default()
    };
    let mut p = Pair::new(c.clone(), c);
    // b writes 1,000 updates; a already has all but 3 of them.
    let mut all = Vec::new();
    for i in 0..1000 {
        all.push(p.b.put(p.now, &format!("k{i}"), vec![7; 100]));
    }
    for u in &all {
        if ![10, 500, 999].contains(&u.seq) {
            p.a.handle(
                p.now,
                B,
                Body::Delta(rumormill_wire::proto::Delta {
                    updates: vec![u.to_wire()],
                    chunks: 1,
                    ..Default::default()
                }),
            );
        }
    }
    while p.a.poll_message().is_some() {}
    let sent_before = p.b.stats().updates_sent;
    assert_eq!(p.round(), ["digest", "delta"]);
    assert_eq!(
        p.b.stats().updates_sent - sent_before,
        3,
        "only the three missing updates travel"
    );
    assert_eq!(p.a.store().len(), 1000);
    let sent_before = p.b.stats().updates_sent;
    let syncs_before = p.a.stats().syncs;
    assert_eq!(p.round(), ["digest", "delta"], "in sync: an empty answer");
    assert_eq!(p.b.stats().updates_sent, sent_before, "nothing travels");
    assert_eq!(p.a.stats().syncs, syncs_before + 1, "the initiator knows it is synced");
}

#[test]
fn push_and_push_pull_exchanges_converge_both_ways() {
    for direction in [Direction::Push, Direction::PushPull] {
        let c = ReplicationConfig {
            mode: Mode::AntiEntropy,
            anti_entropy_direction: direction,
            ..ReplicationConfig::default()
        };
        let mut p = Pair::new(c.clone(), c);
        p.a.put(p.now, "from-a", b"1".to_vec());
        p.b.put(p.now, "from-b", b"2".to_vec());
        let kinds = p.round();
        assert!(p.b.store().get("from-a").is_some(), "{direction}: {kinds:?}");
        if direction == Direction::PushPull {
            assert!(p.a.store().get("from-b").is_some(), "{kinds:?}");
        }
    }
}

#[test]
fn a_push_pull_round_checks_a_hash_first_and_exchanges_only_when_it_differs() {
    let c = ReplicationConfig {
        mode: Mode::AntiEntropy,
        anti_entropy_direction: Direction::PushPull,
        ..ReplicationConfig::default()
    };
    let mut p = Pair::new(c.clone(), c);
    p.a.put(p.now, "from-a", b"1".to_vec());
    p.b.put(p.now, "from-b", b"2".to_vec());
    // Out of sync: the check makes b start a full push-pull back.
    assert_eq!(p.round(), ["digest", "digest", "delta", "digest", "delta"]);
    assert!(p.a.store().get("from-b").is_some() && p.b.store().get("from-a").is_some());
    // In sync: a check and an empty answer, both far smaller than a digest.
    let syncs = p.a.stats().syncs;
    p.now += Duration::from_secs(60);
    let now = p.now;
    p.a.handle_timeout(now, &mut |_| vec![B]);
    let check = p.a.poll_message().expect("a check");
    assert!(matches!(&check.envelope.body, Some(Body::Digest(d)) if d.check && d.origins.is_empty()));
    p.b.handle(now, A, check.envelope.body.expect("body"));
    let answer = p.b.poll_message().expect("an answer");
    assert!(matches!(&answer.envelope.body, Some(Body::Delta(d)) if d.updates.is_empty() && d.seen.is_empty()));
    assert!(p.b.poll_message().is_none(), "nothing else");
    p.a.handle(now, B, answer.envelope.body.expect("body"));
    assert_eq!(p.a.stats().syncs, syncs + 1, "the initiator knows it is synced");
}

#[test]
fn large_differences_go_over_streams_in_chunks() {
    let c = ReplicationConfig {
        mode: Mode::AntiEntropy,
        anti_entropy_direction: Direction::Pull,
        ..ReplicationConfig::default()
    };
    let mut p = Pair::new(c.clone(), c);
    for i in 0..40 {
        p.b.put(p.now, &format!("big{i}"), vec![i as u8; 10_000]);
    }
    p.now += Duration::from_secs(60);
    let now = p.now;
    p.a.handle_timeout(now, &mut |_| vec![B]);
    let digest = p.a.poll_message().expect("digest");
    p.b.handle(now, A, digest.envelope.body.expect("body"));
    let chunks: Vec<Outgoing> = std::iter::from_fn(|| p.b.poll_message()).collect();
    assert!(chunks.len() >= 6, "400 kB in chunks of 64 kB: {}", chunks.len());
    assert!(chunks.iter().all(|m| m.stream));
    for m in chunks {
        p.a.handle(now, B, m.envelope.body.expect("body"));
    }
    assert_eq!(p.a.store().len(), 40);
    assert!(p.a.store().knows_more_than(&[]) && !p.b.store().knows_more_than(&p.a.store().summaries()));
}

#[test]
fn a_rumor_too_big_for_a_datagram_goes_over_a_stream_and_says_where_to_answer() {
    let c = config(Removal::Feedback, Loss::Counter, 2);
    let mut p = Pair::new(c.clone(), c);
    p.a.put(p.now, "huge", vec![1; 5000]);
    p.now += Duration::from_secs(1);
    let now = p.now;
    p.a.handle_timeout(now, &mut |_| vec![B]);
    let rumor = p.a.poll_message().expect("a rumors its new update");
    assert!(rumor.stream);
    assert!(matches!(&rumor.envelope.body, Some(Body::Rumor(r)) if r.reply_to == Some(A.into())));
    // b answers at a's datagram address even though the stream came from elsewhere.
    let elsewhere: SocketAddr = "127.0.0.1:55555".parse().expect("an address");
    p.b.handle(now, elsewhere, rumor.envelope.body.expect("body"));
    let feedback = p.b.poll_message().expect("feedback");
    assert_eq!(feedback.to, A);
    assert!(!feedback.stream);
}

#[test]
fn concurrent_writes_settle_on_the_same_value_everywhere() {
    let mut c = Config::new_lan();
    c.replication.mode = Mode::Both;
    let mut net = Net::new(6, c);
    net.run_for(Duration::from_secs(3));
    let now = net.now;
    net.node(1)
        .put(now, WallTime::default(), "leader", b"n1".to_vec())
        .expect("active");
    net.node(4)
        .put(now, WallTime::default(), "leader", b"n4".to_vec())
        .expect("active");
    net.run_for(Duration::from_secs(30));
    let values: Vec<Option<Vec<u8>>> = (0..6)
        .map(|i| net.node(i).store().value("leader").map(<[u8]>::to_vec))
        .collect();
    assert!(values.iter().all(|v| v.is_some() && *v == values[0]), "{values:?}");
}

#[test]
fn updates_and_deletes_reach_every_member_with_each_mode() {
    for mode in [Mode::Rumor, Mode::AntiEntropy, Mode::Both] {
        let mut c = Config::new_lan();
        c.replication.mode = mode;
        c.replication.anti_entropy_interval = Duration::from_secs(2);
        let mut net = Net::new(10, c);
        net.run_for(Duration::from_secs(3));
        let now = net.now;
        net.node(3)
            .put(now, WallTime::default(), "k", b"v".to_vec())
            .expect("active");
        net.run_for(Duration::from_secs(20));
        for i in 0..10 {
            assert_eq!(net.node(i).store().value("k"), Some(&b"v"[..]), "{mode}: n{i}");
        }
        let updates = net
            .log
            .iter()
            .filter(|(_, _, e)| matches!(e, Notification::Update(_)))
            .count();
        assert_eq!(updates, 9, "{mode}: one event per other member");
        let now = net.now;
        net.node(7).delete(now, WallTime::default(), "k").expect("active");
        net.run_for(Duration::from_secs(20));
        for i in 0..10 {
            assert!(
                net.node(i).store().get("k").is_some_and(|u| u.value.is_none()),
                "{mode}: n{i}"
            );
        }
    }
    let _ = addr(0);
}

#[test]
fn a_restarted_member_writes_anew_and_everyone_takes_its_writes() {
    let mut net = Net::new(4, Config::new_lan());
    net.run_for(Duration::from_secs(3));
    let now = net.now;
    net.node(1)
        .put(now, WallTime::default(), "k1", b"one".to_vec())
        .expect("active");
    net.node(1)
        .put(now, WallTime::default(), "k2", b"old".to_vec())
        .expect("active");
    net.run_for(Duration::from_secs(15));
    assert_eq!(net.node(3).store().value("k2"), Some(&b"old"[..]));
    // n1 restarts (epoch 2): its write counter starts at 1 again.
    net.kill(1);
    net.restart(1, 2, addr(1));
    net.run_for(Duration::from_secs(15));
    let now = net.now;
    net.node(1)
        .put(now, WallTime::default(), "k3", b"three".to_vec())
        .expect("active");
    net.node(1)
        .put(now, WallTime::default(), "k2", b"new".to_vec())
        .expect("active");
    net.run_for(Duration::from_secs(30));
    for i in [0, 2, 3] {
        assert_eq!(net.node(i).store().value("k3"), Some(&b"three"[..]), "n{i}");
        assert_eq!(net.node(i).store().value("k2"), Some(&b"new"[..]), "n{i}");
    }
}

#[test]
fn a_restarted_writer_with_a_wall_clock_floor_beats_its_previous_life() {
    let now = Instant::now();
    let cfg = config(Removal::Feedback, Loss::Counter, 3);
    // First life: many writes push the clock up.
    let mut life1 = Replication::new(cfg.clone(), "a", 1, A, 1300, 1, now);
    life1.advance_clock(1_000);
    for _ in 0..50 {
        life1.put(now, "k", b"old".to_vec());
    }
    let old = life1.store().get("k").cloned().expect("written");
    // Second life, a few seconds later by the wall clock: its fresh clock
    // alone (1) would lose; with the floor it wins.
    let mut life2 = Replication::new(cfg, "a", 2, A, 1300, 1, now);
    life2.advance_clock(4_000);
    let new = life2.put(now, "k", b"new".to_vec());
    assert!(
        new.version() > old.version(),
        "{:?} vs {:?}",
        new.version(),
        old.version()
    );
    // The floor never moves the clock back.
    life2.advance_clock(10);
    assert!(life2.put(now, "k", b"newer".to_vec()).lamport > new.lamport);
}

#[test]
fn a_members_reserved_data_written_by_another_is_refused() {
    let mut p = Pair::new(
        config(Removal::Feedback, Loss::Counter, 3),
        config(Removal::Feedback, Loss::Counter, 3),
    );
    // a writes its own topics (fine) and pretends to write b's (forged).
    p.a.put(p.now, "_rumormill/topics/a", b"orders".to_vec());
    p.a.put(p.now, "_rumormill/topics/b", b"nothing".to_vec());
    p.a.put(p.now, "_rumormill/luggage/b/version", b"0.0".to_vec());
    p.a.put(p.now, "plain", b"ok".to_vec());
    p.round();
    assert_eq!(p.b.store().value("_rumormill/topics/a"), Some(&b"orders"[..]));
    assert_eq!(p.b.store().value("plain"), Some(&b"ok"[..]));
    assert_eq!(
        p.b.store().get("_rumormill/topics/b"),
        None,
        "b's topics are b's to write"
    );
    assert_eq!(p.b.store().get("_rumormill/luggage/b/version"), None);
    assert_eq!(p.b.stats().forged, 2);
    assert_eq!(
        crate::reserved::owner("_rumormill/luggage/a%2Fb/k").as_deref(),
        Some("a/b")
    );
    assert_eq!(crate::reserved::owner("_rumormill/odd").as_deref(), Some(""));
    assert_eq!(crate::reserved::owner("user/key"), None);
}

#[test]
fn the_first_sync_after_a_join_is_reported_once() {
    let mut net = Net::new(3, Config::new_lan());
    net.run_for(Duration::from_secs(30));
    let synced = |i: usize, net: &Net| {
        net.log
            .iter()
            .filter(|(_, n, e)| *n == i && *e == Notification::StoreSynced)
            .count()
    };
    assert_eq!(synced(0, &net), 0, "n0 joined nobody");
    assert_eq!((synced(1, &net), synced(2, &net)), (1, 1));
    assert!(
        net.node(1).replication_stats().syncs > 1,
        "later exchanges are not reported"
    );
    // A join again (say, after the seeds were lost) is reported again.
    let now = net.now;
    net.node(2).join(now, &[addr(1)]).expect("active");
    net.run_for(Duration::from_secs(1));
    assert_eq!(synced(2, &net), 2);
}
