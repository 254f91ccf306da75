use std::collections::BTreeMap;

use crate::error::WireError;
use crate::header::{FrameKind, Header};

/// How many counters behind the newest one a packet may arrive and still be
/// accepted (once).
pub const REPLAY_WINDOW: u64 = 1024;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;
const MAX_SENDERS: usize = 1 << 16;
/// Lives of one sender at one epoch tracked at once (more than one only when
/// an epoch was lost or a name is shared).
const LIVES_PER_EPOCH: usize = 4;

/// A sliding-window bitmap of the counters seen from one sender (as in
/// IPsec and WireGuard).
#[derive(Debug, Clone, Default)]
struct Window {
    /// One past the highest counter accepted; 0 when none was.
    top: u64,
    bits: [u64; WORDS],
}

impl Window {
    fn bit(counter: u64) -> (usize, u64) {
        let i = counter % REPLAY_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn fresh(&self, counter: u64) -> bool {
        if counter >= self.top {
            return true;
        }
        if self.top - counter > REPLAY_WINDOW {
            return false;
        }
        let (w, m) = Window::bit(counter);
        self.bits[w] & m == 0
    }

    fn mark(&mut self, counter: u64) {
        // `top` is one past the highest counter, so u64::MAX cannot be
        // recorded. `ReplayGuard::check` refuses it.
        if counter == u64::MAX {
            return;
        }
        if counter >= self.top {
            if counter - self.top >= REPLAY_WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in self.top..counter {
                    let (w, m) = Window::bit(c);
                    self.bits[w] &= !m;
                }
            }
            self.top = counter + 1;
        }
        let (w, m) = Window::bit(counter);
        self.bits[w] |= m;
    }
}

/// The windows of one life: one salt.
#[derive(Debug, Clone, Default)]
struct LifeWindows {
    salt: u64,
    datagram: Window,
    stream: Window,
}

impl LifeWindows {
    fn window(&mut self, kind: FrameKind) -> &mut Window {
        match kind {
            FrameKind::Datagram => &mut self.datagram,
            FrameKind::Stream => &mut self.stream,
        }
    }
}

/// The newest epoch heard from a sender, and the lives seen at it, the most
/// recently heard last.
#[derive(Debug, Clone, Default)]
struct SenderWindows {
    epoch: u64,
    lives: Vec<LifeWindows>,
}

/// Rejects packets that were already accepted, or that come from an older
/// boot epoch of a sender than one already heard. Datagrams and stream frames
/// are tracked apart, since a large frame may be overtaken by many datagrams.
/// Lives of one epoch are told apart by their salt; up to four are tracked
/// at once (a lost epoch, a shared name), the one heard least recently
/// forgotten first.
///
/// Check with [`ReplayGuard::check`] before decrypting and record with
/// [`ReplayGuard::accept`] only after authentication succeeded, so forged
/// packets cannot move the window.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    senders: BTreeMap<u64, SenderWindows>,
}

