//! Racks in a deterministic test network: elections, what crosses and
//! what does not, failover, fencing, splits and partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::testkit::{Net, addr, name};
use crate::{FrameKind, MemberState, WallTime};

#[test]
fn rack_names_are_checked() {
    for good in ["a", "0", "eu-west-1", "r.1_b", &"a".repeat(63)] {
        assert_eq!(check_rack_name(good), Ok(()), "{good}");
    }
    assert_eq!(check_rack_name(""), Err(RackNameError::Empty));
    assert_eq!(check_rack_name(&"a".repeat(64)), Err(RackNameError::TooLong(64)));
    for bad in ["A", "a b", "a/b", "é", "a\0"] {
        assert!(
            matches!(check_rack_name(bad), Err(RackNameError::Character { .. })),
            "{bad}"
        );
    }
    for bad in ["-a", ".a", "_a"] {
        assert!(matches!(check_rack_name(bad), Err(RackNameError::Start(_))), "{bad}");
    }
}

#[test]
fn presets_are_valid() {
    for c in [RackConfig::new_lan(), RackConfig::new_wan()] {
        c.validate().expect("valid");
        c.wan_config().validate().expect("valid WAN timings");
    }
    let mut c = RackConfig::new_lan();
    c.election_ticks = 1;
    assert!(c.validate().is_err());
}

/// The active gateways by rack: (node, term).
fn gateways(net: &Net) -> BTreeMap<usize, Vec<(usize, u64)>> {
    let mut out: BTreeMap<usize, Vec<(usize, u64)>> = BTreeMap::new();
    for (i, n) in net.nodes.iter().enumerate() {
        if let Some(o) = n
            && o.is_active_gateway()
        {
            let term = o.racks(net.now)[0].term;
            out.entry(net.racks[i].expect("in a rack")).or_default().push((i, term));
        }
    }
    out
}

/// Runs for `d`, checking at every step that no (rack, term) ever had two
/// leaders.
fn run_checked(net: &mut Net, d: Duration, leaders: &mut BTreeMap<(usize, u64), BTreeSet<usize>>) {
    let end = net.now + d;
    while net.now < end {
        net.run_for(Duration::from_millis(50));
        for (rack, list) in gateways(net) {
            for (node, term) in list {
                let seen = leaders.entry((rack, term)).or_default();
                seen.insert(node);
                assert_eq!(seen.len(), 1, "rack {rack} term {term} had two leaders: {seen:?}");
            }
        }
    }
}

fn lan() -> Config {
    Config::new_lan()
}

