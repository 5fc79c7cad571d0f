//! Importing an orders CSV into the store.
//!
//! Columns (by header name, any order): `customer_id, order_id, timestamp`
//! (RFC 3339), `item_id, quantity`, and optionally `consent` (true/false);
//! these are kept, for training. Columns declared `audit_only` in
//! `agent.toml` are kept as attributes of the customer (the last row's value
//! wins), encrypted, for fairness audits at the site only. Every other column
//! is dropped and named in the report. Orders older than the retention period
//! are not stored, and counted in the report. Every row is validated
//! before anything is written: by default one bad row fails the whole import
//! with file, line and reason, and the store is unchanged; with
//! `skip_invalid` the good rows are stored and the bad ones are written, with
//! their reasons, to a rejects file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use potluck_shared::model::Menu;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{DataPolicy, ORDER_COLUMNS, Purpose};
use crate::store::{CustomerFacts, ImportCounts, OrderLine, SiteStore, StoreError};

const CONSENT: &str = "consent";
const MAX_ID_LEN: usize = 256;
/// How many row errors a failed import spells out.
const ERRORS_SHOWN: usize = 10;

/// Why an import failed; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The header lacks a required column or cannot be read.
    #[error("{path}:1: {reason}")]
    Header {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Rows are invalid and `skip_invalid` was not set.
    #[error("{}", describe_rows(path, errors))]
    InvalidRows {
        /// The file.
        path: String,
        /// Every invalid row.
        errors: Vec<RowError>,
    },
    /// The store refused the write.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_rows(path: &str, errors: &[RowError]) -> String {
    let mut lines: Vec<String> = errors
        .iter()
        .take(ERRORS_SHOWN)
        .map(|e| format!("{path}:{}: {}", e.line, e.reason))
        .collect();
    if errors.len() > ERRORS_SHOWN {
        lines.push(format!(
            "... and {} more invalid rows",
            errors.len() - ERRORS_SHOWN
        ));
    }
    lines.push(format!(
        "{} invalid rows; nothing was imported (use --skip-invalid to import the valid rows)",
        errors.len()
    ));
    lines.join("\n")
}

/// One rejected row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowError {
    /// 1-based line number in the file (the header is line 1).
    pub line: u64,
    /// What is wrong.
    pub reason: String,
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Store the valid rows and write the invalid ones to a rejects file.
    pub skip_invalid: bool,
    /// Where to write rejects (default: `<file>.rejects.csv`).
    pub rejects: Option<PathBuf>,
    /// Columns kept as audit-only customer attributes.
    pub audit_columns: Vec<String>,
    /// Orders before this time (Unix seconds) are past retention and not stored.
    pub retention_cutoff: Option<i64>,
}

impl ImportOptions {
    /// Apply a site's data policy at time `now`.
    pub fn with_policy(mut self, policy: &DataPolicy, now: OffsetDateTime) -> Self {
        self.audit_columns = policy.audit_columns();
        self.retention_cutoff = policy
            .retention_days
            .map(|days| retention_cutoff(days, now));
        self
    }
}

/// The oldest order time kept under a retention of `days` at `now`.
pub fn retention_cutoff(days: u32, now: OffsetDateTime) -> i64 {
    now.unix_timestamp() - i64::from(days) * 86_400
}

/// A column kept, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeptColumn {
    /// The column.
    pub column: String,
    /// `training`, `audit_only`, or `consent`.
    pub purpose: &'static str,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The file imported.
    pub file: String,
    /// Data rows read.
    pub rows: u64,
    /// What changed in the store.
    pub counts: ImportCounts,
    /// Rows rejected (only with `skip_invalid`).
    pub rejected: u64,
    /// Where the rejected rows were written.
    pub rejects_file: Option<String>,
    /// Columns kept, with their purpose.
    pub kept_columns: Vec<KeptColumn>,
    /// Columns present in the file but not kept.
    pub dropped_columns: Vec<String>,
    /// Valid rows not stored because the order is older than the retention period.
    pub past_retention: u64,
}

/// Validated rows, ready to store.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Valid order lines.
    pub lines: Vec<OrderLine>,
    /// Consent and audit-only attributes stated per customer (last row wins).
    pub customers: BTreeMap<String, CustomerFacts>,
    /// Invalid rows.
    pub errors: Vec<RowError>,
    /// Data rows read.
    pub rows: u64,
    /// Columns kept.
    pub kept_columns: Vec<KeptColumn>,
    /// Ignored columns.
    pub dropped_columns: Vec<String>,
}

