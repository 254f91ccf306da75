//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`) through the
//! same checks the fuzz targets run, so every input the fuzzers ever found
//! interesting stays a regression test on stable Rust.
//!
//! The seed files are written by the ignored test `write_seed_corpus`:
//! `cargo test -p rumormill-wire --test fuzz_corpus -- --ignored write_seed_corpus`.

use std::path::{Path, PathBuf};

use rumormill_wire::proto::envelope::Body;
use rumormill_wire::proto::{
    Ack, Address, Alive, Dead, Envelope, MemberState, MemberStatus, Nack, Ping, PingReq, PushPull, Suspect,
};
use rumormill_wire::{
    Codec, FrameKind, HEADER_LEN, Keyring, PacketBuilder, Security, encode_envelope, encode_frame, overlay_id,
};

#[allow(dead_code)]
#[path = "../../../fuzz/src/lib.rs"]
mod harness;

/// What a fuzz target checks for one input.
type Check = fn(&[u8]);

/// The fuzz targets and the check each runs.
const TARGETS: [(&str, Check); 3] = [
    ("open_packet", harness::open_packet),
    ("decode_body", harness::decode_body),
    ("frames", harness::frames),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn corpus_replays_without_panics() {
    for (target, check) in TARGETS {
        let dir = corpus_dir().join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "no corpus files for target {target} in {}",
            dir.display()
        );
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "target {target} panicked on {}", file.display());
        }
    }
}

// ---- seed corpus ----

fn addr(ip: &[u8], port: u32) -> Option<Address> {
    Some(Address { ip: ip.to_vec(), port })
}

fn env(body: Body) -> Envelope {
    Envelope { body: Some(body) }
}

fn sample_envelopes() -> Vec<Envelope> {
    vec![
        env(Body::Ping(Ping {
            seq: 1,
            target: "node-b".into(),
        })),
        env(Body::Ack(Ack { seq: 1 })),
        env(Body::PingReq(PingReq {
            seq: 300,
            target: "node-c".into(),
            target_addr: addr(&[10, 0, 0, 3], 7946),
        })),
        env(Body::Nack(Nack { seq: 300 })),
        env(Body::Alive(Alive {
            name: "node-a".into(),
            incarnation: 2,
            epoch: 1_700_000_000,
            addr: addr(&[127, 0, 0, 1], 7000),
        })),
        env(Body::Suspect(Suspect {
            name: "node-c".into(),
            incarnation: 1,
            epoch: 5,
            from: "node-a".into(),
        })),
        env(Body::Dead(Dead {
            name: "node-c".into(),
            incarnation: 1,
            epoch: 5,
            from: "node-c".into(),
        })),
        env(Body::PushPull(PushPull {
            join: true,
            reply: false,
            from: "node-a".into(),
            from_addr: addr(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 7000),
            members: vec![
                MemberState {
                    name: "node-a".into(),
                    addr: addr(&[127, 0, 0, 1], 7000),
                    incarnation: 2,
                    epoch: 1,
                    status: MemberStatus::Alive as i32,
                },
                MemberState {
                    name: "node-b".into(),
                    addr: addr(&[1, 2, 3], 70_000),
                    incarnation: 0,
                    epoch: 2,
                    status: 9,
                },
            ],
        })),
        Envelope { body: None },
    ]
}

fn packet_body(envelopes: &[Envelope]) -> Vec<u8> {
    let mut b = PacketBuilder::new(1400);
    for e in envelopes {
        b.push(e.clone()).unwrap();
    }
    b.finish()
}

/// Deterministic filler bytes (xorshift), so regenerating gives the same files.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sender(security: Security) -> Codec {
    Codec::new(overlay_id(harness::OVERLAY), 1, 1, 1, security)
}

fn keyed(key: &[u8]) -> Security {
    Security::Encrypted(Keyring::new(key).unwrap())
}

