//! Racks: members talk across racks only through each rack's active
//! gateway, the leader of the rack's Raft group.
//!
//! A member with a rack ([`RackSpec`]) runs SWIM with its rack only: its
//! packets are sealed under the rack's scope id, so a member of another rack
//! cannot even open them. The rack's gateway candidates elect a leader with
//! Raft; the leader, the *active gateway*, also seals and opens the cross
//! scope, joins the other racks' gateways in a second, WAN-timed membership
//! pool, and carries the replicated store across.
//!
//! Packets between racks carry one `Crossing` message: the sender's rack
//! and the Raft term in which it leads it. Each member keeps the highest
//! term heard of each rack and refuses a crossing below it
//! ([`crate::Stats::stale_term`]), so a deposed gateway's packets count for
//! nothing. The gateway writes a report of its rack into the store
//! ([`crate::reserved::GatewayReport`]), from which every member of every
//! rack lists the other racks ([`crate::Overlay::racks`]) and their members
//! ([`crate::Overlay::remote_members`]).
//!
//! A rack of one candidate elects it alone (without failover):
//!
//! ```
//! use std::time::{Duration, Instant};
//! use rumormill_core::racks::{RackNotification, RackSpec};
//! use rumormill_core::{Config, Identity, Notification, Overlay, Security};
//!
//! let mut now = Instant::now();
//! let spec = RackSpec::new("eu-1")?.candidate(1);
//! let id = Identity::new("gw", "127.0.0.1:7001".parse().unwrap(), 1).in_rack(spec);
//! let mut o = Overlay::new(Config::new_lan(), id, Security::Plaintext, 1, now);
//! let mut elected = false;
//! for _ in 0..40 {
//!     now += Duration::from_millis(100);
//!     o.handle_timeout(now);
//!     while let Some(n) = o.poll_notification() {
//!         match n {
//!             // The simulator's way: durable at once. An agent saves the
//!             // record first.
//!             Notification::Raft(record) => o.raft_persisted(now, record.seq),
//!             Notification::Rack(RackNotification::GatewayChanged { gateway, .. }) => {
//!                 elected |= &*gateway == "gw";
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//! assert!(elected && o.is_active_gateway());
//! let racks = o.racks(now);
//! assert_eq!((&*racks[0].name, racks[0].gateway.as_deref()), ("eu-1", Some("gw")));
//! # Ok::<(), rumormill_core::racks::RackNameError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto;

use crate::config::Config;
use crate::membership::{self, Members, Membership};
use crate::notification::Notification;
use crate::overlay::{Crossing, Identity, Wire};
use crate::replication::Store;

mod report;
pub(crate) mod routes;
pub(crate) use report::is_report;

// The election's own tests keep a helper that nothing calls yet.
#[cfg_attr(test, allow(dead_code))]
mod election;

pub(crate) use election::Election;
pub use election::{ElectionTiming, RaftError, RaftRecord, RaftRole};

// Records are plain data (no floating point): equality is total.
impl Eq for RaftRecord {}

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

/// What racks tell the driver, in [`crate::Notification::Rack`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RackNotification {
    /// A rack has a new active gateway (a higher term): this member's own
    /// rack or another.
    GatewayChanged {
        /// The rack.
        rack: Arc<str>,
        /// Its new gateway.
        gateway: Arc<str>,
        /// The term in which it leads.
        term: u64,
    },
    /// The pool of gateways lost the rack's gateway (told by an active
    /// gateway only: the others learn it from its reports' age).
    Unreachable {
        /// The rack.
        rack: Arc<str>,
    },
    /// The rack's gateway is reachable again.
    Reachable {
        /// The rack.
        rack: Arc<str>,
    },
}

/// One rack as the local member knows it ([`crate::Overlay::racks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackInfo {
    /// The rack's name.
    pub name: Arc<str>,
    /// Its active gateway, if known.
    pub gateway: Option<Arc<str>>,
    /// The gateway's term (0 when none is known).
    pub term: u64,
    /// The gateway candidates and their Raft roles when known.
    pub candidates: Vec<(Arc<str>, RaftRole)>,
    /// Members alive, suspect and failed (left ones are not counted).
    pub alive: usize,
    /// See `alive`.
    pub suspect: usize,
    /// See `alive`.
    pub failed: usize,
    /// How long ago the rack was last heard from: its latest gateway
    /// report, or (for this member's own rack) zero.
    pub last_heard: Option<Duration>,
}

