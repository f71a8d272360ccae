//! TLS for the webhook: the serving certificate the API server connects to (reloaded from disk
//! without a restart), and the mTLS client identity it presents to keyd.
//!
//! Built by `keyd_mtls::tls`, so there is one crypto provider (aws-lc-rs, passed explicitly to every
//! builder) and one way of reading PEM files. The server side differs from keyd's in one way:
//! the API server usually presents no client certificate; one can be required with
//! `tls.client_ca`.

use std::sync::Arc;
use std::time::Duration;

pub use keyd_mtls::tls::{
    ServerTlsPaths, TlsError, TlsPaths as ClientTlsPaths, client_config, install_default_provider,
    provider, serving_config,
};
use rustls::ServerConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Loads the serving config now (an error here is a startup error), then polls the files every
/// `interval` (at least 10 ms) and publishes a rebuilt config when they change. A change that
/// does not load (a certificate written before its key) keeps the previous config and is retried
/// at the next change. The task ends when every receiver is dropped.
pub fn watch_server_config(
    paths: ServerTlsPaths,
    interval: Duration,
) -> Result<(watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>), TlsError> {
    keyd_mtls::tls::watch_server_config(paths, interval.max(Duration::from_millis(10)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use keyd::pki::CertificateAuthority;
    use rustls::{ClientConfig, RootCertStore};
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName};
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
            .with_root_certificates(roots(ca_pem))
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

    fn roots(ca_pem: &Path) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca_pem)).unwrap();
        roots
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
        let e = serving_config(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let a = issue(&ca, dir.path(), "a");
        let b = issue(&ca, dir.path(), "b");
        let mismatched = ServerTlsPaths {
            key: b.key.clone(),
            ..a.clone()
        };
        assert!(matches!(
            serving_config(&mismatched),
            Err(TlsError::CertifiedKey { .. })
        ));
        let key_as_cert = ServerTlsPaths {
            cert: a.key.clone(),
            ..a
        };
        assert!(matches!(
            serving_config(&key_as_cert),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
