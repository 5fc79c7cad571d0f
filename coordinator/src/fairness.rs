//! The fairness audit report: one version's figures next to the previous
//! released version's, as JSON for scripts and Markdown for the review board.

use std::fmt::Write;

use potluck_shared::fairness::{AttributeFigures, Estimate, GroupFigures};
use serde::Serialize;

use crate::state::{FairnessRecord, State, StateError};

/// Exposure gaps named per attribute.
const GAPS_NAMED: usize = 3;

/// An audit and what it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct FairnessView {
    /// The audit shown.
    pub audit: FairnessRecord,
    /// The audit of the latest version released before it, if any.
    pub previous: Option<FairnessRecord>,
    /// The version sites serve now.
    pub serving: Option<u64>,
    /// Each figure's change since `previous`, where both have it.
    pub changes: Vec<Change>,
}

/// How one group's figures, or (without `group`) an attribute's
/// worst-to-best ratios, changed since the previous released version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The attribute.
    pub attribute: String,
    /// The group; `None` for the attribute's ratios.
    pub group: Option<String>,
    /// Change of HR@10 (or of its worst-to-best ratio).
    pub hr: Option<f64>,
    /// Change of NDCG@10 (or of its worst-to-best ratio).
    pub ndcg: Option<f64>,
}

/// The audit of `version` (default: the latest audited), with its comparison.
pub fn view(state: &State, version: Option<u64>) -> Result<Option<FairnessView>, StateError> {
    let Some(audit) = state.fairness(version)? else {
        return Ok(None);
    };
    let previous = state.previous_released_fairness(audit.model_version)?;
    let changes = match (
        &audit.report,
        previous.as_ref().and_then(|p| p.report.as_ref()),
    ) {
        (Some(now), Some(before)) => changes(&now.attributes, &before.attributes),
        _ => Vec::new(),
    };
    Ok(Some(FairnessView {
        previous,
        serving: state.released_version()?,
        audit,
        changes,
    }))
}

/// Differences of every figure present in both audits.
fn changes(now: &[AttributeFigures], before: &[AttributeFigures]) -> Vec<Change> {
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
    let value = |e: Option<Estimate>| e.map(|e| e.value);
    let mut out = Vec::new();
    for a in now {
        let Some(b) = before.iter().find(|b| b.attribute == a.attribute) else {
            continue;
        };
        out.push(Change {
            attribute: a.attribute.clone(),
            group: None,
            hr: diff(a.hr_ratio, b.hr_ratio),
            ndcg: diff(a.ndcg_ratio, b.ndcg_ratio),
        });
        for g in &a.groups {
            let Some(old) = b.groups.iter().find(|o| o.group == g.group) else {
                continue;
            };
            out.push(Change {
                attribute: a.attribute.clone(),
                group: Some(g.group.clone()),
                hr: diff(value(g.hr), value(old.hr)),
                ndcg: diff(value(g.ndcg), value(old.ndcg)),
            });
        }
    }
    out
}

fn pct(e: Option<Estimate>) -> String {
    e.map_or("-".into(), |e| {
        format!("{:.3} ({:.3}–{:.3})", e.value, e.low, e.high)
    })
}

fn signed(change: Option<f64>) -> String {
    change.map_or("-".into(), |c| format!("{c:+.3}"))
}

fn ratio(value: Option<f64>) -> String {
    value.map_or("- (fewer than two groups reported)".into(), |r| {
        format!("{r:.2}")
    })
}

