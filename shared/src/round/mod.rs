//! The round lifecycle as sans-IO state machines.
//!
//! [`Coordinator`] runs rounds on the server; [`SiteSession`] is its
//! counterpart at a site. Neither touches a socket, a clock or a thread: the
//! async driver feeds them messages, connection changes and the current time,
//! and carries out what they emit.
//!
//! # Driving a [`Coordinator`]
//! After every input (`handle_*`), the driver calls, in this order:
//! 1. [`Coordinator::poll_event`] until `None`, acting on each event; in
//!    particular it persists a [`CoordinatorEvent::ModelCommitted`] model *before*
//! 2. [`Coordinator::poll_transmit`] until `None`, sending each message, so no
//!    site ever receives a model version that is not stored;
//! 3. [`Coordinator::poll_timeout`], and calls [`Coordinator::handle_timeout`]
//!    when that instant passes.
//!
//! # A round
//! Idle → (at least `min_sites` connected) `RoundOpen` to the cohort →
//! Training (updates summed as they arrive, O(d) memory) → at the deadline,
//! or once every cohort member has answered or dropped: with at least
//! `min_sites` updates the average is applied and the new version broadcast,
//! otherwise the round is abandoned and retried after `retry_delay` →
//! Evaluating (sites report counts for the new version) → Idle.

mod coordinator;
mod optimizer;
mod site;

pub use coordinator::{
    AuditOutcome, AuditPolicy, Coordinator, CoordinatorEvent, PrivacyPolicy, PrivacySummary,
    RoundConfig, RoundSummary, Transmit, Violation, cohort,
};
pub use optimizer::{OptimizerError, OptimizerKind, OptimizerState, ServerOptimizer};
pub use site::{SecAggIdentity, SiteEvent, SiteSession, SiteSessionError, privacy_step};

/// A site's training loss travels as one extra coordinate of the securely
/// aggregated vector, divided by this, so that only its sum is revealed and it
/// stays within the encoding's coordinate bound.
pub const LOSS_SCALE: f32 = 16.0;

/// Customers per unit of an update's weight: a site's update counts in the
/// average as its customers do (FedAvg), and the weight travels inside the
/// secure sum, so no site's size is revealed.
pub const WEIGHT_UNIT: f32 = 100.0;

/// The largest weight one update may carry (10⁵ customers): it bounds the
/// coordinates of a weighted update, which the encoding must hold.
pub const MAX_WEIGHT: f32 = 1000.0;

/// An update's weight for `customers` customers, within `(0, MAX_WEIGHT]`.
pub fn update_weight(customers: usize) -> f32 {
    (customers.max(1) as f32 / WEIGHT_UNIT).min(MAX_WEIGHT)
}

/// The vector a site contributes to a secure sum without DP: its update and
/// its loss, both times its weight, then the weight times `unit` (the clip
/// norm: the weight then has the precision of the update's coordinates).
pub fn aggregate_vector(mut delta: Vec<f32>, train_loss: f32, weight: f32, unit: f32) -> Vec<f32> {
    let loss = if train_loss.is_finite() {
        train_loss / LOSS_SCALE
    } else {
        0.0
    };
    delta.push(loss);
    delta.iter_mut().for_each(|v| *v *= weight);
    delta.push(weight * unit);
    delta
}

/// Split a securely aggregated sum (of [`aggregate_vector`]s with the same
/// `unit`) into the weighted mean update and the weighted mean loss.
pub fn split_aggregate(mut sum: Vec<f64>, unit: f32) -> (Vec<f64>, f64) {
    let weight = sum.pop().unwrap_or(0.0) / f64::from(unit);
    let loss = sum.pop().unwrap_or(0.0) * f64::from(LOSS_SCALE);
    let divisor = if weight > 0.0 { weight } else { 1.0 };
    sum.iter_mut().for_each(|v| *v /= divisor);
    (sum, loss / divisor)
}

#[cfg(test)]
mod tests;
