//! Replication of updates: rumor mongering and anti-entropy (Demers et
//! al. 1987; Grapevine's protocols, with their flaws fixed).
//!
//! - [`store`]: the key/value data, last-writer-wins versions, per-origin
//!   seen summaries;
//! - [`rumor`]: rumor mongering with the SIR states, feedback or blind
//!   removal, counter or coin loss of interest;
//! - [`anti_entropy`]: push, pull or push-pull exchanges of digests, then of
//!   only the missing updates;
//! - [`handler`]: the application's decision over incoming updates.
//!
//! [`Replication`] is sans-IO like the rest of the core: the [`Overlay`]
//! embeds one and feeds it messages, time and live members; it can also be
//! driven on its own over a fixed member list (the simulator does this for
//! 100,000 members).
//!
//! [`Overlay`]: crate::Overlay

pub mod anti_entropy;
pub mod handler;
#[cfg(test)]
mod quota_tests;
pub mod rumor;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumormill_wire::proto::{Envelope, envelope::Body};

pub use handler::{AcceptAll, Decision, UpdateHandler};
pub use rumor::RumorState;
pub use store::{Limits, QuotaExceeded, Store, Update, Usage};

use crate::membership::Stamp;

macro_rules! choice {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in configuration and on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<$name, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        concat!("invalid ", $what, " {:?}: expected one of {}"),
                        other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

choice!(
    /// Which protocols spread updates.
    Mode, "dissemination mode", {
        /// Rumor mongering only: fast and cheap, a small residue may miss an update.
        Rumor = "rumor",
        /// Anti-entropy only: slower, reaches everyone.
        AntiEntropy = "anti-entropy",
        /// Rumor mongering, with anti-entropy as its backstop.
        Both = "both",
    }
);

choice!(
    /// How a member decides it is time to stop spreading an update.
    Removal, "removal", {
        /// The receiver says which pushed updates it already had.
        Feedback = "feedback",
        /// The sender decides alone, after each push.
        Blind = "blind",
    }
);

choice!(
    /// How interest is lost.
    Loss, "loss", {
        /// After `rounds` unnecessary contacts (feedback) or pushes (blind).
        Counter = "counter",
        /// With probability `1 / rounds` at each unnecessary contact (feedback) or push (blind).
        Coin = "coin",
    }
);

choice!(
    /// Which way an exchange goes.
    Direction, "direction", {
        /// The initiator sends what the partner lacks.
        Push = "push",
        /// The partner sends what the initiator lacks.
        Pull = "pull",
        /// Both.
        PushPull = "push-pull",
    }
);

/// Replication settings of one overlay. Grapevine's names are given as
/// aliases in the configuration file: `delta` = `interval`, `level` =
/// `fanout`, `rounds` = k.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    /// Rumor mongering, anti-entropy or both.
    pub mode: Mode,
    /// Time between two rumor-mongering rounds (Grapevine's `delta`); the
    /// first round after a member gets something new to spread runs at once.
    pub interval: Duration,
    /// Members pushed to per round; 0 = all (Grapevine's `level`).
    pub fanout: usize,
    /// k: unnecessary contacts (counter) or 1/probability (coin) before an
    /// update is removed (Grapevine's `rounds`).
    pub rounds: u32,
    /// Feedback or blind removal.
    pub removal: Removal,
    /// Counter or coin loss of interest.
    pub loss: Loss,
    /// Time between two anti-entropy exchanges.
    pub anti_entropy_interval: Duration,
    /// Partners per anti-entropy exchange; 0 = all.
    pub anti_entropy_fanout: usize,
    /// Push, pull or push-pull anti-entropy.
    pub anti_entropy_direction: Direction,
    /// How often removed updates are garbage-collected.
    pub gc_interval: Duration,
    /// How long a removed update's rumor state is kept (Grapevine's `ttl`).
    /// Forgetting it never lets a late copy count as new: the per-origin
    /// summaries remember what was seen.
    pub removed_ttl: Duration,
    /// How long a delete is kept. A member that missed a delete for longer
    /// than this, and then syncs only with members that forgot it, keeps the
    /// old value.
    pub tombstone_ttl: Duration,
    /// Largest chunk of updates in one stream frame.
    pub max_chunk: usize,
    /// What one writer may make every member store, checked on receipt
    /// and for local writes ([`Store::check`]). Must be the same on every
    /// member. [`crate::Overlay::new`] takes the luggage limits from
    /// [`crate::Config`].
    pub limits: Limits,
}

