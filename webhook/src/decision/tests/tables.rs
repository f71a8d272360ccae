//! The table-driven cases, one table per rule; the harness is in the parent module.

use super::*;

/// Rules 1 and 3: who is checked at all.
#[test]
fn sensitivity_and_exemptions() {
    let plain = || Workload::pod("plain", labels(&[("app", "x")]), Labels::new());
    let sensitive_ns = || Some(labels(&[("keyd.io/sensitive", "true")]));
    let exempt_keyd = || DecisionConfig {
        exempt_namespaces: HashSet::from(["keyd".to_owned()]),
        ..DecisionConfig::default()
    };
    let no_namespace_rule = || DecisionConfig {
        sensitive_namespace_label: None,
        ..DecisionConfig::default()
    };
    check(&[
        Case {
            namespace: "default",
            keyd: KeydView::Unknown("down".into()),
            warnings: Some(0),
            ..Case::new(
                "a pod that is not sensitive is allowed and not recorded",
                Workload::pod("web", labels(&[("app", "web")]), Labels::new()),
                Outcome::Allowed,
                Reason::NotSensitive,
            )
        },
        Case {
            namespace: "default",
            ..Case::new(
                "keyd.io/sensitive=false is not sensitive either",
                Workload::pod(
                    "web",
                    labels(&[("keyd.io/sensitive", "false")]),
                    Labels::new(),
                ),
                Outcome::Allowed,
                Reason::NotSensitive,
            )
        },
        Case {
            namespace: "vault",
            namespace_labels: sensitive_ns(),
            message: &[Text::Has(
                "sensitive (namespace vault has label keyd.io/sensitive=true)",
            )],
            ..Case::new(
                "the namespace label makes every pod sensitive",
                plain(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace: "vault",
            namespace_labels: sensitive_ns(),
            config: no_namespace_rule(),
            ..Case::new(
                "pod-only sensitivity ignores the namespace label",
                plain(),
                Outcome::Allowed,
                Reason::NotSensitive,
            )
        },
        Case {
            namespace: "web",
            config: DecisionConfig {
                sensitive_pod_label: None,
                ..DecisionConfig::default()
            },
            ..Case::new(
                "namespace-only sensitivity ignores the pod label",
                sensitive_pod("p", &[]),
                Outcome::Allowed,
                Reason::NotSensitive,
            )
        },
        Case {
            namespace: "web",
            config: DecisionConfig {
                sensitive_pod_label: Some(LabelRule {
                    key: "data".into(),
                    value: "pii".into(),
                }),
                ..DecisionConfig::default()
            },
            message: &[Text::Has("pod label data=pii")],
            ..Case::new(
                "a custom pod label rule",
                Workload::pod("p", labels(&[("data", "pii")]), Labels::new()),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace: "new-ns",
            namespace_labels: None,
            message: &[
                Text::Has("namespace new-ns is not known"),
                Text::Has("retry"),
            ],
            ..Case::new(
                "an unknown namespace fails closed while it could make the pod sensitive",
                plain(),
                Outcome::Denied,
                Reason::NamespaceUnknown,
            )
        },
        Case {
            namespace: "new-ns",
            namespace_labels: None,
            config: no_namespace_rule(),
            ..Case::new(
                "an unknown namespace does not matter without the namespace rule",
                plain(),
                Outcome::Allowed,
                Reason::NotSensitive,
            )
        },
        Case {
            namespace: "new-ns",
            namespace_labels: None,
            policies: one_policy("new-ns", "p", Mode::Ipsec, LabelSelector::default()),
            ..Case::new(
                "in an unknown namespace a pod sensitive by its own label is judged normally",
                sensitive_pod("p", &[]),
                Outcome::Allowed,
                Reason::Covered,
            )
        },
        Case {
            namespace: "kube-system",
            ..Case::new(
                "exempt namespaces are never checked",
                sensitive_pod("p", &[]),
                Outcome::Allowed,
                Reason::Exempt,
            )
        },
        Case {
            namespace: "kube-system",
            config: exempt_keyd(),
            ..Case::new(
                "a namespace left out of a configured exempt list is checked",
                sensitive_pod("p", &[]),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace: "keyd",
            namespace_labels: None,
            config: exempt_keyd(),
            ..Case::new(
                "a configured exempt namespace is not checked even when unknown",
                sensitive_pod("p", &[]),
                Outcome::Allowed,
                Reason::Exempt,
            )
        },
    ]);
}

/// Rule 5: which policies cover a sensitive pod, and what a refusal says when none does.
#[test]
fn policy_coverage() {
    let pod = || sensitive_pod("p", &[("app", "x")]);
    let pci = ClusterEncryptionPolicy::new(
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
            strict: None,
            ports: vec![],
            peers: vec![],
        },
    );
    let cluster = || PolicySet::from_resources([], [&pci]);
    let malformed = LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "Equals".into(),
            values: vec!["x".into()],
        }],
    };
    check(&[
        Case {
            policies: one_policy("other", "p", Mode::Ipsec, LabelSelector::default()),
            ..Case::new(
                "a policy in another namespace does not cover",
                pod(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            policies: one_policy(
                "team-a",
                "wg",
                Mode::Wireguard,
                match_labels(&[("app", "x")]),
            ),
            policy_names: Some(&["EncryptionPolicy team-a/wg"]),
            message: &[
                Text::Has(
                    "EncryptionPolicy team-a/wg requires wireguard (not active: no node has \
                     registered a WireGuard public key)",
                ),
                Text::Has("make wireguard ready in keyd"),
                Text::Has(
                    r#"kubectl -n team-a patch encryptionpolicy wg --type merge -p '{"spec":{"mode":"ipsec"}}'"#,
                ),
            ],
            ..Case::new(
                "a selecting policy whose mode is not ready denies with keyd's reason",
                pod(),
                Outcome::Denied,
                Reason::ModeNotReady,
            )
        },
        Case {
            policies: one_policy("team-a", "ip", Mode::Ipsec, LabelSelector::default()),
            keyd: KeydView::Known(Arc::new(EnforcementStatus {
                at: Timestamp::now(),
                ipsec: ready(true, false, Some("key 3 is 40 days old")),
                wireguard: ready(true, false, None),
                rejected_policies: Vec::new(),
                rules_pending: false,
            })),
            message: &[
                Text::Has("keys overdue for rotation: key 3 is 40 days old"),
                Text::Has("keyctl ipsec rotate"),
            ],
            ..Case::new(
                "overdue keys are not ready either, and say so",
                pod(),
                Outcome::Denied,
                Reason::ModeNotReady,
            )
        },
        Case {
            policies: PolicySet::from_resources(
                [
                    &ns_policy("team-a", "wg", Mode::Wireguard, LabelSelector::default()),
                    &ns_policy("team-a", "ip", Mode::Ipsec, match_labels(&[("app", "x")])),
                ],
                [],
            ),
            policy_names: Some(&["EncryptionPolicy team-a/ip", "EncryptionPolicy team-a/wg"]),
            ..Case::new(
                "any one ready selecting policy is enough",
                pod(),
                Outcome::Allowed,
                Reason::Covered,
            )
        },
        Case {
            policies: one_policy("team-a", "ip", Mode::Ipsec, LabelSelector::default()),
            keyd: rejecting(&["EncryptionPolicy team-a/ip"]),
            message: &[
                Text::Has(
                    "keyd does not enforce the selecting policy: EncryptionPolicy team-a/ip \
                     (node \"n7\" is concerned by more than 1024 policies",
                ),
                Text::Has("keyctl rules NODE"),
            ],
            ..Case::new(
                "a policy keyd's rules leave out of a node covers nothing, with keyd's reason",
                pod(),
                Outcome::Denied,
                Reason::PolicyRejected,
            )
        },
        Case {
            policies: one_policy("team-a", "ip", Mode::Ipsec, LabelSelector::default()),
            keyd: rules_pending(),
            message: &[Text::Has(
                "keyd's status is unknown: keyd has not compiled its data-plane rules since it \
                 started",
            )],
            ..Case::new(
                "until keyd has compiled its rules, which policies it enforces is unknown",
                pod(),
                Outcome::Denied,
                Reason::RulesPending,
            )
        },
        Case {
            policies: PolicySet::from_resources(
                [
                    &ns_policy("team-a", "ip", Mode::Ipsec, LabelSelector::default()),
                    &ns_policy("team-a", "ip2", Mode::Ipsec, match_labels(&[("app", "x")])),
                ],
                [],
            ),
            keyd: rejecting(&["EncryptionPolicy team-a/ip"]),
            ..Case::new(
                "another selecting policy that keyd enforces still covers the pod",
                pod(),
                Outcome::Allowed,
                Reason::Covered,
            )
        },
        Case {
            policies: PolicySet::from_resources(
                [
                    &ns_policy("team-a", "ip", Mode::Ipsec, LabelSelector::default()),
                    &ns_policy(
                        "team-a",
                        "wg",
                        Mode::Wireguard,
                        match_labels(&[("app", "x")]),
                    ),
                ],
                [],
            ),
            keyd: rejecting_with_wireguard_down(&["EncryptionPolicy team-a/ip"]),
            message: &[
                Text::Has("EncryptionPolicy team-a/wg requires wireguard (not active"),
                Text::Has(
                    "EncryptionPolicy team-a/ip is not enforced by keyd (node \"n7\" is \
                     concerned by more than 1024 policies",
                ),
            ],
            ..Case::new(
                "a mode not ready and a policy left out: the denial names both",
                pod(),
                Outcome::Denied,
                Reason::ModeNotReady,
            )
        },
        Case {
            namespace: "shop",
            namespace_labels: Some(labels(&[("compliance", "pci")])),
            policies: cluster(),
            policy_names: Some(&["ClusterEncryptionPolicy pci"]),
            ..Case::new(
                "a cluster policy selects by namespace labels",
                pod(),
                Outcome::Allowed,
                Reason::Covered,
            )
        },
        Case {
            namespace: "shop",
            namespace_labels: Some(labels(&[("compliance", "none")])),
            policies: cluster(),
            ..Case::new(
                "a cluster policy does not select other namespaces",
                pod(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            policies: one_policy("team-a", "broken", Mode::Ipsec, malformed),
            message: &[Text::Has(
                "Note: EncryptionPolicy team-a/broken (podSelector: matchExpressions[0]: \
                 unknown operator \"Equals\"",
            )],
            ..Case::new(
                "malformed policies select nothing and are named",
                pod(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace: "vault",
            namespace_labels: Some(labels(&[("keyd.io/sensitive", "true")])),
            keyd: KeydView::Unknown("x".into()),
            message: &[Text::Has("podSelector: {}"), Text::Has("mode: wireguard")],
            ..Case::new(
                "a pod with no labels gets a select-all example",
                Workload::pod("p", Labels::new(), Labels::new()),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
    ]);
}

/// Rule 6: warn and audit admit and record; the namespace label overrides the cluster default.
#[test]
fn enforcement_modes() {
    let pod = || sensitive_pod("p", &[("app", "x")]);
    let ns = |mode: &str| Some(labels(&[("keyd.io/enforcement", mode)]));
    let cluster_warn = || DecisionConfig {
        enforcement: Enforcement::Warn,
        ..DecisionConfig::default()
    };
    check(&[
        Case {
            namespace_labels: ns("warn"),
            enforcement: Some(Enforcement::Warn),
            warnings: Some(1),
            first_warning: &[Text::StartsWith(
                "keyd: Pod team-a/p would be refused: sensitive",
            )],
            ..Case::new(
                "a warn namespace admits with a warning",
                pod(),
                Outcome::Warned,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace_labels: ns("audit"),
            enforcement: Some(Enforcement::Audit),
            warnings: Some(0),
            ..Case::new(
                "an audit namespace admits silently",
                pod(),
                Outcome::Audited,
                Reason::NoPolicy,
            )
        },
        Case {
            config: cluster_warn(),
            ..Case::new(
                "cluster-wide warn applies to an unlabelled namespace",
                pod(),
                Outcome::Warned,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace_labels: ns("enforce"),
            config: cluster_warn(),
            ..Case::new(
                "under cluster-wide warn a namespace can still require enforce",
                pod(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
        Case {
            namespace_labels: ns("warning"),
            config: cluster_warn(),
            message: &[Text::Has(
                "keyd.io/enforcement=warning is not one of enforce, warn, audit",
            )],
            ..Case::new(
                "a typo in the namespace label enforces, and says so",
                pod(),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
    ]);
}

/// Rule 4: break-glass admits and records the user.
#[test]
fn break_glass() {
    let glass = |value: &str| labels(&[("keyd.io/break-glass", value)]);
    let pod = |value: &str| {
        annotated(
            sensitive_pod("p", &[("app", "x")]),
            &[("keyd.io/break-glass", value)],
        )
    };
    let deployment = |annotations: Labels| {
        Workload::with_template(
            WorkloadKind::Deployment,
            "web",
            labels(&[("keyd.io/sensitive", "true")]),
            annotations,
        )
    };
    check(&[
        Case {
            summary: &[Text::StartsWith(
                "break-glass by alice: \"INC-42 payments down\"; it would otherwise be refused: \
                 sensitive",
            )],
            first_warning: &[Text::Has("recorded")],
            ..Case::new(
                "break-glass admits an uncovered pod and records the user",
                pod("INC-42 payments down"),
                Outcome::BreakGlass,
                Reason::NoPolicy,
            )
        },
        Case {
            policies: one_policy("team-a", "p", Mode::Ipsec, LabelSelector::default()),
            summary: &[Text::EndsWith("it was covered anyway")],
            ..Case::new(
                "break-glass is recorded when the pod was covered anyway",
                pod("INC-42 payments down"),
                Outcome::BreakGlass,
                Reason::Covered,
            )
        },
        Case::new(
            "a blank break-glass is not a justification",
            pod("  "),
            Outcome::Denied,
            Reason::NoPolicy,
        ),
        Case::new(
            "break-glass on the Deployment itself does not reach the pods",
            annotated(
                deployment(Labels::new()),
                &[("keyd.io/break-glass", "INC-42")],
            ),
            Outcome::Denied,
            Reason::NoPolicy,
        ),
        Case::new(
            "break-glass on a Deployment's pod template counts",
            deployment(glass("INC-42")),
            Outcome::BreakGlass,
            Reason::NoPolicy,
        ),
        Case {
            summary: &[Text::ShorterThan(1000)],
            ..Case::new(
                "a long justification is cut in the record",
                annotated(
                    sensitive_pod("p", &[]),
                    &[("keyd.io/break-glass", &"x".repeat(10_000))],
                ),
                Outcome::BreakGlass,
                Reason::NoPolicy,
            )
        },
    ]);
}

/// An unknown keyd status fails closed by default and open when configured.
#[test]
fn keyd_unavailable() {
    let selected = || one_policy("team-a", "p", Mode::Ipsec, LabelSelector::default());
    let down = || KeydView::Unknown("no answer from keyd for 45s (connection refused)".into());
    let open = || DecisionConfig {
        when_keyd_unavailable: WhenKeydUnavailable::Allow,
        ..DecisionConfig::default()
    };
    check(&[
        Case {
            policies: selected(),
            keyd: down(),
            message: &[
                Text::Has("no answer from keyd for 45s (connection refused)"),
                Text::Has("keyd.when_unavailable = deny"),
            ],
            ..Case::new(
                "unknown keyd status fails closed by default",
                sensitive_pod("p", &[]),
                Outcome::Denied,
                Reason::KeydUnavailable,
            )
        },
        Case {
            policies: selected(),
            keyd: down(),
            config: open(),
            warnings: Some(1),
            ..Case::new(
                "unknown keyd status fails open when configured",
                sensitive_pod("p", &[]),
                Outcome::Warned,
                Reason::KeydUnavailable,
            )
        },
        Case {
            policies: selected(),
            keyd: rules_pending(),
            config: open(),
            warnings: Some(1),
            ..Case::new(
                "rules keyd has not compiled yet fail open when configured, under their own reason",
                sensitive_pod("p", &[]),
                Outcome::Warned,
                Reason::RulesPending,
            )
        },
        Case {
            policies: selected(),
            keyd: rules_pending(),
            message: &[
                Text::Has("keyd has not compiled its data-plane rules since it started"),
                Text::Has("retry in a minute"),
            ],
            ..Case::new(
                "rules keyd has not compiled yet fail closed by default, with their own fix",
                sensitive_pod("p", &[]),
                Outcome::Denied,
                Reason::RulesPending,
            )
        },
        Case {
            keyd: down(),
            config: open(),
            ..Case::new(
                "failing open never covers a pod that no policy selects",
                sensitive_pod("p", &[]),
                Outcome::Denied,
                Reason::NoPolicy,
            )
        },
    ]);
}

/// Rule 2: updates that keep the pod labels and break-glass are allowed; others are judged.
#[test]
fn updates() {
    let old = || sensitive_pod("p", &[("app", "x")]);
    let update = |name, object, outcome, reason| Case {
        old_object: Some(old()),
        user: "system:serviceaccount:kube-system:some-controller",
        ..Case::new(name, object, outcome, reason)
    };
    check(&[
        update(
            "an update of unrelated annotations is allowed unchanged",
            annotated(old(), &[("unrelated", "1")]),
            Outcome::Allowed,
            Reason::Unchanged,
        ),
        update(
            "an update of the pod labels is judged",
            sensitive_pod("p", &[("app", "y")]),
            Outcome::Denied,
            Reason::NoPolicy,
        ),
        update(
            "an update adding break-glass is judged",
            annotated(old(), &[("keyd.io/break-glass", "INC-1")]),
            Outcome::BreakGlass,
            Reason::NoPolicy,
        ),
    ]);
}
