//! How well do franchise-wide item statistics rank new items? A probe of the
//! explore channel's inputs, without any model: on the synthetic franchise
//! (20 sites × 1,000 customers, seed 7, consenting customers, last order
//! held out as in the agent's `SiteData::prepare`), GP-TopFreq fills its free
//! slots by each rule, and the probe prints HR@10 overall and on the orders
//! that hold only new items. The pair statistics are summed over the whole
//! franchise with each customer's pairs at unit L2 norm, as the neighbour
//! census sums them, with Gaussian noise of the given deviation per cell:
//!
//! ```sh
//! cargo run --release -p potluck-sim --example explore_probe -- 4
//! ```
//!
//! Rules: `site pop` (the site's shares, GP-TopFreq itself); `cooc`,
//! `first-order`, `next-order` (the log probability under the history's
//! mixture of rows of: items ordered by the same customer, items first tried
//! after, items in the next order); `+` adds the site's log shares; `lift`
//! is the log probability over the franchise's popularity, `liftcol` over the
//! rows' own marginal (what `SitePrior` uses), times a weight.
use std::collections::BTreeMap;

use potluck_shared::model::{OrderRecord, topfreq_order};
use potluck_shared::synth::{self, SynthConfig};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

struct Cust {
    site: usize,
    before: Vec<OrderRecord>,
    last: OrderRecord,
}