/// Import `path` into `store`, validating against `menu`.
pub fn import_file(
    store: &SiteStore,
    path: &Path,
    menu: &Menu,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ImportError::Io {
        path: name.clone(),
        source,
    })?;
    let mut parsed = parse(file, &name, menu, &options.audit_columns)?;
    if !parsed.errors.is_empty() && !options.skip_invalid {
        return Err(ImportError::InvalidRows {
            path: name,
            errors: parsed.errors,
        });
    }
    let rejects_file = if parsed.errors.is_empty() {
        None
    } else {
        let target = options
            .rejects
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{name}.rejects.csv")));
        write_rejects(&target, &parsed.errors).map_err(|source| ImportError::Io {
            path: target.display().to_string(),
            source,
        })?;
        Some(target.display().to_string())
    };
    let before = parsed.lines.len();
    if let Some(cutoff) = options.retention_cutoff {
        parsed.lines.retain(|l| l.time >= cutoff);
    }
    let past_retention = (before - parsed.lines.len()) as u64;
    let counts = store.import(&parsed.lines, &parsed.customers)?;
    Ok(ImportReport {
        file: name,
        rows: parsed.rows,
        counts,
        rejected: parsed.errors.len() as u64,
        rejects_file,
        kept_columns: parsed.kept_columns,
        dropped_columns: parsed.dropped_columns,
        past_retention,
    })
}

