//! Model inputs computed at the site from a customer's own order history.
//!
//! A customer is represented by a recency-weighted pooling of the items they
//! ordered before: the most recent order has weight 1, the one before it
//! `decay`, then `decay^2`, and so on; the weights are normalised to sum to 1.
//! There are no per-customer parameters, so a new customer is served from their
//! first order and erasing a customer is deleting their rows.

use serde::{Deserialize, Serialize};

/// One order of one customer, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order time, seconds since the Unix epoch (orders are sorted by it).
    pub time: i64,
    /// Day of the week in the site's local time, Monday = 0.
    pub weekday: u8,
    /// Hour of the day in the site's local time, 0 to 23.
    pub hour: u8,
    /// Distinct menu indices of the items ordered.
    pub items: Vec<u32>,
}

/// A training or evaluation example: a history, a context and the items ordered next.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Sparse pooled history: (menu index, weight), weights summing to 1.
    pub history: Vec<(u32, f32)>,
    /// Weekday of the order to predict.
    pub weekday: u8,
    /// Hour of the order to predict.
    pub hour: u8,
    /// Items of the order to predict.
    pub target: Vec<u32>,
}

/// Pool the items of `past` orders (oldest first) with recency weights.
///
/// Returns sparse (index, weight) pairs sorted by index, or an empty vector
/// for an empty history.
pub fn history_weights(past: &[OrderRecord], decay: f32) -> Vec<(u32, f32)> {
    let mut weights: std::collections::BTreeMap<u32, f32> = Default::default();
    let mut w = 1.0f32;
    for order in past.iter().rev() {
        for &item in &order.items {
            *weights.entry(item).or_default() += w;
        }
        w *= decay;
    }
    let total: f32 = weights.values().sum();
    if total <= 0.0 {
        return Vec::new();
    }
    weights.into_iter().map(|(i, v)| (i, v / total)).collect()
}

/// One example per order after the first: predict order k from orders before k.
///
/// `orders` must be sorted oldest first.
pub fn training_examples(orders: &[OrderRecord], decay: f32) -> Vec<Example> {
    (1..orders.len())
        .map(|k| Example {
            history: history_weights(&orders[..k], decay),
            weekday: orders[k].weekday,
            hour: orders[k].hour,
            target: orders[k].items.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(time: i64, items: &[u32]) -> OrderRecord {
        OrderRecord {
            time,
            weekday: 0,
            hour: 12,
            items: items.to_vec(),
        }
    }

    #[test]
    fn recent_orders_weigh_more_and_weights_sum_to_one() {
        let past = [order(1, &[0]), order(2, &[1])];
        let w = history_weights(&past, 0.5);
        assert_eq!(w.len(), 2);
        let total: f32 = w.iter().map(|(_, v)| v).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(w[1].1 > w[0].1, "the later order's item weighs more: {w:?}");
        assert!(history_weights(&[], 0.5).is_empty());
    }

    #[test]
    fn examples_predict_each_later_order() {
        let orders = [order(1, &[0]), order(2, &[1]), order(3, &[2, 3])];
        let ex = training_examples(&orders, 0.8);
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].target, vec![2, 3]);
        assert_eq!(ex[0].history, vec![(0, 1.0)]);
    }
}
