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
//! treats that as not covered; `allow` admits it with a warning and records it as `warned`.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use keyd_proto::{EncryptionMode, EnforcementStatus};

use crate::crd::{Labels, Mode};
use crate::policy::{CompiledPolicy, PolicyKind, PolicySet};
use crate::workload::Workload;

/// What a violation leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Enforcement {
    Enforce,
    Warn,
    Audit,
}

impl Enforcement {
    pub const ALL: [Enforcement; 3] = [Enforcement::Enforce, Enforcement::Warn, Enforcement::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Warn => "warn",
            Enforcement::Audit => "audit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// What to do with a sensitive, policy-selected pod when keyd's status is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenKeydUnavailable {
    /// Fail closed: treat the pod as not covered (the default).
    Deny,
    /// Fail open: admit with a warning, recorded as `warned`.
    Allow,
}

/// A `key=value` label rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRule {
    pub key: String,
    pub value: String,
}

impl LabelRule {
    pub fn matches(&self, labels: &Labels) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

impl fmt::Display for LabelRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// The decision's part of the webhook configuration (validated in [`crate::config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionConfig {
    /// A pod with this label is sensitive.
    pub sensitive_pod_label: Option<LabelRule>,
    /// Every pod of a namespace with this label is sensitive.
    pub sensitive_namespace_label: Option<LabelRule>,
    /// The cluster-wide enforcement mode.
    pub enforcement: Enforcement,
    /// A namespace label whose value (`enforce`, `warn`, `audit`) overrides `enforcement`.
    pub namespace_enforcement_label: Option<String>,
    pub exempt_namespaces: HashSet<String>,
    /// A non-empty value on a pod (or pod template) admits it and is recorded.
    pub break_glass_annotation: String,
    pub when_keyd_unavailable: WhenKeydUnavailable,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        let sensitive = LabelRule {
            key: "keyd.io/sensitive".into(),
            value: "true".into(),
        };
        Self {
            sensitive_pod_label: Some(sensitive.clone()),
            sensitive_namespace_label: Some(sensitive),
            enforcement: Enforcement::Enforce,
            namespace_enforcement_label: Some("keyd.io/enforcement".into()),
            exempt_namespaces: HashSet::from(["kube-system".to_owned()]),
            break_glass_annotation: "keyd.io/break-glass".into(),
            when_keyd_unavailable: WhenKeydUnavailable::Deny,
        }
    }
}

/// What keyd last said, as far as the webhook can rely on it.
#[derive(Debug, Clone)]
pub enum KeydView {
    Known(Arc<EnforcementStatus>),
    /// Unreachable or too stale; the text says which, for messages.
    Unknown(Arc<str>),
}

/// The Kubernetes operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
        }
    }
}

/// One admission request, as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub operation: Operation,
    pub namespace: &'a str,
    pub object: &'a Workload,
    /// The object before an UPDATE.
    pub old_object: Option<&'a Workload>,
    pub user: &'a str,
}

/// The result, as the audit log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    Denied,
    Warned,
    Audited,
    BreakGlass,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Allowed,
        Outcome::Denied,
        Outcome::Warned,
        Outcome::Audited,
        Outcome::BreakGlass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Warned => "warned",
            Outcome::Audited => "audited",
            Outcome::BreakGlass => "break_glass",
        }
    }
}

/// Why, as a bounded set (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Exempt,
    Unchanged,
    NotSensitive,
    Covered,
    /// Sensitive, and no policy selects it.
    NoPolicy,
    /// Selected, but keyd reports none of the selecting policies' modes ready.
    ModeNotReady,
    /// Selected, and keyd's status is unknown.
    KeydUnavailable,
    /// The namespace is not known, so namespace sensitivity cannot be ruled out.
    NamespaceUnknown,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Exempt,
        Reason::Unchanged,
        Reason::NotSensitive,
        Reason::Covered,
        Reason::NoPolicy,
        Reason::ModeNotReady,
        Reason::KeydUnavailable,
        Reason::NamespaceUnknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Exempt => "exempt",
            Reason::Unchanged => "unchanged",
            Reason::NotSensitive => "not_sensitive",
            Reason::Covered => "covered",
            Reason::NoPolicy => "no_policy",
            Reason::ModeNotReady => "mode_not_ready",
            Reason::KeydUnavailable => "keyd_unavailable",
            Reason::NamespaceUnknown => "namespace_unknown",
        }
    }

    /// Whether the pod lacks coverage.
    pub fn is_violation(self) -> bool {
        matches!(
            self,
            Reason::NoPolicy
                | Reason::ModeNotReady
                | Reason::KeydUnavailable
                | Reason::NamespaceUnknown
        )
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub outcome: Outcome,
    pub reason: Reason,
    /// The enforcement mode that applied.
    pub enforcement: Enforcement,
    /// Policies that select the pod, e.g. `EncryptionPolicy team-a/payments`.
    pub policies: Vec<String>,
    /// For a denial: the full message (object, what is missing, the fix). For other violations
    /// the same text, kept for the log.
    pub message: String,
    /// One line: what the audit record and the log say.
    pub summary: String,
    /// Admission warnings shown by kubectl.
    pub warnings: Vec<String>,
    /// Whether to send this decision to keyd's audit log.
    pub record: bool,
}