impl Default for ReplicationConfig {
    /// Rumor mongering every 200 ms to 3 members, feedback/counter with
    /// k = 3, plus a push-pull anti-entropy exchange with one member every
    /// 10 s as a backstop. On the simulated LAN this informs 99.2–99.5 % of
    /// 1,000 to 100,000 members by rumor within about 200 ms, and every
    /// member by the next exchanges (docs/benchmarks.md).
    fn default() -> Self {
        ReplicationConfig {
            mode: Mode::Both,
            interval: Duration::from_millis(200),
            fanout: 3,
            rounds: 3,
            removal: Removal::Feedback,
            loss: Loss::Counter,
            anti_entropy_interval: Duration::from_secs(10),
            anti_entropy_fanout: 1,
            anti_entropy_direction: Direction::PushPull,
            gc_interval: Duration::from_secs(1),
            removed_ttl: Duration::from_secs(30),
            tombstone_ttl: Duration::from_secs(24 * 3600),
            max_chunk: 64 << 10,
            limits: Limits::default(),
        }
    }
}

impl ReplicationConfig {
    /// Checks that the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.rounds == 0 {
            return Err("rounds (k) must be at least 1".into());
        }
        if self.interval.is_zero() || self.anti_entropy_interval.is_zero() || self.gc_interval.is_zero() {
            return Err("interval, anti_entropy_interval and gc_interval must be above zero".into());
        }
        if self.max_chunk < 1024 {
            return Err(format!(
                "max_chunk {} is too small: at least 1024 bytes",
                self.max_chunk
            ));
        }
        Ok(())
    }

    fn rumors(&self) -> bool {
        self.mode != Mode::AntiEntropy
    }

    fn exchanges(&self) -> bool {
        self.mode != Mode::Rumor
    }
}

/// Where a message goes and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The destination.
    pub to: SocketAddr,
    /// The message.
    pub envelope: Envelope,
    /// Whether it must go over a stream (too big for a datagram).
    pub stream: bool,
}

/// Counters of the replication protocols.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationStats {
    /// Update copies sent (in rumors and deltas).
    pub updates_sent: u64,
    /// Update copies received.
    pub updates_received: u64,
    /// Received updates that were news.
    pub fresh: u64,
    /// Received updates already seen.
    pub redundant: u64,
    /// Rumor rounds run with something to push.
    pub rumor_rounds: u64,
    /// Anti-entropy exchanges started.
    pub exchanges: u64,
    /// Received writes of another member's reserved data, refused.
    pub forged: u64,
    /// Exchanges whose answer arrived in full (the store is then at least
    /// as complete as the partner's was).
    pub syncs: u64,
    /// Updates that went from infected to removed.
    pub removed: u64,
    /// Received updates refused because they would take their writer
    /// beyond its quota, or the whole store beyond its limit (bytes or
    /// entries): not stored, not spread, not
    /// counted as seen (they may come again when there is room).
    pub quota_refused: u64,
    /// Received luggage updates refused for the luggage limits (value,
    /// total per member, key).
    pub luggage_refused: u64,
}

/// An accepted update, for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateNotification {
    /// The update (a `None` value is a delete).
    pub update: Update,
}

/// The replication state machine of one member.
pub struct Replication {
    pub(crate) config: ReplicationConfig,
    pub(crate) me: Arc<str>,
    /// This life's boot epoch: writes are counted anew in each.
    epoch: u64,
    /// Where this member receives datagrams: the `reply_to` of messages
    /// that go over streams.
    addr: SocketAddr,
    pub(crate) clock: u64,
    next_seq: u64,
    pub(crate) store: Store,
    pub(crate) infected: BTreeMap<rumor::RumorKey, u32>,
    pub(crate) removed: BTreeMap<rumor::RumorKey, Stamp>,
    handler: Box<dyn UpdateHandler>,
    pub(crate) rng: ChaCha8Rng,
    origin: Instant,
    pub(crate) budget: usize,
    pub(crate) next_rumor: Instant,
    next_exchange: Instant,
    next_gc: Instant,
    pub(crate) outbox: VecDeque<Outgoing>,
    pub(crate) reassembly: anti_entropy::Reassembly,
    pub(crate) events: VecDeque<UpdateNotification>,
    pub(crate) stats: ReplicationStats,
}

