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
use rumormill_core::{CoreError, Identity, MemberInfo, MemberState, Notification, Overlay, Security, WallTime};
use rumormill_wire::Keyring;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::config::{self, AgentConfig, ConfigError, OverlaySpec, Seed};
use crate::driver::{Driver, DriverOptions, OverlayHandle, Stopped};
/// What the data directory can fail with.
pub use crate::persist::PersistError;
use crate::persist::{Db, OverlayRecord};
use crate::transport::Net;

/// Keys under this prefix are the members' own data (racks, subscriptions,
/// luggage, keyrings); clients cannot write them.
pub use rumormill_core::reserved::PREFIX as RESERVED_PREFIX;
/// How often the peers seen alive are saved for the next start.
const PEERS_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// What an agent operation can fail with, in the agent's own terms; the
/// HTTP API alone maps each to a status (`api.rs`). An operation that
/// fails changed nothing, unless its variant says otherwise.
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
    /// The local member has no luggage under that key.
    #[error("this member has no luggage under {0:?}")]
    UnknownLuggage(String),
    /// This agent published no at-least-once event with that id.
    #[error("no at-least-once event {0:?} published by this agent")]
    UnknownEvent(String),
    /// The agent does not subscribe to that topic.
    #[error("the agent does not subscribe to {0:?}")]
    NotSubscribed(String),
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A join names no address.
    #[error("give at least one address to join")]
    NoAddresses,
    /// An update asks for what only a delete and a create can do.
    #[error(transparent)]
    Update(#[from] UpdateRefused),
    /// A value's key that clients may not use.
    #[error(transparent)]
    ValueKey(#[from] ValueKeyRefused),
    /// The topic is one of the agent's local ones.
    #[error("topic {0:?} is the agent's own: it cannot be published")]
    LocalTopic(String),
    /// A rack name that breaks the rules (the message says which).
    #[error("{0}")]
    InvalidRack(String),
    /// The topic's name is invalid (the message says why).
    #[error("{0}")]
    InvalidTopic(String),
    /// The delivery settings are invalid (the message says why).
    #[error("{0}")]
    InvalidDelivery(String),
    /// The member has left the overlay; `join` brings it back.
    #[error("the member has left overlay {0:?}; join again to come back")]
    Left(String),
    /// A leave of an overlay that had left already.
    #[error("already left overlay {0:?}")]
    AlreadyLeft(String),
    /// The overlay did not start at the agent's start: a record it needs
    /// does not decode (the message says which, and what to do).
    #[error("overlay {overlay:?} did not start: {reason}")]
    NotStarted {
        /// The overlay.
        overlay: String,
        /// Why.
        reason: String,
    },
    /// The overlay stopped while the request ran (it was deleted
    /// meanwhile); what the request did before is not undone.
    #[error("overlay {0:?} stopped while the request ran")]
    Stopped(String),
    /// A key operation on a plaintext overlay.
    #[error("overlay {0:?} is plaintext: it has no keyring")]
    Plaintext(String),
    /// The core refused the operation: the member has left, a quota, an
    /// invalid argument.
    #[error("{}", core_message(.0))]
    Core(CoreError),
    /// A write the core took but that stored no value.
    #[error("the write stored no value")]
    NothingStored,
    /// A key operation was refused (see [`crate::keyring::KeyError`]).
    #[error(transparent)]
    Key(#[from] crate::keyring::KeyError),
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
    /// The data directory failed. What the operation did before its write
    /// stays done: a publication's event is out (its record, and so its
    /// resends after a restart, may be missing); a keyring change or a
    /// subscription holds in the core and in memory, and is written with
    /// the overlay's next save of its record.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// What an update of an overlay's settings cannot change.
#[derive(Debug, thiserror::Error)]
pub enum UpdateRefused {
    /// The body names another overlay than the path.
    #[error("the body names overlay {body:?}, the path {path:?}; overlays cannot be renamed")]
    Rename {
        /// The name in the body.
        body: String,
        /// The name in the path.
        path: String,
    },
    /// The spec carries keys.
    #[error("keys cannot be changed by an update: use the keys endpoints")]
    Keys,
    /// The member name differs (it is the member's identity).
    #[error("the member name ({0:?}) is the member's identity and cannot change: delete and create the overlay")]
    Member(String),
    /// Plaintext would be switched on or off.
    #[error("plaintext cannot be changed on a running overlay: delete and create it")]
    Plaintext,
}

/// Why a client may not use a value's key.
#[derive(Debug, thiserror::Error)]
pub enum ValueKeyRefused {
    /// Empty, or longer than 1024 bytes.
    #[error("a key must have 1 to 1024 bytes")]
    Length,
    /// Under the reserved prefix.
    #[error("keys starting with {RESERVED_PREFIX:?} are reserved")]
    Reserved,
}

/// The message of a core error, as the agent says it.
fn core_message(e: &CoreError) -> String {
    match e {
        CoreError::Left => "the member has left the overlay".into(),
        other => other.to_string(),
    }
}

/// One row of a member list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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

/// One rack as this member knows it (`GET …/racks`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RackRow {
    /// The rack's name.
    pub name: String,
    /// Its active gateway, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The gateway's Raft term (0: no gateway known).
    pub term: u64,
    /// The gateway candidates and their Raft roles (`leader`, `follower`,
    /// `candidate`, `pre-candidate`, `unknown`).
    pub candidates: Vec<CandidateRow>,
    /// Members alive.
    pub alive: usize,
    /// Members suspect.
    pub suspect: usize,
    /// Members failed.
    pub failed: usize,
    /// Seconds since the rack was last heard from (its gateway's latest
    /// report; 0 for this member's own rack), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_s: Option<f64>,
    /// Whether this is the local member's rack.
    pub local: bool,
}

/// A gateway candidate of a rack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CandidateRow {
    /// Member name.
    pub name: String,
    /// Its Raft role, as known here.
    pub role: String,
}

/// A member of any rack (`GET …/members?rack=R` or `?all_racks=true`):
/// those of this member's rack as it sees them, those of other racks as
/// their gateway reports them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RackMemberRow {
    /// Name.
    pub name: String,
    /// Its rack (none for a member that announced none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// `alive`, `suspect`, `failed` or `left`: seen here for this member's
    /// rack, as the gateway reports it for the others.
    pub state: String,
    /// Gossip address (members of this member's rack only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub addr: Option<SocketAddr>,
    /// Age in seconds of the gateway report that gave the state (members
    /// of other racks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_age_s: Option<f64>,
    /// Whether this is the local member.
    pub local: bool,
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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
    /// `running`, `left` or `stopped` (it did not start: see `error`); in
    /// a listing also `starting` or `busy` (a start, or another change,
    /// under way: the rest is as last seen).
    pub status: String,
    /// Members alive or suspect, including the local one.
    pub live_members: usize,
    /// Settings, keys masked.
    pub spec: OverlaySpec,
    /// Protocol and transport counters.
    pub stats: OverlayStats,
    /// Why the overlay is `stopped`: it did not start (see
    /// [`AgentError::NotStarted`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counters of one overlay.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
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

/// The gate of one overlay life's writes to the data directory: its event
/// commits (the pump's), its publications' records and its record saves
/// pass it one at a time, each holding it until its commit has finished on
/// its blocking thread — a cancelled or aborted writer included. Closing
/// it waits for the write in flight and keeps every later one out: only
/// then are the overlay's rows deleted, or read again for a restart, so
/// that nothing of the old life lands after that.
#[derive(Debug, Clone)]
pub(crate) struct WriteGate {
    /// True while open.
    open: Arc<Mutex<bool>>,
    /// The version of the record last saved through the gate.
    saved: Arc<std::sync::atomic::AtomicU64>,
}

/// Passage through a [`WriteGate`]: the gate is held while this lives.
pub(crate) type Passage = OwnedMutexGuard<bool>;

impl WriteGate {
    /// A gate of a new life, open.
    pub(crate) fn new() -> WriteGate {
        WriteGate {
            open: Arc::new(Mutex::new(true)),
            saved: Arc::default(),
        }
    }

    /// Waits for the write in flight; `None` once closed.
    pub(crate) async fn enter(&self) -> Option<Passage> {
        let passage = self.open.clone().lock_owned().await;
        (*passage).then_some(passage)
    }

    /// Waits for the write in flight and lets no other through.
    pub(crate) async fn close(&self) {
        *self.open.lock().await = false;
    }
}

/// A save of an overlay's record, taken under its slot's lock and written
/// after it is released (see [`Running::record_save`]).
pub(crate) struct RecordSave {
    record: OverlayRecord,
    version: u64,
    writes: WriteGate,
}

impl RecordSave {
    /// Writes the record through its life's gate, unless a newer one was
    /// saved meanwhile. Once through the gate the commit runs to its end,
    /// even if this future is dropped; dropped before, nothing is written
    /// — the record in memory holds the change, and the overlay's next
    /// save writes it. A closed gate saves nothing: the overlay was
    /// deleted, or restarted (and its start saved the record it holds in
    /// memory).
    pub(crate) async fn write(self, db: &Db) -> Result<(), PersistError> {
        let Some(passage) = self.writes.enter().await else {
            return Ok(());
        };
        db.put_overlay_newer(&self.record, passage, self.writes.saved.clone(), self.version)
            .await
    }
}

pub(crate) struct Running {
    pub(crate) record: OverlayRecord,
    pub(crate) handle: OverlayHandle,
    pub(crate) left: bool,
    tasks: Vec<JoinHandle<()>>,
    /// This life's writes (see [`WriteGate`]).
    pub(crate) writes: WriteGate,
    /// Counts the changes of `record`, so that a save that comes late
    /// never writes an older record over a newer one.
    version: u64,
    /// Live inbox entries for connected applications.
    pub(crate) feed: crate::inbox::InboxFeed,
    /// The agent's topics, as the event pump sees them.
    topics: Arc<std::sync::Mutex<Vec<String>>>,
    /// What the inbox's byte cap evicted and refused.
    inbox: Arc<crate::inbox::InboxCounters>,
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

    /// A save of the record as it is now (see [`RecordSave`]); the record
    /// in memory is the truth, whatever becomes of the save.
    pub(crate) fn record_save(&mut self) -> RecordSave {
        self.version += 1;
        RecordSave {
            record: self.record.clone(),
            version: self.version,
            writes: self.writes.clone(),
        }
    }

    /// Ends this life of the overlay: marked left first (a cancelled
    /// request must not leave a slot that claims to run a stopping
    /// driver), its tasks and driver stopped (leaving gracefully with
    /// `leave`), then its writes in flight waited for and no more let
    /// through (see [`WriteGate`]).
    async fn end(&mut self, leave: bool) {
        self.left = true;
        self.stop_tasks();
        self.handle.shutdown(leave).await;
        self.writes.close().await;
    }

    /// The record of the overlay's next life: the next boot epoch, counted
    /// in this record first, so that a start that is cancelled or fails
    /// never lets the following one reuse its epoch.
    fn next_life(&mut self) -> OverlayRecord {
        self.record.epoch += 1;
        self.record.clone()
    }
}

impl Drop for Running {
    /// The background tasks hold handles of the overlay; once they are gone
    /// (and the agent's own handle with this value), the driver stops.
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// One overlay's slot: its state behind a lock of its own. What takes
/// long on an overlay — starting it (binding, then up to 5 s for a first
/// sync of its store), leaving (up to 5 s), deleting it, saving its record
/// — holds this lock, so it holds up requests on this overlay only.
pub(crate) type Slot = Arc<Mutex<SlotState>>;

/// What a [`Slot`] holds.
pub(crate) enum SlotState {
    /// Reserved by a start that has not finished; the starter holds the
    /// lock. Anyone else who gets the lock and still finds this was left
    /// by an abandoned start: the overlay does not exist.
    Starting,
    /// Started: running, or left (stopped but still configured).
    Up(Box<Running>),
    /// Not started at the agent's start, for a record that does not decode
    /// (see [`AgentError::NotStarted`]); the other overlays run.
    Failed(Box<NotStarted>),
    /// Deleted, or its start failed: on its way out of the table. Whoever
    /// waited for the lock finds no overlay.
    Gone,
}

/// An overlay that did not start (see [`SlotState::Failed`]).
pub(crate) struct NotStarted {
    record: OverlayRecord,
    /// The table of the record that does not decode.
    table: &'static str,
    reason: String,
}

impl NotStarted {
    fn error(&self) -> AgentError {
        AgentError::NotStarted {
            overlay: self.record.spec.name.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// A locked slot that holds an overlay (see [`Agent::lock`]).
pub(crate) struct Held(OwnedMutexGuard<SlotState>);

impl std::ops::Deref for Held {
    type Target = Running;
    fn deref(&self) -> &Running {
        match &*self.0 {
            SlotState::Up(r) => r,
            SlotState::Starting | SlotState::Failed(_) | SlotState::Gone => {
                unreachable!("a slot is held only once found up")
            }
        }
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Running {
        match &mut *self.0 {
            SlotState::Up(r) => r,
            SlotState::Starting | SlotState::Failed(_) | SlotState::Gone => {
                unreachable!("a slot is held only once found up")
            }
        }
    }
}

/// A name reserved in the table for a start (see [`Agent::reserve`]):
/// filled with the started overlay, or — when the start fails or its
/// request is cancelled — marked gone and taken out of the table again.
struct Reservation<'a, N: Net> {
    agent: &'a Agent<N>,
    name: String,
    slot: Slot,
    guard: Option<OwnedMutexGuard<SlotState>>,
    /// For a new overlay (a create): the record its start saves goes from
    /// disk with it, before the name is free again — else the next start
    /// of the agent would bring back an overlay that never started.
    new_record: bool,
}

impl<N: Net> Reservation<'_, N> {
    fn fill(mut self, running: Running) {
        if let Some(mut guard) = self.guard.take() {
            *guard = SlotState::Up(Box::new(running));
        }
    }

    fn fail(mut self, failed: NotStarted) {
        if let Some(mut guard) = self.guard.take() {
            *guard = SlotState::Failed(Box::new(failed));
        }
    }
}

impl<N: Net> Drop for Reservation<'_, N> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        *guard = SlotState::Gone;
        let (name, slot) = (std::mem::take(&mut self.name), self.slot.clone());
        let cleanup = match (self.new_record, self.agent.me.upgrade()) {
            (true, Some(agent)) => tokio::runtime::Handle::try_current().ok().map(|rt| (rt, agent)),
            _ => None,
        };
        let Some((rt, agent)) = cleanup else {
            // Out of the table before the lock is released, so that a
            // waiter that finds it gone finds the name free.
            self.agent.unlist(&name, &slot);
            return;
        };
        // The slot stays locked in the table until the record is gone: a
        // create of the same name waits for that.
        rt.spawn(async move {
            if let Err(e) = agent.db.delete_overlay(&name).await {
                tracing::warn!(overlay = %name, error = %e, "the record of a failed start not deleted");
            }
            agent.unlist(&name, &slot);
            drop(guard);
        });
    }
}

/// Takes a slot out of the table when dropped (a delete, however it ends).
struct Unlist<'a, N: Net> {
    agent: &'a Agent<N>,
    name: &'a str,
    slot: &'a Slot,
    /// Whether to take it out.
    armed: bool,
}

impl<N: Net> Drop for Unlist<'_, N> {
    fn drop(&mut self) {
        if self.armed {
            self.agent.unlist(self.name, self.slot);
        }
    }
}

