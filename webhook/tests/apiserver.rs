//! The webhook behind a real kube-apiserver (1.20, built from Debian's source package) and etcd
//! on loopback, talking to a real keyd over mTLS. Every case is a real `create` through the API
//! server, which calls the webhook through the generated ValidatingWebhookConfiguration.
//!
//! One environment is shared by the tests of this file (starting an API server takes seconds):
//! each test works in its own namespace. Two webhook instances run: the main one, and a second
//! one serving only namespaces labelled `keyd-test/webhook=second`, which the failure-policy test
//! stops.
//!
//! Needs kube-apiserver and etcd (scripts/kube-apiserver.sh installs both). Without them the
//! tests print why and pass, except in CI (CI=true), where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::{Keyd, SENSITIVE, ServingCert, webhook_toml};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use keyd_tests::cluster::Cluster;
use keyd_webhook::config::{Config, Flags};
use keyd_webhook::crd::{ClusterEncryptionPolicy, EncryptionPolicy};
use keyd_webhook::manifests::{Endpoint, webhook_configuration};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const SECOND: &str = "keyd-test/webhook";

struct Webhook {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

struct Env {
    cluster: Cluster,
    keyd: Keyd,
    _main: Webhook,
    second: Mutex<Option<Webhook>>,
    /// Keeps the harness runtime (keyd and the webhooks run on it) alive for the whole process.
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

static ENV: OnceLock<Option<Env>> = OnceLock::new();

/// The shared environment, started on first use; `None` when a prerequisite is missing locally.
fn env() -> Option<&'static Env> {
    ENV.get_or_init(|| {
        if let Err(reason) = keyd_tests::cluster::binaries() {
            common::skip(&reason);
            return None;
        }
        // Started from a plain thread: a test's own runtime cannot block on another one.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (cluster, keyd, main, second) = runtime.block_on(start(dir.path()));
            Some(Env {
                cluster,
                keyd,
                _main: main,
                second: Mutex::new(Some(second)),
                _runtime: runtime,
                _dir: dir,
            })
        })
        .join()
        .unwrap()
    })
    .as_ref()
}

