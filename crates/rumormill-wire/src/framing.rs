use crate::error::WireError;

/// Default limit on one stream frame: 32 MiB.
pub const DEFAULT_MAX_FRAME: usize = 32 << 20;

/// Prefixes a sealed frame with its length (u32, big-endian) for a stream.
pub fn encode_frame(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// Splits a byte stream into length-delimited frames, enforcing a size limit
/// before buffering anything.
///
/// ```
/// use rumormill_wire::{encode_frame, FrameDecoder};
/// let mut d = FrameDecoder::new(1024);
/// let bytes = [encode_frame(b"one"), encode_frame(b"two")].concat();
/// d.extend(&bytes[..5]);
/// assert_eq!(d.next_frame().unwrap().as_deref(), None);
/// d.extend(&bytes[5..]);
/// assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"one"[..]));
/// assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"two"[..]));
/// ```
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already returned as frames. They are
    /// dropped lazily, so a buffer full of tiny frames costs linear time
    /// rather than one shift of the whole buffer per frame.
    start: usize,
    max: usize,
}

impl FrameDecoder {
    /// A decoder accepting frames of at most `max` bytes.
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        // Compact once the consumed prefix is at least as long as what is
        // left, so each byte is moved at most once on average.
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `None` if more bytes are needed, or an error
    /// if the announced length exceeds the limit (the stream is then unusable).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let rest = self.buf.get(self.start..).unwrap_or_default();
        let Some(prefix) = rest.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max {
            return Err(WireError::FrameTooLarge { len, max: self.max });
        }
        let Some(frame) = len.checked_add(4).and_then(|end| rest.get(4..end)) else {
            return Ok(None);
        };
        let frame = frame.to_vec();
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }
}
