use crate::header::HEADER_LEN;

/// Everything that can go wrong while reading or writing Rumormill's wire
/// format. Decoders return one of these for any input; they never panic.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than a header (plus tag, when encrypted).
    #[error("packet too short: {len} bytes, at least {min} needed (header is {HEADER_LEN})")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The first two bytes are not `RM`.
    #[error("not a rumormill packet (bad magic)")]
    BadMagic,
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Reserved header flags were set.
    #[error("reserved header flags set: {0:#04x}")]
    ReservedFlags(u8),
    /// A datagram arrived where a stream frame was expected, or the reverse.
    #[error("frame kind mismatch: expected {expected}, got {got}")]
    KindMismatch {
        /// What the caller expected.
        expected: &'static str,
        /// What the header says.
        got: &'static str,
    },
    /// The packet belongs to another overlay.
    #[error("packet for overlay {got:#010x}, this overlay is {expected:#010x}")]
    WrongOverlay {
        /// This overlay's id.
        expected: u32,
        /// The id in the packet.
        got: u32,
    },
    /// A packet was to be sealed in a scope the codec does not accept.
    #[error("scope {0:#010x} is not accepted by this codec")]
    ScopeNotAccepted(u32),
    /// A plain-text packet reached an encrypted overlay.
    #[error("plain-text packet rejected: this overlay is encrypted")]
    PlaintextRejected,
    /// An encrypted packet reached a plain-text overlay.
    #[error("encrypted packet rejected: this overlay is plain-text")]
    EncryptedRejected,
    /// A keyring operation on a plain-text overlay.
    #[error("this overlay is plain-text: it has no keyring")]
    NoKeyring,
    /// The key id in the header is not installed in the keyring.
    #[error("unknown key id {0:#010x}")]
    UnknownKey(u32),
    /// The header's cipher suite does not match the key's.
    #[error("cipher suite {got} does not match key {key_id:#010x} (suite {expected})")]
    SuiteMismatch {
        /// The key id.
        key_id: u32,
        /// The key's suite.
        expected: u8,
        /// The header's suite.
        got: u8,
    },
    /// Authentication failed: wrong key, or the packet was altered.
    #[error("authentication failed (wrong key or altered packet)")]
    Authentication,
    /// The packet was seen before, or is older than the replay window.
    #[error("replayed or stale packet from sender {sender:#018x}")]
    Replay {
        /// The sender id in the header.
        sender: u64,
    },
    /// The nonce counter of this sender and epoch is used up.
    #[error("nonce counter exhausted: restart with a new boot epoch")]
    NonceExhausted,
    /// A key of a length no installed suite accepts.
    #[error("invalid key length {0} bytes: AES-GCM takes 16, 24 or 32")]
    KeyLength(usize),
    /// The key is not in the keyring.
    #[error("key {0:#010x} is not installed")]
    KeyNotInstalled(u32),
    /// The primary key cannot be removed.
    #[error("key {0:#010x} is the primary key: make another key primary first")]
    RemovePrimary(u32),
    /// The protobuf body does not decode.
    #[error("malformed message body: {0}")]
    Decode(String),
    /// A stream frame longer than the limit.
    #[error("stream frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
}

impl From<prost::DecodeError> for WireError {
    fn from(e: prost::DecodeError) -> Self {
        WireError::Decode(e.to_string())
    }
}
