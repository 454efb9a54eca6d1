//! The WAL frame codec, sans I/O: `[len: u32 LE][crc32c(len ‖ payload): u32 LE][payload]`,
//! payload = postcard `Vec<WalRecord>`. Decoding checks the length bound and the CRC
//! before it parses anything, and rejects trailing bytes.

use super::WalRecord;

/// Largest payload of one frame.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Bytes before the payload.
pub(crate) const HEADER_BYTES: usize = 8;

/// Why bytes are not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header promises (a torn write, or not yet read).
    #[error("incomplete frame: need {need} bytes, have {have}")]
    Incomplete {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Length zero or above the limit.
    #[error("frame length {0} out of range")]
    BadLength(usize),
    /// Checksum mismatch.
    #[error("frame checksum mismatch")]
    BadCrc,
    /// Checksum fine but the payload does not decode (a bug or a foreign file).
    #[error("frame payload does not decode: {0}")]
    BadPayload(String),
}

fn checksum(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload)
}

/// Encode records as one frame.
pub fn encode_frame(records: &[WalRecord]) -> Result<Vec<u8>, FrameError> {
    let payload =
        postcard::to_stdvec(records).map_err(|e| FrameError::BadPayload(e.to_string()))?;
    if payload.is_empty() || payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::BadLength(payload.len()));
    }
    let len_bytes = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&checksum(len_bytes, &payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Check the frame at the start of `buf` without decoding it: its total size if valid.
pub(crate) fn check_frame(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < HEADER_BYTES {
        return Err(FrameError::Incomplete {
            need: HEADER_BYTES,
            have: buf.len(),
        });
    }
    let len_bytes = [buf[0], buf[1], buf[2], buf[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(FrameError::BadLength(len));
    }
    let total = HEADER_BYTES + len;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            need: total,
            have: buf.len(),
        });
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc != checksum(len_bytes, &buf[HEADER_BYTES..total]) {
        return Err(FrameError::BadCrc);
    }
    Ok(total)
}

/// Decode the frame at the start of `buf`: its records and its total size.
pub fn decode_frame(buf: &[u8]) -> Result<(Vec<WalRecord>, usize), FrameError> {
    let total = check_frame(buf)?;
    let (records, rest) = postcard::take_from_bytes::<Vec<WalRecord>>(&buf[HEADER_BYTES..total])
        .map_err(|e| FrameError::BadPayload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::BadPayload(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok((records, total))
}
