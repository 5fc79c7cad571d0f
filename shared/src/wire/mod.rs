//! The wire protocol: versioned messages, their codec and their framing.
//!
//! A connection carries one bidirectional QUIC stream, opened by the agent.
//! Both directions are a sequence of [`frame`]s, each holding one message
//! encoded by [`codec`]. The agent's first message is [`SiteMessage::Hello`]; the
//! coordinator answers [`CoordinatorMessage::Welcome`] or
//! [`CoordinatorMessage::Refused`] and closes.

pub mod codec;
pub mod frame;
mod messages;

pub use messages::*;

/// The ALPN protocol name; its suffix is the major protocol version.
pub const ALPN: &[u8] = b"potluck/1";

/// The protocol version both sides must speak, carried in the first exchange.
pub const PROTOCOL_VERSION: u16 = 7;
