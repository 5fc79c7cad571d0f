//! The coordinator's QUIC server: a thin async driver around
//! `potluck_shared::round::Coordinator`.
//!
//! Each connection gets a task that checks the peer's identity and `Hello`,
//! then forwards decoded messages to the driver loop; a frame that is
//! oversized or malformed closes that connection only. The driver loop owns
//! the state machine, persists what it commits before sending anything, and
//! fires its timers.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_shared::model::{GlobalModel, Menu, ModelSpec};
use potluck_shared::round::{Coordinator, CoordinatorEvent, RoundSummary};
use potluck_shared::tls::{self, Identity};
use potluck_shared::transport::{self, CloseCode, TransportError};
use potluck_shared::wire::frame::MAX_HELLO_FRAME;
use potluck_shared::wire::{CoordinatorMessage, PROTOCOL_VERSION, SiteMessage};
use potluck_shared::{RoundId, SiteId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admin::{self, AdminContext, Live};
use crate::config::CoordinatorConfig;
use crate::schedule::Schedule;
use crate::state::{self, State, StateError};
use crate::telemetry::{self, Telemetry};

/// How long a new connection has to open its stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one site before it counts as too slow and is closed.
const OUTBOX: usize = 64;
/// How often changes made by other processes (the CLI) and the schedule are checked.
const CONTROL_INTERVAL: Duration = Duration::from_secs(2);

/// Why the coordinator cannot serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The menu is unusable.
    #[error(transparent)]
    Menu(#[from] potluck_shared::model::MenuError),
    /// State could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

type ConnId = u64;

enum Input {
    Connected {
        site: SiteId,
        cert: Vec<u8>,
        fingerprint: String,
        conn: ConnId,
        outbox: mpsc::Sender<Arc<CoordinatorMessage>>,
        connection: quinn::Connection,
    },
    Message {
        site: SiteId,
        conn: ConnId,
        message: SiteMessage,
        len: usize,
    },
    Disconnected {
        site: SiteId,
        conn: ConnId,
    },
}

struct Peer {
    conn: ConnId,
    fingerprint: String,
    outbox: mpsc::Sender<Arc<CoordinatorMessage>>,
    connection: quinn::Connection,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Rounds completed.
    pub rounds_completed: u64,
    /// Rounds abandoned.
    pub rounds_abandoned: u64,
    /// The last model version.
    pub model_version: u64,
    /// Rounds sites declined, with their reasons.
    pub declined: Vec<(SiteId, RoundId, String)>,
}

/// A bound coordinator, ready to run.
#[derive(Debug)]
pub struct Server {
    config: CoordinatorConfig,
    state: State,
    schedule: Schedule,
    endpoint: quinn::Endpoint,
    franchise: Arc<str>,
    metrics: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

impl Server {
    /// Load credentials, menu and state, and bind the UDP socket.
    pub fn bind(config: CoordinatorConfig) -> Result<Self, ServeError> {
        let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let franchise: Arc<str> = tls::franchise_of(&identity.ca)?.into();
        // Fail early, naming the file, if the menu or the stored lineage is unusable.
        Menu::load(&config.menu)?;
        let mut state = State::open(&config.state_dir)?;
        let schedule = config.schedule.schedule().map_err(ServeError::Config)?;
        let server_config = tls::server_config(identity)?;
        let reset_key = state.stateless_reset_key()?;
        let endpoint = endpoint(server_config, config.listen, &reset_key).map_err(|source| {
            ServeError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let metrics = config
            .telemetry
            .listen
            .map(|addr| telemetry::bind(addr).map_err(|source| ServeError::Bind { addr, source }))
            .transpose()?;
        let admin = config
            .admin
            .listen
            .map(|addr| admin::bind(addr).map_err(|source| ServeError::Bind { addr, source }))
            .transpose()?;
        Ok(Self {
            config,
            state,
            schedule,
            endpoint,
            franchise,
            metrics,
            admin,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the admin API and dashboard are served, if they are.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Run rounds until `max_rounds` complete or `shutdown` completes.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, ServeError> {
        let mut spec = ModelSpec::new(Menu::load(&self.config.menu)?);
        spec.dims = self.config.model_dims();
        spec.history_decay = self.config.model.history_decay;
        let model = self.state.load_or_init(spec, self.config.model.seed)?;
        for round in self.state.interrupt_open_rounds()? {
            warn!(
                round,
                "round interrupted by the last stop; its privacy stays spent, and a new round starts from the last committed model"
            );
        }
        if let Err(e) = state::export_metrics(&self.state, &self.config.state_dir) {
            warn!(error = %e, "could not write metrics.jsonl; every round is in the database all the same");
        }
        let next_round = self.state.next_round()?;
        let completed = self.state.rounds_completed()?;
        // Built once: it calibrates the noise to the budget.
        let round_config = self.config.round_config();
        // Audits spend the training lineage's budget, or their own without one.
        let lineage = match (&round_config.privacy, &round_config.audit) {
            (None, Some(audit)) => audit.lineage.clone(),
            _ => self.config.privacy.lineage.clone(),
        };
        let spent = self.state.privacy_steps(&lineage)?;
        let released = match self.state.released_version()? {
            Some(version) => self.state.model(version)?,
            None => None,
        };
        let audited = self.state.fairness(Some(model.version.0))?.is_some();
        let optimizer = self.state.optimizer_state(model.version.0)?;
        let prior_charged = self.state.prior_charged(&lineage)?;
        let neighbours = self.state.neighbours(&lineage)?;
        if let Some(policy) = &round_config.privacy {
            info!(
                %lineage,
                rounds_spent = spent.len(),
                target_epsilon = self.config.privacy.target_epsilon,
                delta = self.config.privacy.delta,
                noise_multiplier = policy.noise_multiplier,
                sampling_rate = self.config.privacy.sampling_rate,
                clip_norm = self.config.privacy.clip_norm,
                unit = %self.config.privacy.unit,
                "differential privacy on"
            );
        } else {
            warn!(
                "differential privacy is OFF ([privacy] enabled = false): model updates carry no calibrated noise"
            );
        }
        info!(
            franchise = %self.franchise,
            listen = %self.local_addr().map_err(|source| ServeError::Bind { addr: self.config.listen, source })?,
            model_version = %model.version,
            spec = %model.spec.hash(),
            parameters = model.params.len(),
            "coordinator ready; waiting for {} sites",
            self.config.rounds.min_sites
        );
        let coordinator = Coordinator::new(round_config, model, next_round)
            .with_spent(&spent)
            .with_completed(completed)
            .with_released(released, audited)
            .with_optimizer(optimizer)
            .with_prior_charged(prior_charged)
            .with_neighbours(neighbours);
        let target = self
            .config
            .privacy
            .enabled
            .then_some(self.config.privacy.target_epsilon);
        let telemetry = Arc::new(Telemetry::new(target));
        if let (Some(spent), Some(target)) = (coordinator.epsilon_spent(), target) {
            telemetry.privacy(spent, target);
        }
        let metrics = self.metrics.take().map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "metrics at http://{addr}/metrics");
            }
            tokio::spawn(telemetry::serve(listener, telemetry.clone()))
        });
        let live = Arc::new(std::sync::Mutex::new(Live {
            franchise: self.franchise.to_string(),
            target_epsilon: target,
            min_sites: self.config.rounds.min_sites,
            window: self
                .schedule
                .window()
                .map(|w| format!("{w} {}", self.config.schedule.time_zone)),
            ..Live::default()
        }));
        let poke = Arc::new(tokio::sync::Notify::new());
        let admin = self.admin.take().map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "admin API and dashboard at http://{addr}/");
            }
            let context = AdminContext {
                config: Arc::new(self.config.clone()),
                telemetry: telemetry.clone(),
                live: live.clone(),
                poke: poke.clone(),
            };
            tokio::spawn(admin::serve(listener, context))
        });
        let mut driver = Driver {
            coordinator,
            state: self.state,
            state_dir: self.config.state_dir.clone(),
            schedule: self.schedule,
            rollback: None,
            stopped: false,
            lineage: lineage.clone(),
            peers: HashMap::new(),
            summary: RunSummary::default(),
            telemetry,
            live,
            target,
            delivering: None,
        };
        driver.sync_control()?;
        let (input_tx, mut inputs) = mpsc::channel(1024);
        let accept = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            input_tx,
            Handshake {
                franchise: self.franchise.clone(),
                max_frame: self.config.limits.max_frame_bytes,
                state_dir: self.config.state_dir.clone(),
                awaiting_hello: Arc::default(),
            },
        ));
        let mut control = tokio::time::interval(CONTROL_INTERVAL);
        tokio::pin!(shutdown);
        let result = loop {
            if let Err(e) = driver.flush() {
                break Err(e);
            }
            driver.publish();
            if driver.coordinator.is_finished() && driver.delivered() {
                break Ok(());
            }
            let timer = driver.coordinator.poll_timeout();
            let sleep = tokio::time::sleep_until(
                timer.map_or_else(far_future, tokio::time::Instant::from_std),
            );
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                Some(input) = inputs.recv() => driver.handle(input),
                () = sleep, if timer.is_some() => driver.coordinator.handle_timeout(Instant::now()),
                () = poke.notified() => if let Err(e) = driver.sync_control() { break Err(e) },
                _ = control.tick() => if let Err(e) = driver.sync_control() { break Err(e) },
            }
        };
        accept.abort();
        for task in [metrics, admin].into_iter().flatten() {
            task.abort();
        }
        // Dropping the outboxes lets each writer send what is queued (the final
        // model) and finish its stream; agents then close their side.
        let connections: Vec<_> = driver.peers.drain().map(|(_, p)| p.connection).collect();
        for connection in connections {
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        }
        self.endpoint
            .close(CloseCode::Shutdown.into(), b"coordinator shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        driver.summary.model_version = driver.coordinator.model().version.0;
        result.map(|()| driver.summary)
    }
}

