//! Real-process test of racks: three racks of three agents, each rack in a
//! network namespace of its own, the racks joined by a bridge in a fourth
//! namespace whose nftables counters see every packet that crosses between
//! racks. All nine agents are gateway candidates; each rack elects one.
//!
//! The test creates its namespaces, veth pairs, bridge and addresses
//! (10.213.R.I, which exist only inside those namespaces) and removes them
//! when it ends, also on panic. It needs root, `ip` (iproute2) and `nft`
//! (nftables); `.ci/run` installs them.
//!
//! What it shows:
//! - each rack elects one gateway and every agent's `rumormill racks` lists
//!   the three racks with their gateways;
//! - at-least-once events published in rack 1 reach subscribers in racks 2
//!   and 3, each exactly once, while rack 2's gateway is killed with SIGKILL
//!   in the middle of the traffic; every report ends `delivered`;
//! - rack 2 elects another gateway in a higher term, and rack 1 learns it;
//! - the bridge's counters: only addresses of agents that were gateways sent
//!   a packet to another rack.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const RACKS: usize = 3;
const PER_RACK: usize = 3;
const TOPIC: &str = "orders";
const EVENTS: usize = 30;
const GOSSIP_PORT: u16 = 7946;
const BIN: &str = env!("CARGO_BIN_EXE_rumormill");

/// Runs a command that must succeed (network setup).
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): this test needs root, iproute2 and nftables",
                args.join(" ")
            )
        });
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The namespaces, links and counters of one test, removed on drop.
struct Net {
    prefix: String,
}

impl Net {
    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    fn rack(&self, r: usize) -> String {
        format!("{}-r{r}", self.prefix)
    }

    fn addr(r: usize, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, r as u8, i as u8))
    }

    /// Hub with a bridge; one namespace per rack, linked to the bridge by a
    /// veth pair, holding its agents' addresses; a counter per address on
    /// the bridge's forward hook (only packets between racks cross it).
    fn new() -> Net {
        let net = Net {
            prefix: format!("rm13-{}", std::process::id()),
        };
        let hub = net.hub();
        sh(&["ip", "netns", "add", &hub]);
        sh(&[
            "ip", "netns", "exec", &hub, "ip", "link", "add", "br0", "type", "bridge",
        ]);
        sh(&["ip", "netns", "exec", &hub, "ip", "link", "set", "br0", "up"]);
        let mut rules = String::new();
        let tag = std::process::id() % 100_000;
        for r in 1..=RACKS {
            let ns = net.rack(r);
            // Interface names are at most 15 bytes.
            let (inner, outer) = (format!("rmv{r}-{tag}"), format!("rmh{r}-{tag}"));
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            sh(&["ip", "link", "set", &outer, "netns", &hub]);
            sh(&[
                "ip", "netns", "exec", &hub, "ip", "link", "set", &outer, "master", "br0",
            ]);
            sh(&["ip", "netns", "exec", &hub, "ip", "link", "set", &outer, "up"]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            for i in 1..=PER_RACK {
                let a = format!("{}/16", Net::addr(r, i));
                sh(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &a, "dev", &inner]);
                // One counter per (source, destination, protocol) across racks.
                for s in (1..=RACKS).filter(|&s| s != r) {
                    for j in 1..=PER_RACK {
                        for proto in ["udp", "tcp"] {
                            let (from, to) = (Net::addr(r, i), Net::addr(s, j));
                            rules.push_str(&format!(
                                "    ip saddr {from} ip daddr {to} meta l4proto {proto} counter comment \"{from} {to} {proto}\"\n"
                            ));
                        }
                    }
                }
            }
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
        }
        let ruleset = format!(
            "table bridge rumormill {{\n  chain crossing {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &hub, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("piped").write_all(ruleset.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft: this test needs nftables");
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
        net
    }

    /// Packets counted so far between racks, by (source, destination,
    /// protocol).
    fn crossings(&self) -> BTreeMap<(IpAddr, IpAddr, String), u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hub(),
                "nft",
                "-j",
                "list",
                "table",
                "bridge",
                "rumormill",
            ])
            .output()
            .expect("nft list");
        assert!(
            out.status.success(),
            "nft list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
        let mut counts = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(expr) = item["rule"]["expr"].as_array() else {
                continue;
            };
            let key = item["rule"]["comment"].as_str().and_then(|c| {
                let mut parts = c.split(' ');
                let from = parts.next()?.parse::<IpAddr>().ok()?;
                let to = parts.next()?.parse::<IpAddr>().ok()?;
                Some((from, to, parts.next()?.to_owned()))
            });
            let packets = expr.iter().find_map(|e| e["counter"]["packets"].as_u64());
            if let (Some(k), Some(p)) = (key, packets) {
                counts.insert(k, p);
            }
        }
        counts
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for r in 1..=RACKS {
            let _ = Command::new("ip").args(["netns", "del", &self.rack(r)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.hub()]).status();
    }
}

