//! The site's local, tamper-evident audit log (`STATE_DIR/audit.jsonl`, with
//! its head in `audit.head`): imports, consent changes and rounds joined or
//! refused, chained by hash ([`potluck_shared::audit`]).
//!
//! Entries never hold a customer identifier: a customer is named by their
//! pseudonym (a keyed hash, see [`crate::vault`]), which `subject export`
//! shows for a given customer and nobody can reverse.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use potluck_shared::audit::{self, Head, Tamper};

/// Why the audit log could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The log fails verification.
    #[error("{path}: {tamper}")]
    Tampered {
        /// The log.
        path: String,
        /// What is wrong, naming the entry.
        tamper: Tamper,
    },
}

/// The audit log of one site.
#[derive(Debug, Clone)]
pub struct AuditLog {
    log: PathBuf,
    head: PathBuf,
}

impl AuditLog {
    /// The log in `state_dir` (created on first write).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            log: state_dir.join("audit.jsonl"),
            head: state_dir.join("audit.head"),
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.log
    }

    /// Append an entry. Writers on one machine are serialised by a lock on the head file.
    pub fn append(&self, event: &str, details: serde_json::Value) -> Result<(), AuditError> {
        let mut head_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.head)
            .map_err(io(&self.head))?;
        head_file.lock().map_err(io(&self.head))?;
        let head = read_head(&mut head_file, &self.head)?;
        let entry = audit::next_entry(&head, audit::timestamp(), event, details);
        let line = serde_json::to_string(&entry).expect("entries serialise");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(&self.log))?;
        writeln!(log, "{line}").map_err(io(&self.log))?;
        log.sync_data().map_err(io(&self.log))?;
        let next = Head {
            seq: entry.seq,
            hash: entry.hash,
        };
        let text = serde_json::to_string(&next).expect("heads serialise");
        head_file.set_len(0).map_err(io(&self.head))?;
        std::io::Seek::rewind(&mut head_file).map_err(io(&self.head))?;
        head_file
            .write_all(text.as_bytes())
            .and_then(|()| head_file.sync_data())
            .map_err(io(&self.head))
    }

    /// Verify the whole log; returns the number of entries.
    pub fn verify(&self) -> Result<u64, AuditError> {
        self.verify_anchored(&Head::default())
    }

    /// Verify the log, and that it still holds the entry `anchor` names
    /// (see [`AuditLog::anchor`]); a default anchor checks the chain only.
    pub fn verify_anchored(&self, anchor: &Head) -> Result<u64, AuditError> {
        let (text, head) = self.read()?;
        audit::verify_anchored(text.lines(), &head, anchor).map_err(|tamper| AuditError::Tampered {
            path: self.log.display().to_string(),
            tamper,
        })
    }

    /// The head of a verified log: what an auditor keeps, away from this
    /// machine, to check later that history was neither wiped nor rewritten.
    pub fn anchor(&self) -> Result<Head, AuditError> {
        self.verify()?;
        Ok(self.read()?.1)
    }

    fn read(&self) -> Result<(String, Head), AuditError> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&self.log)(e)),
        };
        let head = match File::open(&self.head) {
            Ok(mut f) => read_head(&mut f, &self.head)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Head::default(),
            Err(e) => return Err(io(&self.head)(e)),
        };
        Ok((text, head))
    }
}

fn read_head(file: &mut File, path: &Path) -> Result<Head, AuditError> {
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io(path))?;
    if text.trim().is_empty() {
        return Ok(Head::default());
    }
    serde_json::from_str(&text).map_err(|e| {
        io(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an audit head: {e}"),
        ))
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}
