//! The experiment file: dataset, partitioning, faults, baselines, the
//! coordinator's own settings, and an optional sweep over any one setting.

use std::path::{Path, PathBuf};

use potluck_agent::simulation::Faults;
use serde::{Deserialize, Serialize};

/// Why an experiment file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a wrong or unknown field.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        reason: String,
    },
}

/// One experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Shown in outputs.
    #[serde(default = "default_name")]
    pub name: String,
    /// Seed of everything random: data, partition, training, noise, faults, cohorts.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Training rounds.
    pub rounds: u64,
    /// Where the orders come from.
    #[serde(default)]
    pub data: DataConfig,
    /// How customers are split into sites.
    #[serde(default)]
    pub partition: PartitionConfig,
    /// Faults injected at the sites.
    #[serde(default)]
    pub faults: Faults,
    /// Which reference models to train besides the federation.
    #[serde(default)]
    pub baselines: Baselines,
    /// Compute shared by the virtual sites.
    #[serde(default)]
    pub compute: Compute,
    /// Sections of `coordinator.toml` (`rounds`, `training`, `secagg`,
    /// `privacy`, `model`), passed to the real coordinator as written.
    #[serde(default)]
    pub coordinator: toml::Table,
    /// Run one experiment per value of one setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Sweep>,
}

fn default_name() -> String {
    "experiment".into()
}

fn default_seed() -> u64 {
    1
}

/// The source of the orders.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    /// The synthetic franchise generator (the seed is the experiment's).
    Synthetic {
        /// Sites (restaurants).
        #[serde(default = "default_synth_sites")]
        sites: usize,
        /// Customers per site.
        #[serde(default = "default_synth_customers")]
        customers_per_site: usize,
        /// Menu size (40 to 120).
        #[serde(default = "default_menu_items")]
        menu_items: usize,
        /// Days of history.
        #[serde(default = "default_days")]
        days: u32,
        /// Plant a bias: customers of this age band become a minority with
        /// tastes against the others' and sparse data (for fairness audits).
        #[serde(default)]
        planted_bias: Option<String>,
        /// The minority's share of customers, with `planted_bias`.
        #[serde(default = "default_bias_share")]
        bias_share: f64,
    },
    /// Orders CSVs in the import format: `menu.csv` and one `SITE.csv` per site.
    Csv {
        /// The directory.
        dir: PathBuf,
    },
    /// The UCI Online Retail file (CSV, optionally gzipped).
    OnlineRetail {
        /// The file.
        path: PathBuf,
        /// The menu: this many most-ordered products.
        #[serde(default = "default_retail_menu")]
        menu_items: usize,
    },
}

fn default_synth_sites() -> usize {
    10
}
fn default_synth_customers() -> usize {
    100
}
fn default_menu_items() -> usize {
    120
}
fn default_days() -> u32 {
    180
}
fn default_bias_share() -> f64 {
    potluck_shared::synth::PlantedBias::default_group().share
}
fn default_retail_menu() -> usize {
    300
}

impl Default for DataConfig {
    fn default() -> Self {
        Self::Synthetic {
            sites: default_synth_sites(),
            customers_per_site: default_synth_customers(),
            menu_items: default_menu_items(),
            days: default_days(),
            planted_bias: None,
            bias_share: default_bias_share(),
        }
    }
}

/// How customers are assigned to sites.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// `natural`, `iid` or `dirichlet`.
    #[serde(default)]
    pub scheme: Scheme,
    /// Sites to create (`iid` and `dirichlet`; `natural` keeps the data's own).
    #[serde(default)]
    pub sites: Option<usize>,
    /// Concentration of the Dirichlet split: small is skewed, large is near IID.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// A site needs this many customers with two orders or more (one to
    /// train on, one held out); smaller sites are merged into `site-other`,
    /// which is dropped if still too small.
    #[serde(default = "default_min_customers")]
    pub min_customers: usize,
}

fn default_alpha() -> f64 {
    0.5
}
fn default_min_customers() -> usize {
    10
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            scheme: Scheme::Natural,
            sites: None,
            alpha: default_alpha(),
            min_customers: default_min_customers(),
        }
    }
}

/// A partitioning scheme.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// By the data's own attribute: the site of a synthetic or CSV franchise,
    /// the country of Online Retail.
    #[default]
    Natural,
    /// Customers shuffled and dealt evenly.
    Iid,
    /// For each natural group, site shares drawn from Dirichlet(alpha).
    Dirichlet,
}

