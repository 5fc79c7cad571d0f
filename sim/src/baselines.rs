//! Reference models trained after the federation, from the same initial
//! model, with the same training settings and number of rounds, and scored on
//! the same held-out orders (each site's stores, split by the agent's own
//! protocol). Site popularity and personal frequency are scored by the sites
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
use potluck_shared::wire::{EvalCounts, TrainSettings};
use serde::Serialize;

/// HR@10 and NDCG@10 over every site's held-out orders.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// HR@10.
    pub hr_at_10: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
}

impl Score {
    /// The model's score in summed counts.
    pub fn of(counts: &EvalCounts) -> Option<Self> {
        counts
            .model
            .means(counts.cases)
            .map(|(hr_at_10, ndcg_at_10)| Self {
                hr_at_10,
                ndcg_at_10,
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

/// Each site trains alone for `rounds` rounds; each site's counts.
pub fn local_only(
    sites: &[SiteData],
    initial: &GlobalModel,
    settings: &TrainSettings,
    rounds: u32,
    seed: u64,
    threads: usize,
) -> Result<Vec<EvalCounts>> {
    parallel(sites.len(), threads, |i| {
        let data = &sites[i];
        if data.train.is_empty() {
            // Nothing to learn from: the site keeps the initial model.
            return Ok(evaluate(&initial.spec, &initial.params, data)?);
        }
        let params = train_rounds(
            &initial.spec,
            initial.params.clone(),
            &data.train,
            settings,
            rounds,
            seed.wrapping_add(i as u64),
        )?;
        Ok(evaluate(&initial.spec, &params, data)?)
    })
}

/// All training examples pooled in one place, trained for `rounds` rounds.
pub fn centralised(
    sites: &[SiteData],
    initial: &GlobalModel,
    settings: &TrainSettings,
    rounds: u32,
    seed: u64,
    threads: usize,
) -> Result<Vec<EvalCounts>> {
    let pooled: Vec<_> = sites.iter().flat_map(|s| s.train.iter().cloned()).collect();
    let params = train_rounds(
        &initial.spec,
        initial.params.clone(),
        &pooled,
        settings,
        rounds,
        seed,
    )?;
    score_sites(sites, &initial.spec, &params, threads)
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
