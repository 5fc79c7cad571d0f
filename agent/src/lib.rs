//! The Potluck site agent.
//!
//! It keeps the site's orders in an embedded store ([`store`]), imports them
//! from CSV ([`import`]), prepares training and held-out data ([`dataset`]),
//! trains locally with burn ([`training`]), evaluates ([`evaluation`]), and
//! takes part in rounds over QUIC ([`client`]) as the async driver of
//! `potluck_shared::round::SiteSession`. Raw customer data never leaves the
//! site: only clipped, noised updates and evaluation counts do. It serves
//! recommendations to the till ([`recommend`], over HTTP in [`api`]), purges
//! orders past retention ([`retention`]), answers data-subject requests
//! ([`subject`]) and keeps a tamper-evident audit log ([`audit`]).

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod dataset;
pub mod evaluation;
pub mod import;
pub mod recommend;
pub mod retention;
pub mod simulation;
pub mod store;
pub mod subject;
pub mod training;
pub mod vault;

pub use client::{Agent, AgentError};
pub use config::AgentConfig;
