//! The Kubernetes manifests under `deploy/`, as a user gets them: every Kustomize folder rendered
//! with a current kustomize, every rendered object validated offline against the Kubernetes
//! schemas (`kubernetes-validate --strict`, at the versions of `SCHEMA_VERSIONS`), and the dev
//! overlay applied server-side to a real kube-apiserver (1.20, built by
//! `scripts/kube-apiserver.sh`) with Debian's kubectl, then read back; keyd's RBAC is checked there
//! by asking the API server what each account may do.
//!
//! A Rust test rather than a script: the API server harness (`keyd_tests::cluster`) and the
//! prerequisite rule (skip locally, fail under `CI=true`) are already here, and `cargo test` is
//! where a reader looks for what is tested.
//!
//! Needs the tools `./scripts/test.sh` installs (see `keyd_tests::manifests`). Without them the
//! tests print why and pass, except in CI (`CI=true`), where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use keyd_tests::cluster::Cluster;
use keyd_tests::manifests::{self, NO_SCHEMA, SCHEMA_VERSIONS, Tools};
use keyd_tests::prereq::require;
use serde_json::Value;

/// Every Kustomize folder: the dev overlay, and each base on its own.
const FOLDERS: [&str; 5] = ["overlays/dev", "crds", "keyd", "node-shim", "webhook"];

/// The field manager of the test's applies.
const MANAGER: &str = "keyd-manifests-test";

fn tools() -> Option<Tools> {
    Tools::required()
}

fn id(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or("-"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn has_schema(o: &Value) -> bool {
    !NO_SCHEMA
        .iter()
        .any(|(api, kind)| o["apiVersion"] == *api && o["kind"] == *kind)
}

#[test]
fn every_rendered_manifest_validates_offline() {
    let Some(tools) = tools() else { return };
    let scratch = tempfile::tempdir().unwrap();
    for folder in FOLDERS {
        let objects = manifests::render(&tools, &manifests::deploy_dir().join(folder))
            .unwrap_or_else(|e| panic!("rendering deploy/{folder}: {e}"));
        assert!(!objects.is_empty(), "deploy/{folder} renders nothing");
        // Keys never travel in manifests: certificates come from cert-manager, the KEK is made
        // by keyd on its volume.
        for o in &objects {
            assert_ne!(
                o["kind"],
                "Secret",
                "deploy/{folder} holds a Secret: {}",
                id(o)
            );
        }
        for version in SCHEMA_VERSIONS {
            let passed = manifests::validate(&tools, &objects, version, scratch.path())
                .unwrap_or_else(|e| panic!("deploy/{folder}: {e}"));
            let with_schema = objects.iter().filter(|o| has_schema(o)).count();
            assert_eq!(passed, with_schema, "deploy/{folder} at {version}");
        }
    }
}

/// The dev overlay is the whole install: each part is in it once.
#[test]
fn the_dev_overlay_holds_every_part() {
    let Some(tools) = tools() else { return };
    let objects = manifests::render(&tools, &manifests::deploy_dir().join("overlays/dev")).unwrap();
    let ids: Vec<String> = objects.iter().map(id).collect();
    for want in [
        "Namespace -/keyd",
        "CustomResourceDefinition -/encryptionpolicies.keyd.io",
        "CustomResourceDefinition -/clusterencryptionpolicies.keyd.io",
        "StatefulSet keyd/keyd",
        "Service keyd/keyd",
        "ConfigMap keyd/keyd",
        "PodDisruptionBudget keyd/keyd",
        "NetworkPolicy keyd/keyd",
        "DaemonSet keyd/node-shim",
        "ConfigMap keyd/node-shim",
        "Deployment keyd/keyd-webhook",
        "NetworkPolicy keyd/keyd-webhook",
        "ValidatingWebhookConfiguration -/keyd-webhook",
    ] {
        assert_eq!(
            ids.iter().filter(|i| *i == want).count(),
            1,
            "{want} in {ids:#?}"
        );
    }
    // Everything namespaced lives in keyd.
    for o in &objects {
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "keyd", "{}", id(o));
        }
    }
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    assert_eq!(sts["spec"]["replicas"], 1, "redb has one writer");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"][0],
        "ReadWriteOnce"
    );
}

