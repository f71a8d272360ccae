//! The policies in force, compiled and indexed for the admission decision.
//!
//! A [`PolicySet`] is built from the reflector caches whenever a policy changes (never per
//! request): selectors are validated once, namespaced policies are indexed by namespace, and the
//! cluster-wide ones are kept in a list. A decision then looks only at the policies of the pod's
//! namespace plus the cluster-wide ones.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::crd::{ClusterEncryptionPolicy, EncryptionPolicy, Labels, Mode};
use crate::selector::{Selector, SelectorError};

pub use keyd_policy::id::{PolicyKind, PolicyRef};

/// One policy, its selectors validated.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub id: PolicyRef,
    pub mode: Mode,
    pub generation: Option<i64>,
    /// `Err` when a selector is malformed: the policy then selects nothing.
    selectors: Result<Selectors, InvalidSelector>,
}

#[derive(Debug, Clone)]
struct Selectors {
    pods: Selector,
    /// Cluster policies only.
    namespaces: Option<Selector>,
}

impl CompiledPolicy {
    pub fn namespaced(p: &EncryptionPolicy) -> Self {
        let selectors = Selector::compile(&p.spec.pod_selector)
            .map_err(invalid("podSelector"))
            .map(|pods| Selectors {
                pods,
                namespaces: None,
            });
        Self {
            id: PolicyRef {
                kind: PolicyKind::Namespaced,
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
            },
            mode: p.spec.mode,
            generation: p.metadata.generation,
            selectors,
        }
    }

    pub fn cluster(p: &ClusterEncryptionPolicy) -> Self {
        let selectors = Selector::compile(&p.spec.namespace_selector)
            .map_err(invalid("namespaceSelector"))
            .and_then(|namespaces| {
                Selector::compile(&p.spec.pod_selector)
                    .map_err(invalid("podSelector"))
                    .map(|pods| Selectors {
                        pods,
                        namespaces: Some(namespaces),
                    })
            });
        Self {
            id: PolicyRef {
                kind: PolicyKind::Cluster,
                namespace: String::new(),
                name: p.metadata.name.clone().unwrap_or_default(),
            },
            mode: p.spec.mode,
            generation: p.metadata.generation,
            selectors,
        }
    }

    /// The selector problem, if the policy has one.
    pub fn selector_error(&self) -> Option<&InvalidSelector> {
        self.selectors.as_ref().err()
    }

    /// Whether a cluster policy's namespace selector matches (false for a malformed policy;
    /// true for a namespaced policy, which has none).
    fn namespace_selector_matches(&self, ns_labels: &Labels) -> bool {
        match &self.selectors {
            Ok(s) => s.namespaces.as_ref().is_none_or(|n| n.matches(ns_labels)),
            Err(_) => false,
        }
    }

    /// Whether this policy selects a pod with `pod_labels` in a namespace with `ns_labels`
    /// (`None`: the namespace's labels are unknown, so no namespace selector can match; an
    /// `EncryptionPolicy` needs no namespace labels). The caller has already matched the
    /// namespace of a namespaced policy.
    pub fn selects(&self, pod_labels: &Labels, ns_labels: Option<&Labels>) -> bool {
        let Ok(s) = &self.selectors else {
            return false;
        };
        if let Some(ns_sel) = &s.namespaces {
            match ns_labels {
                Some(l) if ns_sel.matches(l) => {}
                _ => return false,
            }
        }
        s.pods.matches(pod_labels)
    }
}

/// A policy's malformed selector: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {error}")]
pub struct InvalidSelector {
    /// `podSelector` or `namespaceSelector`.
    pub field: &'static str,
    pub error: SelectorError,
}

fn invalid(field: &'static str) -> impl FnOnce(SelectorError) -> InvalidSelector {
    move |error| InvalidSelector { field, error }
}

/// Every policy in force, indexed.
#[derive(Debug, Default)]
pub struct PolicySet {
    by_namespace: HashMap<String, Vec<CompiledPolicy>>,
    cluster: Vec<CompiledPolicy>,
    /// Per namespace, which cluster policies' namespace selectors match its labels: computed on
    /// a namespace's first review and reused while its labels stay the same, so that a review
    /// evaluates only those. A memo of a pure function: it changes no answer, only its cost.
    namespace_memo: RwLock<NamespaceMemo>,
}

/// Namespace name to (the labels the entry was computed for, matching cluster policy indexes).
type NamespaceMemo = HashMap<String, (Labels, Arc<[usize]>)>;

/// Beyond this many namespaces the memo starts over (bounds its memory).
const MEMO_LIMIT: usize = 100_000;

