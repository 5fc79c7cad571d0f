//! The coordinator's durable state: one SQLite database, `STATE_DIR/coordinator.db`.
//!
//! It holds the model versions (parameters and spec hash), the rounds, the
//! privacy ledger, the sites and their revoked certificates, the admin tokens
//! (hashed), pending rollbacks, and the audit log. Every change is one
//! transaction, in WAL mode with `synchronous = FULL`, so a `kill -9` at any
//! instant leaves the state of the last commit. The driver commits before it
//! sends: a round's ledger entry before its task, a model version before the
//! model. Other processes (the CLI, the admin API) open the same file; SQLite
//! serialises their writes.
//!
//! `metrics.jsonl` beside the database is an export for scripts (one line per
//! completed round), written after the round is committed here.

use std::io::Write;
use std::path::{Path, PathBuf};

use potluck_shared::audit::{self, Entry, Head, Tamper};
use potluck_shared::dp::Step;
use potluck_shared::fairness::FairnessReport;
use potluck_shared::model::{GlobalModel, ModelSpec};
use potluck_shared::round::{AuditOutcome, OptimizerState};
use potluck_shared::wire::{NeighbourRelease, codec};
use potluck_shared::{ModelVersion, RoundId, SiteId};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;

use crate::roles::Role;

/// The database file inside the state directory.
pub const DB_FILE: &str = "coordinator.db";

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    parameters INTEGER NOT NULL,
    model BLOB NOT NULL,
    created_at TEXT NOT NULL,
    round INTEGER,
    rolled_back_from INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS optimizer (
    version INTEGER PRIMARY KEY,
    state BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'completed', 'abandoned', 'interrupted')),
    opened_at TEXT NOT NULL,
    closed_at TEXT,
    base_version INTEGER NOT NULL,
    cohort TEXT NOT NULL,
    model_version INTEGER,
    metrics TEXT,
    reason TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS privacy (
    round INTEGER PRIMARY KEY,
    lineage TEXT NOT NULL,
    step TEXT NOT NULL,
    epsilon REAL NOT NULL,
    recorded_at TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS sites (
    site TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    rounds_joined INTEGER NOT NULL DEFAULT 0,
    dropouts INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS revoked (
    fingerprint TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS rollbacks (
    id INTEGER PRIMARY KEY,
    target INTEGER NOT NULL,
    requested_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    applied_version INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS audit (position INTEGER PRIMARY KEY, entry TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS fairness (
    round INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('passed', 'held', 'abandoned')),
    report TEXT,
    failures TEXT NOT NULL,
    epsilon REAL,
    recorded_at TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    released_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS site_budgets (
    site TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    max_epsilon REAL NOT NULL,
    reported_at TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS neighbour_census (
    lineage TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    release BLOB NOT NULL,
    recorded_at TEXT NOT NULL
) STRICT;
";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("{path}: {source}")]
    Db {
        /// The database file.
        path: String,
        /// The cause.
        source: rusqlite::Error,
    },
    /// Something stored is unreadable.
    #[error("{path}: corrupt {what}: {reason}")]
    Corrupt {
        /// The database file.
        path: String,
        /// What was being read, e.g. `model version 3`.
        what: String,
        /// The cause.
        reason: String,
    },
    /// The stored lineage was trained with another model spec.
    #[error(
        "{path}: the stored model (spec {stored}) does not match the configured menu and model \
         (spec {configured}); keep the configuration or start a new lineage in another state_dir"
    )]
    SpecChanged {
        /// The database file.
        path: String,
        /// Stored spec hash.
        stored: String,
        /// Configured spec hash.
        configured: String,
    },
    /// There is no coordinator state to read.
    #[error("{path}: no coordinator state here; has the coordinator run with this state_dir?")]
    Missing {
        /// The database file looked for.
        path: String,
    },
    /// A request names something that does not exist or cannot be done.
    #[error("{0}")]
    Refused(String),
}

/// A stored model version.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRecord {
    /// The version.
    pub version: u64,
    /// Its spec hash.
    pub spec_hash: String,
    /// Number of parameters.
    pub parameters: u64,
    /// When it was committed.
    pub created_at: String,
    /// The round that produced it (none for the initial model and rollbacks).
    pub round: Option<u64>,
    /// For a rollback: the version whose parameters it carries.
    pub rolled_back_from: Option<u64>,
    /// Whether it is the current model.
    pub current: bool,
    /// `released` (served at some point), `held` (failed its fairness audit
    /// and not released), or empty (not audited, or no gate).
    pub status: String,
}

/// A fairness audit as stored.
#[derive(Debug, Clone, Serialize)]
pub struct FairnessRecord {
    /// The audit's round.
    pub round: u64,
    /// The version audited.
    pub model_version: u64,
    /// `passed`, `held` or `abandoned`.
    pub status: String,
    /// The figures (none when abandoned).
    pub report: Option<FairnessReport>,
    /// The gate's objections, or why the audit was abandoned.
    pub failures: Vec<String>,
    /// ε of the lineage after the audit.
    pub epsilon: Option<f64>,
    /// When it was recorded.
    pub recorded_at: String,
}

/// An operator's release not yet applied by the running coordinator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingRelease {
    /// Its id.
    pub id: i64,
    /// The version to serve.
    pub version: u64,
}

/// A round as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    /// The round.
    pub round: u64,
    /// `open`, `completed`, `abandoned` or `interrupted` (open when the coordinator stopped).
    pub status: String,
    /// When it opened.
    pub opened_at: String,
    /// When it ended.
    pub closed_at: Option<String>,
    /// The model version it trained from.
    pub base_version: u64,
    /// The sites asked.
    pub cohort: Vec<String>,
    /// The model version it produced.
    pub model_version: Option<u64>,
    /// The `metrics.jsonl` record of a completed round.
    pub metrics: Option<serde_json::Value>,
    /// Why it was abandoned.
    pub reason: Option<String>,
}

/// A site as the coordinator knows it.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRecord {
    /// The site.
    pub site: String,
    /// First connection.
    pub first_seen: String,
    /// Last connection or round.
    pub last_seen: String,
    /// SHA-256 of the certificate it last connected with.
    pub fingerprint: String,
    /// Completed rounds it contributed to.
    pub rounds_joined: u64,
    /// Completed rounds it was asked to join and did not contribute to.
    pub dropouts: u64,
    /// Whether its last certificate is revoked.
    pub revoked: bool,
    /// ε spent on its customers, as its own ledger last reported (the site
    /// enforces it; every lineage together, within its window).
    pub site_epsilon: Option<f64>,
    /// The site's own maximum ε, as last reported.
    pub site_max_epsilon: Option<f64>,
}

