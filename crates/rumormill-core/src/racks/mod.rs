//! Racks: members talk across racks only through each rack's active
//! gateway, the leader of the rack's Raft group.
//!
//! A member with a rack ([`RackSpec`]) runs SWIM with its rack only: its
//! packets are sealed under the rack's scope id, so a member of another rack
//! cannot even open them. The rack's gateway candidates elect a leader with
//! Raft; the leader, the *active gateway*, also seals and opens the cross
//! scope, joins the other racks' gateways in a second, WAN-timed membership
//! pool, and carries the replicated store across.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;

#[allow(dead_code)] // driven by the racks sub-machine
mod election;

pub use election::{ElectionTiming, RaftError, RaftRecord, RaftRole};
#[allow(unused_imports)]
pub(crate) use election::{Election, raft_id};

/// Where a member stands among racks (see [`crate::Identity::in_rack`]).
///
/// ```
/// use rumormill_core::racks::RackSpec;
/// let spec = RackSpec::new("eu-1").unwrap().candidate(3);
/// assert!(spec.gateway);
/// assert_eq!(spec.candidates, 3);
/// assert!(RackSpec::new("EU 1").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackSpec {
    /// The rack's name (see [`check_rack_name`]).
    pub name: Arc<str>,
    /// This member is a candidate of its rack's Raft group: it may become
    /// the rack's active gateway.
    pub gateway: bool,
    /// How many candidates the rack has, the same on every candidate of the
    /// rack: the Raft group is formed once that many are known (like
    /// Consul's `bootstrap_expect`). 1 works, without failover; an odd
    /// number is better, as a majority of an even number tolerates no more
    /// failures than one fewer.
    pub candidates: usize,
    /// Candidates of other racks, contacted only while this member is the
    /// active gateway and no gateway report names the other racks'
    /// gateways yet.
    pub remote_seeds: Vec<SocketAddr>,
}

impl RackSpec {
    /// A plain member (not a candidate) of rack `name`.
    pub fn new(name: &str) -> Result<RackSpec, RackNameError> {
        check_rack_name(name)?;
        Ok(RackSpec {
            name: name.into(),
            gateway: false,
            candidates: 1,
            remote_seeds: Vec::new(),
        })
    }

    /// This member as one of the rack's `candidates` gateway candidates.
    pub fn candidate(mut self, candidates: usize) -> RackSpec {
        self.gateway = true;
        self.candidates = candidates.max(1);
        self
    }

    /// With these addresses of other racks' candidates.
    pub fn with_remote_seeds(mut self, seeds: Vec<SocketAddr>) -> RackSpec {
        self.remote_seeds = seeds;
        self
    }
}

/// Why a rack name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RackNameError {
    /// The name is empty.
    #[error("a rack name must not be empty")]
    Empty,
    /// The name is longer than [`MAX_RACK_NAME`] bytes.
    #[error("rack name of {0} bytes: at most {MAX_RACK_NAME}")]
    TooLong(usize),
    /// A character outside `[a-z0-9._-]`.
    #[error("rack name {name:?}: {found:?} is not one of a-z, 0-9, '.', '_', '-'")]
    Character {
        /// The name refused.
        name: String,
        /// The first character refused.
        found: char,
    },
    /// The name starts with '.', '_' or '-'.
    #[error("rack name {0:?} must start with a letter or a digit")]
    Start(String),
}

/// Longest rack name, in bytes.
pub const MAX_RACK_NAME: usize = 63;

/// Checks a rack name: 1 to 63 bytes of `[a-z0-9._-]`, starting with a
/// letter or a digit (it goes into scope ids and reserved keys, and is
/// typed by operators, so it is kept to what is unambiguous everywhere).
///
/// ```
/// use rumormill_core::racks::{check_rack_name, RackNameError};
/// assert!(check_rack_name("eu-west.1").is_ok());
/// assert_eq!(check_rack_name(""), Err(RackNameError::Empty));
/// assert!(matches!(check_rack_name("-a"), Err(RackNameError::Start(_))));
/// ```
pub fn check_rack_name(name: &str) -> Result<(), RackNameError> {
    if name.is_empty() {
        return Err(RackNameError::Empty);
    }
    if name.len() > MAX_RACK_NAME {
        return Err(RackNameError::TooLong(name.len()));
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(RackNameError::Character {
            name: name.to_owned(),
            found,
        });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(RackNameError::Start(name.to_owned()));
    }
    Ok(())
}

