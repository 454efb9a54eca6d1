//! The mesh refuses what it must: foreign, missing, expired and impersonating
//! certificates, and garbage on its streams, without ever going down.

use crate::support::{syncmesh, TempDir, TestCluster};
use certs::{IssueOptions, PeerKind, TlsMaterial};
use mesh_core::wire::{self, Frame, MAX_FRAME_BYTES};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn client_endpoint(tls: rustls::ClientConfig) -> quinn::Endpoint {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic client config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

/// Connect and try one call; the server may refuse during or right after the handshake.
async fn attempt(ep: &quinn::Endpoint, addr: SocketAddr, node: &str) -> Result<(), String> {
    let conn = ep
        .connect(addr, &certs::server_name(node))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = Frame::Request(wire::ClientRequest::Read(vec![]));
    send.write_all(&wire::encode(&req, MAX_FRAME_BYTES).expect("encode"))
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let got = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20)).await;
    match got {
        Ok(Ok(bytes)) if !bytes.is_empty() => Ok(()),
        Ok(Ok(_)) => Err("empty answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Wait until node `i`'s metrics show a refusal for `reason`, and its log says why.
fn assert_refused(c: &TestCluster, i: usize, reason: &str) {
    let start = Instant::now();
    let needle = format!("reason=\"{reason}\"");
    loop {
        let metrics = c.metrics(i);
        let counted = metrics
            .lines()
            .any(|l| l.starts_with("mesh_connections_refused_total") && l.contains(&needle));
        if counted && c.log(i).contains(reason) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no refusal for {reason}.\nmetrics:\n{}\nlog:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("refused"))
                .collect::<Vec<_>>()
                .join("\n"),
            c.log(i)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn material(ca: &std::path::Path, dir: &std::path::Path, name: &str) -> TlsMaterial {
    TlsMaterial::load_files(
        ca,
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
    .expect("load")
}

#[test]
fn bad_certificates_are_refused_with_the_reason_logged_and_counted() {
    let mut c = TestCluster::start("certs", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let rt = runtime();
    let _entered = rt.enter();
    let ca = c.certs_dir().join("ca.pem");
    let addr = c.nodes[0].quic;

    // A valid client works, so the failures below are about the certificates.
    let good = client_endpoint(
        material(&ca, &c.certs_dir(), "admin")
            .client_config()
            .expect("config"),
    );
    rt.block_on(attempt(&good, addr, "node1"))
        .expect("the admin certificate is accepted");

    // 1. A client certificate from another CA (it trusts ours, so the server must refuse).
    let other = TempDir::new("other-ca");
    let out = syncmesh()
        .args(["certs", "init", "--nodes", "1", "--dir"])
        .arg(&other.0)
        .output()
        .expect("certs");
    assert!(out.status.success());
    let foreign = client_endpoint(
        material(&ca, &other.0, "admin")
            .client_config()
            .expect("config"),
    );
    assert!(
        rt.block_on(attempt(&foreign, addr, "node1")).is_err(),
        "foreign CA accepted"
    );
    assert_refused(&c, 0, "unknown_ca");

    // 2. No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for cert in material(&ca, &c.certs_dir(), "admin").ca {
        roots.add(cert).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![certs::ALPN.to_vec()];
    assert!(
        rt.block_on(attempt(&client_endpoint(anonymous), addr, "node1"))
            .is_err(),
        "no cert accepted"
    );
    assert_refused(&c, 0, "no_client_cert");

    // 3. An expired certificate signed by the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = IssueOptions {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
        extra_sans: vec![],
        force: false,
    };
    certs::issue(&c.certs_dir(), PeerKind::Client, "stale", &expired).expect("issue expired");
    let stale = client_endpoint(
        material(&ca, &c.certs_dir(), "stale")
            .client_config()
            .expect("config"),
    );
    assert!(
        rt.block_on(attempt(&stale, addr, "node1")).is_err(),
        "expired accepted"
    );
    assert_refused(&c, 0, "expired");

    // 4. node2's certificate, claiming to be node1, talking to node3.
    let node2 = client_endpoint(
        material(&ca, &c.certs_dir(), "node2")
            .client_config()
            .expect("config"),
    );
    rt.block_on(async {
        let conn = node2
            .connect(c.nodes[2].quic, &certs::server_name("node3"))
            .expect("connect")
            .await
            .expect("tls ok");
        let mut s = conn.open_uni().await.expect("uni");
        let hello = wire::encode(
            &Frame::Hello {
                node: 1,
                incarnation: 1,
            },
            MAX_FRAME_BYTES,
        )
        .expect("encode");
        s.write_all(&hello).await.expect("write");
        let closed = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
        assert!(closed.is_ok(), "impersonating connection was not closed");
    });
    assert_refused(&c, 2, "identity_mismatch");

    // Through all of it the cluster kept serving.
    c.wait_for_leader(Duration::from_secs(5));
    c.put("still", "serving");
    assert_eq!(c.get("still").as_deref(), Some("serving"));
}

#[test]
fn random_bytes_and_oversized_frames_leave_the_node_serving() {
    let mut c = TestCluster::start("garbage", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let rt = runtime();
    let _entered = rt.enter();
    let ca = c.certs_dir().join("ca.pem");
    let admin = client_endpoint(
        material(&ca, &c.certs_dir(), "admin")
            .client_config()
            .expect("config"),
    );
    let node2 = client_endpoint(
        material(&ca, &c.certs_dir(), "node2")
            .client_config()
            .expect("config"),
    );
    rt.block_on(async {
        let conn = admin
            .connect(c.nodes[0].quic, &certs::server_name("node1"))
            .expect("connect")
            .await
            .expect("tls");
        let mut seed = 0x1234_5678_9abc_def0u64;
        for round in 0..50 {
            let (mut send, mut recv) = conn.open_bi().await.expect("bi");
            let junk: Vec<u8> = (0..(round * 97) % 4096 + 1)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = send.write_all(&junk).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), recv.read_to_end(1 << 20)).await;
        }
        // A frame announcing 1 GiB on a Raft stream, from a genuine node certificate.
        let conn = node2
            .connect(c.nodes[0].quic, &certs::server_name("node1"))
            .expect("connect")
            .await
            .expect("tls");
        let mut s = conn.open_uni().await.expect("uni");
        let mut bytes = wire::encode(
            &Frame::Hello {
                node: 2,
                incarnation: 1,
            },
            MAX_FRAME_BYTES,
        )
        .expect("encode");
        bytes.extend_from_slice(&(1u32 << 30).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 1024]);
        let _ = s.write_all(&bytes).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let metrics = c.metrics(0);
    let rejected = |reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("mesh_frames_rejected_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
    };
    assert!(rejected("oversized"), "{metrics}");
    assert!(
        rejected("malformed") || rejected("version") || rejected("empty") || rejected("truncated"),
        "{metrics}"
    );
    assert_eq!(c.health(0).expect("node1 still serves")["ok"], true);
    c.wait_for_leader(Duration::from_secs(5));
    c.put("after", "garbage");
    assert_eq!(c.get("after").as_deref(), Some("garbage"));
}
