//! Rule 3: what makes a pod sensitive. The pod label rule, or the namespace label rule, or both
//! (each optional); a namespace the caller does not know may be sensitive.

use super::input::{DecisionConfig, LabelRule};
use crate::crd::Labels;

/// Which rules make the pod sensitive.
pub(super) struct Sensitivity<'a> {
    pub(super) by_pod: Option<&'a LabelRule>,
    pub(super) by_namespace: Option<&'a LabelRule>,
    /// The namespace is unknown and the namespace rule is on, so it cannot be ruled out.
    pub(super) namespace_unknown: bool,
}

impl<'a> Sensitivity<'a> {
    pub(super) fn of(
        pod_labels: &Labels,
        namespace_labels: Option<&Labels>,
        config: &'a DecisionConfig,
    ) -> Self {
        let by_pod = config
            .sensitive_pod_label
            .as_ref()
            .filter(|r| r.matches(pod_labels));
        let by_namespace = match (&config.sensitive_namespace_label, namespace_labels) {
            (Some(r), Some(l)) if r.matches(l) => Some(r),
            _ => None,
        };
        Self {
            by_pod,
            by_namespace,
            namespace_unknown: namespace_labels.is_none()
                && config.sensitive_namespace_label.is_some(),
        }
    }

    /// A rule matched: the pod is sensitive for certain.
    pub(super) fn is_known(&self) -> bool {
        self.by_pod.is_some() || self.by_namespace.is_some()
    }

    /// Sensitive for certain, or possibly (unknown namespace).
    pub(super) fn is_possible(&self) -> bool {
        self.is_known() || self.namespace_unknown
    }

    /// For messages: `pod label keyd.io/sensitive=true`.
    pub(super) fn why(&self, namespace: &str) -> String {
        match (self.by_pod, self.by_namespace) {
            (Some(p), Some(n)) => {
                format!("pod label {p}, and namespace {namespace} has label {n}")
            }
            (Some(p), None) => format!("pod label {p}"),
            (None, Some(n)) => format!("namespace {namespace} has label {n}"),
            (None, None) => format!("namespace {namespace} may be sensitive"),
        }
    }
}
