//! `rumormill agent`: runs the agent until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};

use clap::Args;
use rumormill::agent::Agent;
use rumormill::config::{AgentConfig, LogFormat, OverlaySpec, Profile};
use rumormill::transport::TokioNet;

/// File in the data directory holding the admin token.
pub const TOKEN_FILE: &str = "admin-token";
/// File in the data directory holding the read token.
pub const READ_TOKEN_FILE: &str = "read-token";
/// File in the data directory telling clients where the API is.
pub const ADDRESS_FILE: &str = "agent.json";

/// Options of `rumormill agent`. Overlay flags describe the `default`
/// overlay when the config file declares none.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file (see the README's reference).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP API address [default: 127.0.0.1:7980].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Gossip address of the default overlay [default: 0.0.0.0:7950].
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Address announced to others, when not the bind address.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Member name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Rack of this member: it talks to its rack, and across racks
    /// through the rack's gateway (see the README's racks reference).
    #[arg(long)]
    rack: Option<String>,
    /// This member is a gateway candidate of its rack (needs --rack).
    #[arg(long)]
    gateway: bool,
    /// How many gateway candidates the rack has [default: 3 with --gateway].
    #[arg(long, value_name = "N")]
    candidates: Option<usize>,
    /// Gossip address (ip:port or host:port) of a gateway candidate of
    /// another rack; repeatable (needs --gateway).
    #[arg(long = "remote-seed", value_name = "ADDR")]
    remote_seeds: Vec<String>,
    /// Members to join (ip:port or host:port); repeatable.
    #[arg(long = "seed", value_name = "ADDR")]
    seeds: Vec<String>,
    /// Encryption key, base64 (`rumormill keygen`) [env: RUMORMILL_KEY].
    /// Other local users can read it in the process list: prefer
    /// --key-file.
    #[arg(long, env = "RUMORMILL_KEY", hide_env_values = true)]
    key: Option<String>,
    /// File holding the encryption key (base64), or `-` to read it from
    /// standard input: out of sight of the process list.
    #[arg(long, env = "RUMORMILL_KEY_FILE", value_name = "PATH", conflicts_with = "key")]
    key_file: Option<PathBuf>,
    /// Run the default overlay unencrypted (tests only).
    #[arg(long, conflicts_with_all = ["key", "key_file"])]
    plaintext: bool,
    /// Let the plaintext overlay bind an address other than loopback
    /// (anyone on the network can then read and inject its packets).
    #[arg(long, requires = "plaintext")]
    allow_plaintext_network: bool,
    /// Timing preset of the default overlay.
    #[arg(long, value_parser = parse_profile)]
    profile: Option<Profile>,
}

pub(super) fn parse_profile(s: &str) -> Result<Profile, String> {
    match s {
        "lan" => Ok(Profile::Lan),
        "wan" => Ok(Profile::Wan),
        "local" => Ok(Profile::Local),
        _ => Err(format!("invalid profile {s:?}: expected lan, wan or local")),
    }
}

