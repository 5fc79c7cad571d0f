//! Federated fairness audits: how well a model serves each group of customers,
//! measured at the sites, where the audit-only attributes stay.
//!
//! A site turns each held-out customer into a fixed-length vector
//! ([`AuditSpec::customer_vector`]): for every audited attribute, the slot of
//! the customer's group gets `(1, hit, ndcg, exposure per category)`, where
//! exposure is the share of the customer's top 10 in each menu category. The
//! attribute values never leave the site: only the sum of these vectors over
//! every site, with discrete Gaussian noise, is revealed, through secure
//! aggregation (see [`crate::dp::distributed`]).
//!
//! One customer moves the sum by at most `2·√A` in L2 for `A` attributes
//! (each slot has norm at most √(1 + 1 + 1 + 1)), so [`AuditSpec::clip_norm`]
//! never clips and the noise-free sum is exact up to the unbiased rounding.
//!
//! [`FairnessReport::from_sums`] turns the sum into per-group figures with
//! confidence intervals that include the noise; groups of fewer than
//! `min_group_size` customers (by the noisy count), or fewer than ten times
//! the noise's standard deviation, are suppressed: their figures would be
//! mostly noise, and the gate must not judge a model on them. [`Gate`]
//! decides whether a model may be served. All of this is pure.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::Menu;

/// The values summed per group: customers, hits, NDCG.
const STATS: usize = 3;
/// Bounds of an audit's size, so a coordinator cannot ask for a huge vector.
const MAX_ATTRIBUTES: usize = 8;
const MAX_GROUPS: usize = 64;
const MAX_CATEGORIES: usize = 64;
/// A group is reported only with at least this many noise standard
/// deviations of customers, so its mean's noise stays under a tenth.
const NOISE_SDS_PER_GROUP: f64 = 10.0;
/// z of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The label of the slot for values not declared, and for customers without one.
pub const OTHER_GROUP: &str = "(other or unstated)";

/// What an audit measures: the attributes and their declared groups, and the
/// menu categories exposure is counted in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSpec {
    /// The audited attributes, in a fixed order.
    pub attributes: Vec<AuditAttribute>,
    /// The menu's categories, sorted.
    pub categories: Vec<String>,
}

/// One audit-only attribute and the groups it is reported by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAttribute {
    /// The attribute's column name at the sites, e.g. `age_band`.
    pub name: String,
    /// Its declared values; any other value, or none, counts in [`OTHER_GROUP`].
    pub groups: Vec<String>,
}

/// Why an audit cannot be set up.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum AuditError {
    /// The spec is malformed or too large.
    #[error("fairness audit: {0}")]
    Spec(String),
    /// The sum does not have the spec's length.
    #[error("fairness audit: a sum of {got} values for a spec of {expected}")]
    Length {
        /// Values received.
        got: usize,
        /// Values the spec has.
        expected: usize,
    },
}

/// What one held-out case gave: HR@10, NDCG@10, and how many of the top 10
/// fell in each of the spec's categories.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseOutcome {
    /// 1 if the held-out order has an item in the top 10.
    pub hit: f64,
    /// NDCG@10.
    pub ndcg: f64,
    /// Top-10 items per category, in the spec's category order.
    pub shown: Vec<u32>,
}

impl AuditSpec {
    /// The spec for `attributes` (name → declared groups) over `menu`'s categories.
    pub fn new(
        attributes: &BTreeMap<String, Vec<String>>,
        menu: &Menu,
    ) -> Result<Self, AuditError> {
        let categories: BTreeSet<&str> = menu.items().iter().map(|i| i.category.as_str()).collect();
        let spec = Self {
            attributes: attributes
                .iter()
                .map(|(name, groups)| AuditAttribute {
                    name: name.clone(),
                    groups: groups.clone(),
                })
                .collect(),
            categories: categories.into_iter().map(str::to_string).collect(),
        };
        spec.check()?;
        Ok(spec)
    }