fn kubectl(bin: &Path, cluster: &Cluster) -> Command {
    let mut c = Command::new(bin);
    c.arg("--kubeconfig").arg(&cluster.kubeconfig);
    c
}

fn output(mut cmd: Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `kind.group` as kubectl takes it.
fn resource(o: &Value) -> String {
    let kind = o["kind"].as_str().unwrap();
    match o["apiVersion"].as_str().unwrap().split_once('/') {
        Some((group, _)) => format!("{kind}.{group}"),
        None => kind.to_owned(),
    }
}

/// The rendered dev overlay as the 1.20 API server takes it: cert-manager's objects left out
/// (the test server has no cert-manager, whose CRDs are not this project's), and the
/// PodDisruptionBudgets as policy/v1beta1, the same fields under the version 1.20 serves
/// (policy/v1 came in 1.21; the offline validation checks them as policy/v1).
fn for_the_test_server(objects: Vec<Value>) -> (Vec<Value>, Vec<String>) {
    let mut apply = Vec::new();
    let mut left_out = Vec::new();
    for mut o in objects {
        if !has_schema(&o) {
            left_out.push(id(&o));
            continue;
        }
        if o["kind"] == "PodDisruptionBudget" {
            assert_eq!(o["apiVersion"], "policy/v1");
            o["apiVersion"] = "policy/v1beta1".into();
        }
        apply.push(o);
    }
    (apply, left_out)
}

fn write_objects(path: &Path, objects: &[Value]) {
    let mut text = String::new();
    for o in objects {
        text.push_str("---\n");
        text.push_str(&serde_norway::to_string(o).unwrap());
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_overlay_applies_server_side_to_a_real_api_server() {
    let Some(tools) = tools() else { return };
    if !require(
        "Debian's kubectl 1.20",
        manifests::apply_kubectl().map(|_| ()),
    ) || !require(
        "kube-apiserver and etcd",
        keyd_tests::cluster::binaries().map(|_| ()),
    ) {
        return;
    }
    let kubectl_bin = manifests::apply_kubectl().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path()).await;

    let rendered =
        manifests::render(&tools, &manifests::deploy_dir().join("overlays/dev")).unwrap();
    let (objects, left_out) = for_the_test_server(rendered);
    // Only cert-manager's objects are left out, and all of them are named here.
    let mut left_out_sorted = left_out.clone();
    left_out_sorted.sort();
    assert_eq!(
        left_out_sorted,
        [
            "Certificate keyd/keyd-admin",
            "Certificate keyd/keyd-ca",
            "Certificate keyd/keyd-node-shim-trust",
            "Certificate keyd/keyd-server",
            "Certificate keyd/keyd-webhook",
            "Certificate keyd/keyd-webhook-client",
            "Issuer keyd/keyd-ca",
            "Issuer keyd/keyd-selfsigned",
            "Issuer keyd/keyd-webhook-selfsigned",
        ]
    );
    let file = dir.path().join("dev.yaml");
    write_objects(&file, &objects);

    let mut apply = kubectl(&kubectl_bin, &cluster);
    apply
        .args(["apply", "--server-side", "--field-manager", MANAGER, "-f"])
        .arg(&file);
    let (ok, out) = output(apply);
    assert!(
        ok,
        "server-side apply failed:\n{out}\n{}",
        cluster.apiserver_log()
    );

    // Every object is there, owned by this apply.
    for o in &objects {
        let mut get = kubectl(&kubectl_bin, &cluster);
        get.args(["get", &resource(o), o["metadata"]["name"].as_str().unwrap()]);
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            get.args(["-n", ns]);
        }
        get.args(["-o", "json"]);
        let (ok, out) = output(get);
        assert!(ok, "{} is not there: {out}", id(o));
        let got: Value = serde_json::from_str(&out).unwrap();
        assert!(got["metadata"]["uid"].is_string(), "{}", id(o));
        let managers: Vec<&str> = got["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(managers.contains(&MANAGER), "{}: {managers:?}", id(o));
    }
    // What the server kept is what was sent, where it matters most.
    let (_, ds) = output({
        let mut c = kubectl(&kubectl_bin, &cluster);
        c.args([
            "get",
            "daemonset.apps",
            "node-shim",
            "-n",
            "keyd",
            "-o",
            "json",
        ]);
        c
    });
    let ds: Value = serde_json::from_str(&ds).unwrap();
    let token = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_object())
        .expect("the projected token");
    assert_eq!(token["audience"], "keyd");
    assert_eq!(token["expirationSeconds"], 600);
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);

    // The API server refuses what is not in its schema, so the apply above did check fields.
    let mut broken = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet")
        .unwrap()
        .clone();
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] =
        true.into();
    let broken_file = dir.path().join("broken.yaml");
    write_objects(&broken_file, &[broken]);
    let mut apply = kubectl(&kubectl_bin, &cluster);
    apply
        .args(["apply", "--server-side", "--field-manager", MANAGER, "-f"])
        .arg(&broken_file);
    let (ok, out) = output(apply);
    assert!(!ok, "a field the schema lacks was accepted: {out}");
    assert!(out.contains("runAsNonRot"), "{out}");

    check_rbac(&kubectl_bin, &cluster);
}

