use crate::aead::TAG_LEN;
use crate::error::WireError;
use crate::header::{FrameKind, HEADER_LEN, Header};
use crate::keyring::KeyId;

/// The checks a [`crate::Codec`] makes on a packet's header before it reads
/// the body, as a snapshot that other tasks can hold: a stream reader checks
/// a frame's header with it before it buffers the frame's body.
///
/// A header that passes proves nothing about its sender: the overlay id and
/// the key ids travel in clear in every packet, so anyone who has seen one
/// can forge a header that passes. What it stops is every stranger who has
/// not: random bytes, another protocol, another overlay, another keyring,
/// plain text on an encrypted overlay and the reverse.
///
/// ```
/// use rumormill_wire::{Codec, FrameKind, Keyring, Security};
/// let mut alice = Codec::new(7, 1, 1, 0x11, Security::Encrypted(Keyring::new(&[1u8; 32])?));
/// let bob = Codec::new(7, 2, 1, 0x12, Security::Encrypted(Keyring::new(&[1u8; 32])?));
/// let frame = alice.seal(FrameKind::Stream, b"body")?;
/// let filter = bob.header_filter();
/// assert!(filter.check(FrameKind::Stream, frame.len(), &frame).is_ok());
/// let stranger = Codec::new(7, 3, 1, 0x13, Security::Encrypted(Keyring::new(&[2u8; 32])?)).header_filter();
/// assert!(stranger.check(FrameKind::Stream, frame.len(), &frame).is_err());
/// # Ok::<(), rumormill_wire::WireError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFilter {
    /// The scopes accepted (overlay ids in the header), the home scope first.
    scopes: Vec<u32>,
    /// `None` on a plain-text overlay; else the installed keys and their
    /// cipher suites.
    keys: Option<Vec<(KeyId, u8)>>,
}

impl HeaderFilter {
    /// A filter for a plain-text overlay: suite 0, key id 0.
    pub fn plaintext(overlay_id: u32) -> HeaderFilter {
        HeaderFilter {
            scopes: vec![overlay_id],
            keys: None,
        }
    }

    /// A filter for an encrypted overlay with these installed keys, each
    /// with its cipher suite id.
    pub fn encrypted(overlay_id: u32, keys: Vec<(KeyId, u8)>) -> HeaderFilter {
        HeaderFilter {
            scopes: vec![overlay_id],
            keys: Some(keys),
        }
    }

    /// The same filter accepting these scopes as well (see [`crate::Codec::accept_scope`]).
    pub fn with_scopes(mut self, scopes: &[u32]) -> HeaderFilter {
        for &s in scopes {
            if !self.scopes.contains(&s) {
                self.scopes.push(s);
            }
        }
        self
    }

