//! Quotas of in-process agents on loopback: a write over the writer's
//! quota is a 413 with a clear message, a member with a smaller quota
//! refuses (and counts) what it will not store, and the inbox keeps to its
//! byte cap without dropping an at-least-once event.

use std::sync::Arc;
use std::time::Duration;

use rumormill::agent::Agent;
use rumormill::client::{Client, ClientError};
use rumormill::config::{AgentConfig, Limits, OverlaySpec, Profile};
use rumormill::events::{DeliverySpec, InboxItem};
use rumormill::transport::TokioNet;
use serde_json::json;

type A = Arc<Agent<TokioNet>>;

async fn start(dir: &std::path::Path, name: &str, seed: Option<std::net::SocketAddr>, limits: Limits) -> A {
    let mut spec = OverlaySpec::named("default");
    spec.bind = "127.0.0.1:0".into();
    spec.member = Some(name.into());
    spec.plaintext = true;
    spec.profile = Profile::Local;
    spec.seeds = seed.map(|s| vec![s.to_string()]).unwrap_or_default();
    spec.limits = limits;
    let config = AgentConfig {
        data_dir: dir.join(name),
        overlays: vec![spec],
        ..AgentConfig::default()
    };
    Agent::start(TokioNet, config).await.expect("agent starts")
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-quotas-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Polls `check` every 20 ms until it gives a value, at most `secs`.
async fn wait<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "waited {secs} s for {what}: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_whole_stores_cap_is_a_413_naming_the_store_limit() {
    let dir = scratch("store");
    let limits = Limits {
        store_bytes: Some(100_000),
        ..Limits::default()
    };
    let a = start(&dir, "s-a", None, limits).await;
    let (api, server) = rumormill::api::serve(a.clone(), "127.0.0.1:0".parse().expect("addr"), "sesame".into())
        .await
        .expect("API");
    let admin = Client::new(api, Some("sesame".into()));
    let body = json!({ "value": "x".repeat(60_000) });
    admin
        .request("PUT", "/v1/overlays/default/updates/one", Some(body.clone()))
        .await
        .expect("60 kB fit 100 kB");
    match admin
        .request("PUT", "/v1/overlays/default/updates/two", Some(body))
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 413, "{message}");
            assert!(message.contains("store_bytes"), "names the store limit: {message}");
            assert!(message.contains("at most 100000 for all writers"), "{message}");
        }
        other => panic!("expected a 413, got {other:?}"),
    }
    server.abort();
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_quota_is_a_413_and_a_member_with_a_smaller_quota_counts_what_it_refuses() {
    let dir = scratch("api");
    let big = Limits {
        writer_bytes: Some(10 << 20),
        ..Limits::default()
    };
    let small = Limits {
        writer_bytes: Some(100_000),
        luggage_total: Some(50_000),
        ..Limits::default()
    };
    let a = start(&dir, "q-a", None, small.clone()).await;
    let seed = a.overlay("default").await.expect("overlay").addr;
    let (api, server) = rumormill::api::serve(a.clone(), "127.0.0.1:0".parse().expect("addr"), "sesame".into())
        .await
        .expect("API");
    let admin = Client::new(api, Some("sesame".into()));
    let body = json!({ "value": "x".repeat(60_000) });
    admin
        .request("PUT", "/v1/overlays/default/updates/one", Some(body.clone()))
        .await
        .expect("60 kB fit 100 kB");
    match admin
        .request("PUT", "/v1/overlays/default/updates/two", Some(body.clone()))
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 413, "{message}");
            assert!(message.contains("at most 100000 per writer"), "{message}");
            assert!(message.contains("q-a"), "names the writer: {message}");
        }
        other => panic!("expected a 413, got {other:?}"),
    }
    // Replacing the value counts its new size only.
    admin
        .request(
            "PUT",
            "/v1/overlays/default/updates/one",
            Some(json!({ "value": "small" })),
        )
        .await
        .expect("replaced");

    // b accepts 10 MiB per writer, a only 100 kB: what b writes beyond
    // that, a refuses on receipt and counts.
    let b = start(&dir, "q-b", Some(seed), big).await;
    for i in 0..3 {
        b.put("default", &format!("b{i}"), vec![b'v'; 60_000])
            .await
            .expect("b's quota is 10 MiB");
    }
    // Whichever arrives first is stored; the others are refused.
    let held = async || {
        let mut n = 0;
        for k in ["b0", "b1", "b2"] {
            n += usize::from(a.get("default", k).await.is_ok());
        }
        n
    };
    let refused = wait("a to refuse b's writes", 10, async || {
        let s = a.overlay("default").await.map_err(|e| e.to_string())?.stats;
        let n = held().await;
        if s.quota_refused > 0 && n > 0 {
            Ok(s.quota_refused)
        } else {
            Err(format!("quota_refused = {}, {n} of b's values held", s.quota_refused))
        }
    })
    .await;
    assert!(refused >= 1);
    assert_eq!(held().await, 1, "one 60 kB value of b fits a's 100 kB per writer");
    server.abort();
    b.shutdown(false).await;
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_keeps_to_its_byte_cap_evicting_best_effort_and_refusing_at_least_once() {
    let dir = scratch("inbox");
    let limits = Limits {
        event_payload: Some(100_000),
        inbox_bytes: Some(300_000),
        ..Limits::default()
    };
    let a = start(&dir, "q-in", None, limits).await;
    a.subscribe("default", &["t".to_owned()]).await.expect("subscribe");
    let payload = |i: usize| {
        let mut p = format!("{i:04}").into_bytes();
        p.resize(50_000, b'.');
        p
    };
    let inbox = async |a: &A| -> Vec<InboxItem> { a.inbox("default", 0, 1000).await.expect("inbox") };
    // Best effort: ten of 50 kB; the oldest are evicted to keep 300 kB.
    for i in 0..10 {
        a.publish("default", "t", payload(i), &DeliverySpec::BestEffort)
            .await
            .expect("publish");
    }
    let items = wait("the tenth best-effort event", 10, async || {
        let items = inbox(&a).await;
        match items.last() {
            Some(it) if it.payload.as_deref().is_some_and(|p| p.starts_with("0009")) => Ok(items),
            _ => Err(format!("{} entries", items.len())),
        }
    })
    .await;
    let stored: usize = items.iter().filter_map(|it| it.payload.as_ref()).map(String::len).sum();
    assert!(stored <= 300_000, "{stored} bytes of payload in the inbox");
    assert!(items.len() >= 4, "{} entries kept", items.len());
    assert!(
        items.iter().all(|it| it.payload_base64.is_some()),
        "base64 rendered at read time"
    );
    let stats = a.overlay("default").await.expect("overlay").stats;
    assert!(stats.inbox_evicted >= 4, "evicted {}", stats.inbox_evicted);
    // At least once: they evict the best-effort entries, then, once the
    // inbox holds only recent at-least-once events, new ones are refused
    // — not acknowledged, so still pending — rather than dropped.
    let alo = DeliverySpec::AtLeastOnce {
        retry_every: "200ms".into(),
        retry_max: 0,
    };
    let mut ids = Vec::new();
    for i in 100..110 {
        ids.push(a.publish("default", "t", payload(i), &alo).await.expect("publish").id);
    }
    let refused = wait("at-least-once events refused", 10, async || {
        let s = a.overlay("default").await.map_err(|e| e.to_string())?.stats;
        if s.inbox_refused > 0 {
            Ok(s.inbox_refused)
        } else {
            Err("none refused yet".into())
        }
    })
    .await;
    assert!(refused > 0);
    let items = inbox(&a).await;
    let kept: Vec<&InboxItem> = items
        .iter()
        .filter(|it| it.payload.as_deref().is_some_and(|p| p.starts_with("01")))
        .collect();
    assert!(
        !kept.is_empty() && kept.len() <= 6,
        "{} at-least-once entries",
        kept.len()
    );
    assert!(
        items
            .iter()
            .all(|it| it.payload.as_deref().is_some_and(|p| p.starts_with("01"))),
        "the best-effort entries made room first"
    );
    let mut pending = 0;
    for id in &ids {
        let rec = a.event("default", id).await.expect("record");
        pending += usize::from(!rec.complete);
    }
    assert_eq!(
        pending,
        10 - kept.len(),
        "every refused event is still pending at its publisher, none reported delivered"
    );
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_follower_gets_large_payloads_the_live_feed_leaves_out() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = scratch("ws");
    let a = start(&dir, "q-ws", None, Limits::default()).await;
    let (api, server) = rumormill::api::serve(a.clone(), "127.0.0.1:0".parse().expect("addr"), "sesame".into())
        .await
        .expect("API");
    let mut req = format!("ws://{api}/v1/overlays/default/events/ws?topics=t")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("authorization", "Bearer sesame".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("WebSocket");
    // Following from now: a small payload comes in the feed, a large one
    // (over 1 KiB) is read from the store; both arrive, in order, in full.
    for (i, len) in [(0u8, 10usize), (1, 200_000), (2, 10)] {
        let mut p = vec![b'a' + i; len];
        p[0] = b'0' + i;
        a.publish("default", "t", p, &DeliverySpec::BestEffort)
            .await
            .expect("publish");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap_or_else(|_| panic!("waited 10 s for entry {} of 3; got {got:?}", got.len() + 1));
        if let Some(Ok(Message::Text(t))) = msg {
            let item: InboxItem = serde_json::from_str(&t).expect("an inbox item");
            got.push((item.seq, item.payload.map(|p| p.len()), item.payload_base64.is_some()));
        }
    }
    assert_eq!(
        got,
        vec![(1, Some(10), true), (2, Some(200_000), true), (3, Some(10), true)]
    );
    server.abort();
    a.shutdown(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}
