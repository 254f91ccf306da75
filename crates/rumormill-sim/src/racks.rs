//! The racks experiment: members placed in racks over a topology (a LAN
//! inside each rack, long links between them), a steady workload of writes
//! and at-least-once events, a gateway killed half-way, and what crossed
//! between racks — against the very same members and workload in one flat
//! overlay, same seed.
//!
//! Workload (identical in both runs, from [`RacksParams::seed`]):
//! - warm-up of [`RacksParams::warmup_s`]: [`Layout::subscribers`] subscribe
//!   to [`TOPIC`] at 1 s; only odd racks hold subscribers, so even racks
//!   other than the publisher's never need the events' payload;
//! - then until [`RacksParams::drain_s`] before the end: writes of 16 bytes
//!   at [`RacksParams::writes_per_s`] from random running members, and
//!   at-least-once events of [`EVENT_PAYLOAD`] bytes at
//!   [`RacksParams::events_per_s`] from [`Layout::publisher`] (rack 0);
//! - with [`RacksParams::kill_gateway`], half-way through the workload, the
//!   active gateway of rack 1 (the first candidate of rack 1 in the flat
//!   run, which has no gateways) crashes;
//! - the drain lets resends and anti-entropy finish.
//!
//! The racked run needs the core's racks; [`racked_simulation`] builds it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_core::events::Delivery;
use rumormill_core::racks::RackSpec;
use rumormill_core::{Config, MemberChange, MemberInfo, Notification, Overlay};
use serde::Serialize;

use crate::engine::{Nanos, Simulation, member_addr, member_name, secs};
use crate::network::{Link, NetworkModel};

/// The topic of the experiment's events.
pub const TOPIC: &str = "orders";

/// Bytes of payload per event.
pub const EVENT_PAYLOAD: usize = 200;

/// Interval between two samples of the run: the resolution of
/// [`RunMeasures::gateway_failover_s`].
const STEP: Nanos = 50_000_000;

/// Parameters of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct RacksParams {
    /// Racks (at least 2).
    pub racks: usize,
    /// Members in each rack.
    pub members_per_rack: usize,
    /// Gateway candidates per rack: its first members.
    pub candidates: usize,
    /// Subscribers of [`TOPIC`] in each odd rack.
    pub subscribers_per_rack: usize,
    /// Mean one-way latency between two racks, milliseconds (the floor is
    /// 90 % of it); inside a rack the LAN's 0.1 ms floor, 0.5 ms mean.
    pub cross_latency_ms: f64,
    /// Datagram loss probability, inside and between racks.
    pub loss: f64,
    /// Crash rack 1's active gateway half-way through the workload.
    pub kill_gateway: bool,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Seconds before the workload starts.
    pub warmup_s: f64,
    /// Seconds at the end without new writes or events.
    pub drain_s: f64,
    /// Writes per second, from random members.
    pub writes_per_s: f64,
    /// At-least-once events per second, from the publisher.
    pub events_per_s: f64,
    /// Seed of both runs.
    pub seed: u64,
    /// Protocol configuration.
    pub config: Config,
}

impl Default for RacksParams {
    fn default() -> Self {
        RacksParams {
            racks: 3,
            members_per_rack: 100,
            candidates: 3,
            subscribers_per_rack: 3,
            cross_latency_ms: 80.0,
            loss: 0.01,
            kill_gateway: true,
            duration_s: 120.0,
            warmup_s: 10.0,
            drain_s: 15.0,
            writes_per_s: 1.0,
            events_per_s: 5.0,
            seed: 1,
            config: Config::new_lan(),
        }
    }
}

/// Parameters that describe no meaningful experiment.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RacksParamError {
    /// Fewer than two racks: nothing crosses.
    #[error("racks must be at least 2, got {0}")]
    TooFewRacks(usize),
    /// A rack cannot hold its candidates, subscribers and publisher.
    #[error("members per rack must be at least candidates + subscribers per rack + 1 = {need}, got {got}")]
    RackTooSmall {
        /// Members needed.
        need: usize,
        /// Members given.
        got: usize,
    },
    /// No gateway candidate.
    #[error("candidates must be at least 1")]
    NoCandidates,
    /// A loss probability outside [0, 1).
    #[error("loss must be in [0, 1), got {0}")]
    Loss(f64),
    /// A latency, duration or rate that is not a positive number, or a
    /// warm-up and drain that leave no workload.
    #[error("{0}")]
    Timing(String),
}

