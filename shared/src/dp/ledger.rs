//! A site's own record of the privacy it has spent, per model lineage.
//!
//! The site checks every round against its ledger before touching customer
//! data and records the round before anything derived from it leaves, so a
//! restarted, replaced or dishonest coordinator cannot make it overspend.

use serde::{Deserialize, Serialize};

use super::accountant::{Accountant, Step};
use crate::ids::RoundId;

/// The rounds a site took part in for one lineage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Rounds recorded, oldest first.
    pub entries: Vec<LedgerEntry>,
}

/// One round's mechanism.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The coordinator's round.
    pub round: RoundId,
    /// Its cost, as this site enforced it.
    pub step: Step,
}

/// A round the ledger does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "privacy budget of lineage {lineage:?} at this site: epsilon {spent:.4} spent over {rounds} rounds; \
     this round would bring it to {next:.4}, above this site's maximum {max} (delta {delta})"
)]
pub struct Refusal {
    /// The lineage.
    pub lineage: String,
    /// ε spent.
    pub spent: f64,
    /// ε after the round.
    pub next: f64,
    /// The site's maximum.
    pub max: f64,
    /// δ.
    pub delta: f64,
    /// Rounds recorded.
    pub rounds: usize,
}

impl Ledger {
    fn accountant(&self) -> Accountant {
        // Rounds mostly repeat one step: compose each distinct step once,
        // times its count, so a charge costs the same after a thousand rounds.
        let mut counts: Vec<(Step, u64)> = Vec::new();
        for entry in &self.entries {
            match counts.iter_mut().find(|(step, _)| *step == entry.step) {
                Some((_, count)) => *count += 1,
                None => counts.push((entry.step, 1)),
            }
        }
        let mut accountant = Accountant::default();
        for (step, count) in &counts {
            accountant.compose(step, *count);
        }
        accountant
    }

    /// ε spent at `delta`.
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.accountant().epsilon(delta).epsilon
    }

    /// Record `steps` (a round's mechanism, and any one-off release it pays
    /// for) for `round` if ε stays within `max` at `delta`; returns ε after them.
    pub fn spend(
        &mut self,
        lineage: &str,
        round: RoundId,
        steps: &[Step],
        max: f64,
        delta: f64,
    ) -> Result<f64, Refusal> {
        let accountant = self.accountant();
        let spent = accountant.epsilon(delta).epsilon;
        let after = steps
            .iter()
            .fold(accountant, |acc, step| acc.after(step, 1));
        let next = after.epsilon(delta).epsilon;
        if next > max {
            return Err(Refusal {
                lineage: lineage.to_string(),
                spent,
                next,
                max,
                delta,
                rounds: self.entries.len(),
            });
        }
        self.entries
            .extend(steps.iter().map(|&step| LedgerEntry { round, step }));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_until_the_maximum_then_refuses_with_the_figures() {
        let mut ledger = Ledger::default();
        let step = Step::gaussian(0.1, 2.0);
        let mut rounds = 0;
        let refusal = loop {
            match ledger.spend("menu-v1", RoundId(rounds), &[step], 2.0, 1e-6) {
                Ok(epsilon) => assert!(epsilon <= 2.0),
                Err(refusal) => break refusal,
            }
            rounds += 1;
        };
        assert!(rounds > 0);
        assert_eq!(
            ledger.entries.len() as u64,
            rounds,
            "the refused round is not recorded"
        );
        assert!(refusal.spent <= 2.0 && refusal.next > 2.0);
        let text = refusal.to_string();
        assert!(
            text.contains("menu-v1") && text.contains("maximum 2"),
            "{text}"
        );
    }
}
