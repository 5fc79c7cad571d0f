//! `potluck-coordinator`: the central team's command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use potluck_coordinator::dpia;
use potluck_coordinator::pki::{Enrollment, PkiDir};
use potluck_coordinator::report::{self, RoundLine};
use potluck_coordinator::roles::Role;
use potluck_coordinator::state::State;
use potluck_coordinator::{CoordinatorConfig, Server};
use potluck_shared::SiteId;
use potluck_shared::synth::{self, PlantedBias, SynthConfig};
use potluck_shared::tls::Validity;

/// The Potluck coordinator: runs the franchise CA, enrols sites, and combines
/// their model updates into a global model that it sends back to them.
#[derive(Debug, Parser)]
#[command(name = "potluck-coordinator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the franchise certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue a certificate to a site and write its bundle (certificate, key, CA, agent.toml).
    Enroll(EnrollArgs),
    /// Run training rounds with the enrolled sites.
    Serve {
        /// The coordinator's configuration file.
        #[arg(long, default_value = "/etc/potluck/coordinator.toml")]
        config: PathBuf,
    },
    /// Print a starter coordinator.toml for a PKI directory made by `ca init`.
    ConfigTemplate {
        /// The PKI directory, as the config should name it.
        #[arg(long, default_value = "pki")]
        pki: String,
        /// The UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
    },
    /// Generate a synthetic franchise: menu.csv and one orders CSV per site.
    Synth(SynthArgs),
    /// Privacy arithmetic: epsilon of a training plan, or the noise a target needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Write a draft data protection impact assessment (DPIA) from the
    /// configuration and the privacy ledger, for the data-protection officer.
    Dpia {
        /// The coordinator's configuration file.
        #[arg(long, default_value = "/etc/potluck/coordinator.toml")]
        config: PathBuf,
        /// Where to write the Markdown draft (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Model versions: list, show, export to a file, roll back.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Sites: list them, revoke a site's certificate.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Admin API tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The coordinator's tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Stop opening rounds, or start again (a round in progress finishes).
    #[command(subcommand)]
    Training(TrainingCommand),
    /// Ask the running coordinator's admin API what it is doing.
    Status {
        /// The coordinator's configuration file (for the admin address).
        #[arg(long, default_value = "/etc/potluck/coordinator.toml")]
        config: PathBuf,
        /// A token of any role (or set POTLUCK_ADMIN_TOKEN).
        #[arg(long, env = "POTLUCK_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print a per-round table from metrics.jsonl and compare the final model with baselines.
    Report {
        /// The coordinator's metrics.jsonl.
        #[arg(long)]
        metrics: PathBuf,
        /// JSON lines from `potluck-agent local-only --json`, to compare with.
        #[arg(long)]
        local_only: Option<PathBuf>,
        /// Print the comparison as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Where the coordinator's configuration is; every state command takes it.
#[derive(Debug, Args)]
struct ConfigArg {
    /// The coordinator's configuration file (its state_dir holds the database).
    #[arg(long, default_value = "/etc/potluck/coordinator.toml")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// List the model versions.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one version: where it came from and how it evaluated.
    Show {
        /// The version.
        version: u64,
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a version to a file (the encoded `GlobalModel`, readable with
    /// `potluck_shared::model::GlobalModel::read_file`).
    Export {
        /// The version.
        version: u64,
        #[command(flatten)]
        config: ConfigArg,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make an earlier version's parameters current again, as a new version,
    /// once the round in progress ends. Audited.
    Rollback {
        /// The version to return to.
        version: u64,
        #[command(flatten)]
        config: ConfigArg,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Serve a version the fairness gate held (or any stored version): the
    /// running coordinator sends it to the sites as the model they recommend
    /// with. Audited with the reason and the audit's objections.
    Release {
        /// The version to serve.
        version: u64,
        #[command(flatten)]
        config: ConfigArg,
        /// Why it may be served despite its audit, for the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Sites that have connected: last seen, rounds joined, dropouts, revoked.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Refuse the site's certificate from its next handshake on (and close its
    /// connection now). Re-enrol the site (`enroll --force`) to admit it again. Audited.
    Revoke {
        /// The site.
        site: SiteId,
        #[command(flatten)]
        config: ConfigArg,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once and stored only hashed.
    Create {
        /// A name for the token, written to the audit log with what it changes.
        #[arg(long)]
        name: String,
        /// viewer (status, rounds, sites, metrics, dashboard), auditor (also the
        /// audit log, privacy ledger and DPIA) or operator (also stop/start,
        /// rollback, revoke).
        #[arg(long, value_enum)]
        role: Role,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List tokens (names and roles, never secrets).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a token.
    Revoke {
        /// Its name.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain; names the first entry edited, removed or reordered (exit 1).
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// An anchor written earlier by `audit anchor`: the log must still
        /// hold the entry it names, unchanged (a wiped or rewritten log fails).
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the head of the verified log (its last entry's number and hash)
    /// as JSON: an anchor for the auditor to keep away from the coordinator
    /// and pass to `audit verify --anchor` later.
    Anchor {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The fairness audit of a model version: HR@10 and NDCG@10 per group
    /// with 95% intervals, worst-to-best ratios, category exposure and its
    /// largest gaps, and changes against the previous released version.
    Fairness {
        #[command(flatten)]
        config: ConfigArg,
        /// The version (default: the latest audited).
        #[arg(long = "model")]
        version: Option<u64>,
        /// Print one JSON object instead of Markdown.
        #[arg(long)]
        json: bool,
        /// Also write the Markdown report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the last entries.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TrainingCommand {
    /// Open no new rounds until `training start`.
    Stop {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Open rounds again.
    Start {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the franchise CA and the coordinator's certificate.
    Init {
        /// Directory for the CA (created with mode 0700; keys are written with mode 0600).
        #[arg(long)]
        dir: PathBuf,
        /// The franchise's name, written into every certificate.
        #[arg(long)]
        franchise: String,
        /// Extra DNS names or IP addresses the coordinator is reached at
        /// (coordinator, localhost and 127.0.0.1 are always included).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity of the CA and coordinator certificates, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every site must then be re-enrolled).
        #[arg(long)]
        force: bool,
        /// Write the coordinator's credentials and the CA certificate here
        /// instead, without the CA key: the directory to copy to the
        /// coordinator's machine, while `--dir` (the CA key, and `enroll`)
        /// stays offline with the CA's custodian.
        #[arg(long)]
        coordinator_out: Option<PathBuf>,
    },
}

/// The RDP accountant on the Poisson-subsampled (continuous) Gaussian mechanism,
/// converted to (epsilon, delta) as Google's dp-accounting `RdpAccountant` does.
#[derive(Debug, Subcommand)]
enum PrivacyCommand {
    /// Epsilon spent by T rounds with noise multiplier Z, each customer sampled with probability Q.
    Epsilon {
        /// Noise standard deviation over the clip norm (z).
        #[arg(long, value_parser = positive)]
        noise_multiplier: f64,
        #[command(flatten)]
        plan: PrivacyPlan,
    },
    /// The smallest noise multiplier that keeps T rounds within a target epsilon.
    Noise {
        /// The target epsilon.
        #[arg(long, value_parser = positive)]
        epsilon: f64,
        #[command(flatten)]
        plan: PrivacyPlan,
    },
}

#[derive(Debug, Args)]
struct PrivacyPlan {
    /// Probability that a customer is sampled in a round (q), in (0, 1].
    #[arg(long, value_parser = sampling_rate)]
    sampling_rate: f64,
    /// Number of rounds (T).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Delta, in (0, 1): the probability the epsilon bound may fail.
    #[arg(long, value_parser = delta)]
    delta: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

fn sampling_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{text:?} is not a probability in (0, 1]")),
    }
}

fn delta(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number in (0, 1)")),
    }
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The PKI directory made by `ca init`.
    #[arg(long)]
    pki: PathBuf,
    /// The site's ID: 1 to 64 lowercase letters, digits or '-'.
    #[arg(long)]
    site: SiteId,
    /// Directory to write the site's bundle to.
    #[arg(long)]
    out: PathBuf,
    /// The coordinator's address, written into agent.toml.
    #[arg(long, default_value = "127.0.0.1:7443")]
    coordinator: SocketAddr,
    /// The franchise menu to include in the bundle (for imports before the first connection).
    #[arg(long)]
    menu: Option<PathBuf>,
    /// Certificate validity in days.
    #[arg(long, default_value_t = 397)]
    days: u32,
    /// Re-enrol a site that has a certificate already.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Number of sites.
    #[arg(long, default_value_t = SynthConfig::default().sites)]
    sites: usize,
    /// Customers per site.
    #[arg(long, default_value_t = SynthConfig::default().customers_per_site)]
    customers: usize,
    /// Menu items (40 to 120).
    #[arg(long, default_value_t = SynthConfig::default().menu_items)]
    menu_items: usize,
    /// Days of order history.
    #[arg(long, default_value_t = SynthConfig::default().days)]
    days: u32,
    /// Seed; the same settings and seed give the same data.
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    seed: u64,
    /// Leave out the audit-only age_band and gender columns.
    #[arg(long)]
    no_sensitive: bool,
    /// Plant a bias to show the fairness audit catches it: customers of this
    /// age band (e.g. 65+) become a minority with different tastes and sparse data.
    #[arg(long, value_name = "AGE_BAND", conflicts_with = "no_sensitive")]
    planted_bias: Option<String>,
    /// The minority's share of customers, with --planted-bias.
    #[arg(long, default_value_t = PlantedBias::default_group().share, requires = "planted_bias", value_parser = sampling_rate)]
    bias_share: f64,
}

mod ops;

fn main() -> Result<()> {
    potluck_shared::service::init_logging();
    match Cli::parse().command {
        Command::Ca(CaCommand::Init {
            dir,
            franchise,
            hosts,
            days,
            force,
            coordinator_out,
        }) => {
            let out = coordinator_out.as_deref();
            PkiDir::new(&dir).init(&franchise, &hosts, days, force, out)?;
            match out {
                Some(out) => println!(
                    "created the {franchise} CA in {} (keep it offline: only `enroll` needs it) \
                     and the coordinator's credentials in {} (no CA key)",
                    dir.display(),
                    out.display()
                ),
                None => println!(
                    "created the {franchise} CA and the coordinator certificate in {}",
                    dir.display()
                ),
            }
            Ok(())
        }
        Command::Enroll(args) => enroll(args),
        Command::Serve { config } => serve(&config),
        Command::ConfigTemplate { pki, listen } => {
            print!("{}", CoordinatorConfig::starter(&pki, listen));
            Ok(())
        }
        Command::Synth(args) => generate(args),
        Command::Privacy(command) => privacy(command),
        Command::Dpia { config, out } => dpia(&config, out.as_deref()),
        Command::Model(command) => ops::model(command),
        Command::Site(command) => ops::site(command),
        Command::Token(command) => ops::token(command),
        Command::Audit(command) => ops::audit(command),
        Command::Training(command) => ops::training(command),
        Command::Status {
            config,
            token,
            json,
        } => ops::status(&config, &token, json),
        Command::Report {
            metrics,
            local_only,
            json,
        } => report(&metrics, local_only.as_deref(), json),
    }
}

fn dpia(config_path: &Path, out: Option<&Path>) -> Result<()> {
    let config =
        CoordinatorConfig::load(config_path).context("loading the coordinator configuration")?;
    // Read the ledger if the coordinator has run; never create its state here.
    let state = match State::open_existing(&config.state_dir) {
        Ok(state) => Some(state),
        Err(potluck_coordinator::state::StateError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let text = dpia::draft(&config, &config_path.display().to_string(), state.as_ref())
        .map_err(anyhow::Error::msg)?;
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote a draft DPIA to {}: complete the points marked [DPO]",
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn privacy(command: PrivacyCommand) -> Result<()> {
    use potluck_shared::dp::{Step, accountant};
    match command {
        PrivacyCommand::Epsilon {
            noise_multiplier,
            plan,
        } => {
            let step = Step::gaussian(plan.sampling_rate, noise_multiplier);
            let spent = accountant::epsilon(&step, plan.steps, plan.delta);
            if plan.json {
                let out = serde_json::json!({"epsilon": spent.epsilon, "order": spent.order});
                println!("{out}");
            } else {
                println!(
                    "epsilon {:.4} at delta {} (best Renyi order {}) after {} rounds, q = {}, z = {}",
                    spent.epsilon,
                    plan.delta,
                    spent.order,
                    plan.steps,
                    plan.sampling_rate,
                    noise_multiplier
                );
            }
        }
        PrivacyCommand::Noise { epsilon, plan } => {
            let z = accountant::calibrate(epsilon, plan.sampling_rate, plan.steps, plan.delta)
                .with_context(|| {
                    format!(
                        "no noise multiplier up to 10^4 keeps {} rounds within epsilon {epsilon}",
                        plan.steps
                    )
                })?;
            if plan.json {
                println!("{}", serde_json::json!({"noise_multiplier": z}));
            } else {
                println!(
                    "noise multiplier {z:.4} keeps {} rounds at q = {} within epsilon {epsilon} at delta {}",
                    plan.steps, plan.sampling_rate, plan.delta
                );
            }
        }
    }
    Ok(())
}

fn enroll(args: EnrollArgs) -> Result<()> {
    let request = Enrollment {
        site: args.site.clone(),
        out: args.out.clone(),
        coordinator: args.coordinator,
        menu: args.menu,
        validity: Validity::days_from_now(args.days),
        force: args.force,
    };
    PkiDir::new(&args.pki).enroll(&request)?;
    println!("enrolled site {} -> {}", args.site, args.out.display());
    Ok(())
}

fn serve(config: &Path) -> Result<()> {
    let config =
        CoordinatorConfig::load(config).context("loading the coordinator configuration")?;
    let ca_key = config.pki_dir().ca_key();
    if ca_key.exists() {
        tracing::warn!(
            path = %ca_key.display(),
            "the franchise CA key is on the coordinator's machine: whoever runs the coordinator \
             can issue certificates in sites' names. Sites pin the peers they have met, but for \
             the guarantees in docs/architecture.md keep the CA key offline with its custodian \
             (it is needed only by `enroll`)"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(config)?;
        let summary = server
            .run(potluck_shared::service::shutdown_signal())
            .await?;
        tracing::info!(
            rounds = summary.rounds_completed,
            abandoned = summary.rounds_abandoned,
            model_version = summary.model_version,
            "coordinator stopped"
        );
        Ok(())
    })
}

fn generate(args: SynthArgs) -> Result<()> {
    let config = SynthConfig {
        seed: args.seed,
        sites: args.sites,
        customers_per_site: args.customers,
        menu_items: args.menu_items,
        days: args.days,
        sensitive_columns: !args.no_sensitive,
        planted_bias: args.planted_bias.map(|age_band| PlantedBias {
            age_band,
            share: args.bias_share,
        }),
        ..SynthConfig::default()
    };
    let franchise = synth::generate(&config);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let menu_path = args.out.join("menu.csv");
    let file = std::fs::File::create(&menu_path)
        .with_context(|| format!("writing {}", menu_path.display()))?;
    franchise.menu.write_csv(file)?;
    for site in &franchise.sites {
        let path = args.out.join(format!("{}.csv", site.site));
        let file =
            std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        synth::write_orders_csv(&site.rows, file)?;
    }
    println!(
        "wrote {} ({} items) and {} site order files to {}",
        menu_path.display(),
        franchise.menu.len(),
        franchise.sites.len(),
        args.out.display()
    );
    Ok(())
}

fn report(metrics: &Path, local_only: Option<&Path>, json: bool) -> Result<()> {
    let rounds: Vec<RoundLine> = report::read_lines(metrics)?;
    let local = match local_only {
        Some(path) => report::read_lines(path)?,
        None => Vec::new(),
    };
    let comparison = report::compare(&rounds, local);
    if json {
        println!("{}", serde_json::to_string(&comparison)?);
    } else {
        print!(
            "{}\n{}",
            report::table(&rounds),
            report::describe(&comparison)
        );
    }
    Ok(())
}
