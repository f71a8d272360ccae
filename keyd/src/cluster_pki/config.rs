//! `[cluster_pki]` validated: what keyd keeps, and where.

use std::path::PathBuf;
use std::time::Duration;

use keyd_proto::identity::Identity;

use crate::policy_watch::KubeApiConfig;

/// The label on every object keyd creates here; an object without it is not keyd's to change.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "keyd");

/// `[cluster_pki]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPkiConfig {
    pub kube: KubeApiConfig,
    pub namespace: String,
    /// Holds `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` (mode 0700).
    pub dir: PathBuf,
    pub ca_secret: String,
    pub trust_config_map: String,
    /// The names on keyd's own serving certificate.
    pub server_names: Vec<String>,
    pub validity: Duration,
    pub check_interval: Duration,
    pub webhook_configurations: Vec<String>,
    pub issue: Vec<Issue>,
}

impl ClusterPkiConfig {
    /// The CA certificate: `tls.ca`, what client certificates must chain to.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA key: `bootstrap.ca_key`, what node certificates are signed with.
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// keyd's serving certificate: `tls.cert`.
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// keyd's serving key: `tls.key`.
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
}

/// One certificate kept in a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub secret: String,
    pub kind: IssueKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueKind {
    /// A serving certificate for these names.
    Server(Vec<String>),
    /// A client certificate for an admin or webhook identity.
    Client(Identity),
}

/// `names` as they read back from a certificate: IP addresses in their canonical text, so that
/// a configured name and the certificate's compare equal.
pub fn canonical_names(names: &[String]) -> std::collections::BTreeSet<String> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        })
        .collect()
}