/// One privacy ledger entry.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerRecord {
    /// The round charged.
    pub round: u64,
    /// The model lineage.
    pub lineage: String,
    /// The mechanism.
    pub step: Step,
    /// The sites' one-off release of their popularity prior, charged with
    /// the lineage's first private round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<Step>,
    /// ε of the lineage after the round.
    pub epsilon: f64,
    /// When it was recorded (before the round's task was sent).
    pub recorded_at: String,
}

/// An admin token (without its secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenRecord {
    /// Its name, written into the audit log with every change it makes.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was created.
    pub created_at: String,
}

/// A rollback asked for and not yet applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRollback {
    /// Its id.
    pub id: i64,
    /// The version whose parameters become current.
    pub target: u64,
}

/// The coordinator's database.
#[derive(Debug)]
pub struct State {
    conn: Connection,
    path: PathBuf,
}

impl State {
    /// Open the state in `dir`, creating it (mode 0700) and the database as needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(DB_FILE);
        // An earlier version kept files here; starting afresh beside them would
        // silently forget their privacy ledger.
        for old in ["privacy.jsonl", "models"] {
            if !path.exists() && dir.join(old).exists() {
                return Err(StateError::Refused(format!(
                    "{}: state from an earlier Potluck version ({old}), which this version does not \
                     read; keep it for the record and use a new state_dir (a new lineage)",
                    dir.display()
                )));
            }
        }
        create_private_dir(dir)?;
        Self::connect(&path)
    }

    /// Open existing state, for commands that read or change it beside a
    /// running coordinator; never creates it.
    pub fn open_existing(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            return Err(StateError::Missing {
                path: path.display().to_string(),
            });
        }
        Self::connect(&path)
    }

    fn connect(path: &Path) -> Result<Self, StateError> {
        let db = |source| StateError::Db {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let state = Self {
            conn,
            path: path.to_path_buf(),
        };
        state.check_schema()?;
        Ok(state)
    }

    fn check_schema(&self) -> Result<(), StateError> {
        match self.meta("schema_version")? {
            None => self.set_meta("schema_version", &SCHEMA_VERSION.to_string()),
            Some(v) if v == SCHEMA_VERSION.to_string() => Ok(()),
            Some(v) => Err(StateError::Refused(format!(
                "{}: schema version {v}, this coordinator reads version {SCHEMA_VERSION}",
                self.path.display()
            ))),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Db {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn corrupt(&self, what: impl Into<String>, reason: impl ToString) -> StateError {
        StateError::Corrupt {
            path: self.path.display().to_string(),
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// Run `work` in one write transaction (taken at once, so writers from
    /// other processes queue behind it) and commit.
    fn transact<T>(
        &mut self,
        work: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        let path = &self.path;
        let db = |source| StateError::Db {
            path: path.display().to_string(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let value = work(&tx).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(value)
    }

    /// Every row of a query, mapped.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StateError> {
        let mut stmt = self.conn.prepare(sql).map_err(self.db())?;
        let rows = stmt.query_map(params, map).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.db())
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(drop)
            .map_err(self.db())
    }

    /// The key of QUIC stateless resets, made once and kept: a restarted
    /// coordinator can then reset the connections its previous run held, and
    /// sites reconnect at once instead of waiting out the idle timeout.
    pub fn stateless_reset_key(&mut self) -> Result<[u8; 32], StateError> {
        if let Some(hex) = self.meta("stateless_reset_key")? {
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|b| u8::from_str_radix(b, 16).ok())
                })
                .collect();
            return bytes
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| self.corrupt("stateless reset key", "not 32 bytes of hex"));
        }
        let key: [u8; 32] = rand::random();
        self.set_meta("stateless_reset_key", &audit::hex(&key))?;
        Ok(key)
    }

    // ---- models ----

    /// The current model, checked against `spec`, or a new version 0 from `seed`.
    pub fn load_or_init(&mut self, spec: ModelSpec, seed: u64) -> Result<GlobalModel, StateError> {
        if let Some(model) = self.current_model()? {
            if model.spec.hash() != spec.hash() {
                return Err(StateError::SpecChanged {
                    path: self.path.display().to_string(),
                    stored: model.spec.hash().to_string(),
                    configured: spec.hash().to_string(),
                });
            }
            return Ok(model);
        }
        let model = GlobalModel {
            version: ModelVersion(0),
            params: spec.initial_params(seed),
            spec,
        };
        self.transact(|tx| insert_model(tx, &model, None, None))?;
        Ok(model)
    }

    /// The newest model version, if any.
    pub fn current_model(&self) -> Result<Option<GlobalModel>, StateError> {
        let latest: Option<u64> = self
            .conn
            .query_row("SELECT MAX(version) FROM models", [], |r| r.get(0))
            .map_err(self.db())?;
        match latest {
            Some(version) => self.model(version),
            None => Ok(None),
        }
    }

    /// Model `version`, if stored.
    pub fn model(&self, version: u64) -> Result<Option<GlobalModel>, StateError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT model FROM models WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let what = format!("model version {version}");
        let model: GlobalModel = codec::decode(&bytes).map_err(|e| self.corrupt(&what, e))?;
        model.validate().map_err(|e| self.corrupt(&what, e))?;
        if model.version.0 != version {
            return Err(self.corrupt(what, format!("it holds version {}", model.version)));
        }
        Ok(Some(model))
    }

    /// Every model version, oldest first.
    pub fn models(&self) -> Result<Vec<ModelRecord>, StateError> {
        self.rows(
            "SELECT version, spec_hash, parameters, created_at, round, rolled_back_from,
                    version = (SELECT MAX(version) FROM models),
                    CASE WHEN version IN (SELECT model_version FROM releases WHERE applied = 1)
                         THEN 'released'
                         WHEN version IN (SELECT model_version FROM fairness WHERE status = 'held')
                         THEN 'held' ELSE '' END
             FROM models ORDER BY version",
            [],
            |r| {
                Ok(ModelRecord {
                    version: r.get(0)?,
                    spec_hash: r.get(1)?,
                    parameters: r.get(2)?,
                    created_at: r.get(3)?,
                    round: r.get(4)?,
                    rolled_back_from: r.get(5)?,
                    current: r.get(6)?,
                    status: r.get(7)?,
                })
            },
        )
    }

    /// Commit the model a round produced.
    ///
    /// The server optimizer's moments after the step that made `model` are
    /// committed with it, so that a restart resumes them exactly.
    pub fn commit_model(
        &mut self,
        model: &GlobalModel,
        round: Option<RoundId>,
        optimizer: &OptimizerState,
    ) -> Result<(), StateError> {
        let bytes = codec::encode(optimizer)
            .map_err(|e| self.corrupt(format!("optimizer state of model {}", model.version), e))?;
        self.transact(|tx| {
            insert_model(tx, model, round, None)?;
            tx.execute(
                "INSERT INTO optimizer (version, state) VALUES (?1, ?2)",
                params![model.version.0, bytes],
            )
            .map(drop)
        })
    }

    /// The server optimizer's moments committed with `version` (zero moments
    /// for a version made without them: the initial model, a rollback).
    pub fn optimizer_state(&self, version: u64) -> Result<OptimizerState, StateError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT state FROM optimizer WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        match bytes {
            None => Ok(OptimizerState::default()),
            Some(bytes) => codec::decode(&bytes)
                .map_err(|e| self.corrupt(format!("optimizer state of model {version}"), e)),
        }
    }

    /// Commit a rollback's new version, mark the requests applied, and audit it.
    pub fn commit_rollback(
        &mut self,
        model: &GlobalModel,
        from: ModelVersion,
    ) -> Result<(), StateError> {
        self.transact(|tx| {
            insert_model(tx, model, None, Some(from))?;
            tx.execute(
                "UPDATE rollbacks SET applied_version = ?1 WHERE applied_version IS NULL",
                [model.version.0],
            )?;
            append_audit(
                tx,
                "model_rolled_back",
                serde_json::json!({"from": from.0, "new_version": model.version.0}),
            )
        })
    }

    /// Ask for `target`'s parameters to become current (applied by the running
    /// coordinator after its current round, or at its next start). Audited.
    pub fn request_rollback(
        &mut self,
        target: u64,
        by: &str,
        reason: &str,
    ) -> Result<(), StateError> {
        self.require_model(target)?;
        self.transact(|tx| {
            tx.execute(
                "INSERT INTO rollbacks (target, requested_by, reason, requested_at) VALUES (?1, ?2, ?3, ?4)",
                params![target, by, reason, audit::timestamp()],
            )?;
            append_audit(
                tx,
                "rollback_requested",
                serde_json::json!({"to": target, "by": by, "reason": reason}),
            )
        })
    }

    /// Refuse an operator's request naming a version that is not stored.
    fn require_model(&self, version: u64) -> Result<(), StateError> {
        match self.model(version)? {
            Some(_) => Ok(()),
            None => Err(StateError::Refused(format!(
                "there is no model version {version}; `model list` shows the versions"
            ))),
        }
    }

    /// The latest rollback asked for and not applied.
    pub fn pending_rollback(&self) -> Result<Option<PendingRollback>, StateError> {
        self.conn
            .query_row(
                "SELECT id, target FROM rollbacks WHERE applied_version IS NULL ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok(PendingRollback {
                        id: r.get(0)?,
                        target: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(self.db())
    }

    // ---- fairness audits and releases ----

    /// Record an audit's figures and verdict; a version that passed is
    /// released (by the gate). Both are audited with the figures.
    pub fn record_fairness(&mut self, outcome: &AuditOutcome) -> Result<(), StateError> {
        let report = &outcome.report;
        let passed = outcome.failures.is_empty();
        let text = serde_json::to_string(report).unwrap_or_default();
        let failures = serde_json::to_string(&outcome.failures).unwrap_or_default();
        let ratios: serde_json::Value = report
            .attributes
            .iter()
            .map(|a| {
                (
                    a.attribute.clone(),
                    serde_json::json!({"hr_ratio": a.hr_ratio, "ndcg_ratio": a.ndcg_ratio,
                                       "worst": a.worst, "best": a.best}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        self.transact(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO fairness (round, model_version, status, report, failures, epsilon, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    outcome.round.0,
                    report.model_version,
                    if passed { "passed" } else { "held" },
                    text,
                    failures,
                    outcome.epsilon,
                    audit::timestamp()
                ],
            )?;
            let figures = serde_json::json!({
                "model_version": report.model_version,
                "round": outcome.round.0,
                "ratios": ratios,
                "failures": outcome.failures,
                "epsilon": outcome.epsilon,
            });
            if passed {
                append_audit(tx, "fairness_audit_passed", figures)?;
                insert_release(tx, report.model_version, "gate", "passed its fairness audit", true)?;
                append_audit(
                    tx,
                    "model_released",
                    serde_json::json!({"model_version": report.model_version, "by": "gate"}),
                )
            } else {
                append_audit(tx, "model_held", figures)
            }
        })
    }

    /// Record an audit that could not finish (the version stays unreleased).
    pub fn record_fairness_abandoned(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        reason: &str,
    ) -> Result<(), StateError> {
        self.transact(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO fairness (round, model_version, status, failures, recorded_at)
                 VALUES (?1, ?2, 'abandoned', ?3, ?4)",
                params![
                    round.0,
                    version.0,
                    serde_json::to_string(&[reason]).unwrap_or_default(),
                    audit::timestamp()
                ],
            )?;
            append_audit(
                tx,
                "fairness_audit_abandoned",
                serde_json::json!({"round": round.0, "model_version": version.0, "reason": reason}),
            )
        })
    }

    /// The latest audit with figures of `version` (default: the latest version audited).
    pub fn fairness(&self, version: Option<u64>) -> Result<Option<FairnessRecord>, StateError> {
        let rows = self.fairness_rows(
            "WHERE report IS NOT NULL AND (?1 IS NULL OR model_version = ?1)
             ORDER BY round DESC LIMIT 1",
            params![version],
        )?;
        Ok(rows.into_iter().next())
    }

    /// The audit of the latest version released before `version`, to compare with.
    pub fn previous_released_fairness(
        &self,
        version: u64,
    ) -> Result<Option<FairnessRecord>, StateError> {
        let rows = self.fairness_rows(
            "WHERE report IS NOT NULL AND model_version = (
                 SELECT MAX(model_version) FROM releases WHERE applied = 1 AND model_version < ?1)
             ORDER BY round DESC LIMIT 1",
            params![version],
        )?;
        Ok(rows.into_iter().next())
    }

    /// Every audit, oldest first.
    pub fn fairness_audits(&self) -> Result<Vec<FairnessRecord>, StateError> {
        self.fairness_rows("ORDER BY round", params![])
    }

    fn fairness_rows(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<FairnessRecord>, StateError> {
        let sql = format!(
            "SELECT round, model_version, status, report, failures, epsilon, recorded_at FROM fairness {clause}"
        );
        type Row = (
            u64,
            u64,
            String,
            Option<String>,
            String,
            Option<f64>,
            String,
        );
        let rows: Vec<Row> = self.rows(&sql, params, |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        rows.into_iter()
            .map(
                |(round, model_version, status, report, failures, epsilon, recorded_at)| {
                    let what = format!("fairness audit of round {round}");
                    let report = report
                        .map(|text| serde_json::from_str(&text))
                        .transpose()
                        .map_err(|e| self.corrupt(&what, e))?;
                    let failures =
                        serde_json::from_str(&failures).map_err(|e| self.corrupt(&what, e))?;
                    Ok(FairnessRecord {
                        round,
                        model_version,
                        status,
                        report,
                        failures,
                        epsilon,
                        recorded_at,
                    })
                },
            )
            .collect()
    }

    /// Ask the running coordinator to serve `version`, overriding the gate. Audited.
    pub fn request_release(
        &mut self,
        version: u64,
        by: &str,
        reason: &str,
    ) -> Result<(), StateError> {
        self.require_model(version)?;
        if reason.trim().is_empty() {
            return Err(StateError::Refused(
                "a release needs a reason, for the audit log".into(),
            ));
        }
        let held: Option<String> = self
            .conn
            .query_row(
                "SELECT failures FROM fairness WHERE model_version = ?1 AND report IS NOT NULL
                 ORDER BY round DESC LIMIT 1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        self.transact(|tx| {
            insert_release(tx, version, by, reason, false)?;
            append_audit(
                tx,
                "release_requested",
                serde_json::json!({"model_version": version, "by": by, "reason": reason,
                                   "audit_failures": held.and_then(|f| serde_json::from_str::<serde_json::Value>(&f).ok())}),
            )
        })
    }

    /// The latest release asked for and not yet applied.
    pub fn pending_release(&self) -> Result<Option<PendingRelease>, StateError> {
        self.conn
            .query_row(
                "SELECT id, model_version FROM releases WHERE applied = 0 ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok(PendingRelease {
                        id: r.get(0)?,
                        version: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(self.db())
    }

    /// The running coordinator now serves the release `id`: mark it (and older
    /// requests) applied, and audit it.
    pub fn release_applied(&mut self, release: PendingRelease) -> Result<(), StateError> {
        self.transact(|tx| {
            tx.execute(
                "UPDATE releases SET applied = 1 WHERE applied = 0 AND id <= ?1",
                [release.id],
            )?;
            let (by, reason): (String, String) = tx.query_row(
                "SELECT released_by, reason FROM releases WHERE id = ?1",
                [release.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            append_audit(
                tx,
                "model_released",
                serde_json::json!({"model_version": release.version, "by": by, "reason": reason}),
            )
        })
    }

    /// The version served now, if any was released.
    pub fn released_version(&self) -> Result<Option<u64>, StateError> {
        self.conn
            .query_row(
                "SELECT model_version FROM releases WHERE applied = 1 ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    // ---- rounds ----

    /// The next round number (never reused, even after a crash: a round can be
    /// charged to the ledger before it is recorded as opened).
    pub fn next_round(&self) -> Result<RoundId, StateError> {
        let last: Option<u64> = self
            .conn
            .query_row(
                "SELECT MAX(round) FROM (SELECT round FROM rounds UNION ALL SELECT round FROM privacy
                 UNION ALL SELECT round FROM fairness)",
                [],
                |r| r.get(0),
            )
            .map_err(self.db())?;
        Ok(RoundId(last.map_or(1, |r| r + 1)))
    }

    /// Completed rounds so far.
    pub fn rounds_completed(&self) -> Result<u64, StateError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM rounds WHERE status = 'completed'",
                [],
                |r| r.get(0),
            )
            .map_err(self.db())
    }

    /// Rounds left open by a coordinator that stopped (crashed) are marked
    /// interrupted and audited; returns them.
    pub fn interrupt_open_rounds(&mut self) -> Result<Vec<u64>, StateError> {
        self.transact(|tx| {
            let open: Vec<u64> = tx
                .prepare("SELECT round FROM rounds WHERE status = 'open' ORDER BY round")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for round in &open {
                tx.execute(
                    "UPDATE rounds SET status = 'interrupted', closed_at = ?2 WHERE round = ?1",
                    params![round, audit::timestamp()],
                )?;
                append_audit(
                    tx,
                    "round_interrupted",
                    serde_json::json!({"round": round, "reason": "the coordinator stopped during the round"}),
                )?;
            }
            Ok(open)
        })
    }

    /// A round opened with `cohort`, training from `base`.
    pub fn round_opened(
        &mut self,
        round: RoundId,
        base: ModelVersion,
        cohort: &[SiteId],
    ) -> Result<(), StateError> {
        let cohort = serde_json::to_string(cohort).unwrap_or_default();
        self.transact(|tx| {
            tx.execute(
                "INSERT INTO rounds (round, status, opened_at, base_version, cohort) VALUES (?1, 'open', ?2, ?3, ?4)",
                params![round.0, audit::timestamp(), base.0, cohort],
            )
            .map(drop)
        })
    }

    /// A round completed: its record, the sites' counts and its audit entry, in one commit.
    pub fn round_completed(
        &mut self,
        summary: &potluck_shared::round::RoundSummary,
        metrics: &serde_json::Value,
    ) -> Result<(), StateError> {
        let now = audit::timestamp();
        self.transact(|tx| {
        tx.execute(
            "UPDATE rounds SET status = 'completed', closed_at = ?2, model_version = ?3, metrics = ?4
             WHERE round = ?1",
            params![summary.round.0, now, summary.model_version.0, metrics.to_string()],
        )?;
        for site in &summary.cohort {
            let joined = summary.contributors.contains(site);
            tx.execute(
                "UPDATE sites SET rounds_joined = rounds_joined + ?2, dropouts = dropouts + ?3,
                 last_seen = ?4 WHERE site = ?1",
                params![site.as_str(), u32::from(joined), u32::from(!joined), now],
            )?;
        }
        append_audit(
            tx,
            "round_completed",
            serde_json::json!({
                "round": summary.round.0,
                "cohort": summary.cohort.len(),
                "survivors": summary.contributors,
                "dropped": summary.dropped,
                "from_version": summary.model_version.0.saturating_sub(1),
                "model_version": summary.model_version.0,
                "epsilon": summary.privacy.as_ref().map(|p| p.epsilon),
                "secure_aggregation": summary.secure_aggregation,
            }),
        )
        })
    }

    /// A round ended without a model. Audited.
    pub fn round_abandoned(&mut self, round: RoundId, reason: &str) -> Result<(), StateError> {
        self.transact(|tx| {
            tx.execute(
                "UPDATE rounds SET status = 'abandoned', closed_at = ?2, reason = ?3 WHERE round = ?1",
                params![round.0, audit::timestamp(), reason],
            )?;
            append_audit(
                tx,
                "round_abandoned",
                serde_json::json!({"round": round.0, "reason": reason}),
            )
        })
    }

    /// The last `limit` rounds (`None`: all), oldest first.
    pub fn rounds(&self, limit: Option<u64>) -> Result<Vec<RoundRecord>, StateError> {
        // SQLite reads a negative LIMIT as none.
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        self.rows(
            "SELECT round, status, opened_at, closed_at, base_version, cohort, model_version, metrics, reason
             FROM (SELECT * FROM rounds ORDER BY round DESC LIMIT ?1) ORDER BY round",
            [limit],
            |r| {
                let cohort: String = r.get(5)?;
                let metrics: Option<String> = r.get(7)?;
                Ok(RoundRecord {
                    round: r.get(0)?,
                    status: r.get(1)?,
                    opened_at: r.get(2)?,
                    closed_at: r.get(3)?,
                    base_version: r.get(4)?,
                    cohort: serde_json::from_str(&cohort).unwrap_or_default(),
                    model_version: r.get(6)?,
                    metrics: metrics.and_then(|m| serde_json::from_str(&m).ok()),
                    reason: r.get(8)?,
                })
            },
        )
    }

    // ---- privacy ledger ----

    /// Record a private round's mechanism, durably, before its task is sent.
    pub fn record_privacy(
        &mut self,
        lineage: &str,
        round: RoundId,
        step: &Step,
        prior: Option<&Step>,
        epsilon: f64,
    ) -> Result<(), StateError> {
        // A round that also pays for the prior release stores both, as a pair.
        let step = match prior {
            None => serde_json::to_string(step),
            Some(prior) => serde_json::to_string(&(step, prior)),
        }
        .unwrap_or_default();
        self.transact(|tx| {
            tx.execute(
                "INSERT INTO privacy (round, lineage, step, epsilon, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![round.0, lineage, step, epsilon, audit::timestamp()],
            )
            .map(drop)
        })
    }

    /// The privacy ledger, oldest first.
    pub fn ledger(&self) -> Result<Vec<LedgerRecord>, StateError> {
        let rows: Vec<(u64, String, String, f64, String)> = self.rows(
            "SELECT round, lineage, step, epsilon, recorded_at FROM privacy ORDER BY round",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        rows.into_iter()
            .map(|(round, lineage, step, epsilon, recorded_at)| {
                let corrupt = |e| self.corrupt(format!("privacy ledger entry of round {round}"), e);
                let (step, prior) = if step.trim_start().starts_with('[') {
                    let (step, prior): (Step, Step) =
                        serde_json::from_str(&step).map_err(corrupt)?;
                    (step, Some(prior))
                } else {
                    (serde_json::from_str(&step).map_err(corrupt)?, None)
                };
                Ok(LedgerRecord {
                    round,
                    lineage,
                    step,
                    prior,
                    epsilon,
                    recorded_at,
                })
            })
            .collect()
    }

    /// The mechanisms of every private round of `lineage` recorded so far,
    /// the prior release among them.
    pub fn privacy_steps(&self, lineage: &str) -> Result<Vec<Step>, StateError> {
        Ok(self
            .ledger()?
            .into_iter()
            .filter(|e| e.lineage == lineage)
            .flat_map(|e| std::iter::once(e.step).chain(e.prior))
            .collect())
    }

    /// Whether `lineage`'s ledger has paid for the sites' prior release.
    pub fn prior_charged(&self, lineage: &str) -> Result<bool, StateError> {
        Ok(self
            .ledger()?
            .iter()
            .any(|e| e.lineage == lineage && e.prior.is_some()))
    }

    /// Keep a lineage's neighbour census, with an audit entry, in one transaction.
    pub fn record_neighbours(&mut self, release: &NeighbourRelease) -> Result<(), StateError> {
        let bytes = codec::encode(release).map_err(|e| self.corrupt("neighbour census", e))?;
        self.transact(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO neighbour_census (lineage, round, release, recorded_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![release.lineage, release.round.0, bytes, audit::timestamp()],
            )?;
            append_audit(
                tx,
                "neighbour_census",
                serde_json::json!({"lineage": release.lineage, "round": release.round.0}),
            )
        })
    }

    /// `lineage`'s neighbour census, if it has made one.
    pub fn neighbours(&self, lineage: &str) -> Result<Option<NeighbourRelease>, StateError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT release FROM neighbour_census WHERE lineage = ?1",
                [lineage],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        bytes
            .map(|b| codec::decode(&b))
            .transpose()
            .map_err(|e| self.corrupt(format!("neighbour census of {lineage}"), e))
    }

    // ---- sites ----

    /// A site connected with the certificate whose SHA-256 is `fingerprint`.
    pub fn site_seen(&mut self, site: &SiteId, fingerprint: &str) -> Result<(), StateError> {
        let now = audit::timestamp();
        self.conn
            .execute(
                "INSERT INTO sites (site, first_seen, last_seen, fingerprint) VALUES (?1, ?2, ?2, ?3)
                 ON CONFLICT (site) DO UPDATE SET last_seen = excluded.last_seen, fingerprint = excluded.fingerprint",
                params![site.as_str(), now, fingerprint],
            )
            .map(drop)
            .map_err(self.db())
    }

    /// Record what a site's own ledger shows (the latest report wins).
    pub fn site_budget(
        &mut self,
        site: &SiteId,
        budget: &potluck_shared::wire::SiteBudget,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO site_budgets (site, epsilon, max_epsilon, reported_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (site) DO UPDATE SET epsilon = excluded.epsilon,
                     max_epsilon = excluded.max_epsilon, reported_at = excluded.reported_at",
                params![site.as_str(), budget.epsilon, budget.max_epsilon, audit::timestamp()],
            )
            .map(drop)
            .map_err(self.db())
    }

    /// Every site that has connected.
    pub fn sites(&self) -> Result<Vec<SiteRecord>, StateError> {
        self.rows(
            "SELECT sites.site, first_seen, last_seen, fingerprint, rounds_joined, dropouts,
                    EXISTS (SELECT 1 FROM revoked r WHERE r.fingerprint = sites.fingerprint),
                    b.epsilon, b.max_epsilon
             FROM sites LEFT JOIN site_budgets b ON b.site = sites.site ORDER BY sites.site",
            [],
            |r| {
                Ok(SiteRecord {
                    site: r.get(0)?,
                    first_seen: r.get(1)?,
                    last_seen: r.get(2)?,
                    fingerprint: r.get(3)?,
                    rounds_joined: r.get(4)?,
                    dropouts: r.get(5)?,
                    revoked: r.get(6)?,
                    site_epsilon: r.get(7)?,
                    site_max_epsilon: r.get(8)?,
                })
            },
        )
    }

    /// Revoke the certificates `fingerprints` of `site`. Audited; returns how many were new.
    fn revoke(
        &mut self,
        site: &SiteId,
        fingerprints: &[String],
        by: &str,
        reason: &str,
    ) -> Result<usize, StateError> {
        let now = audit::timestamp();
        self.transact(|tx| {
            let mut added = 0;
            for fingerprint in fingerprints {
                added += tx.execute(
                    "INSERT OR IGNORE INTO revoked (fingerprint, site, revoked_at, revoked_by, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![fingerprint, site.as_str(), now, by, reason],
                )?;
            }
            append_audit(
                tx,
                "site_revoked",
                serde_json::json!({"site": site, "certificates": fingerprints, "by": by, "reason": reason}),
            )?;
            Ok(added)
        })
    }

    /// Revoke `site`'s certificates: the one it last connected with and
    /// `issued` (the PKI's latest for it), so a site revoked before it ever
    /// connected is refused too. Returns the fingerprints revoked.
    pub fn revoke_site(
        &mut self,
        site: &SiteId,
        issued: Option<String>,
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>, StateError> {
        let mut fingerprints: Vec<String> = self.site_fingerprint(site)?.into_iter().collect();
        fingerprints.extend(issued.filter(|f| !fingerprints.contains(f)));
        if fingerprints.is_empty() {
            return Err(StateError::Refused(format!(
                "site {site} has never connected and the PKI holds no certificate for it"
            )));
        }
        self.revoke(site, &fingerprints, by, reason)?;
        Ok(fingerprints)
    }

    /// Whether the certificate with this fingerprint is revoked.
    pub fn is_revoked(&self, fingerprint: &str) -> Result<bool, StateError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM revoked WHERE fingerprint = ?1)",
                [fingerprint],
                |r| r.get(0),
            )
            .map_err(self.db())
    }

    /// The fingerprint `site` last connected with, if it has.
    pub fn site_fingerprint(&self, site: &SiteId) -> Result<Option<String>, StateError> {
        self.conn
            .query_row(
                "SELECT fingerprint FROM sites WHERE site = ?1",
                [site.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    // ---- training control ----

    /// Whether an operator stopped training.
    pub fn training_stopped(&self) -> Result<bool, StateError> {
        Ok(self.meta("training")?.as_deref() == Some("stopped"))
    }

    /// Stop or restart training. Audited.
    pub fn set_training_stopped(&mut self, stopped: bool, by: &str) -> Result<(), StateError> {
        let event = if stopped {
            "training_stopped"
        } else {
            "training_started"
        };
        self.transact(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('training', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [if stopped { "stopped" } else { "running" }],
            )?;
            append_audit(tx, event, serde_json::json!({"by": by}))
        })
    }

    // ---- admin tokens ----

    /// Create a token named `name` with `role`; returns the secret, which is
    /// stored only as its SHA-256 and cannot be shown again. Audited.
    pub fn create_token(&mut self, name: &str, role: Role) -> Result<String, StateError> {
        let secret = crate::roles::new_secret();
        let created = self.transact(|tx| {
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO tokens (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, role.as_str(), audit::sha256_hex(secret.as_bytes()), audit::timestamp()],
            )?;
            if inserted == 1 {
                append_audit(
                    tx,
                    "token_created",
                    serde_json::json!({"name": name, "role": role.as_str()}),
                )?;
            }
            Ok(inserted == 1)
        })?;
        if !created {
            return Err(StateError::Refused(format!(
                "a token named {name:?} exists; revoke it first or choose another name"
            )));
        }
        Ok(secret)
    }

    /// The name and role of the token whose secret is `secret`.
    pub fn token(&self, secret: &str) -> Result<Option<(String, Role)>, StateError> {
        let found: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT name, role FROM tokens WHERE hash = ?1",
                [audit::sha256_hex(secret.as_bytes())],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.db())?;
        found
            .map(|(name, role)| {
                let role = role
                    .parse()
                    .map_err(|e| self.corrupt(format!("token {name}"), e))?;
                Ok((name, role))
            })
            .transpose()
    }

    /// Every token, without secrets.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let rows: Vec<(String, String, String)> = self.rows(
            "SELECT name, role, created_at FROM tokens ORDER BY name",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        rows.into_iter()
            .map(|(name, role, created_at)| {
                let role = role
                    .parse()
                    .map_err(|e| self.corrupt(format!("token {name}"), e))?;
                Ok(TokenRecord {
                    name,
                    role,
                    created_at,
                })
            })
            .collect()
    }

    /// Delete a token. Audited.
    pub fn revoke_token(&mut self, name: &str) -> Result<(), StateError> {
        let deleted = self.transact(|tx| {
            let deleted = tx.execute("DELETE FROM tokens WHERE name = ?1", [name])?;
            if deleted == 1 {
                append_audit(tx, "token_revoked", serde_json::json!({"name": name}))?;
            }
            Ok(deleted == 1)
        })?;
        if !deleted {
            return Err(StateError::Refused(format!(
                "there is no token named {name:?}"
            )));
        }
        Ok(())
    }

    // ---- audit log ----

    /// Append an audit entry on its own.
    pub fn audit(&mut self, event: &str, details: serde_json::Value) -> Result<(), StateError> {
        self.transact(|tx| append_audit(tx, event, details))
    }

    /// The last `limit` audit entries, oldest first, as stored (unverified).
    pub fn audit_tail(&self, limit: u64) -> Result<Vec<Entry>, StateError> {
        let rows: Vec<(u64, String)> = self.rows(
            "SELECT position, entry FROM (SELECT * FROM audit ORDER BY position DESC LIMIT ?1) ORDER BY position",
            [limit],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        rows.into_iter()
            .map(|(position, text)| {
                serde_json::from_str(&text)
                    .map_err(|e| self.corrupt(format!("audit entry at position {position}"), e))
            })
            .collect()
    }

    /// Check the whole audit log; returns the number of entries, or the first
    /// entry edited, removed or reordered (`line` is its position in the table).
    pub fn verify_audit(&self) -> Result<Result<u64, Tamper>, StateError> {
        self.verify_audit_anchored(&audit::Head::default())
    }

    /// [`State::verify_audit`], and that the log still holds the entry an
    /// auditor's `anchor` names, unchanged (see [`State::audit_head`]).
    pub fn verify_audit_anchored(
        &self,
        anchor: &audit::Head,
    ) -> Result<Result<u64, Tamper>, StateError> {
        let lines: Vec<String> =
            self.rows("SELECT entry FROM audit ORDER BY position", [], |r| {
                r.get(0)
            })?;
        let head = read_head(&self.conn).map_err(self.db())?;
        Ok(audit::verify_anchored(
            lines.iter().map(String::as_str),
            &head,
            anchor,
        ))
    }

    /// The recorded head of the audit log: an anchor for an auditor to keep.
    pub fn audit_head(&self) -> Result<audit::Head, StateError> {
        read_head(&self.conn).map_err(self.db())
    }
}

fn insert_model(
    tx: &Transaction<'_>,
    model: &GlobalModel,
    round: Option<RoundId>,
    rolled_back_from: Option<ModelVersion>,
) -> rusqlite::Result<()> {
    let bytes =
        codec::encode(model).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.execute(
        "INSERT INTO models (version, spec_hash, parameters, model, created_at, round, rolled_back_from)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            model.version.0,
            model.spec.hash().to_string(),
            model.params.len() as u64,
            bytes,
            audit::timestamp(),
            round.map(|r| r.0),
            rolled_back_from.map(|v| v.0),
        ],
    )
    .map(drop)
}

