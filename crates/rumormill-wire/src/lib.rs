//! Rumormill's wire format.
//!
//! Every datagram and stream frame on the wire is a fixed 44-byte [`Header`]
//! followed by a protobuf body ([`proto::Packet`] for datagrams, one
//! [`proto::Envelope`] for stream frames). On an encrypted overlay the body is
//! sealed with AES-GCM under a per-sender subkey and the header is the
//! associated data; see [`Codec`].
//!
//! ```
//! use rumormill_wire::{Codec, FrameKind, Keyring, Security, overlay_id};
//!
//! let key = [7u8; 32];
//! let mut alice = Codec::new(overlay_id("default"), 1, 1, 0x51, Security::Encrypted(Keyring::new(&key)?));
//! let mut bob = Codec::new(overlay_id("default"), 2, 1, 0x52, Security::Encrypted(Keyring::new(&key)?));
//! let packet = alice.seal(FrameKind::Datagram, b"hello")?;
//! let opened = bob.open(FrameKind::Datagram, &packet)?;
//! assert_eq!(opened.body, b"hello");
//! // The same packet a second time is a replay.
//! assert!(bob.open(FrameKind::Datagram, &packet).is_err());
//! # Ok::<(), rumormill_wire::WireError>(())
//! ```
#![warn(missing_docs)]

mod address;
mod aead;
mod error;
mod filter;
mod framing;
mod header;
mod keyring;
mod packing;
mod replay;
mod seal;

/// Messages generated from `proto/rumormill/v1/*.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rumormill.v1.rs"));
}

pub use address::socket_addr;
pub use aead::{AesGcmSuite, Cipher, CipherSuite, NONCE_LEN, TAG_LEN};
pub use error::WireError;
pub use filter::HeaderFilter;
pub use framing::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame};
pub use header::{FrameKind, HEADER_LEN, Header, MAGIC, VERSION};
pub use keyring::{KeyId, KeyInfo, Keyring, key_id};
pub use packing::{PacketBuilder, decode_envelope, decode_packet, encode_envelope, envelope_len};
pub use replay::{REPLAY_WINDOW, ReplayGuard};
pub use seal::{Codec, Opened, Security};

/// The 32-bit overlay id carried in every header: the first four bytes of
/// SHA-256 over the overlay's name. Packets of another overlay that arrive on
/// the same port are rejected before any decryption.
///
/// ```
/// assert_eq!(rumormill_wire::overlay_id("a"), rumormill_wire::overlay_id("a"));
/// assert_ne!(rumormill_wire::overlay_id("a"), rumormill_wire::overlay_id("b"));
/// ```
pub fn overlay_id(name: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"rumormill overlay id\0")
        .chain_update(name.as_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The scope id of one part of an overlay, carried in the header's overlay
/// id field in place of the overlay id: `scope_id(overlay, "rack/eu-1")` for
/// the traffic inside rack `eu-1`, `scope_id(overlay, "cross")` for the
/// traffic between racks' gateways. It is mixed into the subkey like an
/// overlay id, so a member that does not accept a scope refuses its packets
/// at the header, before any decryption.
///
/// ```
/// use rumormill_wire::{overlay_id, scope_id};
/// let o = overlay_id("default");
/// assert_ne!(scope_id(o, "rack/a"), scope_id(o, "rack/b"));
/// assert_ne!(scope_id(o, "cross"), o);
/// assert_ne!(scope_id(o, "cross"), scope_id(overlay_id("other"), "cross"));
/// ```
pub fn scope_id(overlay_id: u32, scope: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"rumormill scope id\0")
        .chain_update(overlay_id.to_be_bytes())
        .chain_update(scope.as_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}
