//! The objects the webhook checks, reduced to what the decision needs: the object's identity and
//! the labels and annotations of the pods it is or will create.
//!
//! Only the fields used are deserialized (`metadata` and the path to the pod template); the rest
//! of a possibly large object is skipped by the parser without being stored.

use std::fmt;

use serde::Deserialize;

use crate::crd::Labels;

/// A kind whose pods the webhook checks: Pods themselves, and the workloads with pod templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 7] = [
        WorkloadKind::Pod,
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::ReplicaSet,
        WorkloadKind::Job,
        WorkloadKind::CronJob,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "Pod",
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
        }
    }

    /// The API group, version(s) and plural resource name the webhook registers for. CronJob is
    /// `batch/v1beta1` up to Kubernetes 1.20 and `batch/v1` from 1.21, so both are listed.
    pub fn registration(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            WorkloadKind::Pod => ("", &["v1"], "pods"),
            WorkloadKind::Deployment => ("apps", &["v1"], "deployments"),
            WorkloadKind::StatefulSet => ("apps", &["v1"], "statefulsets"),
            WorkloadKind::DaemonSet => ("apps", &["v1"], "daemonsets"),
            WorkloadKind::ReplicaSet => ("apps", &["v1"], "replicasets"),
            WorkloadKind::Job => ("batch", &["v1"], "jobs"),
            WorkloadKind::CronJob => ("batch", &["v1", "v1beta1"], "cronjobs"),
        }
    }

    /// Which kind an AdmissionReview's `request.kind` is.
    pub fn from_gvk(group: &str, version: &str, kind: &str) -> KindMatch {
        let Some(k) = Self::ALL.into_iter().find(|k| k.as_str() == kind) else {
            return KindMatch::NotChecked;
        };
        let (g, versions, _) = k.registration();
        // Older API versions of the same kinds have the same pod-template path; accepting them
        // keeps a cluster that still serves them covered.
        let legacy: &[(&str, &str)] = match k {
            WorkloadKind::Deployment | WorkloadKind::DaemonSet | WorkloadKind::ReplicaSet => &[
                ("apps", "v1beta1"),
                ("apps", "v1beta2"),
                ("extensions", "v1beta1"),
            ],
            WorkloadKind::StatefulSet => &[("apps", "v1beta1"), ("apps", "v1beta2")],
            WorkloadKind::CronJob => &[("batch", "v2alpha1")],
            WorkloadKind::Pod | WorkloadKind::Job => &[],
        };
        if (group == g && versions.contains(&version)) || legacy.contains(&(group, version)) {
            KindMatch::Checked(k)
        } else {
            KindMatch::UnknownVersion(k)
        }
    }

    /// Lower-case, as in `kubectl get deployment`.
    pub fn resource_singular(self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`WorkloadKind::from_gvk`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindMatch {
    Checked(WorkloadKind),
    /// Not a kind the webhook checks.
    NotChecked,
    /// A kind it checks, in a group/version it does not know. The webhook registers with
    /// `matchPolicy: Equivalent`, so the API server converts requests to a registered version
    /// and this does not happen with the generated configuration.
    UnknownVersion(WorkloadKind),
}

/// A Pod or workload, reduced to the decision's inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// `metadata.name`; empty when the API server will generate it.
    pub name: String,
    /// `metadata.generateName`.
    pub generate_name: String,
    /// The object's own labels and annotations.
    pub labels: Labels,
    pub annotations: Labels,
    /// The pod template's (for a Pod: the pod's own, and these are `None`).
    template_labels: Option<Labels>,
    template_annotations: Option<Labels>,
}

impl Workload {
    /// A Pod with these labels and annotations (tests and benchmarks).
    pub fn pod(name: &str, labels: Labels, annotations: Labels) -> Self {
        Self {
            kind: WorkloadKind::Pod,
            name: name.to_owned(),
            generate_name: String::new(),
            labels,
            annotations,
            template_labels: None,
            template_annotations: None,
        }
    }

    /// A workload whose pod template has these labels and annotations (tests and benchmarks).
    pub fn with_template(
        kind: WorkloadKind,
        name: &str,
        template_labels: Labels,
        template_annotations: Labels,
    ) -> Self {
        Self {
            kind,
            name: name.to_owned(),
            generate_name: String::new(),
            labels: Labels::new(),
            annotations: Labels::new(),
            template_labels: Some(template_labels),
            template_annotations: Some(template_annotations),
        }
    }

    /// Reads the object of `kind` from its JSON.
    pub fn from_json(kind: WorkloadKind, json: &str) -> Result<Self, serde_json::Error> {
        let (meta, template) = match kind {
            WorkloadKind::Pod => (serde_json::from_str::<Bare>(json)?.metadata, None),
            WorkloadKind::CronJob => {
                let o: CronJobObject = serde_json::from_str(json)?;
                let t = o
                    .spec
                    .and_then(|s| s.job_template)
                    .and_then(|j| j.spec)
                    .and_then(|s| s.template)
                    .and_then(|t| t.metadata)
                    .unwrap_or_default();
                (o.metadata, Some(t))
            }
            _ => {
                let o: TemplatedObject = serde_json::from_str(json)?;
                let t = o
                    .spec
                    .and_then(|s| s.template)
                    .and_then(|t| t.metadata)
                    .unwrap_or_default();
                (o.metadata, Some(t))
            }
        };
        let meta = meta.unwrap_or_default();
        Ok(Self {
            kind,
            name: meta.name.unwrap_or_default(),
            generate_name: meta.generate_name.unwrap_or_default(),
            labels: meta.labels.unwrap_or_default(),
            annotations: meta.annotations.unwrap_or_default(),
            template_labels: template
                .as_ref()
                .map(|t| t.labels.clone().unwrap_or_default()),
            template_annotations: template.map(|t| t.annotations.unwrap_or_default()),
        })
    }

