//! One federation: files on disk as a real deployment has them (CA, enrolled
//! sites with imported stores, `coordinator.toml`), the real coordinator in
//! its own process, and every site as a virtual [`Agent`] in this one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_agent::Agent;
use potluck_agent::config::{AgentConfig, Purpose};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::simulation::Simulation;
use potluck_agent::store::SiteStore;
use potluck_coordinator::CoordinatorConfig;
use potluck_coordinator::pki::{Enrollment, PkiDir};
use potluck_coordinator::report::{RoundLine, read_lines};
use potluck_coordinator::roles::Role;
use potluck_coordinator::state::{FairnessRecord, State};
use potluck_shared::SiteId;
use potluck_shared::bundle;
use potluck_shared::tls::Validity;
use tokio::sync::watch;

use crate::config::SimConfig;
use crate::dataset::Dataset;
use crate::partition::Part;

/// A federation's files, ready to run.
#[derive(Debug)]
pub struct Prepared {
    /// The coordinator's config file.
    pub coordinator_toml: PathBuf,
    /// Its state directory (`coordinator.db`, `metrics.jsonl`).
    pub state_dir: PathBuf,
    /// Every site's agent config.
    pub sites: Vec<AgentConfig>,
    /// The admin API.
    pub admin: SocketAddr,
    /// An operator token for it.
    pub token: String,
}

/// What running a federation measured.
#[derive(Debug)]
pub struct Ran {
    /// The coordinator's per-round lines.
    pub rounds: Vec<RoundLine>,
    /// From starting the coordinator to its exit.
    pub wall_seconds: f64,
    /// Peak resident memory of the coordinator process, KiB.
    pub coordinator_peak_kib: Option<u64>,
    /// Peak resident memory of this (the sites') process, KiB.
    pub sites_peak_kib: Option<u64>,
    /// The fairness audits the coordinator ran (with `[coordinator.audit]`).
    pub fairness: Vec<FairnessRecord>,
}

/// Write the CA, the coordinator's config and one enrolled, imported site per part.
pub fn prepare(
    config: &SimConfig,
    dataset: &Dataset,
    parts: &[Part],
    work: &Path,
) -> Result<Prepared> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let menu_path = work.join("menu.csv");
    dataset
        .menu
        .write_csv(std::fs::File::create(&menu_path)?)
        .with_context(|| format!("writing {}", menu_path.display()))?;
    let pki = PkiDir::new(&work.join("pki"));
    pki.init("Potluck simulation", &[], 30, true, None)?;
    let quic = free_udp_port()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let coordinator_toml = work.join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        coordinator_toml_text(config, parts.len(), quic, admin)?,
    )?;
    let coordinator = CoordinatorConfig::load(&coordinator_toml)
        .context("the [coordinator] settings of the experiment")?;
    let privacy = coordinator.privacy.enabled;
    let target = coordinator.privacy.target_epsilon;
    // Sites keep the attributes the coordinator audits, as audit-only columns.
    let audited: Vec<String> = coordinator
        .audit
        .as_ref()
        .map(|a| a.attributes.keys().cloned().collect())
        .unwrap_or_default();
    let mut sites = Vec::with_capacity(parts.len());
    for part in parts {
        let site =
            SiteId::new(part.site.clone()).with_context(|| format!("site name {:?}", part.site))?;
        let out = work.join("sites").join(site.as_str());
        pki.enroll(&Enrollment {
            site: site.clone(),
            out: out.clone(),
            coordinator: format!("127.0.0.1:{quic}").parse()?,
            menu: Some(menu_path.clone()),
            validity: Validity::days_from_now(30),
            force: true,
        })?;
        let orders = out.join("orders.csv");
        let rows: Vec<_> = part
            .customers
            .iter()
            .flat_map(|&c| dataset.customers[c].rows.iter().cloned())
            .collect();
        potluck_shared::synth::write_orders_csv(&rows, std::fs::File::create(&orders)?)?;
        let mut agent = AgentConfig::load(&out.join(bundle::AGENT_CONFIG))?;
        // The datasets are historical: no retention purge. No till API either.
        agent.data.retention_days = None;
        agent.api.enabled = false;
        agent.privacy.require = privacy;
        // Research on synthetic or public data: every site reports its exact
        // evaluation counts, which the figures are made of. A real site keeps
        // this off (see `dangerous_plain_evaluation`).
        agent.privacy.dangerous_plain_evaluation = true;
        agent.privacy.max_epsilon = agent.privacy.max_epsilon.max(target);
        for column in &audited {
            agent
                .data
                .columns
                .insert(column.clone(), Purpose::AuditOnly);
        }
        let options = ImportOptions {
            audit_columns: audited.clone(),
            ..ImportOptions::default()
        };
        let store = SiteStore::open(&agent.store_path_created()?)?;
        import_file(&store, &orders, &dataset.menu, &options)
            .with_context(|| format!("importing {}", orders.display()))?;
        sites.push(agent);
    }
    let state_dir = coordinator.state_dir.clone();
    let mut state = State::open(&state_dir)?;
    // Rounds start once every site is connected, so each run has the same cohorts.
    state.set_training_stopped(true, "potluck-sim")?;
    let token = state.create_token("potluck-sim", Role::Operator)?;
    Ok(Prepared {
        coordinator_toml,
        state_dir,
        sites,
        admin,
        token,
    })
}

