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
    Coordinator, CoordinatorEvent, RoundConfig, RoundSummary, Transmit, Violation,
};
pub use site::{SiteEvent, SiteSession, SiteSessionError};

#[cfg(test)]
mod tests;
