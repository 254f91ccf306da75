//! Commands that talk to a running agent through its HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rumormill::api::{JoinRequest, KeyRequest, PublishRequest, PutRequest};
use rumormill::client::{Client, encode_path};
use rumormill::config::{OverlaySpec, Profile};
use rumormill::events::DeliverySpec;
use rumormill::keyring::KeyChange;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::agent::{ADDRESS_FILE, READ_TOKEN_FILE, TOKEN_FILE};

/// How client commands find the agent.
#[derive(Debug, Args)]
pub struct Target {
    /// Agent API address [env: RUMORMILL_API; default: from the data
    /// directory, else 127.0.0.1:7980].
    #[arg(long, global = true, env = "RUMORMILL_API", value_name = "ADDR")]
    pub api: Option<SocketAddr>,
    /// API token, admin or read [env: RUMORMILL_TOKEN; default: the
    /// data directory's read-token for reads, admin-token for changes].
    /// Other local users can see it in the process list: prefer
    /// --token-file or the environment.
    #[arg(long, global = true, env = "RUMORMILL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API token; `-` reads it from standard input
    /// [env: RUMORMILL_TOKEN_FILE]. Unlike --token, not visible to
    /// other local users.
    #[arg(
        long,
        global = true,
        env = "RUMORMILL_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// Overlay to act on.
    #[arg(long, short, global = true, env = "RUMORMILL_OVERLAY", default_value = "default")]
    pub overlay: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The overlay's keyring. Changes apply to every member of the overlay;
/// a rotation is `install NEW`, `use NEW-ID`, `remove OLD-ID`. To rotate a
/// member out, install NEW with `--local` on each agent to keep, then
/// `use NEW-ID --exclude MEMBER` and `remove OLD-ID --exclude MEMBER`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Installs a key on every member (accepted from now on); with
    /// `--local`, on this agent alone.
    Install {
        /// Base64 key (`rumormill keygen`); `-` reads it from standard
        /// input, out of sight of `ps` and shell history.
        #[arg(required_unless_present = "key_file")]
        key: Option<String>,
        /// File holding the key (`-`: standard input).
        #[arg(long, value_name = "PATH", conflicts_with = "key")]
        key_file: Option<PathBuf>,
        /// This agent alone: the secret never travels in the overlay (to
        /// rotate a key holder out).
        #[arg(long)]
        local: bool,
        /// Seconds to wait for every live member to follow.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Makes a key primary on every member (refused unless all have it).
    Use {
        /// Key id (from `keys list`).
        id: String,
        /// Member to leave out (not waited for; cut off once the old key
        /// is removed); repeatable.
        #[arg(long, value_name = "MEMBER")]
        exclude: Vec<String>,
        /// Seconds to wait for every live member to follow.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Removes a key from every member (refused while one still sends with
    /// it); with `--local`, a key installed with `--local`, from this agent.
    Remove {
        /// Key id.
        id: String,
        /// Member to leave out (it may still seal with the key); repeatable.
        #[arg(long, value_name = "MEMBER")]
        exclude: Vec<String>,
        /// This agent alone.
        #[arg(long, conflicts_with = "exclude")]
        local: bool,
        /// Seconds to wait for every live member to follow.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Lists key ids.
    List,
    /// Prints the secret keys (for other agents to join).
    Export,
}

/// Luggage: per-member data every member holds.
#[derive(Debug, Subcommand)]
pub enum LuggageCommand {
    /// Lists the luggage of every member (or of one).
    List {
        /// Only this member's.
        #[arg(long)]
        member: Option<String>,
    },
    /// Sets one of this member's entries.
    Set {
        /// Key.
        key: String,
        /// Value (text); `-` reads standard input.
        value: String,
    },
    /// Deletes one of this member's entries.
    Delete {
        /// Key.
        key: String,
    },
}

/// Overlays of the agent.
#[derive(Debug, Subcommand)]
pub enum OverlaysCommand {
    /// Lists overlays.
    List,
    /// Shows one overlay's settings and counters.
    Show {
        /// Name.
        name: String,
    },
    /// Creates and starts an overlay.
    Create {
        /// Name.
        name: String,
        /// Gossip address (UDP and TCP).
        #[arg(long, default_value = "0.0.0.0:7950")]
        bind: String,
        /// Member name [default: the host name].
        #[arg(long)]
        member: Option<String>,
        /// Rack of this member (see the README's racks reference).
        #[arg(long)]
        rack: Option<String>,
        /// This member is a gateway candidate of its rack (needs --rack).
        #[arg(long)]
        gateway: bool,
        /// How many gateway candidates the rack has [default: 3 with --gateway].
        #[arg(long, value_name = "N")]
        candidates: Option<usize>,
        /// Gossip address of a candidate of another rack; repeatable
        /// (needs --gateway).
        #[arg(long = "remote-seed", value_name = "ADDR")]
        remote_seeds: Vec<String>,
        /// Seeds; repeatable.
        #[arg(long = "seed")]
        seeds: Vec<String>,
        /// Key, base64 [default: a new one]. Visible in the process list:
        /// prefer --key-file.
        #[arg(long)]
        key: Option<String>,
        /// File holding the key (base64), or `-` for standard input.
        #[arg(long, value_name = "PATH", conflicts_with = "key")]
        key_file: Option<PathBuf>,
        /// Unencrypted.
        #[arg(long, conflicts_with_all = ["key", "key_file"])]
        plaintext: bool,
        /// Let a plaintext overlay bind an address other than loopback.
        #[arg(long, requires = "plaintext")]
        allow_plaintext_network: bool,
        /// Timing preset: lan, wan or local.
        #[arg(long, default_value = "lan", value_parser = super::agent::parse_profile)]
        profile: Profile,
    },
    /// Leaves gracefully and deletes an overlay.
    Delete {
        /// Name.
        name: String,
    },
}

/// A client command.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Lists the members of the overlay (of this member's rack, when it
    /// is in one).
    Members {
        /// Only the members of this rack (another rack's as its gateway
        /// reports them).
        #[arg(long, value_name = "RACK")]
        rack: Option<String>,
        /// The members of every rack.
        #[arg(long, conflicts_with = "rack")]
        all_racks: bool,
    },
    /// Lists the racks: gateway, Raft term, candidates with their roles,
    /// members alive/suspect/failed, when each was last heard from.
    Racks,
    /// Joins members at these gossip addresses.
    Join {
        /// ip:port addresses.
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
    /// Leaves the overlay gracefully.
    Leave,
    /// Writes a value (spreads to every member).
    Put {
        /// Key.
        key: String,
        /// Value (text); `-` reads standard input.
        value: String,
    },
    /// Reads a value.
    Get {
        /// Key.
        key: String,
    },
    /// Deletes a value.
    Delete {
        /// Key.
        key: String,
    },
    /// Lists values.
    List {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Publishes an event to the subscribers of a topic; prints its id.
    Publish {
        /// Topic.
        topic: String,
        /// Payload (text); `-` reads standard input.
        payload: String,
        /// Resend until every subscriber acknowledges (reports: `rumormill event ID`).
        #[arg(long)]
        at_least_once: bool,
        /// Time between resends (at-least-once).
        #[arg(long, default_value = "1s")]
        retry_every: String,
        /// Resends at most; 0: until delivered or the subscriber is gone.
        #[arg(long, default_value_t = 0)]
        retry_max: u32,
    },
    /// Shows an at-least-once event's delivery reports.
    Event {
        /// Event id, as `publish` printed it.
        id: String,
    },
    /// Subscribes to topics and prints one JSON line per event (also
    /// member.joined/suspect/failed/left/alive/updated, luggage.changed,
    /// delivery.report). Subscribing needs the admin token; with only the
    /// read token, the agent must already subscribe to the topics.
    Subscribe {
        /// Topics.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Start after this inbox sequence number (0: everything kept);
        /// default: from now.
        #[arg(long)]
        from: Option<u64>,
        /// Exit after this many entries.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Lists the agent's topics.
    Subscriptions,
    /// Unsubscribes the agent from a topic.
    Unsubscribe {
        /// Topic.
        topic: String,
    },
    /// Per-member data.
    #[command(subcommand)]
    Luggage(LuggageCommand),
    /// Manages the keyring.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manages overlays.
    #[command(subcommand)]
    Overlays(OverlaysCommand),
}

fn client(target: &Target, data_dir: &std::path::Path, stdin: &mut Stdin) -> Result<Client, String> {
    let api = target.api.unwrap_or_else(|| {
        std::fs::read_to_string(data_dir.join(ADDRESS_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("api")?.as_str()?.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], rumormill::config::DEFAULT_API_PORT)))
    });
    let from_dir = |file: &str| {
        std::fs::read_to_string(data_dir.join(file))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let given = match (&target.token, &target.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(read_token_file(path, stdin)?),
        (None, None) => None,
    };
    Ok(match given {
        // A token given is used for everything it is needed for.
        Some(t) => Client::new(api, Some(t)),
        None => Client::new(api, from_dir(TOKEN_FILE)).with_read_token(from_dir(READ_TOKEN_FILE)),
    })
}

/// The token in `path` (`-`: standard input), trimmed.
fn read_token_file(path: &std::path::Path, stdin: &mut Stdin) -> Result<String, String> {
    let text = if path.as_os_str() == "-" {
        stdin.take("--token-file -")?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
    };
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "token file {} is empty",
            if path.as_os_str() == "-" {
                "- (standard input)".into()
            } else {
                path.display().to_string()
            }
        ));
    }
    Ok(token.to_owned())
}

/// Standard input, which only one argument may read.
struct Stdin(Option<&'static str>);

impl Stdin {
    /// Reads standard input for `what`; refuses a second reader.
    fn take(&mut self, what: &'static str) -> Result<String, String> {
        if let Some(first) = self.0 {
            return Err(format!("{first} and {what} cannot both read standard input"));
        }
        self.0 = Some(what);
        read_stdin()
    }
}

/// Runs a client command.
pub fn run(cmd: ClientCommand, target: Target, data_dir: PathBuf) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let mut stdin = Stdin(None);
        let c = client(&target, &data_dir, &mut stdin)?;
        let o = c.on(&target.overlay);
        let e = |e: rumormill::client::ClientError| match e {
            rumormill::client::ClientError::Api { status: 401, message } => {
                format!("{message} (HTTP 401; give --token, or --data-dir of that agent)")
            }
            other => other.to_string(),
        };
        let text = |value: String| PutRequest {
            value: Some(value),
            value_base64: None,
        };
        let out = match cmd {
            ClientCommand::Members {
                rack: None,
                all_racks: false,
            } => Output::Table(
                value(&o.members().await.map_err(e)?),
                &["name", "addr", "state", "incarnation", "epoch", "rack"],
            ),
            ClientCommand::Members { rack, .. } => Output::Table(
                value(&o.rack_members(rack.as_deref()).await.map_err(e)?),
                &["name", "rack", "state", "addr", "report_age_s"],
            ),
            ClientCommand::Racks => {
                let racks = o.racks().await.map_err(e)?;
                if target.json {
                    Output::Value(value(&racks))
                } else {
                    Output::Table(
                        Value::Array(racks.iter().map(rack_line).collect()),
                        &[
                            "name",
                            "gateway",
                            "term",
                            "candidates",
                            "alive",
                            "suspect",
                            "failed",
                            "last_heard",
                        ],
                    )
                }
            }
            ClientCommand::Join { addrs } => {
                let n = addrs.len();
                o.join(&JoinRequest { addrs }).await.map_err(e)?;
                Output::Done(format!("joining {n} address(es)"))
            }
            ClientCommand::Leave => {
                o.leave().await.map_err(e)?;
                Output::Done(format!("left overlay {}", target.overlay))
            }
            ClientCommand::Put { key, value: v } => {
                let v = if v == "-" { stdin.take("the value `-`")? } else { v };
                let row = o.put(&key, &text(v)).await.map_err(e)?;
                Output::Row(value(&row), &["key", "value", "origin", "lamport"])
            }
            ClientCommand::Get { key } => Output::Value(value(&o.get(&key).await.map_err(e)?)),
            ClientCommand::Delete { key } => {
                o.delete(&key).await.map_err(e)?;
                Output::Done(format!("deleted {key}"))
            }
            ClientCommand::List { prefix } => Output::Table(
                value(&o.list(prefix.as_deref()).await.map_err(e)?),
                &["key", "value", "origin", "lamport"],
            ),
            ClientCommand::Publish {
                topic,
                payload,
                at_least_once,
                retry_every,
                retry_max,
            } => {
                let payload = if payload == "-" {
                    stdin.take("the payload `-`")?
                } else {
                    payload
                };
                let delivery = if at_least_once {
                    DeliverySpec::AtLeastOnce { retry_every, retry_max }
                } else {
                    DeliverySpec::BestEffort
                };
                let request = PublishRequest {
                    topic,
                    payload: Some(payload),
                    payload_base64: None,
                    delivery,
                };
                let record = o.publish(&request).await.map_err(e)?;
                Output::Row(value(&record), &["id", "topic", "delivery"])
            }
            ClientCommand::Event { id } => {
                let record = o.event(&id).await.map_err(e)?;
                if target.json {
                    Output::Value(value(&record))
                } else {
                    println!(
                        "event {} on {} ({}): {}",
                        cell_text(&record.id),
                        cell_text(&record.topic),
                        record.delivery,
                        if record.complete {
                            "every report final"
                        } else {
                            "reports pending"
                        }
                    );
                    Output::Table(value(&record.subscribers), &["member", "outcome", "attempts"])
                }
            }
            ClientCommand::Subscribe { topics, from, count } => {
                subscribe(&c, &target.overlay, &topics, from, count).await?;
                return Ok(());
            }
            ClientCommand::Subscriptions => Output::Lines(o.subscriptions().await.map_err(e)?.topics),
            ClientCommand::Unsubscribe { topic } => {
                o.unsubscribe(&topic).await.map_err(e)?;
                Output::Done(format!("unsubscribed from {topic}"))
            }
            ClientCommand::Luggage(l) => match l {
                LuggageCommand::List { member } => Output::Table(
                    value(&o.luggage(member.as_deref()).await.map_err(e)?),
                    &["member", "key", "value"],
                ),
                LuggageCommand::Set { key, value: v } => {
                    let v = if v == "-" { stdin.take("the value `-`")? } else { v };
                    o.set_luggage(&key, &text(v)).await.map_err(e)?;
                    Output::Done(format!("luggage {key} set"))
                }
                LuggageCommand::Delete { key } => {
                    o.delete_luggage(&key).await.map_err(e)?;
                    Output::Done(format!("luggage {key} deleted"))
                }
            },
            ClientCommand::Keys(k) => match k {
                KeysCommand::List => Output::Table(
                    value(&o.keys().await.map_err(e)?),
                    &[
                        "id",
                        "suite",
                        "primary",
                        "local",
                        "installed_on",
                        "primary_on",
                        "members",
                    ],
                ),
                KeysCommand::Install {
                    key,
                    key_file,
                    local,
                    wait,
                } => {
                    let from_stdin =
                        key_file.as_deref().is_some_and(|p| p.as_os_str() == "-") || key.as_deref() == Some("-");
                    let key = match (key_file, key) {
                        _ if from_stdin => {
                            let raw = Zeroizing::new(stdin.take("the key `-`")?);
                            Zeroizing::new(raw.trim().to_owned())
                        }
                        (Some(path), _) => rumormill::config::read_key_file(&path)?,
                        (None, Some(k)) => Zeroizing::new(k),
                        (None, None) => return Err("give the key, `-` or --key-file".into()),
                    };
                    let c = c.clone().with_timeout(Duration::from_secs(wait + 30));
                    let change = c
                        .on(&target.overlay)
                        .install_key(&KeyRequest { key }, wait, local)
                        .await
                        .map_err(e)?;
                    if local {
                        local_change(&change, target.json)
                    } else {
                        key_change(&change, "installed on", target.json)?
                    }
                }
                KeysCommand::Use { id, exclude, wait } => {
                    let c = c.clone().with_timeout(Duration::from_secs(wait + 30));
                    let change = c.on(&target.overlay).use_key(&id, wait, &exclude).await.map_err(e)?;
                    key_change(&change, "primary on", target.json)?
                }
                KeysCommand::Remove {
                    id,
                    exclude,
                    local,
                    wait,
                } => {
                    let c = c.clone().with_timeout(Duration::from_secs(wait + 30));
                    let change = c
                        .on(&target.overlay)
                        .remove_key(&id, wait, &exclude, local)
                        .await
                        .map_err(e)?;
                    if local {
                        local_change(&change, target.json)
                    } else {
                        key_change(&change, "removed from", target.json)?
                    }
                }
                KeysCommand::Export => Output::Lines(o.export_keys().await.map_err(e)?.keys),
            },
            ClientCommand::Overlays(cmd) => match cmd {
                OverlaysCommand::List => Output::Table(
                    value(&c.overlays().await.map_err(e)?),
                    &["name", "member", "addr", "status", "live_members", "encrypted"],
                ),
                OverlaysCommand::Show { name } => Output::Value(value(&c.overlay(&name).await.map_err(e)?)),
                OverlaysCommand::Create {
                    name,
                    bind,
                    member,
                    rack,
                    gateway,
                    candidates,
                    remote_seeds,
                    seeds,
                    key,
                    key_file,
                    plaintext,
                    allow_plaintext_network,
                    profile,
                } => {
                    let mut spec = OverlaySpec::named(&name);
                    spec.keys = match (plaintext, key_file, key) {
                        (true, _, _) => vec![],
                        (false, Some(path), _) => vec![rumormill::config::read_key_file(&path)?.to_string()],
                        (false, None, key) => vec![key.unwrap_or_else(rumormill::config::generate_key)],
                    };
                    spec.bind = bind;
                    spec.seeds = seeds;
                    spec.plaintext = plaintext;
                    spec.allow_plaintext_network = allow_plaintext_network;
                    spec.profile = profile;
                    spec.member = member;
                    spec.rack = rack;
                    spec.gateway = gateway;
                    spec.candidates = candidates;
                    spec.remote_seeds = remote_seeds;
                    let summary = c.create_overlay(&spec).await.map_err(e)?;
                    Output::Row(value(&summary), &["name", "member", "addr", "status"])
                }
                OverlaysCommand::Delete { name } => {
                    c.delete_overlay(&name).await.map_err(e)?;
                    Output::Done(format!("overlay {name} deleted"))
                }
            },
        };
        out.print(target.json);
        Ok(())
    })
}

