use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm, Nonce, Tag};

use crate::error::WireError;

/// Length of an AEAD nonce in bytes.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM authentication tag in bytes.
pub const TAG_LEN: usize = 16;

type Aes192Gcm = AesGcm<aes::Aes192, U12>;

/// An AEAD instance keyed with one (sub)key.
///
/// Implement this, and [`CipherSuite`], to plug in another algorithm.
pub trait Cipher: Send + Sync {
    /// Encrypts `buf[aad_len..]` in place, authenticating `buf[..aad_len]`
    /// as associated data, and appends the tag.
    fn seal(&self, nonce: &[u8; NONCE_LEN], buf: &mut Vec<u8>, aad_len: usize) -> Result<(), WireError>;
    /// Checks the tag at the end of `buf`, decrypts `buf[aad_len..]` in
    /// place and removes the tag.
    fn open(&self, nonce: &[u8; NONCE_LEN], buf: &mut Vec<u8>, aad_len: usize) -> Result<(), WireError>;
}

/// A family of ciphers: its id in the header, its key length, and how to make
/// a [`Cipher`] from key bytes.
pub trait CipherSuite: Send + Sync + std::fmt::Debug {
    /// Id carried in the header's low flag bits (1..=15; 0 means plain text).
    fn id(&self) -> u8;
    /// Human-readable name, e.g. `aes-256-gcm`.
    fn name(&self) -> &'static str;
    /// Key length in bytes.
    fn key_len(&self) -> usize;
    /// Builds a cipher keyed with `key` (of [`CipherSuite::key_len`] bytes).
    fn cipher(&self, key: &[u8]) -> Result<Box<dyn Cipher>, WireError>;
}

/// AES-GCM with a 128-, 192- or 256-bit key (RustCrypto `aes-gcm`).
///
/// ```
/// use rumormill_wire::{AesGcmSuite, CipherSuite};
/// let suite = AesGcmSuite::for_key_len(24).unwrap();
/// assert_eq!(suite.name(), "aes-192-gcm");
/// let cipher = suite.cipher(&[1u8; 24]).unwrap();
/// let mut buf = b"aadmessage".to_vec();
/// cipher.seal(&[0; 12], &mut buf, 3).unwrap();
/// cipher.open(&[0; 12], &mut buf, 3).unwrap();
/// assert_eq!(buf, b"aadmessage");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesGcmSuite {
    /// 16-byte keys.
    Aes128,
    /// 24-byte keys.
    Aes192,
    /// 32-byte keys.
    Aes256,
}

impl AesGcmSuite {
    /// The suite for a key of `len` bytes.
    pub fn for_key_len(len: usize) -> Result<AesGcmSuite, WireError> {
        match len {
            16 => Ok(AesGcmSuite::Aes128),
            24 => Ok(AesGcmSuite::Aes192),
            32 => Ok(AesGcmSuite::Aes256),
            other => Err(WireError::KeyLength(other)),
        }
    }
}

impl CipherSuite for AesGcmSuite {
    fn id(&self) -> u8 {
        match self {
            AesGcmSuite::Aes128 => 1,
            AesGcmSuite::Aes192 => 2,
            AesGcmSuite::Aes256 => 3,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AesGcmSuite::Aes128 => "aes-128-gcm",
            AesGcmSuite::Aes192 => "aes-192-gcm",
            AesGcmSuite::Aes256 => "aes-256-gcm",
        }
    }

    fn key_len(&self) -> usize {
        match self {
            AesGcmSuite::Aes128 => 16,
            AesGcmSuite::Aes192 => 24,
            AesGcmSuite::Aes256 => 32,
        }
    }

    fn cipher(&self, key: &[u8]) -> Result<Box<dyn Cipher>, WireError> {
        let bad = |_| WireError::KeyLength(key.len());
        Ok(match self {
            AesGcmSuite::Aes128 => Box::new(Gcm(Aes128Gcm::new_from_slice(key).map_err(bad)?)),
            AesGcmSuite::Aes192 => Box::new(Gcm(Aes192Gcm::new_from_slice(key).map_err(bad)?)),
            AesGcmSuite::Aes256 => Box::new(Gcm(Aes256Gcm::new_from_slice(key).map_err(bad)?)),
        })
    }
}

struct Gcm<C>(C);

impl<C: AeadInPlace<NonceSize = U12> + Send + Sync> Cipher for Gcm<C> {
    fn seal(&self, nonce: &[u8; NONCE_LEN], buf: &mut Vec<u8>, aad_len: usize) -> Result<(), WireError> {
        if buf.len() < aad_len {
            return Err(WireError::Truncated {
                len: buf.len(),
                min: aad_len,
            });
        }
        let (aad, msg) = buf.split_at_mut(aad_len);
        let tag = self
            .0
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, msg)
            .map_err(|_| WireError::Authentication)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    fn open(&self, nonce: &[u8; NONCE_LEN], buf: &mut Vec<u8>, aad_len: usize) -> Result<(), WireError> {
        let min = aad_len + TAG_LEN;
        if buf.len() < min {
            return Err(WireError::Truncated { len: buf.len(), min });
        }
        let tag_at = buf.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&buf[tag_at..]);
        let (aad, msg) = buf[..tag_at].split_at_mut(aad_len);
        self.0
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, msg, &tag)
            .map_err(|_| WireError::Authentication)?;
        buf.truncate(tag_at);
        Ok(())
    }
}
