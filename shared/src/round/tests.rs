//! Whole federations in memory: one coordinator, N sites, virtual time, no sockets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::time::SystemTime;

use rand::SeedableRng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;
use crate::ids::{ModelVersion, RoundId, SiteId};
use crate::model::tests::small_menu;
use crate::model::{GlobalModel, ModelSpec};
use crate::wire::{CoordinatorMessage, EvalCounts, MetricSums, PROTOCOL_VERSION, SiteMessage};

/// Customers each site contributes in a private round.
const CUSTOMERS_PER_SITE: usize = 10;

/// What a simulated site does when asked to train.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Never answers round requests (a crashed trainer that keeps its connection).
    Silent,
}

/// A rewrite of a message to a site.
type Rewrite = dyn FnMut(&SiteId, &mut CoordinatorMessage);

struct Harness {
    /// Whether group "b" gets no hits in audits (a biased model).
    biased: bool,
    /// Customers behind each site's plain update (100 unless set).
    customers: BTreeMap<SiteId, usize>,
    /// The model version each site serves.
    serving: BTreeMap<SiteId, ModelVersion>,
    now: Instant,
    coordinator: Coordinator,
    sites: BTreeMap<SiteId, (SiteSession, Behaviour)>,
    events: Vec<CoordinatorEvent>,
    rng: rand::rngs::StdRng,
    ca: crate::tls::Credentials,
    verifier: crate::secagg::PeerVerifier,
    /// A dishonest coordinator's rewrite of what it sends each site.
    tamper: Option<Box<Rewrite>>,
    /// The neighbour census each site received.
    neighbours: BTreeMap<SiteId, std::sync::Arc<crate::wire::NeighbourRelease>>,
}

fn site(i: usize) -> SiteId {
    SiteId::new(format!("site-{i}")).unwrap()
}

/// Each site's raw delta is a constant vector of value `i + 1`.
fn delta_of(id: &SiteId, len: usize) -> Vec<f32> {
    let i: f32 = id.as_str().trim_start_matches("site-").parse().unwrap();
    vec![i + 1.0; len]
}

impl Harness {
    fn new(n: usize, config: RoundConfig) -> Self {
        let spec = ModelSpec::new(small_menu(4));
        let params = spec.initial_params(1);
        let model = GlobalModel {
            version: ModelVersion(0),
            spec,
            params,
        };
        let (ca, _) =
            crate::tls::create_ca("Test", &[], crate::tls::Validity::days_from_now(1)).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        let mut h = Self {
            biased: false,
            customers: BTreeMap::new(),
            serving: BTreeMap::new(),
            now: Instant::now(),
            coordinator: Coordinator::new(config, model, RoundId(1)),
            sites: BTreeMap::new(),
            events: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(9),
            verifier: crate::secagg::PeerVerifier::new(ca_der).unwrap(),
            ca,
            tamper: None,
            neighbours: BTreeMap::new(),
        };
        for i in 0..n {
            h.connect(site(i), Behaviour::Honest);
        }
        h
    }

    fn connect(&mut self, id: SiteId, behaviour: Behaviour) {
        let creds =
            crate::tls::issue_site_cert(&self.ca, &id, crate::tls::Validity::days_from_now(1))
                .unwrap();
        let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
        let identity = SecAggIdentity {
            signer: std::sync::Arc::new(crate::secagg::SiteSigner::new(&cert, &key).unwrap()),
            verifier: self.verifier.clone(),
            floor: crate::secagg::Floor::default(),
            pins: Default::default(),
        };
        let mut session = SiteSession::new("test", Some(identity));
        let hello = session.poll_transmit().unwrap();
        assert!(matches!(
            hello,
            SiteMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                ..
            }
        ));
        session
            .handle_message(welcome(), SystemTime::now(), &mut self.rng)
            .unwrap();
        self.sites.insert(id.clone(), (session, behaviour));
        self.coordinator
            .handle_connected(id, cert.to_vec(), self.now);
        self.pump();
    }

    fn disconnect(&mut self, id: &SiteId) {
        self.sites.remove(id);
        self.coordinator.handle_disconnected(id, self.now);
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self
            .coordinator
            .poll_timeout()
            .is_some_and(|t| t <= self.now)
        {
            self.coordinator.handle_timeout(self.now);
        }
        self.pump();
    }

    /// Deliver messages both ways until quiet, answering site events at once.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(e) = self.coordinator.poll_event() {
                self.events.push(e);
            }
            while let Some(t) = self.coordinator.poll_transmit() {
                progressed = true;
                let mut message = (*t.message).clone();
                if let Some(tamper) = &mut self.tamper {
                    tamper(&t.to, &mut message);
                }
                if let Some((session, _)) = self.sites.get_mut(&t.to) {
                    session
                        .handle_message(message, SystemTime::now(), &mut self.rng)
                        .unwrap();
                }
            }
            let ids: Vec<_> = self.sites.keys().cloned().collect();
            for id in ids {
                let (session, behaviour) = self.sites.get_mut(&id).unwrap();
                while let Some(event) = session.poll_event() {
                    match event {
                        SiteEvent::ModelReceived(m) => {
                            let counts = EvalCounts {
                                cases: 10,
                                model: MetricSums {
                                    hits: 5.0,
                                    ndcg: 2.5,
                                    ..Default::default()
                                },
                                ..Default::default()
                            };
                            session.handle_evaluated(m.version, counts);
                        }
                        SiteEvent::ServeModel(m) => {
                            self.serving.insert(id.clone(), m.version);
                        }
                        SiteEvent::NeighboursReceived(release) => {
                            self.neighbours.insert(id.clone(), release);
                        }
                        SiteEvent::CensusRequested { task, .. }
                            if *behaviour == Behaviour::Honest =>
                        {
                            let (census, privacy) = (
                                task.census.as_ref().unwrap(),
                                task.privacy.as_ref().unwrap(),
                            );
                            let mut contribution =
                                crate::dp::Contribution::of_length(census.length());
                            let m = census.menu_len as usize;
                            for (cells, weight) in census_customers(&id, m) {
                                let values = vec![weight; cells.len()];
                                contribution.add_sparse(privacy, &cells, values, &mut self.rng);
                            }
                            session.handle_contribution(&task, contribution, &mut self.rng);
                        }
                        SiteEvent::AuditRequested { task, .. }
                            if *behaviour == Behaviour::Honest =>
                        {
                            let (spec, privacy) =
                                (task.audit.as_ref().unwrap(), task.privacy.as_ref().unwrap());
                            let mut contribution =
                                crate::dp::Contribution::of_length(spec.length());
                            for (attributes, outcome) in audit_customers(&id, self.biased) {
                                contribution.add_vector(
                                    privacy,
                                    spec.customer_vector(&attributes, &outcome),
                                    &mut self.rng,
                                );
                            }
                            session.handle_contribution(&task, contribution, &mut self.rng);
                        }
                        SiteEvent::TrainRequested { task, model }
                            if *behaviour == Behaviour::Honest =>
                        {
                            let trained = model.spec.trainable(task.settings.scope).len();
                            let delta = delta_of(&id, trained);
                            match &task.privacy {
                                // Ten customers, each with a small share of the site's delta.
                                Some(privacy) => {
                                    let mut contribution = crate::dp::Contribution::new(trained);
                                    for _ in 0..CUSTOMERS_PER_SITE {
                                        let share = delta.iter().map(|v| v * 1e-3).collect();
                                        contribution.add(privacy, share, &mut self.rng);
                                    }
                                    session.handle_contribution(&task, contribution, &mut self.rng);
                                }
                                None => {
                                    let customers = self.customers.get(&id).copied().unwrap_or(100);
                                    session.handle_trained(
                                        &task,
                                        delta,
                                        1.0,
                                        customers,
                                        &mut self.rng,
                                    )
                                }
                            }
                        }
                        _ => {}
                    }
                }
                while let Some(msg) = session.poll_transmit() {
                    progressed = true;
                    let len = crate::wire::codec::encode(&msg).unwrap().len();
                    self.coordinator
                        .handle_message(&id, msg, len, self.now)
                        .unwrap();
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn completed(&self) -> Vec<&RoundSummary> {
        self.events
            .iter()
            .filter_map(|e| match e {
                CoordinatorEvent::RoundCompleted(s) => Some(&**s),
                _ => None,
            })
            .collect()
    }

    /// The rounds charged to the coordinator's ledger, in order.
    fn charged_rounds(&self) -> Vec<RoundId> {
        self.events
            .iter()
            .filter_map(|e| match e {
                CoordinatorEvent::PrivacySpent { round, .. } => Some(*round),
                _ => None,
            })
            .collect()
    }

    /// The neighbour censuses opened, by round.
    fn censuses(&self) -> Vec<RoundId> {
        self.events
            .iter()
            .filter_map(|e| match e {
                CoordinatorEvent::CensusOpened { round, .. } => Some(*round),
                _ => None,
            })
            .collect()
    }

    fn abandoned(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, CoordinatorEvent::RoundAbandoned { .. }))
            .count()
    }
}

