//! CSV import: each kind of bad row, atomicity, idempotence, --skip-invalid.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use potluck_agent::audit::AuditLog;
use potluck_agent::config::DataPolicy;
use potluck_agent::import::{ImportError, ImportOptions, import_file};
use potluck_agent::retention::purge_expired;
use potluck_agent::store::SiteStore;
use potluck_shared::model::{Menu, MenuItem};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const HEADER: &str = "customer_id,order_id,timestamp,item_id,quantity,consent,age_band\n";
const GOOD: &str = "c1,o1,2025-03-01T12:00:00+01:00,burger,1,true,25-34\n\
                    c1,o1,2025-03-01T12:00:00+01:00,cola,2,true,25-34\n\
                    c2,o2,2025-03-02T19:30:00Z,burger,1,false,50-64\n";

fn menu() -> Menu {
    let item = |id: &str, cat: &str| MenuItem {
        item_id: id.into(),
        name: id.into(),
        category: cat.into(),
    };
    Menu::new(vec![
        item("burger", "mains"),
        item("cola", "drinks"),
        item("fries", "sides"),
    ])
    .unwrap()
}

struct Site {
    dir: tempfile::TempDir,
    store: SiteStore,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    Site { dir, store }
}

impl Site {
    fn file(&self, name: &str, body: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{HEADER}{body}")).unwrap();
        path
    }

    fn import(
        &self,
        path: &Path,
        skip_invalid: bool,
    ) -> Result<potluck_agent::import::ImportReport, ImportError> {
        let options = ImportOptions {
            skip_invalid,
            ..ImportOptions::default()
        };
        import_file(&self.store, path, &menu(), &options)
    }
}

