//! One experiment, end to end: data, partition, federation, baselines, outputs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use potluck_coordinator::CoordinatorConfig;
use potluck_coordinator::report::RoundLine;
use potluck_coordinator::state::{FairnessRecord, State};
use potluck_shared::model::GlobalModel;
use serde::Serialize;

use crate::baselines::{self, Reference, Score};
use crate::config::SimConfig;
use crate::federation::{self, Progress, Ran};
use crate::partition::{self, SizeRule};
use crate::plot::{self, Chart, Series};
use crate::{dataset, output};

/// What `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The experiment's name.
    pub name: String,
    /// Its sweep label (`setting=value`), empty without a sweep.
    pub label: String,
    /// The whole configuration, as run.
    pub config: SimConfig,
    /// The data as partitioned.
    pub data: DataSummary,
    /// Parameters of the model.
    pub parameters: usize,
    /// Rounds completed.
    pub rounds_completed: usize,
    /// The last round's model.
    pub last: Option<RoundScore>,
    /// The round with the best HR@10.
    pub best: Option<RoundScore>,
    /// Reference models on the same held-out orders.
    pub baselines: BTreeMap<String, Score>,
    /// ε spent by the end, at `delta` (absent without differential privacy).
    pub epsilon: Option<f64>,
    /// δ of the budget.
    pub delta: Option<f64>,
    /// Wall time of the federation (coordinator start to exit), seconds.
    pub wall_seconds: f64,
    /// Mean round time, seconds (training, secure aggregation and evaluation).
    pub mean_round_seconds: Option<f64>,
    /// Bytes the coordinator received from sites over all rounds.
    pub bytes_received: u64,
    /// Peak resident memory of the coordinator process, KiB.
    pub coordinator_peak_kib: Option<u64>,
    /// Peak resident memory of the process hosting every site, KiB.
    pub sites_peak_kib: Option<u64>,
    /// Fairness audits of model versions, and the gate's verdicts.
    pub fairness_audits: Vec<FairnessRecord>,
}

/// The data as partitioned.
#[derive(Debug, Clone, Serialize)]
pub struct DataSummary {
    /// Sites in the federation.
    pub sites: usize,
    /// Customers across them.
    pub customers: usize,
    /// Held-out orders (one per customer with two orders or more).
    pub held_out_orders: u64,
    /// Menu items.
    pub menu_items: usize,
    /// What the dataset mapping dropped.
    pub dropped_by_mapping: BTreeMap<String, u64>,
    /// What the site size rule merged or dropped.
    pub size_rule: SizeRule,
}

/// A round's model, scored.
#[derive(Debug, Clone, Serialize)]
pub struct RoundScore {
    /// The round.
    pub round: u64,
    /// The model version it produced (behind the round when a census or
    /// an audit took a round number).
    pub model_version: u64,
    /// HR@10.
    pub hr_at_10: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
    /// HR@10 on items the customer ordered before.
    pub repeat_hr_at_10: Option<f64>,
    /// HR@10 on items the customer never ordered.
    pub new_hr_at_10: Option<f64>,
}

