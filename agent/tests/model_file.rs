//! `potluck-agent model load`: a model file from `potluck-coordinator model
//! export` becomes the site's model, if it was trained for the site's menu.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use potluck_agent::audit::AuditLog;
use potluck_agent::config::AgentConfig;
use potluck_agent::store::SiteStore;
use potluck_shared::model::{GlobalModel, Menu, ModelSpec};
use potluck_shared::{ModelVersion, SiteId, bundle};

fn menu(extra: &str) -> Menu {
    let text = format!("item_id,name,category\ncoffee,Coffee,drinks\ntea,Tea,drinks\n{extra}");
    Menu::read_csv(text.as_bytes(), "menu.csv").unwrap()
}

fn model(menu: Menu, version: u64) -> GlobalModel {
    let spec = ModelSpec::new(menu);
    GlobalModel {
        version: ModelVersion(version),
        params: spec.initial_params(3),
        spec,
    }
}

fn load(config: &std::path::Path, file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_potluck-agent"))
        .args(["model", "load", "--config"])
        .arg(config)
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn an_exported_model_for_the_sites_menu_is_loaded_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("menu.csv"),
        "item_id,name,category\ncoffee,Coffee,drinks\ntea,Tea,drinks\n",
    )
    .unwrap();
    let site = SiteId::new("site-a").unwrap();
    let toml = bundle::agent_toml(&site, "127.0.0.1:9".parse().unwrap(), "coordinator", true);
    let config_path = dir.path().join(bundle::AGENT_CONFIG);
    std::fs::write(&config_path, toml).unwrap();
    let config = AgentConfig::load(&config_path).unwrap();

    let other = dir.path().join("other.model");
    model(menu("bun,Bun,food\n"), 4).write_file(&other).unwrap();
    let refused = load(&config_path, &other);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not this site's menu"));

    let good = dir.path().join("v7.model");
    let exported = model(menu(""), 7);
    exported.write_file(&good).unwrap();
    let loaded = load(&config_path, &good);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let store = SiteStore::open(&config.store_path()).unwrap();
    assert_eq!(store.model().unwrap(), Some(exported));
    drop(store);
    let log = std::fs::read_to_string(AuditLog::new(&config.state_dir).path()).unwrap();
    assert!(
        log.contains("model_loaded") && log.contains("\"version\":7"),
        "{log}"
    );

    std::fs::write(&good, b"potluck-model-v1\ngarbage").unwrap();
    let corrupt = load(&config_path, &good);
    assert!(String::from_utf8_lossy(&corrupt.stderr).contains("not a Potluck model file"));
}