/// Site `i`'s held-out customers: 30, a third in group "b"; half of the
/// others hit, and of "b" too unless the model is biased.
fn audit_customers(
    id: &SiteId,
    biased: bool,
) -> Vec<(BTreeMap<String, String>, crate::fairness::CaseOutcome)> {
    let i: u32 = id.as_str().trim_start_matches("site-").parse().unwrap();
    (0..30u32)
        .map(|j| {
            let group = if j % 3 == 0 { "b" } else { "a" };
            let hit = j % 2 == 0 && !(biased && group == "b");
            let attributes = BTreeMap::from([("segment".to_string(), group.to_string())]);
            let outcome = crate::fairness::CaseOutcome {
                hit: f64::from(u8::from(hit)),
                ndcg: if hit { 0.5 } else { 0.0 },
                shown: vec![(i + j) % 3, 10 - (i + j) % 3],
            };
            (attributes, outcome)
        })
        .collect()
}

/// Site `i`'s customers in a census: 50 who went from item 0 to item 1
/// and from 1 to 2 (weight 1/√2 each), and `i` who went from 2 to 3.
fn census_customers(id: &SiteId, m: usize) -> Vec<(Vec<usize>, f32)> {
    let i: usize = id.as_str().trim_start_matches("site-").parse().unwrap();
    let common = (vec![1, m + 2], std::f32::consts::FRAC_1_SQRT_2);
    let rare = (vec![2 * m + 3], 1.0);
    std::iter::repeat_n(common, 50)
        .chain(std::iter::repeat_n(rare, i))
        .collect()
}

fn welcome() -> CoordinatorMessage {
    CoordinatorMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        franchise: "t".into(),
    }
}

/// Plain mode: the harness checks the coordinator's arithmetic on known deltas.
fn config(min_sites: usize, max_rounds: u64) -> RoundConfig {
    let mut c = RoundConfig {
        min_sites,
        max_rounds: Some(max_rounds),
        cohort_wait: Duration::ZERO,
        secure_aggregation: false,
        ..RoundConfig::default()
    };
    c.settings.clip_norm = 1e6; // the harness's deltas must pass unclipped
    c.settings.noise_std = 0.0;
    c
}

#[test]
fn rounds_average_updates_and_advance_the_version() {
    let mut h = Harness::new(3, config(3, 2));
    let start = ModelSpec::new(small_menu(4)).initial_params(1);
    assert!(
        h.coordinator.is_finished(),
        "both rounds run to completion in memory"
    );
    let done = h.completed();
    assert_eq!(done.len(), 2);
    assert_eq!(done[1].model_version, ModelVersion(2));
    assert_eq!(done[0].participants, 3);
    assert_eq!(done[0].eval.cases, 30, "three sites each report 10 cases");
    assert!(done[0].bytes_received > 0);
    // Deltas 1, 2, 3 average to 2 per round, twice, at server learning rate 1.
    let end = &h.coordinator.model().params;
    for (a, b) in start.iter().zip(end) {
        assert!((b - a - 4.0).abs() < 1e-4, "{a} -> {b}");
    }
    // Every site holds the final model.
    for (session, _) in h.sites.values() {
        assert_eq!(session.model().unwrap().version, ModelVersion(2));
    }
    h.advance(Duration::from_secs(3600));
    assert_eq!(h.completed().len(), 2, "no round opens after max_rounds");
}

#[test]
fn no_round_opens_below_min_sites_and_a_late_site_gets_the_model() {
    let mut h = Harness::new(2, config(3, 1));
    assert!(h.completed().is_empty());
    assert!(h.coordinator.current_round().is_none());
    h.connect(site(2), Behaviour::Honest);
    assert_eq!(h.completed().len(), 1);
    h.connect(site(3), Behaviour::Honest);
    let late = &h.sites[&site(3)].0;
    assert_eq!(
        late.model().unwrap().version,
        ModelVersion(1),
        "a late site receives the current model"
    );
}

