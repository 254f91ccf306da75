//! The agent: the overlays of one host, started from the configuration and
//! the data directory, changed at runtime, kept across restarts.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use rumormill::agent::Agent;
//! use rumormill::config::{AgentConfig, OverlaySpec};
//!
//! let mut config = AgentConfig::default();
//! let mut spec = OverlaySpec::named("web");
//! spec.bind = "127.0.0.1:0".into();
//! spec.plaintext = true;
//! config.overlays.push(spec);
//! let agent = Agent::start(rumormill::transport::TokioNet, config).await?;
//! agent.put("web", "greeting", b"hello".to_vec()).await?;
//! agent.shutdown(true).await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine;
use rumormill_core::{CoreError, Event, Identity, MemberInfo, MemberState, Overlay, Security, WallTime};
use rumormill_wire::Keyring;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::config::{self, AgentConfig, ConfigError, OverlaySpec, Seed};
use crate::driver::{Driver, DriverOptions, OverlayHandle, Stopped};
use crate::persist::{Db, OverlayRecord, PersistError};
use crate::transport::Net;

/// Keys under this prefix are the members' own data (racks, subscriptions,
/// luggage, keyrings); clients cannot write them.
pub use rumormill_core::reserved::PREFIX as RESERVED_PREFIX;
/// How often the peers seen alive are saved for the next start.
const PEERS_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// What an agent operation can fail with; the HTTP API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No overlay of that name.
    #[error("no overlay named {0:?}")]
    UnknownOverlay(String),
    /// An overlay of that name exists.
    #[error("an overlay named {0:?} already exists")]
    OverlayExists(String),
    /// No value under that key.
    #[error("no value under key {0:?}")]
    UnknownKey(String),
    /// Something else asked for does not exist (the message says what).
    #[error("{0}")]
    NotFound(String),
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with the overlay's state.
    #[error("{0}")]
    Conflict(String),
    /// The overlay's sockets could not be bound.
    #[error("overlay {overlay:?}: cannot listen on {addr}: {source}")]
    Bind {
        /// The overlay.
        overlay: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory failed.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The write would take this member beyond its quota in the
    /// overlay's store (or its luggage limits).
    #[error("{0}")]
    Quota(String),
}

/// One row of a member list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct MemberRow {
    /// Name.
    pub name: String,
    /// Gossip address.
    #[schema(value_type = String)]
    pub addr: SocketAddr,
    /// `alive`, `suspect`, `failed` or `left`.
    pub state: String,
    /// Incarnation within the boot epoch.
    pub incarnation: u32,
    /// Boot epoch.
    pub epoch: u64,
    /// Rack, when the member announced one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// Whether this is the local member.
    pub local: bool,
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UpdateRow {
    /// Key.
    pub key: String,
    /// The value as text, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value, base64.
    pub value_base64: String,
    /// The member that wrote it.
    pub origin: String,
    /// Lamport time of the write.
    pub lamport: u64,
}

/// Summary of one overlay.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct OverlaySummary {
    /// Name.
    pub name: String,
    /// The local member's name.
    pub member: String,
    /// The address the member announces.
    #[schema(value_type = String)]
    pub addr: SocketAddr,
    /// Boot epoch of this start.
    pub epoch: u64,
    /// Whether packets are encrypted.
    pub encrypted: bool,
    /// `running` or `left`.
    pub status: String,
    /// Members alive or suspect, including the local one.
    pub live_members: usize,
    /// Settings, keys masked.
    pub spec: OverlaySpec,
    /// Protocol and transport counters.
    pub stats: OverlayStats,
}