/// One customer's orders, by order id: (time, UTC offset, distinct items).
type Orders = BTreeMap<String, (i64, i32, Vec<u32>)>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let z: f64 = args.get(1).map_or(Ok(0.0), |s| s.parse())?;
    let cfg = SynthConfig {
        seed: 7,
        sites: 20,
        customers_per_site: 1000,
        ..SynthConfig::default()
    };
    let fr = synth::generate(&cfg);
    let index = fr.menu.index();
    let m = fr.menu.len();
    let mut custs = Vec::new();
    for (s, site) in fr.sites.iter().enumerate() {
        let mut by: BTreeMap<String, Orders> = BTreeMap::new();
        for r in site.rows.iter().filter(|r| r.consent) {
            let t = time::OffsetDateTime::parse(
                &r.timestamp,
                &time::format_description::well_known::Rfc3339,
            )?;
            let e = by
                .entry(r.customer_id.clone())
                .or_default()
                .entry(r.order_id.clone())
                .or_insert((t.unix_timestamp(), t.offset().whole_seconds(), vec![]));
            let i = index[r.item_id.as_str()];
            if !e.2.contains(&i) {
                e.2.push(i);
            }
        }
        for (_, orders) in by {
            let mut os: Vec<OrderRecord> = orders
                .into_values()
                .map(|(t, off, mut items)| {
                    items.sort();
                    OrderRecord::new(t, off, items)
                })
                .collect();
            os.sort_by_key(|o| o.time);
            let Some(last) = os.pop().filter(|_| !os.is_empty()) else {
                continue;
            };
            custs.push(Cust {
                site: s,
                before: os,
                last,
            });
        }
    }
    let sites = cfg.sites;
    // Statistics.
    let mut site_pop = vec![vec![0.0f64; m]; sites];
    let mut fr_pop = vec![0.0f64; m];
    let mut first = vec![0.0f64; m * m];
    let mut cooc = vec![0.0f64; m * m];
    let mut next = vec![0.0f64; m * m];
    for c in &custs {
        let mut own: BTreeMap<u32, f64> = BTreeMap::new();
        for o in &c.before {
            for &i in &o.items {
                site_pop[c.site][i as usize] += 1.0;
                *own.entry(i).or_default() += 1.0;
            }
        }
        let n = own.values().map(|v| v * v).sum::<f64>().sqrt();
        for (&i, v) in &own {
            fr_pop[i as usize] += v / n;
        }
        let fp = first_order_pairs(&c.before);
        let w = 1.0 / (fp.len().max(1) as f64).sqrt();
        for (i, j) in fp {
            first[i as usize * m + j as usize] += w;
        }
        let items: Vec<u32> = own.keys().copied().collect();
        let np = (items.len() * items.len().saturating_sub(1)).max(1) as f64;
        for &i in &items {
            for &j in &items {
                if i != j {
                    cooc[i as usize * m + j as usize] += 1.0 / np.sqrt();
                }
            }
        }
        let mut pairs = std::collections::BTreeSet::new();
        for w in c.before.windows(2) {
            for &i in &w[0].items {
                for &j in &w[1].items {
                    if i != j {
                        pairs.insert((i, j));
                    }
                }
            }
        }
        let wn = 1.0 / (pairs.len().max(1) as f64).sqrt();
        for (i, j) in pairs {
            next[i as usize * m + j as usize] += wn;
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    if z > 0.0 {
        let nd = Normal::new(0.0, z)?;
        for v in first
            .iter_mut()
            .chain(cooc.iter_mut())
            .chain(next.iter_mut())
        {
            *v += nd.sample(&mut rng);
        }
    }
    let colsum = |mat: &[f64]| -> Vec<f64> {
        let mut c = vec![0.0; m];
        for i in 0..m {
            for j in 0..m {
                c[j] += mat[i * m + j].max(0.0);
            }
        }
        let t: f64 = c.iter().sum();
        c.iter().map(|v| (v + 1.0) / (t + m as f64)).collect()
    };
    let rows = |mat: &[f64]| -> Vec<f64> {
        let share = colsum(mat);
        let mut out = vec![0.0; m * m];
        for i in 0..m {
            let row = &mat[i * m..(i + 1) * m];
            let pos: f64 = row.iter().map(|c| c.max(0.0)).sum();
            let noise: f64 = row.iter().map(|c| (-c).max(0.0)).sum();
            let shrink = 1.0 + noise;
            for j in 0..m {
                out[i * m + j] = (row[j].max(0.0) + shrink * share[j]) / (pos + shrink);
            }
        }
        out
    };
    let fr_share: Vec<f64> = {
        let t: f64 = fr_pop.iter().sum();
        fr_pop.iter().map(|v| (v + 1.0) / (t + m as f64)).collect()
    };
    let cm = colsum(&cooc);
    let fr_rows = rows(&first);
    let co_rows = rows(&cooc);
    let nx_rows = rows(&next);
    let decay = 0.8f32;
    let mut hits: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut total = 0.0;
    let mut new_only = 0.0;
    for c in &custs {
        let own = topfreq_order(&c.before);
        let hist = potluck_shared::model::history_weights(&c.before, decay);
        let sp: Vec<f64> = {
            let t: f64 = site_pop[c.site].iter().sum();
            site_pop[c.site]
                .iter()
                .map(|v| ((v + 1.0) / (t + m as f64)).ln())
                .collect()
        };
        let mix = |rows: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; m];
            for &(i, w) in &hist {
                for j in 0..m {
                    out[j] += f64::from(w) * rows[i as usize * m + j];
                }
            }
            out.iter().map(|v| v.max(1e-12).ln()).collect()
        };
        let nf = mix(&fr_rows);
        let nc = mix(&co_rows);
        let nn = mix(&nx_rows);
        let target: Vec<u32> = c.last.items.clone();
        let is_new_only = target.iter().all(|t| !own.contains(t));
        total += 1.0;
        if is_new_only {
            new_only += 1.0;
        }
        let mut score = |name: &str, s: &dyn Fn(usize) -> f64| {
            let mut cands: Vec<usize> = (0..m).filter(|j| !own.contains(&(*j as u32))).collect();
            cands.sort_by(|a, b| s(*b).total_cmp(&s(*a)));
            let mut top: Vec<u32> = own.iter().copied().take(10).collect();
            for j in cands {
                if top.len() >= 10 {
                    break;
                }
                top.push(j as u32);
            }
            let hit = target.iter().any(|t| top.contains(t));
            let e = hits.entry(name.to_string()).or_default();
            e.0 += f64::from(u8::from(hit));
            if is_new_only {
                e.1 += f64::from(u8::from(hit));
            }
        };
        score("site pop", &|j| sp[j]);
        score("first-order", &|j| nf[j]);
        score("cooc", &|j| nc[j]);
        score("next-order", &|j| nn[j]);
        score("site pop + first", &|j| sp[j] + nf[j]);
        score("site pop + cooc", &|j| sp[j] + nc[j]);
        score("site pop + next", &|j| sp[j] + nn[j]);
        for a in [0.5f64, 1.0, 1.5, 2.0, 3.0] {
            score(&format!("lift cooc x{a}"), &|j| {
                a * (nc[j] - fr_share[j].ln()) + sp[j]
            });
            score(&format!("lift first x{a}"), &|j| {
                a * (nf[j] - fr_share[j].ln()) + sp[j]
            });
            score(&format!("liftcol cooc x{a}"), &|j| {
                a * (nc[j] - cm[j].ln()) + sp[j]
            });
        }
    }
    println!("z {z}: {total} cases, {new_only} new-only");
    for (k, (h, n)) in hits {
        println!(
            "{k:20} HR {:.4}  new-only HR {:.4}",
            h / total,
            n / new_only
        );
    }
    Ok(())
}

/// The pairs the census counted before it counted co-occurrence: `j`
/// ordered for the first time in an order after one that held `i`.
fn first_order_pairs(orders: &[OrderRecord]) -> std::collections::BTreeSet<(u32, u32)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut pairs = std::collections::BTreeSet::new();
    for order in orders {
        for &j in &order.items {
            if !seen.contains(&j) {
                pairs.extend(seen.iter().map(|&i| (i, j)));
            }
        }
        seen.extend(order.items.iter().copied());
    }
    pairs
}
