//! The agent's configuration: a TOML file, overridden by flags, with
//! defaults that work out of the box.
//!
//! ```
//! let config = rumormill::config::AgentConfig::from_toml(r#"
//!     data_dir = "/tmp/rm"
//!     [[overlay]]
//!     name = "web"
//!     bind = "127.0.0.1:7950"
//!     plaintext = true
//! "#).unwrap();
//! assert_eq!(config.overlays[0].name, "web");
//! assert_eq!(config.api.bind.port(), 7980);
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use rumormill_core::Config;
use rumormill_core::replication::{Direction, Mode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

/// Creates the data directory private (0700), or checks that an existing
/// one is.
pub use crate::persist::create_private_dir;

/// Gossip port of the default overlay (Serf uses 7946 and 7373; we stay clear).
pub const DEFAULT_GOSSIP_PORT: u16 = 7950;
/// Port of the HTTP control API.
pub const DEFAULT_API_PORT: u16 = 7980;
/// Gateway candidates of a rack when `gateway = true` does not say.
pub const DEFAULT_CANDIDATES: usize = 3;
/// Key length `rumormill keygen` produces (AES-256-GCM).
pub const KEY_LEN: usize = 32;

/// A configuration error, with the setting it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown or mistyped settings.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("overlay {overlay:?}: {message}")]
    Invalid {
        /// The overlay the setting belongs to.
        overlay: String,
        /// What is wrong.
        message: String,
    },
    /// A setting of the `[api]` table is invalid.
    #[error("[api] {0}")]
    Api(String),
    /// The rack settings (`rack`, `gateway`, `candidates`,
    /// `remote_seeds`) are invalid or inconsistent.
    #[error("overlay {overlay:?}: {message}")]
    Rack {
        /// The overlay the settings belong to.
        overlay: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole agent configuration (the TOML file's top level).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the agent keeps its database, admin token and address file.
    /// Default: `$RUMORMILL_DATA_DIR`, else `~/.local/share/rumormill`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The HTTP control API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Overlays started at every start (`[[overlay]]` tables). With none,
    /// and none kept from earlier runs, the agent starts one named `default`.
    #[serde(default, rename = "overlay")]
    pub overlays: Vec<OverlaySpec>,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            data_dir: default_data_dir(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            overlays: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// Parses and validates a configuration.
    pub fn from_toml(text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(one_line(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        AgentConfig::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            ConfigError::Invalid { overlay, message } => ConfigError::Invalid {
                overlay,
                message: format!("{message} (in {})", path.display()),
            },
            ConfigError::Api(m) => ConfigError::Api(format!("{m} (in {})", path.display())),
            ConfigError::Rack { overlay, message } => ConfigError::Rack {
                overlay,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Checks every overlay and that names and ports are unique.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.api.validate()?;
        let mut names = std::collections::BTreeSet::new();
        for o in &self.overlays {
            o.validate()?;
            if !names.insert(o.name.as_str()) {
                return Err(invalid(&o.name, "declared twice"));
            }
        }
        Ok(())
    }
}

/// toml's messages span several lines with a source excerpt; keep them on one.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn invalid(overlay: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        overlay: overlay.to_owned(),
        message: message.into(),
    }
}

/// The default data directory.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUMORMILL_DATA_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/rumormill"),
        None => PathBuf::from(".rumormill"),
    }
}

/// The HTTP control API (`[api]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on. Default `127.0.0.1:7980`: only local clients.
    #[serde(default = "default_api_bind")]
    pub bind: SocketAddr,
    /// Host names (`Host` header) the API answers to besides the loopback
    /// forms (`localhost`, `127.0.0.1`…, `[::1]`) and the bind address:
    /// `name` (any port) or `name:port`. Requests naming any other host
    /// are refused, so that a web page reaching the API through a DNS name
    /// that points to this host (DNS rebinding) cannot use it.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Web origins (`scheme://host[:port]`) whose pages may call the API
    /// besides its own (a page served under the very host and port the
    /// request names), e.g. the public origin of a proxy that rewrites
    /// `Host`. Requests with any other `Origin` header are refused. (The
    /// API sends no CORS headers: other origins cannot read its answers.)
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            bind: default_api_bind(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl ApiConfig {
    /// Checks the host names and origins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for h in &self.allowed_hosts {
            parse_authority(h).map_err(|m| ConfigError::Api(format!("allowed_hosts: {h:?}: {m}")))?;
        }
        for o in &self.allowed_origins {
            parse_origin(o).map_err(|m| ConfigError::Api(format!("allowed_origins: {o:?}: {m}")))?;
        }
        Ok(())
    }
}

/// A host name or address and an optional port, as in a `Host` header:
/// `name`, `name:port`, `1.2.3.4:port`, `[::1]:port`. The name is
/// lower-cased; an IPv6 address is given without its brackets.
pub fn parse_authority(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("an IPv6 address needs its closing `]`")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?),
        };
        (addr.to_owned(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (s.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err("no host name".into());
    }
    if !s.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("a host name has only letters, digits, `-`, `_` and `.`".into());
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("{p:?} is not a port number"))?),
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// A web origin, `http://host[:port]` or `https://host[:port]`: its
/// scheme, host and port (the scheme's default when not given).
pub fn parse_origin(s: &str) -> Result<(String, String, u16), String> {
    let (scheme, rest) = s.split_once("://").ok_or("an origin is scheme://host[:port]")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("scheme {scheme:?}: expected http or https")),
    };
    let (host, port) = parse_authority(rest)?;
    Ok((scheme, host, port.unwrap_or(default_port)))
}

