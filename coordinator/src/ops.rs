//! The binary's state commands (`model`, `site`, `token`, `audit`, `training`,
//! `status`): declared in `main.rs`, not part of the library. They open the
//! coordinator's database directly (whoever can read the state directory is
//! an administrator already) and write changes there, audited as `cli:USER`;
//! a running coordinator picks them up within seconds.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use potluck_coordinator::admin::Status;
use potluck_coordinator::state::{ModelRecord, State};
use potluck_coordinator::{CoordinatorConfig, fairness};

use crate::{AuditCommand, ModelCommand, SiteCommand, TokenCommand, TrainingCommand};

fn open(config: &Path) -> Result<(CoordinatorConfig, State)> {
    let config =
        CoordinatorConfig::load(config).context("loading the coordinator configuration")?;
    let state = State::open_existing(&config.state_dir)?;
    Ok((config, state))
}

/// Who a CLI change is audited as.
fn cli_user() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

pub fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::List { config, json } => {
            let (_, state) = open(&config.config)?;
            let models = state.models()?;
            if json {
                return print_json(&models);
            }
            println!(
                "{:>8}  {:<25}  {:>6}  origin",
                "version", "created", "round"
            );
            for m in &models {
                println!(
                    "{:>8}  {:<25}  {:>6}  {}{}{}",
                    m.version,
                    m.created_at,
                    m.round.map_or("-".into(), |r| r.to_string()),
                    origin(m),
                    if m.current { "  (current)" } else { "" },
                    if m.status.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", m.status)
                    }
                );
            }
            Ok(())
        }
        ModelCommand::Show {
            version,
            config,
            json,
        } => {
            let (_, state) = open(&config.config)?;
            let Some(record) = state.models()?.into_iter().find(|m| m.version == version) else {
                bail!("there is no model version {version}; `model list` shows the versions");
            };
            let metrics = state
                .rounds(None)?
                .into_iter()
                .find(|r| r.model_version == Some(version))
                .and_then(|r| r.metrics);
            if json {
                return print_json(&serde_json::json!({"model": record, "metrics": metrics}));
            }
            println!("model version {}", record.version);
            println!("  created      {}", record.created_at);
            println!("  origin       {}", origin(&record));
            println!("  spec         {}", record.spec_hash);
            println!("  parameters   {}", record.parameters);
            println!("  current      {}", record.current);
            if let Some(m) = metrics {
                let figure = |key: &str| {
                    m[key]
                        .as_f64()
                        .map_or("n/a".to_string(), |v| format!("{v:.4}"))
                };
                println!(
                    "  HR@10        {} (popularity {}, personal {})",
                    figure("eval_hr_at_10"),
                    figure("baseline_popularity_hr_at_10"),
                    figure("baseline_personal_hr_at_10")
                );
                println!("  NDCG@10      {}", figure("eval_ndcg_at_10"));
                println!("  epsilon      {}", figure("epsilon"));
                println!(
                    "  sites        {} ({} dropped)",
                    m["participants"], m["dropped"]
                );
            }
            Ok(())
        }
        ModelCommand::Export {
            version,
            config,
            out,
        } => {
            let (_, state) = open(&config.config)?;
            let Some(model) = state.model(version)? else {
                bail!("there is no model version {version}; `model list` shows the versions");
            };
            model.write_file(&out)?;
            println!(
                "wrote model version {version} ({} parameters, spec {}) to {}",
                model.params.len(),
                model.spec.hash(),
                out.display()
            );
            Ok(())
        }
        ModelCommand::Rollback {
            version,
            config,
            reason,
        } => {
            let (_, mut state) = open(&config.config)?;
            state.request_rollback(version, &cli_user(), &reason)?;
            println!(
                "rollback to version {version} requested: the coordinator makes it current as a \
                 new version once the round in progress ends (or at its next start)"
            );
            Ok(())
        }
        ModelCommand::Release {
            version,
            config,
            reason,
        } => {
            let (_, mut state) = open(&config.config)?;
            state.request_release(version, &cli_user(), &reason)?;
            println!(
                "release of version {version} requested: the running coordinator sends it to the                  sites within seconds (or at its next start); audited with your reason"
            );
            Ok(())
        }
    }
}

fn origin(m: &ModelRecord) -> String {
    match (m.round, m.rolled_back_from) {
        (_, Some(from)) => format!("rollback to v{from}"),
        (Some(round), None) => format!("round {round}"),
        (None, None) => "initial".into(),
    }
}

pub fn site(command: SiteCommand) -> Result<()> {
    match command {
        SiteCommand::List { config, json } => {
            let (_, state) = open(&config.config)?;
            let sites = state.sites()?;
            if json {
                return print_json(&sites);
            }
            println!(
                "{:<20}  {:<25}  {:>6}  {:>8}  status",
                "site", "last seen", "joined", "dropouts"
            );
            for s in &sites {
                println!(
                    "{:<20}  {:<25}  {:>6}  {:>8}  {}",
                    s.site,
                    s.last_seen,
                    s.rounds_joined,
                    s.dropouts,
                    if s.revoked { "revoked" } else { "enrolled" }
                );
            }
            Ok(())
        }
        SiteCommand::Revoke {
            site,
            config,
            reason,
        } => {
            let (config, mut state) = open(&config.config)?;
            let issued = config.pki_dir().issued_fingerprint(&site)?;
            let revoked = state.revoke_site(&site, issued, &cli_user(), &reason)?;
            println!(
                "revoked {} certificate(s) of site {site}; it is refused from its next handshake. \
                 To admit it again, re-enrol it (potluck-coordinator enroll --site {site} --force ...) \
                 and have every other site forget its old key (potluck-agent peers forget --site {site})",
                revoked.len()
            );
            Ok(())
        }
    }
}

