//! Splitting customers into sites. A customer's orders always stay together:
//! the unit of privacy is the customer, and so is the unit of partitioning.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Gamma};

use crate::config::{PartitionConfig, Scheme};
use crate::dataset::Customer;

/// One site of a partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Its name, a valid site ID.
    pub site: String,
    /// Indices of its customers in the dataset.
    pub customers: Vec<usize>,
}

/// What the size rule did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SizeRule {
    /// Sites merged into `site-other`.
    pub merged: Vec<String>,
    /// Sites dropped (with `site-other` if it was still too small).
    pub dropped: Vec<String>,
    /// Customers in dropped sites.
    pub customers_dropped: usize,
}

/// Partition `customers` as configured, then apply the size rule.
pub fn partition(
    customers: &[Customer],
    config: &PartitionConfig,
    seed: u64,
) -> (Vec<Part>, SizeRule) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7061_7274); // "part"
    let parts = match (config.scheme, config.sites) {
        (Scheme::Natural, _) | (_, None) => natural(customers),
        (Scheme::Iid, Some(sites)) => iid(customers.len(), sites, &mut rng),
        (Scheme::Dirichlet, Some(sites)) => {
            dirichlet(&groups(customers), sites, config.alpha, &mut rng)
        }
    };
    let usable = |i: &usize| customers[*i].orders() >= 2;
    apply_size_rule(parts, config.min_customers, usable)
}

/// One site per natural group, named after it, in name order.
pub fn natural(customers: &[Customer]) -> Vec<Part> {
    let mut by_group: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in customers.iter().enumerate() {
        by_group.entry(site_name(&c.group)).or_default().push(i);
    }
    by_group
        .into_iter()
        .map(|(site, customers)| Part { site, customers })
        .collect()
}

/// Customers shuffled and dealt in turn: sizes differ by at most one.
pub fn iid(customers: usize, sites: usize, rng: &mut StdRng) -> Vec<Part> {
    let mut order: Vec<usize> = (0..customers).collect();
    order.shuffle(rng);
    let mut parts = numbered(sites);
    for (k, customer) in order.into_iter().enumerate() {
        parts[k % sites].customers.push(customer);
    }
    sort_parts(parts)
}

/// For each natural group, site shares p ~ Dirichlet(alpha, ..., alpha)
/// (drawn as normalised Gamma(alpha, 1) variables), and each customer of the
/// group goes to a site drawn from p. Small alpha: each site is dominated by
/// few groups; large alpha: close to IID.
pub fn dirichlet(groups: &[usize], sites: usize, alpha: f64, rng: &mut StdRng) -> Vec<Part> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was checked positive");
    let group_count = groups.iter().max().map_or(0, |g| g + 1);
    let shares: Vec<Vec<f64>> = (0..group_count)
        .map(|_| {
            let draws: Vec<f64> = (0..sites).map(|_| gamma.sample(rng)).collect();
            let total: f64 = draws.iter().sum();
            if total > 0.0 {
                draws.iter().map(|d| d / total).collect()
            } else {
                // Every draw underflowed (tiny alpha): all mass on one site.
                let mut one = vec![0.0; sites];
                one[rng.random_range(0..sites)] = 1.0;
                one
            }
        })
        .collect();
    let mut parts = numbered(sites);
    for (customer, &group) in groups.iter().enumerate() {
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let site = shares[group]
            .iter()
            .position(|p| {
                acc += p;
                u < acc
            })
            .unwrap_or(sites - 1);
        parts[site].customers.push(customer);
    }
    sort_parts(parts)
}

/// Each customer's group as a dense index.
pub fn groups(customers: &[Customer]) -> Vec<usize> {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for c in customers {
        let next = index.len();
        index.entry(&c.group).or_insert(next);
    }
    customers.iter().map(|c| index[c.group.as_str()]).collect()
}

/// Sites with fewer than `min` usable customers are merged into
/// `site-other`, which is dropped if it is still too small.
pub fn apply_size_rule(
    parts: Vec<Part>,
    min: usize,
    usable: impl Fn(&usize) -> bool,
) -> (Vec<Part>, SizeRule) {
    let count = |p: &Part| p.customers.iter().filter(|i| usable(i)).count();
    let (mut kept, small): (Vec<Part>, Vec<Part>) =
        parts.into_iter().partition(|p| count(p) >= min);
    let mut rule = SizeRule::default();
    if small.is_empty() {
        return (kept, rule);
    }
    let other = Part {
        site: "site-other".into(),
        customers: small.iter().flat_map(|p| p.customers.clone()).collect(),
    };
    let names: Vec<String> = small.into_iter().map(|p| p.site).collect();
    if count(&other) >= min {
        rule.merged = names;
        kept.push(other);
    } else {
        rule.customers_dropped = other.customers.len();
        rule.dropped = names;
    }
    (kept, rule)
}

