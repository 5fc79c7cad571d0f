//! The files an experiment and a sweep write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use potluck_coordinator::report::read_lines;
use potluck_shared::wire::{EvalCounts, MetricSums};

use crate::experiment::Summary;
use crate::plot::{self, Chart, Series};

/// `metrics.csv` (every field of `metrics.jsonl`, one row per round) and `summary.json`.
pub fn write_run(out: &Path, summary: &Summary) -> Result<()> {
    let lines: Vec<serde_json::Map<String, serde_json::Value>> =
        read_lines(&out.join("metrics.jsonl"))?;
    let mut columns: BTreeSet<&str> = lines
        .iter()
        .flat_map(|l| l.keys().map(String::as_str))
        .collect();
    columns.remove("round");
    let header: Vec<&str> = std::iter::once("round").chain(columns).collect();
    let path = out.join("metrics.csv");
    let mut csv =
        csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
    csv.write_record(&header)?;
    for line in &lines {
        csv.write_record(header.iter().map(|k| cell(line.get(*k))))?;
    }
    csv.flush()?;
    write_json(&out.join("summary.json"), summary)
}

fn cell(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `sites.csv`: each site's size and HR@10 under the final federated model
/// and each reference, so small sites can be told from large ones. Scored by
/// the simulator on the sites' held-out orders; a real coordinator never sees
/// a single site's figures.
pub fn write_sites(
    out: &Path,
    sites: &[String],
    customers: &[usize],
    per_site: &BTreeMap<&str, Vec<EvalCounts>>,
) -> Result<()> {
    let path = out.join("sites.csv");
    let mut csv =
        csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
    let mut header = vec![
        "site".to_string(),
        "customers".into(),
        "held_out_orders".into(),
    ];
    header.extend(per_site.keys().map(|k| format!("{k}_hr_at_10")));
    header.extend(["popularity_hr_at_10".into(), "personal_hr_at_10".into()]);
    csv.write_record(&header)?;
    let federated = per_site.get("federated");
    for (i, site) in sites.iter().enumerate() {
        let mean = |m: &MetricSums, cases: u64| {
            m.means(cases)
                .map_or(String::new(), |(hr, _)| format!("{hr:.4}"))
        };
        let cases = federated.map_or(0, |f| f[i].cases);
        let mut row = vec![site.clone(), customers[i].to_string(), cases.to_string()];
        row.extend(
            per_site
                .values()
                .map(|counts| mean(&counts[i].model, counts[i].cases)),
        );
        if let Some(f) = federated {
            row.push(mean(&f[i].popularity, cases));
            row.push(mean(&f[i].personal, cases));
        }
        csv.write_record(&row)?;
    }
    csv.flush()?;
    Ok(())
}

/// Pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A sweep's table (`sweep.csv`, `sweep.md`), `sweep.json` and plot: the
/// final and best HR@10 of each value, with ε and the baselines.
pub fn write_sweep(out: &Path, setting: &str, runs: &[(toml::Value, Summary)]) -> Result<()> {
    let baselines: BTreeSet<String> = runs
        .iter()
        .flat_map(|(_, s)| s.baselines.keys().cloned())
        .collect();
    let mut header = vec![
        setting.to_string(),
        "final_hr_at_10".into(),
        "final_ndcg_at_10".into(),
        "best_hr_at_10".into(),
        "epsilon".into(),
        "mean_round_seconds".into(),
    ];
    header.extend(baselines.iter().map(|b| format!("{b}_hr_at_10")));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|(value, s)| {
            let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
            let mut row = vec![
                crate::config::label(value),
                f(s.last.as_ref().map(|r| r.hr_at_10)),
                f(s.last.as_ref().map(|r| r.ndcg_at_10)),
                f(s.best.as_ref().map(|r| r.hr_at_10)),
                f(s.epsilon),
                f(s.mean_round_seconds),
            ];
            row.extend(
                baselines
                    .iter()
                    .map(|b| f(s.baselines.get(b).map(|x| x.hr_at_10))),
            );
            row
        })
        .collect();
    let path = out.join("sweep.csv");
    let mut csv =
        csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
    csv.write_record(&header)?;
    for row in &rows {
        csv.write_record(row)?;
    }
    csv.flush()?;
    let mut md = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---:|".repeat(header.len())
    );
    for row in &rows {
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    std::fs::write(out.join("sweep.md"), &md)?;
    let summaries: Vec<&Summary> = runs.iter().map(|(_, s)| s).collect();
    write_json(&out.join("sweep.json"), &summaries)?;
    plot::write(
        &out.join("sweep"),
        &[sweep_chart(setting, runs, &baselines)],
    )
}

/// Final HR@10 against the setting (numeric values on their own scale,
/// others by position); baselines as their own lines.
fn sweep_chart(
    setting: &str,
    runs: &[(toml::Value, Summary)],
    baselines: &BTreeSet<String>,
) -> Chart {
    let numeric: Option<Vec<f64>> = runs
        .iter()
        .map(|(v, _)| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
        .collect();
    let xs: Vec<f64> = numeric.unwrap_or_else(|| (0..runs.len()).map(|i| i as f64).collect());
    let points = |pick: &dyn Fn(&Summary) -> Option<f64>| -> Vec<(f64, f64)> {
        xs.iter()
            .zip(runs)
            .filter_map(|(&x, (_, s))| Some((x, pick(s)?)))
            .collect()
    };
    let mut series = vec![Series::line(
        "federated",
        points(&|s| s.last.as_ref().map(|r| r.hr_at_10)),
    )];
    for b in baselines {
        series.push(Series::line(
            b.replace('_', "-"),
            points(&|s| s.baselines.get(b).map(|x| x.hr_at_10)),
        ));
    }
    Chart {
        title: format!(
            "Final HR@10 by {}",
            setting.rsplit('.').next().unwrap_or(setting)
        ),
        x_label: setting.to_string(),
        y_label: "HR@10".into(),
        series,
    }
}
