//! Luggage: per-member key/value data, set and deleted by the member
//! itself and held by every member.
//!
//! Each entry is a value of the replicated store under
//! `_rumormill/luggage/<member>/<key>`, so it is versioned per key, spreads
//! by rumor mongering as it changes and reaches a member that joins later
//! in full through anti-entropy (digests, then only the missing entries,
//! chunked over streams). Entries not written by the member they name are
//! ignored. Values up to [`Config::max_luggage_value`] (64 KiB) and
//! [`Config::max_luggage_total`] (1 MiB) per member by default, checked by
//! the writer and again on receipt by every member (with keys of 1 to
//! [`MAX_KEY`] bytes, no control characters): a member that skips the
//! checks cannot make the others store more.
//!
//! ```
//! use rumormill_core::{Config, Identity, Overlay, Security, WallTime};
//! let now = std::time::Instant::now();
//! let wall = WallTime::from(std::time::SystemTime::now());
//! let id = Identity::new("web-1", "127.0.0.1:7950".parse().unwrap(), 1);
//! let mut o = Overlay::new(Config::new_lan(), id, Security::Plaintext, 1, now);
//! o.set_luggage(now, wall, "version", b"1.4.2".to_vec()).unwrap();
//! assert_eq!(o.luggage("web-1"), vec![("version".to_string(), b"1.4.2".to_vec())]);
//! ```
//!
//! [`Config::max_luggage_value`]: crate::Config::max_luggage_value
//! [`Config::max_luggage_total`]: crate::Config::max_luggage_total

use crate::config::Config;
use crate::overlay::CoreError;
use crate::replication::{Store, Update};
use crate::reserved::{self, ReservedKey};

/// Default largest value (64 KiB).
pub const DEFAULT_MAX_VALUE: usize = 64 << 10;
/// Default largest total per member (1 MiB).
pub const DEFAULT_MAX_TOTAL: usize = 1 << 20;
/// Longest luggage key, in bytes.
pub const MAX_KEY: usize = 256;

/// The store key of `member`'s luggage entry `key`.
pub(crate) fn store_key(member: &str, key: &str) -> String {
    ReservedKey::Luggage {
        member: member.to_owned(),
        key: key.to_owned(),
    }
    .key()
}

/// For an update event: whose luggage changed and which key, when the
/// update is luggage written by its owner.
pub fn changed(u: &Update) -> Option<(String, String)> {
    match reserved::owned(u)? {
        ReservedKey::Luggage { member, key } => Some((member, key)),
        _ => None,
    }
}

/// Whether a luggage key is acceptable: 1 to [`MAX_KEY`] bytes, no
/// control characters (checked by the writer and on receipt).
pub(crate) fn key_ok(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY && !key.chars().any(char::is_control)
}

fn check_key(key: &str) -> Result<(), CoreError> {
    if !key_ok(key) {
        return Err(CoreError::Invalid(format!(
            "luggage key {key:?}: 1 to {MAX_KEY} bytes, no control characters"
        )));
    }
    Ok(())
}

/// Checks a write of the local member's luggage entry `key` against the
/// limits (the key, the value, the member's total); returns its store key.
pub(crate) fn check_write(
    store: &Store,
    config: &Config,
    me: &str,
    key: &str,
    value: &[u8],
) -> Result<String, CoreError> {
    check_key(key)?;
    let max = config.max_luggage_value;
    if value.len() > max {
        return Err(CoreError::Invalid(format!(
            "luggage value of {} bytes: at most {max}",
            value.len()
        )));
    }
    let others: usize = entries(store, me)
        .iter()
        .filter(|(k, _)| k != key)
        .map(|(_, v)| v.len())
        .sum();
    let total = config.max_luggage_total;
    if others + value.len() > total {
        return Err(CoreError::Invalid(format!(
            "luggage would total {} bytes: at most {total} per member",
            others + value.len()
        )));
    }
    Ok(store_key(me, key))
}

/// A member's luggage in `store`, by key.
pub(crate) fn entries(store: &Store, member: &str) -> Vec<(String, Vec<u8>)> {
    let p = store_key(member, "");
    store
        .prefixed(&p)
        .filter(|u| reserved::from_owner(u))
        .filter_map(|u| Some((u.key[p.len()..].to_owned(), u.value.clone()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{Config, Identity, Overlay, Security, WallTime};

    fn overlay(name: &str) -> (Overlay, Instant) {
        let now = Instant::now();
        let id = Identity::new(name, "127.0.0.1:1".parse().unwrap(), 1);
        (Overlay::new(Config::new_lan(), id, Security::Plaintext, 1, now), now)
    }

    #[test]
    fn limits_are_enforced_and_keys_parse_back() {
        let (mut o, now) = overlay("a/b%c");
        o.set_luggage(now, WallTime::default(), "k", vec![1; DEFAULT_MAX_VALUE])
            .unwrap();
        assert!(
            o.set_luggage(now, WallTime::default(), "big", vec![1; DEFAULT_MAX_VALUE + 1])
                .is_err()
        );
        for i in 1..16 {
            o.set_luggage(now, WallTime::default(), &format!("k{i}"), vec![1; DEFAULT_MAX_VALUE])
                .unwrap();
        }
        let err = o
            .set_luggage(now, WallTime::default(), "one-more", vec![1; 1])
            .unwrap_err();
        assert!(err.to_string().contains("at most 1048576 per member"), "{err}");
        // Replacing an entry counts its new size only.
        o.set_luggage(now, WallTime::default(), "k", vec![2; 10]).unwrap();
        assert!(o.set_luggage(now, WallTime::default(), "", vec![]).is_err());
        let all = o.luggage("a/b%c");
        assert_eq!(all.len(), 16);
        let u = o.store().get(&store_key("a/b%c", "k")).unwrap().clone();
        assert_eq!(changed(&u), Some(("a/b%c".to_owned(), "k".to_owned())));
        assert!(o.delete_luggage(now, WallTime::default(), "k").unwrap());
        assert!(!o.delete_luggage(now, WallTime::default(), "k").unwrap());
        assert_eq!(o.luggage("a/b%c").len(), 15);
    }
}
