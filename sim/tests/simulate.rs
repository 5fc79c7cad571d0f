//! `potluck-sim` end to end: small federations of virtual sites through the
//! real coordinator process, as a researcher runs them.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const SMALL: &str = r#"
name = "small"
seed = 11
rounds = 3

[data]
source = "synthetic"
sites = 5
customers_per_site = 40
menu_items = 40

[baselines]
local_only = true
centralised = true

[coordinator.model]
embedding = 8
context = 4
hidden = 16

[coordinator.secagg]
threshold = 3

[coordinator.privacy]
target_epsilon = 4.0
"#;

/// Run potluck-sim on `config` into `out`; panics with its output on failure.
fn simulate(config: &str, dir: &Path, out: &Path) {
    let file = dir.join("experiment.toml");
    std::fs::write(&file, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_potluck-sim"))
        .arg(&file)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "potluck-sim failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What must be equal between two runs: everything but times and byte counts.
fn outcome(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            let keep = [
                "round",
                "model_version",
                "participants",
                "dropped",
                "eval_cases",
                "eval_hr_at_10",
                "eval_ndcg_at_10",
                "epsilon",
                "private_units",
                "baseline_popularity_hr_at_10",
                "baseline_personal_hr_at_10",
            ];
            keep.iter().map(|k| l[*k].clone()).collect()
        })
        .collect()
}

fn assert_run_outputs(out: &Path, rounds: usize) {
    for file in [
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "sites.csv",
        "metrics.svg",
        "metrics.png",
    ] {
        assert!(out.join(file).is_file(), "{} has no {file}", out.display());
    }
    assert_eq!(json_lines(&out.join("metrics.jsonl")).len(), rounds);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        rounds + 1,
        "a header and a row per round"
    );
    assert!(csv.starts_with("round,"));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], rounds);
    let baselines = summary["baselines"].as_object().unwrap();
    for name in ["local_only", "centralised", "popularity", "personal"] {
        let hr = baselines[name]["hr_at_10"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hr), "{name} HR@10 {hr}");
    }
    let epsilon = summary["epsilon"].as_f64().unwrap();
    assert!(
        epsilon > 0.0 && epsilon <= 4.0,
        "epsilon {epsilon} within the budget"
    );
    assert!(summary["last"]["hr_at_10"].as_f64().unwrap() > 0.0);
    assert!(summary["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(summary["bytes_received"].as_u64().unwrap() > 0);
    assert_eq!(summary["data"]["sites"], 5);
    let png = std::fs::read(out.join("metrics.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("metrics.svg")).unwrap();
    assert!(
        svg.contains("HR@10") && svg.contains("local-only"),
        "the plot names its lines"
    );
    let sites = std::fs::read_to_string(out.join("sites.csv")).unwrap();
    assert_eq!(sites.lines().count(), 6, "a header and a row per site");
}

#[test]
fn a_sweep_with_dropouts_writes_every_output_and_a_sweep_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config =
        format!("{SMALL}\n[sweep]\nsetting = \"faults.dropout.input\"\nvalues = [0.0, 0.25]\n");
    simulate(&config, dir.path(), &out);
    for value in ["0.0", "0.25"] {
        assert_run_outputs(&out.join(format!("input={value}")), 3);
    }
    let dropped = |value: &str| -> u64 {
        json_lines(&out.join(format!("input={value}")).join("metrics.jsonl"))
            .iter()
            .map(|l| l["dropped"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(dropped("0.0"), 0);
    assert!(
        dropped("0.25") > 0,
        "sites dropped out, and the rounds still completed"
    );
    let table = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].starts_with("faults.dropout.input,final_hr_at_10"));
    assert!(rows[1].starts_with("0.0,") && rows[2].starts_with("0.25,"));
    for file in ["sweep.md", "sweep.json", "sweep.svg", "sweep.png"] {
        assert!(out.join(file).is_file(), "no {file}");
    }
}

#[test]
fn the_same_seed_gives_the_same_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let with_faults = format!(
        "{}\n[faults]\nslow_fraction = 0.2\nslow_delay_secs = 0.3\n[faults.dropout]\nunmask = 0.2\nshare = 0.1\n",
        SMALL.replace(
            "[baselines]\nlocal_only = true\ncentralised = true",
            "[baselines]\nlocal_only = false\ncentralised = false"
        )
    );
    let run = |name: &str, config: &str| {
        let out = dir.path().join(name);
        simulate(config, dir.path(), &out);
        outcome(&json_lines(&out.join("metrics.jsonl")))
    };
    let first = run("first", &with_faults);
    let second = run("second", &with_faults);
    assert_eq!(first, second, "same config and seed, same metrics");
    let other = run("other", &with_faults.replace("seed = 11", "seed = 12"));
    assert_ne!(first, other, "another seed, other metrics");
}

#[test]
fn a_directory_it_did_not_make_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("precious");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "years of work").unwrap();
    let file = dir.path().join("experiment.toml");
    std::fs::write(&file, SMALL).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_potluck-sim"))
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a potluck-sim output directory"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("thesis.tex")).unwrap(),
        "years of work"
    );
}

