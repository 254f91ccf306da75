//! The network namespace the whole run happens in, its nftables counters
//! and its loss rule.
//!
//! Everything the harness changes lives in a namespace of its own:
//! deleting the namespace removes the rules, and the processes left in it
//! are killed first. The outer process does that whatever happened inside.
//!
//! Loss: this kernel has no `netem` qdisc (`CONFIG_NET_SCH_NETEM` is not
//! set), so loss is injected by nftables on the input hook — each gossip
//! packet is dropped independently with the given probability, silently
//! for the sender (a drop on the output hook would make `sendto` fail
//! with EPERM, which real loss never does).

use std::process::Command;

use crate::Result;
use crate::cluster::{PORT_RANGE, RUMORMILL_PORTS, SERF_PORTS};

const TABLE: &str = "rmbench";

/// Runs a command and fails with its standard error when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the namespace, brings up its loopback and loads the counters.
pub fn create(name: &str) -> Result<()> {
    run("ip", &["netns", "add", name])?;
    run("ip", &["netns", "exec", name, "ip", "link", "set", "lo", "up"])?;
    let ruleset = ruleset();
    let path = std::env::temp_dir().join(format!("{name}.nft"));
    std::fs::write(&path, ruleset)?;
    let loaded = run("ip", &["netns", "exec", name, "nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    loaded.map(|_| ())
}

/// Counters per system: gossip packets are those to 127.0.0.1 from or to
/// the system's port range, counted once each on the input hook.
fn ruleset() -> String {
    let range = |base: u16| format!("{base}-{}", base + PORT_RANGE - 1);
    let (serf, ours) = (range(SERF_PORTS), range(RUMORMILL_PORTS));
    format!(
        "table inet {TABLE} {{
  counter serf {{ }}
  counter rumormill {{ }}
  counter dropped {{ }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip daddr 127.0.0.1 meta l4proto {{ tcp, udp }} jump gossip
  }}
  chain gossip {{
    th dport {serf} counter name serf goto loss
    th sport {serf} counter name serf goto loss
    th dport {ours} counter name rumormill goto loss
    th sport {ours} counter name rumormill goto loss
  }}
  chain loss {{
  }}
}}
"
    )
}

/// Deletes the namespace after killing what still runs in it.
pub fn destroy(name: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", name]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from the namespace; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Err(e) = run("ip", &["netns", "del", name]) {
        eprintln!("serf-compare: could not delete network namespace {name}: {e}");
    }
}

/// Bytes and packets a counter has seen (from inside the namespace).
#[derive(Debug, Clone, Copy, Default)]
pub struct Count {
    /// IP bytes (headers included).
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
}

/// Reads the counter of a system (`serf` or `rumormill`) or `dropped`.
pub fn counter(which: &str) -> Result<Count> {
    let json = run("nft", &["-j", "list", "counter", "inet", TABLE, which])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let c = v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i.get("counter")))
        .ok_or_else(|| format!("no counter {which} in: {json}"))?;
    Ok(Count {
        bytes: c["bytes"].as_u64().unwrap_or(0),
        packets: c["packets"].as_u64().unwrap_or(0),
    })
}

/// Drops each gossip packet with probability `percent` / 100 (0 removes the
/// rule).
pub fn set_loss(percent: f64) -> Result<()> {
    run("nft", &["flush", "chain", "inet", TABLE, "loss"])?;
    if percent > 0.0 {
        let per_mille = (percent * 10.0).round() as u32;
        let rule = format!("numgen random mod 1000 < {per_mille} counter name dropped drop");
        run("nft", &["add", "rule", "inet", TABLE, "loss", &rule])?;
    }
    Ok(())
}
