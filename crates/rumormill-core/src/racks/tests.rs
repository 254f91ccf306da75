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
