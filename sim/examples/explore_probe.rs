//! How well do franchise-wide item-pair statistics rank new items? A probe of
//! the explore channel's input, without any model: on the synthetic franchise
//! (20 sites × 1,000 customers, seed 7, consenting customers, last order held
//! out as in the agent's `SiteData::prepare`), GP-TopFreq fills its free
//! slots by each rule, and the probe prints HR@10 overall and on the orders
//! that hold only new items.
//!
//! Each statistic is summed over the whole franchise with each customer's
//! pairs at unit L2 norm, as the neighbour census sums them, with Gaussian
//! noise of the given deviation per cell, and read through the model's own
//! [`SitePrior`]: a rule is the site's log shares plus `a` times the lift.
//!
//! ```sh
//! cargo run --release -p potluck-sim --example explore_probe -- 4
//! ```
//!
//! Statistics: `cooccurring` (items ordered by the same customer, what the
//! census counts), `first tried` (`j` first ordered after an order with `i`,
//! what it counted before), `next order` (`j` in the order after one with `i`).
use std::collections::{BTreeMap, BTreeSet};

use potluck_shared::model::{OrderRecord, SitePrior, cooccurring_pairs, topfreq_order};
use potluck_shared::synth::{self, SynthConfig};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

const DECAY: f32 = 0.8;
const K: usize = 10;

/// One held-out case: the customer's site, training orders and last order.
struct Case {
    site: usize,
    before: Vec<OrderRecord>,
    last: OrderRecord,
}

/// One customer's orders by order id: time, UTC offset, items.
type Orders<'a> = BTreeMap<&'a str, (i64, i32, BTreeSet<u32>)>;

/// A per-customer pair statistic.
type Pairs = fn(&[OrderRecord]) -> BTreeSet<(u32, u32)>;

