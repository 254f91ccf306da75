//! What events read of racks: where copies for another rack go from here
//! ([`Routes`], lent by the racks sub-machine for each call), and who
//! subscribes in other racks, a function of the replicated store.
//!
//! Every member's topics (`Topics`) and rack (`Rack`) are values of the
//! store, and so is each rack gateway's report of its rack
//! ([`GatewayReport`]): a member of another rack subscribes to a topic when
//! its `Topics` list it, its `Rack` is not ours, and the latest report of
//! its rack has it alive or suspect. The publisher reads its remote
//! subscribers' states from the same reports at every resend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::membership::MemberState;
use crate::replication::Store;
use crate::reserved::{self, GatewayReport, Rack, ReservedKey, Topics};

/// Where events for other racks go from this member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routes<'a> {
    /// This member's rack; `None`: no racks, nothing crosses.
    pub(crate) rack: Option<&'a str>,
    /// This rack's active gateway (may be this member).
    pub(crate) gateway: Option<SocketAddr>,
    /// This member is its rack's active gateway.
    pub(crate) active: bool,
    /// Other racks' reachable gateways (filled only while active).
    pub(crate) gateways: &'a BTreeMap<Arc<str>, SocketAddr>,
}

static NO_GATEWAYS: BTreeMap<Arc<str>, SocketAddr> = BTreeMap::new();

impl Routes<'static> {
    /// An overlay without racks: nothing crosses.
    pub(crate) fn flat() -> Routes<'static> {
        Routes {
            rack: None,
            gateway: None,
            active: false,
            gateways: &NO_GATEWAYS,
        }
    }
}

impl Routes<'_> {
    /// The next hop towards rack `rack`: its gateway when this member is
    /// the active gateway, else this rack's gateway. Copies for `rack` go
    /// there, and a member of `rack`'s acknowledgements can only come from
    /// there.
    pub(crate) fn toward(&self, rack: &str) -> Option<SocketAddr> {
        if self.active {
            self.gateways.get(rack).copied()
        } else {
            self.gateway
        }
    }

    /// Whether rack `rack` can be reached from here: this rack has a
    /// gateway and, as far as this member knows, so has `rack` (the
    /// gateways it knows when it is the gateway, the latest reports
    /// otherwise).
    pub(crate) fn reaches(&self, remote: &RemoteRacks, rack: &str) -> bool {
        if self.active {
            return self.gateways.contains_key(rack);
        }
        self.gateway.is_some() && remote.racks.get(rack).is_some_and(|r| r.active)
    }
}

/// The rack of `member`, if its `Rack` value is known (written by the
/// member itself).
pub(crate) fn rack_of(store: &Store, member: &str) -> Option<String> {
    let key = ReservedKey::Rack {
        member: member.to_owned(),
    };
    let u = store.get(&key.key())?;
    if !reserved::from_owner(u) {
        return None;
    }
    Rack::decode(u.value.as_deref()?)
        .ok()
        .map(|r| r.name)
        .filter(|r| !r.is_empty())
}

/// The other racks as their latest gateway reports give them: highest
/// term, and at one term the active report (a term has one leader; its
/// last report says whether it stepped down). Only reports written by the
/// member they name count. Read once per input that needs it: every report
/// lists its whole rack.
#[derive(Debug, Default)]
pub(crate) struct RemoteRacks {
    racks: BTreeMap<String, Reported>,
}

#[derive(Debug)]
struct Reported {
    term: u64,
    active: bool,
    members: BTreeMap<String, MemberState>,
}

impl RemoteRacks {
    pub(crate) fn read(store: &Store) -> RemoteRacks {
        let every = ReservedKey::GatewayReport { member: String::new() }.key();
        let mut racks: BTreeMap<String, Reported> = BTreeMap::new();
        for u in store.prefixed(&every) {
            let Some(r) = reserved::owned(u)
                .and(u.value.as_deref())
                .and_then(|v| GatewayReport::decode(v).ok())
            else {
                continue;
            };
            if racks
                .get(&r.rack)
                .is_some_and(|l| (l.term, l.active) >= (r.term, r.active))
            {
                continue;
            }
            let reported = Reported {
                term: r.term,
                active: r.active,
                members: r.members.into_iter().map(|m| (m.name, m.state)).collect(),
            };
            racks.insert(r.rack, reported);
        }
        RemoteRacks { racks }
    }

    /// The state of `member` of rack `rack` in its rack's latest report
    /// (`None`: no report, or not listed).
    pub(crate) fn state(&self, rack: &str, member: &str) -> Option<MemberState> {
        self.racks.get(rack)?.members.get(member).copied()
    }
}