async fn start(dir: &std::path::Path) -> (Cluster, Keyd, Webhook, Webhook) {
    let mut cluster = Cluster::start(dir).await;
    cluster.start_controller_manager();
    let client = cluster.client().await;
    cluster.install_crds(&client).await;

    let keyd = Keyd::start(&dir.join("keyd")).await;
    // IPsec ready (a current key); WireGuard not (no node has registered a public key).
    keyd.rotate_ipsec().await;

    let main = start_webhook(
        &cluster,
        &keyd,
        dir,
        "main",
        json!({"key": SECOND, "operator": "NotIn", "values": ["second"]}),
    )
    .await;
    let second = start_webhook(
        &cluster,
        &keyd,
        dir,
        "second",
        json!({"key": SECOND, "operator": "In", "values": ["second"]}),
    )
    .await;

    // Wait until the API server calls both webhooks: a dry-run sensitive pod is refused.
    for (ns, labels) in [
        ("probe-main", json!({})),
        ("probe-second", json!({ SECOND: "second" })),
    ] {
        create_namespace(&client, ns, labels).await;
        let pods = Api::<Pod>::namespaced(client.clone(), ns);
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let pod = pod("probe", &[SENSITIVE], &[]);
        let mut ok = false;
        for _ in 0..100 {
            match pods.create(&dry, &pod).await {
                Err(kube::Error::Api(s)) if s.message.contains("keyd: Pod") => {
                    ok = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(
            ok,
            "the API server never called the webhook for {ns}:\n{}",
            cluster.apiserver_log()
        );
    }
    (cluster, keyd, main, second)
}

/// Starts a webhook and registers it with `selector` added to every entry's namespace selector.
async fn start_webhook(
    cluster: &Cluster,
    keyd: &Keyd,
    dir: &std::path::Path,
    name: &str,
    selector: Value,
) -> Webhook {
    let serving = ServingCert::create(dir, &format!("webhook-{name}"));
    let config = Config::parse(
        &webhook_toml(&serving, &keyd.setup, &keyd.url(), ""),
        &Flags::default(),
    )
    .unwrap();
    let decision = config.decision.clone();
    let client = cluster.client().await;
    let (stop, rx) = watch::channel(false);
    let running = keyd_webhook::app::start(config, client.clone(), rx)
        .await
        .unwrap();
    let addr = running.addr;
    tokio::time::timeout(Duration::from_secs(30), running.cache.wait_ready())
        .await
        .expect("webhook caches never synced");
    let task = tokio::spawn(running.serve());
    let https = common::Https::new(addr, &serving.ca_pem);
    assert_eq!(
        https.request("GET", "/readyz", vec![]).await.0,
        200,
        "ready once the caches synced"
    );

    let mut vwc = webhook_configuration(
        &decision,
        &Endpoint::Url(format!("https://127.0.0.1:{}", addr.port())),
        Some(std::fs::read(&serving.ca_pem).unwrap().as_slice()),
        &format!("keyd-webhook-{name}"),
    );
    let req: LabelSelectorRequirement = serde_json::from_value(selector).unwrap();
    for w in vwc.webhooks.as_mut().unwrap() {
        w.namespace_selector
            .get_or_insert_with(Default::default)
            .match_expressions
            .get_or_insert_with(Vec::new)
            .push(req.clone());
    }
    Api::<ValidatingWebhookConfiguration>::all(client)
        .create(&PostParams::default(), &vwc)
        .await
        .unwrap();
    Webhook {
        stop,
        task: Some(task),
    }
}

/// Runs `f` on a fresh runtime (each test has its own; the environment lives on another).
fn run<F: Future<Output = ()>>(f: impl FnOnce(&'static Env) -> F) {
    let Some(env) = env() else { return };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f(env));
}

async fn create_namespace(client: &kube::Client, name: &str, labels: Value) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(common::pod_json(name, labels, annotations)).unwrap()
}

/// The API server's refusal message, or a panic if the create succeeded or failed otherwise.
fn refusal<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> String {
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            s.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// POSTs `body` to `path` and returns (HTTP status, admission warnings, body): kube's typed API
/// does not surface `Warning` headers.
async fn post_raw(client: &kube::Client, path: &str, body: &Value) -> (u16, Vec<String>, Value) {
    use http_body_util::BodyExt as _;
    let req = http::Request::post(path)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let status = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        warnings,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn policy(ns: &str, name: &str, mode: &str, match_labels: Value) -> EncryptionPolicy {
    serde_json::from_value(json!({
        "apiVersion": "keyd.io/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mode": mode, "podSelector": {"matchLabels": match_labels}}
    }))
    .unwrap()
}

/// A workload of `kind` (group, version, kind, plural) with a pod template carrying `labels`.
fn workload(
    (group, version, kind, _): (&str, &str, &str, &str),
    name: &str,
    labels: Value,
) -> DynamicObject {
    let template = json!({
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}], "restartPolicy": if matches!(kind, "Job" | "CronJob") { "Never" } else { "Always" }}
    });
    let selector = json!({"matchLabels": labels});
    let spec = match kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" => {
            json!({"selector": selector, "template": template})
        }
        "StatefulSet" => json!({"selector": selector, "serviceName": name, "template": template}),
        "Job" => json!({"template": template}),
        "CronJob" => json!({"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}),
        other => panic!("{other}"),
    };
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    serde_json::from_value(json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

fn workload_api(
    client: &kube::Client,
    ns: &str,
    (group, version, kind, plural): (&str, &str, &str, &str),
) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Every workload kind the webhook checks, as the 1.20 API server serves them (CronJob is
/// batch/v1beta1 there).
const WORKLOADS: [(&str, &str, &str, &str); 6] = [
    ("apps", "v1", "Deployment", "deployments"),
    ("apps", "v1", "StatefulSet", "statefulsets"),
    ("apps", "v1", "DaemonSet", "daemonsets"),
    ("apps", "v1", "ReplicaSet", "replicasets"),
    ("batch", "v1", "Job", "jobs"),
    ("batch", "v1beta1", "CronJob", "cronjobs"),
];

#[test]
fn apiserver_sensitive_pod_without_policy_is_refused_with_a_fix_that_works() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-deny", json!({})).await;
        let pods = Api::<Pod>::namespaced(client.clone(), "t-deny");
        let p = pod(
            "payments-0",
            &[
                SENSITIVE,
                ("app", "payments"),
                ("pod-template-hash", "7f9c"),
            ],
            &[],
        );
        let msg = refusal(pods.create(&PostParams::default(), &p).await);
        assert!(
            msg.starts_with("admission webhook \"sensitive-pods.keyd.io\" denied the request: keyd: Pod t-deny/payments-0 is refused: sensitive (pod label keyd.io/sensitive=true) but no EncryptionPolicy or ClusterEncryptionPolicy selects it."),
            "{msg}"
        );
        assert!(msg.contains("kubectl apply -f - <<'EOF'"), "{msg}");
        assert!(msg.contains("keyd.io/break-glass"), "{msg}");

        // The denial reached keyd's audit log with the requesting user.
        let (action, d) = env
            .keyd
            .wait_record(|a, d| a == "admission.denied" && d["namespace"] == "t-deny")
            .await;
        assert_eq!(action, "admission.denied");
        assert_eq!(d["name"], "payments-0");
        assert_eq!(d["user"], "admin");
        assert_eq!(d["kind"], "Pod");
        assert_eq!(d["enforcement"], "enforce");

        // Apply the YAML from the message as it is: then the same pod is admitted.
        let yaml: String = msg
            .lines()
            .skip_while(|l| !l.contains("apiVersion: keyd.io/v1alpha1"))
            .take_while(|l| l.trim() != "EOF")
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        let suggested: EncryptionPolicy = serde_norway::from_str(&yaml).expect(&yaml);
        assert_eq!(
            suggested.spec.mode,
            keyd_webhook::crd::Mode::Ipsec,
            "keyd has only IPsec ready"
        );
        Api::<EncryptionPolicy>::namespaced(client.clone(), "t-deny")
            .create(&PostParams::default(), &suggested)
            .await
            .unwrap();
        // The webhook's cache follows the watch within moments.
        let mut admitted = None;
        for _ in 0..50 {
            match pods.create(&PostParams::default(), &p).await {
                Ok(created) => {
                    admitted = Some(created);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(
            admitted.is_some(),
            "the pod is still refused under the suggested policy"
        );
    });
}

#[test]
fn apiserver_policy_mode_must_be_ready_in_keyd_and_status_counts_covered_pods() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-mode", json!({})).await;
        let policies = Api::<EncryptionPolicy>::namespaced(client.clone(), "t-mode");
        policies
            .create(
                &PostParams::default(),
                &policy("t-mode", "db", "wireguard", json!({"app": "db"})),
            )
            .await
            .unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), "t-mode");
        let p = pod("db-0", &[SENSITIVE, ("app", "db")], &[]);
        // Until the webhook's watch delivers the policy the refusal says "no policy"; then it
        // names the policy and keyd's reason.
        let mut msg = String::new();
        for _ in 0..50 {
            msg = refusal(pods.create(&PostParams::default(), &p).await);
            if msg.contains("EncryptionPolicy t-mode/db") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            msg.contains("EncryptionPolicy t-mode/db requires wireguard (not active: no node has registered a WireGuard public key)"),
            "{msg}"
        );
        // The message offers the mode keyd has ready; run exactly that patch.
        assert!(msg.contains(r#"kubectl -n t-mode patch encryptionpolicy db --type merge -p '{"spec":{"mode":"ipsec"}}'"#), "{msg}");
        policies
            .patch(
                "db",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"mode": "ipsec"}})),
            )
            .await
            .unwrap();
        let mut created = false;
        for _ in 0..50 {
            if pods.create(&PostParams::default(), &p).await.is_ok() {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(created, "still refused after switching the policy to ipsec");

        // The status loop reports the pod the policy covers, for the generation it saw.
        let mut last = None;
        for _ in 0..100 {
            let p = policies.get("db").await.unwrap();
            if let Some(s) = &p.status
                && s.covered_pods == 1
                && s.observed_generation == p.metadata.generation
            {
                return;
            }
            last = p.status;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("status never showed the covered pod: {last:?}");
    });
}

