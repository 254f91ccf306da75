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
    let removing_primary = a.remove_key("default", &old_id, wait).await.unwrap_err();
    assert!(
        removing_primary
            .to_string()
            .contains("is the primary key: make another one primary first"),
        "{removing_primary}"
    );
    let used = c
        .use_key("default", &installed.id, wait)
        .await
        .expect("use, from another agent");
    assert_eq!(used.missing, Vec::<String>::new());
    // A no-op from an agent whose write clock is ahead (b writes all the
    // time), right before a real change elsewhere, must not undo it.
    let noop = b.use_key("default", &installed.id, wait).await.expect("no-op use");
    assert_eq!(noop.missing, Vec::<String>::new());
    let removed = a.remove_key("default", &old_id, wait).await.expect("remove");
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
