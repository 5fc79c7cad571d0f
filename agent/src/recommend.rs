//! Recommendations for the till, from the latest global model the site has.
//!
//! A consenting customer with orders gets the model's top items for their
//! history and the current context (weekday, hour). Each item comes with the
//! factors that raised its score, found by occlusion: the change in the
//! item's logit when one history item is left out of the pooled history, or
//! when the hour (weekday) is replaced by the average over all hours
//! (weekdays). The largest factor, with facts from the customer's own orders,
//! becomes a sentence a waiter can read. Everyone else (unknown customers,
//! customers without consent or without usable orders, told apart by
//! nothing in the answer), and everyone while
//! the site has no model yet, gets the site's popular items, flagged as not
//! personalised.

use std::collections::BTreeMap;
use std::sync::Arc;

use potluck_shared::model::{
    Context, Daypart, Example, GlobalModel, HOURS, Menu, OrderRecord, SitePrior, WEEKDAYS,
};
use serde::Serialize;
use time::OffsetDateTime;

use crate::evaluation::{score, top_k};
use crate::store::{Customer, SiteStore, StoreError};

/// Largest `k` a request may ask for.
pub const MAX_K: usize = 50;

/// Why recommendations could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecommendError {
    /// `k` is out of range.
    #[error("k must be between 1 and {MAX_K}, got {0}")]
    BadK(usize),
    /// Neither a model nor a configured menu says what can be recommended.
    #[error(
        "no menu yet: set `menu` in the agent configuration or connect to the coordinator once"
    )]
    NoMenu,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The model could not be evaluated.
    #[error("the stored model is unusable: {0}")]
    Model(String),
}

/// Why a customer gets popular rather than personal items.
///
/// One answer covers a customer the site does not know, one who has not
/// consented and one without orders of menu items: the till learns nothing
/// about whether someone is a customer, or what they consented to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotPersonalised {
    /// No personal recommendations for this customer (unknown here, no
    /// consent, or no orders of items on the current menu).
    NoProfile,
    /// The site has not received a global model yet (said for everyone).
    NoModel,
}

impl NotPersonalised {
    /// Why, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoProfile => "no personal recommendations for this customer",
            Self::NoModel => "this site has no model yet",
        }
    }
}

/// What a till asks for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The customer, as in the orders CSV.
    pub customer: &'a str,
    /// How many items.
    pub k: usize,
    /// When the order is being taken (default: now).
    pub at: Option<OffsetDateTime>,
}

/// Recommendations for one customer.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendations {
    /// Whether the items are chosen for this customer.
    pub personalised: bool,
    /// Why not, if not.
    pub fallback: Option<NotPersonalised>,
    /// The global model used (none for popularity).
    pub model_version: Option<u64>,
    /// The items, best first.
    pub items: Vec<Recommended>,
}

/// One recommended item.
#[derive(Debug, Clone, Serialize)]
pub struct Recommended {
    /// Menu item.
    pub item_id: String,
    /// Its name.
    pub name: String,
    /// Its category.
    pub category: String,
    /// Model probability of being in the next order, or the share of the
    /// site's orders that include it (popularity).
    pub score: f64,
    /// A sentence a waiter can read.
    pub explanation: String,
    /// What raised the score, largest first (personalised items only).
    pub factors: Vec<Factor>,
}

/// One factor of an item's score.
#[derive(Debug, Clone, Serialize)]
pub struct Factor {
    /// `history` (an item ordered before), `hour` or `weekday`.
    pub kind: &'static str,
    /// The item ordered before, the hour (0-23) or the weekday (Monday = 0).
    pub value: String,
    /// How much it raised the item's logit.
    pub contribution: f64,
}

/// Recommend items; `menu` is used until the site has a model.
pub fn recommend(
    store: &SiteStore,
    menu: Option<Menu>,
    request: &Request<'_>,
) -> Result<Recommendations, RecommendError> {
    if !(1..=MAX_K).contains(&request.k) {
        return Err(RecommendError::BadK(request.k));
    }
    let model = store.model()?;
    let menu = match (&model, menu) {
        (Some(model), _) => model.spec.menu.clone(),
        (None, Some(menu)) => menu,
        (None, None) => return Err(RecommendError::NoMenu),
    };
    let customer = store.customer(request.customer, &menu)?;
    // The model's absence is said first: it is the same for every customer.
    let fallback = match (&customer, &model) {
        (_, None) => NotPersonalised::NoModel,
        (Some(customer), Some(model))
            if customer.consent && !customer.history.orders.is_empty() =>
        {
            return personalised(store, model, customer, request);
        }
        _ => NotPersonalised::NoProfile,
    };
    popular(store, &menu, request.k, fallback)
}

