//! What survives a restart, in an embedded database (`redb`) under the data
//! directory: the overlays (spec, keyring, member name, boot epoch and the
//! peers last seen). Every change is a durable transaction, so a `kill -9`
//! loses nothing that was acknowledged. Internal to the agent: the rest of
//! the crate reads and writes through [`Db`], in typed records — overlay
//! records, pending events ([`PendingEvent`]), report records
//! ([`EventRecord`]), inbox entries ([`InboxItem`], written as
//! [`EncodedEntry`]), the de-duplication window ([`DedupEntry`]), a
//! gateway candidate's latest Raft record ([`RaftRecord`], saved before
//! the core lets out the votes and messages that depend on it) — whose
//! stored forms live here alone. A record that does not decode is an
//! error naming its table and key ([`PersistError::Record`]), logged the
//! first time it is found; lists leave it out, single reads return it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use base64::Engine;
use rumormill_core::events::dedup::DedupEntry;
use rumormill_core::events::{DeliveryReport, EventId, PendingEvent};
use rumormill_core::racks::RaftRecord;

use crate::config::OverlaySpec;
use crate::events::{EventRecord, InboxItem, is_local, payload_fields};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const OVERLAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("overlays");
/// At-least-once events this agent published that await reports: (overlay, event id) → JSON.
const PENDING: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("events_pending");
/// Delivery reports of events this agent published: (overlay, event id) → JSON.
const REPORTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("events_reports");
/// What the local applications read, in order: (overlay, sequence) → JSON.
const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
/// The de-duplication window of delivered events: overlay → JSON.
const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new(DEDUP_TABLE);
/// Inbox sequence numbers below this one may have been handed out (written
/// durably before any of them is): overlay → sequence number.
const INBOX_RESERVED: TableDefinition<&str, u64> = TableDefinition::new("inbox_reserved");
/// The latest Raft record of a gateway candidate (see
/// [`rumormill_core::racks::RaftRecord`]): overlay → its encoded bytes.
const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new(RAFT_TABLE);
const FORMAT: &str = "rumormill-agent/1";
/// The name of the table of Raft records, in errors.
pub const RAFT_TABLE: &str = "raft";
/// The name of the table of de-duplication windows, in errors.
pub const DEDUP_TABLE: &str = "events_dedup";
/// The database's file name in the data directory.
pub const DB_FILE: &str = "rumormill.redb";

/// A persistence error.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The data directory could not be created or read.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent holds the database.
    #[error("{path} is in use by another agent (one agent per data directory)")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file is not a Rumormill database, or is damaged.
    #[error("{path} is not a usable Rumormill database ({reason}); move it away to start afresh")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What the storage layer said.
        reason: String,
    },
    /// The data directory is open to other users.
    #[error("data directory {path} is open to other users (mode {mode:o}) and holds keys: run `chmod 700 {path}`")]
    OpenDir {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored record does not decode.
    #[error("database {path}: the record {table}/{key} does not decode ({reason}); move the file away to start afresh")]
    Record {
        /// The database file.
        path: PathBuf,
        /// Its table.
        table: &'static str,
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A read or write failed.
    #[error("database {path}: {reason}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Everything kept about one overlay. Its `Debug` output masks the keys.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct OverlayRecord {
    /// Its settings (the `keys` field is empty: the keyring is `keys`).
    pub spec: OverlaySpec,
    /// The keyring, base64, primary first.
    pub keys: Vec<String>,
    /// The local member's name.
    pub member: String,
    /// The boot epoch of the last start (the next start uses one more).
    pub epoch: u64,
    /// Addresses of members last seen alive: joined again after a restart.
    pub peers: Vec<SocketAddr>,
    /// Highest version of a desired keyring seen (see [`crate::keyring`]).
    #[serde(default)]
    pub keyring_version: u64,
    /// Topics the agent subscribes to (see [`crate::events`]).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Ids (hex) of keys installed on this agent alone: their secrets are
    /// never written to the overlay's store (see [`crate::keyring`]).
    #[serde(default)]
    pub local_keys: Vec<String>,
    /// Ids (hex) of local keys no desired keyring names yet: kept when this
    /// member follows one.
    #[serde(default)]
    pub pending_keys: Vec<String>,
}

impl std::fmt::Debug for OverlayRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayRecord")
            .field("spec", &self.spec)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("member", &self.member)
            .field("epoch", &self.epoch)
            .field("peers", &self.peers)
            .field("keyring_version", &self.keyring_version)
            .field("topics", &self.topics)
            .field("local_keys", &self.local_keys)
            .field("pending_keys", &self.pending_keys)
            .finish()
    }
}

impl Drop for OverlayRecord {
    /// The keyring's secrets are wiped with the record.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.keys);
    }
}

impl OverlayRecord {
    /// A fresh record: the spec's keys move to the keyring.
    pub fn new(mut spec: OverlaySpec, member: String) -> OverlayRecord {
        let keys = std::mem::take(&mut spec.keys);
        OverlayRecord {
            spec,
            keys,
            member,
            epoch: 0,
            peers: Vec::new(),
            keyring_version: 0,
            topics: Vec::new(),
            local_keys: Vec::new(),
            pending_keys: Vec::new(),
        }
    }
}

