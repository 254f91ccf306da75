//! Lifeguard's suspicion timeout.
//!
//! A suspicion starts with the longest timeout. Each independent
//! confirmation (another member whose own probe failed) shrinks it
//! logarithmically towards the minimum, reached after `k` confirmations:
//!
//! `timeout(c) = max(min, max − (max − min) · ln(c + 1) / ln(k + 1))`
//!
//! so that a truly failed member is declared quickly when many agree, while
//! a single slow or lossy observer cannot fail anyone fast.
//!
//! While it lasts, the suspecting member also checks on the suspect itself
//! (2, 4, 8, … probe periods after it started): a ping that carries the
//! suspicion. A suspect that already refuted answers with its new
//! incarnation, so a member that missed every copy of the refutation — the
//! tail of the epidemic — does not fail a healthy member.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct Suspicion {
    pub(crate) epoch: u64,
    pub(crate) incarnation: u32,
    start: Instant,
    min: Duration,
    max: Duration,
    k: u32,
    confirmations: BTreeSet<Arc<str>>,
    pub(crate) deadline: Instant,
    /// When to check on the suspect directly next.
    pub(crate) next_check: Instant,
    checks: u32,
}

impl Suspicion {
    /// `first` is the member whose suspicion started this one; it does not
    /// count as a confirmation.
    pub(crate) fn new(
        now: Instant,
        version: (u64, u32),
        first: Arc<str>,
        k: u32,
        (min, max): (Duration, Duration),
        check_after: Duration,
    ) -> Suspicion {
        let mut confirmations = BTreeSet::new();
        confirmations.insert(first);
        let deadline = now + if k == 0 { min } else { max };
        Suspicion {
            epoch: version.0,
            incarnation: version.1,
            start: now,
            min,
            max,
            k,
            confirmations,
            deadline,
            next_check: now + check_after,
            checks: 0,
        }
    }

    /// Records a direct check; the next one comes twice as late.
    pub(crate) fn checked(&mut self, now: Instant, base: Duration) {
        self.checks += 1;
        self.next_check = now + base * 2u32.saturating_pow(self.checks);
    }

    /// Records a suspicion from `from`; returns true if it is a new,
    /// independent confirmation (and the deadline may have moved closer).
    pub(crate) fn confirm(&mut self, from: Arc<str>) -> bool {
        if self.confirmations.len() as u32 > self.k || !self.confirmations.insert(from) {
            return false;
        }
        let c = (self.confirmations.len() - 1) as f64;
        let frac = (c + 1.0).ln() / (f64::from(self.k) + 1.0).ln();
        let span = self.max.saturating_sub(self.min);
        let timeout = self.max.saturating_sub(span.mul_f64(frac.min(1.0))).max(self.min);
        self.deadline = self.start + timeout;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_shrink_the_timeout_to_the_minimum() {
        let t0 = Instant::now();
        let (min, max) = (Duration::from_secs(8), Duration::from_secs(48));
        let mut s = Suspicion::new(t0, (1, 0), "a".into(), 2, (min, max), min);
        assert_eq!(s.deadline, t0 + max);
        assert!(!s.confirm("a".into()), "the first suspecter is not a confirmation");
        assert!(s.confirm("b".into()));
        let after_one = s.deadline - t0;
        assert!(after_one < max && after_one > min, "{after_one:?}");
        assert!(!s.confirm("b".into()), "the same member twice is not independent");
        assert!(s.confirm("c".into()));
        assert_eq!(s.deadline, t0 + min);
        assert!(!s.confirm("d".into()), "beyond k nothing changes");
        assert_eq!(s.deadline, t0 + min);
    }

    #[test]
    fn with_no_expected_confirmations_the_minimum_applies_at_once() {
        let t0 = Instant::now();
        let timeouts = (Duration::from_secs(4), Duration::from_secs(24));
        let s = Suspicion::new(t0, (1, 0), "a".into(), 0, timeouts, Duration::from_secs(2));
        assert_eq!(s.deadline, t0 + Duration::from_secs(4));
    }

    #[test]
    fn direct_checks_back_off_exponentially() {
        let t0 = Instant::now();
        let base = Duration::from_secs(1);
        let timeouts = (Duration::from_secs(8), Duration::from_secs(48));
        let mut s = Suspicion::new(t0, (1, 0), "a".into(), 2, timeouts, base * 2);
        assert_eq!(s.next_check, t0 + base * 2);
        s.checked(t0 + base * 2, base);
        assert_eq!(s.next_check, t0 + base * 4);
        s.checked(t0 + base * 4, base);
        assert_eq!(s.next_check, t0 + base * 8);
    }
}