/// Parse and validate an orders CSV; `source` names it in errors, and
/// `audit_columns` are kept as customer attributes.
pub fn parse(
    input: impl std::io::Read,
    source: &str,
    menu: &Menu,
    audit_columns: &[String],
) -> Result<Parsed, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(input);
    let header_error = |reason: String| ImportError::Header {
        path: source.to_string(),
        reason,
    };
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| header_error(e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let position = |name: &str| header.iter().position(|h| h == name);
    let mut columns = HashMap::new();
    for name in ORDER_COLUMNS {
        let at = position(name).ok_or_else(|| header_error(format!("missing column {name:?}")))?;
        columns.insert(name, at);
    }
    let consent_col = position(CONSENT);
    let attribute_cols: Vec<(&str, usize)> = audit_columns
        .iter()
        .filter_map(|c| position(c).map(|at| (c.as_str(), at)))
        .collect();
    let (kept_columns, dropped_columns) = sort_columns(&header, audit_columns);
    let items: HashSet<&str> = menu.items().iter().map(|i| i.item_id.as_str()).collect();
    let mut parsed = Parsed {
        kept_columns,
        dropped_columns,
        ..Parsed::default()
    };
    // order_id -> (customer, time, line first seen), to catch contradictory rows.
    let mut orders: HashMap<String, (String, i64, u64)> = HashMap::new();
    let mut seen_lines: HashSet<(String, String, String)> = HashSet::new();
    for record in reader.records() {
        parsed.rows += 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(parsed.rows + 1, |p| p.line());
                parsed.errors.push(RowError {
                    line,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let line = record.position().map_or(parsed.rows + 1, |p| p.line());
        if let Some(reason) = unclosed_quote(&record, header.len()) {
            parsed.errors.push(RowError { line, reason });
            continue;
        }
        let field = |name: &str| record.get(columns[name]).unwrap_or("");
        let consent = consent_col.map(|c| record.get(c).unwrap_or(""));
        let attributes: Vec<(&str, &str)> = attribute_cols
            .iter()
            .map(|&(column, at)| (column, record.get(at).unwrap_or("")))
            .collect();
        let checked = validate(field, consent, &items).and_then(|ok| {
            match attributes.iter().find(|(_, v)| v.len() > MAX_ID_LEN) {
                Some((column, _)) => Err(format!("{column} longer than {MAX_ID_LEN} characters")),
                None => Ok(ok),
            }
        });
        match checked {
            Err(reason) => parsed.errors.push(RowError { line, reason }),
            Ok((order_line, consent)) => {
                let seen = orders
                    .entry(order_line.order_id.clone())
                    .or_insert_with(|| (order_line.customer_id.clone(), order_line.time, line));
                if seen.0 != order_line.customer_id || seen.1 != order_line.time {
                    let reason = format!(
                        "order {:?} has another customer or timestamp at line {}",
                        order_line.order_id, seen.2
                    );
                    parsed.errors.push(RowError { line, reason });
                    continue;
                }
                let key = (
                    order_line.customer_id.clone(),
                    order_line.order_id.clone(),
                    order_line.item_id.clone(),
                );
                if !seen_lines.insert(key) {
                    let reason = format!(
                        "item {:?} appears twice in order {:?}",
                        order_line.item_id, order_line.order_id
                    );
                    parsed.errors.push(RowError { line, reason });
                    continue;
                }
                let facts = parsed
                    .customers
                    .entry(order_line.customer_id.clone())
                    .or_default();
                if consent.is_some() {
                    facts.consent = consent;
                }
                for &(column, value) in &attributes {
                    if !value.is_empty() {
                        facts
                            .attributes
                            .insert(column.to_string(), value.to_string());
                    }
                }
                parsed.lines.push(order_line);
            }
        }
    }
    Ok(parsed)
}

/// The file's columns, kept (with purpose) or dropped.
fn sort_columns(header: &[String], audit_columns: &[String]) -> (Vec<KeptColumn>, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for column in header {
        let purpose = if ORDER_COLUMNS.contains(&column.as_str()) {
            Purpose::Training.as_str()
        } else if column == CONSENT {
            CONSENT
        } else if audit_columns.contains(column) {
            Purpose::AuditOnly.as_str()
        } else {
            dropped.push(column.clone());
            continue;
        };
        kept.push(KeptColumn {
            column: column.clone(),
            purpose,
        });
    }
    (kept, dropped)
}

/// A quoted field left open swallows the lines after it into one field, so
/// the row looks short: say so, rather than name a column that seems missing.
fn unclosed_quote(record: &csv::StringRecord, columns: usize) -> Option<String> {
    let swallowed = record.iter().find(|f| f.contains('\n'))?;
    (record.len() < columns).then(|| {
        format!(
            "a quoted field is not closed on its line: it runs over {} more lines",
            swallowed.matches('\n').count()
        )
    })
}

fn validate<'a>(
    field: impl Fn(&str) -> &'a str,
    consent: Option<&str>,
    items: &HashSet<&str>,
) -> Result<(OrderLine, Option<bool>), String> {
    let id = |name: &str| {
        let v = field(name);
        if v.is_empty() {
            Err(format!("missing {name}"))
        } else if v.len() > MAX_ID_LEN {
            Err(format!("{name} longer than {MAX_ID_LEN} characters"))
        } else {
            Ok(v.to_string())
        }
    };
    let customer_id = id("customer_id")?;
    let order_id = id("order_id")?;
    let item_id = id("item_id")?;
    let raw_time = field("timestamp");
    if raw_time.is_empty() {
        return Err("missing timestamp".into());
    }
    let at = OffsetDateTime::parse(raw_time, &Rfc3339)
        .map_err(|e| format!("timestamp {raw_time:?} is not RFC 3339: {e}"))?;
    if !items.contains(item_id.as_str()) {
        return Err(format!("item {item_id:?} is not on the menu"));
    }
    let raw_qty = field("quantity");
    let quantity: i64 = raw_qty
        .parse()
        .map_err(|_| format!("quantity {raw_qty:?} is not a whole number"))?;
    if quantity < 1 {
        return Err(format!("quantity must be positive, got {quantity}"));
    }
    let quantity =
        u32::try_from(quantity).map_err(|_| format!("quantity {quantity} is too large"))?;
    let consent = match consent.map(str::to_ascii_lowercase).as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => return Err(format!("consent must be true or false, got {other:?}")),
    };
    Ok((
        OrderLine {
            customer_id,
            order_id,
            item_id,
            time: at.unix_timestamp(),
            utc_offset: at.offset().whole_seconds(),
            quantity,
        },
        consent,
    ))
}

/// The rejects file: line numbers and reasons only, readable by this user
/// alone. It holds none of the rows' fields (the source file has them), so it
/// keeps nothing the import drops and nothing an erasure would have to find.
fn write_rejects(path: &Path, errors: &[RowError]) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["line", "reason"])?;
    for e in errors {
        w.write_record([e.line.to_string(), e.reason.clone()])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    let text = String::from_utf8(bytes).map_err(std::io::Error::other)?;
    // A file that exists already keeps its mode when rewritten: start afresh.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    potluck_shared::tls::write_private(path, &text)
}
