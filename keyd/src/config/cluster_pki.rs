//! `[cluster_pki]`: keyd as its cluster's certificate issuer, checked before anything binds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyd_proto::identity::{Identity, validate_name};
use rustls_pki_types::ServerName;
use serde::Deserialize;

use super::bootstrap::kube_api;
use crate::cluster_pki::{ClusterPkiConfig, Issue, IssueKind};
use keyd_mtls::ConfigError;

/// Where a pod finds its own namespace.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The `[cluster_pki]` section as written. Its presence makes keyd issue its own serving
/// certificate and keep a CA and the listed certificates in Kubernetes Secrets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClusterPki {
    /// The API server, `https://HOST:PORT` (default `https://kubernetes.default.svc`).
    pub kube_api: Option<String>,
    /// The API server's CA (default: the service account's `ca.crt`).
    pub kube_ca: Option<PathBuf>,
    /// keyd's credential for the Secrets (default: the service account token).
    pub kube_token_file: Option<PathBuf>,
    /// The namespace of every Secret and ConfigMap below (default: keyd's own, from the
    /// service account).
    pub namespace: Option<String>,
    /// Where keyd writes the CA and its own certificate for its listeners (default
    /// `DATA_DIR/cluster-pki`; a memory-backed volume in a pod).
    pub dir: Option<PathBuf>,
    /// The Secret holding the CA's certificate and key (default `keyd-ca`), created once.
    pub ca_secret: Option<String>,
    /// The ConfigMap keyd publishes the CA certificate in as `ca.crt` (default `keyd-ca`):
    /// what node-shim, the webhook and keyctl trust.
    pub trust_config_map: Option<String>,
    /// The names on keyd's own serving certificate (DNS names or IP addresses).
    pub server_names: Option<Vec<String>>,
    /// Lifetime of every certificate issued here (default 2160h, 90 days); renewed with a
    /// third of it left.
    pub validity: Option<String>,
    /// How often the Secrets and webhook configurations are checked (default 1m).
    pub check_interval: Option<String>,
    /// ValidatingWebhookConfigurations whose every `caBundle` keyd keeps equal to the CA.
    #[serde(default)]
    pub webhook_configurations: Vec<String>,
    /// Certificates keyd keeps in Secrets of type `kubernetes.io/tls`.
    #[serde(default)]
    pub issue: Vec<RawIssue>,
}

/// One `[[cluster_pki.issue]]`: a serving certificate (`server_names`) or a client
/// certificate for an admin or webhook identity (`identity`), never both.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssue {
    pub secret: Option<String>,
    pub server_names: Option<Vec<String>>,
    /// `spiffe://keyd/admin/NAME` or `spiffe://keyd/webhook/NAME`.
    pub identity: Option<String>,
}

fn cerr(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(&format!("cluster_pki.{field}"), message)
}

fn check_server_names(field: &str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if names.is_empty() {
        return Err(cerr(field, "name at least one DNS name or IP address"));
    }
    for name in &names {
        ServerName::try_from(name.as_str()).map_err(|_| {
            cerr(
                field,
                format!("{name:?} is neither a DNS name nor an IP address"),
            )
        })?;
    }
    Ok(names)
}

fn object_name(field: &str, name: &str) -> Result<(), ConfigError> {
    validate_name(name).map_err(|e| cerr(field, format!("{name:?}: {e}")))
}

