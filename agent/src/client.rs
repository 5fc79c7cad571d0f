//! The agent's QUIC client: a thin async driver around [`SiteSession`].
//!
//! One task reads frames into a channel (reading is not cancel-safe, so it
//! never sits inside `select!`); one worker thread evaluates and trains, which
//! is CPU-bound; the driver loop feeds both into the session and writes what
//! it emits. Connection failures are retried forever with exponential backoff
//! and jitter; only a protocol version mismatch ends the agent.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use potluck_shared::round::{
    SecAggIdentity, SiteEvent, SiteSession, SiteSessionError, privacy_step,
};
use potluck_shared::secagg::{PeerVerifier, SiteSigner};
use potluck_shared::service::systemd;
use potluck_shared::tls::{self, Identity};
use potluck_shared::transport::{self, CloseCode, TransportError};
use potluck_shared::wire::{
    CoordinatorMessage, NeighbourRelease, RoundTask, SiteBudget, SiteMessage,
};
use potluck_shared::{ModelVersion, SiteId};
use rand::RngExt;
use rand::rngs::StdRng;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::api::{self, ApiState, load_token};
use crate::audit::AuditLog;
use crate::config::{AgentConfig, PrivacyLimits};
use crate::dataset::SiteData;
use crate::evaluation::{self, evaluate};
use crate::retention::purge_periodically;
use crate::simulation::{Phase, Simulation, round_rng};
use crate::store::{DEFAULT_WAIT, PriorRelease, SiteStore, StoreError, StoreHandle};
use crate::training::{Trained, private_contribution, train_site};
use potluck_shared::dp::{Contribution, Step};
use potluck_shared::model::{GlobalModel, Menu, SitePrior};
use potluck_shared::wire::EvalCounts;

