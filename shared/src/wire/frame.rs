//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes.
//!
//! The length is checked against the configured maximum *before* anything is
//! allocated for the body, and the body grows with the bytes that arrive
//! ([`Body`]), not with the length announced: a peer cannot make us allocate
//! by lying.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// The default largest frame body: 64 MiB (a 10^6-parameter model plus headroom).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// The largest first frame of a connection: a hello is a version number and
/// an agent version, a few dozen bytes. Before it a peer has shown nothing,
/// so it gets no more room than that.
pub const MAX_HELLO_FRAME: usize = 4 << 10;

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

/// A frame body being received.
#[derive(Debug)]
pub struct Body {
    len: usize,
    bytes: Vec<u8>,
}

impl Body {
    /// A body of `len` bytes, as its header announced (checked by [`body_len`]).
    pub fn new(len: usize) -> Self {
        // Room for a small message at once; a large one grows as it arrives.
        const FIRST: usize = 64 << 10;
        Self {
            len,
            bytes: Vec::with_capacity(len.min(FIRST)),
        }
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> usize {
        self.len - self.bytes.len()
    }

    /// Take the bytes that arrived (at most [`Body::remaining`] of them).
    pub fn push(&mut self, chunk: &[u8]) {
        let take = chunk.len().min(self.remaining());
        self.bytes.extend_from_slice(&chunk[..take]);
    }

    /// The body, once complete.
    pub fn finish(self) -> Option<Vec<u8>> {
        (self.remaining() == 0).then_some(self.bytes)
    }

    /// Bytes allocated so far.
    pub fn allocated(&self) -> usize {
        self.bytes.capacity()
    }
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

    #[test]
    fn a_frame_that_announces_much_and_sends_little_allocates_little() {
        let mut body = Body::new(DEFAULT_MAX_FRAME);
        body.push(&[1; 10]);
        assert!(body.allocated() <= 64 << 10, "{}", body.allocated());
        assert_eq!(body.remaining(), DEFAULT_MAX_FRAME - 10);
        assert!(body.finish().is_none(), "incomplete");
        let mut body = Body::new(3);
        body.push(&[1, 2]);
        body.push(&[3, 4]); // the next frame's first byte is not taken
        assert_eq!(body.finish(), Some(vec![1, 2, 3]));
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
