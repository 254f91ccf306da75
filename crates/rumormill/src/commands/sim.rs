//! `rumormill sim …`: experiments in the simulator.

use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use rumormill_core::Config;
use rumormill_core::replication::{self as diss, ReplicationConfig};
use rumormill_sim::epidemic::{self, Direction, Loss, Removal};
use rumormill_sim::membership::{self, MembershipParams};
use rumormill_sim::racks::{self, RacksParams};
use rumormill_sim::replication::{self, ReplicationParams};
use serde::Serialize;

/// Simulator experiments.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Failure detection: kill members, measure detection time, false
    /// positives and traffic.
    Membership(MembershipArgs),
    /// Rumor mongering in the synchronous model of Demers et al. (1987).
    Demers(DemersArgs),
    /// Anti-entropy in the synchronous model of Demers et al. (1987).
    AntiEntropy(AntiEntropyArgs),
    /// The real dissemination protocols over the modelled network: one
    /// update, how fast and how completely it reaches everyone.
    #[command(alias = "broadcast")]
    Replication(ReplicationArgs),
    /// Members in racks: what crosses between racks and at what cost,
    /// against the same members in one flat overlay.
    Racks(RacksArgs),
}

/// `rumormill sim racks`.
#[derive(Debug, Args)]
pub struct RacksArgs {
    /// Racks.
    #[arg(long, default_value_t = 3)]
    racks: usize,
    /// Members in each rack.
    #[arg(long = "members-per-rack", default_value_t = 100)]
    members_per_rack: usize,
    /// Gateway candidates per rack.
    #[arg(long, default_value_t = 3)]
    candidates: usize,
    /// Mean one-way latency between two racks, milliseconds (floor: 90 % of it).
    #[arg(long = "cross-latency-ms", default_value_t = 80.0)]
    cross_latency_ms: f64,
    /// Probability that a datagram is lost, 0 ≤ P < 1, inside and between racks.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Crash rack 1's active gateway half-way through the workload.
    #[arg(long = "kill-gateway")]
    kill_gateway: bool,
    /// Simulated seconds.
    #[arg(long = "duration-s", default_value_t = 120.0)]
    duration_s: f64,
    /// Writes per second, from random members.
    #[arg(long = "writes-per-s", default_value_t = 1.0)]
    writes_per_s: f64,
    /// At-least-once events per second.
    #[arg(long = "events-per-s", default_value_t = 5.0)]
    events_per_s: f64,
    /// Seed of both runs (racked and flat).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Protocol configuration preset.
    #[arg(long, value_enum, default_value_t = Preset::Lan)]
    preset: Preset,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// `rumormill sim replication`.
#[derive(Debug, Args)]
pub struct ReplicationArgs {
    /// Members.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Probability that a datagram is lost, 0 ≤ P < 1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// rumor, anti-entropy or both.
    #[arg(long, default_value = "both")]
    mode: diss::Mode,
    /// Milliseconds between rumor rounds (Grapevine's delta).
    #[arg(long = "interval-ms", alias = "delta", default_value_t = 200)]
    interval_ms: u64,
    /// Members pushed to per rumor round, 0 = all (Grapevine's level).
    #[arg(long, alias = "level", default_value_t = 3)]
    fanout: usize,
    /// k: unnecessary contacts or 1/probability before losing interest (Grapevine's rounds).
    #[arg(long, alias = "k", default_value_t = 3)]
    rounds: u32,
    /// feedback or blind.
    #[arg(long, default_value = "feedback")]
    removal: diss::Removal,
    /// How interest is lost: counter or coin.
    #[arg(long = "interest", default_value = "counter")]
    interest: diss::Loss,
    /// Milliseconds between anti-entropy exchanges.
    #[arg(long = "ae-interval-ms", default_value_t = 10_000)]
    ae_interval_ms: u64,
    /// Partners per anti-entropy exchange.
    #[arg(long = "ae-fanout", default_value_t = 1)]
    ae_fanout: usize,
    /// Anti-entropy direction: push, pull or push-pull.
    #[arg(long = "ae-direction", default_value = "push-pull")]
    ae_direction: diss::Direction,
    /// Simulated seconds after the write.
    #[arg(long = "duration-s", default_value_t = 60.0)]
    duration_s: f64,
    /// Seed of the first run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Configuration presets.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Preset {
    /// Local-area network.
    Lan,
    /// Wide-area network.
    Wan,
    /// One host.
    Local,
}

impl Preset {
    fn config(self) -> Config {
        match self {
            Preset::Lan => Config::new_lan(),
            Preset::Wan => Config::new_wan(),
            Preset::Local => Config::new_local(),
        }
    }
}

/// `rumormill sim membership`.
#[derive(Debug, Args)]
pub struct MembershipArgs {
    /// Members in the overlay.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Probability that a datagram is lost, 0 ≤ P < 1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Members killed per run, each at a random time in the first half.
    #[arg(long, default_value_t = 1)]
    kill: usize,
    /// Simulated seconds per run.
    #[arg(long = "duration-s", default_value_t = 60.0)]
    duration_s: f64,
    /// Seed of the first run (run r uses seed + r).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Independent runs to average over.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Protocol configuration preset.
    #[arg(long, value_enum, default_value_t = Preset::Lan)]
    preset: Preset,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// `rumormill sim demers`.
#[derive(Debug, Args)]
pub struct DemersArgs {
    /// Sites.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Runs to average over.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// push, pull or push-pull.
    #[arg(long, default_value = "push")]
    direction: Direction,
    /// feedback or blind.
    #[arg(long, default_value = "feedback")]
    removal: Removal,
    /// counter or coin.
    #[arg(long, default_value = "counter")]
    loss: Loss,
    /// Unnecessary contacts (counter) or 1/probability (coin) before losing interest.
    #[arg(long, default_value_t = 1)]
    k: u32,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// `rumormill sim anti-entropy`.
#[derive(Debug, Args)]
pub struct AntiEntropyArgs {
    /// Sites.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Runs.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// push, pull or push-pull.
    #[arg(long, default_value = "push-pull")]
    direction: Direction,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs a simulator subcommand.
pub fn run(cmd: SimCommand) -> Result<(), String> {
    match cmd {
        SimCommand::Membership(a) => membership_cmd(a),
        SimCommand::Replication(a) => replication_cmd(a),
        SimCommand::Racks(a) => racks_cmd(a),
        SimCommand::Demers(a) => {
            let params = epidemic::DemersParams {
                nodes: a.nodes,
                runs: a.runs,
                seed: a.seed,
                direction: a.direction,
                removal: a.removal,
                loss: a.loss,
                k: a.k,
            };
            let r = epidemic::demers::run(&params).map_err(|e| e.to_string())?;
            print(a.json, &r, || {
                format!(
                    "rumor mongering, {} sites, {} runs ({} {} {} k={}):\n  residue {:.3e}\n  traffic {:.3} messages/site\n  t_ave {:.3} cycles\n  t_last {:.3} cycles",
                    r.nodes, r.runs, r.direction, r.removal, r.loss, r.k, r.residue, r.traffic, r.t_ave, r.t_last
                )
            })
        }
        SimCommand::AntiEntropy(a) => {
            let params = epidemic::AntiEntropyParams {
                nodes: a.nodes,
                runs: a.runs,
                seed: a.seed,
                direction: a.direction,
            };
            let r = epidemic::anti_entropy::run(&params).map_err(|e| e.to_string())?;
            let theory = epidemic::theory_rounds(a.direction, a.nodes);
            print(a.json, &r, || {
                format!(
                    "anti-entropy ({}), {} sites, {} runs:\n  rounds mean {:.2} (theory ≈ {:.2}), p99 {}, max {}",
                    a.direction, r.nodes, r.runs, r.rounds_mean, theory, r.rounds_p99, r.rounds_max
                )
            })
        }
    }
}

/// The checks every simulated run needs, with messages naming the flag.
fn check_run(nodes: usize, loss: f64, duration_s: f64, runs: usize) -> Result<(), String> {
    if nodes < 2 {
        return Err(format!("--nodes must be at least 2, got {nodes}"));
    }
    if !(0.0..1.0).contains(&loss) {
        return Err(format!("--loss must be in [0, 1), got {loss}"));
    }
    if !(duration_s > 0.0 && duration_s.is_finite()) {
        return Err(format!(
            "--duration-s must be a positive number of seconds, got {duration_s}"
        ));
    }
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(())
}

fn membership_cmd(a: MembershipArgs) -> Result<(), String> {
    check_run(a.nodes, a.loss, a.duration_s, a.runs)?;
    if a.kill >= a.nodes {
        return Err(format!("--kill must be below --nodes ({}), got {}", a.nodes, a.kill));
    }
    let params = MembershipParams {
        nodes: a.nodes,
        loss: a.loss,
        kill: a.kill,
        duration_s: a.duration_s,
        seed: a.seed,
        runs: a.runs,
        config: a.preset.config(),
    };
    let started = Instant::now();
    let r = membership::run(&params);
    let wall = started.elapsed().as_secs_f64();
    let secs = |v: Option<f64>| v.map_or("n/a".to_string(), |s| format!("{s:.2} s"));
    print(a.json, &r, || {
        format!(
            "{} members, {:.1}% loss, {} killed per run, {} runs of {} s (seed {}):\n  \
             detection: first {}, all {} (max {}), undetected {}\n  \
             false positives {}, false suspicions {}\n  \
             converged {}\n  \
             traffic per member: {:.1} messages/s, {:.0} bytes/s\n  \
             ({wall:.1} s of wall time)",
            r.nodes,
            r.loss * 100.0,
            r.kill,
            r.runs,
            r.duration_s,
            r.seed,
            secs(r.detect_first_s),
            secs(r.detect_all_s),
            secs(r.detect_all_max_s),
            r.undetected,
            r.false_positives,
            r.false_suspicions,
            r.converged,
            r.messages_per_member_per_s,
            r.bytes_per_member_per_s,
        )
    })
}

fn replication_cmd(a: ReplicationArgs) -> Result<(), String> {
    check_run(a.nodes, a.loss, a.duration_s, a.runs)?;
    let config = ReplicationConfig {
        mode: a.mode,
        interval: std::time::Duration::from_millis(a.interval_ms),
        fanout: a.fanout,
        rounds: a.rounds,
        removal: a.removal,
        loss: a.interest,
        anti_entropy_interval: std::time::Duration::from_millis(a.ae_interval_ms),
        anti_entropy_fanout: a.ae_fanout,
        anti_entropy_direction: a.ae_direction,
        ..ReplicationConfig::default()
    };
    config.validate()?;
    let params = ReplicationParams {
        nodes: a.nodes,
        loss: a.loss,
        config,
        duration_s: a.duration_s,
        seed: a.seed,
        runs: a.runs,
    };
    let started = Instant::now();
    let r = replication::run(&params);
    let wall = started.elapsed().as_secs_f64();
    let secs = |v: Option<f64>| {
        v.map_or("n/a".to_string(), |s| {
            if s < 1.0 {
                format!("{:.1} ms", s * 1e3)
            } else {
                format!("{s:.2} s")
            }
        })
    };
    print(a.json, &r, || {
        format!(
            "{} members, {:.1}% loss, mode {}, {} runs:\n  \
             delivered to {:.4}% of members\n  \
             latency p50 {}, p99 {}, max {}\n  \
             per member: {:.1} messages, {:.0} bytes, {:.2} copies of the update\n  \
             ({wall:.1} s of wall time)",
            r.nodes,
            r.loss * 100.0,
            r.mode,
            r.runs,
            r.delivery * 100.0,
            secs(r.latency_p50_s),
            secs(r.latency_p99_s),
            secs(r.latency_max_s),
            r.messages_per_member,
            r.bytes_per_member,
            r.copies_per_member,
        )
    })
}

fn racks_cmd(a: RacksArgs) -> Result<(), String> {
    let params = RacksParams {
        racks: a.racks,
        members_per_rack: a.members_per_rack,
        candidates: a.candidates,
        cross_latency_ms: a.cross_latency_ms,
        loss: a.loss,
        kill_gateway: a.kill_gateway,
        duration_s: a.duration_s,
        writes_per_s: a.writes_per_s,
        events_per_s: a.events_per_s,
        seed: a.seed,
        config: a.preset.config(),
        ..RacksParams::default()
    };
    let started = Instant::now();
    let r = racks::run(&params).map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} ms"));
    let measures = |m: &racks::RunMeasures| {
        format!(
            "cross-rack: {} packets, {:.0} bytes/s{}\n    \
             writes reaching everyone: p50 {}, p99 {} ({} of {} incomplete)\n    \
             events: {} published, {} lost, remote p50 {}, p99 {}, {} payload bytes to racks without subscribers\n    \
             {}false positives {}, converged {}",
            m.cross_rack_packets,
            m.cross_rack_bytes_per_s,
            m.cross_rack_packets_from_non_gateways
                .map_or(String::new(), |n| format!(", {n} packets from non-gateways")),
            ms(m.update_all_p50_ms),
            ms(m.update_all_p99_ms),
            m.writes_incomplete,
            m.writes,
            m.events_published,
            m.events_lost,
            ms(m.event_remote_p50_ms),
            ms(m.event_remote_p99_ms),
            m.payload_bytes_to_racks_without_subscribers,
            m.gateway_failover_s
                .map_or(String::new(), |s| format!("gateway failover {s:.2} s, ")),
            m.false_positives,
            m.converged,
        )
    };
    print(a.json, &r, || {
        let racked = r.racked.as_ref().map_or_else(
            || "(the core has no racks yet: the racked run is not measured)".to_string(),
            |m| {
                format!(
                    "{}\n    {:.1}× fewer cross-rack bytes than flat",
                    measures(m),
                    r.flat_cross_rack_bytes_per_s / m.cross_rack_bytes_per_s.max(f64::MIN_POSITIVE)
                )
            },
        );
        format!(
            "{} racks × {} members, {} candidates, {} ms between racks, {:.1}% loss, {} s (seed {}){}:\n  \
             racked:\n    {racked}\n  \
             flat:\n    {}\n  \
             ({wall:.1} s of wall time)",
            r.racks,
            r.members_per_rack,
            r.candidates,
            r.cross_latency_ms,
            r.loss * 100.0,
            r.duration_s,
            r.seed,
            r.kill_at_s
                .map_or(String::new(), |t| format!(", gateway killed at {t} s")),
            measures(&r.flat),
        )
    })
}

fn print<T: Serialize>(json: bool, value: &T, summary: impl FnOnce() -> String) -> Result<(), String> {
    if json {
        let s = serde_json::to_string(value).map_err(|e| format!("cannot encode the report as JSON: {e}"))?;
        println!("{s}");
    } else {
        println!("{}", summary());
    }
    Ok(())
}