/// The experiment's `[coordinator]` settings, with what the runner owns set
/// and the defaults a simulation wants filled in.
fn coordinator_toml_text(
    config: &SimConfig,
    sites: usize,
    quic: u16,
    admin: SocketAddr,
) -> Result<String> {
    let mut table = config.coordinator.clone();
    let section = |table: &mut toml::Table, name: &str| -> Result<toml::Table> {
        match table.remove(name) {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(t)) => Ok(t),
            Some(_) => bail!("coordinator.{name}: a table"),
        }
    };
    let mut rounds = section(&mut table, "rounds")?;
    rounds.insert("max_rounds".into(), (config.rounds as i64).into());
    rounds
        .entry("min_sites")
        .or_insert(3.min(sites as i64).into());
    rounds
        .entry("cohort_seed")
        .or_insert((config.seed as i64).into());
    rounds.entry("cohort_wait_secs").or_insert(0.0.into());
    rounds.entry("retry_delay_secs").or_insert(0.5.into());
    table.insert("rounds".into(), rounds.into());
    let mut model = section(&mut table, "model")?;
    model.entry("seed").or_insert((config.seed as i64).into());
    table.insert("model".into(), model.into());
    table.insert("listen".into(), format!("127.0.0.1:{quic}").into());
    table.insert("state_dir".into(), "coordinator".into());
    table.insert("menu".into(), "menu.csv".into());
    let tls: toml::Table = toml::toml! {
        ca = "pki/ca.pem"
        cert = "pki/coordinator.pem"
        key = "pki/coordinator.key"
    };
    table.insert("tls".into(), tls.into());
    let mut telemetry = toml::Table::new();
    telemetry.insert("listen".into(), "127.0.0.1:0".into());
    table.insert("telemetry".into(), telemetry.into());
    let mut admin_section = toml::Table::new();
    admin_section.insert("listen".into(), admin.to_string().into());
    table.insert("admin".into(), admin_section.into());
    Ok(toml::to_string(&table)?)
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Progress as rounds complete.
pub trait Progress {
    /// All sites are connected; training starts.
    fn started(&self, sites: usize);
    /// A round completed.
    fn round(&self, line: &RoundLine);
}

/// Run the coordinator (a child process running `exe coordinator`) and the
/// virtual sites until the coordinator has finished its rounds.
pub async fn run(
    config: &SimConfig,
    prepared: &Prepared,
    logs: &Path,
    progress: &dyn Progress,
) -> Result<Ran> {
    std::fs::create_dir_all(logs)?;
    let peak_file = logs.join("coordinator.peak-kib");
    let log = logs.join("coordinator.log");
    let started = Instant::now();
    // Bound before the coordinator starts, and never on its port, so that no
    // site socket can take the port the coordinator is about to bind.
    let coordinator_port = prepared.sites.first().map(|s| s.coordinator.port());
    let endpoints = site_endpoints(prepared.sites.len(), coordinator_port)?;
    let mut child = Coordinator::spawn(&prepared.coordinator_toml, &log, &peak_file)?;
    let (stop, stopped) = watch::channel(false);
    let slots = config
        .compute
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let compute = Arc::new(tokio::sync::Semaphore::new(slots));
    let mut tasks = tokio::task::JoinSet::new();
    for (site, endpoint) in prepared.sites.iter().zip(endpoints.iter().cycle()) {
        let simulation = Simulation {
            endpoint: endpoint.clone(),
            compute: compute.clone(),
            seed: config.seed,
            faults: config.faults.clone(),
        };
        let agent = Agent::new(site.clone())
            .with_context(|| format!("starting site {}", site.site_id))?
            .simulated(simulation);
        let mut stopped = stopped.clone();
        tasks.spawn(agent.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    let admin = Admin {
        base: format!("http://{}", prepared.admin),
        token: prepared.token.clone(),
    };
    let result = drive(&mut child, &admin, prepared, progress, &log).await;
    let _ = stop.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "a virtual site failed");
        }
    }
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"simulation over");
    }
    let sites_peak_kib = peak_kib();
    child.stop();
    result?;
    let rounds = read_lines(&prepared.state_dir.join("metrics.jsonl"))?;
    let fairness = State::open_existing(&prepared.state_dir)?.fairness_audits()?;
    Ok(Ran {
        fairness,
        rounds,
        wall_seconds: started.elapsed().as_secs_f64(),
        coordinator_peak_kib: std::fs::read_to_string(&peak_file)
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        sites_peak_kib,
    })
}

