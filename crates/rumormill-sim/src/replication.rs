//! The broadcast experiment: one update injected at one member, how fast,
//! how completely and at what cost does it reach the others?
//!
//! Each member runs the real replication state machine
//! ([`rumormill_core::replication::Replication`]) and the real wire format
//! (sealed packets, MTU packing, streams) over the modelled network. What is
//! left out is failure detection: members choose partners uniformly from a
//! fixed list of all members, which is what SWIM's view converges to in a
//! stable cluster, and which lets the experiment reach 100,000 members
//! (a full member table per member would need 10¹⁰ entries).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumormill_core::replication::{Replication, ReplicationConfig};
use rumormill_core::{FrameKind, Notification, Transmit};
use rumormill_wire::{Codec, PacketBuilder, Security};
use serde::Serialize;

use crate::engine::{Nanos, SimNode, Simulation, member_addr, secs};
use crate::network::NetworkModel;

/// One member that only disseminates, over a fixed member list.
pub struct ReplicationNode {
    diss: Replication,
    codec: Codec,
    index: usize,
    peers: Arc<[SocketAddr]>,
    rng: ChaCha8Rng,
    mtu: usize,
    transmits: VecDeque<Transmit>,
}

impl ReplicationNode {
    /// Member `index` of `peers`.
    pub fn new(config: ReplicationConfig, index: usize, peers: Arc<[SocketAddr]>, seed: u64, now: Instant) -> Self {
        let mtu = 1400;
        let codec = Codec::new(0, index as u64, 1, 0, Security::Plaintext);
        let budget = mtu - codec.overhead();
        let diss = Replication::new(config, &crate::member_name(index), 1, peers[index], budget, seed, now);
        ReplicationNode {
            diss,
            codec,
            index,
            peers,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xb0ad),
            mtu,
            transmits: VecDeque::new(),
        }
    }

    /// The replication state machine.
    pub fn replication(&mut self) -> &mut Replication {
        &mut self.diss
    }

    fn drain(&mut self) {
        while let Some(out) = self.diss.poll_message() {
            let (kind, body) = if out.stream {
                (FrameKind::Stream, rumormill_wire::encode_envelope(&out.envelope))
            } else {
                let mut b = PacketBuilder::new(self.mtu - self.codec.overhead());
                // Fits: replication sized it for this budget.
                let _ = b.push(out.envelope);
                (FrameKind::Datagram, b.finish())
            };
            if let Ok(payload) = self.codec.seal(kind, &body) {
                self.transmits.push_back(Transmit {
                    to: out.to,
                    kind,
                    payload,
                });
            }
        }
    }
}

impl SimNode for ReplicationNode {
    fn handle(&mut self, now: Instant, from: SocketAddr, kind: FrameKind, bytes: &[u8]) {
        let Ok(opened) = self.codec.open(kind, bytes) else {
            return;
        };
        let bodies = match kind {
            FrameKind::Datagram => rumormill_wire::decode_packet(&opened.body).map(|p| p.envelopes),
            FrameKind::Stream => rumormill_wire::decode_envelope(&opened.body).map(|e| vec![e]),
        };
        for e in bodies.unwrap_or_default() {
            if let Some(body) = e.body {
                self.diss.handle(now, from, body);
            }
        }
        self.drain();
    }

    fn handle_timeout(&mut self, now: Instant) {
        let (peers, me, rng) = (&self.peers, self.index, &mut self.rng);
        let mut pick = |k: usize| -> Vec<SocketAddr> {
            let n = peers.len();
            if k == 0 || k >= n - 1 {
                return (0..n).filter(|&i| i != me).map(|i| peers[i]).collect();
            }
            let mut out: Vec<usize> = Vec::with_capacity(k);
            while out.len() < k {
                let i = rng.random_range(0..n);
                if i != me && !out.contains(&i) {
                    out.push(i);
                }
            }
            out.into_iter().map(|i| peers[i]).collect()
        };
        self.diss.handle_timeout(now, &mut pick);
        self.drain();
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn poll_notification(&mut self) -> Option<Notification> {
        self.diss.poll_notification().map(Notification::Update)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.diss.poll_timeout())
    }
}

/// Parameters of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationParams {
    /// Members.
    pub nodes: usize,
    /// Datagram loss probability.
    pub loss: f64,
    /// Replication settings (mode, rounds, fanout…).
    pub config: ReplicationConfig,
    /// Simulated seconds after the injection.
    pub duration_s: f64,
    /// Seed of the first run; run `r` uses `seed + r`.
    pub seed: u64,
    /// Runs.
    pub runs: usize,
}

impl Default for ReplicationParams {
    fn default() -> Self {
        ReplicationParams {
            nodes: 1000,
            loss: 0.0,
            config: ReplicationConfig::default(),
            duration_s: 60.0,
            seed: 1,
            runs: 1,
        }
    }
}