/// The site's most ordered items, over consenting customers' orders.
fn popular(
    store: &SiteStore,
    menu: &Menu,
    k: usize,
    fallback: NotPersonalised,
) -> Result<Recommendations, RecommendError> {
    let histories = store.histories(menu, true)?;
    let mut counts = vec![0u32; menu.len()];
    let mut orders = 0u32;
    for order in histories.iter().flat_map(|h| &h.orders) {
        orders += 1;
        for &item in &order.items {
            counts[item as usize] += 1;
        }
    }
    let shares: Vec<f32> = counts
        .iter()
        .map(|&c| c as f32 / orders.max(1) as f32)
        .collect();
    let items = top_k(&shares, k)
        .into_iter()
        .map(|i| {
            let item = &menu.items()[i as usize];
            let share = f64::from(shares[i as usize]);
            Recommended {
                item_id: item.item_id.clone(),
                name: item.name.clone(),
                category: item.category.clone(),
                score: share,
                explanation: format!(
                    "popular here: in {:.0}% of orders (not personalised: {})",
                    share * 100.0,
                    fallback.describe()
                ),
                factors: Vec::new(),
            }
        })
        .collect();
    Ok(Recommendations {
        personalised: false,
        fallback: Some(fallback),
        model_version: None,
        items,
    })
}

/// The model's top items for the customer, with the factors behind each.
fn personalised(
    store: &SiteStore,
    model: &GlobalModel,
    customer: &Customer,
    request: &Request<'_>,
) -> Result<Recommendations, RecommendError> {
    let spec = &model.spec;
    let time = request
        .at
        .unwrap_or_else(OffsetDateTime::now_utc)
        .unix_timestamp();
    let at = Context::at(time, customer.utc_offset);
    let orders = &customer.history.orders;
    // The site's prior exactly as training and evaluation see it.
    let prior = crate::client::site_data(store, model)?.prior;
    let probe = Probe::new(orders, at, spec.history_decay, &prior);
    let logits = score(
        spec,
        &model.params,
        &probe.examples.iter().collect::<Vec<_>>(),
    )
    .map_err(|e| RecommendError::Model(e.to_string()))?;
    let full = &logits[0];
    let probabilities = softmax(full);
    let facts = OrderFacts::new(orders);
    let items = top_k(full, request.k.min(spec.menu.len()))
        .into_iter()
        .map(|i| {
            let item = &spec.menu.items()[i as usize];
            let causes = probe.factors(&logits, i);
            Recommended {
                item_id: item.item_id.clone(),
                name: item.name.clone(),
                category: item.category.clone(),
                score: f64::from(probabilities[i as usize]),
                explanation: explain(i, causes.first().map(|c| c.0), &facts, &spec.menu),
                factors: causes
                    .into_iter()
                    .map(|(cause, contribution)| cause.factor(contribution, &spec.menu))
                    .collect(),
            }
        })
        .collect();
    Ok(Recommendations {
        personalised: true,
        fallback: None,
        model_version: Some(model.version.0),
        items,
    })
}

/// The examples scored to explain a recommendation: the real one first, then
/// one per history item left out, then every weekday, then every hour. Each
/// is built by [`Example::new`], the pipeline training and evaluation use.
struct Probe {
    examples: Vec<Example>,
    history: Vec<u32>,
    weekday: u8,
    hour: u8,
}

impl Probe {
    fn new(orders: &[OrderRecord], at: Context, decay: f32, prior: &Arc<SitePrior>) -> Self {
        let example = |orders: &[OrderRecord], at: Context| {
            Example::new(orders, at, decay, Vec::new()).with_prior(prior)
        };
        let real = example(orders, at);
        let history: Vec<u32> = real.repeat.iter().map(|(i, _)| *i).collect();
        let mut examples = vec![real];
        for &left_out in &history {
            let rest: Vec<OrderRecord> = orders
                .iter()
                .map(|o| OrderRecord {
                    items: o.items.iter().copied().filter(|&i| i != left_out).collect(),
                    ..o.clone()
                })
                .filter(|o| !o.items.is_empty())
                .collect();
            examples.push(example(&rest, at));
        }
        for weekday in 0..WEEKDAYS as u8 {
            examples.push(example(orders, Context { weekday, ..at }));
        }
        for hour in 0..HOURS as u8 {
            examples.push(example(orders, Context { hour, ..at }));
        }
        Self {
            examples,
            history,
            weekday: at.weekday,
            hour: at.hour,
        }
    }

    /// The positive factors of `item`'s logit, largest first.
    fn factors(&self, logits: &[Vec<f32>], item: u32) -> Vec<(Cause, f64)> {
        let i = item as usize;
        let full = f64::from(logits[0][i]);
        let n = self.history.len();
        let mean = |rows: &[Vec<f32>]| {
            rows.iter().map(|r| f64::from(r[i])).sum::<f64>() / rows.len() as f64
        };
        let mut factors: Vec<(Cause, f64)> = self
            .history
            .iter()
            .enumerate()
            .map(|(j, &h)| (Cause::History(h), full - f64::from(logits[1 + j][i])))
            .collect();
        let weekdays = &logits[1 + n..1 + n + WEEKDAYS];
        let hours = &logits[1 + n + WEEKDAYS..];
        factors.push((Cause::Weekday(self.weekday), full - mean(weekdays)));
        factors.push((Cause::Hour(self.hour), full - mean(hours)));
        factors.retain(|(_, contribution)| *contribution > 0.0);
        factors.sort_by(|a, b| b.1.total_cmp(&a.1));
        factors
    }
}

