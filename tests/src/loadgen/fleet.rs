//! The simulated nodes: one client certificate each, issued from keyd's dev CA, and their
//! registration with keyd.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{StatusCode, header};
use keyd::pki::CertificateAuthority;
use keyd_mtls::client::{Connection, Connector};
use keyd_proto::identity::Identity;
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Error;

/// Node certificates outlive any run by far.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Registrations in flight at once (keyd serializes its writes anyway).
const REGISTER_PARALLELISM: usize = 16;

/// N simulated nodes, `bench-0000`, `bench-0001`, ...
#[derive(Debug)]
pub struct Fleet {
    pub nodes: Vec<BenchNode>,
    admin: Arc<ClientConfig>,
}

/// One simulated node: its name and a TLS client configuration presenting its own certificate.
#[derive(Debug, Clone)]
pub struct BenchNode {
    pub index: usize,
    pub name: String,
    /// `GET` here fetches this node's bundle.
    pub bundle_path: String,
    pub tls: Arc<ClientConfig>,
}

impl BenchNode {
    /// A connector to `addr` presenting this node's certificate.
    pub fn connector(&self, addr: SocketAddr) -> Result<Connector, Error> {
        Connector::new(&format!("https://{addr}"), Arc::clone(&self.tls)).map_err(|source| {
            Error::Client {
                what: format!("building a connector for {} to {addr}", self.name),
                source: Box::new(source),
            }
        })
    }

    /// The node's registration (`PUT /v1/nodes/{name}`): a distinct endpoint and /24 pod CIDR,
    /// and with `wireguard` a distinct, valid x25519 public key. Built as JSON rather than as
    /// `keyd_proto::NodeRegistration`, so that fields keyd adds with defaults do not break it.
    fn registration(&self, wireguard: bool) -> serde_json::Value {
        // Indexes are below MAX_NODES (10,000): 100.64.0.1 + i stays inside 100.64.0.0/10, and
        // 10.(i / 256).(i % 256).0/24 is distinct for i < 65,536.
        let i = u32::try_from(self.index).unwrap_or(u32::MAX);
        let endpoint = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)).wrapping_add(i));
        let [_, _, hi, lo] = i.to_be_bytes();
        let mut reg = json!({
            "endpoint": endpoint.to_string(),
            "pod_cidrs": [format!("10.{hi}.{lo}.0/24")],
        });
        if wireguard {
            reg["wireguard_public_key"] = json!(wireguard_public_key(self.index));
        }
        reg
    }
}

