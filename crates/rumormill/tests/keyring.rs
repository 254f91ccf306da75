//! Cluster-wide key rotation between agents on loopback: one agent takes
//! each step, every member follows, traffic keeps flowing.

use std::sync::Arc;
use std::time::Duration;

use rumormill::agent::Agent;
use rumormill::config::{AgentConfig, OverlaySpec, Profile};
use rumormill::transport::TokioNet;

type A = Arc<Agent<TokioNet>>;

async fn start(dir: &std::path::Path, name: &str, key: &str, seed: Option<std::net::SocketAddr>) -> A {
    let mut spec = OverlaySpec::named("default");
    spec.bind = "127.0.0.1:0".into();
    spec.member = Some(name.into());
    spec.keys = vec![key.into()];
    spec.profile = Profile::Local;
    spec.seeds = seed.map(|s| vec![s.to_string()]).unwrap_or_default();
    let config = AgentConfig {
        data_dir: dir.join(name),
        overlays: vec![spec],
        ..AgentConfig::default()
    };
    Agent::start(TokioNet, config).await.expect("agent starts")
}

async fn rejected(a: &A) -> u64 {
    a.overlay("default").await.expect("overlay").stats.rejected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_rotates_the_key_of_every_member() {
    let dir = std::env::temp_dir().join(format!("rm-keyring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let old = rumormill::config::generate_key();
    let a = start(&dir, "k-a", &old, None).await;
    let seed = a.overlay("default").await.expect("overlay").addr;
    let b = start(&dir, "k-b", &old, Some(seed)).await;
    let c = start(&dir, "k-c", &old, Some(seed)).await;
    let all = [&a, &b, &c];
    // Everyone knows everyone and every report has arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let keys = a.keys("default").await.expect("keys");
        if keys[0].installed_on == 3 && keys[0].members == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full view of the keyring: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old_id = a.keys("default").await.expect("keys")[0].id.clone();

    // Traffic during the whole rotation: a write every 20 ms from b.
    let writer = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 0..200u32 {
                b.put("default", "tick", i.to_string().into_bytes()).await.expect("put");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let new = rumormill::config::generate_key();
    let wait = Duration::from_secs(10);
    let installed = a.install_key("default", &new, wait).await.expect("install");
    assert_eq!((installed.members, installed.missing.len()), (3, 0), "{installed:?}");
    let removing_primary = a.remove_key("default", &old_id, wait, &[]).await.unwrap_err();
    assert!(
        removing_primary
            .to_string()
            .contains("is the primary key: make another one primary first"),
        "{removing_primary}"
    );
    let used = c
        .use_key("default", &installed.id, wait, &[])
        .await
        .expect("use, from another agent");
    assert_eq!(used.missing, Vec::<String>::new());
    // A no-op from an agent whose write clock is ahead (b writes all the
    // time), right before a real change elsewhere, must not undo it.
    let noop = b.use_key("default", &installed.id, wait, &[]).await.expect("no-op use");
    assert_eq!(noop.missing, Vec::<String>::new());
    let removed = a.remove_key("default", &old_id, wait, &[]).await.expect("remove");
    assert_eq!(removed.missing, Vec::<String>::new());

    for agent in all {
        let keys = agent.keys("default").await.expect("keys");
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!((keys[0].id.as_str(), keys[0].primary), (installed.id.as_str(), true));
        assert_eq!(agent.export_keys("default").await.expect("export"), vec![new.clone()]);
    }
    // After the rotation: nothing rejected while traffic goes on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = [rejected(&a).await, rejected(&b).await, rejected(&c).await];
    writer.await.expect("writer");
    let after = [rejected(&a).await, rejected(&b).await, rejected(&c).await];
    assert_eq!(before, after, "packets rejected after the rotation completed");
    for agent in all {
        let alive = agent
            .members("default")
            .await
            .expect("members")
            .iter()
            .filter(|m| m.state == "alive")
            .count();
        assert_eq!(alive, 3);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while agent.get("default", "tick").await.ok().and_then(|r| r.value).as_deref() != Some("199") {
            assert!(tokio::time::Instant::now() < deadline, "the last write did not arrive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for agent in all {
        agent.shutdown(false).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `check` every 20 ms for up to `secs` seconds.
async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(tokio::time::Instant::now() < deadline, "{what}: {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn full_view(agents: &[&A], n: usize) {
    for a in agents {
        eventually("every member and report known", 15, async || {
            let keys = a.keys("default").await.map_err(|e| e.to_string())?;
            if keys.iter().all(|k| k.installed_on == n && k.members == n) {
                Ok(())
            } else {
                Err(format!("{keys:?}"))
            }
        })
        .await;
    }
}

/// A base64 key's bytes.
fn decode_key(key: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("a base64 key")
}

/// Whether `needle` occurs in `hay`.
fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every value in an agent's replicated store, raw.
async fn store_values(a: &A) -> Vec<Vec<u8>> {
    a.handle("default")
        .await
        .expect("handle")
        .call(|o, _| o.store().iter().filter_map(|u| u.value.clone()).collect())
        .await
        .expect("store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_holder_is_rotated_out() {
    let dir = std::env::temp_dir().join(format!("rm-keyring-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let old = rumormill::config::generate_key();
    let a = start(&dir, "x-a", &old, None).await;
    let seed = a.overlay("default").await.expect("overlay").addr;
    let b = start(&dir, "x-b", &old, Some(seed)).await;
    let m = start(&dir, "x-m", &old, Some(seed)).await;
    full_view(&[&a, &b, &m], 3).await;
    let old_id = a.keys("default").await.expect("keys")[0].id.clone();

    // The operator installs NEW on the two agents it trusts, each alone.
    let new = rumormill::config::generate_key();
    let on_a = a.install_local_key("default", &new).await.expect("local install on a");
    let new_id = on_a.id.clone();
    assert_eq!(on_a.done, vec!["x-a".to_owned()], "{on_a:?}");
    b.install_local_key("default", &new).await.expect("local install on b");
    let listed = a.keys("default").await.expect("keys");
    assert!(
        listed.iter().any(|k| k.id == new_id && k.local && !k.primary),
        "{listed:?}"
    );

    // `use` waits for every member that holds the key; without `exclude`
    // it refuses, naming the one that lacks it.
    let refused = a
        .use_key("default", &new_id, Duration::from_secs(2), &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!("key {new_id} is not installed on x-m")),
        "{refused}"
    );
    let excluded = vec!["x-m".to_owned()];
    let used = a
        .use_key("default", &new_id, Duration::from_secs(10), &excluded)
        .await
        .expect("use, leaving x-m out");
    assert_eq!(
        (used.missing.clone(), used.excluded.clone()),
        (vec![], excluded.clone()),
        "{used:?}"
    );
    let removed = b
        .remove_key("default", &old_id, Duration::from_secs(10), &excluded)
        .await
        .expect("remove, leaving x-m out");
    assert_eq!(removed.missing, Vec::<String>::new(), "{removed:?}");

    // The two kept agents hold NEW only; the excluded one still holds OLD
    // only and never saw NEW's secret.
    for agent in [&a, &b] {
        assert_eq!(agent.export_keys("default").await.expect("export"), vec![new.clone()]);
    }
    assert_eq!(m.export_keys("default").await.expect("export"), vec![old.clone()]);
    let secret = decode_key(&new);
    for (who, agent) in [("x-a", &a), ("x-b", &b), ("x-m", &m)] {
        for v in store_values(agent).await {
            assert!(
                !holds(&v, &secret) && !holds(&v, new.as_bytes()),
                "NEW's secret is in {who}'s store: {}",
                String::from_utf8_lossy(&v)
            );
        }
    }

    // It can neither inject nor read: its writes never arrive, its
    // packets are rejected, and it cannot open the others' packets.
    let before = rejected(&m).await;
    let injected_before = rejected(&a).await;
    m.put("default", "injected", b"by x-m".to_vec())
        .await
        .expect("put on x-m");
    a.put("default", "secret", b"for a and b".to_vec())
        .await
        .expect("put on a");
    eventually("b gets a's write", 5, async || match b.get("default", "secret").await {
        Ok(r) if r.value.as_deref() == Some("for a and b") => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    eventually("x-m's packets rejected by a, a's by x-m", 10, async || {
        let (on_a, on_m) = (rejected(&a).await, rejected(&m).await);
        if on_a > injected_before && on_m > before {
            Ok(())
        } else {
            Err(format!(
                "rejected on a: {injected_before} -> {on_a}, on x-m: {before} -> {on_m}"
            ))
        }
    })
    .await;
    assert!(m.get("default", "secret").await.is_err(), "x-m read a's write");
    for agent in [&a, &b] {
        assert!(
            agent.get("default", "injected").await.is_err(),
            "x-m's write was accepted"
        );
    }
    for agent in [&a, &b, &m] {
        agent.shutdown(false).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_of_version_max_does_not_lock_rotations_out() {
    let dir = std::env::temp_dir().join(format!("rm-keyring-max-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let old = rumormill::config::generate_key();
    let a = start(&dir, "v-a", &old, None).await;
    let seed = a.overlay("default").await.expect("overlay").addr;
    let b = start(&dir, "v-b", &old, Some(seed)).await;
    let m = start(&dir, "v-m", &old, Some(seed)).await;
    full_view(&[&a, &b, &m], 3).await;

    // A key holder writes a desired keyring of version u64::MAX (the
    // current keys, so nothing visibly changes).
    let secret = decode_key(&old);
    let forged = rumormill_core::reserved::DesiredKeyring {
        version: u64::MAX,
        ids: vec![rumormill_wire::key_id(&secret)],
        shared: vec![zeroize::Zeroizing::new(secret)],
    }
    .encode()
    .to_vec();
    m.handle("default")
        .await
        .expect("handle")
        .call(move |o, now| {
            let wall = rumormill_core::WallTime::from(std::time::SystemTime::now());
            o.put(now, wall, "_rumormill/keyring/v-m", forged)
        })
        .await
        .expect("call")
        .expect("forged write");
    eventually("the forged keyring reaches a and b", 10, async || {
        for agent in [&a, &b] {
            let n = store_values(agent)
                .await
                .iter()
                .filter_map(|v| rumormill_core::reserved::DesiredKeyring::decode(v).ok())
                .filter(|d| d.version == u64::MAX)
                .count();
            if n == 0 {
                return Err("not yet".into());
            }
        }
        Ok(())
    })
    .await;

    // A member that joins after the forged write is not locked out either.
    let late = start(&dir, "v-late", &old, Some(seed)).await;
    full_view(&[&a, &late], 4).await;

    // Later rotations still win, from any agent.
    let wait = Duration::from_secs(10);
    let new = rumormill::config::generate_key();
    let installed = a.install_key("default", &new, wait).await.expect("install");
    assert_eq!(installed.missing, Vec::<String>::new(), "{installed:?}");
    let used = b.use_key("default", &installed.id, wait, &[]).await.expect("use");
    assert_eq!(used.missing, Vec::<String>::new(), "{used:?}");
    assert_eq!(used.done.len(), 4, "{used:?}");
    for agent in [&a, &b, &m, &late] {
        let keys = agent.keys("default").await.expect("keys");
        let primary: Vec<&str> = keys.iter().filter(|k| k.primary).map(|k| k.id.as_str()).collect();
        assert_eq!(primary, vec![installed.id.as_str()], "{keys:?}");
    }
    for agent in [&a, &b, &m, &late] {
        agent.shutdown(false).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
