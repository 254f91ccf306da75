//! Real-process tests: agents started from the built `rumormill` binary on
//! loopback, driven through the command-line client.
//!
//! Every port is picked free (bound on port 0 first), every agent has its own
//! data directory under the target's temporary directory, every child process
//! is killed when its guard drops (also on panic), and every wait is a bounded
//! poll that names what it expected and what it saw last.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rumormill_wire::{Codec, FrameKind, Keyring, Security};
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

    /// The one line a failing command printed on standard error, after
    /// checking that it failed with status 1 and printed exactly one line.
    fn error_line(&self) -> &str {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit status 1: {}",
            self.describe()
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {}", self.describe());
        assert!(!self.stderr.contains("panicked"), "{}", self.describe());
        lines[0]
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
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agents-{test}-{}", std::process::id()));
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

/// How to reach an agent through the command line (cheap to clone into a
/// traffic thread).
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

    /// `name → (state, epoch)` of every member this agent knows.
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

    /// The value under `key`, if this agent has one.
    fn value(&self, key: &str) -> Result<String, String> {
        let v = self.try_json(&["get", key])?;
        v["value"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: no text value in {v}", self.name))
    }

    /// The `stats` object of the default overlay.
    fn stats(&self) -> Value {
        self.json(&["overlays", "show", "default"])["stats"].clone()
    }

    /// `(id, primary)` of every key in the keyring (`keys list`).
    fn keyring(&self) -> Vec<(String, bool)> {
        let v = self.json(&["keys", "list"]);
        let rows = v
            .as_array()
            .unwrap_or_else(|| panic!("{}: keys list is not an array: {v}", self.name));
        rows.iter()
            .map(|r| {
                let id = r["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: key without id: {v}", self.name));
                (id.to_owned(), r["primary"] == true)
            })
            .collect()
    }

    fn counter(&self, name: &str) -> u64 {
        let stats = self.stats();
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no counter {name} in {stats}", self.name))
    }
}

/// One agent process (killed on drop), its ports and data directory.
struct Agent {
    ep: Endpoint,
    gossip: SocketAddr,
    key: String,
    log: PathBuf,
    child: ChildGuard,
    started: Instant,
}

