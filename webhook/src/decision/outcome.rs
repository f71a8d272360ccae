//! What the decision answers: the outcome the audit log names, the reason metrics count, and the
//! texts shown to the user.

use super::input::Enforcement;

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
    /// Selected only by policies keyd's rule compiler left out of some node's rules (the data
    /// plane would not enforce them there).
    PolicyRejected,
    /// Selected, and keyd's status is unknown.
    KeydUnavailable,
    /// Selected, and keyd answers but has not compiled its data-plane rules since it started,
    /// so which policies it enforces is not known yet (treated like `KeydUnavailable`).
    RulesPending,
    /// The namespace is not known, so namespace sensitivity cannot be ruled out.
    NamespaceUnknown,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Exempt,
        Reason::Unchanged,
        Reason::NotSensitive,
        Reason::Covered,
        Reason::NoPolicy,
        Reason::ModeNotReady,
        Reason::PolicyRejected,
        Reason::KeydUnavailable,
        Reason::RulesPending,
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
            Reason::PolicyRejected => "policy_rejected",
            Reason::KeydUnavailable => "keyd_unavailable",
            Reason::RulesPending => "rules_pending",
            Reason::NamespaceUnknown => "namespace_unknown",
        }
    }

    /// Whether the pod lacks coverage.
    pub fn is_violation(self) -> bool {
        matches!(
            self,
            Reason::NoPolicy
                | Reason::ModeNotReady
                | Reason::PolicyRejected
                | Reason::KeydUnavailable
                | Reason::RulesPending
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
    pub(super) fn allow(reason: Reason, enforcement: Enforcement) -> Self {
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
