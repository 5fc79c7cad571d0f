use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{ModelVersion, RoundId};
use crate::model::{GlobalModel, SpecHash};

/// Messages an agent sends to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SiteMessage {
    /// First message on a connection.
    Hello {
        /// The wire protocol version the agent speaks.
        protocol_version: u16,
        /// The agent's software version, for logs.
        agent_version: String,
    },
    /// A model update for an open round.
    Update(SiteUpdate),
    /// Evaluation counts for a global model version.
    Evaluation(EvalReport),
    /// A secure aggregation message for a round.
    SecAgg {
        /// The round.
        round: RoundId,
        /// The message.
        message: crate::secagg::ClientMessage,
    },
    /// The site will not take part in a round, and why.
    Declined {
        /// The round declined.
        round: RoundId,
        /// A readable reason, logged by the coordinator.
        reason: String,
    },
    /// What the site's own ledger shows, after each private round it joined:
    /// the site enforces it; the coordinator only displays it.
    Budget(SiteBudget),
}

/// A site's own privacy ledger, as it enforces it (every lineage together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiteBudget {
    /// ε spent on the site's customers within its window.
    pub epsilon: f64,
    /// The site's maximum.
    pub max_epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The site's window in days, if it sets one.
    pub window_days: Option<u32>,
}

/// Messages the coordinator sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CoordinatorMessage {
    /// Accepts a `Hello`.
    Welcome {
        /// The wire protocol version the coordinator speaks.
        protocol_version: u16,
        /// The franchise's name, from the CA.
        franchise: String,
    },
    /// Refuses a connection, and why; the coordinator closes after sending it.
    Refused {
        /// A readable reason.
        reason: String,
    },
    /// The current global model: architecture, menu and parameters.
    Model(Arc<GlobalModel>),
    /// A round is open: train on the named model version and send an update.
    RoundOpen(Box<RoundTask>),
    /// A secure aggregation message for a round.
    SecAgg {
        /// The round.
        round: RoundId,
        /// The message.
        message: crate::secagg::ServerMessage,
    },
    /// Serve `version` (recommend with it) from now on. `model` is `None`
    /// when it is the current model the site was last sent, so the common case
    /// costs no second download.
    Release {
        /// The version to serve.
        version: ModelVersion,
        /// Its parameters, when they are not the current model's.
        model: Option<Arc<GlobalModel>>,
    },
    /// A round ended without a new model; drop any work for it.
    RoundAbandoned {
        /// The round abandoned.
        round: RoundId,
        /// Why, for logs.
        reason: String,
    },
    /// The franchise's item neighbours, released once per private lineage
    /// by a census round; sent when it is made and to every site that
    /// connects after.
    Neighbours(Arc<NeighbourRelease>),
}

/// A census round: instead of training, every site sums its consenting
/// customers' item pairs ([`crate::model::cooccurring_pairs`], each
/// customer's scaled to unit L2 norm) under secure aggregation and
/// distributed noise, so the franchise learns which items go together in
/// customers' histories without any site's pairs being seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourCensus {
    /// Items on the menu: the sum holds `menu_len²` values.
    pub menu_len: u32,
}

impl NeighbourCensus {
    /// Values in the census's sum.
    pub fn length(&self) -> usize {
        let m = self.menu_len as usize;
        m * m
    }
}

/// What a census round released: the noisy franchise-wide pair sums, row
/// `i` holding the other items of customers who ordered `i`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourRelease {
    /// The lineage whose budget paid for it.
    pub lineage: String,
    /// The census round.
    pub round: RoundId,
    /// Row-major `[m, m]`.
    pub pairs: Vec<f32>,
}

/// What a site must do in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    /// The round.
    pub round: RoundId,
    /// The global model version to start from.
    pub model_version: ModelVersion,
    /// The spec hash of that model, checked by the site before training.
    pub spec_hash: SpecHash,
    /// Local training and privacy settings.
    pub settings: TrainSettings,
    /// Secure aggregation for this round; `None` only when it is dangerously disabled.
    pub secagg: Option<crate::secagg::Setup>,
    /// Distributed differential privacy for this round; `None` when it is off.
    pub privacy: Option<crate::dp::RoundPrivacy>,
    /// When set, the round does not train: it audits `model_version` for
    /// fairness, summing per-group figures instead of model updates.
    pub audit: Option<crate::fairness::AuditSpec>,
    /// When set, the round does not train: it sums the franchise's item
    /// neighbours for the lineage's private rounds.
    pub census: Option<NeighbourCensus>,
}

impl RoundTask {
    /// A digest of the whole task, which every site of a secure round signs
    /// with its setup ([`crate::secagg::Client::new`]): a site refuses to sum
    /// with sites that were sent other parameters.
    pub fn digest(&self) -> Result<[u8; 32], super::codec::CodecError> {
        use sha2::{Digest, Sha256};
        let bytes = super::codec::encode(self)?;
        let mut h = Sha256::new();
        h.update(b"potluck-round-task-v1");
        h.update(bytes);
        Ok(h.finalize().into())
    }
}

