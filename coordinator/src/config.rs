//! `coordinator.toml`. Relative paths are resolved against the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use potluck_shared::dp::{PrivacyUnit, Step, accountant};
use potluck_shared::fairness::Gate;
use potluck_shared::model::ModelDims;
use potluck_shared::round::{
    AuditPolicy, OptimizerKind, PrivacyPolicy, RoundConfig, ServerOptimizer,
};
use potluck_shared::wire::TrainSettings;
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
    /// The file is not valid for this configuration.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// The coordinator's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// UDP address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where models, metrics and round state are kept.
    pub state_dir: PathBuf,
    /// The franchise menu (item_id,name,category).
    pub menu: PathBuf,
    /// The franchise CA and the coordinator's certificate.
    pub tls: TlsFiles,
    /// Round lifecycle settings.
    #[serde(default)]
    pub rounds: RoundsSection,
    /// Local training and privacy settings sent to sites.
    #[serde(default)]
    pub training: TrainSettings,
    /// Model shape.
    #[serde(default)]
    pub model: ModelSection,
    /// Secure aggregation.
    #[serde(default)]
    pub secagg: SecAggSection,
    /// Limits on what sites may send.
    #[serde(default)]
    pub limits: Limits,
    /// Distributed differential privacy and the budget.
    #[serde(default)]
    pub privacy: PrivacySection,
    /// Fairness audits and the release gate; absent: every model is served at once.
    pub audit: Option<AuditSection>,
    /// Prometheus metrics.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// When rounds may open.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// The admin API and dashboard.
    #[serde(default)]
    pub admin: AdminSection,
}

/// `[schedule]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSection {
    /// Daily window when rounds may open, e.g. "22:00-06:00"; absent: any time.
    pub window: Option<String>,
    /// The franchise's IANA time zone, e.g. "Europe/Paris".
    pub time_zone: String,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            window: None,
            time_zone: "UTC".into(),
        }
    }
}

impl ScheduleSection {
    /// The parsed schedule.
    pub fn schedule(&self) -> Result<crate::schedule::Schedule, String> {
        crate::schedule::Schedule::new(self.window.as_deref(), &self.time_zone)
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Where the admin API and the dashboard are served (a loopback address:
    /// reach it through an SSH tunnel or a TLS proxy); absent: not served.
    pub listen: Option<SocketAddr>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9478))),
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// Where `/metrics` is served (a loopback address); absent: not served.
    pub listen: Option<SocketAddr>,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9477))),
        }
    }
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacySection {
    /// Distributed differential privacy (needs secure aggregation).
    pub enabled: bool,
    /// The model lineage the budget belongs to; sites keep their ledgers by it.
    pub lineage: String,
    /// Whose privacy is protected: "customer" (default) or "site".
    pub unit: PrivacyUnit,
    /// The budget: epsilon for the whole lineage...
    pub target_epsilon: f64,
    /// ...at this delta.
    pub delta: f64,
    /// Probability that a customer is sampled in a round.
    pub sampling_rate: f64,
    /// L2 bound of one customer's (or site's) contribution.
    pub clip_norm: f32,
    /// Noise on the sum over the clip norm; absent: the smallest that fits
    /// `planned_rounds` into the budget.
    pub noise_multiplier: Option<f64>,
    /// Rounds the budget is calibrated for; absent: `rounds.max_rounds`.
    pub planned_rounds: Option<u64>,
    /// Noise multiplier of each site's one-off release of its popularity
    /// prior (0: private rounds train without it). Charged once per lineage.
    pub prior_noise_multiplier: f64,
    /// Noise multiplier of the lineage's one census of the franchise's item
    /// neighbours, a securely summed round before the first training round
    /// (0: no census; new items are then ranked by popularity alone).
    /// Charged once per lineage.
    pub neighbour_noise_multiplier: f64,
    /// Adaptive clipping: the share of customers whose update should fit the
    /// clip norm, which then follows it from `clip_norm` (absent: fixed).
    pub clip_quantile: Option<f64>,
    /// How fast adaptive clipping moves the clip norm.
    pub clip_learning_rate: f64,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            enabled: true,
            lineage: "default".into(),
            unit: PrivacyUnit::Customer,
            target_epsilon: 4.0,
            delta: 1e-6,
            sampling_rate: 0.2,
            clip_norm: 0.5,
            noise_multiplier: None,
            planned_rounds: None,
            prior_noise_multiplier: 10.0,
            neighbour_noise_multiplier: 4.0,
            clip_quantile: Some(0.5),
            clip_learning_rate: 0.2,
        }
    }
}

