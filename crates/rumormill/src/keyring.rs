//! Cluster-wide key rotation, as the agent serves it.
//!
//! The rules live in the core ([`rumormill_core::keys`]): versioned
//! desired keyrings, the tie-break by writer, the refusal of versions a day
//! ahead, local and shared keys, the reports and the refusal of a `use` or a
//! `remove` that would lose packets. The agent takes the operations from the
//! API, retries one refused only because reports are still on their way
//! (for up to the request's wait), waits until every live member has
//! followed, and keeps the keyring in its data directory: after each
//! operation, and whenever the core reports that it followed the overlay's
//! keyring ([`rumormill_core::Notification::Keys`]).

use std::sync::Weak;
use std::time::Duration;

use base64::Engine;
use rumormill_core::keys::{KeyError as CoreKeyError, KeyStep, KeyringRecord, KeysNotification};
use rumormill_core::{KeyId, Notification, Overlay, WireError};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use crate::agent::{Agent, AgentError, RecordSave, Running, core_error, plaintext, stopped, wall};
use crate::config;
use crate::driver::OverlayHandle;
use crate::persist::OverlayRecord;
use crate::transport::Net;

/// How often a refused step is tried again, and the members' reports
/// looked at, while waiting.
const POLL: Duration = Duration::from_millis(20);

/// A key of an overlay's keyring (never the secret), with how many live
/// members hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyRow {
    /// Key id (hex), as in packet headers.
    pub id: String,
    /// Cipher suite.
    pub suite: String,
    /// Whether this agent seals outgoing packets with it.
    pub primary: bool,
    /// Whether it was installed on this agent alone (`scope=local`): its
    /// secret never travels in the overlay's store.
    pub local: bool,
    /// Live members (this one included) that report it installed.
    pub installed_on: usize,
    /// Live members that report it as their primary.
    pub primary_on: usize,
    /// Live members in the overlay.
    pub members: usize,
}

/// The outcome of a key operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyChange {
    /// The key's id.
    pub id: String,
    /// Live members.
    pub members: usize,
    /// Members that have applied the change.
    pub done: Vec<String>,
    /// Live members that had not applied it when the wait ended (for a
    /// local install: the members that do not report the key yet).
    pub missing: Vec<String>,
    /// Members left out on request (`exclude`): not waited for; they are
    /// cut off once the old key is removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
}

/// Key ids are shown as 8 hex digits.
pub fn key_hex(id: KeyId) -> String {
    format!("{id:08x}")
}

fn parse_hex(s: &str) -> Option<KeyId> {
    KeyId::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Why a key operation was refused. None changed the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not a key id.
    #[error("{0:?} is not a key id (8 hex digits, see `keys list`)")]
    InvalidId(String),
    /// No installed key has that id.
    #[error("no key with id {} is installed", key_hex(*.0))]
    Unknown(KeyId),
    /// Not a key (the message says why).
    #[error("{0}")]
    InvalidSecret(String),
    /// The newest version seen is more than a day ahead of this agent's
    /// clock: a version above it would be refused by the others.
    #[error(
        "the newest keyring version ({seen}) is more than a day ahead of this agent's clock ({now} ms): check the clocks; a key change can be made once the clock has passed it"
    )]
    ClockBehind {
        /// The newest version seen.
        seen: u64,
        /// This agent's clock (milliseconds).
        now: u64,
    },
    /// A local removal of a key the overlay's keyring names.
    #[error(
        "key {0} is part of the overlay's keyring, not only of this agent's: remove it from every member (`keys remove` without `--local`)"
    )]
    NotLocal(String),
    /// A `use` of a key that live members lack.
    #[error(
        "key {hex} is not installed on {}: install it there first (`keys install`, or `keys install --local` on each agent to keep), or leave them out with `--exclude` (they are cut off once the old key is removed); otherwise the packets they cannot open would be lost",
        .lacking.join(", ")
    )]
    NotInstalled {
        /// The key id.
        hex: String,
        /// The live members without it.
        lacking: Vec<String>,
    },
    /// A removal of the primary key (this agent's or the keyring's).
    #[error("key {0} is the primary key: make another one primary first (`keys use`)")]
    Primary(String),
    /// A removal of a key live members seal with.
    #[error(
        "key {hex} is the primary key of {}: make another key primary first (`keys use`), or leave them out with `--exclude`",
        .members.join(", ")
    )]
    PrimaryOf {
        /// The key id.
        hex: String,
        /// The members sealing with it.
        members: Vec<String>,
    },
    /// The change would leave this member without a key.
    #[error("the change would leave this member without a key")]
    NoKeyLeft,
}

