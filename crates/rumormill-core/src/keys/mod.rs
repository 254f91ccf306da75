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
//! tell when every live member has followed ([`Overlay::key_progress`](crate::Overlay::key_progress)), and
//! refuses a step that would lose packets:
//!
//! 1. install NEW ([`Overlay::install_key_everywhere`](crate::Overlay::install_key_everywhere)) — every member
//!    accepts NEW from now on;
//! 2. use NEW ([`Overlay::use_key_everywhere`](crate::Overlay::use_key_everywhere)) — refused until every live
//!    member reports NEW installed; then every member seals with NEW;
//! 3. remove OLD ([`Overlay::remove_key_everywhere`](crate::Overlay::remove_key_everywhere)) — refused while a live
//!    member still seals with OLD.
//!
//! Packets already in flight under OLD when it is removed are the only ones
//! rejected; none is rejected once the rotation has completed.
//!
//! A cluster-wide install carries the new secret in the desired keyring,
//! sealed under the current keys: every holder of the current keys learns
//! it. To rotate a holder *out*, the new key is installed on each trusted
//! member alone ([`Overlay::install_local_key`](crate::Overlay::install_local_key): the secret never enters
//! the store, only its id appears in the reports); use and remove name key
//! ids only, and take the members to leave out (`exclude`), which are not
//! waited for. Once the old key is removed, an excluded member can neither
//! open the others' packets nor have its own accepted.
//!
//! The state of the rotation — which keys are local, which no rotation
//! names yet, the version followed — lives in [`rotation`]'s sub-machine;
//! the overlay reports through [`crate::Overlay::poll_notification`]
//! ([`crate::Notification::Keys`]) whenever it changes, so that the driver saves
//! it ([`Overlay::keyring_record`](crate::Overlay::keyring_record)) and gives it back at the next start
//! ([`Overlay::restore_keyring`](crate::Overlay::restore_keyring)). Waiting for the members to follow is the
//! driver's.

mod rotation;

use std::collections::BTreeSet;

use rumormill_wire::{KeyId, WireError, key_id};

pub use self::rotation::MAX_AHEAD_MS;
pub(crate) use self::rotation::Rotation;
use crate::overlay::{CoreError, Wire};
use crate::replication::Store;
use crate::reserved::{self, KeyReport, ReservedKey, Secret};
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

/// What key rotation tells the driver through [`crate::Overlay::poll_notification`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysNotification {
    /// The keyring this member holds, or what it keeps of the rotation,
    /// changed: save [`Overlay::keyring_record`](crate::Overlay::keyring_record).
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

/// A store write a key operation asks the overlay to make: key and value,
/// wiped when dropped (a desired keyring carries secrets; the store keeps
/// its own copy).
pub(crate) type Write = (String, Secret);

/// What key rotation borrows of the overlay for one call: the wire's
/// keyring, the store (read-only) and the local member's name.
pub(crate) struct View<'a> {
    pub(crate) wire: &'a mut Wire,
    pub(crate) store: &'a Store,
    pub(crate) me: &'a str,
}

/// The store writes a keyring change asks for, in this order: this
/// member's key report (when it changed), then its desired keyring; once
/// they are made, the rotation's state to commit
/// ([`Rotation::commit`]), so that a refused write leaves the version
/// where it was.
#[derive(Default)]
pub(crate) struct Writes {
    pub(crate) report: Option<Write>,
    pub(crate) desired: Option<Write>,
    pub(crate) settled: Option<rotation::Settled>,
}

/// Takes back what [`crate::Overlay::keyring_record`] gave in an earlier
/// life (the keys are installed, the first made primary): the key report
/// to publish.
pub(crate) fn restore(rotation: &mut Rotation, v: View<'_>, record: &KeyringRecord) -> Result<Option<Write>, KeyError> {
    v.wire.keyring().ok_or(KeyError::Plaintext)?;
    if !record.keys.is_empty() {
        hold(v.wire, &record.keys)?;
    }
    rotation.restore(record);
    Ok(report(&v))
}