/// Why the agent cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The certificate names another site than the config.
    #[error("{cert}: certificate is for site {in_cert}, but the config says {in_config}")]
    SiteMismatch {
        /// The certificate file.
        cert: String,
        /// Site in the certificate.
        in_cert: SiteId,
        /// Site in the config.
        in_config: SiteId,
    },
    /// The site certificate has expired.
    #[error("{cert}: certificate expired at {at}; ask the central team to re-enrol the site")]
    Expired {
        /// The certificate file.
        cert: String,
        /// When it expired.
        at: String,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state directory could not be created.
    #[error(transparent)]
    StateDir(#[from] crate::config::ConfigError),
    /// The local UDP socket could not be bound.
    #[error("binding a UDP socket: {0}")]
    Bind(std::io::Error),
    /// The coordinator speaks another protocol version; retrying cannot help.
    #[error(transparent)]
    Incompatible(SiteSessionError),
    /// The recommendations API cannot start.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// The configured menu file is unusable.
    #[error(transparent)]
    Menu(#[from] potluck_shared::model::MenuError),
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Protocol(#[from] SiteSessionError),
    #[error("coordinator closed the stream")]
    Closed,
    #[error("reading pinned peer keys: {0}")]
    Pins(String),
}

enum Job {
    Model(Arc<GlobalModel>),
    Train(Box<RoundTask>, Arc<GlobalModel>),
    Audit(Box<RoundTask>, Arc<GlobalModel>),
    Census(Box<RoundTask>, Arc<GlobalModel>),
    /// Kept by the worker, so that a round after it trains with it.
    Neighbours(Arc<NeighbourRelease>),
}

enum Done {
    Evaluated(ModelVersion, EvalCounts),
    /// Trained for a round, or audited in one: what to contribute.
    Trained(Box<RoundTask>, Result<Work, String>),
}

/// What local training produced for a round.
enum Work {
    /// A delta, for a round without differential privacy.
    Plain(Trained),
    /// The sampled units' clipped, rounded contributions, before noise, and
    /// the site's ledger after the round.
    Private(Contribution, SiteBudget),
}

/// A site agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    store: StoreHandle,
    client: quinn::ClientConfig,
    secagg: SecAggIdentity,
    api: Option<ApiState>,
    simulation: Option<Simulation>,
    /// Releases received so far: a release saved late never replaces a later one.
    releases: Arc<std::sync::atomic::AtomicU64>,
}

impl Agent {
    /// Check the credentials and open the store; every failure names its file.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let cert_name = config.tls.cert.display().to_string();
        let in_cert = tls::site_id_from_cert(&identity.chain[0])?;
        if in_cert != config.site_id {
            return Err(AgentError::SiteMismatch {
                cert: cert_name,
                in_cert,
                in_config: config.site_id.clone(),
            });
        }
        let expiry = tls::not_after(&identity.chain[0])?;
        if expiry < time::OffsetDateTime::now_utc() {
            return Err(AgentError::Expired {
                cert: cert_name,
                at: expiry.to_string(),
            });
        }
        let store = StoreHandle::new(config.store_path_created()?, DEFAULT_WAIT);
        // Open it once now, so that a missing or unreadable key fails at start.
        store.with(|_| Ok(()))?;
        let secagg = SecAggIdentity {
            signer: Arc::new(SiteSigner::new(&identity.chain[0], &identity.key)?),
            verifier: PeerVerifier::new(identity.ca.clone())?,
            floor: config.secure_aggregation,
            pins: Default::default(), // read from the store at each connection
        };
        let client = tls::client_config(identity)?;
        let api = if config.api.enabled {
            let token = load_token(&config.token_path(), config.api.token_file.is_none())?;
            let menu = config.menu.as_deref().map(Menu::load).transpose()?;
            Some(ApiState::new(&store, menu, &token))
        } else {
            None
        };
        Ok(Self {
            config,
            store,
            client,
            secagg,
            api,
            simulation: None,
            releases: Arc::default(),
        })
    }

    /// Run as one of many virtual sites of a research simulation: through
    /// the shared endpoint and compute slots, with seeded randomness and
    /// injected faults. Production agents never call this.
    pub fn simulated(mut self, simulation: Simulation) -> Self {
        self.simulation = Some(simulation);
        self
    }

    /// The site's store.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Take part in rounds until `shutdown` completes, reconnecting as needed;
    /// tells systemd it is ready once the API (if enabled) listens.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let bind: SocketAddr = if self.config.coordinator.is_ipv6() {
            "[::]:0".parse().expect("valid address")
        } else {
            "0.0.0.0:0".parse().expect("valid address")
        };
        let endpoint = match &self.simulation {
            Some(simulation) => simulation.endpoint.clone(),
            None => quinn::Endpoint::client(bind).map_err(AgentError::Bind)?,
        };
        let mut helpers = Helpers::default();
        if let Some(state) = &self.api {
            let listener = api::bind(self.config.api.listen).await?;
            let addr = listener.local_addr().map_err(AgentError::Bind)?;
            info!(%addr, "recommendations API listening");
            let state = state.clone();
            helpers.0.push(tokio::spawn(async move {
                if let Err(e) = api::serve(listener, state).await {
                    warn!(error = %e, "recommendations API stopped");
                }
            }));
        }
        helpers.0.push(tokio::spawn(purge_periodically(
            self.store.clone(),
            self.config.data.clone(),
            AuditLog::new(&self.config.state_dir),
        )));
        systemd::ready(&format!(
            "site {}, coordinator {}",
            self.config.site_id, self.config.coordinator
        ));
        helpers.0.extend(systemd::spawn_watchdog());
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        loop {
            let result = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = self.session(&endpoint, &mut backoff) => r,
            };
            match result {
                Err(SessionError::Protocol(e @ SiteSessionError::VersionMismatch { .. })) => {
                    return Err(AgentError::Incompatible(e));
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(site = %self.config.site_id, error = %e, retry_in = ?delay, "connection to coordinator lost");
                    systemd::status(&format!(
                        "coordinator {} unreachable ({e}); retrying in {:.0} s",
                        self.config.coordinator,
                        delay.as_secs_f64()
                    ));
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Ok(()) => {}
            }
        }
        info!(site = %self.config.site_id, "agent stopping");
        drop(helpers);
        if self.simulation.is_some() {
            return Ok(()); // the endpoint is shared: the simulation closes it
        }
        endpoint.close(CloseCode::Shutdown.into(), b"agent shutting down");
        // Give the close a moment to reach the coordinator, not the full drain period.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        Ok(())
    }

    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let max_frame = self.config.limits.max_frame_bytes;
        let connection = endpoint
            .connect_with(
                self.client.clone(),
                self.config.coordinator,
                &self.config.server_name,
            )
            .map_err(|e| SessionError::Connect(e.to_string()))?
            .await
            .map_err(|e| SessionError::Connect(e.to_string()))?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| SessionError::Connect(e.to_string()))?;
        info!(site = %self.config.site_id, coordinator = %self.config.coordinator, "connected");
        systemd::status(&format!(
            "connected to coordinator {}",
            self.config.coordinator
        ));
        let mut inbox = spawn_reader(recv, max_frame);
        let audit = AuditLog::new(&self.config.state_dir);
        let (jobs, mut done) = spawn_worker(self.worker_context(audit));
        let mut identity = self.secagg.clone();
        let store = self.store.clone();
        identity.pins = tokio::task::spawn_blocking(move || store.with(|s| s.pins()))
            .await
            .map_err(|e| SessionError::Pins(e.to_string()))?
            .map_err(|e| SessionError::Pins(e.to_string()))?;
        let mut session = SiteSession::new(env!("CARGO_PKG_VERSION"), Some(identity));
        let result = async {
            loop {
                while let Some(event) = session.poll_event() {
                    self.dispatch(event, &jobs);
                }
                while let Some(message) = session.poll_transmit() {
                    if self.injects_dropout(&message, &mut session) {
                        continue;
                    }
                    transport::write_message(&mut send, &message, max_frame).await?;
                }
                tokio::select! {
                    message = inbox.recv() => match message {
                        Some(Ok(message)) => {
                            if matches!(message, CoordinatorMessage::Welcome { .. }) {
                                backoff.reset();
                            }
                            let now = std::time::SystemTime::now();
                            cpu_bound(|| session.handle_message(message, now, &mut rand::rng()))?;
                        }
                        Some(Err(e)) => return Err(SessionError::Transport(e)),
                        None => return Err(SessionError::Closed),
                    },
                    Some(result) = done.recv() => cpu_bound(|| self.apply(result, &mut session)),
                }
            }
        }
        .await;
        let code = match &result {
            Err(SessionError::Protocol(SiteSessionError::VersionMismatch { .. })) => {
                CloseCode::VersionMismatch
            }
            Err(SessionError::Protocol(_)) => CloseCode::ProtocolViolation,
            Err(SessionError::Transport(e)) => e.close_code(),
            _ => CloseCode::Normal,
        };
        connection.close(code.into(), b"");
        result
    }

    fn dispatch(&self, event: SiteEvent, jobs: &std::sync::mpsc::Sender<Job>) {
        let job = match event {
            SiteEvent::ModelReceived(model) => {
                info!(site = %self.config.site_id, version = %model.version, "received global model");
                Job::Model(model)
            }
            SiteEvent::TrainRequested { task, model } => {
                info!(site = %self.config.site_id, round = %task.round, "training for round");
                Job::Train(task, model)
            }
            SiteEvent::AuditRequested { task, model } => {
                info!(site = %self.config.site_id, round = %task.round, version = %model.version, "fairness audit");
                Job::Audit(task, model)
            }
            SiteEvent::CensusRequested { task, model } => {
                info!(site = %self.config.site_id, round = %task.round, "neighbour census");
                Job::Census(task, model)
            }
            SiteEvent::NeighboursReceived(release) => Job::Neighbours(release),
            SiteEvent::ServeModel(model) => return self.serve(model),
            SiteEvent::PeersMet(met) => return self.pin(met),
            SiteEvent::RoundAbandoned(round) => {
                info!(site = %self.config.site_id, %round, "round abandoned by coordinator");
                return;
            }
            _ => return,
        };
        // The worker lives as long as this session; a send fails only while it shuts down.
        let _ = jobs.send(job);
    }

    /// Keep a released model for recommendations: at once, beside the
    /// worker, so that neither a long training job nor the end of the session
    /// delays or drops it.
    fn serve(&self, model: Arc<GlobalModel>) {
        use std::sync::atomic::Ordering;
        let (store, site) = (self.store.clone(), self.config.site_id.clone());
        let releases = self.releases.clone();
        let seq = releases.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::task::spawn_blocking(move || {
            // Checked under the store's lock, so saves of two releases cannot interleave.
            let saved = store.with(|s| {
                let latest = releases.load(Ordering::SeqCst) == seq;
                latest.then(|| s.save_model(&model)).transpose()
            });
            match saved {
                Ok(Some(())) => info!(%site, version = %model.version, "serving model"),
                Ok(None) => {
                    debug!(%site, version = %model.version, "superseded by a later release")
                }
                Err(e) => {
                    warn!(%site, version = %model.version, error = %e, "could not keep the released model; serving the previous one");
                }
            }
        });
    }

    /// Keep the keys of peers met for the first time, beside the session.
    fn pin(&self, met: potluck_shared::secagg::Pins) {
        let (store, site) = (self.store.clone(), self.config.site_id.clone());
        tokio::task::spawn_blocking(move || match store.with(|s| s.pin_peers(&met)) {
            Ok(()) => {
                info!(%site, peers = ?met.keys().collect::<Vec<_>>(), "pinned the keys of peers met for the first time")
            }
            Err(e) => {
                warn!(%site, error = %e, "could not pin peers' keys; they will be pinned when next met")
            }
        });
    }

    fn apply(&self, done: Done, session: &mut SiteSession) {
        match done {
            Done::Evaluated(version, counts) => {
                let plain = self.config.privacy.dangerous_plain_evaluation;
                if let Some((hr, _)) = counts.model.means(counts.cases) {
                    info!(site = %self.config.site_id, %version, hr_at_10 = format!("{hr:.3}"), cases = counts.cases, "evaluated model");
                }
                session.handle_evaluated(version, evaluation::report(counts, plain));
            }
            Done::Trained(task, Ok(Work::Plain(trained))) => {
                debug!(site = %self.config.site_id, round = %task.round, loss = trained.loss, "trained");
                let mut rng = self.rng(task.round, "finish");
                session.handle_trained(
                    &task,
                    trained.delta,
                    trained.loss,
                    trained.customers,
                    &mut rng,
                );
            }
            Done::Trained(task, Ok(Work::Private(contribution, budget))) => {
                debug!(site = %self.config.site_id, round = %task.round, units = contribution.units(), "trained");
                let mut rng = self.rng(task.round, "finish");
                session.handle_contribution(&task, contribution, &mut rng);
                session.report_budget(budget);
            }
            Done::Trained(task, Err(reason)) => {
                warn!(site = %self.config.site_id, round = %task.round, %reason, "declining round");
                session.decline(task.round, reason);
            }
        }
    }
}