/// Reference models trained in the same run on the same held-out orders
/// (site popularity and GP-TopFreq are always evaluated, at the sites).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baselines {
    /// Each site trains alone, for as many rounds.
    #[serde(default = "yes")]
    pub local_only: bool,
    /// All sites' training data pooled (a research reference; never do this with real data).
    #[serde(default = "yes")]
    pub centralised: bool,
}

fn yes() -> bool {
    true
}

impl Default for Baselines {
    fn default() -> Self {
        Self {
            local_only: true,
            centralised: true,
        }
    }
}

/// Compute shared by the virtual sites.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    /// Training and evaluation jobs at once (default: the number of cores).
    pub slots: Option<usize>,
}

/// One setting, many values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// The setting's dotted path in this file, e.g. `coordinator.privacy.target_epsilon`.
    pub setting: String,
    /// Its values, one experiment each.
    pub values: Vec<toml::Value>,
}

/// An experiment file, read: the experiments it describes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The file.
    pub path: PathBuf,
    /// The sweep, if any.
    pub sweep: Option<Sweep>,
    /// One experiment per sweep value (one without a sweep), each with its
    /// label (`setting=value`) and paths resolved against the file's folder.
    pub experiments: Vec<(String, SimConfig)>,
}

impl Plan {
    /// Read and check an experiment file, with `overrides` (dotted path,
    /// value) applied over it.
    pub fn load(path: &Path, overrides: &[(String, toml::Value)]) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: name.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &name, base, overrides).map(|mut plan| {
            plan.path = path.to_path_buf();
            plan
        })
    }

    /// Parse an experiment file's text; `name` names it in errors, `base` resolves paths.
    pub fn parse(
        text: &str,
        name: &str,
        base: &Path,
        overrides: &[(String, toml::Value)],
    ) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: name.to_string(),
            reason,
        };
        let mut table: toml::Table = text.parse().map_err(|e| invalid(format!("{e}")))?;
        for (setting, value) in overrides {
            set_path(&mut table, setting, value.clone())
                .map_err(|e| invalid(format!("--set {e}")))?;
        }
        let sweep: Option<Sweep> = table
            .remove("sweep")
            .map(|v| v.try_into())
            .transpose()
            .map_err(|e| invalid(format!("sweep: {e}")))?;
        let variants = match &sweep {
            None => vec![(String::new(), table)],
            Some(sweep) => {
                if sweep.values.is_empty() {
                    return Err(invalid("sweep.values: give at least one value".into()));
                }
                sweep
                    .values
                    .iter()
                    .map(|value| {
                        let mut variant = table.clone();
                        set_path(&mut variant, &sweep.setting, value.clone())
                            .map_err(|e| invalid(format!("sweep.setting: {e}")))?;
                        Ok((format!("{}={}", sweep.setting, label(value)), variant))
                    })
                    .collect::<Result<_, ConfigError>>()?
            }
        };
        let experiments = variants
            .into_iter()
            .map(|(label, table)| {
                let mut config: SimConfig = toml::Value::Table(table)
                    .try_into()
                    .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
                config.resolve_paths(base);
                config.check().map_err(invalid)?;
                Ok((label, config))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self {
            path: PathBuf::from(name),
            sweep,
            experiments,
        })
    }
}

impl SimConfig {
    fn resolve_paths(&mut self, base: &Path) {
        match &mut self.data {
            DataConfig::Csv { dir } => *dir = base.join(&*dir),
            DataConfig::OnlineRetail { path, .. } => *path = base.join(&*path),
            DataConfig::Synthetic { .. } => {}
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.rounds == 0 {
            return Err("rounds: at least 1".into());
        }
        let p = &self.partition;
        match (p.scheme, p.sites) {
            (Scheme::Natural, Some(_)) => {
                return Err(
                    "partition.sites: the natural partition keeps the data's own sites; \
                     set it only with scheme = \"iid\" or \"dirichlet\""
                        .into(),
                );
            }
            (Scheme::Iid | Scheme::Dirichlet, None) => {
                return Err("partition.sites: required with this scheme".into());
            }
            (_, Some(sites)) if sites < 3 => {
                return Err("partition.sites: at least 3 (secure aggregation needs 3)".into());
            }
            _ => {}
        }
        if !(p.alpha > 0.0 && p.alpha.is_finite()) {
            return Err("partition.alpha: a positive number".into());
        }
        if let DataConfig::Synthetic { bias_share, .. } = &self.data
            && !(*bias_share > 0.0 && *bias_share < 1.0)
        {
            return Err("data.bias_share: a share of customers in (0, 1)".into());
        }
        let rates = &self.faults.dropout;
        for (name, rate) in [
            ("advertise", rates.advertise),
            ("share", rates.share),
            ("input", rates.input),
            ("unmask", rates.unmask),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("faults.dropout.{name}: a probability in [0, 1]"));
            }
        }
        if !(0.0..=1.0).contains(&self.faults.slow_fraction) {
            return Err("faults.slow_fraction: a fraction in [0, 1]".into());
        }
        for key in ["listen", "state_dir", "menu", "tls", "telemetry", "admin"] {
            if self.coordinator.contains_key(key) {
                return Err(format!(
                    "coordinator.{key}: set by the runner (loopback addresses and files of the run)"
                ));
            }
        }
        if let Some(0) = self.compute.slots {
            return Err("compute.slots: at least 1".into());
        }
        Ok(())
    }
}

