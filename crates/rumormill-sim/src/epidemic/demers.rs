//! Rumor mongering: the complex epidemic of Demers et al. (1987), section 1.4.
//!
//! Each site is *susceptible* (has not heard the update), *infective* (knows it and spreads it) or
//! *removed* (knows it but has lost interest). The update starts infective at site 0 at cycle 0. In
//! every cycle the sites contact partners as their [`Direction`] says (see the [module
//! docs](super) for the cycle model):
//!
//! - push: every infective site pushes the update to a random other site;
//! - pull: every site asks a random other site, and the partner answers with the update if it is
//!   infective;
//! - push-pull: every site contacts a random other site; an infective caller pushes and an infective
//!   partner answers.
//!
//! A *contact* of an infective site is a message in which it sends the update: its push, or its answer to
//! a pull request. The contact is *unnecessary* when the receiving site already knew the update at the
//! start of the cycle. At the end of each cycle every infective site may lose interest and become
//! removed, by a rule made of a [`Removal`] and a [`Loss`] with parameter `k`. Counters count cycles, not
//! messages: a cycle in which a site made several contacts (as a pull responder can) counts once, and a
//! cycle without contacts does not count.
//!
//! | rule | when a site loses interest |
//! | --- | --- |
//! | feedback, counter | after `k` cycles whose contacts were all unnecessary; a necessary contact resets the count |
//! | feedback, coin | with probability `1/k` after each unnecessary contact |
//! | blind, counter | after `k` cycles in which it made contacts, necessary or not |
//! | blind, coin | with probability `1/k` after each contact, necessary or not |
//!
//! The epidemic runs until no site is infective. Each run yields the *residue* (fraction of sites never
//! informed), the *traffic* (update-carrying messages per site: every push, and every answer to a pull
//! request; the requests themselves carry nothing), `t_ave` (mean cycle at which the sites other than the
//! origin were informed) and `t_last` (cycle of the last infection); [`run`] averages them over many runs.
//!
//! On 1000 sites this model reproduces the residue, traffic and `t_last` of the paper's Tables 1 (push,
//! feedback, counter), 2 (push, blind, coin) and 3 (pull, feedback, counter), and the `t_ave` of Table 3.
//! Its `t_ave` for push is 1 to 3 cycles below the paper's Tables 1 and 2 (about 10 cycles for every `k`,
//! which is what the doubling of informed sites in the first cycles implies); where that difference comes
//! from is not known.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Direction, Loss, ParamError, Removal, random_partner, run_rng, serialize_name, validate_population};

/// Parameters of a rumor-mongering experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DemersParams {
    /// Number of sites, at least 2.
    pub nodes: usize,
    /// Number of independent runs to average, at least 1.
    pub runs: usize,
    /// Seed of the random number generator; run `r` uses stream `r` of this seed.
    pub seed: u64,
    /// How the update travels over a contact.
    #[serde(serialize_with = "serialize_name")]
    pub direction: Direction,
    /// Which contacts count towards losing interest.
    #[serde(serialize_with = "serialize_name")]
    pub removal: Removal,
    /// How counting contacts make a site lose interest.
    #[serde(serialize_with = "serialize_name")]
    pub loss: Loss,
    /// The loss parameter: counter limit, or inverse probability of the coin. At least 1.
    pub k: u32,
}

impl Default for DemersParams {
    /// The setting of the paper's Table 1, first row: 1000 sites, push, feedback, counter, `k` = 1, over
    /// 1000 runs.
    fn default() -> Self {
        Self {
            nodes: 1000,
            runs: 1000,
            seed: 0,
            direction: Direction::Push,
            removal: Removal::Feedback,
            loss: Loss::Counter,
            k: 1,
        }
    }
}

/// Results of a rumor-mongering experiment: the parameters, and means over all runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemersReport {
    /// Number of sites.
    pub nodes: usize,
    /// Number of runs averaged.
    pub runs: usize,
    /// Seed of the random number generator.
    pub seed: u64,
    /// How the update travelled over a contact.
    #[serde(serialize_with = "serialize_name")]
    pub direction: Direction,
    /// Which contacts counted towards losing interest.
    #[serde(serialize_with = "serialize_name")]
    pub removal: Removal,
    /// How counting contacts made a site lose interest.
    #[serde(serialize_with = "serialize_name")]
    pub loss: Loss,
    /// The loss parameter.
    pub k: u32,
    /// Mean fraction of sites that never received the update.
    pub residue: f64,
    /// Sample standard deviation of the residue over the runs (0 for a single run).
    pub residue_std_dev: f64,
    /// Mean number of update-carrying messages per site.
    pub traffic: f64,
    /// Mean over runs of the average cycle at which the informed sites other than the origin got the update.
    pub t_ave: f64,
    /// Mean over runs of the cycle of the last infection.
    pub t_last: f64,
}

