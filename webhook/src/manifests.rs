//! Generated Kubernetes objects: the two CRDs, and the ValidatingWebhookConfiguration derived
//! from the same settings the decision uses (so the API server sends exactly the requests the
//! webhook must see). `crdgen` writes them under `deploy/`; the tests install them into a real
//! API server.
//!
//! The webhook configuration has three entries, so that the failure policy can be strict where
//! it matters without taking the cluster hostage:
//! - `sensitive-pods.keyd.io`: Pods carrying the sensitive label; `failurePolicy: Fail`.
//! - `sensitive-namespaces.keyd.io`: Pods (without that label) in namespaces carrying the
//!   namespace label; `failurePolicy: Fail`.
//! - `workloads.keyd.io`: Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs.
//!   An object selector cannot see a pod template's labels, so every workload is sent;
//!   `failurePolicy: Ignore`, because the Pods the workload creates are checked (and refused)
//!   by the first two entries anyway: this entry only makes `kubectl apply` fail at once.
//!
//! So while the webhook is down, sensitive pods are refused and nothing else is affected. Exempt
//! namespaces are also excluded by name (`kubernetes.io/metadata.name`, set by Kubernetes 1.21+;
//! on older servers the webhook still exempts them itself).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use crate::decision::DecisionConfig;
use crate::workload::WorkloadKind;

/// The name of the ValidatingWebhookConfiguration.
pub const WEBHOOK_CONFIGURATION_NAME: &str = "keyd-webhook";

/// The CRDs, `EncryptionPolicy` first.
pub fn crds() -> Vec<CustomResourceDefinition> {
    crate::crd::crds()
}

/// Where the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `https://...` (tests: the webhook on 127.0.0.1).
    Url(String),
    /// A Service in the cluster; the path is `/validate`.
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
}

/// The ValidatingWebhookConfiguration for `config`. `ca_bundle` is the PEM of the CA that signed
/// the webhook's serving certificate (`None`: filled in later, e.g. by cert-manager's CA
/// injector).
pub fn webhook_configuration(
    config: &DecisionConfig,
    endpoint: &Endpoint,
    ca_bundle: Option<&[u8]>,
    name: &str,
) -> ValidatingWebhookConfiguration {
    let client_config = WebhookClientConfig {
        ca_bundle: ca_bundle.map(|b| ByteString(b.to_vec())),
        service: match endpoint {
            Endpoint::Service {
                namespace,
                name,
                port,
            } => Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some("/validate".into()),
                port: Some(*port),
            }),
            Endpoint::Url(_) => None,
        },
        url: match endpoint {
            Endpoint::Url(u) => Some(format!("{}/validate", u.trim_end_matches('/'))),
            Endpoint::Service { .. } => None,
        },
    };
    let mut exempt: Vec<String> = config.exempt_namespaces.iter().cloned().collect();
    exempt.sort();
    let not_exempt = |mut s: LabelSelector| {
        if !exempt.is_empty() {
            s.match_expressions
                .get_or_insert_with(Vec::new)
                .push(LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "NotIn".into(),
                    values: Some(exempt.clone()),
                });
        }
        Some(s)
    };
    let webhook = |name: &str,
                   kinds: &[WorkloadKind],
                   failure: &str,
                   namespace_selector: LabelSelector,
                   object_selector: Option<LabelSelector>| ValidatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: client_config.clone(),
        failure_policy: Some(failure.into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: not_exempt(namespace_selector),
        object_selector,
        rules: Some(rules(kinds)),
        // Decisions are recorded in keyd's audit log, except for dry runs.
        side_effects: "NoneOnDryRun".into(),
        timeout_seconds: Some(5),
        match_conditions: None,
    };
    let workload_kinds: Vec<WorkloadKind> = WorkloadKind::ALL
        .into_iter()
        .filter(|k| *k != WorkloadKind::Pod)
        .collect();
    let mut webhooks = Vec::new();
    if let Some(rule) = &config.sensitive_pod_label {
        webhooks.push(webhook(
            "sensitive-pods.keyd.io",
            &[WorkloadKind::Pod],
            "Fail",
            LabelSelector::default(),
            Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(rule.key.clone(), rule.value.clone())])),
                match_expressions: None,
            }),
        ));
    }
    if let Some(rule) = &config.sensitive_namespace_label {
        // Pods already sent by the entry above are left out, so none is reviewed twice.
        let object_selector = config.sensitive_pod_label.as_ref().map(|p| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: p.key.clone(),
                operator: "NotIn".into(),
                values: Some(vec![p.value.clone()]),
            }]),
        });
        webhooks.push(webhook(
            "sensitive-namespaces.keyd.io",
            &[WorkloadKind::Pod],
            "Fail",
            LabelSelector {
                match_labels: Some(BTreeMap::from([(rule.key.clone(), rule.value.clone())])),
                match_expressions: None,
            },
            object_selector,
        ));
    }
    webhooks.push(webhook(
        "workloads.keyd.io",
        &workload_kinds,
        "Ignore",
        LabelSelector::default(),
        None,
    ));
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(webhooks),
    }
}

fn rules(kinds: &[WorkloadKind]) -> Vec<RuleWithOperations> {
    // One rule per (group, versions) so each lists only its own resources.
    let mut by_group: BTreeMap<(&str, Vec<&str>), Vec<String>> = BTreeMap::new();
    for k in kinds {
        let (group, versions, resource) = k.registration();
        by_group
            .entry((group, versions.to_vec()))
            .or_default()
            .push(resource.to_owned());
    }
    by_group
        .into_iter()
        .map(|((group, versions), resources)| RuleWithOperations {
            api_groups: Some(vec![group.to_owned()]),
            api_versions: Some(versions.into_iter().map(str::to_owned).collect()),
            operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
            resources: Some(resources),
            scope: Some("Namespaced".into()),
        })
        .collect()
}

