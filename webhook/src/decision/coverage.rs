//! Rule 5: a sensitive pod is covered when a policy selects it and keyd reports that policy's
//! mode ready. Otherwise this says what is missing, as a [`Violation`].

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
        KeydView::Known(status) => {
            if selecting.iter().any(|p| mode_ready(status, p.mode)) {
                return Ok(());
            }
            Err(Violation::ModeNotReady {
                status: Arc::clone(status),
                selecting: owned(),
            })
        }
        KeydView::Unknown(why) => Err(Violation::KeydUnavailable {
            why: Arc::clone(why),
            selecting: owned(),
        }),
    }
}
