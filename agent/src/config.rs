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
}

/// The privacy this site allows to be spent on its customers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyLimits {
    /// Largest epsilon per model lineage; past it the site trains no more for that lineage.
    pub max_epsilon: f64,
    /// The delta that epsilon is stated at.
    pub delta: f64,
    /// Refuse rounds without distributed differential privacy.
    pub require: bool,
}

impl Default for PrivacyLimits {
    fn default() -> Self {
        Self {
            max_epsilon: 8.0,
            delta: 1e-6,
            require: true,
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
