//! The privacy budget over QUIC: the coordinator stops at its target, and each
//! site's own ledger holds even against a coordinator that starts afresh.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use potluck_agent::store::SiteStore;
use potluck_shared::dp::{Accountant, Step};
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};

const LIMIT: Duration = Duration::from_secs(240);
const Q: f64 = 0.2;
const Z: f64 = 1.0;
const DELTA: f64 = 1e-6;

fn privacy(target: f64) -> String {
    format!(
        "[privacy]\ntarget_epsilon = {target}\nnoise_multiplier = {Z}\nsampling_rate = {Q}\ndelta = {DELTA}\n"
    )
}

/// The default noise multiplier of the sites' one-off prior release.
const PRIOR: f64 = 10.0;

/// The default noise multiplier of the lineage's one neighbour census.
const CENSUS: f64 = 4.0;

/// ε after the census and `rounds` rounds (at least one), the prior release
/// paid with the first.
fn epsilon_after(rounds: u64) -> f64 {
    let mut spent = Accountant::default();
    spent.compose(&Step::gaussian(1.0, CENSUS), 1);
    spent.compose(&Step::gaussian(Q, Z), rounds);
    spent.compose(&Step::gaussian(1.0, PRIOR), 1);
    spent.epsilon(DELTA).epsilon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_stops_before_the_round_that_would_exceed_the_target() -> anyhow::Result<()> {
    init_logging();
    let target = epsilon_after(3) + 0.01;
    let f = Franchise::with_config(3, 30, 20, &privacy(target))?;
    let summary = f.run_all(LIMIT).await?;
    assert_eq!(
        summary.rounds_completed, 3,
        "three rounds fit in the target, not four"
    );
    let metrics = f.metrics()?;
    let last = metrics.last().unwrap()["epsilon"].as_f64().unwrap();
    assert!(
        last <= target && (last - epsilon_after(3)).abs() < 0.01 * last,
        "ε {last}"
    );
    // The coordinator's ledger holds the census and every round, each
    // written before it was sent.
    assert_eq!(f.state()?.ledger()?.len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_ledger_is_spent_refuses_even_a_fresh_coordinator() -> anyhow::Result<()> {
    init_logging();
    // The coordinator would allow far more than the sites do.
    let mut f = Franchise::with_config(3, 30, 2, &privacy(50.0))?;
    let site_max = (epsilon_after(2) + epsilon_after(3)) / 2.0;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let agents = RunningAgents::start(limited(&f, coordinator.addr, site_max)?)?;
    let summary = coordinator.finish(LIMIT).await?;
    agents.stop().await?;
    assert_eq!(summary.rounds_completed, 2);

    // A new coordinator for the same lineage, with no memory of those rounds.
    f.coordinator.state_dir = f.dir.path().join("fresh-state");
    f.coordinator.rounds.max_rounds = Some(1);
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let agents = RunningAgents::start(limited(&f, coordinator.addr, site_max)?)?;
    // Wait for the fresh coordinator to try its census three times and open
    // a training round, then for the sites' answers.
    while f.state().map_or(0, |s| s.ledger().map_or(0, |l| l.len())) < 4 {
        assert!(
            !coordinator.task.is_finished(),
            "the coordinator stopped early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let declined = coordinator.stop().await?.declined;
    agents.stop().await?;
    assert!(
        f.metrics()?.is_empty(),
        "no round completed with the fresh coordinator"
    );
    let budget = declined
        .iter()
        .filter(|(_, _, reason)| reason.contains("privacy budget"))
        .count();
    assert!(budget >= 3, "every site declined training: {declined:?}");
    for (site, _, reason) in &declined {
        assert!(
            reason.contains("default")
                && (reason.contains("privacy budget")
                    || reason.contains("already holds the neighbour census")),
            "{site} says why: {reason}"
        );
    }
    for i in 0..3 {
        let store = SiteStore::open(&f.store_path(i)?)?;
        let ledger = store.ledger()?;
        assert!(ledger.entries.iter().all(|e| e.lineage == "default"));
        assert_eq!(
            ledger.entries.len(),
            4,
            "the census, two rounds and the prior release they paid for; the refused round is \
             not recorded"
        );
    }
    Ok(())
}

/// Agent configs whose own privacy limit is `max_epsilon`.
fn limited(
    f: &Franchise,
    addr: std::net::SocketAddr,
    max_epsilon: f64,
) -> anyhow::Result<Vec<potluck_agent::config::AgentConfig>> {
    (0..3)
        .map(|i| {
            let mut config = f.agent_config(i, addr)?;
            config.privacy.max_epsilon = max_epsilon;
            Ok(config)
        })
        .collect()
}
