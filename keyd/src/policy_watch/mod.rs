//! The policy watcher: one watch each of pods, namespaces, `EncryptionPolicy` and
//! `ClusterEncryptionPolicy` for the whole cluster (kube-runtime reflectors), recompiled into
//! every node's rules on any change (and on a node registering), published to
//! [`crate::service::Keyd::publish_rules`]. Nodes read their own rules from keyd, so the API
//! server's load does not grow with nodes x pods.
//!
//! The Kubernetes client is behind the `kube` feature (on by default); without it keyd refuses
//! a `[policy]` section at startup.

mod config;
#[cfg(feature = "kube")]
mod pod;

pub use config::{KubeApiConfig, PolicyWatchConfig};
#[cfg(feature = "kube")]
mod reflect;

#[cfg(feature = "kube")]
pub use reflect::{WatchError, client, start};
