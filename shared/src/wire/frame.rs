//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes.
//!
//! The length is checked against the configured maximum *before* anything is
//! allocated for the body, so a peer cannot make us allocate by lying.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// The default largest frame body: 64 MiB (a 10^6-parameter model plus headroom).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces a body larger than allowed.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized {
        /// Announced body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The header announces an empty body, which no message encodes to.
    #[error("empty frame")]
    Empty,
}

/// Parse a header and check the announced length against `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    Ok(len)
}

/// Prefix a body with its header.
pub fn frame(body: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() > max || body.len() > u32::MAX as usize {
        return Err(FrameError::Oversized {
            len: body.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_and_empty_headers_are_refused() {
        assert_eq!(
            body_len(1025u32.to_be_bytes(), 1024),
            Err(FrameError::Oversized {
                len: 1025,
                max: 1024
            })
        );
        assert_eq!(body_len([0; 4], 1024), Err(FrameError::Empty));
        assert_eq!(body_len(1024u32.to_be_bytes(), 1024), Ok(1024));
    }

    proptest! {
        #[test]
        fn frames_round_trip(body in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let framed = frame(&body, 4096).unwrap();
            let header: [u8; 4] = framed[..4].try_into().unwrap();
            prop_assert_eq!(body_len(header, 4096).unwrap(), body.len());
            prop_assert_eq!(&framed[4..], &body[..]);
        }

        #[test]
        fn any_header_parses_without_panic(header in any::<[u8; 4]>(), max in 1usize..1 << 20) {
            let _ = body_len(header, max);
        }
    }
}
