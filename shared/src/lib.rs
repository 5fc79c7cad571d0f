//! What the Potluck agent and coordinator must agree on.
//!
//! - [`bundle`]: the files enrolment gives a site.
//! - [`wire`]: versioned messages, their codec (one module) and length-prefixed framing.
//! - [`model`]: the recommender, its spec hash and canonical flat parameter layout.
//! - [`round`]: the round lifecycle as sans-IO state machines.
//! - [`secagg`]: secure aggregation (Bonawitz et al.) as sans-IO client and server.
//! - [`dp`]: clipping and noise applied to a site's update.
//! - [`fairness`]: per-group audit vectors, the audit report and the release gate.
//! - [`tls`]: the franchise CA, site identity, mutual-TLS QUIC configs.
//! - [`transport`]: thin async framing over a QUIC stream.
//! - [`service`]: logging and shutdown signals for the binaries.
//! - [`synth`]: the deterministic synthetic franchise for demos, tests and research.
//!
//! Protocol logic lives in pure state machines that take messages and time as
//! inputs and return messages and events; nothing here but [`transport`]
//! performs I/O.

pub mod audit;
pub mod bundle;
pub mod dp;
pub mod fairness;
mod ids;
pub mod model;
pub mod round;
pub mod secagg;
pub mod service;
pub mod synth;
pub mod tls;
pub mod transport;
pub mod wire;

pub use ids::{ModelVersion, RoundId, SiteId, SiteIdError};