impl Agent {
    /// Starts `node-i` (not waiting for it: see [`Agent::ready`]).
    fn launch(scratch: &Scratch, i: usize, key: &str) -> Agent {
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
            key: key.to_owned(),
            log: scratch.path(&format!("{name}.log")),
            child: ChildGuard(None),
            started: Instant::now(),
        };
        agent.spawn();
        agent
    }

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
            .arg(self.ep.api.to_string())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        self.child.0 = Some(
            c.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.ep.name)),
        );
        self.started = Instant::now();
    }

    fn pid(&self) -> u32 {
        self.child.0.as_ref().expect("running").id()
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

    /// Waits up to `timeout` for the agent to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            let c = self.child.0.as_mut().expect("running");
            if let Some(status) = c.try_wait().expect("try_wait") {
                self.child.0 = None;
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "{} still running {timeout:?} after SIGTERM; log:\n{}",
                self.ep.name,
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `n` agents sharing `key` and waits until each answers.
fn start_agents(scratch: &Scratch, n: usize, key: &str) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (1..=n).map(|i| Agent::launch(scratch, i, key)).collect();
    for a in &mut agents {
        a.ready(true);
    }
    agents
}

/// Joins agents 2… to agent 1's gossip address through the command line.
fn join_all_to_first(agents: &[Agent]) {
    let seed = agents[0].gossip.to_string();
    for a in &agents[1..] {
        let v = a.ep.json(&["join", &seed]);
        assert_eq!(v["ok"], true, "join on {}: {v}", a.ep.name);
        assert_eq!(v["message"], "joining 1 address(es)", "join on {}: {v}", a.ep.name);
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

// ----- the tests ------------------------------------------------------------

#[test]
fn five_agents_cluster_lifecycle() {
    let t0 = Instant::now();
    let scratch = Scratch::new("lifecycle");
    let key = keygen();
    let mut agents = start_agents(&scratch, 5, &key);
    let names: Vec<String> = agents.iter().map(|a| a.ep.name.clone()).collect();
    let all_alive: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "alive")).collect();
    eprintln!("5 agents answering after {:?}", t0.elapsed());

    // Join by the command line; every agent must see five alive members.
    join_all_to_first(&agents);
    let eps: Vec<Endpoint> = agents.iter().map(|a| a.ep.clone()).collect();
    let all: Vec<&Endpoint> = eps.iter().collect();
    let ((), took) = wait_until("every agent to see 5 members alive", Duration::from_secs(10), || {
        views_match(&all, &all_alive, None)
    });
    eprintln!("membership converged {took:?} after the joins");

    // A value written on node 3 reaches everyone.
    let v = eps[2].json(&["put", "greeting", "hello from node-3"]);
    assert_eq!(
        (&v["key"], &v["value"], &v["origin"]),
        (&"greeting".into(), &"hello from node-3".into(), &"node-3".into()),
        "put answer: {v}"
    );
    let ((), took) = wait_until(
        "every agent to read greeting = \"hello from node-3\"",
        Duration::from_secs(10),
        || {
            for ep in &eps {
                match ep.value("greeting") {
                    Ok(v) if v == "hello from node-3" => {}
                    other => return Err(format!("{}: {other:?}", ep.name)),
                }
            }
            Ok(())
        },
    );
    eprintln!("value spread to all five in {took:?}");

    // Node 5 saves the peers it sees every 5 s: let it save them once, so
    // that its restart can rejoin through them.
    let up = agents[4].started.elapsed();
    if up < Duration::from_secs(6) {
        thread::sleep(Duration::from_secs(6) - up);
    }
    let old_epoch = eps[4].json(&["overlays", "show", "default"])["epoch"]
        .as_u64()
        .expect("epoch");

    // SIGKILL node 5: the others must declare it failed.
    agents[4].kill();
    let killed = Instant::now();
    let others: Vec<&Endpoint> = eps[..4].iter().collect();
    let ((), detect) = wait_until("nodes 1-4 to see node-5 failed", Duration::from_secs(20), || {
        views_match(&others, &[("node-5", "failed")], None)
    });
    eprintln!("node-5 SIGKILLed: all four saw it failed after {detect:?}");
    assert!(
        views_match(&others, &all_alive[..4], None).is_ok(),
        "nodes 1-4 must stay alive"
    );

    // Restart node 5 with the same data directory and flags: it comes back
    // with a new boot epoch.
    agents[4].spawn();
    agents[4].ready(false);
    let restarted = Instant::now();
    let ((), rejoin) = wait_until(
        &format!("all five to see node-5 alive with an epoch above {old_epoch}"),
        Duration::from_secs(15),
        || views_match(&all, &all_alive, Some(("node-5", old_epoch + 1))),
    );
    eprintln!(
        "node-5 restarted {:?} after the kill; all five saw it alive again {rejoin:?} later",
        restarted - killed
    );
    // It also got the value written while it was up, from its data or peers.
    wait_until(
        "node-5 to read greeting after its restart",
        Duration::from_secs(10),
        || {
            eps[4]
                .value("greeting")
                .and_then(|v| if v == "hello from node-3" { Ok(()) } else { Err(v) })
        },
    );

    // Key rotation while values are written every ~100 ms.
    let old_id = match eps[0].keyring().as_slice() {
        [(id, true)] => id.clone(),
        other => panic!("node-1 must start with one primary key, has {other:?}"),
    };
    for ep in &eps {
        assert_eq!(
            ep.keyring(),
            [(old_id.clone(), true)],
            "keyring of {} before the rotation",
            ep.name
        );
    }
    let traffic = Traffic::start(eps.clone());
    thread::sleep(Duration::from_millis(500));
    let new_key = keygen();
    let rotation = Instant::now();
    // Key operations apply to every member: each step is taken on a
    // different agent, and each answers once all five have followed.
    let installed = eps[0].json(&["keys", "install", &new_key]);
    let new_id = installed["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {installed}"))
        .to_owned();
    assert_ne!(new_id, old_id);
    assert_eq!(
        installed["done"].as_array().map(Vec::len),
        Some(5),
        "install answered {installed}"
    );
    let used = eps[1].json(&["keys", "use", &new_id]);
    assert_eq!(used["done"].as_array().map(Vec::len), Some(5), "use answered {used}");
    let removed = eps[2].json(&["keys", "remove", &old_id]);
    assert_eq!(
        removed["done"].as_array().map(Vec::len),
        Some(5),
        "remove answered {removed}"
    );
    assert_eq!(removed["missing"], serde_json::json!([]), "remove answered {removed}");
    let rotated = Instant::now();
    eprintln!("key rotation on 5 agents took {:?}", rotated - rotation);
    for ep in &eps {
        assert_eq!(
            ep.keyring(),
            [(new_id.clone(), true)],
            "keyring of {} after the rotation",
            ep.name
        );
    }

    // From now on nothing may be rejected: nobody seals with the old key.
    thread::sleep(Duration::from_secs(2));
    let before: Vec<Value> = eps.iter().map(Endpoint::stats).collect();
    let puts_before = traffic.count();
    thread::sleep(Duration::from_secs(5));
    let after: Vec<Value> = eps.iter().map(Endpoint::stats).collect();
    let puts_during = traffic.count() - puts_before;
    let written = traffic.stop();
    assert!(
        puts_during >= 20,
        "traffic must flow during the check: only {puts_during} puts in 5 s"
    );
    for ((ep, b), a) in eps.iter().zip(&before).zip(&after) {
        assert_eq!(
            a["rejected"], b["rejected"],
            "{} rejected packets after the rotation completed: before {b}, after {a}",
            ep.name
        );
    }
    eprintln!(
        "rejected counters 2 s after the rotation: {:?}; unchanged 5 s later with {puts_during} puts",
        before.iter().map(|s| s["rejected"].clone()).collect::<Vec<_>>()
    );
    assert!(
        views_match(&all, &all_alive, None).is_ok(),
        "all five alive after the rotation"
    );
    let ((), took) = wait_until(
        "the last value written on each node to reach all five",
        Duration::from_secs(10),
        || {
            for (key, value) in &written {
                for ep in &eps {
                    match ep.value(key) {
                        Ok(v) if &v == value => {}
                        other => return Err(format!("{} {key}: {other:?}, expected {value:?}", ep.name)),
                    }
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "last writes ({} keys) everywhere {took:?} after the traffic stopped",
        written.len()
    );

    // The old key is really gone from the running overlay: a packet sealed
    // with it is now rejected.
    let rejected = eps[0].counter("rejected");
    let old_key = rumormill::config::decode_key(&key).expect("key");
    let mut stale = Codec::new(
        rumormill_wire::overlay_id("default"),
        0x01d_5eed,
        1,
        Security::Encrypted(Keyring::new(&old_key).expect("keyring")),
    );
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    udp.send_to(
        &stale.seal(FrameKind::Datagram, b"old").expect("seal"),
        agents[0].gossip,
    )
    .expect("send");
    let expected = format!("unknown key id 0x{old_id}");
    wait_until(
        &format!("node-1 to reject a packet sealed with the removed key ({expected})"),
        Duration::from_secs(5),
        || {
            let s = eps[0].stats();
            if s["rejected"].as_u64() == Some(rejected + 1) && s["last_rejection"] == expected.as_str() {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );

    // The rotated keyring survives a restart, even one given the old key
    // again on the command line.
    agents[1].kill();
    agents[1].spawn();
    agents[1].ready(false);
    assert_eq!(
        eps[1].keyring(),
        [(new_id.clone(), true)],
        "keyring of node-2 after its restart"
    );
    let epoch2 = eps[1].json(&["overlays", "show", "default"])["epoch"]
        .as_u64()
        .expect("epoch");
    let ((), took) = wait_until(
        &format!("all five to see node-2 alive with epoch {epoch2}"),
        Duration::from_secs(15),
        || views_match(&all, &all_alive, Some(("node-2", epoch2))),
    );
    eprintln!("node-2 restarted after the rotation: all five saw it alive again {took:?} after it answered");
    eprintln!("five_agents_cluster_lifecycle took {:?}", t0.elapsed());
}

/// The last value written under each key.
type Written = Vec<(String, String)>;

/// A thread writing `traffic/node-i = v<n>` on node `n % 5` every ~100 ms.
struct Traffic {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<Result<Written, String>>>,
}

impl Traffic {
    /// At most this many writes (about 40 s): the thread ends by itself.
    const MAX_PUTS: u64 = 400;

    fn start(eps: Vec<Endpoint>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = thread::spawn(move || {
            let mut last: Vec<Option<String>> = vec![None; eps.len()];
            for n in 0..Traffic::MAX_PUTS {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let i = n as usize % eps.len();
                let key = format!("traffic/{}", eps[i].name);
                let value = format!("v{n}");
                let ran = eps[i].cli(&["put", &key, &value]);
                if !ran.status.success() {
                    return Err(ran.describe());
                }
                last[i] = Some(value);
                c.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
            Ok(eps
                .iter()
                .zip(last)
                .filter_map(|(ep, v)| Some((format!("traffic/{}", ep.name), v?)))
                .collect())
        });
        Traffic {
            stop,
            count,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the writes; returns the last value written under each key.
    fn stop(mut self) -> Written {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.thread.take().expect("running").join().expect("traffic thread");
        result.unwrap_or_else(|e| panic!("a put failed during the rotation: {e}"))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sigterm_leaves_gracefully() {
    let scratch = Scratch::new("sigterm");
    let key = keygen();
    let mut agents = start_agents(&scratch, 3, &key);
    join_all_to_first(&agents);
    let eps: Vec<Endpoint> = agents.iter().map(|a| a.ep.clone()).collect();
    let all: Vec<&Endpoint> = eps.iter().collect();
    let expected = [("node-1", "alive"), ("node-2", "alive"), ("node-3", "alive")];
    wait_until("every agent to see 3 members alive", Duration::from_secs(10), || {
        views_match(&all, &expected, None)
    });

    let pid = agents[2].pid().to_string();
    let ran = run(
        {
            let mut c = Command::new("kill");
            c.arg("-TERM").arg(&pid);
            c
        },
        format!("kill -TERM {pid}"),
        CLI_TIMEOUT,
    );
    assert!(ran.status.success(), "{}", ran.describe());
    let sent = Instant::now();
    let status = agents[2].wait_exit(Duration::from_secs(10));
    let exited = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "node-3 must exit with status 0 on SIGTERM; log:\n{}",
        agents[2].log_tail()
    );
    assert!(
        !eps[2].dir.join("agent.json").exists(),
        "a graceful stop removes the address file"
    );
    eprintln!("node-3 exited with status 0 {exited:?} after SIGTERM");

    let others = [&eps[0], &eps[1]];
    let seen_left = |what: &str| -> Result<(), String> {
        for ep in others {
            let members = ep.members()?;
            match members.iter().find(|(n, _, _)| n == "node-3") {
                Some((_, s, _)) if s == "left" => {}
                Some((_, s, _)) if s == "failed" => {
                    panic!("{} sees node-3 failed, not left ({what}): {members:?}", ep.name)
                }
                _ => return Err(format!("{} sees {members:?}", ep.name)),
            }
        }
        Ok(())
    };
    let ((), took) = wait_until("nodes 1 and 2 to see node-3 left", Duration::from_secs(10), || {
        seen_left("while waiting")
    });
    eprintln!(
        "nodes 1 and 2 saw node-3 left {:?} after SIGTERM ({took:?} after it exited)",
        sent.elapsed()
    );
    // It stays left: the failure detector does not turn it into `failed`
    // (its suspicion timeout is about 4 s in the local profile).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        seen_left("afterwards").unwrap_or_else(|e| panic!("node-3 no longer left: {e}"));
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        views_match(&others, &expected[..2], None).is_ok(),
        "nodes 1 and 2 alive"
    );
}

#[test]
fn malformed_config_files_are_named_in_one_line() {
    let scratch = Scratch::new("config");
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "unknown-field.toml",
            "bogus = 1\n",
            &["TOML parse error at line 1, column 1", "unknown field `bogus`"],
        ),
        (
            "syntax.toml",
            "[[overlay]\nname = \"a\"\n",
            &["TOML parse error at line 1", "unclosed array table"],
        ),
        (
            "unknown-overlay-field.toml",
            "[[overlay]]\nname = \"a\"\nplaintext = true\nbind = \"127.0.0.1:0\"\nprobe = 3\n",
            &["TOML parse error at line 5, column 1", "unknown field `probe`"],
        ),
        (
            "short-key.toml",
            "[[overlay]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nkeys = [\"c2hvcnQ=\"]\n",
            &[],
        ),
    ];
    for (file, text, needles) in cases {
        let path = scratch.path(file);
        std::fs::write(&path, text).expect("config file");
        let mut c = command();
        // Should a file be accepted by mistake, the agent stays on loopback.
        c.arg("agent")
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(scratch.path("data"))
            .arg("--listen")
            .arg("127.0.0.1:0");
        let ran = run(c, format!("rumormill agent --config {file}"), Duration::from_secs(10));
        let line = ran.error_line();
        eprintln!("{file}: {line}");
        if needles.is_empty() {
            assert_eq!(
                line,
                format!(
                    "rumormill: overlay \"a\": a key has 5 bytes; it must have 16, 24 or 32 (in {})",
                    path.display()
                ),
                "{}",
                ran.describe()
            );
        } else {
            let prefix = format!("rumormill: invalid config: {}: ", path.display());
            assert!(
                line.starts_with(&prefix),
                "expected {prefix:?} first: {}",
                ran.describe()
            );
            for needle in needles {
                assert!(line.contains(needle), "expected {needle:?}: {}", ran.describe());
            }
        }
    }
    let missing = scratch.path("missing.toml");
    let mut c = command();
    c.arg("agent").arg("--config").arg(&missing);
    let ran = run(
        c,
        "rumormill agent --config missing.toml".into(),
        Duration::from_secs(10),
    );
    assert_eq!(
        ran.error_line(),
        format!(
            "rumormill: cannot read config file {}: No such file or directory (os error 2)",
            missing.display()
        ),
    );
}

#[test]
fn client_errors_name_the_problem() {
    let scratch = Scratch::new("client-errors");
    let key = keygen();
    let agents = start_agents(&scratch, 1, &key);
    let ep = &agents[0].ep;
    let api = ep.api.to_string();
    let client = |args: &[&str], dir: &Path| {
        let mut c = command();
        c.arg("--api").arg(&api).arg("--data-dir").arg(dir).args(args);
        run(c, format!("rumormill {}", args.join(" ")), CLI_TIMEOUT)
    };

    let ran = client(&["--overlay", "nope", "members"], &ep.dir);
    assert_eq!(ran.error_line(), "rumormill: no overlay named \"nope\" (HTTP 404)");

    let ran = client(&["--token", "wrong", "put", "k", "v"], &ep.dir);
    assert_eq!(
        ran.error_line(),
        "rumormill: wrong admin token (HTTP 401; give --token, or --data-dir of that agent)"
    );

    let empty = scratch.path("no-token");
    std::fs::create_dir_all(&empty).expect("directory");
    let ran = client(&["put", "k", "v"], &empty);
    assert_eq!(
        ran.error_line(),
        "rumormill: this request needs the admin token: send `Authorization: Bearer <token>` \
         (the token is in the agent's data directory, file admin-token) (HTTP 401; give --token, or --data-dir of that agent)"
    );

    // Neither write went through; reads need no token.
    let ran = client(&["get", "k"], &empty);
    assert_eq!(ran.error_line(), "rumormill: no value under key \"k\" (HTTP 404)");
    // The right token, from the agent's data directory, works.
    let ran = client(&["put", "k", "v"], &ep.dir);
    assert!(ran.status.success(), "{}", ran.describe());
    let ran = client(&["get", "k"], &empty);
    assert_eq!(ran.stdout, "v\n", "{}", ran.describe());
}

#[test]
fn foreign_and_garbage_packets_are_rejected_and_counted() {
    let scratch = Scratch::new("garbage");
    let key = keygen();
    let agents = start_agents(&scratch, 2, &key);
    join_all_to_first(&agents);
    let (a, b) = (&agents[0].ep, &agents[1].ep);
    let target = agents[0].gossip;
    let both = [a, b];
    let alive = [("node-1", "alive"), ("node-2", "alive")];
    wait_until("both agents to see 2 members alive", Duration::from_secs(10), || {
        views_match(&both, &alive, None)
    });
    let rejected_before = a.counter("rejected");
    let stream_errors_before = a.counter("stream_errors");

    let overlay = rumormill_wire::overlay_id("default");
    let mut rng = XorShift::seeded();
    let foreign_key: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
    let mut foreign = Codec::new(
        overlay,
        0xdead_beef,
        1,
        Security::Encrypted(Keyring::new(&foreign_key).expect("keyring")),
    );
    let cluster_key = rumormill::config::decode_key(&key).expect("key");
    let mut insider = Codec::new(
        overlay,
        0xfeed_f00d,
        1,
        Security::Encrypted(Keyring::new(&cluster_key).expect("keyring")),
    );

    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let mut sent = 0u64;
    // (a) random bytes (never starting with the magic `RM`).
    for len in [1usize, 20, 36, 60, 500] {
        let mut junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        junk[0] = b'x';
        udp.send_to(&junk, target).expect("send");
        sent += 1;
    }
    // (b) sealed with the cluster's key, then altered in transit.
    for _ in 0..3 {
        let mut p = insider.seal(FrameKind::Datagram, b"forged").expect("seal");
        let last = p.len() - 1;
        p[last] ^= 0x01;
        udp.send_to(&p, target).expect("send");
        sent += 1;
    }
    // (c) sealed with a key the cluster does not have.
    for _ in 0..5 {
        let p = foreign.seal(FrameKind::Datagram, b"let me in").expect("seal");
        udp.send_to(&p, target).expect("send");
        sent += 1;
    }
    let foreign_id = format!("unknown key id {:#010x}", rumormill_wire::key_id(&foreign_key));
    let (stats, took) = wait_until(
        &format!("node-1's rejected counter to grow by {sent} from {rejected_before}"),
        Duration::from_secs(5),
        || {
            let s = a.stats();
            if s["rejected"].as_u64().unwrap_or(0) >= rejected_before + sent {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    eprintln!("{sent} bad datagrams counted in {took:?}: {stats}");
    assert_eq!(
        stats["last_rejection"].as_str(),
        Some(foreign_id.as_str()),
        "the last datagram was sealed with a foreign key: {stats}"
    );

    // Garbage on the TCP port: a well-framed frame of junk, a frame sealed
    // with a foreign key, and bytes whose length prefix is absurd.
    let frames = [
        rumormill_wire::encode_frame(&[0xab; 64]),
        rumormill_wire::encode_frame(&foreign.seal(FrameKind::Stream, b"let me in").expect("seal")),
        vec![0xff; 16],
    ];
    for bytes in frames {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).expect("connect to the gossip port");
        s.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        s.write_all(&bytes).expect("write");
        let _ = s.shutdown(Shutdown::Write);
        // The agent closes its side once it has read everything.
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let _ = s.read(&mut [0u8; 16]);
    }
    let (stats, _) = wait_until(
        "node-1 to count 2 rejected stream frames and 1 stream error",
        Duration::from_secs(5),
        || {
            let s = a.stats();
            let ok = s["rejected"].as_u64().unwrap_or(0) >= rejected_before + sent + 2
                && s["stream_errors"].as_u64().unwrap_or(0) > stream_errors_before;
            if ok { Ok(s) } else { Err(s.to_string()) }
        },
    );
    eprintln!("after TCP garbage: {stats}");
    assert!(
        stats["last_rejection"].as_str().is_some_and(|r| !r.is_empty()),
        "last_rejection is set: {stats}"
    );

    // The agent still answers and its cluster still works.
    assert!(views_match(&both, &alive, None).is_ok(), "both still alive");
    let v = a.json(&["put", "after-garbage", "still here"]);
    assert_eq!(v["value"], "still here", "{v}");
    wait_until("node-2 to read after-garbage", Duration::from_secs(10), || {
        match b.value("after-garbage") {
            Ok(v) if v == "still here" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(views_match(&both, &alive, None).is_ok(), "both still alive");
}

/// Cheap pseudo-random bytes (no `rand` in the tests).
struct XorShift(u64);

impl XorShift {
    fn seeded() -> XorShift {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        XorShift(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
