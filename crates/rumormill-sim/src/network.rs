//! The modelled network: latency, loss, bandwidth, racks and partitions.

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// How the simulated network treats packets.
///
/// Datagrams are lost independently with probability `loss` and delayed by
/// `latency_min + Exp(latency_mean − latency_min)`: a floor (the wire and the
/// kernels) plus an exponential tail (queues). Stream frames are never lost
/// (a stream retransmits) but take two latencies plus their size over the
/// bandwidth. A partition drops everything between groups.
///
/// ```
/// let mut net = rumormill_sim::NetworkModel::lan(0.05);
/// net.partition(vec![0, 0, 1, 1]);
/// assert!(!net.connected(0, 2));
/// net.heal();
/// assert!(net.connected(0, 2));
/// ```
///
/// Members can also be placed in racks ([`NetworkModel::with_racks`]): then
/// the latency and loss of a packet depend on the racks of its two ends,
/// while `loss`, `latency_min` and `latency_mean` stay what applies inside a
/// rack (and to members placed in none).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkModel {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Smallest one-way latency, in seconds.
    pub latency_min: f64,
    /// Mean one-way latency, in seconds.
    pub latency_mean: f64,
    /// Bytes per second a stream carries.
    pub bandwidth: f64,
    groups: Option<Vec<u32>>,
    topology: Option<Topology>,
}

/// The latency and loss of the path between two members.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Smallest one-way latency, in seconds.
    pub latency_min: f64,
    /// Mean one-way latency, in seconds.
    pub latency_mean: f64,
}

impl Link {
    /// A path with this loss, latency floor and mean latency (seconds).
    ///
    /// ```
    /// // 30 ms floor, 35 ms mean, 1% loss: a link between two sites.
    /// let wan = rumormill_sim::Link::new(0.01, 0.030, 0.035);
    /// assert_eq!(wan.latency_mean, 0.035);
    /// ```
    pub fn new(loss: f64, latency_min: f64, latency_mean: f64) -> Link {
        Link {
            loss,
            latency_min,
            latency_mean,
        }
    }
}

/// Where members stand: a rack per member, and the links inside and between
/// racks.
#[derive(Debug, Clone, PartialEq)]
struct Topology {
    racks: Vec<u32>,
    /// Links between two different racks, keyed by (lower, higher) rack.
    between: BTreeMap<(u32, u32), Link>,
    /// The link between racks not named in `between`.
    between_default: Link,
    /// Links inside a rack that differ from the model's own.
    inside: BTreeMap<u32, Link>,
}

impl NetworkModel {
    /// A LAN: 0.1 ms floor, 0.5 ms mean one-way latency, 1 Gbit/s streams.
    pub fn lan(loss: f64) -> NetworkModel {
        NetworkModel {
            loss,
            latency_min: 0.000_1,
            latency_mean: 0.000_5,
            bandwidth: 125e6,
            groups: None,
            topology: None,
        }
    }

    /// Places member `i` in rack `racks[i]` (members beyond the vector's
    /// end are in no rack). Inside a rack packets keep the model's own
    /// latency and loss; between two racks they take `between`.
    ///
    /// ```
    /// use rumormill_sim::{Link, NetworkModel};
    /// // Two racks of two members, 80 ms apart.
    /// let net = NetworkModel::lan(0.0).with_racks(vec![0, 0, 1, 1], Link::new(0.01, 0.072, 0.080));
    /// assert_eq!(net.rack_of(2), Some(1));
    /// assert!(net.crosses_racks(0, 2));
    /// assert!(!net.crosses_racks(2, 3));
    /// assert_eq!(net.link(0, 3).latency_mean, 0.080);
    /// assert_eq!(net.link(0, 1).latency_mean, net.latency_mean);
    /// ```
    pub fn with_racks(mut self, racks: Vec<u32>, between: Link) -> NetworkModel {
        self.topology = Some(Topology {
            racks,
            between: BTreeMap::new(),
            between_default: between,
            inside: BTreeMap::new(),
        });
        self
    }