impl Agent {
    /// What the worker thread needs.
    fn worker_context(&self, audit: AuditLog) -> WorkerContext {
        WorkerContext {
            site: self.config.site_id.clone(),
            store: self.store.clone(),
            limits: self.config.privacy.clone(),
            floor: self.config.secure_aggregation,
            audit,
            simulation: self.simulation.clone(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The generator for `purpose` in `round`: seeded in a simulation.
    fn rng(&self, round: potluck_shared::RoundId, purpose: &str) -> StdRng {
        let seed = self.simulation.as_ref().map(|s| s.seed);
        round_rng(seed, &self.config.site_id, round, purpose)
    }

    /// In a simulation, leave the round instead of sending `message` when the
    /// fault plan says this site drops out at its phase.
    fn injects_dropout(&self, message: &SiteMessage, session: &mut SiteSession) -> bool {
        let (Some(simulation), Some((round, phase))) = (&self.simulation, Phase::of(message))
        else {
            return false;
        };
        let site = &self.config.site_id;
        if !simulation
            .faults
            .drops_at(simulation.seed, site, round, phase)
        {
            return false;
        }
        info!(%site, %round, phase = phase.name(), "simulated dropout");
        session.decline(round, format!("simulated dropout at {}", phase.name()));
        true
    }
}

/// What a site's worker thread needs to evaluate and train.
struct WorkerContext {
    site: SiteId,
    store: StoreHandle,
    limits: PrivacyLimits,
    floor: potluck_shared::secagg::Floor,
    audit: AuditLog,
    simulation: Option<Simulation>,
    runtime: tokio::runtime::Handle,
}

impl WorkerContext {
    /// Run `job` in one of the simulation's compute slots, if any; then, for
    /// a slow site, wait its delay (outside the slot) before reporting.
    /// Nothing is reported for a job that only keeps what arrived.
    fn run(&self, job: Job) -> Option<Done> {
        if let Job::Neighbours(release) = job {
            self.keep_neighbours(&release);
            return None;
        }
        let permit = self.simulation.as_ref().map(|s| {
            self.runtime
                .block_on(s.compute.clone().acquire_owned())
                .expect("the compute semaphore is never closed")
        });
        let done = match job {
            Job::Model(model) => Done::Evaluated(model.version, on_model(&self.store, &model)),
            Job::Audit(task, model) => {
                let seed = self.simulation.as_ref().map(|s| s.seed);
                let mut rng = round_rng(seed, &self.site, task.round, "audit");
                let result = audit_for_round(self, &task, &model, &mut rng);
                Done::Trained(task, result)
            }
            Job::Census(task, model) => {
                let seed = self.simulation.as_ref().map(|s| s.seed);
                let mut rng = round_rng(seed, &self.site, task.round, "census");
                let result = census_for_round(self, &task, &model, &mut rng);
                Done::Trained(task, result)
            }
            Job::Neighbours(_) => return None,
            Job::Train(task, model) => {
                let seed = self.simulation.as_ref().map(|s| s.seed);
                let mut rng = round_rng(seed, &self.site, task.round, "train");
                let result = train_for_round(self, &task, &model, &mut rng);
                drop(permit);
                if let Some(s) = &self.simulation {
                    std::thread::sleep(s.faults.delay(s.seed, &self.site));
                }
                return Some(Done::Trained(task, result));
            }
        };
        drop(permit);
        Some(done)
    }

    fn keep_neighbours(&self, release: &NeighbourRelease) {
        match self.store.with(|s| s.save_neighbours(release)) {
            Ok(()) => {
                info!(site = %self.site, lineage = %release.lineage, round = %release.round, "kept the franchise's neighbour census")
            }
            Err(e) => {
                warn!(site = %self.site, error = %e, "could not keep the neighbour census; new items are ranked by popularity")
            }
        }
    }
}

/// Run work of tens of milliseconds (secure aggregation's key agreements and
/// masks, a private round's noise) from a session: on a multi-threaded
/// runtime the worker hands its other tasks, QUIC's endpoint driver among
/// them, to another thread meanwhile, so that datagrams keep being read.
fn cpu_bound<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn spawn_reader(
    mut recv: quinn::RecvStream,
    max_frame: usize,
) -> mpsc::Receiver<Result<CoordinatorMessage, TransportError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let item =
                match transport::read_message::<CoordinatorMessage>(&mut recv, max_frame).await {
                    Ok(Some((message, _))) => Ok(message),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    rx
}

fn spawn_worker(
    context: WorkerContext,
) -> (std::sync::mpsc::Sender<Job>, mpsc::UnboundedReceiver<Done>) {
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for job in job_rx {
            let Some(done) = context.run(job) else {
                continue;
            };
            if done_tx.send(done).is_err() {
                break;
            }
        }
    });
    (job_tx, done_rx)
}

/// Train for a round, within this site's own privacy limits.
fn train_for_round(
    context: &WorkerContext,
    task: &RoundTask,
    model: &GlobalModel,
    rng: &mut StdRng,
) -> Result<Work, String> {
    let WorkerContext {
        store,
        limits,
        audit,
        ..
    } = context;
    let data = store
        .with(|s| site_data(s, model))
        .map_err(|e| e.to_string())?;
    let Some(privacy) = &task.privacy else {
        if limits.require {
            return Err(
                "this site requires differential privacy and the round has none \
                        (agent.toml [privacy] require)"
                    .into(),
            );
        }
        audit
            .append(
                "round_joined",
                serde_json::json!({"round": task.round.0, "privacy": null}),
            )
            .map_err(|e| format!("cannot record the round in the audit log: {e}"))?;
        return train_site(model, &data, &task.settings, rng.random())
            .map(Work::Plain)
            .map_err(|e| e.to_string());
    };
    let mut data = data;
    let release = prior_release(context, privacy, &mut data, rng)?;
    let budget = charge_ledger(context, task, privacy, release.as_ref())?;
    private_contribution(model, &data, &task.settings, privacy, rng)
        .map(|contribution| Work::Private(contribution, budget))
        .map_err(|e| e.to_string())
}

/// Audit a model version for fairness: per-group figures of the held-out
/// customers, charged to the privacy ledger like a round.
fn audit_for_round(
    context: &WorkerContext,
    task: &RoundTask,
    model: &GlobalModel,
    rng: &mut StdRng,
) -> Result<Work, String> {
    let (Some(spec), Some(privacy)) = (&task.audit, &task.privacy) else {
        return Err("an audit without its spec or privacy".into());
    };
    let data = context
        .store
        .with(|s| site_data(s, model))
        .map_err(|e| e.to_string())?;
    let budget = charge_ledger(context, task, privacy, None)?;
    evaluation::audit(&model.spec, &model.params, &data, spec, privacy, rng)
        .map(|contribution| Work::Private(contribution, budget))
        .map_err(|e| e.to_string())
}

/// Sum this site's customers' item pairs for a neighbour census, charged to
/// the privacy ledger like a round.
fn census_for_round(
    context: &WorkerContext,
    task: &RoundTask,
    model: &GlobalModel,
    rng: &mut StdRng,
) -> Result<Work, String> {
    let (Some(census), Some(privacy)) = (&task.census, &task.privacy) else {
        return Err("a census without its spec or privacy".into());
    };
    // A second release of the same statistic would only spend budget (and,
    // averaged with the first, lower its noise).
    let held = context
        .store
        .with(|s| s.neighbours())
        .map_err(|e| e.to_string())?;
    if held.is_some_and(|n| n.lineage == privacy.lineage) {
        return Err(format!(
            "this site already holds the neighbour census of lineage {}",
            privacy.lineage
        ));
    }
    let data = context
        .store
        .with(|s| site_data(s, model))
        .map_err(|e| e.to_string())?;
    let budget = charge_ledger(context, task, privacy, None)?;
    Ok(Work::Private(data.census(census, privacy, rng), budget))
}

/// The prior a private round trains with: the lineage's earlier release, or
/// a new one (returned, to be charged with the round), or none when the
/// round asks for none.
fn prior_release<R: rand::CryptoRng + ?Sized>(
    context: &WorkerContext,
    privacy: &potluck_shared::dp::RoundPrivacy,
    data: &mut SiteData,
    rng: &mut R,
) -> Result<Option<PriorRelease>, String> {
    if privacy.prior_step().is_none() {
        data.set_prior(SitePrior::default());
        return Ok(None);
    }
    let menu_len = data.popularity.len();
    let stored = context
        .store
        .with(|s| match s.prior_release()? {
            Some(release) if release.lineage == privacy.lineage => {
                private_prior(s, &release, menu_len)
            }
            _ => Ok(None),
        })
        .map_err(|e| e.to_string())?;
    if let Some(prior) = stored {
        data.set_prior(prior);
        return Ok(None);
    }
    let release = PriorRelease {
        lineage: privacy.lineage.clone(),
        counts: data
            .release_prior(privacy.prior_noise_multiplier, rng)
            .map_err(|e| format!("cannot release the site prior: {e}"))?,
    };
    let prior = context
        .store
        .with(|s| private_prior(s, &release, menu_len))
        .map_err(|e| e.to_string())?
        .ok_or("the site prior's release does not fit the menu")?;
    data.set_prior(prior);
    Ok(Some(release))
}

/// Record a private round's cost (and that of a new prior `release`) in this
/// site's ledger and audit log, or refuse it when it would take ε above this
/// site's own limit; returns what the ledger shows after it.
fn charge_ledger(
    context: &WorkerContext,
    task: &RoundTask,
    privacy: &potluck_shared::dp::RoundPrivacy,
    release: Option<&PriorRelease>,
) -> Result<SiteBudget, String> {
    let WorkerContext {
        store,
        limits,
        floor,
        audit,
        ..
    } = context;
    let step = privacy_step(task, floor).ok_or("a private round without secure aggregation")?;
    let prior = release.and(privacy.prior_step());
    let steps: Vec<Step> = std::iter::once(step).chain(prior).collect();
    let now = potluck_shared::dp::unix_seconds(SystemTime::now());
    let spent = store
        .with(|s| {
            s.spend_privacy(
                (&privacy.lineage, task.round),
                &steps,
                &limits.cap(),
                now,
                release,
            )
        })
        .map_err(|e| e.to_string())?;
    let figures = |epsilon: f64| {
        serde_json::json!({
            "round": task.round.0,
            "lineage": privacy.lineage,
            "epsilon": epsilon,
            "max_epsilon": limits.max_epsilon,
            "delta": limits.delta,
            "noise_multiplier": step.noise_multiplier,
            "sampling_rate": step.sampling_rate,
            "prior_release_noise_multiplier": prior.map(|p| p.noise_multiplier),
            "purpose": purpose(task),
        })
    };
    let epsilon = match spent {
        Ok(epsilon) => {
            audit
                .append("round_joined", figures(epsilon))
                .map_err(|e| format!("cannot record the round in the audit log: {e}"))?;
            info!(
            round = %task.round,
            lineage = %privacy.lineage,
            epsilon = format!("{epsilon:.4}"),
            max_epsilon = limits.max_epsilon,
            "privacy ledger: round recorded"
            );
            epsilon
        }
        Err(refusal) => {
            if let Err(e) = audit.append("round_refused", figures(refusal.next)) {
                warn!(error = %e, "could not record the refusal in the audit log");
            }
            warn!(
                round = %task.round,
                lineage = %refusal.lineage,
                spent = format!("{:.4}", refusal.spent),
                next = format!("{:.4}", refusal.next),
                max_epsilon = refusal.max,
                "privacy ledger: refusing the round"
            );
            return Err(refusal.to_string());
        }
    };
    Ok(SiteBudget {
        epsilon,
        max_epsilon: limits.max_epsilon,
        delta: limits.delta,
        window_days: limits.window_days,
    })
}

/// What a round is for, as the site's audit log names it.
fn purpose(task: &RoundTask) -> &'static str {
    match (&task.audit, &task.census) {
        (Some(_), _) => "fairness audit",
        (None, Some(_)) => "neighbour census",
        (None, None) => "training",
    }
}