fn time(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

#[test]
fn a_valid_file_imports_and_reports_dropped_columns() {
    let s = site();
    let report = s.import(&s.file("orders.csv", GOOD), false).unwrap();
    assert_eq!(report.rows, 3);
    assert_eq!(report.counts.added, 3);
    assert_eq!(report.counts.new_customers, 2);
    assert_eq!(report.dropped_columns, vec!["age_band".to_string()]);
    // Only consenting customers are used for training.
    let consenting = s.store.histories(&menu(), true).unwrap();
    assert_eq!(consenting.len(), 1);
    assert_eq!(
        consenting[0].pseudonym,
        s.store.pseudonym("c1"),
        "by pseudonym"
    );
    assert_eq!(consenting[0].orders[0].items, vec![0, 1]);
    assert_eq!(s.store.histories(&menu(), false).unwrap().len(), 2);
}

#[test]
fn importing_the_same_file_twice_adds_nothing() {
    let s = site();
    let path = s.file("orders.csv", GOOD);
    s.import(&path, false).unwrap();
    let again = s.import(&path, false).unwrap();
    assert_eq!(again.counts.added, 0);
    assert_eq!(again.counts.unchanged, 3);
    assert_eq!(again.counts.new_customers, 0);
    assert_eq!(s.store.order_lines().unwrap(), 3);
}

#[test]
fn each_kind_of_bad_row_is_named_with_file_line_and_reason() {
    let cases = [
        (
            ",o9,2025-03-01T12:00:00Z,burger,1,true,x",
            "missing customer_id",
        ),
        (
            "c9,,2025-03-01T12:00:00Z,burger,1,true,x",
            "missing order_id",
        ),
        ("c9,o9,,burger,1,true,x", "missing timestamp"),
        (
            "c9,o9,yesterday,burger,1,true,x",
            "timestamp \"yesterday\" is not RFC 3339",
        ),
        ("c9,o9,2025-03-01 12:00,burger,1,true,x", "is not RFC 3339"),
        (
            "c9,o9,2025-03-01T12:00:00Z,pizza,1,true,x",
            "item \"pizza\" is not on the menu",
        ),
        (
            "c9,o9,2025-03-01T12:00:00Z,burger,0,true,x",
            "quantity must be positive, got 0",
        ),
        (
            "c9,o9,2025-03-01T12:00:00Z,burger,-2,true,x",
            "quantity must be positive, got -2",
        ),
        (
            "c9,o9,2025-03-01T12:00:00Z,burger,two,true,x",
            "quantity \"two\" is not a whole number",
        ),
        (
            "c9,o9,2025-03-01T12:00:00Z,burger,1,maybe,x",
            "consent must be true or false",
        ),
        (
            "c9,o9,2025-03-01T12:00:00Z,burger,1,true,x\nc8,o9,2025-03-01T12:00:00Z,cola,1,true,x",
            "another customer or timestamp at line 5",
        ),
    ];
    for (row, reason) in cases {
        let s = site();
        let path = s.file("bad.csv", &format!("{GOOD}{row}\n"));
        let err = s.import(&path, false).unwrap_err();
        let ImportError::InvalidRows { errors, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(errors.len(), 1, "{row}: {err}");
        let message = err.to_string();
        let expected_line = if reason.contains("another customer") {
            6
        } else {
            5
        };
        let location = format!("{}:{expected_line}: ", path.display());
        assert!(message.contains(&location), "{message} names {location}");
        assert!(message.contains(reason), "{message} says {reason}");
        // Atomic: nothing at all was written, not even the good rows.
        assert_eq!(s.store.order_lines().unwrap(), 0, "{row}");
    }
}

#[test]
fn a_missing_column_is_a_header_error() {
    let s = site();
    let path = s.dir.path().join("nocol.csv");
    std::fs::write(
        &path,
        "customer_id,order_id,timestamp,quantity\nc1,o1,2025-03-01T12:00:00Z,1\n",
    )
    .unwrap();
    let err = s.import(&path, false).unwrap_err().to_string();
    assert!(
        err.contains("nocol.csv:1: missing column \"item_id\""),
        "{err}"
    );
}

#[test]
fn a_failed_import_keeps_what_was_stored_before() {
    let s = site();
    s.import(&s.file("first.csv", GOOD), false).unwrap();
    let bad = s.file(
        "second.csv",
        "c3,o3,2025-03-05T12:00:00Z,fries,1,true,x\nc3,o4,not-a-time,fries,1,true,x\n",
    );
    assert!(s.import(&bad, false).is_err());
    assert_eq!(
        s.store.order_lines().unwrap(),
        3,
        "the earlier import is intact and nothing new landed"
    );
}

#[test]
fn skip_invalid_imports_good_rows_and_writes_rejects() {
    let s = site();
    let path = s.file("mixed.csv", &format!("{GOOD}c3,o3,2025-03-05T12:00:00Z,pizza,1,true,x\nc3,o4,2025-03-06T12:00:00Z,fries,1,true,x\n"));
    let report = s.import(&path, true).unwrap();
    assert_eq!(report.counts.added, 4);
    assert_eq!(report.rejected, 1);
    let rejects_path = report.rejects_file.unwrap();
    let rejects = std::fs::read_to_string(&rejects_path).unwrap();
    let mut lines = rejects.lines();
    assert_eq!(lines.next().unwrap(), "line,reason");
    let row = lines.next().unwrap();
    assert_eq!(row, "5,\"item \"\"pizza\"\" is not on the menu\"");
    assert!(lines.next().is_none());
    // None of the row's fields, not even the customer or the dropped column,
    // and readable by this user alone.
    assert!(
        !rejects.contains("c3") && !rejects.contains(",x"),
        "{rejects}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rejects_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn declared_audit_columns_are_kept_encrypted_and_the_rest_dropped() {
    let s = site();
    let path = s.dir.path().join("wide.csv");
    std::fs::write(
        &path,
        "customer_id,order_id,timestamp,item_id,quantity,consent,age_band,phone\n\
         c1,o1,2025-03-01T12:00:00Z,burger,1,true,25-34,+44700900123\n\
         c1,o2,2025-03-03T12:00:00Z,cola,1,true,35-49,+44700900123\n",
    )
    .unwrap();
    let options = ImportOptions {
        audit_columns: vec!["age_band".into(), "gender".into()],
        ..ImportOptions::default()
    };
    let report = import_file(&s.store, &path, &menu(), &options).unwrap();
    assert_eq!(report.dropped_columns, vec!["phone".to_string()]);
    let kept: Vec<(&str, &str)> = report
        .kept_columns
        .iter()
        .map(|k| (k.column.as_str(), k.purpose))
        .collect();
    assert!(kept.contains(&("age_band", "audit_only")), "{kept:?}");
    assert!(kept.contains(&("item_id", "training")), "{kept:?}");
    let held = s.store.export("c1").unwrap().unwrap();
    assert_eq!(
        held.attributes.into_iter().collect::<Vec<_>>(),
        vec![("age_band".to_string(), "35-49".to_string())],
        "the last row's value is kept; the phone number is not"
    );
    drop(s.store);
    let bytes = std::fs::read(s.dir.path().join("store.redb")).unwrap();
    for plain in [&b"35-49"[..], b"25-34", b"+44700900123", b"age_band"] {
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain),
            "{} in the clear",
            String::from_utf8_lossy(plain)
        );
    }
}

#[test]
fn orders_past_retention_are_not_stored_and_stored_ones_are_purged_and_audited() {
    let s = site();
    let options = ImportOptions {
        retention_cutoff: Some(time("2025-03-02T00:00:00Z").unix_timestamp()),
        ..ImportOptions::default()
    };
    let report = import_file(&s.store, &s.file("orders.csv", GOOD), &menu(), &options).unwrap();
    assert_eq!((report.past_retention, report.counts.added), (2, 1));
    assert!(
        s.store.export("c1").unwrap().is_none(),
        "a customer with no kept order is not kept"
    );
    assert_eq!(report.counts.new_customers, 1);

    let audit = AuditLog::new(s.dir.path());
    let policy = DataPolicy {
        retention_days: Some(7),
        ..DataPolicy::default()
    };
    let early = purge_expired(&s.store, &policy, &audit, time("2025-03-05T00:00:00Z")).unwrap();
    assert_eq!(early.unwrap().deleted.order_lines, 0);
    assert_eq!(
        audit.verify().unwrap(),
        0,
        "a purge that deletes nothing is not logged"
    );
    let purge = purge_expired(&s.store, &policy, &audit, time("2025-03-10T00:00:00Z"))
        .unwrap()
        .unwrap();
    assert_eq!((purge.deleted.order_lines, purge.deleted.customers), (1, 1));
    assert!(s.store.export("c2").unwrap().is_none());
    assert_eq!(s.store.order_lines().unwrap(), 0);
    assert_eq!(audit.verify().unwrap(), 1);
    let log = std::fs::read_to_string(audit.path()).unwrap();
    assert!(
        log.contains("\"event\":\"purge\"") && log.contains("\"order_lines\":1"),
        "{log}"
    );
}

#[test]
fn an_unclosed_quote_is_named_as_such_at_its_line() {
    let s = site();
    let path = s.file(
        "quote.csv",
        &format!("{GOOD}\"c3,o3,2025-03-05T12:00:00Z,latte,1,true,x\nc4,o4,2025-03-06T12:00:00Z,latte,1,true,x\n"),
    );
    let err = s.import(&path, false).unwrap_err().to_string();
    assert!(
        err.contains("quote.csv:5") && err.contains("quoted field is not closed"),
        "{err}"
    );
}
