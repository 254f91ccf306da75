//! The reserved namespace: the members' own data, kept as values of the
//! replicated store under keys that start with [`PREFIX`].
//!
//! Every member's subscriptions, luggage, rack, key report and desired
//! keyring travel as ordinary updates, so they reach every member — one that
//! joins later included — by the same rumor mongering and anti-entropy as
//! application data. This module is their one owner:
//!
//! - [`ReservedKey`] is the one list of kinds, with the one way to build a
//!   key ([`ReservedKey::key`]) and to read one ([`ReservedKey::parse`]);
//! - [`Topics`], [`Rack`], [`KeyReport`] and [`DesiredKeyring`] are their
//!   values, encoded as the protobuf messages of
//!   `proto/rumormill/v1/reserved.proto` and decoded with a typed
//!   [`ValueError`], never a panic. Luggage values are the application's
//!   bytes, stored as given (the luggage limits count those bytes);
//! - [`from_owner`] is the rule that a reserved value is accepted only from
//!   the member its key names. Every member applies it on receipt (a copy
//!   written by anyone else is seen but never stored) and again when it
//!   reads, so a value written locally under another member's name counts
//!   for nothing either.
//!
//! All members hold the overlay key, so the rule keeps honest members from
//! confusing each other, not a key holder from lying.
//!
//! ```
//! use rumormill_core::reserved::{ReservedKey, Topics};
//! let key = ReservedKey::Topics { member: "web-1".into() };
//! assert_eq!(key.key(), "_rumormill/topics/web-1");
//! assert_eq!(ReservedKey::parse("_rumormill/topics/web-1"), Some(key));
//! let value = Topics(vec!["orders".into()]).encode();
//! assert_eq!(Topics::decode(&value).unwrap().0, vec!["orders".to_owned()]);
//! ```

use prost::Message;
use rumormill_wire::KeyId;
use rumormill_wire::proto;
use zeroize::{Zeroize, Zeroizing};

use crate::replication::Update;

/// Keys under this prefix hold the members' own data; applications should
/// leave them alone (the agent refuses them from its clients).
pub const PREFIX: &str = "_rumormill/";

/// A key of the reserved namespace: what it holds and whose it is.
///
/// With an empty last part, [`ReservedKey::key`] gives the prefix that
/// every key of that kind (and, for luggage, of that member) starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReservedKey {
    /// `_rumormill/topics/<member>`: the member's subscriptions ([`Topics`]).
    Topics {
        /// The member.
        member: String,
    },
    /// `_rumormill/luggage/<member>/<key>`: one entry of the member's
    /// luggage (the application's bytes). `/` and `%` in the member's name
    /// are escaped (`%2F`, `%25`) so that its part ends at the first `/`.
    Luggage {
        /// The member.
        member: String,
        /// The luggage key.
        key: String,
    },
    /// `_rumormill/rack/<member>`: the member's rack ([`Rack`]).
    Rack {
        /// The member.
        member: String,
    },
    /// `_rumormill/keys/<member>`: the keys the member holds ([`KeyReport`]).
    KeyReport {
        /// The member.
        member: String,
    },
    /// `_rumormill/keyring/<member>`: the keyring the member asks every
    /// member to hold ([`DesiredKeyring`]).
    DesiredKeyring {
        /// The member.
        member: String,
    },
    /// `_rumormill/gateway/<member>`: what the member, as its rack's
    /// gateway, reports of its rack ([`GatewayReport`]).
    GatewayReport {
        /// The member.
        member: String,
    },
}

const TOPICS: &str = "topics";
const LUGGAGE: &str = "luggage";
const RACK: &str = "rack";
const KEY_REPORT: &str = "keys";
const DESIRED_KEYRING: &str = "keyring";
const GATEWAY_REPORT: &str = "gateway";

impl ReservedKey {
    /// The store key.
    pub fn key(&self) -> String {
        match self {
            ReservedKey::Topics { member } => format!("{PREFIX}{TOPICS}/{member}"),
            ReservedKey::Luggage { member, key } => format!("{PREFIX}{LUGGAGE}/{}/{key}", escape(member)),
            ReservedKey::Rack { member } => format!("{PREFIX}{RACK}/{member}"),
            ReservedKey::KeyReport { member } => format!("{PREFIX}{KEY_REPORT}/{member}"),
            ReservedKey::DesiredKeyring { member } => format!("{PREFIX}{DESIRED_KEYRING}/{member}"),
            ReservedKey::GatewayReport { member } => format!("{PREFIX}{GATEWAY_REPORT}/{member}"),
        }
    }

