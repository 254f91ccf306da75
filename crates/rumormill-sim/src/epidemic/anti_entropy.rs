//! Anti-entropy: the simple epidemic of Demers et al. (1987), section 1.3.
//!
//! Every site contacts a random other site in every cycle and the two reconcile according to the
//! [`Direction`] (see the [module docs](super) for the cycle model): with push the caller sends the update
//! if it has it, with pull the partner sends it if it has it, with push-pull both. Nobody ever stops, so
//! the update reaches every site; a run lasts until it has, and [`run`] reports how many cycles that took.

use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Direction, ParamError, random_partner, run_rng, serialize_name, validate_population};

/// Parameters of an anti-entropy experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AntiEntropyParams {
    /// Number of sites, at least 2.
    pub nodes: usize,
    /// Number of independent runs, at least 1.
    pub runs: usize,
    /// Seed of the random number generator; run `r` uses stream `r` of this seed.
    pub seed: u64,
    /// How the update travels over a contact.
    #[serde(serialize_with = "serialize_name")]
    pub direction: Direction,
}

impl Default for AntiEntropyParams {
    /// 1000 sites, push-pull, 1000 runs.
    fn default() -> Self {
        Self {
            nodes: 1000,
            runs: 1000,
            seed: 0,
            direction: Direction::PushPull,
        }
    }
}

/// Distribution over runs of the number of cycles until every site had the update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AntiEntropyReport {
    /// Mean number of cycles.
    pub rounds_mean: f64,
    /// 99th percentile (nearest rank) of the number of cycles.
    pub rounds_p99: u32,
    /// Largest number of cycles in any run.
    pub rounds_max: u32,
    /// Smallest number of cycles in any run.
    pub rounds_min: u32,
    /// Number of runs.
    pub runs: usize,
    /// Number of sites.
    pub nodes: usize,
}

/// Simulates `params.runs` independent anti-entropy epidemics from one informed site until every site is
/// informed.
///
/// # Errors
///
/// Returns a [`ParamError`] if `nodes < 2`, `nodes` exceeds `u32::MAX` or `runs == 0`.
pub fn run(params: &AntiEntropyParams) -> Result<AntiEntropyReport, ParamError> {
    let sites = validate_population(params.nodes, params.runs)?;
    let mut epidemic = Epidemic::new(sites, params.direction);
    let mut rounds: Vec<u32> = (0..params.runs)
        .map(|run| epidemic.run(&mut run_rng(params.seed, run)))
        .collect();
    rounds.sort_unstable();

    let p99_rank = (rounds.len() * 99).div_ceil(100).max(1);
    Ok(AntiEntropyReport {
        rounds_mean: rounds.iter().map(|&r| f64::from(r)).sum::<f64>() / rounds.len() as f64,
        rounds_p99: rounds[p99_rank - 1],
        rounds_max: rounds[rounds.len() - 1],
        rounds_min: rounds[0],
        runs: params.runs,
        nodes: params.nodes,
    })
}

/// The leading terms of the expected number of cycles for anti-entropy to reach all `n` sites.
///
/// | direction | formula | source |
/// | --- | --- | --- |
/// | push | `log2(n) + ln(n)` | Frieze & Grimmett (1985), Pittel (1987): `log2 n + ln n + O(1)` |
/// | pull | `log2(n) + ln(ln(n))` | Karp et al. (2000): `log2 n + O(ln ln n)` |
/// | push-pull | `log3(n) + ln(ln(n))` | Karp et al. (2000): `log3 n + O(ln ln n)` |
///
/// The push formula omits only a constant. For pull and push-pull the `O(ln ln n)` term, which comes from
/// the final phase where the fraction of uninformed sites roughly squares every cycle, is taken with
/// coefficient 1; it is an order of magnitude, not an exact constant. Returns 0 for `n < 2`.
pub fn theory_rounds(direction: Direction, n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let n = n as f64;
    match direction {
        Direction::Push => n.log2() + n.ln(),
        Direction::Pull => n.log2() + n.ln().ln(),
        Direction::PushPull => n.ln() / 3f64.ln() + n.ln().ln(),
    }
}

/// What a site knows about the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// Has not heard of the update.
    Unaware,
    /// Heard of it during the current cycle: it cannot pass it on before the next one.
    JustInformed,
    /// Knew it at the start of the current cycle.
    Aware,
}

/// The state of one run, with buffers reused from run to run.
struct Epidemic {
    sites: u32,
    direction: Direction,
    state: Vec<Site>,
    /// Sites aware at the start of the current cycle.
    aware: Vec<u32>,
    /// Sites informed during the current cycle.
    just_informed: Vec<u32>,
}

impl Epidemic {
    fn new(sites: u32, direction: Direction) -> Self {
        let len = sites as usize;
        Self {
            sites,
            direction,
            state: vec![Site::Unaware; len],
            aware: Vec::with_capacity(len),
            just_informed: Vec::with_capacity(len),
        }
    }

