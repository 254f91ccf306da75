//! The inbox of in-process agents on loopback: membership changes and
//! luggage changes arrive as local topics, in order, once.

use std::sync::Arc;
use std::time::Duration;

use rumormill::agent::Agent;
use rumormill::config::{AgentConfig, OverlaySpec, Profile};
use rumormill::events::InboxItem;
use rumormill::transport::TokioNet;

type A = Arc<Agent<TokioNet>>;

async fn start(dir: &std::path::Path, name: &str, seed: Option<std::net::SocketAddr>) -> A {
    let mut spec = OverlaySpec::named("default");
    spec.bind = "127.0.0.1:0".into();
    spec.member = Some(name.into());
    spec.plaintext = true;
    spec.profile = Profile::Local;
    spec.seeds = seed.map(|s| vec![s.to_string()]).unwrap_or_default();
    let config = AgentConfig {
        data_dir: dir.join(name),
        overlays: vec![spec],
        ..AgentConfig::default()
    };
    Agent::start(TokioNet, config).await.expect("agent starts")
}

/// Polls the inbox until `pred` holds on it, at most 10 s.
async fn wait_inbox(a: &A, what: &str, pred: impl Fn(&[InboxItem]) -> bool) -> Vec<InboxItem> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let items = a.inbox("default", 0, 1000).await.expect("inbox");
        if pred(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 10 s for {what}; inbox: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_luggage_changes_are_local_topics() {
    let dir = std::env::temp_dir().join(format!("rm-inbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = start(&dir, "in-a", None).await;
    let topics: Vec<String> = ["member.joined", "member.left", "luggage.changed"]
        .map(String::from)
        .to_vec();
    a.subscribe("default", &topics).await.expect("subscribe");
    let seed = a.overlay("default").await.expect("overlay").addr;
    let b = start(&dir, "in-b", Some(seed)).await;
    let joined = wait_inbox(&a, "member.joined", |i| i.iter().any(|x| x.topic == "member.joined")).await;
    assert_eq!(joined[0].member.as_deref(), Some("in-b"));
    b.set_luggage("default", "version", b"2.0".to_vec())
        .await
        .expect("luggage");
    let items = wait_inbox(&a, "luggage.changed", |i| {
        i.iter().any(|x| x.topic == "luggage.changed")
    })
    .await;
    let change = items.iter().find(|x| x.topic == "luggage.changed").expect("found");
    assert_eq!(
        (
            change.member.as_deref(),
            change.key.as_deref(),
            change.payload.as_deref()
        ),
        (Some("in-b"), Some("version"), Some("2.0"))
    );
    assert_eq!(
        a.luggage("default", Some("in-b".into())).await.expect("luggage"),
        vec![("in-b".to_owned(), "version".to_owned(), b"2.0".to_vec())]
    );
    b.shutdown(true).await;
    let items = wait_inbox(&a, "member.left", |i| i.iter().any(|x| x.topic == "member.left")).await;
    // In order, numbered from 1 without gaps, each change once.
    let seqs: Vec<u64> = items.iter().map(|x| x.seq).collect();
    assert_eq!(seqs, (1..=items.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        items.iter().filter(|x| x.topic == "member.joined").count(),
        1,
        "{items:?}"
    );
    // Kept across a restart of the agent, and numbering goes on.
    a.shutdown(false).await;
    drop(a);
    let a = start(&dir, "in-a", None).await;
    assert_eq!(
        a.subscriptions("default").await.expect("topics"),
        vec!["luggage.changed", "member.joined", "member.left"]
    );
    assert_eq!(a.inbox("default", 0, 1000).await.expect("inbox"), items);
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}
