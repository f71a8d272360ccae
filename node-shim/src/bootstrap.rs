//! Bootstrapped identity (SPIRE `k8s_psat` style): node-shim generates a P-256 key, sends a CSR
//! with its projected ServiceAccount token to keyd's bootstrap listener, and writes the node
//! certificate it gets back next to the key (mode 0600). keyd checks the token with the
//! TokenReview API and that the token's pod runs on the node named. The certificate is renewed
//! at two thirds of its lifetime, with a fresh token (kubelet rotates projected tokens) and a
//! fresh key; the mTLS client picks the new files up on its next request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyd_mtls::client::Connector;
use keyd_mtls::tls::TlsPaths;
use keyd_proto::identity::Identity;
use keyd_proto::{BootstrapRequest, BootstrapResponse, SecretString, Timestamp};
use rcgen::PublicKeyData as _;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::watch;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read the ServiceAccount token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keyd's CA")]
    Ca(#[source] keyd_mtls::tls::TlsError),
    #[error("cannot build the TLS client")]
    Tls(#[source] rustls::Error),
    #[error("cannot make the key or CSR")]
    Csr(#[source] rcgen::Error),
    #[error("keyd's bootstrap listener is unreachable")]
    Unreachable(#[source] keyd_mtls::client::ClientError),
    #[error("keyd refused the bootstrap ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("keyd's answer is not valid: {0}")]
    Decode(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the bootstrapped certificate lives.
pub fn paths(cert_dir: &Path, ca: &Path) -> TlsPaths {
    TlsPaths {
        ca: ca.to_owned(),
        cert: cert_dir.join("node.pem"),
        key: cert_dir.join("node-key.pem"),
    }
}

#[derive(Debug, Clone)]
pub struct Bootstrapper {
    pub server: String,
    pub ca: PathBuf,
    pub token_path: PathBuf,
    pub cert_dir: PathBuf,
    pub node: String,
}

/// A certificate obtained, and when to renew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Issued {
    /// Two thirds into the lifetime (cert-manager's default).
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.0.saturating_sub(self.not_before.0);
        Timestamp(self.not_before.0 + life * 2 / 3).to_system()
    }
}

fn server_only_tls(ca: &Path) -> Result<Arc<ClientConfig>, BootstrapError> {
    keyd_mtls::tls::server_auth_client_config(ca).map_err(BootstrapError::Ca)
}

impl Bootstrapper {
    /// A certificate an earlier run obtained, if it is still usable: this node's identity,
    /// within its validity period, with its key beside it. node-shim starts on it (and renews it
    /// in the background) instead of waiting for keyd and the API server, so a restart while
    /// either is away does not stop the agent.
    pub fn existing(&self) -> Option<Issued> {
        let p = paths(&self.cert_dir, &self.ca);
        let der = CertificateDer::pem_file_iter(&p.cert).ok()?.next()?.ok()?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
        let want = Identity::Node(self.node.clone()).uri();
        let names_node = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(
                    |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == want),
                )
            });
        let key_pem = Zeroizing::new(std::fs::read_to_string(&p.key).ok()?);
        let key = KeyPair::from_pem(&key_pem).ok()?;
        let matches_key = key.subject_public_key_info() == x509.public_key().raw;
        let not_before = u64::try_from(x509.validity().not_before.timestamp()).ok()?;
        let not_after = u64::try_from(x509.validity().not_after.timestamp()).ok()?;
        let now = Timestamp::now().0;
        (names_node && matches_key && not_before <= now && now < not_after).then_some(Issued {
            not_before: Timestamp(not_before),
            not_after: Timestamp(not_after),
        })
    }

    /// One exchange: a new key and CSR, the token, a certificate written to `cert_dir`.
    pub async fn obtain(&self) -> Result<Issued, BootstrapError> {
        let token =
            Zeroizing::new(std::fs::read_to_string(&self.token_path).map_err(|source| {
                BootstrapError::Token {
                    path: self.token_path.clone(),
                    source,
                }
            })?);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(BootstrapError::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.node.clone());
        params.distinguished_name = dn;
        let uri = Identity::Node(self.node.clone()).uri();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(BootstrapError::Csr)?)];
        let csr = params
            .serialize_request(&key)
            .map_err(BootstrapError::Csr)?
            .pem()
            .map_err(BootstrapError::Csr)?;
        let req = BootstrapRequest {
            node: self.node.clone(),
            token: SecretString::new(token.trim().to_owned()),
            csr,
        };
        let tls = server_only_tls(&self.ca)?;
        let connector = Connector::new(&self.server, tls).map_err(BootstrapError::Unreachable)?;
        let mut conn = connector
            .connect()
            .await
            .map_err(BootstrapError::Unreachable)?;
        let resp = conn
            .post_json("/v1/bootstrap/node", &req)
            .await
            .map_err(BootstrapError::Unreachable)?;
        if !resp.status.is_success() {
            return Err(BootstrapError::Refused {
                status: resp.status.as_u16(),
                message: resp.error_message(),
            });
        }
        let answer: BootstrapResponse = serde_json::from_slice(&resp.body)
            .map_err(|e| BootstrapError::Decode(e.to_string()))?;
        if CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
            .next()
            .is_none()
        {
            return Err(BootstrapError::Decode(
                "no certificate in the answer".into(),
            ));
        }
        let p = paths(&self.cert_dir, &self.ca);
        std::fs::create_dir_all(&self.cert_dir).map_err(|source| BootstrapError::Write {
            path: self.cert_dir.clone(),
            source,
        })?;
        // Key first, so a certificate on disk always has its key.
        let key_pem = Zeroizing::new(key.serialize_pem());
        write_atomic(&p.key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&p.cert, answer.certificate.as_bytes(), 0o644)?;
        Ok(Issued {
            not_before: answer.not_before,
            not_after: answer.not_after,
        })
    }

    /// Renews at two thirds of each certificate's lifetime until `shutdown`; a failed renewal is
    /// retried every `retry` while the current certificate is still valid.
    pub async fn renew_loop(
        self,
        mut issued: Issued,
        retry: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let wait = issued
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            loop {
                match self.obtain().await {
                    Ok(next) => {
                        tracing::info!(not_after = %next.not_after, "node certificate renewed");
                        issued = next;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %keyd_mtls::error_chain(&e), expires = %issued.not_after, "certificate renewal failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(retry) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), BootstrapError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| BootstrapError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        let i = Issued {
            not_before: Timestamp(1000),
            not_after: Timestamp(4000),
        };
        assert_eq!(i.renew_at(), Timestamp(3000).to_system());
    }
}
