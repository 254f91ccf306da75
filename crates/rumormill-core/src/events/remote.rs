//! Events across racks: members of another rack get an event through the
//! gateways, one copy per rack that has subscribers, and acknowledge back
//! through them.
//!
//! - **Publishing** (publisher P of rack A): the local relay tree as
//!   without racks, plus one copy to A's active gateway G_A (or, if P is
//!   G_A, straight to the remote gateways) naming the racks that have
//!   subscribers of the topic (`Event::racks`). G_A sends one copy per
//!   named rack R to R's gateway G_R, naming R alone; G_R delivers it into
//!   R down the relay tree, with itself as the acknowledgement address.
//!   Racks without a subscriber get nothing: payload bytes never reach
//!   them.
//! - **Acknowledgements** are relayed without any state at the gateways: a
//!   subscriber of R acknowledges to G_R, which passes it to the gateway of
//!   the publisher's rack (the publisher's `Rack` in the store), which
//!   passes it to the publisher. A remote subscriber's acknowledgement is
//!   taken only from the gateway it comes through ([`Routes::toward`]).
//! - **Resends** go the same way, naming the racks and the subscribers
//!   still waiting (`Event::targets`); G_R sends those directly to the
//!   named members. A gateway that dies mid-delivery costs resends, not
//!   events.
//! - **Outcomes**: a remote subscriber's state is the one the latest
//!   report of its rack's gateway gives it; a rack that cannot be reached
//!   is resent to until `retry_max`, then reported
//!   [`Outcome::RackUnreachable`].
//!
//! Without racks (`Routes::rack == None`) none of this runs: no draw, no
//! byte changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rumormill_wire::proto::{self, Envelope, envelope::Body};

use super::{Env, EventId, Events, Outcome, Pending, Target, envelope, subscribes, topics_value, tree};
use crate::membership::MemberState;
use crate::racks::routes::{self, RemoteRacks, Routes};

impl Events {
    /// The rack of `name` when it is a member of another rack: not in the
    /// member table, and its `Rack` not ours. `None` without racks.
    pub(super) fn remote_rack(&self, name: &str, env: &Env<'_>) -> Option<Arc<str>> {
        let mine = env.routes.rack?;
        if *name == *self.name || env.members.position(name).is_some() {
            return None;
        }
        routes::rack_of(env.store, name).filter(|r| r != mine).map(Arc::from)
    }

    /// The one address an acknowledgement of `name`, a member of another
    /// rack, may come from.
    pub(super) fn remote_ack_source(&self, name: &str, env: &Env<'_>) -> Option<SocketAddr> {
        let rack = self.remote_rack(name, env)?;
        env.routes.toward(&rack)
    }

    /// Sends a new event towards the racks with subscribers of its topic
    /// (`local`: the subscribers of this rack, left out). Returns every
    /// remote subscriber with the copies sent towards it (0 or 1).
    pub(super) fn publish_across(
        &mut self,
        message: &proto::Event,
        local: &[(Arc<str>, SocketAddr)],
        env: &mut Env<'_>,
    ) -> Vec<(Arc<str>, u32)> {
        let Some(mine) = env.routes.rack else {
            return Vec::new();
        };
        let by_rack: BTreeMap<Arc<str>, Vec<Arc<str>>> = routes::subscribers(env.store, mine, &message.topic)
            .into_iter()
            .map(|(rack, names)| {
                let names: Vec<Arc<str>> = names
                    .into_iter()
                    .filter(|n| *n != self.name && !local.iter().any(|(l, _)| l == n))
                    .collect();
                (Arc::from(rack), names)
            })
            .filter(|(_, names)| !names.is_empty())
            .collect();
        let sent = send_across(message, &by_rack, false, env);
        by_rack
            .iter()
            .flat_map(|(rack, names)| {
                let attempts = u32::from(sent.contains(rack));
                names.iter().map(move |n| (n.clone(), attempts))
            })
            .collect()
    }

    /// Resends an event to the subscribers of other racks still waiting for
    /// it (`across`, by rack). Returns those a copy went towards.
    pub(super) fn resend_across(
        &mut self,
        message: &proto::Event,
        across: &BTreeMap<Arc<str>, Vec<Arc<str>>>,
        env: &mut Env<'_>,
    ) -> Vec<Arc<str>> {
        let sent = send_across(message, across, true, env);
        across
            .iter()
            .filter(|(rack, _)| sent.contains(rack))
            .flat_map(|(_, names)| names.iter().cloned())
            .collect()
    }

    /// The final outcome for `name`, a subscriber of rack `rack` that has
    /// not acknowledged yet, if it has one: its state in the latest report
    /// of its rack's gateway, its topics in the store, the resends spent.
    /// Unknown members and topics are waited for, as in the publisher's
    /// own rack.
    pub(super) fn remote_outcome(
        &self,
        (name, rack): (&str, &str),
        p: &Pending,
        t: &Target,
        remote: &RemoteRacks,
        env: &Env<'_>,
    ) -> Option<Outcome> {
        let unsubscribed = topics_value(env.store, name).is_some() && !subscribes(env.store, name, &p.topic);
        match remote.state(rack, name) {
            Some(MemberState::Failed) => return Some(Outcome::SubscriberFailed),
            Some(MemberState::Left) => return Some(Outcome::SubscriberLeft),
            Some(_) if unsubscribed => return Some(Outcome::Unsubscribed),
            _ => {}
        }
        if p.retry_max != 0 && t.resends >= p.retry_max {
            return Some(if env.routes.reaches(remote, rack) {
                Outcome::RetriesExhausted
            } else {
                Outcome::RackUnreachable
            });
        }
        None
    }

