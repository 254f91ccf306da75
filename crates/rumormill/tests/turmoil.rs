//! The real agent ([`rumormill::agent::Agent`]: its database, driver, seed
//! loop and the core) on turmoil's simulated network.
//!
//! Every simulated host runs `Agent::start(TurmoilNet { .. }, config)` with
//! its own data directory on the real file system and one encrypted overlay
//! (a shared key, LAN timings, advertising its turmoil address); a
//! turmoil client host plays the operator: it waits for conditions with
//! bounded simulated time, cuts and repairs links, and asks the test's main
//! loop to crash or restart hosts (only the `Sim` can do that). Failures are
//! returned as errors that name the condition and what the hosts saw.
//!
//! Timings are printed: `cargo test -p rumormill --test turmoil -- --nocapture`;
//! with `RM_TURMOIL_TRACE=1` also what is still missing, every 5 simulated
//! seconds of a wait.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rumormill::agent::{Agent, MemberRow, UpdateRow};
use rumormill::config::{AgentConfig, OverlaySpec, Profile};
use rumormill::transport::{Datagrams, Listener, Net};
use rumormill_core::Notification;
use tokio::time::Instant;

/// Gossip port of every host.
const PORT: u16 = 7950;
/// The overlay every host runs.
const OVERLAY: &str = "default";
/// How often the client looks at the agents.
const POLL: Duration = Duration::from_millis(100);
/// Simulated time step.
const TICK: Duration = Duration::from_millis(10);
/// Upper bound of a whole simulation (each test bounds its own phases).
const SIM_LIMIT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// The transport: turmoil's sockets behind rumormill's `Net`.

/// turmoil's simulated network.
#[derive(Debug, Clone, Copy, Default)]
struct TurmoilNet {
    /// Share of outgoing datagrams silently dropped (on top of what turmoil's
    /// links do), TCP left reliable.
    udp_loss: f64,
}

/// A simulated UDP socket (newtype: both the trait and the type are foreign).
struct SimUdp {
    socket: turmoil::net::UdpSocket,
    loss: f64,
    /// splitmix64 state, for the loss.
    rng: AtomicU64,
}

impl SimUdp {
    fn lose(&self) -> bool {
        if self.loss <= 0.0 {
            return false;
        }
        let mut z = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.loss
    }
}

/// A simulated TCP listener.
struct SimListener(turmoil::net::TcpListener);

impl Datagrams for SimUdp {
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        if self.lose() {
            return Ok(buf.len());
        }
        self.socket.send_to(buf, to).await
    }
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        self.socket.recv_from(buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send {
        self.0.accept()
    }
}

impl Net for TurmoilNet {
    type Udp = SimUdp;
    type Listener = SimListener;
    type Stream = turmoil::net::TcpStream;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<SimUdp> {
        let socket = turmoil::net::UdpSocket::bind(addr).await?;
        Ok(SimUdp {
            socket,
            loss: self.udp_loss,
            rng: AtomicU64::new(rand::random()),
        })
    }
    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<SimListener> {
        turmoil::net::TcpListener::bind(addr).await.map(SimListener)
    }
    async fn connect(&self, _from: std::net::IpAddr, addr: SocketAddr) -> io::Result<turmoil::net::TcpStream> {
        turmoil::net::TcpStream::connect(addr).await
    }
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(turmoil::net::lookup_host((host, port)).await?.collect())
    }
}

// ---------------------------------------------------------------------------
// The cluster: hosts running agents, a client driving the scenario.

type SimAgent = Agent<TurmoilNet>;

/// The running agents by host name. Weak: a crashed host's agent (and its
/// database lock) must go away with the host's runtime.
type Registry = Arc<Mutex<BTreeMap<String, Weak<SimAgent>>>>;

/// A membership change one host saw.
#[derive(Debug, Clone)]
struct Change {
    /// Simulated time.
    at: Duration,
    observer: String,
    member: String,
    /// The change, incarnation and epoch.
    what: String,
}