/// Follows the agent's event stream over a WebSocket, printing one JSON
/// line per entry.
async fn subscribe(
    c: &Client,
    overlay: &str,
    topics: &[String],
    from: Option<u64>,
    count: Option<u64>,
) -> Result<(), String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let path = c.on(overlay).events_ws_path();
    let mut url = format!(
        "ws://{}{path}?topics={}",
        c.addr(),
        topics.iter().map(|t| encode_path(t)).collect::<Vec<_>>().join(",")
    );
    if let Some(f) = from {
        url.push_str(&format!("&from={f}"));
    }
    let mut req = url.into_client_request().map_err(|e| format!("bad address: {e}"))?;
    // Subscribing needs the admin token; with only the read token the
    // agent must already subscribe to the topics.
    let read = c.token_for("GET", &path);
    if let Some(t) = c.token().or(read) {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        req.headers_mut().insert("authorization", value);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.into_owned());
            format!("{message} (HTTP {})", resp.status().as_u16())
        }
        other => format!("cannot follow the events of {}: {other}", c.addr()),
    })?;
    let mut seen = 0u64;
    let signal = super::agent::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    println!("{t}");
                    seen += 1;
                    if count.is_some_and(|n| seen >= n) {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("the event stream broke: {e}")),
                None => return Err("the agent closed the event stream".into()),
            },
            _ = &mut signal => {
                let _ = ws.close(None).await;
                return Ok(());
            }
        }
    }
}

