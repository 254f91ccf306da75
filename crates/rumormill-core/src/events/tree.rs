//! The relay tree: how an event reaches each subscriber of its topic with
//! one copy.
//!
//! Members sit on a ring at a 64-bit hash of their name
//! ([`ring_position`]). A relay is given a [`Span`] of the ring and the job
//! of reaching every subscriber in it: it takes the subscribers it knows in
//! the span, leaves itself out, cuts them into at most `k` runs of
//! neighbours ([`split`]), and sends the event to one member of each run,
//! chosen at random so that the relaying work spreads over the members,
//! with the run's part of the span. That member does the same. The
//! publisher starts with the whole ring, so a topic with `S` subscribers is
//! covered in `⌈log_k S⌉` hops with `S − 1` copies.
//!
//! Each relay leaves its own position out of the spans it hands down, so no
//! span ever holds one of the relays above it: a copy never goes back up
//! the tree.
//!
//! A copy sent in a datagram is acknowledged by its receiver (a relay
//! acknowledgement, whether or not it already had the event). Without one
//! after the hop timeout it is sent again, [`HOP_ATTEMPTS`] times in all;
//! then the relay takes the span back and splits it among the other
//! subscribers in it itself. A lost packet or a crashed relay costs a few
//! hop timeouts, not the subtree. A subscriber the relay does not know yet
//! (it joined a moment ago) is missed; at-least-once delivery resends to it.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

/// Copies of one hop sent before the relay takes its span back.
pub const HOP_ATTEMPTS: u32 = 3;

/// Relay hops awaiting acknowledgement at one member, at most; beyond, new
/// hops are sent without being tracked.
pub const MAX_HOPS: usize = 16_384;

/// A member's position on the ring: FNV-1a of its name, mixed so that
/// similar names spread over the ring.
pub fn ring_position(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// An inclusive range of ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First position.
    pub first: u64,
    /// Last position (at least `first`).
    pub last: u64,
}

impl Span {
    /// The whole ring: what the publisher relays.
    pub const WHOLE: Span = Span {
        first: 0,
        last: u64::MAX,
    };

    /// Whether `position` is in the span.
    pub fn contains(&self, position: u64) -> bool {
        self.first <= position && position <= self.last
    }
}

/// A member to relay to, with the span it takes care of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The member.
    pub name: Arc<str>,
    /// Its address.
    pub addr: SocketAddr,
    /// What it relays to.
    pub span: Span,
}

