use crate::error::WireError;

/// The two bytes every packet starts with.
pub const MAGIC: [u8; 2] = *b"RM";
/// The protocol version this build speaks. Version 2 added the life salt.
pub const VERSION: u8 = 2;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 44;

const STREAM_FLAG: u8 = 0x80;
const SUITE_MASK: u8 = 0x0f;

/// Whether a packet travels as a datagram or as a stream frame. The kind is
/// part of the authenticated header, so a datagram can never be replayed as a
/// stream frame or the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrameKind {
    /// A UDP datagram holding a [`crate::proto::Packet`].
    Datagram,
    /// A length-delimited stream frame holding one [`crate::proto::Envelope`].
    Stream,
}

impl FrameKind {
    fn name(self) -> &'static str {
        match self {
            FrameKind::Datagram => "datagram",
            FrameKind::Stream => "stream frame",
        }
    }
}

/// The fixed binary header outside the protobuf body, big-endian:
///
/// | bytes | field |
/// |---|---|
/// | 0..2 | magic `RM` |
/// | 2 | version |
/// | 3 | flags: bit 7 stream frame, bits 0..4 cipher suite (0 = plain text) |
/// | 4..8 | overlay id |
/// | 8..12 | key id (0 when plain text) |
/// | 12..20 | sender id |
/// | 20..28 | sender's boot epoch |
/// | 28..36 | sender's life salt (random, drawn at every start) |
/// | 36..44 | nonce counter |
///
/// On an encrypted overlay the whole header is the AEAD's associated data.
///
/// ```
/// use rumormill_wire::{FrameKind, Header};
/// let h = Header { suite: 3, kind: FrameKind::Stream, overlay_id: 9, key_id: 4, sender_id: 5, epoch: 6, salt: 8, counter: 7 };
/// assert_eq!(Header::decode(&h.encode()).unwrap(), h);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Cipher suite id (0 = plain text).
    pub suite: u8,
    /// Datagram or stream frame.
    pub kind: FrameKind,
    /// Overlay id, see [`crate::overlay_id`].
    pub overlay_id: u32,
    /// Id of the key the body is sealed with.
    pub key_id: u32,
    /// Id of the sending member instance.
    pub sender_id: u64,
    /// The sender's boot epoch.
    pub epoch: u64,
    /// The sender's life salt: fresh randomness drawn at every start, so
    /// that two lives never share a subkey even when the epoch repeats (a
    /// lost or copied data directory, two members of one name).
    pub salt: u64,
    /// The nonce counter.
    pub counter: u64,
}

impl Header {
    /// Serializes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        let kind = match self.kind {
            FrameKind::Datagram => 0,
            FrameKind::Stream => STREAM_FLAG,
        };
        out[3] = kind | (self.suite & SUITE_MASK);
        out[4..8].copy_from_slice(&self.overlay_id.to_be_bytes());
        out[8..12].copy_from_slice(&self.key_id.to_be_bytes());
        out[12..20].copy_from_slice(&self.sender_id.to_be_bytes());
        out[20..28].copy_from_slice(&self.epoch.to_be_bytes());
        out[28..36].copy_from_slice(&self.salt.to_be_bytes());
        out[36..44].copy_from_slice(&self.counter.to_be_bytes());
        out
    }

    /// Parses the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, WireError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(WireError::Truncated {
                len: bytes.len(),
                min: HEADER_LEN,
            });
        };
        if h[0..2] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if h[2] != VERSION {
            return Err(WireError::UnsupportedVersion(h[2]));
        }
        let flags = h[3];
        if flags & !(STREAM_FLAG | SUITE_MASK) != 0 {
            return Err(WireError::ReservedFlags(flags));
        }
        let be32 = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&h[r]);
            u32::from_be_bytes(b)
        };
        let be64 = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[r]);
            u64::from_be_bytes(b)
        };
        Ok(Header {
            suite: flags & SUITE_MASK,
            kind: if flags & STREAM_FLAG != 0 {
                FrameKind::Stream
            } else {
                FrameKind::Datagram
            },
            overlay_id: be32(4..8),
            key_id: be32(8..12),
            sender_id: be64(12..20),
            epoch: be64(20..28),
            salt: be64(28..36),
            counter: be64(36..44),
        })
    }

    pub(crate) fn expect_kind(&self, expected: FrameKind) -> Result<(), WireError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(WireError::KindMismatch {
                expected: expected.name(),
                got: self.kind.name(),
            })
        }
    }
}