#[test]
fn each_rack_elects_one_gateway_and_only_gateways_cross() {
    let mut net = Net::with_racks(&[4, 5, 3], 3, lan());
    let mut leaders = BTreeMap::new();
    run_checked(&mut net, Duration::from_secs(8), &mut leaders);
    let g = gateways(&net);
    assert_eq!(g.len(), 3, "one gateway per rack: {g:?}");
    for (rack, list) in &g {
        assert_eq!(list.len(), 1, "rack {rack}: {list:?}");
        let (node, _) = list[0];
        assert!(net.rack_members(*rack)[..3].contains(&node), "a candidate leads");
    }
    // Every member knows every rack's gateway.
    for i in 0..net.nodes.len() {
        let now = net.now;
        let racks = net.node(i).racks(now);
        assert_eq!(racks.len(), 3, "node {i} knows 3 racks: {racks:?}");
        for r in &racks {
            let rack: usize = r.name[1..].parse().expect("rN");
            assert_eq!(
                r.gateway.as_deref(),
                Some(&*name(g[&rack][0].0)),
                "node {i}, rack {}",
                r.name
            );
        }
    }
    let bad: Vec<_> = net.crossings.iter().filter(|c| !c.3).collect();
    assert!(
        bad.is_empty(),
        "packets between racks not from active gateways: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert!(!net.crossings.is_empty(), "gateways talk");
    for (i, n) in net.nodes.iter().enumerate() {
        let o = n.as_ref().expect("running");
        if !o.is_active_gateway() {
            assert_eq!(o.stats().cross_packets_sent, 0, "node {i} sent across");
        }
    }
}

#[test]
fn a_write_in_one_rack_reaches_every_member_of_the_others() {
    let mut net = Net::with_racks(&[4, 4, 4], 3, lan());
    net.run_for(Duration::from_secs(8));
    let now = net.now;
    net.node(5)
        .put(now, WallTime::from_unix_ms(1), "k", b"v".to_vec())
        .expect("put");
    net.run_for(Duration::from_secs(3));
    for i in 0..12 {
        assert_eq!(net.node(i).store().value("k"), Some(&b"v"[..]), "node {i}");
    }
    assert!(net.crossings.iter().all(|c| c.3));
}

#[test]
fn luggage_and_the_store_reach_a_late_joiner_of_a_remote_rack() {
    let mut net = Net::with_racks(&[3, 3, 3], 3, lan());
    net.run_for(Duration::from_secs(8));
    let now = net.now;
    net.node(1)
        .set_luggage(now, WallTime::from_unix_ms(1), "role", b"db".to_vec())
        .expect("luggage");
    net.node(4)
        .put(now, WallTime::from_unix_ms(1), "k", b"v".to_vec())
        .expect("put");
    net.run_for(Duration::from_secs(3));
    // A fourth member of rack 2 joins late.
    let late = net.nodes.len();
    net.racks.push(Some(2));
    net.nodes.push(None);
    net.restart(late, 1, addr(late));
    net.run_for(Duration::from_secs(5));
    let o = net.node(late);
    assert_eq!(o.store().value("k"), Some(&b"v"[..]));
    assert_eq!(o.luggage(&name(1)), vec![("role".to_owned(), b"db".to_vec())]);
    let now = net.now;
    let remote = net.node(late).remote_members(now);
    assert!(
        remote
            .iter()
            .any(|m| *m.name == *name(1) && m.state == MemberState::Alive),
        "{remote:?}"
    );
}

/// The rack gateway node `observer` knows of for `rack`: (name, term).
fn known_gateway(net: &mut Net, observer: usize, rack: usize) -> Option<(String, u64)> {
    let now = net.now;
    net.node(observer)
        .racks(now)
        .into_iter()
        .find(|r| *r.name == *format!("r{rack}"))
        .and_then(|r| Some((r.gateway?.to_string(), r.term)))
}

#[test]
fn a_crashed_gateway_is_replaced_with_a_higher_term_and_the_others_learn_it() {
    let mut net = Net::with_racks(&[4, 4, 4], 3, lan());
    let mut leaders = BTreeMap::new();
    run_checked(&mut net, Duration::from_secs(8), &mut leaders);
    let (old, old_term) = gateways(&net)[&0][0];
    let killed_at = net.now;
    net.kill(old);
    let mut failover = None;
    for _ in 0..100 {
        run_checked(&mut net, Duration::from_millis(100), &mut leaders);
        if let Some(&(new, term)) = gateways(&net).get(&0).and_then(|l| l.first())
            && new != old
            && term > old_term
        {
            failover = Some((new, term, net.now - killed_at));
            break;
        }
    }
    let (new, term, took) = failover.expect("a new gateway in rack 0");
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    // The other racks learn it, and traffic crosses through it.
    run_checked(&mut net, Duration::from_secs(4), &mut leaders);
    for i in 4..12 {
        assert_eq!(known_gateway(&mut net, i, 0), Some((name(new), term)), "node {i}");
    }
    let now = net.now;
    let writer = (0..4).find(|&i| i != old).expect("a member of rack 0 still running");
    net.node(writer)
        .put(now, WallTime::from_unix_ms(1), "after", b"1".to_vec())
        .expect("put");
    net.run_for(Duration::from_secs(3));
    for i in (0..12).filter(|&i| i != old) {
        assert_eq!(net.node(i).store().value("after"), Some(&b"1"[..]), "node {i}");
    }
    assert!(net.crossings.iter().all(|c| c.3));
}

#[test]
fn a_deposed_gateway_sending_with_its_old_term_is_refused() {
    let mut net = Net::with_racks(&[3, 3, 3], 3, lan());
    net.run_for(Duration::from_secs(8));
    let (old, old_term) = gateways(&net)[&0][0];
    // Frozen (a long pause): it hears nothing and does nothing.
    let frozen = net.nodes[old].take();
    net.run_for(Duration::from_secs(6));
    let (new, term) = gateways(&net)[&0][0];
    assert!(new != old && term > old_term);
    let refused: u64 = (3..9).map(|i| net.node(i).stats().stale_term).sum();
    // Back: it still believes it leads, and its first packets cross with
    // the old term until Raft tells it otherwise.
    net.nodes[old] = frozen;
    let now = net.now;
    net.node(old).handle_timeout(now);
    net.run_for(Duration::from_secs(3));
    let after: u64 = (3..9).map(|i| net.node(i).stats().stale_term).sum();
    assert!(after > refused, "the old term is fenced out ({refused} → {after})");
    assert!(!net.node(old).is_active_gateway(), "it stepped down");
    for i in 3..9 {
        assert_eq!(known_gateway(&mut net, i, 0).map(|g| g.1), Some(term), "node {i}");
    }
}

#[test]
fn a_rack_split_without_a_majority_crosses_nothing() {
    let mut net = Net::with_racks(&[5, 3, 3], 3, lan());
    let mut leaders = BTreeMap::new();
    run_checked(&mut net, Duration::from_secs(8), &mut leaders);
    // Rack 0's three candidates end up on three sides.
    let sides = [vec![0], vec![1, 3], vec![2, 4]];
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                for &x in &sides[a] {
                    for &y in &sides[b] {
                        net.cut.insert((x, y));
                    }
                }
            }
        }
    }
    // Check-quorum deposes the leader within an election timeout or two.
    run_checked(&mut net, Duration::from_secs(4), &mut leaders);
    assert!(!gateways(&net).contains_key(&0), "no majority, no gateway");
    let sent: Vec<u64> = (0..5).map(|i| net.node(i).stats().cross_packets_sent).collect();
    run_checked(&mut net, Duration::from_secs(5), &mut leaders);
    let later: Vec<u64> = (0..5).map(|i| net.node(i).stats().cross_packets_sent).collect();
    assert_eq!(sent, later, "nothing crosses from rack 0");
    // Healed: a gateway again.
    net.cut.clear();
    run_checked(&mut net, Duration::from_secs(5), &mut leaders);
    assert_eq!(gateways(&net)[&0].len(), 1);
}

