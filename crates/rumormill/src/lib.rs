//! The Rumormill agent as a library: configuration, persistence, the tokio
//! driver around the sans-IO core, transports, discovery, the HTTP control
//! API and its client. The `rumormill` binary is a thin command line over it.
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod discovery;
pub mod driver;
pub mod events;
pub(crate) mod inbox;
pub mod keyring;
pub(crate) mod persist;
pub mod transport;
