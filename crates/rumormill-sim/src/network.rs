//! The modelled network: latency, loss, bandwidth and partitions.

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

    /// One-way delay of a datagram, in nanoseconds, or `None` if it is lost.
    pub(crate) fn datagram_delay(&self, rng: &mut ChaCha8Rng) -> Option<u64> {
        if self.loss > 0.0 && rng.random::<f64>() < self.loss {
            return None;
        }
        Some(self.latency(rng))
    }

    /// Delay of a stream frame of `len` bytes, in nanoseconds.
    pub(crate) fn stream_delay(&self, rng: &mut ChaCha8Rng, len: usize) -> u64 {
        2 * self.latency(rng) + (len as f64 / self.bandwidth * 1e9) as u64
    }

    fn latency(&self, rng: &mut ChaCha8Rng) -> u64 {
        let tail = (self.latency_mean - self.latency_min).max(0.0);
        let u: f64 = rng.random::<f64>();
        let exp = -(1.0 - u).ln() * tail;
        ((self.latency_min + exp) * 1e9) as u64
    }
}