/// Run a shipped experiment file without the reference models (not needed here).
fn run_shipped(name: &str, out: &Path) -> Value {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../scripts/experiments/{name}.toml"));
    let output = Command::new(env!("CARGO_BIN_EXE_potluck-sim"))
        .arg(&file)
        .args(["--out".as_ref(), out.as_os_str()])
        .args([
            "--set",
            "baselines.local_only=false",
            "--set",
            "baselines.centralised=false",
            "--quiet",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "potluck-sim {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// The version the coordinator released to the sites, from its state.
fn released(out: &Path) -> Option<u64> {
    let config =
        potluck_coordinator::CoordinatorConfig::load(&out.join("work/coordinator.toml")).unwrap();
    potluck_coordinator::state::State::open_existing(&config.state_dir)
        .unwrap()
        .released_version()
        .unwrap()
}

#[test]
fn the_gate_holds_a_planted_bias_and_releases_a_fair_model() {
    let dir = tempfile::tempdir().unwrap();
    let biased = run_shipped("planted-bias", &dir.path().join("biased"));
    let audits = biased["fairness_audits"].as_array().unwrap();
    assert_eq!(audits.len(), 1, "the final version is audited");
    let audit = &audits[0];
    assert_eq!(audit["status"], "held", "{audit}");
    let failures = audit["failures"].to_string();
    assert!(failures.contains("age_band: HR@10 of 65+"), "{failures}");
    // The census takes the first round number, so versions lag rounds by one.
    let last = biased["last"]["model_version"].as_u64().unwrap();
    assert_eq!(audit["model_version"].as_u64(), Some(last));
    assert_eq!(
        released(&dir.path().join("biased")),
        None,
        "a held model is not served"
    );
    // The small "other" gender group is suppressed, not judged.
    let gender = &audit["report"]["attributes"][1];
    assert_eq!(gender["attribute"], "gender");
    assert_eq!(gender["groups"][2]["group"], "other");
    assert!(gender["groups"][2]["customers"].is_null(), "{gender}");

    let fair = run_shipped("fair", &dir.path().join("fair"));
    let audit = &fair["fairness_audits"][0];
    assert_eq!(audit["status"], "passed", "{audit}");
    let ratio = audit["report"]["attributes"][0]["hr_ratio"]
        .as_f64()
        .unwrap();
    assert!(ratio >= 0.8, "age_band ratio {ratio}");
    let last = fair["last"]["model_version"].as_u64().unwrap();
    assert_eq!(released(&dir.path().join("fair")), Some(last));
}

#[test]
fn a_federation_improves_on_its_initial_model() {
    // Without noise, three rounds of four small sites; the initial model is
    // GP-TopFreq, so any gain is learned, on the same held-out orders.
    let config = r#"
name = "learns"
seed = 3
rounds = 3

[data]
source = "synthetic"
sites = 4
customers_per_site = 150

[coordinator.model]
embedding = 8
context = 2
hidden = 8

[coordinator.rounds]
min_sites = 4

[coordinator.privacy]
enabled = false

[baselines]
local_only = false
centralised = false
"#;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    simulate(config, dir.path(), &out);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let score = |v: &Value, k: &str| v[k].as_f64().unwrap();
    let (last, initial, gp) = (
        &summary["last"],
        &summary["baselines"]["initial"],
        &summary["baselines"]["personal"],
    );
    assert_eq!(
        score(initial, "hr_at_10"),
        score(gp, "hr_at_10"),
        "the initial model is GP-TopFreq"
    );
    assert!(
        score(last, "ndcg_at_10") >= score(initial, "ndcg_at_10") + 0.005,
        "NDCG@10 {} from {}",
        score(last, "ndcg_at_10"),
        score(initial, "ndcg_at_10")
    );
    assert!(score(last, "hr_at_10") >= score(initial, "hr_at_10"));
}
