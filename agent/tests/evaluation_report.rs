//! What of a model's evaluation leaves a site.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use potluck_agent::client::site_data;
use potluck_agent::config::PrivacyLimits;
use potluck_agent::evaluation::{evaluate, report};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_shared::ModelVersion;
use potluck_shared::model::{GlobalModel, Menu, ModelSpec};
use potluck_shared::synth::{self, SynthConfig};
use potluck_shared::wire::EvalCounts;

/// Attack: the coordinator sends a model whose menu is one item. Evaluated
/// on the site's customers, its counts are exact counts of the customers
/// whose last order holds that item; by default none of it is sent.
#[test]
fn a_menu_of_one_model_learns_nothing_from_a_sites_evaluation_report() {
    let data = synth::generate(&SynthConfig {
        sites: 1,
        customers_per_site: 60,
        ..SynthConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    synth::write_orders_csv(&data.sites[0].rows, std::fs::File::create(&csv).unwrap()).unwrap();
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    import_file(&store, &csv, &data.menu, &ImportOptions::default()).unwrap();

    // The item most ordered: most customers have it in two orders or more.
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for row in &data.sites[0].rows {
        *counts.entry(row.item_id.as_str()).or_default() += 1;
    }
    let (top, _) = counts.iter().max_by_key(|(_, n)| **n).unwrap();
    let item = data
        .menu
        .items()
        .iter()
        .find(|i| i.item_id == *top)
        .unwrap();
    let one = Menu::new(vec![item.clone()]).unwrap();
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
