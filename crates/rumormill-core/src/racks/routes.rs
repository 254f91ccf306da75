//! What events read of racks: where copies for another rack go from here
//! ([`Routes`], lent by the racks sub-machine for each call).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where events for other racks go from this member.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // read by events once their `Env` takes it
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
