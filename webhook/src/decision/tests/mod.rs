//! The decision's tests, through [`decide`] as callers use it. Most are tables: one request per
//! case and what the decision must say about it; every case also checks that `allowed` and
//! `record` agree with the outcome.

use std::collections::HashSet;
use std::sync::Arc;

use keyd_proto::{EnforcementStatus, ModeStatus, Timestamp};

use super::*;
use crate::crd::{
    ClusterEncryptionPolicy, ClusterEncryptionPolicySpec, EncryptionPolicy, EncryptionPolicySpec,
    LabelSelector, LabelSelectorRequirement, Mode,
};
use crate::workload::{Workload, WorkloadKind};

mod tables;

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

/// keyd with both modes ready, its rules leaving `names` out of node n7 (over its limit).
fn rejecting(names: &[&str]) -> KeydView {
    rejecting_in(names, ready(true, true, None))
}

/// [`rejecting`], with WireGuard not active.
fn rejecting_with_wireguard_down(names: &[&str]) -> KeydView {
    rejecting_in(
        names,
        ready(false, false, Some("no node has registered a key")),
    )
}

fn rejecting_in(names: &[&str], wireguard: ModeStatus) -> KeydView {
    KeydView::Known(Arc::new(EnforcementStatus {
        at: Timestamp::now(),
        ipsec: ready(true, true, None),
        wireguard,
        rejected_policies: names
            .iter()
            .map(|n| keyd_proto::rules::RejectedPolicy {
                name: (*n).to_owned(),
                reason: "node \"n7\" is concerned by more than 1024 policies, the most its maps \
                         hold; this one is past the limit"
                    .to_owned(),
            })
            .collect(),
        rules_pending: false,
    }))
}

/// keyd with both modes ready that has not compiled its rules since it started.
fn rules_pending() -> KeydView {
    KeydView::Known(Arc::new(EnforcementStatus {
        at: Timestamp::now(),
        ipsec: ready(true, true, None),
        wireguard: ready(true, true, None),
        rejected_policies: Vec::new(),
        rules_pending: true,
    }))
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
        rejected_policies: Vec::new(),
        rules_pending: false,
    }))
}