/// The agent's database.
///
/// Every transaction that commits runs on a blocking thread
/// (`spawn_blocking`), never on a worker of the runtime: a commit waits for
/// the disk (an fsync, unless volatile), and redb makes a writer wait for
/// the one before it, so on a worker it would stall the overlays' drivers
/// — and their answers to probes — with it. The caller awaits the commit;
/// a cancelled caller does not cancel it. Reads run where they are called:
/// they do not wait for writers.
#[derive(Debug, Clone)]
pub struct Db {
    inner: Arc<Tables>,
}

/// The database itself, shared with the blocking threads that commit.
#[derive(Debug)]
pub struct Tables {
    db: redb::Database,
    path: PathBuf,
    /// Keys of records found undecodable, so that each is logged once.
    reported: std::sync::Mutex<std::collections::BTreeSet<(&'static str, String)>>,
    /// Test hook: how long each commit is held before it is made.
    #[cfg(test)]
    commit_delay_ms: std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for Db {
    type Target = Tables;
    fn deref(&self) -> &Tables {
        &self.inner
    }
}

impl Db {
    /// Opens (or creates) the database in `dir`, creating `dir` if needed.
    /// The directory must not be open to other users; the file is made
    /// readable by its owner only (it holds the keyrings).
    pub fn open(dir: &Path) -> Result<Db, PersistError> {
        create_private_dir(dir)?;
        let path = dir.join(DB_FILE);
        private_file(&path).map_err(|source| PersistError::Dir {
            path: path.clone(),
            source,
        })?;
        let db = match redb::Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(PersistError::InUse { path }),
            Err(e) => {
                return Err(PersistError::Corrupt {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let store = Tables {
            db,
            path,
            reported: Default::default(),
            #[cfg(test)]
            commit_delay_ms: Default::default(),
        };
        store.check_format()?;
        Ok(Db { inner: Arc::new(store) })
    }

    /// Makes every later commit wait `delay` first: a slow disk, for tests.
    #[cfg(test)]
    pub(crate) fn slow_commits(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.commit_delay_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stores a Raft record that does not decode, for tests.
    #[cfg(test)]
    pub(crate) fn spoil_raft(&self, overlay: &str) {
        let tx = self.db.begin_write().expect("a write transaction");
        tx.open_table(RAFT)
            .expect("the Raft table")
            .insert(overlay, [0xffu8].as_slice())
            .expect("a spoiled record");
        tx.commit().expect("committed");
    }

    /// Stores a de-duplication window that does not decode, for tests.
    #[cfg(test)]
    pub(crate) fn spoil_window(&self, overlay: &str) {
        let tx = self.db.begin_write().expect("a write transaction");
        tx.open_table(DEDUP)
            .expect("the window table")
            .insert(overlay, b"not json".as_slice())
            .expect("a spoiled window");
        tx.commit().expect("committed");
    }

    /// Runs `f` — a transaction that commits — on a blocking thread.
    async fn commit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T, PersistError> + Send + 'static,
    ) -> Result<T, PersistError> {
        self.commit_holding((), f).await
    }

    /// Like [`Db::commit`], holding `hold` until the transaction has
    /// finished on its thread, even when the awaiting future is dropped
    /// first: whoever waits for `hold` waits for the commit.
    async fn commit_holding<T: Send + 'static, H: Send + 'static>(
        &self,
        hold: H,
        f: impl FnOnce(&Tables) -> Result<T, PersistError> + Send + 'static,
    ) -> Result<T, PersistError> {
        let store = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let done = f(&store);
            // The database before the passage: whoever waits for `hold`
            // (a shutdown, then a reopen) finds the file closed by then.
            drop(store);
            drop(hold);
            done
        })
        .await
        .map_err(|e| self.io(format!("the commit's thread failed: {e}")))?
    }

    /// Writes (creates or replaces) an overlay's record, durably.
    pub async fn put_overlay(&self, rec: &OverlayRecord) -> Result<(), PersistError> {
        // It holds the keyring: wiped once written.
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(rec).map_err(|e| self.io(e))?);
        let name = rec.spec.name.clone();
        self.commit(move |s| s.put_overlay(&name, &bytes)).await
    }

    /// Like [`Db::put_overlay`], holding `hold` until the commit has
    /// finished (see [`Db::commit_holding`]), and only if `saved` — the
    /// version of the record last written, which `hold` guards — is below
    /// `version` (raised to it once written): a late save of an older
    /// record writes nothing.
    pub(crate) fn put_overlay_newer<H: Send + 'static>(
        &self,
        rec: &OverlayRecord,
        hold: H,
        saved: Arc<std::sync::atomic::AtomicU64>,
        version: u64,
    ) -> impl std::future::Future<Output = Result<(), PersistError>> + Send + 'static {
        use std::sync::atomic::Ordering::Relaxed;
        // Started here, holding no `Db` afterwards: the future keeps the
        // file open no longer than the commit does.
        let encoded = serde_json::to_vec(rec).map(zeroize::Zeroizing::new);
        let name = rec.spec.name.clone();
        let path = self.path.clone();
        let store = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || {
            let done = match encoded {
                Ok(bytes) if saved.load(Relaxed) < version => {
                    let written = store.put_overlay(&name, &bytes);
                    if written.is_ok() {
                        saved.store(version, Relaxed);
                    }
                    written
                }
                Ok(_) => Ok(()),
                Err(e) => Err(store.io(e)),
            };
            drop(store);
            drop(hold);
            done
        });
        async move {
            task.await.map_err(|e| PersistError::Io {
                path,
                reason: format!("the commit's thread failed: {e}"),
            })?
        }
    }

    /// Forgets an overlay and its events.
    pub async fn delete_overlay(&self, name: &str) -> Result<(), PersistError> {
        let name = name.to_owned();
        self.commit(move |s| s.delete_overlay(&name)).await
    }

    /// Applies writes in one durable transaction (the agent writes
    /// through [`Db::write_holding`]).
    #[cfg(test)]
    pub async fn write(&self, overlay: &str, ops: impl Into<Arc<[Op]>>) -> Result<(), PersistError> {
        self.write_holding(overlay, ops, true, ()).await
    }

    /// Like [`Db::write`], not flushed to disk.
    #[cfg(test)]
    pub async fn write_volatile(&self, overlay: &str, ops: impl Into<Arc<[Op]>>) -> Result<(), PersistError> {
        self.write_holding(overlay, ops, false, ()).await
    }

    /// Applies writes in one transaction — flushed to disk with `durable`,
    /// else lost by a crash before the next durable one (the database
    /// stays consistent): for what may be lost, best-effort events in the
    /// inbox — holding `hold` until the commit has finished (see
    /// [`Db::commit_holding`]).
    pub(crate) async fn write_holding<H: Send + 'static>(
        &self,
        overlay: &str,
        ops: impl Into<Arc<[Op]>>,
        durable: bool,
        hold: H,
    ) -> Result<(), PersistError> {
        let overlay = overlay.to_owned();
        let ops = ops.into();
        let durability = if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        self.commit_holding(hold, move |s| s.write_with(&overlay, &ops, durability))
            .await
    }

    /// Keeps only the report records `keep` says to keep.
    pub async fn retain_reports(
        &self,
        overlay: &str,
        keep: impl Fn(&EventRecord) -> bool + Send + 'static,
    ) -> Result<(), PersistError> {
        let overlay = overlay.to_owned();
        self.commit(move |s| s.retain_reports(&overlay, keep)).await
    }
}

