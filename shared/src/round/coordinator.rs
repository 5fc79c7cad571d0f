use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::optimizer::{OptimizerState, ServerOptimizer};
use super::split_aggregate;
use crate::dp::distributed::extra_coordinates;
use crate::dp::{Accountant, PrivacyUnit, RoundPrivacy, Step};
use crate::fairness::{AuditSpec, FairnessReport, Gate};
use crate::ids::{ModelVersion, RoundId, SiteId};
use crate::model::{GlobalModel, ModelError, SpecHash, check_vector};
use crate::secagg::{self, Encoding, Outcome, Setup};
use crate::wire::{
    CoordinatorMessage, EvalCounts, NeighbourCensus, NeighbourRelease, RoundTask, SiteMessage,
    SiteUpdate, TrainSettings,
};

/// Censuses tried per lineage before training goes on without one.
const CENSUS_ATTEMPTS: u32 = 3;

/// Settings of the round lifecycle.
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Updates needed for a round to produce a model; also the sites needed to open one.
    pub min_sites: usize,
    /// Sites asked per round; `None`: every connected site. When more are
    /// connected, a cohort is drawn uniformly by [`cohort`] from `cohort_seed`.
    pub cohort_size: Option<usize>,
    /// Seed of the cohort draw, so a round's cohort can be recomputed.
    pub cohort_seed: u64,
    /// Stop once the lineage has this many completed rounds, counting those
    /// before a restart (`None`: train until stopped).
    pub max_rounds: Option<u64>,
    /// How long sites have to send their updates.
    pub train_timeout: Duration,
    /// How long sites have to report evaluation of a new model.
    pub eval_timeout: Duration,
    /// Pause before retrying after an abandoned round.
    pub retry_delay: Duration,
    /// Once `min_sites` are connected, how long to wait for more before opening the
    /// first round after a start, so that sites starting together join one cohort.
    pub cohort_wait: Duration,
    /// How the averaged update is applied to the model.
    pub server_optimizer: ServerOptimizer,
    /// Local training and privacy settings sent with each round.
    pub settings: TrainSettings,
    /// Combine updates by secure aggregation (the default). Turning it off lets
    /// the coordinator see every site's update.
    pub secure_aggregation: bool,
    /// Shares needed to unmask; `None`: more than two thirds of the cohort.
    pub threshold: Option<usize>,
    /// Bits of the modulus updates are summed in.
    pub modulus_bits: u32,
    /// Deadline of each secure aggregation phase other than masked input
    /// (which has `train_timeout`, since sites train before sending it).
    pub secagg_phase_timeout: Duration,
    /// Distributed differential privacy and its budget; `None`: no noise.
    pub privacy: Option<PrivacyPolicy>,
    /// Fairness audits and the release gate; `None`: every model is served at once.
    pub audit: Option<AuditPolicy>,
}

/// How model versions are audited for fairness before they are served.
///
/// A version is audited when training finishes (by `max_rounds` or the
/// budget), after a rollback, and every `every_rounds` rounds if set. Until a
/// version passes, sites keep serving the last one released.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPolicy {
    /// Audit-only attributes and their declared groups.
    pub attributes: BTreeMap<String, Vec<String>>,
    /// Groups with fewer customers (by the noisy count) are not reported.
    pub min_group_size: u64,
    /// Noise standard deviation on the sums over the per-customer bound.
    pub noise_multiplier: f64,
    /// Audit every this many completed rounds as well (0: only the final version).
    pub every_rounds: u64,
    /// The thresholds a version must meet to be served.
    pub gate: Gate,
    /// The ledger lineage audits are charged to: the training lineage when
    /// privacy is on, so that one budget covers both.
    pub lineage: String,
    /// The δ the audit's ε is stated at when training has no privacy policy.
    pub delta: f64,
}

/// The privacy a model lineage is trained under.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyPolicy {
    /// Names the model lineage whose budget rounds spend; sites keep ledgers by it.
    pub lineage: String,
    /// Whose privacy is protected.
    pub unit: PrivacyUnit,
    /// Probability that a customer is sampled in a round (ignored for the site unit).
    pub sampling_rate: f64,
    /// Noise standard deviation on the sum over the clip norm.
    pub noise_multiplier: f64,
    /// L2 bound of one unit's contribution.
    pub clip_norm: f32,
    /// The budget: no round opens that would take ε above this...
    pub target_epsilon: f64,
    /// ...at this δ.
    pub delta: f64,
    /// Noise multiplier of each site's one-off release of its popularity
    /// prior (0: private rounds train without a prior).
    pub prior_noise_multiplier: f64,
    /// Noise multiplier of the lineage's one census of the franchise's item
    /// neighbours, summed securely before its first training round (0: no
    /// census; private rounds rank new items by popularity alone).
    pub neighbour_noise_multiplier: f64,
    /// Adaptive clipping: the share of customers whose update should fit
    /// the clip norm (absent: the clip norm stays `clip_norm`).
    pub clip_quantile: Option<f64>,
    /// How fast the clip norm follows that quantile (η of Andrew et al.).
    pub clip_learning_rate: f64,
}

impl PrivacyPolicy {
    /// The clip norm after a round that clipped `clipped` of its units:
    /// `C·exp(−η·(unclipped − quantile))` (Andrew et al. 2021, geometric
    /// update), within [10⁻³, 10³]. The clipped share comes from the noisy
    /// secure sum, so following it costs nothing beyond the round.
    pub fn next_clip(&self, clip: f32, clipped: f64) -> f32 {
        let Some(quantile) = self.clip_quantile else {
            return clip;
        };
        let unclipped = 1.0 - clipped;
        let next = f64::from(clip) * (-self.clip_learning_rate * (unclipped - quantile)).exp();
        next.clamp(1e-3, 1e3) as f32
    }

    /// What the sites' prior release costs each of their customers, once per lineage.
    pub fn prior_step(&self) -> Option<Step> {
        crate::dp::distributed::prior_step(self.prior_noise_multiplier)
    }
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            min_sites: 3,
            cohort_size: None,
            cohort_seed: 0,
            max_rounds: None,
            train_timeout: Duration::from_secs(120),
            eval_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_secs(5),
            cohort_wait: Duration::from_secs(2),
            server_optimizer: ServerOptimizer::default(),
            settings: TrainSettings::default(),
            secure_aggregation: true,
            threshold: None,
            modulus_bits: 32,
            secagg_phase_timeout: Duration::from_secs(30),
            privacy: None,
            audit: None,
        }
    }
}

/// A message for one site.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The recipient.
    pub to: SiteId,
    /// The message (shared when broadcast).
    pub message: Arc<CoordinatorMessage>,
}

