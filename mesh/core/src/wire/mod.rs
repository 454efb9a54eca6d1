//! The mesh wire format: versioned postcard frames with a length prefix, sans I/O.
//!
//! ```text
//!  [len: u32 LE][version: u8][postcard(Frame)]      len = 1 + payload bytes, <= max
//! ```
//! [`decode`] checks the length against the limit before it looks at anything else,
//! answers `Ok(None)` for an incomplete frame and an error for a malformed one, and never
//! panics on any input. Frame variants are only ever appended (postcard encodes the
//! variant index), and the version byte guards incompatible changes.

use crate::raft::{LogIndex, Message, NodeId};
use serde::{Deserialize, Serialize};

/// Version byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Default limit on a frame's length (snapshot chunks are 1 MiB; entries batches capped).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
const LEN_BYTES: usize = 4;

/// What travels between nodes and clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame on a stream a node opens: the node it claims to be. The receiver
    /// checks the claim against the peer's certificate.
    Hello {
        /// The claimed node.
        node: NodeId,
        /// A number fixed for the life of the sending process: a new one means the peer
        /// restarted, and connections to its old self are dead.
        incarnation: u64,
    },
    /// A Raft message.
    Raft(Message),
    /// A client's call.
    Request(ClientRequest),
    /// The answer to a call.
    Response(ClientResponse),
}

/// A client's call to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Replicate a command and apply it.
    Propose(Vec<u8>),
    /// A linearizable read of the state machine (a query it understands).
    Read(Vec<u8>),
    /// The node's own view: role, term, leader, commit (not linearizable).
    Status,
    /// A call to this node's own cache (an encoded `CacheCall`): answered by this
    /// node, whether it leads or not.
    Local(Vec<u8>),
}

/// A node's view of the cluster, answered to [`ClientRequest::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub id: NodeId,
    /// 0 follower, 1 candidate, 2 leader.
    pub role: u8,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: LogIndex,
    /// Applied index.
    pub applied: LogIndex,
}

/// A node's answer to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// The command was committed at `index` and applied (or, for a call that waited,
    /// the entry at `index` completed it); `result` is its reply.
    Applied {
        /// Where it landed in the log.
        index: LogIndex,
        /// The state machine's reply.
        result: Vec<u8>,
        /// The answering node's wall clock when it answered: only for estimates a person
        /// reads (a lease's wall-clock end), never for a decision.
        wall_ms: u64,
    },
    /// The result of a read.
    Read(Vec<u8>),
    /// Not the leader; ask `leader` (if known).
    NotLeader {
        /// Best guess at the leader.
        leader: Option<NodeId>,
    },
    /// The call failed; `retry` says whether trying again (perhaps elsewhere) may work.
    Error {
        /// What went wrong.
        message: String,
        /// Whether a retry may succeed.
        retry: bool,
    },
    /// The node's status.
    Status(NodeStatus),
    /// The answer to [`ClientRequest::Local`] (an encoded `CacheAnswer`).
    Local(Vec<u8>),
    /// The call may or may not have been carried out (its entry was proposed, then the
    /// leader changed or the answer did not come in time). Retrying the same session
    /// and sequence number is safe: it is answered, never applied twice.
    Unknown {
        /// What happened.
        message: String,
    },
}

/// Why bytes are not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Length prefix of zero.
    #[error("empty frame")]
    Empty,
    /// Length prefix above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A protocol version we do not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Payload that does not decode, or has bytes left over.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl WireError {
    /// A short label for the `mesh_frames_rejected_total{reason}` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Oversized { .. } => "oversized",
            Self::Version(_) => "version",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Encode one frame, refusing one over `max` bytes.
pub fn encode(frame: &Frame, max: usize) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; LEN_BYTES];
    out.push(PROTOCOL_VERSION);
    let mut out =
        postcard::to_extend(frame, out).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - LEN_BYTES;
    if len > max || u32::try_from(len).is_err() {
        return Err(WireError::Oversized { len, max });
    }
    out[..LEN_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// The length of the frame starting `buf`, once its prefix is there: checked against
/// `max` so a reader can refuse before buffering the body.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    let Some(prefix) = buf.get(..LEN_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > max {
        return Err(WireError::Oversized { len, max });
    }
    Ok(Some(LEN_BYTES + len))
}

