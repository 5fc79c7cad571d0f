//! Model inputs computed at the site from a customer's own order history:
//! the one pipeline that training, evaluation, fairness audits and the till's
//! recommendations all go through.
//!
//! An [`Example`] has two parts, one per channel of the model:
//! - **explore**: a recency-weighted pooling of the items ordered before (the
//!   most recent order has weight 1, the one before it `decay`, and so on,
//!   normalised to sum to 1), which the model maps through item embeddings;
//! - **repeat**: for each item the customer ordered before, a short vector of
//!   facts about that item in their history ([`RepeatFeature`]): how often,
//!   how recently, at which time of day. The model scores it with a handful
//!   of global weights.
//!
//! Both are functions of the customer's own orders and the time of the order
//! being predicted: there are no per-customer parameters, so a new customer is
//! served from their first order and erasing a customer is deleting their rows.
//! The only input computed from other customers' orders is the [`SitePrior`]
//! (the site's popularity and item neighbours); in private rounds it is a
//! differentially private release of the popularity alone, charged once, so one customer's data
//! still moves only that customer's contribution, which is what the
//! customer-level sensitivity bound rests on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When an order is (or will be) placed, in the site's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// Seconds since the Unix epoch.
    pub time: i64,
    /// Day of the week in the site's local time, Monday = 0.
    pub weekday: u8,
    /// Hour of the day in the site's local time, 0 to 23.
    pub hour: u8,
}

impl Context {
    /// The local weekday and hour of `time` at a site `utc_offset` seconds
    /// east of UTC. The only place either is computed.
    pub fn at(time: i64, utc_offset: i32) -> Self {
        let local = time + i64::from(utc_offset);
        let days = local.div_euclid(86_400);
        // 1970-01-01 was a Thursday: Monday = 0 means Thursday = 3.
        let weekday = ((days + 3).rem_euclid(7)) as u8;
        let hour = (local.rem_euclid(86_400) / 3600) as u8;
        Self {
            time,
            weekday,
            hour,
        }
    }
}

/// The part of the day an hour belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Daypart {
    /// 05–10h.
    Breakfast,
    /// 11–14h.
    Lunch,
    /// 15–17h.
    Afternoon,
    /// 18–21h.
    Dinner,
    /// 22–04h.
    Night,
}

/// Number of dayparts.
pub const DAYPARTS: usize = 5;

impl Daypart {
    /// The daypart of a local hour.
    pub fn of(hour: u8) -> Self {
        match hour {
            5..=10 => Self::Breakfast,
            11..=14 => Self::Lunch,
            15..=17 => Self::Afternoon,
            18..=21 => Self::Dinner,
            _ => Self::Night,
        }
    }

    /// The meal, in words ("breakfast", "the afternoon").
    pub fn describe(self) -> &'static str {
        match self {
            Self::Breakfast => "breakfast",
            Self::Lunch => "lunch",
            Self::Afternoon => "the afternoon",
            Self::Dinner => "dinner",
            Self::Night => "night",
        }
    }
}

/// One order of one customer, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Order time, seconds since the Unix epoch (orders are sorted by it).
    pub time: i64,
    /// Day of the week in the site's local time, Monday = 0.
    pub weekday: u8,
    /// Hour of the day in the site's local time, 0 to 23.
    pub hour: u8,
    /// Distinct menu indices of the items ordered.
    pub items: Vec<u32>,
}

impl OrderRecord {
    /// An order placed at `time` at a site `utc_offset` seconds east of UTC.
    pub fn new(time: i64, utc_offset: i32, items: Vec<u32>) -> Self {
        let at = Context::at(time, utc_offset);
        Self {
            time,
            weekday: at.weekday,
            hour: at.hour,
            items,
        }
    }

    /// When the order was placed.
    pub fn context(&self) -> Context {
        Context {
            time: self.time,
            weekday: self.weekday,
            hour: self.hour,
        }
    }
}

