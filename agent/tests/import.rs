//! CSV import: each kind of bad row, atomicity, idempotence, --skip-invalid.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use potluck_agent::import::{ImportError, ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_shared::model::{Menu, MenuItem};

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
        import_file(
            &self.store,
            path,
            &menu(),
            &ImportOptions {
                skip_invalid,
                rejects: None,
            },
        )
    }
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
    let rejects = std::fs::read_to_string(report.rejects_file.unwrap()).unwrap();
    let mut lines = rejects.lines();
    assert_eq!(
        lines.next().unwrap(),
        "line,reason,customer_id,order_id,timestamp,item_id,quantity,consent,age_band"
    );
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("5,\"item \"\"pizza\"\" is not on the menu\",c3,o3"),
        "{row}"
    );
    assert!(lines.next().is_none());
}
