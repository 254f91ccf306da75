//! The measurements on one cluster: join convergence, idle traffic,
//! dissemination, failure detection and memory — and the loss phase on
//! several clusters at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::cluster::{Cluster, Flavor, Mode, Note};
use crate::netns::{self, Count};

/// What to do in each run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Events published per dissemination phase.
    pub events: u32,
    /// Time between two publications.
    pub interval: Duration,
    /// Agents SIGKILLed one after the other.
    pub kills: usize,
    /// Time between two kills.
    pub kill_spacing: Duration,
    /// Quiet time after joining before anything is counted.
    pub settle: Duration,
    /// Length of the idle traffic window.
    pub idle: Duration,
    /// Counted after the last event arrived everywhere (retransmissions
    /// and acknowledgements still under way belong to the events).
    pub tail: Duration,
    /// How long an event may take before it counts as not delivered.
    pub drain: Duration,
    /// Seconds a join may take before the run fails.
    pub join_limit: Duration,
}

/// Gossip bytes and packets over a window, for the whole cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    /// Window length.
    pub seconds: f64,
    /// IP bytes, headers included.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
    /// Members sending.
    pub members: usize,
}

impl Traffic {
    fn between(a: Count, b: Count, seconds: f64, members: usize) -> Traffic {
        Traffic {
            seconds,
            bytes: b.bytes - a.bytes,
            packets: b.packets - a.packets,
            members,
        }
    }

    /// Bytes per member per second.
    pub fn bytes_per_member_s(&self) -> f64 {
        self.bytes as f64 / self.members as f64 / self.seconds
    }

    /// Packets per member per second.
    pub fn packets_per_member_s(&self) -> f64 {
        self.packets as f64 / self.members as f64 / self.seconds
    }
}

/// One dissemination phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dissemination {
    /// `serf event`, `best effort` or `at-least-once`.
    pub mode: String,
    /// Events published.
    pub events: u32,
    /// Time until every member had it, per event that reached every member
    /// (ms, sorted).
    pub latency_ms: Vec<f64>,
    /// (member, event) pairs never received within the drain time.
    pub missing: u64,
    /// Traffic from the first publication to `tail` after the last arrival.
    pub traffic: Traffic,
    /// Bytes per event above the idle traffic of the same window.
    pub bytes_per_event: f64,
    /// Packets per event above the idle traffic of the same window.
    pub packets_per_event: f64,
}

/// One SIGKILL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detection {
    /// The member killed.
    pub victim: String,
    /// Seconds until the first survivor reported it failed.
    pub first_s: Option<f64>,
    /// Seconds until every survivor reported it failed.
    pub all_s: Option<f64>,
}

/// Everything measured on one cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// `serf`, `rumormill` or `rumormill-tuned`.
    pub system: String,
    /// Members.
    pub n: usize,
    /// Seconds from starting the agents until each saw all alive (`None`:
    /// not within the join limit).
    pub converge_s: Option<f64>,
    /// Traffic with nothing happening.
    pub idle: Traffic,
    /// One per delivery mode.
    pub dissemination: Vec<Dissemination>,
    /// One per kill.
    pub detection: Vec<Detection>,
    /// Members reported failed that were never killed (member, observer
    /// pairs) during the whole run, without loss.
    pub false_failures: usize,
    /// Peak RSS of each agent, KiB.
    pub rss_kib: Vec<u64>,
}

/// The loss phase, per cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossRun {
    /// System.
    pub system: String,
    /// Members.
    pub n: usize,
    /// Loss, percent of gossip packets.
    pub loss_percent: f64,
    /// Length of the lossy window, seconds.
    pub seconds: f64,
    /// (observer, member) failure reports; every one is false.
    pub false_failures: usize,
    /// Distinct members reported failed.
    pub members_reported: usize,
    /// Whether every agent saw every agent alive again after the loss.
    pub whole_after: bool,
}

/// Delivery modes measured for a system. The tuned preset changes what
/// matters for at-least-once events (the inbox flush), not the spreading,
/// so it is measured with at-least-once events only (which keeps the suite
/// under 15 minutes).
pub fn modes(flavor: Flavor) -> Vec<Mode> {
    match flavor {
        Flavor::Serf => vec![Mode::SerfEvent],
        Flavor::RumormillLan => vec![Mode::BestEffort, Mode::AtLeastOnce],
        Flavor::RumormillTuned => vec![Mode::AtLeastOnce],
    }
}

/// Receives notes until `until`, handing each to `f`.
fn pump(rx: &Receiver<Note>, until: Instant, mut f: impl FnMut(Note)) {
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        match rx.recv_timeout(until - now) {
            Ok(note) => f(note),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(until - now);
                return;
            }
        }
    }
}

