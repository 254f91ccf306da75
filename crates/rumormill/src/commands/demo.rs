//! `rumormill demo`: a local cluster of agents in one process on loopback,
//! showing membership and updates as they flow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rumormill::agent::Agent;
use rumormill::config::{AgentConfig, OverlaySpec, Profile};
use rumormill::transport::TokioNet;

/// Options of `rumormill demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Agents to start.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,
    /// API address of the first agent (another free port if taken).
    #[arg(long, default_value = "127.0.0.1:7980")]
    listen: std::net::SocketAddr,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Racks instead: this many racks of three agents, all three gateway
    /// candidates of their rack; the first rack's gateway crashes and its
    /// rack elects another (--nodes is then ignored).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(2..=8))]
    racks: Option<u16>,
}

/// Agents per rack in `demo --racks`, all candidates.
const RACK_SIZE: u16 = 3;

type DemoAgent = Arc<Agent<TokioNet>>;

struct Node {
    name: String,
    /// Its rack, in `demo --racks`.
    rack: Option<String>,
    config: AgentConfig,
    agent: Option<DemoAgent>,
}

async fn start_node(node: &mut Node) -> Result<(), String> {
    let agent = Agent::start(TokioNet, node.config.clone())
        .await
        .map_err(|e| e.to_string())?;
    node.agent = Some(agent);
    Ok(())
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<(), String> {
    super::agent::init_logging(rumormill::config::LogFormat::Human, "warn");
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let root = std::env::temp_dir().join(format!("rumormill-demo-{}", std::process::id()));
    let result = runtime.block_on(demo(args, &root));
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// The agents of the flat demo: `n` nodes, all seeded with the first.
async fn flat_nodes(n: u16, key: &str, root: &std::path::Path) -> Result<Vec<Node>, String> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut first_addr = None;
    for i in 1..=n {
        let name = format!("node-{i}");
        let mut spec = OverlaySpec::named("default");
        spec.bind = "127.0.0.1:0".into();
        spec.member = Some(name.clone());
        spec.keys = vec![key.to_owned()];
        spec.profile = Profile::Local;
        if let Some(a) = first_addr {
            spec.seeds = vec![format!("{a}")];
        }
        let mut node = Node {
            config: AgentConfig {
                data_dir: root.join(&name),
                overlays: vec![spec],
                ..AgentConfig::default()
            },
            name,
            rack: None,
            agent: None,
        };
        start_node(&mut node).await?;
        if first_addr.is_none() {
            first_addr = Some(addr_of(&node).await?);
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// The agents of `demo --racks`: `racks` racks of [`RACK_SIZE`], every
/// agent a candidate of its rack, seeded with its rack's first agent and
/// knowing the candidates of the racks started before as remote seeds.
async fn rack_nodes(racks: u16, key: &str, root: &std::path::Path) -> Result<Vec<Node>, String> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut remote: Vec<String> = Vec::new();
    for r in 1..=racks {
        let rack = format!("rack-{r}");
        let mut here: Vec<String> = Vec::new();
        for i in 1..=RACK_SIZE {
            let name = format!("{rack}-{}", char::from(b'a' + (i - 1) as u8));
            let mut spec = OverlaySpec::named("default");
            spec.bind = "127.0.0.1:0".into();
            spec.member = Some(name.clone());
            spec.keys = vec![key.to_owned()];
            spec.profile = Profile::Local;
            spec.rack = Some(rack.clone());
            spec.gateway = true;
            spec.candidates = Some(usize::from(RACK_SIZE));
            spec.remote_seeds = remote.clone();
            spec.seeds = here.first().cloned().into_iter().collect();
            let mut node = Node {
                config: AgentConfig {
                    data_dir: root.join(&name),
                    overlays: vec![spec],
                    ..AgentConfig::default()
                },
                name,
                rack: Some(rack.clone()),
                agent: None,
            };
            start_node(&mut node).await?;
            here.push(addr_of(&node).await?.to_string());
            nodes.push(node);
        }
        remote.extend(here);
    }
    Ok(nodes)
}

async fn addr_of(node: &Node) -> Result<std::net::SocketAddr, String> {
    let a = node
        .agent
        .as_ref()
        .ok_or_else(|| format!("{} did not start", node.name))?;
    Ok(a.overlay("default").await.map_err(|e| e.to_string())?.addr)
}

async fn demo(args: DemoArgs, root: &std::path::Path) -> Result<(), String> {
    let key = rumormill::config::generate_key();
    let mut nodes = match args.racks {
        Some(r) => rack_nodes(r, &key, root).await?,
        None => flat_nodes(args.nodes, &key, root).await?,
    };
    // The API serves the agent that never crashes: the first of the flat
    // demo, the last of the racks demo (whose first rack loses its gateway).
    let served = if args.racks.is_some() { nodes.len() - 1 } else { 0 };
    let first = nodes[served].agent.clone().ok_or("the served agent did not start")?;
    let token = format!("demo-{:016x}", rand::random::<u64>());
    let (api, server) = match rumormill::api::serve(first.clone(), args.listen, token.clone()).await {
        Ok(s) => s,
        Err(_) => rumormill::api::serve(
            first.clone(),
            "127.0.0.1:0".parse().map_err(|_| "bad address")?,
            token.clone(),
        )
        .await
        .map_err(|e| format!("cannot listen for the API: {e}"))?,
    };
    match args.racks {
        Some(r) => println!(
            "Rumormill demo: {r} racks of {RACK_SIZE} agents on loopback in overlay \"default\" (encrypted, local timings); every agent is a gateway candidate of its rack."
        ),
        None => println!(
            "Rumormill demo: {} agents on loopback in overlay \"default\" (encrypted, local timings).",
            nodes.len()
        ),
    }
    println!(
        "API of {}: http://{api}/v1   (OpenAPI document: http://{api}/v1/openapi.json)",
        nodes[served].name
    );
    println!();
    println!("Try, in another shell:");
    println!("  export RUMORMILL_API={api} RUMORMILL_TOKEN={token}");
    println!("  rumormill members");
    if args.racks.is_some() {
        println!("  rumormill racks");
        println!("  rumormill members --all-racks");
    }
    println!("  rumormill put greeting hello   # then: rumormill get greeting");
    println!("  curl -s -H \"Authorization: Bearer $RUMORMILL_TOKEN\" http://{api}/v1/overlays/default/members");
    println!();
    println!("Ctrl-C stops the demo.");
    println!();

    let started = Instant::now();
    let stop_at = args.duration.map(|s| started + Duration::from_secs(s));
    if args.racks.is_some() {
        return racks_demo(nodes, started, stop_at, server).await;
    }
    let crash = (nodes.len() >= 3).then_some(nodes.len() - 1);
    let mut last_line = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut step = 0u64;
    // One signal listener for the whole run: a Ctrl-C during a step is kept.
    let signal = super::agent::wait_for_signal();
    tokio::pin!(signal);
    let stop = loop {
        tokio::select! {
            _ = tick.tick() => {}
            s = &mut signal => break s,
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            break "the --duration";
        }
        step += 1;
        let line = membership_line(&nodes).await;
        if line != last_line {
            println!("[{:>3}s] {line}", started.elapsed().as_secs());
            last_line = line;
        }
        if step % 5 == 0 {
            let writer = (step as usize / 5) % nodes.len();
            spread(&nodes, writer, step, started).await;
        }
        if let Some(c) = crash {
            if step == 12 {
                if let Some(agent) = nodes[c].agent.take() {
                    println!(
                        "[{:>3}s] {} crashes (stopped without leaving)",
                        started.elapsed().as_secs(),
                        nodes[c].name
                    );
                    agent.shutdown(false).await;
                }
            }
            if step == 30 {
                println!(
                    "[{:>3}s] {} restarts with the same name",
                    started.elapsed().as_secs(),
                    nodes[c].name
                );
                start_node(&mut nodes[c]).await?;
            }
        }
    };
    println!("stopping on {stop}: every agent leaves gracefully");
    server.abort();
    for n in &nodes {
        if let Some(a) = &n.agent {
            a.shutdown(true).await;
        }
    }
    Ok(())
}

/// "node-1 sees 8 alive, 0 suspect, 0 failed; 8/8 running agents agree".
async fn membership_line(nodes: &[Node]) -> String {
    let mut views = Vec::new();
    for n in nodes {
        if let Some(a) = &n.agent {
            if let Ok(m) = a.members("default").await {
                let mut alive: Vec<String> = m
                    .iter()
                    .filter(|r| r.state == "alive")
                    .map(|r| r.name.clone())
                    .collect();
                alive.sort();
                views.push((n.name.clone(), m, alive));
            }
        }
    }
    let Some((name, first, alive)) = views.first() else {
        return "no agent running".into();
    };
    let count = |s: &str| first.iter().filter(|r| r.state == s).count();
    let agree = views.iter().filter(|(_, _, a)| a == alive).count();
    format!(
        "{name} sees {} alive, {} suspect, {} failed; {agree}/{} running agents see the same alive set",
        count("alive"),
        count("suspect"),
        count("failed"),
        views.len()
    )
}

/// Writes a value on one agent and reports how fast it reached the others.
async fn spread(nodes: &[Node], writer: usize, step: u64, started: Instant) {
    let Some(agent) = &nodes[writer].agent else { return };
    let value = format!("written by {} at step {step}", nodes[writer].name);
    if agent
        .put("default", "demo/latest", value.clone().into_bytes())
        .await
        .is_err()
    {
        return;
    }
    let t0 = Instant::now();
    let running: Vec<&DemoAgent> = nodes.iter().filter_map(|n| n.agent.as_ref()).collect();
    let mut have = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        have = 0;
        for a in &running {
            if a.get("default", "demo/latest")
                .await
                .is_ok_and(|r| r.value.as_deref() == Some(value.as_str()))
            {
                have += 1;
            }
        }
        if have == running.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "[{:>3}s] put demo/latest on {}: on {have}/{} running agents after {} ms",
        started.elapsed().as_secs(),
        nodes[writer].name,
        running.len(),
        t0.elapsed().as_millis()
    );
}

/// The loop of `demo --racks`: a line whenever a rack's gateway or term
/// changes; every five seconds a value written in one rack and timed to
/// every agent of every rack; at 15 s the first rack's gateway crashes, and
/// the demo tells when its successor is elected; at 40 s it comes back.
async fn racks_demo(
    mut nodes: Vec<Node>,
    started: Instant,
    stop_at: Option<Instant>,
    server: tokio::task::JoinHandle<()>,
) -> Result<(), String> {
    let mut last_line = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut step = 0u64;
    let mut crashed: Option<(usize, Instant, u64)> = None;
    let signal = super::agent::wait_for_signal();
    tokio::pin!(signal);
    let stop = loop {
        tokio::select! {
            _ = tick.tick() => {}
            s = &mut signal => break s,
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            break "the --duration";
        }
        step += 1;
        let gateways = gateways(&nodes).await;
        let line = gateways
            .iter()
            .map(|(rack, g)| match g {
                Some((name, term)) => format!("{rack}: {name} (term {term})"),
                None => format!("{rack}: no gateway"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        if line != last_line {
            println!("[{:>3}s] gateways: {line}", started.elapsed().as_secs());
            last_line = line;
        }
        if let Some((c, at, term)) = crashed
            && let Some((_, Some((name, t)))) = gateways.first()
            && *t > term
            && *name != nodes[c].name
        {
            println!(
                "[{:>3}s] rack-1 elected {name} in term {t}, {:.1} s after the crash",
                started.elapsed().as_secs(),
                at.elapsed().as_secs_f64()
            );
            crashed = None;
        }
        if step % 5 == 0 {
            let writer = (step as usize / 5) % nodes.len();
            spread(&nodes, writer, step, started).await;
        }
        if step == 15
            && let Some((_, Some((name, term)))) = gateways.first()
            && let Some(c) = nodes.iter().position(|n| n.name == *name)
            && let Some(agent) = nodes[c].agent.take()
        {
            println!(
                "[{:>3}s] rack-1's gateway {name} crashes (stopped without leaving)",
                started.elapsed().as_secs()
            );
            agent.shutdown(false).await;
            crashed = Some((c, Instant::now(), *term));
        }
        if step == 40
            && let Some(c) = nodes.iter().position(|n| n.agent.is_none())
        {
            println!(
                "[{:>3}s] {} restarts with the same name and its Raft state",
                started.elapsed().as_secs(),
                nodes[c].name
            );
            if let Err(e) = start_node(&mut nodes[c]).await {
                println!(
                    "[{:>3}s] {} did not restart: {e}",
                    started.elapsed().as_secs(),
                    nodes[c].name
                );
            }
        }
    };
    println!("stopping on {stop}: every agent leaves gracefully");
    server.abort();
    for n in &nodes {
        if let Some(a) = &n.agent {
            a.shutdown(true).await;
        }
    }
    Ok(())
}

/// Each rack's gateway and term, as the rack's first running agent knows
/// them, by rack.
async fn gateways(nodes: &[Node]) -> Vec<(String, Option<(String, u64)>)> {
    let mut out: Vec<(String, Option<(String, u64)>)> = Vec::new();
    for n in nodes {
        let Some(rack) = &n.rack else { continue };
        if out.iter().any(|(r, _)| r == rack) {
            continue;
        }
        let Some(a) = &n.agent else { continue };
        let own = a.racks("default").await.ok().and_then(|r| r.into_iter().next());
        out.push((rack.clone(), own.and_then(|r| Some((r.gateway?, r.term)))));
    }
    out
}
