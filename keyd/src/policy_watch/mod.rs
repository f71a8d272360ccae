//! The policy watcher: one watch each of pods, namespaces, `EncryptionPolicy` and
//! `ClusterEncryptionPolicy` for the whole cluster (kube-runtime reflectors), recompiled into
//! every node's rules on any change (and on a node registering), published to
//! [`crate::service::Keyd::publish_rules`]. Nodes read their own rules from keyd, so the API
//! server's load does not grow with nodes x pods.
//!
//! The Kubernetes client is behind the `kube` feature (on by default); without it keyd refuses
//! a `[policy]` section at startup.

use std::path::PathBuf;

#[cfg(feature = "kube")]
mod pod;
#[cfg(feature = "kube")]
mod reflect;

#[cfg(feature = "kube")]
pub use reflect::{WatchError, start};

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