/// The facts about one previously ordered item, in [`Example::repeat`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RepeatFeature {
    /// 1: the item is in the history (the repeat channel's bias).
    InHistory,
    /// `(L − r)/L` for the item's rank r (0-based) among the L distinct
    /// history items in GP-TopFreq order: more orders first, then more
    /// recently ordered, then menu order. The initial model ranks by it alone.
    TopFreqRank,
    /// `ln(1 + orders containing the item)`.
    LogCount,
    /// Share of the customer's orders that contain the item.
    OrderShare,
    /// The same share with recency weights (`decay` per order back).
    DecayedShare,
    /// 1 if the item was in the last order.
    InLastOrder,
    /// `1 / (1 + orders since the item was last ordered)`.
    Recency,
    /// `ln(1 + days since the item was last ordered) / ln(366)`.
    DaysSince,
    /// Share of the customer's orders in the predicted order's daypart that
    /// contain the item (0 with no order in that daypart).
    DaypartShare,
    /// Share of the item's orders that were in the predicted order's daypart.
    DaypartAffinity,
    /// Share of the customer's orders on the same kind of day (weekend or
    /// weekday) as the predicted order that contain the item.
    DayKindShare,
    /// `ln(1 + orders in the history) / ln(101)`, the same for every item:
    /// how much history there is to repeat from.
    HistoryDepth,
}

/// Length of a repeat feature vector.
pub const REPEAT_FEATURES: usize = 12;

/// What the site knows about its menu as a whole, from all its customers:
/// - each item's log share of the site's orders, `ln((c_i + 1) / (Σc + m))`
///   for counts `c` (smoothed, so every value is negative), which ranks items
///   a customer never ordered as the site's popularity does;
/// - optionally, *neighbours*: for each item `i`, a distribution over the
///   menu of the other items customers who ordered `i` ordered ("who had the
///   burger also had the shake"), the statistic item-based next-basket
///   models (TIFU-KNN) are built on.
///
/// Every customer's orders are in both, so a private lineage uses
/// differentially private releases instead: each site's shares, and the
/// franchise's neighbours from a census (see the agent's `dataset` module);
/// what is built here from a release is post-processing and costs nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SitePrior {
    /// Per menu item; empty when the site has none (every item then ties).
    pub log_share: Vec<f32>,
    /// Row-major `[m, m]`: row `i` is the distribution of the items ordered
    /// with `i`; empty when the site has none (the neighbour input is then 0).
    pub neighbours: Vec<f32>,
    /// Per item, the log of its share of all pair values (the rows' common
    /// marginal): the neighbour input is a lift over it.
    log_marginal: Vec<f32>,
    /// The released pair values the rows were built from, and each row's
    /// normaliser: what leaving one customer out needs.
    pairs: Vec<f32>,
    row_total: Vec<f32>,
}

/// One customer's part in the neighbour statistic: the pairs they added to
/// ([`cooccurring_pairs`]) and by how much each. A training example carries
/// it so that its neighbour input leaves that customer out: otherwise the
/// items a customer orders later would be in the input that is trained to
/// predict them, and the model would learn to trust the statistic more than
/// it deserves on customers it has not seen.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OwnPairs {
    /// Sorted (item, other item) pairs.
    pub pairs: Vec<(u32, u32)>,
    /// What the customer added to each pair's value.
    pub weight: f32,
}

impl SitePrior {
    /// The prior of per-item counts (any non-negative values).
    pub fn from_counts(counts: &[f64]) -> Self {
        Self {
            log_share: log_shares(counts),
            ..Self::default()
        }
    }

