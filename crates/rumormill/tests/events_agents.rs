//! Real-process test of events: five agents on loopback, two applications
//! following a topic through `rumormill subscribe`, at-least-once events
//! published while a subscriber agent and then the publisher are SIGKILLed
//! and restarted. Every application must see every event exactly once, and
//! the publisher must end with a `delivered` report per subscriber for each.
//!
//! The helpers are copied from `tests/agents.rs` (integration test files do
//! not share code): every port is picked free (bound on port 0 first), every
//! agent has its own data directory under the target's temporary directory,
//! every child process is killed when its guard drops (also on panic), and
//! every wait is a bounded poll that names what it expected and what it saw
//! last.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rumormill");
/// Time between two looks at the cluster.
const POLL: Duration = Duration::from_millis(100);
/// Longest a single command-line call may take (the client's own limit is 30 s).
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest an agent may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Environment variables the binary reads: cleared so that the host's
/// settings cannot leak into the tests.
const ENV: [&str; 6] = [
    "RUMORMILL_DATA_DIR",
    "RUMORMILL_API",
    "RUMORMILL_TOKEN",
    "RUMORMILL_OVERLAY",
    "RUMORMILL_KEY",
    "RUST_LOG",
];
/// The applications' topic.
const TOPIC: &str = "orders";
/// Events published by the test (`e0` … `e29`).
const EVENTS: usize = 30;
/// The publisher's resend interval.
const RETRY_EVERY: &str = "500ms";
/// The subscribers, by member name.
const SUBSCRIBERS: [&str; 2] = ["node-4", "node-5"];

// ----- processes -----------------------------------------------------------