#[test]
fn a_partition_between_racks_heals_and_the_store_syncs_again() {
    let mut net = Net::with_racks(&[3, 3, 3], 3, lan());
    net.run_for(Duration::from_secs(8));
    net.partition(&[0, 1, 2]);
    net.run_for(Duration::from_secs(30));
    let unreachable = net
        .log
        .iter()
        .any(|(_, _, e)| matches!(e, Notification::Rack(RackNotification::Unreachable { .. })));
    assert!(unreachable, "the pool noticed");
    let now = net.now;
    net.node(1)
        .put(now, WallTime::from_unix_ms(1), "a", b"1".to_vec())
        .expect("put");
    net.node(4)
        .put(now, WallTime::from_unix_ms(1), "b", b"2".to_vec())
        .expect("put");
    net.run_for(Duration::from_secs(10));
    assert_eq!(net.node(4).store().value("a"), None, "cut off");
    net.cut.clear();
    net.run_for(Duration::from_secs(40));
    for i in 0..9 {
        assert_eq!(net.node(i).store().value("a"), Some(&b"1"[..]), "node {i}");
        assert_eq!(net.node(i).store().value("b"), Some(&b"2"[..]), "node {i}");
    }
    let reachable = net
        .log
        .iter()
        .any(|(_, _, e)| matches!(e, Notification::Rack(RackNotification::Reachable { .. })));
    assert!(reachable, "the pool noticed the heal");
}

fn raft_heartbeat(from: &str, to: &str, term: u64) -> rumormill_wire::proto::Envelope {
    rumormill_wire::proto::Envelope {
        body: Some(rumormill_wire::proto::envelope::Body::Raft(Box::new(
            proto::RaftMessage {
                msg_type: raft::eraftpb::MessageType::MsgHeartbeat as u32,
                to: election::raft_id(to),
                from: election::raft_id(from),
                term,
                ..Default::default()
            },
        ))),
    }
}

