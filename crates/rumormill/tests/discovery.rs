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

/// The operating system's network, with a resolver the test controls.
#[derive(Clone, Default)]
struct ScriptedDns {
    answers: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    lookups: Arc<std::sync::atomic::AtomicUsize>,
}

impl rumormill::transport::Net for ScriptedDns {
    type Udp = <TokioNet as rumormill::transport::Net>::Udp;
    type Listener = <TokioNet as rumormill::transport::Net>::Listener;
    type Stream = <TokioNet as rumormill::transport::Net>::Stream;

    async fn bind_udp(&self, addr: std::net::SocketAddr) -> std::io::Result<Self::Udp> {
        TokioNet.bind_udp(addr).await
    }
    async fn bind_tcp(&self, addr: std::net::SocketAddr) -> std::io::Result<Self::Listener> {
        TokioNet.bind_tcp(addr).await
    }
    async fn connect(&self, from: std::net::IpAddr, addr: std::net::SocketAddr) -> std::io::Result<Self::Stream> {
        TokioNet.connect(from, addr).await
    }
    async fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        assert_eq!(host, "seeds.example");
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self.answers.lock().expect("answers").clone())
    }
}

#[tokio::test]
async fn dns_seeds_are_resolved_again_until_they_answer() {
    let dir = temp_dir("dns-again");
    let a = start(&dir, "again-a", |_| {}).await;
    let a_addr = a.overlay("default").await.expect("overlay").addr;
    let dns = ScriptedDns::default();
    let mut spec = OverlaySpec::named("default");
    spec.bind = "127.0.0.1:0".into();
    spec.member = Some("again-b".into());
    spec.plaintext = true;
    spec.profile = Profile::Local;
    spec.seeds = vec!["seeds.example:7950".into()];
    spec.dns_refresh = Duration::from_millis(100);
    let config = AgentConfig {
        data_dir: dir.join("again-b"),
        overlays: vec![spec],
        ..AgentConfig::default()
    };
    let b = Agent::start(dns.clone(), config).await.expect("agent starts");
    // The name resolves to nothing yet: b stays alone.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let lookups = dns.lookups.load(std::sync::atomic::Ordering::SeqCst);
    assert!(lookups >= 3, "resolved {lookups} times in 350 ms with a 100 ms refresh");
    assert_eq!(b.members("default").await.expect("members").len(), 1);
    // Now it answers with a's address.
    dns.answers.lock().expect("answers").push(a_addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b
        .members("default")
        .await
        .expect("members")
        .iter()
        .filter(|m| m.state == "alive")
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b did not join a once the name resolved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown(false).await;
    b.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stranger announcing thousands of addresses makes the agent contact
/// only a few per interval (before: one state exchange per address, up to
/// 4,096 every 30 s).
#[tokio::test]
async fn a_flood_of_announcements_makes_only_a_few_contacts() {
    use rumormill::discovery::{Announcement, CONTACTS_PER_INTERVAL};
    let dir = temp_dir("flood");
    let group = std::net::SocketAddr::from(([239, 255, 79, 51], free_port()));
    let interval = Duration::from_millis(200);
    let a = start(&dir, "flood-a", |spec| {
        spec.multicast = Some(MulticastSpec {
            group,
            interface: std::net::Ipv4Addr::LOCALHOST,
            ttl: 0,
            interval,
        });
    })
    .await;
    let sent_before = a.overlay("default").await.expect("overlay").stats.frames_sent;
    let socket = {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
        s.set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
            .expect("interface");
        s.set_multicast_ttl_v4(0).expect("ttl");
        s.set_multicast_loop_v4(true).expect("loop");
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        std::net::UdpSocket::from(s)
    };
    let overlay = rumormill_wire::overlay_id("default");
    let started = tokio::time::Instant::now();
    // 2,000 addresses in loopback space where nothing listens, for 1 s.
    for i in 0..2000u32 {
        let ip = std::net::Ipv4Addr::from(0x7f42_0000 + i);
        let announcement = Announcement {
            overlay,
            addr: std::net::SocketAddr::from((ip, 9)),
            name: format!("ghost-{i}"),
        };
        socket.send_to(&announcement.encode(), group).expect("announce");
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elapsed = started.elapsed();
    let sent = a.overlay("default").await.expect("overlay").stats.frames_sent - sent_before;
    let intervals = (elapsed.as_millis() / interval.as_millis()) as u64 + 1;
    let bound = intervals * u64::from(CONTACTS_PER_INTERVAL);
    eprintln!("2,000 announced addresses in {elapsed:?}: {sent} state exchanges sent (bound {bound})");
    assert!(sent > 0, "announced addresses are contacted at all");
    assert!(
        sent <= bound,
        "{sent} state exchanges in {elapsed:?}: at most {CONTACTS_PER_INTERVAL} per {interval:?} expected"
    );
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}
