//! Lifeguard's local health multiplier (LHM).
//!
//! A member that misses acks it should have received is more likely slow
//! itself than surrounded by failures. Its score rises when its probes fail
//! without the nacks that would show its own links work, and when it has to
//! refute a suspicion; it falls with each probe answered directly. Probe
//! interval and probe timeout are multiplied by `score + 1`, so a struggling
//! member probes less and waits longer instead of accusing healthy ones.

use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub(crate) struct Awareness {
    score: u32,
    max: u32,
}

impl Awareness {
    pub(crate) fn new(max: u32) -> Awareness {
        Awareness { score: 0, max }
    }

    pub(crate) fn apply(&mut self, delta: i64) {
        let s = i64::from(self.score) + delta;
        self.score = s.clamp(0, i64::from(self.max)) as u32;
    }

    pub(crate) fn score(&self) -> u32 {
        self.score
    }

    pub(crate) fn scale(&self, d: Duration) -> Duration {
        d * (self.score + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_bounded_and_scales_timeouts() {
        let mut a = Awareness::new(8);
        a.apply(-1);
        assert_eq!(a.score(), 0);
        a.apply(3);
        assert_eq!(a.scale(Duration::from_secs(1)), Duration::from_secs(4));
        a.apply(100);
        assert_eq!(a.score(), 8);
    }
}
