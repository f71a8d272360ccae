//! `[bootstrap]`: the node bootstrap listener's configuration, checked before anything binds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyd_proto::identity::validate_name;
use serde::Deserialize;

use crate::bootstrap::BootstrapConfig;
use crate::policy_watch::KubeApiConfig;
use keyd_mtls::ConfigError;

/// The `[bootstrap]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootstrap {
    /// Address of the bootstrap listener, e.g. `0.0.0.0:8444`.
    pub listen: Option<String>,
    /// The API server, `https://HOST:PORT` (in a pod: `https://kubernetes.default.svc`).
    pub kube_api: Option<String>,
    /// The API server's CA (in a pod: the service account's `ca.crt`).
    pub kube_ca: Option<PathBuf>,
    /// keyd's own credential for TokenReview and reading pods (in a pod: the service account
    /// token, re-read for every request since kubelet rotates it).
    pub kube_token_file: Option<PathBuf>,
    /// The audience node tokens must carry (default `keyd`).
    pub audience: Option<String>,
    /// Service accounts allowed to bootstrap, as `NAMESPACE/NAME` (node-shim's DaemonSet).
    pub service_accounts: Option<Vec<String>>,
    /// The private key of keyd's client CA (`tls.ca`), which signs node certificates.
    pub ca_key: Option<PathBuf>,
    /// Lifetime of issued certificates (default 1h, at most 24h); agents renew at 2/3.
    pub cert_validity: Option<String>,
    /// Requests one source address may make per minute (default 30); more get 429.
    pub max_requests_per_minute: Option<u32>,
}

fn cerr(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(&format!("bootstrap.{field}"), message)
}

/// Where the service account's credentials are mounted in a pod.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `kube_api`, `kube_ca` and `kube_token_file` of `section` (`[bootstrap]`, `[policy]`): the
/// same names, defaults (in a pod: the in-cluster API and the service account's files) and
/// checks wherever keyd talks to the Kubernetes API.
pub(super) fn kube_api(
    section: &str,
    api: Option<String>,
    ca: Option<PathBuf>,
    token_file: Option<PathBuf>,
) -> Result<KubeApiConfig, ConfigError> {
    let api = api.unwrap_or_else(|| "https://kubernetes.default.svc".to_owned());
    if !api.starts_with("https://") || api.len() <= "https://".len() {
        return Err(ConfigError::new(
            &format!("{section}.kube_api"),
            "must be an https:// URL",
        ));
    }
    let sa = SERVICE_ACCOUNT_DIR;
    Ok(KubeApiConfig {
        api,
        ca: existing_file(&format!("{section}.kube_ca"), ca, &format!("{sa}/ca.crt"))?,
        token_file: existing_file(
            &format!("{section}.kube_token_file"),
            token_file,
            &format!("{sa}/token"),
        )?,
    })
}

/// `path` (else `default`), which must exist.
fn existing_file(
    field: &str,
    path: Option<PathBuf>,
    default: &str,
) -> Result<PathBuf, ConfigError> {
    let p = path.unwrap_or_else(|| PathBuf::from(default));
    std::fs::metadata(&p).map_err(|e| ConfigError::new(field, format!("{}: {e}", p.display())))?;
    Ok(p)
}

impl RawBootstrap {
    /// `tls_ca` is keyd's client CA: the certificates issued here must chain to it.
    /// `managed_ca_key` is its key's file when `[cluster_pki]` writes it (it may not exist yet).
    pub fn validate(
        self,
        tls_ca: &Path,
        managed_ca_key: Option<&Path>,
    ) -> Result<BootstrapConfig, ConfigError> {
        let listen = self
            .listen
            .ok_or_else(|| cerr("listen", "required"))?
            .parse()
            .map_err(|_| cerr("listen", "not an address like 0.0.0.0:8444"))?;
        let kube = kube_api(
            "bootstrap",
            self.kube_api,
            self.kube_ca,
            self.kube_token_file,
        )?;
        let ca_key = match (managed_ca_key, self.ca_key) {
            (Some(_), Some(_)) => {
                return Err(cerr(
                    "ca_key",
                    "must be unset with [cluster_pki], which writes the CA's key",
                ));
            }
            (Some(managed), None) => managed.to_owned(),
            (None, path) => existing_file("bootstrap.ca_key", path, "")?,
        };
        let audience = self.audience.unwrap_or_else(|| "keyd".to_owned());
        if audience.is_empty() {
            return Err(cerr("audience", "must not be empty"));
        }
        let mut service_accounts = Vec::new();
        for s in self.service_accounts.unwrap_or_default() {
            let (ns, name) = s
                .split_once('/')
                .filter(|(ns, name)| validate_name(ns).is_ok() && validate_name(name).is_ok())
                .ok_or_else(|| cerr("service_accounts", format!("{s:?} is not NAMESPACE/NAME")))?;
            service_accounts.push((ns.to_owned(), name.to_owned()));
        }
        if service_accounts.is_empty() {
            return Err(cerr(
                "service_accounts",
                "name at least one NAMESPACE/NAME allowed to bootstrap",
            ));
        }
        let cert_validity =
            humantime::parse_duration(self.cert_validity.as_deref().unwrap_or("1h"))
                .map_err(|e| cerr("cert_validity", e.to_string()))?;
        if cert_validity < Duration::from_secs(60) || cert_validity > Duration::from_secs(24 * 3600)
        {
            return Err(cerr("cert_validity", "must be between 1m and 24h"));
        }
        let max_requests_per_minute = self.max_requests_per_minute.unwrap_or(30);
        if !(1..=100_000).contains(&max_requests_per_minute) {
            return Err(cerr(
                "max_requests_per_minute",
                "must be between 1 and 100000",
            ));
        }
        Ok(BootstrapConfig {
            max_requests_per_minute,
            listen,
            kube_api: kube.api,
            kube_ca: kube.ca,
            kube_token_file: kube.token_file,
            audience,
            service_accounts,
            ca_cert: tls_ca.to_owned(),
            ca_key,
            cert_validity,
        })
    }
}