    /// The prior of a release laid out as [`prior_release_len`] says: `m`
    /// item counts, then (optionally) `m²` pair values, cell `(i, j)` summing
    /// over the customers who ordered both `i` and `j` ([`cooccurring_pairs`],
    /// each one's pairs scaled to unit L2 norm). `None` when the length is
    /// neither `m` nor `m + m²`.
    ///
    /// Pair values may be noisy, so each row is shrunk towards the marginal
    /// (all rows' pairs together) by as much mass as the row's noise is
    /// estimated to hold: for a cell with no signal, noise is as likely
    /// negative as positive, so the mass below zero estimates the mass of
    /// noise above it.
    pub fn from_release(values: &[f64], m: usize) -> Option<Self> {
        let (counts, pairs) = match values.len() {
            n if n == m => (values, &[][..]),
            n if n == prior_release_len(m) => values.split_at(m),
            _ => return None,
        };
        let mut prior = Self::from_counts(counts);
        if !pairs.is_empty() {
            let share = marginal(pairs, m);
            prior.log_marginal = share.iter().map(|s| s.ln() as f32).collect();
            for row in pairs.chunks(m) {
                let (values, total) = neighbour_row(row, &share);
                prior.neighbours.extend(values);
                prior.row_total.push(total);
            }
            prior.pairs = pairs.iter().map(|&c| c as f32).collect();
        }
        Some(prior)
    }

    /// The neighbour input of a pooled history (weights summing to 1): item
    /// `j`'s log lift: its probability under the mixture of its history
    /// items' rows over its marginal probability (0 when the history says
    /// nothing about `j`), written into `out` (length `m`); zeros when the
    /// prior has no neighbours. With `own`, the rows are those the statistic
    /// would have without that customer.
    ///
    /// A lift and not a probability: the probability is mostly popularity,
    /// which the prior's shares already carry, while the lift is what the
    /// customer's own items add (site shares plus the lift rank new items
    /// better than either alone, `docs/research.md`).
    pub fn neighbour_scores(
        &self,
        history: &[(u32, f32)],
        own: Option<&OwnPairs>,
        out: &mut [f32],
    ) {
        let m = out.len();
        out.fill(0.0);
        if self.neighbours.len() != m * m || history.is_empty() {
            return;
        }
        for &(i, w) in history {
            let i = i as usize;
            let row = &self.neighbours[i * m..(i + 1) * m];
            // Leaving the customer out lowers the row's own cells and its total.
            let (own_row, weight) = own.map_or((&[][..], 0.0), |o| (o.row(i as u32), o.weight));
            let lowered = |j: u32| {
                let c = self.pairs[i * m + j as usize];
                c.max(0.0) - (c - weight).max(0.0)
            };
            let total = self.row_total[i];
            let removed: f32 = own_row.iter().map(|&(_, j)| lowered(j)).sum();
            let left = (total - removed).max(f32::MIN_POSITIVE);
            let scale = w * total / left;
            for (o, p) in out.iter_mut().zip(row) {
                *o += scale * p;
            }
            for &(_, j) in own_row {
                let o = &mut out[j as usize];
                *o = (*o - w * lowered(j) / left).max(0.0);
            }
        }
        for (o, base) in out.iter_mut().zip(&self.log_marginal) {
            *o = o.max(f32::MIN_POSITIVE).ln() - base;
        }
    }
}

/// Length of a prior release with neighbours over a menu of `m` items.
pub fn prior_release_len(m: usize) -> usize {
    m + m * m
}

fn log_shares(counts: &[f64]) -> Vec<f32> {
    let m = counts.len() as f64;
    let total: f64 = counts.iter().map(|c| c.max(0.0)).sum();
    counts
        .iter()
        .map(|c| ((c.max(0.0) + 1.0) / (total + m)).ln() as f32)
        .collect()
}

/// Each item's smoothed share of the positive pair values, by column.
fn marginal(pairs: &[f64], m: usize) -> Vec<f64> {
    let mut column = vec![0.0; m];
    for row in pairs.chunks(m) {
        for (c, v) in column.iter_mut().zip(row) {
            *c += v.max(0.0);
        }
    }
    let total: f64 = column.iter().sum();
    column
        .iter()
        .map(|c| (c + 1.0) / (total + m as f64))
        .collect()
}