/// Runs every measurement on a new cluster of `n` agents and stops it.
pub fn run(flavor: Flavor, n: usize, plan: &Plan, work: &Path, bin: &Path, key: &str) -> Result<Run> {
    let mut c = Cluster::new(flavor, 0, n, 0, work, bin, key)?;
    let system = flavor.label();
    let converge = c.start(plan.join_limit)?;
    if let Some(t) = converge {
        eprintln!("  {system} × {n}: joined in {:.2} s", t.as_secs_f64());
    }
    let (tx, rx) = channel();
    c.follow(&tx)?;
    c.await_subscribers(Duration::from_secs(30))?;
    let mut failed: Vec<(String, usize)> = Vec::new();
    let mut keep_failed = |note: Note| {
        if let Note::Failed { member, agent, .. } = note {
            failed.push((member, agent));
        }
    };
    pump(&rx, Instant::now() + plan.settle, &mut keep_failed);

    let c0 = netns::counter(system_counter(flavor))?;
    let t0 = Instant::now();
    pump(&rx, t0 + plan.idle, &mut keep_failed);
    let idle = Traffic::between(
        c0,
        netns::counter(system_counter(flavor))?,
        t0.elapsed().as_secs_f64(),
        n,
    );
    eprintln!(
        "  {system} × {n}: idle {:.0} B/s, {:.1} packets/s per member",
        idle.bytes_per_member_s(),
        idle.packets_per_member_s()
    );

    let mut dissemination = Vec::new();
    for (m, mode) in modes(flavor).into_iter().enumerate() {
        let d = disseminate(&mut c, &rx, plan, mode, (m as u32 + 1) * 100_000, &idle, &mut failed)?;
        let p = |q: f64| d.quantile_ms(q).map_or("never".into(), |v| format!("{v:.1} ms"));
        eprintln!(
            "  {system} × {n}: {}: p50 {}, p99 {}, max {}, missing {}, {:.0} B/event",
            d.mode,
            p(0.5),
            p(0.99),
            p(1.0),
            d.missing,
            d.bytes_per_event
        );
        dissemination.push(d);
    }

    let detection = detect(&mut c, &rx, plan, &mut failed)?;
    let victims: BTreeSet<String> = detection.iter().map(|d| d.victim.clone()).collect();
    let false_failures = failed.iter().filter(|(m, _)| !victims.contains(m)).count();
    let all: Vec<f64> = detection.iter().filter_map(|d| d.all_s).collect();
    eprintln!(
        "  {system} × {n}: detection mean {:.2} s, max {:.2} s ({} of {} complete), false failures {false_failures}",
        all.iter().sum::<f64>() / all.len().max(1) as f64,
        all.iter().cloned().fold(0.0, f64::max),
        all.len(),
        detection.len()
    );
    let rss_kib = c.peak_rss_kib();
    c.stop();
    Ok(Run {
        system: system.to_string(),
        n,
        converge_s: converge.map(|t| t.as_secs_f64()),
        idle,
        dissemination,
        detection,
        false_failures,
        rss_kib,
    })
}

fn system_counter(flavor: Flavor) -> &'static str {
    if flavor.is_rumormill() { "rumormill" } else { "serf" }
}