/// The report as Markdown.
pub fn markdown(view: &FairnessView) -> String {
    let audit = &view.audit;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Fairness audit of model version {}\n",
        audit.model_version
    );
    match audit.status.as_str() {
        "passed" => {
            let _ = writeln!(
                out,
                "**Passed** the release gate; the version was released to the sites.\n"
            );
        }
        "held" => {
            let _ = writeln!(
                out,
                "**HELD**: sites do not serve this version. The gate objects:\n"
            );
            for failure in &audit.failures {
                let _ = writeln!(out, "- {failure}");
            }
            let _ = writeln!(
                out,
                "\nAn operator can release it anyway: `potluck-coordinator model release {} --reason \"...\"`.\n",
                audit.model_version
            );
        }
        other => {
            let _ = writeln!(out, "Status: {other}.\n");
        }
    }
    let _ = writeln!(
        out,
        "Sites serve version {}.",
        view.serving.map_or("none yet".into(), |v| v.to_string())
    );
    let Some(report) = &audit.report else {
        return out;
    };
    let previous = view.previous.as_ref().and_then(|p| p.report.as_ref());
    let _ = writeln!(
        out,
        "Audited in round {} over {} sites, through secure aggregation with differential \
         privacy (noise σ {:.1} on every sum{}). Groups of fewer than {} customers are \
         suppressed. Intervals are 95%, sampling and noise together.",
        audit.round,
        report.sites,
        report.noise_std,
        audit
            .epsilon
            .map_or(String::new(), |e| format!("; ε {e:.2} after the audit")),
        report.min_group_size
    );
    match previous {
        Some(p) => {
            let _ = writeln!(
                out,
                "Changes are against version {}, the previous released one.",
                p.model_version
            );
        }
        None => {
            let _ = writeln!(
                out,
                "No earlier released version was audited, so no changes are shown."
            );
        }
    }
    for attribute in &report.attributes {
        let before = previous.and_then(|p| {
            p.attributes
                .iter()
                .find(|a| a.attribute == attribute.attribute)
        });
        attribute_section(&mut out, attribute, before, view, &report.categories);
    }
    out
}

/// The change of `group` (or, for `None`, of the ratios) of `attribute`.
fn change_of<'a>(
    view: &'a FairnessView,
    attribute: &str,
    group: Option<&str>,
) -> Option<&'a Change> {
    view.changes
        .iter()
        .find(|c| c.attribute == attribute && c.group.as_deref() == group)
}

fn attribute_section(
    out: &mut String,
    a: &AttributeFigures,
    before: Option<&AttributeFigures>,
    view: &FairnessView,
    categories: &[String],
) {
    let _ = writeln!(out, "\n## {}\n", a.attribute);
    let _ = writeln!(
        out,
        "| group | customers | HR@10 (95% CI) | change | NDCG@10 (95% CI) | change |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---|---:|");
    for g in &a.groups {
        let change = change_of(view, &a.attribute, Some(&g.group));
        match g.customers {
            Some(n) => {
                let _ = writeln!(
                    out,
                    "| {} | {n:.0} | {} | {} | {} | {} |",
                    g.group,
                    pct(g.hr),
                    signed(change.and_then(|c| c.hr)),
                    pct(g.ndcg),
                    signed(change.and_then(|c| c.ndcg)),
                );
            }
            None => {
                let _ = writeln!(out, "| {} | suppressed | | | | |", g.group);
            }
        }
    }
    let was = |value: Option<f64>| value.map_or(String::new(), |v| format!(" (was {v:.2})"));
    let _ = writeln!(
        out,
        "\nWorst-to-best HR@10: **{}**{}: {} against {}.  ",
        ratio(a.hr_ratio),
        was(before.and_then(|b| b.hr_ratio)),
        a.worst.as_deref().unwrap_or("-"),
        a.best.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "Worst-to-best NDCG@10: **{}**{}.",
        ratio(a.ndcg_ratio),
        was(before.and_then(|b| b.ndcg_ratio))
    );
    exposure_section(out, a, before, categories);
}