#[test]
fn apiserver_workloads_with_a_sensitive_template_are_refused_at_apply() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-workloads", json!({})).await;
        for kind in WORKLOADS {
            let api = workload_api(&client, "t-workloads", kind);
            let sensitive = workload(
                kind,
                "web",
                json!({"keyd.io/sensitive": "true", "app": "web"}),
            );
            let msg = refusal(api.create(&PostParams::default(), &sensitive).await);
            assert!(
                msg.starts_with(&format!(
                    "admission webhook \"workloads.keyd.io\" denied the request: keyd: {} t-workloads/web is refused: sensitive (pod label keyd.io/sensitive=true) but no EncryptionPolicy or ClusterEncryptionPolicy selects its pods.",
                    kind.2
                )),
                "{msg}"
            );
            assert!(msg.contains("on the pod template"), "{msg}");
            // The same kind without the sensitive label is untouched.
            let plain = workload(kind, "plain", json!({"app": "plain"}));
            api.create(&PostParams::default(), &plain).await.unwrap();
        }
        // Under a policy, the sensitive Deployment is admitted.
        Api::<EncryptionPolicy>::namespaced(client.clone(), "t-workloads")
            .create(
                &PostParams::default(),
                &policy("t-workloads", "web", "ipsec", json!({"app": "web"})),
            )
            .await
            .unwrap();
        let api = workload_api(&client, "t-workloads", WORKLOADS[0]);
        let sensitive = workload(
            WORKLOADS[0],
            "web",
            json!({"keyd.io/sensitive": "true", "app": "web"}),
        );
        let mut ok = false;
        for _ in 0..50 {
            if api.create(&PostParams::default(), &sensitive).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            ok,
            "the sensitive Deployment is still refused under a policy"
        );
    });
}

