//! Real-process test of the gossip TCP port under attack: strangers that
//! hold incomplete large frames and strangers that trickle bytes must
//! neither grow the agent's memory past the stated bound nor keep a member's
//! value from arriving.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rumormill_wire::{Codec, FrameKind, HEADER_LEN, Keyring, Security};

/// The budget for incoming frames with the default limits
/// (`StreamLimits::default().budget()`), which docs/architecture.md states.
const BUDGET: u64 = 64 << 20;
/// Room above the budget for everything else an agent under attack
/// allocates (connection tasks, allocator slack).
const SLACK: u64 = 24 << 20;
/// How long the attack runs at most.
const ATTACK: Duration = Duration::from_secs(20);

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// A connection to `to` from the loopback address `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((from, 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_millis(300))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Whether the peer closed (or reset) the connection; reads nothing that
/// matters (the agent never writes on an incoming connection).
fn closed(s: &mut TcpStream) -> bool {
    match s.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

struct Held {
    s: TcpStream,
    sent: usize,
    last: Instant,
}

/// What one kind of attacker does with its connections.
#[derive(Clone, Copy)]
enum Kind {
    /// Announces a 32 MiB frame with a header that passes every check, sends
    /// `body` bytes of it, then stalls.
    Holder { body: usize },
    /// Sends one byte of garbage every 500 ms.
    Trickler,
}

/// Keeps `per_ip` connections open from each of `ips` until `stop`,
/// reopening those the agent closes; counts connections opened.
fn attacker(
    kind: Kind,
    target: SocketAddr,
    ips: Vec<Ipv4Addr>,
    per_ip: usize,
    header: Vec<u8>,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let chunk = vec![0x5au8; 64 << 10];
        let mut slots: Vec<(Ipv4Addr, Option<Held>)> = ips
            .iter()
            .flat_map(|ip| (0..per_ip).map(move |_| (*ip, None)))
            .collect();
        let deadline = Instant::now() + ATTACK + Duration::from_secs(10);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            for (ip, slot) in &mut slots {
                if slot.as_mut().is_some_and(|h| closed(&mut h.s)) {
                    *slot = None;
                }
                let Some(held) = slot else {
                    if let Ok(mut s) = connect_from(*ip, target) {
                        opened.fetch_add(1, Ordering::Relaxed);
                        let first: &[u8] = match kind {
                            Kind::Holder { .. } => &header,
                            Kind::Trickler => b"x",
                        };
                        if s.write_all(first).is_ok() {
                            *slot = Some(Held {
                                s,
                                sent: 0,
                                last: Instant::now(),
                            });
                        }
                    }
                    continue;
                };
                match kind {
                    Kind::Holder { body } => {
                        // Write until the socket would block.
                        while held.sent < body {
                            let n = chunk.len().min(body - held.sent);
                            match held.s.write(&chunk[..n]) {
                                Ok(w) => held.sent += w,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                Err(_) => {
                                    *slot = None;
                                    break;
                                }
                            }
                        }
                    }
                    Kind::Trickler => {
                        if held.last.elapsed() >= Duration::from_millis(500) {
                            held.last = Instant::now();
                            if held.s.write(b"x").is_err() {
                                *slot = None;
                            }
                        }
                    }
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    })
}

#[test]
fn strangers_on_the_gossip_port_neither_exhaust_memory_nor_block_streams() {
    let scratch = Scratch::new("tcp-attack");
    let key = keygen();
    let mut target = Agent::launch(&scratch, 1, &key, None);
    let mut member = Agent::launch(&scratch, 2, &key, None);
    target.ready(true);
    member.ready(true);
    let v = member.ep.json(&["join", &target.gossip.to_string()]);
    assert_eq!(v["ok"], true, "join: {v}");
    let both = [&target.ep, &member.ep];
    wait_until("both agents to see 2 members alive", Duration::from_secs(10), || {
        views_match(&both, &[("node-1", "alive"), ("node-2", "alive")], None)
    });
    // A first value, so that both have exchanged streams once.
    member.ep.json(&["put", "warm-up", "x"]);
    wait_until("node-1 to read warm-up", Duration::from_secs(10), || {
        target.ep.value("warm-up")
    });
    let pid = target.pid();
    let baseline = rss_bytes(pid);
    eprintln!("node-1 RSS before the attack: {} MiB", baseline >> 20);

    // The strongest stranger: one who has seen a packet of the overlay and
    // copies its header (overlay id and key id travel in clear), so its
    // frames pass every check made before the body.
    let overlay = rumormill_wire::overlay_id("default");
    let cluster_key = rumormill::config::decode_key(&key).expect("key");
    let mut seen = Codec::new(
        overlay,
        0x0bad,
        1,
        0x5eed,
        Security::Encrypted(Keyring::new(&cluster_key).expect("keyring")),
    );
    let sealed = seen.seal(FrameKind::Stream, b"x").expect("seal");
    let mut header = (32u32 << 20).to_be_bytes().to_vec();
    header.extend_from_slice(&sealed[..HEADER_LEN]);

    let stop = Arc::new(AtomicBool::new(false));
    let (held, trickled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ips = |first: u8, n: u8| {
        (first..first + n)
            .map(|i| Ipv4Addr::new(127, 0, 0, i))
            .collect::<Vec<_>>()
    };
    let attackers = [
        // 64 connections holding 8 MiB each of a 32 MiB frame (512 MiB).
        attacker(
            Kind::Holder { body: 8 << 20 },
            target.gossip,
            ips(2, 8),
            8,
            header.clone(),
            stop.clone(),
            held.clone(),
        ),
        // 256 trickling connections.
        attacker(
            Kind::Trickler,
            target.gossip,
            ips(20, 8),
            32,
            Vec::new(),
            stop.clone(),
            trickled.clone(),
        ),
    ];

    let started = Instant::now();
    let mut peak = baseline;
    let sample = |peak: &mut u64| {
        let rss = rss_bytes(pid);
        *peak = (*peak).max(rss);
        assert!(
            rss < baseline + BUDGET + SLACK,
            "node-1 RSS {} MiB after {:?} of attack: over {} MiB before + {} MiB budget + {} MiB",
            rss >> 20,
            started.elapsed(),
            baseline >> 20,
            BUDGET >> 20,
            SLACK >> 20
        );
    };
    // Let the attack fill the budget and the connection slots.
    while started.elapsed() < Duration::from_secs(4) {
        sample(&mut peak);
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "after {:?}: {} holding and {} trickling connections opened, RSS {} MiB",
        started.elapsed(),
        held.load(Ordering::Relaxed),
        trickled.load(Ordering::Relaxed),
        rss_bytes(pid) >> 20
    );

    // A member's 100 kB value still arrives within 2 s.
    let value: String = (0..100_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let put = Instant::now();
    let v = member.ep.json(&["put", "big", &value]);
    assert_eq!(v["key"], "big", "put: {v}");
    let arrived = loop {
        sample(&mut peak);
        if target.ep.value("big").is_ok_and(|v| v == value) {
            break put.elapsed();
        }
        assert!(
            put.elapsed() < Duration::from_secs(2),
            "the 100 kB value did not reach node-1 within 2 s of the attack; stats: {}",
            target.ep.stats()
        );
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("100 kB value arrived on node-1 {arrived:?} after the put");

    // The attack goes on; memory stays bounded.
    while started.elapsed() < Duration::from_secs(10) {
        sample(&mut peak);
        thread::sleep(Duration::from_millis(100));
    }
    let stats = target.ep.stats();
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker thread");
    }
    eprintln!(
        "node-1 RSS peak {} MiB (baseline {} MiB); {} holding and {} trickling connections opened; stats: {stats}",
        peak >> 20,
        baseline >> 20,
        held.load(Ordering::Relaxed),
        trickled.load(Ordering::Relaxed)
    );
    assert!(
        stats["connections_evicted"].as_u64().unwrap_or(0) > 0,
        "connections were evicted to make room: {stats}"
    );
    assert!(
        views_match(&both, &[("node-1", "alive"), ("node-2", "alive")], None).is_ok(),
        "both still alive"
    );
}