/// A row of pair values as a distribution, and its normaliser.
fn neighbour_row(row: &[f64], share: &[f64]) -> (Vec<f32>, f32) {
    let positive: f64 = row.iter().map(|c| c.max(0.0)).sum();
    let noise: f64 = row.iter().map(|c| (-c).max(0.0)).sum();
    let shrink = 1.0 + noise;
    let total = positive + shrink;
    let values = row
        .iter()
        .zip(share)
        .map(|(c, s)| ((c.max(0.0) + shrink * s) / total) as f32)
        .collect();
    (values, total as f32)
}

impl OwnPairs {
    /// The customer's pairs that start at item `i`.
    fn row(&self, i: u32) -> &[(u32, u32)] {
        let start = self.pairs.partition_point(|&(a, _)| a < i);
        let end = self.pairs.partition_point(|&(a, _)| a <= i);
        &self.pairs[start..end]
    }
}

/// The (item, other item) pairs of one customer's orders, each once: every
/// ordered pair of distinct items both in the history. What the neighbour
/// statistic counts per customer: customers who ordered `i` and `j` are
/// evidence that a customer with `i` would like `j`.
pub fn cooccurring_pairs(orders: &[OrderRecord]) -> std::collections::BTreeSet<(u32, u32)> {
    let items: std::collections::BTreeSet<u32> = orders
        .iter()
        .flat_map(|o| o.items.iter().copied())
        .collect();
    items
        .iter()
        .flat_map(|&i| items.iter().filter(move |&&j| j != i).map(move |&j| (i, j)))
        .collect()
}

/// A training or evaluation example: a history, a context and the items ordered next.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Sparse pooled history: (menu index, weight), weights summing to 1.
    pub history: Vec<(u32, f32)>,
    /// Each previously ordered item's repeat features, sorted by menu index.
    pub repeat: Vec<(u32, [f32; REPEAT_FEATURES])>,
    /// Weekday of the order to predict.
    pub weekday: u8,
    /// Hour of the order to predict.
    pub hour: u8,
    /// Items of the order to predict.
    pub target: Vec<u32>,
    /// The site's prior over its menu, shared by the site's examples.
    pub prior: std::sync::Arc<SitePrior>,
    /// For a training example, its customer's part in the prior's neighbour
    /// statistic, left out of its input; `None` for evaluation and serving.
    pub own_pairs: Option<std::sync::Arc<OwnPairs>>,
}

impl Example {
    /// The example for an order at `at` after the `past` orders (oldest first).
    pub fn new(past: &[OrderRecord], at: Context, decay: f32, target: Vec<u32>) -> Self {
        Self {
            history: history_weights(past, decay),
            repeat: repeat_features(past, at, decay),
            weekday: at.weekday,
            hour: at.hour,
            target,
            prior: Default::default(),
            own_pairs: None,
        }
    }

    /// The same example with the site's prior.
    pub fn with_prior(self, prior: &std::sync::Arc<SitePrior>) -> Self {
        Self {
            prior: prior.clone(),
            ..self
        }
    }

    /// Whether `item` was ordered before.
    pub fn has_ordered(&self, item: u32) -> bool {
        self.repeat.binary_search_by_key(&item, |(i, _)| *i).is_ok()
    }
}

/// Pool the items of `past` orders (oldest first) with recency weights.
///
/// Returns sparse (index, weight) pairs sorted by index, or an empty vector
/// for an empty history.
pub fn history_weights(past: &[OrderRecord], decay: f32) -> Vec<(u32, f32)> {
    let mut weights: BTreeMap<u32, f32> = Default::default();
    let mut w = 1.0f32;
    for order in past.iter().rev() {
        for &item in &order.items {
            *weights.entry(item).or_default() += w;
        }
        w *= decay;
    }
    let total: f32 = weights.values().sum();
    if total <= 0.0 {
        return Vec::new();
    }
    weights.into_iter().map(|(i, v)| (i, v / total)).collect()
}

/// Per item of a history: what the repeat features are computed from.
#[derive(Debug, Default, Clone, Copy)]
struct ItemFacts {
    count: u32,
    decayed: f64,
    last_order: usize,
    last_time: i64,
    in_daypart: u32,
    in_day_kind: u32,
}

