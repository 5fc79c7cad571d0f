//! Whole-menu ranking metrics on held-out orders, for the model and two baselines.
//!
//! HR@10 is 1 when at least one item of the held-out order is among the top 10.
//! NDCG@10 uses binary relevance over the order's items:
//! DCG = Σ_{rank r ≤ 10, item relevant} 1/log2(r+1), divided by the ideal DCG
//! of min(|order|, 10) relevant items at the top. Each is also computed on
//! the order's repeat items (ordered by the customer before) and its new
//! items, over the orders that have any. Only sums and counts leave the site.
//!
//! The baselines: site popularity, and GP-TopFreq, the customer's own most
//! frequent items (ties to the more recently ordered, then menu order) with
//! the site's most popular items in the free slots; the model has to beat it.

use burn::tensor::Device;
use potluck_shared::dp::{Contribution, RoundPrivacy};
use potluck_shared::fairness::{AuditSpec, CaseOutcome};
use potluck_shared::model::{Batch, Example, ModelError, ModelSpec, Recommender};
use potluck_shared::wire::{EvalCounts, MetricSums};
use rand::CryptoRng;

use crate::dataset::SiteData;

/// Ranking cut-off.
pub const K: usize = 10;
const SCORE_BATCH: usize = 256;

/// HR@K and NDCG@K of one ranked list against the relevant items.
pub fn rank_metrics(ranked: &[u32], relevant: &[u32]) -> (f64, f64) {
    let top = &ranked[..ranked.len().min(K)];
    let dcg: f64 = top
        .iter()
        .enumerate()
        .filter(|(_, item)| relevant.contains(item))
        .map(|(r, _)| 1.0 / (r as f64 + 2.0).log2())
        .sum();
    let ideal: f64 = (0..relevant.len().min(K))
        .map(|r| 1.0 / (r as f64 + 2.0).log2())
        .sum();
    let hit = if dcg > 0.0 { 1.0 } else { 0.0 };
    (hit, if ideal > 0.0 { dcg / ideal } else { 0.0 })
}

/// Indices of the K highest scores, highest first; ties go to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        scores[b as usize]
            .partial_cmp(&scores[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// The model's item scores for each example.
pub fn score(
    spec: &ModelSpec,
    params: &[f32],
    examples: &[&Example],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let device = Device::flex();
    let model = Recommender::from_params(spec, params, &device)?;
    let m = spec.menu.len();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(SCORE_BATCH) {
        let logits = model.forward(&Batch::new(chunk, m, &device)).into_data();
        let values = logits.as_slice::<f32>().expect("logits are f32");
        out.extend(values.chunks(m).map(<[f32]>::to_vec));
    }
    Ok(out)
}

/// Evaluate a model and both baselines on the site's held-out cases.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    data: &SiteData,
) -> Result<EvalCounts, ModelError> {
    let examples: Vec<&Example> = data.eval.iter().map(|c| &c.example).collect();
    let scores = score(spec, params, &examples)?;
    let popular = popularity_ranking(&data.popularity);
    let mut counts = EvalCounts::default();
    for (case, scores) in data.eval.iter().zip(&scores) {
        let target = Target::of(&case.example);
        counts.cases += 1;
        counts.repeat_cases += u64::from(!target.repeat.is_empty());
        counts.new_cases += u64::from(!target.new.is_empty());
        target.add(&mut counts.model, &top_k(scores, K));
        target.add(&mut counts.popularity, &popular);
        target.add(&mut counts.personal, &gp_topfreq(&case.topfreq, &popular));
    }
    Ok(counts)
}

/// A held-out order's items, whole and split into repeat and new.
struct Target<'a> {
    all: &'a [u32],
    repeat: Vec<u32>,
    new: Vec<u32>,
}

impl<'a> Target<'a> {
    fn of(example: &'a Example) -> Self {
        let (repeat, new) = example
            .target
            .iter()
            .partition(|&&item| example.has_ordered(item));
        Self {
            all: &example.target,
            repeat,
            new,
        }
    }

