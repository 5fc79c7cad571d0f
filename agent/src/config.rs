//! `agent.toml`: where the coordinator is, the site's credentials, its state.
//!
//! Relative paths are resolved against the directory of the config file, so a
//! site bundle can be moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use potluck_shared::SiteId;
use potluck_shared::wire::frame::DEFAULT_MAX_FRAME;
use serde::Deserialize;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with the field and line.
        message: String,
    },
}

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This site's ID; must match the site certificate.
    pub site_id: SiteId,
    /// The coordinator's UDP address.
    pub coordinator: SocketAddr,
    /// The name in the coordinator's certificate to verify.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Where the store and other state live.
    pub state_dir: PathBuf,
    /// The franchise menu, used to validate imports until the coordinator has sent one.
    #[serde(default)]
    pub menu: Option<PathBuf>,
    /// Certificate files.
    pub tls: TlsFiles,
    /// Limits on what the coordinator may send.
    #[serde(default)]
    pub limits: Limits,
    /// This site's own privacy limits, enforced whatever the coordinator asks.
    #[serde(default)]
    pub privacy: PrivacyLimits,
    /// The least this site accepts of a round's secure aggregation: the
    /// smallest cohort, and how many cohort members it assumes may collude
    /// with the coordinator (raising the threshold it needs and the
    /// privacy it charges per round).
    #[serde(default)]
    pub secure_aggregation: potluck_shared::secagg::Floor,
    /// Which data is kept, for what, and for how long.
    #[serde(default)]
    pub data: DataPolicy,
    /// The local recommendations API.
    #[serde(default)]
    pub api: ApiConfig,
}

/// The columns every orders CSV has; the model is trained on them.
pub const ORDER_COLUMNS: [&str; 5] = [
    "customer_id",
    "order_id",
    "timestamp",
    "item_id",
    "quantity",
];

/// Why a column is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Training and evaluating the model at this site (the order columns only).
    Training,
    /// Fairness audits at this site only: never a model feature, never sent.
    AuditOnly,
}

impl Purpose {
    /// The name used in `agent.toml` and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::AuditOnly => "audit_only",
        }
    }
}

/// Minimisation and retention (`[data]` in `agent.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPolicy {
    /// Columns kept besides the order columns and `consent`, with their
    /// purpose; every other column is dropped at import.
    pub columns: std::collections::BTreeMap<String, Purpose>,
    /// Orders older than this many days are purged (none: kept until erased).
    pub retention_days: Option<u32>,
}

impl DataPolicy {
    /// Check the declarations: the order columns can only be for training,
    /// and any other column only for audits (the model has no feature for it).
    pub fn check(&self) -> Result<(), String> {
        for (column, purpose) in &self.columns {
            let order_column = ORDER_COLUMNS.contains(&column.as_str());
            match purpose {
                _ if column == "consent" => {
                    return Err(
                        "data.columns.consent: the consent column is always read and needs no purpose".to_string(),
                    );
                }
                Purpose::AuditOnly if order_column => {
                    return Err(format!(
                        "data.columns.{column}: an order column is what the model trains on; its purpose can only be \"training\""
                    ));
                }
                Purpose::Training if !order_column => {
                    return Err(format!(
                        "data.columns.{column}: purpose \"training\" is only for the order columns ({}); the model has no feature for {column:?}, so it can only be kept as \"audit_only\" (never a model feature, never sent)",
                        ORDER_COLUMNS.join(", ")
                    ));
                }
                _ => {}
            }
        }
        if self.retention_days == Some(0) {
            return Err("data.retention_days: must be at least 1 (leave it out to keep orders until erased)".into());
        }
        Ok(())
    }

    /// The audit-only columns.
    pub fn audit_columns(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|(_, p)| **p == Purpose::AuditOnly)
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// The local HTTP API the till asks for recommendations (`[api]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve it while the agent runs (off unless configured; the starter
    /// configuration turns it on).
    pub enabled: bool,
    /// Where to listen; keep it on localhost unless a firewall guards the port.
    pub listen: SocketAddr,
    /// File holding the bearer token (created with a random token, mode
    /// 0600, if absent); default `STATE_DIR/api.token`.
    pub token_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8477)),
            token_file: None,
        }
    }
}

/// The privacy this site allows to be spent on its customers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyLimits {
    /// Largest epsilon spent on this site's customers, every round it takes
    /// part in together, whatever lineage the coordinator names it; past it
    /// the site takes part in no private round.
    pub max_epsilon: f64,
    /// The delta that epsilon is stated at.
    pub delta: f64,
    /// Count only rounds of the last this many days (the budget renews:
    /// "epsilon per customer per rolling year" is 365); unset counts every
    /// round ever recorded.
    pub window_days: Option<u32>,
    /// Refuse rounds without distributed differential privacy.
    pub require: bool,
    /// Send the coordinator this site's exact evaluation counts of every
    /// model it receives. They are not noised nor charged, and the model and
    /// menu are the coordinator's choice, so a crafted model turns them into
    /// exact counts of customers with given histories: only for research on
    /// synthetic or otherwise public data. Off, the site evaluates each model
    /// for its own log and sends an empty report.
    pub dangerous_plain_evaluation: bool,
}

impl Default for PrivacyLimits {
    fn default() -> Self {
        Self {
            max_epsilon: 8.0,
            delta: 1e-6,
            window_days: None,
            require: true,
            dangerous_plain_evaluation: false,
        }
    }
}

