//! The policy custom resources (group `keyd.io`, version `v1alpha1`).
//!
//! `EncryptionPolicy` (namespaced) selects pods in its own namespace; `ClusterEncryptionPolicy`
//! (cluster-scoped) adds a namespace selector. Both name the encryption mode that the selected
//! pods' traffic must use. The YAML under `deploy/crds/` is generated from these types by
//! `cargo run -p keyd-webhook --bin crdgen`, and a test fails when the committed copy differs.
//!
//! The selector shape is Kubernetes' own `LabelSelector`, redefined here so that its schema can
//! restrict `operator` to the four operators the API server knows (Kubernetes 1.20, which the
//! tests run, has no CEL to check the rest: the webhook re-validates every selector and treats
//! a malformed one as selecting nothing, see [`crate::selector`]).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label key/value pairs, as on Kubernetes objects.
pub type Labels = BTreeMap<String, String>;

/// A Kubernetes label selector: every `matchLabels` pair and every `matchExpressions`
/// requirement must hold. An empty selector (`{}`) selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement: `key` `operator` `values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In` and `NotIn` need at least one value; `Exists` and `DoesNotExist` take none.
    #[schemars(extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"]))]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The encryption a policy requires. The same two modes keyd manages keys for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Wireguard,
    Ipsec,
}

impl From<Mode> for keyd_proto::EncryptionMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Wireguard => keyd_proto::EncryptionMode::Wireguard,
            Mode::Ipsec => keyd_proto::EncryptionMode::Ipsec,
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Wireguard => "wireguard",
            Mode::Ipsec => "ipsec",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A port the policy applies to. No ports means all traffic of the selected pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyPort {
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Peers whose traffic with the selected pods must be encrypted. No peers means every pod on
/// another node. A peer is a pod that `podSelector` selects (absent: every pod) in a namespace
/// that `namespaceSelector` selects (absent: the policy's own namespace, or for a
/// `ClusterEncryptionPolicy` the namespaces it selects).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Pods in this policy's namespace that `podSelector` selects must have their traffic encrypted
/// with `mode`; the admission webhook admits a sensitive pod only when such a policy selects it
/// and keyd reports the mode active and its keys within schedule.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keyd.io",
    version = "v1alpha1",
    kind = "EncryptionPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "encpol",
    category = "keyd",
    derive = "PartialEq",
    doc = "Requires encryption for the selected pods of one namespace.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Covered", type_ = "integer", json_path = ".status.coveredPods"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPolicySpec {
    /// Which pods of this namespace the policy covers; `{}` covers all of them.
    pub pod_selector: LabelSelector,
    pub mode: Mode,
    /// What happens to covered traffic that cannot be encrypted at a given moment (no key yet,
    /// a peer without a tunnel): `true` or absent, it is dropped, never sent in the clear (fail
    /// closed); `false`, it is sent in the clear and counted, for a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerSelector>,
}

/// Like `EncryptionPolicy`, across every namespace that `namespaceSelector` selects.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keyd.io",
    version = "v1alpha1",
    kind = "ClusterEncryptionPolicy",
    status = "PolicyStatus",
    shortname = "cencpol",
    category = "keyd",
    derive = "PartialEq",
    doc = "Requires encryption for the selected pods of the selected namespaces.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Covered", type_ = "integer", json_path = ".status.coveredPods"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEncryptionPolicySpec {
    /// Which namespaces the policy applies to; `{}` means all of them.
    pub namespace_selector: LabelSelector,
    /// Which pods of those namespaces it covers; `{}` covers all of them.
    pub pod_selector: LabelSelector,
    pub mode: Mode,
    /// What happens to covered traffic that cannot be encrypted at a given moment (no key yet,
    /// a peer without a tunnel): `true` or absent, it is dropped, never sent in the clear (fail
    /// closed); `false`, it is sent in the clear and counted, for a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerSelector>,
}

impl EncryptionPolicySpec {
    /// `strict` as it applies: absent means true (fail closed).
    pub fn is_strict(&self) -> bool {
        self.strict.unwrap_or(true)
    }
}

impl ClusterEncryptionPolicySpec {
    /// `strict` as it applies: absent means true (fail closed).
    pub fn is_strict(&self) -> bool {
        self.strict.unwrap_or(true)
    }
}

/// The CRDs, `EncryptionPolicy` first (what `crdgen` writes and the tests install).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![EncryptionPolicy::crd(), ClusterEncryptionPolicy::crd()]
}

/// Written by the webhook's status loop.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Existing pods this policy selects.
    pub covered_pods: u32,
    /// The `metadata.generation` the counts were computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Set when a selector is malformed; the policy then selects nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_parses_from_the_documented_yaml() {
        let yaml = r#"
apiVersion: keyd.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: payments, namespace: team-a}
spec:
  mode: wireguard
  podSelector:
    matchLabels: {app: payments}
    matchExpressions:
      - {key: tier, operator: In, values: [api, worker]}
  ports: [{port: 8443}]
  peers: [{namespaceSelector: {matchLabels: {team: a}}}]
"#;
        let p: EncryptionPolicy = serde_norway::from_str(yaml).expect("parses");
        assert_eq!(p.spec.mode, Mode::Wireguard);
        assert_eq!(p.spec.ports[0].protocol, Protocol::Tcp);
        assert_eq!(p.spec.pod_selector.match_expressions[0].values.len(), 2);
        assert!(p.spec.peers[0].pod_selector.is_none());
        assert!(p.spec.is_strict(), "absent strict fails closed");
    }

    #[test]
    fn strict_false_is_kept() {
        let yaml = "{podSelector: {}, mode: ipsec, strict: false}";
        let spec: EncryptionPolicySpec = serde_norway::from_str(yaml).expect("parses");
        assert_eq!(spec.strict, Some(false));
        assert!(!spec.is_strict());
    }
}
