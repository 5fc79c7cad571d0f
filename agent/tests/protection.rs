//! Customer data at rest: encrypted, pseudonymised, erasable for good, and
//! never half-imported.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_shared::synth::{self, Franchise, OrderRow, SynthConfig};

fn franchise(customers: usize) -> Franchise {
    synth::generate(&SynthConfig {
        sites: 1,
        customers_per_site: customers,
        ..SynthConfig::default()
    })
}

fn write_csv(rows: &[OrderRow], path: &Path) {
    synth::write_orders_csv(rows, std::fs::File::create(path).unwrap()).unwrap();
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A site store with `customers` synthetic customers imported.
fn imported(customers: usize) -> (Franchise, tempfile::TempDir, SiteStore) {
    let data = franchise(customers);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    write_csv(&data.sites[0].rows, &csv);
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    import_file(&store, &csv, &data.menu, &ImportOptions::default()).unwrap();
    (data, dir, store)
}

#[test]
fn the_store_file_holds_no_identifier_pseudonym_or_item_in_the_clear() {
    let (data, dir, store) = imported(40);
    let store_path = dir.path().join("store.redb");
    let pseudonyms: Vec<String> = data.sites[0]
        .rows
        .iter()
        .map(|r| store.pseudonym(&r.customer_id))
        .collect();
    drop(store);
    let bytes = std::fs::read(&store_path).unwrap();
    for (row, pseudonym) in data.sites[0].rows.iter().zip(&pseudonyms) {
        assert!(
            !contains(&bytes, &row.customer_id),
            "customer id {}",
            row.customer_id
        );
        assert!(
            !contains(&bytes, &row.order_id),
            "order id {}",
            row.order_id
        );
        assert!(!contains(&bytes, pseudonym), "pseudonym {pseudonym}");
    }
    // Not one menu item: the menu itself is only stored once a coordinator sends it.
    for item in data.menu.items() {
        assert!(!contains(&bytes, &item.item_id), "item {}", item.item_id);
    }
    let keys = std::fs::read(dir.path().join("store.keys")).unwrap();
    assert!(!contains(&keys, &data.sites[0].rows[0].customer_id));
}

#[test]
fn after_erase_nothing_of_the_customer_decrypts_even_from_old_pages() {
    let (data, dir, store) = imported(30);
    let store_path = dir.path().join("store.redb");
    let gone = data.sites[0].rows[0].customer_id.clone();
    let kept = data.sites[0]
        .rows
        .iter()
        .map(|r| r.customer_id.clone())
        .find(|c| *c != gone)
        .unwrap();
    let exported = store.export(&gone).unwrap().expect("held before erasure");
    assert!(!exported.lines.is_empty());
    let before_erase = std::fs::read(&store_path).unwrap();

    let lines = store.erase(&gone).unwrap();
    assert_eq!(lines, Some(exported.lines.len() as u64));
    assert_eq!(store.export(&gone).unwrap(), None, "export finds nothing");
    assert_eq!(store.erase(&gone).unwrap(), None, "nothing left to erase");
    assert!(
        store.export(&kept).unwrap().is_some(),
        "other customers are untouched"
    );
    drop(store);

    // An attacker with the old file (or its free pages) and today's keys.
    let old = tempfile::tempdir().unwrap();
    std::fs::write(old.path().join("store.redb"), &before_erase).unwrap();
    for key_file in ["store.keys", "store.ringkey", "master.key"] {
        std::fs::copy(dir.path().join(key_file), old.path().join(key_file)).unwrap();
    }
    let old_store = SiteStore::open(&old.path().join("store.redb")).unwrap();
    assert_eq!(
        old_store.export(&gone).unwrap(),
        None,
        "the erased customer's records do not open"
    );
    assert!(old_store.export(&kept).unwrap().is_some());
}

/// Attack: the ring file is rewritten by rename, so an older copy of it (a
/// freed block, a backup, a snapshot) still holds an erased customer's data
/// key. With every key the site still holds, that copy must not open.
#[test]
fn after_erase_an_older_copy_of_the_key_ring_opens_under_no_key_the_site_holds() {
    let (data, dir, store) = imported(30);
    let gone = data.sites[0].rows[0].customer_id.clone();
    let before: Vec<(&str, Vec<u8>)> = ["store.redb", "store.keys"]
        .into_iter()
        .map(|f| (f, std::fs::read(dir.path().join(f)).unwrap()))
        .collect();
    store.erase(&gone).unwrap().expect("held before erasure");
    drop(store);

    // The old store and old ring, with today's master key and ring key.
    let attacker = tempfile::tempdir().unwrap();
    for (file, bytes) in &before {
        std::fs::write(attacker.path().join(file), bytes).unwrap();
    }
    for key_file in ["master.key", "store.ringkey"] {
        std::fs::copy(dir.path().join(key_file), attacker.path().join(key_file)).unwrap();
    }
    match SiteStore::open(&attacker.path().join("store.redb")) {
        Err(e) => assert!(e.to_string().contains("does not open"), "{e}"),
        Ok(old) => assert_eq!(old.export(&gone).unwrap(), None, "the old ring opened"),
    }
    // Nothing the agent wrote names the customer in the clear.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "csv") {
            continue; // the operator's own source file
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(!contains(&bytes, &gone), "{} names {gone}", path.display());
    }
    // The site itself still opens its store, and its other customers.
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    let kept = &data.sites[0]
        .rows
        .iter()
        .find(|r| r.customer_id != gone)
        .unwrap()
        .customer_id;
    assert!(store.export(kept).unwrap().is_some());
}

#[test]
fn an_import_killed_midway_leaves_the_store_as_it_was() {
    let data = franchise(1500);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    write_csv(&data.sites[0].rows, &csv);
    let menu = dir.path().join("menu.csv");
    data.menu
        .write_csv(std::fs::File::create(&menu).unwrap())
        .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "site_id = \"site-01\"\ncoordinator = \"127.0.0.1:9\"\nstate_dir = \"state\"\nmenu = \"menu.csv\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n",
    )
    .unwrap();
    let mut import = Command::new(env!("CARGO_BIN_EXE_potluck-agent"))
        .args(["import", "--config"])
        .arg(&config)
        .arg(&csv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // New customers' keys are written just before the import's transaction starts.
    let keys = dir.path().join("state/store.keys");
    let start = Instant::now();
    while !keys.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(keys.exists(), "the import started");
    import.kill().unwrap();
    let status = import.wait().unwrap();
    assert!(
        !status.success(),
        "killed before it finished ({} rows)",
        data.sites[0].rows.len()
    );
    let store = SiteStore::open(&dir.path().join("state/store.redb")).unwrap();
    assert_eq!(
        store.order_lines().unwrap(),
        0,
        "nothing of the import landed"
    );
    // And a new import completes normally.
    let report = import_file(&store, &csv, &data.menu, &ImportOptions::default()).unwrap();
    assert_eq!(report.counts.added, store.order_lines().unwrap());
}
