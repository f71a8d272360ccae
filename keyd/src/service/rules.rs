//! Each node's compiled data-plane rules (`GET /v1/nodes/{name}/rules`), as published by the
//! policy watcher (`crate::policy_watch`), and long polls for a change.
//!
//! The rules are derived, not stored: every replica watches the Kubernetes API and compiles the
//! same rules from it (their revision is a digest of the content, so replicas agree on ETags).
//! Until the watcher has published once, a node's rules are "not ready" rather than empty: an
//! empty rule set would tell node-shim to stop enforcing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyd_proto::rules::{NodeRules, RejectedPolicy};

use super::poll::long_poll;
use super::state::{Keyd, Result, ServiceError};

use super::rules_view::{RenderedRules, RulesView, render};

impl Keyd {
    /// Marks the rules endpoint as served (a `[policy]` section): until [`Keyd::publish_rules`]
    /// runs, fetches answer "not ready".
    pub fn expect_rules(&self) {
        self.rules.send_if_modified(|v| match v {
            RulesView::NotConfigured => {
                *v = RulesView::Pending;
                true
            }
            RulesView::Pending | RulesView::Ready(_) => false,
        });
    }

    /// Replaces every node's rules; wakes the long polls of the nodes whose rules changed (all
    /// of them are woken, each compares its own ETag). Returns how many nodes' rules changed.
    pub fn publish_rules(&self, compiled: &BTreeMap<String, NodeRules>) -> usize {
        let rejected: std::collections::BTreeSet<&str> = compiled
            .values()
            .flat_map(|r| r.rejected.iter().map(|p| p.name.as_str()))
            .collect();
        let m = &self.metrics.rules;
        m.compiles.inc();
        m.ready.set(1);
        m.rejected_policies
            .set(i64::try_from(rejected.len()).unwrap_or(i64::MAX));
        // Rendered outside the channel's lock, so fetches are not held up by a large compile;
        // the watcher is the only publisher, so nothing changes the view meanwhile.
        let (old, first) = match &*self.rules.borrow() {
            RulesView::Ready(m) => (m.clone(), false),
            RulesView::NotConfigured | RulesView::Pending => (BTreeMap::new(), true),
        };
        let mut changed = 0;
        let mut next = BTreeMap::new();
        for (name, rules) in compiled {
            let kept = old
                .get(name)
                .filter(|r| r.etag.trim_matches('"') == rules.revision)
                .cloned();
            let r = kept.unwrap_or_else(|| {
                changed += 1;
                Arc::new(render(rules))
            });
            next.insert(name.clone(), r);
        }
        changed += old.keys().filter(|n| !next.contains_key(*n)).count();
        if first || changed > 0 {
            self.rules.send_replace(RulesView::Ready(next));
        }
        changed
    }

    /// Every policy some node's rules leave out, once, with the first node's reason and on how
    /// many nodes (for the webhook: such a policy covers no pod). Empty until the watcher has
    /// published, and without a `[policy]` section.
    pub fn rejected_policies(&self) -> Vec<RejectedPolicy> {
        let mut by_name: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
        let view = self.rules.borrow();
        let RulesView::Ready(nodes) = &*view else {
            return Vec::new();
        };
        for r in nodes.values().flat_map(|n| n.rejected.iter()) {
            by_name.entry(&r.name).or_insert((&r.reason, 0)).1 += 1;
        }
        by_name
            .into_iter()
            .map(|(name, (reason, nodes))| RejectedPolicy {
                name: name.to_owned(),
                reason: if nodes > 1 {
                    format!("{reason} (left out on {nodes} nodes)")
                } else {
                    reason.to_owned()
                },
            })
            .collect()
    }

    /// Whether rules are expected (`[policy]`) and not yet compiled.
    pub fn rules_pending(&self) -> bool {
        matches!(&*self.rules.borrow(), RulesView::Pending)
    }

    /// The node's current rules.
    pub fn node_rules(&self, name: &str) -> Result<Arc<RenderedRules>> {
        self.node_rules_if_ready(name)?.ok_or_else(|| {
            ServiceError::RulesNotReady(format!(
                "the rules of node {name:?} are not compiled yet (keyd's watches of the \
                 Kubernetes API have not synced, or the node registered a moment ago); retry"
            ))
        })
    }

