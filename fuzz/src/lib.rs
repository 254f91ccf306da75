//! The checks behind Rumormill's fuzz targets.
//!
//! Each function takes arbitrary bytes, runs them through the wire decoders
//! and asserts the invariants that must hold for any input. The fuzz targets
//! call these functions, and `crates/rumormill-wire/tests/fuzz_corpus.rs`
//! replays the committed corpus through the very same functions.

use rumormill_wire::proto::envelope::Body;
use rumormill_wire::proto::{Address, Envelope};
use rumormill_wire::{
    Codec, FrameDecoder, FrameKind, HEADER_LEN, Keyring, PacketBuilder, Security, TAG_LEN, WireError, decode_envelope,
    decode_packet, encode_envelope, overlay_id, socket_addr,
};

/// Name of the overlay the corpus packets belong to.
pub const OVERLAY: &str = "fuzz";
/// The primary key of the fuzzing overlay.
pub const KEY: [u8; 32] = [7u8; 32];
/// Further keys the receiving keyring accepts, so every AES-GCM suite is reachable.
pub const KEY_128: [u8; 16] = [7u8; 16];
/// See [`KEY_128`].
pub const KEY_192: [u8; 24] = [7u8; 24];
/// Sender id the receiving codecs use for themselves.
pub const RECEIVER_ID: u64 = 0xfeed;

/// The receiving keyring: [`KEY`] as primary, [`KEY_128`] and [`KEY_192`] installed.
pub fn keyring() -> Keyring {
    let ring = Keyring::new(&KEY).and_then(|mut r| {
        r.install(&KEY_128)?;
        r.install(&KEY_192)?;
        Ok(r)
    });
    match ring {
        Ok(r) => r,
        Err(e) => panic!("the fixed fuzzing keys are valid: {e}"),
    }
}

/// A plain-text receiver on the fuzzing overlay.
pub fn plaintext_codec() -> Codec {
    Codec::new(overlay_id(OVERLAY), RECEIVER_ID, 1, 1, Security::Plaintext)
}

/// An encrypted receiver on the fuzzing overlay, holding [`keyring`].
pub fn encrypted_codec() -> Codec {
    Codec::new(overlay_id(OVERLAY), RECEIVER_ID, 1, 1, Security::Encrypted(keyring()))
}

/// Target `open_packet`: the bytes as a received datagram and as a received
/// stream frame, on a plain-text and on an encrypted overlay; whatever opens
/// is decoded as a datagram body and as a stream frame body.
pub fn open_packet(data: &[u8]) {
    for kind in [FrameKind::Datagram, FrameKind::Stream] {
        let mut plain = plaintext_codec();
        if let Ok(opened) = plain.open(kind, data) {
            assert_eq!(opened.header.kind, kind);
            assert_eq!(opened.header.suite, 0);
            assert_eq!(opened.body.len(), data.len() - HEADER_LEN);
            decode_body(&opened.body);
        }
        let mut enc = encrypted_codec();
        if let Ok(opened) = enc.open(kind, data) {
            assert_eq!(opened.header.kind, kind);
            assert_ne!(opened.header.suite, 0);
            assert_eq!(opened.body.len(), data.len() - HEADER_LEN - TAG_LEN);
            decode_body(&opened.body);
            // An authenticated packet is accepted once only.
            let again = enc.open(kind, data);
            assert_eq!(
                again,
                Err(WireError::Replay {
                    sender: opened.header.sender_id
                })
            );
        }
    }
}

/// Target `decode_body`: the bytes as a datagram body and as a stream frame
/// body. Whatever decodes must survive re-encoding unchanged, and every
/// address in it must either convert or be refused.
pub fn decode_body(data: &[u8]) {
    if let Ok(packet) = decode_packet(data) {
        for e in &packet.envelopes {
            check_envelope(e);
        }
        // Re-pack through the MTU packer with an unlimited budget.
        let mut builder = PacketBuilder::new(usize::MAX);
        for e in &packet.envelopes {
            assert!(builder.push(e.clone()).is_ok(), "an unlimited budget takes everything");
        }
        let size = builder.size();
        let body = builder.finish();
        assert_eq!(body.len(), size, "PacketBuilder's size accounting");
        assert_eq!(decode_packet(&body).as_ref(), Ok(&packet));
    }
    if let Ok(envelope) = decode_envelope(data) {
        check_envelope(&envelope);
    }
}

/// Target `frames`: the first byte sets the frame size limit (times 8), the
/// second the size of the chunks the rest of the bytes arrive in. Every frame
/// is then opened as a stream frame on both kinds of overlay.
pub fn frames(data: &[u8]) {
    let (max, chunk, stream) = match data {
        [m, c, rest @ ..] => (usize::from(*m) * 8, usize::from(*c) + 1, rest),
        _ => (64, 1, data),
    };
    let mut decoder = FrameDecoder::new(max);
    let mut fed = 0;
    let mut taken = 0;
    'outer: for piece in stream.chunks(chunk) {
        decoder.extend(piece);
        fed += piece.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(
                        frame.len() <= max,
                        "frame of {} bytes over the limit {max}",
                        frame.len()
                    );
                    taken += 4 + frame.len();
                    assert_eq!(fed, taken + decoder.buffered(), "bytes are neither lost nor duplicated");
                    let mut plain = plaintext_codec();
                    if let Ok(opened) = plain.open(FrameKind::Stream, &frame) {
                        decode_body(&opened.body);
                    }
                    let mut enc = encrypted_codec();
                    if let Ok(opened) = enc.open(FrameKind::Stream, &frame) {
                        decode_body(&opened.body);
                    }
                }
                Ok(None) => {
                    assert_eq!(fed, taken + decoder.buffered());
                    break;
                }
                Err(WireError::FrameTooLarge { len, max: m }) => {
                    assert!(len > m && m == max);
                    // The stream is unusable from here on; the error repeats.
                    assert!(decoder.next_frame().is_err());
                    break 'outer;
                }
                Err(e) => panic!("FrameDecoder returned an unexpected error: {e}"),
            }
        }
    }
}

fn check_envelope(e: &Envelope) {
    assert_eq!(decode_envelope(&encode_envelope(e)).as_ref(), Ok(e));
    let mut addrs: Vec<Option<&Address>> = Vec::new();
    match &e.body {
        Some(Body::PingReq(p)) => addrs.push(p.target_addr.as_ref()),
        Some(Body::Alive(a)) => addrs.push(a.addr.as_ref()),
        Some(Body::PushPull(p)) => {
            addrs.push(p.from_addr.as_ref());
            addrs.extend(p.members.iter().map(|m| m.addr.as_ref()));
        }
        _ => {}
    }
    for a in addrs {
        match socket_addr(a) {
            Ok(sa) => {
                let a = a.map(|a| (a.ip.len(), a.port));
                assert!(matches!(a, Some((4 | 16, p)) if p <= u32::from(u16::MAX)));
                assert_eq!(socket_addr(Some(&Address::from(sa))), Ok(sa));
            }
            Err(e) => assert!(matches!(e, WireError::Decode(_))),
        }
    }
}