/// Every membership change, in order.
type Log = Arc<Mutex<Vec<Change>>>;

/// What the client asks the main loop to do to a host.
#[derive(Debug)]
enum Action {
    Crash(String),
    Bounce(String),
}

/// The member lists, by the host that reported them.
type Views = BTreeMap<String, Vec<MemberRow>>;

/// What the client works with.
#[derive(Clone)]
struct Ctx {
    test: &'static str,
    names: Vec<String>,
    agents: Registry,
    log: Log,
    actions: Arc<Mutex<Vec<Action>>>,
}

impl Ctx {
    fn agent(&self, host: &str) -> Option<Arc<SimAgent>> {
        self.agents.lock().unwrap().get(host).and_then(Weak::upgrade)
    }

    /// Every running agent's member list, asked of all at once (each
    /// answer takes a simulation step or two).
    async fn views(&self) -> Views {
        let mut asks = tokio::task::JoinSet::new();
        for name in &self.names {
            let Some(agent) = self.agent(name) else { continue };
            let name = name.clone();
            asks.spawn(async move { (name, agent.members(OVERLAY).await) });
        }
        let mut views = Views::new();
        while let Some(answer) = asks.join_next().await {
            if let Ok((name, Ok(rows))) = answer {
                views.insert(name, rows);
            }
        }
        views
    }

    /// `key`'s value on every running agent (`None`: not there).
    async fn values(&self, key: &str) -> BTreeMap<String, Option<UpdateRow>> {
        let mut asks = tokio::task::JoinSet::new();
        for name in &self.names {
            let Some(agent) = self.agent(name) else { continue };
            let (name, key) = (name.clone(), key.to_owned());
            asks.spawn(async move { (name, agent.get(OVERLAY, &key).await.ok()) });
        }
        let mut values = BTreeMap::new();
        while let Some(answer) = asks.join_next().await {
            if let Ok((name, row)) = answer {
                values.insert(name, row);
            }
        }
        values
    }

    /// Calls `check` every [`POLL`] until it succeeds; fails after `limit`
    /// of simulated time with its last complaint. Returns the value and the
    /// simulated time it took.
    async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> Result<(T, Duration), String> {
        let start = Instant::now();
        let trace = std::env::var_os("RM_TURMOIL_TRACE").is_some();
        let mut traced = Duration::ZERO;
        loop {
            let outcome = check().await;
            let took = start.elapsed();
            match outcome {
                Ok(v) => {
                    println!("{}: {what}: after {:.2}s simulated", self.test, took.as_secs_f64());
                    return Ok((v, took));
                }
                Err(why) if took >= limit => {
                    return Err(format!(
                        "{}: {what}: not reached within {limit:?} of simulated time: {why}",
                        self.test
                    ));
                }
                Err(why) => {
                    if trace && took >= traced + Duration::from_secs(5) {
                        traced = took;
                        println!("{}: {what}: at {:.1}s: {why}", self.test, took.as_secs_f64());
                    }
                    tokio::time::sleep(POLL).await
                }
            }
        }
    }

    /// Waits until each of `hosts` sees exactly `hosts`, all alive.
    async fn wait_all_alive(&self, what: &str, hosts: &[String], limit: Duration) -> Result<Duration, String> {
        let (_, took) = self
            .wait_for(what, limit, async || {
                expect_states(&self.views().await, hosts, hosts, &[])
            })
            .await?;
        Ok(took)
    }

    /// The boot epoch `host`'s agent runs.
    async fn local_epoch(&self, host: &str) -> Result<u64, String> {
        let agent = self.agent(host).ok_or(format!("{host} has no agent"))?;
        let summary = agent.overlay(OVERLAY).await.map_err(|e| format!("{host}: {e}"))?;
        Ok(summary.epoch)
    }