    /// What a store key holds, if it is a reserved key of a known kind.
    pub fn parse(key: &str) -> Option<ReservedKey> {
        let (kind, rest) = key.strip_prefix(PREFIX)?.split_once('/')?;
        let member = rest.to_owned();
        Some(match kind {
            TOPICS => ReservedKey::Topics { member },
            LUGGAGE => {
                let (member, key) = rest.split_once('/')?;
                // Only the one spelling `escape` gives: otherwise two keys
                // (`a%2Fb`, `a%2fb`) would name the same member's entry.
                let unescaped = unescape(member);
                if escape(&unescaped) != member {
                    return None;
                }
                ReservedKey::Luggage {
                    member: unescaped,
                    key: key.to_owned(),
                }
            }
            RACK => ReservedKey::Rack { member },
            KEY_REPORT => ReservedKey::KeyReport { member },
            DESIRED_KEYRING => ReservedKey::DesiredKeyring { member },
            GATEWAY_REPORT => ReservedKey::GatewayReport { member },
            _ => return None,
        })
    }

    /// The member the value belongs to.
    pub fn member(&self) -> &str {
        match self {
            ReservedKey::Topics { member }
            | ReservedKey::Luggage { member, .. }
            | ReservedKey::Rack { member }
            | ReservedKey::KeyReport { member }
            | ReservedKey::DesiredKeyring { member }
            | ReservedKey::GatewayReport { member } => member,
        }
    }
}

/// The member a reserved key belongs to, `None` for other keys. Keys of a
/// kind this version does not know are read as `_rumormill/<kind>/<member>`,
/// so that the rule holds for kinds added later; a reserved key of no
/// known shape belongs to nobody (`Some("")`).
pub fn owner(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX)?;
    if let Some(k) = ReservedKey::parse(key) {
        return Some(k.member().to_owned());
    }
    Some(match rest.split_once('/') {
        Some((LUGGAGE, _)) | None => String::new(),
        Some((_, member)) => member.to_owned(),
    })
}

/// Whether an update may be taken for what it claims: any update outside
/// the reserved namespace, and a reserved one written by the member its
/// key names.
pub fn from_owner(u: &Update) -> bool {
    owner(&u.key).is_none_or(|owner| owner == *u.origin)
}

/// The reserved key `u` is written under, when it is of a known kind and
/// `u` was written by its owner.
pub fn owned(u: &Update) -> Option<ReservedKey> {
    ReservedKey::parse(&u.key).filter(|k| k.member() == &*u.origin)
}

fn escape(member: &str) -> String {
    member.replace('%', "%25").replace('/', "%2F")
}

fn unescape(member: &str) -> String {
    member.replace("%2F", "/").replace("%25", "%")
}

/// A reserved value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// The bytes are not the message the key calls for.
    #[error("not a {what} message: {source}")]
    Malformed {
        /// The message expected.
        what: &'static str,
        /// What the decoder found.
        source: prost::DecodeError,
    },
    /// A desired keyring that names no key (following it would leave a
    /// member without one).
    #[error("a desired keyring must name at least one key")]
    NoKeys,
    /// A gateway report whose rack name or address is not valid.
    #[error("gateway report: {0}")]
    Report(String),
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, ValueError> {
    M::decode(bytes).map_err(|source| ValueError::Malformed { what, source })
}

/// A member's topics, sorted (`_rumormill/topics/<member>`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topics(pub Vec<String>);

impl Topics {
    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        proto::Topics { topics: self.0.clone() }.encode_to_vec()
    }

    /// From a stored value; topic names that the writer's own API would
    /// refuse are left out.
    pub fn decode(bytes: &[u8]) -> Result<Topics, ValueError> {
        let m: proto::Topics = decode("Topics", bytes)?;
        Ok(Topics(
            m.topics
                .into_iter()
                .filter(|t| crate::events::subscriptions::check_topic(t).is_ok())
                .collect(),
        ))
    }

    /// Whether `topic` is listed.
    pub fn lists(&self, topic: &str) -> bool {
        self.0.iter().any(|t| t == topic)
    }
}

/// A member's rack (`_rumormill/rack/<member>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rack {
    /// The rack's name.
    pub name: String,
    /// The member is a gateway candidate of the rack.
    pub gateway: bool,
}