impl fmt::Debug for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replication")
            .field("me", &self.me)
            .field("keys", &self.store.len())
            .field("infected", &self.infected.len())
            .finish_non_exhaustive()
    }
}

impl Replication {
    /// A member named `me` in its life `epoch` (see
    /// [`crate::Identity::epoch`]), reached at `addr`, whose datagrams carry
    /// at most `budget` bytes of messages.
    ///
    /// ```
    /// use std::time::Instant;
    /// use rumormill_core::replication::{Replication, ReplicationConfig};
    /// let now = Instant::now();
    /// let addr = "127.0.0.1:7000".parse().unwrap();
    /// let mut d = Replication::new(ReplicationConfig::default(), "a", 1, addr, 1300, 7, now);
    /// d.put(now, "colour", b"blue".to_vec());
    /// assert_eq!(d.store().value("colour"), Some(&b"blue"[..]));
    /// ```
    pub fn new(
        config: ReplicationConfig,
        me: &str,
        epoch: u64,
        addr: SocketAddr,
        budget: usize,
        seed: u64,
        now: Instant,
    ) -> Replication {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let phase = |d: Duration, rng: &mut ChaCha8Rng| now + d.mul_f64(rand::Rng::random::<f64>(rng));
        Replication {
            next_rumor: phase(config.interval, &mut rng),
            next_exchange: phase(config.anti_entropy_interval, &mut rng),
            next_gc: now + config.gc_interval,
            config,
            me: me.into(),
            epoch,
            addr,
            clock: 0,
            next_seq: 0,
            store: Store::default(),
            infected: BTreeMap::new(),
            removed: BTreeMap::new(),
            handler: Box::new(AcceptAll),
            rng,
            origin: now,
            budget,
            outbox: VecDeque::new(),
            reassembly: anti_entropy::Reassembly::default(),
            events: VecDeque::new(),
            stats: ReplicationStats::default(),
        }
    }

    /// Replaces the handler that filters incoming updates.
    pub fn set_handler(&mut self, handler: impl UpdateHandler + 'static) {
        self.handler = Box::new(handler);
    }

    /// Raises the Lamport clock to at least `floor`. The [`crate::Overlay`]
    /// floors it with the caller's wall clock before each write (a hybrid
    /// logical clock); a standalone `Replication` (the simulator's
    /// broadcast experiment) keeps a plain Lamport clock.
    pub(crate) fn advance_clock(&mut self, floor: u64) {
        self.clock = self.clock.max(floor);
    }

    /// Writes a value; it spreads to every member. The writer's quota is
    /// not checked (see [`Replication::try_put`]): members that check it
    /// on receipt may refuse the write.
    pub fn put(&mut self, now: Instant, key: &str, value: Vec<u8>) -> Update {
        self.write(now, key, Some(value), false)
            .unwrap_or_else(|_| unreachable!("unchecked writes are not refused"))
    }

    /// Deletes a key; the delete spreads like a value. Unchecked, as
    /// [`Replication::put`].
    pub fn delete(&mut self, now: Instant, key: &str) -> Update {
        self.write(now, key, None, false)
            .unwrap_or_else(|_| unreachable!("unchecked writes are not refused"))
    }

    /// Writes a value if it keeps this member within its quota
    /// ([`ReplicationConfig::limits`]); otherwise nothing is written.
    pub fn try_put(&mut self, now: Instant, key: &str, value: Vec<u8>) -> Result<Update, QuotaExceeded> {
        self.write(now, key, Some(value), true)
    }

    /// Deletes a key if the delete keeps this member within its quota (a
    /// delete of another member's key takes one entry of its own).
    pub fn try_delete(&mut self, now: Instant, key: &str) -> Result<Update, QuotaExceeded> {
        self.write(now, key, None, true)
    }