    /// Why `observer` might see `member` wrongly: the membership changes
    /// about either of them, seen anywhere, one a line; their counters; what
    /// each lists.
    async fn diagnose(&self, observer: &str, member: &str) -> String {
        let mut out: String = self
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.member == member || c.member == observer)
            .map(|c| {
                format!(
                    "\n  {:>8.3}s {} sees {} {}",
                    c.at.as_secs_f64(),
                    c.observer,
                    c.member,
                    c.what
                )
            })
            .collect();
        for host in [observer, member] {
            let Some(agent) = self.agent(host) else { continue };
            if let Ok(summary) = agent.overlay(OVERLAY).await {
                out += &format!("\n  {host} counters: {:?}", summary.stats);
            }
            if let Ok(rows) = agent.members(OVERLAY).await {
                let rows: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{}={}/{}", r.name, r.state, r.incarnation))
                    .collect();
                out += &format!("\n  {host} lists {rows:?}");
            }
        }
        out
    }

    /// The membership changes logged so far whose kind is one of `kinds`.
    fn changes(&self, kinds: &[&str]) -> Vec<Change> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| kinds.iter().any(|k| c.what.starts_with(&format!("{k} "))))
            .cloned()
            .collect()
    }

    fn crash(&self, host: &str) {
        self.actions.lock().unwrap().push(Action::Crash(host.to_owned()));
    }

    fn bounce(&self, host: &str) {
        self.actions.lock().unwrap().push(Action::Bounce(host.to_owned()));
    }
}

/// Checks that each of `observers` has a member list naming exactly
/// `alive ∪ failed`, with `alive` alive and `failed` failed; otherwise says
/// what the first observer that disagrees sees.
fn expect_states(views: &Views, observers: &[String], alive: &[String], failed: &[String]) -> Result<(), String> {
    for observer in observers {
        let Some(rows) = views.get(observer) else {
            return Err(format!("{observer} has no running agent"));
        };
        let mut wrong = Vec::new();
        let mut seen = BTreeSet::new();
        for row in rows {
            seen.insert(row.name.clone());
            let want = if alive.contains(&row.name) {
                "alive"
            } else if failed.contains(&row.name) {
                "failed"
            } else {
                "(unknown to the test)"
            };
            if row.state != want {
                wrong.push(format!("{}={} (want {want})", row.name, row.state));
            }
        }
        let missing: Vec<&String> = alive.iter().chain(failed).filter(|n| !seen.contains(*n)).collect();
        if !wrong.is_empty() || !missing.is_empty() {
            return Err(format!(
                "{observer} lists {} members; missing {missing:?}; in the wrong state {wrong:?}",
                rows.len()
            ));
        }
    }
    Ok(())
}

/// Checks that every observer (`member` included) sees `member` with boot
/// epoch `epoch`.
fn expect_epoch(views: &Views, member: &str, epoch: u64) -> Result<(), String> {
    for (observer, rows) in views {
        match rows.iter().find(|r| r.name == member) {
            Some(row) if row.epoch == epoch => {}
            Some(row) => {
                return Err(format!(
                    "{observer} sees {member} with epoch {}, want {epoch}",
                    row.epoch
                ));
            }
            None => return Err(format!("{observer} does not list {member}")),
        }
    }
    Ok(())
}

/// `(observer, member)` for every member an observer sees in
/// `state`.
fn members_in_state(views: &Views, state: &str) -> Vec<(String, String)> {
    views
        .iter()
        .flat_map(|(observer, rows)| {
            rows.iter()
                .filter(|r| r.state == state)
                .map(|r| (observer.clone(), r.name.clone()))
        })
        .collect()
}

/// Removes the test's data directories, also when it fails.
struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn host_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("h{i:02}")).collect()
}

