//! `potluck-sim`: simulated federations for research. The real coordinator
//! runs in its own process; every site is a real agent, many of them in this
//! one, over loopback QUIC with mutual TLS. See `docs/research.md`.

mod baselines;
mod config;
mod dataset;
mod experiment;
mod federation;
mod output;
mod partition;
mod plot;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::Plan;

/// Run a simulated federation (or a sweep of them) from an experiment file.
///
/// The file names the dataset, the partitioning, the rounds, the
/// coordinator's model, privacy and secure aggregation settings, the faults
/// to inject and the seed; `docs/research.md` is its reference. Outputs in
/// OUT: metrics.jsonl, metrics.csv, summary.json and metrics.svg/.png (with
/// a sweep: one folder per value, plus sweep.csv, sweep.md, sweep.json and
/// sweep.svg/.png).
#[derive(Debug, Parser)]
#[command(name = "potluck-sim", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// The experiment file (TOML).
    config: Option<PathBuf>,
    /// Where outputs go (default: ./sim-runs/NAME). A previous run's output
    /// there is replaced; any other non-empty directory is refused.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar or step messages.
    #[arg(long)]
    quiet: bool,
    /// Print the summary (or the sweep's summaries) as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Override a setting of the file, by its dotted path: --set seed=2
    /// --set coordinator.privacy.enabled=false (VALUE is TOML). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = config::parse_override)]
    overrides: Vec<(String, toml::Value)>,
    #[command(subcommand)]
    command: Option<Hidden>,
}

#[derive(Debug, Subcommand)]
enum Hidden {
    /// The coordinator process of a simulation (started by potluck-sim itself).
    #[command(hide = true)]
    Coordinator {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        peak_file: PathBuf,
    },
}

/// A repeat or new part's HR@10, or a dash where no case had that part.
fn part(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.3}"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Hidden::Coordinator { config, peak_file }) = &cli.command {
        potluck_shared::service::init_logging();
        return federation::serve_coordinator(config, peak_file);
    }
    let Some(path) = &cli.config else {
        anyhow::bail!("give an experiment file: potluck-sim CONFIG.toml [--out DIR] (see --help)");
    };
    let plan = Plan::load(path, &cli.overrides)?;
    let name = plan.experiments[0].1.name.clone();
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| Path::new("sim-runs").join(&name));
    replace_output_dir(&out)?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    init_file_logging(&logs.join("sites.log"))?;
    match &plan.sweep {
        None => {
            let (label, config) = &plan.experiments[0];
            let summary = experiment::run(label, config, &out, cli.quiet)?;
            report(&summary, cli.json)?;
        }
        Some(sweep) => {
            let mut runs = Vec::new();
            for ((label, config), value) in plan.experiments.iter().zip(&sweep.values) {
                let key = sweep.setting.rsplit('.').next().unwrap_or(&sweep.setting);
                let dir = out.join(dir_name(&format!("{key}={}", config::label(value))));
                let summary = experiment::run(label, config, &dir, cli.quiet)?;
                if !cli.json {
                    report(&summary, false)?;
                }
                runs.push((value.clone(), summary));
            }
            output::write_sweep(&out, &sweep.setting, &runs)?;
            if cli.json {
                let summaries: Vec<_> = runs.iter().map(|(_, s)| s).collect();
                println!("{}", serde_json::to_string_pretty(&summaries)?);
            } else {
                println!("{}", std::fs::read_to_string(out.join("sweep.md"))?);
            }
        }
    }
    if !cli.json {
        println!("Outputs in {}", out.display());
    }
    Ok(())
}

/// Marks a directory as a simulator's output, which a later run may replace.
const MARKER: &str = ".potluck-sim";

/// Empty `out` for a new run: only a directory this tool made (or an empty
/// one) is replaced, never one that merely happens to be named.
fn replace_output_dir(out: &Path) -> Result<()> {
    let is_empty = |dir: &Path| std::fs::read_dir(dir).map(|mut d| d.next().is_none());
    if out.exists() {
        if !out.join(MARKER).exists() && !is_empty(out).unwrap_or(false) {
            anyhow::bail!(
                "{} exists and is not a potluck-sim output directory; choose another --out or remove it",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join(MARKER),
        "written by potluck-sim; the next run with this --out replaces the directory\n",
    )
    .with_context(|| format!("writing in {}", out.display()))
}

/// The sites' logs go to a file: a thousand agents would drown a terminal.
fn init_file_logging(path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(())
}

fn dir_name(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A few lines on stdout (or the whole summary as JSON).
fn report(summary: &experiment::Summary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    let title = if summary.label.is_empty() {
        summary.name.clone()
    } else {
        format!("{} [{}]", summary.name, summary.label)
    };
    println!(
        "{title}: {} sites, {} customers, {} held-out orders, {} rounds in {:.1} s",
        summary.data.sites,
        summary.data.customers,
        summary.data.held_out_orders,
        summary.rounds_completed,
        summary.wall_seconds
    );
    if let Some(last) = &summary.last {
        let eps = summary
            .epsilon
            .map_or(String::from("no DP"), |e| format!("ε {e:.2}"));
        println!(
            "  federated     HR@10 {:.3}  NDCG@10 {:.3}  repeat {}  new {}  (round {}, {eps})",
            last.hr_at_10,
            last.ndcg_at_10,
            part(last.repeat_hr_at_10),
            part(last.new_hr_at_10),
            last.round
        );
    }
    for (name, score) in &summary.baselines {
        let name = match name.as_str() {
            "personal" => "gp-topfreq".to_string(),
            other => other.replace('_', "-"),
        };
        println!(
            "  {:<13} HR@10 {:.3}  NDCG@10 {:.3}  repeat {}  new {}",
            name,
            score.hr_at_10,
            score.ndcg_at_10,
            part(score.repeat_hr_at_10),
            part(score.new_hr_at_10),
        );
    }
    for audit in &summary.fairness_audits {
        let ratios: Vec<String> = audit
            .report
            .iter()
            .flat_map(|r| &r.attributes)
            .map(|a| {
                let ratio = a.hr_ratio.map_or("-".into(), |r| format!("{r:.2}"));
                format!("{} {ratio}", a.attribute)
            })
            .collect();
        println!(
            "  fairness      model v{} {} (worst-to-best HR@10: {})",
            audit.model_version,
            audit.status.to_uppercase(),
            ratios.join(", ")
        );
        for failure in &audit.failures {
            println!("                {failure}");
        }
    }
    Ok(())
}
