//! mTLS for keyd's API: rustls configurations built from PEM files, the peer's identity read
//! from its verified client certificate, and hot reload of the server's certificate.
//!
//! Every client must present a certificate chained to keyd's CA; there are no anonymous
//! clients. Who the client is comes from the one `spiffe://keyd/...` URI SAN in that
//! certificate (see [`keyd_proto::identity`]).
//!
//! The webhook serves with the same code: [`serving_config`] and [`watch_server_config`] take a
//! [`ServerTlsPaths`], whose client CA is optional (the Kubernetes API server usually presents
//! no client certificate). keyd's own listener always passes one.
//!
//! The only crypto provider is aws-lc-rs. Configs are built with
//! `builder_with_provider(provider())`, so they never depend on a process default; the default
//! is still installed by [`install_default_provider`] for libraries that look it up.

use std::fmt;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use keyd_proto::identity::Identity;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

/// The one crypto provider (aws-lc-rs), shared by every config this process builds.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default. Idempotent: a second call (or a call after
/// someone else installed one) changes nothing.
pub fn install_default_provider() {
    // `install_default` fails only when a default is already installed. keyd never installs
    // any other provider, so whatever is there is ours from an earlier call.
    let _ = CryptoProvider::install_default(CryptoProvider::clone(&provider()));
}

/// Where one side's TLS material lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The CA certificate(s) the peer must chain to (PEM).
    pub ca: PathBuf,
    /// This side's certificate chain, end entity first (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Where a server's TLS material lives on disk; without `client_ca`, clients are not asked for a
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsPaths {
    /// This server's certificate chain, end entity first (PEM).
    pub cert: PathBuf,
    /// This server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) a client's certificate must chain to (PEM); `None` asks for none.
    pub client_ca: Option<PathBuf>,
}

/// keyd's server: mTLS, clients chained to `ca`.
impl From<TlsPaths> for ServerTlsPaths {
    fn from(paths: TlsPaths) -> Self {
        ServerTlsPaths {
            cert: paths.cert,
            key: paths.key,
            client_ca: Some(paths.ca),
        }
    }
}

/// Which of the three files an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    CaCertificate,
    Certificate,
    PrivateKey,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::CaCertificate => "CA certificate",
            FileRole::Certificate => "certificate",
            FileRole::PrivateKey => "private key",
        })
    }
}