#[test]
fn a_round_with_too_few_updates_is_abandoned_and_retried() {
    let mut h = Harness::new(2, config(3, 1));
    h.connect(site(2), Behaviour::Silent);
    assert_eq!(h.coordinator.current_round(), Some(RoundId(1)));
    h.advance(RoundConfig::default().train_timeout);
    assert_eq!(h.abandoned(), 1);
    assert_eq!(
        h.coordinator.model().version,
        ModelVersion(0),
        "the model does not change"
    );
    // The silent site leaves, an honest one joins, and after the retry delay the round reruns.
    h.disconnect(&site(2));
    h.connect(site(5), Behaviour::Honest);
    assert!(
        h.completed().is_empty(),
        "nothing opens before the retry delay"
    );
    h.advance(RoundConfig::default().retry_delay);
    let done = h.completed();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].round, RoundId(2));
    assert_eq!(done[0].model_version, ModelVersion(1));
}

#[test]
fn a_dropout_mid_round_leaves_a_round_of_survivors() {
    let wait = Duration::from_secs(2);
    let mut h = Harness::new(
        0,
        RoundConfig {
            cohort_wait: wait,
            ..config(3, 1)
        },
    );
    h.connect(site(0), Behaviour::Honest);
    h.connect(site(1), Behaviour::Honest);
    h.connect(site(2), Behaviour::Silent);
    assert_eq!(
        h.coordinator.current_round(),
        None,
        "the cohort gathers for a while"
    );
    h.connect(site(3), Behaviour::Honest);
    h.advance(wait);
    assert_eq!(h.coordinator.current_round(), Some(RoundId(1)));
    // site-2 holds the round open; it drops, and the survivors' round completes at once.
    assert!(h.completed().is_empty());
    h.disconnect(&site(2));
    let done = h.completed();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].participants, 3);
    assert_eq!(done[0].dropped, 1);
}

#[test]
fn protocol_violations_are_reported_not_applied() {
    let mut h = Harness::new(0, config(3, 1));
    for i in 0..3 {
        h.connect(site(i), Behaviour::Silent);
    }
    let round = h.coordinator.current_round().unwrap();
    let len = h.coordinator.model().params.len();
    let update = |delta: Vec<f32>, version| {
        SiteMessage::Update(crate::wire::SiteUpdate {
            round,
            model_version: ModelVersion(version),
            delta,
            train_loss: 0.0,
            weight: 1.0,
        })
    };
    let now = h.now;
    let c = &mut h.coordinator;
    assert!(matches!(
        c.handle_message(&site(0), update(vec![0.0; len - 1], 0), 1, now),
        Err(Violation::BadUpdate(_))
    ));
    assert!(matches!(
        c.handle_message(&site(0), update(vec![f32::NAN; len], 0), 1, now),
        Err(Violation::BadUpdate(_))
    ));
    assert!(matches!(
        c.handle_message(&site(0), update(vec![0.0; len], 7), 1, now),
        Err(Violation::WrongVersion { .. })
    ));
    assert!(matches!(
        c.handle_message(&site(9), update(vec![0.0; len], 0), 1, now),
        Err(Violation::UnexpectedUpdate(_))
    ));
    c.handle_message(&site(0), update(vec![0.0; len], 0), 1, now)
        .unwrap();
    assert!(
        matches!(
            c.handle_message(&site(0), update(vec![0.0; len], 0), 1, now),
            Err(Violation::UnexpectedUpdate(_))
        ),
        "a second update is refused"
    );
    let hello = SiteMessage::Hello {
        protocol_version: 1,
        agent_version: String::new(),
    };
    assert_eq!(
        c.handle_message(&site(1), hello, 1, now),
        Err(Violation::Unexpected("hello"))
    );
    assert_eq!(c.model().version, ModelVersion(0));
}

#[test]
fn sites_decline_rounds_for_a_model_they_do_not_hold() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut s = SiteSession::new("t", None);
    s.poll_transmit();
    s.handle_message(welcome(), SystemTime::now(), &mut rng)
        .unwrap();
    let spec = ModelSpec::new(small_menu(3));
    let task = crate::wire::RoundTask {
        round: RoundId(4),
        model_version: ModelVersion(2),
        spec_hash: spec.hash(),
        settings: RoundConfig::default().settings,
        secagg: None,
        privacy: None,
        audit: None,
        census: None,
    };
    s.handle_message(
        CoordinatorMessage::RoundOpen(Box::new(task)),
        SystemTime::now(),
        &mut rng,
    )
    .unwrap();
    assert!(matches!(
        s.poll_transmit(),
        Some(SiteMessage::Declined {
            round: RoundId(4),
            ..
        })
    ));
    assert!(s.poll_event().is_none());
}

#[test]
fn a_site_refuses_another_protocol_version() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut s = SiteSession::new("t", None);
    let future = CoordinatorMessage::Welcome {
        protocol_version: PROTOCOL_VERSION + 1,
        franchise: "f".into(),
    };
    let err = s
        .handle_message(future, SystemTime::now(), &mut rng)
        .unwrap_err();
    assert!(matches!(err, SiteSessionError::VersionMismatch { .. }));
    let refused = CoordinatorMessage::Refused { reason: "x".into() };
    assert!(
        s.handle_message(refused, SystemTime::now(), &mut rng)
            .is_err()
    );
}

#[test]
fn the_site_clips_and_noises_its_update() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut s = SiteSession::new("t", None);
    s.poll_transmit();
    s.handle_message(welcome(), SystemTime::now(), &mut rng)
        .unwrap();
    let spec = ModelSpec::new(small_menu(3));
    let model = GlobalModel {
        version: ModelVersion(0),
        params: spec.initial_params(0),
        spec: spec.clone(),
    };
    s.handle_message(
        CoordinatorMessage::Model(std::sync::Arc::new(model)),
        SystemTime::now(),
        &mut rng,
    )
    .unwrap();
    let mut settings = RoundConfig::default().settings;
    settings.clip_norm = 1.0;
    settings.noise_std = 0.0;
    settings.scope = crate::model::TrainScope::All;
    let task = crate::wire::RoundTask {
        round: RoundId(1),
        model_version: ModelVersion(0),
        spec_hash: spec.hash(),
        settings,
        secagg: None,
        privacy: None,
        audit: None,
        census: None,
    };
    s.handle_message(
        CoordinatorMessage::RoundOpen(Box::new(task.clone())),
        SystemTime::now(),
        &mut rng,
    )
    .unwrap();
    s.handle_trained(&task, vec![10.0; spec.param_count()], 0.0, 100, &mut rng);
    let Some(SiteMessage::Update(update)) = s.poll_transmit() else {
        panic!("an update is queued")
    };
    assert!((crate::dp::l2_norm(&update.delta) - 1.0).abs() < 1e-4);
}

