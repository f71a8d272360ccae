//! `keyd-webhook scan`: the background audit of what already runs. Lists live sensitive pods
//! that no policy covers (admitted before the webhook existed, in warn or audit mode, by
//! break-glass, or left behind when a policy was deleted or its mode stopped being ready).
//!
//! Each pod is judged by the same [`decide`] the webhook uses, as if it were created now under
//! `enforce`; a finding is a pod that would be refused.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::crd::Labels;
use crate::decision::{DecisionConfig, Enforcement, Input, KeydView, Operation, decide};
use crate::policy::PolicySet;
use crate::workload::Workload;

/// A live pod, reduced to what the decision reads.
#[derive(Debug, Clone)]
pub struct LivePod {
    pub namespace: String,
    pub pod: Workload,
}

/// One uncovered sensitive pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub namespace: String,
    pub pod: String,
    /// `no_policy`, `mode_not_ready`, `policy_rejected`, `keyd_unavailable`, `rules_pending` or
    /// `namespace_unknown`.
    pub reason: &'static str,
    /// Policies that select it (whose mode is not ready).
    pub policies: Vec<String>,
    /// Whether it carries the break-glass annotation.
    pub break_glass: bool,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}\t{}{}\t{}",
            self.namespace,
            self.pod,
            self.reason,
            if self.break_glass {
                " (break-glass)"
            } else {
                ""
            },
            self.detail
        )
    }
}

/// Judges every pod; returns the uncovered sensitive ones, sorted by namespace and name.
pub fn scan(
    pods: &[LivePod],
    namespaces: &HashMap<String, Labels>,
    policies: &PolicySet,
    keyd: &KeydView,
    config: &DecisionConfig,
) -> Vec<Finding> {
    // The question is "is it covered", not "what would this namespace's mode do".
    let config = DecisionConfig {
        enforcement: Enforcement::Enforce,
        namespace_enforcement_label: None,
        ..config.clone()
    };
    let mut findings: Vec<Finding> = pods
        .iter()
        .filter_map(|p| {
            let d = decide(
                &Input {
                    operation: Operation::Create,
                    namespace: &p.namespace,
                    object: &p.pod,
                    old_object: None,
                    user: "keyd-webhook scan",
                },
                namespaces.get(&p.namespace),
                policies,
                keyd,
                &config,
            );
            d.reason.is_violation().then(|| Finding {
                namespace: p.namespace.clone(),
                pod: p.pod.display_name(),
                reason: d.reason.as_str(),
                policies: d.policies,
                break_glass: d.outcome == crate::decision::Outcome::BreakGlass,
                detail: d
                    .summary
                    .split_once("it would otherwise be refused: ")
                    .map(|(_, v)| v.to_owned())
                    .unwrap_or(d.summary),
            })
        })
        .collect();
    findings.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    findings
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crd::{EncryptionPolicy, EncryptionPolicySpec, LabelSelector, Mode};
    use keyd_proto::{EnforcementStatus, ModeStatus, Timestamp};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(ns: &str, name: &str, l: &[(&str, &str)], a: &[(&str, &str)]) -> LivePod {
        LivePod {
            namespace: ns.into(),
            pod: Workload::pod(name, labels(l), labels(a)),
        }
    }

    #[test]
    fn lists_uncovered_sensitive_pods_only() {
        let mut p = EncryptionPolicy::new(
            "pay",
            EncryptionPolicySpec {
                pod_selector: LabelSelector {
                    match_labels: labels(&[("app", "pay")]),
                    match_expressions: vec![],
                },
                mode: Mode::Ipsec,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        p.metadata.namespace = Some("shop".into());
        let set = PolicySet::from_resources([&p], []);
        let ready = ModeStatus {
            active: true,
            within_schedule: true,
            reason: None,
        };
        let keyd = KeydView::Known(Arc::new(EnforcementStatus {
            at: Timestamp::now(),
            ipsec: ready.clone(),
            wireguard: ready,
            rejected_policies: Vec::new(),
            rules_pending: false,
        }));
        let s = ("keyd.io/sensitive", "true");
        let pods = [
            pod("shop", "covered", &[s, ("app", "pay")], &[]),
            pod("shop", "uncovered", &[s, ("app", "web")], &[]),
            pod("shop", "glass", &[s], &[("keyd.io/break-glass", "INC-7")]),
            pod("shop", "plain", &[("app", "web")], &[]),
            pod("kube-system", "exempt", &[s], &[]),
            pod("audit-ns", "audited", &[s], &[]),
        ];
        let namespaces = HashMap::from([
            ("shop".to_owned(), Labels::new()),
            ("kube-system".to_owned(), Labels::new()),
            // Audit mode admitted it; the scan still lists it.
            (
                "audit-ns".to_owned(),
                labels(&[("keyd.io/enforcement", "audit")]),
            ),
        ]);
        let f = scan(&pods, &namespaces, &set, &keyd, &DecisionConfig::default());
        let names: Vec<&str> = f.iter().map(|f| f.pod.as_str()).collect();
        assert_eq!(names, ["audited", "glass", "uncovered"]);
        assert!(f.iter().all(|f| f.reason == "no_policy"));
        assert!(f[1].break_glass);
        assert!(
            f[1].detail.starts_with("sensitive (pod label"),
            "{}",
            f[1].detail
        );
        assert!(
            f[2].to_string()
                .starts_with("shop/uncovered\tno_policy\tsensitive")
        );
    }
}
