//! A tamper-evident audit log: JSON lines, each chained by hash to the one before.
//!
//! Entry `n` stores `hash_n = SHA-256(D ‖ len ‖ hash_{n-1} ‖ len ‖ n ‖ len ‖ time ‖
//! len ‖ event ‖ len ‖ details)`, where `D = "potluck-audit-v1"`, every part is
//! preceded by its length (4 bytes, big-endian), `n` is 8 bytes big-endian,
//! `details` is the compact JSON of the details object with keys sorted, and
//! `hash_0` (before the first entry) is 32 zero bytes. Editing an entry breaks
//! its hash; removing or reordering entries breaks the sequence and the chain.
//! A head file beside the log holds the last sequence number and hash, so that
//! cutting entries off the end is detected too, and entries after it are
//! refused.
//!
//! The chain has no key: whoever can write both files can rewrite history and
//! recompute every hash, or wipe both. An **anchor** (a head given to an
//! auditor, kept where the writer cannot reach it) closes that: a log verified
//! against an anchor must still hold the anchored entry, unchanged.
//!
//! Pure functions over lines; the files are the callers'.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"potluck-audit-v1";

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// What happened, e.g. `import` or `consent`.
    pub event: String,
    /// The figures, as a JSON object.
    pub details: serde_json::Value,
    /// Hash of the previous entry (hex).
    pub prev: String,
    /// Hash of this entry (hex).
    pub hash: String,
}

/// The last entry's position and hash (what the head file holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Sequence number of the last entry (0: empty log).
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: hex(&[0u8; 32]),
        }
    }
}

/// How a log fails verification; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Tamper {
    /// A line that is not an entry.
    #[error("line {line}: not an audit entry: {reason}")]
    Malformed {
        /// The line.
        line: usize,
        /// Why.
        reason: String,
    },
    /// An entry whose content no longer matches its hash.
    #[error("line {line}: entry {seq} was edited (its hash does not match its content)")]
    Edited {
        /// The line.
        line: usize,
        /// Its sequence number.
        seq: u64,
    },
    /// An entry is missing: the one expected at this line appears nowhere.
    #[error("line {line}: entry {missing} was removed")]
    Removed {
        /// The line where it should be.
        line: usize,
        /// The missing entry.
        missing: u64,
    },
    /// An entry out of order.
    #[error("line {line}: entry {found} is where entry {expected} belongs: entries were reordered")]
    Reordered {
        /// The line.
        line: usize,
        /// The entry found there.
        found: u64,
        /// The entry that belongs there.
        expected: u64,
    },
    /// An entry that does not chain to the previous one.
    #[error("line {line}: entry {seq} does not chain to the entry before it (replaced?)")]
    Unchained {
        /// The line.
        line: usize,
        /// Its sequence number.
        seq: u64,
    },
    /// Entries after the recorded head: written without updating it.
    #[error(
        "the log goes on to entry {last} after the recorded head, entry {head}: entries were \
         added without the head (by another writer, or an append cut short)"
    )]
    BeyondHead {
        /// The recorded head.
        head: u64,
        /// The last entry present.
        last: u64,
    },
    /// The anchored entry is not the one in the log: history was rewritten.
    #[error("entry {seq} is not the one anchored: the log was rewritten")]
    Rewritten {
        /// The anchored entry.
        seq: u64,
    },
    /// The log ends before the recorded head: its last entries were removed.
    #[error(
        "the log ends at entry {last}, but entry {head} was written: entries were cut off the end"
    )]
    Truncated {
        /// The last entry present.
        last: u64,
        /// The last entry written.
        head: u64,
    },
}

/// Make the entry that follows `head`.
pub fn next_entry(head: &Head, time: String, event: &str, details: serde_json::Value) -> Entry {
    let seq = head.seq + 1;
    let hash = entry_hash(&head.hash, seq, &time, event, &details);
    Entry {
        seq,
        time,
        event: event.to_string(),
        details,
        prev: head.hash.clone(),
        hash,
    }
}