#[test]
fn apiserver_warn_mode_admits_with_a_warning_and_audit_mode_records() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-warn", json!({"keyd.io/enforcement": "warn"})).await;
        let (status, warnings, _) = post_raw(
            &client,
            "/api/v1/namespaces/t-warn/pods",
            &common::pod_json("w-0", &[SENSITIVE], &[]),
        )
        .await;
        assert_eq!(status, 201, "{warnings:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("299 - \"keyd: Pod t-warn/w-0 would be refused: sensitive (pod label keyd.io/sensitive=true) but no EncryptionPolicy"),
            "{warnings:?}"
        );
        let (_, d) = env
            .keyd
            .wait_record(|a, d| a == "admission.warned" && d["namespace"] == "t-warn")
            .await;
        assert_eq!(
            (d["name"].as_str(), d["enforcement"].as_str()),
            (Some("w-0"), Some("warn"))
        );

        create_namespace(&client, "t-audit", json!({"keyd.io/enforcement": "audit"})).await;
        let (status, warnings, _) = post_raw(
            &client,
            "/api/v1/namespaces/t-audit/pods",
            &common::pod_json("a-0", &[SENSITIVE], &[]),
        )
        .await;
        assert_eq!((status, warnings.len()), (201, 0), "{warnings:?}");
        let (_, d) = env
            .keyd
            .wait_record(|a, d| a == "admission.audited" && d["namespace"] == "t-audit")
            .await;
        assert_eq!(d["name"], "a-0");
    });
}

#[test]
fn apiserver_break_glass_admits_and_records_who_used_it() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-glass", json!({})).await;
        let (status, warnings, _) = post_raw(
            &client,
            "/api/v1/namespaces/t-glass/pods",
            &common::pod_json(
                "g-0",
                &[SENSITIVE],
                &[("keyd.io/break-glass", "INC-42 payments down")],
            ),
        )
        .await;
        assert_eq!(status, 201);
        assert!(
            warnings.iter().any(|w| w.contains(
                "break-glass annotation keyd.io/break-glass used on Pod t-glass/g-0 by admin"
            )),
            "{warnings:?}"
        );
        let (_, d) = env
            .keyd
            .wait_record(|a, d| a == "admission.break_glass" && d["namespace"] == "t-glass")
            .await;
        assert_eq!(d["user"], "admin");
        assert_eq!(d["name"], "g-0");
        let reason = d["reason"].as_str().unwrap();
        assert!(
            reason.starts_with(
                "break-glass by admin: \"INC-42 payments down\"; it would otherwise be refused"
            ),
            "{reason}"
        );
    });
}

