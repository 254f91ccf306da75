use std::collections::BTreeSet;

use super::*;

const TIMING: ElectionTiming = ElectionTiming {
    tick: Duration::from_millis(100),
    election_ticks: 10,
    heartbeat_ticks: 1,
};

/// Candidates of one rack, with messages shuttled between them by hand:
/// 1 ms latency, no loss; a node can be down or cut off.
struct Rack {
    names: Vec<Arc<str>>,
    nodes: Vec<Option<Election>>,
    /// The latest durable record of each node, and whether its disk keeps up.
    disk: Vec<Option<RaftRecord>>,
    disk_stalled: Vec<bool>,
    start: Instant,
    now: Instant,
    flight: Vec<(Instant, usize, usize, proto::RaftMessage)>,
    /// Group of each node: only nodes of one group hear each other.
    groups: Vec<u32>,
    /// (term, leader) pairs ever seen: at most one leader per term.
    leaders: BTreeMap<u64, BTreeSet<usize>>,
}

impl Rack {
    fn new(n: usize, seed: u64) -> Rack {
        let start = Instant::now();
        let names: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("c{i}"))).collect();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut e = Election::new(name, TIMING, seed * 100 + i as u64, start);
            e.bootstrap(&names).expect("bootstrap");
            nodes.push(Some(e));
        }
        Rack {
            nodes,
            disk: vec![None; n],
            disk_stalled: vec![false; n],
            start,
            now: start,
            flight: Vec::new(),
            groups: vec![0; n],
            leaders: BTreeMap::new(),
            names,
        }
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| &**n == name).expect("a voter")
    }

    /// Runs for `d` in 10 ms steps.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            let now = self.now;
            // Deliver what arrived.
            let (due, rest): (Vec<_>, Vec<_>) = self.flight.drain(..).partition(|f| f.0 <= now);
            self.flight = rest;
            for (_, from, to, msg) in due {
                if self.groups[from] != self.groups[to] {
                    continue;
                }
                let name = self.names[from].clone();
                if let Some(n) = self.nodes[to].as_mut() {
                    n.handle(&name, msg).expect("a message of the group");
                }
            }
            for i in 0..self.nodes.len() {
                let Some(n) = self.nodes[i].as_mut() else { continue };
                n.handle_timeout(now);
                while let Some(r) = n.poll_record() {
                    if !self.disk_stalled[i] {
                        let seq = r.seq;
                        self.disk[i] = Some(r);
                        n.persisted(seq);
                    }
                }
                while let Some((to, msg)) = n.poll_message() {
                    let to = self.names.iter().position(|x| *x == to).expect("a voter");
                    self.flight.push((now + Duration::from_millis(1), i, to, msg));
                }
                if n.is_leader() {
                    self.leaders.entry(n.term()).or_default().insert(i);
                }
            }
        }
    }

    fn leaders_now(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].as_ref().is_some_and(|n| n.is_leader()))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
        self.flight.retain(|f| f.1 != i && f.2 != i);
    }

    fn restart(&mut self, i: usize, seed: u64) {
        let mut e = Election::new(&self.names[i], TIMING, seed, self.now);
        if let Some(r) = &self.disk[i] {
            e.restore(r).expect("restore");
        }
        self.nodes[i] = Some(e);
    }

    fn assert_one_leader_per_term(&self) {
        for (term, who) in &self.leaders {
            assert!(who.len() <= 1, "term {term} had leaders {who:?}");
        }
    }

    fn history(&self) -> Vec<(u64, usize)> {
        self.leaders
            .iter()
            .flat_map(|(t, w)| w.iter().map(move |&i| (*t, i)))
            .collect()
    }
}

#[test]
fn three_candidates_elect_one_leader_within_two_election_timeouts() {
    for seed in 1..20 {
        let mut rack = Rack::new(3, seed);
        rack.run(Duration::from_secs(4));
        let leaders = rack.leaders_now();
        assert_eq!(leaders.len(), 1, "seed {seed}: leaders {leaders:?}");
        let leader = &rack.names[leaders[0]];
        let first = rack.leaders.keys().next().copied().expect("a term with a leader");
        for n in rack.nodes.iter().flatten() {
            assert_eq!(
                n.leader().as_ref(),
                Some(leader),
                "seed {seed}: everyone follows the leader"
            );
            assert_eq!(n.term(), first, "seed {seed}: one election was enough");
        }
        rack.assert_one_leader_per_term();
    }
}

#[test]
fn a_single_candidate_leads_alone() {
    let mut rack = Rack::new(1, 3);
    rack.run(Duration::from_secs(3));
    assert_eq!(rack.leaders_now(), vec![0]);
}

