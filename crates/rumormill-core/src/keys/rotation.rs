//! The rotation sub-machine: what a member keeps of the cluster-wide
//! keyring (which of its keys are its own, which no rotation names yet, the
//! version it follows) and the rules that decide what to hold.
//!
//! It reads the overlay through narrow views — the store (the desired
//! keyrings and the reports, through [`crate::reserved`]), the keyring it
//! holds, the live members' names — and answers with the keyring to hold
//! and the desired keyring to write; the overlay applies them.

use std::collections::VecDeque;

use rumormill_wire::{KeyId, Keyring, key_id};

use super::{KeyError, KeyringRecord, KeysNotification};
use crate::replication::{Store, Update};
use crate::reserved::{self, DesiredKeyring, ReservedKey, Secret};
use crate::wall::WallTime;

/// A desired keyring whose version (milliseconds) is more than this ahead
/// of the member's clock is refused: one day. Honest writers use their
/// clock, or one above the highest version seen, so only a key holder
/// trying to lock later rotations out (`u64::MAX` would leave no room above
/// it) jumps that far. The bound is the clock alone, not the highest
/// version seen: otherwise a holder could ratchet the version up a day per
/// write, and a member joining later (which has seen nothing) would refuse
/// every honest version above the ratchet. A member whose clock is more
/// than a day behind its peers' refuses their rotations until its clock is
/// set right.
pub const MAX_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Whether a desired keyring's version may be followed at wall-clock time
/// `now`.
pub(crate) fn plausible(version: u64, now: WallTime) -> bool {
    version != u64::MAX && version <= now.as_unix_ms().saturating_add(MAX_AHEAD_MS)
}

/// The version of the next desired keyring written after `seen` at
/// wall-clock time `now`: the clock, or one above `seen` if that is higher;
/// refused when the others would refuse it (see [`plausible`]).
pub(crate) fn next_version(seen: u64, now: WallTime) -> Result<u64, KeyError> {
    seen.checked_add(1)
        .map(|v| v.max(now.as_unix_ms()))
        .filter(|&v| plausible(v, now))
        .ok_or(KeyError::VersionAhead {
            seen,
            now: now.as_unix_ms(),
        })
}

/// Whether `secret` can be a key (a desired keyring may carry anything).
fn valid(secret: &[u8]) -> bool {
    rumormill_wire::AesGcmSuite::for_key_len(secret.len()).is_ok()
}

/// A keyring to hold: ids, primary first, and the secrets that may travel
/// in the store.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    pub(crate) ids: Vec<KeyId>,
    pub(crate) shared: Vec<Secret>,
}

impl Plan {
    fn from_desired(d: &DesiredKeyring) -> Plan {
        Plan {
            ids: d.ids.clone(),
            shared: d.shared.iter().filter(|s| valid(s)).cloned().collect(),
        }
    }

    pub(crate) fn shares(&self, id: KeyId) -> bool {
        self.shared.iter().any(|k| key_id(k) == id)
    }

