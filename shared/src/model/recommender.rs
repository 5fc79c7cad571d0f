//! The burn module: a repeat channel and an explore channel.
//!
//! # Shapes
//! - history: `[batch, menu]`, pooled history weights
//! - repeat: `[batch · menu, REPEAT_FEATURES]`, each item's repeat features
//!   (zero rows for items never ordered)
//! - weekday, hour: `[batch]`, context indices
//! - logits: `[batch, menu]`
//!
//! Item `i`'s score for a customer with pooled history `p` (weights over the
//! menu), ordering at daypart `t`, is
//! `s_i = h_i·(w · f_i) + (1 − h_i)·(b_i + a·π_i + c·ν_i) + Σ_j p_j·W_ji + D_ti + g·(q · E_i)`:
//! - **repeat**: `h_i` is 1 if the customer ordered `i` before and `f_i` are
//!   that item's repeat features; `w` is a dozen global weights. This is the
//!   channel that can say "ordered this 6 times out of 7".
//! - **explore**: for items the customer has not ordered, `π_i` is the site's
//!   prior (its log share of the site's orders, [`super::SitePrior`]) with a
//!   global weight `a`; `ν_i` the log lift of `i` under the site's
//!   neighbour rows mixed by `p` (how much likelier customers with these
//!   items had `i`, [`super::SitePrior::neighbour_scores`]) with a global weight
//!   `c`; `b_i` a global bias; `W` an item-to-item co-occurrence matrix (what customers who
//!   ordered `j` order next); `D` a daypart-by-item bias (breakfast items in
//!   the morning); and `q · E_i` a low-rank, context-aware term: the customer
//!   vector `u = p · E` (E the item embeddings) and the context embeddings
//!   feed a one-hidden-layer MLP whose output, added to `u`, is a query `q`,
//!   scored against every item's embedding, with a global gain `g`.
//!
//! The initial weights ([`super::ModelSpec::initial_params`]) make `w` read
//! only the GP-TopFreq rank and the history flag, `a = 1`, and `b`, `c`, `W`,
//! `D` and `g` at 0, so the untrained model ranks exactly as GP-TopFreq does (the
//! customer's own items, then the site's popular ones) and training can only
//! add to it. No parameter belongs to a
//! customer.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::features::{Daypart, REPEAT_FEATURES};
use super::{Example, ModelError, ModelSpec, check_vector};

/// What a masked-out score is lowered by: enough that it takes no share of a
/// softmax, small enough to stay finite in f32.
const MASKED: f32 = 1.0e4;

/// The weight of the loss over the whole menu, which alone decides where the
/// customer's own items end and new ones begin.
const MERGE_WEIGHT: f32 = 0.25;

/// The next-order recommender; field order is the canonical parameter order.
///
/// The fields from `cooccurrence` on are the model's linear part, from
/// `item_bias` on its *head*, from `explore_gain` on its global *weights*
/// ([`super::TrainScope`]): the parts a round can train on their own.
#[derive(Module, Debug)]
pub struct Recommender {
    item_embedding: Param<Tensor<2>>,
    weekday_embedding: Param<Tensor<2>>,
    hour_embedding: Param<Tensor<2>>,
    hidden_weight: Param<Tensor<2>>,
    hidden_bias: Param<Tensor<1>>,
    output_weight: Param<Tensor<2>>,
    output_bias: Param<Tensor<1>>,
    cooccurrence: Param<Tensor<2>>,
    daypart_bias: Param<Tensor<2>>,
    item_bias: Param<Tensor<1>>,
    explore_gain: Param<Tensor<1>>,
    prior_weight: Param<Tensor<1>>,
    neighbour_weight: Param<Tensor<1>>,
    repeat_weight: Param<Tensor<2>>,
}

/// A batch of examples as tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    history: Tensor<2>,
    repeat: Tensor<2>,
    seen: Tensor<2>,
    prior: Tensor<2>,
    neighbour: Tensor<2>,
    weekday: Tensor<1, Int>,
    hour: Tensor<1, Int>,
    daypart: Tensor<1, Int>,
    target: Tensor<2>,
    menu_len: usize,
}