    /// A gateway's part: an event naming racks. Copies from a publisher of
    /// this rack go on to each named rack's gateway; a copy naming this rack
    /// (from another rack's gateway) is delivered into it. Only the active
    /// gateway takes part: a deposed one drops them, and their publishers
    /// resend.
    pub(super) fn cross(&mut self, now: Instant, id: EventId, e: proto::Event, env: &mut Env<'_>) {
        let Some(mine) = env.routes.rack.filter(|_| env.routes.active) else {
            return;
        };
        // Only what a publisher of this rack sent goes on across: a copy
        // from another rack is never sent across again.
        let ours = *id.origin == *self.name || env.members.position(&id.origin).is_some();
        let mut racks = e.racks.clone();
        racks.sort();
        racks.dedup();
        for rack in racks {
            if rack == mine {
                if !ours {
                    self.deliver_in_rack(now, &id, &e, env);
                }
                continue;
            }
            let Some(to) = env.routes.gateways.get(rack.as_str()).copied().filter(|_| ours) else {
                continue;
            };
            let mut copy = e.clone();
            copy.racks = vec![rack.clone()];
            if !e.targets.is_empty() {
                // The named subscribers of that rack (and those whose rack
                // is not known here yet: its gateway sorts them out).
                copy.targets = e
                    .targets
                    .iter()
                    .filter(|n| routes::rack_of(env.store, n).is_none_or(|r| r == rack))
                    .cloned()
                    .collect();
                if copy.targets.is_empty() {
                    continue;
                }
            }
            env.out.send(to, vec![envelope(copy)]);
        }
    }

    /// Delivers an event from another rack into this one, as its gateway:
    /// down the relay tree over the rack's subscribers, or directly to the
    /// named ones, with this member as the acknowledgement address.
    fn deliver_in_rack(&mut self, now: Instant, id: &EventId, e: &proto::Event, env: &mut Env<'_>) {
        let mut inner = e.clone();
        inner.racks.clear();
        inner.targets.clear();
        inner.relay = None;
        if inner.ack {
            inner.reply_to = Some(self.addr.into());
        }
        let named = e.targets.is_empty() || e.targets.iter().any(|n| *n == *self.name);
        if named && subscribes(env.store, &self.name, &e.topic) {
            // The gateway's own copy: acknowledged to itself like the others,
            // so its acknowledgement goes the same way.
            self.take(now, self.addr, id.clone(), self.addr, inner.clone(), env);
        }
        if e.targets.is_empty() {
            self.relay(now, id, &inner, tree::Span::WHOLE, &[], env);
            return;
        }
        for name in &e.targets {
            if *name == *self.name {
                continue;
            }
            let Some(m) = env.members.position(name).map(|i| env.members.at(i)) else {
                continue;
            };
            if m.state.is_live() {
                let to = m.addr();
                env.out.send(to, vec![envelope(inner.clone())]);
            }
        }
    }

    /// A gateway passes on an acknowledgement of someone else's event: one
    /// from its rack (`local`) for a publisher of another rack goes to that
    /// rack's gateway; one from another rack for a publisher of its rack
    /// goes to the publisher. Nothing is kept.
    pub(super) fn forward_ack(&mut self, id: &EventId, local: bool, a: proto::EventAck, env: &mut Env<'_>) {
        let Some(mine) = env.routes.rack.filter(|_| env.routes.active) else {
            return;
        };
        let publisher = env.members.position(&id.origin).map(|i| env.members.at(i).addr());
        let to = if local {
            if publisher.is_some() {
                return;
            }
            routes::rack_of(env.store, &id.origin)
                .filter(|r| r != mine)
                .and_then(|r| env.routes.gateways.get(r.as_str()).copied())
        } else {
            publisher
        };
        if let Some(to) = to {
            env.out.send(
                to,
                vec![Envelope {
                    body: Some(Body::EventAck(a)),
                }],
            );
        }
    }
}

/// Sends `message` towards the racks of `by_rack`: one copy to this rack's
/// gateway naming them all or, from the active gateway itself, one copy per
/// rack to that rack's gateway. With `targets`, the copies name the
/// subscribers. Returns the racks a copy went towards.
fn send_across(
    message: &proto::Event,
    by_rack: &BTreeMap<Arc<str>, Vec<Arc<str>>>,
    targets: bool,
    env: &mut Env<'_>,
) -> Vec<Arc<str>> {
    let names = |names: &[Arc<str>]| -> Vec<String> {
        if targets {
            names.iter().map(|n| n.to_string()).collect()
        } else {
            Vec::new()
        }
    };
    let routes: Routes<'_> = env.routes;
    if by_rack.is_empty() {
        return Vec::new();
    }
    if routes.active {
        let mut sent = Vec::new();
        for (rack, members) in by_rack {
            let Some(to) = routes.toward(rack) else {
                continue;
            };
            let mut copy = message.clone();
            copy.racks = vec![rack.to_string()];
            copy.targets = names(members);
            env.out.send(to, vec![envelope(copy)]);
            sent.push(rack.clone());
        }
        return sent;
    }
    let Some(to) = routes.gateway else {
        return Vec::new();
    };
    let mut copy = message.clone();
    copy.racks = by_rack.keys().map(|r| r.to_string()).collect();
    copy.targets = by_rack.values().flat_map(|m| names(m)).collect();
    env.out.send(to, vec![envelope(copy)]);
    by_rack.keys().cloned().collect()
}