/// Secure aggregation through the whole lifecycle: the same average as plain mode,
/// up to fixed-point rounding, with a site dropping mid-round.
#[test]
fn secure_rounds_average_like_plain_rounds_and_survive_a_dropout() {
    let wait = Duration::from_secs(1);
    let mut secure = RoundConfig {
        secure_aggregation: true,
        cohort_wait: wait,
        ..config(4, 1)
    };
    // Unclipped, yet within what a weighted update's encoding keeps precise.
    secure.settings.clip_norm = 1e3;
    let mut h = Harness::new(0, secure);
    for i in 0..5 {
        h.connect(
            site(i),
            if i == 4 {
                Behaviour::Silent
            } else {
                Behaviour::Honest
            },
        );
    }
    h.advance(wait);
    // site-4 advertised and shared keys but never trains: it drops before its masked input.
    assert!(h.completed().is_empty());
    h.disconnect(&site(4));
    let done = h.completed();
    assert_eq!(done.len(), 1, "{:?}", h.events);
    let summary = done[0];
    assert!(summary.secure_aggregation);
    assert_eq!((summary.participants, summary.dropped), (4, 1));
    let phases: Vec<_> = summary.phase_seconds.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        phases,
        [
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask"
        ]
    );
    // Deltas 1, 2, 3, 4 average to 2.5, up to one unit of the fixed-point scale
    // (coarse here: the harness's clip bound is large).
    let scale = crate::secagg::Encoding::new(32, 1e3 * MAX_WEIGHT, 5)
        .unwrap()
        .scale;
    let start = ModelSpec::new(small_menu(4)).initial_params(1);
    for (a, b) in start.iter().zip(&h.coordinator.model().params) {
        assert!(
            f64::from((b - a - 2.5).abs()) <= 1.0 / scale + 1e-5,
            "{a} -> {b}"
        );
    }
    let loss_tolerance = f64::from(super::LOSS_SCALE) / scale;
    assert!(
        (summary.train_loss - 1.0).abs() <= loss_tolerance,
        "the loss is aggregated too: {}",
        summary.train_loss
    );
}

#[test]
fn a_plain_update_in_a_secure_round_is_refused() {
    let secure = RoundConfig {
        secure_aggregation: true,
        ..config(3, 1)
    };
    let mut h = Harness::new(0, secure);
    for i in 0..3 {
        h.connect(site(i), Behaviour::Silent);
    }
    let round = h.coordinator.current_round().unwrap();
    let len = h.coordinator.model().params.len();
    let update = SiteMessage::Update(crate::wire::SiteUpdate {
        round,
        model_version: ModelVersion(0),
        delta: vec![0.0; len],
        train_loss: 0.0,
        weight: 1.0,
    });
    assert_eq!(
        h.coordinator.handle_message(&site(0), update, 1, h.now),
        Err(Violation::PlainUpdate)
    );
}

#[test]
fn a_secure_round_that_loses_too_many_sites_is_abandoned() {
    let secure = RoundConfig {
        secure_aggregation: true,
        ..config(3, 1)
    };
    let mut h = Harness::new(0, secure);
    for i in 0..3 {
        h.connect(
            site(i),
            if i == 0 {
                Behaviour::Silent
            } else {
                Behaviour::Honest
            },
        );
    }
    h.disconnect(&site(0)); // threshold 3 of 3: one loss is one too many
    assert_eq!(h.abandoned(), 1);
    assert_eq!(h.coordinator.model().version, ModelVersion(0));
}

fn private_config(target_epsilon: f64) -> RoundConfig {
    RoundConfig {
        min_sites: 3,
        cohort_wait: Duration::ZERO,
        privacy: Some(crate::round::PrivacyPolicy {
            lineage: "test".into(),
            unit: crate::dp::PrivacyUnit::Customer,
            sampling_rate: 0.5,
            noise_multiplier: 2.0,
            clip_norm: 1.0,
            target_epsilon,
            delta: 1e-6,
            prior_noise_multiplier: 10.0,
            neighbour_noise_multiplier: 0.0,
            clip_quantile: None,
            clip_learning_rate: 0.2,
        }),
        ..RoundConfig::default()
    }
}

/// A private lineage that makes a neighbour census first.
fn census_config(target_epsilon: f64) -> RoundConfig {
    let mut config = private_config(target_epsilon);
    if let Some(p) = &mut config.privacy {
        p.neighbour_noise_multiplier = 2.0;
    }
    config.secure_aggregation = true;
    config.min_sites = 4;
    config
}

#[test]
fn a_private_lineage_sums_the_franchise_neighbours_once_and_every_site_gets_them() {
    let mut h = Harness::new(4, census_config(20.0));
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
    }
    let censuses = h.censuses();
    assert_eq!(
        censuses,
        vec![RoundId(1)],
        "one census, before any training"
    );
    let released: Vec<_> = h
        .events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::NeighboursReleased(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(released.len(), 1);
    let release = &released[0];
    assert_eq!(release.pairs.len(), 16);
    // 200 customers at 1/√2 in (0, 1) and (1, 2); 0 + 1 + 2 + 3 in (2, 3);
    // noise of standard deviation about 2 (z = 2, sensitivity 1).
    let near = |cell: usize, want: f32| (release.pairs[cell] - want).abs() < 12.0;
    assert!(
        near(1, 200.0 * std::f32::consts::FRAC_1_SQRT_2),
        "{:?}",
        release.pairs
    );
    assert_eq!(
        h.events
            .iter()
            .filter(
                |e| matches!(e, CoordinatorEvent::CensusOpened { cohort, .. } if cohort.len() == 4)
            )
            .count(),
        1
    );
    assert!(near(4 + 2, 200.0 * std::f32::consts::FRAC_1_SQRT_2));
    assert!(near(2 * 4 + 3, 6.0));
    assert!(near(3 * 4, 0.0));
    // The census was charged before training, and training went on after it.
    let spent = h.charged_rounds();
    assert_eq!(spent.first(), Some(&RoundId(1)));
    assert!(!h.completed().is_empty());
    assert!(h.completed().iter().all(|s| s.round > RoundId(1)));
    for i in 0..4 {
        assert_eq!(h.neighbours.get(&site(i)), Some(release), "site {i}");
    }
    // A site that connects later gets the same release at once.
    h.connect(site(4), Behaviour::Honest);
    assert_eq!(h.neighbours.get(&site(4)), Some(release));
}

#[test]
fn a_restarted_coordinator_keeps_its_census_and_makes_no_second_one() {
    let mut first = Harness::new(4, census_config(20.0));
    first.advance(Duration::from_secs(1));
    let release = first.neighbours.get(&site(0)).cloned().unwrap();
    let mut second = Harness::new(0, census_config(20.0));
    second.coordinator = Coordinator::new(
        census_config(20.0),
        second.coordinator.model().as_ref().clone(),
        RoundId(50),
    )
    .with_neighbours(Some((*release).clone()));
    for i in 0..4 {
        second.connect(site(i), Behaviour::Honest);
    }
    second.advance(Duration::from_secs(1));
    assert!(second.censuses().is_empty());
    assert!(!second.completed().is_empty());
    assert_eq!(second.neighbours.get(&site(3)), Some(&release));
}