impl Decision {
    fn allow(reason: Reason, enforcement: Enforcement) -> Self {
        Self {
            allowed: true,
            outcome: Outcome::Allowed,
            reason,
            enforcement,
            policies: Vec::new(),
            message: String::new(),
            summary: String::new(),
            warnings: Vec::new(),
            record: false,
        }
    }
}

/// Longest break-glass justification copied into a record.
const MAX_JUSTIFICATION: usize = 256;

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
    let (enforcement, enforcement_note) = enforcement_for(namespace_labels, config);
    if config.exempt_namespaces.contains(input.namespace) {
        return Decision::allow(Reason::Exempt, enforcement);
    }
    let object = input.object;
    let pod_labels = object.pod_labels();
    let break_glass = object
        .pod_annotations()
        .get(&config.break_glass_annotation)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());

    if let (Operation::Update, Some(old)) = (input.operation, input.old_object) {
        let old_glass = old
            .pod_annotations()
            .get(&config.break_glass_annotation)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty());
        if old.pod_labels() == pod_labels && old_glass == break_glass {
            return Decision::allow(Reason::Unchanged, enforcement);
        }
    }

    // Sensitivity.
    let by_pod = config
        .sensitive_pod_label
        .as_ref()
        .filter(|r| r.matches(pod_labels));
    let by_namespace = match (&config.sensitive_namespace_label, namespace_labels) {
        (Some(r), Some(l)) if r.matches(l) => Some(r),
        _ => None,
    };
    let namespace_unknown =
        namespace_labels.is_none() && config.sensitive_namespace_label.is_some();
    if by_pod.is_none() && by_namespace.is_none() && !namespace_unknown {
        return Decision::allow(Reason::NotSensitive, enforcement);
    }

    let ctx = Context {
        input,
        enforcement,
        enforcement_note,
        why_sensitive: why_sensitive(by_pod, by_namespace, input.namespace),
        config,
    };

    // Coverage.
    let selecting: Vec<&CompiledPolicy> = if by_pod.is_none() && by_namespace.is_none() {
        Vec::new()
    } else {
        policies
            .candidates_for(input.namespace, namespace_labels)
            .filter(|p| p.selects(pod_labels, namespace_labels))
            .collect()
    };
    let policy_names: Vec<String> = selecting.iter().map(|p| p.id.to_string()).collect();

    let violation = if namespace_unknown && by_pod.is_none() {
        Violation::NamespaceUnknown
    } else if selecting.is_empty() {
        let ignored: Vec<String> = policies
            .candidates(input.namespace)
            .filter_map(|p| p.selector_error().map(|e| format!("{} ({e})", p.id)))
            .collect();
        Violation::NoPolicy { ignored }
    } else {
        match keyd {
            KeydView::Known(status) => {
                if selecting.iter().any(|p| mode_ready(status, p.mode)) {
                    return covered(break_glass, &ctx, policy_names);
                }
                Violation::ModeNotReady {
                    status: Arc::clone(status),
                    selecting: selecting.iter().map(|p| (*p).clone()).collect(),
                }
            }
            KeydView::Unknown(why) => {
                if config.when_keyd_unavailable == WhenKeydUnavailable::Allow
                    && break_glass.is_none()
                {
                    let summary = format!(
                        "selected by {} but keyd's status is unknown ({why}); admitted because \
                         keyd.when_unavailable = allow",
                        policy_names.join(", ")
                    );
                    return Decision {
                        allowed: true,
                        outcome: Outcome::Warned,
                        reason: Reason::KeydUnavailable,
                        enforcement,
                        warnings: vec![format!(
                            "keyd: {} is sensitive and its encryption could not be confirmed \
                             (keyd unavailable); admitted because the webhook fails open",
                            ctx.object_ref()
                        )],
                        message: summary.clone(),
                        summary,
                        policies: policy_names,
                        record: true,
                    };
                }
                Violation::KeydUnavailable {
                    why: Arc::clone(why),
                    selecting: selecting.iter().map(|p| (*p).clone()).collect(),
                }
            }
        }
    };

    let summary = violation.summary(&ctx);
    if let Some(justification) = break_glass {
        return break_glass_decision(
            justification,
            &ctx,
            policy_names,
            Some((violation.reason(), summary)),
        );
    }
    let message = violation.message(&ctx, keyd);
    let reason = violation.reason();
    match enforcement {
        Enforcement::Enforce => Decision {
            allowed: false,
            outcome: Outcome::Denied,
            reason,
            enforcement,
            policies: policy_names,
            message,
            summary,
            warnings: Vec::new(),
            record: true,
        },
        Enforcement::Warn => Decision {
            allowed: true,
            outcome: Outcome::Warned,
            reason,
            enforcement,
            policies: policy_names,
            warnings: vec![format!(
                "keyd: {} would be refused: {summary} (enforcement is warn in namespace {})",
                ctx.object_ref(),
                input.namespace
            )],
            message,
            summary,
            record: true,
        },
        Enforcement::Audit => Decision {
            allowed: true,
            outcome: Outcome::Audited,
            reason,
            enforcement,
            policies: policy_names,
            message,
            summary,
            warnings: Vec::new(),
            record: true,
        },
    }
}

