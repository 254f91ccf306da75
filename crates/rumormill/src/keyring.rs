//! Cluster-wide key rotation.
//!
//! Every key operation on one agent changes the keyring of every member of
//! the overlay, as with Serf's `keys` commands. The agent that takes the
//! request applies it, then writes a desired keyring (the keys, primary
//! first, and a version one above the highest it has seen) to the replicated
//! store under `_rumormill/keyring/<member>`; every member follows the
//! desired keyring of highest version (ties broken by member name), whatever
//! order the writes arrive in. An operation that changes nothing writes
//! nothing, so a late no-op can never undo a newer change. Each member also publishes
//! which keys it holds, and which is its primary, under
//! `_rumormill/keys/<member>`, so the requesting agent can tell when every
//! live member has followed, and can refuse a step that would lose packets:
//!
//! 1. `install NEW` — every member accepts NEW from now on;
//! 2. `use NEW` — refused until every live member reports NEW installed;
//!    then every member seals with NEW;
//! 3. `remove OLD` — refused while a live member still seals with OLD.
//!
//! Packets already in flight under OLD when it is removed are the only ones
//! rejected; none is rejected once the rotation has completed. The desired
//! keyring travels encrypted under the overlay's current keys, to members
//! that hold them already.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use rumormill_core::{Event, KeyId, MemberInfo, Overlay};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use crate::agent::{Agent, AgentError, RESERVED_PREFIX, core_error, plaintext, running_mut, stopped, wall_ms};
use crate::config;
use crate::driver::OverlayHandle;
use crate::transport::Net;

/// Store keys of desired keyrings: this prefix and the writer's name.
pub const DESIRED_PREFIX: &str = "_rumormill/keyring/";
/// How often the requesting agent looks at the members' reports.
const POLL: Duration = Duration::from_millis(20);

fn report_key(member: &str) -> String {
    format!("{RESERVED_PREFIX}keys/{member}")
}

/// A desired keyring: base64 keys, primary first; the highest version wins.
#[derive(Debug, Serialize, Deserialize)]
struct Desired {
    version: u64,
    keys: Vec<String>,
}

/// The desired keyring to follow: highest `(version, writer)`.
fn newest_desired(o: &Overlay) -> Option<(u64, String, Desired)> {
    o.store()
        .iter()
        .filter_map(|u| {
            let writer = u.key.strip_prefix(DESIRED_PREFIX)?;
            let d: Desired = serde_json::from_slice(u.value.as_deref()?).ok()?;
            Some((d.version, writer.to_owned(), d))
        })
        .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
}

/// What a member reports of its keyring (ids only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Report {
    primary: String,
    installed: Vec<String>,
}

/// A key of an overlay's keyring (never the secret), with how many live
/// members hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KeyRow {
    /// Key id (hex), as in packet headers.
    pub id: String,
    /// Cipher suite.
    pub suite: String,
    /// Whether this agent seals outgoing packets with it.
    pub primary: bool,
    /// Live members (this one included) that report it installed.
    pub installed_on: usize,
    /// Live members that report it as their primary.
    pub primary_on: usize,
    /// Live members in the overlay.
    pub members: usize,
}

/// The outcome of a cluster-wide key operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KeyChange {
    /// The key's id.
    pub id: String,
    /// Live members.
    pub members: usize,
    /// Members that have applied the change.
    pub done: Vec<String>,
    /// Live members that had not applied it when the wait ended.
    pub missing: Vec<String>,
}

/// Key ids are shown as 8 hex digits.
pub fn key_hex(id: KeyId) -> String {
    format!("{id:08x}")
}

fn parse_key_id(s: &str) -> Result<KeyId, AgentError> {
    KeyId::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| AgentError::BadRequest(format!("{s:?} is not a key id (8 hex digits, see `keys list`)")))
}

fn find_key(keys: &[String], id: KeyId) -> Option<usize> {
    keys.iter()
        .position(|k| config::decode_key(k).is_ok_and(|b| rumormill_wire::key_id(&b) == id))
}