/// Decode the frame at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the frame and the bytes it used.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(total) = frame_len(buf, max)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_BYTES..total) else {
        return Ok(None);
    };
    let (&version, payload) = body.split_first().ok_or(WireError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(payload)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(Some((frame, total)))
}

/// The name of node `id` in certificates, logs and `/health`: `node<id>`.
pub fn node_name(id: NodeId) -> String {
    format!("node{id}")
}

/// Inverse of [`node_name`].
pub fn parse_node_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix("node")?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&id| id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryPayload, MessageBody};

    fn sample() -> Vec<Frame> {
        vec![
            Frame::Hello {
                node: 3,
                incarnation: 9,
            },
            Frame::Raft(Message {
                from: 1,
                to: 2,
                term: 7,
                body: MessageBody::AppendEntries {
                    prev_log_index: 4,
                    prev_log_term: 6,
                    entries: vec![Entry {
                        term: 7,
                        index: 5,
                        payload: EntryPayload::Command(vec![1, 2, 3]),
                    }],
                    leader_commit: 4,
                },
            }),
            Frame::Request(ClientRequest::Propose(b"put a 1".to_vec())),
            Frame::Response(ClientResponse::NotLeader { leader: Some(2) }),
        ]
    }

    #[test]
    fn frames_round_trip_and_every_prefix_is_incomplete() {
        for frame in sample() {
            let bytes = encode(&frame, MAX_FRAME_BYTES).expect("encode");
            assert_eq!(
                decode(&bytes, MAX_FRAME_BYTES),
                Ok(Some((frame.clone(), bytes.len())))
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..cut], MAX_FRAME_BYTES),
                    Ok(None),
                    "prefix {cut}"
                );
            }
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            assert_eq!(
                decode(&two, MAX_FRAME_BYTES).map(|f| f.map(|(_, n)| n)),
                Ok(Some(bytes.len()))
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix_alone() {
        let prefix = (64u32 << 20).to_le_bytes();
        assert_eq!(
            decode(&prefix, MAX_FRAME_BYTES),
            Err(WireError::Oversized {
                len: 64 << 20,
                max: MAX_FRAME_BYTES
            })
        );
        let big = Frame::Request(ClientRequest::Propose(vec![0; 100]));
        assert!(matches!(encode(&big, 50), Err(WireError::Oversized { .. })));
        assert_eq!(
            decode(&[0, 0, 0, 0], MAX_FRAME_BYTES),
            Err(WireError::Empty)
        );
    }

    #[test]
    fn wrong_version_and_trailing_bytes_are_refused() {
        let mut bytes = encode(
            &Frame::Hello {
                node: 1,
                incarnation: 1,
            },
            MAX_FRAME_BYTES,
        )
        .expect("encode");
        bytes[4] = 9;
        assert_eq!(decode(&bytes, MAX_FRAME_BYTES), Err(WireError::Version(9)));
        let mut bytes = encode(
            &Frame::Hello {
                node: 1,
                incarnation: 1,
            },
            MAX_FRAME_BYTES,
        )
        .expect("encode");
        bytes.push(0);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode(&bytes, MAX_FRAME_BYTES),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (rand() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            if bytes.len() >= 5 && rand() % 2 == 0 {
                // Plausible header, random body: exercises the postcard decoder.
                let body = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&body.to_le_bytes());
                bytes[4] = PROTOCOL_VERSION;
            }
            let _ = decode(&bytes, MAX_FRAME_BYTES);
        }
        // Mutations of valid frames.
        for frame in sample() {
            let bytes = encode(&frame, MAX_FRAME_BYTES).expect("encode");
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut m = bytes.clone();
                    m[i] ^= 1 << bit;
                    let _ = decode(&m, MAX_FRAME_BYTES);
                }
            }
        }
    }

    #[test]
    fn node_names() {
        assert_eq!(node_name(12), "node12");
        assert_eq!(parse_node_name("node12"), Some(12));
        for bad in [
            "node",
            "node0",
            "node01",
            "nodex",
            "gateway",
            "node-1",
            "node99999999999999999999",
        ] {
            assert_eq!(parse_node_name(bad), None, "{bad}");
        }
    }
}