/// Whether keyd reports `mode` usable: active, and every key within its schedule.
pub fn mode_ready(status: &EnforcementStatus, mode: Mode) -> bool {
    let m = status.mode(EncryptionMode::from(mode));
    m.active && m.within_schedule
}

fn covered(break_glass: Option<&str>, ctx: &Context<'_>, policies: Vec<String>) -> Decision {
    if let Some(j) = break_glass {
        return break_glass_decision(j, ctx, policies, None);
    }
    Decision {
        policies,
        ..Decision::allow(Reason::Covered, ctx.enforcement)
    }
}

fn break_glass_decision(
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

/// The namespace's enforcement mode, and a note when its label is not a valid mode (then the
/// strictest mode applies: a typo must not weaken enforcement).
fn enforcement_for(
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

fn why_sensitive(
    by_pod: Option<&LabelRule>,
    by_namespace: Option<&LabelRule>,
    namespace: &str,
) -> String {
    match (by_pod, by_namespace) {
        (Some(p), Some(n)) => {
            format!("pod label {p}, and namespace {namespace} has label {n}")
        }
        (Some(p), None) => format!("pod label {p}"),
        (None, Some(n)) => format!("namespace {namespace} has label {n}"),
        (None, None) => format!("namespace {namespace} may be sensitive"),
    }
}

struct Context<'a> {
    input: &'a Input<'a>,
    enforcement: Enforcement,
    enforcement_note: Option<String>,
    why_sensitive: String,
    config: &'a DecisionConfig,
}

impl Context<'_> {
    /// `Pod team-a/web`.
    fn object_ref(&self) -> String {
        format!(
            "{} {}/{}",
            self.input.object.kind,
            self.input.namespace,
            self.input.object.display_name()
        )
    }

    /// "it" for a pod, "its pods" for a workload.
    fn subject(&self) -> &'static str {
        if self.input.object.is_pod() {
            "it"
        } else {
            "its pods"
        }
    }

    fn where_annotation(&self) -> &'static str {
        if self.input.object.is_pod() {
            "on the pod"
        } else {
            "on the pod template (spec.template.metadata.annotations)"
        }
    }
}

enum Violation {
    NoPolicy {
        /// Candidate policies ignored for a malformed selector, with the problem.
        ignored: Vec<String>,
    },
    ModeNotReady {
        status: Arc<EnforcementStatus>,
        selecting: Vec<CompiledPolicy>,
    },
    KeydUnavailable {
        why: Arc<str>,
        selecting: Vec<CompiledPolicy>,
    },
    NamespaceUnknown,
}

impl Violation {
    fn reason(&self) -> Reason {
        match self {
            Violation::NoPolicy { .. } => Reason::NoPolicy,
            Violation::ModeNotReady { .. } => Reason::ModeNotReady,
            Violation::KeydUnavailable { .. } => Reason::KeydUnavailable,
            Violation::NamespaceUnknown => Reason::NamespaceUnknown,
        }
    }

