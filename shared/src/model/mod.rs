//! The next-order recommender: its specification, its canonical flat parameter
//! layout, and the burn module that computes with it.
//!
//! Both sides agree on a model through its [`ModelSpec`]: the menu, the
//! dimensions and the feature settings. The spec fixes the ordered list of
//! parameters (path and shape), and so the *canonical flat layout*: every
//! parameter's values, row-major, concatenated in that order. Updates, sums and
//! checkpoints are vectors in this layout. [`SpecHash`] fingerprints the spec and
//! is checked before every round.

mod features;
mod menu;
mod recommender;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use features::{
    Context, DAYPARTS, Daypart, Example, OrderRecord, OwnPairs, REPEAT_FEATURES, RepeatFeature,
    SitePrior, cooccurring_pairs, history_weights, prior_release_len, repeat_features,
    topfreq_order, training_examples,
};
pub use menu::{Menu, MenuError, MenuItem};
pub use recommender::{Batch, Recommender};

use crate::ids::ModelVersion;

/// Days in a week, hours in a day: the context vocabularies.
pub const WEEKDAYS: usize = 7;
/// Hours of the day.
pub const HOURS: usize = 24;

/// Slots of the global weights: the explore gain, the prior and neighbour
/// weights and the repeat weights, after everything else (see [`TrainScope`]).
const WEIGHT_SLOTS: usize = 4;
/// Slots of the head: the weights and before them the new-item biases.
const HEAD_SLOTS: usize = 5;
/// Slots of the linear part: the head, then before it the daypart biases and
/// the co-occurrence matrix.
const LINEAR_SLOTS: usize = 7;

/// Which parameters a round trains and its update carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainScope {
    /// The coordinator decides: the weights under customer-level DP, all otherwise.
    #[default]
    Auto,
    /// Every parameter.
    All,
    /// The linear part: the head, the daypart-by-item biases and the
    /// item-to-item co-occurrence matrix (menu² values), not the embeddings
    /// and the MLP.
    Linear,
    /// The head: the weights and the new-item biases (the menu plus 15 values).
    Head,
    /// Only the global weights: the repeat weights, the explore gain and the
    /// prior and neighbour weights (15 values). What customer-level DP trains
    /// by default: a customer's update is then about how to weigh the
    /// features every customer has, which averages into a direction, while
    /// per-item values move towards each customer's own items, which averages
    /// into little but costs the same clipping and noise.
    Weights,
}

impl TrainScope {
    /// The scope a round uses: `Auto` is the weights when the round is
    /// private (a few dozen values learn under noise that drowns thousands).
    pub fn resolve(self, private: bool) -> Self {
        match self {
            Self::Auto if private => Self::Weights,
            Self::Auto => Self::All,
            other => other,
        }
    }
}

/// Dimensions of the recommender.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelDims {
    /// Width of item embeddings (and of the customer representation).
    pub embedding: usize,
    /// Width of each context embedding (weekday, hour).
    pub context: usize,
    /// Width of the hidden MLP layer.
    pub hidden: usize,
}

impl Default for ModelDims {
    fn default() -> Self {
        Self {
            embedding: 32,
            context: 8,
            hidden: 64,
        }
    }
}

/// Everything that determines the model's parameters and features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The franchise menu; item `i` is row `i` of the item embeddings.
    pub menu: Menu,
    /// Layer widths.
    pub dims: ModelDims,
    /// Weight of an order relative to the next more recent one when pooling a history.
    pub history_decay: f32,
}

/// One parameter of the canonical layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    /// Field name in [`Recommender`].
    pub path: &'static str,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

impl ParamSlot {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the slot holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// SHA-256 fingerprint of a [`ModelSpec`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpecHash(pub [u8; 32]);

impl std::fmt::Debug for SpecHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpecHash({self})")
    }
}

impl std::fmt::Display for SpecHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl ModelSpec {
    /// A spec with default dimensions and history decay.
    pub fn new(menu: Menu) -> Self {
        Self {
            menu,
            dims: ModelDims::default(),
            history_decay: 0.8,
        }
    }