impl Tables {
    /// Commits `tx` (after the test hook's delay, if any).
    fn commit_now(&self, tx: redb::WriteTransaction) -> Result<(), PersistError> {
        #[cfg(test)]
        {
            let ms = self.commit_delay_ms.load(std::sync::atomic::Ordering::Relaxed);
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        tx.commit().map_err(|e| self.io(e))
    }

    fn io(&self, e: impl std::fmt::Display) -> PersistError {
        PersistError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> PersistError {
        PersistError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// A new database gets our format mark; an existing one must have it.
    fn check_format(&self) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.corrupt(e.to_string()))?;
            let found = meta
                .get("format")
                .map_err(|e| self.io(e))?
                .map(|v| v.value().to_owned());
            match found {
                Some(f) if f == FORMAT => {}
                Some(f) => return Err(self.corrupt(format!("format {f:?}, expected {FORMAT:?}"))),
                None => {
                    let tables = tx.list_tables().map_err(|e| self.io(e))?.count();
                    if tables > 1 {
                        return Err(self.corrupt("a redb file of another program"));
                    }
                    meta.insert("format", FORMAT).map_err(|e| self.io(e))?;
                }
            }
            tx.open_table(OVERLAYS).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(PENDING).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(REPORTS).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(INBOX).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(DEDUP).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(INBOX_RESERVED).map_err(|e| self.corrupt(e.to_string()))?;
            tx.open_table(RAFT).map_err(|e| self.corrupt(e.to_string()))?;
        }
        self.commit_now(tx)
    }

