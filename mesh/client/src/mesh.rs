//! `MeshClient`: calls over mutually authenticated QUIC to whichever node leads.

use crate::framed::{write_frame, FrameReader};
use crate::{client_endpoint, CALL_TIMEOUT};
use certs::TlsMaterial;
use mesh_core::raft::NodeId;
use mesh_core::wire::{node_name, ClientRequest, ClientResponse, Frame};
use quinn::{Connection, Endpoint};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A client of the mesh: finds the leader and makes calls over mutually authenticated
/// QUIC, following `NotLeader` hints. Cheap to clone.
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    endpoint: Endpoint,
    nodes: BTreeMap<NodeId, SocketAddr>,
    conns: tokio::sync::Mutex<BTreeMap<NodeId, Connection>>,
    leader: std::sync::atomic::AtomicU64,
    max_frame: usize,
}

/// Why a call failed on every node.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No node carried the call out within the deadline (no leader, no quorum, or the
    /// nodes refused it before proposing it): it was not done.
    #[error("no node could serve the call: {0}")]
    Unavailable(String),
    /// The call reached a leader but its outcome never came back: it may or may not
    /// have been carried out.
    #[error("the outcome is unknown: {0}")]
    OutcomeUnknown(String),
    /// A node refused the call as invalid (malformed, or too large): not retried.
    #[error("refused: {0}")]
    Refused(String),
    /// The client could not be set up.
    #[error("client setup: {0}")]
    Setup(String),
}

/// What one attempt at one node said.
enum Attempt {
    Answer(ClientResponse),
    Redirect(Option<NodeId>),
    /// Failed; whether the call may have been carried out.
    Failed(String, bool),
}

impl MeshClient {
    /// A client presenting `tls` (a client or node certificate) to `nodes`.
    pub fn new(tls: &TlsMaterial, nodes: BTreeMap<NodeId, SocketAddr>) -> Result<Self, CallError> {
        let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
        Ok(Self {
            inner: Arc::new(ClientInner {
                endpoint: client_endpoint(tls, bind)?,
                nodes,
                conns: tokio::sync::Mutex::new(BTreeMap::new()),
                leader: std::sync::atomic::AtomicU64::new(0),
                max_frame: mesh_core::wire::MAX_FRAME_BYTES,
            }),
        })
    }

    async fn connection(&self, node: NodeId) -> Result<Connection, String> {
        let inner = &self.inner;
        if let Some(c) = inner
            .conns
            .lock()
            .await
            .get(&node)
            .filter(|c| c.close_reason().is_none())
        {
            return Ok(c.clone());
        }
        let addr = *inner.nodes.get(&node).ok_or("unknown node")?;
        let connecting = inner
            .endpoint
            .connect(addr, &certs::server_name(&node_name(node)))
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        inner.conns.lock().await.insert(node, conn.clone());
        Ok(conn)
    }