/// A member of another rack, as that rack's gateway reports it
/// ([`crate::Overlay::remote_members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMember {
    /// The member's name.
    pub name: Arc<str>,
    /// Its rack.
    pub rack: Arc<str>,
    /// Its state as its gateway reports it.
    pub state: crate::MemberState,
    /// How old the report is.
    pub report_age: Option<Duration>,
}

/// Where a member of another rack is reached, as last heard.
#[derive(Debug, Clone)]
struct Remote {
    addr: SocketAddr,
    term: u64,
}

/// This member while it is its rack's active gateway.
#[derive(Debug)]
struct Active {
    term: u64,
    /// The pool of the racks' active gateways.
    pool: Membership,
}

/// The racks sub-machine of one member in a rack: its role (member,
/// candidate, active gateway), the election, the pool of gateways, the
/// highest term heard of each rack and the gateway report it writes.
///
/// Shaped like [`crate::replication::Replication`]: the overlay hands it
/// Raft messages and crossings, runs its timer, and drains what it queues
/// (Raft messages to send, durable records and notifications, store
/// writes). It reads the rack's member table and the store through views
/// lent for each call.
pub(crate) struct Racks {
    spec: RackSpec,
    config: RackConfig,
    wan: Config,
    me: Arc<str>,
    addr: SocketAddr,
    boot_epoch: u64,
    rng: ChaCha8Rng,
    election: Option<Election>,
    active: Option<Active>,
    /// The highest term heard of each other rack, and where its gateway is.
    remotes: BTreeMap<Arc<str>, Remote>,
    /// Other racks whose gateway the pool has lost.
    unreachable: BTreeSet<Arc<str>>,
    /// Other racks' reachable gateways, while active (what events route by).
    reachable: BTreeMap<Arc<str>, SocketAddr>,
    /// The gateway last announced for each rack (name, term).
    announced: BTreeMap<Arc<str>, (Arc<str>, u64)>,
    /// When each rack's latest report arrived here.
    heard: BTreeMap<Arc<str>, Instant>,
    report: report::Schedule,
    /// This member's own `Rack` value is in the store as it should be.
    rack_written: bool,
    raft_out: VecDeque<(SocketAddr, proto::RaftMessage)>,
    output: VecDeque<Notification>,
}

impl std::fmt::Debug for Racks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Racks")
            .field("rack", &self.spec.name)
            .field("active", &self.active_term())
            .field("remotes", &self.remotes)
            .finish_non_exhaustive()
    }
}

/// What the racks sub-machine reads of the rest of the overlay for one call.
pub(crate) struct View<'a> {
    pub(crate) members: &'a Members,
    pub(crate) store: &'a Store,
    pub(crate) wire: &'a mut Wire,
}

/// What a crossing's fence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// Its envelopes are to be handled as traffic between racks.
    Pass,
    /// Its term is below the highest heard for its rack.
    Stale,
    /// Not a crossing this member can take (bad rack name, its own rack).
    Malformed,
}

