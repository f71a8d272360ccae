//! What is missing when a sensitive pod is not covered, said twice: one line for the audit record
//! and the log, and the full message with the fix for the person whose request is refused.

use std::fmt::Write as _;
use std::sync::Arc;

use keyd_proto::{EncryptionMode, EnforcementStatus};

use super::context::Context;
use super::example::example_policy;
use super::input::{KeydView, first_ready_mode};
use super::outcome::Reason;
use crate::crd::Mode;
use crate::policy::{CompiledPolicy, PolicyKind};

/// Why a [`Violation::RulesPending`] cannot be confirmed, in the summary and for fail-open.
pub(super) const RULES_PENDING: &str = "keyd has not compiled its data-plane rules since it \
     started, so it cannot say yet which policies it enforces";

pub(super) enum Violation {
    NoPolicy {
        /// Candidate policies ignored for a malformed selector, with the problem.
        ignored: Vec<String>,
    },
    ModeNotReady {
        status: Arc<EnforcementStatus>,
        /// The selecting policies keyd enforces.
        selecting: Vec<CompiledPolicy>,
        /// The selecting policies keyd's rules leave out: (policy, keyd's reason).
        rejected: Vec<(String, String)>,
    },
    /// Every selecting policy is left out of some node's rules: (policy, keyd's reason).
    PolicyRejected {
        rejected: Vec<(String, String)>,
    },
    KeydUnavailable {
        why: Arc<str>,
        selecting: Vec<CompiledPolicy>,
    },
    /// keyd answers, but has not compiled its data-plane rules since it started.
    RulesPending {
        selecting: Vec<CompiledPolicy>,
    },
    NamespaceUnknown,
}

impl Violation {
    pub(super) fn reason(&self) -> Reason {
        match self {
            Violation::NoPolicy { .. } => Reason::NoPolicy,
            Violation::ModeNotReady { .. } => Reason::ModeNotReady,
            Violation::PolicyRejected { .. } => Reason::PolicyRejected,
            Violation::KeydUnavailable { .. } => Reason::KeydUnavailable,
            Violation::RulesPending { .. } => Reason::RulesPending,
            Violation::NamespaceUnknown => Reason::NamespaceUnknown,
        }
    }