impl RacksParams {
    /// Checks that the parameters describe a run.
    ///
    /// ```
    /// let mut p = rumormill_sim::racks::RacksParams::default();
    /// assert!(p.validate().is_ok());
    /// p.members_per_rack = 4;
    /// assert!(p.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), RacksParamError> {
        if self.racks < 2 {
            return Err(RacksParamError::TooFewRacks(self.racks));
        }
        if self.candidates == 0 {
            return Err(RacksParamError::NoCandidates);
        }
        let need = self.candidates + self.subscribers_per_rack + 1;
        if self.members_per_rack < need {
            return Err(RacksParamError::RackTooSmall {
                need,
                got: self.members_per_rack,
            });
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(RacksParamError::Loss(self.loss));
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        for (name, v) in [
            ("cross latency", self.cross_latency_ms),
            ("duration", self.duration_s),
            ("write rate", self.writes_per_s),
            ("event rate", self.events_per_s),
        ] {
            if !positive(v) {
                return Err(RacksParamError::Timing(format!("{name} must be positive, got {v}")));
            }
        }
        if !(self.warmup_s >= 1.0 && self.drain_s >= 0.0 && self.warmup_s + self.drain_s < self.duration_s) {
            return Err(RacksParamError::Timing(format!(
                "warm-up ({} s, at least 1) and drain ({} s) leave no workload in {} s",
                self.warmup_s, self.drain_s, self.duration_s
            )));
        }
        Ok(())
    }

    /// The members: racks × members per rack.
    pub fn members(&self) -> usize {
        self.racks * self.members_per_rack
    }

    /// The modelled network: racks of consecutive members, the LAN inside,
    /// [`RacksParams::cross_latency_ms`] between any two.
    pub fn network(&self) -> NetworkModel {
        let mean = self.cross_latency_ms / 1e3;
        NetworkModel::lan(self.loss).with_even_racks(
            self.racks,
            self.members_per_rack,
            Link::new(self.loss, 0.9 * mean, mean),
        )
    }

    /// Who does what in the experiment.
    pub fn layout(&self) -> Layout {
        let per = self.members_per_rack;
        let candidates = (0..self.racks)
            .flat_map(|r| (0..self.candidates).map(move |k| r * per + k))
            .collect();
        let subscribed_racks: Vec<usize> = (0..self.racks).filter(|r| r % 2 == 1).collect();
        let subscribers = subscribed_racks
            .iter()
            .flat_map(|r| (0..self.subscribers_per_rack).map(move |k| r * per + self.candidates + k))
            .collect();
        Layout {
            racks: self.racks,
            members_per_rack: per,
            candidates,
            subscribers,
            publisher: self.candidates,
            subscribed_racks,
        }
    }

    fn kill_at(&self) -> Nanos {
        secs(self.warmup_s + (self.duration_s - self.drain_s - self.warmup_s) / 2.0)
    }
}

/// Who does what: members `r · members_per_rack ..` form rack `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Racks.
    pub racks: usize,
    /// Members in each rack.
    pub members_per_rack: usize,
    /// Gateway candidates: the first members of each rack.
    pub candidates: Vec<usize>,
    /// Subscribers of [`TOPIC`]: members right after the candidates, in
    /// the odd racks only.
    pub subscribers: Vec<usize>,
    /// The member that publishes the events: rack 0's first member that is
    /// not a candidate.
    pub publisher: usize,
    /// The racks that hold subscribers.
    pub subscribed_racks: Vec<usize>,
}

impl Layout {
    /// The rack of member `i`.
    pub fn rack(&self, i: usize) -> usize {
        i / self.members_per_rack.max(1)
    }

    /// The name of rack `r`.
    pub fn rack_name(r: usize) -> String {
        format!("rack-{r}")
    }

    /// Whether member `i` is a gateway candidate.
    pub fn is_candidate(&self, i: usize) -> bool {
        i % self.members_per_rack.max(1) < self.candidates.len() / self.racks.max(1)
    }

    /// The members of rack `r`.
    pub fn members_of(&self, r: usize) -> std::ops::Range<usize> {
        r * self.members_per_rack..(r + 1) * self.members_per_rack
    }
}