    /// Every overlay kept, by name.
    pub fn overlays(&self) -> Result<Vec<OverlayRecord>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let table = tx.open_table(OVERLAYS).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.io(e))? {
            let (name, bytes) = entry.map_err(|e| self.io(e))?;
            let rec: OverlayRecord = serde_json::from_slice(bytes.value())
                .map_err(|e| self.corrupt(format!("overlay {:?}: {e}", name.value())))?;
            out.push(rec);
        }
        Ok(out)
    }

    fn put_overlay(&self, name: &str, bytes: &[u8]) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut table = tx.open_table(OVERLAYS).map_err(|e| self.io(e))?;
            table.insert(name, bytes).map_err(|e| self.io(e))?;
        }
        self.commit_now(tx)
    }

    fn delete_overlay(&self, name: &str) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut table = tx.open_table(OVERLAYS).map_err(|e| self.io(e))?;
            table.remove(name).map_err(|e| self.io(e))?;
            let mut t = tx.open_table(PENDING).map_err(|e| self.io(e))?;
            t.retain_in((name, "")..=(name, "\u{10FFFF}"), |_, _| false)
                .map_err(|e| self.io(e))?;
            let mut t = tx.open_table(REPORTS).map_err(|e| self.io(e))?;
            t.retain_in((name, "")..=(name, "\u{10FFFF}"), |_, _| false)
                .map_err(|e| self.io(e))?;
            let mut t = tx.open_table(INBOX).map_err(|e| self.io(e))?;
            t.retain_in((name, 0)..=(name, u64::MAX), |_, _| false)
                .map_err(|e| self.io(e))?;
            let mut t = tx.open_table(DEDUP).map_err(|e| self.io(e))?;
            t.remove(name).map_err(|e| self.io(e))?;
            let mut t = tx.open_table(INBOX_RESERVED).map_err(|e| self.io(e))?;
            t.remove(name).map_err(|e| self.io(e))?;
            let mut t = tx.open_table(RAFT).map_err(|e| self.io(e))?;
            t.remove(name).map_err(|e| self.io(e))?;
        }
        self.commit_now(tx)
    }

    fn write_with(&self, overlay: &str, ops: &[Op], durability: redb::Durability) -> Result<(), PersistError> {
        let mut tx = self.db.begin_write().map_err(|e| self.io(e))?;
        tx.set_durability(durability);
        {
            let mut pending = tx.open_table(PENDING).map_err(|e| self.io(e))?;
            let mut reports = tx.open_table(REPORTS).map_err(|e| self.io(e))?;
            let mut inbox = tx.open_table(INBOX).map_err(|e| self.io(e))?;
            let mut dedup = tx.open_table(DEDUP).map_err(|e| self.io(e))?;
            let mut reserved = tx.open_table(INBOX_RESERVED).map_err(|e| self.io(e))?;
            let mut raft = tx.open_table(RAFT).map_err(|e| self.io(e))?;
            for op in ops {
                // Records are encoded here, on the committing thread.
                let r = match op {
                    Op::PutPending(p) => {
                        let id = p.id.to_string();
                        let v = json(&StoredPending::from_core(p));
                        pending.insert((overlay, id.as_str()), v.as_slice()).map(|_| ())
                    }
                    Op::PutReport(record) => {
                        let v = json(record);
                        reports.insert((overlay, record.id.as_str()), v.as_slice()).map(|_| ())
                    }
                    Op::Inbox(seq, entry) => inbox.insert((overlay, *seq), entry.0.as_slice()).map(|_| ()),
                    Op::TrimInbox(below) => inbox.retain_in((overlay, 0)..(overlay, *below), |_, _| false),
                    Op::DeleteInbox(seq) => inbox.remove((overlay, *seq)).map(|_| ()),
                    Op::Dedup(window) => {
                        let v = json(&window.iter().map(StoredDedup::from_core).collect::<Vec<_>>());
                        dedup.insert(overlay, v.as_slice()).map(|_| ())
                    }
                    Op::ReserveInbox(below) => reserved.insert(overlay, *below).map(|_| ()),
                    Op::Raft(record) => raft.insert(overlay, record.encode().as_slice()).map(|_| ()),
                    Op::Reports(rs) => {
                        self.merge_reports(overlay, rs, &mut reports, &mut pending)?;
                        Ok(())
                    }
                };
                r.map_err(|e| self.io(e))?;
            }
        }
        self.commit_now(tx)
    }

    /// The pending events of an overlay (one that does not decode is left
    /// out and reported).
    pub fn pending(&self, overlay: &str) -> Result<Vec<PendingEvent>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(PENDING).map_err(|e| self.io(e))?;
        let range = t
            .range((overlay, "")..=(overlay, "\u{10FFFF}"))
            .map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for r in range {
            let (k, v) = r.map_err(|e| self.io(e))?;
            let (_, id) = k.value();
            match decode_pending(v.value()) {
                Ok(p) => out.push(p),
                Err(reason) => drop(self.undecodable("events_pending", format!("{overlay}/{id}"), reason)),
            }
        }
        Ok(out)
    }

    /// One pending event (the agent reads them inside its writes, see
    /// [`Op::Reports`]).
    #[cfg(test)]
    pub fn pending_one(&self, overlay: &str, id: &str) -> Result<Option<PendingEvent>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(PENDING).map_err(|e| self.io(e))?;
        let Some(v) = t.get((overlay, id)).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        decode_pending(v.value())
            .map(Some)
            .map_err(|reason| self.undecodable("events_pending", format!("{overlay}/{id}"), reason))
    }

    /// [`Op::Reports`]: the reports into their events' records, inside the
    /// transaction. A record that does not decode was reported; its
    /// reports have nowhere to go. A read that fails fails the transaction.
    fn merge_reports(
        &self,
        overlay: &str,
        rs: &[DeliveryReport],
        reports: &mut redb::Table<(&'static str, &'static str), &'static [u8]>,
        pending: &mut redb::Table<(&'static str, &'static str), &'static [u8]>,
    ) -> Result<(), PersistError> {
        for (id, rs) in crate::events::by_event(rs) {
            let key = (overlay, id.as_str());
            let found = reports
                .get(key)
                .map_err(|e| self.io(e))?
                .map(|v| serde_json::from_slice::<EventRecord>(v.value()));
            let mut record = match found {
                None => continue,
                Some(Ok(record)) => record,
                Some(Err(e)) => {
                    drop(self.undecodable("events_reports", format!("{overlay}/{id}"), e.to_string()));
                    continue;
                }
            };
            crate::events::merge_reports(&mut record, &rs);
            if record.complete {
                pending.remove(key).map_err(|e| self.io(e))?;
            } else {
                let found = pending
                    .get(key)
                    .map_err(|e| self.io(e))?
                    .map(|v| decode_pending(v.value()));
                match found {
                    Some(Ok(mut p)) => {
                        crate::events::still_waiting(&record, &mut p);
                        let v = json(&StoredPending::from_core(&p));
                        pending.insert(key, v.as_slice()).map_err(|e| self.io(e))?;
                    }
                    Some(Err(reason)) => drop(self.undecodable("events_pending", format!("{overlay}/{id}"), reason)),
                    None => {}
                }
            }
            let v = json(&record);
            reports.insert(key, v.as_slice()).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// Report records that do not decode go too (reported).
    fn retain_reports(&self, overlay: &str, keep: impl Fn(&EventRecord) -> bool) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = tx.open_table(REPORTS).map_err(|e| self.io(e))?;
            t.retain_in(
                (overlay, "")..=(overlay, "\u{10FFFF}"),
                |(_, id), v| match serde_json::from_slice::<EventRecord>(v) {
                    Ok(record) => keep(&record),
                    Err(e) => {
                        drop(self.undecodable("events_reports", format!("{overlay}/{id}"), e.to_string()));
                        false
                    }
                },
            )
            .map_err(|e| self.io(e))?;
        }
        self.commit_now(tx)
    }

    /// One event's reports.
    pub fn report(&self, overlay: &str, id: &str) -> Result<Option<EventRecord>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(REPORTS).map_err(|e| self.io(e))?;
        let Some(v) = t.get((overlay, id)).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.undecodable("events_reports", format!("{overlay}/{id}"), e.to_string()))
    }

    /// Inbox entries after `after`, payloads rendered, at most `limit` of
    /// them and — beyond the first — at most `max_bytes` stored bytes in
    /// all. An entry that does not decode is left out (and reported).
    pub fn inbox_after(
        &self,
        overlay: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<InboxItem>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(INBOX).map_err(|e| self.io(e))?;
        let from = after.saturating_add(1);
        let range = t.range((overlay, from)..=(overlay, u64::MAX)).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in range.take(limit) {
            let (k, v) = r.map_err(|e| self.io(e))?;
            let v = v.value();
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            let seq = k.value().1;
            match decode_stored(v) {
                Ok((item, _)) => out.push(item),
                Err(reason) => drop(self.undecodable("inbox", format!("{overlay}/{seq}"), reason)),
            }
        }
        Ok(out)
    }

    /// Calls `f` with what the inbox's byte cap needs of every stored entry
    /// of an overlay, in order. An entry that does not decode counts as an
    /// old at-least-once event (evicted after the others; reported).
    pub fn inbox_scan(&self, overlay: &str, mut f: impl FnMut(EntryMeta)) -> Result<(), PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(INBOX).map_err(|e| self.io(e))?;
        let range = t.range((overlay, 0)..=(overlay, u64::MAX)).map_err(|e| self.io(e))?;
        for r in range {
            let (k, v) = r.map_err(|e| self.io(e))?;
            let seq = k.value().1;
            let (alo, time_ms) = match decode_stored(v.value()) {
                Ok((item, alo)) => (alo, item.time_ms),
                Err(reason) => {
                    drop(self.undecodable("inbox", format!("{overlay}/{seq}"), reason));
                    (true, 0)
                }
            };
            f(EntryMeta {
                seq,
                len: v.value().len() as u64,
                alo,
                time_ms,
            });
        }
        Ok(())
    }

    /// The last inbox sequence number of an overlay (0: empty).
    pub fn inbox_last(&self, overlay: &str) -> Result<u64, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(INBOX).map_err(|e| self.io(e))?;
        let mut range = t.range((overlay, 0)..=(overlay, u64::MAX)).map_err(|e| self.io(e))?;
        Ok(range
            .next_back()
            .transpose()
            .map_err(|e| self.io(e))?
            .map_or(0, |(k, _)| k.value().1))
    }

    /// The next inbox sequence number of an overlay: after the last entry,
    /// and after every number that may have been handed out before a crash
    /// lost its entry.
    pub fn inbox_next(&self, overlay: &str) -> Result<u64, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(INBOX_RESERVED).map_err(|e| self.io(e))?;
        let reserved = t.get(overlay).map_err(|e| self.io(e))?.map_or(0, |v| v.value());
        Ok(reserved.max(self.inbox_last(overlay)? + 1))
    }

    /// The saved de-duplication window of an overlay (empty if none).
    /// One that does not decode is an error: starting without it would
    /// deliver duplicates, and then save the empty window over it.
    pub fn dedup(&self, overlay: &str) -> Result<Vec<DedupEntry>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(DEDUP).map_err(|e| self.io(e))?;
        let Some(v) = t.get(overlay).map_err(|e| self.io(e))? else {
            return Ok(Vec::new());
        };
        serde_json::from_slice::<Vec<StoredDedup>>(v.value())
            .map(|w| w.into_iter().map(StoredDedup::into_core).collect())
            .map_err(|e| self.undecodable(DEDUP_TABLE, overlay.to_owned(), e.to_string()))
    }

    /// The saved Raft record of an overlay (`None`: none saved). One that
    /// does not decode is an error: a candidate that started without it
    /// could vote twice in one term.
    pub fn raft(&self, overlay: &str) -> Result<Option<RaftRecord>, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(RAFT).map_err(|e| self.io(e))?;
        let Some(v) = t.get(overlay).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        RaftRecord::decode(v.value())
            .map(Some)
            .map_err(|e| self.undecodable(RAFT_TABLE, overlay.to_owned(), e.to_string()))
    }

    /// The error for a record that does not decode, logged the first time
    /// this key is found so (reads that skip it come back to it).
    fn undecodable(&self, table: &'static str, key: String, reason: String) -> PersistError {
        let first = self
            .reported
            .lock()
            .map(|mut seen| seen.insert((table, key.clone())))
            .unwrap_or(true);
        if first {
            tracing::error!(database = %self.path.display(), table, %key, %reason, "a stored record does not decode");
        }
        PersistError::Record {
            path: self.path.clone(),
            table,
            key,
            reason,
        }
    }
}