/// The QUIC endpoint, with stateless reset tokens and connection-ID checks
/// keyed by `reset_key`, so that after a restart it recognises the previous
/// run's connection IDs and resets those connections.
fn endpoint(
    server_config: quinn::ServerConfig,
    listen: SocketAddr,
    reset_key: &[u8; 32],
) -> std::io::Result<quinn::Endpoint> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let tag = ring::hmac::sign(&key, b"potluck connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = transport::burst_socket(listen)?;
    quinn::Endpoint::new(
        config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

struct Driver {
    coordinator: Coordinator,
    state: State,
    state_dir: std::path::PathBuf,
    schedule: Schedule,
    /// The rollback request handed to the round machine, not yet applied.
    rollback: Option<i64>,
    /// Whether an operator stopped training (read from the database by `sync_control`).
    stopped: bool,
    lineage: String,
    peers: HashMap<SiteId, Peer>,
    summary: RunSummary,
    telemetry: Arc<Telemetry>,
    live: Arc<std::sync::Mutex<Live>>,
    /// The privacy budget, when differential privacy is on.
    target: Option<f64>,
    /// A release made after training finished, still to reach some sites.
    delivering: Option<Delivery>,
}

/// Sites that have not yet connected since a release, and how long to wait for them.
struct Delivery {
    until: Instant,
    waiting: std::collections::BTreeSet<SiteId>,
}

/// How long a finished coordinator stays up to hand a release to its sites.
const DELIVERY_WINDOW: Duration = Duration::from_secs(600);

impl Driver {
    /// Training is over, so sites learn of a release only by connecting: stay
    /// up until every known site has, or for [`DELIVERY_WINDOW`].
    fn await_delivery(&mut self) -> Result<(), ServeError> {
        let waiting: std::collections::BTreeSet<SiteId> = self
            .state
            .sites()?
            .into_iter()
            .filter(|s| !s.revoked)
            .filter_map(|s| s.site.parse::<SiteId>().ok())
            .filter(|s| !self.peers.contains_key(s))
            .collect();
        info!(
            sites = waiting.len(),
            "staying up to hand the release to sites not connected now"
        );
        self.delivering = Some(Delivery {
            until: Instant::now() + DELIVERY_WINDOW,
            waiting,
        });
        Ok(())
    }

    /// Whether a release made after training finished has reached every
    /// site, or the wait for it is over.
    fn delivered(&self) -> bool {
        self.delivering
            .as_ref()
            .is_none_or(|d| d.waiting.is_empty() || Instant::now() >= d.until)
    }

    fn handle(&mut self, input: Input) {
        self.on_input(input);
        self.telemetry.set_connected(self.peers.len());
    }

    /// Act on what operators changed in the database (here or through the
    /// CLI) and on the schedule: pause, rollback, revoked certificates.
    fn sync_control(&mut self) -> Result<(), ServeError> {
        let now = Instant::now();
        let stopped = self.state.training_stopped()?;
        self.stopped = stopped;
        let paused = stopped || !self.schedule.open_at(jiff::Timestamp::now());
        if paused != self.coordinator.is_paused() {
            info!(
                paused,
                stopped_by_operator = stopped,
                "training {}",
                if paused { "paused" } else { "resumed" }
            );
            self.coordinator.set_paused(paused, now);
        }
        if let Some(release) = self.state.pending_release()? {
            let model = self.stored_model(release.version, "release")?;
            warn!(
                version = release.version,
                "operator release: sites serve this version now, whatever its audit said"
            );
            self.coordinator.release(model);
            self.state.release_applied(release)?;
            if self.coordinator.is_finished() {
                self.await_delivery()?;
            }
        }
        if let Some(request) = self.state.pending_rollback()?
            && self.rollback != Some(request.id)
        {
            let model = self.stored_model(request.target, "rollback")?;
            info!(
                to = request.target,
                "rollback requested; applied once no round is in progress"
            );
            self.rollback = Some(request.id);
            self.coordinator.rollback(model.version, model.params, now);
        }
        let fingerprints = self.peers.iter().map(|(s, p)| (s, p.fingerprint.as_str()));
        for (site, reason) in to_disconnect(fingerprints, |f| self.state.is_revoked(f)) {
            warn!(%site, %reason, "closing the site's connection");
            self.drop_peer(&site, CloseCode::Unauthorized, &reason, now);
        }
        Ok(())
    }

    /// Model `version`, which an operator's `action` names; refused if not stored.
    fn stored_model(&self, version: u64, action: &str) -> Result<GlobalModel, ServeError> {
        self.state.model(version)?.ok_or_else(|| {
            ServeError::State(StateError::Refused(format!(
                "{action} of model version {version}, which is not stored"
            )))
        })
    }

    /// Share what the driver is doing with the admin API.
    /// Called after every input, so it only copies what changed.
    fn publish(&self) {
        let c = &self.coordinator;
        let training = if c.is_finished() {
            "finished"
        } else if self.stopped {
            "stopped"
        } else if c.is_paused() {
            "waiting for window"
        } else {
            "running"
        };
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.model_version = c.model().version.0;
        let round = c.current_round().map(|r| r.0);
        if round != live.current_round {
            // ε changes only when a round opens.
            live.epsilon_spent = c.epsilon_spent();
            live.current_round = round;
        }
        let phase = c.phase();
        if phase != live.phase.as_deref() {
            if let (Some(round), Some(phase)) = (round, phase) {
                debug!(round, %phase, "round phase");
            }
            live.phase = phase.map(str::to_string);
        }
        // One input connects or drops at most one site; revocations only drop.
        if live.connected.len() != self.peers.len() {
            live.connected = self.peers.keys().map(ToString::to_string).collect();
            live.connected.sort();
        }
        if live.training != training {
            live.training = training.into();
        }
    }

    fn on_input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Connected {
                site,
                cert,
                fingerprint,
                conn,
                outbox,
                connection,
            } => {
                if let Err(e) = self.state.site_seen(&site, &fingerprint) {
                    warn!(%site, error = %e, "could not record the site's connection");
                }
                if let Some(old) = self.peers.insert(
                    site.clone(),
                    Peer {
                        conn,
                        fingerprint,
                        outbox,
                        connection,
                    },
                ) {
                    old.connection
                        .close(CloseCode::Normal.into(), b"replaced by a newer connection");
                    self.coordinator.handle_disconnected(&site, now);
                }
                info!(%site, "site connected");
                if let Some(delivery) = &mut self.delivering {
                    delivery.waiting.remove(&site);
                }
                self.coordinator.handle_connected(site, cert, now);
            }
            Input::Message {
                site,
                conn,
                message,
                len,
            } => {
                if self.peers.get(&site).is_none_or(|p| p.conn != conn) {
                    return;
                }
                if let Err(violation) = self.coordinator.handle_message(&site, message, len, now) {
                    warn!(%site, %violation, "protocol violation; closing the site's connection");
                    self.drop_peer(
                        &site,
                        CloseCode::ProtocolViolation,
                        &violation.to_string(),
                        now,
                    );
                }
            }
            Input::Disconnected { site, conn } => {
                if self.peers.get(&site).is_some_and(|p| p.conn == conn) {
                    self.peers.remove(&site);
                    info!(%site, "site disconnected");
                    self.coordinator.handle_disconnected(&site, now);
                }
            }
        }
    }

    fn drop_peer(&mut self, site: &SiteId, code: CloseCode, reason: &str, now: Instant) {
        if let Some(peer) = self.peers.remove(site) {
            peer.connection.close(code.into(), reason.as_bytes());
            self.coordinator.handle_disconnected(site, now);
        }
    }

    /// Act on events (persisting first), then send what is queued.
    fn flush(&mut self) -> Result<(), ServeError> {
        loop {
            while let Some(event) = self.coordinator.poll_event() {
                self.on_event(event)?;
            }
            let Some(transmit) = self.coordinator.poll_transmit() else {
                return Ok(());
            };
            let Some(peer) = self.peers.get(&transmit.to) else {
                continue;
            };
            if peer.outbox.try_send(transmit.message).is_err() {
                warn!(site = %transmit.to, "site is not reading its messages; closing its connection");
                self.drop_peer(&transmit.to, CloseCode::Normal, "too slow", Instant::now());
            }
        }
    }

    fn on_event(&mut self, event: CoordinatorEvent) -> Result<(), ServeError> {
        match event {
            CoordinatorEvent::RoundOpened {
                round,
                model_version,
                cohort,
                secure,
            } => {
                self.state.round_opened(round, model_version, &cohort)?;
                info!(%round, %model_version, sites = cohort.len(), secure_aggregation = secure, "round opened");
                if !secure {
                    warn!(%round, "secure aggregation is OFF (dangerous_disable_secure_aggregation): this coordinator sees every site's update");
                }
            }
            CoordinatorEvent::ModelCommitted(model) => {
                let round = self.coordinator.current_round();
                let optimizer = self.coordinator.optimizer_state();
                self.state.commit_model(&model, round, optimizer)?;
            }
            CoordinatorEvent::ModelRolledBack { from, model } => {
                self.state.commit_rollback(&model, from)?;
                self.rollback = None;
                warn!(%from, version = %model.version, "model rolled back: the next round trains from version {from}'s parameters");
            }
            CoordinatorEvent::RoundCompleted(summary) => {
                self.summary.rounds_completed += 1;
                self.telemetry.round_completed(&summary);
                if let (Some(p), Some(target)) = (&summary.privacy, self.target) {
                    self.telemetry.privacy(p.epsilon, target);
                }
                info!("{}", describe(&summary));
                let line = metrics_line(&summary);
                self.state.round_completed(&summary, &line)?;
                // The database holds the line; the file is rewritten from it at the next start.
                if let Err(e) = state::append_metrics(&self.state_dir, &line) {
                    warn!(error = %e, "could not append to metrics.jsonl; the round is in the database");
                }
            }
            CoordinatorEvent::RoundAbandoned {
                round,
                received,
                reason,
            } => {
                self.summary.rounds_abandoned += 1;
                self.telemetry.round_abandoned();
                self.state.round_abandoned(round, &reason)?;
                warn!(%round, received, %reason, "round abandoned; it will be retried");
            }
            CoordinatorEvent::SiteDeclined {
                site,
                round,
                reason,
            } => {
                warn!(%site, %round, %reason, "site declined the round");
                self.summary.declined.push((site, round, reason));
            }
            CoordinatorEvent::SiteBudget { site, budget } => {
                debug!(%site, epsilon = budget.epsilon, max_epsilon = budget.max_epsilon, "site's own privacy ledger");
                self.state.site_budget(&site, &budget)?;
            }
            CoordinatorEvent::SiteMisbehaved {
                site,
                round,
                reason,
            } => {
                warn!(%site, %round, %reason, "site broke the secure aggregation protocol");
                self.state.audit(
                    "site_misbehaved",
                    serde_json::json!({"site": site, "round": round.0, "reason": reason}),
                )?;
            }
            CoordinatorEvent::PrivacySpent {
                round,
                step,
                prior,
                epsilon,
            } => {
                self.state
                    .record_privacy(&self.lineage, round, &step, prior.as_ref(), epsilon)?;
                info!(%round, epsilon = format!("{epsilon:.4}"), noise_multiplier = step.noise_multiplier, "privacy ledger: round recorded");
            }
            CoordinatorEvent::BudgetExhausted {
                spent,
                next,
                target,
            } => {
                warn!(
                    spent = format!("{spent:.4}"),
                    next = format!("{next:.4}"),
                    target,
                    "privacy budget reached: one more round would exceed the target epsilon; training stops"
                );
            }
            CoordinatorEvent::TrainingFinished => info!("training finished"),
            CoordinatorEvent::CensusOpened { round, cohort } => {
                info!(%round, sites = cohort.len(), "neighbour census opened: sites sum their customers' item pairs under secure aggregation and noise");
            }
            CoordinatorEvent::NeighboursReleased(release) => {
                self.state.record_neighbours(&release)?;
                info!(round = %release.round, lineage = %release.lineage, "neighbour census released to the sites");
            }
            CoordinatorEvent::AuditOpened {
                round,
                model_version,
                cohort,
            } => {
                info!(%round, %model_version, sites = cohort.len(), "fairness audit opened");
            }
            CoordinatorEvent::AuditCompleted(outcome) => {
                self.state.record_fairness(&outcome)?;
                let version = outcome.report.model_version;
                if outcome.failures.is_empty() {
                    info!(
                        version,
                        "fairness audit passed; model released to the sites"
                    );
                } else {
                    for failure in &outcome.failures {
                        warn!(version, %failure, "fairness gate");
                    }
                    warn!(
                        version,
                        "model HELD: sites keep serving the last released version; `potluck-coordinator audit fairness` shows the figures, `model release` overrides with a reason"
                    );
                }
            }
            CoordinatorEvent::AuditAbandoned {
                round,
                model_version,
                reason,
            } => {
                self.state
                    .record_fairness_abandoned(round, model_version, &reason)?;
                warn!(%round, %model_version, %reason, "fairness audit abandoned; the version stays unreleased");
            }
            _ => {}
        }
        Ok(())
    }
}

