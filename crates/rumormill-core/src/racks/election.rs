//! One rack's gateway election: the rack's candidates form a Raft group,
//! and its leader is the rack's active gateway.
//!
//! Raft itself is raft-rs (TiKV's), driven as a sans-IO [`RawNode`]: this
//! module ticks it, steps it with the messages that arrived, and takes its
//! `Ready`s apart. It adds nothing to the algorithm; what it decides is how
//! Raft meets the rest of Rumormill:
//!
//! - **Nothing is proposed.** The log holds only the empty entry each new
//!   leader appends: it decides leadership and nothing else, so it is never
//!   compacted and snapshots never travel.
//! - **The voters are fixed at bootstrap**: when `candidates` candidates of
//!   the rack are known, the ones with the lowest names. They are kept with
//!   the durable state and never guessed again. Each message carries a
//!   fingerprint of its sender's voters, and one from another group is
//!   refused: two bootstraps that saw different candidates never mix votes.
//! - **Raft's rule on disk.** The hard state and the log of a `Ready` are
//!   handed out as a [`RaftRecord`]; the messages that depend on them (votes
//!   above all) are held until the driver says the record is durable
//!   ([`Election::persisted`]). Messages that do not depend on it (a
//!   leader's appends and heartbeats) leave at once, as raft-rs allows.
//! - **Our randomness.** raft-rs draws each randomized election timeout from
//!   the thread's RNG; whenever it could have drawn one (a new term or
//!   role), the timeout is drawn again from the overlay's seeded RNG and set,
//!   so the simulator stays deterministic.
//! - Pre-vote and check-quorum are on: a candidate cut off from the rack
//!   cannot disrupt it when it comes back, and a leader that loses its
//!   majority steps down after an election timeout, so a rack split without
//!   a majority has no gateway at all.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto;

use crate::membership::name_hash;

/// Errors of the election.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RaftError {
    /// The message came from a member that is not one of the voters.
    #[error("raft message from {0}, which is not a voter of this rack")]
    NotAVoter(String),
    /// The message's voters are not ours (another bootstrap).
    #[error("raft message from {0} of another group of voters")]
    OtherGroup(String),
    /// The message's type is not one an election exchanges.
    #[error("raft message of type {0}, which elections do not use")]
    Type(u32),
    /// The sender's id does not match its name.
    #[error("raft message from {name} claims id {id:#x}")]
    Forged {
        /// The member it came from.
        name: String,
        /// The id it claims.
        id: u64,
    },
    /// This member's group has not been bootstrapped yet.
    #[error("this member's raft group is not bootstrapped yet")]
    NotBootstrapped,
    /// A durable state that does not decode or does not make sense.
    #[error("raft state: {0}")]
    State(String),
    /// raft-rs refused the message or the state.
    #[error("raft: {0}")]
    Raft(String),
}

/// A candidate's role in its rack's Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RaftRole {
    /// The rack's active gateway.
    Leader,
    /// Follows a leader, or waits for one.
    Follower,
    /// Asks for votes.
    Candidate,
    /// Asks whether it could win before it raises the term (pre-vote).
    PreCandidate,
    /// Not known here (a voter seen from another voter that is not the
    /// leader: only a leader follows the others' progress).
    Unknown,
}

impl RaftRole {
    /// The lower-case name used in reports and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::PreCandidate => "pre-candidate",
            RaftRole::Unknown => "unknown",
        }
    }

    fn of(role: StateRole) -> RaftRole {
        match role {
            StateRole::Leader => RaftRole::Leader,
            StateRole::Follower => RaftRole::Follower,
            StateRole::Candidate => RaftRole::Candidate,
            StateRole::PreCandidate => RaftRole::PreCandidate,
        }
    }
}