/// One write of [`Db::write`], all for one overlay.
#[derive(Debug, Clone)]
pub enum Op {
    /// Saves a pending event (under its id).
    PutPending(PendingEvent),
    /// Saves an event's reports (under its id).
    PutReport(EventRecord),
    /// Appends to the inbox.
    Inbox(u64, EncodedEntry),
    /// Drops inbox entries below a sequence number.
    TrimInbox(u64),
    /// Drops one inbox entry (evicted for the byte cap).
    DeleteInbox(u64),
    /// Saves the de-duplication window.
    Dedup(Vec<DedupEntry>),
    /// Inbox sequence numbers up to this one (excluded) may be handed out.
    ReserveInbox(u64),
    /// Saves the overlay's latest Raft record over the one before.
    Raft(RaftRecord),
    /// Takes delivery reports into their events' stored records (and
    /// pending events), read and written in the same transaction.
    Reports(Vec<DeliveryReport>),
}

// ----- the stored forms of the records

/// What the inbox's byte cap needs of a stored entry (see [`Db::inbox_scan`]).
#[derive(Debug, Clone, Copy)]
pub struct EntryMeta {
    /// Its sequence number.
    pub seq: u64,
    /// Its stored size.
    pub len: u64,
    /// Whether it is an at-least-once event.
    pub alo: bool,
    /// When it was stored (wall-clock milliseconds).
    pub time_ms: u64,
}