fn default_api_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT))
}

/// Logging (`[log]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `rumormill=debug`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::Human,
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Timing presets of the core ([`Config::new_lan`] and friends).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A data center network.
    #[default]
    Lan,
    /// Between data centers.
    Wan,
    /// One host (loopback).
    Local,
}

/// One overlay (`[[overlay]]`): also the body of `POST /v1/overlays`.
/// Its `Debug` output masks the keys.
#[derive(Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// Name, unique in the agent (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// UDP and TCP address to listen on. Default `0.0.0.0:7950`.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// Address announced to others, when it differs from `bind` (NAT, or
    /// `bind` is a wildcard). Default: `bind`, with a wildcard replaced by
    /// the address of the interface that routes to the first seed, else
    /// 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Member name, unique in the overlay. Default: the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Rack of this member (a data centre, a zone): members talk to the
    /// members of their own rack only, and across racks through the rack's
    /// active gateway. 1 to 63 of `a-z`, `0-9`, `.`, `_`, `-`, starting
    /// with a letter or a digit. Default: none (one flat overlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// This member is one of its rack's gateway candidates, which elect the
    /// rack's active gateway by Raft. Needs `rack`. Default `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
    /// How many gateway candidates the rack has, the same on each of them:
    /// the election starts once that many are known. An odd number is
    /// best (a group of 2k tolerates as many failures as one of 2k−1).
    /// Default 3 when `gateway = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
    /// Gossip addresses (`ip:port` or `host:port`) of gateway candidates of
    /// other racks, contacted while this member is its rack's active
    /// gateway and knows no other rack's gateway yet. Needs `gateway`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_seeds: Vec<String>,
    /// Members to join at start and to re-contact while none is seen:
    /// `ip:port` or `host:port` (re-resolved every `dns_refresh`).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// How often DNS seeds are resolved again. Default `30s`.
    #[serde(default = "default_dns_refresh", with = "duration")]
    #[schema(value_type = String, example = "30s")]
    pub dns_refresh: Duration,
    /// Timing preset: `lan` (default), `wan` or `local`.
    #[serde(default)]
    pub profile: Profile,
    /// Overrides of the preset's timings.
    #[serde(default)]
    pub timings: Timings,
    /// Base64 keys (16, 24 or 32 bytes; `rumormill keygen`), the first one
    /// primary. Used when the overlay is first created; afterwards its keyring
    /// lives in the data directory and changes through the `keys` commands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Send and accept unencrypted, unauthenticated packets. Without keys
    /// an overlay refuses to start unless this is set.
    #[serde(default)]
    pub plaintext: bool,
    /// Let a plaintext overlay bind an address other than loopback, where
    /// anyone on the network can read and inject its packets. Without it
    /// such an overlay refuses to start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext_network: bool,
    /// LAN multicast discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<MulticastSpec>,
    /// Size limits of events, luggage, the store per writer and the inbox.
    #[serde(default)]
    pub limits: Limits,
}

