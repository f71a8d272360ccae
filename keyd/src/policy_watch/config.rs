//! The watcher's settings, as `[policy]` validates them.

use std::path::PathBuf;

/// How keyd reaches the Kubernetes API (`kube_api`, `kube_ca`, `kube_token_file`, named alike in
/// `[bootstrap]` and `[policy]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeApiConfig {
    /// `https://HOST:PORT`.
    pub api: String,
    /// The API server's CA, PEM.
    pub ca: PathBuf,
    /// A bearer token, re-read as it rotates.
    pub token_file: PathBuf,
}

/// `[policy]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWatchConfig {
    pub kube: KubeApiConfig,
}
