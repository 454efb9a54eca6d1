//! Cluster certificates and the rustls configurations built from them.
//!
//! One cluster CA (ECDSA P-256) signs every certificate. Identities live in DNS SANs:
//! a node `node1` carries `node1`, `node1.node.syncmesh`, `localhost` and `127.0.0.1`;
//! a client `gateway` carries `gateway.client.syncmesh`. Peers dial nodes by
//! `<id>.node.syncmesh`, so rustls checks the server's identity, and read the client's
//! identity from its certificate, never from what it says.
//!
//! ```text
//!  certs dir/  ca.pem ca.key  node1.pem node1.key ...  gateway.pem gateway.key  admin.pem admin.key
//! ```
//! Private keys are written with mode 0600. An existing CA is never replaced without
//! `force`, since doing so invalidates every certificate of the cluster.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

/// The ALPN protocol of the mesh; its suffix is the wire version.
pub const ALPN: &[u8] = b"syncmesh/1";
const NODE_SUFFIX: &str = ".node.syncmesh";
const CLIENT_SUFFIX: &str = ".client.syncmesh";
const CA_NAME: &str = "syncmesh cluster CA";

/// Everything that can go wrong with certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// File-system failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A name that cannot be an identity.
    #[error("invalid name {0:?}: use 1-63 lower-case letters, digits or '-'")]
    InvalidName(String),
    /// The CA exists and replacing it was not asked for.
    #[error("a cluster CA already exists in {0}; pass --force to replace it (this invalidates every certificate)")]
    CaExists(PathBuf),
    /// A certificate to be made exists already.
    #[error("{0} exists; pass --force to replace it")]
    CertExists(PathBuf),
    /// No CA to sign with.
    #[error("no cluster CA in {0}: run `syncmesh certs init` first")]
    NoCa(PathBuf),
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file that does not parse.
    #[error("{path}: {detail}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// A peer certificate that names no syncmesh identity.
    #[error("certificate names no syncmesh node or client")]
    NoIdentity,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CertError {
    let context = context.into();
    move |source| CertError::Io { context, source }
}

/// Whether a certificate belongs to a node or a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A cluster node (server and client).
    Node,
    /// A client: gateway, CLI.
    Client,
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Node or client.
    pub kind: PeerKind,
    /// `node1`, `gateway`, ...
    pub name: String,
}

/// How to issue certificates.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Extra SANs for node certificates (DNS names or IP addresses).
    pub extra_sans: Vec<String>,
    /// Replace existing files.
    pub force: bool,
}

impl IssueOptions {
    /// Valid from an hour ago (clock skew) for `days` days.
    pub fn valid_for_days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
            extra_sans: Vec::new(),
            force: false,
        }
    }
}

/// The DNS name a node is dialed by.
pub fn server_name(node: &str) -> String {
    format!("{node}{NODE_SUFFIX}")
}

/// Check that `name` can be an identity (it becomes part of a DNS name).
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName(name.to_string()))
    }
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Write a file, private keys with mode 0600. Refuses to overwrite unless `force`.
fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CertError> {
    if path.exists() && !force {
        return Err(CertError::CertExists(path.to_path_buf()));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut file = opts
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("write {}", path.display())))
}

/// Make a new CA in `dir`. Refuses if one exists, unless `opts.force`.
pub fn init_ca(dir: &Path, opts: &IssueOptions) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() && !opts.force {
        return Err(CertError::CaExists(dir.to_path_buf()));
    }
    let mut params = ca_params()?;
    params.not_before = opts.not_before;
    params.not_after = opts.not_after + Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&dir.join("ca.key"), &key.serialize_pem(), true, true)?;
    write_file(&ca_pem, &cert.pem(), false, true)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key_path = dir.join("ca.key");
    if !key_path.exists() {
        return Err(CertError::NoCa(dir.to_path_buf()));
    }
    let pem =
        std::fs::read_to_string(&key_path).map_err(io(format!("read {}", key_path.display())))?;
    let key = KeyPair::from_pem(&pem).map_err(|e| CertError::BadPem {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    // The CA's subject is fixed, so rebuilding its parameters around its key yields an
    // issuer whose name and key identifier match ca.pem.
    Ok(Issuer::new(ca_params()?, key))
}

/// Issue a certificate for a node or client, signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    kind: PeerKind,
    name: &str,
    opts: &IssueOptions,
) -> Result<PathBuf, CertError> {
    validate_name(name)?;
    let issuer = load_issuer(dir)?;
    let pem_path = dir.join(format!("{name}.pem"));
    if pem_path.exists() && !opts.force {
        return Err(CertError::CertExists(pem_path));
    }
    let sans = match kind {
        PeerKind::Node => {
            let mut s = vec![
                name.to_string(),
                server_name(name),
                "localhost".into(),
                "127.0.0.1".into(),
            ];
            s.extend(opts.extra_sans.iter().cloned());
            s
        }
        PeerKind::Client => vec![format!("{name}{CLIENT_SUFFIX}")],
    };
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        PeerKind::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        PeerKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = opts.not_before;
    params.not_after = opts.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(
        &dir.join(format!("{name}.key")),
        &key.serialize_pem(),
        true,
        true,
    )?;
    write_file(&pem_path, &cert.pem(), false, true)?;
    Ok(pem_path)
}