    /// Refuse empty, duplicate or oversized parts (a site checks what it is sent).
    pub fn check(&self) -> Result<(), AuditError> {
        let bad = |what: String| Err(AuditError::Spec(what));
        if self.attributes.is_empty() || self.attributes.len() > MAX_ATTRIBUTES {
            return bad(format!(
                "{} attributes; between 1 and {MAX_ATTRIBUTES} can be audited",
                self.attributes.len()
            ));
        }
        if self.categories.is_empty() || self.categories.len() > MAX_CATEGORIES {
            return bad(format!("{} menu categories", self.categories.len()));
        }
        let mut names = BTreeSet::new();
        for attribute in &self.attributes {
            if attribute.name.trim().is_empty() || !names.insert(&attribute.name) {
                return bad(format!(
                    "attribute name {:?} is empty or repeated",
                    attribute.name
                ));
            }
            let groups: BTreeSet<&String> = attribute.groups.iter().collect();
            if attribute.groups.is_empty()
                || attribute.groups.len() > MAX_GROUPS
                || groups.len() != attribute.groups.len()
            {
                return bad(format!(
                    "attribute {}: between 1 and {MAX_GROUPS} distinct groups are needed",
                    attribute.name
                ));
            }
        }
        Ok(())
    }

    fn width(&self) -> usize {
        STATS + self.categories.len()
    }

    /// The length of the summed vector.
    pub fn length(&self) -> usize {
        self.attributes
            .iter()
            .map(|a| (a.groups.len() + 1) * self.width())
            .sum()
    }

    /// The L2 bound of one customer's vector: it holds for every customer.
    pub fn clip_norm(&self) -> f32 {
        2.0 * (self.attributes.len() as f32).sqrt()
    }

    /// One customer's vector, from their attributes (column → value) and outcome.
    pub fn customer_vector(
        &self,
        attributes: &BTreeMap<String, String>,
        outcome: &CaseOutcome,
    ) -> Vec<f32> {
        let width = self.width();
        let shown: u32 = outcome.shown.iter().sum();
        let mut slot = vec![0.0f32; width];
        slot[0] = 1.0;
        slot[1] = outcome.hit as f32;
        slot[2] = outcome.ndcg as f32;
        if shown > 0 {
            for (value, &count) in slot[STATS..].iter_mut().zip(&outcome.shown) {
                *value = count as f32 / shown as f32;
            }
        }
        let mut vector = vec![0.0f32; self.length()];
        let mut start = 0;
        for attribute in &self.attributes {
            let group = attributes
                .get(&attribute.name)
                .and_then(|v| attribute.groups.iter().position(|g| g == v))
                .unwrap_or(attribute.groups.len());
            let at = start + group * width;
            vector[at..at + width].copy_from_slice(&slot);
            start += (attribute.groups.len() + 1) * width;
        }
        vector
    }
}

/// A mean and its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The point estimate.
    pub value: f64,
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// One group's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupFigures {
    /// The group's value, or [`OTHER_GROUP`].
    pub group: String,
    /// Customers evaluated (noisy); `None` when suppressed.
    pub customers: Option<f64>,
    /// HR@10; `None` when suppressed.
    pub hr: Option<Estimate>,
    /// NDCG@10; `None` when suppressed.
    pub ndcg: Option<Estimate>,
    /// Share of the top 10 shown in each category; empty when suppressed.
    pub exposure: Vec<f64>,
}

impl GroupFigures {
    /// Whether the group was too small to report.
    pub fn suppressed(&self) -> bool {
        self.customers.is_none()
    }
}

/// The largest difference between groups in how much one category is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposureGap {
    /// The category.
    pub category: String,
    /// The group shown it least, and its share.
    pub least: (String, f64),
    /// The group shown it most, and its share.
    pub most: (String, f64),
}

impl ExposureGap {
    /// The difference of the shares.
    pub fn gap(&self) -> f64 {
        self.most.1 - self.least.1
    }
}

/// One attribute's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributeFigures {
    /// The attribute.
    pub attribute: String,
    /// Every group, in declared order, then [`OTHER_GROUP`].
    pub groups: Vec<GroupFigures>,
    /// Worst group's HR@10 over the best's, among reported groups (needs two).
    pub hr_ratio: Option<f64>,
    /// The same for NDCG@10.
    pub ndcg_ratio: Option<f64>,
    /// The groups with the lowest and highest HR@10.
    pub worst: Option<String>,
    /// See `worst`.
    pub best: Option<String>,
    /// Per category, largest gap first.
    pub exposure_gaps: Vec<ExposureGap>,
}