/// The agent.
pub struct Agent<N: Net> {
    net: N,
    pub(crate) db: Db,
    host: String,
    /// The overlays' slots by name. This lock is taken only to look up,
    /// insert or remove a slot, never across a wait.
    slots: std::sync::Mutex<BTreeMap<String, Slot>>,
    /// The last summary of each overlay in the table, for listings that
    /// do not wait for a busy overlay (see [`Agent::overlays`]).
    shown: std::sync::Mutex<BTreeMap<String, OverlaySummary>>,
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
        // Opening commits (a new file gets its format mark): off the runtime.
        let dir = config.data_dir.clone();
        let db = tokio::task::spawn_blocking(move || Db::open(&dir))
            .await
            .map_err(|e| PersistError::Io {
                path: config.data_dir.join(crate::persist::DB_FILE),
                reason: format!("the opening thread failed: {e}"),
            })??;
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
            slots: std::sync::Mutex::new(BTreeMap::new()),
            shown: std::sync::Mutex::new(BTreeMap::new()),
            me: me.clone(),
        });
        for (name, mut rec) in records {
            // In the table while it starts: its tasks (the keyring
            // watcher) look it up and wait for the start to finish.
            let reservation = agent.reserve(&name, false).await?;
            rec.epoch += 1;
            agent.show(starting(&rec));
            match agent.launch(rec.clone()).await {
                Ok(running) => reservation.fill(running),
                // This overlay alone stays stopped, its error shown.
                Err(AgentError::Persist(PersistError::Record {
                    path,
                    table,
                    key,
                    reason,
                })) => {
                    let advice = if table == crate::persist::RAFT_TABLE {
                        // Never a blank Raft state in its place: this
                        // candidate could vote twice in a term.
                        "without it this gateway candidate could vote twice in one Raft term: restore the data directory from a backup, or `delete` the overlay and create it again"
                    } else {
                        "`join` starts it with an empty de-duplication window (events delivered before may be delivered again), `delete` forgets it"
                    };
                    let failed = NotStarted {
                        record: rec,
                        table,
                        reason: format!(
                            "its record {table}/{key} in {} does not decode ({reason}); {advice}",
                            path.display()
                        ),
                    };
                    tracing::error!(overlay = %name, error = %failed.error(), "overlay not started");
                    reservation.fail(failed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(agent)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        // Nothing panics while holding it (lookups and inserts only).
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn slot(&self, name: &str) -> Result<Slot, AgentError> {
        self.table()
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))
    }

    /// Takes `slot` out of the table if it is still the one under `name`.
    fn unlist(&self, name: &str, slot: &Slot) {
        let mut table = self.table();
        if table.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            table.remove(name);
            self.shown().remove(name);
        }
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OverlaySummary>> {
        // Nothing panics while holding it (lookups and inserts only).
        self.shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `summary` as its overlay's last one.
    fn show(&self, summary: OverlaySummary) {
        self.shown().insert(summary.name.clone(), summary);
    }

    /// An overlay's slot, locked, when it holds one (left or not). Waits
    /// only for what is under way on this overlay (a start, a leave, a
    /// delete, a record being saved).
    pub(crate) async fn lock(&self, name: &str) -> Result<Held, AgentError> {
        let guard = self.slot(name)?.lock_owned().await;
        match &*guard {
            SlotState::Up(_) => Ok(Held(guard)),
            SlotState::Failed(f) => Err(f.error()),
            SlotState::Starting | SlotState::Gone => Err(AgentError::UnknownOverlay(name.to_owned())),
        }
    }

    /// Like [`Agent::lock`], for an overlay that has not left.
    pub(crate) async fn lock_running(&self, name: &str) -> Result<Held, AgentError> {
        let held = self.lock(name).await?;
        if held.left {
            return Err(has_left(name));
        }
        Ok(held)
    }

    /// Reserves `name` for a start: a new slot, locked, in the table. An
    /// overlay of that name is refused; a delete of it under way is waited
    /// for, and then the name is free. `new_record`: the start is a
    /// create (see [`Reservation`]).
    async fn reserve(&self, name: &str, new_record: bool) -> Result<Reservation<'_, N>, AgentError> {
        loop {
            let existing = {
                let mut table = self.table();
                match table.get(name) {
                    Some(slot) => slot.clone(),
                    None => {
                        let slot: Slot = Arc::new(Mutex::new(SlotState::Starting));
                        let Ok(guard) = slot.clone().try_lock_owned() else {
                            unreachable!("nobody else knows the new slot")
                        };
                        table.insert(name.to_owned(), slot.clone());
                        return Ok(Reservation {
                            agent: self,
                            name: name.to_owned(),
                            slot,
                            guard: Some(guard),
                            new_record,
                        });
                    }
                }
            };
            let state = existing.clone().lock_owned().await;
            match &*state {
                SlotState::Up(_) | SlotState::Failed(_) => return Err(AgentError::OverlayExists(name.to_owned())),
                // Deleted, or an abandoned start: make room and try again.
                SlotState::Starting | SlotState::Gone => self.unlist(name, &existing),
            }
        }
    }

    /// Starts an overlay from its record, which holds the boot epoch of
    /// this start (saved first): sockets, seeds, discovery, rack.
    async fn launch(&self, rec: OverlayRecord) -> Result<Running, AgentError> {
        let spec = rec.spec.clone();
        let name = spec.name.clone();
        let config = spec.core_config()?;
        let security = security(&rec)?;
        let bind = spec.bind_addr()?;
        let advertise = spec.advertise_addr()?;
        self.db.put_overlay(&rec).await?;
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
        let rack = spec.rack_spec(self.remote_seeds(&spec).await)?;
        if let Some(warning) = spec.candidates_warning() {
            tracing::warn!(overlay = %name, "{warning}");
        }
        let raft = match (&rack, self.db.raft(&name)?) {
            (Some(r), Some(record)) if r.gateway => Some(record),
            (_, Some(_)) => {
                tracing::warn!(overlay = %name, "a Raft record is kept but this member is no gateway candidate now: not used");
                None
            }
            (_, None) => None,
        };
        let handle = Driver::start(self.net.clone(), options, move |addr| {
            let now = tokio::time::Instant::now().into_std();
            let mut identity = Identity::new(identity_name, addr, epoch);
            if let Some(r) = rack {
                identity = identity.in_rack(r);
            }
            let mut overlay = Overlay::with_overlay_id(config, identity, security, seed, now, overlay_id);
            if let Some(record) = &raft {
                // Before the first input: the candidate's term and vote
                // come back before it can vote again.
                if let Err(e) = overlay.restore_raft(record) {
                    tracing::error!(member = %overlay.name(), error = %e, "the kept Raft record was refused");
                }
            }
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
        let topics = Arc::new(std::sync::Mutex::new(rec.topics.clone()));
        let mut running = Running {
            record: rec,
            handle,
            left: false,
            tasks: Vec::new(),
            writes: WriteGate::new(),
            version: 0,
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

    /// The addresses of `remote_seeds`, DNS names resolved once (one that
    /// does not resolve is left out, with a warning).
    async fn remote_seeds(&self, spec: &OverlaySpec) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for seed in spec.remote_seeds.iter().filter_map(|s| config::parse_seed(s).ok()) {
            match seed {
                Seed::Addr(a) => out.push(a),
                Seed::Dns(host, port) => match self.net.resolve(&host, port).await {
                    Ok(addrs) => out.extend(addrs),
                    Err(e) => {
                        tracing::warn!(overlay = %spec.name, seed = %host, error = %e, "remote seed not resolved")
                    }
                },
            }
        }
        out
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
        let pump = crate::inbox::pump(
            self.me.clone(),
            spec.name.clone(),
            handle.clone(),
            running.topics.clone(),
            running.feed.clone(),
            crate::inbox::WriterSetup {
                cap: spec.limits.inbox_bytes(),
                counters: running.inbox.clone(),
                writes: running.writes.clone(),
            },
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
        let save = match self.lock(name).await {
            Ok(mut r) => {
                r.record.peers = peers;
                r.record_save()
            }
            Err(_) => return,
        };
        if let Err(e) = save.write(&self.db).await {
            tracing::warn!(overlay = %name, error = %e, "peers not saved");
        }
    }

    /// Names of the overlays (those starting included).
    pub async fn overlay_names(&self) -> Vec<String> {
        self.table().keys().cloned().collect()
    }

    /// A running overlay's handle.
    pub async fn handle(&self, name: &str) -> Result<OverlayHandle, AgentError> {
        Ok(self.lock_running(name).await?.handle.clone())
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
        let r = match self.lock(name).await {
            Err(AgentError::NotStarted { .. }) => {
                let state = self.slot(name)?.lock_owned().await;
                return match &*state {
                    SlotState::Failed(f) => Ok(not_started(f)),
                    _ => Err(AgentError::UnknownOverlay(name.to_owned())),
                };
            }
            other => other?,
        };
        let summary = summary(&r).await;
        self.show(summary.clone());
        Ok(summary)
    }

    /// Summaries of every overlay, by name, without waiting for any: one
    /// busy with a start (`starting`) or another change (`busy`) is shown
    /// as last seen, with that status.
    pub async fn overlays(&self) -> Vec<OverlaySummary> {
        let slots: Vec<(String, Slot)> = self.table().iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        let mut out = Vec::with_capacity(slots.len());
        for (name, slot) in slots {
            match slot.try_lock_owned() {
                Ok(guard) => match &*guard {
                    SlotState::Up(r) => {
                        let summary = summary(r).await;
                        self.show(summary.clone());
                        out.push(summary);
                    }
                    SlotState::Failed(f) => out.push(not_started(f)),
                    // An abandoned start, or deleted meanwhile.
                    SlotState::Starting | SlotState::Gone => {}
                },
                Err(_) => {
                    if let Some(mut last) = self.shown().get(&name).cloned() {
                        if last.status != "starting" {
                            last.status = "busy".into();
                        }
                        out.push(last);
                    }
                }
            }
        }
        out
    }

    /// Creates and starts an overlay.
    pub async fn create_overlay(&self, spec: OverlaySpec) -> Result<OverlaySummary, AgentError> {
        spec.validate()?;
        let name = spec.name.clone();
        let reservation = self.reserve(&name, true).await?;
        let member = spec.member.clone().unwrap_or_else(|| self.host.clone());
        let mut rec = OverlayRecord::new(spec, member);
        rec.epoch += 1;
        self.show(starting(&rec));
        // A failed or cancelled start drops the reservation: its record
        // goes from disk, and then the name is free again.
        let running = self.launch(rec).await?;
        // Summed up before anyone waiting (a delete) can get at it.
        let summary = summary(&running).await;
        self.show(summary.clone());
        reservation.fill(running);
        Ok(summary)
    }

    /// Replaces an overlay's settings and restarts it (a new boot epoch; the
    /// keyring is kept, the spec's `keys` must be empty).
    pub async fn update_overlay(&self, name: &str, spec: OverlaySpec) -> Result<OverlaySummary, AgentError> {
        if spec.name != name {
            return Err(UpdateRefused::Rename {
                body: spec.name,
                path: name.to_owned(),
            }
            .into());
        }
        if !spec.keys.is_empty() {
            return Err(UpdateRefused::Keys.into());
        }
        {
            let mut r = self.lock(name).await?;
            if spec.member.as_ref().is_some_and(|m| *m != r.record.member) {
                return Err(UpdateRefused::Member(r.record.member.clone()).into());
            }
            if r.left {
                return Err(has_left(name));
            }
            let mut check = spec.clone();
            check.keys = r.record.keys.clone();
            check.plaintext = r.record.keys.is_empty();
            if spec.plaintext != check.plaintext {
                return Err(UpdateRefused::Plaintext.into());
            }
            check.validate()?;
            if let Some(save) = crate::keyring::refresh(&mut r).await {
                save.write(&self.db).await?;
            }
            r.end(false).await;
            let mut rec = r.next_life();
            rec.spec = spec;
            match self.launch(rec).await {
                Ok(running) => *r = running,
                Err(e) => {
                    // Back to the old settings, so that a bad update (a port
                    // in use, say) does not take the overlay down; should
                    // that fail too, it stays left and `join` retries. The
                    // epoch of the failed start is taken again: a launch
                    // fails only before its driver starts, so nothing was
                    // sent under it.
                    match self.launch(r.record.clone()).await {
                        Ok(running) => *r = running,
                        Err(again) => {
                            tracing::error!(overlay = %name, error = %again, "overlay stopped: the old settings failed too");
                        }
                    }
                    return Err(e);
                }
            }
            Ok(summary(&r).await)
        }
    }

    /// Leaves gracefully, stops and forgets an overlay. It runs on a task
    /// of its own: a cancelled request does not leave it half done (gone
    /// from the table, still on disk).
    pub async fn delete_overlay(&self, name: &str) -> Result<(), AgentError> {
        let Some(agent) = self.me.upgrade() else {
            return self.delete_now(name).await;
        };
        let owned = name.to_owned();
        tokio::spawn(async move { agent.delete_now(&owned).await })
            .await
            .unwrap_or_else(|_| Err(stopped(name)))
    }

    async fn delete_now(&self, name: &str) -> Result<(), AgentError> {
        // The slot stays in the table, locked, until the overlay is stopped
        // and gone from the database: a create of the same name waits for
        // that, then starts afresh. Other overlays are not held up.
        let slot = self.slot(name)?;
        let mut state = slot.clone().lock_owned().await;
        if matches!(*state, SlotState::Failed(_)) {
            // Never started: nothing runs, nothing writes.
            self.db.delete_overlay(name).await?;
            *state = SlotState::Gone;
            self.unlist(name, &slot);
            tracing::info!(overlay = %name, "overlay deleted");
            return Ok(());
        }
        let SlotState::Up(mut r) = std::mem::replace(&mut *state, SlotState::Gone) else {
            self.unlist(name, &slot);
            return Err(AgentError::UnknownOverlay(name.to_owned()));
        };
        // Dropped before the lock (declared after it): out of the table
        // however this ends, a cancelled request included — unless the
        // rows stay, and with them the overlay.
        let mut unlist = Unlist {
            agent: self,
            name,
            slot: &slot,
            armed: true,
        };
        // Stopped, and its writes in flight finished, before its rows go:
        // nothing of it may land afterwards, for a later overlay of the
        // same name to inherit.
        let graceful = !r.left;
        r.end(graceful).await;
        let deleted = self.db.delete_overlay(name).await;
        if let Err(e) = deleted {
            // It stays, stopped: a delete may be tried again, or a join
            // restart it.
            unlist.armed = false;
            *state = SlotState::Up(r);
            return Err(e.into());
        }
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
                            .map(|r| r.name);
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

    /// Every rack this member knows, its own first.
    pub async fn racks(&self, name: &str) -> Result<Vec<RackRow>, AgentError> {
        let racks = self.call(name, |o, now| o.racks(now)).await?;
        Ok(racks
            .into_iter()
            .enumerate()
            .map(|(i, r)| RackRow {
                // The core lists this member's own rack first.
                local: i == 0,
                name: r.name.to_string(),
                gateway: r.gateway.map(|g| g.to_string()),
                term: r.term,
                candidates: r
                    .candidates
                    .into_iter()
                    .map(|(name, role)| CandidateRow {
                        name: name.to_string(),
                        role: role.as_str().into(),
                    })
                    .collect(),
                alive: r.alive,
                suspect: r.suspect,
                failed: r.failed,
                last_heard_s: r.last_heard.map(|d| d.as_secs_f64()),
            })
            .collect())
    }

    /// The members of rack `rack`, or of every rack (`None`): this
    /// member's rack as seen here, local member first, then the others as
    /// their gateways report them, by rack and name.
    pub async fn rack_members(&self, name: &str, rack: Option<String>) -> Result<Vec<RackMemberRow>, AgentError> {
        if let Some(r) = &rack {
            rumormill_core::racks::check_rack_name(r).map_err(|e| AgentError::InvalidRack(e.to_string()))?;
        }
        let own = self
            .call(name, |o, now| o.racks(now).first().map(|r| r.name.to_string()))
            .await?;
        let mut rows = Vec::new();
        if rack.is_none() || rack == own {
            rows.extend(self.members(name).await?.into_iter().map(|m| RackMemberRow {
                name: m.name,
                rack: m.rack,
                state: m.state,
                addr: Some(m.addr),
                report_age_s: None,
                local: m.local,
            }));
        }
        let mut remote = self.call(name, |o, now| o.remote_members(now)).await?;
        remote.retain(|m| rack.as_deref().is_none_or(|r| *m.rack == *r) && own.as_deref() != Some(&*m.rack));
        remote.sort_by(|a, b| (&a.rack, &a.name).cmp(&(&b.rack, &b.name)));
        rows.extend(remote.into_iter().map(|m| RackMemberRow {
            name: m.name.to_string(),
            rack: Some(m.rack.to_string()),
            state: state_name(m.state).into(),
            addr: None,
            report_age_s: m.report_age.map(|d| d.as_secs_f64()),
            local: false,
        }));
        Ok(rows)
    }

    /// Joins members at `addrs`. After a leave, restarts the overlay first.
    pub async fn join(&self, name: &str, addrs: Vec<SocketAddr>) -> Result<(), AgentError> {
        if addrs.is_empty() {
            return Err(AgentError::NoAddresses);
        }
        {
            let mut r = match self.lock(name).await {
                Err(AgentError::NotStarted { .. }) => {
                    self.start_again(name).await?;
                    self.lock(name).await?
                }
                other => other?,
            };
            if r.left {
                let running = self.launch(r.next_life()).await?;
                *r = running;
            }
        }
        self.call(name, move |o, now| o.join(now, &addrs))
            .await?
            .map_err(core_error)
    }

    /// Starts an overlay that did not start, with an empty de-duplication
    /// window in place of the one that does not decode.
    async fn start_again(&self, name: &str) -> Result<(), AgentError> {
        let mut state = self.slot(name)?.lock_owned().await;
        let SlotState::Failed(f) = &mut *state else {
            return Ok(()); // started, or gone, meanwhile
        };
        if f.table != crate::persist::DEDUP_TABLE {
            // Only a de-duplication window may be started afresh.
            return Err(f.error());
        }
        self.db
            .write_holding(name, vec![crate::persist::Op::Dedup(Vec::new())], true, ())
            .await?;
        f.record.epoch += 1;
        match self.launch(f.record.clone()).await {
            Ok(running) => {
                tracing::warn!(overlay = %name, "started with an empty de-duplication window");
                *state = SlotState::Up(Box::new(running));
                Ok(())
            }
            Err(e) => {
                f.reason = e.to_string();
                Err(e)
            }
        }
    }

    /// Leaves an overlay gracefully; it stays configured and rejoins on
    /// `join` or at the next start.
    pub async fn leave(&self, name: &str) -> Result<(), AgentError> {
        let mut r = self.lock(name).await?;
        if r.left {
            return Err(AgentError::AlreadyLeft(name.to_owned()));
        }
        if let Some(save) = crate::keyring::refresh(&mut r).await {
            save.write(&self.db).await?;
        }
        r.end(true).await;
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
        .ok_or(AgentError::NothingStored)
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
            Err(AgentError::UnknownLuggage(key.to_owned()))
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
        let slots: Vec<Slot> = std::mem::take(&mut *self.table()).into_values().collect();
        let stops = slots.into_iter().map(|slot| async move {
            let mut state = slot.lock_owned().await;
            if let SlotState::Up(mut r) = std::mem::replace(&mut *state, SlotState::Gone) {
                if let Some(save) = crate::keyring::refresh(&mut r).await
                    && let Err(e) = save.write(&self.db).await
                {
                    tracing::warn!(overlay = %r.record.spec.name, error = %e, "keyring not saved");
                }
                let graceful = leave && !r.left;
                r.end(graceful).await;
            }
        });
        futures_util::future::join_all(stops).await;
    }
}

/// Summary of a started overlay.
async fn summary(r: &Running) -> OverlaySummary {
    let (rec, handle, left, inbox) = (&r.record, &r.handle, r.left, &r.inbox);
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
                    o.replication_stats(),
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
    OverlaySummary {
        name: rec.spec.name.clone(),
        member: rec.member.clone(),
        addr: handle.addr(),
        epoch: rec.epoch,
        encrypted: !rec.keys.is_empty(),
        status: if left { "left" } else { "running" }.into(),
        live_members: live,
        spec: spec.masked(),
        stats,
        error: None,
    }
}

/// What is shown of an overlay that did not start.
fn not_started(f: &NotStarted) -> OverlaySummary {
    let mut summary = starting(&f.record);
    summary.status = "stopped".into();
    summary.error = Some(f.error().to_string());
    summary
}

/// What a listing shows of an overlay whose start is under way.
fn starting(rec: &OverlayRecord) -> OverlaySummary {
    let mut spec = rec.spec.clone();
    spec.keys = rec.keys.iter().map(|_| String::new()).collect();
    OverlaySummary {
        name: rec.spec.name.clone(),
        member: rec.member.clone(),
        addr: rec
            .spec
            .advertise_addr()
            .ok()
            .flatten()
            .or_else(|| rec.spec.bind_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        epoch: rec.epoch,
        encrypted: !rec.keys.is_empty(),
        status: "starting".into(),
        live_members: 0,
        spec: spec.masked(),
        stats: OverlayStats::default(),
        error: None,
    }
}

/// Ok if the overlay exists (left or not).
pub(crate) async fn exists<N: Net>(agent: &Agent<N>, name: &str) -> Result<(), AgentError> {
    agent.lock(name).await.map(drop)
}

fn has_left(name: &str) -> AgentError {
    AgentError::Left(name.to_owned())
}

/// The overlay's task ended under a request (it was deleted meanwhile).
pub(crate) fn stopped(name: &str) -> AgentError {
    AgentError::Stopped(name.to_owned())
}

pub(crate) fn plaintext(name: &str) -> AgentError {
    AgentError::Plaintext(name.to_owned())
}

pub(crate) fn core_error(e: CoreError) -> AgentError {
    AgentError::Core(e)
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
        return Err(ValueKeyRefused::Length.into());
    }
    if key.starts_with(RESERVED_PREFIX) {
        return Err(ValueKeyRefused::Reserved.into());
    }
    Ok(())
}

fn rack_key(member: &str) -> String {
    rumormill_core::reserved::ReservedKey::Rack {
        member: member.to_owned(),
    }
    .key()
}

fn update_row(u: &rumormill_core::replication::Update) -> Option<UpdateRow> {
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
/// sync of the replicated store after the join ([`Notification::StoreSynced`]), so
/// that what depends on it — who subscribes to what, above all — is known
/// before the API opens: a restarted publisher would otherwise find no
/// subscribers for a while.
async fn wait_for_store(
    name: &str,
    handle: &OverlayHandle,
    mut events: tokio::sync::broadcast::Receiver<Notification>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let synced = async {
        loop {
            match events.recv().await {
                Ok(Notification::StoreSynced) => return,
                Ok(_) => {}
                // Too many events at once: the notice may be among those
                // dropped, so ask the store itself.
                Err(RecvError::Lagged(_)) => {
                    if handle.call(|o, _| !o.awaits_first_sync()).await.unwrap_or(true) {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::client::Client;
    use crate::transport::TokioNet;
    use rumormill_core::{MemberChange, Notification};
    use std::time::Instant;

    pub(crate) fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rm-slots-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    pub(crate) fn spec(name: &str, member: &str, seeds: &[SocketAddr]) -> OverlaySpec {
        let mut spec = OverlaySpec::named(name);
        spec.bind = "127.0.0.1:0".into();
        spec.member = Some(member.into());
        spec.plaintext = true;
        spec.profile = config::Profile::Local;
        spec.seeds = seeds.iter().map(ToString::to_string).collect();
        spec
    }

    pub(crate) async fn start(dir: &std::path::Path, overlays: Vec<OverlaySpec>) -> Arc<Agent<TokioNet>> {
        let config = AgentConfig {
            data_dir: dir.to_owned(),
            overlays,
            ..AgentConfig::default()
        };
        Agent::start(TokioNet, config).await.expect("agent starts")
    }

    /// Polls `check` every 20 ms until it holds, at most `secs`.
    pub(crate) async fn wait_until(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Result<(), String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match check().await {
                Ok(()) => return,
                Err(last) if Instant::now() >= deadline => panic!("{what}: not within {secs} s; last: {last}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A peer address nobody answers at (a member that is gone).
    fn gone_peer() -> SocketAddr {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.local_addr().expect("address")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_on_one_overlay_answer_while_another_leaves_and_restarts() {
        let (dir_x, dir_y) = (scratch("x"), scratch("y"));
        let y = start(&dir_y, vec![spec("a", "y", &[])]).await;
        let y_addr = y.overlay("a").await.expect("a on y").addr;
        let x = start(&dir_x, vec![spec("a", "x", &[y_addr]), spec("b", "x", &[])]).await;
        wait_until("x to see y alive in overlay a", 10, async || {
            let rows = x.members("a").await.map_err(|e| e.to_string())?;
            match rows.iter().find(|m| m.name == "y") {
                Some(m) if m.state == "alive" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let (api, server) = crate::api::serve(x.clone(), "127.0.0.1:0".parse().expect("addr"), "t".into())
            .await
            .expect("api");
        let client = Client::new(api, Some("t".into()));
        // The rest of overlay a is gone, without a word.
        y.shutdown(false).await;
        drop(y);

        // Overlay a leaves, then joins again: its restart waits up to 5 s
        // for a first store sync from a peer that no longer answers.
        let slow = {
            let x = x.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                x.leave("a").await.expect("leave");
                let left = t.elapsed();
                let t = Instant::now();
                x.join("a", vec![y_addr]).await.expect("join");
                (left, t.elapsed())
            })
        };
        let mut worst = Duration::ZERO;
        let mut requests = 0;
        let began = Instant::now();
        while !slow.is_finished() {
            for path in ["/v1/overlays/b/members", "/v1/overlays/b", "/v1/health", "/v1/overlays"] {
                let t = Instant::now();
                let answer = client.get(path).await;
                let took = t.elapsed();
                assert!(answer.is_ok(), "GET {path} failed while overlay a was busy: {answer:?}");
                assert!(
                    took < Duration::from_millis(100),
                    "GET {path} took {took:?}, {:?} into overlay a's leave and restart (bound: 100 ms)",
                    began.elapsed()
                );
                if path == "/v1/overlays"
                    && let Ok(listing) = &answer
                {
                    let names: Vec<&str> = listing
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o["name"].as_str())
                        .collect();
                    assert!(
                        names.contains(&"a") && names.contains(&"b"),
                        "the listing must show the busy overlay too: {names:?}"
                    );
                }
                worst = worst.max(took);
                requests += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (left, restarted) = slow.await.expect("leave and join");
        eprintln!(
            "overlay a: leave {left:?}, restart {restarted:?}; {requests} requests on overlay b meanwhile, slowest {worst:?}"
        );
        assert!(
            left + restarted >= STORE_SYNC_WAIT - Duration::from_millis(500),
            "overlay a's restart must have waited for its gone peer (leave {left:?}, restart {restarted:?})"
        );
        assert!(requests >= 50, "only {requests} requests were made");
        server.abort();
        x.shutdown(false).await;
        for d in [dir_x, dir_y] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creating_and_deleting_one_name_at_once_stays_consistent() {
        let dir = scratch("create-delete");
        let agent = start(&dir, vec![spec("b", "x", &[])]).await;
        let peer = gone_peer();
        // The first create waits up to 5 s for its gone seed; a second
        // create and a delete of the same name come meanwhile.
        let first = tokio::spawn({
            let agent = agent.clone();
            async move { agent.create_overlay(spec("c", "x", &[peer])).await.map(|s| s.status) }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!first.is_finished(), "the first create must still be starting");
        assert!(
            agent.overlay_names().await.contains(&"c".to_owned()),
            "a starting overlay is in the table"
        );
        let second = tokio::spawn({
            let agent = agent.clone();
            async move { agent.create_overlay(spec("c", "x", &[])).await.map(|s| s.status) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let delete = tokio::spawn({
            let agent = agent.clone();
            async move { agent.delete_overlay("c").await }
        });
        let t = Instant::now();
        agent.members("b").await.expect("b answers");
        assert!(t.elapsed() < Duration::from_millis(100), "b waited {:?}", t.elapsed());
        assert_eq!(first.await.expect("task").expect("first create"), "running");
        let second = second.await.expect("task");
        assert!(
            matches!(second, Err(AgentError::OverlayExists(ref n)) if n == "c"),
            "the second create finds the first one's overlay: {second:?}"
        );
        delete
            .await
            .expect("task")
            .expect("the delete waits for the start, then deletes");
        assert!(!agent.overlay_names().await.contains(&"c".to_owned()));
        let stored = |agent: &Agent<TokioNet>| {
            agent
                .db
                .overlays()
                .expect("records")
                .into_iter()
                .map(|r| r.spec.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            stored(&agent),
            vec!["b".to_owned()],
            "the deleted overlay is gone from disk"
        );
        // The name is free again, on disk too.
        agent.create_overlay(spec("c", "x", &[])).await.expect("create again");
        assert_eq!(stored(&agent), vec!["b".to_owned(), "c".to_owned()]);
        agent.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Publishes at-least-once events from y to x's overlay `a` (topic
    /// `t`) until x's inbox holds some.
    async fn events_flowing(x: &Agent<TokioNet>, y: &Agent<TokioNet>) {
        x.subscribe("a", &["t".to_owned()]).await.expect("subscribe");
        let alo = crate::events::DeliverySpec::AtLeastOnce {
            retry_every: "1s".into(),
            retry_max: 0,
        };
        wait_until("x's inbox to fill", 10, async || {
            y.publish("a", "t", b"e".to_vec(), &alo)
                .await
                .map_err(|e| e.to_string())?;
            match x.inbox("a", 0, 10).await.map_err(|e| e.to_string())?.len() {
                0 => Err("empty".into()),
                _ => Ok(()),
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_overlay_leaves_nothing_for_the_next_one_of_its_name() {
        let (dir_x, dir_y) = (scratch("reuse-x"), scratch("reuse-y"));
        let y = start(&dir_y, vec![spec("a", "y", &[])]).await;
        let y_addr = y.overlay("a").await.expect("a on y").addr;
        let x = start(&dir_x, vec![spec("a", "x", &[y_addr])]).await;
        events_flowing(&x, &y).await;
        // Commits in flight when the delete comes: the pump keeps storing
        // what y sends until it is stopped.
        x.db.slow_commits(Duration::from_millis(300));
        let publisher = {
            let y = y.clone();
            tokio::spawn(async move {
                let alo = crate::events::DeliverySpec::AtLeastOnce {
                    retry_every: "1s".into(),
                    retry_max: 0,
                };
                loop {
                    let _ = y.publish("a", "t", b"more".to_vec(), &alo).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        x.delete_overlay("a").await.expect("delete");
        x.db.slow_commits(Duration::ZERO);
        // Whatever of the old overlay was still on its way has landed by now.
        tokio::time::sleep(Duration::from_millis(700)).await;
        x.create_overlay(spec("a", "x", &[])).await.expect("create again");
        let inherited = x.inbox("a", 0, 100_000).await.expect("inbox").len();
        let window = x.db.dedup("a").expect("window").len();
        publisher.abort();
        assert_eq!(
            (inherited, window),
            (0, 0),
            "the new overlay must start with an empty inbox and window"
        );
        x.shutdown(false).await;
        y.shutdown(false).await;
        for d in [dir_x, dir_y] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_subscribe_is_kept_in_memory_and_saved() {
        let dir = scratch("cancel-subscribe");
        let x = start(&dir, vec![spec("a", "x", &[])]).await;
        x.db.slow_commits(Duration::from_millis(300));
        let request = tokio::spawn({
            let x = x.clone();
            async move { x.subscribe("a", &["t".to_owned()]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        request.abort();
        let _ = request.await;
        let pumped = x
            .lock("a")
            .await
            .expect("a")
            .topics
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        assert_eq!(pumped, vec!["t".to_owned()], "the event pump must see the topic");
        x.db.slow_commits(Duration::ZERO);
        wait_until("the topic to be saved", 5, async || {
            let records = x.db.overlays().map_err(|e| e.to_string())?;
            match records.iter().find(|r| r.spec.name == "a") {
                Some(r) if r.topics == ["t"] => Ok(()),
                other => Err(format!("{:?}", other.map(|r| &r.topics))),
            }
        })
        .await;
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_update_leaves_a_stopped_overlay_and_spends_its_epoch() {
        let dir = scratch("cancel-update");
        let x = start(&dir, vec![spec("a", "x", &[])]).await;
        assert_eq!(x.overlay("a").await.expect("a").epoch, 1);
        x.db.slow_commits(Duration::from_millis(400));
        let request = tokio::spawn({
            let x = x.clone();
            async move { x.update_overlay("a", spec("a", "x", &[])).await }
        });
        // The old driver is stopped; the new start is saving its epoch.
        tokio::time::sleep(Duration::from_millis(200)).await;
        request.abort();
        let _ = request.await;
        x.db.slow_commits(Duration::ZERO);
        let shown = x.overlay("a").await.expect("a");
        assert_eq!(shown.status, "left", "the stopped overlay must not claim to run");
        x.join("a", vec![gone_peer()]).await.expect("join restarts it");
        let shown = x.overlay("a").await.expect("a");
        assert_eq!(
            (shown.status.as_str(), shown.epoch),
            ("running", 3),
            "epoch 2 went to the cancelled start"
        );
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_that_cannot_bind_leaves_no_record() {
        let dir = scratch("create-bind");
        let x = start(&dir, vec![spec("a", "x", &[])]).await;
        let taken = x.overlay("a").await.expect("a").addr;
        let mut bad = spec("c", "x", &[]);
        bad.bind = taken.to_string();
        let refused = x.create_overlay(bad).await;
        assert!(matches!(refused, Err(AgentError::Bind { .. })), "{refused:?}");
        wait_until("the failed create's record to go", 5, async || {
            let stored: Vec<String> =
                x.db.overlays()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|r| r.spec.name.clone())
                    .collect();
            match stored == ["a"] {
                true => Ok(()),
                false => Err(format!("{stored:?}")),
            }
        })
        .await;
        // The name is free again.
        x.create_overlay(spec("c", "x", &[])).await.expect("create");
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_that_does_not_decode_stops_its_overlay_alone() {
        let dir = scratch("spoiled-window");
        let x = start(&dir, vec![spec("a", "x", &[]), spec("b", "x", &[])]).await;
        x.db.spoil_window("a");
        x.shutdown(false).await;
        drop(x);
        let x = start(&dir, vec![spec("a", "x", &[]), spec("b", "x", &[])]).await;
        let listing = x.overlays().await;
        let status: Vec<(&str, &str)> = listing.iter().map(|o| (o.name.as_str(), o.status.as_str())).collect();
        assert_eq!(status, vec![("a", "stopped"), ("b", "running")]);
        let error = listing[0].error.clone().unwrap_or_default();
        assert!(
            error.contains("events_dedup/a") && error.contains("`join`") && !error.contains("move the file"),
            "{error}"
        );
        let refused = x.put("a", "k", b"v".to_vec()).await;
        assert!(matches!(refused, Err(AgentError::NotStarted { .. })), "{refused:?}");
        x.put("b", "k", b"v".to_vec()).await.expect("b runs");
        x.join("a", vec![gone_peer()]).await.expect("join starts it");
        assert_eq!(x.overlay("a").await.expect("a").status, "running");
        assert!(x.db.dedup("a").expect("a readable window").is_empty());
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raft_record_that_does_not_decode_stops_its_overlay_and_join_does_not_start_it_blank() {
        let dir = scratch("spoiled-raft");
        let candidate = || {
            let mut s = spec("a", "x", &[]);
            s.rack = Some("eu".into());
            s.gateway = true;
            s.candidates = Some(1);
            s
        };
        let x = start(&dir, vec![candidate(), spec("b", "x", &[])]).await;
        wait_until("x's Raft record to be saved", 10, async || match x.db.raft("a") {
            Ok(Some(r)) if r.term() > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        })
        .await;
        x.db.spoil_raft("a");
        x.shutdown(false).await;
        drop(x);
        let x = start(&dir, vec![candidate(), spec("b", "x", &[])]).await;
        let listing = x.overlays().await;
        let status: Vec<(&str, &str)> = listing.iter().map(|o| (o.name.as_str(), o.status.as_str())).collect();
        assert_eq!(status, vec![("a", "stopped"), ("b", "running")]);
        let error = listing[0].error.clone().unwrap_or_default();
        assert!(
            error.starts_with("overlay \"a\" did not start: its record raft/a")
                && error.contains("could vote twice in one Raft term")
                && !error.contains('\n'),
            "{error}"
        );
        let refused = x.join("a", vec![gone_peer()]).await;
        assert!(matches!(refused, Err(AgentError::NotStarted { .. })), "{refused:?}");
        assert_eq!(x.overlay("a").await.expect("a").status, "stopped");
        x.shutdown(false).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// While every commit of x's database takes 300 ms, x keeps answering
    /// y's probes and its own calls: commits run on blocking threads, not
    /// on the one thread of x's runtime that also drives x's overlay.
    #[test]
    fn probes_are_answered_on_time_while_commits_are_slow() {
        let (dir_x, dir_y) = (scratch("slow-x"), scratch("slow-y"));
        // y on a runtime of its own, so that nothing x's thread does can
        // delay y's probes.
        let rt_y = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let y = rt_y.block_on(start(&dir_y, vec![spec("a", "y", &[])]));
        let y_addr = rt_y.block_on(y.overlay("a")).expect("a on y").addr;
        let mut seen_by_y = rt_y.block_on(y.handle("a")).expect("a on y").subscribe();
        let rt_x = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let delay = Duration::from_millis(300);
        let (stored, slowest_call, commit) = rt_x.block_on(async {
            let x = start(&dir_x, vec![spec("a", "x", &[y_addr])]).await;
            x.subscribe("a", &["t".to_owned()]).await.expect("subscribe");
            let alo = crate::events::DeliverySpec::AtLeastOnce {
                retry_every: "1s".into(),
                retry_max: 0,
            };
            wait_until("y to know that x subscribes to t", 10, async || {
                let record = y
                    .publish("a", "t", b"hello".to_vec(), &alo)
                    .await
                    .map_err(|e| e.to_string())?;
                match record.subscribers.iter().any(|s| s.member == "x") {
                    true => Ok(()),
                    false => Err(format!("{:?}", record.subscribers)),
                }
            })
            .await;
            x.db.slow_commits(delay);
            let t = Instant::now();
            x.db.write("a", Vec::new()).await.expect("a slow commit");
            let commit = t.elapsed();
            // Four probe intervals of y's (1 s each) while x's event pump
            // commits one batch after the other.
            let mut slowest = Duration::ZERO;
            let began = Instant::now();
            while began.elapsed() < Duration::from_secs(4) {
                y.publish("a", "t", b"payload".to_vec(), &alo).await.expect("publish");
                let t = Instant::now();
                x.members("a").await.expect("x answers");
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let rows = x.members("a").await.expect("x answers");
            assert!(
                rows.iter().any(|m| m.name == "y" && m.state == "alive"),
                "x must still see y alive: {rows:?}"
            );
            let stored = x.inbox("a", 0, 100_000).await.expect("inbox").len();
            x.shutdown(false).await;
            (stored, slowest, commit)
        });
        let mut doubts = Vec::new();
        loop {
            match seen_by_y.try_recv() {
                Ok(Notification::Member { change, member }) if member.name.as_ref() == "x" => doubts.push(change),
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        eprintln!(
            "commits held {commit:?} each; x stored {stored} inbox entries, its slowest call took {slowest_call:?}; y saw x: {doubts:?}"
        );
        assert!(commit >= delay, "the test hook must slow commits ({commit:?})");
        assert!(stored > 0, "x's inbox must fill, slowly");
        assert!(
            !doubts
                .iter()
                .any(|c| matches!(c, MemberChange::Suspect | MemberChange::Failed)),
            "y must never doubt x while x's commits are slow: {doubts:?}"
        );
        assert!(
            slowest_call < Duration::from_millis(100),
            "x's driver must answer within 100 ms while commits take {delay:?}: {slowest_call:?}"
        );
        rt_y.block_on(y.shutdown(false));
        for d in [dir_x, dir_y] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