fn parse_key_id(s: &str) -> Result<KeyId, AgentError> {
    parse_hex(s).ok_or_else(|| KeyError::InvalidId(s.to_owned()).into())
}

/// A key operation the core refused, as the agent's domain error.
fn key_error(name: &str, e: CoreKeyError) -> AgentError {
    use CoreKeyError as Core;
    match e {
        Core::Plaintext => plaintext(name),
        Core::Unknown(id) => KeyError::Unknown(id).into(),
        Core::Primary(id) => KeyError::Primary(key_hex(id)).into(),
        Core::NotInstalledOn { key, members } => KeyError::NotInstalled {
            hex: key_hex(key),
            lacking: members,
        }
        .into(),
        Core::PrimaryOf { key, members } => KeyError::PrimaryOf {
            hex: key_hex(key),
            members,
        }
        .into(),
        Core::NotLocal(id) => KeyError::NotLocal(key_hex(id)).into(),
        Core::NoKeyLeft => KeyError::NoKeyLeft.into(),
        Core::VersionAhead { seen, now } => KeyError::ClockBehind { seen, now }.into(),
        Core::Core(e) => core_error(e),
        // The keyring refused the secret: not a key of a suite's length.
        Core::Wire(e @ WireError::KeyLength(_)) => KeyError::InvalidSecret(e.to_string()).into(),
        Core::Wire(e) => core_error(rumormill_core::CoreError::Key(e)),
        // A refusal the core added since (its error is non-exhaustive).
        other => KeyError::InvalidSecret(other.to_string()).into(),
    }
}

