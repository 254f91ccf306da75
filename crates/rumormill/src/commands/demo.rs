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
}

type DemoAgent = Arc<Agent<TokioNet>>;

struct Node {
    name: String,
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

async fn demo(args: DemoArgs, root: &std::path::Path) -> Result<(), String> {
    let key = rumormill::config::generate_key();
    let mut nodes: Vec<Node> = Vec::new();
    let mut first_addr = None;
    for i in 1..=args.nodes {
        let name = format!("node-{i}");
        let mut spec = OverlaySpec::named("default");
        spec.bind = "127.0.0.1:0".into();
        spec.member = Some(name.clone());
        spec.rack = Some(format!("rack-{}", (i - 1) % 3 + 1));
        spec.keys = vec![key.clone()];
        spec.profile = Profile::Local;
        if let Some(a) = first_addr {
            spec.seeds = vec![format!("{a}")];
        }
        let config = AgentConfig {
            data_dir: root.join(&name),
            overlays: vec![spec],
            ..AgentConfig::default()
        };
        let mut node = Node {
            name,
            config,
            agent: None,
        };
        start_node(&mut node).await?;
        if first_addr.is_none() {
            let a = node.agent.as_ref().ok_or("node-1 did not start")?;
            first_addr = Some(a.overlay("default").await.map_err(|e| e.to_string())?.addr);
        }
        nodes.push(node);
    }
    let first = nodes[0].agent.clone().ok_or("node-1 did not start")?;
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
    println!(
        "Rumormill demo: {} agents on loopback in overlay \"default\" (encrypted, local timings).",
        args.nodes
    );
    println!("API of node-1: http://{api}/v1   (OpenAPI document: http://{api}/v1/openapi.json)");
    println!();
    println!("Try, in another shell:");
    println!("  export RUMORMILL_API={api} RUMORMILL_TOKEN={token}");
    println!("  rumormill members");
    println!("  rumormill put greeting hello   # then: rumormill get greeting");
    println!("  curl -s -H \"Authorization: Bearer $RUMORMILL_TOKEN\" http://{api}/v1/overlays/default/members");
    println!();
    println!("Ctrl-C stops the demo.");
    println!();

    let started = Instant::now();
    let stop_at = args.duration.map(|s| started + Duration::from_secs(s));
    let crash = (args.nodes >= 3).then_some(args.nodes as usize - 1);
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
