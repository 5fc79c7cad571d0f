//! `report`: a per-round table from `metrics.jsonl`, and the final comparison
//! of the federated model with the baselines and with local-only models.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not the expected JSON.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The fields of a `metrics.jsonl` line that the report uses.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RoundLine {
    /// Round.
    pub round: u64,
    /// Model version produced.
    pub model_version: u64,
    /// Sites averaged.
    pub participants: u64,
    /// Mean training loss (absent in private rounds, which reveal none).
    pub train_loss: Option<f64>,
    /// Epsilon spent by the lineage after this round, when private.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// HR@10 of the global model.
    pub eval_hr_at_10: Option<f64>,
    /// NDCG@10 of the global model.
    pub eval_ndcg_at_10: Option<f64>,
    /// HR@10 of site popularity.
    pub baseline_popularity_hr_at_10: Option<f64>,
    /// HR@10 of GP-TopFreq.
    pub baseline_personal_hr_at_10: Option<f64>,
    /// NDCG@10 of site popularity.
    #[serde(default)]
    pub baseline_popularity_ndcg_at_10: Option<f64>,
    /// NDCG@10 of GP-TopFreq.
    #[serde(default)]
    pub baseline_personal_ndcg_at_10: Option<f64>,
    /// Held-out orders.
    pub eval_cases: u64,
    /// HR@10 of the global model on held-out items the customer ordered before.
    #[serde(default)]
    pub eval_repeat_hr_at_10: Option<f64>,
    /// NDCG@10 of the global model on repeat items.
    #[serde(default)]
    pub eval_repeat_ndcg_at_10: Option<f64>,
    /// HR@10 of the global model on held-out items the customer never ordered.
    #[serde(default)]
    pub eval_new_hr_at_10: Option<f64>,
    /// NDCG@10 of the global model on new items.
    #[serde(default)]
    pub eval_new_ndcg_at_10: Option<f64>,
    /// HR@10 of GP-TopFreq on repeat items.
    #[serde(default)]
    pub baseline_personal_repeat_hr_at_10: Option<f64>,
    /// HR@10 of GP-TopFreq on new items.
    #[serde(default)]
    pub baseline_personal_new_hr_at_10: Option<f64>,
    /// Wall time.
    pub round_seconds: f64,
    /// Bytes received.
    pub bytes_received: u64,
}

/// One site's local-only result, as `potluck-agent local-only --json` prints it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LocalOnlyLine {
    /// The site.
    pub site: String,
    /// Held-out orders.
    pub cases: u64,
    /// HR@10.
    pub hr_at_10: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
}

/// The final comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// HR@10 of the last federated model.
    pub federated_hr_at_10: Option<f64>,
    /// HR@10 of site popularity.
    pub popularity_hr_at_10: Option<f64>,
    /// HR@10 of GP-TopFreq (the customer's own most frequent items, then popular ones).
    pub personal_hr_at_10: Option<f64>,
    /// The federated model's HR@10 on repeat items, then on new items.
    pub federated_repeat_new: (Option<f64>, Option<f64>),
    /// GP-TopFreq's HR@10 on repeat items, then on new items.
    pub personal_repeat_new: (Option<f64>, Option<f64>),
    /// HR@10 of local-only models, over all sites' held-out orders.
    pub local_only_hr_at_10: Option<f64>,
    /// Per-site local-only results.
    pub local_only: Vec<LocalOnlyLine>,
}

/// Read a JSON-lines file.
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, ReportError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: name.clone(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| ReportError::Line {
                path: name.clone(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Compare the last round with the baselines and local-only models.
pub fn compare(rounds: &[RoundLine], local_only: Vec<LocalOnlyLine>) -> Comparison {
    let last = rounds.last();
    let cases: u64 = local_only.iter().map(|l| l.cases).sum();
    let hits: f64 = local_only.iter().map(|l| l.hr_at_10 * l.cases as f64).sum();
    Comparison {
        federated_hr_at_10: last.and_then(|r| r.eval_hr_at_10),
        popularity_hr_at_10: last.and_then(|r| r.baseline_popularity_hr_at_10),
        personal_hr_at_10: last.and_then(|r| r.baseline_personal_hr_at_10),
        federated_repeat_new: (
            last.and_then(|r| r.eval_repeat_hr_at_10),
            last.and_then(|r| r.eval_new_hr_at_10),
        ),
        personal_repeat_new: (
            last.and_then(|r| r.baseline_personal_repeat_hr_at_10),
            last.and_then(|r| r.baseline_personal_new_hr_at_10),
        ),
        local_only_hr_at_10: (cases > 0).then(|| hits / cases as f64),
        local_only,
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("   n/a".into(), |v| format!("{v:6.3}"))
}

/// The per-round table.
pub fn table(rounds: &[RoundLine]) -> String {
    let mut out = String::from(
        "round  model  sites    loss   HR@10  NDCG@10  popularity  GP-TopFreq  epsilon  seconds      kB\n",
    );
    for r in rounds {
        out.push_str(&format!(
            "{:5}  {:5}  {:5}  {}  {}   {}      {}      {}   {}  {:7.1}  {:6}\n",
            r.round,
            r.model_version,
            r.participants,
            fmt(r.train_loss),
            fmt(r.eval_hr_at_10),
            fmt(r.eval_ndcg_at_10),
            fmt(r.baseline_popularity_hr_at_10),
            fmt(r.baseline_personal_hr_at_10),
            fmt(r.epsilon),
            r.round_seconds,
            r.bytes_received / 1000
        ));
    }
    out
}

/// The comparison, readable.
pub fn describe(c: &Comparison) -> String {
    let mut out =
        String::from("HR@10 on every site's held-out last orders (repeat items / new items):\n");
    out.push_str(&format!(
        "  federated model        {}  ({} / {})\n",
        fmt(c.federated_hr_at_10),
        fmt(c.federated_repeat_new.0),
        fmt(c.federated_repeat_new.1)
    ));
    out.push_str(&format!(
        "  local-only models      {}\n",
        fmt(c.local_only_hr_at_10)
    ));
    for l in &c.local_only {
        out.push_str(&format!(
            "    {:<20} {}  ({} orders)\n",
            l.site,
            fmt(Some(l.hr_at_10)),
            l.cases
        ));
    }
    out.push_str(&format!(
        "  site popularity        {}\n",
        fmt(c.popularity_hr_at_10)
    ));
    out.push_str(&format!(
        "  GP-TopFreq             {}  ({} / {})  the baseline to beat\n",
        fmt(c.personal_hr_at_10),
        fmt(c.personal_repeat_new.0),
        fmt(c.personal_repeat_new.1)
    ));
    out
}