    /// One line, without the fix.
    fn summary(&self, ctx: &Context<'_>) -> String {
        match self {
            Violation::NoPolicy { .. } => format!(
                "sensitive ({}) but no EncryptionPolicy or ClusterEncryptionPolicy selects {}",
                ctx.why_sensitive,
                if ctx.input.object.is_pod() {
                    "it"
                } else {
                    "its pods"
                }
            ),
            Violation::ModeNotReady { status, selecting } => {
                let parts: Vec<String> = selecting
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
                format!(
                    "sensitive ({}) and selected, but keyd reports no required mode ready: {}",
                    ctx.why_sensitive,
                    parts.join("; ")
                )
            }
            Violation::KeydUnavailable { why, selecting } => format!(
                "sensitive ({}) and selected by {}, but keyd's status is unknown: {why}",
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
    fn message(&self, ctx: &Context<'_>, keyd: &KeydView) -> String {
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
            Violation::ModeNotReady { status, selecting } => {
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
                if let Some(other) = [Mode::Wireguard, Mode::Ipsec]
                    .into_iter()
                    .find(|&o| mode_ready(status, o))
                {
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

/// Labels that identify a workload's pods better than the whole set, in order of preference.
const IDENTIFYING_LABELS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];
/// Labels controllers add per revision: selecting on them would break at the next rollout.
const REVISION_LABELS: [&str; 3] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
];

/// A ready-to-apply `EncryptionPolicy` selecting this object's pods.
fn example_policy(ctx: &Context<'_>, keyd: &KeydView) -> String {
    let labels = ctx.input.object.pod_labels();
    let mut selector: Vec<(&String, &String)> = match IDENTIFYING_LABELS
        .iter()
        .find_map(|k| labels.get_key_value(*k))
    {
        Some(kv) => vec![kv],
        None => labels
            .iter()
            .filter(|(k, _)| !REVISION_LABELS.contains(&k.as_str()))
            .filter(|(k, _)| {
                ctx.config
                    .sensitive_pod_label
                    .as_ref()
                    .is_none_or(|r| &r.key != *k)
            })
            .collect(),
    };
    selector.truncate(4);
    let base = selector
        .first()
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let n = ctx.input.object.display_name();
            if ctx.input.object.name.is_empty() {
                ctx.input
                    .object
                    .generate_name
                    .trim_end_matches('-')
                    .to_owned()
            } else {
                n
            }
        });
    let name = policy_name(&base);
    let mode = match keyd {
        KeydView::Known(s) => [Mode::Wireguard, Mode::Ipsec]
            .into_iter()
            .find(|&m| mode_ready(s, m))
            .unwrap_or(Mode::Wireguard),
        KeydView::Unknown(_) => Mode::Wireguard,
    };
    let mut y = format!(
        "  kubectl apply -f - <<'EOF'\n  apiVersion: keyd.io/v1alpha1\n  kind: EncryptionPolicy\n  \
         metadata:\n    name: {name}\n    namespace: {}\n  spec:\n    mode: {}\n",
        ctx.input.namespace,
        mode.as_str()
    );
    if selector.is_empty() {
        y.push_str("    podSelector: {}   # every pod of the namespace\n");
    } else {
        y.push_str("    podSelector:\n      matchLabels:\n");
        for (k, v) in selector {
            let _ = writeln!(y, "        {k:?}: {v:?}");
        }
    }
    y.push_str("  EOF\n");
    y
}

/// A valid object name (DNS-1123 subdomain) derived from `base`.
fn policy_name(base: &str) -> String {
    let mut s: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches(|c| c == '-' || c == '.').to_owned();
    if s.is_empty() {
        s = "encrypted".to_owned();
    }
    s.truncate(200);
    format!("{s}-encryption")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        ClusterEncryptionPolicy, ClusterEncryptionPolicySpec, EncryptionPolicy,
        EncryptionPolicySpec, LabelSelector, LabelSelectorRequirement,
    };
    use crate::workload::WorkloadKind;
    use keyd_proto::{ModeStatus, Timestamp};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ready(active: bool, within: bool, reason: Option<&str>) -> ModeStatus {
        ModeStatus {
            active,
            within_schedule: within,
            reason: reason.map(str::to_owned),
        }
    }

    /// keyd with IPsec ready and WireGuard not.
    fn keyd_ipsec_only() -> KeydView {
        KeydView::Known(Arc::new(EnforcementStatus {
            at: Timestamp::now(),
            ipsec: ready(true, true, None),
            wireguard: ready(
                false,
                false,
                Some("no node has registered a WireGuard public key"),
            ),
        }))
    }

    fn ns_policy(ns: &str, name: &str, mode: Mode, selector: LabelSelector) -> EncryptionPolicy {
        let mut p = EncryptionPolicy::new(
            name,
            EncryptionPolicySpec {
                pod_selector: selector,
                mode,
                ports: vec![],
                peers: vec![],
            },
        );
        p.metadata.namespace = Some(ns.into());
        p
    }

    fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs),
            match_expressions: vec![],
        }
    }

    fn sensitive_pod(name: &str, extra: &[(&str, &str)]) -> Workload {
        let mut l = labels(&[("keyd.io/sensitive", "true")]);
        l.extend(labels(extra));
        Workload::pod(name, l, Labels::new())
    }

    fn run(
        object: &Workload,
        ns: &str,
        ns_labels: Option<&Labels>,
        policies: &PolicySet,
        keyd: &KeydView,
        config: &DecisionConfig,
    ) -> Decision {
        decide(
            &Input {
                operation: Operation::Create,
                namespace: ns,
                object,
                old_object: None,
                user: "alice",
            },
            ns_labels,
            policies,
            keyd,
            config,
        )
    }

    #[test]
    fn a_pod_that_is_not_sensitive_is_allowed_and_not_recorded() {
        let pod = Workload::pod("web", labels(&[("app", "web")]), Labels::new());
        let d = run(
            &pod,
            "default",
            Some(&Labels::new()),
            &PolicySet::default(),
            &KeydView::Unknown("down".into()),
            &DecisionConfig::default(),
        );
        assert!(d.allowed);
        assert_eq!(
            (d.outcome, d.reason),
            (Outcome::Allowed, Reason::NotSensitive)
        );
        assert!(!d.record && d.warnings.is_empty());

        // keyd.io/sensitive=false is not sensitive either.
        let pod = Workload::pod(
            "web",
            labels(&[("keyd.io/sensitive", "false")]),
            Labels::new(),
        );
        let d = run(
            &pod,
            "default",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.reason, Reason::NotSensitive);
    }

    #[test]
    fn a_sensitive_pod_without_a_policy_is_denied_with_object_missing_piece_and_fix() {
        let pod = sensitive_pod(
            "payments-0",
            &[("app", "payments"), ("pod-template-hash", "abc")],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert!(!d.allowed);
        assert_eq!((d.outcome, d.reason), (Outcome::Denied, Reason::NoPolicy));
        assert!(d.record);
        let m = &d.message;
        assert!(m.starts_with("keyd: Pod team-a/payments-0 is refused: sensitive (pod label keyd.io/sensitive=true) but no EncryptionPolicy or ClusterEncryptionPolicy selects it."), "{m}");
        // The fix is YAML that applies as is: the identifying label, a mode keyd reports ready.
        assert!(m.contains("kubectl apply -f - <<'EOF'"), "{m}");
        assert!(m.contains("kind: EncryptionPolicy"), "{m}");
        assert!(m.contains("name: payments-encryption\n"), "{m}");
        assert!(m.contains("namespace: team-a\n"), "{m}");
        assert!(m.contains("mode: ipsec\n"), "{m}");
        assert!(m.contains("\"app\": \"payments\""), "{m}");
        assert!(!m.contains("pod-template-hash"), "{m}");
        assert!(m.contains("keyd.io/break-glass"), "{m}");

        // The example, once applied, covers the pod: extract it and check.
        let yaml: String = m
            .lines()
            .skip_while(|l| !l.contains("apiVersion"))
            .take_while(|l| l.trim() != "EOF")
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        let p: EncryptionPolicy = serde_norway::from_str(&yaml).expect(&yaml);
        let set = PolicySet::from_resources([&p], []);
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (true, Reason::Covered));
        assert!(!d.record);
    }

    #[test]
    fn a_policy_in_another_namespace_does_not_cover() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let set = PolicySet::from_resources(
            [&ns_policy(
                "other",
                "p",
                Mode::Ipsec,
                LabelSelector::default(),
            )],
            [],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.reason, Reason::NoPolicy);
    }

    #[test]
    fn a_selecting_policy_whose_mode_is_not_ready_denies_with_keyds_reason() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let set = PolicySet::from_resources(
            [&ns_policy(
                "team-a",
                "wg",
                Mode::Wireguard,
                match_labels(&[("app", "x")]),
            )],
            [],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (false, Reason::ModeNotReady));
        assert_eq!(d.policies, ["EncryptionPolicy team-a/wg"]);
        let m = &d.message;
        assert!(m.contains("EncryptionPolicy team-a/wg requires wireguard (not active: no node has registered a WireGuard public key)"), "{m}");
        assert!(m.contains("make wireguard ready in keyd"), "{m}");
        assert!(
            m.contains(r#"kubectl -n team-a patch encryptionpolicy wg --type merge -p '{"spec":{"mode":"ipsec"}}'"#),
            "{m}"
        );

        // Overdue keys are not ready either, and say so.
        let overdue = KeydView::Known(Arc::new(EnforcementStatus {
            at: Timestamp::now(),
            ipsec: ready(true, false, Some("key 3 is 40 days old")),
            wireguard: ready(true, false, None),
        }));
        let set = PolicySet::from_resources(
            [&ns_policy(
                "team-a",
                "ip",
                Mode::Ipsec,
                LabelSelector::default(),
            )],
            [],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &overdue,
            &DecisionConfig::default(),
        );
        assert_eq!(d.reason, Reason::ModeNotReady);
        assert!(
            d.message
                .contains("keys overdue for rotation: key 3 is 40 days old"),
            "{}",
            d.message
        );
        assert!(d.message.contains("keyctl ipsec rotate"), "{}", d.message);
    }

    #[test]
    fn any_one_ready_selecting_policy_is_enough() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let set = PolicySet::from_resources(
            [
                &ns_policy("team-a", "wg", Mode::Wireguard, LabelSelector::default()),
                &ns_policy("team-a", "ip", Mode::Ipsec, match_labels(&[("app", "x")])),
            ],
            [],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (true, Reason::Covered));
        assert_eq!(
            d.policies,
            ["EncryptionPolicy team-a/ip", "EncryptionPolicy team-a/wg"]
        );
    }

    #[test]
    fn cluster_policies_select_by_namespace_labels() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let c = ClusterEncryptionPolicy::new(
            "pci",
            ClusterEncryptionPolicySpec {
                namespace_selector: LabelSelector {
                    match_labels: Labels::new(),
                    match_expressions: vec![LabelSelectorRequirement {
                        key: "compliance".into(),
                        operator: "In".into(),
                        values: vec!["pci".into(), "hipaa".into()],
                    }],
                },
                pod_selector: LabelSelector::default(),
                mode: Mode::Ipsec,
                ports: vec![],
                peers: vec![],
            },
        );
        let set = PolicySet::from_resources([], [&c]);
        let cfg = DecisionConfig::default();
        let pci = labels(&[("compliance", "pci")]);
        let d = run(&pod, "shop", Some(&pci), &set, &keyd_ipsec_only(), &cfg);
        assert_eq!((d.allowed, d.reason), (true, Reason::Covered));
        assert_eq!(d.policies, ["ClusterEncryptionPolicy pci"]);
        let d = run(
            &pod,
            "shop",
            Some(&labels(&[("compliance", "none")])),
            &set,
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NoPolicy);
    }

    #[test]
    fn namespace_label_makes_every_pod_sensitive() {
        let pod = Workload::pod("plain", labels(&[("app", "x")]), Labels::new());
        let ns = labels(&[("keyd.io/sensitive", "true")]);
        let d = run(
            &pod,
            "vault",
            Some(&ns),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.reason, Reason::NoPolicy);
        assert!(
            d.message
                .contains("sensitive (namespace vault has label keyd.io/sensitive=true)"),
            "{}",
            d.message
        );

        // Pod-only sensitivity: the namespace label is ignored.
        let cfg = DecisionConfig {
            sensitive_namespace_label: None,
            ..DecisionConfig::default()
        };
        let d = run(
            &pod,
            "vault",
            Some(&ns),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NotSensitive);
        // Namespace-only sensitivity: the pod label is ignored.
        let cfg = DecisionConfig {
            sensitive_pod_label: None,
            ..DecisionConfig::default()
        };
        let d = run(
            &sensitive_pod("p", &[]),
            "web",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NotSensitive);
        // A custom label rule.
        let cfg = DecisionConfig {
            sensitive_pod_label: Some(LabelRule {
                key: "data".into(),
                value: "pii".into(),
            }),
            ..DecisionConfig::default()
        };
        let pii = Workload::pod("p", labels(&[("data", "pii")]), Labels::new());
        let d = run(
            &pii,
            "web",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NoPolicy);
        assert!(d.message.contains("pod label data=pii"), "{}", d.message);
    }

    #[test]
    fn an_unknown_namespace_fails_closed_only_when_it_could_matter() {
        let plain = Workload::pod("plain", labels(&[("app", "x")]), Labels::new());
        let d = run(
            &plain,
            "new-ns",
            None,
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (false, Reason::NamespaceUnknown));
        assert!(
            d.message.contains("namespace new-ns is not known"),
            "{}",
            d.message
        );
        assert!(d.message.contains("retry"), "{}", d.message);
        let cfg = DecisionConfig {
            sensitive_namespace_label: None,
            ..DecisionConfig::default()
        };
        let d = run(
            &plain,
            "new-ns",
            None,
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NotSensitive);
        // A pod sensitive by its own label is judged normally.
        let set = PolicySet::from_resources(
            [&ns_policy(
                "new-ns",
                "p",
                Mode::Ipsec,
                LabelSelector::default(),
            )],
            [],
        );
        let d = run(
            &sensitive_pod("p", &[]),
            "new-ns",
            None,
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.reason, Reason::Covered);
    }

    #[test]
    fn workload_templates_are_judged_like_pods() {
        let cfg = DecisionConfig::default();
        for kind in WorkloadKind::ALL
            .into_iter()
            .filter(|k| *k != WorkloadKind::Pod)
        {
            let w = Workload::with_template(
                kind,
                "web",
                labels(&[("keyd.io/sensitive", "true"), ("app", "web")]),
                Labels::new(),
            );
            let d = run(
                &w,
                "team-a",
                Some(&Labels::new()),
                &PolicySet::default(),
                &keyd_ipsec_only(),
                &cfg,
            );
            assert_eq!((d.allowed, d.reason), (false, Reason::NoPolicy), "{kind}");
            assert!(
                d.message.starts_with(&format!("keyd: {kind} team-a/web is refused: sensitive (pod label keyd.io/sensitive=true) but no EncryptionPolicy or ClusterEncryptionPolicy selects its pods.")),
                "{}",
                d.message
            );
            assert!(d.message.contains("on the pod template"), "{}", d.message);

            // The workload's own labels do not make it sensitive: the pods' do.
            let mut own =
                Workload::with_template(kind, "web", labels(&[("app", "web")]), Labels::new());
            own.labels = labels(&[("keyd.io/sensitive", "true")]);
            let d = run(
                &own,
                "team-a",
                Some(&Labels::new()),
                &PolicySet::default(),
                &keyd_ipsec_only(),
                &cfg,
            );
            assert_eq!(d.reason, Reason::NotSensitive, "{kind}");
        }
    }

    #[test]
    fn warn_and_audit_modes_admit_and_record() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let warn_ns = labels(&[("keyd.io/enforcement", "warn")]);
        let d = run(
            &pod,
            "team-a",
            Some(&warn_ns),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert!(d.allowed && d.record);
        assert_eq!(
            (d.outcome, d.enforcement),
            (Outcome::Warned, Enforcement::Warn)
        );
        assert_eq!(d.warnings.len(), 1);
        assert!(
            d.warnings[0].starts_with("keyd: Pod team-a/p would be refused: sensitive"),
            "{:?}",
            d.warnings
        );

        let audit_ns = labels(&[("keyd.io/enforcement", "audit")]);
        let d = run(
            &pod,
            "team-a",
            Some(&audit_ns),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert!(d.allowed && d.record && d.warnings.is_empty());
        assert_eq!(
            (d.outcome, d.enforcement),
            (Outcome::Audited, Enforcement::Audit)
        );

        // Cluster-wide warn; a namespace can still require enforce.
        let cfg = DecisionConfig {
            enforcement: Enforcement::Warn,
            ..DecisionConfig::default()
        };
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.outcome, Outcome::Warned);
        let enforce_ns = labels(&[("keyd.io/enforcement", "enforce")]);
        let d = run(
            &pod,
            "team-a",
            Some(&enforce_ns),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.outcome, Outcome::Denied);

        // A typo in the namespace label enforces, and says so.
        let typo = labels(&[("keyd.io/enforcement", "warning")]);
        let d = run(
            &pod,
            "team-a",
            Some(&typo),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.outcome, Outcome::Denied);
        assert!(
            d.message
                .contains("keyd.io/enforcement=warning is not one of enforce, warn, audit"),
            "{}",
            d.message
        );
    }

    #[test]
    fn exempt_namespaces_are_never_checked() {
        let pod = sensitive_pod("p", &[]);
        let d = run(
            &pod,
            "kube-system",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(
            (d.allowed, d.reason, d.record),
            (true, Reason::Exempt, false)
        );
        let cfg = DecisionConfig {
            exempt_namespaces: HashSet::from(["keyd".to_owned()]),
            ..DecisionConfig::default()
        };
        let d = run(
            &pod,
            "kube-system",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::NoPolicy);
        let d = run(
            &pod,
            "keyd",
            None,
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &cfg,
        );
        assert_eq!(d.reason, Reason::Exempt);
    }

    #[test]
    fn break_glass_admits_and_records_the_user() {
        let mut pod = sensitive_pod("p", &[("app", "x")]);
        pod.annotations = labels(&[("keyd.io/break-glass", "INC-42 payments down")]);
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert!(d.allowed && d.record);
        assert_eq!(d.outcome, Outcome::BreakGlass);
        assert!(d.summary.starts_with("break-glass by alice: \"INC-42 payments down\"; it would otherwise be refused: sensitive"), "{}", d.summary);
        assert!(d.warnings[0].contains("recorded"), "{:?}", d.warnings);

        // Also recorded when the pod was covered anyway.
        let set = PolicySet::from_resources(
            [&ns_policy(
                "team-a",
                "p",
                Mode::Ipsec,
                LabelSelector::default(),
            )],
            [],
        );
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.outcome, d.record), (Outcome::BreakGlass, true));
        assert!(
            d.summary.ends_with("it was covered anyway"),
            "{}",
            d.summary
        );

        // Blank is not a justification.
        pod.annotations = labels(&[("keyd.io/break-glass", "  ")]);
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.outcome, Outcome::Denied);

        // On a workload it must be on the template: on the Deployment itself it does not reach
        // the pods, so it does not count.
        let mut dep = Workload::with_template(
            WorkloadKind::Deployment,
            "web",
            labels(&[("keyd.io/sensitive", "true")]),
            Labels::new(),
        );
        dep.annotations = labels(&[("keyd.io/break-glass", "INC-42")]);
        let d = run(
            &dep,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.outcome, Outcome::Denied);
        let dep = Workload::with_template(
            WorkloadKind::Deployment,
            "web",
            labels(&[("keyd.io/sensitive", "true")]),
            labels(&[("keyd.io/break-glass", "INC-42")]),
        );
        let d = run(
            &dep,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!(d.outcome, Outcome::BreakGlass);

        // A long justification is cut in the record.
        let mut pod = sensitive_pod("p", &[]);
        pod.annotations = labels(&[("keyd.io/break-glass", &"x".repeat(10_000))]);
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert!(d.summary.len() < 1000);
    }

    #[test]
    fn unknown_keyd_status_fails_closed_by_default_and_open_when_configured() {
        let pod = sensitive_pod("p", &[]);
        let set = PolicySet::from_resources(
            [&ns_policy(
                "team-a",
                "p",
                Mode::Ipsec,
                LabelSelector::default(),
            )],
            [],
        );
        let down = KeydView::Unknown("no answer from keyd for 45s (connection refused)".into());
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &down,
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (false, Reason::KeydUnavailable));
        assert!(
            d.message
                .contains("no answer from keyd for 45s (connection refused)"),
            "{}",
            d.message
        );
        assert!(
            d.message.contains("keyd.when_unavailable = deny"),
            "{}",
            d.message
        );

        let open = DecisionConfig {
            when_keyd_unavailable: WhenKeydUnavailable::Allow,
            ..DecisionConfig::default()
        };
        let d = run(&pod, "team-a", Some(&Labels::new()), &set, &down, &open);
        assert!(d.allowed && d.record);
        assert_eq!(
            (d.outcome, d.reason),
            (Outcome::Warned, Reason::KeydUnavailable)
        );
        assert_eq!(d.warnings.len(), 1);

        // Failing open never covers a pod that no policy selects.
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &PolicySet::default(),
            &down,
            &open,
        );
        assert_eq!((d.allowed, d.reason), (false, Reason::NoPolicy));
    }

    #[test]
    fn malformed_policies_select_nothing_and_are_named() {
        let pod = sensitive_pod("p", &[("app", "x")]);
        let bad = ns_policy(
            "team-a",
            "broken",
            Mode::Ipsec,
            LabelSelector {
                match_labels: Labels::new(),
                match_expressions: vec![LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "Equals".into(),
                    values: vec!["x".into()],
                }],
            },
        );
        let set = PolicySet::from_resources([&bad], []);
        let d = run(
            &pod,
            "team-a",
            Some(&Labels::new()),
            &set,
            &keyd_ipsec_only(),
            &DecisionConfig::default(),
        );
        assert_eq!((d.allowed, d.reason), (false, Reason::NoPolicy));
        assert!(d.message.contains("Note: EncryptionPolicy team-a/broken (podSelector: matchExpressions[0]: unknown operator \"Equals\""), "{}", d.message);
    }

    #[test]
    fn updates_that_keep_labels_are_allowed_and_others_are_judged() {
        let old = sensitive_pod("p", &[("app", "x")]);
        let mut same = old.clone();
        same.annotations = labels(&[("unrelated", "1")]);
        let input = |new: &Workload| -> Decision {
            decide(
                &Input {
                    operation: Operation::Update,
                    namespace: "team-a",
                    object: new,
                    old_object: Some(&old),
                    user: "system:serviceaccount:kube-system:some-controller",
                },
                Some(&Labels::new()),
                &PolicySet::default(),
                &keyd_ipsec_only(),
                &DecisionConfig::default(),
            )
        };
        assert_eq!(input(&same).reason, Reason::Unchanged);
        let relabelled = sensitive_pod("p", &[("app", "y")]);
        assert_eq!(input(&relabelled).outcome, Outcome::Denied);
        let mut glass = old.clone();
        glass.annotations = labels(&[("keyd.io/break-glass", "INC-1")]);
        assert_eq!(input(&glass).outcome, Outcome::BreakGlass);
    }

    #[test]
    fn a_namespace_with_no_labels_gets_a_select_all_example() {
        let pod = Workload::pod("p", Labels::new(), Labels::new());
        let ns = labels(&[("keyd.io/sensitive", "true")]);
        let d = run(
            &pod,
            "vault",
            Some(&ns),
            &PolicySet::default(),
            &KeydView::Unknown("x".into()),
            &DecisionConfig::default(),
        );
        assert!(d.message.contains("podSelector: {}"), "{}", d.message);
        assert!(d.message.contains("mode: wireguard"), "{}", d.message);
        assert_eq!(policy_name("Web_API"), "web-api-encryption");
        assert_eq!(policy_name("--"), "encrypted-encryption");
    }
}