/// Set `path` (dotted) in `table` to `value`, creating tables on the way.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts
        .pop()
        .filter(|p| !p.is_empty())
        .ok_or("an empty path")?;
    let mut current = table;
    for part in parts {
        current = current
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{path}: {part} is not a table"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// `KEY=VALUE` from the command line: VALUE as TOML (`2.0`, `false`,
/// `[1, 2]`), or as a string if it is not.
pub fn parse_override(text: &str) -> Result<(String, toml::Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    let value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

/// A value as it appears in labels and directory names.
pub fn label(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting of the coordinator, by its path under `coordinator`.
    fn coordinator_value<'a>(config: &'a SimConfig, path: &str) -> Option<&'a toml::Value> {
        let mut parts = path.split('.');
        let mut value = config.coordinator.get(parts.next()?)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    #[test]
    fn a_sweep_makes_one_experiment_per_value() {
        let plan = Plan::parse(
            "rounds = 3\n[coordinator.privacy]\ntarget_epsilon = 4.0\n\
             [sweep]\nsetting = \"coordinator.privacy.target_epsilon\"\nvalues = [1.0, 8.0]\n",
            "x.toml",
            Path::new("."),
            &[],
        )
        .expect("valid");
        let epsilons: Vec<_> = plan
            .experiments
            .iter()
            .map(|(label, c)| {
                (
                    label.as_str(),
                    coordinator_value(c, "privacy.target_epsilon").and_then(toml::Value::as_float),
                )
            })
            .collect();
        assert_eq!(
            epsilons,
            [
                ("coordinator.privacy.target_epsilon=1.0", Some(1.0)),
                ("coordinator.privacy.target_epsilon=8.0", Some(8.0))
            ]
        );
    }

    #[test]
    fn command_line_overrides_apply_before_checks() {
        let set = |text: &str| parse_override(text).expect("KEY=VALUE");
        let plan = Plan::parse(
            "rounds = 3\n",
            "x.toml",
            Path::new("."),
            &[
                set("seed=9"),
                set("coordinator.privacy.enabled=false"),
                set("name=run 2"),
            ],
        )
        .expect("valid");
        let config = &plan.experiments[0].1;
        assert_eq!((config.seed, config.name.as_str()), (9, "run 2"));
        assert_eq!(
            coordinator_value(config, "privacy.enabled"),
            Some(&toml::Value::Boolean(false))
        );
        let err = Plan::parse("rounds = 3\n", "x.toml", Path::new("."), &[set("rounds=0")])
            .expect_err("rounds 0");
        assert!(err.to_string().contains("rounds: at least 1"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |text: &str| {
            Plan::parse(text, "x.toml", Path::new("."), &[])
                .expect_err("invalid")
                .to_string()
        };
        assert!(err("rounds = 3\n[partition]\nscheme = \"iid\"\n").contains("partition.sites"));
        assert!(
            err("rounds = 3\n[faults.dropout]\ninput = 2.0\n").contains("faults.dropout.input")
        );
        assert!(err("rounds = 3\nroundz = 4\n").contains("roundz"));
        assert!(
            err("rounds = 3\n[coordinator]\nlisten = \"0.0.0.0:1\"\n")
                .contains("coordinator.listen")
        );
        assert!(
            err("rounds = 3\n[sweep]\nsetting = \"rounds.x\"\nvalues = [1]\n")
                .contains("sweep.setting")
        );
        assert!(
            err("rounds = 3\n[data]\nsource = \"synthetic\"\nplanted_bias = \"65+\"\nbias_share = 1.5\n")
                .contains("data.bias_share")
        );
    }
}