/// Size limits (`[overlay.limits]`), in bytes; unset values keep the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest event payload (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_payload: Option<usize>,
    /// Largest luggage value (default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luggage_value: Option<usize>,
    /// Largest luggage total per member (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luggage_total: Option<usize>,
    /// Most bytes (keys + values) one writer's entries may take in the
    /// overlay's store, on every member (default 16 MiB). Must be the same
    /// on every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_bytes: Option<u64>,
    /// Most entries (deletes included, until they expire) one writer may
    /// hold in the overlay's store (default 16,384). Must be the same on
    /// every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_entries: Option<u64>,
    /// Most bytes (keys + values) of the overlay's whole store, all
    /// writers together, on every member (default 256 MiB). Writer names
    /// are not authenticated beyond the key: this is what bounds a key
    /// holder writing under many names. Must be the same on every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_bytes: Option<u64>,
    /// Most entries (deletes included, until they expire) of the overlay's
    /// whole store, all writers together (default 262,144). Must be the
    /// same on every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_entries: Option<u64>,
    /// Most bytes of payloads the agent's inbox keeps for this overlay
    /// (default 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox_bytes: Option<u64>,
}

/// Default byte cap of an overlay's inbox: 256 MiB.
pub const DEFAULT_INBOX_BYTES: u64 = 256 << 20;

impl Limits {
    /// The inbox's byte cap.
    pub fn inbox_bytes(&self) -> u64 {
        self.inbox_bytes.unwrap_or(DEFAULT_INBOX_BYTES)
    }
}

impl std::fmt::Debug for OverlaySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlaySpec")
            .field("name", &self.name)
            .field("bind", &self.bind)
            .field("advertise", &self.advertise)
            .field("member", &self.member)
            .field("rack", &self.rack)
            .field("gateway", &self.gateway)
            .field("candidates", &self.candidates)
            .field("remote_seeds", &self.remote_seeds)
            .field("seeds", &self.seeds)
            .field("dns_refresh", &self.dns_refresh)
            .field("profile", &self.profile)
            .field("timings", &self.timings)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("plaintext", &self.plaintext)
            .field("allow_plaintext_network", &self.allow_plaintext_network)
            .field("multicast", &self.multicast)
            .field("limits", &self.limits)
            .finish()
    }
}

fn default_bind() -> String {
    format!("0.0.0.0:{DEFAULT_GOSSIP_PORT}")
}

fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}

/// Multicast discovery (`[overlay.multicast]`): members announce their
/// gossip address to a group and join what they hear.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MulticastSpec {
    /// Group address and port. Default `239.255.79.50:7951`.
    #[serde(default = "default_group")]
    #[schema(value_type = String, example = "239.255.79.50:7951")]
    pub group: SocketAddr,
    /// Interface address to send and listen on. Default `0.0.0.0` (the
    /// system's choice).
    #[serde(default = "default_interface")]
    #[schema(value_type = String, example = "0.0.0.0")]
    pub interface: std::net::Ipv4Addr,
    /// Multicast TTL: 0 keeps announcements on this host, 1 on the LAN.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Time between announcements. Default `5s`.
    #[serde(default = "default_announce", with = "duration")]
    #[schema(value_type = String, example = "5s")]
    pub interval: Duration,
}

impl Default for MulticastSpec {
    fn default() -> MulticastSpec {
        MulticastSpec {
            group: default_group(),
            interface: default_interface(),
            ttl: default_ttl(),
            interval: default_announce(),
        }
    }
}

fn default_group() -> SocketAddr {
    SocketAddr::from(([239, 255, 79, 50], 7951))
}
fn default_interface() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::UNSPECIFIED
}
fn default_ttl() -> u32 {
    1
}
fn default_announce() -> Duration {
    Duration::from_secs(5)
}

/// Overrides of the preset's timings; unset values keep the preset's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Time between failure-detector probes.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1s")]
    pub probe_interval: Option<Duration>,
    /// Time to wait for a direct ack.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "500ms")]
    pub probe_timeout: Option<Duration>,
    /// Suspicion timeout multiplier (× probe interval × log10 n).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspicion_mult: Option<u32>,
    /// Time between gossip (piggyback) rounds.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "200ms")]
    pub gossip_interval: Option<Duration>,
    /// Time between full-state exchanges (scaled up with cluster size).
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "30s")]
    pub push_pull_interval: Option<Duration>,
    /// Largest datagram.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<usize>,
    /// Replication: `rumor`, `anti-entropy` or `both`.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "both")]
    pub mode: Option<Mode>,
    /// Time between rumor rounds (Grapevine's `delta`).
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "200ms")]
    pub rumor_interval: Option<Duration>,
    /// Members pushed to per rumor round (Grapevine's `level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<usize>,
    /// Unnecessary contacts before a rumor is dropped (Grapevine's `rounds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u32>,
    /// Time between anti-entropy exchanges.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10s")]
    pub anti_entropy_interval: Option<Duration>,
    /// Anti-entropy direction: `push`, `pull` or `push-pull`.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "push-pull")]
    pub anti_entropy_direction: Option<Direction>,
}

