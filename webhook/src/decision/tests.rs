//! The decision's tests, through [`decide`] as callers use it.

use std::collections::HashSet;
use std::sync::Arc;

use keyd_proto::EnforcementStatus;

use super::*;
use crate::crd::Mode;
use crate::crd::{
    ClusterEncryptionPolicy, ClusterEncryptionPolicySpec, EncryptionPolicy, EncryptionPolicySpec,
    LabelSelector, LabelSelectorRequirement,
};
use crate::workload::Workload;
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
}
