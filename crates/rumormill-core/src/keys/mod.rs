//! Cluster-wide key rotation.
//!
//! Every key operation on one member changes the keyring of every member
//! of the overlay, as with Serf's `keys` commands. The member that takes it
//! applies it, then writes a desired keyring — the key ids, primary first,
//! the secrets of the keys installed cluster-wide, and a version above the
//! highest it has seen — under `_rumormill/keyring/<member>`; every member
//! follows the desired keyring of highest version (ties broken by writer
//! name), whatever order the writes arrive in. An operation that changes
//! nothing writes nothing, so a late no-op can never undo a newer change.
//! (The store's own last-writer-wins order is by Lamport clock, which would
//! let a concurrent write from a member with a busier clock win over a
//! later one; versions per writer avoid that.) Versions are wall-clock
//! milliseconds, at least one above the highest seen; a version more than
//! [`MAX_AHEAD_MS`] ahead of this member's clock is refused, so a key
//! holder cannot push the version to `u64::MAX`, or step by step far into
//! the future, and lock later rotations or later joiners out. Each member
//! also publishes which keys it holds, and which is its primary, under
//! `_rumormill/keys/<member>`, so the member that takes an operation can
//! tell when every live member has followed ([`Overlay::key_progress`]), and
//! refuses a step that would lose packets:
//!
//! 1. install NEW ([`Overlay::install_key_everywhere`]) — every member
//!    accepts NEW from now on;
//! 2. use NEW ([`Overlay::use_key_everywhere`]) — refused until every live
//!    member reports NEW installed; then every member seals with NEW;
//! 3. remove OLD ([`Overlay::remove_key_everywhere`]) — refused while a live
//!    member still seals with OLD.
//!
//! Packets already in flight under OLD when it is removed are the only ones
//! rejected; none is rejected once the rotation has completed.
//!
//! A cluster-wide install carries the new secret in the desired keyring,
//! sealed under the current keys: every holder of the current keys learns
//! it. To rotate a holder *out*, the new key is installed on each trusted
//! member alone ([`Overlay::install_local_key`]: the secret never enters
//! the store, only its id appears in the reports); use and remove name key
//! ids only, and take the members to leave out (`exclude`), which are not
//! waited for. Once the old key is removed, an excluded member can neither
//! open the others' packets nor have its own accepted.
//!
//! The state of the rotation — which keys are local, which no rotation
//! names yet, the version followed — lives in [`rotation`]'s sub-machine;
//! the overlay reports through [`crate::Overlay::poll_event`]
//! ([`crate::Event::Keys`]) whenever it changes, so that the driver saves
//! it ([`Overlay::keyring_record`]) and gives it back at the next start
//! ([`Overlay::restore_keyring`]). Waiting for the members to follow is the
//! driver's.

mod rotation;

use std::collections::BTreeSet;
use std::time::Instant;

use rumormill_wire::{KeyId, WireError, key_id};

pub use self::rotation::MAX_AHEAD_MS;
pub(crate) use self::rotation::Rotation;
use crate::overlay::{CoreError, Overlay};
use crate::reserved::{KeyReport, ReservedKey, Secret};
use crate::wall::WallTime;

/// What a member keeps of its keyring across restarts: the keys, primary
/// first, and the state of the rotation. The secrets are wiped when it is
/// dropped.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyringRecord {
    /// The keys' secrets, primary first.
    pub keys: Vec<Secret>,
    /// Ids of keys installed on this member alone: their secrets never
    /// enter the overlay's store.
    pub local: Vec<KeyId>,
    /// Ids of local keys no desired keyring names yet: kept when this
    /// member follows one that does not name them.
    pub pending: Vec<KeyId>,
    /// Highest version of a desired keyring followed or written.
    pub version: u64,
}

impl std::fmt::Debug for KeyringRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringRecord")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("local", &self.local)
            .field("pending", &self.pending)
            .field("version", &self.version)
            .finish()
    }
}

