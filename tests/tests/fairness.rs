//! Fairness audits with the agent's real data path: sites with stores holding
//! audit-only attributes, the real evaluation, the sans-IO coordinator and
//! sessions, every message a site sends encoded as it would be on the wire.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use potluck_agent::client::site_data;
use potluck_agent::dataset::SiteData;
use potluck_agent::evaluation::{self, K, rank_metrics, top_k};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_agent::training::train_site;
use potluck_shared::fairness::{FairnessReport, Gate};
use potluck_shared::model::{Example, GlobalModel, Menu, ModelSpec};
use potluck_shared::round::{
    AuditOutcome, AuditPolicy, Coordinator, CoordinatorEvent, RoundConfig, SecAggIdentity,
    SiteEvent, SiteSession,
};
use potluck_shared::secagg::{PeerVerifier, SiteSigner};
use potluck_shared::synth::{self, PlantedBias, SynthConfig};
use potluck_shared::tls::{self, Validity};
use potluck_shared::wire::{CoordinatorMessage, PROTOCOL_VERSION, codec};
use potluck_shared::{ModelVersion, RoundId, SiteId};
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};
use rand::SeedableRng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const SITES: usize = 3;
const AGE_BANDS: [&str; 5] = ["18-24", "25-34", "35-49", "50-64", "65+"];

/// A value no encoded number is likely to spell by chance.
fn canary(value: &str) -> String {
    format!("canary-{value}-7f3a9c")
}

struct Site {
    id: SiteId,
    cert: Vec<u8>,
    session: SiteSession,
    store: SiteStore,
    _dir: tempfile::TempDir,
}

/// Three sites of a franchise with a planted bias, their attributes
/// disguised as canaries, imported into real stores with audit-only columns.
fn sites(ca: &tls::Credentials, verifier: &PeerVerifier) -> (Vec<Site>, Menu) {
    let data = synth::generate(&SynthConfig {
        sites: SITES,
        customers_per_site: 300,
        planted_bias: Some(PlantedBias::default_group()),
        ..SynthConfig::default()
    });
    let sites = data
        .sites
        .iter()
        .map(|site| {
            let dir = tempfile::tempdir().unwrap();
            let rows: Vec<_> = site
                .rows
                .iter()
                .cloned()
                .map(|mut r| {
                    r.age_band = r.age_band.map(|v| canary(&v));
                    r.gender = r.gender.map(|v| canary(&v));
                    r
                })
                .collect();
            let orders = dir.path().join("orders.csv");
            synth::write_orders_csv(&rows, std::fs::File::create(&orders).unwrap()).unwrap();
            let store = SiteStore::open(&dir.path().join("store")).unwrap();
            let options = ImportOptions {
                audit_columns: vec!["age_band".into(), "gender".into()],
                ..ImportOptions::default()
            };
            import_file(&store, &orders, &data.menu, &options).unwrap();
            let creds = tls::issue_site_cert(ca, &site.site, Validity::days_from_now(1)).unwrap();
            let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).unwrap();
            let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
            let identity = SecAggIdentity {
                signer: Arc::new(SiteSigner::new(&cert, &key).unwrap()),
                verifier: verifier.clone(),
                floor: Default::default(),
                pins: Default::default(),
            };
            Site {
                id: site.site.clone(),
                cert: cert.to_vec(),
                session: SiteSession::new("test", Some(identity)),
                store,
                _dir: dir,
            }
        })
        .collect();
    (sites, data.menu)
}

fn audit_policy(noise_multiplier: f64) -> AuditPolicy {
    AuditPolicy {
        attributes: BTreeMap::from([
            (
                "age_band".into(),
                AGE_BANDS.iter().map(|b| canary(b)).collect(),
            ),
            (
                "gender".into(),
                ["female", "male"].iter().map(|g| canary(g)).collect(),
            ),
        ]),
        min_group_size: 20,
        noise_multiplier,
        every_rounds: 0,
        gate: Gate {
            min_hr_ratio: Some(0.8),
            ..Gate::default()
        },
        lineage: "audit".into(),
        delta: 1e-6,
    }
}