/// Follows the newest desired keyring in the store at `wall`: the key
/// report to publish, if the keyring changed.
pub(crate) fn follow(rotation: &mut Rotation, v: View<'_>, wall: WallTime) -> Option<Write> {
    let followed = rotation.follow(wall, v.store, v.wire.keyring()?)?;
    let Some(keys) = followed.hold else {
        rotation.commit(followed.settled);
        return None;
    };
    // A keyring the wire refuses is not followed: the state stays as it
    // was, so the next desired keyring is judged against it.
    hold(v.wire, &keys).ok()?;
    rotation.commit(followed.settled);
    report(&v)
}

/// Installs a key on every member (see
/// [`crate::Overlay::install_key_everywhere`]).
pub(crate) fn install_everywhere(
    rotation: &mut Rotation,
    v: View<'_>,
    wall: WallTime,
    secret: &[u8],
) -> Result<(KeyId, Writes), KeyError> {
    rumormill_wire::AesGcmSuite::for_key_len(secret.len()).map_err(KeyError::Wire)?;
    let id = key_id(secret);
    let writes = change(rotation, v, wall, |plan, _| {
        if !plan.shares(id) {
            plan.shared.push(Secret::new(secret.to_vec()));
        }
        if !plan.ids.contains(&id) {
            plan.ids.push(id);
        }
        Ok(())
    })?;
    Ok((id, writes))
}

/// Installs a key on this member alone (see
/// [`crate::Overlay::install_local_key`]): the key report to publish.
pub(crate) fn install_local(rotation: &mut Rotation, v: View<'_>, secret: &[u8]) -> Result<Option<Write>, KeyError> {
    rumormill_wire::AesGcmSuite::for_key_len(secret.len()).map_err(KeyError::Wire)?;
    let ring = v.wire.keyring().ok_or(KeyError::Plaintext)?;
    let Some(keys) = rotation.install_local(secret, ring) else {
        return Ok(None);
    };
    hold(v.wire, &keys)?;
    Ok(report(&v))
}

/// Takes a local key no rotation has used yet back off this member: the
/// key report to publish.
pub(crate) fn remove_local(rotation: &mut Rotation, v: View<'_>, id: KeyId) -> Result<Option<Write>, KeyError> {
    let ring = v.wire.keyring().ok_or(KeyError::Plaintext)?;
    let keys = rotation.remove_local(id, ring)?;
    hold(v.wire, &keys)?;
    Ok(report(&v))
}

/// Makes a key primary on every member (see
/// [`crate::Overlay::use_key_everywhere`]); `live` are the live members'
/// names, the local one included.
pub(crate) fn use_everywhere(
    rotation: &mut Rotation,
    v: View<'_>,
    wall: WallTime,
    id: KeyId,
    live: &[String],
    exclude: &[String],
) -> Result<Writes, KeyError> {
    let ring = v.wire.keyring().ok_or(KeyError::Plaintext)?;
    if !ring.list().iter().any(|k| k.id == id) {
        return Err(KeyError::Unknown(id));
    }
    let lacking = progress(v.store, live, KeyStep::Installed(id), exclude).missing;
    if !lacking.is_empty() {
        return Err(KeyError::NotInstalledOn {
            key: id,
            members: lacking,
        });
    }
    change(rotation, v, wall, |plan, ring| {
        if !ring.list().iter().any(|k| k.id == id) && !plan.shares(id) {
            return Err(KeyError::Unknown(id));
        }
        plan.ids.retain(|&k| k != id);
        plan.ids.insert(0, id);
        Ok(())
    })
}

