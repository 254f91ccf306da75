//! Which events a member has already handed to its application, so that
//! at-least-once on the wire is once at the application.
//!
//! Per publisher life (name, boot epoch): every sequence number up to a
//! floor, plus the ones seen above it. Above [`WINDOW`] pending gaps the
//! floor moves up (an event older than the window is taken as seen: it is
//! dropped, never delivered twice). At most [`MAX_ORIGINS`] publisher lives
//! are remembered; the least recently active is forgotten first.

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
    /// Moves the floor over contiguous numbers, and up when too many gaps
    /// are pending.
    fn settle(&mut self) {
        let floor = self.floor;
        self.above.retain(|&s| s > floor);
        loop {
            while self.above.first() == Some(&(self.floor + 1)) {
                self.floor += 1;
                self.above.pop_first();
            }
            if self.above.len() <= WINDOW {
                return;
            }
            if let Some(s) = self.above.pop_first() {
                self.floor = s;
            }
        }
    }
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
    /// Records `(origin, epoch, seq)`; true if it was not seen before.
    pub fn insert(&mut self, origin: &Arc<str>, epoch: u64, seq: u64) -> bool {
        self.clock += 1;
        let clock = self.clock;
        if !self.lives.contains_key(&(origin.clone(), epoch)) && self.lives.len() >= MAX_ORIGINS {
            if let Some(oldest) = self.lives.iter().min_by_key(|(_, w)| w.touched).map(|(k, _)| k.clone()) {
                self.lives.remove(&oldest);
            }
        }
        let w = self.lives.entry((origin.clone(), epoch)).or_default();
        w.touched = clock;
        if seq <= w.floor || !w.above.insert(seq) {
            return false;
        }
        w.settle();
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
        assert!(d.insert(&a, 1, 2));
        assert!(d.insert(&a, 1, 1));
        assert!(!d.insert(&a, 1, 1));
        assert!(!d.insert(&a, 1, 2));
        assert!(d.insert(&a, 2, 1), "another life of the same publisher");
        assert!(d.contains("a", 1, 2) && !d.contains("a", 1, 3));
    }

    #[test]
    fn the_window_is_bounded_and_survives_a_save() {
        let mut d = Dedup::default();
        let a: Arc<str> = "a".into();
        // Every other number: the gaps pile up above the floor.
        for s in (2..=2 * (WINDOW as u64 + 10)).step_by(2) {
            assert!(d.insert(&a, 1, s));
        }
        let e = &d.entries()[0];
        assert!(e.above.len() <= WINDOW, "{}", e.above.len());
        assert!(!d.insert(&a, 1, 1), "below the moved floor: taken as seen");
        let mut restored = Dedup::default();
        restored.restore(d.entries());
        for s in (2..=2 * (WINDOW as u64 + 10)).step_by(2) {
            assert!(!restored.insert(&a, 1, s), "{s} delivered twice after a restore");
        }
    }

    #[test]
    fn publisher_lives_are_bounded() {
        let mut d = Dedup::default();
        for i in 0..(MAX_ORIGINS + 5) {
            let o: Arc<str> = format!("p{i}").into();
            d.insert(&o, 1, 1);
        }
        assert_eq!(d.entries().len(), MAX_ORIGINS);
        assert!(!d.contains("p0", 1, 1), "the least recent life is forgotten");
    }
}
