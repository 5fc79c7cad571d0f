//! A site's own record of the privacy it has spent on its customers, across
//! everything it takes part in.
//!
//! The site checks every round against its ledger before touching customer
//! data and records the round before anything derived from it leaves, so a
//! restarted, replaced or dishonest coordinator cannot make it overspend.
//! The cap is on the composition of every round recorded, whatever lineage
//! the coordinator names: a coordinator that calls each round a new lineage
//! gets no fresh budget. With a window, rounds older than it no longer count
//! (the budget renews, as in "ε per customer per rolling year").

use serde::{Deserialize, Serialize};

use super::accountant::{Accountant, Step};
use crate::ids::RoundId;

/// The rounds a site took part in, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Rounds recorded, oldest first.
    pub entries: Vec<LedgerEntry>,
}

/// One round's mechanism.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The lineage the coordinator named; for the record only.
    pub lineage: String,
    /// The coordinator's round.
    pub round: RoundId,
    /// Its cost, as this site enforced it.
    pub step: Step,
    /// When it was recorded (seconds since 1970); `None` for rounds recorded
    /// before times were kept, which never leave the window.
    pub at: Option<u64>,
}

/// What a site allows to be spent on its customers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    /// Largest ε over the rounds in the window, every lineage together.
    pub max_epsilon: f64,
    /// The δ ε is stated at.
    pub delta: f64,
    /// Rounds older than this many seconds no longer count; `None`: all count.
    pub window_secs: Option<u64>,
}

/// What the ledger shows against a cap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spent {
    /// ε of the rounds in the window.
    pub epsilon: f64,
    /// The cap.
    pub max_epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Charges in the window: rounds, and one-off releases paid with them.
    pub rounds: usize,
    /// The lineages they were named, each once.
    pub lineages: Vec<String>,
}

impl Spent {
    /// ε left before the cap.
    pub fn remaining(&self) -> f64 {
        (self.max_epsilon - self.epsilon).max(0.0)
    }
}

/// A round the ledger does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "privacy budget of this site's customers: epsilon {spent:.4} spent over {rounds} rounds \
     (every lineage together{window}); this round of lineage {lineage:?} would bring it to \
     {next:.4}, above this site's maximum {max} (delta {delta})",
    window = match window_days { Some(d) => format!(", last {d} days"), None => String::new() }
)]
pub struct Refusal {
    /// The lineage the round was named.
    pub lineage: String,
    /// ε spent.
    pub spent: f64,
    /// ε after the round.
    pub next: f64,
    /// The site's maximum.
    pub max: f64,
    /// δ.
    pub delta: f64,
    /// Rounds counted.
    pub rounds: usize,
    /// The window, in days, if one is set.
    pub window_days: Option<f64>,
}

