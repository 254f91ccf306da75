//! N agents of one system as separate processes on loopback, and what the
//! harness asks of them: start and join, count alive members, follow events
//! and failures, publish, kill one, read peak memory.
//!
//! Gossip goes to 127.0.0.1 (counted and, in the loss phase, dropped by
//! nftables); the control connections of the harness (Serf RPC, Rumormill
//! HTTP API) go to 127.0.0.2, which nothing counts or drops.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::serf_rpc::{SerfRpc, StreamEvent};
use crate::{Result, http};

/// The topic every Rumormill member subscribes to, and the Serf user event
/// name.
pub const TOPIC: &str = "bench";
/// Event payload size in bytes.
pub const PAYLOAD: usize = 100;

/// First gossip port of each system; a cluster uses `base + 100·slot + i`.
/// The control port is the gossip port + 1000.
pub const SERF_PORTS: u16 = 20_000;
/// See [`SERF_PORTS`].
pub const RUMORMILL_PORTS: u16 = 22_000;
/// Width of each system's gossip port range (the nftables counters use it).
pub const PORT_RANGE: u16 = 1_000;

/// Which system, and for Rumormill which timing preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `serf agent`, LAN profile (its default).
    Serf,
    /// `rumormill agent` with its default LAN preset.
    RumormillLan,
    /// `rumormill agent --profile local` (the loopback preset) with its
    /// data directory in memory (`/dev/shm`): the inbox then survives an
    /// agent's crash, not the host's, and costs no disk flush.
    RumormillTuned,
}

impl Flavor {
    /// Short label used in tables and files.
    pub fn label(self) -> &'static str {
        match self {
            Flavor::Serf => "serf",
            Flavor::RumormillLan => "rumormill",
            Flavor::RumormillTuned => "rumormill-tuned",
        }
    }

    /// Whether this is one of ours.
    pub fn is_rumormill(self) -> bool {
        self != Flavor::Serf
    }
}

/// How an event is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `serf event`.
    SerfEvent,
    /// Rumormill best effort.
    BestEffort,
    /// Rumormill at-least-once.
    AtLeastOnce,
}

impl Mode {
    /// Label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::SerfEvent => "serf event",
            Mode::BestEffort => "best effort",
            Mode::AtLeastOnce => "at-least-once",
        }
    }
}

/// What the followers report to the harness.
#[derive(Debug, Clone)]
pub enum Note {
    /// Event number `seq` arrived at agent `agent`.
    Event { agent: usize, seq: u32, at: Instant },
    /// Agent `agent` of cluster `cluster` declared `member` failed.
    Failed {
        cluster: usize,
        agent: usize,
        member: String,
        at: Instant,
    },
}