    /// The ordered parameter list; the order is [`Recommender`]'s field order.
    pub fn layout(&self) -> Vec<ParamSlot> {
        let (m, d, c, h) = (
            self.menu.len(),
            self.dims.embedding,
            self.dims.context,
            self.dims.hidden,
        );
        let slot = |path, shape: &[usize]| ParamSlot {
            path,
            shape: shape.to_vec(),
        };
        vec![
            slot("item_embedding", &[m, d]),
            slot("weekday_embedding", &[WEEKDAYS, c]),
            slot("hour_embedding", &[HOURS, c]),
            slot("hidden_weight", &[d + 2 * c, h]),
            slot("hidden_bias", &[h]),
            slot("output_weight", &[h, d]),
            slot("output_bias", &[d]),
            slot("cooccurrence", &[m, m]),
            slot("daypart_bias", &[DAYPARTS, m]),
            slot("item_bias", &[m]),
            slot("explore_gain", &[1]),
            slot("prior_weight", &[1]),
            slot("neighbour_weight", &[1]),
            slot("repeat_weight", &[REPEAT_FEATURES, 1]),
        ]
    }

    /// Values in the last `slots` slots of the layout.
    fn tail_len(&self, slots: usize) -> usize {
        let layout = self.layout();
        layout[layout.len() - slots..]
            .iter()
            .map(ParamSlot::len)
            .sum()
    }

    /// The flat range a scope trains (`Auto` is taken as `All`).
    pub fn trainable(&self, scope: TrainScope) -> std::ops::Range<usize> {
        let all = self.param_count();
        match scope {
            TrainScope::Weights => all - self.tail_len(WEIGHT_SLOTS)..all,
            TrainScope::Head => all - self.tail_len(HEAD_SLOTS)..all,
            TrainScope::Linear => all - self.tail_len(LINEAR_SLOTS)..all,
            TrainScope::All | TrainScope::Auto => 0..all,
        }
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.layout().iter().map(ParamSlot::len).sum()
    }

    /// The fingerprint both sides compare before a round.
    ///
    /// Hashes a domain tag, every slot's path and shape in order, the feature
    /// settings and every menu item, each string length-prefixed so that no two
    /// specs share an input.
    pub fn hash(&self) -> SpecHash {
        let mut h = Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(b"potluck-model-spec-v3");
        for slot in self.layout() {
            put(slot.path.as_bytes());
            for dim in &slot.shape {
                put(&(*dim as u64).to_le_bytes());
            }
        }
        put(&self.history_decay.to_le_bytes());
        for item in self.menu.items() {
            put(item.item_id.as_bytes());
            put(item.name.as_bytes());
            put(item.category.as_bytes());
        }
        SpecHash(h.finalize().into())
    }

    /// Deterministic initial parameters in the canonical layout.
    ///
    /// The initial model is the strongest simple baseline, GP-TopFreq: the
    /// repeat weights read only the GP-TopFreq rank (weight 1) and the history
    /// flag (weight 1), so every ordered item scores in (1, 2] in GP-TopFreq
    /// order; every other item scores its site prior (weight 1, a negative
    /// log share), so the free slots go to the site's most popular items,
    /// ties to menu order; everything else in the explore channel starts at
    /// 0. Training can then only add to the baseline.
    /// Embeddings and MLP weights are drawn from N(0, 1/fan_in) (embeddings
    /// with fan-in taken as their width) so that the explore channel has
    /// something to learn from once its gain moves; biases, the co-occurrence
    /// matrix and the daypart biases start at 0.
    pub fn initial_params(&self, seed: u64) -> Vec<f32> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut params = Vec::with_capacity(self.param_count());
        for slot in self.layout() {
            if slot.path == "prior_weight" {
                params.push(1.0);
                continue;
            }
            if slot.path == "repeat_weight" {
                params.extend((0..REPEAT_FEATURES).map(|f| {
                    if f == RepeatFeature::InHistory as usize
                        || f == RepeatFeature::TopFreqRank as usize
                    {
                        1.0
                    } else {
                        0.0
                    }
                }));
                continue;
            }
            if slot.shape.len() == 1 || matches!(slot.path, "cooccurrence" | "daypart_bias") {
                params.extend(std::iter::repeat_n(0.0, slot.len()));
                continue;
            }
            let fan_in = if slot.path.ends_with("embedding") {
                slot.shape[1]
            } else {
                slot.shape[0]
            };
            let normal = Normal::new(0.0f32, (1.0 / fan_in as f32).sqrt())
                .expect("a positive finite standard deviation");
            params.extend((0..slot.len()).map(|_| normal.sample(&mut rng)));
        }
        params
    }
}