fn numbered(sites: usize) -> Vec<Part> {
    let width = sites.to_string().len().max(2);
    (0..sites)
        .map(|i| Part {
            site: format!("site-{:0width$}", i + 1),
            customers: Vec::new(),
        })
        .collect()
}

fn sort_parts(mut parts: Vec<Part>) -> Vec<Part> {
    for part in &mut parts {
        part.customers.sort_unstable();
    }
    parts
}

/// A group name as a site ID: lower case, runs of other characters as `-`.
pub fn site_name(group: &str) -> String {
    let mut out = String::new();
    for c in group.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    let name = if trimmed.starts_with("site-") {
        trimmed.to_string()
    } else {
        format!("site-{trimmed}")
    };
    name.chars().take(potluck_shared::SiteId::MAX_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> StdRng {
        StdRng::seed_from_u64(5)
    }

    fn all_customers(parts: &[Part]) -> Vec<usize> {
        let mut all: Vec<usize> = parts.iter().flat_map(|p| p.customers.clone()).collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one_and_cover_everyone_once() {
        let parts = iid(1003, 10, &mut seeded());
        assert_eq!(parts.len(), 10);
        let sizes: Vec<usize> = parts.iter().map(|p| p.customers.len()).collect();
        assert_eq!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap(), 1);
        assert_eq!(all_customers(&parts), (0..1003).collect::<Vec<_>>());
    }

    /// Mean, over sites, of the largest share one group has of the site.
    fn skew(parts: &[Part], groups: &[usize]) -> f64 {
        let filled: Vec<&Part> = parts.iter().filter(|p| !p.customers.is_empty()).collect();
        filled
            .iter()
            .map(|p| {
                let mut counts = BTreeMap::new();
                for &c in &p.customers {
                    *counts.entry(groups[c]).or_insert(0usize) += 1;
                }
                *counts.values().max().unwrap() as f64 / p.customers.len() as f64
            })
            .sum::<f64>()
            / filled.len() as f64
    }

    #[test]
    fn dirichlet_is_disjoint_complete_and_skewed_by_alpha() {
        // 10 groups of 200 customers.
        let groups: Vec<usize> = (0..2000).map(|i| i % 10).collect();
        let skewed = dirichlet(&groups, 10, 0.1, &mut seeded());
        let mixed = dirichlet(&groups, 10, 100.0, &mut seeded());
        for parts in [&skewed, &mixed] {
            assert_eq!(all_customers(parts), (0..2000).collect::<Vec<_>>());
        }
        let (s, m) = (skew(&skewed, &groups), skew(&mixed, &groups));
        // IID over 10 equal groups gives a largest share near 0.1-0.2.
        assert!(s > 0.45, "alpha 0.1: largest group share {s:.2}");
        assert!(m < 0.2, "alpha 100: largest group share {m:.2}");
    }

    #[test]
    fn partitions_repeat_with_the_seed() {
        let groups: Vec<usize> = (0..500).map(|i| i % 7).collect();
        assert_eq!(
            dirichlet(&groups, 5, 0.5, &mut seeded()),
            dirichlet(&groups, 5, 0.5, &mut seeded())
        );
        assert_ne!(
            dirichlet(&groups, 5, 0.5, &mut seeded()),
            dirichlet(&groups, 5, 0.5, &mut StdRng::seed_from_u64(6))
        );
    }

    #[test]
    fn small_sites_are_merged_or_dropped() {
        let part = |site: &str, n: std::ops::Range<usize>| Part {
            site: site.into(),
            customers: n.collect(),
        };
        let everyone = |_: &usize| true;
        let (kept, rule) = apply_size_rule(
            vec![
                part("site-a", 0..20),
                part("site-b", 20..26),
                part("site-c", 26..32),
            ],
            10,
            everyone,
        );
        assert_eq!(
            kept.iter().map(|p| p.site.as_str()).collect::<Vec<_>>(),
            ["site-a", "site-other"]
        );
        assert_eq!(rule.merged, ["site-b", "site-c"]);
        let (kept, rule) = apply_size_rule(
            vec![part("site-a", 0..20), part("site-b", 20..26)],
            10,
            everyone,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (rule.dropped.clone(), rule.customers_dropped),
            (vec!["site-b".to_string()], 6)
        );
    }

    #[test]
    fn group_names_become_site_ids() {
        assert_eq!(site_name("United Kingdom"), "site-united-kingdom");
        assert_eq!(site_name("EIRE"), "site-eire");
        assert_eq!(site_name("site-003"), "site-003");
        assert!(potluck_shared::SiteId::new(site_name("Channel Islands & RSA")).is_ok());
    }
}