/// A candidate's complete durable Raft state, to be saved before the
/// messages that depend on it leave (see [`crate::Overlay::raft_persisted`]).
/// Saving a newer record replaces the older one; after a restart,
/// [`crate::Overlay::restore_raft`] takes the latest back.
///
/// ```
/// use rumormill_core::racks::RaftRecord;
/// let record = RaftRecord::decode(&[]).unwrap(); // an empty state: term 0, no voters
/// assert_eq!(record.term(), 0);
/// assert_eq!(RaftRecord::decode(&record.encode()).unwrap(), record);
/// assert!(RaftRecord::decode(&[0xff]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RaftRecord {
    /// Numbers the records of one life of the member, from 1; give it back
    /// to [`crate::Overlay::raft_persisted`] once the record is durable.
    pub seq: u64,
    state: proto::RaftState,
}

impl RaftRecord {
    /// The Raft term the record was taken in.
    pub fn term(&self) -> u64 {
        self.state.term
    }

    /// The voters of the group, by name (empty before bootstrap).
    pub fn voters(&self) -> &[String] {
        &self.state.voters
    }

    /// The bytes to save (a `RaftState` protobuf message).
    pub fn encode(&self) -> Vec<u8> {
        self.state.encode_to_vec()
    }

    /// Reads saved bytes back; `seq` starts again at 0.
    pub fn decode(bytes: &[u8]) -> Result<RaftRecord, RaftError> {
        let state = proto::RaftState::decode(bytes).map_err(|e| RaftError::State(e.to_string()))?;
        let mut last = (0, 0);
        for e in &state.entries {
            if e.index != last.0 + 1 || e.term < last.1 || e.term > state.term {
                return Err(RaftError::State(format!(
                    "log entry {} of term {} does not follow entry {} of term {}",
                    e.index, e.term, last.0, last.1
                )));
            }
            last = (e.index, e.term);
        }
        if state.commit > last.0 {
            return Err(RaftError::State(format!(
                "commit index {} beyond the log's last entry {}",
                state.commit, last.0
            )));
        }
        Ok(RaftRecord { seq: 0, state })
    }
}

/// How often the election ticks and how many ticks make its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTiming {
    /// Time between two ticks.
    pub tick: Duration,
    /// A follower that heard no leader for this many ticks (randomized up
    /// to twice as many) starts an election.
    pub election_ticks: usize,
    /// A leader sends heartbeats every this many ticks.
    pub heartbeat_ticks: usize,
}

/// The Raft id of a member: its name's hash (0, Raft's "nobody", becomes 1).
pub(crate) fn raft_id(name: &str) -> u64 {
    name_hash(name).max(1)
}

/// Fingerprint of a set of voters (sorted names).
fn group_of(voters: &[Arc<str>]) -> u64 {
    let mut joined = String::new();
    for v in voters {
        joined.push_str(v);
        joined.push('\0');
    }
    name_hash(&joined)
}

/// One rack's Raft group, as this candidate's node of it.
pub(crate) struct Election {
    me: Arc<str>,
    id: u64,
    timing: ElectionTiming,
    rng: ChaCha8Rng,
    node: Option<RawNode<MemStorage>>,
    /// Voters by Raft id, fixed at bootstrap.
    voters: BTreeMap<u64, Arc<str>>,
    group: u64,
    next_tick: Instant,
    /// (term, role) when the randomized timeout was last drawn.
    drawn: Option<(u64, StateRole)>,
    /// Records handed out so far; the last one the driver made durable.
    seq: u64,
    durable: u64,
    records: VecDeque<RaftRecord>,
    /// Messages waiting for a record to be durable.
    held: VecDeque<(u64, Message)>,
    out: VecDeque<(Arc<str>, proto::RaftMessage)>,
    logger: slog::Logger,
}