/// A racked overlay ready to run: built, bootstrapped, and the rule telling
/// a rack's active gateway.
pub struct RackedRun {
    /// The simulation, at time zero, members in contact.
    pub sim: Simulation,
    /// Whether a member is its rack's active gateway now.
    pub is_active_gateway: fn(&Overlay) -> bool,
}

/// The racked overlay of `p`: every member of rack `r` placed in the rack
/// named [`Layout::rack_name`], [`Layout::candidates`] as its gateway
/// candidates (each knowing the other racks' candidates as remote seeds),
/// over [`RacksParams::network`] with seed `p.seed`; each member starts
/// knowing the members of its own rack (a warm start, like
/// [`Simulation::bootstrap`] within each rack).
pub fn racked_simulation(p: &RacksParams, layout: &Layout) -> Option<RackedRun> {
    let n = p.members();
    let mut sim = Simulation::new(n, p.config.clone(), p.network(), p.seed);
    for i in 0..n {
        let r = layout.rack(i);
        // Rack names are ours and valid ("rack-<r>").
        let mut spec = RackSpec::new(&Layout::rack_name(r)).ok()?;
        if layout.is_candidate(i) {
            let seeds = layout
                .candidates
                .iter()
                .filter(|&&c| layout.rack(c) != r)
                .map(|&c| member_addr(c, 1))
                .collect();
            spec = spec.candidate(p.candidates).with_remote_seeds(seeds);
        }
        sim.set_rack(i, spec);
        sim.start_again(i);
    }
    for r in 0..layout.racks {
        let members: Vec<MemberInfo> = layout
            .members_of(r)
            .filter_map(|i| sim.node(i).map(Overlay::local))
            .collect();
        let seed = member_addr(layout.members_of(r).start, 1);
        for i in layout.members_of(r) {
            sim.with_node(i, |o, now| {
                o.restore(now, members.iter().cloned());
                o.set_seeds(vec![seed]);
            });
        }
    }
    Some(RackedRun {
        sim,
        is_active_gateway: Overlay::is_active_gateway,
    })
}

/// The same members as one flat overlay, same network, same seed.
pub fn flat_simulation(p: &RacksParams) -> Simulation {
    let mut sim = Simulation::new(p.members(), p.config.clone(), p.network(), p.seed);
    sim.bootstrap();
    sim
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunMeasures {
    /// Packets from a member of one rack to a member of another, over the
    /// whole run.
    pub cross_rack_packets: u64,
    /// Those sent by a member that was not its rack's active gateway
    /// (racked run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_rack_packets_from_non_gateways: Option<u64>,
    /// Cross-rack bytes per second from the end of the warm-up to the end.
    pub cross_rack_bytes_per_s: f64,
    /// Writes made.
    pub writes: usize,
    /// Writes that had not reached every running member by the end.
    pub writes_incomplete: usize,
    /// Median over writes of the time until every running member of every
    /// rack had it, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_all_p50_ms: Option<f64>,
    /// 99th percentile of that time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_all_p99_ms: Option<f64>,
    /// Median over events and subscribers outside the publisher's rack of
    /// the time from publishing to delivery, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_remote_p50_ms: Option<f64>,
    /// 99th percentile of that time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_remote_p99_ms: Option<f64>,
    /// The member killed, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed: Option<String>,
    /// Time from the kill of rack 1's gateway until another member of rack
    /// 1 sent across racks (racked run only), seconds, at 50 ms resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_failover_s: Option<f64>,
    /// At-least-once events published.
    pub events_published: usize,
    /// Events some subscriber never got, among subscribers running all
    /// along.
    pub events_lost: usize,
    /// Event payload bytes received by members of racks that have no
    /// subscriber and are not the publisher's.
    pub payload_bytes_to_racks_without_subscribers: u64,
    /// Members never killed that someone declared failed.
    pub false_positives: usize,
    /// Whether at the end every running member saw exactly the running
    /// members of its scope (its rack when racked, everyone when flat) as
    /// live, and every write had reached every running member.
    pub converged: bool,
    /// Cross-rack bytes per second, second by second from time zero.
    pub cross_rack_timeline: Vec<f64>,
}

/// What [`run`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RacksReport {
    /// Racks.
    pub racks: usize,
    /// Members in each rack.
    pub members_per_rack: usize,
    /// Gateway candidates per rack.
    pub candidates: usize,
    /// Mean one-way latency between racks, milliseconds.
    pub cross_latency_ms: f64,
    /// Datagram loss probability.
    pub loss: f64,
    /// Whether a gateway was killed.
    pub kill_gateway: bool,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Seed.
    pub seed: u64,
    /// Second at which the gateway was killed.
    pub kill_at_s: Option<f64>,
    /// The racked run; absent while the core has no racks.
    #[serde(flatten)]
    pub racked: Option<RunMeasures>,
    /// The flat run's cross-rack bytes per second.
    pub flat_cross_rack_bytes_per_s: f64,
    /// Everything the flat run measured.
    pub flat: RunMeasures,
}

