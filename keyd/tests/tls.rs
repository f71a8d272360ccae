//! keyd_mtls's TLS configurations and certificate reload, exercised with certificates from
//! keyd's own PKI (which is why these tests live in keyd: keyd-mtls does not issue
//! certificates).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyd::pki::{CertificateAuthority, DevPki, TlsPathsPair, ensure_dev_pki};
use keyd_mtls::identity::{PeerIdentityError, peer_identity};
use keyd_mtls::tls::*;
use keyd_proto::identity::Identity;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

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