/// Simulates `params.runs` independent rumor-mongering epidemics and averages their outcomes.
///
/// # Errors
///
/// Returns a [`ParamError`] if `nodes < 2`, `nodes` exceeds `u32::MAX`, `runs == 0` or `k == 0`.
pub fn run(params: &DemersParams) -> Result<DemersReport, ParamError> {
    let sites = validate_population(params.nodes, params.runs)?;
    if params.k == 0 {
        return Err(ParamError::ZeroK);
    }

    let mut epidemic = Epidemic::new(sites, params);
    let mut residues = Vec::with_capacity(params.runs);
    let (mut traffic, mut t_ave, mut t_last) = (0.0, 0.0, 0.0);
    let mut runs_with_spread = 0usize;
    for run in 0..params.runs {
        let outcome = epidemic.run(&mut run_rng(params.seed, run));
        let n = f64::from(sites);
        residues.push(f64::from(sites - outcome.informed) / n);
        traffic += outcome.messages as f64 / n;
        t_last += f64::from(outcome.t_last);
        if outcome.informed > 1 {
            t_ave += outcome.infection_cycles as f64 / f64::from(outcome.informed - 1);
            runs_with_spread += 1;
        }
    }

    let runs = params.runs as f64;
    let residue = residues.iter().sum::<f64>() / runs;
    let residue_std_dev = if params.runs > 1 {
        (residues.iter().map(|r| (r - residue).powi(2)).sum::<f64>() / (runs - 1.0)).sqrt()
    } else {
        0.0
    };
    Ok(DemersReport {
        nodes: params.nodes,
        runs: params.runs,
        seed: params.seed,
        direction: params.direction,
        removal: params.removal,
        loss: params.loss,
        k: params.k,
        residue,
        residue_std_dev,
        traffic: traffic / runs,
        t_ave: if runs_with_spread > 0 {
            t_ave / runs_with_spread as f64
        } else {
            0.0
        },
        t_last: t_last / runs,
    })
}

/// What a site knows about the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// Has not heard of the update.
    Susceptible,
    /// Heard of it during the current cycle: it counts as susceptible until the cycle ends.
    JustInformed,
    /// Knows it and spreads it.
    Infective,
    /// Knows it and no longer spreads it.
    Removed,
}

/// Totals of one run.
#[derive(Debug, Default)]
struct Outcome {
    /// Sites that know the update at the end, the origin included.
    informed: u32,
    /// Sum over the informed sites other than the origin of the cycle at which they were informed.
    infection_cycles: u64,
    /// Cycle of the last infection (0 if nobody but the origin was informed).
    t_last: u32,
    /// Update-carrying messages sent.
    messages: u64,
}

/// The state of one run, with buffers reused from run to run.
struct Epidemic {
    sites: u32,
    direction: Direction,
    removal: Removal,
    loss: Loss,
    k: u32,
    state: Vec<Site>,
    /// Per site: consecutive unnecessary cycles (feedback) or cycles with contacts (blind).
    counter: Vec<u32>,
    /// Per site: necessary contacts made in the current cycle.
    necessary: Vec<u32>,
    /// Per site: unnecessary contacts made in the current cycle.
    unnecessary: Vec<u32>,
    /// Sites infective at the start of the current cycle.
    infective: Vec<u32>,
    /// Sites still infective at the end of the current cycle.
    still_infective: Vec<u32>,
    /// Sites informed during the current cycle.
    just_informed: Vec<u32>,
}

impl Epidemic {
    fn new(sites: u32, params: &DemersParams) -> Self {
        let len = sites as usize;
        Self {
            sites,
            direction: params.direction,
            removal: params.removal,
            loss: params.loss,
            k: params.k,
            state: vec![Site::Susceptible; len],
            counter: vec![0; len],
            necessary: vec![0; len],
            unnecessary: vec![0; len],
            infective: Vec::with_capacity(len),
            still_infective: Vec::with_capacity(len),
            just_informed: Vec::with_capacity(len),
        }
    }

    /// Runs one epidemic from site 0 until no site is infective.
    fn run(&mut self, rng: &mut ChaCha8Rng) -> Outcome {
        const ORIGIN: u32 = 0;
        self.state.fill(Site::Susceptible);
        self.counter.fill(0);
        self.infective.clear();
        self.state[ORIGIN as usize] = Site::Infective;
        self.infective.push(ORIGIN);

        let mut outcome = Outcome {
            informed: 1,
            ..Outcome::default()
        };
        let mut cycle = 0;
        while !self.infective.is_empty() {
            cycle += 1;
            self.exchange(rng, &mut outcome);
            self.lose_interest(rng);
            self.spread(cycle, &mut outcome);
        }
        outcome
    }