/// What the coordinator tells its driver.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CoordinatorEvent {
    /// A round opened.
    RoundOpened {
        /// The round.
        round: RoundId,
        /// The model version it trains from.
        model_version: ModelVersion,
        /// The sites asked to train.
        cohort: Vec<SiteId>,
        /// Whether the round uses secure aggregation.
        secure: bool,
    },
    /// A new model version exists; persist it before sending anything.
    ModelCommitted(Arc<GlobalModel>),
    /// A rollback was applied: `model` is a new version carrying the parameters
    /// of version `from`. Persist it before sending anything.
    ModelRolledBack {
        /// The version whose parameters were restored.
        from: ModelVersion,
        /// The new current version.
        model: Arc<GlobalModel>,
    },
    /// A round finished with a new model, evaluated.
    RoundCompleted(Box<RoundSummary>),
    /// A round ended without a new model.
    RoundAbandoned {
        /// The round.
        round: RoundId,
        /// Updates received.
        received: usize,
        /// Why.
        reason: String,
    },
    /// A site declined a round.
    SiteDeclined {
        /// The site.
        site: SiteId,
        /// The round.
        round: RoundId,
        /// Its reason.
        reason: String,
    },
    /// A site broke the secure aggregation protocol in a way found only at
    /// the round's end (a false unmask share); the round went on without it
    /// where the threshold allowed.
    SiteMisbehaved {
        /// The site.
        site: SiteId,
        /// The round.
        round: RoundId,
        /// What it did.
        reason: String,
    },
    /// A site reported what its own ledger shows (for display: the site
    /// enforces it).
    SiteBudget {
        /// The site.
        site: SiteId,
        /// Its figures.
        budget: crate::wire::SiteBudget,
    },
    /// A private round is about to open: record its cost durably before
    /// sending anything, so privacy spent is never undercounted.
    PrivacySpent {
        /// The round.
        round: RoundId,
        /// Its mechanism.
        step: Step,
        /// The sites' release of their popularity prior, paid for with the
        /// lineage's first private round.
        prior: Option<Step>,
        /// ε of the lineage including this round.
        epsilon: f64,
    },
    /// The next round would take ε above the target; training stops.
    BudgetExhausted {
        /// ε spent so far.
        spent: f64,
        /// ε after one more round.
        next: f64,
        /// The target.
        target: f64,
    },
    /// `max_rounds` rounds have completed, or the budget is spent; no more will open.
    TrainingFinished,
    /// A fairness audit opened; its round number is charged like a training round's.
    AuditOpened {
        /// The audit's round.
        round: RoundId,
        /// The version audited.
        model_version: ModelVersion,
        /// The sites asked.
        cohort: Vec<SiteId>,
    },
    /// A census of the franchise's item neighbours opened; it is charged
    /// like a training round.
    CensusOpened {
        /// The census round.
        round: RoundId,
        /// The sites asked.
        cohort: Vec<SiteId>,
    },
    /// The census finished: persist the release before sending anything;
    /// every site gets it, now and when it connects.
    NeighboursReleased(Arc<NeighbourRelease>),
    /// A version was audited: `failures` is empty when it passed the gate and
    /// was released, else it is held.
    AuditCompleted(Box<AuditOutcome>),
    /// An audit could not finish; the version stays unreleased.
    AuditAbandoned {
        /// The audit's round.
        round: RoundId,
        /// The version.
        model_version: ModelVersion,
        /// Why.
        reason: String,
    },
}

/// The result of a fairness audit.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOutcome {
    /// The audit's round.
    pub round: RoundId,
    /// The figures.
    pub report: FairnessReport,
    /// The gate's objections; empty if the version was released.
    pub failures: Vec<String>,
    /// ε of the lineage after the audit, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// The privacy of a completed round.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacySummary {
    /// ε of the lineage after this round, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The noise multiplier on the sum (z).
    pub noise_multiplier: f64,
    /// Probability a customer was sampled.
    pub sampling_rate: f64,
    /// L2 bound of one unit's contribution.
    pub clip_norm: f32,
    /// The noisy number of units (customers, or sites) in the sum.
    pub units: f64,
    /// The noisy share of units whose delta was clipped.
    pub clipped_fraction: f64,
    /// L2 norm of the mean update applied (noise included).
    pub update_norm: f64,
    /// Expected L2 norm of the noise in that mean update.
    pub noise_norm: f64,
    /// The clip norm the next round uses (moved by adaptive clipping).
    pub next_clip_norm: f32,
}

/// The record of a completed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// The round.
    pub round: RoundId,
    /// The model version it produced.
    pub model_version: ModelVersion,
    /// Sites whose updates were averaged.
    pub participants: usize,
    /// The sites asked to train.
    pub cohort: Vec<SiteId>,
    /// The sites whose updates are in the new model.
    pub contributors: Vec<SiteId>,
    /// Cohort members that dropped or declined.
    pub dropped: usize,
    /// Mean of the participants' training losses.
    pub train_loss: f64,
    /// Evaluation counts of the new model, summed over reporting sites.
    pub eval: EvalCounts,
    /// Sites that reported evaluation.
    pub eval_sites: usize,
    /// From opening to the end of evaluation.
    pub duration: Duration,
    /// Wire bytes of the updates and reports received for the round.
    pub bytes_received: u64,
    /// Whether the updates were combined by secure aggregation.
    pub secure_aggregation: bool,
    /// Seconds spent in each secure aggregation phase, in order.
    pub phase_seconds: Vec<(&'static str, f64)>,
    /// Differential privacy of the round, when on.
    pub privacy: Option<PrivacySummary>,
}

/// A site broke the protocol; the driver closes its connection.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum Violation {
    /// A message that only opens a connection arrived later.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    /// An update for the current round from a site not asked for one, or sent twice.
    #[error("update for round {0} was not expected from this site")]
    UnexpectedUpdate(RoundId),
    /// An update trained from the wrong model version.
    #[error("update trained from model {got}, round uses {expected}")]
    WrongVersion {
        /// Version in the update.
        got: ModelVersion,
        /// Version of the round.
        expected: ModelVersion,
    },
    /// The update vector is malformed.
    #[error("malformed update: {0}")]
    BadUpdate(#[from] ModelError),
    /// The evaluation counts are impossible.
    #[error("implausible evaluation counts")]
    BadEvaluation,
    /// A budget report that is not a number, or a negative one.
    #[error("implausible privacy budget report")]
    BadBudget,
    /// An update's weight is not in `(0, MAX_WEIGHT]`.
    #[error("update weight {0} outside (0, {max}]", max = super::MAX_WEIGHT)]
    BadWeight(f32),
    /// A plain update in a round that uses secure aggregation.
    #[error("plain update refused: this round uses secure aggregation")]
    PlainUpdate,
    /// A secure aggregation message that breaks that protocol.
    #[error("secure aggregation: {0}")]
    SecAgg(String),
}

#[derive(Debug)]
enum Phase {
    Idle,
    Training(Training),
    Evaluating(Evaluating),
    Finished,
}

#[derive(Debug)]
struct Training {
    round: RoundId,
    cohort: BTreeSet<SiteId>,
    pending: BTreeSet<SiteId>,
    /// Sites whose plain updates were summed (secure rounds learn this at the end).
    contributors: Vec<SiteId>,
    dropped: usize,
    sum: Vec<f64>,
    received: usize,
    loss_sum: f64,
    opened: Instant,
    deadline: Instant,
    bytes: u64,
    secagg: Option<Box<SecureRound>>,
    /// The round's privacy, its ε after it, and what its unmasked sum said.
    privacy: Option<(RoundPrivacy, f64, PrivateStats)>,
    /// What `sum` and `loss_sum` are divided by at the end: the summed update
    /// weights of a plain round, 1 once a secure sum is turned into a mean.
    weight_sum: f64,
    /// Set when the round audits a version instead of training.
    audit: Option<AuditRun>,
    /// Set when the round is the lineage's neighbour census.
    census: bool,
}