/// The audit of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairnessReport {
    /// The model version audited.
    pub model_version: u64,
    /// The menu categories of the exposure figures.
    pub categories: Vec<String>,
    /// Per attribute.
    pub attributes: Vec<AttributeFigures>,
    /// Standard deviation of the noise on every summed value.
    pub noise_std: f64,
    /// Groups with fewer customers than this are suppressed: the configured
    /// minimum, or ten noise standard deviations if that is more.
    pub min_group_size: u64,
    /// Sites whose figures are in the sum.
    pub sites: usize,
}

impl FairnessReport {
    /// Figures from the decoded (noisy) sum of every site's vectors.
    pub fn from_sums(
        model_version: u64,
        spec: &AuditSpec,
        sums: &[f64],
        noise_std: f64,
        min_group_size: u64,
        sites: usize,
    ) -> Result<Self, AuditError> {
        if sums.len() != spec.length() {
            return Err(AuditError::Length {
                got: sums.len(),
                expected: spec.length(),
            });
        }
        let width = spec.width();
        let min_group_size = min_group_size.max((NOISE_SDS_PER_GROUP * noise_std).ceil() as u64);
        let mut slots = sums.chunks(width);
        let attributes = spec
            .attributes
            .iter()
            .map(|attribute| {
                let names = attribute
                    .groups
                    .iter()
                    .map(String::as_str)
                    .chain([OTHER_GROUP]);
                let groups = names
                    .zip(slots.by_ref())
                    .map(|(name, slot)| group_figures(name, slot, noise_std, min_group_size))
                    .collect();
                attribute_figures(&attribute.name, groups, &spec.categories)
            })
            .collect();
        Ok(Self {
            model_version,
            categories: spec.categories.clone(),
            attributes,
            noise_std,
            min_group_size,
            sites,
        })
    }
}

fn group_figures(name: &str, slot: &[f64], noise_std: f64, min_size: u64) -> GroupFigures {
    let customers = slot[0];
    if customers.is_nan() || customers < min_size.max(1) as f64 {
        return GroupFigures {
            group: name.to_string(),
            customers: None,
            hr: None,
            ndcg: None,
            exposure: Vec::new(),
        };
    }
    let shown: f64 = slot[STATS..].iter().map(|v| v.max(0.0)).sum();
    GroupFigures {
        group: name.to_string(),
        customers: Some(customers),
        hr: Some(estimate(slot[1], customers, noise_std)),
        ndcg: Some(estimate(slot[2], customers, noise_std)),
        exposure: slot[STATS..]
            .iter()
            .map(|v| if shown > 0.0 { v.max(0.0) / shown } else { 0.0 })
            .collect(),
    }
}

/// The mean of values in [0, 1] from their noisy sum and noisy count. The
/// interval adds the sampling variance (at most μ(1−μ) for values in [0, 1])
/// and the noise on both sums (delta method).
fn estimate(sum: f64, count: f64, noise_std: f64) -> Estimate {
    let mean = (sum / count).clamp(0.0, 1.0);
    let variance =
        mean * (1.0 - mean) / count + noise_std.powi(2) * (1.0 + mean * mean) / (count * count);
    let half = Z95 * variance.sqrt();
    Estimate {
        value: mean,
        low: (mean - half).max(0.0),
        high: (mean + half).min(1.0),
    }
}

