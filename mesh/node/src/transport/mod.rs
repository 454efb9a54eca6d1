//! The mesh transport: QUIC (quinn) with mutual TLS (rustls), ALPN `syncmesh/1`.
//!
//! Every connection presents a certificate signed by the cluster CA; the peer's identity
//! is read from that certificate, never from what it says. A node opens one
//! unidirectional stream for Raft traffic and another for snapshot chunks (so a large
//! snapshot never delays heartbeats); each begins with `Hello { node }`, and a claim that
//! does not match the certificate closes the connection. Client calls (from the gateway,
//! the CLI or other nodes) use one bidirectional stream per call.
//!
//! ```text
//!  node A ──uni: Hello, Raft, Raft, ...────────> node B ──> raft inbox (bounded)
//!         ──uni: Hello, InstallSnapshot, ...───>
//!  client ──bi: Request ─> <─ Response ────────> node B ──> client inbox (bounded)
//! ```
//! Outbound links reconnect with jittered exponential backoff, and are re-dialled at once
//! when the peer connects to us afresh (it restarted). Every queue is bounded; a full
//! one drops Raft messages, which Raft tolerates.

pub use mesh_client::framed::{write_frame, FrameReader, StreamError};
pub use mesh_client::{CallError, ClientCall, MeshClient};

use crate::faults::{AnswerFate, AnswerFaults};
use crate::metrics::NodeMetrics;
use certs::{PeerKind, TlsMaterial};
use mesh_core::raft::{Message, MessageBody, NodeId};
use mesh_core::wire::{node_name, parse_node_name, ClientRequest, ClientResponse, Frame};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// Raft messages queued per peer at most.
const LINK_QUEUE: usize = 4096;
/// Error codes we close streams and connections with.
const CODE_IDENTITY: u32 = 1;
const CODE_MALFORMED: u32 = 2;
const CODE_UNEXPECTED: u32 = 3;
/// A stream reset by an injected fault (see [`crate::faults`]).
const CODE_ANSWER_LOST: u32 = 4;
use mesh_client::CALL_TIMEOUT;

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Certificates or TLS configuration.
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    /// quinn refused the TLS configuration.
    #[error("QUIC crypto configuration: {0}")]
    Crypto(String),
    /// The UDP socket.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// Settings of one node's transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node.
    pub id: NodeId,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the other nodes listen.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Largest frame accepted or sent.
    pub max_frame_bytes: usize,
    /// Answers a test may have this node lose (see [`crate::faults`]).
    pub faults: Option<Arc<AnswerFaults>>,
}

/// Between nodes: Raft's own heartbeats detect failures, and a node that restarts is
/// redialled at once, so this only reclaims dead connections.
fn node_transport() -> Arc<quinn::TransportConfig> {
    mesh_client::quic_transport(Duration::from_secs(3), Duration::from_millis(500))
}

