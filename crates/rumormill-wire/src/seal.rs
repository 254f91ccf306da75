use std::collections::BTreeMap;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::aead::{Cipher, NONCE_LEN, TAG_LEN};
use crate::error::WireError;
use crate::filter::HeaderFilter;
use crate::header::{FrameKind, HEADER_LEN, Header};
use crate::keyring::{KeyId, KeyInfo, Keyring};
use crate::replay::ReplayGuard;

const MAX_CACHED_PEER_CIPHERS: usize = 4096;

/// Whether an overlay's packets are sealed.
#[derive(Debug)]
pub enum Security {
    /// No encryption and no authentication: for tests and simulation only.
    Plaintext,
    /// AEAD with the keyring's primary key; any installed key is accepted.
    Encrypted(Keyring),
}

/// A packet that passed every check, with its decrypted body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The packet's header.
    pub header: Header,
    /// The protobuf body.
    pub body: Vec<u8>,
}

impl Opened {
    /// The scope the packet was sealed and opened in (the header's overlay id).
    pub fn scope(&self) -> u32 {
        self.header.overlay_id
    }
}

/// Seals outgoing and opens incoming packets of one member of one overlay.
///
/// Nonces never repeat under one key: each sender seals with a subkey derived
/// by HKDF-SHA256 from the overlay key over (overlay id, key id, sender id,
/// boot epoch, life salt), and the nonce is a counter that only goes up. The
/// salt is what makes this hold whatever happens to stored state: give every
/// codec a fresh random salt (64 bits from the operating system), and a lost
/// or copied epoch, or two members with one name, still seal under different
/// subkeys. Receivers reject replays with a [`ReplayGuard`].
///
/// A codec may accept several *scopes* (overlay ids in the header: a
/// rack's and the one between racks, see [`crate::scope_id`]). The scope is
/// mixed into the subkey like the overlay id, so a packet sealed in one
/// scope opens in no other; the counter and the replay window are the
/// sender life's, shared by every scope, so nonces never repeat across
/// scopes either.
///
/// ```
/// use rumormill_wire::{Codec, FrameKind, Keyring, Security, scope_id};
/// let (home, cross) = (scope_id(7, "rack/a"), scope_id(7, "cross"));
/// let ring = || Security::Encrypted(Keyring::new(&[1u8; 32]).unwrap());
/// let mut gateway = Codec::new(home, 1, 1, 0x11, ring());
/// gateway.accept_scope(cross);
/// let mut other = Codec::new(scope_id(7, "rack/b"), 2, 1, 0x12, ring());
/// other.accept_scope(cross);
/// let p = gateway.seal_in(cross, FrameKind::Datagram, b"across")?;
/// assert_eq!(other.open(FrameKind::Datagram, &p)?.scope(), cross);
/// let q = gateway.seal(FrameKind::Datagram, b"at home")?;
/// assert!(other.open(FrameKind::Datagram, &q).is_err(), "rack a's scope is not b's");
/// # Ok::<(), rumormill_wire::WireError>(())
/// ```
pub struct Codec {
    /// The scopes accepted; the first is the home scope, which `seal` uses.
    scopes: Vec<u32>,
    sender_id: u64,
    epoch: u64,
    salt: u64,
    security: Security,
    counter: u64,
    own: BTreeMap<(u32, KeyId), Box<dyn Cipher>>,
    peers: BTreeMap<SubkeyId, Box<dyn Cipher>>,
    replay: ReplayGuard,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("scopes", &self.scopes)
            .field("sender_id", &self.sender_id)
            .field("epoch", &self.epoch)
            .field("salt", &self.salt)
            .field("security", &self.security)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

impl Codec {
    /// A codec for the member instance `(sender_id, epoch)` of an overlay,
    /// whose life is salted with `salt`: fresh randomness at every start
    /// whenever packets are sealed (see the type's documentation).
    pub fn new(overlay_id: u32, sender_id: u64, epoch: u64, salt: u64, security: Security) -> Codec {
        Codec {
            scopes: vec![overlay_id],
            sender_id,
            epoch,
            salt,
            security,
            counter: 0,
            own: BTreeMap::new(),
            peers: BTreeMap::new(),
            replay: ReplayGuard::default(),
        }
    }