/// Runs the experiment: the flat overlay, then the racked one if the core
/// has racks.
///
/// ```
/// use rumormill_sim::racks::{run, RacksParams};
/// let p = RacksParams { racks: 2, members_per_rack: 8, duration_s: 20.0, drain_s: 5.0, ..Default::default() };
/// let r = run(&p).expect("valid parameters");
/// assert!(r.flat.cross_rack_packets > 0);
/// assert_eq!(r.flat.events_lost, 0);
/// ```
pub fn run(p: &RacksParams) -> Result<RacksReport, RacksParamError> {
    p.validate()?;
    let layout = p.layout();
    let flat = measure(flat_simulation(p), None, p, &layout);
    let racked = racked_simulation(p, &layout).map(|r| measure(r.sim, Some(r.is_active_gateway), p, &layout));
    Ok(RacksReport {
        racks: p.racks,
        members_per_rack: p.members_per_rack,
        candidates: p.candidates,
        cross_latency_ms: p.cross_latency_ms,
        loss: p.loss,
        kill_gateway: p.kill_gateway,
        duration_s: p.duration_s,
        seed: p.seed,
        kill_at_s: p.kill_gateway.then(|| p.kill_at() as f64 / 1e9),
        racked,
        flat_cross_rack_bytes_per_s: flat.cross_rack_bytes_per_s,
        flat,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Subscribe(usize),
    Kill,
    Write,
    Publish,
    Sample,
}

/// Drives the workload over `sim` and measures it. `gateway` tells an
/// active gateway in the racked run.
pub fn measure(
    mut sim: Simulation,
    gateway: Option<fn(&Overlay) -> bool>,
    p: &RacksParams,
    layout: &Layout,
) -> RunMeasures {
    if let Some(rule) = gateway {
        sim.judge_gateways_by(rule);
    }
    let n = sim.len();
    let end = secs(p.duration_s);
    let warm = secs(p.warmup_s);
    let stop = end - secs(p.drain_s);
    let mut plan: Vec<(Nanos, Step)> = layout
        .subscribers
        .iter()
        .map(|&i| (secs(1.0), Step::Subscribe(i)))
        .collect();
    let every = |rate: f64| (1e9 / rate) as Nanos;
    plan.extend(
        (warm..stop)
            .step_by(every(p.writes_per_s) as usize)
            .map(|t| (t, Step::Write)),
    );
    plan.extend(
        (warm..stop)
            .step_by(every(p.events_per_s) as usize)
            .map(|t| (t, Step::Publish)),
    );
    plan.extend((STEP..=end).step_by(STEP as usize).map(|t| (t, Step::Sample)));
    if p.kill_gateway {
        plan.push((p.kill_at(), Step::Kill));
    }
    plan.sort_unstable();

    let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0x7ac5);
    let mut writes: Vec<(Nanos, usize, String)> = Vec::new();
    let mut published: BTreeMap<u64, Nanos> = BTreeMap::new();
    let mut victim: Option<(usize, Nanos)> = None;
    let mut victim_payload = 0u64;
    let mut failover: Option<Nanos> = None;
    let mut cross_before: Vec<u64> = Vec::new();
    let mut timeline = Vec::new();
    let mut last_second_bytes = 0u64;
    let mut bytes_at_warm = None;
    let alo = Delivery::AtLeastOnce {
        retry_every: Duration::from_secs(1),
        retry_max: 0,
    };
    let mut seen = Seen::default();
    for (at, step) in plan {
        sim.run_until(at);
        if at >= warm && bytes_at_warm.is_none() {
            bytes_at_warm = Some(sim.traffic().cross_rack_bytes);
        }
        match step {
            Step::Subscribe(i) => {
                let wall = sim.wall();
                let _ = sim.with_node(i, |o, now| o.subscribe(now, wall, TOPIC));
            }
            Step::Write => {
                // The first running member from a random start.
                let start = rng.random_range(0..n);
                let Some(w) = (0..n).map(|k| (start + k) % n).find(|&i| sim.is_running(i)) else {
                    continue;
                };
                let key = format!("w/{}", writes.len());
                let wall = sim.wall();
                if let Some(Ok(_)) = sim.with_node(w, |o, now| o.put(now, wall, &key, vec![0x17; 16])) {
                    writes.push((at, w, key));
                }
            }
            Step::Publish => {
                let payload = vec![0xe5; EVENT_PAYLOAD];
                if let Some(Ok(id)) = sim.with_node(layout.publisher, |o, now| o.publish(now, TOPIC, payload, alo)) {
                    published.insert(id.seq, at);
                }
            }
            Step::Kill => {
                let rack1 = layout.members_of(1);
                let active = gateway.and_then(|rule| rack1.clone().find(|&i| sim.node(i).is_some_and(rule)));
                let v = active.unwrap_or(rack1.start);
                victim_payload = sim.node(v).map_or(0, |o| o.stats().event_payload_bytes_received);
                cross_before = rack1.map(|i| sim.cross_rack_packets_sent_by(i)).collect();
                sim.kill(v);
                victim = Some((v, at));
            }
            Step::Sample => {
                if at % secs(1.0) == 0 {
                    // Kept as they come, notifications would hold every
                    // value written (gateway reports too) once per member.
                    seen.absorb(sim.take_events(), layout);
                    let b = sim.traffic().cross_rack_bytes;
                    timeline.push((b - last_second_bytes) as f64);
                    last_second_bytes = b;
                }
                if let (Some(_), Some((v, killed_at)), None) = (gateway, victim, failover) {
                    let successor = layout
                        .members_of(1)
                        .zip(&cross_before)
                        .any(|(i, &before)| i != v && sim.cross_rack_packets_sent_by(i) > before);
                    if successor {
                        failover = Some(at - killed_at);
                    }
                }
            }
        }
    }
    sim.run_until(end);
    let traffic = sim.traffic();
    let killed = victim.map(|(v, _)| v);
    let running_all_along = |i: usize| Some(i) != killed;

    seen.absorb(sim.take_events(), layout);
    let Seen { got, delivered, failed } = seen;
    let running: Vec<usize> = (0..n).filter(|&i| sim.is_running(i)).collect();
    let mut update_all: Vec<f64> = Vec::new();
    let mut writes_incomplete = 0;
    for (at, w, key) in &writes {
        let seen = got.get(key);
        let last = running
            .iter()
            .filter(|&&i| i != *w)
            .map(|i| seen.and_then(|s| s.get(i)).copied())
            .try_fold(*at, |acc, t| t.map(|t| acc.max(t)));
        match last {
            Some(t) => update_all.push((t - at) as f64 / 1e6),
            None => writes_incomplete += 1,
        }
    }
    let mut remote: Vec<f64> = Vec::new();
    let mut lost: BTreeSet<u64> = BTreeSet::new();
    for &s in layout.subscribers.iter().filter(|&&s| running_all_along(s)) {
        let mine = delivered.get(&s);
        for (&seq, &at) in &published {
            match mine.and_then(|m| m.get(&seq)) {
                Some(&t) if layout.rack(s) != layout.rack(layout.publisher) => remote.push((t - at) as f64 / 1e6),
                Some(_) => {}
                None => {
                    lost.insert(seq);
                }
            }
        }
    }
    let quiet_racks: Vec<usize> = (0..layout.racks)
        .filter(|r| !layout.subscribed_racks.contains(r) && *r != layout.rack(layout.publisher))
        .collect();
    let mut payload_quiet: u64 = quiet_racks
        .iter()
        .flat_map(|&r| layout.members_of(r))
        .filter_map(|i| sim.node(i).map(|o| o.stats().event_payload_bytes_received))
        .sum();
    if killed.is_some_and(|v| quiet_racks.contains(&layout.rack(v))) {
        payload_quiet += victim_payload;
    }
    let false_positives = (0..n)
        .filter(|&i| running_all_along(i) && failed.contains(member_name(i).as_str()))
        .count();
    let scopes: Vec<Vec<usize>> = if gateway.is_some() {
        (0..layout.racks).map(|r| layout.members_of(r).collect()).collect()
    } else {
        vec![(0..n).collect()]
    };
    let views = scopes.iter().all(|scope| views_agree_among(&sim, scope));
    let workload_s = (end - warm) as f64 / 1e9;
    RunMeasures {
        cross_rack_packets: traffic.cross_rack_packets,
        cross_rack_packets_from_non_gateways: gateway.map(|_| traffic.cross_rack_packets_from_non_gateways),
        cross_rack_bytes_per_s: (traffic.cross_rack_bytes - bytes_at_warm.unwrap_or(0)) as f64 / workload_s,
        writes: writes.len(),
        writes_incomplete,
        update_all_p50_ms: percentile(&mut update_all, 0.5),
        update_all_p99_ms: percentile(&mut update_all, 0.99),
        event_remote_p50_ms: percentile(&mut remote, 0.5),
        event_remote_p99_ms: percentile(&mut remote, 0.99),
        killed: killed.map(member_name),
        gateway_failover_s: failover.map(|t| t as f64 / 1e9),
        events_published: published.len(),
        events_lost: lost.len(),
        payload_bytes_to_racks_without_subscribers: payload_quiet,
        false_positives,
        converged: views && writes_incomplete == 0,
        cross_rack_timeline: timeline,
    }
}

/// What the members' notifications told, kept small.
#[derive(Default)]
struct Seen {
    /// Per write key, the time each member first had it.
    got: BTreeMap<String, BTreeMap<usize, Nanos>>,
    /// Per member, the time each of the publisher's events reached it.
    delivered: BTreeMap<usize, BTreeMap<u64, Nanos>>,
    /// Members someone declared failed.
    failed: BTreeSet<String>,
}

impl Seen {
    fn absorb(&mut self, events: Vec<(Nanos, usize, Notification)>, layout: &Layout) {
        let publisher = member_name(layout.publisher);
        for (t, i, e) in events {
            match e {
                Notification::Update(u) if u.update.key.starts_with("w/") => {
                    self.got.entry(u.update.key).or_default().entry(i).or_insert(t);
                }
                Notification::Event(m) if m.topic == TOPIC && *m.id.origin == *publisher => {
                    self.delivered.entry(i).or_default().entry(m.id.seq).or_insert(t);
                }
                Notification::Member {
                    change: MemberChange::Failed,
                    member,
                } => {
                    self.failed.insert(member.name.to_string());
                }
                _ => {}
            }
        }
    }
}

/// Whether the running members among `scope` all see exactly the running
/// members of `scope` as live.
fn views_agree_among(sim: &Simulation, scope: &[usize]) -> bool {
    let running: Vec<&Overlay> = scope.iter().filter_map(|&i| sim.node(i)).collect();
    let Some(first) = running.first() else { return true };
    let digest = first.view_digest();
    running
        .iter()
        .all(|o| o.live_count() == running.len() && o.view_digest() == digest)
}

/// The `q`-quantile of `v` by rank (the smallest value at or above a
/// fraction `q` of them).
fn percentile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let k = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_places_candidates_subscribers_and_the_publisher() {
        let p = RacksParams {
            racks: 4,
            members_per_rack: 10,
            candidates: 3,
            subscribers_per_rack: 2,
            ..Default::default()
        };
        let l = p.layout();
        assert_eq!(l.candidates, vec![0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]);
        assert_eq!(l.subscribers, vec![13, 14, 33, 34]);
        assert_eq!(l.publisher, 3);
        assert_eq!(l.subscribed_racks, vec![1, 3]);
        assert!(l.is_candidate(21) && !l.is_candidate(23));
        let net = p.network();
        assert_eq!(net.rack_of(39), Some(3));
        assert!(net.crosses_racks(l.publisher, 13));
    }

    #[test]
    fn percentiles_are_ranks() {
        assert_eq!(percentile(&mut [], 0.99), None);
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile(&mut v, 0.5), Some(50.0));
        assert_eq!(percentile(&mut [5.0], 0.99), Some(5.0));
    }
}
