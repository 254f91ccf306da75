//! Property tests: every decoder returns `Ok` or `Err` for any input and never
//! panics, and everything the encoders produce decodes back unchanged.

use proptest::prelude::*;
use rumormill_wire::proto::envelope::Body;
use rumormill_wire::proto::{
    Ack, Address, Alive, Dead, Envelope, MemberState, Nack, Packet, Ping, PingReq, PushPull, Suspect,
};
use rumormill_wire::{
    Codec, FrameDecoder, FrameKind, HEADER_LEN, Header, Keyring, PacketBuilder, Security, TAG_LEN, WireError,
    decode_envelope, decode_packet, encode_frame, envelope_len, overlay_id, socket_addr,
};

const KEY: [u8; 32] = [7u8; 32];

fn overlay() -> u32 {
    overlay_id("prop")
}

fn plain_codec(sender: u64) -> Codec {
    Codec::new(overlay(), sender, 1, sender ^ 0x5a17, Security::Plaintext)
}

fn encrypted_codec(sender: u64, key: &[u8]) -> Codec {
    Codec::new(
        overlay(),
        sender,
        1,
        sender ^ 0x5a17,
        Security::Encrypted(Keyring::new(key).unwrap()),
    )
}

/// Runs `bytes` through every decoder of the crate.
fn decode_everything(bytes: &[u8]) {
    let _ = Header::decode(bytes);
    for kind in [FrameKind::Datagram, FrameKind::Stream] {
        for mut codec in [plain_codec(2), encrypted_codec(2, &KEY)] {
            if let Ok(opened) = codec.open(kind, bytes) {
                decode_bodies(&opened.body);
            }
        }
    }
    decode_bodies(bytes);
    decode_frames(bytes, 16, 7);
}

fn decode_bodies(bytes: &[u8]) {
    if let Ok(p) = decode_packet(bytes) {
        for e in &p.envelopes {
            check_addresses(e);
        }
    }
    if let Ok(e) = decode_envelope(bytes) {
        check_addresses(&e);
    }
}

fn check_addresses(e: &Envelope) {
    let addrs: Vec<Option<&Address>> = match &e.body {
        Some(Body::PingReq(p)) => vec![p.target_addr.as_ref()],
        Some(Body::Alive(a)) => vec![a.addr.as_ref()],
        Some(Body::PushPull(p)) => std::iter::once(p.from_addr.as_ref())
            .chain(p.members.iter().map(|m| m.addr.as_ref()))
            .collect(),
        _ => Vec::new(),
    };
    for a in addrs {
        let _ = socket_addr(a);
    }
}

/// Feeds `bytes` to a `FrameDecoder` in chunks, draining frames after each
/// chunk, and checks that no byte is lost or duplicated. Returns the frames.
fn decode_frames(bytes: &[u8], max: usize, chunk: usize) -> Vec<Vec<u8>> {
    let mut d = FrameDecoder::new(max);
    let mut frames = Vec::new();
    let (mut fed, mut taken) = (0, 0);
    'outer: for piece in bytes.chunks(chunk.max(1)) {
        d.extend(piece);
        fed += piece.len();
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.len() <= max);
                    taken += 4 + f.len();
                    frames.push(f);
                }
                Ok(None) => break,
                Err(WireError::FrameTooLarge { len, .. }) => {
                    assert!(len > max);
                    assert!(d.next_frame().is_err(), "the error is sticky");
                    break 'outer;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
            assert_eq!(fed, taken + d.buffered());
        }
        assert_eq!(fed, taken + d.buffered());
    }
    frames
}

// ---- strategies ----

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![Just(FrameKind::Datagram), Just(FrameKind::Stream)]
}

fn address() -> impl Strategy<Value = Option<Address>> {
    prop_oneof![
        1 => Just(None),
        4 => (prop_oneof![Just(4usize), Just(16usize), 0usize..20], any::<u32>(), any::<bool>()).prop_flat_map(
            |(len, port, small_port)| {
                let port = if small_port { port & 0xffff } else { port };
                prop::collection::vec(any::<u8>(), len).prop_map(move |ip| Some(Address { ip, port }))
            }
        ),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9.:-]{0,12}|\\PC{0,6}"
}