#[test]
fn apiserver_non_sensitive_pods_are_never_affected() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(
            &client,
            "t-plain",
            json!({"keyd.io/enforcement": "enforce"}),
        )
        .await;
        for (name, labels) in [
            ("web-0", vec![("app", "web")]),
            ("off-0", vec![("keyd.io/sensitive", "false")]),
            ("bare-0", vec![]),
        ] {
            let (status, warnings, body) = post_raw(
                &client,
                "/api/v1/namespaces/t-plain/pods",
                &common::pod_json(name, &labels, &[]),
            )
            .await;
            assert_eq!(
                (status, warnings.len()),
                (201, 0),
                "{name}: {warnings:?} {body}"
            );
        }
        // A plain Deployment too (the workloads entry sees it and allows it silently).
        let (status, warnings, _) = post_raw(
            &client,
            "/apis/apps/v1/namespaces/t-plain/deployments",
            &serde_json::to_value(workload(WORKLOADS[0], "web", json!({"app": "web"}))).unwrap(),
        )
        .await;
        assert_eq!((status, warnings.len()), (201, 0));
        assert!(
            !env.keyd
                .admission_records()
                .iter()
                .any(|(_, d)| d["namespace"] == "t-plain"),
            "nothing about non-sensitive pods is recorded"
        );
    });
}

#[test]
fn apiserver_namespace_label_and_cluster_policy() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(
            &client,
            "t-pci",
            json!({"keyd.io/sensitive": "true", "compliance": "pci-test"}),
        )
        .await;
        let pods = Api::<Pod>::namespaced(client.clone(), "t-pci");
        let p = pod("plain-0", &[("app", "ledger")], &[]);
        let msg = refusal(pods.create(&PostParams::default(), &p).await);
        assert!(
            msg.starts_with("admission webhook \"sensitive-namespaces.keyd.io\" denied the request: keyd: Pod t-pci/plain-0 is refused: sensitive (namespace t-pci has label keyd.io/sensitive=true)"),
            "{msg}"
        );
        let cp: ClusterEncryptionPolicy = serde_json::from_value(json!({
            "apiVersion": "keyd.io/v1alpha1", "kind": "ClusterEncryptionPolicy",
            "metadata": {"name": "pci-test"},
            "spec": {"mode": "ipsec",
                     "namespaceSelector": {"matchExpressions": [{"key": "compliance", "operator": "In", "values": ["pci-test"]}]},
                     "podSelector": {}}
        }))
        .unwrap();
        Api::<ClusterEncryptionPolicy>::all(client.clone())
            .create(&PostParams::default(), &cp)
            .await
            .unwrap();
        let mut ok = false;
        for _ in 0..50 {
            if pods.create(&PostParams::default(), &p).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "still refused under the ClusterEncryptionPolicy");
    });
}

#[test]
fn apiserver_failure_policy_holds_after_the_webhook_stops() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-failure", json!({ SECOND: "second" })).await;
        Api::<EncryptionPolicy>::namespaced(client.clone(), "t-failure")
            .create(
                &PostParams::default(),
                &policy("t-failure", "all", "ipsec", json!({})),
            )
            .await
            .unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), "t-failure");
        let mut before = false;
        for _ in 0..50 {
            if pods
                .create(&PostParams::default(), &pod("before", &[SENSITIVE], &[]))
                .await
                .is_ok()
            {
                before = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            before,
            "a covered sensitive pod is admitted while the webhook runs"
        );

        // Stop the webhook serving this namespace.
        let mut second = env.second.lock().unwrap().take().expect("stopped once");
        second.stop.send(true).unwrap();
        second.task.take().unwrap().await.unwrap();

        // failurePolicy Fail: a sensitive pod cannot be created, even one a policy covers.
        match pods
            .create(&PostParams::default(), &pod("after", &[SENSITIVE], &[]))
            .await
        {
            Err(kube::Error::Api(s)) => {
                assert!(
                    s.message
                        .contains("failed calling webhook \"sensitive-pods.keyd.io\""),
                    "{s:?}"
                );
            }
            other => panic!("a sensitive pod was admitted without the webhook: {other:?}"),
        }
        // Nothing else is affected: plain pods are never sent to the webhook...
        pods.create(&PostParams::default(), &pod("plain", &[("app", "x")], &[]))
            .await
            .unwrap();
        // ...and workloads fail open (failurePolicy Ignore): their pods are the enforcement point.
        workload_api(&client, "t-failure", WORKLOADS[0])
            .create(
                &PostParams::default(),
                &workload(WORKLOADS[0], "web", json!({"keyd.io/sensitive": "true"})),
            )
            .await
            .unwrap();
    });
}