impl Training {
    /// A round asking `cohort`, with nothing received yet. A secure round's
    /// sum arrives whole from its secure aggregation `server`; a plain round
    /// sets `sum` to zeros of the model's length.
    fn new(
        round: RoundId,
        cohort: BTreeSet<SiteId>,
        server: Option<secagg::Server>,
        now: Instant,
        deadline: Instant,
    ) -> Self {
        Self {
            round,
            pending: cohort.clone(),
            cohort,
            contributors: Vec::new(),
            dropped: 0,
            sum: Vec::new(),
            received: 0,
            loss_sum: 0.0,
            opened: now,
            deadline,
            bytes: 0,
            secagg: server.map(|server| {
                Box::new(SecureRound {
                    phase: server.phase(),
                    server,
                    phase_started: now,
                    phases: Vec::new(),
                })
            }),
            privacy: None,
            weight_sum: 0.0,
            audit: None,
            census: false,
        }
    }
}

/// What a private round's unmasked sum says besides the mean update.
#[derive(Debug, Clone, Copy, Default)]
struct PrivateStats {
    units: f64,
    clipped_fraction: f64,
    update_norm: f64,
    noise_norm: f64,
}

/// What an audit round needs at its end.
#[derive(Debug)]
struct AuditRun {
    spec: AuditSpec,
    version: ModelVersion,
    /// Training had finished before the audit opened.
    finished: bool,
}

/// The secure aggregation server of a round, and its phase timing.
#[derive(Debug)]
struct SecureRound {
    server: secagg::Server,
    phase: &'static str,
    phase_started: Instant,
    phases: Vec<(&'static str, f64)>,
}

#[derive(Debug)]
struct Evaluating {
    summary: RoundSummary,
    opened: Instant,
    pending: BTreeSet<SiteId>,
    /// Each site's counts, summed in site order when the phase closes, so
    /// that the totals do not depend on the order reports arrived in.
    reported: BTreeMap<SiteId, EvalCounts>,
    deadline: Instant,
}

/// The coordinator's side of the round lifecycle.
#[derive(Debug)]
pub struct Coordinator {
    config: RoundConfig,
    model: Arc<GlobalModel>,
    spec_hash: SpecHash,
    connected: BTreeSet<SiteId>,
    phase: Phase,
    next_round: RoundId,
    first_round: RoundId,
    completed: u64,
    retry_at: Option<Instant>,
    gather_until: Option<Instant>,
    certs: std::collections::BTreeMap<SiteId, Vec<u8>>,
    spent: Accountant,
    /// The lineage's ledger has paid for the sites' prior release.
    prior_charged: bool,
    /// The lineage's neighbour census, once made.
    neighbours: Option<Arc<NeighbourRelease>>,
    /// Censuses abandoned so far; after [`CENSUS_ATTEMPTS`] training goes on without.
    census_attempts: u32,
    /// No new round opens while paused (an operator's stop, or outside the schedule).
    paused: bool,
    /// A rollback waiting for the current round to end: the version and its parameters.
    rollback: Option<(ModelVersion, Vec<f32>)>,
    /// The version sites serve, if any.
    released: Option<Arc<GlobalModel>>,
    /// The server optimizer's moments after the current version's step.
    optimizer: OptimizerState,
    /// The current version needs an audit before it can be released.
    audit_due: bool,
    /// Audits of the current version abandoned so far.
    audit_attempts: u32,
    transmits: VecDeque<Transmit>,
    events: VecDeque<CoordinatorEvent>,
}

impl Coordinator {
    /// Start from `model` (the latest stored version); the next round is `next_round`.
    pub fn new(config: RoundConfig, model: GlobalModel, next_round: RoundId) -> Self {
        let spec_hash = model.spec.hash();
        let model = Arc::new(model);
        Self {
            released: config.audit.is_none().then(|| model.clone()),
            config,
            model,
            spec_hash,
            connected: BTreeSet::new(),
            phase: Phase::Idle,
            next_round,
            first_round: next_round,
            completed: 0,
            retry_at: None,
            gather_until: None,
            certs: std::collections::BTreeMap::new(),
            spent: Accountant::default(),
            prior_charged: false,
            neighbours: None,
            census_attempts: 0,
            paused: false,
            rollback: None,
            optimizer: OptimizerState::default(),
            audit_due: false,
            audit_attempts: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The lineage's neighbour census, made before a restart (from durable state).
    pub fn with_neighbours(mut self, release: Option<NeighbourRelease>) -> Self {
        self.neighbours = release.map(Arc::new);
        self
    }

    /// Rounds of this lineage already run (from the durable privacy ledger).
    pub fn with_spent(mut self, steps: &[Step]) -> Self {
        for step in steps {
            self.spent.compose(step, 1);
        }
        self
    }

    /// Rounds of this lineage already completed (from durable state), counted
    /// against `max_rounds`.
    pub fn with_completed(mut self, completed: u64) -> Self {
        self.completed = completed;
        if self.config.max_rounds.is_some_and(|max| completed >= max) {
            self.phase = Phase::Finished;
        }
        self
    }

    /// The version sites serve (from durable state). Without an audit policy
    /// the current model is always served.
    /// `audited`: whether the current version has an audit already (a held
    /// version is not audited again at every restart).
    pub fn with_released(mut self, released: Option<GlobalModel>, audited: bool) -> Self {
        self.released = match &self.config.audit {
            None => Some(self.model.clone()),
            Some(_) => released.map(Arc::new),
        };
        // A restart after training finished audits an unaudited final version.
        self.audit_due = matches!(self.phase, Phase::Finished) && self.needs_audit() && !audited;
        self
    }

    /// Whether the lineage's durable ledger already paid for the sites'
    /// prior release.
    pub fn with_prior_charged(mut self, charged: bool) -> Self {
        self.prior_charged = charged;
        self
    }

    /// The server optimizer's moments as committed with the current version
    /// (from durable state).
    pub fn with_optimizer(mut self, state: OptimizerState) -> Self {
        self.optimizer = state;
        self
    }

    // ---- getters ----

    /// The server optimizer's moments after the current version's step: the
    /// driver commits them with the version ([`CoordinatorEvent::ModelCommitted`]).
    pub fn optimizer_state(&self) -> &OptimizerState {
        &self.optimizer
    }

    /// The version sites serve, if any.
    pub fn released(&self) -> Option<&Arc<GlobalModel>> {
        self.released.as_ref()
    }

    /// ε spent so far by this lineage, if privacy is on.
    pub fn epsilon_spent(&self) -> Option<f64> {
        let policy = self.config.privacy.as_ref()?;
        Some(self.spent.epsilon(policy.delta).epsilon)
    }

    /// The current global model.
    pub fn model(&self) -> &Arc<GlobalModel> {
        &self.model
    }

    /// Sites currently connected.
    pub fn connected(&self) -> impl Iterator<Item = &SiteId> {
        self.connected.iter()
    }

    /// The round in progress, if any.
    pub fn current_round(&self) -> Option<RoundId> {
        match &self.phase {
            Phase::Training(t) => Some(t.round),
            Phase::Evaluating(e) => Some(e.summary.round),
            Phase::Idle | Phase::Finished => None,
        }
    }

    /// The phase of the round in progress: a secure aggregation phase,
    /// `training` (plain rounds) or `evaluating`.
    pub fn phase(&self) -> Option<&'static str> {
        match &self.phase {
            Phase::Training(t) => Some(t.secagg.as_ref().map_or("training", |s| s.phase)),
            Phase::Evaluating(_) => Some("evaluating"),
            Phase::Idle | Phase::Finished => None,
        }
    }

    /// Whether `max_rounds` rounds have completed (or the budget is spent)
    /// and the last version's audit, if one is due, is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished) && !self.audit_due
    }