/// Local training settings and the privacy bounds applied to the update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Passes over the local training examples.
    pub epochs: u32,
    /// Local SGD learning rate.
    pub learning_rate: f32,
    /// Examples per local SGD step.
    pub batch_size: u32,
    /// L2 norm bound of the update a site sends.
    pub clip_norm: f32,
    /// Standard deviation of the Gaussian noise a site adds to its clipped update.
    pub noise_std: f32,
    /// Which parameters are trained and sent.
    pub scope: crate::model::TrainScope,
}

impl Default for TrainSettings {
    /// Tuned on the synthetic franchise (20 sites × 1,000 customers, see
    /// `docs/research.md`): three local epochs of SGD at 0.3, a clip bound
    /// above typical site update norms, and light noise.
    fn default() -> Self {
        Self {
            epochs: 3,
            learning_rate: 0.3,
            batch_size: 32,
            clip_norm: 10.0,
            noise_std: 0.01,
            scope: crate::model::TrainScope::Auto,
        }
    }
}

/// Largest number of local epochs a site accepts.
pub const MAX_EPOCHS: u32 = 1_000;
/// Largest local batch a site accepts.
pub const MAX_BATCH_SIZE: u32 = 1 << 16;
/// Largest local learning rate a site accepts.
pub const MAX_LEARNING_RATE: f32 = 1_000.0;

/// A training setting a site refuses, by field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("training setting `{field}` = {value} is outside {allowed}")]
pub struct SettingsError {
    /// The field.
    pub field: &'static str,
    /// Its value, as sent.
    pub value: String,
    /// What is allowed.
    pub allowed: &'static str,
}

impl TrainSettings {
    /// Check every field against what a site will do: the coordinator may
    /// send any value, and none may make a site panic or work without limit.
    pub fn check(&self) -> Result<(), SettingsError> {
        let refuse = |field, value: String, allowed| {
            Err(SettingsError {
                field,
                value,
                allowed,
            })
        };
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return refuse("epochs", self.epochs.to_string(), "1 to 1,000");
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return refuse("batch_size", self.batch_size.to_string(), "1 to 65,536");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= MAX_LEARNING_RATE) {
            let value = self.learning_rate.to_string();
            return refuse("learning_rate", value, "(0, 1000]");
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            let value = self.clip_norm.to_string();
            return refuse("clip_norm", value, "positive finite numbers");
        }
        if !(self.noise_std.is_finite() && self.noise_std >= 0.0) {
            let value = self.noise_std.to_string();
            return refuse("noise_std", value, "finite numbers not below 0");
        }
        Ok(())
    }
}

/// A site's contribution to a round, in plain (not securely aggregated) mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteUpdate {
    /// The round this update is for.
    pub round: RoundId,
    /// The model version it was trained from.
    pub model_version: ModelVersion,
    /// The clipped, noised delta of the round's trainable parameters, in
    /// the canonical flat layout.
    pub delta: Vec<f32>,
    /// The site's mean local training loss.
    pub train_loss: f32,
    /// How much the update counts in the average: the customers it was
    /// trained on, in units of [`crate::round::WEIGHT_UNIT`].
    pub weight: f32,
}

/// Evaluation of one global model version at one site: counts and sums only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model version evaluated.
    pub model_version: ModelVersion,
    /// The counts.
    pub counts: EvalCounts,
}

/// Sums of ranking metrics over held-out orders, combinable across sites by addition.
///
/// Besides the whole held-out order, each metric is also computed on its
/// *repeat* items (ordered by the customer before) and its *new* items
/// (never ordered before), over the orders that have any: next-basket
/// recommendation is mostly won on repeats, and a model can hide losing on
/// one part behind the other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalCounts {
    /// Held-out orders evaluated (one per customer with at least two orders).
    pub cases: u64,
    /// Held-out orders with at least one item the customer ordered before.
    pub repeat_cases: u64,
    /// Held-out orders with at least one item the customer never ordered.
    pub new_cases: u64,
    /// The global model.
    pub model: MetricSums,
    /// Baseline: the site's most popular items.
    pub popularity: MetricSums,
    /// Baseline GP-TopFreq: the customer's own most frequent items (ties to
    /// the more recently ordered), then the site's most popular ones.
    pub personal: MetricSums,
}

/// HR@10 and NDCG@10 summed over cases: whole orders, repeat and new items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSums {
    /// Cases with at least one held-out item in the top 10.
    pub hits: f64,
    /// Sum of NDCG@10.
    pub ndcg: f64,
    /// Repeat cases with at least one held-out repeat item in the top 10.
    pub repeat_hits: f64,
    /// Sum of NDCG@10 against the held-out repeat items.
    pub repeat_ndcg: f64,
    /// New cases with at least one held-out new item in the top 10.
    pub new_hits: f64,
    /// Sum of NDCG@10 against the held-out new items.
    pub new_ndcg: f64,
}