/// What key rotation tells the driver through [`crate::Overlay::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeysEvent {
    /// The keyring this member holds, or what it keeps of the rotation,
    /// changed: save [`Overlay::keyring_record`].
    Changed {
        /// The version now followed.
        version: u64,
        /// The member whose desired keyring was followed; `None` for an
        /// operation taken here.
        writer: Option<String>,
        /// The primary key.
        primary: KeyId,
        /// Whether the keys held changed (not only the state kept).
        keys_changed: bool,
    },
    /// A desired keyring was refused: its version is `u64::MAX`, or more
    /// than [`MAX_AHEAD_MS`] ahead of this member's clock.
    Refused {
        /// Its writer.
        writer: String,
        /// Its version.
        version: u64,
    },
    /// The newest desired keyring names keys this member does not hold: it
    /// was left out of a rotation (give it the keys to come back).
    LeftOut {
        /// Its writer.
        writer: String,
        /// Its version.
        version: u64,
        /// The ids it lacks.
        lacking: Vec<KeyId>,
    },
}

/// A step of a rotation, as a member's report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep {
    /// The member holds the key.
    Installed(KeyId),
    /// The member seals with the key.
    Primary(KeyId),
    /// The member no longer holds the key.
    Removed(KeyId),
}

impl KeyStep {
    /// Whether a member that sent `report` has taken this step.
    pub fn reached_by(self, report: &KeyReport) -> bool {
        match self {
            KeyStep::Installed(id) => report.installed.contains(&id),
            KeyStep::Primary(id) => report.primary == id,
            KeyStep::Removed(id) => !report.installed.contains(&id),
        }
    }
}

/// Which live members have taken a step, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyProgress {
    /// Those whose report shows it.
    pub done: Vec<String>,
    /// Those whose report does not (or who have sent none yet).
    pub missing: Vec<String>,
    /// Those left out on request: not waited for.
    pub excluded: Vec<String>,
}