/// An inbox entry ready to be stored: its size counts against the inbox's
/// byte cap before it is written.
#[derive(Debug, Clone)]
pub struct EncodedEntry(Vec<u8>);

impl EncodedEntry {
    /// `item` (its payload fields are ignored), with `payload` stored once,
    /// as bytes; `alo` for an at-least-once event.
    pub fn new(item: &InboxItem, payload: Option<&[u8]>, alo: bool) -> EncodedEntry {
        EncodedEntry(encode_stored(item, payload, alo))
    }

    /// Its size in the database.
    pub fn size(&self) -> usize {
        self.0.len()
    }
}

fn decode_pending(bytes: &[u8]) -> Result<PendingEvent, String> {
    serde_json::from_slice::<StoredPending>(bytes)
        .map_err(|e| e.to_string())?
        .to_core()
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// An inbox entry as stored: the item without its payload fields, and
/// the payload bytes once.
#[derive(Debug, Serialize, Deserialize)]
struct StoredHeader {
    #[serde(flatten)]
    item: InboxItem,
    /// An at-least-once event (never evicted for the byte cap before a day).
    #[serde(default)]
    alo: bool,
    /// Whether a payload follows the header.
    #[serde(default)]
    has_payload: bool,
}

/// Marks the stored form (a JSON entry of earlier versions starts with `{`).
const STORED_MAGIC: &[u8; 4] = b"\0RI1";

/// Encodes an entry: header, then the payload bytes.
fn encode_stored(item: &InboxItem, payload: Option<&[u8]>, alo: bool) -> Vec<u8> {
    let header = StoredHeader {
        item: InboxItem {
            payload: None,
            payload_base64: None,
            ..item.clone()
        },
        alo,
        has_payload: payload.is_some(),
    };
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let p = payload.unwrap_or_default();
    let mut out = Vec::with_capacity(8 + h.len() + p.len());
    out.extend_from_slice(STORED_MAGIC);
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(p);
    out
}

/// Decodes a stored entry, with its payload rendered, and whether it is an
/// at-least-once event. Entries of earlier versions (JSON) count as
/// at-least-once when they carry an event id on an application topic.
fn decode_stored(bytes: &[u8]) -> Result<(InboxItem, bool), String> {
    let Some(rest) = bytes.strip_prefix(STORED_MAGIC) else {
        let item: InboxItem = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let alo = item.id.is_some() && !is_local(&item.topic);
        return Ok((item, alo));
    };
    let truncated = || "truncated".to_owned();
    let len: [u8; 4] = rest.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(truncated)?;
    let len = u32::from_le_bytes(len) as usize;
    let header = rest.get(4..4usize.saturating_add(len)).ok_or_else(truncated)?;
    let header: StoredHeader = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let mut item = header.item;
    if header.has_payload {
        let (text, b64) = payload_fields(rest.get(4 + len..).ok_or_else(truncated)?);
        item.payload = text;
        item.payload_base64 = b64;
    }
    Ok((item, header.alo))
}

/// A pending event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPending {
    origin: String,
    epoch: u64,
    seq: u64,
    topic: String,
    payload: String,
    retry_every_ms: u64,
    retry_max: u32,
    waiting: Vec<(String, u32, u32)>,
}

