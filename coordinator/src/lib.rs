//! The Potluck coordinator.
//!
//! It holds the franchise PKI ([`pki`]), serves QUIC with mutual TLS
//! ([`server`]) as the async driver of `potluck_shared::round::Coordinator`,
//! and keeps model versions and metrics under its state directory ([`state`]).

pub mod admin;
pub mod config;
pub mod dpia;
pub mod fairness;
pub mod pki;
pub mod report;
pub mod roles;
pub mod schedule;
pub mod server;
pub mod state;
pub mod telemetry;

pub use config::CoordinatorConfig;
pub use server::{RunSummary, ServeError, Server};
