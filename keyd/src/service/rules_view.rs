//! What the policy watcher last published, as `Keyd` holds it (see `rules`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use keyd_proto::rules::{NodeRules, RejectedPolicy};

/// One node's rules, rendered once per change and shared between fetches.
#[derive(Debug, PartialEq, Eq)]
pub struct RenderedRules {
    /// The quoted revision.
    pub etag: String,
    pub body: Bytes,
    /// The policies' names, by index (what a node's data-plane report may name).
    pub policies: Vec<String>,
    /// The policies left out of this node's rules, and why.
    pub rejected: Vec<RejectedPolicy>,
}

/// What the watcher last published.
#[derive(Debug, Default)]
pub enum RulesView {
    /// No `[policy]` section: the endpoint does not exist on this keyd.
    #[default]
    NotConfigured,
    /// Configured; the watches have not synced yet.
    Pending,
    Ready(BTreeMap<String, Arc<RenderedRules>>),
}

pub(super) fn render(rules: &NodeRules) -> RenderedRules {
    RenderedRules {
        etag: format!("\"{}\"", rules.revision),
        // Serializing plain strings, numbers and prefixes cannot fail.
        body: Bytes::from(serde_json::to_vec(rules).unwrap_or_default()),
        policies: rules.policies.iter().map(|p| p.name.clone()).collect(),
        rejected: rules.rejected.clone(),
    }
}
