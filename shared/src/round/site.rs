use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use rand::CryptoRng;

use super::{aggregate_vector, update_weight};
use crate::dp::{self, Contribution, Step};
use crate::ids::{ModelVersion, RoundId};
use crate::model::GlobalModel;
use crate::secagg;
use crate::wire::{
    CoordinatorMessage, EvalCounts, EvalReport, PROTOCOL_VERSION, RoundTask, SiteMessage,
    SiteUpdate,
};

/// What a site session asks its driver to do.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SiteEvent {
    /// A new global model arrived: store it, evaluate it, then call
    /// [`SiteSession::handle_evaluated`].
    ModelReceived(Arc<GlobalModel>),
    /// Train from `model` with `task.settings`, then call [`SiteSession::handle_trained`].
    TrainRequested {
        /// The round's task.
        task: Box<RoundTask>,
        /// The model to start from.
        model: Arc<GlobalModel>,
    },
    /// The round was abandoned; any training for it can stop.
    RoundAbandoned(RoundId),
    /// Audit `model` for fairness with `task.audit` on the held-out data, then
    /// call [`SiteSession::handle_contribution`] with the customers' vectors.
    AuditRequested {
        /// The audit's task.
        task: Box<RoundTask>,
        /// The version audited.
        model: Arc<GlobalModel>,
    },
    /// Sum the consenting customers' item pairs for `task.census`, then call
    /// [`SiteSession::handle_contribution`] with them.
    CensusRequested {
        /// The census's task.
        task: Box<RoundTask>,
        /// The current model (its menu).
        model: Arc<GlobalModel>,
    },
    /// The franchise's neighbour census for a lineage: keep it; the
    /// lineage's private rounds and the till rank new items with it.
    NeighboursReceived(Arc<crate::wire::NeighbourRelease>),
    /// Serve this model (recommend with it) from now on: it was released.
    ServeModel(Arc<GlobalModel>),
    /// Secure aggregation met these peers for the first time: keep their
    /// keys (pin them), so that a changed one is refused in later rounds.
    PeersMet(secagg::Pins),
}

