//! A synthetic restaurant franchise, deterministic by seed.
//!
//! The generative story, so that results can be read against it:
//! - **Menu**: `menu_items` items (40 to 120) in five categories (breakfast,
//!   mains, sides, drinks, desserts). Each item has a latent taste vector in
//!   R^6 and a base popularity.
//! - **Sites** differ by region: each has a taste offset added to its
//!   customers' tastes and its own popularity perturbation, so data are non-IID.
//! - **Customers** have a latent taste (site offset plus personal noise), a
//!   preferred daypart (breakfast 7-10h, lunch 11-14h, dinner 18-21h, late
//!   22-23h), 3 to 6 habitual items and a habit strength of 0.4 to 0.8: each
//!   item of an order is a habitual one with that probability, otherwise drawn
//!   from a softmax over taste · item + popularity + a daypart bonus
//!   (breakfast items in the morning, mains at lunch and dinner).
//! - **Orders**: 2 to 16 per customer over `days` days from 2025-01-06,
//!   1 to 4 distinct items each, quantity 1 (80%) or 2.
//! - **Consent**: each customer consents with probability `consent_rate` (85%).
//! - **Sensitive columns** (optional): `age_band` and `gender`, drawn
//!   independently of tastes, for local fairness audits only.
//! - **Planted bias** (optional, [`PlantedBias`]): one age band is a
//!   minority (`share` of customers) whose tastes run against everyone
//!   else's (they prefer what others avoid) and whose data are sparse (2 or 3
//!   orders, weaker habits). A model trained on the whole franchise then
//!   serves that group worse, and a fairness audit should say so.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};
use time::{Duration, OffsetDateTime, UtcOffset, macros::datetime};

use crate::ids::SiteId;
use crate::model::{Menu, MenuItem};

const TASTE_DIMS: usize = 6;
const CATEGORIES: [(&str, &[&str]); 5] = [
    (
        "breakfast",
        &[
            "Pancakes",
            "Omelette",
            "Porridge",
            "Croissant",
            "Bagel",
            "Granola",
            "Waffles",
            "Eggs Benedict",
        ],
    ),
    (
        "mains",
        &[
            "Burger",
            "Chicken Wrap",
            "Veggie Bowl",
            "Fish Tacos",
            "Steak Sandwich",
            "Pasta",
            "Curry",
            "Salad",
            "Pizza",
            "Ramen",
            "Falafel Plate",
            "BBQ Ribs",
        ],
    ),
    (
        "sides",
        &[
            "Fries",
            "Onion Rings",
            "Coleslaw",
            "Side Salad",
            "Garlic Bread",
            "Sweet Potato Fries",
            "Corn Cob",
        ],
    ),
    (
        "drinks",
        &[
            "Cola",
            "Lemonade",
            "Iced Tea",
            "Coffee",
            "Latte",
            "Orange Juice",
            "Milkshake",
            "Sparkling Water",
        ],
    ),
    (
        "desserts",
        &[
            "Brownie",
            "Cheesecake",
            "Ice Cream",
            "Apple Pie",
            "Cookie",
            "Fruit Cup",
        ],
    ),
];
const STYLES: [&str; 6] = ["", "Classic ", "Spicy ", "Deluxe ", "Mini ", "Smoky "];
const AGE_BANDS: [&str; 5] = ["18-24", "25-34", "35-49", "50-64", "65+"];
const GENDERS: [(&str, f64); 3] = [("female", 0.49), ("male", 0.49), ("other", 0.02)];

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Seed: the same settings and seed give the same franchise.
    pub seed: u64,
    /// Number of sites.
    pub sites: usize,
    /// Customers per site.
    pub customers_per_site: usize,
    /// Menu size, clamped to 40..=120.
    pub menu_items: usize,
    /// Days of history.
    pub days: u32,
    /// Probability that a customer consents to training.
    pub consent_rate: f64,
    /// Whether to emit `age_band` and `gender` columns.
    pub sensitive_columns: bool,
    /// Make one age band's tastes differ and its data sparse; `None`: no bias.
    pub planted_bias: Option<PlantedBias>,
}