impl RawClusterPki {
    pub fn validate(self, data_dir: &Path) -> Result<ClusterPkiConfig, ConfigError> {
        if !cfg!(feature = "kube") {
            return Err(ConfigError::new(
                "cluster_pki",
                "this keyd was built without the `kube` feature, so it cannot keep Secrets in \
                 the Kubernetes API; remove the section or use a default build",
            ));
        }
        let kube = kube_api(
            "cluster_pki",
            self.kube_api,
            self.kube_ca,
            self.kube_token_file,
        )?;
        let namespace = match self.namespace {
            Some(ns) => ns,
            None => std::fs::read_to_string(NAMESPACE_FILE)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    cerr(
                        "namespace",
                        format!("not set, and {NAMESPACE_FILE} cannot be read ({e})"),
                    )
                })?,
        };
        object_name("namespace", &namespace)?;
        let ca_secret = self.ca_secret.unwrap_or_else(|| "keyd-ca".to_owned());
        object_name("ca_secret", &ca_secret)?;
        let trust_config_map = self
            .trust_config_map
            .unwrap_or_else(|| "keyd-ca".to_owned());
        object_name("trust_config_map", &trust_config_map)?;
        let server_names = check_server_names(
            "server_names",
            self.server_names.unwrap_or_else(|| {
                let mut names: Vec<String> = ["keyd", &format!("keyd.{namespace}")]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                names.push(format!("keyd.{namespace}.svc"));
                names.push(format!("keyd.{namespace}.svc.cluster.local"));
                names.push("localhost".to_owned());
                names.push("127.0.0.1".to_owned());
                names
            }),
        )?;
        let duration = |field: &str, v: Option<String>, default: &str| {
            humantime::parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|e| cerr(field, e.to_string()))
        };
        let validity = duration("validity", self.validity, "2160h")?;
        if validity < Duration::from_secs(10) || validity > Duration::from_secs(10 * 365 * 86400) {
            return Err(cerr("validity", "must be between 10s and 10 years"));
        }
        let check_interval = duration("check_interval", self.check_interval, "1m")?;
        if check_interval < Duration::from_secs(1) || check_interval > validity / 3 {
            return Err(cerr(
                "check_interval",
                "must be at least 1s and at most a third of `validity` (the renewal margin)",
            ));
        }
        for name in &self.webhook_configurations {
            object_name("webhook_configurations", name)?;
        }
        let mut issue = Vec::new();
        for (i, raw) in self.issue.into_iter().enumerate() {
            let field = |f: &str| format!("issue[{i}].{f}");
            let secret = raw
                .secret
                .ok_or_else(|| cerr(&field("secret"), "required"))?;
            object_name(&field("secret"), &secret)?;
            // `keyd-server` names keyd's own certificate in the expiry metric.
            if secret == ca_secret
                || secret == "keyd-server"
                || issue.iter().any(|o: &Issue| o.secret == secret)
            {
                return Err(cerr(
                    &field("secret"),
                    format!("{secret:?} is already used; every certificate needs its own Secret"),
                ));
            }
            let kind = match (raw.server_names, raw.identity) {
                (Some(names), None) => {
                    IssueKind::Server(check_server_names(&field("server_names"), names)?)
                }
                (None, Some(uri)) => match Identity::parse_uri(&uri) {
                    Ok(Some(id @ (Identity::Admin(_) | Identity::Webhook(_)))) => {
                        IssueKind::Client(id)
                    }
                    Ok(Some(Identity::Node(_))) => {
                        return Err(cerr(
                            &field("identity"),
                            "node certificates come from [bootstrap], never from a Secret",
                        ));
                    }
                    Ok(None) | Err(_) => {
                        return Err(cerr(
                            &field("identity"),
                            format!(
                                "{uri:?} is not spiffe://keyd/admin/NAME or \
                                 spiffe://keyd/webhook/NAME"
                            ),
                        ));
                    }
                },
                _ => {
                    return Err(cerr(
                        &field("server_names"),
                        "set exactly one of `server_names` (a serving certificate) and \
                         `identity` (a client certificate)",
                    ));
                }
            };
            issue.push(Issue { secret, kind });
        }
        Ok(ClusterPkiConfig {
            kube,
            namespace,
            dir: self.dir.unwrap_or_else(|| data_dir.join("cluster-pki")),
            ca_secret,
            trust_config_map,
            server_names,
            validity,
            check_interval,
            webhook_configurations: self.webhook_configurations,
            issue,
        })
    }
}
