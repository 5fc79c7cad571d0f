//! Consent changes and the site's audit log.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use potluck_agent::audit::AuditLog;
use potluck_agent::store::SiteStore;
use potluck_shared::model::Menu;
use potluck_shared::synth::{self, SynthConfig};

struct Site {
    dir: tempfile::TempDir,
    store: SiteStore,
    menu: Menu,
    customers: Vec<String>,
}

fn site() -> Site {
    let data = synth::generate(&SynthConfig {
        sites: 1,
        customers_per_site: 30,
        ..SynthConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    synth::write_orders_csv(&data.sites[0].rows, std::fs::File::create(&csv).unwrap()).unwrap();
    let store = SiteStore::open(&dir.path().join("store.redb")).unwrap();
    potluck_agent::import::import_file(&store, &csv, &data.menu, &Default::default()).unwrap();
    let customers = data.sites[0]
        .rows
        .iter()
        .map(|r| r.customer_id.clone())
        .collect();
    Site {
        dir,
        store,
        menu: data.menu,
        customers,
    }
}

fn trained_customers(s: &Site) -> Vec<String> {
    s.store
        .histories(&s.menu, true)
        .unwrap()
        .into_iter()
        .map(|h| h.pseudonym)
        .collect()
}

/// A consenting customer's identifier.
fn consenting(s: &Site) -> String {
    let trained = trained_customers(s);
    s.customers
        .iter()
        .find(|c| trained.contains(&s.store.pseudonym(c)))
        .unwrap()
        .clone()
}

#[test]
fn a_withdrawal_removes_the_customer_from_the_next_training_set() {
    let s = site();
    let before = trained_customers(&s);
    let customer = consenting(&s);
    let pseudonym = s.store.pseudonym(&customer);
    assert!(s.store.set_consent(&customer, false).unwrap());
    let after = trained_customers(&s);
    assert!(!after.contains(&pseudonym));
    assert_eq!(after.len(), before.len() - 1);
    assert!(s.store.set_consent(&customer, true).unwrap());
    assert_eq!(trained_customers(&s), before);
    assert!(
        !s.store.set_consent("nobody", false).unwrap(),
        "unknown customers are reported"
    );
}

#[test]
fn the_audit_log_names_customers_only_by_keyed_reference_and_detects_edits() {
    let s = site();
    let audit = AuditLog::new(s.dir.path());
    let customer = consenting(&s);
    audit
        .append("import", serde_json::json!({"rows": 10}))
        .unwrap();
    let pseudonym = s.store.pseudonym(&customer);
    audit
        .append(
            "consent",
            serde_json::json!({"pseudonym": pseudonym, "consent": "withdrawn"}),
        )
        .unwrap();
    audit
        .append(
            "round_joined",
            serde_json::json!({"round": 1, "epsilon": 0.5}),
        )
        .unwrap();
    assert_eq!(audit.verify().unwrap(), 3);
    let text = std::fs::read_to_string(audit.path()).unwrap();
    assert!(
        !text.contains(&customer),
        "no raw customer identifier in the log"
    );

    // Edit the second entry.
    std::fs::write(audit.path(), text.replace("withdrawn", "granted")).unwrap();
    let err = audit.verify().unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("edited"), "{err}");

    // Cut the last entry off.
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(audit.path(), format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let err = audit.verify().unwrap_err().to_string();
    assert!(err.contains("cut off"), "{err}");
}