impl Batch {
    /// Densify examples into tensors on `device`; targets are normalised multi-hot rows.
    pub fn new(examples: &[&Example], menu_len: usize, device: &Device) -> Self {
        let n = examples.len();
        let mut history = vec![0.0f32; n * menu_len];
        let mut repeat = vec![0.0f32; n * menu_len * REPEAT_FEATURES];
        let mut seen = vec![0.0f32; n * menu_len];
        let mut prior = vec![0.0f32; n * menu_len];
        let mut neighbour = vec![0.0f32; n * menu_len];
        let mut target = vec![0.0f32; n * menu_len];
        let mut weekday = Vec::with_capacity(n);
        let mut hour = Vec::with_capacity(n);
        let mut daypart = Vec::with_capacity(n);
        for (row, ex) in examples.iter().enumerate() {
            for &(i, w) in &ex.history {
                history[row * menu_len + i as usize] = w;
            }
            if ex.prior.log_share.len() == menu_len {
                prior[row * menu_len..(row + 1) * menu_len].copy_from_slice(&ex.prior.log_share);
            }
            ex.prior.neighbour_scores(
                &ex.history,
                ex.own_pairs.as_deref(),
                &mut neighbour[row * menu_len..(row + 1) * menu_len],
            );
            for (i, features) in &ex.repeat {
                let cell = row * menu_len + *i as usize;
                seen[cell] = 1.0;
                repeat[cell * REPEAT_FEATURES..(cell + 1) * REPEAT_FEATURES]
                    .copy_from_slice(features);
            }
            let share = 1.0 / ex.target.len().max(1) as f32;
            for &i in &ex.target {
                target[row * menu_len + i as usize] = share;
            }
            weekday.push(i64::from(ex.weekday));
            hour.push(i64::from(ex.hour));
            daypart.push(Daypart::of(ex.hour) as i64);
        }
        let repeat_shape = [n * menu_len, REPEAT_FEATURES];
        Self {
            history: Tensor::from_data(TensorData::new(history, [n, menu_len]), device),
            repeat: Tensor::from_data(TensorData::new(repeat, repeat_shape), device),
            seen: Tensor::from_data(TensorData::new(seen, [n, menu_len]), device),
            prior: Tensor::from_data(TensorData::new(prior, [n, menu_len]), device),
            neighbour: Tensor::from_data(TensorData::new(neighbour, [n, menu_len]), device),
            weekday: Tensor::from_data(TensorData::new(weekday, [n]), device),
            hour: Tensor::from_data(TensorData::new(hour, [n]), device),
            daypart: Tensor::from_data(TensorData::new(daypart, [n]), device),
            target: Tensor::from_data(TensorData::new(target, [n, menu_len]), device),
            menu_len,
        }
    }
}

impl Recommender {
    /// Build the module from parameters in the canonical layout, all trainable.
    pub fn from_params(
        spec: &ModelSpec,
        params: &[f32],
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::with_trainable(spec, params, 0, device)
    }

    /// As [`Self::from_params`], with every parameter before flat offset
    /// `trainable_from` frozen (it must fall on a parameter boundary).
    pub fn with_trainable(
        spec: &ModelSpec,
        params: &[f32],
        trainable_from: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_vector(params, spec.param_count())?;
        let layout = spec.layout();
        let mut offset = 0;
        let mut take = |i: usize| {
            let slot = &layout[i];
            let values = params[offset..offset + slot.len()].to_vec();
            let frozen = offset < trainable_from;
            offset += slot.len();
            (TensorData::new(values, slot.shape.clone()), !frozen)
        };
        fn param<const D: usize>(
            (data, grad): (TensorData, bool),
            device: &Device,
        ) -> Param<Tensor<D>> {
            Param::from_data(data, device).set_require_grad(grad)
        }
        Ok(Self {
            item_embedding: param(take(0), device),
            weekday_embedding: param(take(1), device),
            hour_embedding: param(take(2), device),
            hidden_weight: param(take(3), device),
            hidden_bias: param(take(4), device),
            output_weight: param(take(5), device),
            output_bias: param(take(6), device),
            cooccurrence: param(take(7), device),
            daypart_bias: param(take(8), device),
            item_bias: param(take(9), device),
            explore_gain: param(take(10), device),
            prior_weight: param(take(11), device),
            neighbour_weight: param(take(12), device),
            repeat_weight: param(take(13), device),
        })
    }