#[test]
fn apiserver_scan_lists_running_sensitive_pods_no_policy_covers() {
    run(|env| async move {
        let client = env.cluster.client().await;
        // Audit mode lets an uncovered sensitive pod in: the situation the scan is for.
        create_namespace(&client, "t-scan", json!({"keyd.io/enforcement": "audit"})).await;
        Api::<EncryptionPolicy>::namespaced(client.clone(), "t-scan")
            .create(
                &PostParams::default(),
                &policy("t-scan", "api", "ipsec", json!({"app": "api"})),
            )
            .await
            .unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), "t-scan");
        for p in [
            pod("orphan", &[SENSITIVE, ("app", "batch")], &[]),
            pod("covered", &[SENSITIVE, ("app", "api")], &[]),
            pod("plain", &[("app", "batch")], &[]),
        ] {
            pods.create(&PostParams::default(), &p).await.unwrap();
        }
        // The real binary, as an operator would run it.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyd-webhook"))
            .args(["scan", "--offline", "-o", "json", "--fail"])
            .env("KUBECONFIG", &env.cluster.kubeconfig)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "--fail with findings: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let findings: Vec<Value> = serde_json::from_str(&stdout).unwrap();
        let here: Vec<&Value> = findings
            .iter()
            .filter(|f| f["namespace"] == "t-scan")
            .collect();
        assert_eq!(here.len(), 1, "{here:#?}");
        assert_eq!(here[0]["pod"], "orphan");
        assert_eq!(here[0]["reason"], "no_policy");
    });
}

#[test]
fn apiserver_pods_created_by_controllers_are_checked_too() {
    run(|env| async move {
        let client = env.cluster.client().await;
        create_namespace(&client, "t-controller", json!({})).await;
        let policies = Api::<EncryptionPolicy>::namespaced(client.clone(), "t-controller");
        policies
            .create(
                &PostParams::default(),
                &policy("t-controller", "api", "ipsec", json!({"app": "api"})),
            )
            .await
            .unwrap();
        // A covered sensitive Deployment: the controllers create its pod, which is admitted.
        let deployments = workload_api(&client, "t-controller", WORKLOADS[0]);
        let d = workload(
            WORKLOADS[0],
            "api",
            json!({"keyd.io/sensitive": "true", "app": "api"}),
        );
        let mut created = false;
        for _ in 0..50 {
            if deployments.create(&PostParams::default(), &d).await.is_ok() {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(created, "a covered Deployment is admitted");
        let pods = Api::<Pod>::namespaced(client.clone(), "t-controller");
        let count = || async { pods.list(&Default::default()).await.unwrap().items.len() };
        for _ in 0..300 {
            if count().await == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            count().await,
            1,
            "the ReplicaSet's pod was not created:\n{}",
            env.cluster.controller_manager_log()
        );

        // The policy goes away. Scaling keeps the template (allowed: unchanged), but the new pod
        // the ReplicaSet controller creates is refused, and the ReplicaSet says why.
        policies.delete("api", &Default::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        deployments
            .patch(
                "api",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await
            .unwrap();
        let replicasets = workload_api(
            &client,
            "t-controller",
            ("apps", "v1", "ReplicaSet", "replicasets"),
        );
        let mut failure = String::new();
        for _ in 0..300 {
            let list = replicasets.list(&Default::default()).await.unwrap();
            if let Some(m) = list.items.iter().find_map(|rs| {
                rs.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find_map(|c| {
                        (c["type"] == "ReplicaFailure")
                            .then(|| c["message"].as_str().unwrap_or_default().to_owned())
                    })
            }) {
                failure = m;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            failure.contains("denied the request: keyd: Pod t-controller/api-")
                && failure.contains("no EncryptionPolicy or ClusterEncryptionPolicy selects it"),
            "ReplicaSet failure condition: {failure:?}\n{}",
            env.cluster.controller_manager_log()
        );
        assert_eq!(count().await, 1, "the refused pod must not exist");
        // The refusal of a controller's pod is recorded like any other.
        env.keyd
            .wait_record(|a, d| a == "admission.denied" && d["namespace"] == "t-controller")
            .await;
    });
}