fn exposure_section(
    out: &mut String,
    a: &AttributeFigures,
    before: Option<&AttributeFigures>,
    categories: &[String],
) {
    let reported: Vec<&GroupFigures> = a.groups.iter().filter(|g| !g.suppressed()).collect();
    if reported.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nShare of the top 10 by menu category:\n");
    let _ = writeln!(out, "| group | {} |", categories.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(categories.len()));
    for g in reported {
        let shares: Vec<String> = g
            .exposure
            .iter()
            .map(|s| format!("{:.0}%", 100.0 * s))
            .collect();
        let _ = writeln!(out, "| {} | {} |", g.group, shares.join(" | "));
    }
    if !a.exposure_gaps.is_empty() {
        let _ = writeln!(out, "\nLargest exposure gaps:\n");
        for gap in a.exposure_gaps.iter().take(GAPS_NAMED) {
            let was = before
                .and_then(|b| b.exposure_gaps.iter().find(|g| g.category == gap.category))
                .map_or(String::new(), |g| format!(", was {:.0}", 100.0 * g.gap()));
            let _ = writeln!(
                out,
                "- {}: {:.0}% of the top 10 for {}, {:.0}% for {} (a gap of {:.0} percentage points{was})",
                gap.category,
                100.0 * gap.most.1,
                gap.most.0,
                100.0 * gap.least.1,
                gap.least.0,
                100.0 * gap.gap()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_shared::fairness::{AuditSpec, CaseOutcome, FairnessReport};
    use potluck_shared::model::{Menu, MenuItem};
    use std::collections::BTreeMap;

    /// An audit of `version` where group "b" hits `b_hits` of 50 times, "a" 40 of 50.
    fn record(version: u64, b_hits: u32, status: &str, failures: &[&str]) -> FairnessRecord {
        let item = |id: &str, category: &str| MenuItem {
            item_id: id.into(),
            name: id.into(),
            category: category.into(),
        };
        let menu = Menu::new(vec![item("x", "mains"), item("y", "drinks")]).unwrap();
        let attributes =
            BTreeMap::from([("band".to_string(), vec!["a".to_string(), "b".to_string()])]);
        let spec = AuditSpec::new(&attributes, &menu).unwrap();
        let mut sums = vec![0.0; spec.length()];
        for (group, hits) in [("a", 40), ("b", b_hits)] {
            for i in 0..50 {
                let customer = BTreeMap::from([("band".to_string(), group.to_string())]);
                let outcome = CaseOutcome {
                    hit: f64::from(u8::from(i < hits)),
                    ndcg: 0.5,
                    shown: if group == "a" {
                        vec![0, 10]
                    } else {
                        vec![5, 5]
                    },
                };
                for (s, v) in sums
                    .iter_mut()
                    .zip(spec.customer_vector(&customer, &outcome))
                {
                    *s += f64::from(v);
                }
            }
        }
        FairnessRecord {
            round: version + 1,
            model_version: version,
            status: status.into(),
            report: Some(FairnessReport::from_sums(version, &spec, &sums, 0.0, 20, 3).unwrap()),
            failures: failures.iter().map(ToString::to_string).collect(),
            epsilon: Some(1.5),
            recorded_at: "2026-11-30T00:00:00Z".into(),
        }
    }

    #[test]
    fn the_report_names_the_verdict_the_gap_and_the_change_since_the_last_release() {
        let (audit, previous) = (
            record(5, 20, "held", &["band: HR@10 of b is 0.50 of a's"]),
            record(3, 36, "passed", &[]),
        );
        let changes = changes(
            &audit.report.as_ref().unwrap().attributes,
            &previous.report.as_ref().unwrap().attributes,
        );
        let ratios = &changes[0];
        assert_eq!(ratios.group, None);
        assert!((ratios.hr.unwrap() + 0.4).abs() < 1e-9, "{ratios:?}");
        let view = FairnessView {
            audit,
            previous: Some(previous),
            serving: Some(3),
            changes,
        };
        let text = markdown(&view);
        assert!(
            text.contains("# Fairness audit of model version 5"),
            "{text}"
        );
        assert!(text.contains("**HELD**") && text.contains("- band: HR@10 of b is 0.50 of a's"));
        assert!(text.contains("model release 5 --reason"));
        assert!(text.contains("Sites serve version 3."));
        assert!(text.contains("Changes are against version 3"));
        // b fell from 36/50 to 20/50; the ratio from 0.90 to 0.50.
        assert!(
            text.contains("| b | 50 | 0.400 (") && text.contains("| -0.320 |"),
            "{text}"
        );
        assert!(text.contains("**0.50** (was 0.90): b against a"), "{text}");
        assert!(text.contains("| (other or unstated) | suppressed |"));
        assert!(
            text.contains(
                "- drinks: 50% of the top 10 for b, 0% for a (a gap of 50 percentage points, was 50)"
            ),
            "{text}"
        );
    }
}
