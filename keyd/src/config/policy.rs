//! `[policy]`: compiling each node's data-plane rules from the Kubernetes API, checked before
//! anything binds.

use std::path::PathBuf;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;

use super::bootstrap::kube_api;
use crate::policy_watch::PolicyWatchConfig;
use keyd_mtls::ConfigError;

/// The `[policy]` section as written. Its presence turns the watcher on; every field has a
/// default that fits keyd running in a pod.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// The API server, `https://HOST:PORT` (default `https://kubernetes.default.svc`).
    pub kube_api: Option<String>,
    /// The API server's CA (default: the service account's `ca.crt`).
    pub kube_ca: Option<PathBuf>,
    /// keyd's credential for watching pods, namespaces and policies (default: the service
    /// account token, re-read as kubelet rotates it).
    pub kube_token_file: Option<PathBuf>,
}

impl RawPolicy {
    pub fn validate(self) -> Result<PolicyWatchConfig, ConfigError> {
        if !cfg!(feature = "kube") {
            return Err(ConfigError::new(
                "policy",
                "this keyd was built without the `kube` feature, so it cannot watch the \
                 Kubernetes API; remove the section or use a default build",
            ));
        }
        let kube = kube_api("policy", self.kube_api, self.kube_ca, self.kube_token_file)?;
        // The watcher's client needs the CA's certificates; a file without one fails here, not
        // after the listeners are bound.
        let has_cert = CertificateDer::pem_file_iter(&kube.ca)
            .is_ok_and(|mut certs| certs.next().is_some_and(|c| c.is_ok()));
        if !has_cert {
            return Err(ConfigError::new(
                "policy.kube_ca",
                format!("{}: holds no PEM certificate", kube.ca.display()),
            ));
        }
        // The Kubernetes client sends the file's content as it is: a trailing newline (a token
        // written with `echo`) makes every request fail with an invalid header, so it is refused
        // here with the reason. (Unreadable is left to the watcher, which retries.)
        if let Ok(token) = std::fs::read(&kube.token_file).map(zeroize::Zeroizing::new)
            && token.trim_ascii().len() != token.len()
        {
            return Err(ConfigError::new(
                "policy.kube_token_file",
                format!(
                    "{}: the token has leading or trailing whitespace (a newline?), which the \
                     Kubernetes client would send as part of the header; write it without",
                    kube.token_file.display()
                ),
            ));
        }
        Ok(PolicyWatchConfig { kube })
    }
}

#[cfg(all(test, feature = "kube"))]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("write");
        let ca = dir.path().join("ca.pem");
        let pem = crate::pki::CertificateAuthority::generate("test CA")
            .expect("CA")
            .cert_pem();
        std::fs::write(&ca, pem).expect("write");
        let ok = RawPolicy {
            kube_api: Some("https://127.0.0.1:6443".into()),
            kube_ca: Some(ca.clone()),
            kube_token_file: Some(file.clone()),
        };
        assert_eq!(
            ok.validate().expect("valid").kube.api,
            "https://127.0.0.1:6443"
        );
        let http = RawPolicy {
            kube_api: Some("http://127.0.0.1:6443".into()),
            kube_ca: Some(file.clone()),
            kube_token_file: Some(file.clone()),
        };
        let e = http.validate().expect_err("http").to_string();
        assert!(e.contains("policy.kube_api"), "{e}");
        let missing = RawPolicy {
            kube_api: Some("https://127.0.0.1:6443".into()),
            kube_ca: Some(dir.path().join("absent")),
            kube_token_file: Some(file.clone()),
        };
        let e = missing.validate().expect_err("absent").to_string();
        assert!(e.contains("policy.kube_ca"), "{e}");
        let not_pem = RawPolicy {
            kube_api: Some("https://127.0.0.1:6443".into()),
            kube_ca: Some(file),
            kube_token_file: Some(ca),
        };
        let e = not_pem.validate().expect_err("no certificate").to_string();
        assert!(
            e.contains("policy.kube_ca") && e.contains("no PEM certificate"),
            "{e}"
        );
        let newline = dir.path().join("token");
        std::fs::write(&newline, "a-token\n").expect("write");
        let with_newline = RawPolicy {
            kube_api: Some("https://127.0.0.1:6443".into()),
            kube_ca: Some(dir.path().join("ca.pem")),
            kube_token_file: Some(newline),
        };
        let e = with_newline.validate().expect_err("newline").to_string();
        assert!(
            e.contains("policy.kube_token_file") && e.contains("whitespace"),
            "{e}"
        );
        assert!(!e.contains("a-token"), "the token is not echoed: {e}");
    }
}
