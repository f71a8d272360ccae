//! The request being judged, as the messages about it need it.

use super::input::{DecisionConfig, Enforcement, Input};

/// The request being judged, and what the messages about it need.
pub(super) struct Context<'a> {
    pub(super) input: &'a Input<'a>,
    pub(super) enforcement: Enforcement,
    pub(super) enforcement_note: Option<String>,
    pub(super) why_sensitive: String,
    pub(super) config: &'a DecisionConfig,
}

impl Context<'_> {
    /// `Pod team-a/web`.
    pub(super) fn object_ref(&self) -> String {
        format!(
            "{} {}/{}",
            self.input.object.kind,
            self.input.namespace,
            self.input.object.display_name()
        )
    }

    /// "it" for a pod, "its pods" for a workload.
    pub(super) fn subject(&self) -> &'static str {
        if self.input.object.is_pod() {
            "it"
        } else {
            "its pods"
        }
    }

    pub(super) fn where_annotation(&self) -> &'static str {
        if self.input.object.is_pod() {
            "on the pod"
        } else {
            "on the pod template (spec.template.metadata.annotations)"
        }
    }
}
