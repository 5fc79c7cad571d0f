//! Prometheus metrics of the coordinator, served at `/metrics` on the
//! `[telemetry] listen` address (localhost by default).
//!
//! Only federation-level figures: nothing per customer, and nothing per site
//! beyond how many are connected.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use potluck_shared::round::RoundSummary;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label of a secure aggregation phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    phase: String,
}

/// The coordinator's metrics.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    connected_sites: Gauge,
    rounds_completed: Counter,
    rounds_abandoned: Counter,
    participants: Histogram,
    dropouts: Counter,
    round_seconds: Histogram,
    phase_seconds: Family<Phase, Histogram>,
    bytes_received: Counter,
    epsilon_spent: Gauge<f64, AtomicU64>,
    epsilon_remaining: Gauge<f64, AtomicU64>,
    /// Held while a round is recorded and while encoding, so a scrape sees whole rounds.
    consistent: Mutex<()>,
}

fn seconds_buckets() -> Histogram {
    // 10 ms to about 11 minutes.
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

impl Telemetry {
    /// A registry with every metric at zero; `target_epsilon` is the budget
    /// (none when differential privacy is off).
    pub fn new(target_epsilon: Option<f64>) -> Self {
        let mut t = Self {
            connected_sites: Gauge::default(),
            rounds_completed: Counter::default(),
            rounds_abandoned: Counter::default(),
            participants: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            dropouts: Counter::default(),
            round_seconds: seconds_buckets(),
            phase_seconds: Family::new_with_constructor(seconds_buckets),
            bytes_received: Counter::default(),
            epsilon_spent: Gauge::default(),
            epsilon_remaining: Gauge::default(),
            registry: Registry::with_prefix("potluck"),
            consistent: Mutex::new(()),
        };
        t.registry.register(
            "connected_sites",
            "Sites connected now",
            t.connected_sites.clone(),
        );
        t.registry.register(
            "rounds_completed",
            "Rounds that produced a model version",
            t.rounds_completed.clone(),
        );
        t.registry.register(
            "rounds_abandoned",
            "Rounds abandoned (too few sites finished)",
            t.rounds_abandoned.clone(),
        );
        t.registry.register(
            "round_participants",
            "Sites whose updates were combined, per completed round",
            t.participants.clone(),
        );
        t.registry.register(
            "round_dropouts",
            "Cohort members that dropped or declined, over completed rounds",
            t.dropouts.clone(),
        );
        t.registry.register(
            "round_duration_seconds",
            "From opening a round to the end of its evaluation",
            t.round_seconds.clone(),
        );
        t.registry.register(
            "secagg_phase_duration_seconds",
            "Duration of each secure aggregation phase",
            t.phase_seconds.clone(),
        );
        t.registry.register(
            "received_bytes",
            "Wire bytes of updates and reports of completed rounds",
            t.bytes_received.clone(),
        );
        if let Some(target) = target_epsilon {
            t.registry.register(
                "epsilon_spent",
                "Privacy budget spent by the model lineage (epsilon)",
                t.epsilon_spent.clone(),
            );
            t.registry.register(
                "epsilon_remaining",
                "Privacy budget left for the model lineage (epsilon)",
                t.epsilon_remaining.clone(),
            );
            t.epsilon_remaining.set(target);
        }
        t
    }

    /// Sites connected now.
    pub fn set_connected(&self, sites: usize) {
        self.connected_sites
            .set(i64::try_from(sites).unwrap_or(i64::MAX));
    }

    /// A round was abandoned.
    pub fn round_abandoned(&self) {
        self.rounds_abandoned.inc();
    }

    /// The budget spent so far, out of `target`.
    pub fn privacy(&self, spent: f64, target: f64) {
        let _whole = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        self.epsilon_spent.set(spent);
        self.epsilon_remaining.set((target - spent).max(0.0));
    }

    /// A round completed.
    pub fn round_completed(&self, s: &RoundSummary) {
        let _whole = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        self.rounds_completed.inc();
        self.participants.observe(s.participants as f64);
        self.dropouts.inc_by(s.dropped as u64);
        self.round_seconds.observe(s.duration.as_secs_f64());
        self.bytes_received.inc_by(s.bytes_received);
        for (phase, secs) in &s.phase_seconds {
            self.phase_seconds
                .get_or_create(&Phase {
                    phase: (*phase).to_string(),
                })
                .observe(*secs);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let _whole = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Bind the metrics address; the listener is ready when this returns.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serve `/metrics` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, telemetry: Arc<Telemetry>) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(telemetry);
    let served = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => axum::serve(listener, router).await,
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

/// The media type of [`Telemetry::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        telemetry.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_shared::{ModelVersion, RoundId};
    use std::time::Duration;

    fn summary() -> RoundSummary {
        RoundSummary {
            round: RoundId(1),
            model_version: ModelVersion(1),
            participants: 4,
            cohort: Vec::new(),
            contributors: Vec::new(),
            dropped: 1,
            train_loss: 0.0,
            eval: Default::default(),
            eval_sites: 4,
            duration: Duration::from_millis(1500),
            bytes_received: 2048,
            secure_aggregation: true,
            phase_seconds: vec![("advertise_keys", 0.02), ("unmasking", 0.3)],
            privacy: None,
        }
    }

    #[test]
    fn rounds_and_budget_are_exposed() {
        let t = Telemetry::new(Some(4.0));
        t.set_connected(5);
        t.round_completed(&summary());
        t.round_completed(&summary());
        t.round_abandoned();
        t.privacy(1.25, 4.0);
        let text = t.encode();
        for line in [
            "potluck_connected_sites 5",
            "potluck_rounds_completed_total 2",
            "potluck_rounds_abandoned_total 1",
            "potluck_round_dropouts_total 2",
            "potluck_received_bytes_total 4096",
            "potluck_round_duration_seconds_count 2",
            "potluck_round_participants_sum 8.0",
            "potluck_secagg_phase_duration_seconds_count{phase=\"unmasking\"} 2",
            "potluck_epsilon_spent 1.25",
            "potluck_epsilon_remaining 2.75",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn no_budget_metrics_without_privacy() {
        assert!(!Telemetry::new(None).encode().contains("epsilon"));
    }
}