fn member() -> impl Strategy<Value = MemberState> {
    (
        name(),
        address(),
        any::<u32>(),
        any::<u64>(),
        prop_oneof![0i32..4, any::<i32>()],
    )
        .prop_map(|(name, addr, incarnation, epoch, status)| MemberState {
            name,
            addr,
            incarnation,
            epoch,
            status,
        })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let body = prop_oneof![
        (any::<u32>(), name()).prop_map(|(seq, target)| Body::Ping(Ping { seq, target })),
        any::<u32>().prop_map(|seq| Body::Ack(Ack { seq })),
        (any::<u32>(), name(), address()).prop_map(|(seq, target, target_addr)| Body::PingReq(PingReq {
            seq,
            target,
            target_addr
        })),
        any::<u32>().prop_map(|seq| Body::Nack(Nack { seq })),
        (name(), any::<u32>(), any::<u64>(), address()).prop_map(|(name, incarnation, epoch, addr)| Body::Alive(
            Alive {
                name,
                incarnation,
                epoch,
                addr
            }
        )),
        (name(), any::<u32>(), any::<u64>(), name()).prop_map(|(name, incarnation, epoch, from)| Body::Suspect(
            Suspect {
                name,
                incarnation,
                epoch,
                from
            }
        )),
        (name(), any::<u32>(), any::<u64>(), name()).prop_map(|(name, incarnation, epoch, from)| Body::Dead(Dead {
            name,
            incarnation,
            epoch,
            from
        })),
        (
            any::<bool>(),
            any::<bool>(),
            name(),
            address(),
            prop::collection::vec(member(), 0..4)
        )
            .prop_map(|(join, reply, from, from_addr, members)| Body::PushPull(PushPull {
                join,
                reply,
                from,
                from_addr,
                members
            })),
    ];
    prop::option::weighted(0.95, body).prop_map(|body| Envelope { body })
}

/// A header with a valid magic and version and random fields, so that random
/// bodies get past the first checks.
fn header(suite: impl Strategy<Value = u8>) -> impl Strategy<Value = Header> {
    (
        suite,
        kind(),
        prop_oneof![Just(overlay()), any::<u32>()],
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(suite, kind, overlay_id, key_id, sender_id, epoch, salt, counter)| Header {
                suite,
                kind,
                overlay_id,
                key_id,
                sender_id,
                epoch,
                salt,
                counter,
            },
        )
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Truncate(prop::sample::Index),
    Extend(Vec<u8>),
    Overwrite { at: prop::sample::Index, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Mutation::Extend),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Overwrite { at, byte }),
    ]
}

fn mutate(mut p: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip { at, bit } if !p.is_empty() => {
                let i = at.index(p.len());
                p[i] ^= 1 << bit;
            }
            Mutation::Truncate(at) => p.truncate(at.index(p.len() + 1)),
            Mutation::Extend(more) => p.extend_from_slice(more),
            Mutation::Overwrite { at, byte } if !p.is_empty() => {
                let i = at.index(p.len());
                p[i] = *byte;
            }
            _ => {}
        }
    }
    p
}

fn aes_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(16usize), Just(24usize), Just(32usize)]
        .prop_flat_map(|len| prop::collection::vec(any::<u8>(), len))
}

/// Packs envelopes with a [`PacketBuilder`]; returns the body and what went in.
fn pack(envelopes: Vec<Envelope>, budget: usize) -> (Vec<u8>, Vec<Envelope>) {
    let mut b = PacketBuilder::new(budget);
    let mut packed = Vec::new();
    for e in envelopes {
        let len = envelope_len(&e);
        let remaining = b.remaining();
        match b.push(e.clone()) {
            Ok(()) => {
                assert!(len <= remaining);
                packed.push(e);
            }
            Err(back) => {
                assert!(len > remaining, "an envelope that fits was refused");
                assert_eq!(back, e);
            }
        }
        assert!(b.size() <= budget);
        assert_eq!(b.size() + b.remaining(), budget);
    }
    assert_eq!(b.len(), packed.len());
    let size = b.size();
    let body = b.finish();
    assert_eq!(body.len(), size);
    (body, packed)
}

