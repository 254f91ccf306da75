//! Real-process tests: agents started from the built `rumormill` binary on
//! loopback, driven through the command-line client.
//!
//! Every port is picked free (bound on port 0 first), every agent has its own
//! data directory under the target's temporary directory, every child process
//! is killed when its guard drops (also on panic), and every wait is a bounded
//! poll that names what it expected and what it saw last (the helpers are in
//! `tests/common/mod.rs`, shared with `tests/events_agents.rs`).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rumormill_wire::{Codec, FrameKind, Keyring, Security};
use serde_json::Value;

// ----- cluster set-up ---------------------------------------------------------

/// Starts `n` agents sharing `key` and waits until each answers.
fn start_agents(scratch: &Scratch, n: usize, key: &str) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (1..=n).map(|i| Agent::launch(scratch, i, key, None)).collect();
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
        7,
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
fn a_key_holder_is_rotated_out_through_the_command_line() {
    let scratch = Scratch::new("rotate-out");
    let key = keygen();
    let agents = start_agents(&scratch, 3, &key);
    join_all_to_first(&agents);
    let eps: Vec<Endpoint> = agents.iter().map(|a| a.ep.clone()).collect();
    let all: Vec<&Endpoint> = eps.iter().collect();
    let alive = [("node-1", "alive"), ("node-2", "alive"), ("node-3", "alive")];
    wait_until("3 members alive everywhere", Duration::from_secs(10), || {
        views_match(&all, &alive, None)
    });
    let old_id = eps[0].keyring()[0].0.clone();
    wait_until("every key report in", Duration::from_secs(10), || {
        let v = eps[0].try_json(&["keys", "list"])?;
        if v[0]["installed_on"] == 3 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });

    // node-3 is the one to rotate out: NEW goes to node-1 and node-2 only,
    // each from a file, never on a command line.
    let new_key = keygen();
    let key_file = scratch.path("new.key");
    std::fs::write(&key_file, format!("{new_key}\n")).expect("key file");
    let path = key_file.to_str().expect("utf-8 path");
    let mut new_id = String::new();
    for ep in &eps[..2] {
        let v = ep.json(&["keys", "install", "--local", "--key-file", path]);
        new_id = v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned();
    }
    let refused = eps[0].cli(&["keys", "use", &new_id, "--wait", "2"]);
    assert!(
        refused
            .error_line()
            .contains(&format!("key {new_id} is not installed on node-3")),
        "{}",
        refused.describe()
    );
    let used = eps[1].json(&["keys", "use", &new_id, "--exclude", "node-3"]);
    assert_eq!(
        (&used["missing"], &used["excluded"]),
        (&serde_json::json!([]), &serde_json::json!(["node-3"])),
        "{used}"
    );
    let removed = eps[0].json(&["keys", "remove", &old_id, "--exclude", "node-3"]);
    assert_eq!(removed["missing"], serde_json::json!([]), "{removed}");
    for ep in &eps[..2] {
        assert_eq!(ep.keyring(), [(new_id.clone(), true)], "keyring of {}", ep.name);
    }
    assert_eq!(eps[2].keyring(), [(old_id.clone(), true)], "keyring of node-3");
    assert_eq!(eps[2].json(&["keys", "export"]), serde_json::json!([key]));

    // node-3 is cut off: the others mark it failed, and its writes never
    // reach them.
    eps[2].json(&["put", "from-node-3", "injected"]);
    eps[0].json(&["put", "from-node-1", "kept"]);
    wait_until("node-2 reads node-1's write", Duration::from_secs(10), || {
        eps[1].value("from-node-1").map(|_| ())
    });
    let cut = [("node-1", "alive"), ("node-2", "alive"), ("node-3", "failed")];
    wait_until("node-3 failed on node-1 and node-2", Duration::from_secs(30), || {
        views_match(&all[..2], &cut, None)
    });
    for ep in &eps[..2] {
        assert!(ep.value("from-node-3").is_err(), "{} accepted node-3's write", ep.name);
    }
    assert!(eps[2].value("from-node-1").is_err(), "node-3 read node-1's write");

    // Overlays created through the API take their key from a file too, and
    // a plaintext one on the default wildcard address is refused before it
    // binds anything.
    let created = eps[0].json(&[
        "overlays",
        "create",
        "second",
        "--bind",
        "127.0.0.1:0",
        "--key-file",
        path,
    ]);
    assert_eq!(created["status"], "running", "{created}");
    assert_eq!(
        eps[0].json(&["--overlay", "second", "keys", "export"]),
        serde_json::json!([new_key])
    );
    let refused = eps[0].cli(&["overlays", "create", "third", "--plaintext"]);
    assert_eq!(
        refused.error_line(),
        "rumormill: overlay \"third\": plaintext on 0.0.0.0:7950, which is not a loopback address: anyone on the \
         network could read and inject its packets; give a key, bind to 127.0.0.1, or set allow_plaintext_network = true (HTTP 422)"
    );
}

