//! The burn module.
//!
//! # Shapes
//! - history: `[batch, menu]`, pooled history weights
//! - weekday, hour: `[batch]`, context indices
//! - logits: `[batch, menu]`
//!
//! The customer vector `u = history · E` (E the item embeddings) and the context
//! embeddings feed a one-hidden-layer MLP whose output, added to `u`, is a query
//! `q`; item scores are `q · Eᵀ + item_bias + g · history`. Sharing `E`
//! between input and output keeps the model small; the single global gain
//! `g` lets "ordered X before" raise X's score directly (customers re-order),
//! without any per-customer parameter.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{Example, ModelError, ModelSpec, check_vector};

/// The next-order recommender; field order is the canonical parameter order.
#[derive(Module, Debug)]
pub struct Recommender {
    item_embedding: Param<Tensor<2>>,
    item_bias: Param<Tensor<1>>,
    weekday_embedding: Param<Tensor<2>>,
    hour_embedding: Param<Tensor<2>>,
    hidden_weight: Param<Tensor<2>>,
    hidden_bias: Param<Tensor<1>>,
    output_weight: Param<Tensor<2>>,
    output_bias: Param<Tensor<1>>,
    repeat_gain: Param<Tensor<1>>,
}

/// A batch of examples as tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    history: Tensor<2>,
    weekday: Tensor<1, Int>,
    hour: Tensor<1, Int>,
    target: Tensor<2>,
}

impl Batch {
    /// Densify examples into tensors on `device`; targets are normalised multi-hot rows.
    pub fn new(examples: &[&Example], menu_len: usize, device: &Device) -> Self {
        let n = examples.len();
        let mut history = vec![0.0f32; n * menu_len];
        let mut target = vec![0.0f32; n * menu_len];
        let mut weekday = Vec::with_capacity(n);
        let mut hour = Vec::with_capacity(n);
        for (row, ex) in examples.iter().enumerate() {
            for &(i, w) in &ex.history {
                history[row * menu_len + i as usize] = w;
            }
            let share = 1.0 / ex.target.len().max(1) as f32;
            for &i in &ex.target {
                target[row * menu_len + i as usize] = share;
            }
            weekday.push(i64::from(ex.weekday));
            hour.push(i64::from(ex.hour));
        }
        Self {
            history: Tensor::from_data(TensorData::new(history, [n, menu_len]), device),
            weekday: Tensor::from_data(TensorData::new(weekday, [n]), device),
            hour: Tensor::from_data(TensorData::new(hour, [n]), device),
            target: Tensor::from_data(TensorData::new(target, [n, menu_len]), device),
        }
    }
}

impl Recommender {
    /// Build the module from parameters in the canonical layout.
    pub fn from_params(
        spec: &ModelSpec,
        params: &[f32],
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_vector(params, spec.param_count())?;
        let layout = spec.layout();
        let mut offset = 0;
        let mut take = |i: usize| {
            let slot = &layout[i];
            let values = params[offset..offset + slot.len()].to_vec();
            offset += slot.len();
            TensorData::new(values, slot.shape.clone())
        };
        Ok(Self {
            item_embedding: Param::from_data(take(0), device),
            item_bias: Param::from_data(take(1), device),
            weekday_embedding: Param::from_data(take(2), device),
            hour_embedding: Param::from_data(take(3), device),
            hidden_weight: Param::from_data(take(4), device),
            hidden_bias: Param::from_data(take(5), device),
            output_weight: Param::from_data(take(6), device),
            output_bias: Param::from_data(take(7), device),
            repeat_gain: Param::from_data(take(8), device),
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
        let repeat = batch.history.clone() * self.repeat_gain.val().unsqueeze_dim(0);
        query.matmul(items.transpose()) + self.item_bias.val().unsqueeze_dim(0) + repeat
    }

    /// Mean softmax cross-entropy against the batch's normalised multi-hot targets.
    pub fn loss(&self, batch: &Batch) -> Tensor<1> {
        let log_probs = log_softmax(self.forward(batch), 1);
        (batch.target.clone() * log_probs).sum_dim(1).mean().neg()
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