    /// `count` racks of `per_rack` members each, members numbered rack by
    /// rack (rack 0 holds members `0..per_rack`), `between` between any two.
    ///
    /// ```
    /// use rumormill_sim::{Link, NetworkModel};
    /// let net = NetworkModel::lan(0.0).with_even_racks(3, 100, Link::new(0.0, 0.03, 0.04));
    /// assert_eq!(net.rack_of(99), Some(0));
    /// assert_eq!(net.rack_of(100), Some(1));
    /// assert_eq!(net.rack_of(300), None);
    /// ```
    pub fn with_even_racks(self, count: usize, per_rack: usize, between: Link) -> NetworkModel {
        let racks = (0..count * per_rack).map(|i| (i / per_rack.max(1)) as u32).collect();
        self.with_racks(racks, between)
    }

    /// The link between racks `a` and `b` (either order) from now on; `a ==
    /// b` sets the link inside that rack. Without racks placed, nothing
    /// changes.
    ///
    /// ```
    /// use rumormill_sim::{Link, NetworkModel};
    /// let net = NetworkModel::lan(0.0)
    ///     .with_even_racks(3, 2, Link::new(0.0, 0.030, 0.035))
    ///     .with_link(2, 0, Link::new(0.02, 0.140, 0.150))
    ///     .with_link(1, 1, Link::new(0.0, 0.001, 0.002));
    /// assert_eq!(net.link(0, 4).latency_mean, 0.150);
    /// assert_eq!(net.link(4, 0).loss, 0.02);
    /// assert_eq!(net.link(0, 2).latency_mean, 0.035);
    /// assert_eq!(net.link(2, 3).latency_mean, 0.002);
    /// ```
    pub fn with_link(mut self, a: u32, b: u32, link: Link) -> NetworkModel {
        if let Some(t) = self.topology.as_mut() {
            if a == b {
                t.inside.insert(a, link);
            } else {
                t.between.insert((a.min(b), a.max(b)), link);
            }
        }
        self
    }

    /// The rack member `i` is placed in, if any.
    pub fn rack_of(&self, i: usize) -> Option<u32> {
        self.topology.as_ref().and_then(|t| t.racks.get(i).copied())
    }

    /// Whether a packet from `a` to `b` goes from one rack to another (both
    /// placed in racks, and not the same).
    pub fn crosses_racks(&self, a: usize, b: usize) -> bool {
        matches!((self.rack_of(a), self.rack_of(b)), (Some(x), Some(y)) if x != y)
    }

    /// The latency and loss between members `a` and `b`.
    pub fn link(&self, a: usize, b: usize) -> Link {
        let own = Link::new(self.loss, self.latency_min, self.latency_mean);
        let Some(t) = &self.topology else { return own };
        match (t.racks.get(a).copied(), t.racks.get(b).copied()) {
            (Some(x), Some(y)) if x == y => t.inside.get(&x).copied().unwrap_or(own),
            (Some(x), Some(y)) => t
                .between
                .get(&(x.min(y), x.max(y)))
                .copied()
                .unwrap_or(t.between_default),
            _ => own,
        }
    }

    /// Splits the members: member `i` can only reach members of group
    /// `groups[i]` (members beyond the vector's end are in group 0).
    pub fn partition(&mut self, groups: Vec<u32>) {
        self.groups = Some(groups);
    }

    /// Ends any partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Whether `a` can reach `b`.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        match &self.groups {
            None => true,
            Some(g) => g.get(a).copied().unwrap_or(0) == g.get(b).copied().unwrap_or(0),
        }
    }

    /// One-way delay of a datagram from `a` to `b`, in nanoseconds, or
    /// `None` if it is lost.
    pub(crate) fn datagram_delay(&self, rng: &mut ChaCha8Rng, a: usize, b: usize) -> Option<u64> {
        // Without racks the link is the model's own: the same draws as
        // before racks existed.
        let link = self.link(a, b);
        if link.loss > 0.0 && rng.random::<f64>() < link.loss {
            return None;
        }
        Some(latency(&link, rng))
    }

    /// Delay of a stream frame of `len` bytes from `a` to `b`, in
    /// nanoseconds.
    pub(crate) fn stream_delay(&self, rng: &mut ChaCha8Rng, a: usize, b: usize, len: usize) -> u64 {
        2 * latency(&self.link(a, b), rng) + (len as f64 / self.bandwidth * 1e9) as u64
    }
}