/// Building a TLS configuration failed. Messages name the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {role} file {}", path.display())]
    Read {
        role: FileRole,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{role} file {} is not valid PEM", path.display())]
    Pem {
        role: FileRole,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{role} file {} holds no certificate", path.display())]
    NoCertificate { role: FileRole, path: PathBuf },
    #[error("CA certificate in {} is not a usable trust anchor", path.display())]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client-certificate verifier from {}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} and private key {} are not a usable pair", cert.display(), key.display())]
    CertifiedKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the crypto provider supports none of the default TLS versions")]
    ProtocolVersions(#[source] rustls::Error),
    #[error("the reload interval must be greater than zero")]
    ZeroInterval,
}

/// Why a verified peer certificate does not name exactly one keyd identity.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PeerIdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate cannot be parsed")]
    Unparsable,
    #[error("the peer certificate carries no spiffe://keyd/ URI")]
    NoIdentity,
    #[error("the peer certificate names {} identities ({}); exactly one is allowed", .0.len(), join(.0))]
    Ambiguous(Vec<Identity>),
    #[error("the peer certificate carries an invalid keyd identity: {0}")]
    Invalid(String),
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A server config that requires a client certificate chained to `paths.ca`, serves
/// `paths.cert`/`paths.key`, and offers ALPN `h2` then `http/1.1`.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    serving_config(&paths.clone().into())
}

/// A server config serving `paths.cert`/`paths.key` with ALPN `h2` then `http/1.1`. With
/// `paths.client_ca`, a client certificate chained to it is required; without, none is asked for.
pub fn serving_config(paths: &ServerTlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?;
    let builder = match &paths.client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            // `build()` without `allow_unauthenticated()`: a handshake without a client
            // certificate fails.
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let (chain, key) = cert_and_key(&paths.cert, &paths.key)?;
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::CertifiedKey {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
                source,
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config presenting `paths.cert`/`paths.key` and trusting only `paths.ca`; ALPN
/// `http/1.1`.
pub fn client_config(paths: &TlsPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(&paths.ca)?;
    let (chain, key) = cert_and_key(&paths.cert, &paths.key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::CertifiedKey {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The identity of a verified peer, from its end-entity certificate (`chain[0]`): its URI SANs
/// must hold exactly one `spiffe://keyd/...` identity. Other URIs are ignored; a malformed keyd
/// URI is an error rather than skipped, so a typo never silently falls back to another URI.
///
/// This reads names only; the chain must already have been verified (by the TLS handshake).
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, PeerIdentityError> {
    let end_entity = chain.first().ok_or(PeerIdentityError::NoCertificate)?;
    let (rest, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|_| PeerIdentityError::Unparsable)?;
    if !rest.is_empty() {
        return Err(PeerIdentityError::Unparsable);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerIdentityError::Unparsable)?;
    let mut found = Vec::new();
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            match Identity::parse_uri(uri) {
                Ok(Some(id)) => found.push(id),
                Ok(None) => {}
                Err(e) => return Err(PeerIdentityError::Invalid(e.to_string())),
            }
        }
    }
    match found.len() {
        0 => Err(PeerIdentityError::NoIdentity),
        1 => Ok(found.remove(0)),
        _ => Err(PeerIdentityError::Ambiguous(found)),
    }
}

/// Loads the server config once (its error is returned) and then polls its files every
/// `interval`. When a file's modification time, change time, size or inode changes, the config
/// is rebuilt and sent on the channel; when the rebuild fails (say the certificate was replaced
/// but the key not yet), a warning is logged and the previous config keeps being served. The
/// next change is tried again.
///
/// The task ends when every receiver is dropped.
///
/// # Panics
/// Outside a Tokio runtime (it spawns the poller).
pub fn watch_server_config(
    paths: impl Into<ServerTlsPaths>,
    interval: Duration,
) -> Result<(watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>), TlsError> {
    let paths = paths.into();
    if interval.is_zero() {
        return Err(TlsError::ZeroInterval);
    }
    // Fingerprint before reading: a change that lands during the read shows up as a difference
    // at the next poll, so it is never missed.
    let mut seen = Fingerprint::of(&paths);
    let (tx, rx) = watch::channel(serving_config(&paths)?);
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = ticker.tick() => {}
            }
            let poll_paths = paths.clone();
            let previous = seen.clone();
            let polled =
                tokio::task::spawn_blocking(move || poll_once(&poll_paths, &previous)).await;
            match polled {
                Ok(None) => {}
                Ok(Some((fingerprint, Ok(config)))) => {
                    seen = fingerprint;
                    tx.send_replace(config);
                    tracing::info!(cert = %paths.cert.display(), "reloaded the TLS server configuration");
                }
                Ok(Some((fingerprint, Err(error)))) => {
                    seen = fingerprint;
                    tracing::warn!(
                        error = %ErrorChain(&error),
                        cert = %paths.cert.display(),
                        "TLS files changed but cannot be loaded; keeping the previous configuration"
                    );
                }
                Err(join) if join.is_cancelled() => return,
                Err(join) => {
                    tracing::warn!(error = %join, "TLS reload check failed; will retry");
                }
            }
        }
    });
    Ok((rx, task))
}

/// One poll: `None` when nothing changed, otherwise the new fingerprint and the rebuild result.
fn poll_once(
    paths: &ServerTlsPaths,
    previous: &Fingerprint,
) -> Option<(Fingerprint, Result<Arc<ServerConfig>, TlsError>)> {
    let now = Fingerprint::of(paths);
    if now == *previous {
        return None;
    }
    Some((now, serving_config(paths)))
}

/// What the poller compares: certificate, key and client CA (`None` when there is none). A
/// missing file is a state of its own (`None`), so its return is a change. The inode catches an
/// atomic rename (and Kubernetes' `..data` symlink swap, since `metadata` follows symlinks);
/// ctime catches a rewrite that preserved mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([Option<FileStamp>; 3]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    ctime: (i64, i64),
    len: u64,
    dev: u64,
    ino: u64,
}

