//! Racks: members talk across racks only through each rack's active
//! gateway.

pub(crate) mod routes;