impl PrivacySection {
    /// The sites' prior release, if private rounds use one.
    pub fn prior_step(&self) -> Option<Step> {
        potluck_shared::dp::distributed::prior_step(self.prior_noise_multiplier)
    }

    /// The neighbour census, if the lineage makes one: a Gaussian mechanism
    /// over every customer, like the prior.
    pub fn census_step(&self) -> Option<Step> {
        potluck_shared::dp::distributed::prior_step(self.neighbour_noise_multiplier)
    }

    /// The lineage's one-off releases, each charged once: the prior, the census.
    pub fn one_off_steps(&self) -> impl Iterator<Item = Step> {
        self.prior_step().into_iter().chain(self.census_step())
    }

    /// The noise multiplier: as configured, or calibrated to the budget.
    pub fn noise_multiplier(
        &self,
        max_rounds: Option<u64>,
        audit: Option<&AuditSection>,
    ) -> Result<f64, String> {
        if let Some(z) = self.noise_multiplier {
            return Ok(z);
        }
        let rounds = self.planned_rounds.or(max_rounds).ok_or(
            "privacy.noise_multiplier or privacy.planned_rounds (or rounds.max_rounds) must be set \
             to calibrate the noise to the budget",
        )?;
        let q = self.unit.sampling_rate(self.sampling_rate);
        // Fairness audits and the prior release are charged to the same budget.
        let reserve: Vec<(Step, u64)> = audit
            .map(|a| (Step::gaussian(1.0, a.noise_multiplier), a.audits(rounds)))
            .into_iter()
            .chain(self.one_off_steps().map(|step| (step, 1)))
            .collect();
        let z = accountant::calibrate_with_reserve(
            self.target_epsilon,
            q,
            rounds,
            self.delta,
            &reserve,
        )
        .ok_or_else(|| {
            format!(
                "privacy: no noise multiplier fits {rounds} rounds{} into epsilon {} beside \
                 the prior release (prior_noise_multiplier {}) and the neighbour census \
                 (neighbour_noise_multiplier {}); raise either (0 turns it off) or the target, or \
                 plan fewer rounds",
                if audit.is_some() {
                    " and the final fairness audit"
                } else {
                    ""
                },
                self.target_epsilon,
                self.prior_noise_multiplier,
                self.neighbour_noise_multiplier,
            )
        })?;
        // A hair above the continuous calibration, for the discrete correction.
        Ok(z * 1.001)
    }
}

/// `[audit]`: fairness audits of model versions before they are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Audit-only attributes and their groups, e.g.
    /// `age_band = ["18-24", "25-34"]`; other values count as one more group.
    pub attributes: std::collections::BTreeMap<String, Vec<String>>,
    /// Groups with fewer customers than this are not reported.
    #[serde(default = "default_min_group_size")]
    pub min_group_size: u64,
    /// Noise on the per-group sums over one customer's bound.
    #[serde(default = "default_audit_noise")]
    pub noise_multiplier: f64,
    /// Audit every this many rounds as well as the final version (0: final only).
    #[serde(default)]
    pub every_rounds: u64,
    /// δ of the audit's ε when `[privacy]` is off (else privacy.delta).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Ledger lineage of audits when `[privacy]` is off (else privacy.lineage).
    #[serde(default = "default_audit_lineage")]
    pub lineage: String,
    /// The release gate: thresholds a version must meet to be served.
    #[serde(default)]
    pub gate: Gate,
}