/// Run `config` into `out`; shows a progress bar unless `quiet`.
pub fn run(label: &str, config: &SimConfig, out: &Path, quiet: bool) -> Result<Summary> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let data = dataset::load(&config.data, config.seed).context("loading the dataset")?;
    let (parts, size_rule) = partition::partition(&data.customers, &config.partition, config.seed);
    anyhow::ensure!(
        parts.len() >= 3,
        "the partition left {} sites of at least {} customers with two orders; \
         secure aggregation needs 3 (lower partition.min_customers or use more data)",
        parts.len(),
        config.partition.min_customers
    );
    let customers = parts.iter().map(|p| p.customers.len()).sum();
    say(
        quiet,
        &format!(
            "{}: {} sites, {customers} customers, {} menu items; enrolling and importing",
            heading(config, label),
            parts.len(),
            data.menu.len()
        ),
    );
    let prepared = federation::prepare(config, &data, &parts, &out.join("work"))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let bar = Bar::new(config.rounds, quiet);
    let ran = runtime.block_on(federation::run(config, &prepared, &out.join("logs"), &bar))?;
    bar.finish();
    drop(runtime);
    std::fs::copy(
        prepared.state_dir.join("metrics.jsonl"),
        out.join("metrics.jsonl"),
    )
    .context("copying metrics.jsonl")?;
    let coordinator = CoordinatorConfig::load(&prepared.coordinator_toml)?;
    let state = State::open_existing(&prepared.state_dir)?;
    let versions = state.models()?;
    let model = |at: Option<&potluck_coordinator::state::ModelRecord>| -> Result<GlobalModel> {
        let version = at.context("the coordinator kept no model")?.version;
        state
            .model(version)?
            .with_context(|| format!("model version {version} is missing"))
    };
    let (initial, last) = (model(versions.first())?, model(versions.last())?);
    let sites = baselines::load_sites(&prepared.sites, &initial)?;
    let held_out_orders = sites.iter().map(|s| s.eval.len() as u64).sum();
    let threads = config
        .compute
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let reference = Reference {
        initial: &initial,
        settings: &coordinator.training,
        rounds: u32::try_from(config.rounds).unwrap_or(u32::MAX),
        seed: config.seed,
        threads,
    };
    let mut per_site = BTreeMap::new();
    per_site.insert(
        "federated",
        baselines::score_sites(&sites, &last.spec, &last.params, threads)?,
    );
    per_site.insert(
        "initial",
        baselines::score_sites(&sites, &initial.spec, &initial.params, threads)?,
    );
    if config.baselines.local_only {
        say(quiet, "training the local-only baseline at every site");
        per_site.insert("local_only", reference.local_only(&sites)?);
    }
    if config.baselines.centralised {
        say(quiet, "training the centralised reference on pooled data");
        per_site.insert("centralised", reference.centralised(&sites)?);
    }
    let mut scores = site_baselines(&baselines::sum(&per_site["federated"]));
    for name in ["initial", "local_only", "centralised"] {
        if let Some(score) = per_site
            .get(name)
            .and_then(|c| Score::of(&baselines::sum(c)))
        {
            scores.insert(name.into(), score);
        }
    }
    let site_ids: Vec<String> = prepared
        .sites
        .iter()
        .map(|s| s.site_id.to_string())
        .collect();
    let customers_per_site: Vec<usize> = parts.iter().map(|p| p.customers.len()).collect();
    output::write_sites(out, &site_ids, &customers_per_site, &per_site)?;
    let summary = summarise(
        label,
        config,
        &ran,
        scores,
        DataSummary {
            sites: parts.len(),
            customers,
            held_out_orders,
            menu_items: data.menu.len(),
            dropped_by_mapping: data.dropped,
            size_rule,
        },
        initial.params.len(),
        coordinator
            .privacy
            .enabled
            .then_some(coordinator.privacy.delta),
    );
    output::write_run(out, &summary)?;
    plot::write(&out.join("metrics"), &round_charts(&ran.rounds, &summary))?;
    Ok(summary)
}

fn heading(config: &SimConfig, label: &str) -> String {
    if label.is_empty() {
        config.name.clone()
    } else {
        format!("{} [{label}]", config.name)
    }
}

fn say(quiet: bool, text: &str) {
    if !quiet {
        eprintln!("==> {text}");
    }
}

/// The baselines the sites score alongside the model (site popularity and
/// GP-TopFreq, as `personal`), from the final model's counts.
fn site_baselines(counts: &potluck_shared::wire::EvalCounts) -> BTreeMap<String, Score> {
    [
        ("popularity", &counts.popularity),
        ("personal", &counts.personal),
    ]
    .into_iter()
    .filter_map(|(name, sums)| Some((name.to_string(), Score::of_sums(counts, sums)?)))
    .collect()
}