impl PolicySet {
    pub fn new(
        namespaced: impl IntoIterator<Item = CompiledPolicy>,
        cluster: impl IntoIterator<Item = CompiledPolicy>,
    ) -> Self {
        let mut by_namespace: HashMap<String, Vec<CompiledPolicy>> = HashMap::new();
        for p in namespaced {
            by_namespace
                .entry(p.id.namespace.clone())
                .or_default()
                .push(p);
        }
        // Sorted so that messages list policies in a stable order.
        for v in by_namespace.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let mut cluster: Vec<_> = cluster.into_iter().collect();
        cluster.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            by_namespace,
            cluster,
            namespace_memo: RwLock::default(),
        }
    }

    /// From the custom resources themselves.
    pub fn from_resources<'a>(
        namespaced: impl IntoIterator<Item = &'a EncryptionPolicy>,
        cluster: impl IntoIterator<Item = &'a ClusterEncryptionPolicy>,
    ) -> Self {
        Self::new(
            namespaced.into_iter().map(CompiledPolicy::namespaced),
            cluster.into_iter().map(CompiledPolicy::cluster),
        )
    }

    /// The policies that could apply to a pod of `namespace`: that namespace's own, then the
    /// cluster-wide ones.
    pub fn candidates<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a CompiledPolicy> {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .chain(self.cluster.iter())
    }

    /// The policies that may select a pod of `namespace` whose labels are `namespace_labels`:
    /// that namespace's own, then the cluster-wide ones whose namespace selector matches
    /// (none when the labels are unknown). The caller still applies
    /// [`CompiledPolicy::selects`].
    pub fn candidates_for<'a>(
        &'a self,
        namespace: &str,
        namespace_labels: Option<&Labels>,
    ) -> impl Iterator<Item = &'a CompiledPolicy> {
        let cluster = match namespace_labels {
            Some(labels) if !self.cluster.is_empty() => self.cluster_matching(namespace, labels),
            _ => Arc::from([]),
        };
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .chain((0..cluster.len()).filter_map(move |i| self.cluster.get(cluster[i])))
    }

    /// Indexes into `cluster` of the policies whose namespace selector matches `labels`.
    fn cluster_matching(&self, namespace: &str, labels: &Labels) -> Arc<[usize]> {
        {
            let memo = self
                .namespace_memo
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((seen, hits)) = memo.get(namespace)
                && seen == labels
            {
                return Arc::clone(hits);
            }
        }
        let hits: Arc<[usize]> = self
            .cluster
            .iter()
            .enumerate()
            .filter(|(_, p)| p.namespace_selector_matches(labels))
            .map(|(i, _)| i)
            .collect();
        let mut memo = self
            .namespace_memo
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert(namespace.to_owned(), (labels.clone(), Arc::clone(&hits)));
        hits
    }

    /// Every policy.
    pub fn all(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.by_namespace
            .values()
            .flatten()
            .chain(self.cluster.iter())
    }

    pub fn len(&self) -> usize {
        self.by_namespace.values().map(Vec::len).sum::<usize>() + self.cluster.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shareable snapshot.
pub type SharedPolicySet = Arc<PolicySet>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        ClusterEncryptionPolicySpec, EncryptionPolicySpec, LabelSelector, LabelSelectorRequirement,
    };

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn candidates_are_the_namespace_own_then_cluster_policies() {
        let mut a = EncryptionPolicy::new(
            "a",
            EncryptionPolicySpec {
                pod_selector: LabelSelector::default(),
                mode: Mode::Ipsec,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        a.metadata.namespace = Some("ns1".into());
        let mut b = a.clone();
        b.metadata.namespace = Some("ns2".into());
        let c = ClusterEncryptionPolicy::new(
            "c",
            ClusterEncryptionPolicySpec {
                namespace_selector: LabelSelector {
                    match_labels: labels(&[("team", "x")]),
                    match_expressions: vec![],
                },
                pod_selector: LabelSelector::default(),
                mode: Mode::Wireguard,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        let set = PolicySet::from_resources([&a, &b], [&c]);
        assert_eq!(set.len(), 3);
        let names: Vec<String> = set.candidates("ns1").map(|p| p.id.to_string()).collect();
        assert_eq!(
            names,
            ["EncryptionPolicy ns1/a", "ClusterEncryptionPolicy c"]
        );
        assert_eq!(set.candidates("other").count(), 1);

        // With namespace labels, only cluster policies whose namespace selector matches.
        let team_x = labels(&[("team", "x")]);
        let names: Vec<String> = set
            .candidates_for("ns1", Some(&team_x))
            .map(|p| p.id.to_string())
            .collect();
        assert_eq!(
            names,
            ["EncryptionPolicy ns1/a", "ClusterEncryptionPolicy c"]
        );
        assert_eq!(set.candidates_for("ns1", Some(&Labels::new())).count(), 1);
        assert_eq!(set.candidates_for("ns1", None).count(), 1);
        // The memo follows a label change of the same namespace.
        assert_eq!(set.candidates_for("other", Some(&team_x)).count(), 1);
        assert_eq!(set.candidates_for("other", Some(&Labels::new())).count(), 0);
        assert_eq!(set.candidates_for("other", Some(&team_x)).count(), 1);

        let cp = set.candidates("other").next().unwrap();
        assert!(cp.selects(&Labels::new(), Some(&labels(&[("team", "x")]))));
        assert!(!cp.selects(&Labels::new(), Some(&Labels::new())));
        assert!(
            !cp.selects(&Labels::new(), None),
            "unknown namespace labels never match a namespace selector"
        );
    }

    #[test]
    fn a_malformed_selector_selects_nothing_and_says_where() {
        let c = ClusterEncryptionPolicy::new(
            "bad",
            ClusterEncryptionPolicySpec {
                namespace_selector: LabelSelector::default(),
                pod_selector: LabelSelector {
                    match_labels: labels(&[("ok", "yes"), ("bad key", "v")]),
                    match_expressions: vec![LabelSelectorRequirement {
                        key: "x".into(),
                        operator: "Exists".into(),
                        values: vec![],
                    }],
                },
                mode: Mode::Ipsec,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        let p = CompiledPolicy::cluster(&c);
        let err = p.selector_error().expect("malformed");
        assert!(
            err.to_string().starts_with("podSelector: matchLabels"),
            "{err}"
        );
        assert!(!p.selects(&labels(&[("ok", "yes"), ("x", "1")]), Some(&Labels::new())));
    }
}
