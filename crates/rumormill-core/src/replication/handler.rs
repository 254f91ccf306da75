//! The application's say over incoming updates (Grapevine's handler).

use super::store::{Store, Update};

/// What to do with a batch of new updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store them all (those newer than what is stored win).
    AcceptAll,
    /// Store only the updates at these positions of the batch.
    AcceptSubset(Vec<usize>),
    /// Replace the whole store with these updates. They are checked
    /// against the quotas ([`super::Limits`]) in order, as received updates
    /// are: those that would take their writer or the store beyond them are
    /// left out and counted in `quota_refused` (or `luggage_refused`).
    Replace(Vec<Update>),
    /// Drop the batch and send the pusher no feedback, as if it never came.
    Ignore,
}

/// Decides, for every batch of updates that are news to this member, which
/// of them to keep. Called with the batch and the current store.
///
/// Any `FnMut(&[Update], &Store) -> Decision + Send` is a handler:
///
/// ```
/// use rumormill_core::replication::{Decision, Store, Update, UpdateHandler};
/// // Keep only keys under "public/".
/// let mut h = |batch: &[Update], _: &Store| {
///     Decision::AcceptSubset((0..batch.len()).filter(|&i| batch[i].key.starts_with("public/")).collect())
/// };
/// let batch = [Update { key: "secret".into(), value: None, lamport: 1, origin: "a".into(), epoch: 1, seq: 1 }];
/// assert_eq!(h.push(&batch, &Store::default()), Decision::AcceptSubset(vec![]));
/// ```
pub trait UpdateHandler: Send {
    /// Decides about `batch`, given what is stored.
    fn push(&mut self, batch: &[Update], stored: &Store) -> Decision;
}

impl<F: FnMut(&[Update], &Store) -> Decision + Send> UpdateHandler for F {
    fn push(&mut self, batch: &[Update], stored: &Store) -> Decision {
        self(batch, stored)
    }
}

/// The default handler: accept everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl UpdateHandler for AcceptAll {
    fn push(&mut self, _: &[Update], _: &Store) -> Decision {
        Decision::AcceptAll
    }
}