/// Evaluate a new model; failures are logged and reported as zero cases. It
/// is kept for recommendations only once released ([`Job::Serve`]).
fn on_model(store: &StoreHandle, model: &GlobalModel) -> EvalCounts {
    let data = store.with(|s| site_data(s, model));
    match data
        .map_err(|e| e.to_string())
        .and_then(|data| evaluate(&model.spec, &model.params, &data).map_err(|e| e.to_string()))
    {
        Ok(counts) => counts,
        Err(e) => {
            warn!(error = %e, "evaluation failed");
            EvalCounts::default()
        }
    }
}

/// The site's consenting customers, prepared for `model`'s menu and features.
///
/// Customers are put in an order fixed by their orders (not by the store's
/// keyed pseudonyms), so that the same data gives the same training run.
pub fn site_data(store: &SiteStore, model: &GlobalModel) -> Result<SiteData, StoreError> {
    let mut histories = store.histories(&model.spec.menu, true)?;
    histories.sort_by(|a, b| {
        // Orders compare by reference; the first order's time nearly always decides.
        a.orders
            .iter()
            .map(|o| (o.time, o.items.as_slice()))
            .cmp(b.orders.iter().map(|o| (o.time, o.items.as_slice())))
    });

    let mut data = SiteData::prepare(&histories, model.spec.menu.len(), model.spec.history_decay);
    // Once a private lineage has released the prior, everything uses it, so
    // that training, evaluation and the till see the same inputs.
    if let Some(release) = store.prior_release()?
        && let Some(prior) = private_prior(store, &release, model.spec.menu.len())?
    {
        data.set_prior(prior);
    }
    Ok(data)
}

/// The prior of a private lineage: the site's own popularity `release`,
/// with the franchise's neighbour census when the site holds one for the
/// same lineage; `None` when the release does not fit the menu.
fn private_prior(
    store: &SiteStore,
    release: &PriorRelease,
    menu_len: usize,
) -> Result<Option<SitePrior>, StoreError> {
    let mut values = release.counts.clone();
    let census = store
        .neighbours()?
        .filter(|n| n.lineage == release.lineage && n.pairs.len() == menu_len * menu_len);
    if let Some(census) = census {
        values.extend(census.pairs.iter().map(|&v| f64::from(v)));
    }
    Ok(SitePrior::from_release(&values, menu_len))
}

/// Tasks that live as long as the agent runs: aborted when it returns.
#[derive(Default)]
struct Helpers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Exponential backoff with jitter, from 0.5 s to 30 s.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.attempt.min(10))
            .min(Self::MAX);
        self.attempt += 1;
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}
