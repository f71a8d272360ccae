//! TLS for the webhook: the serving certificate the API server connects to (reloaded from disk
//! without a restart), and the mTLS client identity it presents to keyd.
//!
//! The only crypto provider is aws-lc-rs, passed explicitly to every builder. This mirrors
//! `keyd::tls` on purpose rather than depending on the keyd crate: the webhook binary carries no
//! key-custody code (store, KEK), and its server side differs (the API server usually presents
//! no client certificate; one can be required with `tls.client_ca`).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// The one crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries (kube's client) that look it up.
/// Idempotent.
pub fn install_default_provider() {
    // Fails only when a default is already installed; this process installs no other provider.
    let _ = CryptoProvider::install_default(CryptoProvider::clone(&provider()));
}

/// A TLS file could not be used. Messages name the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} is not valid PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} {} holds no certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("CA certificate {} is not a usable trust anchor", path.display())]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build a client-certificate verifier from {}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} and key {} are not a usable pair", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the crypto provider supports none of the default TLS versions")]
    Versions(#[source] rustls::Error),
}

/// The webhook's serving certificate, and optionally the CA the API server's client certificate
/// must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A client identity: the CA to trust and the certificate to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The serving config; ALPN `h2` then `http/1.1` (the API server speaks either).
pub fn server_config(paths: &ServerTlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?;
    let builder = match &paths.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|source| TlsError::Verifier {
                        path: ca.clone(),
                        source,
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs("certificate", &paths.cert)?, key(&paths.key)?)
        .map_err(|source| TlsError::Pair {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for keyd: trusts only `ca`, presents `cert`; ALPN `http/1.1`.
pub fn client_config(paths: &ClientTlsPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots(&paths.ca)?)
        .with_client_auth_cert(certs("certificate", &paths.cert)?, key(&paths.key)?)
        .map_err(|source| TlsError::Pair {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Loads the serving config now (an error here is a startup error), then polls the files every
/// `interval` and publishes a rebuilt config when they change. A change that does not load (a
/// certificate written before its key) keeps the previous config and is retried at the next
/// change. The task ends when every receiver is dropped.
pub fn watch_server_config(
    paths: ServerTlsPaths,
    interval: Duration,
) -> Result<(watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>), TlsError> {
    // Fingerprint before reading: a change during the read is seen at the next poll.
    let mut seen = fingerprint(&paths);
    let (tx, rx) = watch::channel(server_config(&paths)?);
    let interval = interval.max(Duration::from_millis(10));
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = ticker.tick() => {}
            }
            let p = paths.clone();
            let previous = seen.clone();
            let polled = tokio::task::spawn_blocking(move || {
                let now = fingerprint(&p);
                (now != previous).then(|| (now, server_config(&p)))
            })
            .await;
            match polled {
                Ok(None) => {}
                Ok(Some((now, Ok(config)))) => {
                    seen = now;
                    tx.send_replace(config);
                    tracing::info!(cert = %paths.cert.display(), "reloaded the serving certificate");
                }
                Ok(Some((now, Err(error)))) => {
                    seen = now;
                    tracing::warn!(
                        error = %crate::ErrorChain(&error),
                        "serving certificate files changed but do not load; keeping the previous ones"
                    );
                }
                Err(join) if join.is_cancelled() => return,
                Err(join) => tracing::warn!(error = %join, "certificate reload check failed"),
            }
        }
    });
    Ok((rx, task))
}

/// What the poller compares: per file, absent or (mtime, ctime, size, device, inode). The inode
/// catches an atomic rename and Kubernetes' `..data` symlink swap (metadata follows symlinks).
type Stamp = Option<(Option<SystemTime>, (i64, i64), u64, u64, u64)>;

fn fingerprint(paths: &ServerTlsPaths) -> Vec<Stamp> {
    let stamp = |p: &Path| -> Stamp {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.modified().ok(),
                (m.ctime(), m.ctime_nsec()),
                m.len(),
                m.dev(),
                m.ino(),
            )
        })
    };
    let mut v = vec![stamp(&paths.cert), stamp(&paths.key)];
    if let Some(ca) = &paths.client_ca {
        v.push(stamp(ca));
    }
    v
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("CA certificate", path)? {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // `PrivateKeyDer` zeroizes its own buffer; the PEM text is short-lived.
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        rustls_pki_types::pem::Error::Io(io) => TlsError::Read {
            what: "private key",
            path: path.to_owned(),
            source: io,
        },
        other => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            source: other,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyd::pki::CertificateAuthority;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn issue(ca: &CertificateAuthority, dir: &Path, stem: &str) -> ServerTlsPaths {
        let cert = ca
            .issue_server(&["127.0.0.1".to_owned()], Duration::from_secs(3600))
            .unwrap();
        let paths = ServerTlsPaths {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            client_ca: None,
        };
        cert.write(&paths.cert, &paths.key).unwrap();
        paths
    }

    /// The certificate the server presents to a client that trusts `ca_pem`.
    async fn served(config: Arc<ServerConfig>, ca_pem: &Path) -> CertificateDer<'static> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca_pem).unwrap())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        server.await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    }

    fn der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[tokio::test]
    async fn a_replaced_certificate_is_served_without_a_restart_and_a_bad_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        let paths = issue(&ca, dir.path(), "tls");
        let first = der(&paths.cert);
        let (mut rx, _task) =
            watch_server_config(paths.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(served(rx.borrow().clone(), &ca_pem).await, first);

        // Garbage in place of the certificate: the old config stays.
        std::fs::write(&paths.cert, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(served(rx.borrow().clone(), &ca_pem).await, first);

        // A good replacement is picked up.
        let staged = issue(&ca, dir.path(), "next");
        std::fs::rename(&staged.key, &paths.key).unwrap();
        std::fs::rename(&staged.cert, &paths.cert).unwrap();
        let second = der(&paths.cert);
        assert_ne!(first, second);
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let config = rx.borrow_and_update().clone();
        assert_eq!(served(config, &ca_pem).await, second);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ServerTlsPaths {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope-key.pem"),
            client_ca: None,
        };
        let e = server_config(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let a = issue(&ca, dir.path(), "a");
        let b = issue(&ca, dir.path(), "b");
        let mismatched = ServerTlsPaths {
            key: b.key.clone(),
            ..a.clone()
        };
        assert!(matches!(
            server_config(&mismatched),
            Err(TlsError::Pair { .. })
        ));
        let key_as_cert = ServerTlsPaths {
            cert: a.key.clone(),
            ..a
        };
        assert!(matches!(
            server_config(&key_as_cert),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