#[test]
fn a_census_that_would_exceed_the_budget_is_skipped_and_training_goes_on() {
    // The census alone at z = 2 costs more than ε 2; one training round does not.
    let mut h = Harness::new(4, census_config(2.0));
    h.advance(Duration::from_secs(1));
    assert!(h.censuses().is_empty());
    assert!(!h.completed().is_empty());
}

#[test]
fn a_site_refuses_a_census_that_does_not_fit_the_model_or_samples_customers() {
    let mut h = Harness::new(0, census_config(20.0));
    h.tamper = Some(Box::new(|_, message| {
        if let CoordinatorMessage::RoundOpen(task) = message
            && let Some(privacy) = &mut task.privacy
            && task.census.is_some()
        {
            // Counting a census at a sampling rate would undercount it.
            privacy.sampling_rate = 0.01;
        }
    }));
    for i in 0..4 {
        h.connect(site(i), Behaviour::Honest);
    }
    let declined = h
        .events
        .iter()
        .filter(|e| matches!(e, CoordinatorEvent::SiteDeclined { reason, .. } if reason.contains("census refused")))
        .count();
    assert_eq!(declined, 4);
    assert!(h.neighbours.is_empty());
}

fn exhausted(h: &Harness) -> Vec<(f64, f64)> {
    h.events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::BudgetExhausted { spent, next, .. } => Some((*spent, *next)),
            _ => None,
        })
        .collect()
}

/// Rounds of q = 0.5, z = 2 that fit in a target, by the accountant alone.
fn rounds_within(target: f64, already: u64) -> u64 {
    let step = crate::dp::Step::gaussian(0.5, 2.0);
    (1..1000)
        .take_while(|&k| crate::dp::accountant::epsilon(&step, already + k, 1e-6).epsilon <= target)
        .count() as u64
}

#[test]
fn training_stops_before_the_round_that_would_exceed_the_budget() {
    let target = 3.0;
    let mut h = Harness::new(4, private_config(target));
    for _ in 0..100 {
        h.advance(Duration::from_secs(1));
        if h.coordinator.is_finished() {
            break;
        }
    }
    assert!(h.coordinator.is_finished(), "training ends on its own");
    let completed = h.completed();
    assert_eq!(completed.len() as u64, rounds_within(target, 0));
    let epsilons: Vec<f64> = completed
        .iter()
        .map(|s| s.privacy.as_ref().unwrap().epsilon)
        .collect();
    assert!(epsilons.windows(2).all(|w| w[0] < w[1]), "{epsilons:?}");
    assert!(*epsilons.last().unwrap() <= target);
    let stops = exhausted(&h);
    assert_eq!(stops.len(), 1);
    assert!(stops[0].0 <= target && stops[0].1 > target, "{stops:?}");
}

#[test]
fn a_restarted_coordinator_continues_the_ledger_it_recorded() {
    let target = 3.0;
    let mut first = Harness::new(4, private_config(target));
    for _ in 0..3 {
        first.advance(Duration::from_secs(1));
    }
    let steps: Vec<crate::dp::Step> = first
        .events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::PrivacySpent { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert!(!steps.is_empty());
    let mut second = Harness::new(0, private_config(target));
    second.coordinator = Coordinator::new(
        private_config(target),
        second.coordinator.model().as_ref().clone(),
        RoundId(100),
    )
    .with_spent(&steps);
    for i in 0..4 {
        second.connect(site(i), Behaviour::Honest);
    }
    for _ in 0..100 {
        second.advance(Duration::from_secs(1));
        if second.coordinator.is_finished() {
            break;
        }
    }
    let total = steps.len() as u64 + second.completed().len() as u64;
    assert!(
        total <= rounds_within(target, 0) + 1,
        "the budget is not reset by a restart"
    );
    assert_eq!(
        second.completed().len() as u64,
        rounds_within(target, steps.len() as u64)
    );
}

#[test]
fn a_paused_coordinator_opens_no_round_until_resumed() {
    let mut h = Harness::new(0, config(3, 1));
    h.coordinator.set_paused(true, h.now);
    for i in 0..3 {
        h.connect(site(i), Behaviour::Honest);
    }
    h.advance(Duration::from_secs(3600));
    assert!(h.completed().is_empty(), "no round opens while paused");
    h.coordinator.set_paused(false, h.now);
    h.pump();
    assert_eq!(h.completed().len(), 1);
}

#[test]
fn a_rollback_waits_for_the_round_then_the_next_round_trains_from_it() {
    let mut h = Harness::new(2, config(3, 1));
    h.connect(site(2), Behaviour::Silent);
    assert_eq!(h.coordinator.current_round(), Some(RoundId(1)));
    let restored = vec![0.5; h.coordinator.model().params.len()];
    h.coordinator
        .rollback(ModelVersion(0), restored.clone(), h.now);
    h.pump();
    assert_eq!(
        h.coordinator.model().version,
        ModelVersion(0),
        "a round in progress is not disturbed"
    );
    // The silent site leaves; the round is abandoned, and the rollback applies.
    h.disconnect(&site(2));
    let rolled: Vec<_> = h
        .events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::ModelRolledBack { from, model } => Some((*from, model.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rolled.len(), 1);
    assert_eq!(rolled[0].0, ModelVersion(0));
    assert_eq!(rolled[0].1.version, ModelVersion(1), "a new version number");
    assert_eq!(rolled[0].1.params, restored);
    assert_eq!(
        h.sites[&site(0)].0.model().unwrap().version,
        ModelVersion(1)
    );
    // The next round trains from the restored parameters: deltas 1, 2, 6 average to 3.
    h.connect(site(5), Behaviour::Honest);
    h.advance(RoundConfig::default().retry_delay);
    let done = h.completed();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].model_version, ModelVersion(2));
    for p in &h.coordinator.model().params {
        assert!((p - 3.5).abs() < 1e-4, "{p}");
    }
}