fn mean(sums: &potluck_shared::wire::MetricSums, cases: u64) -> (Option<f64>, Option<f64>) {
    match sums.means(cases) {
        Some((hr, ndcg)) => (Some(hr), Some(ndcg)),
        None => (None, None),
    }
}

/// The `metrics.jsonl` record of a round.
pub fn metrics_line(s: &RoundSummary) -> serde_json::Value {
    let (hr, ndcg) = mean(&s.eval.model, s.eval.cases);
    let (pop_hr, pop_ndcg) = mean(&s.eval.popularity, s.eval.cases);
    let (own_hr, own_ndcg) = mean(&s.eval.personal, s.eval.cases);
    let model = s.eval.scores(&s.eval.model);
    let own = s.eval.scores(&s.eval.personal);
    let popular = s.eval.scores(&s.eval.popularity);
    serde_json::json!({
        "round": s.round.0,
        "model_version": s.model_version.0,
        "participants": s.participants,
        "dropped": s.dropped,
        "train_loss": s.train_loss,
        "eval_hr_at_10": hr,
        "eval_ndcg_at_10": ndcg,
        "baseline_popularity_hr_at_10": pop_hr,
        "baseline_popularity_ndcg_at_10": pop_ndcg,
        "baseline_personal_hr_at_10": own_hr,
        "baseline_personal_ndcg_at_10": own_ndcg,
        "eval_cases": s.eval.cases,
        "eval_repeat_cases": s.eval.repeat_cases,
        "eval_new_cases": s.eval.new_cases,
        "eval_repeat_hr_at_10": model.repeat_hr_at_10,
        "eval_repeat_ndcg_at_10": model.repeat_ndcg_at_10,
        "eval_new_hr_at_10": model.new_hr_at_10,
        "eval_new_ndcg_at_10": model.new_ndcg_at_10,
        "baseline_personal_repeat_hr_at_10": own.repeat_hr_at_10,
        "baseline_personal_new_hr_at_10": own.new_hr_at_10,
        "baseline_popularity_new_hr_at_10": popular.new_hr_at_10,
        "eval_sites": s.eval_sites,
        "round_seconds": s.duration.as_secs_f64(),
        "bytes_received": s.bytes_received,
        "secure_aggregation": s.secure_aggregation,
        "epsilon": s.privacy.as_ref().map(|p| p.epsilon),
        "delta": s.privacy.as_ref().map(|p| p.delta),
        "noise_multiplier": s.privacy.as_ref().map(|p| p.noise_multiplier),
        "sampling_rate": s.privacy.as_ref().map(|p| p.sampling_rate),
        "clip_norm": s.privacy.as_ref().map(|p| p.clip_norm),
        "private_units": s.privacy.as_ref().map(|p| p.units),
        "clipped_fraction": s.privacy.as_ref().map(|p| p.clipped_fraction),
        "update_norm": s.privacy.as_ref().map(|p| p.update_norm),
        "noise_norm": s.privacy.as_ref().map(|p| p.noise_norm),
        "next_clip_norm": s.privacy.as_ref().map(|p| p.next_clip_norm),
        "phase_seconds": s.phase_seconds.iter().map(|(p, secs)| ((*p).to_string(), serde_json::json!(secs))).collect::<serde_json::Map<_, _>>(),
        "completed_at": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    })
}