/// What a federation of one training round and its audit left behind.
struct Federated {
    audit: AuditOutcome,
    /// Every message the sites sent, encoded as on the wire.
    sent: Vec<Vec<u8>>,
    /// Each site's data and the audited model, to recompute centrally.
    data: Vec<SiteData>,
    model: GlobalModel,
    served: usize,
}

/// One training round and the audit of its model, driven in memory with the
/// agent's own training, evaluation and audit code.
fn federate(noise_multiplier: f64) -> Federated {
    let (ca, _) = tls::create_ca("Test", &[], Validity::days_from_now(1)).unwrap();
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
    let verifier = PeerVerifier::new(ca_der).unwrap();
    let (mut sites, menu) = sites(&ca, &verifier);
    let spec = ModelSpec::new(menu);
    let model = GlobalModel {
        version: ModelVersion(0),
        params: spec.initial_params(3),
        spec,
    };
    let config = RoundConfig {
        min_sites: SITES,
        max_rounds: Some(1),
        cohort_wait: Duration::ZERO,
        audit: Some(audit_policy(noise_multiplier)),
        ..RoundConfig::default()
    };
    let now = Instant::now();
    let mut coordinator = Coordinator::new(config, model, RoundId(1));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let welcome = CoordinatorMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        franchise: "t".into(),
    };
    for site in &mut sites {
        site.session.poll_transmit(); // Hello
        site.session
            .handle_message(welcome.clone(), SystemTime::now(), &mut rng)
            .unwrap();
        coordinator.handle_connected(site.id.clone(), site.cert.clone(), now);
    }
    let (mut sent, mut audits, mut served) = (Vec::new(), Vec::new(), 0);
    loop {
        let mut progressed = false;
        while let Some(event) = coordinator.poll_event() {
            if let CoordinatorEvent::AuditCompleted(outcome) = event {
                audits.push(*outcome);
            }
        }
        while let Some(t) = coordinator.poll_transmit() {
            progressed = true;
            let site = sites.iter_mut().find(|s| s.id == t.to).unwrap();
            site.session
                .handle_message((*t.message).clone(), SystemTime::now(), &mut rng)
                .unwrap();
        }
        for site in &mut sites {
            while let Some(event) = site.session.poll_event() {
                served += usize::from(matches!(event, SiteEvent::ServeModel(_)));
                act(site, event, &mut rng);
            }
            while let Some(message) = site.session.poll_transmit() {
                progressed = true;
                let bytes = codec::encode(&message).unwrap();
                coordinator
                    .handle_message(&site.id, message, bytes.len(), now)
                    .unwrap();
                sent.push(bytes);
            }
        }
        if !progressed {
            break;
        }
    }
    assert!(coordinator.is_finished());
    assert_eq!(audits.len(), 1, "the final version is audited once");
    let model = GlobalModel::clone(coordinator.model());
    let data = sites
        .iter()
        .map(|s| site_data(&s.store, &model).unwrap())
        .collect();
    Federated {
        audit: audits.remove(0),
        sent,
        data,
        model,
        served,
    }
}

/// What the agent's worker does for each event.
fn act(site: &mut Site, event: SiteEvent, rng: &mut rand::rngs::StdRng) {
    match event {
        SiteEvent::ModelReceived(m) => {
            let data = site_data(&site.store, &m).unwrap();
            let counts = evaluation::evaluate(&m.spec, &m.params, &data).unwrap();
            site.session.handle_evaluated(m.version, counts);
        }
        SiteEvent::TrainRequested { task, model } => {
            let data = site_data(&site.store, &model).unwrap();
            let trained = train_site(&model, &data, &task.settings, 1).unwrap();
            site.session
                .handle_trained(&task, trained.delta, trained.loss, trained.customers, rng);
        }
        SiteEvent::AuditRequested { task, model } => {
            let data = site_data(&site.store, &model).unwrap();
            let (spec, privacy) = (task.audit.as_ref().unwrap(), task.privacy.as_ref().unwrap());
            let contribution =
                evaluation::audit(&model.spec, &model.params, &data, spec, privacy, rng).unwrap();
            site.session.handle_contribution(&task, contribution, rng);
        }
        _ => {}
    }
}