fn read_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    Ok(s)
}

/// "key 1a2b3c4d on this agent only (2/3 members hold it; not on c)".
fn local_change(change: &KeyChange, json: bool) -> Output {
    if json {
        return Output::Value(value(change));
    }
    let lacking = if change.missing.is_empty() {
        String::new()
    } else {
        format!("; not on {}", change.missing.join(", "))
    };
    Output::Done(format!(
        "key {} on this agent only ({}/{} members hold it{lacking})",
        change.id,
        change.done.len(),
        change.members
    ))
}

/// "key 1a2b3c4d installed on 5/5 members"; an error when some did not follow.
fn key_change(change: &KeyChange, what: &str, json: bool) -> Result<Output, String> {
    let (id, done, members) = (&change.id, change.done.len(), change.members);
    if !change.missing.is_empty() {
        return Err(format!(
            "key {id} {what} {done}/{members} members; not yet on {} (it goes on spreading; check with `keys list`)",
            change.missing.join(", ")
        ));
    }
    Ok(if json {
        Output::Value(value(change))
    } else {
        Output::Done(format!("key {id} {what} {done}/{members} members"))
    })
}

/// An answer as JSON, for printing.
fn value<T: serde::Serialize>(answer: &T) -> Value {
    serde_json::to_value(answer).unwrap_or(Value::Null)
}