fn decode_secret(key: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, AgentError> {
    config::decode_key(key).map_err(|m| KeyError::InvalidSecret(m).into())
}

/// The core's form of what a record keeps of the keyring; `None` for a
/// plain-text overlay. Entries that do not decode are left out.
pub(crate) fn keyring_of(rec: &OverlayRecord) -> Option<KeyringRecord> {
    if rec.keys.is_empty() {
        return None;
    }
    Some(KeyringRecord {
        keys: rec.keys.iter().filter_map(|k| config::decode_key(k).ok()).collect(),
        local: rec.local_keys.iter().filter_map(|h| parse_hex(h)).collect(),
        pending: rec.pending_keys.iter().filter_map(|h| parse_hex(h)).collect(),
        version: rec.keyring_version,
    })
}

/// `rec` holding the core's keyring.
fn with_keyring(rec: &OverlayRecord, k: &KeyringRecord) -> OverlayRecord {
    let mut rec = rec.clone();
    let mut old = std::mem::replace(
        &mut rec.keys,
        k.keys
            .iter()
            .map(|s| base64::engine::general_purpose::STANDARD.encode(&s[..]))
            .collect(),
    );
    zeroize::Zeroize::zeroize(&mut old);
    rec.local_keys = k.local.iter().map(|&id| key_hex(id)).collect();
    rec.pending_keys = k.pending.iter().map(|&id| key_hex(id)).collect();
    rec.keyring_version = k.version;
    rec
}

/// Brings an overlay's record up to the keyring its core holds; the save
/// to write if that changed anything. The record in memory changes first,
/// so that a save that is cancelled or fails is never undone by a later
/// save of the stale record.
pub(crate) async fn refresh(r: &mut Running) -> Option<RecordSave> {
    let Ok(Some(k)) = r.handle.call(|o, _| o.keyring_record()).await else {
        return None;
    };
    let rec = with_keyring(&r.record, &k);
    if rec == r.record {
        return None;
    }
    r.record = rec;
    Some(r.record_save())
}

impl<N: Net> Agent<N> {
    /// The keyring: ids and suites, and how many live members hold each key.
    pub async fn keys(&self, name: &str) -> Result<Vec<KeyRow>, AgentError> {
        let handle = self.handle(name).await?;
        let (keys, reports, local) = handle
            .call(|o, _| (o.keys(), o.key_reports(), o.local_keys()))
            .await
            .map_err(|_| stopped(name))?;
        let keys = keys.ok_or_else(|| plaintext(name))?;
        Ok(keys
            .into_iter()
            .map(|k| {
                let known = || reports.iter().filter_map(|(_, r)| r.as_ref());
                KeyRow {
                    installed_on: known().filter(|r| KeyStep::Installed(k.id).reached_by(r)).count(),
                    primary_on: known().filter(|r| KeyStep::Primary(k.id).reached_by(r)).count(),
                    members: reports.len(),
                    local: local.contains(&k.id),
                    id: key_hex(k.id),
                    suite: k.suite.to_owned(),
                    primary: k.primary,
                }
            })
            .collect())
    }

    /// The keyring's secrets, primary first (for other agents to join).
    pub async fn export_keys(&self, name: &str) -> Result<Vec<String>, AgentError> {
        let handle = {
            let r = self.lock(name).await?;
            if r.record.keys.is_empty() {
                return Err(plaintext(name));
            }
            if r.left {
                return Ok(r.record.keys.clone());
            }
            r.handle.clone()
        };
        // The core's keyring is the current one: the record follows it a
        // moment later.
        let k = handle
            .call(|o, _| o.keyring_record())
            .await
            .map_err(|_| stopped(name))?
            .ok_or_else(|| plaintext(name))?;
        Ok(k.keys
            .iter()
            .map(|s| base64::engine::general_purpose::STANDARD.encode(&s[..]))
            .collect())
    }

    /// Installs a key on every member; waits up to `wait` for all live
    /// members to report it. The secret travels in the overlay's store,
    /// sealed under the current keys: every current holder learns it.
    pub async fn install_key(&self, name: &str, key: &str, wait: Duration) -> Result<KeyChange, AgentError> {
        let secret = decode_secret(key)?;
        let id = rumormill_wire::key_id(&secret);
        self.key_operation(name, Duration::ZERO, move |o, now| {
            o.install_key_everywhere(now, wall(), &secret).map(|_| ())
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), "key installed");
        Ok(self.wait_for(name, id, wait, &[], KeyStep::Installed(id)).await)
    }

    /// Installs a key on this agent alone: packets sealed with it are
    /// accepted here from now on. The secret never enters the overlay's
    /// store (only its id, in this member's report), so a member can be
    /// rotated out: install the new key this way on every agent to keep,
    /// then `use` it and `remove` the old one, excluding the others.
    /// Answers at once with the members that report the key so far.
    pub async fn install_local_key(&self, name: &str, key: &str) -> Result<KeyChange, AgentError> {
        let secret = decode_secret(key)?;
        let id = rumormill_wire::key_id(&secret);
        self.key_operation(name, Duration::ZERO, move |o, now| {
            o.install_local_key(now, wall(), &secret).map(|_| ())
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), "key installed on this agent only");
        Ok(self
            .wait_for(name, id, Duration::ZERO, &[], KeyStep::Installed(id))
            .await)
    }

    /// Removes from this agent alone a key installed with
    /// [`Agent::install_local_key`] that no rotation has used yet.
    pub async fn remove_local_key(&self, name: &str, id: &str) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        self.key_operation(name, Duration::ZERO, move |o, now| o.remove_local_key(now, wall(), id))
            .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), "key removed from this agent");
        Ok(self.wait_for(name, id, Duration::ZERO, &[], KeyStep::Removed(id)).await)
    }

    /// Makes a key primary on every member. Refused unless every live
    /// member not in `exclude` reports it installed (within `wait`); those
    /// in `exclude` are not waited for.
    pub async fn use_key(
        &self,
        name: &str,
        id: &str,
        wait: Duration,
        exclude: &[String],
    ) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let leave_out = exclude.to_vec();
        self.key_operation(name, wait, move |o, now| {
            o.use_key_everywhere(now, wall(), id, &leave_out)
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), excluded = ?exclude, "primary key changed");
        Ok(self.wait_for(name, id, wait, exclude, KeyStep::Primary(id)).await)
    }

    /// Removes a key from every member. Refused while a live member not in
    /// `exclude` still seals with it (after `wait`).
    pub async fn remove_key(
        &self,
        name: &str,
        id: &str,
        wait: Duration,
        exclude: &[String],
    ) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let leave_out = exclude.to_vec();
        self.key_operation(name, wait, move |o, now| {
            o.remove_key_everywhere(now, wall(), id, &leave_out)
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), excluded = ?exclude, "key removed");
        Ok(self.wait_for(name, id, wait, exclude, KeyStep::Removed(id)).await)
    }

    /// Runs a key operation on the overlay and saves the keyring. One
    /// refused only for members whose reports do not show the step yet is
    /// tried again until `wait` has passed: reports spread like any value,
    /// and one just published elsewhere may not be here yet.
    async fn key_operation(
        &self,
        name: &str,
        wait: Duration,
        op: impl Fn(&mut Overlay, std::time::Instant) -> Result<(), CoreKeyError> + Clone + Send + 'static,
    ) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        // No slot is held while waiting: the core runs one operation at a
        // time, and the record is read from it afterwards.
        loop {
            let attempt = op.clone();
            let handle = self.handle(name).await?;
            match handle
                .call(move |o, now| attempt(o, now))
                .await
                .map_err(|_| stopped(name))?
            {
                Ok(()) => break,
                Err(CoreKeyError::NotInstalledOn { .. } | CoreKeyError::PrimaryOf { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return Err(key_error(name, e)),
            }
        }
        self.save_keyring(name).await
    }

    /// Waits up to `wait` for every live member's report (but those in
    /// `exclude`) to show `step`.
    async fn wait_for(&self, name: &str, id: KeyId, wait: Duration, exclude: &[String], step: KeyStep) -> KeyChange {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let leave_out = exclude.to_vec();
            let p = match self.handle(name).await {
                Ok(h) => h
                    .call(move |o, _| o.key_progress(step, &leave_out))
                    .await
                    .unwrap_or_default(),
                Err(_) => Default::default(),
            };
            let change = KeyChange {
                id: key_hex(id),
                members: p.done.len() + p.missing.len() + p.excluded.len(),
                done: p.done,
                missing: p.missing,
                excluded: exclude.to_vec(),
            };
            if change.missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return change;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves the keyring the core now holds.
    async fn save_keyring(&self, name: &str) -> Result<(), AgentError> {
        let save = refresh(&mut *self.lock_running(name).await?).await;
        if let Some(save) = save {
            save.write(&self.db).await?;
        }
        Ok(())
    }
}

/// Follows what the core reports of the overlay's keyring: logs it and
/// saves the keyring when it changed. Runs while the overlay does.
pub(crate) async fn watch<N: Net>(agent: Weak<Agent<N>>, name: String, handle: OverlayHandle) {
    let mut events = handle.subscribe();
    loop {
        match events.recv().await {
            Ok(Notification::Keys(e)) => log(&name, &e),
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => {} // look at the keyring itself
            Err(RecvError::Closed) => return,
        }
        let Some(agent) = agent.upgrade() else { return };
        if let Err(e) = agent.save_keyring(&name).await {
            tracing::warn!(overlay = %name, error = %e, "keyring not saved");
        }
    }
}

fn log(name: &str, e: &KeysNotification) {
    match e {
        KeysNotification::Changed {
            version,
            writer: Some(writer),
            primary,
            keys_changed: true,
        } => {
            tracing::info!(overlay = %name, primary = %key_hex(*primary), version, %writer, "keyring changed by the overlay");
        }
        KeysNotification::Refused { writer, version } => {
            tracing::warn!(overlay = %name, %writer, version, "desired keyring refused: its version is more than a day ahead of this agent's clock");
        }
        KeysNotification::LeftOut {
            writer,
            version,
            lacking,
        } => {
            let ids: Vec<String> = lacking.iter().map(|&id| key_hex(id)).collect();
            tracing::warn!(overlay = %name, keys = %ids.join(","), version, %writer,
                "the overlay's keyring names keys this member does not hold: it was left out of a rotation (install them with `keys install --local`)");
        }
        // This member's own change, or one that changed no key: said elsewhere.
        KeysNotification::Changed { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_what_the_core_holds() {
        let old = config::generate_key();
        let new = config::generate_key();
        let new_id = rumormill_wire::key_id(&config::decode_key(&new).unwrap());
        let mut rec = OverlayRecord::new(config::OverlaySpec::named("o"), "m".into());
        rec.keys = vec![old.clone(), new.clone()];
        rec.local_keys = vec![key_hex(new_id)];
        rec.pending_keys = vec![key_hex(new_id)];
        rec.keyring_version = 7;
        let k = keyring_of(&rec).expect("encrypted");
        assert_eq!(
            (k.local.clone(), k.pending.clone(), k.version),
            (vec![new_id], vec![new_id], 7)
        );
        assert_eq!(with_keyring(&rec, &k), rec);
        let plain = OverlayRecord::new(config::OverlaySpec::named("p"), "m".into());
        assert!(keyring_of(&plain).is_none());
    }
}