/// Runs `hosts` agents (host 0 is every other host's seed; `udp_loss` of
/// their datagrams dropped) and the scenario `client` until the client
/// returns; panics with its error.
fn run_cluster<F, Fut>(
    test: &'static str,
    hosts: usize,
    udp_loss: f64,
    configure: impl FnOnce(&mut turmoil::Builder),
    client: F,
) where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<(), String>> + 'static,
{
    let wall = std::time::Instant::now();
    // Declared before the simulation so that it is dropped after it (the
    // agents hold their databases open until then).
    let dir = DataDir(std::env::temp_dir().join(format!("rm-turmoil-{test}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let key = rumormill::config::generate_key();
    let names = host_names(hosts);
    let agents: Registry = Arc::default();
    let log: Log = Arc::default();
    let actions: Arc<Mutex<Vec<Action>>> = Arc::default();

    let mut builder = turmoil::Builder::new();
    builder.simulation_duration(SIM_LIMIT).tick_duration(TICK);
    configure(&mut builder);
    let mut sim = builder.build();

    for (i, host) in names.iter().enumerate() {
        let agents = agents.clone();
        let log = log.clone();
        let name = host.clone();
        let key = key.clone();
        let data_dir = dir.0.join(&name);
        let seed = (i != 0).then(|| names[0].clone());
        sim.host(host.as_str(), move || {
            let agents = agents.clone();
            let log = log.clone();
            let name = name.clone();
            let key = key.clone();
            let data_dir = data_dir.clone();
            let seed = seed.clone();
            async move {
                let ip = turmoil::lookup(name.as_str());
                let mut spec = OverlaySpec::named(OVERLAY);
                spec.bind = format!("0.0.0.0:{PORT}");
                spec.advertise = Some(SocketAddr::new(ip, PORT).to_string());
                spec.member = Some(name.clone());
                spec.profile = Profile::Lan;
                spec.keys = vec![key];
                if let Some(seed) = seed {
                    spec.seeds = vec![SocketAddr::new(turmoil::lookup(seed.as_str()), PORT).to_string()];
                }
                let config = AgentConfig {
                    data_dir,
                    overlays: vec![spec],
                    ..AgentConfig::default()
                };
                let agent = Agent::start(TurmoilNet { udp_loss }, config).await?;
                let mut events = agent.handle(OVERLAY).await?.subscribe();
                agents.lock().unwrap().insert(name.clone(), Arc::downgrade(&agent));
                // Record membership changes for failure messages.
                tokio::spawn(async move {
                    while let Ok(event) = events.recv().await {
                        if let Notification::Member { change, member } = event {
                            let at = turmoil::sim_elapsed().unwrap_or_default();
                            let what = format!("{change:?} inc={} epoch={}", member.incarnation, member.epoch);
                            log.lock().unwrap().push(Change {
                                at,
                                observer: name.clone(),
                                member: member.name.to_string(),
                                what,
                            });
                        }
                    }
                });
                std::future::pending::<()>().await;
                drop(agent);
                Ok(())
            }
        });
    }

    let ctx = Ctx {
        test,
        names,
        agents,
        log,
        actions: actions.clone(),
    };
    let scenario = client(ctx);
    sim.client("operator", async move { scenario.await.map_err(Into::into) });

    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => panic!("{e}"),
        }
        let pending: Vec<Action> = actions.lock().unwrap().drain(..).collect();
        for action in pending {
            match action {
                Action::Crash(host) => sim.crash(host.as_str()),
                Action::Bounce(host) => sim.bounce(host.as_str()),
            }
        }
    }
    println!(
        "{test}: {hosts} hosts, {:.1}s simulated in {:.2?} of wall time",
        sim.elapsed().as_secs_f64(),
        wall.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The tests.

/// 30 hosts join through host 0; all see all alive; a value written on one
/// host is read on every host; nobody was ever suspected.
#[test]
fn join_converges() {
    run_cluster(
        "join_converges",
        30,
        0.0,
        |_| {},
        async |ctx: Ctx| {
            let all = ctx.names.clone();
            ctx.wait_all_alive("all 30 see all 30 alive", &all, Duration::from_secs(60))
                .await?;

            let writer = "h07";
            let value = format!("hello from {writer}");
            let agent = ctx.agent(writer).ok_or("h07 has no agent")?;
            let put = agent
                .put(OVERLAY, "greeting", value.clone().into_bytes())
                .await
                .map_err(|e| format!("put on {writer} failed: {e}"))?;
            drop(agent);
            if put.origin != writer {
                return Err(format!("put on {writer} reports origin {:?}", put.origin));
            }
            ctx.wait_for("every host reads the value", Duration::from_secs(30), async || {
                let values = ctx.values("greeting").await;
                let mut missing: Vec<&String> = ctx.names.iter().filter(|n| !values.contains_key(*n)).collect();
                for (name, row) in &values {
                    match row {
                        Some(row) if row.value.as_deref() == Some(value.as_str()) && row.origin == writer => {}
                        Some(row) => return Err(format!("{name} reads {row:?}, want {value:?} from {writer}")),
                        None => missing.push(name),
                    }
                }
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} hosts lack it: {missing:?}", missing.len()))
                }
            })
            .await?;
            expect_states(&ctx.views().await, &all, &all, &[])?;
            // A lossless network: nobody was ever suspected.
            let suspicions = ctx.changes(&["Suspect", "Failed"]);
            if suspicions.is_empty() {
                Ok(())
            } else {
                Err(format!("suspicions on a lossless network: {suspicions:#?}"))
            }
        },
    );
}

/// 20 hosts split 10/10: each half marks the other failed; after the
/// repair the periodic reconnection to failed members heals the overlay.
#[test]
fn partition_heals() {
    run_cluster(
        "partition_heals",
        20,
        0.0,
        |_| {},
        async |ctx: Ctx| {
            let all = ctx.names.clone();
            let (left, right) = all.split_at(all.len() / 2);
            ctx.wait_all_alive("all 20 alive", &all, Duration::from_secs(60))
                .await?;

            for a in left {
                for b in right {
                    turmoil::partition(a.as_str(), b.as_str());
                }
            }
            ctx.wait_for(
                "each half sees the other failed",
                Duration::from_secs(120),
                async || {
                    let views = ctx.views().await;
                    expect_states(&views, left, left, right)?;
                    expect_states(&views, right, right, left)
                },
            )
            .await?;

            for a in left {
                for b in right {
                    turmoil::repair(a.as_str(), b.as_str());
                }
            }
            ctx.wait_all_alive("all 20 alive again after the repair", &all, Duration::from_secs(120))
                .await?;
            Ok(())
        },
    );
}

/// 20 hosts, every link losing about 10% of all messages: turmoil breaks a
/// link on 10% of sends, dropping that message (and whatever is in flight
/// on the link) and mends it on the next send. TCP segments are lost the
/// same way and turmoil does not retransmit them, so a join (a full-state
/// exchange each way over TCP) often fails and is retried every
/// `reconnect_interval` (10s): joining takes 10s to 2min, so it gets 5min.
///
/// The overlay converges, a value spreads, and once every host has joined no
/// host sees another failed for 60 simulated seconds. While joining, a host
/// whose own join exchange was lost knows only a member or two (learnt from
/// gossip on acks) while nobody knows it; with so small a view the core
/// uses the minimum suspicion timeout (4s, no confirmations expected) and
/// has no one to ask for indirect probes, so two lost pings make it declare
/// a healthy member failed. Those (rare: 2 runs in about 270) are counted
/// and printed, not failed on; a `failed` seen by a host that lists all 20
/// members fails the test. `udp_loss_10_percent` has no such excuse.
#[test]
fn loss_10_percent() {
    run_cluster(
        "loss_10_percent",
        20,
        0.0,
        |b| {
            b.fail_rate(0.1).repair_rate(1.0);
        },
        async |ctx: Ctx| lossy(ctx, true).await,
    );
}

/// 20 hosts; 10% of datagrams are dropped at random, TCP is reliable (as
/// real TCP is). Joins succeed at once, so here any `failed`, at any time,
/// is a false positive and fails the test.
#[test]
fn udp_loss_10_percent() {
    run_cluster(
        "udp_loss_10_percent",
        20,
        0.1,
        |_| {},
        async |ctx: Ctx| lossy(ctx, false).await,
    );
}

/// The lossy scenarios: converge, spread a value, 60s without a failure.
/// With `excuse_half_joined`, a `failed` seen by a host whose member list
/// is incomplete (its join was lost) is counted, not an error.
async fn lossy(ctx: Ctx, excuse_half_joined: bool) -> Result<(), String> {
    let all = ctx.names.clone();
    let begin = Instant::now();
    let (mut samples, mut suspect_samples) = (0usize, 0usize);
    let false_positive: RefCell<Option<String>> = RefCell::new(None);
    let excused: RefCell<BTreeSet<(String, String)>> = RefCell::default();
    // Every look at the views also watches for false positives: no host
    // goes down in these tests, so a `failed` is one.
    let mut look = async || -> Views {
        let views = ctx.views().await;
        samples += 1;
        suspect_samples += usize::from(!members_in_state(&views, "suspect").is_empty());
        for (observer, member) in members_in_state(&views, "failed") {
            let pair = (observer.clone(), member.clone());
            if false_positive.borrow().is_some() || excused.borrow().contains(&pair) {
                continue;
            }
            let at = begin.elapsed().as_secs_f64();
            let why = ctx.diagnose(&observer, &member).await;
            let half_joined = views.get(&observer).is_some_and(|rows| rows.len() < all.len());
            if excuse_half_joined && half_joined {
                println!(
                    "{}: at {at:.2}s, {observer} (not fully joined) sees {member} failed:{why}",
                    ctx.test
                );
                excused.borrow_mut().insert(pair);
            } else {
                *false_positive.borrow_mut() = Some(format!(
                    "false positive at {at:.2}s simulated: {observer} sees {member} failed; \
                     what happened to {observer} and {member}:{why}"
                ));
            }
        }
        views
    };
    let check = |when: &str| match false_positive.borrow().as_ref() {
        Some(e) => Err(format!("{}: {when}: {e}", ctx.test)),
        None => Ok(()),
    };

    ctx.wait_for("all 20 alive under 10% loss", Duration::from_secs(300), async || {
        expect_states(&look().await, &all, &all, &[])
    })
    .await?;
    check("while joining")?;

    let agent = ctx.agent("h05").ok_or("h05 has no agent")?;
    agent
        .put(OVERLAY, "lossy", b"still arrives".to_vec())
        .await
        .map_err(|e| e.to_string())?;
    drop(agent);

    let window = Instant::now();
    let mut spread = None;
    while window.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(POLL).await;
        let views = look().await;
        check("after convergence")?;
        let listed = views.values().map(Vec::len).min().unwrap_or(0);
        if views.len() != all.len() || listed != all.len() {
            return Err(format!(
                "{}: after convergence, at {:.2}s of the 60s window, a host lost a member: {:?}",
                ctx.test,
                window.elapsed().as_secs_f64(),
                expect_states(&views, &all, &all, &[])
            ));
        }
        if spread.is_none() {
            let values = ctx.values("lossy").await;
            if values.len() == all.len() && values.values().all(Option::is_some) {
                spread = Some(window.elapsed());
            }
        }
    }
    let spread = spread.ok_or(format!("{}: the value did not reach all 20 hosts within 60s", ctx.test))?;
    // Suspicions are expected under loss, but they must clear.
    ctx.wait_for("all 20 alive again at the end", Duration::from_secs(30), async || {
        expect_states(&look().await, &all, &all, &[])
    })
    .await?;
    check("at the end")?;

    let (mut sent, mut received, mut refutations) = (0u64, 0u64, 0u64);
    for name in &all {
        let agent = ctx.agent(name).ok_or(format!("{name} has no agent"))?;
        let stats = agent.overlay(OVERLAY).await.map_err(|e| e.to_string())?.stats;
        sent += stats.datagrams_sent;
        received += stats.datagrams_received;
        refutations += stats.refutations;
    }
    let loss = 1.0 - received as f64 / sent as f64;
    println!(
        "{}: value everywhere after {:.2}s; datagrams sent {sent}, received {received} (loss {:.1}%); \
         refutations {refutations}; samples showing a suspect: {suspect_samples} of {samples}; \
         failures seen by hosts not fully joined: {}",
        ctx.test,
        spread.as_secs_f64(),
        loss * 100.0,
        excused.borrow().len()
    );
    if !(0.05..0.25).contains(&loss) {
        return Err(format!(
            "{}: measured datagram loss {:.1}% is not about 10%: is the loss applied?",
            ctx.test,
            loss * 100.0
        ));
    }
    Ok(())
}