#[test]
fn cohorts_are_drawn_from_the_connected_sites_and_reproducible() {
    let connected: std::collections::BTreeSet<SiteId> = (0..10).map(site).collect();
    let a = cohort(&connected, 4, 7, RoundId(1));
    assert_eq!(a.len(), 4);
    assert!(a.is_subset(&connected));
    assert_eq!(
        a,
        cohort(&connected, 4, 7, RoundId(1)),
        "same seed, same draw"
    );
    let draws: std::collections::BTreeSet<_> = (1..20)
        .map(|r| cohort(&connected, 4, 7, RoundId(r)))
        .collect();
    assert!(draws.len() > 10, "rounds draw different cohorts");
    assert_eq!(cohort(&connected, 20, 7, RoundId(1)), connected);

    let mut h = Harness::new(
        0,
        RoundConfig {
            cohort_size: Some(3),
            ..config(3, 2)
        },
    );
    for i in 0..5 {
        h.connect(site(i), Behaviour::Honest);
    }
    let done = h.completed();
    assert_eq!(done.len(), 2);
    for round in done {
        assert_eq!(round.cohort.len(), 3);
        assert_eq!(round.contributors, round.cohort);
    }
}

#[test]
fn rounds_completed_before_a_restart_count_against_max_rounds() {
    let spec = ModelSpec::new(small_menu(4));
    let model = GlobalModel {
        version: ModelVersion(4),
        params: spec.initial_params(1),
        spec,
    };
    let done = Coordinator::new(config(3, 4), model.clone(), RoundId(5)).with_completed(4);
    assert!(done.is_finished());
    let more = Coordinator::new(config(3, 5), model, RoundId(5)).with_completed(4);
    assert!(!more.is_finished());
}

/// Two rounds, then an audit by "segment" with a gate on the HR@10 ratio;
/// training is private only when `noise_multiplier` is a usable one.
fn audit_config(noise_multiplier: f64) -> RoundConfig {
    let mut c = if noise_multiplier >= 1.0 {
        private_config(50.0)
    } else {
        RoundConfig {
            min_sites: 3,
            cohort_wait: Duration::ZERO,
            ..RoundConfig::default()
        }
    };
    c.max_rounds = Some(2);
    c.audit = Some(AuditPolicy {
        attributes: BTreeMap::from([(
            "segment".to_string(),
            vec!["a".to_string(), "b".to_string()],
        )]),
        min_group_size: 10,
        noise_multiplier,
        every_rounds: 0,
        gate: crate::fairness::Gate {
            min_hr_ratio: Some(0.8),
            ..Default::default()
        },
        lineage: "test".into(),
        delta: 1e-6,
    });
    c
}

fn audits(h: &Harness) -> Vec<&AuditOutcome> {
    h.events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::AuditCompleted(o) => Some(&**o),
            _ => None,
        })
        .collect()
}

/// The same figures computed centrally from every site's customers.
fn central_hr(sites: usize, group: &str, biased: bool) -> (f64, f64) {
    let all: Vec<_> = (0..sites)
        .flat_map(|i| audit_customers(&site(i), biased))
        .filter(|(a, _)| a["segment"] == group)
        .collect();
    let hits: f64 = all.iter().map(|(_, o)| o.hit).sum();
    (all.len() as f64, hits / all.len() as f64)
}

#[test]
fn an_audit_matches_the_central_figures_and_releases_a_fair_model() {
    // Almost no noise: the sum is exact up to rounding.
    let h = Harness::new(3, audit_config(1e-6));
    assert!(h.coordinator.is_finished());
    let audits = audits(&h);
    assert_eq!(audits.len(), 1, "the final version is audited once");
    let report = &audits[0].report;
    assert_eq!(report.model_version, 2);
    assert_eq!(report.sites, 3);
    let groups = &report.attributes[0].groups;
    for (figures, name) in groups.iter().zip(["a", "b"]) {
        let (count, hr) = central_hr(3, name, false);
        let customers = figures.customers.unwrap();
        assert!(
            (customers - count).abs() < 0.5,
            "{name}: {customers} vs {count}"
        );
        assert!((figures.hr.unwrap().value - hr).abs() < 0.01, "{name}");
    }
    assert!(groups[2].suppressed(), "nobody is outside a and b");
    assert!(audits[0].failures.is_empty(), "{:?}", audits[0].failures);
    assert!(
        h.sites
            .keys()
            .all(|s| h.serving.get(s) == Some(&ModelVersion(2)))
    );
    // The audit is charged to the ledger like a round, after the training rounds.
    let spent = h.charged_rounds();
    assert_eq!(
        spent,
        [RoundId(3)],
        "training was not private; the audit is"
    );
    assert!(matches!(
        h.events.last(),
        Some(CoordinatorEvent::TrainingFinished)
    ));
}

#[test]
fn a_biased_model_is_held_and_sites_keep_serving_nothing_new() {
    let mut h = Harness::new(0, audit_config(1e-6));
    h.biased = true;
    for i in 0..3 {
        h.connect(site(i), Behaviour::Honest);
    }
    let audits = audits(&h);
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].report.attributes[0].worst.as_deref(), Some("b"));
    assert!(
        audits[0].failures[0].contains("segment: HR@10 of b"),
        "{:?}",
        audits[0].failures
    );
    assert!(
        h.serving.is_empty(),
        "no site was told to serve the held model"
    );
    assert!(h.coordinator.released().is_none());
    // An operator's release reaches every site.
    let model = GlobalModel::clone(h.coordinator.model());
    h.coordinator.release(model);
    h.pump();
    assert!(
        h.sites
            .keys()
            .all(|s| h.serving.get(s) == Some(&ModelVersion(2)))
    );
}

#[test]
fn audit_figures_carry_the_noise_the_report_states() {
    let mut h = Harness::new(3, audit_config(2.0));
    let audits = audits(&h);
    let report = &audits[0].report;
    assert!(
        report.noise_std > 1.0,
        "z = 2 on a bound of 2: {}",
        report.noise_std
    );
    let (count, hr) = central_hr(3, "a", false);
    let a = &report.attributes[0].groups[0];
    let sd = report.noise_std;
    assert!((a.customers.unwrap() - count).abs() < 5.0 * sd);
    let e = a.hr.unwrap();
    // The interval is 95% (±1.96 sd); one seeded run is one draw, so the
    // exact figure must lie within 3.5 of the sds the interval states.
    let sd_hr = (e.high - e.low) / (2.0 * 1.96);
    assert!(
        (e.value - hr).abs() < 3.5 * sd_hr,
        "{hr} too far from {e:?}"
    );
    // Each noisy figure differs from the exact one.
    assert_ne!(a.customers.unwrap(), count);
    assert!(audits[0].epsilon > 0.0 && audits[0].epsilon < 10.0);
    h.advance(Duration::from_secs(1));
}

#[test]
fn plain_updates_count_as_the_customers_behind_them() {
    let mut h = Harness::new(0, config(3, 1));
    // Site i's delta is i + 1; sites of 100, 100 and 800 customers.
    for (i, customers) in [100, 100, 800].into_iter().enumerate() {
        h.customers.insert(site(i), customers);
    }
    let start = h.coordinator.model().params.clone();
    for i in 0..3 {
        h.connect(site(i), Behaviour::Honest);
    }
    assert_eq!(h.completed().len(), 1);
    // (1·100 + 2·100 + 3·800) / 1000 = 2.7, not the unweighted 2.
    for (a, b) in start.iter().zip(&h.coordinator.model().params) {
        assert!((b - a - 2.7).abs() < 1e-4, "{a} -> {b}");
    }
}

