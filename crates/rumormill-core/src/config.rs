use std::time::Duration;

use crate::racks::RackConfig;
use crate::replication::ReplicationConfig;

/// Timings and limits of one overlay.
///
/// Start from a preset and change what you need. Values that must grow with
/// the cluster (suspicion timeout, retransmissions, push-pull interval) are
/// scaled at run time from the number of live members, so one preset serves
/// clusters of 3 and of 10,000.
///
/// ```
/// use std::time::Duration;
/// let mut c = rumormill_core::Config::new_lan();
/// c.probe_interval = Duration::from_millis(500);
/// assert!(c.validate().is_err(), "the probe timeout must be shorter");
/// c.probe_timeout = Duration::from_millis(200);
/// assert!(c.validate().is_ok());
/// assert_eq!(c.retransmit_limit(100), 4 * 3);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Time between two probes of the failure detector (scaled by the local
    /// health multiplier).
    pub probe_interval: Duration,
    /// Time to wait for a direct ack before asking others to probe
    /// (scaled by the local health multiplier). Must be below
    /// `probe_interval`.
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly when a direct probe times out.
    pub indirect_checks: usize,
    /// Lifeguard: the local health multiplier's cap. A member that misses
    /// its own acks multiplies its probe interval and timeout by up to
    /// `awareness_max + 1`.
    pub awareness_max: u32,
    /// Lifeguard: the minimum suspicion timeout is
    /// `suspicion_mult · max(1, log10(n)) · probe_interval`.
    pub suspicion_mult: u32,
    /// Lifeguard: the suspicion timeout starts at `suspicion_max_mult` times
    /// the minimum and shrinks towards the minimum as independent
    /// confirmations arrive (`suspicion_mult − 2` of them reach it).
    pub suspicion_max_mult: u32,
    /// A membership change is piggybacked about
    /// `retransmit_mult · ceil(log10(n + 1))` times.
    pub retransmit_mult: u32,
    /// Time between two gossip rounds (only run when there is news).
    pub gossip_interval: Duration,
    /// Members gossiped to per round.
    pub gossip_nodes: usize,
    /// How long a failed member still receives gossip, so that a member
    /// wrongly declared failed learns it and refutes.
    pub gossip_to_the_dead: Duration,
    /// Base interval of the full-state exchange over a stream; scaled up
    /// beyond 32 members as memberlist does.
    pub push_pull_interval: Duration,
    /// Interval at which a member re-contacts a seed it does not see alive,
    /// or a failed member, so that partitions and isolation heal by themselves.
    pub reconnect_interval: Duration,
    /// How long failed members are retried by the reconnect loop.
    pub reconnect_timeout: Duration,
    /// How long a failed or departed member is kept as a tombstone. While it
    /// is, no stale state can bring the member back; only the member itself
    /// can, with a higher incarnation or a new boot epoch.
    pub tombstone_ttl: Duration,
    /// Largest datagram sent, header and tag included.
    pub mtu: usize,
    /// Largest stream frame accepted.
    pub max_stream_frame: usize,
    /// Most members (tombstones included) kept in the table; news of further
    /// members is ignored and counted in `Stats::table_full`, so a peer's
    /// state sync cannot grow the table without bound.
    pub max_members: usize,
    /// Largest event payload accepted by `publish` and on receipt.
    pub max_event_payload: usize,
    /// Members an event relay sends to (the relay tree's branching, `k`):
    /// a topic of `S` subscribers is covered in `⌈log_k S⌉` hops.
    pub event_relay_fanout: usize,
    /// How long a relay waits for a relay acknowledgement before sending
    /// the copy again (three copies, then it relays the span itself).
    pub event_hop_timeout: Duration,
    /// Largest luggage value.
    pub max_luggage_value: usize,
    /// Largest luggage total per member.
    pub max_luggage_total: usize,
    /// How updates spread: rumor mongering, anti-entropy, or both.
    pub replication: ReplicationConfig,
    /// Raft ticks, gateway reports and the gateways' pool, for members in a
    /// rack (see [`crate::racks`]).
    pub racks: RackConfig,
}

impl Config {
    /// A local-area network: probe every 1 s and wait 500 ms for an ack —
    /// ten times a slow LAN round trip, so a busy but healthy member is not
    /// suspected; 3 indirect probes, which make a false suspicion under 10%
    /// loss about 0.8% per probe; suspicion of 4·log10(n) s at minimum and
    /// six times that at most; gossip every 200 ms to 3 members; push-pull
    /// every 30 s; MTU 1400 so that a datagram never fragments under common
    /// tunnels; events relayed to 4 members per hop, a hop resent after
    /// 100 ms without acknowledgement. Same order as memberlist's LAN
    /// defaults, so the two can be compared directly.
    pub fn new_lan() -> Config {
        Config {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_checks: 3,
            awareness_max: 8,
            suspicion_mult: 4,
            suspicion_max_mult: 6,
            retransmit_mult: 4,
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: 3,
            gossip_to_the_dead: Duration::from_secs(30),
            push_pull_interval: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(10),
            reconnect_timeout: Duration::from_secs(24 * 3600),
            tombstone_ttl: Duration::from_secs(24 * 3600),
            mtu: 1400,
            max_stream_frame: rumormill_wire::DEFAULT_MAX_FRAME,
            max_members: 250_000,
            max_event_payload: crate::events::DEFAULT_MAX_PAYLOAD,
            event_relay_fanout: 4,
            event_hop_timeout: Duration::from_millis(100),
            max_luggage_value: crate::luggage::DEFAULT_MAX_VALUE,
            max_luggage_total: crate::luggage::DEFAULT_MAX_TOTAL,
            replication: ReplicationConfig::default(),
            racks: RackConfig::new_lan(),
        }
    }