    /// Whether new rounds are held back.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    // ---- control ----

    /// Hold back new rounds (`true`) or let them open again. A round in
    /// progress is not interrupted.
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        self.paused = paused;
        self.try_open(now);
    }

    /// Make the parameters of the earlier version `from` current again, as a new
    /// version, once no round is in progress (at once if none is). A new version
    /// rather than the old number, so versions only grow and sites never see one twice.
    pub fn rollback(&mut self, from: ModelVersion, params: Vec<f32>, now: Instant) {
        self.rollback = Some((from, params));
        if matches!(self.phase, Phase::Finished) {
            self.apply_rollback();
        }
        self.try_open(now);
    }

    /// Serve `model` (an operator's release of a held version): sites are told at once.
    pub fn release(&mut self, model: GlobalModel) {
        let model = Arc::new(model);
        self.broadcast(self.release_message(&model));
        self.released = Some(model);
    }

    // ---- inputs ----

    /// A site finished its handshake with certificate `cert` (DER, verified by
    /// TLS; relayed to peers for secure aggregation); it gets the current model at once.
    pub fn handle_connected(&mut self, site: SiteId, cert: Vec<u8>, now: Instant) {
        self.connected.insert(site.clone());
        self.certs.insert(site.clone(), cert);
        self.send(
            site.clone(),
            Arc::new(CoordinatorMessage::Model(self.model.clone())),
        );
        if let Some(released) = &self.released {
            let message = self.release_message(released);
            self.send(site.clone(), Arc::new(message));
        }
        if let Some(neighbours) = &self.neighbours {
            let message = CoordinatorMessage::Neighbours(neighbours.clone());
            self.send(site, Arc::new(message));
        }
        self.try_open(now);
    }

    /// A site's connection ended.
    pub fn handle_disconnected(&mut self, site: &SiteId, now: Instant) {
        self.connected.remove(site);
        match &mut self.phase {
            Phase::Training(t) => {
                if let Some(secure) = &mut t.secagg {
                    secure.server.handle_dropped(site);
                } else if t.pending.remove(site) {
                    t.dropped += 1;
                }
            }
            Phase::Evaluating(e) => {
                e.pending.remove(site);
            }
            Phase::Idle | Phase::Finished => {}
        }
        self.advance(now);
    }

    /// A message from a verified site; `wire_len` is its size on the wire.
    pub fn handle_message(
        &mut self,
        site: &SiteId,
        message: SiteMessage,
        wire_len: usize,
        now: Instant,
    ) -> Result<(), Violation> {
        let result = match message {
            SiteMessage::Hello { .. } => Err(Violation::Unexpected("hello")),
            SiteMessage::Update(update) => self.on_update(site, update, wire_len),
            SiteMessage::Evaluation(report) => {
                self.on_evaluation(site, report.model_version, report.counts, wire_len)
            }
            SiteMessage::SecAgg { round, message } => {
                self.on_secagg(site, round, message, wire_len)
            }
            SiteMessage::Declined { round, reason } => {
                self.on_declined(site, round, reason);
                Ok(())
            }
            SiteMessage::Budget(budget) => {
                let plausible = budget.epsilon.is_finite()
                    && budget.epsilon >= 0.0
                    && budget.max_epsilon.is_finite()
                    && (0.0..1.0).contains(&budget.delta);
                if plausible {
                    self.events.push_back(CoordinatorEvent::SiteBudget {
                        site: site.clone(),
                        budget,
                    });
                    Ok(())
                } else {
                    Err(Violation::BadBudget)
                }
            }
        };
        self.advance(now);
        result
    }