/// One agent inside its rack's namespace (killed on drop).
struct NsAgent {
    ns: String,
    name: String,
    rack: usize,
    dir: PathBuf,
    api: SocketAddr,
    gossip: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: ChildGuard,
}

impl NsAgent {
    fn launch(net: &Net, scratch: &Scratch, key: &str, r: usize, i: usize) -> NsAgent {
        let name = format!("r{r}-{i}");
        let dir = scratch.path(&name);
        private_dir(&dir);
        let gossip = SocketAddr::new(Net::addr(r, i), GOSSIP_PORT);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            name.clone(),
            "--profile".into(),
            "local".into(),
            "--key".into(),
            key.into(),
            "--bind".into(),
            gossip.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", 7980 + i),
            "--rack".into(),
            format!("rack-{r}"),
            "--gateway".into(),
            "--candidates".into(),
            PER_RACK.to_string(),
        ];
        for j in (1..=PER_RACK).filter(|&j| j != i) {
            args.push("--seed".into());
            args.push(SocketAddr::new(Net::addr(r, j), GOSSIP_PORT).to_string());
        }
        for s in (1..=RACKS).filter(|&s| s != r) {
            for j in 1..=PER_RACK {
                args.push("--remote-seed".into());
                args.push(SocketAddr::new(Net::addr(s, j), GOSSIP_PORT).to_string());
            }
        }
        let mut agent = NsAgent {
            ns: net.rack(r),
            log: scratch.path(&format!("{name}.log")),
            name,
            rack: r,
            dir,
            api: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7980 + i as u16),
            gossip,
            args,
            child: ChildGuard(None),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("agent.json"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        // `ip netns exec` execs the agent: the child's pid is the agent's.
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, BIN])
            .args(&self.args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        self.child.0 = Some(c.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name)));
    }

    fn kill(&mut self) {
        let mut c = self.child.0.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `rumormill --api … --data-dir … --json ARGS` inside the namespace.
    fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, BIN])
            .arg("--api")
            .arg(self.api.to_string())
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--json")
            .args(args)
            .env_remove("RUMORMILL_TOKEN")
            .env_remove("RUMORMILL_API")
            .stdin(Stdio::null());
        c
    }

    fn try_json(&self, args: &[&str]) -> Result<Value, String> {
        let ran = run(
            self.cli_command(args),
            format!("{}: rumormill {}", self.name, args.join(" ")),
            CLI_TIMEOUT,
        );
        if !ran.status.success() {
            return Err(ran.describe());
        }
        serde_json::from_str(ran.stdout.trim()).map_err(|e| format!("not JSON ({e}): {}", ran.describe()))
    }

    fn json(&self, args: &[&str]) -> Value {
        self.try_json(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ready(&mut self) {
        wait_until(&format!("{} to answer", self.name), Duration::from_secs(20), || {
            let c = self.child.0.as_mut().expect("running");
            if let Some(status) = c.try_wait().expect("try_wait") {
                panic!("{} exited with {status}; log:\n{}", self.name, self.log_tail());
            }
            self.try_json(&["racks"]).map(|_| ())
        });
    }

    /// `rack → (gateway, term)` as this agent's `rumormill racks` lists them.
    fn gateways(&self) -> Result<BTreeMap<String, (String, u64)>, String> {
        let v = self.try_json(&["racks"])?;
        let rows = v
            .as_array()
            .ok_or_else(|| format!("{}: racks is not an array: {v}", self.name))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (Some(rack), Some(gateway), Some(term)) =
                (r["name"].as_str(), r["gateway"].as_str(), r["term"].as_u64())
            else {
                continue;
            };
            out.insert(rack.to_owned(), (gateway.to_owned(), term));
        }
        Ok(out)
    }
}