/// A version of the global model, as the coordinator distributes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalModel {
    /// Its version.
    pub version: ModelVersion,
    /// Its architecture and menu.
    pub spec: ModelSpec,
    /// Its parameters in the canonical layout.
    pub params: Vec<f32>,
}

/// Why a model is not usable.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ModelError {
    /// The parameter vector's length does not match the spec.
    #[error("model has {got} parameters, its spec needs {expected}")]
    Length {
        /// Length received.
        got: usize,
        /// Length the spec implies.
        expected: usize,
    },
    /// A parameter is NaN or infinite.
    #[error("model parameter {0} is not finite")]
    NotFinite(usize),
    /// The spec hash differs from the one expected.
    #[error("model spec hash {got} does not match the expected {expected}")]
    SpecMismatch {
        /// Hash of the model received.
        got: SpecHash,
        /// Hash expected.
        expected: SpecHash,
    },
}

/// The first bytes of a model file.
const FILE_MAGIC: &[u8] = b"potluck-model-v1\n";

/// Why a model file cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFileError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a usable model.
    #[error("{path}: not a Potluck model file: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl GlobalModel {
    /// Check that the parameters fit the spec and are finite.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_vector(&self.params, self.spec.param_count())
    }

    /// Write the model to `path`: a magic line, then the wire encoding (menu,
    /// architecture, version and parameters).
    pub fn write_file(&self, path: &std::path::Path) -> Result<(), ModelFileError> {
        let name = path.display().to_string();
        let encoded = crate::wire::codec::encode(self).map_err(|e| ModelFileError::Invalid {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        let bytes = [FILE_MAGIC, &encoded].concat();
        std::fs::write(path, bytes).map_err(|source| ModelFileError::Io { path: name, source })
    }

    /// Read and validate a file written by [`Self::write_file`].
    pub fn read_file(path: &std::path::Path) -> Result<Self, ModelFileError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ModelFileError::Io {
            path: name.clone(),
            source,
        })?;
        let invalid = |reason: String| ModelFileError::Invalid {
            path: name.clone(),
            reason,
        };
        let body = bytes
            .strip_prefix(FILE_MAGIC)
            .ok_or_else(|| invalid("it does not start with the model file header".into()))?;
        let model: Self = crate::wire::codec::decode(body).map_err(|e| invalid(e.to_string()))?;
        model.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(model)
    }
}

/// Check a vector in the canonical layout: right length, finite values.
pub fn check_vector(values: &[f32], expected: usize) -> Result<(), ModelError> {
    if values.len() != expected {
        return Err(ModelError::Length {
            got: values.len(),
            expected,
        });
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(ModelError::NotFinite(i)),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn small_menu(n: usize) -> Menu {
        Menu::new(
            (0..n)
                .map(|i| MenuItem {
                    item_id: format!("i{i}"),
                    name: format!("Item {i}"),
                    category: if i % 2 == 0 { "mains" } else { "drinks" }.into(),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn spec_hash_changes_with_menu_and_dims() {
        let spec = ModelSpec::new(small_menu(5));
        let mut other = spec.clone();
        other.dims.hidden += 1;
        assert_ne!(spec.hash(), other.hash());
        let renamed = ModelSpec::new(small_menu(6));
        assert_ne!(spec.hash(), renamed.hash());
        assert_eq!(spec.hash(), spec.clone().hash());
    }

    #[test]
    fn initial_params_are_deterministic_and_sized() {
        let spec = ModelSpec::new(small_menu(5));
        let a = spec.initial_params(7);
        assert_eq!(a.len(), spec.param_count());
        assert_eq!(a, spec.initial_params(7));
        assert_ne!(a, spec.initial_params(8));
    }
}
