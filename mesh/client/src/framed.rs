//! Frames over quinn streams: a bounded reader that refuses an oversized frame from its
//! length prefix alone, and a writer.

use mesh_core::wire::{self, Frame, WireError};
use quinn::{RecvStream, SendStream};

/// Why a stream stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream could not be written.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

impl StreamError {
    /// Label for `mesh_frames_rejected_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Wire(e) => e.reason(),
            Self::Truncated => "truncated",
            Self::Read(_) | Self::Write(_) => "stream",
        }
    }
}

/// Reads frames from one receive stream.
pub struct FrameReader {
    stream: RecvStream,
    buf: Vec<u8>,
    max: usize,
}

impl FrameReader {
    /// A reader refusing frames over `max` bytes.
    pub fn new(stream: RecvStream, max: usize) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            max,
        }
    }

    /// The next frame; `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(total) = wire::frame_len(&self.buf, self.max)? {
                if self.buf.len() >= total {
                    let decoded = wire::decode(&self.buf[..total], self.max)?;
                    self.buf.drain(..total);
                    if let Some((frame, _)) = decoded {
                        return Ok(Some(frame));
                    }
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await? {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(StreamError::Truncated),
            }
        }
    }

    /// Tell the peer to stop sending (after a malformed frame).
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(quinn::VarInt::from_u32(code));
    }
}

/// Write one frame.
pub async fn write_frame(
    stream: &mut SendStream,
    frame: &Frame,
    max: usize,
) -> Result<(), StreamError> {
    let bytes = wire::encode(frame, max)?;
    stream.write_all(&bytes).await?;
    Ok(())
}