/// One line of the `racks` table: candidates as `name:role`, the time
/// since the rack was heard from in seconds.
fn rack_line(r: &rumormill::agent::RackRow) -> Value {
    let candidates: Vec<String> = r.candidates.iter().map(|c| format!("{}:{}", c.name, c.role)).collect();
    json!({
        "name": if r.local { format!("{} (here)", r.name) } else { r.name.clone() },
        "gateway": r.gateway,
        "term": r.term,
        "candidates": candidates.join(","),
        "alive": r.alive,
        "suspect": r.suspect,
        "failed": r.failed,
        "last_heard": r.last_heard_s.map(|s| format!("{s:.1}s ago")),
    })
}

enum Output {
    Table(Value, &'static [&'static str]),
    Row(Value, &'static [&'static str]),
    Value(Value),
    Lines(Vec<String>),
    Done(String),
}

impl Output {
    fn print(self, json: bool) {
        match self {
            Output::Done(m) if json => println!("{}", json!({ "ok": true, "message": m })),
            Output::Done(m) => println!("{m}"),
            Output::Table(v, _) | Output::Row(v, _) | Output::Value(v) if json => println!("{v}"),
            Output::Lines(lines) if json => println!("{}", value(&lines)),
            Output::Table(v, cols) => print!("{}", table(v.as_array().map(Vec::as_slice).unwrap_or_default(), cols)),
            Output::Row(v, cols) => print!("{}", table(std::slice::from_ref(&v), cols)),
            // `get` prints the bare value, as a shell script wants it.
            Output::Value(v) => match v.get("value").and_then(Value::as_str) {
                Some(s) => println!("{}", for_terminal(s)),
                None => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            },
            Output::Lines(lines) => {
                for line in lines {
                    println!("{}", for_terminal(&line));
                }
            }
        }
    }
}