impl AuditSection {
    /// Audits over `rounds` rounds: every `every_rounds`, and the final version.
    pub fn audits(&self, rounds: u64) -> u64 {
        match self.every_rounds {
            0 => 1,
            every => rounds.div_ceil(every),
        }
    }
}

fn default_min_group_size() -> u64 {
    20
}

fn default_audit_noise() -> f64 {
    3.0
}

fn default_delta() -> f64 {
    1e-6
}

fn default_audit_lineage() -> String {
    "audit".into()
}

/// `[secagg]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggSection {
    /// Shares needed to unmask (absent: more than two thirds of each cohort).
    pub threshold: Option<usize>,
    /// Bits of the modulus updates are summed in (16 to 32).
    pub modulus_bits: u32,
    /// Seconds for each phase other than masked input (which has `rounds.train_timeout_secs`).
    pub phase_timeout_secs: f64,
    /// Combine updates in the clear: the coordinator then sees every site's update.
    pub dangerous_disable_secure_aggregation: bool,
}

impl Default for SecAggSection {
    fn default() -> Self {
        let d = RoundConfig::default();
        Self {
            threshold: d.threshold,
            modulus_bits: d.modulus_bits,
            phase_timeout_secs: d.secagg_phase_timeout.as_secs_f64(),
            dangerous_disable_secure_aggregation: !d.secure_aggregation,
        }
    }
}

/// Paths of the coordinator's PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The franchise CA certificate.
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub cert: PathBuf,
    /// The coordinator's private key.
    pub key: PathBuf,
}

/// `[rounds]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsSection {
    /// Updates needed for a round to count, and sites needed to open one.
    pub min_sites: usize,
    /// Sites asked per round, drawn at random from those connected; absent: all of them.
    pub cohort_size: Option<usize>,
    /// Seed of the cohort draw.
    pub cohort_seed: u64,
    /// Stop once the lineage has this many completed rounds (rounds before a
    /// restart count); absent: train until stopped.
    pub max_rounds: Option<u64>,
    /// Seconds sites have to send updates.
    pub train_timeout_secs: f64,
    /// Seconds sites have to report evaluation.
    pub eval_timeout_secs: f64,
    /// Seconds to wait after an abandoned round.
    pub retry_delay_secs: f64,
    /// Seconds to wait for more sites once `min_sites` are connected, before the first round.
    pub cohort_wait_secs: f64,
    /// Step size applied to the averaged update.
    pub server_learning_rate: f32,
    /// How the averaged update is applied: `sgd` (FedAvg), `momentum`
    /// (FedAvgM) or `adam` (FedAdam).
    pub server_optimizer: OptimizerKind,
    /// β₁ of momentum or Adam.
    pub server_momentum: f32,
    /// β₂ of Adam.
    pub server_beta2: f32,
    /// τ of Adam (its adaptivity).
    pub server_tau: f32,
}

impl Default for RoundsSection {
    fn default() -> Self {
        let d = RoundConfig::default();
        Self {
            min_sites: d.min_sites,
            cohort_size: d.cohort_size,
            cohort_seed: d.cohort_seed,
            max_rounds: d.max_rounds,
            train_timeout_secs: d.train_timeout.as_secs_f64(),
            eval_timeout_secs: d.eval_timeout.as_secs_f64(),
            retry_delay_secs: d.retry_delay.as_secs_f64(),
            cohort_wait_secs: d.cohort_wait.as_secs_f64(),
            server_learning_rate: d.server_optimizer.learning_rate,
            server_optimizer: d.server_optimizer.kind,
            server_momentum: d.server_optimizer.momentum,
            server_beta2: d.server_optimizer.beta2,
            server_tau: d.server_optimizer.tau,
        }
    }
}