fn open_packet_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let envs = sample_envelopes();
    let all = packet_body(&envs);
    let one = encode_envelope(&envs[4]);
    let mut plain = sender(Security::Plaintext);
    let mut enc = sender(keyed(&harness::KEY));
    let mut enc128 = sender(keyed(&harness::KEY_128));
    let mut enc192 = sender(keyed(&harness::KEY_192));
    let mut other_key = sender(keyed(&[8u8; 32]));
    let mut other_overlay = Codec::new(overlay_id("elsewhere"), 1, 1, 1, Security::Plaintext);

    let plain_dgram = plain.seal(FrameKind::Datagram, &all).unwrap();
    let enc_dgram = enc.seal(FrameKind::Datagram, &all).unwrap();
    let mut seeds = vec![
        ("plain-datagram", plain_dgram.clone()),
        (
            "plain-datagram-ping",
            plain.seal(FrameKind::Datagram, &packet_body(&envs[..1])).unwrap(),
        ),
        ("plain-datagram-empty", plain.seal(FrameKind::Datagram, b"").unwrap()),
        ("plain-stream", plain.seal(FrameKind::Stream, &one).unwrap()),
        (
            "plain-stream-pushpull",
            plain.seal(FrameKind::Stream, &encode_envelope(&envs[7])).unwrap(),
        ),
        ("enc256-datagram", enc_dgram.clone()),
        (
            "enc256-datagram-ack",
            enc.seal(FrameKind::Datagram, &packet_body(&envs[1..2])).unwrap(),
        ),
        ("enc256-datagram-empty", enc.seal(FrameKind::Datagram, b"").unwrap()),
        ("enc256-stream", enc.seal(FrameKind::Stream, &one).unwrap()),
        (
            "enc256-stream-pushpull",
            enc.seal(FrameKind::Stream, &encode_envelope(&envs[7])).unwrap(),
        ),
        ("enc128-datagram", enc128.seal(FrameKind::Datagram, &all).unwrap()),
        ("enc192-stream", enc192.seal(FrameKind::Stream, &one).unwrap()),
        ("enc-unknown-key", other_key.seal(FrameKind::Datagram, &all).unwrap()),
        (
            "plain-wrong-overlay",
            other_overlay.seal(FrameKind::Datagram, &all).unwrap(),
        ),
        ("truncated-half-header", plain_dgram[..HEADER_LEN / 2].to_vec()),
        ("truncated-header-only", enc_dgram[..HEADER_LEN].to_vec()),
        ("truncated-no-tag", enc_dgram[..enc_dgram.len() - 16].to_vec()),
        ("truncated-body", plain_dgram[..plain_dgram.len() - 5].to_vec()),
        ("empty", Vec::new()),
        ("garbage-64", garbage(1, 64)),
        ("garbage-300", garbage(2, 300)),
        ("magic-then-garbage", [&b"RM\x01\x00"[..], &garbage(3, 80)].concat()),
    ];
    let mut flipped = enc_dgram.clone();
    flipped[HEADER_LEN + 3] ^= 0x10;
    seeds.push(("enc256-body-bitflip", flipped));
    let mut tag_flip = enc_dgram.clone();
    if let Some(b) = tag_flip.last_mut() {
        *b ^= 1;
    }
    seeds.push(("enc256-tag-bitflip", tag_flip));
    for (name, at, value) in [
        ("bad-magic", 0usize, b'X'),
        ("bad-version", 2, 2),
        ("reserved-flags", 3, 0x40),
        ("suite-mismatch", 3, 0x01),
    ] {
        let mut p = enc_dgram.clone();
        p[at] = value;
        seeds.push((name, p));
    }
    let mut extended = plain_dgram;
    extended.extend_from_slice(&garbage(4, 20));
    seeds.push(("plain-datagram-trailing-garbage", extended));
    seeds
}

fn decode_body_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let envs = sample_envelopes();
    let all = packet_body(&envs);
    let names = [
        "ping",
        "ack",
        "ping-req",
        "nack",
        "alive",
        "suspect",
        "dead",
        "push-pull",
        "empty-envelope",
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> =
        names.iter().zip(&envs).map(|(n, e)| (*n, encode_envelope(e))).collect();
    seeds.extend([
        ("packet-all", all.clone()),
        ("packet-one", packet_body(&envs[..1])),
        ("packet-empty", Vec::new()),
        ("packet-truncated", all[..all.len() / 2].to_vec()),
        // Field 1, length 0x7fffffff: a length prefix far past the end.
        ("huge-length", vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00]),
        // An over-long varint (11 bytes).
        ("overlong-varint", [&[0x10u8][..], &[0xff; 10], &[0x01]].concat()),
        // Ping with a target that is not UTF-8.
        ("ping-bad-utf8", vec![0x0a, 0x04, 0x12, 0x02, 0xc3, 0x28]),
        // An unknown field (15, varint) and a group wire type.
        ("unknown-field", vec![0x78, 0x01, 0x0a, 0x00]),
        ("group-wire-type", vec![0x0b, 0x0c]),
        // Two oneof members in one envelope: the last one wins.
        ("oneof-twice", vec![0x12, 0x02, 0x08, 0x05, 0x22, 0x02, 0x08, 0x06]),
        ("garbage-32", garbage(5, 32)),
        ("garbage-200", garbage(6, 200)),
        ("zeros", vec![0; 40]),
    ]);
    seeds
}