fn describe(s: &RoundSummary) -> String {
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    let pct = |sums: &potluck_shared::wire::MetricSums| {
        sums.means(s.eval.cases)
            .map_or("n/a".to_string(), |(hr, _)| format!("{hr:.3}"))
    };
    format!(
        "round {} -> model v{}: {} sites ({} dropped), {}, HR@10 {} (repeat {}, new {}; popularity {}, GP-TopFreq {}) on {} held-out orders, {:.1} s, {} kB received",
        s.round,
        s.model_version,
        s.participants,
        s.dropped,
        match &s.privacy {
            Some(p) => format!(
                "epsilon {:.3} (delta {}, z {:.3}, ~{:.0} customers)",
                p.epsilon, p.delta, p.noise_multiplier, p.units
            ),
            None => format!("loss {:.3}", s.train_loss),
        },
        pct(&s.eval.model),
        opt(s.eval.scores(&s.eval.model).repeat_hr_at_10),
        opt(s.eval.scores(&s.eval.model).new_hr_at_10),
        pct(&s.eval.popularity),
        pct(&s.eval.personal),
        s.eval.cases,
        s.duration.as_secs_f64(),
        s.bytes_received / 1000
    )
}

/// What every connection's handshake needs.
#[derive(Debug, Clone)]
struct Handshake {
    franchise: Arc<str>,
    max_frame: usize,
    /// Read at each handshake, so a revocation made by another process counts at once.
    state_dir: std::path::PathBuf,
    /// Connections that have not said hello yet, by certificate.
    awaiting_hello: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// Connections one certificate may hold open before saying hello: an agent
/// needs one, and one more while a reconnect overlaps the old connection.
const MAX_AWAITING_HELLO: usize = 2;

/// A place among a certificate's connections awaiting hello, given back on drop.
struct AwaitingHello {
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    fingerprint: String,
}

impl Drop for AwaitingHello {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.fingerprint) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.fingerprint);
            }
        }
    }
}