/// The head is kept in `meta`, so removing entries from the end is detected.
fn insert_release(
    tx: &Transaction<'_>,
    version: u64,
    by: &str,
    reason: &str,
    applied: bool,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO releases (model_version, released_by, reason, requested_at, applied)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![version, by, reason, audit::timestamp(), applied],
    )
    .map(drop)
}

fn read_head(conn: &Connection) -> rusqlite::Result<Head> {
    let text: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'audit_head'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(text
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

/// Append an entry inside the caller's write transaction, which serialises writers.
fn append_audit(
    tx: &Transaction<'_>,
    event: &str,
    details: serde_json::Value,
) -> rusqlite::Result<()> {
    let head = read_head(tx)?;
    let entry = audit::next_entry(&head, audit::timestamp(), event, details);
    let text = serde_json::to_string(&entry).unwrap_or_default();
    tx.execute("INSERT INTO audit (entry) VALUES (?1)", [text])?;
    let head = Head {
        seq: entry.seq,
        hash: entry.hash,
    };
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('audit_head', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [serde_json::to_string(&head).unwrap_or_default()],
    )
    .map(drop)
}

fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Rewrite `metrics.jsonl` in `dir` from the completed rounds in `state`
/// (atomically), so the export matches the database after a crash.
pub fn export_metrics(state: &State, dir: &Path) -> Result<(), StateError> {
    let path = dir.join("metrics.jsonl");
    let tmp = dir.join("metrics.jsonl.tmp");
    let io = |source| StateError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut text = String::new();
    for round in state.rounds(None)? {
        if let (Some(metrics), "completed") = (&round.metrics, round.status.as_str()) {
            text.push_str(&metrics.to_string());
            text.push('\n');
        }
    }
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Append one JSON line to `metrics.jsonl` in `dir` and sync it.
pub fn append_metrics(dir: &Path, line: &serde_json::Value) -> Result<(), StateError> {
    let path = dir.join("metrics.jsonl");
    let io = |source| StateError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    writeln!(file, "{line}").map_err(io)?;
    file.sync_data().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_shared::model::Menu;

    fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        (dir, state)
    }

    fn spec() -> ModelSpec {
        let menu = Menu::read_csv(
            "item_id,name,category\ncoffee,Coffee,drinks\ntea,Tea,drinks\nbun,Bun,food\n"
                .as_bytes(),
            "menu.csv",
        )
        .unwrap();
        ModelSpec::new(menu)
    }

    #[test]
    fn the_privacy_ledger_survives_a_restart_and_keeps_lineages_apart() {
        let (dir, mut state) = state();
        let step = Step::gaussian(0.2, 1.1);
        let prior = Step::gaussian(1.0, 10.0);
        state
            .record_privacy("menu-v1", RoundId(1), &step, Some(&prior), 0.5)
            .unwrap();
        state
            .record_privacy("other", RoundId(2), &step, None, 0.5)
            .unwrap();
        state
            .record_privacy("menu-v1", RoundId(3), &step, None, 0.7)
            .unwrap();
        drop(state);
        let reopened = State::open_existing(&dir.path().join("state")).unwrap();
        assert_eq!(
            reopened.privacy_steps("menu-v1").unwrap(),
            vec![step, prior, step],
            "the prior release paid with round 1 is part of the lineage's cost"
        );
        assert!(reopened.prior_charged("menu-v1").unwrap());
        assert!(!reopened.prior_charged("other").unwrap());
        assert_eq!(reopened.privacy_steps("new").unwrap(), Vec::<Step>::new());
        assert_eq!(
            reopened.next_round().unwrap(),
            RoundId(4),
            "a round charged but never recorded as opened is not reused"
        );
    }

    #[test]
    fn state_from_an_earlier_version_is_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("privacy.jsonl"), "{}\n").unwrap();
        let err = State::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("privacy.jsonl") && err.contains("new state_dir"),
            "{err}"
        );
        assert!(!dir.path().join(DB_FILE).exists());
    }

    #[test]
    fn models_are_stored_checked_against_the_spec_and_rolled_back_as_new_versions() {
        let (_dir, mut state) = state();
        let v0 = state.load_or_init(spec(), 1).unwrap();
        let mut v1 = v0.clone();
        v1.version = ModelVersion(1);
        v1.params.iter_mut().for_each(|p| *p += 1.0);
        let moments = OptimizerState {
            steps: 1,
            first: vec![0.25; 3],
            second: vec![0.5; 3],
            clip_norm: Some(0.75),
        };
        state.commit_model(&v1, Some(RoundId(1)), &moments).unwrap();
        assert_eq!(
            state.load_or_init(spec(), 1).unwrap(),
            v1,
            "the latest version loads"
        );
        assert_eq!(state.optimizer_state(1).unwrap(), moments);
        assert_eq!(state.optimizer_state(0).unwrap(), OptimizerState::default());
        state
            .request_rollback(0, "cli:test", "v1 regressed")
            .unwrap();
        assert_eq!(state.pending_rollback().unwrap().map(|p| p.target), Some(0));
        let v2 = GlobalModel {
            version: ModelVersion(2),
            ..v0.clone()
        };
        state.commit_rollback(&v2, ModelVersion(0)).unwrap();
        assert_eq!(state.pending_rollback().unwrap(), None);
        let listed: Vec<_> = state
            .models()
            .unwrap()
            .into_iter()
            .map(|m| (m.version, m.round, m.rolled_back_from, m.current))
            .collect();
        assert_eq!(
            listed,
            [
                (0, None, None, false),
                (1, Some(1), None, false),
                (2, None, Some(0), true)
            ]
        );
        let err = state.request_rollback(9, "cli:test", "").unwrap_err();
        assert!(err.to_string().contains("no model version 9"), "{err}");
        let mut other = spec();
        other.dims.hidden += 1;
        let err = state.load_or_init(other, 1).unwrap_err();
        assert!(matches!(err, StateError::SpecChanged { .. }), "{err}");
    }

    #[test]
    fn tokens_are_stored_hashed_and_named_uniquely() {
        let (dir, mut state) = state();
        let secret = state.create_token("ops", Role::Operator).unwrap();
        assert_eq!(
            state.token(&secret).unwrap(),
            Some(("ops".to_string(), Role::Operator))
        );
        assert_eq!(state.token("potluck_guess").unwrap(), None);
        assert!(state.create_token("ops", Role::Viewer).is_err());
        drop(state);
        let bytes = std::fs::read(dir.path().join("state").join(DB_FILE)).unwrap();
        let wal =
            std::fs::read(dir.path().join("state").join("coordinator.db-wal")).unwrap_or_default();
        for file in [bytes, wal] {
            assert!(
                !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the secret is not stored"
            );
        }
        let mut state = State::open_existing(&dir.path().join("state")).unwrap();
        state.revoke_token("ops").unwrap();
        assert_eq!(state.token(&secret).unwrap(), None);
    }

    #[test]
    fn revoked_certificates_are_remembered() {
        let (dir, mut state) = state();
        let site: SiteId = "site-1".parse().unwrap();
        let err = state
            .revoke_site(&site, None, "cli:test", "lost")
            .unwrap_err();
        assert!(err.to_string().contains("never connected"), "{err}");
        state.site_seen(&site, "aa").unwrap();
        let revoked = state
            .revoke_site(&site, Some("bb".into()), "cli:test", "lost")
            .unwrap();
        assert_eq!(revoked, ["aa", "bb"]);
        drop(state);
        let state = State::open_existing(&dir.path().join("state")).unwrap();
        assert!(state.is_revoked("aa").unwrap() && state.is_revoked("bb").unwrap());
        assert!(
            !state.is_revoked("cc").unwrap(),
            "a new certificate is admitted"
        );
        assert!(state.sites().unwrap()[0].revoked);
    }

    /// Five audited changes, then `tamper` applied with raw SQL.
    fn tampered(tamper: &str) -> Result<u64, Tamper> {
        let (_dir, mut state) = state();
        for i in 0..5 {
            state.audit("test", serde_json::json!({"i": i})).unwrap();
        }
        state.conn.execute_batch(tamper).unwrap();
        state.verify_audit().unwrap()
    }

    #[test]
    fn audit_verify_names_each_kind_of_tampering() {
        assert_eq!(tampered(""), Ok(5));
        let edited = tampered(
            "UPDATE audit SET entry = replace(entry, '\"i\":2', '\"i\":7') WHERE position = 3",
        );
        assert!(
            matches!(edited, Err(Tamper::Edited { seq: 3, .. })),
            "{edited:?}"
        );
        let removed = tampered("DELETE FROM audit WHERE position = 2");
        assert!(
            matches!(removed, Err(Tamper::Removed { missing: 2, .. })),
            "{removed:?}"
        );
        let reordered = tampered(
            "UPDATE audit SET position = 100 WHERE position = 2;
             UPDATE audit SET position = 2 WHERE position = 4;
             UPDATE audit SET position = 4 WHERE position = 100;",
        );
        assert!(
            matches!(
                reordered,
                Err(Tamper::Reordered {
                    found: 4,
                    expected: 2,
                    ..
                })
            ),
            "{reordered:?}"
        );
        let cut = tampered("DELETE FROM audit WHERE position = 5");
        assert!(
            matches!(cut, Err(Tamper::Truncated { last: 4, head: 5 })),
            "{cut:?}"
        );
    }
}
