//! Synchronous epidemic models of update propagation, after Demers et al., "Epidemic algorithms for
//! replicated database maintenance" (PODC 1987).
//!
//! These models abstract away the network, message loss and the contents of the database: they follow a
//! single update through a fully connected population of `n` sites that all choose partners uniformly at
//! random. They serve as a reference against which Rumormill's protocol can be compared.
//!
//! # The model
//!
//! Time advances in *cycles*. The update is injected at one site at cycle 0; the first exchanges happen in
//! cycle 1. In every cycle each site that takes part picks one partner uniformly at random among the
//! `n - 1` *other* sites. Every exchange in a cycle is decided on the state the sites had at the *start*
//! of that cycle, so a site that learns the update during a cycle passes it on from the next cycle.
//!
//! Exchanges come in three [`Direction`]s:
//!
//! - [`Direction::Push`]: the caller sends the update to its partner if the caller has it;
//! - [`Direction::Pull`]: the partner sends the update back to the caller if the partner has it;
//! - [`Direction::PushPull`]: both, over the same contact.
//!
//! Two families of epidemics are simulated:
//!
//! - [`anti_entropy`] is a *simple* epidemic: every site keeps exchanging forever, so the update always
//!   reaches every site; the question is how many cycles that takes.
//! - [`demers`] is *rumor mongering*, a *complex* epidemic: sites are susceptible (do not know the
//!   update), infective (know it and spread it) or removed (know it but no longer spread it). Infective
//!   sites lose interest according to a [`Removal`] and [`Loss`] rule, the epidemic dies out, and some
//!   sites (the *residue*) may never hear of the update. The question is the trade-off between residue,
//!   traffic and delay.
//!
//! Simulations are deterministic: run `r` of a simulation with seed `s` draws its random numbers from a
//! [`rand_chacha::ChaCha8Rng`] seeded with `s` and set to stream `r`, so every run is reproducible on its
//! own and independent of how many runs precede it.

use std::error::Error;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serializer;

pub mod anti_entropy;
pub mod demers;

pub use anti_entropy::{AntiEntropyParams, AntiEntropyReport, theory_rounds};
pub use demers::{DemersParams, DemersReport};
pub use rumormill_core::replication::{Direction, Loss, Removal};

/// Serializes a protocol option such as [`Direction`] as its name (`"push-pull"`), for
/// `#[serde(serialize_with)]`: the core's option types do not implement [`serde::Serialize`].
fn serialize_name<T: fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Error returned when simulation parameters describe no meaningful experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamError {
    /// Fewer than two sites: a site needs another site to contact.
    TooFewNodes {
        /// The requested number of sites.
        nodes: usize,
    },
    /// More sites than site identifiers (`u32`) can address.
    TooManyNodes {
        /// The requested number of sites.
        nodes: usize,
    },
    /// No runs requested, so there is nothing to average.
    NoRuns,
    /// The loss-of-interest parameter `k` is 0; it must be at least 1.
    ZeroK,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::TooFewNodes { nodes } => write!(f, "nodes must be at least 2, got {nodes}"),
            ParamError::TooManyNodes { nodes } => write!(f, "nodes must be at most {}, got {nodes}", u32::MAX),
            ParamError::NoRuns => f.write_str("runs must be at least 1, got 0"),
            ParamError::ZeroK => f.write_str("k must be at least 1, got 0"),
        }
    }
}

impl Error for ParamError {}

/// Checks the population size and run count shared by all models; returns the population as a site count.
fn validate_population(nodes: usize, runs: usize) -> Result<u32, ParamError> {
    if nodes < 2 {
        return Err(ParamError::TooFewNodes { nodes });
    }
    let sites = u32::try_from(nodes).map_err(|_| ParamError::TooManyNodes { nodes })?;
    if runs == 0 {
        return Err(ParamError::NoRuns);
    }
    Ok(sites)
}

/// The random number generator of run `run` of a simulation seeded with `seed`.
fn run_rng(seed: u64, run: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(run as u64);
    rng
}

/// A site chosen uniformly at random among the `sites - 1` sites other than `site`.
#[inline]
fn random_partner(rng: &mut ChaCha8Rng, sites: u32, site: u32) -> u32 {
    let partner = rng.random_range(0..sites - 1);
    if partner >= site { partner + 1 } else { partner }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_round_trips_through_its_name() {
        for &direction in Direction::ALL {
            assert_eq!(direction.to_string().parse::<Direction>(), Ok(direction));
        }
    }

    #[test]
    fn unknown_direction_lists_the_valid_names() {
        let err = "sideways".parse::<Direction>().unwrap_err();
        assert!(err.contains(r#""sideways""#), "{err}");
        assert_eq!(
            err.to_string(),
            r#"invalid direction "sideways": expected one of push, pull, push-pull"#
        );
    }

    #[test]
    fn random_partner_is_never_the_caller_and_covers_everyone_else() {
        let mut rng = run_rng(7, 0);
        let mut seen = [0u32; 5];
        for _ in 0..5_000 {
            let partner = random_partner(&mut rng, 5, 2);
            seen[partner as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        for (site, &count) in seen.iter().enumerate().filter(|&(site, _)| site != 2) {
            assert!((1_100..1_400).contains(&count), "site {site} chosen {count} times");
        }
    }

    #[test]
    fn runs_of_the_same_seed_use_different_streams() {
        let first: u64 = run_rng(1, 0).random();
        assert_eq!(first, run_rng(1, 0).random::<u64>());
        assert_ne!(first, run_rng(1, 1).random::<u64>());
        assert_ne!(first, run_rng(2, 0).random::<u64>());
    }

    #[test]
    fn population_validation() {
        assert_eq!(validate_population(1, 1), Err(ParamError::TooFewNodes { nodes: 1 }));
        assert_eq!(validate_population(2, 0), Err(ParamError::NoRuns));
        assert_eq!(validate_population(2, 1), Ok(2));
    }
}