    fn write(&mut self, now: Instant, key: &str, value: Option<Vec<u8>>, check: bool) -> Result<Update, QuotaExceeded> {
        let mut clock = self.clock.saturating_add(1);
        // Beat whatever is stored, even if written by a member with a faster clock.
        if let Some(cur) = self.store.get(key) {
            clock = clock.max(cur.lamport.saturating_add(1));
        }
        let u = Update {
            key: key.to_owned(),
            value,
            lamport: clock,
            origin: self.me.clone(),
            epoch: self.epoch,
            seq: self.next_seq.saturating_add(1),
        };
        // A refused write takes no sequence number: receivers must see no gap.
        if check {
            self.store.check(&u, &self.config.limits)?;
        }
        self.clock = clock;
        self.next_seq = u.seq;
        let stamp = self.stamp(now);
        self.store.apply(u.clone(), stamp);
        self.infect(now, &u);
        Ok(u)
    }

    /// The replicated data.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> ReplicationStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    /// Handles a replication message from `from`. Returns `false`, and
    /// does nothing, for a message of another protocol: the caller counts
    /// it as malformed, since it should not have been handed here.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, body: Body) -> bool {
        match body {
            Body::Rumor(r) => self.on_rumor(now, from, r),
            Body::RumorFeedback(f) => self.on_feedback(now, f),
            Body::Digest(d) => self.on_digest(from, d),
            Body::Delta(d) => self.on_delta(now, d),
            Body::Ping(_)
            | Body::Ack(_)
            | Body::PingReq(_)
            | Body::Nack(_)
            | Body::Alive(_)
            | Body::Suspect(_)
            | Body::Dead(_)
            | Body::PushPull(_)
            | Body::Event(_)
            | Body::EventAck(_)
            | Body::Raft(_)
            | Body::Crossing(_) => return false,
        }
        true
    }

    /// Runs due rounds. `peers(k)` returns up to `k` random live members
    /// (all of them when `k` is 0).
    pub fn handle_timeout(&mut self, now: Instant, peers: &mut dyn FnMut(usize) -> Vec<SocketAddr>) {
        if self.next_rumor <= now {
            // Keep the phase across idle periods.
            self.next_rumor = crate::overlay::next_tick(self.next_rumor, self.config.interval, now);
            if self.config.rumors() {
                let targets = peers(self.config.fanout);
                self.rumor_round(now, targets);
            }
        }
        if self.next_exchange <= now {
            self.next_exchange = now + self.config.anti_entropy_interval;
            if self.config.exchanges() {
                for to in peers(self.config.anti_entropy_fanout) {
                    self.start_check(to);
                }
            }
        }
        if self.next_gc <= now {
            self.next_gc = now + self.config.gc_interval;
            self.collect_garbage(now);
        }
    }

    /// When [`Replication::handle_timeout`] is due. Idle timers (nothing
    /// to spread, nothing to collect) keep their phase but do not wake.
    pub fn poll_timeout(&self) -> Instant {
        let far = self.next_gc + Duration::from_secs(24 * 3600);
        let rumor = if self.config.rumors() && !self.infected.is_empty() {
            self.next_rumor
        } else {
            far
        };
        let exchange = if self.config.exchanges() {
            self.next_exchange
        } else {
            far
        };
        let gc = if self.removed.is_empty() && self.store.tombstones() == 0 {
            far
        } else {
            self.next_gc
        };
        rumor.min(exchange).min(gc)
    }

    /// The next message to send.
    pub fn poll_message(&mut self) -> Option<Outgoing> {
        self.outbox.pop_front()
    }

    /// The next accepted update.
    pub fn poll_notification(&mut self) -> Option<UpdateNotification> {
        self.events.pop_front()
    }

    pub(crate) fn stamp(&self, now: Instant) -> Stamp {
        now.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Runs the handler over updates that are news and applies its
    /// decision; returns the accepted ones, or `None` if it said ignore.
    /// Updates that would take their writer beyond its limits are refused
    /// (counted, not stored, not returned, not marked seen) and their ids
    /// pushed onto `refused`.
    pub(crate) fn accept(
        &mut self,
        now: Instant,
        batch: Vec<Update>,
        refused: &mut Vec<rumor::RumorKey>,
    ) -> Option<Vec<Update>> {
        if batch.is_empty() {
            return Some(batch);
        }
        let stamp = self.stamp(now);
        // A member's own data, written by someone else: seen, never stored.
        let (batch, forged): (Vec<Update>, Vec<Update>) = batch.into_iter().partition(crate::reserved::from_owner);
        for u in &forged {
            self.store.mark_seen(&u.origin, u.epoch, u.seq);
            self.stats.forged += 1;
        }
        let accepted = match self.handler.push(&batch, &self.store) {
            Decision::Ignore => return None,
            Decision::AcceptAll => batch,
            Decision::AcceptSubset(keep) => {
                let keep: std::collections::BTreeSet<usize> = keep.into_iter().collect();
                batch
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| keep.contains(i))
                    .map(|(_, u)| u)
                    .collect()
            }
            Decision::Replace(all) => {
                for u in &batch {
                    self.store.mark_seen(&u.origin, u.epoch, u.seq);
                }
                for e in self.store.replace(all, stamp, &self.config.limits) {
                    self.count_refusal(&e);
                }
                return Some(Vec::new());
            }
        };
        let mut stored = Vec::with_capacity(accepted.len());
        for u in accepted {
            if let Err(e) = self.store.check(&u, &self.config.limits) {
                self.count_refusal(&e);
                self.store.refuse(&u);
                refused.push((u.origin.clone(), u.epoch, u.seq));
                continue;
            }
            self.clock = self.clock.max(u.lamport);
            if self.store.apply(u.clone(), stamp) {
                self.events.push_back(UpdateNotification { update: u.clone() });
            }
            stored.push(u);
        }
        Some(stored)
    }

    fn count_refusal(&mut self, e: &QuotaExceeded) {
        match e {
            QuotaExceeded::Bytes { .. }
            | QuotaExceeded::Entries { .. }
            | QuotaExceeded::StoreBytes { .. }
            | QuotaExceeded::StoreEntries { .. } => self.stats.quota_refused += 1,
            _ => self.stats.luggage_refused += 1,
        }
    }

    /// Forgets removed rumor state and expired tombstones.
    fn collect_garbage(&mut self, now: Instant) {
        let t = self.stamp(now);
        let ttl = self.config.removed_ttl.as_millis() as u64;
        self.removed.retain(|_, at| t.saturating_sub(*at) < ttl);
        self.store
            .forget_tombstones(t, self.config.tombstone_ttl.as_millis() as u64);
    }

    /// Pushes one update to `to` at once, outside the rounds (a rack
    /// member's own write to its gateway): the rounds spread it as usual.
    pub(crate) fn push(&mut self, to: SocketAddr, u: &Update) {
        self.stats.updates_sent += 1;
        self.send(
            to,
            Body::Rumor(rumormill_wire::proto::Rumor {
                updates: vec![u.to_wire()],
                want_feedback: false,
                reply_to: None,
            }),
        );
    }

    /// Queues a message; one too big for a datagram goes over a stream and,
    /// if it expects an answer, says where to send it.
    pub(crate) fn send(&mut self, to: SocketAddr, body: Body) {
        let mut envelope = Envelope { body: Some(body) };
        let stream = rumormill_wire::envelope_len(&envelope) > self.budget;
        if stream {
            match &mut envelope.body {
                Some(Body::Rumor(r)) => r.reply_to = Some(self.addr.into()),
                Some(Body::Digest(d)) => d.reply_to = Some(self.addr.into()),
                _ => {}
            }
        }
        self.outbox.push_back(Outgoing { to, envelope, stream });
    }

    /// Where to answer a message from `from` that may name a `reply_to`.
    pub(crate) fn reply_address(from: SocketAddr, reply_to: Option<&rumormill_wire::proto::Address>) -> SocketAddr {
        reply_to
            .and_then(|a| rumormill_wire::socket_addr(Some(a)).ok())
            .unwrap_or(from)
    }
}
