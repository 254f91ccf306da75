//! Helpers shared by the real-process tests (`tests/agents.rs`,
//! `tests/events_agents.rs`): agents started from the built `rumormill`
//! binary on loopback, driven through the command-line client.
//!
//! Every port is picked free (bound on port 0 first), every agent has its own
//! data directory under the target's temporary directory, every child process
//! is killed when its guard drops (also on panic), and every wait is a bounded
//! poll that names what it expected and what it saw last.
//!
//! Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rumormill");
/// Time between two looks at the cluster.
const POLL: Duration = Duration::from_millis(100);
/// Longest a single command-line call may take (the client's own limit is 30 s).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest an agent may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Environment variables the binary reads: cleared so that the host's
/// settings cannot leak into the tests.
const ENV: [&str; 8] = [
    "RUMORMILL_DATA_DIR",
    "RUMORMILL_API",
    "RUMORMILL_TOKEN",
    "RUMORMILL_TOKEN_FILE",
    "RUMORMILL_OVERLAY",
    "RUMORMILL_KEY",
    "RUMORMILL_KEY_FILE",
    "RUST_LOG",
];

// ----- processes -----------------------------------------------------------

pub fn command() -> Command {
    let mut c = Command::new(BIN);
    for v in ENV {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Ran {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}; stdout: {:?}; stderr: {:?}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    /// The one line a failing command printed on standard error, after
    /// checking that it failed with status 1 and printed exactly one line.
    pub fn error_line(&self) -> &str {
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
pub fn run(mut cmd: Command, what: String, timeout: Duration) -> Ran {
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
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn keygen() -> String {
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
/// (then the agents' logs stay there for a look). Its name starts with the
/// test binary's crate name, so that two test files never share one.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{}-{test}-{}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
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
pub fn free_gossip_port() -> u16 {
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
pub fn free_tcp_port() -> u16 {
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

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ----- agents -----------------------------------------------------------------

/// How to reach an agent through the command line (cheap to clone into a
/// traffic thread).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub dir: PathBuf,
    pub api: SocketAddr,
}

impl Endpoint {
    /// `rumormill --api API --data-dir DIR --json ARGS…`.
    pub fn cli(&self, args: &[&str]) -> Ran {
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
    pub fn json(&self, args: &[&str]) -> Value {
        let ran = self.cli(args);
        assert!(ran.status.success(), "{}", ran.describe());
        serde_json::from_str(ran.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", ran.describe()))
    }

    /// Like [`Endpoint::json`], but failures are returned (for polling).
    pub fn try_json(&self, args: &[&str]) -> Result<Value, String> {
        let ran = self.cli(args);
        if !ran.status.success() {
            return Err(ran.describe());
        }
        serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("not JSON ({e}): {}", ran.describe()))
    }

    /// `(name, state, epoch)` of every member this agent knows.
    pub fn members(&self) -> Result<Vec<(String, String, u64)>, String> {
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
    pub fn value(&self, key: &str) -> Result<String, String> {
        let v = self.try_json(&["get", key])?;
        v["value"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: no text value in {v}", self.name))
    }

    /// The `stats` object of the default overlay.
    pub fn stats(&self) -> Value {
        self.json(&["overlays", "show", "default"])["stats"].clone()
    }

    /// `(id, primary)` of every key in the keyring (`keys list`).
    pub fn keyring(&self) -> Vec<(String, bool)> {
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

    pub fn counter(&self, name: &str) -> u64 {
        let stats = self.stats();
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no counter {name} in {stats}", self.name))
    }

    /// This agent's boot epoch in the default overlay.
    pub fn epoch(&self) -> u64 {
        let v = self.json(&["overlays", "show", "default"]);
        v["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no epoch in {v}", self.name))
    }
}

/// One agent process (killed on drop), its ports and data directory.
pub struct Agent {
    pub ep: Endpoint,
    /// Given as `--name`: the directory's name unless launched with
    /// [`Agent::launch_as`].
    member: String,
    pub gossip: SocketAddr,
    /// Given as `--seed` on every start, if any.
    seed: Option<SocketAddr>,
    /// More flags given on every start.
    extra: Vec<String>,
    key: String,
    log: PathBuf,
    child: ChildGuard,
    pub started: Instant,
}

impl Agent {
    /// Starts `node-i`, joining `seed` if given (not waiting for it: see
    /// [`Agent::ready`]).
    pub fn launch(scratch: &Scratch, i: usize, key: &str, seed: Option<SocketAddr>) -> Agent {
        let name = format!("node-{i}");
        Agent::launch_as(scratch, &name, &name, key, seed)
    }

    /// Starts an agent on the data directory `dir` (created if missing)
    /// under the member name `member`.
    pub fn launch_as(scratch: &Scratch, dir: &str, member: &str, key: &str, seed: Option<SocketAddr>) -> Agent {
        let mut agent = Agent::unstarted(scratch, dir, key, seed, loopback(free_gossip_port()), Vec::new());
        member.clone_into(&mut agent.member);
        agent.spawn();
        agent
    }

    /// Starts an agent on the data directory `dir` (also its member
    /// name), gossiping on `gossip`, with `extra` flags on every start.
    pub fn launch_with(
        scratch: &Scratch,
        dir: &str,
        key: &str,
        seed: Option<SocketAddr>,
        gossip: SocketAddr,
        extra: Vec<String>,
    ) -> Agent {
        let mut agent = Agent::unstarted(scratch, dir, key, seed, gossip, extra);
        agent.spawn();
        agent
    }

    fn unstarted(
        scratch: &Scratch,
        dir: &str,
        key: &str,
        seed: Option<SocketAddr>,
        gossip: SocketAddr,
        extra: Vec<String>,
    ) -> Agent {
        let name = dir.to_owned();
        let dir = scratch.path(&name);
        private_dir(&dir);
        Agent {
            ep: Endpoint {
                name: name.clone(),
                dir,
                api: loopback(free_tcp_port()),
            },
            member: name.clone(),
            gossip,
            seed,
            extra,
            key: key.to_owned(),
            log: scratch.path(&format!("{name}.log")),
            child: ChildGuard(None),
            started: Instant::now(),
        }
    }

    /// Starts the process with the agent's data directory and flags (the
    /// same ones on every start).
    pub fn spawn(&mut self) {
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
            .arg(&self.member)
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
        c.args(&self.extra);
        c.stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        self.child.0 = Some(
            c.spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.ep.name)),
        );
        self.started = Instant::now();
    }

    pub fn pid(&self) -> u32 {
        self.child.0.as_ref().expect("running").id()
    }

    /// The end of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the agent answers. A first start that lost its ports to
    /// another process gets new ones (at most three times).
    pub fn ready(&mut self, may_move: bool) {
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
    pub fn kill(&mut self) {
        let mut c = self.child.0.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
    }

    /// Waits up to `timeout` for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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

    /// Sleeps until the agent has been up `least` (it saves the peers it
    /// sees every 5 s: a restart rejoins through them).
    pub fn up_for(&self, least: Duration) {
        let up = self.started.elapsed();
        if up < least {
            thread::sleep(least - up);
        }
    }
}

/// Polls `check` every [`POLL`] until it returns `Ok` or `timeout` passes;
/// then fails naming `what` was expected and what was seen last.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> (T, Duration) {
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
pub fn views_match(
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

/// Creates a data directory the agent accepts: mode 0700.
pub fn private_dir(dir: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .expect("data directory");
}