    /// The home scope: the overlay id given to [`Codec::new`], which
    /// [`Codec::seal`] seals in.
    pub fn scope(&self) -> u32 {
        self.scopes[0]
    }

    /// Every scope accepted, the home scope first.
    pub fn scopes(&self) -> &[u32] {
        &self.scopes
    }

    /// Accepts (and may seal in) one more scope.
    pub fn accept_scope(&mut self, scope: u32) {
        if !self.scopes.contains(&scope) {
            self.scopes.push(scope);
        }
    }

    /// No longer accepts `scope` (the home scope is always accepted).
    pub fn refuse_scope(&mut self, scope: u32) {
        if let Some(i) = self.scopes.iter().skip(1).position(|&s| s == scope) {
            self.scopes.remove(i + 1);
            self.own.retain(|(s, _), _| *s != scope);
            self.peers.retain(|slot, _| slot.scope != scope);
        }
    }

    /// Whether packets are sealed.
    pub fn is_encrypted(&self) -> bool {
        matches!(self.security, Security::Encrypted(_))
    }

    /// Bytes a sealed packet adds to its body (header and tag).
    pub fn overhead(&self) -> usize {
        HEADER_LEN + if self.is_encrypted() { TAG_LEN } else { 0 }
    }

    /// The keys installed, if encrypted.
    pub fn keys(&self) -> Option<Vec<KeyInfo>> {
        match &self.security {
            Security::Plaintext => None,
            Security::Encrypted(ring) => Some(ring.list()),
        }
    }

    /// The keyring, or `None` on a plain-text overlay.
    pub fn keyring(&self) -> Option<&Keyring> {
        match &self.security {
            Security::Plaintext => None,
            Security::Encrypted(ring) => Some(ring),
        }
    }

    /// Changes the keyring (install, use, remove). Fails on a plain-text
    /// overlay.
    pub fn with_keyring<T>(&mut self, f: impl FnOnce(&mut Keyring) -> Result<T, WireError>) -> Result<T, WireError> {
        let Security::Encrypted(ring) = &mut self.security else {
            return Err(WireError::NoKeyring);
        };
        let out = f(ring)?;
        // Drop cached ciphers of keys that are gone.
        let installed: Vec<KeyId> = ring.list().iter().map(|k| k.id).collect();
        self.own.retain(|(_, id), _| installed.contains(id));
        self.peers.retain(|slot, _| installed.contains(&slot.key_id));
        Ok(out)
    }

    /// What [`Codec::open`] accepts in a header, as a snapshot for the
    /// tasks that read stream connections (see [`HeaderFilter`]). It changes
    /// with the keyring: take a new one after every keyring change.
    pub fn header_filter(&self) -> HeaderFilter {
        match &self.security {
            Security::Plaintext => HeaderFilter::plaintext(self.scope()),
            Security::Encrypted(ring) => HeaderFilter::encrypted(
                self.scope(),
                ring.list()
                    .iter()
                    .filter_map(|k| ring.get(k.id).map(|e| (k.id, e.suite.id())))
                    .collect(),
            ),
        }
        .with_scopes(&self.scopes)
    }