/// 20 hosts; one crashes: the others mark it failed. It restarts with the
/// same name and data directory: its boot epoch goes up by one (the agent
/// persists it) and everyone sees it alive again with the new epoch. Then it
/// crashes and restarts again at once, before anyone could mark it failed:
/// everyone moves to the next epoch without seeing it failed.
#[test]
fn crash_and_restart_same_name() {
    run_cluster(
        "crash_and_restart_same_name",
        20,
        0.0,
        |_| {},
        async |ctx: Ctx| {
            let all = ctx.names.clone();
            let victim = "h13".to_owned();
            let others: Vec<String> = all.iter().filter(|n| **n != victim).cloned().collect();
            ctx.wait_all_alive("all 20 alive", &all, Duration::from_secs(60))
                .await?;
            let first = ctx.local_epoch(&victim).await?;
            expect_epoch(&ctx.views().await, &victim, first)?;

            ctx.crash(&victim);
            tokio::time::sleep(POLL).await;
            if ctx.agent(&victim).is_some() {
                return Err(format!("{victim}'s agent survived the crash"));
            }
            ctx.wait_for(
                "the 19 others see the crashed host failed",
                Duration::from_secs(60),
                async || expect_states(&ctx.views().await, &others, &others, std::slice::from_ref(&victim)),
            )
            .await?;

            ctx.bounce(&victim);
            ctx.wait_for(
                "all 20 see the restarted host alive with the next epoch",
                Duration::from_secs(60),
                async || {
                    let views = ctx.views().await;
                    expect_states(&views, &all, &all, &[])?;
                    expect_epoch(&views, &victim, first + 1)
                },
            )
            .await?;
            let second = ctx.local_epoch(&victim).await?;
            if second != first + 1 {
                return Err(format!(
                    "the restarted agent runs epoch {second}, want {} (one above the persisted {first})",
                    first + 1
                ));
            }

            // Down and up again within one probe interval.
            ctx.crash(&victim);
            tokio::time::sleep(Duration::from_millis(500)).await;
            ctx.bounce(&victim);
            let mut failed_seen = Vec::new();
            ctx.wait_for(
                "all 20 see the quickly restarted host alive with the next epoch",
                Duration::from_secs(60),
                async || {
                    let views = ctx.views().await;
                    failed_seen.extend(
                        members_in_state(&views, "failed")
                            .into_iter()
                            .filter(|(_, member)| *member == victim),
                    );
                    expect_states(&views, &all, &all, &[])?;
                    expect_epoch(&views, &victim, first + 2)
                },
            )
            .await?;
            if !failed_seen.is_empty() {
                return Err(format!(
                    "{victim} was restarted within 500ms, yet seen failed (observer, member): {failed_seen:?}"
                ));
            }
            Ok(())
        },
    );
}