impl Election {
    /// This member's node, not bootstrapped yet.
    pub(crate) fn new(me: &str, timing: ElectionTiming, seed: u64, now: Instant) -> Election {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Candidates started together would tick together, and those whose
        // timeouts drew the same number of ticks would campaign at the same
        // instant and split the vote: a random phase sets them apart.
        let phase = timing.tick.mul_f64(rng.random::<f64>());
        Election {
            me: me.into(),
            id: raft_id(me),
            timing,
            rng,
            node: None,
            voters: BTreeMap::new(),
            group: 0,
            next_tick: now + phase,
            drawn: None,
            seq: 0,
            durable: 0,
            records: VecDeque::new(),
            held: VecDeque::new(),
            out: VecDeque::new(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
        }
    }

    /// Whether the group's voters are known.
    pub(crate) fn is_bootstrapped(&self) -> bool {
        self.node.is_some()
    }

    /// Fixes the voters (this member among them) and starts the node. Does
    /// nothing if already bootstrapped or restored.
    pub(crate) fn bootstrap(&mut self, voters: &[Arc<str>]) -> Result<(), RaftError> {
        if self.node.is_some() {
            return Ok(());
        }
        let mut names: Vec<Arc<str>> = voters.to_vec();
        names.sort();
        names.dedup();
        if !names.contains(&self.me) {
            return Err(RaftError::State(format!("{} is not among the voters", self.me)));
        }
        let state = proto::RaftState {
            voters: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        self.start(&state)?;
        // The voters are durable state too: save them before any vote.
        self.push_record();
        Ok(())
    }

    /// Brings the node back from its latest durable record (before any
    /// other input). A record without voters leaves it unbootstrapped.
    pub(crate) fn restore(&mut self, record: &RaftRecord) -> Result<(), RaftError> {
        if self.node.is_some() {
            return Err(RaftError::State("the raft group is already running".into()));
        }
        if record.state.voters.is_empty() {
            return Ok(());
        }
        self.start(&record.state)
    }

    fn start(&mut self, state: &proto::RaftState) -> Result<(), RaftError> {
        let names: Vec<Arc<str>> = state.voters.iter().map(|v| Arc::from(v.as_str())).collect();
        let voters: BTreeMap<u64, Arc<str>> = names.iter().map(|n| (raft_id(n), n.clone())).collect();
        if voters.len() != names.len() {
            return Err(RaftError::State("two voters share a raft id".into()));
        }
        if !voters.contains_key(&self.id) {
            return Err(RaftError::State(format!("{} is not among the voters", self.me)));
        }
        let storage =
            MemStorage::new_with_conf_state(ConfState::from((voters.keys().copied().collect::<Vec<_>>(), vec![])));
        {
            let mut w = storage.wl();
            let entries: Vec<Entry> = state.entries.iter().map(|e| entry(e.term, e.index)).collect();
            w.append(&entries).map_err(|e| RaftError::State(e.to_string()))?;
            w.set_hardstate(HardState {
                term: state.term,
                vote: state.vote,
                commit: state.commit,
                ..Default::default()
            });
        }
        let config = raft::Config {
            id: self.id,
            election_tick: self.timing.election_ticks.max(2),
            heartbeat_tick: self.timing.heartbeat_ticks.max(1),
            pre_vote: true,
            check_quorum: true,
            // Only empty entries travel: a small window is plenty.
            max_inflight_msgs: 64,
            ..Default::default()
        };
        let node = RawNode::new(&config, storage, &self.logger).map_err(|e| RaftError::Raft(e.to_string()))?;
        self.group = group_of(&names);
        self.voters = voters;
        self.node = Some(node);
        self.redraw();
        Ok(())
    }

    /// Steps a message from the rack member `from`.
    pub(crate) fn handle(&mut self, from: &str, msg: proto::RaftMessage) -> Result<(), RaftError> {
        let Some(node) = self.node.as_mut() else {
            return Err(RaftError::NotBootstrapped);
        };
        let from_id = raft_id(from);
        if !self.voters.contains_key(&from_id) {
            return Err(RaftError::NotAVoter(from.into()));
        }
        if msg.from != from_id || msg.to != self.id {
            return Err(RaftError::Forged {
                name: from.into(),
                id: msg.from,
            });
        }
        if msg.group != self.group {
            return Err(RaftError::OtherGroup(from.into()));
        }
        let m = from_proto(msg)?;
        node.step(m).map_err(|e| RaftError::Raft(e.to_string()))?;
        self.advance();
        Ok(())
    }

    /// When the next tick is due (none before bootstrap).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.node.as_ref().map(|_| self.next_tick)
    }

    /// Ticks once if a tick is due. A late call ticks once and keeps the
    /// phase: a member that stalled does not start an election at once
    /// because it missed many ticks.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.next_tick > now {
            return;
        }
        self.next_tick = crate::overlay::next_tick(self.next_tick, self.timing.tick, now);
        if let Some(node) = self.node.as_mut() {
            node.tick();
            self.advance();
        }
    }

    /// The next record to make durable.
    pub(crate) fn poll_record(&mut self) -> Option<RaftRecord> {
        self.records.pop_front()
    }

    /// The driver has made the record `seq` (and all before it) durable:
    /// the messages that waited for it may leave.
    pub(crate) fn persisted(&mut self, seq: u64) {
        self.durable = self.durable.max(seq.min(self.seq));
        while self.held.front().is_some_and(|(s, _)| *s <= self.durable) {
            if let Some((_, m)) = self.held.pop_front() {
                self.send(m);
            }
        }
    }

    /// The next message to send: the voter's name and the message.
    pub(crate) fn poll_message(&mut self) -> Option<(Arc<str>, proto::RaftMessage)> {
        self.out.pop_front()
    }

    /// The leader this node knows of, if any.
    pub(crate) fn leader(&self) -> Option<Arc<str>> {
        let node = self.node.as_ref()?;
        self.voters.get(&node.raft.leader_id).cloned()
    }

    /// The current term (0 before bootstrap).
    pub(crate) fn term(&self) -> u64 {
        self.node.as_ref().map_or(0, |n| n.raft.term)
    }

    /// Whether this node leads its group.
    pub(crate) fn is_leader(&self) -> bool {
        self.node.as_ref().is_some_and(|n| n.raft.state == StateRole::Leader)
    }

    /// Each voter's role as far as this node knows: its own exactly; the
    /// others' as followers of a leader that hears them (known to the
    /// leader only), else unknown.
    pub(crate) fn roles(&self) -> Vec<(Arc<str>, RaftRole)> {
        let Some(node) = self.node.as_ref() else {
            return Vec::new();
        };
        let leading = node.raft.state == StateRole::Leader;
        self.voters
            .iter()
            .map(|(&id, name)| {
                let role = if id == self.id {
                    RaftRole::of(node.raft.state)
                } else if id == node.raft.leader_id {
                    RaftRole::Leader
                } else if leading && node.raft.prs().get(id).is_some_and(|p| p.recent_active) {
                    RaftRole::Follower
                } else {
                    RaftRole::Unknown
                };
                (name.clone(), role)
            })
            .collect()
    }

    /// The voters, sorted by name.
    pub(crate) fn voters(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.voters.values().cloned().collect();
        v.sort();
        v
    }

    /// Draws the randomized election timeout from our RNG whenever raft-rs
    /// may have drawn one from its own (a new term or role).
    fn redraw(&mut self) {
        let Some(node) = self.node.as_mut() else { return };
        let now = (node.raft.term, node.raft.state);
        if self.drawn == Some(now) {
            return;
        }
        self.drawn = Some(now);
        let min = node.raft.election_timeout();
        let t = self.rng.random_range(min..2 * min);
        node.raft.set_randomized_election_timeout(t);
    }

    /// Takes the node's `Ready` apart: what may go now goes, what must wait
    /// for the disk waits, and the state to save becomes a record.
    fn advance(&mut self) {
        self.redraw();
        let Some(node) = self.node.as_mut() else { return };
        if !node.has_ready() {
            return;
        }
        let mut ready = node.ready();
        let now: Vec<Message> = ready.take_messages();
        let mut changed = false;
        if !ready.entries().is_empty() {
            // Only a leader's empty entries exist (nothing is proposed), and
            // a follower's appends of them.
            if let Err(e) = node.store().wl().append(ready.entries()) {
                debug_assert!(false, "raft-rs handed an unappendable entry: {e}");
            }
            changed = true;
        }
        if let Some(hs) = ready.hs() {
            node.store().wl().set_hardstate(hs.clone());
            changed = true;
        }
        let after: Vec<Message> = ready.take_persisted_messages();
        // Committed entries carry nothing to apply.
        let _ = ready.take_committed_entries();
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.store().wl().mut_hard_state().commit = commit;
        }
        let later: Vec<Message> = light.take_messages();
        let _ = light.take_committed_entries();
        node.advance_apply();
        for m in now {
            self.send(m);
        }
        if changed {
            self.push_record();
            let seq = self.seq;
            self.held.extend(after.into_iter().map(|m| (seq, m)));
        } else {
            for m in after {
                self.send(m);
            }
        }
        for m in later {
            self.send(m);
        }
        // Stepping may have changed the term or role again.
        self.redraw();
    }

    /// Snapshots the durable state as the next record.
    fn push_record(&mut self) {
        let Some(node) = self.node.as_ref() else { return };
        use raft::Storage as _;
        let store = node.store();
        let hs = store.rl().hard_state().clone();
        let first = store.first_index().unwrap_or(1);
        let last = store.last_index().unwrap_or(0);
        let entries = if last >= first {
            store
                .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let state = proto::RaftState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
            entries: entries
                .iter()
                .map(|e| proto::RaftEntry {
                    term: e.term,
                    index: e.index,
                })
                .collect(),
            voters: self.voters().iter().map(|v| v.to_string()).collect(),
        };
        self.seq += 1;
        self.records.push_back(RaftRecord { seq: self.seq, state });
    }

    fn send(&mut self, m: Message) {
        let Some(to) = self.voters.get(&m.to).cloned() else {
            return;
        };
        let msg = to_proto(&m, self.group);
        self.out.push_back((to, msg));
    }
}

