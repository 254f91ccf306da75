//! One module per subcommand.
pub mod agent;
pub mod client;
pub mod demo;
pub mod sim;
