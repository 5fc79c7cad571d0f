//! `potluck-agent`: the site agent's command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use potluck_agent::Agent;
use potluck_agent::audit::AuditLog;
use potluck_agent::config::AgentConfig;
use potluck_agent::dataset::SiteData;
use potluck_agent::evaluation::evaluate;
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::recommend::{Request, recommend};
use potluck_agent::retention::{Purge, purge_expired};
use potluck_agent::store::{DEFAULT_WAIT, SiteStore};
use potluck_agent::subject::{Export, TRAINING_AND_ERASURE};
use potluck_agent::training::train_rounds;
use potluck_shared::SiteId;
use potluck_shared::model::{Menu, ModelSpec};
use potluck_shared::service::systemd;
use potluck_shared::wire::TrainSettings;
use time::OffsetDateTime;

/// The Potluck site agent: keeps this site's customer orders, trains the
/// franchise's recommendation model locally, and sends only clipped, noised
/// model updates to the coordinator.
#[derive(Debug, Parser)]
#[command(name = "potluck-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import an orders CSV into the site's store.
    ///
    /// Columns: customer_id, order_id, timestamp (RFC 3339), item_id,
    /// quantity, and optionally consent (true/false); columns declared
    /// audit_only in [data] columns of agent.toml are kept, encrypted, as
    /// customer attributes; all others are dropped and named in the report.
    /// Orders older than [data] retention_days are not stored. A bad row
    /// fails the whole import and nothing is written, unless --skip-invalid
    /// is given. Importing the same file twice adds nothing.
    Import {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// The orders CSV.
        file: PathBuf,
        /// Import the valid rows and write the invalid ones to a rejects file.
        #[arg(long)]
        skip_invalid: bool,
        /// Where to write rejected rows (default: FILE.rejects.csv).
        #[arg(long, requires = "skip_invalid")]
        rejects: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grant or withdraw a customer's consent to the use of their orders for training.
    ///
    /// A withdrawal takes effect from the next round: the customer's orders are
    /// no longer sampled, trained on or evaluated. Their orders stay in the
    /// store.
    #[command(group(clap::ArgGroup::new("change").required(true).args(["grant", "withdraw"])))]
    Consent {
        #[command(flatten)]
        who: CustomerArgs,
        /// Record consent.
        #[arg(long)]
        grant: bool,
        /// Record a withdrawal.
        #[arg(long)]
        withdraw: bool,
    },
    /// Delete orders older than [data] retention_days now (the running agent
    /// also does it every hour); the purge is written to the audit log.
    Purge {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recommend items for a customer, as the till's API does.
    ///
    /// Uses the latest global model this site has received. Customers without
    /// consent, unknown to the site or without orders, and everyone while the
    /// site has no model, get the site's popular items, flagged as such.
    Recommend {
        #[command(flatten)]
        who: CustomerArgs,
        /// How many items.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
        k: u16,
        /// Say why each item is recommended.
        #[arg(long)]
        explain: bool,
        /// The time of the order, RFC 3339 (default: now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
    },
    /// Data-subject requests: export, rectify or erase what this site holds about a customer.
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// The site's tamper-evident audit log (STATE_DIR/audit.jsonl).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The global model this site uses.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Peers' keys as this site first met them in secure aggregation: a peer
    /// showing another key is refused (a re-issued certificate may be an
    /// impersonation) until its pin is forgotten here.
    #[command(subcommand)]
    Peers(PeersCommand),
    /// The privacy spent on this site's customers and what is left: every
    /// private round it took part in, whatever lineage each was named.
    Privacy {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connect to the coordinator and take part in training rounds until stopped.
    Run {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
    },
    /// Train a model on this site's data alone and evaluate it (a research baseline).
    ///
    /// Uses the menu and model shape of the latest global model received, or
    /// of the configured menu, and the same training settings as a round.
    LocalOnly {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// Rounds of local training (each of the default epochs).
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Seed of the initial model and of shuffling.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which customer a command is about, and how to answer.
#[derive(Debug, clap::Args)]
struct CustomerArgs {
    /// The agent's configuration file.
    #[arg(long, default_value = "/etc/potluck/agent.toml")]
    config: PathBuf,
    /// The customer, as in the orders CSV.
    #[arg(long)]
    customer: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

impl CustomerArgs {
    fn open(&self) -> Result<(AgentConfig, SiteStore)> {
        let config = load_config(&self.config)?;
        let store = open_store(&config)?;
        Ok((config, store))
    }
}

#[derive(Debug, Subcommand)]
enum SubjectCommand {
    /// Everything held about a customer, with purposes, retention and what training did with it.
    Export {
        #[command(flatten)]
        who: CustomerArgs,
    },
    /// Correct one order line: set its quantity, or remove it.
    #[command(group(clap::ArgGroup::new("change").required(true).args(["quantity", "remove"])))]
    Rectify {
        #[command(flatten)]
        who: CustomerArgs,
        /// The order identifier.
        #[arg(long)]
        order: String,
        /// The menu item of the line.
        #[arg(long)]
        item: String,
        /// The correct quantity.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        quantity: Option<u32>,
        /// Remove the line.
        #[arg(long)]
        remove: bool,
    },
    /// Delete everything held about a customer and destroy their encryption key.
    Erase {
        #[command(flatten)]
        who: CustomerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Use a model file written by `potluck-coordinator model export` (say, a
    /// rolled-back version while the coordinator is unreachable). The model's
    /// menu must be the site's. The coordinator's next model replaces it. Audited.
    Load {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// The model file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PeersCommand {
    /// List the pinned peers and the SHA-256 of each one's key.
    List {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a peer's pin, once you know its site was re-enrolled on
    /// purpose (ask its operator); its next key is pinned when next met. Audited.
    Forget {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// The peer site.
        #[arg(long)]
        site: SiteId,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every entry against the hash chain; name the first edited,
    /// removed or reordered entry. Exits with status 1 if the log was tampered with.
    Verify {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
        /// An anchor written earlier by `audit anchor`: the log must still
        /// hold the entry it names, unchanged (a wiped or rewritten log fails).
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the head of the verified log (its last entry's number and hash)
    /// as JSON: an anchor for the auditor to keep away from this machine and
    /// pass to `audit verify --anchor` later.
    Anchor {
        /// The agent's configuration file.
        #[arg(long, default_value = "/etc/potluck/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    potluck_shared::service::init_logging();
    match Cli::parse().command {
        Command::Import {
            config,
            file,
            skip_invalid,
            rejects,
            json,
        } => import(
            &config,
            &file,
            ImportOptions {
                skip_invalid,
                rejects,
                ..ImportOptions::default()
            },
            json,
        ),
        Command::Purge { config, json } => purge(&config, json),
        Command::Recommend {
            who,
            k,
            explain,
            at,
        } => recommend_items(&who, usize::from(k), explain, at),
        Command::Run { config } => run(&config),
        Command::Privacy { config, json } => privacy(&config, json),
        Command::Peers(PeersCommand::List { config, json }) => peers_list(&config, json),
        Command::Peers(PeersCommand::Forget { config, site }) => peers_forget(&config, &site),
        Command::Consent {
            who,
            grant,
            withdraw: _,
        } => consent(&who, grant),
        Command::Audit(AuditCommand::Verify {
            config,
            anchor,
            json,
        }) => audit_verify(&config, anchor.as_deref(), json),
        Command::Audit(AuditCommand::Anchor { config }) => audit_anchor(&config),
        Command::Model(ModelCommand::Load { config, file }) => load_model(&config, &file),
        Command::Subject(command) => subject(command),
        Command::LocalOnly {
            config,
            rounds,
            seed,
            json,
        } => local_only(&config, rounds, seed, json),
    }
}

fn load_config(path: &Path) -> Result<AgentConfig> {
    AgentConfig::load(path).context("loading the agent configuration")
}

fn open_store(config: &AgentConfig) -> Result<SiteStore> {
    let path = config.store_path_created()?;
    Ok(SiteStore::open_waiting(&path, DEFAULT_WAIT)?)
}

/// The menu to validate against: the coordinator's latest, else the configured file.
fn menu(config: &AgentConfig, store: &SiteStore) -> Result<Menu> {
    if let Some(menu) = store.menu()? {
        return Ok(menu);
    }
    match &config.menu {
        Some(path) => Ok(Menu::load(path)?),
        None => bail!(
            "no menu yet: set `menu` in the agent configuration or connect to the coordinator once"
        ),
    }
}

fn import(config: &Path, file: &Path, options: ImportOptions, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let store = open_store(&config)?;
    let menu = menu(&config, &store)?;
    let options = options.with_policy(&config.data, OffsetDateTime::now_utc());
    let report = import_file(&store, file, &menu, &options)?;
    let c = &report.counts;
    let audit = AuditLog::new(&config.state_dir);
    audit.append(
        "import",
        serde_json::json!({
            "file": report.file,
            "rows": report.rows,
            "added": c.added,
            "unchanged": c.unchanged,
            "updated": c.updated,
            "new_customers": c.new_customers,
            "rejected": report.rejected,
            "past_retention": report.past_retention,
            "kept_columns": report.kept_columns,
            "dropped_columns": report.dropped_columns,
        }),
    )?;
    let purged = purge_expired(&store, &config.data, &audit, OffsetDateTime::now_utc())?;
    if json {
        let mut out = serde_json::to_value(&report)?;
        out["purge"] = serde_json::to_value(purged)?;
        println!("{out}");
    } else {
        let c = &report.counts;
        println!(
            "{}: {} rows read; {} order lines added, {} unchanged, {} updated; {} new customers",
            report.file, report.rows, c.added, c.unchanged, c.updated, c.new_customers
        );
        if let Some(rejects) = &report.rejects_file {
            println!(
                "{} rows rejected, written with reasons to {rejects}",
                report.rejected
            );
        }
        let kept: Vec<String> = report
            .kept_columns
            .iter()
            .map(|k| format!("{} ({})", k.column, k.purpose))
            .collect();
        println!("columns kept: {}", kept.join(", "));
        if !report.dropped_columns.is_empty() {
            println!(
                "columns dropped (not declared in [data] columns): {}",
                report.dropped_columns.join(", ")
            );
        }
        if report.past_retention > 0 {
            println!(
                "{} order lines older than the retention period were not stored",
                report.past_retention
            );
        }
        if let Some(p) = purged.filter(|p| p.deleted.order_lines > 0) {
            print_purge(&p);
        }
    }
    Ok(())
}

fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time: {e}"))
}

fn recommend_items(
    who: &CustomerArgs,
    k: usize,
    explain: bool,
    at: Option<OffsetDateTime>,
) -> Result<()> {
    let (config, store) = who.open()?;
    let menu = config.menu.as_deref().map(Menu::load).transpose()?;
    let request = Request {
        customer: &who.customer,
        k,
        at,
    };
    let answer = recommend(&store, menu, &request)?;
    if who.json {
        println!("{}", serde_json::to_string(&answer)?);
        return Ok(());
    }
    match (answer.fallback, answer.model_version) {
        (None, Some(version)) => println!(
            "for customer {} (personalised, model version {version}):",
            who.customer
        ),
        (Some(why), _) => println!(
            "for customer {} (not personalised: {}; the site's popular items):",
            who.customer,
            why.describe()
        ),
        (None, None) => println!("for customer {}:", who.customer),
    }
    for (rank, item) in answer.items.iter().enumerate() {
        println!(
            "{:>3}. {} ({}, {})  score {:.3}",
            rank + 1,
            item.name,
            item.item_id,
            item.category,
            item.score
        );
        if explain {
            println!("     {}", item.explanation);
        }
    }
    Ok(())
}

fn purge(config: &Path, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let store = open_store(&config)?;
    let audit = AuditLog::new(&config.state_dir);
    let purged = purge_expired(&store, &config.data, &audit, OffsetDateTime::now_utc())?;
    if json {
        println!("{}", serde_json::json!({ "purge": purged }));
        return Ok(());
    }
    match purged {
        Some(p) => print_purge(&p),
        None => println!(
            "no retention period set ([data] retention_days): orders are kept until erased"
        ),
    }
    Ok(())
}

fn load_model(config: &Path, file: &Path) -> Result<()> {
    let config = load_config(config)?;
    let model = potluck_shared::model::GlobalModel::read_file(file)?;
    let store = open_store(&config)?;
    let menu = menu(&config, &store)?;
    if menu != model.spec.menu {
        bail!(
            "{}: the model's menu ({} items) is not this site's menu ({} items); nothing changed",
            file.display(),
            model.spec.menu.len(),
            menu.len()
        );
    }
    store.save_model(&model)?;
    AuditLog::new(&config.state_dir).append(
        "model_loaded",
        serde_json::json!({
            "version": model.version.0,
            "spec": model.spec.hash().to_string(),
            "file": file.display().to_string(),
        }),
    )?;
    println!(
        "loaded model version {} ({} parameters) from {}; recommendations use it until the coordinator sends a newer one",
        model.version,
        model.params.len(),
        file.display()
    );
    Ok(())
}

fn print_purge(p: &Purge) {
    println!(
        "retention {} days: {} order lines deleted, {} customers left without orders deleted with their keys",
        p.retention_days, p.deleted.order_lines, p.deleted.customers
    );
}

fn consent(who: &CustomerArgs, grant: bool) -> Result<()> {
    let (config, store) = who.open()?;
    let (customer, json) = (who.customer.as_str(), who.json);
    if !store.set_consent(customer, grant)? {
        bail!("customer {customer:?} is not in this site's store; nothing changed");
    }
    let audit = AuditLog::new(&config.state_dir);
    let change = if grant { "granted" } else { "withdrawn" };
    audit.append(
        "consent",
        serde_json::json!({"pseudonym": store.pseudonym(customer), "consent": change}),
    )?;
    if json {
        println!(
            "{}",
            serde_json::json!({"customer": customer, "consent": change})
        );
    } else if grant {
        println!("consent granted: customer {customer} takes part in training from the next round");
    } else {
        println!(
            "consent withdrawn: customer {customer} is left out of training and evaluation from the next round"
        );
    }
    Ok(())
}

fn subject(command: SubjectCommand) -> Result<()> {
    match command {
        SubjectCommand::Export { who } => {
            let (config, store) = who.open()?;
            let CustomerArgs { customer, json, .. } = who;
            let data = store.export(&customer)?;
            audit_request(&config, &store, "subject_export", &customer, data.is_some())?;
            let Some(data) = data else {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"customer": customer, "found": false})
                    );
                } else {
                    println!("this site holds nothing about customer {customer}");
                }
                return Ok(());
            };
            let export = Export::new(&data, &config.data);
            if json {
                println!("{}", serde_json::to_string(&export)?);
            } else {
                print!("{}", export.describe());
            }
        }
        SubjectCommand::Rectify {
            who,
            order,
            item,
            quantity,
            remove: _,
        } => {
            let (config, store) = who.open()?;
            let CustomerArgs { customer, json, .. } = who;
            if !store.rectify(&customer, &order, &item, quantity)? {
                bail!(
                    "customer {customer:?} has no line for item {item:?} in order {order:?}; nothing changed"
                );
            }
            audit_request(&config, &store, "subject_rectify", &customer, true)?;
            let change = quantity.map_or("removed".to_string(), |q| format!("quantity {q}"));
            if json {
                println!(
                    "{}",
                    serde_json::json!({"customer": customer, "order": order, "item": item, "change": change})
                );
            } else {
                println!("order {order}, item {item} of customer {customer}: {change}");
            }
        }
        SubjectCommand::Erase { who } => {
            let (config, store) = who.open()?;
            let CustomerArgs { customer, json, .. } = who;
            let erased = store.erase(&customer)?;
            audit_request(
                &config,
                &store,
                "subject_erase",
                &customer,
                erased.is_some(),
            )?;
            if json {
                let out = serde_json::json!({
                    "customer": customer,
                    "found": erased.is_some(),
                    "order_lines_deleted": erased.unwrap_or(0),
                    "key_destroyed": erased.is_some(),
                    "models_already_trained": TRAINING_AND_ERASURE,
                });
                println!("{out}");
            } else {
                match erased {
                    Some(lines) => println!(
                        "erased customer {customer}: {lines} order lines deleted, encryption key destroyed\n\n{TRAINING_AND_ERASURE}"
                    ),
                    None => println!(
                        "this site holds nothing about customer {customer}; nothing to erase"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// Record a data-subject request in the audit log (by pseudonym).
fn audit_request(
    config: &AgentConfig,
    store: &SiteStore,
    event: &str,
    customer: &str,
    found: bool,
) -> Result<()> {
    AuditLog::new(&config.state_dir).append(
        event,
        serde_json::json!({"pseudonym": store.pseudonym(customer), "found": found}),
    )?;
    Ok(())
}

fn audit_anchor(config: &Path) -> Result<()> {
    let config = load_config(config)?;
    let head = AuditLog::new(&config.state_dir).anchor()?;
    println!("{}", serde_json::to_string(&head)?);
    Ok(())
}

fn audit_verify(config: &Path, anchor: Option<&Path>, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let audit = AuditLog::new(&config.state_dir);
    let anchor: potluck_shared::audit::Head = match anchor {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the anchor {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not an audit anchor", path.display()))?
        }
        None => Default::default(),
    };
    let result = audit.verify_anchored(&anchor);
    if json {
        let out = match &result {
            Ok(entries) => serde_json::json!({"ok": true, "entries": entries}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        };
        println!("{out}");
    }
    match result {
        Ok(entries) => {
            if !json {
                println!(
                    "{}: {entries} entries, chain intact",
                    audit.path().display()
                );
            }
            Ok(())
        }
        Err(e) if json => {
            tracing::error!("{e}");
            std::process::exit(1)
        }
        Err(e) => Err(e.into()),
    }
}

fn peers_list(config: &Path, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let pins = open_store(&config)?.pins()?;
    let fingerprint = |key: &[u8; 32]| potluck_shared::audit::sha256_hex(key);
    if json {
        let out: serde_json::Map<String, serde_json::Value> = pins
            .iter()
            .map(|(site, key)| (site.to_string(), fingerprint(key).into()))
            .collect();
        println!("{}", serde_json::Value::Object(out));
        return Ok(());
    }
    if pins.is_empty() {
        println!("no peers pinned yet (they are pinned when first met in a round)");
    }
    for (site, key) in &pins {
        println!("{site}  {}", fingerprint(key));
    }
    Ok(())
}

fn peers_forget(config: &Path, site: &SiteId) -> Result<()> {
    let config = load_config(config)?;
    let found = open_store(&config)?.forget_pin(site)?;
    AuditLog::new(&config.state_dir).append(
        "peer_pin_forgotten",
        serde_json::json!({"site": site, "found": found}),
    )?;
    if found {
        println!("forgot the pin of {site}: its next key is pinned when next met");
    } else {
        println!("{site} was not pinned");
    }
    Ok(())
}

fn privacy(config: &Path, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let store = open_store(&config)?;
    let now = potluck_shared::dp::unix_seconds(std::time::SystemTime::now());
    let spent = store.ledger()?.spent(&config.privacy.cap(), now);
    let window = config.privacy.window_days;
    if json {
        let mut out = serde_json::to_value(&spent)?;
        out["remaining"] = spent.remaining().into();
        out["window_days"] = window.into();
        println!("{out}");
        return Ok(());
    }
    let period = match window {
        Some(days) => format!("in the last {days} days"),
        None => "in all".to_string(),
    };
    println!(
        "epsilon {:.4} spent {period} over {} charges (rounds and one-off releases; lineages: {}); {:.4} left of this site's maximum {} (delta {})",
        spent.epsilon,
        spent.rounds,
        if spent.lineages.is_empty() {
            "none".to_string()
        } else {
            spent.lineages.join(", ")
        },
        spent.remaining(),
        spent.max_epsilon,
        spent.delta
    );
    Ok(())
}

fn run(config: &Path) -> Result<()> {
    let config = load_config(config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let agent = Agent::new(config)?;
        let result = agent.run(potluck_shared::service::shutdown_signal()).await;
        systemd::stopping();
        Ok(result?)
    })
}

fn local_only(config: &Path, rounds: u32, seed: u64, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let store = open_store(&config)?;
    let spec = match store.model()? {
        Some(model) => model.spec,
        None => ModelSpec::new(menu(&config, &store)?),
    };
    let histories = store.histories(&spec.menu, true)?;
    let data = SiteData::prepare(&histories, spec.menu.len(), spec.history_decay);
    let settings = TrainSettings::default();
    let params = train_rounds(
        &spec,
        spec.initial_params(seed),
        &data.train,
        &settings,
        rounds,
        seed,
    )?;
    let counts = evaluate(&spec, &params, &data)?;
    let (hr, ndcg) = counts.model.means(counts.cases).unwrap_or((0.0, 0.0));
    if json {
        let out = serde_json::json!({
            "site": config.site_id.as_str(),
            "cases": counts.cases,
            "hr_at_10": hr,
            "ndcg_at_10": ndcg,
            "rounds": rounds,
        });
        println!("{out}");
    } else {
        println!(
            "{}: local-only model after {rounds} rounds: HR@10 {hr:.3}, NDCG@10 {ndcg:.3} on {} held-out orders",
            config.site_id, counts.cases
        );
    }
    Ok(())
}