/// Check every line of a log against the chain and against `head`; returns the number of entries.
pub fn verify<'a>(lines: impl IntoIterator<Item = &'a str>, head: &Head) -> Result<u64, Tamper> {
    let mut entries = Vec::new();
    for (i, text) in lines.into_iter().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let entry: Entry = serde_json::from_str(text).map_err(|e| Tamper::Malformed {
            line: i + 1,
            reason: e.to_string(),
        })?;
        entries.push((i + 1, entry));
    }
    let present: std::collections::BTreeSet<u64> = entries.iter().map(|(_, e)| e.seq).collect();
    let mut last = Head::default();
    for (position, (line, entry)) in entries.iter().enumerate() {
        let (line, expected) = (*line, position as u64 + 1);
        if entry.seq != expected {
            return Err(if present.contains(&expected) {
                Tamper::Reordered {
                    line,
                    found: entry.seq,
                    expected,
                }
            } else {
                Tamper::Removed {
                    line,
                    missing: expected,
                }
            });
        }
        let hash = entry_hash(
            &entry.prev,
            entry.seq,
            &entry.time,
            &entry.event,
            &entry.details,
        );
        if hash != entry.hash {
            return Err(Tamper::Edited {
                line,
                seq: entry.seq,
            });
        }
        if entry.prev != last.hash {
            return Err(Tamper::Unchained {
                line,
                seq: entry.seq,
            });
        }
        last = Head {
            seq: entry.seq,
            hash: entry.hash.clone(),
        };
    }
    if last.seq < head.seq {
        return Err(Tamper::Truncated {
            last: last.seq,
            head: head.seq,
        });
    }
    if last.seq > head.seq {
        return Err(Tamper::BeyondHead {
            head: head.seq,
            last: last.seq,
        });
    }
    if last.hash != head.hash {
        return Err(Tamper::Unchained {
            line: entries.last().map_or(0, |(line, _)| *line),
            seq: last.seq,
        });
    }
    Ok(last.seq)
}

/// [`verify`], and that the log still holds the entry `anchor` names,
/// unchanged: a wiped or rewritten log fails, whatever its head file says.
pub fn verify_anchored<'a>(
    lines: impl IntoIterator<Item = &'a str> + Clone,
    head: &Head,
    anchor: &Head,
) -> Result<u64, Tamper> {
    let last = verify(lines.clone(), head)?;
    if anchor.seq == 0 {
        return Ok(last);
    }
    if anchor.seq > last {
        return Err(Tamper::Truncated {
            last,
            head: anchor.seq,
        });
    }
    let anchored = lines
        .into_iter()
        .filter(|text| !text.trim().is_empty())
        .nth(anchor.seq as usize - 1)
        .and_then(|text| serde_json::from_str::<Entry>(text).ok());
    match anchored {
        Some(entry) if entry.hash == anchor.hash => Ok(last),
        _ => Err(Tamper::Rewritten { seq: anchor.seq }),
    }
}

