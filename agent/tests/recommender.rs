//! The recommender against the baseline it must beat: it starts as
//! GP-TopFreq, keeps a habit first through training, sees the same inputs in
//! training, evaluation and at the till, and never learns from held-out orders;
//! and its evaluation, by default, tells the coordinator nothing.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use potluck_agent::client::site_data;
use potluck_agent::config::PrivacyLimits;
use potluck_agent::dataset::SiteData;
use potluck_agent::evaluation::{
    K, evaluate, gp_topfreq, popularity_ranking, report, score, top_k,
};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::recommend::{Request, recommend};
use potluck_agent::store::{CustomerHistory, SiteStore};
use potluck_agent::training::train_site;
use potluck_shared::ModelVersion;
use potluck_shared::model::{
    Context, Example, GlobalModel, Menu, MenuItem, ModelDims, ModelSpec, OrderRecord, TrainScope,
};
use potluck_shared::synth::{self, SynthConfig};
use potluck_shared::wire::{EvalCounts, TrainSettings};

fn small_dims() -> ModelDims {
    ModelDims {
        embedding: 8,
        context: 2,
        hidden: 8,
    }
}

fn model(menu: &Menu) -> GlobalModel {
    let mut spec = ModelSpec::new(menu.clone());
    spec.dims = small_dims();
    GlobalModel {
        version: ModelVersion(0),
        params: spec.initial_params(3),
        spec,
    }
}

