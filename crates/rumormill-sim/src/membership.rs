//! The membership experiment: members crash, how fast and how accurately
//! does the overlay notice?

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_core::{Config, MemberChange, Notification};
use serde::Serialize;

use crate::engine::{Nanos, Simulation, member_name, secs};
use crate::network::NetworkModel;

/// Parameters of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipParams {
    /// Members.
    pub nodes: usize,
    /// Datagram loss probability.
    pub loss: f64,
    /// Members killed per run, each at a random time in the first half.
    pub kill: usize,
    /// Simulated seconds per run.
    pub duration_s: f64,
    /// Seed of the first run; run `r` uses `seed + r`.
    pub seed: u64,
    /// Runs.
    pub runs: usize,
    /// Protocol configuration.
    pub config: Config,
}

impl Default for MembershipParams {
    fn default() -> Self {
        MembershipParams {
            nodes: 100,
            loss: 0.0,
            kill: 1,
            duration_s: 60.0,
            seed: 1,
            runs: 1,
            config: Config::new_lan(),
        }
    }
}

/// What [`run`] measured (means over killed members and runs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MembershipReport {
    /// Members.
    pub nodes: usize,
    /// Datagram loss probability.
    pub loss: f64,
    /// Members killed per run.
    pub kill: usize,
    /// Simulated seconds per run.
    pub duration_s: f64,
    /// Runs.
    pub runs: usize,
    /// Seed of the first run.
    pub seed: u64,
    /// Members that were never killed but were declared failed by someone
    /// (summed over runs).
    pub false_positives: usize,
    /// Suspicions of members that were never killed: distinct (member,
    /// incarnation) pairs suspected by anyone, summed over runs. Each was
    /// refuted unless it also counts as a false positive.
    pub false_suspicions: usize,
    /// Mean time from a kill until the first member declares it failed.
    pub detect_first_s: Option<f64>,
    /// Mean time from a kill until every surviving member has declared it
    /// failed.
    pub detect_all_s: Option<f64>,
    /// Largest such time.
    pub detect_all_max_s: Option<f64>,
    /// Killed members that some survivor had not declared failed by the end.
    pub undetected: usize,
    /// Whether, at the end of every run, every survivor saw exactly the
    /// survivors as live.
    pub converged: bool,
    /// Datagrams and stream frames sent per member per second.
    pub messages_per_member_per_s: f64,
    /// Bytes sent per member per second (headers included).
    pub bytes_per_member_per_s: f64,
}

/// The bound within which every survivor must have declared a killed member
/// failed under `config` in a cluster of `n`: a few probe periods until some
/// member probes it and the indirect probes fail, the longest suspicion
/// timeout (no confirmations at all), and the time for the news to be
/// retransmitted through the cluster.
pub fn detection_bound_s(config: &Config, n: usize) -> f64 {
    let probe = config.probe_interval.as_secs_f64();
    let (_, max) = config.suspicion_timeouts(n);
    let spread = f64::from(config.retransmit_limit(n)) * config.gossip_interval.as_secs_f64();
    3.0 * probe + max.as_secs_f64() + spread
}

/// Runs the experiment.
///
/// ```
/// use rumormill_sim::membership::{run, MembershipParams};
/// let r = run(&MembershipParams { nodes: 20, kill: 1, duration_s: 40.0, ..Default::default() });
/// assert_eq!(r.false_positives, 0);
/// assert_eq!(r.undetected, 0);
/// assert!(r.converged);
/// ```
pub fn run(p: &MembershipParams) -> MembershipReport {
    let mut first = Vec::new();
    let mut all = Vec::new();
    let (mut fp, mut fs, mut undetected, mut converged) = (0, 0, 0, true);
    let (mut packets, mut bytes) = (0u64, 0u64);
    for r in 0..p.runs {
        let seed = p.seed.wrapping_add(r as u64);
        let out = one_run(p, seed);
        first.extend(out.first);
        all.extend(out.all);
        fp += out.false_positives;
        fs += out.false_suspicions;
        undetected += out.undetected;
        converged &= out.converged;
        packets += out.packets;
        bytes += out.bytes;
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let member_seconds = (p.nodes as f64) * p.duration_s * p.runs as f64;
    MembershipReport {
        nodes: p.nodes,
        loss: p.loss,
        kill: p.kill,
        duration_s: p.duration_s,
        runs: p.runs,
        seed: p.seed,
        false_positives: fp,
        false_suspicions: fs,
        detect_first_s: mean(&first),
        detect_all_s: mean(&all),
        detect_all_max_s: all.iter().copied().reduce(f64::max),
        undetected,
        converged,
        messages_per_member_per_s: packets as f64 / member_seconds,
        bytes_per_member_per_s: bytes as f64 / member_seconds,
    }
}

struct RunOutcome {
    first: Vec<f64>,
    all: Vec<f64>,
    false_positives: usize,
    false_suspicions: usize,
    undetected: usize,
    converged: bool,
    packets: u64,
    bytes: u64,
}

fn one_run(p: &MembershipParams, seed: u64) -> RunOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut sim = Simulation::new(p.nodes, p.config.clone(), NetworkModel::lan(p.loss), seed);
    sim.bootstrap();
    let end = secs(p.duration_s);
    let kills = p.kill.min(p.nodes.saturating_sub(1));
    let mut plan: Vec<(Nanos, usize)> = sample(&mut rng, p.nodes, kills)
        .into_iter()
        .map(|i| (rng.random_range(0..end / 2), i))
        .collect();
    plan.sort_unstable();
    for &(at, victim) in &plan {
        sim.run_until(at);
        sim.kill(victim);
    }
    sim.run_until(end);

    let killed: BTreeMap<String, Nanos> = plan.iter().map(|&(at, i)| (member_name(i), at)).collect();
    let survivors = p.nodes - kills;
    // First failed/suspect event per (subject, observer).
    let mut failed: BTreeMap<&str, BTreeMap<usize, Nanos>> = BTreeMap::new();
    let mut suspected: BTreeSet<(&str, u64, u32)> = BTreeSet::new();
    for (t, observer, e) in sim.events() {
        let Notification::Member { change, member } = e else {
            continue;
        };
        match change {
            MemberChange::Failed => {
                failed.entry(&member.name).or_default().entry(*observer).or_insert(*t);
            }
            MemberChange::Suspect if !killed.contains_key(&*member.name) => {
                suspected.insert((&member.name, member.epoch, member.incarnation));
            }
            _ => {}
        }
    }
    let false_positives = failed.keys().filter(|s| !killed.contains_key(**s)).count();
    let (mut first, mut all, mut undetected) = (Vec::new(), Vec::new(), 0);
    for (name, &at) in &killed {
        let seen: Vec<Nanos> = failed
            .get(name.as_str())
            .map(|m| m.iter().filter(|(o, _)| sim.is_running(**o)).map(|(_, t)| *t).collect())
            .unwrap_or_default();
        if let Some(t) = failed.get(name.as_str()).and_then(|m| m.values().min()) {
            first.push((t - at) as f64 / 1e9);
        }
        if seen.len() == survivors {
            all.push((seen.iter().max().copied().unwrap_or(at) - at) as f64 / 1e9);
        } else {
            undetected += 1;
        }
    }
    let traffic = sim.traffic();
    RunOutcome {
        first,
        all,
        false_positives,
        false_suspicions: suspected.len(),
        undetected,
        converged: sim.views_agree(),
        packets: traffic.packets,
        bytes: traffic.bytes,
    }
}
