//! Framed messages over a QUIC stream: the only I/O in this crate.
//!
//! Each frame's length is checked against the maximum before its body is
//! allocated; a bad frame is an error for the caller to close the connection with.

use std::net::SocketAddr;

use quinn::{RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::codec::{self, CodecError};
use crate::wire::frame::{self, FrameError, HEADER_LEN};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The stream or connection failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer finished the stream in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame header was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame body is not a valid message.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl TransportError {
    /// The application close code that tells the peer what it did wrong.
    pub fn close_code(&self) -> CloseCode {
        match self {
            TransportError::Frame(FrameError::Oversized { .. }) => CloseCode::FrameTooLarge,
            TransportError::Frame(_) | TransportError::Codec(_) | TransportError::Truncated => {
                CloseCode::Malformed
            }
            TransportError::Stream(_) => CloseCode::Normal,
        }
    }
}

/// Application error codes used when closing a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// Orderly close.
    Normal = 0,
    /// The peer sent a message the protocol forbids at that point.
    ProtocolViolation = 1,
    /// A frame exceeded the maximum size.
    FrameTooLarge = 2,
    /// A frame or message could not be decoded.
    Malformed = 3,
    /// The peers speak different protocol versions.
    VersionMismatch = 4,
    /// The peer's identity is not accepted.
    Unauthorized = 5,
    /// The process is shutting down.
    Shutdown = 6,
}

impl From<CloseCode> for VarInt {
    fn from(code: CloseCode) -> Self {
        VarInt::from_u32(code as u32)
    }
}

/// The UDP buffer size asked of the kernel for an endpoint that many sites
/// talk to at once.
///
/// Every site sends its masked input at the same moment, and in a simulation
/// every virtual site receives the new model at once: with Linux's usual
/// 208 KiB buffer the kernel drops most of that burst and QUIC then waits on
/// loss recovery. The kernel caps the size at `net.core.rmem_max` and
/// `net.core.wmem_max`.
pub const BURST_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr`, for a QUIC endpoint that takes bursts from
/// many peers: its buffers are [`BURST_BUFFER`] or as near as the kernel allows
/// (a warning says when it allows less).
pub fn burst_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only slows bursts down.
    let _ = socket.set_recv_buffer_size(BURST_BUFFER);
    let _ = socket.set_send_buffer_size(BURST_BUFFER);
    socket.bind(&addr.into())?;
    // Linux reports twice what it grants (it counts its bookkeeping too).
    let granted = socket.recv_buffer_size()?;
    if granted < BURST_BUFFER {
        tracing::warn!(
            granted_bytes = granted,
            wanted_bytes = BURST_BUFFER,
            "the kernel capped the UDP receive buffer; with many sites, raise \
             net.core.rmem_max and net.core.wmem_max (see the README)"
        );
    }
    Ok(socket.into())
}

/// Read one message; `Ok(None)` when the peer finished the stream cleanly between frames.
///
/// Returns the message and its size on the wire.
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max_frame: usize,
) -> Result<Option<(T, usize)>, TransportError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => {
            return Err(TransportError::Stream(e.to_string()));
        }
    }
    let len = frame::body_len(header, max_frame)?;
    let mut body = frame::Body::new(len);
    while body.remaining() > 0 {
        match recv.read_chunk(body.remaining(), true).await {
            Ok(Some(chunk)) => body.push(&chunk.bytes),
            Ok(None) => return Err(TransportError::Truncated),
            Err(e) => return Err(TransportError::Stream(e.to_string())),
        }
    }
    let body = body.finish().ok_or(TransportError::Truncated)?;
    Ok(Some((codec::decode(&body)?, HEADER_LEN + len)))
}

/// Encode and write one message; returns its size on the wire.
pub async fn write_message<T: Serialize>(
    send: &mut SendStream,
    message: &T,
    max_frame: usize,
) -> Result<usize, TransportError> {
    let bytes = frame::frame(&codec::encode(message)?, max_frame)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_input_closes_with_the_code_that_names_it() {
        let oversized = TransportError::Frame(FrameError::Oversized { len: 9, max: 8 });
        assert_eq!(oversized.close_code(), CloseCode::FrameTooLarge);
        assert_eq!(
            TransportError::Frame(FrameError::Empty).close_code(),
            CloseCode::Malformed
        );
        let garbage = TransportError::Codec(CodecError::Decode("bad".into()));
        assert_eq!(garbage.close_code(), CloseCode::Malformed);
        assert_eq!(TransportError::Truncated.close_code(), CloseCode::Malformed);
        assert_eq!(
            TransportError::Stream("gone".into()).close_code(),
            CloseCode::Normal
        );
        assert_eq!(CloseCode::FrameTooLarge as u64, 2);
    }
}