    /// `None` while not ready (the watches not synced, or a just-registered node not yet
    /// compiled); a node that is not registered is an error.
    fn node_rules_if_ready(&self, name: &str) -> Result<Option<Arc<RenderedRules>>> {
        let view = self.rules.borrow();
        match &*view {
            RulesView::NotConfigured => Err(ServiceError::PolicyNotConfigured),
            RulesView::Pending => Ok(None),
            RulesView::Ready(m) => match m.get(name) {
                Some(r) => Ok(Some(Arc::clone(r))),
                None if self.cache().nodes.contains_key(name) => Ok(None),
                None => Err(ServiceError::NotFound(format!(
                    "node {name:?} is not registered"
                ))),
            },
        }
    }

    /// Long poll: the node's rules once their revision differs from `etag`, or `None` when
    /// `wait` passes without a change.
    pub async fn node_rules_wait(
        &self,
        name: &str,
        etag: &str,
        wait: Duration,
    ) -> Result<Option<Arc<RenderedRules>>> {
        let changed = self.rules.subscribe();
        long_poll(
            changed,
            etag,
            wait,
            move || std::future::ready(self.node_rules_if_ready(name)),
            |r: &Arc<RenderedRules>| r.etag.as_str(),
        )
        .await
    }

    /// The policy names of the node's current rules; `None` while they are not compiled yet.
    pub(super) fn rule_policy_names(&self, name: &str) -> Result<Option<Vec<String>>> {
        Ok(self.node_rules_if_ready(name)?.map(|r| r.policies.clone()))
    }

    /// Moves after every change of keyd's state (a node registering, among others): the
    /// watcher recompiles on it, since the rules depend on the registered nodes.
    pub fn state_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Counts a rules fetch by outcome (`full`, `not_modified`).
    pub fn count_rules_fetch(&self, outcome: &'static str) {
        self.metrics
            .rules
            .fetches
            .get_or_create(&crate::telemetry::Outcome { outcome })
            .inc();
    }

    /// Whether the watcher has published rules at least once.
    pub fn rules_ready(&self) -> bool {
        matches!(&*self.rules.borrow(), RulesView::Ready(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::seal::{Key256, KeyWrapper, LocalKek};
    use crate::service::ServiceConfig;
    use crate::store::{RedbStore, Store};
    use keyd_proto::rules::RejectedPolicy;

    fn rules(node: &str, revision: &str, rejected: &[(&str, &str)]) -> NodeRules {
        NodeRules {
            node: node.into(),
            revision: revision.into(),
            policies: Vec::new(),
            endpoints: Vec::new(),
            rejected: rejected
                .iter()
                .map(|(name, reason)| RejectedPolicy {
                    name: (*name).into(),
                    reason: (*reason).into(),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn enforcement_status_says_which_policies_the_rules_leave_out_and_when_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let kek: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
            Key256::random().unwrap(),
            dir.path().join("kek"),
        ));
        let keyd = Keyd::open(store, kek, ServiceConfig::default(), Clock::default())
            .await
            .unwrap();
        // No [policy]: nothing pending, nothing left out.
        let s = keyd.enforcement_status();
        assert!(!s.rules_pending && s.rejected_policies.is_empty(), "{s:?}");
        keyd.expect_rules();
        assert!(keyd.enforcement_status().rules_pending);

        let bad = "EncryptionPolicy a/bad";
        let many = "EncryptionPolicy a/many";
        let compiled = BTreeMap::from([
            (
                "n1".to_owned(),
                rules("n1", "r1", &[(bad, "podSelector: malformed")]),
            ),
            (
                "n2".to_owned(),
                rules(
                    "n2",
                    "r2",
                    &[
                        (bad, "podSelector: malformed"),
                        (many, "node \"n2\" is concerned by too many policies"),
                    ],
                ),
            ),
        ]);
        keyd.publish_rules(&compiled);
        let s = keyd.enforcement_status();
        assert!(!s.rules_pending);
        assert_eq!(
            s.rejection(bad),
            Some("podSelector: malformed (left out on 2 nodes)")
        );
        assert_eq!(
            s.rejection(many),
            Some("node \"n2\" is concerned by too many policies")
        );
        assert_eq!(s.rejected_policies.len(), 2);

        // Fixed everywhere: no longer listed.
        keyd.publish_rules(&BTreeMap::from([("n1".to_owned(), rules("n1", "r3", &[]))]));
        assert!(keyd.enforcement_status().rejected_policies.is_empty());
    }
}
