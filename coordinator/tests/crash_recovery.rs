//! `kill -9` of the coordinator at chosen and random points across rounds:
//! while sites send masked input, during unmasking, just after a model version
//! commits, and at random. After each restart training continues from the last
//! committed version, versions stay contiguous, and the privacy ledger never
//! shrinks.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::{Franchise, quick_rounds, wait_for};
use potluck_coordinator::state::State;
use rand::{RngExt, SeedableRng};

const ROUNDS: u64 = 40;
const LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(2);

/// What the database holds at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    versions: Vec<u64>,
    ledger: Vec<f64>,
    completed: u64,
}

fn snapshot(state: &State) -> Snapshot {
    Snapshot {
        versions: state.models().unwrap().iter().map(|m| m.version).collect(),
        ledger: state.ledger().unwrap().iter().map(|e| e.epsilon).collect(),
        completed: state.rounds_completed().unwrap(),
    }
}

/// The invariants that must hold whenever the coordinator is dead.
fn check(before: &Snapshot, now: &Snapshot) {
    let last = *now.versions.last().unwrap();
    assert_eq!(
        now.versions,
        (0..=last).collect::<Vec<_>>(),
        "versions contiguous"
    );
    assert!(
        now.versions.len() >= before.versions.len(),
        "no version lost"
    );
    assert!(
        now.ledger.len() >= before.ledger.len() && now.ledger.starts_with(&before.ledger),
        "the ledger only grows: {before:?} -> {now:?}"
    );
    assert!(
        now.ledger.windows(2).all(|w| w[0] <= w[1]),
        "epsilon never decreases: {:?}",
        now.ledger
    );
}

/// The round phases the coordinator has logged since `offset`: (round, phase).
fn phases(log: &std::path::Path, offset: &mut usize) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let new = &text[(*offset).min(text.len())..];
    // Only whole lines; the rest is read next time.
    let whole = new.rfind('\n').map_or(0, |i| i + 1);
    *offset += whole;
    new[..whole]
        .lines()
        .filter(|l| l.contains("round phase"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_string)
            };
            Some((field("round=")?.parse().ok()?, field("phase=")?))
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Point {
    /// Sites are training and sending masked input.
    MaskedInput,
    /// Masked input is in; shares are being collected to unmask the sum.
    Unmasking,
    /// A model version has just committed (evaluation follows).
    AfterCommit,
    /// At a random moment after a round opens.
    Random,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_recovers_from_kill_9_at_any_point() {
    let f = Franchise::new(3, 30, &quick_rounds(ROUNDS));
    let agents = f.agents();
    let mut coordinator = f.start();
    let state = wait_for(LIMIT, POLL, || {
        f.state().filter(|s| !snapshot(s).versions.is_empty())
    })
    .await;
    let mut log_offset = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut landed = Vec::new();
    let mut recovery = Vec::new();
    let mut plan = std::collections::VecDeque::from([
        Point::MaskedInput,
        Point::Unmasking,
        Point::AfterCommit,
        Point::Random,
        Point::Unmasking,
        Point::Random,
    ]);
    // Unmasking lasts milliseconds: a kill aimed at it may land after the commit.
    let mut retries = 4;
    while let Some(point) = plan.pop_front() {
        let before = snapshot(&state);
        let target_version = *before.versions.last().unwrap();
        match point {
            Point::MaskedInput | Point::Unmasking => {
                let wanted = match point {
                    Point::MaskedInput => ["masked_input", "masked_input"],
                    _ => ["consistency_check", "unmask"],
                };
                wait_for(LIMIT, POLL, || {
                    phases(&f.log(), &mut log_offset)
                        .into_iter()
                        .find(|(_, p)| wanted.contains(&p.as_str()))
                })
                .await;
            }
            Point::AfterCommit => {
                wait_for(LIMIT, POLL, || {
                    let latest = state.models().ok()?.last()?.version;
                    (latest > target_version).then_some(())
                })
                .await;
            }
            Point::Random => {
                wait_for(LIMIT, POLL, || {
                    phases(&f.log(), &mut log_offset)
                        .into_iter()
                        .find(|(_, p)| p == "advertise_keys")
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
            }
        }
        let killed_at = Instant::now();
        coordinator.kill();
        let after = snapshot(&state);
        check(&before, &after);
        let committed = after.versions.len() > before.versions.len();
        landed.push((point, committed));
        if matches!(point, Point::Unmasking) && committed && retries > 0 {
            retries -= 1;
            plan.push_back(Point::Unmasking);
        }

        coordinator = f.start();
        let restarted = snapshot(&state);
        let last = *restarted.versions.last().unwrap();
        // The next round trains from the last committed version and produces the next one.
        let next = wait_for(LIMIT, Duration::from_millis(20), || {
            state
                .rounds(Some(50))
                .ok()?
                .into_iter()
                .find(|r| r.status == "completed" && r.model_version > Some(last))
        })
        .await;
        recovery.push(killed_at.elapsed());
        assert_eq!(
            next.base_version, last,
            "continued from the last committed version"
        );
        assert_eq!(
            next.model_version,
            Some(last + 1),
            "no version skipped or repeated"
        );
        log_offset = std::fs::read_to_string(f.log()).unwrap().len();
    }
    let status = coordinator.wait(LIMIT);
    agents.stop().await;
    assert!(
        status.success(),
        "the coordinator finished cleanly: {status}"
    );

    let end = snapshot(&state);
    assert_eq!(
        end.completed, ROUNDS,
        "max_rounds counts rounds across restarts"
    );
    let rounds = state.rounds(None).unwrap();
    // A version committed by a round killed during its evaluation stays; its round is interrupted.
    let interrupted_with_model = state
        .models()
        .unwrap()
        .iter()
        .filter(|m| {
            rounds
                .iter()
                .any(|r| Some(r.round) == m.round && r.status == "interrupted")
        })
        .count() as u64;
    assert_eq!(
        end.versions,
        (0..=ROUNDS + interrupted_with_model).collect::<Vec<_>>()
    );
    let interrupted = rounds.iter().filter(|r| r.status == "interrupted").count();
    let mid_round = landed
        .iter()
        .filter(|(p, c)| !matches!(p, Point::AfterCommit) && !c)
        .count();
    assert!(
        interrupted >= mid_round,
        "each killed round is marked interrupted: {rounds:?}"
    );
    // Every round charged to the ledger stays charged, interrupted ones included.
    assert!(end.ledger.len() as u64 >= ROUNDS + mid_round as u64);
    let metrics = std::fs::read_to_string(f.state_dir().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count() as u64,
        ROUNDS,
        "the export matches the database"
    );
    let audit = state.verify_audit().unwrap();
    assert!(audit.is_ok(), "the audit log is intact: {audit:?}");
    assert!(
        landed
            .iter()
            .any(|(p, c)| matches!(p, Point::MaskedInput) && !c),
        "a kill landed in masked input: {landed:?}"
    );
    assert!(
        landed
            .iter()
            .any(|(p, c)| matches!(p, Point::Unmasking) && !c),
        "a kill landed during unmasking: {landed:?}"
    );
    assert!(
        landed
            .iter()
            .any(|(p, c)| matches!(p, Point::AfterCommit) && *c),
        "a kill landed just after a commit: {landed:?}"
    );
    let secs: Vec<String> = recovery
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    println!("kills: {landed:?}; seconds from kill to the next completed round: {secs:?}");
}