/// The subscribers of `topic` in racks other than `mine`, by rack: members
/// whose `Topics` list it, whose `Rack` is another, and whom the latest
/// report of their rack has alive or suspect.
pub(crate) fn subscribers(store: &Store, mine: &str, topic: &str) -> BTreeMap<String, Vec<Arc<str>>> {
    let every = ReservedKey::Topics { member: String::new() }.key();
    let mut remote: Option<RemoteRacks> = None;
    let mut out: BTreeMap<String, Vec<Arc<str>>> = BTreeMap::new();
    for u in store.prefixed(&every) {
        let Some(ReservedKey::Topics { member }) = reserved::owned(u) else {
            continue;
        };
        let lists = u
            .value
            .as_deref()
            .and_then(|v| Topics::decode(v).ok())
            .is_some_and(|t| t.lists(topic));
        if !lists {
            continue;
        }
        let Some(rack) = rack_of(store, &member).filter(|r| r != mine) else {
            continue;
        };
        // Read only when a member of another rack subscribes.
        let remote = remote.get_or_insert_with(|| RemoteRacks::read(store));
        if remote.state(&rack, &member).is_some_and(MemberState::is_live) {
            out.entry(rack).or_default().push(Arc::from(member.as_str()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Update;
    use crate::reserved::RackMember;

    struct Writes {
        store: Store,
        seq: u64,
    }

    impl Writes {
        fn put(&mut self, origin: &str, key: ReservedKey, value: Vec<u8>) {
            self.seq += 1;
            let u = Update {
                key: key.key(),
                value: Some(value),
                lamport: self.seq,
                origin: Arc::from(origin),
                epoch: 1,
                seq: self.seq,
            };
            self.store.apply(u, 0);
        }

        fn member(&mut self, name: &str, rack: &str, topics: &[&str]) {
            let rack = Rack {
                name: rack.into(),
                gateway: false,
            };
            self.put(name, ReservedKey::Rack { member: name.into() }, rack.encode());
            let topics = Topics(topics.iter().map(|t| t.to_string()).collect());
            self.put(name, ReservedKey::Topics { member: name.into() }, topics.encode());
        }

        fn report(&mut self, writer: &str, rack: &str, term: u64, active: bool, members: &[(&str, MemberState)]) {
            let r = GatewayReport {
                rack: rack.into(),
                term,
                addr: SocketAddr::from(([10, 0, 0, 1], 7000)),
                wall_ms: 1,
                members: members
                    .iter()
                    .map(|(name, state)| RackMember {
                        name: name.to_string(),
                        state: *state,
                        epoch: 1,
                        incarnation: 0,
                    })
                    .collect(),
                candidates: Vec::new(),
                active,
            };
            self.put(writer, ReservedKey::GatewayReport { member: writer.into() }, r.encode());
        }
    }

    #[test]
    fn remote_subscribers_are_grouped_by_rack_with_the_states_of_the_latest_reports() {
        use MemberState::*;
        let mut w = Writes {
            store: Store::default(),
            seq: 0,
        };
        w.member("a1", "a", &["t"]);
        w.member("b1", "b", &["t"]);
        w.member("b2", "b", &["t", "u"]);
        w.member("b3", "b", &["u"]);
        w.member("c1", "c", &["t"]);
        w.member("c2", "c", &["t"]);
        w.member("d1", "d", &["t"]);
        w.report("gb", "b", 1, true, &[("b1", Alive), ("b2", Suspect), ("b3", Alive)]);
        // c: term 2 beats term 1; at term 2, the active report beats the
        // one of the same term that stepped down.
        w.report("gc1", "c", 1, true, &[("c1", Alive), ("c2", Alive)]);
        w.report("gc2", "c", 2, true, &[("c1", Alive), ("c2", Failed)]);
        w.report("gc3", "c", 2, false, &[("c1", Failed), ("c2", Alive)]);
        // d: only a forged report (written by someone else) names it.
        w.put(
            "gb",
            ReservedKey::GatewayReport { member: "gd".into() },
            GatewayReport::decode(&w.store.get("_rumormill/gateway/gb").unwrap().value.clone().unwrap())
                .map(|mut r| {
                    r.rack = "d".into();
                    r.members.push(RackMember {
                        name: "d1".into(),
                        state: Alive,
                        epoch: 1,
                        incarnation: 0,
                    });
                    r.encode()
                })
                .unwrap(),
        );
        let got = subscribers(&w.store, "a", "t");
        let want: BTreeMap<String, Vec<Arc<str>>> = [
            ("b".to_string(), vec![Arc::from("b1"), Arc::from("b2")]),
            ("c".to_string(), vec![Arc::from("c1")]),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want, "not a1 (our rack), c2 (failed), d1 (no true report)");
        let remote = RemoteRacks::read(&w.store);
        assert_eq!(remote.state("c", "c2"), Some(Failed));
        assert_eq!(remote.state("d", "d1"), None);
        assert_eq!(rack_of(&w.store, "b3").as_deref(), Some("b"));
        let routes = Routes {
            rack: Some("a"),
            gateway: Some(SocketAddr::from(([10, 0, 0, 9], 7000))),
            active: false,
            gateways: &NO_GATEWAYS,
        };
        assert!(routes.reaches(&remote, "b") && routes.reaches(&remote, "c"));
        assert!(!routes.reaches(&remote, "d"), "no report, no gateway");
        assert_eq!(routes.toward("d"), routes.gateway, "copies go to this rack's gateway");
        assert!(!Routes::flat().reaches(&remote, "b"));
    }
}
