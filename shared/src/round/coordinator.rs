use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::{ModelVersion, RoundId, SiteId};
use crate::model::{GlobalModel, ModelError, SpecHash, check_vector};
use crate::wire::{
    CoordinatorMessage, EvalCounts, RoundTask, SiteMessage, SiteUpdate, TrainSettings,
};

/// Settings of the round lifecycle.
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Updates needed for a round to produce a model; also the sites needed to open one.
    pub min_sites: usize,
    /// Stop after this many completed rounds (`None`: train until stopped).
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
    /// Step size applied to the averaged update.
    pub server_learning_rate: f32,
    /// Local training and privacy settings sent with each round.
    pub settings: TrainSettings,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            min_sites: 3,
            max_rounds: None,
            train_timeout: Duration::from_secs(120),
            eval_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_secs(5),
            cohort_wait: Duration::from_secs(2),
            server_learning_rate: 1.0,
            settings: TrainSettings::default(),
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
    },
    /// A new model version exists; persist it before sending anything.
    ModelCommitted(Arc<GlobalModel>),
    /// A round finished with a new model, evaluated.
    RoundCompleted(RoundSummary),
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
    /// `max_rounds` rounds have completed; no more will open.
    TrainingFinished,
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
    pending: BTreeSet<SiteId>,
    dropped: usize,
    sum: Vec<f64>,
    received: usize,
    loss_sum: f64,
    opened: Instant,
    deadline: Instant,
    bytes: u64,
}

#[derive(Debug)]
struct Evaluating {
    summary: RoundSummary,
    opened: Instant,
    pending: BTreeSet<SiteId>,
    reported: BTreeSet<SiteId>,
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
    transmits: VecDeque<Transmit>,
    events: VecDeque<CoordinatorEvent>,
}