/// Counters of one overlay.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct OverlayStats {
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Stream frames sent.
    pub frames_sent: u64,
    /// Stream frames received.
    pub frames_received: u64,
    /// Packets dropped by the wire layer (foreign key, replay, garbage).
    pub rejected: u64,
    /// Why the last one was dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<String>,
    /// Messages that decoded but made no sense.
    pub malformed: u64,
    /// Suspicions of the local member it refuted.
    pub refutations: u64,
    /// Datagrams the socket refused to send.
    pub send_errors: u64,
    /// Stream connections that failed.
    pub stream_errors: u64,
    /// Outgoing stream frames dropped: too many connections in flight.
    pub streams_dropped: u64,
    /// Incoming connections refused: too many open (in all, or from their
    /// address) and none that could be evicted.
    pub connections_refused: u64,
    /// Incoming connections closed to make room: idle before their first
    /// header or between frames, or stalled inside a frame.
    pub connections_evicted: u64,
    /// Incoming stream frames refused on their length or header before
    /// their body was read (also counted in `rejected`).
    pub frames_refused: u64,
    /// Values stored.
    pub values: usize,
    /// Received updates refused because their writer was over its quota.
    pub quota_refused: u64,
    /// Received luggage updates refused for the luggage limits.
    pub luggage_refused: u64,
    /// Inbox entries of best-effort events and local topics evicted to
    /// keep the inbox within its byte cap.
    pub inbox_evicted: u64,
    /// At-least-once events refused (not acknowledged, so resent later)
    /// because the inbox was full of them.
    pub inbox_refused: u64,
    /// At-least-once events stored over the inbox's byte cap because they
    /// could not be refused (too old for the de-duplication window to take
    /// back: a resend would be taken for a duplicate).
    pub inbox_over_cap: u64,
}

pub(crate) struct Running {
    pub(crate) record: OverlayRecord,
    pub(crate) handle: OverlayHandle,
    pub(crate) left: bool,
    tasks: Vec<JoinHandle<()>>,
    /// Live inbox entries for connected applications.
    pub(crate) feed: crate::events::InboxFeed,
    /// The agent's topics, as the event pump sees them.
    topics: Arc<std::sync::Mutex<Vec<String>>>,
    /// What the inbox's byte cap evicted and refused.
    inbox: Arc<crate::events::InboxCounters>,
}

impl Running {
    pub(crate) fn share_topics(&self) {
        if let Ok(mut t) = self.topics.lock() {
            t.clone_from(&self.record.topics);
        }
    }

    fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Running {
    /// The background tasks hold handles of the overlay; once they are gone
    /// (and the agent's own handle with this value), the driver stops.
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// The agent.
pub struct Agent<N: Net> {
    net: N,
    pub(crate) db: Db,
    host: String,
    pub(crate) overlays: Mutex<BTreeMap<String, Running>>,
    /// Serializes the stores of published events and their reports.
    pub(crate) events_lock: Mutex<()>,
    me: Weak<Agent<N>>,
}

impl<N: Net> std::fmt::Debug for Agent<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl<N: Net> Agent<N> {
    /// Opens the data directory and starts the overlays: those kept from
    /// earlier runs and those of `config` (whose settings win; a kept
    /// keyring wins over the file's keys, so rotations survive restarts).
    /// With none at all, starts one named `default` with a new key.
    pub async fn start(net: N, config: AgentConfig) -> Result<Arc<Agent<N>>, AgentError> {
        config.validate()?;
        let db = Db::open(&config.data_dir)?;
        let mut records: BTreeMap<String, OverlayRecord> =
            db.overlays()?.into_iter().map(|r| (r.spec.name.clone(), r)).collect();
        let host = host_name();
        for spec in &config.overlays {
            let member = spec.member.clone().unwrap_or_else(|| host.clone());
            match records.get_mut(&spec.name) {
                Some(rec) => {
                    rec.spec = OverlaySpec {
                        keys: Vec::new(),
                        ..spec.clone()
                    };
                    rec.member = member;
                    if rec.keys.is_empty() && !spec.keys.is_empty() {
                        rec.keys = spec.keys.clone();
                    } else if !rec.keys.is_empty() && spec.keys.first() != rec.keys.first() {
                        tracing::info!(overlay = %spec.name, "using the keyring kept in the data directory");
                    }
                }
                None => {
                    records.insert(spec.name.clone(), OverlayRecord::new(spec.clone(), member));
                }
            }
        }
        if records.is_empty() {
            let mut spec = OverlaySpec::named("default");
            spec.keys = vec![config::generate_key()];
            tracing::info!("no overlay configured: starting `default` with a new key (see `rumormill keys export`)");
            records.insert(spec.name.clone(), OverlayRecord::new(spec, host.clone()));
        }
        let agent = Arc::new_cyclic(|me| Agent {
            net,
            db,
            host,
            overlays: Mutex::new(BTreeMap::new()),
            events_lock: Mutex::new(()),
            me: me.clone(),
        });
        for (_, rec) in records {
            let mut overlays = agent.overlays.lock().await;
            let running = agent.launch(rec).await?;
            overlays.insert(running.record.spec.name.clone(), running);
        }
        Ok(agent)
    }

    /// Starts an overlay from its record: next boot epoch (saved first),
    /// sockets, seeds, discovery, rack.
    async fn launch(&self, mut rec: OverlayRecord) -> Result<Running, AgentError> {
        let spec = rec.spec.clone();
        let name = spec.name.clone();
        let config = spec.core_config()?;
        let security = security(&rec)?;
        let bind = spec.bind_addr()?;
        let advertise = spec.advertise_addr()?;
        rec.epoch += 1;
        self.db.put_overlay(&rec)?;
        let identity_name = rec.member.clone();
        let epoch = rec.epoch;
        let overlay_id = rumormill_wire::overlay_id(&name);
        let mut options = DriverOptions::new(bind);
        options.advertise = advertise;
        options.streams.max_frame = config.max_stream_frame;
        options.label = name.clone();
        options.event_stream = true;
        // Fresh from the operating system at every start: it also draws the
        // life salt that keeps nonces unique if the stored epoch is lost.
        let seed = rand::random::<u64>();
        let restore = self.prepare_restore(&name, &rec.topics)?;
        let keyring = crate::keyring::keyring_of(&rec);
        let handle = Driver::start(self.net.clone(), options, move |addr| {
            let now = tokio::time::Instant::now().into_std();
            let identity = Identity::new(identity_name, addr, epoch);
            let mut overlay = Overlay::with_overlay_id(config, identity, security, seed, now, overlay_id);
            restore.apply(&mut overlay, now);
            if let Some(k) = &keyring {
                // The report goes out; a refusal (a key of another length
                // than its suite's, say) leaves the keys given to `new`.
                let _ = overlay.restore_keyring(now, wall(), k);
            }
            overlay
        })
        .await
        .map_err(|source| AgentError::Bind {
            overlay: name.clone(),
            addr: bind,
            source,
        })?;
        tracing::info!(overlay = %name, member = %rec.member, addr = %handle.addr(), epoch, "overlay started");
        if let Some(rack) = spec.rack.clone() {
            let key = rack_key(&rec.member);
            let _ = handle
                .call(move |o, now| o.put(now, wall(), &key, rumormill_core::reserved::Rack(rack).encode()))
                .await;
        }
        let topics = Arc::new(std::sync::Mutex::new(rec.topics.clone()));
        let mut running = Running {
            record: rec,
            handle,
            left: false,
            tasks: Vec::new(),
            feed: tokio::sync::broadcast::channel(4096).0,
            topics,
            inbox: Arc::default(),
        };
        // Subscribed before the join starts, so that its first sync cannot
        // slip by unseen.
        let events = running.handle.subscribe();
        if self.start_tasks(&mut running).await {
            wait_for_store(&name, &running.handle, events).await;
        }
        Ok(running)
    }

    /// Seeds (joined at once, DNS ones re-resolved), saved peers, multicast
    /// discovery. True when there is someone to join.
    async fn start_tasks(&self, running: &mut Running) -> bool {
        let spec = &running.record.spec;
        let handle = running.handle.clone();
        let (mut statics, mut dns) = (Vec::new(), Vec::new());
        for seed in spec.seeds.iter().filter_map(|s| config::parse_seed(s).ok()) {
            match seed {
                Seed::Addr(a) => statics.push(a),
                Seed::Dns(host, port) => dns.push((host, port)),
            }
        }
        let mut first: Vec<SocketAddr> = statics.clone();
        first.extend(running.record.peers.iter().copied());
        first.retain(|a| *a != handle.addr());
        let joining = !first.is_empty() || !dns.is_empty();
        let net = self.net.clone();
        let refresh = spec.dns_refresh;
        running
            .tasks
            .push(tokio::spawn(seed_loop(net, handle.clone(), dns, first, refresh)));
        if let Some(m) = spec.multicast.clone() {
            let name = spec.name.clone();
            running
                .tasks
                .push(tokio::spawn(crate::discovery::multicast(name, m, handle.clone())));
        }
        if !running.record.keys.is_empty() {
            let watcher = crate::keyring::watch(self.me.clone(), spec.name.clone(), handle.clone());
            running.tasks.push(tokio::spawn(watcher));
        }
        let pump = crate::events::pump(
            self.me.clone(),
            spec.name.clone(),
            handle.clone(),
            running.topics.clone(),
            running.feed.clone(),
            running.inbox.clone(),
            spec.limits.inbox_bytes(),
        );
        running.tasks.push(tokio::spawn(pump));
        let me = self.me.clone();
        let name = spec.name.clone();
        running.tasks.push(tokio::spawn(async move {
            let mut saved: Vec<SocketAddr> = Vec::new();
            loop {
                tokio::time::sleep(PEERS_SAVE_INTERVAL).await;
                let Ok(mut peers) = handle
                    .call(|o, _| {
                        let me = o.local_addr();
                        o.members()
                            .filter(|m| m.state.is_live() && m.addr != me)
                            .map(|m| m.addr)
                            .collect::<Vec<_>>()
                    })
                    .await
                else {
                    return;
                };
                peers.sort();
                // Keep the last known peers when everyone seems gone: they
                // are the way back after a restart.
                if peers != saved && !peers.is_empty() {
                    let Some(agent) = me.upgrade() else { return };
                    agent.save_peers(&name, peers.clone()).await;
                    saved = peers;
                }
            }
        }));
        joining
    }

    async fn save_peers(&self, name: &str, peers: Vec<SocketAddr>) {
        let mut overlays = self.overlays.lock().await;
        if let Some(r) = overlays.get_mut(name) {
            r.record.peers = peers;
            if let Err(e) = self.db.put_overlay(&r.record) {
                tracing::warn!(overlay = %name, error = %e, "peers not saved");
            }
        }
    }

    /// Names of the overlays.
    pub async fn overlay_names(&self) -> Vec<String> {
        self.overlays.lock().await.keys().cloned().collect()
    }

    /// A running overlay's handle.
    pub async fn handle(&self, name: &str) -> Result<OverlayHandle, AgentError> {
        let overlays = self.overlays.lock().await;
        let r = overlays
            .get(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        if r.left {
            return Err(has_left(name));
        }
        Ok(r.handle.clone())
    }

    async fn call<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Overlay, std::time::Instant) -> T + Send + 'static,
    ) -> Result<T, AgentError> {
        let handle = self.handle(name).await?;
        handle.call(f).await.map_err(|Stopped| stopped(name))
    }

    /// Summary of one overlay.
    pub async fn overlay(&self, name: &str) -> Result<OverlaySummary, AgentError> {
        let (rec, handle, left, inbox) = {
            let overlays = self.overlays.lock().await;
            let r = overlays
                .get(name)
                .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
            (r.record.clone(), r.handle.clone(), r.left, r.inbox.clone())
        };
        let t = handle.transport_stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut stats = OverlayStats {
            send_errors: load(&t.send_errors),
            stream_errors: load(&t.stream_errors),
            streams_dropped: load(&t.streams_dropped),
            connections_refused: load(&t.connections_refused),
            connections_evicted: load(&t.connections_evicted),
            frames_refused: load(&t.frames_refused),
            inbox_evicted: load(&inbox.evicted),
            inbox_refused: load(&inbox.refused),
            inbox_over_cap: load(&inbox.over_cap),
            ..OverlayStats::default()
        };
        let live = if left {
            0
        } else {
            let (live, s, values, d) = handle
                .call(|o, _| {
                    (
                        o.live_count(),
                        o.stats().clone(),
                        o.store().len(),
                        o.dissemination_stats(),
                    )
                })
                .await
                .unwrap_or_default();
            stats.quota_refused = d.quota_refused;
            stats.luggage_refused = d.luggage_refused;
            stats.datagrams_sent = s.datagrams_sent;
            stats.datagrams_received = s.datagrams_received;
            stats.frames_sent = s.frames_sent;
            stats.frames_received = s.frames_received;
            stats.rejected = s.rejected;
            stats.last_rejection = s.last_rejection.map(|e| e.to_string());
            stats.malformed = s.malformed;
            stats.refutations = s.refutations;
            stats.values = values;
            live
        };
        let mut spec = rec.spec.clone();
        spec.keys = rec.keys.iter().map(|_| String::new()).collect(); // masked below
        Ok(OverlaySummary {
            name: name.to_owned(),
            member: rec.member.clone(),
            addr: handle.addr(),
            epoch: rec.epoch,
            encrypted: !rec.keys.is_empty(),
            status: if left { "left" } else { "running" }.into(),
            live_members: live,
            spec: spec.masked(),
            stats,
        })
    }

    /// Creates and starts an overlay.
    pub async fn create_overlay(&self, spec: OverlaySpec) -> Result<OverlaySummary, AgentError> {
        spec.validate()?;
        let name = spec.name.clone();
        {
            let mut overlays = self.overlays.lock().await;
            if overlays.contains_key(&name) {
                return Err(AgentError::OverlayExists(name));
            }
            let member = spec.member.clone().unwrap_or_else(|| self.host.clone());
            let running = self.launch(OverlayRecord::new(spec, member)).await?;
            overlays.insert(name.clone(), running);
        }
        self.overlay(&name).await
    }

    /// Replaces an overlay's settings and restarts it (a new boot epoch; the
    /// keyring is kept, the spec's `keys` must be empty).
    pub async fn update_overlay(&self, name: &str, spec: OverlaySpec) -> Result<OverlaySummary, AgentError> {
        if spec.name != name {
            return Err(AgentError::BadRequest(format!(
                "the body names overlay {:?}, the path {name:?}; overlays cannot be renamed",
                spec.name
            )));
        }
        if !spec.keys.is_empty() {
            return Err(AgentError::BadRequest(
                "keys cannot be changed by an update: use the keys endpoints".into(),
            ));
        }
        {
            let mut overlays = self.overlays.lock().await;
            let r = overlays
                .get_mut(name)
                .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
            if spec.member.as_ref().is_some_and(|m| *m != r.record.member) {
                return Err(AgentError::BadRequest(format!(
                    "the member name ({:?}) is the member's identity and cannot change: delete and create the overlay",
                    r.record.member
                )));
            }
            if r.left {
                return Err(has_left(name));
            }
            let mut check = spec.clone();
            check.keys = r.record.keys.clone();
            check.plaintext = r.record.keys.is_empty();
            if spec.plaintext != check.plaintext {
                return Err(AgentError::BadRequest(
                    "plaintext cannot be changed on a running overlay: delete and create it".into(),
                ));
            }
            check.validate()?;
            crate::keyring::refresh(self, r).await?;
            r.stop_tasks();
            r.handle.shutdown(false).await;
            let old = r.record.clone();
            let mut rec = old.clone();
            rec.spec = spec;
            match self.launch(rec).await {
                Ok(running) => *r = running,
                Err(e) => {
                    // Back to the old settings, so that a bad update (a port
                    // in use, say) does not take the overlay down; should
                    // that fail too, it counts as left and `join` retries.
                    match self.launch(old).await {
                        Ok(running) => *r = running,
                        Err(again) => {
                            r.left = true;
                            tracing::error!(overlay = %name, error = %again, "overlay stopped: the old settings failed too");
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.overlay(name).await
    }

    /// Leaves gracefully, stops and forgets an overlay.
    pub async fn delete_overlay(&self, name: &str) -> Result<(), AgentError> {
        // Out of the table first: the graceful leave (up to 5 s) runs
        // without holding up requests about other overlays.
        let mut r = self
            .overlays
            .lock()
            .await
            .remove(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        self.db.delete_overlay(name)?;
        r.stop_tasks();
        r.handle.shutdown(!r.left).await;
        tracing::info!(overlay = %name, "overlay deleted");
        Ok(())
    }

    /// The member list, local member first then by name.
    pub async fn members(&self, name: &str) -> Result<Vec<MemberRow>, AgentError> {
        let rows = self
            .call(name, |o, _| {
                let local = o.local();
                let mut all: Vec<MemberInfo> = o.members().filter(|m| m.name != local.name).collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all.insert(0, local.clone());
                all.into_iter()
                    .map(|m| {
                        let rack = o
                            .store()
                            .get(&rack_key(&m.name))
                            .filter(|u| rumormill_core::reserved::from_owner(u))
                            .and_then(|u| rumormill_core::reserved::Rack::decode(u.value.as_deref()?).ok())
                            .map(|r| r.0);
                        MemberRow {
                            local: m.name == local.name,
                            name: m.name.to_string(),
                            addr: m.addr,
                            state: state_name(m.state).into(),
                            incarnation: m.incarnation,
                            epoch: m.epoch,
                            rack,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(rows)
    }

    /// Joins members at `addrs`. After a leave, restarts the overlay first.
    pub async fn join(&self, name: &str, addrs: Vec<SocketAddr>) -> Result<(), AgentError> {
        if addrs.is_empty() {
            return Err(AgentError::BadRequest("give at least one address to join".into()));
        }
        {
            let mut overlays = self.overlays.lock().await;
            let r = overlays
                .get_mut(name)
                .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
            if r.left {
                let running = self.launch(r.record.clone()).await?;
                *r = running;
            }
        }
        self.call(name, move |o, now| o.join(now, &addrs))
            .await?
            .map_err(core_error)
    }

    /// Leaves an overlay gracefully; it stays configured and rejoins on
    /// `join` or at the next start.
    pub async fn leave(&self, name: &str) -> Result<(), AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = overlays
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        if r.left {
            return Err(AgentError::Conflict(format!("already left overlay {name:?}")));
        }
        crate::keyring::refresh(self, r).await?;
        r.stop_tasks();
        r.handle.shutdown(true).await;
        r.left = true;
        tracing::info!(overlay = %name, "left");
        Ok(())
    }

    /// Writes a value.
    pub async fn put(&self, name: &str, key: &str, value: Vec<u8>) -> Result<UpdateRow, AgentError> {
        check_user_key(key)?;
        let key = key.to_owned();
        self.call(name, move |o, now| {
            o.put(now, wall(), &key, value).map(|u| update_row(&u))
        })
        .await?
        .map_err(core_error)?
        .ok_or_else(|| AgentError::BadRequest("the write stored no value".into()))
    }

    /// Reads a value.
    pub async fn get(&self, name: &str, key: &str) -> Result<UpdateRow, AgentError> {
        check_user_key(key)?;
        let k = key.to_owned();
        self.call(name, move |o, _| o.store().get(&k).and_then(update_row))
            .await?
            .ok_or_else(|| AgentError::UnknownKey(key.to_owned()))
    }

    /// Deletes a value.
    pub async fn delete(&self, name: &str, key: &str) -> Result<(), AgentError> {
        check_user_key(key)?;
        let k = key.to_owned();
        let deleted = self
            .call(name, move |o, now| {
                if o.store().value(&k).is_none() {
                    return Ok(false);
                }
                o.delete(now, wall(), &k).map(|_| true)
            })
            .await?
            .map_err(core_error)?;
        if deleted {
            Ok(())
        } else {
            Err(AgentError::UnknownKey(key.to_owned()))
        }
    }

    /// Luggage of every live member (or of one), as (member, key, value).
    pub async fn luggage(
        &self,
        name: &str,
        member: Option<String>,
    ) -> Result<Vec<(String, String, Vec<u8>)>, AgentError> {
        self.call(name, move |o, _| {
            let local = o.local();
            let names: Vec<String> = match member {
                Some(m) => vec![m],
                None => std::iter::once(local.name.to_string())
                    .chain(
                        o.members()
                            .filter(|m| m.state.is_live() && m.name != local.name)
                            .map(|m| m.name.to_string()),
                    )
                    .collect(),
            };
            names
                .into_iter()
                .flat_map(|n| o.luggage(&n).into_iter().map(move |(k, v)| (n.clone(), k, v)))
                .collect()
        })
        .await
    }

    /// Sets one of the local member's luggage entries.
    pub async fn set_luggage(&self, name: &str, key: &str, value: Vec<u8>) -> Result<(), AgentError> {
        let key = key.to_owned();
        self.call(name, move |o, now| o.set_luggage(now, wall(), &key, value))
            .await?
            .map_err(core_error)
    }

    /// Deletes one of the local member's luggage entries.
    pub async fn delete_luggage(&self, name: &str, key: &str) -> Result<(), AgentError> {
        let k = key.to_owned();
        let existed = self
            .call(name, move |o, now| o.delete_luggage(now, wall(), &k))
            .await?
            .map_err(core_error)?;
        if existed {
            Ok(())
        } else {
            Err(AgentError::NotFound(format!(
                "this member has no luggage under {key:?}"
            )))
        }
    }

    /// Every value (not deleted), by key; the agent's own keys left out.
    pub async fn list(&self, name: &str, prefix: Option<String>) -> Result<Vec<UpdateRow>, AgentError> {
        let mut rows = self
            .call(name, move |o, _| {
                o.store()
                    .iter()
                    .filter(|u| !u.key.starts_with(RESERVED_PREFIX))
                    .filter(|u| prefix.as_deref().is_none_or(|p| u.key.starts_with(p)))
                    .filter_map(update_row)
                    .collect::<Vec<_>>()
            })
            .await?;
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(rows)
    }

    /// Stops every overlay (with `leave`, leaving gracefully first, all at
    /// once).
    pub async fn shutdown(&self, leave: bool) {
        let mut overlays = self.overlays.lock().await;
        let mut stops = Vec::new();
        for r in overlays.values_mut() {
            if let Err(e) = crate::keyring::refresh(self, r).await {
                tracing::warn!(overlay = %r.record.spec.name, error = %e, "keyring not saved");
            }
            r.stop_tasks();
            let handle = r.handle.clone();
            let leave = leave && !r.left;
            stops.push(tokio::spawn(async move { handle.shutdown(leave).await }));
        }
        for s in stops {
            let _ = s.await;
        }
        overlays.clear();
    }
}

pub(crate) fn running_mut<'a>(
    overlays: &'a mut BTreeMap<String, Running>,
    name: &str,
) -> Result<&'a mut Running, AgentError> {
    let r = overlays
        .get_mut(name)
        .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
    if r.left {
        return Err(has_left(name));
    }
    Ok(r)
}

/// Ok if the overlay exists (left or not).
pub(crate) async fn has_left_or_unknown<N: Net>(agent: &Agent<N>, name: &str) -> Result<(), AgentError> {
    if agent.overlays.lock().await.contains_key(name) {
        Ok(())
    } else {
        Err(AgentError::UnknownOverlay(name.to_owned()))
    }
}

fn has_left(name: &str) -> AgentError {
    AgentError::Conflict(format!("the member has left overlay {name:?}; join again to come back"))
}

/// The overlay's task ended under a request (it was deleted meanwhile).
pub(crate) fn stopped(name: &str) -> AgentError {
    AgentError::Conflict(format!("overlay {name:?} stopped while the request ran"))
}

pub(crate) fn plaintext(name: &str) -> AgentError {
    AgentError::Conflict(format!("overlay {name:?} is plaintext: it has no keyring"))
}

pub(crate) fn core_error(e: CoreError) -> AgentError {
    match e {
        CoreError::Left => AgentError::Conflict("the member has left the overlay".into()),
        CoreError::Quota(q) => AgentError::Quota(q.to_string()),
        other => AgentError::BadRequest(other.to_string()),
    }
}

fn security(rec: &OverlayRecord) -> Result<Security, AgentError> {
    let name = &rec.spec.name;
    let Some((primary, rest)) = rec.keys.split_first() else {
        return if rec.spec.plaintext {
            rec.spec.check_plaintext_bind()?;
            Ok(Security::Plaintext)
        } else {
            Err(AgentError::Config(ConfigError::Invalid {
                overlay: name.clone(),
                message: "no key: give one (`rumormill keygen` makes one) or set plaintext = true".into(),
            }))
        };
    };
    let invalid = |m: String| {
        AgentError::Config(ConfigError::Invalid {
            overlay: name.clone(),
            message: m,
        })
    };
    let mut ring = Keyring::new(&config::decode_key(primary).map_err(invalid)?).map_err(|e| invalid(e.to_string()))?;
    for k in rest {
        ring.install(&config::decode_key(k).map_err(invalid)?)
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(Security::Encrypted(ring))
}

fn check_user_key(key: &str) -> Result<(), AgentError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(AgentError::BadRequest("a key must have 1 to 1024 bytes".into()));
    }
    if key.starts_with(RESERVED_PREFIX) {
        return Err(AgentError::BadRequest(format!(
            "keys starting with {RESERVED_PREFIX:?} are reserved"
        )));
    }
    Ok(())
}

fn rack_key(member: &str) -> String {
    rumormill_core::reserved::ReservedKey::Rack {
        member: member.to_owned(),
    }
    .key()
}

fn update_row(u: &rumormill_core::broadcast::Update) -> Option<UpdateRow> {
    let value = u.value.as_ref()?;
    Some(UpdateRow {
        key: u.key.clone(),
        value: std::str::from_utf8(value).ok().map(str::to_owned),
        value_base64: base64::engine::general_purpose::STANDARD.encode(value),
        origin: u.origin.to_string(),
        lamport: u.lamport,
    })
}

/// A member state's name in the API.
pub fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Failed => "failed",
        MemberState::Left => "left",
    }
}

/// The host name (the default member name).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rumormill".to_owned())
}

/// Joins the seeds and saved peers at start, then keeps the overlay's seed
/// list (those plus DNS names resolved every `refresh`) up to date; the core
/// re-contacts seeds whenever none of them is seen alive.
async fn seed_loop<N: Net>(
    net: N,
    handle: OverlayHandle,
    dns: Vec<(String, u16)>,
    first: Vec<SocketAddr>,
    refresh: Duration,
) {
    let mut joined = !first.is_empty();
    let known: BTreeSet<SocketAddr> = first.iter().copied().collect();
    if joined {
        let _ = handle.call(move |o, now| o.join(now, &first)).await;
    }
    let mut last: BTreeSet<SocketAddr> = BTreeSet::new();
    loop {
        let mut all = known.clone();
        for (host, port) in &dns {
            match net.resolve(host, *port).await {
                Ok(addrs) => all.extend(addrs),
                Err(e) => tracing::warn!(seed = %host, error = %e, "seed not resolved"),
            }
        }
        all.remove(&handle.addr());
        if all != last {
            let seeds: Vec<SocketAddr> = all.iter().copied().collect();
            let join = !joined && !seeds.is_empty();
            joined |= join;
            if handle
                .call(move |o, now| {
                    if join {
                        let _ = o.join(now, &seeds);
                    } else {
                        o.set_seeds(seeds);
                    }
                })
                .await
                .is_err()
            {
                return;
            }
            last = all;
        }
        if dns.is_empty() {
            return;
        }
        tokio::time::sleep(refresh).await;
    }
}

/// Longest wait at start for a first sync of the replicated store.
const STORE_SYNC_WAIT: Duration = Duration::from_secs(5);

/// Waits (at most [`STORE_SYNC_WAIT`]) until the core reports the first
/// sync of the replicated store after the join ([`Event::StoreSynced`]), so
/// that what depends on it — who subscribes to what, above all — is known
/// before the API opens: a restarted publisher would otherwise find no
/// subscribers for a while.
async fn wait_for_store(name: &str, handle: &OverlayHandle, mut events: tokio::sync::broadcast::Receiver<Event>) {
    use tokio::sync::broadcast::error::RecvError;
    let synced = async {
        loop {
            match events.recv().await {
                Ok(Event::StoreSynced) => return,
                Ok(_) => {}
                // Too many events at once: the notice may be among those
                // dropped, so ask the store itself.
                Err(RecvError::Lagged(_)) => {
                    if handle
                        .call(|o, _| o.dissemination_stats().syncs > 0)
                        .await
                        .unwrap_or(true)
                    {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    };
    if tokio::time::timeout(STORE_SYNC_WAIT, synced).await.is_err() {
        tracing::warn!(overlay = %name, "no peer answered within 5 s: starting with what this member knows");
    }
}

/// The wall clock, which the core takes with every write (see
/// [`rumormill_core::WallTime`]).
pub(crate) fn wall() -> WallTime {
    WallTime::from(std::time::SystemTime::now())
}

/// Wall-clock milliseconds, for the timestamps the agent keeps itself.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