fn is_weekend(weekday: u8) -> bool {
    weekday >= 5
}

fn item_facts(past: &[OrderRecord], at: Context, decay: f32) -> BTreeMap<u32, ItemFacts> {
    let mut facts: BTreeMap<u32, ItemFacts> = BTreeMap::new();
    let n = past.len();
    let daypart = Daypart::of(at.hour);
    for (k, order) in past.iter().enumerate() {
        let weight = f64::from(decay).powi((n - 1 - k) as i32);
        let same_daypart = Daypart::of(order.hour) == daypart;
        let same_kind = is_weekend(order.weekday) == is_weekend(at.weekday);
        for &item in &order.items {
            let f = facts.entry(item).or_default();
            f.count += 1;
            f.decayed += weight;
            f.last_order = k;
            f.last_time = order.time;
            f.in_daypart += u32::from(same_daypart);
            f.in_day_kind += u32::from(same_kind);
        }
    }
    facts
}

/// The distinct items of `past` in GP-TopFreq order: more orders first, then
/// more recently ordered, then lower menu index.
pub fn topfreq_order(past: &[OrderRecord]) -> Vec<u32> {
    let facts = item_facts(past, Context::at(0, 0), 1.0);
    ranked_by_frequency(&facts)
}

fn ranked_by_frequency(facts: &BTreeMap<u32, ItemFacts>) -> Vec<u32> {
    let mut items: Vec<u32> = facts.keys().copied().collect();
    items.sort_by(|a, b| {
        let (fa, fb) = (&facts[a], &facts[b]);
        fb.count
            .cmp(&fa.count)
            .then(fb.last_order.cmp(&fa.last_order))
            .then(a.cmp(b))
    });
    items
}

/// Each previously ordered item's repeat features, sorted by menu index.
pub fn repeat_features(
    past: &[OrderRecord],
    at: Context,
    decay: f32,
) -> Vec<(u32, [f32; REPEAT_FEATURES])> {
    use RepeatFeature as F;
    let facts = item_facts(past, at, decay);
    let rank: BTreeMap<u32, usize> = ranked_by_frequency(&facts)
        .into_iter()
        .enumerate()
        .map(|(r, item)| (item, r))
        .collect();
    let n = past.len();
    let distinct = facts.len() as f64;
    let decayed_total: f64 = (0..n).map(|k| f64::from(decay).powi(k as i32)).sum();
    let daypart = Daypart::of(at.hour);
    let orders_in_daypart = past
        .iter()
        .filter(|o| Daypart::of(o.hour) == daypart)
        .count();
    let orders_of_kind = past
        .iter()
        .filter(|o| is_weekend(o.weekday) == is_weekend(at.weekday))
        .count();
    let share = |part: u32, whole: usize| {
        if whole == 0 {
            0.0
        } else {
            f64::from(part) / whole as f64
        }
    };
    let depth = (1.0 + n as f64).ln() / 101f64.ln();
    facts
        .iter()
        .map(|(&item, f)| {
            let mut v = [0.0f64; REPEAT_FEATURES];
            v[F::InHistory as usize] = 1.0;
            v[F::TopFreqRank as usize] = (distinct - rank[&item] as f64) / distinct;
            v[F::LogCount as usize] = f64::from(f.count).ln_1p();
            v[F::OrderShare as usize] = share(f.count, n);
            v[F::DecayedShare as usize] = f.decayed / decayed_total;
            v[F::InLastOrder as usize] = if f.last_order + 1 == n { 1.0 } else { 0.0 };
            v[F::Recency as usize] = 1.0 / (n - f.last_order) as f64;
            let days = ((at.time - f.last_time).max(0) as f64) / 86_400.0;
            v[F::DaysSince as usize] = days.ln_1p() / 366f64.ln();
            v[F::DaypartShare as usize] = share(f.in_daypart, orders_in_daypart);
            v[F::DaypartAffinity as usize] = share(f.in_daypart, f.count as usize);
            v[F::DayKindShare as usize] = share(f.in_day_kind, orders_of_kind);
            v[F::HistoryDepth as usize] = depth;
            (item, v.map(|x| x as f32))
        })
        .collect()
}