fn latency(link: &Link, rng: &mut ChaCha8Rng) -> u64 {
    let tail = (link.latency_mean - link.latency_min).max(0.0);
    let u: f64 = rng.random::<f64>();
    let exp = -(1.0 - u).ln() * tail;
    ((link.latency_min + exp) * 1e9) as u64
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn mean_delay_ms(net: &NetworkModel, a: usize, b: usize) -> (f64, f64, f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut sum, mut min, mut lost) = (0.0, f64::MAX, 0usize);
        let n = 20_000;
        for _ in 0..n {
            match net.datagram_delay(&mut rng, a, b) {
                Some(d) => {
                    let ms = d as f64 / 1e6;
                    sum += ms;
                    min = min.min(ms);
                }
                None => lost += 1,
            }
        }
        (sum / (n - lost) as f64, min, lost as f64 / n as f64)
    }

    #[test]
    fn delays_and_loss_follow_the_rack_pair() {
        let net = NetworkModel::lan(0.0)
            .with_even_racks(3, 2, Link::new(0.05, 0.030, 0.040))
            .with_link(0, 2, Link::new(0.2, 0.140, 0.150));
        // Inside a rack: the LAN, no loss.
        let (mean, min, lost) = mean_delay_ms(&net, 0, 1);
        assert!(
            (0.1..0.6).contains(&mean) && min >= 0.1 && lost == 0.0,
            "{mean} {min} {lost}"
        );
        // Racks 0 and 1: the default link between racks.
        let (mean, min, lost) = mean_delay_ms(&net, 1, 2);
        assert!((39.0..41.0).contains(&mean) && min >= 30.0, "{mean} {min}");
        assert!((0.04..0.06).contains(&lost), "{lost}");
        // Racks 0 and 2, both ways: the link named for them.
        for (a, b) in [(0, 5), (4, 1)] {
            let (mean, min, lost) = mean_delay_ms(&net, a, b);
            assert!((149.0..151.0).contains(&mean) && min >= 140.0, "{mean} {min}");
            assert!((0.18..0.22).contains(&lost), "{lost}");
        }
        // Streams are never lost, and take two latencies.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        assert!(net.stream_delay(&mut rng, 0, 5, 0) >= 280_000_000);
        assert!(net.stream_delay(&mut rng, 0, 1, 0) < 100_000_000);
    }

    #[test]
    fn without_racks_the_draws_are_those_of_the_plain_model() {
        // A member outside any rack, or a model without racks: the model's
        // own link, drawn exactly as before (the same numbers from the
        // same seed).
        let plain = NetworkModel::lan(0.1);
        let racked = NetworkModel::lan(0.1).with_racks(vec![0], Link::new(0.5, 1.0, 2.0));
        let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
        for _ in 0..1000 {
            assert_eq!(
                plain.datagram_delay(&mut r1, 0, 1),
                racked.datagram_delay(&mut r2, 1, 2)
            );
            assert_eq!(
                plain.stream_delay(&mut r1, 0, 1, 500),
                racked.stream_delay(&mut r2, 3, 0, 500)
            );
        }
    }

    #[test]
    fn partitions_work_with_racks() {
        let mut net = NetworkModel::lan(0.0).with_even_racks(2, 2, Link::new(0.0, 0.03, 0.03));
        net.partition(vec![0, 0, 0, 1]);
        assert!(net.connected(0, 2));
        assert!(!net.connected(2, 3));
        net.heal();
        assert!(net.connected(2, 3));
        assert_eq!(net.rack_of(3), Some(1));
    }
}