#[test]
fn open_data_directories_and_plaintext_networks_are_refused_in_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("refusals");
    // A data directory other users can read (mode 755 under umask 022).
    let open = scratch.path("open");
    std::fs::create_dir_all(&open).expect("directory");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut c = command();
    c.args([
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&open);
    let ran = run(c, "rumormill agent (open data directory)".into(), CLI_TIMEOUT);
    assert_eq!(
        ran.error_line(),
        format!(
            "rumormill: data directory {0} is open to other users (mode 755) and holds keys: run `chmod 700 {0}`",
            open.display()
        )
    );
    assert!(
        !open.join("admin-token").exists(),
        "a token was written into the open directory"
    );

    // Plain text on a wildcard address: refused unless asked for. (Never
    // started here: tests stay on loopback.)
    let mut c = command();
    c.args([
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--plaintext",
        "--bind",
        "0.0.0.0:0",
        "--data-dir",
    ])
    .arg(scratch.path("plain"));
    let ran = run(c, "rumormill agent --plaintext --bind 0.0.0.0:0".into(), CLI_TIMEOUT);
    assert_eq!(
        ran.error_line(),
        "rumormill: overlay \"default\": plaintext on 0.0.0.0:0, which is not a loopback address: anyone on the \
         network could read and inject its packets; give a key, bind to 127.0.0.1, or set allow_plaintext_network = true"
    );

    // A key file that holds no key.
    let bad = scratch.path("bad.key");
    std::fs::write(&bad, "not a key\n").expect("key file");
    let mut c = command();
    c.args([
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--bind",
        "127.0.0.1:0",
        "--key-file",
    ])
    .arg(&bad)
    .arg("--data-dir")
    .arg(scratch.path("bad"));
    let ran = run(c, "rumormill agent --key-file bad.key".into(), CLI_TIMEOUT);
    assert_eq!(
        ran.error_line(),
        format!(
            "rumormill: key file {}: a key is not valid base64 (make one with `rumormill keygen`)",
            bad.display()
        )
    );
}

