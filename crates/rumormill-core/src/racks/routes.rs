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