impl OverlaySpec {
    /// A spec with defaults for everything but the name.
    pub fn named(name: &str) -> OverlaySpec {
        OverlaySpec {
            name: name.to_owned(),
            bind: default_bind(),
            advertise: None,
            member: None,
            rack: None,
            gateway: false,
            candidates: None,
            remote_seeds: Vec::new(),
            seeds: Vec::new(),
            dns_refresh: default_dns_refresh(),
            profile: Profile::Lan,
            timings: Timings::default(),
            keys: Vec::new(),
            plaintext: false,
            allow_plaintext_network: false,
            multicast: None,
            limits: Limits::default(),
        }
    }

    /// Checks names, addresses, keys and timings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name).map_err(|m| invalid(&self.name, m))?;
        self.bind_addr()?;
        self.advertise_addr()?;
        if let Some(m) = &self.member {
            if m.is_empty() || m.len() > 128 {
                return Err(invalid(&self.name, "member name must have 1 to 128 characters"));
            }
        }
        for s in &self.seeds {
            parse_seed(s).map_err(|m| invalid(&self.name, m))?;
        }
        self.check_rack()?;
        for k in &self.keys {
            decode_key(k).map_err(|m| invalid(&self.name, m))?;
        }
        if self.keys.is_empty() && !self.plaintext {
            return Err(invalid(
                &self.name,
                "no key: give one (`rumormill keygen` makes one) or set plaintext = true",
            ));
        }
        if !self.keys.is_empty() && self.plaintext {
            return Err(invalid(&self.name, "plaintext = true and keys are exclusive"));
        }
        if let Some(m) = &self.multicast {
            if !(m.group.is_ipv4() && m.group.ip().is_multicast()) {
                return Err(invalid(
                    &self.name,
                    format!("multicast group {} is not an IPv4 multicast address", m.group),
                ));
            }
            if m.interval.is_zero() {
                return Err(invalid(&self.name, "multicast interval must be above zero"));
            }
        }
        if self.dns_refresh.is_zero() {
            return Err(invalid(&self.name, "dns_refresh must be above zero"));
        }
        self.core_config()?;
        Ok(())
    }

    /// Checks the rack settings: a valid rack name, `gateway` only with a
    /// rack, at least one candidate, `remote_seeds` only on a candidate.
    pub fn check_rack(&self) -> Result<(), ConfigError> {
        let refuse = |message: String| {
            Err(ConfigError::Rack {
                overlay: self.name.clone(),
                message,
            })
        };
        if let Some(rack) = &self.rack
            && let Err(e) = rumormill_core::racks::check_rack_name(rack)
        {
            return refuse(format!("rack: {e}"));
        }
        if self.gateway && self.rack.is_none() {
            return refuse("gateway = true needs a rack: a gateway speaks for its rack (set rack = \"…\")".into());
        }
        if self.candidates == Some(0) {
            return refuse("candidates = 0: a rack with gateways has at least 1 candidate (3 or 5 recommended)".into());
        }
        if self.candidates.is_some() && !self.gateway {
            return refuse(
                "candidates is set but gateway is not: only a gateway candidate counts its rack's candidates".into(),
            );
        }
        if !self.remote_seeds.is_empty() && !self.gateway {
            return refuse("remote_seeds needs gateway = true: only a rack's gateway contacts other racks".into());
        }
        for s in &self.remote_seeds {
            parse_seed(s).map_err(|m| ConfigError::Rack {
                overlay: self.name.clone(),
                message: format!("remote_seeds: {m}"),
            })?;
        }
        Ok(())
    }

    /// How many candidates the rack has, for a candidate.
    pub fn candidates(&self) -> usize {
        self.candidates.unwrap_or(DEFAULT_CANDIDATES)
    }

    /// Where the member stands among racks, with `remote_seeds` resolved
    /// to `remote`; `None` without a rack.
    pub fn rack_spec(&self, remote: Vec<SocketAddr>) -> Result<Option<rumormill_core::racks::RackSpec>, ConfigError> {
        self.check_rack()?;
        let Some(name) = &self.rack else {
            return Ok(None);
        };
        let mut spec = rumormill_core::racks::RackSpec::new(name).map_err(|e| ConfigError::Rack {
            overlay: self.name.clone(),
            message: format!("rack: {e}"),
        })?;
        if self.gateway {
            spec = spec.candidate(self.candidates()).with_remote_seeds(remote);
        }
        Ok(Some(spec))
    }

    /// A warning for a candidate of a rack with an even number of
    /// candidates (allowed, but one fewer would do as well).
    pub fn candidates_warning(&self) -> Option<String> {
        let n = self.candidates();
        (self.gateway && n % 2 == 0).then(|| {
            format!(
                "candidates = {n} is even: a Raft majority of {n} is {}, so {n} candidates tolerate {} failure(s), no more than {} would; an odd number gets the most out of each candidate",
                n / 2 + 1,
                (n - 1) / 2,
                n - 1
            )
        })
    }

    /// Refuses a plaintext overlay bound to an address other than loopback
    /// unless `allow_plaintext_network` is set (checked when it starts).
    pub fn check_plaintext_bind(&self) -> Result<(), ConfigError> {
        let bind = self.bind_addr()?;
        if self.plaintext && !self.allow_plaintext_network && !bind.ip().is_loopback() {
            return Err(invalid(
                &self.name,
                format!(
                    "plaintext on {bind}, which is not a loopback address: anyone on the network could read and inject its packets; give a key, bind to 127.0.0.1, or set allow_plaintext_network = true"
                ),
            ));
        }
        Ok(())
    }

    /// The address to announce, when set.
    pub fn advertise_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.advertise
            .as_ref()
            .map(|a| {
                a.parse()
                    .map_err(|_| invalid(&self.name, format!("advertise {a:?} is not an ip:port address")))
            })
            .transpose()
    }

    /// The address to bind.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind
            .parse()
            .map_err(|_| invalid(&self.name, format!("bind {:?} is not an ip:port address", self.bind)))
    }

    /// The core configuration: the preset with the overrides applied.
    pub fn core_config(&self) -> Result<Config, ConfigError> {
        let mut c = match self.profile {
            Profile::Lan => Config::new_lan(),
            Profile::Wan => Config::new_wan(),
            Profile::Local => Config::new_local(),
        };
        let t = &self.timings;
        macro_rules! set {
            ($($field:ident => $($target:ident).+),* $(,)?) => {
                $(if let Some(v) = t.$field { c.$($target).+ = v; })*
            };
        }
        set!(
            probe_interval => probe_interval,
            probe_timeout => probe_timeout,
            suspicion_mult => suspicion_mult,
            gossip_interval => gossip_interval,
            push_pull_interval => push_pull_interval,
            mtu => mtu,
            mode => replication.mode,
            rumor_interval => replication.interval,
            fanout => replication.fanout,
            rounds => replication.rounds,
            anti_entropy_interval => replication.anti_entropy_interval,
            anti_entropy_direction => replication.anti_entropy_direction,
        );
        let l = &self.limits;
        if let Some(v) = l.event_payload {
            c.max_event_payload = v;
        }
        if let Some(v) = l.luggage_value {
            c.max_luggage_value = v;
        }
        if let Some(v) = l.luggage_total {
            c.max_luggage_total = v;
        }
        if let Some(v) = l.writer_bytes {
            c.replication.limits.writer_bytes = v;
        }
        if let Some(v) = l.writer_entries {
            c.replication.limits.writer_entries = v;
        }
        if let Some(v) = l.store_bytes {
            c.replication.limits.store_bytes = v;
        }
        if let Some(v) = l.store_entries {
            c.replication.limits.store_entries = v;
        }
        // Whatever goes over a stream must fit a frame, with room for the envelope.
        let frame = c.max_stream_frame.saturating_sub(64 << 10);
        if c.max_event_payload > frame || c.max_luggage_value > frame {
            return Err(invalid(
                &self.name,
                format!("event payloads and luggage values are limited to {frame} bytes (one stream frame)"),
            ));
        }
        if (c.max_luggage_total as u64) > c.replication.limits.writer_bytes {
            return Err(invalid(
                &self.name,
                format!(
                    "luggage_total ({}) must not exceed writer_bytes ({})",
                    c.max_luggage_total, c.replication.limits.writer_bytes
                ),
            ));
        }
        if self.limits.inbox_bytes() < c.max_event_payload as u64 {
            return Err(invalid(
                &self.name,
                format!(
                    "inbox_bytes ({}) must hold at least one event payload ({})",
                    self.limits.inbox_bytes(),
                    c.max_event_payload
                ),
            ));
        }
        c.validate().map_err(|m| invalid(&self.name, m))?;
        Ok(c)
    }

    /// The spec with key material replaced by `"<redacted>"`.
    pub fn masked(&self) -> OverlaySpec {
        OverlaySpec {
            keys: self.keys.iter().map(|_| "<redacted>".to_owned()).collect(),
            ..self.clone()
        }
    }
}

