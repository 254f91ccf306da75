//! Rumormill's protocol core, free of I/O.
//!
//! An [`Overlay`] is one member's view of one gossip group. It is a plain
//! state machine in the style of quinn-proto: the caller hands it datagrams,
//! stream frames, the time and a seed for its RNG, and drains what it wants
//! done:
//!
//! - inputs: [`Overlay::handle_datagram`], [`Overlay::handle_stream`],
//!   [`Overlay::handle_timeout`] and API calls ([`Overlay::join`],
//!   [`Overlay::leave`], key rotation…);
//! - outputs: [`Overlay::poll_transmit`] (a datagram or stream frame and its
//!   destination), [`Overlay::poll_notification`] (membership changes) and
//!   [`Overlay::poll_timeout`] (when to call `handle_timeout` next).
//!
//! The same code runs in the agent, in the simulator and in tests: given the
//! same inputs and seed it produces the same outputs, bit for bit.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use rumormill_core::{Config, Notification, Identity, MemberChange, Overlay, Security};
//!
//! let now = Instant::now();
//! let id = |n: &str, port| Identity::new(n, format!("127.0.0.1:{port}").parse().unwrap(), 1);
//! let mut a = Overlay::new(Config::new_lan(), id("a", 7001), Security::Plaintext, 1, now);
//! let mut b = Overlay::new(Config::new_lan(), id("b", 7002), Security::Plaintext, 2, now);
//! b.join(now, &["127.0.0.1:7001".parse().unwrap()])?;
//! // Shuttle packets between the two until both are quiet.
//! for _ in 0..4 {
//!     while let Some(t) = b.poll_transmit() { a.handle(now, b.local_addr(), t.kind, &t.payload); }
//!     while let Some(t) = a.poll_transmit() { b.handle(now, a.local_addr(), t.kind, &t.payload); }
//! }
//! assert!(matches!(a.poll_notification(), Some(Notification::Member { change: MemberChange::Joined, .. })));
//! assert_eq!(a.member("b").unwrap().incarnation, 0);
//! # Ok::<(), rumormill_core::CoreError>(())
//! ```
#![warn(missing_docs)]

mod config;
pub mod events;
pub mod keys;
pub mod luggage;
mod membership;
mod notification;
mod overlay;
pub mod racks;
pub mod replication;
pub mod reserved;
mod wall;

pub use config::Config;
pub use membership::{MemberInfo, MemberState};
pub use notification::{MemberChange, Notification};
pub use overlay::{CoreError, Identity, Overlay, Stats, Transmit};
pub use rumormill_wire::{FrameKind, KeyId, KeyInfo, Keyring, Security, WireError};
pub use wall::WallTime;

#[cfg(test)]
mod testkit;
