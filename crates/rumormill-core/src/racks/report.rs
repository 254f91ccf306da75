//! The gateway report: what a rack's active gateway tells every member of
//! every rack about its rack, as the reserved value
//! `_rumormill/gateway/<member>` ([`GatewayReport`]), replicated by the
//! store like everything else.
//!
//! Written when the member is elected, when its rack's membership changes
//! (at most every [`super::RackConfig::report_interval`]) and every
//! [`super::RackConfig::report_refresh`]; written once more with `active =
//! false` when it steps down. The gateway of a rack is the writer of the
//! highest-term active report naming it: a term has one leader, so there
//! are no ties.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::membership::Members;
use crate::racks::RaftRole;
use crate::replication::Store;
use crate::reserved::{GatewayReport, RackCandidate, RackMember, ReservedKey};

const PREFIX: &str = "_rumormill/gateway/";

/// When the report is written next.
#[derive(Debug, Clone)]
pub(super) struct Schedule {
    interval: Duration,
    refresh: Duration,
    started: Instant,
    /// The last write, if any in this term.
    last: Option<Instant>,
    /// The rack's membership changed since the last write.
    dirty: bool,
}

impl Schedule {
    pub(super) fn new(now: Instant) -> Schedule {
        Schedule {
            interval: Duration::from_secs(2),
            refresh: Duration::from_secs(30),
            started: now,
            last: None,
            dirty: true,
        }
    }

    pub(super) fn configure(&mut self, interval: Duration, refresh: Duration) {
        self.interval = interval;
        self.refresh = refresh;
    }

    /// A reference instant for timers that wait from "now" (bootstrap polls).
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    pub(super) fn restart(&mut self, now: Instant) {
        self.started = now;
    }

    /// Just elected: written at once.
    pub(super) fn elected(&mut self) {
        self.last = None;
        self.dirty = true;
    }

    pub(super) fn changed(&mut self) {
        self.dirty = true;
    }

    pub(super) fn written(&mut self, now: Instant) {
        self.last = Some(now);
        self.dirty = false;
    }

    /// When the next report is due, while active.
    pub(super) fn due(&self, active: bool) -> Option<Instant> {
        if !active {
            return None;
        }
        Some(match self.last {
            None => self.started,
            Some(at) if self.dirty => at + self.interval,
            Some(at) => at + self.refresh,
        })
    }
}

/// The report `writer` wrote, as the store holds it (written by its owner).
pub(super) fn read(store: &Store, writer: &str) -> Option<GatewayReport> {
    let key = ReservedKey::GatewayReport {
        member: writer.to_owned(),
    }
    .key();
    let u = store.get(&key).filter(|u| crate::reserved::from_owner(u))?;
    GatewayReport::decode(u.value.as_deref()?).ok()
}

/// Every report in the store, with its writer.
fn all(store: &Store) -> impl Iterator<Item = (String, GatewayReport)> + '_ {
    store
        .prefixed(PREFIX)
        .filter(|u| crate::reserved::from_owner(u))
        .filter_map(|u| {
            let r = GatewayReport::decode(u.value.as_deref()?).ok()?;
            Some((u.origin.to_string(), r))
        })
}

/// The latest report of each rack (highest term; active before inactive
/// at one term), with its writer.
pub(super) fn latest(store: &Store) -> BTreeMap<Arc<str>, (String, GatewayReport)> {
    let mut out: BTreeMap<Arc<str>, (String, GatewayReport)> = BTreeMap::new();
    for (writer, r) in all(store) {
        let rack: Arc<str> = r.rack.as_str().into();
        let better = out
            .get(&rack)
            .is_none_or(|(_, k)| (r.term, r.active) > (k.term, k.active));
        if better {
            out.insert(rack, (writer, r));
        }
    }
    out
}

/// Each rack's gateway as the reports name it: the highest-term active report.
pub(super) fn gateways(store: &Store) -> BTreeMap<Arc<str>, GatewayReport> {
    latest(store)
        .into_iter()
        .filter(|(_, (_, r))| r.active)
        .map(|(rack, (_, r))| (rack, r))
        .collect()
}

/// The gateway of `rack` as the reports name it, with the writer.
pub(super) fn gateway_of(store: &Store, rack: &str) -> Option<(String, GatewayReport)> {
    let mut best: Option<(String, GatewayReport)> = None;
    for (writer, r) in all(store).filter(|(_, r)| r.rack == rack) {
        if best.as_ref().is_none_or(|(_, b)| r.term > b.term) {
            best = Some((writer, r));
        }
    }
    best.filter(|(_, r)| r.active)
}

/// This member's report of its rack.
#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    rack: &str,
    term: u64,
    addr: SocketAddr,
    wall_ms: u64,
    me: &str,
    members: &Members,
    roles: &[(Arc<str>, RaftRole)],
    active: bool,
) -> GatewayReport {
    let mut list: Vec<RackMember> = members
        .iter()
        .map(|m| RackMember {
            name: m.name.to_string(),
            state: m.state,
            epoch: m.epoch,
            incarnation: m.incarnation,
        })
        .collect();
    list.push(RackMember {
        name: me.to_owned(),
        state: crate::MemberState::Alive,
        epoch: 0,
        incarnation: 0,
    });
    list.sort_by(|a, b| a.name.cmp(&b.name));
    GatewayReport {
        rack: rack.to_owned(),
        term,
        addr,
        wall_ms,
        members: list,
        candidates: roles
            .iter()
            .map(|(name, role)| RackCandidate {
                name: name.to_string(),
                role: *role,
            })
            .collect(),
        active,
    }
}

/// The store write of a report.
pub(super) fn write(me: &str, r: &GatewayReport) -> (String, Vec<u8>) {
    let key = ReservedKey::GatewayReport { member: me.to_owned() }.key();
    (key, r.encode())
}

/// Whether a store key is a gateway report's.
pub(crate) fn is_report(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX)
}