/// Overlay names: 1–64 letters, digits, `-`, `_` or `.` (they appear in URLs).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid overlay name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// A seed: an address, or a DNS name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seed {
    /// `ip:port`.
    Addr(SocketAddr),
    /// `host:port`, resolved again every `dns_refresh`.
    Dns(String, u16),
}

/// Parses `ip:port` or `host:port`.
pub fn parse_seed(s: &str) -> Result<Seed, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Seed::Addr(a));
    }
    let bad = || format!("seed {s:?} is neither ip:port nor host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok(Seed::Dns(host.to_owned(), port))
}

/// Decodes a base64 key and checks its length. The bytes are wiped when
/// dropped.
pub fn decode_key(key: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "a key is not valid base64 (make one with `rumormill keygen`)".to_owned())?,
    );
    match bytes.len() {
        16 | 24 | 32 => Ok(bytes),
        n => Err(format!("a key has {n} bytes; it must have 16, 24 or 32")),
    }
}

/// A new random key, base64 (the raw bytes are wiped).
pub fn generate_key() -> String {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::Rng::fill(&mut rand::rng(), &mut key[..]);
    base64::engine::general_purpose::STANDARD.encode(*key)
}

/// Reads a base64 key from a file, or from standard input for `-`: a key
/// given this way is not visible in the process list, as `--key` is.
/// Surrounding white space is ignored; the key is checked.
pub fn read_key_file(path: &std::path::Path) -> Result<Zeroizing<String>, String> {
    let mut text = Zeroizing::new(String::new());
    let read = if path.as_os_str() == "-" {
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text).map(|_| ()))
    };
    let source = if path.as_os_str() == "-" {
        "standard input".to_owned()
    } else {
        format!("key file {}", path.display())
    };
    read.map_err(|e| format!("cannot read {source}: {e}"))?;
    let key = Zeroizing::new(text.trim().to_owned());
    decode_key(&key).map_err(|m| format!("{source}: {m}"))?;
    Ok(key)
}