/// Longest table cell, in characters; a longer one is cut and ends in `…`.
const MAX_CELL: usize = 120;

/// Whether `c` must not reach a terminal as it is: control characters
/// (C0, DEL, C1) and the bidirectional overrides that reorder what is shown.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with unsafe characters written as visible escapes (`\n`, `\t`,
/// `\x1b`, `\u{9b}`), except those in `keep`.
fn escape(s: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            c if keep.contains(&c) || !is_unsafe(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out
}

/// A table cell: escaped, and cut to `MAX_CELL` characters.
fn cell_text(s: &str) -> String {
    let escaped = escape(s, &[]);
    if escaped.chars().count() <= MAX_CELL {
        return escaped;
    }
    let mut cut: String = escaped.chars().take(MAX_CELL - 1).collect();
    cut.push('…');
    cut
}

/// Text printed on its own (`get`, lines): as it is into a pipe, escaped
/// (but for line breaks and tabs) on a terminal.
fn for_terminal(s: &str) -> std::borrow::Cow<'_, str> {
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) && s.chars().any(is_unsafe) {
        escape(s, &['\n', '\t']).into()
    } else {
        s.into()
    }
}

/// Rows as aligned columns under upper-case headers; cells are escaped
/// and cut (see `cell_text`).
fn table(rows: &[Value], cols: &[&str]) -> String {
    let cell = |row: &Value, c: &str| match &row[c] {
        Value::Null => "-".to_owned(),
        Value::String(s) => cell_text(s),
        other => cell_text(&other.to_string()),
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| cols.iter().map(|c| cell(r, c)).collect()).collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |items: Vec<String>| {
        let mut text = String::new();
        for (i, (s, w)) in items.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(s);
            text.extend(std::iter::repeat_n(' ', w.saturating_sub(s.chars().count())));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_in_tables() {
        let rows = [json!({ "key": "k\u{1b}[2J\u{1b}[H", "value": "a\nb\tc\r\u{7f}\u{9b}\u{202e}x" })];
        let out = table(&rows, &["key", "value"]);
        assert!(!out.chars().any(|c| c != '\n' && is_unsafe(c)), "{out:?}");
        assert_eq!(out.lines().count(), 2, "{out:?}");
        assert!(out.contains("k\\x1b[2J\\x1b[H"), "{out:?}");
        assert!(out.contains("a\\nb\\tc\\r\\x7f\\u{9b}\\u{202e}x"), "{out:?}");
    }

    #[test]
    fn long_cells_are_cut_with_an_ellipsis_and_do_not_panic() {
        let long = "x".repeat(70_000);
        let rows = [json!({ "key": "k", "value": long }), json!({ "key": "k2", "value": 5 })];
        let out = table(&rows, &["key", "value"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let cell = lines[1].rsplit("  ").next().unwrap_or_default();
        assert_eq!(cell.chars().count(), MAX_CELL);
        assert!(cell.ends_with("x…"), "{cell}");
        // Columns stay aligned: the value column starts at the same place.
        assert_eq!(lines[1].find('x'), lines[2].find('5'));
        // Escapes count towards the limit: a cut never leaves raw bytes.
        let out = table(&[json!({ "v": "\u{1b}".repeat(1000) })], &["v"]);
        assert!(!out.contains('\u{1b}'));
        assert!(out.lines().nth(1).is_some_and(|l| l.chars().count() == MAX_CELL));
    }
}