impl PrivacyLimits {
    /// Refuse limits that would make the ledger meaningless.
    pub fn check(&self) -> Result<(), String> {
        if !(self.max_epsilon.is_finite() && self.max_epsilon >= 0.0) {
            return Err(format!(
                "[privacy] max_epsilon must be a number of 0 or more, got {}",
                self.max_epsilon
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "[privacy] delta must be between 0 and 1, got {}",
                self.delta
            ));
        }
        if self.window_days == Some(0) {
            return Err("[privacy] window_days must be at least 1 (or unset)".into());
        }
        Ok(())
    }

    /// The cap the ledger enforces.
    pub fn cap(&self) -> potluck_shared::dp::Cap {
        potluck_shared::dp::Cap {
            max_epsilon: self.max_epsilon,
            delta: self.delta,
            window_secs: self.window_days.map(|d| u64::from(d) * 86_400),
        }
    }
}

/// Paths of the site's PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The franchise CA certificate.
    pub ca: PathBuf,
    /// The site certificate.
    pub cert: PathBuf,
    /// The site's private key.
    pub key: PathBuf,
}

/// Size limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME,
        }
    }
}

/// Refuse a secure-aggregation floor that cannot be what was meant.
fn check_floor(floor: &potluck_shared::secagg::Floor) -> Result<(), String> {
    let z = floor.min_noise_multiplier;
    if !(z.is_finite() && z >= 0.0) {
        return Err(format!(
            "[secure_aggregation] min_noise_multiplier must be a number of 0 or more, got {z}"
        ));
    }
    Ok(())
}

fn default_server_name() -> String {
    potluck_shared::tls::COORDINATOR_NAME.to_string()
}

fn default_max_frame() -> usize {
    DEFAULT_MAX_FRAME
}

impl AgentConfig {
    /// Read and resolve a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: name.clone(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: name,
            message: e.to_string(),
        })?;
        config
            .data
            .check()
            .and_then(|()| config.privacy.check())
            .and_then(|()| check_floor(&config.secure_aggregation))
            .map_err(|message| ConfigError::Parse {
                path: path.display().to_string(),
                message,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        Ok(config)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.state_dir);
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(menu) = &mut self.menu {
            fix(menu);
        }
        if let Some(token) = &mut self.api.token_file {
            fix(token);
        }
    }

    /// The API's bearer token file.
    pub fn token_path(&self) -> PathBuf {
        self.api
            .token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("api.token"))
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("store.redb")
    }

    /// The store file, after creating the state directory (mode 0700: it
    /// holds the site's keys and customer data).
    pub fn store_path_created(&self) -> Result<PathBuf, ConfigError> {
        let io = |source| ConfigError::Io {
            path: self.state_dir.display().to_string(),
            source,
        };
        if !self.state_dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(&self.state_dir).map_err(io)?;
        }
        Ok(self.store_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starter_config_parses_and_resolves() {
        let site = SiteId::new("s-1").unwrap();
        let text = potluck_shared::bundle::agent_toml(
            &site,
            "127.0.0.1:7443".parse().unwrap(),
            "coordinator",
            true,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        assert_eq!(config.site_id, site);
        assert_eq!(config.tls.key, dir.path().join("site.key"));
        assert_eq!(config.menu, Some(dir.path().join("menu.csv")));
    }

    #[test]
    fn purposes_are_checked() {
        let policy = |text: &str| -> Result<(), String> {
            let policy: DataPolicy = toml::from_str(text).map_err(|e| e.to_string())?;
            policy.check()
        };
        policy("columns = { age_band = \"audit_only\", item_id = \"training\" }").unwrap();
        let err = policy("columns = { gender = \"training\" }").unwrap_err();
        assert!(
            err.contains("data.columns.gender") && err.contains("audit_only"),
            "{err}"
        );
        let err = policy("columns = { item_id = \"audit_only\" }").unwrap_err();
        assert!(err.contains("data.columns.item_id"), "{err}");
        let err = policy("columns = { age = \"marketing\" }").unwrap_err();
        assert!(err.contains("marketing"), "{err}");
        assert!(
            policy("retention_days = 0")
                .unwrap_err()
                .contains("retention_days")
        );
    }

    #[test]
    fn privacy_limits_and_floors_that_mean_nothing_are_refused_naming_the_field() {
        let site = SiteId::new("s-1").unwrap();
        let starter = potluck_shared::bundle::agent_toml(
            &site,
            "127.0.0.1:7443".parse().unwrap(),
            "c",
            false,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        for (from, to, field) in [
            ("max_epsilon = 8.0", "max_epsilon = -1.0", "max_epsilon"),
            ("delta = 1e-6", "delta = 2.0", "delta"),
            (
                "require = true",
                "require = true\nwindow_days = 0",
                "window_days",
            ),
            (
                "min_noise_multiplier = 0.0",
                "min_noise_multiplier = -2.0",
                "min_noise_multiplier",
            ),
        ] {
            assert!(starter.contains(from), "{from}");
            std::fs::write(&path, starter.replace(from, to)).unwrap();
            let err = AgentConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("agent.toml"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "site_id = \"BAD\"\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("agent.toml") && err.contains("site_id"),
            "{err}"
        );
    }
}