/// Cuts the `members` of `span` (those the relay knows, itself left out)
/// into at most `k` runs of neighbours on the ring, plus one when the
/// relay's own position `me` falls inside a run, and picks one member of
/// each run at random. The runs' spans cover `span` except `me`; a member
/// outside `span` is ignored.
pub fn split(
    span: Span,
    me: u64,
    members: impl IntoIterator<Item = (Arc<str>, SocketAddr)>,
    k: usize,
    rng: &mut impl Rng,
) -> Vec<Hop> {
    let mut placed: Vec<(u64, Arc<str>, SocketAddr)> = members
        .into_iter()
        .map(|(name, addr)| (ring_position(&name), name, addr))
        .filter(|(p, _, _)| span.contains(*p) && *p != me)
        .collect();
    placed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    placed.dedup_by(|a, b| a.1 == b.1);
    let m = placed.len();
    if m == 0 {
        return Vec::new();
    }
    // Runs of near-equal size; a cut never separates equal positions (a
    // span cannot), and the relay's own position is always a cut.
    let groups = k.clamp(1, m);
    let mut cuts: Vec<usize> = (1..groups).map(|g| g * m / groups).collect();
    if let Some(i) = placed.iter().position(|(p, _, _)| *p > me) {
        cuts.push(i);
    }
    cuts.retain(|&c| c > 0 && c < m && placed[c].0 != placed[c - 1].0);
    cuts.sort_unstable();
    cuts.dedup();
    let mut hops = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    let mut next_first = None;
    for end in cuts.into_iter().chain(std::iter::once(m)) {
        let run = &placed[start..end];
        let mut first = match next_first.take() {
            Some(f) => f,
            None if start == 0 => span.first,
            None => run[0].0,
        };
        let mut last = if end == m { span.last } else { placed[end].0 - 1 };
        // Leave our own position out. It is never among the run's members:
        // either before them (the first run) or after them, where the next
        // run takes over from the position after ours.
        if first <= me && me <= last {
            if me < run[0].0 {
                first = me + 1;
            } else {
                last = me - 1;
                if end < m {
                    next_first = Some(me + 1);
                }
            }
        }
        let (_, name, addr) = &run[rng.random_range(0..run.len())];
        hops.push(Hop {
            name: name.clone(),
            addr: *addr,
            span: Span { first, last },
        });
        start = end;
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::BTreeSet;

    fn members(n: usize) -> Vec<(Arc<str>, SocketAddr)> {
        (0..n)
            .map(|i| {
                (
                    Arc::from(format!("m{i}")),
                    SocketAddr::from(([10, 0, 0, 1], 7000 + i as u16)),
                )
            })
            .collect()
    }

    /// Relays down the tree from `root` and returns how often each member
    /// got a copy and the deepest hop.
    fn cover(all: &[(Arc<str>, SocketAddr)], root: &str, k: usize, seed: u64) -> (Vec<usize>, usize) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let index = |n: &str| all.iter().position(|(m, _)| &**m == n).unwrap();
        let mut copies = vec![0; all.len()];
        let mut queue = vec![(root.to_string(), Span::WHOLE, 0)];
        let mut depth = 0;
        while let Some((relay, span, d)) = queue.pop() {
            depth = depth.max(d);
            let others = all.iter().filter(|(n, _)| **n != *relay && **n != *root).cloned();
            for hop in split(span, ring_position(&relay), others, k, &mut rng) {
                assert!(span.contains(hop.span.first) && span.contains(hop.span.last));
                assert!(
                    !hop.span.contains(ring_position(&relay)),
                    "a span never holds its relay"
                );
                copies[index(&hop.name)] += 1;
                queue.push((hop.name.to_string(), hop.span, d + 1));
            }
        }
        (copies, depth)
    }

    #[test]
    fn every_member_gets_exactly_one_copy_in_log_k_hops() {
        for (n, k) in [(2, 4), (5, 4), (16, 4), (64, 4), (1000, 4), (1000, 8), (300, 2)] {
            let all = members(n);
            for seed in 0..5 {
                let (copies, depth) = cover(&all, "m0", k, seed);
                assert_eq!(copies[0], 0, "the publisher gets none");
                assert!(copies[1..].iter().all(|&c| c == 1), "n={n} k={k}: {copies:?}");
                // Cutting at the relay's own position can add a run, so
                // runs are at least half of the even split: depth is at
                // most ⌈log_{k/2+1} n⌉ + 1.
                let bound = ((n as f64).ln() / ((k / 2 + 1) as f64).ln()).ceil() as usize + 1;
                assert!(depth <= bound, "n={n} k={k}: depth {depth} > {bound}");
            }
        }
    }

    #[test]
    fn spans_partition_the_span_except_the_relay() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let all = members(40);
        let me = ring_position("m3");
        let hops = split(
            Span::WHOLE,
            me,
            all.iter().filter(|(n, _)| &**n != "m3").cloned(),
            4,
            &mut rng,
        );
        assert!((4..=5).contains(&hops.len()), "{} runs", hops.len());
        let mut spans: Vec<Span> = hops.iter().map(|h| h.span).collect();
        spans.sort_by_key(|s| s.first);
        let mut gaps = Vec::new();
        let mut next = 0u64;
        for s in &spans {
            if s.first != next {
                gaps.push((next, s.first));
            }
            next = s.last.wrapping_add(1);
        }
        if next != 0 {
            gaps.push((next, u64::MAX));
        }
        // The only position left out is ours.
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(
            gaps[0] == (me, me + 1) || gaps[0] == (me, u64::MAX) && me == u64::MAX,
            "{gaps:?}"
        );
        let names: BTreeSet<&str> = hops.iter().map(|h| &*h.name).collect();
        assert_eq!(names.len(), hops.len(), "one member per run");
    }

    #[test]
    fn members_outside_the_span_and_the_relay_are_ignored() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let all = members(10);
        let positions: Vec<u64> = all.iter().map(|(n, _)| ring_position(n)).collect();
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        let span = Span {
            first: sorted[2],
            last: sorted[5],
        };
        let hops = split(span, sorted[3], all.clone(), 8, &mut rng);
        let got: BTreeSet<u64> = hops.iter().map(|h| ring_position(&h.name)).collect();
        assert_eq!(got, BTreeSet::from([sorted[2], sorted[4], sorted[5]]));
        assert!(split(span, 0, Vec::new(), 4, &mut rng).is_empty());
    }
}