    /// Time has reached or passed [`Self::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Training(t) if now >= t.deadline => match &mut t.secagg {
                Some(secure) => {
                    secure.server.close_phase();
                    self.drive_secagg(now);
                }
                None => self.close_training(now),
            },
            Phase::Evaluating(e) if now >= e.deadline => self.close_evaluation(now),
            _ => {}
        }
        if self.retry_at.is_some_and(|at| now >= at) {
            self.retry_at = None;
        }
        self.try_open(now);
    }

    // ---- outputs ----

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<CoordinatorEvent> {
        self.events.pop_front()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Training(t) => Some(t.deadline),
            Phase::Evaluating(e) => Some(e.deadline),
            Phase::Idle | Phase::Finished => None,
        };
        [phase, self.retry_at, self.gather_until]
            .into_iter()
            .flatten()
            .min()
    }

    // ---- internals ----

    /// Serve `model`: the parameters travel only when sites do not hold them
    /// as the current model.
    fn release_message(&self, model: &Arc<GlobalModel>) -> CoordinatorMessage {
        CoordinatorMessage::Release {
            version: model.version,
            model: (model.version != self.model.version).then(|| model.clone()),
        }
    }

    /// The training settings sent with a round, its scope resolved.
    fn round_settings(&self) -> TrainSettings {
        let mut settings = self.config.settings.clone();
        settings.scope = settings.scope.resolve(self.config.privacy.is_some());
        settings
    }

    /// The flat range of the parameters rounds train.
    fn trainable(&self) -> std::ops::Range<usize> {
        self.model.spec.trainable(self.round_settings().scope)
    }

    fn send(&mut self, to: SiteId, message: Arc<CoordinatorMessage>) {
        self.transmits.push_back(Transmit { to, message });
    }

    fn broadcast(&mut self, message: CoordinatorMessage) {
        let message = Arc::new(message);
        let sites: Vec<_> = self.connected.iter().cloned().collect();
        for site in sites {
            self.send(site, message.clone());
        }
    }

    fn on_update(
        &mut self,
        site: &SiteId,
        update: SiteUpdate,
        wire_len: usize,
    ) -> Result<(), Violation> {
        let version = self.model.version;
        let expected_len = self.trainable().len();
        let Phase::Training(t) = &mut self.phase else {
            return Ok(()); // a straggler after the round closed: ignore
        };
        if update.round != t.round {
            return Ok(());
        }
        if t.secagg.is_some() {
            return Err(Violation::PlainUpdate);
        }
        if !t.pending.contains(site) {
            return Err(Violation::UnexpectedUpdate(update.round));
        }
        if update.model_version != version {
            return Err(Violation::WrongVersion {
                got: update.model_version,
                expected: version,
            });
        }
        check_vector(&update.delta, expected_len)?;
        if !(update.weight > 0.0 && update.weight <= super::MAX_WEIGHT) {
            return Err(Violation::BadWeight(update.weight));
        }
        t.pending.remove(site);
        t.contributors.push(site.clone());
        let weight = f64::from(update.weight);
        for (acc, v) in t.sum.iter_mut().zip(&update.delta) {
            *acc += weight * f64::from(*v);
        }
        t.received += 1;
        t.weight_sum += weight;
        t.loss_sum += if update.train_loss.is_finite() {
            weight * f64::from(update.train_loss)
        } else {
            0.0
        };
        t.bytes += wire_len as u64;
        Ok(())
    }

    fn on_evaluation(
        &mut self,
        site: &SiteId,
        version: ModelVersion,
        counts: EvalCounts,
        wire_len: usize,
    ) -> Result<(), Violation> {
        if !counts.is_plausible() {
            return Err(Violation::BadEvaluation);
        }
        let Phase::Evaluating(e) = &mut self.phase else {
            return Ok(());
        };
        if version != e.summary.model_version || e.reported.contains_key(site) {
            return Ok(());
        }
        e.pending.remove(site);
        e.reported.insert(site.clone(), counts);
        e.summary.bytes_received += wire_len as u64;
        Ok(())
    }

    fn on_secagg(
        &mut self,
        site: &SiteId,
        round: RoundId,
        message: secagg::ClientMessage,
        wire_len: usize,
    ) -> Result<(), Violation> {
        let Phase::Training(t) = &mut self.phase else {
            return Ok(());
        };
        if t.round != round {
            return Ok(());
        }
        let Some(secure) = &mut t.secagg else {
            return Err(Violation::Unexpected("secure aggregation message"));
        };
        t.bytes += wire_len as u64;
        secure
            .server
            .handle_message(site, message)
            .map_err(|e| Violation::SecAgg(e.to_string()))
    }

    fn on_declined(&mut self, site: &SiteId, round: RoundId, reason: String) {
        let Phase::Training(t) = &mut self.phase else {
            return;
        };
        if t.round != round {
            return;
        }
        let was_asked = match &mut t.secagg {
            Some(secure) => {
                let pending = secure.server.pending().any(|s| s == site);
                secure.server.handle_dropped(site);
                pending
            }
            None if t.pending.remove(site) => {
                t.dropped += 1;
                true
            }
            None => false,
        };
        if was_asked {
            self.events.push_back(CoordinatorEvent::SiteDeclined {
                site: site.clone(),
                round,
                reason,
            });
        }
    }

    /// Relay what the secure aggregation server emits, time its phases, and
    /// finish the round when it has an outcome.
    fn drive_secagg(&mut self, now: Instant) {
        let Phase::Training(t) = &mut self.phase else {
            return;
        };
        let Some(secure) = &mut t.secagg else {
            return;
        };
        let round = t.round;
        while let Some((to, message)) = secure.server.poll_transmit() {
            let message = Arc::new(CoordinatorMessage::SecAgg { round, message });
            self.transmits.push_back(Transmit { to, message });
        }
        if secure.server.phase() != secure.phase {
            let spent = now
                .saturating_duration_since(secure.phase_started)
                .as_secs_f64();
            secure.phases.push((secure.phase, spent));
            secure.phase = secure.server.phase();
            secure.phase_started = now;
            t.deadline = now
                + if secure.server.awaits_input() {
                    self.config.train_timeout
                } else {
                    self.config.secagg_phase_timeout
                };
        }
        let outcome = secure.server.poll_outcome();
        if outcome.is_some() {
            for (site, reason) in secure.server.faults() {
                self.events.push_back(CoordinatorEvent::SiteMisbehaved {
                    site: site.clone(),
                    round,
                    reason: reason.clone(),
                });
            }
        }
        match outcome {
            Some(Outcome::Completed { sum, contributors }) if t.audit.is_some() => {
                let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Idle) else {
                    return;
                };
                self.close_audit(t, sum, contributors.len());
            }
            Some(Outcome::Completed { sum, .. }) if t.census => {
                let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Idle) else {
                    return;
                };
                self.close_census(t, sum);
            }
            Some(Outcome::Completed { sum, contributors }) => {
                t.received = contributors.len();
                t.dropped = t.cohort.len() - contributors.len();
                t.contributors = contributors;
                if let Some((privacy, _, stats)) = &mut t.privacy {
                    // The average is over the noisy number of customers; no loss is revealed.
                    let private = privacy.mean_update(sum);
                    let threshold = secure.server.threshold();
                    *stats = PrivateStats {
                        units: private.count,
                        clipped_fraction: private.clipped_fraction(),
                        update_norm: private.mean.iter().map(|v| v * v).sum::<f64>().sqrt(),
                        noise_norm: privacy.noise_sd_of_mean(threshold, private.count)
                            * (private.mean.len() as f64).sqrt(),
                    };
                    if let Some(policy) = &self.config.privacy {
                        self.optimizer.clip_norm =
                            Some(policy.next_clip(privacy.clip_norm, private.clipped_fraction()));
                    }
                    t.sum = private.mean;
                    t.loss_sum = f64::NAN;
                } else {
                    let (delta, loss) = split_aggregate(sum, self.config.settings.clip_norm);
                    t.sum = delta;
                    t.loss_sum = loss;
                }
                t.weight_sum = 1.0;
                self.close_training(now);
            }
            Some(Outcome::Aborted { reason }) => {
                let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Idle) else {
                    return;
                };
                let reason = format!("secure aggregation aborted: {reason}");
                match t.audit {
                    Some(audit) => self.abandon_audit(t.round, audit, reason, true, now),
                    None if t.census => self.abandon_census(t.round, reason, now),
                    None => self.abandon(t.round, 0, reason, now),
                }
            }
            _ => {}
        }
    }

    /// The secure aggregation setup for a cohort, and its privacy, checked.
    fn secagg_setup(
        &self,
        round: RoundId,
        cohort: &BTreeSet<SiteId>,
    ) -> Result<(Setup, Option<RoundPrivacy>), String> {
        let n = cohort.len();
        let threshold = self
            .config
            .threshold
            .unwrap_or_else(|| Setup::default_threshold(n));
        // The trained parameters, then the unit count (private) or the loss
        // and the weight (plain).
        let length = self.trainable().len() + extra_coordinates(self.config.privacy.is_some());
        let (encoding, privacy) = match &self.config.privacy {
            Some(p) => {
                let lineage = &p.lineage;
                let (privacy, encoding) = RoundPrivacy::plan(
                    lineage,
                    p.unit,
                    p.unit.sampling_rate(p.sampling_rate),
                    p.noise_multiplier,
                    self.optimizer.clip_norm.unwrap_or(p.clip_norm),
                    p.delta,
                    length,
                    n,
                    threshold,
                    self.config.modulus_bits,
                )
                .map_err(|e| format!("round {round}: {e}"))?;
                let privacy = RoundPrivacy {
                    prior_noise_multiplier: p.prior_noise_multiplier,
                    ..privacy
                };
                (encoding, Some(privacy))
            }
            None => {
                let settings = &self.config.settings;
                // Clipped coordinates are within the clip norm, noise adds at
                // most a few standard deviations, and the weight multiplies both.
                let bound = (settings.clip_norm + 6.0 * settings.noise_std) * super::MAX_WEIGHT;
                let encoding =
                    Encoding::new(self.config.modulus_bits, bound, n).map_err(|e| e.to_string())?;
                (encoding, None)
            }
        };
        let setup = Setup {
            cohort: cohort.iter().cloned().collect(),
            threshold,
            encoding,
            length,
        };
        setup.check().map_err(|e| e.to_string())?;
        Ok((setup, privacy))
    }

    /// The secure aggregation server for `task`, bound to the digest of the
    /// task that the cohort's sites sign.
    fn secagg_server(&self, task: &RoundTask, setup: &Setup) -> Result<secagg::Server, String> {
        let certs = setup
            .cohort
            .iter()
            .map(|s| (s.clone(), self.certs.get(s).cloned().unwrap_or_default()))
            .collect();
        let context = task.digest().map_err(|e| e.to_string())?;
        secagg::Server::new(task.round, setup.clone(), &context, certs).map_err(|e| e.to_string())
    }

    /// Charge a private round to the budget, or stop training if it does not fit.
    /// Returns ε after the round, or `None` when the budget is spent.
    fn charge(&mut self, round: RoundId, setup: &Setup, privacy: &RoundPrivacy) -> Option<f64> {
        let policy = self.config.privacy.as_ref()?;
        let step = privacy.step(setup.cohort.len(), setup.threshold, setup.length);
        let prior = policy.prior_step().filter(|_| !self.prior_charged);
        let with_prior = match &prior {
            Some(prior) => self.spent.after(prior, 1),
            None => self.spent.clone(),
        };
        let spent = self.spent.epsilon(policy.delta).epsilon;
        let next = with_prior.after(&step, 1).epsilon(policy.delta).epsilon;
        // Keep room for auditing the last version: the audit adds at least
        // this much noise (the sites round its variance up).
        let reserve = self
            .config
            .audit
            .as_ref()
            .map(|a| Step::gaussian(1.0, a.noise_multiplier));
        let next_with_audit = match &reserve {
            Some(audit) => {
                with_prior
                    .after(&step, 1)
                    .after(audit, 1)
                    .epsilon(policy.delta)
                    .epsilon
            }
            None => next,
        };
        let next = if next_with_audit > policy.target_epsilon {
            next_with_audit
        } else {
            next
        };
        if next > policy.target_epsilon {
            self.events.push_back(CoordinatorEvent::BudgetExhausted {
                spent,
                next,
                target: policy.target_epsilon,
            });
            self.phase = Phase::Finished;
            if self.needs_audit() {
                // The last version is audited first; the audit has its own reserve.
                self.audit_due = true;
            } else {
                self.events.push_back(CoordinatorEvent::TrainingFinished);
            }
            return None;
        }
        self.spent = with_prior.after(&step, 1);
        self.prior_charged |= prior.is_some();
        self.events.push_back(CoordinatorEvent::PrivacySpent {
            round,
            step,
            prior,
            epsilon: next,
        });
        Some(next)
    }

    fn abandon(&mut self, round: RoundId, received: usize, reason: String, now: Instant) {
        self.broadcast(CoordinatorMessage::RoundAbandoned {
            round,
            reason: reason.clone(),
        });
        self.events.push_back(CoordinatorEvent::RoundAbandoned {
            round,
            received,
            reason,
        });
        self.retry_at = Some(now + self.config.retry_delay);
    }

    /// Close a phase early once nobody is left to wait for.
    fn advance(&mut self, now: Instant) {
        match &self.phase {
            Phase::Training(t) if t.secagg.is_some() => self.drive_secagg(now),
            Phase::Training(t) if t.pending.is_empty() => self.close_training(now),
            Phase::Evaluating(e) if e.pending.is_empty() => self.close_evaluation(now),
            _ => {}
        }
        self.try_open(now);
    }

    fn apply_rollback(&mut self) {
        let Some((from, params)) = self.rollback.take() else {
            return;
        };
        let model = Arc::new(GlobalModel {
            version: self.model.version.next(),
            spec: self.model.spec.clone(),
            params,
        });
        self.model = model.clone();
        self.audit_attempts = 0;
        // Momentum from the abandoned line of versions does not carry over.
        self.optimizer = OptimizerState::default();
        self.events.push_back(CoordinatorEvent::ModelRolledBack {
            from,
            model: model.clone(),
        });
        self.broadcast(CoordinatorMessage::Model(model.clone()));
        match self.config.audit {
            None => self.release(GlobalModel::clone(&model)),
            Some(_) => self.audit_due = true,
        }
    }

    fn try_open(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle) {
            self.apply_rollback();
        }
        if self.paused {
            return;
        }
        if self.connected.len() < self.config.min_sites.max(1) {
            self.gather_until = None;
            return;
        }
        if self.audit_due
            && matches!(self.phase, Phase::Idle | Phase::Finished)
            && self.retry_at.is_none()
        {
            self.open_audit(now);
            return;
        }
        if !matches!(self.phase, Phase::Idle) || self.retry_at.is_some() {
            return;
        }
        // Before the first round, give sites that start together time to connect.
        if self.next_round == self.first_round {
            let gather_until = *self
                .gather_until
                .get_or_insert(now + self.config.cohort_wait);
            if now < gather_until {
                return;
            }
            self.gather_until = None;
        }
        if self.census_due() {
            return self.open_census(now);
        }
        let round = self.next_round;
        let cohort = match self.config.cohort_size {
            Some(size) => cohort(&self.connected, size, self.config.cohort_seed, round),
            None => self.connected.clone(),
        };
        let (setup, privacy) = if self.config.secure_aggregation {
            match self.secagg_setup(round, &cohort) {
                Ok((setup, privacy)) => (Some(setup), privacy),
                Err(reason) => {
                    self.next_round = round.next();
                    let reason = format!("cannot open a secure round: {reason}");
                    return self.abandon(round, 0, reason, now);
                }
            }
        } else {
            (None, None)
        };
        let task = RoundTask {
            round,
            model_version: self.model.version,
            spec_hash: self.spec_hash,
            settings: self.round_settings(),
            secagg: setup.clone(),
            privacy: privacy.clone(),
            audit: None,
            census: None,
        };
        let server = match &setup {
            Some(setup) => match self.secagg_server(&task, setup) {
                Ok(server) => Some(server),
                Err(reason) => {
                    self.next_round = round.next();
                    let reason = format!("cannot open a secure round: {reason}");
                    return self.abandon(round, 0, reason, now);
                }
            },
            None => None,
        };
        let privacy = match (privacy, &setup) {
            (Some(p), Some(setup)) => match self.charge(round, setup, &p) {
                Some(epsilon) => Some((p, epsilon)),
                // The budget is spent: audit the last version if it is due.
                None => return self.try_open(now),
            },
            _ => None,
        };
        self.next_round = round.next();
        let task = CoordinatorMessage::RoundOpen(Box::new(task));
        let task = Arc::new(task);
        for site in &cohort {
            self.send(site.clone(), task.clone());
        }
        self.events.push_back(CoordinatorEvent::RoundOpened {
            round,
            model_version: self.model.version,
            cohort: cohort.iter().cloned().collect(),
            secure: server.is_some(),
        });
        let timeout = if server.is_some() {
            self.config.secagg_phase_timeout
        } else {
            self.config.train_timeout
        };
        let mut training = Training::new(round, cohort, server, now, now + timeout);
        if training.secagg.is_none() {
            training.sum = vec![0.0; self.trainable().len()];
        }
        training.privacy = privacy.map(|(p, epsilon)| (p, epsilon, PrivateStats::default()));
        self.phase = Phase::Training(training);
        self.drive_secagg(now);
    }

    fn close_training(&mut self, now: Instant) {
        let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let dropped = if t.secagg.is_some() {
            t.dropped
        } else {
            t.dropped + t.pending.len()
        };
        if t.received < self.config.min_sites.max(1) {
            let reason = format!(
                "{} of the {} updates needed arrived",
                t.received, self.config.min_sites
            );
            self.abandon(t.round, t.received, reason, now);
            return;
        }
        let (secure_aggregation, phase_seconds) = match t.secagg {
            Some(secure) => (true, secure.phases),
            None => (false, Vec::new()),
        };
        // A secure sum is already a mean (over the noisy number of customers,
        // or the summed weights); a plain one is divided by its weights here.
        let divisor = if t.weight_sum > 0.0 {
            t.weight_sum
        } else {
            1.0
        };
        let mean: Vec<f64> = t.sum.iter().map(|s| s / divisor).collect();
        let mut params = self.model.params.clone();
        let range = self.trainable();
        self.config
            .server_optimizer
            .step(&mut self.optimizer, &mut params[range], &mean);
        let model = Arc::new(GlobalModel {
            version: self.model.version.next(),
            spec: self.model.spec.clone(),
            params,
        });
        self.model = model.clone();
        self.events
            .push_back(CoordinatorEvent::ModelCommitted(model.clone()));
        self.broadcast(CoordinatorMessage::Model(model.clone()));
        self.audit_attempts = 0;
        if self.config.audit.is_none() {
            self.release(GlobalModel::clone(&model));
        }
        self.phase = Phase::Evaluating(Evaluating {
            summary: RoundSummary {
                round: t.round,
                model_version: model.version,
                participants: t.received,
                cohort: t.cohort.into_iter().collect(),
                contributors: t.contributors,
                dropped,
                train_loss: t.loss_sum / divisor,
                eval: EvalCounts::default(),
                eval_sites: 0,
                duration: Duration::ZERO,
                bytes_received: t.bytes,
                secure_aggregation,
                phase_seconds,
                privacy: t.privacy.map(|(p, epsilon, stats)| PrivacySummary {
                    epsilon,
                    delta: p.delta,
                    noise_multiplier: p.noise_multiplier,
                    sampling_rate: p.sampling_rate,
                    clip_norm: p.clip_norm,
                    units: stats.units,
                    clipped_fraction: stats.clipped_fraction,
                    update_norm: stats.update_norm,
                    noise_norm: stats.noise_norm,
                    next_clip_norm: self.optimizer.clip_norm.unwrap_or(p.clip_norm),
                }),
            },
            opened: t.opened,
            pending: self.connected.clone(),
            reported: BTreeMap::new(),
            deadline: now + self.config.eval_timeout,
        });
    }

    fn close_evaluation(&mut self, now: Instant) {
        let Phase::Evaluating(mut e) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        e.summary.duration = now.saturating_duration_since(e.opened);
        for counts in e.reported.values() {
            e.summary.eval.add(counts);
        }
        e.summary.eval_sites = e.reported.len();
        self.events
            .push_back(CoordinatorEvent::RoundCompleted(Box::new(e.summary)));
        self.completed += 1;
        let every = self.config.audit.as_ref().map_or(0, |a| a.every_rounds);
        if every > 0 && self.completed.is_multiple_of(every) {
            self.audit_due = true;
        }
        if self
            .config
            .max_rounds
            .is_some_and(|max| self.completed >= max)
        {
            self.phase = Phase::Finished;
            if self.needs_audit() {
                self.audit_due = true;
            } else {
                self.events.push_back(CoordinatorEvent::TrainingFinished);
            }
        }
    }

    /// Whether the current version still has to pass an audit to be served.
    fn needs_audit(&self) -> bool {
        self.config.audit.is_some()
            && self.released.as_ref().map(|m| m.version) != Some(self.model.version)
    }

    /// The audit's spec, secure aggregation and privacy.
    fn audit_setup(
        &self,
        policy: &AuditPolicy,
        round: RoundId,
    ) -> Result<(AuditSpec, Setup, RoundPrivacy), String> {
        let spec =
            AuditSpec::new(&policy.attributes, &self.model.spec.menu).map_err(|e| e.to_string())?;
        let delta = self
            .config
            .privacy
            .as_ref()
            .map_or(policy.delta, |p| p.delta);
        let sum = PrivateSum {
            lineage: &policy.lineage,
            noise_multiplier: policy.noise_multiplier,
            clip_norm: spec.clip_norm(),
            delta,
            length: spec.length(),
        };
        let (setup, privacy) = self.private_sum_setup(round, &sum)?;
        Ok((spec, setup, privacy))
    }

    /// Secure aggregation and privacy for a round that sums every customer's
    /// bounded vector (an audit or a census): with every connected site, or
    /// a cohort drawn as for training when `cohort_size` is set (secure
    /// aggregation's cost grows with the square of the cohort).
    fn private_sum_setup(
        &self,
        round: RoundId,
        sum: &PrivateSum,
    ) -> Result<(Setup, RoundPrivacy), String> {
        let cohort: Vec<SiteId> = match self.config.cohort_size {
            Some(size) => cohort(&self.connected, size, self.config.cohort_seed, round),
            None => self.connected.clone(),
        }
        .into_iter()
        .collect();
        let n = cohort.len();
        let threshold = self
            .config
            .threshold
            .unwrap_or_else(|| Setup::default_threshold(n))
            .min(n);
        let (privacy, encoding) = RoundPrivacy::plan(
            sum.lineage,
            PrivacyUnit::Customer,
            1.0,
            sum.noise_multiplier,
            sum.clip_norm,
            sum.delta,
            sum.length,
            n,
            threshold,
            self.config.modulus_bits,
        )
        .map_err(|e| e.to_string())?;
        let setup = Setup {
            cohort,
            threshold,
            encoding,
            length: sum.length,
        };
        setup.check().map_err(|e| e.to_string())?;
        Ok((setup, privacy))
    }

    /// Open a fairness audit of the current version with every connected site.
    fn open_audit(&mut self, now: Instant) {
        let Some(policy) = self.config.audit.clone() else {
            self.audit_due = false;
            return;
        };
        let round = self.next_round;
        self.next_round = round.next();
        let finished = matches!(self.phase, Phase::Finished);
        let run = AuditRun {
            spec: AuditSpec {
                attributes: Vec::new(),
                categories: Vec::new(),
            },
            version: self.model.version,
            finished,
        };
        let (spec, setup, privacy) = match self.audit_setup(&policy, round) {
            Ok(parts) => parts,
            Err(reason) => return self.abandon_audit(round, run, reason, true, now),
        };
        let step = privacy.step(setup.cohort.len(), setup.threshold, setup.length);
        let epsilon = self.spent.after(&step, 1).epsilon(privacy.delta).epsilon;
        if let Some(p) = &self.config.privacy
            && epsilon > p.target_epsilon
        {
            let reason = format!(
                "the audit would take ε to {epsilon:.3}, above the target {}",
                p.target_epsilon
            );
            return self.abandon_audit(round, run, reason, false, now);
        }
        let task = RoundTask {
            round,
            model_version: self.model.version,
            spec_hash: self.spec_hash,
            settings: self.config.settings.clone(),
            secagg: Some(setup.clone()),
            privacy: Some(privacy.clone()),
            audit: Some(spec.clone()),
            census: None,
        };
        let server = match self.secagg_server(&task, &setup) {
            Ok(server) => server,
            Err(e) => return self.abandon_audit(round, run, e, true, now),
        };
        let mut training = self.start_private_sum(task, server, step, epsilon, now);
        self.events.push_back(CoordinatorEvent::AuditOpened {
            round,
            model_version: self.model.version,
            cohort: setup.cohort,
        });
        self.audit_due = false;
        training.audit = Some(AuditRun { spec, ..run });
        self.phase = Phase::Training(training);
        self.drive_secagg(now);
    }

    /// Charge a round that sums per-customer vectors (an audit or a census)
    /// and send `task` to its cohort; the cost is recorded before anything is
    /// sent. The caller marks what the returned round is for.
    fn start_private_sum(
        &mut self,
        task: RoundTask,
        server: secagg::Server,
        step: Step,
        epsilon: f64,
        now: Instant,
    ) -> Training {
        let round = task.round;
        self.spent.compose(&step, 1);
        self.events.push_back(CoordinatorEvent::PrivacySpent {
            round,
            step,
            prior: None,
            epsilon,
        });
        let cohort: BTreeSet<SiteId> = task
            .secagg
            .iter()
            .flat_map(|setup| setup.cohort.iter().cloned())
            .collect();
        let privacy = task.privacy.clone();
        let task = Arc::new(CoordinatorMessage::RoundOpen(Box::new(task)));
        for site in &cohort {
            self.send(site.clone(), task.clone());
        }
        let deadline = now + self.config.secagg_phase_timeout;
        let mut training = Training::new(round, cohort, Some(server), now, deadline);
        training.privacy = privacy.map(|p| (p, epsilon, PrivateStats::default()));
        training
    }

    /// Turn an audit's unmasked sum into its report, and release the version if it passes.
    fn close_audit(&mut self, t: Training, sum: Vec<f64>, sites: usize) {
        let (Some(audit), Some((privacy, epsilon, _)), Some(policy)) =
            (t.audit, t.privacy, self.config.audit.clone())
        else {
            return;
        };
        // Every surviving site added its share of the noise.
        let noise_std = (sites as f64 * privacy.local_variance.ceil()).sqrt() / privacy.scale;
        let report = FairnessReport::from_sums(
            audit.version.0,
            &audit.spec,
            &sum,
            noise_std,
            policy.min_group_size,
            sites,
        );
        let outcome = match report {
            Ok(report) => {
                let failures = policy.gate.failures(&report);
                if failures.is_empty() && audit.version == self.model.version {
                    self.release(GlobalModel::clone(&self.model));
                }
                AuditOutcome {
                    round: t.round,
                    report,
                    failures,
                    epsilon,
                    delta: privacy.delta,
                }
            }
            Err(e) => {
                self.events.push_back(CoordinatorEvent::AuditAbandoned {
                    round: t.round,
                    model_version: audit.version,
                    reason: e.to_string(),
                });
                return self.after_audit(audit.finished);
            }
        };
        self.audit_attempts = 0;
        self.events
            .push_back(CoordinatorEvent::AuditCompleted(Box::new(outcome)));
        self.after_audit(audit.finished);
    }

    /// End an audit without figures; it is tried again (up to three times in
    /// all) when `retry` and the version is still current.
    fn abandon_audit(
        &mut self,
        round: RoundId,
        audit: AuditRun,
        reason: String,
        retry: bool,
        now: Instant,
    ) {
        const ATTEMPTS: u32 = 3;
        self.broadcast(CoordinatorMessage::RoundAbandoned {
            round,
            reason: reason.clone(),
        });
        self.audit_attempts += 1;
        self.audit_due = retry && self.audit_attempts < ATTEMPTS;
        self.events.push_back(CoordinatorEvent::AuditAbandoned {
            round,
            model_version: audit.version,
            reason,
        });
        self.retry_at = Some(now + self.config.retry_delay);
        self.after_audit(audit.finished);
    }

    /// Back to where training was; a final version's audit ends the training.
    fn after_audit(&mut self, finished: bool) {
        if finished {
            self.phase = Phase::Finished;
            if !self.audit_due {
                self.events.push_back(CoordinatorEvent::TrainingFinished);
            }
        } else {
            self.phase = Phase::Idle;
        }
    }
    /// Whether the next round is the lineage's neighbour census: a private
    /// lineage that asks for one and has none yet.
    fn census_due(&self) -> bool {
        self.config
            .privacy
            .as_ref()
            .is_some_and(|p| p.neighbour_noise_multiplier > 0.0)
            && self.config.secure_aggregation
            && self.neighbours.is_none()
            && self.census_attempts < CENSUS_ATTEMPTS
    }

    /// Open the neighbour census with every connected site (or a drawn
    /// cohort), charged to the lineage like a round. When it would take ε
    /// above the target, training goes on without it.
    fn open_census(&mut self, now: Instant) {
        let Some(policy) = self.config.privacy.clone() else {
            return;
        };
        let round = self.next_round;
        let census = NeighbourCensus {
            menu_len: self.model.spec.menu.len() as u32,
        };
        let sum = PrivateSum {
            lineage: &policy.lineage,
            noise_multiplier: policy.neighbour_noise_multiplier,
            clip_norm: 1.0,
            delta: policy.delta,
            length: census.length(),
        };
        let (setup, privacy) = match self.private_sum_setup(round, &sum) {
            Ok(parts) => parts,
            Err(reason) => {
                self.next_round = round.next();
                return self.abandon_census(
                    round,
                    format!("cannot open the census: {reason}"),
                    now,
                );
            }
        };
        let step = privacy.step(setup.cohort.len(), setup.threshold, setup.length);
        let epsilon = self.spent.after(&step, 1).epsilon(policy.delta).epsilon;
        if epsilon > policy.target_epsilon {
            self.census_attempts = CENSUS_ATTEMPTS;
            return self.try_open(now);
        }
        self.next_round = round.next();
        let task = RoundTask {
            round,
            model_version: self.model.version,
            spec_hash: self.spec_hash,
            settings: self.round_settings(),
            secagg: Some(setup.clone()),
            privacy: Some(privacy.clone()),
            audit: None,
            census: Some(census),
        };
        let server = match self.secagg_server(&task, &setup) {
            Ok(server) => server,
            Err(reason) => return self.abandon_census(round, reason, now),
        };
        let mut training = self.start_private_sum(task, server, step, epsilon, now);
        self.events.push_back(CoordinatorEvent::CensusOpened {
            round,
            cohort: setup.cohort,
        });
        training.census = true;
        self.phase = Phase::Training(training);
        self.drive_secagg(now);
    }

    /// Release the census's unmasked sum to every site.
    fn close_census(&mut self, t: Training, sum: Vec<f64>) {
        let Some((privacy, ..)) = t.privacy else {
            return;
        };
        let release = Arc::new(NeighbourRelease {
            lineage: privacy.lineage,
            round: t.round,
            pairs: sum.iter().map(|&v| v as f32).collect(),
        });
        self.neighbours = Some(release.clone());
        self.events
            .push_back(CoordinatorEvent::NeighboursReleased(release.clone()));
        self.broadcast(CoordinatorMessage::Neighbours(release));
    }

    /// End a census without a release; it is tried again until
    /// [`CENSUS_ATTEMPTS`], then training goes on without one.
    fn abandon_census(&mut self, round: RoundId, reason: String, now: Instant) {
        self.census_attempts += 1;
        self.abandon(round, 0, reason, now);
    }
}

/// What a round that sums per-customer vectors needs planned.
struct PrivateSum<'a> {
    lineage: &'a str,
    noise_multiplier: f64,
    clip_norm: f32,
    delta: f64,
    length: usize,
}

/// The cohort of `round`: the `size` connected sites whose SHA-256 of
/// (`seed`, round, site) is smallest, a uniform draw that anyone holding the
/// seed can recompute; every site when `size` covers them all.
pub fn cohort(
    connected: &BTreeSet<SiteId>,
    size: usize,
    seed: u64,
    round: RoundId,
) -> BTreeSet<SiteId> {
    use sha2::{Digest, Sha256};
    let mut ranked: Vec<([u8; 32], &SiteId)> = connected
        .iter()
        .map(|site| {
            let mut hash = Sha256::new();
            hash.update(b"potluck-cohort-v1");
            hash.update(seed.to_be_bytes());
            hash.update(round.0.to_be_bytes());
            hash.update(site.as_str().as_bytes());
            (hash.finalize().into(), site)
        })
        .collect();
    ranked.sort();
    ranked
        .into_iter()
        .take(size.max(1))
        .map(|(_, site)| site.clone())
        .collect()
}