impl ReplayGuard {
    /// Returns an error if the packet described by `h` must be rejected.
    pub fn check(&self, h: &Header) -> Result<(), WireError> {
        // Senders never use the last counter (theirs is exhausted first), and
        // a window cannot record it: refuse it outright.
        if h.counter == u64::MAX {
            return Err(WireError::Replay { sender: h.sender_id });
        }
        let Some(s) = self.senders.get(&h.sender_id) else {
            return Ok(());
        };
        let fresh = match h.epoch.cmp(&s.epoch) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => match s.lives.iter().find(|l| l.salt == h.salt) {
                None => true,
                Some(life) => match h.kind {
                    FrameKind::Datagram => life.datagram.fresh(h.counter),
                    FrameKind::Stream => life.stream.fresh(h.counter),
                },
            },
        };
        if fresh {
            Ok(())
        } else {
            Err(WireError::Replay { sender: h.sender_id })
        }
    }

    /// Records an authenticated packet.
    pub fn accept(&mut self, h: &Header) {
        if !self.senders.contains_key(&h.sender_id) && self.senders.len() >= MAX_SENDERS {
            // Only authenticated senders get here; forget the oldest-keyed one.
            self.senders.pop_first();
        }
        let s = self.senders.entry(h.sender_id).or_default();
        if h.epoch > s.epoch || s.lives.is_empty() {
            *s = SenderWindows {
                epoch: h.epoch,
                lives: Vec::new(),
            };
        } else if h.epoch < s.epoch {
            return;
        }
        let mut life = match s.lives.iter().position(|l| l.salt == h.salt) {
            Some(i) => s.lives.remove(i),
            None => {
                if s.lives.len() >= LIVES_PER_EPOCH {
                    s.lives.remove(0);
                }
                LifeWindows {
                    salt: h.salt,
                    ..Default::default()
                }
            }
        };
        life.window(h.kind).mark(h.counter);
        s.lives.push(life);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(epoch: u64, counter: u64) -> Header {
        Header {
            suite: 1,
            kind: FrameKind::Datagram,
            overlay_id: 0,
            key_id: 1,
            sender_id: 9,
            epoch,
            salt: 1,
            counter,
        }
    }

    fn take(g: &mut ReplayGuard, p: Header) -> bool {
        let ok = g.check(&p).is_ok();
        if ok {
            g.accept(&p);
        }
        ok
    }

    #[test]
    fn each_counter_is_accepted_once_even_out_of_order() {
        let mut g = ReplayGuard::default();
        for c in [5, 3, 4, 0, 100, 99] {
            assert!(take(&mut g, h(1, c)), "first sight of {c}");
        }
        for c in [5, 3, 4, 0, 100, 99] {
            assert!(!take(&mut g, h(1, c)), "replay of {c}");
        }
        assert!(take(&mut g, h(1, 50)));
    }

    #[test]
    fn counters_older_than_the_window_are_rejected() {
        let mut g = ReplayGuard::default();
        assert!(take(&mut g, h(1, 5000)));
        assert!(!take(&mut g, h(1, 5000 - REPLAY_WINDOW - 1)));
        assert!(take(&mut g, h(1, 5000 - REPLAY_WINDOW + 1)));
    }

    #[test]
    fn a_new_epoch_resets_and_an_old_epoch_is_stale() {
        let mut g = ReplayGuard::default();
        assert!(take(&mut g, h(1, 10)));
        assert!(take(&mut g, h(2, 0)));
        assert!(!take(&mut g, h(1, 11)), "older epoch after a newer one");
        assert!(!take(&mut g, h(2, 0)));
    }

    #[test]
    fn lives_of_one_epoch_have_windows_of_their_own() {
        let mut g = ReplayGuard::default();
        let salted = |salt, counter| Header { salt, ..h(1, counter) };
        assert!(take(&mut g, salted(1, 7)));
        assert!(take(&mut g, salted(2, 7)), "another life at the same epoch");
        assert!(!take(&mut g, salted(1, 7)));
        assert!(!take(&mut g, salted(2, 7)));
        // Four lives are remembered; a fifth forgets the least recently heard.
        for salt in 3..=5 {
            assert!(take(&mut g, salted(salt, 0)));
        }
        assert!(!take(&mut g, salted(5, 0)));
        assert!(take(&mut g, salted(1, 7)), "life 1 was forgotten first");
        // A newer epoch still makes every life of the old one stale.
        assert!(take(&mut g, Header { salt: 9, ..h(2, 0) }));
        assert!(!take(&mut g, salted(2, 8)));
    }

    #[test]
    fn stream_and_datagram_counters_are_separate_windows() {
        let mut g = ReplayGuard::default();
        assert!(take(&mut g, h(1, 3000)));
        let mut s = h(1, 1);
        s.kind = FrameKind::Stream;
        assert!(take(&mut g, s), "an old stream counter is fine after many datagrams");
        assert!(!take(&mut g, s));
    }

    #[test]
    fn the_largest_counter_is_never_accepted_and_never_overflows() {
        let mut g = ReplayGuard::default();
        assert!(g.check(&h(1, u64::MAX)).is_err());
        // Recording it anyway (the guard is public) must neither panic nor
        // reset the window.
        g.accept(&h(1, u64::MAX));
        assert!(take(&mut g, h(1, u64::MAX - 1)));
        assert!(!take(&mut g, h(1, u64::MAX - 1)));
        assert!(g.check(&h(1, u64::MAX)).is_err());
    }
}