/// What raised an item's score: an item ordered before (menu index), or the context.
#[derive(Debug, Clone, Copy)]
enum Cause {
    History(u32),
    Weekday(u8),
    Hour(u8),
}

impl Cause {
    /// The factor as the API shows it.
    fn factor(self, contribution: f64, menu: &Menu) -> Factor {
        let (kind, value) = match self {
            Self::History(item) => ("history", menu.items()[item as usize].item_id.clone()),
            Self::Weekday(day) => ("weekday", day.to_string()),
            Self::Hour(hour) => ("hour", hour.to_string()),
        };
        Factor {
            kind,
            value,
            contribution,
        }
    }
}

/// What the customer's own orders say, for explanations.
struct OrderFacts {
    orders: usize,
    /// Per item: how many orders had it, and how many of those were in each meal.
    items: BTreeMap<u32, (usize, BTreeMap<&'static str, usize>)>,
}

impl OrderFacts {
    fn new(orders: &[OrderRecord]) -> Self {
        let mut items: BTreeMap<u32, (usize, BTreeMap<&'static str, usize>)> = BTreeMap::new();
        for order in orders {
            for &item in &order.items {
                let entry = items.entry(item).or_default();
                entry.0 += 1;
                *entry
                    .1
                    .entry(Daypart::of(order.hour).describe())
                    .or_default() += 1;
            }
        }
        Self {
            orders: orders.len(),
            items,
        }
    }

    /// "often orders X" with the meal most of those orders were at, if most were.
    fn habit(&self, item: u32, name: &str) -> String {
        let Some((count, meals)) = self.items.get(&item) else {
            return format!("has ordered {name}");
        };
        let how_often = match (*count, self.orders) {
            (1, _) => "has ordered".to_string(),
            (c, n) if 2 * c >= n => "usually orders".to_string(),
            _ => "often orders".to_string(),
        };
        let usual_meal = meals
            .iter()
            .max_by_key(|(_, n)| **n)
            .filter(|(_, n)| 2 * **n > *count && *count > 1)
            .map(|(meal, _)| format!(" at {meal}"))
            .unwrap_or_default();
        format!(
            "{how_often} {name}{usual_meal} ({count} of {} orders)",
            self.orders
        )
    }
}

const WEEKDAY_NAMES: [&str; 7] = [
    "Mondays",
    "Tuesdays",
    "Wednesdays",
    "Thursdays",
    "Fridays",
    "Saturdays",
    "Sundays",
];

/// The sentence for an item, from its largest factor.
fn explain(item: u32, top: Option<Cause>, facts: &OrderFacts, menu: &Menu) -> String {
    let name = |i: u32| menu.items()[i as usize].name.as_str();
    match top {
        None => format!("{} is a popular choice at this time", name(item)),
        Some(Cause::History(h)) if h == item => facts.habit(item, name(item)),
        Some(Cause::History(h)) => {
            format!("goes with what they order: {}", facts.habit(h, name(h)))
        }
        Some(Cause::Weekday(day)) => format!(
            "{} is a favourite on {}",
            name(item),
            WEEKDAY_NAMES[usize::from(day).min(6)]
        ),
        Some(Cause::Hour(hour)) => format!(
            "{} is a favourite at {}",
            name(item),
            Daypart::of(hour).describe()
        ),
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_shared::model::OrderRecord;

    fn order(hour: u8, items: &[u32]) -> OrderRecord {
        OrderRecord {
            time: 0,
            weekday: 0,
            hour,
            items: items.to_vec(),
        }
    }

    #[test]
    fn habits_name_frequency_and_meal() {
        let facts = OrderFacts::new(&[order(12, &[0]), order(13, &[0, 1]), order(19, &[1])]);
        assert_eq!(
            facts.habit(0, "Latte"),
            "usually orders Latte at lunch (2 of 3 orders)"
        );
        // Item 1 was ordered once at lunch and once at dinner: no usual meal.
        assert_eq!(
            facts.habit(1, "Bagel"),
            "usually orders Bagel (2 of 3 orders)"
        );
        let facts = OrderFacts::new(&[order(8, &[0]), order(8, &[1]), order(8, &[2])]);
        assert_eq!(facts.habit(0, "Tea"), "has ordered Tea (1 of 3 orders)");
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[1] > p[2] && p[2] > p[0]);
    }
}
