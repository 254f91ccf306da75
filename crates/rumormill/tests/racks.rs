//! Racks with real agent processes on loopback: bad rack settings refused
//! with one line, three racks of three candidates electing their gateways,
//! and a gateway killed with SIGKILL replaced by a successor in a higher
//! term, as `rumormill racks` shows.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `rumormill agent` with `flags` on a plaintext loopback overlay: it must
/// refuse to start with one line containing `needle`.
fn refused(scratch: &Scratch, flags: &[&str], needle: &str) {
    let mut c = command();
    c.arg("agent")
        .arg("--data-dir")
        .arg(scratch.path("refused"))
        .args(["--plaintext", "--bind", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .args(flags);
    let ran = run(
        c,
        format!("rumormill agent {}", flags.join(" ")),
        Duration::from_secs(20),
    );
    let line = ran.error_line();
    assert!(line.contains(needle), "{line:?} lacks {needle:?}");
}

#[test]
fn bad_rack_settings_are_refused_with_one_line_each() {
    let scratch = Scratch::new("racks-refused");
    refused(
        &scratch,
        &["--rack", "EU 1"],
        "rack name \"EU 1\": 'E' is not one of a-z",
    );
    refused(&scratch, &["--rack", "_eu"], "must start with a letter or a digit");
    refused(&scratch, &["--gateway"], "gateway = true needs a rack");
    refused(
        &scratch,
        &["--rack", "eu", "--gateway", "--candidates", "0"],
        "candidates = 0",
    );
    refused(
        &scratch,
        &["--rack", "eu", "--remote-seed", "127.0.0.1:7950"],
        "remote_seeds needs gateway = true",
    );
}

/// The racks `ep` lists: (name, gateway, term).
fn racks(ep: &Endpoint) -> Result<Vec<(String, Option<String>, u64)>, String> {
    let v = ep.try_json(&["racks"])?;
    let rows = v.as_array().ok_or_else(|| format!("not a list: {v}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["gateway"].as_str().map(str::to_owned),
                r["term"].as_u64().unwrap_or_default(),
            )
        })
        .collect())
}

#[test]
fn three_racks_of_three_elect_gateways_and_a_killed_gateway_is_replaced_in_a_higher_term() {
    let scratch = Scratch::new("racks-three");
    let key = keygen();
    let names = ["eu", "us", "ap"];
    let ports: Vec<Vec<SocketAddr>> = names
        .iter()
        .map(|_| (0..3).map(|_| loopback(free_gossip_port())).collect())
        .collect();
    let mut agents: Vec<Agent> = Vec::new();
    for (r, rack) in names.iter().enumerate() {
        for i in 0..3 {
            let mut flags: Vec<String> = ["--rack", rack, "--gateway", "--candidates", "3"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            for (other, addrs) in ports.iter().enumerate() {
                if other != r {
                    for a in addrs {
                        flags.push("--remote-seed".into());
                        flags.push(a.to_string());
                    }
                }
            }
            let seed = (i > 0).then_some(ports[r][0]);
            agents.push(Agent::launch_with(
                &scratch,
                &format!("{rack}-{i}"),
                &key,
                seed,
                ports[r][i],
                flags,
            ));
        }
    }
    for a in &mut agents {
        a.ready(false);
    }
    // Every agent sees three racks, each with a gateway.
    let (seen, took) = wait_until(
        "every agent to list three racks with gateways",
        Duration::from_secs(60),
        || {
            let mut all = Vec::new();
            for a in &agents {
                let r = racks(&a.ep)?;
                if r.len() != 3 || r.iter().any(|(_, g, t)| g.is_none() || *t == 0) {
                    return Err(format!("{}: {r:?}", a.ep.name));
                }
                all.push(r);
            }
            Ok(all)
        },
    );
    eprintln!("gateways elected and known everywhere after {took:?}: {:?}", seen[0]);
    // ap's view of eu: the gateway eu elected, and eu's members from its report.
    let eu_gateway = racks(&agents[0].ep).expect("eu's racks")[0]
        .1
        .clone()
        .expect("a gateway");
    assert!(eu_gateway.starts_with("eu-"), "{eu_gateway}");
    wait_until(
        "ap to list eu's members as eu's gateway reports them",
        Duration::from_secs(30),
        || {
            let v = agents[6].ep.try_json(&["members", "--rack", "eu"])?;
            let rows = v.as_array().cloned().unwrap_or_default();
            let alive = rows
                .iter()
                .filter(|m| m["state"] == "alive" && m["report_age_s"].is_number())
                .count();
            match alive {
                3 => Ok(()),
                _ => Err(format!("{v}")),
            }
        },
    );
    let all: Value = agents[6].ep.json(&["members", "--all-racks"]);
    assert_eq!(all.as_array().map(Vec::len), Some(9), "{all}");

    // eu's gateway is killed: eu elects another in a higher term, and the
    // other racks learn it.
    let before = racks(&agents[0].ep).expect("eu's racks")[0].2;
    let g = agents
        .iter()
        .position(|a| a.ep.name == eu_gateway)
        .expect("the gateway's agent");
    agents[g].kill();
    let survivor = if g == 0 { 1 } else { 0 };
    let (new, took) = wait_until("eu to elect another gateway", Duration::from_secs(30), || {
        let r = racks(&agents[survivor].ep)?;
        match &r[0] {
            (_, Some(gw), term) if *gw != eu_gateway && *term > before => Ok((gw.clone(), *term)),
            other => Err(format!("{other:?}")),
        }
    });
    eprintln!("eu's new gateway {} in term {} after {took:?}", new.0, new.1);
    wait_until("ap to see eu's new gateway", Duration::from_secs(30), || {
        let r = racks(&agents[6].ep)?;
        match r.iter().find(|(n, _, _)| n == "eu") {
            Some((_, Some(gw), term)) if *gw == new.0 && *term >= new.1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The table form names the candidates and their roles.
    let ran = agents[survivor].ep.cli(&["racks"]);
    assert!(ran.status.success(), "{}", ran.describe());
    let mut c = command();
    c.arg("--api")
        .arg(agents[survivor].ep.api.to_string())
        .arg("--data-dir")
        .arg(&agents[survivor].ep.dir)
        .arg("racks");
    let table = run(c, "rumormill racks".into(), CLI_TIMEOUT);
    assert!(table.status.success(), "{}", table.describe());
    assert!(
        table.stdout.contains(&format!("{}:leader", new.0)) && table.stdout.contains("(here)"),
        "{}",
        table.stdout
    );
}

#[test]
fn an_even_number_of_candidates_starts_with_one_warning_line_explaining_odd() {
    let scratch = Scratch::new("racks-even");
    let key = keygen();
    let flags = ["--rack", "eu", "--gateway", "--candidates", "2"]
        .map(String::from)
        .to_vec();
    let mut a = Agent::launch_with(&scratch, "eu-0", &key, None, loopback(free_gossip_port()), flags);
    a.ready(false);
    let log = a.log_tail();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("candidates = 2 is even")).collect();
    assert_eq!(warnings.len(), 1, "one warning line expected in:\n{log}");
    assert!(
        warnings[0].contains("so 2 candidates tolerate 0 failure(s), no more than 1 would"),
        "{}",
        warnings[0]
    );
    // It runs: its rack is listed (no gateway yet: a group of two waits
    // for its second candidate).
    let (r, _) = wait_until("the agent to list its rack", Duration::from_secs(20), || {
        let r = racks(&a.ep)?;
        if r.len() == 1 { Ok(r) } else { Err(format!("{r:?}")) }
    });
    assert_eq!(r[0].0, "eu");
}