/// Wait for every site, start training, follow the rounds until the coordinator exits.
async fn drive(
    child: &mut Coordinator,
    admin: &Admin,
    prepared: &Prepared,
    progress: &dyn Progress,
    log: &Path,
) -> Result<()> {
    let sites = prepared.sites.len();
    let limit = Duration::from_secs(60) + Duration::from_millis(200) * sites as u32;
    let deadline = Instant::now() + limit;
    loop {
        child.check(log)?;
        if let Ok(connected) = admin.connected().await
            && connected == sites
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not every site connected to the coordinator within {} s; see {} and sites.log",
                limit.as_secs(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin.start_training().await?;
    progress.started(sites);
    let metrics = prepared.state_dir.join("metrics.jsonl");
    let mut seen = 0;
    loop {
        let exited = child.exited(log)?;
        if let Ok(lines) = read_lines::<RoundLine>(&metrics) {
            for line in lines.iter().skip(seen) {
                progress.round(line);
            }
            seen = seen.max(lines.len());
        }
        if exited {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The coordinator's admin API, as an operator.
struct Admin {
    base: String,
    token: String,
}

impl Admin {
    async fn connected(&self) -> Result<usize> {
        let (base, token) = (self.base.clone(), self.token.clone());
        tokio::task::spawn_blocking(move || -> Result<usize> {
            let status: serde_json::Value = ureq::get(format!("{base}/api/v1/status"))
                .header("Authorization", &format!("Bearer {token}"))
                .call()?
                .body_mut()
                .read_json()?;
            Ok(status["connected"].as_array().map_or(0, Vec::len))
        })
        .await?
    }

    async fn start_training(&self) -> Result<()> {
        let (base, token) = (self.base.clone(), self.token.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            ureq::post(format!("{base}/api/v1/training/start"))
                .header("Authorization", &format!("Bearer {token}"))
                .send_empty()
                .context("starting training through the admin API")?;
            Ok(())
        })
        .await?
    }
}

/// Virtual sites sharing one UDP socket at most. A deployed site has a socket
/// of its own; sharing one among many, the model broadcast overflows its
/// buffer and QUIC stalls on loss recovery, which a real federation would not.
const SITES_PER_SOCKET: usize = 10;

/// The sites' QUIC endpoints: one per [`SITES_PER_SOCKET`] sites, none on
/// the `avoid` port.
fn site_endpoints(sites: usize, avoid: Option<u16>) -> Result<Vec<quinn::Endpoint>> {
    let mut sockets = Vec::new();
    // A socket that landed on the avoided port is held until the end, so the
    // next bind cannot land there again.
    let mut held = Vec::new();
    while sockets.len() < sites.div_ceil(SITES_PER_SOCKET).max(1) {
        let socket = potluck_shared::transport::burst_socket("127.0.0.1:0".parse()?)?;
        if Some(socket.local_addr()?.port()) == avoid {
            held.push(socket);
        } else {
            sockets.push(socket);
        }
    }
    drop(held);
    sockets
        .into_iter()
        .map(|socket| {
            Ok(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?)
        })
        .collect()
}

/// The coordinator child process.
struct Coordinator(Child);

impl Coordinator {
    fn spawn(config: &Path, log: &Path, peak_file: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating potluck-sim")?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .arg("coordinator")
            .arg("--config")
            .arg(config)
            .arg("--peak-file")
            .arg(peak_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the coordinator process")?;
        Ok(Self(child))
    }

    /// Fail if the coordinator exited before it should have.
    fn check(&mut self, log: &Path) -> Result<()> {
        if self.exited(log)? {
            bail!(
                "the coordinator exited before training started; see {}",
                log.display()
            );
        }
        Ok(())
    }

    /// Whether it exited (successfully); an error if it failed.
    fn exited(&mut self, log: &Path) -> Result<bool> {
        match self.0.try_wait()? {
            None => Ok(false),
            Some(status) if status.success() => Ok(true),
            Some(status) => bail!("the coordinator failed ({status}); see {}", log.display()),
        }
    }

    fn stop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// This process's peak resident memory, KiB (Linux).
pub fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The hidden `coordinator` command: the real coordinator server, then its
/// peak memory written to `peak_file`.
pub fn serve_coordinator(config: &Path, peak_file: &Path) -> Result<()> {
    let config = CoordinatorConfig::load(config)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = potluck_coordinator::Server::bind(config)?;
        server
            .run(potluck_shared::service::shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    if let Some(kib) = peak_kib() {
        std::fs::write(peak_file, kib.to_string())?;
    }
    Ok(())
}