#[test]
fn the_key_can_come_from_standard_input_out_of_the_process_list() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("key-stdin");
    let key = keygen();
    let ep = Endpoint {
        name: "stdin".into(),
        dir: scratch.path("data"),
        api: loopback(free_tcp_port()),
    };
    let mut c = command();
    c.args(["agent", "--profile", "local", "--key-file", "-", "--listen"])
        .arg(ep.api.to_string())
        .arg("--bind")
        .arg(loopback(free_gossip_port()).to_string())
        .arg("--data-dir")
        .arg(&ep.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = ChildGuard(Some(c.spawn().expect("agent starts")));
    let running = child.0.as_mut().expect("spawned");
    {
        let mut stdin = running.stdin.take().expect("piped");
        writeln!(stdin, "{key}").expect("key written");
    }
    let pid = running.id();
    wait_until("the agent answers", Duration::from_secs(15), || {
        ep.try_json(&["overlays", "list"]).map(|_| ())
    });
    let exported = ep.json(&["keys", "export"]);
    assert_eq!(
        exported,
        serde_json::json!([key]),
        "the key read from standard input is the keyring"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&key),
        "the key is in the process list"
    );
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&ep.dir), 0o700, "data directory mode");
    assert_eq!(mode(&ep.dir.join("rumormill.redb")), 0o600, "database file mode");
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

    // Reads need a token too.
    let ran = client(&["get", "k"], &empty);
    assert_eq!(
        ran.error_line(),
        "rumormill: this request needs a token: send `Authorization: Bearer <token>` with the read token \
         or the admin token (files read-token and admin-token in the agent's data directory) \
         (HTTP 401; give --token, or --data-dir of that agent)"
    );
    // Neither write went through.
    let ran = client(&["get", "k"], &ep.dir);
    assert_eq!(ran.error_line(), "rumormill: no value under key \"k\" (HTTP 404)");
    // The right token, from the agent's data directory, works.
    let ran = client(&["put", "k", "v"], &ep.dir);
    assert!(ran.status.success(), "{}", ran.describe());
    let ran = client(&["get", "k"], &ep.dir);
    assert_eq!(ran.stdout, "v\n", "{}", ran.describe());

    // Both tokens were made at the first start, readable by the owner only.
    let read = std::fs::read_to_string(ep.dir.join("read-token")).expect("read-token");
    let admin = std::fs::read_to_string(ep.dir.join("admin-token")).expect("admin-token");
    assert_ne!(read.trim(), admin.trim());
    for f in ["read-token", "admin-token"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(ep.dir.join(f)).expect("token file").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // The read token, from a file or standard input (out of `ps`), reads
    // and cannot write.
    let token_file = scratch.path("read.token");
    std::fs::write(&token_file, format!("{read}\n")).expect("token file");
    let token_path = token_file.to_str().expect("utf-8 path");
    let ran = client(&["--token-file", token_path, "get", "k"], &empty);
    assert_eq!(ran.stdout, "v\n", "{}", ran.describe());
    let ran = client(&["--token-file", token_path, "put", "k", "w"], &empty);
    assert_eq!(
        ran.error_line(),
        "rumormill: the read token cannot do this: it needs the admin token \
         (file admin-token in the agent's data directory) (HTTP 403)"
    );
    let mut c = command();
    c.arg("--api").arg(&api).arg("--data-dir").arg(&empty);
    c.env("RUMORMILL_TOKEN_FILE", "-").args(["get", "k"]);
    let ran = run_with_stdin(c, "rumormill get k (token on stdin)", read.as_bytes());
    assert_eq!(ran.stdout, "v\n", "{}", ran.describe());
    let mut c = command();
    c.arg("--api").arg(&api).arg("--data-dir").arg(&empty);
    c.args(["--token-file", "-", "put", "k", "-"]);
    let ran = run_with_stdin(c, "rumormill put k - (token on stdin)", admin.as_bytes());
    assert_eq!(
        ran.error_line(),
        "rumormill: --token-file - and the value `-` cannot both read standard input"
    );
    let ran = client(
        &[
            "--token-file",
            scratch.path("none").to_str().expect("utf-8"),
            "get",
            "k",
        ],
        &empty,
    );
    assert!(
        ran.error_line().starts_with("rumormill: cannot read token file "),
        "{}",
        ran.describe()
    );
    // The admin token from a file writes; `--help` says why to prefer it.
    std::fs::write(&token_file, &admin).expect("token file");
    let ran = client(&["--token-file", token_path, "put", "k", "w"], &empty);
    assert!(ran.status.success(), "{}", ran.describe());
    let ran = client(&["--help"], &empty);
    assert!(ran.stdout.contains("--token-file"), "{}", ran.describe());
    assert!(
        ran.stdout.contains("Other local users can see it"),
        "{}",
        ran.describe()
    );

    // A web page through a rebinding DNS name gets nothing, even with a token.
    let read = read.trim();
    let answer = http_exchange(
        ep.api,
        &format!(
            "GET /v1/overlays/default/events?from=0 HTTP/1.1\r\nHost: rebind.example:{}\r\n\
             Authorization: Bearer {read}\r\nConnection: close\r\n\r\n",
            ep.api.port()
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("is not one this API answers to"), "{answer}");
    let answer = http_exchange(
        ep.api,
        &format!(
            "GET /v1/overlays/default/events?from=0 HTTP/1.1\r\nHost: {}\r\n\
             Authorization: Bearer {read}\r\nConnection: close\r\n\r\n",
            ep.api
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A half-sent request is closed after the header timeout (10 s).
    let mut half = TcpStream::connect(ep.api).expect("connect to the API");
    half.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
        .expect("send");
    half.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = half.read(&mut buf);
    let elapsed = started.elapsed();
    assert!(
        matches!(read, Ok(0)) && elapsed < Duration::from_secs(15),
        "a half-sent request was not closed: {read:?} after {elapsed:?}"
    );
    assert!(elapsed >= Duration::from_secs(5), "closed too early: {elapsed:?}");
}

/// Sends a raw HTTP request and returns the whole answer.
fn http_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a command with `input` on its standard input.
fn run_with_stdin(mut cmd: std::process::Command, what: &str, input: &[u8]) -> common::Ran {
    use std::io::Write;
    let file = std::env::temp_dir().join(format!("rm-stdin-{}-{}", std::process::id(), what.len()));
    std::fs::File::create(&file)
        .and_then(|mut f| f.write_all(input))
        .expect("stdin file");
    cmd.stdin(std::fs::File::open(&file).expect("stdin file"));
    let ran = run(cmd, what.to_owned(), CLI_TIMEOUT);
    let _ = std::fs::remove_file(&file);
    ran
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
        7,
        Security::Encrypted(Keyring::new(&foreign_key).expect("keyring")),
    );
    let cluster_key = rumormill::config::decode_key(&key).expect("key");
    let mut insider = Codec::new(
        overlay,
        0xfeed_f00d,
        1,
        7,
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
