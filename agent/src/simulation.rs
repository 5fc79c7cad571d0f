//! Hosting many virtual sites in one process, for research runs (`potluck-sim`).
//!
//! Each virtual site is a whole [`crate::Agent`] with its own certificate,
//! store, keys and ledger; what they share is one QUIC endpoint (one UDP
//! socket instead of one per site) and a pool of compute slots, so that a
//! thousand sites do not train at once on two cores. For reproducible runs
//! their randomness is derived from a seed, and faults are injected from it.

use std::sync::Arc;
use std::time::Duration;

use potluck_shared::secagg::ClientMessage;
use potluck_shared::wire::SiteMessage;
use potluck_shared::{RoundId, SiteId};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What virtual sites of one process share.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The client endpoint this virtual site connects through (a few share one).
    pub endpoint: quinn::Endpoint,
    /// Training and evaluation jobs running at once, across sites.
    pub compute: Arc<tokio::sync::Semaphore>,
    /// Seed of every site's randomness (training order, sampling, noise).
    pub seed: u64,
    /// Faults to inject.
    pub faults: Faults,
}

/// Faults injected reproducibly: whether a site drops out of a round, and
/// where, depends only on the seed, the site and the round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability, per site and round, of leaving at each phase.
    pub dropout: PhaseRates,
    /// Fraction of sites that are slow (the same sites every round).
    pub slow_fraction: f64,
    /// How much later a slow site sends its update, in seconds.
    pub slow_delay_secs: f64,
}

/// A probability for each phase of a secure round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseRates {
    /// Before advertising keys (the site never joins).
    pub advertise: f64,
    /// Before sending key shares.
    pub share: f64,
    /// After training, before sending the masked update.
    pub input: f64,
    /// Before helping to unmask (the update is in the sum, the site is gone).
    pub unmask: f64,
}

/// A phase of a secure round, named as in the fault settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Advertising keys.
    Advertise,
    /// Sending key shares.
    Share,
    /// Sending the masked update.
    Input,
    /// Consistency check and unmasking.
    Unmask,
}

impl Phase {
    /// The phase a site's message belongs to, if it is a secure aggregation message.
    pub fn of(message: &SiteMessage) -> Option<(RoundId, Self)> {
        let SiteMessage::SecAgg { round, message } = message else {
            return None;
        };
        let phase = match message {
            ClientMessage::AdvertiseKeys { .. } => Self::Advertise,
            ClientMessage::EncryptedShares { .. } => Self::Share,
            ClientMessage::MaskedInput(_) => Self::Input,
            ClientMessage::SurvivorSignature(_) | ClientMessage::UnmaskShares { .. } => {
                Self::Unmask
            }
            _ => return None,
        };
        Some((*round, phase))
    }

    /// The name used in settings and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Advertise => "advertise",
            Self::Share => "share",
            Self::Input => "input",
            Self::Unmask => "unmask",
        }
    }
}

impl Faults {
    /// Whether `site` leaves `round` at `phase`. A site leaves at most once
    /// per round: at the first phase whose draw says so.
    pub fn drops_at(&self, seed: u64, site: &SiteId, round: RoundId, phase: Phase) -> bool {
        let rate = match phase {
            Phase::Advertise => self.dropout.advertise,
            Phase::Share => self.dropout.share,
            Phase::Input => self.dropout.input,
            Phase::Unmask => self.dropout.unmask,
        };
        rate > 0.0 && uniform(seed, "dropout", site, round.0, phase.name()) < rate
    }

    /// How long `site` waits before sending its update.
    pub fn delay(&self, seed: u64, site: &SiteId) -> Duration {
        if self.slow_fraction > 0.0 && uniform(seed, "slow", site, 0, "") < self.slow_fraction {
            Duration::from_secs_f64(self.slow_delay_secs.max(0.0))
        } else {
            Duration::ZERO
        }
    }
}

/// The generator a site uses for `purpose` in `round`: from the simulation
/// seed when there is one, else from the operating system.
pub fn round_rng(seed: Option<u64>, site: &SiteId, round: RoundId, purpose: &str) -> StdRng {
    match seed {
        Some(seed) => StdRng::from_seed(digest(seed, purpose, site, round.0, "")),
        None => rand::make_rng(),
    }
}

/// A uniform draw in [0, 1) fixed by its inputs.
fn uniform(seed: u64, what: &str, site: &SiteId, round: u64, detail: &str) -> f64 {
    let bytes = digest(seed, what, site, round, detail);
    let word = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    (word >> 11) as f64 / (1u64 << 53) as f64
}

fn digest(seed: u64, what: &str, site: &SiteId, round: u64, detail: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [
        b"potluck-sim-v1".as_slice(),
        &seed.to_be_bytes(),
        what.as_bytes(),
        site.as_str().as_bytes(),
        &round.to_be_bytes(),
        detail.as_bytes(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(i: usize) -> SiteId {
        SiteId::new(format!("site-{i:03}")).expect("valid id")
    }

    #[test]
    fn dropout_rate_is_met_and_repeatable() {
        let faults = Faults {
            dropout: PhaseRates {
                input: 0.2,
                ..PhaseRates::default()
            },
            ..Faults::default()
        };
        let drops = |seed| {
            (0..2000)
                .filter(|&i| faults.drops_at(seed, &site(i), RoundId(3), Phase::Input))
                .collect::<Vec<_>>()
        };
        let first = drops(9);
        assert_eq!(first, drops(9), "the same seed drops the same sites");
        assert_ne!(first, drops(10), "another seed drops others");
        let rate = first.len() as f64 / 2000.0;
        assert!((0.17..0.23).contains(&rate), "dropout rate {rate}");
        assert!(
            (0..200).all(|i| !faults.drops_at(9, &site(i), RoundId(3), Phase::Share)),
            "a phase with rate 0 never drops"
        );
    }

    #[test]
    fn slow_sites_are_the_same_every_round() {
        let faults = Faults {
            slow_fraction: 0.5,
            slow_delay_secs: 2.0,
            ..Faults::default()
        };
        let slow = (0..400)
            .filter(|&i| faults.delay(1, &site(i)) == Duration::from_secs(2))
            .count();
        assert!((160..240).contains(&slow), "{slow} of 400 slow");
    }

    #[test]
    fn seeded_generators_repeat_and_differ_by_purpose() {
        use rand::RngExt;
        let a = round_rng(Some(1), &site(1), RoundId(2), "train").random::<u64>();
        let b = round_rng(Some(1), &site(1), RoundId(2), "train").random::<u64>();
        let c = round_rng(Some(1), &site(1), RoundId(2), "finish").random::<u64>();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