#[test]
fn a_crashed_leader_is_replaced_with_a_higher_term_within_the_election_timeout() {
    let mut took_all = Vec::new();
    for seed in 1..40 {
        let mut rack = Rack::new(3, seed);
        rack.run(Duration::from_secs(4));
        let old = rack.leaders_now()[0];
        let old_term = rack.nodes[old].as_ref().map(|n| n.term()).unwrap_or(0);
        rack.kill(old);
        let killed_at = rack.now;
        let mut took = None;
        while rack.now - killed_at < Duration::from_secs(5) {
            rack.run(Duration::from_millis(10));
            if let [l] = rack.leaders_now()[..] {
                took = Some((rack.now - killed_at, l));
                break;
            }
        }
        let (took, new) = took.unwrap_or_else(|| panic!("seed {seed}: no new leader within 5 s"));
        assert_ne!(new, old);
        // Election timeout: 1 to 2 s after the last heartbeat; a split
        // pre-vote costs one more timeout.
        assert!(took < Duration::from_secs(3), "seed {seed}: failover took {took:?}");
        took_all.push(took);
        let term = rack.nodes[new].as_ref().map(|n| n.term()).unwrap_or(0);
        assert!(
            term > old_term,
            "seed {seed}: the new leader's term {term} is above {old_term}"
        );
        rack.assert_one_leader_per_term();
    }
    took_all.sort();
    let median = took_all[took_all.len() / 2];
    assert!(
        median < Duration::from_millis(2_000),
        "median failover {median:?} ({took_all:?})"
    );
}

#[test]
fn a_leader_cut_off_from_its_majority_steps_down_and_the_minority_elects_nobody() {
    let mut rack = Rack::new(3, 7);
    rack.run(Duration::from_secs(4));
    let old = rack.leaders_now()[0];
    rack.groups[old] = 1;
    rack.run(Duration::from_secs(5));
    assert!(
        !rack.nodes[old].as_ref().is_some_and(|n| n.is_leader()),
        "check-quorum deposes the isolated leader"
    );
    let leaders = rack.leaders_now();
    assert_eq!(leaders.len(), 1, "the majority elects one: {leaders:?}");
    assert_ne!(leaders[0], old);
    // Healing: pre-vote keeps the returning member from raising the term
    // and deposing the leader.
    let term = rack.nodes[leaders[0]].as_ref().map(|n| n.term()).unwrap_or(0);
    rack.groups[old] = 0;
    rack.run(Duration::from_secs(5));
    assert_eq!(rack.leaders_now(), leaders);
    assert_eq!(rack.nodes[leaders[0]].as_ref().map(|n| n.term()), Some(term));
    rack.assert_one_leader_per_term();
}

#[test]
fn a_split_with_no_majority_has_no_leader_until_it_heals() {
    let mut rack = Rack::new(4, 2);
    rack.run(Duration::from_secs(4));
    assert_eq!(rack.leaders_now().len(), 1);
    rack.groups = vec![0, 0, 1, 1];
    rack.run(Duration::from_secs(6));
    assert!(rack.leaders_now().is_empty(), "two of four is no majority");
    rack.groups = vec![0; 4];
    rack.run(Duration::from_secs(6));
    assert_eq!(rack.leaders_now().len(), 1);
    rack.assert_one_leader_per_term();
}

#[test]
fn votes_wait_for_the_disk() {
    let mut rack = Rack::new(3, 5);
    rack.disk_stalled = vec![true; 3];
    rack.run(Duration::from_secs(6));
    assert!(
        rack.leaders_now().is_empty(),
        "no vote leaves before its record is durable"
    );
    rack.disk_stalled = vec![false; 3];
    // Records handed out while the disk stalled are durable now.
    for i in 0..3 {
        let n = rack.nodes[i].as_mut().expect("running");
        n.persisted(u64::MAX);
    }
    rack.run(Duration::from_secs(4));
    assert_eq!(rack.leaders_now().len(), 1);
}

#[test]
fn a_restarted_candidate_keeps_its_term_and_vote() {
    let mut rack = Rack::new(3, 11);
    rack.run(Duration::from_secs(4));
    let follower = (0..3).find(|i| !rack.leaders_now().contains(i)).expect("a follower");
    let before = rack.disk[follower].clone().expect("a durable record");
    assert!(
        before.term() > 0 && before.state.vote != 0,
        "it voted: {:?}",
        before.state
    );
    rack.kill(follower);
    rack.restart(follower, 999);
    let n = rack.nodes[follower].as_ref().expect("restarted");
    assert_eq!(n.term(), before.term());
    assert_eq!(n.voters(), rack.names);
    let raft = &n.node.as_ref().expect("restored").raft;
    assert_eq!(raft.vote, before.state.vote, "the vote of this term is kept");
    rack.run(Duration::from_secs(3));
    assert_eq!(rack.leaders_now().len(), 1);
    rack.assert_one_leader_per_term();
}