impl StoredPending {
    fn from_core(p: &PendingEvent) -> StoredPending {
        StoredPending {
            origin: p.id.origin.to_string(),
            epoch: p.id.epoch,
            seq: p.id.seq,
            topic: p.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&p.payload),
            retry_every_ms: u64::try_from(p.retry_every.as_millis()).unwrap_or(u64::MAX),
            retry_max: p.retry_max,
            waiting: p.waiting.iter().map(|(n, a, r)| (n.to_string(), *a, *r)).collect(),
        }
    }

    fn to_core(&self) -> Result<PendingEvent, String> {
        Ok(PendingEvent {
            id: EventId {
                origin: self.origin.as_str().into(),
                epoch: self.epoch,
                seq: self.seq,
            },
            topic: self.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD
                .decode(&self.payload)
                .map_err(|e| format!("payload: {e}"))?,
            retry_every: Duration::from_millis(self.retry_every_ms),
            retry_max: self.retry_max,
            waiting: self
                .waiting
                .iter()
                .map(|(n, a, r)| (n.as_str().into(), *a, *r))
                .collect(),
        })
    }
}

/// One publisher life's part of the de-duplication window, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredDedup {
    origin: String,
    epoch: u64,
    floor: u64,
    above: Vec<u64>,
}

impl StoredDedup {
    fn from_core(w: &DedupEntry) -> StoredDedup {
        StoredDedup {
            origin: w.origin.to_string(),
            epoch: w.epoch,
            floor: w.floor,
            above: w.above.clone(),
        }
    }

    fn into_core(self) -> DedupEntry {
        DedupEntry {
            origin: self.origin.into(),
            epoch: self.epoch,
            floor: self.floor,
            above: self.above,
        }
    }
}

/// Creates the database file with mode 0600 if it does not exist (redb
/// would create it with the umask's), and gives an existing one that mode.
fn private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata()?.permissions().mode() & 0o777;
        if mode != 0o600 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            tracing::info!(file = %path.display(), mode = %format!("{mode:o}"), "database file made private (0600)");
        }
    }
    Ok(())
}

