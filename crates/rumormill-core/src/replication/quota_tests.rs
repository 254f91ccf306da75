//! Writer quotas and luggage limits, checked by the writer and on receipt.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumormill_wire::proto::envelope::Body;

use super::*;
use crate::Config;
use crate::WallTime;
use crate::testkit::{Net, name};

const A: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1));
const B: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 2));

fn limits(bytes: u64, entries: u64) -> Limits {
    Limits {
        writer_bytes: bytes,
        writer_entries: entries,
        ..Limits::default()
    }
}

fn config(mode: Mode, limits: Limits) -> ReplicationConfig {
    ReplicationConfig {
        mode,
        anti_entropy_direction: Direction::Pull,
        limits,
        ..ReplicationConfig::default()
    }
}

/// `a` (no quota to speak of) writes with unchecked puts; `b` checks.
struct Pair {
    a: Replication,
    b: Replication,
    now: Instant,
}

impl Pair {
    fn new(mode: Mode, b_limits: Limits) -> Pair {
        let now = Instant::now();
        Pair {
            a: Replication::new(config(mode, limits(u64::MAX, u64::MAX)), "a", 1, A, 1300, 1, now),
            b: Replication::new(config(mode, b_limits), "b", 1, B, 1300, 2, now),
            now,
        }
    }