/// Why a key operation was refused. A refused operation changes nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The overlay is plain text: it has no keyring.
    #[error("the overlay is plaintext: it has no keyring")]
    Plaintext,
    /// No key of that id is installed here.
    #[error("no key with id {0:08x} is installed")]
    Unknown(KeyId),
    /// The key is this member's primary (or the keyring's).
    #[error("key {0:08x} is the primary key: make another one primary first")]
    Primary(KeyId),
    /// Live members (not excluded) do not report the key installed: the
    /// packets they cannot open would be lost. Retry once they do.
    #[error("key {key:08x} is not installed on {}", members.join(", "))]
    NotInstalledOn {
        /// The key.
        key: KeyId,
        /// Who lacks it.
        members: Vec<String>,
    },
    /// Live members (not excluded) still seal with the key. Retry once
    /// they have followed the change of primary.
    #[error("key {key:08x} is the primary key of {}", members.join(", "))]
    PrimaryOf {
        /// The key.
        key: KeyId,
        /// Who seals with it.
        members: Vec<String>,
    },
    /// The key is part of the overlay's keyring, not only of this member's.
    #[error("key {0:08x} is part of the overlay's keyring, not only of this member's")]
    NotLocal(KeyId),
    /// The change would leave this member without a key.
    #[error("the change would leave this member without a key")]
    NoKeyLeft,
    /// The newest version seen is more than a day ahead of this member's
    /// clock: a version above it would be refused by the others. Retry once
    /// the clock has passed it (or check the clocks).
    #[error("the newest keyring version ({seen}) is more than a day ahead of this member's clock ({now} ms)")]
    VersionAhead {
        /// The newest version seen.
        seen: u64,
        /// This member's clock, milliseconds.
        now: u64,
    },
    /// The keyring refused the key (its length, say).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The write to the store failed (the member has left, a quota).
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl Overlay {
    /// Takes back what [`Overlay::keyring_record`] gave in an earlier life
    /// (the keys are installed, the first made primary) and publishes this
    /// member's key report. A driver calls it once after [`Overlay::new`],
    /// before joining, with a default record on a first start (the keys
    /// given to `new` stay); until then desired keyrings are not followed.
    pub fn restore_keyring(&mut self, now: Instant, wall: WallTime, record: &KeyringRecord) -> Result<(), KeyError> {
        self.codec.keys().ok_or(KeyError::Plaintext)?;
        if !record.keys.is_empty() {
            self.hold(&record.keys)?;
        }
        self.rotation.restore(record);
        self.wall.observe(now, wall);
        self.publish_key_report(now, wall);
        // A desired keyring that arrived before is followed now.
        self.follow_keyring(now);
        self.drain_keys();
        Ok(())
    }

    /// What to save of the keyring, or `None` on a plain-text overlay.
    pub fn keyring_record(&self) -> Option<KeyringRecord> {
        Some(self.rotation.record(self.codec.keyring()?))
    }

    /// Ids of the keys installed on this member alone.
    pub fn local_keys(&self) -> Vec<KeyId> {
        self.rotation.local().to_vec()
    }

    /// Installs a key on every member: the secret travels in the overlay's
    /// store, sealed under the current keys, so every current holder
    /// learns it.
    pub fn install_key_everywhere(&mut self, now: Instant, wall: WallTime, secret: &[u8]) -> Result<KeyId, KeyError> {
        rumormill_wire::AesGcmSuite::for_key_len(secret.len()).map_err(KeyError::Wire)?;
        let id = key_id(secret);
        self.change_keyring(now, wall, |plan, _| {
            if !plan.shares(id) {
                plan.shared.push(Secret::new(secret.to_vec()));
            }
            if !plan.ids.contains(&id) {
                plan.ids.push(id);
            }
            Ok(())
        })?;
        Ok(id)
    }

    /// Installs a key on this member alone: packets sealed with it are
    /// accepted here from now on. The secret never enters the store (only
    /// its id, in this member's report), so a member can be rotated out:
    /// install the new key this way on every member to keep, then use it
    /// and remove the old one, excluding the others.
    pub fn install_local_key(&mut self, now: Instant, wall: WallTime, secret: &[u8]) -> Result<KeyId, KeyError> {
        rumormill_wire::AesGcmSuite::for_key_len(secret.len()).map_err(KeyError::Wire)?;
        let ring = self.codec.keyring().ok_or(KeyError::Plaintext)?;
        if let Some(keys) = self.rotation.install_local(secret, ring) {
            self.hold(&keys)?;
            self.publish_key_report(now, wall);
        }
        self.drain_keys();
        Ok(key_id(secret))
    }

    /// Takes a key installed with [`Overlay::install_local_key`] that no
    /// rotation has used yet back off this member.
    pub fn remove_local_key(&mut self, now: Instant, wall: WallTime, id: KeyId) -> Result<(), KeyError> {
        let ring = self.codec.keyring().ok_or(KeyError::Plaintext)?;
        let keys = self.rotation.remove_local(id, ring)?;
        self.hold(&keys)?;
        self.publish_key_report(now, wall);
        self.drain_keys();
        Ok(())
    }

    /// Makes a key primary on every member. Refused unless every live
    /// member not in `exclude` reports it installed (retry while reports
    /// are on their way); those in `exclude` are not waited for.
    pub fn use_key_everywhere(
        &mut self,
        now: Instant,
        wall: WallTime,
        id: KeyId,
        exclude: &[String],
    ) -> Result<(), KeyError> {
        let ring = self.codec.keyring().ok_or(KeyError::Plaintext)?;
        if !ring.list().iter().any(|k| k.id == id) {
            return Err(KeyError::Unknown(id));
        }
        let lacking = self.key_progress(KeyStep::Installed(id), exclude).missing;
        if !lacking.is_empty() {
            return Err(KeyError::NotInstalledOn {
                key: id,
                members: lacking,
            });
        }
        self.change_keyring(now, wall, |plan, ring| {
            if !ring.list().iter().any(|k| k.id == id) && !plan.shares(id) {
                return Err(KeyError::Unknown(id));
            }
            plan.ids.retain(|&k| k != id);
            plan.ids.insert(0, id);
            Ok(())
        })
    }

    /// Removes a key from every member. Refused while it is this member's
    /// primary, or while a live member not in `exclude` still seals with it
    /// (retry once it has followed the change of primary).
    pub fn remove_key_everywhere(
        &mut self,
        now: Instant,
        wall: WallTime,
        id: KeyId,
        exclude: &[String],
    ) -> Result<(), KeyError> {
        let ring = self.codec.keyring().ok_or(KeyError::Plaintext)?;
        if ring.primary() == id {
            return Err(KeyError::Primary(id));
        }
        let sealing = self.key_progress(KeyStep::Primary(id), exclude).done;
        if !sealing.is_empty() {
            return Err(KeyError::PrimaryOf {
                key: id,
                members: sealing,
            });
        }
        self.change_keyring(now, wall, |plan, _| {
            let pos = plan.ids.iter().position(|&k| k == id).ok_or(KeyError::Unknown(id))?;
            if pos == 0 {
                return Err(KeyError::Primary(id));
            }
            plan.ids.remove(pos);
            plan.shared.retain(|k| key_id(k) != id);
            Ok(())
        })
    }

    /// The live members (this one included), by name, with the key report
    /// each published (`None`: none heard yet).
    pub fn key_reports(&self) -> Vec<(String, Option<KeyReport>)> {
        rotation::reports(self.store(), &self.live_names())
    }

    /// Which live members (this one included) have taken `step` — who has
    /// followed a change — leaving those in `exclude` apart.
    pub fn key_progress(&self, step: KeyStep, exclude: &[String]) -> KeyProgress {
        rotation::progress(self.store(), &self.live_names(), step, exclude)
    }

    /// Follows the newest desired keyring if one arrived: called after the
    /// store took updates. Before any wall-clock reading nothing is
    /// followed (a version cannot be judged without one).
    pub(crate) fn follow_keyring(&mut self, now: Instant) {
        if !self.rotation.due() {
            return;
        }
        let (Some(wall), Some(ring)) = (self.wall.read(now), self.codec.keyring()) else {
            return;
        };
        if let Some(keys) = self.rotation.follow(wall, self.dissemination.store(), ring) {
            if self.hold(&keys).is_ok() {
                self.publish_key_report(now, wall);
            }
        }
        self.drain_keys();
    }

    fn change_keyring(
        &mut self,
        now: Instant,
        wall: WallTime,
        edit: impl FnOnce(&mut rotation::Plan, &rumormill_wire::Keyring) -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        let ring = self.codec.keyring().ok_or(KeyError::Plaintext)?;
        let change = self.rotation.change(wall, self.dissemination.store(), ring, edit);
        let result = match change {
            Ok(Some(change)) => self.apply_change(now, wall, change),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.drain_keys();
        result
    }

    fn apply_change(&mut self, now: Instant, wall: WallTime, change: rotation::Change) -> Result<(), KeyError> {
        self.hold(&change.hold)?;
        self.publish_key_report(now, wall);
        if let Some(d) = change.desired {
            let key = ReservedKey::DesiredKeyring {
                member: self.me.name.to_string(),
            };
            self.put(now, wall, &key.key(), d.encode())?;
        }
        Ok(())
    }

    /// Makes the codec hold `keys`: installs them, makes the first primary,
    /// removes the others.
    fn hold(&mut self, keys: &[Secret]) -> Result<(), KeyError> {
        let wanted: BTreeSet<KeyId> = keys.iter().map(|k| key_id(k)).collect();
        self.codec.with_keyring(|r| {
            for k in keys {
                r.install(k)?;
            }
            if let Some(primary) = keys.first() {
                r.use_key(key_id(primary))?;
            }
            for k in r.list() {
                if !wanted.contains(&k.id) {
                    r.remove(k.id)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Publishes this member's key report when it changed.
    fn publish_key_report(&mut self, now: Instant, wall: WallTime) {
        let Some(ring) = self.codec.keyring() else { return };
        let report = KeyReport {
            primary: ring.primary(),
            installed: ring.list().iter().map(|k| k.id).collect(),
        };
        let key = ReservedKey::KeyReport {
            member: self.me.name.to_string(),
        }
        .key();
        let value = report.encode();
        if self.store().value(&key) != Some(value.as_slice()) {
            // A refused report (the member left, a quota) is published
            // again with the next change.
            let _ = self.put(now, wall, &key, value);
        }
    }

    fn drain_keys(&mut self) {
        while let Some(e) = self.rotation.poll_event() {
            self.events.push_back(crate::Event::Keys(e));
        }
    }

    /// Live members' names, this one included.
    fn live_names(&self) -> Vec<String> {
        std::iter::once(self.me.name.to_string())
            .chain(
                self.members()
                    .filter(|m| m.state.is_live() && m.name != self.me.name)
                    .map(|m| m.name.to_string()),
            )
            .collect()
    }
}
