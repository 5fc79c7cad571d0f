//! The coordinator's Prometheus metrics during a real federation.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};

const LIMIT: Duration = Duration::from_secs(240);

/// The samples of a Prometheus text exposition, by series.
async fn scrape(url: &str) -> anyhow::Result<HashMap<String, f64>> {
    let url = url.to_string();
    let text = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
    })
    .await??;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_string(), value.parse().ok()?)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_rounds_participants_and_the_privacy_budget() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 30, 40)?;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let url = format!("http://{}/metrics", coordinator.metrics.unwrap());
    let before = scrape(&url).await?;
    assert_eq!(before["potluck_rounds_completed_total"], 0.0);
    assert_eq!(before["potluck_epsilon_remaining"], 4.0);

    let configs = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    let deadline = Instant::now() + LIMIT;
    let during = loop {
        let m = scrape(&url).await?;
        if m["potluck_rounds_completed_total"] >= 2.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "two rounds within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rounds = during["potluck_rounds_completed_total"];
    assert_eq!(during["potluck_connected_sites"], 3.0);
    assert_eq!(during["potluck_round_participants_count"], rounds);
    assert_eq!(during["potluck_round_participants_sum"], 3.0 * rounds);
    assert_eq!(during["potluck_round_duration_seconds_count"], rounds);
    assert!(during["potluck_received_bytes_total"] > 0.0);
    assert_eq!(
        during["potluck_secagg_phase_duration_seconds_count{phase=\"unmask\"}"],
        rounds
    );
    let (spent, left) = (
        during["potluck_epsilon_spent"],
        during["potluck_epsilon_remaining"],
    );
    assert!(
        spent > 0.0 && (spent + left - 4.0).abs() < 1e-9,
        "{spent} + {left}"
    );

    agents.stop().await?;
    coordinator.stop().await?;
    Ok(())
}