/// keyd's account may make exactly the calls keyd makes (deploy/keyd/rbac.yaml says which code
/// makes each), node-shim's none, as the API server's authorizer answers for the applied RBAC.
fn check_rbac(kubectl_bin: &Path, cluster: &Cluster) {
    let keyd = "system:serviceaccount:keyd:keyd";
    let node_shim = "system:serviceaccount:keyd:node-shim";
    // (account, verb, resource, namespace: None for cluster-wide, allowed)
    let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
        // bootstrap: TokenReview, the token's pod in keyd's namespace, the named Node
        (
            keyd,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            true,
        ),
        (keyd, "get", "pods", Some("keyd"), true),
        (keyd, "get", "nodes", None, true),
        // the policy watcher: list and watch, cluster-wide
        (keyd, "list", "pods", None, true),
        (keyd, "watch", "pods", None, true),
        (keyd, "list", "namespaces", None, true),
        (keyd, "watch", "namespaces", None, true),
        (keyd, "list", "encryptionpolicies.keyd.io", None, true),
        (keyd, "watch", "encryptionpolicies.keyd.io", None, true),
        (
            keyd,
            "list",
            "clusterencryptionpolicies.keyd.io",
            None,
            true,
        ),
        (
            keyd,
            "watch",
            "clusterencryptionpolicies.keyd.io",
            None,
            true,
        ),
        // nothing else
        (keyd, "get", "pods", Some("default"), false),
        (keyd, "list", "nodes", None, false),
        (keyd, "watch", "nodes", None, false),
        (keyd, "get", "secrets", Some("keyd"), false),
        (keyd, "list", "secrets", None, false),
        (keyd, "get", "configmaps", Some("keyd"), false),
        (keyd, "create", "pods", Some("keyd"), false),
        (keyd, "delete", "pods", Some("keyd"), false),
        (
            keyd,
            "patch",
            "encryptionpolicies.keyd.io",
            Some("default"),
            false,
        ),
        (keyd, "update", "nodes", None, false),
        (keyd, "create", "serviceaccounts/token", Some("keyd"), false),
        (
            keyd,
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            None,
            false,
        ),
        // node-shim never calls the API server
        (
            node_shim,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            false,
        ),
        (node_shim, "get", "pods", Some("keyd"), false),
        (node_shim, "get", "nodes", None, false),
        (node_shim, "get", "secrets", Some("keyd"), false),
    ];
    for (account, verb, resource, namespace, allowed) in cases {
        let mut c = kubectl(kubectl_bin, cluster);
        c.args(["auth", "can-i", verb, resource, "--as", account]);
        match namespace {
            Some(ns) => c.args(["-n", ns]),
            None => c.arg("--all-namespaces"),
        };
        let (yes, out) = output(c);
        assert_eq!(
            yes,
            *allowed,
            "{account} {verb} {resource} in {}: {}",
            namespace.unwrap_or("every namespace"),
            out.trim()
        );
    }
}
