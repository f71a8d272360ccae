//! A synthetic cluster for the benchmarks: 10,000 namespaces and 1,000 policies, and a stream of
//! admission requests over them. Deterministic (a fixed-seed xorshift), so runs compare.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use keyd_proto::{EnforcementStatus, ModeStatus, Timestamp};
use keyd_webhook::crd::{ClusterEncryptionPolicy, EncryptionPolicy, Labels};
use keyd_webhook::policy::PolicySet;
use serde_json::{Value, json};

pub const NAMESPACES: usize = 10_000;
pub const POLICIES: usize = 1_000;

/// xorshift64*: enough randomness for picking test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:05}")
}

/// Namespace labels: team, env, some `compliance=pci`, every tenth sensitive, every seventh in
/// warn mode.
pub fn namespaces() -> HashMap<String, Labels> {
    (0..NAMESPACES)
        .map(|i| {
            let mut l = Labels::new();
            l.insert("team".into(), format!("team-{}", i % 50));
            l.insert("env".into(), ["prod", "staging", "dev"][i % 3].into());
            if i % 20 == 0 {
                l.insert("compliance".into(), "pci".into());
            }
            if i % 10 == 0 {
                l.insert("keyd.io/sensitive".into(), "true".into());
            }
            if i % 7 == 0 {
                l.insert("keyd.io/enforcement".into(), "warn".into());
            }
            (ns_name(i), l)
        })
        .collect()
}

/// `cluster` of the policies are ClusterEncryptionPolicies, the rest EncryptionPolicies spread
/// over distinct namespaces.
pub fn policies(cluster: usize) -> PolicySet {
    let namespaced: Vec<EncryptionPolicy> = (0..POLICIES - cluster)
        .map(|i| {
            serde_json::from_value(json!({
                "apiVersion": "keyd.io/v1alpha1", "kind": "EncryptionPolicy",
                "metadata": {"name": format!("p-{i}"), "namespace": ns_name((i * 11) % NAMESPACES)},
                "spec": {
                    "mode": if i % 2 == 0 { "ipsec" } else { "wireguard" },
                    "podSelector": {
                        "matchLabels": {"app": format!("app-{}", i % 20)},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "worker"]}]
                    }
                }
            }))
            .unwrap()
        })
        .collect();
    let cluster: Vec<ClusterEncryptionPolicy> = (0..cluster)
        .map(|j| {
            serde_json::from_value(json!({
                "apiVersion": "keyd.io/v1alpha1", "kind": "ClusterEncryptionPolicy",
                "metadata": {"name": format!("c-{j}")},
                "spec": {
                    "mode": if j % 3 == 0 { "wireguard" } else { "ipsec" },
                    "namespaceSelector": {"matchExpressions": [
                        {"key": "team", "operator": "In", "values": [format!("team-{}", j % 50)]},
                        {"key": "env", "operator": "NotIn", "values": ["dev"]}
                    ]},
                    "podSelector": {"matchExpressions": [
                        {"key": "app", "operator": "In", "values": [format!("app-{}", j % 20), format!("app-{}", (j + 7) % 20)]},
                        {"key": "legacy", "operator": "DoesNotExist"}
                    ]}
                }
            }))
            .unwrap()
        })
        .collect();
    PolicySet::from_resources(&namespaced, &cluster)
}

/// keyd with IPsec ready and WireGuard not: both the covered and the not-ready paths occur.
pub fn keyd_status() -> EnforcementStatus {
    EnforcementStatus {
        at: Timestamp::now(),
        ipsec: ModeStatus {
            active: true,
            within_schedule: true,
            reason: None,
        },
        wireguard: ModeStatus {
            active: false,
            within_schedule: false,
            reason: Some("no node has registered a WireGuard public key".into()),
        },
        rejected_policies: Vec::new(),
        rules_pending: false,
    }
}

/// A pod's labels: an app, a tier, half of them sensitive.
pub fn pod_labels(rng: &mut Rng) -> Labels {
    let mut l = Labels::new();
    l.insert("app".into(), format!("app-{}", rng.below(20)));
    l.insert("tier".into(), ["api", "worker", "db"][rng.below(3)].into());
    l.insert(
        "pod-template-hash".into(),
        format!("{:x}", rng.next() & 0xffff_ffff),
    );
    if rng.below(2) == 0 {
        l.insert("keyd.io/sensitive".into(), "true".into());
    }
    l
}

/// Picks a namespace: half the time one that has an EncryptionPolicy, so that namespaced
/// policies are exercised as often as cluster ones.
pub fn pick_namespace(rng: &mut Rng, cluster_policies: usize) -> String {
    let with_policy = POLICIES - cluster_policies;
    if with_policy > 0 && rng.below(2) == 0 {
        ns_name((rng.below(with_policy) * 11) % NAMESPACES)
    } else {
        ns_name(rng.below(NAMESPACES))
    }
}

/// A realistic Pod object (about 1.5 KB of JSON, like what the API server sends).
pub fn pod_object(name: &str, ns: &str, labels: &Labels) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-21T08:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"), "uid": "0b7d6f0e-8c1a-4b57-9d3e-3f1c2a8b9e10", "controller": true}]
        },
        "spec": {
            "containers": [{
                "name": "app", "image": "registry.example/team/app:1.42.0",
                "ports": [{"containerPort": 8443, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "REGION", "value": "eu-west-1"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8443, "scheme": "HTTPS"}, "periodSeconds": 5},
                "volumeMounts": [{"name": "tls", "mountPath": "/etc/tls", "readOnly": true}]
            }],
            "volumes": [{"name": "tls", "secret": {"secretName": format!("{name}-tls")}}],
            "serviceAccountName": "default", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30
        }
    })
}

/// The benchmark cluster as the server's static source.
pub fn static_cluster(cluster_policies: usize) -> Arc<keyd_webhook::kube_cache::StaticCluster> {
    Arc::new(keyd_webhook::kube_cache::StaticCluster {
        policies: Arc::new(policies(cluster_policies)),
        namespaces: namespaces()
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
    })
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