fn command() -> Command {
    let mut c = Command::new(BIN);
    for v in ENV {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// What a finished command printed.
#[derive(Debug)]
struct Ran {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn describe(&self) -> String {
        format!(
            "`{}` exited with {}; stdout: {:?}; stderr: {:?}",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to its end, killing it (and failing) after `timeout`.
fn run(mut cmd: Command, what: String, timeout: Duration) -> Ran {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard(Some(
        cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{what}`: {e}")),
    ));
    let c = child.0.as_mut().expect("just spawned");
    let mut out_pipe = c.stdout.take().expect("piped");
    let mut err_pipe = c.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = c.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > timeout {
            drop(child); // kills it
            panic!("`{what}` did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    child.0 = None;
    Ran {
        what,
        status,
        stdout: out.join().expect("reader"),
        stderr: err.join().expect("reader"),
    }
}

/// Kills and reaps a child process when dropped.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn keygen() -> String {
    let ran = run(
        {
            let mut c = command();
            c.arg("keygen");
            c
        },
        "rumormill keygen".into(),
        CLI_TIMEOUT,
    );
    assert!(ran.status.success(), "{}", ran.describe());
    let key = ran.stdout.trim().to_owned();
    assert!(
        rumormill::config::decode_key(&key).is_ok(),
        "keygen printed {key:?}, not a base64 key"
    );
    key
}

// ----- scratch space and ports ------------------------------------------------

/// A fresh directory for one test, removed at the end unless the test failed
/// (then the agents' logs stay there for a look).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("events-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("agents' data directories and logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Ports handed out in this process, so two agents never get the same one.
fn claim(port: u16) -> bool {
    static CLAIMED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut set = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    set.get_or_insert_with(HashSet::new).insert(port)
}

/// A port free for both UDP and TCP on 127.0.0.1 (the gossip port).
fn free_gossip_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP on 127.0.0.1:0");
        let port = udp.local_addr().expect("local addr").port();
        let tcp_ok = TcpListener::bind(("127.0.0.1", port)).is_ok();
        drop(udp);
        if tcp_ok && claim(port) {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1 after 100 tries");
}

/// A free TCP port on 127.0.0.1 (the API port).
fn free_tcp_port() -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind TCP on 127.0.0.1:0")
            .port();
        if claim(port) {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 after 100 tries");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ----- agents -----------------------------------------------------------------

/// How to reach an agent through the command line.
#[derive(Debug, Clone)]
struct Endpoint {
    name: String,
    dir: PathBuf,
    api: SocketAddr,
}

impl Endpoint {
    /// `rumormill --api API --data-dir DIR --json ARGS…`.
    fn cli(&self, args: &[&str]) -> Ran {
        let mut c = command();
        c.arg("--api")
            .arg(self.api.to_string())
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--json")
            .args(args);
        run(
            c,
            format!("{} ({}): rumormill {}", self.name, self.api, args.join(" ")),
            CLI_TIMEOUT,
        )
    }

    /// Runs a client command that must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Value {
        let ran = self.cli(args);
        assert!(ran.status.success(), "{}", ran.describe());
        serde_json::from_str(ran.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", ran.describe()))
    }

    /// Like [`Endpoint::json`], but failures are returned (for polling).
    fn try_json(&self, args: &[&str]) -> Result<Value, String> {
        let ran = self.cli(args);
        if !ran.status.success() {
            return Err(ran.describe());
        }
        serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("not JSON ({e}): {}", ran.describe()))
    }

    /// `(name, state, epoch)` of every member this agent knows.
    fn members(&self) -> Result<Vec<(String, String, u64)>, String> {
        let v = self.try_json(&["members"])?;
        let rows = v
            .as_array()
            .ok_or_else(|| format!("{}: members is not an array: {v}", self.name))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("?").to_owned(),
                    r["state"].as_str().unwrap_or("?").to_owned(),
                    r["epoch"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    }

    /// This agent's boot epoch in the default overlay.
    fn epoch(&self) -> u64 {
        let v = self.json(&["overlays", "show", "default"]);
        v["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no epoch in {v}", self.name))
    }

    /// Publishes an at-least-once event on [`TOPIC`]; returns the record
    /// `publish` printed.
    fn publish(&self, payload: &str) -> Value {
        let v = self.json(&[
            "publish",
            TOPIC,
            payload,
            "--at-least-once",
            "--retry-every",
            RETRY_EVERY,
        ]);
        assert!(
            v["id"].is_string(),
            "{}: publish {payload} printed no id: {v}",
            self.name
        );
        assert_eq!(
            v["delivery"], "at_least_once",
            "{}: publish {payload} answered {v}",
            self.name
        );
        v
    }
}

/// The member names a publish record or event record lists as subscribers.
fn subscriber_names(record: &Value) -> Vec<String> {
    record["subscribers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["member"].as_str().map(str::to_owned))
        .collect()
}

/// Whether a record lists exactly node-4 and node-5 as subscribers.
fn lists_both(record: &Value) -> bool {
    let mut names = subscriber_names(record);
    names.sort();
    names == SUBSCRIBERS
}

/// One agent process (killed on drop), its ports and data directory.
struct Agent {
    ep: Endpoint,
    gossip: SocketAddr,
    seed: Option<SocketAddr>,
    key: String,
    log: PathBuf,
    child: ChildGuard,
    started: Instant,
}

impl Agent {
    /// Starts `node-i` (not waiting for it: see [`Agent::ready`]).
    fn launch(scratch: &Scratch, i: usize, key: &str, seed: Option<SocketAddr>) -> Agent {
        let name = format!("node-{i}");
        let dir = scratch.path(&name);
        std::fs::create_dir_all(&dir).expect("data directory");
        let mut agent = Agent {
            ep: Endpoint {
                name: name.clone(),
                dir,
                api: loopback(free_tcp_port()),
            },
            gossip: loopback(free_gossip_port()),
            seed,
            key: key.to_owned(),
            log: scratch.path(&format!("{name}.log")),
            child: ChildGuard(None),
            started: Instant::now(),
        };
        agent.spawn();
        agent
    }

    /// Starts the process with the agent's data directory and flags (the
    /// same ones on every start).
    fn spawn(&mut self) {
        assert!(self.child.0.is_none(), "{} is already running", self.ep.name);
        // A SIGKILLed agent leaves its address file behind: readiness is
        // the new process writing it again.
        let _ = std::fs::remove_file(self.ep.dir.join("agent.json"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut c = command();
        c.arg("agent")
            .arg("--data-dir")
            .arg(&self.ep.dir)
            .arg("--name")
            .arg(&self.ep.name)
            .arg("--profile")
            .arg("local")
            .arg("--key")
            .arg(&self.key)
            .arg("--bind")
            .arg(self.gossip.to_string())
            .arg("--listen")
            .arg(self.ep.api.to_string());
        if let Some(seed) = self.seed {
            c.arg("--seed").arg(seed.to_string());
        }
        c.stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        self.child.0 = Some(
            c.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.ep.name)),
        );
        self.started = Instant::now();
    }

    /// The end of the agent's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the agent answers. A first start that lost its ports to
    /// another process gets new ones (at most three times).
    fn ready(&mut self, may_move: bool) {
        for attempt in 0..3 {
            match self.wait_ready() {
                Ok(()) => return,
                Err(why) if may_move && attempt < 2 && why.contains("cannot listen") => {
                    self.ep.api = loopback(free_tcp_port());
                    self.gossip = loopback(free_gossip_port());
                    self.spawn();
                }
                Err(why) => panic!("{} did not start: {why}", self.ep.name),
            }
        }
        panic!("{} did not start after three tries", self.ep.name);
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let address_file = self.ep.dir.join("agent.json");
        let expected = self.ep.api.to_string();
        let start = Instant::now();
        loop {
            let child = self.child.0.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child.0 = None;
                return Err(format!("it exited with {status}; log:\n{}", self.log_tail()));
            }
            let written = std::fs::read_to_string(&address_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["api"] == expected.as_str());
            if written {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "no {} naming {expected} after {START_TIMEOUT:?}; log:\n{}",
                    address_file.display(),
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let mut c = self.child.0.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
    }

    /// Sleeps until the agent has been up `least` (it saves the peers it
    /// sees every 5 s: a restart rejoins through them).
    fn up_for(&self, least: Duration) {
        let up = self.started.elapsed();
        if up < least {
            thread::sleep(least - up);
        }
    }
}

/// Polls `check` every [`POLL`] until it returns `Ok` or `timeout` passes;
/// then fails naming `what` was expected and what was seen last.
fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        let seen = match check() {
            Ok(v) => return (v, start.elapsed()),
            Err(seen) => seen,
        };
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last seen: {seen}"
        );
        thread::sleep(POLL);
    }
}

/// Checks that every one of `observers` sees each of `expected` in the given
/// state (and, with `min_epoch`, at least that boot epoch).
fn views_match(
    observers: &[&Endpoint],
    expected: &[(&str, &str)],
    min_epoch: Option<(&str, u64)>,
) -> Result<(), String> {
    for ep in observers {
        let members = ep.members().map_err(|e| format!("{}: {e}", ep.name))?;
        for (name, state) in expected {
            let row = members.iter().find(|(n, _, _)| n == name);
            let ok =
                row.is_some_and(|(_, s, e)| s == state && min_epoch.is_none_or(|(who, min)| who != *name || *e >= min));
            if !ok {
                return Err(format!("{} sees {:?}", ep.name, members));
            }
        }
    }
    Ok(())
}

// ----- applications -------------------------------------------------------------

/// One application: a `rumormill subscribe orders --from N` process whose
/// JSON lines are collected by a reader thread (killed on drop).
struct App {
    label: String,
    child: ChildGuard,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl App {
    fn start(ep: &Endpoint, label: &str, from: u64) -> App {
        let mut c = command();
        c.arg("--api")
            .arg(ep.api.to_string())
            .arg("--data-dir")
            .arg(&ep.dir)
            .args(["subscribe", TOPIC, "--from", &from.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}'s `rumormill subscribe`: {e}"));
        let out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (l, s) = (lines.clone(), stderr.clone());
        let readers = vec![
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }),
            thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                s.lock().unwrap_or_else(|e| e.into_inner()).push_str(&text);
            }),
        ];
        App {
            label: label.to_owned(),
            child: ChildGuard(Some(child)),
            lines,
            stderr,
            readers,
        }
    }

    /// The entries printed so far, parsed.
    fn items(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        lines
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{} printed a line that is not JSON ({e}): {l:?}", self.label))
            })
            .collect()
    }

    /// The payloads printed so far.
    fn payloads(&self) -> Vec<String> {
        self.items()
            .iter()
            .map(|v| v["payload"].as_str().unwrap_or("<no payload>").to_owned())
            .collect()
    }

    /// The last inbox sequence number printed (0 if none).
    fn last_seq(&self) -> u64 {
        self.items().last().map_or(0, |v| {
            v["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: entry without seq: {v}", self.label))
        })
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fails if the process is no longer running.
    fn assert_running(&mut self) {
        let c = self.child.0.as_mut().expect("running");
        if let Some(status) = c.try_wait().expect("try_wait") {
            panic!(
                "{} exited with {status}; stderr: {:?}; printed {} lines",
                self.label,
                self.stderr(),
                self.lines.lock().map(|l| l.len()).unwrap_or(0)
            );
        }
    }

    /// Waits up to `timeout` for the process to exit on its own, then for
    /// its readers to have every line.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let status = loop {
            let c = self.child.0.as_mut().expect("running");
            if let Some(status) = c.try_wait().expect("try_wait") {
                self.child.0 = None;
                break status;
            }
            assert!(
                start.elapsed() < timeout,
                "{} still running {timeout:?} after its agent was killed",
                self.label
            );
            thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            r.join().expect("reader thread");
        }
        status
    }
}

/// `payload → times seen` over some applications' entries; also checks that
/// each entry is on [`TOPIC`], names the id its payload was published
/// under, and that sequence numbers only grow.
fn tally(apps: &[&App], ids: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut last_seq = 0;
    for app in apps {
        for v in app.items() {
            assert_eq!(
                v["topic"], TOPIC,
                "{} printed an entry of another topic: {v}",
                app.label
            );
            let seq = v["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: entry without seq: {v}", app.label));
            assert!(
                seq > last_seq,
                "{}: seq {seq} after {last_seq} (sequence numbers must grow, across reconnections too): {v}",
                app.label
            );
            last_seq = seq;
            let payload = v["payload"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: entry without text payload: {v}", app.label));
            if let Some(id) = ids.get(payload) {
                assert_eq!(
                    v["id"].as_str(),
                    Some(id.as_str()),
                    "{}: {payload} arrived under another id than publish printed: {v}",
                    app.label
                );
            }
            *counts.entry(payload.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Node 5: its agent and its applications (one per connection).
struct Node5 {
    agent: Agent,
    apps: Vec<App>,
    /// When the agent was killed, and the last seq its application printed.
    down: Option<(Instant, u64)>,
    /// Epoch of the restarted agent.
    new_epoch: Option<u64>,
}

impl Node5 {
    /// Restarts the agent once it has been down `after`, then connects a new
    /// application from the last seq the previous one printed.
    fn restart_if_due(&mut self, after: Duration) {
        let Some((killed, last)) = self.down else { return };
        if killed.elapsed() < after {
            return;
        }
        self.agent.spawn();
        self.agent.ready(false);
        let epoch = self.agent.ep.epoch();
        eprintln!(
            "node-5 restarted {:?} after the kill (epoch {epoch}); application #2 follows from seq {last}",
            killed.elapsed()
        );
        self.apps
            .push(App::start(&self.agent.ep, "node-5's application #2", last));
        self.down = None;
        self.new_epoch = Some(epoch);
    }

    fn app_refs(&self) -> Vec<&App> {
        self.apps.iter().collect()
    }
}

/// Publishes at-least-once probes from `publisher` until one lists both
/// subscribers, then waits for its reports; returns every probe published
/// (payload, id).
fn probe(publisher: &Endpoint, tag: &str) -> (Vec<(String, String)>, String) {
    let mut probes = Vec::new();
    let (good, took) = wait_until(
        &format!("{} to publish a probe ({tag}) listing both subscribers", publisher.name),
        Duration::from_secs(30),
        || {
            let payload = format!("probe-{tag}-{}", probes.len());
            let v = publisher.publish(&payload);
            let id = v["id"].as_str().expect("id").to_owned();
            probes.push((payload.clone(), id.clone()));
            if lists_both(&v) {
                Ok(payload)
            } else {
                Err(v.to_string())
            }
        },
    );
    eprintln!(
        "probe {good} ({tag}) listed both subscribers after {} probe(s), {took:?}",
        probes.len()
    );
    let id = probes.last().expect("a probe").1.clone();
    let (record, took) = wait_until(
        &format!("the reports of probe {good} ({id}) to say delivered to both"),
        Duration::from_secs(15),
        || {
            let r = publisher.try_json(&["event", &id])?;
            let delivered = r["complete"] == true
                && r["subscribers"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|s| s["outcome"] == "delivered"))
                && lists_both(&r);
            if delivered { Ok(r) } else { Err(r.to_string()) }
        },
    );
    eprintln!("probe {good} delivered to both {took:?} later: {record}");
    (probes, good)
}

// ----- the test -------------------------------------------------------------------

#[test]
fn at_least_once_events_survive_subscriber_and_publisher_crashes() {
    let t0 = Instant::now();
    let scratch = Scratch::new("crashes");
    let key = keygen();

    // 1. Five agents; 2-5 join through node 1.
    let mut node1 = Agent::launch(&scratch, 1, &key, None);
    node1.ready(true);
    let seed = Some(node1.gossip);
    let mut others: Vec<Agent> = (2..=5).map(|i| Agent::launch(&scratch, i, &key, seed)).collect();
    for a in &mut others {
        a.ready(true);
    }
    let node5_agent = others.pop().expect("node 5");
    let mut eps: Vec<Endpoint> = vec![node1.ep.clone()];
    eps.extend(others.iter().map(|a| a.ep.clone()));
    eps.push(node5_agent.ep.clone());
    let all: Vec<&Endpoint> = eps.iter().collect();
    let names: Vec<String> = eps.iter().map(|e| e.name.clone()).collect();
    let all_alive: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "alive")).collect();
    let ((), took) = wait_until("every agent to see 5 members alive", Duration::from_secs(15), || {
        views_match(&all, &all_alive, None)
    });
    eprintln!(
        "5 agents answering and converged {:?} after the start ({took:?} waiting)",
        t0.elapsed()
    );
    let (ep1, ep4) = (eps[0].clone(), eps[3].clone());

    // 2. Two applications from seq 0, on node 4 and node 5.
    let mut app4 = App::start(&ep4, "node-4's application", 0);
    let mut node5 = Node5 {
        apps: vec![App::start(&node5_agent.ep, "node-5's application #1", 0)],
        agent: node5_agent,
        down: None,
        new_epoch: None,
    };
    for ep in [&eps[3], &eps[4]] {
        wait_until(
            &format!("{} to list the subscription {TOPIC:?}", ep.name),
            Duration::from_secs(10),
            || {
                let v = ep.try_json(&["subscriptions"])?;
                let listed = v.as_array().is_some_and(|t| t.iter().any(|t| t == TOPIC));
                if listed { Ok(()) } else { Err(v.to_string()) }
            },
        );
    }
    let (mut probes, first_probe) = probe(&ep1, "start");
    wait_until(
        &format!("both applications to print {first_probe}"),
        Duration::from_secs(10),
        || {
            app4.assert_running();
            node5.apps[0].assert_running();
            let (a, b) = (app4.payloads(), node5.apps[0].payloads());
            if a.contains(&first_probe) && b.contains(&first_probe) {
                Ok(())
            } else {
                Err(format!("node-4's application: {a:?}; node-5's: {b:?}"))
            }
        },
    );
    eprintln!(
        "applications connected and receiving {:?} after the start",
        t0.elapsed()
    );
    // Both agents that will be killed have saved the peers they see (every
    // 5 s): their restarts rejoin through them.
    node1.up_for(Duration::from_secs(6));
    node5.agent.up_for(Duration::from_secs(6));

    // 3 and 4. Thirty events, one every ~100 ms; node 5 killed after the
    // 10th, the publisher killed after the 20th (back ~1 s later); node 5
    // back ~2 s after its kill, but not before the publisher's kill (so that
    // e10-e19 are pending for it when the publisher dies).
    let mut published: Vec<(String, String)> = Vec::new();
    let publishing = Instant::now();
    let mut publisher_down = Duration::ZERO;
    for i in 0..EVENTS {
        if i == 20 {
            node1.kill();
            let killed = Instant::now();
            eprintln!("node-1 (the publisher) SIGKILLed after e19");
            while killed.elapsed() < Duration::from_secs(1) {
                node5.restart_if_due(Duration::from_secs(2));
                thread::sleep(Duration::from_millis(20));
            }
            node1.spawn();
            node1.ready(false);
            publisher_down = killed.elapsed();
            let epoch1 = node1.ep.epoch();
            eprintln!("node-1 restarted {publisher_down:?} after the kill (epoch {epoch1})");
            // Node 5 was down from before e10 until after the kill: the
            // restarted publisher holds e10-e19 as pending for node-5 (and
            // must resume them: nobody else can deliver them now).
            let mut incomplete = 0;
            for (payload, id) in &published {
                let r = ep1.json(&["event", id]);
                if r["complete"] != true {
                    incomplete += 1;
                }
                let n: usize = payload[1..].parse().expect("e<n>");
                if n >= 10 {
                    let node5_pending = r["subscribers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|s| s["member"] == "node-5" && s["outcome"] == "pending");
                    assert!(
                        node5_pending && r["complete"] == false,
                        "the restarted publisher must hold {payload} ({id}) as pending for node-5: {r}"
                    );
                }
            }
            eprintln!("the restarted publisher holds {incomplete} of e0-e19 as incomplete (to resume)");
            // Node 5 is back before the rest is published.
            while node5.down.is_some() {
                node5.restart_if_due(Duration::from_secs(2));
                thread::sleep(Duration::from_millis(20));
            }
            let epoch5 = node5.new_epoch.expect("node 5 restarted");
            let ((), took) = wait_until(
                &format!("the restarted node-1 to see 5 members alive, node-5 at epoch {epoch5}"),
                Duration::from_secs(15),
                || views_match(&[&ep1], &all_alive, Some(("node-5", epoch5))),
            );
            eprintln!("the restarted node-1 sees all five alive {took:?} after answering");
            // The restarted publisher's replicated store starts empty: it
            // learns the subscriptions again by rumor (a member that re-put
            // its topics recently) or at its first anti-entropy exchange
            // (every 10 s, random phase). Until then an event published is
            // promised to nobody (`complete`, no subscribers): wait until it
            // knows both again before publishing the rest.
            let (more, _) = probe(&ep1, "restart");
            probes.extend(more);
        }
        let payload = format!("e{i}");
        let v = ep1.publish(&payload);
        assert!(
            lists_both(&v),
            "{payload} must be published to node-4 and node-5 (both subscribe, both live in node-1's view): {v}"
        );
        published.push((payload, v["id"].as_str().expect("id").to_owned()));
        thread::sleep(Duration::from_millis(100));
        if i == 9 {
            node5.agent.kill();
            let killed = Instant::now();
            let status = node5.apps[0].wait_exit(Duration::from_secs(10));
            let last = node5.apps[0].last_seq();
            eprintln!(
                "node-5 SIGKILLed after e9; its application exited ({status}, {:?}) {:?} later, last seq printed {last}, payloads {:?}",
                node5.apps[0].stderr().trim(),
                killed.elapsed(),
                node5.apps[0].payloads()
            );
            node5.down = Some((killed, last));
        }
    }
    assert!(node5.down.is_none(), "node 5 was restarted");
    eprintln!(
        "{EVENTS} events published in {:?} (publisher down {publisher_down:?}): {:?}",
        publishing.elapsed(),
        published.iter().map(|(p, id)| format!("{p}={id}")).collect::<Vec<_>>()
    );
    let ids: BTreeMap<String, String> = published.iter().chain(&probes).cloned().collect();
    assert_eq!(ids.len(), published.len() + probes.len(), "payloads are distinct");
    let distinct_ids: HashSet<&String> = ids.values().collect();
    assert_eq!(
        distinct_ids.len(),
        ids.len(),
        "every publish printed its own id: {ids:?}"
    );

    // 5. Both applications get all thirty, each once.
    let wanted: Vec<&str> = published.iter().map(|(p, _)| p.as_str()).collect();
    let check_apps = |app4: &App, node5: &Node5| -> Result<(), String> {
        let apps: [(&str, Vec<&App>); 2] = [("node-4", vec![app4]), ("node-5", node5.app_refs())];
        for (who, apps) in apps {
            let counts = tally(&apps, &ids);
            let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "{who}'s application saw payloads more than once: {twice:?}"
            );
            let missing: Vec<&&str> = wanted.iter().filter(|p| !counts.contains_key(**p)).collect();
            if !missing.is_empty() {
                return Err(format!("{who}'s application misses {missing:?}"));
            }
            let unexpected: Vec<&String> = counts.keys().filter(|p| !ids.contains_key(*p)).collect();
            assert!(
                unexpected.is_empty(),
                "{who}'s application saw unknown payloads {unexpected:?}"
            );
        }
        Ok(())
    };
    let ((), took) = wait_until(
        "both applications to have all 30 events",
        Duration::from_secs(30),
        || {
            app4.assert_running();
            node5.apps.last_mut().expect("app").assert_running();
            check_apps(&app4, &node5)
        },
    );
    eprintln!("both applications had all {EVENTS} events {took:?} after the last publish");

    // 6. Every report final, `delivered` by both, events published before
    // the publisher's restart included (same ids).
    let mut open: Vec<(String, String)> = published.clone();
    let mut attempts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let ((), took) = wait_until(
        "node-1's reports of every event to be complete, delivered to node-4 and node-5",
        Duration::from_secs(30),
        || {
            let mut last = String::new();
            let mut still = Vec::new();
            for (payload, id) in open.drain(..) {
                let r = ep1.try_json(&["event", &id]).map_err(|e| format!("{payload}: {e}"))?;
                assert!(
                    subscriber_names(&r).iter().all(|n| SUBSCRIBERS.contains(&n.as_str())),
                    "{payload} ({id}) reports other subscribers than node-4 and node-5: {r}"
                );
                if let Some(bad) = r["subscribers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["outcome"] != "pending" && s["outcome"] != "delivered")
                {
                    panic!("{payload} ({id}): a final report other than delivered: {bad}; record {r}");
                }
                let done = r["complete"] == true && lists_both(&r);
                if done {
                    let a = r["subscribers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| s["attempts"].as_u64().unwrap_or(0))
                        .collect();
                    attempts.insert(payload, a);
                } else {
                    last = format!("{payload}: {r}");
                    still.push((payload, id));
                }
            }
            open = still;
            if open.is_empty() {
                Ok(())
            } else {
                Err(format!("{} event(s) not complete, e.g. {last}", open.len()))
            }
        },
    );
    eprintln!("every report complete and delivered {took:?} after the applications had all events");
    eprintln!(
        "attempts (node-4, node-5): {:?}",
        published
            .iter()
            .map(|(p, _)| format!("{p}:{:?}", attempts[p]))
            .collect::<Vec<_>>()
    );

    // Nothing resent is handed out again: the applications still have each
    // event once, a moment after the last resend stopped.
    thread::sleep(Duration::from_millis(1500));
    check_apps(&app4, &node5).unwrap_or_else(|e| panic!("after the reports: {e}"));
    let (n4, n5a, n5b) = (
        app4.items().len(),
        node5.apps[0].items().len(),
        node5.apps[1].items().len(),
    );
    eprintln!(
        "entries printed: node-4 {n4}; node-5 {n5a} + {n5b} (second from seq {}); probes {}",
        node5.apps[1]
            .items()
            .first()
            .map_or(0, |v| v["seq"].as_u64().unwrap_or(0)),
        probes.len()
    );
    eprintln!(
        "at_least_once_events_survive_subscriber_and_publisher_crashes took {:?}",
        t0.elapsed()
    );
}