    /// Runs one epidemic from site 0 and returns the number of cycles until every site was informed.
    fn run(&mut self, rng: &mut ChaCha8Rng) -> u32 {
        self.state.fill(Site::Unaware);
        self.aware.clear();
        self.state[0] = Site::Aware;
        self.aware.push(0);

        let mut cycle = 0;
        while self.aware.len() < self.sites as usize {
            cycle += 1;
            self.exchange(rng);
            for &site in &self.just_informed {
                self.state[site as usize] = Site::Aware;
            }
            self.aware.append(&mut self.just_informed);
        }
        cycle
    }

    /// Makes this cycle's contacts. Contacts that cannot inform anybody are skipped without drawing a
    /// partner, which leaves the distribution of the process unchanged.
    fn exchange(&mut self, rng: &mut ChaCha8Rng) {
        match self.direction {
            // Only aware callers can inform their partner.
            Direction::Push => {
                for i in 0..self.aware.len() {
                    let caller = self.aware[i];
                    let partner = random_partner(rng, self.sites, caller);
                    self.inform(partner);
                }
            }
            // Only unaware callers can learn anything.
            Direction::Pull => {
                for caller in 0..self.sites {
                    if self.state[caller as usize] != Site::Aware {
                        let partner = random_partner(rng, self.sites, caller);
                        if self.state[partner as usize] == Site::Aware {
                            self.inform(caller);
                        }
                    }
                }
            }
            Direction::PushPull => {
                for caller in 0..self.sites {
                    let partner = random_partner(rng, self.sites, caller);
                    if self.state[caller as usize] == Site::Aware {
                        self.inform(partner);
                    } else if self.state[partner as usize] == Site::Aware {
                        self.inform(caller);
                    }
                }
            }
        }
    }

    fn inform(&mut self, site: u32) {
        let state = &mut self.state[site as usize];
        if *state == Site::Unaware {
            *state = Site::JustInformed;
            self.just_informed.push(site);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(direction: Direction, nodes: usize, runs: usize) -> AntiEntropyReport {
        run(&AntiEntropyParams {
            nodes,
            runs,
            seed: 42,
            direction,
        })
        .expect("valid parameters")
    }

    #[test]
    fn same_seed_gives_identical_reports() {
        let params = AntiEntropyParams {
            nodes: 300,
            runs: 30,
            seed: 5,
            direction: Direction::Pull,
        };
        let first = run(&params).unwrap();
        assert_eq!(first, run(&params).unwrap());
        let other_seeds: Vec<_> = (6..10)
            .map(|seed| run(&AntiEntropyParams { seed, ..params }).unwrap())
            .collect();
        assert!(other_seeds.iter().any(|other| other.rounds_mean != first.rounds_mean));
    }

    #[test]
    fn every_run_informs_every_site() {
        let mut epidemic = Epidemic::new(500, Direction::Push);
        for run in 0..20 {
            let cycles = epidemic.run(&mut run_rng(3, run));
            assert!(cycles > 0);
            assert!(epidemic.state.iter().all(|&site| site == Site::Aware), "run {run}");
            assert_eq!(epidemic.aware.len(), 500);
        }
    }

    #[test]
    fn report_statistics_are_ordered() {
        for &direction in Direction::ALL {
            let report = report(direction, 200, 50);
            assert!(report.rounds_min >= 1, "{direction}: {report:?}");
            assert!(
                f64::from(report.rounds_min) <= report.rounds_mean,
                "{direction}: {report:?}"
            );
            assert!(
                report.rounds_mean <= f64::from(report.rounds_p99),
                "{direction}: {report:?}"
            );
            assert!(report.rounds_p99 <= report.rounds_max, "{direction}: {report:?}");
        }
    }

    #[test]
    fn two_sites_take_one_cycle() {
        for &direction in Direction::ALL {
            let report = report(direction, 2, 5);
            assert_eq!((report.rounds_min, report.rounds_max), (1, 1), "{direction}");
        }
    }

    #[test]
    fn push_pull_rounds_match_theory() {
        let report = report(Direction::PushPull, 1000, 100);
        let theory = theory_rounds(Direction::PushPull, 1000);
        assert!((report.rounds_mean - theory).abs() < 3.0, "{report:?} vs {theory}");
    }

    #[test]
    fn push_rounds_match_theory() {
        let report = report(Direction::Push, 1000, 100);
        let theory = theory_rounds(Direction::Push, 1000);
        assert!((report.rounds_mean - theory).abs() < 2.0, "{report:?} vs {theory}");
    }

    #[test]
    fn push_pull_is_fastest_and_push_slowest() {
        let push = report(Direction::Push, 1000, 50).rounds_mean;
        let pull = report(Direction::Pull, 1000, 50).rounds_mean;
        let push_pull = report(Direction::PushPull, 1000, 50).rounds_mean;
        assert!(
            push_pull < pull && pull < push,
            "push {push}, pull {pull}, push-pull {push_pull}"
        );
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let valid = AntiEntropyParams::default();
        assert_eq!(
            run(&AntiEntropyParams { nodes: 0, ..valid }),
            Err(ParamError::TooFewNodes { nodes: 0 })
        );
        assert_eq!(run(&AntiEntropyParams { runs: 0, ..valid }), Err(ParamError::NoRuns));
    }
}
