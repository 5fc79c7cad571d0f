//! Building whole federations in one process for end-to-end tests:
//! a synthetic franchise, its CA, enrolled sites with imported data, a
//! coordinator bound to a free loopback port, and agents.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use potluck_agent::Agent;
use potluck_agent::config::{AgentConfig, Limits, TlsFiles};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_coordinator::config::CoordinatorConfig;
use potluck_coordinator::pki::{Enrollment, PkiDir};
use potluck_coordinator::{RunSummary, Server};
use potluck_shared::SiteId;
use potluck_shared::bundle;
use potluck_shared::synth::{self, SynthConfig};
use potluck_shared::tls::Validity;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Log to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A franchise on disk: data, PKI, coordinator config, site bundles.
#[derive(Debug)]
pub struct Franchise {
    /// Keeps the files alive.
    pub dir: tempfile::TempDir,
    /// The PKI.
    pub pki: PkiDir,
    /// The coordinator's config (listen on a free loopback port).
    pub coordinator: CoordinatorConfig,
    /// Each site's bundle directory.
    pub sites: Vec<(SiteId, PathBuf)>,
}

impl Franchise {
    /// Generate `sites` sites of `customers` customers, a CA, and enrol and import every site.
    pub fn new(sites: usize, customers: usize, max_rounds: u64) -> anyhow::Result<Self> {
        Self::with_config(sites, customers, max_rounds, "")
    }

    /// As [`Franchise::new`], with `extra` TOML tables (say `[privacy]`) in coordinator.toml.
    pub fn with_config(
        sites: usize,
        customers: usize,
        max_rounds: u64,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let synth = SynthConfig {
            sites,
            customers_per_site: customers,
            ..SynthConfig::default()
        };
        Self::with_data(&synth, max_rounds, extra, &[])
    }

    /// A franchise generated from `synth`; sites keep `audit_columns` as
    /// audit-only attributes.
    pub fn with_data(
        synth: &SynthConfig,
        max_rounds: u64,
        extra: &str,
        audit_columns: &[&str],
    ) -> anyhow::Result<Self> {
        let sites = synth.sites;
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let data = synth::generate(synth);
        let menu_path = root.join("menu.csv");
        data.menu.write_csv(std::fs::File::create(&menu_path)?)?;
        let pki = PkiDir::new(&root.join("pki"));
        pki.init("Test Franchise", &[], 30, false, None)?;
        let coordinator_config = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nmenu = \"menu.csv\"\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator.key\"\n\
             [rounds]\nmin_sites = {sites}\nmax_rounds = {max_rounds}\ntrain_timeout_secs = 60\n\
             eval_timeout_secs = 30\nretry_delay_secs = 0.5\n\
             [model]\nembedding = 16\ncontext = 4\nhidden = 32\n\
             [telemetry]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n"
        );
        let config_path = root.join("coordinator.toml");
        std::fs::write(&config_path, coordinator_config)?;
        let coordinator = CoordinatorConfig::load(&config_path)?;
        let mut bundles = Vec::new();
        for site in &data.sites {
            let out = root.join("sites").join(site.site.as_str());
            pki.enroll(&Enrollment {
                site: site.site.clone(),
                out: out.clone(),
                coordinator: "127.0.0.1:9".parse()?, // replaced once the coordinator is bound
                menu: Some(menu_path.clone()),
                validity: Validity::days_from_now(30),
                force: false,
            })?;
            let orders = out.join("orders.csv");
            synth::write_orders_csv(&site.rows, std::fs::File::create(&orders)?)?;
            let config = AgentConfig::load(&out.join(bundle::AGENT_CONFIG))?;
            let store = SiteStore::open(&config.store_path_created()?)?;
            let options = ImportOptions {
                audit_columns: audit_columns.iter().map(ToString::to_string).collect(),
                ..ImportOptions::default()
            };
            import_file(&store, &orders, &data.menu, &options)?;
            bundles.push((site.site.clone(), out));
        }
        Ok(Self {
            dir,
            pki,
            coordinator,
            sites: bundles,
        })
    }

    /// Run the coordinator and every site's agent until the coordinator
    /// finishes its rounds (at most `limit`), then stop the agents.
    pub async fn run_all(&self, limit: Duration) -> anyhow::Result<RunSummary> {
        let coordinator = RunningCoordinator::start(self.coordinator.clone())?;
        let configs = (0..self.sites.len())
            .map(|i| self.agent_config(i, coordinator.addr))
            .collect::<Result<_, _>>()?;
        let agents = RunningAgents::start(configs)?;
        let summary = coordinator.finish(limit).await?;
        agents.stop().await?;
        Ok(summary)
    }

    /// The state directory of the coordinator.
    pub fn state_dir(&self) -> &Path {
        &self.coordinator.state_dir
    }

    /// The coordinator's database (it must have run).
    pub fn state(&self) -> anyhow::Result<potluck_coordinator::state::State> {
        Ok(potluck_coordinator::state::State::open_existing(
            self.state_dir(),
        )?)
    }

    /// An agent config for site `i`, pointed at `coordinator`.
    pub fn agent_config(&self, i: usize, coordinator: SocketAddr) -> anyhow::Result<AgentConfig> {
        let mut config = AgentConfig::load(&self.sites[i].1.join(bundle::AGENT_CONFIG))?;
        config.coordinator = coordinator;
        // Many agents share this machine: each API takes a free port.
        config.api.listen = "127.0.0.1:0".parse()?;
        // Synthetic customers: the tests read the coordinator's evaluation figures.
        config.privacy.dangerous_plain_evaluation = true;
        Ok(config)
    }

    /// Site `i`'s store file.
    pub fn store_path(&self, i: usize) -> anyhow::Result<PathBuf> {
        Ok(AgentConfig::load(&self.sites[i].1.join(bundle::AGENT_CONFIG))?.store_path())
    }

    /// The metrics lines written so far.
    pub fn metrics(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.state_dir().join("metrics.jsonl");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Ok(text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }
}

