//! The 5-byte length-prefixed message framing shared by gRPC, gRPC-Web and Connect
//! streaming: one flags byte, a big-endian u32 length, the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the frame header.
pub const HEADER_LEN: usize = 5;
/// Connect flag: the payload is compressed with the negotiated encoding.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Connect flag: this is the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;

/// Frames `payload` with `flags`.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame declares more bytes than the limit.
    #[error("message of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// The stream ended inside a frame.
    #[error("stream ended inside a message ({0} bytes left over)")]
    Truncated(usize),
}

/// Incremental frame decoder: push bytes as they arrive, take whole frames out.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_len: usize,
}

impl Decoder {
    /// A decoder refusing frames longer than `max_len`.
    pub fn new(max_len: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            max_len,
        }
    }

    /// Changes the longest frame accepted from here on.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] as soon as a header declares too much.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Bytes)>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge(len, self.max_len));
        }
        if self.buf.len() < HEADER_LEN + len {
            // No reserving for the declared length: memory follows the bytes that arrived,
            // so a header that only claims 16 MiB costs nothing.
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some((flags, self.buf.split_to(len).freeze())))
    }

    /// Checks that the stream ended on a frame boundary.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when bytes are left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_split_frames() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(0, b"hello"));
        wire.extend_from_slice(&encode(FLAG_END_STREAM, b"{}"));
        wire.extend_from_slice(&encode(0, b""));
        for split in 0..wire.len() {
            let mut decoder = Decoder::new(1024);
            let mut frames = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                decoder.push(part);
                while let Some(frame) = decoder.next_frame().expect("frame") {
                    frames.push(frame);
                }
            }
            decoder.finish().expect("clean end");
            assert_eq!(
                frames,
                vec![
                    (0, Bytes::from_static(b"hello")),
                    (FLAG_END_STREAM, Bytes::from_static(b"{}")),
                    (0, Bytes::new()),
                ]
            );
        }
    }

    #[test]
    fn refuses_oversized_and_truncated_frames() {
        let mut decoder = Decoder::new(3);
        decoder.push(&encode(0, b"toolong"));
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge(7, 3)));
        let mut decoder = Decoder::new(100);
        decoder.push(&encode(0, b"abc")[..6]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(FrameError::Truncated(6)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Bytes cut into pieces at arbitrary points, as they may arrive from a socket.
        fn pieces(bytes: Vec<u8>, cuts: Vec<usize>) -> Vec<Vec<u8>> {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                out.push(bytes[start..cut].to_vec());
                start = cut;
            }
            out
        }

        proptest! {
            /// Whatever the frames and however the bytes are cut, the decoder gives back
            /// exactly the frames that were encoded, and the stream ends cleanly.
            #[test]
            fn frames_round_trip_through_any_split(
                frames in prop::collection::vec(
                    (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)),
                    0..8,
                ),
                cuts in prop::collection::vec(any::<usize>(), 0..12),
            ) {
                let wire: Vec<u8> = frames.iter().flat_map(|(f, p)| encode(*f, p).to_vec()).collect();
                let mut decoder = Decoder::new(300);
                let mut decoded = Vec::new();
                for piece in pieces(wire, cuts) {
                    decoder.push(&piece);
                    while let Some((flags, payload)) = decoder.next_frame().expect("within limit") {
                        decoded.push((flags, payload.to_vec()));
                    }
                }
                prop_assert_eq!(decoded, frames);
                prop_assert!(decoder.finish().is_ok());
            }

            /// Any bytes at all: no panic, no frame above the limit (a header declaring one
            /// is refused before its payload is buffered), and the end is clean exactly when
            /// nothing is left over.
            #[test]
            fn any_bytes_decode_or_fail_cleanly(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
                max in 0usize..512,
            ) {
                let mut decoder = Decoder::new(max);
                let mut consumed = 0usize;
                'feed: for piece in pieces(bytes.clone(), cuts) {
                    decoder.push(&piece);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some((_, payload))) => {
                                prop_assert!(payload.len() <= max);
                                consumed += HEADER_LEN + payload.len();
                            }
                            Ok(None) => break,
                            Err(FrameError::TooLarge(len, limit)) => {
                                prop_assert!(len > limit);
                                prop_assert_eq!(limit, max);
                                break 'feed;
                            }
                            Err(other) => prop_assert!(false, "unexpected {other:?}"),
                        }
                    }
                }
                if consumed == bytes.len() {
                    prop_assert!(decoder.finish().is_ok());
                }
            }
        }
    }
}
