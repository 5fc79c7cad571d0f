//! Reference models trained after the federation, from the same initial
//! model, with the same training settings and number of rounds, and scored on
//! the same held-out orders (each site's stores, split by the agent's own
//! protocol). Site popularity and GP-TopFreq are scored by the sites
//! themselves during the rounds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use potluck_agent::client::site_data;
use potluck_agent::config::AgentConfig;
use potluck_agent::dataset::SiteData;
use potluck_agent::evaluation::evaluate;
use potluck_agent::store::SiteStore;
use potluck_agent::training::train_rounds;
use potluck_shared::model::GlobalModel;
use potluck_shared::wire::{EvalCounts, MetricSums, TrainSettings};
use serde::Serialize;

/// HR@10 and NDCG@10 over every site's held-out orders, whole and on the
/// repeat and new items.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// HR@10.
    pub hr_at_10: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
    /// HR@10 on items the customer ordered before.
    pub repeat_hr_at_10: Option<f64>,
    /// NDCG@10 on repeat items.
    pub repeat_ndcg_at_10: Option<f64>,
    /// HR@10 on items the customer never ordered.
    pub new_hr_at_10: Option<f64>,
    /// NDCG@10 on new items.
    pub new_ndcg_at_10: Option<f64>,
}

impl Score {
    /// The model's score in summed counts.
    pub fn of(counts: &EvalCounts) -> Option<Self> {
        Self::of_sums(counts, &counts.model)
    }

    /// The score of one method's sums in `counts`.
    pub fn of_sums(counts: &EvalCounts, sums: &MetricSums) -> Option<Self> {
        let s = counts.scores(sums);
        Some(Self {
            hr_at_10: s.hr_at_10?,
            ndcg_at_10: s.ndcg_at_10?,
            repeat_hr_at_10: s.repeat_hr_at_10,
            repeat_ndcg_at_10: s.repeat_ndcg_at_10,
            new_hr_at_10: s.new_hr_at_10,
            new_ndcg_at_10: s.new_ndcg_at_10,
        })
    }
}

/// The sites' prepared data, in site order.
pub fn load_sites(sites: &[AgentConfig], initial: &GlobalModel) -> Result<Vec<SiteData>> {
    sites
        .iter()
        .map(|site| {
            let store = SiteStore::open(&site.store_path())
                .with_context(|| format!("opening site {}'s store", site.site_id))?;
            Ok(site_data(&store, initial)?)
        })
        .collect()
}

/// How the reference models are trained: as the federation's sites are,
/// from its initial model, with its settings, for as many rounds.
#[derive(Debug, Clone, Copy)]
pub struct Reference<'a> {
    /// The federation's initial model.
    pub initial: &'a GlobalModel,
    /// Its local training settings.
    pub settings: &'a TrainSettings,
    /// Its rounds.
    pub rounds: u32,
    /// The experiment's seed.
    pub seed: u64,
    /// Threads to train and score on.
    pub threads: usize,
}

impl Reference<'_> {
    /// Each site trains alone; each site's counts.
    pub fn local_only(&self, sites: &[SiteData]) -> Result<Vec<EvalCounts>> {
        let spec = &self.initial.spec;
        parallel(sites.len(), self.threads, |i| {
            let data = &sites[i];
            if data.train.is_empty() {
                // Nothing to learn from: the site keeps the initial model.
                return Ok(evaluate(spec, &self.initial.params, data)?);
            }
            let seed = self.seed.wrapping_add(i as u64);
            let params = self.train(&data.train, seed)?;
            Ok(evaluate(spec, &params, data)?)
        })
    }

    /// All training examples pooled in one place; each site's counts.
    pub fn centralised(&self, sites: &[SiteData]) -> Result<Vec<EvalCounts>> {
        let pooled: Vec<_> = sites.iter().flat_map(|s| s.train.iter().cloned()).collect();
        let params = self.train(&pooled, self.seed)?;
        score_sites(sites, &self.initial.spec, &params, self.threads)
    }

    fn train(&self, examples: &[potluck_shared::model::Example], seed: u64) -> Result<Vec<f32>> {
        let initial = self.initial;
        Ok(train_rounds(
            &initial.spec,
            initial.params.clone(),
            examples,
            self.settings,
            self.rounds,
            seed,
        )?)
    }
}

/// A model's counts at each site.
pub fn score_sites(
    sites: &[SiteData],
    spec: &potluck_shared::model::ModelSpec,
    params: &[f32],
    threads: usize,
) -> Result<Vec<EvalCounts>> {
    parallel(sites.len(), threads, |i| {
        Ok(evaluate(spec, params, &sites[i])?)
    })
}

/// Counts summed in site order, so the totals do not depend on scheduling.
pub fn sum(counts: &[EvalCounts]) -> EvalCounts {
    counts.iter().fold(EvalCounts::default(), |mut acc, c| {
        acc.add(c);
        acc
    })
}

/// `job(i)` for i in 0..n on `threads` threads; results in index order.
fn parallel<T: Send>(
    n: usize,
    threads: usize,
    job: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let result = job(i);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every index was run"))
        .collect()
}