/// Timings of racks, overlay-wide (equal on every member). Without a rack
/// in the [`crate::Identity`] none of it is used.
///
/// ```
/// use std::time::Duration;
/// let c = rumormill_core::Config::new_lan();
/// assert_eq!(c.racks.raft_tick, Duration::from_millis(100));
/// assert_eq!(c.racks.election_timeout(), Duration::from_secs(1));
/// assert!(c.racks.wan_config().probe_interval > c.probe_interval);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RackConfig {
    /// One Raft tick: the election is driven by ticks of this length.
    pub raft_tick: Duration,
    /// Ticks without a leader's heartbeat before a candidate stands for
    /// election (randomized by Raft between this and twice this).
    pub election_ticks: usize,
    /// Ticks between two heartbeats of the leader.
    pub heartbeat_ticks: usize,
    /// Shortest time between two gateway reports written because the
    /// rack's membership changed.
    pub report_interval: Duration,
    /// Time between two gateway reports written when nothing changed, so
    /// that their age tells how recently the rack was heard from.
    pub report_refresh: Duration,
    /// Timings of the pool of active gateways; `None`: [`RackConfig::wan_config`]'s default.
    pub wan: Option<Box<Config>>,
}

impl RackConfig {
    /// Racks within a data centre or on one host: 100 ms ticks, so an
    /// election takes 1–2 s; a report at most every 2 s, and every 30 s.
    pub fn new_lan() -> RackConfig {
        RackConfig {
            raft_tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            report_interval: Duration::from_secs(2),
            report_refresh: Duration::from_secs(30),
            wan: None,
        }
    }

    /// Racks whose members talk over a wide-area network inside the rack
    /// too: 500 ms ticks, so that a slow round trip does not depose a
    /// leader.
    pub fn new_wan() -> RackConfig {
        RackConfig {
            raft_tick: Duration::from_millis(500),
            ..RackConfig::new_lan()
        }
    }

    /// The shortest election timeout (a leader missing that long is replaced
    /// within one to two of them).
    pub fn election_timeout(&self) -> Duration {
        self.raft_tick * u32::try_from(self.election_ticks).unwrap_or(u32::MAX)
    }

    /// Timings of the pool of active gateways: [`Config::new_wan`] with a
    /// probe every 2 s (1 s timeout) and suspicion multiplier 4, as the pool
    /// has a handful of members and a rack cut off must be noticed in
    /// seconds, not in the minute the WAN preset takes for large pools.
    pub fn wan_config(&self) -> Config {
        if let Some(c) = &self.wan {
            return (**c).clone();
        }
        Config {
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(1),
            suspicion_mult: 4,
            push_pull_interval: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(5),
            ..Config::new_wan()
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.raft_tick.is_zero() || self.report_interval.is_zero() || self.report_refresh.is_zero() {
            return Err("racks: raft_tick, report_interval and report_refresh must be above zero".into());
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(format!(
                "racks: election_ticks ({}) must exceed heartbeat_ticks ({}), which must be at least 1",
                self.election_ticks, self.heartbeat_ticks
            ));
        }
        if let Some(c) = &self.wan {
            c.validate()?;
        }
        Ok(())
    }
}

impl Default for RackConfig {
    fn default() -> RackConfig {
        RackConfig::new_lan()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rack_names_are_checked() {
        for good in ["a", "0", "eu-west-1", "r.1_b", &"a".repeat(63)] {
            assert_eq!(check_rack_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_rack_name(""), Err(RackNameError::Empty));
        assert_eq!(check_rack_name(&"a".repeat(64)), Err(RackNameError::TooLong(64)));
        for bad in ["A", "a b", "a/b", "é", "a\0"] {
            assert!(matches!(check_rack_name(bad), Err(RackNameError::Character { .. })), "{bad}");
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
}