/// The coordinator broke the protocol; the driver closes the connection.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SiteSessionError {
    /// The coordinator speaks another protocol version.
    #[error("coordinator speaks protocol version {theirs}, this agent speaks {ours}")]
    VersionMismatch {
        /// Its version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The coordinator refused the connection.
    #[error("coordinator refused the connection: {0}")]
    Refused(String),
    /// The coordinator sent an invalid model.
    #[error("invalid model from coordinator: {0}")]
    BadModel(#[from] crate::model::ModelError),
    /// A message arrived out of order.
    #[error("unexpected message from coordinator: {0}")]
    Unexpected(&'static str),
}

/// What a site needs to take part in secure aggregation.
pub use crate::secagg::Identity as SecAggIdentity;

/// A site's side of the round lifecycle.
#[derive(Debug, Default)]
pub struct SiteSession {
    welcomed: bool,
    identity: Option<SecAggIdentity>,
    model: Option<Arc<GlobalModel>>,
    round: Option<RoundId>,
    secagg: Option<secagg::Client>,
    transmits: VecDeque<SiteMessage>,
    events: VecDeque<SiteEvent>,
}

impl SiteSession {
    /// A session that opens with `Hello`; without an identity it declines secure rounds.
    pub fn new(agent_version: &str, identity: Option<SecAggIdentity>) -> Self {
        let mut session = Self {
            identity,
            ..Self::default()
        };
        session.transmits.push_back(SiteMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: agent_version.to_string(),
        });
        session
    }

    /// The latest global model received.
    pub fn model(&self) -> Option<&Arc<GlobalModel>> {
        self.model.as_ref()
    }

    /// A message from the coordinator; `now` checks peers' certificates.
    pub fn handle_message<R: CryptoRng + ?Sized>(
        &mut self,
        message: CoordinatorMessage,
        now: SystemTime,
        rng: &mut R,
    ) -> Result<(), SiteSessionError> {
        match message {
            CoordinatorMessage::Welcome {
                protocol_version, ..
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(SiteSessionError::VersionMismatch {
                        theirs: protocol_version,
                        ours: PROTOCOL_VERSION,
                    });
                }
                self.welcomed = true;
            }
            CoordinatorMessage::Refused { reason } => {
                return Err(SiteSessionError::Refused(reason));
            }
            _ if !self.welcomed => {
                return Err(SiteSessionError::Unexpected("message before welcome"));
            }
            CoordinatorMessage::Model(model) => {
                model.validate()?;
                self.model = Some(model.clone());
                self.events.push_back(SiteEvent::ModelReceived(model));
            }
            CoordinatorMessage::Release { version, model } => self.on_release(version, model)?,
            CoordinatorMessage::RoundOpen(task) => self.on_round_open(task, rng),
            CoordinatorMessage::SecAgg { round, message } => {
                self.on_secagg(round, message, now, rng)
            }
            CoordinatorMessage::Neighbours(release) => {
                let menu = self.model.as_ref().map(|m| m.spec.menu.len());
                let fits = menu.is_some_and(|m| release.pairs.len() == m * m);
                if !fits || release.pairs.iter().any(|v| !v.is_finite()) {
                    return Err(SiteSessionError::Unexpected(
                        "neighbours that do not fit the menu",
                    ));
                }
                self.events
                    .push_back(SiteEvent::NeighboursReceived(release));
            }
            CoordinatorMessage::RoundAbandoned { round, .. } => {
                if self.secagg.as_ref().is_some_and(|c| c.round() == round) {
                    self.secagg = None;
                }
                if self.round == Some(round) {
                    self.round = None;
                    self.events.push_back(SiteEvent::RoundAbandoned(round));
                }
            }
        }
        Ok(())
    }

    /// Decline a round, with a reason the coordinator logs (e.g. a spent
    /// privacy budget), and take no further part in it.
    pub fn decline(&mut self, round: RoundId, reason: String) {
        if self.round == Some(round) {
            self.round = None;
        }
        if self.secagg.as_ref().is_some_and(|c| c.round() == round) {
            self.secagg = None;
        }
        self.transmits
            .push_back(SiteMessage::Declined { round, reason });
    }

    /// Local training for `task` produced `delta` (new minus global values of
    /// the round's trainable parameters) from `customers` customers.
    ///
    /// Clips the delta to the round's L2 bound and adds the round's Gaussian
    /// noise; then, in a secure round, encodes it (with the loss and the
    /// site's weight) as this site's masked input, else queues it as a plain
    /// update. Nothing is sent if the round was abandoned meanwhile.
    pub fn handle_trained<R: CryptoRng + ?Sized>(
        &mut self,
        task: &RoundTask,
        mut delta: Vec<f32>,
        train_loss: f32,
        customers: usize,
        rng: &mut R,
    ) {
        if self.round != Some(task.round) {
            return;
        }
        self.round = None;
        dp::clip_l2(&mut delta, task.settings.clip_norm);
        dp::add_gaussian_noise(&mut delta, task.settings.noise_std, rng);
        let weight = update_weight(customers);
        let Some(setup) = &task.secagg else {
            self.transmits.push_back(SiteMessage::Update(SiteUpdate {
                round: task.round,
                model_version: task.model_version,
                delta,
                train_loss,
                weight,
            }));
            return;
        };
        let encoded = setup.encoding.encode(
            &aggregate_vector(delta, train_loss, weight, task.settings.clip_norm),
            rng,
        );
        let result = match self.secagg.as_mut().filter(|c| c.round() == task.round) {
            Some(client) => client.handle_input(encoded).map_err(|e| e.to_string()),
            None => Err("secure aggregation for this round was aborted".to_string()),
        };
        match result {
            Ok(()) => self.flush_secagg(),
            Err(reason) => self.decline(task.round, reason),
        }
    }

    /// A private round's contribution, built by the driver from its sampled
    /// units (see [`crate::dp::distributed`]): adds this site's share of the
    /// noise and sends it as the masked input.
    pub fn handle_contribution<R: CryptoRng + ?Sized>(
        &mut self,
        task: &RoundTask,
        contribution: Contribution,
        rng: &mut R,
    ) {
        if self.round != Some(task.round) {
            return;
        }
        self.round = None;
        let (Some(setup), Some(privacy)) = (&task.secagg, &task.privacy) else {
            self.decline(task.round, "not a private secure round".into());
            return;
        };
        let result = contribution
            .finish(privacy, &setup.encoding, rng)
            .map_err(|e| e.to_string())
            .and_then(
                |encoded| match self.secagg.as_mut().filter(|c| c.round() == task.round) {
                    Some(client) => client.handle_input(encoded).map_err(|e| e.to_string()),
                    None => Err("secure aggregation for this round was aborted".to_string()),
                },
            );
        match result {
            Ok(()) => self.flush_secagg(),
            Err(reason) => self.decline(task.round, reason),
        }
    }

    /// Tell the coordinator what this site's own ledger shows.
    pub fn report_budget(&mut self, budget: crate::wire::SiteBudget) {
        self.transmits.push_back(SiteMessage::Budget(budget));
    }

    /// Evaluation of `model_version` at this site produced `counts`.
    pub fn handle_evaluated(&mut self, model_version: ModelVersion, counts: EvalCounts) {
        self.transmits
            .push_back(SiteMessage::Evaluation(EvalReport {
                model_version,
                counts,
            }));
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<SiteMessage> {
        self.transmits.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<SiteEvent> {
        self.events.pop_front()
    }

    fn flush_secagg(&mut self) {
        let Some(client) = self.secagg.as_mut() else {
            return;
        };
        let round = client.round();
        while let Some(message) = client.poll_transmit() {
            self.transmits
                .push_back(SiteMessage::SecAgg { round, message });
        }
    }

    fn on_secagg<R: CryptoRng + ?Sized>(
        &mut self,
        round: RoundId,
        message: secagg::ServerMessage,
        now: SystemTime,
        rng: &mut R,
    ) {
        let Some(client) = self.secagg.as_mut().filter(|c| c.round() == round) else {
            return; // a round this site already left
        };
        match client.handle_message(message, now, rng) {
            Ok(()) => {
                let met = client.take_unpinned();
                if let Some(identity) = self.identity.as_mut().filter(|_| !met.is_empty()) {
                    identity.pins.extend(met.clone());
                    self.events.push_back(SiteEvent::PeersMet(met));
                }
                self.flush_secagg();
            }
            Err(e) => self.decline(round, format!("secure aggregation aborted: {e}")),
        }
    }

    fn start_secagg<R: CryptoRng + ?Sized>(
        &mut self,
        task: &RoundTask,
        rng: &mut R,
    ) -> Result<(), String> {
        let Some(setup) = &task.secagg else {
            self.secagg = None;
            return Ok(());
        };
        let identity = self
            .identity
            .as_ref()
            .ok_or("this agent has no signing identity for secure aggregation")?;
        let context = task
            .digest()
            .map_err(|e| format!("cannot digest the round: {e}"))?;
        let client = secagg::Client::new(task.round, setup.clone(), &context, identity, rng)
            .map_err(|e| format!("secure aggregation refused: {e}"))?;
        self.secagg = Some(client);
        self.flush_secagg();
        Ok(())
    }

    fn on_release(
        &mut self,
        version: ModelVersion,
        model: Option<Arc<GlobalModel>>,
    ) -> Result<(), SiteSessionError> {
        let model = match model {
            Some(model) => {
                model.validate()?;
                if model.version != version {
                    return Err(SiteSessionError::Unexpected(
                        "release of a mislabelled model",
                    ));
                }
                model
            }
            None => match &self.model {
                Some(current) if current.version == version => current.clone(),
                // A release of a version this site never held: it serves what it has.
                _ => return Ok(()),
            },
        };
        self.events.push_back(SiteEvent::ServeModel(model));
        Ok(())
    }

    fn on_round_open<R: CryptoRng + ?Sized>(&mut self, task: Box<RoundTask>, rng: &mut R) {
        let model = match &self.model {
            Some(m) if m.version == task.model_version && m.spec.hash() == task.spec_hash => {
                m.clone()
            }
            Some(m) => {
                let reason = format!(
                    "round {} uses model {} ({}), this site has {} ({})",
                    task.round,
                    task.model_version,
                    task.spec_hash,
                    m.version,
                    m.spec.hash()
                );
                self.decline(task.round, reason);
                return;
            }
            None => {
                self.decline(task.round, "no model received yet".into());
                return;
            }
        };
        if let Some(spec) = &task.audit {
            let checked = match (&task.privacy, &task.secagg) {
                // Every held-out customer is in an audit: a lower sampling
                // rate would undercount its cost in the ledger.
                (Some(privacy), Some(setup))
                    if setup.length == spec.length() && privacy.sampling_rate == 1.0 =>
                {
                    spec.check().map_err(|e| e.to_string())
                }
                _ => Err(
                    "an audit must be private, securely aggregated, and as long as its spec"
                        .to_string(),
                ),
            };
            if let Err(reason) = checked {
                self.decline(task.round, format!("audit refused: {reason}"));
                return;
            }
        }
        if let Some(census) = &task.census {
            let fits = match (&task.privacy, &task.secagg) {
                (Some(privacy), Some(setup)) => {
                    census.menu_len as usize == model.spec.menu.len()
                        && setup.length == census.length()
                        && privacy.sampling_rate == 1.0
                        && task.audit.is_none()
                }
                _ => false,
            };
            if !fits {
                let reason = "census refused: a census must be private, securely aggregated, \
                              over every customer and the model's menu";
                self.decline(task.round, reason.into());
                return;
            }
        }
        if let Err(reason) = task.settings.check() {
            self.decline(task.round, reason.to_string());
            return;
        }
        if task.audit.is_none()
            && task.census.is_none()
            && let Err(reason) = check_training_shape(&task, &model)
        {
            self.decline(task.round, reason);
            return;
        }
        if let Some(privacy) = &task.privacy {
            let checked = match &task.secagg {
                Some(setup) => privacy.check(setup.length).map_err(|e| e.to_string()),
                None => Err(
                    "distributed noise needs secure aggregation, which this round lacks"
                        .to_string(),
                ),
            };
            let floor = self.identity.as_ref().map(|i| i.floor).unwrap_or_default();
            let checked = checked.and_then(|()| noise_floor(&task, &floor));
            if let Err(reason) = checked {
                self.decline(task.round, format!("privacy settings refused: {reason}"));
                return;
            }
        }
        if let Err(reason) = self.start_secagg(&task, rng) {
            self.decline(task.round, reason);
            return;
        }
        self.round = Some(task.round);
        self.events.push_back(match (&task.audit, &task.census) {
            (Some(_), _) => SiteEvent::AuditRequested { task, model },
            (None, Some(_)) => SiteEvent::CensusRequested { task, model },
            (None, None) => SiteEvent::TrainRequested { task, model },
        });
    }
}

/// A training round must name a resolved scope, and a secure one sum vectors
/// of that scope's length plus its extra coordinates (the count in a private
/// round and its unclipped flag; the loss and the weight otherwise).
fn check_training_shape(task: &RoundTask, model: &GlobalModel) -> Result<(), String> {
    if task.settings.scope == crate::model::TrainScope::Auto {
        return Err("the round does not say which parameters to train".into());
    }
    let trained = model.spec.trainable(task.settings.scope).len();
    let extra = crate::dp::distributed::extra_coordinates(task.privacy.is_some());
    match &task.secagg {
        Some(setup) if setup.length != trained + extra => Err(format!(
            "secure sum of {} values, but training {:?} gives {}",
            setup.length,
            task.settings.scope,
            trained + extra
        )),
        _ => Ok(()),
    }
}

/// Refuse a private round whose noise, counting only the honest survivors'
/// share of it, is below this site's floor.
pub(super) fn noise_floor(task: &RoundTask, floor: &secagg::Floor) -> Result<(), String> {
    let z = privacy_step(task, floor).map_or(0.0, |s| s.noise_multiplier);
    if z < floor.min_noise_multiplier {
        return Err(format!(
            "noise multiplier {z:.3} (the noise of the threshold less {} assumed colluders) is \
             below this site's minimum {}",
            floor.colluders, floor.min_noise_multiplier
        ));
    }
    Ok(())
}

/// What a private round costs this site, from the noise it adds, the bound it
/// rounds to and the survivors its secure aggregation insists on, less the
/// colluders its `floor` assumes add none; `None` for a round without privacy.
pub fn privacy_step(task: &RoundTask, floor: &secagg::Floor) -> Option<Step> {
    let (privacy, setup) = (task.privacy.as_ref()?, task.secagg.as_ref()?);
    let honest = floor.honest_survivors(setup.threshold);
    Some(privacy.step(setup.cohort.len(), honest, setup.length))
}