/// A valid x25519 public key, distinct per index: the public half of a secret derived from it.
pub fn wireguard_public_key(index: usize) -> String {
    // x25519 clamps the low three bits of byte 0 and the top bits of byte 31, so the index
    // goes in between.
    let mut seed = [0x42u8; 32];
    seed[1..9].copy_from_slice(&(index as u64).to_le_bytes());
    let secret = x25519_dalek::StaticSecret::from(seed);
    STANDARD.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

fn node_name(index: usize) -> String {
    format!("bench-{index:04}")
}

impl Fleet {
    /// Loads keyd's dev CA from `pki_dir` and issues `count` node certificates (kept in memory
    /// only). Session resumption is disabled, so every new connection is a full handshake.
    pub fn issue(pki_dir: &Path, count: usize) -> Result<Self, Error> {
        let ca_path = pki_dir.join("ca.pem");
        let ca = CertificateAuthority::load(&ca_path, &pki_dir.join("ca-key.pem")).map_err(
            |source| Error::Pki {
                node: "(loading keyd's dev CA)".into(),
                source: Box::new(source),
            },
        )?;
        let mut roots = RootCertStore::empty();
        let ca_der = CertificateDer::from_pem_file(&ca_path).map_err(|source| Error::Pem {
            what: ca_path.display().to_string(),
            source,
        })?;
        roots.add(ca_der).map_err(|source| Error::Rustls {
            what: format!("trusting {}", ca_path.display()),
            source,
        })?;
        let roots = Arc::new(roots);
        let mut nodes = Vec::with_capacity(count);
        for index in 0..count {
            let name = node_name(index);
            let issued = ca
                .issue_client(&Identity::Node(name.clone()), CERT_VALIDITY)
                .map_err(|source| Error::Pki {
                    node: name.clone(),
                    source: Box::new(source),
                })?;
            let tls = client_config(&roots, &name, &issued.cert_pem, issued.key_pem.as_bytes())?;
            nodes.push(BenchNode {
                index,
                bundle_path: format!("/v1/nodes/{name}/bundle"),
                name,
                tls,
            });
        }
        let admin = keyd_mtls::tls::client_config(&keyd_mtls::tls::TlsPaths {
            ca: ca_path,
            cert: pki_dir.join("admin.pem"),
            key: pki_dir.join("admin-key.pem"),
        })
        .map_err(|source| Error::Tls {
            what: "the dev admin certificate".into(),
            source: Box::new(source),
        })?;
        Ok(Self { nodes, admin })
    }

    /// Registers every node with keyd, each over its own connection with its own certificate
    /// (a node may only register itself). With `wireguard`, each also posts its public key.
    pub async fn register(&self, keyd: SocketAddr, wireguard: bool) -> Result<(), Error> {
        let permits = Arc::new(Semaphore::new(REGISTER_PARALLELISM));
        let mut tasks = JoinSet::new();
        for node in &self.nodes {
            let connector = node.connector(keyd)?;
            let node = node.clone();
            let permits = Arc::clone(&permits);
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let what = format!("registering {}", node.name);
                let mut conn = connect(&connector, &what).await?;
                let resp = conn
                    .put_json(
                        &format!("/v1/nodes/{}", node.name),
                        &node.registration(wireguard),
                    )
                    .await
                    .map_err(|source| Error::Client {
                        what: what.clone(),
                        source: Box::new(source),
                    })?;
                expect_status(&what, &resp, StatusCode::OK)
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(Error::Join)??;
        }
        Ok(())
    }

    /// One IPsec rotation as the dev admin, so that bundles carry a key.
    pub async fn rotate_ipsec(&self, keyd: SocketAddr) -> Result<(), Error> {
        let what = "rotating the IPsec key as admin";
        let connector = Connector::new(&format!("https://{keyd}"), Arc::clone(&self.admin))
            .map_err(|source| Error::Client {
                what: what.into(),
                source: Box::new(source),
            })?;
        let mut conn = connect(&connector, what).await?;
        let resp = conn
            .post_json("/v1/ipsec/rotate", &json!({}))
            .await
            .map_err(|source| Error::Client {
                what: what.into(),
                source: Box::new(source),
            })?;
        expect_status(what, &resp, StatusCode::OK)
    }

    /// Node `index`'s bundle as `addr` serves it: the body and its ETag.
    pub async fn fetch_bundle(
        &self,
        index: usize,
        addr: SocketAddr,
    ) -> Result<(Bytes, String), Error> {
        let node = self.nodes.get(index).ok_or_else(|| Error::Protocol {
            what: format!("node {index}"),
            reason: "no such node in the fleet".into(),
        })?;
        let what = format!("fetching {}'s bundle from {addr}", node.name);
        let mut conn = connect(&node.connector(addr)?, &what).await?;
        let resp = conn
            .get(&node.bundle_path)
            .await
            .map_err(|source| Error::Client {
                what: what.clone(),
                source: Box::new(source),
            })?;
        expect_status(&what, &resp, StatusCode::OK)?;
        let etag = etag_of(&what, &resp)?;
        Ok((resp.body, etag))
    }
}

/// A client configuration like `keyd_mtls::tls::client_config` (keyd's provider, roots, ALPN
/// `http/1.1`), from in-memory PEM, with session resumption disabled.
fn client_config(
    roots: &Arc<RootCertStore>,
    name: &str,
    cert_pem: &str,
    key_pem: &[u8],
) -> Result<Arc<ClientConfig>, Error> {
    let cert =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| Error::Pem {
            what: format!("{name}'s certificate"),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| Error::Pem {
        what: format!("{name}'s private key"),
        source,
    })?;
    let mut config = ClientConfig::builder_with_provider(keyd_mtls::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Rustls {
            what: "choosing TLS versions".into(),
            source,
        })?
        .with_root_certificates(Arc::clone(roots))
        .with_client_auth_cert(vec![cert], key)
        .map_err(|source| Error::Rustls {
            what: format!("{name}'s certificate and key"),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

pub(crate) async fn connect(connector: &Connector, what: &str) -> Result<Connection, Error> {
    connector.connect().await.map_err(|source| Error::Client {
        what: what.to_owned(),
        source: Box::new(source),
    })
}

pub(crate) fn expect_status(
    what: &str,
    resp: &keyd_mtls::client::Response,
    want: StatusCode,
) -> Result<(), Error> {
    if resp.status == want {
        return Ok(());
    }
    Err(Error::Status {
        what: what.to_owned(),
        status: resp.status,
        message: resp.error_message(),
    })
}

pub(crate) fn etag_of(what: &str, resp: &keyd_mtls::client::Response) -> Result<String, Error> {
    resp.headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| Error::Protocol {
            what: what.to_owned(),
            reason: "the response has no ETag".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_keys_are_distinct_and_valid() {
        let keys: std::collections::HashSet<String> = (0..1000).map(wireguard_public_key).collect();
        assert_eq!(keys.len(), 1000);
        for k in keys.iter().take(10) {
            keyd::wireguard::canonical_public_key(k).expect("a valid key");
        }
    }

    #[test]
    fn registrations_are_distinct() {
        let node = |index| BenchNode {
            index,
            name: node_name(index),
            bundle_path: String::new(),
            tls: Arc::new(
                ClientConfig::builder_with_provider(keyd_mtls::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        };
        let a = node(0).registration(true);
        let b = node(9999).registration(true);
        assert_eq!(a["endpoint"], "100.64.0.1");
        assert_eq!(b["endpoint"], "100.64.39.16");
        assert_eq!(a["pod_cidrs"][0], "10.0.0.0/24");
        assert_eq!(b["pod_cidrs"][0], "10.39.15.0/24");
        assert_ne!(a["wireguard_public_key"], b["wireguard_public_key"]);
        // What keyd will parse it into.
        let parsed: keyd_proto::NodeRegistration = serde_json::from_value(b).expect("parses");
        assert_eq!(parsed.pod_cidrs.len(), 1);
        assert!(
            node(3)
                .registration(false)
                .get("wireguard_public_key")
                .is_none()
        );
        assert_eq!(node_name(7), "bench-0007");
    }
}
