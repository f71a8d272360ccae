//! Rule 6 and the keyd-unavailable rule: what a missing coverage leads to. The enforcement mode
//! (the namespace's label, else the cluster default) decides: `enforce` denies, `warn` admits
//! with a warning, `audit` admits; each is recorded. When keyd's status is unknown and the
//! webhook is configured to fail open, the pod is admitted with a warning instead.

use super::context::Context;
use super::input::{DecisionConfig, Enforcement, KeydView};
use super::outcome::{Decision, Outcome, Reason};
use super::violation::Violation;
use crate::crd::Labels;

/// The namespace's enforcement mode, and a note when its label is not a valid mode (then the
/// strictest mode applies: a typo must not weaken enforcement).
pub(super) fn for_namespace(
    namespace_labels: Option<&Labels>,
    config: &DecisionConfig,
) -> (Enforcement, Option<String>) {
    let (Some(key), Some(labels)) = (&config.namespace_enforcement_label, namespace_labels) else {
        return (config.enforcement, None);
    };
    match labels.get(key) {
        None => (config.enforcement, None),
        Some(v) => match Enforcement::parse(v) {
            Some(e) => (e, None),
            None => (
                Enforcement::Enforce,
                Some(format!(
                    "the namespace label {key}={v} is not one of enforce, warn, audit, so \
                     enforce applies"
                )),
            ),
        },
    }
}

/// The decision for a pod that `violation` leaves uncovered, by the enforcement mode.
pub(super) fn apply(
    violation: &Violation,
    ctx: &Context<'_>,
    keyd: &KeydView,
    policies: Vec<String>,
) -> Decision {
    let summary = violation.summary(ctx);
    let (allowed, outcome, warnings) = match ctx.enforcement {
        Enforcement::Enforce => (false, Outcome::Denied, Vec::new()),
        Enforcement::Warn => (
            true,
            Outcome::Warned,
            vec![format!(
                "keyd: {} would be refused: {summary} (enforcement is warn in namespace {})",
                ctx.object_ref(),
                ctx.input.namespace
            )],
        ),
        Enforcement::Audit => (true, Outcome::Audited, Vec::new()),
    };
    Decision {
        allowed,
        outcome,
        reason: violation.reason(),
        enforcement: ctx.enforcement,
        policies,
        message: violation.message(ctx, keyd),
        summary,
        warnings,
        record: true,
    }
}

/// Admits a selected pod whose coverage keyd cannot confirm (`why`), because the webhook is
/// configured to fail open (`keyd.when_unavailable = allow`).
pub(super) fn fail_open(
    why: &str,
    reason: Reason,
    ctx: &Context<'_>,
    policies: Vec<String>,
) -> Decision {
    let summary = format!(
        "selected by {} but keyd's status is unknown ({why}); admitted because \
         keyd.when_unavailable = allow",
        policies.join(", ")
    );
    Decision {
        allowed: true,
        outcome: Outcome::Warned,
        reason,
        enforcement: ctx.enforcement,
        warnings: vec![format!(
            "keyd: {} is sensitive and its encryption could not be confirmed \
             (keyd unavailable); admitted because the webhook fails open",
            ctx.object_ref()
        )],
        message: summary.clone(),
        summary,
        policies,
        record: true,
    }
}
