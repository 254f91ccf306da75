//! Wall-clock time, an input like `now`.
//!
//! The core never reads a clock. Two rules need the time of day, though:
//! the write clock (a restarted member's writes must order after those of
//! its previous life, which a fresh Lamport clock alone would not do), and
//! key rotation (a desired keyring more than a day ahead of the member's
//! clock is refused). So every write through the [`crate::Overlay`] takes
//! the caller's reading, a [`WallTime`]: a new write path cannot forget it,
//! the compiler asks for it. The overlay remembers the latest reading with
//! the `now` it came with ([`WallClock`]), and for what it does on receipt
//! — following a desired keyring, reporting its keys — reads the wall
//! clock as that reading plus the time elapsed since.

use std::time::{Duration, Instant, SystemTime};

/// A reading of the wall clock: milliseconds since the UNIX epoch.
///
/// ```
/// use rumormill_core::WallTime;
/// let t = WallTime::from_unix_ms(1_800_000_000_000);
/// assert_eq!(t.saturating_add(std::time::Duration::from_secs(1)).as_unix_ms(), 1_800_000_001_000);
/// assert!(WallTime::from(std::time::SystemTime::UNIX_EPOCH) < t);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WallTime(u64);

impl WallTime {
    /// The time `ms` milliseconds after the UNIX epoch.
    pub const fn from_unix_ms(ms: u64) -> WallTime {
        WallTime(ms)
    }

    /// Milliseconds since the UNIX epoch.
    pub const fn as_unix_ms(self) -> u64 {
        self.0
    }

    /// `d` later, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> WallTime {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        WallTime(self.0.saturating_add(ms))
    }
}

impl From<SystemTime> for WallTime {
    /// A clock set before 1970 reads as the epoch.
    fn from(t: SystemTime) -> WallTime {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        WallTime(ms)
    }
}

/// The latest wall-clock reading the caller gave, and when.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WallClock {
    last: Option<(WallTime, Instant)>,
}

impl WallClock {
    /// Takes a reading given with an input at `now`. A reading behind the
    /// estimate (the clock was set back) is taken as it is: the caller's
    /// clock is the authority, the write clock itself never goes back.
    pub(crate) fn observe(&mut self, now: Instant, wall: WallTime) {
        self.last = Some((wall, now));
    }

    /// The wall clock at `now`: the latest reading plus the time elapsed
    /// since; `None` before any reading.
    pub(crate) fn read(&self, now: Instant) -> Option<WallTime> {
        let (wall, at) = self.last?;
        Some(wall.saturating_add(now.saturating_duration_since(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_on_from_the_latest_reading() {
        let t0 = Instant::now();
        let mut c = WallClock::default();
        assert_eq!(c.read(t0), None);
        c.observe(t0, WallTime::from_unix_ms(1_000));
        assert_eq!(
            c.read(t0 + Duration::from_millis(250)),
            Some(WallTime::from_unix_ms(1_250))
        );
        // A reading before the last `now` (out of order) does not run backwards in elapsed time.
        assert_eq!(
            c.read(t0 - Duration::from_millis(5)),
            Some(WallTime::from_unix_ms(1_000))
        );
        c.observe(t0 + Duration::from_secs(1), WallTime::from_unix_ms(500));
        assert_eq!(c.read(t0 + Duration::from_secs(2)), Some(WallTime::from_unix_ms(1_500)));
    }
}