    /// Checks the header at the start of `head` (at least [`HEADER_LEN`]
    /// bytes) of a packet of `len` bytes in all, as [`crate::Codec::open`]
    /// would before decrypting: magic, version, flags, kind, overlay id,
    /// cipher suite and key id, and that the packet can hold a header (and
    /// tag). Returns the header, or the error `open` would return.
    pub fn check(&self, kind: FrameKind, len: usize, head: &[u8]) -> Result<Header, WireError> {
        if len < HEADER_LEN {
            return Err(WireError::Truncated { len, min: HEADER_LEN });
        }
        let header = Header::decode(head)?;
        header.expect_kind(kind)?;
        if !self.scopes.contains(&header.overlay_id) {
            return Err(WireError::WrongOverlay {
                expected: self.scopes[0],
                got: header.overlay_id,
            });
        }
        let Some(keys) = &self.keys else {
            return match header.suite {
                0 => Ok(header),
                _ => Err(WireError::EncryptedRejected),
            };
        };
        if header.suite == 0 {
            return Err(WireError::PlaintextRejected);
        }
        let Some(&(_, suite)) = keys.iter().find(|(id, _)| *id == header.key_id) else {
            return Err(WireError::UnknownKey(header.key_id));
        };
        if suite != header.suite {
            return Err(WireError::SuiteMismatch {
                key_id: header.key_id,
                expected: suite,
                got: header.suite,
            });
        }
        if len < HEADER_LEN + TAG_LEN {
            return Err(WireError::Truncated {
                len,
                min: HEADER_LEN + TAG_LEN,
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Keyring;
    use crate::seal::{Codec, Security};

    fn encrypted(overlay: u32, key: &[u8]) -> Codec {
        Codec::new(overlay, 9, 1, 0x19, Security::Encrypted(Keyring::new(key).unwrap()))
    }

    /// Every packet the filter refuses, the codec refuses with the same
    /// error; every packet the codec opens, the filter lets through.
    #[test]
    fn the_filter_agrees_with_the_codec() {
        let key = [5u8; 32];
        let mut senders = vec![
            encrypted(7, &key),
            encrypted(7, &[6u8; 16]),
            encrypted(8, &key),
            Codec::new(7, 10, 1, 0x1a, Security::Plaintext),
            Codec::new(8, 10, 1, 0x1b, Security::Plaintext),
            encrypted(crate::scope_id(7, "cross"), &key),
            encrypted(crate::scope_id(7, "rack/a"), &key),
        ];
        let mut packets = Vec::new();
        for s in &mut senders {
            for kind in [FrameKind::Stream, FrameKind::Datagram] {
                let p = s.seal(kind, b"some body").unwrap();
                packets.push(p.clone());
                // Cut short, and with the suite and magic altered.
                for cut in [0, 3, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 1, p.len() - 1] {
                    packets.push(p[..cut].to_vec());
                }
                let mut q = p.clone();
                q[3] ^= 0x01;
                packets.push(q);
                let mut q = p.clone();
                q[0] = b'X';
                packets.push(q);
                let mut q = p;
                q[2] = q[2].wrapping_add(1);
                packets.push(q);
            }
        }
        packets.push(vec![0xab; 64]);
        let mut receivers = vec![
            (encrypted(7, &key), 0),
            (Codec::new(7, 11, 1, 0x1c, Security::Plaintext), 0),
        ];
        // A receiver with two keys, the sender's second.
        let mut two = encrypted(7, &[6u8; 16]);
        two.with_keyring(|r| r.install(&key)).unwrap();
        receivers.push((two, 0));
        // A gateway: its rack's scope and the cross scope.
        let mut gateway = encrypted(crate::scope_id(7, "rack/b"), &key);
        gateway.accept_scope(crate::scope_id(7, "cross"));
        receivers.push((gateway, 0));
        let mut plain_gateway = Codec::new(7, 12, 1, 0x1d, Security::Plaintext);
        plain_gateway.accept_scope(8);
        receivers.push((plain_gateway, 0));
        let mut passed = 0;
        for (receiver, opened) in &mut receivers {
            let filter = receiver.header_filter();
            for p in &packets {
                for kind in [FrameKind::Stream, FrameKind::Datagram] {
                    let checked = filter.check(kind, p.len(), p);
                    let open = receiver.open(kind, p);
                    match (&checked, &open) {
                        (Err(f), Err(o)) => assert_eq!(f, o, "packet {p:?}"),
                        (Err(f), Ok(_)) => panic!("filter refused ({f}) what the codec opened: {p:?}"),
                        (Ok(_), _) => passed += 1,
                    }
                    if open.is_ok() {
                        *opened += 1;
                    }
                }
            }
        }
        assert!(passed > 0 && receivers.iter().all(|(_, n)| *n > 0), "some packets open");
    }

    #[test]
    fn a_key_change_changes_the_filter() {
        let mut c = encrypted(7, &[1u8; 32]);
        let before = c.header_filter();
        let id = c.with_keyring(|r| r.install(&[2u8; 24])).unwrap();
        let after = c.header_filter();
        assert_ne!(before, after);
        let mut other = encrypted(7, &[2u8; 24]);
        let p = other.seal(FrameKind::Stream, b"x").unwrap();
        assert_eq!(
            before.check(FrameKind::Stream, p.len(), &p),
            Err(WireError::UnknownKey(id))
        );
        assert!(after.check(FrameKind::Stream, p.len(), &p).is_ok());
    }
}