/// One example per order after the first: predict order k from orders before k.
///
/// `orders` must be sorted oldest first.
pub fn training_examples(orders: &[OrderRecord], decay: f32) -> Vec<Example> {
    (1..orders.len())
        .map(|k| {
            Example::new(
                &orders[..k],
                orders[k].context(),
                decay,
                orders[k].items.clone(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(time: i64, items: &[u32]) -> OrderRecord {
        OrderRecord {
            time,
            weekday: 0,
            hour: 12,
            items: items.to_vec(),
        }
    }

    #[test]
    fn recent_orders_weigh_more_and_weights_sum_to_one() {
        let past = [order(1, &[0]), order(2, &[1])];
        let w = history_weights(&past, 0.5);
        assert_eq!(w.len(), 2);
        let total: f32 = w.iter().map(|(_, v)| v).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(w[1].1 > w[0].1, "the later order's item weighs more: {w:?}");
        assert!(history_weights(&[], 0.5).is_empty());
    }

    #[test]
    fn examples_predict_each_later_order() {
        let orders = [order(1, &[0]), order(2, &[1]), order(3, &[2, 3])];
        let ex = training_examples(&orders, 0.8);
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].target, vec![2, 3]);
        assert_eq!(ex[0].history, vec![(0, 1.0)]);
        assert!(ex[1].has_ordered(1) && !ex[1].has_ordered(2));
    }

    #[test]
    fn topfreq_breaks_ties_by_recency_then_index() {
        // Item 5 twice; 2 and 7 once each, 7 more recently; 3 and 4 together last.
        let past = [
            order(1, &[5]),
            order(2, &[2, 5]),
            order(3, &[7]),
            order(4, &[3, 4]),
        ];
        assert_eq!(topfreq_order(&past), vec![5, 3, 4, 7, 2]);
    }

    #[test]
    fn repeat_features_of_a_habit() {
        let day = 86_400;
        // Item 0 in six of seven lunch orders, item 1 once at dinner, last.
        let mut past: Vec<OrderRecord> = (0..6).map(|k| order(k * day, &[0])).collect();
        past.push(OrderRecord {
            hour: 19,
            ..order(6 * day, &[1])
        });
        let at = Context {
            time: 8 * day,
            weekday: 1,
            hour: 12,
        };
        let features = repeat_features(&past, at, 0.8);
        let f = |item: usize, which: RepeatFeature| features[item].1[which as usize];
        assert_eq!(features.len(), 2);
        assert_eq!(f(0, RepeatFeature::TopFreqRank), 1.0);
        assert_eq!(f(1, RepeatFeature::TopFreqRank), 0.5);
        assert!((f(0, RepeatFeature::OrderShare) - 6.0 / 7.0).abs() < 1e-6);
        assert_eq!(f(1, RepeatFeature::InLastOrder), 1.0);
        assert_eq!(f(0, RepeatFeature::InLastOrder), 0.0);
        assert_eq!(f(0, RepeatFeature::Recency), 0.5);
        assert_eq!(f(0, RepeatFeature::DaypartShare), 1.0);
        assert_eq!(f(1, RepeatFeature::DaypartShare), 0.0);
        assert_eq!(f(1, RepeatFeature::DaypartAffinity), 0.0);
        assert!(f(0, RepeatFeature::DaysSince) > f(1, RepeatFeature::DaysSince));
    }

    #[test]
    fn local_weekday_and_hour() {
        // 2025-01-06T08:30:00+02:00 is a Monday, 08h local (06:30 UTC).
        let t = 1_736_145_000;
        let at = Context::at(t, 7200);
        assert_eq!((at.weekday, at.hour), (0, 8));
        // 2025-01-12T23:59Z is a Sunday; five hours west it is 18h the same day.
        let sunday = 1_736_726_340;
        assert_eq!(Context::at(sunday, 0).weekday, 6);
        assert_eq!(
            (
                Context::at(sunday, -5 * 3600).weekday,
                Context::at(sunday, -5 * 3600).hour
            ),
            (6, 18)
        );
        // A negative offset across midnight: 00:30 UTC Monday is Sunday 19:30 at -05:00.
        let monday = 1_736_123_400;
        assert_eq!(
            (
                Context::at(monday, -5 * 3600).weekday,
                Context::at(monday, -5 * 3600).hour
            ),
            (6, 19)
        );
    }

    #[test]
    fn cooccurring_pairs_are_every_pair_of_distinct_items_once() {
        let orders = [order(1, &[0, 1]), order(2, &[1, 2]), order(3, &[2, 0])];
        let pairs: Vec<_> = cooccurring_pairs(&orders).into_iter().collect();
        // Items 0, 1, 2, wherever and however often they were ordered.
        assert_eq!(pairs, vec![(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]);
    }

    /// A menu of 3 where item 0 is popular and customers who had item 1 also
    /// had item 2.
    fn had_2_with_1() -> Vec<f64> {
        let mut release = vec![10.0, 2.0, 1.0];
        release.extend([0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]);
        release
    }

    #[test]
    fn neighbours_rank_what_customers_with_the_same_items_had() {
        // Menu of 3: item 0 popular; customers who had item 1 also had item 2.
        let (m, release) = (3, had_2_with_1());
        let prior = SitePrior::from_release(&release, m).unwrap();
        let mut after_1 = [0.0; 3];
        prior.neighbour_scores(&[(1, 1.0)], None, &mut after_1);
        assert!(after_1[2] > 0.0 && after_1[0] < 0.0, "{after_1:?}");
        // An item with no pairs says nothing: no lift either way.
        let mut after_0 = [1.0; 3];
        prior.neighbour_scores(&[(0, 1.0)], None, &mut after_0);
        assert!(after_0.iter().all(|l| l.abs() < 1e-5), "{after_0:?}");
        // A release without pairs, or of the wrong length.
        let plain = SitePrior::from_release(&release[..m], m).unwrap();
        assert!(plain.neighbours.is_empty());
        let mut none = [1.0; 3];
        plain.neighbour_scores(&[(1, 1.0)], None, &mut none);
        assert_eq!(none, [0.0; 3]);
        assert!(SitePrior::from_release(&release[..5], m).is_none());
    }

    #[test]
    fn a_training_example_leaves_its_own_customer_out_of_the_neighbours() {
        // The only customer who tried item 2 after item 1 is this one.
        let (m, release) = (3, had_2_with_1());
        let prior = SitePrior::from_release(&release, m).unwrap();
        let own = OwnPairs {
            pairs: vec![(1, 2)],
            weight: 5.0,
        };
        let mut with = [0.0; 3];
        prior.neighbour_scores(&[(1, 1.0)], None, &mut with);
        let mut without = [0.0; 3];
        prior.neighbour_scores(&[(1, 1.0)], Some(&own), &mut without);
        assert!(with[2] > with[0], "{with:?}");
        // Left out, row 1 says nothing: no lift either way.
        assert!(without.iter().all(|l| l.abs() < 1e-5), "{without:?}");
    }

    #[test]
    fn noise_in_a_neighbour_row_is_shrunk_towards_the_marginal() {
        // Row 1 holds only noise (as much below zero as above): its
        // distribution stays near the marginal, not at the noise.
        let m = 3;
        let mut release = vec![10.0, 2.0, 1.0];
        release.extend([0.0, 4.0, 4.0, -3.0, 0.0, 3.0, 4.0, 4.0, 0.0]);
        let prior = SitePrior::from_release(&release, m).unwrap();
        let row = &prior.neighbours[m..2 * m];
        let share = |i: usize| prior.log_marginal[i].exp();
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Normalised as it came, the row would put all its mass on item 2.
        assert!(row[2] < 0.7, "{row:?}");
        assert!(row[0] > share(0) / 2.0, "{row:?}");
    }
}