    /// The parameters in the canonical layout (burn visits fields in declaration order).
    pub fn to_params(&self) -> Vec<f32> {
        struct Flatten(Vec<f32>);
        impl ModuleVisitor for Flatten {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let data = param.val().into_data();
                let values = data
                    .as_slice::<f32>()
                    .expect("model parameters are stored as f32");
                self.0.extend_from_slice(values);
            }
        }
        let mut flat = Flatten(Vec::new());
        self.visit(&mut flat);
        flat.0
    }

    /// Item scores for each example of the batch.
    pub fn forward(&self, batch: &Batch) -> Tensor<2> {
        let [n, m] = [batch.history.dims()[0], batch.menu_len];
        let items = self.item_embedding.val();
        let user = batch.history.clone().matmul(items.clone());
        let weekday = self
            .weekday_embedding
            .val()
            .select(0, batch.weekday.clone());
        let hour = self.hour_embedding.val().select(0, batch.hour.clone());
        let input = Tensor::cat(vec![user.clone(), weekday, hour], 1);
        let hidden =
            relu(input.matmul(self.hidden_weight.val()) + self.hidden_bias.val().unsqueeze_dim(0));
        let query = hidden.matmul(self.output_weight.val())
            + self.output_bias.val().unsqueeze_dim(0)
            + user;
        let explore = query.matmul(items.transpose()) * self.explore_gain.val().unsqueeze_dim(0);
        let repeat = batch
            .repeat
            .clone()
            .matmul(self.repeat_weight.val())
            .reshape([n, m]);
        let unseen = batch.seen.clone().neg() + 1.0;
        let cooccurrence = batch.history.clone().matmul(self.cooccurrence.val());
        let daypart = self.daypart_bias.val().select(0, batch.daypart.clone());
        explore
            + cooccurrence
            + daypart
            + repeat
            + unseen
                * (self.item_bias.val().unsqueeze_dim(0)
                    + batch.prior.clone() * self.prior_weight.val().unsqueeze_dim(0)
                    + batch.neighbour.clone() * self.neighbour_weight.val().unsqueeze_dim(0))
    }

    /// The loss of each channel on its own items: softmax cross-entropy of
    /// the ordered items the customer had ordered before among those items,
    /// plus that of the new ones among the items never ordered (targets are
    /// normalised multi-hot rows, so an order's weight splits between the
    /// two), plus [`MERGE_WEIGHT`] times the cross-entropy over the whole
    /// menu. The per-channel terms learn to order the customer's own items
    /// and to pick new ones without trading one against the other; only the
    /// small whole-menu term moves the line between them that the untrained
    /// model draws as GP-TopFreq does (the customer's own items first).
    pub fn loss(&self, batch: &Batch) -> Tensor<1> {
        let logits = self.forward(batch);
        let seen = batch.seen.clone();
        let unseen = seen.clone().neg() + 1.0;
        let among = |mask: Tensor<2>| {
            let masked = logits.clone() - (mask.clone().neg() + 1.0) * MASKED;
            (batch.target.clone() * mask * log_softmax(masked, 1)).sum_dim(1)
        };
        let whole = (batch.target.clone() * log_softmax(logits.clone(), 1)).sum_dim(1);
        (among(seen) + among(unseen) + whole * MERGE_WEIGHT)
            .mean()
            .neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::small_menu;
    use burn::module::ModuleVisitor;

    #[test]
    fn flat_layout_round_trips_in_visitor_order() {
        let spec = ModelSpec::new(small_menu(6));
        let params = spec.initial_params(1);
        let device = Device::flex();
        let model = Recommender::from_params(&spec, &params, &device).unwrap();
        assert_eq!(model.to_params(), params);

        #[derive(Default)]
        struct Paths {
            stack: Vec<String>,
            seen: Vec<(String, Vec<usize>)>,
        }
        impl ModuleVisitor for Paths {
            fn enter_module(&mut self, name: &str, _container: &str) {
                self.stack.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container: &str) {
                self.stack.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.seen
                    .push((self.stack.join("."), param.val().shape().to_vec()));
            }
        }
        let mut paths = Paths::default();
        model.visit(&mut paths);
        let expected: Vec<_> = spec
            .layout()
            .into_iter()
            .map(|s| (s.path.to_string(), s.shape))
            .collect();
        assert_eq!(
            paths.seen, expected,
            "the spec's layout is burn's visiting order"
        );
    }

    #[test]
    fn wrong_length_is_refused() {
        let spec = ModelSpec::new(small_menu(3));
        let err = Recommender::from_params(&spec, &[0.0; 3], &Device::flex()).unwrap_err();
        assert!(matches!(err, ModelError::Length { got: 3, .. }));
    }
}
