//! Real-process test of the per-writer quota (issue 12, finding 5, at a
//! smaller scale): values written through one agent, totalling well over
//! the quota, cannot grow another agent's memory beyond it, and once they
//! are deleted that memory is given back.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Resident memory of a process, in bytes (`VmRSS` of /proc/<pid>/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kb * 1024
}

const MIB: u64 = 1 << 20;

/// `rumormill put KEY -` with the value read from a file.
fn put_from_file(ep: &Endpoint, key: &str, file: &std::path::Path) -> Ran {
    let mut c = command();
    c.arg("--api")
        .arg(ep.api.to_string())
        .arg("--data-dir")
        .arg(&ep.dir)
        .arg("--json")
        .args(["put", key, "-"])
        .stdin(Stdio::from(std::fs::File::open(file).expect("value file")));
    run(c, format!("{}: rumormill put {key} -", ep.name), CLI_TIMEOUT)
}

#[test]
fn values_over_the_writers_quota_do_not_grow_another_agents_memory_and_deletes_give_it_back() {
    let scratch = Scratch::new("quotas");
    let key = keygen();
    let mut a = Agent::launch(&scratch, 1, &key, None);
    a.ready(true);
    let mut b = Agent::launch(&scratch, 2, &key, Some(a.gossip));
    b.ready(true);
    wait_until("b to see a alive", Duration::from_secs(10), || {
        let m = b.ep.members()?;
        m.iter()
            .any(|(n, s, _)| n == "node-1" && s == "alive")
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let baseline = rss(b.pid());
    // 40 values of 1 MiB through a: 40 MiB, the default quota is 16 MiB.
    let file = scratch.path("value");
    std::fs::write(&file, "x".repeat(MIB as usize)).expect("value file");
    let started = Instant::now();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut peak = baseline;
    for i in 0..40 {
        let k = format!("v{i:02}");
        let ran = put_from_file(&a.ep, &k, &file);
        if ran.status.success() {
            accepted.push(k);
        } else {
            let line = ran.error_line();
            assert!(line.contains("at most 16777216 per writer"), "{}", ran.describe());
            refused.push(k);
        }
        peak = peak.max(rss(b.pid()));
    }
    assert_eq!(
        accepted.len(),
        15,
        "15 values of 1 MiB and their keys fit 16 MiB: {accepted:?}"
    );
    assert_eq!(refused.len(), 25);
    let last = accepted.last().expect("some accepted").clone();
    wait_until("b to hold a's accepted values", Duration::from_secs(15), || {
        peak = peak.max(rss(b.pid()));
        b.ep.value(&last).map(|_| ())
    });
    for _ in 0..10 {
        peak = peak.max(rss(b.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let filled = rss(b.pid());
    eprintln!(
        "b: baseline {} MiB, peak {} MiB, holding a's 15 MiB {} MiB ({:.1} s)",
        baseline / MIB,
        peak / MIB,
        filled / MIB,
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak < baseline + 3 * 16 * MIB,
        "b grew from {} to {} MiB for a 16 MiB quota",
        baseline / MIB,
        peak / MIB
    );
    for k in &accepted {
        let ran = a.ep.cli(&["delete", k]);
        assert!(ran.status.success(), "{}", ran.describe());
    }
    wait_until("b to see the deletes", Duration::from_secs(15), || {
        match b.ep.value(&last) {
            Ok(_) => Err("still there".to_owned()),
            Err(_) => Ok(()),
        }
    });
    let (after, _) = wait_until(
        "b's memory to come back near its baseline",
        Duration::from_secs(10),
        || {
            let now = rss(b.pid());
            if now < baseline + 8 * MIB {
                Ok(now)
            } else {
                Err(format!("baseline {} MiB, now {} MiB", baseline / MIB, now / MIB))
            }
        },
    );
    eprintln!("b after the deletes: {} MiB", after / MIB);
}