#[test]
fn the_same_seeds_elect_the_same_leaders_in_the_same_terms() {
    let run = || {
        let mut rack = Rack::new(5, 4);
        rack.run(Duration::from_secs(3));
        let l = rack.leaders_now()[0];
        rack.kill(l);
        rack.run(Duration::from_secs(4));
        rack.history()
    };
    let a = run();
    assert!(a.len() >= 2, "{a:?}");
    assert_eq!(a, run());
}

#[test]
fn messages_from_outside_the_group_are_refused() {
    let names: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|n| Arc::from(*n)).collect();
    let now = Instant::now();
    let mut a = Election::new("a", TIMING, 1, now);
    assert_eq!(
        a.handle("b", proto::RaftMessage::default()),
        Err(RaftError::NotBootstrapped)
    );
    a.bootstrap(&names).expect("bootstrap");
    let mut b = Election::new("b", TIMING, 2, now);
    b.bootstrap(&names).expect("bootstrap");
    // b campaigns: take one of its messages to a.
    let mut t = now;
    let msg = loop {
        t += TIMING.tick;
        b.handle_timeout(t);
        while let Some(r) = b.poll_record() {
            b.persisted(r.seq);
        }
        if let Some((to, m)) = b.poll_message()
            && &*to == "a"
        {
            break m;
        }
        assert!(t - now < Duration::from_secs(10), "b never campaigned");
    };
    assert!(matches!(a.handle("d", msg.clone()), Err(RaftError::NotAVoter(n)) if n == "d"));
    assert!(matches!(a.handle("c", msg.clone()), Err(RaftError::Forged { .. })));
    let mut other = msg.clone();
    other.group ^= 1;
    assert!(matches!(a.handle("b", other), Err(RaftError::OtherGroup(_))));
    let mut snapshot = msg.clone();
    snapshot.msg_type = MessageType::MsgSnapshot as u32;
    assert_eq!(a.handle("b", snapshot), Err(RaftError::Type(7)));
    assert_eq!(a.handle("b", msg), Ok(()));
}

#[test]
fn a_member_not_among_the_voters_cannot_bootstrap() {
    let mut e = Election::new("x", TIMING, 1, Instant::now());
    let names: Vec<Arc<str>> = vec!["a".into(), "b".into()];
    assert!(e.bootstrap(&names).is_err());
    assert!(!e.is_bootstrapped());
}

#[test]
fn records_that_do_not_make_sense_are_refused() {
    let bad = |s: proto::RaftState| RaftRecord::decode(&s.encode_to_vec());
    let e = |term, index| proto::RaftEntry { term, index };
    assert!(
        bad(proto::RaftState {
            term: 2,
            entries: vec![e(1, 1), e(2, 2)],
            commit: 2,
            ..Default::default()
        })
        .is_ok()
    );
    assert!(
        bad(proto::RaftState {
            term: 2,
            entries: vec![e(1, 2)],
            ..Default::default()
        })
        .is_err(),
        "a gap"
    );
    assert!(
        bad(proto::RaftState {
            term: 2,
            entries: vec![e(2, 1), e(1, 2)],
            ..Default::default()
        })
        .is_err(),
        "terms go down"
    );
    assert!(
        bad(proto::RaftState {
            term: 1,
            entries: vec![e(3, 1)],
            ..Default::default()
        })
        .is_err(),
        "entry above the term"
    );
    assert!(
        bad(proto::RaftState {
            term: 1,
            commit: 1,
            ..Default::default()
        })
        .is_err(),
        "commit beyond the log"
    );
    assert!(RaftRecord::decode(b"\xff\xff").is_err());
}

#[test]
fn the_rack_runs_for_an_hour_with_one_term_and_a_log_of_one_entry() {
    let mut rack = Rack::new(3, 9);
    rack.run(Duration::from_secs(3600));
    let l = rack.leaders_now();
    assert_eq!(l.len(), 1);
    assert_eq!(rack.leaders.len(), 1, "no spurious elections: {:?}", rack.leaders);
    let record = rack.disk[l[0]].as_ref().expect("durable");
    assert_eq!(record.state.entries.len(), 1, "only the leader's empty entry");
    let _ = rack.start;
}