/// A minority group with different tastes and sparse data, planted on purpose.
#[derive(Debug, Clone, PartialEq)]
pub struct PlantedBias {
    /// The age band of the minority, e.g. `65+`.
    pub age_band: String,
    /// The share of customers in it.
    pub share: f64,
}

impl PlantedBias {
    /// The group the examples use: the 65+ age band, 10% of customers.
    pub fn default_group() -> Self {
        Self {
            age_band: "65+".into(),
            share: 0.1,
        }
    }
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            sites: 5,
            customers_per_site: 100,
            menu_items: 120,
            days: 180,
            consent_rate: 0.85,
            sensitive_columns: true,
            planted_bias: None,
        }
    }
}

/// One row of an orders file, in the import format.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRow {
    /// The site's customer identifier.
    pub customer_id: String,
    /// The order identifier.
    pub order_id: String,
    /// RFC 3339 timestamp in the site's local offset.
    pub timestamp: String,
    /// Menu item.
    pub item_id: String,
    /// Quantity, at least 1.
    pub quantity: u32,
    /// Whether the customer consents to training.
    pub consent: bool,
    /// Optional audit-only attribute.
    pub age_band: Option<String>,
    /// Optional audit-only attribute.
    pub gender: Option<String>,
}

/// One site's generated data.
#[derive(Debug, Clone)]
pub struct SiteData {
    /// The site.
    pub site: SiteId,
    /// Its order rows, in time order.
    pub rows: Vec<OrderRow>,
}

/// A whole generated franchise.
#[derive(Debug, Clone)]
pub struct Franchise {
    /// The menu.
    pub menu: Menu,
    /// The sites.
    pub sites: Vec<SiteData>,
}

struct Item {
    taste: [f64; TASTE_DIMS],
    popularity: f64,
    category: usize,
}

/// Generate a franchise.
pub fn generate(config: &SynthConfig) -> Franchise {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let (menu, items) = make_menu(config.menu_items.clamp(40, 120), &mut rng);
    let sites = (0..config.sites)
        .map(|s| {
            let seed = rng.random::<u64>();
            make_site(config, s, &menu, &items, &mut StdRng::seed_from_u64(seed))
        })
        .collect();
    Franchise { menu, sites }
}

fn make_menu(n: usize, rng: &mut StdRng) -> (Menu, Vec<Item>) {
    let normal = Normal::new(0.0, 1.0).expect("valid normal");
    let mut menu = Vec::with_capacity(n);
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        let category = i % CATEGORIES.len();
        let (cat_name, names) = CATEGORIES[category];
        let k = i / CATEGORIES.len();
        let name = format!(
            "{}{}",
            STYLES[(k / names.len()) % STYLES.len()],
            names[k % names.len()]
        );
        menu.push(MenuItem {
            item_id: format!("{}-{:03}", &cat_name[..3], i),
            name,
            category: cat_name.to_string(),
        });
        items.push(Item {
            taste: std::array::from_fn(|_| normal.sample(rng)),
            popularity: normal.sample(rng) * 0.7,
            category,
        });
    }
    (Menu::new(menu).expect("generated ids are unique"), items)
}

fn daypart_bonus(category: usize, hour: u8) -> f64 {
    let morning = hour < 11;
    match (CATEGORIES[category].0, morning) {
        ("breakfast", true) => 2.5,
        ("breakfast", false) => -2.5,
        ("mains", false) => 1.0,
        ("mains", true) => -1.0,
        ("desserts", false) if hour >= 18 => 0.8,
        _ => 0.0,
    }
}

