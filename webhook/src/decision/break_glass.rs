//! Rule 4: a sensitive pod carrying the break-glass annotation (non-empty) is admitted and
//! recorded with the requesting user, whether or not it needed it.

use super::context::Context;
use super::outcome::{Decision, Outcome, Reason};
use crate::workload::Workload;

/// Longest break-glass justification copied into a record.
const MAX_JUSTIFICATION: usize = 256;

/// The justification in `annotation` on the object's pods (for a workload, its pod template), if
/// any: blank is not a justification.
pub(super) fn justification<'w>(object: &'w Workload, annotation: &str) -> Option<&'w str> {
    object
        .pod_annotations()
        .get(annotation)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// A covered pod: allowed, and recorded if it carried the annotation anyway.
pub(super) fn covered(
    break_glass: Option<&str>,
    ctx: &Context<'_>,
    policies: Vec<String>,
) -> Decision {
    if let Some(j) = break_glass {
        return admit(j, ctx, policies, None);
    }
    Decision {
        policies,
        ..Decision::allow(Reason::Covered, ctx.enforcement)
    }
}

/// Admits under break-glass. `violation` is the reason and summary of what it overrides.
pub(super) fn admit(
    justification: &str,
    ctx: &Context<'_>,
    policies: Vec<String>,
    violation: Option<(Reason, String)>,
) -> Decision {
    let justification: String = justification.chars().take(MAX_JUSTIFICATION).collect();
    // A break-glass over a violation keeps the violation's reason (for metrics).
    let (reason, needed) = match violation {
        Some((r, v)) => (r, format!("it would otherwise be refused: {v}")),
        None => (Reason::Covered, "it was covered anyway".to_owned()),
    };
    let summary = format!(
        "break-glass by {}: {:?}; {needed}",
        ctx.input.user, justification
    );
    Decision {
        allowed: true,
        outcome: Outcome::BreakGlass,
        reason,
        enforcement: ctx.enforcement,
        policies,
        message: summary.clone(),
        warnings: vec![format!(
            "keyd: break-glass annotation {} used on {} by {}; this admission is recorded in \
             keyd's audit log",
            ctx.config.break_glass_annotation,
            ctx.object_ref(),
            ctx.input.user
        )],
        summary,
        record: true,
    }
}