/// The configuration the arguments describe.
pub fn build_config(args: &AgentArgs, data_dir: Option<PathBuf>) -> Result<AgentConfig, String> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path).map_err(|e| e.to_string())?,
        None => AgentConfig::default(),
    };
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.api.bind = l;
    }
    if let Some(f) = args.log_format {
        config.log.format = f;
    }
    let flags = args.bind.is_some()
        || args.advertise.is_some()
        || args.name.is_some()
        || args.rack.is_some()
        || args.gateway
        || args.candidates.is_some()
        || !args.remote_seeds.is_empty()
        || !args.seeds.is_empty()
        || args.key.is_some()
        || args.key_file.is_some()
        || args.plaintext
        || args.profile.is_some();
    if flags {
        if !config.overlays.is_empty() {
            return Err(
                "overlay flags (--bind, --seed, --key…) apply only when the config file declares no overlay".into(),
            );
        }
        let mut spec = OverlaySpec::named("default");
        if let Some(b) = &args.bind {
            spec.bind = b.clone();
        }
        spec.advertise = args.advertise.clone();
        spec.member = args.name.clone();
        spec.rack = args.rack.clone();
        spec.gateway = args.gateway;
        spec.candidates = args.candidates;
        spec.remote_seeds = args.remote_seeds.clone();
        spec.seeds = args.seeds.clone();
        spec.plaintext = args.plaintext;
        spec.allow_plaintext_network = args.allow_plaintext_network;
        spec.profile = args.profile.unwrap_or_default();
        // Without --key a new one is made; a keyring kept in the data
        // directory from an earlier start wins over it.
        if !args.plaintext {
            let key = match (&args.key_file, &args.key) {
                (Some(path), _) => rumormill::config::read_key_file(path)?.to_string(),
                (None, Some(key)) => key.clone(),
                (None, None) => rumormill::config::generate_key(),
            };
            spec.keys = vec![key];
        }
        config.overlays.push(spec);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Sets up logging: human lines or JSON on standard error.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Reads the admin token, or makes one (mode 0600) and prints it once.
pub fn admin_token(data_dir: &Path) -> Result<String, String> {
    token(data_dir, TOKEN_FILE, "admin token")
}

/// Reads the read token, or makes one (mode 0600) and prints it once.
pub fn read_token(data_dir: &Path) -> Result<String, String> {
    token(data_dir, READ_TOKEN_FILE, "read token")
}

fn token(data_dir: &Path, file: &str, what: &str) -> Result<String, String> {
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut bytes = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &token).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("{what} (printed once; kept in {}): {token}", path.display());
    Ok(token)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Runs the agent until a signal; then leaves every overlay gracefully.
/// Makes freed large blocks go back to the system at once. glibc raises
/// its mmap threshold to the size of the largest block freed (up to 32
/// MiB), after which large values, payloads and frames come from its heaps
/// and stay resident after they are dropped: an agent that stored 15 MiB
/// of another member's values and saw them deleted kept 26 MiB of them.
/// A fixed threshold of 128 KiB (glibc's initial one) keeps every block
/// of that size or more mapped on its own and unmapped when freed.
fn release_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's policy; it is called
    // before the runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

pub fn run(args: AgentArgs, data_dir: Option<PathBuf>) -> Result<(), String> {
    release_large_blocks();
    let config = build_config(&args, data_dir)?;
    init_logging(config.log.format, &config.log.level);
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        // The data directory and the token first: nothing has joined yet if
        // they fail.
        rumormill::config::create_private_dir(&config.data_dir).map_err(|e| e.to_string())?;
        let mut options = rumormill::api::ApiOptions::new(config.api.bind, admin_token(&config.data_dir)?);
        options.read_token = Some(read_token(&config.data_dir)?);
        options.allowed_hosts = config.api.allowed_hosts.clone();
        options.allowed_origins = config.api.allowed_origins.clone();
        let agent = Agent::start(TokioNet, config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (addr, server) = match rumormill::api::serve_with(agent.clone(), options).await {
            Ok(s) => s,
            Err(e) => {
                agent.shutdown(true).await;
                return Err(format!("cannot listen on {} for the API: {e}", config.api.bind));
            }
        };
        let address_file = config.data_dir.join(ADDRESS_FILE);
        let _ = std::fs::write(
            &address_file,
            serde_json::json!({ "api": addr.to_string() }).to_string(),
        );
        tracing::info!(api = %format!("http://{addr}/v1"), data_dir = %config.data_dir.display(), "agent running");
        let signal = wait_for_signal().await;
        tracing::info!(signal, "leaving and stopping");
        server.abort();
        agent.shutdown(true).await;
        let _ = std::fs::remove_file(&address_file);
        tracing::info!("stopped");
        Ok(())
    })
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM; returns its name.
pub async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
