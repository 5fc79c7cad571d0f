//! The coordinator's durable state under `state_dir`.
//!
//! - `models/model-NNNNNNNN.bin`: every model version, codec-encoded, written
//!   to a temporary file, synced and renamed, so a version is either whole or absent.
//! - `next_round`: the next round number, so numbers are not reused after a restart.
//! - `metrics.jsonl`: one JSON object per completed round, appended.
//! - `privacy.jsonl`: the privacy ledger, one JSON object per private round,
//!   appended and synced *before* the round's task is sent, so the privacy
//!   spent is never undercounted, whatever happens next.

use std::io::Write;
use std::path::{Path, PathBuf};

use potluck_shared::RoundId;
use potluck_shared::dp::Step;
use potluck_shared::model::{GlobalModel, ModelSpec};
use potluck_shared::wire::codec;

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
    /// A stored model is unreadable.
    #[error("{path}: corrupt model file: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
    /// The stored lineage was trained with another model spec.
    #[error(
        "{path}: the stored model (spec {stored}) does not match the configured menu and model \
         (spec {configured}); keep the configuration or start a new lineage in another state_dir"
    )]
    SpecChanged {
        /// The model file.
        path: String,
        /// Stored spec hash.
        stored: String,
        /// Configured spec hash.
        configured: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Open, creating directories as needed.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let models = root.join("models");
        std::fs::create_dir_all(&models).map_err(io(&models))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn model_path(&self, version: u64) -> PathBuf {
        self.root
            .join("models")
            .join(format!("model-{version:08}.bin"))
    }

    /// The metrics file.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The latest stored model, checked against `spec`, or a new version 0 from `seed`.
    pub fn load_or_init(&self, spec: ModelSpec, seed: u64) -> Result<GlobalModel, StateError> {
        let Some(latest) = self.latest_version()? else {
            let model = GlobalModel {
                version: potluck_shared::ModelVersion(0),
                params: spec.initial_params(seed),
                spec,
            };
            self.save_model(&model)?;
            return Ok(model);
        };
        let path = self.model_path(latest);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let model: GlobalModel = codec::decode(&bytes).map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        model.validate().map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if model.spec.hash() != spec.hash() {
            return Err(StateError::SpecChanged {
                path: path.display().to_string(),
                stored: model.spec.hash().to_string(),
                configured: spec.hash().to_string(),
            });
        }
        Ok(model)
    }

    fn latest_version(&self) -> Result<Option<u64>, StateError> {
        let dir = self.root.join("models");
        let mut latest = None;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let name = entry.map_err(io(&dir))?.file_name();
            let version = name
                .to_str()
                .and_then(|n| n.strip_prefix("model-"))
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|n| n.parse::<u64>().ok());
            latest = latest.max(version);
        }
        Ok(latest)
    }

    /// Store a model version durably.
    pub fn save_model(&self, model: &GlobalModel) -> Result<(), StateError> {
        let bytes = codec::encode(model).map_err(|e| StateError::Corrupt {
            path: "model".into(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.model_path(model.version.0), &bytes)
    }

    /// The next round number to use.
    pub fn next_round(&self) -> Result<RoundId, StateError> {
        let path = self.root.join("next_round");
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(RoundId)
                .map_err(|e| StateError::Corrupt {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RoundId(1)),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Record that `round` was opened, so it is not reused.
    pub fn round_opened(&self, round: RoundId) -> Result<(), StateError> {
        write_atomic(
            &self.root.join("next_round"),
            round.next().0.to_string().as_bytes(),
        )
    }

    fn privacy_path(&self) -> PathBuf {
        self.root.join("privacy.jsonl")
    }

    /// Record a private round's mechanism in the ledger, durably.
    pub fn record_privacy(
        &self,
        lineage: &str,
        round: RoundId,
        step: &Step,
        epsilon: f64,
    ) -> Result<(), StateError> {
        let line = serde_json::json!({
            "lineage": lineage,
            "round": round.0,
            "step": step,
            "epsilon": epsilon,
        });
        append_line(&self.privacy_path(), &line)
    }

    /// The mechanisms of every private round of `lineage` recorded so far.
    pub fn privacy_steps(&self, lineage: &str) -> Result<Vec<Step>, StateError> {
        let path = self.privacy_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut steps = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let corrupt = |reason: String| StateError::Corrupt {
                path: format!("{}:{}", path.display(), number + 1),
                reason,
            };
            let entry: LedgerLine =
                serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
            if entry.lineage == lineage {
                steps.push(entry.step);
            }
        }
        Ok(steps)
    }

    /// Append one JSON line to `metrics.jsonl`.
    pub fn append_metrics(&self, line: &serde_json::Value) -> Result<(), StateError> {
        append_line(&self.metrics_path(), line)
    }
}

#[derive(serde::Deserialize)]
struct LedgerLine {
    lineage: String,
    step: Step,
}

/// Append one line and sync it.
fn append_line(path: &Path, line: &serde_json::Value) -> Result<(), StateError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    writeln!(file, "{line}").map_err(io(path))?;
    file.sync_data().map_err(io(path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_privacy_ledger_survives_a_restart_and_keeps_lineages_apart() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let step = Step::gaussian(0.2, 1.1);
        state
            .record_privacy("menu-v1", RoundId(1), &step, 0.5)
            .unwrap();
        state
            .record_privacy("other", RoundId(2), &step, 0.5)
            .unwrap();
        state
            .record_privacy("menu-v1", RoundId(3), &step, 0.7)
            .unwrap();
        let reopened = StateDir::open(dir.path()).unwrap();
        assert_eq!(reopened.privacy_steps("menu-v1").unwrap(), vec![step, step]);
        assert_eq!(reopened.privacy_steps("new").unwrap(), Vec::<Step>::new());
    }

    #[test]
    fn a_corrupt_ledger_line_is_named_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state
            .record_privacy("l", RoundId(1), &Step::gaussian(0.2, 1.1), 0.5)
            .unwrap();
        let path = dir.path().join("privacy.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"lineage\": \"l\", \"step\": tru\n");
        std::fs::write(&path, text).unwrap();
        let err = state.privacy_steps("l").unwrap_err().to_string();
        assert!(err.contains("privacy.jsonl:2"), "{err}");
    }
}
