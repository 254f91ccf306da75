//! Racks: members talk across racks only through each rack's active
//! gateway, which the rack's candidates elect with Raft ([`election`]).

#[allow(dead_code)] // driven by the racks sub-machine
mod election;
pub(crate) mod routes;

#[allow(unused_imports)]
pub(crate) use election::{Election, raft_id};
pub use election::{ElectionTiming, RaftError, RaftRecord, RaftRole};
