//! The site's data as the learner sees it: training examples, held-out cases
//! and item popularity.
//!
//! Held-out protocol (DESIGN.md, "Evaluation"): for each customer with at
//! least two orders, the last order is held out; it never appears in training
//! examples, nor in the popularity counts. Only consenting customers are used,
//! for training and for evaluation alike.

use std::sync::Arc;

use potluck_shared::model::{
    Example, OrderRecord, OwnPairs, SitePrior, cooccurring_pairs, topfreq_order, training_examples,
};

use potluck_shared::dp::{Contribution, RoundPrivacy};
use potluck_shared::wire::NeighbourCensus;

use crate::store::CustomerHistory;

/// One held-out order to rank.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCase {
    /// The order to predict, with the history before it.
    pub example: Example,
    /// The items the customer ordered before, in GP-TopFreq order.
    pub topfreq: Vec<u32>,
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
    /// Per item, the sum over customers of their training-order counts
    /// scaled to unit L2 norm: one customer moves it by at most 1 in L2,
    /// which is what the prior's private release is calibrated to.
    pub customer_popularity: Vec<f64>,
    /// Row-major `[m, m]`: the sum over customers of their pair indicators
    /// ([`cooccurring_pairs`]) scaled to unit L2 norm, which the neighbours
    /// of the prior without noise are built from.
    pub customer_pairs: Vec<f64>,
    /// Each customer's part in `customer_pairs`, in `customers` order.
    pub own_pairs: Vec<Arc<OwnPairs>>,
    /// The site's prior over its menu, which every example carries.
    pub prior: Arc<SitePrior>,
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
            customer_popularity: vec![0.0; menu_len],
            customer_pairs: vec![0.0; menu_len * menu_len],
            ..Self::default()
        };
        for history in histories {
            let orders = &history.orders;
            let train_orders = if orders.len() >= 2 {
                let (before, last) = orders.split_at(orders.len() - 1);
                data.eval.push(EvalCase {
                    example: Example::new(before, last[0].context(), decay, last[0].items.clone()),
                    topfreq: topfreq_order(before),
                    attributes: history.attributes.clone(),
                });
                before
            } else {
                &orders[..]
            };
            let own = Arc::new(data.add_customer_counts(train_orders, menu_len));
            let start = data.train.len();
            data.train
                .extend(
                    training_examples(train_orders, decay)
                        .into_iter()
                        .map(|e| Example {
                            own_pairs: Some(own.clone()),
                            ..e
                        }),
                );
            data.customers.push(start..data.train.len());
            data.own_pairs.push(own);
        }
        // Without noise: the counts GP-TopFreq ranks by, and the neighbours.
        let exact: Vec<f64> = data
            .popularity
            .iter()
            .map(|&c| f64::from(c))
            .chain(data.customer_pairs.iter().copied())
            .collect();
        data.set_prior(SitePrior::from_release(&exact, menu_len).expect("laid out for the menu"));
        data
    }

    /// Count one customer's training orders into the exact item counts and
    /// into the per-customer-bounded sums; items off the menu are skipped.
    /// Returns the customer's part in the pair sums.
    fn add_customer_counts(&mut self, orders: &[OrderRecord], m: usize) -> OwnPairs {
        let mut own = std::collections::BTreeMap::<usize, f64>::new();
        for item in orders.iter().flat_map(|o| &o.items) {
            if let Some(count) = self.popularity.get_mut(*item as usize) {
                *count += 1;
                *own.entry(*item as usize).or_default() += 1.0;
            }
        }
        let norm = own.values().map(|c| c * c).sum::<f64>().sqrt();
        for (item, count) in own {
            self.customer_popularity[item] += count / norm;
        }
        let pairs: Vec<(u32, u32)> = cooccurring_pairs(orders)
            .into_iter()
            .filter(|&(i, j)| (i as usize) < m && (j as usize) < m)
            .collect();
        let each = 1.0 / (pairs.len().max(1) as f64).sqrt();
        for &(i, j) in &pairs {
            let cell = i as usize * m + j as usize;
            self.customer_pairs[cell] += each;
        }
        OwnPairs {
            pairs,
            weight: each as f32,
        }
    }

    /// A differentially private release of the site's popularity: the
    /// per-customer popularity with Gaussian noise of standard deviation
    /// `noise_multiplier` on every item (the sensitivity is 1).
    ///
    /// The neighbours are not released: at one site's scale the noise a
    /// release of `m²` pair values needs drowns all but the most common
    /// pairs (at 1,000 customers a pair held by 200 of them stands at about
    /// 2.6 noise deviations), so private rounds rank new items by popularity
    /// alone.
    ///
    /// Released once per lineage and charged to the ledger as a Gaussian
    /// mechanism over every customer ([`potluck_shared::dp::RoundPrivacy::prior_step`]).
    ///
    /// Fails, rather than release with less noise, on a noise multiplier that
    /// is not a positive finite number.
    pub fn release_prior<R: rand::CryptoRng + ?Sized>(
        &self,
        noise_multiplier: f64,
        rng: &mut R,
    ) -> Result<Vec<f64>, rand_distr::NormalError> {
        use rand_distr::{Distribution, Normal};
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(rand_distr::NormalError::BadVariance);
        }
        let noise = Normal::new(0.0, noise_multiplier)?;
        Ok(self
            .customer_popularity
            .iter()
            .map(|c| c + noise.sample(rng))
            .collect())
    }

    /// This site's part in a neighbour census: every consenting customer's
    /// pairs, as in `customer_pairs` (unit L2 norm each), rounded within the
    /// census's bound. The site adds its noise when it finishes the contribution.
    pub fn census<R: rand::CryptoRng + ?Sized>(
        &self,
        census: &NeighbourCensus,
        privacy: &RoundPrivacy,
        rng: &mut R,
    ) -> Contribution {
        let m = census.menu_len as usize;
        let mut contribution = Contribution::of_length(census.length());
        for own in self.own_pairs.iter().filter(|o| !o.pairs.is_empty()) {
            let cells: Vec<usize> = own
                .pairs
                .iter()
                .map(|&(i, j)| i as usize * m + j as usize)
                .collect();
            let values = vec![own.weight; cells.len()];
            contribution.add_sparse(privacy, &cells, values, rng);
        }
        contribution
    }

    /// Give every example `prior` as the site's prior over its menu.
    pub fn set_prior(&mut self, prior: SitePrior) {
        let prior = Arc::new(prior);
        self.prior = prior.clone();
        let examples = self
            .train
            .iter_mut()
            .chain(self.eval.iter_mut().map(|c| &mut c.example));
        for example in examples {
            example.prior = prior.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_shared::dp::PrivacyUnit;
    use rand::SeedableRng;

    fn customer(orders: &[&[u32]]) -> CustomerHistory {
        CustomerHistory {
            pseudonym: String::new(),
            orders: orders
                .iter()
                .enumerate()
                .map(|(k, items)| OrderRecord::new(k as i64 * 86_400, 0, items.to_vec()))
                .collect(),
            attributes: Default::default(),
        }
    }

    #[test]
    fn a_census_sums_each_customers_training_pairs_and_nothing_held_out() {
        let m = 5;
        // The last order of each customer is held out: item 4 never counts.
        let histories = [
            customer(&[&[0], &[1], &[2], &[4]]),
            customer(&[&[0, 1], &[3], &[4]]),
            customer(&[&[2], &[4]]),
        ];
        let data = SiteData::prepare(&histories, m, 0.8);
        let census = NeighbourCensus { menu_len: m as u32 };
        let (privacy, _) = RoundPrivacy::plan(
            "t",
            PrivacyUnit::Customer,
            1.0,
            2.0,
            1.0,
            1e-6,
            census.length(),
            3,
            2,
            32,
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let contribution = data.census(&census, &privacy, &mut rng);
        assert_eq!(contribution.units(), 2, "the third customer has no pair");
        for (cell, (&raw, &exact)) in contribution
            .raw()
            .iter()
            .zip(&data.customer_pairs)
            .enumerate()
        {
            let value = raw as f64 / privacy.scale;
            assert!(
                (value - exact).abs() <= 1.0 / privacy.scale,
                "cell {cell}: {value} against {exact}"
            );
            if cell % m == 4 {
                assert_eq!(raw, 0, "a held-out item is in no pair");
            }
        }
        // Each of the first two customers has 3 items in training, so 6
        // pairs at 1/√6 each; both have (0, 1), only the second (1, 3).
        let each = 1.0 / 6f64.sqrt();
        assert!((data.customer_pairs[1] - 2.0 * each).abs() < 1e-9);
        assert!((data.customer_pairs[m + 3] - each).abs() < 1e-9);
        assert_eq!(data.customer_pairs[2 * m + 3], 0.0, "nobody had 2 and 3");
    }
}
