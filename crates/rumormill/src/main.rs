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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    };
    if let Err(e) = result {
        eprintln!("rumormill: {e}");
        std::process::exit(1);
    }
}