/// Customers and HR@10 per age band, computed centrally from every site's held-out cases.
fn central(f: &Federated) -> BTreeMap<String, (f64, f64)> {
    let mut groups: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for data in &f.data {
        let examples: Vec<&Example> = data.eval.iter().map(|c| &c.example).collect();
        let scores = evaluation::score(&f.model.spec, &f.model.params, &examples).unwrap();
        for (case, scores) in data.eval.iter().zip(&scores) {
            let (hit, _) = rank_metrics(&top_k(scores, K), &case.example.target);
            let entry = groups
                .entry(case.attributes["age_band"].clone())
                .or_default();
            entry.0 += 1.0;
            entry.1 += hit;
        }
    }
    groups
        .into_iter()
        .map(|(group, (n, hits))| (group, (n, hits / n)))
        .collect()
}

fn age_groups(report: &FairnessReport) -> &[potluck_shared::fairness::GroupFigures] {
    let age = report
        .attributes
        .iter()
        .find(|a| a.attribute == "age_band")
        .unwrap();
    &age.groups
}

#[test]
fn audited_figures_equal_central_ones_and_no_attribute_leaves_a_site() {
    // Almost no noise: what secure aggregation sums is what a central audit computes.
    let f = federate(1e-6);
    let central = central(&f);
    let report = &f.audit.report;
    assert_eq!(report.model_version, f.model.version.0);
    assert_eq!(report.sites, SITES);
    for figures in age_groups(report) {
        let Some(&(n, hr)) = central.get(&figures.group) else {
            assert!(figures.suppressed(), "{} has nobody", figures.group);
            continue;
        };
        let customers = figures.customers.unwrap();
        assert!(
            (customers - n).abs() < 0.5,
            "{}: {customers} vs {n}",
            figures.group
        );
        let audited = figures.hr.unwrap().value;
        assert!(
            (audited - hr).abs() < 0.005,
            "{}: {audited} vs {hr}",
            figures.group
        );
    }
    // The planted minority is served worst, and the gate holds the model.
    let age = report
        .attributes
        .iter()
        .find(|a| a.attribute == "age_band")
        .unwrap();
    assert_eq!(age.worst.as_deref(), Some(canary("65+").as_str()));
    assert!(!f.audit.failures.is_empty());
    assert_eq!(f.served, 0, "no site was told to serve a held model");

    // Nothing a site sent names an attribute, a value, or a customer.
    let needles: Vec<Vec<u8>> = ["canary-", "age_band", "gender", "-c0"]
        .iter()
        .map(|n| n.as_bytes().to_vec())
        .collect();
    assert!(f.sent.len() > 20, "{} messages", f.sent.len());
    for (i, bytes) in f.sent.iter().enumerate() {
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "message {i} contains {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

#[test]
fn audited_figures_carry_the_noise_the_report_states() {
    let f = federate(3.0);
    let central = central(&f);
    let report = &f.audit.report;
    let sd = report.noise_std;
    assert!(sd > 5.0, "z = 3 on a per-customer bound of 2·√2: σ {sd}");
    // Suppression follows the noise: a group needs ten σ of customers.
    assert!(report.min_group_size as f64 >= 10.0 * sd);
    let mut differs = false;
    for figures in age_groups(report) {
        let (Some(customers), Some(&(n, hr))) = (figures.customers, central.get(&figures.group))
        else {
            continue;
        };
        assert!(
            (customers - n).abs() < 5.0 * sd,
            "{}: {customers} vs {n}",
            figures.group
        );
        // The noise on a mean of noisy sums (delta method); four σ either way.
        let sd_mean = sd * (1.0 + hr * hr).sqrt() / n;
        let audited = figures.hr.unwrap().value;
        assert!(
            (audited - hr).abs() < 4.0 * sd_mean,
            "{}: {audited} vs {hr} (σ of the mean {sd_mean})",
            figures.group
        );
        differs |= (customers - n).abs() > 1e-9;
    }
    assert!(differs, "noisy counts differ from the exact ones");
    assert!(
        f.audit.epsilon > 0.5 && f.audit.epsilon < 5.0,
        "ε {}",
        f.audit.epsilon
    );
}

/// The model site `i`'s store serves, once it is readable and has one (the
/// agent's worker keeps a released model a moment after the session ends).
async fn served(f: &Franchise, i: usize, want: Option<u64>) -> Option<u64> {
    let mut seen = None;
    for _ in 0..100 {
        if let Ok(store) = SiteStore::open(&f.store_path(i).unwrap()) {
            seen = store.model().unwrap().map(|m| m.version.0);
            if seen == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_model_reaches_sites_only_when_an_operator_releases_it() -> anyhow::Result<()> {
    init_logging();
    let synth = SynthConfig {
        sites: SITES,
        customers_per_site: 300,
        planted_bias: Some(PlantedBias::default_group()),
        ..SynthConfig::default()
    };
    // The audit shares the sites' default budget (ε 8) with training.
    let audit = "[privacy]\ntarget_epsilon = 8.0\n\
                 [audit]\nattributes = { age_band = [\"18-24\", \"25-34\", \"35-49\", \"50-64\", \"65+\"] }\n\
                 noise_multiplier = 2.0\n[audit.gate]\nmin_hr_ratio = 0.8\n";
    let f = Franchise::with_data(&synth, 2, audit, &["age_band"])?;
    f.run_all(Duration::from_secs(180)).await?;
    let state = f.state()?;
    let held = state.fairness(None)?.unwrap();
    assert_eq!(
        (held.status.as_str(), held.model_version),
        ("held", 2),
        "{:?}",
        held.failures
    );
    assert!(held.failures[0].contains("65+"), "{:?}", held.failures);
    assert_eq!(state.released_version()?, None);
    for i in 0..SITES {
        assert_eq!(
            served(&f, i, None).await,
            None,
            "site {i} serves nothing new"
        );
    }

    // An operator releases it anyway; the coordinator, restarted, hands it over.
    let reason = "reviewed by the data review board: pilot at three sites";
    f.state()?.request_release(2, "cli:test", reason)?;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let configs = (0..SITES)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    let summary = coordinator.finish(Duration::from_secs(60)).await?;
    assert_eq!(
        summary.rounds_completed, 0,
        "a finished lineage trains no more"
    );
    agents.stop().await?;
    for i in 0..SITES {
        assert_eq!(
            served(&f, i, Some(2)).await,
            Some(2),
            "site {i} serves the release"
        );
    }
    let state = f.state()?;
    assert_eq!(state.released_version()?, Some(2));
    assert_eq!(
        state.fairness_audits()?.len(),
        1,
        "a held version is not audited again"
    );
    let log: Vec<_> = state.audit_tail(20)?;
    let events: Vec<&str> = log.iter().map(|e| e.event.as_str()).collect();
    let held_at = events.iter().position(|e| *e == "model_held").unwrap();
    let released_at = events.iter().rposition(|e| *e == "model_released").unwrap();
    assert!(held_at < released_at, "{events:?}");
    assert_eq!(log[released_at].details["reason"], reason);
    assert_eq!(log[released_at].details["by"], "cli:test");
    Ok(())
}