/// The message types an election exchanges; anything else is refused.
fn message_type(t: u32) -> Result<MessageType, RaftError> {
    use MessageType::*;
    let ty = match t {
        3 => MsgAppend,
        4 => MsgAppendResponse,
        5 => MsgRequestVote,
        6 => MsgRequestVoteResponse,
        8 => MsgHeartbeat,
        9 => MsgHeartbeatResponse,
        14 => MsgTimeoutNow,
        17 => MsgRequestPreVote,
        18 => MsgRequestPreVoteResponse,
        other => return Err(RaftError::Type(other)),
    };
    Ok(ty)
}

/// An empty entry: the only kind the log holds.
fn entry(term: u64, index: u64) -> Entry {
    Entry {
        term,
        index,
        ..Default::default()
    }
}

fn from_proto(msg: proto::RaftMessage) -> Result<Message, RaftError> {
    let mut m = Message::default();
    m.set_msg_type(message_type(msg.msg_type)?);
    m.to = msg.to;
    m.from = msg.from;
    m.term = msg.term;
    m.log_term = msg.log_term;
    m.index = msg.index;
    m.commit = msg.commit;
    m.commit_term = msg.commit_term;
    m.reject = msg.reject;
    m.reject_hint = msg.reject_hint;
    m.entries = msg
        .entries
        .into_iter()
        .map(|e| entry(e.term, e.index))
        .collect::<Vec<_>>()
        .into();
    Ok(m)
}

fn to_proto(m: &Message, group: u64) -> proto::RaftMessage {
    proto::RaftMessage {
        msg_type: m.get_msg_type() as u32,
        to: m.to,
        from: m.from,
        term: m.term,
        log_term: m.log_term,
        index: m.index,
        entries: m
            .entries
            .iter()
            .map(|e| proto::RaftEntry {
                term: e.term,
                index: e.index,
            })
            .collect(),
        commit: m.commit,
        commit_term: m.commit_term,
        reject: m.reject,
        reject_hint: m.reject_hint,
        group,
    }
}

#[cfg(test)]
mod tests;