/// An application following [`TOPIC`] on one agent through `rumormill
/// subscribe`, its JSON lines collected by a reader thread.
struct App {
    label: String,
    _child: ChildGuard,
    lines: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start(agent: &NsAgent) -> App {
        let mut c = agent.cli_command(&["subscribe", TOPIC]);
        c.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}'s subscribe: {e}", agent.name));
        let out = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        App {
            label: format!("{}'s application", agent.name),
            _child: ChildGuard(Some(child)),
            lines,
        }
    }

    /// Payload → times printed.
    fn tally(&self) -> BTreeMap<String, usize> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut counts = BTreeMap::new();
        for l in lines {
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", self.label));
            if v["topic"] != TOPIC {
                continue;
            }
            let p = v["payload"].as_str().unwrap_or("<none>").to_owned();
            *counts.entry(p).or_insert(0) += 1;
        }
        counts
    }
}

#[test]
fn only_gateways_cross_between_racks_and_events_survive_a_gateway_crash() {
    let t0 = Instant::now();
    let net = Net::new();
    let scratch = Scratch::new("racks-netns");
    let key = keygen();
    let mut agents: Vec<NsAgent> = Vec::new();
    for r in 1..=RACKS {
        for i in 1..=PER_RACK {
            agents.push(NsAgent::launch(&net, &scratch, &key, r, i));
        }
    }
    for a in &mut agents {
        a.ready();
    }

    // 1. Every agent lists the three racks, each with a gateway.
    let (first, took) = wait_until(
        "every agent to list three racks with a gateway each",
        Duration::from_secs(60),
        || {
            let mut seen = None;
            for a in &agents {
                let g = a.gateways()?;
                if g.len() != RACKS {
                    return Err(format!("{} lists {g:?}", a.name));
                }
                match &seen {
                    None => seen = Some(g),
                    Some(s) if *s == g => {}
                    Some(s) => return Err(format!("{} lists {g:?}, others {s:?}", a.name)),
                }
            }
            seen.ok_or_else(|| "no agent".to_owned())
        },
    );
    eprintln!(
        "gateways {first:?} agreed everywhere after {took:?} ({:?} since start)",
        t0.elapsed()
    );
    let gateway_of = |rack: usize, g: &BTreeMap<String, (String, u64)>| g[&format!("rack-{rack}")].clone();

    // 2. Subscribers: in racks 2 and 3, members that are not gateways.
    let subscriber_agents: Vec<usize> = (0..agents.len())
        .filter(|&k| agents[k].rack != 1 && !first.values().any(|(g, _)| *g == agents[k].name))
        .collect();
    let apps: Vec<App> = subscriber_agents.iter().map(|&k| App::start(&agents[k])).collect();
    let subscribers: BTreeSet<String> = subscriber_agents.iter().map(|&k| agents[k].name.clone()).collect();
    // The publisher: a member of rack 1 that is not its gateway.
    let publisher = (0..agents.len())
        .find(|&k| agents[k].rack == 1 && agents[k].name != gateway_of(1, &first).0)
        .expect("rack 1 has three members");

    // Wait until a probe's record lists every subscriber.
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    wait_until(
        "a probe to list every remote subscriber",
        Duration::from_secs(30),
        || {
            let payload = format!("probe-{}", ids.len());
            let v = agents[publisher].try_json(&[
                "publish",
                TOPIC,
                &payload,
                "--at-least-once",
                "--retry-every",
                "500ms",
            ])?;
            ids.insert(payload, v["id"].as_str().unwrap_or("").to_owned());
            let listed: BTreeSet<String> = v["subscribers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["member"].as_str().map(str::to_owned))
                .collect();
            if listed == subscribers {
                Ok(())
            } else {
                Err(format!("listed {listed:?}, want {subscribers:?}"))
            }
        },
    );

    // 3. Events; rack 2's gateway is killed a third of the way through.
    let victim = (0..agents.len())
        .find(|&k| agents[k].name == gateway_of(2, &first).0)
        .expect("rack 2's gateway is one of ours");
    let mut killed_at = None;
    for e in 0..EVENTS {
        if e == EVENTS / 3 {
            agents[victim].kill();
            killed_at = Some(Instant::now());
            eprintln!(
                "killed {} (rack 2's gateway, term {})",
                agents[victim].name,
                gateway_of(2, &first).1
            );
        }
        let payload = format!("e{e}");
        let v = agents[publisher].json(&["publish", TOPIC, &payload, "--at-least-once", "--retry-every", "500ms"]);
        ids.insert(payload, v["id"].as_str().expect("an id").to_owned());
        thread::sleep(Duration::from_millis(100));
    }

    // 4. Rack 2 has a new gateway in a higher term, and rack 1 knows it.
    let (after, took) = wait_until("rack 1 to learn rack 2's new gateway", Duration::from_secs(30), || {
        let g = agents[publisher].gateways()?;
        let (gw, term) = gateway_of(2, &g);
        if gw != agents[victim].name && term > gateway_of(2, &first).1 {
            Ok(g)
        } else {
            Err(format!("{g:?}"))
        }
    });
    eprintln!(
        "rack 2's new gateway {:?} known in rack 1 {:?} after the kill (the wait took {took:?})",
        gateway_of(2, &after),
        killed_at.map(|k| k.elapsed()).unwrap_or_default()
    );

    // 5. Every event reached every subscriber exactly once; every report is final.
    let events: Vec<String> = (0..EVENTS).map(|e| format!("e{e}")).collect();
    wait_until("every subscriber to have every event", Duration::from_secs(60), || {
        for app in &apps {
            let t = app.tally();
            let missing: Vec<&String> = events.iter().filter(|e| !t.contains_key(*e)).collect();
            if !missing.is_empty() {
                return Err(format!("{} misses {missing:?}", app.label));
            }
        }
        Ok(())
    });
    for app in &apps {
        for (payload, n) in app.tally() {
            assert_eq!(n, 1, "{} printed {payload} {n} times", app.label);
        }
    }
    for e in &events {
        let id = &ids[e];
        wait_until(
            &format!("{e} ({id}) to be delivered to every subscriber"),
            Duration::from_secs(30),
            || {
                let r = agents[publisher].try_json(&["event", id])?;
                let outcomes: BTreeMap<String, String> = r["subscribers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| {
                        Some((
                            s["member"].as_str()?.to_owned(),
                            s["outcome"].as_str().unwrap_or("").to_owned(),
                        ))
                    })
                    .collect();
                let all = outcomes.keys().cloned().collect::<BTreeSet<_>>() == subscribers
                    && outcomes.values().all(|o| o == "delivered");
                if r["complete"] == true && all {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            },
        );
    }

    // 6. Only gateways crossed: no packet went between two members of
    // different racks of which neither was a gateway, and members that never
    // were gateways sent no datagram across at all (what a remote gateway's
    // contact attempts got from them is TCP's own answer to a connection
    // they then refused at the header).
    let gateways: BTreeSet<String> = first.values().chain(after.values()).map(|(g, _)| g.clone()).collect();
    let name_of = |ip: &IpAddr| {
        agents
            .iter()
            .find(|a| a.gossip.ip() == *ip)
            .map(|a| a.name.clone())
            .unwrap_or_else(|| ip.to_string())
    };
    let crossings = net.crossings();
    assert_eq!(
        crossings.len(),
        RACKS * PER_RACK * (RACKS - 1) * PER_RACK * 2,
        "one counter per pair and protocol"
    );
    let mut by_source: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((from, to, proto), n) in &crossings {
        let (f, t) = (name_of(from), name_of(to));
        let e = by_source.entry(f.clone()).or_default();
        if proto == "udp" {
            e.0 += n
        } else {
            e.1 += n
        }
        if *n > 0 {
            assert!(
                gateways.contains(&f) || gateways.contains(&t),
                "{n} {proto} packets from {f} to {t}, neither of which was ever a gateway (gateways {gateways:?})"
            );
        }
    }
    eprintln!("packets across racks by source (udp, tcp): {by_source:?}; gateways {gateways:?}");
    for a in &agents {
        let (udp, tcp) = by_source.get(&a.name).copied().unwrap_or_default();
        if gateways.contains(&a.name) {
            assert!(udp > 0, "{} was a gateway but sent no datagram across", a.name);
        } else {
            assert_eq!(
                udp, 0,
                "{} was never a gateway but sent {udp} datagrams across racks",
                a.name
            );
            let _ = tcp;
        }
    }
    eprintln!("done in {:?}", t0.elapsed());
}