impl Fingerprint {
    fn of(paths: &ServerTlsPaths) -> Self {
        let stamp = |path: &Path| {
            std::fs::metadata(path).ok().map(|m| FileStamp {
                modified: m.modified().ok(),
                ctime: (m.ctime(), m.ctime_nsec()),
                len: m.len(),
                dev: m.dev(),
                ino: m.ino(),
            })
        };
        Fingerprint([
            stamp(&paths.cert),
            stamp(&paths.key),
            paths.client_ca.as_deref().and_then(stamp),
        ])
    }
}

/// Displays an error with its sources, `a: b: c`, for log lines.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(FileRole::CaCertificate, path)? {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn cert_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = read_certs(FileRole::Certificate, cert)?;
    let key = read_key(key)?;
    Ok((chain, key))
}

fn read_certs(role: FileRole, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        role,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            role,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            role,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let role = FileRole::PrivateKey;
    let pem = read_secret(path).map_err(|source| TlsError::Read {
        role,
        path: path.to_owned(),
        source,
    })?;
    // `PrivateKeyDer` zeroizes its own buffer; `pem` is zeroized when it drops here.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        role,
        path: path.to_owned(),
        source,
    })
}

/// Reads a secret file into a buffer that is zeroized on drop. The buffer is sized from the
/// file's length up front so that it does not reallocate (which would leave an unzeroized copy
/// behind) unless the file grows while being read.
pub(crate) fn read_secret(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
    let mut buf = Zeroizing::new(Vec::with_capacity(len.saturating_add(1)));
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::pki::{CertificateAuthority, DevPki, TlsPathsPair, ensure_dev_pki};

    const RELOAD: Duration = Duration::from_millis(50);

    fn dev_pki(dir: &Path) -> DevPki {
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        ensure_dev_pki(dir, &names, &["worker-1"]).unwrap()
    }

    fn paths(pki: &DevPki, pair: &TlsPathsPair) -> TlsPaths {
        TlsPaths {
            ca: pki.ca.clone(),
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        }
    }

    fn node_pair(pki: &DevPki) -> &TlsPathsPair {
        &pki.nodes.iter().find(|(n, _)| n == "worker-1").unwrap().1
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    /// What each side of one connection saw.
    struct Outcome {
        /// The server side: the client's certificate chain after a successful handshake.
        server: io::Result<Vec<CertificateDer<'static>>>,
        /// The client side: the server's end-entity certificate and the bytes it then sent.
        client: io::Result<(CertificateDer<'static>, Vec<u8>)>,
    }

    /// One connection over loopback. The server accepts, sends `hello` and closes. The client
    /// reads to the end: with TLS 1.3 the client's handshake completes before the server has
    /// checked the client certificate, so a rejection reaches the client only on that read.
    async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server);
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .to_vec();
            tls.write_all(b"hello").await?;
            tls.shutdown().await?;
            Ok::<_, io::Error>(chain)
        });
        let client_side = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
            let served = tls.get_ref().1.peer_certificates().unwrap()[0]
                .clone()
                .into_owned();
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await?;
            Ok((served, buf))
        };
        let client = tokio::time::timeout(Duration::from_secs(5), client_side)
            .await
            .unwrap();
        let server = tokio::time::timeout(Duration::from_secs(5), server_side)
            .await
            .unwrap()
            .unwrap();
        Outcome { server, client }
    }

    async fn connect_as(pki: &DevPki, server: Arc<ServerConfig>, pair: &TlsPathsPair) -> Outcome {
        connect(server, client_config(&paths(pki, pair)).unwrap()).await
    }

    #[tokio::test]
    async fn node_and_admin_certificates_are_accepted_with_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let server = server_config(&paths(&pki, &pki.server)).unwrap();
        assert_eq!(
            server.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let node = connect_as(&pki, server.clone(), node_pair(&pki)).await;
        let chain = node.server.unwrap();
        assert_eq!(
            peer_identity(&chain).unwrap(),
            Identity::Node("worker-1".into())
        );
        let (served, body) = node.client.unwrap();
        assert_eq!(served, cert_der(&pki.server.cert));
        assert_eq!(body, b"hello");

        let admin = connect_as(&pki, server, &pki.admin).await;
        assert_eq!(
            peer_identity(&admin.server.unwrap()).unwrap(),
            Identity::Admin("admin".into())
        );
        assert_eq!(admin.client.unwrap().1, b"hello");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let server = server_config(&paths(&pki, &pki.server)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert_der(&pki.ca)).unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let outcome = connect(server, Arc::new(anonymous)).await;
        let err = outcome.server.unwrap_err();
        assert!(
            err.to_string().contains("certificate"),
            "server error: {err}"
        );
        assert!(outcome.client.is_err(), "the client must not read any data");
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let server = server_config(&paths(&pki, &pki.server)).unwrap();

        let other = CertificateAuthority::generate("some other CA").unwrap();
        let forged = other
            .issue_client(&Identity::Admin("admin".into()), Duration::from_secs(3600))
            .unwrap();
        let forged_pair = TlsPathsPair {
            cert: dir.path().join("forged.pem"),
            key: dir.path().join("forged-key.pem"),
        };
        forged.write(&forged_pair.cert, &forged_pair.key).unwrap();

        let outcome = connect_as(&pki, server, &forged_pair).await;
        let err = outcome.server.unwrap_err();
        assert!(
            err.to_string().contains("UnknownIssuer"),
            "server error: {err}"
        );
        assert!(outcome.client.is_err(), "the client must not read any data");
    }

    #[tokio::test]
    async fn a_client_refuses_a_server_from_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let other_dir = tempfile::tempdir().unwrap();
        let other = dev_pki(other_dir.path());
        // The server trusts our CA for clients but presents a certificate from another CA.
        let server = server_config(&TlsPaths {
            ca: pki.ca.clone(),
            cert: other.server.cert.clone(),
            key: other.server.key.clone(),
        })
        .unwrap();
        let outcome = connect_as(&pki, server, node_pair(&pki)).await;
        // Both development CAs have the same name, so this is a bad signature rather than an
        // unknown issuer.
        let err = outcome.client.unwrap_err();
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "client error: {err}"
        );
        assert!(outcome.server.is_err());
    }

    /// A self-signed certificate with the given URI SANs (peer_identity reads names only).
    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["example.com".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn peer_identity_needs_exactly_one_keyd_uri() {
        let one = cert_with_uris(&["https://example.com/x", "spiffe://keyd/node/n1"]);
        assert_eq!(peer_identity(&[one]), Ok(Identity::Node("n1".into())));

        let none = cert_with_uris(&["https://example.com/x", "spiffe://other/node/n1"]);
        assert_eq!(peer_identity(&[none]), Err(PeerIdentityError::NoIdentity));
        let no_uri = cert_with_uris(&[]);
        assert_eq!(peer_identity(&[no_uri]), Err(PeerIdentityError::NoIdentity));

        let two = cert_with_uris(&["spiffe://keyd/node/n1", "spiffe://keyd/admin/alice"]);
        assert_eq!(
            peer_identity(&[two]),
            Err(PeerIdentityError::Ambiguous(vec![
                Identity::Node("n1".into()),
                Identity::Admin("alice".into())
            ]))
        );
        let same_twice = cert_with_uris(&["spiffe://keyd/node/n1", "spiffe://keyd/node/n1"]);
        assert!(matches!(
            peer_identity(&[same_twice]),
            Err(PeerIdentityError::Ambiguous(_))
        ));

        let malformed = cert_with_uris(&["spiffe://keyd/node/n1", "spiffe://keyd/root/x"]);
        assert!(matches!(
            peer_identity(&[malformed]),
            Err(PeerIdentityError::Invalid(_))
        ));

        assert_eq!(peer_identity(&[]), Err(PeerIdentityError::NoCertificate));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(
            peer_identity(&[garbage]),
            Err(PeerIdentityError::Unparsable)
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let missing = TlsPaths {
            key: dir.path().join("nope.pem"),
            ..paths(&pki, &pki.server)
        };
        let err = server_config(&missing).unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { role: FileRole::PrivateKey, path, .. } if *path == missing.key),
            "{err:?}"
        );

        // The admin key does not belong to the server certificate.
        let mismatched = TlsPaths {
            key: pki.admin.key.clone(),
            ..paths(&pki, &pki.server)
        };
        assert!(matches!(
            server_config(&mismatched),
            Err(TlsError::CertifiedKey { .. })
        ));
        assert!(matches!(
            client_config(&mismatched),
            Err(TlsError::CertifiedKey { .. })
        ));

        // A key file given as the CA: not a certificate, and the key bytes are not echoed.
        let key_as_ca = TlsPaths {
            ca: pki.server.key.clone(),
            ..paths(&pki, &pki.server)
        };
        let err = server_config(&key_as_ca).unwrap_err();
        assert!(matches!(
            err,
            TlsError::NoCertificate {
                role: FileRole::CaCertificate,
                ..
            }
        ));
        let key_text = std::fs::read_to_string(&pki.server.key).unwrap();
        let body = key_text.lines().nth(1).unwrap();
        assert!(!format!("{err} {err:?}").contains(body));
    }

    fn write_new_server_cert(ca: &CertificateAuthority, pki: &DevPki) -> CertificateDer<'static> {
        let names = ["localhost".to_owned()];
        let issued = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        // Written key first, then certificate: for a moment the pair on disk does not match,
        // which the watcher must ride out.
        issued.write(&pki.server.cert, &pki.server.key).unwrap();
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn watch_picks_up_a_replaced_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let ca = CertificateAuthority::load(&pki.ca, &pki.dir.join("ca-key.pem")).unwrap();
        let (mut rx, task) = watch_server_config(paths(&pki, &pki.server), RELOAD).unwrap();
        let old = cert_der(&pki.server.cert);
        let served = connect_as(&pki, rx.borrow().clone(), node_pair(&pki)).await;
        assert_eq!(served.client.unwrap().0, old);

        let new = write_new_server_cert(&ca, &pki);
        assert_ne!(new, old);
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let config = rx.borrow_and_update().clone();
        let served = connect_as(&pki, config, node_pair(&pki)).await;
        assert_eq!(served.client.unwrap().0, new);
        assert!(served.server.is_ok());

        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn watch_keeps_the_old_config_when_the_replacement_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let ca = CertificateAuthority::load(&pki.ca, &pki.dir.join("ca-key.pem")).unwrap();
        let (mut rx, _task) = watch_server_config(paths(&pki, &pki.server), RELOAD).unwrap();
        let before = rx.borrow_and_update().clone();
        let old = cert_der(&pki.server.cert);

        std::fs::write(
            &pki.server.cert,
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n",
        )
        .unwrap();
        tokio::time::sleep(RELOAD * 6).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a corrupt certificate must not be published"
        );
        assert!(Arc::ptr_eq(&before, &rx.borrow()));
        let served = connect_as(&pki, rx.borrow().clone(), node_pair(&pki)).await;
        assert_eq!(served.client.unwrap().0, old);

        // The watcher is still alive: a good replacement after the bad one is picked up.
        let new = write_new_server_cert(&ca, &pki);
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let served = connect_as(&pki, rx.borrow_and_update().clone(), node_pair(&pki)).await;
        assert_eq!(served.client.unwrap().0, new);
    }

    #[tokio::test]
    async fn watch_returns_the_first_load_error() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path());
        let bad = TlsPaths {
            cert: dir.path().join("missing.pem"),
            ..paths(&pki, &pki.server)
        };
        assert!(matches!(
            watch_server_config(bad, RELOAD),
            Err(TlsError::Read {
                role: FileRole::Certificate,
                ..
            })
        ));
        assert!(matches!(
            watch_server_config(paths(&pki, &pki.server), Duration::ZERO),
            Err(TlsError::ZeroInterval)
        ));
    }

    #[test]
    fn installing_the_default_provider_is_idempotent() {
        install_default_provider();
        install_default_provider();
        let installed = CryptoProvider::get_default().unwrap();
        let ours = provider();
        assert_eq!(installed.cipher_suites.len(), ours.cipher_suites.len());
        assert!(Arc::ptr_eq(&ours, &provider()));
    }
}
