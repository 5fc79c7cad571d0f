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
mod site;

pub use coordinator::{
    AuditOutcome, AuditPolicy, Coordinator, CoordinatorEvent, PrivacyPolicy, PrivacySummary,
    RoundConfig, RoundSummary, Transmit, Violation, cohort,
};
pub use site::{SecAggIdentity, SiteEvent, SiteSession, SiteSessionError, privacy_step};

/// A site's training loss travels as one extra coordinate of the securely
/// aggregated vector, divided by this, so that only its sum is revealed and it
/// stays within the encoding's coordinate bound.
pub const LOSS_SCALE: f32 = 16.0;

/// The vector a site contributes to secure aggregation: its update, then its loss.
pub fn aggregate_vector(mut delta: Vec<f32>, train_loss: f32) -> Vec<f32> {
    let loss = if train_loss.is_finite() {
        train_loss / LOSS_SCALE
    } else {
        0.0
    };
    delta.push(loss);
    delta
}

/// Split a securely aggregated sum into the update sum and the loss sum.
pub fn split_aggregate(mut sum: Vec<f64>) -> (Vec<f64>, f64) {
    let loss = sum.pop().unwrap_or(0.0) * f64::from(LOSS_SCALE);
    (sum, loss)
}

#[cfg(test)]
mod tests;