impl Racks {
    pub(crate) fn new(config: &Config, identity: &Identity, spec: RackSpec, seed: u64, now: Instant) -> Racks {
        let election = spec.gateway.then(|| {
            let timing = ElectionTiming {
                tick: config.racks.raft_tick,
                election_ticks: config.racks.election_ticks,
                heartbeat_ticks: config.racks.heartbeat_ticks,
            };
            Election::new(&identity.name, timing, seed ^ 0x7261_6674, now)
        });
        Racks {
            spec,
            config: config.racks.clone(),
            wan: config.racks.wan_config(),
            me: identity.name.clone(),
            addr: identity.addr,
            boot_epoch: identity.epoch,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7261_636b),
            election,
            active: None,
            remotes: BTreeMap::new(),
            unreachable: BTreeSet::new(),
            reachable: BTreeMap::new(),
            announced: BTreeMap::new(),
            heard: BTreeMap::new(),
            report: {
                let mut r = report::Schedule::new(now);
                r.configure(config.racks.report_interval, config.racks.report_refresh);
                r
            },
            rack_written: false,
            raft_out: VecDeque::new(),
            output: VecDeque::new(),
        }
    }

    /// Whether this member is its rack's active gateway.
    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The term in which this member leads its rack, while it does.
    pub(crate) fn active_term(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.term)
    }

    /// This rack's active gateway: this member, the Raft leader a candidate
    /// knows of, or the writer of the rack's highest-term active report.
    pub(crate) fn gateway(&self, members: &Members, store: &Store) -> Option<SocketAddr> {
        if self.is_active() {
            return Some(self.addr);
        }
        if let Some(leader) = self.election.as_ref().and_then(Election::leader) {
            if let Some(m) = members.get(&leader).filter(|m| m.state.is_live()) {
                return Some(m.addr());
            }
        }
        report::gateway_of(store, &self.spec.name).map(|(_, r)| r.addr)
    }

    /// Other racks' reachable gateways (only while active).
    pub(crate) fn remote_gateways(&self) -> &BTreeMap<Arc<str>, SocketAddr> {
        &self.reachable
    }

    /// What events route copies for other racks by.
    #[allow(dead_code)] // lent to events once their `Env` takes it
    pub(crate) fn routes<'a>(&'a self, members: &Members, store: &Store) -> routes::Routes<'a> {
        routes::Routes {
            rack: Some(&self.spec.name),
            gateway: self.gateway(members, store),
            active: self.is_active(),
            gateways: &self.reachable,
        }
    }

    /// The pool of gateways with what it borrows, while active.
    pub(crate) fn pool<'a>(&'a mut self, wire: &'a mut Wire) -> Option<(&'a mut Membership, membership::Env<'a>)> {
        let active = self.active.as_mut()?;
        let env = membership::Env {
            config: &self.wan,
            rng: &mut self.rng,
            wire,
        };
        Some((&mut active.pool, env))
    }

    // ----- inputs -------------------------------------------------------

    /// Checks the fence of a crossing from `from`; one of a higher term
    /// makes its sender its rack's gateway. `datagram`: `from` is the
    /// sender's own address (a stream's may be a connection's port, so a
    /// stream raises the term but moves no address).
    pub(crate) fn admit(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: bool,
        rack: &str,
        term: u64,
        wire: &mut Wire,
    ) -> Fence {
        if check_rack_name(rack).is_err() || rack == &*self.spec.name || !self.is_active() {
            return Fence::Malformed;
        }
        let rack: Arc<str> = rack.into();
        let known = self.remotes.get(&rack).map(|r| (r.term, r.addr));
        match known {
            Some((t, _)) if term < t => return Fence::Stale,
            Some((t, addr)) if term == t && (addr == from || !datagram) => return Fence::Pass,
            Some((_, addr)) if !datagram => {
                self.remotes.insert(rack, Remote { addr, term });
                return Fence::Pass;
            }
            None if !datagram => return Fence::Pass,
            _ => {}
        }
        // A new term (or the first heard): the sender is the rack's gateway,
        // and whoever was before it leaves the pool.
        if let Some((_, old)) = known
            && old != from
        {
            self.retire_addr(now, old, wire);
        }
        self.remotes.insert(rack.clone(), Remote { addr: from, term });
        self.unreachable.remove(&rack);
        self.update_route(wire);
        Fence::Pass
    }

    /// A Raft message from `from`, a member of this rack.
    pub(crate) fn on_raft(&mut self, from: Option<&str>, msg: proto::RaftMessage, stats: &mut crate::Stats) {
        let (Some(election), Some(from)) = (self.election.as_mut(), from) else {
            stats.raft_refused += 1;
            return;
        };
        if election.handle(from, msg).is_err() {
            stats.raft_refused += 1;
        }
    }

    /// A gateway report was accepted into the store: the terms heard, the
    /// remote gateways and who leads which rack follow it.
    pub(crate) fn on_report(&mut self, now: Instant, writer: &str, store: &Store, wire: &mut Wire) {
        let Some(r) = report::read(store, writer) else { return };
        let rack: Arc<str> = r.rack.as_str().into();
        self.heard.insert(rack.clone(), now);
        if rack == self.spec.name {
            self.announce_from_store(&rack, store);
            return;
        }
        if r.active {
            let newer = self.remotes.get(&rack).is_none_or(|k| r.term > k.term);
            if newer {
                if let Some(old) = self.remotes.get(&rack).map(|k| k.addr)
                    && old != r.addr
                {
                    self.retire_addr(now, old, wire);
                }
                self.remotes.insert(
                    rack.clone(),
                    Remote {
                        addr: r.addr,
                        term: r.term,
                    },
                );
                if let Some((pool, mut env)) = self.pool(wire) {
                    // Not in the pool yet: contact it.
                    if pool.table().get(writer).is_none_or(|m| !m.state.is_live()) {
                        pool.contact(r.addr, &mut env);
                    }
                }
                self.update_route(wire);
            }
        }
        self.announce_from_store(&rack, store);
    }

    /// Announces a rack's gateway if the store names a new one.
    fn announce_from_store(&mut self, rack: &Arc<str>, store: &Store) {
        if let Some((writer, r)) = report::gateway_of(store, rack) {
            self.announce(rack, writer.into(), r.term);
        }
    }

    fn announce(&mut self, rack: &Arc<str>, gateway: Arc<str>, term: u64) {
        let newer = self.announced.get(rack).is_none_or(|(_, t)| term > *t);
        if newer {
            self.announced.insert(rack.clone(), (gateway.clone(), term));
            self.output
                .push_back(Notification::Rack(RackNotification::GatewayChanged {
                    rack: rack.clone(),
                    gateway,
                    term,
                }));
        }
    }

    /// The pool's member at `addr`, superseded, leaves it.
    fn retire_addr(&mut self, now: Instant, addr: SocketAddr, wire: &mut Wire) {
        if let Some((pool, mut env)) = self.pool(wire) {
            let names: Vec<Arc<str>> = pool
                .table()
                .iter()
                .filter(|m| m.addr() == addr && m.state.is_live())
                .map(|m| m.name.clone())
                .collect();
            for n in names {
                pool.retire(now, &n, &mut env);
            }
        }
    }

    // ----- timers -------------------------------------------------------

    /// When the timer is next due: a Raft tick, a report, the pool's timers.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let election = self.election.as_ref().and_then(Election::poll_timeout);
        // Before bootstrap a candidate looks for the others every tick.
        let bootstrap = self
            .election
            .as_ref()
            .filter(|e| !e.is_bootstrapped())
            .map(|_| self.report.started() + self.config.raft_tick);
        let pool = self.active.as_ref().and_then(|a| {
            membership::Timer::ALL
                .into_iter()
                .filter_map(|t| a.pool.deadline(t))
                .filter(|d| d.wakes)
                .map(|d| d.at)
                .min()
        });
        let report = self.report.due(self.is_active());
        let rack = (!self.rack_written).then(|| self.report.started());
        [election, bootstrap, pool, report, rack].into_iter().flatten().min()
    }

    /// Runs what is due; returns the store writes to make (this member's
    /// `Rack` value, its gateway report).
    pub(crate) fn handle_timeout(&mut self, now: Instant, wall_ms: u64, view: &mut View<'_>) -> Vec<(String, Vec<u8>)> {
        let mut writes = Vec::new();
        if !self.rack_written {
            self.rack_written = true;
            writes.push(self.rack_value());
        }
        if let Some(e) = self.election.as_mut() {
            if !e.is_bootstrapped() {
                self.report.restart(now);
                let voters = candidates(&self.me, &self.spec, view.members, view.store);
                if let Some(voters) = voters {
                    let _ = e.bootstrap(&voters);
                }
            }
            e.handle_timeout(now);
        }
        writes.extend(self.settle(now, wall_ms, view));
        if let Some(active) = self.active.as_mut() {
            let mut env = membership::Env {
                config: &self.wan,
                rng: &mut self.rng,
                wire: view.wire,
            };
            for t in membership::Timer::ALL {
                if active.pool.deadline(t).is_some_and(|d| d.at <= now) {
                    active.pool.handle_timeout(now, t, &mut env);
                }
            }
        }
        self.follow_pool(view.wire);
        if let Some(term) = self.active_term()
            && self.report.due(true).is_some_and(|at| at <= now)
        {
            self.report.written(now);
            let roles = self.election.as_ref().map(Election::roles).unwrap_or_default();
            let r = report::build(
                &self.spec.name,
                term,
                self.addr,
                wall_ms,
                &self.me,
                view.members,
                &roles,
                true,
            );
            writes.push(report::write(&self.me, &r));
        }
        writes
    }

    /// Follows what an input changed in the election: queues its records
    /// and messages, becomes the active gateway or steps down.
    pub(crate) fn settle(&mut self, now: Instant, wall_ms: u64, view: &mut View<'_>) -> Vec<(String, Vec<u8>)> {
        let mut writes = Vec::new();
        self.drain_election(view.members);
        self.follow_leadership(now, wall_ms, view, &mut writes);
        writes
    }

    /// The rack's membership changed: the report is written again soon.
    pub(crate) fn rack_changed(&mut self) {
        self.report.changed();
    }

    /// This member's `Rack` value.
    pub(crate) fn rack_value(&self) -> (String, Vec<u8>) {
        let key = crate::reserved::ReservedKey::Rack {
            member: self.me.to_string(),
        };
        let value = crate::reserved::Rack {
            name: self.spec.name.to_string(),
            gateway: self.spec.gateway,
        };
        (key.key(), value.encode())
    }

    /// The store holds a `Rack` value of this member that is not its own
    /// (a previous life's): it is written again.
    pub(crate) fn check_rack_value(&mut self, value: Option<&[u8]>) {
        if value != Some(&self.rack_value().1[..]) {
            self.rack_written = false;
        }
    }

    /// Moves what the election queued: records to make durable, messages
    /// to the named members (dropped if the member is not known alive).
    fn drain_election(&mut self, members: &Members) {
        let Some(e) = self.election.as_mut() else { return };
        while let Some(r) = e.poll_record() {
            self.output.push_back(Notification::Raft(r));
        }
        while let Some((to, msg)) = e.poll_message() {
            if let Some(m) = members.get(&to).filter(|m| m.state.is_live()) {
                self.raft_out.push_back((m.addr(), msg));
            }
        }
    }

    /// Becomes the active gateway when elected, steps down when deposed.
    fn follow_leadership(
        &mut self,
        now: Instant,
        wall_ms: u64,
        view: &mut View<'_>,
        writes: &mut Vec<(String, Vec<u8>)>,
    ) {
        let Some(e) = self.election.as_ref() else { return };
        let (leading, term, leader, roles) = (e.is_leader(), e.term(), e.leader(), e.roles());
        if let Some(leader) = leader {
            let rack = self.spec.name.clone();
            self.announce(&rack, leader, term);
        }
        match (self.active_term(), leading) {
            (Some(t), true) if t == term => {}
            (Some(t), _) => {
                // Deposed (or re-elected in a later term): the old term's
                // report says so, and nothing more crosses under it.
                let r = report::build(
                    &self.spec.name,
                    t,
                    self.addr,
                    wall_ms,
                    &self.me,
                    view.members,
                    &roles,
                    false,
                );
                writes.push(report::write(&self.me, &r));
                self.active = None;
                view.wire.set_crossing(None);
                self.update_route(view.wire);
                if leading {
                    self.become_active(now, term, view);
                }
            }
            (None, true) => self.become_active(now, term, view),
            (None, false) => {}
        }
    }

    fn become_active(&mut self, now: Instant, term: u64, view: &mut View<'_>) {
        let identity = Identity::new(self.me.clone(), self.addr, (self.boot_epoch << 20) | (term & 0xf_ffff));
        let pool = Membership::new_crossing(&self.wan, &identity, now, &mut self.rng);
        self.active = Some(Active { term, pool });
        self.report.elected();
        // The other racks' gateways: from their reports, else the seeds.
        for (rack, writer_report) in report::gateways(view.store) {
            if rack != self.spec.name {
                let known = self.remotes.get(&rack).is_some_and(|k| k.term >= writer_report.term);
                if !known {
                    self.remotes.insert(
                        rack,
                        Remote {
                            addr: writer_report.addr,
                            term: writer_report.term,
                        },
                    );
                }
            }
        }
        self.unreachable.clear();
        let mut seeds: Vec<SocketAddr> = self.remotes.values().map(|r| r.addr).collect();
        if seeds.is_empty() {
            seeds = self.spec.remote_seeds.clone();
        }
        self.update_route(view.wire);
        if let Some((pool, mut env)) = self.pool(view.wire) {
            pool.set_seeds(seeds.clone());
            pool.join_via(now, &seeds, &mut env);
        }
    }

    /// The crossing as it stands: this rack's fence and the addresses of
    /// the other racks' gateways, of the pool's members and of the seeds.
    fn crossing(&self) -> Crossing {
        let mut peers: BTreeSet<SocketAddr> = self.remotes.values().map(|r| r.addr).collect();
        peers.extend(self.spec.remote_seeds.iter().copied());
        if let Some(a) = &self.active {
            peers.extend(a.pool.table().iter().map(|m| m.addr()));
        }
        peers.remove(&self.addr);
        Crossing {
            rack: self.spec.name.clone(),
            term: self.active_term().unwrap_or(0),
            peers,
        }
    }

    /// Keeps the wire's crossing, and the reachable gateways, in step
    /// with the pool.
    pub(crate) fn update_route(&mut self, wire: &mut Wire) {
        self.reachable = match self.active {
            Some(_) => self
                .remotes
                .iter()
                .filter(|(rack, _)| !self.unreachable.contains(*rack))
                .map(|(rack, r)| (rack.clone(), r.addr))
                .collect(),
            None => BTreeMap::new(),
        };
        if self.is_active() {
            wire.set_crossing(Some(self.crossing()));
        }
    }

    /// Follows the pool's changes: a rack whose gateway failed is
    /// unreachable until it is back (or another replaces it).
    pub(crate) fn follow_pool(&mut self, wire: &mut Wire) {
        let Some(active) = self.active.as_mut() else { return };
        let mut changed = false;
        while let Some(n) = active.pool.poll_notification() {
            changed = true;
            let _ = n;
        }
        if !changed {
            return;
        }
        for (rack, r) in &self.remotes {
            let state = active.pool.table().iter().find(|m| m.addr() == r.addr).map(|m| m.state);
            let lost = matches!(state, Some(crate::MemberState::Failed));
            let back = state.is_some_and(crate::MemberState::is_live);
            if lost && self.unreachable.insert(rack.clone()) {
                self.output
                    .push_back(Notification::Rack(RackNotification::Unreachable { rack: rack.clone() }));
            } else if back && self.unreachable.remove(rack) {
                self.output
                    .push_back(Notification::Rack(RackNotification::Reachable { rack: rack.clone() }));
            }
        }
        self.update_route(wire);
    }

    // ----- outputs ------------------------------------------------------

    /// The next Raft message to send, in the rack's scope.
    pub(crate) fn poll_raft(&mut self) -> Option<(SocketAddr, proto::RaftMessage)> {
        self.raft_out.pop_front()
    }

    /// The next notification (Raft records, rack changes).
    pub(crate) fn poll_notification(&mut self) -> Option<Notification> {
        self.output.pop_front()
    }

    /// The driver has made Raft record `seq` durable.
    pub(crate) fn persisted(&mut self, seq: u64, members: &Members) {
        if let Some(e) = self.election.as_mut() {
            e.persisted(seq);
        }
        self.drain_election(members);
    }

    /// Whether a store key is this member's `Rack` value's.
    pub(crate) fn is_own_rack_key(&self, key: &str) -> bool {
        key == self.rack_value().0
    }

    /// Brings a restarted candidate's election back.
    pub(crate) fn restore(&mut self, record: &RaftRecord) -> Result<(), RaftError> {
        match self.election.as_mut() {
            Some(e) => e.restore(record),
            None => Err(RaftError::State("this member is not a gateway candidate".into())),
        }
    }

    // ----- queries ------------------------------------------------------

    /// Every rack known: this one from the member table, the others from
    /// their gateways' reports.
    pub(crate) fn racks(&self, now: Instant, wall_ms: Option<u64>, members: &Members, store: &Store) -> Vec<RackInfo> {
        let mut out = Vec::new();
        let own = {
            let (mut alive, mut suspect, mut failed) = (1, 0, 0);
            for m in members.iter() {
                match m.state {
                    crate::MemberState::Alive => alive += 1,
                    crate::MemberState::Suspect => suspect += 1,
                    crate::MemberState::Failed => failed += 1,
                    crate::MemberState::Left => {}
                }
            }
            let (gateway, term) = match (&self.election, self.announced.get(&self.spec.name)) {
                (Some(e), _) if e.leader().is_some() => (e.leader(), e.term()),
                (_, Some((g, t))) => (Some(g.clone()), *t),
                _ => (None, 0),
            };
            let candidates = match &self.election {
                Some(e) if e.is_bootstrapped() => e.roles(),
                _ => report::gateway_of(store, &self.spec.name)
                    .map(|(_, r)| r.candidates.iter().map(|c| (c.name.as_str().into(), c.role)).collect())
                    .unwrap_or_default(),
            };
            RackInfo {
                name: self.spec.name.clone(),
                gateway,
                term,
                candidates,
                alive,
                suspect,
                failed,
                last_heard: Some(Duration::ZERO),
            }
        };
        out.push(own);
        for (rack, (writer, r)) in report::latest(store) {
            if rack == self.spec.name {
                continue;
            }
            let count = |s: crate::MemberState| r.members.iter().filter(|m| m.state == s).count();
            out.push(RackInfo {
                name: rack.clone(),
                gateway: r.active.then(|| writer.as_str().into()),
                term: r.term,
                candidates: r.candidates.iter().map(|c| (c.name.as_str().into(), c.role)).collect(),
                alive: count(crate::MemberState::Alive),
                suspect: count(crate::MemberState::Suspect),
                failed: count(crate::MemberState::Failed),
                last_heard: self.age(now, wall_ms, &rack, r.wall_ms),
            });
        }
        out
    }

    /// How old a rack's latest report is: by the wall clocks when both are
    /// known, else since it arrived here.
    fn age(&self, now: Instant, wall_ms: Option<u64>, rack: &str, written_ms: u64) -> Option<Duration> {
        match wall_ms {
            Some(w) if written_ms > 0 => Some(Duration::from_millis(w.saturating_sub(written_ms))),
            _ => self.heard.get(rack).map(|at| now.saturating_duration_since(*at)),
        }
    }

    /// Members of other racks, from their gateways' latest reports.
    pub(crate) fn remote_members(&self, now: Instant, wall_ms: Option<u64>, store: &Store) -> Vec<RemoteMember> {
        let mut out = Vec::new();
        for (rack, (_, r)) in report::latest(store) {
            if rack == self.spec.name {
                continue;
            }
            let age = self.age(now, wall_ms, &rack, r.wall_ms);
            for m in &r.members {
                out.push(RemoteMember {
                    name: m.name.as_str().into(),
                    rack: rack.clone(),
                    state: m.state,
                    report_age: age,
                });
            }
        }
        out
    }
}

/// The voters, once `spec.candidates` candidates of the rack are known
/// alive (this member included): the ones with the lowest names. `None`
/// until then, or if this member is not among them.
fn candidates(me: &Arc<str>, spec: &RackSpec, members: &Members, store: &Store) -> Option<Vec<Arc<str>>> {
    let mut names: Vec<Arc<str>> = vec![me.clone()];
    for m in members.iter().filter(|m| m.state == crate::MemberState::Alive) {
        let key = crate::reserved::ReservedKey::Rack {
            member: m.name.to_string(),
        }
        .key();
        let candidate = store
            .get(&key)
            .filter(|u| crate::reserved::from_owner(u))
            .and_then(|u| crate::reserved::Rack::decode(u.value.as_deref()?).ok())
            .is_some_and(|r| r.gateway && *r.name == *spec.name);
        if candidate {
            names.push(m.name.clone());
        }
    }
    if names.len() < spec.candidates {
        return None;
    }
    names.sort();
    names.truncate(spec.candidates);
    names.contains(me).then_some(names)
}

#[cfg(test)]
mod tests;
