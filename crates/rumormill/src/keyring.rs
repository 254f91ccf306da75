//! Cluster-wide key rotation.
//!
//! Every key operation on one agent changes the keyring of every member of
//! the overlay, as with Serf's `keys` commands. The agent that takes the
//! request applies it, then writes a desired keyring (the key ids, primary
//! first, the secrets of the keys installed cluster-wide, and a version
//! above the highest it has seen) to the replicated store under
//! `_rumormill/keyring/<member>`; every member follows the desired keyring of
//! highest version (ties broken by member name), whatever order the writes
//! arrive in. An operation that changes nothing writes nothing, so a late
//! no-op can never undo a newer change. Versions are wall-clock milliseconds,
//! at least one above the highest seen; a version more than [`MAX_AHEAD_MS`]
//! ahead of this member's clock is refused, so a key holder cannot push the
//! version to `u64::MAX`, or step by step far into the future, and lock
//! later rotations or later joiners out. Each member also publishes which keys it holds, and which
//! is its primary, under `_rumormill/keys/<member>`, so the requesting agent
//! can tell when every live member has followed, and can refuse a step that
//! would lose packets:
//!
//! 1. `install NEW` — every member accepts NEW from now on;
//! 2. `use NEW` — refused until every live member reports NEW installed;
//!    then every member seals with NEW;
//! 3. `remove OLD` — refused while a live member still seals with OLD.
//!
//! Packets already in flight under OLD when it is removed are the only ones
//! rejected; none is rejected once the rotation has completed.
//!
//! A cluster-wide install carries the new secret in the desired keyring,
//! sealed under the current keys: every holder of the current keys learns
//! it. To rotate a holder *out*, the new key is installed on each trusted
//! agent alone (`install` with the local scope: the secret never enters the
//! store, only its id appears in the reports); `use` and `remove` name key
//! ids only, and take the members to leave out (`exclude`), which are not
//! waited for. Once the old key is removed, an excluded member can neither
//! open the others' packets nor have its own accepted.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use base64::Engine;
use rumormill_core::reserved::{self, DesiredKeyring, KeyReport as Report, ReservedKey};
use rumormill_core::{Event, KeyId, MemberInfo, Overlay};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use zeroize::{Zeroize, Zeroizing};

use crate::agent::{Agent, AgentError, Running, core_error, plaintext, running_mut, stopped, wall, wall_ms};
use crate::config;
use crate::driver::OverlayHandle;
use crate::persist::OverlayRecord;
use crate::transport::Net;

/// A desired keyring whose version (milliseconds) is more than this ahead
/// of the member's clock is refused (and logged): one day. Honest writers
/// use their clock, or one above the highest version seen, so only a key
/// holder trying to lock later rotations out (`u64::MAX` would leave no
/// room above it) jumps that far. The bound is the clock alone, not the
/// highest version seen: otherwise a holder could ratchet the version up a
/// day per write, and a member joining later (which has seen nothing)
/// would refuse every honest version above the ratchet. A member whose
/// clock is more than a day behind its peers' refuses their rotations
/// until its clock is set right (logged).
pub const MAX_AHEAD_MS: u64 = 24 * 3600 * 1000;
/// How often the requesting agent looks at the members' reports.
const POLL: Duration = Duration::from_millis(20);

fn report_key(member: &str) -> String {
    ReservedKey::KeyReport {
        member: member.to_owned(),
    }
    .key()
}

/// A keyring to hold: ids, primary first, and the secrets that may travel
/// in the store. Its secrets are wiped when it is dropped.
#[derive(Clone, PartialEq, Eq, Default)]
struct Plan {
    ids: Vec<KeyId>,
    shared: Vec<String>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        self.shared.zeroize();
    }
}

impl Plan {
    /// From a stored desired keyring.
    fn from_desired(d: &DesiredKeyring) -> Plan {
        Plan {
            ids: d.ids.clone(),
            shared: d
                .shared
                .iter()
                .map(|k| base64::engine::general_purpose::STANDARD.encode(&k[..]))
                .collect(),
        }
    }

