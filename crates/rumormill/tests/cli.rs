//! The `rumormill` binary: output shape and errors on bad input.

use std::process::Command;

fn rumormill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rumormill"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn sim_membership_prints_one_json_object_with_the_promised_fields() {
    let out = rumormill(&[
        "sim",
        "membership",
        "--nodes",
        "20",
        "--kill",
        "1",
        "--duration-s",
        "40",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    for key in [
        "false_positives",
        "detect_first_s",
        "detect_all_s",
        "converged",
        "messages_per_member_per_s",
        "bytes_per_member_per_s",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {stdout}");
    }
    assert_eq!(v["false_positives"], 0);
    assert_eq!(v["converged"], true);
    assert!(v["detect_all_s"].as_f64().is_some_and(|s| s > 0.0));
}

#[test]
fn sim_racks_prints_the_flat_run_and_the_racked_run_once_measurable() {
    let out = rumormill(&[
        "sim",
        "racks",
        "--racks",
        "2",
        "--members-per-rack",
        "8",
        "--kill-gateway",
        "--duration-s",
        "30",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(
        v["flat_cross_rack_bytes_per_s"].as_f64().is_some_and(|b| b > 0.0),
        "{stdout}"
    );
    assert_eq!(v["flat"]["events_lost"], 0, "{stdout}");
    // The racked run's figures are there together, or not at all.
    let racked = [
        "cross_rack_packets",
        "cross_rack_packets_from_non_gateways",
        "cross_rack_bytes_per_s",
        "update_all_p99_ms",
        "event_remote_p99_ms",
        "gateway_failover_s",
        "events_published",
        "events_lost",
        "payload_bytes_to_racks_without_subscribers",
        "false_positives",
        "converged",
    ];
    let present = racked.iter().filter(|k| v.get(**k).is_some()).count();
    assert!(present == 0 || present == racked.len(), "{stdout}");
}

#[test]
fn the_same_seed_prints_the_same_bytes() {
    let args = [
        "sim",
        "membership",
        "--nodes",
        "30",
        "--loss",
        "0.05",
        "--kill",
        "2",
        "--duration-s",
        "30",
        "--seed",
        "4",
        "--json",
    ];
    assert_eq!(rumormill(&args).stdout, rumormill(&args).stdout);
}

#[test]
fn bad_arguments_give_one_readable_line_and_a_failure_status() {
    for (args, needle) in [
        (vec!["sim", "membership", "--nodes", "1"], "--nodes must be at least 2"),
        (vec!["sim", "membership", "--loss", "1.5"], "--loss must be in [0, 1)"),
        (
            vec!["sim", "membership", "--nodes", "5", "--kill", "5"],
            "--kill must be below --nodes",
        ),
        (
            vec!["sim", "membership", "--duration-s=-3"],
            "--duration-s must be a positive",
        ),
        (vec!["sim", "membership", "--nodes", "many"], "invalid value 'many'"),
        (vec!["sim", "demers", "--k", "0"], "k"),
        (vec!["sim", "racks", "--racks", "1"], "racks must be at least 2"),
        (
            vec!["sim", "racks", "--members-per-rack", "3"],
            "members per rack must be at least",
        ),
        (
            vec!["sim", "demers", "--direction", "sideways"],
            "push, pull, push-pull",
        ),
    ] {
        let out = rumormill(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line, got {stderr}");
    }
}

#[test]
fn keygen_prints_a_usable_256_bit_key() {
    let a = rumormill(&["keygen"]);
    let b = rumormill(&["keygen"]);
    assert!(a.status.success());
    let key = String::from_utf8(a.stdout).expect("utf-8");
    let key = key.trim();
    assert_eq!(rumormill::config::decode_key(key).map(|k| k.len()), Ok(32), "{key}");
    assert_ne!(key.as_bytes(), b.stdout.trim_ascii(), "two keys were equal");
}

#[test]
fn client_commands_without_an_agent_say_so_in_one_line() {
    let dir = std::env::temp_dir().join(format!("rm-cli-noagent-{}", std::process::id()));
    let out = rumormill(&[
        "--api",
        "127.0.0.1:1",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "members",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        "rumormill: no agent answers at 127.0.0.1:1 (start one with `rumormill agent`, or give --api)\n"
    );
}

#[test]
fn demo_runs_a_cluster_and_stops_by_itself() {
    let out = rumormill(&["demo", "--nodes", "4", "--listen", "127.0.0.1:0", "--duration", "7"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("node-1 sees 4 alive, 0 suspect, 0 failed; 4/4 running agents see the same alive set"),
        "{stdout}"
    );
    assert!(
        stdout.contains("put demo/latest on node-2: on 4/4 running agents"),
        "{stdout}"
    );
    assert!(stdout.contains("every agent leaves gracefully"), "{stdout}");
}