impl Rack {
    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        proto::Rack {
            name: self.name.clone(),
            gateway: self.gateway,
        }
        .encode_to_vec()
    }

    /// From a stored value.
    pub fn decode(bytes: &[u8]) -> Result<Rack, ValueError> {
        decode::<proto::Rack>("Rack", bytes).map(|m| Rack {
            name: m.name,
            gateway: m.gateway,
        })
    }
}

/// What a rack's active gateway reports of its rack
/// (`_rumormill/gateway/<member>`): written when it is elected, when the
/// rack's membership changes and now and then, so that every member of
/// every rack knows each rack's gateway and members, and how old that news
/// is. The gateway of a rack is the writer of its highest-term active report.
///
/// ```
/// use rumormill_core::reserved::GatewayReport;
/// let r = GatewayReport {
///     rack: "eu-1".into(),
///     term: 3,
///     addr: "10.0.0.1:7946".parse().unwrap(),
///     wall_ms: 1_800_000_000_000,
///     members: Vec::new(),
///     candidates: Vec::new(),
///     active: true,
/// };
/// assert_eq!(GatewayReport::decode(&r.encode()), Ok(r));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayReport {
    /// The rack.
    pub rack: String,
    /// The Raft term in which the writer leads (or led) the rack.
    pub term: u64,
    /// Where the other racks' gateways reach the writer.
    pub addr: std::net::SocketAddr,
    /// The writer's wall clock when it wrote, in Unix milliseconds.
    pub wall_ms: u64,
    /// The rack's members as the writer sees them (itself included).
    pub members: Vec<RackMember>,
    /// The rack's gateway candidates and their Raft roles.
    pub candidates: Vec<RackCandidate>,
    /// False once the writer stepped down.
    pub active: bool,
}

/// One member of a rack in a [`GatewayReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackMember {
    /// The member's name.
    pub name: String,
    /// Its state as the gateway sees it.
    pub state: crate::MemberState,
    /// Its boot epoch.
    pub epoch: u64,
    /// Its incarnation.
    pub incarnation: u32,
}

/// One gateway candidate of a rack in a [`GatewayReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackCandidate {
    /// The candidate's name.
    pub name: String,
    /// Its Raft role as the gateway last knew it.
    pub role: crate::racks::RaftRole,
}

impl GatewayReport {
    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        use crate::MemberState as S;
        use crate::racks::RaftRole as R;
        proto::GatewayReport {
            rack: self.rack.clone(),
            term: self.term,
            addr: Some(self.addr.into()),
            wall_ms: self.wall_ms,
            members: self
                .members
                .iter()
                .map(|m| proto::RackMember {
                    name: m.name.clone(),
                    state: match m.state {
                        S::Alive => 0,
                        S::Suspect => 1,
                        S::Failed => 2,
                        S::Left => 3,
                    },
                    epoch: m.epoch,
                    incarnation: m.incarnation,
                })
                .collect(),
            candidates: self
                .candidates
                .iter()
                .map(|c| proto::RackCandidate {
                    name: c.name.clone(),
                    role: match c.role {
                        R::Unknown => 0,
                        R::Follower => 1,
                        R::Candidate => 2,
                        R::PreCandidate => 3,
                        R::Leader => 4,
                    },
                })
                .collect(),
            active: self.active,
        }
        .encode_to_vec()
    }

    /// From a stored value. Members of an unknown state are left out, and
    /// roles this version does not know read as unknown.
    pub fn decode(bytes: &[u8]) -> Result<GatewayReport, ValueError> {
        use crate::MemberState as S;
        use crate::racks::RaftRole as R;
        let m: proto::GatewayReport = decode("GatewayReport", bytes)?;
        crate::racks::check_rack_name(&m.rack).map_err(|e| ValueError::Report(e.to_string()))?;
        let addr = rumormill_wire::socket_addr(m.addr.as_ref()).map_err(|e| ValueError::Report(e.to_string()))?;
        Ok(GatewayReport {
            rack: m.rack,
            term: m.term,
            addr,
            wall_ms: m.wall_ms,
            members: m
                .members
                .into_iter()
                .filter_map(|r| {
                    let state = match r.state {
                        0 => S::Alive,
                        1 => S::Suspect,
                        2 => S::Failed,
                        3 => S::Left,
                        _ => return None,
                    };
                    Some(RackMember {
                        name: r.name,
                        state,
                        epoch: r.epoch,
                        incarnation: r.incarnation,
                    })
                })
                .collect(),
            candidates: m
                .candidates
                .into_iter()
                .map(|c| RackCandidate {
                    name: c.name,
                    role: match c.role {
                        1 => R::Follower,
                        2 => R::Candidate,
                        3 => R::PreCandidate,
                        4 => R::Leader,
                        _ => R::Unknown,
                    },
                })
                .collect(),
            active: m.active,
        })
    }
}