/// The connected sites to close, with why: those whose certificate is
/// revoked, and those whose revocation cannot be checked (a connection fails
/// closed, as a handshake does).
fn to_disconnect<'a, E: std::fmt::Display>(
    peers: impl Iterator<Item = (&'a SiteId, &'a str)>,
    is_revoked: impl Fn(&str) -> Result<bool, E>,
) -> Vec<(SiteId, String)> {
    peers
        .filter_map(|(site, fingerprint)| match is_revoked(fingerprint) {
            Ok(false) => None,
            Ok(true) => Some((site.clone(), "certificate revoked".to_string())),
            Err(e) => Some((site.clone(), format!("cannot check revocations: {e}"))),
        })
        .collect()
}

impl Handshake {
    /// A place for one more connection of `fingerprint` awaiting its hello;
    /// `None` when the certificate already holds [`MAX_AWAITING_HELLO`].
    fn await_hello(&self, fingerprint: &str) -> Option<AwaitingHello> {
        let mut counts = self
            .awaiting_hello
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(fingerprint.to_string()).or_default();
        if *n >= MAX_AWAITING_HELLO {
            return None;
        }
        *n += 1;
        Some(AwaitingHello {
            counts: self.awaiting_hello.clone(),
            fingerprint: fingerprint.to_string(),
        })
    }