    /// Runs `a`'s due rounds towards `b` (for a pull exchange, `b`'s
    /// towards `a`), then carries messages both ways until quiet.
    fn round(&mut self) {
        self.now += Duration::from_secs(60);
        let now = self.now;
        self.a.handle_timeout(now, &mut |_| vec![B]);
        self.b.handle_timeout(now, &mut |_| vec![A]);
        for _ in 0..100 {
            let mut moved = false;
            while let Some(m) = self.a.poll_message() {
                moved = true;
                if let Some(body) = m.envelope.body {
                    self.b.handle(now, A, body);
                }
            }
            while let Some(m) = self.b.poll_message() {
                moved = true;
                if let Some(body) = m.envelope.body {
                    self.a.handle(now, B, body);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("messages still moving after 100 exchanges");
    }
}

#[test]
fn a_rumor_over_the_writers_quota_is_refused_on_receipt_counted_and_not_spread() {
    let mut p = Pair::new(Mode::Rumor, limits(10_000, 100));
    for i in 0..5 {
        p.a.put(p.now, &format!("k{i}"), vec![7; 3000]);
    }
    p.round();
    assert_eq!(p.b.store().len(), 3, "three values of 3 kB fit 10 kB, not four");
    assert_eq!(p.b.stats().quota_refused, 2);
    let usage = p.b.store().usage("a");
    assert_eq!((usage.bytes, usage.entries), (3 * 3002, 3));
    assert_eq!(p.b.infected_count(), 3, "b spreads only what it stored");
    assert!(!p.b.store().seen("a", 1, 4), "refused, not seen: it may come again");
    // b answered the refused ones as known: a loses interest in them
    // instead of pushing them for ever.
    for _ in 0..5 {
        p.round();
    }
    assert_eq!(p.a.infected_count(), 0);
    assert!(p.b.store().usage("a").bytes <= 10_000);
}

#[test]
fn a_refused_update_comes_again_by_anti_entropy_once_there_is_room() {
    let mut p = Pair::new(Mode::AntiEntropy, limits(10_000, 100));
    p.a.put(p.now, "k1", vec![1; 6000]);
    p.a.put(p.now, "k2", vec![2; 6000]);
    p.round();
    assert_eq!(p.b.store().value("k1").map(<[u8]>::len), Some(6000));
    assert_eq!(p.b.store().get("k2"), None);
    assert_eq!(p.b.stats().quota_refused, 1);
    assert!(
        !p.b.store().seen("a", 1, 2),
        "the delta's summaries did not mark the refused update seen"
    );
    p.a.delete(p.now, "k1");
    for _ in 0..3 {
        p.round();
    }
    assert_eq!(p.b.store().value("k2").map(<[u8]>::len), Some(6000), "k2 has room now");
    assert!(p.b.store().get("k1").is_some_and(|u| u.value.is_none()));
    assert!(p.b.store().missing_for(&p.a.store().summaries()).is_empty());
    assert!(
        p.a.store().missing_for(&p.b.store().summaries()).is_empty(),
        "converged"
    );
    assert_eq!(
        p.b.store().usage("a").bytes,
        2 + 6002,
        "the deleted value's bytes are gone"
    );
}

#[test]
fn a_local_write_over_quota_is_refused_with_a_typed_error_and_takes_no_sequence_number() {
    let now = Instant::now();
    let mut d = Replication::new(config(Mode::Rumor, limits(1000, 3)), "a", 1, A, 1300, 1, now);
    d.try_put(now, "k1", vec![0; 500]).expect("fits");
    let err = d.try_put(now, "k2", vec![0; 500]).expect_err("1,004 bytes > 1,000");
    assert_eq!(
        err,
        QuotaExceeded::Bytes {
            writer: "a".into(),
            would: 1004,
            max: 1000
        }
    );
    assert!(err.to_string().contains("at most 1000 per writer"), "{err}");
    assert_eq!(d.store().get("k2"), None);
    // Replacing a value counts its new size only; the next write is seq 2.
    let u = d.try_put(now, "k1", vec![0; 900]).expect("replaces");
    assert_eq!(u.seq, 2, "the refused write left no gap");
    d.try_put(now, "k2", vec![]).expect("fits");
    d.try_put(now, "k3", vec![]).expect("fits");
    let err = d.try_put(now, "k4", vec![]).expect_err("a fourth entry");
    assert!(matches!(err, QuotaExceeded::Entries { would: 4, max: 3, .. }), "{err}");
    // Deleting one's own key takes no new entry; deleting a key one does
    // not hold does.
    d.try_delete(now, "k3").expect("own key");
    assert!(matches!(
        d.try_delete(now, "nothing"),
        Err(QuotaExceeded::Entries { .. })
    ));
    // A shrinking write passes even over quota.
    d.try_put(now, "k1", vec![0; 10]).expect("shrinks");
}

#[test]
fn deletes_count_until_their_tombstones_expire() {
    let now = Instant::now();
    let mut c = config(Mode::Rumor, limits(1 << 20, 2));
    c.tombstone_ttl = Duration::from_secs(60);
    let mut d = Replication::new(c, "a", 1, A, 1300, 1, now);
    d.try_put(now, "x", vec![1]).expect("fits");
    d.try_delete(now, "x").expect("own key");
    d.try_put(now, "y", vec![1]).expect("fits");
    d.try_delete(now, "y").expect("own key");
    assert_eq!(d.store().usage("a").entries, 2, "two tombstones");
    assert!(d.try_put(now, "z", vec![1]).is_err(), "tombstones hold their keys");
    let later = now + Duration::from_secs(61);
    d.handle_timeout(later, &mut |_| Vec::new());
    assert_eq!(
        d.store().usage("a"),
        Usage::default(),
        "expired tombstones are refunded"
    );
    d.try_put(later, "z", vec![1]).expect("room again");
}

#[test]
fn luggage_limits_are_checked_on_receipt() {
    let mut p = Pair::new(Mode::Rumor, Limits::default());
    let lug = |k: &str| format!("_rumormill/luggage/a/{k}");
    p.a.put(p.now, &lug("big"), vec![1; 64 * 1024 + 1]);
    p.a.put(p.now, &lug("bad\u{7}key"), b"x".to_vec());
    p.a.put(p.now, &lug(&"k".repeat(300)), b"x".to_vec());
    p.a.put(p.now, &lug("ok"), vec![1; 64 * 1024]);
    p.round();
    assert_eq!(p.b.store().value(&lug("ok")).map(<[u8]>::len), Some(64 * 1024));
    assert_eq!(p.b.store().get(&lug("big")), None, "a value over 64 KiB");
    assert_eq!(p.b.store().get(&lug("bad\u{7}key")), None, "a control character");
    assert_eq!(p.b.store().get(&lug(&"k".repeat(300))), None, "a key over 256 bytes");
    assert_eq!(p.b.stats().luggage_refused, 3);
    // The total per member: "ok" and 15 more values of 64 KiB make 1 MiB;
    // a 17th is refused.
    let before = p.b.stats().luggage_refused;
    for i in 0..16 {
        p.a.put(p.now, &lug(&format!("v{i}")), vec![2; 64 * 1024]);
    }
    p.round();
    assert_eq!(p.b.store().usage("a").luggage, 1 << 20);
    assert!(p.b.store().value(&lug("v14")).is_some());
    assert_eq!(p.b.store().get(&lug("v15")), None);
    assert!(p.b.stats().luggage_refused > before);
    assert_eq!(p.b.stats().quota_refused, 0);
}

#[test]
fn a_writer_over_quota_cannot_grow_another_members_store() {
    // n1 runs with the quota lifted (unchecked writes, as a modified
    // member would); every other member keeps 64 KiB per writer.
    let mut c = Config::new_lan();
    c.replication.mode = Mode::Both;
    c.replication.anti_entropy_interval = Duration::from_secs(2);
    c.replication.limits.writer_bytes = 64 << 10;
    let mut net = Net::new(6, c);
    net.run_for(Duration::from_secs(3));
    for i in 0..40 {
        let now = net.now;
        net.node(1)
            .replication_mut()
            .put(now, &format!("big{i}"), vec![i as u8; 10_000]);
        net.run_for(Duration::from_millis(300));
    }
    net.run_for(Duration::from_secs(20));
    let writer = name(1);
    let mut held = Vec::new();
    for i in [0, 2, 3, 4, 5] {
        let usage = net.node(i).store().usage(&writer);
        assert!(usage.bytes <= 64 << 10, "n{i} holds {} bytes of n1's", usage.bytes);
        assert!(net.node(i).replication_stats().quota_refused > 0, "n{i}");
        held.push(
            net.node(i)
                .store()
                .prefixed("big")
                .map(|u| u.key.clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(held[0].len(), 6, "six values of 10 kB fit 64 KiB");
    assert!(held.iter().all(|h| *h == held[0]), "the members agree: {held:?}");
    // The honest writer's own API refuses the same write.
    let now = net.now;
    let err = net
        .node(2)
        .put(now, WallTime::default(), "big", vec![0; 70_000])
        .expect_err("over quota");
    assert!(
        matches!(err, crate::CoreError::Quota(QuotaExceeded::Bytes { .. })),
        "{err}"
    );
    let _ = Body::Rumor;
}

fn forged_update(origin: &str, key: &str, len: usize) -> Update {
    Update {
        key: key.into(),
        value: Some(vec![9; len]),
        lamport: 1,
        origin: origin.into(),
        epoch: 1,
        seq: 1,
    }
}

fn push(d: &mut Replication, now: Instant, updates: Vec<Update>) {
    let r = rumormill_wire::proto::Rumor {
        updates: updates.iter().map(Update::to_wire).collect(),
        want_feedback: true,
        reply_to: None,
    };
    d.handle(now, A, Body::Rumor(r));
}

#[test]
fn a_writer_using_many_origin_names_cannot_raise_the_store_over_its_total_cap() {
    let now = Instant::now();
    let l = Limits {
        store_bytes: 50_000,
        store_entries: 40,
        ..limits(10_000, 100)
    };
    let mut b = Replication::new(config(Mode::Rumor, l), "b", 1, B, 1300, 2, now);
    // 100 invented writers, each within its own quota (one value of 5 kB).
    for i in 0..100 {
        push(
            &mut b,
            now,
            vec![forged_update(&format!("x{i}"), &format!("k{i}"), 5000)],
        );
    }
    let total = b.store().total();
    assert!(total.bytes <= 50_000, "the store holds {} bytes", total.bytes);
    assert_eq!(b.store().len(), 9, "nine values of 5,002 bytes fit 50,000");
    assert_eq!(b.stats().quota_refused, 91);
    assert!(!b.store().seen("x9", 1, 1), "refused, not seen");
    // Small values: the entry cap holds too.
    for i in 0..100 {
        push(&mut b, now, vec![forged_update(&format!("y{i}"), &format!("s{i}"), 0)]);
    }
    assert_eq!(b.store().total().entries, 40);
    // A replacement that shrinks the store is accepted, even at the cap.
    let mut smaller = forged_update("x0", "k0", 10);
    smaller.lamport = 2;
    smaller.seq = 2;
    push(&mut b, now, vec![smaller]);
    assert_eq!(b.store().value("k0").map(<[u8]>::len), Some(10));
    // A local write over the store cap: refused with the store limit named.
    let err = b.try_put(now, "mine", vec![0; 100]).expect_err("the store is full");
    assert!(matches!(err, QuotaExceeded::StoreEntries { max: 40, .. }), "{err}");
    assert!(err.to_string().contains("store_entries"), "{err}");
    b.try_put(now, "k1", vec![0; 10])
        .expect("replaces x1's value with a smaller one");
}

fn delta(updates: &[Update], seen: &Store, exchange: u64, chunk: u32, chunks: u32) -> Body {
    Body::Delta(rumormill_wire::proto::Delta {
        updates: updates.iter().map(Update::to_wire).collect(),
        seen: seen.summaries(),
        exchange,
        chunk,
        chunks,
    })
}

#[test]
fn a_refused_update_stays_unseen_when_another_exchange_completes_between_chunks() {
    let now = Instant::now();
    let mut a = Replication::new(
        config(Mode::AntiEntropy, limits(u64::MAX, u64::MAX)),
        "a",
        1,
        A,
        1300,
        1,
        now,
    );
    let mut b = Replication::new(config(Mode::AntiEntropy, limits(10_000, 100)), "b", 1, B, 1300, 2, now);
    let k1 = a.put(now, "k1", vec![1; 6000]);
    let k2 = a.put(now, "k2", vec![2; 6000]);
    // A chunked delta from a: k1 in the first chunk, k2 (refused) in the second.
    b.handle(now, A, delta(std::slice::from_ref(&k1), a.store(), 7, 0, 2));
    b.handle(now, A, delta(std::slice::from_ref(&k2), a.store(), 7, 1, 3));
    assert_eq!(b.stats().quota_refused, 1);
    // Another exchange, with a third member that has seen everything of
    // a's, completes in between.
    b.handle(now, A, delta(&[], a.store(), 8, 0, 1));
    assert!(!b.store().seen("a", 1, 2), "merged by the unrelated exchange");
    // The last chunk of the first delta.
    b.handle(now, A, delta(&[], a.store(), 7, 2, 3));
    assert!(!b.store().seen("a", 1, 2), "the refused update was marked seen");
    // Once there is room it comes again and is stored, and a's summaries
    // merge again.
    let del = a.delete(now, "k1");
    b.handle(now, A, delta(&[del, k2.clone()], a.store(), 9, 0, 1));
    assert_eq!(b.store().value("k2").map(<[u8]>::len), Some(6000));
    assert!(b.store().seen("a", 1, 2));
}

#[test]
fn a_refused_update_superseded_by_a_newer_write_of_its_key_counts_as_seen() {
    let now = Instant::now();
    let mut a = Replication::new(
        config(Mode::AntiEntropy, limits(u64::MAX, u64::MAX)),
        "a",
        1,
        A,
        1300,
        1,
        now,
    );
    let mut b = Replication::new(config(Mode::AntiEntropy, limits(10_000, 100)), "b", 1, B, 1300, 2, now);
    let k1 = a.put(now, "k1", vec![1; 6000]);
    let k2 = a.put(now, "k2", vec![2; 6000]);
    b.handle(now, A, delta(&[k1, k2], a.store(), 1, 0, 1));
    assert!(!b.store().seen("a", 1, 2));
    // a overwrites k2 with a small value: seq 2 will never travel again.
    let small = a.put(now, "k2", vec![3; 10]);
    a.put(now, "k3", vec![4; 10]);
    let k3 = a.store().get("k3").cloned().expect("k3");
    // The delta carries k2's new value; k3 is left out (as if it had come
    // by rumor and been overwritten): only the merged summary marks it.
    b.handle(now, A, delta(&[small], a.store(), 2, 0, 1));
    assert!(b.store().seen("a", 1, 2), "superseded, so seen");
    assert!(b.store().seen("a", 1, k3.seq), "a's summaries merge again");
}

#[test]
fn a_replacing_handler_is_held_to_the_quotas() {
    let now = Instant::now();
    let l = Limits {
        store_entries: 5,
        ..limits(10_000, 100)
    };
    let mut b = Replication::new(config(Mode::Rumor, l), "b", 1, B, 1300, 2, now);
    b.set_handler(|batch: &[Update], _: &Store| {
        let mut all: Vec<Update> = (0..3).map(|i| forged_update("w", &format!("w{i}"), 4000)).collect();
        all.extend((0..4).map(|i| forged_update(&format!("x{i}"), &format!("x{i}"), 10)));
        all.extend(batch.iter().cloned());
        Decision::Replace(all)
    });
    push(&mut b, now, vec![forged_update("a", "k", 10)]);
    let s = b.store();
    assert_eq!(
        s.usage("w").bytes,
        2 * 4002,
        "two values of 4 kB fit w's 10 kB, not three"
    );
    assert_eq!(s.total().entries, 5, "the store's five entries");
    assert_eq!(s.get("k"), None, "the sixth entry was left out");
    assert_eq!(b.stats().quota_refused, 3);
}