/// Build the node's quinn endpoint bound to `listen`: it serves, and dials its peers.
pub fn endpoint(tls: &TlsMaterial, listen: SocketAddr) -> Result<Endpoint, TransportError> {
    let transport = node_transport();
    let crypto = |e: &dyn std::fmt::Display| TransportError::Crypto(e.to_string());
    let client_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config()?)
        .map_err(|e| crypto(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(transport.clone());
    let server_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server_config()?)
        .map_err(|e| crypto(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    server.transport_config(transport);
    let mut endpoint = Endpoint::server(server, listen).map_err(|source| TransportError::Bind {
        addr: listen,
        source,
    })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// A running transport. Dropping it does not stop its tasks: call [`Transport::close`].
pub struct Transport {
    endpoint: Endpoint,
    links: BTreeMap<NodeId, mpsc::Sender<Message>>,
    metrics: NodeMetrics,
    /// With fault injection: a test may cut this node off from its peers.
    faults: Option<Arc<AnswerFaults>>,
}

struct Inbound {
    id: NodeId,
    /// The incarnation each peer last announced.
    incarnations: std::sync::Mutex<BTreeMap<NodeId, u64>>,
    raft_tx: mpsc::Sender<Message>,
    client_tx: mpsc::Sender<ClientCall>,
    redial: BTreeMap<NodeId, Arc<Notify>>,
    max_frame: usize,
    metrics: NodeMetrics,
    faults: Option<Arc<AnswerFaults>>,
}

impl Transport {
    /// Bind, start accepting, and start one outbound link per peer.
    pub fn start(
        cfg: &TransportConfig,
        tls: &TlsMaterial,
        raft_tx: mpsc::Sender<Message>,
        client_tx: mpsc::Sender<ClientCall>,
        metrics: NodeMetrics,
    ) -> Result<Self, TransportError> {
        let endpoint = endpoint(tls, cfg.listen)?;
        let mut links = BTreeMap::new();
        let mut redial = BTreeMap::new();
        let incarnation = new_incarnation();
        for (&peer, &addr) in cfg.peers.iter().filter(|(&p, _)| p != cfg.id) {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let notify = Arc::new(Notify::new());
            links.insert(peer, tx);
            redial.insert(peer, notify.clone());
            let link = Link {
                endpoint: endpoint.clone(),
                me: cfg.id,
                incarnation,
                peer,
                addr,
                max_frame: cfg.max_frame_bytes,
            };
            tokio::spawn(link.run(rx, notify, metrics.clone()));
        }
        let inbound = Arc::new(Inbound {
            id: cfg.id,
            incarnations: std::sync::Mutex::new(BTreeMap::new()),
            raft_tx,
            client_tx,
            redial,
            max_frame: cfg.max_frame_bytes,
            metrics: metrics.clone(),
            faults: cfg.faults.clone(),
        });
        tokio::spawn(accept_loop(endpoint.clone(), inbound));
        Ok(Self {
            endpoint,
            links,
            metrics,
            faults: cfg.faults.clone(),
        })
    }

    /// Queue a Raft message for its peer; dropped (and counted) if the queue is full.
    pub fn send(&self, m: Message) {
        if self.faults.as_ref().is_some_and(|f| f.isolated()) {
            return;
        }
        let Some(link) = self.links.get(&m.to) else {
            self.metrics.messages_dropped.inc();
            return;
        };
        if link.try_send(m).is_err() {
            self.metrics.messages_dropped.inc();
        }
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Close every connection and wait briefly for the peers to hear it.
    pub async fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}

/// One outbound link to a peer.
struct Link {
    endpoint: Endpoint,
    me: NodeId,
    incarnation: u64,
    peer: NodeId,
    addr: SocketAddr,
    max_frame: usize,
}

impl Link {
    async fn run(self, mut rx: mpsc::Receiver<Message>, redial: Arc<Notify>, metrics: NodeMetrics) {
        let mut backoff = Duration::from_millis(20);
        let mut failures = 0u32;
        loop {
            match self.connect().await {
                Ok(conn) => {
                    if failures > 0 {
                        tracing::info!(peer = %node_name(self.peer), "connected after {failures} failed attempts");
                    }
                    failures = 0;
                    backoff = Duration::from_millis(20);
                    if !self.pump(&conn, &mut rx, &redial, &metrics).await {
                        return;
                    }
                    conn.close(VarInt::from_u32(0), b"redial");
                }
                Err(e) if e.contains("endpoint stopping") => return,
                Err(e) => {
                    failures += 1;
                    // Log the first failure and then every 50th, not every retry.
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(peer = %node_name(self.peer), addr = %self.addr, "cannot connect: {e}");
                    }
                }
            }
            // Messages queued while disconnected are stale; Raft resends what matters.
            while rx.try_recv().is_ok() {
                metrics.messages_dropped.inc();
            }
            tokio::select! {
                () = tokio::time::sleep(jitter(backoff)) => {}
                () = redial.notified() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let name = certs::server_name(&node_name(self.peer));
        let connecting = self
            .endpoint
            .connect(self.addr, &name)
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    /// Forward queued messages until the connection fails (false: the node is stopping).
    async fn pump(
        &self,
        conn: &Connection,
        rx: &mut mpsc::Receiver<Message>,
        redial: &Notify,
        metrics: &NodeMetrics,
    ) -> bool {
        let mut raft = None;
        let mut snapshots = None;
        loop {
            let m = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return false,
                },
                () = redial.notified() => return true,
                _ = conn.closed() => return true,
            };
            let slot = if matches!(m.body, MessageBody::InstallSnapshot { .. }) {
                &mut snapshots
            } else {
                &mut raft
            };
            if slot.is_none() {
                match self.open_stream(conn).await {
                    Ok(s) => *slot = Some(s),
                    Err(e) => {
                        tracing::debug!(peer = %node_name(self.peer), "open stream: {e}");
                        metrics.messages_dropped.inc();
                        return true;
                    }
                }
            }
            let Some(stream) = slot.as_mut() else {
                return true;
            };
            if let Err(e) = write_frame(stream, &Frame::Raft(m), self.max_frame).await {
                tracing::debug!(peer = %node_name(self.peer), "send: {e}");
                metrics.messages_dropped.inc();
                return true;
            }
        }
    }

    async fn open_stream(&self, conn: &Connection) -> Result<quinn::SendStream, StreamError> {
        let mut stream = conn
            .open_uni()
            .await
            .map_err(|e| StreamError::Write(e.into()))?;
        let hello = Frame::Hello {
            node: self.me,
            incarnation: self.incarnation,
        };
        write_frame(&mut stream, &hello, self.max_frame).await?;
        Ok(stream)
    }
}

/// A random delay in [d/2, d], from the standard library's per-process random hasher
/// state (no RNG dependency for a jitter).
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let frac = (h.finish() % 1000) as u32;
    d / 2 + d * frac / 2000
}

async fn accept_loop(endpoint: Endpoint, inbound: Arc<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(handle_connection(incoming, inbound.clone()));
    }
}

/// Classify a handshake failure for the metric and the log. A certificate not signed by
/// the cluster CA shows up as an unknown issuer, or (when another CA uses the same
/// name) as a bad signature.
pub fn refusal_reason(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if [
        "unknownissuer",
        "unknown issuer",
        "unknown ca",
        "badsignature",
        "bad signature",
    ]
    .iter()
    .any(|s| e.contains(s))
    {
        "unknown_ca"
    } else if e.contains("expired") {
        "expired"
    } else if e.contains("no certificates") || e.contains("certificate required") {
        "no_client_cert"
    } else if e.contains("no_application_protocol")
        || e.contains("no application protocol")
        || e.contains("alpn")
    {
        "alpn"
    } else {
        "handshake"
    }
}

async fn handle_connection(incoming: quinn::Incoming, inbound: Arc<Inbound>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            let error = e.to_string();
            if matches!(
                e,
                quinn::ConnectionError::TimedOut | quinn::ConnectionError::ApplicationClosed(_)
            ) || error.contains("aborted by peer")
            {
                // The peer gave up (it was stopping or redialling): nothing was refused.
                tracing::debug!(%remote, "handshake abandoned by the peer: {error}");
                return;
            }
            let reason = refusal_reason(&error);
            inbound.metrics.refuse_connection(reason);
            tracing::warn!(%remote, reason, "refused connection: {error}");
            return;
        }
    };
    let identity = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().and_then(|c| certs::identity_of(c).ok()));
    let Some(identity) = identity else {
        inbound.metrics.refuse_connection("no_identity");
        tracing::warn!(%remote, reason = "no_identity", "refused connection: certificate names no node or client");
        conn.close(VarInt::from_u32(CODE_IDENTITY), b"no identity");
        return;
    };
    let node = match identity.kind {
        PeerKind::Node => parse_node_name(&identity.name),
        PeerKind::Client => None,
    };
    tracing::debug!(%remote, peer = %identity.name, "accepted connection");
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(stream) => {
                    let Some(node) = node else {
                        inbound.metrics.reject_frame("unexpected");
                        let mut reader = FrameReader::new(stream, inbound.max_frame);
                        reader.stop(CODE_UNEXPECTED);
                        continue;
                    };
                    tokio::spawn(read_raft_stream(FrameReader::new(stream, inbound.max_frame), conn.clone(), node, inbound.clone()));
                }
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    tokio::spawn(serve_call(send, FrameReader::new(recv, inbound.max_frame), inbound.clone()));
                }
                Err(_) => return,
            },
        }
    }
}