/// Removes a key from every member (see
/// [`crate::Overlay::remove_key_everywhere`]); `live` as for
/// [`use_everywhere`].
pub(crate) fn remove_everywhere(
    rotation: &mut Rotation,
    v: View<'_>,
    wall: WallTime,
    id: KeyId,
    live: &[String],
    exclude: &[String],
) -> Result<Writes, KeyError> {
    let ring = v.wire.keyring().ok_or(KeyError::Plaintext)?;
    if ring.primary() == id {
        return Err(KeyError::Primary(id));
    }
    let sealing = progress(v.store, live, KeyStep::Primary(id), exclude).done;
    if !sealing.is_empty() {
        return Err(KeyError::PrimaryOf {
            key: id,
            members: sealing,
        });
    }
    change(rotation, v, wall, |plan, _| {
        let pos = plan.ids.iter().position(|&k| k == id).ok_or(KeyError::Unknown(id))?;
        if pos == 0 {
            return Err(KeyError::Primary(id));
        }
        plan.ids.remove(pos);
        plan.shared.retain(|k| key_id(k) != id);
        Ok(())
    })
}

/// The live members' reports, by name: `live` are the live members' names,
/// the local one included (`None`: nothing heard from it yet). A report is
/// accepted only from the member it names.
pub(crate) fn reports(store: &Store, live: &[String]) -> Vec<(String, Option<KeyReport>)> {
    let mut rows: Vec<(String, Option<KeyReport>)> = live
        .iter()
        .map(|m| {
            let key = ReservedKey::KeyReport { member: m.clone() }.key();
            let report = store
                .get(&key)
                .filter(|u| reserved::from_owner(u))
                .and_then(|u| KeyReport::decode(u.value.as_deref()?).ok());
            (m.clone(), report)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Which live members (but those in `exclude`) have reached `step`.
pub(crate) fn progress(store: &Store, live: &[String], step: KeyStep, exclude: &[String]) -> KeyProgress {
    let mut p = KeyProgress::default();
    for (name, report) in reports(store, live) {
        if exclude.contains(&name) {
            p.excluded.push(name);
        } else if report.as_ref().is_some_and(|r| step.reached_by(r)) {
            p.done.push(name);
        } else {
            p.missing.push(name);
        }
    }
    p
}

/// Edits the overlay's keyring and holds the result: the writes that tell
/// the others (none when the edit changes nothing).
fn change(
    rotation: &mut Rotation,
    v: View<'_>,
    wall: WallTime,
    edit: impl FnOnce(&mut rotation::Plan, &rumormill_wire::Keyring) -> Result<(), KeyError>,
) -> Result<Writes, KeyError> {
    let ring = v.wire.keyring().ok_or(KeyError::Plaintext)?;
    let Some(change) = rotation.change(wall, v.store, ring, edit)? else {
        return Ok(Writes::default());
    };
    hold(v.wire, &change.hold)?;
    let desired = change.desired.map(|d| {
        let key = ReservedKey::DesiredKeyring {
            member: v.me.to_owned(),
        };
        (key.key(), d.encode())
    });
    Ok(Writes {
        report: report(&v),
        desired,
        settled: Some(change.settled),
    })
}

/// Makes the wire hold `keys`: installs them, makes the first primary,
/// removes the others.
fn hold(wire: &mut Wire, keys: &[Secret]) -> Result<(), KeyError> {
    let wanted: BTreeSet<KeyId> = keys.iter().map(|k| key_id(k)).collect();
    wire.with_keyring(|r| {
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

/// This member's key report, when it differs from the one in the store.
/// (A refused write of it — the member left, a quota — is made again with
/// the next change.)
fn report(v: &View<'_>) -> Option<Write> {
    let ring = v.wire.keyring()?;
    let report = KeyReport {
        primary: ring.primary(),
        installed: ring.list().iter().map(|k| k.id).collect(),
    };
    let key = ReservedKey::KeyReport {
        member: v.me.to_owned(),
    }
    .key();
    let value = Secret::new(report.encode());
    (v.store.value(&key) != Some(value.as_slice())).then_some((key, value))
}