// ---- decoders never panic ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header(
        h in header(prop_oneof![Just(0u8), Just(3u8), 0u8..16]),
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let bytes = [&h.encode()[..], &body].concat();
        prop_assert_eq!(Header::decode(&bytes), Ok(Header { suite: h.suite & 0x0f, ..h }));
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_sealed_packets(
        envelopes in prop::collection::vec(envelope(), 0..8),
        kind in kind(),
        encrypted in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let body = match kind {
            FrameKind::Datagram => pack(envelopes, 1400).0,
            FrameKind::Stream => envelopes.first().map(rumormill_wire::encode_envelope).unwrap_or_default(),
        };
        let mut sender = if encrypted { encrypted_codec(1, &KEY) } else { plain_codec(1) };
        let sealed = sender.seal(kind, &body).unwrap();
        let bad = mutate(sealed.clone(), &mutations);
        decode_everything(&bad);
        decode_frames(&encode_frame(&bad), 64, 5);
        if encrypted && bad != sealed {
            // Any change to a sealed packet is caught.
            let mut receiver = encrypted_codec(2, &KEY);
            prop_assert!(receiver.open(kind, &bad).is_err());
            // And does not stop the genuine packet.
            prop_assert_eq!(receiver.open(kind, &sealed).unwrap().body, body);
        }
    }

    #[test]
    fn arbitrary_addresses(ip in prop::collection::vec(any::<u8>(), 0..20), port in any::<u32>()) {
        let a = Address { ip: ip.clone(), port };
        let valid = (ip.len() == 4 || ip.len() == 16) && port <= u32::from(u16::MAX);
        let got = socket_addr(Some(&a));
        prop_assert_eq!(got.is_ok(), valid, "{:?}", got);
        if let Ok(sa) = got {
            prop_assert_eq!(Address::from(sa), a);
        }
        prop_assert!(socket_addr(None).is_err());
    }

    #[test]
    fn frame_decoder_on_arbitrary_streams(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        max in 0usize..64,
        chunk in 1usize..50,
    ) {
        decode_frames(&bytes, max, chunk);
    }

    #[test]
    fn frame_decoder_splits_what_encode_frame_joined(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..20),
        chunk in 1usize..100,
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|f| encode_frame(f)).collect();
        prop_assert_eq!(decode_frames(&stream, 64, chunk), frames);
    }
}

