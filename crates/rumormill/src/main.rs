//! `rumormill`: the Rumormill command-line tool.
//!
//! Errors are printed as one line on standard error and the process exits
//! with status 1 (2 for command-line usage errors, from clap).

mod commands;

use clap::{Parser, Subcommand};

/// Rumormill: gossip middleware — membership, failure detection and
/// dissemination for clusters.
#[derive(Debug, Parser)]
#[command(name = "rumormill", version, about, propagate_version = true)]
struct Cli {
    /// Data directory of the agent [default: ~/.local/share/rumormill].
    #[arg(long, global = true, env = "RUMORMILL_DATA_DIR", value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    target: commands::client::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent until SIGINT/SIGTERM (then leaves gracefully).
    Agent(commands::agent::AgentArgs),
    /// Starts a local cluster in this process and shows it working.
    Demo(commands::demo::DemoArgs),
    /// Prints a new random encryption key (base64, 32 bytes).
    Keygen,
    #[command(flatten)]
    Client(commands::client::ClientCommand),
    /// Run protocol experiments in the deterministic simulator.
    #[command(subcommand)]
    Sim(commands::sim::SimCommand),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One readable line: clap's first line, without its usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("rumormill: {} (see --help)", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Sim(cmd) => commands::sim::run(cmd),
        Command::Agent(args) => commands::agent::run(args, cli.data_dir),
        Command::Demo(args) => commands::demo::run(args),
        Command::Keygen => {
            println!("{}", rumormill::config::generate_key());
            Ok(())
        }
        Command::Client(cmd) => {
            let dir = cli.data_dir.unwrap_or_else(rumormill::config::default_data_dir);
            commands::client::run(cmd, cli.target, dir)
        }
    };
    if let Err(e) = result {
        eprintln!("rumormill: {e}");
        std::process::exit(1);
    }
}
