//! Nonce uniqueness whatever happens to the data directory: two lives of one
//! member name and key — an overlay deleted and created again, a copied data
//! directory, two agents started with the same name — must never seal two
//! packets with equal nonce inputs (key, sender, epoch, salt, counter).
//!
//! Each test points the agents at a capture socket as their only seed (UDP
//! and TCP on one port, never answering): an isolated agent contacts its
//! seeds again every two seconds (`local` profile), so every life sends it a
//! few sealed packets, whose headers are compared here. Each packet must also
//! open under the cluster key, so they are real packets of those lives.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{Agent, Scratch, free_gossip_port, keygen, loopback, wait_until};
use rumormill_wire::{FrameDecoder, FrameKind, HEADER_LEN, Header};

/// Longest the tests wait for a life to send its packets.
const WAIT: Duration = Duration::from_secs(20);

/// One captured packet.
#[derive(Debug, Clone)]
struct Captured {
    kind: FrameKind,
    header: Header,
    bytes: Vec<u8>,
}

/// A UDP socket and a TCP listener on one loopback port that record every
/// packet sent to them, until dropped.
struct Capture {
    addr: SocketAddr,
    packets: Arc<Mutex<Vec<Captured>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Capture {
    fn start() -> Capture {
        let addr = loopback(free_gossip_port());
        let udp = UdpSocket::bind(addr).expect("bind capture UDP");
        let tcp = TcpListener::bind(addr).expect("bind capture TCP");
        udp.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        tcp.set_nonblocking(true).expect("nonblocking");
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let record = {
            let packets = packets.clone();
            move |kind, bytes: &[u8]| {
                if let Ok(header) = Header::decode(bytes) {
                    packets.lock().expect("capture lock").push(Captured {
                        kind,
                        header,
                        bytes: bytes.to_vec(),
                    });
                }
            }
        };
        let udp_thread = {
            let (stop, record) = (stop.clone(), record.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = udp.recv_from(&mut buf) {
                        record(FrameKind::Datagram, &buf[..n]);
                    }
                }
            })
        };
        let tcp_thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((conn, _)) = tcp.accept() else {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    // One frame is enough; the agent closes after writing.
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut data = Vec::new();
                    let _ = conn.take(4 << 20).read_to_end(&mut data);
                    let mut frames = FrameDecoder::new(4 << 20);
                    frames.extend(&data);
                    while let Ok(Some(frame)) = frames.next_frame() {
                        record(FrameKind::Stream, &frame);
                    }
                }
            })
        };
        Capture {
            addr,
            packets,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    fn packets(&self) -> Vec<Captured> {
        self.packets.lock().expect("capture lock").clone()
    }

    /// Waits until at least `count` packets of each of `lives` distinct
    /// salts at one (sender, epoch) were captured, or until two packets
    /// share their nonce inputs (which the caller's check then reports);
    /// returns them all.
    fn wait_for_lives(&self, lives: usize, count: usize) -> Vec<Captured> {
        let (packets, _) = wait_until(
            &format!("{lives} lives of one sender and epoch, {count} packets each"),
            WAIT,
            || {
                let packets = self.packets();
                let mut inputs = BTreeSet::new();
                if !packets.iter().all(|p| inputs.insert(nonce_inputs(&p.header))) {
                    return Ok(packets);
                }
                let mut per_life: BTreeMap<(u64, u64), BTreeMap<u64, usize>> = BTreeMap::new();
                for p in &packets {
                    *per_life
                        .entry((p.header.sender_id, p.header.epoch))
                        .or_default()
                        .entry(p.header.salt)
                        .or_default() += 1;
                }
                let best = per_life
                    .values()
                    .map(|salts| salts.values().filter(|&&n| n >= count).count())
                    .max()
                    .unwrap_or(0);
                if best >= lives {
                    Ok(packets)
                } else {
                    Err(format!("lives per (sender, epoch): {per_life:?}"))
                }
            },
        );
        packets
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the AEAD nonce and subkey of a packet are made from.
fn nonce_inputs(h: &Header) -> (FrameKind, u32, u64, u64, u64, u64) {
    (h.kind, h.key_id, h.sender_id, h.epoch, h.salt, h.counter)
}

/// The check: no two packets share their nonce inputs, and every one is a
/// real packet sealed under `key`.
fn assert_nonces_unique(packets: &[Captured], key: &str) {
    let key = rumormill::config::decode_key(key).expect("key");
    let mut seen = BTreeSet::new();
    for p in packets {
        let inputs = nonce_inputs(&p.header);
        assert!(seen.insert(inputs), "two packets with the same nonce inputs {inputs:?}");
        // Open it as a fresh receiver would: it must authenticate.
        let ring = rumormill_wire::Keyring::new(&key).expect("keyring");
        let mut receiver = rumormill_wire::Codec::new(
            rumormill_wire::overlay_id("default"),
            0x7e57,
            1,
            1,
            rumormill_wire::Security::Encrypted(ring),
        );
        receiver
            .open(p.kind, &p.bytes)
            .unwrap_or_else(|e| panic!("a captured packet does not open under the cluster key: {e}"));
        assert!(p.bytes.len() > HEADER_LEN);
    }
}

#[test]
fn a_deleted_and_recreated_overlay_never_repeats_a_nonce() {
    let scratch = Scratch::new("nonce-recreate");
    let capture = Capture::start();
    let key = keygen();
    let mut a = Agent::launch(&scratch, 0, &key, Some(capture.addr));
    a.ready(true);
    capture.wait_for_lives(1, 2);
    a.ep.json(&["overlays", "delete", "default"]);
    let gossip = a.gossip.to_string();
    let seed = capture.addr.to_string();
    a.ep.json(&[
        "overlays",
        "create",
        "default",
        "--bind",
        &gossip,
        "--member",
        "node-0",
        "--seed",
        &seed,
        "--key",
        &key,
        "--profile",
        "local",
    ]);
    let packets = capture.wait_for_lives(2, 2);
    let epochs: BTreeSet<u64> = packets.iter().map(|p| p.header.epoch).collect();
    assert_eq!(
        epochs,
        BTreeSet::from([1]),
        "the recreated overlay starts again at epoch 1"
    );
    assert_nonces_unique(&packets, &key);
}

#[test]
fn a_copied_data_directory_never_repeats_a_nonce() {
    let scratch = Scratch::new("nonce-copy");
    let capture = Capture::start();
    let key = keygen();
    let mut original = Agent::launch_as(&scratch, "original", "twin", &key, Some(capture.addr));
    original.ready(true);
    capture.wait_for_lives(1, 1);
    original.kill();
    let copy_dir = scratch.path("copy");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&original.ep.dir)
        .arg(&copy_dir)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a of the data directory failed");
    // Both start from the same stored epoch, so both run at the next one.
    original.spawn();
    original.ready(false);
    let mut copy = Agent::launch_as(&scratch, "copy", "twin", &key, Some(capture.addr));
    copy.ready(true);
    let packets = capture.wait_for_lives(2, 2);
    assert_nonces_unique(&packets, &key);
}

#[test]
fn two_agents_with_one_name_never_repeat_a_nonce() {
    let scratch = Scratch::new("nonce-name");
    let capture = Capture::start();
    let key = keygen();
    let mut one = Agent::launch_as(&scratch, "one", "same-name", &key, Some(capture.addr));
    let mut two = Agent::launch_as(&scratch, "two", "same-name", &key, Some(capture.addr));
    one.ready(true);
    two.ready(true);
    let packets = capture.wait_for_lives(2, 2);
    assert_nonces_unique(&packets, &key);
}