    /// The nodes this client knows.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.inner.nodes.keys().copied().collect()
    }

    /// One call to `node` itself (not to the leader: a call that node answers, such as
    /// its cache's), within `deadline`. A connection that failed is dropped, so the next
    /// call makes a new one.
    pub async fn call_at(
        &self,
        node: NodeId,
        req: &ClientRequest,
        deadline: Duration,
    ) -> Result<ClientResponse, String> {
        match tokio::time::timeout(deadline, self.call_node(node, req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.inner.conns.lock().await.remove(&node);
                Err(format!("{}: {e}", node_name(node)))
            }
            Err(_) => Err(format!("{} did not answer in time", node_name(node))),
        }
    }

    /// One call to one node.
    pub async fn call_node(
        &self,
        node: NodeId,
        req: &ClientRequest,
    ) -> Result<ClientResponse, String> {
        let max = self.inner.max_frame;
        let conn = self.connection(node).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Frame::Request(req.clone()), max)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, max);
        match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), reader.next()).await {
            Ok(Ok(Some(Frame::Response(r)))) => Ok(r),
            Ok(Ok(_)) => Err("no response".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("call timed out".into()),
        }
    }

    async fn attempt(&self, node: NodeId, req: &ClientRequest) -> Attempt {
        match self.call_node(node, req).await {
            Ok(ClientResponse::NotLeader { leader }) => {
                Attempt::Redirect(leader.filter(|&l| l != node))
            }
            Ok(ClientResponse::Error {
                message,
                retry: true,
            }) => Attempt::Failed(message, false),
            Ok(ClientResponse::Unknown { message }) => Attempt::Failed(message, true),
            Ok(r) => Attempt::Answer(r),
            Err(e) => {
                self.inner.conns.lock().await.remove(&node);
                let may_be_done = matches!(req, ClientRequest::Propose(_));
                Attempt::Failed(format!("{}: {e}", node_name(node)), may_be_done)
            }
        }
    }

    /// Ask every node at once (only the leader acts on the call; the others redirect):
    /// the first answer wins. Used while the leader is unknown.
    async fn attempt_all(&self, req: &ClientRequest) -> Attempt {
        let (outcome, maybe) = self.attempt_all_inner(req).await;
        match outcome {
            // A node that may have carried the call out makes the whole round uncertain,
            // whatever the others said.
            Attempt::Redirect(_) if maybe => Attempt::Failed("a node lost the call".into(), true),
            // Nor may a later "not done" hide an earlier "may be done".
            Attempt::Failed(m, f) => Attempt::Failed(m, f || maybe),
            other => other,
        }
    }

    async fn attempt_all_inner(&self, req: &ClientRequest) -> (Attempt, bool) {
        let mut calls = tokio::task::JoinSet::new();
        for &node in self.inner.nodes.keys() {
            let (client, req) = (self.clone(), req.clone());
            calls.spawn(async move { (node, client.attempt(node, &req).await) });
        }
        let mut outcome = Attempt::Failed("no node answered".into(), false);
        let mut maybe = false;
        while let Some(joined) = calls.join_next().await {
            let Ok((node, attempt)) = joined else {
                continue;
            };
            maybe |= matches!(attempt, Attempt::Failed(_, true));
            match attempt {
                Attempt::Answer(r) => {
                    self.inner
                        .leader
                        .store(node, std::sync::atomic::Ordering::Relaxed);
                    return (Attempt::Answer(r), maybe);
                }
                Attempt::Redirect(Some(l)) => outcome = Attempt::Redirect(Some(l)),
                other if matches!(outcome, Attempt::Failed(..)) => outcome = other,
                _ => {}
            }
        }
        (outcome, maybe)
    }

    /// The node believed to lead (0: unknown).
    pub fn leader_hint(&self) -> NodeId {
        self.inner.leader.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remember `node` as the leader.
    pub fn set_leader_hint(&self, node: NodeId) {
        self.inner
            .leader
            .store(node, std::sync::atomic::Ordering::Relaxed);
    }

    /// Call the leader, following redirects and retrying for up to `deadline`.
    pub async fn call(
        &self,
        req: &ClientRequest,
        deadline: Duration,
    ) -> Result<ClientResponse, CallError> {
        self.call_hedged(req, deadline, None).await
    }

    /// Like [`MeshClient::call`]; with `hedge`, if the node believed to lead has not
    /// answered within that time (it may have died, and its QUIC connection only times out
    /// later), every node is asked too and the first real answer wins. Only for calls that
    /// answer promptly and are safe to repeat (sessions deduplicate proposals).
    pub async fn call_hedged(
        &self,
        req: &ClientRequest,
        deadline: Duration,
        hedge: Option<Duration>,
    ) -> Result<ClientResponse, CallError> {
        let start = tokio::time::Instant::now();
        let mut last_error = String::from("no attempt");
        let mut may_be_done = false;
        while start.elapsed() < deadline {
            let hint = self.inner.leader.load(std::sync::atomic::Ordering::Relaxed);
            // No attempt outlives the caller's deadline (a deposed leader may hold a
            // call until its own timeout).
            let remaining = deadline.saturating_sub(start.elapsed());
            let round = async {
                if !self.inner.nodes.contains_key(&hint) {
                    self.attempt_all(req).await
                } else if let Some(after) = hedge {
                    let primary = self.attempt(hint, req);
                    tokio::pin!(primary);
                    tokio::select! {
                        a = &mut primary => a,
                        () = tokio::time::sleep(after) => tokio::select! {
                            a = &mut primary => a,
                            a = self.attempt_all(req) => a,
                        },
                    }
                } else {
                    self.attempt(hint, req).await
                }
            };
            let proposes = matches!(req, ClientRequest::Propose(_));
            let attempt = tokio::time::timeout(remaining, round)
                .await
                .unwrap_or_else(|_| Attempt::Failed("deadline passed".into(), proposes));
            match attempt {
                Attempt::Answer(r) => return Ok(r),
                Attempt::Redirect(Some(leader)) => {
                    self.inner
                        .leader
                        .store(leader, std::sync::atomic::Ordering::Relaxed);
                    last_error = format!("redirected to {}", node_name(leader));
                }
                Attempt::Redirect(None) => {
                    self.inner
                        .leader
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    last_error = "no leader known".into();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Attempt::Failed(e, maybe) => {
                    self.inner
                        .leader
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    last_error = e;
                    may_be_done |= maybe;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if may_be_done {
            return Err(CallError::OutcomeUnknown(last_error));
        }
        Err(CallError::Unavailable(last_error))
    }
}