/// YAML for one object, with a header saying where it comes from.
pub fn to_yaml<T: serde::Serialize>(header: &str, obj: &T) -> Result<String, serde_norway::Error> {
    Ok(format!("{header}{}", serde_norway::to_string(obj)?))
}

/// The header of every generated file.
pub const GENERATED: &str =
    "# Generated by `cargo run -p keyd-webhook --bin crdgen`; do not edit (a test checks it).\n";

/// The decision settings of `deploy/webhook/config.yaml` (a test checks they agree).
pub fn deploy_decision_config() -> DecisionConfig {
    DecisionConfig {
        exempt_namespaces: ["kube-system".to_owned(), "keyd".to_owned()].into(),
        ..DecisionConfig::default()
    }
}

/// Every generated file under `deploy/`: (path relative to the repository root, contents).
pub fn generated_files() -> Result<Vec<(String, String)>, serde_norway::Error> {
    let mut files = Vec::new();
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        files.push((
            format!("deploy/crds/{name}.yaml"),
            to_yaml(GENERATED, &crd)?,
        ));
    }
    // keyd's [cluster_pki] keeps caBundle (deploy/keyd/config.yaml); the cert-manager
    // component adds its CA injector's annotation instead.
    let config = webhook_configuration(
        &deploy_decision_config(),
        &Endpoint::Service {
            namespace: "keyd".into(),
            name: "keyd-webhook".into(),
            port: 443,
        },
        None,
        WEBHOOK_CONFIGURATION_NAME,
    );
    files.push((
        "deploy/webhook/validatingwebhookconfiguration.yaml".into(),
        to_yaml(GENERATED, &config)?,
    ));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed YAML under deploy/ is what the types generate. Run
    /// `cargo run -p keyd-webhook --bin crdgen` after changing them.
    #[test]
    fn committed_manifests_match_the_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (path, want) in generated_files().unwrap() {
            let have = std::fs::read_to_string(root.join(&path)).unwrap_or_default();
            assert!(
                have == want,
                "{path} is not what the Rust types generate: run `cargo run -p keyd-webhook --bin crdgen`"
            );
        }
    }

    /// The deployed ConfigMap parses, and its sensitivity settings are the ones the committed
    /// ValidatingWebhookConfiguration was generated from.
    #[test]
    fn the_deployed_config_matches_the_generated_webhook_configuration() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("deploy/webhook/config.yaml")).unwrap();
        let cm: serde_json::Value = serde_norway::from_str(&text).unwrap();
        let toml = cm["data"]["webhook.toml"].as_str().unwrap();
        let config = crate::config::Config::parse(toml, &crate::config::Flags::default()).unwrap();
        assert_eq!(config.decision, deploy_decision_config());
    }

    #[test]
    fn crds_are_structural_v1_with_status() {
        for crd in crds() {
            let v = &crd.spec.versions[0];
            assert_eq!(crd.spec.group, "keyd.io");
            assert_eq!(v.name, "v1alpha1");
            assert!(v.served && v.storage);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
            let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
            assert_eq!(
                spec["properties"]["mode"]["enum"],
                serde_json::json!(["wireguard", "ipsec"])
            );
            let op = &spec["properties"]["podSelector"]["properties"]["matchExpressions"]["items"]
                ["properties"]["operator"];
            assert_eq!(
                op["enum"],
                serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"])
            );
            assert!(
                spec["required"]
                    .as_array()
                    .unwrap()
                    .contains(&"podSelector".into())
            );
        }
        assert_eq!(crds()[0].spec.scope, "Namespaced");
        assert_eq!(crds()[1].spec.scope, "Cluster");
    }

    #[test]
    fn the_webhook_configuration_follows_the_sensitivity_settings() {
        let cfg = DecisionConfig::default();
        let c = webhook_configuration(
            &cfg,
            &Endpoint::Url("https://127.0.0.1:1".into()),
            Some(b"pem"),
            "x",
        );
        let hooks = c.webhooks.unwrap();
        let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "sensitive-pods.keyd.io",
                "sensitive-namespaces.keyd.io",
                "workloads.keyd.io"
            ]
        );
        assert_eq!(
            hooks[0].client_config.url.as_deref(),
            Some("https://127.0.0.1:1/validate")
        );
        assert_eq!(hooks[0].failure_policy.as_deref(), Some("Fail"));
        assert_eq!(hooks[2].failure_policy.as_deref(), Some("Ignore"));
        let ns_sel = hooks[0].namespace_selector.as_ref().unwrap();
        assert_eq!(
            ns_sel.match_expressions.as_ref().unwrap()[0]
                .values
                .as_ref()
                .unwrap(),
            &["kube-system"]
        );
        let workload_rules = hooks[2].rules.as_ref().unwrap();
        let resources: Vec<String> = workload_rules
            .iter()
            .flat_map(|r| r.resources.clone().unwrap())
            .collect();
        for r in [
            "deployments",
            "statefulsets",
            "daemonsets",
            "replicasets",
            "jobs",
            "cronjobs",
        ] {
            assert!(resources.contains(&r.to_owned()), "{r} in {resources:?}");
        }
        assert!(workload_rules.iter().any(|r| {
            r.api_versions
                .as_ref()
                .unwrap()
                .contains(&"v1beta1".to_owned())
        }));

        // Pod-only sensitivity: no namespace entry.
        let pod_only = DecisionConfig {
            sensitive_namespace_label: None,
            ..DecisionConfig::default()
        };
        let c = webhook_configuration(&pod_only, &Endpoint::Url("https://h".into()), None, "x");
        assert_eq!(c.webhooks.unwrap().len(), 2);
    }
}