fn summarise(
    label: &str,
    config: &SimConfig,
    ran: &Ran,
    baselines: BTreeMap<String, Score>,
    data: DataSummary,
    parameters: usize,
    delta: Option<f64>,
) -> Summary {
    let scored: Vec<RoundScore> = ran
        .rounds
        .iter()
        .filter_map(|r| {
            Some(RoundScore {
                round: r.round,
                model_version: r.model_version,
                hr_at_10: r.eval_hr_at_10?,
                ndcg_at_10: r.eval_ndcg_at_10?,
                repeat_hr_at_10: r.eval_repeat_hr_at_10,
                new_hr_at_10: r.eval_new_hr_at_10,
            })
        })
        .collect();
    let best = scored
        .iter()
        .max_by(|a, b| {
            a.hr_at_10
                .total_cmp(&b.hr_at_10)
                .then(b.round.cmp(&a.round))
        })
        .cloned();
    let n = ran.rounds.len();
    Summary {
        name: config.name.clone(),
        label: label.to_string(),
        config: config.clone(),
        data,
        parameters,
        rounds_completed: n,
        last: scored.last().cloned(),
        best,
        baselines,
        // An audit after the last round spends from the same budget.
        epsilon: ran
            .fairness
            .iter()
            .filter_map(|a| a.epsilon)
            .chain(ran.rounds.last().and_then(|r| r.epsilon))
            .reduce(f64::max),
        delta,
        wall_seconds: ran.wall_seconds,
        mean_round_seconds: (n > 0)
            .then(|| ran.rounds.iter().map(|r| r.round_seconds).sum::<f64>() / n as f64),
        bytes_received: ran.rounds.iter().map(|r| r.bytes_received).sum(),
        coordinator_peak_kib: ran.coordinator_peak_kib,
        sites_peak_kib: ran.sites_peak_kib,
        fairness_audits: ran.fairness.clone(),
    }
}

/// HR@10 and NDCG@10 against rounds, with every baseline.
fn round_charts(rounds: &[RoundLine], summary: &Summary) -> Vec<Chart> {
    let xs = (
        rounds.first().map_or(0.0, |r| r.round as f64),
        rounds.last().map_or(1.0, |r| r.round as f64),
    );
    let chart = |metric: &str, pick: fn(&RoundLine) -> Option<f64>, of: fn(&Score) -> f64| {
        let mut series = vec![Series::line(
            "federated",
            rounds
                .iter()
                .filter_map(|r| Some((r.round as f64, pick(r)?)))
                .collect(),
        )];
        for (name, score) in &summary.baselines {
            series.push(Series::level(name.replace('_', "-"), of(score), xs));
        }
        Chart {
            title: format!("{metric} on held-out orders"),
            x_label: "round".into(),
            y_label: metric.into(),
            series,
        }
    };
    vec![
        chart("HR@10", |r| r.eval_hr_at_10, |s| s.hr_at_10),
        chart("NDCG@10", |r| r.eval_ndcg_at_10, |s| s.ndcg_at_10),
    ]
}

/// The progress bar: round, ETA, current HR@10 and ε. Where stderr is not
/// a terminal (a log, CI), one line per round instead.
struct Bar {
    bar: ProgressBar,
    quiet: bool,
}

impl Bar {
    fn new(rounds: u64, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(rounds)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "round {pos}/{len} [{bar:30}] {elapsed_precise} ETA {eta} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message("waiting for every site to connect");
        Self { bar, quiet }
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

impl Progress for Bar {
    fn started(&self, sites: usize) {
        self.bar
            .set_message(format!("{sites} sites connected; training"));
    }

    fn round(&self, line: &RoundLine) {
        let mut msg = String::new();
        if let Some(hr) = line.eval_hr_at_10 {
            msg.push_str(&format!("HR@10 {hr:.3}"));
        }
        if let Some(eps) = line.epsilon {
            msg.push_str(&format!(" ε {eps:.2}"));
        }
        self.bar.inc(1);
        if self.bar.is_hidden() && !self.quiet {
            eprintln!("    round {}: {msg}", line.round);
        }
        self.bar.set_message(msg);
    }
}
