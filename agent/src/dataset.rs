//! The site's data as the learner sees it: training examples, held-out cases
//! and item popularity.
//!
//! Held-out protocol (DESIGN.md, "Evaluation"): for each customer with at
//! least two orders, the last order is held out; it never appears in training
//! examples, nor in the popularity counts. Only consenting customers are used,
//! for training and for evaluation alike.

use potluck_shared::model::{Example, history_weights, training_examples};

use crate::store::CustomerHistory;

/// One held-out order to rank.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCase {
    /// The order to predict, with the history before it.
    pub example: Example,
    /// How often the customer ordered each item before (menu index, count).
    pub personal: Vec<(u32, u32)>,
    /// The customer's audit-only attributes, for fairness audits.
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// A site's prepared data.
#[derive(Debug, Clone, Default)]
pub struct SiteData {
    /// Training examples (every order after a customer's first, except held-out ones).
    pub train: Vec<Example>,
    /// Held-out cases.
    pub eval: Vec<EvalCase>,
    /// Item order counts over the training orders, indexed by menu position.
    pub popularity: Vec<u32>,
    /// Each customer's training examples, as a range of `train`.
    pub customers: Vec<std::ops::Range<usize>>,
}

impl SiteData {
    /// One customer's training examples.
    pub fn customer_examples(&self, customer: usize) -> &[Example] {
        &self.train[self.customers[customer].clone()]
    }
}

impl SiteData {
    /// Split customers' histories into training examples and held-out cases.
    pub fn prepare(histories: &[CustomerHistory], menu_len: usize, decay: f32) -> Self {
        let mut data = SiteData {
            popularity: vec![0; menu_len],
            ..Self::default()
        };
        for history in histories {
            let orders = &history.orders;
            let train_orders = if orders.len() >= 2 {
                let (before, last) = orders.split_at(orders.len() - 1);
                let mut counts = std::collections::BTreeMap::<u32, u32>::new();
                for item in before.iter().flat_map(|o| &o.items) {
                    *counts.entry(*item).or_default() += 1;
                }
                data.eval.push(EvalCase {
                    example: Example {
                        history: history_weights(before, decay),
                        weekday: last[0].weekday,
                        hour: last[0].hour,
                        target: last[0].items.clone(),
                    },
                    personal: counts.into_iter().collect(),
                    attributes: history.attributes.clone(),
                });
                before
            } else {
                &orders[..]
            };
            for item in train_orders.iter().flat_map(|o| &o.items) {
                if let Some(count) = data.popularity.get_mut(*item as usize) {
                    *count += 1;
                }
            }
            let start = data.train.len();
            data.train.extend(training_examples(train_orders, decay));
            data.customers.push(start..data.train.len());
        }
        data
    }
}
