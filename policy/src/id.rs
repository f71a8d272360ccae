//! How a policy is named.

use std::fmt;

/// Which resource a policy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    Namespaced,
    Cluster,
}

/// Names a policy the way `kubectl` does: `EncryptionPolicy team-a/payments` or
/// `ClusterEncryptionPolicy pci`. Ordered by kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    /// Empty for cluster policies.
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PolicyKind::Namespaced => {
                write!(f, "EncryptionPolicy {}/{}", self.namespace, self.name)
            }
            PolicyKind::Cluster => write!(f, "ClusterEncryptionPolicy {}", self.name),
        }
    }
}