/// Publishes `plan.events` events at `plan.interval` from agent 0 and
/// records when each reached each agent.
fn disseminate(
    c: &mut Cluster,
    rx: &Receiver<Note>,
    plan: &Plan,
    mode: Mode,
    first_seq: u32,
    idle: &Traffic,
    failed: &mut Vec<(String, usize)>,
) -> Result<Dissemination> {
    let n = c.len();
    let events = plan.events as usize;
    let mut published: Vec<Option<Instant>> = vec![None; events];
    let mut arrived: Vec<Vec<Option<Instant>>> = vec![vec![None; n]; events];
    let mut outstanding = events * n;
    let mut record = |note: Note, outstanding: &mut usize| match note {
        Note::Event { seq, agent, at, .. } => {
            let Some(k) = seq.checked_sub(first_seq).map(|k| k as usize) else {
                return;
            };
            if let Some(slot) = arrived.get_mut(k).and_then(|a| a.get_mut(agent))
                && slot.is_none()
            {
                *slot = Some(at);
                *outstanding -= 1;
            }
        }
        Note::Failed { member, agent, .. } => failed.push((member, agent)),
    };
    let c0 = netns::counter(system_counter(c.flavor))?;
    let t0 = Instant::now();
    for (k, when) in published.iter_mut().enumerate() {
        let due = t0 + plan.interval * k as u32;
        pump(rx, due, |note| record(note, &mut outstanding));
        *when = Some(Instant::now());
        c.publish(first_seq + k as u32, mode)?;
    }
    let give_up = Instant::now() + plan.drain;
    while outstanding > 0 && Instant::now() < give_up {
        pump(rx, (Instant::now() + Duration::from_millis(20)).min(give_up), |note| {
            record(note, &mut outstanding)
        });
    }
    pump(rx, Instant::now() + plan.tail, |note| record(note, &mut outstanding));
    let seconds = t0.elapsed().as_secs_f64();
    let traffic = Traffic::between(c0, netns::counter(system_counter(c.flavor))?, seconds, n);
    let mut latency_ms: Vec<f64> = published
        .iter()
        .zip(&arrived)
        .filter_map(|(p, a)| {
            let last = a.iter().copied().collect::<Option<Vec<Instant>>>()?.into_iter().max()?;
            Some(last.saturating_duration_since((*p)?).as_secs_f64() * 1e3)
        })
        .collect();
    latency_ms.sort_by(f64::total_cmp);
    let idle_bytes = idle.bytes as f64 / idle.seconds * seconds;
    let idle_packets = idle.packets as f64 / idle.seconds * seconds;
    Ok(Dissemination {
        mode: mode.label().to_string(),
        events: plan.events,
        latency_ms,
        missing: outstanding as u64,
        bytes_per_event: (traffic.bytes as f64 - idle_bytes) / events as f64,
        packets_per_event: (traffic.packets as f64 - idle_packets) / events as f64,
        traffic,
    })
}

/// SIGKILLs the last `plan.kills` agents, `plan.kill_spacing` apart, and
/// records when the agents never killed report each failed.
fn detect(
    c: &mut Cluster,
    rx: &Receiver<Note>,
    plan: &Plan,
    failed: &mut Vec<(String, usize)>,
) -> Result<Vec<Detection>> {
    let n = c.len();
    let kills = plan.kills.min(n.saturating_sub(2));
    let observers = n - kills;
    let victims: Vec<usize> = (0..kills).map(|k| n - 1 - k).collect();
    let names: BTreeMap<String, usize> = victims.iter().enumerate().map(|(k, &v)| (c.name(v), k)).collect();
    let mut killed_at: Vec<Option<Instant>> = vec![None; kills];
    let mut seen: Vec<Vec<Option<Instant>>> = vec![vec![None; observers]; kills];
    let mut outstanding = kills * observers;
    // Victims every observer has reported failed, to start again.
    let mut detected: Vec<usize> = Vec::new();
    let mut record = |note: Note, outstanding: &mut usize, detected: &mut Vec<usize>| {
        if let Note::Failed { member, agent, at, .. } = note {
            match names.get(&member) {
                Some(&k) if agent < observers => {
                    if seen[k][agent].is_none() {
                        seen[k][agent] = Some(at);
                        *outstanding -= 1;
                        if seen[k].iter().all(Option::is_some) {
                            detected.push(k);
                        }
                    }
                }
                Some(_) => {}
                None => failed.push((member, agent)),
            }
        }
    };
    let restart = |c: &mut Cluster, detected: &mut Vec<usize>| -> Result<()> {
        for k in detected.drain(..) {
            c.restart(victims[k])?;
        }
        Ok(())
    };
    let t0 = Instant::now();
    for (k, &victim) in victims.iter().enumerate() {
        pump(rx, t0 + plan.kill_spacing * k as u32, |note| {
            record(note, &mut outstanding, &mut detected)
        });
        restart(c, &mut detected)?;
        killed_at[k] = Some(Instant::now());
        c.kill(victim)?;
    }
    let give_up = Instant::now() + Duration::from_secs(40);
    while outstanding > 0 && Instant::now() < give_up {
        pump(rx, (Instant::now() + Duration::from_millis(20)).min(give_up), |note| {
            record(note, &mut outstanding, &mut detected)
        });
        restart(c, &mut detected)?;
    }
    Ok(victims
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let Some(at) = killed_at[k] else {
                return Detection {
                    victim: c.name(v),
                    first_s: None,
                    all_s: None,
                };
            };
            let secs = |t: Instant| t.saturating_duration_since(at).as_secs_f64();
            let times: Vec<Instant> = seen[k].iter().flatten().copied().collect();
            Detection {
                victim: c.name(v),
                first_s: times.iter().min().map(|&t| secs(t)),
                all_s: if times.len() == observers {
                    times.iter().max().map(|&t| secs(t))
                } else {
                    None
                },
            }
        })
        .collect())
}