/// Which keys a member holds, by id, and which one it seals with
/// (`_rumormill/keys/<member>`). Never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    /// The key outgoing packets are sealed with.
    pub primary: KeyId,
    /// Every installed key, the primary included, in id order.
    pub installed: Vec<KeyId>,
}

impl KeyReport {
    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        proto::KeyReport {
            primary: self.primary,
            installed: self.installed.clone(),
        }
        .encode_to_vec()
    }

    /// From a stored value.
    pub fn decode(bytes: &[u8]) -> Result<KeyReport, ValueError> {
        let m: proto::KeyReport = decode("KeyReport", bytes)?;
        Ok(KeyReport {
            primary: m.primary,
            installed: m.installed,
        })
    }
}

/// A key's secret; wiped from memory when dropped.
pub type Secret = Zeroizing<Vec<u8>>;

/// The keyring a member asks every member to hold
/// (`_rumormill/keyring/<member>`). Its secrets are wiped when it is
/// dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct DesiredKeyring {
    /// Wall-clock milliseconds of the writer, at least one above the
    /// highest version it had seen: the highest `(version, writer)` wins.
    pub version: u64,
    /// The key ids, primary first.
    pub ids: Vec<KeyId>,
    /// The secrets of the keys installed cluster-wide (keys installed on
    /// each member alone are named in `ids` only).
    pub shared: Vec<Secret>,
}

impl std::fmt::Debug for DesiredKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredKeyring")
            .field("version", &self.version)
            .field("ids", &self.ids)
            .field("shared", &format_args!("[{} redacted]", self.shared.len()))
            .finish()
    }
}

impl DesiredKeyring {
    /// The stored value, wiped when dropped (it carries the secrets). The
    /// store keeps its own copy (it has to send it); the one made here on
    /// the way is wiped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let m = WipedKeyring(proto::DesiredKeyring {
            version: self.version,
            ids: self.ids.clone(),
            shared: self.shared.iter().map(|s| s.to_vec()).collect(),
        });
        Zeroizing::new(m.0.encode_to_vec())
    }

    /// From a stored value; one naming no key is refused. An id named
    /// twice counts once, where it first appears.
    pub fn decode(bytes: &[u8]) -> Result<DesiredKeyring, ValueError> {
        // Decoded in place, so the secrets read before a decode error are
        // wiped too.
        let mut m = WipedKeyring(proto::DesiredKeyring::default());
        m.0.merge(bytes).map_err(|source| ValueError::Malformed {
            what: "DesiredKeyring",
            source,
        })?;
        // Moved, not copied, so no unwiped copy of a secret stays behind.
        let shared =
            m.0.shared
                .iter_mut()
                .map(|s| Zeroizing::new(std::mem::take(s)))
                .collect();
        if m.0.ids.is_empty() {
            return Err(ValueError::NoKeys);
        }
        let mut ids: Vec<KeyId> = Vec::with_capacity(m.0.ids.len());
        for id in std::mem::take(&mut m.0.ids) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(DesiredKeyring {
            version: m.0.version,
            ids,
            shared,
        })
    }
}

/// A desired keyring's message, its secrets wiped when it is dropped.
struct WipedKeyring(proto::DesiredKeyring);

