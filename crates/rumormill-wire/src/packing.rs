use prost::Message;

use crate::error::WireError;
use crate::proto::{Envelope, Packet};

/// Bytes one envelope takes inside a [`Packet`] body (field tag, length
/// prefix and the message).
pub fn envelope_len(e: &Envelope) -> usize {
    let len = e.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Encodes one envelope, the body of a stream frame.
pub fn encode_envelope(e: &Envelope) -> Vec<u8> {
    e.encode_to_vec()
}

/// Decodes the body of a stream frame.
pub fn decode_envelope(body: &[u8]) -> Result<Envelope, WireError> {
    Ok(Envelope::decode(body)?)
}

/// Decodes the body of a datagram.
pub fn decode_packet(body: &[u8]) -> Result<Packet, WireError> {
    Ok(Packet::decode(body)?)
}

/// Packs envelopes into one datagram body of at most `budget` bytes
/// (the MTU less the codec's overhead).
///
/// ```
/// use rumormill_wire::{PacketBuilder, envelope_len, proto::{envelope::Body, Ack, Envelope}};
/// let ack = |seq| Envelope { body: Some(Body::Ack(Ack { seq })) };
/// assert_eq!((envelope_len(&ack(1)), envelope_len(&ack(300))), (6, 7));
/// let mut b = PacketBuilder::new(14);
/// assert!(b.push(ack(1)).is_ok());
/// assert!(b.push(ack(300)).is_ok());
/// assert!(b.push(ack(2)).is_err(), "would exceed 14 bytes");
/// assert_eq!(b.finish().len(), 13);
/// ```
#[derive(Debug, Clone)]
pub struct PacketBuilder {
    packet: Packet,
    size: usize,
    budget: usize,
}

impl PacketBuilder {
    /// An empty packet with room for `budget` bytes.
    pub fn new(budget: usize) -> PacketBuilder {
        PacketBuilder {
            packet: Packet::default(),
            size: 0,
            budget,
        }
    }

    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.budget - self.size
    }

    /// Whether an envelope of `len` bytes (see [`envelope_len`]) still fits.
    pub fn fits(&self, len: usize) -> bool {
        len <= self.remaining()
    }

    /// Adds the envelope if it fits, or hands it back.
    pub fn push(&mut self, e: Envelope) -> Result<(), Envelope> {
        let len = envelope_len(&e);
        if !self.fits(len) {
            return Err(e);
        }
        self.size += len;
        self.packet.envelopes.push(e);
        Ok(())
    }

    /// Number of envelopes packed.
    pub fn len(&self) -> usize {
        self.packet.envelopes.len()
    }

    /// Whether nothing was packed.
    pub fn is_empty(&self) -> bool {
        self.packet.envelopes.is_empty()
    }

    /// Encoded size so far.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The envelopes packed, to wrap them in another message.
    pub fn into_envelopes(self) -> Vec<Envelope> {
        self.packet.envelopes
    }

    /// The encoded body.
    pub fn finish(self) -> Vec<u8> {
        self.packet.encode_to_vec()
    }
}