    /// Add a ranking's metrics against each part that is not empty.
    fn add(&self, sums: &mut MetricSums, ranked: &[u32]) {
        let (hit, ndcg) = rank_metrics(ranked, self.all);
        sums.hits += hit;
        sums.ndcg += ndcg;
        if !self.repeat.is_empty() {
            let (hit, ndcg) = rank_metrics(ranked, &self.repeat);
            sums.repeat_hits += hit;
            sums.repeat_ndcg += ndcg;
        }
        if !self.new.is_empty() {
            let (hit, ndcg) = rank_metrics(ranked, &self.new);
            sums.new_hits += hit;
            sums.new_ndcg += ndcg;
        }
    }
}

/// Each held-out customer's fairness-audit vector, summed for secure
/// aggregation: the attributes go into the vector's layout and nowhere else.
pub fn audit<R: CryptoRng + ?Sized>(
    spec: &ModelSpec,
    params: &[f32],
    data: &SiteData,
    audit: &AuditSpec,
    privacy: &RoundPrivacy,
    rng: &mut R,
) -> Result<Contribution, ModelError> {
    let examples: Vec<&Example> = data.eval.iter().map(|c| &c.example).collect();
    let scores = score(spec, params, &examples)?;
    let category_of: Vec<Option<usize>> = spec
        .menu
        .items()
        .iter()
        .map(|item| audit.categories.iter().position(|c| *c == item.category))
        .collect();
    let mut contribution = Contribution::of_length(audit.length());
    for (case, scores) in data.eval.iter().zip(&scores) {
        let top = top_k(scores, K);
        let (hit, ndcg) = rank_metrics(&top, &case.example.target);
        let mut shown = vec![0u32; audit.categories.len()];
        for c in top
            .iter()
            .filter_map(|&i| category_of.get(i as usize).copied().flatten())
        {
            shown[c] += 1;
        }
        let outcome = CaseOutcome { hit, ndcg, shown };
        contribution.add_vector(
            privacy,
            audit.customer_vector(&case.attributes, &outcome),
            rng,
        );
    }
    Ok(contribution)
}

/// The menu ordered by training-order count at the site (ties to menu order).
pub fn popularity_ranking(popularity: &[u32]) -> Vec<u32> {
    let scores: Vec<f32> = popularity.iter().map(|&c| c as f32).collect();
    top_k(&scores, scores.len())
}

/// GP-TopFreq: the customer's own items in GP-TopFreq order, then popular
/// ones to fill the list.
pub fn gp_topfreq(own: &[u32], popular: &[u32]) -> Vec<u32> {
    let mut ranked: Vec<u32> = own.iter().copied().take(K).collect();
    for &item in popular {
        if ranked.len() >= K {
            break;
        }
        if !ranked.contains(&item) {
            ranked.push(item);
        }
    }
    ranked
}

/// What of a model's evaluation leaves this site: nothing (an empty report)
/// unless the site opted in to sending exact counts (`[privacy]
/// dangerous_plain_evaluation`). The counts are exact, and the model and its
/// menu are the coordinator's choice: a model whose menu is one item, or whose
/// biases single one out, turns `cases` and `hits` into exact counts of
/// customers with given histories, and differencing versions isolates one.
pub fn report(counts: EvalCounts, plain: bool) -> EvalCounts {
    if plain { counts } else { EvalCounts::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_known_rankings() {
        assert_eq!(rank_metrics(&[5, 1, 2], &[5]), (1.0, 1.0));
        let (hit, ndcg) = rank_metrics(&[1, 5], &[5]);
        assert_eq!(hit, 1.0);
        assert!((ndcg - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(rank_metrics(&[1, 2, 3], &[9]), (0.0, 0.0));
        // Two relevant items at ranks 1 and 3: (1 + 1/2) / (1 + 1/log2 3).
        let (_, ndcg) = rank_metrics(&[4, 0, 7], &[4, 7]);
        assert!((ndcg - 1.5 / (1.0 + 1.0 / 3f64.log2())).abs() < 1e-12);
        // Only the top 10 count.
        let ranked: Vec<u32> = (0..20).collect();
        assert_eq!(rank_metrics(&ranked, &[10]), (0.0, 0.0));
    }

    #[test]
    fn top_k_orders_by_score_then_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 3), vec![1, 3, 2]);
    }
}
