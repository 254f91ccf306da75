//! Discovery on loopback: multicast announcements (TTL 0, so nothing leaves
//! the host) and DNS seeds.

use std::sync::Arc;
use std::time::Duration;

use rumormill::agent::Agent;
use rumormill::config::{AgentConfig, MulticastSpec, OverlaySpec, Profile};
use rumormill::transport::TokioNet;

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    s.local_addr().expect("probe address").port()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-discovery-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut OverlaySpec)) -> Arc<Agent<TokioNet>> {
    let mut spec = OverlaySpec::named("default");
    spec.bind = "127.0.0.1:0".into();
    spec.member = Some(name.into());
    spec.plaintext = true;
    spec.profile = Profile::Local;
    edit(&mut spec);
    let config = AgentConfig {
        data_dir: dir.join(name),
        overlays: vec![spec],
        ..AgentConfig::default()
    };
    Agent::start(TokioNet, config).await.expect("agent starts")
}

/// Polls until every agent sees `n` members alive, at most `limit`.
async fn wait_alive(agents: &[&Arc<Agent<TokioNet>>], n: usize, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut counts = Vec::new();
        for a in agents {
            let members = a.members("default").await.expect("members");
            counts.push(members.iter().filter(|m| m.state == "alive").count());
        }
        if counts.iter().all(|&c| c == n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected every agent to see {n} alive within {limit:?}, saw {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn multicast_announcements_join_members_on_this_host() {
    let dir = temp_dir("multicast");
    let group_port = free_port();
    let multicast = |spec: &mut OverlaySpec| {
        spec.multicast = Some(MulticastSpec {
            group: std::net::SocketAddr::from(([239, 255, 79, 50], group_port)),
            interface: std::net::Ipv4Addr::LOCALHOST,
            ttl: 0,
            interval: Duration::from_millis(200),
        });
    };
    let a = start(&dir, "mc-a", multicast).await;
    let b = start(&dir, "mc-b", multicast).await;
    let c = start(&dir, "mc-c", multicast).await;
    wait_alive(&[&a, &b, &c], 3, Duration::from_secs(15)).await;
    for agent in [a, b, c] {
        agent.shutdown(false).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dns_seeds_are_resolved() {
    let dir = temp_dir("dns");
    let a = start(&dir, "dns-a", |_| {}).await;
    let port = a.overlay("default").await.expect("overlay").addr.port();
    let b = start(&dir, "dns-b", |spec| spec.seeds = vec![format!("localhost:{port}")]).await;
    wait_alive(&[&a, &b], 2, Duration::from_secs(15)).await;
    for agent in [a, b] {
        agent.shutdown(false).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
