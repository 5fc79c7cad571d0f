use std::collections::VecDeque;
use std::sync::Arc;

use rand::CryptoRng;

use crate::dp;
use crate::ids::{ModelVersion, RoundId};
use crate::model::GlobalModel;
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
        task: RoundTask,
        /// The model to start from.
        model: Arc<GlobalModel>,
    },
    /// The round was abandoned; any training for it can stop.
    RoundAbandoned(RoundId),
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

/// A site's side of the round lifecycle.
#[derive(Debug, Default)]
pub struct SiteSession {
    welcomed: bool,
    model: Option<Arc<GlobalModel>>,
    round: Option<RoundId>,
    transmits: VecDeque<SiteMessage>,
    events: VecDeque<SiteEvent>,
}

impl SiteSession {
    /// A session that opens with `Hello`.
    pub fn new(agent_version: &str) -> Self {
        let mut session = Self::default();
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

    /// A message from the coordinator.
    pub fn handle_message(&mut self, message: CoordinatorMessage) -> Result<(), SiteSessionError> {
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
            CoordinatorMessage::RoundOpen(task) => self.on_round_open(task),
            CoordinatorMessage::RoundAbandoned { round, .. } => {
                if self.round == Some(round) {
                    self.round = None;
                    self.events.push_back(SiteEvent::RoundAbandoned(round));
                }
            }
        }
        Ok(())
    }

    /// Decline a round, with a reason the coordinator logs (e.g. a spent privacy budget).
    pub fn decline(&mut self, round: RoundId, reason: String) {
        if self.round == Some(round) {
            self.round = None;
        }
        self.transmits
            .push_back(SiteMessage::Declined { round, reason });
    }

    /// Local training for `task` produced `delta` (new minus global parameters).
    ///
    /// Clips the delta to the round's L2 bound, adds the round's Gaussian noise,
    /// and queues the update, unless the round was abandoned meanwhile.
    pub fn handle_trained<R: CryptoRng + ?Sized>(
        &mut self,
        task: &RoundTask,
        mut delta: Vec<f32>,
        train_loss: f32,
        rng: &mut R,
    ) {
        if self.round != Some(task.round) {
            return;
        }
        self.round = None;
        dp::clip_l2(&mut delta, task.settings.clip_norm);
        dp::add_gaussian_noise(&mut delta, task.settings.noise_std, rng);
        self.transmits.push_back(SiteMessage::Update(SiteUpdate {
            round: task.round,
            model_version: task.model_version,
            delta,
            train_loss,
        }));
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

    fn on_round_open(&mut self, task: RoundTask) {
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
        self.round = Some(task.round);
        self.events
            .push_back(SiteEvent::TrainRequested { task, model });
    }
}
