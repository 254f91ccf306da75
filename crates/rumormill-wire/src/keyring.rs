use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::aead::{AesGcmSuite, CipherSuite};
use crate::error::WireError;

/// Identifies a key on the wire without revealing it.
pub type KeyId = u32;

/// The id of a key: the first four bytes of SHA-256 over a label and the key,
/// never 0 (0 marks plain text). Every member computes the same id for the
/// same key, so no coordination is needed.
pub fn key_id(key: &[u8]) -> KeyId {
    let d = Sha256::new()
        .chain_update(b"rumormill key id\0")
        .chain_update(key)
        .finalize();
    match u32::from_be_bytes([d[0], d[1], d[2], d[3]]) {
        0 => 1,
        id => id,
    }
}

pub(crate) struct KeyEntry {
    pub(crate) suite: Arc<dyn CipherSuite>,
    pub(crate) secret: Zeroizing<Vec<u8>>,
}

/// What [`Keyring::list`] tells about a key. It never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key id.
    pub id: KeyId,
    /// The cipher suite's name.
    pub suite: &'static str,
    /// Whether outgoing packets are sealed with this key.
    pub primary: bool,
}

/// The keys of one overlay: packets are sealed with the primary key and
/// accepted under any installed key, so keys rotate without downtime:
/// install the new key everywhere, make it primary everywhere, then remove the
/// old one. Secrets are zeroized when dropped and never printed.
///
/// ```
/// use rumormill_wire::Keyring;
/// let mut ring = Keyring::new(&[1u8; 16])?;
/// let new = ring.install(&[2u8; 32])?;
/// let old = ring.primary();
/// ring.use_key(new)?;
/// ring.remove(old)?;
/// assert_eq!(ring.list().len(), 1);
/// assert!(!format!("{ring:?}").contains("2, 2"));
/// # Ok::<(), rumormill_wire::WireError>(())
/// ```
pub struct Keyring {
    keys: BTreeMap<KeyId, KeyEntry>,
    primary: KeyId,
}

impl Keyring {
    /// A keyring holding one AES-GCM key (16, 24 or 32 bytes), its primary.
    pub fn new(primary: &[u8]) -> Result<Keyring, WireError> {
        let suite = AesGcmSuite::for_key_len(primary.len())?;
        Keyring::with_suite(Arc::new(suite), primary)
    }

    /// A keyring whose primary key belongs to another cipher suite.
    pub fn with_suite(suite: Arc<dyn CipherSuite>, primary: &[u8]) -> Result<Keyring, WireError> {
        let mut ring = Keyring {
            keys: BTreeMap::new(),
            primary: 0,
        };
        ring.primary = ring.install_with(suite, primary)?;
        Ok(ring)
    }

    /// Installs an AES-GCM key; packets sealed with it are accepted from now
    /// on. Installing a key twice is harmless.
    pub fn install(&mut self, key: &[u8]) -> Result<KeyId, WireError> {
        let suite = AesGcmSuite::for_key_len(key.len())?;
        self.install_with(Arc::new(suite), key)
    }

    /// Installs a key of any cipher suite.
    pub fn install_with(&mut self, suite: Arc<dyn CipherSuite>, key: &[u8]) -> Result<KeyId, WireError> {
        if key.len() != suite.key_len() {
            return Err(WireError::KeyLength(key.len()));
        }
        let id = key_id(key);
        self.keys.insert(
            id,
            KeyEntry {
                suite,
                secret: Zeroizing::new(key.to_vec()),
            },
        );
        Ok(id)
    }

    /// Makes an installed key the primary: outgoing packets use it from now on.
    pub fn use_key(&mut self, id: KeyId) -> Result<(), WireError> {
        if !self.keys.contains_key(&id) {
            return Err(WireError::KeyNotInstalled(id));
        }
        self.primary = id;
        Ok(())
    }

    /// Removes a key that is not the primary.
    pub fn remove(&mut self, id: KeyId) -> Result<(), WireError> {
        if id == self.primary {
            return Err(WireError::RemovePrimary(id));
        }
        match self.keys.remove(&id) {
            Some(_) => Ok(()),
            None => Err(WireError::KeyNotInstalled(id)),
        }
    }

    /// The secret of an installed key: for cluster-wide rotation, which
    /// carries shared secrets in the overlay's store, and for the driver to
    /// save the keyring. Never log it.
    pub fn secret(&self, id: KeyId) -> Option<&[u8]> {
        self.keys.get(&id).map(|e| &e.secret[..])
    }

    /// The primary key's id.
    pub fn primary(&self) -> KeyId {
        self.primary
    }

    /// The installed keys, in id order.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|(&id, e)| KeyInfo {
                id,
                suite: e.suite.name(),
                primary: id == self.primary,
            })
            .collect()
    }

    pub(crate) fn get(&self, id: KeyId) -> Option<&KeyEntry> {
        self.keys.get(&id)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &format_args!("{:#010x}", self.primary))
            .field(
                "keys",
                &self.keys.keys().map(|k| format!("{k:#010x}")).collect::<Vec<_>>(),
            )
            .finish()
    }
}