    /// Labels of the pods this object is or creates.
    pub fn pod_labels(&self) -> &Labels {
        self.template_labels.as_ref().unwrap_or(&self.labels)
    }

    /// Annotations of the pods this object is or creates.
    pub fn pod_annotations(&self) -> &Labels {
        self.template_annotations
            .as_ref()
            .unwrap_or(&self.annotations)
    }

    /// Whether this is a Pod (rather than a workload with a template).
    pub fn is_pod(&self) -> bool {
        self.template_labels.is_none()
    }

    /// The name to show: `web`, or `web-` + `<generated>` before the API server names it.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            self.name.clone()
        } else if !self.generate_name.is_empty() {
            format!("{}<generated>", self.generate_name)
        } else {
            "<unnamed>".to_owned()
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    generate_name: Option<String>,
    labels: Option<Labels>,
    annotations: Option<Labels>,
}

#[derive(Debug, Deserialize)]
struct Bare {
    metadata: Option<Meta>,
}

#[derive(Debug, Deserialize)]
struct TemplatedObject {
    metadata: Option<Meta>,
    spec: Option<TemplatedSpec>,
}

#[derive(Debug, Deserialize)]
struct TemplatedSpec {
    template: Option<Bare>,
}

#[derive(Debug, Deserialize)]
struct CronJobObject {
    metadata: Option<Meta>,
    spec: Option<CronJobSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CronJobSpec {
    job_template: Option<JobTemplate>,
}

#[derive(Debug, Deserialize)]
struct JobTemplate {
    spec: Option<TemplatedSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_versions() {
        assert_eq!(
            WorkloadKind::from_gvk("", "v1", "Pod"),
            KindMatch::Checked(WorkloadKind::Pod)
        );
        assert_eq!(
            WorkloadKind::from_gvk("apps", "v1", "Deployment"),
            KindMatch::Checked(WorkloadKind::Deployment)
        );
        assert_eq!(
            WorkloadKind::from_gvk("batch", "v1beta1", "CronJob"),
            KindMatch::Checked(WorkloadKind::CronJob)
        );
        assert_eq!(
            WorkloadKind::from_gvk("extensions", "v1beta1", "ReplicaSet"),
            KindMatch::Checked(WorkloadKind::ReplicaSet)
        );
        assert_eq!(
            WorkloadKind::from_gvk("", "v1", "ConfigMap"),
            KindMatch::NotChecked
        );
        assert_eq!(
            WorkloadKind::from_gvk("apps", "v9", "Deployment"),
            KindMatch::UnknownVersion(WorkloadKind::Deployment)
        );
        assert_eq!(
            WorkloadKind::from_gvk("example.com", "v1", "Pod"),
            KindMatch::UnknownVersion(WorkloadKind::Pod)
        );
    }

    #[test]
    fn pod_labels_come_from_the_template() {
        let deployment = r#"{"apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","labels":{"owner":"x"},"annotations":{"a":"b"}},
            "spec":{"replicas":3,"selector":{"matchLabels":{"app":"web"}},
              "template":{"metadata":{"labels":{"app":"web","keyd.io/sensitive":"true"},
                "annotations":{"keyd.io/break-glass":"incident 42"}},
                "spec":{"containers":[{"name":"c","image":"nginx"}]}}}}"#;
        let w = Workload::from_json(WorkloadKind::Deployment, deployment).unwrap();
        assert_eq!(w.name, "web");
        assert!(!w.is_pod());
        assert_eq!(w.labels.get("owner").map(String::as_str), Some("x"));
        assert_eq!(
            w.pod_labels().get("keyd.io/sensitive").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            w.pod_annotations()
                .get("keyd.io/break-glass")
                .map(String::as_str),
            Some("incident 42")
        );

        let cron = r#"{"metadata":{"name":"nightly"},"spec":{"schedule":"@daily",
            "jobTemplate":{"spec":{"template":{"metadata":{"labels":{"app":"batch"}},
            "spec":{"containers":[]}}}}}}"#;
        let w = Workload::from_json(WorkloadKind::CronJob, cron).unwrap();
        assert_eq!(w.pod_labels().get("app").map(String::as_str), Some("batch"));

        let pod =
            r#"{"metadata":{"generateName":"web-","labels":{"app":"web"},"annotations":null}}"#;
        let w = Workload::from_json(WorkloadKind::Pod, pod).unwrap();
        assert!(w.is_pod());
        assert_eq!(w.display_name(), "web-<generated>");
        assert_eq!(w.pod_labels(), &w.labels);
        assert!(w.pod_annotations().is_empty());
    }

    #[test]
    fn missing_parts_are_empty_and_wrong_types_are_errors() {
        let w = Workload::from_json(WorkloadKind::Job, "{}").unwrap();
        assert!(w.pod_labels().is_empty());
        assert_eq!(w.display_name(), "<unnamed>");
        let w = Workload::from_json(WorkloadKind::Job, r#"{"spec":{"template":null}}"#).unwrap();
        assert!(w.pod_labels().is_empty() && !w.is_pod());

        assert!(Workload::from_json(WorkloadKind::Pod, r#"{"metadata":{"labels":[1]}}"#).is_err());
        assert!(
            Workload::from_json(WorkloadKind::Pod, r#"{"metadata":{"labels":{"a":1}}}"#).is_err()
        );
        assert!(Workload::from_json(WorkloadKind::Pod, "[]").is_err());
        assert!(Workload::from_json(WorkloadKind::Pod, "not json").is_err());
    }
}