    /// Whether the certificate is revoked; an unreadable database refuses (fails closed).
    async fn revoked(&self, fingerprint: &str) -> Result<bool, String> {
        let dir = self.state_dir.clone();
        let fingerprint = fingerprint.to_string();
        tokio::task::spawn_blocking(move || State::open_existing(&dir)?.is_revoked(&fingerprint))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot check revocations: {e}"))
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, inputs: mpsc::Sender<Input>, handshake: Handshake) {
    let mut next_conn: ConnId = 0;
    while let Some(incoming) = endpoint.accept().await {
        next_conn += 1;
        let conn = next_conn;
        let inputs = inputs.clone();
        let handshake = handshake.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(reason) = serve_connection(incoming, conn, inputs, &handshake).await {
                warn!(%remote, %reason, "connection refused");
            }
        });
    }
}

/// Handshake, identity, revocation, hello; then forward messages until the connection ends.
async fn serve_connection(
    incoming: quinn::Incoming,
    conn: ConnId,
    inputs: mpsc::Sender<Input>,
    handshake: &Handshake,
) -> Result<(), String> {
    let (franchise, max_frame) = (&*handshake.franchise, handshake.max_frame);
    let connection = incoming
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let identity = tls::peer_certificate(&connection)
        .and_then(|cert| Ok((tls::site_id_from_cert(&cert)?, cert)));
    let (site, cert) = match identity {
        Ok(found) => found,
        Err(e) => {
            connection.close(CloseCode::Unauthorized.into(), b"no site identity");
            return Err(e.to_string());
        }
    };
    let fingerprint = potluck_shared::audit::sha256_hex(&cert);
    match handshake.revoked(&fingerprint).await {
        Ok(false) => {}
        Ok(true) => {
            connection.close(CloseCode::Unauthorized.into(), b"certificate revoked");
            return Err(format!(
                "site {site}: certificate {fingerprint} is revoked; re-enrol the site to admit it"
            ));
        }
        Err(reason) => {
            connection.close(CloseCode::Unauthorized.into(), b"revocation check failed");
            return Err(format!("site {site}: {reason}"));
        }
    }
    let Some(place) = handshake.await_hello(&fingerprint) else {
        connection.close(
            CloseCode::ProtocolViolation.into(),
            b"too many connections awaiting hello",
        );
        return Err(format!(
            "site {site}: already {MAX_AWAITING_HELLO} connections awaiting hello"
        ));
    };
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
        .await
        .map_err(|_| format!("site {site} opened no stream"))?
        .map_err(|e| format!("site {site}: {e}"))?;
    let hello = tokio::time::timeout(
        HELLO_TIMEOUT,
        transport::read_message::<SiteMessage>(&mut recv, MAX_HELLO_FRAME.min(max_frame)),
    )
    .await
    .map_err(|_| format!("site {site} sent no hello"))?;
    match hello {
        Ok(Some((
            SiteMessage::Hello {
                protocol_version,
                agent_version,
            },
            _,
        ))) => {
            if protocol_version != PROTOCOL_VERSION {
                let reason = format!(
                    "site speaks protocol version {protocol_version}, this coordinator speaks {PROTOCOL_VERSION}"
                );
                let refused = CoordinatorMessage::Refused {
                    reason: reason.clone(),
                };
                let _ = transport::write_message(&mut send, &refused, max_frame).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                connection.close(CloseCode::VersionMismatch.into(), reason.as_bytes());
                return Err(format!("site {site} (agent {agent_version}): {reason}"));
            }
        }
        Ok(Some(_)) => {
            connection.close(CloseCode::ProtocolViolation.into(), b"expected hello");
            return Err(format!("site {site}: first message was not hello"));
        }
        Ok(None) => return Err(format!("site {site} closed before hello")),
        Err(e) => {
            connection.close(e.close_code().into(), e.to_string().as_bytes());
            return Err(format!("site {site}: {e}"));
        }
    }
    drop(place);
    let welcome = CoordinatorMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        franchise: franchise.to_string(),
    };
    transport::write_message(&mut send, &welcome, max_frame)
        .await
        .map_err(|e| format!("site {site}: {e}"))?;
    let (outbox_tx, mut outbox) = mpsc::channel::<Arc<CoordinatorMessage>>(OUTBOX);
    let connected = Input::Connected {
        site: site.clone(),
        cert: cert.to_vec(),
        fingerprint,
        conn,
        outbox: outbox_tx,
        connection: connection.clone(),
    };
    if inputs.send(connected).await.is_err() {
        return Ok(()); // shutting down
    }
    let writer_connection = connection.clone();
    tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            if let Err(e) = transport::write_message(&mut send, &*message, max_frame).await {
                writer_connection.close(e.close_code().into(), e.to_string().as_bytes());
                return;
            }
        }
        let _ = send.finish();
    });
    let result = read_loop(&site, conn, &mut recv, &inputs, max_frame).await;
    if let Err(e) = &result {
        connection.close(e.close_code().into(), e.to_string().as_bytes());
    }
    let _ = inputs
        .send(Input::Disconnected {
            site: site.clone(),
            conn,
        })
        .await;
    result.map_err(|e| format!("site {site}: closing connection: {e}"))
}