/// Creates `dir` with mode 0700 (it holds keys and the admin token); an
/// existing directory that others may enter, read or write is refused.
pub fn create_private_dir(dir: &Path) -> Result<(), PersistError> {
    let err = |source| PersistError::Dir {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(PersistError::OpenDir {
                    path: dir.to_owned(),
                    mode,
                });
            }
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::DirBuilderExt;

    /// An inbox entry of topic `t`.
    fn entry(t: &str) -> EncodedEntry {
        let item = InboxItem {
            seq: 0,
            topic: t.into(),
            id: None,
            payload: None,
            payload_base64: None,
            member: None,
            key: None,
            outcome: None,
            rack: None,
            term: None,
            time_ms: 0,
            elided: false,
        };
        EncodedEntry::new(&item, None, false)
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rm-persist-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = temp("reopen");
        let mut rec = OverlayRecord::new(OverlaySpec::named("a"), "m".into());
        rec.keys = vec![crate::config::generate_key()];
        rec.peers = vec!["127.0.0.1:9".parse().unwrap()];
        {
            let db = Db::open(&dir).unwrap();
            db.put_overlay(&rec).await.unwrap();
            assert!(matches!(Db::open(&dir), Err(PersistError::InUse { .. })));
        }
        let db = Db::open(&dir).unwrap();
        assert_eq!(db.overlays().unwrap(), vec![rec]);
        db.delete_overlay("a").await.unwrap();
        assert!(db.overlays().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn inbox_numbers_are_never_handed_out_twice() {
        let dir = temp("inbox");
        {
            let db = Db::open(&dir).unwrap();
            assert_eq!(db.inbox_next("o").unwrap(), 1);
            db.write("o", vec![Op::Inbox(1, entry("a")), Op::ReserveInbox(100)])
                .await
                .unwrap();
            // Entries written without a flush, then flushed by the next
            // durable write.
            db.write_volatile("o", vec![Op::Inbox(2, entry("b"))]).await.unwrap();
            db.write("o", vec![]).await.unwrap();
            assert_eq!(db.inbox_after("o", 0, 10, usize::MAX).unwrap().len(), 2);
            // Numbers up to the reservation may have been seen by an
            // application before a crash lost their entries: not reused.
            assert_eq!(db.inbox_next("o").unwrap(), 100);
            db.write("o", vec![Op::TrimInbox(3)]).await.unwrap();
            assert_eq!(db.inbox_next("o").unwrap(), 100);
        }
        let db = Db::open(&dir).unwrap();
        assert_eq!(db.inbox_next("o").unwrap(), 100);
        db.write("o", vec![Op::Inbox(150, entry("c"))]).await.unwrap();
        assert_eq!(db.inbox_next("o").unwrap(), 151);
        db.delete_overlay("o").await.unwrap();
        assert_eq!(db.inbox_next("o").unwrap(), 1, "a recreated overlay starts anew");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn records_that_do_not_decode_are_errors_naming_their_key() {
        let dir = temp("undecodable");
        let db = Db::open(&dir).unwrap();
        let window = vec![DedupEntry {
            origin: "p".into(),
            epoch: 2,
            floor: 7,
            above: vec![9],
        }];
        db.write("a", vec![Op::Dedup(window.clone())]).await.unwrap();
        assert_eq!(db.dedup("a").unwrap(), window, "a window comes back as it went");
        assert!(db.dedup("none").unwrap().is_empty());
        {
            let tx = db.db.begin_write().unwrap();
            tx.open_table(DEDUP)
                .unwrap()
                .insert("o", b"not json".as_slice())
                .unwrap();
            tx.open_table(PENDING)
                .unwrap()
                .insert(("o", "p/1/1"), b"{".as_slice())
                .unwrap();
            tx.open_table(INBOX)
                .unwrap()
                .insert(("o", 1), b"\0RI1garbage".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        // A window that does not decode is an error, not an empty window.
        let err = db.dedup("o").unwrap_err();
        assert!(
            matches!(&err, PersistError::Record { table: "events_dedup", key, .. } if key == "o"),
            "{err}"
        );
        assert!(
            err.to_string().contains("the record events_dedup/o does not decode"),
            "{err}"
        );
        // Lists leave such records out; single reads are errors.
        assert!(db.pending("o").unwrap().is_empty());
        assert!(matches!(db.pending_one("o", "p/1/1"), Err(PersistError::Record { .. })));
        assert!(db.inbox_after("o", 0, 10, usize::MAX).unwrap().is_empty());
        let mut scanned = Vec::new();
        db.inbox_scan("o", |e| scanned.push((e.seq, e.alo))).unwrap();
        assert_eq!(scanned, vec![(1, true)], "counted as an old at-least-once entry");
        // Each key is reported once, however often it is read.
        let _ = db.dedup("o");
        let _ = db.pending("o");
        assert_eq!(db.reported.lock().unwrap().len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn private_dir(dir: &Path) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .unwrap();
    }

    #[test]
    fn the_database_is_private_and_an_open_directory_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp("modes");
        drop(Db::open(&dir).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
        // A file left readable by an older version is made private.
        std::fs::set_permissions(dir.join(DB_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Db::open(&dir).unwrap());
        assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
        // A directory others can read is refused, with the fix.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Db::open(&dir).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "data directory {} is open to other users (mode 755) and holds keys: run `chmod 700 {}`",
                dir.display(),
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_and_foreign_files_are_refused_clearly() {
        let dir = temp("garbage");
        private_dir(&dir);
        std::fs::write(dir.join(DB_FILE), vec![0x5a; 10_000]).unwrap();
        let err = Db::open(&dir).unwrap_err();
        assert!(err.to_string().contains("not a usable Rumormill database"), "{err}");

        let foreign = temp("foreign");
        private_dir(&foreign);
        {
            let db = redb::Database::create(foreign.join(DB_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(TableDefinition::<&str, u64>::new("accounts")).unwrap();
            tx.commit().unwrap();
        }
        let err = Db::open(&foreign).unwrap_err();
        assert!(err.to_string().contains("another program"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&foreign).unwrap();
    }
}