/// Parses durations such as `250ms`, `1s`, `1.5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: write e.g. 500ms, 2s, 1m"))?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration {s:?}: the unit must be ms, s, m or h")),
    };
    let d = Duration::try_from_secs_f64(value * scale).map_err(|_| format!("invalid duration {s:?}"))?;
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is too long: at most 7 days"));
    }
    Ok(d)
}

/// The longest duration a setting may have.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Optional values written as their `Display`/`FromStr` text.
mod opt_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr<Err = String>,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_key_or_plaintext() {
        let err = AgentConfig::from_toml("[[overlay]]\nname = \"a\"").unwrap_err();
        assert!(err.to_string().contains("no key"), "{err}");
        let ok =
            AgentConfig::from_toml(&format!("[[overlay]]\nname = \"a\"\nkeys = [\"{}\"]", generate_key())).unwrap();
        assert_eq!(ok.overlays[0].bind_addr().unwrap().port(), DEFAULT_GOSSIP_PORT);
    }

    #[test]
    fn api_host_names_and_origins_are_checked() {
        let c = AgentConfig::from_toml(
            "[api]\nbind = \"10.0.0.5:7980\"\nallowed_hosts = [\"gossip.internal\", \"ui.internal:8443\", \"[fd00::1]\"]\n\
             allowed_origins = [\"https://ui.internal:8443\"]",
        )
        .unwrap();
        assert_eq!(c.api.allowed_hosts.len(), 3);
        for (text, needle) in [
            ("allowed_hosts = [\"http://x\"]", "allowed_hosts: \"http://x\""),
            ("allowed_hosts = [\"a b\"]", "only letters"),
            ("allowed_hosts = [\"x:port\"]", "not a port number"),
            ("allowed_origins = [\"ui.internal\"]", "scheme://host"),
            ("allowed_origins = [\"ftp://ui.internal\"]", "expected http or https"),
        ] {
            let e = AgentConfig::from_toml(&format!("[api]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("[api] allowed_"), "{e}");
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        assert_eq!(parse_authority("[::1]:80"), Ok(("::1".into(), Some(80))));
        assert_eq!(parse_authority("LocalHost"), Ok(("localhost".into(), None)));
        assert_eq!(
            parse_origin("HTTP://Example.com"),
            Ok(("http".into(), "example.com".into(), 80))
        );
    }

    #[test]
    fn unknown_settings_and_bad_values_are_named() {
        let e = AgentConfig::from_toml("[[overlay]]\nname = \"a\"\nplaintext = true\nprobe = 3").unwrap_err();
        assert!(e.to_string().contains("unknown field `probe`"), "{e}");
        let e = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.timings]\nprobe_interval = \"3 parsecs\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unit must be"), "{e}");
        let e = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.timings]\nprobe_interval = \"1s\"\nprobe_timeout = \"2s\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("probe_timeout"), "{e}");
        let e = AgentConfig::from_toml("[[overlay]]\nname = \"a b\"\nplaintext = true").unwrap_err();
        assert!(e.to_string().contains("invalid overlay name"), "{e}");
        let e = AgentConfig::from_toml("[[overlay]]\nname = \"a\"\nkeys = [\"c2hvcnQ=\"]").unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
        let e =
            AgentConfig::from_toml("[[overlay]]\nname = \"a\"\nplaintext = true\nseeds = [\"no port\"]").unwrap_err();
        assert!(e.to_string().contains("neither ip:port"), "{e}");
    }

    #[test]
    fn rack_settings_are_checked_one_line_each() {
        let base = "[[overlay]]\nname = \"a\"\nplaintext = true\n";
        let c = AgentConfig::from_toml(&format!(
            "{base}rack = \"eu-1\"\ngateway = true\nremote_seeds = [\"127.0.0.1:7951\", \"gw.us-1:7950\"]"
        ))
        .unwrap();
        let o = &c.overlays[0];
        assert_eq!(o.candidates(), DEFAULT_CANDIDATES);
        let spec = o.rack_spec(vec!["127.0.0.1:7951".parse().unwrap()]).unwrap().unwrap();
        assert_eq!((&*spec.name, spec.gateway, spec.candidates), ("eu-1", true, 3));
        assert_eq!(spec.remote_seeds.len(), 1);
        assert!(o.candidates_warning().is_none(), "3 is odd");
        let plain = AgentConfig::from_toml(&format!("{base}rack = \"eu-1\"")).unwrap();
        let spec = plain.overlays[0].rack_spec(Vec::new()).unwrap().unwrap();
        assert!(!spec.gateway);
        let flat = AgentConfig::from_toml(base).unwrap();
        assert_eq!(flat.overlays[0].rack_spec(Vec::new()).unwrap(), None);
        for (extra, needle) in [
            ("rack = \"EU 1\"", "rack: rack name \"EU 1\": 'E' is not one of a-z"),
            ("rack = \"-eu\"", "must start with a letter or a digit"),
            ("rack = \"\"", "must not be empty"),
            (&format!("rack = \"{}\"", "r".repeat(64)), "at most 63"),
            ("gateway = true", "gateway = true needs a rack"),
            ("rack = \"eu\"\ngateway = true\ncandidates = 0", "candidates = 0"),
            ("rack = \"eu\"\ncandidates = 3", "candidates is set but gateway is not"),
            (
                "rack = \"eu\"\nremote_seeds = [\"127.0.0.1:1\"]",
                "remote_seeds needs gateway = true",
            ),
            (
                "rack = \"eu\"\ngateway = true\nremote_seeds = [\"nowhere\"]",
                "remote_seeds: seed \"nowhere\"",
            ),
        ] {
            let e = AgentConfig::from_toml(&format!("{base}{extra}")).unwrap_err();
            assert!(matches!(e, ConfigError::Rack { .. }), "{extra}: {e:?}");
            let text = e.to_string();
            assert!(text.starts_with("overlay \"a\": "), "{text}");
            assert!(text.contains(needle), "{extra}: {text:?} lacks {needle:?}");
            assert!(!text.contains('\n'), "one line: {text:?}");
        }
    }

    #[test]
    fn an_even_number_of_candidates_is_allowed_with_a_reason_to_prefer_odd() {
        let mut s = OverlaySpec::named("a");
        s.plaintext = true;
        s.rack = Some("eu".into());
        s.gateway = true;
        s.candidates = Some(4);
        s.validate().unwrap();
        let w = s.candidates_warning().expect("a warning for 4");
        assert!(
            w.contains("so 4 candidates tolerate 1 failure(s), no more than 3 would"),
            "{w}"
        );
        assert!(!w.contains('\n'));
        s.candidates = Some(1);
        assert!(s.candidates_warning().is_none());
        s.candidates = Some(2);
        assert!(s.candidates_warning().unwrap().contains("tolerate 0 failure(s)"));
    }

    #[test]
    fn timings_override_the_preset() {
        let c = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\nprofile = \"wan\"\n[overlay.timings]\nprobe_interval = \"7s\"\nmode = \"rumor\"",
        )
        .unwrap();
        let core = c.overlays[0].core_config().unwrap();
        assert_eq!(core.probe_interval, Duration::from_secs(7));
        assert_eq!(core.probe_timeout, Config::new_wan().probe_timeout);
        assert_eq!(core.replication.mode, Mode::Rumor);
    }

    #[test]
    fn limits_apply_and_must_fit_a_stream_frame() {
        let c = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.limits]\nevent_payload = 100\nluggage_total = 5000",
        )
        .unwrap();
        let core = c.overlays[0].core_config().unwrap();
        assert_eq!((core.max_event_payload, core.max_luggage_total), (100, 5000));
        assert_eq!(core.max_luggage_value, Config::new_lan().max_luggage_value);
        let e = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.limits]\nevent_payload = 1000000000",
        )
        .unwrap_err();
        assert!(e.to_string().contains("one stream frame"), "{e}");
        let c = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.limits]\nwriter_bytes = 2000000\nwriter_entries = 50\nstore_bytes = 9000000\nstore_entries = 500\ninbox_bytes = 3000000",
        )
        .unwrap();
        let core = c.overlays[0].core_config().unwrap();
        let q = core.replication.limits;
        assert_eq!((q.writer_bytes, q.writer_entries), (2_000_000, 50));
        assert_eq!((q.store_bytes, q.store_entries), (9_000_000, 500));
        assert_eq!(c.overlays[0].limits.inbox_bytes(), 3_000_000);
        let e = AgentConfig::from_toml(
            "[[overlay]]\nname = \"a\"\nplaintext = true\n[overlay.limits]\nwriter_bytes = 1000",
        )
        .unwrap_err();
        assert!(e.to_string().contains("must not exceed writer_bytes"), "{e}");
    }

    #[test]
    fn durations_and_seeds_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1s").is_err());
        assert!(
            parse_duration("4000000000000000h")
                .unwrap_err()
                .contains("at most 7 days")
        );
        assert_eq!(
            parse_seed("10.0.0.1:7950").unwrap(),
            Seed::Addr("10.0.0.1:7950".parse().unwrap())
        );
        assert_eq!(
            parse_seed("gossip.local:7950").unwrap(),
            Seed::Dns("gossip.local".into(), 7950)
        );
        assert!(parse_seed("host:0").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn plaintext_off_loopback_needs_the_override() {
        let mut s = OverlaySpec::named("a");
        s.plaintext = true;
        let e = s.check_plaintext_bind().unwrap_err().to_string();
        assert!(
            e.contains("plaintext on 0.0.0.0:7950, which is not a loopback address"),
            "{e}"
        );
        s.bind = "[::]:7950".into();
        assert!(s.check_plaintext_bind().is_err());
        for loopback in ["127.0.0.1:0", "127.9.9.9:7950", "[::1]:7950"] {
            s.bind = loopback.into();
            s.check_plaintext_bind().unwrap();
        }
        s.bind = "0.0.0.0:7950".into();
        s.allow_plaintext_network = true;
        s.check_plaintext_bind().unwrap();
        s.plaintext = false;
        s.allow_plaintext_network = false;
        s.keys = vec![generate_key()];
        s.check_plaintext_bind().unwrap();
    }

    #[test]
    fn key_files_are_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("rm-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = generate_key();
        std::fs::write(dir.join("k"), format!("{key}\n")).unwrap();
        assert_eq!(read_key_file(&dir.join("k")).unwrap().as_str(), key);
        std::fs::write(dir.join("bad"), "c2hvcnQ=").unwrap();
        let e = read_key_file(&dir.join("bad")).unwrap_err();
        assert!(e.ends_with("bad: a key has 5 bytes; it must have 16, 24 or 32"), "{e}");
        let e = read_key_file(&dir.join("missing")).unwrap_err();
        assert!(e.starts_with("cannot read key file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn masked_hides_keys() {
        let mut s = OverlaySpec::named("a");
        s.keys = vec![generate_key()];
        let json = serde_json::to_string(&s.masked()).unwrap();
        assert!(!json.contains(&s.keys[0]) && json.contains("redacted"), "{json}");
        let debug = format!("{s:?}");
        assert!(!debug.contains(&s.keys[0]) && debug.contains("1 redacted"), "{debug}");
    }
}
