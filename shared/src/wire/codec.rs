//! The one place that knows the byte encoding of messages (bincode 2, serde mode).
//!
//! Everything else calls [`encode`] and [`decode`], so the codec can be swapped
//! (bincode is unmaintained; see RUSTSEC-2025-0141) by changing this file alone.

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The bytes decode but leave bytes unread.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
}

/// Decoding never allocates more than this in one go, whatever a length field claims.
const DECODE_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<DECODE_LIMIT>()
}

/// Encode a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decode a value, requiring that every byte is used.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}
