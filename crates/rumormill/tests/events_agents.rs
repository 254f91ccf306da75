//! Real-process test of events: five agents on loopback, two applications
//! following a topic through `rumormill subscribe`, at-least-once events
//! published while a subscriber agent and then the publisher are SIGKILLed
//! and restarted. Every application must see every event exactly once, and
//! the publisher must end with a `delivered` report per subscriber for each.
//!
//! The agent, port and polling helpers are shared with `tests/agents.rs`
//! (in `tests/common/mod.rs`): every port is picked free (bound on port 0
//! first), every agent has its own data directory under the target's
//! temporary directory, every child process is killed when its guard drops
//! (also on panic), and every wait is a bounded poll that names what it
//! expected and what it saw last.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The applications' topic.
const TOPIC: &str = "orders";
/// Events published by the test (`e0` … `e29`).
const EVENTS: usize = 30;
/// The publisher's resend interval.
const RETRY_EVERY: &str = "500ms";
/// The subscribers, by member name.
const SUBSCRIBERS: [&str; 2] = ["node-4", "node-5"];

// ----- events -------------------------------------------------------------------

impl Endpoint {
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
