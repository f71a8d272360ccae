//! The admission decision: a pure function of (object, namespace, policies, keyd status,
//! config). No clock, no I/O, no global state: everything it looks at is an argument, so it is
//! tested on its own and benchmarked without a server.
//!
//! The rule, in order:
//! 1. A namespace in `exempt_namespaces` is never checked.
//! 2. An UPDATE that leaves the pod labels and the break-glass annotation as they were is
//!    allowed: it cannot change whether the pods are covered, and refusing it would block
//!    unrelated edits (finalizers, controller bookkeeping) once a policy is removed.
//! 3. Pods that are not sensitive are allowed. Sensitive: the pod label rule, or the namespace
//!    label rule, or both (each optional).
//! 4. A sensitive pod carrying the break-glass annotation (non-empty) is admitted and recorded
//!    with the requesting user, whether or not it needed it.
//! 5. A sensitive pod is covered when at least one policy selects it and keyd reports that
//!    policy's mode active and its keys within schedule. Covered pods are allowed.
//! 6. Otherwise the enforcement mode (the namespace's label, else the cluster default) decides:
//!    `enforce` denies, `warn` admits with a warning, `audit` admits; each is recorded.
//!
//! When keyd's status is unknown (unreachable, or older than the allowed staleness) a sensitive
//! pod that a policy selects cannot be confirmed: `when_keyd_unavailable = deny` (the default)
//! treats that as not covered; `allow` admits it with a warning and records it as `warned`. The
//! same holds while keyd answers but has not compiled its data-plane rules since it started
//! (reason `rules_pending` rather than `keyd_unavailable`, so that metrics tell them apart).
//!
//! Each step has its module: `input` and `outcome` hold the types, then `sensitivity` (rule 3),
//! `break_glass` (rule 4), `coverage` (rule 5), `enforcement` (rule 6 and the unavailable rule);
//! `violation` and `example` write what is missing and the fix.

mod break_glass;
mod context;
mod coverage;
mod enforcement;
mod example;
mod input;
mod outcome;
mod sensitivity;
#[cfg(test)]
mod tests;
mod violation;

pub use input::mode_ready;
pub use input::{
    DecisionConfig, Enforcement, Input, KeydView, LabelRule, Operation, WhenKeydUnavailable,
};
pub use outcome::{Decision, Outcome, Reason};

use crate::crd::Labels;
use crate::policy::PolicySet;
use context::Context;
use sensitivity::Sensitivity;
use violation::Violation;

/// Decides one admission request. Pure: see the module documentation for the rule.
///
/// `namespace_labels` is `None` when the namespace is unknown to the caller.
pub fn decide(
    input: &Input<'_>,
    namespace_labels: Option<&Labels>,
    policies: &PolicySet,
    keyd: &KeydView,
    config: &DecisionConfig,
) -> Decision {
    let (enforcement, enforcement_note) = enforcement::for_namespace(namespace_labels, config);
    if config.exempt_namespaces.contains(input.namespace) {
        return Decision::allow(Reason::Exempt, enforcement);
    }
    let break_glass = break_glass::justification(input.object, &config.break_glass_annotation);
    if is_unchanged(input, break_glass, config) {
        return Decision::allow(Reason::Unchanged, enforcement);
    }
    let pod_labels = input.object.pod_labels();
    let sensitivity = Sensitivity::of(pod_labels, namespace_labels, config);
    if !sensitivity.is_possible() {
        return Decision::allow(Reason::NotSensitive, enforcement);
    }
    let ctx = Context {
        input,
        enforcement,
        enforcement_note,
        why_sensitive: sensitivity.why(input.namespace),
        config,
    };

    let selecting = coverage::selecting(
        &sensitivity,
        policies,
        input.namespace,
        pod_labels,
        namespace_labels,
    );
    let policy_names: Vec<String> = selecting.iter().map(|p| p.id.to_string()).collect();
    let violation = match coverage::check(&sensitivity, &selecting, policies, input.namespace, keyd)
    {
        Ok(()) => return break_glass::covered(break_glass, &ctx, policy_names),
        Err(v) => v,
    };
    let unconfirmed = match &violation {
        Violation::KeydUnavailable { why, .. } => Some(&**why),
        Violation::RulesPending { .. } => Some(violation::RULES_PENDING),
        _ => None,
    };
    if let Some(why) = unconfirmed
        && config.when_keyd_unavailable == WhenKeydUnavailable::Allow
        && break_glass.is_none()
    {
        return enforcement::fail_open(why, violation.reason(), &ctx, policy_names);
    }
    if let Some(justification) = break_glass {
        let overridden = (violation.reason(), violation.summary(&ctx));
        return break_glass::admit(justification, &ctx, policy_names, Some(overridden));
    }
    enforcement::apply(&violation, &ctx, keyd, policy_names)
}

/// Rule 2: an UPDATE that keeps the pod labels and the break-glass annotation (`break_glass`,
/// the new object's) cannot change whether the pods are covered.
fn is_unchanged(input: &Input<'_>, break_glass: Option<&str>, config: &DecisionConfig) -> bool {
    let (Operation::Update, Some(old)) = (input.operation, input.old_object) else {
        return false;
    };
    old.pod_labels() == input.object.pod_labels()
        && break_glass::justification(old, &config.break_glass_annotation) == break_glass
}