    /// Makes this cycle's contacts, deciding everything on the state at the start of the cycle.
    fn exchange(&mut self, rng: &mut ChaCha8Rng, outcome: &mut Outcome) {
        match self.direction {
            // Only infective callers have anything to do.
            Direction::Push => {
                for i in 0..self.infective.len() {
                    let caller = self.infective[i];
                    let partner = random_partner(rng, self.sites, caller);
                    self.send(caller, partner, outcome);
                }
            }
            Direction::Pull | Direction::PushPull => {
                let pushes = self.direction == Direction::PushPull;
                for caller in 0..self.sites {
                    let partner = random_partner(rng, self.sites, caller);
                    if pushes && self.state[caller as usize] == Site::Infective {
                        self.send(caller, partner, outcome);
                    }
                    if self.state[partner as usize] == Site::Infective {
                        self.send(partner, caller, outcome);
                    }
                }
            }
        }
    }

    /// Infective `sender` sends the update to `receiver`.
    fn send(&mut self, sender: u32, receiver: u32, outcome: &mut Outcome) {
        outcome.messages += 1;
        let (sender, receiver) = (sender as usize, receiver as usize);
        match self.state[receiver] {
            Site::Susceptible => {
                self.state[receiver] = Site::JustInformed;
                self.just_informed.push(receiver as u32);
                self.necessary[sender] += 1;
            }
            Site::JustInformed => self.necessary[sender] += 1,
            Site::Infective | Site::Removed => self.unnecessary[sender] += 1,
        }
    }

    /// Applies the loss-of-interest rule to every site that was infective during this cycle.
    fn lose_interest(&mut self, rng: &mut ChaCha8Rng) {
        for i in 0..self.infective.len() {
            let site = self.infective[i] as usize;
            let necessary = std::mem::take(&mut self.necessary[site]);
            let unnecessary = std::mem::take(&mut self.unnecessary[site]);
            if self.keeps_interest(site, necessary, unnecessary, rng) {
                self.still_infective.push(site as u32);
            } else {
                self.state[site] = Site::Removed;
            }
        }
        std::mem::swap(&mut self.infective, &mut self.still_infective);
        self.still_infective.clear();
    }

    /// Whether `site`, having made the given contacts this cycle, stays infective.
    fn keeps_interest(&mut self, site: usize, necessary: u32, unnecessary: u32, rng: &mut ChaCha8Rng) -> bool {
        let contacts = necessary + unnecessary;
        let counting = match self.removal {
            Removal::Feedback => unnecessary,
            Removal::Blind => contacts,
        };
        match self.loss {
            Loss::Coin => !(0..counting).any(|_| rng.random_ratio(1, self.k)),
            Loss::Counter => {
                let counter = &mut self.counter[site];
                match self.removal {
                    Removal::Feedback if necessary > 0 => *counter = 0,
                    _ if counting > 0 => *counter += 1,
                    _ => {}
                }
                *counter < self.k
            }
        }
    }