fn entry_hash(
    prev: &str,
    seq: u64,
    time: &str,
    event: &str,
    details: &serde_json::Value,
) -> String {
    let details = details.to_string(); // serde_json sorts object keys
    let mut h = Sha256::new();
    h.update(DOMAIN);
    for part in [
        prev.as_bytes(),
        &seq.to_be_bytes()[..],
        time.as_bytes(),
        event.as_bytes(),
        details.as_bytes(),
    ] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    hex(&h.finalize())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `bytes` (certificate fingerprints, token hashes).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Now, as an entry's time: RFC 3339 UTC, to the second (the sequence orders entries).
pub fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(n: u64) -> (Vec<String>, Head) {
        let mut head = Head::default();
        let mut lines = Vec::new();
        for i in 1..=n {
            let entry = next_entry(
                &head,
                format!("2026-01-0{i}T00:00:00Z"),
                "import",
                json!({"rows": i}),
            );
            head = Head {
                seq: entry.seq,
                hash: entry.hash.clone(),
            };
            lines.push(serde_json::to_string(&entry).unwrap());
        }
        (lines, head)
    }

    fn check(lines: &[String], head: &Head) -> Result<u64, Tamper> {
        verify(lines.iter().map(String::as_str), head)
    }

    /// Attack: whoever can write the state directory wipes the log, or
    /// rewrites it from scratch with a fresh, consistent chain and head.
    /// Against an anchor the auditor kept, both fail; so do entries added
    /// after the recorded head.
    #[test]
    fn an_anchored_log_cannot_be_wiped_rewritten_or_extended_behind_the_head() {
        let (lines, head) = log(5);
        let anchored = |lines: &[String], head: &Head| {
            verify_anchored(
                lines.iter().map(String::as_str),
                head,
                &Head {
                    seq: 3,
                    hash: serde_json::from_str::<Entry>(&log(5).0[2]).unwrap().hash,
                },
            )
        };
        assert_eq!(anchored(&lines, &head), Ok(5));
        // Wiped: log and head gone, which on its own verifies as empty.
        assert_eq!(check(&[], &Head::default()), Ok(0));
        assert_eq!(
            anchored(&[], &Head::default()),
            Err(Tamper::Truncated { last: 0, head: 3 })
        );
        // Rewritten: a fresh chain, every hash recomputed, its own head.
        let mut fake_head = Head::default();
        let mut fake = Vec::new();
        for i in 1..=5u64 {
            let entry = next_entry(
                &fake_head,
                "2026-01-01T00:00:00Z".into(),
                "import",
                json!({"rows": i * 10}),
            );
            fake_head = Head {
                seq: entry.seq,
                hash: entry.hash.clone(),
            };
            fake.push(serde_json::to_string(&entry).unwrap());
        }
        assert_eq!(check(&fake, &fake_head), Ok(5), "consistent on its own");
        assert_eq!(
            anchored(&fake, &fake_head),
            Err(Tamper::Rewritten { seq: 3 })
        );
        // Extended behind the head: a well-chained entry the head does not know.
        let (longer, _) = log(6);
        assert_eq!(
            check(&longer, &head),
            Err(Tamper::BeyondHead { head: 5, last: 6 })
        );
    }

    #[test]
    fn entries_with_floats_verify_after_a_round_trip_through_text() {
        // serde_json parses floats exactly only with `float_roundtrip`; without
        // it an epsilon could read back one ulp off and its entry look edited.
        let mut head = Head::default();
        let mut lines = Vec::new();
        for i in 1..=200u32 {
            let epsilon = f64::from(i).sqrt() * 1.000_000_1 / 3.0;
            let entry = next_entry(&head, "t".into(), "round", json!({ "epsilon": epsilon }));
            head = Head {
                seq: entry.seq,
                hash: entry.hash.clone(),
            };
            lines.push(serde_json::to_string(&entry).unwrap());
        }
        assert_eq!(verify(lines.iter().map(String::as_str), &head), Ok(200));
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (lines, head) = log(4);
        assert_eq!(check(&lines, &head), Ok(4));
        assert_eq!(check(&[], &Head::default()), Ok(0));
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let (lines, head) = log(4);
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"rows\":2", "\"rows\":20");
        assert_eq!(
            check(&edited, &head),
            Err(Tamper::Edited { line: 2, seq: 2 })
        );

        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(
            check(&removed, &head),
            Err(Tamper::Removed {
                line: 2,
                missing: 2
            })
        );

        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert_eq!(
            check(&reordered, &head),
            Err(Tamper::Reordered {
                line: 2,
                found: 3,
                expected: 2
            })
        );

        let mut cut = lines.clone();
        cut.pop();
        assert_eq!(
            check(&cut, &head),
            Err(Tamper::Truncated { last: 3, head: 4 })
        );

        // A whole entry rewritten with a fresh, self-consistent hash breaks the chain.
        let (other, _) = log(4);
        let mut forged: Vec<String> = lines.clone();
        let mut entry: Entry = serde_json::from_str(&other[2]).unwrap();
        entry.details = json!({"rows": 99});
        entry.prev = "00".repeat(32);
        entry.hash = entry_hash(
            &entry.prev,
            entry.seq,
            &entry.time,
            &entry.event,
            &entry.details,
        );
        forged[2] = serde_json::to_string(&entry).unwrap();
        assert_eq!(
            check(&forged, &head),
            Err(Tamper::Unchained { line: 3, seq: 3 })
        );

        let mut garbage = lines;
        garbage[0] = "{not json".into();
        assert!(matches!(
            check(&garbage, &head),
            Err(Tamper::Malformed { line: 1, .. })
        ));
    }
}
