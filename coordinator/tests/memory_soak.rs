//! Several hundred rounds against the coordinator binary: its resident memory
//! must not grow beyond a stated bound once warmed up.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod harness;

use std::time::Duration;

use harness::{Franchise, quick_rounds, wait_for};

const ROUNDS: u64 = 300;
const WARM_UP: u64 = 50;
/// Allowed growth of resident memory from round 50 to round 300.
const BOUND_KIB: u64 = 4 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_flat_over_hundreds_of_rounds() {
    let f = Franchise::new(3, 20, &quick_rounds(ROUNDS));
    let agents = f.agents();
    let coordinator = f.start();
    let state = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        f.state()
    })
    .await;
    let mut samples = Vec::new();
    let mut next = WARM_UP;
    while next < ROUNDS {
        let done = wait_for(Duration::from_secs(120), Duration::from_millis(20), || {
            let done = state.rounds_completed().ok()?;
            (done >= next).then_some(done)
        })
        .await;
        samples.push((done, coordinator.rss_kib()));
        next += 25;
    }
    let status = coordinator.wait(Duration::from_secs(120));
    agents.stop().await;
    assert!(status.success());
    assert_eq!(state.rounds_completed().unwrap(), ROUNDS);
    let (_, base) = samples[0];
    let peak = samples.iter().map(|(_, rss)| *rss).max().unwrap();
    println!("resident memory (round, KiB): {samples:?}");
    assert!(
        peak <= base + BOUND_KIB,
        "resident memory grew from {base} KiB at round {WARM_UP} to a peak of {peak} KiB: {samples:?}"
    );
}