fn make_site(
    config: &SynthConfig,
    s: usize,
    menu: &Menu,
    items: &[Item],
    rng: &mut StdRng,
) -> SiteData {
    let site = SiteId::new(format!("site-{:02}", s + 1)).expect("valid generated site id");
    let offset = UtcOffset::from_hms((s % 3) as i8, 0, 0).expect("small offsets are valid");
    let normal = Normal::new(0.0, 1.0).expect("valid normal");
    let region: [f64; TASTE_DIMS] = std::array::from_fn(|_| normal.sample(rng) * 0.9);
    let local_pop: Vec<f64> = items
        .iter()
        .map(|it| it.popularity + normal.sample(rng) * 0.5)
        .collect();
    let start = datetime!(2025-01-06 00:00 UTC).to_offset(offset);
    let mut rows = Vec::new();
    let mut order_no = 0u64;
    for c in 0..config.customers_per_site {
        // Drawn only with a planted bias, so unbiased franchises stay as they were.
        let minority = config
            .planted_bias
            .as_ref()
            .is_some_and(|b| rng.random_bool(b.share.clamp(0.0, 1.0)));
        let taste: [f64; TASTE_DIMS] = std::array::from_fn(|d| region[d] + normal.sample(rng));
        let scores: Vec<f64> = items
            .iter()
            .zip(&local_pop)
            .map(|(it, pop)| {
                let score = dot(&taste, &it.taste) * 0.6 + pop;
                if minority { -score } else { score }
            })
            .collect();
        let habits: Vec<usize> = (0..rng.random_range(3..=6))
            .map(|_| softmax_pick(&scores, rng))
            .collect();
        let habit_strength = rng.random_range(0.4..0.8) * if minority { 0.25 } else { 1.0 };
        let daypart = rng.random_range(0..4usize);
        let consent = rng.random_bool(config.consent_rate);
        let age_band = match &config.planted_bias {
            Some(bias) if minority => bias.age_band.as_str(),
            Some(bias) => {
                let others: Vec<&str> = AGE_BANDS
                    .iter()
                    .copied()
                    .filter(|b| *b != bias.age_band)
                    .collect();
                others[rng.random_range(0..others.len())]
            }
            None => AGE_BANDS[rng.random_range(0..AGE_BANDS.len())],
        };
        let gender = pick_weighted(&GENDERS, rng);
        let customer_id = format!("{}-c{:05}", site, c + 1);
        let most = if minority { 0.0 } else { 15.0 };
        let n_orders = 2 + (rng.random::<f64>().powi(2) * most) as usize;
        let mut times: Vec<OffsetDateTime> = (0..n_orders)
            .map(|_| {
                let day = rng.random_range(0..config.days.max(1));
                let hour = order_hour(daypart, rng);
                start
                    + Duration::days(i64::from(day))
                    + Duration::hours(i64::from(hour))
                    + Duration::minutes(rng.random_range(0..60))
            })
            .collect();
        times.sort();
        for at in times {
            order_no += 1;
            let hour = at.hour();
            let adjusted: Vec<f64> = scores
                .iter()
                .zip(items)
                .map(|(s, it)| s + daypart_bonus(it.category, hour))
                .collect();
            let mut chosen: Vec<usize> = Vec::new();
            let size = rng.random_range(1..=4);
            for _ in 0..size * 3 {
                if chosen.len() >= size {
                    break;
                }
                let pick = if rng.random_bool(habit_strength) {
                    habits[rng.random_range(0..habits.len())]
                } else {
                    softmax_pick(&adjusted, rng)
                };
                if !chosen.contains(&pick) {
                    chosen.push(pick);
                }
            }
            for &i in &chosen {
                rows.push(OrderRow {
                    customer_id: customer_id.clone(),
                    order_id: format!("{}-o{:07}", site, order_no),
                    timestamp: at
                        .format(&time::format_description::well_known::Rfc3339)
                        .expect("valid timestamps format"),
                    item_id: menu.items()[i].item_id.clone(),
                    quantity: if rng.random_bool(0.8) { 1 } else { 2 },
                    consent,
                    age_band: config.sensitive_columns.then(|| age_band.to_string()),
                    gender: config.sensitive_columns.then(|| gender.to_string()),
                });
            }
        }
    }
    SiteData { site, rows }
}

fn order_hour(daypart: usize, rng: &mut StdRng) -> u8 {
    // A customer mostly keeps to their daypart, sometimes not.
    let part = if rng.random_bool(0.75) {
        daypart
    } else {
        rng.random_range(0..4)
    };
    match part {
        0 => rng.random_range(7..=10),
        1 => rng.random_range(11..=14),
        2 => rng.random_range(18..=21),
        _ => rng.random_range(22..=23),
    }
}