#[test]
fn raft_messages_from_another_rack_or_a_non_voter_are_refused_and_counted() {
    let mut net = Net::with_racks(&[4, 4], 3, lan());
    net.run_for(Duration::from_secs(6));
    let before = net.node(0).stats().clone();
    // From a member of rack 1: sealed in rack 1's scope, refused at the header.
    let r1 = rumormill_wire::scope_id(0, "rack/r1");
    net.inject_in(
        r1,
        0,
        addr(5),
        FrameKind::Datagram,
        vec![raft_heartbeat(&name(5), &name(0), 9)],
    );
    let s = net.node(0).stats().clone();
    assert_eq!(s.rejected, before.rejected + 1);
    assert!(matches!(
        s.last_rejection,
        Some(rumormill_wire::WireError::WrongOverlay { .. })
    ));
    assert_eq!(s.raft_refused, before.raft_refused, "never reached the election");
    // From a member of rack 0 that is no voter (n3 is not a candidate).
    let r0 = rumormill_wire::scope_id(0, "rack/r0");
    net.inject_in(
        r0,
        0,
        addr(3),
        FrameKind::Datagram,
        vec![raft_heartbeat(&name(3), &name(0), 9)],
    );
    assert_eq!(net.node(0).stats().raft_refused, before.raft_refused + 1);
    // From an outsider's address: no member of the rack, refused.
    net.inject_in(
        r0,
        0,
        addr(99),
        FrameKind::Datagram,
        vec![raft_heartbeat("x", &name(0), 9)],
    );
    assert_eq!(net.node(0).stats().raft_refused, before.raft_refused + 2);
    // The election is undisturbed: no term 9.
    let now = net.now;
    assert!(net.node(0).racks(now)[0].term < 9);
    // A packet of the traffic between racks to a member that is not an
    // active gateway is refused at the header and counted.
    let cross = rumormill_wire::scope_id(0, "cross");
    let plain = (0..4)
        .find(|&i| !net.node(i).is_active_gateway())
        .expect("a plain member");
    let before = net.node(plain).stats().foreign_rack;
    net.inject_in(
        cross,
        plain,
        addr(5),
        FrameKind::Datagram,
        vec![raft_heartbeat(&name(5), &name(0), 1)],
    );
    assert_eq!(net.node(plain).stats().foreign_rack, before + 1);
}

#[test]
fn a_crossing_must_be_the_one_message_and_cannot_nest() {
    let mut net = Net::with_racks(&[3, 3], 3, lan());
    net.run_for(Duration::from_secs(6));
    let g = gateways(&net)[&0][0].0;
    let cross = rumormill_wire::scope_id(0, "cross");
    let crossing = |envelopes| rumormill_wire::proto::Envelope {
        body: Some(rumormill_wire::proto::envelope::Body::Crossing(proto::Crossing {
            rack: "r1".into(),
            term: 1_000,
            envelopes,
        })),
    };
    let before = net.node(g).stats().malformed;
    // Not a crossing at all; a crossing inside a crossing; a bad rack name.
    net.inject_in(
        cross,
        g,
        addr(50),
        FrameKind::Datagram,
        vec![raft_heartbeat("x", "y", 1)],
    );
    net.inject_in(
        cross,
        g,
        addr(51),
        FrameKind::Datagram,
        vec![crossing(vec![crossing(vec![])])],
    );
    let bad_name = rumormill_wire::proto::Envelope {
        body: Some(rumormill_wire::proto::envelope::Body::Crossing(proto::Crossing {
            rack: "R 1".into(),
            term: 1,
            envelopes: vec![],
        })),
    };
    net.inject_in(cross, g, addr(52), FrameKind::Datagram, vec![bad_name]);
    assert_eq!(net.node(g).stats().malformed, before + 3);
}

#[test]
fn no_rack_no_change_a_rackless_overlay_never_crosses() {
    let mut net = Net::new(4, lan());
    net.run_for(Duration::from_secs(5));
    let now = net.now;
    for i in 0..4 {
        let o = net.node(i);
        assert!(!o.is_active_gateway());
        assert!(o.racks(now).is_empty());
        assert_eq!(o.stats().cross_packets_sent, 0);
    }
    assert!(
        net.node(0)
            .restore_raft(&RaftRecord::decode(&[]).expect("empty"))
            .is_err()
    );
}

#[test]
fn events_are_lent_the_routes_between_racks() {
    let mut net = Net::with_racks(&[3, 3, 3], 3, lan());
    net.run_for(Duration::from_secs(8));
    let g = gateways(&net);
    for i in 0..9 {
        let rack = net.racks[i].expect("in a rack");
        let (gw, _) = g[&rack][0];
        let (name_of_rack, gateway, active, others) = net.node(i).routes().expect("in a rack");
        assert_eq!(name_of_rack, format!("r{rack}"));
        assert_eq!(gateway, Some(addr(gw)), "node {i}");
        assert_eq!(active, i == gw);
        if active {
            let expected: Vec<(Arc<str>, SocketAddr)> = (0..3)
                .filter(|&r| r != rack)
                .map(|r| (Arc::from(format!("r{r}").as_str()), addr(g[&r][0].0)))
                .collect();
            assert_eq!(others, expected, "node {i}");
        } else {
            assert!(others.is_empty());
        }
    }
    assert!(net.node(0).routes().is_some());
    assert!(Net::new(2, lan()).node(0).routes().is_none(), "no racks, no routes");
}