#[test]
fn securely_summed_plain_updates_are_weighted_inside_the_sum() {
    let mut c = config(3, 1);
    c.secure_aggregation = true;
    // Large enough that no delta is clipped, small enough for the encoding's precision.
    c.settings.clip_norm = 1e3;
    let mut h = Harness::new(0, c);
    for (i, customers) in [100, 100, 800].into_iter().enumerate() {
        h.customers.insert(site(i), customers);
    }
    let start = h.coordinator.model().params.clone();
    for i in 0..3 {
        h.connect(site(i), Behaviour::Honest);
    }
    let done = h.completed();
    assert_eq!(done.len(), 1);
    assert!(done[0].secure_aggregation);
    for (a, b) in start.iter().zip(&h.coordinator.model().params) {
        assert!((b - a - 2.7).abs() < 1e-2, "{a} -> {b}");
    }
    assert!(
        (done[0].train_loss - 1.0).abs() < 1e-2,
        "the weighted mean loss"
    );
}

#[test]
fn a_restored_server_optimizer_makes_the_uninterrupted_runs_next_step() {
    let mut c = config(3, 3);
    c.server_optimizer = ServerOptimizer {
        kind: OptimizerKind::Adam,
        learning_rate: 0.1,
        ..ServerOptimizer::default()
    };
    let whole = Harness::new(3, c.clone());
    assert_eq!(whole.completed().len(), 3);
    // A run stopped after two rounds, its state as the driver commits it.
    c.max_rounds = Some(2);
    let first = Harness::new(3, c.clone());
    let saved = crate::wire::codec::encode(first.coordinator.optimizer_state()).unwrap();
    let model = GlobalModel::clone(first.coordinator.model());
    c.max_rounds = Some(3);
    let restart = |optimizer: OptimizerState| {
        let coordinator = Coordinator::new(c.clone(), model.clone(), RoundId(3))
            .with_completed(2)
            .with_optimizer(optimizer);
        let mut h = Harness::new(0, c.clone());
        h.coordinator = coordinator;
        for i in 0..3 {
            h.connect(site(i), Behaviour::Honest);
        }
        h.coordinator.model().params.clone()
    };
    let resumed = restart(crate::wire::codec::decode(&saved).unwrap());
    assert_eq!(resumed, whole.coordinator.model().params);
    // Without the saved moments the step differs: the state matters.
    assert_ne!(restart(OptimizerState::default()), resumed);
}

#[test]
fn the_prior_release_is_charged_once_per_lineage_at_the_coordinator() {
    let h = Harness::new(3, private_config(20.0));
    let spent: Vec<(Option<crate::dp::Step>, f64)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::PrivacySpent { prior, epsilon, .. } => Some((*prior, *epsilon)),
            _ => None,
        })
        .collect();
    assert!(spent.len() >= 2, "{spent:?}");
    assert_eq!(
        spent[0].0,
        Some(crate::dp::Step::gaussian(1.0, 10.0)),
        "the first private round pays for the prior"
    );
    assert!(spent[1..].iter().all(|(p, _)| p.is_none()));
    // A coordinator restored with the prior paid does not charge it again.
    let mut config = private_config(20.0);
    config.max_rounds = Some(1);
    let c = Coordinator::new(
        config,
        GlobalModel::clone(h.coordinator.model()),
        RoundId(50),
    )
    .with_prior_charged(true);
    let mut again = Harness::new(0, RoundConfig::default());
    again.coordinator = c;
    for i in 0..3 {
        again.connect(site(i), Behaviour::Honest);
    }
    assert!(
        again
            .events
            .iter()
            .any(|e| matches!(e, CoordinatorEvent::PrivacySpent { prior: None, .. }))
    );
}

#[test]
fn adaptive_clipping_follows_the_target_quantile_of_update_norms() {
    use crate::dp::distributed::PrivateMean;
    // 600 customers whose update norms are spread evenly over (0, 2]: the
    // median is 1. Each round goes through real contributions, noise, the
    // modular sum and its decoding, as in a federation of three sites.
    let mut policy = private_config(4.0).privacy.unwrap();
    policy.clip_quantile = Some(0.5);
    policy.clip_learning_rate = 0.3;
    let norms: Vec<f32> = (1..=600).map(|i| i as f32 / 300.0).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut clip = 0.1f32;
    for _ in 0..80 {
        let (privacy, encoding) = crate::dp::RoundPrivacy::plan(
            "test",
            crate::dp::PrivacyUnit::Customer,
            0.5,
            1.0,
            clip,
            1e-6,
            12,
            3,
            3,
            32,
        )
        .unwrap();
        let mut sum = vec![0u32; 12];
        for site in norms.chunks(200) {
            let mut c = crate::dp::Contribution::new(10);
            for &norm in site {
                let delta = vec![norm / 10f32.sqrt(); 10];
                c.add(&privacy, delta, &mut rng);
            }
            encoding.accumulate(&mut sum, &c.finish(&privacy, &encoding, &mut rng).unwrap());
        }
        let mean: PrivateMean = privacy.mean_update(encoding.decode_sum(&sum));
        clip = policy.next_clip(clip, mean.clipped_fraction());
    }
    // The delta's share of the bound is C·√(7/8) (the count and the flag take the rest).
    let delta_bound = clip * (7.0f32 / 8.0).sqrt();
    assert!(
        (delta_bound - 1.0).abs() < 0.1,
        "clip {clip}, delta bound {delta_bound}"
    );
}

/// What a site answers a round task sent straight to it: its refusal, if any.
fn refusal(h: &mut Harness, id: &SiteId, task: crate::wire::RoundTask) -> Option<String> {
    let (session, _) = h.sites.get_mut(id).unwrap();
    while session.poll_transmit().is_some() {}
    session
        .handle_message(
            CoordinatorMessage::RoundOpen(Box::new(task)),
            SystemTime::now(),
            &mut h.rng,
        )
        .unwrap();
    std::iter::from_fn(|| session.poll_transmit()).find_map(|m| match m {
        SiteMessage::Declined { reason, .. } => Some(reason),
        _ => None,
    })
}