    /// From this member's record: every key but those installed locally
    /// that no desired keyring names yet; only non-local secrets shared.
    fn from_record(rec: &OverlayRecord) -> Plan {
        let mut plan = Plan::default();
        for k in &rec.keys {
            let Some(id) = secret_id(k) else { continue };
            let hex = key_hex(id);
            if !rec.pending_keys.contains(&hex) {
                plan.ids.push(id);
            }
            if !rec.local_keys.contains(&hex) {
                plan.shared.push(k.clone());
            }
        }
        plan
    }

    fn to_desired(&self, version: u64) -> Result<DesiredKeyring, AgentError> {
        Ok(DesiredKeyring {
            version,
            ids: self.ids.clone(),
            shared: decode_all(&self.shared)?,
        })
    }

    fn shares(&self, id: KeyId) -> bool {
        self.shared.iter().any(|k| secret_id(k) == Some(id))
    }
}

/// The id of a base64 secret (`None` if it is not a key).
fn secret_id(secret: &str) -> Option<KeyId> {
    let bytes = config::decode_key(secret).ok()?;
    Some(rumormill_wire::key_id(&bytes))
}

fn parse_hex(s: &str) -> Option<KeyId> {
    KeyId::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The keyring a member holds under `plan`: the planned keys whose secret
/// it knows (from its own keyring or the plan), primary first, then its
/// local keys no plan names yet. Also the planned ids it lacks.
fn resolve(plan: &Plan, rec: &OverlayRecord) -> (Vec<String>, Vec<KeyId>) {
    let known: Vec<(KeyId, &String)> = rec
        .keys
        .iter()
        .chain(plan.shared.iter())
        .filter_map(|k| Some((secret_id(k)?, k)))
        .collect();
    let mut keys = Vec::new();
    let mut lacking = Vec::new();
    for id in &plan.ids {
        match known.iter().find(|(k, _)| k == id) {
            Some((_, secret)) => keys.push((*secret).clone()),
            None => lacking.push(*id),
        }
    }
    for k in &rec.keys {
        let Some(id) = secret_id(k) else { continue };
        if rec.pending_keys.contains(&key_hex(id)) && !plan.ids.contains(&id) {
            keys.push(k.clone());
        }
    }
    (keys, lacking)
}

/// After holding `keys` under `plan`: local keys the plan names are no
/// longer pending, shared ones no longer local, removed ones forgotten.
fn settle(rec: &mut OverlayRecord, keys: Vec<String>, plan: &Plan) {
    let mut old = std::mem::replace(&mut rec.keys, keys);
    old.zeroize();
    let held: Vec<String> = rec.keys.iter().filter_map(|k| secret_id(k)).map(key_hex).collect();
    let named: Vec<String> = plan.ids.iter().map(|&id| key_hex(id)).collect();
    rec.pending_keys.retain(|h| held.contains(h) && !named.contains(h));
    rec.local_keys
        .retain(|h| held.contains(h) && parse_hex(h).is_some_and(|id| !plan.shares(id)));
}

/// A desired keyring to follow: its version, its writer and its plan.
type Newest = Option<(u64, String, Plan)>;

/// The desired keyrings in the store: the one to follow, highest
/// `(version, writer)` among the plausible ones (see [`MAX_AHEAD_MS`]), and
/// the `(writer, version)` of those refused for their version.
fn desired_keyrings(o: &Overlay) -> (Newest, Vec<(String, u64)>) {
    let now = wall_ms();
    let mut refused = Vec::new();
    let every = ReservedKey::DesiredKeyring { member: String::new() }.key();
    let newest = o
        .store()
        .prefixed(&every)
        .filter_map(|u| {
            let ReservedKey::DesiredKeyring { member: writer } = reserved::owned(u)? else {
                return None;
            };
            let d = DesiredKeyring::decode(u.value.as_deref()?).ok()?;
            if !plausible(d.version, now) {
                refused.push((writer, d.version));
                return None;
            }
            Some((d.version, writer, Plan::from_desired(&d)))
        })
        .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    (newest, refused)
}

/// Whether a desired keyring's version may be followed at wall-clock time
/// `now` (milliseconds).
fn plausible(version: u64, now: u64) -> bool {
    version != u64::MAX && version <= now.saturating_add(MAX_AHEAD_MS)
}

/// The version of the next desired keyring written after `seen` at
/// wall-clock time `now`: the clock, or one above `seen` if that is higher;
/// refused when the others would refuse it (see [`plausible`]).
fn next_version(seen: u64, now: u64) -> Result<u64, AgentError> {
    seen.checked_add(1)
        .map(|v| v.max(now))
        .filter(|&v| plausible(v, now))
        .ok_or_else(|| {
            AgentError::Conflict(format!(
                "the newest keyring version ({seen}) is more than a day ahead of this agent's clock ({now} ms): \
                 check the clocks; a key change can be made once the clock has passed it"
            ))
        })
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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

fn parse_key_id(s: &str) -> Result<KeyId, AgentError> {
    parse_hex(s).ok_or_else(|| AgentError::BadRequest(format!("{s:?} is not a key id (8 hex digits, see `keys list`)")))
}

fn find_key(keys: &[String], id: KeyId) -> Option<usize> {
    keys.iter().position(|k| secret_id(k) == Some(id))
}

fn own_report(o: &Overlay) -> Option<Report> {
    let keys = o.keys()?;
    Some(Report {
        primary: keys.iter().find(|k| k.primary).map(|k| k.id).unwrap_or_default(),
        installed: keys.iter().map(|k| k.id).collect(),
    })
}

/// Publishes the local member's report when it changed.
fn publish(o: &mut Overlay, now: std::time::Instant) {
    let Some(report) = own_report(o) else { return };
    let key = report_key(o.name());
    let value = report.encode();
    if o.store().value(&key) != Some(value.as_slice()) {
        let _ = o.put(now, wall(), &key, value);
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
                .and_then(|v| Report::decode(v).ok());
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
    keys: &[Zeroizing<Vec<u8>>],
    desired: Option<DesiredKeyring>,
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
        let key = ReservedKey::DesiredKeyring {
            member: o.name().to_owned(),
        };
        o.put(now, wall(), &key.key(), d.encode()).map_err(core_error)?;
    }
    Ok(())
}

impl<N: Net> Agent<N> {
    /// The keyring: ids and suites, and how many live members hold each key.
    pub async fn keys(&self, name: &str) -> Result<Vec<KeyRow>, AgentError> {
        let handle = self.handle(name).await?;
        let local = match self.overlays.lock().await.get(name) {
            Some(r) => r.record.local_keys.clone(),
            None => return Err(AgentError::UnknownOverlay(name.to_owned())),
        };
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
                    installed_on: known().filter(|r| r.installed.contains(&k.id)).count(),
                    primary_on: known().filter(|r| r.primary == k.id).count(),
                    members: reports.len(),
                    local: local.contains(&id),
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
    /// members to report it. The secret travels in the overlay's store,
    /// sealed under the current keys: every current holder learns it.
    pub async fn install_key(&self, name: &str, key: &str, wait: Duration) -> Result<KeyChange, AgentError> {
        let id = secret_id(key).ok_or_else(|| bad_key(key))?;
        let key = Zeroizing::new(key.trim().to_owned());
        self.change_keyring(name, |plan, _| {
            if !plan.shares(id) {
                plan.shared.push(key.to_string());
            }
            if !plan.ids.contains(&id) {
                plan.ids.push(id);
            }
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %key_hex(id), "key installed");
        Ok(self
            .wait_for(name, id, wait, &[], move |r| r.installed.contains(&id))
            .await)
    }

    /// Installs a key on this agent alone: packets sealed with it are
    /// accepted here from now on. The secret never enters the overlay's
    /// store (only its id, in this member's report), so a member can be
    /// rotated out: install the new key this way on every agent to keep,
    /// then `use` it and `remove` the old one, excluding the others.
    /// Answers at once with the members that report the key so far.
    pub async fn install_local_key(&self, name: &str, key: &str) -> Result<KeyChange, AgentError> {
        let id = secret_id(key).ok_or_else(|| bad_key(key))?;
        let hex = key_hex(id);
        {
            let mut overlays = self.overlays.lock().await;
            let r = running_mut(&mut overlays, name)?;
            if r.record.keys.is_empty() {
                return Err(plaintext(name));
            }
            if find_key(&r.record.keys, id).is_none() {
                let mut rec = r.record.clone();
                rec.keys.push(key.trim().to_owned());
                rec.local_keys.push(hex.clone());
                rec.pending_keys.push(hex.clone());
                self.hold_locally(name, r, rec).await?;
                tracing::info!(overlay = %name, key = %hex, "key installed on this agent only");
            }
        }
        Ok(self
            .wait_for(name, id, Duration::ZERO, &[], move |r| r.installed.contains(&id))
            .await)
    }

    /// Makes the overlay hold `rec`'s keyring on this agent alone (no
    /// desired keyring is written), then saves `rec`.
    async fn hold_locally(&self, name: &str, r: &mut Running, rec: OverlayRecord) -> Result<(), AgentError> {
        let bytes = decode_all(&rec.keys)?;
        r.handle
            .call(move |o, now| apply(o, now, &bytes, None))
            .await
            .map_err(|_| stopped(name))??;
        self.db.put_overlay(&rec)?;
        r.record = rec;
        Ok(())
    }

    /// Removes from this agent alone a key installed with
    /// [`Agent::install_local_key`] that no rotation has used yet.
    pub async fn remove_local_key(&self, name: &str, id: &str) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let hex = key_hex(id);
        {
            let mut overlays = self.overlays.lock().await;
            let r = running_mut(&mut overlays, name)?;
            let pos = find_key(&r.record.keys, id).ok_or_else(|| unknown_key(id))?;
            if !r.record.pending_keys.contains(&hex) {
                return Err(AgentError::Conflict(format!(
                    "key {hex} is part of the overlay's keyring, not only of this agent's: remove it from every member (`keys remove` without `--local`)"
                )));
            }
            let mut rec = r.record.clone();
            let mut secret = rec.keys.remove(pos);
            secret.zeroize();
            rec.local_keys.retain(|h| *h != hex);
            rec.pending_keys.retain(|h| *h != hex);
            self.hold_locally(name, r, rec).await?;
            tracing::info!(overlay = %name, key = %hex, "key removed from this agent");
        }
        Ok(self
            .wait_for(name, id, Duration::ZERO, &[], move |r| !r.installed.contains(&id))
            .await)
    }

    /// Makes a key primary on every member. Refused unless every live
    /// member not in `exclude` reports it installed; those in `exclude` are
    /// not waited for.
    pub async fn use_key(
        &self,
        name: &str,
        id: &str,
        wait: Duration,
        exclude: &[String],
    ) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let hex = key_hex(id);
        if find_key(&self.export_keys(name).await?, id).is_none() {
            return Err(unknown_key(id));
        }
        let lacking = self
            .members_where(name, wait, exclude, |r| !r.is_some_and(|r| r.installed.contains(&id)))
            .await?;
        if !lacking.is_empty() {
            return Err(AgentError::Conflict(format!(
                "key {hex} is not installed on {}: install it there first (`keys install`, or `keys install --local` on each agent to keep), or leave them out with `--exclude` (they are cut off once the old key is removed); otherwise the packets they cannot open would be lost",
                lacking.join(", ")
            )));
        }
        self.change_keyring(name, |plan, rec| {
            if find_key(&rec.keys, id).is_none() && !plan.shares(id) {
                return Err(unknown_key(id));
            }
            plan.ids.retain(|&k| k != id);
            plan.ids.insert(0, id);
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %hex, excluded = ?exclude, "primary key changed");
        Ok(self.wait_for(name, id, wait, exclude, move |r| r.primary == id).await)
    }

    /// Removes a key from every member. Refused while a live member not in
    /// `exclude` still seals with it.
    pub async fn remove_key(
        &self,
        name: &str,
        id: &str,
        wait: Duration,
        exclude: &[String],
    ) -> Result<KeyChange, AgentError> {
        let id = parse_key_id(id)?;
        let hex = key_hex(id);
        match self.export_keys(name).await?.first() {
            Some(k) if secret_id(k) == Some(id) => {
                return Err(AgentError::Conflict(format!(
                    "key {hex} is the primary key: make another one primary first (`keys use`)"
                )));
            }
            _ => {}
        }
        let sealing = self
            .members_where(name, wait, exclude, |r| r.is_some_and(|r| r.primary == id))
            .await?;
        if !sealing.is_empty() {
            return Err(AgentError::Conflict(format!(
                "key {hex} is the primary key of {}: make another key primary first (`keys use`), or leave them out with `--exclude`",
                sealing.join(", ")
            )));
        }
        self.change_keyring(name, |plan, _| {
            let pos = plan.ids.iter().position(|&k| k == id).ok_or_else(|| unknown_key(id))?;
            if pos == 0 {
                return Err(AgentError::Conflict(format!(
                    "key {} is the primary key: make another one primary first",
                    key_hex(id)
                )));
            }
            plan.ids.remove(pos);
            plan.shared.retain(|k| secret_id(k) != Some(id));
            Ok(())
        })
        .await?;
        tracing::info!(overlay = %name, key = %hex, excluded = ?exclude, "key removed");
        Ok(self
            .wait_for(name, id, wait, exclude, move |r| !r.installed.contains(&id))
            .await)
    }

    /// Edits the overlay's keyring (the newest desired one, or this
    /// member's own if it is newer), applies and saves it, and publishes it
    /// with a version above every one seen.
    async fn change_keyring(
        &self,
        name: &str,
        edit: impl FnOnce(&mut Plan, &OverlayRecord) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = running_mut(&mut overlays, name)?;
        if r.record.keys.is_empty() {
            return Err(plaintext(name));
        }
        let local_seen = r.record.keyring_version;
        let (newest, _) = r
            .handle
            .call(move |o, _| desired_keyrings(o))
            .await
            .map_err(|_| stopped(name))?;
        let (base, seen) = match newest {
            Some((v, _, plan)) if v >= local_seen => (plan, v),
            other => (Plan::from_record(&r.record), other.map_or(0, |(v, _, _)| v)),
        };
        let mut plan = base.clone();
        edit(&mut plan, &r.record)?;
        let version = next_version(seen.max(local_seen), wall_ms())?;
        let changed = plan != base;
        let (keys, _) = resolve(&plan, &r.record);
        if !changed && keys == r.record.keys {
            return Ok(()); // nothing to change, nothing to publish
        }
        if keys.is_empty() {
            return Err(AgentError::Conflict(
                "the change would leave this member without a key".into(),
            ));
        }
        let desired = if changed { Some(plan.to_desired(version)?) } else { None };
        let bytes = decode_all(&keys)?;
        r.handle
            .call(move |o, now| apply(o, now, &bytes, desired))
            .await
            .map_err(|_| stopped(name))??;
        let mut rec = r.record.clone();
        settle(&mut rec, keys, &plan);
        if changed {
            rec.keyring_version = version;
        }
        self.db.put_overlay(&rec)?;
        r.record = rec;
        Ok(())
    }

    /// Follows the newest desired keyring in the store, read under the
    /// agent's lock so that a change made meanwhile is never undone.
    async fn follow(&self, name: &str) -> Result<(), AgentError> {
        let mut overlays = self.overlays.lock().await;
        let r = running_mut(&mut overlays, name)?;
        let seen = r.record.keyring_version;
        let (newest, refused) = r
            .handle
            .call(move |o, _| desired_keyrings(o))
            .await
            .map_err(|_| stopped(name))?;
        for (writer, version) in refused {
            tracing::warn!(overlay = %name, %writer, version, seen, "desired keyring refused: its version is more than a day ahead of this agent's clock");
        }
        let Some((version, writer, plan)) = newest else {
            return Ok(());
        };
        if version < seen {
            return Ok(());
        }
        let (keys, lacking) = resolve(&plan, &r.record);
        if !lacking.is_empty() {
            let ids: Vec<String> = lacking.iter().map(|&id| key_hex(id)).collect();
            tracing::warn!(overlay = %name, keys = %ids.join(","), version, %writer,
                "the overlay's keyring names keys this member does not hold: it was left out of a rotation (install them with `keys install --local`)");
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut rec = r.record.clone();
        let changed_keys = keys != rec.keys;
        settle(&mut rec, keys.clone(), &plan);
        rec.keyring_version = version;
        if rec == r.record {
            return Ok(());
        }
        if changed_keys {
            let bytes = decode_all(&keys)?;
            r.handle
                .call(move |o, now| apply(o, now, &bytes, None))
                .await
                .map_err(|_| stopped(name))??;
        }
        self.db.put_overlay(&rec)?;
        r.record = rec;
        if changed_keys {
            let primary = plan.ids.first().map(|&id| key_hex(id)).unwrap_or_default();
            tracing::info!(overlay = %name, %primary, version, %writer, "keyring changed by the overlay");
        }
        Ok(())
    }

    /// Names of live members not in `exclude` whose report matches `pred`,
    /// once none does or `wait` has passed.
    async fn members_where(
        &self,
        name: &str,
        wait: Duration,
        exclude: &[String],
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
                .filter(|(n, r)| !exclude.contains(n) && pred(r.as_ref()))
                .map(|(n, _)| n)
                .collect();
            if matching.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(matching);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `wait` for every live member's report (but those in
    /// `exclude`) to satisfy `done`.
    async fn wait_for(
        &self,
        name: &str,
        id: KeyId,
        wait: Duration,
        exclude: &[String],
        done: impl Fn(&Report) -> bool,
    ) -> KeyChange {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let rows = match self.handle(name).await {
                Ok(h) => h.call(|o, _| reports(o)).await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let (excluded, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(n, _)| exclude.contains(n));
            let (ok, missing): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, r)| r.as_ref().is_some_and(&done));
            let change = KeyChange {
                id: key_hex(id),
                members: ok.len() + missing.len() + excluded.len(),
                done: ok.into_iter().map(|(n, _)| n).collect(),
                missing: missing.into_iter().map(|(n, _)| n).collect(),
                excluded: exclude.to_vec(),
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

fn bad_key(key: &str) -> AgentError {
    match config::decode_key(key) {
        Err(m) => AgentError::BadRequest(m),
        Ok(_) => AgentError::BadRequest("not a key".into()),
    }
}

fn decode_all(keys: &[String]) -> Result<Vec<Zeroizing<Vec<u8>>>, AgentError> {
    keys.iter()
        .map(|k| config::decode_key(k).map_err(AgentError::BadRequest))
        .collect()
}

/// Follows the overlay's desired keyring: runs while the overlay does.
pub(crate) async fn watch<N: Net>(agent: Weak<Agent<N>>, name: String, handle: OverlayHandle) {
    let mut events = handle.subscribe();
    loop {
        match events.recv().await {
            Ok(Event::Update(u))
                if matches!(
                    ReservedKey::parse(&u.update.key),
                    Some(ReservedKey::DesiredKeyring { .. })
                ) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_never_wrap_and_implausible_jumps_are_refused() {
        let now = 1_800_000_000_000; // ms
        assert!(plausible(1, now));
        assert!(plausible(now + MAX_AHEAD_MS, now));
        assert!(!plausible(now + MAX_AHEAD_MS + 1, now), "a day ahead of the clock");
        assert!(!plausible(u64::MAX, now));
        assert!(plausible(u64::MAX - 1, u64::MAX - 2), "no overflow near the end");
        assert_eq!(next_version(7, now).unwrap(), now);
        assert_eq!(next_version(now + 9, now).unwrap(), now + 10);
        assert!(
            next_version(now + MAX_AHEAD_MS, now).is_err(),
            "the others would refuse it"
        );
        assert!(next_version(u64::MAX - 1, now).is_err());
        assert!(next_version(u64::MAX, now).is_err());
    }

    #[test]
    fn the_version_cannot_be_ratcheted_a_day_per_write() {
        // A holder writes a day ahead, then a day ahead of that: the first
        // is followed, the second is refused by every member, the ones that
        // saw the first included, so a member joining later (which saw
        // nothing) follows exactly what the others follow.
        let now = 1_800_000_000_000;
        let first = now + MAX_AHEAD_MS;
        assert!(plausible(first, now));
        assert!(!plausible(first + MAX_AHEAD_MS, now));
        // An honest writer never writes what the others would refuse: right
        // after the forged write it is told to wait, a moment later its
        // version is followed by every member, a new one included.
        assert!(next_version(first, now).is_err());
        let later = now + 1;
        assert_eq!(next_version(first, later).ok(), Some(first + 1));
        assert!(plausible(first + 1, later));
    }

    #[test]
    fn local_keys_are_never_shared_and_kept_until_named() {
        let old = config::generate_key();
        let new = config::generate_key();
        let old_id = secret_id(&old).unwrap();
        let new_id = secret_id(&new).unwrap();
        let mut rec = OverlayRecord::new(config::OverlaySpec::named("o"), "m".into());
        rec.keys = vec![old.clone(), new.clone()];
        rec.local_keys = vec![key_hex(new_id)];
        rec.pending_keys = vec![key_hex(new_id)];
        let plan = Plan::from_record(&rec);
        assert_eq!(plan.ids, vec![old_id]);
        assert!(plan.shares(old_id) && !plan.shares(new_id));
        // A desired keyring that does not name the local key keeps it.
        let (keys, lacking) = resolve(&plan, &rec);
        assert_eq!((keys, lacking), (vec![old.clone(), new.clone()], vec![]));
        // `use NEW`: the local secret still does not travel.
        let mut used = plan.clone();
        used.ids.insert(0, new_id);
        let desired = used.to_desired(2).unwrap();
        let new_bytes = config::decode_key(&new).unwrap();
        assert!(
            !desired.shared.iter().any(|s| s[..] == new_bytes[..]) && desired.ids.contains(&new_id),
            "{desired:?}"
        );
        let (keys, _) = resolve(&used, &rec);
        settle(&mut rec, keys, &used);
        assert_eq!(rec.keys, vec![new.clone(), old.clone()]);
        assert!(rec.pending_keys.is_empty());
        assert_eq!(rec.local_keys, vec![key_hex(new_id)]);
        // A member without the local key follows what it can, and says
        // what it lacks.
        let mut outsider = OverlayRecord::new(config::OverlaySpec::named("o"), "x".into());
        outsider.keys = vec![old.clone()];
        let (keys, lacking) = resolve(&used, &outsider);
        assert_eq!((keys, lacking), (vec![old.clone()], vec![new_id]));
        // `remove OLD`: nothing left for it.
        let mut removed = used.clone();
        removed.ids.retain(|&k| k != old_id);
        removed.shared.retain(|k| secret_id(k) != Some(old_id));
        let (keys, lacking) = resolve(&removed, &outsider);
        assert_eq!((keys, lacking), (vec![], vec![new_id]));
        assert_eq!(Plan::from_record(&rec).shared, vec![old]);
    }
}