impl Inbound {
    /// A peer announced itself. If it is a new incarnation of a peer we knew, it
    /// restarted and our link to it holds a dead connection: redial now rather than after
    /// the idle timeout.
    fn note_incarnation(&self, node: NodeId, incarnation: u64) {
        let previous = {
            let mut known = self.incarnations.lock().unwrap_or_else(|p| p.into_inner());
            known.insert(node, incarnation)
        };
        if previous.is_some_and(|p| p != incarnation) {
            if let Some(redial) = self.redial.get(&node) {
                tracing::info!(peer = %node_name(node), "peer restarted; redialling it");
                redial.notify_one();
            }
        }
    }
}

/// A number that differs between two runs of this process.
fn new_incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

fn refuse_identity(conn: &Connection, inbound: &Inbound, cert_node: NodeId, claimed: NodeId) {
    inbound.metrics.refuse_connection("identity_mismatch");
    tracing::warn!(
        remote = %conn.remote_address(),
        reason = "identity_mismatch",
        "refused connection: certificate of {} but claims to be {}",
        node_name(cert_node),
        node_name(claimed)
    );
    conn.close(
        VarInt::from_u32(CODE_IDENTITY),
        b"identity does not match certificate",
    );
}

async fn read_raft_stream(
    mut reader: FrameReader,
    conn: Connection,
    node: NodeId,
    inbound: Arc<Inbound>,
) {
    let mut greeted = false;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(StreamError::Read(_)) => return,
            Err(e) => {
                inbound.metrics.reject_frame(e.reason());
                tracing::warn!(peer = %node_name(node), reason = e.reason(), "closed a stream: {e}");
                reader.stop(CODE_MALFORMED);
                return;
            }
        };
        match frame {
            Frame::Hello {
                node: claimed,
                incarnation,
            } if !greeted => {
                if claimed != node {
                    refuse_identity(&conn, &inbound, node, claimed);
                    return;
                }
                inbound.note_incarnation(node, incarnation);
                greeted = true;
            }
            Frame::Raft(m) if greeted => {
                if m.from != node || m.to != inbound.id {
                    refuse_identity(&conn, &inbound, node, m.from);
                    return;
                }
                if inbound.faults.as_ref().is_some_and(|f| f.isolated()) {
                    continue;
                }
                if inbound.raft_tx.try_send(m).is_err() {
                    inbound.metrics.messages_dropped.inc();
                }
            }
            _ => {
                inbound.metrics.reject_frame("unexpected");
                tracing::warn!(peer = %node_name(node), "closed a stream: unexpected frame");
                reader.stop(CODE_UNEXPECTED);
                return;
            }
        }
    }
}