/// The identity a (verified) certificate carries.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, CertError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|_| CertError::NoIdentity)?;
    for name in ee.valid_dns_names() {
        if let Some(node) = name.strip_suffix(NODE_SUFFIX) {
            return Ok(Identity {
                kind: PeerKind::Node,
                name: node.to_string(),
            });
        }
        if let Some(client) = name.strip_suffix(CLIENT_SUFFIX) {
            return Ok(Identity {
                kind: PeerKind::Client,
                name: client.to_string(),
            });
        }
    }
    Err(CertError::NoIdentity)
}

/// A holder's certificate chain and key, plus the cluster CA.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The CA certificates to trust.
    pub ca: Vec<CertificateDer<'static>>,
    /// Our certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// Load `name.pem`, `name.key` and `ca.pem` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, CertError> {
        Self::load_files(
            &dir.join("ca.pem"),
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
        )
    }

    /// Load from explicit paths.
    pub fn load_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, CertError> {
        let bad = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls::pki_types::pem::Error| CertError::BadPem {
                path,
                detail: e.to_string(),
            }
        };
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, CertError> {
            let list = CertificateDer::pem_file_iter(path)
                .map_err(bad(path))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad(path))?;
            if list.is_empty() {
                return Err(CertError::BadPem {
                    path: path.to_path_buf(),
                    detail: "no certificate in file".into(),
                });
            }
            Ok(list)
        };
        Ok(Self {
            ca: certs(ca)?,
            chain: certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(bad(key))?,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, CertError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// A TLS 1.3 server config that requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| CertError::Verifier(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tls)
    }

    /// A TLS 1.3 client config that trusts only the cluster CA and presents our certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tls)
    }
}

/// Make what a local cluster needs in `dir`, keeping whatever already exists: the CA if
/// missing, node certificates `nodes`, client certificates `clients`. Returns the files made.
pub fn ensure_cluster(
    dir: &Path,
    nodes: &[String],
    clients: &[String],
    days: u32,
) -> Result<Vec<PathBuf>, CertError> {
    let opts = IssueOptions::valid_for_days(days);
    let mut made = Vec::new();
    if !dir.join("ca.pem").exists() {
        init_ca(dir, &opts)?;
        made.push(dir.join("ca.pem"));
    }
    for (kind, names) in [(PeerKind::Node, nodes), (PeerKind::Client, clients)] {
        for name in names {
            if !dir.join(format!("{name}.pem")).exists() {
                made.push(issue(dir, kind, name, &opts)?);
            }
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("syncmesh-certs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn cluster_certificates_carry_identities_and_build_tls_configs() {
        let dir = temp_dir("cluster");
        let made = ensure_cluster(
            &dir,
            &["node1".into(), "node2".into()],
            &["gateway".into()],
            30,
        )
        .expect("certs");
        assert_eq!(made.len(), 4);
        assert!(
            ensure_cluster(&dir, &["node1".into()], &[], 30)
                .expect("again")
                .is_empty(),
            "reused"
        );
        let node = TlsMaterial::load(&dir, "node1").expect("load node1");
        assert_eq!(
            identity_of(&node.chain[0]).expect("identity"),
            Identity {
                kind: PeerKind::Node,
                name: "node1".into()
            }
        );
        let gw = TlsMaterial::load(&dir, "gateway").expect("load gateway");
        assert_eq!(
            identity_of(&gw.chain[0]).expect("identity").kind,
            PeerKind::Client
        );
        node.server_config().expect("server config");
        node.client_config().expect("client config");
        gw.client_config().expect("client config");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("node1.key"))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "private keys are 0600");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn existing_ca_is_never_replaced_without_force() {
        let dir = temp_dir("force");
        let opts = IssueOptions::valid_for_days(1);
        init_ca(&dir, &opts).expect("first");
        let before = std::fs::read(dir.join("ca.pem")).expect("read");
        assert!(matches!(init_ca(&dir, &opts), Err(CertError::CaExists(_))));
        assert_eq!(std::fs::read(dir.join("ca.pem")).expect("read"), before);
        init_ca(
            &dir,
            &IssueOptions {
                force: true,
                ..opts
            },
        )
        .expect("forced");
        assert_ne!(std::fs::read(dir.join("ca.pem")).expect("read"), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_names_and_missing_ca_are_clear_errors() {
        for bad in ["", "Node1", "node_1", "-x", "a.b", &"x".repeat(64)] {
            assert!(
                matches!(validate_name(bad), Err(CertError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let dir = temp_dir("noca");
        let err = issue(
            &dir,
            PeerKind::Node,
            "node1",
            &IssueOptions::valid_for_days(1),
        )
        .expect_err("no CA");
        assert!(err.to_string().contains("certs init"), "{err}");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("ca.pem"), "not pem").expect("write");
        std::fs::write(dir.join("x.pem"), "not pem").expect("write");
        std::fs::write(dir.join("x.key"), "not pem").expect("write");
        assert!(TlsMaterial::load(&dir, "x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