/// A synthetic site imported into a store.
fn synthetic_site(customers: usize) -> (tempfile::TempDir, SiteStore, Menu) {
    let data = synth::generate(&SynthConfig {
        sites: 1,
        customers_per_site: customers,
        ..SynthConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    synth::write_orders_csv(&data.sites[0].rows, std::fs::File::create(&csv).unwrap()).unwrap();
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    import_file(&store, &csv, &data.menu, &ImportOptions::default()).unwrap();
    (dir, store, data.menu)
}

fn top(model: &GlobalModel, examples: &[&Example]) -> Vec<Vec<u32>> {
    score(&model.spec, &model.params, examples)
        .unwrap()
        .iter()
        .map(|s| top_k(s, K))
        .collect()
}

#[test]
fn the_untrained_model_ranks_exactly_like_gp_topfreq() {
    let (_dir, store, menu) = synthetic_site(150);
    let model = model(&menu);
    let data = site_data(&store, &model).unwrap();
    assert!(data.eval.len() > 100, "{} held-out cases", data.eval.len());
    let popular = popularity_ranking(&data.popularity);
    let examples: Vec<&Example> = data.eval.iter().map(|c| &c.example).collect();
    for (case, ranked) in data.eval.iter().zip(top(&model, &examples)) {
        assert_eq!(ranked, gp_topfreq(&case.topfreq, &popular), "{case:?}");
    }
}

fn menu(n: usize) -> Menu {
    Menu::new(
        (0..n)
            .map(|i| MenuItem {
                item_id: format!("i{i}"),
                name: format!("Item {i}"),
                category: "mains".into(),
            })
            .collect(),
    )
    .unwrap()
}

fn order(day: i64, items: &[u32]) -> OrderRecord {
    OrderRecord::new(day * 86_400 + 12 * 3600, 0, items.to_vec())
}

#[test]
fn a_habit_stays_first_before_and_after_training_on_a_franchise_that_never_orders_it() {
    // Item 0 is this customer's habit (6 of 7 orders); nobody else orders it.
    // 200 customers of habit too: each has a usual item among 1 to 5, in
    // most orders, beside one of items 1 to 11.
    let menu = menu(12);
    let habit: Vec<OrderRecord> = (0..7)
        .map(|d| order(d, if d == 3 { &[5] } else { &[0] }))
        .collect();
    let mut histories: Vec<CustomerHistory> = (0..200)
        .map(|c| CustomerHistory {
            pseudonym: format!("c{c}"),
            orders: (0..6)
                .map(|d| {
                    let k = (c * 7 + d as usize * 3) as u32;
                    let usual = 1 + (c % 5) as u32;
                    let other = 1 + (k / 5) % 11;
                    if d % 3 == 2 {
                        order(d, &[other])
                    } else {
                        order(d, &[usual, other])
                    }
                })
                .collect(),
            attributes: Default::default(),
        })
        .collect();
    histories.push(CustomerHistory {
        pseudonym: "habit".into(),
        orders: habit.clone(),
        attributes: Default::default(),
    });
    let data = SiteData::prepare(&histories, menu.len(), 0.8);
    let mut trained = model(&menu);
    let settings = TrainSettings {
        epochs: 5,
        learning_rate: 0.3,
        scope: TrainScope::All,
        ..TrainSettings::default()
    };
    let before = model(&menu);
    let delta = train_site(&trained, &data, &settings, 1).unwrap().delta;
    trained
        .params
        .iter_mut()
        .zip(&delta)
        .for_each(|(p, d)| *p += d);
    assert_ne!(trained.params, before.params, "training moved the model");
    let next = Example::new(&habit, order(8, &[]).context(), 0.8, vec![])
        .with_prior(&data.eval.last().unwrap().example.prior);
    for model in [&before, &trained] {
        assert_eq!(top(model, &[&next])[0][0], 0, "the habit comes first");
    }
}

#[test]
fn training_evaluation_and_the_till_see_the_same_inputs() {
    // Sites east and west of UTC: the local hour and weekday decide the inputs.
    for offset in ["+05:30", "-08:00"] {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("orders.csv");
        let rows = [
            ("2025-01-06T23:30:00", "i0"),
            ("2025-01-08T07:10:00", "i1"),
            ("2025-01-08T07:10:00", "i0"),
            ("2025-01-10T19:45:00", "i2"),
            ("2025-01-12T00:20:00", "i0"),
        ];
        let mut text = String::from("customer_id,order_id,timestamp,item_id,quantity,consent\n");
        for (k, (time, item)) in rows.iter().enumerate() {
            let order = if k == 2 { 1 } else { k };
            text.push_str(&format!("alice,o{order},{time}{offset},{item},1,true\n"));
        }
        std::fs::write(&csv, text).unwrap();
        let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
        let menu = menu(4);
        import_file(&store, &csv, &menu, &ImportOptions::default()).unwrap();
        let model = model(&menu);
        store.save_model(&model).unwrap();

        // Evaluation: the held-out last order, predicted from the ones before.
        let data = site_data(&store, &model).unwrap();
        let held_out = &data.eval[0].example;
        // Training: the same customer's examples come from the same pipeline.
        let customer = store.customer("alice", &menu).unwrap().unwrap();
        let orders = &customer.history.orders;
        let last = orders.last().unwrap();
        let rebuilt = Example::new(
            &orders[..orders.len() - 1],
            last.context(),
            0.8,
            last.items.clone(),
        );
        assert_eq!(rebuilt.repeat, held_out.repeat);
        assert_eq!(
            (rebuilt.weekday, rebuilt.hour),
            (held_out.weekday, held_out.hour)
        );
        assert_eq!(
            data.train.last().unwrap().repeat,
            Example::new(&orders[..2], orders[2].context(), 0.8, vec![]).repeat
        );
        // The till, asked at the held-out order's time, scores the same example
        // (with every order known): its ranking is the model's for that input.
        let at = time::OffsetDateTime::from_unix_timestamp(last.time).unwrap();
        let served = recommend(
            &store,
            None,
            &Request {
                customer: "alice",
                k: 4,
                at: Some(at),
            },
        )
        .unwrap();
        let expected = Example::new(
            orders,
            Context::at(last.time, customer.utc_offset),
            0.8,
            vec![],
        )
        .with_prior(&held_out.prior);
        assert_eq!((expected.weekday, expected.hour), (last.weekday, last.hour));
        let ranked: Vec<String> = top(&model, &[&expected])[0]
            .iter()
            .take(4)
            .map(|&i| menu.items()[i as usize].item_id.clone())
            .collect();
        let got: Vec<String> = served.items.iter().map(|i| i.item_id.clone()).collect();
        assert_eq!(got, ranked, "offset {offset}");
    }
}

#[test]
fn a_customers_last_order_never_reaches_training_or_popularity() {
    let menu = menu(6);
    // Item 5 appears only in held-out last orders.
    let histories: Vec<CustomerHistory> = (0..20)
        .map(|c| CustomerHistory {
            pseudonym: format!("c{c}"),
            orders: vec![order(0, &[1]), order(1, &[2, 3]), order(2, &[5])],
            attributes: Default::default(),
        })
        .collect();
    let data = SiteData::prepare(&histories, menu.len(), 0.8);
    assert_eq!(data.eval.len(), 20);
    assert!(data.eval.iter().all(|c| c.example.target == vec![5]));
    assert!(
        data.train
            .iter()
            .all(|e| !e.target.contains(&5) && !e.has_ordered(5))
    );
    assert_eq!(data.popularity[5], 0, "held-out items are not counted");
    assert_eq!(data.customer_popularity[5], 0.0);
    let m = menu.len();
    for i in 0..m {
        assert_eq!(data.customer_pairs[i * m + 5], 0.0, "nor neighbour pairs");
    }
    // Each customer had items 1, 2 and 3 in training: six pairs, each 1/√6.
    let one_with_two = data.customer_pairs[m + 2];
    assert!(
        (one_with_two - 20.0 / 6f64.sqrt()).abs() < 1e-9,
        "items 1 and 2 by the same customers: {one_with_two}"
    );
    assert_eq!(data.popularity[1], 20);
    // The prior the model sees ranks item 5 with the never-ordered items.
    let prior = &data.train[0].prior.log_share;
    assert_eq!(prior[5], prior[0]);
    assert!(prior[1] > prior[5]);
}

/// Attack: the coordinator sends a model whose menu is one item. Evaluated
/// on the site's customers, its counts are exact counts of the customers
/// whose last order holds that item; by default none of it is sent.
#[test]
fn a_menu_of_one_model_learns_nothing_from_a_sites_evaluation_report() {
    let (_dir, store, menu) = synthetic_site(60);
    // The item most ordered: most customers have it in two orders or more.
    let popularity = site_data(&store, &model(&menu)).unwrap().popularity;
    let top = (0..popularity.len())
        .max_by_key(|&i| popularity[i])
        .unwrap();
    let one = Menu::new(vec![menu.items()[top].clone()]).unwrap();
    let spec = ModelSpec::new(one);
    let crafted = GlobalModel {
        version: ModelVersion(7),
        params: spec.initial_params(1),
        spec,
    };
    let site = site_data(&store, &crafted).unwrap();
    let counts = evaluate(&crafted.spec, &crafted.params, &site).unwrap();
    assert!(
        counts.cases > 0 && counts.model.hits > 0.0,
        "the oracle exists: {counts:?}"
    );
    assert_eq!(
        counts.model.hits, counts.cases as f64,
        "every case is a hit on a menu of one"
    );

    let defaults = PrivacyLimits::default();
    assert_eq!(
        report(counts, defaults.dangerous_plain_evaluation),
        EvalCounts::default(),
        "a site sends an empty report unless it opted in"
    );
    assert_eq!(report(counts, true), counts);
}