impl Coordinator {
    /// Start from `model` (the latest stored version); the next round is `next_round`.
    pub fn new(config: RoundConfig, model: GlobalModel, next_round: RoundId) -> Self {
        let spec_hash = model.spec.hash();
        Self {
            config,
            model: Arc::new(model),
            spec_hash,
            connected: BTreeSet::new(),
            phase: Phase::Idle,
            next_round,
            first_round: next_round,
            completed: 0,
            retry_at: None,
            gather_until: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // ---- getters ----

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

    /// Whether `max_rounds` rounds have completed.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    // ---- inputs ----

    /// A site finished its handshake; it gets the current model at once.
    pub fn handle_connected(&mut self, site: SiteId, now: Instant) {
        self.connected.insert(site.clone());
        self.send(
            site,
            Arc::new(CoordinatorMessage::Model(self.model.clone())),
        );
        self.try_open(now);
    }

    /// A site's connection ended.
    pub fn handle_disconnected(&mut self, site: &SiteId, now: Instant) {
        self.connected.remove(site);
        match &mut self.phase {
            Phase::Training(t) => {
                if t.pending.remove(site) {
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
            SiteMessage::Declined { round, reason } => {
                self.on_declined(site, round, reason);
                Ok(())
            }
        };
        self.advance(now);
        result
    }

    /// Time has reached or passed [`Self::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Training(t) if now >= t.deadline => self.close_training(now),
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
        let expected_len = self.model.params.len();
        let Phase::Training(t) = &mut self.phase else {
            return Ok(()); // a straggler after the round closed: ignore
        };
        if update.round != t.round {
            return Ok(());
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
        t.pending.remove(site);
        for (acc, v) in t.sum.iter_mut().zip(&update.delta) {
            *acc += f64::from(*v);
        }
        t.received += 1;
        t.loss_sum += if update.train_loss.is_finite() {
            f64::from(update.train_loss)
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
        if version != e.summary.model_version || !e.reported.insert(site.clone()) {
            return Ok(());
        }
        e.pending.remove(site);
        e.summary.eval.add(&counts);
        e.summary.eval_sites += 1;
        e.summary.bytes_received += wire_len as u64;
        Ok(())
    }

    fn on_declined(&mut self, site: &SiteId, round: RoundId, reason: String) {
        if let Phase::Training(t) = &mut self.phase
            && t.round == round
            && t.pending.remove(site)
        {
            t.dropped += 1;
            self.events.push_back(CoordinatorEvent::SiteDeclined {
                site: site.clone(),
                round,
                reason,
            });
        }
    }

    /// Close a phase early once nobody is left to wait for.
    fn advance(&mut self, now: Instant) {
        match &self.phase {
            Phase::Training(t) if t.pending.is_empty() => self.close_training(now),
            Phase::Evaluating(e) if e.pending.is_empty() => self.close_evaluation(now),
            _ => {}
        }
        self.try_open(now);
    }

    fn try_open(&mut self, now: Instant) {
        if self.connected.len() < self.config.min_sites.max(1) {
            self.gather_until = None;
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
        let round = self.next_round;
        self.next_round = round.next();
        let cohort: BTreeSet<SiteId> = self.connected.clone();
        let task = CoordinatorMessage::RoundOpen(RoundTask {
            round,
            model_version: self.model.version,
            spec_hash: self.spec_hash,
            settings: self.config.settings.clone(),
        });
        let task = Arc::new(task);
        for site in &cohort {
            self.send(site.clone(), task.clone());
        }
        self.events.push_back(CoordinatorEvent::RoundOpened {
            round,
            model_version: self.model.version,
            cohort: cohort.iter().cloned().collect(),
        });
        self.phase = Phase::Training(Training {
            round,
            pending: cohort,
            dropped: 0,
            sum: vec![0.0; self.model.params.len()],
            received: 0,
            loss_sum: 0.0,
            opened: now,
            deadline: now + self.config.train_timeout,
            bytes: 0,
        });
    }

    fn close_training(&mut self, now: Instant) {
        let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let dropped = t.dropped + t.pending.len();
        if t.received < self.config.min_sites.max(1) {
            let reason = format!(
                "{} of the {} updates needed arrived",
                t.received, self.config.min_sites
            );
            self.broadcast(CoordinatorMessage::RoundAbandoned {
                round: t.round,
                reason: reason.clone(),
            });
            self.events.push_back(CoordinatorEvent::RoundAbandoned {
                round: t.round,
                received: t.received,
                reason,
            });
            self.retry_at = Some(now + self.config.retry_delay);
            return;
        }
        let step = f64::from(self.config.server_learning_rate) / t.received as f64;
        let params = self
            .model
            .params
            .iter()
            .zip(&t.sum)
            .map(|(p, s)| (f64::from(*p) + step * s) as f32)
            .collect();
        let model = Arc::new(GlobalModel {
            version: self.model.version.next(),
            spec: self.model.spec.clone(),
            params,
        });
        self.model = model.clone();
        self.events
            .push_back(CoordinatorEvent::ModelCommitted(model.clone()));
        self.broadcast(CoordinatorMessage::Model(model.clone()));
        self.phase = Phase::Evaluating(Evaluating {
            summary: RoundSummary {
                round: t.round,
                model_version: model.version,
                participants: t.received,
                dropped,
                train_loss: t.loss_sum / t.received as f64,
                eval: EvalCounts::default(),
                eval_sites: 0,
                duration: Duration::ZERO,
                bytes_received: t.bytes,
            },
            opened: t.opened,
            pending: self.connected.clone(),
            reported: BTreeSet::new(),
            deadline: now + self.config.eval_timeout,
        });
    }

    fn close_evaluation(&mut self, now: Instant) {
        let Phase::Evaluating(mut e) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        e.summary.duration = now.saturating_duration_since(e.opened);
        self.events
            .push_back(CoordinatorEvent::RoundCompleted(e.summary));
        self.completed += 1;
        if self
            .config
            .max_rounds
            .is_some_and(|max| self.completed >= max)
        {
            self.phase = Phase::Finished;
            self.events.push_back(CoordinatorEvent::TrainingFinished);
        }
    }
}
