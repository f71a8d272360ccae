//! What the decision is given: its part of the configuration, keyd's last word, and the request.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use keyd_proto::{EncryptionMode, EnforcementStatus};

use crate::crd::{Labels, Mode};
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

/// Whether keyd reports `mode` usable: active, and every key within its schedule.
pub fn mode_ready(status: &EnforcementStatus, mode: Mode) -> bool {
    let m = status.mode(EncryptionMode::from(mode));
    m.active && m.within_schedule
}

/// The mode to suggest when one is ready, WireGuard first.
pub(super) fn first_ready_mode(status: &EnforcementStatus) -> Option<Mode> {
    [Mode::Wireguard, Mode::Ipsec]
        .into_iter()
        .find(|&m| mode_ready(status, m))
}