// ---- round trips ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn packets_stay_within_budget_and_decode_back(
        envelopes in prop::collection::vec(envelope(), 0..24),
        budget in prop_oneof![0usize..64, 0usize..1500],
    ) {
        let (body, packed) = pack(envelopes, budget);
        prop_assert!(body.len() <= budget);
        prop_assert_eq!(decode_packet(&body).unwrap(), Packet { envelopes: packed });
    }

    #[test]
    fn envelopes_decode_back(e in envelope()) {
        let bytes = rumormill_wire::encode_envelope(&e);
        prop_assert_eq!(envelope_len(&e), 1 + prost_len_prefix(bytes.len()) + bytes.len());
        prop_assert_eq!(decode_envelope(&bytes).unwrap(), e);
    }

    #[test]
    fn seal_open_round_trips_for_every_aes_key_size(
        key in aes_key(),
        bodies in prop::collection::vec((kind(), prop::collection::vec(any::<u8>(), 0..1500)), 1..6),
        sender in any::<u64>(),
        epoch in any::<u64>(),
        salt in any::<u64>(),
    ) {
        let ring = || Security::Encrypted(Keyring::new(&key).unwrap());
        let mut a = Codec::new(overlay(), sender, epoch, salt, ring());
        let mut b = Codec::new(overlay(), sender.wrapping_add(1), 1, 2, ring());
        for (counter, (kind, body)) in bodies.iter().enumerate() {
            let p = a.seal(*kind, body).unwrap();
            prop_assert_eq!(p.len(), HEADER_LEN + body.len() + TAG_LEN);
            prop_assert_eq!(p.len(), body.len() + a.overhead());
            let opened = b.open(*kind, &p).unwrap();
            prop_assert_eq!(&opened.body, body);
            prop_assert_eq!(opened.header.sender_id, sender);
            prop_assert_eq!(opened.header.epoch, epoch);
            prop_assert_eq!(opened.header.counter, counter as u64);
            prop_assert_eq!(opened.header.kind, *kind);
            // The body is not sent in the clear (unless it is too short to tell).
            if body.len() >= 16 {
                prop_assert_ne!(&p[HEADER_LEN..HEADER_LEN + body.len()], &body[..]);
            }
        }
    }

    #[test]
    fn plaintext_seal_open_round_trips(kind in kind(), body in prop::collection::vec(any::<u8>(), 0..1500)) {
        let p = plain_codec(1).seal(kind, &body).unwrap();
        prop_assert_eq!(&p[HEADER_LEN..], &body[..]);
        prop_assert_eq!(plain_codec(2).open(kind, &p).unwrap().body, body);
    }

    #[test]
    fn a_packet_opened_twice_is_rejected_the_second_time(
        key in aes_key(),
        kinds in prop::collection::vec(kind(), 1..12),
        order in Just((0..12usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let mut a = encrypted_codec(1, &key);
        let mut b = encrypted_codec(2, &key);
        let sealed: Vec<(FrameKind, Vec<u8>)> =
            kinds.iter().map(|&k| (k, a.seal(k, b"payload").unwrap())).collect();
        let order: Vec<usize> = order.into_iter().filter(|&i| i < sealed.len()).collect();
        // Out-of-order delivery is fine, each packet once...
        for &i in &order {
            let (k, p) = &sealed[i];
            prop_assert_eq!(b.open(*k, p).unwrap().body, b"payload");
        }
        // ...but never twice, and not as the other kind either.
        for &i in &order {
            let (k, p) = &sealed[i];
            prop_assert_eq!(b.open(*k, p), Err(WireError::Replay { sender: 1 }));
            let other = if *k == FrameKind::Datagram { FrameKind::Stream } else { FrameKind::Datagram };
            let wrong_kind = b.open(other, p);
            prop_assert!(matches!(wrong_kind, Err(WireError::KindMismatch { .. })), "{:?}", wrong_kind);
        }
    }
}

fn prost_len_prefix(len: usize) -> usize {
    let mut n = 1;
    let mut v = len >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Many tiny frames in one buffer are split in linear time, not by shifting
/// the whole buffer once per frame.
#[test]
fn many_tiny_frames_in_one_buffer() {
    let frames = 200_000;
    let stream = vec![0u8; 4 * frames];
    let mut d = FrameDecoder::new(16);
    d.extend(&stream);
    let start = std::time::Instant::now();
    let mut n = 0;
    while let Some(f) = d.next_frame().unwrap() {
        assert!(f.is_empty());
        n += 1;
    }
    assert_eq!(n, frames);
    assert_eq!(d.buffered(), 0);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

/// Interleaving small reads with frame extraction keeps the decoder's view
/// consistent with compaction.
#[test]
fn extend_between_frames_keeps_order() {
    let frames: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().repeat((i % 7) as usize)).collect();
    let stream: Vec<u8> = frames.iter().flat_map(|f| encode_frame(f)).collect();
    let mut d = FrameDecoder::new(64);
    let mut got = Vec::new();
    for piece in stream.chunks(3) {
        d.extend(piece);
        if let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
    }
    while let Some(f) = d.next_frame().unwrap() {
        got.push(f);
    }
    assert_eq!(got, frames);
}