impl Dissemination {
    /// The `q` quantile (0..=1, nearest rank) of the time until every member
    /// had an event, over all events published: one that never reached
    /// everyone counts as infinitely late (`None` when the rank falls on
    /// one).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let rank = ((q * f64::from(self.events)).ceil() as usize).max(1);
        self.latency_ms.get(rank - 1).copied()
    }
}

/// Runs every cluster of `specs` at once under `loss_percent` loss for
/// `window`, counting failure reports (none is true: nothing is killed).
pub fn loss_phase(
    specs: &[(Flavor, usize, &Path, &str)],
    loss_percent: f64,
    window: Duration,
    plan: &Plan,
    work: &Path,
) -> Result<Vec<LossRun>> {
    let mut clusters = Vec::new();
    let mut slots: BTreeMap<bool, u16> = BTreeMap::new();
    for (id, &(flavor, n, bin, key)) in specs.iter().enumerate() {
        let slot = slots.entry(flavor.is_rumormill()).or_insert(0);
        let mut c = Cluster::new(flavor, id, n, *slot, work, bin, key)?;
        *slot += 1;
        let t0 = c.launch()?;
        clusters.push((c, t0));
    }
    let mut clusters: Vec<Cluster> = clusters
        .into_iter()
        .map(|(mut c, t0)| c.converge(t0, plan.join_limit).map(|_| c))
        .collect::<Result<_>>()?;
    let (tx, rx) = channel();
    for c in &clusters {
        c.follow(&tx)?;
    }
    pump(&rx, Instant::now() + plan.settle, |_| {});
    netns::set_loss(loss_percent)?;
    let t0 = Instant::now();
    let mut reports: Vec<Vec<String>> = vec![Vec::new(); clusters.len()];
    let mut next_line = t0;
    while t0.elapsed() < window {
        pump(
            &rx,
            (t0 + window).min(Instant::now() + Duration::from_secs(1)),
            |note| {
                if let Note::Failed { cluster, member, .. } = note {
                    reports[cluster].push(member);
                }
            },
        );
        if Instant::now() >= next_line {
            let dropped = netns::counter("dropped").map(|c| c.packets).unwrap_or(0);
            let total: usize = reports.iter().map(Vec::len).sum();
            eprintln!(
                "  loss phase: {:>3.0} s of {:.0}, {dropped} packets dropped, {total} failure reports",
                t0.elapsed().as_secs_f64(),
                window.as_secs_f64()
            );
            next_line += Duration::from_secs(30);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    netns::set_loss(0.0)?;
    // A wrongly failed member rejoins by itself; give the views time to heal.
    let heal = Instant::now() + Duration::from_secs(20);
    let mut whole = vec![false; clusters.len()];
    while Instant::now() < heal && whole.iter().any(|w| !w) {
        for (w, c) in whole.iter_mut().zip(clusters.iter_mut()) {
            if !*w {
                *w = c.whole();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(clusters
        .iter()
        .zip(reports)
        .zip(whole)
        .map(|((c, r), whole_after)| LossRun {
            system: c.flavor.label().to_string(),
            n: c.len(),
            loss_percent,
            seconds,
            false_failures: r.len(),
            members_reported: r.iter().collect::<BTreeSet<_>>().len(),
            whole_after,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(latency_ms: Vec<f64>, events: u32) -> Dissemination {
        Dissemination {
            mode: "best effort".into(),
            events,
            latency_ms,
            missing: 0,
            traffic: Traffic::default(),
            bytes_per_event: 0.0,
            packets_per_event: 0.0,
        }
    }

    #[test]
    fn an_event_that_never_reached_everyone_counts_as_infinitely_late() {
        let all: Vec<f64> = (1..=200).map(f64::from).collect();
        let d = phase(all, 200);
        assert_eq!(d.quantile_ms(0.5), Some(100.0));
        assert_eq!(d.quantile_ms(0.99), Some(198.0));
        assert_eq!(d.quantile_ms(1.0), Some(200.0));
        // Three of 200 never complete: p99 (rank 198) falls on one of them.
        let d = phase((1..=197).map(f64::from).collect(), 200);
        assert_eq!(d.quantile_ms(0.5), Some(100.0));
        assert_eq!(d.quantile_ms(0.98), Some(196.0));
        assert_eq!(d.quantile_ms(0.99), None);
        assert_eq!(d.quantile_ms(1.0), None);
    }

    #[test]
    fn traffic_is_per_member_and_second() {
        let t = Traffic::between(
            Count {
                bytes: 1_000,
                packets: 10,
            },
            Count {
                bytes: 17_000,
                packets: 90,
            },
            4.0,
            2,
        );
        assert_eq!(t.bytes_per_member_s(), 2_000.0);
        assert_eq!(t.packets_per_member_s(), 10.0);
    }
}
