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
    /// gateways it knows when it is the gateway, the store's reports
    /// otherwise).
    pub(crate) fn reaches(&self, store: &Store, rack: &str) -> bool {
        if self.active {
            return self.gateways.contains_key(rack);
        }
        self.gateway.is_some() && latest_report(store, rack).is_some_and(|r| r.active)
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

/// The latest report of each rack: highest term, and at one term the
/// active one (a term has one leader; its last report says whether it
/// stepped down). Only reports written by the member they name count.
fn latest_reports(store: &Store) -> BTreeMap<String, GatewayReport> {
    let every = ReservedKey::GatewayReport { member: String::new() }.key();
    let mut latest: BTreeMap<String, GatewayReport> = BTreeMap::new();
    for u in store.prefixed(&every) {
        let Some(r) = reserved::owned(u)
            .and(u.value.as_deref())
            .and_then(|v| GatewayReport::decode(v).ok())
        else {
            continue;
        };
        match latest.get(&r.rack) {
            Some(l) if (l.term, l.active) >= (r.term, r.active) => {}
            _ => {
                latest.insert(r.rack.clone(), r);
            }
        }
    }
    latest
}

/// The latest report of `rack` (see [`latest_reports`]).
pub(crate) fn latest_report(store: &Store, rack: &str) -> Option<GatewayReport> {
    latest_reports(store).remove(rack)
}

/// The state of `member` of rack `rack`, as the latest report of its rack
/// gives it (`None`: no report, or not listed).
pub(crate) fn remote_state(store: &Store, rack: &str, member: &str) -> Option<MemberState> {
    state_in(&latest_report(store, rack)?, member)
}

/// The subscribers of `topic` in racks other than `mine`, by rack: members
/// whose `Topics` list it, whose `Rack` is another, and whom the latest
/// report of their rack has alive or suspect.
pub(crate) fn subscribers(store: &Store, mine: &str, topic: &str) -> BTreeMap<String, Vec<Arc<str>>> {
    let every = ReservedKey::Topics { member: String::new() }.key();
    let mut reports: Option<BTreeMap<String, GatewayReport>> = None;
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
        // Decoded once per call, and only when a remote member subscribes.
        let reports = reports.get_or_insert_with(|| latest_reports(store));
        let live = reports
            .get(&rack)
            .and_then(|r| state_in(r, &member))
            .is_some_and(MemberState::is_live);
        if live {
            out.entry(rack).or_default().push(Arc::from(member.as_str()));
        }
    }
    out
}

/// The state `report` gives `member`, if it lists it.
fn state_in(report: &GatewayReport, member: &str) -> Option<MemberState> {
    report.members.iter().find(|m| m.name == member).map(|m| m.state)
}