fn ns_policy(ns: &str, name: &str, mode: Mode, selector: LabelSelector) -> EncryptionPolicy {
    let mut p = EncryptionPolicy::new(
        name,
        EncryptionPolicySpec {
            pod_selector: selector,
            mode,
            strict: None,
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

/// Decides a CREATE by alice in namespace team-a (known, no labels), with keyd's IPsec ready and
/// the default config: the request of the tests that are not tables.
fn run(object: &Workload, policies: &PolicySet) -> Decision {
    let input = Input {
        operation: Operation::Create,
        namespace: "team-a",
        object,
        old_object: None,
        user: "alice",
    };
    let config = DecisionConfig::default();
    decide(
        &input,
        Some(&Labels::new()),
        policies,
        &keyd_ipsec_only(),
        &config,
    )
}

/// One namespaced policy, as the whole set.
fn one_policy(ns: &str, name: &str, mode: Mode, selector: LabelSelector) -> PolicySet {
    PolicySet::from_resources([&ns_policy(ns, name, mode, selector)], [])
}

/// `w` with these annotations on the object itself (for a pod, its pods').
fn annotated(mut w: Workload, pairs: &[(&str, &str)]) -> Workload {
    w.annotations = labels(pairs);
    w
}

/// A check on one of the decision's texts.
#[derive(Debug)]
enum Text {
    Has(&'static str),
    StartsWith(&'static str),
    EndsWith(&'static str),
    ShorterThan(usize),
}

impl Text {
    fn holds(&self, s: &str) -> bool {
        match *self {
            Text::Has(p) => s.contains(p),
            Text::StartsWith(p) => s.starts_with(p),
            Text::EndsWith(p) => s.ends_with(p),
            Text::ShorterThan(n) => s.len() < n,
        }
    }
}

/// One admission request and what the decision must say about it. [`Case::new`] sets the usual
/// request: a CREATE by alice in namespace team-a (known, no labels), no policies, keyd with
/// IPsec ready and WireGuard not, the default config.
struct Case {
    name: &'static str,
    object: Workload,
    namespace: &'static str,
    namespace_labels: Option<Labels>,
    policies: PolicySet,
    keyd: KeydView,
    config: DecisionConfig,
    /// Makes the request an UPDATE of this object.
    old_object: Option<Workload>,
    user: &'static str,
    outcome: Outcome,
    reason: Reason,
    enforcement: Option<Enforcement>,
    policy_names: Option<&'static [&'static str]>,
    warnings: Option<usize>,
    message: &'static [Text],
    summary: &'static [Text],
    first_warning: &'static [Text],
}

impl Case {
    fn new(name: &'static str, object: Workload, outcome: Outcome, reason: Reason) -> Self {
        Self {
            name,
            object,
            namespace: "team-a",
            namespace_labels: Some(Labels::new()),
            policies: PolicySet::default(),
            keyd: keyd_ipsec_only(),
            config: DecisionConfig::default(),
            old_object: None,
            user: "alice",
            outcome,
            reason,
            enforcement: None,
            policy_names: None,
            warnings: None,
            message: &[],
            summary: &[],
            first_warning: &[],
        }
    }

    /// What differs from the expectation, one line each.
    fn failures(&self) -> Vec<String> {
        let operation = match self.old_object {
            Some(_) => Operation::Update,
            None => Operation::Create,
        };
        let input = Input {
            operation,
            namespace: self.namespace,
            object: &self.object,
            old_object: self.old_object.as_ref(),
            user: self.user,
        };
        let d = decide(
            &input,
            self.namespace_labels.as_ref(),
            &self.policies,
            &self.keyd,
            &self.config,
        );
        let mut f = Vec::new();
        let mut want = |ok: bool, what: String| {
            if !ok {
                f.push(what);
            }
        };
        want(
            d.outcome == self.outcome,
            format!("outcome {:?}, want {:?}", d.outcome, self.outcome),
        );
        want(
            d.reason == self.reason,
            format!("reason {:?}, want {:?}", d.reason, self.reason),
        );
        want(
            d.allowed == (d.outcome != Outcome::Denied),
            format!("allowed {} with outcome {:?}", d.allowed, d.outcome),
        );
        want(
            d.record == (d.outcome != Outcome::Allowed),
            format!("record {} with outcome {:?}", d.record, d.outcome),
        );
        if let Some(e) = self.enforcement {
            want(
                d.enforcement == e,
                format!("enforcement {:?}, want {e:?}", d.enforcement),
            );
        }
        if let Some(p) = self.policy_names {
            want(
                d.policies == p,
                format!("policies {:?}, want {p:?}", d.policies),
            );
        }
        if let Some(n) = self.warnings {
            want(
                d.warnings.len() == n,
                format!("{} warnings, want {n}", d.warnings.len()),
            );
        }
        let first_warning = d.warnings.first().map_or("", String::as_str);
        for (field, text, checks) in [
            ("message", d.message.as_str(), self.message),
            ("summary", d.summary.as_str(), self.summary),
            ("first warning", first_warning, self.first_warning),
        ] {
            for c in checks.iter().filter(|c| !c.holds(text)) {
                want(false, format!("{field} fails {c:?}"));
            }
        }
        f.iter()
            .map(|what| format!("case {:?}: {what}\n  decision: {d:?}", self.name))
            .collect()
    }
}

/// Runs every case and names each that fails.
fn check(cases: &[Case]) {
    let failures: Vec<String> = cases.iter().flat_map(Case::failures).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_sensitive_pod_without_a_policy_is_denied_with_object_missing_piece_and_fix() {
    let pod = sensitive_pod(
        "payments-0",
        &[("app", "payments"), ("pod-template-hash", "abc")],
    );
    let d = run(&pod, &PolicySet::default());
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
    let d = run(&pod, &set);
    assert_eq!((d.allowed, d.reason), (true, Reason::Covered));
    assert!(!d.record);
}

#[test]
fn workload_templates_are_judged_like_pods() {
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
        let d = run(&w, &PolicySet::default());
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
        let d = run(&own, &PolicySet::default());
        assert_eq!(d.reason, Reason::NotSensitive, "{kind}");
    }
}