pub fn token(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create { name, role, config } => {
            // Tokens may be made before the coordinator's first start.
            let config = CoordinatorConfig::load(&config.config)
                .context("loading the coordinator configuration")?;
            let mut state = State::open(&config.state_dir)?;
            let secret = state.create_token(&name, role)?;
            println!("{secret}");
            eprintln!(
                "created {role} token {name:?} in {}; it is shown only now (the coordinator keeps its hash)",
                state.path().display()
            );
            Ok(())
        }
        TokenCommand::List { config, json } => {
            let (_, state) = open(&config.config)?;
            let tokens = state.tokens()?;
            if json {
                return print_json(&tokens);
            }
            for t in &tokens {
                println!("{:<24}  {:<8}  created {}", t.name, t.role, t.created_at);
            }
            Ok(())
        }
        TokenCommand::Revoke { name, config } => {
            let (_, mut state) = open(&config.config)?;
            state.revoke_token(&name)?;
            println!("revoked token {name:?}");
            Ok(())
        }
    }
}

pub fn audit(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Anchor { config } => {
            let (_, state) = open(&config.config)?;
            state
                .verify_audit()?
                .map_err(|t| anyhow::anyhow!("audit log TAMPERED: {t}"))?;
            print_json(&serde_json::to_value(state.audit_head()?)?)
        }
        AuditCommand::Verify {
            config,
            anchor,
            json,
        } => {
            let (_, state) = open(&config.config)?;
            let anchor: potluck_shared::audit::Head = match anchor {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading the anchor {}", path.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not an audit anchor", path.display()))?
                }
                None => Default::default(),
            };
            let verified = state.verify_audit_anchored(&anchor)?;
            let where_ = state.path().display().to_string();
            if json {
                print_json(&serde_json::json!({
                    "log": where_,
                    "intact": verified.is_ok(),
                    "entries": verified.as_ref().ok(),
                    "problem": verified.as_ref().err().map(ToString::to_string),
                }))?;
            }
            match verified {
                Ok(entries) => {
                    if !json {
                        println!("{where_}: audit log intact, {entries} entries");
                    }
                    Ok(())
                }
                Err(tamper) => {
                    if !json {
                        eprintln!(
                            "{where_}: audit log TAMPERED: {tamper} (\"line\" is the entry's position)"
                        );
                    }
                    std::process::exit(1);
                }
            }
        }
        AuditCommand::Fairness {
            config,
            version,
            json,
            out,
        } => {
            let (_, state) = open(&config.config)?;
            let Some(view) = fairness::view(&state, version)? else {
                bail!(
                    "{}: no fairness audit{} yet; audits run when [audit] is configured and                      training finishes (or every audit.every_rounds rounds)",
                    state.path().display(),
                    version.map_or(String::new(), |v| format!(" of model version {v}"))
                );
            };
            let text = fairness::markdown(&view);
            if let Some(path) = &out {
                std::fs::write(path, &text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                print_json(&view)
            } else {
                print!("{text}");
                Ok(())
            }
        }
        AuditCommand::Tail {
            config,
            limit,
            json,
        } => {
            let (_, state) = open(&config.config)?;
            for entry in state.audit_tail(limit)? {
                if json {
                    print_json(&entry)?;
                } else {
                    println!(
                        "{:>6}  {}  {:<20}  {}",
                        entry.seq, entry.time, entry.event, entry.details
                    );
                }
            }
            Ok(())
        }
    }
}

pub fn training(command: TrainingCommand) -> Result<()> {
    let (config, stopped) = match command {
        TrainingCommand::Stop { config } => (config, true),
        TrainingCommand::Start { config } => (config, false),
    };
    let (_, mut state) = open(&config.config)?;
    state.set_training_stopped(stopped, &cli_user())?;
    println!(
        "{}",
        if stopped {
            "training stopped: no new round opens (a round in progress finishes)"
        } else {
            "training started: rounds open when enough sites are connected"
        }
    );
    Ok(())
}

pub fn status(config: &Path, token: &str, json: bool) -> Result<()> {
    let config =
        CoordinatorConfig::load(config).context("loading the coordinator configuration")?;
    let Some(addr) = config.admin.listen else {
        bail!("the admin API is off ([admin] listen is not set)");
    };
    let url = format!("http://{addr}/api/v1/status");
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = http
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("calling {url}: is the coordinator running?"))?;
    let body = response.body_mut().read_to_string()?;
    if !response.status().is_success() {
        bail!("{url}: {}: {body}", response.status());
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: Status = serde_json::from_str(&body).context("reading the status")?;
    let live = &status.live;
    println!(
        "franchise        {}",
        live["franchise"].as_str().unwrap_or("?")
    );
    println!(
        "training         {}",
        live["training"].as_str().unwrap_or("?")
    );
    if let Some(window) = live["window"].as_str() {
        println!("window           {window}");
    }
    println!("model version    {}", live["model_version"]);
    println!(
        "round            {}",
        live["current_round"]
            .as_u64()
            .map_or("none in progress".into(), |r| r.to_string())
    );
    println!("rounds completed {}", status.rounds_completed);
    let connected = live["connected"].as_array().map_or(0, Vec::len);
    println!(
        "sites            {connected} connected of {} known ({} revoked; {} needed per round)",
        status.sites_known, status.sites_revoked, live["min_sites"]
    );
    if let (Some(spent), Some(target)) = (
        live["epsilon_spent"].as_f64(),
        live["target_epsilon"].as_f64(),
    ) {
        println!(
            "privacy          epsilon {spent:.3} spent of {target} ({:.3} left)",
            target - spent
        );
    }
    Ok(())
}