    /// A wide-area network (round trips of 100–300 ms): probe every 5 s
    /// with a 3 s timeout so that a slow intercontinental ack still counts;
    /// suspicion multiplier 6 because loss is burstier; gossip every 500 ms
    /// to 4 members; push-pull every 60 s; event hops resent after 1 s.
    pub fn new_wan() -> Config {
        Config {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            event_hop_timeout: Duration::from_secs(1),
            suspicion_mult: 6,
            gossip_interval: Duration::from_millis(500),
            gossip_nodes: 4,
            gossip_to_the_dead: Duration::from_secs(60),
            push_pull_interval: Duration::from_secs(60),
            reconnect_interval: Duration::from_secs(30),
            replication: ReplicationConfig {
                interval: Duration::from_millis(500),
                anti_entropy_interval: Duration::from_secs(30),
                ..ReplicationConfig::default()
            },
            racks: RackConfig::new_wan(),
            ..Config::new_lan()
        }
    }

    /// One host (loopback): round trips are microseconds, so probe every
    /// second with a 200 ms timeout, suspicion multiplier 3, gossip every
    /// 100 ms, push-pull every 15 s, reconnect every 2 s, event hops resent
    /// after 40 ms.
    pub fn new_local() -> Config {
        Config {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(200),
            suspicion_mult: 3,
            gossip_interval: Duration::from_millis(100),
            push_pull_interval: Duration::from_secs(15),
            reconnect_interval: Duration::from_secs(2),
            gossip_to_the_dead: Duration::from_secs(15),
            event_hop_timeout: Duration::from_millis(40),
            ..Config::new_lan()
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.probe_timeout >= self.probe_interval {
            return Err(format!(
                "probe_timeout ({:?}) must be shorter than probe_interval ({:?})",
                self.probe_timeout, self.probe_interval
            ));
        }
        if self.probe_interval.is_zero() || self.gossip_interval.is_zero() {
            return Err("probe_interval and gossip_interval must be above zero".into());
        }
        if self.suspicion_mult < 1 || self.suspicion_max_mult < 1 || self.retransmit_mult < 1 {
            return Err("suspicion_mult, suspicion_max_mult and retransmit_mult must be at least 1".into());
        }
        if self.mtu < 200 {
            return Err(format!("mtu {} is too small: at least 200 bytes", self.mtu));
        }
        if self.push_pull_interval.is_zero() || self.reconnect_interval.is_zero() {
            return Err("push_pull_interval and reconnect_interval must be above zero".into());
        }
        if self.event_relay_fanout < 2 || self.event_hop_timeout.is_zero() {
            return Err("event_relay_fanout must be at least 2 and event_hop_timeout above zero".into());
        }
        self.replication.validate()?;
        self.racks.validate()
    }

    /// Times a membership change is retransmitted in a cluster of `n`.
    pub fn retransmit_limit(&self, n: usize) -> u32 {
        let scale = ((n as f64 + 1.0).log10().ceil() as u32).max(1);
        self.retransmit_mult * scale
    }

    /// Minimum and maximum suspicion timeout in a cluster of `n`.
    pub fn suspicion_timeouts(&self, n: usize) -> (Duration, Duration) {
        let scale = (n.max(1) as f64).log10().max(1.0);
        let min = self.probe_interval.mul_f64(f64::from(self.suspicion_mult) * scale);
        (min, min * self.suspicion_max_mult)
    }

    /// Push-pull interval in a cluster of `n`: the base interval up to 32
    /// members, then one more multiple per doubling, so that the total
    /// push-pull traffic of the cluster grows as `n log n`, not `n²`.
    pub fn push_pull_interval_for(&self, n: usize) -> Duration {
        if n <= 32 {
            return self.push_pull_interval;
        }
        let mult = ((n as f64).log2() - 32f64.log2()).ceil() + 1.0;
        self.push_pull_interval.mul_f64(mult)
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::new_lan()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_scale_with_cluster_size() {
        for c in [Config::new_lan(), Config::new_wan(), Config::new_local()] {
            c.validate().unwrap();
        }
        let c = Config::new_lan();
        assert_eq!(c.retransmit_limit(1), 4);
        assert_eq!(c.retransmit_limit(9), 4);
        assert_eq!(c.retransmit_limit(10), 8);
        assert_eq!(c.retransmit_limit(10_000), 20);
        assert_eq!(c.suspicion_timeouts(5).0, Duration::from_secs(4));
        assert_eq!(c.suspicion_timeouts(1000).0, Duration::from_secs(12));
        assert_eq!(c.suspicion_timeouts(1000).1, Duration::from_secs(72));
        assert_eq!(c.push_pull_interval_for(32), Duration::from_secs(30));
        assert_eq!(c.push_pull_interval_for(64), Duration::from_secs(60));
        assert_eq!(c.push_pull_interval_for(10_000), Duration::from_secs(300));
    }

    #[test]
    fn nonsense_is_rejected() {
        let mut c = Config::new_lan();
        c.probe_timeout = c.probe_interval;
        assert!(c.validate().unwrap_err().contains("probe_timeout"));
    }
}
