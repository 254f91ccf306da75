//! Which events a member has already handed to its application, so that
//! at-least-once on the wire is once at the application.
//!
//! Per publisher life (name, boot epoch): every sequence number up to a
//! floor, plus the ones seen above it. The floor moves over contiguous
//! numbers, and up to what the publisher says is final (its pending floor,
//! carried by every event). With [`WINDOW`] numbers above the floor, new
//! ones are refused ([`Insert::Full`]: not delivered, not acknowledged, so
//! resent later) rather than letting the floor jump over a gap that may
//! still be filled. At most [`MAX_ORIGINS`] publisher lives are remembered;
//! the least recently active is forgotten first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Sequence numbers remembered above the floor, per publisher life.
pub const WINDOW: usize = 4096;
/// Publisher lives remembered.
pub const MAX_ORIGINS: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Window {
    floor: u64,
    above: BTreeSet<u64>,
    touched: u64,
}

impl Window {
    /// Moves the floor over contiguous numbers.
    fn settle(&mut self) {
        let floor = self.floor;
        self.above.retain(|&s| s > floor);
        while self.above.first() == Some(&(self.floor + 1)) {
            self.floor += 1;
            self.above.pop_first();
        }
    }
}

/// What [`Dedup::insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Not seen before: recorded.
    New,
    /// Seen before.
    Seen,
    /// Not seen, but the window is full: not recorded.
    Full,
}

/// The de-duplication window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dedup {
    lives: BTreeMap<(Arc<str>, u64), Window>,
    clock: u64,
}

/// One publisher life's window, for saving and restoring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupEntry {
    /// Publisher.
    pub origin: Arc<str>,
    /// Its boot epoch.
    pub epoch: u64,
    /// Every sequence number up to this one was seen.
    pub floor: u64,
    /// Sequence numbers seen above the floor.
    pub above: Vec<u64>,
}

impl Dedup {
    /// Records `(origin, epoch, seq)`.
    pub fn insert(&mut self, origin: &Arc<str>, epoch: u64, seq: u64) -> Insert {
        self.clock += 1;
        let clock = self.clock;
        if !self.lives.contains_key(&(origin.clone(), epoch)) && self.lives.len() >= MAX_ORIGINS {
            if let Some(oldest) = self.lives.iter().min_by_key(|(_, w)| w.touched).map(|(k, _)| k.clone()) {
                self.lives.remove(&oldest);
            }
        }
        let w = self.lives.entry((origin.clone(), epoch)).or_default();
        w.touched = clock;
        if seq <= w.floor || w.above.contains(&seq) {
            return Insert::Seen;
        }
        if w.above.len() >= WINDOW && seq != w.floor + 1 {
            return Insert::Full;
        }
        w.above.insert(seq);
        w.settle();
        Insert::New
    }

    /// Everything of `(origin, epoch)` up to `floor` is final at its
    /// publisher: it counts as seen.
    pub fn advance(&mut self, origin: &Arc<str>, epoch: u64, floor: u64) {
        if let Some(w) = self.lives.get_mut(&(origin.clone(), epoch)) {
            if floor > w.floor {
                w.floor = floor;
                w.settle();
            }
        }
    }

    /// Forgets that `(origin, epoch, seq)` was seen, so that it counts as
    /// new when it comes again. Numbers more than [`WINDOW`] below the
    /// floor cannot be forgotten (false).
    pub fn forget(&mut self, origin: &Arc<str>, epoch: u64, seq: u64) -> bool {
        let Some(w) = self.lives.get_mut(&(origin.clone(), epoch)) else {
            return true;
        };
        if w.above.remove(&seq) {
            return true;
        }
        if seq == 0 || seq > w.floor {
            return true;
        }
        if w.floor - seq >= WINDOW as u64 {
            return false;
        }
        w.above.extend(seq + 1..=w.floor);
        w.floor = seq - 1;
        true
    }

    /// Whether `(origin, epoch, seq)` was seen.
    pub fn contains(&self, origin: &str, epoch: u64, seq: u64) -> bool {
        self.lives
            .iter()
            .find(|((o, e), _)| &**o == origin && *e == epoch)
            .is_some_and(|(_, w)| seq <= w.floor || w.above.contains(&seq))
    }

    /// The window, for saving.
    pub fn entries(&self) -> Vec<DedupEntry> {
        self.lives
            .iter()
            .map(|((origin, epoch), w)| DedupEntry {
                origin: origin.clone(),
                epoch: *epoch,
                floor: w.floor,
                above: w.above.iter().copied().collect(),
            })
            .collect()
    }

    /// Adds saved entries (after a restart).
    pub fn restore(&mut self, entries: impl IntoIterator<Item = DedupEntry>) {
        for e in entries {
            let w = self.lives.entry((e.origin, e.epoch)).or_default();
            w.floor = w.floor.max(e.floor);
            w.above.extend(e.above);
            w.settle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_new_once_in_any_order() {
        let mut d = Dedup::default();
        let a: Arc<str> = "a".into();
        assert_eq!(d.insert(&a, 1, 2), Insert::New);
        assert_eq!(d.insert(&a, 1, 1), Insert::New);
        assert_eq!(d.insert(&a, 1, 1), Insert::Seen);
        assert_eq!(d.insert(&a, 1, 2), Insert::Seen);
        assert_eq!(d.insert(&a, 2, 1), Insert::New, "another life of the same publisher");
        assert!(d.contains("a", 1, 2) && !d.contains("a", 1, 3));
    }

    #[test]
    fn a_full_window_refuses_instead_of_skipping_a_gap() {
        let mut d = Dedup::default();
        let a: Arc<str> = "a".into();
        // 1 is missing; 2..=WINDOW+1 arrive.
        for s in 2..=(WINDOW as u64 + 1) {
            assert_eq!(d.insert(&a, 1, s), Insert::New);
        }
        assert_eq!(
            d.insert(&a, 1, WINDOW as u64 + 2),
            Insert::Full,
            "refused, to be resent later"
        );
        assert_eq!(d.insert(&a, 1, 1), Insert::New, "the gap is still open");
        assert_eq!(d.insert(&a, 1, WINDOW as u64 + 2), Insert::New, "room again");
        let saved = d.entries();
        let mut restored = Dedup::default();
        restored.restore(saved);
        for s in 1..=(WINDOW as u64 + 2) {
            assert_eq!(
                restored.insert(&a, 1, s),
                Insert::Seen,
                "{s} delivered twice after a restore"
            );
        }
    }

    #[test]
    fn the_publishers_floor_frees_the_window() {
        let mut d = Dedup::default();
        let a: Arc<str> = "a".into();
        for s in 2..=(WINDOW as u64 + 1) {
            d.insert(&a, 1, s);
        }
        // The publisher says 1 is final (reported, never coming): forget it.
        d.advance(&a, 1, 1);
        assert_eq!(d.insert(&a, 1, WINDOW as u64 + 2), Insert::New);
        assert_eq!(d.insert(&a, 1, 1), Insert::Seen);
    }

    #[test]
    fn publisher_lives_are_bounded() {
        let mut d = Dedup::default();
        for i in 0..(MAX_ORIGINS + 5) {
            let o: Arc<str> = format!("p{i}").into();
            assert_eq!(d.insert(&o, 1, 1), Insert::New);
        }
        assert_eq!(d.entries().len(), MAX_ORIGINS);
        assert!(!d.contains("p0", 1, 1), "the least recent life is forgotten");
    }
}
