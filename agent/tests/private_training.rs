//! Customer-level contributions: sampling, one small model delta per customer,
//! each clipped and rounded within the round's bound.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use potluck_agent::client::site_data;
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_agent::training::private_contribution;
use potluck_shared::ModelVersion;
use potluck_shared::dp::{PrivacyUnit, RoundPrivacy};
use potluck_shared::model::{GlobalModel, ModelDims, ModelSpec};
use potluck_shared::synth::{self, SynthConfig};
use potluck_shared::wire::TrainSettings;
use rand::SeedableRng;
use rand::rngs::StdRng;

struct Site {
    _dir: tempfile::TempDir,
    store: SiteStore,
    model: GlobalModel,
}

fn site(customers: usize) -> Site {
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
    let mut spec = ModelSpec::new(data.menu.clone());
    spec.dims = ModelDims {
        embedding: 8,
        context: 2,
        hidden: 8,
    };
    let model = GlobalModel {
        version: ModelVersion(0),
        params: spec.initial_params(1),
        spec,
    };
    Site {
        _dir: dir,
        store,
        model,
    }
}

fn privacy(unit: PrivacyUnit, q: f64, params: usize) -> RoundPrivacy {
    RoundPrivacy::plan("test", unit, q, 1.0, 0.5, 1e-6, params + 2, 3, 3, 32)
        .unwrap()
        .0
}

fn norm(v: &[i64]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn customers_are_sampled_at_the_rounds_rate_and_counted() {
    let s = site(200);
    let data = site_data(&s.store, &s.model).unwrap();
    let eligible = data.customers.iter().filter(|r| !r.is_empty()).count();
    let q = 0.3;
    let p = privacy(PrivacyUnit::Customer, q, s.model.params.len());
    let mut rng = StdRng::seed_from_u64(5);
    let c = private_contribution(&s.model, &data, &TrainSettings::default(), &p, &mut rng).unwrap();
    let expected = q * eligible as f64;
    let sd = (eligible as f64 * q * (1.0 - q)).sqrt();
    let units = c.units() as f64;
    assert!(
        (units - expected).abs() < 5.0 * sd,
        "{units} sampled of {eligible}"
    );
    // The count coordinate (before the unclipped flag) carries C/4 per
    // customer, in integer units.
    let raw = c.raw();
    let count = raw[raw.len() - 2] as f64 / (f64::from(p.count_weight()) * p.scale);
    let unclipped = raw[raw.len() - 1] as f64 / (f64::from(p.count_weight()) * p.scale);
    assert!(unclipped <= count + 1.0, "unclipped {unclipped} of {count}");
    assert!(
        (count - units).abs() <= 0.01 * units + 1.0,
        "count {count}, units {units}"
    );
    // Each customer moves the sum by at most Δ, so the sum is within units·Δ.
    assert!(norm(c.raw()) <= units * p.rounded_bound);
}

#[test]
fn the_site_unit_is_one_clipped_contribution() {
    let s = site(40);
    let data = site_data(&s.store, &s.model).unwrap();
    let p = privacy(PrivacyUnit::Site, 0.3, s.model.params.len());
    let mut rng = StdRng::seed_from_u64(6);
    let c = private_contribution(&s.model, &data, &TrainSettings::default(), &p, &mut rng).unwrap();
    assert_eq!(c.units(), 1);
    assert!(norm(c.raw()) <= p.rounded_bound);
    assert!(
        norm(c.raw()) > 0.5 * p.rounded_bound,
        "the site's delta is clipped, not lost"
    );
}