    /// Seals `body` as a datagram or stream frame in the home scope.
    pub fn seal(&mut self, kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, WireError> {
        self.seal_in(self.scope(), kind, body)
    }

    /// Seals `body` as a datagram or stream frame in `scope`, one of the
    /// scopes accepted.
    pub fn seal_in(&mut self, scope: u32, kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, WireError> {
        if !self.scopes.contains(&scope) {
            return Err(WireError::ScopeNotAccepted(scope));
        }
        let counter = self.counter;
        self.counter = counter.checked_add(1).ok_or(WireError::NonceExhausted)?;
        let (suite, key_id) = match &self.security {
            Security::Plaintext => (0, 0),
            Security::Encrypted(ring) => {
                let id = ring.primary();
                let entry = ring.get(id).ok_or(WireError::KeyNotInstalled(id))?;
                (entry.suite.id(), id)
            }
        };
        let header = Header {
            suite,
            kind,
            overlay_id: scope,
            key_id,
            sender_id: self.sender_id,
            epoch: self.epoch,
            salt: self.salt,
            counter,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(body);
        if let Security::Encrypted(ring) = &self.security {
            if !self.own.contains_key(&(scope, key_id)) {
                let c = derive(ring, self.subkey_id(scope, key_id))?;
                self.own.insert((scope, key_id), c);
            }
            let cipher = self
                .own
                .get(&(scope, key_id))
                .ok_or(WireError::KeyNotInstalled(key_id))?;
            cipher.seal(&nonce(counter), &mut out, HEADER_LEN)?;
        }
        Ok(out)
    }

    /// Checks and opens a received packet of the expected kind, in any of
    /// the scopes accepted ([`Opened::scope`] says which).
    pub fn open(&mut self, kind: FrameKind, packet: &[u8]) -> Result<Opened, WireError> {
        let header = Header::decode(packet)?;
        header.expect_kind(kind)?;
        if !self.scopes.contains(&header.overlay_id) {
            return Err(WireError::WrongOverlay {
                expected: self.scope(),
                got: header.overlay_id,
            });
        }
        let ring = match &self.security {
            Security::Plaintext if header.suite == 0 => {
                return Ok(Opened {
                    header,
                    body: packet[HEADER_LEN..].to_vec(),
                });
            }
            Security::Plaintext => return Err(WireError::EncryptedRejected),
            Security::Encrypted(_) if header.suite == 0 => return Err(WireError::PlaintextRejected),
            Security::Encrypted(ring) => ring,
        };
        let entry = ring.get(header.key_id).ok_or(WireError::UnknownKey(header.key_id))?;
        if entry.suite.id() != header.suite {
            return Err(WireError::SuiteMismatch {
                key_id: header.key_id,
                expected: entry.suite.id(),
                got: header.suite,
            });
        }
        if packet.len() < HEADER_LEN + TAG_LEN {
            return Err(WireError::Truncated {
                len: packet.len(),
                min: HEADER_LEN + TAG_LEN,
            });
        }
        self.replay.check(&header)?;
        let slot = SubkeyId::of(&header);
        let mut buf = packet.to_vec();
        match self.peers.get(&slot) {
            Some(cipher) => cipher.open(&nonce(header.counter), &mut buf, HEADER_LEN)?,
            None => {
                // Cache the subkey only once a packet authenticated under it,
                // so forged headers cannot evict the ciphers of real peers.
                let cipher = derive(ring, slot)?;
                cipher.open(&nonce(header.counter), &mut buf, HEADER_LEN)?;
                if self.peers.len() >= MAX_CACHED_PEER_CIPHERS {
                    self.peers.pop_first();
                }
                self.peers.insert(slot, cipher);
            }
        }
        self.replay.accept(&header);
        buf.drain(..HEADER_LEN);
        Ok(Opened { header, body: buf })
    }
}

/// What a subkey is derived from, besides the overlay key: one per scope,
/// key and sender life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct SubkeyId {
    scope: u32,
    key_id: KeyId,
    sender_id: u64,
    epoch: u64,
    salt: u64,
}

impl SubkeyId {
    fn of(h: &Header) -> SubkeyId {
        SubkeyId {
            scope: h.overlay_id,
            key_id: h.key_id,
            sender_id: h.sender_id,
            epoch: h.epoch,
            salt: h.salt,
        }
    }
}

impl Codec {
    fn subkey_id(&self, scope: u32, key_id: KeyId) -> SubkeyId {
        SubkeyId {
            scope,
            key_id,
            sender_id: self.sender_id,
            epoch: self.epoch,
            salt: self.salt,
        }
    }
}

/// HKDF-SHA256 over the overlay key, with (overlay id or scope, key id,
/// sender id, epoch, salt) as info: a distinct subkey for every sender life
/// in every overlay and scope, so counter nonces never collide — not even
/// for a member that uses one key in two overlays, lost its epoch, or
/// shares its name.
fn derive(ring: &Keyring, id: SubkeyId) -> Result<Box<dyn Cipher>, WireError> {
    let entry = ring.get(id.key_id).ok_or(WireError::KeyNotInstalled(id.key_id))?;
    let hk = Hkdf::<Sha256>::new(Some(b"rumormill v2 subkey"), &entry.secret);
    let mut info = [0u8; 32];
    info[..4].copy_from_slice(&id.scope.to_be_bytes());
    info[4..8].copy_from_slice(&id.key_id.to_be_bytes());
    info[8..16].copy_from_slice(&id.sender_id.to_be_bytes());
    info[16..24].copy_from_slice(&id.epoch.to_be_bytes());
    info[24..].copy_from_slice(&id.salt.to_be_bytes());
    let mut sub = Zeroizing::new(vec![0u8; entry.suite.key_len()]);
    hk.expand(&info, &mut sub)
        .map_err(|_| WireError::KeyLength(sub.len()))?;
    entry.suite.cipher(&sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &[u8]) -> (Codec, Codec) {
        let a = Codec::new(7, 1, 1, 11, Security::Encrypted(Keyring::new(key).unwrap()));
        let b = Codec::new(7, 2, 1, 12, Security::Encrypted(Keyring::new(key).unwrap()));
        (a, b)
    }

    #[test]
    fn all_three_aes_sizes_round_trip() {
        for len in [16, 24, 32] {
            let (mut a, mut b) = pair(&vec![3u8; len]);
            let p = a.seal(FrameKind::Datagram, b"body").unwrap();
            assert_eq!(p.len(), HEADER_LEN + 4 + TAG_LEN);
            assert_eq!(b.open(FrameKind::Datagram, &p).unwrap().body, b"body");
        }
    }

    #[test]
    fn replays_and_tampering_are_rejected() {
        let (mut a, mut b) = pair(&[1; 32]);
        let p = a.seal(FrameKind::Datagram, b"x").unwrap();
        let mut bad = p.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(b.open(FrameKind::Datagram, &bad), Err(WireError::Authentication));
        b.open(FrameKind::Datagram, &p).unwrap();
        assert_eq!(b.open(FrameKind::Datagram, &p), Err(WireError::Replay { sender: 1 }));
        // Changing the header (the associated data) breaks authentication.
        let mut hdr = a.seal(FrameKind::Datagram, b"y").unwrap();
        hdr[20] ^= 1; // epoch
        assert_eq!(b.open(FrameKind::Datagram, &hdr), Err(WireError::Authentication));
    }

    #[test]
    fn foreign_keys_overlays_and_plain_text_are_rejected() {
        let (mut a, _) = pair(&[1; 16]);
        let (_, mut other) = pair(&[2; 16]);
        let p = a.seal(FrameKind::Datagram, b"x").unwrap();
        assert!(matches!(
            other.open(FrameKind::Datagram, &p),
            Err(WireError::UnknownKey(_))
        ));
        let mut plain = Codec::new(7, 3, 1, 13, Security::Plaintext);
        assert_eq!(plain.open(FrameKind::Datagram, &p), Err(WireError::EncryptedRejected));
        let q = plain.seal(FrameKind::Datagram, b"x").unwrap();
        assert_eq!(a.open(FrameKind::Datagram, &q), Err(WireError::PlaintextRejected));
        let mut elsewhere = Codec::new(8, 3, 1, 13, Security::Plaintext);
        assert!(matches!(
            elsewhere.open(FrameKind::Datagram, &q),
            Err(WireError::WrongOverlay { .. })
        ));
        assert!(matches!(
            plain.open(FrameKind::Stream, &q),
            Err(WireError::KindMismatch { .. })
        ));
    }

    #[test]
    fn rotation_keeps_traffic_flowing() {
        let (mut a, mut b) = pair(&[1; 32]);
        let new = [9u8; 32];
        // Step 1: install everywhere. Traffic under the old key still flows.
        let id = a.with_keyring(|r| r.install(&new)).unwrap();
        b.with_keyring(|r| r.install(&new)).unwrap();
        let p = a.seal(FrameKind::Datagram, b"1").unwrap();
        b.open(FrameKind::Datagram, &p).unwrap();
        // Step 2: a switches first; b still accepts, and a still accepts b's old-key packets.
        a.with_keyring(|r| r.use_key(id)).unwrap();
        let p = a.seal(FrameKind::Datagram, b"2").unwrap();
        assert_eq!(Header::decode(&p).unwrap().key_id, id);
        b.open(FrameKind::Datagram, &p).unwrap();
        let q = b.seal(FrameKind::Datagram, b"3").unwrap();
        a.open(FrameKind::Datagram, &q).unwrap();
        // Step 3: b switches, both drop the old key.
        b.with_keyring(|r| r.use_key(id)).unwrap();
        let old = crate::key_id(&[1; 32]);
        a.with_keyring(|r| r.remove(old)).unwrap();
        b.with_keyring(|r| r.remove(old)).unwrap();
        let q = b.seal(FrameKind::Datagram, b"4").unwrap();
        assert_eq!(a.open(FrameKind::Datagram, &q).unwrap().body, b"4");
        assert_eq!(a.with_keyring(|r| r.remove(id)), Err(WireError::RemovePrimary(id)));
    }

    #[test]
    fn forged_packets_do_not_fill_the_subkey_cache() {
        let (mut a, mut b) = pair(&[1; 32]);
        let mut p = a.seal(FrameKind::Datagram, b"x").unwrap();
        for sender in 100..200u64 {
            p[12..20].copy_from_slice(&sender.to_be_bytes());
            assert_eq!(b.open(FrameKind::Datagram, &p), Err(WireError::Authentication));
        }
        assert!(b.peers.is_empty());
        let q = a.seal(FrameKind::Datagram, b"y").unwrap();
        b.open(FrameKind::Datagram, &q).unwrap();
        assert_eq!(b.peers.len(), 1);
    }

    #[test]
    fn one_key_in_two_overlays_gives_two_keystreams() {
        let ring = || Security::Encrypted(Keyring::new(&[5; 16]).unwrap());
        let mut one = Codec::new(crate::overlay_id("one"), 1, 1, 1, ring());
        let mut two = Codec::new(crate::overlay_id("two"), 1, 1, 1, ring());
        let body = [0u8; 32];
        let (p1, p2) = (
            one.seal(FrameKind::Datagram, &body).unwrap(),
            two.seal(FrameKind::Datagram, &body).unwrap(),
        );
        assert_ne!(
            p1[HEADER_LEN..],
            p2[HEADER_LEN..],
            "same counter, same key: the overlay id must change the subkey"
        );
    }

    #[test]
    fn subkeys_differ_per_sender_and_epoch() {
        // Same key, same counter, same body: ciphertexts must differ across senders and epochs.
        let ring = || Security::Encrypted(Keyring::new(&[5; 16]).unwrap());
        let mut x = Codec::new(1, 1, 1, 1, ring());
        let mut y = Codec::new(1, 2, 1, 1, ring());
        let mut z = Codec::new(1, 1, 2, 1, ring());
        let body = [0u8; 32];
        let (px, py, pz) = (
            x.seal(FrameKind::Datagram, &body).unwrap(),
            y.seal(FrameKind::Datagram, &body).unwrap(),
            z.seal(FrameKind::Datagram, &body).unwrap(),
        );
        assert_ne!(px[HEADER_LEN..], py[HEADER_LEN..]);
        assert_ne!(px[HEADER_LEN..], pz[HEADER_LEN..]);
    }

    #[test]
    fn two_lives_with_one_epoch_seal_under_different_subkeys() {
        // A lost or copied data directory, or two members of one name: same
        // sender id, same epoch, same counter. Only the salt differs, and it
        // is enough: the keystreams differ and each life opens as its own.
        let ring = || Security::Encrypted(Keyring::new(&[5; 32]).unwrap());
        let mut first = Codec::new(1, 1, 1, 0x1111, ring());
        let mut second = Codec::new(1, 1, 1, 0x2222, ring());
        let mut receiver = Codec::new(1, 2, 1, 3, ring());
        let body = [0u8; 64];
        let (p1, p2) = (
            first.seal(FrameKind::Datagram, &body).unwrap(),
            second.seal(FrameKind::Datagram, &body).unwrap(),
        );
        let (h1, h2) = (Header::decode(&p1).unwrap(), Header::decode(&p2).unwrap());
        assert_eq!(
            (h1.sender_id, h1.epoch, h1.counter),
            (h2.sender_id, h2.epoch, h2.counter)
        );
        assert_ne!(h1.salt, h2.salt);
        // c1 xor c2 would equal p1 xor p2 (all zeros) under one keystream.
        let xor: Vec<u8> = p1[HEADER_LEN..]
            .iter()
            .zip(&p2[HEADER_LEN..])
            .map(|(a, b)| a ^ b)
            .collect();
        assert!(xor.iter().any(|&b| b != 0), "two lives share a keystream");
        assert_eq!(receiver.open(FrameKind::Datagram, &p1).unwrap().body, body);
        assert_eq!(receiver.open(FrameKind::Datagram, &p2).unwrap().body, body);
        // The salt is authenticated like the rest of the header.
        let mut forged = second.seal(FrameKind::Datagram, &body).unwrap();
        forged[28] ^= 1;
        assert_eq!(
            receiver.open(FrameKind::Datagram, &forged),
            Err(WireError::Authentication)
        );
    }

    #[test]
    fn a_packet_sealed_in_one_scope_opens_in_no_other() {
        let ring = || Security::Encrypted(Keyring::new(&[5; 32]).unwrap());
        let (a, b, cross) = (
            crate::scope_id(7, "rack/a"),
            crate::scope_id(7, "rack/b"),
            crate::scope_id(7, "cross"),
        );
        let mut gateway = Codec::new(a, 1, 1, 1, ring());
        gateway.accept_scope(cross);
        let mut in_b = Codec::new(b, 2, 1, 2, ring());
        let mut other_gateway = Codec::new(b, 3, 1, 3, ring());
        other_gateway.accept_scope(cross);
        let home = gateway.seal(FrameKind::Datagram, b"x").unwrap();
        let across = gateway.seal_in(cross, FrameKind::Datagram, b"y").unwrap();
        assert!(matches!(
            in_b.open(FrameKind::Datagram, &home),
            Err(WireError::WrongOverlay { .. })
        ));
        assert!(matches!(
            in_b.open(FrameKind::Datagram, &across),
            Err(WireError::WrongOverlay { .. })
        ));
        assert!(matches!(
            other_gateway.open(FrameKind::Datagram, &home),
            Err(WireError::WrongOverlay { .. })
        ));
        assert_eq!(other_gateway.open(FrameKind::Datagram, &across).unwrap().scope(), cross);
        // Relabelling a rack packet as cross-scope: the subkey differs, so it
        // does not authenticate.
        let mut relabelled = gateway.seal(FrameKind::Datagram, b"z").unwrap();
        relabelled[4..8].copy_from_slice(&cross.to_be_bytes());
        assert_eq!(
            other_gateway.open(FrameKind::Datagram, &relabelled),
            Err(WireError::Authentication)
        );
        // A scope refused again is closed, for sealing and opening.
        other_gateway.refuse_scope(cross);
        let again = gateway.seal_in(cross, FrameKind::Datagram, b"w").unwrap();
        assert!(matches!(
            other_gateway.open(FrameKind::Datagram, &again),
            Err(WireError::WrongOverlay { .. })
        ));
        assert_eq!(
            other_gateway.seal_in(cross, FrameKind::Datagram, b"v"),
            Err(WireError::ScopeNotAccepted(cross))
        );
        other_gateway.refuse_scope(b);
        assert_eq!(other_gateway.scopes(), &[b], "the home scope stays");
    }

    #[test]
    fn nonces_never_repeat_across_scopes() {
        let ring = || Security::Encrypted(Keyring::new(&[5; 32]).unwrap());
        let (home, cross) = (crate::scope_id(7, "rack/a"), crate::scope_id(7, "cross"));
        let mut sender = Codec::new(home, 1, 1, 1, ring());
        sender.accept_scope(cross);
        let mut receiver = Codec::new(crate::scope_id(7, "rack/a"), 2, 1, 2, ring());
        receiver.accept_scope(cross);
        let mut counters = std::collections::BTreeSet::new();
        let mut sealed = Vec::new();
        for i in 0..200u32 {
            let scope = if i % 3 == 0 { cross } else { home };
            let kind = if i % 2 == 0 {
                FrameKind::Datagram
            } else {
                FrameKind::Stream
            };
            let p = sender.seal_in(scope, kind, &i.to_be_bytes()).unwrap();
            let h = Header::decode(&p).unwrap();
            assert!(counters.insert(h.counter), "counter {} used twice", h.counter);
            sealed.push((kind, p));
        }
        // One replay window per sender life: a packet replayed in the
        // other scope's label is still a replay, or fails authentication.
        for (kind, p) in &sealed {
            receiver.open(*kind, p).unwrap();
            assert_eq!(receiver.open(*kind, p), Err(WireError::Replay { sender: 1 }));
        }
    }
}
