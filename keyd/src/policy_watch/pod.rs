//! Pods as the watcher holds them: only the fields the rules need (name, namespace, labels,
//! node, addresses, phase, host network), so that a cluster's pods cost little memory. The API
//! server still sends whole objects; everything else is dropped while decoding.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keyd_policy::rules::PodInput;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub(super) struct PodLite {
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    node_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    phase: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIp>>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct PodIp {
    ip: String,
}

impl kube::Resource for PodLite {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodLite {
    /// The compiler's view. Addresses that do not parse are left out (the API server validates
    /// them; a pod without any takes no part).
    pub(super) fn input(&self) -> PodInput {
        let mut ips: Vec<_> = match &self.status.pod_ips {
            Some(list) => list.iter().filter_map(|p| p.ip.parse().ok()).collect(),
            None => Vec::new(),
        };
        if ips.is_empty()
            && let Some(ip) = self.status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        PodInput {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
            labels: self.metadata.labels.clone().unwrap_or_default(),
            node: self.spec.node_name.clone(),
            ips,
            phase: self.status.phase.clone(),
            host_network: self.spec.host_network.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_reduces_to_the_fields_the_rules_need() {
        let json = r#"{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "a", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.10",
                       "podIPs": [{"ip": "10.1.0.10"}, {"ip": "fd00::10"}, {"ip": "bogus"}]}
        }"#;
        let pod: PodLite = serde_json::from_str(json).expect("parses");
        let input = pod.input();
        assert_eq!(input.namespace, "a");
        assert_eq!(input.node.as_deref(), Some("n1"));
        assert_eq!(input.ips.len(), 2, "the unparsable address is left out");
        assert!(!input.host_network);
        let bare: PodLite =
            serde_json::from_str(r#"{"metadata": {"name": "p", "namespace": "a"}}"#)
                .expect("parses");
        assert!(bare.input().ips.is_empty());
        assert!(bare.input().node.is_none());
    }
}