fn attribute_figures(
    name: &str,
    groups: Vec<GroupFigures>,
    categories: &[String],
) -> AttributeFigures {
    let reported: Vec<&GroupFigures> = groups.iter().filter(|g| !g.suppressed()).collect();
    let ratio = |value: fn(&GroupFigures) -> f64| {
        (reported.len() >= 2).then(|| {
            let values = reported.iter().map(|g| value(g));
            let worst = values.clone().fold(f64::INFINITY, f64::min);
            let best = values.fold(0.0, f64::max);
            if best > 0.0 { worst / best } else { 1.0 }
        })
    };
    let hr = |g: &GroupFigures| g.hr.map_or(0.0, |e| e.value);
    let ndcg = |g: &GroupFigures| g.ndcg.map_or(0.0, |e| e.value);
    let by_hr = |pick: fn(f64, f64) -> bool| {
        (reported.len() >= 2).then(|| {
            reported
                .iter()
                .copied()
                .reduce(|a, b| if pick(hr(b), hr(a)) { b } else { a })
                .map(|g| g.group.clone())
        })
    };
    let mut exposure_gaps: Vec<ExposureGap> = if reported.len() >= 2 {
        categories
            .iter()
            .enumerate()
            .map(|(c, category)| {
                let share = |g: &&GroupFigures| (g.group.clone(), g.exposure[c]);
                let least = reported
                    .iter()
                    .map(share)
                    .reduce(|a, b| if b.1 < a.1 { b } else { a });
                let most = reported
                    .iter()
                    .map(share)
                    .reduce(|a, b| if b.1 > a.1 { b } else { a });
                ExposureGap {
                    category: category.clone(),
                    least: least.unwrap_or_default(),
                    most: most.unwrap_or_default(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    exposure_gaps.sort_by(|a, b| b.gap().total_cmp(&a.gap()));
    AttributeFigures {
        attribute: name.to_string(),
        hr_ratio: ratio(hr),
        ndcg_ratio: ratio(ndcg),
        worst: by_hr(|b, a| b < a).flatten(),
        best: by_hr(|b, a| b > a).flatten(),
        exposure_gaps,
        groups,
    }
}

/// What a model must meet to be served. Unset thresholds are not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Least worst-to-best HR@10 ratio within any attribute, e.g. 0.8.
    pub min_hr_ratio: Option<f64>,
    /// Least worst-to-best NDCG@10 ratio within any attribute.
    pub min_ndcg_ratio: Option<f64>,
    /// Largest difference between groups in any category's share of the top 10.
    pub max_exposure_gap: Option<f64>,
}

impl Gate {
    /// Why `report` fails the gate: one readable line per breach; empty if it passes.
    pub fn failures(&self, report: &FairnessReport) -> Vec<String> {
        let mut failures = Vec::new();
        for a in &report.attributes {
            let worst = a.worst.as_deref().unwrap_or("?");
            let best = a.best.as_deref().unwrap_or("?");
            if let (Some(min), Some(ratio)) = (self.min_hr_ratio, a.hr_ratio)
                && ratio < min
            {
                failures.push(format!(
                    "{}: HR@10 of {worst} is {ratio:.2} of {best}'s, below the {min} the gate asks",
                    a.attribute
                ));
            }
            if let (Some(min), Some(ratio)) = (self.min_ndcg_ratio, a.ndcg_ratio)
                && ratio < min
            {
                failures.push(format!(
                    "{}: worst-to-best NDCG@10 ratio {ratio:.2}, below the {min} the gate asks",
                    a.attribute
                ));
            }
            if let (Some(max), Some(gap)) = (self.max_exposure_gap, a.exposure_gaps.first())
                && gap.gap() > max
            {
                failures.push(format!(
                    "{}: {} is {:.0}% of the top 10 for {} but {:.0}% for {}, a gap above {max}",
                    a.attribute,
                    gap.category,
                    100.0 * gap.most.1,
                    gap.most.0,
                    100.0 * gap.least.1,
                    gap.least.0
                ));
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MenuItem;

    fn menu() -> Menu {
        let item = |id: &str, category: &str| MenuItem {
            item_id: id.into(),
            name: id.into(),
            category: category.into(),
        };
        Menu::new(vec![
            item("a", "mains"),
            item("b", "drinks"),
            item("c", "mains"),
        ])
        .unwrap()
    }

    fn spec() -> AuditSpec {
        let attributes = BTreeMap::from([
            (
                "age_band".to_string(),
                vec!["18-34".to_string(), "35+".to_string()],
            ),
            (
                "gender".to_string(),
                vec!["female".to_string(), "male".to_string()],
            ),
        ]);
        AuditSpec::new(&attributes, &menu()).unwrap()
    }

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn outcome(hit: f64, ndcg: f64, shown: [u32; 2]) -> CaseOutcome {
        CaseOutcome {
            hit,
            ndcg,
            shown: shown.to_vec(),
        }
    }

    #[test]
    fn a_customer_fills_one_slot_per_attribute_within_the_clip_norm() {
        let spec = spec();
        assert_eq!(spec.categories, ["drinks", "mains"]);
        assert_eq!(spec.length(), 2 * 3 * 5);
        let v = spec.customer_vector(
            &attrs(&[("age_band", "35+"), ("gender", "unknown")]),
            &outcome(1.0, 1.0, [0, 10]),
        );
        // age_band 35+ is the second slot; gender "unknown" the third (other).
        assert_eq!(&v[5..10], &[1.0, 1.0, 1.0, 0.0, 1.0]);
        assert_eq!(&v[25..30], &[1.0, 1.0, 1.0, 0.0, 1.0]);
        assert_eq!(v.iter().filter(|&&x| x != 0.0).count(), 8);
        assert!(crate::dp::l2_norm(&v) <= f64::from(spec.clip_norm()) + 1e-6);
    }

    fn sums_of(
        spec: &AuditSpec,
        customers: &[(BTreeMap<String, String>, CaseOutcome)],
    ) -> Vec<f64> {
        let mut sums = vec![0.0; spec.length()];
        for (a, o) in customers {
            for (s, v) in sums.iter_mut().zip(spec.customer_vector(a, o)) {
                *s += f64::from(v);
            }
        }
        sums
    }

    #[test]
    fn the_report_gives_group_means_ratios_and_gaps_and_suppresses_small_groups() {
        let spec = spec();
        let mut customers = Vec::new();
        for i in 0..40 {
            // Young customers: 3 in 4 hit, shown mains; older: 1 in 4, shown drinks.
            customers.push((
                attrs(&[("age_band", "18-34"), ("gender", "female")]),
                outcome(f64::from(u8::from(i % 4 != 0)), 0.5, [0, 10]),
            ));
            customers.push((
                attrs(&[("age_band", "35+"), ("gender", "male")]),
                outcome(f64::from(u8::from(i % 4 == 0)), 0.25, [10, 0]),
            ));
        }
        customers.push((attrs(&[("age_band", "35+")]), outcome(1.0, 1.0, [5, 5])));
        let report =
            FairnessReport::from_sums(3, &spec, &sums_of(&spec, &customers), 0.0, 5, 2).unwrap();
        let age = &report.attributes[0];
        assert_eq!(age.attribute, "age_band");
        assert_eq!(age.groups[0].customers, Some(40.0));
        assert_eq!(age.groups[0].hr.unwrap().value, 0.75);
        assert!(age.groups[0].hr.unwrap().low < 0.75 && age.groups[0].hr.unwrap().high > 0.75);
        assert!((age.groups[1].hr.unwrap().value - 11.0 / 41.0).abs() < 1e-12);
        assert!(
            age.groups[2].suppressed(),
            "nobody is in the other age group"
        );
        let gender = &report.attributes[1];
        assert!(
            gender.groups[2].suppressed(),
            "one customer without a gender is suppressed"
        );
        assert_eq!(gender.worst.as_deref(), Some("male"));
        assert_eq!(gender.best.as_deref(), Some("female"));
        assert!((gender.hr_ratio.unwrap() - (10.0 / 40.0) / 0.75).abs() < 1e-12);
        assert_eq!(gender.exposure_gaps[0].gap(), 1.0);
        let gate = Gate {
            min_hr_ratio: Some(0.8),
            ..Gate::default()
        };
        let failures = gate.failures(&report);
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(
            failures[1].contains("gender: HR@10 of male"),
            "{failures:?}"
        );
        assert!(Gate::default().failures(&report).is_empty());
    }

    #[test]
    fn noise_widens_the_interval_and_a_wrong_length_is_refused() {
        let spec = spec();
        let customers: Vec<_> = (0..50)
            .map(|_| (attrs(&[("age_band", "18-34")]), outcome(1.0, 1.0, [1, 1])))
            .collect();
        let sums = sums_of(&spec, &customers);
        let exact = FairnessReport::from_sums(1, &spec, &sums, 0.0, 1, 1).unwrap();
        let noisy = FairnessReport::from_sums(1, &spec, &sums, 5.0, 1, 1).unwrap();
        let width = |r: &FairnessReport| {
            let e = r.attributes[0].groups[0].hr.unwrap();
            e.high - e.low
        };
        assert!(width(&noisy) > width(&exact));
        assert!(matches!(
            FairnessReport::from_sums(1, &spec, &sums[1..], 0.0, 1, 1),
            Err(AuditError::Length { .. })
        ));
    }

    #[test]
    fn bad_specs_are_named() {
        let empty = AuditSpec::new(&BTreeMap::new(), &menu()).unwrap_err();
        assert!(empty.to_string().contains("attributes"), "{empty}");
        let dup = BTreeMap::from([("x".to_string(), vec!["a".to_string(), "a".to_string()])]);
        assert!(
            AuditSpec::new(&dup, &menu())
                .unwrap_err()
                .to_string()
                .contains("distinct")
        );
    }
}