/// Make an agent config by hand (for identities that enrolment would not issue).
pub fn agent_config(site: &SiteId, dir: &Path, coordinator: SocketAddr) -> AgentConfig {
    AgentConfig {
        site_id: site.clone(),
        coordinator,
        server_name: potluck_shared::tls::COORDINATOR_NAME.into(),
        state_dir: dir.join("state"),
        menu: None,
        tls: TlsFiles {
            ca: dir.join(bundle::CA_CERT),
            cert: dir.join(bundle::SITE_CERT),
            key: dir.join(bundle::SITE_KEY),
        },
        limits: Limits::default(),
        privacy: Default::default(),
        secure_aggregation: Default::default(),
        data: Default::default(),
        api: Default::default(),
    }
}

/// A running coordinator.
#[derive(Debug)]
pub struct RunningCoordinator {
    /// Its address.
    pub addr: SocketAddr,
    /// Where it serves `/metrics`.
    pub metrics: Option<SocketAddr>,
    /// Where it serves the admin API and dashboard.
    pub admin: Option<SocketAddr>,
    /// Completes when it stops.
    pub task: JoinHandle<Result<RunSummary, potluck_coordinator::ServeError>>,
    stop: watch::Sender<bool>,
}

impl RunningCoordinator {
    /// Bind and start a coordinator.
    pub fn start(config: CoordinatorConfig) -> anyhow::Result<Self> {
        let server = Server::bind(config)?;
        let addr = server.local_addr()?;
        let metrics = server.metrics_addr();
        let admin = server.admin_addr();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Ok(Self {
            addr,
            metrics,
            admin,
            task,
            stop,
        })
    }

    /// Stop it now and return what it did.
    pub async fn stop(self) -> anyhow::Result<RunSummary> {
        let _ = self.stop.send(true);
        Ok(tokio::time::timeout(Duration::from_secs(10), self.task).await???)
    }

    /// Wait for it to finish its rounds, at most `limit`.
    pub async fn finish(self, limit: Duration) -> anyhow::Result<RunSummary> {
        let result = tokio::time::timeout(limit, self.task).await;
        let _ = self.stop.send(true);
        Ok(result
            .map_err(|_| anyhow::anyhow!("coordinator did not finish within {limit:?}"))???)
    }
}

/// Running agents.
#[derive(Debug)]
pub struct RunningAgents {
    tasks: Vec<JoinHandle<Result<(), potluck_agent::AgentError>>>,
    stop: watch::Sender<bool>,
}

impl RunningAgents {
    /// Start one agent per config.
    pub fn start(configs: Vec<AgentConfig>) -> anyhow::Result<Self> {
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        for config in configs {
            let agent = Agent::new(config)?;
            let mut stopped = stop.subscribe();
            tasks.push(tokio::spawn(agent.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })));
        }
        Ok(Self { tasks, stop })
    }

    /// Stop them all and wait.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), task).await???;
        }
        Ok(())
    }
}