async fn serve_call(mut send: quinn::SendStream, mut reader: FrameReader, inbound: Arc<Inbound>) {
    let request = match reader.next().await {
        Ok(Some(Frame::Request(req))) => req,
        Ok(_) => {
            inbound.metrics.reject_frame("unexpected");
            reader.stop(CODE_UNEXPECTED);
            return;
        }
        Err(e) => {
            inbound.metrics.reject_frame(e.reason());
            reader.stop(CODE_MALFORMED);
            return;
        }
    };
    let fate = match (&inbound.faults, &request) {
        (Some(f), ClientRequest::Propose(bytes)) => f.fate(bytes, true),
        _ => AnswerFate::Send,
    };
    let (tx, rx) = oneshot::channel();
    let response = if inbound.client_tx.try_send((request, tx)).is_err() {
        ClientResponse::Error {
            message: "node is overloaded".into(),
            retry: true,
        }
    } else {
        let stopped = send.stopped();
        tokio::select! {
            answer = tokio::time::timeout(CALL_TIMEOUT, rx) => match answer {
                Ok(Ok(r)) => r,
                // The driver may have proposed the call before it stopped.
                Ok(Err(_)) => ClientResponse::Unknown {
                    message: "node stopped before answering".into(),
                },
                Err(_) => ClientResponse::Unknown {
                    message: "no answer in time".into(),
                },
            },
            // The caller closed the stream: dropping the answer channel tells the driver,
            // which cancels the call in the node core.
            _ = stopped => return,
        }
    };
    if let AnswerFate::Hold(mut lost) = fate {
        // Carried out, answer lost: the caller sees the stream reset, nothing else.
        let _ = lost.changed().await;
        let _ = send.reset(VarInt::from_u32(CODE_ANSWER_LOST));
        return;
    }
    if write_frame(&mut send, &Frame::Response(response), inbound.max_frame)
        .await
        .is_ok()
    {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}
