//! Rule 5: a sensitive pod is covered when a policy selects it, keyd reports that policy's
//! mode ready, and keyd's rule compiler did not leave the policy out of any node's rules.
//! Otherwise this says what is missing, as a [`Violation`].

use std::sync::Arc;

use super::input::{KeydView, mode_ready};
use super::sensitivity::Sensitivity;
use super::violation::Violation;
use crate::crd::Labels;
use crate::policy::{CompiledPolicy, PolicySet};

/// The policies that select the pod. None when only an unknown namespace could make it
/// sensitive: then there is nothing to select against.
pub(super) fn selecting<'p>(
    sensitivity: &Sensitivity<'_>,
    policies: &'p PolicySet,
    namespace: &str,
    pod_labels: &Labels,
    namespace_labels: Option<&Labels>,
) -> Vec<&'p CompiledPolicy> {
    if !sensitivity.is_known() {
        return Vec::new();
    }
    policies
        .candidates_for(namespace, namespace_labels)
        .filter(|p| p.selects(pod_labels, namespace_labels))
        .collect()
}

/// `Ok` when covered; otherwise what is missing.
pub(super) fn check(
    sensitivity: &Sensitivity<'_>,
    selecting: &[&CompiledPolicy],
    policies: &PolicySet,
    namespace: &str,
    keyd: &KeydView,
) -> Result<(), Violation> {
    if sensitivity.namespace_unknown && sensitivity.by_pod.is_none() {
        return Err(Violation::NamespaceUnknown);
    }
    if selecting.is_empty() {
        let ignored: Vec<String> = policies
            .candidates(namespace)
            .filter_map(|p| p.selector_error().map(|e| format!("{} ({e})", p.id)))
            .collect();
        return Err(Violation::NoPolicy { ignored });
    }
    let owned = || -> Vec<CompiledPolicy> { selecting.iter().map(|p| (*p).clone()).collect() };
    match keyd {
        KeydView::Known(status) if status.rules_pending => {
            Err(Violation::RulesPending { selecting: owned() })
        }
        KeydView::Known(status) => {
            // A policy keyd's rules leave out of some node is not enforced there: it covers no
            // pod (the pod may be scheduled on that node, or talk to one).
            let (enforced, rejected): (Vec<&CompiledPolicy>, Vec<&CompiledPolicy>) = selecting
                .iter()
                .partition(|p| status.rejection(&p.id.to_string()).is_none());
            if enforced.iter().any(|p| mode_ready(status, p.mode)) {
                return Ok(());
            }
            let rejected: Vec<(String, String)> = rejected
                .iter()
                .map(|p| {
                    let id = p.id.to_string();
                    let why = status.rejection(&id).unwrap_or_default().to_owned();
                    (id, why)
                })
                .collect();
            if enforced.is_empty() {
                return Err(Violation::PolicyRejected { rejected });
            }
            Err(Violation::ModeNotReady {
                status: Arc::clone(status),
                selecting: enforced.into_iter().cloned().collect(),
                rejected,
            })
        }
        KeydView::Unknown(why) => Err(Violation::KeydUnavailable {
            why: Arc::clone(why),
            selecting: owned(),
        }),
    }
}