fn frames_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let envs = sample_envelopes();
    let mut plain = sender(Security::Plaintext);
    let mut enc = sender(keyed(&harness::KEY));
    let stream_of = |codec: &mut Codec, n: usize| -> Vec<u8> {
        envs.iter()
            .take(n)
            .flat_map(|e| encode_frame(&codec.seal(FrameKind::Stream, &encode_envelope(e)).unwrap()))
            .collect()
    };
    let plain3 = stream_of(&mut plain, 3);
    let enc3 = stream_of(&mut enc, 3);
    let enc_all = stream_of(&mut enc, envs.len());
    // Byte 0: limit / 8; byte 1: chunk size - 1; then the stream.
    let with = |max8: u8, chunk: u8, s: &[u8]| [&[max8, chunk][..], s].concat();
    vec![
        ("plain-3-frames", with(255, 255, &plain3)),
        ("plain-3-frames-bytewise", with(255, 0, &plain3)),
        ("enc-3-frames", with(255, 16, &enc3)),
        ("enc-all-frames", with(255, 63, &enc_all)),
        ("enc-limit-too-small", with(4, 255, &enc3)),
        ("enc-truncated", with(255, 7, &enc3[..enc3.len() - 9])),
        ("zero-length-frames", with(1, 3, &[0; 24])),
        ("zero-limit", with(0, 0, &encode_frame(b"x"))),
        (
            "huge-announced-length",
            with(255, 255, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ),
        ("partial-prefix", with(255, 255, &[0, 0])),
        ("one-garbage-frame", with(32, 4, &encode_frame(&garbage(7, 100)))),
        (
            "mixed",
            with(200, 10, &[&plain3[..], &encode_frame(b"RM"), &enc3].concat()),
        ),
        ("short", vec![5]),
        ("empty", Vec::new()),
        ("garbage-100", garbage(8, 100)),
        ("garbage-400", garbage(9, 400)),
        (
            "frame-of-header-only",
            with(10, 1, &encode_frame(&plain.seal(FrameKind::Stream, b"").unwrap())),
        ),
        (
            "datagram-in-stream",
            with(255, 255, &encode_frame(&enc.seal(FrameKind::Datagram, b"x").unwrap())),
        ),
        ("enc-bitflip", {
            let mut s = with(255, 255, &enc3);
            s[2 + 4 + HEADER_LEN + 2] ^= 0x80;
            s
        }),
        ("plain-chunks-of-2", with(255, 1, &plain3)),
        ("enc-chunks-of-5", with(255, 4, &enc3)),
    ]
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let sets = [
        ("open_packet", open_packet_seeds()),
        ("decode_body", decode_body_seeds()),
        ("frames", frames_seeds()),
    ];
    for (target, seeds) in sets {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (name, data)) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}-{name}")), data).unwrap();
        }
    }
}

/// The seeds themselves are valid inputs for the checks (also when the corpus
/// directory was not regenerated after a change here).
#[test]
fn seeds_pass_the_checks() {
    let sets = [open_packet_seeds(), decode_body_seeds(), frames_seeds()];
    for ((target, check), seeds) in TARGETS.into_iter().zip(sets) {
        assert!(seeds.len() >= 20, "{target}: {} seeds", seeds.len());
        for (name, data) in seeds {
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "target {target} panicked on seed {name}");
        }
    }
}

/// The valid seeds really open under the harness' codecs, so the fuzzers
/// start from inputs that reach the body decoders.
#[test]
fn valid_seeds_open() {
    let seeds = open_packet_seeds();
    let seed = |name: &str| seeds.iter().find(|(n, _)| *n == name).map(|(_, d)| d.clone()).unwrap();
    for (name, kind) in [
        ("plain-datagram", FrameKind::Datagram),
        ("plain-stream-pushpull", FrameKind::Stream),
    ] {
        let opened = harness::plaintext_codec().open(kind, &seed(name)).unwrap();
        assert!(!opened.body.is_empty(), "{name}");
    }
    for (name, kind) in [
        ("enc256-datagram", FrameKind::Datagram),
        ("enc256-stream-pushpull", FrameKind::Stream),
        ("enc128-datagram", FrameKind::Datagram),
        ("enc192-stream", FrameKind::Stream),
    ] {
        let opened = harness::encrypted_codec().open(kind, &seed(name)).unwrap();
        assert!(!opened.body.is_empty(), "{name}");
    }
    for name in [
        "enc-unknown-key",
        "plain-wrong-overlay",
        "enc256-tag-bitflip",
        "suite-mismatch",
    ] {
        for kind in [FrameKind::Datagram, FrameKind::Stream] {
            assert!(harness::encrypted_codec().open(kind, &seed(name)).is_err(), "{name}");
        }
    }
}