fn dot(a: &[f64; TASTE_DIMS], b: &[f64; TASTE_DIMS]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax_pick(scores: &[f64], rng: &mut StdRng) -> usize {
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i;
        }
        r -= w;
    }
    scores.len() - 1
}

fn pick_weighted<'a>(options: &[(&'a str, f64)], rng: &mut StdRng) -> &'a str {
    let mut r = rng.random::<f64>();
    for (name, p) in options {
        if r < *p {
            return name;
        }
        r -= p;
    }
    options[options.len() - 1].0
}

/// Write rows as an orders CSV (the import format), with sensitive columns when present.
pub fn write_orders_csv(rows: &[OrderRow], out: impl std::io::Write) -> std::io::Result<()> {
    let sensitive = rows.first().is_some_and(|r| r.age_band.is_some());
    let mut w = csv::Writer::from_writer(out);
    let mut header = vec![
        "customer_id",
        "order_id",
        "timestamp",
        "item_id",
        "quantity",
        "consent",
    ];
    if sensitive {
        header.extend(["age_band", "gender"]);
    }
    w.write_record(&header)?;
    for r in rows {
        let mut record = vec![
            r.customer_id.clone(),
            r.order_id.clone(),
            r.timestamp.clone(),
            r.item_id.clone(),
            r.quantity.to_string(),
            r.consent.to_string(),
        ];
        if sensitive {
            record.push(r.age_band.clone().unwrap_or_default());
            record.push(r.gender.clone().unwrap_or_default());
        }
        w.write_record(&record)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SynthConfig {
        SynthConfig {
            sites: 3,
            customers_per_site: 40,
            ..SynthConfig::default()
        }
    }

    #[test]
    fn deterministic_by_seed() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.menu, b.menu);
        assert_eq!(a.sites[2].rows, b.sites[2].rows);
        let c = generate(&SynthConfig { seed: 8, ..small() });
        assert_ne!(a.sites[0].rows, c.sites[0].rows);
    }

    #[test]
    fn shape_of_the_franchise() {
        let f = generate(&small());
        assert_eq!(f.menu.len(), SynthConfig::default().menu_items);
        assert_eq!(
            generate(&SynthConfig {
                menu_items: 3,
                ..small()
            })
            .menu
            .len(),
            40
        );
        assert_eq!(
            generate(&SynthConfig {
                menu_items: 500,
                ..small()
            })
            .menu
            .len(),
            120
        );
        let categories: std::collections::BTreeSet<_> =
            f.menu.items().iter().map(|i| i.category.as_str()).collect();
        assert_eq!(categories.len(), 5);
        let rows = &f.sites[0].rows;
        let customers: std::collections::BTreeSet<_> =
            rows.iter().map(|r| &r.customer_id).collect();
        assert_eq!(customers.len(), 40);
        let consenting = rows
            .iter()
            .filter(|r| r.consent)
            .map(|r| &r.customer_id)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert!(
            (25..=40).contains(&consenting),
            "about 85% consent: {consenting}/40"
        );
        assert!(rows.iter().all(|r| r.quantity >= 1 && r.age_band.is_some()));
    }

    #[test]
    fn sites_differ_in_taste() {
        let f = generate(&SynthConfig {
            sites: 2,
            customers_per_site: 150,
            ..SynthConfig::default()
        });
        fn freq(rows: &[OrderRow]) -> std::collections::HashMap<&str, f64> {
            let mut m = std::collections::HashMap::new();
            for r in rows {
                *m.entry(r.item_id.as_str()).or_default() += 1.0 / rows.len() as f64;
            }
            m
        }
        let (a, b) = (freq(&f.sites[0].rows), freq(&f.sites[1].rows));
        let tv: f64 = f
            .menu
            .items()
            .iter()
            .map(|i| {
                (a.get(i.item_id.as_str()).unwrap_or(&0.0)
                    - b.get(i.item_id.as_str()).unwrap_or(&0.0))
                .abs()
            })
            .sum::<f64>()
            / 2.0;
        assert!(
            tv > 0.15,
            "sites' item distributions differ (total variation {tv})"
        );
    }
}
