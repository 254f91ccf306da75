//! A deterministic discrete-event simulator for Rumormill.
//!
//! [`Simulation`] drives many [`rumormill_core::Overlay`]s — the very code
//! the agent runs — over a [`NetworkModel`] with latency, loss, bandwidth and
//! partitions, crashing and restarting members on demand. Time is simulated
//! (a global `(time, sequence)` queue), all randomness comes from seeds, and
//! the core never sees a real clock or socket, so a run is reproducible bit
//! for bit.
//!
//! Experiments built on it:
//! - [`membership`]: failure detection speed, accuracy and cost;
//! - [`replication`]: how fast and how completely an update reaches
//!   everyone, and at what cost, with rumor mongering, anti-entropy or both;
//! - [`racks`]: members in racks over a topology, what crosses between
//!   racks and at what cost, against the same members in one flat overlay;
//! - [`epidemic`]: the synchronous models of Demers et al. (1987), the theory
//!   the replication protocols are compared against.
#![warn(missing_docs)]

mod engine;
pub mod epidemic;
pub mod membership;
mod network;
pub mod racks;
pub mod replication;

pub use engine::{Nanos, SimNode, Simulation, Traffic, member_addr, member_name, secs};
pub use network::{Link, NetworkModel};