/// The payload of event `seq`: its number (4 bytes, big-endian), then 96
/// pseudo-random bytes, so that neither system gains from compressing it
/// (Serf compresses its gossip; real payloads are often already
/// compressed or encrypted).
pub fn payload(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    let mut x = u64::from(seq).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while p.len() < PAYLOAD {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        p.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    p.truncate(PAYLOAD);
    p
}

/// The event number of a payload made by [`payload`].
fn parse_seq(payload: &[u8]) -> Option<u32> {
    let seq = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    (payload == self::payload(seq)).then_some(seq)
}

/// An inbox entry's payload: text, or base64 when it is not UTF-8.
fn inbox_payload(item: &serde_json::Value) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if let Some(t) = item["payload"].as_str() {
        return Some(t.as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(item["payload_base64"].as_str()?)
        .ok()
}

/// One cluster of agents.
pub struct Cluster {
    /// Which system.
    pub flavor: Flavor,
    /// Index of the cluster in the run (tags its notes).
    pub id: usize,
    n: usize,
    slot: u16,
    key: String,
    /// Logs (and Rumormill data directories but for the tuned flavour).
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    procs: Vec<Option<Child>>,
    /// Peak RSS (KiB) of agents that were killed, read just before.
    killed_hwm: Vec<u64>,
    /// Agents started again after a kill.
    restarted: Vec<bool>,
    tokens: Vec<String>,
    publisher: Option<SerfRpc>,
}

impl Cluster {
    /// A cluster of `n` agents (not started); `slot` picks its ports.
    pub fn new(flavor: Flavor, id: usize, n: usize, slot: u16, work: &Path, bin: &Path, key: &str) -> Result<Cluster> {
        let dir = work.join(format!("{}-{n}-{slot}", flavor.label()));
        std::fs::create_dir_all(&dir)?;
        let data = if flavor == Flavor::RumormillTuned {
            memory_dir(work).join(format!("{}-{n}-{slot}", flavor.label()))
        } else {
            dir.clone()
        };
        Ok(Cluster {
            flavor,
            id,
            n,
            slot,
            key: key.to_string(),
            dir,
            data,
            bin: bin.to_path_buf(),
            procs: (0..n).map(|_| None).collect(),
            killed_hwm: Vec::new(),
            restarted: vec![false; n],
            tokens: vec![String::new(); n],
            publisher: None,
        })
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.n
    }

    fn gossip_port(&self, i: usize) -> u16 {
        let base = if self.flavor.is_rumormill() {
            RUMORMILL_PORTS
        } else {
            SERF_PORTS
        };
        base + 100 * self.slot + i as u16
    }

    fn gossip(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.gossip_port(i))
    }

    fn control(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], self.gossip_port(i) + PORT_RANGE))
    }

    /// Member name of agent `i`.
    pub fn name(&self, i: usize) -> String {
        format!(
            "{}{}-{i}",
            if self.flavor.is_rumormill() { "r" } else { "s" },
            self.slot
        )
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name(i))))?;
        let mut cmd = Command::new(&self.bin);
        match self.flavor {
            Flavor::Serf => {
                cmd.arg("agent")
                    .arg(format!("-node={}", self.name(i)))
                    .arg(format!("-bind={}", self.gossip(i)))
                    .arg(format!("-rpc-addr={}", self.control(i)))
                    .arg(format!("-encrypt={}", self.key))
                    .arg("-log-level=warn");
                if i > 0 {
                    cmd.arg(format!("-join={}", self.gossip(0)));
                }
            }
            Flavor::RumormillLan | Flavor::RumormillTuned => {
                cmd.arg("--data-dir")
                    .arg(self.data.join(self.name(i)))
                    .arg("agent")
                    .arg("--name")
                    .arg(self.name(i))
                    .arg("--bind")
                    .arg(self.gossip(i))
                    .arg("--listen")
                    .arg(self.control(i).to_string())
                    .arg("--key")
                    .arg(&self.key)
                    .env("RUST_LOG", "warn");
                if self.flavor == Flavor::RumormillTuned {
                    cmd.arg("--profile").arg("local");
                }
                if i > 0 {
                    cmd.arg("--seed").arg(self.gossip(0));
                }
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        self.procs[i] = Some(child);
        Ok(())
    }

    /// Whether agent `i` answers on its control port.
    fn ready(&mut self, i: usize) -> bool {
        match self.flavor {
            Flavor::Serf => SerfRpc::connect(self.control(i)).is_ok(),
            _ => {
                if !matches!(
                    http::request(self.control(i), "GET", "/v1/health", None, None),
                    Ok((200, _))
                ) {
                    return false;
                }
                match std::fs::read_to_string(self.data.join(self.name(i)).join("admin-token")) {
                    Ok(t) => {
                        self.tokens[i] = t.trim().to_string();
                        true
                    }
                    Err(_) => false,
                }
            }
        }
    }

    fn wait_ready(&mut self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.ready(i) {
            if let Some(Some(status)) = self.procs[i].as_mut().map(|c| c.try_wait().ok().flatten()) {
                return Err(format!("{} exited ({status}); see {}", self.name(i), self.log(i).display()).into());
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not answer within {limit:?}", self.name(i)).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.name(i)))
    }

    /// Members agent `i` sees alive, or `None` when it does not answer yet.
    fn alive(&mut self, i: usize) -> Option<usize> {
        match self.flavor {
            Flavor::Serf => {
                let members = SerfRpc::connect(self.control(i)).ok()?.members().ok()?;
                Some(members.iter().filter(|(_, s)| s == "alive").count())
            }
            _ => {
                let (status, body) = http::request(
                    self.control(i),
                    "GET",
                    "/v1/overlays/default/members",
                    Some(&self.tokens[i]),
                    None,
                )
                .ok()?;
                if status != 200 {
                    return None;
                }
                let rows: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
                Some(rows.iter().filter(|r| r["state"] == "alive").count())
            }
        }
    }

    /// Starts agent 0, waits until it answers, then starts the others at
    /// once (each joining agent 0) and returns the time from that start
    /// until every agent sees all `n` alive (`None`: not within `limit`).
    pub fn start(&mut self, limit: Duration) -> Result<Option<Duration>> {
        let t0 = self.launch()?;
        self.converge(t0, limit)
    }

    /// Starts agent 0, waits until it answers, then starts the others;
    /// returns when they were started.
    pub fn launch(&mut self) -> Result<Instant> {
        self.spawn(0)?;
        self.wait_ready(0, Duration::from_secs(20))?;
        let t0 = Instant::now();
        for i in 1..self.n {
            self.spawn(i)?;
        }
        Ok(t0)
    }

    /// Waits until every agent sees all `n` alive; returns the time since
    /// `t0`, or `None` when some still do not after `limit` (they are left
    /// to find the rest by themselves; the run goes on).
    pub fn converge(&mut self, t0: Instant, limit: Duration) -> Result<Option<Duration>> {
        let deadline = t0 + limit;
        let mut pending: Vec<usize> = (0..self.n).collect();
        let mut done_at = t0;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                if self.alive(i) == Some(self.n) {
                    done_at = Instant::now();
                } else {
                    still.push(i);
                }
            }
            pending = still;
            if !pending.is_empty() {
                if Instant::now() > deadline {
                    let seen: Vec<String> = pending
                        .iter()
                        .take(5)
                        .map(|&i| format!("{} sees {:?}", self.name(i), self.alive(i)))
                        .collect();
                    eprintln!(
                        "  {} × {}: not converged after {limit:?} ({} agents short: {})",
                        self.flavor.label(),
                        self.n,
                        pending.len(),
                        seen.join(", ")
                    );
                    for i in 0..self.n {
                        self.wait_ready(i, Duration::from_secs(10))?;
                    }
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for i in 0..self.n {
            self.wait_ready(i, Duration::from_secs(10))?;
        }
        Ok(Some(done_at - t0))
    }

    /// Whether every live agent sees every live agent alive.
    pub fn whole(&mut self) -> bool {
        let live: Vec<usize> = (0..self.n).filter(|&i| self.procs[i].is_some()).collect();
        live.iter().all(|&i| self.alive(i) == Some(live.len()))
    }

    /// One thread per agent following its events and failure reports.
    pub fn follow(&self, tx: &Sender<Note>) -> Result<()> {
        for agent in 0..self.n {
            let tx = tx.clone();
            let cluster = self.id;
            let control = self.control(agent);
            if self.flavor == Flavor::Serf {
                let rpc = SerfRpc::connect(control)?;
                std::thread::spawn(move || {
                    let _ = rpc.stream("user,member-failed", |e| {
                        let at = Instant::now();
                        let note = match e {
                            StreamEvent::User { name, payload } if name == TOPIC => match parse_seq(&payload) {
                                Some(seq) => Note::Event { agent, seq, at },
                                None => return true,
                            },
                            StreamEvent::Member { kind, names } if kind == "member-failed" => {
                                return names.into_iter().all(|member| {
                                    tx.send(Note::Failed {
                                        cluster,
                                        agent,
                                        member,
                                        at,
                                    })
                                    .is_ok()
                                });
                            }
                            _ => return true,
                        };
                        tx.send(note).is_ok()
                    });
                });
            } else {
                let token = self.tokens[agent].clone();
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let mut ready = Some(ready_tx);
                    let result = http::follow(control, &token, &format!("{TOPIC},member.failed"), |item| {
                        let at = Instant::now();
                        let note = match item["topic"].as_str() {
                            Some(TOPIC) => match inbox_payload(&item).and_then(|p| parse_seq(&p)) {
                                Some(seq) => Note::Event { agent, seq, at },
                                None => return true,
                            },
                            Some("member.failed") => Note::Failed {
                                cluster,
                                agent,
                                member: item["member"].as_str().unwrap_or_default().to_string(),
                                at,
                            },
                            _ => return true,
                        };
                        tx.send(note).is_ok()
                    });
                    if let Some(r) = ready.take() {
                        let _ = r.send(result.map_err(|e| e.to_string()));
                    }
                });
                // The WebSocket subscribes on connect; an error arrives
                // at once, a working stream stays silent.
                if let Ok(Err(e)) = ready_rx.recv_timeout(Duration::from_millis(300)) {
                    return Err(format!("following {}: {e}", self.name(agent)).into());
                }
            }
        }
        Ok(())
    }

    /// Rumormill: publishes warm-up events until agent 0 knows `n`
    /// subscribers of the topic (subscriptions spread through the store).
    pub fn await_subscribers(&mut self, limit: Duration) -> Result<()> {
        if !self.flavor.is_rumormill() {
            return Ok(());
        }
        let deadline = Instant::now() + limit;
        loop {
            let record = self.post_event(serde_json::json!({
                "topic": TOPIC, "payload": "warm-up", "delivery": {"mode": "at_least_once"}
            }))?;
            let known = record["subscribers"].as_array().map_or(0, Vec::len);
            if known == self.n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("agent 0 knows {known} of {} subscribers after {limit:?}", self.n).into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Rumormill: publishes through agent 0's API; returns its answer.
    fn post_event(&self, body: serde_json::Value) -> Result<serde_json::Value> {
        let answer = http::ok(
            self.control(0),
            "POST",
            "/v1/overlays/default/events",
            Some(&self.tokens[0]),
            Some(&body.to_string()),
        )?;
        Ok(serde_json::from_str(&answer)?)
    }

    /// Publishes event `seq` from agent 0.
    pub fn publish(&mut self, seq: u32, mode: Mode) -> Result<()> {
        match mode {
            Mode::SerfEvent => {
                if self.publisher.is_none() {
                    self.publisher = Some(SerfRpc::connect(self.control(0))?);
                }
                let rpc = self.publisher.as_mut().ok_or("no rpc connection")?;
                rpc.event(TOPIC, &payload(seq))
            }
            Mode::BestEffort | Mode::AtLeastOnce => {
                let delivery = if mode == Mode::BestEffort {
                    "best_effort"
                } else {
                    "at_least_once"
                };
                self.post_event(serde_json::json!({
                    "topic": TOPIC,
                    "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload(seq)),
                    "delivery": {"mode": delivery}
                }))?;
                Ok(())
            }
        }
    }

    /// SIGKILLs agent `i` (keeping its peak RSS).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.procs[i].take() {
            if !self.restarted[i] {
                self.killed_hwm.push(hwm_kib(child.id()).unwrap_or(0));
            }
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts killed agent `i` again, with the same name and data; it
    /// joins agent 0.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.restarted[i] = true;
        self.spawn(i)
    }

    /// Peak RSS (VmHWM, KiB) of every agent that ran the whole run, and of
    /// the killed ones until their kill.
    pub fn peak_rss_kib(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .procs
            .iter()
            .zip(&self.restarted)
            .filter(|(_, r)| !**r)
            .filter_map(|(c, _)| hwm_kib(c.as_ref()?.id()))
            .collect();
        all.extend(&self.killed_hwm);
        all
    }

    /// Kills every agent.
    pub fn stop(&mut self) {
        for c in self.procs.iter_mut() {
            if let Some(mut child) = c.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.publisher = None;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the tuned flavour keeps its data: in memory, named after the
/// run's work directory (the outer process removes both).
pub fn memory_dir(work: &Path) -> PathBuf {
    Path::new("/dev/shm").join(work.file_name().unwrap_or_default())
}

fn hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_number_and_nothing_else_parses() {
        for seq in [0, 1, 100_007, u32::MAX] {
            let p = payload(seq);
            assert_eq!(p.len(), PAYLOAD);
            assert_eq!(parse_seq(&p), Some(seq));
        }
        assert_ne!(payload(1)[4..], payload(2)[4..], "the padding differs per event");
        let mut tampered = payload(5);
        tampered[50] ^= 1;
        assert_eq!(parse_seq(&tampered), None);
        assert_eq!(parse_seq(b"warm-up"), None);
        assert_eq!(parse_seq(&[]), None);
    }

    #[test]
    fn inbox_payloads_come_as_text_or_base64() {
        let p = payload(9);
        let b64 = serde_json::json!({ "payload_base64": base64::engine::general_purpose::STANDARD.encode(&p) });
        assert_eq!(inbox_payload(&b64), Some(p));
        assert_eq!(
            inbox_payload(&serde_json::json!({ "payload": "hi" })),
            Some(b"hi".to_vec())
        );
        assert_eq!(inbox_payload(&serde_json::json!({ "payload_base64": "%%" })), None);
    }
}