impl Drop for WipedKeyring {
    fn drop(&mut self) {
        self.0.shared.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_any_bytes_decode_or_are_refused_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let valid = [
            Topics(vec!["a".into(), "b".into()]).encode(),
            Rack {
                name: "eu-1".into(),
                gateway: true,
            }
            .encode(),
            DesiredKeyring {
                version: 7,
                ids: vec![1, 2],
                shared: vec![Secret::new(vec![3; 16])],
            }
            .encode()
            .to_vec(),
        ];
        let mut refused = 0;
        for i in 0..20_000 {
            // Random bytes, and valid values with a few bytes flipped or cut.
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..64);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut v = valid[i % valid.len()].clone();
                let at = rng.random_range(0..v.len());
                v[at] = rng.random();
                v.truncate(rng.random_range(0..=v.len()));
                v
            };
            refused += [
                Topics::decode(&bytes).is_err(),
                Rack::decode(&bytes).is_err(),
                GatewayReport::decode(&bytes).is_err(),
                KeyReport::decode(&bytes).is_err(),
                DesiredKeyring::decode(&bytes).is_err(),
            ]
            .iter()
            .filter(|&&e| e)
            .count();
        }
        assert!(refused > 0, "garbage is refused, with an error");
    }

    #[test]
    fn keys_round_trip_and_names_are_escaped_where_they_must_be() {
        let all = [
            ReservedKey::Topics { member: "a/b".into() },
            ReservedKey::Luggage {
                member: "a/b%c".into(),
                key: "k/1".into(),
            },
            ReservedKey::Rack { member: "r".into() },
            ReservedKey::KeyReport { member: "m".into() },
            ReservedKey::DesiredKeyring { member: "m".into() },
            ReservedKey::GatewayReport { member: "g".into() },
        ];
        for k in all {
            assert_eq!(ReservedKey::parse(&k.key()).as_ref(), Some(&k), "{}", k.key());
            assert_eq!(owner(&k.key()).as_deref(), Some(k.member()));
        }
        assert_eq!(
            ReservedKey::Luggage {
                member: "a/b".into(),
                key: String::new()
            }
            .key(),
            "_rumormill/luggage/a%2Fb/"
        );
        assert_eq!(owner("_rumormill/future/x").as_deref(), Some("x"));
        assert_eq!(owner("_rumormill/luggage").as_deref(), Some(""));
        assert_eq!(owner("user/key"), None);
        assert_eq!(ReservedKey::parse("_rumormill/future/x"), None);
    }

    #[test]
    fn luggage_keys_are_read_only_as_escape_spells_them() {
        // Spellings `escape` never gives would count as owned but never
        // appear among the member's entries.
        for odd in ["x%2f", "%41", "a%2Fb%2f", "50%", "a%2"] {
            let key = format!("_rumormill/luggage/{odd}/k");
            assert_eq!(ReservedKey::parse(&key), None, "{key}");
            assert_eq!(owner(&key).as_deref(), Some(""), "{key}");
        }
        let key = "_rumormill/luggage/a%2Fb%25c/k";
        assert_eq!(
            ReservedKey::parse(key),
            Some(ReservedKey::Luggage {
                member: "a/b%c".into(),
                key: "k".into()
            })
        );
    }

    #[test]
    fn an_id_named_twice_in_a_desired_keyring_counts_once() {
        let d = DesiredKeyring {
            version: 3,
            ids: vec![4, 1, 4, 2, 1],
            shared: Vec::new(),
        };
        assert_eq!(DesiredKeyring::decode(&d.encode()).map(|d| d.ids), Ok(vec![4, 1, 2]));
    }

    #[test]
    fn values_round_trip_and_garbage_is_a_typed_error() {
        let t = Topics(vec!["a".into(), "orders.eu".into()]);
        assert_eq!(Topics::decode(&t.encode()), Ok(t.clone()));
        assert!(t.lists("orders.eu") && !t.lists("orders"));
        let bad = Topics(vec!["ok".into(), "a\nb".into(), String::new()]).encode();
        assert_eq!(Topics::decode(&bad), Ok(Topics(vec!["ok".into()])));
        let rack = Rack {
            name: "eu-1".into(),
            gateway: true,
        };
        assert_eq!(Rack::decode(&rack.encode()), Ok(rack));
        let r = KeyReport {
            primary: 7,
            installed: vec![7, 9],
        };
        assert_eq!(KeyReport::decode(&r.encode()), Ok(r));
        let d = DesiredKeyring {
            version: 3,
            ids: vec![1, 2],
            shared: vec![Zeroizing::new(vec![5; 16])],
        };
        assert_eq!(DesiredKeyring::decode(&d.encode()), Ok(d.clone()));
        assert!(!format!("{d:?}").contains("5, 5"));
        let none = DesiredKeyring { ids: Vec::new(), ..d };
        assert_eq!(DesiredKeyring::decode(&none.encode()), Err(ValueError::NoKeys));
        for garbage in [&b"\xff\xff\xff"[..], b"{\"version\": 1}", b"\x0a\x05ab"] {
            assert!(matches!(
                DesiredKeyring::decode(garbage),
                Err(ValueError::Malformed { .. })
            ));
            assert!(KeyReport::decode(garbage).is_err());
        }
    }
}
