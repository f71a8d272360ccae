//! rustls configurations built from PEM files, and hot reload of a server's certificate.
//!
//! keyd's API requires a client certificate chained to keyd's CA ([`server_config`]); who the
//! client is comes from the one `spiffe://keyd/...` URI SAN in it ([`crate::identity`]). The
//! webhook and keyd's bootstrap listener serve with the same code: [`serving_config`] and
//! [`watch_server_config`] take a [`ServerTlsPaths`], whose client CA is optional (the
//! Kubernetes API server, and a node before bootstrap, present none).
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

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::identity::{DenyList, peer_identity, peer_validity};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
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

/// A server config that requires a client certificate chained to `paths.ca`, serves
/// `paths.cert`/`paths.key`, and offers ALPN `h2` then `http/1.1`.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    serving_config(&paths.clone().into())
}

/// A server config serving `paths.cert`/`paths.key` with ALPN `h2` then `http/1.1`. With
/// `paths.client_ca`, a client certificate chained to it is required; without, none is asked for.
pub fn serving_config(paths: &ServerTlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    serving_config_denying(paths, None)
}

/// [`serving_config`], refusing during the handshake the client certificates `deny` names.
pub fn serving_config_denying(
    paths: &ServerTlsPaths,
    deny: Option<&Arc<dyn DenyList>>,
) -> Result<Arc<ServerConfig>, TlsError> {
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
            match deny {
                Some(deny) => builder.with_client_cert_verifier(Arc::new(DenyingVerifier {
                    inner: verifier,
                    deny: Arc::clone(deny),
                })),
                None => builder.with_client_cert_verifier(verifier),
            }
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
    if deny.is_some() {
        // A resumed session restores the client's certificate without verifying it again, so
        // a certificate denied since would get through: no resumption where a deny list applies.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The CA's verifier, then the deny list: a certificate that verifies but is denied fails the
/// handshake as revoked. One that names no identity is left to the request's own checks (which
/// refuse it), so that the refusal says why.
#[derive(Debug)]
struct DenyingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    deny: Arc<dyn DenyList>,
}

impl ClientCertVerifier for DenyingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let chain = std::slice::from_ref(end_entity);
        if let (Ok(id), Some(validity)) = (peer_identity(chain), peer_validity(chain))
            && let Some(why) = self.deny.refused(&id, validity.not_before)
        {
            tracing::warn!(peer = %id, reason = %why, "refused a denied client certificate at the TLS handshake");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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

/// A client config that trusts only the CA certificate(s) in `ca` and presents no certificate
/// of its own (talking to the Kubernetes API server, or to keyd's bootstrap listener before a
/// node has a certificate); ALPN `http/1.1`.
pub fn server_auth_client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
    watch_server_config_denying(paths, interval, None)
}

/// [`watch_server_config`], every config refusing the client certificates `deny` names at the
/// handshake ([`serving_config_denying`]).
pub fn watch_server_config_denying(
    paths: impl Into<ServerTlsPaths>,
    interval: Duration,
    deny: Option<Arc<dyn DenyList>>,
) -> Result<(watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>), TlsError> {
    let paths = paths.into();
    if interval.is_zero() {
        return Err(TlsError::ZeroInterval);
    }
    // Fingerprint before reading: a change that lands during the read shows up as a difference
    // at the next poll, so it is never missed.
    let mut seen = Fingerprint::of(&paths);
    let (tx, rx) = watch::channel(serving_config_denying(&paths, deny.as_ref())?);
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
            let poll_deny = deny.clone();
            let polled = tokio::task::spawn_blocking(move || {
                poll_once(&poll_paths, &previous, poll_deny.as_ref())
            })
            .await;
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
                        error = %crate::ErrorChain(&error),
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
    deny: Option<&Arc<dyn DenyList>>,
) -> Option<(Fingerprint, Result<Arc<ServerConfig>, TlsError>)> {
    let now = Fingerprint::of(paths);
    if now == *previous {
        return None;
    }
    Some((now, serving_config_denying(paths, deny)))
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
pub fn read_secret(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
    let mut buf = Zeroizing::new(Vec::with_capacity(len.saturating_add(1)));
    file.read_to_end(&mut buf)?;
    Ok(buf)
}