    /// Makes the sites informed during this cycle infective from the next one.
    fn spread(&mut self, cycle: u32, outcome: &mut Outcome) {
        if self.just_informed.is_empty() {
            return;
        }
        for &site in &self.just_informed {
            self.state[site as usize] = Site::Infective;
        }
        let informed = self.just_informed.len() as u32;
        outcome.informed += informed;
        outcome.infection_cycles += u64::from(informed) * u64::from(cycle);
        outcome.t_last = cycle;
        self.infective.append(&mut self.just_informed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(direction: Direction, removal: Removal, loss: Loss, k: u32, runs: usize) -> DemersParams {
        DemersParams {
            nodes: 1000,
            runs,
            seed: 1987,
            direction,
            removal,
            loss,
            k,
        }
    }

    fn report(direction: Direction, removal: Removal, loss: Loss, k: u32, runs: usize) -> DemersReport {
        run(&params(direction, removal, loss, k, runs)).expect("valid parameters")
    }

    #[test]
    fn same_seed_gives_identical_reports() {
        let p = params(Direction::PushPull, Removal::Feedback, Loss::Coin, 2, 20);
        let first = run(&p).unwrap();
        assert_eq!(first, run(&p).unwrap());
        let other_seed = run(&DemersParams { seed: p.seed + 1, ..p }).unwrap();
        assert_ne!(first, other_seed);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let valid = DemersParams::default();
        assert_eq!(run(&DemersParams { k: 0, ..valid }), Err(ParamError::ZeroK));
        assert_eq!(
            run(&DemersParams { nodes: 1, ..valid }),
            Err(ParamError::TooFewNodes { nodes: 1 })
        );
        assert_eq!(run(&DemersParams { runs: 0, ..valid }), Err(ParamError::NoRuns));
    }

    #[test]
    fn options_parse_from_their_names() {
        for &removal in Removal::ALL {
            assert_eq!(removal.to_string().parse(), Ok(removal));
        }
        for &loss in Loss::ALL {
            assert_eq!(loss.to_string().parse(), Ok(loss));
        }
        assert_eq!(
            "deaf".parse::<Removal>().unwrap_err().to_string(),
            r#"invalid removal "deaf": expected one of feedback, blind"#
        );
        assert_eq!(
            "dice".parse::<Loss>().unwrap_err().to_string(),
            r#"invalid loss "dice": expected one of counter, coin"#
        );
    }

    #[test]
    fn two_sites_always_inform_each_other() {
        for &direction in Direction::ALL {
            let report = run(&DemersParams {
                nodes: 2,
                runs: 10,
                ..params(direction, Removal::Blind, Loss::Coin, 1, 10)
            })
            .unwrap();
            assert_eq!(report.residue, 0.0, "{direction}");
            assert_eq!(report.t_last, 1.0, "{direction}");
        }
    }

    #[test]
    fn blind_coin_with_k_1_is_a_single_chain() {
        // Every infective site makes exactly one push and stops: one message per informed site.
        let report = report(Direction::Push, Removal::Blind, Loss::Coin, 1, 100);
        assert!((report.traffic - (1.0 - report.residue)).abs() < 1e-12, "{report:?}");
        // The chain stops at its first repeated site, after about sqrt(pi n / 2) ~ 40 sites (Table 2: 0.96).
        assert!((0.95..0.97).contains(&report.residue), "{report:?}");
    }

    /// Asserts that `actual` is within `tolerance` of `expected`.
    fn assert_near(what: &str, actual: f64, expected: f64, tolerance: f64, report: &DemersReport) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what} = {actual}, expected {expected} ± {tolerance}: {report:?}"
        );
    }

    /// The paper's Table 1: push, feedback, counter, 1000 sites.
    #[test]
    fn push_feedback_counter_matches_table_1() {
        for (k, residue, traffic, t_last) in [(1, 0.18, 1.7, 16.8), (2, 0.037, 3.3, 16.9), (3, 0.011, 4.5, 17.4)] {
            let report = report(Direction::Push, Removal::Feedback, Loss::Counter, k, 200);
            assert_near("residue", report.residue, residue, 0.12 * residue, &report);
            assert_near("traffic", report.traffic, traffic, 0.1, &report);
            assert_near("t_last", report.t_last, t_last, 0.6, &report);
        }
    }

    /// The paper's Table 2: push, blind, coin, 1000 sites.
    #[test]
    fn push_blind_coin_matches_table_2() {
        for (k, residue, traffic, t_last) in [(2, 0.20, 1.6, 33.0), (3, 0.060, 2.8, 32.0), (4, 0.021, 3.9, 32.0)] {
            let report = report(Direction::Push, Removal::Blind, Loss::Coin, k, 200);
            // Rare runs where the rumor dies out at once make the blind residue noisier.
            assert_near("residue", report.residue, residue, 0.3 * residue, &report);
            assert_near("traffic", report.traffic, traffic, 0.1, &report);
            assert_near("t_last", report.t_last, t_last, 1.5, &report);
        }
    }

    /// The paper's Table 3: pull, feedback, counter, 1000 sites.
    #[test]
    fn pull_feedback_counter_matches_table_3() {
        for (k, residue, traffic, t_ave, t_last) in [(1, 3.1e-2, 2.7, 9.97, 17.63), (2, 5.8e-4, 4.5, 10.07, 15.39)] {
            let report = report(Direction::Pull, Removal::Feedback, Loss::Counter, k, 300);
            assert_near("residue", report.residue, residue, 0.3 * residue, &report);
            assert_near("traffic", report.traffic, traffic, 0.1, &report);
            assert_near("t_ave", report.t_ave, t_ave, 0.5, &report);
            assert_near("t_last", report.t_last, t_last, 0.6, &report);
        }
    }

    #[test]
    fn blind_coin_leaves_more_residue_than_feedback_counter() {
        for k in 1..=3 {
            let feedback_counter = report(Direction::Push, Removal::Feedback, Loss::Counter, k, 100);
            let blind_coin = report(Direction::Push, Removal::Blind, Loss::Coin, k, 100);
            assert!(
                blind_coin.residue > 1.5 * feedback_counter.residue,
                "k={k}: blind/coin {} vs feedback/counter {}",
                blind_coin.residue,
                feedback_counter.residue
            );
        }
    }

    #[test]
    fn pull_leaves_less_residue_than_push() {
        for k in 1..=2 {
            let push = report(Direction::Push, Removal::Feedback, Loss::Counter, k, 100);
            let pull = report(Direction::Pull, Removal::Feedback, Loss::Counter, k, 100);
            assert!(
                pull.residue < 0.5 * push.residue,
                "k={k}: pull {} vs push {}",
                pull.residue,
                push.residue
            );
        }
    }
}