/// Seconds since 1970 at `at`, as the ledger counts time; a clock before
/// 1970 reads 0, which keeps every round in any window (never undercounts).
pub fn unix_seconds(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Ledger {
    fn in_window<'a>(&'a self, cap: &Cap, now: u64) -> impl Iterator<Item = &'a LedgerEntry> {
        let since = cap.window_secs.map(|w| now.saturating_sub(w));
        self.entries.iter().filter(move |e| match (since, e.at) {
            (Some(since), Some(at)) => at >= since,
            _ => true,
        })
    }

    fn accountant<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> Accountant {
        // Rounds mostly repeat one step: compose each distinct step once,
        // times its count, so a charge costs the same after a thousand rounds.
        let mut counts: Vec<(Step, u64)> = Vec::new();
        for entry in entries {
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

    /// What is spent within `cap`'s window at `now` (seconds since 1970).
    pub fn spent(&self, cap: &Cap, now: u64) -> Spent {
        let mut lineages: Vec<String> = Vec::new();
        let mut rounds = 0;
        for entry in self.in_window(cap, now) {
            rounds += 1;
            if !lineages.contains(&entry.lineage) {
                lineages.push(entry.lineage.clone());
            }
        }
        Spent {
            epsilon: Self::accountant(self.in_window(cap, now))
                .epsilon(cap.delta)
                .epsilon,
            max_epsilon: cap.max_epsilon,
            delta: cap.delta,
            rounds,
            lineages,
        }
    }

    /// Record `steps` (a round's mechanism, and any one-off release it pays
    /// for) for `round` at `now` if ε in the window stays within the cap;
    /// returns ε after them.
    pub fn spend(
        &mut self,
        (lineage, round): (&str, RoundId),
        steps: &[Step],
        cap: &Cap,
        now: u64,
    ) -> Result<f64, Refusal> {
        let accountant = Self::accountant(self.in_window(cap, now));
        let spent = accountant.epsilon(cap.delta).epsilon;
        let after = steps
            .iter()
            .fold(accountant, |acc, step| acc.after(step, 1));
        let next = after.epsilon(cap.delta).epsilon;
        if next > cap.max_epsilon {
            return Err(Refusal {
                lineage: lineage.to_string(),
                spent,
                next,
                max: cap.max_epsilon,
                delta: cap.delta,
                rounds: self.in_window(cap, now).count(),
                window_days: cap.window_secs.map(|s| s as f64 / 86_400.0),
            });
        }
        self.entries.extend(steps.iter().map(|&step| LedgerEntry {
            lineage: lineage.to_string(),
            round,
            step,
            at: Some(now),
        }));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn cap(max_epsilon: f64, window_days: Option<u64>) -> Cap {
        Cap {
            max_epsilon,
            delta: 1e-6,
            window_secs: window_days.map(|d| d * DAY),
        }
    }

    #[test]
    fn spends_until_the_maximum_then_refuses_with_the_figures() {
        let mut ledger = Ledger::default();
        let step = Step::gaussian(0.1, 2.0);
        let mut rounds = 0;
        let refusal = loop {
            match ledger.spend(("menu-v1", RoundId(rounds)), &[step], &cap(2.0, None), 0) {
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

    /// Attack: the coordinator names every round a new lineage, hoping each
    /// name opens a fresh budget on the same customers.
    #[test]
    fn renaming_the_lineage_every_round_opens_no_fresh_budget() {
        let step = Step::gaussian(0.1, 2.0);
        let cap = cap(2.0, None);
        let mut honest = Ledger::default();
        let mut renamed = Ledger::default();
        let mut rounds = 0u64;
        while honest
            .spend(("default", RoundId(rounds)), &[step], &cap, 0)
            .is_ok()
        {
            rounds += 1;
        }
        let mut renamed_rounds = 0u64;
        while renamed
            .spend(
                (&format!("fresh-{renamed_rounds}"), RoundId(renamed_rounds)),
                &[step],
                &cap,
                0,
            )
            .is_ok()
        {
            renamed_rounds += 1;
        }
        assert_eq!(renamed_rounds, rounds, "renaming bought extra rounds");
        let spent = renamed.spent(&cap, 0);
        assert!(spent.epsilon <= 2.0 && spent.lineages.len() as u64 == rounds);
    }

    #[test]
    fn rounds_older_than_the_window_stop_counting() {
        let step = Step::gaussian(0.1, 2.0);
        let cap = cap(2.0, Some(365));
        let mut ledger = Ledger::default();
        let mut round = 0;
        while ledger
            .spend(("default", RoundId(round)), &[step], &cap, DAY)
            .is_ok()
        {
            round += 1;
        }
        // Later the same year: still spent.
        let later = 200 * DAY;
        assert!(
            ledger
                .spend(("default", RoundId(round)), &[step], &cap, later)
                .is_err()
        );
        assert!(ledger.spent(&cap, later).remaining() < 0.5);
        // A year and a day after they were recorded, those rounds are out of the window.
        let next_year = 367 * DAY;
        let spent = ledger.spent(&cap, next_year);
        assert_eq!((spent.rounds, spent.epsilon), (0, 0.0));
        ledger
            .spend(("default", RoundId(round)), &[step], &cap, next_year)
            .unwrap();
        // Rounds recorded without a time never leave the window.
        let mut old = Ledger::default();
        old.entries.push(LedgerEntry {
            lineage: "default".into(),
            round: RoundId(0),
            step,
            at: None,
        });
        assert_eq!(old.spent(&cap, next_year * 10).rounds, 1);
    }
}