    fn to_desired(&self, version: u64) -> DesiredKeyring {
        DesiredKeyring {
            version,
            ids: self.ids.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The keys a keyring holds, primary first, with their secrets.
fn held(ring: &Keyring) -> Vec<(KeyId, Secret)> {
    let primary = ring.primary();
    let mut keys: Vec<(KeyId, Secret)> = ring
        .list()
        .into_iter()
        .filter_map(|k| Some((k.id, Secret::new(ring.secret(k.id)?.to_vec()))))
        .collect();
    keys.sort_by_key(|(id, _)| *id != primary);
    keys
}

/// The primary and the sorted ids of keys held primary first.
fn shape(keys: &[Secret]) -> (Option<KeyId>, Vec<KeyId>) {
    let mut ids: Vec<KeyId> = keys.iter().map(|k| key_id(k)).collect();
    let primary = ids.first().copied();
    ids.sort_unstable();
    (primary, ids)
}

/// Which keys of a member's keyring are its own, which no rotation names
/// yet, and the version it follows.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    /// Installed on this member alone: their secrets never enter the store.
    local: Vec<KeyId>,
    /// Local keys no desired keyring names yet: kept when this member
    /// follows one that does not name them.
    pending: Vec<KeyId>,
    /// The highest version followed or written.
    version: u64,
    /// A desired keyring arrived: follow the newest at the next chance.
    due: bool,
    /// The state of an earlier life was taken back: until then following
    /// would be undone by the restore.
    restored: bool,
    events: VecDeque<KeysNotification>,
}

/// The state a change or a follow leaves, kept apart until what it asks
/// for is done ([`Rotation::commit`]), so that a refused step changes
/// nothing.
#[must_use]
pub(crate) struct Settled {
    local: Vec<KeyId>,
    pending: Vec<KeyId>,
    version: u64,
    event: KeysNotification,
}

/// What a change asks the overlay to do.
pub(crate) struct Change {
    /// The keyring to hold, primary first.
    pub(crate) hold: Vec<Secret>,
    /// The desired keyring to write, when the overlay's keyring changed.
    pub(crate) desired: Option<DesiredKeyring>,
    /// The state to commit once the keyring is held and the desired one
    /// written.
    pub(crate) settled: Settled,
}

/// What a follow asks the overlay to do.
pub(crate) struct Followed {
    /// The keyring to hold, when its keys change.
    pub(crate) hold: Option<Vec<Secret>>,
    /// The state to commit once it is held.
    pub(crate) settled: Settled,
}

/// A desired keyring to follow: its version, its writer and its plan.
type Newest = Option<(u64, String, Plan)>;

impl Rotation {
    /// The state kept from an earlier life.
    pub(crate) fn restore(&mut self, record: &KeyringRecord) {
        self.local.clone_from(&record.local);
        self.pending.clone_from(&record.pending);
        self.version = record.version;
        self.restored = true;
        // A desired keyring followed before would be undone: follow again.
        self.due = true;
    }

    /// Takes the state a change or a follow left, once what it asked for
    /// is done.
    pub(crate) fn commit(&mut self, settled: Settled) {
        self.local = settled.local;
        self.pending = settled.pending;
        self.version = settled.version;
        self.events.push_back(settled.event);
    }

    /// What a driver keeps across restarts, with `ring`'s secrets.
    pub(crate) fn record(&self, ring: &Keyring) -> KeyringRecord {
        KeyringRecord {
            keys: held(ring).into_iter().map(|(_, s)| s).collect(),
            local: self.local.clone(),
            pending: self.pending.clone(),
            version: self.version,
        }
    }

    /// Keys installed on this member alone.
    pub(crate) fn local(&self) -> &[KeyId] {
        &self.local
    }

    /// Notes an update accepted into the store: a desired keyring makes a
    /// follow due.
    pub(crate) fn on_update(&mut self, u: &Update) {
        if matches!(reserved::owned(u), Some(ReservedKey::DesiredKeyring { .. })) {
            self.due = true;
        }
    }

    /// Whether a desired keyring arrived since the last follow, and the
    /// state of an earlier life is back (see [`Rotation::restore`]).
    pub(crate) fn due(&self) -> bool {
        self.due && self.restored
    }

    /// Whether the member's own keyring state has been restored: nothing
    /// is followed before (it would be overwritten).
    pub(crate) fn restored(&self) -> bool {
        self.restored
    }

    pub(crate) fn poll_notification(&mut self) -> Option<KeysNotification> {
        self.events.pop_front()
    }

    /// From this member's keyring: every key but the local ones no desired
    /// keyring names yet; only non-local secrets shared.
    fn plan_of(&self, ring: &Keyring) -> Plan {
        let mut plan = Plan::default();
        for (id, secret) in held(ring) {
            if !self.pending.contains(&id) {
                plan.ids.push(id);
            }
            if !self.local.contains(&id) {
                plan.shared.push(secret);
            }
        }
        plan
    }

    /// The keyring to hold under `plan`: the planned keys whose secret is
    /// known (held or in the plan), primary first, then the local keys no
    /// plan names yet. Also the planned ids whose secret is unknown.
    fn resolve(&self, plan: &Plan, ring: &Keyring) -> (Vec<Secret>, Vec<KeyId>) {
        let held = held(ring);
        let known: Vec<(KeyId, &Secret)> = held
            .iter()
            .map(|(id, s)| (*id, s))
            .chain(plan.shared.iter().map(|s| (key_id(s), s)))
            .collect();
        let mut keys = Vec::new();
        let mut lacking = Vec::new();
        for id in &plan.ids {
            match known.iter().find(|(k, _)| k == id) {
                Some((_, secret)) => keys.push((*secret).clone()),
                None => lacking.push(*id),
            }
        }
        for (id, secret) in &held {
            if self.pending.contains(id) && !plan.ids.contains(id) {
                keys.push(secret.clone());
            }
        }
        (keys, lacking)
    }

    /// The `(local, pending)` after holding `keys` under `plan`: local keys
    /// the plan names are no longer pending, shared ones no longer local,
    /// removed ones forgotten.
    fn settle(&self, keys: &[Secret], plan: &Plan) -> (Vec<KeyId>, Vec<KeyId>) {
        let held: Vec<KeyId> = keys.iter().map(|k| key_id(k)).collect();
        let mut pending = self.pending.clone();
        pending.retain(|id| held.contains(id) && !plan.ids.contains(id));
        let mut local = self.local.clone();
        local.retain(|id| held.contains(id) && !plan.shares(*id));
        (local, pending)
    }

    /// The desired keyrings in the store, each accepted only from its
    /// writer: the one to follow, highest `(version, writer)` among the
    /// plausible ones at `wall`, and the `(writer, version)` of those
    /// refused for their version.
    fn newest(store: &Store, wall: WallTime) -> (Newest, Vec<(String, u64)>) {
        let every = ReservedKey::DesiredKeyring { member: String::new() }.key();
        let mut refused = Vec::new();
        let newest = store
            .prefixed(&every)
            .filter_map(|u| {
                let Some(ReservedKey::DesiredKeyring { member: writer }) = reserved::owned(u) else {
                    return None;
                };
                let d = DesiredKeyring::decode(u.value.as_deref()?).ok()?;
                if !plausible(d.version, wall) {
                    refused.push((writer, d.version));
                    return None;
                }
                Some((d.version, writer, Plan::from_desired(&d)))
            })
            .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        (newest, refused)
    }

    /// Follows the newest desired keyring: the keyring to hold when it
    /// changes, and the state to commit once it is held (`None`: nothing
    /// changes). Whatever order desired keyrings arrive in, every member
    /// ends up following the same one.
    pub(crate) fn follow(&mut self, wall: WallTime, store: &Store, ring: &Keyring) -> Option<Followed> {
        self.due = false;
        let (newest, refused) = Rotation::newest(store, wall);
        for (writer, version) in refused {
            self.events.push_back(KeysNotification::Refused { writer, version });
        }
        let (version, writer, plan) = newest?;
        if version < self.version {
            return None;
        }
        let (keys, lacking) = self.resolve(&plan, ring);
        if !lacking.is_empty() {
            self.events.push_back(KeysNotification::LeftOut {
                writer: writer.clone(),
                version,
                lacking,
            });
        }
        if keys.is_empty() {
            return None;
        }
        let keys_changed = shape(&keys) != shape(&held(ring).into_iter().map(|(_, s)| s).collect::<Vec<_>>());
        let (local, pending) = self.settle(&keys, &plan);
        if (&local, &pending, version) == (&self.local, &self.pending, self.version) && !keys_changed {
            return None;
        }
        let event = KeysNotification::Changed {
            version,
            writer: Some(writer),
            primary: plan.ids.first().copied().unwrap_or_default(),
            keys_changed,
        };
        Some(Followed {
            hold: keys_changed.then_some(keys),
            settled: Settled {
                local,
                pending,
                version,
                event,
            },
        })
    }

    /// Edits the overlay's keyring — the newest desired one, or this
    /// member's own if it is newer — into the keyring to hold and the
    /// desired keyring to write, with a version above every one seen.
    /// `None`: nothing changes, nothing is written (so a late no-op can
    /// never undo a newer change). Nothing changes here either until the
    /// overlay commits the change's state ([`Rotation::commit`]).
    pub(crate) fn change(
        &self,
        wall: WallTime,
        store: &Store,
        ring: &Keyring,
        edit: impl FnOnce(&mut Plan, &Keyring) -> Result<(), KeyError>,
    ) -> Result<Option<Change>, KeyError> {
        let local_seen = self.version;
        let (newest, _) = Rotation::newest(store, wall);
        let (base, seen) = match newest {
            Some((v, _, plan)) if v >= local_seen => (plan, v),
            other => (self.plan_of(ring), other.map_or(0, |(v, _, _)| v)),
        };
        let mut plan = base.clone();
        edit(&mut plan, ring)?;
        let version = next_version(seen.max(local_seen), wall)?;
        let changed = plan != base;
        let (keys, _) = self.resolve(&plan, ring);
        let current: Vec<Secret> = held(ring).into_iter().map(|(_, s)| s).collect();
        if !changed && shape(&keys) == shape(&current) {
            return Ok(None);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKeyLeft);
        }
        let (local, pending) = self.settle(&keys, &plan);
        let version_now = if changed { version } else { self.version };
        let event = KeysNotification::Changed {
            version: version_now,
            writer: None,
            primary: key_id(&keys[0]),
            keys_changed: shape(&keys) != shape(&current),
        };
        Ok(Some(Change {
            hold: keys,
            desired: changed.then(|| plan.to_desired(version)),
            settled: Settled {
                local,
                pending,
                version: version_now,
                event,
            },
        }))
    }

    /// Holds `secret` on this member alone (its secret never enters the
    /// store): the keyring to hold, or `None` if it is held already.
    pub(crate) fn install_local(&mut self, secret: &[u8], ring: &Keyring) -> Option<Vec<Secret>> {
        let id = key_id(secret);
        let mut keys: Vec<Secret> = held(ring).into_iter().map(|(_, s)| s).collect();
        if keys.iter().any(|k| key_id(k) == id) {
            return None;
        }
        keys.push(Secret::new(secret.to_vec()));
        self.local.push(id);
        self.pending.push(id);
        self.changed_here(&keys);
        Some(keys)
    }

    /// Takes a key installed on this member alone, that no rotation uses
    /// yet, back off it: the keyring to hold.
    pub(crate) fn remove_local(&mut self, id: KeyId, ring: &Keyring) -> Result<Vec<Secret>, KeyError> {
        let mut keys: Vec<Secret> = held(ring).into_iter().map(|(_, s)| s).collect();
        let pos = keys.iter().position(|k| key_id(k) == id).ok_or(KeyError::Unknown(id))?;
        if !self.pending.contains(&id) {
            return Err(KeyError::NotLocal(id));
        }
        keys.remove(pos);
        self.local.retain(|k| *k != id);
        self.pending.retain(|k| *k != id);
        self.changed_here(&keys);
        Ok(keys)
    }

    fn changed_here(&mut self, keys: &[Secret]) {
        self.events.push_back(KeysNotification::Changed {
            version: self.version,
            writer: None,
            primary: keys.first().map(|k| key_id(k)).unwrap_or_default(),
            keys_changed: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> WallTime {
        WallTime::from_unix_ms(ms)
    }

    #[test]
    fn versions_never_wrap_and_implausible_jumps_are_refused() {
        let now = 1_800_000_000_000; // ms
        assert!(plausible(1, at(now)));
        assert!(plausible(now + MAX_AHEAD_MS, at(now)));
        assert!(!plausible(now + MAX_AHEAD_MS + 1, at(now)), "a day ahead of the clock");
        assert!(!plausible(u64::MAX, at(now)));
        assert!(plausible(u64::MAX - 1, at(u64::MAX - 2)), "no overflow near the end");
        assert_eq!(next_version(7, at(now)).unwrap(), now);
        assert_eq!(next_version(now + 9, at(now)).unwrap(), now + 10);
        assert!(
            next_version(now + MAX_AHEAD_MS, at(now)).is_err(),
            "the others would refuse it"
        );
        assert!(next_version(u64::MAX - 1, at(now)).is_err());
        assert!(next_version(u64::MAX, at(now)).is_err());
    }

    #[test]
    fn the_version_cannot_be_ratcheted_a_day_per_write() {
        // A holder writes a day ahead, then a day ahead of that: the first
        // is followed, the second is refused by every member, the ones that
        // saw the first included, so a member joining later (which saw
        // nothing) follows exactly what the others follow.
        let now = 1_800_000_000_000;
        let first = now + MAX_AHEAD_MS;
        assert!(plausible(first, at(now)));
        assert!(!plausible(first + MAX_AHEAD_MS, at(now)));
        // An honest writer never writes what the others would refuse: right
        // after the forged write it is told to wait, a moment later its
        // version is followed by every member, a new one included.
        assert!(next_version(first, at(now)).is_err());
        let later = now + 1;
        assert_eq!(next_version(first, at(later)).ok(), Some(first + 1));
        assert!(plausible(first + 1, at(later)));
    }

    #[test]
    fn nothing_is_followed_before_the_restore_and_the_restore_follows() {
        let mut r = Rotation {
            due: true,
            ..Rotation::default()
        };
        assert!(!r.due(), "a follow now would be undone by the restore");
        r.due = false;
        r.restore(&KeyringRecord::default());
        assert!(r.due(), "what arrived before the restore is followed after it");
    }

    #[test]
    fn local_keys_are_never_shared_and_kept_until_named() {
        let old = Secret::new(vec![1; 16]);
        let new = Secret::new(vec![2; 32]);
        let (old_id, new_id) = (key_id(&old), key_id(&new));
        let mut ring = Keyring::new(&old).unwrap();
        ring.install(&new).unwrap();
        let mut r = Rotation {
            local: vec![new_id],
            pending: vec![new_id],
            ..Rotation::default()
        };
        let plan = r.plan_of(&ring);
        assert_eq!(plan.ids, vec![old_id]);
        assert!(plan.shares(old_id) && !plan.shares(new_id));
        // A desired keyring that does not name the local key keeps it.
        let (keys, lacking) = r.resolve(&plan, &ring);
        assert_eq!((keys, lacking), (vec![old.clone(), new.clone()], vec![]));
        // `use NEW`: the local secret still does not travel.
        let mut used = plan.clone();
        used.ids.insert(0, new_id);
        let desired = used.to_desired(2);
        assert!(
            !desired.shared.contains(&new) && desired.ids.contains(&new_id),
            "{desired:?}"
        );
        let (keys, _) = r.resolve(&used, &ring);
        (r.local, r.pending) = r.settle(&keys, &used);
        assert_eq!(keys, vec![new.clone(), old.clone()]);
        assert!(r.pending.is_empty());
        assert_eq!(r.local, vec![new_id]);
        // A member without the local key follows what it can, and says
        // what it lacks.
        let outsider_ring = Keyring::new(&old).unwrap();
        let outsider = Rotation::default();
        let (keys, lacking) = outsider.resolve(&used, &outsider_ring);
        assert_eq!((keys, lacking), (vec![old.clone()], vec![new_id]));
        // `remove OLD`: nothing left for it.
        let mut removed = used.clone();
        removed.ids.retain(|&k| k != old_id);
        removed.shared.retain(|k| key_id(k) != old_id);
        let (keys, lacking) = outsider.resolve(&removed, &outsider_ring);
        assert_eq!((keys, lacking), (vec![], vec![new_id]));
        // After `use NEW`, the local key is still not shared.
        let mut after = Keyring::new(&new).unwrap();
        after.install(&old).unwrap();
        assert_eq!(r.plan_of(&after).shared, vec![old]);
    }
}