fn main() -> anyhow::Result<()> {
    let z: f64 = std::env::args().nth(1).map_or(Ok(0.0), |s| s.parse())?;
    let config = SynthConfig {
        seed: 7,
        sites: 20,
        customers_per_site: 1000,
        ..SynthConfig::default()
    };
    let franchise = synth::generate(&config);
    let m = franchise.menu.len();
    let cases = held_out_cases(&franchise)?;
    let counts = site_counts(&cases, config.sites, m);
    let statistics: [(&str, Pairs); 3] = [
        ("cooccurring", cooccurring_pairs),
        ("first tried", first_tried_pairs),
        ("next order", next_order_pairs),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut rules: Vec<(String, Vec<Option<SitePrior>>, f32)> =
        vec![("site shares".into(), priors(&counts, None), 0.0)];
    for (name, pairs) in statistics {
        let sum = noisy_sum(&cases, pairs, m, z, &mut rng)?;
        let priors = priors(&counts, Some(&sum));
        for weight in [1.0, 2.0] {
            rules.push((format!("{name} lift × {weight}"), priors.clone(), weight));
        }
    }
    let new_only = cases.iter().filter(|c| is_new_only(c)).count();
    println!(
        "noise {z} per cell: {} held-out orders, {new_only} with only new items",
        cases.len()
    );
    for (name, priors, weight) in &rules {
        let (hits, new_hits) = score(&cases, priors, *weight, m);
        println!(
            "{name:24} HR@10 {:.4}  new-only HR@10 {:.4}",
            hits as f64 / cases.len() as f64,
            new_hits as f64 / new_only as f64
        );
    }
    Ok(())
}

/// Every consenting customer with two orders or more, last order held out.
fn held_out_cases(franchise: &synth::Franchise) -> anyhow::Result<Vec<Case>> {
    let index = franchise.menu.index();
    let mut cases = Vec::new();
    for (site, data) in franchise.sites.iter().enumerate() {
        let mut orders: BTreeMap<&str, Orders> = BTreeMap::new();
        for row in data.rows.iter().filter(|r| r.consent) {
            let at = time::OffsetDateTime::parse(
                &row.timestamp,
                &time::format_description::well_known::Rfc3339,
            )?;
            orders
                .entry(&row.customer_id)
                .or_default()
                .entry(&row.order_id)
                .or_insert((
                    at.unix_timestamp(),
                    at.offset().whole_seconds(),
                    BTreeSet::new(),
                ))
                .2
                .insert(index[row.item_id.as_str()]);
        }
        for customer in orders.into_values() {
            let mut before: Vec<OrderRecord> = customer
                .into_values()
                .map(|(time, offset, items)| {
                    OrderRecord::new(time, offset, items.into_iter().collect())
                })
                .collect();
            before.sort_by_key(|o| o.time);
            if let Some(last) = before.pop().filter(|_| !before.is_empty()) {
                cases.push(Case { site, before, last });
            }
        }
    }
    Ok(cases)
}

/// Each site's item counts over training orders.
fn site_counts(cases: &[Case], sites: usize, m: usize) -> Vec<Vec<f64>> {
    let mut counts = vec![vec![0.0; m]; sites];
    for case in cases {
        for &item in case.before.iter().flat_map(|o| &o.items) {
            counts[case.site][item as usize] += 1.0;
        }
    }
    counts
}

/// The franchise-wide sum of every customer's pairs at unit L2 norm, noised.
fn noisy_sum(
    cases: &[Case],
    pairs: Pairs,
    m: usize,
    z: f64,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Vec<f64>> {
    let mut sum = vec![0.0; m * m];
    for case in cases {
        let own = pairs(&case.before);
        let each = 1.0 / (own.len().max(1) as f64).sqrt();
        for (i, j) in own {
            sum[i as usize * m + j as usize] += each;
        }
    }
    if z > 0.0 {
        let noise = Normal::new(0.0, z)?;
        sum.iter_mut().for_each(|v| *v += noise.sample(rng));
    }
    Ok(sum)
}

/// Each site's prior: its counts, with the franchise's pairs when given.
fn priors(counts: &[Vec<f64>], pairs: Option<&[f64]>) -> Vec<Option<SitePrior>> {
    counts
        .iter()
        .map(|c| {
            let release: Vec<f64> = c
                .iter()
                .chain(pairs.into_iter().flatten())
                .copied()
                .collect();
            SitePrior::from_release(&release, c.len())
        })
        .collect()
}

fn is_new_only(case: &Case) -> bool {
    let had: BTreeSet<u32> = case.before.iter().flat_map(|o| o.items.clone()).collect();
    case.last.items.iter().all(|i| !had.contains(i))
}

/// Hits of GP-TopFreq with its free slots filled by shares + weight × lift.
fn score(cases: &[Case], priors: &[Option<SitePrior>], weight: f32, m: usize) -> (usize, usize) {
    let (mut hits, mut new_hits) = (0, 0);
    let mut lift = vec![0.0; m];
    for case in cases {
        let Some(prior) = &priors[case.site] else {
            continue;
        };
        let history = potluck_shared::model::history_weights(&case.before, DECAY);
        prior.neighbour_scores(&history, None, &mut lift);
        let fill = |j: usize| prior.log_share[j] + weight * lift[j];
        let mut top = topfreq_order(&case.before);
        top.truncate(K);
        let mut new: Vec<usize> = (0..m).filter(|&j| !top.contains(&(j as u32))).collect();
        new.sort_by(|&a, &b| fill(b).total_cmp(&fill(a)));
        top.extend(new.into_iter().take(K - top.len()).map(|j| j as u32));
        let hit = case.last.items.iter().any(|i| top.contains(i));
        hits += usize::from(hit);
        new_hits += usize::from(hit && is_new_only(case));
    }
    (hits, new_hits)
}

/// `j` ordered for the first time in an order after one that held `i`.
fn first_tried_pairs(orders: &[OrderRecord]) -> BTreeSet<(u32, u32)> {
    let mut seen = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for order in orders {
        for &j in order.items.iter().filter(|j| !seen.contains(*j)) {
            pairs.extend(seen.iter().map(|&i| (i, j)));
        }
        seen.extend(order.items.iter().copied());
    }
    pairs
}

/// `j` in the order right after one that held `i` (`i ≠ j`).
fn next_order_pairs(orders: &[OrderRecord]) -> BTreeSet<(u32, u32)> {
    orders
        .windows(2)
        .flat_map(|w| {
            w[0].items.iter().flat_map(|&i| {
                w[1].items
                    .iter()
                    .filter(move |&&j| j != i)
                    .map(move |&j| (i, j))
            })
        })
        .collect()
}