/// Mean metrics of one ranking method; `None` where no case had that part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// HR@10 over whole orders.
    pub hr_at_10: Option<f64>,
    /// NDCG@10 over whole orders.
    pub ndcg_at_10: Option<f64>,
    /// HR@10 on repeat items.
    pub repeat_hr_at_10: Option<f64>,
    /// NDCG@10 on repeat items.
    pub repeat_ndcg_at_10: Option<f64>,
    /// HR@10 on new items.
    pub new_hr_at_10: Option<f64>,
    /// NDCG@10 on new items.
    pub new_ndcg_at_10: Option<f64>,
}

impl MetricSums {
    /// Add another site's sums.
    pub fn add(&mut self, other: &MetricSums) {
        self.hits += other.hits;
        self.ndcg += other.ndcg;
        self.repeat_hits += other.repeat_hits;
        self.repeat_ndcg += other.repeat_ndcg;
        self.new_hits += other.new_hits;
        self.new_ndcg += other.new_ndcg;
    }

    /// Mean HR@10 and NDCG@10 over `cases`, or `None` with no cases.
    pub fn means(&self, cases: u64) -> Option<(f64, f64)> {
        (cases > 0).then(|| (self.hits / cases as f64, self.ndcg / cases as f64))
    }

    fn values(&self) -> [f64; 6] {
        [
            self.hits,
            self.ndcg,
            self.repeat_hits,
            self.repeat_ndcg,
            self.new_hits,
            self.new_ndcg,
        ]
    }
}

impl EvalCounts {
    /// Add another site's counts.
    pub fn add(&mut self, other: &EvalCounts) {
        self.cases += other.cases;
        self.repeat_cases += other.repeat_cases;
        self.new_cases += other.new_cases;
        self.model.add(&other.model);
        self.popularity.add(&other.popularity);
        self.personal.add(&other.personal);
    }

    /// The means of one method's sums.
    pub fn scores(&self, sums: &MetricSums) -> Scores {
        let mean = |sum: f64, cases: u64| (cases > 0).then(|| sum / cases as f64);
        Scores {
            hr_at_10: mean(sums.hits, self.cases),
            ndcg_at_10: mean(sums.ndcg, self.cases),
            repeat_hr_at_10: mean(sums.repeat_hits, self.repeat_cases),
            repeat_ndcg_at_10: mean(sums.repeat_ndcg, self.repeat_cases),
            new_hr_at_10: mean(sums.new_hits, self.new_cases),
            new_ndcg_at_10: mean(sums.new_ndcg, self.new_cases),
        }
    }

    /// Whether the counts are internally consistent (no negative or impossible sums).
    pub fn is_plausible(&self) -> bool {
        let parts_fit = self.repeat_cases <= self.cases && self.new_cases <= self.cases;
        parts_fit
            && [self.model, self.popularity, self.personal]
                .iter()
                .all(|m| {
                    let [hits, ndcg, repeat_hits, repeat_ndcg, new_hits, new_ndcg] = m.values();
                    let within =
                        |v: f64, cases: u64| v.is_finite() && (0.0..=cases as f64).contains(&v);
                    within(hits, self.cases)
                        && within(ndcg, self.cases)
                        && within(repeat_hits, self.repeat_cases)
                        && within(repeat_ndcg, self.repeat_cases)
                        && within(new_hits, self.new_cases)
                        && within(new_ndcg, self.new_cases)
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let msg = SiteMessage::Update(SiteUpdate {
            round: RoundId(3),
            model_version: ModelVersion(2),
            delta: vec![0.5, -1.25, 3.0],
            train_loss: 1.5,
            weight: 2.0,
        });
        let bytes = codec::encode(&msg).unwrap();
        assert_eq!(codec::decode::<SiteMessage>(&bytes).unwrap(), msg);
    }

    #[test]
    fn a_masked_input_travels_as_four_bytes_a_word() {
        let words: Vec<u32> = (0..1000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let msg = SiteMessage::SecAgg {
            round: RoundId(3),
            message: crate::secagg::ClientMessage::MaskedInput(words),
        };
        let bytes = codec::encode(&msg).unwrap();
        assert_eq!(codec::decode::<SiteMessage>(&bytes).unwrap(), msg);
        assert!(bytes.len() <= 4000 + 16, "{} bytes", bytes.len());
        // A byte string that is not whole words is refused, and says so.
        let mut short = bytes.clone();
        let words_at = short.len() - 4000;
        short[words_at - 2..words_at].copy_from_slice(&3999u16.to_le_bytes());
        short.pop();
        let err = codec::decode::<SiteMessage>(&short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32-bit words"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = codec::encode(&SiteMessage::Declined {
            round: RoundId(1),
            reason: "x".into(),
        })
        .unwrap();
        bytes.push(0);
        assert!(codec::decode::<SiteMessage>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = codec::decode::<SiteMessage>(&bytes);
            let _ = codec::decode::<CoordinatorMessage>(&bytes);
        }

        #[test]
        fn a_huge_claimed_length_does_not_allocate(len in (1u64 << 32)..u64::MAX) {
            // Variant 1 (Update), round, version, then a vector claiming `len` elements.
            let mut bytes = vec![1u8, 1, 1, 0xfd];
            bytes.extend_from_slice(&len.to_le_bytes());
            prop_assert!(codec::decode::<SiteMessage>(&bytes).is_err());
        }
    }
}