impl RoundsSection {
    /// The server optimizer these settings describe.
    pub fn server_optimizer(&self) -> ServerOptimizer {
        ServerOptimizer {
            kind: self.server_optimizer,
            learning_rate: self.server_learning_rate,
            momentum: self.server_momentum,
            beta2: self.server_beta2,
            tau: self.server_tau,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Width of item embeddings.
    pub embedding: usize,
    /// Width of each context embedding.
    pub context: usize,
    /// Width of the hidden layer.
    pub hidden: usize,
    /// Recency decay of history pooling.
    pub history_decay: f32,
    /// Seed of the initial model.
    pub seed: u64,
}

impl Default for ModelSection {
    fn default() -> Self {
        let dims = ModelDims::default();
        Self {
            embedding: dims.embedding,
            context: dims.context,
            hidden: dims.hidden,
            history_decay: 0.8,
            seed: 1,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted from a site, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME,
        }
    }
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:7443".parse().expect("valid address")
}

impl CoordinatorConfig {
    /// Read, resolve and check a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: name.clone(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: name.clone(),
            message: e.to_string(),
        })?;
        config.resolve(path.parent().unwrap_or(Path::new(".")));
        config.check().map_err(|message| ConfigError::Invalid {
            path: name,
            message,
        })?;
        Ok(config)
    }

    fn resolve(&mut self, base: &Path) {
        for p in [
            &mut self.state_dir,
            &mut self.menu,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Reject settings that cannot work, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let r = &self.rounds;
        let t = &self.training;
        let positive = [
            ("rounds.train_timeout_secs", r.train_timeout_secs),
            ("rounds.eval_timeout_secs", r.eval_timeout_secs),
            ("training.learning_rate", f64::from(t.learning_rate)),
            ("training.clip_norm", f64::from(t.clip_norm)),
            (
                "rounds.server_learning_rate",
                f64::from(r.server_learning_rate),
            ),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{field} must be a positive number, got {value}"));
            }
        }
        r.server_optimizer()
            .check()
            .map_err(|e| format!("[rounds] {e}"))?;
        for (field, value) in [
            ("rounds.retry_delay_secs", r.retry_delay_secs),
            ("rounds.cohort_wait_secs", r.cohort_wait_secs),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("{field} must not be negative, got {value}"));
            }
        }
        if !(t.noise_std.is_finite() && t.noise_std >= 0.0) {
            return Err("training.noise_std must not be negative".into());
        }
        if r.min_sites == 0 {
            return Err("rounds.min_sites must be at least 1".into());
        }
        if let Some(size) = r.cohort_size.filter(|s| *s < r.min_sites) {
            return Err(format!(
                "rounds.cohort_size ({size}) must be at least rounds.min_sites ({})",
                r.min_sites
            ));
        }
        self.schedule.schedule()?;
        let secure = !self.secagg.dangerous_disable_secure_aggregation;
        if secure && r.min_sites < potluck_shared::secagg::MIN_COHORT {
            return Err(format!(
                "rounds.min_sites must be at least {} with secure aggregation: a smaller cohort's sum reveals too much about each site",
                potluck_shared::secagg::MIN_COHORT
            ));
        }
        // A coordinator may not unmask with half a cohort or less; sites
        // that assume colluders insist on more (their `[secure_aggregation]`).
        let largest = r.cohort_size.unwrap_or(r.min_sites);
        if let Some(t) = self.secagg.threshold.filter(|t| 2 * t <= largest) {
            return Err(format!(
                "secagg.threshold ({t}) must be more than half of the cohort \
                 (rounds.cohort_size, or rounds.min_sites when unset: {largest})"
            ));
        }
        if !(16..=32).contains(&self.secagg.modulus_bits) {
            return Err(format!(
                "secagg.modulus_bits must be 16 to 32, got {}",
                self.secagg.modulus_bits
            ));
        }
        if !(self.secagg.phase_timeout_secs.is_finite() && self.secagg.phase_timeout_secs > 0.0) {
            return Err("secagg.phase_timeout_secs must be a positive number".into());
        }
        if t.epochs == 0 || t.batch_size == 0 {
            return Err("training.epochs and training.batch_size must be at least 1".into());
        }
        let d = &self.model;
        if d.embedding == 0 || d.context == 0 || d.hidden == 0 {
            return Err("model dimensions must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.model.history_decay) {
            return Err("model.history_decay must be between 0 and 1".into());
        }
        if let Some(addr) = self.telemetry.listen.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "telemetry.listen must be a loopback address (metrics are served without \
                 authentication; scrape through an SSH tunnel or a proxy), got {addr}"
            ));
        }
        if let Some(addr) = self.admin.listen.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "admin.listen must be a loopback address (the API speaks plain HTTP; \
                 reach it through an SSH tunnel or a TLS proxy), got {addr}"
            ));
        }
        self.check_audit()?;
        self.check_privacy()
    }

    fn check_audit(&self) -> Result<(), String> {
        let Some(a) = &self.audit else {
            return Ok(());
        };
        if self.secagg.dangerous_disable_secure_aggregation {
            return Err("audit needs secure aggregation: a site's per-group figures must                         never be seen alone"
                .into());
        }
        if a.every_rounds == 0 && self.rounds.max_rounds.is_none() && !self.privacy.enabled {
            return Err(
                "audit.every_rounds must be set when training has no end (no \
                        rounds.max_rounds and no privacy budget): otherwise no version is \
                        ever audited, and none is served"
                    .into(),
            );
        }
        if a.attributes.is_empty() {
            return Err("audit.attributes must name at least one attribute and its groups".into());
        }
        for (name, groups) in &a.attributes {
            if groups.is_empty() {
                return Err(format!(
                    "audit.attributes.{name} must list at least one group"
                ));
            }
        }
        if !(a.noise_multiplier.is_finite() && a.noise_multiplier > 0.0) {
            return Err(format!(
                "audit.noise_multiplier must be a positive number, got {}",
                a.noise_multiplier
            ));
        }
        if !(a.delta > 0.0 && a.delta < 1.0) {
            return Err(format!("audit.delta must be in (0, 1), got {}", a.delta));
        }
        let g = &a.gate;
        for (field, value) in [
            ("audit.gate.min_hr_ratio", g.min_hr_ratio),
            ("audit.gate.min_ndcg_ratio", g.min_ndcg_ratio),
            ("audit.gate.max_exposure_gap", g.max_exposure_gap),
        ] {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(format!("{field} must be between 0 and 1, got {v}"));
            }
        }
        Ok(())
    }

    fn check_privacy(&self) -> Result<(), String> {
        let p = &self.privacy;
        if !p.enabled {
            return Ok(());
        }
        if self.secagg.dangerous_disable_secure_aggregation {
            return Err(
                "privacy.enabled needs secure aggregation: each site adds only its share \
                        of the noise; set privacy.enabled = false to run without secure aggregation"
                    .into(),
            );
        }
        if !(p.sampling_rate > 0.0 && p.sampling_rate <= 1.0) {
            return Err(format!(
                "privacy.sampling_rate must be in (0, 1], got {}",
                p.sampling_rate
            ));
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err(format!("privacy.delta must be in (0, 1), got {}", p.delta));
        }
        for (field, value) in [
            ("privacy.target_epsilon", p.target_epsilon),
            ("privacy.clip_norm", f64::from(p.clip_norm)),
            (
                "privacy.noise_multiplier",
                p.noise_multiplier.unwrap_or(1.0),
            ),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{field} must be a positive number, got {value}"));
            }
        }
        if p.lineage.trim().is_empty() {
            return Err("privacy.lineage must not be empty".into());
        }
        let least = potluck_shared::dp::distributed::MIN_PRIOR_NOISE;
        for (field, value) in [
            ("privacy.prior_noise_multiplier", p.prior_noise_multiplier),
            (
                "privacy.neighbour_noise_multiplier",
                p.neighbour_noise_multiplier,
            ),
        ] {
            if !(value == 0.0 || (value.is_finite() && value >= least)) {
                return Err(format!(
                    "{field} must be 0 or at least {least}, got {value}"
                ));
            }
        }
        p.noise_multiplier(self.rounds.max_rounds, self.audit.as_ref())
            .map(|_| ())
    }

    /// The PKI directory made by `ca init`: the one holding the CA certificate.
    pub fn pki_dir(&self) -> crate::pki::PkiDir {
        crate::pki::PkiDir::new(self.tls.ca.parent().unwrap_or(Path::new(".")))
    }

    /// The model's layer widths.
    pub fn model_dims(&self) -> ModelDims {
        ModelDims {
            embedding: self.model.embedding,
            context: self.model.context,
            hidden: self.model.hidden,
        }
    }

    /// The round lifecycle settings (the config must have passed [`Self::check`]).
    pub fn round_config(&self) -> RoundConfig {
        let r = &self.rounds;
        let p = &self.privacy;
        let privacy = p.enabled.then(|| PrivacyPolicy {
            lineage: p.lineage.clone(),
            unit: p.unit,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p
                .noise_multiplier(r.max_rounds, self.audit.as_ref())
                .unwrap_or(f64::INFINITY),
            clip_norm: p.clip_norm,
            target_epsilon: p.target_epsilon,
            delta: p.delta,
            prior_noise_multiplier: p.prior_noise_multiplier,
            neighbour_noise_multiplier: p.neighbour_noise_multiplier,
            clip_quantile: p.clip_quantile,
            clip_learning_rate: p.clip_learning_rate,
        });
        RoundConfig {
            min_sites: r.min_sites,
            cohort_size: r.cohort_size,
            cohort_seed: r.cohort_seed,
            max_rounds: r.max_rounds,
            train_timeout: Duration::from_secs_f64(r.train_timeout_secs),
            eval_timeout: Duration::from_secs_f64(r.eval_timeout_secs),
            retry_delay: Duration::from_secs_f64(r.retry_delay_secs),
            cohort_wait: Duration::from_secs_f64(r.cohort_wait_secs),
            server_optimizer: r.server_optimizer(),
            settings: self.training.clone(),
            secure_aggregation: !self.secagg.dangerous_disable_secure_aggregation,
            threshold: self.secagg.threshold,
            modulus_bits: self.secagg.modulus_bits,
            secagg_phase_timeout: Duration::from_secs_f64(self.secagg.phase_timeout_secs),
            audit: self.audit.as_ref().map(|a| AuditPolicy {
                attributes: a.attributes.clone(),
                min_group_size: a.min_group_size,
                noise_multiplier: a.noise_multiplier,
                every_rounds: a.every_rounds,
                gate: a.gate.clone(),
                lineage: privacy
                    .as_ref()
                    .map_or(a.lineage.clone(), |p| p.lineage.clone()),
                delta: privacy.as_ref().map_or(a.delta, |p| p.delta),
            }),
            privacy,
        }
    }

    /// A starter config next to a PKI directory made by `ca init`.
    pub fn starter(pki: &str, listen: SocketAddr) -> String {
        format!(
            "# Potluck coordinator configuration. Relative paths are relative to this file.\n\
             listen = \"{listen}\"\n\
             state_dir = \"state\"\n\
             menu = \"menu.csv\"\n\
             \n\
             [tls]\n\
             ca = \"{pki}/ca.pem\"\n\
             cert = \"{pki}/coordinator.pem\"\n\
             key = \"{pki}/coordinator.key\"\n\
             \n\
             [rounds]\n\
             min_sites = 3\n\
             # cohort_size = 50   # absent: every connected site joins each round\n\
             # max_rounds = 10   # absent: train until stopped\n\
             train_timeout_secs = 120\n\
             eval_timeout_secs = 30\n\
             retry_delay_secs = 5\n\
             cohort_wait_secs = 2\n\
             server_learning_rate = 1.0\n\
             server_optimizer = \"sgd\"   # or \"momentum\" (FedAvgM), \"adam\" (FedAdam)\n\
             \n\
             [training]\n\
             epochs = 3\n\
             learning_rate = 0.3\n\
             batch_size = 32\n\
             clip_norm = 10.0\n\
             # scope = \"auto\"   # what rounds train: auto (weights under DP, all without), all, linear, head, weights\n\
             noise_std = 0.01\n\
             \n\
             [secagg]\n\
             # threshold = 7   # absent: more than two thirds of each cohort\n\
             modulus_bits = 32\n\
             phase_timeout_secs = 30\n\
             dangerous_disable_secure_aggregation = false\n\
             \n\
             # Distributed differential privacy: each site adds its share of discrete\n\
             # Gaussian noise inside secure aggregation. No round opens that would take\n\
             # the lineage past target_epsilon; sites also keep their own ledgers.\n\
             [privacy]\n\
             enabled = true\n\
             lineage = \"default\"\n\
             unit = \"customer\"\n\
             target_epsilon = 4.0\n\
             delta = 1e-6\n\
             sampling_rate = 0.2\n\
             clip_norm = 0.5\n\
             # noise_multiplier = 1.0   # absent: calibrated to fit planned_rounds\n\
             planned_rounds = 20\n\
             \n\
             # Fairness audits: each model version is audited per group of these\n\
             # audit-only attributes (kept at the sites, never sent) before it is\n\
             # served; a version that fails the gate is held. Charged to the ledger.\n\
             # [audit]\n\
             # attributes = {{ age_band = [\"18-24\", \"25-34\", \"35-49\", \"50-64\", \"65+\"] }}\n\
             # min_group_size = 20\n\
             # noise_multiplier = 3.0\n\
             # [audit.gate]\n\
             # min_hr_ratio = 0.8\n\
             \n\
             # Prometheus metrics at http://LISTEN/metrics (loopback only).\n\
             [telemetry]\n\
             listen = \"127.0.0.1:9477\"\n\
             \n\
             # Rounds open only inside this daily window, in the franchise's time zone.\n\
             [schedule]\n\
             # window = \"22:00-06:00\"   # absent: any time\n\
             time_zone = \"UTC\"\n\
             \n\
             # Admin API and dashboard at http://LISTEN/ (loopback only; tokens from\n\
             # `potluck-coordinator token create`).\n\
             [admin]\n\
             listen = \"127.0.0.1:9478\"\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn starter_parses_with_defaults() {
        let (dir, path) = write(&CoordinatorConfig::starter(
            "pki",
            "127.0.0.1:7443".parse().unwrap(),
        ));
        let config = CoordinatorConfig::load(&path).unwrap();
        assert_eq!(config.tls.ca, dir.path().join("pki/ca.pem"));
        assert_eq!(config.round_config().min_sites, 3);
        assert_eq!(config.training, TrainSettings::default());
    }

    #[test]
    fn bad_values_name_the_field() {
        let base = CoordinatorConfig::starter("pki", "127.0.0.1:7443".parse().unwrap());
        let (_d, path) = write(&base.replace("clip_norm = 10.0", "clip_norm = -1.0"));
        let err = CoordinatorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("training.clip_norm"), "{err}");
        let (_d, path) = write(&base.replace("min_sites = 3", "min_sits = 3"));
        let err = CoordinatorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("min_sits"), "{err}");
        // A threshold of half the cohort or less would let a split view
        // unmask one site without any colluder.
        let low = base
            .replace("min_sites = 3", "min_sites = 4")
            .replace("# threshold = 7", "threshold = 2");
        let (_d, path) = write(&low);
        let err = CoordinatorConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("secagg.threshold") && err.contains("half"),
            "{err}"
        );
    }

    #[test]
    fn privacy_settings_are_checked_and_the_noise_calibrated() {
        let base = CoordinatorConfig::starter("pki", "127.0.0.1:7443".parse().unwrap());
        let (_d, path) = write(&base);
        let config = CoordinatorConfig::load(&path).unwrap();
        let policy = config.round_config().privacy.expect("on by default");
        // Training, the prior release and the neighbour census fit the budget.
        let mut spent = potluck_shared::dp::Accountant::default();
        config
            .privacy
            .one_off_steps()
            .for_each(|s| spent.compose(&s, 1));
        spent.compose(&Step::gaussian(0.2, policy.noise_multiplier), 20);
        let spent = spent.epsilon(1e-6);
        assert!(spent.epsilon <= 4.0 && spent.epsilon > 3.9, "{spent:?}");
        for (from, to, field) in [
            (
                "sampling_rate = 0.2",
                "sampling_rate = 1.5",
                "privacy.sampling_rate",
            ),
            ("delta = 1e-6", "delta = 0", "privacy.delta"),
            (
                "target_epsilon = 4.0",
                "target_epsilon = -1",
                "privacy.target_epsilon",
            ),
            (
                "dangerous_disable_secure_aggregation = false",
                "dangerous_disable_secure_aggregation = true",
                "privacy.enabled needs secure aggregation",
            ),
            ("planned_rounds = 20", "", "planned_rounds"),
        ] {
            let (_d, path) = write(&base.replace(from, to));
            let err = CoordinatorConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(field), "{to:?}: {err}");
        }
    }

    /// The starter with its commented `[audit]` example switched on.
    fn with_audit() -> String {
        CoordinatorConfig::starter("pki", "127.0.0.1:7443".parse().unwrap())
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with("[audit")
                        || rest.starts_with("attributes")
                        || rest.starts_with("min_")
                        || rest.starts_with("noise_multiplier = 3") =>
                {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_audit_example_parses_and_its_cost_is_kept_in_the_budget() {
        let (_d, path) = write(&with_audit());
        let config = CoordinatorConfig::load(&path).unwrap();
        let audit = config.round_config().audit.expect("the example is on");
        assert_eq!(audit.attributes["age_band"].len(), 5);
        assert_eq!(audit.gate.min_hr_ratio, Some(0.8));
        assert_eq!(
            audit.lineage, "default",
            "audits spend the training lineage"
        );
        // Training, the one-off releases and the final audit together fit the budget.
        let z = config.round_config().privacy.unwrap().noise_multiplier;
        let mut spent = potluck_shared::dp::Accountant::default();
        config
            .privacy
            .one_off_steps()
            .for_each(|s| spent.compose(&s, 1));
        spent.compose(&Step::gaussian(0.2, z), 20);
        spent.compose(&Step::gaussian(1.0, audit.noise_multiplier), 1);
        let epsilon = spent.epsilon(1e-6).epsilon;
        assert!(epsilon <= 4.0 && epsilon > 3.9, "{epsilon}");
    }

    #[test]
    fn bad_audit_settings_name_the_field() {
        let base = with_audit();
        for (from, to, field) in [
            (
                "min_hr_ratio = 0.8",
                "min_hr_ratio = 80",
                "audit.gate.min_hr_ratio",
            ),
            (
                "noise_multiplier = 3.0",
                "noise_multiplier = 0",
                "audit.noise_multiplier",
            ),
            (
                "\"65+\"]",
                "\"65+\"], gender = []",
                "audit.attributes.gender",
            ),
            (
                "dangerous_disable_secure_aggregation = false",
                "dangerous_disable_secure_aggregation = true",
                "audit needs secure aggregation",
            ),
            ("enabled = true", "enabled = false", "audit.every_rounds"),
        ] {
            let (_d, path) = write(&base.replace(from, to));
            let err = CoordinatorConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(field), "{to:?}: {err}");
        }
    }
}