/// Attack: a coordinator sends round parameters that would panic a site
/// (a negative clamp bound in the encoding) or keep it training without end
/// (epochs, batch sizes, learning rates out of range). Each is refused with
/// the field named, before any work.
#[test]
fn a_site_refuses_round_parameters_that_would_crash_it_or_make_it_work_without_limit() {
    let mut h = Harness::new(3, config(10, 1)); // no round opens by itself
    let model = h.coordinator.model().clone();
    let mut settings = RoundConfig::default().settings;
    settings.scope = crate::model::TrainScope::All;
    let honest = crate::wire::RoundTask {
        round: RoundId(7),
        model_version: model.version,
        spec_hash: model.spec.hash(),
        settings,
        secagg: Some(crate::secagg::Setup {
            cohort: (0..3).map(site).collect(),
            threshold: 3,
            encoding: crate::secagg::Encoding::new(32, 10.0, 3).unwrap(),
            length: model.spec.param_count() + crate::dp::distributed::extra_coordinates(false),
        }),
        privacy: None,
        audit: None,
        census: None,
    };
    assert_eq!(refusal(&mut h, &site(0), honest.clone()), None);

    let mut attacks: Vec<(&str, crate::wire::RoundTask)> = Vec::new();
    for (field, bound, scale, margin) in [
        ("bound", -1.0f32, 1e3, 0.0),
        ("bound", f32::NAN, 1e3, 0.0),
        ("scale", 10.0, -1e3, 0.0),
        ("margin", 10.0, 1e3, -1e12),
    ] {
        let mut task = honest.clone();
        let encoding = &mut task.secagg.as_mut().unwrap().encoding;
        (encoding.bound, encoding.scale, encoding.noise_margin) = (bound, scale, margin);
        attacks.push((field, task));
    }
    type Change = fn(&mut crate::wire::TrainSettings);
    let settings_attacks: [(&str, Change); 6] = [
        ("epochs", |s| s.epochs = u32::MAX),
        ("epochs", |s| s.epochs = 0),
        ("batch_size", |s| s.batch_size = 0),
        ("learning_rate", |s| s.learning_rate = f32::INFINITY),
        ("clip_norm", |s| s.clip_norm = -1.0),
        ("noise_std", |s| s.noise_std = f32::NAN),
    ];
    for (field, change) in settings_attacks {
        let mut task = honest.clone();
        change(&mut task.settings);
        attacks.push((field, task));
    }
    for (field, task) in attacks {
        let reason = refusal(&mut h, &site(0), task).expect("refused");
        assert!(reason.contains(field), "{field}: {reason}");
    }
}

/// Attack: the coordinator shows one site a round with other privacy
/// parameters (less noise asked of it, so that its update stands out in the
/// sum). Every site signs a digest of the whole task it was sent, so the
/// sites refuse each other's keys and no sum is ever unmasked.
#[test]
fn sites_sent_different_round_parameters_never_sum_together() {
    let mut h = Harness::new(0, private_config(100.0));
    h.tamper = Some(Box::new(|to: &SiteId, message: &mut CoordinatorMessage| {
        if let CoordinatorMessage::RoundOpen(task) = message
            && *to == site(0)
            && let Some(privacy) = &mut task.privacy
        {
            privacy.local_variance /= 4.0;
        }
    }));
    for i in 0..4 {
        h.connect(site(i), Behaviour::Honest);
    }
    h.advance(Duration::from_secs(1));
    h.advance(Duration::from_secs(600));
    assert!(
        h.completed().is_empty(),
        "a round with split parameters completed"
    );
    assert!(h.abandoned() >= 1);
    let declined: Vec<&String> = h
        .events
        .iter()
        .filter_map(|e| match e {
            CoordinatorEvent::SiteDeclined { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert!(!declined.is_empty());
    assert!(
        declined.iter().all(|r| r.contains("not signed")),
        "{declined:?}"
    );
}

/// A site that assumes `c` cohort members collude with the coordinator
/// counts only the other survivors' noise: it charges its ledger more.
#[test]
fn a_site_assuming_colluders_charges_itself_for_the_honest_survivors_noise_only() {
    let h = Harness::new(4, private_config(100.0));
    let model = h.coordinator.model().clone();
    let privacy = crate::dp::RoundPrivacy::plan(
        "lineage",
        crate::dp::PrivacyUnit::Customer,
        0.1,
        1.0,
        1.0,
        1e-6,
        8,
        10,
        7,
        32,
    )
    .unwrap()
    .0;
    let task = crate::wire::RoundTask {
        round: RoundId(1),
        model_version: model.version,
        spec_hash: model.spec.hash(),
        settings: RoundConfig::default().settings,
        secagg: Some(crate::secagg::Setup {
            cohort: (0..10).map(site).collect(),
            threshold: 7,
            encoding: crate::secagg::Encoding::new(32, 10.0, 10).unwrap(),
            length: 8,
        }),
        privacy: Some(privacy),
        audit: None,
        census: None,
    };
    let trusting = privacy_step(&task, &crate::secagg::Floor::default()).unwrap();
    let wary = crate::secagg::Floor {
        colluders: 3,
        ..Default::default()
    };
    let charged = privacy_step(&task, &wary).unwrap();
    let ratio = charged.noise_multiplier / trusting.noise_multiplier;
    assert!((ratio - (4.0f64 / 7.0).sqrt()).abs() < 1e-9, "{ratio}");
    // A noise floor between the two refuses the round only for the wary site.
    let floor = |colluders| crate::secagg::Floor {
        colluders,
        min_noise_multiplier: 0.9 * trusting.noise_multiplier,
        ..Default::default()
    };
    assert_eq!(site::noise_floor(&task, &floor(0)), Ok(()));
    let refused = site::noise_floor(&task, &floor(3)).unwrap_err();
    assert!(refused.contains("below this site's minimum"), "{refused}");
}

/// A site's report of its own ledger reaches the coordinator as an event
/// (for display); a report that is not a number is refused.
#[test]
fn a_sites_budget_report_is_shown_and_a_nonsense_one_refused() {
    let mut h = Harness::new(3, config(10, 1));
    let budget = crate::wire::SiteBudget {
        epsilon: 1.5,
        max_epsilon: 8.0,
        delta: 1e-6,
        window_days: Some(365),
    };
    let now = h.now;
    h.coordinator
        .handle_message(&site(0), SiteMessage::Budget(budget), 40, now)
        .unwrap();
    while let Some(e) = h.coordinator.poll_event() {
        h.events.push(e);
    }
    assert!(h.events.iter().any(|e| matches!(
        e,
        CoordinatorEvent::SiteBudget { site: s, budget: b } if *s == site(0) && *b == budget
    )));
    let nonsense = crate::wire::SiteBudget {
        epsilon: f64::NAN,
        ..budget
    };
    assert_eq!(
        h.coordinator
            .handle_message(&site(1), SiteMessage::Budget(nonsense), 40, now),
        Err(Violation::BadBudget)
    );
}