    /// One line, without the fix.
    pub(super) fn summary(&self, ctx: &Context<'_>) -> String {
        match self {
            Violation::NoPolicy { .. } => format!(
                "sensitive ({}) but no EncryptionPolicy or ClusterEncryptionPolicy selects {}",
                ctx.why_sensitive,
                ctx.subject()
            ),
            Violation::ModeNotReady {
                status,
                selecting,
                rejected,
            } => {
                let mut parts: Vec<String> = selecting
                    .iter()
                    .map(|p| {
                        format!(
                            "{} requires {} ({})",
                            p.id,
                            p.mode.as_str(),
                            not_ready_reason(status, p.mode)
                        )
                    })
                    .collect();
                parts.extend(
                    rejected
                        .iter()
                        .map(|(id, why)| format!("{id} is not enforced by keyd ({why})")),
                );
                format!(
                    "sensitive ({}) and selected, but keyd reports no required mode ready: {}",
                    ctx.why_sensitive,
                    parts.join("; ")
                )
            }
            Violation::PolicyRejected { rejected } => format!(
                "sensitive ({}) and selected, but keyd does not enforce the selecting {}: {}",
                ctx.why_sensitive,
                if rejected.len() == 1 {
                    "policy"
                } else {
                    "policies"
                },
                rejected
                    .iter()
                    .map(|(id, why)| format!("{id} ({why})"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Violation::KeydUnavailable { why, selecting } => format!(
                "sensitive ({}) and selected by {}, but keyd's status is unknown: {why}",
                ctx.why_sensitive,
                names(selecting)
            ),
            Violation::RulesPending { selecting } => format!(
                "sensitive ({}) and selected by {}, but keyd's status is unknown: {RULES_PENDING}",
                ctx.why_sensitive,
                names(selecting)
            ),
            Violation::NamespaceUnknown => format!(
                "namespace {} is not known to the webhook yet, so it cannot tell whether the \
                 namespace makes {} sensitive",
                ctx.input.namespace,
                ctx.subject()
            ),
        }
    }

    /// The full message: object, what is missing, and the fix.
    pub(super) fn message(&self, ctx: &Context<'_>, keyd: &KeydView) -> String {
        let mut m = format!(
            "keyd: {} is refused: {}.\n",
            ctx.object_ref(),
            self.summary(ctx)
        );
        // `write!` into a String cannot fail.
        match self {
            Violation::NoPolicy { ignored } => {
                let _ = write!(
                    m,
                    "Fix: create a policy that selects {}, for example:\n{}",
                    ctx.subject(),
                    example_policy(ctx, keyd)
                );
                for i in ignored {
                    let _ = writeln!(m, "Note: {i} selects nothing: its selector is malformed.");
                }
            }
            Violation::ModeNotReady {
                status, selecting, ..
            } => {
                mode_not_ready_fix(&mut m, status, selecting);
            }
            Violation::PolicyRejected { .. } => {
                let _ = writeln!(
                    m,
                    "Fix: make the policy enforceable on every node, as the reason says (fix its \
                     selector, or merge policies so that no node is concerned by more than its \
                     maps hold); `keyctl rules NODE` lists what each node's rules leave out."
                );
            }
            Violation::RulesPending { .. } => {
                let _ = writeln!(
                    m,
                    "The webhook refuses sensitive pods until keyd can say which policies it \
                     enforces (keyd.when_unavailable = deny); keyd compiles its rules from the \
                     Kubernetes API shortly after it starts.\nFix: retry in a minute; if this \
                     lasts, check keyd's log and its [policy] watcher's access to the API server."
                );
            }
            Violation::KeydUnavailable { .. } => {
                let _ = writeln!(
                    m,
                    "The webhook refuses sensitive pods while it cannot reach keyd \
                     (keyd.when_unavailable = deny).\nFix: restore the webhook's connection to \
                     keyd (keyd running, its address and the webhook's client certificate in \
                     the webhook config), then retry."
                );
            }
            Violation::NamespaceUnknown => {
                let _ = writeln!(m, "Fix: retry in a few seconds.");
            }
        }
        if let Some(note) = &ctx.enforcement_note {
            let _ = writeln!(m, "Note: {note}.");
        }
        let _ = write!(
            m,
            "Emergency only: set the annotation {}: \"<reason>\" {}; the pod is then admitted and \
             the use is recorded with your user name.",
            ctx.config.break_glass_annotation,
            ctx.where_annotation()
        );
        m
    }
}

/// The fixes for selecting policies whose modes are not ready: make a mode ready, or switch each
/// policy to a mode that is.
fn mode_not_ready_fix(m: &mut String, status: &EnforcementStatus, selecting: &[CompiledPolicy]) {
    // `write!` into a String cannot fail.
    let _ = writeln!(m, "Fix, either:");
    let mut modes: Vec<Mode> = selecting.iter().map(|p| p.mode).collect();
    modes.dedup();
    for mode in modes {
        let _ = writeln!(
            m,
            "  - make {} ready in keyd: {}",
            mode.as_str(),
            fix_for_mode(mode)
        );
    }
    if let Some(other) = first_ready_mode(status) {
        for p in selecting {
            let _ = writeln!(
                m,
                "  - or switch {} to {}, which is ready: {}",
                p.id,
                other.as_str(),
                patch_command(p, other)
            );
        }
    }
}

fn names(ps: &[CompiledPolicy]) -> String {
    ps.iter()
        .map(|p| p.id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn not_ready_reason(status: &EnforcementStatus, mode: Mode) -> String {
    let m = status.mode(EncryptionMode::from(mode));
    let what = if !m.active {
        "not active"
    } else {
        "keys overdue for rotation"
    };
    match &m.reason {
        Some(r) => format!("{what}: {r}"),
        None => what.to_owned(),
    }
}

fn fix_for_mode(mode: Mode) -> &'static str {
    match mode {
        Mode::Ipsec => {
            "`keyctl ipsec rotate` creates or rotates the IPsec key (`keyctl status` shows it)"
        }
        Mode::Wireguard => {
            "nodes must register their WireGuard public keys with keyd (node-shim does this; \
             `keyctl status` shows how many have)"
        }
    }
}

fn patch_command(p: &CompiledPolicy, mode: Mode) -> String {
    let patch = format!("'{{\"spec\":{{\"mode\":\"{}\"}}}}'", mode.as_str());
    match p.id.kind {
        PolicyKind::Namespaced => format!(
            "kubectl -n {} patch encryptionpolicy {} --type merge -p {patch}",
            p.id.namespace, p.id.name
        ),
        PolicyKind::Cluster => format!(
            "kubectl patch clusterencryptionpolicy {} --type merge -p {patch}",
            p.id.name
        ),
    }
}