fn own_report(o: &Overlay) -> Option<Report> {
    let keys = o.keys()?;
    Some(Report {
        primary: keys
            .iter()
            .find(|k| k.primary)
            .map(|k| key_hex(k.id))
            .unwrap_or_default(),
        installed: keys.iter().map(|k| key_hex(k.id)).collect(),
    })
}

/// Publishes the local member's report when it changed.
fn publish(o: &mut Overlay, now: std::time::Instant) {
    let Some(report) = own_report(o) else { return };
    let key = report_key(o.name());
    let Ok(json) = serde_json::to_vec(&report) else { return };
    if o.store().value(&key) != Some(json.as_slice()) {
        o.advance_clock(wall_ms());
        let _ = o.put(now, &key, json);
    }
}

/// Publishes the local member's report (at start).
pub(crate) async fn publish_report(handle: &OverlayHandle) {
    let _ = handle.call(publish).await;
}

/// Live members, by name, and their reports (`None`: nothing heard yet).
fn reports(o: &Overlay) -> Vec<(String, Option<Report>)> {
    let local = o.local();
    let mut rows: Vec<(String, Option<Report>)> = std::iter::once(local.clone())
        .chain(
            o.members()
                .filter(|m: &MemberInfo| m.state.is_live() && m.name != local.name),
        )
        .map(|m| {
            let report = o
                .store()
                .value(&report_key(&m.name))
                .and_then(|v| serde_json::from_slice::<Report>(v).ok());
            (m.name.to_string(), report)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Installs the keys, makes the first primary, removes the others; then
/// publishes the report, and the desired keyring when given.
fn apply(
    o: &mut Overlay,
    now: std::time::Instant,
    keys: &[Vec<u8>],
    desired: Option<Desired>,
) -> Result<(), AgentError> {
    let wanted: BTreeSet<KeyId> = keys.iter().map(|k| rumormill_wire::key_id(k)).collect();
    for k in keys {
        o.install_key(k).map_err(core_error)?;
    }
    if let Some(primary) = keys.first() {
        o.use_key(rumormill_wire::key_id(primary)).map_err(core_error)?;
    }
    for k in o.keys().unwrap_or_default() {
        if !wanted.contains(&k.id) {
            o.remove_key(k.id).map_err(core_error)?;
        }
    }
    publish(o, now);
    if let Some(d) = desired {
        let json = serde_json::to_vec(&d).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let key = format!("{DESIRED_PREFIX}{}", o.name());
        o.advance_clock(wall_ms());
        o.put(now, &key, json).map_err(core_error)?;
    }
    Ok(())
}

impl<N: Net> Agent<N> {
    /// The keyring: ids and suites, and how many live members hold each key.
    pub async fn keys(&self, name: &str) -> Result<Vec<KeyRow>, AgentError> {
        let handle = self.handle(name).await?;
        let (keys, reports) = handle
            .call(|o, _| (o.keys(), reports(o)))
            .await
            .map_err(|_| stopped(name))?;
        let keys = keys.ok_or_else(|| plaintext(name))?;
        Ok(keys
            .into_iter()
            .map(|k| {
                let id = key_hex(k.id);
                let known = || reports.iter().filter_map(|(_, r)| r.as_ref());
                KeyRow {
                    installed_on: known().filter(|r| r.installed.contains(&id)).count(),
                    primary_on: known().filter(|r| r.primary == id).count(),
                    members: reports.len(),
                    id,
                    suite: k.suite.to_owned(),
                    primary: k.primary,
                }
            })
            .collect())
    }

    /// The keyring's secrets, primary first (for other agents to join).
    pub async fn export_keys(&self, name: &str) -> Result<Vec<String>, AgentError> {
        let overlays = self.overlays.lock().await;
        let r = overlays
            .get(name)
            .ok_or_else(|| AgentError::UnknownOverlay(name.to_owned()))?;
        if r.record.keys.is_empty() {
            return Err(plaintext(name));
        }
        Ok(r.record.keys.clone())
    }

    /// Installs a key on every member; waits up to `wait` for all live
    /// members to report it.
    pub async fn install_key(&self, name: &str, key: &str, wait: Duration) -> Result<KeyChange, AgentError> {
        let bytes = config::decode_key(key).map_err(AgentError::BadRequest)?;
        let id = rumormill_wire::key_id(&bytes);
        let key = key.trim().to_owned();
        self.change_keyring(name, |keys| {
            if !keys.contains(&key) {
                keys.push(key);
            }
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), "key installed");
        let hex = key_hex(id);
        Ok(self.wait_for(name, id, wait, move |r| r.installed.contains(&hex)).await)
    }

    /// Makes a key primary on every member. Refused unless every live
    /// member reports it installed.
    pub async fn use_key(&self, name: &str, id: &str, wait: Duration) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let hex = key_hex(id);
        if find_key(&self.export_keys(name).await?, id).is_none() {
            return Err(unknown_key(id));
        }
        let lacking = self
            .members_where(name, wait, |r| !r.is_some_and(|r| r.installed.contains(&hex)))
            .await?;
        if !lacking.is_empty() {
            return Err(AgentError::Conflict(format!(
                "key {hex} is not installed on {}: install it everywhere first (`keys install`), or the packets they cannot open would be lost",
                lacking.join(", ")
            )));
        }
        self.change_keyring(name, |keys| {
            let pos = find_key(keys, id).ok_or_else(|| unknown_key(id))?;
            let k = keys.remove(pos);
            keys.insert(0, k);
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %hex, "primary key changed");
        Ok(self.wait_for(name, id, wait, move |r| r.primary == hex).await)
    }

    /// Removes a key from every member. Refused while a live member still
    /// seals with it.
    pub async fn remove_key(&self, name: &str, id: &str, wait: Duration) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let hex = key_hex(id);
        match self.export_keys(name).await?.first() {
            Some(k) if config::decode_key(k).is_ok_and(|b| rumormill_wire::key_id(&b) == id) => {
                return Err(AgentError::Conflict(format!(
                    "key {hex} is the primary key: make another one primary first (`keys use`)"
                )));
            }
            _ => {}
        }
        let sealing = self
            .members_where(name, wait, |r| r.is_some_and(|r| r.primary == hex))
            .await?;
        if !sealing.is_empty() {
            return Err(AgentError::Conflict(format!(
                "key {hex} is the primary key of {}: make another key primary first (`keys use`)",
                sealing.join(", ")
            )));
        }
        self.change_keyring(name, |keys| {
            let pos = find_key(keys, id).ok_or_else(|| unknown_key(id))?;
            if pos == 0 {
                return Err(AgentError::Conflict(format!(
                    "key {} is the primary key: make another one primary first",
                    key_hex(id)
                )));
            }
            keys.remove(pos);
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %hex, "key removed");
        Ok(self
            .wait_for(name, id, wait, move |r| !r.installed.contains(&hex))
            .await)
    }

    /// Edits the overlay's keyring (the newest desired one, or this
    /// member's own if it is newer), applies and saves it, and publishes it
    /// with a version above every one seen.
    async fn change_keyring(
        &self,
        name: &str,
        edit: impl FnOnce(&mut Vec<String>) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = running_mut(&mut overlays, name)?;
        if r.record.keys.is_empty() {
            return Err(plaintext(name));
        }
        let newest = r
            .handle
            .call(|o, _| newest_desired(o))
            .await
            .map_err(|_| stopped(name))?;
        let (base, seen) = match newest {
            Some((v, _, d)) if v >= r.record.keyring_version && !d.keys.is_empty() => (d.keys, v),
            other => (r.record.keys.clone(), other.map_or(0, |(v, _, _)| v)),
        };
        let mut keys = base.clone();
        edit(&mut keys)?;
        let version = seen.max(r.record.keyring_version) + 1;
        let desired = (keys != base).then(|| Desired {
            version,
            keys: keys.clone(),
        });
        if desired.is_none() && keys == r.record.keys {
            return Ok(()); // nothing to change, nothing to publish
        }
        let bytes = decode_all(&keys)?;
        let published = desired.is_some();
        r.handle
            .call(move |o, now| apply(o, now, &bytes, desired))
            .await
            .map_err(|_| stopped(name))??;
        r.record.keys = keys;
        if published {
            r.record.keyring_version = version;
        }
        self.db.put_overlay(&r.record)?;
        Ok(())
    }

    /// Follows the newest desired keyring in the store, read under the
    /// agent's lock so that a change made meanwhile is never undone.
    async fn follow(&self, name: &str) -> Result<(), AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = running_mut(&mut overlays, name)?;
        let newest = r
            .handle
            .call(|o, _| newest_desired(o))
            .await
            .map_err(|_| stopped(name))?;
        let Some((version, writer, desired)) = newest else {
            return Ok(());
        };
        if version < r.record.keyring_version || desired.keys.is_empty() || desired.keys == r.record.keys {
            r.record.keyring_version = r.record.keyring_version.max(version);
            return Ok(());
        }
        let bytes = decode_all(&desired.keys)?;
        let primary = key_hex(rumormill_wire::key_id(&bytes[0]));
        r.handle
            .call(move |o, now| apply(o, now, &bytes, None))
            .await
            .map_err(|_| stopped(name))??;
        r.record.keys = desired.keys;
        r.record.keyring_version = version;
        self.db.put_overlay(&r.record)?;
        tracing::info!(overlay = %name, %primary, version, %writer, "keyring changed by the overlay");
        Ok(())
    }

    /// Names of live members whose report matches `pred`, once none does or
    /// `wait` has passed.
    async fn members_where(
        &self,
        name: &str,
        wait: Duration,
        pred: impl Fn(Option<&Report>) -> bool,
    ) -> Result<Vec<String>, AgentError> {
        // Reports spread like any value: one just published elsewhere may
        // not be here yet, so give them up to `wait` to arrive.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let handle = self.handle(name).await?;
            let rows = handle.call(|o, _| reports(o)).await.map_err(|_| stopped(name))?;
            let matching: Vec<String> = rows
                .into_iter()
                .filter(|(_, r)| pred(r.as_ref()))
                .map(|(n, _)| n)
                .collect();
            if matching.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(matching);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `wait` for every live member's report to satisfy `done`.
    async fn wait_for(&self, name: &str, id: KeyId, wait: Duration, done: impl Fn(&Report) -> bool) -> KeyChange {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let rows = match self.handle(name).await {
                Ok(h) => h.call(|o, _| reports(o)).await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let (ok, missing): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, r)| r.as_ref().is_some_and(&done));
            let change = KeyChange {
                id: key_hex(id),
                members: ok.len() + missing.len(),
                done: ok.into_iter().map(|(n, _)| n).collect(),
                missing: missing.into_iter().map(|(n, _)| n).collect(),
            };
            if change.missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return change;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn unknown_key(id: KeyId) -> AgentError {
    AgentError::BadRequest(format!("no key with id {} is installed", key_hex(id)))
}

fn decode_all(keys: &[String]) -> Result<Vec<Vec<u8>>, AgentError> {
    keys.iter()
        .map(|k| config::decode_key(k).map_err(AgentError::BadRequest))
        .collect()
}

/// Follows the overlay's desired keyring: runs while the overlay does.
pub(crate) async fn watch<N: Net>(agent: Weak<Agent<N>>, name: String, handle: OverlayHandle) {
    let mut events = handle.subscribe();
    loop {
        match events.recv().await {
            Ok(Event::Update(u)) if u.update.key.starts_with(DESIRED_PREFIX) => {}
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => {} // look at the store itself
            Err(RecvError::Closed) => return,
        }
        let Some(agent) = agent.upgrade() else { return };
        if let Err(e) = agent.follow(&name).await {
            tracing::warn!(overlay = %name, error = %e, "desired keyring not applied");
        }
    }
}