async fn read_loop(
    site: &SiteId,
    conn: ConnId,
    recv: &mut quinn::RecvStream,
    inputs: &mpsc::Sender<Input>,
    max_frame: usize,
) -> Result<(), TransportError> {
    loop {
        match transport::read_message::<SiteMessage>(recv, max_frame).await {
            Ok(Some((message, len))) => {
                let input = Input::Message {
                    site: site.clone(),
                    conn,
                    message,
                    len,
                };
                if inputs.send(input).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(TransportError::Stream(_)) => return Ok(()), // the connection ended
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database that fails while sites are connected must not leave a
    /// revoked site connected: the check fails closed.
    #[test]
    fn a_revocation_check_that_fails_closes_the_connection() {
        let (a, b, c) = (
            SiteId::new("a").unwrap(),
            SiteId::new("b").unwrap(),
            SiteId::new("c").unwrap(),
        );
        let peers = [(&a, "fa"), (&b, "fb"), (&c, "fc")];
        let check = |f: &str| match f {
            "fa" => Ok(false),
            "fb" => Ok(true),
            _ => Err("database is locked"),
        };
        let closed = to_disconnect(peers.into_iter(), check);
        assert_eq!(
            closed,
            vec![
                (b, "certificate revoked".to_string()),
                (
                    c,
                    "cannot check revocations: database is locked".to_string()
                ),
            ]
        );
    }
}