/// What [`run`] measured (over all runs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicationReport {
    /// Members.
    pub nodes: usize,
    /// Datagram loss probability.
    pub loss: f64,
    /// rumor, anti-entropy or both.
    pub mode: String,
    /// Runs.
    pub runs: usize,
    /// Fraction of the other members that received the update.
    pub delivery: f64,
    /// Median time from the write until a member had it, seconds.
    pub latency_p50_s: Option<f64>,
    /// 99th percentile of that time.
    pub latency_p99_s: Option<f64>,
    /// Time until the last member that got it had it.
    pub latency_max_s: Option<f64>,
    /// Datagrams and stream frames sent per member over the run.
    pub messages_per_member: f64,
    /// Bytes sent per member over the run (headers included).
    pub bytes_per_member: f64,
    /// Copies of the update sent per member (rumor pushes and deltas).
    pub copies_per_member: f64,
    /// Fraction of the other members informed against time since the
    /// write: `(seconds, fraction)` at 41 quantiles.
    pub curve: Vec<(f64, f64)>,
}

/// Runs the experiment.
///
/// ```
/// use rumormill_sim::replication::{run, ReplicationParams};
/// let r = run(&ReplicationParams { nodes: 50, duration_s: 20.0, ..Default::default() });
/// assert_eq!(r.delivery, 1.0);
/// ```
pub fn run(p: &ReplicationParams) -> ReplicationReport {
    let mut latencies: Vec<f64> = Vec::new();
    let (mut packets, mut bytes, mut copies) = (0u64, 0u64, 0u64);
    let others = p.nodes.saturating_sub(1) * p.runs;
    for r in 0..p.runs {
        let out = one_run(p, p.seed.wrapping_add(r as u64));
        latencies.extend(out.latencies);
        packets += out.packets;
        bytes += out.bytes;
        copies += out.copies;
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| -> Option<f64> {
        (!latencies.is_empty())
            .then(|| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1])
    };
    let max = latencies.last().copied();
    // The empirical distribution at 41 quantiles of the informed members:
    // exact at any time scale, linear or logarithmic.
    let curve = if latencies.is_empty() {
        Vec::new()
    } else {
        (0..=40)
            .map(|i| {
                let idx = ((latencies.len() - 1) * i) / 40;
                (latencies[idx], (idx + 1) as f64 / others.max(1) as f64)
            })
            .collect()
    };
    let member_runs = (p.nodes * p.runs) as f64;
    ReplicationReport {
        nodes: p.nodes,
        loss: p.loss,
        mode: p.config.mode.to_string(),
        runs: p.runs,
        delivery: latencies.len() as f64 / others.max(1) as f64,
        latency_p50_s: pct(0.5),
        latency_p99_s: pct(0.99),
        latency_max_s: max,
        messages_per_member: packets as f64 / member_runs,
        bytes_per_member: bytes as f64 / member_runs,
        copies_per_member: copies as f64 / member_runs,
        curve,
    }
}

struct RunOutcome {
    latencies: Vec<f64>,
    packets: u64,
    bytes: u64,
    copies: u64,
}

fn one_run(p: &ReplicationParams, seed: u64) -> RunOutcome {
    let base = Instant::now();
    let peers: Arc<[SocketAddr]> = (0..p.nodes).map(|i| member_addr(i, 1)).collect();
    let nodes = (0..p.nodes)
        .map(|i| {
            let node_seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (
                peers[i],
                ReplicationNode::new(p.config.clone(), i, peers.clone(), node_seed, base),
            )
        })
        .collect();
    let mut sim: Simulation<ReplicationNode> = Simulation::from_nodes(base, nodes, NetworkModel::lan(p.loss), seed);
    // Let the random timer phases settle, then write at a random member.
    let start: Nanos = secs(1.0);
    sim.run_until(start);
    let writer = ChaCha8Rng::seed_from_u64(seed ^ 0x1417e).random_range(0..p.nodes);
    let now = base + Duration::from_nanos(start);
    if let Some(n) = sim.node_mut(writer) {
        n.replication().put(now, "update", vec![0x5a; 100]);
    }
    sim.flush(writer);
    let before = sim.traffic();
    sim.run_until(start + secs(p.duration_s));
    let after = sim.traffic();
    let latencies = sim
        .events()
        .iter()
        .filter(|(_, _, e)| matches!(e, Notification::Update(_)))
        .map(|(t, _, _)| (t - start) as f64 / 1e9)
        .collect();
    let copies = (0..p.nodes)
        .filter_map(|i| sim.node_mut(i).map(|n| n.replication().stats().updates_sent))
        .sum();
    RunOutcome {
        latencies,
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        copies,
    }
}
